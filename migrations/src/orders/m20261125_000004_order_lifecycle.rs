use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                r#"
-- An order's whole life: a paid order can be refunded (REFUNDING, then REFUNDED), and a
-- cancelled one whose debit still arrived is paid back (refund_state).
ALTER TABLE orders.orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders.orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('NEW', 'FINISHED', 'CANCELLED', 'REFUNDING', 'REFUNDED'));
-- NULL: no money to give back; requested: a refund request is in the outbox or on its way;
-- refunded: Payments credited it back.
ALTER TABLE orders.orders ADD COLUMN refund_state TEXT NULL
    CHECK (refund_state IS NULL OR refund_state IN ('requested', 'refunded'));
CREATE INDEX orders_refund_requested_idx ON orders.orders (updated_at) WHERE refund_state = 'requested';
"#,
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DROP INDEX IF EXISTS orders.orders_refund_requested_idx; \
                 ALTER TABLE orders.orders DROP COLUMN IF EXISTS refund_state;",
            )
            .await?;
        Ok(())
    }
}
