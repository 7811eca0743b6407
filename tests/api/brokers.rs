//! Past one broker node: an instance names several nodes and reaches a live one in one attempt;
//! readiness says which node each connection uses. And a database that does not answer yet is
//! waited for at start, while one that refuses ends the start.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;

use crate::helpers::{AMQP, TestEnv};

#[tokio::test]
async fn an_instance_reaches_a_live_node_when_the_first_it_names_is_down() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    // Port 1 refuses connections: a node that is down.
    settings.amqp_url = format!("amqp://guest:guest@127.0.0.1:1/%2f,{AMQP}");
    let started = Instant::now();
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ready in {:?}",
        started.elapsed()
    );
    let ready: serde_json::Value = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nodes = ready["broker"].as_object().expect("the node of each task");
    assert_eq!(nodes.len(), 4, "two relays and two consumers: {ready}");
    assert!(
        nodes.values().all(|node| node == "127.0.0.1:5672"),
        "{ready}"
    );
    app.funded_account("nodes", "10").await;
    let order = app.create_order("nodes", "4").await;
    let paid = app
        .wait_until_final(order.str("id"), Duration::from_secs(10))
        .await;
    assert_eq!(paid.str("status"), "FINISHED");
}

#[tokio::test]
async fn one_url_may_name_several_hosts() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.amqp_url = "amqp://guest:guest@127.0.0.1:1,127.0.0.1:5672/%2f".into();
    let app = env.spawn_with(&settings, Role::Payments).await;
    app.wait_until_ready().await;
    assert_eq!(app.create_account("hosts").await.status, 201);
}

#[tokio::test]
async fn start_up_waits_for_a_database_that_does_not_answer_and_stops_at_one_that_refuses() {
    let env = TestEnv::new();
    // Nothing listens there: the process waits (with backoff) instead of exiting.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let mut waiting = std::process::Command::new(env!("CARGO_BIN_EXE_gozon"))
        .args([
            "serve",
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:{port}/x"),
        ])
        .args(["--amqp-prefix", &env.prefix, "--http-addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "still waiting for the database after 7 s"
    );
    let _ = waiting.kill();
    let _ = waiting.wait();
    // A role that does not exist is a refusal: exit 1 at once.
    let started = Instant::now();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_gozon"))
        .args(["serve", "--skip-migrations"])
        .args([
            "--database-url",
            "postgres://no_such_role_here@127.0.0.1:5432/postgres",
        ])
        .args(["--amqp-prefix", &env.prefix, "--http-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(5));
}
