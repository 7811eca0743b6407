//! Least privilege: `gozon migrate` (as the schemas' owner) grants each context's serving role
//! DML on its own schema only; the processes then run as those roles with `--skip-migrations`.

use std::time::Duration;

use gozon::app::cli::Role;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbErr, RuntimeErr};

use crate::helpers::{POSTGRES, TestEnv, gozon, scalar_i64};

async fn admin() -> DatabaseConnection {
    Database::connect(format!("{POSTGRES}/postgres"))
        .await
        .unwrap()
}

/// The SQLSTATE of a statement's failure, or "ok".
async fn outcome(db: &DatabaseConnection, sql: &str) -> String {
    match db.execute_unprepared(sql).await {
        Ok(_) => "ok".to_owned(),
        Err(error) => {
            let text = error.to_string();
            if text.contains("permission denied") {
                "denied".to_owned()
            } else {
                text
            }
        }
    }
}

/// The SQLSTATE a statement fails with, or None when it succeeds.
async fn sqlstate(db: &DatabaseConnection, sql: &str) -> Option<String> {
    let error = db.execute_unprepared(sql).await.err()?;
    match error {
        DbErr::Exec(RuntimeErr::SqlxError(error)) | DbErr::Query(RuntimeErr::SqlxError(error)) => {
            error
                .as_database_error()
                .and_then(|error| error.code())
                .map(|code| code.into_owned())
        }
        other => Some(other.to_string()),
    }
}

#[tokio::test]
async fn each_context_runs_as_its_own_role_and_cannot_touch_the_other_schema() {
    let env = TestEnv::new();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (orders_role, payments_role) = (
        format!("gozon_test_o_{}", &id[..12]),
        format!("gozon_test_p_{}", &id[..12]),
    );
    let admin = admin().await;
    for role in [&orders_role, &payments_role] {
        admin
            .execute_unprepared(&format!("CREATE ROLE \"{role}\" LOGIN"))
            .await
            .unwrap();
    }
    let (code, _) = gozon(&[
        "migrate",
        "--database-url",
        &env.database_url,
        "--orders-db-role",
        &orders_role,
        "--payments-db-role",
        &payments_role,
    ]);
    assert_eq!(code, Some(0), "gozon migrate with grants");

    let database = env.database_url.rsplit('/').next().unwrap().to_owned();
    let as_role = |role: &str| format!("postgres://{role}@127.0.0.1:5432/{database}");
    let orders_db = Database::connect(as_role(&orders_role)).await.unwrap();
    assert_eq!(
        outcome(&orders_db, "SELECT count(*) FROM orders.orders").await,
        "ok"
    );
    assert_eq!(
        outcome(&orders_db, "SELECT count(*) FROM payments.accounts").await,
        "denied"
    );
    assert_eq!(
        outcome(&orders_db, "SELECT count(*) FROM payments.transactions").await,
        "denied"
    );
    assert_eq!(
        outcome(
            &orders_db,
            "INSERT INTO payments.accounts (user_id, balance_minor) VALUES ('thief', 100000)"
        )
        .await,
        "denied"
    );
    assert_eq!(
        outcome(&orders_db, "UPDATE payments.accounts SET balance_minor = 0").await,
        "denied"
    );
    assert_eq!(
        outcome(&orders_db, "CREATE TABLE orders.extra (id INT)").await,
        "denied",
        "no DDL"
    );
    let dropped = outcome(&orders_db, "DROP TABLE orders.orders").await;
    assert!(dropped.contains("must be owner"), "{dropped}");
    let payments_db = Database::connect(as_role(&payments_role)).await.unwrap();
    assert_eq!(
        outcome(&payments_db, "SELECT count(*) FROM orders.orders").await,
        "denied"
    );

    // The split deployment runs as these roles, and the saga works.
    let mut settings = env.settings();
    settings.skip_migrations = true;
    settings.database_url = as_role(&payments_role);
    let payments = env.spawn_with(&settings, Role::Payments).await;
    settings.database_url = as_role(&orders_role);
    let orders = env.spawn_with(&settings, Role::Orders).await;
    payments.wait_until_ready().await;
    orders.wait_until_ready().await;
    payments.funded_account("least", "50").await;
    let order = orders.create_order("least", "20").await;
    let paid = orders
        .wait_until_final(order.str("id"), Duration::from_secs(10))
        .await;
    assert_eq!(paid.str("status"), "FINISHED");
    assert_eq!(payments.balance("least").await.str("balance"), "30.00");

    // The ledger is append-only and a debit's record is never deleted, even by the role that
    // writes them: the database refuses (42501, insufficient_privilege), and nothing changes.
    for sql in [
        "UPDATE payments.transactions SET amount_minor = 1",
        "DELETE FROM payments.transactions",
        "DELETE FROM payments.order_payments",
        "UPDATE payments.order_refunds SET amount_minor = 1",
        "DELETE FROM payments.order_refunds",
        "TRUNCATE payments.transactions",
    ] {
        assert_eq!(
            sqlstate(&payments_db, sql).await.as_deref(),
            Some("42501"),
            "{sql}"
        );
    }
    assert_eq!(
        outcome(&payments_db, "SELECT count(*) FROM payments.transactions").await,
        "ok"
    );
    let ledger_rows = scalar_i64(&payments_db, "SELECT count(*) FROM payments.transactions").await;
    assert_eq!(ledger_rows, 2, "the top-up and the debit, untouched");

    payments.shutdown();
    orders.shutdown();
    drop((orders_db, payments_db, payments, orders));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let owner = Database::connect(&env.database_url).await.unwrap();
    owner
        .execute_unprepared(&format!(
            "DROP OWNED BY \"{orders_role}\", \"{payments_role}\""
        ))
        .await
        .unwrap();
    owner.close().await.unwrap();
    for role in [&orders_role, &payments_role] {
        // Its sessions end with the apps; retry while they close.
        for attempt in 0..20 {
            match admin
                .execute_unprepared(&format!("DROP ROLE IF EXISTS \"{role}\""))
                .await
            {
                Ok(_) => break,
                Err(error) if attempt == 19 => panic!("dropping {role}: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}
