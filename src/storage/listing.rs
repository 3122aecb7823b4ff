//! Source specs → a lazy stream of inputs.
//!
//! A source is a path or URL (a file, a folder listed recursively, or a glob such as
//! `s3://b/audio/**/*.flac` or `/data/*/x.wav`) or a manifest. Nothing is listed into
//! memory first: object listings are the store's paged stream, local folders are
//! walked depth-first on a thread feeding a bounded channel (one directory's entries
//! at a time, sorted by name so the order is reproducible), manifests are read in
//! batches. Sources are listed one after another, lazily, in the order given.
//!
//! Filters, applied to folder and glob listings only (an explicit file or a manifest
//! entry is always taken, whatever its name):
//! - the glob itself, matched against the key relative to its literal prefix
//!   (`*` stays within one folder, `**` crosses folders);
//! - `include` / `exclude` globs, matched against the key relative to the listed
//!   folder (for a glob: relative to its literal prefix). A pattern without `/`
//!   matches the file name at any depth (`*.tmp`), like `.gitignore`;
//! - for folders (not globs) the extension list, by default
//!   [`AUDIO_EXTENSIONS`](crate::audio::AUDIO_EXTENSIONS).
//!
//! The same URI reached through two sources is listed twice: removing duplicates
//! would need memory proportional to the listing, so it is the caller's choice.
//!
//! Symlinked files are followed; symlinked folders are not (a link cycle would never
//! end). An unreadable sub-folder becomes a [`Listed::Failed`] item; a folder or
//! bucket that cannot be listed at all ends the stream with an `Err`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::stream::{self, BoxStream, Stream, StreamExt};
use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Deserialize;

use super::input::{InputRef, InputSource, Listed};
use super::location::{Location, LocationKind, StorageOptions};
use super::{StorageError, redact, redact_text, scheme_of};
use crate::audio::AUDIO_EXTENSIONS;

/// Where inputs come from.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Source {
    /// A file, a folder (recursive), or a glob; local or a URL.
    Path(String),
    /// A Parquet, CSV, JSON-lines or text file listing one URI per row (see
    /// [`super::manifest`]); local or a URL.
    Manifest {
        /// The manifest's path or URL.
        manifest: String,
        /// The column holding the URIs (default: `uri`, then `path`, then `file_name`).
        #[serde(default)]
        column: Option<String>,
    },
}

/// Filters for folder and glob listings (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOptions {
    /// Keep only keys matching one of these globs (empty: keep all).
    #[serde(default)]
    pub include: Vec<String>,
    /// Drop keys matching any of these globs.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// File extensions taken from folders, without the dot, case-insensitive
    /// (default: the audio extensions; an empty list takes every file).
    #[serde(default)]
    pub extensions: Option<Vec<String>>,
}

/// What a folder or glob listing keeps.
struct KeyFilter {
    include: Option<GlobSet>,
    exclude: GlobSet,
    /// Lower-case extensions; `None` takes any file.
    extensions: Option<Vec<String>>,
    glob: Option<GlobMatcher>,
}

/// What a filter does with a key.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Take,
    /// Left out for its extension (lower-cased, no dot) only.
    WrongExtension(String),
    Leave,
}

impl KeyFilter {
    #[cfg(test)]
    fn accepts(&self, rel: &str) -> bool {
        self.verdict(rel) == Verdict::Take
    }

    fn verdict(&self, rel: &str) -> Verdict {
        if let Some(glob) = &self.glob
            && !glob.is_match(rel)
        {
            return Verdict::Leave;
        }
        if let Some(include) = &self.include
            && !include.is_match(rel)
        {
            return Verdict::Leave;
        }
        if self.exclude.is_match(rel) {
            return Verdict::Leave;
        }
        if let Some(exts) = &self.extensions {
            let name = rel.rsplit('/').next().unwrap_or(rel);
            let extension = name.rsplit_once('.').map_or("", |(_, e)| e);
            if !exts.iter().any(|x| x.eq_ignore_ascii_case(extension)) {
                return Verdict::WrongExtension(extension.to_ascii_lowercase());
            }
        }
        Verdict::Take
    }

