//! The inbox: which messages a consumer has already applied, recorded in the same transaction
//! as their effect, so a redelivered or duplicated message has no second effect.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use uuid::Uuid;

/// Records that `consumer` applies `message_id` now. Returns false if it already had.
///
/// Safe under concurrency: two transactions inserting the same key serialise on the primary
/// key; the second waits for the first and then inserts nothing. Callers must apply the effect
/// only when this returns true, inside the same transaction.
pub async fn record_first_delivery(
    conn: &impl ConnectionTrait,
    schema: &str,
    consumer: &str,
    message_id: Uuid,
) -> Result<bool, DbErr> {
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "INSERT INTO {schema}.inbox (consumer, message_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING"
            ),
            [consumer.into(), message_id.into()],
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}
