//! The idempotent consumer both contexts use. Per delivery: check its signature, decode it into
//! the handler's typed message, then in one transaction record its id in the context's inbox and
//! let the handler apply it; commit, and only then ack. A handler says only what a message does.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::OptionFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::kernel::backoff::Delays;
use crate::messaging::amqp::{
    AmqpError, Broker, Opened, Purpose, QueueSpec, connect_until_ready, link_name,
};
use crate::messaging::envelope::Envelope;
use crate::messaging::inbox;
use crate::messaging::signing;
use crate::ops::telemetry;

/// Why a message was not applied.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The message can never be applied (unknown type, bad payload, unknown order):
    /// it goes to the dead-letter queue at once.
    #[error("poison message: {0}")]
    Poison(String),
    /// Applying it failed for a reason that may pass: it is requeued, and dead-lettered by
    /// the broker once its delivery limit is reached.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The database cannot be reached: not the message's fault, so it is not counted against
    /// its delivery limit. The consumer keeps it and tries again with backoff.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl HandleError {
    pub fn poison(reason: impl std::fmt::Display) -> HandleError {
        HandleError::Poison(reason.to_string())
    }
}

impl From<sea_orm::DbErr> for HandleError {
    fn from(error: sea_orm::DbErr) -> Self {
        if crate::db::is_unavailable(&error) {
            HandleError::Unavailable(error.to_string())
        } else {
            HandleError::Transient(error.to_string())
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Applied,
    /// Its id was already in the inbox: nothing done again.
    Duplicate,
}

/// A decoded message and what came with it.
#[derive(Debug)]
pub struct Incoming<M> {
    pub message: M,
    pub message_id: Uuid,
    pub correlation_id: String,
}

/// What a context does with the messages of one queue.
pub trait Handler: Send + Sync + 'static {
    /// The messages this handler understands, decoded (cloned for each attempt).
    type Message: Clone + Send + Sync;
    /// What `apply` hands to `committed`.
    type Applied: Send;

    /// The envelope's payload as one of this handler's messages; a type or payload it cannot
    /// read is [`HandleError::Poison`].
    fn decode(&self, envelope: &Envelope) -> Result<Self::Message, HandleError>;

    /// Applies `incoming` inside `txn`, which already holds its inbox record. An error rolls
    /// back both.
    fn apply(
        &self,
        txn: &DatabaseTransaction,
        incoming: Incoming<Self::Message>,
    ) -> impl Future<Output = Result<Self::Applied, HandleError>> + Send;

    /// The common case of a message, in one statement: alone, with its inbox record (`inbox`,
    /// written with [`inbox::recorded_cte`] only when the statement has an effect) and no
    /// transaction around it, one round trip and one commit instead of four or more; in a
    /// batch, inside the batch's transaction (`db`), without it (the batch recorded it), one
    /// round trip instead of two or three. `Ok(Some(_))`: applied. `Ok(None)`: nothing
    /// written (not the common case). An error (a duplicate's inbox record among them) has
    /// written nothing either. Unless applied, the consumer goes on with [`Handler::apply`],
    /// which tells duplicates, refusals and poison apart. By default no message has a common
    /// case.
    fn apply_alone<C: ConnectionTrait + Sync>(
        &self,
        db: &C,
        inbox: Option<inbox::Record<'_>>,
        incoming: &Incoming<Self::Message>,
    ) -> impl Future<Output = Result<Option<Self::Applied>, sea_orm::DbErr>> + Send {
        let _ = (db, inbox, incoming);
        async { Ok(None) }
    }

    /// Runs once the transaction of `apply` has committed (wake a relay, count, log).
    fn committed(&self, applied: Self::Applied) {
        let _ = applied;
    }

    /// Locks, inside `txn`, the rows the messages' effects contend for ([`Handler::lock_key`]:
    /// an account, an order), in one order; the consumer calls it first in every transaction,
    /// before any inbox record. The one-statement path ([`Handler::apply_alone`]) takes that
    /// row first too, so a transaction and a copy of one of its messages applied alone wait
    /// for each other on it instead of deadlocking (inbox record here, row there).
    fn lock(
        &self,
        txn: &DatabaseTransaction,
        messages: &[&Self::Message],
    ) -> impl Future<Output = Result<(), sea_orm::DbErr>> + Send {
        let _ = (txn, messages);
        async { Ok(()) }
    }

    /// The row a message's effect contends for with other messages' (an account, an order):
    /// a batch applies its messages in this order, so two batches that share rows take their
    /// locks in the same order and do not deadlock.
    fn lock_key(&self, message: &Self::Message) -> String {
        let _ = message;
        String::new()
    }
}

/// How often a consumer asks the broker how deep its queue and dead-letter queue are.
const QUEUE_MEASURE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// Connections each lane of the queue is read over, each starting at another broker node.
    pub links: usize,
    /// Per link of a lane.
    pub prefetch: u16,
    /// Deliveries handled at once, per link of a lane.
    pub concurrency: usize,
    /// Most deliveries applied in one transaction: those already received when a handler is
    /// free, so a batch forms only while deliveries wait (none waits to fill one).
    pub batch: usize,
    /// How long one delivery's transaction may take before it is dropped (with its
    /// connection) and the database counted as unavailable.
    pub db_timeout: Duration,
    /// How long a delivery is held (retried) while the database cannot be reached, before the
    /// consumer hands every delivery it holds back to the queue (for another instance, or for
    /// itself once the database answers) and stops taking more until it does.
    pub hold: Duration,
}

