//! `audiocap eval` through its library entry point (`audiocap::eval::command::run_eval`):
//! each reference layout and both prediction formats give the scores of
//! `score_corpus` on the same pairs and the reference scores of
//! `metrics/reference.json` (set1); the join report, `metrics.json` and the per-clip
//! Parquet file.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use audiocap::eval::command::{EvalOptions, EvalOutcome, run_eval};
use audiocap::eval::files::Layout;
use audiocap::output::{CaptionFileWriter, CaptionRow};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::{
    METEOR_SETUP_HELP, MetricsReference as Reference, MetricsSet as Set, fixtures, meteor_setup,
};

const TOLERANCE: f64 = 1e-6;

fn set1() -> Set {
    let path = fixtures().join("metrics/reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut reference: Reference = serde_json::from_str(&text).expect("parsing reference.json");
    let set = reference
        .sets
        .remove("set1")
        .expect("set1 in reference.json");
    assert!(
        set.references.iter().all(|r| r.len() == 5),
        "set1 has 5 references per clip"
    );
    set
}

fn args(pred: &Path, refs: &Path, dir: &Path) -> EvalOptions {
    EvalOptions {
        pred: pred.to_path_buf(),
        refs: refs.to_path_buf(),
        out: Some(dir.join("out/metrics.json")),
        per_clip: Some(dir.join("out/clip_scores.parquet")),
        key_column: None,
        java: None,
        meteor_jar: None,
        spice_jar: None,
        corenlp_dir: None,
        // The join and native scores are tested without JVMs; the METEOR tests below
        // turn them on.
        no_java_metrics: true,
        fense: Default::default(),
        constant_baseline: None,
        labels_column: None,
        // set1's reference scores are those of its matched pairs; the default (a clip
        // without a caption scores as an empty one) has a test of its own below.
        skip_missing: true,
    }
}

fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) {
    let mut w = csv::Writer::from_path(path).expect("creating CSV");
    w.write_record(header).expect("writing CSV header");
    for row in rows {
        w.write_record(row).expect("writing CSV row");
    }
    w.flush().expect("flushing CSV");
}

/// Clotho layout: `clip_<i>.wav` for set1's clips, plus `unmatched_ref.wav`.
fn clotho_refs(set: &Set, path: &Path) {
    let mut rows: Vec<Vec<String>> = set
        .references
        .iter()
        .enumerate()
        .map(|(i, refs)| {
            let mut row = vec![format!("clip_{i}.wav")];
            row.extend(refs.iter().cloned());
            row
        })
        .collect();
    rows.push(
        std::iter::once("unmatched_ref.wav".to_string())
            .chain((0..5).map(|i| format!("a reference caption {i}")))
            .collect(),
    );
    write_csv(
        path,
        &[
            "file_name",
            "caption_1",
            "caption_2",
            "caption_3",
            "caption_4",
            "caption_5",
        ],
        &rows,
    );
}

/// Scores equal `score_corpus` on set1 and set1's reference scores.
fn assert_set1_scores(outcome: &EvalOutcome, set: &Set) {
    assert_eq!(outcome.pairs.len(), set.candidates.len());
    let candidates: Vec<String> = outcome.pairs.iter().map(|p| p.candidate.clone()).collect();
    let references: Vec<Vec<String>> = outcome.pairs.iter().map(|p| p.references.clone()).collect();
    assert_eq!(candidates, set.candidates, "pairs in prediction order");
    assert_eq!(references, set.references);
    let direct = audiocap::eval::score_corpus(&set.candidates, &set.references).expect("scoring");
    assert_eq!(outcome.scores, direct);
    let ours = [
        ("bleu_1", outcome.scores.bleu[0]),
        ("bleu_2", outcome.scores.bleu[1]),
        ("bleu_3", outcome.scores.bleu[2]),
        ("bleu_4", outcome.scores.bleu[3]),
        ("rouge_l", outcome.scores.rouge_l),
        ("cider_d", outcome.scores.cider_d),
    ];
    for (metric, value) in ours {
        let expected = set.scores[metric];
        assert!(
            (value - expected).abs() <= TOLERANCE,
            "{metric}: ours {value} reference {expected}"
        );
        let json = outcome.metrics["scores"][metric]
            .as_f64()
            .unwrap_or_else(|| panic!("metrics.scores.{metric}"));
        assert_eq!(json, value, "{metric} in metrics.json");
    }
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet reader")
        .build()
        .expect("parquet reader")
        .collect::<Result<_, _>>()
        .expect("reading batches")
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    let array = batch
        .column_by_name(column)
        .unwrap_or_else(|| panic!("column {column}"));
    let array = array
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("string column");
    (0..array.len())
        .map(|i| array.value(i).to_string())
        .collect()
}

