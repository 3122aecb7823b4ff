//! The DCASE caption metrics, computed as the reference code computes them.
//!
//! The reference is pycocoevalcap's scorers as aac-metrics 0.6.0 runs them: captions
//! are PTB-tokenized and stripped of punctuation ([`tokenize`]), then scored by
//! BLEU-1..4 ([`bleu`]), ROUGE-L ([`rouge`]) and CIDEr-D ([`cider`]). Tokens are
//! interned to integers and n-grams counted in hash maps, so scoring is linear in
//! the size of the corpus.
//!
//! METEOR 1.5 and SPICE are the reference's own jars, run as child processes
//! ([`meteor`], [`spice`]) when Java and the jars are found ([`jvm`]); otherwise they
//! are reported unavailable with the reason, and the native metrics stand alone.

pub mod baselines;
mod bleu;
mod cider;
pub mod command;
pub mod fense;
pub mod files;
pub mod jvm;
pub mod meteor;
pub mod report;
mod rouge;
pub mod spice;
mod tokenize;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub use tokenize::tokenize;

/// Largest n-gram order used by BLEU and CIDEr-D.
pub(crate) const MAX_N: usize = 4;

/// Scores of one candidate, as the reference computes them per candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipScores {
    /// BLEU-1..4 of this candidate alone (the reference's per-sentence BLEU, with
    /// its own brevity penalty).
    pub bleu: [f64; 4],
    /// ROUGE-L (F-measure with beta = 1.2, best precision and recall over the
    /// references).
    pub rouge_l: f64,
    /// CIDEr-D (×10, document frequencies from the whole evaluated set).
    pub cider_d: f64,
}

/// Corpus-level scores and the per-candidate scores they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusScores {
    /// Corpus BLEU-1..4: clipped n-gram counts and lengths summed over the corpus,
    /// one brevity penalty.
    pub bleu: [f64; 4],
    /// Mean of the per-candidate ROUGE-L.
    pub rouge_l: f64,
    /// Mean of the per-candidate CIDEr-D.
    pub cider_d: f64,
    /// One entry per candidate, in input order.
    pub per_clip: Vec<ClipScores>,
}

/// Why a corpus could not be scored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    /// The candidate and reference lists differ in length.
    #[error("{candidates} candidates but {references} reference lists; they must pair up")]
    LengthMismatch {
        /// Number of candidates.
        candidates: usize,
        /// Number of reference lists.
        references: usize,
    },
    /// A candidate has an empty reference list.
    #[error("candidate {index} has no references")]
    NoReferences {
        /// Position of the candidate in the input.
        index: usize,
    },
    /// There is nothing to score.
    #[error("no candidates to score")]
    Empty,
}

/// Tokenize every caption and compute BLEU-1..4, ROUGE-L and CIDEr-D.
///
/// `references[i]` holds the reference captions of `candidates[i]`. Captions are raw
/// text; they are tokenized with [`tokenize`].
pub fn score_corpus(
    candidates: &[String],
    references: &[Vec<String>],
) -> Result<CorpusScores, EvalError> {
    let corpus = PreparedCorpus::new(candidates, references)?;
    let (bleu, bleu_per_clip) = corpus.bleu();
    let rouge_per_clip = corpus.rouge_l();
    let cider_per_clip = corpus.cider_d();

    let n = candidates.len() as f64;
    let rouge_l = rouge_per_clip.iter().sum::<f64>() / n;
    let cider_d = cider_per_clip.iter().sum::<f64>() / n;
    let per_clip = bleu_per_clip
        .into_iter()
        .zip(rouge_per_clip)
        .zip(cider_per_clip)
        .map(|((bleu, rouge_l), cider_d)| ClipScores {
            bleu,
            rouge_l,
            cider_d,
        })
        .collect();
    Ok(CorpusScores {
        bleu,
        rouge_l,
        cider_d,
        per_clip,
    })
}

/// Candidates and reference lists pair up, and there is at least one pair.
pub(crate) fn check_pairs<T>(candidates: &[String], references: &[T]) -> Result<(), EvalError> {
    if candidates.len() != references.len() {
        return Err(EvalError::LengthMismatch {
            candidates: candidates.len(),
            references: references.len(),
        });
    }
    if candidates.is_empty() {
        return Err(EvalError::Empty);
    }
    Ok(())
}

