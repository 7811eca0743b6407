//! Message keys rotate: the current key signs, the previous ones still verify (messages in
//! flight and in dead-letter queues survive a rotation), an unknown key id is dead-lettered.

use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use gozon::app::config::Settings;
use gozon::messaging::dlq;
use gozon::messaging::signing::{self, MessageKey};
use gozon::{app, payments};

use crate::helpers::{TestApp, TestEnv, scalar_i64};
use crate::poison::wait_for_dead_letters;
use crate::saga::{payment_requested, publish_with_headers};

const OLD: &str = "the-old-message-key-of-32-bytes-or-more";
const NEW: &str = "the-new-message-key-of-32-bytes-or-more";

fn keys(env: &TestEnv, current: &str, previous: &[&str]) -> Settings {
    let mut settings = env.settings();
    settings.message_key = current.to_owned();
    settings.message_key_previous = previous.iter().map(|k| (*k).to_owned()).collect();
    settings
}

/// Publishes a payment request for `user`, signed with `signer` and naming `key_id`.
async fn request(env: &TestEnv, user: &str, amount: &str, signer: &str, key_id: &str) -> String {
    let message_id = uuid::Uuid::now_v7();
    let body = payment_requested(message_id, uuid::Uuid::now_v7(), user, amount);
    let signature = MessageKey::new(signer).sign(&body);
    let headers = [
        (signing::HEADER, signature.as_str()),
        (signing::KEY_ID_HEADER, key_id),
    ];
    let exchange = crate::saga::exchange_for(&env.prefix, "payment.requested.v1");
    let id = message_id.to_string();
    publish_with_headers(&exchange, "payment.requested.v1", &id, &body, &headers).await;
    id
}

fn id(key: &str) -> String {
    MessageKey::new(key).id().to_owned()
}

async fn wait_for_balance(app: &TestApp, user: &str, balance: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.balance(user).await.str("balance") != balance {
        assert!(Instant::now() < deadline, "{user} never reached {balance}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_previous_key_still_verifies_and_an_unknown_key_id_is_dead_lettered() {
    let env = TestEnv::new();
    let app = env
        .spawn_with(&keys(&env, NEW, &[OLD]), Role::Payments)
        .await;
    app.wait_until_ready().await;
    app.funded_account("tess", "100").await;
    let db = env.db().await;

    request(&env, "tess", "10", OLD, &id(OLD)).await;
    request(&env, "tess", "20", NEW, &id(NEW)).await;
    wait_for_balance(&app, "tess", "70.00").await;

    let stranger = "a-key-nobody-here-holds-32-bytes-long";
    request(&env, "tess", "1", stranger, &id(stranger)).await;
    // Signed with the new key but claiming the old one: forged.
    request(&env, "tess", "2", NEW, &id(OLD)).await;
    wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 2).await;
    let debits = "SELECT count(*) FROM payments.transactions WHERE kind = 'debit'";
    assert_eq!(scalar_i64(&db, debits).await, 2);
    assert_eq!(app.balance("tess").await.str("balance"), "70.00");
}

#[tokio::test]
async fn a_dead_letter_signed_with_the_old_key_is_applied_when_replayed_after_the_rotation() {
    let env = TestEnv::new();
    // A deployment that rotated to the new key but forgot the old one: the old key's message
    // is dead-lettered.
    let forgetful = env.spawn_with(&keys(&env, NEW, &[]), Role::Payments).await;
    forgetful.wait_until_ready().await;
    forgetful.funded_account("uma", "100").await;
    let parked = request(&env, "uma", "25", OLD, &id(OLD)).await;
    wait_for_dead_letters(&env, &payments::PAYMENT_REQUESTS, 1).await;
    forgetful.shutdown();
    drop(forgetful);

    // Rotated properly: the old key verifies again, and the replay applies the request.
    let settings = keys(&env, NEW, &[OLD]);
    let app = env.spawn_with(&settings, Role::Payments).await;
    app.wait_until_ready().await;
    let broker = app::broker(&settings, Role::Payments).unwrap();
    let replayed = dlq::replay(&broker, &payments::PAYMENT_REQUESTS, 10, Some(&parked))
        .await
        .unwrap();
    assert_eq!(replayed.len(), 1);
    wait_for_balance(&app, "uma", "75.00").await;
}

#[test]
fn short_message_keys_are_refused() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    assert!(
        settings.check_message_keys().is_ok(),
        "the development key only warns"
    );
    settings.message_key = "short".into();
    assert!(settings.check_message_keys().is_err());
    settings.message_key = NEW.into();
    settings.message_key_previous = vec!["old".into()];
    assert!(settings.check_message_keys().is_err());
    settings.message_key_previous = vec![OLD.into()];
    assert!(settings.check_message_keys().is_ok());
}
