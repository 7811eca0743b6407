//! The `payments` schema: accounts, the ledger and the per-order payment record.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Statement, Value};
use uuid::Uuid;

use crate::contracts::PaymentFailureReason;
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::messaging::inbox;
use crate::messaging::outbox::OutboxRow;
use crate::payments::domain::{Account, DebitOutcome, EntryKind, LedgerEntry};

/// The business cap on a balance, 1 000 000 000.00: a top-up past it is refused. (Far below
/// what the BIGINT column holds, so sums over many accounts stay exact.)
pub const MAX_BALANCE_MINOR: i64 = 100_000_000_000;

fn statement<I: IntoIterator<Item = Value>>(sql: &str, values: I) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

fn money(minor: i64) -> Result<Money, DbErr> {
    Money::from_minor(minor)
        .ok_or_else(|| DbErr::Custom(format!("negative amount {minor} in storage")))
}

fn user_id(text: &str) -> Result<UserId, DbErr> {
    UserId::parse(text).map_err(|_| DbErr::Custom(format!("invalid user_id {text:?} in storage")))
}

#[derive(FromQueryResult)]
struct AccountRow {
    user_id: String,
    balance_minor: i64,
}

impl AccountRow {
    fn into_account(self) -> Result<Account, DbErr> {
        Ok(Account {
            user_id: user_id(&self.user_id)?,
            balance: money(self.balance_minor)?,
        })
    }
}

/// Creates an empty account; `None` when the user already has one.
pub async fn create_account(
    conn: &impl ConnectionTrait,
    user: &UserId,
) -> Result<Option<Account>, DbErr> {
    let row = AccountRow::find_by_statement(statement(
        "INSERT INTO payments.accounts (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING \
         RETURNING user_id, balance_minor",
        [user.as_str().into()],
    ))
    .one(conn)
    .await?;
    row.map(AccountRow::into_account).transpose()
}

pub async fn find_account(
    conn: &impl ConnectionTrait,
    user: &UserId,
) -> Result<Option<Account>, DbErr> {
    let row = AccountRow::find_by_statement(statement(
        "SELECT user_id, balance_minor FROM payments.accounts WHERE user_id = $1",
        [user.as_str().into()],
    ))
    .one(conn)
    .await?;
    row.map(AccountRow::into_account).transpose()
}

/// The accounts of `users` that exist (in no particular order): one statement for many GETs.
pub async fn find_accounts(
    conn: &impl ConnectionTrait,
    users: &[UserId],
) -> Result<Vec<Account>, DbErr> {
    let users: Vec<String> = users.iter().map(|user| user.as_str().to_owned()).collect();
    let rows = AccountRow::find_by_statement(statement(
        "SELECT user_id, balance_minor FROM payments.accounts WHERE user_id = ANY($1)",
        [users.into()],
    ))
    .all(conn)
    .await?;
    rows.into_iter().map(AccountRow::into_account).collect()
}

pub enum TopUp {
    Credited(Account),
    NoAccount,
    LimitExceeded,
}

/// Adds `amount` to the balance and writes the ledger row, in one statement.
///
/// Safe under concurrency: the UPDATE takes the account's row lock and re-checks its WHERE
/// after any wait, so concurrent top-ups add up and none can push the balance past the limit.
pub async fn top_up(
    conn: &impl ConnectionTrait,
    user: &UserId,
    amount: Money,
) -> Result<TopUp, DbErr> {
    let row = conn
        .query_one_raw(statement(
            "WITH credited AS ( \
                 UPDATE payments.accounts \
                 SET balance_minor = balance_minor + $2, updated_at = clock_timestamp() \
                 WHERE user_id = $1 AND balance_minor <= $3 - $2 \
                 RETURNING user_id, balance_minor) \
             INSERT INTO payments.transactions (user_id, kind, amount_minor, balance_after_minor) \
             SELECT user_id, 'top_up', $2, balance_minor FROM credited \
             RETURNING balance_after_minor",
            [
                user.as_str().into(),
                amount.minor().into(),
                MAX_BALANCE_MINOR.into(),
            ],
        ))
        .await?;
    if let Some(row) = row {
        let balance: i64 = row.try_get("", "balance_after_minor")?;
        return Ok(TopUp::Credited(Account {
            user_id: user.clone(),
            balance: money(balance)?,
        }));
    }
    Ok(match find_account(conn, user).await? {
        Some(_) => TopUp::LimitExceeded,
        None => TopUp::NoAccount,
    })
}

