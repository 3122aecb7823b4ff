//! The container images (issue #22): the CPU image is built here, offline, by
//! `scripts/build-image.sh` (an mmdebstrap base and buildah) around the debug binary
//! this test run built, and run as shipped: `audiocap doctor` finds the library
//! beside the binary, `audiocap run pipelines/demo.toml` captions every sample (the
//! same captions as on the host), every pipeline it carries passes `--check`, and
//! nothing of the build is left in it. The CUDA image is too large to build in CI:
//! its Containerfile and the libraries the script puts in it are checked here, its
//! build runs on demand (`scripts/build-image.sh --gpu`).
//!
//! Needs root, `buildah` and `mmdebstrap` (`.ci/run` installs them); the first run on
//! a machine makes the Debian base (~30 s), later runs reuse it from target/image/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// buildah with the storage driver the build script uses.
fn buildah() -> Command {
    let mut cmd = Command::new("buildah");
    cmd.arg("--storage-driver")
        .arg(std::env::var("STORAGE_DRIVER").unwrap_or_else(|_| "vfs".into()));
    cmd
}

fn buildah_ok(args: &[&str]) -> String {
    let out = buildah()
        .args(args)
        .output()
        .expect("buildah (apt-get install buildah mmdebstrap, as .ci/run does)");
    assert!(out.status.success(), "buildah {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An image built for this test and a working container of it, both removed at the
/// end (buildah's vfs storage holds a full copy of each).
struct Built {
    tag: String,
    container: Option<String>,
}

impl Drop for Built {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = buildah().args(["rm", c]).output();
        }
        let _ = buildah().args(["rmi", &self.tag]).output();
    }
}

impl Built {
    /// `buildah run` in the working container: what `docker run IMAGE ARGS...` runs
    /// (the entrypoint is checked separately), as the image's user, in its workdir.
    fn run(&self, args: &[&str]) -> Output {
        buildah()
            .args(["run", "--isolation", "chroot"])
            .arg(self.container.as_ref().unwrap())
            .arg("--")
            .args(args)
            .output()
            .expect("buildah run")
    }
}

/// The sample clips the image carries (exported_models/samples/*.wav).
fn sample_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("exported_models/samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wav"))
        .collect();
    names.sort();
    names
}

/// file name → caption of a demo dataset, every row captioned and none an error.
fn captions_by_file(dir: &Path) -> BTreeMap<String, String> {
    let rows = crate::pipeline_run::read_dataset(dir);
    let mut by_file = BTreeMap::new();
    for (uri, segment, caption, error) in rows {
        assert_eq!(error, None, "{uri}: an error row");
        assert_eq!(segment, 0, "{uri}: the samples are one segment each");
        let caption = caption.unwrap_or_else(|| panic!("{uri}: no caption"));
        assert!(!caption.trim().is_empty(), "{uri}: empty caption");
        let name = uri.rsplit('/').next().unwrap().to_string();
        assert!(by_file.insert(name, caption).is_none(), "{uri}: two rows");
    }
    by_file
}

/// The `audiocap run` pipelines of `pipelines/` (training files have their own
/// commands and their own test).
pub fn run_pipeline_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".toml") && !name.starts_with("train-") && !name.starts_with("pretrain-")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "demo, s3-archive, long-recordings at least"
    );
    files
}

