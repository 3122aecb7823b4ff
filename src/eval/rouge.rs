//! ROUGE-L as pycocoevalcap's `rouge.py` (and aac-metrics) compute it.
//!
//! For each reference: the longest common subsequence (LCS) of tokens gives
//! precision `lcs / len(candidate)` and recall `lcs / len(reference)`. The best
//! precision and the best recall over the references (possibly from different
//! references) make the F-measure `(1 + b²) p r / (r + b² p)` with `b = 1.2`, or 0
//! when either is 0. An empty candidate scores 0 (aac-metrics' rule); an empty
//! reference has recall 0 here (the reference code divides by zero).

use super::Sentence;

const BETA: f64 = 1.2;

/// ROUGE-L of one candidate against its references.
pub(crate) fn score(cand: &Sentence, refs: &[Sentence]) -> f64 {
    let c = &cand.tokens;
    if c.is_empty() {
        return 0.0;
    }
    let mut prec_max = f64::NEG_INFINITY;
    let mut rec_max = f64::NEG_INFINITY;
    for r in refs {
        let lcs = lcs_len(&r.tokens, c) as f64;
        prec_max = prec_max.max(lcs / c.len() as f64);
        let rec = if r.tokens.is_empty() {
            0.0
        } else {
            lcs / r.tokens.len() as f64
        };
        rec_max = rec_max.max(rec);
    }
    if prec_max > 0.0 && rec_max > 0.0 {
        let b2 = BETA * BETA;
        ((1.0 + b2) * prec_max * rec_max) / (rec_max + b2 * prec_max)
    } else {
        0.0
    }
}

/// Length of the longest common subsequence, with two rows of the usual table.
fn lcs_len(a: &[u32], b: &[u32]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for &x in a {
        for (j, &y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(ids: &[u32]) -> Sentence {
        Sentence::from_ids(ids.to_vec())
    }

    #[test]
    fn lcs_examples() {
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4]), 2);
        assert_eq!(lcs_len(&[1, 2, 3], &[3, 2, 1]), 1);
        assert_eq!(lcs_len(&[], &[1]), 0);
    }

    #[test]
    fn best_precision_and_recall_combine() {
        // cand 1 2 3; ref A = 1 2 (p 2/3, r 1); ref B = 1 2 3 9 9 9 (p 1, r 1/2).
        let s = score(
            &sent(&[1, 2, 3]),
            &[sent(&[1, 2]), sent(&[1, 2, 3, 9, 9, 9])],
        );
        let (p, r) = (1.0, 1.0);
        let expected = (1.0 + 1.44) * p * r / (r + 1.44 * p);
        assert!((s - expected).abs() < 1e-12);
        assert_eq!(score(&sent(&[1]), &[sent(&[2])]), 0.0);
        assert_eq!(score(&sent(&[]), &[sent(&[2])]), 0.0);
    }
}
