//! Cutting long recordings into windows that are captioned one by one.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

/// Longest window (and `max_seconds`) a segmentation may ask for, in seconds.
pub const MAX_WINDOW_SECONDS: f64 = 3600.0;
/// Shortest hop between windows, in seconds.
pub const MIN_HOP_SECONDS: f64 = 0.1;

/// How recordings are cut. A recording no longer than `max_seconds` is one segment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
// Every field has a default, so a pipeline file may set only some of them.
#[serde(default, deny_unknown_fields)]
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
        // Bounded so a typo cannot ask for an hour-long encoder window or a billion
        // segments per recording.
        let within = |v: f64, low: f64, high: f64| v.is_finite() && v > low && v <= high;
        if !within(self.max_seconds, 0.0, MAX_WINDOW_SECONDS) {
            problems.push(format!(
                "max_seconds must be positive and at most {MAX_WINDOW_SECONDS}, got {}",
                self.max_seconds
            ));
        }
        if !within(self.window_seconds, 0.0, MAX_WINDOW_SECONDS) {
            problems.push(format!(
                "window_seconds must be positive and at most {MAX_WINDOW_SECONDS}, got {}",
                self.window_seconds
            ));
        }
        if !(within(self.hop_seconds, 0.0, MAX_WINDOW_SECONDS)
            && self.hop_seconds >= MIN_HOP_SECONDS)
        {
            problems.push(format!(
                "hop_seconds must be between {MIN_HOP_SECONDS} and {MAX_WINDOW_SECONDS}, got {}",
                self.hop_seconds
            ));
        }
        if !(self.min_last_seconds.is_finite()
            && (0.0..=MAX_WINDOW_SECONDS).contains(&self.min_last_seconds))
        {
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
    let secs = |s: f64| to_samples(s, rate);
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

/// Cuts a stream of samples into the segments [`plan_segments`] gives for the whole
/// stream, without knowing its length in advance.
///
/// Samples are pushed as they are decoded and resampled; each segment is handed out
/// as soon as it is decided, the last one at [`Segmenter::finish`]. Until the stream
/// is longer than `max_seconds` it might still be a single segment, so up to
/// `max_seconds` of samples are held; after that only the current window is. The peak
/// number of buffered samples is at most `max(max_samples, window - 1)` plus the
/// length of one push (see [`Segmenter::peak_buffered`]).
#[derive(Debug, Clone)]
pub struct Segmenter {
    max: usize,
    window: usize,
    hop: usize,
    min_last: usize,
    /// Samples received so far.
    received: usize,
    /// Buffered samples; `buffer[0]` is sample `buffer_start` of the stream.
    buffer: Vec<f32>,
    buffer_start: usize,
    /// Windowed mode: the stream is known to be longer than `max`.
    windowed: bool,
    /// Start of the next window (windowed mode).
    next_start: usize,
    /// Segments handed out so far.
    emitted: u32,
    /// End of the last segment handed out.
    last_end: Option<usize>,
    /// A full window was dropped for being shorter than `min_last`: nothing follows.
    stopped: bool,
    peak: usize,
}

/// One segment's samples, handed out by [`Segmenter`] (and the front end's
/// `decode_segments`).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentAudio {
    /// 0, 1, 2, ... in stream order.
    pub index: u32,
    /// First sample of the segment in the stream (model-rate samples).
    pub start_sample: usize,
    /// One past the last sample.
    pub end_sample: usize,
    /// `samples[i]` is sample `start_sample + i` of the stream.
    pub samples: Vec<f32>,
}

impl SegmentAudio {
    /// Start time in seconds, for samples at `rate` Hz.
    pub fn start_secs(&self, rate: u32) -> f64 {
        self.start_sample as f64 / f64::from(rate)
    }

    /// End time in seconds, for samples at `rate` Hz.
    pub fn end_secs(&self, rate: u32) -> f64 {
        self.end_sample as f64 / f64::from(rate)
    }

    /// Where this segment lies, without its samples.
    pub fn segment(&self) -> Segment {
        Segment {
            index: self.index,
            start: self.start_sample,
            end: self.end_sample,
        }
    }
}

/// Seconds to whole samples at `rate`, as [`plan_segments`] rounds them.
fn to_samples(seconds: f64, rate: u32) -> usize {
    (seconds * f64::from(rate)).round() as usize
}

impl Segmenter {
    /// A segmenter for samples at `rate` Hz. `config` should have passed
    /// [`SegmentConfig::validate`]; like [`plan_segments`], a zero window or hop is
    /// taken as one sample.
    pub fn new(rate: u32, config: &SegmentConfig) -> Self {
        Self::new_samples(
            to_samples(config.max_seconds, rate),
            to_samples(config.window_seconds, rate).max(1),
            to_samples(config.hop_seconds, rate).max(1),
            to_samples(config.min_last_seconds, rate),
        )
    }

