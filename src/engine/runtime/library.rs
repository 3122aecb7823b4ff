//! Finding, checking and loading the ONNX Runtime shared library, once per process,
//! and its environment; the search order is in the module documentation of
//! [`runtime`](super), each place it looked is recorded ([`SearchStep`]).
//! [`RuntimeError`] covers the session builders' refusals as well: one error for
//! everything the runtime can refuse.

use crate::config::AUDIOCAP_HOME;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};

use crate::config::DeviceSpec;

/// The ONNX Runtime release the setup script installs and the error messages recommend.
pub const RECOMMENDED_VERSION: &str = "1.31.1";

/// The oldest ONNX Runtime minor version (`1.x`) that `ort`'s API level accepts.
pub const MIN_MINOR_VERSION: u32 = ort::MINOR_VERSION;

/// The variable that names the library file and overrides the search.
pub const ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// How long the Python probe may take before it is abandoned.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(5);

/// The interpreters asked about an `onnxruntime` package, in order.
const PYTHON_INTERPRETERS: [&str; 2] = ["python3", "python"];

/// The distributions whose version is reported for the `onnxruntime` module.
const PYTHON_DISTRIBUTIONS: [&str; 2] = ["onnxruntime-gpu", "onnxruntime"];

/// How to get a library, for the error messages.
const HOW_TO_GET_ONE: &str = "get ONNX Runtime 1.31 or newer with one of:\n  \
     - scripts/setup-onnxruntime.sh   (installs onnxruntime==1.31.1 for audiocap; --gpu for CUDA 13)\n  \
     - pip install onnxruntime==1.31.1   (or onnxruntime-gpu==1.31.1 for CUDA 13)\n  \
     - export ORT_DYLIB_PATH=/path/to/libonnxruntime.so.1.31.1";

/// Where the ONNX Runtime library was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LibrarySource {
    /// The file named by `ORT_DYLIB_PATH`.
    EnvVar,
    /// The install made by `scripts/setup-onnxruntime.sh`.
    ProjectInstall,
    /// A packaged install beside the executable (`<exe dir>` or `<exe dir>/../lib`).
    BesideExecutable,
    /// The `onnxruntime` Python package of `python3` or `python`.
    PythonPackage,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EnvVar => "ORT_DYLIB_PATH",
            Self::ProjectInstall => "project install (scripts/setup-onnxruntime.sh)",
            Self::BesideExecutable => "beside the executable",
            Self::PythonPackage => "onnxruntime Python package",
        })
    }
}

/// The loaded ONNX Runtime, as [`init_runtime`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// The library file that was loaded (absolute).
    pub library: PathBuf,
    /// Which route of the search found it.
    pub route: LibrarySource,
    /// Its version: `1.31.1`, or `1.31` when the patch level cannot be read from the
    /// file name.
    pub version: String,
    /// Whether this build of the library has the CUDA execution provider (the GPU
    /// wheel). It says nothing about whether a GPU and the CUDA libraries are there.
    pub cuda_available: bool,
}

/// One place the search looked, and what it found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchStep {
    /// The route this place belongs to.
    pub route: LibrarySource,
    /// The place: a variable, a directory, an interpreter.
    pub place: String,
    /// What was there.
    pub outcome: String,
}

impl fmt::Display for SearchStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.route, self.place, self.outcome)
    }
}

