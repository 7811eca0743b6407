//! Hard to knock over: rate limits, the cap on a user's NEW orders, paged lists, bounded event
//! streams, the listener's timeouts and connection cap, security headers and request ids.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use gozon::app::cli::Role;
use gozon::app::config::Settings;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, TestEnv, scalar_i64, spawn_app};

async fn spawn(env: &TestEnv, role: Role, tune: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = env.settings();
    tune(&mut settings);
    let app = env.spawn_with(&settings, role).await;
    app.wait_until_ready().await;
    app
}

fn port(app: &TestApp) -> u16 {
    app.address.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_burst_over_the_rate_limit_gets_429_with_retry_after_and_writes_nothing() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::All, |s| {
        s.rate_limit_per_client = 5;
        s.rate_limit_per_user = 0;
    })
    .await;
    let db = env.db().await;
    let mut created = 0;
    let mut refused = 0;
    for i in 0..30 {
        let reply = app.create_account(&format!("burst-{i}")).await;
        match reply.status {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                reply.assert_error(429, "rate_limited");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert!(
        refused > 0 && created >= 10,
        "{created} created, {refused} refused"
    );
    let accounts = scalar_i64(&db, "SELECT count(*) FROM payments.accounts").await;
    assert_eq!(accounts, created, "a refused request wrote nothing");
    // Reads are not limited; the 429 says when to come back.
    assert_eq!(app.balance("burst-0").await.status, StatusCode::OK);
    // On busy cores the bucket may refill between two requests: keep posting until refused.
    let mut response = None;
    for i in 0..50 {
        let sent = app
            .client
            .post(format!("{}/api/payments/create_account", app.address))
            .query(&[("user_id", format!("burst-late-{i}").as_str())])
            .send()
            .await
            .unwrap();
        if sent.status() == StatusCode::TOO_MANY_REQUESTS {
            response = Some(sent);
            break;
        }
    }
    let response = response.expect("a burst past the limit is refused");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
}

#[tokio::test]
async fn one_user_is_limited_on_its_own() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::All, |s| s.rate_limit_per_user = 2).await;
    app.create_account("hasty").await;
    let db = env.db().await;
    let mut credited = 0;
    for _ in 0..12 {
        let reply = app.add_funds("hasty", "1").await;
        if reply.status == StatusCode::OK {
            credited += 1;
        } else {
            reply.assert_error(429, "rate_limited");
        }
    }
    assert!(credited < 12, "some top-ups were refused");
    let balance = scalar_i64(
        &db,
        "SELECT balance_minor FROM payments.accounts WHERE user_id = 'hasty'",
    )
    .await;
    assert_eq!(balance, credited * 100, "only the accepted top-ups count");
    // Another user is not held up by it.
    assert_eq!(
        app.create_account("patient").await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_user_at_the_new_orders_cap_is_refused() {
    let env = TestEnv::new();
    // Orders alone: with no Payments, orders stay NEW.
    let app = spawn(&env, Role::Orders, |s| s.max_new_orders_per_user = 3).await;
    for _ in 0..3 {
        assert_eq!(
            app.create_order("eager", "1").await.status,
            StatusCode::CREATED
        );
    }
    let db = env.db().await;
    let counts = async || {
        let orders = scalar_i64(&db, "SELECT count(*) FROM orders.orders").await;
        (
            orders,
            scalar_i64(&db, "SELECT count(*) FROM orders.outbox").await,
        )
    };
    let before = counts().await;
    app.create_order("eager", "1")
        .await
        .assert_error(429, "too_many_new_orders");
    assert_eq!(counts().await, before, "the refused order wrote nothing");
    assert_eq!(
        app.create_order("calm", "1").await.status,
        StatusCode::CREATED
    );
}

async fn page(app: &TestApp, path: &str, query: &[(&str, &str)]) -> Value {
    let reply = app.get(path, query).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

#[tokio::test]
async fn pages_of_more_than_1000_orders_are_complete_and_stable_while_orders_are_added() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::Orders, |s| {
        s.max_new_orders_per_user = 0;
        s.rate_limit_per_user = 0;
    })
    .await;
    let mut placed = HashSet::new();
    for chunk in 0..21 {
        let batch = (0..50).map(|_| app.create_order("collector", "1"));
        for reply in futures_util::future::join_all(batch).await {
            assert_eq!(
                reply.status,
                StatusCode::CREATED,
                "chunk {chunk}: {}",
                reply.body
            );
            placed.insert(reply.str("id").to_owned());
        }
    }
    assert_eq!(placed.len(), 1050);

    // Walk the pages while more orders keep arriving: every order placed before the walk is
    // seen exactly once, newest first.
    let adding = {
        let client = TestApp::at(&app.address);
        tokio::spawn(async move {
            for _ in 0..40 {
                client.create_order("collector", "2").await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("user_id", "collector"), ("limit", "100")];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor));
        }
        let body = page(&app, "/api/orders/orders", &query).await;
        let orders = body["orders"].as_array().unwrap();
        assert!(orders.len() <= 100);
        seen.extend(orders.iter().map(|o| {
            (
                o["created_at"].as_str().unwrap().to_owned(),
                o["id"].as_str().unwrap().to_owned(),
            )
        }));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    adding.await.unwrap();
    let ids: Vec<&String> = seen.iter().map(|(_, id)| id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no order twice");
    assert!(
        placed.iter().all(|id| unique.contains(id)),
        "every order placed before is there"
    );
    assert!(seen.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // The largest page, then the rest; the default page is 100.
    let first = page(
        &app,
        "/api/orders/orders",
        &[("user_id", "collector"), ("limit", "1000")],
    )
    .await;
    assert_eq!(first["orders"].as_array().unwrap().len(), 1000);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let rest = page(
        &app,
        "/api/orders/orders",
        &[
            ("user_id", "collector"),
            ("limit", "1000"),
            ("cursor", &cursor),
        ],
    )
    .await;
    assert_eq!(rest["orders"].as_array().unwrap().len(), 1090 - 1000);
    assert!(rest["next_cursor"].is_null());
    let default = page(&app, "/api/orders/orders", &[("user_id", "collector")]).await;
    assert_eq!(default["orders"].as_array().unwrap().len(), 100);

    for (limit, cursor) in [
        ("0", None),
        ("1001", None),
        ("ten", None),
        ("-1", None),
        ("5", Some("nope")),
        ("5", Some("1_x")),
        // Only the form next_cursor has: no sign, no leading zero.
        (
            "5",
            Some("+1764574200000000_0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a"),
        ),
        (
            "5",
            Some("01764574200000000_0190f5c2-8c1e-7a9b-b7a1-1f2e3d4c5b6a"),
        ),
    ] {
        let mut query = vec![("user_id", "collector"), ("limit", limit)];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor));
        }
        let code = if cursor.is_some() {
            "invalid_cursor"
        } else {
            "invalid_limit"
        };
        app.get("/api/orders/orders", &query)
            .await
            .assert_error(400, code);
    }
}

