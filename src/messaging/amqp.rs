//! AMQP connections: the broker's topology, opening a channel on it, and reconnecting with
//! backoff after losing the broker.
//!
//! lapin's own auto-recovery is left off on purpose: each relay and consumer owns one
//! connection and, on any error, drops it and builds everything again through
//! [`connect_until_ready`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use tokio_util::sync::CancellationToken;

use crate::kernel::backoff;
use crate::messaging::signing::Keyring;
use crate::ops::metrics::Metrics;

/// A queue some consumer reads, and the message types routed to it.
#[derive(Clone, Copy, Debug)]
pub struct QueueSpec {
    /// The context that consumes it, and owns it and the exchanges that lead to it.
    pub owner: &'static str,
    /// Appended to the broker prefix: `<prefix>.<suffix>`; starts with `<owner>.`.
    pub suffix: &'static str,
    pub message_types: &'static [&'static str],
}

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub url: String,
    /// Prefix of every exchange and queue name, so deployments (and tests) do not share them.
    pub prefix: String,
    /// After this many deliveries a message is dead-lettered instead of requeued.
    pub delivery_limit: u32,
    /// Deletes a queue unused for this long; meant for throw-away environments such as tests.
    pub queue_expires: Option<Duration>,
    /// Bound on connect, declare, publish-confirm and ack round trips.
    pub io_timeout: Duration,
    /// Signs what this process publishes and checks what it consumes.
    pub keyring: Keyring,
}

/// The broker as Gozon uses it. Each consuming context owns everything under
/// `<prefix>.<context>.`: its inbound topic exchange (`.inbound`, where the other context
/// publishes what it sends it), its durable quorum queue bound to it by message type, a
/// dead-letter exchange and the queue's `.dlq`. So each context's broker user needs rights on
/// its own names and the right to publish to the other's inbound exchange, nothing more
/// ([`permissions`]): neither can purge or delete the other's queues.
#[derive(Clone, Debug)]
pub struct Broker {
    settings: Arc<BrokerSettings>,
    /// Every queue of the system: where each message type goes.
    queues: Arc<Vec<QueueSpec>>,
    /// The queues this process consumes: the topology it declares.
    owned: Arc<Vec<QueueSpec>>,
    links: BrokerLinks,
    metrics: Metrics,
}

/// A broker user's rights (RabbitMQ's configure, write and read regular expressions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// The least a context's broker user needs: configure and read its own names (declare and
/// consume its queues, bind them to its exchanges), write its own names (bindings, replays of its
/// dead letters) and the inbound exchanges of the contexts it sends to (`sends_to`).
pub fn permissions(prefix: &str, context: &str, sends_to: &[&str]) -> Permissions {
    let escape = |text: &str| {
        text.chars()
            .flat_map(|c| {
                let special = "\\.^$|?*+()[]{}-".contains(c);
                special
                    .then_some('\\')
                    .into_iter()
                    .chain(std::iter::once(c))
            })
            .collect::<String>()
    };
    let own = format!("^{}\\.{}\\..*$", escape(prefix), escape(context));
    let mut write = vec![format!("{}\\.{}\\..*", escape(prefix), escape(context))];
    write.extend(
        sends_to
            .iter()
            .map(|peer| format!("{}\\.{}\\.inbound", escape(prefix), escape(peer))),
    );
    Permissions {
        configure: own.clone(),
        write: format!("^({})$", write.join("|")),
        read: own,
    }
}

/// Which broker-facing tasks (relays, consumers) of this process are connected right now;
/// the readiness check reports the ones that are not.
#[derive(Clone, Debug, Default)]
pub struct BrokerLinks {
    tasks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl BrokerLinks {
    pub fn set(&self, task: &str, connected: bool) {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tasks.insert(task.to_owned(), connected);
    }

    /// The tasks that are not connected.
    pub fn down(&self) -> Vec<String> {
        let tasks = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tasks
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the broker cancelled the consumer (queue deleted or channel closed)")]
    ConsumerCancelled,
    #[error("no queue takes messages with routing key {0}")]
    Unroutable(String),
}

impl Broker {
    /// `queues` is every queue of the system (where messages go); `owned`, the ones this
    /// process consumes, whose exchanges and queues it declares. A message for a context that
    /// has never started finds no exchange: its relay keeps it in the outbox and retries.
    pub fn new(settings: BrokerSettings, queues: Vec<QueueSpec>, owned: Vec<QueueSpec>) -> Broker {
        Broker {
            settings: Arc::new(settings),
            queues: Arc::new(queues),
            owned: Arc::new(owned),
            links: BrokerLinks::default(),
            metrics: Metrics::default(),
        }
    }

    /// Counts what this broker's relays publish and consumers handle into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Broker {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    pub fn links(&self) -> &BrokerLinks {
        &self.links
    }

    /// The exchange messages for `queue` are published to.
    pub fn inbound_exchange(&self, queue: &QueueSpec) -> String {
        format!("{}.{}.inbound", self.settings.prefix, queue.owner)
    }

    /// The exchange `queue`'s messages go to once they cannot be applied.
    pub fn dead_letter_exchange(&self, queue: &QueueSpec) -> String {
        format!("{}.{}.dead-letter", self.settings.prefix, queue.owner)
    }

    /// The queue that takes messages of `message_type`.
    pub fn queue_for(&self, message_type: &str) -> Option<&QueueSpec> {
        self.queues
            .iter()
            .find(|queue| queue.message_types.contains(&message_type))
    }

    pub fn queue_name(&self, queue: &QueueSpec) -> String {
        format!("{}.{}", self.settings.prefix, queue.suffix)
    }

    pub fn dead_letter_queue_name(&self, queue: &QueueSpec) -> String {
        format!("{}.dlq", self.queue_name(queue))
    }

    /// Runs `fut` under the broker I/O timeout.
    pub async fn timed<T, F>(&self, fut: F) -> Result<T, AmqpError>
    where
        F: Future<Output = Result<T, lapin::Error>>,
    {
        let limit = self.settings.io_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(AmqpError::Timeout(limit)),
        }
    }

