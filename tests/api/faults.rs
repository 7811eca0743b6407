//! Fault injection against the real servers: the broker loses its connections or restarts, a
//! process is killed, the database goes away. Each run ends with every order final, no money
//! lost or created, no order debited twice (`gozon audit`).
//!
//! These tests disturb the shared broker, so they are `#[ignore]`d in the parallel suite and run
//! one at a time afterwards: `cargo test --test api faults -- --ignored --test-threads 1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use gozon::ops::audit::{AuditSettings, audit};
use reqwest::StatusCode;

use crate::helpers::{TestApp, TestEnv, scalar_i64, wait_for_outboxes_drained};

const USERS: usize = 10;

fn user(i: usize) -> String {
    format!("fault-user-{}", i % USERS)
}

/// Starts `total` orders from 8 concurrent clients against `orders`; returns the ids of those
/// that were accepted (201). `created` counts them as they go, so a fault can be timed.
async fn place_orders(
    orders: Arc<TestApp>,
    total: usize,
    created: Arc<AtomicUsize>,
) -> (Vec<String>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (orders, next, created) = (orders.clone(), next.clone(), created.clone());
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut refused = 0;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return (ids, refused);
                }
                // Amounts 1..=9: with 100.00 per user, some orders are refused for lack of funds.
                let amount = format!("{}.00", 1 + i % 9);
                // Like a real client, retry until the order is accepted: while a dependency is
                // down the answer is 503 (or no answer at all, while the process is down).
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match orders.try_create_order(&user(i), &amount).await {
                        Some(reply) if reply.status == StatusCode::CREATED => {
                            ids.push(reply.str("id").to_owned());
                            created.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Some(reply) => {
                            assert_eq!(
                                reply.status,
                                StatusCode::SERVICE_UNAVAILABLE,
                                "{}",
                                reply.body
                            );
                            refused += 1;
                        }
                        None => refused += 1,
                    }
                    assert!(Instant::now() < deadline, "order {i} never accepted");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let mut ids = Vec::new();
    let mut refused = 0;
    for client in clients {
        let (mut mine, theirs) = client.await.unwrap();
        ids.append(&mut mine);
        refused += theirs;
    }
    (ids, refused)
}

