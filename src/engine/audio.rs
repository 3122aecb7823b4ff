//! From the encoder to the decoder without leaving the device.
//!
//! The encoder's audio embeddings stay where the model runs ([`AudioEmbeds`]); clips
//! waiting for decoder rows queue there ([`AudioQueue`]), and the decoder's prompt
//! (the template's text embeddings around each clip's audio, in the export's float
//! type) is assembled there by a small graph ([`PromptAssembler`]). On a GPU the host
//! builds no prompt and copies nothing per clip but its fbank in and its tokens out.

use std::collections::VecDeque;
use std::rc::Rc;

use ndarray::{Array2, Array3};
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::error::{EngineError, Result, run_error};
use super::session::{helper_session, run_bound, to_device};
use crate::config::DeviceSpec;
use crate::graph_io::encoder as enc_io;
use crate::manifest::ExportDtype;
use crate::onnx::{DataType, Dim, Graph, Value};
use crate::output::{CaptionRow, EmbeddingKind, Tag, top_tags};

/// What the encoder hands back per clip besides the audio embeddings, when asked:
/// nothing by default, so the graph's other outputs are never bound or copied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipRequest {
    /// The top tags (needs an export of a tagging checkpoint).
    pub tags: Option<TagRequest>,
    /// Which embedding (`Encoder` needs an export with `encoder_embedding`).
    pub embedding: EmbeddingKind,
}

impl ClipRequest {
    pub fn is_empty(&self) -> bool {
        self.tags.is_none() && self.embedding == EmbeddingKind::None
    }
}

/// How many tags a clip keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct TagRequest {
    pub top_k: usize,
    /// Tags below this probability are left out.
    pub min_score: f32,
}

/// A clip's tags and embedding, as asked for ([`ClipRequest`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipExtras {
    pub tags: Option<Vec<Tag>>,
    pub embedding: Option<Vec<f32>>,
}

impl ClipExtras {
    /// `row` with these tags and embedding (what was not asked for stays as it is).
    pub fn apply(self, row: &mut CaptionRow) {
        if self.tags.is_some() {
            row.tags = self.tags;
        }
        if self.embedding.is_some() {
            row.embedding = self.embedding;
        }
    }
}

/// What a request needs of the encoder graph, checked once against its outputs.
struct ClipOutputs {
    request: ClipRequest,
    /// The names of `tag_probs`, when tags are asked for.
    labels: Vec<String>,
}

/// The encoder graph's session: normalised fbank in, audio embeddings out, left
/// where the model runs. It belongs to [`OnnxModel`](super::model::OnnxModel) until
/// handed to a thread of its own
/// ([`OnnxModel::take_encoder`](super::model::OnnxModel::take_encoder)).
pub struct AudioEncoder {
    session: Session,
    device: DeviceSpec,
    mel_bins: usize,
    min_frames: usize,
    extras: ClipOutputs,
}

impl AudioEncoder {
    pub(super) fn new(
        session: Session,
        device: DeviceSpec,
        mel_bins: usize,
        min_frames: usize,
    ) -> Self {
        Self {
            session,
            device,
            mel_bins,
            min_frames,
            extras: ClipOutputs {
                request: ClipRequest::default(),
                labels: Vec::new(),
            },
        }
    }

    /// Asks for tags and embeddings beside the audio embeddings from now on
    /// ([`AudioEmbeds::take_extras`]); `labels` name the graph's `tag_probs`. An
    /// export without the outputs the request needs is refused.
    pub(super) fn request(&mut self, request: ClipRequest, labels: Vec<String>) -> Result<()> {
        let has = |name: &str| self.session.outputs().iter().any(|o| o.name() == name);
        if request.tags.is_some() && !has(enc_io::TAG_PROBS) {
            return Err(EngineError::Input(
                "tags were asked for, but the encoder graph has no tag_probs output: export a \
                 fine-tuned (tagging) BEATs checkpoint"
                    .into(),
            ));
        }
        if request.tags.is_some() && labels.is_empty() {
            return Err(EngineError::Input(
                "tags were asked for, but model.json names no tag labels".into(),
            ));
        }
        if request.embedding == EmbeddingKind::Encoder && !has(enc_io::ENCODER_EMBEDDING) {
            return Err(EngineError::Input(
                "the encoder embedding was asked for, but the encoder graph has no \
                 encoder_embedding output (an export from before it existed): re-export \
                 the model with this audiocap"
                    .into(),
            ));
        }
        self.extras = ClipOutputs { request, labels };
        Ok(())
    }

