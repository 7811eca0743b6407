//! Orders over HTTP: place an order, read one, list a user's.

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use poem::http::StatusCode;
use poem::middleware::ReqId;
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::api_errors;
use crate::contracts::PaymentFailureReason;
use crate::http::{
    ApiError, ErrorBody, parse_amount, parse_idempotency_key, parse_user_id, remember_response,
    replay_if_seen,
};
use crate::orders::domain::{Order, OrderId, OrderStatus};
use crate::orders::events::OrderEvents;
use crate::orders::{OrdersError, SCHEMA, saga, store};

#[derive(Tags)]
enum Tag {
    /// Orders and their payment status.
    Orders,
}

pub struct OrdersApi {
    db: DatabaseConnection,
    relay_wake: Arc<Notify>,
    events: OrderEvents,
    /// Ends open event streams when the application stops.
    shutdown: CancellationToken,
}

impl OrdersApi {
    pub fn new(
        db: DatabaseConnection,
        relay_wake: Arc<Notify>,
        events: OrderEvents,
        shutdown: CancellationToken,
    ) -> OrdersApi {
        OrdersApi {
            db,
            relay_wake,
            events,
            shutdown,
        }
    }

    /// An instance that can describe the API but not serve it (for `gozon openapi`).
    pub fn spec_only() -> OrdersApi {
        OrdersApi::new(
            DatabaseConnection::default(),
            Arc::new(Notify::new()),
            OrderEvents::default(),
            CancellationToken::new(),
        )
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
    /// Not paid; `reason` says why.
    #[oai(rename = "CANCELLED")]
    Cancelled,
}

#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum CancelReasonBody {
    /// The user has no account.
    NoAccount,
    /// The balance was lower than the amount.
    InsufficientFunds,
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
            },
            reason: order.status.reason().map(|reason| match reason {
                PaymentFailureReason::NoAccount => CancelReasonBody::NoAccount,
                PaymentFailureReason::InsufficientFunds => CancelReasonBody::InsufficientFunds,
            }),
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

/// A user's orders, newest first.
#[derive(Debug, Object)]
pub struct OrderListBody {
    pub orders: Vec<OrderBody>,
}

