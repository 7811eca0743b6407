use anyhow::Context;
use clap::Parser;
use gozon::app::{self, Application};
use gozon::cli::{Cli, Command};
use gozon::config::LogFormat;
use gozon::{http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve { settings, .. } | Command::Migrate { settings, .. } => settings.log_format,
        Command::Openapi { .. } => LogFormat::Text,
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
