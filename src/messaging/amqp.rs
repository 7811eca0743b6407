//! AMQP connections: the broker's topology, opening a channel on it, and reconnecting with
//! backoff after losing the broker.
//!
//! lapin's own auto-recovery is left off on purpose: each relay and consumer owns one
//! connection and, on any error, drops it and builds everything again through
//! [`connect_until_ready`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ConnectionStatus, ExchangeKind};

use tokio_util::sync::CancellationToken;

use crate::kernel::backoff;
use crate::messaging::signing::Keyring;
use crate::ops::metrics::Metrics;

/// A queue some consumer reads, and the message types routed to it. On a cluster it is made of
/// several quorum queues, its lanes (see [`Broker::lane_name`]), each created led by another
/// node (a failover may later put two lanes' leaders on one node until the leaders are
/// rebalanced: `rabbitmq-queues rebalance quorum`); its
/// consumer reads every lane, a relay publishes to one and moves to the next when it stops
/// confirming (its leader lost, the new one not elected yet), so an order's message waits for a
/// confirm timeout instead of a leader election. The inbox makes a message that reaches two
/// lanes (sent again after a lost confirm) count once.
#[derive(Clone, Copy, Debug)]
pub struct QueueSpec {
    /// The context that consumes it, and owns it and the exchanges that lead to it.
    pub owner: &'static str,
    /// Appended to the broker prefix: `<prefix>.<suffix>`; starts with `<owner>.`.
    pub suffix: &'static str,
    pub message_types: &'static [&'static str],
}

/// One node of the broker: its URL (credentials, vhost, heartbeat) and how logs name it.
#[derive(Clone, Debug)]
pub struct BrokerNode {
    pub url: String,
    /// `host:port`, without credentials.
    pub label: String,
}

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// The nodes of the cluster; any of them serves every queue.
    pub nodes: Vec<BrokerNode>,
    /// How long one node may take to accept a connection before the next is tried.
    pub connect_timeout: Duration,
    /// How long a connection attempt has to one node before the next node is tried beside it.
    pub connect_stagger: Duration,
    /// Members of a quorum queue at its creation.
    pub quorum_size: u16,
    /// `x-queue-leader-locator` of a new quorum queue: of every queue with one lane, and of the
    /// dead-letter queues (lanes, when there are several, are placed on their own nodes).
    pub leader_locator: String,
    /// Quorum queues each consumed queue is made of (its lanes), each led by another node when
    /// there are several: a relay whose lane loses its leader sends on over the next one.
    pub lanes: usize,
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
/// publishes what it sends it), its durable quorum queue (its lanes) bound to it by message type, a
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
    /// The node this instance's next connection tries first: one chosen at random per
    /// instance (so instances spread over the nodes), moved on when a node fails.
    preferred: Arc<AtomicUsize>,
    /// A consumer link's own node, which each of its connections tries first (so two links of
    /// one work, once moved together by a failure, part again at the next reconnect).
    home: Option<usize>,
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

/// Which broker-facing tasks (relays, consumers) of this process are connected right now, and
/// to which node; the readiness check reports the ones that are not, or whose connection has
/// gone silent (lapin gives a connection up after two heartbeats without a word from the node).
#[derive(Clone, Debug, Default)]
pub struct BrokerLinks {
    tasks: Arc<Mutex<BTreeMap<String, Link>>>,
}

#[derive(Clone, Debug)]
struct Link {
    /// The node and the connection's status while connected.
    connection: Option<(String, ConnectionStatus)>,
    since: Instant,
}

/// A task's link as readiness reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub task: String,
    /// The node it is connected to, when it is.
    pub node: Option<String>,
    /// How long it has been so.
    pub for_secs: u64,
}

/// The most lanes a queue may have (`--amqp-queue-lanes`).
pub const MAX_LANES: usize = 3;

/// What follows a task's name when it is one of several links (or lanes) doing the same work.
const LINK_MARK: &str = " (";

/// The name of link `link` (from 0) of `links` reading lane `lane` of `lanes` for `task`'s
/// work: `consumer q (lane 2 of 2, link 1 of 2)`, each part only when there are several.
pub fn link_name(
    task: &str,
    (lane, lanes): (usize, usize),
    (link, links): (usize, usize),
) -> String {
    let mut parts = Vec::new();
    if lanes > 1 {
        parts.push(format!("lane {} of {lanes}", lane + 1));
    }
    if links > 1 {
        parts.push(format!("link {} of {links}", link + 1));
    }
    if parts.is_empty() {
        task.to_owned()
    } else {
        format!("{task}{LINK_MARK}{})", parts.join(", "))
    }
}

