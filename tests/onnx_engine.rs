//! The ONNX export run by ONNX Runtime against the candle reference path and the
//! reference fixtures.

use std::path::{Path, PathBuf};

use audiocap::audio::decode::decode_file;
use audiocap::audio::fbank::{Fbank, FbankConfig};
use audiocap::caption::Captioner;
use audiocap::engine::audio::AudioEmbeds;
use audiocap::engine::continuous::generate_continuous;
use audiocap::engine::generate::{Generated, GenerationParams, generate};
use audiocap::engine::model::{EngineOptions, OnnxModel};
use audiocap::export::{ExportOptions, export_model};
use audiocap::manifest::{Attention, ExportDtype, ModelManifest};
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
    export_with(dir, name, src, ExportDtype::F32, Attention::Eager)
}

fn export_with(
    dir: &Path,
    name: &str,
    src: ModelSources,
    dtype: ExportDtype,
    attention: Attention,
) -> PathBuf {
    let out = dir.join(name);
    export_model(&ExportOptions {
        sources: src,
        dtype,
        attention,
        name: name.to_string(),
        out: out.clone(),
        overwrite: false,
        tag_labels: None,
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
        attention: Attention::Eager,
        name: "again".into(),
        out: out.clone(),
        overwrite: false,
        tag_labels: None,
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
    let ort_audio = engine.encode(&batch).unwrap().to_array().unwrap();
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

    // The prompt, built where the model runs around one clip's audio, is candle's.
    let clip0 = ort_audio.slice(ndarray::s![0..1, .., ..]).to_owned();
    let (_, audio_tokens, hidden) = clip0.dim();
    let candle_prompt = candle
        .prompt_embeds(
            &Tensor::from_vec(
                clip0.iter().copied().collect::<Vec<f32>>(),
                (1, audio_tokens, hidden),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    let len = engine.prompt_len();
    assert_eq!(candle_prompt.dims(), &[1, len, hidden]);
    let embeds = engine
        .prompt(&AudioEmbeds::from_array(engine.device(), clip0).unwrap())
        .unwrap();
    let ort_prompt = engine.to_host(&embeds).unwrap();
    assert_eq!(ort_prompt.shape(), &[1, len, hidden]);
    let expected = candle_prompt
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let differ = ort_prompt
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differ, 0,
        "prompt embeddings: {differ} values differ from candle's"
    );

    // Decoder logits at the prompt's last position, relative to the largest logit.
    let past = engine.empty_past(1, len).unwrap();
    let (ort_logits, _) = engine.decode(embeds, past, 0).unwrap();
    let candle_logits = candle.prompt_logits(&candle_prompt).unwrap();
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
/// tokens for every clip and decoder, at batch size 1 and 4, with eager and with
/// fused attention.
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
    let exports = decoders().into_iter().flat_map(|(name, src)| {
        [Attention::Eager, Attention::Fused].map(|a| (name, src.clone(), a))
    });
    for (name, src, attention) in exports {
        let out = export_with(
            dir.path(),
            &format!("{name}-{attention:?}"),
            src,
            ExportDtype::F32,
            attention,
        );
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

/// `--dtype f16` (with fused attention, its default and what GPUs run) runs on ONNX
/// Runtime (CPU here) and stays with the f32 eager export: prompt logits within f16
/// tolerance, and the reference tokens wherever the reference's top-2 margin leaves
/// room for half-precision rounding.
#[test]
fn f16_export_matches_f32_within_half_precision() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let f32_dir = export_to(dir.path(), "a0", sources(&["a0"], None));
    let f16_dir = export_with(
        dir.path(),
        "a0-f16",
        sources(&["a0"], None),
        ExportDtype::F16,
        Attention::default_for(ExportDtype::F16),
    );
    let f32_bytes = ModelManifest::read(&f32_dir)
        .unwrap()
        .onnx
        .decoder
        .file
        .bytes;
    let manifest = ModelManifest::read(&f16_dir).unwrap();
    assert_eq!(manifest.onnx.dtype, ExportDtype::F16);
    assert_eq!(manifest.onnx.attention, Attention::Fused);
    assert!(
        manifest.onnx.decoder.file.bytes < f32_bytes * 6 / 10,
        "f16 weights should halve the file"
    );

    let mut e32 = OnnxModel::load(&f32_dir, &EngineOptions::default()).unwrap();
    let mut e16 = OnnxModel::load(&f16_dir, &EngineOptions::default()).unwrap();
    let clips = clips();
    let batch: Vec<(&[f32], usize)> = clips.iter().map(|(_, d, n)| (d.as_slice(), *n)).collect();
    let a32 = e32.encode(&batch).unwrap().to_array().unwrap();
    let audio16 = e16.encode(&batch).unwrap();
    let a16 = audio16.to_array().unwrap();
    let scale = a32.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a32
        .iter()
        .zip(a16.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("f16 vs f32: audio embeddings max relative error {err:.2e}");
    assert!(err < 1e-2, "audio embeddings: {err}");

    // Both decoders on the f32 export's audio.
    let past = e32.empty_past(4, 64).unwrap();
    let prompt = e32
        .prompt(&AudioEmbeds::from_array(e32.device(), a32.clone()).unwrap())
        .unwrap();
    let (l32, _) = e32.decode(prompt, past, 0).unwrap();
    let past = e16.empty_past(4, 64).unwrap();
    let prompt = e16
        .prompt(&AudioEmbeds::from_array(e16.device(), a32.clone()).unwrap())
        .unwrap();
    let (l16, _) = e16.decode(prompt, past, 0).unwrap();
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
    let generated = generate(&mut e16, &audio16, &params).unwrap();
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

/// Fused attention (`GroupQueryAttention`, cache updated in place) computes what the
/// eager graph does: prompt and step logits within f32 rounding, the same greedy
/// and beam-search captions; and continuous batching (clips joining free rows of a
/// running cache, rows at different lengths) gives every clip the caption it gets in
/// a fixed batch.
#[test]
fn fused_attention_and_continuous_batching_match_eager() {
    let dir = tempfile::tempdir().unwrap();
    let src = || sources(&["a0", "a1"], Some(vec![0.5, 0.5]));
    let eager_dir = export_with(
        dir.path(),
        "eager",
        src(),
        ExportDtype::F32,
        Attention::Eager,
    );
    let fused_dir = export_with(
        dir.path(),
        "fused",
        src(),
        ExportDtype::F32,
        Attention::Fused,
    );
    let manifest = ModelManifest::read(&fused_dir).unwrap();
    assert_eq!(manifest.onnx.attention, Attention::Fused);
    onnx_check(&fused_dir.join("decoder.onnx"));
    onnx_check(&fused_dir.join("audio_encoder.onnx"));
    let mut eager = OnnxModel::load(&eager_dir, &EngineOptions::default()).unwrap();
    let mut fused = OnnxModel::load(&fused_dir, &EngineOptions::default()).unwrap();
    let clips = clips();
    let batch: Vec<(&[f32], usize)> = clips.iter().map(|(_, d, n)| (d.as_slice(), *n)).collect();
    let audio = eager.encode(&batch).unwrap();
    // The encoders agree too (fused: `MultiHeadAttention` with the padding and the
    // gated position bias as one additive bias; the clips differ in length).
    let eager_audio = audio.to_array().unwrap();
    let fused_audio = fused.encode(&batch).unwrap().to_array().unwrap();
    let scale = eager_audio.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = eager_audio
        .iter()
        .zip(fused_audio.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("fused vs eager: audio embeddings max relative error {err:.2e}");
    assert!(err < 1e-5, "audio embeddings: {err}");

    // Fresh fused buffers are zeros (made where the model runs), of the asked shape.
    let fresh = fused.empty_past(3, 9).unwrap();
    assert_eq!(fresh.len(), 2 * fused.manifest.decoder.num_layers);
    for value in &fresh {
        let host = fused.to_host(value).unwrap();
        assert_eq!(host.shape()[0], 3);
        assert_eq!(host.shape()[2], 9);
        assert!(host.iter().all(|&v| v == 0.0));
    }

    // Prefill, then three steps with the same tokens: logits agree at every step.
    let rows = audio.clips();
    let prompt_len = eager.prompt_len();
    let mut e_cache = eager.empty_past(rows, 0).unwrap();
    let mut f_cache = fused.empty_past(rows, prompt_len + 4).unwrap();
    let mut e_embeds = eager.prompt(&audio).unwrap();
    let mut f_embeds = fused.prompt(&audio).unwrap();
    for step in 0..4 {
        let past_len = if step == 0 { 0 } else { prompt_len + step - 1 };
        let (el, ec) = eager.decode(e_embeds, e_cache, past_len).unwrap();
        let (fl, fc) = fused.decode(f_embeds, f_cache, past_len).unwrap();
        let scale = el.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = el
            .iter()
            .zip(fl.iter())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        eprintln!("fused vs eager: step {step} logits max relative error {err:.2e}");
        assert!(err < 1e-5, "step {step}: {err}");
        let next: Vec<u32> = el
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                    .0 as u32
            })
            .collect();
        e_embeds = eager.embed_step(&next).unwrap();
        f_embeds = fused.embed_step(&next).unwrap();
        e_cache = ec;
        f_cache = fc;
    }
    // Rows of different lengths are refused by an eager export.
    let step = eager.embed_step(&[1, 2, 3, 4]).unwrap();
    let ragged = eager.decode_greedy_rows(
        step,
        e_cache,
        &[
            prompt_len + 3,
            prompt_len + 3,
            prompt_len + 2,
            prompt_len + 3,
        ],
        &[false; 4],
    );
    assert!(ragged.is_err());

    let greedy = GenerationParams {
        max_new_tokens: 12,
        beams: 1,
        min_new_tokens: 0,
    };
    let same = |what: &str, got: &[Generated], want: &[Generated]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.token_ids, w.token_ids, "{what}: clip {i}");
            assert!((g.score - w.score).abs() < 1e-4, "{what}: clip {i}");
        }
    };
    // Fixed-length captions (benchmarks) through continuous batching (the stop ids
    // the graph suppresses are the export's).
    let fixed = GenerationParams {
        min_new_tokens: 12,
        ..greedy.clone()
    };
    let want_fixed = generate(&mut eager, &audio, &fixed).unwrap();
    let host = audio.to_array().unwrap();
    let arriving = batches(&fused, &host, &[4]);
    let got_fixed = generate_continuous(&mut fused, arriving, 3, 1, &fixed).unwrap();
    same("fixed length", &got_fixed, &want_fixed);
    assert!(got_fixed.iter().all(|g| g.token_ids.len() == 12));
    // The random tiny decoder never says a stop id: a few of the tokens it says
    // serve as extra stops, so captions end at different lengths.
    let full = generate(&mut eager, &audio, &greedy).unwrap();
    let extra_stops = [
        full[0].token_ids[2],
        full[1].token_ids[6],
        full[2].token_ids[4],
    ];
    for model in [&mut eager, &mut fused] {
        model.manifest.generation.stop_ids.extend(extra_stops);
    }
    let want = generate(&mut eager, &audio, &greedy).unwrap();
    same(
        "greedy",
        &generate(&mut fused, &audio, &greedy).unwrap(),
        &want,
    );
    fused.set_keep_finished_rows(true);
    same(
        "kept rows",
        &generate(&mut fused, &audio, &greedy).unwrap(),
        &want,
    );
    let beams = GenerationParams {
        beams: 3,
        ..greedy.clone()
    };
    let want_beams = generate(&mut eager, &audio, &beams).unwrap();
    let got_beams = generate(&mut fused, &audio, &beams).unwrap();
    for (g, w) in got_beams.iter().zip(&want_beams) {
        assert_eq!(g.token_ids, w.token_ids, "beams");
    }

    // Continuous batching: the four clips, twice over, through 3 rows that refill one
    // at a time (joins land in scattered rows while others are mid-caption), and
    // through 8 rows at once (a single prefill into the running cache). They arrive
    // in encoder batches of 3, 1 and 4 clips: joins take rows across batches.
    let twice = ndarray::concatenate(ndarray::Axis(0), &[host.view(), host.view()]).unwrap();
    let want_twice: Vec<_> = want.iter().chain(&want).cloned().collect();
    let lengths: Vec<usize> = want.iter().map(|g| g.token_ids.len()).collect();
    assert!(
        lengths.iter().any(|&l| l != lengths[0]),
        "the fixture's captions should differ in length for this test to mean anything: {lengths:?}"
    );
    for (rows, refill) in [(3, 1), (8, 8), (2, 2)] {
        let arriving = batches(&fused, &twice, &[3, 1, 4]);
        let got = generate_continuous(&mut fused, arriving, rows, refill, &greedy).unwrap();
        same(&format!("{rows} rows"), &got, &want_twice);
    }
    // Eager exports are refused, as is beam search.
    let arriving = batches(&eager, &host, &[4]);
    assert!(generate_continuous(&mut eager, arriving, 2, 1, &greedy).is_err());
    let arriving = batches(&fused, &host, &[4]);
    assert!(generate_continuous(&mut fused, arriving, 2, 1, &beams).is_err());
}

/// `audio`'s clips as encoder batches of `sizes` clips, where `model` runs.
fn batches(model: &OnnxModel, audio: &ndarray::Array3<f32>, sizes: &[usize]) -> Vec<AudioEmbeds> {
    assert_eq!(sizes.iter().sum::<usize>(), audio.dim().0);
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = audio
                .slice(ndarray::s![start..start + n, .., ..])
                .to_owned();
            start += n;
            AudioEmbeds::from_array(model.device(), part).unwrap()
        })
        .collect()
}

