//! `model.json`: the versioned manifest of an exported model directory.
//!
//! It holds everything the runtime needs (front-end parameters and normalisation,
//! prompt, stop ids, pooling, dimensions, dtype, opset, the graphs' file names and
//! hashes) and what a user asks about a model (where it came from: the source
//! checkpoint files, adapters and their weights). The runtime reads every audio
//! constant from here, never from code.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audio::fbank::FbankConfig;
use crate::model::beats::BeatsConfig;
use crate::model::projector::Pooling;
use crate::model::prompt::PromptIds;

pub const MANIFEST_FILE: &str = "model.json";
/// Bumped when a field changes meaning; readers refuse newer versions.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid model manifest: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: {file} does not match the manifest ({what})", path.display())]
    Mismatch {
        path: PathBuf,
        file: String,
        what: String,
    },
}

/// Precision of the exported weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    F16,
}

/// How the graphs compute attention (and the decoder keeps its KV cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// Plain ONNX operators, as transformers' eager attention: the cache grows by
    /// concatenation and every row of a batch has the same length. Runs on every
    /// provider in f32 and f16.
    #[default]
    Eager,
    /// ONNX Runtime's `GroupQueryAttention` (com.microsoft): fused, GQA-native, the
    /// cache a preallocated buffer [batch, kv_heads, capacity, head_dim] updated in
    /// place, each row with its own length (`seqlens_k`), which is what lets new clips
    /// join a batch as others finish. CPU: f32 and f16; CUDA: f16 only. The encoder
    /// runs `MultiHeadAttention` with BEATs' padding and gated position bias as one
    /// additive bias (exports since graph revision 2; earlier ones kept the eager
    /// encoder, which the engine runs the same way).
    Fused,
}

impl Attention {
    pub fn is_eager(&self) -> bool {
        *self == Attention::Eager
    }

