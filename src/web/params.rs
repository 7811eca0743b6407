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

/// A query parameter taken as text, whose OpenAPI schema tells clients the rules its parser
/// enforces (pattern, length, format, an example). The text is parsed by the handler, so a
/// value that breaks the rules gets Gozon's own error code, not a generic one.
macro_rules! described_param {
    ($(#[$meta:meta])* $name:ident { $($field:ident: $value:expr),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name(String);

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl poem_openapi::types::Type for $name {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> std::borrow::Cow<'static, str> {
                "string".into()
            }

            fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
                let mut schema = poem_openapi::registry::MetaSchema::new("string");
                $(schema.$field = $value;)*
                poem_openapi::registry::MetaSchemaRef::Inline(Box::new(schema))
            }

            fn as_raw_value(&self) -> Option<&Self> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
                Box::new(std::iter::once(self))
            }
        }

        impl poem_openapi::types::ParseFromParameter for $name {
            fn parse_from_parameter(value: &str) -> poem_openapi::types::ParseResult<Self> {
                Ok($name(value.to_owned()))
            }
        }
    };
}

described_param!(
    /// `user_id`: 1-64 letters, digits, `-`, `_` or `.`.
    UserIdParam {
        description: Some("The user: 1-64 ASCII letters, digits, '-', '_' or '.' (digits alone are fine)."),
        pattern: Some("^[A-Za-z0-9._-]{1,64}$".to_owned()),
        min_length: Some(1),
        max_length: Some(64),
        example: Some(serde_json::json!("alice")),
    }
);

described_param!(
    /// `amount`: a decimal with at most 2 decimals, greater than 0 and at most 1000000000.00.
    AmountParam {
        description: Some("An amount greater than 0 and at most 1000000000.00: digits, and at most two decimals after a dot ('200', '12.50')."),
        pattern: Some("^[0-9]{1,10}(\\.[0-9]{1,2})?$".to_owned()),
        min_length: Some(1),
        max_length: Some(13),
        example: Some(serde_json::json!("12.50")),
    }
);

described_param!(
    /// `id`: an order id.
    OrderIdParam {
        description: Some("An order id: a UUID in its hyphenated form."),
        format: Some("uuid"),
        pattern: Some("^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$".to_owned()),
        min_length: Some(36),
        max_length: Some(36),
        example: Some(serde_json::json!("0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a")),
    }
);

described_param!(
    /// `limit`: a page size.
    LimitParam {
        description: Some("Items per page: a whole number from 1 to 1000; 100 if absent."),
        pattern: Some("^[0-9]{1,4}$".to_owned()),
        example: Some(serde_json::json!("100")),
    }
);

described_param!(
    /// `cursor`: where the next page starts.
    CursorParam {
        description: Some("The `next_cursor` of the previous page, as it was returned; absent for the first page."),
        min_length: Some(1),
        max_length: Some(128),
    }
);
