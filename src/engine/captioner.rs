//! `audiocap caption`: local audio files → segments → batched encoder and decoder →
//! rows. Decoding, resampling and the fbank run on worker threads; the ONNX sessions
//! stay on the calling thread. The streaming pipeline (`audiocap run`) reuses the
//! same pieces for object storage and Parquet datasets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::generate::{Generated, GenerationParams, generate};
use super::model::OnnxModel;
use crate::audio::decode::AudioInfo;
use crate::audio::fbank::Fbank;
use crate::audio::files::audio_files;
use crate::audio::frontend::decode_file_to_rate;
use crate::audio::segment::{SegmentConfig, plan_segments};
use crate::output::{CaptionRow, RowFailure, now_us};

/// Files to caption: files as given (a missing one becomes an error row), folders
/// walked for audio files ([`audio_files`]); a folder that cannot be read is an input
/// that fails.
pub fn collect_inputs(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            out.extend(audio_files(input).into_iter().map(|item| match item {
                Ok(path) => path,
                Err(unreadable) => unreadable.path,
            }));
        } else {
            out.push(input.clone());
        }
    }
    out
}

/// Settings of a caption job.
#[derive(Debug, Clone)]
pub struct CaptionJobOptions {
    /// Segments per encoder/decoder batch.
    pub batch_size: usize,
    pub params: GenerationParams,
    pub segments: SegmentConfig,
    /// Threads decoding and computing fbanks.
    pub prep_threads: usize,
}

/// Counts for the run summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JobSummary {
    pub inputs: usize,
    pub failed_inputs: usize,
    pub segments: usize,
    pub captions: usize,
    pub failed_segments: usize,
    pub audio_seconds: f64,
    pub wall_seconds: f64,
}

/// One segment ready for the encoder.
struct Prepared {
    row: CaptionRow,
    fbank: Vec<f32>,
    frames: usize,
}

/// A file's segments, or the error row that replaces them.
fn prepare_file(
    path: &Path,
    fbank: &Fbank,
    segments: &SegmentConfig,
    min_frames: usize,
    base: &CaptionRow,
) -> Vec<Result<Prepared, Box<CaptionRow>>> {
    let uri = path.display().to_string();
    let rate = fbank.config().sample_rate;
    let audio = match decode_file_to_rate(path, rate) {
        Ok(a) => a,
        Err(e) => {
            let row = CaptionRow {
                uri,
                ..base.clone()
            };
            return vec![Err(Box::new(row.failed(
                RowFailure::Input,
                e.to_string(),
                now_us(),
            )))];
        }
    };
    let info: &AudioInfo = &audio.info;
    let duration = info.duration_secs();
    let source_row = CaptionRow {
        uri,
        duration_s: Some(duration),
        source_sample_rate_hz: Some(info.sample_rate),
        channels: u16::try_from(info.channels).ok(),
        codec: Some(info.codec.clone()),
        ..base.clone()
    };
    let plan = plan_segments(audio.samples.len(), rate, segments);
    plan.into_iter()
        .map(|seg| {
            let row = CaptionRow {
                segment_index: seg.index,
                start_s: Some(seg.start as f64 / f64::from(rate)),
                end_s: Some(seg.end as f64 / f64::from(rate)),
                ..source_row.clone()
            };
            let frames = fbank.compute(&audio.samples[seg.start..seg.end]);
            if frames.num_frames < min_frames {
                let error =
                    fbank.too_short_error(seg.end - seg.start, frames.num_frames, min_frames);
                return Err(Box::new(row.failed(RowFailure::TooShort, error, now_us())));
            }
            Ok(Prepared {
                row,
                frames: frames.num_frames,
                fbank: frames.data,
            })
        })
        .collect()
}

