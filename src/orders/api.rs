//! Orders over HTTP: place an order, read one, list a user's.

use std::sync::Arc;

use futures_util::StreamExt;
use poem::http::StatusCode;
use poem::middleware::ReqId;
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::kernel::coalesce::{BatchLoad, Coalescer, Lanes};
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::orders::domain::{CancelReason, Order, OrderCursor, OrderId, OrderStatus};
use crate::orders::events::{self, FollowError, OrderEvents, StreamLimits};
use crate::orders::store::Cancelled;
use crate::orders::{OrdersError, SCHEMA, saga, store};
use crate::statuses;
use crate::web::auth::{Caller, FORBIDDEN_DOC, StreamCaller, UNAUTHORIZED_DOC, issue_ticket};
use crate::web::error::{ApiError, INTERNAL_DOC, Reply};
use crate::web::idempotency::IdempotentPost;
use crate::web::params::{
    AmountParam, IdempotencyKeyParam, LimitParam, OrderCursorParam, OrderIdParam, UserIdParam,
    invalid, parse_amount, parse_limit,
};
use crate::web::sse::{DescribedEvent, Events};

#[derive(Tags)]
enum Tag {
    /// Orders and their payment status.
    Orders,
}

pub struct OrdersApi {
    db: DatabaseConnection,
    /// GET order: concurrent reads share one SELECT.
    reads: Coalescer<OrderId, Order, OrderReads>,
    /// Most NEW orders one user may have at once.
    max_new_orders: Option<u32>,
    relay_wake: Arc<Notify>,
    events: OrderEvents,
    /// Ends open event streams when the application stops.
    shutdown: CancellationToken,
}

impl OrdersApi {
    pub fn new(
        db: DatabaseConnection,
        max_new_orders: Option<u32>,
        relay_wake: Arc<Notify>,
        events: OrderEvents,
        shutdown: CancellationToken,
    ) -> OrdersApi {
        OrdersApi {
            reads: Coalescer::new(OrderReads(db.clone()), Lanes::READS),
            db,
            max_new_orders,
            relay_wake,
            events,
            shutdown,
        }
    }

    /// An instance that can describe the API but not serve it (for `gozon openapi`).
    pub fn spec_only() -> OrdersApi {
        OrdersApi::new(
            DatabaseConnection::default(),
            None,
            Arc::new(Notify::new()),
            OrderEvents::new(StreamLimits::default()),
            CancellationToken::new(),
        )
    }
}

/// Loads the orders a batch of GETs asks for.
struct OrderReads(DatabaseConnection);

impl BatchLoad<OrderId, Order> for OrderReads {
    type Error = ApiError;
    async fn load(&self, ids: Vec<OrderId>) -> Result<Vec<(OrderId, Order)>, ApiError> {
        let orders = store::find_orders(&self.0, &ids).await?;
        Ok(orders.into_iter().map(|order| (order.id, order)).collect())
    }
}

#[derive(Debug, Clone, Copy, Enum)]
pub enum OrderStatusBody {
    /// Created; payment in progress.
    #[oai(rename = "NEW")]
    New,
    /// Paid.
    #[oai(rename = "FINISHED")]
    Finished,
    /// Not paid, or given up before it was; `reason` says why. A debit that still lands is
    /// refunded.
    #[oai(rename = "CANCELLED")]
    Cancelled,
    /// Paid, then cancelled: its refund is on its way.
    #[oai(rename = "REFUNDING")]
    Refunding,
    /// Paid, then refunded: the amount is back on the account.
    #[oai(rename = "REFUNDED")]
    Refunded,
}

#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum CancelReasonBody {
    /// The user has no account.
    NoAccount,
    /// The balance was lower than the amount.
    InsufficientFunds,
    /// The person cancelled it before it was paid.
    CancelledByUser,
    /// Payments did not answer within the payment timeout.
    PaymentTimeout,
}

