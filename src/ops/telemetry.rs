//! Logging and tracing: one tracing subscriber for the process (text or JSON logs, filtered by
//! `RUST_LOG`), spans exported over OTLP when an endpoint is given, the W3C trace context that
//! carries one trace across HTTP, outbox rows and AMQP messages; and passwords kept out of logs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter when `RUST_LOG` is unset: our own info, and sqlx only when something is wrong
/// (it logs every statement at info). lapin is silenced: its own recovery loop reports every
/// failed attempt at ERROR (dozens a second with a wrong password), while Gozon's tasks report
/// a lost or refused broker once, then retry with backoff quietly. This filters the logs only:
/// which spans are exported does not depend on it (`RUST_LOG=warn` keeps the traces).
const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=off,amq_protocol=off,poem=info";

/// The spans exported: Gozon's own, from info (requests, messages, publishes); the debug
/// spans of health checks and scrapes stay out of the traces.
fn exported_spans() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target("gozon", tracing::Level::INFO)
}

/// The header (and AMQP header, and outbox column) that carries a span's context.
pub const TRACEPARENT: &str = "traceparent";

/// Where spans go, when they go anywhere.
#[derive(Clone, Debug)]
pub struct Tracing {
    /// The OTLP/HTTP base URL (`http://collector:4318`); `/v1/traces` is appended, unless
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` names the whole URL.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` when `OTEL_SERVICE_NAME` does not set one.
    pub service: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// What must be flushed before the process exits.
#[must_use = "shut it down, so the last spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not export the last spans");
        }
    }
}

/// True when spans are exported: only then do spans carry the OpenTelemetry fields (names,
/// kinds, attributes), which would otherwise only lengthen every log line.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Installs the subscriber: logs always, span export when `tracing` names an endpoint (or the
/// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` does). Must run inside the Tokio runtime: the
/// exporter sends on it. A second call (tests start many apps in one process) installs nothing.
pub fn init(format: LogFormat, tracing: Option<&Tracing>) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_filter(filter).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_filter(filter)
            .boxed(),
    };
    let (provider, endpoint) = match tracing.map(tracer_provider).transpose()?.flatten() {
        Some((provider, endpoint)) => (Some(provider), Some(endpoint)),
        None => (None, None),
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("gozon"))
            .with_filter(exported_spans())
            .boxed()
    });
    let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
        std::iter::once(logs).chain(spans).collect();
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if installed && let Some(endpoint) = endpoint {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(endpoint, "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

/// The provider exporting to the configured endpoint, and the endpoint; None when tracing is
/// off (no endpoint, `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`, or an endpoint this
/// exporter cannot reach: tracing is optional, so that is said and the process goes on).
fn tracer_provider(
    tracing: &Tracing,
) -> Result<Option<(SdkTracerProvider, String)>, TelemetryError> {
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let endpoint = match (
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        &tracing.otlp_endpoint,
    ) {
        (Some(whole), _) => whole,
        (None, Some(base)) if !base.is_empty() => {
            format!("{}/v1/traces", base.trim_end_matches('/'))
        }
        _ => return Ok(None),
    };
    if disabled {
        return Ok(None);
    }
    if !endpoint.starts_with("http://") {
        // Before the subscriber exists: straight to standard error.
        eprintln!(
            "gozon: not exporting traces: the OTLP endpoint {endpoint:?} must be an http:// URL \
             (an OpenTelemetry collector's OTLP/HTTP port, or a sidecar's)"
        );
        return Ok(None);
    }
    let client = OnRuntime {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(
            Duration::from_secs(10),
            None,
        ),
        runtime: tokio::runtime::Handle::current(),
        failing: Arc::new(AtomicBool::new(false)),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint.clone())
        .build()?;
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(tracing.service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok(Some((provider, endpoint)))
}

/// The batch exporter sends from a thread of its own, outside any runtime; hyper needs Tokio's
/// reactor. This client hands each request to the application's runtime and waits for it there.
/// It also says when exports start failing (once, not per batch) and when they work again.
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
    failing: Arc<AtomicBool>,
}

/// Logs the first failure of a streak and the recovery after it.
fn note_export(failing: &AtomicBool, failure: Option<String>) {
    match failure {
        Some(error) if !failing.swap(true, Ordering::Relaxed) => {
            tracing::warn!(%error, "cannot export traces; spans are dropped until the collector answers");
        }
        None if failing.swap(false, Ordering::Relaxed) => {
            tracing::info!("exporting traces again");
        }
        _ => {}
    }
}

impl HttpClient for OnRuntime {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let (client, failing) = (self.client.clone(), self.failing.clone());
        let sent = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move {
            let answer = sent.await.map_err(|error| Box::new(error) as HttpError)?;
            let failure = match &answer {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("the collector answered {}", response.status())),
                Err(error) => Some(error.to_string()),
            };
            note_export(&failing, failure);
            answer
        })
    }
}

/// The W3C `traceparent` of `span`, when it is part of an exported trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The `traceparent` of the span the caller is in.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the span `traceparent` names (from a request header, an outbox row
/// or a message header). A missing or malformed one leaves `span` the root of a new trace.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|_| exporting()) else {
        return;
    };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Hides the password of a URL such as `postgres://user:secret@host/db`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_only() {
        assert_eq!(
            mask_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_password("postgres://postgres@127.0.0.1:5432/gozon"),
            "postgres://postgres@127.0.0.1:5432/gozon"
        );
    }
}
