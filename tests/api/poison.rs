//! Messages that can never be applied go to a dead-letter queue instead of looping, and the
//! consumers keep going; `gozon dlq` lists and replays them.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use gozon::messaging::dlq;
use gozon::{app, orders, payments};

use crate::helpers::{TestEnv, gozon, scalar_i64, snapshot};
use crate::saga::{payment_requested, publish_raw, publish_with_signature, sign};

pub async fn wait_for_dead_letters(
    env: &TestEnv,
    queue: &gozon::messaging::amqp::QueueSpec,
    count: usize,
) -> Vec<dlq::DeadLetter> {
    let broker = app::broker(&env.settings(), Role::All).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let letters = dlq::list(&broker, queue, 100).await.unwrap();
        if letters.len() >= count {
            assert_eq!(letters.len(), count, "{letters:?}");
            return letters;
        }
        assert!(
            Instant::now() < deadline,
            "only {} dead letters: {letters:?}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn envelope(message_type: &str, payload: serde_json::Value) -> (String, Vec<u8>) {
    let id = uuid::Uuid::now_v7().to_string();
    let body = serde_json::json!({
        "message_id": id, "type": message_type, "correlation_id": "poison-test",
        "occurred_at": "2026-11-25T00:00:00Z", "payload": payload,
    });
    (id, serde_json::to_vec(&body).unwrap())
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_change_nothing() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("quin", "100").await;
    let db = env.db().await;
    let before = snapshot(&db).await;

    // Onto the payments queue: garbage bytes, and a request whose payload is not a request.
    publish_raw(
        &env.prefix,
        "payment.requested.v1",
        "garbage-1",
        b"\x00\xffnot json at all",
    )
    .await;
    let (bad_payload, body) = envelope(
        "payment.requested.v1",
        serde_json::json!({"order_id": "nope"}),
    );
    publish_raw(&env.prefix, "payment.requested.v1", &bad_payload, &body).await;
    // Onto the orders queue: a well-formed envelope of a type nobody knows (routed by a key
    // the queue is bound to), and a payment result for an order that does not exist.
    let (unknown_type, body) = envelope("payment.refunded.v9", serde_json::json!({}));
    publish_raw(&env.prefix, "payment.succeeded.v1", &unknown_type, &body).await;
    let (unknown_order, body) = envelope(
        "payment.failed.v1",
        serde_json::json!({"order_id": uuid::Uuid::now_v7(), "user_id": "quin", "amount": "1.00", "reason": "no_account"}),
    );
    publish_raw(&env.prefix, "payment.failed.v1", &unknown_order, &body).await;

    // A well-formed request for an order nobody placed, unsigned, and one with a forged
    // signature: Payments never sees them as requests, so no account is touched.
    let forged_order = uuid::Uuid::now_v7();
    let unsigned = uuid::Uuid::now_v7();
    let body = payment_requested(unsigned, forged_order, "quin", "50.00");
    publish_with_signature(
        &crate::saga::exchange_for(&env.prefix, "payment.requested.v1"),
        "payment.requested.v1",
        &unsigned.to_string(),
        &body,
        None,
    )
    .await;
    let forged = uuid::Uuid::now_v7();
    let body = payment_requested(forged, forged_order, "quin", "50.00");
    let wrong_key = gozon::messaging::signing::MessageKey::new("not-the-key").sign(&body);
    publish_with_signature(
        &crate::saga::exchange_for(&env.prefix, "payment.requested.v1"),
        "payment.requested.v1",
        &forged.to_string(),
        &body,
        Some(&wrong_key),
    )
    .await;

    let payments_dead = wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 4).await;
    for id in [unsigned, forged] {
        assert!(
            payments_dead
                .iter()
                .any(|l| l.message_id.as_deref() == Some(id.to_string().as_str()))
        );
    }
    let orders_dead = wait_for_dead_letters(&env, &orders::PAYMENT_RESULTS, 2).await;
    assert!(
        payments_dead
            .iter()
            .any(|l| l.message_id.as_deref() == Some("garbage-1"))
    );
    assert!(
        payments_dead
            .iter()
            .any(|l| l.message_id.as_deref() == Some(bad_payload.as_str()))
    );
    assert!(
        orders_dead
            .iter()
            .any(|l| l.message_id.as_deref() == Some(unknown_type.as_str()))
    );
    assert!(
        orders_dead
            .iter()
            .any(|l| l.message_id.as_deref() == Some(unknown_order.as_str()))
    );
    assert!(
        payments_dead
            .iter()
            .all(|l| l.reason.as_deref() == Some("rejected")),
        "{payments_dead:?}"
    );

    assert_eq!(snapshot(&db).await, before, "poison changed nothing");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM payments.inbox").await,
        0
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM orders.inbox").await,
        0
    );

    // The consumers kept going: the saga still works.
    let order = app.create_order("quin", "10").await;
    let order = app
        .wait_until_final(order.str("id"), Duration::from_secs(5))
        .await;
    assert_eq!(order.str("status"), "FINISHED");
}

