//! The transactional outbox: messages are written in the same transaction as the business
//! change, and a relay publishes them to RabbitMQ, marking each sent only after the broker's
//! confirm. A crash between confirm and mark re-sends the message; inboxes make that harmless.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, FromQueryResult, Statement,
    TransactionTrait,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kernel::backoff::Delays;
use crate::messaging::amqp::{AmqpError, Broker, Opened, Purpose, connect_until_ready};
use crate::messaging::envelope::{Envelope, Message};
use crate::messaging::signing;
use crate::ops::telemetry;

/// Writes `message` to `<schema>.outbox` inside the caller's transaction, with the trace context
/// of the span the caller is in (when traces are exported), so the message continues its trace.
pub async fn enqueue<C: Message>(
    conn: &impl ConnectionTrait,
    schema: &str,
    message: &C,
    correlation_id: &str,
) -> Result<Uuid, DbErr> {
    let row = OutboxRow::new(message, correlation_id)?;
    let message_id = row.message_id;
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "INSERT INTO {schema}.outbox (message_id, message_type, correlation_id, body, traceparent) \
             VALUES ($1, $2, $3, $4, $5)"
        ),
        row.values(),
    ))
    .await?;
    Ok(message_id)
}

/// An outbox row, for a caller that writes it as part of a statement of its own (the INSERT
/// of [`OutboxRow::INSERT_COLUMNS`] with [`OutboxRow::values`] bound in that order).
pub struct OutboxRow {
    pub message_id: Uuid,
    message_type: &'static str,
    correlation_id: String,
    body: serde_json::Value,
    traceparent: Option<String>,
}

impl OutboxRow {
    pub const INSERT_COLUMNS: &'static str =
        "message_id, message_type, correlation_id, body, traceparent";

    pub fn new<C: Message>(message: &C, correlation_id: &str) -> Result<OutboxRow, DbErr> {
        let envelope = Envelope::new(message, correlation_id)
            .map_err(|e| DbErr::Custom(format!("cannot serialise {}: {e}", C::TYPE)))?;
        let body = serde_json::to_value(&envelope)
            .map_err(|e| DbErr::Custom(format!("cannot serialise envelope: {e}")))?;
        Ok(OutboxRow {
            message_id: envelope.message_id,
            message_type: C::TYPE,
            correlation_id: correlation_id.to_owned(),
            body,
            traceparent: telemetry::current_traceparent(),
        })
    }

    /// The five values of [`OutboxRow::INSERT_COLUMNS`], in order.
    pub fn values(self) -> [sea_orm::Value; 5] {
        [
            self.message_id.into(),
            self.message_type.into(),
            self.correlation_id.into(),
            self.body.into(),
            self.traceparent.into(),
        ]
    }
}

#[derive(Debug, FromQueryResult)]
struct PendingRow {
    seq: i64,
    message_id: Uuid,
    message_type: String,
    correlation_id: String,
    body: serde_json::Value,
    traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Db(#[from] DbErr),
    #[error("broker: {0}")]
    Amqp(#[from] AmqpError),
    #[error("the broker refused message {0} (nack or unroutable)")]
    Refused(Uuid),
}

#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Polling interval: the fallback for when a wake-up was missed (another instance wrote the row).
    pub poll_interval: Duration,
    pub batch_size: u32,
    /// How long the database part of a batch may take before it is dropped (with its
    /// connection): a vanished server holds nothing for long.
    pub db_timeout: Duration,
    /// The least a batch waits for its confirms before it is given up and sent again over a
    /// new connection. The wait doubles after each batch that ran out of it, follows four times
    /// the slowest confirm of the batches that made it, easing back by a tenth a round that
    /// sent something, never past the broker I/O timeout. A queue that lost its leader confirms
    /// nothing sent to it meanwhile, so this bounds how late an order's request goes out once a
    /// new leader is there; the rest keeps a slow but working broker from being sent copies.
    pub confirm_patience: Duration,
}

/// Publishes one schema's outbox. Several relays over the same table (in one process or many)
/// never publish the same row at the same time: each claims its batch with SKIP LOCKED.
#[derive(Clone)]
pub struct Relay {
    db: DatabaseConnection,
    schema: &'static str,
    broker: Broker,
    wake: Arc<Notify>,
    settings: RelaySettings,
}

impl Relay {
    pub fn new(
        db: DatabaseConnection,
        schema: &'static str,
        broker: Broker,
        wake: Arc<Notify>,
        settings: RelaySettings,
    ) -> Relay {
        Relay {
            db,
            schema,
            broker,
            wake,
            settings,
        }
    }

