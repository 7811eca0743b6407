//! What a process serves over HTTP: each running context's API under `/api/<context>`, health,
//! metrics, the whole OpenAPI document and Swagger UI, and for `--role all` the web page; all wrapped
//! in request ids, tracing, panic catching and the JSON error envelope.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use poem::endpoint::{BoxEndpoint, StaticFilesEndpoint};
use poem::http::StatusCode;
use poem::middleware::{CatchPanic, ReqId, RequestId, ReuseId};
use poem::web::Json as PoemJson;
use poem::{Endpoint, EndpointExt, IntoResponse, Response, Route, get, handler};
use poem_openapi::OpenApiService;
use sea_orm::DatabaseConnection;
use tracing::Instrument;

use crate::kernel::duty::Duty;
use crate::messaging::amqp::BrokerLinks;
use crate::messaging::outbox;
use crate::ops::metrics::Metrics;
use crate::ops::telemetry;
use crate::orders::api::OrdersApi;
use crate::payments::api::PaymentsApi;
use crate::web::auth::Authenticator;
use crate::web::edge::{self, PostLimits};
use crate::web::error::{ApiError, error_to_json};
use crate::web::idempotency;

pub const TITLE: &str = "Gozon";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The API of both contexts, as `--role all` describes it and `openapi.yaml` holds it.
fn openapi_service() -> OpenApiService<(OrdersApi, PaymentsApi), ()> {
    let apis = (OrdersApi::spec_only(), PaymentsApi::spec_only());
    OpenApiService::new(apis, TITLE, VERSION).description(
        "Orders and payments for an online store. Creating an order answers at once with \
         status NEW; a saga over RabbitMQ then debits the account exactly once and moves the \
         order to FINISHED or CANCELLED.",
    )
}

/// The spec as YAML, without a database: what `gozon openapi` prints.
pub fn openapi_yaml() -> String {
    openapi_service().spec_yaml()
}

/// The route a request matched, as a bounded label: the API's paths and the operational ones
/// as they are, anything else one word.
fn route_template<'a>(path: &'a str, api: &HashMap<String, String>) -> &'a str {
    const OPERATIONAL: [&str; 4] = ["/health/live", "/health/ready", "/metrics", "/openapi.json"];
    if api.contains_key(path) || OPERATIONAL.contains(&path) {
        path
    } else if path.starts_with("/docs") {
        "/docs"
    } else if path.starts_with("/api") {
        "other"
    } else {
        "static"
    }
}

/// Each API path's methods (`GET`, `POST`), from the spec, for the `Allow` header of a 405.
fn allowed_methods() -> HashMap<String, String> {
    let spec: serde_json::Value =
        serde_json::from_str(&openapi_service().spec()).unwrap_or_default();
    let paths = spec["paths"].as_object().cloned().unwrap_or_default();
    paths
        .into_iter()
        .map(|(path, operations)| {
            let mut methods = operations.as_object().map_or_else(Vec::new, |ops| {
                ops.keys()
                    .map(|method| method.to_ascii_uppercase())
                    .collect::<Vec<_>>()
            });
            if methods.iter().any(|method| method == "GET") {
                methods.push("HEAD".to_owned());
            }
            (path, methods.join(", "))
        })
        .collect()
}

/// `gozon openapi`: the spec to `output`, or to standard output.
pub fn write_openapi(output: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    match output {
        Some(path) => std::fs::write(path, openapi_yaml())
            .with_context(|| format!("writing {}", path.display())),
        None => {
            print!("{}", openapi_yaml());
            Ok(())
        }
    }
}

/// The routes of a process. `apis` are the running contexts' APIs by context name; `page`, the
/// folder of the web page, is given only to `--role all`, which also serves the API docs.
/// What guards the routes: who may call, how often, how long a handler may take.
pub struct Guards {
    pub authenticator: Authenticator,
    pub post_limits: PostLimits,
    pub request_timeout: Duration,
}