/// Captions `files` with `model`, handing every finished batch of rows to `sink`.
pub fn caption_files(
    model: &mut OnnxModel,
    files: &[PathBuf],
    options: &CaptionJobOptions,
    run_id: &str,
    sink: &mut dyn FnMut(&[CaptionRow]) -> anyhow::Result<()>,
) -> anyhow::Result<JobSummary> {
    let started = Instant::now();
    let fbank = Fbank::new(model.manifest.front_end.clone())?;
    let min_frames = model.manifest.encoder.min_frames;
    let base = CaptionRow {
        model: model.identity.clone(),
        run_id: run_id.to_string(),
        ..Default::default()
    };
    let batch_size = options.batch_size.max(1);
    let threads = options.prep_threads.max(1);
    let mut summary = JobSummary {
        inputs: files.len(),
        ..Default::default()
    };
    // Files are prepared a few batches ahead so the threads stay busy.
    for group in files.chunks(batch_size * threads.max(2)) {
        let mut prepared: Vec<Result<Prepared, Box<CaptionRow>>> = Vec::new();
        std::thread::scope(|scope| {
            let per_thread = group.len().div_ceil(threads);
            let handles: Vec<_> = group
                .chunks(per_thread.max(1))
                .map(|chunk| {
                    let (fbank, base, segments) = (&fbank, &base, &options.segments);
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .flat_map(|p| prepare_file(p, fbank, segments, min_frames, base))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                match h.join() {
                    Ok(rows) => prepared.extend(rows),
                    Err(_) => {
                        let row = CaptionRow {
                            uri: "<worker>".into(),
                            ..base.clone()
                        };
                        let failed =
                            row.failed(RowFailure::Input, "a decoding worker panicked", now_us());
                        prepared.push(Err(Box::new(failed)))
                    }
                }
            }
        });

        let mut rows = Vec::with_capacity(prepared.len());
        let mut ready = Vec::new();
        let mut failed_uris = std::collections::BTreeSet::new();
        for p in prepared {
            match p {
                Ok(seg) => ready.push(seg),
                Err(row) => {
                    if row.duration_s.is_none() {
                        failed_uris.insert(row.uri.clone());
                    }
                    rows.push(*row);
                }
            }
        }
        summary.failed_inputs += failed_uris.len();
        summary.failed_segments += rows.len();
        summary.audio_seconds += ready
            .iter()
            .map(|s| s.row.end_s.unwrap_or(0.0) - s.row.start_s.unwrap_or(0.0))
            .sum::<f64>();
        // Similar lengths together: less padding in the encoder.
        ready.sort_by_key(|s| s.frames);
        for batch in ready.chunks(batch_size) {
            rows.extend(caption_batch(model, batch, &options.params));
        }
        summary.segments += rows.len();
        summary.captions += rows.iter().filter(|r| r.error.is_none()).count();
        summary.failed_segments = summary.segments - summary.captions;
        sink(&rows)?;
    }
    summary.wall_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// One batch through the encoder and the decoder; an engine failure becomes the
/// error of every row in the batch.
fn caption_batch(
    model: &mut OnnxModel,
    batch: &[Prepared],
    params: &GenerationParams,
) -> Vec<CaptionRow> {
    let segments: Vec<(&CaptionRow, &[f32], usize)> = batch
        .iter()
        .map(|s| (&s.row, s.fbank.as_slice(), s.frames))
        .collect();
    caption_segments(model, &segments, params)
}

/// Captions segments given as (row so far, fbank frames, number of frames): the
/// rows come back completed with caption, score and token count, or with the error
/// that stopped them (an engine failure is the error of every row in the batch).
pub fn caption_segments(
    model: &mut OnnxModel,
    segments: &[(&CaptionRow, &[f32], usize)],
    params: &GenerationParams,
) -> Vec<CaptionRow> {
    let inputs: Vec<(&[f32], usize)> = segments.iter().map(|s| (s.1, s.2)).collect();
    let result = model
        .encode(&inputs)
        .and_then(|audio| generate(model, &audio, params));
    let stamp = now_us();
    match result {
        Ok(generated) => segments
            .iter()
            .zip(generated)
            .map(|(&(row, _, _), g)| captioned_row(model, row, &g, stamp))
            .collect(),
        Err(e) => segments
            .iter()
            .map(|&(row, _, _)| row.failed(RowFailure::Model, format!("model: {e}"), stamp))
            .collect(),
    }
}

/// `row` completed with a generated caption (or the error of turning its tokens
/// into text).
pub fn captioned_row(model: &OnnxModel, row: &CaptionRow, g: &Generated, stamp: i64) -> CaptionRow {
    let text = model
        .tokenizer
        .decode(&g.token_ids, true)
        .map(|t| t.trim().to_string());
    match text {
        Ok(text) => row.captioned(text, g.score, g.token_ids.len() as u32, stamp),
        Err(e) => row.failed(
            RowFailure::Tokenizer,
            format!("decoding tokens to text: {e}"),
            stamp,
        ),
    }
}

/// A run id: time and process, unique enough to tell runs apart in one dataset.
pub fn new_run_id() -> String {
    format!("{:x}-{:x}", now_us(), std::process::id())
}