/// Captions tokenized, interned and counted once, for the metrics to share; lets a
/// caller (the benchmark) time each metric on its own.
pub struct PreparedCorpus {
    cands: Vec<Sentence>,
    refs: Vec<Vec<Sentence>>,
}

impl PreparedCorpus {
    /// Tokenizes and counts the captions; fails on the inputs [`score_corpus`] refuses.
    pub fn new(candidates: &[String], references: &[Vec<String>]) -> Result<Self, EvalError> {
        check_pairs(candidates, references)?;
        if let Some(index) = references.iter().position(Vec::is_empty) {
            return Err(EvalError::NoReferences { index });
        }
        let mut vocab = Vocab::default();
        let cands = candidates
            .iter()
            .map(|c| Sentence::new(&mut vocab, c))
            .collect();
        let refs = references
            .iter()
            .map(|rs| rs.iter().map(|r| Sentence::new(&mut vocab, r)).collect())
            .collect();
        Ok(PreparedCorpus { cands, refs })
    }

    /// Corpus BLEU-1..4 and each candidate's.
    pub fn bleu(&self) -> ([f64; 4], Vec<[f64; 4]>) {
        bleu::score(&self.cands, &self.refs)
    }

    /// Each candidate's ROUGE-L.
    pub fn rouge_l(&self) -> Vec<f64> {
        self.cands
            .iter()
            .zip(&self.refs)
            .map(|(c, rs)| rouge::score(c, rs))
            .collect()
    }

    /// Each candidate's CIDEr-D.
    pub fn cider_d(&self) -> Vec<f64> {
        cider::score(&self.cands, &self.refs)
    }
}

/// METEOR and SPICE, each computed or with the reason it was not.
#[derive(Debug, Clone, PartialEq)]
pub struct JavaScores {
    pub meteor: Result<meteor::MeteorScores, jvm::Unavailable>,
    pub spice: Result<spice::SpiceScores, jvm::Unavailable>,
}

impl JavaScores {
    /// Both metrics unavailable for the same reason.
    pub fn unavailable(reason: &str) -> Self {
        JavaScores {
            meteor: Err(jvm::Unavailable(format!("METEOR {reason}"))),
            spice: Err(jvm::Unavailable(format!("SPICE {reason}"))),
        }
    }

    /// SPIDEr (corpus, per candidate) from the native CIDEr-D and SPICE.
    pub fn spider(&self, native: &CorpusScores) -> Result<(f64, Vec<f64>), jvm::Unavailable> {
        match &self.spice {
            Ok(s) => Ok((
                spice::spider(native.cider_d, s.corpus),
                native
                    .per_clip
                    .iter()
                    .zip(&s.per_clip)
                    .map(|(c, &sp)| spice::spider(c.cider_d, sp))
                    .collect(),
            )),
            Err(_) => Err(jvm::Unavailable(
                "SPIDEr is (CIDEr-D + SPICE) / 2 and SPICE is unavailable".to_string(),
            )),
        }
    }
}

/// Runs METEOR and SPICE on raw captions (one JVM each) where their setup is found.
/// Never fails: what cannot be computed is reported as [`jvm::Unavailable`] with the
/// reason (what was not found where, or the tool's stderr).
pub fn score_java_metrics(
    paths: &jvm::JavaPaths,
    env: &jvm::Environment,
    candidates: &[String],
    references: &[Vec<String>],
) -> JavaScores {
    let failed = |tool: &str, e: jvm::JavaError| jvm::Unavailable(format!("{tool} failed: {e}"));
    let meteor = meteor::MeteorSetup::discover(paths, env).and_then(|setup| {
        tracing::info!(jar = %setup.jar.display(), java = %setup.java.display(), "running METEOR");
        meteor::meteor(&setup, candidates, references).map_err(|e| failed("METEOR", e))
    });
    let spice = spice::SpiceSetup::discover(paths, env).and_then(|setup| {
        tracing::info!(jar = %setup.jar.display(), java = %setup.java.display(), "running SPICE");
        spice::spice(&setup, candidates, references).map_err(|e| failed("SPICE", e))
    });
    JavaScores { meteor, spice }
}

