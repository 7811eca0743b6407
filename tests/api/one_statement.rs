//! The one-statement paths of the consumers (a debit that succeeds, a payment answer for a NEW
//! order) raced against themselves and against the transaction path: copies of one request or
//! answer applied at once, under one message id or two, take effect once, without a deadlock,
//! and one that does not apply writes nothing.

use gozon::app::cli::Role;
use gozon::contracts::PaymentSucceededV1;
use gozon::kernel::money::Money;
use gozon::kernel::user_id::UserId;
use gozon::messaging::consumer::{Handler, Incoming};
use gozon::messaging::inbox;
use gozon::messaging::outbox::OutboxRow;
use gozon::orders::domain::{OrderId, OrderStatus};
use gozon::orders::{events, store as orders_store};
use gozon::payments::handler::{PaymentRequestHandler, Request};
use gozon::payments::store::{self as payments_store, OrderCharge};
use sea_orm::{Database, DatabaseConnection, DbErr, SqlErr, TransactionTrait};

use crate::helpers::{TestEnv, scalar_i64};

fn record(
    schema: &'static str,
    consumer: &'static str,
    message_id: uuid::Uuid,
) -> Option<inbox::Record<'static>> {
    Some(inbox::Record {
        schema,
        consumer,
        message_id,
    })
}

fn answer(order_id: uuid::Uuid, user: &UserId, amount: Money) -> OutboxRow {
    let answer = PaymentSucceededV1 {
        order_id,
        user_id: user.clone(),
        amount,
    };
    OutboxRow::new(&answer, "test-one-statement").unwrap()
}

#[tokio::test]
async fn racing_one_statement_debits_of_one_order_debit_it_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Payments).await;
    app.funded_account("ivy", "100.00").await;
    // Two pools: the copies of each pair run on two connections at once.
    let (first, second) = (
        Database::connect(&env.database_url).await.unwrap(),
        Database::connect(&env.database_url).await.unwrap(),
    );
    let db = env.db().await;
    let user = UserId::parse("ivy").unwrap();
    let amount = Money::parse_amount("3.00").unwrap();
    let consumer = "payments.payment-requests";

    // 20 orders, each asked twice at once: even ones under one message id, odd ones under two.
    for n in 0..20 {
        let order_id = uuid::Uuid::now_v7();
        let ids = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let ids = if n % 2 == 0 { (ids.0, ids.0) } else { ids };
        let charge = OrderCharge {
            order_id,
            user: &user,
            amount,
        };
        let (a, b) = debit_twice((&first, &second), &charge, ids).await;
        // One applied; the other found the order claimed (false) or failed on the claim or
        // inbox key (an error): either way it wrote nothing.
        let applied = [&a, &b].iter().filter(|r| matches!(r, Ok(true))).count();
        assert_eq!(applied, 1, "order {n}: {a:?} / {b:?}");
        let debits = scalar_i64(
            &db,
            &format!(
                "SELECT count(*) FROM payments.transactions WHERE kind = 'debit' AND order_id = '{order_id}'"
            ),
        )
        .await;
        assert_eq!(debits, 1, "order {n} debited once");
    }
    assert_eq!(app.balance("ivy").await.str("balance"), "40.00");
    let counts = [
        "SELECT count(*) FROM payments.order_payments WHERE outcome = 'debited'",
        "SELECT count(*) FROM payments.inbox",
        "SELECT count(*) FROM payments.outbox WHERE message_type = 'payment.succeeded.v1'",
    ];
    for sql in counts {
        assert_eq!(scalar_i64(&db, sql).await, 20, "{sql}");
    }

    // Short of money: nothing written at all (the transaction path records the refusal).
    let order_id = uuid::Uuid::now_v7();
    let big = Money::parse_amount("50.00").unwrap();
    let charge = OrderCharge {
        order_id,
        user: &user,
        amount: big,
    };
    let refused = payments_store::debit_alone(
        &first,
        &charge,
        record("payments", consumer, uuid::Uuid::now_v7()),
        answer(order_id, &user, big),
    )
    .await
    .unwrap();
    assert!(!refused, "a short balance is not debited");
    for sql in counts {
        assert_eq!(scalar_i64(&db, sql).await, 20, "after the refusal: {sql}");
    }
    assert_eq!(app.balance("ivy").await.str("balance"), "40.00");
}