#[test]
fn clotho_csv_references_with_csv_predictions() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let refs = dir.path().join("clotho_eval.csv");
    clotho_refs(&set, &refs);
    // clip_0 by exact name, clip_1 without its extension (stem match), plus one orphan.
    let pred = dir.path().join("pred.csv");
    write_csv(
        &pred,
        &["file_name", "caption"],
        &[
            vec!["clip_0.wav".into(), set.candidates[0].clone()],
            vec!["clip_1".into(), set.candidates[1].clone()],
            vec!["orphan.wav".into(), "a dog barks".into()],
        ],
    );
    let args = args(&pred, &refs, dir.path());
    let outcome = run_eval(&args).expect("eval");

    assert_eq!(outcome.layout, Layout::Clotho);
    assert_set1_scores(&outcome, &set);
    assert_eq!(outcome.counts.matched, 2);
    assert_eq!(outcome.predictions_without_references, ["orphan.wav"]);
    assert_eq!(
        outcome.references_without_predictions,
        ["unmatched_ref.wav"]
    );
    let report = outcome.report();
    assert!(report.contains("Clotho"), "{report}");
    assert!(report.contains("orphan.wav"), "{report}");
    assert!(report.contains("unmatched_ref.wav"), "{report}");
    assert!(report.contains("METEOR"), "{report}");
    assert!(report.contains("CIDEr-D"), "{report}");

    // metrics.json
    let out = args.out.as_ref().expect("out path");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).expect("metrics.json"))
            .expect("metrics.json parses");
    // serde_json reads floats back to within an ulp, not always bit for bit.
    assert_eq!(json["counts"], outcome.metrics["counts"]);
    for (metric, value) in outcome.metrics["scores"].as_object().expect("scores") {
        let (read, written) = (json["scores"][metric].as_f64(), value.as_f64());
        let (Some(read), Some(written)) = (read, written) else {
            panic!("scores.{metric} in metrics.json");
        };
        assert!(
            (read - written).abs() <= 1e-12,
            "{metric}: {read} vs {written}"
        );
    }
    assert_eq!(json["counts"]["matched"], 2);
    assert_eq!(json["counts"]["predictions_without_references"], 1);
    assert_eq!(json["counts"]["references_without_predictions"], 1);
    assert_eq!(
        json["unmatched"]["predictions_without_references"][0],
        "orphan.wav"
    );
    assert!(
        json["layout"]
            .as_str()
            .is_some_and(|l| l.starts_with("Clotho"))
    );
    for metric in ["meteor", "spice", "spider"] {
        let reason = json["unavailable"][metric].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "unavailable.{metric}");
        assert!(json["scores"].get(metric).is_none(), "scores.{metric}");
    }
    assert!(
        json["unavailable"]["meteor"]
            .as_str()
            .is_some_and(|r| r.contains("--no-java-metrics"))
    );
    // Nothing staged is left beside it (any staging name: `.metrics.json.*`).
    let left: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial") || n.ends_with(".staging"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Per-clip Parquet
    let per_clip = args.per_clip.as_ref().expect("per-clip path");
    let batches = read_parquet(per_clip);
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 2);
    let batch = &batches[0];
    assert_eq!(strings(batch, "key"), ["clip_0.wav", "clip_1"]);
    assert_eq!(strings(batch, "candidate"), set.candidates);
    assert_eq!(
        strings(batch, "references")[0],
        set.references[0].join(audiocap::eval::report::REFERENCE_SEPARATOR)
    );
    let cider = batch
        .column_by_name("cider_d")
        .expect("cider_d")
        .as_any()
        .downcast_ref::<arrow_array::Float64Array>()
        .expect("f64")
        .value(1);
    assert_eq!(cider, outcome.scores.per_clip[1].cider_d);
    for c in ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"] {
        assert!(batch.column_by_name(c).is_some(), "{c}");
    }
}

