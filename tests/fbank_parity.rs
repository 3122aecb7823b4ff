//! The BEATs fbank against the reference preprocessing (torchaudio's Kaldi fbank in
//! float32, then BEATs' normalisation), by value.

use std::collections::HashMap;

use audiocap::audio::fbank::{Fbank, FbankConfig};
use candle_core::{Device, Tensor};

use crate::common::{load_safetensors, max_abs_diff, mean_abs_diff};

/// Largest maximum and mean absolute differences accepted, in normalised units.
struct Tolerance {
    max: f32,
    mean: f32,
}

/// Cases with broadband content: float64 and the float32 reference agree closely.
const BROADBAND: Tolerance = Tolerance {
    max: 1e-4,
    mean: 1e-4,
};

/// Pure tones: mel bins far from the tone hold only the reference's float32 rounding
/// noise (see the fixtures README), so single values may differ by ~1.7e-3 while the
/// mean stays tiny.
const PURE_TONE: Tolerance = Tolerance {
    max: 2e-3,
    mean: 5e-5,
};

fn tolerance(case: &str) -> &'static Tolerance {
    match case {
        "sine_1s" | "clipped_1s" => &PURE_TONE,
        _ => &BROADBAND,
    }
}

/// Computes the fbank of `waveform` [N] and compares it with `expected` [frames, bins].
fn check(fbank: &Fbank, label: &str, tolerance: &Tolerance, waveform: &Tensor, expected: &Tensor) {
    let samples: Vec<f32> = waveform.to_vec1().unwrap();
    let frames = fbank.compute(&samples);
    assert_eq!(
        [frames.num_frames, frames.num_bins],
        expected.dims(),
        "{label}: frames x bins for {} samples",
        samples.len()
    );
    let actual = Tensor::from_vec(
        frames.data,
        (frames.num_frames, frames.num_bins),
        &Device::Cpu,
    )
    .unwrap();
    let max = max_abs_diff(&actual, expected);
    let mean = mean_abs_diff(&actual, expected);
    eprintln!(
        "fbank {label}: {} frames, max abs diff {max:.3e}, mean abs diff {mean:.3e}",
        frames.num_frames
    );
    assert!(
        max <= tolerance.max && mean <= tolerance.mean,
        "{label}: max abs diff {max:.3e} (limit {:.0e}), mean {mean:.3e} (limit {:.0e})",
        tolerance.max,
        tolerance.mean
    );
}

/// The case names `<case>` of every `<case>.waveform` key, sorted.
fn cases(tensors: &HashMap<String, Tensor>) -> Vec<String> {
    let mut cases: Vec<String> = tensors
        .keys()
        .filter_map(|key| key.strip_suffix(".waveform"))
        .map(str::to_owned)
        .collect();
    cases.sort();
    cases
}

fn beats_fbank() -> Fbank {
    Fbank::new(FbankConfig::default()).unwrap()
}

#[test]
fn fbank_matches_reference_cases() {
    let tensors = load_safetensors("fbank/cases.safetensors");
    let cases = cases(&tensors);
    assert_eq!(
        cases,
        [
            "chirp_2p5s",
            "clipped_1s",
            "noise_0p3s",
            "short_30ms",
            "sine_1s"
        ]
    );
    let fbank = beats_fbank();
    for case in &cases {
        check(
            &fbank,
            &format!("cases/{case}"),
            tolerance(case),
            &tensors[&format!("{case}.waveform")],
            &tensors[&format!("{case}.fbank")],
        );
    }
}

#[test]
fn fbank_matches_beats_reference_preprocessing() {
    let tensors = load_safetensors("beats-tiny/reference.safetensors");
    let cases = cases(&tensors);
    assert!(
        !cases.is_empty(),
        "no `<case>.waveform` keys in the fixture"
    );
    let fbank = beats_fbank();
    for case in &cases {
        check(
            &fbank,
            &format!("beats-tiny/{case}"),
            tolerance(case),
            &tensors[&format!("{case}.waveform")],
            &tensors[&format!("{case}.fbank")],
        );
    }
}

/// BEATs computes the fbank of a padded batch row by row over the whole padded
/// waveform, padding included. Each row is one of the cases followed by zeros; it gets
/// that case's tolerance.
#[test]
fn fbank_matches_beats_reference_padded_batch() {
    let tensors = load_safetensors("beats-tiny/reference.safetensors");
    let waveforms = &tensors["padded.waveforms"];
    let expected = &tensors["padded.fbank"];
    let fbank = beats_fbank();
    let cases = cases(&tensors);
    for row in 0..waveforms.dims()[0] {
        let waveform = waveforms.get(row).unwrap();
        let samples: Vec<f32> = waveform.to_vec1().unwrap();
        let case = cases
            .iter()
            .find(|case| {
                let clip: Vec<f32> = tensors[&format!("{case}.waveform")].to_vec1().unwrap();
                clip.len() <= samples.len()
                    && clip[..] == samples[..clip.len()]
                    && samples[clip.len()..].iter().all(|&s| s == 0.0)
            })
            .unwrap_or_else(|| panic!("padded row {row} is not a zero-padded case"));
        check(
            &fbank,
            &format!("beats-tiny/padded[{row}] ({case} + zeros)"),
            tolerance(case),
            &waveform,
            &expected.get(row).unwrap(),
        );
    }
}
