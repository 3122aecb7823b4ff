//! The Llama decoder against Hugging Face transformers' `LlamaForCausalLM` (float32,
//! eager attention) on the e2e-tiny checkpoint: bf16 weights, legacy config, GQA
//! (4 query / 2 key-value heads), untied `lm_head`, the real 128,256-token vocabulary.

use audiocap::model::llama::{KvCache, Llama};
use audiocap::model::lora::{Adaptation, PeftAdapter};
use candle_core::{D, DType, Device, Tensor};

use crate::common::{fixtures, load_safetensors, max_abs_diff};

/// Relative tolerance on the last-position logits, against their largest magnitude.
const TOLERANCE: f32 = 1e-4;

struct Reference {
    /// [1, S] u32
    ids: Tensor,
    /// [V] f32
    last_logits: Tensor,
    /// [S]
    argmax: Vec<i64>,
}

fn reference() -> Reference {
    let tensors = load_safetensors("e2e-tiny/decoder_reference.safetensors");
    let ids = tensors["input_ids"].to_dtype(DType::U32).unwrap();
    let len = ids.dim(0).unwrap();
    Reference {
        ids: ids.reshape((1, len)).unwrap(),
        last_logits: tensors["last_logits"].clone(),
        argmax: tensors["argmax_per_position"].to_vec1().unwrap(),
    }
}

fn load(adaptation: &Adaptation) -> Llama {
    let dir = fixtures().join("e2e-tiny/llm");
    Llama::load(&dir, DType::F32, &Device::Cpu, adaptation)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Compares logits [1, S, V] with the reference: last position by value, every
/// position by argmax.
fn check(logits: &Tensor, reference: &Reference, what: &str) {
    let len = reference.argmax.len();
    assert_eq!(logits.dims(), &[1, len, 128256], "{what}");
    let last = logits.get(0).unwrap().get(len - 1).unwrap();
    let err = max_abs_diff(&last, &reference.last_logits);
    let scale = max_abs(&reference.last_logits);
    println!(
        "llama parity ({what}): last-position logits max |diff| {err:.3e}, max |logit| {scale:.3e}, relative {:.3e}",
        err / scale
    );
    assert!(
        err <= TOLERANCE * scale,
        "{what}: last-position logits differ by {err} (max |logit| {scale})"
    );
    let argmax: Vec<u32> = logits
        .get(0)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let argmax: Vec<i64> = argmax.into_iter().map(i64::from).collect();
    assert_eq!(argmax, reference.argmax, "{what}: argmax per position");
}

#[test]
fn full_pass_matches_transformers() {
    let reference = reference();
    let model = load(&Adaptation::none());
    let logits = model.forward_ids(&reference.ids, None).unwrap();
    check(&logits, &reference, "full pass");
}

#[test]
fn kv_cache_decoding_matches_transformers() {
    let reference = reference();
    let model = load(&Adaptation::none());
    let mut cache = KvCache::new(model.config());
    let len = reference.argmax.len();
    let steps: Vec<Tensor> = (0..len)
        .map(|t| {
            let token = reference.ids.narrow(1, t, 1).unwrap();
            model.forward_ids(&token, Some(&mut cache)).unwrap()
        })
        .collect();
    assert_eq!(cache.len(), len);
    check(
        &Tensor::cat(&steps, 1).unwrap(),
        &reference,
        "KV cache, token by token",
    );
}

#[test]
fn adapter_folded_and_live_agree() {
    let reference = reference();
    let dir = fixtures().join("e2e-tiny/adapters/a0");
    let adapter =
        PeftAdapter::load(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let folded = load(&Adaptation::folded(&[&adapter]).unwrap());
    let live = load(&Adaptation::live(&[&adapter]));
    let base = load(&Adaptation::none());
    let lf = folded.forward_ids(&reference.ids, None).unwrap();
    let ll = live.forward_ids(&reference.ids, None).unwrap();
    let lb = base.forward_ids(&reference.ids, None).unwrap();
    let scale = max_abs(&lf);
    assert!(max_abs_diff(&lf, &ll) <= 1e-5 * scale);
    // The adapter changes the output (it targets q_proj and k_proj of both layers).
    assert!(max_abs_diff(&lf, &lb) > 1e-3 * scale);
}