impl LinkState {
    /// The work this link does, shared by every link of the same task.
    pub fn work(&self) -> &str {
        self.task
            .split_once(LINK_MARK)
            .map_or(self.task.as_str(), |(work, _)| work)
    }
}

impl BrokerLinks {
    /// The works none of whose links is connected (a consumer with one of its two links, or the
    /// link of one of its two lanes, on a lost node still consumes: relays send on through
    /// the other lane), each with how long its most recent link has been down.
    pub fn stalled(&self) -> Vec<(String, u64)> {
        let mut works: BTreeMap<String, Option<u64>> = BTreeMap::new();
        for state in self.states() {
            let entry = works
                .entry(state.work().to_owned())
                .or_insert(Some(u64::MAX));
            *entry = match (*entry, &state.node) {
                (None, _) | (_, Some(_)) => None,
                (Some(down), None) => Some(down.min(state.for_secs)),
            };
        }
        works
            .into_iter()
            .filter_map(|(work, down)| down.map(|secs| (work, secs)))
            .collect()
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Link>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `task` works over `connection`, to `node`.
    pub fn up(&self, task: &str, node: &str, connection: &Connection) {
        let link = Link {
            connection: Some((node.to_owned(), connection.status().clone())),
            since: Instant::now(),
        };
        self.tasks().insert(task.to_owned(), link);
    }

    /// `task` has no connection (it is connecting).
    pub fn down(&self, task: &str) {
        let mut tasks = self.tasks();
        let was_up = tasks.get(task).is_none_or(|link| link.connection.is_some());
        if was_up {
            let link = Link {
                connection: None,
                since: Instant::now(),
            };
            tasks.insert(task.to_owned(), link);
        }
    }

    /// Every task: its node while its connection is alive, none while it is down or silent.
    pub fn states(&self) -> Vec<LinkState> {
        self.tasks()
            .iter()
            .map(|(task, link)| {
                let node = link
                    .connection
                    .as_ref()
                    .filter(|(_, status)| status.connected())
                    .map(|(node, _)| node.clone());
                LinkState {
                    task: task.clone(),
                    node,
                    for_secs: link.since.elapsed().as_secs(),
                }
            })
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
    #[error("the connection or channel is no longer open")]
    LinkClosed,
    #[error("no queue takes messages with routing key {0}")]
    Unroutable(String),
    #[error("node {0}: {1}")]
    Node(String, Box<AmqpError>),
    /// Not the broker's fault: the consumer gives its deliveries back while the database
    /// cannot be reached.
    #[error("the database is unreachable; deliveries handed back to the queue")]
    DatabaseUnavailable,
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Publish,
    /// Consuming lane `lane` of the owned queues.
    Consume {
        lane: usize,
    },
}

/// A connection, its channel, and the node it reached.
pub struct Opened {
    pub connection: Connection,
    pub channel: Channel,
    pub node: String,
}

/// Whether the broker refused a declare as inequivalent to what exists (406).
fn is_precondition_failed(error: &lapin::Error) -> bool {
    error.to_string().contains("PRECONDITION_FAILED")
}

impl Broker {
    /// `queues` is every queue of the system (where messages go); `owned`, the ones this
    /// process consumes, whose exchanges and queues it declares. A message for a context that
    /// has never started finds no exchange: its relay keeps it in the outbox and retries.
    pub fn new(settings: BrokerSettings, queues: Vec<QueueSpec>, owned: Vec<QueueSpec>) -> Broker {
        let nodes = settings.nodes.len().max(1);
        let preferred = uuid::Uuid::new_v4().as_u128() as usize % nodes;
        Broker {
            settings: Arc::new(settings),
            queues: Arc::new(queues),
            owned: Arc::new(owned),
            preferred: Arc::new(AtomicUsize::new(preferred)),
            home: None,
            links: BrokerLinks::default(),
            metrics: Metrics::default(),
        }
    }

    /// The same broker, whose every connection tries first the node `offset` nodes past this
    /// one's preferred node (its home), then the others: a second consumer link of an instance
    /// sits on another node than its first, so the loss of one node leaves the instance
    /// consuming, and goes home again whenever it reconnects.
    pub fn starting_at(&self, offset: usize) -> Broker {
        let nodes = self.settings.nodes.len().max(1);
        let home = (self.preferred.load(Ordering::Relaxed) + offset) % nodes;
        Broker {
            preferred: Arc::new(AtomicUsize::new(home)),
            home: Some(home),
            ..self.clone()
        }
    }

    /// The broker a consumer of lane `lane` of `queue` reads it through, over its link `link`.
    /// With several lanes, the lane's links start at the node that leads it (and the next ones
    /// past it): a lane is read where it is led, so a node lost or partitioned away takes with
    /// it only the lanes it leads, not deliveries of the others handed to its connections
    /// (which the leaders would count as in flight until they noticed the node gone). With
    /// one lane, link `link` starts `link` nodes past this instance's node.
    pub fn for_lane(&self, queue: &QueueSpec, lane: usize, link: usize) -> Broker {
        if self.lanes() <= 1 {
            return self.starting_at(link);
        }
        let nodes = self.settings.nodes.len().max(1);
        let home = (self.lane_node(queue, lane) + link) % nodes;
        Broker {
            preferred: Arc::new(AtomicUsize::new(home)),
            home: Some(home),
            ..self.clone()
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

    /// Lanes of `queue` past this process's count (up to [`MAX_LANES`]) that exist: left by a
    /// deployment that had more (or by a newer version, during a rollback). Their bindings go,
    /// so no relay sends there any more (one that does is refused and moves on to another
    /// lane), and the caller reads what they still hold: nothing waits in a lane nobody reads.
    pub async fn retired_lanes(&self, connection: &Connection, queue: &QueueSpec) -> Vec<String> {
        let inbound = self.inbound_exchange(queue);
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let mut found = Vec::new();
        for lane in self.lanes()..MAX_LANES {
            let name = self.lane_name(queue, lane);
            // On a channel of its own: the broker closes it when the lane is not there.
            let Ok(probe) = self.timed(connection.create_channel()).await else {
                break;
            };
            let declared = self
                .timed(probe.queue_declare(name.as_str().into(), passive, FieldTable::default()))
                .await;
            let Ok(declared) = declared else {
                continue;
            };
            for message_type in queue.message_types {
                let unbound = probe.queue_unbind(
                    name.as_str().into(),
                    inbound.as_str().into(),
                    self.lane_routing_key(message_type, lane).as_str().into(),
                    FieldTable::default(),
                );
                if let Err(error) = self.timed(unbound).await {
                    tracing::warn!(queue = %name, %error, "cannot unbind a retired lane");
                }
            }
            tracing::warn!(queue = %name, messages = declared.message_count(), "a lane this deployment no longer has: unbound, and read until it is deleted");
            let _ = self.timed(probe.close(200, "probed".into())).await;
            found.push(name);
        }
        found
    }

    /// The routing key of lane 0 for `routing_key`, which may name another lane.
    pub fn first_lane_key(routing_key: &str) -> &str {
        match routing_key.split_once('.') {
            Some((lane, message_type)) if lane.starts_with("lane-") => message_type,
            _ => routing_key,
        }
    }

    /// How many lanes each queue has.
    pub fn lanes(&self) -> usize {
        self.settings.lanes.max(1)
    }

    /// Lane `lane` of `queue`: the first is the queue's own name, the others `<name>.lane-<n>`.
    pub fn lane_name(&self, queue: &QueueSpec, lane: usize) -> String {
        match lane {
            0 => self.queue_name(queue),
            _ => format!("{}.lane-{}", self.queue_name(queue), lane + 1),
        }
    }

    /// The routing key that takes `message_type` to lane `lane`: the type itself for the
    /// first, `lane-<n>.<type>` for the others.
    pub fn lane_routing_key(&self, message_type: &str, lane: usize) -> String {
        match lane {
            0 => message_type.to_owned(),
            _ => format!("lane-{}.{message_type}", lane + 1),
        }
    }

    /// The node lane `lane` of `queue` is created on (and its consumers read it from):
    /// consecutive lanes on consecutive nodes, from a node every process derives alike from the
    /// queue's name (so the queues' first lanes need not all sit on one node).
    pub fn lane_node(&self, queue: &QueueSpec, lane: usize) -> usize {
        let nodes = self.settings.nodes.len().max(1);
        let start = queue.suffix.bytes().fold(0usize, |sum, byte| {
            sum.wrapping_mul(31).wrapping_add(usize::from(byte))
        });
        (start + lane) % nodes
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

    /// Connects and opens one channel: for a consumer, declaring this process's topology
    /// (its exchanges, queues and bindings); for a publisher, turning on publisher confirms and
    /// declaring nothing (it publishes to the other context's inbound exchange, which that
    /// context declares; and a declare that needs the whole cluster would hold a reconnecting
    /// relay up while a node is lost). The connection must be kept alive as long as the
    /// channel is used. Also says which node it reached.
    pub async fn open_channel(&self, name: &str, purpose: Purpose) -> Result<Opened, AmqpError> {
        let opened = self.open_bare_channel(name).await?;
        self.ready_for(opened, purpose).await
    }

    /// The node a consumer link belongs on ([`Broker::for_lane`]), when it is away from it:
    /// `node` is the one it reached.
    pub fn away_from_home(&self, node: &str) -> Option<usize> {
        let home = self.home?;
        let nodes = &self.settings.nodes;
        (nodes.len() > 1 && nodes.get(home).is_some_and(|n| n.label != node)).then_some(home)
    }

    /// Like [`Broker::open_channel`], at node `index` only, within the connect timeout.
    pub async fn open_channel_at(
        &self,
        name: &str,
        index: usize,
        purpose: Purpose,
    ) -> Result<Opened, AmqpError> {
        let limit = self.settings.connect_timeout.min(self.settings.io_timeout);
        let opened = self.open_on(name, index, limit).await.1?;
        self.ready_for(opened, purpose).await
    }

    /// Makes an opened channel ready for `purpose`; on failure its connection is closed (in the
    /// background).
    async fn ready_for(&self, opened: Opened, purpose: Purpose) -> Result<Opened, AmqpError> {
        let Opened {
            connection,
            channel,
            node,
        } = opened;
        let ready = match purpose {
            Purpose::Consume { lane } => {
                self.declare_topology(&connection, channel, &node, lane)
                    .await
            }
            Purpose::Publish => {
                let confirming = self
                    .timed(channel.confirm_select(ConfirmSelectOptions::default()))
                    .await;
                confirming.map(|()| channel)
            }
        };
        match ready {
            Ok(channel) => Ok(Opened {
                connection,
                channel,
                node,
            }),
            Err(error) => {
                self.close_in_background(connection, "channel not ready");
                Err(error)
            }
        }
    }

    /// Closes `connection` in the background: one that is already dead (its node lost) would
    /// otherwise hold the caller for a whole timeout.
    pub fn close_in_background(&self, connection: Connection, reason: &'static str) {
        let broker = self.clone();
        tokio::spawn(async move {
            let _ = broker.timed(connection.close(200, reason.into())).await;
        });
    }

    /// Connects and opens one channel, declaring nothing: for tools that must not redeclare
    /// queues with arguments of their own (which the broker would refuse as inequivalent).
    /// Tries the nodes from the preferred one on; a node that has not answered within
    /// the connect stagger gets the next one tried beside it (a silent node, partitioned away,
    /// costs that much instead of a whole connect timeout). The first node to answer wins and is
    /// preferred from then on.
    pub async fn open_bare_channel(&self, name: &str) -> Result<Opened, AmqpError> {
        let nodes = &self.settings.nodes;
        let first = self
            .home
            .unwrap_or_else(|| self.preferred.load(Ordering::Relaxed));
        let mut attempts = FuturesUnordered::new();
        let mut launched = 0;
        let mut last_error = None;
        loop {
            if launched < nodes.len() {
                let index = (first + launched) % nodes.len();
                let limit = self.settings.connect_timeout.min(self.settings.io_timeout);
                attempts.push(self.open_on(name, index, limit));
                launched += 1;
            }
            let stagger = tokio::time::sleep(self.settings.connect_stagger);
            tokio::select! {
                done = attempts.next() => match done {
                    Some((index, Ok(opened))) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(opened);
                    }
                    Some((index, Err(error))) => {
                        let node = &nodes[index].label;
                        tracing::debug!(task = name, %node, %error, "broker node unavailable");
                        last_error = Some(AmqpError::Node(node.clone(), Box::new(error)));
                        if attempts.is_empty() && launched >= nodes.len() {
                            break;
                        }
                    }
                    None => break,
                },
                () = stagger, if launched < nodes.len() => {}
            }
        }
        // The next attempt starts one node further on.
        self.preferred
            .store((first + 1) % nodes.len().max(1), Ordering::Relaxed);
        Err(last_error.unwrap_or(AmqpError::Timeout(self.settings.connect_timeout)))
    }

    /// One attempt at node `index`: connect within `limit` and open a channel (bounded).
    async fn open_on(
        &self,
        name: &str,
        index: usize,
        limit: Duration,
    ) -> (usize, Result<Opened, AmqpError>) {
        let node = &self.settings.nodes[index];
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connected =
            match tokio::time::timeout(limit, Connection::connect(&node.url, properties)).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => return (index, Err(AmqpError::from(error))),
                Err(_) => return (index, Err(AmqpError::Timeout(limit))),
            };
        let opened = match self.timed(connected.create_channel()).await {
            Ok(channel) => Ok(Opened {
                connection: connected,
                channel,
                node: node.label.clone(),
            }),
            Err(error) => {
                self.close_in_background(connected, "no channel");
                Err(error)
            }
        };
        (index, opened)
    }

    /// After losing a connection to a node, the next one starts at another node.
    pub fn move_on_from(&self, node: &str) {
        let nodes = &self.settings.nodes;
        if let Some(index) = nodes.iter().position(|n| n.label == node) {
            let _ = self.preferred.compare_exchange(
                index,
                (index + 1) % nodes.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Messages ready in `queue` (every lane) and in its dead-letter queue (passive declares: the queues
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
        let mut ready = 0;
        for lane in 0..self.lanes() {
            let lane = self.lane_name(queue, lane);
            ready += self
                .timed(channel.queue_declare(lane.as_str().into(), passive, FieldTable::default()))
                .await?
                .message_count();
        }
        let dead = self
            .timed(channel.queue_declare(dlq.as_str().into(), passive, FieldTable::default()))
            .await?
            .message_count();
        self.metrics().queue_measured(&name, ready, dead);
        Ok((ready, dead))
    }

    /// Declares `queue` with Gozon's arguments. A queue an earlier version declared with other
    /// arguments is refused as inequivalent (and the channel closed): it is then used as it is,
    /// on a new channel, with a warning, so an upgrade never stops a deployment.
    async fn declare_queue(
        &self,
        connection: &Connection,
        channel: Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<Channel, AmqpError> {
        let declared = self
            .timed(channel.queue_declare(name.into(), QueueDeclareOptions::durable(), arguments))
            .await;
        match declared {
            Ok(_) => Ok(channel),
            Err(AmqpError::Lapin(error)) if is_precondition_failed(&error) => {
                tracing::warn!(queue = name, %error, "the queue exists with other arguments (declared by an earlier version); using it as it is");
                let channel = self.timed(connection.create_channel()).await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                self.timed(channel.queue_declare(name.into(), passive, FieldTable::default()))
                    .await?;
                Ok(channel)
            }
            Err(error) => Err(error),
        }
    }

    /// Declares, for lane `lane` of each owned queue: the context's exchanges, the queue's
    /// dead-letter queue, the lane's queue (placed on its node) and their bindings.
    async fn declare_topology(
        &self,
        connection: &Connection,
        mut channel: Channel,
        node: &str,
        lane: usize,
    ) -> Result<Channel, AmqpError> {
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
            // Every lane dead-letters into the queue's one DLQ, under the first lane's name.
            let first = self.queue_name(queue);
            let dlq = self.dead_letter_queue_name(queue);
            let locator = self.settings.leader_locator.as_str();
            channel = self
                .declare_queue(
                    connection,
                    channel,
                    &dlq,
                    self.queue_arguments(None, locator),
                )
                .await?;
            self.timed(channel.queue_bind(
                dlq.as_str().into(),
                dead_letter.as_str().into(),
                first.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .await?;
            let name = self.lane_name(queue, lane);
            channel = self
                .declare_lane(connection, channel, node, queue, lane)
                .await?;
            for message_type in queue.message_types {
                self.timed(channel.queue_bind(
                    name.as_str().into(),
                    inbound.as_str().into(),
                    self.lane_routing_key(message_type, lane).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ))
                .await?;
            }
        }
        Ok(channel)
    }

    /// Declares lane `lane` of `queue`. With one lane, here, its leader placed by the
    /// configured locator. With several, each lane's leader goes to a node of its own
    /// ([`Broker::lane_node`]): the lane is declared `client-local` over a connection to that
    /// node, unless it exists already (a passive declare here says so) or that node does not
    /// answer (then here: a lane led from the wrong node still works, it only shares its
    /// fate with another).
    async fn declare_lane(
        &self,
        connection: &Connection,
        channel: Channel,
        node: &str,
        queue: &QueueSpec,
        lane: usize,
    ) -> Result<Channel, AmqpError> {
        let name = self.lane_name(queue, lane);
        let dead_letter = self.dead_letter_exchange(queue);
        let first = self.queue_name(queue);
        if self.settings.lanes <= 1 {
            let arguments =
                self.queue_arguments(Some((&dead_letter, &first)), &self.settings.leader_locator);
            return self
                .declare_queue(connection, channel, &name, arguments)
                .await;
        }
        let arguments = || self.queue_arguments(Some((&dead_letter, &first)), "client-local");
        let target = self.lane_node(queue, lane);
        let here = self.settings.nodes.iter().position(|n| n.label == node);
        if here != Some(target) {
            // On a channel of its own: a passive declare of a missing queue closes it.
            let probe = self.timed(connection.create_channel()).await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let exists = self
                .timed(probe.queue_declare(name.as_str().into(), passive, FieldTable::default()))
                .await;
            match exists {
                Ok(_) => {
                    let _ = self.timed(probe.close(200, "probed".into())).await;
                    return Ok(channel);
                }
                Err(AmqpError::Lapin(error)) if error.to_string().contains("NOT_FOUND") => {}
                Err(error) => {
                    let _ = self.timed(probe.close(200, "probe failed".into())).await;
                    return Err(error);
                }
            }
            // No longer than a node is given before the next is tried beside it.
            let limit = self
                .settings
                .connect_stagger
                .min(self.settings.connect_timeout);
            match self.open_on("gozon-lane-placement", target, limit).await {
                (_, Ok(there)) => {
                    let declared = self
                        .declare_queue(&there.connection, there.channel, &name, arguments())
                        .await;
                    self.close_in_background(there.connection, "lane placed");
                    if declared.is_ok() {
                        tracing::info!(queue = %name, node = %there.node, "lane declared on its own node");
                        return Ok(channel);
                    }
                }
                (_, Err(error)) => {
                    let node = &self.settings.nodes[target].label;
                    tracing::warn!(queue = %name, %node, %error, "the lane's own node does not answer; declaring it here");
                }
            }
        }
        self.declare_queue(connection, channel, &name, arguments())
            .await
    }

    /// Quorum queues count deliveries, which is what bounds redelivery of a message whose
    /// handling keeps failing; `dead_letter` (exchange, routing key) is set on work queues, not
    /// on the DLQs.
    fn queue_arguments(&self, dead_letter: Option<(&str, &str)>, locator: &str) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        // Replicated on this many nodes, with the leaders spread over them (not all on the
        // node of whichever instance declared first).
        arguments.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(i64::from(self.settings.quorum_size)),
        );
        arguments.insert(
            "x-queue-leader-locator".into(),
            AMQPValue::LongString(locator.into()),
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

/// How often a failing reconnection says so again.
const STILL_FAILING_EVERY: Duration = Duration::from_secs(15);

/// Opens a channel, retrying with the shared [`backoff::policy`] until it works or `shutdown`
/// fires. Marks the task's link down meanwhile; the caller marks it up (with its node) once it
/// is really working. The first failure is a warning, and so is one every
/// [`STILL_FAILING_EVERY`] while they go on (with the attempts so far and the last error).
pub async fn connect_until_ready(
    broker: &Broker,
    name: &str,
    purpose: Purpose,
    shutdown: &CancellationToken,
) -> Option<Opened> {
    broker.links.down(name);
    let failures = AtomicU32::new(0);
    let last_said = Mutex::new(Instant::now());
    let attempt = || broker.open_channel(name, purpose);
    let retrying = attempt
        .retry(backoff::policy())
        .sleep(tokio::time::sleep)
        .notify(|error, delay| {
            let attempts = failures.fetch_add(1, Ordering::Relaxed) + 1;
            let mut last = last_said
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if attempts == 1 || last.elapsed() >= STILL_FAILING_EVERY {
                *last = Instant::now();
                tracing::warn!(task = name, attempts, error = %error, "broker unavailable; retrying with backoff");
            } else {
                tracing::debug!(task = name, error = %error, ?delay, "broker still unavailable");
            }
        });
    tokio::select! {
        result = retrying => match result {
            Ok(opened) => {
                let failures = failures.load(Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(task = name, node = %opened.node, attempts = failures + 1, "broker connection recovered");
                } else {
                    tracing::debug!(task = name, node = %opened.node, "connected to the broker");
                }
                Some(opened)
            }
            Err(_) => None,
        },
        _ = shutdown.cancelled() => None,
    }
}