#[tokio::test]
async fn racing_one_statement_answers_for_one_order_settle_it_once() {
    let env = TestEnv::new();
    // Orders only: the payment request waits in its queue and the order stays NEW.
    let app = env.spawn(Role::Orders).await;
    let placed = app.create_order("joe", "7.00").await;
    let id = OrderId::parse(placed.str("id")).unwrap();
    let (first, second) = (
        Database::connect(&env.database_url).await.unwrap(),
        Database::connect(&env.database_url).await.unwrap(),
    );
    let db = env.db().await;
    let user = UserId::parse("joe").unwrap();
    let amount = Money::parse_amount("7.00").unwrap();
    let consumer = "orders.payment-results";

    // An answer that names another amount matches nothing and writes nothing.
    let wrong = orders_store::settle_alone(
        &first,
        (id, &user, Money::parse_amount("8.00").unwrap()),
        OrderStatus::Finished,
        record("orders", consumer, uuid::Uuid::now_v7()),
        events::notification(&id, &user),
    )
    .await
    .unwrap();
    assert!(wrong.is_none());
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM orders.inbox").await,
        0
    );

    let (a, b) = tokio::join!(
        orders_store::settle_alone(
            &first,
            (id, &user, amount),
            OrderStatus::Finished,
            record("orders", consumer, uuid::Uuid::now_v7()),
            events::notification(&id, &user),
        ),
        orders_store::settle_alone(
            &second,
            (id, &user, amount),
            OrderStatus::Finished,
            record("orders", consumer, uuid::Uuid::now_v7()),
            events::notification(&id, &user),
        ),
    );
    let settled: Vec<_> = [a, b].into_iter().filter_map(Result::unwrap).collect();
    assert_eq!(settled.len(), 1, "one copy settles the order");
    assert_eq!(settled[0].status, OrderStatus::Finished);
    assert_eq!(app.order(placed.str("id")).await.str("status"), "FINISHED");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM orders.inbox").await,
        1,
        "only the copy that applied is recorded"
    );
}

/// Two copies of one debit request, under the message ids `ids`, applied alone at once over
/// two pools.
async fn debit_twice(
    pools: (&DatabaseConnection, &DatabaseConnection),
    charge: &OrderCharge<'_>,
    ids: (uuid::Uuid, uuid::Uuid),
) -> (Result<bool, DbErr>, Result<bool, DbErr>) {
    let consumer = "payments.payment-requests";
    let copy = |pool, id| {
        payments_store::debit_alone(
            pool,
            charge,
            record("payments", consumer, id),
            answer(charge.order_id, charge.user, charge.amount),
        )
    };
    tokio::join!(copy(pools.0, ids.0), copy(pools.1, ids.1))
}

/// A copy that lost a race wrote nothing: it found the order claimed, or its claim or inbox
/// record met the winner's key. Anything else (a deadlock above all) is a failure.
fn lost_cleanly(result: &Result<bool, DbErr>) -> bool {
    match result {
        Ok(applied) => !applied,
        Err(error) => matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))),
    }
}

#[tokio::test]
async fn copies_queued_on_a_locked_account_debit_once() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Payments).await;
    app.funded_account("kim", "100.00").await;
    let db = env.db().await;
    let (first, second) = (
        Database::connect(&env.database_url).await.unwrap(),
        Database::connect(&env.database_url).await.unwrap(),
    );
    let user = UserId::parse("kim").unwrap();
    let amount = Money::parse_amount("10.00").unwrap();
    for same_id in [true, false] {
        let order_id = uuid::Uuid::now_v7();
        let ids = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let ids = if same_id { (ids.0, ids.0) } else { ids };
        // The account held by a third transaction: both copies queue behind it and then take
        // it one after the other (the second one re-checks the row after its wait).
        let holder = db.begin().await.unwrap();
        payments_store::lock_accounts(&holder, &["kim"])
            .await
            .unwrap();
        let charge = OrderCharge {
            order_id,
            user: &user,
            amount,
        };
        let copies = debit_twice((&first, &second), &charge, ids);
        let release = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            holder.commit().await.unwrap();
        };
        let ((a, b), ()) = tokio::join!(copies, release);
        let applied = [&a, &b].iter().filter(|r| matches!(r, Ok(true))).count();
        assert_eq!(applied, 1, "{a:?} / {b:?}");
        assert!(lost_cleanly(&a) || lost_cleanly(&b), "{a:?} / {b:?}");
    }
    let debits = "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'";
    assert_eq!(scalar_i64(&db, debits).await, 2);
    assert_eq!(app.balance("kim").await.str("balance"), "80.00");
}

