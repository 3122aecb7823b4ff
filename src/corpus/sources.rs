//! The recordings inside an unpacked package: audio files under a folder, members
//! of a zip archive, or the entries of OpenTTD's sound catalogue.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::catalog::{SourceKind, SourceSpec};
use crate::audio::files::audio_files;

/// Extensions read as audio in folders and archives.
const AUDIO_EXTENSIONS: [&str; 7] = ["ogg", "oga", "wav", "wave", "flac", "mp3", "opus"];

/// One recording of a source, not yet read.
#[derive(Debug, Clone)]
pub struct Recording {
    /// Path inside the source (what the sound rules match), `/`-separated.
    pub path: String,
    location: StoredAt,
}

#[derive(Debug, Clone)]
enum StoredAt {
    File(PathBuf),
    ZipMember {
        archive: PathBuf,
        name: String,
    },
    /// Byte range of a `.cat` file.
    CatEntry {
        file: PathBuf,
        start: u64,
        len: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {why}")]
    Read { path: PathBuf, why: String },
}

fn read_err(path: &Path, why: impl ToString) -> SourceError {
    SourceError::Read {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

impl Recording {
    /// File extension, the decoder's hint.
    pub fn extension(&self) -> Option<&str> {
        self.path.rsplit_once('.').map(|(_, e)| e)
    }
}

/// Reads recordings, keeping zip archives open between reads (a large archive's
/// central directory is read once, not once per member). One per worker thread.
#[derive(Default)]
pub struct RecordingReader {
    zips: std::collections::HashMap<PathBuf, zip::ZipArchive<std::fs::File>>,
}

impl RecordingReader {
    /// The recording's bytes.
    pub fn read(&mut self, recording: &Recording) -> Result<Vec<u8>, SourceError> {
        match &recording.location {
            StoredAt::File(path) => std::fs::read(path).map_err(|e| read_err(path, e)),
            StoredAt::ZipMember { archive, name } => {
                if !self.zips.contains_key(archive) {
                    let file = std::fs::File::open(archive).map_err(|e| read_err(archive, e))?;
                    let zip = zip::ZipArchive::new(file).map_err(|e| read_err(archive, e))?;
                    self.zips.insert(archive.clone(), zip);
                }
                let Some(zip) = self.zips.get_mut(archive) else {
                    return Err(read_err(archive, "archive not open"));
                };
                let mut member = zip.by_name(name).map_err(|e| read_err(archive, e))?;
                let mut bytes = Vec::with_capacity(member.size() as usize);
                member
                    .read_to_end(&mut bytes)
                    .map_err(|e| read_err(archive, format!("{name}: {e}")))?;
                Ok(bytes)
            }
            StoredAt::CatEntry { file, start, len } => {
                use std::io::{Seek, SeekFrom};
                let mut f = std::fs::File::open(file).map_err(|e| read_err(file, e))?;
                f.seek(SeekFrom::Start(*start))
                    .map_err(|e| read_err(file, e))?;
                let mut bytes = vec![0u8; *len as usize];
                f.read_exact(&mut bytes).map_err(|e| read_err(file, e))?;
                Ok(bytes)
            }
        }
    }
}

fn is_audio(path: &str) -> bool {
    path.rsplit_once('.')
        .is_some_and(|(_, e)| AUDIO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Every recording of `source` inside the unpacked package at `root`, sorted by path.
pub fn list(source: &SourceSpec, root: &Path) -> Result<Vec<Recording>, SourceError> {
    let path = root.join(&source.path);
    let mut found = match source.kind {
        SourceKind::Dir => list_dir(&path)?,
        SourceKind::Zip => list_zip(&path, &source.prefix)?,
        SourceKind::OpenttdCat => list_cat(&path)?,
    };
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

fn list_dir(root: &Path) -> Result<Vec<Recording>, SourceError> {
    let mut out = Vec::new();
    for item in audio_files(root) {
        let path = item.map_err(|e| read_err(&e.path, e.error))?;
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let rel = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        out.push(Recording {
            path: rel,
            location: StoredAt::File(path),
        });
    }
    Ok(out)
}

fn list_zip(archive: &Path, prefix: &str) -> Result<Vec<Recording>, SourceError> {
    let file = std::fs::File::open(archive).map_err(|e| read_err(archive, e))?;
    let zip = zip::ZipArchive::new(file).map_err(|e| read_err(archive, e))?;
    Ok(zip
        .file_names()
        .filter_map(|name| {
            let name = name.ok()?;
            let rel = name.strip_prefix(prefix)?;
            is_audio(rel).then(|| Recording {
                path: rel.to_string(),
                location: StoredAt::ZipMember {
                    archive: archive.to_path_buf(),
                    name: name.to_string(),
                },
            })
        })
        .collect())
}

/// OpenTTD's `.cat`: a table of (offset, size) pairs (little-endian u32; the offset's
/// top bit flags a named entry); at each offset a length-prefixed description, the
/// `size` bytes of RIFF/WAVE data, a zero byte and the length-prefixed file name
/// (`src/wav/osfx_NN.wav`).
fn list_cat(path: &Path) -> Result<Vec<Recording>, SourceError> {
    let bytes = std::fs::read(path).map_err(|e| read_err(path, e))?;
    let entries = parse_cat(&bytes).map_err(|why| read_err(path, why))?;
    Ok(entries
        .into_iter()
        .filter(|e| is_audio(&e.name))
        .map(|e| Recording {
            path: e.name,
            location: StoredAt::CatEntry {
                file: path.to_path_buf(),
                start: e.start as u64,
                len: e.len as u64,
            },
        })
        .collect())
}

/// One entry of a `.cat`: its name, description and where its WAVE bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct CatEntry {
    pub name: String,
    pub description: String,
    pub start: usize,
    pub len: usize,
}

pub fn parse_cat(bytes: &[u8]) -> Result<Vec<CatEntry>, String> {
    let u32_at = |at: usize| -> Result<u32, String> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    let table_len = (u32_at(0)? & 0x7fff_ffff) as usize;
    if table_len == 0 || !table_len.is_multiple_of(8) || table_len > bytes.len() {
        return Err(format!("bad entry table length {table_len}"));
    }
    let mut out = Vec::new();
    for i in 0..table_len / 8 {
        let offset = (u32_at(i * 8)? & 0x7fff_ffff) as usize;
        let size = u32_at(i * 8 + 4)? as usize;
        let entry = bytes
            .get(offset..)
            .ok_or_else(|| format!("entry {i}: offset {offset} past the end of the file"))?;
        let (description, rest) =
            length_prefixed(entry).ok_or_else(|| format!("entry {i}: bad description"))?;
        if !rest.starts_with(b"RIFF") || rest.len() < size {
            return Err(format!("entry {i}: no RIFF data of {size} bytes"));
        }
        let start = bytes.len() - rest.len();
        let after = &rest[size..];
        let after = after.strip_prefix(&[0u8]).unwrap_or(after);
        let (name, _) = length_prefixed(after).ok_or_else(|| format!("entry {i}: no name"))?;
        out.push(CatEntry {
            name,
            description,
            start,
            len: size,
        });
    }
    Ok(out)
}

fn length_prefixed(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = *bytes.first()? as usize;
    let text = bytes.get(1..1 + len)?;
    let text = String::from_utf8_lossy(text)
        .trim_end_matches('\0')
        .to_string();
    Some((text, &bytes[1 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, desc: &str, wav: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let desc = format!("{desc}\0");
        out.push(desc.len() as u8);
        out.extend_from_slice(desc.as_bytes());
        out.extend_from_slice(wav);
        out.push(0);
        let name = format!("{name}\0");
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out
    }

    #[test]
    fn cat_entries_are_named_after_their_wave_data() {
        let a = entry("src/wav/a.wav", "\"Wind\". License: CC0", b"RIFFaaaa");
        let b = entry("src/wav/b.wav", "", b"RIFFbbbbbb");
        let mut cat = Vec::new();
        let first = 16u32;
        cat.extend_from_slice(&(first | 0x8000_0000).to_le_bytes());
        cat.extend_from_slice(&8u32.to_le_bytes());
        cat.extend_from_slice(&((first + a.len() as u32) | 0x8000_0000).to_le_bytes());
        cat.extend_from_slice(&10u32.to_le_bytes());
        cat.extend_from_slice(&a);
        cat.extend_from_slice(&b);
        let entries = parse_cat(&cat).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "src/wav/a.wav");
        assert_eq!(entries[0].description, "\"Wind\". License: CC0");
        assert_eq!(&cat[entries[0].start..][..entries[0].len], b"RIFFaaaa");
        assert_eq!(entries[1].name, "src/wav/b.wav");
        assert_eq!(entries[1].description, "");
        assert_eq!(&cat[entries[1].start..][..entries[1].len], b"RIFFbbbbbb");
        assert!(parse_cat(&cat[..20]).is_err());
    }

    #[test]
    fn folders_list_audio_files_by_relative_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/x.ogg"), b"x").unwrap();
        std::fs::write(dir.path().join("a/readme.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("y.WAV"), b"y").unwrap();
        let source = SourceSpec {
            id: "t".into(),
            package: "p".into(),
            kind: SourceKind::Dir,
            path: ".".into(),
            prefix: String::new(),
            max_crops: None,
        };
        let found: Vec<String> = list(&source, dir.path())
            .unwrap()
            .into_iter()
            .map(|r| r.path)
            .collect();
        assert_eq!(found, vec!["a/b/x.ogg", "y.WAV"]);
    }
}
