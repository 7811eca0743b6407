//! Orders: create an order, read it, list a user's; and orchestrate its payment saga.
//!
//! Owns the `orders` schema. Asks Payments for money only through its outbox
//! (`PaymentRequestedV1`) and learns the answer only from its inbox.

pub mod api;
pub mod domain;
pub mod events;
pub mod saga;
pub mod store;

use crate::contracts::{Contract, PaymentFailedV1, PaymentSucceededV1};
use crate::messaging::amqp::QueueSpec;

pub const SCHEMA: &str = "orders";

/// The queue Orders consumes: Payments' answers.
pub const PAYMENT_RESULTS: QueueSpec = QueueSpec {
    suffix: "orders.payment-results",
    message_types: &[PaymentSucceededV1::TYPE, PaymentFailedV1::TYPE],
};

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("no order has this id")]
    OrderNotFound,
    #[error(transparent)]
    Store(#[from] sea_orm::DbErr),
}
