//! The companion trainer (issue #5), built up in pieces. So far: training sets
//! matched to their audio ([`data`]). `audiocap merge` (adapter concatenation) lives
//! on `model::lora::PeftAdapter::cat`.

pub mod data;
