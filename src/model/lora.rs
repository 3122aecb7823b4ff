//! LoRA adapters in PEFT's format: loading, folding into the base weights, applying
//! them on the fly, and PEFT's `cat` combination of several adapters.
//!
//! A PEFT adapter directory holds `adapter_config.json` and
//! `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
//! The update of a module is `ΔW = s · B A` with `s = lora_alpha / r`
//! (`lora_alpha / √r` with `use_rslora`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::weights::{LoadError, Result, Weights};
use crate::rng::SplitMix64;

/// The prefix PEFT puts in front of module paths of a `CAUSAL_LM` model.
const PEFT_PREFIX: &str = "base_model.model.";

/// `adapter_config.json`, the fields that change the numbers. Unknown fields are
/// accepted (PEFT adds new ones often); fields we cannot honour are rejected by
/// [`AdapterConfig::check_supported`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module rank overrides, keyed by a module-name suffix.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, keyed by a module-name suffix.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Everything else PEFT wrote, kept so a re-saved config loses nothing.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_peft_type() -> String {
    "LORA".to_string()
}

fn default_bias() -> String {
    "none".to_string()
}

/// `target_modules` is a list of module-name suffixes or one regular expression.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// Whether the module at `path` is targeted. A regex target accepts every
    /// module that the adapter file holds weights for.
    fn targets(&self, path: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|n| suffix_matches(path, n)),
            TargetModules::Regex(_) => true,
        }
    }
}

/// PEFT matches a target name against the whole module path or its last parts.
fn suffix_matches(path: &str, key: &str) -> bool {
    path == key || path.ends_with(&format!(".{key}"))
}

impl AdapterConfig {
    fn check_supported(&self, file: &Path) -> Result<()> {
        let mut problems = Vec::new();
        if self.peft_type != "LORA" {
            problems.push(format!(
                "peft_type is {:?}; only LORA is supported",
                self.peft_type
            ));
        }
        if self.bias != "none" {
            problems.push(format!(
                "bias is {:?}; only \"none\" is supported",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            problems.push("fan_in_fan_out = true (GPT-2 Conv1D layers) is not supported".into());
        }
        if self.use_dora {
            problems.push("use_dora = true is not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            problems.push(format!(
                "modules_to_save {:?} would replace whole modules; not supported",
                self.modules_to_save.as_deref().unwrap_or_default()
            ));
        }
        if self.r == 0 {
            problems.push("r must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::config(file, problems.join("; ")))
        }
    }

    /// `lora_alpha` for the module at `path`, honouring `alpha_pattern`.
    fn alpha_for(&self, path: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(key, _)| suffix_matches(path, key))
            .map(|(_, &alpha)| alpha)
            .unwrap_or(self.lora_alpha)
    }

    /// The rank the config declares for the module at `path`.
    fn rank_for(&self, path: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(key, _)| suffix_matches(path, key))
            .map(|(_, &r)| r)
            .unwrap_or(self.r)
    }

    /// The scaling `s` of `ΔW = s · B A` for a module of rank `r`.
    pub fn scaling(&self, path: &str, r: usize) -> f64 {
        let alpha = self.alpha_for(path);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// One adapted module: `ΔW = scale · B A`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale · B A` [out, in], in f32.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let a = self.a.to_dtype(DType::F32)?;
        let b = self.b.to_dtype(DType::F32)?;
        b.matmul(&a)?.affine(self.scale, 0.0)
    }
}

/// A PEFT LoRA adapter: its config and its modules by path
/// (`model.layers.0.self_attn.q_proj`, without PEFT's `base_model.model.` prefix).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub modules: BTreeMap<String, LoraModule>,
}

