//! The consumer loop shared by both contexts: deliveries in, one handler call each, and an ack
//! only after the handler's transaction committed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::messaging::amqp::{AmqpError, Broker, QueueSpec, connect_until_ready};
use crate::messaging::envelope::Envelope;
use crate::messaging::signing::{self, MessageKey};

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The message can never be applied (unknown type, bad payload, unknown order):
    /// it goes to the dead-letter queue at once.
    #[error("poison message: {0}")]
    Poison(String),
    /// Applying it failed for a reason that may pass: it is requeued, and dead-lettered by
    /// the broker once its delivery limit is reached.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The database cannot be reached: not the message's fault, so it is not counted against
    /// its delivery limit. The consumer keeps it and tries again with backoff.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl From<sea_orm::DbErr> for HandleError {
    fn from(error: sea_orm::DbErr) -> Self {
        if crate::db::is_unavailable(&error) {
            HandleError::Unavailable(error.to_string())
        } else {
            HandleError::Transient(error.to_string())
        }
    }
}

/// What a handler did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Applied,
    /// Its id was already in the inbox: nothing done again.
    Duplicate,
}

/// What a context does with one message. Must be idempotent: it records the message id in its
/// inbox in the same transaction as its effect.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Handled, HandleError>> + Send;
}

#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub prefetch: u16,
}

/// Consumes `queue` until `shutdown`, reconnecting with backoff whenever the broker goes away.
pub async fn run<H: Handler>(
    broker: Broker,
    queue: QueueSpec,
    handler: Arc<H>,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) {
    let queue_name = broker.queue_name(&queue);
    let task = format!("consumer {queue_name}");
    while let Some((connection, channel)) =
        connect_until_ready(&broker, &task, false, &shutdown).await
    {
        match consume(
            &broker,
            &channel,
            &queue_name,
            &task,
            handler.as_ref(),
            &settings,
            &shutdown,
        )
        .await
        {
            Ok(()) => {
                // Shutdown: stop taking deliveries; unacked ones go back to the queue on close.
                let _ = broker
                    .timed(channel.close(200, "shutting down".into()))
                    .await;
                let _ = broker
                    .timed(connection.close(200, "shutting down".into()))
                    .await;
                break;
            }
            Err(error) => {
                tracing::warn!(task = %task, %error, "consumer lost the broker; reconnecting");
                let _ = broker
                    .timed(connection.close(200, "reconnecting".into()))
                    .await;
            }
        }
    }
    tracing::info!(task = %task, "consumer stopped");
}

async fn consume<H: Handler>(
    broker: &Broker,
    channel: &lapin::Channel,
    queue_name: &str,
    task: &str,
    handler: &H,
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> Result<(), AmqpError> {
    broker
        .timed(channel.basic_qos(settings.prefetch, BasicQosOptions::default()))
        .await?;
    let mut deliveries = broker
        .timed(channel.basic_consume(
            queue_name.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
    broker.links().set(task, true);
    let mut transient_failures = 0u32;
    loop {
        let delivery = tokio::select! {
            next = deliveries.next() => next,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(AmqpError::ConsumerCancelled),
        };
        let key = &broker.settings().message_key;
        let outcome =
            handle_holding_through_outages(handler, key, &delivery, queue_name, shutdown).await;
        let metrics = broker.metrics();
        match outcome {
            Ok(handled) => {
                metrics.consumed(
                    queue_name,
                    if handled == Handled::Applied {
                        "applied"
                    } else {
                        "duplicate"
                    },
                );
                transient_failures = 0;
                broker
                    .timed(delivery.acker.ack(BasicAckOptions::default()))
                    .await?;
            }
            Err(HandleError::Poison(reason)) => {
                metrics.consumed(queue_name, "dead_lettered");
                tracing::error!(queue = queue_name, %reason, "dead-lettering a message that can never be applied");
                broker
                    .timed(delivery.acker.reject(BasicRejectOptions { requeue: false }))
                    .await?;
            }
            Err(HandleError::Transient(reason) | HandleError::Unavailable(reason)) => {
                metrics.consumed(queue_name, "requeued");
                // Pause before handing it back, so an outage does not burn through the
                // delivery limit in a tight loop.
                transient_failures += 1;
                let pause = Duration::from_millis(100 * u64::from(transient_failures.min(50)));
                tracing::warn!(queue = queue_name, %reason, retry_in = ?pause, "message handling failed; requeueing");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => {}
                }
                broker
                    .timed(delivery.acker.nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    }))
                    .await?;
            }
        }
    }
}

/// Handles `delivery`; while the database is unreachable, keeps the message and tries again
/// with a growing pause, until it is applied, fails for another reason, or shutdown begins.
async fn handle_holding_through_outages<H: Handler>(
    handler: &H,
    key: &MessageKey,
    delivery: &Delivery,
    queue_name: &str,
    shutdown: &CancellationToken,
) -> Result<Handled, HandleError> {
    let mut attempts = 0u32;
    loop {
        let outcome = handle_delivery(handler, key, delivery).await;
        let Err(HandleError::Unavailable(reason)) = &outcome else {
            if attempts > 0 && outcome.is_ok() {
                tracing::info!(queue = queue_name, "database back; message applied");
            }
            return outcome;
        };
        attempts += 1;
        if attempts == 1 {
            tracing::warn!(queue = queue_name, %reason, "database unavailable; holding the message and retrying");
        }
        let pause = Duration::from_millis(100 * u64::from(attempts.min(50)));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return outcome,
        }
    }
}

async fn handle_delivery<H: Handler>(
    handler: &H,
    key: &MessageKey,
    delivery: &Delivery,
) -> Result<Handled, HandleError> {
    let signature = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(signing::HEADER))
        .and_then(|value| match value {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
            _ => None,
        });
    if !signature.is_some_and(|signature| key.verify(&delivery.data, signature)) {
        return Err(HandleError::Poison(
            "unsigned or forged message (bad x-gozon-signature)".to_owned(),
        ));
    }
    let envelope = Envelope::from_bytes(&delivery.data)
        .map_err(|error| HandleError::Poison(error.to_string()))?;
    let span = tracing::info_span!(
        "message",
        message_id = %envelope.message_id,
        message_type = %envelope.message_type,
        correlation_id = %envelope.correlation_id,
        redelivered = delivery.redelivered,
    );
    handler.handle(envelope).instrument(span).await
}
