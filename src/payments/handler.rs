//! Payments' side of the saga: a `PaymentRequestedV1` in, one debit (or refusal) and one
//! answer in the outbox; a `RefundRequestedV1` in, one credit back and one answer; each in one
//! transaction with the inbox record.

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tokio::sync::Notify;

use crate::contracts::{
    PaymentFailedV1, PaymentRequestedV1, PaymentSucceededV1, RefundCompletedV1, RefundRequestedV1,
};
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::messaging::consumer::{HandleError, Handler, Incoming};
use crate::messaging::envelope::{Envelope, Message};
use crate::messaging::{inbox, outbox};
use crate::payments::domain::DebitOutcome;
use crate::payments::store::{OrderCharge, RefundOutcome};
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

/// What Orders asks of Payments.
#[derive(Debug, Clone)]
pub enum Request {
    Debit(PaymentRequestedV1),
    Refund(RefundRequestedV1),
}

impl Handler for PaymentRequestHandler {
    type Message = Request;
    type Applied = ();

    fn decode(&self, envelope: &Envelope) -> Result<Request, HandleError> {
        match envelope.message_type.as_str() {
            PaymentRequestedV1::TYPE => envelope
                .payload_as()
                .map(Request::Debit)
                .map_err(HandleError::poison),
            RefundRequestedV1::TYPE => envelope
                .payload_as()
                .map(Request::Refund)
                .map_err(HandleError::poison),
            other => Err(HandleError::poison(format!(
                "unexpected message type {other:?}"
            ))),
        }
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        incoming: Incoming<Request>,
    ) -> Result<(), HandleError> {
        let correlation_id = incoming.correlation_id.as_str();
        match incoming.message {
            Request::Debit(request) => debit(txn, request, correlation_id).await,
            Request::Refund(request) => refund(txn, request, correlation_id).await,
        }
    }

    /// A debit that succeeds, in one statement.
    async fn apply_alone<C: ConnectionTrait + Sync>(
        &self,
        db: &C,
        inbox: Option<inbox::Record<'_>>,
        incoming: &Incoming<Request>,
    ) -> Result<Option<()>, sea_orm::DbErr> {
        let Request::Debit(request) = &incoming.message else {
            return Ok(None);
        };
        let answer = PaymentSucceededV1 {
            order_id: request.order_id,
            user_id: request.user_id.clone(),
            amount: request.amount,
        };
        let answer = outbox::OutboxRow::new(&answer, &incoming.correlation_id)?;
        let charge = charge(request.order_id, &request.user_id, request.amount);
        let debited = store::debit_alone(db, &charge, inbox, answer).await?;
        if debited {
            tracing::debug!(order_id = %request.order_id, "payment decided: debited");
        }
        Ok(debited.then_some(()))
    }

    fn committed(&self, (): ()) {
        self.relay_wake.notify_one();
    }

    /// The accounts of the messages' users.
    async fn lock(
        &self,
        txn: &DatabaseTransaction,
        messages: &[&Request],
    ) -> Result<(), sea_orm::DbErr> {
        let users: Vec<&str> = messages
            .iter()
            .map(|message| match message {
                Request::Debit(request) => request.user_id.as_str(),
                Request::Refund(request) => request.user_id.as_str(),
            })
            .collect();
        store::lock_accounts(txn, &users).await
    }

    /// A debit or refund locks its user's account row.
    fn lock_key(&self, message: &Request) -> String {
        match message {
            Request::Debit(request) => request.user_id.as_str().to_owned(),
            Request::Refund(request) => request.user_id.as_str().to_owned(),
        }
    }
}

fn charge(order_id: uuid::Uuid, user: &UserId, amount: Money) -> OrderCharge<'_> {
    OrderCharge {
        order_id,
        user,
        amount,
    }
}

/// Debits the order once and answers PaymentSucceeded or PaymentFailed.
async fn debit(
    txn: &DatabaseTransaction,
    request: PaymentRequestedV1,
    correlation_id: &str,
) -> Result<(), HandleError> {
    let outcome = store::debit_for_order(
        txn,
        &charge(request.order_id, &request.user_id, request.amount),
    )
    .await?;
    let order_id = request.order_id;
    match outcome {
        DebitOutcome::Debited => {
            let answer = PaymentSucceededV1 {
                order_id,
                user_id: request.user_id,
                amount: request.amount,
            };
            outbox::enqueue(txn, SCHEMA, &answer, correlation_id).await?;
        }
        DebitOutcome::Refused(reason) => {
            let answer = PaymentFailedV1 {
                order_id,
                user_id: request.user_id,
                amount: request.amount,
                reason,
            };
            outbox::enqueue(txn, SCHEMA, &answer, correlation_id).await?;
        }
    }
    tracing::debug!(%order_id, ?outcome, "payment decided");
    Ok(())
}

/// Gives the order's debit back once and answers RefundCompleted (again, for a repeated
/// request: the answer is idempotent on Orders' side).
async fn refund(
    txn: &DatabaseTransaction,
    request: RefundRequestedV1,
    correlation_id: &str,
) -> Result<(), HandleError> {
    let order_id = request.order_id;
    let refund = charge(order_id, &request.user_id, request.amount);
    let outcome = store::refund_order(txn, &refund).await?;
    if outcome == RefundOutcome::NotDebited {
        return Err(HandleError::poison(format!(
            "refund of order {order_id}, which was not debited for {} and {}",
            request.user_id, request.amount
        )));
    }
    let answer = RefundCompletedV1 {
        order_id,
        user_id: request.user_id,
        amount: request.amount,
    };
    outbox::enqueue(txn, SCHEMA, &answer, correlation_id).await?;
    tracing::info!(%order_id, ?outcome, "refund decided");
    Ok(())
}
