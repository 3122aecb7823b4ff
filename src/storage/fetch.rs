//! An input's bytes: a local file is used in place; an object up to
//! [`SpoolOptions::memory_limit`] comes into memory with one GET; a larger one is
//! streamed into a temporary spool file that is deleted when dropped.
//!
//! Each request is retried by the client (see [`super::StorageOptions`]); what still
//! fails is a [`FetchError`] naming the URI and the kind of failure. Transient ones
//! ([`FetchError::is_transient`]) are the fetch stage's to retry further; the rest
//! become error rows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

use super::input::{InputRef, InputSource};
use super::redact_text;

/// Where large objects go.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    /// Objects up to this many bytes are held in memory; larger ones are spooled.
    pub memory_limit: u64,
    /// Folder for spool files (default: the system temporary folder).
    pub dir: Option<PathBuf>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            memory_limit: 64 * 1024 * 1024,
            dir: None,
        }
    }
}

/// A fetched input.
#[derive(Debug)]
pub struct Fetched {
    pub uri: String,
    pub audio: FetchedAudio,
    /// Size in bytes.
    pub size: u64,
    /// Lower-cased extension of the name, a hint for the decoder.
    pub extension: Option<String>,
}

#[derive(Debug)]
pub enum FetchedAudio {
    /// A local input, read in place (no copy).
    Local(PathBuf),
    /// A small object, in memory.
    Memory(Bytes),
    /// A large object, in a temporary file deleted on drop.
    Spooled(SpoolFile),
}

impl FetchedAudio {
    /// The file holding the audio, when it is in a file.
    pub fn path(&self) -> Option<&Path> {
        match self {
            FetchedAudio::Local(p) => Some(p),
            FetchedAudio::Spooled(s) => Some(s.path()),
            FetchedAudio::Memory(_) => None,
        }
    }
}

/// A temporary file, removed when dropped.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
}

impl SpoolFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates an empty, uniquely named file in `dir` (default: the system temp folder).
    fn create(
        dir: Option<&Path>,
        extension: Option<&str>,
    ) -> std::io::Result<(SpoolFile, std::fs::File)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let suffix = extension.map(|e| format!(".{e}")).unwrap_or_default();
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("audiocap-spool-{}-{n}-{nanos}{suffix}", std::process::id());
            let path = dir.join(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => return Ok((SpoolFile { path }, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        // Best effort: a leftover temp file is not worth a panic or an error row.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{uri}: not found")]
    NotFound { uri: String },
    #[error("{uri}: permission denied: {message}")]
    PermissionDenied { uri: String, message: String },
    #[error("{uri}: empty (0 bytes)")]
    Empty { uri: String },
    #[error("{uri}: not a file")]
    NotAFile { uri: String },
    #[error("{uri}: network error (after retries): {message}")]
    Network { uri: String, message: String },
    #[error("{uri}: cannot write a spool file in {dir}: {message}")]
    Spool {
        uri: String,
        dir: String,
        message: String,
    },
    #[error("{uri}: {message}")]
    Other { uri: String, message: String },
}

impl FetchError {
    /// A failure that may go away by itself (the network, throttling, a 5xx, a
    /// timeout: the client's transport errors after its own retries), as opposed
    /// to one that is about the input (missing, forbidden, empty, not a file) or
    /// about this machine (the spool folder).
    pub fn is_transient(&self) -> bool {
        matches!(self, FetchError::Network { .. })
    }
}

/// Fetches one input (see the module documentation).
pub async fn fetch(input: &InputRef, spool: &SpoolOptions) -> Result<Fetched, FetchError> {
    let uri = input.uri.clone();
    let extension = input.extension();
    match &input.source {
        InputSource::Local(path) => {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| io_error(&uri, &e))?;
            if meta.is_dir() {
                return Err(FetchError::NotAFile { uri });
            }
            if meta.len() == 0 {
                return Err(FetchError::Empty { uri });
            }
            // Opening now turns an unreadable file into this input's error, not the
            // decoder's.
            tokio::fs::File::open(path)
                .await
                .map_err(|e| io_error(&uri, &e))?;
            Ok(Fetched {
                uri,
                audio: FetchedAudio::Local(path.clone()),
                size: meta.len(),
                extension,
            })
        }
        InputSource::Object { store, path } => {
            let result = store.get(path).await.map_err(|e| object_error(&uri, e))?;
            let size = result.meta.size;
            if size == 0 {
                return Err(FetchError::Empty { uri });
            }
            if size <= spool.memory_limit {
                let bytes = result.bytes().await.map_err(|e| object_error(&uri, e))?;
                return Ok(Fetched {
                    uri,
                    audio: FetchedAudio::Memory(bytes),
                    size,
                    extension,
                });
            }
            let file =
                write_spool(result, &uri, spool.dir.as_deref(), extension.as_deref()).await?;
            Ok(Fetched {
                uri,
                audio: FetchedAudio::Spooled(file),
                size,
                extension,
            })
        }
    }
}

/// Streams an object into a new spool file (used for large inputs and remote manifests).
pub(crate) async fn download(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
    uri: &str,
    dir: Option<&Path>,
    extension: Option<&str>,
) -> Result<SpoolFile, FetchError> {
    let result = store.get(path).await.map_err(|e| object_error(uri, e))?;
    write_spool(result, uri, dir, extension).await
}

async fn write_spool(
    result: object_store::GetResult,
    uri: &str,
    dir: Option<&Path>,
    extension: Option<&str>,
) -> Result<SpoolFile, FetchError> {
    let expected = result.meta.size;
    let spool_error = |e: std::io::Error| FetchError::Spool {
        uri: uri.to_string(),
        dir: dir
            .map_or_else(std::env::temp_dir, Path::to_path_buf)
            .display()
            .to_string(),
        message: e.to_string(),
    };
    let (spool, file) = SpoolFile::create(dir, extension).map_err(spool_error)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut chunks = result.into_stream();
    let mut written = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| object_error(uri, e))?;
        file.write_all(&chunk).await.map_err(spool_error)?;
        written += chunk.len() as u64;
    }
    file.flush().await.map_err(spool_error)?;
    if written != expected {
        return Err(FetchError::Network {
            uri: uri.to_string(),
            message: format!("read {written} of {expected} bytes"),
        });
    }
    Ok(spool)
}

