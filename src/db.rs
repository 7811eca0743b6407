//! The PostgreSQL connection pool (the database created when missing), and the one answer to
//! "is this error the database being unreachable?" that HTTP (503) and consumers (hold and
//! retry) share.

use std::time::Duration;

use sea_orm::sqlx;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, RuntimeErr};

use crate::ops::telemetry::mask_password;

/// How many connections a pool holds (at most `max`, and `min` kept open from the start), how
/// long a connection may take to open, and the limits each session runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSize {
    pub max: u32,
    pub min: u32,
    pub connect_timeout: Duration,
    pub session: Option<SessionLimits>,
}

/// What bounds a serving session, so a vanished client or server is given up soon, whichever
/// side vanished: the server ends a statement after `statement_timeout`, and a transaction left
/// idle after `idle_in_transaction` (releasing its locks), and probes a silent client with TCP
/// keepalives after `keepalive_idle`. (sqlx sets no keepalive on its own sockets: Gozon's side
/// bounds each transaction instead, see [`PoolSize::operation_timeout`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    pub statement_timeout: Duration,
    pub idle_in_transaction: Duration,
    pub keepalive_idle: Duration,
}

impl PoolSize {
    /// For a tool's few queries: connections opened as needed, no session limits (a migration
    /// or an audit may take long).
    pub const fn on_demand(max: u32) -> PoolSize {
        PoolSize {
            max,
            min: 1,
            connect_timeout: Duration::from_secs(5),
            session: None,
        }
    }

    /// How long Gozon itself lets one unit of database work (a transaction of a consumer, a
    /// relay batch, a chore) take before it drops it, its connection with it: a little more than
    /// the server's own statement timeout, so a server that vanished without a word (a host
    /// that never returns, the old primary after a failover) holds nothing for long.
    pub fn operation_timeout(&self) -> Duration {
        self.session.map_or(Duration::from_secs(60), |limits| {
            limits.statement_timeout + Duration::from_secs(2)
        })
    }
}

/// Connects to `url`, first creating its database through the server's `postgres` database
/// when it does not exist yet.
pub async fn connect(url: &str, size: PoolSize) -> Result<DatabaseConnection, DbErr> {
    ensure_database_exists(url).await?;
    connect_existing(url, size).await
}

/// Connects to a database that must already exist.
pub async fn connect_existing(url: &str, size: PoolSize) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(size.max)
        .min_connections(size.min.clamp(1, size.max))
        .connect_timeout(size.connect_timeout)
        .acquire_timeout(size.connect_timeout)
        .sqlx_logging(false);
    if let Some(limits) = size.session {
        let millis = |d: Duration| d.as_millis().to_string();
        let keepalive = limits.keepalive_idle.as_secs().max(1);
        let session = [
            ("statement_timeout", millis(limits.statement_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(limits.idle_in_transaction),
            ),
            ("tcp_keepalives_idle", keepalive.to_string()),
            ("tcp_keepalives_interval", keepalive.div_ceil(2).to_string()),
            ("tcp_keepalives_count", "3".to_owned()),
        ];
        options.map_sqlx_postgres_opts(move |opts| opts.options(session.clone()));
    }
    Database::connect(options).await
}

async fn ensure_database_exists(url: &str) -> Result<(), DbErr> {
    let (server, name) = split_database_name(url)
        .ok_or_else(|| DbErr::Custom(format!("no database name in {}", mask_password(url))))?;
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
        // Another instance may win the race: duplicate_database is success too.
        match admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
        {
            Ok(_) => tracing::info!(database = name, "created the database"),
            Err(error) if sqlstate(&error).as_deref() == Some(DUPLICATE_DATABASE) => {}
            Err(error) => return Err(error),
        }
    }
    admin.close().await
}

const DUPLICATE_DATABASE: &str = "42P04";

/// Rows one purge statement deletes at most.
const PURGE_BATCH: u64 = 5000;

/// Deletes the rows of `table` older than `retention` by `time_column`, a bounded batch per
/// statement (keyed by `key_columns`) so that a long backlog never holds locks for long.
/// Returns how many went.
pub async fn purge_older_than(
    conn: &impl ConnectionTrait,
    table: &str,
    key_columns: &str,
    time_column: &str,
    retention: Duration,
) -> Result<u64, DbErr> {
    let secs = retention.as_secs_f64();
    let sql = format!(
        "DELETE FROM {table} WHERE ({key_columns}) IN (SELECT {key_columns} FROM {table} \
         WHERE {time_column} < clock_timestamp() - make_interval(secs => {secs}) LIMIT {PURGE_BATCH})"
    );
    let mut deleted = 0;
    loop {
        let result = conn
            .execute_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                sql.clone(),
            ))
            .await?;
        deleted += result.rows_affected();
        if result.rows_affected() < PURGE_BATCH {
            return Ok(deleted);
        }
    }
}

/// Whether `error` means the database cannot be reached right now, as opposed to a statement
/// that failed: no connection to be had (refused, pool exhausted or closed), a connection lost
/// mid-statement (I/O, TLS or protocol failure), or the server saying so by SQLSTATE — class 08
/// (connection exception), 57P01-57P05 (shutting down, crashed, not accepting connections yet,
/// database dropped, idle session ended), 25P03/25P04 (a transaction timed out and its session
/// ended) or 53300 (too many connections).
pub fn is_unavailable(error: &DbErr) -> bool {
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(error)) | DbErr::Query(RuntimeErr::SqlxError(error)) => {
            match error.as_ref() {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => true,
                sqlx::Error::Database(error) => error.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
                }),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether the server answered and refused us for good: a wrong password or role (class 28), or
/// a database that does not exist (3D000). Waiting would not help.
pub fn is_refusal(error: &DbErr) -> bool {
    let inner = match error {
        DbErr::Conn(RuntimeErr::SqlxError(error))
        | DbErr::Exec(RuntimeErr::SqlxError(error))
        | DbErr::Query(RuntimeErr::SqlxError(error)) => error.as_ref(),
        _ => return false,
    };
    match inner {
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("28") || code == "3D000"),
        _ => false,
    }
}

/// The SQLSTATE of a statement the server refused, if that is what `error` is.
fn sqlstate(error: &DbErr) -> Option<String> {
    match error {
        DbErr::Exec(RuntimeErr::SqlxError(error)) | DbErr::Query(RuntimeErr::SqlxError(error)) => {
            match error.as_ref() {
                sqlx::Error::Database(error) => error.code().map(|code| code.into_owned()),
                _ => None,
            }
        }
        _ => None,
    }
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
