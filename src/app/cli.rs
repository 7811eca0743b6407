//! The command line: `gozon serve --role ...`, `migrate`, `audit`, `dlq list|replay`, `openapi`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::config::{DEFAULT_DATABASE_URL, Settings};
use crate::app::contexts::{self, BoundedContext};

#[derive(Parser, Debug)]
#[command(
    name = "gozon",
    version,
    about = "Orders and payments for an online store"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API and the messaging of one context or both (migrations run first).
    Serve {
        #[arg(long, env = "GOZON_ROLE", value_enum, default_value_t = Role::All)]
        role: Role,
        #[command(flatten)]
        settings: Settings,
    },
    /// Create the database if needed and apply pending migrations, then exit. Run it as the
    /// schemas' owner; the serving processes can then connect as roles with DML rights only.
    Migrate {
        #[arg(long, env = "GOZON_ROLE", value_enum, default_value_t = Role::All)]
        role: Role,
        /// A PostgreSQL role to grant DML (and nothing else) on the orders schema.
        #[arg(long, env = "GOZON_ORDERS_DB_ROLE")]
        orders_db_role: Option<String>,
        /// A PostgreSQL role to grant DML (and nothing else) on the payments schema.
        #[arg(long, env = "GOZON_PAYMENTS_DB_ROLE")]
        payments_db_role: Option<String>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Check across both schemas that money is conserved and every order is settled or in
    /// flight; print what is wrong and exit non-zero if anything is.
    Audit {
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
        /// An order NEW for longer than this many seconds is reported as stuck.
        #[arg(long, default_value_t = 60)]
        stuck_after_secs: u64,
        /// An outbox message unsent for longer than this many seconds is reported as stuck.
        #[arg(long, default_value_t = 60)]
        outbox_stale_after_secs: u64,
    },
    /// Look at dead-lettered messages, or send them back to be handled again.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Mint a bearer token for `--auth jwt` (for tests, Postman, trying the API): signed with
    /// GOZON_JWT_SECRET (HS256), or with --jwt-private-key (RS256 or ES256).
    Token {
        /// The user the token acts for.
        #[arg(long)]
        sub: String,
        /// Space-separated scopes, such as `payments:top_up`.
        #[arg(long)]
        scope: Option<String>,
        /// How long it is valid: `1h`, `15m`, `90s`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The `iss` claim (a server with --jwt-issuer requires it).
        #[arg(long = "iss")]
        issuer: Option<String>,
        /// The `aud` claim (a server with --jwt-audience requires it).
        #[arg(long = "aud")]
        audience: Option<String>,
        /// The `kid` header: the id of the signing key in a JWKS.
        #[arg(long)]
        kid: Option<String>,
        #[arg(long, env = "GOZON_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
        /// A PEM private key (RSA or EC P-256) to sign with instead of the secret.
        #[arg(long, env = "GOZON_JWT_PRIVATE_KEY")]
        jwt_private_key: Option<PathBuf>,
    },
    /// Print the RabbitMQ rights a context's broker user needs (configure, write and read
    /// regular expressions, tab separated), for `rabbitmqctl set_permissions`.
    BrokerPermissions {
        #[arg(long, value_enum)]
        context: DlqQueue,
        #[arg(long, env = "GOZON_AMQP_PREFIX", default_value = "gozon")]
        amqp_prefix: String,
    },
    /// Print the OpenAPI spec as YAML (what `openapi.yaml` holds), or write it to a file.
    Openapi {
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// Print the dead letters of a consumer's queue (they stay where they are).
    List {
        #[arg(long, value_enum)]
        queue: DlqQueue,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        settings: Settings,
    },
    /// Publish dead letters back to the events exchange under their original routing key.
    Replay {
        #[arg(long, value_enum)]
        queue: DlqQueue,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Replay only this message.
        #[arg(long)]
        message_id: Option<String>,
        #[command(flatten)]
        settings: Settings,
    },
}

/// A consumer's queue, by the context that reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DlqQueue {
    /// Payment requests, read by Payments.
    Payments,
    /// Payment results, read by Orders.
    Orders,
}

/// Which bounded contexts this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Orders,
    Payments,
    /// Both contexts, plus the web page and Swagger UI.
    All,
}

impl Role {
    /// The `service.name` of its traces.
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Orders => "gozon-orders",
            Role::Payments => "gozon-payments",
            Role::All => "gozon",
        }
    }

    /// The bounded contexts this role runs.
    pub fn contexts(self) -> Vec<&'static BoundedContext> {
        match self {
            Role::Orders => vec![&contexts::ORDERS],
            Role::Payments => vec![&contexts::PAYMENTS],
            Role::All => contexts::ALL.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults_to_all_and_local_servers() {
        let cli = Cli::try_parse_from(["gozon", "serve"]).unwrap();
        let Command::Serve { role, settings } = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(role, Role::All);
        assert_eq!(settings.http_addr.port(), 8000);
        assert!(settings.database_url.starts_with("postgres://"));
    }

    #[test]
    fn flags_win_and_bad_values_are_refused() {
        let cli = Cli::try_parse_from(["gozon", "serve", "--role", "payments", "--prefetch", "5"])
            .unwrap();
        let Command::Serve { role, settings } = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(role, Role::Payments);
        assert_eq!(settings.prefetch, 5);
        assert!(Cli::try_parse_from(["gozon", "serve", "--role", "shipping"]).is_err());
        assert!(Cli::try_parse_from(["gozon", "serve", "--prefetch", "0"]).is_err());
        assert!(Cli::try_parse_from(["gozon", "serve", "--http-addr", "nowhere"]).is_err());
    }
}
