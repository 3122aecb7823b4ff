//! Locations: a local path or an object-store URL, parsed into a client and a prefix.
//!
//! Clients are built with each builder's `from_env()` (so the standard credential
//! chains apply: `AWS_*` variables, profiles and instance metadata; `GOOGLE_*`
//! service accounts and workload identity; `AZURE_*` keys, SAS, managed identity),
//! then [`StorageOptions`] are applied on top. One client is cached per
//! (scheme, bucket/account, options), so thousands of manifest entries share it.

use std::collections::HashMap;
use std::fmt;
use std::path::{Component, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};
use url::Url;

use super::{StorageError, redact, scheme_of};

/// Object-storage settings a pipeline file may set. Every field is optional; unset
/// ones fall back to the environment (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ALLOW_HTTP`,
/// ...) and then to the client's defaults. Credentials are deliberately not here:
/// they come from the environment or instance identity and never sit in a config.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageOptions {
    /// S3: endpoint of an S3-compatible server (MinIO, R2, Ceph, moto), e.g.
    /// `http://127.0.0.1:9000`. GCS: the API's base URL (a fake-gcs-server, a
    /// private endpoint); default `https://storage.googleapis.com`. Azure: the blob
    /// endpoint (sovereign clouds); Azurite's comes from `AZURITE_BLOB_STORAGE_URL`.
    pub endpoint: Option<String>,
    /// S3: the bucket's region, e.g. `eu-west-1`.
    pub region: Option<String>,
    /// Allow plain `http://` endpoints (local servers only).
    pub allow_http: Option<bool>,
    /// Send unsigned requests (public buckets/containers); S3, GCS and Azure.
    pub anonymous: Option<bool>,
    /// S3: virtual-hosted-style requests (`bucket.endpoint/key`) instead of path style.
    pub virtual_hosted_style: Option<bool>,
    /// Azure: talk to the local Azurite emulator (account `devstoreaccount1`, its
    /// well-known key; URL from `AZURITE_BLOB_STORAGE_URL`, default
    /// `http://127.0.0.1:10000`). Not together with `endpoint`, which the client
    /// would ignore.
    pub azure_use_emulator: Option<bool>,
    /// Retries of a failed request (client default: 10).
    pub max_retries: Option<usize>,
    /// Give up retrying a request after this many seconds (client default: 180).
    pub retry_timeout_secs: Option<u64>,
    /// Timeout of one request in seconds, body included (client default: 30).
    pub timeout_secs: Option<u64>,
    /// Timeout of establishing a connection in seconds (client default: 5).
    pub connect_timeout_secs: Option<u64>,
}

impl fmt::Debug for StorageOptions {
    // The endpoint may carry userinfo; everything else is harmless.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageOptions")
            .field("endpoint", &self.endpoint.as_deref().map(redact))
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("anonymous", &self.anonymous)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("azure_use_emulator", &self.azure_use_emulator)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout_secs", &self.retry_timeout_secs)
            .field("timeout_secs", &self.timeout_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .finish()
    }
}

impl StorageOptions {
    fn retry(&self) -> Option<RetryConfig> {
        if self.max_retries.is_none() && self.retry_timeout_secs.is_none() {
            return None;
        }
        let default = RetryConfig::default();
        Some(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: self.max_retries.unwrap_or(default.max_retries),
            retry_timeout: self
                .retry_timeout_secs
                .map_or(default.retry_timeout, Duration::from_secs),
        })
    }

    /// Client settings as config keys, so the builders' own `from_env()` values for
    /// the keys we do not set survive (replacing `ClientOptions` would drop them).
    fn client_keys(&self) -> Vec<(ClientConfigKey, String)> {
        let mut keys = Vec::new();
        if let Some(v) = self.allow_http {
            keys.push((ClientConfigKey::AllowHttp, v.to_string()));
        }
        if let Some(v) = self.timeout_secs {
            keys.push((ClientConfigKey::Timeout, format!("{v}s")));
        }
        if let Some(v) = self.connect_timeout_secs {
            keys.push((ClientConfigKey::ConnectTimeout, format!("{v}s")));
        }
        keys
    }
}