/// Waits until every order is final; returns how long after `since` that happened. An order
/// still NEW after 90 s fails the test with where its saga stands (`diagnose`).
async fn wait_all_final(
    env: &TestEnv,
    apps: &[&TestApp],
    ids: &[String],
    since: Instant,
) -> Duration {
    let reader = apps[0];
    for id in ids {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let reply = reader.order(id).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
            if reply.str("status") != "NEW" {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "order {id} still NEW after 90s\n{}",
                    diagnose(env, apps, id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    since.elapsed()
}

/// Where an order stuck in NEW stands: its messages in both outboxes and inboxes, its payment,
/// the backlogs, the test's queues and consumers on the broker, and each app's readiness.
async fn diagnose(env: &TestEnv, apps: &[&TestApp], id: &str) -> String {
    use sea_orm::ConnectionTrait;
    let db = env.db().await;
    let mut out = String::new();
    let queries = [
        format!("SELECT status || ' ' || created_at::text FROM orders.orders WHERE id = '{id}'"),
        format!(
            "SELECT 'orders.outbox ' || message_type || ' ' || message_id || ' sent ' || \
             coalesce(sent_at::text, 'no') FROM orders.outbox WHERE body::text LIKE '%{id}%'"
        ),
        format!(
            "SELECT 'payments.order_payments ' || outcome || ' ' || updated_at::text \
             FROM payments.order_payments WHERE order_id = '{id}'"
        ),
        format!(
            "SELECT 'payments.outbox ' || message_type || ' ' || message_id || ' sent ' || \
             coalesce(sent_at::text, 'no') FROM payments.outbox WHERE body::text LIKE '%{id}%'"
        ),
        format!(
            "SELECT 'payments.inbox ' || consumer || ' ' || received_at::text FROM payments.inbox \
             WHERE message_id IN (SELECT message_id FROM orders.outbox WHERE body::text LIKE '%{id}%')"
        ),
        format!(
            "SELECT 'orders.inbox ' || consumer || ' ' || received_at::text FROM orders.inbox \
             WHERE message_id IN (SELECT message_id FROM payments.outbox WHERE body::text LIKE '%{id}%')"
        ),
        "SELECT 'NEW orders ' || count(*) FROM orders.orders WHERE status = 'NEW'".to_owned(),
        "SELECT 'unsent orders.outbox ' || count(*) FROM orders.outbox WHERE sent_at IS NULL"
            .to_owned(),
        "SELECT 'unsent payments.outbox ' || count(*) FROM payments.outbox WHERE sent_at IS NULL"
            .to_owned(),
    ];
    for sql in queries {
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                sql.clone(),
            ))
            .await;
        match rows {
            Ok(rows) if rows.is_empty() => out.push_str(&format!("(no row) {sql}\n")),
            Ok(rows) => {
                for row in rows {
                    let text: Option<String> = row.try_get_by_index(0).ok();
                    out.push_str(&format!("{}\n", text.unwrap_or_default()));
                }
            }
            Err(error) => out.push_str(&format!("{sql}: {error}\n")),
        }
    }
    for what in [
        &[
            "list_queues",
            "name",
            "type",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ][..],
        &[
            "list_consumers",
            "queue_name",
            "channel_pid",
            "ack_required",
            "prefetch_count",
            "active",
        ],
        &["list_connections", "name", "state", "channels"],
        &[
            "list_channels",
            "connection",
            "number",
            "consumer_count",
            "messages_unacknowledged",
        ],
    ] {
        let listed = std::process::Command::new("rabbitmqctl")
            .arg("-q")
            .args(what)
            .output();
        out.push_str(&format!("rabbitmqctl {}:\n", what[0]));
        if let Ok(listed) = listed {
            for line in String::from_utf8_lossy(&listed.stdout).lines() {
                if what[0] != "list_queues" || line.contains(&env.prefix) {
                    out.push_str(&format!("  {line}\n"));
                }
            }
        }
    }
    for app in apps {
        let ready = app
            .client
            .get(format!("{}/health/ready", app.address))
            .send()
            .await;
        let said = match ready {
            Ok(ready) => format!(
                "{} {}",
                ready.status(),
                ready.text().await.unwrap_or_default()
            ),
            Err(error) => error.to_string(),
        };
        out.push_str(&format!("{} /health/ready: {said}\n", app.address));
    }
    out
}

/// The same, for orders the clients may not know of (read from the database).
async fn wait_none_new(env: &TestEnv, within: Duration) {
    let db = env.db().await;
    let deadline = Instant::now() + within;
    while scalar_i64(
        &db,
        "SELECT count(*) FROM orders.orders WHERE status = 'NEW'",
    )
    .await
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "orders still NEW after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fund_users(payments: &TestApp) {
    for i in 0..USERS {
        payments.funded_account(&user(i), "100.00").await;
    }
}

/// The invariants every fault test ends with; prints one row of the report table.
async fn assert_nothing_lost(
    env: &TestEnv,
    fault: &str,
    ids: &[String],
    refused: usize,
    recovery: Duration,
) {
    let db = env.db().await;
    wait_for_outboxes_drained(&db, Duration::from_secs(30)).await;
    let report = audit(
        &db,
        &AuditSettings {
            stuck_after: Duration::from_secs(600),
            outbox_stale_after: Duration::from_secs(600),
        },
    )
    .await
    .unwrap();
    assert!(report.passed(), "{report}");
    // A process killed between its commit and its answer leaves an order the client never
    // heard of: it must be final too, so count what the database holds.
    let orders = scalar_i64(&db, "SELECT count(*) FROM orders.orders").await as usize;
    assert!(orders >= ids.len(), "every accepted order exists");
    let new = scalar_i64(
        &db,
        "SELECT count(*) FROM orders.orders WHERE status = 'NEW'",
    )
    .await;
    let double = scalar_i64(
        &db,
        "SELECT count(*) FROM (SELECT order_id FROM payments.transactions WHERE kind = 'debit' \
         GROUP BY order_id HAVING count(*) > 1) twice",
    )
    .await;
    let finished = scalar_i64(
        &db,
        "SELECT count(*) FROM orders.orders WHERE status = 'FINISHED'",
    )
    .await;
    assert_eq!((new, double), (0, 0));
    eprintln!(
        "FAULT-REPORT | {fault} | orders {orders} (accepted {}; {refused} attempts refused while down, retried) | finished {finished} | \
         lost {new} | double debits {double} | all final {:.1}s after the fault ended | audit passed",
        ids.len(),
        recovery.as_secs_f64()
    );
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// Starts the broker app again however the test ends.
struct BrokerRestarter;

impl Drop for BrokerRestarter {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "await_startup"])
            .status();
    }
}

