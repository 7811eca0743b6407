//! The bounded contexts as the wiring sees them: one descriptor each (schema and migrator, the
//! queue it consumes, how it starts), iterated over by everything that runs a role.

use std::sync::Arc;
use std::time::Duration;

use poem::IntoEndpoint;
use poem::endpoint::BoxEndpoint;
use poem_openapi::OpenApiService;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::config::Settings;
use crate::app::routes::{TITLE, VERSION};
use crate::kernel::duty::Duty;
use crate::messaging::amqp::{Broker, QueueSpec};
use crate::messaging::consumer::{Consumer, Handler};
use crate::messaging::outbox::{Housekeeper, Relay};
use crate::ops::metrics::Metrics;
use crate::orders::api::OrdersApi;
use crate::orders::events::OrderEvents;
use crate::orders::saga::{self, SagaHandler};
use crate::payments::api::PaymentsApi;
use crate::payments::handler::PaymentRequestHandler;
use crate::web::idempotency;
use crate::{orders, payments};

/// A bounded context, as the process wiring needs to know it.
pub struct BoundedContext {
    pub name: &'static str,
    /// Its schema and the migrator that builds it.
    pub migrations: migrations::Context,
    /// The queue it consumes.
    pub consumes: QueueSpec,
    /// Starts its background work (outbox relay, consumer, housekeeping and its own) and
    /// returns its HTTP API, served under `/api`.
    start: fn(&mut Workers<'_>) -> BoxEndpoint<'static>,
}

impl BoundedContext {
    pub fn schema(&self) -> &'static str {
        self.migrations.schema()
    }

    pub fn start(&self, workers: &mut Workers<'_>) -> BoxEndpoint<'static> {
        (self.start)(workers)
    }
}

pub const ORDERS: BoundedContext = BoundedContext {
    name: "orders",
    migrations: migrations::Context::Orders,
    consumes: orders::PAYMENT_RESULTS,
    start: |workers| {
        let relay_wake = Arc::new(Notify::new());
        let handler = SagaHandler::new(workers.metrics.clone(), relay_wake.clone());
        workers.messaging(&ORDERS, &relay_wake, handler);
        let timeout = Duration::from_secs(workers.settings.payment_timeout_secs);
        let interval = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let sweeper = saga::sweep_overdue(
            workers.db.clone(),
            timeout,
            interval,
            workers.shutdown.clone(),
        );
        workers.tasks.spawn(sweeper);
        let events = OrderEvents::new(workers.settings.stream_limits());
        workers.duties.push(events.duty());
        let listener = events
            .clone()
            .run(workers.db.clone(), workers.shutdown.clone());
        workers.tasks.spawn(listener);
        let cap = workers.settings.max_new_orders_per_user;
        let api = OrdersApi::new(
            workers.db.clone(),
            (cap > 0).then_some(cap),
            relay_wake,
            events,
            workers.shutdown.clone(),
        );
        OpenApiService::new(api, TITLE, VERSION).into_endpoint()
    },
};

pub const PAYMENTS: BoundedContext = BoundedContext {
    name: "payments",
    migrations: migrations::Context::Payments,
    consumes: payments::PAYMENT_REQUESTS,
    start: |workers| {
        let relay_wake = Arc::new(Notify::new());
        let handler = PaymentRequestHandler::new(relay_wake.clone());
        workers.messaging(&PAYMENTS, &relay_wake, handler);
        let api = PaymentsApi::new(workers.db.clone());
        OpenApiService::new(api, TITLE, VERSION).into_endpoint()
    },
};

/// Every context of the system.
pub const ALL: [&BoundedContext; 2] = [&ORDERS, &PAYMENTS];

/// The background tasks of a process, and what they share.
pub struct Workers<'a> {
    pub tasks: JoinSet<()>,
    /// What readiness waits for besides the database and the broker links.
    pub duties: Vec<Duty>,
    pub settings: &'a Settings,
    pub db: &'a DatabaseConnection,
    pub broker: &'a Broker,
    pub metrics: &'a Metrics,
    pub shutdown: &'a CancellationToken,
}

impl Workers<'_> {
    /// A context's messaging: the relay and housekeeper of its outbox, the consumer of its
    /// queue, and the purge of its Idempotency-Keys.
    fn messaging<H: Handler>(
        &mut self,
        context: &BoundedContext,
        relay_wake: &Arc<Notify>,
        handler: H,
    ) {
        let (db, schema, shutdown) = (self.db, context.schema(), self.shutdown);
        let relay = Relay::new(
            db.clone(),
            schema,
            self.broker.clone(),
            relay_wake.clone(),
            self.settings.relay(),
        );
        self.tasks.spawn(relay.run(shutdown.clone()));
        let housekeeper = Housekeeper::new(db.clone(), schema, self.settings.housekeeping());
        self.tasks.spawn(housekeeper.run(shutdown.clone()));
        let purge = idempotency::purge_expired_until(
            db.clone(),
            schema,
            self.settings.housekeeping().interval,
            shutdown.clone(),
        );
        self.tasks.spawn(purge);
        let settings = self.settings.consumer();
        let handler = Arc::new(handler);
        // Every lane is read, each over its links: the lane a relay sends on is read whichever
        // node is lost. The concurrency is per link and lane: a relay sends on one lane at a time.
        for lane in 0..self.broker.lanes() {
            for link in 0..settings.links {
                let consumer = Consumer {
                    broker: self.broker.for_lane(&context.consumes, lane, link),
                    queue: context.consumes,
                    db: db.clone(),
                    schema,
                    handler: handler.clone(),
                    settings: settings.clone(),
                    link,
                    lane,
                };
                self.tasks.spawn(consumer.run(shutdown.clone()));
            }
        }
    }
}
