//! The prompt around the audio embedding: a template with one `<|audio|>`
//! placeholder, tokenized as two halves.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

/// Where the audio embedding goes in the prompt.
pub const AUDIO_PLACEHOLDER: &str = "<|audio|>";

/// The Llama 3 chat template around the paper's instruction.
pub const DEFAULT_PROMPT_TEMPLATE: &str = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDescribe the following audio clip <|audio|><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("prompt template: {0}")]
    Template(String),
    #[error("{}: tokenizer: {message}", file.display())]
    Tokenizer { file: PathBuf, message: String },
}

/// A prompt template split at its single `<|audio|>` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    prefix: String,
    suffix: String,
}

/// Token ids of the text before and after the audio embedding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptIds {
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
}

impl PromptTemplate {
    pub fn parse(text: &str) -> Result<Self, PromptError> {
        let mut parts = text.split(AUDIO_PLACEHOLDER);
        let (Some(prefix), Some(suffix), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(PromptError::Template(format!(
                "must contain {AUDIO_PLACEHOLDER} exactly once: {text:?}"
            )));
        };
        Ok(Self {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    pub fn text(&self) -> String {
        format!("{}{AUDIO_PLACEHOLDER}{}", self.prefix, self.suffix)
    }

    /// Tokenizes prefix and suffix separately, special tokens recognised, no BOS
    /// added (the template carries its own `<|begin_of_text|>`).
    pub fn tokenize(&self, tokenizer: &Tokenizer, file: &Path) -> Result<PromptIds, PromptError> {
        let encode = |text: &str| -> Result<Vec<u32>, PromptError> {
            tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| PromptError::Tokenizer {
                    file: file.to_path_buf(),
                    message: e.to_string(),
                })
        };
        Ok(PromptIds {
            prefix: encode(&self.prefix)?,
            suffix: encode(&self.suffix)?,
        })
    }
}

/// Loads `tokenizer.json`.
pub fn load_tokenizer(file: &Path) -> Result<Tokenizer, PromptError> {
    Tokenizer::from_file(file).map_err(|e| PromptError::Tokenizer {
        file: file.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_needs_exactly_one_placeholder() {
        let t = PromptTemplate::parse(DEFAULT_PROMPT_TEMPLATE).unwrap();
        assert_eq!(t.text(), DEFAULT_PROMPT_TEMPLATE);
        assert!(t.prefix.ends_with("audio clip "));
        assert!(PromptTemplate::parse("no placeholder").is_err());
        assert!(PromptTemplate::parse("<|audio|> and <|audio|>").is_err());
    }
}