/// By default every reference clip is scored: one without a prediction and one whose
/// prediction has no caption count as empty captions (score 0, in the corpus scores,
/// the per-clip file and the class-word rate); --skip-missing scores the others only.
/// Both say how many were missing.
#[test]
fn missing_and_failed_predictions_score_as_empty_captions() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, refs) = set1_files(&set, dir.path());
    // Predictions again: clip_0 captioned, clip_1's empty (a failed prediction),
    // unmatched_ref.wav's absent.
    let rows = [
        vec!["clip_0.wav".to_string(), set.candidates[0].clone()],
        vec!["clip_1.wav".to_string(), String::new()],
    ];
    write_csv(&pred, &["file_name", "caption"], &rows);
    let unmatched: Vec<String> = (0..5).map(|i| format!("a reference caption {i}")).collect();
    let honest = EvalOptions {
        skip_missing: false,
        ..args(&pred, &refs, dir.path())
    };
    let outcome = run_eval(&honest).expect("eval");
    assert_eq!(outcome.counts.missing_predictions, 2);
    assert_eq!(outcome.counts.scored_as_empty, 2);
    assert_eq!(outcome.counts.failed_predictions, 1);
    let candidates: Vec<&str> = outcome.pairs.iter().map(|p| p.candidate.as_str()).collect();
    assert_eq!(candidates, [set.candidates[0].as_str(), "", ""]);
    let direct = audiocap::eval::score_corpus(
        &[set.candidates[0].clone(), String::new(), String::new()],
        &[
            set.references[0].clone(),
            set.references[1].clone(),
            unmatched.clone(),
        ],
    )
    .expect("scoring");
    assert_eq!(outcome.scores, direct);
    for clip in &outcome.scores.per_clip[1..] {
        assert_eq!(clip.cider_d, 0.0);
        assert_eq!(clip.rouge_l, 0.0);
    }
    let alone =
        audiocap::eval::score_corpus(&set.candidates[..1], &set.references[..1]).expect("scoring");
    assert!(
        outcome.scores.bleu[0] < alone.bleu[0],
        "{:?}",
        outcome.scores
    );
    assert_eq!(outcome.metrics["counts"]["scored_as_empty"], 2);
    let report = outcome.report();
    assert!(
        report.contains("2 reference clips have no caption to score")
            && report.contains("scored as empty captions"),
        "{report}"
    );
    let per_clip = read_parquet(honest.per_clip.as_ref().expect("per-clip path"));
    let keys: Vec<String> = per_clip.iter().flat_map(|b| strings(b, "key")).collect();
    assert_eq!(keys, ["clip_0.wav", "clip_1.wav", "unmatched_ref.wav"]);

    let skipping = args(&pred, &refs, dir.path());
    let outcome = run_eval(&skipping).expect("eval");
    assert_eq!(outcome.counts.missing_predictions, 2);
    assert_eq!(outcome.counts.scored_as_empty, 0);
    assert_eq!(outcome.pairs.len(), 1);
    assert_eq!(outcome.scores, alone);
    let report = outcome.report();
    assert!(report.contains("left out (--skip-missing)"), "{report}");
}

