//! HTTP plumbing shared by both contexts: the JSON error envelope, health checks, the OpenAPI
//! service and the routes of a role.

use std::path::PathBuf;

use poem::endpoint::StaticFilesEndpoint;
use poem::http::StatusCode;
use poem::middleware::{CatchPanic, RequestId, ReuseId, Tracing};
use poem::web::Json as PoemJson;
use poem::{EndpointExt, IntoResponse, Response, Route, get, handler};
use poem_openapi::types::{ParseFromJSON, ToJSON};
use poem_openapi::{Object, OpenApiService};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

use crate::idempotency::{self, Claim, IdempotencyKey};

use crate::messaging::amqp::BrokerLinks;
use crate::messaging::outbox;
use crate::metrics::Metrics;
use crate::orders::api::OrdersApi;
use crate::payments::api::PaymentsApi;

/// Every error the API returns: `{"error": "<code>", "message": "<human text>"}`.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code such as `invalid_amount`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// An error on its way out of a handler: a status and the envelope.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: code.to_owned(),
                message: message.into(),
            },
        }
    }

    /// A failure of ours: the cause goes to the log once, the client learns nothing of it.
    /// A database that cannot be reached is a 503 (try again later), anything else a 500.
    pub fn from_db(error: &DbErr) -> ApiError {
        let unreachable = matches!(error, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
            || error
                .to_string()
                .to_ascii_lowercase()
                .contains("connection");
        if unreachable {
            tracing::error!(%error, "database unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the service cannot reach its database; try again shortly",
            )
        } else {
            tracing::error!(%error, "database error");
            ApiError::internal()
        }
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "something went wrong on our side",
        )
    }

    /// A request poem-openapi refused before our code ran (missing or mistyped parameter).
    pub fn from_rejected_request(error: &poem::Error) -> ApiError {
        // poem-openapi says "expects an input value" when a required parameter is absent.
        match error.downcast_ref::<poem_openapi::error::ParseParamError>() {
            Some(param) if param.reason.contains("expects an input value") => ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_parameter",
                format!("query parameter `{}` is required", param.name),
            ),
            Some(param) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("query parameter `{}`: {}", param.name, param.reason),
            ),
            None => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                error.to_string(),
            ),
        }
    }
}

/// Implements, for an endpoint's response enum, the conversion from [`ApiError`] and the
/// `bad_request_handler` poem-openapi calls for requests it rejects itself. Each enum lists
/// the statuses it can really return; `BadRequest`, `Internal` and `Unavailable` are always there.
#[macro_export]
macro_rules! api_errors {
    ($response:ident { $($status:literal => $variant:ident),* $(,)? }) => {
        impl $response {
            fn bad_request(error: poem::Error) -> Self {
                Self::BadRequest(poem_openapi::payload::Json(
                    $crate::http::ApiError::from_rejected_request(&error).body,
                ))
            }
        }

        impl From<$crate::http::ApiError> for $response {
            fn from(error: $crate::http::ApiError) -> Self {
                use poem_openapi::payload::Json;
                match error.status.as_u16() {
                    400 => Self::BadRequest(Json(error.body)),
                    503 => Self::Unavailable(Json(error.body)),
                    $($status => Self::$variant(Json(error.body)),)*
                    _ => Self::Internal(Json(error.body)),
                }
            }
        }
    };
}

/// The API of both contexts, as served by `--role all` and committed as `openapi.yaml`.
pub fn openapi_service(
    orders: OrdersApi,
    payments: PaymentsApi,
) -> OpenApiService<(OrdersApi, PaymentsApi), ()> {
    OpenApiService::new((orders, payments), TITLE, env!("CARGO_PKG_VERSION")).description(
        "Orders and payments for an online store. Creating an order answers at once with \
         status NEW; a saga over RabbitMQ then debits the account exactly once and moves the \
         order to FINISHED or CANCELLED.",
    )
}

const TITLE: &str = "Gozon";

/// The spec as YAML, without a database: what `gozon openapi` prints.
pub fn openapi_yaml() -> String {
    openapi_service(OrdersApi::spec_only(), PaymentsApi::spec_only()).spec_yaml()
}

/// The routes a role serves, wrapped in request ids, tracing, panic catching and the JSON
/// envelope for errors that happen outside our handlers (unknown path, wrong method).
pub fn routes(
    observed: Observed,
    orders: Option<OrdersApi>,
    payments: Option<PaymentsApi>,
    static_dir: Option<PathBuf>,
) -> impl poem::Endpoint {
    let version = env!("CARGO_PKG_VERSION");
    let route = Route::new()
        .at("/health/live", get(live))
        .at("/health/ready", get(ready).data(observed.clone()))
        .at("/metrics", get(metrics).data(observed));
    // Operation paths already start with /api, so the prefix is not stripped.
    let route = match (orders, payments) {
        (Some(orders), Some(payments)) => {
            let api = openapi_service(orders, payments);
            let route = route
                .at("/openapi.json", api.spec_endpoint())
                .nest("/docs", api.swagger_ui())
                .nest_no_strip("/api", api);
            match static_dir {
                Some(dir) => {
                    route.nest("/", StaticFilesEndpoint::new(dir).index_file("index.html"))
                }
                None => route,
            }
        }
        (Some(orders), None) => {
            route.nest_no_strip("/api", OpenApiService::new(orders, TITLE, version))
        }
        (None, Some(payments)) => {
            route.nest_no_strip("/api", OpenApiService::new(payments, TITLE, version))
        }
        (None, None) => route,
    };
    route
        .catch_all_error(error_to_json)
        .with(CatchPanic::new().with_handler(|_| ApiError::internal().into_response()))
        .with(Tracing)
        .with(RequestId::default().reuse_id(ReuseId::Use))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        PoemJson(self.body).with_status(self.status).into_response()
    }
}

