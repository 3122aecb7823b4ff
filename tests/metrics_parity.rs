//! BLEU-1..4, ROUGE-L and CIDEr-D against the reference implementation's scores
//! (pycocoevalcap through aac-metrics 0.6.0) in `metrics/reference.json`.

use std::collections::BTreeMap;

use crate::common::{MetricsReference as Reference, fixtures};

const TOLERANCE: f64 = 1e-6;

#[test]
fn metrics_match_reference_scores() {
    let path = fixtures().join("metrics/reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let reference: Reference = serde_json::from_str(&text).expect("parsing reference.json");
    assert!(!reference.sets.is_empty());

    let mut worst: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, set) in &reference.sets {
        let got = audiocap::eval::score_corpus(&set.candidates, &set.references)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.per_clip.len(), set.candidates.len());
        let ours = [
            ("bleu_1", got.bleu[0]),
            ("bleu_2", got.bleu[1]),
            ("bleu_3", got.bleu[2]),
            ("bleu_4", got.bleu[3]),
            ("rouge_l", got.rouge_l),
            ("cider_d", got.cider_d),
        ];
        for (metric, value) in ours {
            let expected = set.scores[metric];
            let diff = (value - expected).abs();
            eprintln!("{name} {metric}: ours {value:.12} reference {expected:.12} diff {diff:.3e}");
            let w = worst.entry(metric).or_insert(0.0);
            *w = w.max(diff);
            assert!(
                diff <= TOLERANCE,
                "{name} {metric}: ours {value} reference {expected} (diff {diff:e})"
            );
        }
    }
    eprintln!("max differences: {worst:?}");
}
