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
-- Idempotency-Key: the first response to a POST, replayed to retries of the same request.
CREATE TABLE orders.idempotency_keys (
    endpoint     TEXT NOT NULL,
    key          TEXT NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    fingerprint  TEXT NOT NULL,
    status       SMALLINT NOT NULL,
    body         JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (endpoint, key)
);
CREATE INDEX orders_idempotency_keys_created_idx ON orders.idempotency_keys (created_at);
"#,
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS orders.idempotency_keys")
            .await?;
        Ok(())
    }
}
