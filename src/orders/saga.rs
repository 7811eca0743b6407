//! The payment saga, orchestrated by Orders: an order is created NEW together with its
//! `PaymentRequestedV1` in the outbox; Payments' answer moves it to FINISHED or CANCELLED.

use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait};

use crate::contracts::{Contract, PaymentFailedV1, PaymentRequestedV1, PaymentSucceededV1};
use crate::messaging::consumer::{HandleError, Handled, Handler};
use crate::messaging::envelope::Envelope;
use crate::messaging::{inbox, outbox};
use crate::metrics::Metrics;
use crate::money::Money;
use crate::orders::domain::{Order, OrderId, OrderStatus};
use crate::orders::store::{self, Settlement};
use crate::orders::{SCHEMA, events};
use crate::user_id::UserId;

const CONSUMER: &str = "orders.payment-results";

/// Creates a NEW order and its payment request in the caller's transaction. Once that commits,
/// the caller wakes the outbox relay.
pub async fn place_order(
    txn: &DatabaseTransaction,
    user: &UserId,
    amount: Money,
    correlation_id: &str,
) -> Result<Order, DbErr> {
    let order = store::insert_order(txn, OrderId::new(), user, amount, correlation_id).await?;
    let request = PaymentRequestedV1 {
        order_id: order.id.as_uuid(),
        user_id: user.clone(),
        amount,
    };
    outbox::enqueue(txn, SCHEMA, &request, correlation_id).await?;
    events::notify_changed(txn, order.id).await?;
    tracing::info!(order_id = %order.id, correlation_id, "order placed; payment requested");
    Ok(order)
}

/// Applies Payments' answers to orders.
pub struct PaymentResultHandler {
    db: DatabaseConnection,
    metrics: Metrics,
}

impl PaymentResultHandler {
    pub fn new(db: DatabaseConnection, metrics: Metrics) -> PaymentResultHandler {
        PaymentResultHandler { db, metrics }
    }
}

fn poison(error: impl std::fmt::Display) -> HandleError {
    HandleError::Poison(error.to_string())
}

impl Handler for PaymentResultHandler {
    async fn handle(&self, envelope: Envelope) -> Result<Handled, HandleError> {
        let (order_id, status) = match envelope.message_type.as_str() {
            PaymentSucceededV1::TYPE => {
                let answer: PaymentSucceededV1 = envelope.payload_as().map_err(poison)?;
                (answer.order_id, OrderStatus::Finished)
            }
            PaymentFailedV1::TYPE => {
                let answer: PaymentFailedV1 = envelope.payload_as().map_err(poison)?;
                (answer.order_id, OrderStatus::Cancelled(answer.reason))
            }
            other => return Err(poison(format!("unexpected message type {other:?}"))),
        };
        let order_id = OrderId::from_uuid(order_id);

        let txn = self.db.begin().await?;
        if !inbox::record_first_delivery(&txn, SCHEMA, CONSUMER, envelope.message_id).await? {
            txn.commit().await?;
            tracing::info!(%order_id, "duplicate payment result ignored");
            return Ok(Handled::Duplicate);
        }
        match store::settle_order(&txn, order_id, status).await? {
            Settlement::Settled(order) => {
                events::notify_changed(&txn, order_id).await?;
                txn.commit().await?;
                let took = (order.updated_at - order.created_at).as_seconds_f64();
                self.metrics.saga_settled(took);
                tracing::info!(%order_id, status = order.status.as_str(), saga_seconds = took, "order settled");
                Ok(Handled::Applied)
            }
            Settlement::AlreadyFinal(order) => {
                txn.commit().await?;
                tracing::info!(%order_id, status = order.status.as_str(), "order already final; answer ignored");
                Ok(Handled::Applied)
            }
            // Rolled back with the inbox row: the message goes to the dead-letter queue intact.
            Settlement::Unknown => Err(poison(format!(
                "payment result for unknown order {order_id}"
            ))),
        }
    }
}
