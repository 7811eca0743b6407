//! The messages Orders and Payments exchange, besides the kernel's value types the only thing
//! the two contexts share. Each type name carries a version (see [`Message`]).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::messaging::envelope::Message;

/// Orders asks Payments to debit the user's account for an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequestedV1 {
    pub order_id: Uuid,
    pub user_id: UserId,
    pub amount: Money,
}

impl Message for PaymentRequestedV1 {
    const TYPE: &'static str = "payment.requested.v1";
}

/// Payments debited the order's amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSucceededV1 {
    pub order_id: Uuid,
    pub user_id: UserId,
    pub amount: Money,
}

impl Message for PaymentSucceededV1 {
    const TYPE: &'static str = "payment.succeeded.v1";
}

/// Payments refused to debit; nothing was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailedV1 {
    pub order_id: Uuid,
    pub user_id: UserId,
    pub amount: Money,
    pub reason: PaymentFailureReason,
}

impl Message for PaymentFailedV1 {
    const TYPE: &'static str = "payment.failed.v1";
}

/// Orders asks Payments to give an order's debited amount back (the order was cancelled or
/// refunded after it was paid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequestedV1 {
    pub order_id: Uuid,
    pub user_id: UserId,
    pub amount: Money,
}

impl Message for RefundRequestedV1 {
    const TYPE: &'static str = "refund.requested.v1";
}

/// Payments credited the order's amount back (once, whatever the redeliveries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundCompletedV1 {
    pub order_id: Uuid,
    pub user_id: UserId,
    pub amount: Money,
}

impl Message for RefundCompletedV1 {
    const TYPE: &'static str = "refund.completed.v1";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentFailureReason {
    NoAccount,
    InsufficientFunds,
}

impl PaymentFailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentFailureReason::NoAccount => "no_account",
            PaymentFailureReason::InsufficientFunds => "insufficient_funds",
        }
    }
}
