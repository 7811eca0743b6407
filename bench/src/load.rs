//! The load: users set up through the API, orders sent open-loop at a fixed rate, the saga's
//! outcome read back from the orders' own timestamps, and GETs at a fixed concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tokio::sync::Mutex;

use crate::Args;
use crate::cpu::{Meter, Usage};

/// What one rate did.
#[derive(Debug, Clone)]
pub struct Step {
    pub rate: f64,
    pub sent: u64,
    pub errors: u64,
    /// create_order, from its scheduled send time to its answer, in µs.
    pub http: Histogram<u64>,
    /// Each order's creation -> final (FINISHED or CANCELLED), from its own timestamps, in µs.
    pub saga: Histogram<u64>,
    pub settled: u64,
    pub settled_per_sec: f64,
    /// Unsent outbox rows and queued messages when the load stopped, and once it drained.
    pub backlog_at_stop: i64,
    pub queued_at_stop: u64,
    pub backlog_after: i64,
    /// CPU by process group over the steady middle half of the step, and the orders that
    /// became final in it.
    pub cpu: Usage,
    pub settled_in_window: u64,
}

impl Step {
    /// Milliseconds of CPU per order settled in the window, for `group`.
    pub fn cpu_per_order(&self, group: crate::cpu::Group) -> f64 {
        self.cpu.ms_per(group, self.settled_in_window as f64)
    }
}

impl Step {
    /// Kept up: p99 of the saga within 100 ms, everything settled, nothing left behind.
    pub fn sustainable(&self) -> bool {
        self.errors == 0
            && self.settled == self.sent
            && self.saga.value_at_quantile(0.99) <= 100_000
            && self.backlog_at_stop + self.queued_at_stop as i64 <= (self.rate * 0.5) as i64 + 10
    }
}

/// GETs at a fixed concurrency.
#[derive(Debug, Clone, Copy)]
pub struct Reads {
    pub get_order_per_sec: f64,
    pub get_balance_per_sec: f64,
}

