//! Training throughput of `audiocap train` on the CPU: optimiser steps per second and
//! decoder tokens per second (prompt + audio embedding + caption positions; padding
//! excluded), for the recipe's step (LoRA r=16 on q and k, the projector, AdamW,
//! gradient clipping) on random 10-second-clip BEATs features (496 patches × 768) and
//! ~20-token captions.
//!
//! `cargo bench --bench training` (add `-- --steps N`, default 8, after 2 warm-up
//! steps). Cases: the `e2e-tiny` fixture decoder (hidden 64, 2 layers) and a synthetic
//! Llama-3-shaped decoder (hidden 512, 4 layers, full 128k vocabulary; random weights
//! written to a temporary folder). Frozen encoder features come from the cache in real
//! runs, so BEATs is not part of a step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use audiocap::bench::synthetic::{LlamaFiles, LlamaSpec, SourceDtype, write_llama_dir};
use audiocap::model::init::{SplitMix64, uniform};
use audiocap::model::llama::LlamaConfig;
use audiocap::model::prompt::DEFAULT_PROMPT_TEMPLATE;
use audiocap::train::model::{
    Example, InitFrom, LoraSettings, TrainableCaptioner, TrainableParams,
};
use audiocap::train::optim::{AdamW, AdamWSettings};
use audiocap::train::run::train_step;
use candle_core::{DType, Device};

const BATCH: usize = 8;
const PATCHES: usize = 496;
const ENCODER_DIM: usize = 768;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn examples(rng: &mut SplitMix64) -> Vec<Example> {
    (0..BATCH)
        .map(|_| Example {
            features: uniform(&[PATCHES, ENCODER_DIM], 1.0, rng, &Device::Cpu).unwrap(),
            caption: (0..16 + rng.below(9))
                .map(|_| 1000 + rng.below(100_000) as u32)
                .collect(),
        })
        .collect()
}

fn bench(name: &str, llm: &Path, steps: usize) {
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
        &Device::Cpu,
    )
    .unwrap();
    let model = TrainableCaptioner::new(
        llm,
        &params,
        DEFAULT_PROMPT_TEMPLATE,
        lora.dropout,
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut optimizer = AdamW::new(params.trainable(true), AdamWSettings::default()).unwrap();
    let trainable: usize = optimizer.params().iter().map(|(_, v)| v.elem_count()).sum();
    let mut rng = SplitMix64::new(5);
    let batches: Vec<Vec<Example>> = (0..steps + 2).map(|_| examples(&mut rng)).collect();
    for warm in &batches[..2] {
        train_step(&model, &mut optimizer, warm, BATCH, 1.0, 1e-4).unwrap();
    }
    let started = Instant::now();
    let (mut positions, mut tokens) = (0usize, 0usize);
    for batch in &batches[2..] {
        let outcome = train_step(&model, &mut optimizer, batch, BATCH, 1.0, 1e-4).unwrap();
        positions += outcome.positions;
        tokens += outcome.tokens;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{name:<34} {trainable:>10} trainable  {:>7.3} steps/s  {:>8.0} tokens/s  {:>7.0} caption tokens/s",
        steps as f64 / seconds,
        positions as f64 / seconds,
        tokens as f64 / seconds
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    println!(
        "training step, batch {BATCH}, {PATCHES}x{ENCODER_DIM} features, LoRA r=16 on q,k + projector, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    bench(
        "e2e-tiny (hidden 64, 2 layers)",
        &fixtures().join("e2e-tiny/llm"),
        steps,
    );
    let dir = tempfile::tempdir().unwrap();
    let synthetic = dir.path().join("llama-512x4");
    write_llama_dir(
        &synthetic,
        &LlamaSpec::reduced(512, 4),
        &LlamaFiles {
            dtype: SourceDtype::F32,
            ..LlamaFiles::default()
        },
        &fixtures().join("e2e-tiny/llm/tokenizer.json"),
        3,
    )
    .unwrap();
    bench("synthetic (hidden 512, 4 layers)", &synthetic, steps);
}
