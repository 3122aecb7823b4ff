//! Issue 3: a model whose decoder weights pass protobuf's 2 GB limit exports (with
//! ONNX external data) and loads back in ONNX Runtime.
//!
//! The model is Llama 3 shaped with random weights written at run time: hidden 2048,
//! 6 layers, the full 128,256-token vocabulary and an untied head, about 590 M
//! decoder parameters, i.e. 2.36 GB of f32 weights in `decoder.onnx.data`.

use std::time::Instant;

use audiocap::engine::audio::AudioEmbeds;
use audiocap::engine::model::{EngineOptions, OnnxModel};
use audiocap::export::{ExportOptions, export_model};
use audiocap::manifest::ExportDtype;
use audiocap::model::synthetic::{LlamaFiles, LlamaSpec, SyntheticModel, beats_tiny};
use ndarray::Array3;

use crate::common::fixtures;

/// protobuf's hard limit on one serialised message.
const TWO_GIB: u64 = 1 << 31;

#[test]
fn decoder_past_two_gigabytes_exports_with_external_data_and_runs() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let synthetic = SyntheticModel {
        beats: beats_tiny(),
        llama: LlamaSpec::reduced(2048, 6),
        llama_files: LlamaFiles::default(),
        seed: 11,
    };
    let sources = synthetic
        .write(
            &tmp.path().join("sources"),
            &fixtures().join("e2e-tiny/llm/tokenizer.json"),
        )
        .unwrap();
    let written = started.elapsed();

    let out = tmp.path().join("export");
    let manifest = export_model(&ExportOptions {
        sources,
        dtype: ExportDtype::F32,
        attention: audiocap::manifest::Attention::Eager,
        name: "large".into(),
        out: out.clone(),
        overwrite: false,
        tag_labels: None,
    })
    .unwrap();
    let exported = started.elapsed();

    // The graph itself stays small; the weights live in the external-data file.
    let graph = std::fs::metadata(out.join("decoder.onnx")).unwrap().len();
    let data = std::fs::metadata(out.join("decoder.onnx.data"))
        .unwrap()
        .len();
    assert!(graph < 10 << 20, "decoder.onnx is {graph} bytes");
    assert!(data > TWO_GIB, "decoder.onnx.data is {data} bytes");
    let recorded: Vec<&str> = manifest
        .onnx
        .decoder
        .external_data
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(recorded, vec!["decoder.onnx.data"]);

    // Drop the sources before ONNX Runtime maps 3+ GB of weights.
    std::fs::remove_dir_all(tmp.path().join("sources")).unwrap();

    let mut model = OnnxModel::load(&out, &EngineOptions::default()).unwrap();
    let loaded = started.elapsed();
    let hidden = model.hidden_size();
    assert_eq!(hidden, 2048);
    // One prefill step over the prompt with a small audio embedding, then one decode step.
    let audio = Array3::from_shape_fn((1, 1, hidden), |(_, _, k)| ((k % 7) as f32 - 3.0) * 0.01);
    let prompt_len = model.prompt_len();
    let embeds = model
        .prompt(&AudioEmbeds::from_array(model.device(), audio).unwrap())
        .unwrap();
    let past = model.empty_past(1, 0).unwrap();
    let (logits, cache) = model.decode(embeds, past, 0).unwrap();
    assert_eq!(logits.dim(), (1, 128_256));
    assert!(logits.iter().all(|v| v.is_finite()));
    let next = logits
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &v)| if v > a.1 { (i, v) } else { a },
        )
        .0 as u32;
    let step = model.embed_step(&[next]).unwrap();
    let (logits, _) = model.decode(step, cache, prompt_len).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    assert!(logits.iter().any(|&v| v != 0.0));
    eprintln!(
        "large export: sources {:.1} s, export {:.1} s, load {:.1} s, decode {:.1} s \
         (decoder.onnx {graph} B, decoder.onnx.data {data} B)",
        written.as_secs_f64(),
        (exported - written).as_secs_f64(),
        (loaded - exported).as_secs_f64(),
        (started.elapsed() - loaded).as_secs_f64(),
    );
}
