//! The door every request passes: security headers on every response, a client's request id
//! kept only when it is sane, a time limit on producing a response, and rate limits on POSTs.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use poem::http::{HeaderValue, Method, StatusCode};
use poem::web::RemoteAddr;
use poem::{Endpoint, IntoResponse, Request, Response};

use crate::web::error::ApiError;

/// The page has no inline script or style; nothing may frame it.
const CSP: &str = "default-src 'self'; frame-ancestors 'none'; object-src 'none'";
/// Swagger UI is one page of inline script and style.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; \
     object-src 'none'";
const REQUEST_ID: &str = "x-request-id";

/// Adds the security headers to `response` (of a request for `path`).
pub fn secure(path: &str, mut response: Response) -> Response {
    let headers = response.headers_mut();
    let csp = if path.starts_with("/docs") {
        DOCS_CSP
    } else {
        CSP
    };
    headers.insert("content-security-policy", HeaderValue::from_static(csp));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// A client's `X-Request-Id` becomes the saga's correlation id and lands in every log line:
/// it is kept only when it is 1-64 characters of letters, digits, `-`, `_`, `.` or `:`;
/// otherwise it is dropped and a fresh one is made.
pub fn drop_unsafe_request_id(request: &mut Request) {
    let safe = request.headers().get(REQUEST_ID).is_none_or(|value| {
        value.to_str().is_ok_and(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
    });
    if !safe {
        request.headers_mut().remove(REQUEST_ID);
    }
}

/// How long a handler may take to produce its response (a stream's body is not counted: its
/// handler answers at once).
pub async fn within<E: Endpoint>(ep: &E, request: Request, limit: Duration) -> Response {
    match tokio::time::timeout(limit, ep.call(request)).await {
        Ok(Ok(response)) => response.into_response(),
        Ok(Err(error)) => error.into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            format!(
                "the request took longer than {} s; try again",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Rate limits on POSTs: per client address and per `user_id`, each a token bucket.
#[derive(Clone)]
pub struct PostLimits(Option<Arc<Limits>>);

struct Limits {
    /// Made once: making a clock reads the CPU's features and calibrates.
    clock: DefaultClock,
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    per_user: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl PostLimits {
    /// `None` turns a limit off. Bursts are twice the rate.
    pub fn new(per_client_per_sec: Option<u32>, per_user_per_sec: Option<u32>) -> PostLimits {
        const TWO: NonZeroU32 = NonZeroU32::new(2).unwrap();
        let quota = |rate: Option<u32>| {
            let rate = rate.and_then(NonZeroU32::new).unwrap_or(NonZeroU32::MAX);
            Quota::per_second(rate).allow_burst(rate.saturating_mul(TWO))
        };
        if per_client_per_sec.is_none() && per_user_per_sec.is_none() {
            return PostLimits(None);
        }
        PostLimits(Some(Arc::new(Limits {
            clock: DefaultClock::default(),
            per_client: RateLimiter::keyed(quota(per_client_per_sec)),
            per_user: RateLimiter::keyed(quota(per_user_per_sec)),
            checks: AtomicU64::new(0),
        })))
    }

    /// None when `request` may go on; else the 429 to answer, with `Retry-After`.
    pub fn check(&self, request: &Request) -> Option<ApiError> {
        let limits = self.0.as_ref()?;
        if request.method() != Method::POST {
            return None;
        }
        // Forget idle buckets now and then, so the maps stay as large as the active clients.
        if limits.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            limits.per_client.retain_recent();
            limits.per_user.retain_recent();
        }
        let client = match request.remote_addr() {
            RemoteAddr(poem::Addr::SocketAddr(address)) => Some(address.ip()),
            _ => None,
        };
        let refused_client = client.and_then(|ip| limits.per_client.check_key(&ip).err());
        let refused = refused_client.or_else(|| {
            let user = user_id(request)?;
            limits.per_user.check_key(&user).err()
        })?;
        let seconds = retry_after(refused.wait_time_from(limits.clock.now()));
        Some(
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests; try again in {seconds} s"),
            )
            .with_header("retry-after", seconds.to_string()),
        )
    }
}

fn user_id(request: &Request) -> Option<String> {
    let query = request.uri().query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find_map(|(key, value)| (key == "user_id").then_some(value))
}

/// The pause a refused request is told to wait, at least a second.
pub fn retry_after(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}
