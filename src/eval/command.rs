//! `audiocap eval`: read predictions and references, join them by file name, score
//! the matched pairs, and write the report.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::json;

use super::baselines::{self, ConstantBaseline};
use super::fense::{FenseModels, FensePaths, FenseScores};
use super::files::{self, Layout, Pair, Predictions};
use super::jvm::{Environment, JavaPaths, Unavailable};
use super::{CorpusScores, JavaScores, report, score_corpus, score_java_metrics};

/// How many unmatched keys the report lists.
const SAMPLE: usize = 10;

/// What `audiocap eval` reads, scores and writes.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Predictions: an audiocap captions Parquet file (`uri`, `segment_index`,
    /// `caption`, `error`) or a CSV with columns `file_name, caption`.
    pub pred: PathBuf,
    /// References: Clotho CSV (`file_name, caption_1..caption_5`), AudioCaps CSV
    /// (`audiocap_id, youtube_id, start_time, caption`), or a CSV/Parquet with a key
    /// column (`file_name`, `uri` or --key-column) and columns named `caption*`.
    pub refs: PathBuf,
    /// Write the scores, counts and inputs as JSON here.
    pub out: Option<PathBuf>,
    /// Write per-clip scores as Parquet here.
    pub per_clip: Option<PathBuf>,
    /// Key column of a generic reference table (default: `file_name`, then `uri`).
    pub key_column: Option<String>,
    /// Java for METEOR and SPICE (default: `$JAVA_HOME/bin/java`, then `java` on PATH).
    pub java: Option<PathBuf>,
    /// METEOR 1.5 jar, with `data/paraphrase-en.gz` beside it (default:
    /// `$AUDIOCAP_METEOR_JAR`, then the jar of the installed `pycocoevalcap` package).
    pub meteor_jar: Option<PathBuf>,
    /// SPICE jar (default: `$AUDIOCAP_SPICE_JAR`, then pycocoevalcap's `spice-1.0.jar`).
    pub spice_jar: Option<PathBuf>,
    /// Folder with `stanford-corenlp-3.6.0.jar` and `stanford-corenlp-3.6.0-models.jar`
    /// for SPICE (default: `$AUDIOCAP_CORENLP_DIR`, then the SPICE jar's `lib/`).
    pub corenlp_dir: Option<PathBuf>,
    /// Skip METEOR and SPICE (no JVM is started).
    pub no_java_metrics: bool,
    /// The FENSE models (`--fense-models DIR` and the per-part overrides); FENSE,
    /// SBERT-sim, FER and SPIDEr-FL are unavailable without them.
    pub fense: FensePaths,
    /// Also score the best single constant caption: every caption of this table
    /// (e.g. the training set's) given to every clip, the one with the highest CIDEr-D
    /// reported (the bar a captioner must clear).
    pub constant_baseline: Option<PathBuf>,
    /// Column of the references with each clip's class labels (`;`-separated, as
    /// `audiocap corpus build` writes `labels`): report the share of predictions that
    /// name one of their clip's labels.
    pub labels_column: Option<String>,
    /// Score only the matched pairs. By default every reference clip is scored: one
    /// without a prediction, or whose prediction failed, counts as an empty caption
    /// (score 0).
    pub skip_missing: bool,
}

impl EvalOptions {
    /// The Java tool locations given.
    pub fn java_paths(&self) -> JavaPaths {
        JavaPaths {
            java: self.java.clone(),
            meteor_jar: self.meteor_jar.clone(),
            spice_jar: self.spice_jar.clone(),
            corenlp_dir: self.corenlp_dir.clone(),
        }
    }
}

/// Counts of the join.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EvalCounts {
    /// Prediction keys read (captions and failures).
    pub predictions: usize,
    /// Predictions with an error or without a caption (skipped).
    pub failed_predictions: usize,
    /// Reference clips read (with at least one caption).
    pub references: usize,
    /// Pairs scored.
    pub matched: usize,
    pub predictions_without_references: usize,
    pub references_without_predictions: usize,
    /// Predictions whose reference clip another prediction had already matched.
    pub duplicate_matches: usize,
    /// Prediction rows whose file name repeated another URI's (ignored).
    pub duplicate_predictions: usize,
    /// URIs with several segments (segment 0 used).
    pub multi_segment_uris: usize,
    /// Reference clips with no non-empty caption (ignored).
    pub references_without_captions: usize,
    /// Reference clips without a caption to score: no prediction, or a failed one.
    pub missing_predictions: usize,
    /// Of those, the clips scored as an empty caption (all of them unless
    /// --skip-missing, then none).
    pub scored_as_empty: usize,
}

