//! Training throughput of `audiocap train` on the CPU: optimiser steps per second and
//! decoder tokens per second (prompt + audio embedding + caption positions; padding
//! excluded), for the recipe's step (LoRA r=16 on q and k, the projector, AdamW,
//! gradient clipping) on random 10-second-clip BEATs features (496 patches × 768) and
//! ~20-token captions.
//!
//! `cargo bench --bench training` (add `-- --steps N`, default 8, after 2 warm-up
//! steps). Cases (`--case`, default `fixture,small`): `fixture`, the `e2e-tiny` fixture
//! decoder (hidden 64, 2 layers); `small`, a synthetic Llama-3-shaped decoder (hidden
//! 512, 4 layers, full 128k vocabulary); `llama3-8b`, the real recipe's decoder shape
//! (random weights, ~16 GB in bf16: a GPU case). Synthetic weights are written to
//! `--dir` (default: a temporary folder) and reused when already there.
//!
//! On a GPU (`cargo bench --features cuda --bench training -- --device cuda --dtype
//! bf16 --case llama3-8b`) the frozen weights are held in `--dtype` and the trainable
//! projector and LoRA in f32, as `audiocap train` does. Frozen encoder features come
//! from the cache in real runs, so BEATs is not part of a step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use audiocap::config::DeviceSpec;
use audiocap::model::init::uniform;
use audiocap::model::llama::LlamaConfig;
use audiocap::model::prompt::DEFAULT_PROMPT_TEMPLATE;
use audiocap::model::synthetic::{LlamaFiles, LlamaSpec, SourceDtype, write_llama_dir};
use audiocap::rng::SplitMix64;
use audiocap::train::model::{
    Example, InitFrom, LoraSettings, TrainableCaptioner, TrainableParams,
};
use audiocap::train::optim::{AdamW, AdamWSettings};
use audiocap::train::run::train_step;
use candle_core::{DType, Device};

const PATCHES: usize = 496;
const ENCODER_DIM: usize = 768;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// What the command line asks for.
struct Options {
    steps: usize,
    batch: usize,
    device: Device,
    dtype: DType,
    cases: Vec<String>,
    dir: Option<PathBuf>,
}

impl Options {
    fn parse() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let device = match value("--device").as_deref().unwrap_or("cpu").parse() {
            Ok(DeviceSpec::Cpu) => Device::Cpu,
            Ok(DeviceSpec::Cuda(ordinal)) => Device::new_cuda(ordinal)
                .expect("CUDA device (build the bench with --features cuda)"),
            Err(e) => panic!("--device: {e}"),
        };
        let dtype = match value("--dtype").as_deref() {
            None | Some("f32") => DType::F32,
            Some("bf16") => DType::BF16,
            Some("f16") => DType::F16,
            Some(other) => panic!("--dtype {other}: expected f32, bf16 or f16"),
        };
        Self {
            steps: value("--steps").and_then(|s| s.parse().ok()).unwrap_or(8),
            batch: value("--batch").and_then(|s| s.parse().ok()).unwrap_or(8),
            device,
            dtype,
            cases: value("--case")
                .unwrap_or_else(|| "fixture,small".into())
                .split(',')
                .map(str::to_string)
                .collect(),
            dir: value("--dir").map(PathBuf::from),
        }
    }
}

fn examples(rng: &mut SplitMix64, batch: usize) -> Vec<Example> {
    (0..batch)
        .map(|_| Example {
            features: uniform(&[PATCHES, ENCODER_DIM], 1.0, rng, &Device::Cpu).unwrap(),
            caption: (0..16 + rng.below(9))
                .map(|_| 1000 + rng.below(100_000) as u32)
                .collect(),
        })
        .collect()
}

fn bench(name: &str, llm: &Path, options: &Options) {
    let (steps, batch, device, dtype) =
        (options.steps, options.batch, &options.device, options.dtype);
    let config = LlamaConfig::from_file(&llm.join("config.json")).unwrap();
    let lora = LoraSettings {
        r: 16,
        alpha: 32.0,
        dropout: 0.05,
        target_modules: vec!["q_proj".into(), "k_proj".into()],
    };
    let params = TrainableParams::init(
        &config,
        ENCODER_DIM,
        0,
        &lora,
        &InitFrom::default(),
        1,
        DType::F32,
        device,
    )
    .unwrap();
    let loading = Instant::now();
    let model = TrainableCaptioner::new(
        llm,
        &params,
        DEFAULT_PROMPT_TEMPLATE,
        lora.dropout,
        1,
        dtype,
        device,
    )
    .unwrap();
    let load_seconds = loading.elapsed().as_secs_f64();
    let mut optimizer = AdamW::new(params.trainable(true), AdamWSettings::default()).unwrap();
    let trainable: usize = optimizer.params().iter().map(|(_, v)| v.elem_count()).sum();
    let mut rng = SplitMix64::new(5);
    let batches: Vec<Vec<Example>> = (0..steps + 2).map(|_| examples(&mut rng, batch)).collect();
    for warm in &batches[..2] {
        train_step(&model, &mut optimizer, warm, batch, 1.0, 1e-4).unwrap();
    }
    let started = Instant::now();
    let (mut positions, mut tokens) = (0usize, 0usize);
    for examples in &batches[2..] {
        let outcome = train_step(&model, &mut optimizer, examples, batch, 1.0, 1e-4).unwrap();
        positions += outcome.positions;
        tokens += outcome.tokens;
    }
    device.synchronize().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{name:<34} {trainable:>10} trainable  {:>7.3} steps/s  {:>8.0} tokens/s  {:>7.0} caption tokens/s  (loaded in {load_seconds:.1} s)",
        steps as f64 / seconds,
        positions as f64 / seconds,
        tokens as f64 / seconds
    );
}

/// Writes (or reuses) a synthetic decoder in `dir`.
fn synthetic(dir: &Path, spec: &LlamaSpec, dtype: SourceDtype) -> PathBuf {
    if !dir.join("config.json").is_file() {
        write_llama_dir(
            dir,
            spec,
            &LlamaFiles {
                dtype,
                ..LlamaFiles::default()
            },
            &fixtures().join("e2e-tiny/llm/tokenizer.json"),
            3,
        )
        .unwrap();
    }
    dir.to_path_buf()
}

fn main() {
    let options = Options::parse();
    println!(
        "training step, batch {}, {PATCHES}x{ENCODER_DIM} features, LoRA r=16 on q,k + projector, device {:?}, frozen weights {:?}, {} threads",
        options.batch,
        options.device,
        options.dtype,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let temporary = tempfile::tempdir().unwrap();
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    for case in &options.cases {
        match case.as_str() {
            "fixture" => bench(
                "e2e-tiny (hidden 64, 2 layers)",
                &fixtures().join("e2e-tiny/llm"),
                &options,
            ),
            "small" => bench(
                "synthetic (hidden 512, 4 layers)",
                &synthetic(
                    &dir.join("llama-512x4"),
                    &LlamaSpec::reduced(512, 4),
                    SourceDtype::F32,
                ),
                &options,
            ),
            "llama3-8b" => bench(
                "synthetic Llama-3-8B shape",
                &synthetic(
                    &dir.join("llama3-8b"),
                    &LlamaSpec::llama3_8b(),
                    SourceDtype::Bf16,
                ),
                &options,
            ),
            other => panic!("--case {other}: expected fixture, small or llama3-8b"),
        }
    }
}