    /// The listing item for a key that is `uri`, made by `input` if it is taken.
    fn item(
        &self,
        rel: &str,
        uri: impl FnOnce() -> String,
        input: impl FnOnce() -> InputRef,
    ) -> Option<Listed> {
        match self.verdict(rel) {
            Verdict::Take => Some(Listed::Input(input())),
            Verdict::WrongExtension(extension) => Some(Listed::Skipped {
                uri: uri(),
                extension,
            }),
            Verdict::Leave => None,
        }
    }
}

fn glob(pattern: &str) -> Result<globset::Glob, StorageError> {
    glob_shown(pattern, pattern)
}

/// Compiles `pattern`; an error names `shown`, the pattern as the user wrote it.
fn glob_shown(pattern: &str, shown: &str) -> Result<globset::Glob, StorageError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| StorageError::Pattern {
            pattern: shown.to_string(),
            message: e.kind().to_string(),
        })
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, StorageError> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        // A bare name pattern matches at any depth.
        let full = if p.contains('/') {
            p.clone()
        } else {
            format!("**/{p}")
        };
        set.add(glob_shown(&full, p)?);
    }
    set.build().map_err(|e| StorageError::Pattern {
        pattern: patterns.join(", "),
        message: e.to_string(),
    })
}

/// A glob spec split into its literal folder and the pattern below it.
#[derive(Debug, PartialEq)]
struct GlobSpec {
    base: String,
    pattern: String,
}

/// `s3://b/audio/**/*.flac` → (`s3://b/audio`, `**/*.flac`); `None` without glob
/// characters (`*`, `[`, `{`; and `?` in local paths, where it is not a query).
fn split_glob(spec: &str) -> Option<GlobSpec> {
    let url = scheme_of(spec).is_some();
    let (body, query) = match (url, spec.split_once('?')) {
        (true, Some((b, q))) => (b, Some(q)),
        _ => (spec, None),
    };
    // Glob characters in the scheme or authority are not globs.
    let path_start = if url {
        let after = body.find("://").map_or(0, |p| p + 3);
        body[after..].find('/').map_or(body.len(), |p| after + p)
    } else {
        0
    };
    let is_meta = |c: char| c == '*' || c == '[' || c == '{' || (!url && c == '?');
    let first = path_start + body[path_start..].find(is_meta)?;
    let slash = body[..first]
        .rfind('/')
        .filter(|&s| s >= path_start || !url);
    let (mut base, pattern) = match slash {
        Some(0) if !url => ("/".to_string(), &body[1..]),
        Some(s) => (body[..s].to_string(), &body[s + 1..]),
        None if url => (
            body[..path_start].to_string(),
            body[path_start..].trim_start_matches('/'),
        ),
        None => (".".to_string(), body),
    };
    if let Some(q) = query {
        base = format!("{base}?{q}");
    }
    Some(GlobSpec {
        base,
        pattern: pattern.to_string(),
    })
}

/// A lazy stream of every input of `sources`, in order. Every location, pattern and
/// client is checked before this returns; no I/O happens until the stream is polled.
/// An `Err` item is fatal (a listing failed as a whole) and is the stream's last item.
pub fn list_inputs(
    sources: &[Source],
    options: &ListOptions,
    storage: &StorageOptions,
) -> Result<BoxStream<'static, Result<Listed, StorageError>>, StorageError> {
    let filters = Filters::new(options)?;
    let mut streams = Vec::with_capacity(sources.len());
    for source in sources {
        let stream = match source {
            Source::Manifest { manifest, column } => {
                let location = Location::parse(manifest, storage)?;
                super::manifest::entries(location, column.clone(), storage.clone())?
            }
            Source::Path(spec) => match split_glob(spec) {
                Some(g) => {
                    let location = Location::parse(&g.base, storage)?;
                    filters.glob_source(spec, location, &g.pattern)?
                }
                None => {
                    let location = Location::parse(spec, storage)?;
                    let filter = filters.folder();
                    path_source(spec, location, Arc::new(filter), None)?
                }
            },
        };
        streams.push(stream);
    }
    Ok(stop_after_error(stream::iter(streams).flatten()).boxed())
}

