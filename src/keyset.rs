//! A set of input keys (URIs) that holds a 64-bit hash and a file offset per key in
//! memory, and the keys themselves in a spill file on local disk, read back only to
//! confirm a hash match: two keys with one hash are both kept, so a collision never
//! makes an input look done or listed twice.
//!
//! What resume (the inputs the dataset already holds) and the listing's duplicate
//! check use instead of a set of strings: 16-byte entries in a hash map (so by layout
//! about 18 to 37 bytes per key in memory as the map grows, not yet measured),
//! whatever the URIs' length, where a `HashSet<String>` of object-store URIs took
//! about 190.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Key bytes buffered before they go to the spill file.
const WRITE_BUFFER: usize = 1 << 20;
/// The longest key kept (an object-store key is at most 1,024 bytes; a URI adds the
/// scheme and bucket): longer keys are refused rather than sized.
pub const MAX_KEY_BYTES: usize = 64 << 10;

/// The map's keys are hashes already.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// SipHash-1-3 with fixed keys: the same on every run of one build.
fn key_hash(key: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(key.as_bytes());
    h.finish()
}

#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("key spill file in {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
    #[error("a key of {0} bytes is longer than the {MAX_KEY_BYTES} a key may have")]
    TooLong(usize),
}

/// See the module documentation.
pub struct KeySet {
    /// Hash → where the first key with that hash starts in the spill file.
    index: HashMap<u64, u64, BuildHasherDefault<PassThrough>>,
    /// Keys whose hash an earlier, different key already has (rare).
    collided: HashSet<String>,
    spill: BufWriter<File>,
    /// Bytes written to the spill file so far (flushed or not).
    written: u64,
    dir: String,
}

impl KeySet {
    /// An empty set spilling into an unnamed file in `dir` (removed as soon as it is
    /// open, so a killed process leaves nothing behind).
    pub fn new(dir: &Path) -> Result<Self, KeySetError> {
        let io_err = |source| KeySetError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!(".audiocap-keys-{}-{n}", std::process::id());
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err)?;
        std::fs::remove_file(&path).map_err(io_err)?;
        Ok(Self {
            index: HashMap::default(),
            collided: HashSet::new(),
            spill: BufWriter::with_capacity(WRITE_BUFFER, file),
            written: 0,
            dir: dir.display().to_string(),
        })
    }

    /// Keys in the set.
    pub fn len(&self) -> usize {
        self.index.len() + self.collided.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `key`; false when it was there already.
    pub fn insert(&mut self, key: &str) -> Result<bool, KeySetError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KeySetError::TooLong(key.len()));
        }
        self.insert_hashed(key, key_hash(key))
    }

    fn insert_hashed(&mut self, key: &str, hash: u64) -> Result<bool, KeySetError> {
        match self.index.get(&hash).copied() {
            None => {
                let at = self.append(key)?;
                self.index.insert(hash, at);
                Ok(true)
            }
            Some(at) if self.read_at(at)? == key.as_bytes() => Ok(false),
            Some(_) => Ok(self.collided.insert(key.to_string())),
        }
    }

    /// Whether `key` is in the set.
    pub fn contains(&mut self, key: &str) -> Result<bool, KeySetError> {
        let Some(&at) = self.index.get(&key_hash(key)) else {
            return Ok(false);
        };
        Ok(self.read_at(at)? == key.as_bytes() || self.collided.contains(key))
    }

    fn append(&mut self, key: &str) -> Result<u64, KeySetError> {
        let at = self.written;
        let len = key.len() as u32;
        self.spill
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.spill.write_all(key.as_bytes()))
            .map_err(|source| self.io(source))?;
        self.written += 4 + u64::from(len);
        Ok(at)
    }

    fn read_at(&mut self, at: u64) -> Result<Vec<u8>, KeySetError> {
        // Whatever is buffered must be in the file before it is read back.
        self.spill.flush().map_err(|source| self.io(source))?;
        let file = self.spill.get_ref();
        let mut len = [0u8; 4];
        file.read_exact_at(&mut len, at)
            .map_err(|source| self.io(source))?;
        let mut key = vec![0u8; u32::from_le_bytes(len) as usize];
        file.read_exact_at(&mut key, at + 4)
            .map_err(|source| self.io(source))?;
        Ok(key)
    }

    fn io(&self, source: std::io::Error) -> KeySetError {
        KeySetError::Io {
            dir: self.dir.clone(),
            source,
        }
    }
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet").field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_keys_exactly_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = KeySet::new(dir.path()).unwrap();
        assert!(set.is_empty());
        for i in 0..5000 {
            assert!(
                set.insert(&format!("s3://bucket/archive/{i:08}.wav"))
                    .unwrap()
            );
        }
        assert!(!set.insert("s3://bucket/archive/00000042.wav").unwrap());
        assert_eq!(set.len(), 5000);
        assert!(set.contains("s3://bucket/archive/00004999.wav").unwrap());
        assert!(!set.contains("s3://bucket/archive/00005000.wav").unwrap());
        assert!(!set.contains("").unwrap());
        assert!(set.insert("").unwrap());
        assert!(set.contains("").unwrap());
        // The spill file is unnamed from the start.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn keys_that_share_a_hash_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = KeySet::new(dir.path()).unwrap();
        assert!(set.insert_hashed("a.wav", 7).unwrap());
        assert!(set.insert_hashed("b.wav", 7).unwrap());
        assert!(!set.insert_hashed("b.wav", 7).unwrap());
        assert!(!set.insert_hashed("a.wav", 7).unwrap());
        assert_eq!(set.len(), 2);
        assert!(set.collided.contains("b.wav"));
    }

    #[test]
    fn absurd_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = KeySet::new(dir.path()).unwrap();
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(set.insert(&long), Err(KeySetError::TooLong(_))));
        assert!(set.is_empty());
    }
}
