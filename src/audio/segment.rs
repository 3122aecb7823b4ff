//! Cutting long recordings into windows that are captioned one by one.

use serde::{Deserialize, Serialize};

/// How recordings are cut. A recording no longer than `max_seconds` is one segment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Recordings longer than this are cut into windows.
    pub max_seconds: f64,
    /// Window length.
    pub window_seconds: f64,
    /// Distance between window starts (= window for no overlap).
    pub hop_seconds: f64,
    /// A last window shorter than this is dropped (unless it is the only one).
    pub min_last_seconds: f64,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            max_seconds: 30.0,
            window_seconds: 10.0,
            hop_seconds: 10.0,
            min_last_seconds: 1.0,
        }
    }
}

impl SegmentConfig {
    /// Every problem, at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.max_seconds) {
            problems.push(format!(
                "max_seconds must be positive, got {}",
                self.max_seconds
            ));
        }
        if !positive(self.window_seconds) {
            problems.push(format!(
                "window_seconds must be positive, got {}",
                self.window_seconds
            ));
        }
        if !positive(self.hop_seconds) {
            problems.push(format!(
                "hop_seconds must be positive, got {}",
                self.hop_seconds
            ));
        }
        if !(self.min_last_seconds.is_finite() && self.min_last_seconds >= 0.0) {
            problems.push(format!(
                "min_last_seconds must be >= 0, got {}",
                self.min_last_seconds
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// One window of a recording, in samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub index: u32,
    pub start: usize,
    pub end: usize,
}

/// The windows of a recording of `len` samples at `rate` Hz.
pub fn plan_segments(len: usize, rate: u32, config: &SegmentConfig) -> Vec<Segment> {
    let secs = |s: f64| (s * f64::from(rate)).round() as usize;
    if len <= secs(config.max_seconds) {
        return vec![Segment {
            index: 0,
            start: 0,
            end: len,
        }];
    }
    let window = secs(config.window_seconds).max(1);
    let hop = secs(config.hop_seconds).max(1);
    let min_last = secs(config.min_last_seconds);
    let mut segments = Vec::new();
    let mut start = 0usize;
    while start < len {
        let end = (start + window).min(len);
        if end - start < min_last && !segments.is_empty() {
            break;
        }
        segments.push(Segment {
            index: segments.len() as u32,
            start,
            end,
        });
        if end == len {
            break;
        }
        start += hop;
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_recordings_are_one_segment() {
        let s = plan_segments(16_000 * 20, 16_000, &SegmentConfig::default());
        assert_eq!(
            s,
            vec![Segment {
                index: 0,
                start: 0,
                end: 320_000
            }]
        );
    }

    #[test]
    fn long_recordings_are_windowed_and_a_tiny_tail_dropped() {
        let cfg = SegmentConfig::default();
        // 45.5 s: windows at 0,10,20,30 s and a 5.5 s tail at 40 s.
        let s = plan_segments(16_000 * 455 / 10, 16_000, &cfg);
        assert_eq!(s.len(), 5);
        assert_eq!(s[4].start, 640_000);
        assert_eq!(s[4].end, 728_000);
        // 40.5 s: the 0.5 s tail is dropped.
        let s = plan_segments(16_000 * 405 / 10, 16_000, &cfg);
        assert_eq!(s.len(), 4);
        assert_eq!(s[3].end, 640_000);
    }

    #[test]
    fn overlapping_windows() {
        let cfg = SegmentConfig {
            max_seconds: 5.0,
            window_seconds: 4.0,
            hop_seconds: 2.0,
            min_last_seconds: 1.0,
        };
        let s = plan_segments(10 * 100, 100, &cfg);
        let starts: Vec<usize> = s.iter().map(|x| x.start).collect();
        assert_eq!(starts, vec![0, 200, 400, 600]);
        assert_eq!(s[3].end, 1000);
    }

    #[test]
    fn bad_configs_list_every_problem() {
        let cfg = SegmentConfig {
            max_seconds: 0.0,
            window_seconds: -1.0,
            hop_seconds: f64::NAN,
            min_last_seconds: -2.0,
        };
        assert_eq!(cfg.validate().unwrap_err().len(), 4);
    }
}
