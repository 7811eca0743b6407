//! Who is calling. With `--auth jwt` every API call carries a verified bearer token whose `sub`
//! is the only user it may act for or read; with `--auth none` (the demo default) anyone acts
//! for anyone. Handlers ask the [`Caller`] for the user they act for, so the owner rule lives
//! here and nowhere else.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::http::StatusCode;
use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaSecurityScheme, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::kernel::user_id::UserId;
use crate::web::edge::PostLimits;
use crate::web::error::{ApiError, Refused};
use crate::web::jwks::{Jwks, KeyError};
use crate::web::params::parse_user_id;

/// The scope a token needs to top up an account (OAuth style, space separated in `scope`).
pub const TOP_UP_SCOPE: &str = "payments:top_up";
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 5;
/// What a 401 means, for the spec.
pub const UNAUTHORIZED_DOC: &str = "With `--auth jwt`: no bearer token, or a malformed, expired or \
     wrongly signed one (`unauthorized`, with `WWW-Authenticate: Bearer`).";
/// What a 403 means, for the spec.
pub const FORBIDDEN_DOC: &str =
    "With `--auth jwt`: the token does not act for this user (`forbidden`).";
const TICKET_AUDIENCE: &str = "gozon:events";
/// The label that separates the ticket key from the secret it is derived from: a ticket signed
/// with the secret itself (a token, or anything else made with it) is no ticket.
const TICKET_KEY_LABEL: &[u8] = b"gozon event-stream ticket key v2";
const SCHEME: &str = "BearerAuth";

/// The claims Gozon writes into the tokens and tickets it mints.
#[derive(Debug, Serialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

impl Claims {
    pub fn new(sub: &str, scope: Option<&str>, ttl: Duration) -> Claims {
        let now = now_secs();
        Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs(),
            iat: now,
            scope: scope.map(str::to_owned),
            aud: None,
            iss: None,
        }
    }
}

/// The claims Gozon reads from a token (`aud`, `iss` and `nbf` are checked by the decoder).
#[derive(Debug, Deserialize)]
struct Presented {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The key a ticket is signed with: derived from `secret` (the JWT secret, or
/// GOZON_EVENTS_TICKET_KEY) under a label of its own.
pub fn ticket_key(secret: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(TICKET_KEY_LABEL);
    mac.finalize().into_bytes().to_vec()
}

/// Where the keys that check tokens come from.
pub enum TokenKeys {
    /// One key: the HS256 secret, or a PEM public key.
    Fixed(Arc<DecodingKey>, Algorithm),
    /// An identity provider's JWKS; a token picks its key by `kid`.
    Provider(Jwks),
}

/// What jwt mode checks besides the signature.
pub struct JwtRules {
    pub keys: TokenKeys,
    /// `iss` must be this, when set (required in public-key mode).
    pub issuer: Option<String>,
    /// `aud` must name this, when set (required in public-key mode).
    pub audience: Option<String>,
    /// The longest lifetime a token may have (`exp` - `iat`, and `exp` - now).
    pub max_ttl: Duration,
    /// The key event-stream tickets are signed with ([`ticket_key`]); None where this process
    /// serves no event stream (the payments role in public-key mode does not hold it).
    pub ticket_key: Option<Vec<u8>>,
    pub ticket_ttl: Duration,
}

/// Checks tokens (and issues event-stream tickets) for one process.
#[derive(Clone)]
pub struct Authenticator(Option<Arc<Jwt>>);

struct Jwt {
    keys: TokenKeys,
    /// The checks every token passes; the algorithm is set per key.
    validation: Validation,
    max_ttl: Duration,
    tickets: Option<Tickets>,
}

/// Tickets are HS256 under a key only the orders role holds, shared by its instances.
struct Tickets {
    signing: EncodingKey,
    key: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Authenticator {
    /// `--auth none`: no token is asked for.
    pub fn open() -> Authenticator {
        Authenticator(None)
    }

    /// `--auth jwt`: tokens checked by `rules` (the algorithm pinned to the key's, `exp`
    /// required, `nbf` honoured).
    pub fn jwt(rules: JwtRules) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = rules.audience.is_some();
        if let Some(audience) = &rules.audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        if let Some(issuer) = &rules.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        let tickets = rules.ticket_key.map(|secret| {
            // Tickets are checked by the clock that issued them: no leeway.
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = 0;
            validation.set_audience(&[TICKET_AUDIENCE]);
            Tickets {
                signing: EncodingKey::from_secret(&secret),
                key: DecodingKey::from_secret(&secret),
                validation,
                ttl: rules.ticket_ttl,
            }
        });
        Authenticator(Some(Arc::new(Jwt {
            keys: rules.keys,
            validation,
            max_ttl: rules.max_ttl,
            tickets,
        })))
    }

    pub fn requires_tokens(&self) -> bool {
        self.0.is_some()
    }

    async fn caller(&self, request: &Request, stream: bool) -> Result<Caller, ApiError> {
        let Some(jwt) = &self.0 else {
            return Ok(Caller::Anyone);
        };
        if let Some(token) = bearer_token(request)? {
            return jwt.verify_token(token).await.map(Caller::User);
        }
        if stream && let Some(ticket) = query_value(request, "ticket") {
            let Some(tickets) = &jwt.tickets else {
                return Err(unauthorized("this server issues no event-stream tickets"));
            };
            return verify(&ticket, &tickets.key, &tickets.validation, None).map(Caller::User);
        }
        Err(unauthorized(
            "a bearer token is required (Authorization: Bearer <token>)",
        ))
    }

    /// A ticket for the caller's event stream and how long it is valid; only in jwt mode.
    fn ticket(&self, caller: &Caller) -> Result<(String, Duration), ApiError> {
        let (Some(jwt), Caller::User(principal)) = (&self.0, caller) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "auth_disabled",
                "tickets are issued only when the server runs with --auth jwt",
            ));
        };
        let Some(tickets) = &jwt.tickets else {
            tracing::error!("an event-stream ticket was asked of a process without a ticket key");
            return Err(ApiError::internal());
        };
        // A ticket never outlives the token it was issued for.
        let ttl = Duration::from_secs(
            principal
                .expires_at
                .saturating_sub(now_secs())
                .min(tickets.ttl.as_secs()),
        );
        let mut claims = Claims::new(principal.user.as_str(), None, ttl);
        claims.aud = Some(TICKET_AUDIENCE.to_owned());
        let header = Header::new(Algorithm::HS256);
        match jsonwebtoken::encode(&header, &claims, &tickets.signing) {
            Ok(ticket) => Ok((ticket, ttl)),
            Err(error) => {
                tracing::error!(%error, "cannot sign an event-stream ticket");
                Err(ApiError::internal())
            }
        }
    }
}

