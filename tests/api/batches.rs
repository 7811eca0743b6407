//! Deliveries that wait are applied in batches, one transaction each; a batch that fails (here:
//! a poison message inside it) is applied again one by one, so the poison goes to the
//! dead-letter queue alone and every other message takes effect exactly once.

use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use gozon::app::cli::Role;
use gozon::{app, orders, payments};

use crate::helpers::{AMQP, TestEnv, scalar_i64, wait_for_outboxes_drained};
use crate::poison::wait_for_dead_letters;
use crate::saga::{payment_requested, publish_payment_request, publish_raw};

/// Consumers of `queue` the broker knows of.
async fn consumers_of(queue: &str) -> u32 {
    let connection = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    declared.consumer_count()
}

/// The value of the metric line that starts with `prefix`, 0 when there is none.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0.0, |value| value.parse().unwrap())
}

/// Funds an account of 100.00 for each of `users` through a payments app, stops it, and waits
/// until nobody consumes payment requests; the queue's name.
async fn funded_with_nobody_consuming(env: &TestEnv, users: &[&str]) -> String {
    {
        let app = env.spawn(Role::Payments).await;
        for user in users {
            app.funded_account(user, "100").await;
        }
        app.shutdown();
    }
    until_nobody_consumes(env, Role::Payments, &payments::PAYMENT_REQUESTS).await
}