    pub(super) fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Audio embeddings [B, audio_tokens, hidden] of a batch of normalised fbank
    /// matrices (row-major [frames, mel_bins] each), padded to the longest.
    pub fn encode(&mut self, clips: &[(&[f32], usize)]) -> Result<AudioEmbeds> {
        let bins = self.mel_bins;
        let max_frames = clips.iter().map(|c| c.1).max().unwrap_or(0);
        if clips.is_empty() {
            return Err(EngineError::Input("empty batch".into()));
        }
        let mut fbank = Array3::<f32>::zeros((clips.len(), max_frames, bins));
        let mut lengths = Vec::with_capacity(clips.len());
        for (i, (data, frames)) in clips.iter().enumerate() {
            if *frames < self.min_frames {
                return Err(EngineError::Input(format!(
                    "clip {i} has {frames} fbank frames; the encoder needs at least {}",
                    self.min_frames
                )));
            }
            if data.len() != frames * bins {
                return Err(EngineError::Input(format!(
                    "clip {i}: {} values for {frames} frames of {bins} bins",
                    data.len()
                )));
            }
            let view = ndarray::ArrayView2::from_shape((*frames, bins), data)
                .map_err(|e| EngineError::Input(e.to_string()))?;
            fbank
                .index_axis_mut(ndarray::Axis(0), i)
                .slice_mut(ndarray::s![..*frames, ..])
                .assign(&view);
            lengths.push(*frames as i64);
        }
        let fbank = Tensor::from_array(fbank)
            .map_err(run_error("audio_encoder"))?
            .into_dyn();
        let lengths = Tensor::from_array((vec![clips.len()], lengths))
            .map_err(run_error("audio_encoder"))?
            .into_dyn();
        let request = &self.extras.request;
        let mut names = vec![
            enc_io::AUDIO_EMBEDS.to_string(),
            enc_io::AUDIO_EMBEDS_MASK.to_string(),
        ];
        if request.tags.is_some() {
            names.push(enc_io::TAG_PROBS.to_string());
        }
        if request.embedding == EmbeddingKind::Encoder {
            names.push(enc_io::ENCODER_EMBEDDING.to_string());
        }
        let mut outputs = run_bound(
            &mut self.session,
            "audio_encoder",
            self.device,
            &[
                (enc_io::FBANK.to_string(), &fbank),
                (enc_io::FBANK_LENGTHS.to_string(), &lengths),
            ],
            &names,
        )?;
        let mut embeds = AudioEmbeds::new(outputs.remove(0), self.device)?;
        let n = clips.len();
        if embeds.clips() != n {
            return Err(EngineError::BadOutput {
                graph: "audio_encoder",
                name: enc_io::AUDIO_EMBEDS.to_string(),
                problem: format!("holds {} clips for {n}", embeds.clips()),
            });
        }
        if request.is_empty() {
            return Ok(embeds);
        }
        let mask = outputs.remove(0);
        let mut extras = vec![ClipExtras::default(); n];
        if let Some(tags) = &request.tags {
            let probs = host_rows(&outputs.remove(0), self.device, enc_io::TAG_PROBS, n)?;
            let labels = &self.extras.labels;
            if probs.ncols() != labels.len() {
                return Err(EngineError::BadOutput {
                    graph: "audio_encoder",
                    name: enc_io::TAG_PROBS.to_string(),
                    problem: format!(
                        "holds {} labels, model.json names {}",
                        probs.ncols(),
                        labels.len()
                    ),
                });
            }
            for (clip, row) in extras.iter_mut().zip(probs.rows()) {
                let row = row.to_vec();
                clip.tags = Some(top_tags(&row, labels, tags.top_k, tags.min_score));
            }
        }
        match request.embedding {
            EmbeddingKind::None => {}
            EmbeddingKind::Encoder => {
                let rows = host_rows(
                    &outputs.remove(0),
                    self.device,
                    enc_io::ENCODER_EMBEDDING,
                    n,
                )?;
                for (clip, row) in extras.iter_mut().zip(rows.rows()) {
                    clip.embedding = Some(row.to_vec());
                }
            }
            EmbeddingKind::Projector => {
                let rows = projected_embedding(&embeds, &mask, self.device)?;
                for (clip, row) in extras.iter_mut().zip(rows.rows()) {
                    clip.embedding = Some(row.to_vec());
                }
            }
        }
        embeds.extras = extras;
        Ok(embeds)
    }
}