    /// Samples received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Samples buffered right now.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The most samples ever buffered at once (the memory bound in action).
    pub fn peak_buffered(&self) -> usize {
        self.peak
    }

    /// Appends the next samples of the stream; hands every segment that is complete
    /// to `on_segment`. A [`ControlFlow::Break`] from `on_segment` is returned at once
    /// (later segments of this push are not handed out).
    pub fn push(
        &mut self,
        samples: &[f32],
        on_segment: &mut dyn FnMut(SegmentAudio) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let first = self.received;
        self.received += samples.len();
        if !self.windowed {
            self.buffer.extend_from_slice(samples);
            self.note_peak();
            if self.received <= self.max {
                return ControlFlow::Continue(());
            }
            self.windowed = true;
        } else if !self.stopped {
            // Samples before the next window's start (a hop longer than the window)
            // are never needed.
            let keep_from = self.next_start.saturating_sub(first).min(samples.len());
            if self.buffer.is_empty() {
                self.buffer_start = first + keep_from;
            }
            self.buffer.extend_from_slice(&samples[keep_from..]);
            self.note_peak();
        }
        self.emit_full_windows(on_segment)
    }

    /// Ends the stream: hands out the last segment, if any, and resets the segmenter
    /// for a new stream.
    pub fn finish(
        &mut self,
        on_segment: &mut dyn FnMut(SegmentAudio) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let len = self.received;
        let last = if !self.windowed {
            // The whole stream is one segment; its samples are the buffer.
            Some(SegmentAudio {
                index: 0,
                start_sample: 0,
                end_sample: len,
                samples: std::mem::take(&mut self.buffer),
            })
        } else if self.stopped || self.last_end == Some(len) || self.next_start >= len {
            None
        } else if len - self.next_start >= self.min_last || self.emitted == 0 {
            let from = self.next_start - self.buffer_start;
            Some(SegmentAudio {
                index: self.emitted,
                start_sample: self.next_start,
                end_sample: len,
                samples: self.buffer[from..].to_vec(),
            })
        } else {
            None
        };
        let peak = self.peak;
        // A fresh state for the next stream, keeping the buffer's allocation.
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        *self = Self {
            buffer,
            peak,
            ..Self::new_samples(self.max, self.window, self.hop, self.min_last)
        };
        match last {
            Some(segment) => on_segment(segment),
            None => ControlFlow::Continue(()),
        }
    }