#[test]
fn audiocaps_csv_references_with_captions_parquet_predictions() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let refs = dir.path().join("audiocaps_test.csv");
    // Clip 0: audiocap_id 101, matched by `<youtube_id>_<start_time>`; clip 1: id 102,
    // matched by `<audiocap_id>`; clip 103 has no prediction, clip 104 a failed one.
    let mut rows = Vec::new();
    let clips = [("101", "abc-DEF_12", "30"), ("102", "xyz", "0")];
    for ((id, yt, start), refs) in clips.iter().zip(&set.references) {
        for r in refs {
            rows.push(vec![
                id.to_string(),
                yt.to_string(),
                start.to_string(),
                r.clone(),
            ]);
        }
    }
    rows.push(vec![
        "103".into(),
        "nopred".into(),
        "10".into(),
        "birds sing".into(),
    ]);
    rows.push(vec![
        "104".into(),
        "broken".into(),
        "10".into(),
        "a door shuts".into(),
    ]);
    write_csv(
        &refs,
        &["audiocap_id", "youtube_id", "start_time", "caption"],
        &rows,
    );

    let pred = dir.path().join("captions.parquet");
    let row = |uri: &str, segment: u32, caption: Option<&str>, error: Option<&str>| CaptionRow {
        uri: uri.into(),
        segment_index: segment,
        caption: caption.map(str::to_string),
        error: error.map(str::to_string),
        model: "test@0".into(),
        run_id: "run".into(),
        ..Default::default()
    };
    let mut writer = CaptionFileWriter::create(&pred, vec![]).expect("writer");
    writer
        .write(&[
            row(
                "s3://bucket/audio/abc-DEF_12_30.wav",
                1,
                Some("not this segment"),
                None,
            ),
            row(
                "s3://bucket/audio/abc-DEF_12_30.wav",
                0,
                Some(&set.candidates[0]),
                None,
            ),
            row("/data/102.flac", 0, Some(&set.candidates[1]), None),
            row("/data/broken_10.wav", 0, None, Some("decoding failed")),
            row("/data/unknown.wav", 0, Some("an engine idles"), None),
        ])
        .expect("write rows");
    writer.finish().expect("finish");

    let args = args(&pred, &refs, dir.path());
    let outcome = run_eval(&args).expect("eval");
    assert_eq!(outcome.layout, Layout::AudioCaps);
    assert_set1_scores(&outcome, &set);
    assert_eq!(outcome.counts.multi_segment_uris, 1);
    assert_eq!(outcome.counts.failed_predictions, 1);
    assert_eq!(outcome.failed_predictions[0].0, "broken_10.wav");
    assert_eq!(outcome.predictions_without_references, ["unknown.wav"]);
    // 104's prediction failed: it is reported as failed, not as missing.
    assert_eq!(outcome.references_without_predictions, ["103"]);
    let report = outcome.report();
    assert!(report.contains("AudioCaps"), "{report}");
    assert!(report.contains("segment 0"), "{report}");
    assert!(report.contains("decoding failed"), "{report}");
}

#[test]
fn generic_parquet_references_and_key_column() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");

    // Parquet: key `uri` (full paths), captions in `caption_a`, `caption_b`, ... with a
    // null in one cell of an extra clip.
    let refs = dir.path().join("refs.parquet");
    let n_refs = 5;
    let mut fields = vec![Field::new("uri", DataType::Utf8, false)];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec![
        "/corpus/clip_0.wav",
        "/corpus/clip_1.wav",
        "/corpus/other.wav",
    ]))];
    for j in 0..n_refs {
        fields.push(Field::new(
            format!("caption_{}", (b'a' + j as u8) as char),
            DataType::Utf8,
            true,
        ));
        let mut col: Vec<Option<String>> =
            set.references.iter().map(|r| Some(r[j].clone())).collect();
        col.push((j == 0).then(|| "wind blows".to_string()));
        columns.push(Arc::new(StringArray::from(col)));
    }
    fields.push(Field::new("split", DataType::Utf8, false));
    columns.push(Arc::new(StringArray::from(vec!["test"; 3])));
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("batch");
    let mut w =
        ArrowWriter::try_new(File::create(&refs).expect("create"), schema, None).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");

    let pred = dir.path().join("pred.csv");
    write_csv(
        &pred,
        &["file_name", "caption"],
        &[
            vec!["clip_0.flac".into(), set.candidates[0].clone()],
            vec!["clip_1.wav".into(), set.candidates[1].clone()],
        ],
    );
    let outcome = run_eval(&args(&pred, &refs, dir.path())).expect("eval generic parquet");
    match &outcome.layout {
        Layout::Generic { key, captions } => {
            assert_eq!(key, "uri");
            assert_eq!(captions.len(), n_refs);
        }
        other => panic!("layout {other:?}"),
    }
    assert_set1_scores(&outcome, &set);
    assert_eq!(outcome.references_without_predictions, ["other.wav"]);

    // CSV with a named key column and one caption per row.
    let refs = dir.path().join("long.csv");
    let mut rows = Vec::new();
    for (i, refs) in set.references.iter().enumerate() {
        for r in refs {
            rows.push(vec![format!("clip_{i}"), r.clone(), "x".into()]);
        }
    }
    write_csv(&refs, &["clip", "caption", "note"], &rows);
    let mut a = args(&pred, &refs, dir.path());
    a.key_column = Some("clip".into());
    let outcome = run_eval(&a).expect("eval with --key-column");
    assert!(matches!(&outcome.layout, Layout::Generic { key, .. } if key == "clip"));
    assert_set1_scores(&outcome, &set);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let pred = dir.path().join("pred.csv");
    write_csv(
        &pred,
        &["file_name", "caption"],
        &[vec!["clip_0.wav".into(), set.candidates[0].clone()]],
    );

    // No caption columns: the message says what is missing and lists what was found.
    let refs = dir.path().join("bad.csv");
    write_csv(
        &refs,
        &["file_name", "text"],
        &[vec!["clip_0.wav".into(), "x".into()]],
    );
    let err = format!(
        "{:#}",
        run_eval(&args(&pred, &refs, dir.path())).unwrap_err()
    );
    assert!(err.contains("caption column"), "{err}");
    assert!(err.contains("found columns: [file_name, text]"), "{err}");
    assert!(err.contains("bad.csv"), "{err}");

    // No key column.
    write_csv(
        &refs,
        &["name", "caption"],
        &[vec!["clip_0.wav".into(), "x".into()]],
    );
    let err = format!(
        "{:#}",
        run_eval(&args(&pred, &refs, dir.path())).unwrap_err()
    );
    assert!(err.contains("key column"), "{err}");
    assert!(err.contains("found columns: [name, caption]"), "{err}");

    // Predictions without a caption column.
    let bad_pred = dir.path().join("bad_pred.csv");
    write_csv(
        &bad_pred,
        &["file_name", "text"],
        &[vec!["a.wav".into(), "x".into()]],
    );
    let refs = dir.path().join("clotho.csv");
    clotho_refs(&set, &refs);
    let err = format!(
        "{:#}",
        run_eval(&args(&bad_pred, &refs, dir.path())).unwrap_err()
    );
    assert!(err.contains("predictions"), "{err}");
    assert!(err.contains("found columns: [file_name, text]"), "{err}");

    // Nothing matches: a clear error, and no output files.
    let orphan = dir.path().join("orphan.csv");
    write_csv(
        &orphan,
        &["file_name", "caption"],
        &[vec!["zzz.wav".into(), "x".into()]],
    );
    let a = args(&orphan, &refs, dir.path());
    let err = format!("{:#}", run_eval(&a).unwrap_err());
    assert!(err.contains("no prediction matched"), "{err}");
    assert!(err.contains("zzz.wav"), "{err}");
    assert!(!a.out.as_deref().is_some_and(Path::exists));
}

