//! Past one broker node: an instance names several nodes and reaches a live one in one attempt;
//! readiness says which node each connection uses. And a database that does not answer yet is
//! waited for at start, while one that refuses ends the start.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

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
    // Ready once each work has a live link; the second links come up just after.
    let ready = all_links_up(&app).await;
    let nodes = ready["broker"].as_object().expect("the node of each task");
    assert_eq!(
        nodes.len(),
        10,
        "two relays, and two consumers of two lanes, each lane over two links: {ready}"
    );
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
async fn a_silent_node_costs_a_stagger_not_a_connect_timeout() {
    let env = TestEnv::new();
    // A node that accepts TCP connections (the kernel does, from its backlog) and never says a
    // word: a node partitioned away, as a client first meets it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut settings = env.settings();
    settings.amqp_url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f,{AMQP}");
    // Tried one after the other, each task would wait 30 s on the silent node first.
    settings.amqp_connect_timeout_ms = 30_000;
    settings.amqp_timeout_ms = 30_000;
    // Two links per consumer, starting at different nodes: one of each starts at the silent one.
    settings.consumer_links = 2;
    let started = Instant::now();
    let app = env.spawn_with(&settings, Role::All).await;
    let ready = all_links_up(&app).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "every link up after {:?}",
        started.elapsed()
    );
    let nodes = ready["broker"].as_object().unwrap();
    assert!(
        nodes.values().all(|node| node == "127.0.0.1:5672"),
        "{ready}"
    );
    drop(silent);
}