    /// What an export gets unless told: fused for f16 (the GPU precision, where the
    /// fused kernel matters), eager for f32 (CUDA's fused kernel has no f32).
    pub fn default_for(dtype: ExportDtype) -> Self {
        match dtype {
            ExportDtype::F16 => Attention::Fused,
            ExportDtype::F32 => Attention::Eager,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub format_version: u32,
    pub name: String,
    /// The audiocap version that wrote the export.
    pub audiocap_version: String,
    /// When the export was written (RFC 3339, UTC).
    pub created_at: String,
    pub front_end: FbankConfig,
    pub encoder: EncoderInfo,
    pub projector: ProjectorInfo,
    pub decoder: DecoderInfo,
    pub prompt: PromptInfo,
    pub generation: GenerationInfo,
    pub onnx: OnnxInfo,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderInfo {
    pub architecture: String,
    /// The BEATs cfg of the source checkpoint.
    pub config: BeatsConfig,
    /// Fewest fbank frames a clip needs (one patch row).
    pub min_frames: usize,
    /// Dimension of the graph's `encoder_embedding` output (the mean encoder output
    /// over a clip's valid patches). Absent in exports from before that output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_dim: Option<usize>,
    /// The graph's `tag_probs` output, when the checkpoint had a tagging head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TagsInfo>,
}

/// Sound-event tags of a fine-tuned encoder: one name per output of `tag_probs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsInfo {
    pub labels: Vec<String>,
    /// The file the names came from (`--tag-labels`), absent for `class_0 … class_N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_file: Option<FileDigest>,
}

/// Label names for `count` tags, read from a label file: AudioSet's
/// `class_labels_indices.csv` layout (a header naming `index` and `display_name`,
/// one row per class, names quoted where they hold commas) or plain text with one
/// name per line. The names must be as many as the tags, and an indexed file must
/// give the indices `0..count` each once.
pub fn read_tag_labels(path: &Path, count: usize) -> Result<Vec<String>, ManifestError> {
    let invalid = |message: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let first = text.lines().next().unwrap_or("");
    let header: Vec<String> = first.split(',').map(|h| h.trim().to_lowercase()).collect();
    let labels = if header.iter().any(|h| h == "display_name") {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let headers = reader
            .headers()
            .map_err(|e| invalid(e.to_string()))?
            .clone();
        let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
        let name_col = column("display_name").expect("seen in the header");
        let index_col = column("index");
        let mut names: Vec<Option<String>> = vec![None; count];
        for (row, record) in reader.records().enumerate() {
            let record = record.map_err(|e| invalid(e.to_string()))?;
            let line = row + 2;
            let name = record
                .get(name_col)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| invalid(format!("line {line}: no display_name")))?;
            let index = match index_col {
                Some(c) => {
                    let v = record.get(c).unwrap_or("");
                    v.parse::<usize>()
                        .map_err(|_| invalid(format!("line {line}: index {v:?} is not a number")))?
                }
                None => row,
            };
            let slot = names.get_mut(index).ok_or_else(|| {
                invalid(format!(
                    "line {line}: index {index}, but the tagging head has {count} labels"
                ))
            })?;
            if slot.is_some() {
                return Err(invalid(format!("line {line}: index {index} given twice")));
            }
            *slot = Some(name.to_string());
        }
        let missing: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_none())
            .map(|(i, _)| i.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "no name for {} of the {count} labels (indices {})",
                missing.len(),
                missing
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        names.into_iter().flatten().collect()
    } else {
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if names.len() != count {
            return Err(invalid(format!(
                "{} names (one per line), but the tagging head has {count} labels",
                names.len()
            )));
        }
        names
    };
    Ok(labels)
}

/// The names of `count` tags when no label file is given: `class_0 … class_{count-1}`.
pub fn default_tag_labels(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("class_{i}")).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorInfo {
    pub pooling: Pooling,
    /// Audio embeddings per clip in the prompt.
    pub audio_tokens: usize,
    pub input_dim: usize,
    pub output_dim: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderInfo {
    pub architecture: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptInfo {
    /// The template with its `<|audio|>` placeholder.
    pub template: String,
    /// Token ids before and after the audio embedding(s).
    pub ids: PromptIds,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationInfo {
    /// Generation stops at any of these ids.
    pub stop_ids: Vec<u32>,
    /// Default cap on generated tokens.
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxInfo {
    pub opset: i64,
    pub ir_version: i64,
    pub dtype: ExportDtype,
    /// Absent in exports from before fused attention existed (they are eager).
    #[serde(default, skip_serializing_if = "Attention::is_eager")]
    pub attention: Attention,
    pub audio_encoder: GraphFile,
    pub embedding: GraphFile,
    pub decoder: GraphFile,
    pub tokenizer: FileDigest,
}

/// One ONNX graph and its external-data files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    pub file: FileDigest,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_data: Vec<FileDigest>,
}

/// A file (relative to the model directory, or a source path as given) with its
/// size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub beats: FileDigest,
    /// The Llama directory's config and weight files.
    pub llm_dir: String,
    pub llm_files: Vec<FileDigest>,
    pub projector: FileDigest,
    /// Adapters in the order given, with their combination weights.
    pub adapters: Vec<AdapterProvenance>,
    /// How several adapters were combined (`cat`, as PEFT's add_weighted_adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combination: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterProvenance {
    pub dir: String,
    pub weight: f64,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: serde_json::Value,
    pub files: Vec<FileDigest>,
}

impl ModelManifest {
    /// Reads `dir/model.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Self = serde_json::from_str(&text).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if manifest.format_version > FORMAT_VERSION {
            return Err(ManifestError::Invalid {
                path,
                message: format!(
                    "format_version {} is newer than this audiocap understands ({FORMAT_VERSION}); upgrade audiocap",
                    manifest.format_version
                ),
            });
        }
        Ok(manifest)
    }

    /// Writes `dir/model.json`.
    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|source| ManifestError::Io { path, source })
    }

    /// Checks that the graph files in `dir` have the recorded sizes (cheap; hashes
    /// are checked by [`Self::verify_hashes`]).
    pub fn verify_sizes(&self, dir: &Path) -> Result<(), ManifestError> {
        for digest in self.model_files() {
            let path = dir.join(&digest.path);
            let len = std::fs::metadata(&path)
                .map_err(|source| ManifestError::Io {
                    path: path.clone(),
                    source,
                })?
                .len();
            if len != digest.bytes {
                return Err(ManifestError::Mismatch {
                    path: dir.join(MANIFEST_FILE),
                    file: digest.path.clone(),
                    what: format!("{len} bytes on disk, {} recorded", digest.bytes),
                });
            }
        }
        Ok(())
    }

    /// Checks every model file's SHA-256.
    pub fn verify_hashes(&self, dir: &Path) -> Result<(), ManifestError> {
        for digest in self.model_files() {
            let actual = digest_file(&dir.join(&digest.path), &digest.path)?;
            if actual.sha256 != digest.sha256 {
                return Err(ManifestError::Mismatch {
                    path: dir.join(MANIFEST_FILE),
                    file: digest.path.clone(),
                    what: "sha256 differs".into(),
                });
            }
        }
        Ok(())
    }

    /// Checks every model file's SHA-256, skipping a file whose size and
    /// modification time match what `cache` (a JSON file of this machine's earlier
    /// verifications; `None`: hash everything) recorded with the same digest, so a
    /// model is hashed once per copy, not once per run. A half-copied or changed
    /// file is a [`ManifestError::Mismatch`]. Returns how many files were hashed.
    pub fn verify_with_cache(
        &self,
        dir: &Path,
        cache: Option<&Path>,
    ) -> Result<usize, ManifestError> {
        let mut known: VerifiedFiles = cache
            .and_then(|c| std::fs::read(c).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let mut hashed = 0;
        for digest in self.model_files() {
            let path = dir.join(&digest.path);
            let key = std::path::absolute(&path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string();
            let stamp = file_stamp(&path)?;
            let seen = known.files.get(&key);
            if seen.is_some_and(|v| v.stamp == stamp && v.sha256 == digest.sha256) {
                continue;
            }
            let actual = digest_file(&path, &digest.path)?;
            hashed += 1;
            if actual.sha256 != digest.sha256 {
                return Err(ManifestError::Mismatch {
                    path: dir.join(MANIFEST_FILE),
                    file: digest.path.clone(),
                    what: format!(
                        "sha256 {} on disk, {} recorded: half-copied or changed since the export",
                        &actual.sha256[..12],
                        &digest.sha256[..12]
                    ),
                });
            }
            known.files.insert(
                key,
                VerifiedFile {
                    stamp,
                    sha256: actual.sha256,
                },
            );
        }
        if let Some(cache) = cache.filter(|_| hashed > 0) {
            // Best effort: a cache that cannot be written only means hashing again.
            let write = || -> std::io::Result<()> {
                if let Some(parent) = cache.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let bytes = serde_json::to_vec(&known)?;
                crate::atomic::write_file(cache, |staging| std::fs::write(staging, &bytes), |e| e)
            };
            if let Err(e) = write() {
                tracing::warn!(cache = %cache.display(), error = %e, "cannot record the verified model files");
            }
        }
        Ok(hashed)
    }

    /// Reads `dir`'s manifest and verifies its files with this machine's cache
    /// ([`default_verify_cache`]): what `audiocap run` and `caption` do before loading.
    pub fn verify_dir(dir: &Path) -> Result<usize, ManifestError> {
        let cache = default_verify_cache();
        Self::read(dir)?.verify_with_cache(dir, cache.as_deref())
    }

    fn model_files(&self) -> Vec<&FileDigest> {
        let mut files = vec![&self.onnx.tokenizer];
        for graph in [
            &self.onnx.audio_encoder,
            &self.onnx.embedding,
            &self.onnx.decoder,
        ] {
            files.push(&graph.file);
            files.extend(graph.external_data.iter());
        }
        files
    }

    /// The width of the `kind` embedding this export can give, or `None` when it
    /// cannot (`encoder`: exports from before the `encoder_embedding` output).
    pub fn embedding_dim(&self, kind: crate::output::EmbeddingKind) -> Option<usize> {
        use crate::output::EmbeddingKind;
        match kind {
            EmbeddingKind::None => None,
            EmbeddingKind::Encoder => self.encoder.embedding_dim,
            EmbeddingKind::Projector => Some(self.projector.output_dim),
        }
    }

    /// The names of the export's tags, when its encoder is a tagger.
    pub fn tag_labels(&self) -> Option<&[String]> {
        self.encoder.tags.as_ref().map(|t| t.labels.as_slice())
    }

    /// `name@sha256[:12]` of the manifest itself, for output rows.
    pub fn identity(&self, dir: &Path) -> Result<String, ManifestError> {
        let digest = digest_file(&dir.join(MANIFEST_FILE), MANIFEST_FILE)?;
        Ok(format!("{}@{}", self.name, &digest.sha256[..12]))
    }
}

/// This machine's earlier verifications: absolute path → (size, mtime) and digest.
#[derive(Debug, Default, Serialize, Deserialize)]
struct VerifiedFiles {
    files: std::collections::BTreeMap<String, VerifiedFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct VerifiedFile {
    stamp: (u64, u128),
    sha256: String,
}

/// (size, modification time in ns) of `path`.
fn file_stamp(path: &Path) -> Result<(u64, u128), ManifestError> {
    let meta = std::fs::metadata(path).map_err(|source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), mtime))
}