fn f64_column(batch: &RecordBatch, column: &str) -> Vec<Option<f64>> {
    let array = batch
        .column_by_name(column)
        .unwrap_or_else(|| panic!("column {column}"))
        .as_any()
        .downcast_ref::<arrow_array::Float64Array>()
        .expect("f64 column");
    (0..array.len())
        .map(|i| (!array.is_null(i)).then(|| array.value(i)))
        .collect()
}

/// set1 as Clotho references and CSV predictions in `dir`; returns (pred, refs).
fn set1_files(set: &Set, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let refs = dir.join("clotho.csv");
    clotho_refs(set, &refs);
    let pred = dir.join("pred.csv");
    let rows: Vec<Vec<String>> = set
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| vec![format!("clip_{i}.wav"), c.clone()])
        .collect();
    write_csv(&pred, &["file_name", "caption"], &rows);
    (pred, refs)
}

/// A METEOR jar that is missing, or that Java cannot run, makes METEOR unavailable
/// with the reason; every native metric is still computed and written.
#[test]
fn bogus_meteor_jar_is_reported_unavailable() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, refs) = set1_files(&set, dir.path());

    let mut a = args(&pred, &refs, dir.path());
    a.no_java_metrics = false;
    a.meteor_jar = Some(dir.path().join("nowhere/meteor-1.5.jar"));
    a.spice_jar = Some(dir.path().join("nowhere/spice-1.0.jar"));
    let outcome = run_eval(&a).expect("eval with a missing jar");
    assert_set1_scores(&outcome, &set);
    let why = outcome
        .java
        .meteor
        .as_ref()
        .expect_err("METEOR unavailable");
    assert!(why.0.contains("--meteor-jar"), "{why}");
    assert!(
        why.0.contains("nowhere/meteor-1.5.jar: no such file"),
        "{why}"
    );
    let spice = outcome.java.spice.as_ref().expect_err("SPICE unavailable");
    assert!(
        spice.0.contains("nowhere/spice-1.0.jar: no such file"),
        "{spice}"
    );
    assert_eq!(outcome.metrics["unavailable"]["meteor"], why.0.as_str());
    assert!(outcome.metrics["unavailable"]["spider"].is_string());
    let report = outcome.report();
    assert!(report.contains("METEOR    unavailable"), "{report}");
    assert!(report.contains("no such file"), "{report}");
    let batches = read_parquet(a.per_clip.as_ref().expect("per-clip path"));
    for column in ["meteor", "spice", "spider"] {
        assert_eq!(f64_column(&batches[0], column), [None, None], "{column}");
    }

    // A file that is no jar, with the paraphrase table it would need beside it: Java
    // refuses it, and its stderr is the reason.
    let setup = meteor_setup();
    let bogus = dir.path().join("bogus/meteor-1.5.jar");
    std::fs::create_dir_all(bogus.with_file_name("data")).expect("mkdir");
    std::fs::write(&bogus, b"not a jar").expect("write");
    std::fs::write(bogus.with_file_name("data").join("paraphrase-en.gz"), b"").expect("write");
    a.meteor_jar = Some(bogus);
    a.java = Some(setup.java);
    let outcome = run_eval(&a).expect("eval with a corrupt jar");
    assert_set1_scores(&outcome, &set);
    let why = outcome
        .java
        .meteor
        .as_ref()
        .expect_err("METEOR unavailable");
    assert!(why.0.starts_with("METEOR failed:"), "{why}");
    assert!(why.0.contains("corrupt jarfile"), "{why}");
}

