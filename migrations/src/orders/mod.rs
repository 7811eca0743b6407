//! Migrations of the `orders` schema.

use sea_orm_migration::prelude::*;

mod m20261125_000001_create_orders;
mod m20261125_000002_create_idempotency_keys;
mod m20261125_000003_index_new_orders_by_user;
mod m20261125_000004_order_lifecycle;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_orders::Migration),
            Box::new(m20261125_000002_create_idempotency_keys::Migration),
            Box::new(m20261125_000003_index_new_orders_by_user::Migration),
            Box::new(m20261125_000004_order_lifecycle::Migration),
            Box::new(crate::messaging_tables::OutboxTraceContext { schema: "orders" }),
        ]
    }

    fn migration_table_name() -> DynIden {
        "seaql_migrations_orders".to_owned().into_iden()
    }
}
