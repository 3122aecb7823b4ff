//! SPICE through `spice-1.0.jar`, invoked as aac-metrics 0.6.0 invokes it: the
//! captions (PTB-tokenized) go into a JSON input file
//! (`[{"image_id": i, "test": candidate, "refs": [...]}, ...]`), the jar runs once
//! (`-cache DIR -out FILE -subset -silent`, `-Xmx8G`) and writes one entry per
//! candidate with its scores per tuple category; the candidate's SPICE is
//! `scores.All.f` and the corpus SPICE their mean.
//!
//! The jar needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on
//! first use into `spice/lib/`; they are looked for there or in `--corenlp-dir`. The
//! jar pretty-prints its output with the Nashorn JavaScript engine, which Java 15
//! removed: with a newer Java, a `nashorn-core` jar (and its `asm` jars) must be in
//! the CoreNLP folder, which is on the class path.
//!
//! SPIDEr is (CIDEr-D + SPICE) / 2, per candidate and for the corpus.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::jvm::{self, Environment, JavaError, JavaPaths, Unavailable};
use super::{check_pairs, tokenize};

const TOOL: &str = "SPICE";

/// Where the SPICE jar lives inside the `pycocoevalcap` package.
pub const PYCOCOEVALCAP_JAR: &str = "spice/spice-1.0.jar";
/// The CoreNLP jars SPICE's parser needs.
pub const CORENLP_JARS: [&str; 2] = [
    "stanford-corenlp-3.6.0.jar",
    "stanford-corenlp-3.6.0-models.jar",
];
/// The jar's entry point (named so the CoreNLP folder can be added to the class path).
const MAIN_CLASS: &str = "edu.anu.spice.SpiceScorer";
/// First Java without the Nashorn engine.
const JAVA_WITHOUT_NASHORN: u32 = 15;

/// How to run SPICE.
#[derive(Debug, Clone, PartialEq)]
pub struct SpiceSetup {
    pub java: PathBuf,
    pub jar: PathBuf,
    /// The folder holding the CoreNLP jars; every jar in it goes on the class path.
    pub corenlp_dir: PathBuf,
    /// JVM heap limit (`-Xmx`), `8G` as in the reference.
    pub max_memory: String,
    /// `-threads` (the jar's default: one per processor).
    pub threads: Option<usize>,
}

impl SpiceSetup {
    /// Finds the jar (`--spice-jar`, `AUDIOCAP_SPICE_JAR`, pycocoevalcap), the CoreNLP
    /// jars (`--corenlp-dir`, `AUDIOCAP_CORENLP_DIR`, the jar's `lib/`) and a Java
    /// that can run it.
    pub fn discover(paths: &JavaPaths, env: &Environment) -> Result<Self, Unavailable> {
        let jar = jvm::find_jar(
            TOOL,
            ("--spice-jar", paths.spice_jar.as_deref()),
            jvm::SPICE_JAR_ENV,
            PYCOCOEVALCAP_JAR,
            env,
        )?;
        let corenlp_dir = match (&paths.corenlp_dir, (env.var)(jvm::CORENLP_DIR_ENV)) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) => PathBuf::from(dir),
            (None, None) => jar.parent().unwrap_or(Path::new(".")).join("lib"),
        };
        let missing: Vec<String> = CORENLP_JARS
            .iter()
            .map(|name| corenlp_dir.join(name))
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Unavailable(format!(
                "SPICE needs the Stanford CoreNLP 3.6.0 jars: {} not found (they are in \
                 stanford-corenlp-full-2015-12-09.zip; put them there or pass --corenlp-dir)",
                missing.join(" and ")
            )));
        }
        let java = jvm::find_java(paths, env)
            .map_err(|e| Unavailable(format!("SPICE needs Java: {e}")))?;
        if let Some(version) = jvm::java_major_version(&java)
            && version >= JAVA_WITHOUT_NASHORN
            && !has_nashorn(&corenlp_dir)
        {
            return Err(Unavailable(format!(
                "spice-1.0.jar writes its output with the Nashorn JavaScript engine, which \
                 Java 15 and later lack; {} is Java {version}: pass --java with a Java 8-14 \
                 runtime, or put nashorn-core and its asm jars in {}",
                java.display(),
                corenlp_dir.display()
            )));
        }
        Ok(SpiceSetup {
            java,
            jar,
            corenlp_dir,
            max_memory: "8G".to_string(),
            threads: None,
        })
    }

    /// The `java` arguments for one run.
    fn args(&self, input: &Path, output: &Path, cache: &Path) -> Vec<std::ffi::OsString> {
        let classpath = format!(
            "{}{}{}",
            self.jar.display(),
            if cfg!(windows) { ";" } else { ":" },
            self.corenlp_dir.join("*").display()
        );
        let mut args: Vec<std::ffi::OsString> = vec![
            format!("-Xmx{}", self.max_memory).into(),
            "-cp".into(),
            classpath.into(),
            MAIN_CLASS.into(),
            input.into(),
            "-cache".into(),
            cache.into(),
            "-out".into(),
            output.into(),
            "-subset".into(),
            "-silent".into(),
        ];
        if let Some(threads) = self.threads {
            args.push("-threads".into());
            args.push(threads.to_string().into());
        }
        args
    }
}

