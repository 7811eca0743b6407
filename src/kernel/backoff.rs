//! How every loop that waits for a server (PostgreSQL, RabbitMQ) to come back paces itself:
//! one jittered exponential backoff, from `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The longest pause between two attempts.
pub const MAX_PAUSE: Duration = Duration::from_secs(5);

/// 100 ms doubling, jittered, forever (backon's jitter may add up to the delay itself, so
/// [`Delays`] caps each pause at [`MAX_PAUSE`]).
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// The pauses of one run of failures; start a new one after a success.
pub struct Delays(backon::ExponentialBackoff);

impl Delays {
    pub fn new() -> Delays {
        Delays(policy().build())
    }

    /// The pause before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.0.next().unwrap_or(MAX_PAUSE).min(MAX_PAUSE)
    }
}

impl Default for Delays {
    fn default() -> Self {
        Delays::new()
    }
}
