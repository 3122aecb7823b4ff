//! `audiocap pretrain decoder` and `audiocap pretrain encoder`: the parts the
//! captioner keeps frozen, trained from scratch, with settings from an optional TOML
//! file.

use std::path::PathBuf;

use super::exit::Exit;
use super::init_logging;

#[derive(clap::Subcommand)]
pub enum PretrainCommand {
    /// A small Llama decoder and its byte-level BPE tokenizer trained as a language
    /// model on the captions of a table (Clotho, AudioCaps or generic layout), in the
    /// captioner's prompt. Writes OUT/{config.json, generation_config.json,
    /// model.safetensors, tokenizer.json, pretrain.json}.
    Decoder(PretrainDecoderArgs),
    /// A BEATs-architecture encoder trained from scratch as a multi-label tagger on a
    /// manifest with `file_name` and `labels` (`;`-separated) columns, as `audiocap
    /// corpus build` writes. Writes OUT/{encoder.safetensors, encoder.json (the BEATs
    /// cfg), labels.json, pretrain.json}.
    Encoder(PretrainEncoderArgs),
}

#[derive(clap::Args)]
pub struct PretrainEncoderArgs {
    /// Training manifest (CSV or Parquet with `file_name` and `labels`).
    #[arg(long)]
    manifest: PathBuf,
    /// Folder with the manifest's audio files.
    #[arg(long)]
    audio: PathBuf,
    /// Validation manifest and its audio folder, scored after every epoch.
    #[arg(long, requires = "validation_audio")]
    validation: Option<PathBuf>,
    #[arg(long)]
    validation_audio: Option<PathBuf>,
    /// Labels on fewer training clips than this are left out of the vocabulary.
    #[arg(long, default_value_t = 3)]
    min_clips_per_label: usize,
    /// Train no encoder: score the two baselines the encoder must beat (the label
    /// prior, a logistic-regression probe on fbank mean and standard deviation per
    /// mel bin) on the validation clips and write OUT/baselines.json (training
    /// writes them into pretrain.json too).
    #[arg(long, requires = "validation")]
    baselines_only: bool,
    #[command(flatten)]
    common: PretrainCommonArgs,
}

#[derive(clap::Args)]
pub struct PretrainDecoderArgs {
    /// Training captions (CSV or Parquet; every caption column is used, and the
    /// `labels` column with `audio_slot = "labels"`).
    #[arg(long)]
    captions: PathBuf,
    /// Validation captions, scored after every epoch.
    #[arg(long)]
    validation: Option<PathBuf>,
    #[command(flatten)]
    common: PretrainCommonArgs,
}

/// What both `pretrain` commands take.
#[derive(clap::Args)]
pub struct PretrainCommonArgs {
    /// Shape and training settings (TOML: the keys of pipelines/pretrain-*-default.toml);
    /// unset keys keep their defaults.
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Override a setting (`batch_size=16`), with or without --settings; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output directory (replaced when it exists).
    #[arg(long)]
    out: PathBuf,
    /// Print the settings with every default filled in; train nothing.
    #[arg(long)]
    check: bool,
}

pub fn run(command: PretrainCommand) -> anyhow::Result<Exit> {
    match command {
        PretrainCommand::Decoder(args) => decoder(args),
        PretrainCommand::Encoder(args) => encoder(args),
    }
}

/// Pre-training settings as `load` reads them, every problem printed. `Err(exit)`
/// ends the command: invalid for bad settings, done after `--check` printed them.
fn pretrain_settings<T: serde::Serialize>(
    load: impl FnOnce() -> Result<T, audiocap::config::ConfigErrors>,
    check: bool,
) -> Result<T, Exit> {
    let settings = match load() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(Exit::InvalidConfig);
        }
    };
    if check {
        println!("{}", toml::to_string(&settings).unwrap_or_default());
        return Err(Exit::Ok);
    }
    Ok(settings)
}

