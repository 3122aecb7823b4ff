//! Helpers shared by the integration tests.

pub mod azurite;
pub mod gate;
pub mod gcs;
pub mod s3;
pub mod servers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// `../shared/fixtures`, next to the repository root.
pub fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    assert!(
        dir.join("README.md").is_file(),
        "reference fixtures not found at {}; the tests need ../shared/fixtures beside the repository",
        dir.display()
    );
    dir
}

/// Every tensor of a safetensors fixture file, on the CPU.
pub fn load_safetensors(relative: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(relative);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Maximum absolute difference between two tensors of the same shape, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Mean absolute difference between two tensors of the same shape, in f32.
pub fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .mean(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The e2e-tiny captioner's checkpoints with the given fixture adapters.
pub fn e2e_sources(
    adapters: &[&str],
    weights: Option<Vec<f64>>,
) -> audiocap::model::sources::ModelSources {
    let e2e = fixtures().join("e2e-tiny");
    audiocap::model::sources::ModelSources {
        beats: fixtures().join("beats-tiny/beats.pt"),
        llm: e2e.join("llm"),
        projector: e2e.join("projector.safetensors"),
        adapters: adapters
            .iter()
            .map(|a| e2e.join("adapters").join(a))
            .collect(),
        adapter_weights: weights,
        prompt_template: None,
        pooling: audiocap::model::projector::Pooling::Mean,
    }
}

/// `e2e-tiny/reference.json`.
pub fn e2e_reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("e2e-tiny/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A reference step whose top-2 logit gap is below this may flip between two correct
/// float32 implementations; everything after it may then differ.
pub const MARGIN_RULE: f64 = 1e-3;

/// Checks generated ids against the reference: equal up to the first step whose
/// reference margin is below [`MARGIN_RULE`]; a divergence is only allowed there.
/// Returns the number of steps that were compared strictly.
pub fn check_tokens(label: &str, got: &[u32], reference: &serde_json::Value) -> usize {
    let want = ids(&reference["token_ids"]);
    let margins: Vec<f64> = reference["top2_margins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_f64().unwrap())
        .collect();
    let strict = margins
        .iter()
        .position(|&m| m < MARGIN_RULE)
        .unwrap_or(want.len());
    for step in 0..want.len() {
        if got.get(step) != Some(&want[step]) {
            assert!(
                step >= strict,
                "{label}: step {step} gives {:?}, reference {} (margin {}); ours {got:?}, reference {want:?}",
                got.get(step),
                want[step],
                margins[step]
            );
            return strict;
        }
    }
    assert_eq!(got.len(), want.len(), "{label}: length");
    strict
}

/// `metrics/reference.json`: candidate/reference sets and the reference code's scores.
#[derive(serde::Deserialize)]
pub struct MetricsReference {
    pub sets: std::collections::BTreeMap<String, MetricsSet>,
}

#[derive(serde::Deserialize)]
pub struct MetricsSet {
    pub candidates: Vec<String>,
    pub references: Vec<Vec<String>>,
    pub scores: std::collections::BTreeMap<String, f64>,
}

/// How to get what the METEOR tests need, for their failure messages.
pub const METEOR_SETUP_HELP: &str = "the METEOR tests need Java and pycocoevalcap's \
    meteor-1.5.jar: install a Java runtime (`apt-get install default-jre-headless`) and \
    `python3 -m pip install pycocoevalcap`, or point AUDIOCAP_METEOR_JAR at meteor-1.5.jar \
    (with data/paraphrase-en.gz beside it)";

/// The METEOR setup found on this machine; a missing one fails the test.
pub fn meteor_setup() -> audiocap::eval::meteor::MeteorSetup {
    use audiocap::eval::jvm::{Environment, JavaPaths};
    audiocap::eval::meteor::MeteorSetup::discover(&JavaPaths::default(), &Environment::process())
        .unwrap_or_else(|why| panic!("{why}; {METEOR_SETUP_HELP}"))
}

/// `audiocap export` of the fixture model (BEATs-tiny + Llama-tiny + adapter a0,
/// named `tiny-a0`) into `out`, through the binary as a user runs it.
pub fn export_tiny_a0(out: &Path) {
    let f = fixtures();
    export_tiny(
        out,
        &f.join("e2e-tiny/projector.safetensors"),
        &f.join("e2e-tiny/adapters/a0"),
        "tiny-a0",
    );
}

/// The label names of `beats-tiny-tagger/class_labels_indices.csv`, in index order.
pub const TAGGER_LABELS: [&str; 7] = [
    "Speech",
    "Dog",
    "Siren",
    "Rain",
    "Music",
    "Engine",
    "Bird vocalization, bird call, bird song",
];

/// `audiocap export` of the fine-tuned tiny BEATs (`beats-tiny-tagger`, 7 tags named
/// by its `class_labels_indices.csv`) + Llama-tiny + projector and adapter a0, named
/// `tiny-tagger`, into `out`, through the binary as a user runs it.
pub fn export_tiny_tagger(out: &Path, args: &[&str]) {
    let f = fixtures();
    let tagger = f.join("beats-tiny-tagger");
    let labels = tagger.join("class_labels_indices.csv");
    let mut all = vec!["--tag-labels", labels.to_str().unwrap()];
    all.extend(args);
    let said = export_fixture(
        &tagger.join("beats.pt"),
        out,
        &f.join("e2e-tiny/projector.safetensors"),
        &f.join("e2e-tiny/adapters/a0"),
        "tiny-tagger",
        &all,
    );
    assert!(said.contains("with 7 tags"), "{said}");
}

/// `audiocap export` of BEATs-tiny + Llama-tiny with `projector` and `adapter`
/// (fixture ones or trained ones) into `out` as `name`.
pub fn export_tiny(out: &Path, projector: &Path, adapter: &Path, name: &str) {
    export_tiny_with(out, projector, adapter, name, &[]);
}

/// [`export_tiny`] with more `audiocap export` arguments.
pub fn export_tiny_with(out: &Path, projector: &Path, adapter: &Path, name: &str, args: &[&str]) {
    let beats = fixtures().join("beats-tiny/beats.pt");
    export_fixture(&beats, out, projector, adapter, name, args);
}

/// `audiocap export` of `beats` + Llama-tiny + `projector` + `adapter`; what it said.
fn export_fixture(
    beats: &Path,
    out: &Path,
    projector: &Path,
    adapter: &Path,
    name: &str,
    args: &[&str],
) -> String {
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .arg("export")
        .arg("--beats")
        .arg(beats)
        .arg("--llm")
        .arg(fixtures().join("e2e-tiny/llm"))
        .arg("--projector")
        .arg(projector)
        .arg("--adapter")
        .arg(adapter)
        .args(args)
        .args(["--name", name, "--overwrite", "--out"])
        .arg(out)
        .output()
        .expect("running audiocap export");
    let said = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(result.status.success(), "export: {said}");
    said
}

/// A model exported once per test process into the temp folder as `{prefix}{pid}`
/// by `export`; exports of test processes that have ended are removed first (73 MB
/// each).
pub fn export_per_process(prefix: &str, export: impl FnOnce(&Path)) -> PathBuf {
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(prefix)
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    export(&dir);
    dir
}

/// A 16-bit PCM WAV file.
pub fn write_wav(path: &Path, rate: u32, channels: u16, samples: &[f32]) {
    let data: Vec<u8> = samples
        .iter()
        .flat_map(|&s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
        .collect();
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
    out.extend_from_slice(&(channels * 2).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// The Parquet files `path` names: itself, or those directly in a dataset folder.
pub fn parquet_files(path: &Path) -> Vec<std::path::PathBuf> {
    if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect()
    } else {
        vec![path.to_path_buf()]
    }
}
