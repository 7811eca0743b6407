//! The payment saga end to end: outbox -> RabbitMQ -> Payments -> outbox -> RabbitMQ -> Orders.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::StatusCode;

use crate::helpers::{
    AMQP, TestApp, TestEnv, assert_money_conserved, scalar_i64, spawn_app,
    wait_for_outboxes_drained,
};
use gozon::app::cli::Role;
use gozon::messaging::signing::{self, MessageKey};

const SETTLE: Duration = Duration::from_secs(5);

/// The scenario of the original system, against any pair of apps serving payments and orders.
pub async fn pay_and_refuse(payments: &TestApp, orders: &TestApp) {
    payments.funded_account("ivy", "100.00").await;

    let paid = orders.create_order("ivy", "30.00").await;
    assert_eq!(paid.status, StatusCode::CREATED);
    assert_eq!(paid.str("status"), "NEW");
    let paid = orders.wait_until_final(paid.str("id"), SETTLE).await;
    assert_eq!(paid.str("status"), "FINISHED");
    assert!(paid.body["reason"].is_null());
    assert_eq!(payments.balance("ivy").await.str("balance"), "70.00");

    let too_big = orders.create_order("ivy", "500").await;
    let too_big = orders.wait_until_final(too_big.str("id"), SETTLE).await;
    assert_eq!(too_big.str("status"), "CANCELLED");
    assert_eq!(too_big.str("reason"), "insufficient_funds");
    assert_eq!(
        payments.balance("ivy").await.str("balance"),
        "70.00",
        "balance unchanged"
    );

    let stranger = orders.create_order("jack-no-account", "1").await;
    let stranger = orders.wait_until_final(stranger.str("id"), SETTLE).await;
    assert_eq!(stranger.str("status"), "CANCELLED");
    assert_eq!(stranger.str("reason"), "no_account");

    let ledger = payments.transactions("ivy").await;
    let debits: Vec<_> = ledger.body["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["kind"] == "debit")
        .collect();
    assert_eq!(debits.len(), 1);
    assert_eq!(debits[0]["order_id"], paid.body["id"]);
    assert_eq!(debits[0]["amount"], "30.00");
}

#[tokio::test]
async fn an_order_is_paid_refused_for_lack_of_funds_or_for_lack_of_an_account() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    pay_and_refuse(&app, &app).await;
    let db = env.db().await;
    wait_for_outboxes_drained(&db, SETTLE).await;
    assert_money_conserved(&db).await;
}