/// Readiness, once every consumer's two links are connected, to two different nodes (within 20 s).
async fn links_apart(app: &crate::helpers::TestApp) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = all_links_up(app).await;
        let mut nodes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (task, node) in consumer_nodes(&ready) {
            let work = task.split(" (link").next().unwrap_or_default().to_owned();
            nodes.entry(work).or_default().push(node);
        }
        if nodes
            .values()
            .all(|links| links.len() == 2 && links[0] != links[1])
        {
            return ready;
        }
        assert!(Instant::now() < deadline, "links not apart: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Readiness, once every link it lists is connected (within 10 s).
async fn all_links_up(app: &crate::helpers::TestApp) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = app.get("/health/ready", &[]).await.body;
        let links = ready["broker"].as_object().cloned().unwrap_or_default();
        if !links.is_empty() && links.values().all(|node| node.is_string()) {
            return ready;
        }
        assert!(Instant::now() < deadline, "links still down: {ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A broker node as its clients see it, forwarding to the real broker, that can go silent or
/// slow: while frozen it moves no byte either way and closes nothing, as a node partitioned away
/// looks from the client's side; once slowed, its answers (confirms, deliveries, heartbeats)
/// arrive that late, as from a slow but working broker.
struct SilentableNode {
    port: u16,
    frozen: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
}

impl SilentableNode {
    async fn start() -> SilentableNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, frozen_watch) = watch::channel(false);
        let (delay, delay_watch) = watch::channel(Duration::ZERO);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (broker_read, broker_write) = broker.into_split();
                let frozen = frozen_watch.clone();
                tokio::spawn(pump(client_read, broker_write, frozen.clone(), None));
                let late = Some(delay_watch.clone());
                tokio::spawn(pump(broker_read, client_write, frozen, late));
            }
        });
        SilentableNode {
            port,
            frozen,
            delay,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn label(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    fn slow_down(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}

/// Forwards what `from` says to `to`, each chunk `delay` after it arrived and in order, and
/// nothing while frozen (what arrived as the node went silent is held until it speaks again).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    delay: Option<watch::Receiver<Duration>>,
) {
    let (send, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let mut writer_frozen = frozen.clone();
    tokio::spawn(async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if writer_frozen.wait_for(|frozen| !frozen).await.is_err() {
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let late = delay
            .as_ref()
            .map_or(Duration::ZERO, |delay| *delay.borrow());
        let at = tokio::time::Instant::now() + late;
        if send.send((at, buffer[..read].to_vec())).is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_consumer_keeps_consuming_over_its_other_link_while_one_node_is_silent() {
    let env = TestEnv::new();
    let (first, second) = (SilentableNode::start().await, SilentableNode::start().await);
    let mut settings = env.settings();
    settings.amqp_url = format!("{},{}", first.url(), second.url());
    // The default heartbeat (10 s): lapin and the broker notice the silence only after ~20 s.
    settings.amqp_heartbeat_secs = 10;
    settings.amqp_timeout_ms = 1_000;
    // One lane read over two links (several lanes are read over one link each, on the node
    // that leads the lane).
    settings.amqp_queue_lanes = 1;
    settings.consumer_links = 2;
    // One delivery in hand per link: the silent link holds at most one of each queue's.
    settings.consumer_concurrency = 2;
    settings.prefetch = 2;
    // Each link on its own node however slowly the first one answers on busy cores.
    settings.amqp_connect_stagger_ms = 5_000;
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    app.funded_account("silent", "100").await;
    // Each link on its own node: where a slow first answer (a 1 s timeout on busy cores) put
    // one on the other, it goes back within a home check (5 s).
    let ready = links_apart(&app).await;
    let links = consumer_nodes(&ready);
    let link = |queue: &str, n: usize| {
        links
            .iter()
            .find(|(task, _)| task.ends_with(&format!("{queue} (link {n} of 2)")))
            .map(|(_, node)| node.clone())
            .unwrap_or_else(|| panic!("no link {n} of {queue}: {ready}"))
    };
    for queue in ["payments.payment-requests", "orders.payment-results"] {
        assert_ne!(link(queue, 1), link(queue, 2), "{ready}");
    }
    let silent = if link("payments.payment-requests", 1) == first.label() {
        &first
    } else {
        &second
    };
    silent.freeze(true);

    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(app.create_order("silent", "1").await.str("id").to_owned());
    }
    // Each queue's silent link holds at most one delivery (a relay on the silent node gives its
    // batch up after 1 s and sends it again elsewhere): the rest is paid well before either side
    // gives the silent connections up.
    let deadline = Instant::now() + Duration::from_secs(8);
    let finals = loop {
        let mut finals = 0;
        for id in &ids {
            if app.order(id).await.str("status") != "NEW" {
                finals += 1;
            }
        }
        if finals >= ids.len() - 2 || Instant::now() > deadline {
            break finals;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        finals >= ids.len() - 2,
        "only {finals} of {} orders final while one node is silent",
        ids.len()
    );

    silent.freeze(false);
    for id in &ids {
        let order = app.wait_until_final(id, Duration::from_secs(30)).await;
        assert_eq!(order.str("status"), "FINISHED", "{}", order.body);
    }
    assert_eq!(app.balance("silent").await.str("balance"), "88.00");
}

#[tokio::test]
async fn a_relay_whose_node_goes_silent_sends_its_batch_again_elsewhere() {
    let env = TestEnv::new();
    let (first, second) = (SilentableNode::start().await, SilentableNode::start().await);
    // Payments straight on the broker; Orders through the two nodes, its relay and its one
    // consumer link on the same one.
    let payments = env.spawn(Role::Payments).await;
    let mut settings = env.settings();
    settings.amqp_url = format!("{},{}", first.url(), second.url());
    settings.consumer_links = 1;
    settings.amqp_queue_lanes = 1;
    // Nothing but the relay's confirm patience (1 s by default) gives the silent node up: the
    // heartbeat and every other broker timeout are far longer.
    settings.amqp_heartbeat_secs = 60;
    settings.amqp_timeout_ms = 60_000;
    settings.amqp_connect_timeout_ms = 60_000;
    let orders = env.spawn_with(&settings, Role::Orders).await;
    orders.wait_until_ready().await;
    payments.funded_account("relayed", "10").await;
    let ready = all_links_up(&orders).await;
    let relay = ready["broker"]["orders-outbox-relay"].as_str().unwrap();
    let silent = if relay == first.label() {
        &first
    } else {
        &second
    };
    silent.freeze(true);
    let order = orders.create_order("relayed", "4").await;
    // The request reaches Payments through the other node: the debit lands.
    let deadline = Instant::now() + Duration::from_secs(10);
    while payments.balance("relayed").await.str("balance") != "6.00" {
        assert!(
            Instant::now() < deadline,
            "the payment request was not sent again through the other node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The answer waits on Orders' one consumer link, silent too, until the node speaks again.
    silent.freeze(false);
    let paid = orders
        .wait_until_final(order.str("id"), Duration::from_secs(15))
        .await;
    assert_eq!(paid.str("status"), "FINISHED");
    assert_eq!(payments.balance("relayed").await.str("balance"), "6.00");
}

#[tokio::test]
async fn a_slow_broker_is_not_sent_copies_of_every_batch() {
    let env = TestEnv::new();
    let node = SilentableNode::start().await;
    let mut settings = env.settings();
    settings.amqp_url = node.url();
    settings.amqp_timeout_ms = 20_000;
    settings.amqp_connect_timeout_ms = 20_000;
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    app.funded_account("slow", "100").await;
    // Every confirm now takes 1.2 s, more than the relays' first patience (1 s).
    node.slow_down(Duration::from_millis(1_200));
    let mut ids = Vec::new();
    // One order every 1.5 s: each its own batch, once the relays have reconnected.
    for _ in 0..10 {
        ids.push(app.create_order("slow", "1").await.str("id").to_owned());
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    for id in &ids {
        let order = app.wait_until_final(id, Duration::from_secs(60)).await;
        assert_eq!(order.str("status"), "FINISHED", "{}", order.body);
    }
    assert_eq!(app.balance("slow").await.str("balance"), "90.00");
    let text = app.metrics_text().await;
    let copies: f64 = text
        .lines()
        .filter(|line| {
            line.starts_with("gozon_messages_consumed_total")
                && line.contains(r#"outcome="duplicate""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Each relay gives up its first batch or two, then waits as long as the broker takes: of
    // 20 messages (10 requests, 10 answers), a few arrive twice, not most.
    assert!(copies <= 4.0, "{copies} copies delivered:\n{text}");
}

/// A stand-in for a queue whose leader is lost: the queue's Raft server suspended on the broker
/// (what is published to it is then never confirmed, as while a new leader is being elected),
/// by a process on the broker that holds the suspension until dropped (60 s at most).
struct SuspendedQueue {
    holder: String,
}

fn broker_eval(code: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["eval", code])
        .output()
        .expect("rabbitmqctl runs (the broker's own CLI, beside the local RabbitMQ)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl eval {code}: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

impl SuspendedQueue {
    fn suspend(queue: &str) -> SuspendedQueue {
        let holder = format!("gozon_hold_{queue}");
        let said = broker_eval(&format!(
            r#"{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)),
               {{Ra, _}} = amqqueue:get_pid(Q), Pid = whereis(Ra),
               Holder = spawn(fun() -> erlang:suspend_process(Pid),
                                       receive resume -> ok after 60000 -> ok end end),
               register(list_to_atom("{holder}"), Holder),
               timer:sleep(100), erlang:process_info(Pid, status)."#
        ));
        assert!(said.contains("suspended"), "{queue} not suspended: {said}");
        SuspendedQueue { holder }
    }
}

impl Drop for SuspendedQueue {
    fn drop(&mut self) {
        let holder = &self.holder;
        broker_eval(&format!(
            r#"case whereis(list_to_atom("{holder}")) of undefined -> ok; P -> P ! resume, ok end."#
        ));
    }
}

fn consumed(text: &str, queue: &str, outcome: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.starts_with("gozon_messages_consumed_total")
                && line.contains(&format!(r#"queue="{queue}""#))
                && line.contains(&format!(r#"outcome="{outcome}""#))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_relay_whose_lane_stops_confirming_sends_on_through_the_next() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.amqp_queue_lanes = 2;
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    all_links_up(&app).await;
    app.funded_account("lanes", "100").await;
    let first = app.create_order("lanes", "10").await;
    let paid = app
        .wait_until_final(first.str("id"), Duration::from_secs(10))
        .await;
    assert_eq!(paid.str("status"), "FINISHED");

    // The first lane of Payments' queue stops confirming, as while its leader is lost.
    let requests = format!("{}.payments.payment-requests", env.prefix);
    let held = SuspendedQueue::suspend(&requests);
    let placed = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.create_order("lanes", "3").await.str("id").to_owned());
    }
    for id in &ids {
        let order = app.wait_until_final(id, Duration::from_secs(15)).await;
        assert_eq!(order.str("status"), "FINISHED", "{}", order.body);
    }
    // One confirm timeout (1 s) and a reconnect, not the whole suspension (60 s).
    let took = placed.elapsed();
    assert!(took < Duration::from_secs(8), "settled after {took:?}");
    let text = app.metrics_text().await;
    let second_lane = format!("{requests}.lane-2");
    assert!(
        consumed(&text, &second_lane, "applied") >= 5.0,
        "the requests did not go through the second lane:\n{text}"
    );

    // Back, whatever the first lane delivers of what it was sent meanwhile is a copy: each
    // request was applied once, over one lane or the other.
    drop(held);
    crate::helpers::wait_for_outboxes_drained(&env.db().await, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = app.metrics_text().await;
    let applied = consumed(&text, &requests, "applied") + consumed(&text, &second_lane, "applied");
    assert_eq!(applied, 6.0, "{text}");
    assert_eq!(app.balance("lanes").await.str("balance"), "75.00");
    crate::helpers::assert_money_conserved(&env.db().await).await;
}

/// Whether the broker routes a message published to `exchange` under `routing_key`.
async fn routed(exchange: &str, routing_key: &str) -> bool {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            mandatory,
            b"{}",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    confirm.take_message().is_none()
}

#[tokio::test]
async fn a_lane_a_deployment_no_longer_has_is_unbound_and_read_empty() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.amqp_queue_lanes = 2;
    // One link per lane: the lane's first link alone reads it (and the retired lane below).
    settings.consumer_links = 1;
    let before = env.spawn_with(&settings, Role::Payments).await;
    before.wait_until_ready().await;
    all_links_up(&before).await;
    before.funded_account("retired", "10").await;
    before.shutdown();
    let client = reqwest::Client::new();
    while client
        .get(format!("{}/health/live", before.address))
        .send()
        .await
        .is_ok()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A request left in the second lane while nothing reads it.
    let exchange = crate::saga::exchange_for(&env.prefix, "payment.requested.v1");
    let message_id = uuid::Uuid::new_v4();
    let body = crate::saga::payment_requested(message_id, uuid::Uuid::new_v4(), "retired", "4");
    crate::saga::publish_with_signature(
        &exchange,
        "lane-2.payment.requested.v1",
        &message_id.to_string(),
        &body,
        Some(&crate::saga::sign(&body)),
    )
    .await;

    // Back with one lane: the second is read empty, and no longer bound.
    settings.amqp_queue_lanes = 1;
    let after = env.spawn_with(&settings, Role::Payments).await;
    after.wait_until_ready().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while after.balance("retired").await.str("balance") != "6.00" {
        assert!(
            Instant::now() < deadline,
            "the request in the retired lane was not read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!routed(&exchange, "lane-2.payment.requested.v1").await);
    assert!(routed(&exchange, "payment.requested.v1").await);

    // The lane's own queue deleted under the link that reads it and the retired lane: the
    // link does not go on reading the retired lane alone, it comes back and declares the
    // queue again, and a request sent there is read.
    let queue = format!("{}.payments.payment-requests", env.prefix);
    let connection =
        lapin::Connection::connect(crate::helpers::AMQP, lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !routed(&exchange, "payment.requested.v1").await {
        assert!(
            Instant::now() < deadline,
            "the deleted queue was not declared again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message_id = uuid::Uuid::new_v4();
    let body = crate::saga::payment_requested(message_id, uuid::Uuid::new_v4(), "retired", "4");
    crate::saga::publish_with_signature(
        &exchange,
        "payment.requested.v1",
        &message_id.to_string(),
        &body,
        Some(&crate::saga::sign(&body)),
    )
    .await;
    while after.balance("retired").await.str("balance") != "2.00" {
        assert!(
            Instant::now() < deadline,
            "the request in the declared-again queue was not read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A broker node as its clients see it, forwarding to the real broker, that can be stopped
/// (every connection through it closed, new ones refused) and started again on the same port.
struct StoppableNode {
    port: u16,
    up: watch::Sender<bool>,
}

impl StoppableNode {
    async fn start() -> StoppableNode {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (up, mut up_watch) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                if !until(&mut up_watch, true).await {
                    return;
                }
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_reuseaddr(true).unwrap();
                socket.bind(([127, 0, 0, 1], port).into()).unwrap();
                let listener = socket.listen(64).unwrap();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let Ok(broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                                continue;
                            };
                            let mut stopped = up_watch.clone();
                            tokio::spawn(async move {
                                let (mut client, mut broker) = (client, broker);
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
                                    _ = until(&mut stopped, false) => {}
                                }
                            });
                        }
                        _ = until(&mut up_watch, false) => break,
                    }
                }
            }
        });
        StoppableNode { port, up }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn label(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// Waits until `watch` says `state` (false: its sender is gone).
async fn until(watch: &mut watch::Receiver<bool>, state: bool) -> bool {
    watch.wait_for(|now| *now == state).await.is_ok()
}

/// The node each consumer link is on, by task name.
fn consumer_nodes(ready: &serde_json::Value) -> Vec<(String, String)> {
    // No "broker" while readiness answers otherwise (as it may while a node stops): none.
    ready["broker"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(task, _)| task.starts_with("consumer"))
        .map(|(task, node)| (task.clone(), node.as_str().unwrap_or("down").to_owned()))
        .collect()
}

#[tokio::test]
async fn a_consumer_link_a_failover_moved_goes_back_to_its_node_once_it_answers() {
    let env = TestEnv::new();
    let (first, second) = (StoppableNode::start().await, StoppableNode::start().await);
    let mut settings = env.settings();
    settings.amqp_url = format!("{},{}", first.url(), second.url());
    // One lane over two links, each starting at its own node.
    settings.amqp_queue_lanes = 1;
    settings.consumer_links = 2;
    // Each link on its own node however slowly the first one answers on busy cores.
    settings.amqp_connect_stagger_ms = 5_000;
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    app.funded_account("home", "100").await;
    let ready = links_apart(&app).await;
    let homes = consumer_nodes(&ready);
    assert_eq!(homes.len(), 4, "two queues, two links each: {ready}");
    let on_first = |links: &[(String, String)]| {
        links
            .iter()
            .filter(|(_, node)| *node == first.label())
            .count()
    };
    assert_eq!(
        on_first(&homes),
        2,
        "one link of each queue per node: {ready}"
    );

    // The first node stops: its links reconnect to the second.
    first.set_up(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let links = consumer_nodes(&app.get("/health/ready", &[]).await.body);
        if links.len() == 4 && links.iter().all(|(_, node)| *node == second.label()) {
            break;
        }
        assert!(Instant::now() < deadline, "links not all moved: {links:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Orders placed while it comes back, and while the links move home.
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.create_order("home", "1").await.str("id").to_owned());
    }
    first.set_up(true);
    let moved_back = Instant::now();
    let deadline = moved_back + Duration::from_secs(15);
    loop {
        if ids.len() < 40 {
            ids.push(app.create_order("home", "1").await.str("id").to_owned());
        }
        let links = consumer_nodes(&app.get("/health/ready", &[]).await.body);
        if links == homes {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "links not back on their nodes: {links:?}, they started on {homes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        let order = app.wait_until_final(id, Duration::from_secs(20)).await;
        assert_eq!(order.str("status"), "FINISHED", "{}", order.body);
    }
    let balance = 100 - ids.len();
    assert_eq!(
        app.balance("home").await.str("balance"),
        format!("{balance}.00"),
        "each of {} orders debited once",
        ids.len()
    );
}
