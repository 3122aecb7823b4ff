//! `audiocap train`: the projector and LoRA adapters trained from a training file,
//! or the file checked with `--check`.

use std::path::PathBuf;

use super::exit::Exit;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training file (TOML), e.g. pipelines/train-recipe.toml.
    config: PathBuf,
    /// Override one key: --set training.batch_size=4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in model.output from its checkpoints.
    #[arg(long)]
    resume: bool,
    /// End after this many optimiser steps with a checkpoint (exit 0, nothing
    /// final written); `--resume` continues. For jobs with a time limit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    stop_after_steps: Option<u64>,
    /// Validate the file and print it with every default filled in; train nothing.
    #[arg(long)]
    check: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<Exit> {
    use audiocap::train::config::TrainConfig;
    use audiocap::train::run::{TrainOptions, TrainOutcome, train};
    use std::io::IsTerminal;
    let config = match TrainConfig::load(&args.config, &args.set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(Exit::InvalidConfig);
        }
    };
    if args.check {
        println!("{}", config.to_toml());
        eprintln!("{}: valid", args.config.display());
        return Ok(Exit::Ok);
    }
    let options = TrainOptions {
        resume: args.resume,
        progress_bar: std::io::stderr().is_terminal(),
        stop_after_steps: args.stop_after_steps,
    };
    let summary = match train(&config, &options)? {
        TrainOutcome::Finished(summary) => summary,
        TrainOutcome::Stopped(at) => {
            println!(
                "stopped after {} steps: stage {} seed {} at step {} of {}, checkpoint written; \
                 the same command with --resume continues",
                at.steps_this_session, at.stage, at.seed, at.steps, at.total_steps
            );
            return Ok(Exit::Ok);
        }
    };
    for run in &summary.runs {
        println!(
            "stage {} seed {}: {} steps, loss {} → {}{}, {:.0} tokens/s",
            run.stage,
            run.seed,
            run.steps,
            run.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
            run.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            run.best.as_ref().map_or(String::new(), |b| format!(
                ", best epoch {} (validation loss {:.4}, CIDEr-D {})",
                b.epoch,
                b.loss,
                b.cider_d.map_or("-".into(), |c| format!("{c:.3}"))
            )),
            run.tokens_per_second
        );
    }
    if !summary.skipped.is_empty() {
        println!("{} clips left out (listed above)", summary.skipped.len());
    }
    println!(
        "model: {} + {}\nexport it with: audiocap export --beats {} --llm {} --projector {} --adapter {} --out DIR",
        summary.projector.display(),
        summary.adapter.display(),
        config.model.beats,
        config.model.llm,
        summary.projector.display(),
        summary.adapter.display()
    );
    Ok(Exit::Ok)
}
