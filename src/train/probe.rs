//! How a tagger is scored (top-1, mAP, its BCE loss) and the baselines an encoder
//! tagger ([`super::tagger`]) must beat, scored on the same
//! validation clips with the same metrics: the label prior (every clip gets each
//! label's training frequency: what a tagger that ignores its input predicts) and a
//! linear probe (one-vs-rest logistic regression) on simple fbank statistics, the
//! mean and standard deviation of each mel bin over the clip's frames.
//!
//! The probe is trained on the training clips for each L2 strength of a small grid
//! and reported at the one with the best validation mAP: an optimistic baseline, so
//! an encoder that beats it beats every probe of the grid.

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::optim::{AdamW, AdamWSettings};
use super::pretrain::PretrainError;

/// A clip as the baselines read it: its normalised fbank [frames, bins] and its
/// label indices.
pub type LabelledFbank<'a> = (&'a Tensor, &'a [usize]);

/// Validation scores of one tagger or baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TagScores {
    /// Mean over the labels present of the average precision (ties as one threshold).
    pub map: f64,
    /// Share of clips whose top-scoring label is one of theirs.
    pub top1: f64,
}

/// The linear probe at one L2 strength.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProbeScores {
    pub l2: f64,
    pub map: f64,
    pub top1: f64,
}

/// Both baselines on a validation set (`pretrain.json`'s `baselines`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaggingBaselines {
    pub validation_clips: usize,
    pub label_prior: TagScores,
    /// The probe at the L2 strength with the best validation mAP.
    pub fbank_probe: ProbeScores,
    /// The probe at every L2 strength tried.
    pub fbank_probe_grid: Vec<ProbeScores>,
    /// What the probe reads: "mean and standard deviation of each of the 128 mel
    /// bins over the clip's frames (normalised fbank), standardised on the
    /// training clips".
    pub probe_features: String,
    /// Full-batch Adam steps per probe.
    pub probe_steps: usize,
}

/// The L2 strengths the probe is trained with.
pub const PROBE_L2: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];
/// Full-batch Adam steps (learning rate [`PROBE_LR`]) per probe.
pub const PROBE_STEPS: usize = 400;
const PROBE_LR: f64 = 0.02;

/// Both baselines of a training and a validation set over `labels` labels.
pub fn tagging_baselines(
    train: &[LabelledFbank],
    validation: &[LabelledFbank],
    labels: usize,
) -> Result<TaggingBaselines, PretrainError> {
    if train.is_empty() || validation.is_empty() || labels == 0 {
        return Err(PretrainError::Settings(vec![
            "baselines need training clips, validation clips and labels".into(),
        ]));
    }
    let truth: Vec<&[usize]> = validation.iter().map(|c| c.1).collect();
    let prior = label_prior(train, labels);
    let prior_scores = vec![prior.iter().map(|&p| p as f32).collect::<Vec<_>>(); truth.len()];
    let label_prior = TagScores {
        map: mean_average_precision(&prior_scores, &truth, labels),
        top1: top1(&prior_scores, &truth),
    };

    let (train_x, validation_x) = standardised_features(train, validation)?;
    let train_y = targets(train, labels)?;
    let mut grid = Vec::new();
    for l2 in PROBE_L2 {
        let scores = fit_probe(&train_x, &train_y, &validation_x, &prior, l2)?;
        grid.push(ProbeScores {
            l2,
            map: mean_average_precision(&scores, &truth, labels),
            top1: top1(&scores, &truth),
        });
    }
    let best = *grid
        .iter()
        .max_by(|a, b| a.map.total_cmp(&b.map))
        .expect("the grid is not empty");
    Ok(TaggingBaselines {
        validation_clips: validation.len(),
        label_prior,
        fbank_probe: best,
        fbank_probe_grid: grid,
        probe_features: "mean and standard deviation of each mel bin over the clip's frames \
                         (normalised fbank), standardised on the training clips"
            .into(),
        probe_steps: PROBE_STEPS,
    })
}

/// Each label's share of the training clips.
fn label_prior(train: &[LabelledFbank], labels: usize) -> Vec<f64> {
    let mut counts = vec![0usize; labels];
    for c in train {
        for &l in c.1 {
            if l < labels {
                counts[l] += 1;
            }
        }
    }
    let n = train.len() as f64;
    counts.into_iter().map(|c| c as f64 / n).collect()
}

