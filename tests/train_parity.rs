//! The trainer's own step against PyTorch + PEFT (`../shared/fixtures/train-tiny/`):
//! the batch the trainer builds, the loss and the gradient of every trainable tensor
//! at step 0, the losses and gradient norms of 5 AdamW steps and the tensors after
//! them, with f32 frozen weights and with bf16 ones (f32 adapters and projector, as
//! PEFT's `autocast_adapter_dtype`), within the fixture README's tolerances. Also:
//! a bf16 step changes what the LoRA layers compute, and the saved checkpoint,
//! exported to ONNX, gives the logits of the training forward pass.

use std::path::PathBuf;

use audiocap::model::llama::LlamaConfig;
use audiocap::model::prompt::DEFAULT_PROMPT_TEMPLATE;
use audiocap::train::model::{
    Example, InitFrom, LoraSettings, TrainableCaptioner, TrainableParams,
};
use audiocap::train::optim::{AdamW, AdamWSettings};
use audiocap::train::run::{step_gradients, train_step};
use audiocap::train::schedule::CosineSchedule;
use candle_core::{DType, Device, Tensor};

use crate::common::{fixtures, load_safetensors};

/// The fixture README's recommended tolerances for one mode.
struct Tolerance {
    loss_rel: f64,
    grad_rel_l2: f64,
    grad_cosine: f64,
    losses_abs: f64,
    final_rel_l2: f64,
}

const F32: Tolerance = Tolerance {
    loss_rel: 1e-5,
    grad_rel_l2: 1e-4,
    grad_cosine: 0.999_999,
    losses_abs: 1e-4,
    final_rel_l2: 1e-4,
};

const BF16: Tolerance = Tolerance {
    loss_rel: 2e-3,
    grad_rel_l2: 6e-2,
    grad_cosine: 0.995,
    losses_abs: 2e-2,
    final_rel_l2: 1e-2,
};

struct Fixture {
    reference: serde_json::Value,
    tensors: std::collections::HashMap<String, Tensor>,
    examples: Vec<Example>,
}

fn fixture() -> Fixture {
    let dir = fixtures().join("train-tiny");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let tensors = load_safetensors("train-tiny/reference.safetensors");
    let examples = reference["clips"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["caption_ids"].as_array().unwrap())
        .map(|(clip, ids)| {
            let stem = clip.as_str().unwrap().trim_end_matches(".wav");
            Example {
                features: tensors[&format!("features.{stem}")].clone(),
                caption: ids
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
            }
        })
        .collect();
    Fixture {
        reference,
        tensors,
        examples,
    }
}

fn llm_dir() -> PathBuf {
    fixtures().join("e2e-tiny/llm")
}

