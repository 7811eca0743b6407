//! Message authentication: every message carries an HMAC-SHA256 of its body, keyed by a secret
//! the Gozon processes share. A consumer drops (dead-letters) anything unsigned or forged, so
//! nobody with mere access to the broker can make Payments debit an account.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The AMQP header that carries the signature, hex-encoded.
pub const HEADER: &str = "x-gozon-signature";

/// The key a fresh checkout uses so that `gozon serve` works with no setup; deployments set
/// their own (`GOZON_MESSAGE_KEY`), and the process warns when it runs with this one.
pub const DEVELOPMENT_KEY: &str = "gozon-development-key-change-me";

#[derive(Clone)]
pub struct MessageKey(Vec<u8>);

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(***)")
    }
}

impl MessageKey {
    pub fn new(secret: &str) -> MessageKey {
        MessageKey(secret.as_bytes().to_vec())
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; new_from_slice cannot fail for it.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
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
}
