//! Payments: accounts per user (create, top up, balance) and the debit of each order, exactly once.
//!
//! Owns the `payments` schema. Hears of orders only through `PaymentRequestedV1` messages and
//! answers only through its outbox.

pub mod api;
pub mod domain;
pub mod handler;
pub mod store;

use crate::messaging::amqp::QueueSpec;

pub const SCHEMA: &str = "payments";

/// The queue Payments consumes: requests to debit an order.
pub const PAYMENT_REQUESTS: QueueSpec = QueueSpec {
    suffix: "payments.payment-requests",
    message_types: &[<crate::contracts::PaymentRequestedV1 as crate::contracts::Contract>::TYPE],
};

#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    #[error("an account for this user already exists")]
    AccountExists,
    #[error("this user has no account")]
    AccountNotFound,
    #[error("the top-up would take the balance past the largest amount an account can hold")]
    BalanceLimit,
    #[error(transparent)]
    Store(#[from] sea_orm::DbErr),
}
