//! Orders' endpoints: happy paths and every bad form of every parameter.

use reqwest::StatusCode;

use crate::helpers::{BAD_AMOUNTS, TestEnv, bad_user_ids, snapshot, spawn_app};
use gozon::app::cli::Role;

#[tokio::test]
async fn an_order_is_created_new_and_can_be_read_back() {
    let app = spawn_app().await;
    let created = app.create_order("erin", "19.99").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.str("status"), "NEW");
    assert_eq!(created.str("amount"), "19.99");
    assert_eq!(created.str("user_id"), "erin");
    assert!(created.body["reason"].is_null());
    let id = created.str("id");
    assert!(uuid::Uuid::parse_str(id).is_ok());
    for field in ["created_at", "updated_at"] {
        assert!(
            chrono::DateTime::parse_from_rfc3339(created.str(field)).is_ok(),
            "{field}"
        );
    }

    let read = app.order(id).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.str("id"), id);
    assert_eq!(read.str("amount"), "19.99");
}

#[tokio::test]
async fn a_users_orders_are_listed_newest_first_and_only_theirs() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for amount in ["1", "2", "3"] {
        ids.push(app.create_order("fay", amount).await.str("id").to_owned());
    }
    app.create_order("gus", "4").await;

    let listed = app.orders("fay").await;
    assert_eq!(listed.status, StatusCode::OK);
    let listed: Vec<&str> = listed.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    ids.reverse();
    assert_eq!(listed, ids);

    let none = app.orders("nobody-at-all").await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(
        none.body,
        serde_json::json!({"orders": [], "next_cursor": null})
    );
}

#[tokio::test]
async fn bad_parameters_are_refused_with_json_errors_and_change_nothing() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    let db = env.db().await;
    let before = snapshot(&db).await;

    let bad_user_ids = bad_user_ids();

    app.post("/api/orders/create_order", &[("amount", "5")])
        .await
        .assert_error(400, "missing_parameter");
    app.post("/api/orders/create_order", &[("user_id", "hal")])
        .await
        .assert_error(400, "missing_parameter");
    for user in &bad_user_ids {
        app.create_order(user, "5")
            .await
            .assert_error(400, "invalid_user_id");
        app.orders(user).await.assert_error(400, "invalid_user_id");
    }
    for amount in BAD_AMOUNTS {
        app.create_order("hal", amount)
            .await
            .assert_error(400, "invalid_amount");
    }
    app.get("/api/orders/orders", &[])
        .await
        .assert_error(400, "missing_parameter");

    app.get("/api/orders/order", &[])
        .await
        .assert_error(400, "missing_parameter");
    for id in [
        "",
        "42",
        "not-a-uuid",
        "' OR 1=1 --",
        "0190f5c28c1e7a9bb7a11f2e3d4c5b6a",
    ] {
        app.order(id).await.assert_error(400, "invalid_order_id");
    }
    app.order(&uuid::Uuid::new_v4().to_string())
        .await
        .assert_error(404, "order_not_found");

    assert_eq!(
        snapshot(&db).await,
        before,
        "rejected requests changed nothing"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_in_the_error_envelope() {
    let app = spawn_app().await;
    app.get("/api/nowhere", &[])
        .await
        .assert_error(404, "not_found");
    // Not the web page's 405: nothing is served there, whatever the method.
    for path in ["/api/nowhere", "/api", "/api/ordersX"] {
        app.post(path, &[]).await.assert_error(404, "not_found");
    }
    app.get(
        "/api/orders/create_order",
        &[("user_id", "a"), ("amount", "1")],
    )
    .await
    .assert_error(405, "method_not_allowed");
}

#[tokio::test]
async fn health_endpoints_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live", &[]).await.status, StatusCode::OK);
    let ready = app.get("/health/ready", &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["status"], "ok");
}