fn encoder(args: PretrainEncoderArgs) -> anyhow::Result<Exit> {
    use audiocap::train::tagger::{
        TaggerSettings, TaggingSet, label_vocabulary, load_tagging_set, pretrain_encoder,
    };
    let settings = match pretrain_settings(
        || TaggerSettings::load(args.common.settings.as_deref(), &args.common.set),
        args.common.check,
    ) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    init_logging(&Default::default());
    let labels = label_vocabulary(&args.manifest, args.min_clips_per_label)?;
    let train = load_tagging_set(&args.manifest, &args.audio, &labels, settings.max_seconds)?;
    let validation = match (&args.validation, &args.validation_audio) {
        (Some(m), Some(a)) => load_tagging_set(m, a, &labels, settings.max_seconds)?,
        _ => TaggingSet {
            clips: Vec::new(),
            skipped: Vec::new(),
        },
    };
    for (key, why) in train.skipped.iter().chain(&validation.skipped) {
        eprintln!("left out {key}: {why}");
    }
    if args.baselines_only {
        fn view(set: &TaggingSet) -> Vec<audiocap::train::probe::LabelledFbank<'_>> {
            set.clips
                .iter()
                .map(|c| (&c.fbank, c.labels.as_slice()))
                .collect()
        }
        let b = audiocap::train::probe::tagging_baselines(
            &view(&train),
            &view(&validation),
            labels.len(),
        )?;
        let out = &args.common.out;
        std::fs::create_dir_all(out)?;
        audiocap::train::pretrain::write_json(out, "baselines.json", &b)?;
        println!(
            "baselines on {} validation clips, {} labels: label prior mAP {:.3} (top-1 {:.1}%), \
             fbank probe mAP {:.3} (top-1 {:.1}%, l2 {})\n{}",
            b.validation_clips,
            labels.len(),
            b.label_prior.map,
            100.0 * b.label_prior.top1,
            b.fbank_probe.map,
            100.0 * b.fbank_probe.top1,
            b.fbank_probe.l2,
            out.join("baselines.json").display()
        );
        return Ok(Exit::Ok);
    }
    let summary = pretrain_encoder(
        &train,
        &validation,
        &labels,
        &settings,
        &args.common.out,
        &candle_core::Device::Cpu,
    )?;
    println!(
        "encoder: {} parameters, {} labels, {} steps over {} clips, loss {:.4} → {:.4}{}, {:.1} clips/s\n{}",
        summary.parameters,
        summary.labels.len(),
        summary.steps,
        summary.train_clips,
        summary.train_loss.first().copied().unwrap_or(f64::NAN),
        summary.train_loss.last().copied().unwrap_or(f64::NAN),
        match (
            summary.validation_top1.last(),
            summary.validation_map.last()
        ) {
            (Some(t), Some(m)) => format!(", validation top-1 {:.1}%, mAP {m:.3}", 100.0 * t),
            _ => String::new(),
        },
        summary.clips_per_second,
        summary.checkpoint.display()
    );
    if let (Some(best), Some(b)) = (&summary.best_validation, &summary.baselines) {
        println!(
            "written epoch {}: validation mAP {:.3} (top-1 {:.1}%); label prior mAP {:.3}, \
             fbank probe mAP {:.3} ({:.2}x the probe)",
            summary.best_epoch,
            best.map,
            100.0 * best.top1,
            b.label_prior.map,
            b.fbank_probe.map,
            best.map / b.fbank_probe.map.max(1e-12)
        );
    }
    Ok(Exit::Ok)
}

fn decoder(args: PretrainDecoderArgs) -> anyhow::Result<Exit> {
    use audiocap::train::lm::{LmSettings, pretrain_decoder, read_caption_texts};
    let settings = match pretrain_settings(
        || LmSettings::load(args.common.settings.as_deref(), &args.common.set),
        args.common.check,
    ) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let with_labels = settings.audio_slot == audiocap::train::lm::AudioSlot::Labels;
    let train = read_caption_texts(&args.captions, with_labels)?;
    let validation = match &args.validation {
        Some(p) => read_caption_texts(p, with_labels)?,
        None => Vec::new(),
    };
    init_logging(&Default::default());
    let summary = pretrain_decoder(
        &train,
        &validation,
        &settings,
        &args.common.out,
        &candle_core::Device::Cpu,
    )?;
    println!(
        "decoder: {} parameters, vocabulary {}, {} steps over {} captions, loss {:.3} → {:.3}{}, {:.0} tokens/s\n{}",
        summary.parameters,
        summary.vocab_size,
        summary.steps,
        summary.train_examples,
        summary.train_loss.first().copied().unwrap_or(f64::NAN),
        summary.train_loss.last().copied().unwrap_or(f64::NAN),
        summary
            .validation_loss
            .last()
            .map_or(String::new(), |v| format!(", validation {v:.3}")),
        summary.tokens_per_second,
        args.common.out.display()
    );
    Ok(Exit::Ok)
}
