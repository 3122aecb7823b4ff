//! The ONNX export run by ONNX Runtime against the candle reference path and the
//! reference fixtures.

use std::path::{Path, PathBuf};

use audiocap::audio::decode::decode_file;
use audiocap::audio::fbank::{Fbank, FbankConfig};
use audiocap::caption::Captioner;
use audiocap::engine::generate::{GenerationParams, generate};
use audiocap::engine::model::{EngineOptions, OnnxModel};
use audiocap::export::{ExportOptions, export_model};
use audiocap::manifest::{ExportDtype, ModelManifest};
use audiocap::model::sources::ModelSources;
use candle_core::{Device, Tensor};

use crate::common::{
    check_tokens, e2e_reference as reference, e2e_sources as sources, fixtures, ids,
};

/// The three decoders of `e2e-tiny/reference.json`.
fn decoders() -> Vec<(&'static str, ModelSources)> {
    vec![
        ("base", sources(&[], None)),
        ("a0", sources(&["a0"], None)),
        (
            "cat_a0_a1_half",
            sources(&["a0", "a1"], Some(vec![0.5, 0.5])),
        ),
    ]
}

fn export_to(dir: &Path, name: &str, src: ModelSources) -> PathBuf {
    let out = dir.join(name);
    export_model(&ExportOptions {
        sources: src,
        dtype: ExportDtype::F32,
        name: name.to_string(),
        out: out.clone(),
        overwrite: false,
    })
    .unwrap_or_else(|e| panic!("export {name}: {e}"));
    out
}

/// Normalised fbank of every fixture clip, sorted by name.
fn clips() -> Vec<(String, Vec<f32>, usize)> {
    let fbank = Fbank::new(FbankConfig::default()).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("e2e-tiny/audio"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let audio = decode_file(&fixtures().join("e2e-tiny/audio").join(&name)).unwrap();
            let frames = fbank.compute(&audio.samples);
            (name, frames.data, frames.num_frames)
        })
        .collect()
}

fn onnx_check(path: &Path) {
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)")
        .arg(path)
        .status()
        .expect("python3 is needed for onnx.checker (CI installs it)");
    assert!(status.success(), "onnx.checker rejected {}", path.display());
}

