//! An order's whole life: cancel, refund, payment timeout, and the refund of a debit that lands
//! after the order was given up; money comes back exactly once.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use gozon::ops::audit::{AuditSettings, audit};
use reqwest::StatusCode;
use sea_orm::DatabaseConnection;

use crate::helpers::{Reply, TestApp, TestEnv, scalar_i64};
use crate::saga::publish_raw;

impl TestApp {
    pub async fn cancel_order(&self, id: &str) -> Reply {
        self.post("/api/orders/cancel_order", &[("id", id)]).await
    }
}

async fn wait_for(db: &DatabaseConnection, sql: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = scalar_i64(db, sql).await;
        if value == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {value}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_status(app: &TestApp, id: &str, status: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let order = app.order(id).await;
        if order.str("status") == status {
            return order;
        }
        assert!(
            Instant::now() < deadline,
            "order {id} is {}, not {status}",
            order.str("status")
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn refunds_of(id: &str) -> String {
    format!(
        "SELECT count(*) FROM payments.transactions WHERE kind = 'refund' AND order_id = '{id}'"
    )
}

/// The audit, with thresholds a test can wait out.
async fn assert_audit_passes(db: &DatabaseConnection) {
    let settings = AuditSettings {
        stuck_after: Duration::from_secs(60),
        outbox_stale_after: Duration::from_secs(60),
    };
    let report = audit(db, &settings).await.unwrap();
    assert!(report.passed(), "{report}");
}

#[tokio::test]
async fn a_cancelled_order_whose_debit_lands_later_is_refunded() {
    let env = TestEnv::new();
    let payments = env.spawn(Role::Payments).await;
    payments.funded_account("kai", "100").await;
    payments.shutdown();
    drop(payments);
    // Orders alone: the payment request waits in its queue.
    let orders = env.spawn(Role::Orders).await;
    let order = orders.create_order("kai", "40").await;
    let id = order.str("id").to_owned();
    let cancelled = orders.cancel_order(&id).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(
        (cancelled.str("status"), cancelled.str("reason")),
        ("CANCELLED", "cancelled_by_user")
    );

    // Payments comes back, debits the request it finds ... and gives it back.
    let payments = env.spawn(Role::Payments).await;
    let db = env.db().await;
    wait_for(&db, &refunds_of(&id), 1).await;
    wait_for(
        &db,
        &format!(
            "SELECT count(*) FROM orders.orders WHERE id = '{id}' AND refund_state = 'refunded'"
        ),
        1,
    )
    .await;
    let order = orders.order(&id).await;
    assert_eq!(
        (order.str("status"), order.str("reason")),
        ("CANCELLED", "cancelled_by_user")
    );
    assert_eq!(payments.balance("kai").await.str("balance"), "100.00");
    let kinds: Vec<String> = payments.transactions("kai").await.body["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["refund", "debit", "top_up"]);
    assert_audit_passes(&db).await;
}

#[tokio::test]
async fn a_paid_order_is_refunded_and_cancel_is_idempotent() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("lou", "100").await;
    let order = app.create_order("lou", "30").await;
    let id = order.str("id").to_owned();
    assert_eq!(
        app.wait_until_final(&id, Duration::from_secs(10))
            .await
            .str("status"),
        "FINISHED"
    );
    let refunding = app.cancel_order(&id).await;
    assert_eq!(refunding.status, StatusCode::OK);
    assert_eq!(refunding.str("status"), "REFUNDING");
    let refunded = wait_for_status(&app, &id, "REFUNDED").await;
    assert!(refunded.body["reason"].is_null());
    assert_eq!(app.balance("lou").await.str("balance"), "100.00");
    // Again, and again at once: the order is unchanged and nothing is refunded twice.
    let again = futures_util::future::join_all((0..20).map(|_| app.cancel_order(&id))).await;
    for reply in again {
        assert_eq!(
            (reply.status, reply.str("status")),
            (StatusCode::OK, "REFUNDED")
        );
    }
    let db = env.db().await;
    assert_eq!(scalar_i64(&db, &refunds_of(&id)).await, 1);
    assert_eq!(app.balance("lou").await.str("balance"), "100.00");
    // Unknown and malformed ids.
    app.cancel_order("00000000-0000-4000-8000-000000000000")
        .await
        .assert_error(404, "order_not_found");
    app.cancel_order("nope")
        .await
        .assert_error(400, "invalid_order_id");
    assert_audit_passes(&db).await;
}

#[tokio::test]
async fn twenty_concurrent_cancels_of_a_paid_order_refund_it_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("max", "100").await;
    let order = app.create_order("max", "25").await;
    let id = order.str("id").to_owned();
    app.wait_until_final(&id, Duration::from_secs(10)).await;
    let replies = futures_util::future::join_all((0..20).map(|_| app.cancel_order(&id))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert!(["REFUNDING", "REFUNDED"].contains(&reply.str("status")));
    }
    wait_for_status(&app, &id, "REFUNDED").await;
    let db = env.db().await;
    assert_eq!(scalar_i64(&db, &refunds_of(&id)).await, 1);
    let outbox = format!(
        "SELECT count(*) FROM orders.outbox WHERE message_type = 'refund.requested.v1' \
         AND body->'payload'->>'order_id' = '{id}'"
    );
    assert_eq!(scalar_i64(&db, &outbox).await, 1, "one refund requested");
    assert_eq!(app.balance("max").await.str("balance"), "100.00");
}

#[tokio::test]
async fn an_order_without_an_answer_times_out_and_its_late_debit_is_refunded() {
    let env = TestEnv::new();
    let payments = env.spawn(Role::Payments).await;
    payments.funded_account("ned", "100").await;
    payments.shutdown();
    drop(payments);
    let mut settings = env.settings();
    settings.payment_timeout_secs = 1;
    let orders = env.spawn_with(&settings, Role::Orders).await;
    orders.wait_until_ready().await;
    let order = orders.create_order("ned", "60").await;
    let id = order.str("id").to_owned();
    let timed_out = wait_for_status(&orders, &id, "CANCELLED").await;
    assert_eq!(timed_out.str("reason"), "payment_timeout");

    let payments = env.spawn(Role::Payments).await;
    let db = env.db().await;
    wait_for(&db, &refunds_of(&id), 1).await;
    wait_for(
        &db,
        &format!(
            "SELECT count(*) FROM orders.orders WHERE id = '{id}' AND refund_state = 'refunded'"
        ),
        1,
    )
    .await;
    assert_eq!(orders.order(&id).await.str("reason"), "payment_timeout");
    assert_eq!(payments.balance("ned").await.str("balance"), "100.00");
    assert_audit_passes(&db).await;
}

#[tokio::test]
async fn the_same_refund_request_delivered_twice_credits_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("ola", "100").await;
    let order = app.create_order("ola", "10").await;
    let id = order.str("id").to_owned();
    app.wait_until_final(&id, Duration::from_secs(10)).await;
    let refund = |message_id: uuid::Uuid| {
        serde_json::to_vec(&serde_json::json!({
            "message_id": message_id, "type": "refund.requested.v1", "correlation_id": "twice",
            "occurred_at": "2026-11-25T00:00:00Z",
            "payload": {"order_id": id, "user_id": "ola", "amount": "10.00"},
        }))
        .unwrap()
    };
    let first = uuid::Uuid::now_v7();
    // The same message twice (the inbox), and another message for the same order (the order).
    for message_id in [first, first, uuid::Uuid::now_v7()] {
        publish_raw(
            &env.prefix,
            "refund.requested.v1",
            &message_id.to_string(),
            &refund(message_id),
        )
        .await;
    }
    let db = env.db().await;
    wait_for(
        &db,
        "SELECT count(*) FROM payments.inbox WHERE consumer = 'payments.payment-requests'",
        3,
    )
    .await;
    assert_eq!(scalar_i64(&db, &refunds_of(&id)).await, 1);
    assert_eq!(app.balance("ola").await.str("balance"), "100.00");
}

/// Cancels racing payments, a few hundred times: once a cancel was answered, the order never
/// ends FINISHED; every account gets its money back; the audit passes after each round.
#[tokio::test]
async fn a_cancel_racing_the_payment_never_leaves_the_order_paid() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    let users: Vec<String> = (0..10).map(|i| format!("racer-{i}")).collect();
    for user in &users {
        app.funded_account(user, "1000").await;
    }
    let db = env.db().await;
    for round in 0..3 {
        // Ten at a time, each cancel 0-45 ms after its order: around the saga's own time.
        let mut answered = Vec::new();
        for chunk in 0..10 {
            let races = (0..10).map(|j| {
                let i = chunk * 10 + j;
                let (app, user) = (&app, users[i % users.len()].clone());
                async move {
                    let order = app.create_order(&user, "7").await;
                    let id = order.str("id").to_owned();
                    // One in five waits long enough that its order is surely paid first.
                    let wait = if i % 5 == 0 {
                        300
                    } else {
                        (i * 7 % 16) as u64 * 3
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let cancel = app.cancel_order(&id).await;
                    assert_eq!(cancel.status, StatusCode::OK, "{}", cancel.body);
                    (id, cancel.str("status").to_owned())
                }
            });
            answered.extend(futures_util::future::join_all(races).await);
        }
        // Settled: nothing NEW or REFUNDING, no refund still owed, nothing unsent.
        wait_for(&db, "SELECT count(*) FROM orders.orders WHERE status IN ('NEW', 'REFUNDING') OR refund_state = 'requested'", 0).await;
        wait_for(&db, "SELECT (SELECT count(*) FROM orders.outbox WHERE sent_at IS NULL) + (SELECT count(*) FROM payments.outbox WHERE sent_at IS NULL)", 0).await;
        for (id, status_when_cancelled) in &answered {
            let order = app.order(id).await;
            let end = order.str("status");
            assert_ne!(
                end, "FINISHED",
                "round {round}: order {id} was cancelled ({status_when_cancelled}) but ended paid"
            );
            let expected = if status_when_cancelled == "CANCELLED" {
                "CANCELLED"
            } else {
                "REFUNDED"
            };
            assert_eq!(end, expected, "round {round}: order {id}");
        }
        for user in &users {
            assert_eq!(
                app.balance(user).await.str("balance"),
                "1000.00",
                "round {round}: {user}"
            );
        }
        assert_audit_passes(&db).await;
    }
    // The race went both ways: some orders were refunded after being paid, some cancelled
    // before their debit, which was then given back.
    let refunded = scalar_i64(
        &db,
        "SELECT count(*) FROM orders.orders WHERE status = 'REFUNDED'",
    )
    .await;
    let late_debits = scalar_i64(&db, "SELECT count(*) FROM orders.orders WHERE status = 'CANCELLED' AND refund_state = 'refunded'").await;
    eprintln!(
        "race: {refunded} refunded after payment, {late_debits} debits refunded after a cancel"
    );
    assert!(
        refunded > 0 && late_debits > 0,
        "{refunded} refunded, {late_debits} late debits"
    );
}