#[test]
fn cpu_image_builds_offline_and_runs_the_demo_as_shipped() {
    let tag = format!("localhost/audiocap-test:{}-cpu", std::process::id());
    let mut image = Built {
        tag: tag.clone(),
        container: None,
    };
    let started = std::time::Instant::now();
    let build = Command::new(repo().join("scripts/build-image.sh"))
        .args([
            "--cpu",
            "--binary",
            env!("CARGO_BIN_EXE_audiocap"),
            "--tag",
            &tag,
        ])
        .current_dir(repo())
        .output()
        .expect("scripts/build-image.sh");
    assert!(
        build.status.success(),
        "scripts/build-image.sh (needs root, buildah and mmdebstrap: apt-get install buildah \
         mmdebstrap, as .ci/run does): {}",
        text(&build)
    );
    eprintln!("image built in {:.0?}", started.elapsed());

    // What `docker run IMAGE ...` does with it: the entrypoint, a user that is not
    // root, the working directory the pipelines' relative paths need; the labels.
    let inspect: Value =
        serde_json::from_str(&buildah_ok(&["inspect", "--type", "image", &tag])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["audiocap"]));
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(config["WorkingDir"], "/opt/audiocap");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        revision.starts_with(String::from_utf8_lossy(&head.stdout).trim()),
        "revision label {revision}"
    );
    assert_eq!(labels["io.audiocap.onnxruntime.version"], "1.31.1");

    image.container = Some(buildah_ok(&["from", &tag]));
    let id = image.run(&["id", "-u"]);
    assert!(id.status.success(), "buildah run id -u: {}", text(&id));
    assert_eq!(
        String::from_utf8_lossy(&id.stdout).trim(),
        "10001",
        "{}",
        text(&id)
    );

    let doctor = image.run(&["audiocap", "doctor"]);
    let report = text(&doctor);
    assert!(doctor.status.success(), "{report}");
    assert!(
        report.contains("found via:  beside the executable")
            && report.contains("/opt/audiocap/lib/libonnxruntime.so.1.31.1")
            && report.contains("version:    1.31.1"),
        "{report}"
    );

    // Every pipeline the image carries is valid there, its model path included.
    for file in run_pipeline_files() {
        let name = format!("pipelines/{}", file.file_name().unwrap().to_string_lossy());
        let check = image.run(&["audiocap", "run", "--check", &name]);
        assert!(
            check.status.success(),
            "{name} in the image: {}",
            text(&check)
        );
    }

    let started = std::time::Instant::now();
    let demo = image.run(&["audiocap", "run", "pipelines/demo.toml"]);
    assert!(demo.status.success(), "{}", text(&demo));
    eprintln!("demo ran in the image in {:.1?}", started.elapsed());
    let root = PathBuf::from(buildah_ok(&["mount", image.container.as_ref().unwrap()]));
    let in_image = captions_by_file(&root.join("opt/audiocap/target/demo-captions"));
    assert_eq!(
        in_image.keys().cloned().collect::<Vec<_>>(),
        sample_names(),
        "one captioned row per sample"
    );
    // The same binary and library version give the host's captions.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let host = Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .args(["run", "pipelines/demo.toml", "--set"])
        .arg(format!("output.uri={}", out.display()))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(host.status.success(), "{}", text(&host));
    assert_eq!(in_image, captions_by_file(&out));

    // Nothing of the build is left: no toolchain, no package caches or lists, no
    // wheels or Python caches.
    for tool in [
        "usr/bin/gcc",
        "usr/bin/cc",
        "usr/bin/python3",
        "usr/bin/pip3",
        "root/.cargo",
        "root/.cache",
    ] {
        assert!(!root.join(tool).exists(), "{tool} is in the image");
    }
    let leftovers = |dir: &str, allowed: &[&str]| -> Vec<String> {
        std::fs::read_dir(root.join(dir))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| !allowed.contains(&n.as_str()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        leftovers("var/lib/apt/lists", &["lock", "partial"]),
        Vec::<String>::new()
    );
    assert_eq!(
        leftovers("var/cache/apt/archives", &["lock", "partial"]),
        Vec::<String>::new()
    );
    let walk = walk_files(&root.join("opt/audiocap"));
    assert!(
        !walk
            .iter()
            .any(|p| p.ends_with(".whl") || p.contains("__pycache__") || p.ends_with(".pyc")),
        "{walk:?}"
    );
    assert!(
        walk.iter()
            .any(|p| p.ends_with("licenses/onnxruntime/LICENSE")),
        "{walk:?}"
    );
}

fn walk_files(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else {
                files.push(path.display().to_string());
            }
        }
    }
    files
}

