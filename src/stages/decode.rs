//! Decode stage: fetched bytes → mono samples at the model's rate → segments →
//! fbank frames, on the blocking pool. Segments go to the batcher as soon as they
//! are complete, so memory holds about one window per worker whatever the length
//! of the recording. A failing input becomes one error row; an input that fails
//! part-way keeps the segments decoded so far plus an error row for the rest.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_channel::{Receiver, Sender};

use super::fetch::FetchedInput;
use super::{BusyClock, InputDone, SegmentJob, SinkMessage};
use crate::audio::decode::AudioInfo;
use crate::audio::fbank::Fbank;
use crate::audio::ffmpeg::FfmpegOptions;
use crate::audio::frontend::{FrontEnd, FrontEndError};
use crate::audio::segment::SegmentConfig;
use crate::output::{CaptionRow, RowFailure, now_us};
use crate::storage::{FetchError, Fetched, FetchedAudio};

/// What every decode worker shares.
pub struct DecodeContext {
    pub fbank: Fbank,
    pub segments: SegmentConfig,
    /// Fewest fbank frames the encoder takes (one patch).
    pub min_frames: usize,
    /// Model and run fields of every row.
    pub base_row: CaptionRow,
    /// The fallback for inputs no native decoder reads.
    pub ffmpeg: FfmpegOptions,
}

/// Decodes inputs until the channel closes. Each worker keeps one [`FrontEnd`], so
/// the resampler is reused while consecutive inputs share a sample rate.
pub async fn run(
    fetched: Receiver<FetchedInput>,
    segments: Sender<SegmentJob>,
    sink: Sender<SinkMessage>,
    context: Arc<DecodeContext>,
    busy: Arc<BusyClock>,
) {
    let mut front_end: Option<FrontEnd> = None;
    while let Ok(item) = fetched.recv().await {
        let (input_id, uri) = (item.task.id, item.task.input.uri.clone());
        // Rows sent for this input so far, known even if the worker panics.
        let emitted = Arc::new(AtomicUsize::new(0));
        let joined = {
            let (segments, sink, context, busy, emitted) = (
                segments.clone(),
                sink.clone(),
                context.clone(),
                busy.clone(),
                emitted.clone(),
            );
            let reused = front_end.take();
            let uri = uri.clone();
            tokio::task::spawn_blocking(move || {
                let rate = context.fbank.config().sample_rate;
                let mut front_end = match reused {
                    Some(f) => f,
                    None => match FrontEnd::new(rate, context.segments) {
                        Ok(f) => f.with_ffmpeg(context.ffmpeg.clone()),
                        Err(e) => {
                            let failed = fail_input(
                                &sink,
                                &context,
                                input_id,
                                &uri,
                                0,
                                "segment_config",
                                e.to_string(),
                            );
                            return (failed, None);
                        }
                    },
                };
                let result = busy.time(|| {
                    prepare_input(item, &mut front_end, &context, &segments, &sink, &emitted)
                });
                (result, Some(front_end))
            })
            .await
        };
        match joined {
            Ok((Ok(()), reused)) => front_end = reused,
            // The next stages are gone: the run is stopping.
            Ok((Err(Closed), _)) => return,
            Err(e) => {
                // A bug in a decoder: this input is an error row, the run goes on.
                tracing::error!(%uri, error = %e, "a decode worker panicked");
                let emitted = emitted.load(Ordering::Relaxed);
                let sink = sink.clone();
                let context = context.clone();
                let message = format!("the decoder crashed on this input: {e}");
                let failed = tokio::task::spawn_blocking(move || {
                    fail_input(
                        &sink,
                        &context,
                        input_id,
                        &uri,
                        emitted,
                        "decoder_crash",
                        message,
                    )
                })
                .await;
                if !matches!(failed, Ok(Ok(()))) {
                    return;
                }
            }
        }
    }
}

/// A downstream channel closed.
struct Closed;

/// Ends an input with one error row after the `rows_before` rows already sent.
fn fail_input(
    sink: &Sender<SinkMessage>,
    context: &DecodeContext,
    input_id: u64,
    uri: &str,
    rows_before: usize,
    kind: &'static str,
    message: String,
) -> Result<(), Closed> {
    let row = CaptionRow {
        uri: uri.to_string(),
        segment_index: rows_before as u32,
        ..context.base_row.clone()
    }
    .failed(RowFailure::Input(kind), message, now_us());
    send(
        sink,
        SinkMessage::Rows {
            input_id,
            rows: vec![row],
        },
    )?;
    send(
        sink,
        SinkMessage::Done(InputDone {
            input_id,
            uri: uri.to_string(),
            rows: rows_before + 1,
            audio_seconds: 0.0,
            failure: Some(kind),
            info: None,
        }),
    )
}

