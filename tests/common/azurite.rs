//! Azure Blob for tests: Azurite's blob service (npm package `azurite`) on a free
//! 127.0.0.1 port, in memory, telemetry off, one container created, killed on drop.
//! The first test that needs it installs it with
//! `npm install --prefix target/tmp/azurite-VERSION azurite@VERSION` (the package
//! registry is all it needs); without Node.js and npm the test fails and says what
//! to install.
//!
//! Clients reach it the way a pipeline would: `az://container/...` with
//! `azure_use_emulator` (account `devstoreaccount1`, its well-known key) and
//! `AZURITE_BLOB_STORAGE_URL`, in a child process's environment.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;
use object_store::azure::MicrosoftAzureBuilder;

use super::servers::{ServerProcess, TestStore, free_port, runs};

pub struct Azurite {
    server: ServerProcess,
    pub container: String,
}

const VERSION: &str = "3.35.0";
const INSTALL: &str = "the Azure tests need Node.js 18 or later and npm to install and run \
    Azurite (apt-get install nodejs npm); the test installs Azurite itself from the npm registry";

/// Azurite's well-known account key (public: it is in Azure's documentation).
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// `azurite-blob`, installed under the target folder on first use.
fn azurite_blob() -> PathBuf {
    static INSTALLING: Mutex<()> = Mutex::new(());
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("azurite-{VERSION}"));
    let exe = root.join("node_modules/.bin/azurite-blob");
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if exe.is_file() {
        return exe;
    }
    assert!(runs("node") && runs("npm"), "{INSTALL}");
    // Installed beside, then renamed: a half-finished install is never used.
    let staging = root.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .arg("--prefix")
        .arg(&staging)
        .arg(format!("azurite@{VERSION}"))
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL} (running npm failed: {e})"));
    assert!(
        out.status.success(),
        "npm install azurite@{VERSION} failed: {}\n{INSTALL}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&staging, &root).is_err() {
        // Another test process installed it first.
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(exe.is_file(), "no {} after npm install", exe.display());
    exe
}

impl Azurite {
    /// Starts Azurite's blob service and creates `container`.
    pub fn start(container: &str) -> Azurite {
        let exe = azurite_blob();
        let port = free_port();
        let mut command = Command::new(exe);
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--disableTelemetry", "--silent"])
            .current_dir(std::env::temp_dir());
        let server = ServerProcess::start("azurite-blob", command, port, "/", INSTALL);
        create_container(port, container);
        Azurite {
            server,
            container: container.to_string(),
        }
    }
}

/// `PUT /devstoreaccount1/NAME?restype=container`, signed with the account key
/// (Azurite refuses anonymous writes; object_store cannot create containers).
/// Node signs it: Node is what runs Azurite, so nothing more is needed.
fn create_container(port: u16, name: &str) {
    const SCRIPT: &str = r#"
const http = require("http"), crypto = require("crypto");
const [port, account, key, name] = process.argv.slice(1);
const date = new Date().toUTCString(), version = "2021-08-06";
const toSign = ["PUT", "", "", "", "", "", "", "", "", "", "", "",
  `x-ms-date:${date}`, `x-ms-version:${version}`,
  `/${account}/${account}/${name}\nrestype:container`].join("\n");
const sig = crypto.createHmac("sha256", Buffer.from(key, "base64")).update(toSign).digest("base64");
const req = http.request({ host: "127.0.0.1", port, method: "PUT",
  path: `/${account}/${name}?restype=container`,
  headers: { "x-ms-date": date, "x-ms-version": version, "Content-Length": 0,
             Authorization: `SharedKey ${account}:${sig}` } }, (res) => {
  let body = ""; res.on("data", (d) => body += d);
  res.on("end", () => { if (res.statusCode !== 201) { console.error(res.statusCode, body); process.exit(1); } });
});
req.on("error", (e) => { console.error(e.message); process.exit(1); });
req.end();
"#;
    let out = Command::new("node")
        .args(["-e", SCRIPT, &port.to_string(), ACCOUNT, KEY, name])
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL} (running node failed: {e})"));
    assert!(
        out.status.success(),
        "creating container {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestStore for Azurite {
    fn base(&self) -> String {
        format!("az://{}", self.container)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.server.url()),
        ]
    }

    fn storage_toml(&self) -> String {
        "azure_use_emulator = true\n".into()
    }

    /// This process's environment is never changed, so the emulator's URL is given
    /// as the endpoint of a client that signs with the well-known key.
    fn store(&self) -> Arc<dyn ObjectStore> {
        let store = MicrosoftAzureBuilder::new()
            .with_account(ACCOUNT)
            .with_access_key(KEY)
            .with_container_name(&self.container)
            .with_endpoint(format!("{}/{ACCOUNT}", self.server.url()))
            .with_allow_http(true)
            .build()
            .unwrap();
        Arc::new(store)
    }
}
