//! Payments over HTTP: create an account, top it up, read its balance and its ledger.

use poem::http::StatusCode;
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use sea_orm::{DatabaseConnection, DatabaseTransaction};

use crate::kernel::coalesce::{BatchLoad, Coalescer, Lanes};
use crate::kernel::user_id::UserId;
use crate::payments::domain::{Account, EntryKind, LedgerEntry};
use crate::payments::{PaymentsError, SCHEMA, store};
use crate::statuses;
use crate::web::auth::{Caller, FORBIDDEN_DOC, TOP_UP_SCOPE, UNAUTHORIZED_DOC};
use crate::web::error::{ApiError, INTERNAL_DOC, Reply};
use crate::web::idempotency::IdempotentPost;
use crate::web::params::{
    AmountParam, IdempotencyKeyParam, LedgerCursorParam, LimitParam, UserIdParam, invalid,
    parse_amount, parse_limit,
};

#[derive(Tags)]
enum Tag {
    /// Accounts and their balances.
    Payments,
}

pub struct PaymentsApi {
    db: DatabaseConnection,
    /// GET balance: concurrent reads share one SELECT.
    balances: Coalescer<UserId, Account, AccountReads>,
}

impl PaymentsApi {
    pub fn new(db: DatabaseConnection) -> PaymentsApi {
        PaymentsApi {
            balances: Coalescer::new(AccountReads(db.clone()), Lanes::READS),
            db,
        }
    }

    /// An instance that can describe the API but not serve it (for `gozon openapi`).
    pub fn spec_only() -> PaymentsApi {
        PaymentsApi::new(DatabaseConnection::default())
    }
}

/// Loads the accounts a batch of GETs asks for.
struct AccountReads(DatabaseConnection);

impl BatchLoad<UserId, Account> for AccountReads {
    type Error = ApiError;
    async fn load(&self, users: Vec<UserId>) -> Result<Vec<(UserId, Account)>, ApiError> {
        let accounts = store::find_accounts(&self.0, &users).await?;
        Ok(accounts
            .into_iter()
            .map(|account| (account.user_id.clone(), account))
            .collect())
    }
}

/// A user's account.
#[derive(Debug, Object)]
pub struct AccountBody {
    pub user_id: String,
    /// The balance, as a decimal string with two decimals.
    pub balance: String,
}

impl From<Account> for AccountBody {
    fn from(account: Account) -> Self {
        AccountBody {
            user_id: account.user_id.to_string(),
            balance: account.balance.to_string(),
        }
    }
}

#[derive(Debug, Enum)]
#[oai(rename_all = "snake_case")]
pub enum EntryKindBody {
    TopUp,
    Debit,
    Refund,
}

/// One balance change.
#[derive(Debug, Object)]
pub struct LedgerEntryBody {
    pub id: i64,
    pub kind: EntryKindBody,
    /// Always positive; `kind` says which way it went.
    pub amount: String,
    /// The order paid, for a debit; refunded, for a refund.
    #[oai(nullable)]
    pub order_id: Option<uuid::Uuid>,
    pub balance_after: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<LedgerEntry> for LedgerEntryBody {
    fn from(entry: LedgerEntry) -> Self {
        LedgerEntryBody {
            id: entry.id,
            kind: match entry.kind {
                EntryKind::TopUp => EntryKindBody::TopUp,
                EntryKind::Debit => EntryKindBody::Debit,
                EntryKind::Refund => EntryKindBody::Refund,
            },
            amount: entry.amount.to_string(),
            order_id: entry.order_id,
            balance_after: entry.balance_after.to_string(),
            created_at: entry.created_at,
        }
    }
}

/// A ledger cursor: a positive entry id in plain digits (no sign, no leading zero), as
/// `next_cursor` gives it and its pattern in the spec says.
fn parse_ledger_cursor(text: &str) -> Option<i64> {
    let plain = !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit());
    (plain && text.len() <= 18)
        .then(|| text.parse::<i64>().ok())
        .flatten()
}

