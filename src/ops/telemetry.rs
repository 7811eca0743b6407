//! Logging: one tracing subscriber for the process, text or JSON, filtered by `RUST_LOG`; and
//! passwords kept out of what is logged.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter when `RUST_LOG` is unset: our own info, and sqlx only when something is wrong
/// (it logs every statement at info). lapin is silenced: its own recovery loop reports every
/// failed attempt at ERROR (dozens a second with a wrong password), while Gozon's tasks report
/// a lost or refused broker once, then retry with backoff quietly.
const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=off,amq_protocol=off,poem=info";

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // try_init: tests start many apps in one process and only the first may install it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Hides the password of a URL such as `postgres://user:secret@host/db`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_only() {
        assert_eq!(
            mask_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_password("postgres://postgres@127.0.0.1:5432/gozon"),
            "postgres://postgres@127.0.0.1:5432/gozon"
        );
    }
}
