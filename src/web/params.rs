//! Raw query text becomes the kernel's types here, once, or a 400 that says why.

use poem::http::StatusCode;

use crate::kernel::money::Money;
use crate::kernel::user_id::UserId;
use crate::web::error::ApiError;

/// Parses the `user_id` query parameter, or says why it is not one.
pub fn parse_user_id(text: &str) -> Result<UserId, ApiError> {
    UserId::parse(text).map_err(|error| invalid("invalid_user_id", error))
}

/// Parses the `amount` query parameter, or says why it is not one.
pub fn parse_amount(text: &str) -> Result<Money, ApiError> {
    Money::parse_amount(text).map_err(|error| invalid("invalid_amount", error))
}

/// The page size when a list request names none, and the largest it may name.
pub const DEFAULT_PAGE: u64 = 100;
pub const MAX_PAGE: u64 = 1000;

/// Parses the optional `limit` of a paged list: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] if absent.
pub fn parse_limit(text: Option<&str>) -> Result<u64, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_PAGE);
    };
    text.parse::<u64>()
        .ok()
        .filter(|limit| (1..=MAX_PAGE).contains(limit) && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            invalid(
                "invalid_limit",
                format!("limit must be a whole number from 1 to {MAX_PAGE}"),
            )
        })
}

/// A 400 with `code` and the parse error's own words.
pub fn invalid(code: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, error.to_string())
}