fn has_nashorn(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().to_lowercase();
            name.starts_with("nashorn") && name.ends_with(".jar")
        })
    })
}

/// SPICE of a corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct SpiceScores {
    /// Mean of the per-candidate scores (NaN if one is NaN, as numpy's mean in the
    /// reference).
    pub corpus: f64,
    /// `scores.All.f` of each candidate, in input order (NaN where the jar wrote null).
    pub per_clip: Vec<f64>,
}

/// SPIDEr from CIDEr-D and SPICE.
pub fn spider(cider_d: f64, spice: f64) -> f64 {
    (cider_d + spice) / 2.0
}

/// Writes the jar's input: one object per candidate, `image_id` its position, the
/// captions PTB-tokenized.
pub fn write_input(
    mut w: impl Write,
    candidates: &[String],
    references: &[Vec<String>],
) -> std::io::Result<()> {
    let joined = |text: &str| tokenize(text).join(" ");
    let items: Vec<Value> = candidates
        .iter()
        .zip(references)
        .enumerate()
        .map(|(i, (c, rs))| {
            json!({
                "image_id": i,
                "test": joined(c),
                "refs": rs.iter().map(|r| joined(r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::to_writer_pretty(&mut w, &items)?;
    w.write_all(b"\n")
}

/// Reads the jar's output for `n` candidates.
pub fn parse_output(text: &str, n: usize) -> Result<SpiceScores, String> {
    let items: Vec<Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array: {e}"))?;
    if items.len() != n {
        return Err(format!("{} entries for {n} candidates", items.len()));
    }
    let mut per_clip: Vec<Option<f64>> = vec![None; n];
    for item in &items {
        let id = item["image_id"]
            .as_u64()
            .and_then(|id| usize::try_from(id).ok())
            .filter(|&id| id < n)
            .ok_or_else(|| format!("entry with image_id {} (expected 0..{n})", item["image_id"]))?;
        let f = &item["scores"]["All"]["f"];
        let value = match f {
            // json-simple writes NaN as null.
            Value::Null if item["scores"]["All"].is_object() => f64::NAN,
            Value::Number(v) => v.as_f64().unwrap_or(f64::NAN),
            _ => return Err(format!("image_id {id} has no scores.All.f")),
        };
        if per_clip[id].replace(value).is_some() {
            return Err(format!("image_id {id} appears twice"));
        }
    }
    let per_clip: Vec<f64> = per_clip
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect();
    let corpus = per_clip.iter().sum::<f64>() / n as f64;
    Ok(SpiceScores { corpus, per_clip })
}

/// Runs the jar once over the corpus, in a scratch folder under the system's temporary
/// directory (input, output and the parse cache), removed afterwards.
pub fn spice(
    setup: &SpiceSetup,
    candidates: &[String],
    references: &[Vec<String>],
) -> Result<SpiceScores, JavaError> {
    check_pairs(candidates, references)?;
    let scratch = ScratchDir::create()?;
    let result = run_in(setup, &scratch.0, candidates, references);
    drop(scratch);
    result
}

fn run_in(
    setup: &SpiceSetup,
    dir: &Path,
    candidates: &[String],
    references: &[Vec<String>],
) -> Result<SpiceScores, JavaError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JavaError::Io { path, source }
    };
    let input = dir.join("input.json");
    let output = dir.join("output.json");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    let file = std::fs::File::create(&input).map_err(io(&input))?;
    write_input(std::io::BufWriter::new(file), candidates, references).map_err(io(&input))?;

    let out = Command::new(&setup.java)
        .args(setup.args(&input, &output, &cache))
        .output()
        .map_err(|source| JavaError::Spawn {
            program: setup.java.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(JavaError::Ended {
            tool: TOOL,
            status: format!("exit {}", out.status),
            stderr: jvm::tail_of(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    let text = std::fs::read_to_string(&output).map_err(io(&output))?;
    parse_output(&text, candidates.len()).map_err(|what| JavaError::Output {
        tool: TOOL,
        path: output.clone(),
        what: format!(
            "{what}; stderr: {}",
            jvm::tail_of(&String::from_utf8_lossy(&out.stderr))
        ),
    })
}

/// A folder of our own under the temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<Self, JavaError> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        for attempt in 0..100u32 {
            let dir = base.join(format!(
                "audiocap-spice-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(ScratchDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(JavaError::Io { path: dir, source }),
            }
        }
        Err(JavaError::Io {
            path: base,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "no free scratch folder name",
            ),
        })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch folder is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output as spice-1.0.jar writes it with `-subset` (JSON.stringify with indent 2;
    /// categories in HashMap order; json-simple writes NaN as null; whole doubles
    /// print without a fraction).
    const SAMPLE: &str = r#"[
  {
    "image_id": 1,
    "scores": {
      "Relation": {"tp": 0, "fp": 1, "fn": 2, "f": 0, "pr": 0, "re": 0, "wtp": 0, "wfp": 1, "wfn": 2, "wf": 0, "wpr": 0, "wre": 0},
      "Cardinality": {"tp": 0, "fp": 0, "fn": 0, "f": null, "pr": null, "re": null, "wtp": 0, "wfp": 0, "wfn": 0, "wf": null, "wpr": null, "wre": null},
      "Attribute": {"tp": 0, "fp": 0, "fn": 1, "f": 0, "pr": 0, "re": 0, "wtp": 0, "wfp": 0, "wfn": 1, "wf": 0, "wpr": 0, "wre": 0},
      "Size": {"tp": 0, "fp": 0, "fn": 0, "f": null, "pr": null, "re": null, "wtp": 0, "wfp": 0, "wfn": 0, "wf": null, "wpr": null, "wre": null},
      "All": {
        "tp": 2,
        "fp": 3,
        "fn": 4,
        "f": 0.36363636363636365,
        "pr": 0.4,
        "re": 0.3333333333333333,
        "wtp": 2,
        "wfp": 3,
        "wfn": 4,
        "wf": 0.36363636363636365,
        "wpr": 0.4,
        "wre": 0.3333333333333333
      },
      "Color": {"tp": 0, "fp": 0, "fn": 0, "f": null, "pr": null, "re": null, "wtp": 0, "wfp": 0, "wfn": 0, "wf": null, "wpr": null, "wre": null},
      "Object": {"tp": 2, "fp": 2, "fn": 1, "f": 0.5714285714285715, "pr": 0.5, "re": 0.6666666666666666, "wtp": 2, "wfp": 2, "wfn": 1, "wf": 0.5714285714285715, "wpr": 0.5, "wre": 0.6666666666666666}
    }
  },
  {
    "image_id": 0,
    "scores": {
      "All": {"tp": 1, "fp": 1, "fn": 3, "f": 0.3333333333333333, "pr": 0.5, "re": 0.25, "wtp": 1, "wfp": 1, "wfn": 3, "wf": 0.3333333333333333, "wpr": 0.5, "wre": 0.25},
      "Object": {"tp": 1, "fp": 0, "fn": 1, "f": 0.6666666666666666, "pr": 1, "re": 0.5, "wtp": 1, "wfp": 0, "wfn": 1, "wf": 0.6666666666666666, "wpr": 1, "wre": 0.5}
    }
  }
]"#;

    #[test]
    fn output_is_read_by_image_id() {
        let s = parse_output(SAMPLE, 2).unwrap();
        // serde_json's default float parsing may be one ulp off the shortest repr.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert_eq!(s.per_clip.len(), 2);
        assert!(close(s.per_clip[0], 1.0 / 3.0), "{:?}", s.per_clip);
        assert!(close(s.per_clip[1], 4.0 / 11.0), "{:?}", s.per_clip);
        assert!(close(s.corpus, (1.0 / 3.0 + 4.0 / 11.0) / 2.0));
    }

    #[test]
    fn null_all_scores_are_nan_and_poison_the_mean() {
        let text = r#"[{"image_id": 0, "scores": {"All": {"f": null, "pr": null}}},
                       {"image_id": 1, "scores": {"All": {"f": 1}}}]"#;
        let s = parse_output(text, 2).unwrap();
        assert!(s.per_clip[0].is_nan());
        assert_eq!(s.per_clip[1], 1.0);
        assert!(s.corpus.is_nan());
    }

    #[test]
    fn malformed_output_is_an_error() {
        assert!(
            parse_output("", 1)
                .unwrap_err()
                .contains("not a JSON array")
        );
        assert!(
            parse_output(SAMPLE, 3)
                .unwrap_err()
                .contains("2 entries for 3")
        );
        let dup = r#"[{"image_id": 0, "scores": {"All": {"f": 1}}},
                      {"image_id": 0, "scores": {"All": {"f": 1}}}]"#;
        assert!(parse_output(dup, 2).unwrap_err().contains("twice"));
        let range = r#"[{"image_id": 5, "scores": {"All": {"f": 1}}}]"#;
        assert!(parse_output(range, 1).unwrap_err().contains("image_id 5"));
        let no_all = r#"[{"image_id": 0, "scores": {"Object": {"f": 1}}}]"#;
        assert!(
            parse_output(no_all, 1)
                .unwrap_err()
                .contains("scores.All.f")
        );
    }

    #[test]
    fn input_file_holds_tokenized_captions_by_position() {
        let mut buf = Vec::new();
        let candidates = vec!["A dog barks!".to_string(), "Rain, falling.".to_string()];
        let references = vec![
            vec!["The dog's barking.".to_string(), "a dog".to_string()],
            vec!["Heavy rain".to_string()],
        ];
        write_input(&mut buf, &candidates, &references).unwrap();
        let value: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            value,
            json!([
                {"image_id": 0, "test": "a dog barks", "refs": ["the dog 's barking", "a dog"]},
                {"image_id": 1, "test": "rain falling", "refs": ["heavy rain"]},
            ])
        );
    }

    #[test]
    fn spider_is_the_mean_of_cider_d_and_spice() {
        assert_eq!(spider(1.5, 0.25), 0.875);
        assert_eq!(spider(0.0, 0.0), 0.0);
        assert!(spider(1.0, f64::NAN).is_nan());
    }

    #[test]
    fn invocation_matches_the_reference() {
        let setup = SpiceSetup {
            java: "java".into(),
            jar: "/p/spice/spice-1.0.jar".into(),
            corenlp_dir: "/p/spice/lib".into(),
            max_memory: "8G".into(),
            threads: Some(4),
        };
        let args: Vec<String> = setup
            .args(
                Path::new("/t/in.json"),
                Path::new("/t/out.json"),
                Path::new("/t/c"),
            )
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-Xmx8G",
                "-cp",
                "/p/spice/spice-1.0.jar:/p/spice/lib/*",
                "edu.anu.spice.SpiceScorer",
                "/t/in.json",
                "-cache",
                "/t/c",
                "-out",
                "/t/out.json",
                "-subset",
                "-silent",
                "-threads",
                "4"
            ]
        );
    }

    #[test]
    fn missing_corenlp_jars_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let jar = dir.path().join("spice-1.0.jar");
        std::fs::write(&jar, b"jar").unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join(CORENLP_JARS[1]), b"jar").unwrap();
        let paths = JavaPaths {
            spice_jar: Some(jar),
            ..JavaPaths::default()
        };
        let env = Environment {
            var: Box::new(|_| None),
            pycocoevalcap: Box::new(|| Err("unused".into())),
        };
        let err = SpiceSetup::discover(&paths, &env).unwrap_err();
        let expected = lib.join("stanford-corenlp-3.6.0.jar");
        assert!(
            err.0.contains(&format!("{} not found", expected.display())),
            "{err}"
        );
        assert!(!err.0.contains("models.jar not found"), "{err}");
        assert!(err.0.contains("--corenlp-dir"), "{err}");
    }
}
