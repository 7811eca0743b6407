use std::time::Duration;

use clap::Parser;
use gozon::app::cli::{Cli, Command};
use gozon::app::{self, Application, contexts, routes};
use gozon::ops::audit::AuditSettings;
use gozon::ops::telemetry::{self, LogFormat};
use gozon::web::auth::Claims;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Command::Serve { settings, .. } | Command::Migrate { settings, .. } = &cli.command
        && settings.worker_threads > 0
    {
        runtime.worker_threads(usize::from(settings.worker_threads));
    }
    runtime.build()?.block_on(run_cli(cli))
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let log_format = match &cli.command {
        Command::Serve { settings, .. } | Command::Migrate { settings, .. } => settings.log_format,
        _ => LogFormat::Text,
    };
    let tracing = match &cli.command {
        Command::Serve { role, settings } => Some(telemetry::Tracing {
            otlp_endpoint: settings.otlp_endpoint.clone(),
            service: role.service_name(),
        }),
        _ => None,
    };
    let telemetry = telemetry::init(log_format, tracing.as_ref())?;
    let outcome = run(cli.command).await;
    // Blocks while the last spans are sent, which takes the runtime's workers: not on one.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    outcome
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { role, settings } => {
            let application = Application::build(&settings, role).await?;
            app::shutdown_on_signal(application.shutdown_token());
            application.run_until_stopped().await
        }
        Command::Migrate {
            role,
            orders_db_role,
            payments_db_role,
            settings,
        } => {
            let db_roles = [
                (&contexts::ORDERS, orders_db_role.as_deref()),
                (&contexts::PAYMENTS, payments_db_role.as_deref()),
            ];
            app::migrate(&settings, role, &db_roles).await
        }
        Command::Audit {
            database_url,
            stuck_after_secs,
            outbox_stale_after_secs,
        } => {
            let settings = AuditSettings {
                stuck_after: Duration::from_secs(stuck_after_secs),
                outbox_stale_after: Duration::from_secs(outbox_stale_after_secs),
            };
            app::audit(&database_url, &settings).await
        }
        Command::Dlq { action } => app::dead_letters(action).await,
        Command::Token {
            sub,
            scope,
            ttl,
            issuer,
            audience,
            kid,
            jwt_secret,
            jwt_private_key,
        } => {
            let mut claims = Claims::new(&sub, scope.as_deref(), ttl);
            claims.iss = issuer;
            claims.aud = audience;
            let token = app::mint_token(
                &claims,
                jwt_secret.as_deref(),
                jwt_private_key.as_deref(),
                kid.as_deref(),
            )?;
            println!("{token}");
            Ok(())
        }
        Command::BrokerPermissions {
            context,
            amqp_prefix,
        } => {
            let rights = app::broker_permissions(context, &amqp_prefix);
            println!("{}\t{}\t{}", rights.configure, rights.write, rights.read);
            Ok(())
        }
        Command::Openapi { output } => routes::write_openapi(output.as_deref()),
    }
}