/// What `audiocap eval` found and computed.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    pub scores: CorpusScores,
    /// METEOR, SPICE (and through SPICE, SPIDEr), or why they are unavailable.
    pub java: JavaScores,
    /// FENSE, SBERT-sim and the fluency errors, or why they are unavailable.
    pub fense: Result<FenseScores, Unavailable>,
    pub layout: Layout,
    pub prediction_format: String,
    pub counts: EvalCounts,
    /// The scored pairs; `scores.per_clip[i]` belongs to `pairs[i]`.
    pub pairs: Vec<Pair>,
    pub predictions_without_references: Vec<String>,
    pub references_without_predictions: Vec<String>,
    /// (key, reason) of the skipped predictions.
    pub failed_predictions: Vec<(String, String)>,
    /// Lines for the user about how the inputs were read.
    pub notes: Vec<String>,
    /// The best constant caption (with --constant-baseline).
    pub constant_baseline: Option<ConstantBaseline>,
    /// Share of scored predictions naming one of their clip's labels, and the
    /// number of predictions with labels (with --labels-column).
    pub class_word_rate: Option<(f64, usize)>,
    /// The content of `metrics.json`.
    pub metrics: serde_json::Value,
}

impl EvalOutcome {
    /// Every score, for the report's tables and files.
    pub fn all_scores(&self) -> report::AllScores<'_> {
        report::AllScores {
            native: &self.scores,
            java: &self.java,
            fense: &self.fense,
        }
    }

    /// The report for the terminal: how the inputs were read, the join, the scores.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for note in &self.notes {
            out.push_str(note);
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&report::table(self.all_scores()));
        if let Some(b) = &self.constant_baseline {
            out.push_str(&format!(
                "\nbest constant caption of {} tried: \"{}\" (CIDEr-D {:.4}, BLEU-4 {:.4}, ROUGE-L {:.4}); \
                 the predictions' CIDEr-D is {:.2}x it\n",
                b.tried,
                b.caption,
                b.cider_d,
                b.bleu_4,
                b.rouge_l,
                self.scores.cider_d / b.cider_d.max(f64::MIN_POSITIVE)
            ));
        }
        if let Some((rate, n)) = self.class_word_rate {
            out.push_str(&format!(
                "class word named: {:.1}% of {n} labelled predictions\n",
                100.0 * rate
            ));
        }
        out
    }
}

