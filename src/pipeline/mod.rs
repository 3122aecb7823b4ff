//! The staged pipeline and its two intakes. `audiocap run`: a pipeline file → a
//! streaming run of the stages → a Parquet dataset; [`config`] reads and validates
//! the file, [`run`] adds shards, resume and the dataset, [`progress`] and
//! [`summary`] report on it, [`locate`] finds the dataset a pipeline file wrote
//! (`audiocap status`, `finalize`). `audiocap caption` ([`caption`]): local files →
//! the same stages → one Parquet file. [`wiring`] is the stage graph both run.

pub mod caption;
pub mod config;
pub mod locate;
pub mod progress;
pub mod run;
pub mod summary;
pub mod wiring;

pub use config::PipelineConfig;
pub use locate::{DatasetTarget, dataset_location};
pub use run::{RunError, RunRequest, run_pipeline};
pub use summary::RunSummary;
