//! The benchmark's model, built once and reused: synthetic checkpoints (or the
//! fixture) and their export, each kept in the work folder with a marker of what it
//! was made from, written last, so a changed option or a half-written folder is
//! rebuilt.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};

use super::options::{BenchOptions, Plan};
use super::report::{fmt_attention, fmt_dtype};
use crate::export::{ExportOptions, export_model};
use crate::manifest::ModelManifest;
use crate::model::projector::Pooling;
use crate::model::sources::ModelSources;

/// A ready export and what it took to get it.
pub(super) struct Prepared {
    pub(super) dir: PathBuf,
    /// The synthetic decoder's parameters (None for the fixture).
    pub(super) decoder_parameters: Option<u64>,
    /// Seconds spent writing the sources (None when cached or the fixture).
    pub(super) sources_s: Option<f64>,
    /// Seconds spent exporting (None when cached).
    pub(super) export_s: Option<f64>,
}

/// Builds or reuses the sources and the export.
pub(super) fn prepare_export(
    options: &BenchOptions,
    plan: &Plan,
    progress: &impl Fn(String),
) -> anyhow::Result<Prepared> {
    let mut sources_s = None;
    let mut tag_labels = None;
    let (sources, source_key, parameters) = match plan.preset.synthetic(options.seed) {
        None => {
            let e2e = plan.fixtures.join("e2e-tiny");
            if !e2e.is_dir() {
                bail!(
                    "the fixture preset needs the reference fixtures: {} does not exist (pass --fixtures)",
                    e2e.display()
                );
            }
            // The fine-tuned tiny BEATs: beats-tiny's encoder with a 7-label head.
            let tagger = plan.fixtures.join("beats-tiny-tagger");
            tag_labels = Some(tagger.join("class_labels_indices.csv"));
            let sources = ModelSources {
                beats: tagger.join("beats.pt"),
                llm: e2e.join("llm"),
                projector: e2e.join("projector.safetensors"),
                adapters: Vec::new(),
                adapter_weights: None,
                prompt_template: None,
                pooling: Pooling::Mean,
            };
            let key =
                serde_json::json!({ "fixtures": plan.fixtures, "beats": "beats-tiny-tagger" });
            (sources, key, None)
        }
        Some(model) => {
            let dir = plan
                .work_dir
                .join("sources")
                .join(format!("{}-seed{}", plan.preset, options.seed));
            let marker = dir.join("synthetic.json");
            let key = serde_json::to_value(&model)?;
            let cached = !options.rebuild
                && std::fs::read(&marker)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v == key);
            if cached {
                progress(format!(
                    "reusing synthetic checkpoints in {}",
                    dir.display()
                ));
            } else {
                let tokenizer = options
                    .tokenizer
                    .clone()
                    .unwrap_or_else(|| plan.fixtures.join("e2e-tiny/llm/tokenizer.json"));
                if !tokenizer.is_file() {
                    bail!(
                        "the synthetic models need a Llama 3 tokenizer.json: {} does not exist \
                         (pass --tokenizer or --fixtures)",
                        tokenizer.display()
                    );
                }
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                progress(format!(
                    "writing synthetic checkpoints ({:.2} B decoder parameters) to {}",
                    model.llama.num_parameters() as f64 / 1e9,
                    dir.display()
                ));
                let started = Instant::now();
                model
                    .write(&dir, &tokenizer)
                    .with_context(|| format!("writing {}", dir.display()))?;
                // The marker last: a half-written directory is never reused.
                std::fs::write(&marker, serde_json::to_vec_pretty(&key)?)
                    .with_context(|| format!("writing {}", marker.display()))?;
                sources_s = Some(started.elapsed().as_secs_f64());
            }
            let sources = ModelSources {
                beats: dir.join("beats.safetensors"),
                llm: dir.join("llm"),
                projector: dir.join("projector.safetensors"),
                adapters: Vec::new(),
                adapter_weights: None,
                prompt_template: None,
                pooling: Pooling::Mean,
            };
            (sources, key, Some(model.llama.num_parameters()))
        }
    };

    let name = format!(
        "bench-{}-{}-{}-seed{}",
        plan.preset,
        fmt_dtype(plan.dtype),
        fmt_attention(plan.attention),
        options.seed
    );
    let exports = plan.work_dir.join("exports");
    let out = exports.join(&name);
    let marker = exports.join(format!("{name}.bench.json"));
    let export_key = serde_json::json!({
        "sources": source_key,
        "dtype": plan.dtype,
        "attention": plan.attention,
        "audiocap_version": env!("CARGO_PKG_VERSION"),
        "graph_revision": crate::export::GRAPH_REVISION,
    });
    let cached = !options.rebuild
        && sources_s.is_none()
        && ModelManifest::read(&out).is_ok()
        && std::fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v == export_key);
    if cached {
        progress(format!("reusing the export in {}", out.display()));
        return Ok(Prepared {
            dir: out,
            decoder_parameters: parameters,
            sources_s,
            export_s: None,
        });
    }
    let _ = std::fs::remove_file(&marker);
    progress(format!(
        "exporting ({}) to {}",
        fmt_dtype(plan.dtype),
        out.display()
    ));
    let started = Instant::now();
    export_model(&ExportOptions {
        sources,
        dtype: plan.dtype,
        attention: plan.attention,
        name,
        out: out.clone(),
        overwrite: true,
        tag_labels,
    })
    .context("exporting the benchmark model")?;
    let export_s = started.elapsed().as_secs_f64();
    std::fs::write(&marker, serde_json::to_vec_pretty(&export_key)?)
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(Prepared {
        dir: out,
        decoder_parameters: parameters,
        sources_s,
        export_s: Some(export_s),
    })
}
