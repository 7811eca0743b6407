//! Payments' endpoints: happy paths and every bad form of every parameter.

use reqwest::StatusCode;

use crate::helpers::{BAD_AMOUNTS, TestEnv, bad_user_ids, snapshot, spawn_app};
use gozon::app::cli::Role;

#[tokio::test]
async fn an_account_starts_at_zero_and_grows_with_top_ups() {
    let app = spawn_app().await;

    let created = app.create_account("alice").await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(
        created.body,
        serde_json::json!({"user_id": "alice", "balance": "0.00"})
    );

    let topped = app.add_funds("alice", "100").await;
    assert_eq!(topped.status, StatusCode::OK);
    assert_eq!(
        topped.body,
        serde_json::json!({"user_id": "alice", "balance": "100.00"})
    );
    assert_eq!(app.add_funds("alice", "0.5").await.str("balance"), "100.50");
    assert_eq!(
        app.add_funds("alice", "12.34").await.str("balance"),
        "112.84"
    );

    let balance = app.balance("alice").await;
    assert_eq!(balance.status, StatusCode::OK);
    assert_eq!(balance.str("balance"), "112.84");

    let ledger = app.transactions("alice").await;
    assert_eq!(ledger.status, StatusCode::OK);
    let entries = ledger.body["transactions"].as_array().unwrap();
    let amounts: Vec<&str> = entries
        .iter()
        .map(|e| e["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, ["12.34", "0.50", "100.00"], "newest first");
    assert!(entries.iter().all(|e| e["kind"] == "top_up"));
    assert_eq!(entries[0]["balance_after"], "112.84");
}

#[tokio::test]
async fn digits_only_user_ids_and_the_largest_amount_are_accepted() {
    let app = spawn_app().await;
    assert_eq!(app.create_account("42").await.status, StatusCode::CREATED);
    assert_eq!(
        app.add_funds("42", "1000000000.00").await.str("balance"),
        "1000000000.00"
    );
    // The balance is at its cap (1 000 000 000.00) now: a second such top-up is refused.
    app.add_funds("42", "1000000000")
        .await
        .assert_error(422, "balance_limit_exceeded");
    assert_eq!(app.create_account("43").await.status, StatusCode::CREATED);
    assert_eq!(
        app.add_funds("43", "1000000000").await.str("balance"),
        "1000000000.00"
    );
}

#[tokio::test]
async fn a_second_account_for_the_same_user_is_a_conflict() {
    let app = spawn_app().await;
    app.funded_account("bob", "10").await;
    app.create_account("bob")
        .await
        .assert_error(409, "account_exists");
    assert_eq!(
        app.balance("bob").await.str("balance"),
        "10.00",
        "the balance survives"
    );
}

#[tokio::test]
async fn bad_parameters_are_refused_with_json_errors_and_change_nothing() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("carol", "50").await;
    let db = env.db().await;
    let before = snapshot(&db).await;

    let bad_user_ids = bad_user_ids();

    for path in [
        "/api/payments/create_account",
        "/api/payments/balance",
        "/api/payments/transactions",
    ] {
        let post = path.ends_with("create_account");
        let send = |query: Vec<(&'static str, String)>| {
            let app = &app;
            async move {
                let query: Vec<(&str, &str)> =
                    query.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if post {
                    app.post(path, &query).await
                } else {
                    app.get(path, &query).await
                }
            }
        };
        send(vec![]).await.assert_error(400, "missing_parameter");
        for user in &bad_user_ids {
            send(vec![("user_id", user.to_owned())])
                .await
                .assert_error(400, "invalid_user_id");
        }
    }

    app.post("/api/payments/add_funds", &[("amount", "5")])
        .await
        .assert_error(400, "missing_parameter");
    app.post("/api/payments/add_funds", &[("user_id", "carol")])
        .await
        .assert_error(400, "missing_parameter");
    for user in &bad_user_ids {
        app.add_funds(user, "5")
            .await
            .assert_error(400, "invalid_user_id");
    }
    for amount in BAD_AMOUNTS {
        app.add_funds("carol", amount)
            .await
            .assert_error(400, "invalid_amount");
    }

    app.add_funds("nobody", "5")
        .await
        .assert_error(404, "account_not_found");
    app.balance("nobody")
        .await
        .assert_error(404, "account_not_found");
    app.transactions("nobody")
        .await
        .assert_error(404, "account_not_found");

    assert_eq!(
        snapshot(&db).await,
        before,
        "rejected requests changed nothing"
    );
    assert_eq!(app.balance("carol").await.str("balance"), "50.00");
}

#[tokio::test]
async fn a_top_up_past_the_balance_cap_is_refused() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    // The cap is 1 000 000 000.00 (README): fill the account up to 50.00 below it.
    app.funded_account("rich", "999999900").await;
    assert_eq!(
        app.add_funds("rich", "50").await.str("balance"),
        "999999950.00"
    );
    let db = env.db().await;
    let before = snapshot(&db).await;
    app.add_funds("rich", "100")
        .await
        .assert_error(422, "balance_limit_exceeded");
    assert_eq!(
        snapshot(&db).await,
        before,
        "a refused top-up changes nothing"
    );
    assert_eq!(app.balance("rich").await.str("balance"), "999999950.00");
    assert_eq!(
        app.add_funds("rich", "50.00").await.str("balance"),
        "1000000000.00"
    );
    app.add_funds("rich", "0.01")
        .await
        .assert_error(422, "balance_limit_exceeded");
}

#[tokio::test]
async fn concurrent_top_ups_all_count() {
    let app = spawn_app().await;
    app.create_account("dora").await;
    let top_ups = (0..40).map(|_| app.add_funds("dora", "2.50"));
    for reply in futures_util::future::join_all(top_ups).await {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    assert_eq!(app.balance("dora").await.str("balance"), "100.00");
    assert_eq!(
        app.transactions("dora").await.body["transactions"]
            .as_array()
            .unwrap()
            .len(),
        40
    );
}