/// A [clips, width] f32 output on the host, checked to hold `clips` rows.
fn host_rows(
    value: &DynValue,
    device: DeviceSpec,
    name: &str,
    clips: usize,
) -> Result<Array2<f32>> {
    let host;
    let value = match device {
        DeviceSpec::Cpu => value,
        DeviceSpec::Cuda(_) => {
            host = to_device(value, DeviceSpec::Cpu)?;
            &host
        }
    };
    let bad = |problem: String| EngineError::BadOutput {
        graph: "audio_encoder",
        name: name.to_string(),
        problem,
    };
    let array = value
        .try_extract_array::<f32>()
        .map_err(run_error("audio_encoder"))?
        .to_owned()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| bad(format!("is not [clips, width]: {e}")))?;
    if array.nrows() != clips {
        return Err(bad(format!("holds {} clips for {clips}", array.nrows())));
    }
    Ok(array)
}

/// The projected audio embedding of each clip, [clips, hidden]: the mean of its
/// audio embeddings over the tokens `mask` marks valid (one token per clip with
/// mean pooling, which this returns as it is).
fn projected_embedding(
    embeds: &AudioEmbeds,
    mask: &DynValue,
    device: DeviceSpec,
) -> Result<Array2<f32>> {
    let audio = embeds.to_array()?; // [clips, tokens, hidden]
    let host;
    let mask = match device {
        DeviceSpec::Cpu => mask,
        DeviceSpec::Cuda(_) => {
            host = to_device(mask, DeviceSpec::Cpu)?;
            &host
        }
    };
    let mask = mask
        .try_extract_array::<i64>()
        .map_err(run_error("audio_encoder"))?;
    let (clips, tokens, hidden) = audio.dim();
    if mask.shape() != [clips, tokens] {
        return Err(EngineError::BadOutput {
            graph: "audio_encoder",
            name: enc_io::AUDIO_EMBEDS_MASK.to_string(),
            problem: format!(
                "has shape {:?} for embeddings {:?}",
                mask.shape(),
                audio.dim()
            ),
        });
    }
    let mut out = Array2::<f32>::zeros((clips, hidden));
    for c in 0..clips {
        let mut count = 0usize;
        for t in 0..tokens {
            if mask[[c, t]] != 0 {
                count += 1;
                let mut row = out.row_mut(c);
                row += &audio.slice(ndarray::s![c, t, ..]);
            }
        }
        if count == 0 {
            return Err(EngineError::BadOutput {
                graph: "audio_encoder",
                name: enc_io::AUDIO_EMBEDS_MASK.to_string(),
                problem: format!("marks no token of clip {c} valid"),
            });
        }
        out.row_mut(c).mapv_inplace(|v| v / count as f32);
    }
    Ok(out)
}

/// Audio embeddings of a batch of clips, [clips, audio_tokens, hidden] f32, in the
/// memory of the device the model runs on.
pub struct AudioEmbeds {
    value: DynValue,
    clips: usize,
    device: DeviceSpec,
    /// Per clip, what [`ClipRequest`] asked for (empty when nothing was).
    extras: Vec<ClipExtras>,
}

impl AudioEmbeds {
    /// Wraps an encoder output (or a value built by the helpers below).
    pub(super) fn new(value: DynValue, device: DeviceSpec) -> Result<Self> {
        let shape = float_shape(&value, TensorElementType::Float32)?;
        if shape.len() != 3 {
            return Err(EngineError::Input(format!(
                "audio embeddings of shape {shape:?}, expected [clips, tokens, hidden]"
            )));
        }
        Ok(Self {
            value,
            clips: shape[0],
            device,
            extras: Vec::new(),
        })
    }

    /// Each clip's tags and embedding as the encoder was asked for them (defaults
    /// when nothing was), taken out: one per clip, in order.
    pub fn take_extras(&mut self) -> Vec<ClipExtras> {
        let mut extras = std::mem::take(&mut self.extras);
        extras.resize(self.clips, ClipExtras::default());
        extras
    }

    /// Host embeddings moved to `device`, the one the model runs on (tests,
    /// benchmarks, reference audio).
    pub fn from_array(device: DeviceSpec, audio: Array3<f32>) -> Result<Self> {
        let host = Tensor::from_array(audio)
            .map_err(run_error("audio_encoder"))?
            .into_dyn();
        let value = match device {
            DeviceSpec::Cpu => host,
            DeviceSpec::Cuda(_) => to_device(&host, device)?,
        };
        Self::new(value, device)
    }

    pub fn clips(&self) -> usize {
        self.clips
    }

    pub fn is_empty(&self) -> bool {
        self.clips == 0
    }

    /// [audio_tokens, hidden].
    fn row_dims(&self) -> (usize, usize) {
        let shape = float_shape(&self.value, TensorElementType::Float32).unwrap_or_default();
        (
            shape.get(1).copied().unwrap_or(0),
            shape.get(2).copied().unwrap_or(0),
        )
    }

