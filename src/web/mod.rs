//! The HTTP kit every context's API is built with: the JSON error envelope and the response
//! type that declares an endpoint's statuses, who is calling (auth), parameter parsing, and
//! idempotent POSTs, event streams. It knows
//! no context; the wiring in `app` mounts the contexts' APIs.

pub mod auth;
pub mod edge;
pub mod error;
pub mod idempotency;
pub mod jwks;
pub mod listener;
pub mod params;
pub mod sse;
