//! What a listing yields and the fetch stage reads: one input, named by a canonical
//! URI and where its bytes are (a local path or an object in a store).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};

use super::StorageError;
use super::location::Location;

/// One input to caption.
#[derive(Clone)]
pub struct InputRef {
    /// Canonical URI (absolute local path or `s3://bucket/key`): what a row carries,
    /// what [`super::shard_of`] hashes, stable across runs.
    pub uri: String,
    /// Where to read it from.
    pub source: InputSource,
    /// Size in bytes when the listing knew it (manifest entries: `None`).
    pub size: Option<u64>,
}

#[derive(Clone)]
pub enum InputSource {
    Local(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        path: Path,
    },
}

impl fmt::Debug for InputRef {
    // The store is left out: some clients' Debug shows their credential provider.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.source {
            InputSource::Local(_) => "local",
            InputSource::Object { .. } => "object",
        };
        f.debug_struct("InputRef")
            .field("uri", &self.uri)
            .field("source", &kind)
            .field("size", &self.size)
            .finish()
    }
}

impl InputRef {
    /// The lower-cased extension of the last path segment (a decoder hint).
    pub fn extension(&self) -> Option<String> {
        let name = self.uri.rsplit('/').next()?;
        let (stem, ext) = name.rsplit_once('.')?;
        (!stem.is_empty() && !ext.is_empty()).then(|| ext.to_ascii_lowercase())
    }

    pub(crate) fn object(location: &Location, meta: ObjectMeta) -> InputRef {
        InputRef {
            uri: location.uri_of(&meta.location),
            source: InputSource::Object {
                store: Arc::clone(&location.store),
                path: meta.location,
            },
            size: Some(meta.size),
        }
    }
}

/// A listing item: an input, or an input that cannot even be listed (the caller turns
/// it into an error row and carries on).
#[derive(Debug)]
pub enum Listed {
    Input(InputRef),
    Failed {
        uri: String,
        error: StorageError,
    },
    /// A file a folder listing left out for its extension alone (not in
    /// `extensions`; taken otherwise), so the run can say how many it skipped.
    Skipped {
        uri: String,
        /// Lower-cased, without the dot; empty for a name without one.
        extension: String,
    },
}
