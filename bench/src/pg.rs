//! The database's own limit, in the same run: pgbench doing exactly the commits of one order
//! (bench/saga.sql) and the SELECT behind GET order (bench/get_order.sql), at the benchmark's
//! concurrency, in a scratch database migrated by Gozon's own migrators.

use sea_orm::ConnectionTrait;

use crate::Args;
use crate::cpu::{Group, Meter};

const ACCOUNTS: usize = 1000;
const ORDERS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Whole orders' worth of commits per second.
    pub saga_per_sec: f64,
    pub get_order_per_sec: f64,
    /// bench/saga.sql at each fixed rate of --cpu-rate: what one order's commits cost
    /// PostgreSQL, and pgbench.
    pub cpu: Vec<SagaCpu>,
}

/// CPU per order of bench/saga.sql run at `rate` orders/s.
#[derive(Debug, Clone, Copy)]
pub struct SagaCpu {
    pub rate: f64,
    pub orders: u64,
    pub postgres_ms: f64,
    pub pgbench_ms: f64,
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
    let mut cpu = Vec::new();
    for &rate in args.cpu_rate.iter().filter(|rate| **rate > 0.0) {
        match saga_cpu(args, &url, rate).await {
            Ok(measured) => cpu.push(measured),
            Err(error) => eprintln!("bench/saga.sql at {rate:.0}/s not measured: {error:#}"),
        }
    }
    let saga = pgbench(args, &url, "bench/saga.sql", None).await;
    let get_order = pgbench(args, &url, "bench/get_order.sql", None).await;
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
        saga_per_sec: saga?.0,
        get_order_per_sec: get_order?.0,
        cpu,
    })
}

/// bench/saga.sql at `rate` orders/s for --duration: PostgreSQL's and pgbench's CPU per
/// order, sampled while pgbench runs (its backends end with it), from its second second to
/// half a second before its end; the orders in that window are the rate times its length
/// (pgbench -R keeps to its schedule when it can; its own count is checked against it).
async fn saga_cpu(args: &Args, url: &str, rate: f64) -> anyhow::Result<SagaCpu> {
    let meter = Meter::new(&[]);
    let secs = args.duration.max(4.0).round();
    let run = pgbench(args, url, "bench/saga.sql", Some((rate, secs)));
    let window = async {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let first = meter.sample();
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs - 1.5)).await;
        meter.sample().since(&first)
    };
    let (ran, usage) = tokio::join!(run, window);
    let (_, processed) = ran?;
    // pgbench -R draws its start times from a Poisson process: the count in `secs` strays
    // from the rate times `secs` by its square root (a 4 s smoke run at 100/s: 400 +- 20); four
    // of those below it, the schedule was not kept.
    let expected = rate * secs;
    anyhow::ensure!(
        processed as f64 >= expected - 4.0 * expected.sqrt(),
        "pgbench did not keep to {} orders/s: {processed} in {secs} s",
        rate
    );
    let orders = rate * usage.seconds;
    Ok(SagaCpu {
        rate,
        orders: orders.round() as u64,
        postgres_ms: usage.ms_per(Group::PostgreSql, orders),
        pgbench_ms: usage.ms_per(Group::Pgbench, orders),
    })
}

/// pgbench's tps for `script` (excluding connection time) and its transactions, at full speed
/// for --fixed-secs, or at `rate` per second for `secs`.
async fn pgbench(
    args: &Args,
    url: &str,
    script: &str,
    rate: Option<(f64, f64)>,
) -> anyhow::Result<(f64, u64)> {
    let clients = args.concurrency.to_string();
    let secs = rate.map_or(args.fixed().as_secs_f64(), |(_, secs)| secs);
    let secs = (secs.round() as u64).max(1).to_string();
    let mut command = tokio::process::Command::new("pgbench");
    command.args(["-n", "-c", &clients, "-j", "2", "-T", &secs, "-f", script]);
    if let Some((per_sec, _)) = rate {
        command.args(["-R", &format!("{per_sec:.0}")]);
    }
    let output = command
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
    let tps = text
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output: {text}"))?;
    let transactions = text
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok((tps, transactions))
}
