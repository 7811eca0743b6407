//! The process wiring, the only module that knows both contexts: which contexts a role runs,
//! how they start and stop, and the command line that drives them.

pub mod cli;
pub mod config;
pub mod contexts;
pub mod routes;

use std::time::Duration;

use anyhow::Context as _;
use poem::Server;
use poem::listener::TcpAcceptor;
use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::cli::{DlqAction, DlqQueue, Role};
use crate::app::config::Settings;
use crate::app::contexts::{BoundedContext, Workers};
use crate::app::routes::Observed;
use crate::db;
use crate::messaging::amqp::Broker;
use crate::messaging::dlq;
use crate::ops::audit;
use crate::ops::metrics::Metrics;
use crate::ops::telemetry::mask_password;
use crate::web::auth::Claims;
use crate::web::listener::GuardedAcceptor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// How long in-flight HTTP requests and message handlers get to finish on shutdown.
const GRACE: Duration = Duration::from_secs(8);

pub struct Application {
    port: u16,
    db: DatabaseConnection,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    workers: JoinSet<()>,
}

/// Connects to the database (creating it if needed) and applies the role's migrations; with
/// `--skip-migrations`, only connects.
pub async fn connect_and_migrate(
    settings: &Settings,
    role: Role,
) -> anyhow::Result<DatabaseConnection> {
    let (url, pool) = (&settings.database_url, settings.db_pool());
    // A database that does not answer yet (starting, or slow to resolve) is waited for with
    // backoff, saying so now and then; one that refuses (a wrong password, no such database
    // with --skip-migrations) ends the start.
    let mut delays = crate::kernel::backoff::Delays::new();
    let (mut attempts, mut said) = (0u32, std::time::Instant::now());
    let db = loop {
        let connected = if settings.skip_migrations {
            db::connect_existing(url, pool).await
        } else {
            db::connect(url, pool).await
        };
        match connected {
            Ok(db) => break db,
            Err(error) if db::is_unavailable(&error) && !db::is_refusal(&error) => {
                attempts += 1;
                if attempts == 1 || said.elapsed() >= Duration::from_secs(15) {
                    said = std::time::Instant::now();
                    tracing::warn!(database = %mask_password(url), attempts, %error, "the database does not answer yet; waiting");
                }
                tokio::time::sleep(delays.next_delay()).await;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("connecting to {}", mask_password(url)));
            }
        }
    };
    if settings.skip_migrations {
        return Ok(db);
    }
    for context in role.contexts() {
        migrations::migrate(&db, context.migrations)
            .await
            .with_context(|| format!("migrating the {} schema", context.schema()))?;
    }
    Ok(db)
}

/// `gozon migrate`: the role's migrations, then DML grants to the roles that serve each context.
pub async fn migrate(
    settings: &Settings,
    role: Role,
    db_roles: &[(&BoundedContext, Option<&str>)],
) -> anyhow::Result<()> {
    // Migrating is this command's purpose, whatever GOZON_SKIP_MIGRATIONS says for serving;
    // it needs a connection or two, not the serving pool.
    let settings = Settings {
        skip_migrations: false,
        db_max_connections: 2,
        db_min_connections: Some(1),
        ..settings.clone()
    };
    let db = connect_and_migrate(&settings, role).await?;
    for (context, db_role) in db_roles {
        if let Some(db_role) = db_role {
            migrations::grant_dml(&db, context.migrations, db_role)
                .await
                .with_context(|| format!("granting {} to {db_role}", context.schema()))?;
            tracing::info!(schema = context.schema(), db_role, "granted DML");
        }
    }
    tracing::info!(?role, "migrations applied");
    Ok(())
}

/// The broker as `role` uses it: every queue of the system is known (where messages go), the
/// role's own are declared (see [`Broker::new`]).
pub fn broker(settings: &Settings, role: Role) -> anyhow::Result<Broker> {
    let queues = contexts::ALL.iter().map(|context| context.consumes);
    let owned = role.contexts().into_iter().map(|context| context.consumes);
    Ok(Broker::new(
        settings.broker()?,
        queues.collect(),
        owned.collect(),
    ))
}