pub fn routes(
    observed: Observed,
    apis: Vec<(&'static str, BoxEndpoint<'static>)>,
    guards: Guards,
    page: Option<PathBuf>,
) -> impl poem::Endpoint {
    let observed_metrics = observed.metrics.clone();
    let mut route = Route::new()
        .at("/health/live", get(live))
        .at("/health/ready", get(ready).data(observed.clone()))
        .at("/metrics", get(metrics).data(observed));
    // Whatever no context serves under /api is 404, whatever the method (not the page's 405).
    route = route.nest_no_strip("/api", api_not_found);
    // Operation paths already start with /api/<context>, so the prefix is not stripped.
    for (context, api) in apis {
        route = route.nest_no_strip(format!("/api/{context}"), api);
    }
    // Every role serves the whole document and Swagger UI (they need no database).
    let docs = openapi_service();
    route = route
        .at("/openapi.json", docs.spec_endpoint())
        .nest("/docs", docs.swagger_ui());
    if let Some(dir) = page {
        route = route.nest("/", StaticFilesEndpoint::new(dir).index_file("index.html"));
    }
    let allowed = Arc::new(allowed_methods());
    let spans_allowed = allowed.clone();
    let counted = observed_metrics;
    let Guards {
        authenticator,
        post_limits,
        request_timeout,
    } = guards;
    route
        .data(authenticator)
        .data(post_limits.clone())
        .catch_all_error(error_to_json)
        .around(move |ep, request| {
            // The per-client limit here, before anything is read; the per-user one after
            // authentication (the auth extractor).
            let refusal = idempotency::unreadable_key(&request)
                .or_else(|| post_limits.check_client(&request));
            async move {
                match refusal {
                    Some(refusal) => Ok(refusal.into_response()),
                    None => Ok::<_, poem::Error>(edge::within(&ep, request, request_timeout).await),
                }
            }
        })
        .with(CatchPanic::new().with_handler(panicked))
        .around(move |ep, request| {
            let allowed = spans_allowed.clone();
            async move { Ok::<_, poem::Error>(in_request_span(&*ep, request, &allowed).await) }
        })
        .with(RequestId::default().reuse_id(ReuseId::Use))
        .around(move |ep, request| {
            let (allowed, counted) = (allowed.clone(), counted.clone());
            async move { Ok::<_, poem::Error>(at_the_door(&*ep, request, &allowed, &counted).await) }
        })
}

/// Around everything: a sane request id in, the security headers and `Allow` (for a 405) out,
/// and the request counted.
async fn at_the_door<E: Endpoint>(
    ep: &E,
    mut request: poem::Request,
    allowed: &HashMap<String, String>,
    counted: &Metrics,
) -> Response {
    edge::drop_unsafe_request_id(&mut request);
    let path = request.uri().path().to_owned();
    let method = request.method().as_str().to_owned();
    // RFC 9110: a resource that answers GET answers HEAD. It is routed as the GET; the server
    // sends its status and headers and no body (hyper knows the request was a HEAD).
    if request.method() == poem::http::Method::HEAD {
        request.set_method(poem::http::Method::GET);
    }
    let started = std::time::Instant::now();
    let mut response = match ep.call(request).await {
        Ok(response) => response.into_response(),
        Err(error) => error.into_response(),
    };
    let route = route_template(&path, allowed);
    let took = started.elapsed().as_secs_f64();
    counted.http_answered(route, &method, response.status().as_u16(), took);
    // RFC 9110: a 405 says which methods the resource takes.
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(methods) = allowed.get(&path)
        && let Ok(value) = poem::http::HeaderValue::from_str(methods)
    {
        response.headers_mut().insert("allow", value);
    }
    edge::secure(&path, response)
}

/// One span per request, carrying its id, so that whatever a handler logs names the request.
/// When traces are exported it is also the trace's server span: a `traceparent` header makes it
/// a child of the caller's span, and it carries the route, method and status. The access line
/// is at debug (`RUST_LOG=gozon::access=debug`): at thousands of requests a second, formatting
/// and writing a line each costs more than answering many of them; the `gozon_http_*` metrics
/// count every request anyway.
async fn in_request_span<E: Endpoint>(
    ep: &E,
    request: poem::Request,
    allowed: &HashMap<String, String>,
) -> Response {
    use tracing::field::Empty;
    let request_id = request
        .data::<ReqId>()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let route = route_template(request.uri().path(), allowed);
    // Probes and scrapes: a span at debug, which the logs name but traces leave out.
    let operational = route.starts_with("/health") || route == "/metrics";
    let span = if operational {
        tracing::debug_span!("request", %request_id)
    } else {
        tracing::info_span!(
            "request",
            %request_id,
            otel.name = Empty,
            otel.kind = Empty,
            http.request.method = Empty,
            http.route = Empty,
            http.response.status_code = Empty,
        )
    };
    let exporting = telemetry::exporting() && !operational;
    if exporting {
        span.record("otel.name", format!("{} {route}", request.method()));
        span.record("otel.kind", "server");
        span.record("http.request.method", request.method().as_str());
        span.record("http.route", route);
        let traceparent = request.headers().get(telemetry::TRACEPARENT);
        telemetry::continue_trace(&span, traceparent.and_then(|v| v.to_str().ok()));
    }
    let (method, started) = (request.method().clone(), std::time::Instant::now());
    let path = tracing::enabled!(target: "gozon::access", tracing::Level::DEBUG)
        .then(|| request.uri().path().to_owned());
    let response = match ep.call(request).instrument(span.clone()).await {
        Ok(response) => response.into_response(),
        Err(error) => error.into_response(),
    };
    if exporting {
        span.record("http.response.status_code", response.status().as_u16());
    }
    if let Some(path) = path {
        tracing::debug!(
            target: "gozon::access",
            parent: &span,
            %method,
            path,
            status = response.status().as_u16(),
            duration_us = started.elapsed().as_micros() as u64,
            "answered"
        );
    }
    response
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal().into_response()
}

