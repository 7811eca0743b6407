//! Migrations of the `payments` schema.

use sea_orm_migration::prelude::*;

mod m20261125_000001_create_accounts;
mod m20261125_000002_create_idempotency_keys;
mod m20261125_000003_create_refunds;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_accounts::Migration),
            Box::new(m20261125_000002_create_idempotency_keys::Migration),
            Box::new(m20261125_000003_create_refunds::Migration),
            Box::new(crate::messaging_tables::OutboxTraceContext { schema: "payments" }),
        ]
    }

    fn migration_table_name() -> DynIden {
        "seaql_migrations_payments".to_owned().into_iden()
    }
}
