//! Writing a file or folder beside its final name and renaming it into place, so a
//! reader (or a run that is killed half-way) never sees half of it. Uses nothing
//! from the crate.
//!
//! One staging-name rule for every such write: `.<file name>.<pid>.<n>.staging` in
//! the destination's own folder (the same file system, so the rename is atomic).
//! The full file name, the process and a per-process counter are in it, so two
//! destinations (`x.v1`, `x.v2`), two writers in one process and two processes never
//! share a staging path. A [`Staging`] removes its path when dropped unless it was
//! committed, so an error leaves nothing behind; staging paths left by killed
//! processes are removed the next time the same destination is staged.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const SUFFIX: &str = ".staging";

/// Counts staging paths handed out by this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh staging path for `dest` (nothing is created).
pub fn staging_path(dest: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = OsString::from(".");
    name.push(file_name(dest));
    name.push(format!(".{}.{n}{SUFFIX}", std::process::id()));
    dest.with_file_name(name)
}

fn file_name(dest: &Path) -> OsString {
    dest.file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| OsString::from("unnamed"))
}

/// A staging path for one destination; removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    dest: PathBuf,
    armed: bool,
}

impl Staging {
    /// A staging path for `dest` (nothing is created there); first removes what
    /// processes no longer running left staged for the same `dest`.
    pub fn new(dest: &Path) -> Self {
        remove_stale(dest);
        Self {
            path: staging_path(dest),
            dest: dest.to_path_buf(),
            armed: true,
        }
    }

    /// [`Staging::new`] with the staging folder created.
    pub fn new_dir(dest: &Path) -> io::Result<Self> {
        let staging = Self::new(dest);
        std::fs::create_dir_all(&staging.path)?;
        Ok(staging)
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where it goes.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the staged file or folder into place with one plain rename (a file
    /// already there is replaced; a folder there must be empty or absent).
    pub fn commit(mut self) -> io::Result<()> {
        std::fs::rename(&self.path, &self.dest)?;
        self.armed = false;
        Ok(())
    }

    /// Renames the staged folder into place; a folder already there is removed first
    /// (between the two, `dest` does not exist).
    pub fn commit_dir(mut self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(&self.path, &self.dest)?;
        self.armed = false;
        Ok(())
    }

    /// Leaves the staging path as it is (the caller takes it over).
    pub fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            remove(&self.path);
        }
    }
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Writes `dest` from `fill`, which writes to the staging path, then renames it into
/// place. When `fill` fails (its error is returned) or the rename fails (mapped by
/// `rename_error`), the staging file is removed and `dest` is as it was.
pub fn write_file<T, E>(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<T, E>,
    rename_error: impl FnOnce(io::Error) -> E,
) -> Result<T, E> {
    let staging = Staging::new(dest);
    let value = fill(staging.path())?;
    staging.commit().map_err(rename_error)?;
    Ok(value)
}

/// Writes `dest` through `fill` on a created staging file, syncs it to disk, then
/// renames it into place; `io_error` names the path of a failed create, sync or
/// rename. Nothing is left at the staging path on an error.
pub fn write_synced<T, E>(
    dest: &Path,
    fill: impl FnOnce(&mut File, &Path) -> Result<T, E>,
    io_error: impl Fn(&Path, io::Error) -> E,
) -> Result<T, E> {
    write_file(
        dest,
        |staging| {
            let mut file = File::create(staging).map_err(|e| io_error(staging, e))?;
            let value = fill(&mut file, staging)?;
            file.sync_all().map_err(|e| io_error(staging, e))?;
            Ok(value)
        },
        |e| io_error(dest, e),
    )
}

/// Removes staging paths of `dest` left by processes that are no longer running.
/// Only where that can be told (Linux's `/proc`); elsewhere they stay.
fn remove_stale(dest: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Some(dir) = dest.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    }) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut prefix = OsString::from(".");
    prefix.push(file_name(dest));
    prefix.push(".");
    let Some(prefix) = prefix.to_str() else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|r| r.strip_suffix(SUFFIX))
        else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(pid), true) = (pid.parse::<u32>(), n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            remove(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn siblings_and_repeated_writes_never_share_a_staging_name() {
        let a = staging_path(Path::new("/d/x.v1"));
        let b = staging_path(Path::new("/d/x.v2"));
        let c = staging_path(Path::new("/d/x.v1"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.parent(), Some(Path::new("/d")));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".x.v1.") && name.ends_with(".staging"),
            "{name}"
        );
    }

    #[test]
    fn a_written_file_is_in_place_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.json");
        std::fs::write(&dest, "old").unwrap();
        let n = write_synced(
            &dest,
            |f, _| io::Write::write_all(f, b"new").map(|()| 3),
            |_, e| e,
        )
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "new");
        assert_eq!(names(dir.path()), ["out.json"]);
    }

    #[test]
    fn an_error_while_writing_leaves_neither_staging_nor_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let err = write_file(
            &dest,
            |staging| {
                std::fs::write(staging, "half")?;
                Err::<(), _>(io::Error::other("failed half-way"))
            },
            |e| e,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "failed half-way");
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        // A folder that is dropped uncommitted goes too.
        let staging = Staging::new_dir(&dir.path().join("folder")).unwrap();
        std::fs::write(staging.path().join("part"), "x").unwrap();
        drop(staging);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn a_committed_folder_replaces_the_old_one_entirely() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model");
        std::fs::create_dir_all(dest.join("old-sub")).unwrap();
        std::fs::write(dest.join("old.txt"), "old").unwrap();
        let staging = Staging::new_dir(&dest).unwrap();
        std::fs::write(staging.path().join("new.txt"), "new").unwrap();
        staging.commit_dir().unwrap();
        assert_eq!(names(&dest), ["new.txt"]);
        assert_eq!(names(dir.path()), ["model"]);
    }

    #[test]
    fn staging_left_by_a_dead_process_is_removed_on_the_next_write() {
        if !Path::new("/proc/self").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x");
        // No process has this id (above Linux's pid_max).
        let stale = dir.path().join(".x.4294967295.0.staging");
        std::fs::create_dir_all(stale.join("sub")).unwrap();
        let other = dir.path().join(".xy.4294967295.0.staging");
        std::fs::write(&other, "not x's").unwrap();
        write_file(&dest, |s| std::fs::write(s, "new"), |e| e).unwrap();
        assert_eq!(names(dir.path()), [".xy.4294967295.0.staging", "x"]);
    }
}
