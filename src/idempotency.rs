//! `Idempotency-Key` on POST requests: a retried request gets the first response again and has
//! no second effect. Each context keeps its keys in its own schema (`<schema>.idempotency_keys`),
//! written in the same transaction as the effect, and remembers them for [`RETENTION`].

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

/// How long a key is remembered.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// A client's key: 1-255 visible ASCII characters (a UUID, typically).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1-255 visible ASCII characters (a UUID, for instance)")]
pub struct IdempotencyKeyError;

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<IdempotencyKey, IdempotencyKeyError> {
        let visible = |b: u8| (0x21..=0x7e).contains(&b);
        if text.is_empty() || text.len() > 255 || !text.bytes().all(visible) {
            return Err(IdempotencyKeyError);
        }
        Ok(IdempotencyKey(text.to_owned()))
    }
}

/// What to do with a request that carries a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// First time: apply it, then [`remember`] the response in the same transaction.
    Fresh,
    /// Seen before with the same parameters: answer this, do nothing else.
    Replay {
        status: u16,
        body: serde_json::Value,
    },
    /// Seen before with other parameters: refuse.
    Reused,
}

/// Claims `key` for this request, inside the caller's transaction.
///
/// Safe under concurrency: a second request with the same key blocks on the primary key until
/// the first transaction ends; if it committed, the second finds its response and replays it;
/// if it rolled back (the request failed), the second proceeds as the first.
pub async fn claim(
    conn: &impl ConnectionTrait,
    schema: &str,
    endpoint: &str,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<Claim, DbErr> {
    // The placeholder row is replaced by `remember` before commit; it is never seen outside.
    let inserted = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "INSERT INTO {schema}.idempotency_keys (endpoint, key, fingerprint, status, body) \
                 VALUES ($1, $2, $3, 0, 'null') ON CONFLICT (endpoint, key) DO NOTHING"
            ),
            [endpoint.into(), key.0.as_str().into(), fingerprint.into()],
        ))
        .await?
        .rows_affected()
        == 1;
    if inserted {
        return Ok(Claim::Fresh);
    }
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT fingerprint, status, body FROM {schema}.idempotency_keys \
                 WHERE endpoint = $1 AND key = $2"
            ),
            [endpoint.into(), key.0.as_str().into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("idempotency key vanished".into()))?;
    let stored: String = row.try_get("", "fingerprint")?;
    if stored != fingerprint {
        return Ok(Claim::Reused);
    }
    let status: i16 = row.try_get("", "status")?;
    Ok(Claim::Replay {
        status: u16::try_from(status).unwrap_or(500),
        body: row.try_get("", "body")?,
    })
}

/// Stores the response of a [`Claim::Fresh`] request, in the transaction of its effect.
pub async fn remember(
    conn: &impl ConnectionTrait,
    schema: &str,
    endpoint: &str,
    key: &IdempotencyKey,
    status: u16,
    body: serde_json::Value,
) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "UPDATE {schema}.idempotency_keys SET status = $3, body = $4 \
             WHERE endpoint = $1 AND key = $2"
        ),
        [
            endpoint.into(),
            key.0.as_str().into(),
            i16::try_from(status).unwrap_or(i16::MAX).into(),
            body.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Forgets keys older than [`RETENTION`]; returns how many.
pub async fn purge_expired(conn: &impl ConnectionTrait, schema: &str) -> Result<u64, DbErr> {
    let result = conn
        .execute_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "DELETE FROM {schema}.idempotency_keys \
                 WHERE created_at < clock_timestamp() - make_interval(secs => {})",
                RETENTION.as_secs()
            ),
        ))
        .await?;
    Ok(result.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_up_to_255() {
        assert!(IdempotencyKey::parse("0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", " ", "a b", "ключ", "tab\t", &"k".repeat(256)] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(IdempotencyKeyError),
                "{bad:?}"
            );
        }
    }
}