/// Debits an order's amount at most once, ever, and says what happened. Call it inside the
/// transaction that records the request in the inbox and its answer in the outbox.
///
/// Two guarantees live here:
/// - once per order: the INSERT into `order_payments` claims the order. A second request for
///   the same order (even under another message id) conflicts on the primary key, waits for
///   the first transaction, and then only reads the outcome already decided;
/// - never below zero: the debit is one conditional UPDATE (`balance_minor >= amount`); the
///   row lock serialises concurrent debits and PostgreSQL re-checks the condition after the
///   wait, so a balance of 100 pays exactly ten orders of 10 whatever the concurrency.
pub async fn debit_for_order(
    conn: &impl ConnectionTrait,
    charge: &OrderCharge<'_>,
) -> Result<DebitOutcome, DbErr> {
    let OrderCharge {
        order_id,
        user,
        amount,
    } = *charge;
    let claim_payment = "INSERT INTO payments.order_payments (order_id, user_id, amount_minor, \
         outcome) VALUES ($1, $2, $3, 'pending') ON CONFLICT (order_id) DO NOTHING";
    let claimed = claim(conn, claim_payment, charge).await?;
    if !claimed {
        return decided_outcome(conn, order_id).await;
    }

    // The debit with its ledger row, and the outcome recorded on the claim, in one statement:
    // `debited` is empty when the balance is short or there is no account, which the
    // statement tells apart from its own snapshot of the accounts.
    let recorded = conn
        .query_one_raw(statement(
            "WITH debited AS ( \
                 UPDATE payments.accounts \
                 SET balance_minor = balance_minor - $2, updated_at = clock_timestamp() \
                 WHERE user_id = $1 AND balance_minor >= $2 \
                 RETURNING user_id, balance_minor), \
             ledger AS ( \
                 INSERT INTO payments.transactions (user_id, kind, amount_minor, order_id, balance_after_minor) \
                 SELECT user_id, 'debit', $2, $3, balance_minor FROM debited), \
             decided AS ( \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM debited) THEN 'debited' \
                             WHEN EXISTS (SELECT 1 FROM payments.accounts WHERE user_id = $1) \
                                 THEN 'insufficient_funds' \
                             ELSE 'no_account' END AS outcome) \
             UPDATE payments.order_payments SET outcome = (SELECT outcome FROM decided), \
                 updated_at = clock_timestamp() \
             WHERE order_id = $3 RETURNING outcome",
            [user.as_str().into(), amount.minor().into(), order_id.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom(format!("order {order_id}: its payment claim is gone")))?;
    let stored: String = recorded.try_get("", "outcome")?;
    stored_outcome(order_id, &stored)
}

/// The common case of a debit in one statement, with no transaction around it: an order not
/// claimed yet, on an account that holds enough. The debit, its ledger row, the claim (as
/// debited), the request's inbox record (`inbox`) and the answer (`answer`, PaymentSucceeded)
/// are written together, or nothing is: false when the balance is short, there is no account
/// or the order was claimed already (the transaction path tells those apart). Two copies of
/// one request at once: the account's row lock serialises them and the second one's claim
/// (a plain INSERT on the order's key) fails its statement, so the order is debited once.
pub async fn debit_alone(
    conn: &impl ConnectionTrait,
    charge: &OrderCharge<'_>,
    inbox: Option<inbox::Record<'_>>,
    answer: OutboxRow,
) -> Result<bool, DbErr> {
    let OrderCharge {
        order_id,
        user,
        amount,
    } = *charge;
    let (recorded, record_values) = inbox::recorded_cte(inbox, "debited", 9);
    let columns = OutboxRow::INSERT_COLUMNS;
    let sql = format!(
        "WITH debited AS ( \
             UPDATE payments.accounts \
             SET balance_minor = balance_minor - $2, updated_at = clock_timestamp() \
             WHERE user_id = $1 AND balance_minor >= $2 \
               AND NOT EXISTS (SELECT 1 FROM payments.order_payments WHERE order_id = $3) \
             RETURNING user_id, balance_minor), \
         claimed AS ( \
             INSERT INTO payments.order_payments (order_id, user_id, amount_minor, outcome) \
             SELECT $3, user_id, $2, 'debited' FROM debited), \
         ledger AS ( \
             INSERT INTO payments.transactions (user_id, kind, amount_minor, order_id, balance_after_minor) \
             SELECT user_id, 'debit', $2, $3, balance_minor FROM debited), \
         answered AS (INSERT INTO payments.outbox ({columns}) SELECT $4, $5, $6, $7, $8 FROM debited) \
         {recorded} \
         SELECT count(*) AS debited FROM debited"
    );
    let mut values: Vec<Value> = vec![user.as_str().into(), amount.minor().into(), order_id.into()];
    values.extend(answer.values());
    values.extend(record_values);
    let row = conn
        .query_one_raw(statement(&sql, values))
        .await?
        .ok_or_else(|| DbErr::Custom("a debit answered no row".to_owned()))?;
    let debited: i64 = row.try_get("", "debited")?;
    Ok(debited == 1)
}

/// Locks the accounts of `users` that exist, in the order of their ids (inside a transaction,
/// until it ends): a consumer's transaction takes them before anything else, as a debit in one
/// statement does ([`debit_alone`]), so the two never wait for each other in a cycle.
pub async fn lock_accounts(conn: &impl ConnectionTrait, users: &[&str]) -> Result<(), DbErr> {
    let users: Vec<String> = users.iter().map(|user| (*user).to_owned()).collect();
    conn.query_all_raw(statement(
        "SELECT user_id FROM payments.accounts WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
        [users.into()],
    ))
    .await?;
    Ok(())
}

/// An order's amount, charged to (or given back to) a user.
#[derive(Debug, Clone, Copy)]
pub struct OrderCharge<'a> {
    pub order_id: Uuid,
    pub user: &'a UserId,
    pub amount: Money,
}

/// Runs a claiming INSERT ... ON CONFLICT DO NOTHING for an order ($1), user ($2) and amount
/// ($3); whether this call claimed it.
async fn claim(
    conn: &impl ConnectionTrait,
    sql: &str,
    charge: &OrderCharge<'_>,
) -> Result<bool, DbErr> {
    let values = [
        charge.order_id.into(),
        charge.user.as_str().into(),
        charge.amount.minor().into(),
    ];
    Ok(conn
        .execute_raw(statement(sql, values))
        .await?
        .rows_affected()
        == 1)
}

/// What a refund request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The amount is back on the account now.
    Refunded,
    /// It was given back before: nothing done again.
    AlreadyRefunded,
    /// No debit of this order, for this user and amount, to give back.
    NotDebited,
}

