//! Who is calling. With `--auth jwt` every API call carries a verified bearer token whose `sub`
//! is the only user it may act for or read; with `--auth none` (the demo default) anyone acts
//! for anyone. Handlers ask the [`Caller`] for the user they act for, so the owner rule lives
//! here and nowhere else.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::http::StatusCode;
use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaSecurityScheme, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kernel::user_id::UserId;
use crate::web::error::{ApiError, Refused};
use crate::web::params::parse_user_id;

/// The scope a token needs to top up an account (OAuth style, space separated in `scope`).
pub const TOP_UP_SCOPE: &str = "payments:top_up";
/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;
/// What a 401 means, for the spec.
pub const UNAUTHORIZED_DOC: &str = "With `--auth jwt`: no bearer token, or a malformed, expired or \
     wrongly signed one (`unauthorized`, with `WWW-Authenticate: Bearer`).";
/// What a 403 means, for the spec.
pub const FORBIDDEN_DOC: &str =
    "With `--auth jwt`: the token does not act for this user (`forbidden`).";
const TICKET_AUDIENCE: &str = "gozon:events";
const SCHEME: &str = "BearerAuth";

/// The claims Gozon reads from a token (and writes into the ones it mints).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    pub fn new(sub: &str, scope: Option<&str>, ttl: Duration) -> Claims {
        Claims {
            sub: sub.to_owned(),
            exp: now_secs() + ttl.as_secs(),
            scope: scope.map(str::to_owned),
            aud: None,
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Checks tokens (and issues event-stream tickets) for one process.
#[derive(Clone)]
pub struct Authenticator(Option<Arc<Jwt>>);

struct Jwt {
    key: DecodingKey,
    validation: Validation,
    /// Tickets are HS256 under a key of their own, shared by every instance.
    ticket_signing: EncodingKey,
    ticket_key: DecodingKey,
    ticket_validation: Validation,
    ticket_ttl: Duration,
}

impl Authenticator {
    /// `--auth none`: no token is asked for.
    pub fn open() -> Authenticator {
        Authenticator(None)
    }

    /// `--auth jwt`: tokens signed with `key` by `algorithm` (and no other), `exp` required.
    /// `ticket_secret`, the same in every instance, keys the event-stream tickets, which are
    /// valid for `ticket_ttl`.
    pub fn jwt(
        key: DecodingKey,
        algorithm: Algorithm,
        ticket_secret: &[u8],
        ticket_ttl: Duration,
    ) -> Authenticator {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_aud = false;
        let ticket_secret = Sha256::new()
            .chain_update(b"gozon event-stream tickets\0")
            .chain_update(ticket_secret)
            .finalize();
        // Tickets are checked by the clock that issued them: no leeway.
        let mut ticket_validation = Validation::new(Algorithm::HS256);
        ticket_validation.leeway = 0;
        ticket_validation.set_audience(&[TICKET_AUDIENCE]);
        Authenticator(Some(Arc::new(Jwt {
            key,
            validation,
            ticket_signing: EncodingKey::from_secret(&ticket_secret),
            ticket_key: DecodingKey::from_secret(&ticket_secret),
            ticket_validation,
            ticket_ttl,
        })))
    }

    pub fn requires_tokens(&self) -> bool {
        self.0.is_some()
    }

    fn caller(&self, request: &Request, stream: bool) -> Result<Caller, ApiError> {
        let Some(jwt) = &self.0 else {
            return Ok(Caller::Anyone);
        };
        if let Some(token) = bearer_token(request)? {
            return verify(token, &jwt.key, &jwt.validation).map(Caller::User);
        }
        if stream {
            if let Some(ticket) = query_value(request, "ticket") {
                return verify(&ticket, &jwt.ticket_key, &jwt.ticket_validation).map(Caller::User);
            }
            if let Some(token) = query_value(request, "access_token") {
                return verify(&token, &jwt.key, &jwt.validation).map(Caller::User);
            }
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
        let mut claims = Claims::new(principal.user.as_str(), None, jwt.ticket_ttl);
        claims.aud = Some(TICKET_AUDIENCE.to_owned());
        let header = Header::new(Algorithm::HS256);
        match jsonwebtoken::encode(&header, &claims, &jwt.ticket_signing) {
            Ok(ticket) => Ok((ticket, jwt.ticket_ttl)),
            Err(error) => {
                tracing::error!(%error, "cannot sign an event-stream ticket");
                Err(ApiError::internal())
            }
        }
    }
}

/// A ticket for the caller's event stream, from the authenticator serving `request`.
pub fn issue_ticket(request: &Request, caller: &Caller) -> Result<(String, Duration), ApiError> {
    match request.data::<Authenticator>() {
        Some(authenticator) => authenticator.ticket(caller),
        None => Authenticator::open().ticket(caller),
    }
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

fn verify(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Principal, ApiError> {
    let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
        .map_err(|error| {
            let why = match error.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::InvalidSignature => "the token's signature is not valid",
                ErrorKind::InvalidAlgorithm => {
                    "the token is not signed with the expected algorithm"
                }
                ErrorKind::InvalidAudience => "the token is not meant for this use",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim (exp)",
                _ => "the token is malformed",
            };
            unauthorized(why)
        })?
        .claims;
    let user = UserId::parse(&claims.sub)
        .map_err(|_| unauthorized("the token's `sub` is not a user id"))?;
    let scopes = claims
        .scope
        .unwrap_or_default()
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    Ok(Principal { user, scopes })
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

fn extract(request: &Request, stream: bool) -> poem::Result<Caller> {
    let open = Authenticator::open();
    let authenticator = request.data::<Authenticator>().unwrap_or(&open);
    authenticator.caller(request, stream).map_err(|error| {
        let status = error.status;
        poem::Error::new(Refused(error), status)
    })
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
                extract(request, $stream).map($wrap)
            }
        }
    };
}

bearer_extractor!(Caller, false, |caller| caller);

/// The caller of an event stream: as [`Caller`], or, since an EventSource cannot send
/// headers, a `ticket` (from `POST /api/orders/events/ticket`) or the token itself as
/// `access_token` in the query.
#[derive(Debug, Clone)]
pub struct StreamCaller(pub Caller);

bearer_extractor!(StreamCaller, true, StreamCaller);
