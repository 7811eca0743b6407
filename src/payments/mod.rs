//! Payments: accounts per user (create, top up, balance) and the debit of each order, exactly once.
//!
//! Owns the `payments` schema. Hears of orders only through `PaymentRequestedV1` messages and
//! answers only through its outbox.

pub mod api;
pub mod domain;
pub mod handler;
pub mod store;

use crate::contracts::{PaymentRequestedV1, RefundRequestedV1};
use crate::messaging::amqp::QueueSpec;
use crate::messaging::envelope::Message;

/// The schema Payments owns, as its migrator names it.
pub const SCHEMA: &str = migrations::Context::Payments.schema();

/// The queue Payments consumes: requests to debit an order, and to refund one. Its name is also the inbox's
/// consumer name.
pub const PAYMENT_REQUESTS: QueueSpec = QueueSpec {
    owner: "payments",
    suffix: "payments.payment-requests",
    message_types: &[PaymentRequestedV1::TYPE, RefundRequestedV1::TYPE],
};

#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    #[error("an account for this user already exists")]
    AccountExists,
    #[error("this user has no account")]
    AccountNotFound,
    #[error("the top-up would take the balance past the largest amount an account can hold")]
    BalanceLimit,
}