/// How often a consumer link away from its home node looks whether that answers again.
const HOME_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often a consuming link looks whether lapin still counts its connection and channel
/// connected, besides waiting for the consumer stream to end (as the relay looks before each
/// round): a link whose connection is gone moves on within this, whatever its stream does.
const LINK_WATCH_EVERY: Duration = Duration::from_secs(1);

/// How a consumer link's consuming ended, other than by losing the broker or the database.
enum Ended {
    Shutdown,
    /// Its home node answers again: the link goes on over this channel to it, ready.
    Home(Box<Opened>),
}

/// What one of the consumer streams handed over: a delivery, or why there is none (`None`:
/// a stream ended, its consumer cancelled).
fn received(next: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, AmqpError> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(error)) => Err(error.into()),
        None => Err(AmqpError::ConsumerCancelled),
    }
}

/// A text header of `delivery`.
fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a str> {
    let value = delivery.properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
        _ => None,
    }
}

fn lock(delays: &std::sync::Mutex<Delays>) -> std::sync::MutexGuard<'_, Delays> {
    delays
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One queue's consumer: its deliveries applied by `handler`, deduplicated through the inbox
/// of `schema` under the queue's name.
/// One link of one lane of it: `link` counts from 0 to `settings.links`, `lane` from 0 to the
/// broker's lanes; its broker starts at its own node ([`Broker::for_lane`]).
pub struct Consumer<H> {
    pub broker: Broker,
    pub queue: QueueSpec,
    pub db: DatabaseConnection,
    pub schema: &'static str,
    pub handler: Arc<H>,
    pub settings: ConsumerSettings,
    pub link: usize,
    pub lane: usize,
}

