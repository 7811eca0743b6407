//! `Idempotency-Key` on POST requests: a retried request gets the first response again and has
//! no second effect. Each context keeps its keys in its own schema (`<schema>.idempotency_keys`),
//! written in the same transaction as the effect, remembers them for [`RETENTION`] and purges
//! them itself ([`purge_expired_until`]).

use std::time::Duration;

use poem::http::StatusCode;
use poem_openapi::types::{ParseFromJSON, ToJSON};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement,
    TransactionTrait,
};
use tokio_util::sync::CancellationToken;

use crate::kernel::periodic::every;
use crate::web::auth::Caller;
use crate::web::error::ApiError;
use crate::web::params::invalid;

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

/// The header's name, as requests carry it.
pub const HEADER: &str = "idempotency-key";

/// A POST whose `Idempotency-Key` cannot be read as one key: bytes outside visible ASCII (which
/// the parameter extractor would skip, so the request would be applied without its key), or
/// the header given twice. Refused before any handler runs, so nothing changes.
pub fn unreadable_key(request: &poem::Request) -> Option<ApiError> {
    if request.method() != poem::http::Method::POST {
        return None;
    }
    let mut values = request.headers().get_all(HEADER).iter();
    let first = values.next()?;
    let readable = values.next().is_none()
        && first
            .to_str()
            .is_ok_and(|text| IdempotencyKey::parse(text).is_ok());
    (!readable).then(|| invalid("invalid_idempotency_key", IdempotencyKeyError))
}

/// Parses the optional `Idempotency-Key` header.
fn parse_idempotency_key(header: Option<&str>) -> Result<Option<IdempotencyKey>, ApiError> {
    header
        .map(IdempotencyKey::parse)
        .transpose()
        .map_err(|error| invalid("invalid_idempotency_key", error))
}

/// What to do with a request that carries a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// First time: apply it, then [`remember`] the response in the same transaction.
    Fresh,
    /// Seen before with the same parameters: answer this body, do nothing else.
    Replay(serde_json::Value),
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
                "SELECT fingerprint, body FROM {schema}.idempotency_keys \
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
    Ok(Claim::Replay(row.try_get("", "body")?))
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

/// Forgets keys older than [`RETENTION`], in batches; returns how many went.
pub async fn purge_expired(conn: &impl ConnectionTrait, schema: &str) -> Result<u64, DbErr> {
    let table = format!("{schema}.idempotency_keys");
    crate::db::purge_older_than(conn, &table, "endpoint, key", "created_at", RETENTION).await
}

/// Purges `schema`'s expired keys every `interval` until `shutdown`.
pub async fn purge_expired_until(
    db: DatabaseConnection,
    schema: &'static str,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let db = &db;
    every(interval, shutdown, move || async move {
        match purge_expired(db, schema).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(schema, deleted, "purged expired idempotency keys"),
            Err(error) => tracing::warn!(schema, %error, "cannot purge expired idempotency keys"),
        }
    })
    .await
}

/// A POST endpoint that honours `Idempotency-Key`: where its keys live and what it answers.
#[derive(Clone, Copy, Debug)]
pub struct IdempotentPost {
    /// The schema of the context that owns the endpoint.
    pub schema: &'static str,
    pub endpoint: &'static str,
    /// The success status, stored with the response.
    pub status: StatusCode,
}

impl IdempotentPost {
    /// One request, exactly once per key (and per user, when the caller has a token): parses the `Idempotency-Key` header (400 if it is
    /// malformed), then in one transaction claims the key (when there is one), runs `effect`, stores its response and commits. A retry with the same key and
    /// `fingerprint` (the request's parameters) gets the stored response and runs nothing; with
    /// other parameters it is refused (422). A failed effect rolls back and leaves the key free.
    pub async fn run<T, F>(
        self,
        db: &DatabaseConnection,
        caller: &Caller,
        key_header: Option<&str>,
        fingerprint: &str,
        effect: F,
    ) -> Result<T, ApiError>
    where
        T: ParseFromJSON + ToJSON,
        F: AsyncFnOnce(&DatabaseTransaction) -> Result<T, ApiError>,
    {
        let schema = self.schema;
        // With tokens, keys are per user: one user's key never replays or blocks another's.
        let scoped;
        let endpoint = match caller.principal() {
            Some(principal) => {
                scoped = format!("{}@{}", self.endpoint, principal.user);
                scoped.as_str()
            }
            None => self.endpoint,
        };
        let key = parse_idempotency_key(key_header)?;
        let txn = db.begin().await?;
        if let Some(key) = &key {
            match claim(&txn, schema, endpoint, key, fingerprint).await? {
                Claim::Fresh => {}
                Claim::Replay(body) => return replayed(endpoint, body),
                Claim::Reused => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was already used for a request with other parameters",
                    ));
                }
            }
        }
        let response = effect(&txn).await?;
        if let Some(key) = &key {
            let json = response.to_json().unwrap_or(serde_json::Value::Null);
            remember(&txn, schema, endpoint, key, self.status.as_u16(), json).await?;
        }
        txn.commit().await?;
        Ok(response)
    }
}

fn replayed<T: ParseFromJSON>(endpoint: &str, body: serde_json::Value) -> Result<T, ApiError> {
    T::parse_from_json(Some(body)).map_err(|error| {
        tracing::error!(endpoint, error = %error.into_message(), "stored idempotent response unreadable");
        ApiError::internal()
    })
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
