//! Settings: defaults that work against a local PostgreSQL and RabbitMQ, overridden by
//! environment variables, overridden by flags. Parsed and checked once, at start.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::db::{PoolSize, SessionLimits};
use std::str::FromStr as _;

use crate::messaging::amqp::{BrokerNode, BrokerSettings};
use crate::messaging::consumer::ConsumerSettings;
use crate::messaging::outbox::{HousekeepingSettings, RelaySettings};
use crate::messaging::signing::{self, Keyring, MessageKey};
use crate::ops::telemetry::{LogFormat, mask_password};
use crate::orders::events::StreamLimits;
use crate::web::auth::{self, Authenticator, JwtRules, TokenKeys};
use crate::web::edge::PostLimits;
use crate::web::jwks::Jwks;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/gozon";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Args, Clone)]
pub struct Settings {
    /// PostgreSQL URL; the database is created if it does not exist.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Do not create the database or apply migrations on start: `gozon migrate` ran them, as
    /// the schemas' owner, and this process connects with DML rights only.
    #[arg(long, env = "GOZON_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,

    /// Threads the async runtime runs tasks on (0: one per core, tokio's default). On a box
    /// whose cores PostgreSQL and RabbitMQ share, one thread costs less CPU per order (fewer
    /// hand-offs between threads; README, Performance) and serves fewer reads at once.
    #[arg(long, env = "GOZON_WORKER_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub worker_threads: u16,

    /// Most connections this process opens to PostgreSQL.
    #[arg(long, env = "GOZON_DB_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub db_max_connections: u32,

    /// Connections opened at start and kept open; the maximum if absent. A pool that opens its
    /// connections only when load arrives stalls the first burst while it connects (TLS and
    /// authentication for each), so by default the whole pool is ready before traffic is.
    #[arg(long, env = "GOZON_DB_MIN_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_min_connections: Option<u32>,

    /// Seconds a connection to PostgreSQL may take to open (and a request to wait for one).
    #[arg(long, env = "GOZON_DB_CONNECT_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub db_connect_timeout_secs: u64,

    /// Milliseconds a statement of a serving session may run (PostgreSQL's statement_timeout);
    /// Gozon itself gives a unit of database work 2 s more before it drops it.
    #[arg(long, env = "GOZON_DB_STATEMENT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub db_statement_timeout_ms: u64,

    /// Milliseconds a serving session may sit idle inside a transaction before the server ends
    /// it (idle_in_transaction_session_timeout): a client gone mid-transaction releases its
    /// locks. Longer than a relay's wait for broker confirms (--amqp-timeout-ms).
    #[arg(long, env = "GOZON_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub db_idle_in_transaction_timeout_ms: u64,

    /// Seconds of silence after which the server probes a serving session's client with TCP
    /// keepalives (three probes, half this apart).
    #[arg(long, env = "GOZON_DB_KEEPALIVE_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub db_keepalive_secs: u64,

    /// RabbitMQ: one URL, several comma separated (one per node of a cluster), or one URL with
    /// several hosts (`amqp://user:pass@node1:5672,node2:5672,node3:5672/%2f`). Each
    /// connection starts at the node this instance prefers and moves to the next on failure.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    /// Seconds between AMQP heartbeats (0: off). A connection that hears nothing for two of
    /// them is given up, so a node that vanishes silently is noticed.
    #[arg(long, env = "GOZON_AMQP_HEARTBEAT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=600))]
    pub amqp_heartbeat_secs: u16,

    /// Milliseconds a connection attempt to one broker node may take before the next node is
    /// tried.
    #[arg(long, env = "GOZON_AMQP_CONNECT_TIMEOUT_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub amqp_connect_timeout_ms: u64,

    /// Milliseconds a connection attempt has to one node before the next node is tried beside
    /// it (the first to answer wins): what a silent node costs a reconnect.
    #[arg(long, env = "GOZON_AMQP_CONNECT_STAGGER_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    pub amqp_connect_stagger_ms: u64,

