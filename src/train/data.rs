//! Training sets: captions tables in the Clotho, AudioCaps or a generic layout (read
//! by the same code as `audiocap eval`'s references) matched to their audio files.
//! A clip whose audio cannot be found is reported and left out, never a crash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::audio::files::audio_files;
use crate::eval::files::{InputError, Layout, read_references, stem};

/// One training clip: its audio and every reference caption.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainClip {
    /// The clip's key in the captions table.
    pub key: String,
    pub audio: PathBuf,
    pub captions: Vec<String>,
}

/// A captions table matched to audio.
#[derive(Debug, Clone)]
pub struct TrainSet {
    pub layout: Layout,
    pub clips: Vec<TrainClip>,
    /// (key, why) of clips left out because their audio was not found.
    pub missing_audio: Vec<(String, String)>,
    /// Keys of clips without any caption (left out).
    pub without_captions: Vec<String>,
}

impl TrainSet {
    /// Caption count over all clips (each caption is one training example).
    pub fn num_captions(&self) -> usize {
        self.clips.iter().map(|c| c.captions.len()).sum()
    }
}

/// Reads `captions` (CSV or Parquet) and finds each clip's audio under `audio_dir`.
///
/// Clotho: `file_name` names the file. AudioCaps: the file is named by the
/// `audiocap_id`, or `youtube_id_start` (`abc_30`, `abc_30.000`), with any audio
/// extension. Generic: the key column holds a path (absolute, or relative to
/// `audio_dir`) or a file name found anywhere under `audio_dir`.
pub fn load_train_set(
    captions: &Path,
    audio_dir: &Path,
    key_column: Option<&str>,
) -> Result<TrainSet, InputError> {
    let references = read_references(captions, key_column)?;
    let index = AudioIndex::build(audio_dir).map_err(|source| InputError::Io {
        path: audio_dir.to_path_buf(),
        source,
    })?;
    let mut clips = Vec::new();
    let mut missing_audio = Vec::new();
    for clip in references.clips {
        let direct = Path::new(&clip.written_key);
        let direct = if direct.is_absolute() {
            direct.to_path_buf()
        } else {
            audio_dir.join(direct)
        };
        let found = if direct.is_file() {
            Some(direct)
        } else {
            clip.names.iter().find_map(|n| index.find(n))
        };
        match found {
            Some(audio) => clips.push(TrainClip {
                key: clip.key,
                audio,
                captions: clip.captions,
            }),
            None => missing_audio.push((
                clip.key,
                format!(
                    "no audio file named {} under {}",
                    clip.names.join(" or "),
                    audio_dir.display()
                ),
            )),
        }
    }
    Ok(TrainSet {
        layout: references.layout,
        clips,
        missing_audio,
        without_captions: references.empty,
    })
}

/// Audio files under a folder by file name and by stem (first found wins; the walk is
/// sorted, so the choice is stable).
struct AudioIndex {
    by_name: HashMap<String, PathBuf>,
    by_stem: HashMap<String, PathBuf>,
}

impl AudioIndex {
    fn build(dir: &Path) -> std::io::Result<Self> {
        let mut index = AudioIndex {
            by_name: HashMap::new(),
            by_stem: HashMap::new(),
        };
        for item in audio_files(dir) {
            let path = item.map_err(|e| e.error)?;
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // The walk is sorted: the first file of a name or stem stays.
            index
                .by_stem
                .entry(stem(name).to_string())
                .or_insert_with(|| path.clone());
            index.by_name.entry(name.to_string()).or_insert(path);
        }
        Ok(index)
    }

    fn find(&self, name: &str) -> Option<PathBuf> {
        self.by_name
            .get(name)
            .or_else(|| self.by_stem.get(stem(name)))
            .or_else(|| self.by_stem.get(name))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::touch;

    #[test]
    fn clotho_layout_finds_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let audio = dir.path().join("audio");
        touch(&audio.join("rain.wav"));
        touch(&audio.join("sub/dog bark.flac"));
        let csv = dir.path().join("captions.csv");
        std::fs::write(
            &csv,
            "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n\
             rain.wav,rain falls,heavy rain,rain on a roof,rain,raining\n\
             dog bark.flac,a dog barks,dog,barking,a dog,woof\n\
             gone.wav,a,b,c,d,e\n",
        )
        .unwrap();
        let set = load_train_set(&csv, &audio, None).unwrap();
        assert_eq!(set.layout, Layout::Clotho);
        assert_eq!(set.clips.len(), 2);
        assert_eq!(set.clips[1].audio, audio.join("sub/dog bark.flac"));
        assert_eq!(set.clips[0].captions.len(), 5);
        assert_eq!(set.num_captions(), 10);
        assert_eq!(set.missing_audio.len(), 1);
        assert_eq!(set.missing_audio[0].0, "gone.wav");
        assert!(set.missing_audio[0].1.contains("gone.wav"));
    }

    #[test]
    fn audiocaps_layout_matches_ids_or_youtube_start() {
        let dir = tempfile::tempdir().unwrap();
        let audio = dir.path().join("audio");
        touch(&audio.join("91139.wav"));
        touch(&audio.join("xyz_30.flac"));
        let csv = dir.path().join("train.csv");
        std::fs::write(
            &csv,
            "audiocap_id,youtube_id,start_time,caption\n\
             91139,r1nicOVtvkQ,130,A woman talks\n\
             91139,r1nicOVtvkQ,130,Someone speaks\n\
             58146,xyz,30,Birds chirp\n",
        )
        .unwrap();
        let set = load_train_set(&csv, &audio, None).unwrap();
        assert_eq!(set.layout, Layout::AudioCaps);
        let keys: Vec<(&str, usize)> = set
            .clips
            .iter()
            .map(|c| (c.key.as_str(), c.captions.len()))
            .collect();
        assert_eq!(keys, [("91139", 2), ("58146", 1)]);
        assert_eq!(set.clips[1].audio, audio.join("xyz_30.flac"));
    }

    #[test]
    fn generic_manifest_takes_paths_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere/a.wav");
        touch(&elsewhere);
        let audio = dir.path().join("audio");
        touch(&audio.join("nested/b.wav"));
        let csv = dir.path().join("manifest.csv");
        std::fs::write(
            &csv,
            format!(
                "uri,caption\n{},first\nnested/b.wav,second\n",
                elsewhere.display()
            ),
        )
        .unwrap();
        let set = load_train_set(&csv, &audio, Some("uri")).unwrap();
        assert_eq!(set.clips.len(), 2, "{:?}", set.missing_audio);
        assert_eq!(set.clips[0].audio, elsewhere);
        assert_eq!(set.clips[1].audio, audio.join("nested/b.wav"));
    }
}