/// Local folder or object store.
#[derive(Clone, Debug, PartialEq)]
pub enum LocationKind {
    /// A local path, absolute and lexically normalised (not canonicalised: it may not
    /// exist yet, and symlinks are kept as the user wrote them).
    Local { root: PathBuf },
    /// An object store; `base` is the canonical `scheme://bucket` part of URIs.
    Object { base: String },
}

/// A parsed location: a client and a prefix inside it.
#[derive(Clone)]
pub struct Location {
    /// The client. Local paths get a `LocalFileSystem` rooted at `/`.
    pub store: Arc<dyn ObjectStore>,
    /// Path of the location inside `store` (an object key or key prefix).
    pub prefix: Path,
    pub kind: LocationKind,
    /// The spec as given, redacted: for messages.
    spec: String,
}

impl fmt::Debug for Location {
    // Never print the store: some clients' Debug shows their credential provider.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Location")
            .field("spec", &self.spec)
            .field("kind", &self.kind)
            .field("prefix", &self.prefix.as_ref())
            .finish()
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

type StoreCache = Mutex<HashMap<String, Arc<dyn ObjectStore>>>;
static STORES: LazyLock<StoreCache> = LazyLock::new(|| Mutex::new(HashMap::new()));

impl Location {
    /// Parses a local path (relative, absolute or `file://`) or a URL:
    /// `s3://bucket/key`, `s3a://`, `gs://bucket/key`, `az://container/key`,
    /// `azure://container/key`, `adl://`, `abfs(s)://container@account.dfs.core.windows.net/key`,
    /// `https://account.blob.core.windows.net/container/key[?SAS]`, `http(s)://host/path`.
    pub fn parse(spec: &str, options: &StorageOptions) -> Result<Location, StorageError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(invalid(spec, "empty location"));
        }
        let Some(scheme) = scheme_of(spec) else {
            return Self::local(spec, PathBuf::from(spec));
        };
        let url = Url::parse(spec).map_err(|e| invalid(spec, &e.to_string()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| invalid(spec, "not a local file URL"))?;
                Self::local(spec, path)
            }
            "s3" | "s3a" => Self::object(spec, &url, Service::S3, options),
            "gs" => Self::object(spec, &url, Service::Gcs, options),
            "az" | "azure" | "adl" | "abfs" | "abfss" => {
                Self::object(spec, &url, Service::Azure, options)
            }
            "http" | "https" => {
                let host = url.host_str().unwrap_or_default();
                let azure = host.ends_with(".blob.core.windows.net")
                    || host.ends_with(".dfs.core.windows.net");
                let service = if azure { Service::Azure } else { Service::Http };
                Self::object(spec, &url, service, options)
            }
            other => Err(StorageError::UnsupportedScheme {
                spec: redact(spec),
                scheme: other.to_string(),
            }),
        }
    }

    fn local(spec: &str, path: PathBuf) -> Result<Location, StorageError> {
        let root = absolute(&path).map_err(|e| invalid(spec, &e))?;
        let prefix = Path::from_absolute_path(&root)
            .map_err(|e| invalid(spec, &format!("not usable as a store path: {e}")))?;
        let store = cached("file://", || Ok(Arc::new(LocalFileSystem::new())))?;
        Ok(Location {
            store,
            prefix,
            kind: LocationKind::Local { root },
            spec: spec.to_string(),
        })
    }

    fn object(
        spec: &str,
        url: &Url,
        service: Service,
        options: &StorageOptions,
    ) -> Result<Location, StorageError> {
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid(spec, "no bucket/container/host in the URL"))?;
        let scheme = url.scheme().to_ascii_lowercase();
        let mut key = Path::from_url_path(url.path())
            .map_err(|e| invalid(spec, &e.to_string()))?
            .to_string();
        // The canonical base a row's URI starts with: no userinfo (except the abfs
        // container), no query string.
        let base = match service {
            Service::S3 => format!("s3://{host}"),
            Service::Gcs => format!("gs://{host}"),
            Service::Azure if scheme.starts_with("http") => {
                let (container, rest) = match key.split_once('/') {
                    Some((c, r)) => (c.to_string(), r.to_string()),
                    None => (key.clone(), String::new()),
                };
                if container.is_empty() {
                    return Err(invalid(spec, "no container in the Azure URL"));
                }
                key = rest;
                format!("https://{host}/{container}")
            }
            Service::Azure if !url.username().is_empty() => {
                format!("{scheme}://{}@{host}", url.username())
            }
            Service::Azure => format!("az://{host}"),
            Service::Http => match url.port() {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            },
        };
        let prefix = Path::from(key.as_str());
        let options_key = serde_json::to_string(options).unwrap_or_default();
        let key = format!("{base}?{}|{options_key}", url.query().unwrap_or_default());
        let store = cached(&key, || build(spec, url, &base, service, options))?;
        Ok(Location {
            store,
            prefix,
            kind: LocationKind::Object { base },
            spec: redact(spec),
        })
    }

    /// A location on a store built elsewhere (an `InMemory` store in tests, a client
    /// configured by hand); `base` is what its URIs start with, e.g. `memory://test`.
    pub fn from_store(store: Arc<dyn ObjectStore>, base: &str, prefix: Path) -> Location {
        let base = base.trim_end_matches('/').to_string();
        Location {
            store,
            spec: redact(&format!("{base}/{prefix}")),
            prefix,
            kind: LocationKind::Object { base },
        }
    }

    /// The canonical URI of `path` (a key of this location's store): the absolute local
    /// path, or `s3://bucket/key` and the like. Stable across runs, so resume can match
    /// rows by it; never carries credentials.
    pub fn uri_of(&self, path: &Path) -> String {
        match &self.kind {
            LocationKind::Local { .. } => format!("/{path}"),
            LocationKind::Object { base } if path.as_ref().is_empty() => base.clone(),
            LocationKind::Object { base } => format!("{base}/{path}"),
        }
    }

    /// The canonical URI of this location itself.
    pub fn uri(&self) -> String {
        match &self.kind {
            LocationKind::Local { root } => root.to_string_lossy().into_owned(),
            LocationKind::Object { .. } => self.uri_of(&self.prefix),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.kind, LocationKind::Local { .. })
    }
}

