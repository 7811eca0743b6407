//! An identity provider's signing keys, from its JWKS document (`--jwt-jwks-url`): fetched on
//! first use, cached, refetched when they grow old or when a token names a key id the cache
//! does not hold (a rotation at the provider), at most once per `min_refresh` however many
//! unknown ids arrive. Only RS256 (RSA) and ES256 (EC P-256) signing keys are taken.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Why no key could be had for a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The provider's keys are known, and none has this id (after a refresh).
    #[error("the token names a signing key the identity provider does not publish")]
    Unknown,
    /// The provider's keys could not be fetched, and none is cached.
    #[error("the identity provider's keys cannot be fetched right now")]
    Unavailable,
}

/// The keys, by id, and when they were fetched.
#[derive(Default)]
struct Cached {
    keys: HashMap<String, (Arc<DecodingKey>, Algorithm)>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

pub struct Jwks {
    url: String,
    client: reqwest::Client,
    cached: RwLock<Cached>,
    /// One fetch at a time; the others wait for its result.
    fetching: tokio::sync::Mutex<()>,
    max_age: Duration,
    min_refresh: Duration,
}

impl Jwks {
    /// Keys from `url`, kept for `max_age`, refetched at most once per `min_refresh`.
    pub fn new(url: &str, max_age: Duration, min_refresh: Duration) -> anyhow::Result<Jwks> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3))
            .build()?;
        Ok(Jwks {
            url: url.to_owned(),
            client,
            cached: RwLock::default(),
            fetching: tokio::sync::Mutex::new(()),
            max_age,
            min_refresh,
        })
    }

    fn lookup(&self, kid: &str) -> (Option<(Arc<DecodingKey>, Algorithm)>, bool) {
        let cached = self
            .cached
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fresh = cached.fetched.is_some_and(|at| at.elapsed() < self.max_age);
        (cached.keys.get(kid).cloned(), fresh)
    }

    /// The key `kid` names: from the cache while it is fresh, else after a refetch.
    pub async fn key(&self, kid: &str) -> Result<(Arc<DecodingKey>, Algorithm), KeyError> {
        if let (Some(key), true) = self.lookup(kid) {
            return Ok(key);
        }
        self.refresh().await;
        let cached = self
            .cached
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match cached.keys.get(kid) {
            Some(key) => Ok(key.clone()),
            None if cached.fetched.is_none() => Err(KeyError::Unavailable),
            None => Err(KeyError::Unknown),
        }
    }

    /// Refetches the keys unless a fetch was tried less than `min_refresh` ago. A failed fetch
    /// keeps the keys already held.
    async fn refresh(&self) {
        let _one_at_a_time = self.fetching.lock().await;
        let recently = {
            let cached = self
                .cached
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            cached
                .attempted
                .is_some_and(|at| at.elapsed() < self.min_refresh)
        };
        if recently {
            return;
        }
        let fetched = self.fetch().await;
        let mut cached = self
            .cached
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cached.attempted = Some(Instant::now());
        match fetched {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "fetched the identity provider's signing keys");
                cached.keys = keys;
                cached.fetched = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "cannot fetch the identity provider's signing keys");
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, (Arc<DecodingKey>, Algorithm)>> {
        let response = self.client.get(&self.url).send().await?;
        let document: serde_json::Value = response.error_for_status()?.json().await?;
        let keys = document["keys"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("the JWKS document has no `keys` array"))?;
        // Keys of other kinds (encryption keys, other curves) are skipped, not fatal.
        Ok(keys
            .iter()
            .filter_map(|key| serde_json::from_value::<Jwk>(key.clone()).ok())
            .filter_map(|jwk| signing_key(&jwk))
            .collect())
    }
}

/// A key Gozon checks signatures with: an RSA key for RS256 or a P-256 key for ES256, with an
/// id, not meant for encryption.
fn signing_key(jwk: &Jwk) -> Option<(String, (Arc<DecodingKey>, Algorithm))> {
    let kid = jwk.common.key_id.clone()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let algorithm = match (&jwk.algorithm, &jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, (Arc::new(key), algorithm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_rs256_and_es256_signing_keys_with_an_id_are_taken() {
        let rsa = serde_json::json!({"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB"});
        assert_eq!(
            signing_key(&jwk(rsa.clone())).unwrap().1.1,
            Algorithm::RS256
        );
        let mut encryption = rsa.clone();
        encryption["use"] = "enc".into();
        assert!(signing_key(&jwk(encryption)).is_none());
        let mut rs512 = rsa.clone();
        rs512["alg"] = "RS512".into();
        assert!(signing_key(&jwk(rs512)).is_none());
        let mut no_id = rsa;
        no_id.as_object_mut().unwrap().remove("kid");
        assert!(signing_key(&jwk(no_id)).is_none());
        let ec = |crv: &str| serde_json::json!({"kty": "EC", "kid": "e", "crv": crv, "x": "AA", "y": "AA"});
        assert_eq!(
            signing_key(&jwk(ec("P-256"))).unwrap().1.1,
            Algorithm::ES256
        );
        assert!(signing_key(&jwk(ec("P-384"))).is_none());
    }
}
