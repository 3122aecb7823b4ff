//! BLEU-1..4, ROUGE-L and CIDEr-D against the reference implementation's scores
//! (pycocoevalcap through aac-metrics 0.6.0) in `metrics/reference.json`.

use std::collections::BTreeMap;

use crate::common::{METEOR_SETUP_HELP, MetricsReference as Reference, fixtures, meteor_setup};

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

/// METEOR 1.5 through the jar, one JVM for every set, against the reference's corpus
/// METEOR (same jar, driven by pycocoevalcap through aac-metrics 0.6.0).
#[test]
fn meteor_matches_reference_scores() {
    const METEOR_TOLERANCE: f64 = 1e-4;
    let path = fixtures().join("metrics/reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let reference: Reference = serde_json::from_str(&text).expect("parsing reference.json");
    let mut meteor = audiocap::eval::meteor::Meteor::start(&meteor_setup())
        .unwrap_or_else(|e| panic!("starting METEOR: {e}; {METEOR_SETUP_HELP}"));

    for (name, set) in &reference.sets {
        let got = meteor
            .score(&set.candidates, &set.references)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = set.scores["meteor"];
        let diff = (got.corpus - expected).abs();
        eprintln!(
            "{name} meteor: ours {:.12} reference {expected:.12} diff {diff:.3e}",
            got.corpus
        );
        assert!(
            diff <= METEOR_TOLERANCE,
            "{name} meteor: ours {} reference {expected} (diff {diff:e})",
            got.corpus
        );
        assert_eq!(got.per_clip.len(), set.candidates.len());
        // A segment's score does not depend on the others: each candidate scored alone
        // (a one-segment corpus) gives its per-clip score, so the order is right.
        for (i, (c, rs)) in set.candidates.iter().zip(&set.references).enumerate() {
            let alone = meteor
                .score(std::slice::from_ref(c), std::slice::from_ref(rs))
                .unwrap_or_else(|e| panic!("{name}[{i}]: {e}"));
            assert!(
                (alone.corpus - got.per_clip[i]).abs() < 1e-12,
                "{name}[{i}]: alone {} vs in corpus {}",
                alone.corpus,
                got.per_clip[i]
            );
            assert!((0.0..=1.0).contains(&got.per_clip[i]));
        }
    }

    // Captions that could upset the line protocol: an empty candidate (punctuation
    // only) and separators inside captions. The empty candidate scores 0; an exact
    // match scores higher than a partial one.
    let candidates = vec![
        "...".to_string(),
        "a dog ||| barks".to_string(),
        "a dog barks".to_string(),
    ];
    let refs = vec![vec!["a dog barks".to_string(), "a cat ||| meows".to_string()]; 3];
    let got = meteor.score(&candidates, &refs).expect("edge cases");
    assert_eq!(got.per_clip[0], 0.0);
    assert!(got.per_clip[2] > 0.9, "{:?}", got.per_clip);
    assert!(
        got.per_clip[1] > 0.0 && got.per_clip[1] < 1.0,
        "{:?}",
        got.per_clip
    );
}
