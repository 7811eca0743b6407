//! `Idempotency-Key` on every POST: a retried request gets the first response and has no
//! second effect; the same key with other parameters is refused.

use std::time::Duration;

use gozon::app::cli::Role;
use reqwest::StatusCode;

use crate::helpers::{TestEnv, scalar_i64, snapshot, spawn_app};

const CREATE_ORDER: &str = "/api/orders/create_order";
const ADD_FUNDS: &str = "/api/payments/add_funds";
const CREATE_ACCOUNT: &str = "/api/payments/create_account";

#[tokio::test]
async fn a_retried_order_is_placed_and_paid_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("ida", "100").await;
    let query = [("user_id", "ida"), ("amount", "30")];

    let first = app.post_with_key(CREATE_ORDER, &query, "order-key-1").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = app.post_with_key(CREATE_ORDER, &query, "order-key-1").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body, "the first response, replayed");

    app.wait_until_final(first.str("id"), Duration::from_secs(5))
        .await;
    let db = env.db().await;
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM orders.orders").await,
        1
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM orders.outbox").await,
        1
    );
    assert_eq!(app.balance("ida").await.str("balance"), "70.00");
}

#[tokio::test]
async fn concurrent_retries_with_one_key_place_one_order() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    let query = [("user_id", "ivo"), ("amount", "5")];
    let retries = (0..12).map(|_| app.post_with_key(CREATE_ORDER, &query, "burst"));
    let replies = futures_util::future::join_all(retries).await;
    let first = &replies[0];
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(reply.body["id"], first.body["id"]);
    }
    let db = env.db().await;
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM orders.orders").await,
        1
    );
}

#[tokio::test]
async fn a_retried_top_up_credits_once_and_a_retried_account_creation_is_not_a_conflict() {
    let app = spawn_app().await;
    let created = app
        .post_with_key(CREATE_ACCOUNT, &[("user_id", "ina")], "acct")
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let again = app
        .post_with_key(CREATE_ACCOUNT, &[("user_id", "ina")], "acct")
        .await;
    assert_eq!(
        (again.status, &again.body),
        (StatusCode::CREATED, &created.body)
    );

    let query = [("user_id", "ina"), ("amount", "25.50")];
    for _ in 0..3 {
        let reply = app.post_with_key(ADD_FUNDS, &query, "topup-1").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.str("balance"), "25.50");
    }
    assert_eq!(app.balance("ina").await.str("balance"), "25.50");
    // Another key is another top-up.
    assert_eq!(
        app.post_with_key(ADD_FUNDS, &query, "topup-2")
            .await
            .str("balance"),
        "51.00"
    );
}

#[tokio::test]
async fn a_key_reused_with_other_parameters_or_malformed_is_refused_and_changes_nothing() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("ivy", "10").await;
    app.post_with_key(CREATE_ORDER, &[("user_id", "ivy"), ("amount", "1")], "k")
        .await;
    app.post_with_key(ADD_FUNDS, &[("user_id", "ivy"), ("amount", "1")], "k2")
        .await;
    let db = env.db().await;
    let before = snapshot(&db).await;

    app.post_with_key(CREATE_ORDER, &[("user_id", "ivy"), ("amount", "2")], "k")
        .await
        .assert_error(422, "idempotency_key_reused");
    app.post_with_key(ADD_FUNDS, &[("user_id", "other"), ("amount", "1")], "k2")
        .await
        .assert_error(422, "idempotency_key_reused");
    for bad in [" ", "a b", &"k".repeat(256)] {
        app.post_with_key(CREATE_ORDER, &[("user_id", "ivy"), ("amount", "1")], bad)
            .await
            .assert_error(400, "invalid_idempotency_key");
        app.post_with_key(ADD_FUNDS, &[("user_id", "ivy"), ("amount", "1")], bad)
            .await
            .assert_error(400, "invalid_idempotency_key");
    }
    // Bytes the header parser would skip (so the POST would run without its key), and a key
    // given twice: refused before anything runs.
    let url = format!("{}{CREATE_ORDER}", app.address);
    let non_ascii = reqwest::header::HeaderValue::from_bytes(b"k\xc3\x97").unwrap();
    let twice = app
        .client
        .post(&url)
        .query(&[("user_id", "ivy"), ("amount", "1")])
        .header("Idempotency-Key", "k3")
        .header("Idempotency-Key", "k4");
    let garbled = app
        .client
        .post(&url)
        .query(&[("user_id", "ivy"), ("amount", "1")])
        .header("Idempotency-Key", non_ascii);
    for request in [twice, garbled] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_idempotency_key", "{body}");
    }
    assert_eq!(snapshot(&db).await, before);
}

#[tokio::test]
async fn a_failed_request_is_not_remembered() {
    let app = spawn_app().await;
    let query = [("user_id", "late"), ("amount", "5")];
    // No account yet: refused, and the key stays free ...
    app.post_with_key(ADD_FUNDS, &query, "retry-me")
        .await
        .assert_error(404, "account_not_found");
    app.create_account("late").await;
    // ... so the retry, once the account exists, is applied.
    let reply = app.post_with_key(ADD_FUNDS, &query, "retry-me").await;
    assert_eq!(
        (reply.status, reply.str("balance")),
        (StatusCode::OK, "5.00")
    );
}
