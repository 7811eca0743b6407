//! The database connection: created when missing, pooled, migrated per context.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

/// Connects to `url`, first creating its database through the server's `postgres` database
/// when it does not exist yet.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    ensure_database_exists(url).await?;
    connect_existing(url, max_connections).await
}

/// Connects to a database that must already exist.
pub async fn connect_existing(
    url: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    Database::connect(options).await
}

async fn ensure_database_exists(url: &str) -> Result<(), DbErr> {
    let (server, name) = split_database_name(url).ok_or_else(|| {
        DbErr::Custom(format!(
            "no database name in {}",
            crate::config::mask_password(url)
        ))
    })?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(DbErr::Custom(format!(
            "database name {name:?} must be letters, digits, '_' or '-'"
        )));
    }
    let mut options = ConnectOptions::new(format!("{server}/postgres{}", query_suffix(url)));
    options
        .max_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let admin = Database::connect(options).await?;
    let exists = admin
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [name.into()],
        ))
        .await?
        .is_some();
    if !exists {
        // Another instance may win the race: "already exists" (42P04) is success too.
        match admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
        {
            Ok(_) => tracing::info!(database = name, "created the database"),
            Err(error) if error.to_string().contains("already exists") => {}
            Err(error) => return Err(error),
        }
    }
    admin.close().await
}

/// Whether `error` means the database cannot be reached right now (as opposed to a query
/// that failed): connection refused or lost, pool exhausted, database not accepting connections.
pub fn is_unavailable(error: &DbErr) -> bool {
    if matches!(error, DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) {
        return true;
    }
    let text = error.to_string().to_ascii_lowercase();
    [
        "connection",
        "communicating with database",
        "pool timed out",
        "io error",
        "broken pipe",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// `postgres://u@h:5432/gozon?x=y` -> (`postgres://u@h:5432`, `gozon`).
fn split_database_name(url: &str) -> Option<(&str, &str)> {
    let without_query = url.split('?').next()?;
    let (scheme, rest) = without_query.split_once("://")?;
    let slash = rest.rfind('/')?;
    let name = &rest[slash + 1..];
    if name.is_empty() {
        return None;
    }
    Some((&without_query[..scheme.len() + 3 + slash], name))
}

fn query_suffix(url: &str) -> &str {
    url.find('?').map_or("", |at| &url[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_database_name_off() {
        assert_eq!(
            split_database_name("postgres://postgres@127.0.0.1:5432/gozon"),
            Some(("postgres://postgres@127.0.0.1:5432", "gozon"))
        );
        assert_eq!(
            split_database_name("postgres://u:p@h/db_1?sslmode=disable"),
            Some(("postgres://u:p@h", "db_1"))
        );
        assert_eq!(split_database_name("postgres://h:5432/"), None);
        assert_eq!(split_database_name("postgres://h:5432"), None);
    }
}
