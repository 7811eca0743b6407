//! Orders: create an order, read it, list a user's; and orchestrate its payment saga.
//!
//! Owns the `orders` schema. Asks Payments for money only through its outbox
//! (`PaymentRequestedV1`) and learns the answer only from its inbox.

pub mod api;
pub mod domain;
pub mod events;
pub mod saga;
pub mod store;

use crate::contracts::{PaymentFailedV1, PaymentSucceededV1, RefundCompletedV1};
use crate::messaging::amqp::QueueSpec;
use crate::messaging::envelope::Message;

/// The schema Orders owns, as its migrator names it.
pub const SCHEMA: &str = migrations::Context::Orders.schema();

/// The queue Orders consumes: Payments' answers. Its name is also the inbox's consumer name.
pub const PAYMENT_RESULTS: QueueSpec = QueueSpec {
    owner: "orders",
    suffix: "orders.payment-results",
    message_types: &[
        PaymentSucceededV1::TYPE,
        PaymentFailedV1::TYPE,
        RefundCompletedV1::TYPE,
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("no order has this id")]
    OrderNotFound,
    #[error("this user already has {0} orders awaiting payment; wait for them to settle")]
    TooManyNewOrders(u32),
}
