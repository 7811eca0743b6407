//! The application: which parts a role runs, how they start, and how they stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use poem::Server;
use poem::listener::TcpAcceptor;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{DlqAction, DlqQueue, Role};
use crate::config::Settings;
use crate::messaging::amqp::{Broker, QueueSpec};
use crate::messaging::consumer::{self, Handler};
use crate::messaging::dlq;
use crate::messaging::outbox::{Housekeeper, Relay};
use crate::metrics::Metrics;
use crate::orders::api::OrdersApi;
use crate::orders::events::OrderEvents;
use crate::orders::saga::PaymentResultHandler;
use crate::payments::api::PaymentsApi;
use crate::payments::handler::PaymentRequestHandler;
use crate::{db, http, orders, payments};

/// How long in-flight HTTP requests and message handlers get to finish on shutdown.
const GRACE: Duration = Duration::from_secs(8);

pub struct Application {
    port: u16,
    db: DatabaseConnection,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    workers: JoinSet<()>,
}

/// Connects to the database (creating it if needed) and applies the role's migrations.
pub async fn connect_and_migrate(
    settings: &Settings,
    role: Role,
) -> anyhow::Result<DatabaseConnection> {
    let db = db::connect(&settings.database_url, settings.db_max_connections)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                crate::config::mask_password(&settings.database_url)
            )
        })?;
    if role.runs_orders() {
        migrations::migrate(&db, migrations::Context::Orders)
            .await
            .context("migrating the orders schema")?;
    }
    if role.runs_payments() {
        migrations::migrate(&db, migrations::Context::Payments)
            .await
            .context("migrating the payments schema")?;
    }
    Ok(db)
}

/// Every queue of the system: each process declares them all (see [`Broker::new`]).
pub fn broker(settings: &Settings) -> Broker {
    Broker::new(
        settings.broker(),
        vec![payments::PAYMENT_REQUESTS, orders::PAYMENT_RESULTS],
    )
}