impl<H: Handler> Consumer<H> {
    /// Consumes until `shutdown`, reconnecting with backoff whenever the broker goes away, and
    /// moving back to its home node once that answers again after a failover moved it.
    pub async fn run(self, shutdown: CancellationToken) {
        let queue_name = self.broker.lane_name(&self.queue, self.lane);
        let task = link_name(
            &format!("consumer {}", self.broker.queue_name(&self.queue)),
            (self.lane, self.broker.lanes()),
            (self.link, self.settings.links),
        );
        let purpose = Purpose::Consume { lane: self.lane };
        let mut going_home = None;
        loop {
            let opened = match going_home.take() {
                Some(opened) => Some(opened),
                None => connect_until_ready(&self.broker, &task, purpose, &shutdown).await,
            };
            let Some(Opened {
                connection,
                channel,
                node,
            }) = opened
            else {
                break;
            };
            // One link measures the queue (every lane) for all of them.
            let measuring = if self.link == 0 && self.lane == 0 {
                self.measure_queue(&connection).await
            } else {
                None
            };
            // Lanes a deployment with more left behind are read with the first.
            let retired = if self.lane == 0 && self.link == 0 {
                self.broker.retired_lanes(&connection, &self.queue).await
            } else {
                Vec::new()
            };
            let link = (&connection, node.as_str());
            let result = self
                .consume(&channel, link, (&queue_name, &retired), &task, &shutdown)
                .await;
            if let Some(measuring) = measuring {
                measuring.abort();
            }
            match result {
                Ok(Ended::Shutdown) => {
                    let reason = "shutting down";
                    let _ = self.broker.timed(channel.close(200, reason.into())).await;
                    let _ = self
                        .broker
                        .timed(connection.close(200, reason.into()))
                        .await;
                    break;
                }
                Ok(Ended::Home(home)) => {
                    // What the old channel still held unacked goes back to the queue as it
                    // closes; the new link is consuming before the old one is gone.
                    tracing::info!(task = %task, from = %node, to = %home.node, "consumer link back on its home node");
                    // Up over the new link at once: readiness does not see it down between.
                    self.broker.links().up(&task, &home.node, &home.connection);
                    drop(channel);
                    self.broker
                        .close_in_background(connection, "consumer going home");
                    going_home = Some(*home);
                    continue;
                }
                Err(_) => {}
            }
            let database_down = matches!(result, Err(AmqpError::DatabaseUnavailable));
            if let Err(error) = &result
                && !database_down
            {
                tracing::warn!(task = %task, %error, "consumer lost the broker; reconnecting");
            }
            // Unacked deliveries go back to the queue when the channel closes. A lost
            // connection is closed in the background, so the consumer reconnects at once.
            drop(channel);
            self.broker
                .close_in_background(connection, "consumer reconnecting");
            if database_down {
                // Its deliveries went back with the channel: wait for the database before
                // taking any again.
                self.broker.links().down(&task);
                if !self.wait_for_database(&shutdown).await {
                    break;
                }
                continue;
            }
            self.broker.move_on_from(&node);
        }
        tracing::info!(task = %task, "consumer stopped");
    }

