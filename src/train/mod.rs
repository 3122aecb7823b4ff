//! The companion trainer (issue #5): `audiocap train` runs the recipe's stages over
//! training sets matched to their audio ([`data`]), with frozen encoder features
//! cached on disk ([`features`]), the trainable projector + LoRA model ([`model`]),
//! AdamW ([`optim`]) under the warm-up + cosine schedule ([`schedule`]).
//! `audiocap merge` (adapter concatenation) lives on `model::lora::PeftAdapter::cat`.

pub mod config;
pub mod data;
pub mod encode;
pub mod features;
pub mod lm;
pub mod loss;
pub mod model;
pub mod optim;
pub mod pretrain;
pub mod probe;
pub mod run;
pub mod schedule;
pub mod tagger;
pub mod tokenizer;
