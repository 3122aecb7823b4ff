//! The one walk of a local folder for audio files (`caption`'s inputs, a training
//! set's audio, a corpus package's recordings): recursive, links followed but never
//! in a loop, files kept by extension ([`AUDIO_EXTENSIONS`], any case), sorted by
//! path so every run sees the same order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::AUDIO_EXTENSIONS;

/// Whether `path` has one of the audio extensions (any case).
pub fn is_audio_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| AUDIO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A folder (or an entry of one) that could not be read.
#[derive(Debug)]
pub struct Unreadable {
    pub path: PathBuf,
    pub error: std::io::Error,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

impl std::error::Error for Unreadable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Every audio file under `dir`, sorted by path. What cannot be read is in the list
/// too, where its path sorts, so a caller can report it and go on or stop.
pub fn audio_files(dir: &Path) -> Vec<Result<PathBuf, Unreadable>> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        // A link back up the tree would walk forever: each real folder once.
        if let Ok(real) = std::fs::canonicalize(&folder)
            && !seen.insert(real)
        {
            continue;
        }
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(error) => {
                found.push(Err(Unreadable {
                    path: folder,
                    error,
                }));
                continue;
            }
        };
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(error) => {
                    found.push(Err(Unreadable {
                        path: folder.clone(),
                        error,
                    }));
                    continue;
                }
            };
            if path.is_dir() {
                pending.push(path);
            } else if is_audio_file(&path) {
                found.push(Ok(path));
            }
        }
    }
    found.sort_by(|a, b| key(a).cmp(key(b)));
    found
}

fn key(item: &Result<PathBuf, Unreadable>) -> &Path {
    match item {
        Ok(path) => path,
        Err(e) => &e.path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::touch;

    #[test]
    fn audio_files_come_sorted_from_every_depth_and_links_never_loop() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in [
            "b.wav",
            "a/z.FLAC",
            "a/b/c.mp3",
            "a/notes.txt",
            "c.WAV.bak",
            "d/e",
        ] {
            touch(&root.join(name));
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(root, root.join("a/b/up")).unwrap();
        let found: Vec<PathBuf> = audio_files(root).into_iter().map(Result::unwrap).collect();
        let rel: Vec<&Path> = found
            .iter()
            .map(|p| p.strip_prefix(root).unwrap())
            .collect();
        assert_eq!(
            rel,
            [
                Path::new("a/b/c.mp3"),
                Path::new("a/z.FLAC"),
                Path::new("b.wav")
            ]
        );
    }

    #[test]
    fn a_folder_that_cannot_be_read_is_reported_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let found = audio_files(&missing);
        assert_eq!(found.len(), 1);
        let err = found.into_iter().next().unwrap().unwrap_err();
        assert_eq!(err.path, missing);
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );
    }
}