    /// Members of each quorum queue at its creation (capped by the cluster's size).
    #[arg(long, env = "GOZON_AMQP_QUORUM_SIZE", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub amqp_quorum_size: u16,

    /// Where a new quorum queue's leader goes: `least-leaders` spreads the queues' leaders over
    /// the nodes (RabbitMQ 3.10-3.12; 3.13+ reads it as `balanced`), `client-local` puts it on
    /// the declaring connection's node.
    #[arg(
        long,
        env = "GOZON_AMQP_LEADER_LOCATOR",
        default_value = "least-leaders"
    )]
    pub amqp_leader_locator: String,

    /// Quorum queues (lanes) each consumed queue is made of, each led by another node (0: two
    /// when AMQP_URL names several nodes, else one). Every lane is consumed; a relay publishes
    /// to one and, when it stops confirming (its leader lost, none elected yet), sends on
    /// through the next, so an order waits for a confirm timeout, not for a leader election.
    #[arg(long, env = "GOZON_AMQP_QUEUE_LANES", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=3))]
    pub amqp_queue_lanes: u16,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "GOZON_AMQP_PREFIX", default_value = "gozon")]
    pub amqp_prefix: String,

    /// Secret shared by every Gozon process, used to sign and check messages (HMAC-SHA256).
    #[arg(long, env = "GOZON_MESSAGE_KEY", default_value = signing::DEVELOPMENT_KEY, hide_default_value = true)]
    pub message_key: String,

    /// Keys that signed messages before the current one, comma separated: still accepted, so
    /// messages in flight or in dead-letter queues survive a rotation. Never used to sign.
    #[arg(
        long,
        env = "GOZON_MESSAGE_KEY_PREVIOUS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub message_key_previous: Vec<String>,

    /// Deliveries of one message before it is dead-lettered.
    #[arg(long, env = "GOZON_DELIVERY_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub delivery_limit: u32,

    /// Deliveries a consumer handles at once (each in its own transaction).
    #[arg(long, env = "GOZON_CONSUMER_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub consumer_concurrency: u16,

    /// Most deliveries a consumer applies in one transaction (1: each in its own). A batch is
    /// what has already arrived when a handler is free: none is waited for.
    #[arg(long, env = "GOZON_CONSUMER_BATCH", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub consumer_batch: u16,

    /// Connections each consumer reads each lane of its queue over, each to another broker node,
    /// from the node that leads the lane (0: two when AMQP_URL names several nodes, else one). The concurrency and prefetch are shared among
    /// them. While one node is lost or silent the others keep consuming, and the broker
    /// hands what it had sent the lost link to the rest once it notices.
    #[arg(long, env = "GOZON_CONSUMER_LINKS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=8))]
    pub consumer_links: u16,

    /// Unacknowledged deliveries a consumer holds at once.
    #[arg(long, env = "GOZON_PREFETCH", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Deletes queues unused for this many seconds. Only for throw-away environments (tests):
    /// messages in an expired queue are lost.
    #[arg(long, env = "GOZON_QUEUE_EXPIRES_SECS", hide = true)]
    pub queue_expires_secs: Option<u64>,

    /// How long, in milliseconds, a relay first waits for a batch's publisher confirms before
    /// it sends the batch again over a new connection (doubled after each wait that runs out,
    /// up to --amqp-timeout-ms; back to this once a batch is confirmed).
    #[arg(long, env = "GOZON_AMQP_CONFIRM_PATIENCE_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub amqp_confirm_patience_ms: u64,

    /// Bound, in milliseconds, on each broker round trip (connect, declare, confirm, ack).
    #[arg(long, env = "GOZON_AMQP_TIMEOUT_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub amqp_timeout_ms: u64,

    /// How often, in milliseconds, a relay looks at its outbox when nothing woke it.
    #[arg(long, env = "GOZON_OUTBOX_POLL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub outbox_poll_ms: u64,

    /// Rows an outbox relay publishes per transaction.
    #[arg(long, env = "GOZON_OUTBOX_BATCH", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub outbox_batch: u32,

    /// Sent outbox rows are deleted after this many seconds.
    #[arg(long, env = "GOZON_OUTBOX_RETENTION_SECS", default_value_t = 86_400)]
    pub outbox_retention_secs: u64,

    /// Inbox records (which message ids a consumer applied) are deleted after this many seconds.
    #[arg(long, env = "GOZON_INBOX_RETENTION_SECS", default_value_t = 7 * 86_400)]
    pub inbox_retention_secs: u64,

    /// How often, in milliseconds, sent outbox rows are purged and the backlog is measured.
    #[arg(long, env = "GOZON_OUTBOX_HOUSEKEEPING_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub outbox_housekeeping_ms: u64,

    /// Address the HTTP server listens on. Loopback by default: serving other hosts is a
    /// choice (and without authentication, an explicit one: see `--auth`).
    #[arg(long, env = "GOZON_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,

    /// Folder of the web page served at `/` by `--role all`.
    #[arg(long, env = "GOZON_STATIC_DIR", default_value = "static")]
    pub static_dir: PathBuf,

    /// Log lines as text or as JSON objects.
    #[arg(long, env = "GOZON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Export traces over OTLP/HTTP to this base URL (an OpenTelemetry collector, e.g.
    /// `http://collector:4318`); off if absent. The standard variables are honoured too:
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME,
    /// OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_SDK_DISABLED.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Who may call the API: `none` (anyone acts for any user: the demo) or `jwt` (a bearer
    /// token's `sub` is the only user a call acts for). Unset means `none`, which is refused on
    /// a listener other hosts can reach: serving them without authentication must be chosen
    /// (`--auth none`, GOZON_AUTH=none).
    #[arg(long, env = "GOZON_AUTH", value_enum)]
    pub auth: Option<AuthMode>,

    /// With `--auth jwt`: the HS256 secret tokens are signed with (at least 32 bytes).
    #[arg(long, env = "GOZON_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// With `--auth jwt`: a PEM public key (RSA for RS256, EC P-256 for ES256) to check tokens
    /// with, instead of a secret.
    #[arg(long, env = "GOZON_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// With `--auth jwt`: the identity provider's JWKS URL (Keycloak:
    /// `https://HOST/realms/REALM/protocol/openid-connect/certs`); RS256 and ES256 keys, picked
    /// by the token's `kid`, cached and refetched when a token names an unknown one.
    #[arg(long, env = "GOZON_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// With `--auth jwt`: the `iss` every token must carry (required with a public key or JWKS;
    /// Keycloak: `https://HOST/realms/REALM`).
    #[arg(long, env = "GOZON_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// With `--auth jwt`: a value the token's `aud` must hold (required with a public key or
    /// JWKS: the client id the provider issues Gozon's tokens for).
    #[arg(long, env = "GOZON_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// With `--auth jwt`: the longest lifetime a token may have (`exp` - `iat`, and from now).
    #[arg(long, env = "GOZON_JWT_MAX_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub jwt_max_ttl: Duration,

    /// Seconds between two fetches of the JWKS prompted by unknown key ids (however many arrive).
    #[arg(
        long,
        env = "GOZON_JWT_JWKS_MIN_REFRESH_SECS",
        default_value_t = 5,
        hide = true
    )]
    pub jwt_jwks_min_refresh_secs: u64,

    /// With `--auth jwt`: the key event-stream tickets are signed with (32+ bytes); required
    /// with a public key or JWKS on the roles that serve event streams (orders, all); with
    /// GOZON_JWT_SECRET, a key derived from that secret is used unless this is set. Give it to
    /// the orders role only.
    #[arg(long, env = "GOZON_EVENTS_TICKET_KEY", hide_env_values = true)]
    pub events_ticket_key: Option<String>,

    /// Proxies whose `X-Forwarded-For` names the client (the gateway, the Ingress), as CIDR
    /// ranges, comma separated; the per-client limit keys on that address. None by default:
    /// the TCP peer is the client.
    #[arg(long, env = "GOZON_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<IpNet>,

    /// Most HTTP connections open at once; further ones wait to be accepted.
    #[arg(long, env = "GOZON_HTTP_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,

    /// Seconds a request may take to arrive once its first byte has (slow clients are cut off).
    #[arg(long, env = "GOZON_HTTP_REQUEST_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_request_read_timeout_secs: u64,

    /// Seconds a connection may stay silent both ways before it is closed.
    #[arg(long, env = "GOZON_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_idle_timeout_secs: u64,

    /// Seconds a handler may take to answer (503 `request_timeout` past it).
    #[arg(long, env = "GOZON_HTTP_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_request_timeout_secs: u64,

    /// POSTs per second one client address may make (bursts of twice that); 0 for no limit.
    #[arg(long, env = "GOZON_RATE_LIMIT_PER_CLIENT", default_value_t = 2_000)]
    pub rate_limit_per_client: u32,

    /// POSTs per second for one `user_id` (bursts of twice that); 0 for no limit.
    #[arg(long, env = "GOZON_RATE_LIMIT_PER_USER", default_value_t = 100)]
    pub rate_limit_per_user: u32,

    /// An order still NEW (no answer from Payments) after this many seconds is cancelled
    /// (reason payment_timeout); a debit that lands later is refunded.
    #[arg(long, env = "GOZON_PAYMENT_TIMEOUT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub payment_timeout_secs: u64,

    /// Orders one user may have NEW (awaiting payment) at once; 0 for no limit.
    #[arg(long, env = "GOZON_MAX_NEW_ORDERS_PER_USER", default_value_t = 1_000)]
    pub max_new_orders_per_user: u32,

    /// Most order event streams open at once in this process (503 past it).
    #[arg(long, env = "GOZON_EVENTS_MAX_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub events_max_streams: u32,

    /// Most order event streams one user may have open at once (429 past it).
    #[arg(long, env = "GOZON_EVENTS_MAX_STREAMS_PER_USER", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub events_max_streams_per_user: u32,

    /// Seconds after which an event stream ends (the client reconnects).
    #[arg(long, env = "GOZON_EVENTS_MAX_STREAM_SECS", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub events_max_stream_secs: u64,

    /// How long an event-stream ticket is valid, in seconds.
    #[arg(long, env = "GOZON_EVENTS_TICKET_TTL_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub events_ticket_ttl_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    None,
    Jwt,
}