fn prepare_input(
    item: FetchedInput,
    front_end: &mut FrontEnd,
    context: &DecodeContext,
    segments: &Sender<SegmentJob>,
    sink: &Sender<SinkMessage>,
    emitted_rows: &AtomicUsize,
) -> Result<(), Closed> {
    let input_id = item.task.id;
    let uri = item.task.input.uri.clone();
    let row_for = |index: u32| CaptionRow {
        uri: uri.clone(),
        segment_index: index,
        ..context.base_row.clone()
    };
    let fail = |kind: &'static str, message: String, rows_before: usize| {
        fail_input(sink, context, input_id, &uri, rows_before, kind, message)
    };

    let audio = match item.result {
        Ok(audio) => audio,
        Err(e) => return fail(fetch_failure_kind(&e), e.to_string(), 0),
    };
    let reader = match open_reader(&audio) {
        Ok(r) => r,
        Err(e) => {
            return fail(
                "unreadable",
                format!("cannot read the fetched object: {e}"),
                0,
            );
        }
    };

    let rate = context.fbank.config().sample_rate;
    let mut emitted = 0usize;
    let mut closed = false;
    let path = local_path(&audio).map(std::path::Path::to_path_buf);
    let result =
        front_end.decode_segments_at(reader, audio.extension.as_deref(), path.as_deref(), |seg| {
            let frames = context.fbank.compute(&seg.samples);
            let mut row = CaptionRow {
                start_s: Some(seg.start_sample as f64 / f64::from(rate)),
                end_s: Some(seg.end_sample as f64 / f64::from(rate)),
                ..row_for(seg.index)
            };
            emitted += 1;
            emitted_rows.store(emitted, Ordering::Relaxed);
            let sent = if frames.num_frames < context.min_frames {
                let error = context.fbank.too_short_error(
                    seg.samples.len(),
                    frames.num_frames,
                    context.min_frames,
                );
                row = row.failed(RowFailure::TooShort, error, now_us());
                send(
                    sink,
                    SinkMessage::Rows {
                        input_id,
                        rows: vec![row],
                    },
                )
            } else {
                segments
                    .send_blocking(SegmentJob {
                        input_id,
                        row,
                        frames: frames.num_frames,
                        fbank: frames.data,
                    })
                    .map_err(|_| Closed)
            };
            if sent.is_err() {
                closed = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
    if closed {
        return Err(Closed);
    }
    match result {
        Ok(info) => send(
            sink,
            SinkMessage::Done(InputDone {
                input_id,
                uri: uri.clone(),
                rows: emitted,
                audio_seconds: info.duration_secs(),
                failure: None,
                info: Some(info),
            }),
        ),
        Err(e) => fail(decode_failure_kind(&e), e.to_string(), emitted),
    }
}

fn send(sink: &Sender<SinkMessage>, message: SinkMessage) -> Result<(), Closed> {
    sink.send_blocking(message).map_err(|_| Closed)
}

/// Short kind of a fetch failure for the summary.
fn fetch_failure_kind(e: &FetchError) -> &'static str {
    match e {
        FetchError::NotFound { .. } => "not_found",
        FetchError::PermissionDenied { .. } => "permission_denied",
        FetchError::Empty { .. } => "empty",
        FetchError::NotAFile { .. } => "not_a_file",
        FetchError::Network { .. } => "network",
        FetchError::Spool { .. } => "spool",
        FetchError::Other { .. } => "fetch",
    }
}

/// A fetched input as something the decoder can read and seek.
enum InputReader {
    File(std::io::BufReader<std::fs::File>),
    Memory(std::io::Cursor<bytes::Bytes>),
}

impl std::io::Read for InputReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::File(f) => f.read(buf),
            Self::Memory(m) => m.read(buf),
        }
    }
}

impl std::io::Seek for InputReader {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        match self {
            Self::File(f) => f.seek(pos),
            Self::Memory(m) => m.seek(pos),
        }
    }
}

/// The fetched input as a local file, when it is one (local, or spooled to disk).
fn local_path(fetched: &Fetched) -> Option<&std::path::Path> {
    match &fetched.audio {
        FetchedAudio::Memory(_) => None,
        FetchedAudio::Local(path) => Some(path),
        FetchedAudio::Spooled(spool) => Some(spool.path()),
    }
}

fn open_reader(fetched: &Fetched) -> std::io::Result<InputReader> {
    Ok(match &fetched.audio {
        FetchedAudio::Memory(bytes) => InputReader::Memory(std::io::Cursor::new(bytes.clone())),
        FetchedAudio::Local(path) => {
            InputReader::File(std::io::BufReader::new(std::fs::File::open(path)?))
        }
        FetchedAudio::Spooled(spool) => {
            InputReader::File(std::io::BufReader::new(std::fs::File::open(spool.path())?))
        }
    })
}

/// Short kind of a decoding failure for the summary.
pub fn decode_failure_kind(e: &FrontEndError) -> &'static str {
    match e {
        FrontEndError::Resample(_) => "resample",
        FrontEndError::SegmentConfig(_) => "segment_config",
        FrontEndError::Decode(d) => d.kind(),
    }
}

/// Fills in what is known of the source only once decoding has ended.
pub fn complete_rows(rows: &mut [CaptionRow], info: &AudioInfo) {
    for row in rows {
        row.duration_s = Some(info.duration_secs());
        row.source_sample_rate_hz = Some(info.sample_rate);
        row.channels = u16::try_from(info.channels).ok();
        row.codec = Some(info.codec.clone());
        row.warnings = info.warnings();
    }
}