/// An order.
#[derive(Debug, Object)]
pub struct OrderBody {
    pub id: uuid::Uuid,
    pub user_id: String,
    /// The amount, as a decimal string with two decimals.
    pub amount: String,
    pub status: OrderStatusBody,
    /// Why the order was cancelled; null otherwise.
    #[oai(nullable)]
    pub reason: Option<CancelReasonBody>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<Order> for OrderBody {
    fn from(order: Order) -> Self {
        OrderBody {
            id: order.id.as_uuid(),
            user_id: order.user_id.to_string(),
            amount: order.amount.to_string(),
            status: match order.status {
                OrderStatus::New => OrderStatusBody::New,
                OrderStatus::Finished => OrderStatusBody::Finished,
                OrderStatus::Cancelled(_) => OrderStatusBody::Cancelled,
                OrderStatus::Refunding => OrderStatusBody::Refunding,
                OrderStatus::Refunded => OrderStatusBody::Refunded,
            },
            reason: order.status.reason().map(|reason| match reason {
                CancelReason::NoAccount => CancelReasonBody::NoAccount,
                CancelReason::InsufficientFunds => CancelReasonBody::InsufficientFunds,
                CancelReason::CancelledByUser => CancelReasonBody::CancelledByUser,
                CancelReason::PaymentTimeout => CancelReasonBody::PaymentTimeout,
            }),
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

/// A page of a user's orders, newest first.
#[derive(Debug, Object)]
pub struct OrderListBody {
    pub orders: Vec<OrderBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

impl From<OrdersError> for ApiError {
    fn from(error: OrdersError) -> Self {
        match error {
            OrdersError::OrderNotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "order_not_found", error.to_string())
            }
            OrdersError::TooManyNewOrders(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_new_orders",
                error.to_string(),
            ),
        }
    }
}

statuses!(CreateOrder:
    201 => "The order, with status NEW; its payment runs in the background.",
    400 => "`user_id`, `amount` or `Idempotency-Key` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => FORBIDDEN_DOC,
    422 => "The Idempotency-Key was used before with other parameters (`idempotency_key_reused`).",
    429 => "Too many requests (`rate_limited`, with `Retry-After`), or the user has as many NEW\n\
            orders as allowed at once (`too_many_new_orders`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable; retry later.",
);

statuses!(CancelOrder:
    200 => "The order after the cancel: CANCELLED (`cancelled_by_user`) if it was NEW, REFUNDING if it\n\
            was FINISHED (it becomes REFUNDED once Payments gave the money back), unchanged if it\n\
            was already CANCELLED, REFUNDING or REFUNDED.",
    400 => "`id` or `Idempotency-Key` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    404 => "No order has this id, or none the token's user may see (`order_not_found`).",
    422 => "The Idempotency-Key was used before with other parameters (`idempotency_key_reused`).",
    429 => "Too many requests (`rate_limited`, with `Retry-After`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable; retry later.",
);

statuses!(GetOrder:
    200 => "The order and its status.",
    400 => "`id` is missing or not a UUID.",
    401 => UNAUTHORIZED_DOC,
    404 => "No order has this id, or none the token's user may see (`order_not_found`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable, or did not answer in time; retry later.",
);

statuses!(ListOrders:
    200 => "A page of the user's orders, newest first (an empty list if none), and the cursor of\n\
            the next page.",
    400 => "`user_id`, `limit` or `cursor` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => FORBIDDEN_DOC,
    500 => INTERNAL_DOC,
    503 => "The database is unreachable; retry later.",
);

statuses!(FollowOrders:
    200 => "Server-Sent Events: one `message` per change of one of the user's orders (created,\n\
            FINISHED, CANCELLED), its data the order as JSON. The stream may end (a slow reader, a\n\
            restart, the stream's lifetime): reconnect and re-read the list.",
    400 => "`user_id` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => FORBIDDEN_DOC,
    429 => "The user has as many open streams as allowed (`too_many_streams`).",
    503 => "The server has as many open streams as it allows (`server_busy`); retry later.",
);

impl From<FollowError> for ApiError {
    fn from(error: FollowError) -> Self {
        let (status, code) = match error {
            FollowError::UserFull => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
            FollowError::ServerFull => (StatusCode::SERVICE_UNAVAILABLE, "server_busy"),
        };
        ApiError::new(status, code, error.to_string())
    }
}

statuses!(EventsTicket:
    200 => "A ticket for `GET /api/orders/events?ticket=...`, valid 60 s, for the token's user.",
    401 => UNAUTHORIZED_DOC,
    429 => "Too many requests (`rate_limited`, with `Retry-After`).",
    404 => "The server runs with `--auth none`: streams need no ticket (`auth_disabled`).",
);

/// A short-lived ticket that opens the caller's event stream (an EventSource cannot send an
/// Authorization header).
#[derive(Debug, Object)]
pub struct TicketBody {
    pub ticket: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

impl DescribedEvent for OrderBody {
    const DATA: &'static str = "The order as JSON: an `OrderBody`.";
}

const CREATE: IdempotentPost = IdempotentPost {
    schema: SCHEMA,
    endpoint: "create_order",
    status: StatusCode::CREATED,
};

const CANCEL: IdempotentPost = IdempotentPost {
    schema: SCHEMA,
    endpoint: "cancel_order",
    status: StatusCode::OK,
};

/// How often an idle event stream sends a comment, so proxies keep it open.
const EVENTS_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// The request id (from `X-Request-Id` or made up by the RequestId middleware) becomes the
/// saga's correlation id. Client-sent ids are cut to a sane length.
fn correlation_id(request: &poem::Request) -> String {
    match request.data::<ReqId>() {
        Some(id) => id.to_string().chars().take(128).collect(),
        None => uuid::Uuid::new_v4().to_string(),
    }
}

/// Places a NEW order over `conn` (a transaction, or the pool for a statement on its own).
async fn place(
    conn: &impl ConnectionTrait,
    user: &UserId,
    amount: Money,
    correlation_id: &str,
    cap: Option<u32>,
) -> Result<OrderBody, ApiError> {
    let order = saga::place_order(conn, user, amount, correlation_id, cap).await?;
    // No row: the user has as many NEW orders as allowed.
    let order = order.ok_or_else(|| OrdersError::TooManyNewOrders(cap.unwrap_or(0)))?;
    Ok(OrderBody::from(order))
}

#[OpenApi(prefix_path = "/api/orders", tag = "Tag::Orders")]
impl OrdersApi {
    /// Place an order. Answers at once with status NEW; Payments then debits the user's
    /// account and the order becomes FINISHED, or CANCELLED with a reason.
    #[oai(path = "/create_order", method = "post")]
    async fn create_order(
        &self,
        caller: Caller,
        request: &poem::Request,
        user_id: Query<UserIdParam>,
        amount: Query<AmountParam>,
        /// Optional: a retry with the same key gets the first response and places no second
        /// order (so it is never paid twice).
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<IdempotencyKeyParam>>,
    ) -> Reply<Json<OrderBody>, CreateOrder> {
        let create = async {
            let user = caller.acting_for(&user_id)?;
            let amount = parse_amount(&amount)?;
            let correlation_id = correlation_id(request);
            let cap = self.max_new_orders;
            let order = match idempotency_key.as_deref() {
                // Nothing to remember with it: one statement, committed on its own.
                None => place(&self.db, &user, amount, &correlation_id, cap).await?,
                Some(key) => {
                    let fingerprint = format!("user_id={user}&amount={amount}");
                    let place = async |txn: &DatabaseTransaction| {
                        place(txn, &user, amount, &correlation_id, cap).await
                    };
                    CREATE
                        .run(&self.db, &caller, Some(key), &fingerprint, place)
                        .await?
                }
            };
            self.relay_wake.notify_one();
            Ok::<_, ApiError>(order)
        };
        create.await.map(Json).into()
    }

    /// Cancel an order: a NEW one is CANCELLED at once (a debit that still lands is refunded);
    /// a FINISHED one is refunded (REFUNDING, then REFUNDED). Cancelling again changes nothing.
    #[oai(path = "/cancel_order", method = "post")]
    async fn cancel_order(
        &self,
        caller: Caller,
        request: &poem::Request,
        id: Query<OrderIdParam>,
        /// Optional: a retry with the same key gets the first response.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<IdempotencyKeyParam>>,
    ) -> Reply<Json<OrderBody>, CancelOrder> {
        let cancel = async {
            let id = OrderId::parse(&id).map_err(|error| invalid("invalid_order_id", error))?;
            let correlation_id = correlation_id(request);
            let (mut refund, caller_ref) = (false, &caller);
            let effect = async |txn: &DatabaseTransaction| {
                let (order, changed) = match store::cancel_order(txn, id).await? {
                    Cancelled::NotFound => (None, false),
                    Cancelled::Unchanged(order) => (Some(order), false),
                    Cancelled::Cancelled(order) => (Some(order), true),
                    Cancelled::Refunding(order) => {
                        saga::request_refund(txn, &order, &correlation_id).await?;
                        refund = true;
                        (Some(order), true)
                    }
                };
                // Someone else's order is answered as if it did not exist (and is not touched:
                // the transaction rolls back).
                let order = order.filter(|order| caller_ref.may_read(&order.user_id));
                let order = order.ok_or_else(|| ApiError::from(OrdersError::OrderNotFound))?;
                if changed {
                    events::notify_changed(txn, &order).await?;
                }
                Ok(OrderBody::from(order))
            };
            let fingerprint = format!("id={id}");
            let order = CANCEL
                .run(
                    &self.db,
                    &caller,
                    idempotency_key.as_deref(),
                    &fingerprint,
                    effect,
                )
                .await?;
            if refund {
                self.relay_wake.notify_one();
            }
            Ok::<_, ApiError>(order)
        };
        cancel.await.map(Json).into()
    }

    /// Read one order and its status.
    #[oai(path = "/order", method = "get")]
    async fn order(
        &self,
        caller: Caller,
        id: Query<OrderIdParam>,
    ) -> Reply<Json<OrderBody>, GetOrder> {
        let find = async {
            let id = OrderId::parse(&id).map_err(|error| invalid("invalid_order_id", error))?;
            let order = self.reads.get(id).await?;
            // Someone else's order is answered as if it did not exist.
            let order = order.filter(|order| caller.may_read(&order.user_id));
            order.ok_or_else(|| ApiError::from(OrdersError::OrderNotFound))
        };
        find.await.map(|order| Json(order.into())).into()
    }

    /// List a user's orders, newest first, a page at a time.
    #[oai(path = "/orders", method = "get")]
    async fn orders(
        &self,
        caller: Caller,
        user_id: Query<UserIdParam>,
        /// Orders per page: 1 to 1000, 100 if absent.
        limit: Query<Option<LimitParam>>,
        /// The `next_cursor` of the previous page; absent for the first page.
        cursor: Query<Option<OrderCursorParam>>,
    ) -> Reply<Json<OrderListBody>, ListOrders> {
        let list = async {
            let user = caller.acting_for(&user_id)?;
            let limit = parse_limit(limit.as_deref())?;
            let after = cursor
                .as_deref()
                .map(OrderCursor::parse)
                .transpose()
                .map_err(|error| invalid("invalid_cursor", error))?;
            // One more than asked: whether it exists says whether there is a next page.
            let mut orders = store::list_orders(&self.db, &user, after, limit + 1).await?;
            let more = orders.len() as u64 > limit;
            orders.truncate(limit as usize);
            let next_cursor = more
                .then(|| {
                    orders
                        .last()
                        .map(|last| OrderCursor::after(last).to_string())
                })
                .flatten();
            Ok::<_, ApiError>(OrderListBody {
                orders: orders.into_iter().map(OrderBody::from).collect(),
                next_cursor,
            })
        };
        list.await.map(Json).into()
    }

    /// Follow a user's orders live (Server-Sent Events): each change of one of their orders
    /// arrives as it is committed.
    #[oai(path = "/events", method = "get")]
    async fn events(
        &self,
        caller: StreamCaller,
        user_id: Query<UserIdParam>,
        /// With `--auth jwt`: a ticket from `POST /api/orders/events/ticket` (an EventSource
        /// cannot send an Authorization header).
        #[oai(name = "ticket")]
        _ticket: Query<Option<String>>,
    ) -> Reply<Events<OrderBody>, FollowOrders> {
        let follow = || {
            let user = caller.0.acting_for(&user_id)?;
            // The stream ends when the token or ticket that opened it does.
            let expires = caller.0.principal().map(|principal| principal.expires_at);
            let stream = self.events.follow(user, expires, self.shutdown.clone())?;
            let stream = stream.map(OrderBody::from).boxed();
            Ok::<_, ApiError>(Events::new(stream, EVENTS_KEEP_ALIVE))
        };
        follow().into()
    }

    /// A ticket that opens the caller's event stream for 60 s (`--auth jwt` only).
    #[oai(path = "/events/ticket", method = "post")]
    async fn events_ticket(
        &self,
        caller: Caller,
        request: &poem::Request,
    ) -> Reply<Json<TicketBody>, EventsTicket> {
        issue_ticket(request, &caller)
            .map(|(ticket, ttl)| {
                Json(TicketBody {
                    ticket,
                    expires_in: ttl.as_secs(),
                })
            })
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::params::assert_pattern_is_the_parser;

    const HEX: &str = "0123456789abcdefABCDEFg-_ {}";

    #[test]
    fn the_order_id_pattern_is_the_parser() {
        assert_pattern_is_the_parser(&OrderIdParam::pattern(), HEX, |text| {
            OrderId::parse(text).is_ok()
        });
    }

    #[test]
    fn the_cursor_pattern_is_the_parser() {
        assert_pattern_is_the_parser(&OrderCursorParam::pattern(), HEX, |text| {
            OrderCursor::parse(text).is_ok()
        });
    }
}