    /// Connects, opens one channel, declares the whole topology and, for publishers, turns on
    /// publisher confirms. The connection must be kept alive as long as the channel is used.
    pub async fn open_channel(
        &self,
        name: &str,
        confirms: bool,
    ) -> Result<(Connection, Channel), AmqpError> {
        let (connection, channel) = self.open_bare_channel(name).await?;
        self.declare_topology(&channel).await?;
        if confirms {
            self.timed(channel.confirm_select(ConfirmSelectOptions::default()))
                .await?;
        }
        Ok((connection, channel))
    }

    /// Connects and opens one channel, declaring nothing: for tools that must not redeclare
    /// queues with arguments of their own (which the broker would refuse as inequivalent).
    pub async fn open_bare_channel(&self, name: &str) -> Result<(Connection, Channel), AmqpError> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = self
            .timed(Connection::connect(&self.settings.url, properties))
            .await?;
        let channel = self.timed(connection.create_channel()).await?;
        Ok((connection, channel))
    }

    /// Messages ready in `queue` and in its dead-letter queue (passive declares: the queues
    /// exist, their consumer declared them), recorded in the metrics.
    pub async fn measure_depths(
        &self,
        channel: &Channel,
        queue: &QueueSpec,
    ) -> Result<(u32, u32), AmqpError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let name = self.queue_name(queue);
        let dlq = self.dead_letter_queue_name(queue);
        let ready = self
            .timed(channel.queue_declare(name.as_str().into(), passive, FieldTable::default()))
            .await?
            .message_count();
        let dead = self
            .timed(channel.queue_declare(dlq.as_str().into(), passive, FieldTable::default()))
            .await?
            .message_count();
        self.metrics().queue_measured(&name, ready, dead);
        Ok((ready, dead))
    }

    async fn declare_topology(&self, channel: &Channel) -> Result<(), AmqpError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for queue in self.owned.iter() {
            let inbound = self.inbound_exchange(queue);
            let dead_letter = self.dead_letter_exchange(queue);
            self.timed(channel.exchange_declare(
                inbound.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            ))
            .await?;
            self.timed(channel.exchange_declare(
                dead_letter.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            ))
            .await?;
            let name = self.queue_name(queue);
            let dlq = self.dead_letter_queue_name(queue);
            self.timed(channel.queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions::durable(),
                self.queue_arguments(None),
            ))
            .await?;
            self.timed(channel.queue_bind(
                dlq.as_str().into(),
                dead_letter.as_str().into(),
                name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .await?;
            self.timed(channel.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                self.queue_arguments(Some((&dead_letter, &name))),
            ))
            .await?;
            for message_type in queue.message_types {
                self.timed(channel.queue_bind(
                    name.as_str().into(),
                    inbound.as_str().into(),
                    (*message_type).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ))
                .await?;
            }
        }
        Ok(())
    }

    /// Quorum queues count deliveries, which is what bounds redelivery of a message whose
    /// handling keeps failing; `dead_letter` (exchange, routing key) is set on work queues, not
    /// on the DLQs.
    fn queue_arguments(&self, dead_letter: Option<(&str, &str)>) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some((exchange, key)) = dead_letter {
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(exchange.into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(key.into()),
            );
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.settings.delivery_limit)),
            );
        }
        if let Some(expires) = self.settings.queue_expires {
            let millis = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
        }
        arguments
    }
}

/// Opens a channel, retrying with the shared [`backoff::policy`] until it works or `shutdown` fires.
/// Marks the task's link down meanwhile; the caller marks it up once it is really working.
/// The first failure is logged as a warning, later ones at debug, so an outage is one line.
pub async fn connect_until_ready(
    broker: &Broker,
    name: &str,
    confirms: bool,
    shutdown: &CancellationToken,
) -> Option<(Connection, Channel)> {
    broker.links.set(name, false);
    let failures = AtomicU32::new(0);
    let attempt = || broker.open_channel(name, confirms);
    let retrying = attempt
        .retry(backoff::policy())
        .sleep(tokio::time::sleep)
        .notify(|error, delay| {
            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(task = name, error = %error, "broker unavailable; retrying with backoff");
            } else {
                tracing::debug!(task = name, error = %error, ?delay, "broker still unavailable");
            }
        });
    tokio::select! {
        result = retrying => match result {
            Ok(opened) => {
                let failures = failures.load(Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(task = name, attempts = failures + 1, "broker connection recovered");
                }
                Some(opened)
            }
            Err(_) => None,
        },
        _ = shutdown.cancelled() => None,
    }
}