    /// Waits until the database answers again (false: shutdown came first).
    async fn wait_for_database(&self, shutdown: &CancellationToken) -> bool {
        tracing::warn!(
            queue = self.queue.suffix,
            "database unavailable: deliveries handed back to the queue; consuming again once it answers"
        );
        let mut delays = Delays::new();
        loop {
            let ping = tokio::time::timeout(self.settings.db_timeout, self.db.ping()).await;
            if matches!(ping, Ok(Ok(()))) {
                tracing::info!(queue = self.queue.suffix, "database back; consuming again");
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(delays.next_delay()) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// Reports the queue's depth and its dead letters to the metrics every
    /// [`QUEUE_MEASURE_INTERVAL`], on a channel of its own: a slow or failed measure never holds
    /// up deliveries or closes the consuming channel. It stops at the first failure, until the
    /// consumer reconnects.
    async fn measure_queue(
        &self,
        connection: &lapin::Connection,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let channel = match self.broker.timed(connection.create_channel()).await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::debug!(%error, "cannot open a channel to measure the queue");
                return None;
            }
        };
        let (broker, queue) = (self.broker.clone(), self.queue);
        Some(tokio::spawn(async move {
            // With several lanes, first after one interval: the other lanes' consumers (of any
            // instance) have declared theirs by then, on a new deployment too.
            let first = if broker.lanes() > 1 {
                QUEUE_MEASURE_INTERVAL
            } else {
                Duration::ZERO
            };
            let start = tokio::time::Instant::now() + first;
            let mut every = tokio::time::interval_at(start, QUEUE_MEASURE_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(error) = broker.measure_depths(&channel, &queue).await {
                    tracing::debug!(%error, queue = queue.suffix, "cannot measure the queue");
                    break;
                }
            }
            let _ = broker
                .timed(channel.close(200, "done measuring".into()))
                .await;
        }))
    }

    async fn consume(
        &self,
        channel: &lapin::Channel,
        (connection, node): (&lapin::Connection, &str),
        (queue_name, retired): (&str, &[String]),
        task: &str,
        shutdown: &CancellationToken,
    ) -> Result<Ended, AmqpError> {
        let broker = &self.broker;
        broker
            .timed(channel.basic_qos(self.settings.prefetch, BasicQosOptions::default()))
            .await?;
        // With lanes, a lane's first link (on the node that leads it) goes before its spare (on
        // the next node): the leader hands the spare only what the first links have no room
        // for, so the spare's node cut off holds nothing back, while the spare still reads the
        // lane whenever the first links are gone.
        let mut arguments = FieldTable::default();
        if broker.lanes() > 1 && self.link == 0 {
            arguments.insert("x-priority".into(), AMQPValue::LongInt(1));
        }
        let mut streams = Vec::new();
        for name in std::iter::once(queue_name).chain(retired.iter().map(String::as_str)) {
            let consumer = broker
                .timed(channel.basic_consume(
                    name.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    arguments.clone(),
                ))
                .await?;
            // Each stream ends with a `None` of its own: `select_all` drops a stream that ends
            // without a word, and a server that cancels only one of the link's consumers (the
            // lane's queue deleted, say) would leave the link reading the others for good.
            streams.push(consumer.map(Some).chain(futures_util::stream::once(
                futures_util::future::ready(None),
            )));
        }
        let mut deliveries = futures_util::stream::select_all(streams);
        broker.links().up(task, node, connection);
        tracing::debug!(task, node, "consuming");
        // A link a failover moved off its home node looks every [`HOME_CHECK_EVERY`] whether
        // the home node answers, and once it does moves back there: else links pile up, fault
        // after fault, on the nodes that stayed, and one node lost takes every link of a lane.
        let home = broker.away_from_home(node);
        let mut home_checks = tokio::time::interval_at(
            tokio::time::Instant::now() + HOME_CHECK_EVERY,
            HOME_CHECK_EVERY,
        );
        home_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reaching_home = None;
        let mut watch = tokio::time::interval_at(
            tokio::time::Instant::now() + LINK_WATCH_EVERY,
            LINK_WATCH_EVERY,
        );
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Up to `concurrency` batches are handled at once, each in its own transaction and its
        // deliveries acked after its commit; a batch is the first delivery and those already
        // received behind it. The inbox and the per-order keys keep any interleaving safe.
        // They run on this task, not spawned: nothing outlives the channel.
        let requeue_delays = std::sync::Mutex::new(Delays::new());
        let mut in_flight = FuturesUnordered::new();
        loop {
            let room = in_flight.len() < self.settings.concurrency.max(1);
            tokio::select! {
                done = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(Err(error)) = done {
                        return Err(error);
                    }
                }
                next = deliveries.next(), if room => {
                    let mut batch = vec![received(next.flatten())?];
                    while batch.len() < self.settings.batch {
                        match deliveries.next().now_or_never() {
                            Some(next) => batch.push(received(next.flatten())?),
                            None => break,
                        }
                    }
                    tracing::debug!(
                        task,
                        node,
                        deliveries = batch.len(),
                        redelivered = batch.iter().filter(|d| d.redelivered).count(),
                        "deliveries received"
                    );
                    in_flight.push(self.process_batch(batch, queue_name, &requeue_delays, shutdown));
                }
                _ = watch.tick() => {
                    if !connection.status().connected() || !channel.status().connected() {
                        tracing::warn!(task, node, "consumer's broker connection or channel is gone; reconnecting");
                        return Err(AmqpError::LinkClosed);
                    }
                }
                _ = home_checks.tick(), if home.is_some() && reaching_home.is_none() => {
                    if let Some(index) = home {
                        let purpose = Purpose::Consume { lane: self.lane };
                        reaching_home = Some(Box::pin(broker.open_channel_at(task, index, purpose)));
                    }
                }
                Some(reached) = OptionFuture::from(reaching_home.as_mut()) => {
                    reaching_home = None;
                    match reached {
                        Ok(opened) => {
                            // Finish what is in hand here, then take deliveries there.
                            while let Some(done) = in_flight.next().await {
                                if let Err(error) = done {
                                    broker.close_in_background(opened.connection, "consumer lost the broker");
                                    return Err(error);
                                }
                            }
                            if shutdown.is_cancelled() {
                                // Shutdown came while it finished: it goes nowhere.
                                broker.close_in_background(opened.connection, "shutting down");
                                return Ok(Ended::Shutdown);
                            }
                            return Ok(Ended::Home(Box::new(opened)));
                        }
                        Err(error) => {
                            // The next look a whole interval after this one ended, however
                            // long this one took (a node that answers nothing).
                            home_checks.reset();
                            tracing::debug!(task, %error, "the home node does not answer yet");
                        }
                    }
                }
                _ = shutdown.cancelled() => {
                    // Let what is in hand finish (a held message gives up on shutdown).
                    while let Some(done) = in_flight.next().await {
                        done?;
                    }
                    return Ok(Ended::Shutdown);
                }
            }
        }
    }