/// Each Containerfile line's instruction and its text (continuations joined).
fn instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            let (word, rest) = current
                .trim()
                .split_once(' ')
                .unwrap_or((current.trim(), ""));
            out.push((word.to_string(), rest.trim().to_string()));
            current.clear();
        }
    }
    out
}

/// The CUDA image is built on demand (`scripts/build-image.sh --gpu`, ~3.4 GB): its
/// Containerfile says what the CPU one says (same base argument, user, entrypoint,
/// labels) plus where NVIDIA's libraries are and what the container toolkit must
/// mount, and the script takes every library onnxruntime-gpu's CUDA provider loads
/// from NVIDIA's CUDA 13 wheels.
#[test]
fn cuda_containerfile_carries_what_the_cuda_provider_loads() {
    let cpu = instructions(&repo().join("deploy/image/Containerfile"));
    let cuda = instructions(&repo().join("deploy/image/Containerfile.cuda"));
    let pick = |file: &[(String, String)], word: &str| -> Vec<String> {
        file.iter()
            .filter(|(w, _)| w == word)
            .map(|(_, r)| r.clone())
            .collect()
    };
    for word in ["FROM", "USER", "ENTRYPOINT", "WORKDIR", "COPY", "RUN"] {
        assert_eq!(pick(&cpu, word), pick(&cuda, word), "{word}");
    }
    assert_eq!(cpu[0].0, "ARG");
    assert_eq!(cpu[0], cuda[0], "one BASE argument");
    assert_eq!(
        cpu[0].1, "BASE=docker.io/library/debian:bookworm-slim",
        "Docker users build from the public Debian image"
    );
    assert_eq!(pick(&cuda, "ENTRYPOINT"), ["[\"audiocap\"]"]);
    assert_eq!(pick(&cuda, "USER"), ["10001:10001"]);
    let labels = pick(&cuda, "LABEL").join(" ");
    for key in [
        "org.opencontainers.image.version=\"${VERSION}\"",
        "org.opencontainers.image.revision=\"${REVISION}\"",
        "io.audiocap.onnxruntime.version=\"${ONNXRUNTIME_VERSION}\"",
        "io.audiocap.onnxruntime.package=\"onnxruntime-gpu==${ONNXRUNTIME_VERSION}\"",
    ] {
        assert!(labels.contains(key), "{key} in {labels}");
    }
    let env = pick(&cuda, "ENV").join(" ");
    for setting in [
        "LD_LIBRARY_PATH=/opt/audiocap/lib/cuda",
        "NVIDIA_VISIBLE_DEVICES=all",
        "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
    ] {
        assert!(env.contains(setting), "{setting} in {env}");
    }

    // The wheels: onnxruntime-gpu's `cuda` and `cudnn` extras (nvrtc, runtime, cufft,
    // curand, cudnn) and cuBLAS, which the provider links; CUDA 13 (cu13) only.
    let script = std::fs::read_to_string(repo().join("scripts/build-image.sh")).unwrap();
    let list = script
        .split_once("gpu_wheels=(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list)
        .unwrap();
    let wheels: Vec<&str> = list.split_whitespace().collect();
    assert!(
        wheels.contains(&"\"onnxruntime-gpu==$ort_version\""),
        "{wheels:?}"
    );
    for package in [
        "nvidia-cuda-runtime==13.",
        "nvidia-cuda-nvrtc==13.",
        "nvidia-cublas==13.",
        "nvidia-cufft==12.",
        "nvidia-curand==10.",
        "nvidia-cudnn-cu13==9.",
        "nvidia-nvjitlink==13.",
    ] {
        assert!(
            wheels.iter().any(|w| w.starts_with(package)),
            "{package} in {wheels:?}"
        );
    }
    assert!(!list.contains("cu12"), "{list}");
    let tag = Command::new(repo().join("scripts/build-image.sh"))
        .args(["--gpu", "--print-tag"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&tag.stdout).trim(),
        format!("localhost/audiocap:{}-cuda", env!("CARGO_PKG_VERSION"))
    );
}
