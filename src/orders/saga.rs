//! The payment saga, orchestrated by Orders: an order is created NEW together with its
//! `PaymentRequestedV1` in the outbox; Payments' answer moves it to FINISHED or CANCELLED.

use sea_orm::{DatabaseTransaction, DbErr};

use crate::contracts::{PaymentFailedV1, PaymentRequestedV1, PaymentSucceededV1};
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::messaging::consumer::{HandleError, Handler, Incoming};
use crate::messaging::envelope::{Envelope, Message};
use crate::messaging::outbox;
use crate::ops::metrics::Metrics;
use crate::orders::domain::{Order, OrderId, OrderStatus};
use crate::orders::store::{self, Settlement};
use crate::orders::{SCHEMA, events};

/// Creates a NEW order and its payment request in the caller's transaction. Once that commits,
/// the caller wakes the outbox relay.
pub async fn place_order(
    txn: &DatabaseTransaction,
    user: &UserId,
    amount: Money,
    correlation_id: &str,
) -> Result<Order, DbErr> {
    let order = store::insert_order(txn, OrderId::generate(), user, amount, correlation_id).await?;
    let request = PaymentRequestedV1 {
        order_id: order.id.as_uuid(),
        user_id: user.clone(),
        amount,
    };
    outbox::enqueue(txn, SCHEMA, &request, correlation_id).await?;
    events::notify_changed(txn, &order).await?;
    tracing::info!(order_id = %order.id, correlation_id, "order placed; payment requested");
    Ok(order)
}

/// Payments' answer about one order: the status it moves the order to.
#[derive(Debug, Clone)]
pub struct PaymentResult {
    order_id: OrderId,
    user_id: UserId,
    amount: Money,
    status: OrderStatus,
}

/// Applies Payments' answers to orders.
pub struct PaymentResultHandler {
    metrics: Metrics,
}

impl PaymentResultHandler {
    pub fn new(metrics: Metrics) -> PaymentResultHandler {
        PaymentResultHandler { metrics }
    }
}

impl Handler for PaymentResultHandler {
    type Message = PaymentResult;
    /// The order, if this answer settled it.
    type Applied = Option<Order>;

    fn decode(&self, envelope: &Envelope) -> Result<PaymentResult, HandleError> {
        let result = |order_id, user_id, amount, status| PaymentResult {
            order_id: OrderId::from_uuid(order_id),
            user_id,
            amount,
            status,
        };
        match envelope.message_type.as_str() {
            PaymentSucceededV1::TYPE => {
                let answer: PaymentSucceededV1 =
                    envelope.payload_as().map_err(HandleError::poison)?;
                let status = OrderStatus::Finished;
                Ok(result(
                    answer.order_id,
                    answer.user_id,
                    answer.amount,
                    status,
                ))
            }
            PaymentFailedV1::TYPE => {
                let answer: PaymentFailedV1 = envelope.payload_as().map_err(HandleError::poison)?;
                let status = OrderStatus::Cancelled(answer.reason);
                Ok(result(
                    answer.order_id,
                    answer.user_id,
                    answer.amount,
                    status,
                ))
            }
            other => Err(HandleError::poison(format!(
                "unexpected message type {other:?}"
            ))),
        }
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        incoming: Incoming<PaymentResult>,
    ) -> Result<Option<Order>, HandleError> {
        let PaymentResult {
            order_id,
            user_id,
            amount,
            status,
        } = incoming.message;
        match store::settle_order(txn, order_id, &user_id, amount, status).await? {
            Settlement::Settled(order) => {
                events::notify_changed(txn, &order).await?;
                Ok(Some(order))
            }
            Settlement::AlreadyFinal(order) => {
                tracing::info!(%order_id, status = order.status.as_str(), "order already final; answer ignored");
                Ok(None)
            }
            // Rolled back with the inbox row: the message goes to the dead-letter queue intact.
            Settlement::Unknown => Err(HandleError::poison(format!(
                "payment result for unknown order {order_id}"
            ))),
            Settlement::Mismatch(order) => Err(HandleError::poison(format!(
                "payment result for order {order_id} names {user_id} and {amount}, \
                 but the order is {} for {}",
                order.user_id, order.amount
            ))),
        }
    }

    fn committed(&self, settled: Option<Order>) {
        if let Some(order) = settled {
            let took = (order.updated_at - order.created_at).as_seconds_f64();
            self.metrics.saga_settled(took);
            tracing::info!(order_id = %order.id, status = order.status.as_str(), saga_seconds = took, "order settled");
        }
    }
}