/// Why ONNX Runtime could not be provisioned or a session could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `ORT_DYLIB_PATH` names something that is not a file.
    #[error(
        "ORT_DYLIB_PATH is set to `{}`, which {problem}: set it to the library file itself \
         (e.g. .../onnxruntime/capi/libonnxruntime.so.{RECOMMENDED_VERSION}), or unset it to \
         let audiocap search its other places; {HOW_TO_GET_ONE}",
        path.display()
    )]
    EnvVarPath {
        /// The value of the variable.
        path: PathBuf,
        /// `does not exist` or `is a directory`.
        problem: &'static str,
    },
    /// No library anywhere.
    #[error(
        "no ONNX Runtime library (libonnxruntime.so) found; {HOW_TO_GET_ONE}\nlooked in:\n{}",
        list_steps(searched)
    )]
    NotFound {
        /// Every place the search looked, in order.
        searched: Vec<SearchStep>,
    },
    /// A library older than `ort`'s API level.
    #[error(
        "ONNX Runtime at `{}` (found via {route}) is version {found}, but audiocap needs 1.{}.0 \
         or newer (ort {}, API {}); {HOW_TO_GET_ONE}",
        path.display(), MIN_MINOR_VERSION, ORT_CRATE_VERSION, MIN_MINOR_VERSION
    )]
    TooOld {
        /// The library file.
        path: PathBuf,
        /// Where it was found.
        route: LibrarySource,
        /// The version it reports.
        found: String,
    },
    /// The library could not be opened (not a shared library, missing dependencies...).
    #[error(
        "could not load ONNX Runtime from `{}` (found via {route}): {source}; {HOW_TO_GET_ONE}",
        path.display()
    )]
    Load {
        /// The library file.
        path: PathBuf,
        /// Where it was found.
        route: LibrarySource,
        /// What `ort` reported.
        source: ort::LoadDynamicError,
    },
    /// The ONNX Runtime environment could not be created.
    #[error("could not create the ONNX Runtime environment: {0}")]
    Environment(#[source] ort::Error),
    /// A device index that ONNX Runtime cannot take (it wants an `i32`).
    #[error("CUDA device index {0} is out of range")]
    DeviceIndex(usize),
    /// `cuda` was asked for, but the loaded library is a CPU-only build.
    #[error(
        "device {device} asked for, but the ONNX Runtime library at `{}` is a build without the \
         CUDA execution provider: install the GPU build (scripts/setup-onnxruntime.sh --gpu, or \
         pip install onnxruntime-gpu=={RECOMMENDED_VERSION}), point ORT_DYLIB_PATH at its \
         libonnxruntime.so, or use --device cpu",
        library.display()
    )]
    CudaNotInBuild {
        /// The device asked for.
        device: DeviceSpec,
        /// The library that was loaded.
        library: PathBuf,
    },
    /// The CUDA execution provider was refused (a device index out of range, missing
    /// CUDA/cuDNN libraries...).
    #[error(
        "could not use device {device}: the CUDA execution provider failed to register: {source} \
         (the GPU build of ONNX Runtime {RECOMMENDED_VERSION} needs a visible GPU with that index, \
         an NVIDIA driver for CUDA 13, the CUDA 13 runtime, cuBLAS, cuFFT, cuRAND, NVRTC and \
         cuDNN 9 libraries on the loader path, and libonnxruntime_providers_cuda.so beside \
         libonnxruntime.so; `audiocap doctor` shows what it finds)"
    )]
    Cuda {
        /// The device asked for.
        device: DeviceSpec,
        /// What ONNX Runtime reported.
        source: ort::Error,
    },
    /// Another session option was refused.
    #[error("could not configure the ONNX Runtime session ({what}): {source}")]
    Session {
        /// The option.
        what: &'static str,
        /// What ONNX Runtime reported.
        source: ort::Error,
    },
}

fn list_steps(steps: &[SearchStep]) -> String {
    let lines: Vec<String> = steps.iter().map(|s| format!("  - {s}")).collect();
    lines.join("\n")
}

/// The `ort` release this crate pins (Cargo.toml), for messages.
pub(super) const ORT_CRATE_VERSION: &str = "2.0.0-rc.15";

/// The process's one ONNX Runtime: what was loaded, its environment, and how it was found.
pub(super) struct Runtime {
    pub(super) info: RuntimeInfo,
    pub(super) environment: Environment,
    pub(super) searched: Vec<SearchStep>,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Finds, checks and loads ONNX Runtime, and creates its environment; see the module
/// documentation for the search order. Idempotent: once it has succeeded, later calls
/// return the same information without searching again. A failed call can be retried
/// (after running the setup script, say).
pub fn init_runtime() -> Result<RuntimeInfo, RuntimeError> {
    runtime().map(|rt| rt.info.clone())
}

/// The process's ONNX Runtime environment, loading ONNX Runtime first if need be.
/// Sessions are built in it ([`Session::builder`](ort::session::Session::builder));
/// [`session_builder`](super::session_builder) does this.
pub fn environment() -> Result<&'static Environment, RuntimeError> {
    runtime().map(|rt| &rt.environment)
}

pub(super) fn runtime() -> Result<&'static Runtime, RuntimeError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    // One search and one load at a time; the loser of a race finds the winner's result.
    let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let located = locate_library(&SystemEnv)?;
    let rt = load(located)?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// A library the search found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Located {
    library: PathBuf,
    route: LibrarySource,
    searched: Vec<SearchStep>,
}