    /// Applies `batch` in one transaction and acks each delivery after its commit. A delivery
    /// that cannot be opened, or that is poison inside the batch, is handled alone and the
    /// batch tried again without it, so one bad message never holds up the others; a batch
    /// that fails otherwise (a conflict, the database) is handled one delivery at a time, as
    /// if it had never been a batch. Each is settled on its own outcome.
    async fn process_batch(
        &self,
        batch: Vec<Delivery>,
        queue_name: &str,
        requeue_delays: &std::sync::Mutex<Delays>,
        shutdown: &CancellationToken,
    ) -> Result<(), AmqpError> {
        // The database hold counts from the first attempt, the batch's.
        let held_until = std::time::Instant::now() + self.settings.hold;
        let mut alone = Vec::new();
        let mut opened = Vec::with_capacity(batch.len());
        if batch.len() == 1 {
            alone = batch;
        } else {
            for delivery in batch {
                match self.open(&delivery) {
                    Ok((envelope, message)) => opened.push((delivery, envelope, message)),
                    Err(_) => alone.push(delivery),
                }
            }
        }
        let metrics = self.broker.metrics();
        while opened.len() > 1 {
            // No longer than the hold: a database that does not answer is noticed as soon as
            // with single deliveries.
            let limit = self.settings.hold.min(self.settings.db_timeout);
            let outcome = match tokio::time::timeout(limit, self.apply_batch(&mut opened)).await {
                Ok(outcome) => outcome,
                Err(_) => Err((
                    None,
                    HandleError::Unavailable(format!(
                        "the database did not answer within {limit:?}"
                    )),
                )),
            };
            match outcome {
                Ok(handled) => {
                    metrics.consumer_batch(queue_name, opened.len(), "committed");
                    *lock(requeue_delays) = Delays::new();
                    // The acks go out together: the connection's I/O thread sends them in
                    // one write and wakes this task once, not once per delivery.
                    let acks = opened
                        .iter()
                        .zip(handled)
                        .map(|((delivery, _, _), handled)| {
                            self.settle(delivery, Ok(handled), queue_name, Duration::ZERO, shutdown)
                        });
                    for acked in futures_util::future::join_all(acks).await {
                        acked?;
                    }
                    opened.clear();
                }
                Err((Some(failed), error @ HandleError::Poison(_))) => {
                    metrics.consumer_batch(queue_name, opened.len(), "retried");
                    tracing::info!(queue = queue_name, messages = opened.len(), %error, "a poison message in a batch; the batch goes on without it");
                    alone.push(opened.remove(failed).0);
                }
                Err((_, error)) => {
                    metrics.consumer_batch(queue_name, opened.len(), "split");
                    tracing::info!(queue = queue_name, messages = opened.len(), %error, "a batch failed; applying its messages one by one");
                    let unavailable = matches!(error, HandleError::Unavailable(_));
                    if unavailable
                        && std::time::Instant::now() >= held_until
                        && !shutdown.is_cancelled()
                    {
                        // Held as long as allowed: the channel goes, and every delivery with it.
                        return Err(AmqpError::DatabaseUnavailable);
                    }
                    break;
                }
            }
        }
        alone.extend(opened.into_iter().map(|(delivery, _, _)| delivery));
        // Each on its own, at once (as unbatched deliveries are): one that is held or paused
        // before its requeue does not hold up the others.
        let singles = alone.into_iter().map(|delivery| {
            self.process(delivery, queue_name, requeue_delays, held_until, shutdown)
        });
        for settled in futures_util::future::join_all(singles).await {
            settled?;
        }
        Ok(())
    }

