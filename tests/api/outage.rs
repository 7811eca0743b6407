//! A PostgreSQL outage of this app's database: requests answer 503 meanwhile, and everything
//! recovers by itself when the database returns.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use gozon::ops::audit::{AuditSettings, audit};
use sea_orm::{ConnectionTrait, Database};

use crate::helpers::{POSTGRES, TestEnv, wait_for_outboxes_drained};

async fn admin(sql: &str) {
    let db = Database::connect(format!("{POSTGRES}/postgres"))
        .await
        .unwrap();
    db.execute_unprepared(sql).await.unwrap();
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_database_outage_answers_503_and_heals_by_itself() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("pia", "100").await;
    let name = env.database_url.rsplit('/').next().unwrap().to_owned();

    // Refuse new connections to this database and cut the existing ones.
    admin(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid();"
    ))
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = app.balance("pia").await;
        if reply.status == 503 {
            reply.assert_error(503, "service_unavailable");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 503 during the outage: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.create_order("pia", "10")
        .await
        .assert_error(503, "service_unavailable");
    app.get("/health/ready", &[])
        .await
        .assert_error(503, "service_unavailable");
    assert_eq!(
        app.get("/health/live", &[]).await.status,
        200,
        "the process stays alive"
    );

    admin(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).await;

    let deadline = Instant::now() + Duration::from_secs(15);
    while app.balance("pia").await.status != 200 {
        assert!(Instant::now() < deadline, "the app did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.wait_until_ready().await;
    let order = app.create_order("pia", "10").await;
    let order = app
        .wait_until_final(order.str("id"), Duration::from_secs(10))
        .await;
    assert_eq!(order.str("status"), "FINISHED");
    assert_eq!(app.balance("pia").await.str("balance"), "90.00");

    let db = env.db().await;
    wait_for_outboxes_drained(&db, Duration::from_secs(5)).await;
    let report = audit(
        &db,
        &AuditSettings {
            stuck_after: Duration::from_secs(60),
            outbox_stale_after: Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    assert!(report.passed(), "{report}");
}

#[tokio::test]
async fn channels_closed_by_the_broker_heal_and_the_topology_comes_back() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("ray", "10").await;

    // Delete the exchanges and queues under the running app: its consumers are cancelled, and
    // its relays' next publish fails with a channel error (404) that closes their channel.
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let connection =
        lapin::Connection::connect(crate::helpers::AMQP, lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for queue in ["payments.payment-requests", "orders.payment-results"] {
        let name = format!("{}.{queue}", env.prefix);
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    for context in ["orders", "payments"] {
        let inbound = format!("{}.{context}.inbound", env.prefix);
        channel
            .exchange_delete(inbound.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
    connection.close(200, "done".into()).await.unwrap();

    // Everything reconnects and re-declares; the saga works again.
    app.wait_until_ready().await;
    let order = app.create_order("ray", "4").await;
    let order = app
        .wait_until_final(order.str("id"), Duration::from_secs(15))
        .await;
    assert_eq!(order.str("status"), "FINISHED");
    assert_eq!(app.balance("ray").await.str("balance"), "6.00");
}

/// A broker that refuses the credentials is reported once per task, clearly, and retried
/// quietly: not lapin's dozens of errors a second.
#[tokio::test]
async fn a_wrong_broker_password_is_reported_once_not_dozens_of_times() {
    use std::io::Read;
    let env = TestEnv::new();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gozon"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--database-url",
            &env.database_url,
        ])
        .args([
            "--amqp-url",
            "amqp://guest:wrong-password@127.0.0.1:5672/%2f",
        ])
        .args(["--amqp-prefix", &env.prefix])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    child.kill().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let loud: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    let broker: Vec<&&str> = loud
        .iter()
        .filter(|l| l.contains("broker unavailable"))
        .collect();
    // One line per relay and consumer (two each) in the first 15 s, beside the start's own
    // warnings (the development key, no authentication).
    assert!(!broker.is_empty(), "the failure is reported: {out}");
    assert!(
        broker.len() <= 4,
        "{} broker lines in 4 s:\n{}",
        broker.len(),
        loud.join("\n")
    );
    let others: Vec<&&str> = loud
        .iter()
        .filter(|l| !l.contains("broker unavailable"))
        .filter(|l| !l.contains("development key") && !l.contains("--auth none"))
        .collect();
    assert!(
        others.is_empty(),
        "other loud lines in 4 s:\n{}",
        loud.join("\n")
    );
    assert!(
        !out.contains("lapin"),
        "lapin's own recovery noise is filtered:\n{out}"
    );
    let _ = child.wait();
}