/// Waits until nobody consumes `role`'s queue `spec` (its app was shut down); the queue's name.
async fn until_nobody_consumes(
    env: &TestEnv,
    role: Role,
    spec: &gozon::messaging::amqp::QueueSpec,
) -> String {
    let broker = app::broker(&env.settings(), role).unwrap();
    let queue = broker.queue_name(spec);
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumers_of(&queue).await > 0 {
        assert!(Instant::now() < deadline, "the first app still consumes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    queue
}

#[tokio::test]
async fn waiting_deliveries_are_applied_in_batches_and_a_poison_one_is_split_out() {
    let env = TestEnv::new();
    let users = ["bat-a", "bat-b", "bat-c", "bat-d"];
    let queue = funded_with_nobody_consuming(&env, &users).await;

    // While nobody consumes: 12 payment requests (3 per user, 10.00 each), and amid them a
    // refund of an order that was never debited (readable, but it can never be applied).
    let mut orders = Vec::new();
    let poison = uuid::Uuid::now_v7().to_string();
    for i in 0..12 {
        if i == 6 {
            let refund = serde_json::to_vec(&serde_json::json!({
                "message_id": poison, "type": "refund.requested.v1",
                "correlation_id": "batch-poison", "occurred_at": "2026-12-04T00:00:00Z",
                "payload": {"order_id": uuid::Uuid::now_v7(), "user_id": "bat-a", "amount": "10.00"},
            }))
            .unwrap();
            publish_raw(&env.prefix, "refund.requested.v1", &poison, &refund).await;
        }
        let (message_id, order_id) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let body = payment_requested(message_id, order_id, users[i % 4], "10.00");
        publish_payment_request(&env.prefix, message_id, &body).await;
        orders.push(order_id);
    }

    // One delivery at a time in hand: the first is applied alone, the rest wait and come as
    // batches.
    let mut settings = env.settings();
    settings.consumer_concurrency = 1;
    let app = env.spawn_with(&settings, Role::Payments).await;
    app.wait_until_ready().await;
    let db = env.db().await;
    let debited = "SELECT count(*) FROM payments.order_payments WHERE outcome = 'debited'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while scalar_i64(&db, debited).await < 12 {
        assert!(Instant::now() < deadline, "not every request was applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letters = wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 1).await;
    assert_eq!(letters[0].message_id.as_deref(), Some(poison.as_str()));

    for user in users {
        assert_eq!(app.balance(user).await.str("balance"), "70.00", "{user}");
    }
    let debits = "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'";
    assert_eq!(scalar_i64(&db, debits).await, 12, "one debit per order");
    let answers =
        "SELECT count(*) FROM payments.outbox WHERE message_type = 'payment.succeeded.v1'";
    assert_eq!(scalar_i64(&db, answers).await, 12, "one answer per order");
    let refunds = "SELECT count(*) FROM payments.transactions WHERE kind = 'refund'";
    assert_eq!(
        scalar_i64(&db, refunds).await,
        0,
        "the poison changed nothing"
    );
    let balances = "SELECT sum(balance_minor)::BIGINT FROM payments.accounts";
    assert_eq!(scalar_i64(&db, balances).await, 4 * 10_000 - 12 * 1_000);

    let text = app.metrics_text().await;
    let queue_label = format!("queue=\"{queue}\"");
    let batched = metric(
        &text,
        &format!("gozon_consumer_batched_messages_total{{{queue_label}}}"),
    );
    let retried = metric(
        &text,
        &format!("gozon_consumer_batches_total{{{queue_label},outcome=\"retried\"}}"),
    );
    assert!(batched >= 2.0, "no batch of several was committed:\n{text}");
    assert!(
        retried >= 1.0,
        "the batch with the poison was not tried again without it:\n{text}"
    );
}

#[tokio::test]
async fn a_message_twice_in_one_batch_is_applied_once() {
    let env = TestEnv::new();
    let users = ["twice-a", "twice-b"];
    let queue = funded_with_nobody_consuming(&env, &users).await;

    // While nobody consumes: 6 payment requests of 10.00 and 2 of 500.00 (more than either
    // holds), each published twice in a row with the same message id, so both copies wait in
    // the queue and come in one batch.
    for i in 0..8 {
        let (message_id, order_id) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let amount = if i < 6 { "10.00" } else { "500.00" };
        let body = payment_requested(message_id, order_id, users[i % 2], amount);
        for _ in 0..2 {
            publish_payment_request(&env.prefix, message_id, &body).await;
        }
    }

    let mut settings = env.settings();
    settings.consumer_concurrency = 1;
    let app = env.spawn_with(&settings, Role::Payments).await;
    app.wait_until_ready().await;
    let db = env.db().await;
    let queue_label = format!("queue=\"{queue}\"");
    let consumed = |outcome: &str| {
        format!("gozon_messages_consumed_total{{{queue_label},outcome=\"{outcome}\"}}")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = app.metrics_text().await;
        if metric(&text, &consumed("applied")) + metric(&text, &consumed("duplicate")) >= 16.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every copy was consumed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for user in users {
        assert_eq!(app.balance(user).await.str("balance"), "70.00", "{user}");
    }
    let debits = "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'";
    assert_eq!(scalar_i64(&db, debits).await, 6, "one debit per order");
    let answers =
        "SELECT count(*) FROM payments.outbox WHERE message_type = 'payment.succeeded.v1'";
    assert_eq!(
        scalar_i64(&db, answers).await,
        6,
        "one answer per paid order"
    );
    let refusals = "SELECT count(*) FROM payments.outbox WHERE message_type = 'payment.failed.v1'";
    assert_eq!(scalar_i64(&db, refusals).await, 2, "one refusal per order");
    let text = app.metrics_text().await;
    assert_eq!(metric(&text, &consumed("applied")), 8.0, "{text}");
    assert_eq!(metric(&text, &consumed("duplicate")), 8.0, "{text}");
    // Inside a batch, a debit that succeeds is one statement; a refusal takes the whole path.
    let in_batch = metric(
        &text,
        &format!(
            "gozon_consumer_one_statement_total{{queue=\"{}\",outcome=\"applied_in_batch\"}}",
            payments::PAYMENT_REQUESTS.suffix
        ),
    );
    assert!(
        in_batch >= 2.0,
        "no batched debit took one statement:\n{text}"
    );
    // With one batch in hand at a time, the first delivery (or the first few) make a batch
    // and the rest, up to 16, the next: at most one message's copies fall on either side.
    let batched = metric(
        &text,
        &format!("gozon_consumer_batched_messages_total{{{queue_label}}}"),
    );
    let committed = metric(
        &text,
        &format!("gozon_consumer_batches_total{{{queue_label},outcome=\"committed\"}}"),
    );
    assert!(
        batched >= 14.0 && committed <= 2.0,
        "the copies were not batched together:\n{text}"
    );
}

#[tokio::test]
async fn payment_answers_that_wait_are_settled_in_a_batch_one_statement_each() {
    let env = TestEnv::new();
    let payments_app = env.spawn(Role::Payments).await;
    let db = env.db().await;
    payments_app.funded_account("answers-a", "100").await;
    payments_app.shutdown();
    until_nobody_consumes(&env, Role::Payments, &payments::PAYMENT_REQUESTS).await;

    // Six orders of 10.00 and one of 500.00 (more than the account holds), their requests
    // sent while Payments is away; then Orders goes away and Payments answers them all.
    let orders_app = env.spawn(Role::Orders).await;
    let mut ids = Vec::new();
    for amount in ["10", "10", "10", "10", "10", "10", "500"] {
        let order = orders_app.create_order("answers-a", amount).await;
        ids.push(order.str("id").to_owned());
    }
    wait_for_outboxes_drained(&db, Duration::from_secs(10)).await;
    orders_app.shutdown();
    let queue = until_nobody_consumes(&env, Role::Orders, &orders::PAYMENT_RESULTS).await;
    let payments_app = env.spawn(Role::Payments).await;
    let answered = "SELECT count(*) FROM payments.outbox WHERE sent_at IS NOT NULL";
    let deadline = Instant::now() + Duration::from_secs(10);
    while scalar_i64(&db, answered).await < 7 {
        assert!(
            Instant::now() < deadline,
            "Payments did not answer every request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The answers wait in the queue and come to the new Orders app as a batch.
    let mut settings = env.settings();
    settings.consumer_concurrency = 1;
    let orders_app = env.spawn_with(&settings, Role::Orders).await;
    let mut statuses = Vec::new();
    for id in &ids {
        let order = orders_app
            .wait_until_final(id, Duration::from_secs(10))
            .await;
        statuses.push(order.str("status").to_owned());
    }
    assert_eq!(statuses[..6], ["FINISHED"; 6]);
    assert_eq!(statuses[6], "CANCELLED");
    assert_eq!(
        payments_app.balance("answers-a").await.str("balance"),
        "40.00"
    );
    let text = orders_app.metrics_text().await;
    let batched = metric(
        &text,
        &format!("gozon_consumer_batched_messages_total{{queue=\"{queue}\"}}"),
    );
    let in_batch = metric(
        &text,
        &format!(
            "gozon_consumer_one_statement_total{{queue=\"{}\",outcome=\"applied_in_batch\"}}",
            orders::PAYMENT_RESULTS.suffix
        ),
    );
    assert!(batched >= 2.0, "the answers were not batched:\n{text}");
    assert!(
        in_batch >= 1.0,
        "no batched answer took one statement:\n{text}"
    );
}
