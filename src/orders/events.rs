//! Live order status. The transaction that changes an order also NOTIFYs its id; every orders
//! instance LISTENs and fans the change out to its Server-Sent-Events subscribers, so a client
//! hears of a change whichever instance applied it.

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use futures_util::Stream;

use crate::kernel::backoff::Delays;
use crate::kernel::user_id::UserId;
use crate::orders::domain::{Order, OrderId};
use crate::orders::store;

const CHANNEL: &str = "gozon_order_changed";

/// Announces that order `id` changed, when (and only if) the caller's transaction commits.
pub async fn notify_changed(conn: &impl ConnectionTrait, id: OrderId) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [CHANNEL.into(), id.to_string().into()],
    ))
    .await?;
    Ok(())
}

/// The orders changed in this database, as this process hears of them.
#[derive(Clone)]
pub struct OrderEvents {
    sender: broadcast::Sender<Order>,
}

impl Default for OrderEvents {
    fn default() -> Self {
        // A subscriber that falls this far behind is dropped and reconnects (re-reading the list).
        let (sender, _) = broadcast::channel(1024);
        OrderEvents { sender }
    }
}

impl OrderEvents {
    /// The changes of `user`'s orders from now on, until `shutdown`. The stream ends when
    /// this reader has fallen behind (it missed changes): the client reconnects and re-reads.
    pub fn follow(
        &self,
        user: UserId,
        shutdown: CancellationToken,
    ) -> impl Stream<Item = Order> + Send + 'static {
        let state = (self.sender.subscribe(), user, shutdown);
        futures_util::stream::unfold(state, |(mut receiver, user, shutdown)| async move {
            loop {
                let next = tokio::select! {
                    next = receiver.recv() => next,
                    _ = shutdown.cancelled() => return None,
                };
                match next {
                    Ok(order) if order.user_id == user => {
                        return Some((order, (receiver, user, shutdown)));
                    }
                    Ok(_) => continue,
                    Err(
                        broadcast::error::RecvError::Lagged(_)
                        | broadcast::error::RecvError::Closed,
                    ) => {
                        return None;
                    }
                }
            }
        })
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
        loop {
            let notification = listener.recv().await.map_err(sqlx_error)?;
            if self.sender.receiver_count() == 0 {
                continue;
            }
            let Ok(id) = Uuid::parse_str(notification.payload()) else {
                continue;
            };
            if let Some(order) = store::find_order(db, OrderId::from_uuid(id)).await? {
                // Err only means nobody is subscribed any more.
                let _ = self.sender.send(order);
            }
        }
    }
}