    /// Claims up to one batch of unsent rows and marks them sent in one statement, publishes
    /// them as persistent messages, waits for every confirm, and only then commits: the mark
    /// becomes true (and visible) only once the broker has confirmed every row. Returns how many
    /// rows it sent and how long their confirms took; on any error the transaction rolls back
    /// and the rows stay unsent.
    async fn relay_batch(
        &self,
        channel: &Channel,
        patience: Duration,
        lane: usize,
    ) -> Result<(usize, Duration), RelayError> {
        let schema = self.schema;
        let txn = self.db.begin().await?;
        // SKIP LOCKED: a row another relay has claimed is skipped, not waited for and not
        // sent twice at once. The lock lasts until this transaction ends.
        let mut rows = PendingRow::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "UPDATE {schema}.outbox SET sent_at = clock_timestamp() WHERE seq IN \
                 (SELECT seq FROM {schema}.outbox WHERE sent_at IS NULL ORDER BY seq LIMIT $1 \
                 FOR UPDATE SKIP LOCKED) \
                 RETURNING seq, message_id, message_type, correlation_id, body, traceparent"
            ),
            [i64::from(self.settings.batch_size).into()],
        ))
        .all(&txn)
        .await?;
        if rows.is_empty() {
            txn.commit().await?;
            return Ok((0, Duration::ZERO));
        }
        // In the order they were written (RETURNING keeps none).
        rows.sort_unstable_by_key(|row| row.seq);
        let publishing = std::time::Instant::now();
        self.publish_confirmed(channel, &rows, patience, lane)
            .await?;
        let took = publishing.elapsed();
        self.broker
            .metrics()
            .relay_published(schema, took.as_secs_f64());
        txn.commit().await?;
        self.broker.metrics().published(schema, rows.len());
        tracing::debug!(schema, sent = rows.len(), "outbox batch published");
        Ok((rows.len(), took))
    }

    /// Publishes every row to lane `lane` of its queue with its confirm in flight, then waits
    /// up to `patience` for all the confirms.
    async fn publish_confirmed(
        &self,
        channel: &Channel,
        rows: &[PendingRow],
        patience: Duration,
        lane: usize,
    ) -> Result<(), RelayError> {
        let mut confirms = Vec::with_capacity(rows.len());
        // A span per traced message, open until the broker confirms it.
        let mut spans = Vec::new();
        for row in rows {
            // The inbound exchange of the context that consumes this type.
            let exchange = self
                .broker
                .queue_for(&row.message_type)
                .map(|queue| self.broker.inbound_exchange(queue))
                .ok_or_else(|| AmqpError::Unroutable(row.message_type.clone()))?;
            let payload = serde_json::to_vec(&row.body)
                .map_err(|e| DbErr::Custom(format!("outbox body: {e}")))?;
            // This process not exporting: the writer's context is passed on unchanged.
            let traceparent = row.traceparent.as_deref().map(|traceparent| {
                if !telemetry::exporting() {
                    return traceparent.to_owned();
                }
                let span = publish_span(row, &exchange, traceparent);
                let own = telemetry::traceparent_of(&span);
                spans.push(span);
                own.unwrap_or_else(|| traceparent.to_owned())
            });
            let properties = self.properties(row, &payload, traceparent.as_deref());
            // mandatory: a message no queue would take comes back, and is not marked sent.
            let confirm = self
                .broker
                .timed(
                    channel.basic_publish(
                        exchange.as_str().into(),
                        self.broker
                            .lane_routing_key(&row.message_type, lane)
                            .as_str()
                            .into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &payload,
                        properties,
                    ),
                )
                .await?;
            confirms.push((row.message_id, confirm));
        }
        let confirmed = async {
            for (message_id, confirm) in confirms {
                let confirmation = confirm.await.map_err(AmqpError::from)?;
                if !confirmation.is_ack() || confirmation.take_message().is_some() {
                    return Err(RelayError::Refused(message_id));
                }
            }
            Ok(())
        };
        tokio::time::timeout(patience, confirmed)
            .await
            .map_err(|_| RelayError::Amqp(AmqpError::Timeout(patience)))?
    }

    /// Persistent, identified, correlated, signed, and traced when its writer was.
    fn properties(
        &self,
        row: &PendingRow,
        payload: &[u8],
        traceparent: Option<&str>,
    ) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(traceparent) = traceparent {
            headers.insert(
                telemetry::TRACEPARENT.into(),
                AMQPValue::LongString(traceparent.into()),
            );
        }
        headers.insert(
            "correlation_id".into(),
            AMQPValue::LongString(row.correlation_id.as_str().into()),
        );
        let key = self.broker.settings().keyring.current();
        headers.insert(
            signing::HEADER.into(),
            AMQPValue::LongString(key.sign(payload).into()),
        );
        headers.insert(
            signing::KEY_ID_HEADER.into(),
            AMQPValue::LongString(key.id().into()),
        );
        BasicProperties::default()
            .with_message_id(row.message_id.to_string().into())
            .with_type(row.message_type.as_str().into())
            .with_correlation_id(row.correlation_id.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers)
    }

    /// Runs until `shutdown`: connect (with backoff), then publish whenever woken or polled;
    /// on a broker error drop the connection and start over; on a database error back off.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = format!("{}-outbox-relay", self.schema);
        let mut db_delays = Delays::new();
        let most = self.broker.settings().io_timeout;
        let least = self.settings.confirm_patience.min(most);
        let mut patience = least;
        // The lane it sends on, kept while it confirms; the next after any broker error.
        let lanes = self.broker.lanes();
        let mut lane = 0;
        while let Some(Opened {
            connection,
            channel,
            node,
        }) = connect_until_ready(&self.broker, &name, Purpose::Publish, &shutdown).await
        {
            self.broker.links().up(&name, &node, &connection);
            let lost_broker = loop {
                // A connection lapin gave up on (no heartbeat from the node) is left at once,
                // not on the next publish.
                if !connection.status().connected() {
                    tracing::warn!(task = %name, %node, "outbox relay's broker connection is gone; reconnecting");
                    break true;
                }
                match self.drain(&channel, patience, lane).await {
                    Ok(slowest) => {
                        db_delays = Delays::new();
                        // Only rounds that sent something say how fast the broker confirms.
                        if let Some(slowest) = slowest {
                            patience = (slowest * 4).max(patience.mul_f64(0.9)).clamp(least, most);
                        }
                    }
                    Err(RelayError::Db(error)) => {
                        let pause = db_delays.next_delay();
                        tracing::warn!(task = %name, %error, retry_in = ?pause, "outbox relay cannot read the database");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => continue,
                            _ = shutdown.cancelled() => break false,
                        }
                    }
                    Err(error) => {
                        if matches!(error, RelayError::Amqp(AmqpError::Timeout(_))) {
                            patience = (patience * 2).min(most);
                        }
                        // Its lane's leader may be what is lost (a partitioned node): the
                        // batch goes again through the next lane, led by another node.
                        let from = lane;
                        lane = (lane + 1) % lanes;
                        tracing::warn!(task = %name, %error, from_lane = from + 1, to_lane = lane + 1, "outbox relay lost the broker; reconnecting");
                        break true;
                    }
                }
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = shutdown.cancelled() => break false,
                }
            };
            // Whatever state it is in, this connection is done with: close it (bounded), in
            // the background when it was lost, so the relay reconnects at once.
            if !lost_broker {
                let _ = self
                    .broker
                    .timed(connection.close(200, "relay done".into()))
                    .await;
                break;
            }
            self.broker
                .close_in_background(connection, "relay reconnecting");
            self.broker.move_on_from(&node);
        }
        tracing::info!(task = %name, "outbox relay stopped");
    }

    /// Sends batches until one is not full; how long the slowest one's confirms took, if any
    /// was sent.
    async fn drain(
        &self,
        channel: &Channel,
        patience: Duration,
        lane: usize,
    ) -> Result<Option<Duration>, RelayError> {
        // The batch's database work, plus its broker round trips (each bounded on its own).
        let limit = self.settings.db_timeout + self.broker.settings().io_timeout;
        let mut slowest = None;
        loop {
            let (sent, took) = match tokio::time::timeout(
                limit,
                self.relay_batch(channel, patience, lane),
            )
            .await
            {
                Ok(sent) => sent?,
                Err(_) => {
                    return Err(RelayError::Db(DbErr::Custom(format!(
                        "an outbox batch took longer than {limit:?}"
                    ))));
                }
            };
            if sent > 0 {
                slowest = slowest.max(Some(took));
            }
            if sent < self.settings.batch_size as usize {
                return Ok(slowest);
            }
        }
    }
}