async fn error_to_json(error: poem::Error) -> Response {
    let status = error.status();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        status if status.is_client_error() => "invalid_request",
        _ => "internal_error",
    };
    if status.is_server_error() {
        tracing::error!(%error, "request failed");
        return ApiError::internal().into_response();
    }
    ApiError::new(status, code, error.to_string()).into_response()
}

#[handler]
fn live() -> PoemJson<serde_json::Value> {
    PoemJson(serde_json::json!({"status": "ok"}))
}

/// What the operational endpoints look at: the database, the broker links, the metrics, and the
/// schemas whose outboxes this role publishes.
#[derive(Clone)]
pub struct Observed {
    pub db: DatabaseConnection,
    pub links: BrokerLinks,
    pub metrics: Metrics,
    pub schemas: Vec<&'static str>,
}

/// Ready when the database answers and every relay and consumer of this process is connected
/// to the broker.
#[handler]
async fn ready(observed: poem::web::Data<&Observed>) -> Response {
    if let Err(error) = observed.db.ping().await {
        tracing::warn!(%error, "not ready: database unreachable");
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "the database is unreachable",
        )
        .into_response();
    }
    let down = observed.links.down();
    if !down.is_empty() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("not connected to the broker: {}", down.join(", ")),
        )
        .into_response();
    }
    PoemJson(serde_json::json!({"status": "ok"})).into_response()
}

/// Prometheus text format. Outbox backlogs are measured now; if the database cannot be read
/// they keep their last value.
#[handler]
async fn metrics(observed: poem::web::Data<&Observed>) -> Response {
    for schema in &observed.schemas {
        match outbox::backlog(&observed.db, schema).await {
            Ok(backlog) => {
                observed
                    .metrics
                    .outbox_backlog(schema, backlog.unsent, backlog.oldest_age_secs)
            }
            Err(error) => tracing::warn!(schema, %error, "cannot measure the outbox backlog"),
        }
    }
    match observed.metrics.encode() {
        Ok(text) => text
            .with_content_type("text/plain; version=0.0.4; charset=utf-8")
            .into_response(),
        Err(_) => ApiError::internal().into_response(),
    }
}

/// Parses the `user_id` query parameter, or says why it is not one.
pub fn parse_user_id(text: &str) -> Result<crate::user_id::UserId, ApiError> {
    crate::user_id::UserId::parse(text).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_user_id",
            error.to_string(),
        )
    })
}

/// Parses the `amount` query parameter, or says why it is not one.
pub fn parse_amount(text: &str) -> Result<crate::money::Money, ApiError> {
    crate::money::Money::parse_amount(text).map_err(|error| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_amount", error.to_string())
    })
}

/// Parses the optional `Idempotency-Key` header.
pub fn parse_idempotency_key(header: Option<&str>) -> Result<Option<IdempotencyKey>, ApiError> {
    header
        .map(IdempotencyKey::parse)
        .transpose()
        .map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                error.to_string(),
            )
        })
}

/// Within the request's transaction: the first response to this key, if it was seen before
/// with the same parameters; an error if it was seen with others; None to go ahead.
pub async fn replay_if_seen<T: ParseFromJSON>(
    txn: &impl ConnectionTrait,
    schema: &str,
    endpoint: &str,
    key: Option<&IdempotencyKey>,
    fingerprint: &str,
) -> Result<Option<T>, ApiError> {
    let Some(key) = key else {
        return Ok(None);
    };
    match idempotency::claim(txn, schema, endpoint, key, fingerprint)
        .await
        .map_err(|error| ApiError::from_db(&error))?
    {
        Claim::Fresh => Ok(None),
        Claim::Replay { body, .. } => T::parse_from_json(Some(body)).map(Some).map_err(|error| {
            tracing::error!(endpoint, error = %error.into_message(), "stored idempotent response unreadable");
            ApiError::internal()
        }),
        Claim::Reused => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a request with other parameters",
        )),
    }
}

/// Within the request's transaction: stores the response for retries with the same key.
pub async fn remember_response<T: ToJSON>(
    txn: &impl ConnectionTrait,
    schema: &str,
    endpoint: &str,
    key: Option<&IdempotencyKey>,
    status: StatusCode,
    body: &T,
) -> Result<(), ApiError> {
    let Some(key) = key else {
        return Ok(());
    };
    let json = body.to_json().unwrap_or(serde_json::Value::Null);
    idempotency::remember(txn, schema, endpoint, key, status.as_u16(), json)
        .await
        .map_err(|error| ApiError::from_db(&error))
}
