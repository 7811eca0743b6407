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
CREATE TABLE payments.accounts (
    user_id        TEXT PRIMARY KEY CHECK (char_length(user_id) BETWEEN 1 AND 64),
    -- The CHECK is the last line of defence: the debit is conditional anyway.
    balance_minor  BIGINT NOT NULL DEFAULT 0 CHECK (balance_minor >= 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- One row per order ever asked to be paid: the primary key makes "debit once per order"
-- hold even if the same order is requested under two different message ids.
CREATE TABLE payments.order_payments (
    order_id       UUID PRIMARY KEY,
    user_id        TEXT NOT NULL,
    amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
    outcome        TEXT NOT NULL CHECK (outcome IN ('pending', 'debited', 'no_account', 'insufficient_funds')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- The ledger: every balance change is a row.
CREATE TABLE payments.transactions (
    id                  BIGSERIAL PRIMARY KEY,
    user_id             TEXT NOT NULL REFERENCES payments.accounts (user_id),
    kind                TEXT NOT NULL CHECK (kind IN ('top_up', 'debit')),
    amount_minor        BIGINT NOT NULL CHECK (amount_minor > 0),
    order_id            UUID NULL UNIQUE,
    balance_after_minor BIGINT NOT NULL CHECK (balance_after_minor >= 0),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CHECK ((kind = 'debit') = (order_id IS NOT NULL))
);
CREATE INDEX transactions_user_idx ON payments.transactions (user_id, id DESC);

CREATE TABLE payments.outbox (
    seq            BIGSERIAL PRIMARY KEY,
    message_id     UUID NOT NULL UNIQUE,
    message_type   TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    body           JSONB NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at        TIMESTAMPTZ NULL
);
CREATE INDEX payments_outbox_unsent_idx ON payments.outbox (seq) WHERE sent_at IS NULL;

CREATE TABLE payments.inbox (
    consumer     TEXT NOT NULL,
    message_id   UUID NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, message_id)
);
"#,
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DROP TABLE IF EXISTS payments.inbox; DROP TABLE IF EXISTS payments.outbox; \
                 DROP TABLE IF EXISTS payments.transactions; \
                 DROP TABLE IF EXISTS payments.order_payments; DROP TABLE IF EXISTS payments.accounts;",
            )
            .await?;
        Ok(())
    }
}
