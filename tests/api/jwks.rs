//! `--auth jwt` against an identity provider: a JWKS test server publishes keys by id, as
//! Keycloak does; Gozon checks the token's issuer, audience, `nbf` and lifetime, refetches the
//! keys when a token names one it does not hold, and follows a rotation without a restart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gozon::app::cli::Role;
use gozon::app::config::{AuthMode, Settings};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use poem::{EndpointExt, Route, get, handler};
use serde_json::{Value, json};

use crate::auth::MESSAGE_KEY;
use crate::helpers::{TestApp, TestEnv, snapshot};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/keys");
const ISSUER: &str = "https://idp.test/realms/shop";
const AUDIENCE: &str = "gozon";

/// A stand-in identity provider: serves `/certs` with the keys it currently publishes and
/// counts how often it was asked.
struct Provider {
    url: String,
    published: Arc<Mutex<Vec<&'static str>>>,
    fetches: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct Published {
    kids: Arc<Mutex<Vec<&'static str>>>,
    fetches: Arc<AtomicUsize>,
}

#[handler]
fn certs(published: poem::web::Data<&Published>) -> poem::web::Json<Value> {
    published.fetches.fetch_add(1, Ordering::SeqCst);
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{KEYS}/jwks.json")).unwrap())
            .unwrap();
    let kids = published.kids.lock().unwrap().clone();
    // An encryption key, as Keycloak publishes beside its signing keys: skipped.
    let mut keys = vec![
        json!({"kid": "enc-1", "kty": "RSA", "use": "enc", "alg": "RSA-OAEP",
        "n": all["rsa-1"]["n"], "e": "AQAB"}),
    ];
    keys.extend(kids.iter().map(|kid| all[*kid].clone()));
    poem::web::Json(json!({ "keys": keys }))
}

impl Provider {
    async fn start(kids: &[&'static str]) -> Provider {
        let published = Published {
            kids: Arc::new(Mutex::new(kids.to_vec())),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
        let routes = Route::new()
            .at("/realms/shop/protocol/openid-connect/certs", get(certs))
            .data(published.clone());
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(routes));
        Provider {
            url: format!("http://127.0.0.1:{port}/realms/shop/protocol/openid-connect/certs"),
            published: published.kids,
            fetches: published.fetches,
        }
    }

    fn publish(&self, kids: &[&'static str]) {
        *self.published.lock().unwrap() = kids.to_vec();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn settings(env: &TestEnv, jwks_url: &str) -> Settings {
    let mut settings = env.settings();
    settings.auth = Some(AuthMode::Jwt);
    settings.message_key = MESSAGE_KEY.to_owned();
    settings.jwt_jwks_url = Some(jwks_url.to_owned());
    settings.jwt_issuer = Some(ISSUER.to_owned());
    settings.jwt_audience = Some(AUDIENCE.to_owned());
    settings.events_ticket_key = Some("a-ticket-key-of-32-bytes-or-more-0123".into());
    settings.jwt_max_ttl = Duration::from_secs(3600);
    // Every unknown key id may refetch at once (the default spaces them 5 s apart).
    settings.jwt_jwks_min_refresh_secs = 0;
    settings
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of a good token for `sub`; tests spoil one claim at a time.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": ["account", AUDIENCE], "iat": now(),
        "exp": now() + 300, "scope": "openid profile payments:top_up"})
}

/// `claims` signed by the provider's key `kid` (its private half under tests/api/keys).
fn signed(claims: &Value, kid: &str) -> String {
    let (file, algorithm, kid) = match kid {
        // rsa-1's id on a token rsa-2's private half signed.
        "forged-rsa-1" => ("rsa2_private.pem", Algorithm::RS256, "rsa-1"),
        "rsa-1" => ("rsa_private.pem", Algorithm::RS256, kid),
        "rsa-2" => ("rsa2_private.pem", Algorithm::RS256, kid),
        "ec-1" => ("ec_private.pem", Algorithm::ES256, kid),
        // A key the provider never published: signed with rsa-1's private half.
        _ => ("rsa_private.pem", Algorithm::RS256, kid),
    };
    let pem = std::fs::read(format!("{KEYS}/{file}")).unwrap();
    let key = match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn create_account(app: &TestApp, user: &str, token: &str) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}/api/payments/create_account", app.address))
        .query(&[("user_id", user)])
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn tokens_are_checked_against_the_providers_keys_issuer_audience_and_lifetime() {
    let provider = Provider::start(&["rsa-1", "ec-1"]).await;
    let env = TestEnv::new();
    let app = env
        .spawn_with(&settings(&env, &provider.url), Role::All)
        .await;
    app.wait_until_ready().await;

    // The right issuer and audience, signed by either of the provider's keys.
    assert_eq!(
        create_account(&app, "ivy", &signed(&claims("ivy"), "rsa-1"))
            .await
            .0,
        201
    );
    assert_eq!(
        create_account(&app, "eve", &signed(&claims("eve"), "ec-1"))
            .await
            .0,
        201
    );
    assert_eq!(
        provider.fetches(),
        1,
        "the keys were fetched once and cached"
    );

    let db = env.db().await;
    let before = snapshot(&db).await;
    let spoiled = |field: &str, value: Value| {
        let mut claims = claims("mallory");
        claims[field] = value;
        claims
    };
    let refused = [
        (
            "wrong issuer",
            signed(
                &spoiled("iss", json!("https://idp.test/realms/other")),
                "rsa-1",
            ),
        ),
        ("no issuer", {
            let mut claims = claims("mallory");
            claims.as_object_mut().unwrap().remove("iss");
            signed(&claims, "rsa-1")
        }),
        (
            "wrong audience",
            signed(&spoiled("aud", json!(["account", "billing"])), "rsa-1"),
        ),
        (
            "nbf in the future",
            signed(&spoiled("nbf", json!(now() + 600)), "rsa-1"),
        ),
        ("a lifetime over the cap (iat)", {
            let mut claims = claims("mallory");
            claims["iat"] = json!(now() - 60);
            claims["exp"] = json!(now() + 3600);
            signed(&claims, "rsa-1")
        }),
        ("a lifetime over the cap (no iat)", {
            let mut claims = spoiled("exp", json!(now() + 7200));
            claims.as_object_mut().unwrap().remove("iat");
            signed(&claims, "rsa-1")
        }),
        (
            "expired",
            signed(&spoiled("exp", json!(now() - 60)), "rsa-1"),
        ),
        (
            "signed by another key under a published id",
            signed(&claims("mallory"), "forged-rsa-1"),
        ),
    ];
    for (what, token) in &refused {
        let (status, body) = create_account(&app, "mallory", token).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
    }

    // A key id the provider does not publish: the keys are fetched again, then refused.
    let fetched = provider.fetches();
    let (status, body) =
        create_account(&app, "mallory", &signed(&claims("mallory"), "rsa-9")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    assert_eq!(
        provider.fetches(),
        fetched + 1,
        "an unknown kid refetches the keys"
    );
    assert_eq!(
        snapshot(&db).await,
        before,
        "no refused token wrote anything"
    );
}

#[tokio::test]
async fn a_key_rotated_at_the_provider_is_picked_up_without_a_restart() {
    let provider = Provider::start(&["rsa-1"]).await;
    let env = TestEnv::new();
    let app = env
        .spawn_with(&settings(&env, &provider.url), Role::All)
        .await;
    app.wait_until_ready().await;
    assert_eq!(
        create_account(&app, "old", &signed(&claims("old"), "rsa-1"))
            .await
            .0,
        201
    );

    // The provider rotates: a new key signs, the old one is withdrawn.
    provider.publish(&["rsa-2"]);
    assert_eq!(
        create_account(&app, "new", &signed(&claims("new"), "rsa-2"))
            .await
            .0,
        201
    );
    // Once the keys were refetched, the withdrawn key no longer checks anything.
    let (status, _) = create_account(&app, "stale", &signed(&claims("stale"), "rsa-1")).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn unknown_key_ids_refetch_at_most_once_per_interval() {
    let provider = Provider::start(&["rsa-1"]).await;
    let env = TestEnv::new();
    let mut settings = settings(&env, &provider.url);
    settings.jwt_jwks_min_refresh_secs = 60;
    let app = env.spawn_with(&settings, Role::All).await;
    app.wait_until_ready().await;
    assert_eq!(
        create_account(&app, "ann", &signed(&claims("ann"), "rsa-1"))
            .await
            .0,
        201
    );
    for kid in 0..20 {
        let token = signed(&claims("ann"), &format!("random-{kid}"));
        assert_eq!(create_account(&app, "ann", &token).await.0, 401);
    }
    assert_eq!(
        provider.fetches(),
        1,
        "a flood of unknown ids does not hammer the provider"
    );
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_gets_503_not_a_crash() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/certs", unused.local_addr().unwrap());
    drop(unused);
    let env = TestEnv::new();
    let app = env.spawn_with(&settings(&env, &url), Role::All).await;
    app.wait_until_ready().await;
    let (status, body) = create_account(&app, "ivy", &signed(&claims("ivy"), "rsa-1")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("service_unavailable")),
        "{body}"
    );
}