impl Jwt {
    async fn verify_token(&self, token: &str) -> Result<Principal, ApiError> {
        let (key, algorithm) = match &self.keys {
            TokenKeys::Fixed(key, algorithm) => (key.clone(), *algorithm),
            TokenKeys::Provider(jwks) => {
                let kid = jsonwebtoken::decode_header(token)
                    .map_err(|_| unauthorized("the token is malformed"))?
                    .kid
                    .ok_or_else(|| unauthorized("the token names no signing key (kid)"))?;
                let (key, algorithm) = jwks.key(&kid).await.map_err(|error| match error {
                    KeyError::Unknown => unauthorized("the token's signing key is not known"),
                    KeyError::Unavailable => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service_unavailable",
                        "tokens cannot be checked right now (the identity provider does not answer); try again shortly",
                    ),
                })?;
                (key, algorithm)
            }
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![algorithm];
        verify(token, &key, &validation, Some(self.max_ttl))
    }
}

/// A ticket for the caller's event stream, from the authenticator serving `request`.
pub fn issue_ticket(request: &Request, caller: &Caller) -> Result<(String, Duration), ApiError> {
    match request.data::<Authenticator>() {
        Some(authenticator) => authenticator.ticket(caller),
        None => Err(no_authenticator()),
    }
}

/// A route mounted without its Authenticator is a wiring fault: it fails closed.
fn no_authenticator() -> ApiError {
    tracing::error!("a request reached the API with no Authenticator: refused");
    ApiError::internal()
}

fn bearer_token(request: &Request) -> Result<Option<&str>, ApiError> {
    let Some(header) = request.headers().get(poem::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty());
    token
        .map(Some)
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))
}

fn query_value(request: &Request, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// Checks `token` against `key` and `validation`, and its lifetime against `max_ttl` when given.
fn verify(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
    max_ttl: Option<Duration>,
) -> Result<Principal, ApiError> {
    let claims = jsonwebtoken::decode::<Presented>(token, key, validation)
        .map_err(|error| {
            let why = match error.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                ErrorKind::InvalidSignature => "the token's signature is not valid",
                ErrorKind::InvalidAlgorithm => {
                    "the token is not signed with the expected algorithm"
                }
                ErrorKind::InvalidAudience => "the token is not meant for this service (aud)",
                ErrorKind::InvalidIssuer => "the token is not from the expected issuer (iss)",
                ErrorKind::MissingRequiredClaim(_) => {
                    "the token lacks a required claim (exp, or iss and aud)"
                }
                _ => "the token is malformed",
            };
            unauthorized(why)
        })?
        .claims;
    if let Some(max_ttl) = max_ttl {
        let max = max_ttl.as_secs();
        let issued_too_long = claims
            .iat
            .is_some_and(|iat| claims.exp.saturating_sub(iat) > max);
        let lasts_too_long = claims.exp.saturating_sub(now_secs()) > max + LEEWAY_SECS;
        if issued_too_long || lasts_too_long {
            return Err(unauthorized(&format!(
                "the token is valid for longer than this server accepts ({max} s)"
            )));
        }
    }
    let user = UserId::parse(&claims.sub)
        .map_err(|_| unauthorized("the token's `sub` is not a user id"))?;
    let scopes = claims
        .scope
        .unwrap_or_default()
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    Ok(Principal {
        user,
        scopes,
        expires_at: claims.exp,
    })
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        .with_header("www-authenticate", "Bearer")
}

