//! `--auth jwt`: a bearer token's `sub` is the only user a call acts for or reads; a refused
//! call writes nothing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gozon::app::cli::Role;
use gozon::app::config::{AuthMode, Settings};
use gozon::web::auth::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, TestEnv, snapshot};

const SECRET: &str = "a-test-secret-that-is-32-bytes-long!";
const TOP_UP: &str = "payments:top_up";
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/keys");

/// The message key of the jwt-mode tests (jwt mode refuses the development key).
pub const MESSAGE_KEY: &str = "a-message-key-for-the-jwt-tests-0123456789";

fn jwt_settings(env: &TestEnv) -> Settings {
    let mut settings = env.settings();
    settings.auth = Some(AuthMode::Jwt);
    settings.jwt_secret = Some(SECRET.to_owned());
    settings.message_key = MESSAGE_KEY.to_owned();
    settings
}

async fn spawn(env: &TestEnv, settings: &Settings) -> TestApp {
    let app = env.spawn_with(settings, Role::All).await;
    app.wait_until_ready().await;
    app
}

fn token(sub: &str, scope: Option<&str>) -> String {
    let claims = Claims::new(sub, scope, Duration::from_secs(600));
    gozon::app::mint_token(&claims, Some(SECRET), None, None).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Tokens that must all be refused with 401, by name.
fn bad_tokens() -> Vec<(&'static str, Option<String>)> {
    let hs256 = |claims: Value, secret: &[u8]| {
        let key = EncodingKey::from_secret(secret);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    };
    let valid = serde_json::json!({"sub": "alice", "exp": now() + 600, "scope": TOP_UP});
    let expired = serde_json::json!({"sub": "alice", "exp": now() - 120, "scope": TOP_UP});
    let no_exp = serde_json::json!({"sub": "alice", "scope": TOP_UP});
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(valid.to_string())
    );
    let other_secret = b"another-secret-of-32-bytes-or-more!";
    vec![
        ("no token", None),
        ("not a JWT", Some("Bearer not-a-token".into())),
        (
            "not Bearer",
            Some(format!("Basic {}", token("alice", None))),
        ),
        ("expired", Some(bearer(&hs256(expired, SECRET.as_bytes())))),
        ("wrong signature", Some(bearer(&hs256(valid, other_secret)))),
        ("alg none", Some(bearer(&alg_none))),
        ("no exp", Some(bearer(&hs256(no_exp, SECRET.as_bytes())))),
    ]
}

fn valid_claims(sub: &str) -> Claims {
    Claims::new(sub, Some(TOP_UP), Duration::from_secs(600))
}

struct Answer {
    status: u16,
    challenge: Option<String>,
    body: Value,
}

/// One call with an Authorization header (or none). Only for answers that are not streams.
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    query: &[(&str, &str)],
    authorization: Option<&str>,
) -> Answer {
    let mut request = app
        .client
        .request(method, format!("{}{path}", app.address))
        .query(query);
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        challenge,
        body,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A call: method, path and query.
type Endpoint<'a> = (Method, &'static str, Vec<(&'static str, &'a str)>);

/// Every endpoint, acting for or reading `user` (`order` is an order id).
fn endpoints<'a>(user: &'a str, order: &'a str) -> Vec<Endpoint<'a>> {
    vec![
        (
            Method::POST,
            "/api/payments/create_account",
            vec![("user_id", user)],
        ),
        (
            Method::POST,
            "/api/payments/add_funds",
            vec![("user_id", user), ("amount", "10")],
        ),
        (
            Method::GET,
            "/api/payments/balance",
            vec![("user_id", user)],
        ),
        (
            Method::GET,
            "/api/payments/transactions",
            vec![("user_id", user)],
        ),
        (
            Method::POST,
            "/api/orders/create_order",
            vec![("user_id", user), ("amount", "10")],
        ),
        (Method::GET, "/api/orders/order", vec![("id", order)]),
        (Method::GET, "/api/orders/orders", vec![("user_id", user)]),
        (Method::GET, "/api/orders/events", vec![("user_id", user)]),
        (Method::POST, "/api/orders/events/ticket", vec![]),
    ]
}

