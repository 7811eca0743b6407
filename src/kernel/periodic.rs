//! Background chores that run every so often until shutdown (purges, the payment-timeout sweep).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
        work().await;
    }
}
