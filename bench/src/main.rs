//! `gozon-bench`: load on a running Gozon deployment, measured as a client would, beside what
//! PostgreSQL itself does with the same commits (pgbench, `bench/*.sql`) in the same run.
//!
//! Open-loop: orders are sent at a fixed rate, each at its scheduled time whether or not the
//! server kept up, and an HTTP latency is counted from that scheduled time (a stall cannot hide).
//! The saga's latency is the order's own creation -> final time. Results: a table, and JSON
//! under bench/results/.

mod cpu;
mod load;
mod pg;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gozon-bench",
    about = "Load benchmark of a running Gozon deployment"
)]
pub struct Args {
    /// The deployment (a `gozon serve`, or the gateway).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Where the payments API answers, when not at --base-url (split roles without a gateway).
    #[arg(long)]
    pub payments_url: Option<String>,
    /// Its database, to read the run's orders and outbox backlog, and (another database on the
    /// same server) for pgbench.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/gozon"
    )]
    pub database_url: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The deployment's exchange and queue prefix, to read the queues' depth.
    #[arg(long, env = "GOZON_AMQP_PREFIX", default_value = "gozon")]
    pub amqp_prefix: String,
    /// Orders per second, spread over the users.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of load (per step with --find-max).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Users ordering: 80% with ample funds, 10% with too little, 10% without an account.
    #[arg(long, default_value_t = 500)]
    pub users: usize,
    /// Raise the rate step by step until the saga's p99 passes 100 ms or a backlog is left.
    #[arg(long)]
    pub find_max: bool,
    /// Fixed rates to measure first, each for --duration (e.g. `--rates 100,300`), so one run
    /// reports them beside --find-max's highest sustainable rate.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// The highest rate --find-max tries.
    #[arg(long, default_value_t = 2000.0)]
    pub max_rate: f64,
    /// Concurrency of the GET benchmarks and of pgbench.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of each GET benchmark and of each pgbench run.
    #[arg(long, default_value_t = 5.0)]
    pub fixed_secs: f64,
    /// The rates bench/saga.sql runs at for its CPU per order, each for --duration (e.g.
    /// `100,300`, as --rates, so each step's PostgreSQL CPU is set beside saga.sql's at the
    /// same rate; 0: not measured). A rate pgbench cannot keep is reported and skipped.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pub cpu_rate: Vec<f64>,
    /// Skip pgbench (no ratios).
    #[arg(long)]
    pub skip_pgbench: bool,
    /// Server processes whose peak memory (VmHWM) to report.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// A name for this run in the report (e.g. `all`, `split`).
    #[arg(long, default_value = "run")]
    pub label: String,
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
}

impl Args {
    pub fn payments(&self) -> &str {
        self.payments_url.as_deref().unwrap_or(&self.base_url)
    }

    pub fn fixed(&self) -> Duration {
        Duration::from_secs_f64(self.fixed_secs)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db =
        gozon::db::connect_existing(&args.database_url, gozon::db::PoolSize::on_demand(4)).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(64))
        .build()?;
    let run = load::Run::new(&args, &client, &db).await?;
    let mut steps = Vec::new();
    for &rate in &args.rates {
        let step = run.step(&args, rate).await?;
        println!(
            "rate {rate:>7.0}/s: saga p50 {:.1} ms, p99 {:.1} ms",
            step.saga.value_at_quantile(0.5) as f64 / 1000.0,
            step.saga.value_at_quantile(0.99) as f64 / 1000.0
        );
        steps.push(step);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    if args.find_max {
        steps.extend(load::find_max(&args, &run).await?);
    } else if args.rates.is_empty() {
        steps.push(run.step(&args, args.rate).await?);
    }
    let reads = load::reads(&args, &run).await?;
    // pgbench measures the database's own limit: only once the deployment has drained.
    let drained = load::drained(&args, &db, Duration::from_secs(120)).await;
    let limits = if args.skip_pgbench {
        None
    } else {
        Some(pg::limits(&args).await?)
    };
    let memory = report::peak_rss(&args.pid);
    let report = report::Report::new(&args, steps, reads, limits, memory, drained);
    println!("{report}");
    let path = report.save(&args.out_dir)?;
    println!("saved {}", path.display());
    Ok(())
}
