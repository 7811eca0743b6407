//! The shared kernel: the value types both contexts and their messages speak in (parsed once,
//! valid wherever they travel), the retry pace every reconnecting loop shares, the loop of
//! periodic chores, the coalescing of concurrent reads, and the duties readiness watches.

pub mod backoff;
pub mod coalesce;
pub mod duty;
pub mod money;
pub mod periodic;
pub mod user_id;
