//! The database's own limit, in the same run: pgbench doing exactly the commits of one order
//! (bench/saga.sql) and the SELECT behind GET order (bench/get_order.sql), at the benchmark's
//! concurrency, in a scratch database migrated by Gozon's own migrators.

use sea_orm::ConnectionTrait;

use crate::Args;

const ACCOUNTS: usize = 1000;
const ORDERS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whole orders' worth of commits per second.
    pub saga_per_sec: f64,
    pub get_order_per_sec: f64,
}

/// Runs both pgbench scripts; the scratch database is dropped afterwards.
pub async fn limits(args: &Args) -> anyhow::Result<Limits> {
    let (server, _) = args
        .database_url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("no database name in DATABASE_URL"))?;
    let name = format!(
        "gozon_bench_pg_{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..8)
            .unwrap_or("0")
    );
    let url = format!("{server}/{name}");
    let db = gozon::db::connect(&url, gozon::db::PoolSize::on_demand(2)).await?;
    for context in gozon::app::contexts::ALL {
        migrations::migrate(&db, context.migrations).await?;
    }
    db.execute_unprepared(&format!(
        "INSERT INTO payments.accounts (user_id, balance_minor) \
         SELECT 'pgb-' || n, 100000000000 FROM generate_series(1, {ACCOUNTS}) n; \
         INSERT INTO orders.orders (id, user_id, amount_minor, status, correlation_id) \
         SELECT md5('seed-' || n)::uuid, 'pgb-' || (n % {ACCOUNTS} + 1), 100, 'FINISHED', 'seed' \
         FROM generate_series(1, {ORDERS}) n; ANALYZE;"
    ))
    .await?;
    let saga = pgbench(args, &url, "bench/saga.sql").await;
    let get_order = pgbench(args, &url, "bench/get_order.sql").await;
    db.close().await?;
    let admin = gozon::db::connect_existing(
        &format!("{server}/postgres"),
        gozon::db::PoolSize::on_demand(1),
    )
    .await?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    Ok(Limits {
        saga_per_sec: saga?,
        get_order_per_sec: get_order?,
    })
}

/// pgbench's tps for `script` (excluding connection time).
async fn pgbench(args: &Args, url: &str, script: &str) -> anyhow::Result<f64> {
    let clients = args.concurrency.to_string();
    let secs = args.fixed().as_secs().max(1).to_string();
    let output = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", &clients, "-j", "2", "-T", &secs, "-f", script])
        .args([
            "-D",
            &format!("accounts={ACCOUNTS}"),
            "-D",
            &format!("orders={ORDERS}"),
        ])
        .arg(url)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench {script}: {}{}",
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output: {text}"))
}
