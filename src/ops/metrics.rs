//! Prometheus metrics of one process, served at `/metrics`: HTTP requests (by route, method and
//! status, and how long they took), messages published (and how long the broker took to confirm
//! them), consumed (and how), the depth of consumed queues and their dead-letter queues, and
//! how long sagas take. Outbox backlogs are measured in the database at scrape time.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SchemaLabel {
    pub schema: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumedLabels {
    pub queue: String,
    /// `applied`, `duplicate`, `dead_lettered` or `requeued`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template (the path, for Gozon's routes; `other` for anything else).
    pub route: String,
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabels {
    pub route: String,
    pub method: String,
}

#[derive(Clone)]
pub struct Metrics {
    relay_publish: Family<SchemaLabel, Histogram>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpRouteLabels, Histogram>,
    registry: Arc<Registry>,
    published: Family<SchemaLabel, Counter>,
    consumed: Family<ConsumedLabels, Counter>,
    batches: Family<ConsumedLabels, Counter>,
    one_statement: Family<ConsumedLabels, Counter>,
    batched: Family<QueueLabel, Counter>,
    saga_duration: Histogram,
    outbox_backlog: Family<SchemaLabel, Gauge>,
    outbox_oldest_age: Family<SchemaLabel, Gauge<f64, AtomicU64>>,
    queue_depth: Family<QueueLabel, Gauge>,
    dead_letters: Family<QueueLabel, Gauge>,
    ready: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gozon");
        let published = Family::<SchemaLabel, Counter>::default();
        registry.register(
            "outbox_published",
            "Outbox messages published and confirmed by the broker",
            published.clone(),
        );
        let consumed = Family::<ConsumedLabels, Counter>::default();
        registry.register(
            "messages_consumed",
            "Deliveries handled, by queue and outcome (applied, duplicate, dead_lettered, requeued)",
            consumed.clone(),
        );
        let batches = Family::<ConsumedLabels, Counter>::default();
        registry.register(
            "consumer_batches",
            "Attempts at applying a batch of deliveries in one transaction, by queue and outcome (committed; retried: rolled back for a poison message and tried again without it; split: failed otherwise, its deliveries applied one by one)",
            batches.clone(),
        );
        let one_statement = Family::<ConsumedLabels, Counter>::default();
        registry.register(
            "consumer_one_statement",
            "Deliveries tried alone in one statement, by queue and outcome (applied; not_applicable: not the common case, nothing written; failed: the statement failed, a copy applied meanwhile say); all but applied go on in a transaction",
            one_statement.clone(),
        );
        let batched = Family::<QueueLabel, Counter>::default();
        registry.register(
            "consumer_batched_messages",
            "Deliveries applied in a committed batch of several",
            batched.clone(),
        );
        // 5 ms .. ~80 s.
        let saga_duration = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register(
            "saga_duration_seconds",
            "From an order's creation to FINISHED or CANCELLED",
            saga_duration.clone(),
        );
        let outbox_backlog = Family::<SchemaLabel, Gauge>::default();
        registry.register(
            "outbox_backlog",
            "Outbox messages not yet published",
            outbox_backlog.clone(),
        );
        let outbox_oldest_age = Family::<SchemaLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "outbox_oldest_unsent_age_seconds",
            "Age of the oldest outbox message not yet published",
            outbox_oldest_age.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            http_requests.clone(),
        );
        // 0.5 ms .. ~16 s.
        let http_duration = Family::<HttpRouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (to its first byte), by route and method",
            http_duration.clone(),
        );
        // 0.1 ms .. ~3 s.
        let relay_publish = Family::<SchemaLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register(
            "relay_publish_seconds",
            "From publishing an outbox batch to the broker's last confirm of it",
            relay_publish.clone(),
        );
        let queue_depth = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_depth",
            "Messages waiting in a queue this process consumes, as the broker last said (every 10 s)",
            queue_depth.clone(),
        );
        let dead_letters = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "dead_letters",
            "Messages in the dead-letter queue of a queue this process consumes (every 10 s)",
            dead_letters.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the database answers and every relay and consumer is connected (as /health/ready), else 0; measured at scrape time",
            ready.clone(),
        );
        Metrics {
            ready,
            queue_depth,
            dead_letters,
            relay_publish,
            http_requests,
            http_duration,
            registry: Arc::new(registry),
            published,
            consumed,
            batches,
            one_statement,
            batched,
            saga_duration,
            outbox_backlog,
            outbox_oldest_age,
        }
    }
}

fn schema(schema: &str) -> SchemaLabel {
    SchemaLabel {
        schema: schema.to_owned(),
    }
}

impl Metrics {
    pub fn published(&self, from_schema: &str, count: usize) {
        self.published
            .get_or_create(&schema(from_schema))
            .inc_by(count as u64);
    }

    pub fn consumed(&self, queue: &str, outcome: &str) {
        let labels = ConsumedLabels {
            queue: queue.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.consumed.get_or_create(&labels).inc();
    }

    /// An attempt at a batch of `size` deliveries of `queue`: `committed`, `retried` (rolled
    /// back for a poison message, tried again without it) or `split` (applied one by one).
    pub fn consumer_batch(&self, queue: &str, size: usize, outcome: &str) {
        let labels = ConsumedLabels {
            queue: queue.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.batches.get_or_create(&labels).inc();
        if outcome == "committed" {
            let queue = QueueLabel {
                queue: queue.to_owned(),
            };
            self.batched.get_or_create(&queue).inc_by(size as u64);
        }
    }

    /// A delivery of `queue` tried in one statement: `applied`, `not_applicable` or `failed`.
    pub fn consumer_one_statement(&self, queue: &str, outcome: &str) {
        let labels = ConsumedLabels {
            queue: queue.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.one_statement.get_or_create(&labels).inc();
    }

    pub fn relay_published(&self, from_schema: &str, seconds: f64) {
        self.relay_publish
            .get_or_create(&schema(from_schema))
            .observe(seconds);
    }

    pub fn http_answered(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let labels = HttpLabels {
            route: route.to_owned(),
            method: method.to_owned(),
            status: status.to_string(),
        };
        self.http_requests.get_or_create(&labels).inc();
        let route = HttpRouteLabels {
            route: labels.route,
            method: labels.method,
        };
        self.http_duration.get_or_create(&route).observe(seconds);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// What the broker says of `queue` and its dead-letter queue.
    pub fn queue_measured(&self, queue: &str, ready: u32, dead_letters: u32) {
        let label = QueueLabel {
            queue: queue.to_owned(),
        };
        self.queue_depth.get_or_create(&label).set(i64::from(ready));
        self.dead_letters
            .get_or_create(&label)
            .set(i64::from(dead_letters));
    }

    pub fn saga_settled(&self, seconds: f64) {
        self.saga_duration.observe(seconds);
    }

    pub fn outbox_backlog(&self, of_schema: &str, unsent: i64, oldest_age_secs: f64) {
        self.outbox_backlog
            .get_or_create(&schema(of_schema))
            .set(unsent);
        self.outbox_oldest_age
            .get_or_create(&schema(of_schema))
            .set(oldest_age_secs);
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