/// An n-gram of interned tokens; unused positions hold [`PAD`].
pub(crate) type Ngram = [u32; MAX_N];
const PAD: u32 = u32::MAX;

/// Order of an n-gram (1..=4).
pub(crate) fn order(ngram: &Ngram) -> usize {
    ngram.iter().take_while(|&&t| t != PAD).count()
}

/// A multiplicative hash (FxHash's constant) for small integer keys; the default
/// SipHash is several times slower and its DoS resistance buys nothing here.
#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        // The product's low bits depend only on the inputs' low bits; fold the high
        // bits down, since the table picks buckets with the low ones.
        let x = self.0 ^ (self.0 >> 33);
        x.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ (x >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Token strings to integers.
#[derive(Default)]
struct Vocab(HashMap<String, u32>);

impl Vocab {
    fn id(&mut self, token: String) -> u32 {
        let next = self.0.len() as u32;
        *self.0.entry(token).or_insert(next)
    }
}

/// A tokenized caption and its n-gram counts (orders 1..=4, all in one map).
pub(crate) struct Sentence {
    pub(crate) tokens: Vec<u32>,
    pub(crate) counts: FastMap<Ngram, u32>,
}

impl Sentence {
    fn new(vocab: &mut Vocab, text: &str) -> Self {
        let tokens: Vec<u32> = tokenize(text).into_iter().map(|t| vocab.id(t)).collect();
        Self::from_ids(tokens)
    }

    pub(crate) fn from_ids(tokens: Vec<u32>) -> Self {
        let mut counts = FastMap::default();
        for k in 1..=MAX_N {
            for window in tokens.windows(k) {
                let mut ngram = [PAD; MAX_N];
                ngram[..k].copy_from_slice(window);
                *counts.entry(ngram).or_insert(0) += 1;
            }
        }
        Sentence { tokens, counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn errors_name_the_problem() {
        let c = strings(&["a dog"]);
        assert_eq!(
            score_corpus(&c, &[]),
            Err(EvalError::LengthMismatch {
                candidates: 1,
                references: 0
            })
        );
        assert_eq!(
            score_corpus(&strings(&["a", "b"]), &[strings(&["a"]), vec![]]),
            Err(EvalError::NoReferences { index: 1 })
        );
        assert_eq!(score_corpus(&[], &[]), Err(EvalError::Empty));
    }

    #[test]
    fn identical_candidates_score_one() {
        let c = strings(&["a dog barks at the mailman", "rain falls on a tin roof"]);
        let r = vec![
            strings(&["A dog barks at the mailman."]),
            strings(&["Rain falls on a tin roof!", "water drips"]),
        ];
        let s = score_corpus(&c, &r).unwrap();
        for b in s.bleu {
            assert!((b - 1.0).abs() < 1e-8, "{b}");
        }
        assert!((s.rouge_l - 1.0).abs() < 1e-12);
        for clip in &s.per_clip {
            for b in clip.bleu {
                assert!((b - 1.0).abs() < 1e-8, "{b}");
            }
            assert!((clip.rouge_l - 1.0).abs() < 1e-12);
        }
        // Every n-gram of each reference occurs in one document of two: idf log(2/1).
        // The first candidate has one reference equal to it: cosine 1 for each n.
        assert!((s.per_clip[0].cider_d - 10.0).abs() < 1e-9);
    }

    #[test]
    fn empty_candidate_scores_zero() {
        let c = strings(&["", "a cat meows"]);
        let r = vec![strings(&["a dog barks"]), strings(&["a cat meows"])];
        let s = score_corpus(&c, &r).unwrap();
        assert_eq!(s.per_clip[0].rouge_l, 0.0);
        assert_eq!(s.per_clip[0].cider_d, 0.0);
        assert!(s.per_clip[0].bleu.iter().all(|&b| b < 1e-9));
        assert!((s.per_clip[1].rouge_l - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ngram_orders() {
        let s = Sentence::from_ids(vec![1, 2, 1, 2]);
        assert_eq!(s.counts[&[1, 2, PAD, PAD]], 2);
        assert_eq!(s.counts[&[1, 2, 1, 2]], 1);
        assert_eq!(order(&[1, 2, 1, PAD]), 3);
        assert_eq!(s.counts.len(), 2 + 2 + 2 + 1);
    }
}
