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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};

/// Why a lookup has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed<E> {
    /// The batch's query failed; every caller in it gets the same error.
    Load(E),
    /// The query took longer than the coalescer allows (a hung connection, say): given up, and
    /// the lane free again.
    TimedOut,
    /// The query panicked, or the coalescer is gone (shutting down).
    Gone,
}

type Answer<V, E> = Result<Option<V>, Failed<E>>;

struct Ask<K, V, E> {
    key: K,
    answer: oneshot::Sender<Answer<V, E>>,
}

type Asks<K, V, E> = mpsc::Receiver<Ask<K, V, E>>;

/// What a coalescer calls with a batch of distinct keys: the values found, by key (a key not
/// among them has no value).
pub trait BatchLoad<K, V>: Send + Sync + 'static {
    /// Handed to every caller of a failed batch.
    type Error: Clone + Send + 'static;
    fn load(&self, keys: Vec<K>) -> impl Future<Output = Result<Vec<(K, V)>, Self::Error>> + Send;
}

/// How a coalescer runs: `lanes` queries at most at once, each for at most `max_batch` keys and
/// for at most `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Lanes {
    pub lanes: usize,
    pub max_batch: usize,
    pub timeout: Duration,
}

impl Lanes {
    /// For the GETs: 4 queries at once (with a pool of 16 connections, reads leave room for the
    /// saga; 32 concurrent readers share 4 queries of about 8 keys), at most 64 keys each, each
    /// given 10 s (a hung connection must not hold a lane for ever).
    pub const READS: Lanes = Lanes {
        lanes: 4,
        max_batch: 64,
        timeout: Duration::from_secs(10),
    };
}

/// Loads values by key, coalescing concurrent requests into batches.
pub struct Coalescer<K, V, L: BatchLoad<K, V>> {
    lanes: Lanes,
    load: Arc<L>,
    /// Made, and the lanes started, on first use: a coalescer can be built outside a runtime.
    queue: OnceLock<mpsc::Sender<Ask<K, V, L::Error>>>,
}

impl<K, V, L> Coalescer<K, V, L>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
    L: BatchLoad<K, V>,
{
    pub fn new(load: L, lanes: Lanes) -> Self {
        Coalescer {
            lanes: Lanes {
                lanes: lanes.lanes.max(1),
                max_batch: lanes.max_batch.max(1),
                timeout: lanes.timeout,
            },
            load: Arc::new(load),
            queue: OnceLock::new(),
        }
    }

    /// The value of `key`, if there is one.
    pub async fn get(&self, key: K) -> Answer<V, L::Error> {
        let (answer, answered) = oneshot::channel();
        self.queue()
            .send(Ask { key, answer })
            .await
            .map_err(|_| Failed::Gone)?;
        answered.await.unwrap_or(Err(Failed::Gone))
    }

    fn queue(&self) -> &mpsc::Sender<Ask<K, V, L::Error>> {
        self.queue.get_or_init(|| {
            let Lanes {
                lanes, max_batch, ..
            } = self.lanes;
            // Bounded: when the lanes fall behind, callers wait here instead of piling up.
            let (queue, asks) = mpsc::channel(lanes * max_batch);
            let asks = Arc::new(Mutex::new(asks));
            for _ in 0..lanes {
                tokio::spawn(lane(asks.clone(), self.load.clone(), self.lanes));
            }
            queue
        })
    }
}

/// One lane: take what is waiting (at least one request), load it, answer, again. Ends when
/// the coalescer is dropped.
async fn lane<K, V, L>(asks: Arc<Mutex<Asks<K, V, L::Error>>>, load: Arc<L>, lanes: Lanes)
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
    L: BatchLoad<K, V>,
{
    loop {
        let mut batch = {
            let mut asks = asks.lock().await;
            let Some(first) = asks.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < lanes.max_batch {
                match asks.try_recv() {
                    Ok(ask) => batch.push(ask),
                    Err(_) => break,
                }
            }
            batch
        };
        // A caller that gave up (its request timed out or its client left) needs no answer.
        batch.retain(|ask| !ask.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut seen = HashSet::with_capacity(batch.len());
        let keys: Vec<K> = batch
            .iter()
            .map(|ask| ask.key.clone())
            .filter(|key| seen.insert(key.clone()))
            .collect();
        let outcome = load_within(&load, keys, lanes.timeout).await;
        match outcome {
            Ok(found) => {
                let found: HashMap<K, V> = found.into_iter().collect();
                for ask in batch {
                    let _ = ask.answer.send(Ok(found.get(&ask.key).cloned()));
                }
            }
            Err(failed) => {
                for ask in batch {
                    let _ = ask.answer.send(Err(failed.clone()));
                }
            }
        }
    }
}

/// Runs one load in a task of its own (a panic fails the batch, not the lane), for at most
/// `timeout` (then it is aborted).
async fn load_within<K, V, L>(
    load: &Arc<L>,
    keys: Vec<K>,
    timeout: Duration,
) -> Result<Vec<(K, V)>, Failed<L::Error>>
where
    K: Send + 'static,
    V: Send + 'static,
    L: BatchLoad<K, V>,
{
    let load = load.clone();
    let mut task = tokio::spawn(async move { load.load(keys).await });
    match tokio::time::timeout(timeout, &mut task).await {
        Ok(Ok(loaded)) => loaded.map_err(Failed::Load),
        Ok(Err(error)) => {
            tracing::error!(%error, "a coalesced lookup panicked");
            Err(Failed::Gone)
        }
        Err(_) => {
            task.abort();
            tracing::warn!(?timeout, "a coalesced lookup timed out");
            Err(Failed::TimedOut)
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
            if keys.contains(&13) {
                panic!("unlucky");
            }
            if keys.contains(&99) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(keys
                .into_iter()
                .filter(|k| k % 2 == 0)
                .map(|k| (k, k * k))
                .collect())
        }
    }

    fn lanes(lanes: usize, max_batch: usize) -> Lanes {
        Lanes {
            lanes,
            max_batch,
            timeout: Duration::from_millis(500),
        }
    }

    #[tokio::test]
    async fn a_panicking_or_hanging_batch_fails_its_callers_and_the_lane_goes_on() {
        let squares = Arc::new(Squares::default());
        let coalescer = Coalescer::new(squares.clone(), lanes(1, 64));
        assert_eq!(coalescer.get(13).await, Err(Failed::Gone));
        assert_eq!(coalescer.get(99).await, Err(Failed::TimedOut));
        // The one lane still answers.
        assert_eq!(coalescer.get(4).await, Ok(Some(16)));
    }

    #[tokio::test]
    async fn concurrent_lookups_share_queries_and_each_gets_its_own_answer() {
        let squares = Arc::new(Squares::default());
        let coalescer = Arc::new(Coalescer::new(squares.clone(), lanes(2, 64)));
        let mut tasks = tokio::task::JoinSet::new();
        for key in 0..200u64 {
            let coalescer = coalescer.clone();
            tasks.spawn(async move { (key, coalescer.get(key % 50 + 100).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (key, answer) = done.expect("task");
            let key = key % 50 + 100;
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
        let coalescer = Coalescer::new(squares.clone(), lanes(1, 64));
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
        let coalescer = Arc::new(Coalescer::new(squares, lanes(1, 8)));
        let lookups = (0..20u64).map(|key| {
            let coalescer = coalescer.clone();
            async move { coalescer.get(key).await }
        });
        for answer in futures_util::future::join_all(lookups).await {
            assert_eq!(answer, Err(Failed::Load("down")));
        }
    }
}
