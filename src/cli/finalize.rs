//! `audiocap finalize`: the dataset-level commit; exit 0 when finalized (now or
//! before), 4 when shards are not committed yet, 2 when they do not make one dataset.

use audiocap::dataset::{FinalizeOutcome, finalize, finalize_json, render_finalize};

use super::dataset::{DatasetArgs, runtime};
use super::exit::Exit;

pub fn run(args: DatasetArgs) -> anyhow::Result<Exit> {
    let location = match args.location() {
        Ok(l) => l,
        Err(exit) => return Ok(exit),
    };
    let uri = location.uri();
    let outcome = runtime()?.block_on(finalize(location.store.as_ref(), &location.prefix))?;
    let exit = match &outcome {
        FinalizeOutcome::Finalized(_) | FinalizeOutcome::AlreadyFinalized(_) => Exit::Ok,
        FinalizeOutcome::Incomplete(_) => Exit::Incomplete,
        FinalizeOutcome::Inconsistent(_) => Exit::Inconsistent,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&finalize_json(&outcome)?)?
        );
        return Ok(exit);
    }
    print!("{}", render_finalize(&uri, &outcome));
    match exit {
        Exit::Incomplete => eprintln!(
            "not finalized: some shards are not committed yet (exit code {}: retry when they are)",
            exit.code()
        ),
        Exit::Inconsistent => eprintln!(
            "not finalized: the shards do not make one dataset (exit code {}: retrying will not help)",
            exit.code()
        ),
        _ => {}
    }
    Ok(exit)
}