#[tokio::test]
async fn a_replayed_dead_letter_is_handled_again() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Payments).await;
    app.funded_account("rue", "100").await;
    let broker = app::broker(&env.settings(), Role::Payments).unwrap();
    let queue = broker.queue_name(&payments::PAYMENT_REQUESTS);

    // A valid request parked in the DLQ (as if an earlier outage had exhausted its deliveries),
    // and a garbage one.
    let (parked, body) = envelope(
        "payment.requested.v1",
        serde_json::json!({"order_id": uuid::Uuid::now_v7(), "user_id": "rue", "amount": "25.00"}),
    );
    publish_to_dead_letter_exchange(&env.prefix, &queue, &parked, &body).await;
    publish_raw(&env.prefix, "payment.requested.v1", "garbage-2", b"{{{").await;
    wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 2).await;

    let replayed = dlq::replay(&broker, &payments::PAYMENT_REQUESTS, 100, Some(&parked))
        .await
        .unwrap();
    assert_eq!(replayed.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.balance("rue").await.str("balance") != "75.00" {
        assert!(
            Instant::now() < deadline,
            "the replayed request was not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only the garbage is left; replaying it lands it back in the DLQ, once.
    let left = wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 1).await;
    assert_eq!(left[0].message_id.as_deref(), Some("garbage-2"));
    let (code, out) = gozon(&[
        "dlq",
        "replay",
        "--queue",
        "payments",
        "--amqp-prefix",
        &env.prefix,
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("1 message(s)"), "{out}");
    let left = wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 1).await;
    assert_eq!(left[0].message_id.as_deref(), Some("garbage-2"));
    let (_, listed) = gozon(&[
        "dlq",
        "list",
        "--queue",
        "payments",
        "--amqp-prefix",
        &env.prefix,
    ]);
    assert!(listed.contains("id=garbage-2"), "{listed}");
}

async fn publish_to_dead_letter_exchange(prefix: &str, queue: &str, message_id: &str, body: &[u8]) {
    let exchange = format!("{prefix}.payments.dead-letter");
    publish_with_signature(&exchange, queue, message_id, body, Some(&sign(body))).await;
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_retried_a_bounded_number_of_times_then_dead_lettered() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.delivery_limit = 2;
    let app = env.spawn_with(&settings, Role::Payments).await;
    app.wait_until_ready().await;
    let db = env.db().await;

    // An order whose payment record is stuck half-way: handling its request fails every time
    // with an error that is not the database being down.
    let order_id = uuid::Uuid::now_v7();
    use sea_orm::ConnectionTrait;
    db.execute_unprepared(&format!(
        "INSERT INTO payments.order_payments (order_id, user_id, amount_minor, outcome) \
         VALUES ('{order_id}', 'stuck', 100, 'pending')"
    ))
    .await
    .unwrap();
    let (id, body) = envelope(
        "payment.requested.v1",
        serde_json::json!({"order_id": order_id, "user_id": "stuck", "amount": "1.00"}),
    );
    publish_raw(&env.prefix, "payment.requested.v1", &id, &body).await;

    let letters = wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 1).await;
    assert_eq!(letters[0].message_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        letters[0].reason.as_deref(),
        Some("delivery_limit"),
        "{letters:?}"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM payments.inbox").await,
        0,
        "never applied"
    );
}

#[tokio::test]
async fn a_payment_answer_that_does_not_match_its_order_is_dead_lettered() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Orders).await;
    let order = app.create_order("vic", "30").await;
    let order_id = order.str("id").to_owned();
    let answer = |user: &str, amount: &str| {
        envelope(
            "payment.succeeded.v1",
            serde_json::json!({"order_id": order_id, "user_id": user, "amount": amount}),
        )
    };
    for (user, amount) in [("vic", "0.01"), ("mallory", "30.00")] {
        let (id, body) = answer(user, amount);
        publish_raw(&env.prefix, "payment.succeeded.v1", &id, &body).await;
    }
    wait_for_dead_letters(&env, &orders::PAYMENT_RESULTS, 2).await;
    assert_eq!(app.order(&order_id).await.str("status"), "NEW");
    let (id, body) = answer("vic", "30.00");
    publish_raw(&env.prefix, "payment.succeeded.v1", &id, &body).await;
    let paid = app
        .wait_until_final(&order_id, Duration::from_secs(10))
        .await;
    assert_eq!(paid.str("status"), "FINISHED");
}