/// Gives an order's debit back at most once, ever. The INSERT into `order_refunds` claims the
/// refund (the primary key serialises two requests for one order, as `order_payments` does
/// for the debit) and only copies a debit that happened, for this user and amount; then one
/// statement credits the account and writes the ledger row. A refund is not held to the
/// balance cap: it returns money the account already held.
pub async fn refund_order(
    conn: &impl ConnectionTrait,
    refund: &OrderCharge<'_>,
) -> Result<RefundOutcome, DbErr> {
    let claim_refund = "INSERT INTO payments.order_refunds (order_id, user_id, amount_minor) \
         SELECT order_id, user_id, amount_minor FROM payments.order_payments \
         WHERE order_id = $1 AND user_id = $2 AND amount_minor = $3 AND outcome = 'debited' \
         ON CONFLICT (order_id) DO NOTHING";
    if !claim(conn, claim_refund, refund).await? {
        let refunded = conn
            .query_one_raw(statement(
                "SELECT 1 FROM payments.order_refunds WHERE order_id = $1",
                [refund.order_id.into()],
            ))
            .await?
            .is_some();
        return Ok(if refunded {
            RefundOutcome::AlreadyRefunded
        } else {
            RefundOutcome::NotDebited
        });
    }
    conn.execute_raw(statement(
        "WITH credited AS ( \
             UPDATE payments.accounts \
             SET balance_minor = balance_minor + $2, updated_at = clock_timestamp() \
             WHERE user_id = $1 RETURNING user_id, balance_minor) \
         INSERT INTO payments.transactions (user_id, kind, amount_minor, order_id, balance_after_minor) \
         SELECT user_id, 'refund', $2, $3, balance_minor FROM credited",
        [
            refund.user.as_str().into(),
            refund.amount.minor().into(),
            refund.order_id.into(),
        ],
    ))
    .await?;
    Ok(RefundOutcome::Refunded)
}