#[tokio::test]
async fn fifty_concurrent_orders_against_a_hundred_pay_exactly_ten() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("kim", "100.00").await;

    let orders = (0..50).map(|_| app.create_order("kim", "10.00"));
    let created = futures_util::future::join_all(orders).await;
    let mut finished = 0;
    let mut cancelled = 0;
    for order in &created {
        assert_eq!(order.status, StatusCode::CREATED);
        let settled = app
            .wait_until_final(order.str("id"), Duration::from_secs(20))
            .await;
        match settled.str("status") {
            "FINISHED" => finished += 1,
            "CANCELLED" => {
                assert_eq!(settled.str("reason"), "insufficient_funds");
                cancelled += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((finished, cancelled), (10, 40));
    assert_eq!(app.balance("kim").await.str("balance"), "0.00");
    let db = env.db().await;
    assert_money_conserved(&db).await;
}

/// Publishes `body` straight onto the test's events exchange, signed with the key the test
/// apps use, as a peer with the key (or a misbehaving one) would.
/// The exchange a message of `message_type` is published to: the inbound exchange of the
/// context that consumes it.
pub fn exchange_for(prefix: &str, message_type: &str) -> String {
    let owner = if message_type.starts_with("payment.requested")
        || message_type.starts_with("refund.requested")
    {
        "payments"
    } else {
        "orders"
    };
    format!("{prefix}.{owner}.inbound")
}

pub async fn publish_raw(prefix: &str, routing_key: &str, message_id: &str, body: &[u8]) {
    let exchange = exchange_for(prefix, routing_key);
    let signature = sign(body);
    publish_with_signature(&exchange, routing_key, message_id, body, Some(&signature)).await;
}

/// The signature the test apps accept.
pub fn sign(body: &[u8]) -> String {
    MessageKey::new(signing::DEVELOPMENT_KEY).sign(body)
}

/// Publishes onto `exchange` with publisher confirms, and asserts the broker routed it.
pub async fn publish_with_signature(
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    body: &[u8],
    signature: Option<&str>,
) {
    let headers: Vec<(&str, &str)> = signature
        .map(|signature| (signing::HEADER, signature))
        .into_iter()
        .collect();
    publish_with_headers(exchange, routing_key, message_id, body, &headers).await;
}

/// Publishes onto `exchange` with these AMQP headers, with publisher confirms, and asserts the
/// broker routed it.
pub async fn publish_with_headers(
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    body: &[u8],
    header_values: &[(&str, &str)],
) {
    let connection = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = lapin::types::FieldTable::default();
    for (name, value) in header_values {
        headers.insert(
            (*name).into(),
            lapin::types::AMQPValue::LongString((*value).into()),
        );
    }
    let properties = BasicProperties::default()
        .with_message_id(message_id.into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            mandatory,
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "the broker routed it"
    );
    connection.close(200, "done".into()).await.unwrap();
}

/// Publishes a signed payment request (`body`) under `message_id`, as Orders' relay would.
pub async fn publish_payment_request(prefix: &str, message_id: uuid::Uuid, body: &[u8]) {
    publish_raw(
        prefix,
        "payment.requested.v1",
        &message_id.to_string(),
        body,
    )
    .await;
}

pub fn payment_requested(
    message_id: uuid::Uuid,
    order_id: uuid::Uuid,
    user: &str,
    amount: &str,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "message_id": message_id,
        "type": "payment.requested.v1",
        "correlation_id": "test-duplicate",
        "occurred_at": "2026-11-25T00:00:00Z",
        "payload": {"order_id": order_id, "user_id": user, "amount": amount},
    }))
    .unwrap()
}

async fn wait_for_scalar(db: &sea_orm::DatabaseConnection, sql: &str, expected: i64) {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let value = scalar_i64(db, sql).await;
        if value == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sql} = {value}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_same_payment_request_delivered_twice_debits_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Payments).await;
    app.funded_account("lea", "100.00").await;
    let db = env.db().await;

    let message_id = uuid::Uuid::now_v7();
    let order_id = uuid::Uuid::now_v7();
    let body = payment_requested(message_id, order_id, "lea", "25.00");
    for _ in 0..2 {
        publish_payment_request(&env.prefix, message_id, &body).await;
    }
    // A third, different request behind them: the single consumer handles its queue in order,
    // so once this one is applied both copies before it have been handled.
    let marker = uuid::Uuid::now_v7();
    let marker_body = payment_requested(marker, uuid::Uuid::now_v7(), "lea", "1.00");
    publish_raw(
        &env.prefix,
        "payment.requested.v1",
        &marker.to_string(),
        &marker_body,
    )
    .await;
    wait_for_scalar(
        &db,
        "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'",
        2,
    )
    .await;

    let debits_of_order = format!(
        "SELECT count(*) FROM payments.transactions WHERE kind = 'debit' AND order_id = '{order_id}'"
    );
    assert_eq!(scalar_i64(&db, &debits_of_order).await, 1);
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM payments.inbox").await,
        2,
        "the duplicate was not recorded again"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM payments.outbox").await,
        2,
        "one answer per distinct request"
    );
    assert_eq!(app.balance("lea").await.str("balance"), "74.00");
}

#[tokio::test]
async fn one_order_requested_under_two_message_ids_is_still_debited_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Payments).await;
    app.funded_account("max", "100.00").await;
    let db = env.db().await;

    let order_id = uuid::Uuid::now_v7();
    for _ in 0..2 {
        let message_id = uuid::Uuid::now_v7();
        let body = payment_requested(message_id, order_id, "max", "40.00");
        publish_payment_request(&env.prefix, message_id, &body).await;
    }

    // Two distinct messages: two inbox rows and two (identical) answers, but one debit.
    wait_for_scalar(&db, "SELECT count(*) FROM payments.inbox", 2).await;
    wait_for_scalar(
        &db,
        "SELECT count(*) FROM payments.outbox WHERE body->>'type' = 'payment.succeeded.v1'",
        2,
    )
    .await;
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'"
        )
        .await,
        1
    );
    assert_eq!(app.balance("max").await.str("balance"), "60.00");
}

