//! SIGTERM: stop taking requests and deliveries, finish what is in flight, exit 0 quickly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gozon::ops::audit::{AuditSettings, audit};

use crate::helpers::{TestApp, TestEnv, scalar_i64, wait_for_outboxes_drained};

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let env = TestEnv::new();
    let mut process = env.start_process("all").await;
    process.app.funded_account("tess", "100").await;

    let app = Arc::new(TestApp::at(&process.app.address));
    let mut requests = Vec::new();
    for _ in 0..40 {
        let app = app.clone();
        requests.push(tokio::spawn(async move {
            app.try_create_order("tess", "1.00").await
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, took) = process.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // A request either completed (201) or was never taken; none failed half-way.
    let mut accepted = 0;
    for request in requests {
        if let Some(reply) = request.await.unwrap() {
            assert_eq!(reply.status, 201, "{}", reply.body);
            accepted += 1;
        }
    }

    // Back up, every accepted order settles and nothing is lost.
    process.restart().await;
    let db = env.db().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar_i64(
        &db,
        "SELECT count(*) FROM orders.orders WHERE status = 'NEW'",
    )
    .await
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "orders left NEW after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(scalar_i64(&db, "SELECT count(*) FROM orders.orders").await >= accepted);
    wait_for_outboxes_drained(&db, Duration::from_secs(10)).await;
    let settings = AuditSettings {
        stuck_after: Duration::from_secs(60),
        outbox_stale_after: Duration::from_secs(60),
    };
    let report = audit(&db, &settings).await.unwrap();
    assert!(report.passed(), "{report}");
    eprintln!(
        "SIGTERM: exited 0 in {took:?}; {accepted} of 40 in-flight requests accepted, all settled"
    );
}
