//! Reference points for a set's scores: the best single constant caption (one
//! caption given to every clip, the strongest trivial captioner) and the share of
//! captions that name the clip's sound (its class labels).

use std::collections::HashSet;

use super::{EvalError, score_corpus};

/// The constant caption with the highest CIDEr-D on `references`, among `pool`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConstantBaseline {
    pub caption: String,
    pub cider_d: f64,
    pub bleu_4: f64,
    pub rouge_l: f64,
    /// Distinct captions tried.
    pub tried: usize,
}

/// Scores every distinct caption of `pool` given to every clip and keeps the best
/// by CIDEr-D (ties: the first in `pool`).
pub fn best_constant_caption(
    pool: &[String],
    references: &[Vec<String>],
) -> Result<Option<ConstantBaseline>, EvalError> {
    let mut seen = HashSet::new();
    let mut best: Option<ConstantBaseline> = None;
    for caption in pool {
        let caption = caption.trim();
        if caption.is_empty() || !seen.insert(caption.to_lowercase()) {
            continue;
        }
        let candidates = vec![caption.to_string(); references.len()];
        let scores = score_corpus(&candidates, references)?;
        if best.as_ref().is_none_or(|b| scores.cider_d > b.cider_d) {
            best = Some(ConstantBaseline {
                caption: caption.to_string(),
                cider_d: scores.cider_d,
                bleu_4: scores.bleu[3],
                rouge_l: scores.rouge_l,
                tried: 0,
            });
        }
    }
    Ok(best.map(|b| ConstantBaseline {
        tried: seen.len(),
        ..b
    }))
}

/// Lower-case words of a text (letters, digits and apostrophes).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether `caption` contains one of `labels` as whole words (a label may be a
/// phrase: "church bell").
pub fn mentions_label(caption: &str, labels: &[String]) -> bool {
    let words = words(caption);
    labels.iter().any(|label| {
        let label_words = self::words(label);
        !label_words.is_empty()
            && words
                .windows(label_words.len())
                .any(|w| w == label_words.as_slice())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_whole_words_and_phrases() {
        let labels = vec!["dog".to_string(), "church bell".to_string()];
        assert!(mentions_label("A dog barks twice", &labels));
        assert!(!mentions_label("dogs bark", &labels));
        assert!(mentions_label("a church bell rings", &labels));
        assert!(!mentions_label("a bell rings in a church", &labels));
    }

    #[test]
    fn the_best_constant_is_the_most_typical_caption() {
        let refs = vec![
            vec!["a dog barks".to_string(), "a dog barks loudly".to_string()],
            vec!["a dog barks".to_string(), "the dog is barking".to_string()],
            vec!["rain falls".to_string(), "heavy rain falls".to_string()],
        ];
        let pool = ["rain falls", "a dog barks", "A dog barks", "birds sing"].map(String::from);
        let best = best_constant_caption(&pool, &refs).unwrap().unwrap();
        assert_eq!(best.caption, "a dog barks");
        assert_eq!(best.tried, 3);
        let direct = score_corpus(&vec!["a dog barks".to_string(); 3], &refs).unwrap();
        assert_eq!(best.cider_d, direct.cider_d);
    }
}