#[tokio::test]
async fn a_copy_applied_alone_while_the_transaction_path_holds_the_request_waits_and_loses() {
    let env = TestEnv::new();
    let app = env.spawn(Role::Payments).await;
    app.funded_account("lou", "100.00").await;
    let db = env.db().await;
    let alone = Database::connect(&env.database_url).await.unwrap();
    let user = UserId::parse("lou").unwrap();
    let amount = Money::parse_amount("30.00").unwrap();
    let consumer = "payments.payment-requests";
    let handler = PaymentRequestHandler::new(std::sync::Arc::new(tokio::sync::Notify::new()));
    for same_id in [true, false] {
        let order_id = uuid::Uuid::now_v7();
        let ids = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let ids = if same_id { (ids.0, ids.0) } else { ids };
        let request = Request::Debit(gozon::contracts::PaymentRequestedV1 {
            order_id,
            user_id: user.clone(),
            amount,
        });
        // The transaction path as the consumer runs it (its locks, then its inbox record),
        // left open while the copy is applied alone on another connection.
        let txn = db.begin().await.unwrap();
        handler.lock(&txn, &[&request]).await.unwrap();
        let first = inbox::record_first_delivery(&txn, "payments", consumer, ids.0)
            .await
            .unwrap();
        assert!(first);
        let charge = OrderCharge {
            order_id,
            user: &user,
            amount,
        };
        let copy = payments_store::debit_alone(
            &alone,
            &charge,
            record("payments", consumer, ids.1),
            answer(order_id, &user, amount),
        );
        let transaction = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let incoming = Incoming {
                message: request.clone(),
                message_id: ids.0,
                correlation_id: "test-one-statement".to_owned(),
            };
            handler.apply(&txn, incoming).await.unwrap();
            txn.commit().await.unwrap();
            std::time::Instant::now()
        };
        let (copied, committed) = tokio::join!(copy, transaction);
        // No deadlock (PostgreSQL would break one after a second): the copy waited for the
        // account and then found the order claimed.
        assert!(lost_cleanly(&copied), "{copied:?}");
        assert!(committed.elapsed() < std::time::Duration::from_millis(800));
    }
    let debits = "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'";
    assert_eq!(scalar_i64(&db, debits).await, 2);
    assert_eq!(app.balance("lou").await.str("balance"), "40.00");
}

#[tokio::test]
async fn a_paid_order_and_a_refused_one_go_the_one_statement_path_and_the_transaction_path() {
    let env = TestEnv::new();
    let app = env.spawn(Role::All).await;
    app.funded_account("mia", "10.00").await;
    // One at a time: two requests that reach the consumer together go as one batch (a CI run
    // saw it), not alone.
    let within = std::time::Duration::from_secs(10);
    let paid = app.create_order("mia", "4.00").await;
    let paid = app.wait_until_final(paid.str("id"), within).await;
    let refused = app.create_order("mia", "40.00").await;
    let refused = app.wait_until_final(refused.str("id"), within).await;
    assert_eq!(paid.str("status"), "FINISHED");
    assert_eq!(refused.str("status"), "CANCELLED");
    assert_eq!(app.balance("mia").await.str("balance"), "6.00");

    let text = app.metrics_text().await;
    let count = |queue: &str, outcome: &str| -> f64 {
        let prefix = format!(
            "gozon_consumer_one_statement_total{{queue=\"{queue}\",outcome=\"{outcome}\"}}"
        );
        text.lines()
            .find(|line| line.starts_with(&prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    };
    // The debit and both answers (a NEW order each) in one statement; the refusal not.
    assert_eq!(count("payments.payment-requests", "applied"), 1.0, "{text}");
    assert_eq!(
        count("payments.payment-requests", "not_applicable"),
        1.0,
        "{text}"
    );
    assert_eq!(count("orders.payment-results", "applied"), 2.0, "{text}");
    assert_eq!(count("payments.payment-requests", "failed"), 0.0, "{text}");
}
