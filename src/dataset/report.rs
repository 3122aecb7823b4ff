//! The dataset's state as text and JSON: the shard table of a [`DatasetStatus`]
//! ([`render_status`]) and what a finalize did ([`render_finalize`], [`finalize_json`]).

use serde::Serialize;

use super::{DatasetStatus, FinalizeOutcome, MANIFEST_FILE, SUCCESS_FILE, ShardState};

/// A [`FinalizeOutcome`] as JSON: `outcome` (`finalized`, `already_finalized`,
/// `incomplete` or `inconsistent`) beside the manifest's or the status's fields.
pub fn finalize_json(outcome: &FinalizeOutcome) -> serde_json::Result<serde_json::Value> {
    #[derive(Serialize)]
    struct Report<'a, T: Serialize> {
        outcome: &'a str,
        #[serde(flatten)]
        detail: &'a T,
    }
    match outcome {
        FinalizeOutcome::Finalized(m) => serde_json::to_value(Report {
            outcome: "finalized",
            detail: m,
        }),
        FinalizeOutcome::AlreadyFinalized(m) => serde_json::to_value(Report {
            outcome: "already_finalized",
            detail: m,
        }),
        FinalizeOutcome::Incomplete(s) => serde_json::to_value(Report {
            outcome: "incomplete",
            detail: s,
        }),
        FinalizeOutcome::Inconsistent(s) => serde_json::to_value(Report {
            outcome: "inconsistent",
            detail: s,
        }),
    }
}

/// What a finalize did, for the terminal: one line when the dataset is finalized,
/// the [`render_status`] text when it is not.
pub fn render_finalize(uri: &str, outcome: &FinalizeOutcome) -> String {
    match outcome {
        FinalizeOutcome::Finalized(m) | FinalizeOutcome::AlreadyFinalized(m) => {
            let done = if matches!(outcome, FinalizeOutcome::Finalized(_)) {
                "finalized"
            } else {
                "already finalized (unchanged)"
            };
            let mut out = format!(
                "{uri}: {done}: {} shards, {} parts, {} rows ({} with errors), {}; {} then {} written last\n",
                m.shard_count,
                m.parts.len(),
                m.rows,
                m.error_rows,
                bytes_text(m.bytes),
                MANIFEST_FILE,
                SUCCESS_FILE,
            );
            if !m.error_rows_by_kind.is_empty() {
                let kinds = kinds_text(&m.error_rows_by_kind);
                out.push_str(&format!("error rows by kind: {kinds}\n"));
            }
            out
        }
        FinalizeOutcome::Incomplete(s) | FinalizeOutcome::Inconsistent(s) => render_status(uri, s),
    }
}

/// `not_found 3, too_short 1`: most first, then by name.
fn kinds_text(kinds: &std::collections::BTreeMap<String, u64>) -> String {
    let mut sorted: Vec<(&String, &u64)> = kinds.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    sorted
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
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
pub fn render_status(uri: &str, status: &DatasetStatus) -> String {
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
    if !status.error_rows_by_kind.is_empty() {
        out.push_str(&format!(
            "error rows by kind: {}\n",
            kinds_text(&status.error_rows_by_kind)
        ));
    }
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