/// Per clip: the mean and standard deviation over frames of every fbank bin, [N, 2·bins].
fn fbank_statistics(set: &[LabelledFbank]) -> Result<Tensor, PretrainError> {
    let rows = set
        .iter()
        .map(|c| {
            let f = c.0.to_dtype(DType::F32)?;
            let mean = f.mean(0)?;
            let std = f.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
            Tensor::cat(&[mean, std], 0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Both sets' statistics, standardised with the training clips' mean and deviation.
fn standardised_features(
    train: &[LabelledFbank],
    validation: &[LabelledFbank],
) -> Result<(Tensor, Tensor), PretrainError> {
    let train_x = fbank_statistics(train)?;
    let validation_x = fbank_statistics(validation)?;
    let mean = train_x.mean_keepdim(0)?;
    let std = (train_x
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        + 1e-6)?;
    let scale = |x: &Tensor| x.broadcast_sub(&mean)?.broadcast_div(&std);
    Ok((scale(&train_x)?, scale(&validation_x)?))
}

/// Multi-hot targets [N, labels].
fn targets(set: &[LabelledFbank], labels: usize) -> Result<Tensor, PretrainError> {
    let mut y = vec![0f32; set.len() * labels];
    for (i, c) in set.iter().enumerate() {
        for &l in c.1 {
            if l < labels {
                y[i * labels + l] = 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(y, (set.len(), labels), &Device::Cpu)?)
}

/// Trains one-vs-rest logistic regression (mean BCE + l2/2·‖W‖², full-batch Adam,
/// biases starting at the prior's logits) and returns the validation logits.
fn fit_probe(
    x: &Tensor,
    y: &Tensor,
    validation_x: &Tensor,
    prior: &[f64],
    l2: f64,
) -> Result<Vec<Vec<f32>>, PretrainError> {
    let (_, features) = x.dims2()?;
    let labels = prior.len();
    let w = Var::from_tensor(&Tensor::zeros(
        (features, labels),
        DType::F32,
        &Device::Cpu,
    )?)?;
    let bias: Vec<f32> = prior
        .iter()
        .map(|&p| {
            let p = p.clamp(1e-4, 1.0 - 1e-4);
            (p / (1.0 - p)).ln() as f32
        })
        .collect();
    let b = Var::from_tensor(&Tensor::from_vec(bias, labels, &Device::Cpu)?)?;
    let params = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
    let mut optimizer = AdamW::new(
        params,
        AdamWSettings {
            weight_decay: 0.0,
            ..AdamWSettings::default()
        },
    )?;
    for _ in 0..PROBE_STEPS {
        let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
        let loss =
            (bce_with_logits(&logits, y)? + (w.as_tensor().sqr()?.sum_all()? * (l2 / 2.0))?)?;
        let grads = loss.backward()?;
        let g = [
            grads.get(w.as_tensor()).cloned(),
            grads.get(b.as_tensor()).cloned(),
        ];
        optimizer.step(&g, PROBE_LR)?;
    }
    let logits = validation_x
        .matmul(w.as_tensor())?
        .broadcast_add(b.as_tensor())?;
    Ok(logits.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Mean binary cross-entropy with logits over all (clip, label) pairs, in the
/// numerically stable form `max(x, 0) - x·y + log(1 + e^-|x|)`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let relu = logits.relu()?;
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((relu - (logits * targets)?)? + softplus)?.mean_all()
}

/// Share of clips whose highest-scoring label is one of theirs.
pub fn top1(scores: &[Vec<f32>], truth: &[&[usize]]) -> f64 {
    let hits = scores
        .iter()
        .zip(truth)
        .filter(|(s, t)| {
            let best = s
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            best.is_some_and(|b| t.contains(&b))
        })
        .count();
    hits as f64 / scores.len().max(1) as f64
}

/// Mean over labels with at least one positive clip of the average precision
/// (scikit-learn's `average_precision_score`: clips with equal scores share one
/// threshold, so a constant score gives the label's positive rate whatever the
/// clips' order).
pub fn mean_average_precision(scores: &[Vec<f32>], truth: &[&[usize]], labels: usize) -> f64 {
    let mut sum = 0.0;
    let mut counted = 0usize;
    for label in 0..labels {
        let positives = truth.iter().filter(|t| t.contains(&label)).count();
        if positives == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b][label].total_cmp(&scores[a][label]));
        let (mut hits, mut ranked, mut precision_sum) = (0usize, 0usize, 0.0);
        for group in order.chunk_by(|&a, &b| scores[a][label] == scores[b][label]) {
            let group_hits = group.iter().filter(|&&c| truth[c].contains(&label)).count();
            hits += group_hits;
            ranked += group.len();
            precision_sum += group_hits as f64 * hits as f64 / ranked as f64;
        }
        sum += precision_sum / positives as f64;
        counted += 1;
    }
    sum / counted.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Clips whose fbank is noise around a level: label 0 clips are loud in the low
    /// bins, label 1 clips in the high bins, label 2 rides along on every third clip
    /// at random (nothing in the features tells it).
    fn toy_set(n: usize, seed: u64) -> Vec<(Tensor, Vec<usize>)> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let class = i % 2;
                let frames = 20 + rng.below(20);
                let data: Vec<f32> = (0..frames * 128)
                    .map(|k| {
                        let bin = k % 128;
                        let loud = (bin < 64) == (class == 0);
                        (rng.next_f64() as f32 - 0.5) + if loud { 0.4 } else { 0.0 }
                    })
                    .collect();
                let mut labels = vec![class];
                if rng.below(3) == 0 {
                    labels.push(2);
                }
                let fbank = Tensor::from_vec(data, (frames, 128), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap();
                (fbank, labels)
            })
            .collect()
    }

    fn view(set: &[(Tensor, Vec<usize>)]) -> Vec<LabelledFbank<'_>> {
        set.iter().map(|(f, l)| (f, l.as_slice())).collect()
    }

    #[test]
    fn the_probe_separates_what_fbank_statistics_tell_and_the_prior_does_not() {
        let train = toy_set(40, 1);
        let validation = toy_set(20, 2);
        let b = tagging_baselines(&view(&train), &view(&validation), 3).unwrap();
        assert_eq!(b.validation_clips, 20);
        assert_eq!(b.fbank_probe_grid.len(), PROBE_L2.len());
        // The prior scores every clip alike: each label's AP is its positive rate.
        let rate = |l: usize| validation.iter().filter(|c| c.1.contains(&l)).count() as f64 / 20.0;
        let want = (rate(0) + rate(1) + rate(2)) / 3.0;
        assert!((b.label_prior.map - want).abs() < 1e-12, "{b:?}");
        // Its top label is one of the two halves: right on half the clips.
        assert!((b.label_prior.top1 - 0.5).abs() < 1e-12, "{b:?}");
        // The probe ranks both halves perfectly; label 2 stays near chance.
        assert!(b.fbank_probe.map > (2.0 + rate(2)) / 3.0 - 0.1, "{b:?}");
        assert!(b.fbank_probe.map > b.label_prior.map + 0.25, "{b:?}");
        assert_eq!(b.fbank_probe.top1, 1.0, "{b:?}");
        let best = b
            .fbank_probe_grid
            .iter()
            .map(|p| p.map)
            .fold(f64::MIN, f64::max);
        assert_eq!(b.fbank_probe.map, best);
    }

    #[test]
    fn baselines_need_both_sets() {
        let train = toy_set(4, 1);
        assert!(tagging_baselines(&view(&train), &[], 3).is_err());
        assert!(tagging_baselines(&[], &view(&train), 3).is_err());
    }

    #[test]
    fn average_precision_by_hand() {
        // Label 0: positives ranked 1st and 3rd → (1 + 2/3) / 2; label 1: ranked 2nd
        // of its one positive → 1/2. Label 2 has no positive and does not count.
        let scores = vec![
            vec![0.9, 0.1, 0.0],
            vec![0.5, 0.8, 0.0],
            vec![0.2, 0.9, 0.0],
        ];
        let truth: Vec<&[usize]> = vec![&[0], &[1], &[0]];
        let map = mean_average_precision(&scores, &truth, 3);
        assert!(
            (map - ((1.0 + 2.0 / 3.0) / 2.0 + 0.5) / 2.0).abs() < 1e-12,
            "{map}"
        );
        assert!((top1(&scores, &truth) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn tied_scores_share_one_threshold() {
        // A constant score ranks nothing: AP is the label's positive rate (1/4 and
        // 3/4 here) in any order of the clips.
        let scores = vec![vec![0.5, 0.1]; 4];
        let truth: Vec<&[usize]> = vec![&[1], &[0, 1], &[1], &[]];
        let map = mean_average_precision(&scores, &truth, 2);
        assert!((map - (0.25 + 0.75) / 2.0).abs() < 1e-12, "{map}");
        // Ties inside a ranking: label 0 scores [0.9, 0.5, 0.5] with positives the
        // first and the last: precision 1 at the first threshold, 2/3 at the second.
        let scores = vec![vec![0.9], vec![0.5], vec![0.5]];
        let truth: Vec<&[usize]> = vec![&[0], &[], &[0]];
        let map = mean_average_precision(&scores, &truth, 1);
        assert!((map - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12, "{map}");
    }

    #[test]
    fn bce_matches_the_textbook_formula() {
        let x = Tensor::new(&[[2.0f32, -1.0, 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[1.0f32, 0.0, 1.0]], &Device::Cpu).unwrap();
        let got = bce_with_logits(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        let s = |v: f32| 1.0 / (1.0 + (-v).exp());
        let want = -((s(2.0)).ln() + (1.0 - s(-1.0)).ln() + s(0.0).ln()) / 3.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