/// Alice with an account of 100.00 and one order of 30 (FINISHED); returns its id.
async fn alice_with_an_order(app: &TestApp) -> String {
    let alice = bearer(&token("alice", Some(TOP_UP)));
    let auth = Some(alice.as_str());
    let created = call(
        app,
        Method::POST,
        "/api/payments/create_account",
        &[("user_id", "alice")],
        auth,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let funded = call(
        app,
        Method::POST,
        "/api/payments/add_funds",
        &[("user_id", "alice"), ("amount", "100")],
        auth,
    )
    .await;
    assert_eq!(funded.status, 200, "{}", funded.body);
    let order = call(
        app,
        Method::POST,
        "/api/orders/create_order",
        &[("user_id", "alice"), ("amount", "30")],
        auth,
    )
    .await;
    assert_eq!(order.status, 201, "{}", order.body);
    order.body["id"].as_str().unwrap().to_owned()
}

async fn wait_until_final(app: &TestApp, id: &str, authorization: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let order = call(
            app,
            Method::GET,
            "/api/orders/order",
            &[("id", id)],
            Some(authorization),
        )
        .await;
        assert_eq!(order.status, 200, "{}", order.body);
        if order.body["status"] != "NEW" {
            return order.body;
        }
        assert!(Instant::now() < deadline, "order {id} still NEW");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_endpoint_refuses_a_missing_or_bad_token_and_writes_nothing() {
    let env = TestEnv::new();
    let app = spawn(&env, &jwt_settings(&env)).await;
    let order = alice_with_an_order(&app).await;
    let db = env.db().await;
    let before = snapshot(&db).await;
    for (name, authorization) in bad_tokens() {
        for (method, path, query) in endpoints("alice", &order) {
            let answer = call(&app, method, path, &query, authorization.as_deref()).await;
            assert_eq!(answer.status, 401, "{name} on {path}: {}", answer.body);
            assert_eq!(answer.body["error"], "unauthorized", "{name} on {path}");
            assert!(
                answer.body["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
            assert_eq!(
                answer.challenge.as_deref(),
                Some("Bearer"),
                "{name} on {path}"
            );
        }
    }
    assert_eq!(snapshot(&db).await, before, "refused calls changed nothing");
}

#[tokio::test]
async fn a_token_acts_only_for_its_own_user() {
    let env = TestEnv::new();
    let app = spawn(&env, &jwt_settings(&env)).await;
    let alices_order = alice_with_an_order(&app).await;
    let bob = bearer(&token("bob", Some(TOP_UP)));
    let created = call(
        &app,
        Method::POST,
        "/api/payments/create_account",
        &[("user_id", "bob")],
        Some(&bob),
    )
    .await;
    assert_eq!(created.status, 201);
    let db = env.db().await;
    let before = snapshot(&db).await;

    // Bob's token on everything of Alice's.
    for (method, path, query) in endpoints("alice", &alices_order) {
        let answer = call(&app, method, path, &query, Some(&bob)).await;
        let expected = match path {
            // Someone else's order is not revealed to exist.
            "/api/orders/order" => (404, "order_not_found"),
            // A ticket is always the caller's own.
            "/api/orders/events/ticket" => (200, ""),
            _ => (403, "forbidden"),
        };
        assert_eq!(answer.status, expected.0, "{path}: {}", answer.body);
        if expected.0 != 200 {
            assert_eq!(answer.body["error"], expected.1, "{path}");
        }
    }
    // A shopper's token without the top-up scope cannot create money.
    let shopper = bearer(&token("bob", None));
    let top_up = call(
        &app,
        Method::POST,
        "/api/payments/add_funds",
        &[("user_id", "bob"), ("amount", "1000")],
        Some(&shopper),
    )
    .await;
    assert_eq!(top_up.status, 403);
    assert_eq!(top_up.body["error"], "insufficient_scope");
    assert_eq!(snapshot(&db).await, before, "refused calls changed nothing");

    // The owner still reads it.
    let alice = bearer(&token("alice", None));
    let order = wait_until_final(&app, &alices_order, &alice).await;
    assert_eq!(order["status"], "FINISHED");
}

#[tokio::test]
async fn the_happy_path_works_with_tokens_and_keys_are_per_user() {
    let env = TestEnv::new();
    let app = spawn(&env, &jwt_settings(&env)).await;
    let order = alice_with_an_order(&app).await;
    let alice = bearer(&token("alice", None));
    let paid = wait_until_final(&app, &order, &alice).await;
    assert_eq!(paid["status"], "FINISHED");
    let balance = call(
        &app,
        Method::GET,
        "/api/payments/balance",
        &[("user_id", "alice")],
        Some(&alice),
    )
    .await;
    assert_eq!(balance.body["balance"], "70.00");
    let ledger = call(
        &app,
        Method::GET,
        "/api/payments/transactions",
        &[("user_id", "alice")],
        Some(&alice),
    )
    .await;
    assert_eq!(ledger.body["transactions"].as_array().unwrap().len(), 2);
    let list = call(
        &app,
        Method::GET,
        "/api/orders/orders",
        &[("user_id", "alice")],
        Some(&alice),
    )
    .await;
    assert_eq!(list.body["orders"][0]["id"], order.as_str());

    // The same Idempotency-Key from two users is two requests, not a replay or a conflict.
    for user in ["carol", "dave"] {
        let response = app
            .client
            .post(format!("{}/api/payments/create_account", app.address))
            .query(&[("user_id", user)])
            .header("Authorization", bearer(&token(user, None)))
            .header("Idempotency-Key", "shared-key-1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{user}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["user_id"], user);
    }
}

#[tokio::test]
async fn an_rs256_server_takes_rs256_tokens_and_refuses_hs256_ones_made_with_its_public_key() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.auth = Some(AuthMode::Jwt);
    settings.message_key = MESSAGE_KEY.to_owned();
    settings.jwt_public_key = Some(format!("{KEYS}/rsa_public.pem").into());
    settings.jwt_issuer = Some("https://idp.test/realms/shop".into());
    settings.jwt_audience = Some("gozon".into());
    settings.events_ticket_key = Some("a-ticket-key-of-32-bytes-or-more-0123".into());
    let app = spawn(&env, &settings).await;
    let private = std::path::PathBuf::from(format!("{KEYS}/rsa_private.pem"));
    let mut claims = Claims::new("erin", None, Duration::from_secs(60));
    claims.iss = settings.jwt_issuer.clone();
    claims.aud = settings.jwt_audience.clone();
    let rs256 = gozon::app::mint_token(&claims, None, Some(&private), None).unwrap();
    let created = call(
        &app,
        Method::POST,
        "/api/payments/create_account",
        &[("user_id", "erin")],
        Some(&bearer(&rs256)),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);

    let public = std::fs::read(format!("{KEYS}/rsa_public.pem")).unwrap();
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &valid_claims("frank"),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let db = env.db().await;
    let before = snapshot(&db).await;
    let order = "00000000-0000-4000-8000-000000000000";
    for (method, path, query) in endpoints("frank", order) {
        let refused = call(&app, method, path, &query, Some(&bearer(&forged))).await;
        assert_eq!(refused.status, 401, "{path}: {}", refused.body);
        assert_eq!(refused.body["error"], "unauthorized");
    }
    assert_eq!(snapshot(&db).await, before);
}

#[test]
fn jwt_mode_refuses_to_start_without_a_usable_key() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.auth = Some(AuthMode::Jwt);
    settings.message_key = MESSAGE_KEY.to_owned();
    let refusal = |settings: &Settings, serves_events: bool| {
        settings
            .authenticator(serves_events)
            .err()
            .map(|error| error.to_string())
    };
    assert!(refusal(&settings, true).is_some(), "no secret");
    settings.jwt_secret = Some("too-short".into());
    assert!(refusal(&settings, true).is_some(), "short secret");
    settings.jwt_secret = Some(SECRET.into());
    assert_eq!(refusal(&settings, true), None);
    settings.jwt_public_key = Some(format!("{KEYS}/rsa_public.pem").into());
    assert!(
        refusal(&settings, true).is_some(),
        "both a secret and a key"
    );

    // A public key needs an issuer and an audience, and the roles that serve event streams
    // need a ticket key of their own (the payments role does not).
    settings.jwt_secret = None;
    let why = refusal(&settings, true).unwrap();
    assert!(why.contains("--jwt-issuer and --jwt-audience"), "{why}");
    settings.jwt_issuer = Some("https://idp.test/realms/shop".into());
    assert!(refusal(&settings, true).is_some(), "no audience");
    settings.jwt_audience = Some("gozon".into());
    let why = refusal(&settings, true).unwrap();
    assert!(why.contains("GOZON_EVENTS_TICKET_KEY"), "{why}");
    assert_eq!(
        refusal(&settings, false),
        None,
        "payments holds no ticket key"
    );
    settings.events_ticket_key = Some("short".into());
    assert!(refusal(&settings, true).is_some(), "a short ticket key");
    settings.events_ticket_key = Some("a-ticket-key-of-32-bytes-or-more-0123".into());
    assert_eq!(refusal(&settings, true), None);

    // Never with the public development message key, nor with an empty one.
    for key in [gozon::messaging::signing::DEVELOPMENT_KEY, ""] {
        settings.message_key = key.to_owned();
        let why = refusal(&settings, true).unwrap();
        assert!(why.contains("GOZON_MESSAGE_KEY"), "{why}");
    }
}

#[test]
fn serving_other_hosts_without_authentication_must_be_chosen() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gozon"))
        .args(["serve", "--http-addr", "0.0.0.0:8000"])
        .env_remove("GOZON_AUTH")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("refusing"))
        .collect();
    assert_eq!(reason.len(), 1, "one line says why: {stderr}");
    assert!(
        reason[0].contains("--auth jwt") && reason[0].contains("--auth none"),
        "{stderr}"
    );
    // Chosen explicitly, or on loopback only, `none` starts (and says it is open).
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.http_addr = "0.0.0.0:0".parse().unwrap();
    assert!(settings.check_exposure().is_err());
    settings.auth = Some(AuthMode::None);
    assert!(settings.check_exposure().is_ok());
    settings.auth = None;
    settings.http_addr = "127.0.0.1:0".parse().unwrap();
    assert!(settings.check_exposure().is_ok());
}

/// Opens the event stream with `query`; the status, and the stream when it is 200.
async fn open_stream(
    app: &TestApp,
    query: &[(&str, &str)],
) -> (u16, Option<reqwest::Response>, Value) {
    let response = app
        .client
        .get(format!("{}/api/orders/events", app.address))
        .query(query)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        return (status, Some(response), Value::Null);
    }
    (status, None, response.json().await.unwrap())
}