/// The producer span of one message, a child of the span that wrote its outbox row.
fn publish_span(row: &PendingRow, exchange: &str, traceparent: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("{} publish", row.message_type),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = exchange,
        messaging.message.id = %row.message_id,
        correlation_id = %row.correlation_id,
    );
    telemetry::continue_trace(&span, Some(traceparent));
    span
}

#[derive(Clone, Debug)]
pub struct HousekeepingSettings {
    /// Sent rows older than this are deleted.
    pub retention: Duration,
    /// Inbox records older than this are deleted.
    pub inbox_retention: Duration,
    pub interval: Duration,
    /// A backlog larger than this, or older than `backlog_age_warning`, is logged as a warning.
    pub backlog_warning: i64,
    pub backlog_age_warning: Duration,
}

/// Keeps a context's outbox and inbox from growing without bound, and says so when the outbox
/// backlog grows.
pub struct Housekeeper {
    db: DatabaseConnection,
    schema: &'static str,
    settings: HousekeepingSettings,
}

/// The unsent part of an outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub unsent: i64,
    pub oldest_age_secs: f64,
}

impl Housekeeper {
    pub fn new(
        db: DatabaseConnection,
        schema: &'static str,
        settings: HousekeepingSettings,
    ) -> Housekeeper {
        Housekeeper {
            db,
            schema,
            settings,
        }
    }

