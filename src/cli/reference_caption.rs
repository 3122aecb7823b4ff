//! `audiocap reference-caption`: audio files captioned with the candle reference
//! implementation straight from the checkpoints, one JSON object per file.

use std::path::PathBuf;

use anyhow::Context;
use audiocap::caption::Captioner;
use candle_core::Device;

use super::exit::Exit;
use super::export::CheckpointArgs;

#[derive(clap::Args)]
pub struct ReferenceCaptionArgs {
    #[command(flatten)]
    model: CheckpointArgs,
    /// Maximum number of generated tokens per caption.
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    /// Audio files to caption.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(args: ReferenceCaptionArgs) -> anyhow::Result<Exit> {
    let sources = args.model.into_sources()?;
    let captioner = Captioner::load(&sources, &Device::Cpu).context("loading the model")?;
    let mut failed = 0usize;
    for input in &args.inputs {
        let row = match captioner.caption_file(input, args.max_new_tokens) {
            Ok(caption) => serde_json::json!({
                "uri": input.display().to_string(),
                "caption": caption.text,
                "score": caption.score,
                "token_ids": caption.token_ids,
                "error": null,
            }),
            Err(err) => {
                failed += 1;
                serde_json::json!({
                    "uri": input.display().to_string(),
                    "caption": null,
                    "score": null,
                    "error": format!("{err:#}"),
                })
            }
        };
        println!("{row}");
    }
    Ok(if failed > 0 {
        Exit::SomeInputsFailed
    } else {
        Exit::Ok
    })
}
