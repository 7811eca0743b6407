//! The tables every context's schema has for messaging and HTTP idempotency, as functions of the
//! schema, for the migrations that create them in a new context. The migrations already applied
//! keep their own text (history does not change); a test checks they say exactly this. Steps
//! added later to every context are migrations of their own here.

use sea_orm_migration::prelude::*;

/// The transactional outbox (rows published by the relay) and the inbox (message ids a
/// consumer has applied).
pub fn outbox_and_inbox(schema: &str) -> String {
    format!(
        r#"CREATE TABLE {schema}.outbox (
    seq            BIGSERIAL PRIMARY KEY,
    message_id     UUID NOT NULL UNIQUE,
    message_type   TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    body           JSONB NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at        TIMESTAMPTZ NULL
);
CREATE INDEX {schema}_outbox_unsent_idx ON {schema}.outbox (seq) WHERE sent_at IS NULL;

CREATE TABLE {schema}.inbox (
    consumer     TEXT NOT NULL,
    message_id   UUID NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, message_id)
);
"#
    )
}

/// The outbox's trace context (added after the first contexts were created).
pub fn outbox_trace_context(schema: &str) -> String {
    format!(
        r#"
-- The W3C trace context of the span that wrote the row, so the message continues its trace.
-- The ALTER waits for the table's lock, and outbox writes queue behind it: not for long.
SET LOCAL lock_timeout = '5s';
ALTER TABLE {schema}.outbox ADD COLUMN traceparent TEXT NULL;
"#
    )
}

/// The migration that gives a context's outbox its trace context: the same step in every
/// context's migrator (each keeps its own migrations table, so the same name is fine there).
/// Applied: change it never, add a migration instead.
pub struct OutboxTraceContext {
    pub schema: &'static str,
}

impl MigrationName for OutboxTraceContext {
    fn name(&self) -> &str {
        "m20261201_000001_outbox_trace_context"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OutboxTraceContext {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(&outbox_trace_context(self.schema))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let drop = format!(
            "ALTER TABLE {}.outbox DROP COLUMN IF EXISTS traceparent",
            self.schema
        );
        manager.get_connection().execute_unprepared(&drop).await?;
        Ok(())
    }
}

/// The first response to each POST that carried an `Idempotency-Key`.
pub fn idempotency_keys(schema: &str) -> String {
    format!(
        r#"
-- Idempotency-Key: the first response to a POST, replayed to retries of the same request.
CREATE TABLE {schema}.idempotency_keys (
    endpoint     TEXT NOT NULL,
    key          TEXT NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    fingerprint  TEXT NOT NULL,
    status       SMALLINT NOT NULL,
    body         JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (endpoint, key)
);
CREATE INDEX {schema}_idempotency_keys_created_idx ON {schema}.idempotency_keys (created_at);
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_migrations_say_exactly_this() {
        let applied = [
            (
                "orders",
                include_str!("orders/m20261125_000001_create_orders.rs"),
                include_str!("orders/m20261125_000002_create_idempotency_keys.rs"),
            ),
            (
                "payments",
                include_str!("payments/m20261125_000001_create_accounts.rs"),
                include_str!("payments/m20261125_000002_create_idempotency_keys.rs"),
            ),
        ];
        for (schema, tables, keys) in applied {
            assert!(
                tables.contains(&outbox_and_inbox(schema)),
                "{schema} outbox/inbox"
            );
            assert!(
                keys.contains(&idempotency_keys(schema)),
                "{schema} idempotency keys"
            );
        }
    }
}