/// `run_eval` with METEOR on: the corpus METEOR of set1 matches the reference, its
/// per-clip scores go into the per-clip file, and SPIDEr follows SPICE.
#[test]
fn meteor_in_the_eval_report() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, refs) = set1_files(&set, dir.path());
    let mut a = args(&pred, &refs, dir.path());
    a.no_java_metrics = false;
    a.meteor_jar = Some(meteor_setup().jar);
    let outcome = run_eval(&a).expect("eval");
    assert_set1_scores(&outcome, &set);
    let meteor = match &outcome.java.meteor {
        Ok(m) => m,
        Err(why) => panic!("{why}; {METEOR_SETUP_HELP}"),
    };
    let expected = set.scores["meteor"];
    assert!(
        (meteor.corpus - expected).abs() <= 1e-4,
        "METEOR {} reference {expected}",
        meteor.corpus
    );
    assert_eq!(
        outcome.metrics["scores"]["meteor"].as_f64(),
        Some(meteor.corpus)
    );
    assert!(outcome.metrics["unavailable"].get("meteor").is_none());
    let report = outcome.report();
    assert!(
        report.contains(&format!("METEOR    {:>10.4}", meteor.corpus)),
        "{report}"
    );

    let batches = read_parquet(a.per_clip.as_ref().expect("per-clip path"));
    let per_clip: Vec<Option<f64>> = meteor.per_clip.iter().copied().map(Some).collect();
    assert_eq!(f64_column(&batches[0], "meteor"), per_clip);

    // SPICE runs only where the CoreNLP jars are installed; either way SPIDEr follows.
    match (&outcome.java.spice, outcome.java.spider(&outcome.scores)) {
        (Ok(spice), Ok((spider, _))) => {
            assert_eq!(spider, (outcome.scores.cider_d + spice.corpus) / 2.0);
        }
        (Err(why), Err(_)) => {
            assert!(why.0.contains("SPICE"), "{why}");
            assert_eq!(f64_column(&batches[0], "spider"), [None, None]);
        }
        (spice, spider) => panic!("SPICE {spice:?} but SPIDEr {spider:?}"),
    }
}

/// The binary: `audiocap eval` prints the table, with METEOR unavailable and why.
#[test]
fn eval_command_prints_the_table() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, refs) = set1_files(&set, dir.path());
    let missing = dir.path().join("missing.jar");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--refs")
        .arg(&refs)
        .arg("--meteor-jar")
        .arg(&missing)
        .arg("--spice-jar")
        .arg(&missing)
        // set1's reference scores are those of its matched pairs.
        .arg("--skip-missing")
        .output()
        .expect("running audiocap eval");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cider = set.scores["cider_d"];
    assert!(
        stdout.contains(&format!("CIDEr-D   {cider:>10.4}")),
        "{stdout}"
    );
    assert!(stdout.contains("METEOR    unavailable"), "{stdout}");
    assert!(stdout.contains("missing.jar: no such file"), "{stdout}");
    assert!(stdout.contains("SPIDEr    unavailable"), "{stdout}");
    assert!(stdout.contains("left out (--skip-missing)"), "{stdout}");
}

