//! A Server-Sent Events answer whose spec describes what a client reads: each event, not an
//! array. OpenAPI 3.0 gives a `text/event-stream` response the schema of one event; poem-openapi's
//! own `EventStream` describes the whole stream as an array of items, which a client or fuzzer
//! reading events one by one cannot match.

use futures_util::stream::BoxStream;
use poem::{IntoResponse, Response};
use poem_openapi::ApiResponse;
use poem_openapi::payload::EventStream;
use poem_openapi::registry::{
    MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
};
use poem_openapi::types::{ToJSON, Type};

/// What an event's `data` holds, in words for the spec (OpenAPI 3.0 cannot give a string's
/// JSON content a schema of its own).
pub trait DescribedEvent: Type + ToJSON + Send + 'static {
    const DATA: &'static str;
}

/// Events of `T`: each a `message` whose `data` is one `T` as JSON; comments keep it alive.
pub struct Events<T: 'static>(EventStream<BoxStream<'static, T>>);

impl<T: DescribedEvent> Events<T> {
    pub fn new(stream: BoxStream<'static, T>, keep_alive: std::time::Duration) -> Events<T> {
        Events(EventStream::new(stream).keep_alive(keep_alive))
    }

    fn event_schema() -> MetaSchema {
        let text = |description: &'static str| {
            MetaSchemaRef::Inline(Box::new(MetaSchema {
                description: Some(description),
                ..MetaSchema::new("string")
            }))
        };
        let event = MetaSchema {
            description: Some("The event's type: always `message`."),
            enum_items: vec![serde_json::json!("message")],
            ..MetaSchema::new("string")
        };
        MetaSchema {
            description: Some("One Server-Sent Event."),
            required: vec!["data"],
            properties: vec![
                ("data", text(T::DATA)),
                ("event", MetaSchemaRef::Inline(Box::new(event))),
                ("id", text("Not sent.")),
                (
                    "retry",
                    MetaSchemaRef::Inline(Box::new(MetaSchema {
                        description: Some("Not sent."),
                        ..MetaSchema::new("integer")
                    })),
                ),
            ],
            ..MetaSchema::new("object")
        }
    }
}

impl<T: DescribedEvent> IntoResponse for Events<T> {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

impl<T: DescribedEvent> ApiResponse for Events<T> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: "text/event-stream",
                    schema: MetaSchemaRef::Inline(Box::new(Self::event_schema())),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        // The item's own schema stays in the components, for clients to decode `data` with.
        T::register(registry);
    }
}
