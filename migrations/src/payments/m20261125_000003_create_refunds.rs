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
-- One row per order ever refunded: the primary key makes "refund once per order" hold
-- whatever the redeliveries, like order_payments for the debit.
CREATE TABLE payments.order_refunds (
    order_id       UUID PRIMARY KEY,
    user_id        TEXT NOT NULL,
    amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- The ledger learns refunds: an order has at most one debit and one refund.
ALTER TABLE payments.transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE payments.transactions ADD CONSTRAINT transactions_kind_check
    CHECK (kind IN ('top_up', 'debit', 'refund'));
ALTER TABLE payments.transactions DROP CONSTRAINT transactions_check;
ALTER TABLE payments.transactions ADD CONSTRAINT transactions_check
    CHECK ((kind IN ('debit', 'refund')) = (order_id IS NOT NULL));
ALTER TABLE payments.transactions DROP CONSTRAINT transactions_order_id_key;
ALTER TABLE payments.transactions ADD CONSTRAINT transactions_order_id_kind_key UNIQUE (order_id, kind);
"#,
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS payments.order_refunds")
            .await?;
        Ok(())
    }
}