/// A page of an account's ledger, newest first.
#[derive(Debug, Object)]
pub struct LedgerBody {
    pub user_id: String,
    pub balance: String,
    pub transactions: Vec<LedgerEntryBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

impl From<PaymentsError> for ApiError {
    fn from(error: PaymentsError) -> Self {
        match error {
            PaymentsError::AccountExists => {
                ApiError::new(StatusCode::CONFLICT, "account_exists", error.to_string())
            }
            PaymentsError::AccountNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "account_not_found",
                error.to_string(),
            ),
            PaymentsError::BalanceLimit => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "balance_limit_exceeded",
                error.to_string(),
            ),
        }
    }
}

statuses!(CreateAccount:
    201 => "The new account, with balance 0.00.",
    400 => "`user_id` or `Idempotency-Key` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => FORBIDDEN_DOC,
    409 => "The user already has an account (`account_exists`).",
    422 => "The Idempotency-Key was used before with another user id (`idempotency_key_reused`).",
    429 => "Too many requests (`rate_limited`, with `Retry-After`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable; retry later.",
);

statuses!(AddFunds:
    200 => "The account with its new balance.",
    400 => "`user_id`, `amount` or `Idempotency-Key` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => "With `--auth jwt`: the token does not act for this user (`forbidden`), or lacks the\n\
            `payments:top_up` scope (`insufficient_scope`).",
    404 => "The user has no account (`account_not_found`).",
    422 => "The balance would exceed what an account can hold (`balance_limit_exceeded`), or the\n\
            Idempotency-Key was used before with other parameters (`idempotency_key_reused`).",
    429 => "Too many requests (`rate_limited`, with `Retry-After`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable; retry later.",
);

statuses!(Balance:
    200 => "The account and its balance.",
    400 => "`user_id` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => FORBIDDEN_DOC,
    404 => "The user has no account (`account_not_found`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable, or did not answer in time; retry later.",
);

statuses!(Ledger:
    200 => "A page of the account's balance changes, newest first, and the cursor of the next page.",
    400 => "`user_id`, `limit` or `cursor` is missing or malformed.",
    401 => UNAUTHORIZED_DOC,
    403 => FORBIDDEN_DOC,
    404 => "The user has no account (`account_not_found`).",
    500 => INTERNAL_DOC,
    503 => "The database is unreachable; retry later.",
);

const CREATE_ACCOUNT: IdempotentPost = IdempotentPost {
    schema: SCHEMA,
    endpoint: "create_account",
    status: StatusCode::CREATED,
};

const ADD_FUNDS: IdempotentPost = IdempotentPost {
    schema: SCHEMA,
    endpoint: "add_funds",
    status: StatusCode::OK,
};

#[OpenApi(prefix_path = "/api/payments", tag = "Tag::Payments")]
impl PaymentsApi {
    /// Create an account with balance 0.00.
    #[oai(path = "/create_account", method = "post")]
    async fn create_account(
        &self,
        caller: Caller,
        user_id: Query<UserIdParam>,
        /// Optional: a retry with the same key gets the first response and creates nothing.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<IdempotencyKeyParam>>,
    ) -> Reply<Json<AccountBody>, CreateAccount> {
        let open = async {
            let user = caller.acting_for(&user_id)?;
            let create = async |txn: &DatabaseTransaction| {
                let account = store::create_account(txn, &user).await?;
                Ok(AccountBody::from(
                    account.ok_or(PaymentsError::AccountExists)?,
                ))
            };
            let fingerprint = format!("user_id={user}");
            CREATE_ACCOUNT
                .run(
                    &self.db,
                    &caller,
                    idempotency_key.as_deref(),
                    &fingerprint,
                    create,
                )
                .await
        };
        open.await.map(Json).into()
    }

