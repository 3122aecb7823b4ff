//! `audiocap run` end to end on the fixture model: every pipeline file validates;
//! a folder with good and bad inputs becomes a dataset with one row per segment and
//! a specific error for each bad input; re-runs resume; kill -9 at random points
//! loses and duplicates nothing; shards partition the inputs.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use arrow_array::{Array, StringArray, UInt32Array};
use audiocap::pipeline::PipelineConfig;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::azurite::Azurite;
use crate::common::fixtures;
use crate::common::gcs::FakeGcs;
use crate::common::s3::MotoServer;
use crate::common::servers::TestStore;

/// The fixture model (BEATs-tiny + Llama-tiny + adapter a0), exported once.
pub fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        crate::common::export_per_process("audiocap-pipeline-model-", crate::common::export_tiny_a0)
    })
}

pub(crate) fn run(pipeline: &Path, sets: &[String]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audiocap"));
    cmd.arg("run").arg(pipeline);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env("RUST_LOG", "warn")
        .output()
        .expect("running audiocap run")
}

/// A pipeline file for `audio` → `out` on the tiny model, fast settings.
pub(crate) fn write_pipeline(dir: &Path, audio: &Path, out: &str) -> PathBuf {
    write_pipeline_of(dir, &[audio.display().to_string()], out)
}

/// [`write_pipeline`] for several sources, listed in this order.
fn write_pipeline_of(dir: &Path, sources: &[String], out: &str) -> PathBuf {
    write_pipeline_with(dir, sources, out, "")
}

/// [`write_pipeline_of`] with these lines in its `[storage]` section.
fn write_pipeline_with(dir: &Path, sources: &[String], out: &str, storage: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
[input]
sources = {sources:?}
[segments]
max_seconds = 5.0
window_seconds = 3.0
hop_seconds = 3.0
min_last_seconds = 0.5
[batching]
batch_size = 2
[generation]
max_new_tokens = 4
[workers]
decode_threads = 2
fetch_concurrency = 4
[output]
uri = "{out}"
commit_interval_seconds = 0.2
[logging]
progress = "off"
[storage]
{storage}"#,
        model = tiny_model().display(),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// (uri, segment, caption, error) of every row in every part under `dir`.
pub fn read_dataset(dir: &Path) -> Vec<(String, u32, Option<String>, Option<String>)> {
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return rows;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("parquet") {
            continue;
        }
        let file = std::fs::File::open(&path).unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let col = |name: &str| batch.column_by_name(name).unwrap().clone();
            let uri = col("uri");
            let uri = uri.as_any().downcast_ref::<StringArray>().unwrap();
            let seg = col("segment_index");
            let seg = seg.as_any().downcast_ref::<UInt32Array>().unwrap();
            let cap = col("caption");
            let cap = cap.as_any().downcast_ref::<StringArray>().unwrap();
            let err = col("error");
            let err = err.as_any().downcast_ref::<StringArray>().unwrap();
            for i in 0..batch.num_rows() {
                rows.push((
                    uri.value(i).to_string(),
                    seg.value(i),
                    cap.is_valid(i).then(|| cap.value(i).to_string()),
                    err.is_valid(i).then(|| err.value(i).to_string()),
                ));
            }
        }
    }
    rows
}

/// 16-bit PCM WAV bytes.
fn wav(rate: u32, channels: u16, samples: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = samples
        .iter()
        .flat_map(|&s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
        .collect();
    wav_bytes(1, 16, rate, channels, &data)
}

/// 32-bit float WAV bytes.
fn wav_f32(rate: u32, samples: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    wav_bytes(3, 32, rate, 1, &data)
}

/// A canonical WAV file: `format` 1 = integer PCM, 3 = IEEE float.
fn wav_bytes(format: u16, bits: u16, rate: u32, channels: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits / 8;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.wrapping_mul(u32::from(block)).to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn tone(rate: u32, seconds: f64, hz: f32) -> Vec<f32> {
    (0..(f64::from(rate) * seconds) as usize)
        .map(|i| 0.3 * (i as f32 * 2.0 * std::f32::consts::PI * hz / rate as f32).sin())
        .collect()
}

/// `n` short distinct clips in `dir`.
fn clips(dir: &Path, n: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let path = dir.join(format!("clip_{i:03}.wav"));
            std::fs::write(
                &path,
                wav(16_000, 1, &tone(16_000, 1.0, 200.0 + 37.0 * i as f32)),
            )
            .unwrap();
            std::fs::canonicalize(&path).unwrap().display().to_string()
        })
        .collect()
}

#[test]
fn every_pipeline_file_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("train-") {
            // Training files (`audiocap train`).
            audiocap::train::config::TrainConfig::load(&path, &[])
                .unwrap_or_else(|e| panic!("{e}"));
        } else if name.starts_with("pretrain-encoder") {
            audiocap::train::tagger::TaggerSettings::load(Some(&path), &[])
                .unwrap_or_else(|e| panic!("{e}"));
        } else if name.starts_with("pretrain-decoder") {
            audiocap::train::lm::LmSettings::load(Some(&path), &[])
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            PipelineConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
        seen += 1;
    }
    assert!(
        seen >= 5,
        "demo, s3-archive, long-recordings and two training files at least"
    );
}

