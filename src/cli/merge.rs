//! `audiocap merge`: PEFT LoRA adapters merged by concatenation into one adapter
//! directory.

use std::path::PathBuf;

use anyhow::Context;

use super::exit::Exit;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors);
    /// repeat for each adapter.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Comma-separated weights, one per adapter (default 1/K each).
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// Output adapter directory.
    #[arg(long)]
    out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: MergeArgs) -> anyhow::Result<Exit> {
    use audiocap::model::lora::PeftAdapter;
    let k = args.adapters.len();
    let weights = args.weights.unwrap_or_else(|| vec![1.0 / k as f64; k]);
    if weights.len() != k {
        eprintln!(
            "error: {} --weights for {k} --adapter directories",
            weights.len()
        );
        return Ok(Exit::InvalidConfig);
    }
    if args.out.exists() && !args.overwrite {
        eprintln!(
            "error: {} exists (pass --overwrite to replace it)",
            args.out.display()
        );
        return Ok(Exit::InvalidConfig);
    }
    let adapters = args
        .adapters
        .iter()
        .map(|dir| PeftAdapter::load(dir).with_context(|| format!("loading {}", dir.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merged = PeftAdapter::cat(&adapters, &weights).context("merging the adapters")?;
    // Written beside the target and renamed, so a reader never sees half an adapter.
    let staging = audiocap::atomic::Staging::new(&args.out);
    merged
        .save(staging.path())
        .with_context(|| format!("writing {}", staging.path().display()))?;
    staging
        .commit_dir()
        .with_context(|| format!("moving the adapter into {}", args.out.display()))?;
    println!(
        "merged {k} adapters (weights {weights:?}) into {}: rank {}",
        args.out.display(),
        merged.config.r
    );
    Ok(Exit::Ok)
}
