//! The shared kernel: the value types both contexts and their messages speak in (parsed once,
//! valid wherever they travel), the retry pace every reconnecting loop shares, and the loop of
//! periodic chores.

pub mod backoff;
pub mod money;
pub mod periodic;
pub mod user_id;