/// Lists one location: with `pattern` (a glob relative to the location's prefix),
/// the keys matching it; without, the location as a file or a folder. For stores
/// built by hand ([`Location::from_store`]); otherwise use [`list_inputs`].
pub fn list_location(
    location: Location,
    pattern: Option<&str>,
    options: &ListOptions,
) -> Result<BoxStream<'static, Result<Listed, StorageError>>, StorageError> {
    let filters = Filters::new(options)?;
    let spec = location.to_string();
    let stream = match pattern {
        Some(p) => filters.glob_source(&spec, location, p)?,
        None => path_source(&spec, location, Arc::new(filters.folder()), None)?,
    };
    Ok(stop_after_error(stream).boxed())
}

/// The compiled [`ListOptions`].
struct Filters {
    include: Option<GlobSet>,
    exclude: GlobSet,
    extensions: Option<Vec<String>>,
}

impl Filters {
    fn new(options: &ListOptions) -> Result<Filters, StorageError> {
        let include = (!options.include.is_empty())
            .then(|| glob_set(&options.include))
            .transpose()?;
        let exclude = glob_set(&options.exclude)?;
        let extensions = match &options.extensions {
            None => Some(AUDIO_EXTENSIONS.iter().map(|e| e.to_string()).collect()),
            Some(list) if list.is_empty() => None,
            Some(list) => Some(
                list.iter()
                    .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
                    .collect(),
            ),
        };
        Ok(Filters {
            include,
            exclude,
            extensions,
        })
    }

    fn folder(&self) -> KeyFilter {
        KeyFilter {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            extensions: self.extensions.clone(),
            glob: None,
        }
    }

    fn glob_source(
        &self,
        spec: &str,
        location: Location,
        pattern: &str,
    ) -> Result<BoxStream<'static, Result<Listed, StorageError>>, StorageError> {
        // Without `**` a glob cannot match deeper than its own number of segments.
        let depth = (!pattern.contains("**")).then(|| pattern.split('/').count());
        let filter = KeyFilter {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            extensions: None,
            glob: Some(glob(pattern)?.compile_matcher()),
        };
        path_source(spec, location, Arc::new(filter), Some(depth))
    }
}

/// `max_depth`: `None` for a plain path, `Some(depth)` for a glob (`Some(None)`: `**`).
fn path_source(
    spec: &str,
    location: Location,
    filter: Arc<KeyFilter>,
    max_depth: Option<Option<usize>>,
) -> Result<BoxStream<'static, Result<Listed, StorageError>>, StorageError> {
    let shown = redact(spec);
    let is_glob = max_depth.is_some();
    match location.kind.clone() {
        LocationKind::Local { root } => Ok(stream::once(async move {
            if is_glob {
                return walk_local(root, shown, filter, max_depth.flatten());
            }
            match std::fs::metadata(&root) {
                Ok(meta) if meta.is_dir() => walk_local(root, shown, filter, None),
                Ok(meta) => single(Listed::Input(local_input(root, Some(meta.len())))),
                Err(e) => {
                    let uri = root.to_string_lossy().into_owned();
                    single(Listed::Failed {
                        error: io_error(&uri, &e),
                        uri,
                    })
                }
            }
        })
        .flatten()
        .boxed()),
        LocationKind::Object { base } if base.starts_with("http") && !is_azure(&base) => {
            // A plain web server cannot list: an http(s) source is one file, read as is.
            // A folder (`https://host/audio/`) would otherwise be fetched as a file.
            let folder = spec.split(['?', '#']).next().unwrap_or(spec).ends_with('/');
            if is_glob || folder || location.prefix.as_ref().is_empty() {
                let what = if is_glob { "a glob" } else { "a folder" };
                return Err(StorageError::InvalidLocation {
                    spec: shown,
                    reason: format!(
                        "{what} over http(s) needs a manifest: a web server cannot be \
                         listed, so an http(s) source names one file; list the files in a \
                         manifest (`[input] manifests`) instead"
                    ),
                });
            }
            Ok(single(Listed::Input(InputRef {
                uri: location.uri(),
                source: InputSource::Object {
                    store: Arc::clone(&location.store),
                    path: location.prefix.clone(),
                },
                size: None,
            })))
        }
        LocationKind::Object { .. } => {
            // `s3://b/x.flac` may be an object or a folder; a trailing slash says folder.
            let try_object = !is_glob
                && !location.prefix.as_ref().is_empty()
                && !spec.split('?').next().unwrap_or(spec).ends_with('/');
            Ok(
                stream::once(list_object(location, shown, filter, try_object))
                    .flatten()
                    .boxed(),
            )
        }
    }
}

