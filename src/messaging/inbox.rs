//! The inbox: which messages a consumer has already applied, recorded in the same transaction
//! as their effect, so a redelivered or duplicated message has no second effect.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};
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

/// Records that `consumer` applies each of `message_ids` (sorted, so batches take the keys in
/// one order) now, in one statement. Returns the ids it had not recorded before; an id listed
/// twice is recorded, and returned, once.
///
/// Safe under concurrency as [`record_first_delivery`] is: rows are inserted in the order of
/// their ids, each key serialising a racing insert of the same key, which then inserts nothing.
pub async fn record_first_deliveries(
    conn: &impl ConnectionTrait,
    schema: &str,
    consumer: &str,
    message_ids: &[Uuid],
) -> Result<Vec<Uuid>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "INSERT INTO {schema}.inbox (consumer, message_id) \
                 SELECT $1, id FROM unnest($2::uuid[]) AS id ORDER BY id \
                 ON CONFLICT DO NOTHING RETURNING message_id"
            ),
            [consumer.into(), message_ids.to_vec().into()],
        ))
        .await?;
    rows.iter()
        .map(|row| row.try_get::<Uuid>("", "message_id"))
        .collect()
}

/// The inbox record of one message, for a handler that writes it from a statement of its own
/// ([`crate::messaging::consumer::Handler::apply_alone`]).
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub schema: &'a str,
    pub consumer: &'a str,
    pub message_id: Uuid,
}

impl Record<'_> {
    /// An INSERT of this record for each row of `gate` (a CTE: the record is written only with
    /// the effect), its two values bound at `$first` and `$first + 1` ([`Record::values`]).
    /// A plain INSERT: a message already recorded makes the whole statement fail.
    pub fn insert_per_row_of(&self, gate: &str, first: usize) -> String {
        format!(
            "INSERT INTO {}.inbox (consumer, message_id) SELECT ${first}, ${} FROM {gate}",
            self.schema,
            first + 1
        )
    }

    /// The consumer and the message id, in that order.
    pub fn values(&self) -> [Value; 2] {
        [self.consumer.into(), self.message_id.into()]
    }
}

/// For a one-statement path: `, recorded AS (...)`, the CTE that writes `record` for each row
/// of `gate` with its values bound at `$first` and `$first + 1`, and those values; nothing
/// without a record (a batch wrote it already, with [`record_first_deliveries`]).
pub fn recorded_cte(record: Option<Record<'_>>, gate: &str, first: usize) -> (String, Vec<Value>) {
    match record {
        Some(record) => (
            format!(", recorded AS ({})", record.insert_per_row_of(gate, first)),
            record.values().into(),
        ),
        None => (String::new(), Vec::new()),
    }
}