fn load(located: Located) -> Result<Runtime, RuntimeError> {
    let Located {
        library,
        route,
        searched,
    } = located;
    let library = std::path::absolute(&library).unwrap_or(library);

    // `ort` checks the version too, but its message does not say how to get a newer one.
    let minor = ort::util::probe(&library);
    if let Some(minor) = minor
        && minor < MIN_MINOR_VERSION
    {
        return Err(RuntimeError::TooOld {
            found: version_of(&library, minor),
            path: library,
            route,
        });
    }
    let builder = match ort::init_from(&library) {
        Ok(builder) => builder,
        Err(ort::LoadDynamicError::BadVersion { version_str, .. }) => {
            return Err(RuntimeError::TooOld {
                path: library,
                route,
                found: version_str,
            });
        }
        Err(source) => {
            return Err(RuntimeError::Load {
                path: library,
                route,
                source,
            });
        }
    };
    let environment = builder
        .with_name("audiocap")
        .with_telemetry(false)
        .build()
        .map_err(RuntimeError::Environment)?;
    // The list of providers compiled into the library; an error here means the same as
    // "not there" for every purpose audiocap has.
    let cuda_available = ep::CUDA::is_available().unwrap_or(false);
    let version = match minor {
        Some(minor) => version_of(&library, minor),
        None => format!("1.{MIN_MINOR_VERSION} or newer"),
    };
    Ok(Runtime {
        info: RuntimeInfo {
            library,
            route,
            version,
            cuda_available,
        },
        environment,
        searched,
    })
}

/// `1.<minor>.<patch>` when the file (or the file a link points to) is named
/// `libonnxruntime.so.1.<minor>.<patch>`, else `1.<minor>`.
fn version_of(library: &Path, minor: u32) -> String {
    let resolved = std::fs::canonicalize(library).unwrap_or_else(|_| library.to_path_buf());
    [resolved.as_path(), library]
        .iter()
        .filter_map(|p| p.file_name()?.to_str().and_then(version_in_file_name))
        .find(|v| v.split('.').nth(1) == Some(minor.to_string().as_str()))
        .unwrap_or_else(|| format!("1.{minor}"))
}

/// The version suffix of `libonnxruntime.so.1.31.1`: `1.31.1` (only a full
/// `major.minor.patch`).
fn version_in_file_name(name: &str) -> Option<String> {
    let suffix = name.strip_prefix(&library_base_name())?.strip_prefix('.')?;
    let parts: Vec<&str> = suffix.split('.').collect();
    let numeric = parts
        .iter()
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (parts.len() == 3 && numeric).then(|| suffix.to_string())
}

/// `libonnxruntime.so` on Linux.
fn library_base_name() -> String {
    format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The ONNX Runtime library among the file names of one directory: the unversioned
/// name if it is there, else the newest `libonnxruntime.so.X[.Y[.Z]]`. Provider
/// libraries (`libonnxruntime_providers_*.so`) never match.
fn pick_library(names: &[String]) -> Option<String> {
    let base = library_base_name();
    if names.contains(&base) {
        return Some(base);
    }
    names
        .iter()
        .filter_map(|n| {
            let suffix = n.strip_prefix(&base)?.strip_prefix('.')?;
            let version: Option<Vec<u64>> = suffix.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, n))
        })
        .max()
        .map(|(_, n)| n.clone())
}

/// What one interpreter said about the `onnxruntime` Python package.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PythonProbe {
    /// The interpreter could not be run (absent, timed out, failed).
    Unavailable { reason: String },
    /// It runs, but has no `onnxruntime` module.
    NoPackage,
    /// It has the module.
    Package {
        /// `onnxruntime 1.31.1`, `onnxruntime-gpu 1.31.1`, or the module alone.
        distribution: String,
        /// `.../site-packages/onnxruntime/capi`.
        capi_dir: PathBuf,
        /// The file names in `capi_dir` that start with `libonnxruntime`.
        libraries: Vec<String>,
    },
}

/// What the search reads from the machine. [`SystemEnv`] reads the real one; the tests
/// give a made-up one, so the order is tested without touching the machine.
trait SearchEnv {
    /// An environment variable (`None` when unset).
    fn var(&self, name: &str) -> Option<OsString>;
    /// The home directory.
    fn home_dir(&self) -> Option<PathBuf>;
    /// The directory of the running executable.
    fn exe_dir(&self) -> Option<PathBuf>;
    /// Whether `path` is a file (following links).
    fn is_file(&self, path: &Path) -> bool;
    /// Whether `path` is a directory (following links).
    fn is_dir(&self, path: &Path) -> bool;
    /// The names of the entries of `dir`; empty when it cannot be read.
    fn file_names(&self, dir: &Path) -> Vec<String>;
    /// Asks `interpreter` about the `onnxruntime` package.
    fn python_probe(&self, interpreter: &str) -> PythonProbe;
}

/// The project install directory: `${AUDIOCAP_HOME:-$HOME/.local/share/audiocap}/onnxruntime`.
fn project_install_dir(env: &dyn SearchEnv) -> Option<PathBuf> {
    let base = crate::config::audiocap_home_from(env.var(AUDIOCAP_HOME), env.home_dir())?;
    Some(base.join("onnxruntime"))
}