#[tokio::test]
async fn the_ledger_is_paged_too() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::Payments, |s| s.rate_limit_per_user = 0).await;
    app.create_account("saver").await;
    for _ in 0..6 {
        let top_ups = (0..25).map(|_| app.add_funds("saver", "1"));
        futures_util::future::join_all(top_ups).await;
    }
    let first = page(&app, "/api/payments/transactions", &[("user_id", "saver")]).await;
    assert_eq!(first["transactions"].as_array().unwrap().len(), 100);
    assert_eq!(first["balance"], "150.00");
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let rest = page(
        &app,
        "/api/payments/transactions",
        &[("user_id", "saver"), ("cursor", &cursor)],
    )
    .await;
    assert_eq!(rest["transactions"].as_array().unwrap().len(), 50);
    assert!(rest["next_cursor"].is_null());
    let ids: HashSet<i64> = first["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["transactions"].as_array().unwrap())
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 150);
    for bad in ["x", "0", "-1", "+5", "007", "1234567890123456789"] {
        app.get(
            "/api/payments/transactions",
            &[("user_id", "saver"), ("cursor", bad)],
        )
        .await
        .assert_error(400, "invalid_cursor");
    }
}

async fn open_stream(app: &TestApp, user: &str) -> reqwest::Response {
    app.client
        .get(format!("{}/api/orders/events", app.address))
        .query(&[("user_id", user)])
        .send()
        .await
        .unwrap()
}

