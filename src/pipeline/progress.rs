//! Progress while a run goes: a bar on a terminal, plain periodic log lines when
//! not on one (cron, Airflow, Kubernetes logs).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::config::ProgressMode;
use crate::stages::RunCounters;

/// A snapshot of the counters with rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub inputs_done: u64,
    /// Inputs taken into this run so far (final once the listing is done).
    pub queued: u64,
    pub listing_done: bool,
    pub rows: u64,
    pub captions: u64,
    pub failed_inputs: u64,
    pub audio_hours: f64,
    pub captions_per_second: f64,
    /// Seconds left, once the total is known and something is done.
    pub eta_seconds: Option<f64>,
}

impl Snapshot {
    pub fn take(counters: &RunCounters, elapsed: Duration) -> Self {
        let get = RunCounters::get;
        let inputs_done = get(&counters.inputs_done);
        let queued = get(&counters.queued);
        let listing_done = counters
            .listing_done
            .load(std::sync::atomic::Ordering::Relaxed);
        let captions = get(&counters.captions);
        let secs = elapsed.as_secs_f64().max(1e-9);
        let eta_seconds = (listing_done && inputs_done > 0).then(|| {
            let rate = inputs_done as f64 / secs;
            queued.saturating_sub(inputs_done) as f64 / rate
        });
        Self {
            inputs_done,
            queued,
            listing_done,
            rows: get(&counters.rows),
            captions,
            failed_inputs: get(&counters.inputs_failed),
            audio_hours: get(&counters.audio_ms) as f64 / 3.6e6,
            captions_per_second: captions as f64 / secs,
            eta_seconds,
        }
    }

    /// One line: `12/40 inputs, 15 segments, 0.03 h audio, 2.1 captions/s, 3 failed, ETA 13 s`.
    pub fn line(&self) -> String {
        let total = if self.listing_done {
            self.queued.to_string()
        } else {
            format!("{}+", self.queued)
        };
        let mut s = format!(
            "{}/{total} inputs, {} segments, {:.2} h audio, {:.1} captions/s",
            self.inputs_done, self.rows, self.audio_hours, self.captions_per_second
        );
        if self.failed_inputs > 0 {
            s.push_str(&format!(", {} failed", self.failed_inputs));
        }
        if let Some(eta) = self.eta_seconds {
            s.push_str(&format!(", ETA {}", human_duration(eta)));
        }
        s
    }
}

/// `42 s`, `3 min 20 s`, `2 h 05 min`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// Shows progress until `done` resolves.
pub async fn report(
    counters: Arc<RunCounters>,
    mode: ProgressMode,
    interval: Duration,
    started: Instant,
    done: tokio::sync::oneshot::Receiver<()>,
) {
    let bar = match mode {
        ProgressMode::Bar => true,
        ProgressMode::Auto => std::io::stderr().is_terminal(),
        ProgressMode::Lines => false,
        ProgressMode::Off => {
            let _ = done.await;
            return;
        }
    };
    // One loop for both displays: a bar redrawn 4 times a second, or a log line
    // every `interval`.
    let pb = bar.then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{bar:30} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    });
    let mut tick = tokio::time::interval(if bar {
        Duration::from_millis(250)
    } else {
        interval
    });
    tick.tick().await;
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut done => break,
        }
        let snap = Snapshot::take(&counters, started.elapsed());
        match &pb {
            Some(pb) => {
                pb.set_length(snap.queued.max(1));
                pb.set_position(snap.inputs_done);
                pb.set_message(snap.line());
            }
            None => tracing::info!(
                inputs_done = snap.inputs_done,
                queued = snap.queued,
                segments = snap.rows,
                captions = snap.captions,
                failed_inputs = snap.failed_inputs,
                audio_hours = snap.audio_hours,
                captions_per_second = snap.captions_per_second,
                "progress: {}",
                snap.line()
            ),
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn snapshot_line_and_eta() {
        let c = RunCounters::default();
        c.queued.store(40, Ordering::Relaxed);
        c.inputs_done.store(10, Ordering::Relaxed);
        c.captions.store(20, Ordering::Relaxed);
        c.rows.store(21, Ordering::Relaxed);
        c.audio_ms.store(3_600_000, Ordering::Relaxed);
        let s = Snapshot::take(&c, Duration::from_secs(10));
        assert_eq!(s.eta_seconds, None, "no ETA while the listing runs");
        assert_eq!(
            s.line(),
            "10/40+ inputs, 21 segments, 1.00 h audio, 2.0 captions/s"
        );
        c.listing_done.store(true, Ordering::Relaxed);
        let s = Snapshot::take(&c, Duration::from_secs(10));
        assert_eq!(s.eta_seconds, Some(30.0));
        assert!(s.line().ends_with("ETA 30 s"), "{}", s.line());
        assert_eq!(human_duration(3725.0), "1 h 02 min");
    }
}