    /// A host copy (tests and diagnostics; the pipeline never needs one).
    pub fn to_array(&self) -> Result<Array3<f32>> {
        let host;
        let value = match self.device {
            DeviceSpec::Cpu => &self.value,
            DeviceSpec::Cuda(_) => {
                host = to_device(&self.value, DeviceSpec::Cpu)?;
                &host
            }
        };
        value
            .try_extract_array::<f32>()
            .map_err(run_error("audio_encoder"))?
            .to_owned()
            .into_dimensionality::<ndarray::Ix3>()
            .map_err(|e| EngineError::Input(format!("audio embeddings: {e}")))
    }

    pub(super) fn value(&self) -> &DynValue {
        &self.value
    }
}

/// Names in the helper graphs.
const AUDIO: &str = "audio";
const FIRST: &str = "first";
const SECOND: &str = "second";
const START: &str = "start";
const END: &str = "end";
const ROWS: &str = "rows";
const PROMPT: &str = "prompt";

/// Builds the decoder's prompt embeddings where the model runs: `audio` [n, N, H]
/// f32 → `prompt` [n, prefix + N + suffix, H] in the export's float type, the
/// template's text embeddings (computed once by the embedding graph) around each
/// clip's audio.
pub struct PromptAssembler {
    session: Session,
    device: DeviceSpec,
}

impl PromptAssembler {
    pub fn new(
        device: DeviceSpec,
        dtype: ExportDtype,
        prefix: &Array2<f32>,
        suffix: &Array2<f32>,
        audio_tokens: usize,
        hidden: usize,
    ) -> Result<Self> {
        let float = match dtype {
            ExportDtype::F32 => DataType::Float,
            ExportDtype::F16 => DataType::Float16,
        };
        let mut g = Graph::new("assemble_prompt", float);
        let audio = g.input(
            AUDIO,
            DataType::Float,
            &[
                Dim::named("n"),
                Dim::Fixed(audio_tokens),
                Dim::Fixed(hidden),
            ],
        );
        let clips = g.dim(&audio, 0);
        let audio = g.from_f32(&audio);
        let mut parts = Vec::new();
        for (name, text) in [("prefix", prefix), ("suffix", suffix)] {
            if text.nrows() == 0 {
                parts.push(None);
                continue;
            }
            // The text went through the export's float type already (the embedding
            // graph's output), so storing it in that type again is exact.
            let tensor = candle_core::Tensor::from_slice(
                text.as_standard_layout()
                    .as_slice()
                    .expect("standard layout"),
                (1, text.nrows(), text.ncols()),
                &candle_core::Device::Cpu,
            )
            .map_err(|e| EngineError::Input(format!("prompt {name}: {e}")))?;
            let constant = g
                .weight(name, &tensor)
                .map_err(|e| EngineError::Input(format!("prompt {name}: {e}")))?;
            let rest = g.const_i64(&[text.nrows() as i64, text.ncols() as i64]);
            let shape = g.concat(&[&clips, &rest], 0);
            parts.push(Some(g.op("Expand", &[&constant, &shape], vec![])));
        }
        let mut pieces: Vec<&Value> = Vec::new();
        if let Some(p) = &parts[0] {
            pieces.push(p);
        }
        pieces.push(&audio);
        if let Some(s) = &parts[1] {
            pieces.push(s);
        }
        let prompt = g.concat(&pieces, 1);
        let length = prefix.nrows() + audio_tokens + suffix.nrows();
        g.output(
            &prompt,
            PROMPT,
            float,
            &[Dim::named("n"), Dim::Fixed(length), Dim::Fixed(hidden)],
        );
        Ok(Self {
            session: helper_session(g, device, "prompt-assembly")?,
            device,
        })
    }

    /// The prompt embeddings of every clip of `audio`, where the model runs.
    pub fn assemble(&mut self, audio: &AudioEmbeds) -> Result<DynValue> {
        let mut outputs = run_bound(
            &mut self.session,
            "assemble_prompt",
            self.device,
            &[(AUDIO.to_string(), audio.value())],
            &[PROMPT.to_string()],
        )?;
        Ok(outputs.remove(0))
    }
}

/// Rows `start..end` of two audio batches joined, where the model runs:
/// `first` [A, N, H], `second` [B, N, H], `start`, `end` [1] int64 → `rows`.
struct RowJoiner {
    session: Session,
    device: DeviceSpec,
}