/// Looks for the library in `dir`; records the step.
fn look_in_dir(
    env: &dyn SearchEnv,
    route: LibrarySource,
    dir: &Path,
    searched: &mut Vec<SearchStep>,
) -> Option<PathBuf> {
    let found = pick_library(&env.file_names(dir))
        .map(|name| dir.join(name))
        .filter(|path| env.is_file(path));
    let outcome = match &found {
        Some(path) => format!("found {}", path.display()),
        None if env.is_dir(dir) => format!("no {}* there", library_base_name()),
        None => "does not exist".to_string(),
    };
    searched.push(SearchStep {
        route,
        place: dir.display().to_string(),
        outcome,
    });
    found
}

/// The search itself, over whatever `env` says the machine holds.
fn locate_library(env: &dyn SearchEnv) -> Result<Located, RuntimeError> {
    let mut searched = Vec::new();
    let located = |library: PathBuf, route, searched: Vec<SearchStep>| Located {
        library,
        route,
        searched,
    };

    // 1. ORT_DYLIB_PATH: an explicit choice, so a wrong value is an error, not a miss.
    match env.var(ORT_DYLIB_PATH).filter(|v| !v.is_empty()) {
        Some(value) => {
            let path = PathBuf::from(value);
            if env.is_file(&path) {
                searched.push(SearchStep {
                    route: LibrarySource::EnvVar,
                    place: "environment".to_string(),
                    outcome: format!("found {}", path.display()),
                });
                return Ok(located(path, LibrarySource::EnvVar, searched));
            }
            let problem = if env.is_dir(&path) {
                "is a directory"
            } else {
                "does not exist"
            };
            return Err(RuntimeError::EnvVarPath { path, problem });
        }
        None => searched.push(SearchStep {
            route: LibrarySource::EnvVar,
            place: "environment".to_string(),
            outcome: "not set".to_string(),
        }),
    }

    // 2. The project's own install, then a packaged install beside the executable.
    match project_install_dir(env) {
        Some(dir) => {
            let lib = dir.join("lib");
            if let Some(path) = look_in_dir(env, LibrarySource::ProjectInstall, &lib, &mut searched)
            {
                return Ok(located(path, LibrarySource::ProjectInstall, searched));
            }
        }
        None => searched.push(SearchStep {
            route: LibrarySource::ProjectInstall,
            place: format!("${AUDIOCAP_HOME} or $HOME"),
            outcome: "neither is set".to_string(),
        }),
    }
    match env.exe_dir() {
        Some(exe_dir) => {
            for dir in [exe_dir.clone(), exe_dir.join("../lib")] {
                let route = LibrarySource::BesideExecutable;
                if let Some(path) = look_in_dir(env, route, &dir, &mut searched) {
                    return Ok(located(path, route, searched));
                }
            }
        }
        None => searched.push(SearchStep {
            route: LibrarySource::BesideExecutable,
            place: "the executable's directory".to_string(),
            outcome: "unknown".to_string(),
        }),
    }

    // 3. A Python package: the first interpreter that has one.
    for interpreter in PYTHON_INTERPRETERS {
        let route = LibrarySource::PythonPackage;
        let place = interpreter.to_string();
        match env.python_probe(interpreter) {
            PythonProbe::Unavailable { reason } => searched.push(SearchStep {
                route,
                place,
                outcome: reason,
            }),
            PythonProbe::NoPackage => searched.push(SearchStep {
                route,
                place,
                outcome: "no onnxruntime package".to_string(),
            }),
            PythonProbe::Package {
                distribution,
                capi_dir,
                libraries,
            } => {
                let found = pick_library(&libraries)
                    .map(|name| capi_dir.join(name))
                    .filter(|path| env.is_file(path));
                match found {
                    Some(path) => {
                        searched.push(SearchStep {
                            route,
                            place,
                            outcome: format!("{distribution}: found {}", path.display()),
                        });
                        return Ok(located(path, route, searched));
                    }
                    None => searched.push(SearchStep {
                        route,
                        place,
                        outcome: format!(
                            "{distribution} has no {}* in {}",
                            library_base_name(),
                            capi_dir.display()
                        ),
                    }),
                }
            }
        }
    }

    Err(RuntimeError::NotFound { searched })
}

/// The machine as it is.
struct SystemEnv;

