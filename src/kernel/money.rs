//! Money: an exact amount in minor units (cents), parsed from text and shown as "12.50".

use std::fmt;

/// The largest amount one request may carry: 1 000 000 000.00.
pub const MAX_REQUEST_MINOR: i64 = 100_000_000_000;

/// A non-negative amount of money in minor units. Never a float.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must be a number like 200 or 12.50 (digits, at most 2 decimals)")]
    Malformed,
    #[error("amount must be greater than 0")]
    NotPositive,
    #[error("amount must be at most 1000000000.00")]
    TooLarge,
}

impl Money {
    /// Parses an amount a client sent: `200`, `12.5`, `12.50`; greater than 0 and at most
    /// [`MAX_REQUEST_MINOR`]. Anything else (signs, spaces, exponents, hex, `NaN`, three
    /// decimals, a trailing dot) is refused.
    pub fn parse_amount(text: &str) -> Result<Money, MoneyError> {
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (text, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !all_digits(whole)
            || !all_digits(fraction)
            || fraction.len() > 2
            || (text.contains('.') && fraction.is_empty())
        {
            return Err(MoneyError::Malformed);
        }
        // Leading zeros are harmless; only the significant digits can overflow.
        let significant = whole.trim_start_matches('0');
        if significant.len() > 12 {
            return Err(MoneyError::TooLarge);
        }
        let whole_minor = significant.parse::<i64>().unwrap_or(0) * 100;
        let fraction_minor = match fraction.len() {
            0 => 0,
            1 => i64::from(fraction.as_bytes()[0] - b'0') * 10,
            _ => fraction.parse::<i64>().map_err(|_| MoneyError::Malformed)?,
        };
        let minor = whole_minor + fraction_minor;
        if minor == 0 {
            return Err(MoneyError::NotPositive);
        }
        if minor > MAX_REQUEST_MINOR {
            return Err(MoneyError::TooLarge);
        }
        Ok(Money(minor))
    }

    /// Wraps minor units read back from our own storage or messages, where they were
    /// checked on the way in. Negative values are a bug upstream and are refused.
    pub fn from_minor(minor: i64) -> Option<Money> {
        (minor >= 0).then_some(Money(minor))
    }

    pub fn minor(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Money::parse_amount(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_whole_numbers_and_up_to_two_decimals() {
        assert_eq!(Money::parse_amount("200").unwrap().minor(), 20_000);
        assert_eq!(Money::parse_amount("12.5").unwrap().minor(), 1_250);
        assert_eq!(Money::parse_amount("12.50").unwrap().to_string(), "12.50");
        assert_eq!(Money::parse_amount("0.01").unwrap().minor(), 1);
        assert_eq!(Money::parse_amount("007").unwrap().minor(), 700);
        assert_eq!(
            Money::parse_amount("1000000000.00").unwrap().minor(),
            MAX_REQUEST_MINOR
        );
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "", " 5", "5 ", "-5", "+5", "1e3", "0x10", "NaN", "inf", "5;drop", "1.234", "1.", ".5",
            "1,50", "١٢", "1..2", "1.2.3",
        ] {
            assert_eq!(
                Money::parse_amount(bad),
                Err(MoneyError::Malformed),
                "{bad:?} must be malformed"
            );
        }
        assert_eq!(Money::parse_amount("0"), Err(MoneyError::NotPositive));
        assert_eq!(Money::parse_amount("0.00"), Err(MoneyError::NotPositive));
        assert_eq!(
            Money::parse_amount("1000000000.01"),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(
            Money::parse_amount("1000000000000000"),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(
            Money::parse_amount("99999999999999999999999999"),
            Err(MoneyError::TooLarge)
        );
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(minor in 1..=MAX_REQUEST_MINOR) {
            let money = Money(minor);
            prop_assert_eq!(Money::parse_amount(&money.to_string()), Ok(money));
        }

        #[test]
        fn parse_never_panics_and_accepts_only_canonical_shapes(text in "\\PC{0,20}") {
            if let Ok(money) = Money::parse_amount(&text) {
                prop_assert!(money.minor() > 0 && money.minor() <= MAX_REQUEST_MINOR);
                prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
            }
        }
    }
}
