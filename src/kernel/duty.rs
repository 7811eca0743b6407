//! A background task that serving depends on, and whether it is doing its work right now: the
//! task raises its flag once it is, lowers it while it is not, and readiness reports every
//! lowered one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Debug)]
pub struct Duty {
    name: &'static str,
    up: Arc<AtomicBool>,
}

impl Duty {
    /// A duty named `name` (as readiness reports it), not yet done.
    pub fn new(name: &'static str) -> Duty {
        Duty {
            name,
            up: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn set(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}
