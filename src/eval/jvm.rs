//! Finding and running the Java tools behind METEOR and SPICE: the `java` executable,
//! the jars (configured, or the ones the `pycocoevalcap` Python package ships), and
//! what a failed run left on stderr.
//!
//! Discovery never fails the evaluation: a missing piece becomes an [`Unavailable`]
//! reason that names what was looked for and where.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::EvalError;

/// Why a metric was not computed, worded for the user.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// How a Java tool failed at run time.
#[derive(Debug, thiserror::Error)]
pub enum JavaError {
    /// The JVM could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// The tool ended (or stopped answering) before giving all its results.
    #[error("{tool} stopped before giving its scores ({status}); stderr: {stderr}")]
    Ended {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    /// The tool answered something that is not what its protocol says.
    #[error("{tool} answered {line:?} where {expected} was expected; stderr: {stderr}")]
    Protocol {
        tool: &'static str,
        line: String,
        expected: &'static str,
        stderr: String,
    },
    /// Reading or writing the tool's files failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The tool's output file is not what it writes.
    #[error("{tool} output {}: {what}", path.display())]
    Output {
        tool: &'static str,
        path: PathBuf,
        what: String,
    },
    /// The captions cannot be scored at all.
    #[error(transparent)]
    Input(#[from] EvalError),
}

/// Where the user pointed the Java tools (command-line flags); `None` = not given.
#[derive(Debug, Clone, Default)]
pub struct JavaPaths {
    /// `--java`
    pub java: Option<PathBuf>,
    /// `--meteor-jar`
    pub meteor_jar: Option<PathBuf>,
    /// `--spice-jar`
    pub spice_jar: Option<PathBuf>,
    /// `--corenlp-dir`
    pub corenlp_dir: Option<PathBuf>,
}

/// Environment variable naming the METEOR jar.
pub const METEOR_JAR_ENV: &str = "AUDIOCAP_METEOR_JAR";
/// Environment variable naming the SPICE jar.
pub const SPICE_JAR_ENV: &str = "AUDIOCAP_SPICE_JAR";
/// Environment variable naming the folder with the Stanford CoreNLP 3.6.0 jars.
pub const CORENLP_DIR_ENV: &str = "AUDIOCAP_CORENLP_DIR";

/// What discovery reads besides the flags: environment variables and the location
/// of the installed `pycocoevalcap` package. Tests substitute both.
pub struct Environment {
    pub var: Box<VarLookup>,
    /// The `pycocoevalcap` package folder, or why it was not found.
    pub pycocoevalcap: Box<dyn Fn() -> Result<PathBuf, String>>,
}

/// Reads one environment variable (unset and empty are both `None`).
pub type VarLookup = dyn Fn(&str) -> Option<OsString>;

impl Environment {
    /// The process environment; `pycocoevalcap` is asked of `python3` on first use
    /// and remembered.
    pub fn process() -> Self {
        let cached: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
        Environment {
            var: Box::new(|name| std::env::var_os(name).filter(|v| !v.is_empty())),
            pycocoevalcap: Box::new(move || {
                let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
                cached.get_or_insert_with(pycocoevalcap_dir).clone()
            }),
        }
    }
}

/// Asks `python3` where the `pycocoevalcap` package is installed (it is a namespace
/// package in its wheels, so its `__path__`, not `__file__`).
fn pycocoevalcap_dir() -> Result<PathBuf, String> {
    const PROBE: &str = "import importlib.util as u\n\
        s = u.find_spec('pycocoevalcap')\n\
        print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')";
    let out = Command::new("python3")
        .args(["-c", PROBE])
        .output()
        .map_err(|e| format!("python3 could not be run to look for pycocoevalcap ({e})"))?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || dir.is_empty() {
        return Err("python3 has no pycocoevalcap package".to_string());
    }
    Ok(PathBuf::from(dir))
}

/// Finds `java`: `--java`, then `$JAVA_HOME/bin/java`, then `java` on `PATH`.
pub fn find_java(paths: &JavaPaths, env: &Environment) -> Result<PathBuf, Unavailable> {
    if let Some(java) = &paths.java {
        return if java.is_file() {
            Ok(java.clone())
        } else {
            Err(Unavailable(format!(
                "--java {}: no such file",
                java.display()
            )))
        };
    }
    let mut looked = Vec::new();
    if let Some(home) = (env.var)("JAVA_HOME") {
        let java = Path::new(&home).join("bin").join("java");
        if java.is_file() {
            return Ok(java);
        }
        looked.push(format!("{} does not exist", java.display()));
    } else {
        looked.push("JAVA_HOME is not set".to_string());
    }
    if let Some(path) = (env.var)("PATH") {
        for dir in std::env::split_paths(&path) {
            let java = dir.join("java");
            if is_executable(&java) {
                return Ok(java);
            }
        }
    }
    looked.push("no java on PATH".to_string());
    Err(Unavailable(format!(
        "Java not found ({}); install a Java runtime or pass --java",
        looked.join(", ")
    )))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file() || path.with_extension("exe").is_file()
}

/// Finds the jar `tool` needs: the flag, then the environment variable, then
/// `relative` inside the installed `pycocoevalcap` package.
pub fn find_jar(
    tool: &str,
    flag: (&str, Option<&Path>),
    env_name: &str,
    relative: &str,
    env: &Environment,
) -> Result<PathBuf, Unavailable> {
    let (flag_name, flag_value) = flag;
    let name = Path::new(relative)
        .file_name()
        .map_or(relative.into(), |n| n.to_string_lossy());
    let found = if let Some(jar) = flag_value {
        existing(jar, || format!("{flag_name} {}", jar.display()))
    } else if let Some(jar) = (env.var)(env_name) {
        let jar = PathBuf::from(jar);
        existing(&jar, || format!("{env_name}={}", jar.display()))
    } else {
        match (env.pycocoevalcap)() {
            Ok(dir) => {
                let jar = dir.join(relative);
                existing(&jar, || {
                    format!(
                        "the pycocoevalcap package at {} has no {relative}",
                        dir.display()
                    )
                })
            }
            Err(why) => Err(format!(
                "not found: no {flag_name}, {env_name} is not set, and {why} \
                 (`pip install pycocoevalcap` ships it)"
            )),
        }
    };
    found.map_err(|why| Unavailable(format!("{tool} needs {name}: {why}")))
}

fn existing(path: &Path, what: impl FnOnce() -> String) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(format!("{}: no such file", what()))
    }
}
/// The major version `java -version` reports (`1.8.0_292` → 8, `17.0.15` → 17).
pub fn java_major_version(java: &Path) -> Option<u32> {
    let out = Command::new(java).arg("-version").output().ok()?;
    parse_java_version(&String::from_utf8_lossy(&out.stderr))
}

