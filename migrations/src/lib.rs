//! Database migrations of Gozon: one migrator per bounded context, each owning one PostgreSQL schema.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};

pub mod messaging_tables;
pub mod orders;
pub mod payments;

pub use sea_orm_migration;

/// The schema a context owns and the migrator that builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Orders,
    Payments,
}

impl Context {
    pub const fn schema(self) -> &'static str {
        match self {
            Context::Orders => "orders",
            Context::Payments => "payments",
        }
    }

    /// Tables the serving role may not change freely, with the only rights it gets on them:
    /// the ledger is append-only, and a once-per-order record is never deleted (a debit's may
    /// record its outcome; a refund's is written once).
    pub const fn restricted_tables(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Context::Orders => &[],
            Context::Payments => &[
                ("transactions", "SELECT, INSERT"),
                ("order_payments", "SELECT, INSERT, UPDATE"),
                ("order_refunds", "SELECT, INSERT"),
            ],
        }
    }

    /// A fixed key per context for `pg_advisory_xact_lock`, so instances that start together
    /// apply each migration once instead of racing on the same DDL.
    fn lock_key(self) -> i64 {
        match self {
            Context::Orders => 0x676f_7a6f_6e01,
            Context::Payments => 0x676f_7a6f_6e02,
        }
    }
}

/// Creates the context's schema and applies its pending migrations, in one transaction held
/// under an advisory lock (PostgreSQL DDL is transactional, so a failed step leaves nothing).
pub async fn migrate(db: &DatabaseConnection, context: Context) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    txn.execute_unprepared(&format!(
        "SELECT pg_advisory_xact_lock({})",
        context.lock_key()
    ))
    .await?;
    txn.execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS {}", context.schema()))
        .await?;
    match context {
        Context::Orders => orders::Migrator::up(&txn, None).await?,
        Context::Payments => payments::Migrator::up(&txn, None).await?,
    }
    txn.commit().await
}

/// Lets `db_role` read and write the context's tables (and use its sequences), now and for
/// tables later migrations create: the least a process serving the context needs, less on the
/// [`Context::restricted_tables`]. It gets no DDL rights and nothing on any other schema.
/// Idempotent.
pub async fn grant_dml(
    db: &DatabaseConnection,
    context: Context,
    db_role: &str,
) -> Result<(), DbErr> {
    let valid = !db_role.is_empty()
        && db_role.len() <= 63
        && db_role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(DbErr::Custom(format!(
            "database role {db_role:?} must be 1-63 lowercase letters, digits or '_'"
        )));
    }
    let schema = context.schema();
    let txn = db.begin().await?;
    txn.execute_unprepared(&format!(
        "GRANT USAGE ON SCHEMA {schema} TO \"{db_role}\"; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO \"{db_role}\"; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO \"{db_role}\"; \
         ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} \
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO \"{db_role}\"; \
         ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO \"{db_role}\";"
    ))
    .await?;
    for (table, rights) in context.restricted_tables() {
        txn.execute_unprepared(&format!(
            "REVOKE ALL ON {schema}.{table} FROM \"{db_role}\"; \
             GRANT {rights} ON {schema}.{table} TO \"{db_role}\";"
        ))
        .await?;
    }
    txn.commit().await
}
