//! METEOR 1.5 through the official jar, driven as pycocoevalcap and aac-metrics 0.6.0
//! drive it: one JVM (`java -Xmx2G -jar meteor-1.5.jar - - -stdio -l en -norm`) scores
//! every caption of an evaluation over stdin/stdout.
//!
//! The `-stdio` protocol: for each candidate, the line
//! `SCORE ||| ref 1 ||| … ||| ref N ||| candidate` is answered by one line of
//! sufficient statistics; then `EVAL ||| stats 1 ||| … ||| stats M` is answered by M
//! per-candidate scores and one corpus score (computed from the summed statistics, not
//! the mean of the per-candidate scores). Captions are PTB-tokenized first, like the
//! other metrics.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::jvm::{self, Environment, JavaError, JavaPaths, Tail, Unavailable};
use super::{check_pairs, tokenize};

const TOOL: &str = "METEOR";

/// Where the METEOR jar lives inside the `pycocoevalcap` package.
pub const PYCOCOEVALCAP_JAR: &str = "meteor/meteor-1.5.jar";

/// How to run METEOR.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteorSetup {
    pub java: PathBuf,
    pub jar: PathBuf,
    /// JVM heap limit (`-Xmx`), `2G` as in the reference.
    pub max_memory: String,
    /// A JVM that prints nothing for this long is killed and METEOR reported
    /// unavailable, so a hung jar cannot hang the evaluation.
    pub stall_timeout: Duration,
}

/// Default [`MeteorSetup::stall_timeout`]: loading the paraphrase table takes ~15 s,
/// after which answers come line by line.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(300);

impl MeteorSetup {
    /// Finds Java and the jar (see [`jvm::find_java`], [`jvm::find_jar`]) and checks
    /// that the English paraphrase table the jar loads (`data/paraphrase-en.gz` next to
    /// it) is there.
    pub fn discover(paths: &JavaPaths, env: &Environment) -> Result<Self, Unavailable> {
        let jar = jvm::find_jar(
            TOOL,
            ("--meteor-jar", paths.meteor_jar.as_deref()),
            jvm::METEOR_JAR_ENV,
            PYCOCOEVALCAP_JAR,
            env,
        )?;
        let table = paraphrase_table(&jar);
        if !table.is_file() {
            return Err(Unavailable(format!(
                "METEOR needs its paraphrase table {} (next to {}, as pycocoevalcap \
                 installs it)",
                table.display(),
                jar.display()
            )));
        }
        let java = jvm::find_java(paths, env)
            .map_err(|e| Unavailable(format!("METEOR needs Java: {e}")))?;
        Ok(MeteorSetup {
            java,
            jar,
            max_memory: "2G".to_string(),
            stall_timeout: STALL_TIMEOUT,
        })
    }
}

/// The jar resolves its English paraphrase table relative to its own location.
fn paraphrase_table(jar: &Path) -> PathBuf {
    jar.parent()
        .unwrap_or(Path::new("."))
        .join("data/paraphrase-en.gz")
}

/// METEOR of a corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteorScores {
    /// The jar's corpus score (from the statistics summed over all candidates).
    pub corpus: f64,
    /// One score per candidate, in input order.
    pub per_clip: Vec<f64>,
}

/// A running METEOR JVM. It can score several corpora in turn; it is stopped when
/// dropped.
pub struct Meteor {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Tail,
    watchdog: Watchdog,
}

/// Kills the JVM when it prints nothing for too long (a hung JVM would otherwise
/// block the read forever).
struct Watchdog {
    started: Instant,
    /// Milliseconds after `started` of the last output line.
    last_output_ms: Arc<AtomicU64>,
    /// Set when the watchdog killed the JVM.
    fired: Arc<AtomicBool>,
    /// Set when the JVM is done with; the watchdog thread then exits.
    done: Arc<AtomicBool>,
    timeout: Duration,
}

