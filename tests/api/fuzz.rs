//! Property test of HTTP input parsing: random amounts and ids through the real endpoints.
//! Whatever arrives, the answer is the documented success or a 400 envelope, never a 5xx, and
//! only exactly-valid amounts move money, by exactly their value.

use gozon::kernel::money::Money;
use gozon::kernel::user_id::UserId;
use gozon::payments::store::MAX_BALANCE_MINOR;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

use crate::helpers::spawn_app;

fn samples(pattern: impl Strategy<Value = String>, count: usize) -> Vec<String> {
    let mut runner = TestRunner::deterministic();
    (0..count)
        .map(|_| pattern.new_tree(&mut runner).unwrap().current())
        .collect()
}

#[tokio::test]
async fn random_amounts_are_either_exactly_credited_or_refused() {
    let app = spawn_app().await;
    app.create_account("fuzz").await;
    let amounts = proptest::prop_oneof![
        "\\PC{0,16}",
        "[0-9]{1,13}(\\.[0-9]{0,3})?",
        "[-+ ]?[0-9]{0,4}[.,eEx]?[0-9]{0,3}[ ;']?",
    ];
    let mut expected = 0i64;
    for amount in samples(amounts, 400) {
        let reply = app.add_funds("fuzz", &amount).await;
        match Money::parse_amount(&amount) {
            // Past the balance cap (1 000 000 000.00) a valid amount is refused, changing nothing.
            Ok(money) if expected + money.minor() > MAX_BALANCE_MINOR => {
                reply.assert_error(422, "balance_limit_exceeded");
            }
            Ok(money) => {
                assert_eq!(reply.status, 200, "{amount:?}: {}", reply.body);
                expected += money.minor();
                assert_eq!(
                    reply.str("balance"),
                    Money::from_minor(expected).unwrap().to_string()
                );
            }
            Err(_) => reply.assert_error(400, "invalid_amount"),
        }
    }
    let balance = app.balance("fuzz").await;
    assert_eq!(
        balance.str("balance"),
        Money::from_minor(expected).unwrap().to_string()
    );
}

#[tokio::test]
async fn random_user_ids_and_order_ids_get_answers_never_errors_of_ours() {
    let app = spawn_app().await;
    let ids = proptest::prop_oneof!["\\PC{0,70}", "[a-zA-Z0-9._-]{1,64}", "[a-f0-9-]{30,40}"];
    for text in samples(ids, 300) {
        let listed = app.orders(&text).await;
        match UserId::parse(&text) {
            Ok(_) => assert_eq!(listed.status, 200, "{text:?}: {}", listed.body),
            Err(_) => listed.assert_error(400, "invalid_user_id"),
        }
        let order = app.order(&text).await;
        match gozon::orders::domain::OrderId::parse(&text) {
            Ok(_) => order.assert_error(404, "order_not_found"),
            Err(_) => order.assert_error(400, "invalid_order_id"),
        }
    }
}
