//! Background chores that run every so often until shutdown (purges, the payment-timeout sweep).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The longest one run of a chore may take: a server that vanished mid-chore (its connection
/// silent) is given up on, and the next run starts afresh.
const CHORE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `work` every `interval` until `shutdown`; `work` reports its own failures.
pub async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        if tokio::time::timeout(CHORE_LIMIT, work()).await.is_err() {
            tracing::warn!(limit = ?CHORE_LIMIT, "a periodic chore took too long and was dropped");
        }
    }
}
