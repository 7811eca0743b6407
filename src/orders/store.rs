//! The `orders` schema: orders and their saga state.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Statement, Value};
use uuid::Uuid;

use crate::contracts::PaymentFailureReason;
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::orders::domain::{Order, OrderCursor, OrderId, OrderStatus};

fn statement<I: IntoIterator<Item = Value>>(sql: &str, values: I) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

const ORDER_COLUMNS: &str = "id, user_id, amount_minor, status, reason, created_at, updated_at";

#[derive(FromQueryResult)]
struct OrderRow {
    id: Uuid,
    user_id: String,
    amount_minor: i64,
    status: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl OrderRow {
    fn into_order(self) -> Result<Order, DbErr> {
        let corrupt =
            |what: &str| DbErr::Custom(format!("order {}: invalid {what} in storage", self.id));
        let status = match (self.status.as_str(), self.reason.as_deref()) {
            ("NEW", None) => OrderStatus::New,
            ("FINISHED", None) => OrderStatus::Finished,
            ("CANCELLED", Some("no_account")) => {
                OrderStatus::Cancelled(PaymentFailureReason::NoAccount)
            }
            ("CANCELLED", Some("insufficient_funds")) => {
                OrderStatus::Cancelled(PaymentFailureReason::InsufficientFunds)
            }
            _ => return Err(corrupt("status")),
        };
        Ok(Order {
            id: OrderId::from_uuid(self.id),
            user_id: UserId::parse(&self.user_id).map_err(|_| corrupt("user_id"))?,
            amount: Money::from_minor(self.amount_minor).ok_or_else(|| corrupt("amount"))?,
            status,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Inserts a NEW order and returns it as stored.
pub async fn insert_order(
    conn: &impl ConnectionTrait,
    id: OrderId,
    user: &UserId,
    amount: Money,
    correlation_id: &str,
) -> Result<Order, DbErr> {
    let row = OrderRow::find_by_statement(statement(
        &format!(
            "INSERT INTO orders.orders (id, user_id, amount_minor, status, correlation_id) \
             VALUES ($1, $2, $3, 'NEW', $4) RETURNING {ORDER_COLUMNS}"
        ),
        [
            id.as_uuid().into(),
            user.as_str().into(),
            amount.minor().into(),
            correlation_id.into(),
        ],
    ))
    .one(conn)
    .await?
    .ok_or_else(|| DbErr::RecordNotInserted)?;
    row.into_order()
}

pub async fn find_order(conn: &impl ConnectionTrait, id: OrderId) -> Result<Option<Order>, DbErr> {
    OrderRow::find_by_statement(statement(
        &format!("SELECT {ORDER_COLUMNS} FROM orders.orders WHERE id = $1"),
        [id.as_uuid().into()],
    ))
    .one(conn)
    .await?
    .map(OrderRow::into_order)
    .transpose()
}

/// The user's orders, newest first.
/// Up to `limit` of `user`'s orders, newest first, from just after `after` (keyset: a page
/// stays the same while newer orders arrive). Uses `orders_user_created_idx`.
pub async fn list_orders(
    conn: &impl ConnectionTrait,
    user: &UserId,
    after: Option<OrderCursor>,
    limit: u64,
) -> Result<Vec<Order>, DbErr> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let query = match after {
        None => statement(
            &format!(
                "SELECT {ORDER_COLUMNS} FROM orders.orders WHERE user_id = $1 \
                 ORDER BY created_at DESC, id DESC LIMIT $2"
            ),
            [user.as_str().into(), limit.into()],
        ),
        Some(after) => statement(
            &format!(
                "SELECT {ORDER_COLUMNS} FROM orders.orders WHERE user_id = $1 \
                 AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4"
            ),
            [
                user.as_str().into(),
                after.created_at.into(),
                after.id.as_uuid().into(),
                limit.into(),
            ],
        ),
    };
    OrderRow::find_by_statement(query)
        .all(conn)
        .await?
        .into_iter()
        .map(OrderRow::into_order)
        .collect()
}

/// How many of `user`'s orders are NEW (uses `orders_new_by_user_idx`).
pub async fn count_new_orders(conn: &impl ConnectionTrait, user: &UserId) -> Result<i64, DbErr> {
    let row = conn
        .query_one_raw(statement(
            "SELECT count(*) AS new FROM orders.orders WHERE user_id = $1 AND status = 'NEW'",
            [user.as_str().into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("no count row".into()))?;
    row.try_get("", "new")
}

pub enum Settlement {
    /// The order moved from NEW to its final state.
    Settled(Order),
    /// The order was already final: nothing changed.
    AlreadyFinal(Order),
    /// No such order.
    Unknown,
    /// The answer names another user or amount than the order's.
    Mismatch(Order),
}

/// Moves a NEW order to `status`, if Payments' answer is about this order: the same user and
/// amount. Final states never change: the `status = 'NEW'` condition makes a second, late or
/// contradicting answer a no-op.
pub async fn settle_order(
    conn: &impl ConnectionTrait,
    id: OrderId,
    paid_by: &UserId,
    amount: Money,
    status: OrderStatus,
) -> Result<Settlement, DbErr> {
    let updated = OrderRow::find_by_statement(statement(
        &format!(
            "UPDATE orders.orders SET status = $2, reason = $3, updated_at = clock_timestamp() \
             WHERE id = $1 AND status = 'NEW' AND user_id = $4 AND amount_minor = $5 \
             RETURNING {ORDER_COLUMNS}"
        ),
        [
            id.as_uuid().into(),
            status.as_str().into(),
            status.reason().map(|r| r.as_str().to_owned()).into(),
            paid_by.as_str().into(),
            amount.minor().into(),
        ],
    ))
    .one(conn)
    .await?;
    if let Some(row) = updated {
        return Ok(Settlement::Settled(row.into_order()?));
    }
    Ok(match find_order(conn, id).await? {
        Some(order) if order.user_id != *paid_by || order.amount != amount => {
            Settlement::Mismatch(order)
        }
        Some(order) => Settlement::AlreadyFinal(order),
        None => Settlement::Unknown,
    })
}
