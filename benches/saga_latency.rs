//! How long an order takes from `create_order` to FINISHED, one order at a time, on the real
//! PostgreSQL and RabbitMQ. `cargo bench --bench saga_latency [-- ORDERS]` (default 100).

use std::time::{Duration, Instant};

use clap::Parser;
use gozon::app::Application;
use gozon::app::cli::{Cli, Command, Role};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let orders: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(100);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let database_url = format!(
        "postgres://postgres@127.0.0.1:5432/gozon_test_bench_{}",
        &id[..12]
    );
    let prefix = format!("gozon-bench.{}", &id[..12]);
    let cli = Cli::parse_from([
        "gozon",
        "serve",
        "--database-url",
        &database_url,
        "--amqp-prefix",
        &prefix,
        "--http-addr",
        "127.0.0.1:0",
        "--queue-expires-secs",
        "300",
    ]);
    let Command::Serve { settings, .. } = cli.command else {
        anyhow::bail!("expected serve");
    };
    let app = Application::build(&settings, Role::All).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = app.shutdown_token();
    let running = tokio::spawn(app.run_until_stopped());

    let client = reqwest::Client::new();
    client
        .post(format!("{base}/api/payments/create_account?user_id=bench"))
        .send()
        .await?;
    client
        .post(format!(
            "{base}/api/payments/add_funds?user_id=bench&amount=1000000"
        ))
        .send()
        .await?;

    let mut latencies = Vec::with_capacity(orders);
    for _ in 0..orders {
        let started = Instant::now();
        let order: serde_json::Value = client
            .post(format!(
                "{base}/api/orders/create_order?user_id=bench&amount=1.00"
            ))
            .send()
            .await?
            .json()
            .await?;
        let id = order["id"].as_str().unwrap_or_default().to_owned();
        loop {
            let order: serde_json::Value = client
                .get(format!("{base}/api/orders/order?id={id}"))
                .send()
                .await?
                .json()
                .await?;
            if order["status"] == "FINISHED" {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "order {id} not settled: {order}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "saga latency, create_order -> FINISHED, {} orders one at a time: median {:?}, p90 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    stop.cancel();
    running.await??;
    Ok(())
}
