//! What `audiocap status` and `audiocap finalize` share: the dataset argument (a
//! pipeline file or a URI), its location, and the async runtime they read it on.

use audiocap::pipeline::{DatasetTarget, dataset_location};
use audiocap::storage::Location;

use super::exit::Exit;

#[derive(clap::Args, Debug)]
pub struct DatasetArgs {
    /// The pipeline file that wrote the dataset (its `[output] uri` and `[storage]`
    /// settings are used), or the dataset's URI (`s3://bucket/captions/`, a folder).
    target: String,
    /// With a pipeline file: override a key (`output.uri=s3://other/`), as `run --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// With a URI: an object-store client setting (the `[storage]` keys of a pipeline
    /// file: `endpoint=http://127.0.0.1:9000`, `allow_http=true`, `region=...`).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    storage: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl DatasetArgs {
    /// The dataset's location; `Err` after every problem is printed.
    pub fn location(&self) -> Result<Location, Exit> {
        dataset_location(&DatasetTarget {
            target: self.target.clone(),
            set: self.set.clone(),
            storage: self.storage.clone(),
        })
        .map_err(|problems| {
            for p in problems {
                eprintln!("error: {p}");
            }
            Exit::InvalidConfig
        })
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