/// The broker nodes `amqp_url` names, one URL each, with `heartbeat` asked for unless the URL
/// asks for its own: comma separated URLs, or one URL whose authority lists several hosts.
pub fn broker_nodes(amqp_url: &str, heartbeat: u16) -> anyhow::Result<Vec<BrokerNode>> {
    let pieces: Vec<&str> = amqp_url.split(',').map(str::trim).collect();
    let is_url = |piece: &str| piece.starts_with("amqp://") || piece.starts_with("amqps://");
    let urls: Vec<String> = if pieces.iter().all(|piece| is_url(piece)) {
        pieces.iter().map(|piece| piece.to_string()).collect()
    } else {
        // One URL, several hosts: scheme://[user@]host1,host2,.../vhost?query
        let (scheme, rest) = amqp_url
            .split_once("://")
            .ok_or_else(|| anyhow::anyhow!("AMQP_URL must start with amqp:// or amqps://"))?;
        let path_at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(path_at);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        hosts
            .split(',')
            .map(|host| format!("{scheme}://{userinfo}{}{path}", host.trim()))
            .collect()
    };
    urls.into_iter()
        .map(|url| {
            let parsed = lapin::uri::AMQPUri::from_str(&url)
                .map_err(|error| anyhow::anyhow!("{}: {error}", mask_password(&url)))?;
            let label = format!("{}:{}", parsed.authority.host, parsed.authority.port);
            let url = if url.contains("heartbeat=") {
                url
            } else {
                let separator = if url.contains('?') { '&' } else { '?' };
                format!("{url}{separator}heartbeat={heartbeat}")
            };
            Ok(BrokerNode { url, label })
        })
        .collect()
}

