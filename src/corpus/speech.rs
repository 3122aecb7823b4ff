//! Speech from `espeak-ng` run out of its unpacked Debian packages (binary, library
//! and voice data found by path, libraries through `LD_LIBRARY_PATH`).
//!
//! Before any sentence is spoken, [`Espeak::check`] asks the dynamic loader (`ldd`)
//! where every shared library the binary needs comes from: each one must be in the
//! unpacked packages, except the C library (the loader that runs the binary is the
//! machine's own). A library that is missing, or one that would be taken from
//! whatever the machine happens to have installed, stops the build with its name,
//! instead of turning every utterance into an unusable recording.

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
    /// The unpacked package roots, for telling our libraries from the machine's.
    roots: Vec<PathBuf>,
}

/// The C library's own files, which every program takes from the machine it runs on
/// (the kernel's vDSO, the loader, libc and its satellite libraries).
const SYSTEM_LIBRARIES: &[&str] = &[
    "linux-vdso.so.1",
    "libc.so.6",
    "libm.so.6",
    "libmvec.so.1",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libresolv.so.2",
    "libutil.so.1",
];

/// Where the loader would take one needed library from, as `ldd` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// `name => path`.
    Found { name: String, path: PathBuf },
    /// `name => not found`.
    Missing { name: String },
    /// A line naming no library (the loader itself, the vDSO).
    Other { name: String },
}

/// Parses `ldd`'s output, a library a line.
pub fn parse_ldd(text: &str) -> Vec<Resolved> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() {
                return None;
            }
            match line.split_once("=>") {
                Some((name, target)) => {
                    let name = name.trim().to_string();
                    let target = target.trim();
                    if target.starts_with("not found") {
                        return Some(Resolved::Missing { name });
                    }
                    // `path (0x...)`; a path never contains " (0x".
                    let path = target.split(" (0x").next().unwrap_or(target).trim();
                    Some(if path.is_empty() {
                        Resolved::Other { name }
                    } else {
                        Resolved::Found {
                            name,
                            path: PathBuf::from(path),
                        }
                    })
                }
                None => Some(Resolved::Other {
                    name: line.split(" (0x").next().unwrap_or(line).trim().to_string(),
                }),
            }
        })
        .collect()
}

/// A library of the C library itself (the loader is `ld-linux-<arch>.so.N`).
fn is_system_library(name: &str) -> bool {
    let file = Path::new(name)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(name);
    SYSTEM_LIBRARIES.contains(&file) || file.starts_with("ld-linux")
}

/// The problems in a resolution: libraries not found, and libraries that would come
/// from the machine rather than from a package under `roots`.
pub fn linkage_problems(resolved: &[Resolved], roots: &[PathBuf]) -> Vec<String> {
    let mut missing = Vec::new();
    let mut foreign = Vec::new();
    for r in resolved {
        match r {
            Resolved::Missing { name } => missing.push(name.clone()),
            Resolved::Found { name, path } => {
                let ours = roots.iter().any(|root| path.starts_with(root));
                if !ours && !is_system_library(name) {
                    foreign.push(format!("{name} ({})", path.display()));
                }
            }
            Resolved::Other { .. } => {}
        }
    }
    missing.sort();
    missing.dedup();
    foreign.sort();
    foreign.dedup();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "not in any of the speech packages: {}",
            missing.join(", ")
        ));
    }
    if !foreign.is_empty() {
        problems.push(format!(
            "taken from this machine, not from a pinned package: {}",
            foreign.join(", ")
        ));
    }
    problems
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
            roots: roots.to_vec(),
        })
    }

    /// Checks that the binary runs on the unpacked packages alone: every shared
    /// library it needs resolves inside them (but the C library's), and one short
    /// sentence can be spoken into `scratch`.
    pub fn check(&self, scratch: &Path) -> Result<(), String> {
        let output = Command::new("ldd")
            .env("LD_LIBRARY_PATH", &self.library_path)
            .arg(&self.binary)
            .output()
            .map_err(|e| format!("espeak-ng: cannot run `ldd` to check its libraries: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "espeak-ng: `ldd {}` failed: {} {}",
                self.binary.display(),
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let problems = linkage_problems(&parse_ldd(&stdout), &self.roots);
        if !problems.is_empty() {
            return Err(format!(
                "espeak-ng cannot run from its unpacked packages: {}. Pin the Debian \
                 packages that ship them ([[package]]) and add them to [speech] packages \
                 (folders inside them: [speech] library_dirs)",
                problems.join("; ")
            ));
        }
        let probe = Utterance {
            voice: "en".to_string(),
            text: "check".to_string(),
            speed: 175,
            pitch: 50,
        };
        let out = scratch.join("espeak-check.wav");
        self.speak(&probe, &out)
            .map_err(|e| format!("espeak-ng does not run: {e}"))?;
        let _ = std::fs::remove_file(&out);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd1e5f2000)
\tlibespeak-ng.so.1 => /cache/unpacked/libespeak-ng1-2b127a95b50d/usr/lib/x86_64-linux-gnu/libespeak-ng.so.1 (0x00007f1)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)
\tlibasound.so.2 => /lib/x86_64-linux-gnu/libasound.so.2 (0x00007f3)
\tlibpulse-simple.so.0 => not found
\tlibpulse.so.0 => not found
\tlibpulse.so.0 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f4)
";

    #[test]
    fn ldd_lines_are_parsed() {
        let r = parse_ldd(LDD);
        assert_eq!(r.len(), 8);
        assert_eq!(
            r[0],
            Resolved::Other {
                name: "linux-vdso.so.1".into()
            }
        );
        assert_eq!(
            r[2],
            Resolved::Found {
                name: "libc.so.6".into(),
                path: "/lib/x86_64-linux-gnu/libc.so.6".into()
            }
        );
        assert_eq!(
            r[4],
            Resolved::Missing {
                name: "libpulse-simple.so.0".into()
            }
        );
        assert_eq!(
            r[7],
            Resolved::Other {
                name: "/lib64/ld-linux-x86-64.so.2".into()
            }
        );
    }

    #[test]
    fn missing_and_machine_libraries_are_named_but_the_c_library_is_not() {
        let roots = vec![PathBuf::from("/cache/unpacked/libespeak-ng1-2b127a95b50d")];
        let problems = linkage_problems(&parse_ldd(LDD), &roots);
        assert_eq!(
            problems,
            vec![
                "not in any of the speech packages: libpulse-simple.so.0, libpulse.so.0"
                    .to_string(),
                "taken from this machine, not from a pinned package: libasound.so.2 \
                 (/lib/x86_64-linux-gnu/libasound.so.2)"
                    .to_string(),
            ]
        );
        // Everything inside the roots, the C library from the machine: fine.
        let clean = "\tlibespeak-ng.so.1 => /cache/unpacked/libespeak-ng1-2b127a95b50d/x.so (0x1)\n\
                     \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x2)\n\
                     \t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert!(linkage_problems(&parse_ldd(clean), &roots).is_empty());
    }
}
