//! Starting Gozon for a test, and one helper per endpoint.

use std::time::{Duration, Instant};

use clap::Parser;
use gozon::app::Application;
use gozon::app::cli::{Cli, Command, Role};
use gozon::app::config::Settings;
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Every malformed `user_id` the bad-input tests send (plus 65 characters, made at run time).
pub const BAD_USER_IDS: &[&str] = &[
    "",
    " ",
    "a b",
    "' OR 1=1 --",
    "x;DROP TABLE payments.accounts",
    "ü",
];

/// Every malformed `amount` the bad-input tests send.
pub const BAD_AMOUNTS: &[&str] = &[
    "",
    "abc",
    "-5",
    "-0.01",
    "0",
    "0.00",
    "1.234",
    "1000000000000000",
    "1000000000.01",
    "1e3",
    "0x10",
    "NaN",
    " 5",
    "5 ",
    "5;DROP TABLE orders.orders",
    "1,5",
    "+5",
    ".5",
    "5.",
];

/// [`BAD_USER_IDS`] and one that is too long.
pub fn bad_user_ids() -> Vec<String> {
    let mut ids: Vec<String> = BAD_USER_IDS.iter().map(|s| s.to_string()).collect();
    ids.push("x".repeat(65));
    ids
}

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One database and one set of broker names, shared by every app a test starts in it.
pub struct TestEnv {
    pub database_url: String,
    pub prefix: String,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        if std::env::var("TEST_LOG").is_ok() {
            let _ = gozon::ops::telemetry::init(gozon::ops::telemetry::LogFormat::Text, None);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        TestEnv {
            database_url: format!("{POSTGRES}/gozon_test_{}", &id[..16]),
            prefix: format!("gozon-test.{}", &id[..16]),
        }
    }

    pub fn settings(&self) -> Settings {
        let cli = Cli::parse_from([
            "gozon",
            "serve",
            "--database-url",
            &self.database_url,
            "--amqp-url",
            AMQP,
            "--amqp-prefix",
            &self.prefix,
            "--http-addr",
            "127.0.0.1:0",
            "--queue-expires-secs",
            "120",
            "--db-max-connections",
            "8",
            // Many apps run at once: connect only as needed.
            "--db-min-connections",
            "1",
            // Tests about something else must not trip the rate limits (edge.rs sets its own).
            "--rate-limit-per-client",
            "0",
            "--rate-limit-per-user",
            "0",
        ]);
        match cli.command {
            Command::Serve { settings, .. } => settings,
            _ => unreachable!("parsed a serve command"),
        }
    }

    pub async fn spawn(&self, role: Role) -> TestApp {
        let app = self.spawn_with(&self.settings(), role).await;
        app.wait_until_ready().await;
        app
    }

    /// Starts an app with settings of the test's choosing; does not wait for it to be ready.
    pub async fn spawn_with(&self, settings: &Settings, role: Role) -> TestApp {
        let application = Application::build(settings, role)
            .await
            .expect("the application starts");
        let port = application.port();
        let shutdown = application.shutdown_token();
        tokio::spawn(application.run_until_stopped());
        TestApp {
            address: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            shutdown,
            env: None,
        }
    }

    /// A connection of the test's own, to assert invariants across both schemas.
    pub async fn db(&self) -> DatabaseConnection {
        Database::connect(&self.database_url)
            .await
            .expect("test database")
    }
}

/// Deletes the test's queues and exchanges: quorum queues hold file descriptors, and a broker
/// that runs out of them stops accepting connections. (They also expire on their own.)
impl Drop for TestEnv {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
                let connection =
                    lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
                        .await?;
                let channel = connection.create_channel().await?;
                for queue in ["payments.payment-requests", "orders.payment-results"] {
                    for name in [
                        format!("{prefix}.{queue}"),
                        format!("{prefix}.{queue}.lane-2"),
                        format!("{prefix}.{queue}.lane-3"),
                        format!("{prefix}.{queue}.dlq"),
                    ] {
                        channel
                            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                            .await?;
                    }
                }
                for exchange in [
                    "orders.inbound",
                    "orders.dead-letter",
                    "payments.inbound",
                    "payments.dead-letter",
                ] {
                    let name = format!("{prefix}.{exchange}");
                    channel
                        .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                        .await?;
                }
                connection.close(200, "test done".into()).await
            })?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        });
        let _ = cleanup.join();
    }
}

