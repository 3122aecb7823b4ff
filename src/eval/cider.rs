//! CIDEr-D as pycocoevalcap's `ciderD_scorer.py` (and aac-metrics) compute it.
//!
//! - Document frequency of an n-gram: the number of candidates whose references
//!   (any of them) contain it. `ref_len = ln(number of candidates)`.
//! - A caption's vector for order n: `tf * (ref_len - ln(max(1, df)))` for each of its
//!   n-grams, with the Euclidean norm per order. Its "length" is its number of
//!   bigrams (the reference code counts `term_freq` where the order index is 1),
//!   i.e. `max(0, words - 1)`.
//! - Similarity with one reference, per order: `sum min(c, r) * r` over the
//!   candidate's n-grams (clipping), divided by both norms when neither is 0, times
//!   the Gaussian length penalty `exp(-delta² / (2 sigma²))`, `sigma = 6`.
//! - Per candidate: similarities summed over references, mean over the 4 orders,
//!   divided by the number of references, times 10.
//!
//! With a single candidate `ref_len` is 0 and every score is 0 (pycocoevalcap's
//! result; aac-metrics refuses fewer than two candidates).

use super::{FastMap, MAX_N, Ngram, Sentence, order};

const SIGMA: f64 = 6.0;
const SCALE: f64 = 10.0;

/// A caption's tf-idf weights, norms per order and length (bigram count).
struct TfIdf {
    weights: FastMap<Ngram, f64>,
    norms: [f64; MAX_N],
    length: u32,
}

/// Per-candidate CIDEr-D.
pub(crate) fn score(cands: &[Sentence], refs: &[Vec<Sentence>]) -> Vec<f64> {
    let mut doc_freq: FastMap<Ngram, u32> = FastMap::default();
    let mut seen: FastMap<Ngram, ()> = FastMap::default();
    for rs in refs {
        seen.clear();
        for r in rs {
            for ngram in r.counts.keys() {
                seen.insert(*ngram, ());
            }
        }
        for ngram in seen.keys() {
            *doc_freq.entry(*ngram).or_insert(0) += 1;
        }
    }
    let ref_len = (cands.len() as f64).ln();

    cands
        .iter()
        .zip(refs)
        .map(|(cand, rs)| {
            let c = tf_idf(cand, &doc_freq, ref_len);
            let mut sums = [0.0; MAX_N];
            for r in rs {
                let r = tf_idf(r, &doc_freq, ref_len);
                let sim = similarity(&c, &r);
                for k in 0..MAX_N {
                    sums[k] += sim[k];
                }
            }
            let mean = (((sums[0] + sums[1]) + sums[2]) + sums[3]) / MAX_N as f64;
            mean / rs.len() as f64 * SCALE
        })
        .collect()
}

fn tf_idf(s: &Sentence, doc_freq: &FastMap<Ngram, u32>, ref_len: f64) -> TfIdf {
    let mut weights = FastMap::default();
    let mut norms = [0.0; MAX_N];
    let mut length = 0;
    for (ngram, &tf) in &s.counts {
        let df = doc_freq.get(ngram).copied().unwrap_or(0);
        let log_df = f64::from(df).max(1.0).ln();
        let w = f64::from(tf) * (ref_len - log_df);
        let n = order(ngram) - 1;
        norms[n] += w * w;
        if n == 1 {
            length += tf;
        }
        weights.insert(*ngram, w);
    }
    for norm in &mut norms {
        *norm = norm.sqrt();
    }
    TfIdf {
        weights,
        norms,
        length,
    }
}

fn similarity(c: &TfIdf, r: &TfIdf) -> [f64; MAX_N] {
    let delta = f64::from(c.length) - f64::from(r.length);
    let mut sim = [0.0; MAX_N];
    for (ngram, &cw) in &c.weights {
        let rw = r.weights.get(ngram).copied().unwrap_or(0.0);
        sim[order(ngram) - 1] += cw.min(rw) * rw;
    }
    let penalty = std::f64::consts::E.powf(-(delta * delta) / (2.0 * SIGMA * SIGMA));
    for ((s, cn), rn) in sim.iter_mut().zip(c.norms).zip(r.norms) {
        if cn != 0.0 && rn != 0.0 {
            *s /= cn * rn;
        }
        *s *= penalty;
    }
    sim
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(ids: &[u32]) -> Sentence {
        Sentence::from_ids(ids.to_vec())
    }

    #[test]
    fn single_candidate_scores_zero() {
        assert_eq!(score(&[sent(&[1, 2])], &[vec![sent(&[1, 2])]]), vec![0.0]);
    }

    #[test]
    fn length_penalty_uses_bigram_counts() {
        // Two clips with disjoint vocabularies: every reference n-gram has df 1, so
        // idf is ln 2 for all and a candidate equal to its reference has cosine 1 for
        // every order it has.
        // The second reference of clip 0 is the candidate plus two words: the unigram
        // and bigram cosines are below 1 and the penalty uses delta = 2.
        let cands = [sent(&[1, 2, 3]), sent(&[7, 8])];
        let refs = [
            vec![sent(&[1, 2, 3]), sent(&[1, 2, 3, 4, 5])],
            vec![sent(&[7, 8])],
        ];
        let s = score(&cands, &refs);
        // Clip 1 has no 3- or 4-grams: cosines (1, 1, 0, 0).
        assert!((s[1] - 5.0).abs() < 1e-12);
        // Reference 2 vs candidate: shared 1-grams 3 of 5, 2-grams 2 of 4, 3-grams 1 of 3,
        // 4-grams 0 (the candidate has none); cosines sqrt(3/5), sqrt(2/4), sqrt(1/3), 0.
        let penalty = (-(4.0f64) / 72.0).exp();
        let second =
            ((3.0f64 / 5.0).sqrt() + (2.0f64 / 4.0).sqrt() + (1.0f64 / 3.0).sqrt()) * penalty;
        // The candidate has no 4-gram: its first-reference score is (1 + 1 + 1 + 0).
        let expected = ((3.0 + second) / 4.0) / 2.0 * 10.0;
        assert!((s[0] - expected).abs() < 1e-12, "{} vs {expected}", s[0]);
    }
}
