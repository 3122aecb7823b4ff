//! The contract between `export`, which writes the graphs, and `engine`, which binds
//! them: the names of each graph's inputs and outputs, and the limits both sides hold
//! to. It sits below both and uses nothing else of the crate.

/// Names of the encoder graph's inputs and outputs (`audio_encoder.onnx`).
pub mod encoder {
    pub const FBANK: &str = "fbank";
    pub const FBANK_LENGTHS: &str = "fbank_lengths";
    pub const AUDIO_EMBEDS: &str = "audio_embeds";
    pub const AUDIO_EMBEDS_MASK: &str = "audio_embeds_mask";
    /// The clip embedding in the encoder's space: the mean encoder output over a
    /// clip's valid patches, [batch, encoder_dim] f32. Exports since graph revision 3.
    pub const ENCODER_EMBEDDING: &str = "encoder_embedding";
    /// Sound-event tag probabilities, [batch, labels] f32: only in exports of a
    /// fine-tuned (tagging) checkpoint.
    pub const TAG_PROBS: &str = "tag_probs";
}

/// Names of the decoder graphs' inputs and outputs (`embedding.onnx`, `decoder.onnx`)
/// and the longest cache the fused decoder takes.
pub mod decoder {
    pub const INPUT_IDS: &str = "input_ids";
    pub const INPUTS_EMBEDS: &str = "inputs_embeds";
    pub const ATTENTION_MASK: &str = "attention_mask";
    pub const POSITION_IDS: &str = "position_ids";
    pub const LOGITS: &str = "logits";
    pub const SUPPRESS_STOPS: &str = "suppress_stops";
    pub const NEXT_TOKEN: &str = "next_token";
    pub const NEXT_TOKEN_LOGPROB: &str = "next_token_logprob";
    /// Fused attention: per row, its length after the call minus one (int32).
    pub const SEQLENS_K: &str = "seqlens_k";
    /// Fused attention: the longest row's length after the call (int32 scalar).
    pub const TOTAL_SEQUENCE_LENGTH: &str = "total_sequence_length";

    pub fn past_key(layer: usize) -> String {
        format!("past_key_values.{layer}.key")
    }
    pub fn past_value(layer: usize) -> String {
        format!("past_key_values.{layer}.value")
    }
    pub fn present_key(layer: usize) -> String {
        format!("present.{layer}.key")
    }
    pub fn present_value(layer: usize) -> String {
        format!("present.{layer}.value")
    }

    /// Positions the fused graph's cos/sin tables cover (a caption's prompt and tokens
    /// stay far below; the engine refuses caches longer than this).
    pub const FUSED_MAX_POSITIONS: usize = 4096;
}
