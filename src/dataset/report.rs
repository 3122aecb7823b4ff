//! `audiocap status` and `audiocap finalize`: the dataset a set of shard runs wrote,
//! named by its pipeline file or by its URI.

use std::path::Path as FsPath;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{DatasetStatus, FinalizeOutcome, ShardState, dataset_status, finalize};
use crate::pipeline::PipelineConfig;
use crate::storage::{Location, StorageOptions};

/// Exit code: every shard committed (status) or the dataset finalized (finalize).
pub const COMPLETE: u8 = 0;
/// Exit code: the shards do not make one dataset (several models, settings or shard
/// counts, or committed parts gone); retrying will not help.
pub const INCONSISTENT: u8 = 2;
/// Exit code: some shards are not committed yet; retry once they are.
pub const INCOMPLETE: u8 = 4;

#[derive(clap::Args, Debug)]
pub struct DatasetArgs {
    /// The pipeline file that wrote the dataset (its `[output] uri` and `[storage]`
    /// settings are used), or the dataset's URI (`s3://bucket/captions/`, a folder).
    pub target: String,
    /// With a pipeline file: override a key (`output.uri=s3://other/`), as `run --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// With a URI: an object-store client setting (the `[storage]` keys of a pipeline
    /// file: `endpoint=http://127.0.0.1:9000`, `allow_http=true`, `region=...`).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    pub storage: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The dataset location the arguments name; `Err` holds every problem.
fn location(args: &DatasetArgs) -> Result<Location, Vec<String>> {
    let as_file = FsPath::new(&args.target);
    if args.target.ends_with(".toml") && as_file.is_file() {
        if !args.storage.is_empty() {
            return Err(vec![
                "--storage is for a dataset URI; with a pipeline file, set [storage] keys with --set storage.KEY=VALUE".into(),
            ]);
        }
        let config = PipelineConfig::load(as_file, &args.set).map_err(|e| vec![e.to_string()])?;
        return Location::parse(&config.output.uri, &config.storage)
            .map_err(|e| vec![format!("output.uri: {e}")]);
    }
    if !args.set.is_empty() {
        return Err(vec![format!(
            "--set needs a pipeline file, and {:?} is not one",
            args.target
        )]);
    }
    let options = storage_options(&args.storage)?;
    Location::parse(&args.target, &options).map_err(|e| vec![e.to_string()])
}

/// `KEY=VALUE` pairs as [`StorageOptions`]: values are TOML (`true`, `30`) or bare
/// text; every bad pair is reported.
fn storage_options(pairs: &[String]) -> Result<StorageOptions, Vec<String>> {
    let mut table = toml::Table::new();
    let mut problems = Vec::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            problems.push(format!("--storage {pair:?}: expected KEY=VALUE"));
            continue;
        };
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        table.insert(key.trim().to_string(), value);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    StorageOptions::deserialize(toml::Value::Table(table))
        .map_err(|e| vec![format!("--storage: {}", e.message())])
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `audiocap status`: every shard's state; exit 0 when all are committed.
pub fn status_command(args: &DatasetArgs) -> anyhow::Result<u8> {
    let location = match location(args) {
        Ok(l) => l,
        Err(problems) => return Ok(invalid(&problems)),
    };
    let status = runtime()?.block_on(dataset_status(location.store.as_ref(), &location.prefix))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&location.uri(), &status));
    }
    Ok(status_code(&status))
}

fn status_code(status: &DatasetStatus) -> u8 {
    if !status.problems.is_empty() {
        INCONSISTENT
    } else if status.complete {
        COMPLETE
    } else {
        INCOMPLETE
    }
}

