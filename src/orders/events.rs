//! Live order status. The transaction that changes an order also NOTIFYs its id and user; every
//! orders instance LISTENs and hands the change to that user's Server-Sent-Events subscribers
//! only, so a client hears of a change whichever instance applied it. Streams are bounded: so
//! many in all, so many per user, each for at most so long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::Stream;
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kernel::backoff::Delays;
use crate::kernel::duty::Duty;
use crate::kernel::user_id::UserId;
use crate::orders::domain::{Order, OrderId};
use crate::orders::store;

const CHANNEL: &str = "gozon_order_changed";
/// A subscriber that falls this far behind is dropped and reconnects (re-reading the list).
const BACKLOG: usize = 64;
/// How long the LISTEN connection may hear nothing before it is pinged, and how long the ping
/// may take.
const LISTEN_QUIET: Duration = Duration::from_secs(15);
const LISTEN_PING: Duration = Duration::from_secs(5);

/// Announces that `order` changed, when (and only if) the caller's transaction commits.
pub async fn notify_changed(conn: &impl ConnectionTrait, order: &Order) -> Result<(), DbErr> {
    let (channel, payload) = notification(&order.id, &order.user_id);
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    ))
    .await?;
    Ok(())
}

/// The channel and payload of the notice that an order changed, for a caller that sends it
/// from a statement of its own (`pg_notify($channel, $payload)`).
pub fn notification(id: &OrderId, user: &UserId) -> (&'static str, String) {
    (CHANNEL, format!("{id} {user}"))
}

/// How many streams may be open, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub total: usize,
    pub per_user: usize,
    pub lifetime: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            total: 10_000,
            per_user: 5,
            lifetime: Duration::from_secs(15 * 60),
        }
    }
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FollowError {
    #[error("this server has as many open event streams as it allows; try again later")]
    ServerFull,
    #[error("this user has as many open event streams as allowed; close one first")]
    UserFull,
}

/// The orders changed in this database, as this process hears of them, by user.
#[derive(Clone)]
pub struct OrderEvents {
    inner: Arc<Subscribers>,
}

struct Subscribers {
    limits: StreamLimits,
    /// Up while the LISTEN is in place: before it, changes would reach no stream.
    listening: Duty,
    by_user: Mutex<HashMap<UserId, broadcast::Sender<Order>>>,
}

impl Subscribers {
    fn lock(&self) -> MutexGuard<'_, HashMap<UserId, broadcast::Sender<Order>>> {
        self.by_user
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Removes a user's channel when its last subscriber goes (dropped after the receiver).
struct Unsubscribe {
    subscribers: Arc<Subscribers>,
    user: UserId,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut by_user = self.subscribers.lock();
        if by_user
            .get(&self.user)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            by_user.remove(&self.user);
        }
    }
}

/// One open stream: its receiver, then (dropped after it) its registration.
struct Subscription {
    receiver: broadcast::Receiver<Order>,
    _unsubscribe: Unsubscribe,
}

impl OrderEvents {
    pub fn new(limits: StreamLimits) -> OrderEvents {
        OrderEvents {
            inner: Arc::new(Subscribers {
                limits,
                listening: Duty::new("the order status listener"),
                by_user: Mutex::default(),
            }),
        }
    }

    /// Whether this instance is LISTENing, for readiness: a stream opened before it would miss
    /// the changes made meanwhile.
    pub fn duty(&self) -> Duty {
        self.inner.listening.clone()
    }

