//! indicatif progress bars and Ctrl-C for the engine's [`Progress`] trait.

use compactor_core::progress::{CancelFlag, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::{Arc, Mutex, OnceLock};

static CANCEL: OnceLock<Arc<CancelFlag>> = OnceLock::new();

/// Installs the Ctrl-C handler once: the first Ctrl-C asks long steps to stop cleanly.
pub fn cancel_flag() -> Arc<CancelFlag> {
    CANCEL
        .get_or_init(|| {
            let flag = Arc::new(CancelFlag::default());
            let f = flag.clone();
            let _ = ctrlc::set_handler(move || {
                if f.is_set() {
                    std::process::exit(130);
                }
                eprintln!("\nstopping after the current step (Ctrl-C again to quit now)…");
                f.cancel();
            });
            flag
        })
        .clone()
}

pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
    quiet: bool,
    cancel: Arc<CancelFlag>,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        Bar { bar: Mutex::new(None), quiet, cancel: cancel_flag() }
    }
}

impl Progress for Bar {
    fn start(&self, stage: &str, total: u64) {
        if self.quiet {
            return;
        }
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        pb.set_prefix(stage.to_string());
        *self.bar.lock().unwrap() = Some(pb);
    }
    fn inc(&self, n: u64, msg: &str) {
        if let Some(pb) = self.bar.lock().unwrap().as_ref() {
            pb.inc(n);
            if !msg.is_empty() {
                pb.set_message(msg.to_string());
            }
        }
    }
    fn finish(&self) {
        if let Some(pb) = self.bar.lock().unwrap().take() {
            pb.finish_and_clear();
        }
    }
    fn cancelled(&self) -> bool {
        self.cancel.is_set()
    }
}
