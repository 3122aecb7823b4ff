//! The companion trainer (issue #5), built up in pieces. So far: training sets
//! matched to their audio ([`data`]) and the on-disk cache of frozen encoder features
//! ([`features`]), and the learning-rate schedule ([`schedule`]). `audiocap merge` (adapter concatenation) lives
//! on `model::lora::PeftAdapter::cat`.

pub mod data;
pub mod features;
pub mod schedule;
