//! BEATs encoder against the reference implementation's outputs
//! (`beats-tiny/reference.safetensors`, produced by microsoft/unilm `beats/`).

use audiocap::model::beats::{Beats, mean_over_valid, reduce_padding_mask};
use candle_core::{DType, Device, Tensor};

use crate::common::{fixtures, load_safetensors, max_abs_diff};

const CASES: [&str; 5] = [
    "sine_1s",
    "chirp_2p5s",
    "noise_0p3s",
    "short_30ms",
    "clipped_1s",
];

fn load_tiny() -> Beats {
    Beats::load(
        &fixtures().join("beats-tiny/beats.pt"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load beats.pt")
}

/// Cases whose clip is long enough for at least one 16-frame patch.
fn encodable_cases(reference: &std::collections::HashMap<String, Tensor>) -> Vec<&'static str> {
    CASES
        .iter()
        .copied()
        .filter(|case| {
            reference
                .get(&format!("{case}.features"))
                .is_some_and(|f| f.dims()[0] > 0)
        })
        .collect()
}

#[test]
fn checkpoint_cfg_is_read_from_the_torch_file() {
    let beats = load_tiny();
    let cfg = beats.config();
    // Values as in beats-tiny/cfg.json, but read from beats.pt itself.
    assert_eq!(cfg.encoder_layers, 3);
    assert_eq!(cfg.encoder_embed_dim, 48);
    assert_eq!(cfg.embed_dim, 32);
    assert_eq!(cfg.encoder_attention_heads, 4);
    assert!(cfg.deep_norm && cfg.gru_rel_pos && cfg.relative_position_embedding);
    assert_eq!(
        (
            cfg.num_buckets,
            cfg.max_distance,
            cfg.conv_pos,
            cfg.conv_pos_groups
        ),
        (32, 128, 16, 4)
    );
}

#[test]
fn features_from_reference_fbank_match() {
    let beats = load_tiny();
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    let cases = encodable_cases(&reference);
    assert!(
        cases.len() >= 4,
        "expected most cases to be encodable: {cases:?}"
    );
    for case in cases {
        let fbank = reference[&format!("{case}.fbank")].unsqueeze(0).unwrap();
        let expected = &reference[&format!("{case}.features")];
        let out = beats.extract_features(&fbank, None).unwrap();
        let got = out.features.squeeze(0).unwrap();
        let err = max_abs_diff(&got, expected);
        eprintln!(
            "beats {case}: features {:?} max abs err {err:.2e}",
            got.dims()
        );
        assert!(err <= 1e-4, "{case}: max abs error {err}");
    }
}

#[test]
fn padded_batch_matches_with_reference_mask_semantics() {
    let beats = load_tiny();
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    let fbank = &reference["padded.fbank"];
    let waveform_mask = &reference["padded.padding_mask"];
    let frames = fbank.dims()[1];
    let frame_mask = reduce_padding_mask(waveform_mask, frames).unwrap();
    let out = beats.extract_features(fbank, Some(&frame_mask)).unwrap();
    let expected_mask = reference["padded.feature_padding_mask"]
        .to_dtype(DType::U8)
        .unwrap();
    let got_mask = out.padding_mask.expect("mask");
    assert_eq!(
        got_mask.to_vec2::<u8>().unwrap(),
        expected_mask.to_vec2::<u8>().unwrap()
    );
    assert!(
        got_mask.to_vec2::<u8>().unwrap()[1].contains(&1)
            || got_mask.to_vec2::<u8>().unwrap()[0].contains(&1)
    );
    let err = max_abs_diff(&out.features, &reference["padded.features"]);
    eprintln!("beats padded batch: max abs err {err:.2e}");
    assert!(err <= 1e-4, "padded batch: max abs error {err}");
}

#[test]
fn safetensors_with_cfg_beside_loads_the_same_model() {
    use audiocap::model::checkpoint::{read_torch_state_dict, read_torch_value};
    let pt = fixtures().join("beats-tiny/beats.pt");
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("beats.safetensors");
    let tensors = read_torch_state_dict(&pt, Some("model")).unwrap();
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let cfg = read_torch_value(&pt).unwrap()["cfg"].clone();
    std::fs::write(dir.path().join("beats.json"), cfg.to_string()).unwrap();

    let from_st = Beats::load(&st, DType::F32, &Device::Cpu).unwrap();
    let from_pt = load_tiny();
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    let fbank = reference["chirp_2p5s.fbank"].unsqueeze(0).unwrap();
    let a = from_st.extract_features(&fbank, None).unwrap().features;
    let b = from_pt.extract_features(&fbank, None).unwrap().features;
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // Without the cfg the error says where it looked.
    std::fs::remove_file(dir.path().join("beats.json")).unwrap();
    let err = Beats::load(&st, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no BEATs cfg"), "{err}");
}

#[test]
fn loading_errors_name_file_and_tensor() {
    use audiocap::model::checkpoint::{read_torch_state_dict, read_torch_value};
    let pt = fixtures().join("beats-tiny/beats.pt");
    let dir = tempfile::tempdir().unwrap();
    let cfg = read_torch_value(&pt).unwrap()["cfg"].clone();
    std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();

    let mut tensors = read_torch_state_dict(&pt, Some("model")).unwrap();
    tensors.remove("encoder.layers.1.fc2.weight");
    let st = dir.path().join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let err = Beats::load(&st, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing.safetensors")
            && err.contains("missing tensor `encoder.layers.1.fc2.weight`"),
        "{err}"
    );

    let mut tensors = read_torch_state_dict(&pt, Some("model")).unwrap();
    tensors.insert(
        "post_extract_proj.weight".into(),
        Tensor::zeros((48, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    let st = dir.path().join("shape.safetensors");
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let err = Beats::load(&st, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`post_extract_proj.weight` has shape [48, 31], expected [48, 32]"),
        "{err}"
    );

    let err = Beats::load(&dir.path().join("nope.pt"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.pt"), "{err}");
}

#[test]
fn too_short_input_is_an_error_not_a_panic() {
    let beats = load_tiny();
    let fbank = Tensor::zeros((1, 10, 128), DType::F32, &Device::Cpu).unwrap();
    let err = beats
        .extract_features(&fbank, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("too short"), "{err}");
}

#[test]
fn features_from_waveform_through_our_fbank_match() {
    use audiocap::audio::fbank::{Fbank, FbankConfig};
    let beats = load_tiny();
    let fbank = Fbank::new(FbankConfig::default()).unwrap();
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    for case in encodable_cases(&reference) {
        let waveform: Vec<f32> = reference[&format!("{case}.waveform")].to_vec1().unwrap();
        let frames = fbank.compute(&waveform);
        let input = Tensor::from_vec(
            frames.data,
            (1, frames.num_frames, frames.num_bins),
            &Device::Cpu,
        )
        .unwrap();
        let got = beats
            .extract_features(&input, None)
            .unwrap()
            .features
            .squeeze(0)
            .unwrap();
        let err = max_abs_diff(&got, &reference[&format!("{case}.features")]);
        // Pure tones carry the reference fbank's float32 rounding noise in far-off bins
        // (see the fixtures' README), hence the looser bound for them.
        let tone = matches!(case, "sine_1s" | "clipped_1s");
        let bound = if tone { 1e-3 } else { 1e-4 };
        eprintln!("beats from waveform {case}: max abs err {err:.2e} (bound {bound:.0e})");
        assert!(err <= bound, "{case}: {err}");
    }
}

/// Writes the tiny checkpoint as safetensors with `cfg` changed by `edit_cfg` and its
/// tensors changed by `edit_tensors`, and loads it.
fn variant(
    edit_cfg: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> Beats {
    use audiocap::model::checkpoint::{read_torch_state_dict, read_torch_value};
    let pt = fixtures().join("beats-tiny/beats.pt");
    let mut cfg = read_torch_value(&pt).unwrap()["cfg"].clone();
    edit_cfg(&mut cfg);
    let mut tensors = read_torch_state_dict(&pt, Some("model")).unwrap();
    edit_tensors(&mut tensors);
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("variant.safetensors");
    candle_core::safetensors::save(&tensors, &st).unwrap();
    std::fs::write(dir.path().join("variant.json"), cfg.to_string()).unwrap();
    Beats::load(&st, DType::F32, &Device::Cpu).unwrap()
}

fn chirp_features(beats: &Beats) -> Tensor {
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    let fbank = reference["chirp_2p5s.fbank"].unsqueeze(0).unwrap();
    beats.extract_features(&fbank, None).unwrap().features
}

/// Checkpoint variants that must give exactly the released model's numbers: a
/// fine-tuned checkpoint (tagging head present, ignored), a zero conv bias, and the
/// positional convolution with weight norm already folded into `weight`.
#[test]
fn equivalent_checkpoint_variants_give_the_same_features() {
    let expected = chirp_features(&load_tiny());
    let finetuned = variant(
        |cfg| {
            cfg["finetuned_model"] = true.into();
            cfg["predictor_class"] = 7.into();
        },
        |t| {
            t.insert(
                "predictor.weight".into(),
                Tensor::ones((7, 48), DType::F32, &Device::Cpu).unwrap(),
            );
            t.insert(
                "predictor.bias".into(),
                Tensor::ones(7, DType::F32, &Device::Cpu).unwrap(),
            );
        },
    );
    assert_eq!(max_abs_diff(&chirp_features(&finetuned), &expected), 0.0);

    let with_bias = variant(
        |cfg| cfg["conv_bias"] = true.into(),
        |t| {
            t.insert(
                "patch_embedding.bias".into(),
                Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(),
            );
        },
    );
    assert_eq!(max_abs_diff(&chirp_features(&with_bias), &expected), 0.0);

    let folded = variant(
        |_| {},
        |t| {
            let g = t.remove("encoder.pos_conv.0.weight_g").unwrap();
            let v = t.remove("encoder.pos_conv.0.weight_v").unwrap();
            let norm = v
                .sqr()
                .unwrap()
                .sum_keepdim(0)
                .unwrap()
                .sum_keepdim(1)
                .unwrap()
                .sqrt()
                .unwrap();
            let w = v.broadcast_mul(&g.broadcast_div(&norm).unwrap()).unwrap();
            t.insert("encoder.pos_conv.0.weight".into(), w);
        },
    );
    assert!(max_abs_diff(&chirp_features(&folded), &expected) < 1e-6);

    // Newer PyTorch names the weight-norm parts as a parametrization.
    let parametrized = variant(
        |_| {},
        |t| {
            let g = t.remove("encoder.pos_conv.0.weight_g").unwrap();
            let v = t.remove("encoder.pos_conv.0.weight_v").unwrap();
            t.insert(
                "encoder.pos_conv.0.parametrizations.weight.original0".into(),
                g,
            );
            t.insert(
                "encoder.pos_conv.0.parametrizations.weight.original1".into(),
                v,
            );
        },
    );
    assert_eq!(max_abs_diff(&chirp_features(&parametrized), &expected), 0.0);
}

/// The other switches of the reference change the computation: each variant loads,
/// runs, gives finite features of the right shape, and differs from the released one.
#[test]
fn every_architecture_switch_loads_and_runs() {
    let expected = chirp_features(&load_tiny());
    let variants: Vec<(&str, Beats)> = vec![
        (
            "plain relative bias",
            variant(|cfg| cfg["gru_rel_pos"] = false.into(), |_| {}),
        ),
        (
            "no relative bias",
            variant(
                |cfg| cfg["relative_position_embedding"] = false.into(),
                |_| {},
            ),
        ),
        (
            "layer_norm_first",
            variant(
                |cfg| {
                    cfg["deep_norm"] = false.into();
                    cfg["layer_norm_first"] = true.into();
                },
                |_| {},
            ),
        ),
        (
            "gelu_accurate",
            variant(|cfg| cfg["activation_fn"] = "gelu_accurate".into(), |_| {}),
        ),
        (
            "no post_extract_proj",
            variant(
                |cfg| cfg["embed_dim"] = 48.into(),
                |t| {
                    t.remove("post_extract_proj.weight");
                    t.remove("post_extract_proj.bias");
                    let patch = t["patch_embedding.weight"].clone();
                    let patch =
                        Tensor::cat(&[&patch, &patch.narrow(0, 0, 16).unwrap()], 0).unwrap();
                    t.insert("patch_embedding.weight".into(), patch);
                    t.insert(
                        "layer_norm.weight".into(),
                        Tensor::ones(48, DType::F32, &Device::Cpu).unwrap(),
                    );
                    t.insert(
                        "layer_norm.bias".into(),
                        Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap(),
                    );
                },
            ),
        ),
    ];
    for (name, beats) in variants {
        let got = chirp_features(&beats);
        assert_eq!(got.dims(), expected.dims(), "{name}");
        let finite = got
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{name}: non-finite features");
        assert!(
            max_abs_diff(&got, &expected) > 1e-6,
            "{name}: the switch had no effect"
        );
    }
}

/// Batched clips of different lengths give each clip the features it gets alone.
#[test]
fn length_masked_batch_equals_clips_alone() {
    let beats = load_tiny();
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    let long = &reference["chirp_2p5s.fbank"];
    let short = &reference["sine_1s.fbank"];
    let (t_long, t_short) = (long.dims()[0], short.dims()[0]);
    let pad = Tensor::zeros((t_long - t_short, 128), DType::F32, &Device::Cpu).unwrap();
    let short_padded = Tensor::cat(&[short, &pad], 0).unwrap();
    let batch = Tensor::stack(&[long, &short_padded], 0).unwrap();
    let out = beats
        .extract_features_for_lengths(&batch, &[t_long, t_short])
        .unwrap();
    let alone_long = beats
        .extract_features(&long.unsqueeze(0).unwrap(), None)
        .unwrap()
        .features;
    let alone_short = beats
        .extract_features(&short.unsqueeze(0).unwrap(), None)
        .unwrap()
        .features;
    let p_short = alone_short.dims()[1];
    let got_long = out.features.narrow(0, 0, 1).unwrap();
    let got_short = out
        .features
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(1, 0, p_short)
        .unwrap();
    assert!(max_abs_diff(&got_long, &alone_long) < 1e-5);
    let err = max_abs_diff(&got_short, &alone_short);
    assert!(err < 1e-5, "short clip in a batch: {err}");
    let mask = out.padding_mask.unwrap().to_vec2::<u8>().unwrap();
    assert_eq!(mask[1].iter().filter(|&&m| m == 0).count(), p_short);
    assert!(mask[0].iter().all(|&m| m == 0));
}

fn load_tagger() -> Beats {
    Beats::load(
        &fixtures().join("beats-tiny-tagger/beats.pt"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load beats-tiny-tagger/beats.pt")
}

/// The fine-tuned checkpoint's tag probabilities equal the reference
/// `extract_features` (sigmoid of the predictor's logits averaged over the valid
/// patches), for single clips and for the padded batch with the reference's mask;
/// its features are beats-tiny's, and their mean is the clip embedding.
#[test]
fn tagger_probabilities_match_the_reference() {
    let tagger = load_tagger();
    assert!(tagger.has_tagger());
    assert!(!load_tiny().has_tagger());
    assert_eq!(tagger.config().predictor_class, 7);
    let reference = load_safetensors("beats-tiny/reference.safetensors");
    let tags = load_safetensors("beats-tiny-tagger/reference.safetensors");
    let cases = encodable_cases(&reference);
    assert!(cases.len() >= 4, "{cases:?}");
    for case in cases {
        let fbank = reference[&format!("{case}.fbank")].unsqueeze(0).unwrap();
        let out = tagger.extract_features(&fbank, None).unwrap();
        let features = &reference[&format!("{case}.features")];
        assert!(max_abs_diff(&out.features.squeeze(0).unwrap(), features) <= 1e-4);
        let probs = tagger.tag_probabilities(&out).unwrap().expect("a tagger");
        let expected = tags[&format!("{case}.tag_probs")].unsqueeze(0).unwrap();
        let err = max_abs_diff(&probs, &expected);
        eprintln!("tagger {case}: tag probabilities max abs err {err:.2e}");
        assert!(err <= 1e-4, "{case}: {err}");
        let embedding = mean_over_valid(&out.features, None).unwrap();
        let expected = features.mean_keepdim(0).unwrap();
        assert!(max_abs_diff(&embedding, &expected) <= 1e-5);
    }
    let fbank = &reference["padded.fbank"];
    let frame_mask =
        reduce_padding_mask(&reference["padded.padding_mask"], fbank.dims()[1]).unwrap();
    let out = tagger.extract_features(fbank, Some(&frame_mask)).unwrap();
    let probs = tagger.tag_probabilities(&out).unwrap().expect("a tagger");
    let err = max_abs_diff(&probs, &tags["padded.tag_probs"]);
    eprintln!("tagger padded batch: tag probabilities max abs err {err:.2e}");
    assert!(err <= 1e-4, "padded batch: {err}");
    // A padded row's probabilities differ from its unpadded mean: the mask matters.
    let unmasked = tagger
        .tag_probabilities(&audiocap::model::beats::BeatsOutput {
            features: out.features.clone(),
            padding_mask: None,
        })
        .unwrap()
        .unwrap();
    assert!(max_abs_diff(&unmasked, &tags["padded.tag_probs"]) > 1e-3);
}