/// The fense-tiny fixture's candidates and reference lists, and its reference.json.
fn fense_set() -> (Set, serde_json::Value) {
    let path = fixtures().join("fense-tiny/reference.json");
    let text = std::fs::read_to_string(&path).expect("reading fense-tiny/reference.json");
    let reference: serde_json::Value = serde_json::from_str(&text).expect("parsing");
    let text = |v: &serde_json::Value| v.as_str().expect("a string").to_string();
    let cands = reference["candidates"].as_array().expect("candidates");
    let set = Set {
        candidates: cands.iter().map(|c| text(&c["candidate"])).collect(),
        references: cands
            .iter()
            .map(|c| {
                c["references"]
                    .as_array()
                    .expect("a list")
                    .iter()
                    .map(text)
                    .collect()
            })
            .collect(),
        scores: Default::default(),
    };
    (set, reference)
}

fn assert_close(label: &str, ours: f64, theirs: f64) {
    assert!(
        (ours - theirs).abs() <= 1e-5,
        "{label}: ours {ours} reference {theirs}"
    );
}

/// `--fense-models`: metrics.json, the per-clip file and the table carry SBERT-sim,
/// the fluency error rate and FENSE equal to the reference; SPIDEr-FL waits for SPICE.
#[test]
fn fense_in_the_eval_report() {
    let (set, reference) = fense_set();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, refs) = set1_files(&set, dir.path());
    let mut a = args(&pred, &refs, dir.path());
    a.fense = audiocap::eval::fense::FensePaths::in_dir(fixtures().join("fense-tiny"));
    let outcome = run_eval(&a).expect("eval with FENSE");
    assert!(matches!(outcome.layout, Layout::Clotho));
    let fense = outcome.fense.as_ref().expect("FENSE computed");
    let corpus = &reference["corpus"];
    let scores = &outcome.metrics["scores"];
    for (key, ours, theirs) in [
        ("sbert_sim", fense.sbert_sim, &corpus["sbert_sim"]),
        (
            "fluency_error_rate",
            fense.fluency_error_rate,
            &corpus["fer"],
        ),
        ("fense", fense.fense, &corpus["fense"]),
    ] {
        assert_close(key, ours, theirs.as_f64().expect("a number"));
        assert_eq!(scores[key].as_f64(), Some(ours), "{key} in metrics.json");
    }
    let why = outcome.metrics["unavailable"]["spider_fl"]
        .as_str()
        .expect("SPIDEr-FL unavailable");
    assert!(why.contains("SPIDEr is unavailable"), "{why}");

    let batches = read_parquet(a.per_clip.as_ref().expect("per-clip path"));
    let expected = reference["candidates"].as_array().expect("candidates");
    for column in ["sbert_sim", "p_error", "fense"] {
        let values = f64_column(&batches[0], column);
        assert_eq!(values.len(), expected.len());
        for (i, (v, want)) in values.iter().zip(expected).enumerate() {
            let v = v.unwrap_or_else(|| panic!("{column}[{i}] is null"));
            assert_close(
                &format!("{column}[{i}]"),
                v,
                want[column].as_f64().expect("number"),
            );
        }
    }
    assert!(
        f64_column(&batches[0], "spider_fl")
            .iter()
            .all(Option::is_none)
    );
    let table = outcome.report();
    assert!(
        table.contains(&format!("FENSE     {:>10.4}", fense.fense)),
        "{table}"
    );
    assert!(
        table.contains(&format!("SBERT-sim {:>10.4}", fense.sbert_sim)),
        "{table}"
    );
    assert!(
        table.contains(&format!("FER       {:>10.4}", fense.fluency_error_rate)),
        "{table}"
    );
}