async fn hears(stream: &mut reqwest::Response, id: &str) {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(id) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, stream.chunk())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn streams_over_the_caps_are_refused_and_the_others_keep_working() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::All, |s| {
        s.events_max_streams_per_user = 2;
        s.events_max_streams = 3;
    })
    .await;
    let mut first = open_stream(&app, "watcher").await;
    let mut second = open_stream(&app, "watcher").await;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = open_stream(&app, "watcher").await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"], "too_many_streams");
    let _other = open_stream(&app, "someone").await;
    let full = open_stream(&app, "latecomer").await;
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.json::<Value>().await.unwrap()["error"], "server_busy");

    let order = app.create_order("watcher", "1").await;
    let id = order.str("id");
    hears(&mut first, id).await;
    hears(&mut second, id).await;
}

#[tokio::test]
async fn a_stream_ends_after_its_lifetime() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::Orders, |s| s.events_max_stream_secs = 1).await;
    let mut stream = open_stream(&app, "brief").await;
    assert_eq!(stream.status(), StatusCode::OK);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while stream.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_client_that_sends_its_headers_byte_by_byte_is_cut_off() {
    let env = TestEnv::new();
    let app = spawn(&env, Role::Orders, |s| s.http_request_read_timeout_secs = 1).await;
    let mut slow = TcpStream::connect(("127.0.0.1", port(&app))).await.unwrap();
    let request = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut cut_off = None;
    for byte in request.iter().take(request.len() - 2) {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(150), slow.read(&mut buf)).await
        {
            // Closed (0 bytes, or a reset), with no answer to a request it never finished.
            assert!(read.map_or(true, |n| n == 0 || !buf.starts_with(b"HTTP/1.1 200")));
            cut_off = Some(started.elapsed());
            break;
        }
    }
    let cut_off = cut_off.expect("the slow client was cut off before it finished its headers");
    assert!(
        cut_off < Duration::from_secs(4),
        "cut off after {cut_off:?}"
    );
    // A client that sends its request at once is answered.
    assert_eq!(app.get("/health/live", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.http_max_connections = 2;
    // Not `spawn`: its readiness check would leave a pooled connection holding a place.
    let app = env.spawn_with(&settings, Role::Orders).await;
    let first = TcpStream::connect(("127.0.0.1", port(&app))).await.unwrap();
    let _second = TcpStream::connect(("127.0.0.1", port(&app))).await.unwrap();
    let fresh = reqwest::Client::new();
    let url = format!("{}/health/live", app.address);
    let waiting = fresh
        .get(&url)
        .timeout(Duration::from_millis(800))
        .send()
        .await;
    assert!(
        waiting.is_err(),
        "a third connection is not served while two are open"
    );
    drop(first);
    let served = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
}

#[tokio::test]
async fn every_response_carries_the_security_headers_and_a_safe_request_id() {
    let app = spawn_app().await;
    for path in [
        "/",
        "/app.js",
        "/api/payments/balance?user_id=nobody",
        "/api/orders/order?id=x",
        "/api/nowhere",
        "/health/live",
        "/metrics",
        "/openapi.json",
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        let csp = headers
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            csp.as_deref(),
            Some("default-src 'self'; frame-ancestors 'none'; object-src 'none'"),
            "{path}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
    }
    let docs = app
        .client
        .get(format!("{}/docs", app.address))
        .send()
        .await
        .unwrap();
    let csp = docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("'unsafe-inline'"),
        "{csp}"
    );

    let id_of = |sent: &str| {
        let (client, url, sent) = (
            app.client.clone(),
            format!("{}/health/live", app.address),
            sent.to_owned(),
        );
        async move {
            let response = client
                .get(url)
                .header("X-Request-Id", sent)
                .send()
                .await
                .unwrap();
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(id_of("order-42.retry_1").await, "order-42.retry_1");
    for bad in ["a b", "<script>", &"x".repeat(65), "line\tbreak"] {
        let given = id_of(bad).await;
        assert_ne!(given, bad);
        assert!(!given.is_empty() && given.len() <= 64, "{given}");
    }
}

/// A POST from the client `forwarded_for` names (as a proxy in front of the app says).
async fn post_as(
    app: &TestApp,
    path: &str,
    query: &[(&str, &str)],
    forwarded_for: &str,
    token: Option<&str>,
) -> u16 {
    let mut request = app
        .client
        .post(format!("{}{path}", app.address))
        .query(query)
        .header("X-Forwarded-For", forwarded_for);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn a_flood_naming_a_victim_does_not_lock_the_victim_out() {
    let env = TestEnv::new();
    let secret = "an-edge-test-secret-of-32-bytes-or-more";
    let app = spawn(&env, Role::All, |s| {
        s.auth = Some(gozon::app::config::AuthMode::Jwt);
        s.jwt_secret = Some(secret.into());
        s.message_key = crate::auth::MESSAGE_KEY.into();
        s.rate_limit_per_user = 2;
        s.rate_limit_per_client = 50;
        s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let mint = |scope: Option<&str>| {
        let claims = gozon::web::auth::Claims::new("victim", scope, Duration::from_secs(600));
        gozon::app::mint_token(&claims, Some(secret), None, None).unwrap()
    };
    let (token, top_up) = (mint(None), mint(Some("payments:top_up")));
    assert_eq!(
        post_as(
            &app,
            "/api/payments/create_account",
            &[("user_id", "victim")],
            "198.51.100.200",
            Some(&token)
        )
        .await,
        201
    );
    // 32 clients without a token flood top-ups naming the victim while the victim tops up.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for client in 0..32 {
        let (app, stop) = (TestApp::at(&app.address), stop.clone());
        flood.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let address = format!("203.0.113.{client}");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let query = [("user_id", "victim"), ("amount", "1000")];
                answers
                    .push(post_as(&app, "/api/payments/add_funds", &query, &address, None).await);
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut victims = Vec::new();
    for _ in 0..5 {
        let query = [("user_id", "victim"), ("amount", "1")];
        victims.push(
            post_as(
                &app,
                "/api/payments/add_funds",
                &query,
                "198.51.100.200",
                Some(&top_up),
            )
            .await,
        );
        // Within the victim's own rate (2/s, bursts of 4).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flooded = Vec::new();
    for client in flood {
        flooded.extend(client.await.unwrap());
    }
    assert_eq!(
        victims,
        vec![200; 5],
        "the victim's own top-ups all went through"
    );
    assert!(flooded.len() > 100, "a flood: {} requests", flooded.len());
    assert!(
        flooded.iter().all(|status| [401, 429].contains(status)),
        "{flooded:?}"
    );
    assert!(flooded.contains(&401));
    let balance = app
        .client
        .get(format!(
            "{}/api/payments/balance?user_id=victim",
            app.address
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(balance["balance"], "5.00");
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_bucket() {
    let env = TestEnv::new();
    let limited = |trusted: bool| {
        move |s: &mut Settings| {
            s.rate_limit_per_client = 2;
            if trusted {
                s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            }
        }
    };
    // Client A uses up its bucket (bursts of 4); client B, behind the same proxy, is not held up.
    let proxied = spawn(&env, Role::All, limited(true)).await;
    let burst = |app: TestApp, client: &'static str| async move {
        let mut answers = Vec::new();
        for i in 0..8 {
            let user = format!("{client}-{i}");
            answers.push(
                post_as(
                    &app,
                    "/api/payments/create_account",
                    &[("user_id", &user)],
                    client,
                    None,
                )
                .await,
            );
        }
        answers
    };
    let a = burst(TestApp::at(&proxied.address), "198.51.100.1").await;
    assert!(a.contains(&429), "{a:?}");
    assert_eq!(
        post_as(
            &proxied,
            "/api/payments/create_account",
            &[("user_id", "b-0")],
            "198.51.100.2",
            None
        )
        .await,
        201,
        "another client behind the proxy has a bucket of its own"
    );
    // An untrusted peer's X-Forwarded-For is not believed: every claimed address shares the
    // peer's bucket.
    let env = TestEnv::new();
    let direct = spawn(&env, Role::All, limited(false)).await;
    let a = burst(TestApp::at(&direct.address), "198.51.100.1").await;
    assert!(a.contains(&429), "{a:?}");
    assert_eq!(
        post_as(
            &direct,
            "/api/payments/create_account",
            &[("user_id", "b-0")],
            "198.51.100.2",
            None
        )
        .await,
        429,
        "a made-up X-Forwarded-For from an untrusted peer changes nothing"
    );
}
