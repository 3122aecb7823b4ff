//! `audiocap doctor`: what the runtime finds on this machine, the library, its
//! version and execution providers, the GPUs the driver shows and the variables
//! that steer the search, in a report that never panics.

use super::library::{
    MIN_MINOR_VERSION, ORT_CRATE_VERSION, ORT_DYLIB_PATH, RECOMMENDED_VERSION, RuntimeInfo, runtime,
};
use crate::config::AUDIOCAP_HOME;

/// A report for `audiocap doctor`: which library, found how, which version and
/// execution providers, the GPUs the driver shows, and the variables that matter.
/// Never panics; a runtime that cannot be loaded is reported with the reason.
pub fn doctor_report() -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };

    line("ONNX Runtime".to_string());
    match runtime() {
        Ok(rt) => {
            let info = &rt.info;
            let resolved = std::fs::canonicalize(&info.library).ok();
            let target = match resolved.as_deref() {
                Some(r) if r != info.library => format!(" (-> {})", r.display()),
                _ => String::new(),
            };
            line(format!("  library:    {}{target}", info.library.display()));
            line(format!("  found via:  {}", info.route));
            line(format!(
                "  version:    {} (ort {} needs 1.{MIN_MINOR_VERSION} or newer)",
                info.version, ORT_CRATE_VERSION
            ));
            line(format!("  build:      {}", ort::info()));
            line("  search:".to_string());
            for step in &rt.searched {
                line(format!("    - {step}"));
            }
            line("Execution providers".to_string());
            line("  CPU:   available".to_string());
            line(format!("  CUDA:  {}", cuda_provider_status(info)));
        }
        Err(e) => {
            line("  NOT AVAILABLE".to_string());
            for l in e.to_string().lines() {
                line(format!("  {l}"));
            }
        }
    }

    line("CUDA devices".to_string());
    for l in gpu_report() {
        line(format!("  {l}"));
    }

    line("Environment".to_string());
    for name in [
        ORT_DYLIB_PATH,
        AUDIOCAP_HOME,
        "CUDA_VISIBLE_DEVICES",
        "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS",
    ] {
        let value = match std::env::var_os(name) {
            Some(v) => v.to_string_lossy().into_owned(),
            None => "(not set)".to_string(),
        };
        line(format!("  {name}={value}"));
    }
    out
}

fn cuda_provider_status(info: &RuntimeInfo) -> String {
    if !info.cuda_available {
        return format!(
            "not in this build (CPU-only library); for CUDA: scripts/setup-onnxruntime.sh --gpu \
             or pip install onnxruntime-gpu=={RECOMMENDED_VERSION}"
        );
    }
    let provider = info
        .library
        .parent()
        .map(|dir| dir.join("libonnxruntime_providers_cuda.so"));
    match provider {
        Some(p) if p.is_file() => format!(
            "in this build; provider library {} (it needs the CUDA 13 and cuDNN 9 libraries, \
             checked when a session asks for cuda)",
            p.display()
        ),
        Some(p) => format!(
            "in this build, but its provider library {} is missing: reinstall the GPU build",
            p.display()
        ),
        None => "in this build".to_string(),
    }
}

/// What the NVIDIA driver shows, read from `/proc` (no CUDA call, so it is cheap and
/// cannot fail on a machine without a GPU).
fn gpu_report() -> Vec<String> {
    let mut lines = Vec::new();
    match std::fs::read_to_string("/proc/driver/nvidia/version") {
        Ok(text) => {
            let first = text.lines().next().unwrap_or("").trim();
            lines.push(format!("driver:     {first}"));
        }
        Err(_) => lines.push("driver:     no NVIDIA driver loaded".to_string()),
    }
    let mut gpus: Vec<String> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| {
                    let bus = e.file_name().to_string_lossy().into_owned();
                    let model = std::fs::read_to_string(e.path().join("information"))
                        .ok()
                        .and_then(|info| {
                            info.lines().find_map(|l| {
                                l.strip_prefix("Model:").map(|m| m.trim().to_string())
                            })
                        })
                        .unwrap_or_else(|| "unknown model".to_string());
                    format!("{model} ({bus})")
                })
                .collect()
        })
        .unwrap_or_default();
    gpus.sort();
    if gpus.is_empty() {
        lines.push("GPUs:       none visible".to_string());
    } else {
        lines.push(format!("GPUs:       {}", gpus.join(", ")));
    }
    lines
}