/// A generic table with a different number of captions per clip, null and empty
/// cells: each candidate is scored against its non-empty captions only.
#[test]
fn fense_of_ragged_generic_references_skips_empty_cells() {
    let (set, _) = fense_set();
    let (candidates, references) = (&set.candidates, &set.references);
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, _) = set1_files(&set, dir.path());
    // Clip i keeps i % 5 + 1 captions, over 7 columns: the rest are null, except
    // that odd clips write one empty string and one whitespace-only cell first.
    let columns = 7;
    let mut kept: Vec<Vec<String>> = Vec::new();
    let mut cells: Vec<Vec<Option<String>>> = vec![Vec::new(); columns];
    for (i, refs) in references.iter().enumerate() {
        let keep = &refs[..i % 5 + 1];
        kept.push(keep.to_vec());
        let mut row: Vec<Option<String>> = Vec::new();
        if i % 2 == 1 {
            row.push(Some(String::new()));
            row.push(Some("   ".into()));
        }
        row.extend(keep.iter().cloned().map(Some));
        row.resize(columns, None);
        for (c, cell) in row.into_iter().enumerate() {
            cells[c].push(cell);
        }
    }
    let mut fields = vec![Field::new("file_name", DataType::Utf8, false)];
    let keys: Vec<String> = (0..candidates.len())
        .map(|i| format!("clip_{i}.wav"))
        .collect();
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(StringArray::from(keys))];
    for (c, column) in cells.into_iter().enumerate() {
        fields.push(Field::new(
            format!("caption_{}", c + 1),
            DataType::Utf8,
            true,
        ));
        arrays.push(Arc::new(StringArray::from(column)));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays).expect("batch");
    let refs = dir.path().join("refs.parquet");
    let mut w =
        ArrowWriter::try_new(File::create(&refs).expect("create"), schema, None).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");

    let mut a = args(&pred, &refs, dir.path());
    a.fense = audiocap::eval::fense::FensePaths::in_dir(fixtures().join("fense-tiny"));
    let outcome = run_eval(&a).expect("eval");
    assert!(matches!(outcome.layout, Layout::Generic { .. }));
    let got: Vec<Vec<String>> = outcome.pairs.iter().map(|p| p.references.clone()).collect();
    assert_eq!(got, kept, "empty and null cells are skipped");
    let models = audiocap::eval::fense::FenseModels::load(&a.fense).expect("models");
    let direct = models.score(candidates, &kept).expect("direct");
    let fense = outcome.fense.as_ref().expect("FENSE");
    for (ours, want) in fense.per_clip.iter().zip(&direct.per_clip) {
        assert_close("sbert_sim", ours.sbert_sim, want.sbert_sim);
        assert_eq!(ours.has_error, want.has_error);
    }
    assert_close("corpus fense", fense.fense, direct.fense);
}

/// Without the models FENSE is unavailable with what to place where; a models folder
/// that lacks a part names the part. The other metrics are reported either way.
#[test]
fn fense_without_models_is_unavailable_with_the_setup() {
    let set = set1();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pred, refs) = set1_files(&set, dir.path());
    let mut a = args(&pred, &refs, dir.path());
    let outcome = run_eval(&a).expect("eval without FENSE models");
    assert_set1_scores(&outcome, &set);
    let why = outcome.metrics["unavailable"]["fense"]
        .as_str()
        .expect("FENSE unavailable");
    for part in [
        "--fense-models",
        "sbert/",
        "sentence-transformers/paraphrase-TinyBERT-L6-v2",
        "echecker_clotho_audiocaps_base.ckpt",
        "https://github.com/blmoistawinde/fense/releases",
        "bert-base-uncased/",
    ] {
        assert!(why.contains(part), "{part} not in {why}");
    }
    for key in ["sbert_sim", "fluency_error_rate", "spider_fl"] {
        assert!(outcome.metrics["unavailable"][key].is_string(), "{key}");
    }
    let table = outcome.report();
    assert!(
        table.contains("FENSE     unavailable  (as above)"),
        "{table}"
    );
    let batches = read_parquet(a.per_clip.as_ref().expect("per-clip path"));
    for column in ["sbert_sim", "p_error", "fense", "spider_fl"] {
        assert_eq!(f64_column(&batches[0], column), [None, None], "{column}");
    }

    let empty = dir.path().join("models");
    std::fs::create_dir_all(&empty).expect("mkdir");
    a.fense = audiocap::eval::fense::FensePaths::in_dir(&empty);
    let outcome = run_eval(&a).expect("eval with an empty models folder");
    assert_set1_scores(&outcome, &set);
    let why = outcome.fense.as_ref().expect_err("FENSE unavailable");
    assert!(
        why.0.contains(&empty.join("sbert").display().to_string()),
        "{why}"
    );
}
