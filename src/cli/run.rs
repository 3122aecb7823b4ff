//! `audiocap run`: a pipeline file (with `--set` overrides and the shard from the
//! flags or the scheduler's environment) run to its dataset, or checked with `--check`.

use std::path::PathBuf;

use audiocap::pipeline::{PipelineConfig, RunError, RunRequest, run_pipeline};

use super::exit::Exit;
use super::init_logging;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Pipeline file (TOML), e.g. pipelines/demo.toml.
    pipeline: PathBuf,
    /// Override one key for this run: --set batching.batch_size=32 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// This process's shard, 0-based (default: from JOB_COMPLETION_INDEX,
    /// AWS_BATCH_JOB_ARRAY_INDEX or SLURM_ARRAY_TASK_ID, else 0).
    #[arg(long)]
    shard_index: Option<u32>,
    /// Number of shards (default: from AWS_BATCH_JOB_ARRAY_SIZE or
    /// SLURM_ARRAY_TASK_COUNT, else 1).
    #[arg(long)]
    shard_count: Option<u32>,
    /// Run id recorded in every row and part name (default: time and process id).
    #[arg(long)]
    run_id: Option<String>,
    /// Caption again the inputs whose committed rows failed (run.retry_failed): each
    /// keeps only its newest rows. Finalize again afterwards.
    #[arg(long)]
    retry_failed: bool,
    /// Validate the pipeline and print it with every default filled in; run nothing.
    #[arg(long)]
    check: bool,
}

/// `audiocap run`: invalid configuration, fatal (printed here, as the run's error
/// kinds say which), or some inputs failed past `run.max_failed_fraction`; the
/// pipeline's own logging setup.
pub fn run(args: RunArgs) -> anyhow::Result<Exit> {
    let mut overrides = args.set.clone();
    if let Some(i) = args.shard_index {
        overrides.push(format!("run.shard_index={i}"));
    }
    if let Some(n) = args.shard_count {
        overrides.push(format!("run.shard_count={n}"));
    }
    if args.retry_failed {
        overrides.push("run.retry_failed=true".to_string());
    }
    let config = match PipelineConfig::load(&args.pipeline, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(Exit::InvalidConfig);
        }
    };
    if args.check {
        // The model is part of what a check can see before any work starts.
        let manifest =
            match audiocap::manifest::ModelManifest::read(std::path::Path::new(&config.model.path))
            {
                Ok(manifest) => manifest,
                Err(e) => {
                    eprintln!("error: {}: model.path: {e}", args.pipeline.display());
                    return Ok(Exit::InvalidConfig);
                }
            };
        // The tags and embedding asked for must be ones the model has.
        if let Err(problems) = config.output.clip_columns().resolve(&manifest, "output.") {
            let errors = audiocap::config::ConfigErrors {
                file: args.pipeline.display().to_string(),
                problems,
            };
            eprintln!("error: {errors}");
            return Ok(Exit::InvalidConfig);
        }
        println!("{}", config.to_toml());
        eprintln!("{}: valid", args.pipeline.display());
        return Ok(Exit::Ok);
    }
    init_logging(&config.logging);
    let threshold = config.run.max_failed_fraction;
    let request = RunRequest {
        pipeline_file: args.pipeline.display().to_string(),
        run_id: args.run_id,
    };
    match run_pipeline(config, request) {
        Ok(summary) => {
            println!("{}", summary.render());
            let fraction = summary.failed_fraction();
            let (failed, written) = summary.failed_of_written();
            let of = if summary.shard.is_some() {
                "the shard's"
            } else {
                "this run's"
            };
            if failed > 0 && fraction > threshold {
                eprintln!(
                    "{failed} of {of} {written} inputs failed ({:.2}% > run.max_failed_fraction {:.2}%): exit code {}",
                    fraction * 100.0,
                    threshold * 100.0,
                    Exit::SomeInputsFailed.code()
                );
                Ok(Exit::SomeInputsFailed)
            } else {
                Ok(Exit::Ok)
            }
        }
        Err(RunError::Config(e)) => {
            eprintln!("error: invalid configuration: {e:#}");
            Ok(Exit::InvalidConfig)
        }
        Err(RunError::Fatal(e)) => {
            eprintln!("error: {e:#}");
            Ok(Exit::Fatal)
        }
    }
}
