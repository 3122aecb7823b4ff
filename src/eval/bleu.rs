//! BLEU-1..4 as pycocoevalcap's `bleu_scorer.py` computes it (option "closest").
//!
//! Per candidate: n-gram counts clipped by the largest count in any one reference,
//! "guess" counts `max(0, len - k + 1)`, and the effective reference length is the
//! reference length closest to the candidate's (ties go to the shorter). The corpus
//! score sums correct and guess counts and both lengths over all candidates. With
//! `tiny = 1e-15` and `small = 1e-9` the score of order n is
//! `(prod_{k<=n} (correct_k + tiny) / (guess_k + small))^(1/n)`, multiplied by the
//! brevity penalty `exp(1 - 1/ratio)` where `ratio = (testlen + tiny) / (reflen +
//! small) < 1`. Per-candidate scores use the same formula on the candidate's counts.

use super::{FastMap, MAX_N, Ngram, Sentence, order};

const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;

/// What BLEU needs to know about one candidate.
#[derive(Default, Clone, Copy)]
struct Comps {
    testlen: usize,
    reflen: usize,
    guess: [usize; MAX_N],
    correct: [usize; MAX_N],
}

/// Corpus BLEU-1..4 and the per-candidate BLEU-1..4.
pub(crate) fn score(cands: &[Sentence], refs: &[Vec<Sentence>]) -> ([f64; 4], Vec<[f64; 4]>) {
    let mut total = Comps::default();
    let mut per_clip = Vec::with_capacity(cands.len());
    for (cand, rs) in cands.iter().zip(refs) {
        let comps = cook(cand, rs);
        total.testlen += comps.testlen;
        total.reflen += comps.reflen;
        for k in 0..MAX_N {
            total.guess[k] += comps.guess[k];
            total.correct[k] += comps.correct[k];
        }
        per_clip.push(bleu_of(&comps));
    }
    (bleu_of(&total), per_clip)
}

fn cook(cand: &Sentence, refs: &[Sentence]) -> Comps {
    let testlen = cand.tokens.len();
    let mut max_counts: FastMap<Ngram, u32> = FastMap::default();
    for r in refs {
        for (ngram, &count) in &r.counts {
            let entry = max_counts.entry(*ngram).or_insert(0);
            *entry = (*entry).max(count);
        }
    }
    // min over (|l - testlen|, l): the closest length, the shorter on a tie.
    let reflen = refs
        .iter()
        .map(|r| r.tokens.len())
        .min_by_key(|&l| (l.abs_diff(testlen), l))
        .unwrap_or(0);
    let mut comps = Comps {
        testlen,
        reflen,
        ..Comps::default()
    };
    for k in 0..MAX_N {
        comps.guess[k] = (testlen + 1).saturating_sub(k + 1);
    }
    for (ngram, &count) in &cand.counts {
        let clipped = count.min(max_counts.get(ngram).copied().unwrap_or(0));
        comps.correct[order(ngram) - 1] += clipped as usize;
    }
    comps
}

fn bleu_of(c: &Comps) -> [f64; 4] {
    let mut out = [0.0; 4];
    let mut product = 1.0;
    for (k, score) in out.iter_mut().enumerate() {
        product *= (c.correct[k] as f64 + TINY) / (c.guess[k] as f64 + SMALL);
        *score = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (c.testlen as f64 + TINY) / (c.reflen as f64 + SMALL);
    if ratio < 1.0 {
        let penalty = (1.0 - 1.0 / ratio).exp();
        for b in &mut out {
            *b *= penalty;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(ids: &[u32]) -> Sentence {
        Sentence::from_ids(ids.to_vec())
    }

    #[test]
    fn clipping_and_closest_length() {
        // Candidate "1 1 1 1" against "1 2 3" and "1 1 5 6 7": unigram 1 clipped to 2.
        let (_, per) = score(
            &[sent(&[1, 1, 1, 1])],
            &[vec![sent(&[1, 2, 3]), sent(&[1, 1, 5, 6, 7])]],
        );
        let p1 = (2.0 + TINY) / (4.0 + SMALL);
        // Lengths 3 and 5 are both 1 away from 4: the shorter (3) wins, no penalty.
        assert!((per[0][0] - p1).abs() < 1e-12);
        let cooked = cook(
            &sent(&[1, 1, 1, 1]),
            &[sent(&[1, 2, 3]), sent(&[1, 1, 5, 6, 7])],
        );
        assert_eq!(cooked.reflen, 3);
        assert_eq!(cooked.guess, [4, 3, 2, 1]);
        assert_eq!(cooked.correct, [2, 1, 0, 0]);
    }

    #[test]
    fn brevity_penalty() {
        let (corpus, _) = score(&[sent(&[1, 2])], &[vec![sent(&[1, 2, 3, 4])]]);
        let expected = (1.0 - 1.0 / ((2.0 + TINY) / (4.0 + SMALL))).exp();
        assert!((corpus[0] - expected).abs() < 1e-9);
    }
}