fn parse_java_version(text: &str) -> Option<u32> {
    let quoted = text.split('"').nth(1)?;
    let mut parts = quoted.split(['.', '_', '-', '+']);
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 {
        parts.next()?.parse().ok()
    } else {
        Some(first)
    }
}

/// The last lines a child wrote to a stream, collected by a background thread so the
/// child never blocks on a full pipe.
pub struct Tail {
    lines: Arc<Mutex<VecDeque<String>>>,
    reader: Option<JoinHandle<()>>,
}

/// Lines of stderr kept for error messages.
const TAIL_LINES: usize = 15;

impl Tail {
    pub fn collect(stream: impl Read + Send + 'static) -> Self {
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
                if sink.len() == TAIL_LINES {
                    sink.pop_front();
                }
                sink.push_back(line);
            }
        });
        Tail {
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for the stream to end (call after the child has exited) and returns its
    /// last lines.
    pub fn finish(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            // A panicked reader only loses lines; what it kept is still there.
            let _ = reader.join();
        }
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        tail_text(lines.iter().map(String::as_str))
    }
}

/// The last lines of `text`, joined for an error message.
pub fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    tail_text(
        lines[lines.len().saturating_sub(TAIL_LINES)..]
            .iter()
            .copied(),
    )
}

fn tail_text<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let text: Vec<&str> = lines.map(str::trim_end).filter(|l| !l.is_empty()).collect();
    if text.is_empty() {
        "(empty)".to_string()
    } else {
        text.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)], pycoco: Result<PathBuf, String>) -> Environment {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Environment {
            var: Box::new(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())),
            pycocoevalcap: Box::new(move || pycoco.clone()),
        }
    }

    #[test]
    fn java_versions() {
        let v17 = "openjdk version \"17.0.15\" 2025-04-15\nOpenJDK Runtime Environment";
        assert_eq!(parse_java_version(v17), Some(17));
        assert_eq!(
            parse_java_version("java version \"1.8.0_292\"\nJava(TM) SE"),
            Some(8)
        );
        assert_eq!(
            parse_java_version("openjdk version \"21\" 2023-09-19"),
            Some(21)
        );
        assert_eq!(parse_java_version("no version here"), None);
    }

    #[test]
    fn jar_discovery_order_and_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let flag_jar = dir.path().join("flag.jar");
        let env_jar = dir.path().join("env.jar");
        let pkg = dir.path().join("pycocoevalcap");
        std::fs::create_dir_all(pkg.join("meteor")).unwrap();
        for f in [&flag_jar, &env_jar, &pkg.join("meteor/meteor-1.5.jar")] {
            std::fs::write(f, b"jar").unwrap();
        }
        let rel = "meteor/meteor-1.5.jar";
        let env_str = env_jar.to_str().unwrap();
        let full = env(&[(METEOR_JAR_ENV, env_str)], Ok(pkg.clone()));
        let flag = ("--meteor-jar", Some(flag_jar.as_path()));
        assert_eq!(
            find_jar("METEOR", flag, METEOR_JAR_ENV, rel, &full),
            Ok(flag_jar.clone())
        );
        let none = ("--meteor-jar", None);
        assert_eq!(
            find_jar("METEOR", none, METEOR_JAR_ENV, rel, &full),
            Ok(env_jar)
        );
        let pkg_only = env(&[], Ok(pkg.clone()));
        assert_eq!(
            find_jar("METEOR", none, METEOR_JAR_ENV, rel, &pkg_only),
            Ok(pkg.join(rel))
        );

        // A path given but absent is reported as given, not skipped.
        let missing = dir.path().join("missing.jar");
        let err = find_jar(
            "METEOR",
            ("--meteor-jar", Some(&missing)),
            METEOR_JAR_ENV,
            rel,
            &full,
        )
        .unwrap_err();
        assert!(
            err.0
                .starts_with("METEOR needs meteor-1.5.jar: --meteor-jar "),
            "{err}"
        );
        assert!(err.0.contains("missing.jar: no such file"), "{err}");
        let bad_env = env(&[(METEOR_JAR_ENV, "/nonexistent/m.jar")], Ok(pkg.clone()));
        let err = find_jar("METEOR", none, METEOR_JAR_ENV, rel, &bad_env).unwrap_err();
        assert_eq!(
            err.0,
            "METEOR needs meteor-1.5.jar: AUDIOCAP_METEOR_JAR=/nonexistent/m.jar: no such file"
        );

        let nothing = env(&[], Err("python3 has no pycocoevalcap package".into()));
        let err = find_jar("METEOR", none, METEOR_JAR_ENV, rel, &nothing).unwrap_err();
        for part in [
            "METEOR needs meteor-1.5.jar: not found",
            "no --meteor-jar",
            "AUDIOCAP_METEOR_JAR is not set",
            "python3 has no pycocoevalcap",
            "pip install pycocoevalcap",
        ] {
            assert!(err.0.contains(part), "{part}: {err}");
        }
        let empty_pkg = env(&[], Ok(dir.path().join("elsewhere")));
        let err = find_jar("METEOR", none, METEOR_JAR_ENV, rel, &empty_pkg).unwrap_err();
        assert!(err.0.contains("has no meteor/meteor-1.5.jar"), "{err}");
    }

    #[test]
    fn java_discovery_order_and_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("jdk");
        std::fs::create_dir_all(home.join("bin")).unwrap();
        std::fs::write(home.join("bin/java"), b"").unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("java"), b"").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let exec = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(bin.join("java"), exec).unwrap();
        }
        let (home_s, bin_s) = (home.to_str().unwrap(), bin.to_str().unwrap());
        let no_py = || Err("unused".to_string());

        let flagged = JavaPaths {
            java: Some(bin.join("java")),
            ..JavaPaths::default()
        };
        let e = env(&[("JAVA_HOME", home_s)], no_py());
        assert_eq!(find_java(&flagged, &e), Ok(bin.join("java")));
        assert_eq!(
            find_java(&JavaPaths::default(), &e),
            Ok(home.join("bin/java"))
        );
        let e = env(&[("PATH", bin_s)], no_py());
        assert_eq!(find_java(&JavaPaths::default(), &e), Ok(bin.join("java")));

        let e = env(
            &[("JAVA_HOME", "/nonexistent/jdk"), ("PATH", "/nonexistent")],
            no_py(),
        );
        let err = find_java(&JavaPaths::default(), &e).unwrap_err();
        assert!(
            err.0.contains("/nonexistent/jdk/bin/java does not exist"),
            "{err}"
        );
        assert!(err.0.contains("no java on PATH"), "{err}");
        let missing = JavaPaths {
            java: Some(dir.path().join("nope")),
            ..JavaPaths::default()
        };
        let err = find_java(&missing, &e).unwrap_err();
        assert!(
            err.0.starts_with("--java ") && err.0.ends_with("nope: no such file"),
            "{err}"
        );
    }

    #[test]
    fn tails_keep_the_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let tail = tail_of(&text);
        assert!(tail.starts_with("line 25 | "), "{tail}");
        assert!(tail.ends_with("line 39"), "{tail}");
        assert_eq!(tail_of("\n \n"), "(empty)");
        let mut collected = Tail::collect(std::io::Cursor::new(text.into_bytes()));
        assert_eq!(collected.finish(), tail);
    }
}