impl PeftAdapter {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors`
    /// (or the older `adapter_model.bin` torch checkpoint).
    pub fn load(dir: &Path) -> Result<Self> {
        let config_file = dir.join("adapter_config.json");
        let config: AdapterConfig = super::weights::read_json_config(&config_file)?;
        config.check_supported(&config_file)?;

        let st_file = dir.join("adapter_model.safetensors");
        let bin_file = dir.join("adapter_model.bin");
        let (weights_file, tensors) = if st_file.is_file() {
            let weights = Weights::from_safetensors(
                &st_file,
                std::slice::from_ref(&st_file),
                DType::F32,
                &Device::Cpu,
            )?;
            let mut tensors = HashMap::new();
            for name in weights.names() {
                tensors.insert(name.clone(), weights.get_any_shape(&name)?);
            }
            (st_file, tensors)
        } else if bin_file.is_file() {
            let tensors = checkpoint::read_torch_state_dict(&bin_file, None)?;
            (bin_file, tensors)
        } else {
            return Err(LoadError::io(
                &st_file,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no adapter_model.safetensors (or adapter_model.bin) in the adapter directory",
                ),
            ));
        };

        // Group lora_A / lora_B by module path.
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, tensor) in tensors {
            let Some((path, which)) = parse_lora_key(&name) else {
                return Err(LoadError::Format {
                    file: weights_file.clone(),
                    format: "PEFT LoRA adapter",
                    message: format!(
                        "unexpected tensor `{name}` (only lora_A/lora_B weights are supported)"
                    ),
                });
            };
            let entry = pairs.entry(path).or_default();
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(|source| LoadError::tensor(weights_file.clone(), name.clone(), source))?;
            match which {
                LoraPart::A => entry.0 = Some(tensor),
                LoraPart::B => entry.1 = Some(tensor),
            }
        }

        let mut modules = BTreeMap::new();
        for (path, (a, b)) in pairs {
            let key = |part: &str| format!("{PEFT_PREFIX}{path}.{part}.weight");
            let a = a.ok_or_else(|| LoadError::MissingTensor {
                file: weights_file.clone(),
                name: key("lora_A"),
            })?;
            let b = b.ok_or_else(|| LoadError::MissingTensor {
                file: weights_file.clone(),
                name: key("lora_B"),
            })?;
            let (a_dims, b_dims) = (a.dims().to_vec(), b.dims().to_vec());
            let r = config.rank_for(&path);
            if a_dims.len() != 2 || a_dims[0] != r {
                return Err(LoadError::Shape {
                    file: weights_file.clone(),
                    name: key("lora_A"),
                    actual: a_dims,
                    expected: vec![r, a.dims().get(1).copied().unwrap_or(0)],
                });
            }
            if b_dims.len() != 2 || b_dims[1] != r {
                return Err(LoadError::Shape {
                    file: weights_file.clone(),
                    name: key("lora_B"),
                    actual: b_dims.clone(),
                    expected: vec![b_dims.first().copied().unwrap_or(0), r],
                });
            }
            if !config.target_modules.targets(&path) {
                return Err(LoadError::config(
                    &config_file,
                    format!(
                        "the adapter file has weights for `{path}`, which target_modules {:?} does not name",
                        config.target_modules
                    ),
                ));
            }
            let scale = config.scaling(&path, r);
            modules.insert(path, LoraModule { a, b, scale });
        }
        if modules.is_empty() {
            return Err(LoadError::Format {
                file: weights_file,
                format: "PEFT LoRA adapter",
                message: "no LoRA weights".into(),
            });
        }
        if let TargetModules::Names(names) = &config.target_modules {
            for name in names {
                if !modules.keys().any(|p| suffix_matches(p, name)) {
                    return Err(LoadError::config(
                        &config_file,
                        format!("target module `{name}` has no weights in the adapter file"),
                    ));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// Writes the adapter in PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors`), readable by Python PEFT.
    pub fn save(&self, dir: &Path) -> std::result::Result<(), SaveError> {
        std::fs::create_dir_all(dir).map_err(|source| SaveError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (path, module) in &self.modules {
            tensors.insert(
                format!("{PEFT_PREFIX}{path}.lora_A.weight"),
                module.a.clone(),
            );
            tensors.insert(
                format!("{PEFT_PREFIX}{path}.lora_B.weight"),
                module.b.clone(),
            );
        }
        let weights_file = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &weights_file).map_err(|source| {
            SaveError::Tensor {
                path: weights_file.clone(),
                source,
            }
        })?;
        let config_file = dir.join("adapter_config.json");
        let json = serde_json::to_string_pretty(&self.config).map_err(SaveError::Json)?;
        std::fs::write(&config_file, json + "\n").map_err(|source| SaveError::Io {
            path: config_file,
            source,
        })?;
        Ok(())
    }

    /// PEFT's `add_weighted_adapter(..., combination_type="cat")`: the combined adapter
    /// stacks every adapter's A rows and its `wᵢ · sᵢ · Bᵢ` columns, so it has rank
    /// `Σ rᵢ`, `lora_alpha = Σ rᵢ` (scaling 1) and `ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ`. A module
    /// missing from some adapters gets zero rows/columns in their place, as in PEFT.
    pub fn cat(adapters: &[PeftAdapter], weights: &[f64]) -> std::result::Result<Self, MergeError> {
        if adapters.is_empty() {
            return Err(MergeError::NoAdapters);
        }
        if adapters.len() != weights.len() {
            return Err(MergeError::WeightCount {
                adapters: adapters.len(),
                weights: weights.len(),
            });
        }
        let total_rank: usize = adapters.iter().map(|a| a.config.r).sum();
        for adapter in adapters {
            if !adapter.config.rank_pattern.is_empty() {
                return Err(MergeError::RankPattern(adapter.dir.clone()));
            }
        }
        let paths: BTreeSet<&String> = adapters.iter().flat_map(|a| a.modules.keys()).collect();
        let mut modules = BTreeMap::new();
        for path in paths {
            let mut a_blocks = Vec::new();
            let mut b_blocks = Vec::new();
            let (mut in_dim, mut out_dim) = (None, None);
            for adapter in adapters {
                if let Some(m) = adapter.modules.get(path) {
                    let (o, i) = (m.b.dims()[0], m.a.dims()[1]);
                    if in_dim.is_some_and(|d| d != i) || out_dim.is_some_and(|d| d != o) {
                        return Err(MergeError::Mismatch(path.clone()));
                    }
                    in_dim = Some(i);
                    out_dim = Some(o);
                }
            }
            let (in_dim, out_dim) = (in_dim.unwrap_or(0), out_dim.unwrap_or(0));
            for (adapter, &w) in adapters.iter().zip(weights) {
                let r = adapter.config.r;
                match adapter.modules.get(path) {
                    Some(m) => {
                        a_blocks.push(m.a.clone());
                        b_blocks.push(m.b.affine(w * m.scale, 0.0)?);
                    }
                    None => {
                        a_blocks.push(Tensor::zeros((r, in_dim), DType::F32, &Device::Cpu)?);
                        b_blocks.push(Tensor::zeros((out_dim, r), DType::F32, &Device::Cpu)?);
                    }
                }
            }
            let a = Tensor::cat(&a_blocks, 0)?;
            let b = Tensor::cat(&b_blocks, 1)?;
            modules.insert(path.clone(), LoraModule { a, b, scale: 1.0 });
        }
        let mut config = adapters[0].config.clone();
        config.r = total_rank;
        config.lora_alpha = total_rank as f64;
        config.use_rslora = false;
        config.alpha_pattern.clear();
        let mut targets: Vec<String> = Vec::new();
        for adapter in adapters {
            match &adapter.config.target_modules {
                TargetModules::Names(names) => {
                    for n in names {
                        if !targets.contains(n) {
                            targets.push(n.clone());
                        }
                    }
                }
                TargetModules::Regex(_) => {
                    // PEFT unions regexes into one alternation; a list of the module
                    // names actually present says the same thing more plainly.
                    for path in adapter.modules.keys() {
                        let leaf = path.rsplit('.').next().unwrap_or(path).to_string();
                        if !targets.contains(&leaf) {
                            targets.push(leaf);
                        }
                    }
                }
            }
        }
        config.target_modules = TargetModules::Names(targets);
        Ok(Self {
            dir: PathBuf::new(),
            config,
            modules,
        })
    }
}

