//! [`run_bench`]: one benchmark from options to report: the plan, the export (built
//! or reused), the test clips, then each wanted figure in turn.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::clips::write_clips;
use super::measure::{
    Runner, front_end, measure_decoder, measure_encoder, measure_end_to_end, measure_front_end,
    profile_generation, tile,
};
use super::options::{BenchOptions, BenchStage};
use super::prepare::{Prepared, prepare_export};
use super::report::{BenchReport, ModelSummary, SetupTimes};
use crate::audio::fbank::Fbank;
use crate::engine::model::{EngineOptions, OnnxModel};
use crate::engine::runtime::init_runtime;

/// Runs the benchmark that `options` describe and returns its report (also written as
/// JSON when `options.json` is set).
pub fn run_bench(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let plan = options.plan()?;
    let runtime = init_runtime().context("loading ONNX Runtime")?;
    std::fs::create_dir_all(&plan.work_dir)
        .with_context(|| format!("creating {}", plan.work_dir.display()))?;
    let mut runner = Runner {
        warmup: options.warmup,
        reps: plan.repetitions,
        quiet: options.quiet,
        figures: Vec::new(),
    };

    let prepared = match &options.model {
        Some(dir) => Prepared {
            dir: dir.clone(),
            decoder_parameters: None,
            sources_s: None,
            export_s: None,
        },
        None => prepare_export(options, &plan, &|m| runner.progress(&m))?,
    };
    let export_dir = prepared.dir;
    runner.progress(&format!(
        "loading {} on {}",
        export_dir.display(),
        options.device
    ));
    let started = Instant::now();
    let mut model = OnnxModel::load(
        &export_dir,
        &EngineOptions {
            device: options.device,
            intra_threads: options.intra_threads,
            profile_prefix: None,
        },
    )
    .with_context(|| format!("loading {}", export_dir.display()))?;
    let load_s = started.elapsed().as_secs_f64();

    let manifest = model.manifest.clone();
    let clip_rate = options.clip_rate.unwrap_or(manifest.front_end.sample_rate);
    let clips = write_clips(
        &plan.work_dir.join("clips"),
        clip_rate,
        options.clip_seconds,
        plan.encoder_batch.max(plan.e2e_batch),
    )?;
    let fbank = Fbank::new(manifest.front_end.clone()).context("the export's front end")?;

    let wanted = |stage: BenchStage| {
        options
            .stages
            .as_ref()
            .is_none_or(|stages| stages.contains(&stage))
    };
    if wanted(BenchStage::FrontEnd) {
        measure_front_end(&mut runner, &fbank, &clips)?;
    }
    let features = clips
        .iter()
        .map(|p| front_end(&fbank, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batch: Vec<(&[f32], usize)> = (0..plan.encoder_batch)
        .map(|k| {
            let f = &features[k % features.len()];
            (f.data.as_slice(), f.num_frames)
        })
        .collect();
    if wanted(BenchStage::Encoder) {
        measure_encoder(&mut runner, &mut model, &batch)?;
    }
    let one_clip = model.encode(&batch[..1])?.to_array()?;
    let prompt_tokens = model.prompt_len();
    let n = options.new_tokens;
    if wanted(BenchStage::Decoder) {
        for &b in &plan.batch_sizes {
            measure_decoder(&mut runner, &mut model, &tile(&one_clip, b), n)?;
        }
    }
    if wanted(BenchStage::EndToEnd) {
        let e2e_clips: Vec<&Path> = (0..plan.e2e_batch)
            .map(|k| clips[k % clips.len()].as_path())
            .collect();
        measure_end_to_end(&mut runner, &mut model, &fbank, &e2e_clips, n)?;
    }
    let profile_files = match &options.profile {
        Some(dir) => {
            drop(model);
            let largest = plan.batch_sizes.iter().copied().max().unwrap_or(1);
            runner.progress(&format!(
                "profiling one generation at batch {largest} into {}",
                dir.display()
            ));
            profile_generation(
                &export_dir,
                options,
                dir,
                &batch,
                &tile(&one_clip, largest),
                n,
            )?
        }
        None => Vec::new(),
    };

    let file_bytes = |g: &crate::manifest::GraphFile| {
        g.file.bytes + g.external_data.iter().map(|f| f.bytes).sum::<u64>()
    };
    let report = BenchReport {
        preset: plan.preset,
        model_dir: options.model.clone(),
        device: options.device.to_string(),
        dtype: manifest.onnx.dtype,
        attention: manifest.onnx.attention,
        build_profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        onnxruntime: format!("{} ({})", runtime.version, runtime.library.display()),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        intra_threads: options.intra_threads,
        clip_seconds: options.clip_seconds,
        clip_rate_hz: clip_rate,
        new_tokens: n,
        warmup: runner.warmup,
        repetitions: runner.reps,
        model: ModelSummary {
            name: manifest.name.clone(),
            dir: export_dir,
            hidden_size: manifest.decoder.hidden_size,
            num_layers: manifest.decoder.num_layers,
            vocab_size: manifest.decoder.vocab_size,
            decoder_parameters: prepared.decoder_parameters,
            encoder_bytes: file_bytes(&manifest.onnx.audio_encoder),
            embedding_bytes: file_bytes(&manifest.onnx.embedding),
            decoder_bytes: file_bytes(&manifest.onnx.decoder),
            prompt_tokens,
            audio_tokens: one_clip.dim().1,
        },
        setup: SetupTimes {
            sources_s: prepared.sources_s,
            export_s: prepared.export_s,
            load_s,
        },
        figures: runner.figures,
        profile_files,
    };
    if let Some(path) = &options.json {
        report.write_json(path)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::BenchPreset;

    /// The whole benchmark on the tiny random model: every figure is there and finite,
    /// and a second run reuses the checkpoints and the export.
    #[test]
    fn tiny_preset_runs_and_reuses_its_export() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("report.json");
        let options = BenchOptions {
            preset: BenchPreset::Tiny,
            clip_seconds: 1.0,
            new_tokens: 3,
            repetitions: Some(1),
            batch_sizes: Some(vec![1, 2]),
            work_dir: Some(dir.path().join("work")),
            json: Some(json.clone()),
            quiet: true,
            ..BenchOptions::default()
        };
        let report = run_bench(&options).unwrap();
        assert!(report.setup.sources_s.is_some() && report.setup.export_s.is_some());
        for (stage, batch) in [
            ("front_end", 1),
            ("encoder", 2),
            ("encoder_extras", 2),
            ("prefill", 1),
            ("prefill", 2),
            ("decode", 1),
            ("decode", 2),
            ("generate", 2),
            ("end_to_end", 2),
        ] {
            let f = report
                .figure(stage, batch)
                .unwrap_or_else(|| panic!("{stage} {batch} missing"));
            assert!(f.mean.is_finite() && f.mean > 0.0, "{stage}: {}", f.mean);
            assert_eq!(f.rates.len(), 1);
        }
        assert_eq!(report.model.hidden_size, 64);
        assert_eq!(report.model.prompt_tokens, 17);
        eprintln!("{report}");
        let text = report.to_string();
        assert!(text.contains("end_to_end"), "{text}");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(written["preset"], "tiny");

        // The second run reuses everything and measures only what `--stages` names.
        let again = run_bench(&BenchOptions {
            stages: Some(vec![BenchStage::Decoder]),
            ..options
        })
        .unwrap();
        assert!(again.setup.sources_s.is_none() && again.setup.export_s.is_none());
        let measured: Vec<&str> = again.figures.iter().map(|f| f.stage).collect();
        assert_eq!(
            measured,
            [
                "prefill", "decode", "generate", "prefill", "decode", "generate"
            ],
            "{again}"
        );
    }
}