impl From<OrdersError> for ApiError {
    fn from(error: OrdersError) -> Self {
        match error {
            OrdersError::OrderNotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "order_not_found", error.to_string())
            }
            OrdersError::Store(error) => ApiError::from_db(&error),
        }
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "CreateOrderResponse::bad_request")]
pub enum CreateOrderResponse {
    /// The order, with status NEW; its payment runs in the background.
    #[oai(status = 201)]
    Created(Json<OrderBody>),
    /// `user_id`, `amount` or `Idempotency-Key` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The Idempotency-Key was used before with other parameters (`idempotency_key_reused`).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(CreateOrderResponse { 422 => Unprocessable });

#[derive(ApiResponse)]
#[oai(bad_request_handler = "GetOrderResponse::bad_request")]
pub enum GetOrderResponse {
    /// The order and its status.
    #[oai(status = 200)]
    Ok(Json<OrderBody>),
    /// `id` is missing or not a UUID.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No order has this id (`order_not_found`).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(GetOrderResponse { 404 => NotFound });

#[derive(ApiResponse)]
#[oai(bad_request_handler = "ListOrdersResponse::bad_request")]
pub enum ListOrdersResponse {
    /// The user's orders, newest first; an empty list if none.
    #[oai(status = 200)]
    Ok(Json<OrderListBody>),
    /// `user_id` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(ListOrdersResponse {});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "OrderEventsResponse::bad_request")]
pub enum OrderEventsResponse {
    /// Server-Sent Events: one `message` per change of one of the user's orders (created,
    /// FINISHED, CANCELLED), its data the order as JSON. The stream may end (a slow reader, a
    /// restart): reconnect and re-read the list.
    #[oai(status = 200)]
    Ok(EventStream<BoxStream<'static, OrderBody>>),
    /// `user_id` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(OrderEventsResponse {});

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

#[OpenApi]
impl OrdersApi {
    /// Place an order. Answers at once with status NEW; Payments then debits the user's
    /// account and the order becomes FINISHED, or CANCELLED with a reason.
    #[oai(
        path = "/api/orders/create_order",
        method = "post",
        tag = "Tag::Orders"
    )]
    async fn create_order(
        &self,
        request: &poem::Request,
        user_id: Query<String>,
        amount: Query<String>,
        /// Optional: a retry with the same key gets the first response and places no second
        /// order (so it is never paid twice).
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> CreateOrderResponse {
        let result: Result<OrderBody, ApiError> = async {
            let user = parse_user_id(&user_id)?;
            let amount = parse_amount(&amount)?;
            let key = parse_idempotency_key(idempotency_key.0.as_deref())?;
            let fingerprint = format!("user_id={user}&amount={amount}");
            let endpoint = "create_order";
            let correlation_id = correlation_id(request);
            let txn = self.db.begin().await.map_err(OrdersError::from)?;
            if let Some(replay) =
                replay_if_seen(&txn, SCHEMA, endpoint, key.as_ref(), &fingerprint).await?
            {
                return Ok(replay);
            }
            let order: OrderBody = saga::place_order(&txn, &user, amount, &correlation_id)
                .await
                .map_err(OrdersError::from)?
                .into();
            remember_response(
                &txn,
                SCHEMA,
                endpoint,
                key.as_ref(),
                StatusCode::CREATED,
                &order,
            )
            .await?;
            txn.commit().await.map_err(OrdersError::from)?;
            self.relay_wake.notify_one();
            Ok(order)
        }
        .await;
        match result {
            Ok(order) => CreateOrderResponse::Created(Json(order)),
            Err(error) => error.into(),
        }
    }

    /// Read one order and its status.
    #[oai(path = "/api/orders/order", method = "get", tag = "Tag::Orders")]
    async fn order(&self, id: Query<String>) -> GetOrderResponse {
        let result: Result<Order, ApiError> = async {
            let id = OrderId::parse(&id).map_err(|error| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_order_id",
                    error.to_string(),
                )
            })?;
            store::find_order(&self.db, id)
                .await
                .map_err(OrdersError::from)?
                .ok_or_else(|| OrdersError::OrderNotFound.into())
        }
        .await;
        match result {
            Ok(order) => GetOrderResponse::Ok(Json(order.into())),
            Err(error) => error.into(),
        }
    }

    /// List a user's orders, newest first.
    #[oai(path = "/api/orders/orders", method = "get", tag = "Tag::Orders")]
    async fn orders(&self, user_id: Query<String>) -> ListOrdersResponse {
        let result: Result<Vec<Order>, ApiError> = async {
            let user = parse_user_id(&user_id)?;
            Ok(store::list_orders(&self.db, &user)
                .await
                .map_err(OrdersError::from)?)
        }
        .await;
        match result {
            Ok(orders) => ListOrdersResponse::Ok(Json(OrderListBody {
                orders: orders.into_iter().map(OrderBody::from).collect(),
            })),
            Err(error) => error.into(),
        }
    }

    /// Follow a user's orders live (Server-Sent Events): each change of one of their orders
    /// arrives as it is committed.
    #[oai(path = "/api/orders/events", method = "get", tag = "Tag::Orders")]
    async fn events(&self, user_id: Query<String>) -> OrderEventsResponse {
        let user = match parse_user_id(&user_id) {
            Ok(user) => user,
            Err(error) => return error.into(),
        };
        let state = (self.events.subscribe(), user, self.shutdown.clone());
        let stream =
            futures_util::stream::unfold(state, |(mut receiver, user, shutdown)| async move {
                loop {
                    let next = tokio::select! {
                        next = receiver.recv() => next,
                        _ = shutdown.cancelled() => return None,
                    };
                    match next {
                        Ok(order) if order.user_id == user => {
                            return Some((OrderBody::from(order), (receiver, user, shutdown)));
                        }
                        Ok(_) => continue,
                        // Lagged: this reader missed changes; end the stream so it re-reads.
                        Err(
                            broadcast::error::RecvError::Lagged(_)
                            | broadcast::error::RecvError::Closed,
                        ) => {
                            return None;
                        }
                    }
                }
            });
        OrderEventsResponse::Ok(EventStream::new(stream.boxed()).keep_alive(EVENTS_KEEP_ALIVE))
    }
}