/// A CIDR range, or a single address (a /32 or /128).
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR range such as 10.0.0.0/8"))
}

/// The shortest HS256 secret (and ticket key) accepted.
pub const MIN_JWT_SECRET_BYTES: usize = 32;
/// How long an identity provider's keys are used before they are fetched again.
const JWKS_MAX_AGE: Duration = Duration::from_secs(300);

impl Settings {
    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            total: self.events_max_streams as usize,
            per_user: self.events_max_streams_per_user as usize,
            lifetime: Duration::from_secs(self.events_max_stream_secs),
        }
    }

    pub fn post_limits(&self) -> PostLimits {
        let rate = |per_sec: u32| (per_sec > 0).then_some(per_sec);
        PostLimits::new(
            rate(self.rate_limit_per_client),
            rate(self.rate_limit_per_user),
            self.trusted_proxies.clone(),
        )
    }

    /// The authentication mode: `none` unless `--auth` says otherwise.
    pub fn auth_mode(&self) -> AuthMode {
        self.auth.unwrap_or(AuthMode::None)
    }

    /// Refuses to serve other hosts without authentication unless that was chosen, and says
    /// so (once) whenever the API is open.
    pub fn check_exposure(&self) -> anyhow::Result<()> {
        let address = self.http_addr;
        match self.auth {
            Some(AuthMode::Jwt) => return Ok(()),
            None if !address.ip().is_loopback() => anyhow::bail!(
                "refusing to serve {address} without authentication: other hosts could act for any user; pass --auth jwt, or --auth none (GOZON_AUTH=none) to run open on purpose"
            ),
            _ => {}
        }
        tracing::warn!(
            %address,
            "--auth none: no authentication, anyone who reaches {address} acts for any user"
        );
        Ok(())
    }

    /// The checker of bearer tokens this configuration asks for; an error for a jwt mode
    /// without a usable key. `serves_events`: this process serves event streams (orders, all)
    /// and so issues and checks their tickets.
    pub fn authenticator(&self, serves_events: bool) -> anyhow::Result<Authenticator> {
        if self.auth_mode() == AuthMode::None {
            return Ok(Authenticator::open());
        }
        if self.message_key.is_empty() || self.message_key == signing::DEVELOPMENT_KEY {
            anyhow::bail!(
                "--auth jwt needs a real GOZON_MESSAGE_KEY (32+ random bytes), not the development key or an empty one"
            );
        }
        // An empty variable (compose passes one through unset) is no value.
        let given = |value: &Option<String>| value.clone().filter(|value| !value.is_empty());
        let secret = given(&self.jwt_secret);
        let ticket_secret = given(&self.events_ticket_key);
        if let Some(key) = &ticket_secret
            && key.len() < MIN_JWT_SECRET_BYTES
        {
            anyhow::bail!("GOZON_EVENTS_TICKET_KEY must be at least {MIN_JWT_SECRET_BYTES} bytes");
        }
        let jwks_url = given(&self.jwt_jwks_url);
        let keys = match (&secret, &self.jwt_public_key, &jwks_url) {
            (Some(secret), None, None) => {
                if secret.len() < MIN_JWT_SECRET_BYTES {
                    anyhow::bail!("GOZON_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes");
                }
                TokenKeys::Fixed(
                    DecodingKey::from_secret(secret.as_bytes()).into(),
                    Algorithm::HS256,
                )
            }
            (None, Some(path), None) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let (key, algorithm) = match DecodingKey::from_rsa_pem(&pem) {
                    Ok(key) => (key, Algorithm::RS256),
                    Err(_) => (
                        DecodingKey::from_ec_pem(&pem).with_context(|| {
                            format!("{} is neither an RSA nor an EC public key", path.display())
                        })?,
                        Algorithm::ES256,
                    ),
                };
                TokenKeys::Fixed(key.into(), algorithm)
            }
            (None, None, Some(url)) => TokenKeys::Provider(Jwks::new(
                url,
                JWKS_MAX_AGE,
                Duration::from_secs(self.jwt_jwks_min_refresh_secs),
            )?),
            (None, None, None) => anyhow::bail!(
                "--auth jwt needs GOZON_JWT_SECRET (HS256), --jwt-public-key or --jwt-jwks-url (RS256/ES256)"
            ),
            _ => anyhow::bail!(
                "--auth jwt takes one of GOZON_JWT_SECRET, --jwt-public-key and --jwt-jwks-url"
            ),
        };
        let (issuer, audience) = (given(&self.jwt_issuer), given(&self.jwt_audience));
        let public_keys = secret.is_none();
        if public_keys && (issuer.is_none() || audience.is_none()) {
            anyhow::bail!(
                "--auth jwt with a public key or JWKS needs --jwt-issuer and --jwt-audience (tokens the provider issued for other applications must not act here)"
            );
        }
        let ticket_key = match (ticket_secret, &secret) {
            _ if !serves_events => None,
            (Some(key), _) => Some(auth::ticket_key(key.as_bytes())),
            (None, Some(secret)) => Some(auth::ticket_key(secret.as_bytes())),
            (None, None) => anyhow::bail!(
                "--auth jwt with a public key or JWKS needs GOZON_EVENTS_TICKET_KEY (32+ bytes) on the roles that serve event streams"
            ),
        };
        Ok(Authenticator::jwt(JwtRules {
            keys,
            issuer,
            audience,
            max_ttl: self.jwt_max_ttl,
            ticket_key,
            ticket_ttl: Duration::from_secs(self.events_ticket_ttl_secs),
        }))
    }

    pub fn keyring(&self) -> Keyring {
        let previous = self
            .message_key_previous
            .iter()
            .filter(|key| !key.is_empty());
        Keyring::new(
            MessageKey::new(&self.message_key),
            previous.map(|key| MessageKey::new(key)).collect(),
        )
    }

    /// Refuses message keys too short to be secret (the public development key aside, which
    /// only warns).
    pub fn check_message_keys(&self) -> anyhow::Result<()> {
        if self.message_key == signing::DEVELOPMENT_KEY {
            tracing::warn!(
                "GOZON_MESSAGE_KEY is not set: messages are signed with the public development key"
            );
        }
        let keys = std::iter::once(&self.message_key).chain(&self.message_key_previous);
        for key in keys.filter(|key| !key.is_empty() && *key != signing::DEVELOPMENT_KEY) {
            if key.len() < signing::MIN_KEY_BYTES {
                anyhow::bail!(
                    "message keys must be at least {} bytes (GOZON_MESSAGE_KEY, GOZON_MESSAGE_KEY_PREVIOUS)",
                    signing::MIN_KEY_BYTES
                );
            }
        }
        Ok(())
    }

    pub fn broker(&self) -> anyhow::Result<BrokerSettings> {
        let nodes = broker_nodes(&self.amqp_url, self.amqp_heartbeat_secs)?;
        let lanes = self.queue_lanes(nodes.len());
        Ok(BrokerSettings {
            nodes,
            connect_timeout: Duration::from_millis(self.amqp_connect_timeout_ms),
            connect_stagger: Duration::from_millis(self.amqp_connect_stagger_ms),
            quorum_size: self.amqp_quorum_size,
            leader_locator: self.amqp_leader_locator.clone(),
            lanes,
            prefix: self.amqp_prefix.clone(),
            delivery_limit: self.delivery_limit,
            queue_expires: self.queue_expires_secs.map(Duration::from_secs),
            io_timeout: Duration::from_millis(self.amqp_timeout_ms),
            keyring: self.keyring(),
        })
    }

    pub fn db_pool(&self) -> PoolSize {
        PoolSize {
            max: self.db_max_connections,
            min: self
                .db_min_connections
                .unwrap_or(self.db_max_connections)
                .min(self.db_max_connections),
            connect_timeout: Duration::from_secs(self.db_connect_timeout_secs),
            session: Some(SessionLimits {
                statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
                idle_in_transaction: Duration::from_millis(self.db_idle_in_transaction_timeout_ms),
                keepalive_idle: Duration::from_secs(self.db_keepalive_secs),
            }),
        }
    }

    pub fn relay(&self) -> RelaySettings {
        RelaySettings {
            poll_interval: Duration::from_millis(self.outbox_poll_ms),
            batch_size: self.outbox_batch,
            db_timeout: self.db_pool().operation_timeout(),
            confirm_patience: Duration::from_millis(self.amqp_confirm_patience_ms),
        }
    }

    pub fn housekeeping(&self) -> HousekeepingSettings {
        HousekeepingSettings {
            retention: Duration::from_secs(self.outbox_retention_secs),
            inbox_retention: Duration::from_secs(self.inbox_retention_secs),
            interval: Duration::from_millis(self.outbox_housekeeping_ms),
            backlog_warning: 1_000,
            backlog_age_warning: Duration::from_secs(30),
        }
    }

    /// Lanes of each queue, for a cluster of `nodes` nodes.
    fn queue_lanes(&self, nodes: usize) -> usize {
        match self.amqp_queue_lanes {
            0 if nodes > 1 => 2,
            0 => 1,
            lanes => usize::from(lanes),
        }
    }

    pub fn consumer(&self) -> ConsumerSettings {
        let nodes = broker_nodes(&self.amqp_url, self.amqp_heartbeat_secs).map_or(1, |n| n.len());
        let links = match self.consumer_links {
            // Each lane read where it is led and from the next node: a lane whose node is cut
            // off is still read once its new leader is elected (a relay that moved to it then
            // must not wait for its link's heartbeat).
            0 if nodes > 1 => 2,
            0 => 1,
            links => links,
        };
        let share = |total: u16| total.div_ceil(links).max(1);
        let concurrency = share(self.consumer_concurrency);
        ConsumerSettings {
            links: usize::from(links),
            prefetch: share(self.prefetch).max(concurrency),
            concurrency: usize::from(concurrency),
            batch: usize::from(self.consumer_batch),
            db_timeout: self.db_pool().operation_timeout(),
            hold: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &mask_password(&self.database_url))
            .field("skip_migrations", &self.skip_migrations)
            .field("db_max_connections", &self.db_max_connections)
            .field("db_min_connections", &self.db_min_connections)
            .field("db_connect_timeout_secs", &self.db_connect_timeout_secs)
            .field("db_statement_timeout_ms", &self.db_statement_timeout_ms)
            .field(
                "db_idle_in_transaction_timeout_ms",
                &self.db_idle_in_transaction_timeout_ms,
            )
            .field("db_keepalive_secs", &self.db_keepalive_secs)
            .field("worker_threads", &self.worker_threads)
            .field("amqp_url", &mask_password(&self.amqp_url))
            .field("amqp_heartbeat_secs", &self.amqp_heartbeat_secs)
            .field("amqp_connect_timeout_ms", &self.amqp_connect_timeout_ms)
            .field("amqp_quorum_size", &self.amqp_quorum_size)
            .field("amqp_leader_locator", &self.amqp_leader_locator)
            .field("amqp_queue_lanes", &self.amqp_queue_lanes)
            .field("amqp_prefix", &self.amqp_prefix)
            .field("message_key", &self.keyring().current().id())
            .field("message_key_previous", &self.message_key_previous.len())
            .field("delivery_limit", &self.delivery_limit)
            .field("prefetch", &self.prefetch)
            .field("consumer_concurrency", &self.consumer_concurrency)
            .field("consumer_batch", &self.consumer_batch)
            .field("consumer_links", &self.consumer_links)
            .field("queue_expires_secs", &self.queue_expires_secs)
            .field("amqp_timeout_ms", &self.amqp_timeout_ms)
            .field("amqp_connect_stagger_ms", &self.amqp_connect_stagger_ms)
            .field("amqp_confirm_patience_ms", &self.amqp_confirm_patience_ms)
            .field("outbox_poll_ms", &self.outbox_poll_ms)
            .field("outbox_batch", &self.outbox_batch)
            .field("outbox_retention_secs", &self.outbox_retention_secs)
            .field("inbox_retention_secs", &self.inbox_retention_secs)
            .field("outbox_housekeeping_ms", &self.outbox_housekeeping_ms)
            .field("http_addr", &self.http_addr)
            .field("static_dir", &self.static_dir)
            .field("log_format", &self.log_format)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("auth", &self.auth)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_jwks_url", &self.jwt_jwks_url)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_max_ttl", &self.jwt_max_ttl)
            .field(
                "events_ticket_key",
                &self.events_ticket_key.as_ref().map(|_| "***"),
            )
            .field("trusted_proxies", &self.trusted_proxies)
            .field("events_ticket_ttl_secs", &self.events_ticket_ttl_secs)
            .field("http_max_connections", &self.http_max_connections)
            .field(
                "http_request_read_timeout_secs",
                &self.http_request_read_timeout_secs,
            )
            .field("http_idle_timeout_secs", &self.http_idle_timeout_secs)
            .field("http_request_timeout_secs", &self.http_request_timeout_secs)
            .field("rate_limit_per_client", &self.rate_limit_per_client)
            .field("rate_limit_per_user", &self.rate_limit_per_user)
            .field("max_new_orders_per_user", &self.max_new_orders_per_user)
            .field("payment_timeout_secs", &self.payment_timeout_secs)
            .field("events_max_streams", &self.events_max_streams)
            .field(
                "events_max_streams_per_user",
                &self.events_max_streams_per_user,
            )
            .field("events_max_stream_secs", &self.events_max_stream_secs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_failover_settings_refuse_what_is_out_of_range() {
        use clap::Parser as _;
        let parse = |flag: &str, value: &str| {
            let arg = format!("{flag}={value}");
            crate::app::cli::Cli::try_parse_from(["gozon", "serve", arg.as_str()]).map(|_| ())
        };
        for (flag, good, bad) in [
            ("--consumer-links", ["0", "2", "8"], ["9", "-1", "two"]),
            ("--consumer-batch", ["1", "16", "256"], ["0", "257", "many"]),
            (
                "--worker-threads",
                ["0", "1", "1024"],
                ["1025", "-1", "all"],
            ),
            (
                "--amqp-confirm-patience-ms",
                ["100", "1000", "60000"],
                ["99", "0", "1s"],
            ),
            (
                "--amqp-connect-stagger-ms",
                ["10", "500", "5000"],
                ["9", "-5", "fast"],
            ),
        ] {
            for value in good {
                assert!(parse(flag, value).is_ok(), "{flag} {value}");
            }
            for value in bad {
                let refused = parse(flag, value).expect_err(&format!("{flag} {value} taken"));
                assert!(
                    refused.to_string().contains(flag),
                    "{flag} {value}: {refused}"
                );
            }
        }
    }

    fn urls(nodes: &[BrokerNode]) -> Vec<(&str, &str)> {
        nodes
            .iter()
            .map(|node| (node.url.as_str(), node.label.as_str()))
            .collect()
    }

    #[test]
    fn a_broker_url_names_one_node_or_several() {
        let one = broker_nodes("amqp://u:p@h1:5672/%2f", 10).unwrap();
        assert_eq!(
            urls(&one),
            [("amqp://u:p@h1:5672/%2f?heartbeat=10", "h1:5672")]
        );
        let listed = broker_nodes(
            "amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5673/%2f?heartbeat=3",
            10,
        )
        .unwrap();
        assert_eq!(
            urls(&listed),
            [
                ("amqp://u:p@h1:5672/%2f?heartbeat=10", "h1:5672"),
                ("amqp://u:p@h2:5673/%2f?heartbeat=3", "h2:5673")
            ]
        );
        let hosts = broker_nodes("amqp://u:p@h1:5672,h2,h3:5674/%2f?frame_max=8192", 5).unwrap();
        assert_eq!(
            urls(&hosts),
            [
                (
                    "amqp://u:p@h1:5672/%2f?frame_max=8192&heartbeat=5",
                    "h1:5672"
                ),
                ("amqp://u:p@h2/%2f?frame_max=8192&heartbeat=5", "h2:5672"),
                (
                    "amqp://u:p@h3:5674/%2f?frame_max=8192&heartbeat=5",
                    "h3:5674"
                )
            ]
        );
        assert!(broker_nodes("h1,h2", 10).is_err());
    }
}