/// An app of its own environment, which lives (and is cleaned up) with it.
pub async fn spawn_app() -> TestApp {
    let env = TestEnv::new();
    let mut app = env.spawn(Role::All).await;
    app.env = Some(env);
    app
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    /// Set by [`spawn_app`]: dropped after the app is stopped.
    env: Option<TestEnv>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestApp {
    /// Stops the app (gracefully, in the background).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// A response: its status and its JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    pub fn str(&self, field: &str) -> &str {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no string {field:?} in {}", self.body))
    }

    /// Asserts the JSON error envelope with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(self.body["error"], code, "body: {}", self.body);
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "an error says what went wrong: {}",
            self.body
        );
    }
}

impl TestApp {
    /// A client of an app that runs elsewhere (another process).
    pub fn at(address: &str) -> TestApp {
        TestApp {
            address: address.to_owned(),
            client: reqwest::Client::new(),
            shutdown: CancellationToken::new(),
            env: None,
        }
    }

    /// `create_order`, or None when the server cannot be reached at all.
    pub async fn try_create_order(&self, user: &str, amount: &str) -> Option<Reply> {
        let response = self
            .client
            .post(format!("{}/api/orders/create_order", self.address))
            .query(&[("user_id", user), ("amount", amount)])
            .send()
            .await
            .ok()?;
        let status = response.status();
        let body = response.json().await.ok()?;
        Some(Reply { status, body })
    }

