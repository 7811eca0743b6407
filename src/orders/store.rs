//! The `orders` schema: orders and their saga state.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Statement, Value};
use uuid::Uuid;

use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::messaging::inbox;
use crate::messaging::outbox::OutboxRow;
use crate::orders::domain::{CancelReason, Order, OrderCursor, OrderId, OrderStatus, Refund};

fn statement<I: IntoIterator<Item = Value>>(sql: &str, values: I) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

const ORDER_COLUMNS: &str =
    "id, user_id, amount_minor, status, reason, refund_state, created_at, updated_at";

#[derive(FromQueryResult)]
struct OrderRow {
    id: Uuid,
    user_id: String,
    amount_minor: i64,
    status: String,
    reason: Option<String>,
    refund_state: Option<String>,
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
            ("CANCELLED", Some(reason)) => OrderStatus::Cancelled(
                CancelReason::parse(reason).ok_or_else(|| corrupt("reason"))?,
            ),
            ("REFUNDING", None) => OrderStatus::Refunding,
            ("REFUNDED", None) => OrderStatus::Refunded,
            _ => return Err(corrupt("status")),
        };
        let refund = match self.refund_state.as_deref() {
            None => Refund::None,
            Some("requested") => Refund::Requested,
            Some("refunded") => Refund::Refunded,
            Some(_) => return Err(corrupt("refund_state")),
        };
        Ok(Order {
            id: OrderId::from_uuid(self.id),
            user_id: UserId::parse(&self.user_id).map_err(|_| corrupt("user_id"))?,
            amount: Money::from_minor(self.amount_minor).ok_or_else(|| corrupt("amount"))?,
            status,
            refund,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Places a NEW order in one statement: the order, its payment request in the outbox and the
/// notice that it changed (`pg_notify(channel, notice)`), unless the user already has `cap` NEW orders (then None, and nothing
/// is written). The count takes no lock: concurrent requests of one user may each see room, so
/// the cap holds to within their number.
pub async fn place_order(
    conn: &impl ConnectionTrait,
    order: (OrderId, &UserId, Money),
    correlation_id: &str,
    cap: Option<u32>,
    (request, (channel, notice)): (OutboxRow, (&'static str, String)),
) -> Result<Option<Order>, DbErr> {
    let (id, user, amount) = order;
    let columns = OutboxRow::INSERT_COLUMNS;
    let sql = format!(
        "WITH placed AS (\
           INSERT INTO orders.orders (id, user_id, amount_minor, status, correlation_id) \
           SELECT $1, $2, $3, 'NEW', $4 \
           WHERE $5::BIGINT IS NULL OR \
             (SELECT count(*) FROM orders.orders WHERE user_id = $2 AND status = 'NEW') < $5 \
           RETURNING {ORDER_COLUMNS}), \
         requested AS (\
           INSERT INTO orders.outbox ({columns}) SELECT $6, $7, $8, $9, $10 FROM placed), \
         notified AS (SELECT pg_notify($11, $12) FROM placed) \
         SELECT placed.*, (SELECT count(*) FROM notified) AS notified FROM placed"
    );
    let mut values: Vec<Value> = vec![
        id.as_uuid().into(),
        user.as_str().into(),
        amount.minor().into(),
        correlation_id.into(),
        cap.map(i64::from).into(),
    ];
    values.extend(request.values());
    values.extend([channel.into(), notice.into()]);
    one_order(conn, &sql, values).await
}

/// Runs a statement that answers at most one order's columns; the order if it did.
async fn one_order(
    conn: &impl ConnectionTrait,
    sql: &str,
    values: Vec<Value>,
) -> Result<Option<Order>, DbErr> {
    OrderRow::find_by_statement(statement(sql, values))
        .one(conn)
        .await?
        .map(OrderRow::into_order)
        .transpose()
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

/// The orders among `ids` that exist (in no particular order): one statement for many GETs.
pub async fn find_orders(
    conn: &impl ConnectionTrait,
    ids: &[OrderId],
) -> Result<Vec<Order>, DbErr> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    OrderRow::find_by_statement(statement(
        &format!("SELECT {ORDER_COLUMNS} FROM orders.orders WHERE id = ANY($1)"),
        [ids.into()],
    ))
    .all(conn)
    .await?
    .into_iter()
    .map(OrderRow::into_order)
    .collect()
}

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

/// The common case of a payment answer in one statement, with no transaction around it: a
/// NEW order that the answer matches (user, amount) becomes `status`, with the answer's inbox
/// record (`inbox`) and the notice that it changed (`pg_notify(channel, notice)`), or nothing
/// is written (None: the transaction path tells final, unknown and mismatched orders apart).
/// A copy of the answer at once waits for the row, then finds the order no longer NEW.
pub async fn settle_alone(
    conn: &impl ConnectionTrait,
    (id, paid_by, amount): (OrderId, &UserId, Money),
    status: OrderStatus,
    inbox: Option<inbox::Record<'_>>,
    (channel, notice): (&'static str, String),
) -> Result<Option<Order>, DbErr> {
    let (recorded, record_values) = inbox::recorded_cte(inbox, "settled", 8);
    let sql = format!(
        "WITH settled AS (\
           UPDATE orders.orders SET status = $2, reason = $3, updated_at = clock_timestamp() \
           WHERE id = $1 AND status = 'NEW' AND user_id = $4 AND amount_minor = $5 \
           RETURNING {ORDER_COLUMNS}), \
         notified AS (SELECT pg_notify($6, $7) FROM settled) \
         {recorded} \
         SELECT settled.*, (SELECT count(*) FROM notified) AS notified FROM settled"
    );
    let mut values: Vec<Value> = vec![
        id.as_uuid().into(),
        status.as_str().into(),
        status.reason().map(|r| r.as_str().to_owned()).into(),
        paid_by.as_str().into(),
        amount.minor().into(),
    ];
    values.extend([channel.into(), notice.into()]);
    values.extend(record_values);
    one_order(conn, &sql, values).await
}

/// Locks the orders among `ids` that exist, in the order of their ids (inside a transaction,
/// until it ends): a consumer's transaction takes them before anything else, as an answer
/// applied in one statement does ([`settle_alone`]), so the two never wait in a cycle.
pub async fn lock_orders(conn: &impl ConnectionTrait, ids: &[OrderId]) -> Result<(), DbErr> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    conn.query_all_raw(statement(
        "SELECT id FROM orders.orders WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        [ids.into()],
    ))
    .await?;
    Ok(())
}

/// Runs an UPDATE ... RETURNING the order's columns; the order if a row matched.
async fn update_returning<I: IntoIterator<Item = Value>>(
    conn: &impl ConnectionTrait,
    sql: &str,
    values: I,
) -> Result<Option<Order>, DbErr> {
    OrderRow::find_by_statement(statement(
        &format!("{sql} RETURNING {ORDER_COLUMNS}"),
        values,
    ))
    .one(conn)
    .await?
    .map(OrderRow::into_order)
    .transpose()
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// NEW -> CANCELLED (cancelled_by_user).
    Cancelled(Order),
    /// FINISHED -> REFUNDING: the caller requests the refund in the same transaction.
    Refunding(Order),
    /// Already CANCELLED, REFUNDING or REFUNDED: nothing to do.
    Unchanged(Order),
    NotFound,
}

/// Cancels an order: a NEW one is CANCELLED, a FINISHED one goes REFUNDING. The row is locked
/// first, so a payment answer for it waits and then finds it no longer NEW.
pub async fn cancel_order(conn: &impl ConnectionTrait, id: OrderId) -> Result<Cancelled, DbErr> {
    let locked = OrderRow::find_by_statement(statement(
        &format!("SELECT {ORDER_COLUMNS} FROM orders.orders WHERE id = $1 FOR UPDATE"),
        [id.as_uuid().into()],
    ))
    .one(conn)
    .await?;
    let Some(order) = locked.map(OrderRow::into_order).transpose()? else {
        return Ok(Cancelled::NotFound);
    };
    let set = "UPDATE orders.orders SET updated_at = clock_timestamp(),";
    let (sql, to): (String, fn(Order) -> Cancelled) = match order.status {
        OrderStatus::New => (
            format!("{set} status = 'CANCELLED', reason = 'cancelled_by_user' WHERE id = $1"),
            Cancelled::Cancelled,
        ),
        OrderStatus::Finished => (
            format!("{set} status = 'REFUNDING', refund_state = 'requested' WHERE id = $1"),
            Cancelled::Refunding,
        ),
        _ => return Ok(Cancelled::Unchanged(order)),
    };
    let updated = update_returning(conn, &sql, [id.as_uuid().into()]).await?;
    Ok(updated.map_or(Cancelled::NotFound, to))
}

/// Marks a CANCELLED order whose debit still landed as owed a refund; None if it was marked
/// already (or is not such an order). The caller requests the refund in the same transaction.
pub async fn owe_refund(conn: &impl ConnectionTrait, id: OrderId) -> Result<Option<Order>, DbErr> {
    update_returning(
        conn,
        "UPDATE orders.orders SET refund_state = 'requested', updated_at = clock_timestamp() \
         WHERE id = $1 AND status = 'CANCELLED' AND refund_state IS NULL",
        [id.as_uuid().into()],
    )
    .await
}

/// Records that Payments gave an order's money back: REFUNDING -> REFUNDED, a CANCELLED one
/// keeps its status. None when it was recorded already, or no refund was asked for it.
pub async fn refund_completed(
    conn: &impl ConnectionTrait,
    id: OrderId,
    user: &UserId,
    amount: Money,
) -> Result<Option<Order>, DbErr> {
    update_returning(
        conn,
        "UPDATE orders.orders SET refund_state = 'refunded', updated_at = clock_timestamp(), \
         status = CASE status WHEN 'REFUNDING' THEN 'REFUNDED' ELSE status END \
         WHERE id = $1 AND refund_state = 'requested' AND user_id = $2 AND amount_minor = $3",
        [
            id.as_uuid().into(),
            user.as_str().into(),
            amount.minor().into(),
        ],
    )
    .await
}

/// Cancels (payment_timeout) up to `limit` orders still NEW after `timeout`. SKIP LOCKED: any
/// number of instances sweep at once, each order once; the lock also waits out an answer
/// being applied to the same order.
pub async fn cancel_overdue(
    conn: &impl ConnectionTrait,
    timeout: std::time::Duration,
    limit: u64,
) -> Result<Vec<Order>, DbErr> {
    let secs = timeout.as_secs_f64();
    OrderRow::find_by_statement(statement(
        &format!(
            "UPDATE orders.orders SET status = 'CANCELLED', reason = 'payment_timeout', \
             updated_at = clock_timestamp() WHERE id IN ( \
                 SELECT id FROM orders.orders WHERE status = 'NEW' \
                 AND created_at < clock_timestamp() - make_interval(secs => {secs}) \
                 ORDER BY created_at LIMIT {limit} FOR UPDATE SKIP LOCKED) \
             AND status = 'NEW' RETURNING {ORDER_COLUMNS}"
        ),
        [],
    ))
    .all(conn)
    .await?
    .into_iter()
    .map(OrderRow::into_order)
    .collect()
}
