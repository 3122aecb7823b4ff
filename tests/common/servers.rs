//! What the object-store emulators of the tests share: a server process on a free
//! 127.0.0.1 port, logged to a file shown when it fails, killed on drop (a panicking
//! test unwinds through the drop too), and [`TestStore`], the face each emulator
//! shows the checks that every store runs (`storage_inputs`, `pipeline_run`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;

/// An emulator the shared checks run against.
pub trait TestStore {
    /// What its URIs start with: `s3://archive`, `gs://archive`, `az://archive`.
    fn base(&self) -> String;
    /// Environment for a child process (a test binary, `audiocap run|status`) that
    /// should reach the emulator: how a real run gets endpoints and credentials, and
    /// never set in the test process (other tests run in parallel).
    fn env(&self) -> Vec<(&'static str, String)>;
    /// Lines of a pipeline's `[storage]` section for the emulator (may be empty).
    fn storage_toml(&self) -> String;
    /// A client for the bucket, for reading what a run wrote.
    fn store(&self) -> Arc<dyn ObjectStore>;
    /// Uploads one object (through [`TestStore::store`] unless the emulator wants
    /// another way). Called outside any async runtime.
    fn put(&self, key: &str, bytes: Vec<u8>) {
        use object_store::{ObjectStoreExt, PutPayload};
        let store = self.store();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(store.put(&key.into(), PutPayload::from(bytes)))
            .unwrap_or_else(|e| panic!("uploading {key}: {e}"));
    }
    /// Whether `audiocap run` can write its dataset there (the GCS emulator does
    /// not take the XML-API uploads object_store's GCS client makes).
    fn holds_datasets(&self) -> bool {
        true
    }
}

/// A running server; killed and its log removed on drop.
pub struct ServerProcess {
    child: Child,
    log: PathBuf,
    name: &'static str,
    install: &'static str,
    pub port: u16,
}

impl ServerProcess {
    /// Spawns `command` (which must bind 127.0.0.1:`port`) with its output in a log
    /// file, and waits until `ready_path` answers over HTTP with any status.
    /// `install` is how to get the server, for the failure messages.
    pub fn start(
        name: &'static str,
        mut command: Command,
        port: u16,
        ready_path: &str,
        install: &'static str,
    ) -> ServerProcess {
        let log =
            std::env::temp_dir().join(format!("audiocap-{name}-{}-{port}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{install} (starting {name} failed: {e})"));
        let mut server = ServerProcess {
            child,
            log,
            name,
            install,
            port,
        };
        server.wait_ready(ready_path);
        server
    }

    fn wait_ready(&mut self, path: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}): {}\n{}",
                    self.name,
                    self.log_text(),
                    self.install
                );
            }
            if http(self.port, "GET", path, &[], b"").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} did not answer on port {} within 60 s: {}",
            self.name,
            self.port,
            self.log_text()
        );
    }

    /// What the server wrote so far, for messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; the response's status code and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Whether `program --version` runs.
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
