//! What Payments knows: accounts, ledger entries and the outcome of debiting an order.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::contracts::PaymentFailureReason;
use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user_id: UserId,
    pub balance: Money,
}

/// What happened to an order's payment. Decided once per order, then only repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebitOutcome {
    Debited,
    Refused(PaymentFailureReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    TopUp,
    Debit,
    Refund,
}

/// One row of the ledger: every balance change is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub kind: EntryKind,
    pub amount: Money,
    pub order_id: Option<Uuid>,
    pub balance_after: Money,
    pub created_at: DateTime<Utc>,
}
