//! The JSON error envelope, and [`Reply`]: an endpoint's answer, whose OpenAPI description
//! lists exactly the statuses the endpoint declares.

use std::marker::PhantomData;

use poem::http::StatusCode;
use poem::web::Json as PoemJson;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaResponses, Registry};
use poem_openapi::{ApiResponse, Object};
use sea_orm::DbErr;

use crate::kernel::coalesce::Failed;

/// Every error the API returns: `{"error": "<code>", "message": "<human text>"}`.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code such as `invalid_amount`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// An error on its way out of a handler: a status, the envelope, and any headers it needs
/// (`WWW-Authenticate`, `Retry-After`).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: code.to_owned(),
                message: message.into(),
            },
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> ApiError {
        self.headers.push((name, value.into()));
        self
    }

    /// A failure of ours: the cause goes to the log once, the client learns nothing of it.
    /// A database that cannot be reached is a 503 (try again later), anything else a 500.
    pub fn from_db(error: &DbErr) -> ApiError {
        if crate::db::is_unavailable(error) {
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

    /// A request refused before a handler ran: a missing or mistyped parameter (poem-openapi's
    /// own check), an unknown path, a wrong method.
    pub fn from_rejected_request(error: &poem::Error) -> ApiError {
        if let Some(Refused(refusal)) = error.downcast_ref::<Refused>() {
            return refusal.clone();
        }
        // poem-openapi says "expects an input value" when a required parameter is absent.
        if let Some(param) = error.downcast_ref::<poem_openapi::error::ParseParamError>() {
            return if param.reason.contains("expects an input value") {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "missing_parameter",
                    format!("query parameter `{}` is required", param.name),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_parameter",
                    format!("query parameter `{}`: {}", param.name, param.reason),
                )
            };
        }
        let status = error.status();
        if status.is_server_error() {
            tracing::error!(%error, "request failed");
            return ApiError::internal();
        }
        let code = match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            _ => "invalid_request",
        };
        ApiError::new(status, code, error.to_string())
    }
}

/// A request an extractor refused, carrying the answer to give (401 for a bad token, say).
#[derive(Debug)]
pub struct Refused(pub ApiError);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.body.message)
    }
}

impl std::error::Error for Refused {}

/// A coalesced read's failure: its batch's own error, or a 503 when the read could not be made
/// in time (or at all, while shutting down).
impl From<Failed<ApiError>> for ApiError {
    fn from(failed: Failed<ApiError>) -> Self {
        match failed {
            Failed::Load(error) => error,
            Failed::TimedOut | Failed::Gone => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the read could not be made in time; try again shortly",
            ),
        }
    }
}

impl From<DbErr> for ApiError {
    fn from(error: DbErr) -> Self {
        ApiError::from_db(&error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = PoemJson(self.body).with_status(self.status).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = poem::http::HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// For `Route::catch_all_error`: errors raised outside our handlers, in the envelope.
pub async fn error_to_json(error: poem::Error) -> Response {
    ApiError::from_rejected_request(&error).into_response()
}

/// What a 500 means, for the spec: the client learns no more than this.
pub const INTERNAL_DOC: &str =
    "Something failed on the server's side (`internal_error`); the cause is in its log.";

/// The statuses one endpoint answers with, each with its description in the spec.
pub trait Statuses: Send + 'static {
    /// The success status and its description.
    const OK: (u16, &'static str);
    /// Every error status the endpoint can return, in the envelope.
    const ERRORS: &'static [(u16, &'static str)];
}

/// Declares an endpoint's [`Statuses`] as a unit type: its success, then its errors.
#[macro_export]
macro_rules! statuses {
    ($(#[$meta:meta])* $name:ident: $ok:literal => $ok_doc:expr $(, $status:literal => $doc:expr)* $(,)?) => {
        $(#[$meta])*
        pub struct $name;
        impl $crate::web::error::Statuses for $name {
            const OK: (u16, &'static str) = ($ok, $ok_doc);
            const ERRORS: &'static [(u16, &'static str)] = &[$(($status, $doc)),*];
        }
    };
}

/// What an endpoint answers: its payload `T` with the success status of `S`, or an
/// [`ApiError`] whose status is one of `S`'s errors. Requests poem-openapi rejects before the
/// handler runs come out in the same envelope.
pub struct Reply<T, S> {
    result: Result<T, ApiError>,
    statuses: PhantomData<fn() -> S>,
}

impl<T, S, E: Into<ApiError>> From<Result<T, E>> for Reply<T, S> {
    fn from(result: Result<T, E>) -> Self {
        Reply {
            result: result.map_err(Into::into),
            statuses: PhantomData,
        }
    }
}

impl<T: ApiResponse + IntoResponse, S: Statuses> ApiResponse for Reply<T, S> {
    const BAD_REQUEST_HANDLER: bool = true;

    fn meta() -> MetaResponses {
        let mut responses = T::meta().responses;
        for response in &mut responses {
            (response.status, response.description) = (Some(S::OK.0), S::OK.1);
        }
        for &(status, description) in S::ERRORS {
            for mut response in Json::<ErrorBody>::meta().responses {
                (response.status, response.description) = (Some(status), description);
                responses.push(response);
            }
        }
        MetaResponses { responses }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
        Json::<ErrorBody>::register(registry);
    }

    fn from_parse_request_error(error: poem::Error) -> Self {
        Reply::from(Err::<T, _>(ApiError::from_rejected_request(&error)))
    }
}

impl<T: IntoResponse, S: Statuses> IntoResponse for Reply<T, S> {
    fn into_response(self) -> Response {
        match self.result {
            Ok(payload) => {
                let status = StatusCode::from_u16(S::OK.0).unwrap_or(StatusCode::OK);
                payload.with_status(status).into_response()
            }
            Err(error) => {
                let declared = S::ERRORS.iter().any(|(s, _)| *s == error.status.as_u16());
                if !declared {
                    tracing::error!(status = %error.status, code = error.body.error, "answering with a status the endpoint does not declare");
                }
                error.into_response()
            }
        }
    }
}
