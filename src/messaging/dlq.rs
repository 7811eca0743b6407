//! Dead letters, for operators: `gozon dlq list` shows what a consumer gave up on and why;
//! `gozon dlq replay` sends messages back to the events exchange once the cause is fixed.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::messaging::amqp::{AmqpError, Broker, Opened, QueueSpec};
use crate::messaging::envelope::Envelope;
use crate::messaging::signing;

/// One dead-lettered message, as far as it can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    /// Why the broker dead-lettered it (`rejected`, `delivery_limit`, ...).
    pub reason: Option<String>,
    /// The routing key it was first published with.
    pub routing_key: Option<String>,
    pub body: String,
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The first `x-death` entry RabbitMQ added when it dead-lettered the message.
fn first_death(headers: Option<&FieldTable>) -> Option<&FieldTable> {
    match headers?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

impl DeadLetter {
    fn read(delivery: &Delivery) -> DeadLetter {
        let envelope = Envelope::from_bytes(&delivery.data).ok();
        let death = first_death(delivery.properties.headers().as_ref());
        let routing_key = death
            .and_then(|d| match d.inner().get("routing-keys")? {
                AMQPValue::FieldArray(keys) => keys.as_slice().first().and_then(text),
                _ => None,
            })
            .or_else(|| envelope.as_ref().map(|e| e.message_type.clone()));
        DeadLetter {
            message_id: envelope
                .as_ref()
                .map(|e| e.message_id.to_string())
                .or_else(|| {
                    delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| id.as_str().to_owned())
                }),
            message_type: envelope.as_ref().map(|e| e.message_type.clone()),
            reason: death.and_then(|d| d.inner().get("reason")).and_then(text),
            routing_key,
            body: String::from_utf8_lossy(&delivery.data)
                .chars()
                .take(500)
                .collect(),
        }
    }
}

/// Reads up to `limit` messages of the queue's DLQ without removing them: they are left
/// unacknowledged and go back to the queue when the channel closes.
pub async fn list(
    broker: &Broker,
    queue: &QueueSpec,
    limit: usize,
) -> Result<Vec<DeadLetter>, AmqpError> {
    let Opened {
        connection,
        channel,
        ..
    } = broker.open_bare_channel("gozon-dlq-list").await?;
    let dlq = broker.dead_letter_queue_name(queue);
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) = broker
            .timed(channel.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }))
            .await?
        else {
            break;
        };
        letters.push(DeadLetter::read(&message.delivery));
    }
    let _ = broker.timed(channel.close(200, "listed".into())).await;
    let _ = broker.timed(connection.close(200, "listed".into())).await;
    Ok(letters)
}

/// Publishes up to `limit` messages of the queue's DLQ (only `message_id` if given) back to the
/// queue's inbound exchange under their original routing key, removing each from the DLQ only after
/// the broker confirmed its new copy. Returns the replayed messages.
pub async fn replay(
    broker: &Broker,
    queue: &QueueSpec,
    limit: usize,
    message_id: Option<&str>,
) -> Result<Vec<DeadLetter>, AmqpError> {
    let Opened {
        connection,
        channel,
        ..
    } = broker.open_bare_channel("gozon-dlq-replay").await?;
    broker
        .timed(channel.confirm_select(lapin::options::ConfirmSelectOptions::default()))
        .await?;
    let dlq = broker.dead_letter_queue_name(queue);
    let mut replayed = Vec::new();
    // Only what is in the DLQ now: a replayed message that fails again comes back to the DLQ
    // and must not be picked up again by this same run. Messages read but not replayed stay
    // unacked until the channel closes, and so are not read twice either.
    let mut budget: Option<u32> = None;
    while replayed.len() < limit && budget != Some(0) {
        let Some(message) = broker
            .timed(channel.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }))
            .await?
        else {
            break;
        };
        // message_count is what was left behind this one when it was taken.
        let left = budget.get_or_insert(message.message_count + 1);
        *left -= 1;
        let letter = DeadLetter::read(&message.delivery);
        if message_id.is_some_and(|wanted| letter.message_id.as_deref() != Some(wanted)) {
            continue;
        }
        let Some(routing_key) = letter.routing_key.clone() else {
            tracing::warn!(?letter.message_id, "no routing key known; left in the dead-letter queue");
            continue;
        };
        // Back to the first lane, which every deployment has, whatever lane it came from.
        let routing_key = Broker::first_lane_key(&routing_key);
        republish(broker, &channel, queue, routing_key, &message.delivery).await?;
        broker
            .timed(message.delivery.acker.ack(BasicAckOptions::default()))
            .await?;
        replayed.push(letter);
    }
    let _ = broker.timed(channel.close(200, "replayed".into())).await;
    let _ = broker.timed(connection.close(200, "replayed".into())).await;
    Ok(replayed)
}

async fn republish(
    broker: &Broker,
    channel: &Channel,
    queue: &QueueSpec,
    routing_key: &str,
    delivery: &Delivery,
) -> Result<(), AmqpError> {
    // Fresh properties without the x-death history, so the delivery limit starts over.
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(id) = delivery.properties.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(correlation_id) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    // The body is unchanged, so its signature (if it had a valid one) still holds, under the
    // key that made it: verifiable while that key is current or previous.
    if let Some(original) = delivery.properties.headers().as_ref() {
        let mut headers = FieldTable::default();
        for name in [signing::HEADER, signing::KEY_ID_HEADER] {
            if let Some(value) = original.inner().get(name) {
                headers.insert(name.into(), value.clone());
            }
        }
        properties = properties.with_headers(headers);
    }
    // Back through the queue's own inbound exchange: its owner's broker user may write there.
    let exchange = broker.inbound_exchange(queue);
    let confirm = broker
        .timed(channel.basic_publish(
            exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        ))
        .await?;
    let confirmation = broker.timed(confirm).await?;
    if !confirmation.is_ack() || confirmation.take_message().is_some() {
        return Err(AmqpError::Unroutable(routing_key.to_owned()));
    }
    Ok(())
}