fn is_azure(base: &str) -> bool {
    base.contains(".blob.core.windows.net") || base.contains(".dfs.core.windows.net")
}

fn single(item: Listed) -> BoxStream<'static, Result<Listed, StorageError>> {
    stream::iter([Ok(item)]).boxed()
}

fn local_input(path: PathBuf, size: Option<u64>) -> InputRef {
    InputRef {
        uri: path.to_string_lossy().into_owned(),
        source: InputSource::Local(path),
        size,
    }
}

pub(crate) fn io_error(uri: &str, e: &std::io::Error) -> StorageError {
    match e.kind() {
        std::io::ErrorKind::NotFound => StorageError::NotFound { uri: uri.into() },
        std::io::ErrorKind::PermissionDenied => StorageError::PermissionDenied {
            uri: uri.into(),
            message: e.to_string(),
        },
        _ => StorageError::Unreadable {
            uri: uri.into(),
            message: e.to_string(),
        },
    }
}

async fn list_object(
    location: Location,
    shown: String,
    filter: Arc<KeyFilter>,
    try_object: bool,
) -> BoxStream<'static, Result<Listed, StorageError>> {
    let uri = location.uri();
    if try_object {
        match location.store.head(&location.prefix).await {
            Ok(meta) => return single(Listed::Input(InputRef::object(&location, meta))),
            // Not an object: list it as a folder below.
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e @ object_store::Error::PermissionDenied { .. }) => {
                return single(Listed::Failed {
                    error: StorageError::PermissionDenied {
                        uri: uri.clone(),
                        message: redact_text(&e.to_string()),
                    },
                    uri,
                });
            }
            Err(e) => return stream::iter([Err(list_failed(&shown, &e))]).boxed(),
        }
    }
    let prefix = location.prefix.clone();
    let listing = location
        .store
        .list((!prefix.as_ref().is_empty()).then_some(&prefix));
    let seen = Arc::new(AtomicBool::new(false));
    let seen_in = Arc::clone(&seen);
    let items = listing.filter_map(move |item| {
        let out = match item {
            Ok(meta) => {
                seen_in.store(true, Ordering::Relaxed);
                let rel = relative_key(&prefix, &meta.location);
                filter
                    .item(
                        &rel,
                        || location.uri_of(&meta.location),
                        || InputRef::object(&location, meta.clone()),
                    )
                    .map(Ok)
            }
            Err(e) => Some(Err(list_failed(&shown, &e))),
        };
        std::future::ready(out)
    });
    // A named object that is neither an object nor a folder: not found.
    let missing = stream::once(async move {
        (try_object && !seen.load(Ordering::Relaxed)).then(|| {
            Ok(Listed::Failed {
                error: StorageError::NotFound { uri: uri.clone() },
                uri,
            })
        })
    })
    .filter_map(std::future::ready);
    items.chain(missing).boxed()
}

fn list_failed(shown: &str, e: &object_store::Error) -> StorageError {
    StorageError::ListFailed {
        spec: shown.to_string(),
        message: redact_text(&e.to_string()),
    }
}

