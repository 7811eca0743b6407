//! What Orders knows: an order, its id and the states its saga moves it through.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::contracts::PaymentFailureReason;
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;

/// An order's id: a UUID (version 7, so ids sort by creation time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrderId(Uuid);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("id must be an order id (a UUID such as 0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a)")]
pub struct OrderIdError;

impl OrderId {
    pub fn generate() -> OrderId {
        OrderId(Uuid::now_v7())
    }

    /// Accepts the hyphenated UUID form only, in any case.
    pub fn parse(text: &str) -> Result<OrderId, OrderIdError> {
        if text.len() != 36 {
            return Err(OrderIdError);
        }
        Uuid::try_parse(text).map(OrderId).map_err(|_| OrderIdError)
    }

    pub fn from_uuid(id: Uuid) -> OrderId {
        OrderId(id)
    }

    pub fn as_uuid(self) -> Uuid {
        self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An order's life:
///
/// ```text
/// NEW --paid--> FINISHED --cancel--> REFUNDING --refunded--> REFUNDED
///  |--refused (no_account, insufficient_funds)--> CANCELLED
///  |--cancel (cancelled_by_user)----------------> CANCELLED
///  '--no answer in time (payment_timeout)-------> CANCELLED
/// ```
/// A debit that still lands on a CANCELLED order is refunded; the order stays CANCELLED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderStatus {
    New,
    Finished,
    Cancelled(CancelReason),
    Refunding,
    Refunded,
}

/// Why an order was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    NoAccount,
    InsufficientFunds,
    CancelledByUser,
    PaymentTimeout,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::NoAccount => "no_account",
            CancelReason::InsufficientFunds => "insufficient_funds",
            CancelReason::CancelledByUser => "cancelled_by_user",
            CancelReason::PaymentTimeout => "payment_timeout",
        }
    }

    pub fn parse(text: &str) -> Option<CancelReason> {
        [
            CancelReason::NoAccount,
            CancelReason::InsufficientFunds,
            CancelReason::CancelledByUser,
            CancelReason::PaymentTimeout,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

impl From<PaymentFailureReason> for CancelReason {
    fn from(reason: PaymentFailureReason) -> Self {
        match reason {
            PaymentFailureReason::NoAccount => CancelReason::NoAccount,
            PaymentFailureReason::InsufficientFunds => CancelReason::InsufficientFunds,
        }
    }
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::New => "NEW",
            OrderStatus::Finished => "FINISHED",
            OrderStatus::Cancelled(_) => "CANCELLED",
            OrderStatus::Refunding => "REFUNDING",
            OrderStatus::Refunded => "REFUNDED",
        }
    }

    pub fn reason(self) -> Option<CancelReason> {
        match self {
            OrderStatus::Cancelled(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Whether an order's debited money is being given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refund {
    None,
    /// Asked of Payments, not yet confirmed.
    Requested,
    Refunded,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub user_id: UserId,
    pub amount: Money,
    pub status: OrderStatus,
    pub refund: Refund,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a page of a user's orders (newest first) ends: the last order's creation time and id.
/// Shown to clients as `<microseconds since the epoch>_<id>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderCursor {
    pub created_at: DateTime<Utc>,
    pub id: OrderId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor must be a next_cursor this API returned")]
pub struct OrderCursorError;

impl OrderCursor {
    pub fn after(order: &Order) -> OrderCursor {
        OrderCursor {
            created_at: order.created_at,
            id: order.id,
        }
    }

    pub fn parse(text: &str) -> Result<OrderCursor, OrderCursorError> {
        let (micros, id) = text.split_once('_').ok_or(OrderCursorError)?;
        // Plain digits as Display writes them (no sign, no leading zero, at most 16 digits:
        // until the year 2286), so the pattern in the spec describes exactly what is accepted.
        let plain = micros == "0" || !micros.starts_with('0');
        if !plain
            || micros.is_empty()
            || micros.len() > 16
            || !micros.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(OrderCursorError);
        }
        let micros: i64 = micros.parse().map_err(|_| OrderCursorError)?;
        let created_at = DateTime::from_timestamp_micros(micros).ok_or(OrderCursorError)?;
        let id = OrderId::parse(id).map_err(|_| OrderCursorError)?;
        Ok(OrderCursor { created_at, id })
    }
}

impl fmt::Display for OrderCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.created_at.timestamp_micros(), self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_ids_are_hyphenated_uuids_only() {
        let id = OrderId::generate();
        assert_eq!(OrderId::parse(&id.to_string()), Ok(id));
        assert_eq!(OrderId::parse(&id.to_string().to_uppercase()), Ok(id));
        for bad in [
            "",
            "42",
            "not-a-uuid",
            "0190f5c28c1e7a9bb7a11f2e3d4c5b6a",
            "{0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a}",
            "0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6g",
            "' OR 1=1 --",
        ] {
            assert_eq!(OrderId::parse(bad), Err(OrderIdError), "{bad:?}");
        }
    }

    #[test]
    fn a_cursor_reads_back_as_itself() {
        let cursor = OrderCursor {
            created_at: DateTime::from_timestamp_micros(1_795_632_387_123_456).unwrap(),
            id: OrderId::generate(),
        };
        assert_eq!(OrderCursor::parse(&cursor.to_string()), Ok(cursor));
        for bad in [
            "",
            "_",
            "12_not-a-uuid",
            "x_0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a",
        ] {
            assert_eq!(OrderCursor::parse(bad), Err(OrderCursorError), "{bad:?}");
        }
    }
}
