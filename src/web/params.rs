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

/// A 400 with `code` and the parse error's own words.
pub fn invalid(code: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, error.to_string())
}
