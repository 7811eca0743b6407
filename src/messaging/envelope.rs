//! What travels between contexts: a [`Message`] (a versioned contract), inside the envelope
//! that carries its id, type and correlation id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A message one context sends another. Its type name, versioned (`payment.requested.v1`), is
/// also its AMQP routing key; a change old consumers cannot read gets a new type.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    const TYPE: &'static str;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub message_id: Uuid,
    #[serde(rename = "type")]
    pub message_type: String,
    pub correlation_id: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the body is not a message envelope: {0}")]
    Malformed(serde_json::Error),
    #[error("the payload of {message_type} is invalid: {source}")]
    BadPayload {
        message_type: String,
        source: serde_json::Error,
    },
}

impl Envelope {
    pub fn new<C: Message>(
        message: &C,
        correlation_id: &str,
    ) -> Result<Envelope, serde_json::Error> {
        Ok(Envelope {
            message_id: Uuid::now_v7(),
            message_type: C::TYPE.to_owned(),
            correlation_id: correlation_id.to_owned(),
            occurred_at: Utc::now(),
            payload: serde_json::to_value(message)?,
        })
    }

    pub fn from_bytes(body: &[u8]) -> Result<Envelope, EnvelopeError> {
        serde_json::from_slice(body).map_err(EnvelopeError::Malformed)
    }

    /// The payload as the contract `C`, for a consumer that has matched on the type.
    pub fn payload_as<C: Message>(&self) -> Result<C, EnvelopeError> {
        serde_json::from_value(self.payload.clone()).map_err(|source| EnvelopeError::BadPayload {
            message_type: self.message_type.clone(),
            source,
        })
    }
}