/// The export of a fine-tuned BEATs keeps its tagging head: ONNX Runtime's tag
/// probabilities equal the reference's (`beats-tiny-tagger`), clip by clip and in a
/// batch of clips of different lengths, eager and fused; the encoder embedding is the
/// mean of the reference features, the projector embedding the decoder's audio
/// embedding. Nothing is bound unless asked for, and an export without the outputs
/// is refused when they are.
#[test]
fn tagger_export_gives_the_reference_tags_and_embeddings() {
    use audiocap::engine::audio::{ClipRequest, TagRequest};
    use audiocap::output::EmbeddingKind;
    let dir = tempfile::tempdir().unwrap();
    let tagger = fixtures().join("beats-tiny-tagger");
    let eager = dir.path().join("eager");
    crate::common::export_tiny_tagger(&eager, &["--attention", "eager"]);
    let mut src = sources(&["a0"], None);
    src.beats = tagger.join("beats.pt");
    let fused = dir.path().join("fused");
    export_model(&ExportOptions {
        sources: src,
        dtype: ExportDtype::F32,
        attention: Attention::Fused,
        name: "fused".into(),
        out: fused.clone(),
        overwrite: false,
        tag_labels: None,
    })
    .unwrap();
    let reference = crate::common::load_safetensors("beats-tiny/reference.safetensors");
    let expected = crate::common::load_safetensors("beats-tiny-tagger/reference.safetensors");
    let names = crate::common::TAGGER_LABELS;
    let cases = ["chirp_2p5s", "sine_1s", "noise_0p3s", "clipped_1s"];
    let fbanks: Vec<(Vec<f32>, usize)> = cases
        .iter()
        .map(|c| {
            let f = &reference[&format!("{c}.fbank")];
            (f.flatten_all().unwrap().to_vec1().unwrap(), f.dims()[0])
        })
        .collect();
    for (out, labels) in [
        (&eager, names.map(String::from).to_vec()),
        (&fused, (0..7).map(|i| format!("class_{i}")).collect()),
    ] {
        let manifest = ModelManifest::read(out).unwrap();
        let tags = manifest.encoder.tags.as_ref().expect("tags in model.json");
        assert_eq!(tags.labels, labels);
        assert_eq!(manifest.encoder.embedding_dim, Some(48));
        let mut model = OnnxModel::load(out, &EngineOptions::default()).unwrap();
        // Asked for nothing: nothing comes back.
        let plain = model
            .encode(&[(&fbanks[0].0, fbanks[0].1)])
            .unwrap()
            .take_extras();
        assert_eq!(plain, vec![Default::default()]);
        for embedding in [EmbeddingKind::Encoder, EmbeddingKind::Projector] {
            model
                .request_clip_outputs(ClipRequest {
                    tags: Some(TagRequest {
                        top_k: 7,
                        min_score: 0.0,
                    }),
                    embedding,
                })
                .unwrap();
            // Alone, then all together (padded to the longest).
            let batches: Vec<Vec<usize>> = (0..cases.len())
                .map(|i| vec![i])
                .chain([vec![0, 1, 2, 3]])
                .collect();
            for batch in batches {
                let inputs: Vec<(&[f32], usize)> = batch
                    .iter()
                    .map(|&i| (fbanks[i].0.as_slice(), fbanks[i].1))
                    .collect();
                let mut audio = model.encode(&inputs).unwrap();
                let extras = audio.take_extras();
                let embeds = audio.to_array().unwrap();
                for (row, &i) in batch.iter().enumerate() {
                    let case = cases[i];
                    let got = extras[row].tags.as_ref().unwrap();
                    assert_eq!(got.len(), 7);
                    assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
                    let want = expected[&format!("{case}.tag_probs")]
                        .to_vec1::<f32>()
                        .unwrap();
                    let err = got
                        .iter()
                        .map(|t| {
                            let i = labels.iter().position(|l| *l == t.label).unwrap();
                            (t.score - want[i]).abs()
                        })
                        .fold(0f32, f32::max);
                    assert!(err <= 1e-4, "{case} in {batch:?}: tags max abs err {err}");
                    let emb = extras[row].embedding.as_ref().unwrap();
                    let want: Vec<f32> = match embedding {
                        EmbeddingKind::Encoder => reference[&format!("{case}.features")]
                            .mean(0)
                            .unwrap()
                            .to_vec1()
                            .unwrap(),
                        _ => embeds.slice(ndarray::s![row, 0, ..]).to_vec(),
                    };
                    assert_eq!(emb.len(), want.len());
                    let err = emb
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err <= 1e-4,
                        "{case} {embedding:?}: embedding max abs err {err}"
                    );
                }
            }
        }
    }
    // A model without a tagging head: tags are refused, the encoder embedding is not.
    let plain = export_to(dir.path(), "plain", sources(&["a0"], None));
    assert!(ModelManifest::read(&plain).unwrap().encoder.tags.is_none());
    let mut model = OnnxModel::load(&plain, &EngineOptions::default()).unwrap();
    let e = model
        .request_clip_outputs(ClipRequest {
            tags: Some(TagRequest {
                top_k: 5,
                min_score: 0.0,
            }),
            embedding: EmbeddingKind::None,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tag_probs output"), "{e}");
    model
        .request_clip_outputs(ClipRequest {
            tags: None,
            embedding: EmbeddingKind::Encoder,
        })
        .unwrap();
}
