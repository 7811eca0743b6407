//! Payments' side of the saga: a `PaymentRequestedV1` in, one debit (or refusal) and one
//! answer in the outbox, all in one transaction with the inbox record.

use std::sync::Arc;

use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::Notify;

use crate::contracts::{Contract, PaymentFailedV1, PaymentRequestedV1, PaymentSucceededV1};
use crate::messaging::consumer::{HandleError, Handled, Handler};
use crate::messaging::envelope::Envelope;
use crate::messaging::{inbox, outbox};
use crate::payments::domain::DebitOutcome;
use crate::payments::{SCHEMA, store};

const CONSUMER: &str = "payments.payment-requests";

pub struct PaymentRequestHandler {
    db: DatabaseConnection,
    /// Wakes this process's payments outbox relay once the answer is committed.
    relay_wake: Arc<Notify>,
}

impl PaymentRequestHandler {
    pub fn new(db: DatabaseConnection, relay_wake: Arc<Notify>) -> PaymentRequestHandler {
        PaymentRequestHandler { db, relay_wake }
    }
}

impl Handler for PaymentRequestHandler {
    async fn handle(&self, envelope: Envelope) -> Result<Handled, HandleError> {
        if envelope.message_type != PaymentRequestedV1::TYPE {
            return Err(HandleError::Poison(format!(
                "unexpected message type {:?}",
                envelope.message_type
            )));
        }
        let request: PaymentRequestedV1 = envelope
            .payload_as()
            .map_err(|error| HandleError::Poison(error.to_string()))?;

        let txn = self.db.begin().await?;
        if !inbox::record_first_delivery(&txn, SCHEMA, CONSUMER, envelope.message_id).await? {
            txn.commit().await?;
            tracing::info!(order_id = %request.order_id, "duplicate payment request ignored");
            return Ok(Handled::Duplicate);
        }
        let outcome =
            store::debit_for_order(&txn, request.order_id, &request.user_id, request.amount)
                .await?;
        let correlation_id = envelope.correlation_id.as_str();
        match outcome {
            DebitOutcome::Debited => {
                let answer = PaymentSucceededV1 {
                    order_id: request.order_id,
                    user_id: request.user_id.clone(),
                    amount: request.amount,
                };
                outbox::enqueue(&txn, SCHEMA, &answer, correlation_id).await?;
            }
            DebitOutcome::Refused(reason) => {
                let answer = PaymentFailedV1 {
                    order_id: request.order_id,
                    user_id: request.user_id.clone(),
                    amount: request.amount,
                    reason,
                };
                outbox::enqueue(&txn, SCHEMA, &answer, correlation_id).await?;
            }
        }
        txn.commit().await?;
        self.relay_wake.notify_one();
        tracing::info!(order_id = %request.order_id, ?outcome, "payment decided");
        Ok(Handled::Applied)
    }
}
