//! One RabbitMQ user per role, with rights on its own names only (`amqp::permissions`): the saga
//! works under them, and neither role can purge or delete the other's queues.

use std::time::Duration;

use gozon::app::cli::Role;
use gozon::messaging::amqp::permissions;
use lapin::options::{QueueDeleteOptions, QueuePurgeOptions};
use lapin::{Connection, ConnectionProperties};

use crate::helpers::TestEnv;

fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (the broker's own CLI, beside the local RabbitMQ)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A broker user of `context` with the rights Gozon documents for it; deleted on drop.
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    async fn create(prefix: &str, context: &str, sends_to: &str) -> BrokerUser {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let user = BrokerUser {
            name: format!("gozon-test-{context}-{}", &id[..8]),
            password: id,
        };
        let rights = permissions(prefix, context, &[sends_to]);
        let (name, password) = (user.name.clone(), user.password.clone());
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["add_user", &name, &password]);
            let (c, w, r) = (&rights.configure, &rights.write, &rights.read);
            rabbitmqctl(&["set_permissions", "-p", "/", &name, c, w, r]);
        })
        .await
        .unwrap();
        user
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

fn outcome<T>(result: Result<T, lapin::Error>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(error) if error.to_string().contains("ACCESS_REFUSED") => "refused".to_owned(),
        Err(error) => error.to_string(),
    }
}

/// What the broker answers `user` when it purges `queue`, and when it deletes it if `delete`
/// (each on a channel of its own: a refusal closes the channel).
async fn purge_and_delete(user: &BrokerUser, queue: &str, delete: bool) -> (String, String) {
    let connection = Connection::connect(&user.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let purged = outcome(
        channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await,
    );
    let mut deleted = "not tried".to_owned();
    if delete {
        let channel = connection.create_channel().await.unwrap();
        let options = QueueDeleteOptions {
            if_empty: true,
            ..QueueDeleteOptions::default()
        };
        deleted = outcome(channel.queue_delete(queue.into(), options).await);
    }
    let _ = connection.close(200, "done".into()).await;
    (purged, deleted)
}

#[tokio::test]
async fn each_role_has_a_broker_user_of_its_own_that_cannot_touch_the_others_queues() {
    let env = TestEnv::new();
    let orders_user = BrokerUser::create(&env.prefix, "orders", "payments").await;
    let payments_user = BrokerUser::create(&env.prefix, "payments", "orders").await;

    // The split deployment runs under these users, and an order is paid.
    let mut settings = env.settings();
    settings.amqp_url = payments_user.url();
    let payments = env.spawn_with(&settings, Role::Payments).await;
    settings.amqp_url = orders_user.url();
    let orders = env.spawn_with(&settings, Role::Orders).await;
    payments.wait_until_ready().await;
    orders.wait_until_ready().await;
    payments.funded_account("rabbit", "50").await;
    let order = orders.create_order("rabbit", "20").await;
    let paid = orders
        .wait_until_final(order.str("id"), Duration::from_secs(10))
        .await;
    assert_eq!(paid.str("status"), "FINISHED");

    let payments_queue = format!("{}.payments.payment-requests", env.prefix);
    let orders_queue = format!("{}.orders.payment-results", env.prefix);
    for (user, queue) in [
        (&orders_user, &payments_queue),
        (&orders_user, &format!("{payments_queue}.dlq")),
        (&payments_user, &orders_queue),
        (&payments_user, &format!("{orders_queue}.dlq")),
    ] {
        assert_eq!(
            purge_and_delete(user, queue, true).await,
            ("refused".to_owned(), "refused".to_owned()),
            "{} on {queue}",
            user.name
        );
    }
    // Its own dead-letter queue, a role may purge (the check above can tell the difference).
    let (purged, _) = purge_and_delete(&orders_user, &format!("{orders_queue}.dlq"), false).await;
    assert_eq!(purged, "ok");

    payments.shutdown();
    orders.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
}