/// Runs the evaluation and writes `--out` and `--per-clip` when given. The caller
/// prints [`EvalOutcome::report`].
pub fn run_eval(args: &EvalOptions) -> anyhow::Result<EvalOutcome> {
    let predictions = files::read_predictions(&args.pred)
        .with_context(|| format!("reading predictions {}", args.pred.display()))?;
    let references = files::read_references(&args.refs, args.key_column.as_deref())
        .with_context(|| format!("reading references {}", args.refs.display()))?;
    let mut joined = files::join(&predictions, &references);
    let missing = joined.unmatched_references.len();

    let counts = EvalCounts {
        predictions: predictions.captions.len() + predictions.failed.len(),
        failed_predictions: predictions.failed.len(),
        references: references.clips.len(),
        matched: joined.pairs.len(),
        predictions_without_references: joined.predictions_without_references.len(),
        references_without_predictions: joined.references_without_predictions.len(),
        duplicate_matches: joined.duplicate_matches.len(),
        duplicate_predictions: predictions.duplicates.len(),
        multi_segment_uris: predictions.multi_segment,
        references_without_captions: references.empty.len(),
        missing_predictions: missing,
        scored_as_empty: if args.skip_missing { 0 } else { missing },
    };
    let notes = notes(&predictions, &references.layout, &counts, &joined);

    if joined.pairs.is_empty() {
        bail!(
            "no prediction matched a reference: {} predictions (e.g. {}) and {} reference clips \
             (e.g. {}), layout {}. Keys are compared by file name and by file stem; for a \
             generic table pick the key with --key-column",
            predictions.captions.len(),
            sample(&joined.predictions_without_references, 3),
            references.clips.len(),
            sample(
                &references
                    .clips
                    .iter()
                    .map(|c| c.key.clone())
                    .collect::<Vec<_>>(),
                3
            ),
            references.layout,
        );
    }

    // Every reference clip is scored: a missing or failed prediction is an empty
    // caption, which every metric scores 0.
    if !args.skip_missing {
        for &i in &joined.unmatched_references {
            let clip = &references.clips[i];
            joined.pairs.push(Pair {
                key: clip.key.clone(),
                reference_key: clip.key.clone(),
                candidate: String::new(),
                references: clip.captions.clone(),
            });
        }
    }
    let candidates: Vec<String> = joined.pairs.iter().map(|p| p.candidate.clone()).collect();
    let refs: Vec<Vec<String>> = joined.pairs.iter().map(|p| p.references.clone()).collect();
    let scores = score_corpus(&candidates, &refs).context("scoring the matched pairs")?;

    let java = if args.no_java_metrics {
        JavaScores::unavailable("skipped (--no-java-metrics)")
    } else {
        score_java_metrics(
            &args.java_paths(),
            &Environment::process(),
            &candidates,
            &refs,
        )
    };

    let fense = score_fense(&args.fense, &candidates, &refs);
    let all = report::AllScores {
        native: &scores,
        java: &java,
        fense: &fense,
    };

    let constant_baseline = match &args.constant_baseline {
        Some(path) => {
            let pool = files::read_references(path, None).with_context(|| {
                format!("reading constant-caption candidates {}", path.display())
            })?;
            let pool: Vec<String> = pool.clips.into_iter().flat_map(|c| c.captions).collect();
            baselines::best_constant_caption(&pool, &refs).context("scoring constant captions")?
        }
        None => None,
    };
    let class_word_rate = match &args.labels_column {
        Some(column) => Some(class_word_rate(&args.refs, column, &joined.pairs)?),
        None => None,
    };

    let mut metric_values = serde_json::Map::new();
    let mut unavailable = serde_json::Map::new();
    for row in report::score_rows(all) {
        match row.value {
            Ok(v) => metric_values.insert(row.key.to_string(), json!(v)),
            Err(why) => unavailable.insert(row.key.to_string(), json!(why.0)),
        };
    }
    let path_text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let first = |v: &[String]| v.iter().take(SAMPLE).cloned().collect::<Vec<_>>();
    let metrics = json!({
        "scores": metric_values,
        "unavailable": unavailable,
        "counts": counts,
        "layout": references.layout.to_string(),
        "prediction_format": predictions.format,
        "inputs": {
            "pred": args.pred.display().to_string(),
            "refs": args.refs.display().to_string(),
            "key_column": args.key_column,
            "fense_models": path_text(&args.fense.models),
            "sbert": path_text(&args.fense.sbert),
            "fluency_detector": path_text(&args.fense.detector),
            "fluency_detector_base": path_text(&args.fense.detector_base),
        },
        "unmatched": {
            "predictions_without_references": first(&joined.predictions_without_references),
            "references_without_predictions": first(&joined.references_without_predictions),
            "duplicate_matches": first(&joined.duplicate_matches),
            "failed_predictions": predictions.failed.iter().take(SAMPLE)
                .map(|(k, r)| json!({"key": k, "reason": r})).collect::<Vec<_>>(),
        },
        "notes": notes,
        "baselines": {
            "best_constant_caption": constant_baseline,
            "class_word_rate": class_word_rate.map(|(rate, n)| json!({"rate": rate, "labelled_predictions": n})),
        },
    });

    if let Some(path) = &args.out {
        report::write_json(path, &metrics)
            .with_context(|| format!("writing metrics {}", path.display()))?;
    }
    if let Some(path) = &args.per_clip {
        report::write_per_clip(path, &joined.pairs, all)
            .with_context(|| format!("writing per-clip scores {}", path.display()))?;
    }

    Ok(EvalOutcome {
        scores,
        java,
        fense,
        layout: references.layout,
        prediction_format: predictions.format,
        counts,
        pairs: joined.pairs,
        predictions_without_references: joined.predictions_without_references,
        references_without_predictions: joined.references_without_predictions,
        failed_predictions: predictions.failed,
        notes,
        constant_baseline,
        class_word_rate,
        metrics,
    })
}

