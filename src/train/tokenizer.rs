//! A small byte-level BPE tokenizer trained on caption text, built like Llama 3's
//! (the same pre-tokenizer split pattern and byte-level mapping, `ignore_merges`)
//! and carrying the chat-template special tokens, so a small decoder trained with
//! it runs through the same prompt, export and generation code as Llama 3.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::ModelWrapper;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's pre-tokenizer pattern (contractions, words, 1-3 digit numbers,
/// punctuation runs, whitespace).
pub const LLAMA3_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens of the Llama 3 chat template, in id order after the BPE
/// vocabulary's own tokens are placed.
pub const SPECIAL_TOKENS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerTrainError {
    #[error("tokenizer: {0}")]
    Build(String),
    #[error("tokenizer: no text to train on")]
    NoText,
    #[error("tokenizer: vocab_size {0} is below the 256 byte symbols + special tokens")]
    VocabTooSmall(usize),
}

fn build_err(e: impl std::fmt::Display) -> TokenizerTrainError {
    TokenizerTrainError::Build(e.to_string())
}

/// Trains a byte-level BPE of at most `vocab_size` tokens (byte alphabet, merges,
/// and the special tokens) on `texts`, keeping merges seen at least `min_frequency`
/// times.
pub fn train_tokenizer(
    texts: &[String],
    vocab_size: usize,
    min_frequency: u64,
) -> Result<Tokenizer, TokenizerTrainError> {
    if texts.iter().all(|t| t.trim().is_empty()) {
        return Err(TokenizerTrainError::NoText);
    }
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        return Err(TokenizerTrainError::VocabTooSmall(vocab_size));
    }
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(build_err)?;
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]);
    let model = BPE::builder()
        .ignore_merges(true)
        .build()
        .map_err(build_err)?;
    let mut tokenizer = Tokenizer::new(ModelWrapper::BPE(model));
    tokenizer
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            true, false, true,
        ))))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::new(
            true, true, true,
        ))));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size - SPECIAL_TOKENS.len())
        .min_frequency(min_frequency)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts.iter().map(String::as_str))
        .map_err(build_err)?;
    // Added after training so they sit after the BPE ids, as in Llama 3, and are
    // never split or merged.
    tokenizer
        .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
        .map_err(build_err)?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::prompt::{DEFAULT_PROMPT_TEMPLATE, PromptTemplate};

    fn captions() -> Vec<String> {
        let subjects = [
            "a dog",
            "a man",
            "rain",
            "a bell",
            "wind",
            "a woman",
            "the engine",
        ];
        let actions = [
            "barks loudly",
            "speaks in the distance",
            "falls on a roof",
            "rings twice",
            "blows through the trees",
            "hums steadily",
        ];
        subjects
            .iter()
            .flat_map(|s| actions.iter().map(move |a| format!("{s} {a}")))
            .chain([
                "Describe the following audio clip".to_string(),
                "user assistant".to_string(),
            ])
            .collect()
    }

    #[test]
    fn trained_tokenizer_round_trips_text_and_keeps_special_tokens_whole() {
        let tokenizer = train_tokenizer(&captions(), 400, 2).unwrap();
        let vocab = tokenizer.get_vocab_size(true);
        assert!(vocab <= 400 && vocab > 256 + 5, "{vocab}");
        // Special tokens are single ids after every BPE id.
        let eot = tokenizer.token_to_id("<|eot_id|>").unwrap();
        let bos = tokenizer.token_to_id("<|begin_of_text|>").unwrap();
        assert_eq!(eot as usize, vocab - 1);
        assert_eq!(bos as usize, vocab - 5);
        let prompt = PromptTemplate::parse(DEFAULT_PROMPT_TEMPLATE).unwrap();
        let ids = prompt
            .tokenize(&tokenizer, std::path::Path::new("t.json"))
            .unwrap();
        assert_eq!(ids.prefix[0], bos);
        assert!(ids.suffix.contains(&eot));
        // Any text round-trips (bytes never seen in training included), and words
        // seen often become single tokens.
        for text in [
            "a dog barks loudly",
            "Ünïcödé — 42 dogs!",
            "rain falls on a roof",
        ] {
            let enc = tokenizer.encode(text, false).unwrap();
            assert_eq!(tokenizer.decode(enc.get_ids(), true).unwrap(), text);
        }
        let enc = tokenizer.encode("a dog barks loudly", false).unwrap();
        assert!(enc.get_ids().len() <= 4, "{:?}", enc.get_tokens());
    }

    #[test]
    fn saved_tokenizer_loads_back_identically() {
        let tokenizer = train_tokenizer(&captions(), 300, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tokenizer.save(&path, true).unwrap();
        let loaded = crate::model::prompt::load_tokenizer(&path).unwrap();
        let text = "the engine hums steadily<|eot_id|>";
        assert_eq!(
            loaded.encode(text, false).unwrap().get_ids(),
            tokenizer.encode(text, false).unwrap().get_ids()
        );
    }

    #[test]
    fn too_small_a_vocabulary_or_no_text_is_an_error() {
        assert!(train_tokenizer(&captions(), 100, 2).is_err());
        assert!(train_tokenizer(&[String::new()], 400, 2).is_err());
    }
}
