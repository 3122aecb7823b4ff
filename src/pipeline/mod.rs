//! `audiocap run`: a pipeline file → a streaming run of the stages → a Parquet
//! dataset. [`config`] reads and validates the file, [`run`] wires the stages
//! (`crate::stages`) together, [`progress`] and [`summary`] report on it;
//! [`locate`] finds the dataset a pipeline file wrote (`audiocap status`, `finalize`).

pub mod config;
pub mod locate;
pub mod progress;
pub mod run;
pub mod summary;

pub use config::PipelineConfig;
pub use locate::{DatasetTarget, dataset_location};
pub use run::{RunError, RunRequest, run_pipeline};
pub use summary::RunSummary;
