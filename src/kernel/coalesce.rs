//! Lookups by key that arrive together share one query: a lane takes every request waiting
//! when it becomes free, loads their keys at once, and answers each.
//!
//! A request never waits for a batch to fill: when a lane is idle the first request is loaded
//! at once, alone. Only requests that arrive while every lane is busy wait, and then for less
//! than one query. Every answer comes from a query that started after its request did, so a
//! read still sees whatever was committed before it was asked.
//!
//! (Not a crate: the dataloader crates batch by yielding a number of times or for a delay before
//! each load, which slows every lone request, and cache answers, which a read must not.)

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};

use tokio::sync::{Mutex, mpsc, oneshot};

/// The batch could not be loaded: the caller looks its key up alone, to get its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFailed;

struct Ask<K, V> {
    key: K,
    answer: oneshot::Sender<Result<Option<V>, BatchFailed>>,
}

type Asks<K, V> = mpsc::Receiver<Ask<K, V>>;

/// Loads values by key, coalescing concurrent requests into batches.
pub struct Coalescer<K, V, L> {
    lanes: usize,
    max_batch: usize,
    load: Arc<L>,
    /// Made, and the lanes started, on first use: a coalescer can be built outside a runtime.
    queue: OnceLock<mpsc::Sender<Ask<K, V>>>,
}

/// What a coalescer calls with a batch of distinct keys: the values found, by key (a key not
/// among them has no value).
pub trait BatchLoad<K, V>: Send + Sync + 'static {
    type Error: std::fmt::Display;
    fn load(&self, keys: Vec<K>) -> impl Future<Output = Result<Vec<(K, V)>, Self::Error>> + Send;
}

impl<K, V, L> Coalescer<K, V, L>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
    L: BatchLoad<K, V>,
{
    /// `lanes` queries at most at once, each for at most `max_batch` keys.
    pub fn new(load: L, lanes: usize, max_batch: usize) -> Self {
        Coalescer {
            lanes: lanes.max(1),
            max_batch: max_batch.max(1),
            load: Arc::new(load),
            queue: OnceLock::new(),
        }
    }

    /// The value of `key`, if there is one.
    pub async fn get(&self, key: K) -> Result<Option<V>, BatchFailed> {
        let (answer, answered) = oneshot::channel();
        self.queue()
            .send(Ask { key, answer })
            .await
            .map_err(|_| BatchFailed)?;
        answered.await.unwrap_or(Err(BatchFailed))
    }

    fn queue(&self) -> &mpsc::Sender<Ask<K, V>> {
        self.queue.get_or_init(|| {
            // Bounded: when the lanes fall behind, callers wait here instead of piling up.
            let (queue, asks) = mpsc::channel(self.lanes * self.max_batch);
            let asks = Arc::new(Mutex::new(asks));
            for _ in 0..self.lanes {
                let (asks, load, max) = (asks.clone(), self.load.clone(), self.max_batch);
                tokio::spawn(lane(asks, load, max));
            }
            queue
        })
    }
}

/// One lane: take what is waiting (at least one request), load it, answer, again. Ends when
/// the coalescer is dropped.
async fn lane<K, V, L>(asks: Arc<Mutex<Asks<K, V>>>, load: Arc<L>, max_batch: usize)
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
    L: BatchLoad<K, V>,
{
    loop {
        let batch = {
            let mut asks = asks.lock().await;
            let Some(first) = asks.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match asks.try_recv() {
                    Ok(ask) => batch.push(ask),
                    Err(_) => break,
                }
            }
            batch
        };
        let mut keys: Vec<K> = batch.iter().map(|ask| ask.key.clone()).collect();
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        keys.retain(|key| seen.insert(key.clone()));
        match load.load(keys).await {
            Ok(found) => {
                let found: HashMap<K, V> = found.into_iter().collect();
                for ask in batch {
                    let _ = ask.answer.send(Ok(found.get(&ask.key).cloned()));
                }
            }
            Err(error) => {
                tracing::debug!(%error, keys = batch.len(), "a coalesced lookup failed; each asks alone");
                for ask in batch {
                    let _ = ask.answer.send(Err(BatchFailed));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Squares of even numbers; odd ones have no value. Counts its calls and the largest batch.
    #[derive(Default)]
    struct Squares {
        calls: AtomicUsize,
        largest: AtomicUsize,
        fail: bool,
    }

    impl BatchLoad<u64, u64> for Arc<Squares> {
        type Error = &'static str;
        async fn load(&self, keys: Vec<u64>) -> Result<Vec<(u64, u64)>, &'static str> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.largest.fetch_max(keys.len(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.fail {
                return Err("down");
            }
            Ok(keys
                .into_iter()
                .filter(|k| k % 2 == 0)
                .map(|k| (k, k * k))
                .collect())
        }
    }

    #[tokio::test]
    async fn concurrent_lookups_share_queries_and_each_gets_its_own_answer() {
        let squares = Arc::new(Squares::default());
        let coalescer = Arc::new(Coalescer::new(squares.clone(), 2, 64));
        let mut tasks = tokio::task::JoinSet::new();
        for key in 0..200u64 {
            let coalescer = coalescer.clone();
            tasks.spawn(async move { (key, coalescer.get(key % 50).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (key, answer) = done.expect("task");
            let key = key % 50;
            let expected = (key % 2 == 0).then_some(key * key);
            assert_eq!(answer, Ok(expected), "key {key}");
        }
        let calls = squares.calls.load(Ordering::SeqCst);
        assert!(calls < 50, "200 lookups took {calls} queries");
        assert!(squares.largest.load(Ordering::SeqCst) > 1);
        // Duplicate keys in one batch are loaded once.
        assert!(squares.largest.load(Ordering::SeqCst) <= 50);
    }

    #[tokio::test]
    async fn a_lone_lookup_is_loaded_at_once() {
        let squares = Arc::new(Squares::default());
        let coalescer = Coalescer::new(squares.clone(), 1, 64);
        let started = std::time::Instant::now();
        assert_eq!(coalescer.get(4).await, Ok(Some(16)));
        assert_eq!(coalescer.get(3).await, Ok(None));
        assert_eq!(squares.calls.load(Ordering::SeqCst), 2);
        // Two queries of 5 ms each, no waiting for a batch to fill.
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_failed_batch_tells_every_caller() {
        let squares = Arc::new(Squares {
            fail: true,
            ..Squares::default()
        });
        let coalescer = Arc::new(Coalescer::new(squares, 1, 8));
        let lookups = (0..20u64).map(|key| {
            let coalescer = coalescer.clone();
            async move { coalescer.get(key).await }
        });
        for answer in futures_util::future::join_all(lookups).await {
            assert_eq!(answer, Err(BatchFailed));
        }
    }
}