impl Application {
    /// Migrates, binds the HTTP port and starts the role's relays and consumers. The broker
    /// need not be up: relays and consumers connect in the background and keep retrying.
    pub async fn build(settings: &Settings, role: Role) -> anyhow::Result<Application> {
        tracing::info!(?role, settings = ?settings, "starting gozon");
        if settings.message_key == crate::messaging::signing::DEVELOPMENT_KEY {
            tracing::warn!(
                "GOZON_MESSAGE_KEY is not set: messages are signed with the public development key"
            );
        }
        let db = connect_and_migrate(settings, role).await?;
        let metrics = Metrics::default();
        let broker = broker(settings).with_metrics(metrics.clone());
        let shutdown = CancellationToken::new();
        let mut workers = Workers {
            tasks: JoinSet::new(),
            settings,
            db: &db,
            broker: &broker,
            shutdown: &shutdown,
        };

        let orders_api = role.runs_orders().then(|| {
            let relay_wake = Arc::new(Notify::new());
            let handler = PaymentResultHandler::new(db.clone(), metrics.clone());
            workers.messaging(
                orders::SCHEMA,
                orders::PAYMENT_RESULTS,
                &relay_wake,
                handler,
            );
            let events = OrderEvents::default();
            workers
                .tasks
                .spawn(events.clone().run(db.clone(), shutdown.clone()));
            OrdersApi::new(db.clone(), relay_wake, events, shutdown.clone())
        });
        let payments_api = role.runs_payments().then(|| {
            let relay_wake = Arc::new(Notify::new());
            let handler = PaymentRequestHandler::new(db.clone(), relay_wake.clone());
            workers.messaging(
                payments::SCHEMA,
                payments::PAYMENT_REQUESTS,
                &relay_wake,
                handler,
            );
            PaymentsApi::new(db.clone())
        });
        let workers = workers.tasks;

        let static_dir = (role == Role::All).then(|| settings.static_dir.clone());
        if let Some(dir) = static_dir.as_ref().filter(|dir| !dir.is_dir()) {
            tracing::warn!(dir = %dir.display(), "static folder not found; the web page is not served");
        }
        let mut schemas = Vec::new();
        if role.runs_orders() {
            schemas.push(orders::SCHEMA);
        }
        if role.runs_payments() {
            schemas.push(payments::SCHEMA);
        }
        let observed = http::Observed {
            db: db.clone(),
            links: broker.links().clone(),
            metrics,
            schemas,
        };
        let routes = http::routes(observed, orders_api, payments_api, static_dir);

        let listener = tokio::net::TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding {}", settings.http_addr))?;
        let address = listener.local_addr()?;
        let server_stop = shutdown.clone();
        let server = tokio::spawn(async move {
            Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?)
                .run_with_graceful_shutdown(routes, server_stop.cancelled_owned(), Some(GRACE))
                .await
        });
        tracing::info!(%address, ?role, "listening");
        Ok(Application {
            port: address.port(),
            db,
            shutdown,
            server,
            workers,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Cancel it to stop the application gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled, then stops taking requests and deliveries,
    /// lets in-flight work finish (within [`GRACE`]) and closes broker channels.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let server_result = (&mut self.server).await;
        self.shutdown.cancel();
        let drained = tokio::time::timeout(GRACE, async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("workers did not stop in time; aborting them");
            self.workers.abort_all();
        }
        self.db.close_by_ref().await.ok();
        server_result.context("the HTTP server task panicked")??;
        tracing::info!("stopped");
        Ok(())
    }
}

/// `gozon dlq list|replay`: prints one line per dead letter.
pub async fn dead_letters(action: DlqAction) -> anyhow::Result<()> {
    let queue_of = |queue: DlqQueue| match queue {
        DlqQueue::Payments => payments::PAYMENT_REQUESTS,
        DlqQueue::Orders => orders::PAYMENT_RESULTS,
    };
    let (letters, verb) = match action {
        DlqAction::List {
            queue,
            limit,
            settings,
        } => (
            dlq::list(&broker(&settings), &queue_of(queue), limit).await?,
            "dead letter",
        ),
        DlqAction::Replay {
            queue,
            limit,
            message_id,
            settings,
        } => (
            dlq::replay(
                &broker(&settings),
                &queue_of(queue),
                limit,
                message_id.as_deref(),
            )
            .await?,
            "replayed",
        ),
    };
    for letter in &letters {
        println!(
            "{verb}: id={} type={} reason={} routing_key={} body={}",
            letter.message_id.as_deref().unwrap_or("-"),
            letter.message_type.as_deref().unwrap_or("-"),
            letter.reason.as_deref().unwrap_or("-"),
            letter.routing_key.as_deref().unwrap_or("-"),
            letter.body
        );
    }
    println!("{} message(s)", letters.len());
    Ok(())
}

/// The background tasks of a role, and what they share.
struct Workers<'a> {
    tasks: JoinSet<()>,
    settings: &'a Settings,
    db: &'a DatabaseConnection,
    broker: &'a Broker,
    shutdown: &'a CancellationToken,
}

impl Workers<'_> {
    /// A context's messaging: the relay and housekeeper of its outbox, the consumer of its queue.
    fn messaging<H: Handler>(
        &mut self,
        schema: &'static str,
        queue: QueueSpec,
        relay_wake: &Arc<Notify>,
        handler: H,
    ) {
        let (db, broker, shutdown) = (self.db.clone(), self.broker.clone(), self.shutdown.clone());
        let relay = Relay::new(
            db.clone(),
            schema,
            broker.clone(),
            relay_wake.clone(),
            self.settings.relay(),
        );
        self.tasks.spawn(relay.run(shutdown.clone()));
        let housekeeper = Housekeeper::new(db, schema, self.settings.housekeeping());
        self.tasks.spawn(housekeeper.run(shutdown.clone()));
        let consumer = consumer::run(
            broker,
            queue,
            Arc::new(handler),
            self.settings.consumer(),
            shutdown,
        );
        self.tasks.spawn(consumer);
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT: shutting down"),
            _ = terminate => tracing::info!("SIGTERM: shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
}
