//! An exported model directory on ONNX Runtime: one session per graph, owned by the
//! thread that runs it (`Session::run` takes `&mut self`).

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionOutputs};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use tokenizers::Tokenizer;

use super::audio::{AudioEmbeds, AudioEncoder, ClipRequest, PromptAssembler};
use super::error::{EngineError, Result, run_error};
use super::kv_cache::{CacheLayout, RowGatherer, RowInserter, ZeroFiller};
use super::runtime::session_builder;
use super::session::{device_memory, run_bound, to_device};
use crate::config::DeviceSpec;
use crate::graph_io::decoder::{self as dec_io, FUSED_MAX_POSITIONS};
use crate::manifest::{Attention, ExportDtype, ModelManifest};
use crate::model::prompt::load_tokenizer;

/// How sessions are created.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: DeviceSpec,
    /// Threads inside each ONNX operator (`None`: ONNX Runtime's default).
    pub intra_threads: Option<usize>,
    /// ONNX Runtime's per-node profiling, written as `{prefix}-{graph}_*.json` by
    /// [`OnnxModel::end_profiling`] (benchmarks only: it records every node run).
    pub profile_prefix: Option<PathBuf>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            intra_threads: None,
            profile_prefix: None,
        }
    }
}

/// The three graphs of an export, its manifest and tokenizer.
pub struct OnnxModel {
    pub dir: PathBuf,
    pub manifest: ModelManifest,
    /// `name@manifest-hash`, recorded in output rows.
    pub identity: String,
    pub tokenizer: Tokenizer,
    /// `None` once [`take_encoder`](Self::take_encoder) handed it over.
    encoder: Option<AudioEncoder>,
    embedding: Session,
    decoder: Session,
    /// Embeddings of the prompt text before and after the audio, [tokens, hidden].
    prefix_embeds: Array2<f32>,
    suffix_embeds: Array2<f32>,
    device: DeviceSpec,
    /// The decoder graph picks greedy tokens itself (`next_token`; exports since
    /// 0.1 of this layout). Older exports return logits and the host picks.
    device_greedy: bool,
    /// See [`OnnxModel::keeps_finished_rows`].
    keep_finished_rows: bool,
    /// The decoder takes `position_ids` (eager graphs; fused ones rotate inside the
    /// attention operator at the positions the rows' lengths imply).
    takes_positions: bool,
    /// Fused attention: caches handed back by finished batches, for the next batch
    /// of the same shape (allocating one on a GPU costs a host-to-device copy).
    spare_caches: Vec<Vec<DynValue>>,
    /// Fused attention: writes prefilled rows into a running cache (built on first use).
    inserter: Option<RowInserter>,
    /// Picks cache rows where the model runs (built on first use).
    gatherer: Option<RowGatherer>,
    /// Builds prompts around audio embeddings where the model runs (first use).
    assembler: Option<PromptAssembler>,
    /// Fused attention: zeroed cache buffers made where the model runs (first use).
    zero_filler: Option<ZeroFiller>,
}

/// What a decoder step hands back: the last position's logits [B, vocab] when they
/// were asked for on the host, else the greedy choice made on the device.
pub enum StepOutput {
    Logits(Array2<f32>),
    Greedy(GreedyChoice),
}

/// The device's greedy choice per row.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyChoice {
    pub tokens: Vec<u32>,
    /// Log-probability of each chosen token under the full softmax.
    pub logprobs: Vec<f32>,
}