#[handler]
fn api_not_found() -> poem::Result<()> {
    Err(poem::error::NotFoundError.into())
}

#[handler]
fn live() -> PoemJson<serde_json::Value> {
    PoemJson(serde_json::json!({"status": "ok"}))
}

/// What the operational endpoints look at: the database, the broker links, the metrics, and the
/// schemas whose outboxes this process publishes.
#[derive(Clone)]
pub struct Observed {
    pub db: DatabaseConnection,
    pub links: BrokerLinks,
    /// Background work serving depends on (the order status listener).
    pub duties: Vec<Duty>,
    pub metrics: Metrics,
    pub schemas: Vec<&'static str>,
}

/// Ready when the database answers and every relay and consumer of this process is connected
/// to the broker (on a connection that still hears from its node). The answer names the node
/// each of them uses, or which are not connected and since when.
#[handler]
async fn ready(observed: poem::web::Data<&Observed>) -> Response {
    let broker: serde_json::Map<String, serde_json::Value> = observed
        .links
        .states()
        .into_iter()
        .map(|state| {
            (
                state.task,
                state.node.map_or(serde_json::Value::Null, Into::into),
            )
        })
        .collect();
    match readiness(&observed).await {
        Ok(()) => PoemJson(serde_json::json!({"status": "ok", "broker": broker})).into_response(),
        Err(down) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", down)
            .into_response(),
    }
}

/// How long readiness waits for the database to answer.
const READY_PING: Duration = Duration::from_secs(2);

/// What keeps this process from being ready, if anything.
async fn readiness(observed: &Observed) -> Result<(), String> {
    match tokio::time::timeout(READY_PING, observed.db.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "not ready: database unreachable");
            return Err("the database is unreachable".to_owned());
        }
        Err(_) => {
            tracing::warn!("not ready: the database did not answer within 2 s");
            return Err("the database does not answer".to_owned());
        }
    }
    if let Some(duty) = observed.duties.iter().find(|duty| !duty.is_up()) {
        return Err(format!("{} is not running yet", duty.name()));
    }
    let down: Vec<String> = observed
        .links
        .stalled()
        .into_iter()
        .map(|(work, secs)| format!("{work} (for {secs} s)"))
        .collect();
    if !down.is_empty() {
        return Err(format!(
            "not connected to the broker, or its connection went silent: {}",
            down.join(", ")
        ));
    }
    Ok(())
}

/// How long a scrape waits for each database look.
const SCRAPE_LOOK: Duration = Duration::from_secs(2);

/// Prometheus text format. Readiness and outbox backlogs are measured now; if the database
/// cannot be read the backlogs keep their last value.
#[handler]
async fn metrics(observed: poem::web::Data<&Observed>) -> Response {
    // Each database look bounded, so a scrape answers within Prometheus's timeout even while
    // the database does not: readiness then reads 0, the backlogs keep their last values.
    let now = tokio::time::timeout(SCRAPE_LOOK, readiness(&observed)).await;
    observed.metrics.set_ready(matches!(now, Ok(Ok(()))));
    for schema in &observed.schemas {
        match tokio::time::timeout(SCRAPE_LOOK, outbox::backlog(&observed.db, schema)).await {
            Ok(Ok(backlog)) => {
                observed
                    .metrics
                    .outbox_backlog(schema, backlog.unsent, backlog.oldest_age_secs)
            }
            Ok(Err(error)) => tracing::warn!(schema, %error, "cannot measure the outbox backlog"),
            Err(_) => tracing::warn!(schema, "measuring the outbox backlog took too long"),
        }
    }
    match observed.metrics.encode() {
        Ok(text) => text
            .with_content_type("text/plain; version=0.0.4; charset=utf-8")
            .into_response(),
        Err(_) => ApiError::internal().into_response(),
    }
}
