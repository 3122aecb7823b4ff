//! The `audiocap` binary end to end: export, then caption a folder with good, bad,
//! short and resampled inputs into Parquet.

use std::path::Path;
use std::process::Command;

use arrow_array::{Array, Float32Array, StringArray, UInt32Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::fixtures;
use crate::common::write_wav;

fn audiocap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .args(args)
        .output()
        .expect("running audiocap")
}

#[test]
fn export_then_caption_a_folder_with_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let f = fixtures();
    crate::common::export_tiny_a0(&model);

    let audio = dir.path().join("audio");
    std::fs::create_dir_all(audio.join("nested")).unwrap();
    for clip in ["sine_1s.wav", "chirp_2p5s.wav"] {
        std::fs::copy(f.join("e2e-tiny/audio").join(clip), audio.join(clip)).unwrap();
    }
    // 44.1 kHz stereo, resampled on the way in.
    let tone: Vec<f32> = (0..44_100 * 2)
        .map(|i| 0.3 * ((i / 2) as f32 * 2.0 * std::f32::consts::PI * 440.0 / 44_100.0).sin())
        .collect();
    write_wav(&audio.join("nested/stereo_44k.wav"), 44_100, 2, &tone);
    // Too short for one encoder patch (50 ms).
    write_wav(&audio.join("short.wav"), 16_000, 1, &vec![0.1; 800]);
    // Not audio at all.
    std::fs::write(audio.join("corrupt.wav"), b"this is not a wav file at all").unwrap();
    // A long recording: cut into windows.
    let long: Vec<f32> = (0..16_000 * 7)
        .map(|i| ((i % 97) as f32 / 97.0 - 0.5) * 0.2)
        .collect();
    write_wav(&audio.join("long.wav"), 16_000, 1, &long);
    // Ignored: not an audio extension.
    std::fs::write(audio.join("notes.txt"), b"hello").unwrap();
    // Cut short (an interrupted copy): captioned from what is there, and flagged.
    let sine = std::fs::read(f.join("e2e-tiny/audio/sine_1s.wav")).unwrap();
    std::fs::write(audio.join("cut.wav"), &sine[..sine.len() * 6 / 10]).unwrap();

    let parquet = dir.path().join("captions.parquet");
    let out = audiocap(&[
        "caption",
        "--model",
        model.to_str().unwrap(),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--max-seconds",
        "5",
        "--window-seconds",
        "3",
        "--hop-seconds",
        "3",
        "--out",
        parquet.to_str().unwrap(),
        audio.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Some inputs failed: the distinct exit code, but the run finished.
    assert_eq!(out.status.code(), Some(3), "{stderr}");

    let file = std::fs::File::open(&parquet).unwrap();
    let batches: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let mut rows = Vec::new();
    for b in &batches {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let uri = col("uri");
        let uri = uri.as_any().downcast_ref::<StringArray>().unwrap();
        let caption = col("caption");
        let caption = caption.as_any().downcast_ref::<StringArray>().unwrap();
        let error = col("error");
        let error = error.as_any().downcast_ref::<StringArray>().unwrap();
        let seg = col("segment_index");
        let seg = seg.as_any().downcast_ref::<UInt32Array>().unwrap();
        let score = col("score");
        let score = score.as_any().downcast_ref::<Float32Array>().unwrap();
        let warnings = col("warnings");
        let warnings = warnings.as_any().downcast_ref::<StringArray>().unwrap();
        let kinds = col("error_kind");
        let kinds = kinds.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..b.num_rows() {
            let name = Path::new(uri.value(i))
                .file_name()
                .unwrap()
                .to_string_lossy();
            let kind = (!kinds.is_null(i)).then(|| kinds.value(i));
            let expected = match name.as_ref() {
                "corrupt.wav" => Some("not_audio"),
                "short.wav" => Some("too_short"),
                _ => None,
            };
            assert_eq!(kind, expected, "{name}");
            let warned = !warnings.is_null(i);
            assert_eq!(
                warned,
                name == "cut.wav",
                "{name}: {:?}",
                warned.then(|| warnings.value(i))
            );
            if warned {
                assert!(
                    warnings.value(i).starts_with("truncated: "),
                    "{}",
                    warnings.value(i)
                );
            }
            let name = Path::new(uri.value(i))
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            rows.push((
                name,
                seg.value(i),
                (!caption.is_null(i)).then(|| caption.value(i).to_string()),
                (!error.is_null(i)).then(|| error.value(i).to_string()),
                (!score.is_null(i)).then(|| score.value(i)),
            ));
        }
    }
    // As written: each input's rows together and in segment order (the staged
    // pipeline's sink gathers an input before writing it).
    let mut seen: Vec<&str> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 && rows[i - 1].0 == row.0 {
            assert_eq!(row.1, rows[i - 1].1 + 1, "{} out of order", row.0);
        } else {
            assert!(!seen.contains(&row.0.as_str()), "{} split", row.0);
            assert_eq!(row.1, 0, "{} starts at segment {}", row.0, row.1);
            seen.push(&row.0);
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let names: Vec<(&str, u32)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        names,
        vec![
            ("chirp_2p5s.wav", 0),
            ("corrupt.wav", 0),
            ("cut.wav", 0),
            ("long.wav", 0),
            ("long.wav", 1),
            ("long.wav", 2),
            ("short.wav", 0),
            ("sine_1s.wav", 0),
            ("stereo_44k.wav", 0),
        ]
    );
    for (name, _, caption, error, score) in &rows {
        match name.as_str() {
            "corrupt.wav" => assert!(
                error
                    .as_deref()
                    .is_some_and(|e| e.contains("not a recognised audio file")),
                "{error:?}"
            ),
            "short.wav" => assert!(
                error.as_deref().is_some_and(|e| e.contains("too short")),
                "{error:?}"
            ),
            _ => {
                assert!(error.is_none(), "{name}: {error:?}");
                assert!(caption.as_deref().is_some_and(|c| !c.is_empty()), "{name}");
                assert!(score.is_some_and(|s| s < 0.0));
            }
        }
    }
    // The fixture clip gives the reference's first 6 tokens' text for decoder a0.
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("e2e-tiny/reference.json")).unwrap())
            .unwrap();
    let expected_ids: Vec<u32> = reference["cases"]["sine_1s.wav"]["a0"]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .take(6)
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let tokenizer =
        tokenizers::Tokenizer::from_file(f.join("e2e-tiny/llm/tokenizer.json")).unwrap();
    let expected = tokenizer.decode(&expected_ids, true).unwrap();
    let sine = rows.iter().find(|r| r.0 == "sine_1s.wav").unwrap();
    assert_eq!(sine.2.as_deref(), Some(expected.trim()));

    // Beam search through the same stages; a file named but missing is an error row.
    let beams = dir.path().join("beams.parquet");
    let missing = dir.path().join("missing.wav");
    let out = audiocap(&[
        "caption",
        "--model",
        model.to_str().unwrap(),
        "--beams",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        beams.to_str().unwrap(),
        audio.join("sine_1s.wav").to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("2 inputs, 2 segments: 1 captioned, 1 failed"),
        "{stderr}"
    );
    let file = std::fs::File::open(&beams).unwrap();
    let batch = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let strings = |name: &str| {
        let col = batch.column_by_name(name).unwrap();
        let col = col.as_any().downcast_ref::<StringArray>().unwrap();
        (0..col.len())
            .map(|i| (!col.is_null(i)).then(|| col.value(i).to_string()))
            .collect::<Vec<_>>()
    };
    let (uris, captions, errors) = (strings("uri"), strings("caption"), strings("error"));
    let kinds = strings("error_kind");
    let at = |name: &str| {
        uris.iter()
            .position(|u| u.as_deref().unwrap().ends_with(name))
            .unwrap()
    };
    assert!(
        captions[at("sine_1s.wav")]
            .as_deref()
            .is_some_and(|c| !c.is_empty())
    );
    let error = errors[at("missing.wav")].as_deref().unwrap_or_default();
    assert!(
        error.contains("not found") || error.contains("No such file"),
        "{error}"
    );
    // The kind of every error is a column of its own.
    assert_eq!(kinds[at("sine_1s.wav")], None);
    assert_eq!(kinds[at("missing.wav")].as_deref(), Some("not_found"));
}