    /// Waits for /health/ready: database reachable, every relay and consumer connected (so
    /// the broker topology exists).
    pub async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self
                .client
                .get(format!("{}/health/ready", self.address))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            assert!(Instant::now() < deadline, "the app did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Reply {
        let response = self
            .client
            .request(method, format!("{}{path}", self.address))
            .query(query)
            .send()
            .await
            .expect("request sent");
        let status = response.status();
        let text = response.text().await.expect("body read");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("JSON body, got {status}: {text:?}"));
        Reply { status, body }
    }

    /// A POST carrying an `Idempotency-Key` header.
    pub async fn post_with_key(&self, path: &str, query: &[(&str, &str)], key: &str) -> Reply {
        let response = self
            .client
            .post(format!("{}{path}", self.address))
            .query(query)
            .header("Idempotency-Key", key)
            .send()
            .await
            .expect("request sent");
        let status = response.status();
        let body = response.json().await.expect("a JSON body");
        Reply { status, body }
    }

    pub async fn post(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        self.request(reqwest::Method::POST, path, query).await
    }

    /// `/metrics`, as Prometheus reads it.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .expect("request sent")
            .text()
            .await
            .expect("body read")
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        self.request(reqwest::Method::GET, path, query).await
    }

    pub async fn create_account(&self, user: &str) -> Reply {
        self.post("/api/payments/create_account", &[("user_id", user)])
            .await
    }

    pub async fn add_funds(&self, user: &str, amount: &str) -> Reply {
        self.post(
            "/api/payments/add_funds",
            &[("user_id", user), ("amount", amount)],
        )
        .await
    }

    pub async fn balance(&self, user: &str) -> Reply {
        self.get("/api/payments/balance", &[("user_id", user)])
            .await
    }

    pub async fn transactions(&self, user: &str) -> Reply {
        self.get("/api/payments/transactions", &[("user_id", user)])
            .await
    }

    pub async fn create_order(&self, user: &str, amount: &str) -> Reply {
        self.post(
            "/api/orders/create_order",
            &[("user_id", user), ("amount", amount)],
        )
        .await
    }

    pub async fn order(&self, id: &str) -> Reply {
        self.get("/api/orders/order", &[("id", id)]).await
    }

    pub async fn orders(&self, user: &str) -> Reply {
        self.get("/api/orders/orders", &[("user_id", user)]).await
    }

    /// An account holding `amount`.
    pub async fn funded_account(&self, user: &str, amount: &str) {
        assert_eq!(self.create_account(user).await.status, StatusCode::CREATED);
        assert_eq!(self.add_funds(user, amount).await.status, StatusCode::OK);
    }

    /// Polls the order until it leaves NEW, or fails after `within`.
    pub async fn wait_until_final(&self, id: &str, within: Duration) -> Reply {
        let deadline = Instant::now() + within;
        loop {
            let reply = self.order(id).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
            if reply.str("status") != "NEW" {
                return reply;
            }
            assert!(
                Instant::now() < deadline,
                "order {id} still NEW after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn scalar_i64(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect("query runs")
        .expect("one row");
    row.try_get_by_index::<i64>(0).expect("an integer")
}

/// Counts and sums over every table, to show that a rejected request changed nothing.
pub async fn snapshot(db: &DatabaseConnection) -> Vec<i64> {
    let mut values = Vec::new();
    for sql in [
        "SELECT count(*) FROM orders.orders",
        "SELECT count(*) FROM orders.outbox",
        "SELECT count(*) FROM payments.accounts",
        "SELECT coalesce(sum(balance_minor), 0)::BIGINT FROM payments.accounts",
        "SELECT count(*) FROM payments.transactions",
        "SELECT count(*) FROM payments.outbox",
    ] {
        values.push(scalar_i64(db, sql).await);
    }
    values
}

/// Money is never lost or created: top-ups = balances + FINISHED orders; every debit is one
/// FINISHED order and every FINISHED order one debit; no balance below zero.
pub async fn assert_money_conserved(db: &DatabaseConnection) {
    let top_ups = scalar_i64(db, "SELECT coalesce(sum(amount_minor), 0)::BIGINT FROM payments.transactions WHERE kind = 'top_up'").await;
    let balances = scalar_i64(
        db,
        "SELECT coalesce(sum(balance_minor), 0)::BIGINT FROM payments.accounts",
    )
    .await;
    let finished = scalar_i64(db, "SELECT coalesce(sum(amount_minor), 0)::BIGINT FROM orders.orders WHERE status = 'FINISHED'").await;
    assert_eq!(
        top_ups,
        balances + finished,
        "top-ups = balances + FINISHED orders"
    );
    let debits_without_finished = scalar_i64(
        db,
        "SELECT count(*) FROM payments.transactions t WHERE t.kind = 'debit' AND NOT EXISTS \
         (SELECT 1 FROM orders.orders o WHERE o.id = t.order_id AND o.status = 'FINISHED')",
    )
    .await;
    assert_eq!(
        debits_without_finished, 0,
        "every debit belongs to a FINISHED order"
    );
    let finished_without_one_debit = scalar_i64(
        db,
        "SELECT count(*) FROM orders.orders o WHERE o.status = 'FINISHED' AND (SELECT count(*) \
         FROM payments.transactions t WHERE t.order_id = o.id AND t.kind = 'debit') <> 1",
    )
    .await;
    assert_eq!(
        finished_without_one_debit, 0,
        "every FINISHED order was debited exactly once"
    );
    let negative = scalar_i64(
        db,
        "SELECT count(*) FROM payments.transactions WHERE balance_after_minor < 0",
    )
    .await;
    assert_eq!(negative, 0, "no balance ever went below zero");
}

/// Waits until both outboxes are empty of unsent rows (the relays caught up).
pub async fn wait_for_outboxes_drained(db: &DatabaseConnection, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let unsent = scalar_i64(
            db,
            "SELECT (SELECT count(*) FROM orders.outbox WHERE sent_at IS NULL) + \
             (SELECT count(*) FROM payments.outbox WHERE sent_at IS NULL)",
        )
        .await;
        if unsent == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{unsent} outbox rows still unsent after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `gozon serve` child process, for faults an in-process app cannot suffer (SIGKILL, SIGTERM).
pub struct Process {
    child: std::process::Child,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub app: TestApp,
}

impl TestEnv {
    pub async fn start_process(&self, role: &str) -> Process {
        self.start_process_with(role, &[], &[]).await
    }

    /// A `gozon serve` process with more flags and environment variables.
    pub async fn start_process_with(
        &self,
        role: &str,
        flags: &[&str],
        envs: &[(&str, &str)],
    ) -> Process {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args: Vec<String> = [
            "serve",
            "--role",
            role,
            "--database-url",
            &self.database_url,
            "--amqp-prefix",
            &self.prefix,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--queue-expires-secs",
            "120",
            "--db-max-connections",
            "8",
            // Many apps run at once: connect only as needed.
            "--db-min-connections",
            "1",
        ]
        .iter()
        .chain(flags)
        .map(|s| s.to_string())
        .collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = spawn_gozon(&args, &envs);
        let app = TestApp::at(&format!("http://127.0.0.1:{port}"));
        app.wait_until_ready().await;
        Process {
            child,
            args,
            envs,
            app,
        }
    }
}

fn spawn_gozon(args: &[String], envs: &[(String, String)]) -> std::process::Child {
    let logs = || {
        if std::env::var("TEST_LOG").is_ok() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        }
    };
    std::process::Command::new(env!("CARGO_BIN_EXE_gozon"))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdout(logs())
        .stderr(logs())
        .spawn()
        .expect("gozon starts")
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns the exit status and how long it took.
    pub fn terminate(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < within,
                "gozon did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same process again (same port, database and broker names).
    pub async fn restart(&mut self) {
        self.child = spawn_gozon(&self.args, &self.envs);
        self.app.wait_until_ready().await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `gozon` binary with `args`; returns its exit code and standard output.
pub fn gozon(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gozon"))
        .args(args)
        .output()
        .expect("gozon runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        eprintln!(
            "gozon {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (output.status.code(), stdout)
}
