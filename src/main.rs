use anyhow::Context;
use clap::Parser;
use gozon::app::{self, Application};
use gozon::cli::{Cli, Command};
use gozon::config::LogFormat;
use gozon::{audit, http, telemetry};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve { settings, .. } | Command::Migrate { settings, .. } => settings.log_format,
        Command::Openapi { .. } | Command::Audit { .. } | Command::Dlq { .. } => LogFormat::Text,
    };
    telemetry::init(log_format);
    match cli.command {
        Command::Serve { role, settings } => {
            let application = Application::build(&settings, role).await?;
            app::shutdown_on_signal(application.shutdown_token());
            application.run_until_stopped().await
        }
        Command::Migrate { role, settings } => {
            app::connect_and_migrate(&settings, role).await?;
            tracing::info!(?role, "migrations applied");
            Ok(())
        }
        Command::Audit {
            database_url,
            stuck_after_secs,
            outbox_stale_after_secs,
        } => {
            let db = gozon::db::connect_existing(&database_url, 2).await?;
            let settings = audit::AuditSettings {
                stuck_after: Duration::from_secs(stuck_after_secs),
                outbox_stale_after: Duration::from_secs(outbox_stale_after_secs),
            };
            let report = audit::audit(&db, &settings).await?;
            println!("{report}");
            if !report.passed() {
                anyhow::bail!("broken invariants: {}", report.failed_checks().join("; "));
            }
            Ok(())
        }
        Command::Dlq { action } => app::dead_letters(action).await,
        Command::Openapi { output } => {
            let yaml = http::openapi_yaml();
            match output {
                Some(path) => std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display())),
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
    }
}
