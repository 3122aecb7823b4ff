//! What can go wrong in the engine: one error type for loading an export and running
//! its graphs, naming the graph, file or output that failed.

use std::path::PathBuf;

use super::runtime::RuntimeError;
use crate::manifest::ManifestError;
use crate::model::prompt::PromptError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("{}: loading the ONNX graph: {source}", path.display())]
    Load { path: PathBuf, source: ort::Error },
    #[error("{graph}: {source}")]
    Run {
        graph: &'static str,
        source: ort::Error,
    },
    #[error("{graph}: output `{name}` is missing")]
    MissingOutput { graph: &'static str, name: String },
    /// An output of the wrong shape or values (a graph that is not the export's).
    #[error("{graph}: output `{name}` {problem}")]
    BadOutput {
        graph: &'static str,
        name: String,
        problem: String,
    },
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Maps an `ort` failure while running (or feeding) `graph`.
pub(super) fn run_error(graph: &'static str) -> impl FnOnce(ort::Error) -> EngineError {
    move |source| EngineError::Run { graph, source }
}