    /// One attempt at a batch, in one transaction: first the rows its messages contend for
    /// ([`Handler::lock`]), then every message's inbox record, in the order of their ids, then
    /// the effects of those seen for the first time, in the order of the rows they lock
    /// ([`Handler::lock_key`], then id). So batches, and a batch and a copy of one of its
    /// messages (in a batch, a transaction or one statement), take their locks in one order
    /// and do not deadlock. An error names the message it came from, when it came from one.
    async fn apply_batch(
        &self,
        opened: &mut [(Delivery, Envelope, H::Message)],
    ) -> Result<Vec<Handled>, (Option<usize>, HandleError)> {
        let whole = |error: sea_orm::DbErr| (None, HandleError::from(error));
        let txn = self.db.begin().await.map_err(whole)?;
        let messages: Vec<&H::Message> = opened.iter().map(|(_, _, message)| message).collect();
        self.handler.lock(&txn, &messages).await.map_err(whole)?;
        opened.sort_by_key(|(_, envelope, _)| envelope.message_id);
        // Every inbox record in one statement; a copy listed twice counts once, as its first.
        let ids: Vec<Uuid> = opened
            .iter()
            .map(|(_, envelope, _)| envelope.message_id)
            .collect();
        let mut recorded =
            inbox::record_first_deliveries(&txn, self.schema, self.queue.suffix, &ids)
                .await
                .map_err(whole)?;
        let first: Vec<bool> = ids
            .iter()
            .map(|id| match recorded.iter().position(|r| r == id) {
                Some(at) => {
                    recorded.swap_remove(at);
                    true
                }
                None => false,
            })
            .collect();
        let mut order: Vec<usize> = (0..opened.len()).filter(|&i| first[i]).collect();
        order.sort_by_cached_key(|&i| {
            let (_, envelope, message) = &opened[i];
            (self.handler.lock_key(message), envelope.message_id)
        });
        let mut applied = Vec::with_capacity(order.len());
        let mut in_one_statement = 0;
        for index in order {
            let (delivery, envelope, message) = &opened[index];
            let incoming = Incoming {
                message: message.clone(),
                message_id: envelope.message_id,
                correlation_id: envelope.correlation_id.clone(),
            };
            let span = self.message_span(delivery, envelope);
            // Its common case in one statement, else the handler's whole path.
            let alone = self
                .handler
                .apply_alone(&txn, None, &incoming)
                .instrument(span.clone())
                .await
                .map_err(|error| (Some(index), HandleError::from(error)))?;
            let result = match alone {
                Some(result) => {
                    in_one_statement += 1;
                    result
                }
                None => self
                    .handler
                    .apply(&txn, incoming)
                    .instrument(span)
                    .await
                    .map_err(|error| (Some(index), error))?,
            };
            applied.push(result);
        }
        // On error the transaction is dropped: every record of the batch rolls back.
        txn.commit().await.map_err(whole)?;
        let metrics = self.broker.metrics();
        for _ in 0..in_one_statement {
            metrics.consumer_one_statement(self.queue.suffix, "applied_in_batch");
        }
        for result in applied {
            self.handler.committed(result);
        }
        Ok(first
            .into_iter()
            .map(|first| {
                if first {
                    Handled::Applied
                } else {
                    tracing::info!("duplicate message ignored");
                    Handled::Duplicate
                }
            })
            .collect())
    }

