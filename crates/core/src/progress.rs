//! Progress reporting and cancellation for long steps. The CLI implements [`Progress`] with an
//! indicatif bar and a Ctrl-C flag; the app with events; tests with [`NoProgress`].

use std::sync::atomic::{AtomicBool, Ordering};

pub trait Progress: Sync {
    /// A new stage begins with `total` units of work.
    fn start(&self, _stage: &str, _total: u64) {}
    /// `n` more units are done; `msg` says on what.
    fn inc(&self, _n: u64, _msg: &str) {}
    fn finish(&self) {}
    /// True once the user asked to stop; long loops check it between units.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing and never cancels.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A cancel flag shared with a signal handler or a UI button.
#[derive(Default)]
pub struct CancelFlag(pub AtomicBool);
impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Returns `Err(Cancelled)` if the user asked to stop.
pub fn check(p: &dyn Progress) -> crate::Result<()> {
    if p.cancelled() { Err(crate::Error::Cancelled) } else { Ok(()) }
}