impl SearchEnv for SystemEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn home_dir(&self) -> Option<PathBuf> {
        std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(PathBuf::from)
    }

    fn exe_dir(&self) -> Option<PathBuf> {
        std::env::current_exe()
            .ok()?
            .parent()
            .map(Path::to_path_buf)
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn file_names(&self, dir: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    }

    fn python_probe(&self, interpreter: &str) -> PythonProbe {
        probe_python(interpreter, PYTHON_TIMEOUT)
    }
}

/// Finds the `onnxruntime` module without importing it (an import pulls in numpy and
/// takes seconds) and prints one JSON object.
const PYTHON_PROBE_SCRIPT: &str = r#"
import importlib.util, importlib.metadata, json, os, sys
spec = importlib.util.find_spec("onnxruntime")
out = {"package": None}
if spec is not None and spec.submodule_search_locations:
    capi = os.path.join(list(spec.submodule_search_locations)[0], "capi")
    libs = sorted(n for n in os.listdir(capi) if n.startswith("libonnxruntime")) if os.path.isdir(capi) else []
    dist = "onnxruntime module"
    for name in sys.argv[1:]:
        try:
            dist = name + " " + importlib.metadata.version(name)
            break
        except Exception:
            pass
    out = {"package": dist, "capi": capi, "libraries": libs}
print(json.dumps(out))
"#;

