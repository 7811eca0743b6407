//! `gozon audit`: silent on a healthy system, loud (and non-zero) on every broken invariant.

use std::time::Duration;

use gozon::app::cli::Role;
use gozon::ops::audit::{AuditSettings, audit};
use sea_orm::ConnectionTrait;

use crate::helpers::{TestEnv, gozon, wait_for_outboxes_drained};

fn strict() -> AuditSettings {
    AuditSettings {
        stuck_after: Duration::from_secs(60),
        outbox_stale_after: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_healthy_system_passes_the_audit() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("ava", "50").await;
    for amount in ["20", "20", "20"] {
        let order = app.create_order("ava", amount).await;
        app.wait_until_final(order.str("id"), Duration::from_secs(5))
            .await;
    }
    let db = env.db().await;
    wait_for_outboxes_drained(&db, Duration::from_secs(5)).await;
    let report = audit(&db, &strict()).await.unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.totals.top_ups_minor, 5_000);
    assert_eq!(report.totals.finished_minor, 4_000);
    assert_eq!(report.totals.balances_minor, 1_000);

    let (code, out) = gozon(&["audit", "--database-url", &env.database_url]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit passed"), "{out}");
}

#[tokio::test]
async fn every_broken_invariant_is_reported() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("bea", "100").await;
    let paid = app.create_order("bea", "30").await;
    let paid = app
        .wait_until_final(paid.str("id"), Duration::from_secs(5))
        .await;
    let paid_id = paid.str("id").to_owned();
    let db = env.db().await;
    wait_for_outboxes_drained(&db, Duration::from_secs(5)).await;
    app.shutdown();

    // Corrupt the data the ways a broken saga would.
    db.execute_unprepared(&format!(
        "UPDATE orders.orders SET status = 'CANCELLED', reason = 'no_account', \
             updated_at = now() - interval '1 hour' WHERE id = '{paid_id}'; \
         INSERT INTO payments.transactions (user_id, kind, amount_minor, order_id, balance_after_minor) \
             VALUES ('bea', 'debit', 5, gen_random_uuid(), 65); \
         UPDATE payments.accounts SET balance_minor = balance_minor + 1 WHERE user_id = 'bea'; \
         INSERT INTO orders.orders (id, user_id, amount_minor, status, correlation_id, created_at) \
             VALUES (gen_random_uuid(), 'bea', 1, 'NEW', 'c', now() - interval '1 hour'); \
         INSERT INTO orders.outbox (message_id, message_type, correlation_id, body, created_at) \
             VALUES (gen_random_uuid(), 'payment.requested.v1', 'c', '{{}}', now() - interval '1 hour');"
    ))
    .await
    .unwrap();

    let report = audit(&db, &strict()).await.unwrap();
    assert!(!report.passed());
    let failed = report.failed_checks();
    for check in [
        "every balance equals its top-ups and refunds minus its debits",
        "money conserved: top-ups = balances + FINISHED + REFUNDING + unrefunded debits of NEW or CANCELLED orders",
        "every debit belongs to an order",
        "no CANCELLED order left debited once its refund had time",
        "no order stuck in NEW",
        "no outbox message stuck unsent",
    ] {
        assert!(failed.contains(&check), "{check} should fail:\n{report}");
    }
    assert!(report.to_string().contains(&paid_id), "{report}");

    let (code, out) = gozon(&["audit", "--database-url", &env.database_url]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("audit FAILED"), "{out}");
}