    /// Add money to an account. `amount` is a decimal such as `200` or `12.50`: greater than
    /// 0, at most 2 decimals, at most 1000000000.00.
    #[oai(path = "/add_funds", method = "post")]
    async fn add_funds(
        &self,
        caller: Caller,
        user_id: Query<UserIdParam>,
        amount: Query<AmountParam>,
        /// Optional: a retry with the same key gets the first response and adds nothing.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<IdempotencyKeyParam>>,
    ) -> Reply<Json<AccountBody>, AddFunds> {
        let top_up = async {
            let user = caller.acting_with_scope(&user_id, TOP_UP_SCOPE)?;
            let amount = parse_amount(&amount)?;
            let credit =
                async |txn: &DatabaseTransaction| match store::top_up(txn, &user, amount).await? {
                    store::TopUp::Credited(account) => Ok(AccountBody::from(account)),
                    store::TopUp::NoAccount => Err(PaymentsError::AccountNotFound.into()),
                    store::TopUp::LimitExceeded => Err(PaymentsError::BalanceLimit.into()),
                };
            let fingerprint = format!("user_id={user}&amount={amount}");
            ADD_FUNDS
                .run(
                    &self.db,
                    &caller,
                    idempotency_key.as_deref(),
                    &fingerprint,
                    credit,
                )
                .await
        };
        top_up.await.map(Json).into()
    }

    /// Read an account's balance.
    #[oai(path = "/balance", method = "get")]
    async fn balance(
        &self,
        caller: Caller,
        user_id: Query<UserIdParam>,
    ) -> Reply<Json<AccountBody>, Balance> {
        let read = async {
            let user = caller.acting_for(&user_id)?;
            let account = self.balances.get(user).await?;
            let account = account.ok_or(PaymentsError::AccountNotFound)?;
            Ok::<_, ApiError>(Json(AccountBody::from(account)))
        };
        read.await.into()
    }

    /// Read an account's ledger: every top-up and debit, newest first, a page at a time.
    #[oai(path = "/transactions", method = "get")]
    async fn transactions(
        &self,
        caller: Caller,
        user_id: Query<UserIdParam>,
        /// Entries per page: 1 to 1000, 100 if absent.
        limit: Query<Option<LimitParam>>,
        /// The `next_cursor` of the previous page; absent for the first page.
        cursor: Query<Option<LedgerCursorParam>>,
    ) -> Reply<Json<LedgerBody>, Ledger> {
        let read = async {
            let limit = parse_limit(limit.as_deref())?;
            let before = cursor
                .as_deref()
                .map(parse_ledger_cursor)
                .map(|id| {
                    id.ok_or_else(|| {
                        invalid(
                            "invalid_cursor",
                            "cursor must be a next_cursor this API returned",
                        )
                    })
                })
                .transpose()?;
            let account = self.account(&caller, &user_id).await?;
            let mut entries = store::ledger(&self.db, &account.user_id, before, limit + 1).await?;
            let more = entries.len() as u64 > limit;
            entries.truncate(limit as usize);
            let next_cursor = more
                .then(|| entries.last().map(|last| last.id.to_string()))
                .flatten();
            Ok::<_, ApiError>(Json(LedgerBody {
                user_id: account.user_id.to_string(),
                balance: account.balance.to_string(),
                transactions: entries.into_iter().map(LedgerEntryBody::from).collect(),
                next_cursor,
            }))
        };
        read.await.into()
    }
}

impl PaymentsApi {
    /// The account of the `user_id` parameter, or why there is none.
    async fn account(&self, caller: &Caller, user_id: &str) -> Result<Account, ApiError> {
        let user = caller.acting_for(user_id)?;
        let account = store::find_account(&self.db, &user).await?;
        Ok(account.ok_or(PaymentsError::AccountNotFound)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::params::assert_pattern_is_the_parser;

    #[test]
    fn the_ledger_cursor_pattern_is_the_parser() {
        assert_pattern_is_the_parser(&LedgerCursorParam::pattern(), "0123456789+- .", |text| {
            parse_ledger_cursor(text).is_some()
        });
    }
}