async fn ticket_for(app: &TestApp, user: &str) -> String {
    let answer = call(
        app,
        Method::POST,
        "/api/orders/events/ticket",
        &[],
        Some(&bearer(&token(user, None))),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body["ticket"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_event_stream_opens_only_for_the_tickets_own_user() {
    let env = TestEnv::new();
    let app = spawn(&env, &jwt_settings(&env)).await;
    let alices_ticket = ticket_for(&app, "alice").await;
    let alices_token = token("alice", None);

    let (status, _, body) =
        open_stream(&app, &[("user_id", "bob"), ("ticket", &alices_ticket)]).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    for query in [
        vec![("user_id", "alice")],
        // A token never goes in a URL: tickets only.
        vec![
            ("user_id", "alice"),
            ("access_token", alices_token.as_str()),
        ],
        vec![("user_id", "alice"), ("ticket", "forged")],
        // An API token is not a ticket.
        vec![("user_id", "alice"), ("ticket", alices_token.as_str())],
    ] {
        let (status, _, body) = open_stream(&app, &query).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{query:?}"
        );
    }

    // Alice's own stream, by ticket, hears her order being placed.
    let (status, stream, _) =
        open_stream(&app, &[("user_id", "alice"), ("ticket", &alices_ticket)]).await;
    assert_eq!(status, 200);
    let mut stream = stream.unwrap();
    let order = call(
        &app,
        Method::POST,
        "/api/orders/create_order",
        &[("user_id", "alice"), ("amount", "5")],
        Some(&bearer(&alices_token)),
    )
    .await;
    assert_eq!(order.status, 201);
    let id = order.body["id"].as_str().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(id) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, stream.chunk())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn a_ticket_expires() {
    let env = TestEnv::new();
    let mut settings = jwt_settings(&env);
    settings.events_ticket_ttl_secs = 1;
    let app = spawn(&env, &settings).await;
    let ticket = ticket_for(&app, "alice").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, body) = open_stream(&app, &[("user_id", "alice"), ("ticket", &ticket)]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
}

/// A ticket for `sub` in the shape the server issues, signed with `key` by HS256.
fn ticket_signed_with(sub: &str, key: &[u8]) -> String {
    let mut claims = Claims::new(sub, None, Duration::from_secs(60));
    claims.aud = Some("gozon:events".into());
    let key = EncodingKey::from_secret(key);
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

/// The ticket key of the earlier scheme: SHA-256 of a fixed label and a message key.
fn earlier_ticket_key(material: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::new()
        .chain_update(b"gozon event-stream tickets\0")
        .chain_update(material.as_bytes())
        .finalize()
        .to_vec()
}

#[tokio::test]
async fn tickets_from_public_or_shared_values_are_refused() {
    let env = TestEnv::new();
    let app = spawn(&env, &jwt_settings(&env)).await;
    let development = gozon::messaging::signing::DEVELOPMENT_KEY;
    let forged = [
        (
            "the development key",
            ticket_signed_with("alice", development.as_bytes()),
        ),
        (
            "the development key, the earlier way",
            ticket_signed_with("alice", &earlier_ticket_key(development)),
        ),
        (
            "the message key",
            ticket_signed_with("alice", MESSAGE_KEY.as_bytes()),
        ),
        (
            "the message key, the earlier way",
            ticket_signed_with("alice", &earlier_ticket_key(MESSAGE_KEY)),
        ),
        (
            "the JWT secret without the domain separation",
            ticket_signed_with("alice", SECRET.as_bytes()),
        ),
    ];
    for (made_with, ticket) in &forged {
        let (status, _, body) =
            open_stream(&app, &[("user_id", "alice"), ("ticket", ticket)]).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "a ticket made with {made_with}"
        );
    }
    // The control: the key the server derives from its secret opens the stream.
    let derived = gozon::web::auth::ticket_key(SECRET.as_bytes());
    let (status, _, _) = open_stream(
        &app,
        &[
            ("user_id", "alice"),
            ("ticket", &ticket_signed_with("alice", &derived)),
        ],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_stream_ends_when_its_ticket_expires() {
    let env = TestEnv::new();
    let mut settings = jwt_settings(&env);
    settings.events_ticket_ttl_secs = 2;
    let app = spawn(&env, &settings).await;
    let ticket = ticket_for(&app, "alice").await;
    let opened = Instant::now();
    let (status, stream, _) = open_stream(&app, &[("user_id", "alice"), ("ticket", &ticket)]).await;
    assert_eq!(status, 200);
    let mut stream = stream.unwrap();
    // The stream's own lifetime is 900 s: it ends at the ticket's `exp` (1-2 s from now, as
    // `exp` is in whole seconds).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its ticket");
    let lasted = opened.elapsed();
    assert!(
        lasted >= Duration::from_millis(900) && lasted <= Duration::from_secs(3),
        "{lasted:?}"
    );
}