    /// Handles one delivery and acks, dead-letters or requeues it.
    async fn process(
        &self,
        delivery: Delivery,
        queue_name: &str,
        requeue_delays: &std::sync::Mutex<Delays>,
        held_until: std::time::Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), AmqpError> {
        let outcome = self
            .handle_holding_through_outages(&delivery, held_until, shutdown)
            .await;
        if matches!(outcome, Err(HandleError::Unavailable(_))) && !shutdown.is_cancelled() {
            // Held as long as allowed: the channel goes, and every delivery with it.
            return Err(AmqpError::DatabaseUnavailable);
        }
        let pause = match &outcome {
            Ok(_) | Err(HandleError::Poison(_)) => {
                if outcome.is_ok() {
                    *lock(requeue_delays) = Delays::new();
                }
                Duration::ZERO
            }
            Err(_) => lock(requeue_delays).next_delay(),
        };
        self.settle(&delivery, outcome, queue_name, pause, shutdown)
            .await
    }

    /// Acks, dead-letters or requeues `delivery` according to `outcome`.
    async fn settle(
        &self,
        delivery: &Delivery,
        outcome: Result<Handled, HandleError>,
        queue_name: &str,
        pause: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), AmqpError> {
        let (broker, metrics) = (&self.broker, self.broker.metrics());
        let settled = match outcome {
            Ok(handled) => {
                let label = match handled {
                    Handled::Applied => "applied",
                    Handled::Duplicate => "duplicate",
                };
                metrics.consumed(queue_name, label);
                broker
                    .timed(delivery.acker.ack(BasicAckOptions::default()))
                    .await
            }
            Err(HandleError::Poison(reason)) => {
                metrics.consumed(queue_name, "dead_lettered");
                tracing::error!(queue = queue_name, %reason, "dead-lettering a message that can never be applied");
                broker
                    .timed(delivery.acker.reject(BasicRejectOptions { requeue: false }))
                    .await
            }
            Err(HandleError::Transient(reason) | HandleError::Unavailable(reason)) => {
                metrics.consumed(queue_name, "requeued");
                // Pause before handing it back, so a failure that persists does not burn
                // through the delivery limit in a tight loop.
                tracing::warn!(queue = queue_name, %reason, retry_in = ?pause, "message handling failed; requeueing");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => {}
                }
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                broker.timed(delivery.acker.nack(requeue)).await
            }
        };
        settled.map(|_| ())
    }

    /// Handles `delivery`; while the database is unreachable, keeps the message and tries again
    /// with backoff, until it is applied, fails for another reason, the hold runs out at
    /// `held_until` (then it answers Unavailable), or shutdown begins.
    async fn handle_holding_through_outages(
        &self,
        delivery: &Delivery,
        held_until: std::time::Instant,
        shutdown: &CancellationToken,
    ) -> Result<Handled, HandleError> {
        let (envelope, message) = self.open(delivery)?;
        let span = self.message_span(delivery, &envelope);
        let mut delays = Delays::new();
        let mut held = false;
        let limit = self.settings.db_timeout;
        loop {
            let attempt = self
                .apply_once(&envelope, &message)
                .instrument(span.clone());
            let outcome = match tokio::time::timeout(limit, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Err(HandleError::Unavailable(format!(
                    "the database did not answer within {limit:?}"
                ))),
            };
            let Err(HandleError::Unavailable(reason)) = &outcome else {
                if held && outcome.is_ok() {
                    tracing::info!(parent: &span, "database back; message applied");
                }
                return outcome;
            };
            if !held {
                tracing::warn!(parent: &span, %reason, "database unavailable; holding the message and retrying");
                held = true;
            }
            if std::time::Instant::now() >= held_until {
                return outcome;
            }
            tokio::select! {
                _ = tokio::time::sleep(delays.next_delay()) => {}
                _ = shutdown.cancelled() => return outcome,
            }
        }
    }

    /// One span per delivery, naming the message; when traces are exported, the consumer span
    /// of its trace, a child of the span that published it (its `traceparent` header).
    fn message_span(&self, delivery: &Delivery, envelope: &Envelope) -> tracing::Span {
        use tracing::field::Empty;
        let span = tracing::info_span!(
            "message",
            message_id = %envelope.message_id,
            message_type = %envelope.message_type,
            correlation_id = %envelope.correlation_id,
            redelivered = delivery.redelivered,
            otel.name = Empty,
            otel.kind = Empty,
            messaging.system = Empty,
            messaging.operation.type = Empty,
            messaging.destination.name = Empty,
        );
        if telemetry::exporting() {
            span.record("otel.name", format!("{} process", envelope.message_type));
            span.record("otel.kind", "consumer");
            span.record("messaging.system", "rabbitmq");
            span.record("messaging.operation.type", "process");
            span.record("messaging.destination.name", self.queue.suffix);
            telemetry::continue_trace(&span, header(delivery, telemetry::TRACEPARENT));
        }
        span
    }

    /// Checks the signature and decodes the envelope and its payload.
    fn open(&self, delivery: &Delivery) -> Result<(Envelope, H::Message), HandleError> {
        let keyring = &self.broker.settings().keyring;
        keyring
            .verify(
                &delivery.data,
                header(delivery, signing::KEY_ID_HEADER),
                header(delivery, signing::HEADER),
            )
            .map_err(HandleError::poison)?;
        let envelope = Envelope::from_bytes(&delivery.data).map_err(HandleError::poison)?;
        let message = self.handler.decode(&envelope)?;
        Ok((envelope, message))
    }

    /// One attempt: the handler's one statement when the message is its common case, else
    /// inbox record and effect in one transaction.
    async fn apply_once(
        &self,
        envelope: &Envelope,
        message: &H::Message,
    ) -> Result<Handled, HandleError> {
        let incoming = Incoming {
            message: message.clone(),
            message_id: envelope.message_id,
            correlation_id: envelope.correlation_id.clone(),
        };
        let record = inbox::Record {
            schema: self.schema,
            consumer: self.queue.suffix,
            message_id: envelope.message_id,
        };
        let metrics = self.broker.metrics();
        let queue = self.queue.suffix;
        match self
            .handler
            .apply_alone(&self.db, Some(record), &incoming)
            .await
        {
            Ok(Some(applied)) => {
                metrics.consumer_one_statement(queue, "applied");
                self.handler.committed(applied);
                return Ok(Handled::Applied);
            }
            Ok(None) => metrics.consumer_one_statement(queue, "not_applicable"),
            Err(error) if crate::db::is_unavailable(&error) => return Err(error.into()),
            // A copy applied meanwhile, say: the transaction tells what it was.
            Err(error) => {
                metrics.consumer_one_statement(queue, "failed");
                tracing::debug!(%error, "the one-statement path failed; applying in a transaction");
            }
        }
        let txn = self.db.begin().await?;
        // On error the transaction is dropped: the inbox record rolls back with the effect.
        let (handled, applied) = self.apply_in(&txn, incoming).await?;
        txn.commit().await?;
        if let Some(applied) = applied {
            self.handler.committed(applied);
        }
        Ok(handled)
    }

    /// The rows the message contends for, its inbox record and, the first time, its effect,
    /// inside `txn`.
    async fn apply_in(
        &self,
        txn: &DatabaseTransaction,
        incoming: Incoming<H::Message>,
    ) -> Result<(Handled, Option<H::Applied>), HandleError> {
        self.handler.lock(txn, &[&incoming.message]).await?;
        let first =
            inbox::record_first_delivery(txn, self.schema, self.queue.suffix, incoming.message_id)
                .await?;
        if !first {
            tracing::info!("duplicate message ignored");
            return Ok((Handled::Duplicate, None));
        }
        let applied = self.handler.apply(txn, incoming).await?;
        Ok((Handled::Applied, Some(applied)))
    }
}