/// `key` below `prefix`, `/`-separated (`audio` + `audio/a/b.wav` → `a/b.wav`).
fn relative_key(prefix: &Path, key: &Path) -> String {
    match key.prefix_match(prefix) {
        Some(parts) => parts
            .map(|p| p.as_ref().to_string())
            .collect::<Vec<_>>()
            .join("/"),
        None => key.to_string(),
    }
}

/// Ends the stream after its first `Err`.
fn stop_after_error<S>(s: S) -> impl Stream<Item = Result<Listed, StorageError>>
where
    S: Stream<Item = Result<Listed, StorageError>>,
{
    s.scan(false, |failed, item| {
        if *failed {
            return std::future::ready(None);
        }
        *failed = item.is_err();
        std::future::ready(Some(item))
    })
}

/// A folder entry, read before recursing so a folder's entries come out sorted.
struct Entry {
    path: PathBuf,
    rel: String,
    is_dir: bool,
    size: Option<u64>,
}

/// Walks `root` on a thread into a bounded channel: the stream holds at most one
/// folder's names per level plus the channel, never the whole tree.
fn walk_local(
    root: PathBuf,
    shown: String,
    filter: Arc<KeyFilter>,
    max_depth: Option<usize>,
) -> BoxStream<'static, Result<Listed, StorageError>> {
    let (tx, rx) = async_channel::bounded(256);
    let spec = shown.clone();
    let spawned = std::thread::Builder::new()
        .name("audiocap-list".into())
        .spawn(move || walk_into(&root, &shown, &filter, max_depth, &tx));
    match spawned {
        Ok(_) => rx.boxed(),
        Err(e) => stream::iter([Err(StorageError::ListFailed {
            spec,
            message: format!("cannot start the listing thread: {e}"),
        })])
        .boxed(),
    }
}

fn walk_into(
    root: &std::path::Path,
    shown: &str,
    filter: &KeyFilter,
    max_depth: Option<usize>,
    tx: &async_channel::Sender<Result<Listed, StorageError>>,
) {
    let top = match read_sorted(root, "") {
        Ok(entries) => entries,
        Err(e) => {
            let _ = tx.send_blocking(Err(StorageError::ListFailed {
                spec: shown.to_string(),
                message: e.to_string(),
            }));
            return;
        }
    };
    let mut stack = vec![top.into_iter()];
    while let Some(level) = stack.last_mut() {
        let Some(entry) = level.next() else {
            stack.pop();
            continue;
        };
        let item = if entry.is_dir {
            // Files at depth d+1 live in a folder at depth d = stack.len().
            if max_depth.is_some_and(|max| stack.len() >= max) {
                continue;
            }
            match read_sorted(&entry.path, &entry.rel) {
                Ok(entries) => {
                    stack.push(entries.into_iter());
                    continue;
                }
                Err(e) => {
                    let uri = entry.path.to_string_lossy().into_owned();
                    Listed::Failed {
                        error: io_error(&uri, &e),
                        uri,
                    }
                }
            }
        } else {
            let (path, size) = (entry.path, entry.size);
            let uri = || path.to_string_lossy().into_owned();
            match filter.item(&entry.rel, uri, || local_input(path.clone(), size)) {
                Some(item) => item,
                None => continue,
            }
        };
        if tx.send_blocking(Ok(item)).is_err() {
            return; // The consumer dropped the stream.
        }
    }
}

