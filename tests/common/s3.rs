//! A real S3-compatible server for tests: `moto_server` on a free local port, one
//! bucket created, killed on drop. Without moto the test fails and says how to
//! install it (`python3 -m pip install 'moto[server]'`).
//!
//! Clients get the server through [`MotoServer::env`], in a child process: that is
//! how a real run gets its endpoint and credentials (`from_env()`), and setting them
//! in the test process would race with tests running in parallel. moto accepts any
//! credentials, so signing is exercised but not checked (the unit tests check what
//! moto cannot: options, redaction). It refuses unsigned GETs of private objects.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

pub struct MotoServer {
    child: Child,
    log: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub bucket: String,
}

const INSTALL: &str = "moto is needed for the S3 tests: python3 -m pip install 'moto[server]'";
pub const REGION: &str = "us-east-1";

impl MotoServer {
    /// Starts moto and creates `bucket`.
    pub fn start(bucket: &str) -> MotoServer {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("audiocap-moto-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).unwrap();
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
        let child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL} (starting it failed: {e})"));
        let mut server = MotoServer {
            child,
            log,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
        };
        server.wait_ready(port);
        let status = http(port, "PUT", &format!("/{bucket}"))
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
        assert_eq!(status, 200, "creating bucket {bucket}");
        server
    }

    fn wait_ready(&mut self, port: u16) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("moto_server exited ({status}): {log}\n{INSTALL}");
            }
            if http(port, "GET", "/").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("moto_server did not answer on port {port} within 30 s: {log}");
    }

    /// Environment for a child process (a test binary, `audiocap run`) that should use
    /// this server, with dummy keys so requests are signed.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", REGION.into()),
        ]
    }

    /// A client for the bucket configured from [`MotoServer::env`] as a child process
    /// would be (signed requests), for uploads.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
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

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A bodiless HTTP/1.1 request; the response's status code.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {response:?}")))
}