#[test]
fn export_layout_manifest_and_onnx_checker() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_to(
        dir.path(),
        "cat",
        sources(&["a0", "a1"], Some(vec![0.5, 0.5])),
    );
    let manifest = ModelManifest::read(&out).unwrap();
    manifest.verify_hashes(&out).unwrap();
    assert_eq!(
        manifest.prompt.ids.prefix,
        ids(&reference()["prompt_prefix_ids"])
    );
    assert_eq!(manifest.generation.stop_ids, vec![128001, 128009]);
    assert_eq!(manifest.provenance.adapters.len(), 2);
    assert_eq!(manifest.provenance.adapters[1].weight, 0.5);
    assert_eq!(manifest.provenance.combination.as_deref(), Some("cat"));
    assert_eq!(manifest.decoder.num_key_value_heads, 2);
    for file in ["audio_encoder.onnx", "embedding.onnx", "decoder.onnx"] {
        onnx_check(&out.join(file));
    }
    // A second export to the same place is refused unless asked for.
    let err = export_model(&ExportOptions {
        sources: sources(&[], None),
        dtype: ExportDtype::F32,
        name: "again".into(),
        out: out.clone(),
        overwrite: false,
    })
    .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn onnx_runtime_matches_candle() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_to(dir.path(), "a0", sources(&["a0"], None));
    let mut engine = OnnxModel::load(&out, &EngineOptions::default()).unwrap();
    let candle = Captioner::load(&sources(&["a0"], None), &Device::Cpu).unwrap();
    let clips = clips();

    // Audio embeddings, batched: relative to the largest magnitude.
    let batch: Vec<(&[f32], usize)> = clips.iter().map(|(_, d, n)| (d.as_slice(), *n)).collect();
    let ort_audio = engine.encode(&batch).unwrap();
    let mut worst = 0f32;
    for (i, (name, data, frames)) in clips.iter().enumerate() {
        let fbank = Tensor::from_vec(data.clone(), (1, *frames, 128), &Device::Cpu).unwrap();
        let c = candle
            .audio_embedding_from_fbank(&fbank)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let o: Vec<f32> = ort_audio
            .index_axis(ndarray::Axis(0), i)
            .iter()
            .copied()
            .collect();
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = c
            .iter()
            .zip(&o)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        worst = worst.max(err);
        assert!(err <= 1e-4, "{name}: audio embedding relative error {err}");
    }
    eprintln!("ORT vs candle: audio embeddings max relative error {worst:.2e}");

    // Decoder logits at the prompt's last position, relative to the largest logit.
    let clip0 = ort_audio.slice(ndarray::s![0..1, .., ..]).to_owned();
    let prompt = engine.prompt_embeds(&clip0);
    let (len, hidden) = (prompt.dim().1, prompt.dim().2);
    let embeds = engine.embeds_value(prompt.clone()).unwrap();
    let past = engine.empty_past(1).unwrap();
    let (ort_logits, _) = engine.decode(embeds, past, 0).unwrap();
    let candle_logits = candle
        .prompt_logits(
            &Tensor::from_vec(
                prompt.into_raw_vec_and_offset().0,
                (1, len, hidden),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    let scale = candle_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = candle_logits
        .iter()
        .zip(ort_logits.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("ORT vs candle: last-position logits max relative error {err:.2e}");
    assert!(err <= 1e-4, "decoder logits relative error {err}");
}

/// `audiocap export` then ONNX Runtime greedy decoding reproduces the reference
/// tokens for every clip and decoder, at batch size 1 and 4.
#[test]
fn onnx_captions_match_reference_at_batch_1_and_4() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let clips = clips();
    let params = GenerationParams {
        max_new_tokens: 12,
        beams: 1,
        min_new_tokens: 0,
    };
    for (name, src) in decoders() {
        let out = export_to(dir.path(), name, src);
        let mut engine = OnnxModel::load(&out, &EngineOptions::default()).unwrap();
        let batch: Vec<(&[f32], usize)> =
            clips.iter().map(|(_, d, n)| (d.as_slice(), *n)).collect();
        let audio = engine.encode(&batch).unwrap();
        let together = generate(&mut engine, &audio, &params).unwrap();
        // Finished rows kept in the batch (what a GPU does) change nothing.
        engine.set_keep_finished_rows(true);
        assert_eq!(
            generate(&mut engine, &audio, &params).unwrap(),
            together,
            "{name}: finished rows kept in the batch"
        );
        // A fixed length (benchmarks): no stop id before `min_new_tokens`.
        let fixed = generate(
            &mut engine,
            &audio,
            &GenerationParams {
                min_new_tokens: 12,
                ..params.clone()
            },
        )
        .unwrap();
        let stops = engine.manifest.generation.stop_ids.clone();
        for (g, free) in fixed.iter().zip(&together) {
            assert_eq!(g.token_ids.len(), 12, "{name}");
            assert!(g.token_ids.iter().all(|t| !stops.contains(t)), "{name}");
            // Up to the free caption's stop the choices are the same.
            let shared = free
                .token_ids
                .iter()
                .take_while(|t| !stops.contains(t))
                .count();
            assert_eq!(g.token_ids[..shared], free.token_ids[..shared], "{name}");
        }
        engine.set_keep_finished_rows(false);
        for (i, (clip, data, frames)) in clips.iter().enumerate() {
            let alone_audio = engine.encode(&[(data.as_slice(), *frames)]).unwrap();
            let alone = generate(&mut engine, &alone_audio, &params)
                .unwrap()
                .remove(0);
            assert_eq!(
                alone.token_ids, together[i].token_ids,
                "{clip}/{name}: batch 1 vs 4"
            );
            let expected = &reference["cases"][clip][name];
            check_tokens(&format!("{clip}/{name}"), &alone.token_ids, expected);
            if alone.token_ids == ids(&expected["token_ids"]) {
                let text = engine.tokenizer.decode(&alone.token_ids, true).unwrap();
                assert_eq!(
                    text.trim(),
                    expected["text"].as_str().unwrap().trim(),
                    "{clip}/{name}"
                );
            }
            assert!(alone.score < 0.0 && alone.score.is_finite());
        }
    }
}

/// Beam search with K beams returns a caption at least as likely (mean
/// log-probability) as greedy decoding, and K = 1 is greedy.
#[test]
fn beam_search_scores_at_least_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_to(dir.path(), "base", sources(&[], None));
    let mut engine = OnnxModel::load(&out, &EngineOptions::default()).unwrap();
    let clips = clips();
    let batch: Vec<(&[f32], usize)> = clips.iter().map(|(_, d, n)| (d.as_slice(), *n)).collect();
    let audio = engine.encode(&batch).unwrap();
    let greedy = generate(
        &mut engine,
        &audio,
        &GenerationParams {
            max_new_tokens: 8,
            beams: 1,
            min_new_tokens: 0,
        },
    )
    .unwrap();
    let beams = generate(
        &mut engine,
        &audio,
        &GenerationParams {
            max_new_tokens: 8,
            beams: 4,
            min_new_tokens: 0,
        },
    )
    .unwrap();
    for (g, b) in greedy.iter().zip(&beams) {
        assert!(
            b.score >= g.score - 1e-5,
            "beam {} < greedy {}",
            b.score,
            g.score
        );
        assert!(!b.token_ids.is_empty() && b.token_ids.len() <= 8);
    }
}