fn io_error(uri: &str, e: &std::io::Error) -> FetchError {
    let uri = uri.to_string();
    match e.kind() {
        std::io::ErrorKind::NotFound => FetchError::NotFound { uri },
        std::io::ErrorKind::PermissionDenied => FetchError::PermissionDenied {
            uri,
            message: e.to_string(),
        },
        _ => FetchError::Other {
            uri,
            message: e.to_string(),
        },
    }
}

pub(crate) fn object_error(uri: &str, e: object_store::Error) -> FetchError {
    let uri = uri.to_string();
    let message = redact_text(&e.to_string());
    match e {
        object_store::Error::NotFound { .. } => FetchError::NotFound { uri },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            FetchError::PermissionDenied { uri, message }
        }
        // The client's transport failures (after its retries) come back as Generic.
        object_store::Error::Generic { .. } => FetchError::Network { uri, message },
        _ => FetchError::Other { uri, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    fn object(store: &Arc<dyn ObjectStore>, key: &str) -> InputRef {
        InputRef {
            uri: format!("memory://{key}"),
            source: InputSource::Object {
                store: Arc::clone(store),
                path: key.into(),
            },
            size: None,
        }
    }

    #[test]
    fn only_network_failures_are_transient() {
        let uri = "s3://b/k.wav".to_string();
        let network = FetchError::Network {
            uri: uri.clone(),
            message: "connection refused".into(),
        };
        assert!(network.is_transient());
        for permanent in [
            FetchError::NotFound { uri: uri.clone() },
            FetchError::Empty { uri: uri.clone() },
            FetchError::NotAFile { uri: uri.clone() },
            FetchError::PermissionDenied {
                uri: uri.clone(),
                message: "403".into(),
            },
        ] {
            assert!(!permanent.is_transient(), "{permanent}");
        }
    }

    #[tokio::test]
    async fn fetches_objects_into_memory_or_a_spool_file() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let small: Vec<u8> = (0..100u8).collect();
        let large: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        store
            .put(&"a/small.wav".into(), PutPayload::from(small.clone()))
            .await
            .unwrap();
        store
            .put(&"a/large.FLAC".into(), PutPayload::from(large.clone()))
            .await
            .unwrap();
        store
            .put(&"a/empty.wav".into(), PutPayload::from(Vec::<u8>::new()))
            .await
            .unwrap();
        let spool_dir =
            std::env::temp_dir().join(format!("audiocap-fetch-test-{}", std::process::id()));
        std::fs::create_dir_all(&spool_dir).unwrap();
        let options = SpoolOptions {
            memory_limit: 1000,
            dir: Some(spool_dir.clone()),
        };

        let got = fetch(&object(&store, "a/small.wav"), &options)
            .await
            .unwrap();
        assert_eq!(got.size, 100);
        assert_eq!(got.extension.as_deref(), Some("wav"));
        match &got.audio {
            FetchedAudio::Memory(b) => assert_eq!(b.as_ref(), small.as_slice()),
            other => panic!("expected memory, got {other:?}"),
        }

        let got = fetch(&object(&store, "a/large.FLAC"), &options)
            .await
            .unwrap();
        assert_eq!(got.extension.as_deref(), Some("flac"));
        let path = got.audio.path().unwrap().to_path_buf();
        assert!(matches!(got.audio, FetchedAudio::Spooled(_)));
        assert!(path.starts_with(&spool_dir));
        assert_eq!(std::fs::read(&path).unwrap(), large);
        drop(got);
        assert!(!path.exists(), "spool file removed on drop");

        let err = fetch(&object(&store, "a/empty.wav"), &options)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Empty { .. }), "{err}");
        let err = fetch(&object(&store, "a/missing.wav"), &options)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NotFound { .. }), "{err}");
        assert_eq!(err.to_string(), "memory://a/missing.wav: not found");
        std::fs::remove_dir_all(&spool_dir).unwrap();
    }

    #[tokio::test]
    async fn local_inputs_are_used_in_place() {
        let dir = std::env::temp_dir().join(format!("audiocap-fetch-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("x.wav");
        std::fs::write(&file, b"RIFF").unwrap();
        std::fs::write(dir.join("empty.wav"), b"").unwrap();
        let local = |p: PathBuf| InputRef {
            uri: p.to_string_lossy().into_owned(),
            source: InputSource::Local(p),
            size: None,
        };
        let options = SpoolOptions::default();
        let got = fetch(&local(file.clone()), &options).await.unwrap();
        assert_eq!(got.audio.path(), Some(file.as_path()));
        assert_eq!(got.size, 4);
        for (name, want) in [
            ("empty.wav", "empty"),
            ("missing.wav", "not found"),
            ("", "not a file"),
        ] {
            let err = fetch(&local(dir.join(name)), &options).await.unwrap_err();
            assert!(err.to_string().contains(want), "{name}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
