//! The payment saga, orchestrated by Orders: an order is created NEW together with its
//! `PaymentRequestedV1` in the outbox; Payments' answer moves it to FINISHED or CANCELLED. Its
//! compensations: a cancelled paid order is refunded (REFUNDING -> REFUNDED), a debit that lands
//! on an order cancelled meanwhile (by the person or by the payment timeout) is paid back, each
//! through a `RefundRequestedV1` in the same outbox.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::contracts::{
    PaymentFailedV1, PaymentRequestedV1, PaymentSucceededV1, RefundCompletedV1, RefundRequestedV1,
};
use crate::kernel::money::Money;
use crate::kernel::periodic::every;
use crate::kernel::user_id::UserId;
use crate::messaging::consumer::{HandleError, Handler, Incoming};
use crate::messaging::envelope::{Envelope, Message};
use crate::messaging::{inbox, outbox};
use crate::ops::metrics::Metrics;
use crate::orders::domain::{Order, OrderId, OrderStatus, Refund};
use crate::orders::store::{self, Settlement};
use crate::orders::{SCHEMA, events};

/// Creates a NEW order and its payment request in one statement (in the caller's transaction,
/// if any),
/// unless the user has `cap` NEW orders already (None). Once that commits, the caller wakes the
/// outbox relay.
pub async fn place_order(
    txn: &impl ConnectionTrait,
    user: &UserId,
    amount: Money,
    correlation_id: &str,
    cap: Option<u32>,
) -> Result<Option<Order>, DbErr> {
    let id = OrderId::generate();
    let request = PaymentRequestedV1 {
        order_id: id.as_uuid(),
        user_id: user.clone(),
        amount,
    };
    let request = outbox::OutboxRow::new(&request, correlation_id)?;
    let notice = events::notification(&id, user);
    let written = (request, notice);
    let order = store::place_order(txn, (id, user, amount), correlation_id, cap, written).await?;
    if let Some(order) = &order {
        tracing::debug!(order_id = %order.id, correlation_id, "order placed; payment requested");
    }
    Ok(order)
}

/// Asks Payments, in the caller's transaction, to give `order`'s amount back.
pub async fn request_refund(
    txn: &DatabaseTransaction,
    order: &Order,
    correlation_id: &str,
) -> Result<(), DbErr> {
    let request = RefundRequestedV1 {
        order_id: order.id.as_uuid(),
        user_id: order.user_id.clone(),
        amount: order.amount,
    };
    outbox::enqueue(txn, SCHEMA, &request, correlation_id).await?;
    tracing::info!(order_id = %order.id, status = order.status.as_str(), "refund requested");
    Ok(())
}

/// What Payments says about one order.
#[derive(Debug, Clone)]
pub struct Answer {
    order_id: OrderId,
    user_id: UserId,
    amount: Money,
    kind: AnswerKind,
}

#[derive(Debug, Clone, Copy)]
enum AnswerKind {
    /// Paid (FINISHED) or refused (CANCELLED with its reason).
    Payment(OrderStatus),
    Refunded,
}

/// What applying an answer did, for after the commit.
pub enum Applied {
    Settled(Order),
    /// A refund was requested or recorded: the relay has work.
    Refund,
    Nothing,
}

/// Applies Payments' answers to orders.
pub struct SagaHandler {
    metrics: Metrics,
    /// Wakes this process's orders outbox relay once a refund request is committed.
    relay_wake: Arc<Notify>,
}

impl SagaHandler {
    pub fn new(metrics: Metrics, relay_wake: Arc<Notify>) -> SagaHandler {
        SagaHandler {
            metrics,
            relay_wake,
        }
    }
}

fn decode_answer(envelope: &Envelope) -> Result<Answer, HandleError> {
    let answer = |order_id, user_id, amount, kind| Answer {
        order_id: OrderId::from_uuid(order_id),
        user_id,
        amount,
        kind,
    };
    match envelope.message_type.as_str() {
        PaymentSucceededV1::TYPE => {
            let m: PaymentSucceededV1 = envelope.payload_as().map_err(HandleError::poison)?;
            let kind = AnswerKind::Payment(OrderStatus::Finished);
            Ok(answer(m.order_id, m.user_id, m.amount, kind))
        }
        PaymentFailedV1::TYPE => {
            let m: PaymentFailedV1 = envelope.payload_as().map_err(HandleError::poison)?;
            let kind = AnswerKind::Payment(OrderStatus::Cancelled(m.reason.into()));
            Ok(answer(m.order_id, m.user_id, m.amount, kind))
        }
        RefundCompletedV1::TYPE => {
            let m: RefundCompletedV1 = envelope.payload_as().map_err(HandleError::poison)?;
            Ok(answer(
                m.order_id,
                m.user_id,
                m.amount,
                AnswerKind::Refunded,
            ))
        }
        other => Err(HandleError::poison(format!(
            "unexpected message type {other:?}"
        ))),
    }
}

impl Handler for SagaHandler {
    type Message = Answer;
    type Applied = Applied;

    fn decode(&self, envelope: &Envelope) -> Result<Answer, HandleError> {
        decode_answer(envelope)
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        incoming: Incoming<Answer>,
    ) -> Result<Applied, HandleError> {
        let answer = &incoming.message;
        match answer.kind {
            AnswerKind::Payment(status) => {
                settle(txn, answer, status, &incoming.correlation_id).await
            }
            AnswerKind::Refunded => record_refund(txn, answer).await,
        }
    }