#[test]
fn a_bad_pipeline_lists_every_problem_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[model]\npath = \"m\"\nspeed = 3\n[batching]\nbatch_size = \"big\"\n[input]\nsources = [\"x\"]\n[output]\nuri = \"o\"\n",
    )
    .unwrap();
    let out = run(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("2 problems"), "{stderr}");
    assert!(stderr.contains("model.speed"), "{stderr}");
    assert!(stderr.contains("batching.batch_size"), "{stderr}");

    // Key, type and value problems in one pass: an unknown key, a wrong type, no
    // model path, a bad URL and a negative batch size.
    std::fs::write(
        &path,
        "[model]
speed = 3
[workers]
fetch_concurrency = \"many\"
[batching]
batch_size = -1
[input]
sources = [\"x\"]
[output]
uri = \"s4://bucket/out/\"
",
    )
    .unwrap();
    let out = run(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("5 problems"), "{stderr}");
    for at in [
        "model.speed",
        "workers.fetch_concurrency",
        "model.path",
        "output.uri",
        "batching.batch_size",
    ] {
        assert!(stderr.contains(at), "{at} missing: {stderr}");
    }

    // `--check` looks at the model too.
    let good = write_pipeline(dir.path(), dir.path(), "out");
    let check = |sets: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audiocap"));
        cmd.arg("run").arg(&good).arg("--check");
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.output().unwrap()
    };
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let missing = dir.path().join("no-model");
    let out = check(&[&format!("model.path={}", missing.display())]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("model.path") && text(&out).contains("model.json"),
        "{}",
        text(&out)
    );
}

/// A model exported with fused attention runs the pipeline with continuous
/// batching (clips joining decoder rows as others finish, out of batch order) and
/// writes the captions the eager export writes, one row per segment, resuming
/// nothing twice.
#[test]
fn continuous_batching_writes_the_captions_of_fixed_batches() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    clips(&audio, 9);
    let f = fixtures();
    std::fs::write(
        audio.join("long.wav"),
        wav(16_000, 1, &tone(16_000, 7.0, 300.0)),
    )
    .unwrap();
    std::fs::write(audio.join("not_audio.wav"), b"not a wav").unwrap();
    let fused = dir.path().join("fused-model");
    crate::common::export_tiny_with(
        &fused,
        &f.join("e2e-tiny/projector.safetensors"),
        &f.join("e2e-tiny/adapters/a0"),
        "tiny-a0-fused",
        &["--attention", "fused"],
    );
    let captions = |model: &Path, out: &str, sets: &[&str]| {
        let out_dir = dir.path().join(out);
        let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());
        let mut all = vec![format!("model.path=\"{}\"", model.display())];
        all.extend(sets.iter().map(|s| s.to_string()));
        let result = run(&pipeline, &all);
        assert_eq!(
            result.status.code(),
            Some(3),
            "one input is not audio: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        // The summary tells whether the encoder had a thread of its own.
        let threaded = String::from_utf8_lossy(&result.stdout).contains("encoder thread");
        assert_eq!(
            threaded,
            sets.contains(&"batching.encoder_thread=true"),
            "{out}: {}",
            String::from_utf8_lossy(&result.stdout)
        );
        let mut rows = read_dataset(&out_dir);
        rows.sort();
        rows
    };
    let eager = captions(tiny_model(), "eager", &[]);
    // 3 decoder rows fed by batches of 2: joins land in whichever rows are free.
    let continuous = captions(&fused, "continuous", &["batching.decoder_rows=3"]);
    assert_eq!(eager.len(), 9 + 3 + 1, "{eager:?}");
    assert_eq!(continuous, eager);
    assert!(continuous.iter().filter(|r| r.2.is_some()).count() == 12);
    // The encoder on a thread of its own (what CUDA runs), handing its batches over
    // in device memory: the same rows.
    let threaded = captions(
        &fused,
        "encoder-thread",
        &["batching.decoder_rows=3", "batching.encoder_thread=true"],
    );
    assert_eq!(threaded, eager);
}

