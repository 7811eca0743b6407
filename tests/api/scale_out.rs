//! Split roles and several instances of each, sharing one database and one broker.

use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{TestEnv, assert_money_conserved, scalar_i64, wait_for_outboxes_drained};
use crate::saga::pay_and_refuse;
use gozon::app::cli::Role;

#[tokio::test]
async fn the_saga_works_across_a_payments_process_and_an_orders_process() {
    let env = TestEnv::new();
    let payments = env.spawn(Role::Payments).await;
    let orders = env.spawn(Role::Orders).await;

    // Each process serves only its own context.
    payments.orders("x").await.assert_error(404, "not_found");
    orders.balance("x").await.assert_error(404, "not_found");

    pay_and_refuse(&payments, &orders).await;
    let db = env.db().await;
    wait_for_outboxes_drained(&db, Duration::from_secs(5)).await;
    assert_money_conserved(&db).await;
}

#[tokio::test]
async fn two_instances_of_each_role_pay_no_order_twice_and_settle_every_order() {
    let env = TestEnv::new();
    let payments = [
        env.spawn(Role::Payments).await,
        env.spawn(Role::Payments).await,
    ];
    let orders = [env.spawn(Role::Orders).await, env.spawn(Role::Orders).await];

    let users = ["p0", "p1", "p2", "p3"];
    for (i, user) in users.iter().enumerate() {
        payments[i % 2].funded_account(user, "50.00").await;
    }
    // 120 orders of 5.00 over 4 users with 50.00 each, plus some without an account,
    // spread over both orders instances: 40 can be paid.
    let mut requests = Vec::new();
    for i in 0..120 {
        let user = users[i % users.len()];
        requests.push(orders[i % 2].create_order(user, "5.00"));
    }
    for i in 0..10 {
        requests.push(orders[i % 2].create_order("p-none", "1.00"));
    }
    let created = futures_util::future::join_all(requests).await;
    assert!(
        created
            .iter()
            .all(|reply| reply.status == StatusCode::CREATED)
    );

    let mut finished = 0;
    for (i, order) in created.iter().enumerate() {
        let settled = orders[(i + 1) % 2]
            .wait_until_final(order.str("id"), Duration::from_secs(30))
            .await;
        if settled.str("status") == "FINISHED" {
            finished += 1;
        }
    }
    assert_eq!(finished, 40);
    for (i, user) in users.iter().enumerate() {
        assert_eq!(
            payments[(i + 1) % 2].balance(user).await.str("balance"),
            "0.00"
        );
    }

    let db = env.db().await;
    wait_for_outboxes_drained(&db, Duration::from_secs(5)).await;
    assert_money_conserved(&db).await;
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM orders.orders WHERE status = 'NEW'"
        )
        .await,
        0
    );
    let paid_twice = "SELECT count(*) FROM (SELECT order_id FROM payments.transactions \
                      WHERE kind = 'debit' GROUP BY order_id HAVING count(*) > 1) AS twice";
    assert_eq!(scalar_i64(&db, paid_twice).await, 0);
}