    /// Deletes sent rows older than the retention, in batches. Returns how many went.
    pub async fn purge_sent(&self) -> Result<u64, DbErr> {
        let table = format!("{}.outbox", self.schema);
        let retention = self.settings.retention;
        crate::db::purge_older_than(&self.db, &table, "seq", "sent_at", retention).await
    }

    /// Deletes inbox records older than their retention, in batches. A message redelivered
    /// after that is still applied at most once: the per-order keys (the debit's
    /// `order_payments` row, an order's final status) make its effect a no-op.
    pub async fn purge_inbox(&self) -> Result<u64, DbErr> {
        let table = format!("{}.inbox", self.schema);
        let retention = self.settings.inbox_retention;
        crate::db::purge_older_than(
            &self.db,
            &table,
            "consumer, message_id",
            "received_at",
            retention,
        )
        .await
    }

    pub async fn backlog(&self) -> Result<Backlog, DbErr> {
        backlog(&self.db, self.schema).await
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let schema = self.schema;
        let mut warned_at: Option<i64> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.interval) => {}
                _ = shutdown.cancelled() => return,
            }
            match self.purge_sent().await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(schema, deleted, "purged sent outbox rows"),
                Err(error) => tracing::warn!(schema, %error, "cannot purge the outbox"),
            }
            match self.purge_inbox().await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(schema, deleted, "purged old inbox records"),
                Err(error) => tracing::warn!(schema, %error, "cannot purge the inbox"),
            }
            let backlog = match self.backlog().await {
                Ok(backlog) => backlog,
                Err(error) => {
                    tracing::warn!(schema, %error, "cannot measure the outbox backlog");
                    continue;
                }
            };
            let large = backlog.unsent > self.settings.backlog_warning
                || backlog.oldest_age_secs > self.settings.backlog_age_warning.as_secs_f64();
            match (large, warned_at) {
                // Warn when it first grows too large, then each time it doubles.
                (true, None) => {
                    tracing::warn!(
                        schema,
                        unsent = backlog.unsent,
                        oldest_age_secs = backlog.oldest_age_secs,
                        "outbox backlog is growing"
                    );
                    warned_at = Some(backlog.unsent.max(1));
                }
                (true, Some(last)) if backlog.unsent >= last * 2 => {
                    tracing::warn!(
                        schema,
                        unsent = backlog.unsent,
                        oldest_age_secs = backlog.oldest_age_secs,
                        "outbox backlog is still growing"
                    );
                    warned_at = Some(backlog.unsent);
                }
                (false, Some(_)) => {
                    tracing::info!(
                        schema,
                        unsent = backlog.unsent,
                        "outbox backlog back to normal"
                    );
                    warned_at = None;
                }
                _ => {}
            }
        }
    }
}

/// How many messages of `schema`'s outbox are unsent, and how old the oldest is.
pub async fn backlog(db: &impl ConnectionTrait, schema: &str) -> Result<Backlog, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT count(*) AS unsent, \
                 coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::FLOAT8 AS age \
                 FROM {schema}.outbox WHERE sent_at IS NULL"
            ),
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("no backlog row".into()))?;
    Ok(Backlog {
        unsent: row.try_get("", "unsent")?,
        oldest_age_secs: row.try_get("", "age")?,
    })
}
