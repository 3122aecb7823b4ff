//! PEFT adapters from the fixtures: loading, `cat` combination, saving, and merged
//! versus live application in the full decoder.

use audiocap::model::llama::Llama;
use audiocap::model::lora::{Adaptation, PeftAdapter};
use candle_core::{DType, Device, Tensor};

use crate::common::{fixtures, max_abs_diff};

fn adapter(name: &str) -> PeftAdapter {
    PeftAdapter::load(&fixtures().join("e2e-tiny/adapters").join(name)).unwrap()
}

const Q0: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn fixture_adapters_load_with_their_config() {
    let a0 = adapter("a0");
    assert_eq!(a0.config.r, 4);
    assert_eq!(a0.config.lora_alpha, 8.0);
    // 2 layers × {q_proj, k_proj}
    assert_eq!(a0.modules.len(), 4);
    let q = &a0.modules[Q0];
    assert_eq!(q.a.dims(), &[4, 64]);
    assert_eq!(q.scale, 2.0);
}

#[test]
fn cat_combination_has_rank_sum_and_weighted_update() {
    let (a0, a1) = (adapter("a0"), adapter("a1"));
    let merged = PeftAdapter::cat(&[a0.clone(), a1.clone()], &[0.5, 0.5]).unwrap();
    assert_eq!(merged.config.r, 8);
    assert_eq!(merged.config.lora_alpha, 8.0);
    for (path, m) in &merged.modules {
        assert_eq!(m.a.dims()[0], 8);
        let expected = ((a0.modules[path].delta().unwrap() * 0.5).unwrap()
            + (a1.modules[path].delta().unwrap() * 0.5).unwrap())
        .unwrap();
        let err = max_abs_diff(&m.delta().unwrap(), &expected);
        assert!(err < 1e-6, "{path}: {err}");
    }

    // Saved in PEFT's format and read back, it is the same adapter.
    let dir = tempfile::tempdir().unwrap();
    merged.save(dir.path()).unwrap();
    let reread = PeftAdapter::load(dir.path()).unwrap();
    assert_eq!(reread.config.r, 8);
    assert_eq!(reread.modules.len(), merged.modules.len());
    assert_eq!(
        max_abs_diff(
            &reread.modules[Q0].delta().unwrap(),
            &merged.modules[Q0].delta().unwrap()
        ),
        0.0
    );
}

#[test]
fn merged_and_live_adapters_give_the_same_logits() {
    let (a0, a1) = (adapter("a0"), adapter("a1"));
    let merged = PeftAdapter::cat(&[a0, a1], &[0.5, 0.5]).unwrap();
    let llm = fixtures().join("e2e-tiny/llm");
    let folded = Llama::load(
        &llm,
        DType::F32,
        &Device::Cpu,
        &Adaptation::folded(&[&merged]).unwrap(),
    )
    .unwrap();
    let live = Llama::load(
        &llm,
        DType::F32,
        &Device::Cpu,
        &Adaptation::live(&[&merged]),
    )
    .unwrap();
    let base = Llama::load(&llm, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
    let ids = Tensor::new(&[[128000u32, 791, 4062, 14198, 39935]], &Device::Cpu).unwrap();
    let lf = folded.forward_ids(&ids, None).unwrap();
    let ll = live.forward_ids(&ids, None).unwrap();
    let lb = base.forward_ids(&ids, None).unwrap();
    let scale = lf
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let err = max_abs_diff(&lf, &ll);
    eprintln!("lora merged vs live: max abs err {err:.2e} (max |logit| {scale:.2})");
    assert!(err <= 1e-5 * scale.max(1.0), "merged vs live {err}");
    assert!(
        max_abs_diff(&lf, &lb) > 1e-3,
        "the adapter must change the output"
    );
}

#[test]
fn adapter_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("e2e-tiny/adapters/a0");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        cfg.replace("\"k_proj\"", "\"v_proj\""),
    )
    .unwrap();
    let err = PeftAdapter::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("k_proj"),
        "{err}"
    );

    // An adapter for modules the model lacks is refused at model load.
    std::fs::write(dir.path().join("adapter_config.json"), &cfg).unwrap();
    let mut adapter = PeftAdapter::load(dir.path()).unwrap();
    let m = adapter.modules.remove(Q0).unwrap();
    adapter
        .modules
        .insert("model.layers.7.self_attn.q_proj".into(), m);
    let err = Llama::load(
        &fixtures().join("e2e-tiny/llm"),
        DType::F32,
        &Device::Cpu,
        &Adaptation::folded(&[&adapter]).unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("model.layers.7.self_attn.q_proj"), "{err}");
}

/// `audiocap merge` writes a PEFT directory whose single adapter decodes exactly as
/// PEFT's `add_weighted_adapter([a0, a1], [0.5, 0.5], "cat")` did in the reference.
#[test]
fn merge_command_writes_the_cat_adapter_of_the_reference() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat_a0_a1_half");
    let bin = env!("CARGO_BIN_EXE_audiocap");
    let a = |name: &str| f.join("e2e-tiny/adapters").join(name);
    let merged = std::process::Command::new(bin)
        .args(["merge", "--adapter"])
        .arg(a("a0"))
        .arg("--adapter")
        .arg(a("a1"))
        .args(["--weights", "0.5,0.5", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        merged.status.success(),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 8, "rank 4 + 4");
    assert_eq!(config["lora_alpha"].as_f64(), Some(8.0));
    assert!(out.join("adapter_model.safetensors").is_file());
    // An existing output is not replaced without --overwrite.
    let again = std::process::Command::new(bin)
        .args(["merge", "--adapter"])
        .arg(a("a0"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));

    let reference = crate::common::e2e_reference();
    let clips: Vec<String> = reference["cases"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let captioned = std::process::Command::new(bin)
        .arg("reference-caption")
        .arg("--beats")
        .arg(f.join("beats-tiny/beats.pt"))
        .arg("--llm")
        .arg(f.join("e2e-tiny/llm"))
        .arg("--projector")
        .arg(f.join("e2e-tiny/projector.safetensors"))
        .arg("--adapter")
        .arg(&out)
        .args(["--max-new-tokens", &reference["max_new_tokens"].to_string()])
        .args(clips.iter().map(|c| f.join("e2e-tiny/audio").join(c)))
        .output()
        .unwrap();
    assert!(
        captioned.status.success(),
        "{}",
        String::from_utf8_lossy(&captioned.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&captioned.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), clips.len());
    for (clip, line) in clips.iter().zip(&lines) {
        let got = crate::common::ids(&line["token_ids"]);
        crate::common::check_tokens(
            &format!("{clip}/merged"),
            &got,
            &reference["cases"][clip]["cat_a0_a1_half"],
        );
    }
}
