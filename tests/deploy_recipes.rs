//! The scale-out recipes in deploy/ (issue #9): the Kubernetes manifests validate
//! against the Kubernetes API schemas (`kubernetes-validate`, strict) and say what the
//! README promises (indexed shards, per-index retries, no retry of configuration
//! errors, finalize after); the AWS Batch definitions, the Slurm scripts and the
//! Airflow DAG parse and map audiocap's exit codes the same way; every recipe runs
//! the image `scripts/build-image.sh --gpu` builds (tests/container_image.rs builds
//! and runs the CPU one), with pipeline files that pass `audiocap run --check`; the
//! DAG runs in a real Airflow. No test writes into the source tree (Python's
//! bytecode caches included).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The YAML documents of a file, as JSON (PyYAML, which `kubernetes-validate`
/// installs).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kubernetes_validate(files: &[&Path]) -> std::process::Output {
    // As a module: pip's console scripts are not always on PATH (pyenv, --user).
    Command::new("python3")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "--kubernetes-version",
            "1.33",
        ])
        .args(files)
        .output()
        .expect("python3")
}

fn exit_codes(rule: &Value) -> Vec<i64> {
    rule["onExitCodes"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn kubernetes_manifests_validate_and_shard_by_index() {
    let captions = deploy().join("kubernetes/captions-job.yaml");
    let finalize = deploy().join("kubernetes/finalize-job.yaml");
    let out = kubernetes_validate(&[&captions, &finalize]);
    assert!(
        out.status.success(),
        "kubernetes-validate (pip install kubernetes-validate, as the README's test command does): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator does reject a broken manifest (so passing means something).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(&captions).unwrap();
    std::fs::write(
        &broken,
        text.replace("completionMode: Indexed", "completionMode: 3"),
    )
    .unwrap();
    assert!(!kubernetes_validate(&[&broken]).status.success());

    let job = &yaml_documents(&captions)[0];
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    assert!(spec["backoffLimitPerIndex"].as_i64().unwrap() >= 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never", "podFailurePolicy needs it");
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    // The shard count given to audiocap is the Job's number of indexes.
    let count = args.iter().position(|a| *a == "--shard-count").unwrap();
    assert_eq!(
        args[count + 1],
        spec["completions"].as_i64().unwrap().to_string()
    );
    assert!(
        !args.contains(&"--shard-index"),
        "the index comes from JOB_COMPLETION_INDEX"
    );
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert!(container["envFrom"][0]["secretRef"]["name"].is_string());
    let rules = spec["podFailurePolicy"]["rules"].as_array().unwrap();
    let fail_index = rules.iter().find(|r| r["action"] == "FailIndex").unwrap();
    assert_eq!(
        fail_index["onExitCodes"]["containerName"],
        container["name"]
    );
    assert_eq!(
        exit_codes(fail_index),
        [2, 3],
        "configuration errors are not retried"
    );
    assert!(
        rules
            .iter()
            .any(|r| r["action"] == "Ignore"
                && r["onPodConditions"][0]["type"] == "DisruptionTarget")
    );

    let job = &yaml_documents(&finalize)[0];
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "finalize");
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    assert_eq!(rules[0]["action"], "FailJob");
    assert_eq!(exit_codes(&rules[0]), [2]);
}

#[test]
fn aws_batch_definitions_pass_the_shard_count_and_do_not_retry_final_exit_codes() {
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(deploy().join("aws-batch").join(name)).unwrap())
            .unwrap()
    };
    let captions = read("job-definition.json");
    let command: Vec<&str> = captions["containerProperties"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "run");
    let count = command.iter().position(|a| *a == "--shard-count").unwrap();
    assert_eq!(command[count + 1], "Ref::shards");
    // Every Ref:: has a default parameter, and every parameter is used.
    let params = captions["parameters"].as_object().unwrap();
    for arg in command.iter().filter_map(|a| a.strip_prefix("Ref::")) {
        assert!(params.contains_key(arg), "Ref::{arg} has no default");
    }
    assert_eq!(
        params.len(),
        command.iter().filter(|a| a.starts_with("Ref::")).count()
    );
    // The first matching rule wins: 2 and 3 exit before the catch-all retry.
    let on_exit = captions["retryStrategy"]["evaluateOnExit"]
        .as_array()
        .unwrap();
    let first_retry = on_exit.iter().position(|r| r["action"] == "RETRY").unwrap();
    let exits: Vec<&str> = on_exit[..first_retry]
        .iter()
        .map(|r| r["onExitCode"].as_str().unwrap())
        .collect();
    assert_eq!(exits, ["2", "3"]);

    let finalize = read("finalize-job-definition.json");
    assert_eq!(finalize["containerProperties"]["command"][0], "finalize");
    let on_exit = finalize["retryStrategy"]["evaluateOnExit"]
        .as_array()
        .unwrap();
    let exits: Vec<&str> = on_exit
        .iter()
        .filter(|r| r["action"] == "EXIT")
        .map(|r| r["onExitCode"].as_str().unwrap())
        .collect();
    assert_eq!(exits, ["2", "4"]);
    let submit = std::fs::read_to_string(deploy().join("aws-batch/submit.sh")).unwrap();
    assert!(submit.contains("--array-properties") && submit.contains("--depends-on"));
}

#[test]
fn slurm_scripts_parse_and_retry_only_transient_failures() {
    for name in ["captions.sbatch", "finalize.sbatch", "submit.sh"] {
        let path = deploy().join("slurm").join(name);
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let captions = std::fs::read_to_string(deploy().join("slurm/captions.sbatch")).unwrap();
    assert!(captions.contains("#SBATCH --array="));
    assert!(captions.contains("#SBATCH --signal=TERM@"));
    assert!(captions.contains("0 | 2 | 3) exit"));
    let submit = std::fs::read_to_string(deploy().join("slurm/submit.sh")).unwrap();
    assert!(submit.contains("--dependency=\"afterany:$array\""));
}

/// The DAG compiles and maps one task per shard and the exit codes as documented.
#[test]
fn airflow_dag_compiles_and_maps_exit_codes() {
    let dag = deploy().join("airflow/audiocap_dag.py");
    // Compiled into a temporary file: `python3 -m py_compile` would write
    // deploy/airflow/__pycache__/ into the source tree.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
        ])
        .arg(&dag)
        .arg(dir.path().join("dag.pyc"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&dag).unwrap();
    assert!(text.contains("caption_shard.expand(index=list(range(SHARDS)))"));
    assert!(text.contains("trigger_rule=\"none_failed\""));
    assert!(text.contains("if code == 2:\n            raise AirflowFailException"));
    assert!(text.contains("if code == 3:\n            raise AirflowSkipException"));
}

/// The `airflow` executable: `AUDIOCAP_AIRFLOW`, else the one scripts/airflow-venv.sh
/// installs into target/airflow-venv (pinned, on first use: ~30 s with pip's cache).
fn airflow() -> PathBuf {
    if let Some(path) = std::env::var_os("AUDIOCAP_AIRFLOW") {
        return path.into();
    }
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/airflow-venv.sh"))
        .output()
        .expect("scripts/airflow-venv.sh");
    assert!(
        out.status.success(),
        "scripts/airflow-venv.sh (installs apache-airflow from PyPI into target/airflow-venv; \
         needs python3 with venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The DAG run by a real Airflow (`airflow dags test`, SQLite) with the bundled model
/// over the bundled samples:
/// two mapped shard tasks, then finalize, and the dataset is finalized with every
/// clip once (~10 s once Airflow is installed; scripts/test-airflow-dag.sh runs only
/// this).
#[test]
fn airflow_runs_the_dag_end_to_end() {
    let airflow = airflow();
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let audio = repo.join("exported_models/samples");
    let out = dir.path().join("captions");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\npath = {:?}\n[input]\nsources = [{:?}]\n[generation]\nmax_new_tokens = 6\n\
             [output]\nuri = {:?}\n[logging]\nprogress = \"off\"\n",
            repo.join("exported_models/audiocap-sounds-small"),
            audio,
            out
        ),
    )
    .unwrap();
    let airflow_cmd = |args: &[&str]| {
        let output = Command::new(&airflow)
            .args(args)
            .env("AIRFLOW_HOME", dir.path().join("airflow"))
            .env("AIRFLOW__CORE__DAGS_FOLDER", deploy().join("airflow"))
            .env("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
            // No deploy/airflow/__pycache__ when Airflow imports the DAG.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("AUDIOCAP_PIPELINE", &pipeline)
            .env("AUDIOCAP_SHARDS", "2")
            .env("AUDIOCAP_BIN", env!("CARGO_BIN_EXE_audiocap"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "airflow {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    airflow_cmd(&["db", "migrate"]);
    let log = airflow_cmd(&["dags", "test", "audiocap_captions"]);
    assert!(log.contains("state=success"), "{log}");
    assert!(out.join("_SUCCESS").exists());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shard_count"], 2);
    let clips = std::fs::read_dir(&audio)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wav")
        })
        .count();
    assert_eq!(manifest["error_rows"], 0);
    assert_eq!(manifest["rows"].as_u64().unwrap() as usize, clips);
}

/// The image every recipe names: `scripts/build-image.sh --gpu`'s, pushed to the
/// user's registry (the name and tag kept, the registry theirs).
fn image_name() -> String {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image.sh"))
        .args(["--gpu", "--print-tag"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tag = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        tag,
        format!("localhost/audiocap:{}-cuda", env!("CARGO_PKG_VERSION"))
    );
    tag.trim_start_matches("localhost/").to_string()
}

#[test]
fn every_recipe_runs_the_image_the_script_builds() {
    let image = image_name();
    let pushed = |reference: &str, what: &str| {
        let (registry, name) = reference.split_once('/').unwrap();
        assert!(
            registry.contains('.'),
            "{what}: {reference} names no registry"
        );
        assert_eq!(name, image, "{what}");
    };
    for file in ["captions-job.yaml", "finalize-job.yaml"] {
        let job = &yaml_documents(&deploy().join("kubernetes").join(file))[0];
        let container = &job["spec"]["template"]["spec"]["containers"][0];
        pushed(container["image"].as_str().unwrap(), file);
        // The pipeline comes from the ConfigMap made of pipelines/s3-archive.toml.
        assert_eq!(container["args"][1], "/etc/audiocap/pipeline.toml");
        assert!(
            container.get("workingDir").is_none(),
            "{file}: the image's working directory holds the model the pipeline names"
        );
    }
    let captions = std::fs::read_to_string(deploy().join("kubernetes/captions-job.yaml")).unwrap();
    assert!(captions.contains("--from-file=pipeline.toml=pipelines/s3-archive.toml"));
    assert!(captions.contains(&format!("buildah push localhost/{image} docker://")));

    for file in ["job-definition.json", "finalize-job-definition.json"] {
        let def: Value =
            serde_json::from_slice(&std::fs::read(deploy().join("aws-batch").join(file)).unwrap())
                .unwrap();
        pushed(def["containerProperties"]["image"].as_str().unwrap(), file);
        assert!(
            def["containerProperties"]["jobRoleArn"].is_string(),
            "credentials: the job role"
        );
    }
    let def: Value = serde_json::from_slice(
        &std::fs::read(deploy().join("aws-batch/job-definition.json")).unwrap(),
    )
    .unwrap();
    // The default pipeline is the image's copy of pipelines/s3-archive.toml.
    let pipeline = def["parameters"]["pipeline"].as_str().unwrap();
    let in_repo = pipeline.strip_prefix("/opt/audiocap/").unwrap();
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(in_repo)
            .is_file(),
        "{pipeline}"
    );

    let sif = format!("{}.sif", image.replace(':', "-"));
    for file in ["captions.sbatch", "finalize.sbatch"] {
        let text = std::fs::read_to_string(deploy().join("slurm").join(file)).unwrap();
        assert!(
            text.contains(&format!("image=${{AUDIOCAP_IMAGE:-{sif}}}")),
            "{file}"
        );
        assert!(
            text.contains("srun apptainer exec ")
                && text
                    .contains("--pwd /opt/audiocap --bind \"$(dirname \"$PIPELINE\")\" \"$image\""),
            "{file}"
        );
    }
    let captions = std::fs::read_to_string(deploy().join("slurm/captions.sbatch")).unwrap();
    assert!(captions.contains("apptainer exec --nv"), "the GPU");
}

/// Every `audiocap run` pipeline file (pipelines/, and any in deploy/) passes
/// `audiocap run --check`, model included, from the repository root as from the
/// image's working directory (tests/container_image.rs checks them there).
#[test]
fn every_run_pipeline_passes_check_with_its_model() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = crate::container_image::run_pipeline_files();
    let mut stack = vec![deploy()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    for file in &files {
        let out = Command::new(env!("CARGO_BIN_EXE_audiocap"))
            .args(["run", "--check"])
            .arg(file.strip_prefix(repo).unwrap())
            .current_dir(repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
