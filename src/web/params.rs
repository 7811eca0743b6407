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

        #[cfg(test)]
        impl $name {
            /// The pattern the spec gives this parameter.
            pub(crate) fn pattern() -> String {
                let schema = <Self as poem_openapi::types::Type>::schema_ref();
                match schema {
                    poem_openapi::registry::MetaSchemaRef::Inline(schema) => {
                        schema.pattern.clone().unwrap_or_default()
                    }
                    poem_openapi::registry::MetaSchemaRef::Reference(_) => String::new(),
                }
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
    /// The pattern is exactly the set `Money::parse_amount` accepts (leading zeros included),
    /// so a generator that follows it never sends an amount Gozon refuses, and one that breaks
    /// it is always refused.
    AmountParam {
        description: Some("An amount greater than 0 and at most 1000000000.00: digits, and at most two decimals after a dot ('200', '12.50')."),
        pattern: Some(AMOUNT_PATTERN.to_owned()),
        min_length: Some(1),
        example: Some(serde_json::json!("12.50")),
    }
);

/// (0, 1 000 000 000.00] with at most two decimals: 1-9 significant whole digits, or exactly
/// 1000000000 (.0, .00), or a fraction of one with at least one non-zero digit.
const AMOUNT_PATTERN: &str =
    "^(?:0*[1-9][0-9]{0,8}(?:\\.[0-9]{1,2})?|0*1000000000(?:\\.00?)?|0+\\.(?:0[1-9]|[1-9][0-9]?))$";

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
        pattern: Some("^0*(?:[1-9][0-9]{0,2}|1000)$".to_owned()),
        min_length: Some(1),
        example: Some(serde_json::json!("100")),
    }
);

described_param!(
    /// `cursor` of the order list: where the next page starts.
    OrderCursorParam {
        description: Some("The `next_cursor` of the previous page, as it was returned (microseconds, '_', an order id); absent for the first page."),
        pattern: Some("^(?:0|[1-9][0-9]{0,15})_[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$".to_owned()),
        min_length: Some(38),
        max_length: Some(53),
        example: Some(serde_json::json!("1764574200000000_0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a")),
    }
);

described_param!(
    /// `cursor` of the ledger: where the next page starts.
    LedgerCursorParam {
        description: Some("The `next_cursor` of the previous page, as it was returned (a ledger entry id); absent for the first page."),
        pattern: Some("^[1-9][0-9]{0,17}$".to_owned()),
        min_length: Some(1),
        max_length: Some(18),
        example: Some(serde_json::json!("1042")),
    }
);

described_param!(
    /// `Idempotency-Key`: 1-255 visible ASCII characters.
    IdempotencyKeyParam {
        description: Some("Optional: 1-255 visible ASCII characters (a UUID, for instance). A retry with the same key and parameters gets the first response and has no second effect; the same key with other parameters is refused with 422."),
        pattern: Some("^[!-~]{1,255}$".to_owned()),
        min_length: Some(1),
        max_length: Some(255),
        example: Some(serde_json::json!("9b2f6c1e-3d4a-4f5b-8c7d-1e2f3a4b5c6d")),
    }
);

/// Checks that a parameter's `pattern` in the spec is exactly what its parser accepts: every
/// string the pattern generates is accepted, and strings over `alphabet` (random, and near
/// misses of the pattern's own) are accepted exactly when they match it.
#[cfg(test)]
pub(crate) fn assert_pattern_is_the_parser(
    pattern: &str,
    alphabet: &str,
    accepts: impl Fn(&str) -> bool,
) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let regex = regex::Regex::new(pattern).expect("the pattern compiles");
    // Generation knows no anchors; the patterns all match the whole text.
    let body = pattern.trim_start_matches('^').trim_end_matches('$');
    let generated = proptest::string::string_regex(body).expect("the pattern generates");
    let chars: Vec<char> = alphabet.chars().collect();
    let mut runner = TestRunner::new(Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&generated, |text| {
            prop_assert!(accepts(&text), "{text:?} matches {pattern} but is refused");
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
    let random = proptest::collection::vec(proptest::sample::select(chars.clone()), 0..24)
        .prop_map(|chars| chars.into_iter().collect::<String>());
    let near_miss = (
        generated,
        any::<prop::sample::Index>(),
        proptest::sample::select(chars),
        0..3u8,
    )
        .prop_map(|(text, at, c, edit)| {
            let mut chars: Vec<char> = text.chars().collect();
            let at = if chars.is_empty() {
                0
            } else {
                at.index(chars.len())
            };
            match edit {
                0 => chars.insert(at, c),
                1 if !chars.is_empty() => chars[at] = c,
                _ if !chars.is_empty() => {
                    chars.remove(at);
                }
                _ => chars.push(c),
            }
            chars.into_iter().collect::<String>()
        });
    for strategy in [random.boxed(), near_miss.boxed()] {
        runner
            .run(&strategy, |text| {
                prop_assert_eq!(
                    regex.is_match(&text),
                    accepts(&text),
                    "{:?}: pattern {} and parser disagree",
                    text,
                    pattern
                );
                Ok(())
            })
            .unwrap_or_else(|failure| panic!("{failure}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECIMAL: &str = "0123456789.0019-+ e";

    #[test]
    fn the_amount_pattern_is_the_parser() {
        assert_pattern_is_the_parser(&AmountParam::pattern(), DECIMAL, |text| {
            parse_amount(text).is_ok()
        });
        for edge in ["1000000000", "1000000000.00", "0.01", "000000000001.5"] {
            assert!(parse_amount(edge).is_ok(), "{edge}");
        }
    }

    #[test]
    fn the_user_id_pattern_is_the_parser() {
        let pattern = UserIdParam::pattern();
        assert_pattern_is_the_parser(&pattern, "aZ09._-/ %é", |text| parse_user_id(text).is_ok());
    }

    #[test]
    fn the_limit_pattern_is_the_parser() {
        let pattern = LimitParam::pattern();
        assert_pattern_is_the_parser(&pattern, "0123456789+-. ", |text| {
            parse_limit(Some(text)).is_ok()
        });
    }

    #[test]
    fn the_idempotency_key_pattern_is_the_parser() {
        let pattern = IdempotencyKeyParam::pattern();
        assert_pattern_is_the_parser(&pattern, "a-Z~! \t\u{7f}é0", |text| {
            crate::web::idempotency::IdempotencyKey::parse(text).is_ok()
        });
    }
}
