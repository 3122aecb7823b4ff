//! Speech from `espeak-ng` run out of its unpacked Debian packages (binary, library
//! and voice data found by path, libraries through `LD_LIBRARY_PATH`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::catalog::SpeechSpec;

/// A runnable `espeak-ng` assembled from unpacked package roots.
#[derive(Debug, Clone)]
pub struct Espeak {
    binary: PathBuf,
    /// The folder that contains `espeak-ng-data` (`--path`).
    data_parent: PathBuf,
    library_path: String,
}

/// One utterance to synthesize.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    pub voice: String,
    pub text: String,
    /// Words per minute.
    pub speed: u32,
    /// 0..99.
    pub pitch: u32,
}

impl Espeak {
    /// Finds the binary, the voice data and the libraries under `roots`.
    pub fn locate(spec: &SpeechSpec, roots: &[PathBuf]) -> Result<Espeak, String> {
        let find = |rel: &str| roots.iter().map(|r| r.join(rel)).find(|p| p.exists());
        let binary = find(&spec.binary).ok_or_else(|| {
            format!(
                "espeak-ng: `{}` is in none of the speech packages",
                spec.binary
            )
        })?;
        let data = find(&spec.data_dir).ok_or_else(|| {
            format!(
                "espeak-ng: `{}` is in none of the speech packages",
                spec.data_dir
            )
        })?;
        let data_parent = data
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| "espeak-ng: the data folder has no parent".to_string())?;
        let library_path = roots
            .iter()
            .flat_map(|r| spec.library_dirs.iter().map(move |d| r.join(d)))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        Ok(Espeak {
            binary,
            data_parent,
            library_path,
        })
    }

    /// Synthesizes `utterance` into a WAV file at `out` (espeak-ng's own rate).
    pub fn speak(&self, utterance: &Utterance, out: &Path) -> Result<(), String> {
        let output = Command::new(&self.binary)
            .env("LD_LIBRARY_PATH", &self.library_path)
            .arg(format!("--path={}", self.data_parent.display()))
            .args(["-v", &utterance.voice])
            .args(["-s", &utterance.speed.to_string()])
            .args(["-p", &utterance.pitch.to_string()])
            .arg("-w")
            .arg(out)
            .arg("--")
            .arg(&utterance.text)
            .output()
            .map_err(|e| format!("espeak-ng: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "espeak-ng -v {}: {}",
                utterance.voice,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}