fn probe_python(interpreter: &str, timeout: Duration) -> PythonProbe {
    let mut command = Command::new(interpreter);
    command
        .arg("-c")
        .arg(PYTHON_PROBE_SCRIPT)
        .args(PYTHON_DISTRIBUTIONS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = match run_with_timeout(command, timeout) {
        Ok(output) => output,
        Err(reason) => return PythonProbe::Unavailable { reason },
    };
    if !output.success {
        let stderr = output.stderr.trim();
        let last = stderr.lines().last().unwrap_or("no output");
        return PythonProbe::Unavailable {
            reason: format!("failed: {last}"),
        };
    }
    parse_python_probe(&output.stdout)
}

fn parse_python_probe(stdout: &str) -> PythonProbe {
    #[derive(serde::Deserialize)]
    struct Answer {
        package: Option<String>,
        #[serde(default)]
        capi: Option<PathBuf>,
        #[serde(default)]
        libraries: Vec<String>,
    }
    let line = stdout.lines().last().unwrap_or("");
    match serde_json::from_str::<Answer>(line) {
        Ok(Answer {
            package: Some(distribution),
            capi: Some(capi_dir),
            libraries,
        }) => PythonProbe::Package {
            distribution,
            capi_dir,
            libraries,
        },
        Ok(_) => PythonProbe::NoPackage,
        Err(e) => PythonProbe::Unavailable {
            reason: format!("unexpected answer ({e}): {line:?}"),
        },
    }
}

struct ProcessOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `command`, killing it after `timeout`. The probes print a few hundred bytes, so
/// reading the pipes after the exit cannot dead-lock on a full pipe.
fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<ProcessOutput, String> {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("not found on PATH".to_string());
        }
        Err(e) => return Err(format!("could not be started: {e}")),
    };
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("gave no answer within {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("could not be waited for: {e}")),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout);
    }
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    Ok(ProcessOutput {
        success: status.success(),
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use ort::session::Session;

    use super::*;
    use crate::engine::runtime::{doctor_report, session_builder};

    /// A made-up machine: variables, a few files, and what each interpreter answers.
    #[derive(Default)]
    struct FakeEnv {
        vars: HashMap<String, String>,
        home: Option<PathBuf>,
        exe_dir: Option<PathBuf>,
        files: HashSet<PathBuf>,
        python: HashMap<String, PythonProbe>,
        python_asked: std::cell::RefCell<Vec<String>>,
    }

    impl FakeEnv {
        fn machine() -> Self {
            Self {
                home: Some("/home/u".into()),
                exe_dir: Some("/opt/audiocap/bin".into()),
                ..Self::default()
            }
        }

        fn with_file(mut self, path: &str) -> Self {
            self.files.insert(path.into());
            self
        }

        fn with_var(mut self, name: &str, value: &str) -> Self {
            self.vars.insert(name.into(), value.into());
            self
        }

        fn with_python(mut self, interpreter: &str, probe: PythonProbe) -> Self {
            self.python.insert(interpreter.into(), probe);
            self
        }
    }

    impl SearchEnv for FakeEnv {
        fn var(&self, name: &str) -> Option<OsString> {
            self.vars.get(name).map(OsString::from)
        }
        fn home_dir(&self) -> Option<PathBuf> {
            self.home.clone()
        }
        fn exe_dir(&self) -> Option<PathBuf> {
            self.exe_dir.clone()
        }
        fn is_file(&self, path: &Path) -> bool {
            self.files.contains(path)
        }
        fn is_dir(&self, path: &Path) -> bool {
            self.files.iter().any(|f| f.starts_with(path) && f != path)
        }
        fn file_names(&self, dir: &Path) -> Vec<String> {
            self.files
                .iter()
                .filter(|f| f.parent() == Some(dir))
                .filter_map(|f| Some(f.file_name()?.to_str()?.to_string()))
                .collect()
        }
        fn python_probe(&self, interpreter: &str) -> PythonProbe {
            self.python_asked.borrow_mut().push(interpreter.to_string());
            self.python
                .get(interpreter)
                .cloned()
                .unwrap_or(PythonProbe::Unavailable {
                    reason: "not found on PATH".to_string(),
                })
        }
    }

    fn python_package(capi: &str) -> PythonProbe {
        PythonProbe::Package {
            distribution: "onnxruntime 1.31.1".to_string(),
            capi_dir: capi.into(),
            libraries: vec![
                "libonnxruntime.so.1.31.1".to_string(),
                "libonnxruntime_providers_shared.so".to_string(),
            ],
        }
    }

    const PROJECT_LIB: &str = "/home/u/.local/share/audiocap/onnxruntime/lib/libonnxruntime.so";
    const EXE_LIB: &str = "/opt/audiocap/bin/libonnxruntime.so.1.31.1";
    const EXE_LIB_DIR_LIB: &str = "/opt/audiocap/bin/../lib/libonnxruntime.so.1";
    const CAPI: &str = "/py/site-packages/onnxruntime/capi";
    const CAPI_LIB: &str = "/py/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1";

    /// A machine with a library on every route.
    fn everything() -> FakeEnv {
        FakeEnv::machine()
            .with_var(ORT_DYLIB_PATH, "/custom/libonnxruntime.so.1.31.1")
            .with_file("/custom/libonnxruntime.so.1.31.1")
            .with_file(PROJECT_LIB)
            .with_file(EXE_LIB)
            .with_file(EXE_LIB_DIR_LIB)
            .with_file(CAPI_LIB)
            .with_python("python3", python_package(CAPI))
    }

    fn found(env: &FakeEnv) -> (PathBuf, LibrarySource) {
        match locate_library(env) {
            Ok(l) => (l.library, l.route),
            Err(e) => panic!("expected a library, got: {e}"),
        }
    }

    #[test]
    fn env_var_comes_first() {
        assert_eq!(
            found(&everything()),
            (
                "/custom/libonnxruntime.so.1.31.1".into(),
                LibrarySource::EnvVar
            )
        );
    }

    #[test]
    fn env_var_naming_nothing_is_an_error_not_a_miss() {
        let env = everything().with_var(ORT_DYLIB_PATH, "/nowhere/libonnxruntime.so");
        let err = locate_library(&env).expect_err("a missing ORT_DYLIB_PATH file");
        let msg = err.to_string();
        assert!(matches!(
            err,
            RuntimeError::EnvVarPath {
                problem: "does not exist",
                ..
            }
        ));
        assert!(msg.contains("ORT_DYLIB_PATH") && msg.contains("/nowhere/libonnxruntime.so"));
        assert!(msg.contains("scripts/setup-onnxruntime.sh"), "{msg}");

        let env = everything().with_var(ORT_DYLIB_PATH, "/opt/audiocap/bin");
        let err = locate_library(&env).expect_err("a directory");
        assert!(matches!(
            err,
            RuntimeError::EnvVarPath {
                problem: "is a directory",
                ..
            }
        ));
    }

    #[test]
    fn empty_env_var_counts_as_unset() {
        let env = everything().with_var(ORT_DYLIB_PATH, "");
        assert_eq!(
            found(&env),
            (PROJECT_LIB.into(), LibrarySource::ProjectInstall)
        );
    }

    #[test]
    fn project_install_then_beside_executable_then_python() {
        let mut env = everything();
        env.vars.clear();
        assert_eq!(
            found(&env),
            (PROJECT_LIB.into(), LibrarySource::ProjectInstall)
        );
        assert!(
            env.python_asked.borrow().is_empty(),
            "python asked too early"
        );

        env.files.remove(Path::new(PROJECT_LIB));
        assert_eq!(
            found(&env),
            (EXE_LIB.into(), LibrarySource::BesideExecutable)
        );

        env.files.remove(Path::new(EXE_LIB));
        assert_eq!(
            found(&env),
            (EXE_LIB_DIR_LIB.into(), LibrarySource::BesideExecutable)
        );
        assert!(
            env.python_asked.borrow().is_empty(),
            "python asked too early"
        );

        env.files.remove(Path::new(EXE_LIB_DIR_LIB));
        assert_eq!(found(&env), (CAPI_LIB.into(), LibrarySource::PythonPackage));
        assert_eq!(*env.python_asked.borrow(), ["python3"]);
    }

    #[test]
    fn audiocap_home_moves_the_project_install() {
        let env = FakeEnv::machine()
            .with_var(AUDIOCAP_HOME, "/data/ac")
            .with_file("/data/ac/onnxruntime/lib/libonnxruntime.so.1.31.1")
            .with_file(PROJECT_LIB);
        assert_eq!(
            found(&env),
            (
                "/data/ac/onnxruntime/lib/libonnxruntime.so.1.31.1".into(),
                LibrarySource::ProjectInstall
            )
        );
    }

    #[test]
    fn python_falls_back_to_the_second_interpreter() {
        let env = FakeEnv::machine()
            .with_file(CAPI_LIB)
            .with_python("python3", PythonProbe::NoPackage)
            .with_python("python", python_package(CAPI));
        assert_eq!(found(&env), (CAPI_LIB.into(), LibrarySource::PythonPackage));
        assert_eq!(*env.python_asked.borrow(), ["python3", "python"]);
    }

    #[test]
    fn not_found_lists_every_place_and_how_to_get_one() {
        let env = FakeEnv::machine()
            .with_python("python3", PythonProbe::NoPackage)
            .with_python(
                "python",
                PythonProbe::Unavailable {
                    reason: "gave no answer within 5 s".to_string(),
                },
            );
        let err = locate_library(&env).expect_err("nothing installed");
        let RuntimeError::NotFound { searched } = &err else {
            panic!("expected NotFound, got {err}");
        };
        let places: Vec<(LibrarySource, &str)> = searched
            .iter()
            .map(|s| (s.route, s.place.as_str()))
            .collect();
        assert_eq!(
            places,
            [
                (LibrarySource::EnvVar, "environment"),
                (
                    LibrarySource::ProjectInstall,
                    "/home/u/.local/share/audiocap/onnxruntime/lib"
                ),
                (LibrarySource::BesideExecutable, "/opt/audiocap/bin"),
                (LibrarySource::BesideExecutable, "/opt/audiocap/bin/../lib"),
                (LibrarySource::PythonPackage, "python3"),
                (LibrarySource::PythonPackage, "python"),
            ]
        );
        let msg = err.to_string();
        for needle in [
            "scripts/setup-onnxruntime.sh",
            "pip install onnxruntime==1.31.1",
            "ORT_DYLIB_PATH=",
            "/home/u/.local/share/audiocap/onnxruntime/lib",
            "/opt/audiocap/bin/../lib",
            "python3: no onnxruntime package",
            "python: gave no answer within 5 s",
        ] {
            assert!(msg.contains(needle), "`{needle}` missing from:\n{msg}");
        }
    }

    #[test]
    fn python_package_without_a_library_is_a_miss() {
        let env = FakeEnv::machine().with_python(
            "python3",
            PythonProbe::Package {
                distribution: "onnxruntime 1.31.1".to_string(),
                capi_dir: CAPI.into(),
                libraries: vec![],
            },
        );
        let err = locate_library(&env).expect_err("no library in the package");
        assert!(
            err.to_string().contains("has no libonnxruntime.so* in"),
            "{err}"
        );
    }

    #[test]
    fn picks_the_library_file_among_the_providers() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pick_library(&names(&[
                "libonnxruntime_providers_cuda.so",
                "libonnxruntime.so.1.31.1",
                "libonnxruntime.so.1.9.0",
                "libonnxruntime.so.1",
            ])),
            Some("libonnxruntime.so.1.31.1".to_string())
        );
        assert_eq!(
            pick_library(&names(&["libonnxruntime.so.1.31.1", "libonnxruntime.so"])),
            Some("libonnxruntime.so".to_string())
        );
        assert_eq!(
            pick_library(&names(&[
                "libonnxruntime_providers_shared.so",
                "libonnxruntime.so.bak"
            ])),
            None
        );
        assert_eq!(
            version_in_file_name("libonnxruntime.so.1.31.1"),
            Some("1.31.1".to_string())
        );
        assert_eq!(version_in_file_name("libonnxruntime.so.1"), None);
    }

    #[test]
    fn python_probe_answers_are_parsed() {
        assert_eq!(
            parse_python_probe(r#"{"package": null}"#),
            PythonProbe::NoPackage
        );
        assert_eq!(
            parse_python_probe(
                r#"{"package": "onnxruntime 1.31.1", "capi": "/c", "libraries": ["libonnxruntime.so.1.31.1"]}"#
            ),
            PythonProbe::Package {
                distribution: "onnxruntime 1.31.1".to_string(),
                capi_dir: "/c".into(),
                libraries: vec!["libonnxruntime.so.1.31.1".to_string()],
            }
        );
        assert!(matches!(
            parse_python_probe("Traceback"),
            PythonProbe::Unavailable { .. }
        ));
        // An interpreter that does not exist is a reason, not a failure.
        assert!(matches!(
            probe_python("audiocap-no-such-python", PYTHON_TIMEOUT),
            PythonProbe::Unavailable { .. }
        ));
    }

    #[test]
    fn slow_probes_are_abandoned() {
        let mut command = Command::new("sleep");
        command.arg("10");
        let start = Instant::now();
        let result = run_with_timeout(command, Duration::from_millis(200));
        assert!(result.is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// Writes a one-node `Add` model (z = x + y, float[N]) with the Python `onnx`
    /// package, or says why it cannot.
    fn write_add_model(path: &Path) -> Result<(), String> {
        let script = r#"
import sys
import onnx
from onnx import TensorProto, helper
vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n"])
graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", [vi("x"), vi("y")], [vi("z")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
"#;
        let mut command = Command::new("python3");
        command
            .arg("-c")
            .arg(script)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = run_with_timeout(command, Duration::from_secs(60))?;
        if output.success {
            Ok(())
        } else {
            Err(output
                .stderr
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string())
        }
    }

    /// The real thing: this machine has a library (CI runs scripts/setup-onnxruntime.sh
    /// first), it loads, and a session runs on the CPU.
    #[test]
    fn init_runtime_loads_onnx_runtime_and_runs_a_session() {
        let info = match init_runtime() {
            Ok(info) => info,
            Err(e) => panic!("{e}"),
        };
        println!("{info:?}");
        assert!(
            info.library.is_absolute() && info.library.is_file(),
            "{info:?}"
        );
        let minor: u32 = info
            .version
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        assert!(minor >= MIN_MINOR_VERSION, "{info:?}");
        // Idempotent: the same answer, no second search.
        assert_eq!(init_runtime().ok(), Some(info.clone()));

        let report = doctor_report();
        println!("{report}");
        assert!(
            report.contains(&info.library.display().to_string()),
            "{report}"
        );
        assert!(report.contains(&info.route.to_string()), "{report}");

        if !info.cuda_available {
            // A CPU-only library: asking for CUDA is a clear error, not a CPU session.
            let err = session_builder(&DeviceSpec::Cuda(0), None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("setup-onnxruntime.sh --gpu"), "{err}");
        }

        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("add.onnx");
        if let Err(reason) = write_add_model(&model) {
            println!("skipping the session part: no Python `onnx` package ({reason})");
            return;
        }
        let mut session = session_builder(&DeviceSpec::Cpu, Some(1))
            .expect("CPU session builder")
            .commit_from_file(&model)
            .expect("load the Add model");
        assert_eq!(
            run_add(&mut session).as_deref(),
            Ok(&[11.0f32, 22.0, 33.0][..])
        );

        if info.cuda_available {
            // The GPU build: CUDA either runs, or fails loudly; never a CPU session.
            let cuda = session_builder(&DeviceSpec::Cuda(0), None)
                .map_err(|e| e.to_string())
                .and_then(|mut b| b.commit_from_file(&model).map_err(|e| e.to_string()));
            match cuda {
                Ok(mut session) => {
                    println!("CUDA session created");
                    assert_eq!(
                        run_add(&mut session).as_deref(),
                        Ok(&[11.0f32, 22.0, 33.0][..])
                    );
                }
                Err(e) => {
                    println!("CUDA refused: {e}");
                    let no_gpu = !Path::new("/proc/driver/nvidia/version").exists();
                    assert!(no_gpu, "a GPU is visible, but CUDA failed: {e}");
                }
            }
        }
    }

    /// Runs the `Add` model on [1, 2, 3] + [10, 20, 30].
    fn run_add(session: &mut Session) -> Result<Vec<f32>, String> {
        let x = ort::value::Tensor::from_array(([3usize], vec![1.0f32, 2.0, 3.0]));
        let y = ort::value::Tensor::from_array(([3usize], vec![10.0f32, 20.0, 30.0]));
        let (x, y) = (x.map_err(|e| e.to_string())?, y.map_err(|e| e.to_string())?);
        let outputs = session
            .run(ort::inputs!["x" => x, "y" => y])
            .map_err(|e| e.to_string())?;
        let z = outputs["z"]
            .try_extract_array::<f32>()
            .map_err(|e| e.to_string())?;
        Ok(z.iter().copied().collect())
    }
}