/// Where `audiocap` records verified model files: `verified-model-files.json` in
/// [`crate::config::audiocap_home`].
pub fn default_verify_cache() -> Option<PathBuf> {
    Some(crate::config::audiocap_home()?.join("verified-model-files.json"))
}

/// Size and SHA-256 of `path`, recorded under the name `recorded_as`.
pub fn digest_file(path: &Path, recorded_as: &str) -> Result<FileDigest, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest {
        path: recorded_as.to_string(),
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// The current time as RFC 3339 UTC (`2026-11-27T01:02:03Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339_from_unix(secs)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn rfc3339_from_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_labels_from_audioset_csv_and_plain_lines() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("class_labels_indices.csv");
        // Rows out of order, a quoted name with commas.
        std::fs::write(
            &csv,
            "index,mid,display_name\n1,/m/b,\"Bird vocalization, bird call\"\n0,/m/a,Speech\n",
        )
        .unwrap();
        assert_eq!(
            read_tag_labels(&csv, 2).unwrap(),
            ["Speech", "Bird vocalization, bird call"]
        );
        let e = read_tag_labels(&csv, 3).unwrap_err().to_string();
        assert!(
            e.contains("no name for 1 of the 3 labels (indices 2)"),
            "{e}"
        );
        let e = read_tag_labels(&csv, 1).unwrap_err().to_string();
        assert!(
            e.contains("line 2: index 1, but the tagging head has 1 labels"),
            "{e}"
        );
        std::fs::write(&csv, "index,mid,display_name\n0,/m/a,A\n0,/m/b,B\n").unwrap();
        let e = read_tag_labels(&csv, 2).unwrap_err().to_string();
        assert!(e.contains("index 0 given twice"), "{e}");
        std::fs::write(&csv, "index,mid,display_name\nx,/m/a,A\n").unwrap();
        assert!(read_tag_labels(&csv, 1).is_err());

        let plain = dir.path().join("labels.txt");
        std::fs::write(&plain, "Dog\nSiren, wailing\n\n").unwrap();
        assert_eq!(
            read_tag_labels(&plain, 2).unwrap(),
            ["Dog", "Siren, wailing"]
        );
        let e = read_tag_labels(&plain, 3).unwrap_err().to_string();
        assert!(
            e.contains("2 names (one per line), but the tagging head has 3"),
            "{e}"
        );
        assert_eq!(default_tag_labels(2), ["class_0", "class_1"]);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_from_unix(1_795_741_323), "2026-11-27T01:02:03Z");
    }

    #[test]
    fn digests_are_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let d = digest_file(&p, "f").unwrap();
        assert_eq!(d.bytes, 3);
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