impl Application {
    /// Migrates, binds the HTTP port and starts the role's relays and consumers. The broker
    /// need not be up: relays and consumers connect in the background and keep retrying.
    pub async fn build(settings: &Settings, role: Role) -> anyhow::Result<Application> {
        tracing::info!(?role, settings = ?settings, "starting gozon");
        settings.check_exposure()?;
        settings.check_message_keys()?;
        let authenticator = settings.authenticator(role != Role::Payments)?;
        let db = connect_and_migrate(settings, role).await?;
        let metrics = Metrics::default();
        let broker = broker(settings, role)?.with_metrics(metrics.clone());
        let shutdown = CancellationToken::new();
        let mut workers = Workers {
            tasks: JoinSet::new(),
            duties: Vec::new(),
            settings,
            db: &db,
            broker: &broker,
            metrics: &metrics,
            shutdown: &shutdown,
        };
        let contexts = role.contexts();
        let apis = contexts
            .iter()
            .map(|context| (context.name, context.start(&mut workers)))
            .collect();
        let duties = std::mem::take(&mut workers.duties);
        let workers = workers.tasks;
        let observed = Observed {
            db: db.clone(),
            links: broker.links().clone(),
            duties,
            metrics,
            schemas: contexts.iter().map(|context| context.schema()).collect(),
        };
        let guards = routes::Guards {
            authenticator,
            post_limits: settings.post_limits(),
            request_timeout: Duration::from_secs(settings.http_request_timeout_secs),
        };
        let routes = routes::routes(observed, apis, guards, page_folder(settings, role));
        let (port, server) = serve(settings, routes, &shutdown).await?;
        tracing::info!(port, ?role, "listening");
        Ok(Application {
            port,
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

/// The web page's folder, for the role that serves it (`all`), when it exists.
fn page_folder(settings: &Settings, role: Role) -> Option<std::path::PathBuf> {
    let dir = (role == Role::All).then(|| settings.static_dir.clone())?;
    if !dir.is_dir() {
        tracing::warn!(dir = %dir.display(), "static folder not found; the web page is not served");
    }
    Some(dir)
}

/// Binds the HTTP address and serves `routes` until `shutdown`, then drains within [`GRACE`].
async fn serve(
    settings: &Settings,
    routes: impl poem::Endpoint + 'static,
    shutdown: &CancellationToken,
) -> anyhow::Result<(u16, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| format!("binding {}", settings.http_addr))?;
    let port = listener.local_addr()?.port();
    let stop = shutdown.clone();
    let max_connections = settings.http_max_connections as usize;
    let read_timeout = Duration::from_secs(settings.http_request_read_timeout_secs);
    let idle_timeout = Duration::from_secs(settings.http_idle_timeout_secs);
    let server = tokio::spawn(async move {
        let acceptor = TcpAcceptor::from_tokio(listener)?;
        let acceptor = GuardedAcceptor::new(acceptor, max_connections, read_timeout);
        Server::new_with_acceptor(acceptor)
            .idle_timeout(idle_timeout)
            .run_with_graceful_shutdown(routes, stop.cancelled_owned(), Some(GRACE))
            .await
    });
    Ok((port, server))
}

/// `gozon audit`: prints the report; an error when an invariant is broken.
pub async fn audit(database_url: &str, settings: &audit::AuditSettings) -> anyhow::Result<()> {
    let db = db::connect_existing(database_url, db::PoolSize::on_demand(2)).await?;
    let report = audit::audit(&db, settings).await?;
    println!("{report}");
    if !report.passed() {
        anyhow::bail!("broken invariants: {}", report.failed_checks().join("; "));
    }
    Ok(())
}

/// `gozon token`: `claims`, signed with the HS256 `secret` or the PEM `private_key` (RS256 or
/// ES256), naming `kid` in its header when given (as an identity provider's tokens do).
pub fn mint_token(
    claims: &Claims,
    secret: Option<&str>,
    private_key: Option<&std::path::Path>,
    kid: Option<&str>,
) -> anyhow::Result<String> {
    let (key, algorithm) = match (secret, private_key) {
        (_, Some(path)) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            match EncodingKey::from_rsa_pem(&pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => (EncodingKey::from_ec_pem(&pem)?, Algorithm::ES256),
            }
        }
        (Some(secret), None) => (
            EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        ),
        (None, None) => anyhow::bail!("set GOZON_JWT_SECRET or --jwt-private-key"),
    };
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

/// `gozon broker-permissions`: the rights of `context`'s broker user.
pub fn broker_permissions(context: DlqQueue, prefix: &str) -> crate::messaging::amqp::Permissions {
    let (own, peer) = match context {
        DlqQueue::Orders => (&contexts::ORDERS, &contexts::PAYMENTS),
        DlqQueue::Payments => (&contexts::PAYMENTS, &contexts::ORDERS),
    };
    crate::messaging::amqp::permissions(prefix, own.name, &[peer.name])
}

/// `gozon dlq list|replay`: prints one line per dead letter.
pub async fn dead_letters(action: DlqAction) -> anyhow::Result<()> {
    let queue_of = |queue: DlqQueue| -> (&'static BoundedContext, Role) {
        match queue {
            DlqQueue::Payments => (&contexts::PAYMENTS, Role::Payments),
            DlqQueue::Orders => (&contexts::ORDERS, Role::Orders),
        }
    };
    let (letters, verb) = match action {
        DlqAction::List {
            queue,
            limit,
            settings,
        } => {
            let (context, role) = queue_of(queue);
            (
                dlq::list(&broker(&settings, role)?, &context.consumes, limit).await?,
                "dead letter",
            )
        }
        DlqAction::Replay {
            queue,
            limit,
            message_id,
            settings,
        } => {
            let (context, role) = queue_of(queue);
            let (broker, queue) = (broker(&settings, role)?, context.consumes);
            let replayed = dlq::replay(&broker, &queue, limit, message_id.as_deref()).await?;
            (replayed, "replayed")
        }
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
