//! Payments over HTTP: create an account, top it up, read its balance and its ledger.

use poem::http::StatusCode;
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use sea_orm::{DatabaseConnection, TransactionTrait};

use crate::api_errors;
use crate::http::{
    ApiError, ErrorBody, parse_amount, parse_idempotency_key, parse_user_id, remember_response,
    replay_if_seen,
};
use crate::payments::domain::{Account, EntryKind, LedgerEntry};
use crate::payments::{PaymentsError, SCHEMA, store};

#[derive(Tags)]
enum Tag {
    /// Accounts and their balances.
    Payments,
}

pub struct PaymentsApi {
    db: DatabaseConnection,
}

impl PaymentsApi {
    pub fn new(db: DatabaseConnection) -> PaymentsApi {
        PaymentsApi { db }
    }

    /// An instance that can describe the API but not serve it (for `gozon openapi`).
    pub fn spec_only() -> PaymentsApi {
        PaymentsApi {
            db: DatabaseConnection::default(),
        }
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
}

/// One balance change.
#[derive(Debug, Object)]
pub struct LedgerEntryBody {
    pub id: i64,
    pub kind: EntryKindBody,
    /// Always positive; `kind` says which way it went.
    pub amount: String,
    /// The order paid, for a debit.
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
            },
            amount: entry.amount.to_string(),
            order_id: entry.order_id,
            balance_after: entry.balance_after.to_string(),
            created_at: entry.created_at,
        }
    }
}

/// An account's ledger, newest first.
#[derive(Debug, Object)]
pub struct LedgerBody {
    pub user_id: String,
    pub balance: String,
    pub transactions: Vec<LedgerEntryBody>,
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
            PaymentsError::Store(error) => ApiError::from_db(&error),
        }
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "CreateAccountResponse::bad_request")]
pub enum CreateAccountResponse {
    /// The new account, with balance 0.00.
    #[oai(status = 201)]
    Created(Json<AccountBody>),
    /// `user_id` or `Idempotency-Key` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The user already has an account (`account_exists`).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The Idempotency-Key was used before with another user id (`idempotency_key_reused`).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(CreateAccountResponse { 409 => Conflict, 422 => Unprocessable });

#[derive(ApiResponse)]
#[oai(bad_request_handler = "AddFundsResponse::bad_request")]
pub enum AddFundsResponse {
    /// The account with its new balance.
    #[oai(status = 200)]
    Ok(Json<AccountBody>),
    /// `user_id`, `amount` or `Idempotency-Key` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The user has no account (`account_not_found`).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The balance would exceed what an account can hold (`balance_limit_exceeded`), or the
    /// Idempotency-Key was used before with other parameters (`idempotency_key_reused`).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(AddFundsResponse { 404 => NotFound, 422 => Unprocessable });

#[derive(ApiResponse)]
#[oai(bad_request_handler = "BalanceResponse::bad_request")]
pub enum BalanceResponse {
    /// The account and its balance.
    #[oai(status = 200)]
    Ok(Json<AccountBody>),
    /// `user_id` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The user has no account (`account_not_found`).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(BalanceResponse { 404 => NotFound });

#[derive(ApiResponse)]
#[oai(bad_request_handler = "LedgerResponse::bad_request")]
pub enum LedgerResponse {
    /// The account's balance changes, newest first (at most 1000).
    #[oai(status = 200)]
    Ok(Json<LedgerBody>),
    /// `user_id` is missing or malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The user has no account (`account_not_found`).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
api_errors!(LedgerResponse { 404 => NotFound });

const LEDGER_LIMIT: u64 = 1000;

#[OpenApi]
impl PaymentsApi {
    /// Create an account with balance 0.00.
    #[oai(
        path = "/api/payments/create_account",
        method = "post",
        tag = "Tag::Payments"
    )]
    async fn create_account(
        &self,
        user_id: Query<String>,
        /// Optional: a retry with the same key gets the first response and creates nothing.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> CreateAccountResponse {
        let result: Result<AccountBody, ApiError> = async {
            let user = parse_user_id(&user_id)?;
            let key = parse_idempotency_key(idempotency_key.0.as_deref())?;
            let fingerprint = format!("user_id={user}");
            let endpoint = "create_account";
            let txn = self.db.begin().await.map_err(PaymentsError::from)?;
            if let Some(replay) =
                replay_if_seen(&txn, SCHEMA, endpoint, key.as_ref(), &fingerprint).await?
            {
                return Ok(replay);
            }
            let account: AccountBody = store::create_account(&txn, &user)
                .await
                .map_err(PaymentsError::from)?
                .ok_or(PaymentsError::AccountExists)?
                .into();
            remember_response(
                &txn,
                SCHEMA,
                endpoint,
                key.as_ref(),
                StatusCode::CREATED,
                &account,
            )
            .await?;
            txn.commit().await.map_err(PaymentsError::from)?;
            Ok(account)
        }
        .await;
        match result {
            Ok(account) => CreateAccountResponse::Created(Json(account)),
            Err(error) => error.into(),
        }
    }