impl OnnxModel {
    /// Loads `dir` (an `audiocap export` output) on the chosen device.
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Self> {
        let manifest = ModelManifest::read(dir)?;
        manifest.verify_sizes(dir)?;
        let identity = manifest.identity(dir)?;
        let open = |file: &str| -> Result<Session> {
            let path = dir.join(file);
            let mut builder = session_builder(&options.device, options.intra_threads)?;
            if let Some(prefix) = &options.profile_prefix {
                let stem = file.trim_end_matches(".onnx");
                let mut name = prefix.as_os_str().to_owned();
                name.push(format!("-{stem}"));
                builder =
                    builder
                        .with_profiling(PathBuf::from(name))
                        .map_err(|e| EngineError::Load {
                            path: path.clone(),
                            source: ort::Error::new_with_code(e.code(), e.message()),
                        })?;
            }
            builder
                .commit_from_file(&path)
                .map_err(|e| EngineError::Load {
                    path: path.clone(),
                    source: ort::Error::new_with_code(e.code(), e.message()),
                })
        };
        let encoder = AudioEncoder::new(
            open(&manifest.onnx.audio_encoder.file.path)?,
            options.device,
            manifest.front_end.num_mel_bins,
            manifest.encoder.min_frames,
        );
        let mut embedding = open(&manifest.onnx.embedding.file.path)?;
        let decoder = open(&manifest.onnx.decoder.file.path)?;
        let tokenizer = load_tokenizer(&dir.join(&manifest.onnx.tokenizer.path))?;
        let prefix_embeds = embed_ids(&mut embedding, &manifest.prompt.ids.prefix)?;
        let suffix_embeds = embed_ids(&mut embedding, &manifest.prompt.ids.suffix)?;
        let device_greedy = decoder
            .outputs()
            .iter()
            .any(|o| o.name() == dec_io::NEXT_TOKEN);
        let takes_positions = decoder
            .inputs()
            .iter()
            .any(|i| i.name() == dec_io::POSITION_IDS);
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            identity,
            tokenizer,
            encoder: Some(encoder),
            embedding,
            decoder,
            prefix_embeds,
            suffix_embeds,
            device: options.device,
            device_greedy,
            keep_finished_rows: matches!(options.device, DeviceSpec::Cuda(_)),
            takes_positions,
            spare_caches: Vec::new(),
            inserter: None,
            gatherer: None,
            assembler: None,
            zero_filler: None,
        })
    }

    /// Ends profiling (see [`EngineOptions::profile_prefix`]) and returns the files
    /// ONNX Runtime wrote: encoder, embedding, decoder.
    pub fn end_profiling(&mut self) -> Result<Vec<PathBuf>> {
        let encoder = self.encoder.as_mut().map(|e| e.session_mut());
        [
            (encoder, "audio_encoder"),
            (Some(&mut self.embedding), "embedding"),
            (Some(&mut self.decoder), "decoder"),
        ]
        .into_iter()
        .filter_map(|(session, graph)| Some((session?, graph)))
        .map(|(session, graph)| {
            session
                .end_profiling()
                .map(PathBuf::from)
                .map_err(run_error(graph))
        })
        .collect()
    }

    /// How the decoder attends and keeps its cache (see [`Attention`]).
    pub fn attention(&self) -> Attention {
        self.manifest.onnx.attention
    }

    /// Positions of the prompt: text before the audio, the audio embeddings, text after.
    pub fn prompt_len(&self) -> usize {
        self.prefix_embeds.nrows()
            + self.manifest.projector.audio_tokens
            + self.suffix_embeds.nrows()
    }

    /// Cache positions a caption of up to `max_new_tokens` tokens needs.
    pub fn cache_capacity(&self, max_new_tokens: usize) -> usize {
        self.prompt_len() + max_new_tokens
    }

    /// Whether finished rows should stay in the batch rather than leave it. On a GPU a
    /// decode step reads every weight whatever the batch, so a finished row costs
    /// next to nothing, while taking rows out of a cache in device memory would be a
    /// round trip through the host. On the CPU a step's cost grows with its rows.
    pub fn keeps_finished_rows(&self) -> bool {
        self.keep_finished_rows
    }

    /// Overrides the device's choice (tests check both ways give the same captions).
    pub fn set_keep_finished_rows(&mut self, keep: bool) {
        self.keep_finished_rows = keep;
    }

    /// Whether the decoder graph makes the greedy choice itself.
    pub fn has_device_greedy(&self) -> bool {
        self.device_greedy
    }

    pub fn hidden_size(&self) -> usize {
        self.manifest.decoder.hidden_size
    }

    /// The device the sessions run on.
    pub fn device(&self) -> DeviceSpec {
        self.device
    }

    /// Audio embeddings [B, audio_tokens, hidden] of a batch of normalised fbank
    /// matrices (row-major [frames, mel_bins] each), padded to the longest. They stay
    /// where the model runs: the decoder's prompt is built from them there.
    pub fn encode(&mut self, clips: &[(&[f32], usize)]) -> Result<AudioEmbeds> {
        match self.encoder.as_mut() {
            Some(encoder) => encoder.encode(clips),
            None => Err(EngineError::Input(
                "the encoder was handed to its own thread".into(),
            )),
        }
    }

    /// Asks the encoder for tags and embeddings beside the audio embeddings (see
    /// [`ClipRequest`]; [`AudioEmbeds::take_extras`] hands them out). Refused when
    /// the export lacks the outputs, or once the encoder was handed over.
    pub fn request_clip_outputs(&mut self, request: ClipRequest) -> Result<()> {
        let labels = self
            .manifest
            .encoder
            .tags
            .as_ref()
            .map(|t| t.labels.clone())
            .unwrap_or_default();
        match self.encoder.as_mut() {
            Some(encoder) => encoder.request(request, labels),
            None => Err(EngineError::Input(
                "the encoder was handed to its own thread".into(),
            )),
        }
    }

    /// Whether the encoder is still here (not handed to its own thread).
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// Hands the encoder over (to a thread of its own: see the model stage); the
    /// decoder side stays here.
    pub fn take_encoder(&mut self) -> Option<AudioEncoder> {
        self.encoder.take()
    }

    /// The decoder's input for the prompts of `audio`'s clips: the template's text
    /// embeddings around each clip's audio, [B, prompt_len, hidden] in the export's
    /// float type, built where the model runs.
    pub fn prompt(&mut self, audio: &AudioEmbeds) -> Result<DynValue> {
        if self.assembler.is_none() {
            self.assembler = Some(PromptAssembler::new(
                self.device,
                self.manifest.onnx.dtype,
                &self.prefix_embeds,
                &self.suffix_embeds,
                self.manifest.projector.audio_tokens,
                self.manifest.decoder.hidden_size,
            )?);
        }
        self.assembler
            .as_mut()
            .expect("built above")
            .assemble(audio)
    }

    /// Embeddings [B, 1, hidden] of one token per row, as a decoder input value where
    /// the model runs (only the ids cross from the host).
    pub fn embed_step(&mut self, ids: &[u32]) -> Result<DynValue> {
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let input = Tensor::from_array((vec![ids.len(), 1], ids))
            .map_err(run_error("embedding"))?
            .into_dyn();
        let mut outputs = run_bound(
            &mut self.embedding,
            "embedding",
            self.device,
            &[(dec_io::INPUT_IDS.to_string(), &input)],
            &[dec_io::INPUTS_EMBEDS.to_string()],
        )?;
        Ok(outputs.remove(0))
    }

    /// A host copy, in f32, of a float value (f32 or f16) where the model runs
    /// (tests and diagnostics: prompts, embeddings).
    pub fn to_host(&self, value: &DynValue) -> Result<ArrayD<f32>> {
        match self.device {
            DeviceSpec::Cpu => to_f32_array(value, "decoder"),
            DeviceSpec::Cuda(_) => to_f32_array(&to_device(value, DeviceSpec::Cpu)?, "decoder"),
        }
    }

    /// Where the KV cache lives: the device the decoder runs on.
    fn cache_memory(&self) -> Result<MemoryInfo<'static>> {
        device_memory(self.device)
    }

    fn cache_layout(&self) -> CacheLayout {
        let d = &self.manifest.decoder;
        CacheLayout {
            device: self.device,
            dtype: self.manifest.onnx.dtype,
            values: 2 * d.num_layers,
            kv_heads: d.num_key_value_heads,
            head_dim: d.head_dim,
        }
    }

    /// Keeps rows `rows` (in that order, repeats allowed) of every cache value along
    /// the batch axis, where the model runs: finished sequences leave the batch, beams
    /// follow their parents.
    pub fn select_cache_rows(
        &mut self,
        values: Vec<DynValue>,
        rows: &[usize],
    ) -> Result<Vec<DynValue>> {
        if self.gatherer.is_none() {
            self.gatherer = Some(RowGatherer::new(self.cache_layout())?);
        }
        self.gatherer
            .as_mut()
            .expect("built above")
            .gather(values, rows)
    }

    /// KV cache values for `batch` rows that may grow to `capacity` positions: empty
    /// values for eager attention, zeroed (or recycled) buffers of `capacity`
    /// positions for fused attention.
    pub fn empty_past(&mut self, batch: usize, capacity: usize) -> Result<Vec<DynValue>> {
        let d = &self.manifest.decoder;
        if self.attention() == Attention::Fused {
            let limit = d.max_position_embeddings.min(FUSED_MAX_POSITIONS);
            if capacity > limit {
                return Err(EngineError::Input(format!(
                    "a cache of {capacity} positions is past this export's {limit} (prompt plus max_new_tokens)"
                )));
            }
            let shape = [batch, d.num_key_value_heads, capacity, d.head_dim];
            if let Some(i) = self
                .spare_caches
                .iter()
                .position(|c| c.first().is_some_and(|v| cache_shape(v) == shape))
            {
                return Ok(self.spare_caches.swap_remove(i));
            }
            if self.zero_filler.is_none() {
                self.zero_filler = Some(ZeroFiller::new(self.cache_layout())?);
            }
            return self.zero_filler.as_mut().expect("built above").zeros(shape);
        }
        let shape = vec![batch, d.num_key_value_heads, 0, d.head_dim];
        (0..2 * d.num_layers)
            .map(|_| match self.manifest.onnx.dtype {
                ExportDtype::F32 => Tensor::<f32>::from_array((shape.clone(), Vec::<f32>::new()))
                    .map(|t| t.into_dyn()),
                ExportDtype::F16 => {
                    Tensor::<half::f16>::from_array((shape.clone(), Vec::<half::f16>::new()))
                        .map(|t| t.into_dyn())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(run_error("decoder"))
    }

    /// Hands a finished batch's cache back for reuse (fused attention; the last two
    /// shapes are kept).
    pub fn recycle_cache(&mut self, cache: Vec<DynValue>) {
        if self.attention() == Attention::Fused
            && cache.len() == 2 * self.manifest.decoder.num_layers
        {
            self.spare_caches.push(cache);
            if self.spare_caches.len() > 2 {
                self.spare_caches.remove(0);
            }
        }
    }

    /// Fused attention: copies row `i` of every `update` value (a prefill's cache)
    /// into row `rows[i]` of `cache`, in place where the model runs.
    pub fn insert_cache_rows(
        &mut self,
        cache: Vec<DynValue>,
        update: &[DynValue],
        rows: &[usize],
    ) -> Result<Vec<DynValue>> {
        if self.inserter.is_none() {
            self.inserter = Some(RowInserter::new(self.cache_layout())?);
        }
        self.inserter
            .as_mut()
            .expect("built above")
            .insert(cache, update, rows)
    }

    /// One decoder call over `embeds` [B, S, H] with `past` (2 values per layer, key
    /// then value) holding `past_len` positions. Returns the last position's logits
    /// [B, vocab] and the new cache.
    pub fn decode(
        &mut self,
        embeds: DynValue,
        past: Vec<DynValue>,
        past_len: usize,
    ) -> Result<(Array2<f32>, Vec<DynValue>)> {
        let batch = embeds_shape(&embeds)?[0];
        let (output, cache) = self.run_decoder(
            embeds,
            past,
            &vec![past_len; batch],
            &vec![false; batch],
            true,
        )?;
        match output {
            StepOutput::Logits(logits) => Ok((logits, cache)),
            StepOutput::Greedy(_) => Err(EngineError::Input("decoder returned no logits".into())),
        }
    }

    /// One decoder call whose greedy choice is made where the model runs: only the
    /// chosen ids and their log-probabilities come back to the host. Rows with
    /// `suppress_stops[row]` may not choose a stop id. Exports without the greedy
    /// outputs fall back to logits and a host argmax (same result).
    pub fn decode_greedy(
        &mut self,
        embeds: DynValue,
        past: Vec<DynValue>,
        past_len: usize,
        suppress_stops: &[bool],
    ) -> Result<(GreedyChoice, Vec<DynValue>)> {
        let batch = embeds_shape(&embeds)?[0];
        self.decode_greedy_rows(embeds, past, &vec![past_len; batch], suppress_stops)
    }

    /// [`OnnxModel::decode_greedy`] with each row at its own length: `lengths[row]`
    /// positions of that row are in the cache. Rows of different lengths need fused
    /// attention.
    pub fn decode_greedy_rows(
        &mut self,
        embeds: DynValue,
        past: Vec<DynValue>,
        lengths: &[usize],
        suppress_stops: &[bool],
    ) -> Result<(GreedyChoice, Vec<DynValue>)> {
        let (output, cache) = self.run_decoder(embeds, past, lengths, suppress_stops, false)?;
        let choice = match output {
            StepOutput::Greedy(choice) => choice,
            StepOutput::Logits(logits) => {
                host_greedy(&logits, &self.manifest.generation.stop_ids, suppress_stops)
            }
        };
        Ok((choice, cache))
    }

    fn run_decoder(
        &mut self,
        embeds: DynValue,
        mut past: Vec<DynValue>,
        lengths: &[usize],
        suppress_stops: &[bool],
        logits_on_host: bool,
    ) -> Result<(StepOutput, Vec<DynValue>)> {
        let shape = embeds_shape(&embeds)?;
        let (batch, seq) = (shape[0], shape[1]);
        if suppress_stops.len() != batch || lengths.len() != batch {
            return Err(EngineError::Input(format!(
                "{} stop-suppression flags and {} lengths for {batch} rows",
                suppress_stops.len(),
                lengths.len()
            )));
        }
        let layers = self.manifest.decoder.num_layers;
        if past.len() != 2 * layers {
            return Err(EngineError::Input(format!(
                "{} cache values for {layers} layers",
                past.len()
            )));
        }
        let fused = self.attention() == Attention::Fused;
        let positions = if self.takes_positions {
            let positions: Vec<i64> = lengths
                .iter()
                .flat_map(|&len| (len..len + seq).map(|p| p as i64))
                .collect();
            let value =
                Tensor::from_array((vec![batch, seq], positions)).map_err(run_error("decoder"))?;
            Some(value.into_dyn())
        } else {
            None
        };
        // Eager: one length for the batch, told by a 0/1 mask; fused: each row's own
        // length, checked against the buffers' capacity.
        let mut lengths_inputs: Vec<(String, DynValue)> = Vec::new();
        if fused {
            let capacity = past.first().map(|v| cache_shape(v)[2]).unwrap_or(0);
            if let Some(&longest) = lengths.iter().max().filter(|&&l| l + seq > capacity) {
                return Err(EngineError::Input(format!(
                    "a row of {longest} positions plus {seq} new ones does not fit a cache of {capacity}"
                )));
            }
            let seqlens: Vec<i32> = lengths.iter().map(|&l| (l + seq - 1) as i32).collect();
            let total = lengths.iter().max().map_or(seq, |&l| l + seq) as i32;
            lengths_inputs.push((
                dec_io::SEQLENS_K.to_string(),
                Tensor::from_array((vec![batch], seqlens))
                    .map_err(run_error("decoder"))?
                    .into_dyn(),
            ));
            lengths_inputs.push((
                dec_io::TOTAL_SEQUENCE_LENGTH.to_string(),
                Tensor::from_array((Vec::<usize>::new(), vec![total]))
                    .map_err(run_error("decoder"))?
                    .into_dyn(),
            ));
        } else {
            let past_len = lengths.first().copied().unwrap_or(0);
            if lengths.iter().any(|&l| l != past_len) {
                return Err(EngineError::Input(
                    "rows of different lengths need an export with fused attention".into(),
                ));
            }
            let total = past_len + seq;
            lengths_inputs.push((
                dec_io::ATTENTION_MASK.to_string(),
                Tensor::from_array((vec![batch, total], vec![1i64; batch * total]))
                    .map_err(run_error("decoder"))?
                    .into_dyn(),
            ));
        }
        // The cache stays where the model runs (device memory on CUDA) from one step
        // to the next through an I/O binding; only what the host reads comes back.
        let cache_memory = self.cache_memory()?;
        let host_memory = memory_info(AllocationDevice::CPU, 0)?;
        let mut binding = self
            .decoder
            .create_binding()
            .map_err(run_error("decoder"))?;
        let suppress = Tensor::from_array((vec![batch], suppress_stops.to_vec()))
            .map_err(run_error("decoder"))?
            .into_dyn();
        let mut bound = vec![(dec_io::INPUTS_EMBEDS.to_string(), &embeds)];
        if let Some(positions) = &positions {
            bound.push((dec_io::POSITION_IDS.to_string(), positions));
        }
        for (name, value) in &lengths_inputs {
            bound.push((name.clone(), value));
        }
        if self.device_greedy {
            bound.push((dec_io::SUPPRESS_STOPS.to_string(), &suppress));
        }
        for (i, value) in past.iter().enumerate() {
            bound.push((cache_name(i), value));
        }
        for (name, value) in bound {
            binding
                .bind_input(name, value)
                .map_err(run_error("decoder"))?;
        }
        let greedy_on_device = self.device_greedy && !logits_on_host;
        let logits_memory = if greedy_on_device {
            &cache_memory
        } else {
            &host_memory
        };
        binding
            .bind_output_to_device(dec_io::LOGITS, logits_memory)
            .map_err(run_error("decoder"))?;
        if self.device_greedy {
            for name in [dec_io::NEXT_TOKEN, dec_io::NEXT_TOKEN_LOGPROB] {
                binding
                    .bind_output_to_device(name, &host_memory)
                    .map_err(run_error("decoder"))?;
            }
        }
        if fused {
            // Past and present are one buffer: GroupQueryAttention writes in place.
            for (i, value) in past.iter_mut().enumerate() {
                binding
                    .bind_output(present_name(i), value)
                    .map_err(run_error("decoder"))?;
            }
        } else {
            for i in 0..2 * layers {
                binding
                    .bind_output_to_device(present_name(i), &cache_memory)
                    .map_err(run_error("decoder"))?;
            }
        }
        let mut outputs = self
            .decoder
            .run_binding(&binding)
            .map_err(run_error("decoder"))?;
        let logits = take(&mut outputs, "decoder", dec_io::LOGITS)?;
        let greedy = if greedy_on_device {
            let tokens = take(&mut outputs, "decoder", dec_io::NEXT_TOKEN)?;
            let logprobs = take(&mut outputs, "decoder", dec_io::NEXT_TOKEN_LOGPROB)?;
            let (_, tokens) = tokens
                .try_extract_tensor::<i64>()
                .map_err(run_error("decoder"))?;
            let (_, logprobs) = logprobs
                .try_extract_tensor::<f32>()
                .map_err(run_error("decoder"))?;
            Some(greedy_choice(
                tokens,
                logprobs,
                batch,
                self.manifest.decoder.vocab_size,
            )?)
        } else {
            None
        };
        let present = if fused {
            past
        } else {
            let present = (0..2 * layers)
                .map(|i| take(&mut outputs, "decoder", &present_name(i)))
                .collect::<Result<Vec<_>>>()?;
            drop(past);
            present
        };
        drop(outputs);
        drop(binding);
        if let Some(choice) = greedy {
            return Ok((StepOutput::Greedy(choice), present));
        }
        let (shape, data) = logits
            .try_extract_tensor::<f32>()
            .map_err(run_error("decoder"))?;
        let last = last_logits(shape, data, batch, self.manifest.decoder.vocab_size)?;
        Ok((StepOutput::Logits(last), present))
    }
}

fn bad_output(name: &str, problem: String) -> EngineError {
    EngineError::BadOutput {
        graph: "decoder",
        name: name.to_string(),
        problem,
    }
}

/// The last position's logits of each row: [B, 1, V] from current exports, [B, S, V]
/// from older ones. Any other shape (a graph that is not the export's) is an error.
fn last_logits(shape: &[i64], data: &[f32], batch: usize, vocab: usize) -> Result<Array2<f32>> {
    let problem = |what: String| bad_output(dec_io::LOGITS, what);
    let &[b, rows, v] = shape else {
        return Err(problem(format!(
            "has shape {shape:?}, expected [{batch}, positions, {vocab}]"
        )));
    };
    if b != batch as i64 || rows < 1 || v != vocab as i64 {
        return Err(problem(format!(
            "has shape {shape:?}, expected [{batch}, positions, {vocab}]"
        )));
    }
    let rows = rows as usize;
    if batch.checked_mul(rows).and_then(|n| n.checked_mul(vocab)) != Some(data.len()) {
        return Err(problem(format!(
            "holds {} values for shape {shape:?}",
            data.len()
        )));
    }
    let mut last = Array2::<f32>::zeros((batch, vocab));
    for b in 0..batch {
        let start = (b * rows + rows - 1) * vocab;
        last.row_mut(b)
            .assign(&ndarray::ArrayView1::from(&data[start..start + vocab]));
    }
    Ok(last)
}

/// The device's greedy choice, checked: one token (a vocabulary id) and one
/// log-probability per row.
fn greedy_choice(
    tokens: &[i64],
    logprobs: &[f32],
    batch: usize,
    vocab: usize,
) -> Result<GreedyChoice> {
    if tokens.len() != batch {
        return Err(bad_output(
            dec_io::NEXT_TOKEN,
            format!("holds {} tokens for {batch} rows", tokens.len()),
        ));
    }
    if logprobs.len() != batch {
        return Err(bad_output(
            dec_io::NEXT_TOKEN_LOGPROB,
            format!("holds {} values for {batch} rows", logprobs.len()),
        ));
    }
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= vocab as i64) {
        return Err(bad_output(
            dec_io::NEXT_TOKEN,
            format!("holds token {bad}, outside the vocabulary of {vocab}"),
        ));
    }
    Ok(GreedyChoice {
        tokens: tokens.iter().map(|&t| t as u32).collect(),
        logprobs: logprobs.to_vec(),
    })
}

/// Cache value `i` (key then value, layer by layer) as a decoder input and output.
fn cache_name(i: usize) -> String {
    if i.is_multiple_of(2) {
        dec_io::past_key(i / 2)
    } else {
        dec_io::past_value(i / 2)
    }
}

fn present_name(i: usize) -> String {
    if i.is_multiple_of(2) {
        dec_io::present_key(i / 2)
    } else {
        dec_io::present_value(i / 2)
    }
}

/// The shape of a cache value ([rows, kv_heads, positions, head_dim]).
fn cache_shape(value: &DynValue) -> [usize; 4] {
    match value.dtype() {
        ValueType::Tensor { shape, .. } if shape.len() == 4 => {
            let d = |i: usize| shape[i].max(0) as usize;
            [d(0), d(1), d(2), d(3)]
        }
        _ => [0; 4],
    }
}

/// The greedy choice on the host, as the decoder graph makes it: the first maximal
/// logit (stop ids excluded in suppressed rows) and its log-probability.
pub fn host_greedy(
    logits: &Array2<f32>,
    stop_ids: &[u32],
    suppress_stops: &[bool],
) -> GreedyChoice {
    let mut tokens = Vec::with_capacity(logits.nrows());
    let mut logprobs = Vec::with_capacity(logits.nrows());
    for (row, values) in logits.rows().into_iter().enumerate() {
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = values.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_z = max as f64 + sum.ln();
        let suppress = suppress_stops.get(row).copied().unwrap_or(false);
        let mut best = (0usize, f32::NEG_INFINITY);
        for (i, &v) in values.iter().enumerate() {
            if suppress && stop_ids.contains(&(i as u32)) {
                continue;
            }
            if v > best.1 {
                best = (i, v);
            }
        }
        tokens.push(best.0 as u32);
        logprobs.push((best.1 as f64 - log_z) as f32);
    }
    GreedyChoice { tokens, logprobs }
}

fn memory_info(device: AllocationDevice<'static>, id: i32) -> Result<MemoryInfo<'static>> {
    MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)
        .map_err(run_error("decoder"))
}

fn embeds_shape(value: &DynValue) -> Result<Vec<usize>> {
    match value.dtype() {
        ValueType::Tensor { shape, .. } if shape.len() == 3 => {
            Ok(shape.iter().map(|&d| d.max(0) as usize).collect())
        }
        other => Err(EngineError::Input(format!(
            "decoder input embeddings have type {other:?}"
        ))),
    }
}

/// Removes output `name` from a run's outputs.
fn take(outputs: &mut SessionOutputs<'_>, graph: &'static str, name: &str) -> Result<DynValue> {
    outputs
        .remove(name)
        .ok_or_else(|| EngineError::MissingOutput {
            graph,
            name: name.to_string(),
        })
}

/// A float tensor (f32 or f16) copied into an f32 array.
fn to_f32_array(value: &DynValue, graph: &'static str) -> Result<ArrayD<f32>> {
    match value.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float16,
            ..
        } => Ok(value
            .try_extract_array::<half::f16>()
            .map_err(run_error(graph))?
            .mapv(f32::from)),
        _ => Ok(value
            .try_extract_array::<f32>()
            .map_err(run_error(graph))?
            .to_owned()),
    }
}

