//! `audiocap eval`: the flags of [`EvalOptions`]; the report goes to stdout.

use std::path::PathBuf;

use audiocap::eval::command::{EvalOptions, run_eval};
use audiocap::eval::fense::FensePaths;

use super::exit::Exit;

/// Arguments of `audiocap eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Predictions: an audiocap captions Parquet file (`uri`, `segment_index`,
    /// `caption`, `error`) or a CSV with columns `file_name, caption`.
    #[arg(long)]
    pred: PathBuf,
    /// References: Clotho CSV (`file_name, caption_1..caption_5`), AudioCaps CSV
    /// (`audiocap_id, youtube_id, start_time, caption`), or a CSV/Parquet with a key
    /// column (`file_name`, `uri` or --key-column) and columns named `caption*`.
    #[arg(long)]
    refs: PathBuf,
    /// Write the scores, counts and inputs as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write per-clip scores as Parquet here.
    #[arg(long = "per-clip")]
    per_clip: Option<PathBuf>,
    /// Key column of a generic reference table (default: `file_name`, then `uri`).
    #[arg(long = "key-column")]
    key_column: Option<String>,
    /// Java for METEOR and SPICE (default: `$JAVA_HOME/bin/java`, then `java` on PATH).
    #[arg(long)]
    java: Option<PathBuf>,
    /// METEOR 1.5 jar, with `data/paraphrase-en.gz` beside it (default:
    /// `$AUDIOCAP_METEOR_JAR`, then the jar of the installed `pycocoevalcap` package).
    #[arg(long = "meteor-jar")]
    meteor_jar: Option<PathBuf>,
    /// SPICE jar (default: `$AUDIOCAP_SPICE_JAR`, then pycocoevalcap's `spice-1.0.jar`).
    #[arg(long = "spice-jar")]
    spice_jar: Option<PathBuf>,
    /// Folder with `stanford-corenlp-3.6.0.jar` and `stanford-corenlp-3.6.0-models.jar`
    /// for SPICE (default: `$AUDIOCAP_CORENLP_DIR`, then the SPICE jar's `lib/`).
    #[arg(long = "corenlp-dir")]
    corenlp_dir: Option<PathBuf>,
    /// Skip METEOR and SPICE (no JVM is started).
    #[arg(long = "no-java-metrics")]
    no_java_metrics: bool,
    /// FENSE, SBERT-sim, FER (and with SPICE, SPIDEr-FL): a folder with `sbert/` (the
    /// Hugging Face repository sentence-transformers/paraphrase-TinyBERT-L6-v2),
    /// `echecker_clotho_audiocaps_base.ckpt` (the fense project's release) and
    /// `bert-base-uncased/` (its config.json and vocab.txt or tokenizer.json). Nothing
    /// is downloaded.
    #[arg(long = "fense-models", value_name = "DIR")]
    fense_models: Option<PathBuf>,
    /// The Sentence-BERT folder (default: `<fense-models>/sbert`).
    #[arg(long, value_name = "DIR")]
    sbert: Option<PathBuf>,
    /// The fluency-error detector checkpoint (default:
    /// `<fense-models>/echecker_clotho_audiocaps_base.ckpt`).
    #[arg(long = "fluency-detector", value_name = "FILE")]
    fluency_detector: Option<PathBuf>,
    /// The detector's base model folder, config.json + tokenizer files (default: the
    /// folder named after the checkpoint's model_type in `--fense-models`, else beside
    /// the checkpoint).
    #[arg(long = "fluency-detector-base", value_name = "DIR")]
    fluency_detector_base: Option<PathBuf>,
    /// Also score the best single constant caption: every caption of this table
    /// (e.g. the training set's) given to every clip, the one with the highest CIDEr-D
    /// reported (the bar a captioner must clear).
    #[arg(long = "constant-baseline", value_name = "CAPTIONS")]
    constant_baseline: Option<PathBuf>,
    /// Column of the references with each clip's class labels (`;`-separated, as
    /// `audiocap corpus build` writes `labels`): report the share of predictions that
    /// name one of their clip's labels.
    #[arg(long = "labels-column")]
    labels_column: Option<String>,
    /// Score only the clips with a caption. By default every reference clip is
    /// scored, one without a prediction or whose prediction failed as an empty
    /// caption (score 0); the report counts them either way.
    #[arg(long = "skip-missing")]
    skip_missing: bool,
}

impl From<EvalArgs> for EvalOptions {
    fn from(args: EvalArgs) -> Self {
        EvalOptions {
            pred: args.pred,
            refs: args.refs,
            out: args.out,
            per_clip: args.per_clip,
            key_column: args.key_column,
            java: args.java,
            meteor_jar: args.meteor_jar,
            spice_jar: args.spice_jar,
            corenlp_dir: args.corenlp_dir,
            no_java_metrics: args.no_java_metrics,
            fense: FensePaths {
                models: args.fense_models,
                sbert: args.sbert,
                detector: args.fluency_detector,
                detector_base: args.fluency_detector_base,
            },
            constant_baseline: args.constant_baseline,
            labels_column: args.labels_column,
            skip_missing: args.skip_missing,
        }
    }
}

/// `audiocap eval`: scores, writes `--out` and `--per-clip`, prints the report.
pub fn run(args: EvalArgs) -> anyhow::Result<Exit> {
    let outcome = run_eval(&args.into())?;
    print!("{}", outcome.report());
    Ok(Exit::Ok)
}