#[derive(Clone, Copy, Debug)]
enum Service {
    S3,
    Gcs,
    Azure,
    Http,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::S3 => "S3",
            Service::Gcs => "GCS",
            Service::Azure => "Azure",
            Service::Http => "HTTP",
        }
    }
}

fn cached(
    key: &str,
    make: impl FnOnce() -> Result<Arc<dyn ObjectStore>, StorageError>,
) -> Result<Arc<dyn ObjectStore>, StorageError> {
    // A poisoned cache only means another thread panicked mid-insert; the map is fine.
    let mut stores = STORES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(store) = stores.get(key) {
        return Ok(Arc::clone(store));
    }
    let store = make()?;
    stores.insert(key.to_string(), Arc::clone(&store));
    Ok(store)
}

fn build(
    spec: &str,
    url: &Url,
    base: &str,
    service: Service,
    options: &StorageOptions,
) -> Result<Arc<dyn ObjectStore>, StorageError> {
    let client_error = |e: object_store::Error| StorageError::Client {
        spec: redact(spec),
        service: service.name(),
        message: super::redact_text(&e.to_string()),
    };
    let retry = options.retry();
    let client_keys = options.client_keys();
    let store: Arc<dyn ObjectStore> = match service {
        Service::S3 => {
            let mut b = AmazonS3Builder::from_env().with_url(base);
            if let Some(v) = &options.endpoint {
                b = b.with_endpoint(v);
            }
            if let Some(v) = &options.region {
                b = b.with_region(v);
            }
            if let Some(v) = options.anonymous {
                b = b.with_skip_signature(v);
            }
            if let Some(v) = options.virtual_hosted_style {
                b = b.with_virtual_hosted_style_request(v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            for (k, v) in client_keys {
                b = b.with_config(object_store::aws::AmazonS3ConfigKey::Client(k), v);
            }
            Arc::new(b.build().map_err(client_error)?)
        }
        Service::Gcs => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(base);
            if let Some(v) = &options.endpoint {
                b = b.with_base_url(v.trim_end_matches('/'));
            }
            if let Some(v) = options.anonymous {
                b = b.with_skip_signature(v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            for (k, v) in client_keys {
                b = b.with_config(object_store::gcp::GoogleConfigKey::Client(k), v);
            }
            Arc::new(b.build().map_err(client_error)?)
        }
        Service::Azure => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(base);
            // A SAS token in the URL's query string authorises the requests.
            let sas: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if !sas.is_empty() {
                b = b.with_sas_authorization(sas);
            }
            if options.endpoint.is_some() && options.azure_use_emulator == Some(true) {
                // The client takes the emulator's URL from AZURITE_BLOB_STORAGE_URL
                // only and would silently talk to 127.0.0.1:10000 instead.
                return Err(invalid(
                    spec,
                    "[storage] endpoint is not used with azure_use_emulator: set \
                     AZURITE_BLOB_STORAGE_URL to the emulator's URL instead",
                ));
            }
            if let Some(v) = &options.endpoint {
                b = b.with_endpoint(v.clone());
            }
            if let Some(v) = options.anonymous {
                b = b.with_skip_signature(v);
            }
            if let Some(v) = options.azure_use_emulator {
                b = b.with_use_emulator(v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            for (k, v) in client_keys {
                b = b.with_config(object_store::azure::AzureConfigKey::Client(k), v);
            }
            Arc::new(b.build().map_err(client_error)?)
        }
        Service::Http => {
            let mut b = HttpBuilder::new().with_url(base);
            // An `http://` URL names plain HTTP itself (the client would refuse it
            // with a bare "builder error"); `allow_http = false` still forbids it.
            if base.starts_with("http://") && options.allow_http.is_none() {
                b = b.with_config(ClientConfigKey::AllowHttp, "true");
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            for (k, v) in client_keys {
                b = b.with_config(k, v);
            }
            Arc::new(b.build().map_err(client_error)?)
        }
    };
    Ok(store)
}

fn invalid(spec: &str, reason: &str) -> StorageError {
    StorageError::InvalidLocation {
        spec: redact(spec),
        reason: reason.to_string(),
    }
}

/// `path` made absolute against the working directory, with `.` and `..` resolved
/// lexically.
pub(crate) fn absolute(path: &std::path::Path) -> Result<PathBuf, String> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("no working directory: {e}"))?
            .join(path)
    };
    let mut out = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> StorageOptions {
        StorageOptions {
            region: Some("us-east-1".into()),
            // `az://container` takes the account from the environment; the emulator
            // supplies one so the test does not depend on AZURE_* variables.
            azure_use_emulator: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn parses_local_paths() {
        let loc = Location::parse("/data/../data/./audio", &opts()).unwrap();
        assert_eq!(
            loc.kind,
            LocationKind::Local {
                root: PathBuf::from("/data/audio")
            }
        );
        assert_eq!(loc.prefix.as_ref(), "data/audio");
        assert_eq!(
            loc.uri_of(&Path::from("data/audio/x.wav")),
            "/data/audio/x.wav"
        );
        let file = Location::parse("file:///tmp/a%20b.wav", &opts()).unwrap();
        assert_eq!(file.uri(), "/tmp/a b.wav");
        let rel = Location::parse("some/rel.wav", &opts()).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(rel.uri(), cwd.join("some/rel.wav").to_string_lossy());
    }

    #[test]
    fn parses_object_urls_into_canonical_uris() {
        let cases = [
            ("s3://bucket/audio/a.flac", "s3://bucket", "audio/a.flac"),
            ("s3a://bucket/audio/", "s3://bucket", "audio"),
            ("gs://bkt/x/y.wav", "gs://bkt", "x/y.wav"),
            ("az://cont/dir/z.mp3", "az://cont", "dir/z.mp3"),
            ("azure://cont/z.mp3", "az://cont", "z.mp3"),
            (
                "abfss://cont@acct.dfs.core.windows.net/p/q.wav",
                "abfss://cont@acct.dfs.core.windows.net",
                "p/q.wav",
            ),
            (
                "https://acct.blob.core.windows.net/cont/p/q.wav?sv=1&sig=SECRET",
                "https://acct.blob.core.windows.net/cont",
                "p/q.wav",
            ),
            (
                "https://user:pw@example.com:8443/files/a%20b.wav?token=T",
                "https://example.com:8443",
                "files/a b.wav",
            ),
        ];
        for (spec, base, prefix) in cases {
            let loc = Location::parse(spec, &opts()).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                loc.kind,
                LocationKind::Object { base: base.into() },
                "{spec}"
            );
            assert_eq!(loc.prefix.as_ref(), prefix, "{spec}");
            assert_eq!(loc.uri(), format!("{base}/{prefix}"), "{spec}");
            let shown = format!("{loc} {loc:?}");
            for secret in ["SECRET", "pw", "token=T", "user"] {
                assert!(!shown.contains(secret), "{spec} shows {secret}: {shown}");
            }
        }
    }

    #[test]
    fn caches_one_client_per_bucket_and_options() {
        let a = Location::parse("s3://cache-bkt/a.wav", &opts()).unwrap();
        let b = Location::parse("s3://cache-bkt/deeper/b.wav", &opts()).unwrap();
        assert!(Arc::ptr_eq(&a.store, &b.store));
        let other = Location::parse("s3://cache-bkt-2/a.wav", &opts()).unwrap();
        assert!(!Arc::ptr_eq(&a.store, &other.store));
        let anon = StorageOptions {
            anonymous: Some(true),
            ..opts()
        };
        let c = Location::parse("s3://cache-bkt/a.wav", &anon).unwrap();
        assert!(!Arc::ptr_eq(&a.store, &c.store));
    }

    #[test]
    fn rejects_bad_locations() {
        for (spec, want) in [
            ("", "empty location"),
            ("ftp://host/x.wav", "unsupported scheme ftp://"),
            ("s3:///key-without-bucket", "no bucket"),
        ] {
            let err = Location::parse(spec, &opts()).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn an_endpoint_beside_the_azure_emulator_is_refused_not_ignored() {
        let both = StorageOptions {
            endpoint: Some("http://127.0.0.1:1234".into()),
            ..opts()
        };
        let err = Location::parse("az://emu-cont/a.wav", &both)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AZURITE_BLOB_STORAGE_URL"), "{err}");
        // GCS takes the endpoint as its base URL (the emulator tests use it).
        let gcs = StorageOptions {
            endpoint: Some("http://127.0.0.1:1234/".into()),
            anonymous: Some(true),
            ..Default::default()
        };
        Location::parse("gs://emu-bkt/a.wav", &gcs).unwrap();
    }

    #[test]
    fn options_parse_strictly_and_hide_endpoint_secrets() {
        let o: StorageOptions = toml::from_str(
            "endpoint = \"http://k:s3cr3t@127.0.0.1:9000\"\nallow_http = true\nmax_retries = 2",
        )
        .unwrap();
        assert_eq!(o.max_retries, Some(2));
        assert!(!format!("{o:?}").contains("s3cr3t"));
        let err = toml::from_str::<StorageOptions>("secret_access_key = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