fn read_sorted(dir: &std::path::Path, rel: &str) -> std::io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let file_type = entry.file_type()?;
        let (is_dir, size) = if file_type.is_symlink() {
            // Follow links to files only; a broken link is listed and fails at fetch.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => continue,
                Ok(m) => (false, Some(m.len())),
                Err(_) => (false, None),
            }
        } else if file_type.is_dir() {
            (true, None)
        } else {
            (false, entry.metadata().ok().map(|m| m.len()))
        };
        let rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        entries.push(Entry {
            path,
            rel,
            is_dir,
            size,
        });
    }
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_globs_at_the_literal_prefix() {
        let cases = [
            (
                "s3://b/audio/**/*.flac",
                Some(("s3://b/audio", "**/*.flac")),
            ),
            ("s3://b/*.wav", Some(("s3://b", "*.wav"))),
            ("/data/*/x.wav", Some(("/data", "*/x.wav"))),
            ("/*.wav", Some(("/", "*.wav"))),
            ("*.wav", Some((".", "*.wav"))),
            ("rel/dir/a?.wav", Some(("rel/dir", "a?.wav"))),
            (
                "https://a.blob.core.windows.net/c/*.wav?sig=x",
                Some(("https://a.blob.core.windows.net/c?sig=x", "*.wav")),
            ),
            ("s3://b/audio/x.wav", None),
            ("https://h/x.wav?a=*", None),
        ];
        for (spec, want) in cases {
            let got = split_glob(spec);
            let want = want.map(|(b, p)| GlobSpec {
                base: b.into(),
                pattern: p.into(),
            });
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn filters_keys() {
        let f = KeyFilter {
            include: Some(glob_set(&["keep/**".into(), "*.flac".into()]).unwrap()),
            exclude: glob_set(&["*.tmp.flac".into(), "keep/skip/**".into()]).unwrap(),
            extensions: Some(vec!["wav".into(), "flac".into()]),
            glob: None,
        };
        assert!(f.accepts("keep/a.WAV"));
        assert!(f.accepts("deep/er/b.flac"));
        assert!(!f.accepts("other/a.wav"), "not included");
        assert!(!f.accepts("keep/a.txt"), "extension");
        assert!(!f.accepts("x/y.tmp.flac"), "excluded by name");
        assert!(!f.accepts("keep/skip/c.wav"), "excluded folder");
        let g = KeyFilter {
            include: None,
            exclude: glob_set(&[]).unwrap(),
            extensions: None,
            glob: Some(glob("*/x.wav").unwrap().compile_matcher()),
        };
        assert!(g.accepts("a/x.wav"));
        assert!(!g.accepts("a/b/x.wav"), "* stays within one folder");
        assert!(!g.accepts("x.wav"));
    }

    #[test]
    fn http_folders_and_globs_say_they_need_a_manifest() {
        for (spec, what) in [
            ("http://127.0.0.1:9/audio/", "a folder"),
            ("https://example.com/", "a folder"),
            ("https://example.com", "a folder"),
            ("https://example.com/audio/?token=T", "a folder"),
            ("https://example.com/audio/*.wav", "a glob"),
        ] {
            let err = list_inputs(
                &[Source::Path(spec.into())],
                &ListOptions::default(),
                &StorageOptions::default(),
            )
            .err()
            .unwrap_or_else(|| panic!("{spec} was listed"))
            .to_string();
            assert!(
                err.contains(&format!("{what} over http(s) needs a manifest"))
                    && err.contains("[input] manifests"),
                "{spec}: {err}"
            );
            assert!(!err.contains("token=T"), "{err}");
        }
        // One file is one input, fetched as is (nothing is requested to list it).
        let one = list_inputs(
            &[Source::Path("https://example.com/audio/a.wav".into())],
            &ListOptions::default(),
            &StorageOptions::default(),
        );
        assert!(one.is_ok());
    }

    #[test]
    fn bad_patterns_are_reported() {
        let err = list_inputs(
            &[Source::Path("/tmp".into())],
            &ListOptions {
                include: vec!["a[".into()],
                ..Default::default()
            },
            &StorageOptions::default(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("a["), "{err}");
    }

    #[test]
    fn input_extension() {
        let input = local_input(PathBuf::from("/a/b.c/Song.FLAC"), None);
        assert_eq!(input.extension().as_deref(), Some("flac"));
        assert_eq!(
            local_input(PathBuf::from("/a/b.c/noext"), None).extension(),
            None
        );
        assert_eq!(
            local_input(PathBuf::from("/a/.hidden"), None).extension(),
            None
        );
    }
}
