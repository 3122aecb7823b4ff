//! The input side of the streaming pipeline: where audio lives and how it is found.
//!
//! - [`location`]: a local path or a URL (`s3://`, `gs://`, `az://`, `abfss://`,
//!   `azure://`, `http(s)://`, `file://`) parsed into an `object_store` handle plus a
//!   prefix, with one cached client per bucket/account. The Parquet sink builds its
//!   output store here too.
//! - [`input`]: one input (canonical URI and where its bytes are), what a listing
//!   yields and a fetch reads.
//! - [`listing`]: source specs (files, folders, globs, manifests) turned into a lazy
//!   stream of inputs; nothing is listed into memory first.
//! - [`manifest`]: Parquet, CSV, JSON-lines or plain-text lists of URIs.
//! - [`shard`]: which inputs this worker owns (a documented, stable hash) and the
//!   shard index/count from flags or the scheduler's environment.
//! - [`fetch`]: an input's bytes: the local file itself, bytes in memory, or a
//!   temporary spool file for large objects.
//!
//! Secrets never reach a message: every URI or error text shown to a user passes
//! through [`redact`] / [`redact_text`], which drop URL passwords, user names and
//! query strings (SAS tokens, signed-URL signatures).

pub mod fetch;
pub mod input;
pub mod listing;
pub mod location;
pub mod manifest;
pub mod shard;

pub use fetch::{FetchError, Fetched, FetchedAudio, SpoolOptions, fetch};
pub use input::{InputRef, InputSource, Listed};
pub use listing::{ListOptions, Source, list_inputs, list_location};
pub use location::{Location, LocationKind, StorageOptions};
pub use shard::{ShardError, ShardSpec, shard_of};

/// Errors while parsing locations or listing inputs. Items that name one input
/// (`NotFound`, `PermissionDenied`, `Unreadable`, `BadEntry`) are per-input and come
/// inside [`Listed::Failed`]; the rest stop a listing.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid location {spec:?}: {reason}")]
    InvalidLocation { spec: String, reason: String },
    #[error(
        "unsupported scheme {scheme}:// in {spec:?} (supported: s3, s3a, gs, az, azure, abfs, abfss, adl, http, https, file, or a local path)"
    )]
    UnsupportedScheme { spec: String, scheme: String },
    #[error("cannot set up the {service} client for {spec}: {message}")]
    Client {
        spec: String,
        service: &'static str,
        message: String,
    },
    #[error("invalid pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("listing {spec} failed: {message}")]
    ListFailed { spec: String, message: String },
    #[error("{uri}: not found")]
    NotFound { uri: String },
    #[error("{uri}: permission denied: {message}")]
    PermissionDenied { uri: String, message: String },
    #[error("{uri}: cannot read: {message}")]
    Unreadable { uri: String, message: String },
    #[error("manifest {manifest}: {message}")]
    Manifest { manifest: String, message: String },
    #[error("manifest {manifest}: no URI column {wanted} (columns: {columns})")]
    ManifestColumn {
        manifest: String,
        wanted: String,
        columns: String,
    },
    #[error("manifest {manifest}, row {row}: {message}")]
    BadEntry {
        manifest: String,
        row: u64,
        message: String,
    },
}

/// A URL (or a local path) with its password, user name and query string replaced by
/// `***`: `https://u:p@host/a?sig=x` → `https://***@host/a?***`. Strings that are not
/// URLs come back unchanged.
pub fn redact(s: &str) -> String {
    if !has_scheme(s) {
        return s.to_string();
    }
    match url::Url::parse(s) {
        Ok(mut url) => {
            // In `abfss://container@account...` the user name is the container, not a secret.
            let keep_user = matches!(url.scheme(), "abfs" | "abfss") && url.password().is_none();
            let had_user = !keep_user && (!url.username().is_empty() || url.password().is_some());
            let had_query = url.query().is_some();
            if had_user {
                // Fails only for URLs without a host, which carry no userinfo.
                let _ = url.set_password(None);
                let _ = url.set_username("");
            }
            url.set_query(None);
            url.set_fragment(None);
            let mut out = url.to_string();
            if had_user && let Some(pos) = out.find("://") {
                out.insert_str(pos + 3, "***@");
            }
            if had_query {
                out.push_str("?***");
            }
            out
        }
        // Not parseable: cut at the first '?' and '@' rather than risk echoing a secret.
        Err(_) => {
            let cut = s.split('?').next().unwrap_or(s);
            match (cut.find("://"), cut.rfind('@')) {
                (Some(start), Some(at)) if at > start => {
                    format!("{}***{}", &cut[..start + 3], &cut[at..])
                }
                _ => cut.to_string(),
            }
        }
    }
}

/// [`redact`] applied to every URL-looking word of a free-text message (an error
/// from an HTTP client may quote the request URL, SAS token included).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        // Walk back to the start of the scheme.
        let start = rest[..pos]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |i| i + 1);
        let end = rest[pos..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '>' || c == ')')
            .map_or(rest.len(), |i| pos + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `scheme://` at the start of `s` (a scheme is a letter then letters, digits, `+-.`).
pub(crate) fn has_scheme(s: &str) -> bool {
    scheme_of(s).is_some()
}

pub(crate) fn scheme_of(s: &str) -> Option<&str> {
    let pos = s.find("://")?;
    let scheme = &s[..pos];
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
    .then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_and_query() {
        assert_eq!(
            redact("https://user:secret@example.com/a/b.wav?sig=abc&se=1"),
            "https://***@example.com/a/b.wav?***"
        );
        assert_eq!(
            redact("https://acct.blob.core.windows.net/c/x.flac?sv=2022&sig=SECRET"),
            "https://acct.blob.core.windows.net/c/x.flac?***"
        );
        assert_eq!(redact("s3://bucket/key.wav"), "s3://bucket/key.wav");
        assert_eq!(redact("/data/a?b.wav"), "/data/a?b.wav");
        assert_eq!(
            redact("abfss://container@acct.dfs.core.windows.net/x.wav"),
            "abfss://container@acct.dfs.core.windows.net/x.wav"
        );
        assert_eq!(
            redact("abfss://container:key@acct.dfs.core.windows.net/x.wav"),
            "abfss://***@acct.dfs.core.windows.net/x.wav"
        );
    }

    #[test]
    fn redacts_urls_inside_messages() {
        let msg = "error sending request for url (https://h.example/o?sig=TOPSECRET): timed out";
        let red = redact_text(msg);
        assert!(!red.contains("TOPSECRET"), "{red}");
        assert!(red.starts_with("error sending request for url (https://h.example/o?***"));
        assert!(red.ends_with("): timed out"));
        assert_eq!(redact_text("no url here"), "no url here");
    }

    #[test]
    fn scheme_detection() {
        assert_eq!(scheme_of("s3://b/k"), Some("s3"));
        assert_eq!(scheme_of("/data/x://y"), None);
        assert_eq!(scheme_of("relative/path.wav"), None);
        assert_eq!(scheme_of("1x://a"), None);
    }
}