/// `--dtype f16` runs on ONNX Runtime (CPU here) and stays with the f32 export:
/// prompt logits within f16 tolerance, and the reference tokens wherever the
/// reference's top-2 margin leaves room for half-precision rounding.
#[test]
fn f16_export_matches_f32_within_half_precision() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let f32_dir = export_to(dir.path(), "a0", sources(&["a0"], None));
    let f16_dir = dir.path().join("a0-f16");
    export_model(&ExportOptions {
        sources: sources(&["a0"], None),
        dtype: ExportDtype::F16,
        name: "a0-f16".into(),
        out: f16_dir.clone(),
        overwrite: false,
    })
    .unwrap();
    let f32_bytes = ModelManifest::read(&f32_dir)
        .unwrap()
        .onnx
        .decoder
        .file
        .bytes;
    let manifest = ModelManifest::read(&f16_dir).unwrap();
    assert_eq!(manifest.onnx.dtype, ExportDtype::F16);
    assert!(
        manifest.onnx.decoder.file.bytes < f32_bytes * 6 / 10,
        "f16 weights should halve the file"
    );

    let mut e32 = OnnxModel::load(&f32_dir, &EngineOptions::default()).unwrap();
    let mut e16 = OnnxModel::load(&f16_dir, &EngineOptions::default()).unwrap();
    let clips = clips();
    let batch: Vec<(&[f32], usize)> = clips.iter().map(|(_, d, n)| (d.as_slice(), *n)).collect();
    let a32 = e32.encode(&batch).unwrap();
    let a16 = e16.encode(&batch).unwrap();
    let scale = a32.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a32
        .iter()
        .zip(a16.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("f16 vs f32: audio embeddings max relative error {err:.2e}");
    assert!(err < 1e-2, "audio embeddings: {err}");

    let (l32, _) = e32
        .decode(
            e32.embeds_value(e32.prompt_embeds(&a32)).unwrap(),
            e32.empty_past(4).unwrap(),
            0,
        )
        .unwrap();
    let (l16, _) = e16
        .decode(
            e16.embeds_value(e16.prompt_embeds(&a32)).unwrap(),
            e16.empty_past(4).unwrap(),
            0,
        )
        .unwrap();
    let scale = l32.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = l32
        .iter()
        .zip(l16.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("f16 vs f32: prompt logits max relative error {err:.2e}");
    assert!(err < 2e-2, "logits: {err}");

    let params = GenerationParams {
        max_new_tokens: 12,
        beams: 1,
        min_new_tokens: 0,
    };
    let generated = generate(&mut e16, &a16, &params).unwrap();
    for ((clip, _, _), g) in clips.iter().zip(&generated) {
        let expected = &reference["cases"][clip]["a0"];
        let want = ids(&expected["token_ids"]);
        let margins: Vec<f64> = expected["top2_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        // Half precision moves logits by ~1e-2 here: only steps with a clear winner count.
        let strict = margins.iter().position(|&m| m < 0.05).unwrap_or(want.len());
        assert_eq!(
            &g.token_ids[..strict.min(g.token_ids.len())],
            &want[..strict],
            "{clip}: f16 tokens"
        );
    }
}