    /// Add money to an account. `amount` is a decimal such as `200` or `12.50`: greater than
    /// 0, at most 2 decimals, at most 1000000000.00.
    #[oai(
        path = "/api/payments/add_funds",
        method = "post",
        tag = "Tag::Payments"
    )]
    async fn add_funds(
        &self,
        user_id: Query<String>,
        amount: Query<String>,
        /// Optional: a retry with the same key gets the first response and adds nothing.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> AddFundsResponse {
        let result: Result<AccountBody, ApiError> = async {
            let user = parse_user_id(&user_id)?;
            let amount = parse_amount(&amount)?;
            let key = parse_idempotency_key(idempotency_key.0.as_deref())?;
            let fingerprint = format!("user_id={user}&amount={amount}");
            let endpoint = "add_funds";
            let txn = self.db.begin().await.map_err(PaymentsError::from)?;
            if let Some(replay) =
                replay_if_seen(&txn, SCHEMA, endpoint, key.as_ref(), &fingerprint).await?
            {
                return Ok(replay);
            }
            let account: AccountBody = match store::top_up(&txn, &user, amount)
                .await
                .map_err(PaymentsError::from)?
            {
                store::TopUp::Credited(account) => account.into(),
                store::TopUp::NoAccount => return Err(PaymentsError::AccountNotFound.into()),
                store::TopUp::LimitExceeded => return Err(PaymentsError::BalanceLimit.into()),
            };
            remember_response(
                &txn,
                SCHEMA,
                endpoint,
                key.as_ref(),
                StatusCode::OK,
                &account,
            )
            .await?;
            txn.commit().await.map_err(PaymentsError::from)?;
            Ok(account)
        }
        .await;
        match result {
            Ok(account) => AddFundsResponse::Ok(Json(account)),
            Err(error) => error.into(),
        }
    }

    /// Read an account's balance.
    #[oai(path = "/api/payments/balance", method = "get", tag = "Tag::Payments")]
    async fn balance(&self, user_id: Query<String>) -> BalanceResponse {
        let result: Result<Account, ApiError> = async {
            let user = parse_user_id(&user_id)?;
            store::find_account(&self.db, &user)
                .await
                .map_err(PaymentsError::from)?
                .ok_or_else(|| PaymentsError::AccountNotFound.into())
        }
        .await;
        match result {
            Ok(account) => BalanceResponse::Ok(Json(account.into())),
            Err(error) => error.into(),
        }
    }

    /// Read an account's ledger: every top-up and debit, newest first.
    #[oai(
        path = "/api/payments/transactions",
        method = "get",
        tag = "Tag::Payments"
    )]
    async fn transactions(&self, user_id: Query<String>) -> LedgerResponse {
        let result: Result<LedgerBody, ApiError> = async {
            let user = parse_user_id(&user_id)?;
            let account = store::find_account(&self.db, &user)
                .await
                .map_err(PaymentsError::from)?
                .ok_or(PaymentsError::AccountNotFound)?;
            let entries = store::ledger(&self.db, &user, LEDGER_LIMIT)
                .await
                .map_err(PaymentsError::from)?;
            Ok(LedgerBody {
                user_id: account.user_id.to_string(),
                balance: account.balance.to_string(),
                transactions: entries.into_iter().map(LedgerEntryBody::from).collect(),
            })
        }
        .await;
        match result {
            Ok(ledger) => LedgerResponse::Ok(Json(ledger)),
            Err(error) => error.into(),
        }
    }
}