#[tokio::test]
async fn the_request_id_is_the_correlation_id_of_every_message_of_the_saga() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("ned", "10").await;
    let response = app
        .client
        .post(format!("{}/api/orders/create_order", app.address))
        .query(&[("user_id", "ned"), ("amount", "1")])
        .header("x-request-id", "req-saga-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-saga-123");
    let order: serde_json::Value = response.json().await.unwrap();
    app.wait_until_final(order["id"].as_str().unwrap(), SETTLE)
        .await;

    let db = env.db().await;
    for table in ["orders.outbox", "payments.outbox"] {
        let sql = format!(
            "SELECT count(*) FROM {table} WHERE correlation_id = 'req-saga-123' AND body->>'correlation_id' = 'req-saga-123'"
        );
        assert_eq!(scalar_i64(&db, &sql).await, 1, "{table}");
    }
}

#[tokio::test]
async fn each_role_creates_only_its_own_schema() {
    let orders_only = TestEnv::new();
    let _orders = orders_only.spawn(Role::Orders).await;
    let payments_only = TestEnv::new();
    let _payments = payments_only.spawn(Role::Payments).await;

    let schemas = "SELECT count(*) FROM information_schema.schemata WHERE schema_name = ";
    let db = orders_only.db().await;
    assert_eq!(scalar_i64(&db, &format!("{schemas}'orders'")).await, 1);
    assert_eq!(scalar_i64(&db, &format!("{schemas}'payments'")).await, 0);
    let db = payments_only.db().await;
    assert_eq!(scalar_i64(&db, &format!("{schemas}'payments'")).await, 1);
    assert_eq!(scalar_i64(&db, &format!("{schemas}'orders'")).await, 0);
}

#[tokio::test]
async fn an_app_with_only_the_all_role_serves_both_apis() {
    let app = spawn_app().await;
    assert_eq!(app.create_account("oli").await.status, StatusCode::CREATED);
    assert_eq!(app.orders("oli").await.status, StatusCode::OK);
}

#[tokio::test]
async fn sent_outbox_rows_are_purged_after_the_retention() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.outbox_retention_secs = 0;
    settings.outbox_housekeeping_ms = 100;
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    assert_eq!(app.create_order("purge", "1").await.str("status"), "NEW");
    let db = env.db().await;
    // The request was sent, answered (CANCELLED, no account) and both rows purged.
    wait_for_scalar(
        &db,
        "SELECT count(*) FROM orders.orders WHERE status = 'CANCELLED'",
        1,
    )
    .await;
    let outboxes =
        "SELECT (SELECT count(*) FROM orders.outbox) + (SELECT count(*) FROM payments.outbox)";
    wait_for_scalar(&db, outboxes, 0).await;
}

#[tokio::test]
async fn old_inbox_records_are_purged_and_a_late_duplicate_still_debits_once() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.inbox_retention_secs = 0;
    settings.outbox_housekeeping_ms = 100;
    let app = env.spawn_with(&settings, Role::Payments).await;
    app.wait_until_ready().await;
    app.funded_account("ray", "100.00").await;
    let db = env.db().await;
    let message_id = uuid::Uuid::now_v7();
    let order_id = uuid::Uuid::now_v7();
    let body = payment_requested(message_id, order_id, "ray", "25.00");
    publish_payment_request(&env.prefix, message_id, &body).await;
    let debits = "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'";
    wait_for_scalar(&db, debits, 1).await;
    // The housekeeper forgets the message id ...
    wait_for_scalar(&db, "SELECT count(*) FROM payments.inbox", 0).await;
    // ... and the same request delivered again long after is applied again, as a no-op: the
    // order was claimed once, for good.
    publish_payment_request(&env.prefix, message_id, &body).await;
    let marker = uuid::Uuid::now_v7();
    let marker_body = payment_requested(marker, uuid::Uuid::now_v7(), "ray", "1.00");
    publish_raw(
        &env.prefix,
        "payment.requested.v1",
        &marker.to_string(),
        &marker_body,
    )
    .await;
    wait_for_scalar(&db, debits, 2).await;
    assert_eq!(app.balance("ray").await.str("balance"), "74.00");
}