async fn decided_outcome(
    conn: &impl ConnectionTrait,
    order_id: Uuid,
) -> Result<DebitOutcome, DbErr> {
    let row = conn
        .query_one_raw(statement(
            "SELECT outcome FROM payments.order_payments WHERE order_id = $1",
            [order_id.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("order payment {order_id}")))?;
    let outcome: String = row.try_get("", "outcome")?;
    stored_outcome(order_id, &outcome)
}

/// A debit's outcome as `payments.order_payments` stores it.
fn stored_outcome(order_id: Uuid, outcome: &str) -> Result<DebitOutcome, DbErr> {
    match outcome {
        "debited" => Ok(DebitOutcome::Debited),
        "no_account" => Ok(DebitOutcome::Refused(PaymentFailureReason::NoAccount)),
        "insufficient_funds" => Ok(DebitOutcome::Refused(
            PaymentFailureReason::InsufficientFunds,
        )),
        other => Err(DbErr::Custom(format!(
            "order payment {order_id} is still {other}"
        ))),
    }
}

#[derive(FromQueryResult)]
struct LedgerRow {
    id: i64,
    kind: String,
    amount_minor: i64,
    order_id: Option<Uuid>,
    balance_after_minor: i64,
    created_at: DateTime<Utc>,
}

/// The account's ledger, newest first.
/// Up to `limit` of `user`'s ledger entries, newest first, from just before entry `before`
/// (keyset on the entry id, which only grows; uses `transactions_user_idx`).
pub async fn ledger(
    conn: &impl ConnectionTrait,
    user: &UserId,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<LedgerEntry>, DbErr> {
    let rows = LedgerRow::find_by_statement(statement(
        "SELECT id, kind, amount_minor, order_id, balance_after_minor, created_at \
         FROM payments.transactions WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        [
            user.as_str().into(),
            before.unwrap_or(i64::MAX).into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ],
    ))
    .all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(LedgerEntry {
                id: row.id,
                kind: match row.kind.as_str() {
                    "top_up" => EntryKind::TopUp,
                    "debit" => EntryKind::Debit,
                    "refund" => EntryKind::Refund,
                    other => return Err(DbErr::Custom(format!("unknown ledger kind {other}"))),
                },
                amount: money(row.amount_minor)?,
                order_id: row.order_id,
                balance_after: money(row.balance_after_minor)?,
                created_at: row.created_at,
            })
        })
        .collect()
}
