//! `/metrics`: Prometheus text with what was published and consumed, saga durations and the
//! outbox backlogs.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;

use crate::helpers::{TestApp, TestEnv};
use crate::saga::{payment_requested, publish_raw};

async fn scrape(app: &TestApp) -> String {
    let response = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    response.text().await.unwrap()
}

/// The value of the sample named exactly `sample` (name plus labels).
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn wait_for_sample(app: &TestApp, sample: &str, expected: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(app).await;
        if value(&text, sample) == Some(expected) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} != {expected} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_the_saga() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("mia", "50").await;
    let order = app.create_order("mia", "20").await;
    app.wait_until_final(order.str("id"), Duration::from_secs(5))
        .await;

    let orders_queue = format!("{}.orders.payment-results", env.prefix);
    let payments_queue = format!("{}.payments.payment-requests", env.prefix);
    let text = wait_for_sample(
        &app,
        &format!("gozon_messages_consumed_total{{queue=\"{orders_queue}\",outcome=\"applied\"}}"),
        1.0,
    )
    .await;
    assert_eq!(
        value(&text, "gozon_outbox_published_total{schema=\"orders\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "gozon_outbox_published_total{schema=\"payments\"}"),
        Some(1.0)
    );
    let applied =
        format!("gozon_messages_consumed_total{{queue=\"{payments_queue}\",outcome=\"applied\"}}");
    assert_eq!(value(&text, &applied), Some(1.0));
    assert_eq!(value(&text, "gozon_saga_duration_seconds_count"), Some(1.0));
    // Each relay published one batch, and its publish-to-confirm time was observed.
    for schema in ["orders", "payments"] {
        let batches = format!("gozon_relay_publish_seconds_count{{schema=\"{schema}\"}}");
        assert_eq!(value(&text, &batches), Some(1.0), "{batches}");
    }
    assert_eq!(
        value(&text, "gozon_outbox_backlog{schema=\"orders\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "gozon_outbox_backlog{schema=\"payments\"}"),
        Some(0.0)
    );

    // A duplicate delivery is counted as such, and poison as dead-lettered.
    let id = uuid::Uuid::now_v7();
    let body = payment_requested(id, uuid::Uuid::now_v7(), "mia", "1.00");
    publish_raw(&env.prefix, "payment.requested.v1", &id.to_string(), &body).await;
    publish_raw(&env.prefix, "payment.requested.v1", &id.to_string(), &body).await;
    publish_raw(&env.prefix, "payment.requested.v1", "junk", b"junk").await;
    let duplicate = format!(
        "gozon_messages_consumed_total{{queue=\"{payments_queue}\",outcome=\"duplicate\"}}"
    );
    wait_for_sample(&app, &duplicate, 1.0).await;
    let dead = format!(
        "gozon_messages_consumed_total{{queue=\"{payments_queue}\",outcome=\"dead_lettered\"}}"
    );
    wait_for_sample(&app, &dead, 1.0).await;
}

#[tokio::test]
async fn metrics_show_an_outbox_backlog_while_the_broker_is_unreachable() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let app = env.spawn_with(&settings, Role::Orders).await;
    app.create_order("nia", "1").await;
    app.create_order("nia", "2").await;
    let text = scrape(&app).await;
    assert_eq!(
        value(&text, "gozon_outbox_backlog{schema=\"orders\"}"),
        Some(2.0)
    );
    assert!(
        value(
            &text,
            "gozon_outbox_oldest_unsent_age_seconds{schema=\"orders\"}"
        )
        .is_some_and(|age| age >= 0.0)
    );
    assert_eq!(
        value(&text, "gozon_outbox_backlog{schema=\"payments\"}"),
        None,
        "not this role's outbox"
    );
}

#[tokio::test]
async fn http_requests_are_counted_by_route_method_and_status() {
    let app = crate::helpers::spawn_app().await;
    app.create_account("metered").await;
    app.create_account("metered").await;
    app.get("/api/nowhere/at/all", &[]).await;
    let text = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"gozon_http_requests_total{route="/api/payments/create_account",method="POST",status="201"} 1"#,
        r#"gozon_http_requests_total{route="/api/payments/create_account",method="POST",status="409"} 1"#,
        r#"gozon_http_requests_total{route="other",method="GET",status="404"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    assert!(text.contains(
        r#"gozon_http_request_duration_seconds_count{route="/api/payments/create_account",method="POST"} 2"#
    ));
}
