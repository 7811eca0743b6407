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
CREATE TABLE orders.orders (
    id             UUID PRIMARY KEY,
    user_id        TEXT NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 64),
    amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
    status         TEXT NOT NULL CHECK (status IN ('NEW', 'FINISHED', 'CANCELLED')),
    reason         TEXT NULL CHECK (reason IS NULL OR status = 'CANCELLED'),
    correlation_id TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX orders_user_created_idx ON orders.orders (user_id, created_at DESC, id DESC);
CREATE INDEX orders_in_flight_idx ON orders.orders (created_at) WHERE status = 'NEW';

CREATE TABLE orders.outbox (
    seq            BIGSERIAL PRIMARY KEY,
    message_id     UUID NOT NULL UNIQUE,
    message_type   TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    body           JSONB NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at        TIMESTAMPTZ NULL
);
CREATE INDEX orders_outbox_unsent_idx ON orders.outbox (seq) WHERE sent_at IS NULL;

CREATE TABLE orders.inbox (
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
                "DROP TABLE IF EXISTS orders.inbox; DROP TABLE IF EXISTS orders.outbox; \
                 DROP TABLE IF EXISTS orders.orders;",
            )
            .await?;
        Ok(())
    }
}