#[test]
fn good_and_bad_inputs_become_one_row_each_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    std::fs::create_dir_all(audio.join("nested")).unwrap();
    let f = fixtures();
    for clip in ["sine_1s.wav", "chirp_2p5s.wav"] {
        std::fs::copy(f.join("e2e-tiny/audio").join(clip), audio.join(clip)).unwrap();
    }
    std::fs::write(
        audio.join("nested/stereo_44k.wav"),
        wav(44_100, 2, &tone(88_200, 1.0, 440.0)),
    )
    .unwrap();
    std::fs::write(
        audio.join("long.wav"),
        wav(16_000, 1, &tone(16_000, 7.0, 300.0)),
    )
    .unwrap();
    std::fs::write(audio.join("short.wav"), wav(16_000, 1, &[0.1; 800])).unwrap();
    std::fs::write(
        audio.join("not_audio.wav"),
        b"this is not a wav file at all",
    )
    .unwrap();
    std::fs::write(audio.join("empty.flac"), b"").unwrap();
    let mut truncated = wav(16_000, 1, &tone(16_000, 1.0, 500.0));
    truncated.truncate(30);
    std::fs::write(audio.join("truncated.wav"), truncated).unwrap();
    let mut nan = tone(16_000, 1.0, 500.0);
    nan[4000] = f32::NAN;
    std::fs::write(audio.join("nan.wav"), wav_f32(16_000, &nan)).unwrap();
    let pcm: Vec<u8> = vec![0; 32_000];
    std::fs::write(
        audio.join("absurd_rate.wav"),
        wav_bytes(1, 16, 5_000_000, 1, &pcm),
    )
    .unwrap();
    // Real encoded files: every codec end to end (Opus included), 8 channels.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/audio");
    for name in [
        "tone.mp3",
        "tone.ogg",
        "tone_aac.m4a",
        "tone.flac",
        "tone_8ch.flac",
        "tone_opus.ogg",
    ] {
        std::fs::copy(data.join(name), audio.join(name)).unwrap();
    }
    // A manifest naming a file that does not exist.
    let manifest = dir.path().join("manifest.csv");
    let missing = dir.path().join("gone/missing.wav");
    std::fs::write(&manifest, format!("uri\n{}\n", missing.display())).unwrap();

    let out_dir = dir.path().join("captions");
    let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());
    let out = run(
        &pipeline,
        &[format!("input.manifests=[\"{}\"]", manifest.display())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "some inputs failed: {stdout}\n{stderr}"
    );

    let rows = read_dataset(&out_dir);
    let by_name: BTreeMap<String, Vec<_>> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
        let name = Path::new(&r.0)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        m.entry(name).or_insert_with(Vec::new).push(r.clone());
        m
    });
    let names: Vec<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "absurd_rate.wav",
            "chirp_2p5s.wav",
            "empty.flac",
            "long.wav",
            "missing.wav",
            "nan.wav",
            "not_audio.wav",
            "short.wav",
            "sine_1s.wav",
            "stereo_44k.wav",
            "tone.flac",
            "tone.mp3",
            "tone.ogg",
            "tone_8ch.flac",
            "tone_aac.m4a",
            "tone_opus.ogg",
            "truncated.wav"
        ],
        "{stdout}"
    );
    let captioned = |name: &str| by_name[name].iter().all(|r| r.2.is_some() && r.3.is_none());
    for name in [
        "sine_1s.wav",
        "chirp_2p5s.wav",
        "stereo_44k.wav",
        "tone.mp3",
        "tone.ogg",
        "tone_aac.m4a",
        "tone.flac",
        "tone_8ch.flac",
        "tone_opus.ogg",
    ] {
        assert!(captioned(name), "{name}: {:?}", by_name[name]);
    }
    // 7 s with 3 s windows: 0-3, 3-6, 6-7.
    assert_eq!(by_name["long.wav"].len(), 3);
    assert!(captioned("long.wav"));
    let error = |name: &str| by_name[name][0].3.clone().unwrap_or_default();
    assert!(
        error("short.wav").starts_with("too short"),
        "{}",
        error("short.wav")
    );
    assert!(
        error("not_audio.wav").contains("not a recognised audio file"),
        "{}",
        error("not_audio.wav")
    );
    assert!(
        error("empty.flac").contains("empty"),
        "{}",
        error("empty.flac")
    );
    assert!(
        error("truncated.wav").contains("truncated"),
        "{}",
        error("truncated.wav")
    );
    assert!(stdout.contains("failed inputs:"), "{stdout}");

    // A reader that knows nothing of audiocap sees the same table.
    let query = format!(
        "import duckdb; print(duckdb.sql(\"select count(*), count(distinct uri) from \
         read_parquet('{}/*.parquet')\").fetchall()[0])",
        out_dir.display()
    );
    let duck = Command::new("python3")
        .args(["-c", &query])
        .output()
        .unwrap();
    assert!(
        duck.status.success(),
        "DuckDB could not read the dataset (pip install duckdb): {}",
        String::from_utf8_lossy(&duck.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&duck.stdout).trim(),
        format!("({}, 17)", rows.len())
    );

    // The same pipeline again: everything is in the dataset already. The failures
    // are the shard's still (committed by the first run), so the exit code stays 3
    // and the summary counts them.
    let out = run(
        &pipeline,
        &[format!("input.manifests=[\"{}\"]", manifest.display())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("17 already in the dataset"), "{stdout}");
    assert!(stdout.contains("shard so far: 17 inputs, "), "{stdout}");
    assert!(
        stderr.contains("of the shard's 17 inputs failed"),
        "{stderr}"
    );
    assert_eq!(read_dataset(&out_dir).len(), rows.len());

    // Commit records: one per run of the shard, beside the parts.
    let records = std::fs::read_dir(out_dir.join("_commits/shard-00000-of-00001"))
        .unwrap()
        .count();
    assert_eq!(records, 2);

    // Two of the failed inputs are mended; `--retry-failed` captions every failed
    // input again and each keeps only its newest rows: the mended ones captioned,
    // the rest failing as before, nothing duplicated for any reader.
    std::fs::write(
        audio.join("not_audio.wav"),
        wav(16_000, 1, &tone(16_000, 1.0, 700.0)),
    )
    .unwrap();
    std::fs::create_dir_all(missing.parent().unwrap()).unwrap();
    std::fs::write(&missing, wav(16_000, 1, &tone(16_000, 1.0, 900.0))).unwrap();
    let failed_before = rows.iter().filter(|r| r.3.is_some()).count();
    let out = Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .arg("run")
        .arg(&pipeline)
        .arg("--retry-failed")
        .args([
            "--set",
            &format!("input.manifests=[\"{}\"]", manifest.display()),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    let retried = stdout
        .lines()
        .find(|l| l.starts_with("retried: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let failed_inputs = by_name
        .values()
        .filter(|rows| rows.iter().any(|r| r.3.is_some()));
    let failed_inputs = failed_inputs.count();
    assert!(
        retried.starts_with(&format!("retried: {failed_inputs} failed input(s)")),
        "{retried}"
    );
    assert!(
        stdout.contains(&format!(
            "{failed_inputs} taken, {} already in the dataset",
            17 - failed_inputs
        )),
        "{stdout}"
    );
    let after = read_dataset(&out_dir);
    let mut keys: Vec<(String, u32)> = after.iter().map(|r| (r.0.clone(), r.1)).collect();
    keys.sort();
    let before_dedup = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), before_dedup, "a row appears twice: {after:?}");
    let mended = |name: &str| {
        let rows: Vec<_> = after.iter().filter(|r| r.0.ends_with(name)).collect();
        assert_eq!(rows.len(), 1, "{name}: {rows:?}");
        rows[0].2.is_some() && rows[0].3.is_none()
    };
    assert!(mended("/not_audio.wav") && mended("/missing.wav"));
    assert_eq!(
        after.iter().filter(|r| r.3.is_some()).count(),
        failed_before - 2
    );
    assert_eq!(after.len(), rows.len());
    let duck = Command::new("python3")
        .args([
            "-c",
            &query.replace(
                "count(distinct uri)",
                "count(distinct (uri, segment_index)), count(distinct uri)",
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&duck.stdout).trim(),
        format!("({0}, {0}, 17)", after.len())
    );
    let out = dataset_cli("finalize", &out_dir, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rows"], after.len() as u64);
    assert_eq!(manifest["error_rows"], (failed_before - 2) as u64);
}

/// `audiocap run` in the background with batches of one (many small commits).
fn spawn_one_at_a_time(pipeline: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .args([
            "run",
            pipeline.to_str().unwrap(),
            "--set",
            "batching.batch_size=1",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_at_random_points_then_finish_gives_every_input_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    let expected: HashSet<String> = clips(&audio, 36).into_iter().collect();
    let out_dir = dir.path().join("captions");
    let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());
    // A fixed sequence of kill delays (ms), varied enough to land in the model
    // load, mid-batch, mid-commit and between parts.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for round in 0..6 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = 300 + state % 2200;
        let mut child = spawn_one_at_a_time(&pipeline);
        std::thread::sleep(Duration::from_millis(delay));
        // SIGKILL: no chance to clean up.
        let _ = child.kill();
        let _ = child.wait();
        let rows = read_dataset(&out_dir);
        let uris: Vec<&String> = rows.iter().map(|r| &r.0).collect();
        let unique: HashSet<&String> = uris.iter().copied().collect();
        assert_eq!(
            uris.len(),
            unique.len(),
            "duplicates after kill {round} at {delay} ms"
        );
    }
    let out = run(&pipeline, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = read_dataset(&out_dir);
    let got: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let unique: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), expected.len(), "every input exactly once");
    assert_eq!(unique, expected);
    assert!(rows.iter().all(|r| r.2.is_some()));
}

#[test]
fn shards_partition_the_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    let expected: HashSet<String> = clips(&audio, 24).into_iter().collect();
    let out_dir = dir.path().join("captions");
    let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());
    let mut per_shard = Vec::new();
    for index in 0..3 {
        if index == 2 {
            // Two of three shards committed: not complete, nothing finalized.
            let status = dataset_cli("status", &pipeline, &[]);
            assert_eq!(status.status.code(), Some(4), "{}", text(&status));
            assert!(
                text(&status).contains("3 shards: 2 committed, 0 in progress, 1 missing"),
                "{}",
                text(&status)
            );
            let finalize = dataset_cli("finalize", &pipeline, &[]);
            assert_eq!(finalize.status.code(), Some(4), "{}", text(&finalize));
            assert!(!out_dir.join("_SUCCESS").exists());
        }
        let out = Command::new(env!("CARGO_BIN_EXE_audiocap"))
            .args(["run", pipeline.to_str().unwrap(), "--shard-count", "3"])
            // Kubernetes Indexed Job style: the index comes from the environment.
            .env("JOB_COMPLETION_INDEX", index.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        per_shard.push(read_dataset(&out_dir).len());
    }
    let rows = read_dataset(&out_dir);
    let got: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(got.len(), 24);
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), expected);
    // Each shard added some of them (24 inputs over 3 shards by hash: all missing one shard has odds (2/3)^24).
    assert!(
        per_shard[0] > 0 && per_shard[1] > per_shard[0] && per_shard[2] > per_shard[1],
        "{per_shard:?}"
    );

    // All committed: status exit 0, finalize writes the manifest then _SUCCESS, and a
    // second finalize (by URI this time) changes nothing.
    let status = dataset_cli("status", &pipeline, &["--json"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["complete"], true);
    assert_eq!(json["rows"], 24);
    let finalize = dataset_cli("finalize", &pipeline, &[]);
    assert_eq!(finalize.status.code(), Some(0), "{}", text(&finalize));
    assert!(
        text(&finalize).contains("finalized: 3 shards"),
        "{}",
        text(&finalize)
    );
    let manifest = std::fs::read(out_dir.join("_manifest.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(parsed["rows"], 24);
    let mut listed: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    listed.sort();
    let named: Vec<String> = parsed["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(named, listed);
    let again = dataset_cli("finalize", out_dir.as_path(), &[]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        text(&again).contains("already finalized"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::read(out_dir.join("_manifest.json")).unwrap(),
        manifest
    );
}

/// A manifest listing the same files in another order shards them exactly as the
/// folder listing does: the shard of an input is a function of its URI alone
/// (`audiocap::storage::shard_of`), whatever lists it and in which order.
#[test]
fn shards_of_a_manifest_match_the_folder_listing_and_the_documented_hash() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    let mut files = clips(&audio, 16);
    files.reverse();
    let manifest = dir.path().join("inputs.csv");
    std::fs::write(&manifest, format!("path\n{}\n", files.join("\n"))).unwrap();
    let per_shard = |out: &str, sets: &[String]| -> Vec<HashSet<String>> {
        let out_dir = dir.path().join(out);
        let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());
        let mut seen: HashSet<String> = HashSet::new();
        let mut shards = Vec::new();
        for index in 0..2 {
            let mut args = sets.to_vec();
            args.push(format!("run.shard_index={index}"));
            args.push("run.shard_count=2".into());
            let result = run(&pipeline, &args);
            assert_eq!(result.status.code(), Some(0), "{}", text(&result));
            let now: HashSet<String> = read_dataset(&out_dir).into_iter().map(|r| r.0).collect();
            shards.push(now.difference(&seen).cloned().collect::<HashSet<_>>());
            seen = now;
        }
        shards
    };
    let by_folder = per_shard("by-folder", &[]);
    let by_manifest = per_shard(
        "by-manifest",
        &[
            "input.sources=[]".into(),
            format!("input.manifests=[{:?}]", manifest.display().to_string()),
        ],
    );
    assert_eq!(by_folder, by_manifest);
    for (index, shard) in by_folder.iter().enumerate() {
        assert!(!shard.is_empty());
        for uri in shard {
            assert_eq!(audiocap::storage::shard_of(uri, 2), index as u32, "{uri}");
        }
    }
    assert_eq!(by_folder[0].len() + by_folder[1].len(), 16);
}

/// `audiocap status|finalize TARGET ARGS...`.
fn dataset_cli(command: &str, target: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .arg(command)
        .arg(target)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// (uri, caption, error) of every row of the dataset under `prefix` in `store`.
async fn read_remote_dataset(
    store: &dyn object_store::ObjectStore,
    prefix: &str,
) -> Vec<(String, Option<String>, Option<String>)> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let prefix = object_store::path::Path::from(prefix);
    let listed = store.list_with_delimiter(Some(&prefix)).await.unwrap();
    let mut rows = Vec::new();
    for meta in listed.objects {
        if !meta.location.as_ref().ends_with(".parquet") {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let strings = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let (uri, cap, err) = (strings("uri"), strings("caption"), strings("error"));
            for i in 0..batch.num_rows() {
                rows.push((
                    uri.value(i).to_string(),
                    cap.is_valid(i).then(|| cap.value(i).to_string()),
                    err.is_valid(i).then(|| err.value(i).to_string()),
                ));
            }
        }
    }
    // Nothing but parts and the commit records.
    let all: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    for meta in all {
        let key = meta.location.as_ref().to_string();
        assert!(
            key.ends_with(".parquet")
                || key.contains("/_commits/")
                || key.ends_with("/_manifest.json")
                || key.ends_with("/_SUCCESS"),
            "unexpected object {key}"
        );
    }
    rows
}

/// Inputs from `server`'s bucket (good clips, a broken one, a file that is not
/// audio) captioned into a dataset in the same bucket (locally where the emulator
/// cannot hold one: GCS), then run again: everything is committed, nothing added.
fn store_in_and_out_with_resume(server: &dyn TestStore) {
    let f = fixtures();
    for c in ["sine_1s.wav", "chirp_2p5s.wav", "noise_0p3s.wav"] {
        let bytes = std::fs::read(f.join("e2e-tiny/audio").join(c)).unwrap();
        server.put(&format!("audio/clips/{c}"), bytes);
    }
    server.put("audio/broken.wav", b"RIFF....WAVEjunk".to_vec());
    server.put("audio/readme.txt", b"not listed: not audio".to_vec());

    let dir = tempfile::tempdir().unwrap();
    let base = server.base();
    let local_out = dir.path().join("captions");
    let out = match server.holds_datasets() {
        true => format!("{base}/captions/"),
        false => local_out.display().to_string(),
    };
    let pipeline = write_pipeline_with(
        dir.path(),
        &[format!("{base}/audio/")],
        &out,
        &server.storage_toml(),
    );
    let go_with = |flags: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audiocap"));
        cmd.arg("run")
            .arg(&pipeline)
            .args(flags)
            .env("RUST_LOG", "warn")
            .envs(server.env());
        cmd.output().unwrap()
    };
    let go = || go_with(&[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rows = || match server.holds_datasets() {
        true => runtime.block_on(read_remote_dataset(server.store().as_ref(), "captions")),
        false => read_dataset(&local_out)
            .into_iter()
            .map(|(uri, _, caption, error)| (uri, caption, error))
            .collect(),
    };
    let out = go();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let first = rows();
    let mut uris: Vec<String> = first.iter().map(|r| r.0.clone()).collect();
    uris.sort();
    assert_eq!(
        uris,
        [
            format!("{base}/audio/broken.wav"),
            format!("{base}/audio/clips/chirp_2p5s.wav"),
            format!("{base}/audio/clips/noise_0p3s.wav"),
            format!("{base}/audio/clips/sine_1s.wav"),
        ]
    );
    for (uri, caption, error) in &first {
        assert_eq!(
            uri.ends_with("broken.wav"),
            error.is_some(),
            "{uri}: {error:?}"
        );
        assert_eq!(caption.is_some(), error.is_none());
    }

    // Again: everything is committed, nothing is added; broken.wav's error row is
    // the shard's still, so the exit code stays 3.
    let out = go();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(stdout.contains("4 already in the dataset"), "{stdout}");
    assert!(
        stdout.contains("shard so far: 4 inputs, 1 failed, 1 error rows ("),
        "{stdout}"
    );
    assert_eq!(rows().len(), first.len());

    // broken.wav mended, then `--retry-failed`: its error row is replaced by a
    // caption in the store itself; every input has one row; exit 0.
    let mended = std::fs::read(f.join("e2e-tiny/audio/sine_1s.wav")).unwrap();
    server.put("audio/broken.wav", mended);
    let out = go_with(&["--retry-failed"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout.contains("retried: 1 failed input(s)"), "{stdout}");
    assert!(
        stdout.contains("shard so far: 4 inputs, 0 failed, 0 error rows"),
        "{stdout}"
    );
    let last = rows();
    assert_eq!(last.len(), first.len(), "{last:?}");
    assert!(
        last.iter().all(|r| r.1.is_some() && r.2.is_none()),
        "{last:?}"
    );
}

#[test]
fn s3_in_and_out_with_resume() {
    store_in_and_out_with_resume(&MotoServer::start("archive"));
}

#[test]
fn gcs_in_and_local_out_with_resume() {
    store_in_and_out_with_resume(&FakeGcs::start("archive"));
}

#[test]
fn azure_in_and_out_with_resume() {
    store_in_and_out_with_resume(&Azurite::start("archive"));
}

/// Issue #9's scale-out check on a local store emulator: three shard processes at
/// once (Kubernetes Indexed Job style, `JOB_COMPLETION_INDEX`), one killed with
/// SIGKILL after its first committed part, then restarted; `status` and `finalize`
/// by URI see every input exactly once in one consistent dataset. Shard 1's last
/// input comes from the test's HTTP server, which holds it: the kill lands while
/// that shard is mid-run however fast the machine is. `clip_count` inputs in all.
fn concurrent_shards_one_killed_and_restarted_then_finalized(
    server: &dyn TestStore,
    clip_count: usize,
) {
    let store = server.store();
    let base = server.base();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local_audio = dir.path().join("audio");
    let names = clips(&local_audio, clip_count);
    let mut expected = HashSet::new();
    for path in &names {
        let name = Path::new(path).file_name().unwrap().to_str().unwrap();
        let key = format!("audio/{name}");
        server.put(&key, std::fs::read(path).unwrap());
        expected.insert(format!("{base}/{key}"));
    }
    // An input of shard 1's that the run cannot finish until the test says so.
    let gate = crate::common::gate::GateServer::start();
    let held = (0..)
        .map(|k| format!("held-{k}.wav"))
        .find(|name| audiocap::storage::shard_of(&gate.url(name), 3) == 1)
        .unwrap();
    gate.put(&held, wav(16_000, 1, &tone(16_000, 1.0, 150.0)));
    gate.hold(&held);
    expected.insert(gate.url(&held));
    let pipeline = write_pipeline_with(
        dir.path(),
        &[format!("{base}/audio/"), gate.url(&held)],
        &format!("{base}/captions/"),
        &server.storage_toml(),
    );
    let shard = |index: u32| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audiocap"));
        cmd.args([
            "run",
            pipeline.to_str().unwrap(),
            "--shard-count",
            "3",
            "--set",
            "batching.batch_size=1",
        ])
        .env("JOB_COMPLETION_INDEX", index.to_string())
        .env("RUST_LOG", "warn")
        .envs(server.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let objects = |prefix: &str| {
        use futures::TryStreamExt;
        runtime.block_on(async {
            let listed: Vec<_> = store
                .list(Some(&prefix.into()))
                .try_collect()
                .await
                .unwrap();
            listed
                .into_iter()
                .map(|m| m.location.to_string())
                .collect::<Vec<String>>()
        })
    };
    let mut children: Vec<Option<std::process::Child>> = (0..3).map(|i| Some(shard(i))).collect();
    // Kill shard 1 once it has committed a part and waits at the held input (so
    // before its commit record).
    gate.wait_for_held(1, Duration::from_secs(300), || {
        crate::common::gate::still_running(children[1].as_mut().unwrap())
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !objects("captions")
        .iter()
        .any(|k| k.contains("/part-00001-of-00003-"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1 never committed a part"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut killed = children[1].take().unwrap();
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(
        !objects("captions/_commits/shard-00001-of-00003")
            .iter()
            .any(|k| k.ends_with(".json")),
        "shard 1 finished before the kill: the test did not kill it mid-run"
    );
    for i in [0, 2] {
        let out = children[i].take().unwrap().wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "shard {i}: {}", text(&out));
    }

    let dataset = |command: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audiocap"));
        cmd.args([command, &format!("{base}/captions/"), "--json"])
            .env("RUST_LOG", "warn")
            .envs(server.env());
        cmd.output().unwrap()
    };
    let status = dataset("status");
    assert_eq!(status.status.code(), Some(4), "{}", text(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let shard_states: Vec<&str> = json["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(shard_states, ["committed", "in_progress", "committed"]);

    // The restarted shard resumes its own parts and commits.
    gate.release();
    let out = shard(1).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let finalize = dataset("finalize");
    assert_eq!(finalize.status.code(), Some(0), "{}", text(&finalize));
    let manifest: serde_json::Value = serde_json::from_slice(&finalize.stdout).unwrap();
    assert_eq!(manifest["outcome"], "finalized");

    let rows = runtime.block_on(read_remote_dataset(store.as_ref(), "captions"));
    let uris: Vec<&String> = rows.iter().map(|r| &r.0).collect();
    let unique: HashSet<String> = uris.iter().map(|u| u.to_string()).collect();
    assert_eq!(uris.len(), unique.len(), "an input written twice");
    assert_eq!(unique, expected, "every input exactly once");
    assert_eq!(manifest["rows"], rows.len());
    let mut parts: Vec<String> = objects("captions")
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .map(|k| k.trim_start_matches("captions/").to_string())
        .collect();
    parts.sort();
    let named: Vec<&str> = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(named, parts);
    assert!(objects("captions").iter().any(|k| k == "captions/_SUCCESS"));
}

#[test]
fn concurrent_shards_on_s3_one_killed_and_restarted_then_finalized() {
    concurrent_shards_one_killed_and_restarted_then_finalized(&MotoServer::start("archive"), 36);
}

/// The same on Azurite, with fewer clips: the kill and the restart are what it checks.
#[test]
fn concurrent_shards_on_azure_one_killed_and_restarted_then_finalized() {
    concurrent_shards_one_killed_and_restarted_then_finalized(&Azurite::start("archive"), 12);
}

/// The run is held at a known point, not raced: its one fetch worker waits at an
/// input the test's HTTP server holds, after the inputs before it are committed.
/// SIGTERM lands there; the test lets the input through only once the run has said
/// it is stopping, so what the run still takes is what was in flight (the held
/// input and the fetch queue), whatever the machine's speed.
#[test]
fn sigterm_commits_what_is_in_flight_and_the_next_run_finishes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let before = clips(&dir.path().join("audio/before"), 3);
    let after = clips(&dir.path().join("audio/after"), 36);
    let gate = crate::common::gate::GateServer::start();
    gate.put("held.wav", wav(16_000, 1, &tone(16_000, 1.0, 150.0)));
    gate.hold("held.wav");
    let expected: HashSet<String> = before
        .iter()
        .chain(&after)
        .cloned()
        .chain([gate.url("held.wav")])
        .collect();
    let out_dir = dir.path().join("captions");
    let sources = [
        dir.path().join("audio/before").display().to_string(),
        gate.url("held.wav"),
        dir.path().join("audio/after").display().to_string(),
    ];
    let pipeline = write_pipeline_of(dir.path(), &sources, out_dir.to_str().unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .args(["run", pipeline.to_str().unwrap()])
        .args(["--set", "batching.batch_size=1"])
        .args(["--set", "workers.fetch_concurrency=1"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });

    // The run is at the held input, and what came before it is committed.
    gate.wait_for_held(1, Duration::from_secs(300), || {
        crate::common::gate::still_running(&mut child)
    });
    let waited = std::time::Instant::now();
    while read_dataset(&out_dir).len() < before.len() {
        assert!(
            waited.elapsed() < Duration::from_secs(300),
            "the inputs before the held one were never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut logged = Vec::new();
    loop {
        let line = line_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the run never said it was stopping");
        let stopping = line.contains("stop requested");
        logged.push(line);
        if stopping {
            break;
        }
    }
    gate.release();
    let out = child.wait_with_output().unwrap();
    stderr_reader.join().unwrap();
    logged.extend(line_rx.try_iter());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        logged.join("\n")
    );
    assert!(stdout.contains("stopped early"), "{stdout}");
    let first = read_dataset(&out_dir);
    // In flight at the signal: the held input, the fetch queue (2) and the one
    // the listing was handing over; never the rest.
    assert!(
        (before.len() + 1..=before.len() + 4).contains(&first.len()),
        "rows after the stop: {}",
        first.len()
    );
    let uris: HashSet<&String> = first.iter().map(|r| &r.0).collect();
    assert_eq!(uris.len(), first.len(), "no duplicates");
    assert!(uris.contains(&gate.url("held.wav")));

    let out = run(&pipeline, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = read_dataset(&out_dir);
    assert_eq!(rows.len(), expected.len());
    // Every input captioned, the one over HTTP too.
    assert!(
        rows.iter().all(|r| r.2.is_some() && r.3.is_none()),
        "{rows:?}"
    );
    assert_eq!(
        rows.into_iter().map(|r| r.0).collect::<HashSet<_>>(),
        expected
    );
}

/// Issue #21: an outage is retried, never committed as an input's failure. One
/// input's server answers 503 (the client's own retries kept short, so the fetch
/// stage's are what carries it): healed within the budget, the input is captioned;
/// failing past it, the run exits 1 without committing that input or its shard,
/// and the next run captions it, every input exactly once.
#[test]
fn an_outage_is_retried_and_never_committed_as_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    let local = clips(&audio, 4);
    let gate = crate::common::gate::GateServer::start();
    gate.put("flaky.wav", wav(16_000, 1, &tone(16_000, 1.0, 150.0)));
    let expected: HashSet<String> = local
        .iter()
        .cloned()
        .chain([gate.url("flaky.wav")])
        .collect();
    let sources = [audio.display().to_string(), gate.url("flaky.wav")];
    let short_client_retries = [
        "storage.max_retries=1".to_string(),
        "storage.retry_timeout_secs=1".to_string(),
    ];
    let spawn = |out: &Path, budget: &str| {
        let pipeline = write_pipeline_of(dir.path(), &sources, out.to_str().unwrap());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audiocap"));
        cmd.arg("run").arg(&pipeline);
        for s in short_client_retries
            .iter()
            .cloned()
            .chain([format!("run.transient_retry_seconds={budget}")])
        {
            cmd.arg("--set").arg(s);
        }
        cmd.env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let captioned = |out: &Path| {
        let rows = read_dataset(out);
        assert!(
            rows.iter().all(|r| r.2.is_some() && r.3.is_none()),
            "an error row: {rows:?}"
        );
        rows.into_iter().map(|r| r.0).collect::<Vec<_>>()
    };

    // An outage that ends within the budget: the run waits it out.
    let healed = dir.path().join("healed");
    gate.fail("flaky.wav");
    let mut child = spawn(&healed, "300");
    gate.wait_for_requests("flaky.wav", 6, Duration::from_secs(300), || {
        crate::common::gate::still_running(&mut child)
    });
    gate.heal();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let uris = captioned(&healed);
    assert_eq!(uris.len(), expected.len());
    assert_eq!(uris.into_iter().collect::<HashSet<_>>(), expected);

    // An outage longer than the budget: nothing committed for the input, nor the shard.
    let lost = dir.path().join("lost");
    gate.fail("flaky.wav");
    let out = spawn(&lost, "1").wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("storage kept failing"),
        "{}",
        text(&out)
    );
    let uris = captioned(&lost);
    assert_eq!(
        uris.iter().cloned().collect::<HashSet<_>>(),
        local.iter().cloned().collect::<HashSet<_>>(),
        "the local inputs are committed, the failing one is not"
    );
    let status = dataset_cli("status", &lost, &[]);
    assert_eq!(status.status.code(), Some(4), "{}", text(&status));
    gate.heal();
    let out = spawn(&lost, "300").wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let uris = captioned(&lost);
    assert_eq!(uris.len(), expected.len(), "every input exactly once");
    assert_eq!(uris.into_iter().collect::<HashSet<_>>(), expected);
}

/// Issue #21: a half-copied model is refused before any work, with the file named;
/// a verified copy is hashed once (size and modification time remembered), and a
/// file changed after that is hashed, and refused, again.
#[test]
fn a_changed_model_file_is_refused_and_verified_files_are_hashed_once() {
    use audiocap::manifest::ModelManifest;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let manifest = ModelManifest::read(&model).unwrap();
    let cache = dir.path().join("home/verified-model-files.json");
    let files = manifest.verify_with_cache(&model, Some(&cache)).unwrap();
    assert!(files >= 4, "{files} files hashed");
    assert_eq!(manifest.verify_with_cache(&model, Some(&cache)).unwrap(), 0);

    // Same size, one byte different: as a copy cut short and padded would be.
    let decoder = model.join(&manifest.onnx.decoder.file.path);
    let mut bytes = std::fs::read(&decoder).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&decoder, &bytes).unwrap();
    let err = manifest
        .verify_with_cache(&model, Some(&cache))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decoder.onnx") && err.contains("half-copied"),
        "{err}"
    );

    // `audiocap run` refuses it before listing anything (exit 1, nothing written).
    let audio = dir.path().join("audio");
    clips(&audio, 2);
    let out_dir = dir.path().join("captions");
    let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .arg("run")
        .arg(&pipeline)
        .args(["--set", &format!("model.path={}", model.display())])
        .env("AUDIOCAP_HOME", dir.path().join("home"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("half-copied"), "{}", text(&out));
    assert!(read_dataset(&out_dir).is_empty());
}

/// A copy of the tiny model broken by `tests/data/craft_model.py CRAFT...` (its
/// model.json re-records the changed files, as a consistent directory would).
fn crafted_model(dir: &Path, craft: &[&str]) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/craft_model.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&model)
        .args(craft)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crafting the model (pip install onnx): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

/// Real ONNX Runtime failures, end to end. An encoder that fails on every batch
/// holding a clip past 280 frames (3 s): the batch is retried, the probe answers, the
/// segments go one by one, and only the 3 s segment becomes an error row (kind
/// `model`); its input's other segment and every other input are captioned. A
/// decoder whose outputs have the wrong shapes is refused before anything is listed
/// or written: exit 1, a clear message, no panic.
#[test]
fn a_segment_the_model_fails_on_is_one_error_row_and_a_misshapen_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    std::fs::create_dir_all(&audio).unwrap();
    let f = fixtures();
    for clip in ["sine_1s.wav", "chirp_2p5s.wav"] {
        std::fs::copy(f.join("e2e-tiny/audio").join(clip), audio.join(clip)).unwrap();
    }
    std::fs::write(
        audio.join("long.wav"),
        wav(16_000, 1, &tone(16_000, 4.0, 300.0)),
    )
    .unwrap();
    let out_dir = dir.path().join("captions");
    let pipeline = write_pipeline(dir.path(), &audio, out_dir.to_str().unwrap());

    let poisoned = crafted_model(&dir.path().join("poisoned"), &["poison-encoder", "280"]);
    // Clips past 3.5 s go in 3 s windows: long.wav is 0-3 s (298 frames) and 3-4 s.
    let out = run(
        &pipeline,
        &[
            format!("model.path=\"{}\"", poisoned.display()),
            "segments.max_seconds=3.5".into(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout.contains("failed segments: model 1"), "{stdout}");
    let mut rows = read_dataset(&out_dir);
    rows.sort();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for (uri, segment, caption, error) in &rows {
        if uri.ends_with("/long.wav") && *segment == 0 {
            let error = error.as_deref().unwrap_or_default();
            assert!(
                error.starts_with("model: ") && error.contains("Reshape"),
                "{error}"
            );
            assert!(caption.is_none());
        } else {
            assert!(
                caption.is_some() && error.is_none(),
                "{uri} {segment}: {error:?}"
            );
        }
    }

    let misshapen = crafted_model(&dir.path().join("misshapen"), &["misshape-decoder"]);
    let fresh = dir.path().join("captions-2");
    let out = run(
        &pipeline,
        &[
            format!("model.path=\"{}\"", misshapen.display()),
            format!("output.uri=\"{}\"", fresh.display()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr.contains("the model cannot caption a silent clip")
            && stderr.contains("decoder: output `next_token`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(read_dataset(&fresh).is_empty());
}