enum LoraPart {
    A,
    B,
}

/// `base_model.model.<path>.lora_A[.<adapter name>].weight` → (`<path>`, A).
fn parse_lora_key(name: &str) -> Option<(String, LoraPart)> {
    let rest = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    let rest = rest.strip_suffix(".weight")?;
    for (marker, part) in [(".lora_A", LoraPart::A), (".lora_B", LoraPart::B)] {
        if let Some(idx) = rest.rfind(marker) {
            let tail = &rest[idx + marker.len()..];
            // An optional adapter name (`.default`) may follow in files saved by hand.
            if tail.is_empty() || (tail.starts_with('.') && !tail[1..].contains('.')) {
                return Some((rest[..idx].to_string(), part));
            }
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no adapters to merge")]
    NoAdapters,
    #[error("{adapters} adapters but {weights} weights")]
    WeightCount { adapters: usize, weights: usize },
    #[error("{}: adapters with rank_pattern cannot be combined with `cat`", .0.display())]
    RankPattern(PathBuf),
    #[error("module `{0}` has different shapes in different adapters")]
    Mismatch(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("adapter config: {0}")]
    Json(serde_json::Error),
}

/// How adapters enter the model: folded into the base weights (`W + ΔW`, what the
/// export and inference use) or kept as separate low-rank paths (what training and
/// the merge check use).
#[derive(Debug, Clone, Default)]
pub struct Adaptation {
    /// `ΔW` [out, in] per module path, added to the base weight at load time.
    folded: HashMap<String, Tensor>,
    /// Low-rank paths per module path, evaluated at every forward pass.
    live: HashMap<String, Vec<LoraModule>>,
    /// Dropout on the input of the live paths (training only).
    dropout: Option<Arc<LoraDropout>>,
}

/// PEFT's `lora_dropout`: while training, each live LoRA path sees its input with
/// elements zeroed with probability `p` (and the rest scaled by `1/(1-p)`); the
/// frozen path always sees the input as is. On the CPU masks come from a seeded
/// generator whose state a checkpoint stores (runs are reproducible and resume
/// exactly); on a GPU from the device's generator.
#[derive(Debug)]
pub struct LoraDropout {
    p: f64,
    training: AtomicBool,
    rng: Mutex<SplitMix64>,
}

impl LoraDropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            training: AtomicBool::new(true),
            rng: Mutex::new(SplitMix64::new(seed)),
        }
    }

    /// Training (dropout on) or evaluation (off).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    pub fn rng_state(&self) -> SplitMix64 {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_rng_state(&self, state: SplitMix64) {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p <= 0.0 || !self.training.load(Ordering::Relaxed) {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there (the device's own generator): a host
            // mask per LoRA path would be ~100 M random numbers and a copy per step
            // for Llama 3 8B. GPU runs are not bit-reproducible anyway.
            let draw = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            let mask = draw.ge(self.p)?.to_dtype(x.dtype())?.affine(keep, 0.0)?;
            return x.mul(&mask);
        }
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..x.elem_count())
                .map(|_| {
                    if rng.next_f64() < self.p {
                        0.0
                    } else {
                        keep as f32
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

impl Adaptation {
    /// The base model as published.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every adapter folded into the base weights: `W + Σ ΔWᵢ`.
    pub fn folded(adapters: &[&PeftAdapter]) -> candle_core::Result<Self> {
        let mut folded: HashMap<String, Tensor> = HashMap::new();
        for adapter in adapters {
            for (path, module) in &adapter.modules {
                let delta = module.delta()?;
                let sum = match folded.remove(path) {
                    Some(prev) => (prev + delta)?,
                    None => delta,
                };
                folded.insert(path.clone(), sum);
            }
        }
        Ok(Self {
            folded,
            live: HashMap::new(),
            dropout: None,
        })
    }

    /// Every adapter applied on the fly: `y = W x + Σ sᵢ Bᵢ Aᵢ x`.
    pub fn live(adapters: &[&PeftAdapter]) -> Self {
        let mut live: HashMap<String, Vec<LoraModule>> = HashMap::new();
        for adapter in adapters {
            for (path, module) in &adapter.modules {
                live.entry(path.clone()).or_default().push(module.clone());
            }
        }
        Self {
            folded: HashMap::new(),
            live,
            dropout: None,
        }
    }

    /// The live paths with dropout on their inputs while `dropout` is training.
    pub fn with_dropout(mut self, dropout: Arc<LoraDropout>) -> Self {
        self.dropout = Some(dropout);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.folded.is_empty() && self.live.is_empty()
    }

    /// Loads the linear layer at `w`'s prefix with whatever adapts it.
    pub fn linear(
        &self,
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<LoraLinear> {
        let path = w.prefix().to_string();
        let mut weight = w.get("weight", (out_dim, in_dim))?;
        if let Some(delta) = self.folded.get(&path) {
            weight = self
                .fold_into(&weight, delta)
                .map_err(|e| w.tensor_error("weight", e))?;
        }
        let bias = if bias {
            Some(w.get("bias", out_dim)?)
        } else {
            None
        };
        let mut adapters = Vec::new();
        for module in self.live.get(&path).into_iter().flatten() {
            if module.a.dims() != [module.rank(), in_dim]
                || module.b.dims() != [out_dim, module.rank()]
            {
                return Err(w.tensor_error(
                    "weight",
                    candle_core::Error::Msg(format!(
                        "LoRA A {:?} / B {:?} do not fit a [{out_dim}, {in_dim}] weight",
                        module.a.dims(),
                        module.b.dims()
                    )),
                ));
            }
            // A and B keep their own dtype (f32 when training): a cast here would
            // make new tensors that no longer follow the variables the optimiser
            // updates. `to_device` is a no-op for tensors already on the device.
            let a = module
                .a
                .to_device(w.device())
                .map_err(|e| w.tensor_error("weight", e))?;
            let b = module
                .b
                .to_device(w.device())
                .map_err(|e| w.tensor_error("weight", e))?;
            adapters.push(LoraPath {
                a,
                b,
                scale: module.scale,
                dropout: self.dropout.clone(),
            });
        }
        Ok(LoraLinear {
            base: candle_nn::Linear::new(weight, bias),
            adapters,
        })
    }

    fn fold_into(&self, weight: &Tensor, delta: &Tensor) -> candle_core::Result<Tensor> {
        if weight.dims() != delta.dims() {
            candle_core::bail!(
                "LoRA update has shape {:?}, the weight {:?}",
                delta.dims(),
                weight.dims()
            );
        }
        // Add in f32 so a bf16 model does not lose the (small) update to rounding twice.
        let merged = (weight.to_dtype(DType::F32)? + delta.to_device(weight.device())?)?;
        merged.to_dtype(weight.dtype())
    }

    /// Fails when an adapter names a module the model does not have (a typo in
    /// `target_modules`, or an adapter trained for another architecture).
    pub fn check_all_applied(&self, model_linears: &[String], origin: &Path) -> Result<()> {
        let known: BTreeSet<&str> = model_linears.iter().map(String::as_str).collect();
        let mut unknown: Vec<&str> = self
            .folded
            .keys()
            .chain(self.live.keys())
            .map(String::as_str)
            .filter(|p| !known.contains(p))
            .collect();
        unknown.sort();
        unknown.dedup();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(LoadError::config(
                origin,
                format!(
                    "the adapter targets modules this model does not have: {}",
                    unknown.join(", ")
                ),
            ))
        }
    }
}

/// One live low-rank path of a [`LoraLinear`], in the adapter's own dtype (which
/// may be wider than the frozen weight's).
#[derive(Debug, Clone)]
pub struct LoraPath {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
    pub dropout: Option<Arc<LoraDropout>>,
}

/// A linear layer of the frozen model plus zero or more live LoRA paths.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: candle_nn::Linear,
    pub adapters: Vec<LoraPath>,
}

impl Module for LoraLinear {
    /// `W x + Σ s B (A x)`, as PEFT computes it over a narrower frozen model
    /// (`autocast_adapter_dtype`): each low-rank path runs in its adapter's dtype on
    /// the input cast to it, the frozen output is added in that dtype, and the sum is
    /// cast back to the input's dtype. With every dtype equal the casts are no-ops.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The frozen weight gets no gradient; only the low-rank paths can be trained.
        let base = super::frozen::forward(&self.base, x)?;
        let Some(first) = self.adapters.first() else {
            return Ok(base);
        };
        let wide = first.a.dtype();
        let mut y = base.to_dtype(wide)?;
        for path in &self.adapters {
            let input = x.to_dtype(path.a.dtype())?;
            let input = match &path.dropout {
                Some(dropout) => dropout.apply(&input)?,
                None => input,
            };
            let low = candle_nn::Linear::new(path.a.clone(), None).forward(&input)?;
            let up = candle_nn::Linear::new(path.b.clone(), None).forward(&low)?;
            y = (y + up.affine(path.scale, 0.0)?.to_dtype(wide)?)?;
        }
        y.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, random};

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        random(&[shape.0, shape.1], seed, 1.0, 0.0)
    }

    fn adapter(r: usize, alpha: f64, seed: u64) -> PeftAdapter {
        let config: AdapterConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha,
            "target_modules": ["q_proj"], "bias": "none"
        }))
        .unwrap();
        let mut modules = BTreeMap::new();
        modules.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            LoraModule {
                a: randn((r, 6), seed),
                b: randn((5, r), seed + 1),
                scale: alpha / r as f64,
            },
        );
        PeftAdapter {
            dir: PathBuf::from(format!("a{seed}")),
            config,
            modules,
        }
    }

    #[test]
    fn cat_merge_equals_weighted_sum_of_updates() {
        let a0 = adapter(4, 8.0, 10);
        let a1 = adapter(2, 3.0, 20);
        let merged = PeftAdapter::cat(&[a0.clone(), a1.clone()], &[0.5, 0.25]).unwrap();
        assert_eq!(merged.config.r, 6);
        assert_eq!(merged.config.lora_alpha, 6.0);
        let path = "model.layers.0.self_attn.q_proj";
        let m = &merged.modules[path];
        assert_eq!(m.a.dims(), &[6, 6]);
        assert_eq!(m.b.dims(), &[5, 6]);
        // ΔW = Σ wᵢ (αᵢ/rᵢ) Bᵢ Aᵢ
        let expected = ((a0.modules[path].b.matmul(&a0.modules[path].a).unwrap()
            * (0.5 * 8.0 / 4.0))
            .unwrap()
            + (a1.modules[path].b.matmul(&a1.modules[path].a).unwrap() * (0.25 * 3.0 / 2.0))
                .unwrap())
        .unwrap();
        let scale = merged.config.scaling(path, merged.config.r);
        assert_eq!(scale, 1.0);
        assert!(max_abs_diff(&m.delta().unwrap(), &expected) < 1e-6);
    }

    #[test]
    fn folded_and_live_forward_agree() {
        let a0 = adapter(4, 8.0, 1);
        let a1 = adapter(4, 8.0, 2);
        let mut tensors = HashMap::new();
        tensors.insert(
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            randn((5, 6), 3),
        );
        let w = Weights::from_tensors("base.safetensors", tensors, DType::F32, &Device::Cpu);
        let w = w.pp("model.layers.0.self_attn.q_proj");
        let x = randn((3, 6), 4);
        let folded = Adaptation::folded(&[&a0, &a1])
            .unwrap()
            .linear(&w, 6, 5, false)
            .unwrap();
        let live = Adaptation::live(&[&a0, &a1])
            .linear(&w, 6, 5, false)
            .unwrap();
        let plain = Adaptation::none().linear(&w, 6, 5, false).unwrap();
        let yf = folded.forward(&x).unwrap();
        let yl = live.forward(&x).unwrap();
        assert!(max_abs_diff(&yf, &yl) < 1e-5);
        assert!(max_abs_diff(&yf, &plain.forward(&x).unwrap()) > 1e-2);
    }

    #[test]
    fn dropout_masks_scale_and_reproduce() {
        let x = Tensor::ones(4000, DType::F32, &Device::Cpu).unwrap();
        let a = LoraDropout::new(0.25, 9);
        let ya = a.apply(&x).unwrap().to_vec1::<f32>().unwrap();
        let zeros = ya.iter().filter(|v| **v == 0.0).count();
        assert!((800..1200).contains(&zeros), "{zeros} of 4000 dropped");
        assert!(ya.iter().all(|v| *v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        // Same seed, same mask; a restored state continues the sequence.
        let b = LoraDropout::new(0.25, 9);
        assert_eq!(b.apply(&x).unwrap().to_vec1::<f32>().unwrap(), ya);
        let saved = a.rng_state();
        let next = a.apply(&x).unwrap().to_vec1::<f32>().unwrap();
        b.set_rng_state(saved);
        assert_eq!(b.apply(&x).unwrap().to_vec1::<f32>().unwrap(), next);
        // Evaluation: the input as is.
        a.set_training(false);
        assert_eq!(
            a.apply(&x).unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 4000]
        );
    }

    #[test]
    fn parses_peft_keys() {
        let (p, _) =
            parse_lora_key("base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight")
                .unwrap();
        assert_eq!(p, "model.layers.3.self_attn.k_proj");
        let (p, _) =
            parse_lora_key("base_model.model.model.layers.3.mlp.up_proj.lora_A.default.weight")
                .unwrap();
        assert_eq!(p, "model.layers.3.mlp.up_proj");
        assert!(parse_lora_key("base_model.model.lm_head.weight").is_none());
    }

    #[test]
    fn rslora_and_alpha_pattern_change_the_scale() {
        let mut cfg = adapter(4, 8.0, 1).config;
        assert_eq!(cfg.scaling("model.layers.0.self_attn.q_proj", 4), 2.0);
        cfg.use_rslora = true;
        assert_eq!(cfg.scaling("model.layers.0.self_attn.q_proj", 4), 4.0);
        cfg.use_rslora = false;
        cfg.alpha_pattern.insert("q_proj".into(), 2.0);
        assert_eq!(cfg.scaling("model.layers.0.self_attn.q_proj", 4), 0.5);
    }
}
