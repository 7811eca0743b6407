//! One trace per order across both contexts: create_order (orders) -> the orders relay's publish
//! -> the payments consumer -> the payments relay's publish -> the orders consumer, as an
//! OpenTelemetry collector receives them over OTLP/HTTP from two `gozon serve` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use poem::web::Data;
use poem::{EndpointExt, Route, handler, post};
use prost::Message;

use crate::helpers::TestEnv;

#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// OTLP's SpanKind: 2 server, 4 producer, 5 consumer.
    kind: i32,
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

/// What a collector does with an export: decode it, keep its spans.
#[handler]
async fn traces(body: Vec<u8>, received: Data<&Received>) -> poem::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body.as_slice()) else {
        return poem::http::StatusCode::BAD_REQUEST;
    };
    let mut spans = received.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.name")
            .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
            .map(|value| match value {
                Value::StringValue(name) => name.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            spans.push(ReceivedSpan {
                service: service.clone(),
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
            });
        }
    }
    poem::http::StatusCode::OK
}

/// A minimal OTLP/HTTP receiver on a free port; returns its base URL and what it received.
async fn start_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let routes = Route::new()
        .at("/v1/traces", post(traces))
        .data(received.clone());
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(routes));
    (address, received)
}

#[tokio::test]
async fn one_order_is_one_trace_across_both_contexts() {
    let (collector, received) = start_receiver().await;
    let env = TestEnv::new();
    let flags = ["--otlp-endpoint", collector.as_str()];
    // Export every 100 ms instead of every 5 s.
    let envs = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let payments = env.start_process_with("payments", &flags, &envs).await;
    let orders = env.start_process_with("orders", &flags, &envs).await;
    payments.app.funded_account("traced", "100").await;

    // The caller's own trace: every span of the saga joins it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .post(format!("{}/api/orders/create_order", orders.app.address))
        .query(&[("user_id", "traced"), ("amount", "12.50")])
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let order: serde_json::Value = response.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_owned();
    let settled = orders
        .app
        .wait_until_final(&id, Duration::from_secs(20))
        .await;
    assert_eq!(settled.str("status"), "FINISHED");

    // The five spans of the saga, from two services, in one trace, each the child of the one
    // before it.
    let wanted = [
        ("gozon-orders", 2, "POST /api/orders/create_order"),
        ("gozon-orders", 4, "payment.requested.v1 publish"),
        ("gozon-payments", 5, "payment.requested.v1 process"),
        ("gozon-payments", 4, "payment.succeeded.v1 publish"),
        ("gozon-orders", 5, "payment.succeeded.v1 process"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let chain = loop {
        let spans: Vec<ReceivedSpan> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect();
        let found: Vec<Option<ReceivedSpan>> = wanted
            .iter()
            .map(|(service, kind, name)| {
                spans
                    .iter()
                    .find(|s| s.service == *service && s.kind == *kind && s.name == *name)
                    .cloned()
            })
            .collect();
        if found.iter().all(Option::is_some) {
            break found.into_iter().flatten().collect::<Vec<_>>();
        }
        assert!(
            Instant::now() < deadline,
            "the trace {trace_id} lacks spans: wanted {wanted:?}, got {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        chain[0].parent_span_id, "00f067aa0ba902b7",
        "the caller's span is the parent"
    );
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].parent_span_id, pair[0].span_id,
            "{} follows {}",
            pair[1].name, pair[0].name
        );
    }
    let services: BTreeSet<&str> = chain.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(["gozon-orders", "gozon-payments"]));

    // An order without a caller's trace gets a trace of its own, again across both contexts.
    let plain = orders.app.create_order("traced", "1.00").await;
    let plain_id = plain.str("id").to_owned();
    orders
        .app
        .wait_until_final(&plain_id, Duration::from_secs(20))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.lock().unwrap().clone();
        let mut by_trace: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for span in spans.iter().filter(|s| s.trace_id != trace_id) {
            by_trace
                .entry(span.trace_id.as_str())
                .or_default()
                .insert(span.name.as_str());
        }
        let whole = by_trace.values().any(|names| {
            names.contains("POST /api/orders/create_order")
                && names.contains("payment.requested.v1 process")
                && names.contains("payment.succeeded.v1 process")
        });
        if whole {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no whole trace for {plain_id}: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
