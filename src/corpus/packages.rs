//! Pinned Debian packages: found in a folder of `.deb`s or fetched with
//! `apt-get download`, checked by SHA-256, unpacked with `dpkg -x` (nothing is
//! installed, no root needed).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::catalog::Package;
use crate::atomic;

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(
        "package {name} {version}: no .deb with SHA-256 {sha256} in {searched} and `apt-get download` {why}"
    )]
    NotFound {
        name: String,
        version: String,
        sha256: String,
        searched: String,
        why: String,
    },
    #[error("package {name}: `dpkg -x {deb}` failed: {why}")]
    Unpack {
        name: String,
        deb: PathBuf,
        why: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Finds or downloads the package's `.deb` and unpacks it once under
/// `cache/unpacked/`; returns the unpacked root.
///
/// `.deb`s are looked for in `debs` (if given) and `cache/debs`, by name prefix and
/// checked by hash, so a mirror's file naming (epochs as `%3a`) does not matter.
pub fn unpacked(
    package: &Package,
    debs: Option<&Path>,
    cache: &Path,
) -> Result<PathBuf, PackageError> {
    let root = cache
        .join("unpacked")
        .join(format!("{}-{}", package.name, &package.sha256[..12]));
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let deb = find_or_download(package, debs, cache)?;
    let staged = atomic::Staging::new(&root);
    let staging = staged.path();
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let output = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(staging)
        .output()
        .map_err(|e| PackageError::Unpack {
            name: package.name.clone(),
            deb: deb.clone(),
            why: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(PackageError::Unpack {
            name: package.name.clone(),
            deb,
            why: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    std::fs::write(staging.join(".complete"), &package.sha256).map_err(io(staging))?;
    staged.commit_dir().map_err(io(&root))?;
    Ok(root)
}

fn find_or_download(
    package: &Package,
    debs: Option<&Path>,
    cache: &Path,
) -> Result<PathBuf, PackageError> {
    let download_dir = cache.join("debs");
    let dirs: Vec<&Path> = debs.into_iter().chain([download_dir.as_path()]).collect();
    for dir in &dirs {
        if let Some(found) = matching_deb(dir, package)? {
            return Ok(found);
        }
    }
    std::fs::create_dir_all(&download_dir).map_err(io(&download_dir))?;
    let spec = format!("{}={}", package.name, package.version);
    let why = match Command::new("apt-get")
        .args(["download", &spec])
        .current_dir(&download_dir)
        .output()
    {
        Ok(out) if out.status.success() => match matching_deb(&download_dir, package)? {
            Some(found) => return Ok(found),
            None => "downloaded a file with another hash (has the archive changed?)".to_string(),
        },
        Ok(out) => format!(
            "failed: {} (package lists older than the pin: `apt-get update`; a version the \
             archive no longer has: see corpus/README.md)",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ")
        ),
        Err(e) => format!("could not run: {e}"),
    };
    Err(PackageError::NotFound {
        name: package.name.clone(),
        version: package.version.clone(),
        sha256: package.sha256.clone(),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        why,
    })
}

fn matching_deb(dir: &Path, package: &Package) -> Result<Option<PathBuf>, PackageError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let prefix = format!("{}_", package.name);
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    candidates.sort();
    for path in candidates {
        if sha256_file(&path).map_err(io(&path))? == package.sha256.to_ascii_lowercase() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_deb_with_another_hash_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pkg_1.0_all.deb"), b"not it").unwrap();
        let package = Package {
            name: "pkg".into(),
            version: "1.0".into(),
            sha256: "0".repeat(64),
            licence: "CC0-1.0".into(),
            attribution: "x".into(),
        };
        assert!(matching_deb(dir.path(), &package).unwrap().is_none());
    }
}
