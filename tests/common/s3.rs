//! A real S3-compatible server for tests: `moto_server` on a free local port, one
//! bucket created, killed on drop. Without moto the test fails and says how to
//! install it (`python3 -m pip install 'moto[server]'`).
//!
//! Clients get the server through [`TestStore::env`], in a child process: that is
//! how a real run gets its endpoint and credentials (`from_env()`), and setting them
//! in the test process would race with tests running in parallel. moto accepts any
//! credentials, so signing is exercised but not checked (the unit tests check what
//! moto cannot: options, redaction). It refuses unsigned GETs of private objects.

use std::process::{Command, Stdio};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

use super::servers::{ServerProcess, TestStore, find_on_path, free_port, http};

pub struct MotoServer {
    server: ServerProcess,
    pub bucket: String,
}

const INSTALL: &str = "moto is needed for the S3 tests: python3 -m pip install 'moto[server]'";
pub const REGION: &str = "us-east-1";

impl MotoServer {
    /// Starts moto and creates `bucket`.
    pub fn start(bucket: &str) -> MotoServer {
        let port = free_port();
        let mut command = match find_on_path("moto_server") {
            Some(exe) => Command::new(exe),
            None => {
                let has_module = Command::new("python3")
                    .args(["-c", "import moto.server"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(has_module, "{INSTALL}");
                let mut c = Command::new("python3");
                c.args(["-m", "moto.server"]);
                c
            }
        };
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let server = ServerProcess::start("moto_server", command, port, "/", INSTALL);
        let (status, body) = http(port, "PUT", &format!("/{bucket}"), &[], b"")
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
        assert_eq!(status, 200, "creating bucket {bucket}: {body}");
        MotoServer {
            server,
            bucket: bucket.to_string(),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.server.url()
    }
}

impl TestStore for MotoServer {
    fn base(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// Dummy keys, so requests are signed.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", REGION.into()),
        ]
    }

    fn storage_toml(&self) -> String {
        String::new()
    }

    /// Configured from [`TestStore::env`] as a child process would be (signed requests).
    fn store(&self) -> Arc<dyn ObjectStore> {
        let builder = self
            .env()
            .into_iter()
            .fold(AmazonS3Builder::new(), |b, (key, value)| {
                let key = key.to_ascii_lowercase().parse().unwrap();
                b.with_config(key, value)
            });
        Arc::new(builder.with_bucket_name(&self.bucket).build().unwrap())
    }
}