impl Watchdog {
    fn start(pid: u32, timeout: Duration) -> Self {
        let started = Instant::now();
        let last_output_ms = Arc::new(AtomicU64::new(0));
        let fired = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (last, fire, stop) = (last_output_ms.clone(), fired.clone(), done.clone());
        std::thread::spawn(move || {
            let tick = Duration::from_millis(100).min(timeout);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                let quiet = (started.elapsed().as_millis() as u64)
                    .saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= timeout.as_millis() as u64 && !stop.load(Ordering::Relaxed) {
                    fire.store(true, Ordering::Relaxed);
                    // The child is owned by the reading thread; signal it by pid.
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    return;
                }
            }
        });
        Watchdog {
            started,
            last_output_ms,
            fired,
            done,
            timeout,
        }
    }

    fn output_seen(&self) {
        self.last_output_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

impl Meteor {
    /// Starts the JVM. It loads its paraphrase table (~15 s) before the first answer.
    pub fn start(setup: &MeteorSetup) -> Result<Self, JavaError> {
        let mut child = Command::new(&setup.java)
            .arg(format!("-Xmx{}", setup.max_memory))
            .arg("-jar")
            .arg(&setup.jar)
            .args(["-", "-", "-stdio", "-l", "en", "-norm"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| JavaError::Spawn {
                program: setup.java.clone(),
                source,
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(JavaError::Ended {
                tool: TOOL,
                status: "its pipes could not be opened".to_string(),
                stderr: String::new(),
            });
        };
        let watchdog = Watchdog::start(child.id(), setup.stall_timeout);
        Ok(Meteor {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            stderr: Tail::collect(stderr),
            watchdog,
        })
    }

    /// Scores raw captions: `references[i]` are the references of `candidates[i]`.
    pub fn score(
        &mut self,
        candidates: &[String],
        references: &[Vec<String>],
    ) -> Result<MeteorScores, JavaError> {
        check_pairs(candidates, references)?;
        let lines: Vec<String> = candidates
            .iter()
            .zip(references)
            .map(|(c, rs)| score_line(c, rs))
            .collect();
        let result = self.exchange(&lines);
        if result.is_err() {
            // A JVM that broke the protocol cannot be trusted with another corpus.
            self.stop();
        }
        result
    }

    fn exchange(&mut self, lines: &[String]) -> Result<MeteorScores, JavaError> {
        let Some(stdin) = self.stdin.take() else {
            return Err(self.ended("it was stopped after an earlier error".to_string()));
        };
        // The SCORE lines are written from a second thread while this one reads the
        // answers, so neither side waits on a full pipe.
        let stats = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let mut w = std::io::BufWriter::new(stdin);
                let written = lines.iter().try_for_each(|line| {
                    w.write_all(line.as_bytes())?;
                    w.write_all(b"\n")
                });
                match written.and_then(|()| w.flush()) {
                    Ok(()) => w.into_inner().map_err(|e| e.into_error()),
                    Err(e) => Err(e),
                }
            });
            let mut stats = Vec::with_capacity(lines.len());
            for _ in lines {
                let line = self.read_line()?;
                if !is_stats(&line) {
                    return Err(self.protocol(line, "a line of statistics"));
                }
                stats.push(line);
            }
            match writer.join() {
                Ok(Ok(stdin)) => {
                    self.stdin = Some(stdin);
                    Ok(stats)
                }
                Ok(Err(e)) => Err(self.ended(format!("writing to it failed: {e}"))),
                Err(_) => Err(self.ended("the writer thread panicked".to_string())),
            }
        })?;

        let mut eval = String::with_capacity(stats.iter().map(|s| s.len() + 5).sum::<usize>() + 6);
        eval.push_str("EVAL");
        for s in &stats {
            eval.push_str(" ||| ");
            eval.push_str(s);
        }
        eval.push('\n');
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(eval.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Ok(()),
        };
        if let Err(e) = written {
            return Err(self.ended(format!("writing to it failed: {e}")));
        }

        let mut per_clip = Vec::with_capacity(stats.len());
        for _ in 0..stats.len() {
            per_clip.push(self.read_score("a segment score")?);
        }
        let corpus = self.read_score("the corpus score")?;
        Ok(MeteorScores { corpus, per_clip })
    }

    fn read_line(&mut self) -> Result<String, JavaError> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) if self.watchdog.fired.load(Ordering::Relaxed) => Err(self.ended(format!(
                "no output for {} s, killed",
                self.watchdog.timeout.as_secs_f64()
            ))),
            Ok(0) => Err(self.ended("end of output".to_string())),
            Ok(_) => {
                self.watchdog.output_seen();
                Ok(line.trim().to_string())
            }
            Err(e) => Err(self.ended(format!("reading its output failed: {e}"))),
        }
    }

    fn read_score(&mut self, expected: &'static str) -> Result<f64, JavaError> {
        let line = self.read_line()?;
        match line.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(self.protocol(line, expected)),
        }
    }

    /// Stops the JVM and describes how it ended.
    fn ended(&mut self, what: String) -> JavaError {
        let status = self.stop();
        JavaError::Ended {
            tool: TOOL,
            status: format!("{what}; {status}"),
            stderr: self.stderr.finish(),
        }
    }

    fn protocol(&mut self, line: String, expected: &'static str) -> JavaError {
        self.stop();
        JavaError::Protocol {
            tool: TOOL,
            line,
            expected,
            stderr: self.stderr.finish(),
        }
    }

    /// Closes stdin, kills the JVM if it still runs, and returns its exit status.
    fn stop(&mut self) -> String {
        self.watchdog.done.store(true, Ordering::Relaxed);
        self.stdin = None;
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("exit {status}");
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => format!("exit {status}"),
            Err(e) => format!("exit status unknown: {e}"),
        }
    }
}

