//! The door every request passes: security headers on every response, a client's request id
//! kept only when it is sane, a time limit on producing a response, and rate limits on POSTs.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
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

/// Rate limits on POSTs: per client address and per user, each a token bucket. The client is
/// the TCP peer, or, when the peer is a trusted proxy (`--trusted-proxies`), the address that
/// proxy put in `X-Forwarded-For`. The user is the verified token's subject in jwt mode (checked
/// after authentication, by the auth extractor), the `user_id` parameter in none mode.
#[derive(Clone)]
pub struct PostLimits(Option<Arc<Limits>>);

struct Limits {
    /// Made once: making a clock reads the CPU's features and calibrates.
    clock: DefaultClock,
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    per_user: DefaultKeyedRateLimiter<String>,
    trusted_proxies: Vec<IpNet>,
    checks: AtomicU64,
}

impl PostLimits {
    /// `None` turns a limit off. Bursts are twice the rate.
    pub fn new(
        per_client_per_sec: Option<u32>,
        per_user_per_sec: Option<u32>,
        trusted_proxies: Vec<IpNet>,
    ) -> PostLimits {
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
            trusted_proxies,
            checks: AtomicU64::new(0),
        })))
    }

    /// The limits of a POST, if `request` is one.
    fn of_post(&self, request: &Request) -> Option<&Limits> {
        let limits = self.0.as_ref()?;
        if request.method() != Method::POST {
            return None;
        }
        // Forget idle buckets now and then, so the maps stay as large as the active clients.
        if limits.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            limits.per_client.retain_recent();
            limits.per_user.retain_recent();
        }
        Some(limits)
    }

    /// The per-client limit: None when `request` may go on; else the 429 to answer.
    pub fn check_client(&self, request: &Request) -> Option<ApiError> {
        let limits = self.of_post(request)?;
        let client = client_address(request, &limits.trusted_proxies)?;
        let refused = limits.per_client.check_key(&client).err()?;
        Some(rate_limited(refused.wait_time_from(limits.clock.now())))
    }

    /// The per-user limit for `user`: None when `request` may go on; else the 429 to answer.
    pub fn check_user(&self, request: &Request, user: String) -> Option<ApiError> {
        let limits = self.of_post(request)?;
        let refused = limits.per_user.check_key(&user).err()?;
        Some(rate_limited(refused.wait_time_from(limits.clock.now())))
    }
}

fn rate_limited(wait: Duration) -> ApiError {
    let seconds = retry_after(wait);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; try again in {seconds} s"),
    )
    .with_header("retry-after", seconds.to_string())
}

/// The client a request comes from: the TCP peer, unless the peer is a trusted proxy; then the
/// nearest address in `X-Forwarded-For` that is not a trusted proxy (each proxy appends the
/// address it saw, so what lies further left was written by someone not trusted). A header a
/// trusted proxy sent that cannot be read leaves the proxy itself as the client.
pub fn client_address(request: &Request, trusted: &[IpNet]) -> Option<IpAddr> {
    match request.remote_addr() {
        RemoteAddr(poem::Addr::SocketAddr(address)) => Some(client_behind(
            canonical(address.ip()),
            request.headers(),
            trusted,
        )),
        _ => None,
    }
}

fn client_behind(peer: IpAddr, headers: &poem::http::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for hop in value.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(canonical(ip)),
                Err(_) => return peer,
            }
        }
    }
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    client
}

/// An IPv4 address is one key whether it arrives as such or IPv4-mapped in IPv6.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The pause a refused request is told to wait, at least a second.
pub fn retry_after(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem::http::HeaderMap;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append("x-forwarded-for", value.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let proxy = ip("10.0.0.5");
        // An untrusted peer: its header is not believed.
        assert_eq!(
            client_behind(ip("203.0.113.9"), &headers(&["198.51.100.1"]), &trusted),
            ip("203.0.113.9")
        );
        // A trusted proxy: the address it saw (the rightmost), not what the client claimed.
        assert_eq!(
            client_behind(proxy, &headers(&["1.2.3.4, 198.51.100.1"]), &trusted),
            ip("198.51.100.1")
        );
        // Two trusted proxies in a row, and the header split over two lines.
        assert_eq!(
            client_behind(proxy, &headers(&["198.51.100.1", "10.0.0.7"]), &trusted),
            ip("198.51.100.1")
        );
        // No header, or one that cannot be read: the proxy itself.
        assert_eq!(client_behind(proxy, &headers(&[]), &trusted), proxy);
        assert_eq!(
            client_behind(proxy, &headers(&["nonsense"]), &trusted),
            proxy
        );
        // Nothing trusted (the default): the peer, whatever it sends.
        assert_eq!(
            client_behind(proxy, &headers(&["198.51.100.1"]), &[]),
            proxy
        );
        // IPv4-mapped IPv6 is the same client as IPv4.
        assert_eq!(
            client_behind(proxy, &headers(&["::ffff:198.51.100.1"]), &trusted),
            ip("198.51.100.1")
        );
    }
}