    fn new_samples(max: usize, window: usize, hop: usize, min_last: usize) -> Self {
        Self {
            max,
            window,
            hop,
            min_last,
            received: 0,
            buffer: Vec::new(),
            buffer_start: 0,
            windowed: false,
            next_start: 0,
            emitted: 0,
            last_end: None,
            stopped: false,
            peak: 0,
        }
    }

    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.buffer.len());
    }

    /// Hands out every window that lies wholly within the samples received so far.
    fn emit_full_windows(
        &mut self,
        on_segment: &mut dyn FnMut(SegmentAudio) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        while !self.stopped && self.next_start + self.window <= self.received {
            let (start, end) = (self.next_start, self.next_start + self.window);
            // As in `plan_segments`, a window shorter than `min_last` ends the plan,
            // unless it is the first.
            if self.window < self.min_last && self.emitted > 0 {
                self.stopped = true;
                self.buffer.clear();
                break;
            }
            let from = start - self.buffer_start;
            let segment = SegmentAudio {
                index: self.emitted,
                start_sample: start,
                end_sample: end,
                samples: self.buffer[from..from + self.window].to_vec(),
            };
            self.emitted += 1;
            self.last_end = Some(end);
            self.next_start += self.hop;
            // Drop what no later window needs.
            let drop = (self.next_start - self.buffer_start).min(self.buffer.len());
            self.buffer.drain(..drop);
            self.buffer_start += drop;
            if self.buffer.is_empty() {
                self.buffer_start = self.next_start;
            }
            on_segment(segment)?;
        }
        ControlFlow::Continue(())
    }
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

    /// Deterministic xorshift64 for chunk sizes.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Pushes `len` samples (sample i has value i) in random chunks; returns the
    /// segments handed out and the segmenter's peak buffer.
    fn stream(
        len: usize,
        rate: u32,
        config: &SegmentConfig,
        seed: u64,
        max_chunk: u64,
    ) -> (Vec<SegmentAudio>, usize) {
        let samples: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut segmenter = Segmenter::new(rate, config);
        let mut out = Vec::new();
        let mut on_segment = |segment: SegmentAudio| {
            out.push(segment);
            ControlFlow::Continue(())
        };
        let mut state = seed | 1;
        let mut rest = &samples[..];
        while !rest.is_empty() {
            let n = ((next(&mut state) % (max_chunk + 1)) as usize).min(rest.len());
            assert!(segmenter.push(&rest[..n], &mut on_segment).is_continue());
            rest = &rest[n..];
        }
        assert!(segmenter.finish(&mut on_segment).is_continue());
        let peak = segmenter.peak_buffered();
        (out, peak)
    }

    #[test]
    fn streaming_matches_plan_segments() {
        let configs = [
            SegmentConfig::default(),
            // Overlapping windows.
            SegmentConfig {
                max_seconds: 5.0,
                window_seconds: 4.0,
                hop_seconds: 2.0,
                min_last_seconds: 1.0,
            },
            // Gaps between windows.
            SegmentConfig {
                max_seconds: 3.0,
                window_seconds: 2.0,
                hop_seconds: 3.5,
                min_last_seconds: 0.5,
            },
            // A window longer than the maximum, no minimum tail.
            SegmentConfig {
                max_seconds: 2.0,
                window_seconds: 6.0,
                hop_seconds: 6.0,
                min_last_seconds: 0.0,
            },
            // Every window after the first is shorter than the minimum.
            SegmentConfig {
                max_seconds: 1.0,
                window_seconds: 1.0,
                hop_seconds: 0.5,
                min_last_seconds: 2.0,
            },
            // Fractional sample counts that round.
            SegmentConfig {
                max_seconds: 0.333,
                window_seconds: 0.257,
                hop_seconds: 0.111,
                min_last_seconds: 0.049,
            },
        ];
        let rate = 100;
        let mut checked = 0;
        for (c, config) in configs.iter().enumerate() {
            for len in (0..1_600)
                .step_by(7)
                .chain([299, 300, 301, 400, 401, 1_000, 1_001])
            {
                for (seed, max_chunk) in [(1, 1), (2, 13), (3, 250), (4, 5_000)] {
                    let (segments, _) = stream(len, rate, config, seed + len as u64, max_chunk);
                    let plan = plan_segments(len, rate, config);
                    let got: Vec<Segment> = segments.iter().map(SegmentAudio::segment).collect();
                    assert_eq!(got, plan, "config {c}, len {len}, chunks <= {max_chunk}");
                    for segment in &segments {
                        let want: Vec<f32> = (segment.start_sample..segment.end_sample)
                            .map(|i| i as f32)
                            .collect();
                        assert_eq!(segment.samples, want, "config {c}, len {len}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 1_000);
    }

    #[test]
    fn buffer_is_bounded_by_the_window_once_past_the_maximum() {
        // 10 s windows with a 5 s hop, 12 s maximum, 1 s pushes, at 1 kHz: an hour.
        let config = SegmentConfig {
            max_seconds: 12.0,
            window_seconds: 10.0,
            hop_seconds: 5.0,
            min_last_seconds: 1.0,
        };
        let rate = 1_000;
        let mut segmenter = Segmenter::new(rate, &config);
        let chunk = vec![0.25f32; 1_000];
        let mut count = 0u32;
        let mut on_segment = |segment: SegmentAudio| {
            assert_eq!(segment.index, count);
            assert_eq!(segment.start_secs(rate), 5.0 * f64::from(count));
            count += 1;
            ControlFlow::Continue(())
        };
        let mut max_after_decision = 0;
        for second in 0..3_600 {
            let _ = segmenter.push(&chunk, &mut on_segment);
            if second >= 12 {
                max_after_decision = max_after_decision.max(segmenter.buffered());
            }
        }
        let _ = segmenter.finish(&mut on_segment);
        // Windows at 0, 5, ..., 3590 s (the last ends at the stream's end).
        assert_eq!(count, 719);
        // Until 12 s it may still be one segment; after that, less than one window is kept.
        assert_eq!(segmenter.peak_buffered(), 13_000);
        assert!(max_after_decision < 10_000, "{max_after_decision}");
    }

    #[test]
    fn break_stops_and_finish_resets() {
        let config = SegmentConfig {
            max_seconds: 1.0,
            window_seconds: 1.0,
            hop_seconds: 1.0,
            min_last_seconds: 0.0,
        };
        let mut segmenter = Segmenter::new(10, &config);
        let mut seen = Vec::new();
        let flow = segmenter.push(&[0.0; 55], &mut |segment| {
            seen.push(segment.index);
            if segment.index == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(flow.is_break());
        assert_eq!(seen, vec![0, 1]);
        let _ = segmenter.finish(&mut |_| ControlFlow::Continue(()));
        assert_eq!((segmenter.received(), segmenter.buffered()), (0, 0));
        // The next stream starts from scratch: 7 samples are one segment.
        let mut last = None;
        let _ = segmenter.push(&[1.0; 7], &mut |_| ControlFlow::Continue(()));
        let _ = segmenter.finish(&mut |segment| {
            last = Some(segment);
            ControlFlow::Continue(())
        });
        let last = last.unwrap();
        assert_eq!((last.index, last.start_sample, last.end_sample), (0, 0, 7));
        assert_eq!(last.samples, vec![1.0; 7]);
    }
}