    /// The changes of `user`'s orders from now on, until `shutdown`, the stream's lifetime or
    /// `expires` (the credential's `exp`, seconds since the epoch) ends, or this reader falls
    /// behind (it missed changes): then the client reconnects and re-reads. Refused when the
    /// server or the user has as many streams as allowed.
    pub fn follow(
        &self,
        user: UserId,
        expires: Option<u64>,
        shutdown: CancellationToken,
    ) -> Result<impl Stream<Item = Order> + Send + 'static, FollowError> {
        let limits = self.inner.limits;
        let receiver = {
            let mut by_user = self.inner.lock();
            let open: usize = by_user
                .values()
                .map(broadcast::Sender::receiver_count)
                .sum();
            if open >= limits.total {
                return Err(FollowError::ServerFull);
            }
            let sender = by_user
                .entry(user.clone())
                .or_insert_with(|| broadcast::channel(BACKLOG).0);
            if sender.receiver_count() >= limits.per_user {
                return Err(FollowError::UserFull);
            }
            sender.subscribe()
        };
        let subscription = Subscription {
            receiver,
            _unsubscribe: Unsubscribe {
                subscribers: self.inner.clone(),
                user,
            },
        };
        let lifetime = expires.map_or(limits.lifetime, |expires| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let left = Duration::from_secs(expires).saturating_sub(now);
            left.min(limits.lifetime)
        });
        let ends = Box::pin(tokio::time::sleep(lifetime));
        let state = (subscription, shutdown, ends);
        Ok(futures_util::stream::unfold(
            state,
            |(mut subscription, shutdown, mut ends)| async move {
                let next = tokio::select! {
                    next = subscription.receiver.recv() => next,
                    _ = shutdown.cancelled() => return None,
                    _ = &mut ends => return None,
                };
                // Lagged or closed: end the stream so the client re-reads.
                let order = next.ok()?;
                Some((order, (subscription, shutdown, ends)))
            },
        ))
    }

    /// LISTENs until `shutdown`, reconnecting after a lost connection. Changes made while the
    /// connection was down are not replayed: clients re-read the list when their stream restarts.
    pub async fn run(self, db: DatabaseConnection, shutdown: CancellationToken) {
        let mut delays = Delays::new();
        loop {
            let result = tokio::select! {
                result = self.listen(&db) => result,
                _ = shutdown.cancelled() => break,
            };
            self.inner.listening.set(false);
            let pause = delays.next_delay();
            if let Err(error) = result {
                tracing::warn!(%error, retry_in = ?pause, "order status listener lost the database");
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }

    async fn listen(&self, db: &DatabaseConnection) -> Result<(), DbErr> {
        let sqlx_error = |e: sea_orm::sqlx::Error| DbErr::Custom(e.to_string());
        let mut listener = PgListener::connect_with(db.get_postgres_connection_pool())
            .await
            .map_err(sqlx_error)?;
        listener.listen(CHANNEL).await.map_err(sqlx_error)?;
        self.inner.listening.set(true);
        loop {
            // A quiet channel is asked to prove it is alive now and then: a server that vanished
            // without a word (a partition, a failover) is noticed, and the listener reconnects.
            let notification = match tokio::time::timeout(LISTEN_QUIET, listener.recv()).await {
                Ok(received) => received.map_err(sqlx_error)?,
                Err(_) => {
                    let ping = sea_orm::sqlx::query("SELECT 1").execute(&mut listener);
                    match tokio::time::timeout(LISTEN_PING, ping).await {
                        Ok(pinged) => pinged.map_err(sqlx_error)?,
                        Err(_) => {
                            return Err(DbErr::Custom(
                                "the order status listener's connection went silent".into(),
                            ));
                        }
                    };
                    continue;
                }
            };
            let mut words = notification.payload().split(' ');
            let Some(Ok(id)) = words.next().map(Uuid::parse_str) else {
                continue;
            };
            // Nobody here follows this user: no need to read the order.
            let user = words.next().and_then(|user| UserId::parse(user).ok());
            if user.is_some_and(|user| !self.inner.lock().contains_key(&user)) {
                continue;
            }
            if let Some(order) = store::find_order(db, OrderId::from_uuid(id)).await? {
                let sender = self.inner.lock().get(&order.user_id).cloned();
                // Err only means nobody is subscribed any more.
                if let Some(sender) = sender {
                    let _ = sender.send(order);
                }
            }
        }
    }
}