/// The run's users and what it needs to reach the deployment.
pub struct Run {
    id: String,
    client: reqwest::Client,
    db: DatabaseConnection,
    users: Vec<String>,
    funded: Vec<String>,
    orders: Mutex<Vec<String>>,
    meter: Arc<Meter>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

impl Run {
    /// Creates the run's users: 80% funded amply, 10% with 1.00, 10% without an account.
    pub async fn new(
        args: &Args,
        client: &reqwest::Client,
        db: &DatabaseConnection,
    ) -> anyhow::Result<Run> {
        let id = format!(
            "bench{}",
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..8)
                .unwrap_or("0")
        );
        let users: Vec<String> = (0..args.users.max(10))
            .map(|i| format!("{id}-{i}"))
            .collect();
        let mut funded = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let funds = match i % 10 {
                0 => None,
                1 => Some("1.00"),
                _ => Some("1000000.00"),
            };
            if let Some(amount) = funds {
                post(
                    client,
                    args.payments(),
                    "/api/payments/create_account",
                    &[("user_id", user)],
                )
                .await?;
                post(
                    client,
                    args.payments(),
                    "/api/payments/add_funds",
                    &[("user_id", user), ("amount", amount)],
                )
                .await?;
                if amount != "1.00" {
                    funded.push(user.clone());
                }
            }
        }
        Ok(Run {
            id,
            client: client.clone(),
            db: db.clone(),
            users,
            funded,
            orders: Mutex::new(Vec::new()),
            meter: Arc::new(Meter::new(&args.pid)),
        })
    }

    /// Sends orders at `rate` for the configured time, then measures how the saga kept up.
    pub async fn step(&self, args: &Args, rate: f64) -> anyhow::Result<Step> {
        let started = chrono::Utc::now();
        // The steady part: the middle half of the step, measured while the load runs.
        let (meter, duration) = (self.meter.clone(), args.duration);
        let window = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(duration * 0.25)).await;
            let (from, first) = (unix_now(), meter.sample());
            tokio::time::sleep(Duration::from_secs_f64(duration * 0.5)).await;
            (from, unix_now(), meter.sample().since(&first))
        });
        let (sent, errors, http, ids) = self.open_loop(args, rate).await;
        let (from, to, cpu) = window.await?;
        let backlog_at_stop = outbox_backlog(&self.db).await?;
        let queued_at_stop = queue_depth(args).await.unwrap_or(0);
        let (saga, settled, settled_per_sec, finals) = self.settle(&ids, started).await?;
        let settled_in_window = finals.iter().filter(|at| (from..to).contains(*at)).count() as u64;
        let backlog_after = outbox_backlog(&self.db).await?;
        self.orders.lock().await.extend(ids);
        Ok(Step {
            rate,
            sent,
            errors,
            http,
            saga,
            settled,
            settled_per_sec,
            backlog_at_stop,
            queued_at_stop,
            backlog_after,
            cpu,
            settled_in_window,
        })
    }

    /// Open-loop: order i is sent at start + i/rate, whatever happened to the ones before.
    async fn open_loop(&self, args: &Args, rate: f64) -> (u64, u64, Histogram<u64>, Vec<String>) {
        let total = (rate * args.duration).round() as u64;
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let results = Arc::new(Mutex::new((0u64, histogram(), Vec::new())));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            let user = self.users[(i as usize * 7919) % self.users.len()].clone();
            let (client, base, results) =
                (self.client.clone(), args.base_url.clone(), results.clone());
            tasks.spawn(async move {
                tokio::time::sleep_until(at).await;
                let amount = if i % 3 == 0 { "12.50" } else { "3" };
                let query = [("user_id", user.as_str()), ("amount", amount)];
                let answer = post(&client, &base, "/api/orders/create_order", &query).await;
                let took = at.elapsed().as_micros() as u64;
                let mut results = results.lock().await;
                match answer
                    .ok()
                    .and_then(|body| body["id"].as_str().map(str::to_owned))
                {
                    Some(id) => {
                        let _ = results.1.record(took.max(1));
                        results.2.push(id);
                    }
                    None => results.0 += 1,
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let (errors, http, ids) =
            std::mem::replace(&mut *results.lock().await, (0, histogram(), Vec::new()));
        (total, errors, http, ids)
    }

    /// Waits (up to 30 s) for the orders to be final; their latencies, the settle rate and
    /// when each became final (seconds since the epoch).
    async fn settle(
        &self,
        ids: &[String],
        since: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<(Histogram<u64>, u64, f64, Vec<f64>)> {
        let pattern = format!("{}-%", self.id);
        let deadline = Instant::now() + Duration::from_secs(30);
        let sql = format!(
            "SELECT (extract(epoch FROM updated_at - created_at) * 1000000)::BIGINT AS micros, \
             extract(epoch FROM updated_at)::FLOAT8 AS final_at, extract(epoch FROM created_at)::FLOAT8 AS created \
             FROM orders.orders WHERE user_id LIKE '{pattern}' AND created_at >= '{}' AND status <> 'NEW'",
            since.to_rfc3339()
        );
        loop {
            let rows = self
                .db
                .query_all_raw(Statement::from_string(DbBackend::Postgres, sql.clone()))
                .await?;
            if rows.len() >= ids.len() || Instant::now() > deadline {
                let mut saga = histogram();
                let (mut first, mut last) = (f64::MAX, 0f64);
                let mut finals = Vec::with_capacity(rows.len());
                for row in &rows {
                    let micros: i64 = row.try_get("", "micros")?;
                    let _ = saga.record(micros.max(1) as u64);
                    first = first.min(row.try_get("", "created")?);
                    let final_at: f64 = row.try_get("", "final_at")?;
                    last = last.max(final_at);
                    finals.push(final_at);
                }
                let per_sec = if last > first {
                    rows.len() as f64 / (last - first)
                } else {
                    0.0
                };
                return Ok((saga, rows.len() as u64, per_sec, finals));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Raises the rate by half while it is sustained; once a rate has failed, bisects between the
/// best sustained rate and the lowest failed one until they are within 5% of each other (or
/// after 12 steps, or a second failure above a success).
pub async fn find_max(args: &Args, run: &Run) -> anyhow::Result<Vec<Step>> {
    let mut steps: Vec<Step> = Vec::new();
    let (mut rate, mut best, mut failed) = (args.rate, None::<f64>, None::<f64>);
    let mut failures_above_best = 0;
    while rate <= args.max_rate && rate >= 5.0 && steps.len() < 12 {
        let step = run.step(args, rate).await?;
        let ok = step.sustainable();
        let p99 = step.saga.value_at_quantile(0.99) as f64 / 1000.0;
        println!(
            "rate {rate:>7.0}/s: settled {:>7.1}/s, saga p99 {p99:>8.1} ms, sustainable: {ok}",
            step.settled_per_sec
        );
        steps.push(step);
        if ok {
            best = Some(rate);
        } else {
            failed = Some(failed.map_or(rate, |f: f64| f.min(rate)));
            if best.is_some() {
                failures_above_best += 1;
            }
        }
        rate = match (best, failed) {
            (Some(good), None) => good * 1.5,
            (None, Some(bad)) => bad / 2.0,
            (Some(good), Some(bad)) if bad - good > good * 0.05 && failures_above_best < 3 => {
                (good + bad) / 2.0
            }
            _ => break,
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(steps)
}

/// GET order and GET balance, each at the configured concurrency for the configured time.
pub async fn reads(args: &Args, run: &Run) -> anyhow::Result<Reads> {
    let orders = run.orders.lock().await.clone();
    let order_urls: Vec<String> = orders
        .iter()
        .map(|id| format!("{}/api/orders/order?id={id}", args.base_url))
        .collect();
    let balance_urls: Vec<String> = run
        .funded
        .iter()
        .map(|u| format!("{}/api/payments/balance?user_id={u}", args.payments()))
        .collect();
    Ok(Reads {
        get_order_per_sec: hammer(&run.client, order_urls, args).await,
        get_balance_per_sec: hammer(&run.client, balance_urls, args).await,
    })
}

/// Successful GETs per second, `concurrency` at a time, cycling through `urls`.
async fn hammer(client: &reqwest::Client, urls: Vec<String>, args: &Args) -> f64 {
    if urls.is_empty() {
        return 0.0;
    }
    let urls = Arc::new(urls);
    let until = Instant::now() + args.fixed();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency {
        let (client, urls) = (client.clone(), urls.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            let mut i = worker;
            while Instant::now() < until {
                let ok = client
                    .get(&urls[i % urls.len()])
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                done += u64::from(ok);
                i += 7;
            }
            done
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.unwrap_or(0);
    }
    total as f64 / args.fixed().as_secs_f64()
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<serde_json::Value> {
    let response = client
        .post(format!("{base}{path}"))
        .query(query)
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{path}: {status} {body}");
    Ok(body)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Waits (up to `within`) until both outboxes have nothing unsent and the queues are empty;
/// how long that took, or None if it did not happen.
pub async fn drained(args: &Args, db: &DatabaseConnection, within: Duration) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < within {
        let backlog = outbox_backlog(db).await.unwrap_or(i64::MAX);
        let queued = queue_depth(args).await.unwrap_or(u64::MAX);
        if backlog == 0 && queued == 0 {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Unsent rows in both outboxes.
async fn outbox_backlog(db: &DatabaseConnection) -> anyhow::Result<i64> {
    let sql = "SELECT (SELECT count(*) FROM orders.outbox WHERE sent_at IS NULL) + \
               (SELECT count(*) FROM payments.outbox WHERE sent_at IS NULL) AS unsent";
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?;
    Ok(row
        .map(|row| row.try_get("", "unsent"))
        .transpose()?
        .unwrap_or(0))
}

/// Messages waiting in the deployment's queues (a passive declare reads the count).
async fn queue_depth(args: &Args) -> anyhow::Result<u64> {
    let connection =
        lapin::Connection::connect(&args.amqp_url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut depth = 0;
    for context in gozon::app::contexts::ALL {
        let name = format!("{}.{}", args.amqp_prefix, context.consumes.suffix);
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare(name.as_str().into(), options, Default::default())
            .await?;
        depth += u64::from(queue.message_count());
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(depth)
}