async fn wait_for(created: &AtomicUsize, count: usize) {
    while created.load(Ordering::SeqCst) < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn kill_and_restart(role: &str) {
    let env = TestEnv::new();
    let mut payments = env.start_process("payments").await;
    let mut orders = env.start_process("orders").await;
    fund_users(&payments.app).await;

    let entry = Arc::new(TestApp::at(&orders.app.address));
    let created = Arc::new(AtomicUsize::new(0));
    let placing = tokio::spawn(place_orders(entry.clone(), 200, created.clone()));
    wait_for(&created, 60).await;
    let target = if role == "payments" {
        &mut payments
    } else {
        &mut orders
    };
    target.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    target.restart().await;
    let fault = Instant::now();
    let (ids, refused) = placing.await.unwrap();
    wait_none_new(&env, Duration::from_secs(90)).await;
    let recovery = wait_all_final(&env, &[&entry, &payments.app], &ids, fault).await;
    assert_nothing_lost(
        &env,
        &format!("SIGKILL the {role} process, restart"),
        &ids,
        refused,
        recovery,
    )
    .await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn killing_the_payments_process_loses_nothing() {
    kill_and_restart("payments").await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn killing_the_orders_process_loses_nothing() {
    kill_and_restart("orders").await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn two_instances_of_each_role_survive_a_killed_payments_instance() {
    let env = TestEnv::new();
    let mut payments_a = env.start_process("payments").await;
    let payments_b = env.start_process("payments").await;
    let orders_a = env.start_process("orders").await;
    let _orders_b = env.start_process("orders").await;
    fund_users(&payments_a.app).await;

    let entry = Arc::new(TestApp::at(&orders_a.app.address));
    let created = Arc::new(AtomicUsize::new(0));
    let placing = tokio::spawn(place_orders(entry.clone(), 300, created.clone()));
    wait_for(&created, 100).await;
    payments_a.kill();
    let fault = Instant::now();
    let (ids, refused) = placing.await.unwrap();
    let recovery = wait_all_final(&env, &[&entry, &payments_b.app], &ids, fault).await;
    assert_nothing_lost(
        &env,
        "2+2 instances, SIGKILL one payments instance",
        &ids,
        refused,
        recovery,
    )
    .await;
}

/// Split roles in this process, 200 orders being placed by 8 clients, and `fault` injected once
/// the 60th is accepted. Recovery is timed from the moment `fault` returns (its dependency back).
async fn orders_in_flight_survive(name: &str, fault: impl AsyncFnOnce(&TestEnv)) {
    let env = TestEnv::new();
    let payments = env.spawn(Role::Payments).await;
    let orders = Arc::new(env.spawn(Role::Orders).await);
    fund_users(&payments).await;

    let created = Arc::new(AtomicUsize::new(0));
    let placing = tokio::spawn(place_orders(orders.clone(), 200, created.clone()));
    wait_for(&created, 60).await;
    fault(&env).await;
    let restored = Instant::now();
    let (ids, refused) = placing.await.unwrap();
    let recovery = wait_all_final(&env, &[&orders, &payments], &ids, restored).await;
    assert_nothing_lost(&env, name, &ids, refused, recovery).await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn dropping_every_broker_connection_loses_nothing() {
    orders_in_flight_survive("all AMQP connections closed", async |_| {
        rabbitmqctl(&["-q", "close_all_connections", "fault injection"]);
    })
    .await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn a_broker_restart_loses_nothing() {
    orders_in_flight_survive("RabbitMQ stop_app, 3 s, start_app", async |_| {
        let restarter = BrokerRestarter;
        rabbitmqctl(&["-q", "stop_app"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(restarter);
    })
    .await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn a_database_outage_in_the_middle_of_a_run_loses_nothing() {
    orders_in_flight_survive("PostgreSQL refuses connections for 3 s", async |env| {
        use sea_orm::ConnectionTrait;
        let name = env.database_url.rsplit('/').next().unwrap().to_owned();
        let admin = sea_orm::Database::connect(format!("{}/postgres", crate::helpers::POSTGRES))
            .await
            .unwrap();
        admin
            .execute_unprepared(&format!(
                "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        admin
            .execute_unprepared(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
#[ignore = "disturbs the shared broker: run with --ignored --test-threads 1"]
async fn cancels_and_refunds_in_flight_survive_a_broker_restart() {
    let env = TestEnv::new();
    let app = Arc::new(env.spawn(Role::All).await);
    fund_users(&app).await;
    // 60 paid orders to refund, then 140 to cancel right after placing them.
    let (paid, _) = place_orders(app.clone(), 60, Arc::new(AtomicUsize::new(0))).await;
    wait_all_final(&env, &[&app], &paid, Instant::now()).await;
    let cancelled = Arc::new(AtomicUsize::new(0));
    let work = {
        let (app, cancelled) = (app.clone(), cancelled.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..200 {
                let id = match paid.get(i) {
                    Some(id) => id.clone(),
                    None => app
                        .create_order(&user(i), "1.00")
                        .await
                        .str("id")
                        .to_owned(),
                };
                let reply = app.cancel_order(&id).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
                answers.push((id, reply.str("status").to_owned()));
                cancelled.fetch_add(1, Ordering::SeqCst);
            }
            answers
        })
    };
    wait_for(&cancelled, 40).await;
    {
        let _restarter = BrokerRestarter;
        rabbitmqctl(&["-q", "stop_app"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let fault = Instant::now();
    let answers = work.await.unwrap();
    let db = env.db().await;
    let unsettled = "SELECT count(*) FROM orders.orders \
                     WHERE status IN ('NEW', 'REFUNDING') OR refund_state = 'requested'";
    let deadline = Instant::now() + Duration::from_secs(90);
    while scalar_i64(&db, unsettled).await > 0 {
        assert!(Instant::now() < deadline, "refunds still owed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = fault.elapsed();
    for (id, answered) in &answers {
        let end = app.order(id).await;
        assert_ne!(
            end.str("status"),
            "FINISHED",
            "{id} was cancelled ({answered})"
        );
    }
    // Everything was given back: every account holds its 100.00 again, exactly.
    for i in 0..USERS {
        assert_eq!(app.balance(&user(i)).await.str("balance"), "100.00");
    }
    let double = scalar_i64(
        &db,
        "SELECT count(*) FROM (SELECT order_id FROM payments.transactions WHERE kind = 'refund' \
         GROUP BY order_id HAVING count(*) > 1) twice",
    )
    .await;
    assert_eq!(double, 0, "no order refunded twice");
    let refunds = scalar_i64(
        &db,
        "SELECT count(*) FROM payments.transactions WHERE kind = 'refund'",
    )
    .await;
    assert_nothing_lost(
        &env,
        &format!(
            "RabbitMQ stop_app 3 s with 200 cancels and refunds in flight ({refunds} refunds)"
        ),
        &answers.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        0,
        recovery,
    )
    .await;
}
