//! UserId: who owns an account or an order, as clients name them.

use std::fmt;

/// 1-64 characters of ASCII letters, digits, '-', '_' and '.'.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user_id must be 1-64 characters of letters, digits, '-', '_' and '.'")]
pub struct UserIdError;

impl UserId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(text: &str) -> Result<UserId, UserIdError> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if text.is_empty() || text.len() > Self::MAX_LEN || !text.bytes().all(allowed) {
            return Err(UserIdError);
        }
        Ok(UserId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for UserId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        UserId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for good in ["1", "42", "alice", "a.b-c_d", &"x".repeat(64)] {
            assert!(UserId::parse(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            " ",
            "a b",
            "' OR 1=1 --",
            "a;b",
            "ä",
            "a/b",
            "a\nb",
            &"x".repeat(65),
        ] {
            assert_eq!(UserId::parse(bad), Err(UserIdError), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn anything_accepted_is_in_the_alphabet(text in "\\PC{0,80}") {
            if let Ok(id) = UserId::parse(&text) {
                prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= 64);
                prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            }
        }
    }
}