impl Drop for Meteor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs one JVM over one corpus.
pub fn meteor(
    setup: &MeteorSetup,
    candidates: &[String],
    references: &[Vec<String>],
) -> Result<MeteorScores, JavaError> {
    Meteor::start(setup)?.score(candidates, references)
}

/// One `SCORE` line. Captions are tokenized and joined by single spaces; `|||` is
/// removed from every segment (the reference removes it from the candidate only, but a
/// reference holding it would shift the fields).
fn score_line(candidate: &str, references: &[String]) -> String {
    let mut line = String::from("SCORE");
    for r in references {
        line.push_str(" ||| ");
        line.push_str(&segment(r));
    }
    line.push_str(" ||| ");
    line.push_str(&segment(candidate));
    line
}

fn segment(text: &str) -> String {
    tokenize(text)
        .iter()
        .map(|t| t.replace("|||", ""))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A statistics line is a list of numbers.
fn is_stats(line: &str) -> bool {
    !line.is_empty() && line.split_whitespace().all(|v| v.parse::<f64>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_jvm_that_hangs_is_killed_and_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Stands in for a JVM that never answers.
        let java = dir.path().join("java");
        std::fs::write(&java, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&java, std::fs::Permissions::from_mode(0o755)).unwrap();
        let setup = MeteorSetup {
            java,
            jar: dir.path().join("meteor-1.5.jar"),
            max_memory: "2G".into(),
            stall_timeout: Duration::from_millis(300),
        };
        let started = Instant::now();
        let err = meteor(&setup, &["a dog barks".into()], &[vec!["a dog".into()]]).unwrap_err();
        assert!(
            err.to_string().contains("no output for 0.3 s, killed"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn score_lines_follow_the_protocol() {
        let refs = vec!["A dog barks.".to_string(), "The dog's bark".to_string()];
        assert_eq!(
            score_line("A dog  is barking!", &refs),
            "SCORE ||| a dog barks ||| the dog 's bark ||| a dog is barking"
        );
        // An empty candidate leaves an empty last field, as the reference sends it.
        assert_eq!(score_line("...", &refs[..1]), "SCORE ||| a dog barks ||| ");
        // The field separator cannot be smuggled in by a caption.
        let line = score_line("a ||| b", &["c|||d".to_string()]);
        assert_eq!(line.matches("|||").count(), 2, "{line}");
    }

    #[test]
    fn statistics_lines() {
        assert!(is_stats("9.0 7.0 4.0 3.0 1.0 1.0 2.0 2.0 0.0"));
        assert!(!is_stats(""));
        assert!(!is_stats("Exception in thread main"));
    }

    #[test]
    fn paraphrase_table_is_next_to_the_jar() {
        assert_eq!(
            paraphrase_table(Path::new("/x/meteor/meteor-1.5.jar")),
            Path::new("/x/meteor/data/paraphrase-en.gz")
        );
    }
}
