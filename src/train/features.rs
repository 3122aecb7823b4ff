//! The frozen encoder's features, computed once and cached on disk, so epochs 2..N
//! and later stages never run BEATs again.
//!
//! A cache entry is keyed by the SHA-256 of the audio file's bytes (renaming or moving
//! a file keeps its entry; editing it does not) inside a folder named by the encoder
//! identity (checkpoint bytes + front-end settings), so two encoders never share
//! entries. Entries are safetensors files written under a temporary name and renamed,
//! so a killed run never leaves half an entry; an unreadable entry is recomputed.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

/// Why the cache failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
}

/// Cached encoder features for one encoder.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

/// Whether a lookup found the features or computed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Computed,
}

/// The identity of an encoder for the cache: SHA-256 over the checkpoint file's bytes
/// and the front-end settings (JSON), as 16 hex digits.
pub fn encoder_identity(checkpoint: &Path, front_end: &str) -> Result<String, CacheError> {
    let mut hasher = Sha256::new();
    hash_file(checkpoint, &mut hasher)?;
    hasher.update(front_end.as_bytes());
    Ok(hex::encode(&hasher.finalize()[..8]))
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..n]);
    }
}

impl FeatureCache {
    /// The cache of `encoder` under `root` (created if needed).
    pub fn open(root: &Path, encoder: &str) -> Result<Self, CacheError> {
        let dir = root.join(encoder);
        std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// The key of an audio file: the SHA-256 of its bytes, in hex.
    pub fn key_of(audio: &Path) -> Result<String, CacheError> {
        let mut hasher = Sha256::new();
        hash_file(audio, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// The cached features of `key`, if a readable entry exists.
    pub fn get(&self, key: &str) -> Option<Tensor> {
        let tensors = candle_core::safetensors::load(self.entry(key), &Device::Cpu).ok()?;
        tensors.get("features").cloned()
    }

    /// The shape of `key`'s features when a complete entry exists (header read and
    /// file length checked; the data is not read).
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let file = std::fs::File::open(self.entry(key)).ok()?;
        // SAFETY: entries are only ever replaced by rename, never written in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let (header, meta) = safetensors::SafeTensors::read_metadata(&map).ok()?;
        let info = meta.info("features")?;
        let data_end = meta
            .tensors()
            .values()
            .map(|t| t.data_offsets.1)
            .max()
            .unwrap_or(0);
        (map.len() == 8 + header + data_end).then(|| info.shape.clone())
    }

    /// Stores `features` for `key` (atomically: temporary name, then rename).
    pub fn put(&self, key: &str, features: &Tensor) -> Result<(), CacheError> {
        let path = self.entry(key);
        let tensors = std::collections::HashMap::from([("features".to_string(), features.clone())]);
        crate::atomic::write_file(
            &path,
            |staging| {
                candle_core::safetensors::save(&tensors, staging).map_err(|source| {
                    CacheError::Tensor {
                        path: staging.to_path_buf(),
                        source,
                    }
                })
            },
            |source| CacheError::Io {
                path: path.clone(),
                source,
            },
        )
    }

    /// The cache entry of the audio file at `audio`: its key and features' shape,
    /// found complete in the cache or made by `compute` (then stored). The features
    /// themselves stay on disk; [`FeatureCache::get`] reads them.
    pub fn get_or_compute<E>(
        &self,
        audio: &Path,
        compute: impl FnOnce() -> Result<Tensor, E>,
    ) -> Result<(String, Vec<usize>, Lookup), E>
    where
        E: From<CacheError>,
    {
        let key = Self::key_of(audio)?;
        if let Some(shape) = self.shape(&key) {
            return Ok((key, shape, Lookup::Hit));
        }
        let features = compute()?;
        self.put(&key, &features)?;
        Ok((key, features.dims().to_vec(), Lookup::Computed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum TestError {
        Cache,
    }

    impl From<CacheError> for TestError {
        fn from(_: CacheError) -> Self {
            TestError::Cache
        }
    }

    #[test]
    fn features_are_computed_once_per_content_and_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.wav");
        let b = dir.path().join("copy_of_a.wav");
        std::fs::write(&a, b"same bytes").unwrap();
        std::fs::write(&b, b"same bytes").unwrap();
        let cache = FeatureCache::open(&dir.path().join("cache"), "enc1").unwrap();
        let features = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let calls = std::cell::Cell::new(0);
        let compute = || -> Result<Tensor, TestError> {
            calls.set(calls.get() + 1);
            Ok(features.clone())
        };
        let (first, shape, how) = cache.get_or_compute(&a, compute).unwrap();
        assert_eq!(how, Lookup::Computed);
        assert_eq!(shape, vec![3, 4]);
        // Same content under another name: a hit, equal by value.
        let (again, _, how) = cache.get_or_compute(&b, compute).unwrap();
        assert_eq!(how, Lookup::Hit);
        assert_eq!(
            cache.get(&again).unwrap().to_vec2::<f32>().unwrap(),
            features.to_vec2::<f32>().unwrap()
        );
        assert_eq!(again, first);
        assert_eq!(calls.get(), 1);

        // Another encoder does not see the first one's entries.
        let other = FeatureCache::open(&dir.path().join("cache"), "enc2").unwrap();
        let (_, _, how) = other.get_or_compute(&a, compute).unwrap();
        assert_eq!(how, Lookup::Computed);

        // Edited audio is a new key; a damaged entry is recomputed.
        std::fs::write(&a, b"other bytes").unwrap();
        let (_, _, how) = cache.get_or_compute(&a, compute).unwrap();
        assert_eq!(how, Lookup::Computed);
        let key = FeatureCache::key_of(&a).unwrap();
        assert_eq!(cache.shape(&key), Some(vec![3, 4]));
        let bytes = std::fs::read(cache.entry(&key)).unwrap();
        std::fs::write(cache.entry(&key), &bytes[..bytes.len() - 4]).unwrap();
        assert_eq!(cache.shape(&key), None, "a truncated entry is incomplete");
        std::fs::write(cache.entry(&key), b"garbage").unwrap();
        assert_eq!(cache.shape(&key), None);
        let (_, _, how) = cache.get_or_compute(&a, compute).unwrap();
        assert_eq!(how, Lookup::Computed);
        assert_eq!(calls.get(), 4);
        // No staging files are left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("cache/enc1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".staging"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn encoder_identity_covers_checkpoint_and_front_end() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("beats.pt");
        std::fs::write(&ckpt, b"weights v1").unwrap();
        let id = encoder_identity(&ckpt, "{\"mel_bins\":128}").unwrap();
        assert_eq!(id.len(), 16);
        assert_ne!(id, encoder_identity(&ckpt, "{\"mel_bins\":64}").unwrap());
        std::fs::write(&ckpt, b"weights v2").unwrap();
        assert_ne!(id, encoder_identity(&ckpt, "{\"mel_bins\":128}").unwrap());
    }
}
