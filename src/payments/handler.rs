//! Payments' side of the saga: a `PaymentRequestedV1` in, one debit (or refusal) and one
//! answer in the outbox, all in one transaction with the inbox record.

use std::sync::Arc;

use sea_orm::DatabaseTransaction;
use tokio::sync::Notify;

use crate::contracts::{PaymentFailedV1, PaymentRequestedV1, PaymentSucceededV1};
use crate::messaging::consumer::{HandleError, Handler, Incoming};
use crate::messaging::envelope::{Envelope, Message};
use crate::messaging::outbox;
use crate::payments::domain::DebitOutcome;
use crate::payments::{SCHEMA, store};

pub struct PaymentRequestHandler {
    /// Wakes this process's payments outbox relay once the answer is committed.
    relay_wake: Arc<Notify>,
}

impl PaymentRequestHandler {
    pub fn new(relay_wake: Arc<Notify>) -> PaymentRequestHandler {
        PaymentRequestHandler { relay_wake }
    }
}

impl Handler for PaymentRequestHandler {
    type Message = PaymentRequestedV1;
    type Applied = ();

    fn decode(&self, envelope: &Envelope) -> Result<PaymentRequestedV1, HandleError> {
        if envelope.message_type != PaymentRequestedV1::TYPE {
            return Err(HandleError::poison(format!(
                "unexpected message type {:?}",
                envelope.message_type
            )));
        }
        envelope.payload_as().map_err(HandleError::poison)
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        incoming: Incoming<PaymentRequestedV1>,
    ) -> Result<(), HandleError> {
        let request = incoming.message;
        let outcome =
            store::debit_for_order(txn, request.order_id, &request.user_id, request.amount).await?;
        let correlation_id = incoming.correlation_id.as_str();
        match outcome {
            DebitOutcome::Debited => {
                let answer = PaymentSucceededV1 {
                    order_id: request.order_id,
                    user_id: request.user_id,
                    amount: request.amount,
                };
                outbox::enqueue(txn, SCHEMA, &answer, correlation_id).await?;
            }
            DebitOutcome::Refused(reason) => {
                let answer = PaymentFailedV1 {
                    order_id: request.order_id,
                    user_id: request.user_id,
                    amount: request.amount,
                    reason,
                };
                outbox::enqueue(txn, SCHEMA, &answer, correlation_id).await?;
            }
        }
        tracing::info!(order_id = %request.order_id, ?outcome, "payment decided");
        Ok(())
    }

    fn committed(&self, (): ()) {
        self.relay_wake.notify_one();
    }
}
