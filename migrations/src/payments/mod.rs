//! Migrations of the `payments` schema.

use sea_orm_migration::prelude::*;

mod m20261125_000001_create_accounts;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261125_000001_create_accounts::Migration)]
    }

    fn migration_table_name() -> DynIden {
        "seaql_migrations_payments".to_owned().into_iden()
    }
}