/// FENSE of the pairs where its models are given; otherwise, or when they cannot be
/// loaded or run, the reason (never an error: the other metrics stand).
fn score_fense(
    paths: &FensePaths,
    candidates: &[String],
    references: &[Vec<String>],
) -> Result<FenseScores, Unavailable> {
    let models = FenseModels::load(paths).map_err(|e| e.unavailable())?;
    tracing::info!(
        sbert = %models.sbert.dir().display(),
        detector = %models.detector.source().display(),
        "scoring FENSE"
    );
    models
        .score(candidates, references)
        .map_err(|e| e.unavailable())
}

/// Share of `pairs` whose prediction names one of its reference clip's labels
/// (column `column` of the references, `;`-separated), over the pairs with labels.
fn class_word_rate(
    refs: &std::path::Path,
    column: &str,
    pairs: &[Pair],
) -> anyhow::Result<(f64, usize)> {
    let labels = files::read_labels(refs, column)
        .with_context(|| format!("reading labels from {}", refs.display()))?;
    let (mut hits, mut n) = (0usize, 0usize);
    for pair in pairs {
        if let Some(l) = labels.get(&pair.reference_key) {
            n += 1;
            hits += usize::from(baselines::mentions_label(&pair.candidate, l));
        }
    }
    Ok((hits as f64 / n.max(1) as f64, n))
}

fn notes(
    predictions: &Predictions,
    layout: &Layout,
    counts: &EvalCounts,
    joined: &files::Joined,
) -> Vec<String> {
    let mut notes = vec![
        format!("references: {layout} layout detected"),
        format!("predictions: {}", predictions.format),
        format!(
            "{} matched pairs; {} predictions without references{}; {} references without \
             predictions{}",
            counts.matched,
            counts.predictions_without_references,
            listed(&joined.predictions_without_references),
            counts.references_without_predictions,
            listed(&joined.references_without_predictions),
        ),
    ];
    if counts.missing_predictions > 0 {
        notes.push(if counts.scored_as_empty > 0 {
            format!(
                "{} reference clips have no caption to score (no prediction or a failed one): \
                 scored as empty captions (score 0); --skip-missing leaves them out",
                counts.missing_predictions
            )
        } else {
            format!(
                "{} reference clips have no caption to score (no prediction or a failed one): \
                 left out (--skip-missing)",
                counts.missing_predictions
            )
        });
    }
    if counts.failed_predictions > 0 {
        let failed: Vec<String> = predictions
            .failed
            .iter()
            .map(|(k, r)| format!("{k}: {r}"))
            .collect();
        notes.push(format!(
            "{} failed predictions{}",
            counts.failed_predictions,
            listed(&failed)
        ));
    }
    if counts.multi_segment_uris > 0 {
        notes.push(format!(
            "{} inputs have several segments; only segment 0 is scored",
            counts.multi_segment_uris
        ));
    }
    if counts.duplicate_predictions > 0 {
        notes.push(format!(
            "{} prediction URIs repeat another URI's file name and were ignored{}",
            counts.duplicate_predictions,
            listed(&predictions.duplicates)
        ));
    }
    if counts.duplicate_matches > 0 {
        notes.push(format!(
            "{} predictions matched a reference clip already matched and were ignored{}",
            counts.duplicate_matches,
            listed(&joined.duplicate_matches)
        ));
    }
    if counts.references_without_captions > 0 {
        notes.push(format!(
            "{} reference clips have no caption and were ignored",
            counts.references_without_captions
        ));
    }
    notes
}

fn listed(keys: &[String]) -> String {
    if keys.is_empty() {
        String::new()
    } else {
        format!(" ({})", sample(keys, 5))
    }
}

fn sample(keys: &[String], n: usize) -> String {
    if keys.is_empty() {
        return "none".to_string();
    }
    let mut s = keys.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > n {
        s.push_str(&format!(", … {} more", keys.len() - n));
    }
    s
}