impl RowJoiner {
    fn new(device: DeviceSpec, audio_tokens: usize, hidden: usize) -> Result<Self> {
        let mut g = Graph::new("audio_rows", DataType::Float);
        let dims = |rows: &str| {
            vec![
                Dim::named(rows),
                Dim::Fixed(audio_tokens),
                Dim::Fixed(hidden),
            ]
        };
        let first = g.input(FIRST, DataType::Float, &dims("a"));
        let second = g.input(SECOND, DataType::Float, &dims("b"));
        let start = g.input(START, DataType::Int64, &[Dim::Fixed(1)]);
        let end = g.input(END, DataType::Int64, &[Dim::Fixed(1)]);
        let joined = g.concat(&[&first, &second], 0);
        let rows = g.slice_dynamic(&joined, 0, &start, &end);
        g.output(&rows, ROWS, DataType::Float, &dims("n"));
        Ok(Self {
            session: helper_session(g, device, "audio-rows")?,
            device,
        })
    }

    /// Rows `start..end` of `first` followed by `second`.
    fn rows(
        &mut self,
        first: &AudioEmbeds,
        second: &AudioEmbeds,
        start: usize,
        end: usize,
    ) -> Result<AudioEmbeds> {
        let bound = |v: usize| {
            Tensor::from_array((vec![1usize], vec![v as i64]))
                .map(|t| t.into_dyn())
                .map_err(run_error("audio_rows"))
        };
        let (start_v, end_v) = (bound(start)?, bound(end)?);
        let mut outputs = run_bound(
            &mut self.session,
            "audio_rows",
            self.device,
            &[
                (FIRST.to_string(), first.value()),
                (SECOND.to_string(), second.value()),
                (START.to_string(), &start_v),
                (END.to_string(), &end_v),
            ],
            &[ROWS.to_string()],
        )?;
        AudioEmbeds::new(outputs.remove(0), self.device)
    }
}

/// Encoded clips waiting for decoder rows, first in first out, kept where the model
/// runs: batches as the encoder made them, taken out `n` rows at a time (rows of
/// several batches are joined on the device).
#[derive(Default)]
pub struct AudioQueue {
    /// Each batch with the index of its first row not yet taken.
    batches: VecDeque<(Rc<AudioEmbeds>, usize)>,
    len: usize,
    joiner: Option<RowJoiner>,
}

impl AudioQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Clips waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, audio: AudioEmbeds) {
        if !audio.is_empty() {
            self.len += audio.clips();
            self.batches.push_back((Rc::new(audio), 0));
        }
    }

    /// The first `n` clips waiting (at most [`len`](Self::len)), in order. On an
    /// error they are gone from the queue all the same (their caller reports them).
    pub fn take(&mut self, n: usize) -> Result<AudioEmbeds> {
        if n == 0 || n > self.len {
            return Err(EngineError::Input(format!(
                "taking {n} clips from a queue of {}",
                self.len
            )));
        }
        // First the rows leave the queue, then they are joined.
        self.len -= n;
        let mut pieces = Vec::new();
        let mut missing = n;
        while missing > 0 {
            let (batch, start) = self.batches.pop_front().expect("len counts the rows");
            let end = (start + missing).min(batch.clips());
            missing -= end - start;
            if end < batch.clips() {
                self.batches.push_front((Rc::clone(&batch), end));
            }
            pieces.push((batch, start, end));
        }
        let mut pieces = pieces.into_iter();
        let (first, start, end) = pieces.next().expect("n > 0");
        let mut taken = if start == 0 && end == first.clips() {
            match Rc::try_unwrap(first) {
                Ok(whole) => whole,
                Err(shared) => self.joiner(&shared)?.rows(&shared, &shared, start, end)?,
            }
        } else {
            self.joiner(&first)?.rows(&first, &first, start, end)?
        };
        for (next, _, end) in pieces {
            let joined = taken.clips() + end;
            taken = self.joiner(&next)?.rows(&taken, &next, 0, joined)?;
        }
        Ok(taken)
    }

    fn joiner(&mut self, like: &AudioEmbeds) -> Result<&mut RowJoiner> {
        if self.joiner.is_none() {
            let (tokens, hidden) = like.row_dims();
            self.joiner = Some(RowJoiner::new(like.device, tokens, hidden)?);
        }
        Ok(self.joiner.as_mut().expect("built above"))
    }
}

/// The shape of a tensor value of element type `ty`.
fn float_shape(value: &DynValue, ty: TensorElementType) -> Result<Vec<usize>> {
    match value.dtype() {
        ValueType::Tensor { ty: t, shape, .. } if *t == ty => {
            Ok(shape.iter().map(|&d| d.max(0) as usize).collect())
        }
        other => Err(EngineError::Input(format!(
            "expected a {ty:?} tensor, got {other:?}"
        ))),
    }
}
