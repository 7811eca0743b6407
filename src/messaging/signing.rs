//! Message authentication: every message carries an HMAC-SHA256 of its body, keyed by a secret
//! the Gozon processes share, and the id of that key. A consumer drops (dead-letters) anything
//! unsigned, forged or signed with a key it does not hold, so nobody with mere access to the
//! broker can make Payments debit an account.
//!
//! Keys rotate through a [`Keyring`]: the current key signs; the current and the previous ones
//! verify, so messages in flight and in dead-letter queues stay valid across a rotation.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The AMQP header that carries the signature, hex-encoded.
pub const HEADER: &str = "x-gozon-signature";
/// The AMQP header that names the key that made the signature.
pub const KEY_ID_HEADER: &str = "x-gozon-key-id";
/// The shortest key accepted, except the development key.
pub const MIN_KEY_BYTES: usize = 32;

/// The key a fresh checkout uses so that `gozon serve` works with no setup; deployments set
/// their own (`GOZON_MESSAGE_KEY`), and the process warns when it runs with this one.
pub const DEVELOPMENT_KEY: &str = "gozon-development-key-change-me";

#[derive(Clone)]
pub struct MessageKey {
    id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageKey({}, ***)", self.id)
    }
}

impl MessageKey {
    pub fn new(secret: &str) -> MessageKey {
        // The id names the key without revealing it: a hash of it, under a label of its own.
        let digest = Sha256::new()
            .chain_update(b"gozon message key id\0")
            .chain_update(secret.as_bytes())
            .finalize();
        MessageKey {
            id: hex::encode(&digest[..8]),
            secret: secret.as_bytes().to_vec(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; new_from_slice cannot fail for it.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Constant-time check of a hex signature against `body`.
    pub fn verify(&self, body: &[u8], signature: &str) -> bool {
        let Ok(signature) = hex::decode(signature) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    }
}

/// The keys of one process: the current one signs; it and the previous ones verify.
#[derive(Clone, Debug)]
pub struct Keyring {
    current: MessageKey,
    previous: Vec<MessageKey>,
}

/// Why a message's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("unsigned message (no x-gozon-signature)")]
    Unsigned,
    #[error("signed with key {0}, which this process does not hold")]
    UnknownKey(String),
    #[error("forged message (the signature does not match)")]
    Forged,
}

impl Keyring {
    pub fn new(current: MessageKey, previous: Vec<MessageKey>) -> Keyring {
        Keyring { current, previous }
    }

    pub fn current(&self) -> &MessageKey {
        &self.current
    }

    /// Checks `signature` of `body`, made by the key `key_id` names; a message without a key
    /// id (signed before ids existed) is checked against the current key.
    pub fn verify(
        &self,
        body: &[u8],
        key_id: Option<&str>,
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::Unsigned)?;
        let key = match key_id {
            None => &self.current,
            Some(id) => std::iter::once(&self.current)
                .chain(&self.previous)
                .find(|key| key.id == id)
                .ok_or_else(|| SignatureError::UnknownKey(id.to_owned()))?,
        };
        if key.verify(body, signature) {
            Ok(())
        } else {
            Err(SignatureError::Forged)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_its_body_under_its_key() {
        let key = MessageKey::new("k1");
        let signature = key.sign(b"body");
        assert!(key.verify(b"body", &signature));
        assert!(!key.verify(b"body!", &signature));
        assert!(!MessageKey::new("k2").verify(b"body", &signature));
        assert!(!key.verify(b"body", "not hex"));
        assert!(!key.verify(b"body", ""));
    }

    #[test]
    fn a_keyring_verifies_with_the_named_key_only() {
        let (old, new) = (MessageKey::new("old-key"), MessageKey::new("new-key"));
        assert_ne!(old.id(), new.id());
        let ring = Keyring::new(new.clone(), vec![old.clone()]);
        let by_old = old.sign(b"body");
        assert_eq!(ring.verify(b"body", Some(old.id()), Some(&by_old)), Ok(()));
        assert_eq!(
            ring.verify(b"body", Some(new.id()), Some(&by_old)),
            Err(SignatureError::Forged)
        );
        assert_eq!(ring.verify(b"body", None, Some(&new.sign(b"body"))), Ok(()));
        assert_eq!(
            ring.verify(b"body", None, None),
            Err(SignatureError::Unsigned)
        );
        let stranger = MessageKey::new("another");
        assert_eq!(
            ring.verify(b"body", Some(stranger.id()), Some(&stranger.sign(b"body"))),
            Err(SignatureError::UnknownKey(stranger.id().to_owned()))
        );
    }
}