#[test]
fn bad_arguments_are_listed_together_with_their_exit_code() {
    let out = audiocap(&[
        "caption",
        "--model",
        "/nonexistent",
        "--batch-size",
        "0",
        "--beams",
        "0",
        "--max-seconds=-1",
        "--out",
        "/tmp/x.parquet",
        "x.wav",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in ["--batch-size", "--beams", "max_seconds"] {
        assert!(stderr.contains(needle), "{needle} missing from: {stderr}");
    }
}

#[test]
fn pretrain_settings_take_set_overrides_and_list_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("encoder.toml");
    std::fs::write(&settings, "epochs = \"many\"\ncolour = 1\nbatch_size = 4\n").unwrap();
    let out = dir.path().join("out");
    let (out_s, settings_s) = (out.to_str().unwrap(), settings.to_str().unwrap());
    let common = [
        "--manifest",
        "m.csv",
        "--audio",
        "a/",
        "--out",
        out_s,
        "--check",
    ];

    // A file's wrong type and unknown key, a bad override, and a value check on what
    // is left: four problems in one run, exit code 2.
    let mut args = vec!["pretrain", "encoder", "--settings", settings_s];
    args.extend(["--set", "peak_lr=-1", "--set", "lora.r=2"]);
    args.extend(common);
    let run = audiocap(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    for expected in [
        "4 problems",
        "- epochs:",
        "- colour:",
        "- --set lora.r=2:",
        "- peak_lr: -1",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }

    // No file: overrides over the defaults; --check prints them all.
    let mut args = vec![
        "pretrain",
        "encoder",
        "--set",
        "batch_size=3",
        "--set",
        "mixup=0.5",
    ];
    args.extend(common);
    let run = audiocap(&args);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("batch_size = 3") && stdout.contains("mixup = 0.5"),
        "{stdout}"
    );
    assert!(stdout.contains("encoder_layers = 3"), "{stdout}");
}