/// Runs the embedding graph on a fixed id list: [tokens, hidden] in f32.
fn embed_ids(session: &mut Session, ids: &[u32]) -> Result<Array2<f32>> {
    let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let n = ids.len();
    let input = Tensor::from_array((vec![1, n], ids)).map_err(run_error("embedding"))?;
    let mut outputs = session
        .run(ort::inputs![dec_io::INPUT_IDS => input])
        .map_err(run_error("embedding"))?;
    let embeds = take(&mut outputs, "embedding", dec_io::INPUTS_EMBEDS)?;
    let array = to_f32_array(&embeds, "embedding")?;
    let hidden = array.shape().get(2).copied().unwrap_or(0);
    array
        .into_shape_with_order(IxDyn(&[n, hidden]))
        .and_then(|a| a.into_dimensionality::<ndarray::Ix2>())
        .map_err(|e| EngineError::Input(format!("embedding output: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_position_of_each_row_is_taken() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let last = last_logits(&[2, 2, 3], &data, 2, 3).unwrap();
        assert_eq!(last, ndarray::arr2(&[[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]));
    }

    #[test]
    fn logits_of_an_unexpected_shape_are_an_error_not_an_index_panic() {
        let data = vec![0f32; 12];
        for (shape, batch, vocab) in [
            (&[2i64, 6][..], 2, 6),
            (&[2, 2, 3], 2, 4),
            (&[1, 2, 3], 2, 3),
            (&[2, 0, 3], 2, 3),
            (&[2, 3, 3], 2, 3),
            (&[2, -1, 3], 2, 3),
            (&[2, 1, 3, 2], 2, 3),
        ] {
            let e = last_logits(shape, &data, batch, vocab).unwrap_err();
            assert!(
                matches!(&e, EngineError::BadOutput { graph: "decoder", name, .. } if name == dec_io::LOGITS),
                "{shape:?}: {e}"
            );
        }
    }

    #[test]
    fn a_greedy_choice_must_hold_one_vocabulary_id_per_row() {
        let ok = greedy_choice(&[3, 0], &[-0.5, -1.0], 2, 4).unwrap();
        assert_eq!(ok.tokens, [3, 0]);
        for (tokens, logprobs) in [
            (&[3i64][..], &[-0.5f32, -1.0][..]),
            (&[3, 0], &[-0.5]),
            (&[4, 0], &[-0.5, -1.0]),
            (&[-1, 0], &[-0.5, -1.0]),
        ] {
            let e = greedy_choice(tokens, logprobs, 2, 4).unwrap_err();
            assert!(matches!(e, EngineError::BadOutput { .. }), "{e}");
        }
    }
}