/// `audiocap finalize`: checks every shard and writes the manifest and `_SUCCESS`.
pub fn finalize_command(args: &DatasetArgs) -> anyhow::Result<u8> {
    let location = match location(args) {
        Ok(l) => l,
        Err(problems) => return Ok(invalid(&problems)),
    };
    let uri = location.uri();
    let outcome = runtime()?.block_on(finalize(location.store.as_ref(), &location.prefix))?;
    #[derive(Serialize)]
    struct Report<'a, T: Serialize> {
        outcome: &'a str,
        #[serde(flatten)]
        detail: &'a T,
    }
    let (code, json) = match &outcome {
        FinalizeOutcome::Finalized(m) => (
            COMPLETE,
            serde_json::to_value(Report {
                outcome: "finalized",
                detail: m,
            })?,
        ),
        FinalizeOutcome::AlreadyFinalized(m) => (
            COMPLETE,
            serde_json::to_value(Report {
                outcome: "already_finalized",
                detail: m,
            })?,
        ),
        FinalizeOutcome::Incomplete(s) => (
            INCOMPLETE,
            serde_json::to_value(Report {
                outcome: "incomplete",
                detail: s,
            })?,
        ),
        FinalizeOutcome::Inconsistent(s) => (
            INCONSISTENT,
            serde_json::to_value(Report {
                outcome: "inconsistent",
                detail: s,
            })?,
        ),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(code);
    }
    match &outcome {
        FinalizeOutcome::Finalized(m) | FinalizeOutcome::AlreadyFinalized(m) => {
            let done = if matches!(outcome, FinalizeOutcome::Finalized(_)) {
                "finalized"
            } else {
                "already finalized (unchanged)"
            };
            println!(
                "{uri}: {done}: {} shards, {} parts, {} rows ({} with errors), {}; {} then {} written last",
                m.shard_count,
                m.parts.len(),
                m.rows,
                m.error_rows,
                bytes_text(m.bytes),
                super::MANIFEST_FILE,
                super::SUCCESS_FILE,
            );
        }
        FinalizeOutcome::Incomplete(s) | FinalizeOutcome::Inconsistent(s) => {
            print!("{}", render(&uri, s));
            eprintln!(
                "not finalized: {}",
                if code == INCOMPLETE {
                    "some shards are not committed yet (exit code 4: retry when they are)"
                } else {
                    "the shards do not make one dataset (exit code 2: retrying will not help)"
                }
            );
        }
    }
    Ok(code)
}

fn invalid(problems: &[String]) -> u8 {
    for p in problems {
        eprintln!("error: {p}");
    }
    INCONSISTENT
}

fn bytes_text(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// The status as a summary line, a table of shards and the problems.
pub fn render(uri: &str, status: &DatasetStatus) -> String {
    let Some(n) = status.shard_count else {
        return format!("{uri}: empty (no parts, no commit records)\n");
    };
    let mut out = format!(
        "{uri}: {n} shards: {} committed, {} in progress, {} missing{}; {} rows ({} with errors), {}; {}\n",
        status.count(ShardState::Committed),
        status.count(ShardState::InProgress),
        status.count(ShardState::Missing),
        match status.count(ShardState::Damaged) {
            0 => String::new(),
            d => format!(", {d} damaged"),
        },
        status.rows,
        status.error_rows,
        bytes_text(status.bytes),
        match (status.complete, status.finalized) {
            (_, true) => "finalized",
            (true, false) => "complete, not finalized (run audiocap finalize)",
            (false, false) => "not complete",
        }
    );
    out.push_str("shard  state        runs  parts       rows  errors  size\n");
    for s in &status.shards {
        out.push_str(&format!(
            "{:<6} {:<12} {:>4}  {:>5}  {:>9}  {:>6}  {}\n",
            s.index,
            s.state.to_string(),
            s.committed_runs.len(),
            s.parts,
            s.rows,
            s.error_rows,
            bytes_text(s.bytes)
        ));
        if !s.uncommitted_parts.is_empty() {
            out.push_str(&format!(
                "       not in a commit record yet: {}\n",
                s.uncommitted_parts.join(", ")
            ));
        }
    }
    for p in &status.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}
