//! The engine's [`Progress`] trait over a Tauri IPC channel: every long command gets a channel
//! from the page and a cancel flag registered under its job id.

use compactor_core::progress::{CancelFlag, Progress};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tauri::ipc::Channel;

/// One message of a job, as the page receives it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobEvent {
    /// A stage begins (`compress`, `calibrate`, `perplexity`, `spectra`, …).
    Stage { stage: String, total: u64, elapsed: f64 },
    /// `done` of `total` units of the current stage; `msg` says on what (a layer name, …).
    Progress { stage: String, done: u64, total: u64, msg: String, elapsed: f64, stage_elapsed: f64 },
    /// A free-form line for the log (what the app itself does between engine stages).
    Note { text: String, elapsed: f64 },
    /// A result row streamed before the command returns (e.g. one layer's spectrum).
    Row { row: serde_json::Value },
}

struct StageState {
    name: String,
    total: u64,
    done: u64,
    started: Instant,
    last_sent: Instant,
}

pub struct ChannelProgress {
    channel: Channel<JobEvent>,
    cancel: Arc<CancelFlag>,
    t0: Instant,
    stage: Mutex<StageState>,
}

impl ChannelProgress {
    pub fn new(channel: Channel<JobEvent>, cancel: Arc<CancelFlag>) -> Self {
        let now = Instant::now();
        ChannelProgress {
            channel,
            cancel,
            t0: now,
            stage: Mutex::new(StageState { name: String::new(), total: 0, done: 0, started: now, last_sent: now }),
        }
    }

    pub fn note(&self, text: impl Into<String>) {
        let _ = self.channel.send(JobEvent::Note { text: text.into(), elapsed: self.t0.elapsed().as_secs_f64() });
    }

    pub fn row(&self, row: serde_json::Value) {
        let _ = self.channel.send(JobEvent::Row { row });
    }
}

impl Progress for ChannelProgress {
    fn start(&self, stage: &str, total: u64) {
        let now = Instant::now();
        {
            let mut s = self.stage.lock().unwrap();
            *s = StageState { name: stage.to_string(), total, done: 0, started: now, last_sent: now };
        }
        let _ = self.channel.send(JobEvent::Stage { stage: stage.to_string(), total, elapsed: self.t0.elapsed().as_secs_f64() });
    }

    fn inc(&self, n: u64, msg: &str) {
        let ev = {
            let mut s = self.stage.lock().unwrap();
            s.done += n;
            let now = Instant::now();
            // named steps (layers) always go out; anonymous ticks at most 20 times a second
            if msg.is_empty() && s.done < s.total && now.duration_since(s.last_sent) < Duration::from_millis(50) {
                return;
            }
            s.last_sent = now;
            JobEvent::Progress {
                stage: s.name.clone(),
                done: s.done,
                total: s.total,
                msg: msg.to_string(),
                elapsed: self.t0.elapsed().as_secs_f64(),
                stage_elapsed: s.started.elapsed().as_secs_f64(),
            }
        };
        let _ = self.channel.send(ev);
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_set()
    }
}
