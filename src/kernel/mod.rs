//! The shared kernel: the value types both contexts and their messages speak in (parsed once,
//! valid wherever they travel), and the retry pace every reconnecting loop shares.

pub mod backoff;
pub mod money;
pub mod user_id;