#[tokio::test]
async fn readiness_waits_for_the_broker() {
    // An app whose broker cannot be reached is alive but not ready, and says why.
    let env = crate::helpers::TestEnv::new();
    let mut settings = env.settings();
    settings.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let app = env.spawn_with(&settings, Role::Payments).await;
    assert_eq!(app.get("/health/live", &[]).await.status, StatusCode::OK);
    let ready = app.get("/health/ready", &[]).await;
    ready.assert_error(503, "service_unavailable");
    assert!(ready.str("message").contains("broker"), "{}", ready.body);
    // Requests that need only the database still work.
    assert_eq!(app.create_account("u").await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn orders_placed_while_the_broker_is_unreachable_wait_in_the_outbox() {
    let env = crate::helpers::TestEnv::new();
    let mut settings = env.settings();
    settings.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let app = env.spawn_with(&settings, Role::All).await;
    for amount in ["1", "2", "3"] {
        assert_eq!(
            app.create_order("wait", amount).await.status,
            StatusCode::CREATED
        );
    }
    let db = env.db().await;
    let housekeeping = gozon::messaging::outbox::HousekeepingSettings {
        retention: std::time::Duration::from_secs(0),
        inbox_retention: std::time::Duration::from_secs(3600),
        interval: std::time::Duration::from_secs(1),
        backlog_warning: 1000,
        backlog_age_warning: std::time::Duration::from_secs(30),
    };
    let housekeeper =
        gozon::messaging::outbox::Housekeeper::new(db.clone(), "orders", housekeeping);
    // Purging touches only sent rows; the backlog is measured.
    assert_eq!(housekeeper.purge_sent().await.unwrap(), 0);
    let backlog = housekeeper.backlog().await.unwrap();
    assert_eq!(backlog.unsent, 3);
    assert!(backlog.oldest_age_secs >= 0.0);
    // The audit sees them as stuck once they are older than its threshold.
    let strict = gozon::ops::audit::AuditSettings {
        stuck_after: std::time::Duration::ZERO,
        outbox_stale_after: std::time::Duration::ZERO,
    };
    let report = gozon::ops::audit::audit(&db, &strict).await.unwrap();
    assert!(
        report
            .failed_checks()
            .contains(&"no outbox message stuck unsent"),
        "{report}"
    );
}

/// GET order and GET balance coalesce concurrent reads into shared queries: each concurrent
/// caller still gets its own order or account, a missing one is still 404, and a read made
/// right after a write sees it.
#[tokio::test]
async fn concurrent_reads_each_get_their_own_answer() {
    let app = std::sync::Arc::new(spawn_app().await);
    let mut expected = Vec::new();
    for (i, user) in ["co-a", "co-b", "co-c"].iter().enumerate() {
        app.funded_account(user, &format!("{}.00", 10 + i)).await;
        for j in 0..5 {
            let amount = format!("{}.{:02}", i + 1, j);
            let order = app.create_order(user, &amount).await;
            expected.push((order.str("id").to_owned(), user.to_string(), amount));
        }
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut reads = tokio::task::JoinSet::new();
    for _round in 0..8 {
        for (id, user, amount) in &expected {
            let (id, user, amount) = (id.clone(), user.clone(), amount.clone());
            let client = app.clone();
            reads.spawn(async move {
                let read = client.order(&id).await;
                assert_eq!(read.status, StatusCode::OK, "{}", read.body);
                assert_eq!(
                    (read.str("id"), read.str("user_id")),
                    (id.as_str(), user.as_str())
                );
                assert_eq!(read.str("amount"), amount);
            });
        }
        let (client, unknown) = (app.clone(), unknown.clone());
        reads.spawn(async move {
            client
                .order(&unknown)
                .await
                .assert_error(404, "order_not_found")
        });
        for (user, funded) in [("co-a", "10.00"), ("co-b", "11.00"), ("co-c", "12.00")] {
            let client = app.clone();
            reads.spawn(async move {
                let balance = client.balance(user).await;
                assert_eq!(balance.status, StatusCode::OK, "{}", balance.body);
                assert_eq!(balance.str("user_id"), user);
                // Orders may have been paid meanwhile: at most what was funded.
                let left: f64 = balance.str("balance").parse().unwrap();
                assert!(left <= funded.parse::<f64>().unwrap(), "{}", balance.body);
            });
        }
        let client = app.clone();
        reads.spawn(async move {
            client
                .balance("co-nobody")
                .await
                .assert_error(404, "account_not_found")
        });
    }
    while let Some(done) = reads.join_next().await {
        done.expect("a read answered as expected");
    }
    // Read your writes: once co-a's orders are final, each top-up's new balance is what a GET
    // made right after it answers.
    for (id, user, _) in &expected {
        if user == "co-a" {
            app.wait_until_final(id, std::time::Duration::from_secs(20))
                .await;
        }
    }
    for k in 1..=20 {
        let topped = app.add_funds("co-a", "1").await;
        assert_eq!(topped.status, StatusCode::OK, "{}", topped.body);
        let balance = app.balance("co-a").await;
        assert_eq!(balance.str("balance"), topped.str("balance"), "top-up {k}");
    }
}