    /// A payment answer for a NEW order it matches, in one statement.
    async fn apply_alone<C: ConnectionTrait + Sync>(
        &self,
        db: &C,
        inbox: Option<inbox::Record<'_>>,
        incoming: &Incoming<Answer>,
    ) -> Result<Option<Applied>, DbErr> {
        let answer = &incoming.message;
        let AnswerKind::Payment(status) = answer.kind else {
            return Ok(None);
        };
        let order = (answer.order_id, &answer.user_id, answer.amount);
        let notice = events::notification(&answer.order_id, &answer.user_id);
        let settled = store::settle_alone(db, order, status, inbox, notice).await?;
        Ok(settled.map(Applied::Settled))
    }

    fn committed(&self, applied: Applied) {
        match applied {
            Applied::Settled(order) => {
                let took = (order.updated_at - order.created_at).as_seconds_f64();
                self.metrics.saga_settled(took);
                tracing::debug!(order_id = %order.id, status = order.status.as_str(), saga_seconds = took, "order settled");
            }
            Applied::Refund => self.relay_wake.notify_one(),
            Applied::Nothing => {}
        }
    }

    /// The messages' orders.
    async fn lock(&self, txn: &DatabaseTransaction, messages: &[&Answer]) -> Result<(), DbErr> {
        let ids: Vec<OrderId> = messages.iter().map(|answer| answer.order_id).collect();
        store::lock_orders(txn, &ids).await
    }

    /// An answer locks its order's row.
    fn lock_key(&self, message: &Answer) -> String {
        message.order_id.to_string()
    }
}

fn poison_mismatch(answer: &Answer, order: &Order) -> HandleError {
    HandleError::poison(format!(
        "answer for order {} names {} and {}, but the order is {} for {}",
        order.id, answer.user_id, answer.amount, order.user_id, order.amount
    ))
}

/// A payment answer: NEW -> its status; a debit that landed on an order cancelled meanwhile
/// is refunded (once: `owe_refund` marks it); anything else about a final order is ignored.
async fn settle(
    txn: &DatabaseTransaction,
    answer: &Answer,
    status: OrderStatus,
    correlation_id: &str,
) -> Result<Applied, HandleError> {
    let (id, user, amount) = (answer.order_id, &answer.user_id, answer.amount);
    match store::settle_order(txn, id, user, amount, status).await? {
        Settlement::Settled(order) => {
            events::notify_changed(txn, &order).await?;
            Ok(Applied::Settled(order))
        }
        Settlement::AlreadyFinal(order) => {
            let paid = status == OrderStatus::Finished;
            let cancelled = matches!(order.status, OrderStatus::Cancelled(_));
            let owed = paid && cancelled && order.refund == Refund::None;
            if owed && let Some(order) = store::owe_refund(txn, id).await? {
                tracing::info!(order_id = %id, "a debit landed on a cancelled order");
                request_refund(txn, &order, correlation_id).await?;
                events::notify_changed(txn, &order).await?;
                return Ok(Applied::Refund);
            }
            tracing::info!(order_id = %id, status = order.status.as_str(), "order already final; answer ignored");
            Ok(Applied::Nothing)
        }
        // Rolled back with the inbox row: the message goes to the dead-letter queue intact.
        Settlement::Unknown => Err(HandleError::poison(format!(
            "payment result for unknown order {id}"
        ))),
        Settlement::Mismatch(order) => Err(poison_mismatch(answer, &order)),
    }
}

/// A refund Payments made: REFUNDING -> REFUNDED, or a CANCELLED order's money is back.
async fn record_refund(txn: &DatabaseTransaction, answer: &Answer) -> Result<Applied, HandleError> {
    let (id, user, amount) = (answer.order_id, &answer.user_id, answer.amount);
    if let Some(order) = store::refund_completed(txn, id, user, amount).await? {
        events::notify_changed(txn, &order).await?;
        tracing::info!(order_id = %id, status = order.status.as_str(), "refund recorded");
        return Ok(Applied::Nothing);
    }
    match store::find_order(txn, id).await? {
        None => Err(HandleError::poison(format!("refund of unknown order {id}"))),
        Some(order) if order.user_id != *user || order.amount != amount => {
            Err(poison_mismatch(answer, &order))
        }
        Some(order) if order.refund == Refund::None => Err(HandleError::poison(format!(
            "refund of order {id}, for which none was asked"
        ))),
        // Recorded already: a second answer for the same refund.
        Some(_) => Ok(Applied::Nothing),
    }
}

/// Cancels orders still NEW after `timeout` (reason payment_timeout), every `interval`, until
/// `shutdown`. Any number of instances may run it: each order is cancelled once.
pub async fn sweep_overdue(
    db: DatabaseConnection,
    timeout: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let db = &db;
    every(interval, shutdown, move || async move {
        if let Err(error) = sweep_once(db, timeout).await {
            tracing::warn!(%error, "cannot cancel overdue orders");
        }
    })
    .await
}

async fn sweep_once(db: &DatabaseConnection, timeout: Duration) -> Result<(), DbErr> {
    use sea_orm::TransactionTrait;
    loop {
        let txn = db.begin().await?;
        let cancelled = store::cancel_overdue(&txn, timeout, 500).await?;
        for order in &cancelled {
            events::notify_changed(&txn, order).await?;
        }
        txn.commit().await?;
        for order in &cancelled {
            tracing::info!(order_id = %order.id, "no payment answer in time: order cancelled");
        }
        if cancelled.len() < 500 {
            return Ok(());
        }
    }
}