/// The user a verified token speaks for, and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: UserId,
    scopes: Vec<String>,
    /// The token's (or ticket's) `exp`, in seconds since the epoch.
    pub expires_at: u64,
}

/// The caller of an operation. As an extractor it declares the bearer scheme in the spec (with
/// the empty alternative, since `--auth none` needs none) and answers 401 for a bad token.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `--auth none`: acts for anyone.
    Anyone,
    User(Principal),
}

impl Caller {
    /// The user named by the `user_id` parameter, if this caller may act for them: 400 when it
    /// is not a user id, 403 `forbidden` when it is someone else.
    pub fn acting_for(&self, user_id: &str) -> Result<UserId, ApiError> {
        let user = parse_user_id(user_id)?;
        match self {
            Caller::User(principal) if principal.user != user => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token does not act for that user",
            )),
            _ => Ok(user),
        }
    }

    /// As [`Caller::acting_for`], and the token must carry `scope` (403 `insufficient_scope`).
    pub fn acting_with_scope(&self, user_id: &str, scope: &str) -> Result<UserId, ApiError> {
        let user = self.acting_for(user_id)?;
        match self {
            Caller::User(principal) if !principal.scopes.iter().any(|s| s == scope) => {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    format!("this call needs the `{scope}` scope"),
                ))
            }
            _ => Ok(user),
        }
    }

    /// Whether this caller may see what `owner` owns (an order by id: someone else's is
    /// answered as if it did not exist).
    pub fn may_read(&self, owner: &UserId) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::User(principal) => &principal.user == owner,
        }
    }

    /// The verified user, if there is one.
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Anyone => None,
            Caller::User(principal) => Some(principal),
        }
    }
}

/// Who is calling, then (for a POST) the per-user rate limit, keyed on the verified user in jwt
/// mode: a flood of requests that fail authentication never touches anyone's bucket.
async fn extract(request: &Request, stream: bool) -> poem::Result<Caller> {
    let refuse = |error: ApiError| {
        let status = error.status;
        poem::Error::new(Refused(error), status)
    };
    let authenticator = request
        .data::<Authenticator>()
        .ok_or_else(|| refuse(no_authenticator()))?;
    let caller = authenticator
        .caller(request, stream)
        .await
        .map_err(refuse)?;
    if let Some(limits) = request.data::<PostLimits>() {
        let user = match &caller {
            Caller::User(principal) => Some(principal.user.as_str().to_owned()),
            Caller::Anyone => query_value(request, "user_id"),
        };
        if let Some(refusal) = user.and_then(|user| limits.check_user(request, user)) {
            return Err(refuse(refusal));
        }
    }
    Ok(caller)
}

fn register_scheme(registry: &mut Registry) {
    registry.create_security_scheme(
        SCHEME,
        MetaSecurityScheme {
            ty: "http",
            description: Some(
                "With `--auth jwt`: a JWT whose `sub` is the user acted for; top-ups also need \
                 the `payments:top_up` scope. Not needed with `--auth none`.",
            ),
            name: None,
            key_in: None,
            scheme: Some("bearer"),
            bearer_format: Some("JWT"),
            flows: None,
            openid_connect_url: None,
        },
    );
}

/// Implements the extractor for a caller type: the bearer scheme in the spec (with the empty
/// alternative, since `--auth none` needs none), and `extract` with `stream` as given.
macro_rules! bearer_extractor {
    ($caller:ty, $stream:expr, $wrap:expr) => {
        impl<'a> ApiExtractor<'a> for $caller {
            const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
            type ParamType = ();
            type ParamRawType = ();

            fn register(registry: &mut Registry) {
                register_scheme(registry);
            }

            fn security_schemes() -> Vec<&'static str> {
                vec![SCHEME]
            }

            fn has_security_fallback() -> bool {
                true
            }

            async fn from_request(
                request: &'a Request,
                _body: &mut RequestBody,
                _options: ExtractParamOptions<()>,
            ) -> poem::Result<$caller> {
                extract(request, $stream).await.map($wrap)
            }
        }
    };
}

bearer_extractor!(Caller, false, |caller| caller);

/// The caller of an event stream: as [`Caller`], or, since an EventSource cannot send
/// headers, a `ticket` (from `POST /api/orders/events/ticket`) in the query. A token never
/// goes in a URL (URLs end up in logs).
#[derive(Debug, Clone)]
pub struct StreamCaller(pub Caller);

bearer_extractor!(StreamCaller, true, StreamCaller);