/// The fixture's initial projector and adapter as trainable f32 variables, and the
/// trainer's model over frozen weights in `frozen`.
fn setup(reference: &serde_json::Value, frozen: DType) -> (TrainableParams, TrainableCaptioner) {
    let h = &reference["hyper_parameters"];
    let llm_config = LlamaConfig::from_file(&llm_dir().join("config.json")).unwrap();
    let lora = LoraSettings {
        r: h["lora_r"].as_u64().unwrap() as usize,
        alpha: h["lora_alpha"].as_f64().unwrap(),
        dropout: h["lora_dropout"].as_f64().unwrap(),
        target_modules: vec!["q_proj".into(), "k_proj".into()],
    };
    let from = InitFrom {
        projector: Some(fixtures().join("e2e-tiny/projector.safetensors")),
        adapter: Some(fixtures().join("train-tiny/init_adapter")),
    };
    let params = TrainableParams::init(
        &llm_config,
        48,
        0,
        &lora,
        &from,
        5,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = TrainableCaptioner::new(
        &llm_dir(),
        &params,
        DEFAULT_PROMPT_TEMPLATE,
        lora.dropout,
        5,
        frozen,
        &Device::Cpu,
    )
    .unwrap();
    (params, model)
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// (‖a − b‖ / ‖b‖, cosine(a, b)).
fn relative_l2_and_cosine(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (f64s(a), f64s(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    (diff / nb.max(1e-30), dot / (na * nb).max(1e-30))
}

fn number(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}

fn reference_step_parity(mode: &str, frozen: DType, tol: &Tolerance) {
    let fx = fixture();
    let expect = &fx.reference["modes"][mode];
    let h = &fx.reference["hyper_parameters"];
    let (params, model) = setup(&fx.reference, frozen);

    // The batch the trainer builds is the reference's (ids, label positions, labels).
    let batch = model
        .collate(&fx.examples.iter().collect::<Vec<_>>())
        .unwrap();
    let as_i64 = |t: &Tensor| t.to_dtype(DType::I64).unwrap().flatten_all().unwrap();
    for (name, ours) in [
        ("input_ids", &batch.ids),
        ("label_rows", &batch.label_rows),
        ("labels", &batch.labels),
    ] {
        assert_eq!(
            as_i64(ours).to_vec1::<i64>().unwrap(),
            as_i64(&fx.tensors[name]).to_vec1::<i64>().unwrap(),
            "{mode}: {name}"
        );
    }
    // The audio embeddings (f32 projector), before they are cast into the decoder.
    for (i, e) in fx.examples.iter().enumerate() {
        let ours = model
            .audio_embedding(&e.features)
            .unwrap()
            .flatten_all()
            .unwrap();
        let theirs = fx.tensors[&format!("{mode}.audio_embeddings")]
            .get(i)
            .unwrap();
        let (rel, _) = relative_l2_and_cosine(&ours, &theirs);
        assert!(rel < 1e-5, "{mode}: audio embedding {i} off by {rel:.2e}");
    }

    // Step 0: loss and every gradient, before clipping.
    let vars = params.trainable(true);
    let step = step_gradients(&model, &vars, &fx.examples, fx.examples.len()).unwrap();
    let loss = step.loss_sum / step.tokens as f64;
    let reference_loss = number(&expect["loss_step0"]);
    let rel = (loss - reference_loss).abs() / reference_loss;
    assert!(
        rel < tol.loss_rel,
        "{mode}: loss {loss} vs {reference_loss} ({rel:.2e})"
    );
    let (grads, _) = step.gradients.finish(0.0).unwrap();
    for ((name, var), grad) in vars.iter().zip(&grads) {
        let grad = grad
            .as_ref()
            .unwrap_or_else(|| panic!("{mode}: no gradient reached {name}"));
        assert_eq!(grad.dtype(), DType::F32, "{mode}: {name}'s gradient");
        assert_eq!(var.dtype(), DType::F32, "{mode}: {name}");
        let (rel, cosine) =
            relative_l2_and_cosine(grad, &fx.tensors[&format!("{mode}.grad.{name}")]);
        assert!(
            rel < tol.grad_rel_l2 && cosine > tol.grad_cosine,
            "{mode}: gradient of {name}: relative L2 {rel:.2e}, cosine {cosine:.6}"
        );
    }

    // Five AdamW steps with clipping and the warm-up + cosine schedule.
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWSettings {
            beta1: h["betas"][0].as_f64().unwrap(),
            beta2: h["betas"][1].as_f64().unwrap(),
            eps: number(&h["eps"]),
            weight_decay: number(&h["weight_decay"]),
        },
    )
    .unwrap();
    let total = h["total_steps"].as_u64().unwrap();
    let schedule = CosineSchedule::new(number(&h["peak_lr"]), number(&h["warmup_fraction"]), total);
    for s in 0..total {
        let lr = schedule.lr(s);
        let reference_lr = number(&expect["lrs"][s as usize]);
        assert!((lr - reference_lr).abs() < 1e-9, "lr({s}) = {lr}");
        let outcome = train_step(
            &model,
            &mut optimizer,
            &fx.examples,
            fx.examples.len(),
            number(&h["max_grad_norm"]),
            lr,
        )
        .unwrap();
        let loss = outcome.loss_sum / outcome.tokens as f64;
        let reference_loss = number(&expect["losses"][s as usize]);
        assert!(
            (loss - reference_loss).abs() < tol.losses_abs,
            "{mode}: loss before step {} is {loss}, the reference {reference_loss}",
            s + 1
        );
        let norm = number(&expect["grad_norms_before_clipping"][s as usize]);
        assert!(
            (outcome.grad_norm - norm).abs() / norm < tol.grad_rel_l2,
            "{mode}: gradient norm at step {} is {}, the reference {norm}",
            s + 1,
            outcome.grad_norm
        );
    }
    // The optimiser's moments are f32 too (they are what a checkpoint keeps).
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("optimizer.safetensors");
    optimizer.save(&file).unwrap();
    let moments = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    assert_eq!(moments.len(), 2 * vars.len());
    for (name, t) in &moments {
        assert_eq!(t.dtype(), DType::F32, "{mode}: optimiser state {name}");
    }
    let after = step_gradients(&model, &vars, &fx.examples, fx.examples.len()).unwrap();
    let loss = after.loss_sum / after.tokens as f64;
    let reference_loss = number(&expect["loss_after_step5"]);
    assert!(
        (loss - reference_loss).abs() < tol.losses_abs,
        "{mode}: loss after 5 steps {loss}, the reference {reference_loss}"
    );
    for (name, var) in &vars {
        let (rel, _) = relative_l2_and_cosine(
            var.as_tensor(),
            &fx.tensors[&format!("{mode}.final.{name}")],
        );
        assert!(
            rel < tol.final_rel_l2,
            "{mode}: {name} after 5 steps off by {rel:.2e}"
        );
    }
}

#[test]
fn f32_steps_equal_pytorch_and_peft() {
    reference_step_parity("f32", DType::F32, &F32);
}

#[test]
fn bf16_steps_equal_pytorch_and_peft() {
    reference_step_parity("bf16", DType::BF16, &BF16);
}

/// Last-position logits of `model`'s decoder for `example`'s prompt: the first row
/// of the training forward pass's label logits.
fn prompt_logits(model: &TrainableCaptioner, example: &Example) -> Vec<f64> {
    let batch = model.collate(&[example]).unwrap();
    f64s(&model.label_logits(&batch).unwrap().get(0).unwrap())
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Issue #19: with bf16 frozen weights the LoRA layers once computed with copies
/// of A and B cast when the model was built, so optimiser steps never reached them.
#[test]
fn bf16_steps_move_the_lora_layers_and_the_saved_checkpoint_exports_to_their_logits() {
    use audiocap::engine::audio::AudioEmbeds;
    use audiocap::engine::model::{EngineOptions, OnnxModel};

    let fx = fixture();
    let (params, model) = setup(&fx.reference, DType::BF16);
    let example = &fx.examples[1];
    let before = prompt_logits(&model, example);
    // Only the LoRA matrices train (the projector stays): whatever the decoder then
    // computes differently comes from them.
    let mut optimizer = AdamW::new(params.trainable(false), AdamWSettings::default()).unwrap();
    for _ in 0..3 {
        train_step(&model, &mut optimizer, &fx.examples, 3, 1.0, 1e-3).unwrap();
    }
    let after = prompt_logits(&model, example);
    let moved = max_abs(&before, &after);
    assert!(
        moved > 1e-2,
        "3 bf16 steps changed the decoder's logits by {moved}"
    );

    // The checkpoint as the trainer saves it, exported (f32) and run.
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    std::fs::create_dir_all(&checkpoint).unwrap();
    params
        .save_projector(&checkpoint.join("projector.safetensors"))
        .unwrap();
    params.save_adapter(&checkpoint.join("adapter")).unwrap();
    let exported = dir.path().join("export");
    crate::common::export_tiny(
        &exported,
        &checkpoint.join("projector.safetensors"),
        &checkpoint.join("adapter"),
        "trained-bf16",
    );
    let mut onnx = OnnxModel::load(&exported, &EngineOptions::default()).unwrap();
    let audio = model.audio_embedding(&example.features).unwrap();
    let audio = ndarray::Array3::from_shape_vec(
        (1, 1, audio.dim(2).unwrap()),
        audio.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
    .unwrap();
    let prompt = onnx
        .prompt(&AudioEmbeds::from_array(onnx.device(), audio).unwrap())
        .unwrap();
    let past = onnx.empty_past(1, 0).unwrap();
    let (logits, _) = onnx.decode(prompt, past, 0).unwrap();
    let exported: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    assert_eq!(exported.len(), after.len());
    // f32 export against the bf16 forward pass: bf16 rounding apart, the same
    // logits, and far nearer the trained ones than the untrained ones.
    let off = max_abs(&exported, &after);
    let from_untrained = max_abs(&exported, &before);
    eprintln!("exported vs trained {off:.4}, vs untrained {from_untrained:.4}, moved {moved:.4}");
    assert!(
        off < 0.25 * moved,
        "exported logits off by {off} (the steps moved them {moved})"
    );
    assert!(off < from_untrained, "{off} vs {from_untrained}");
}
