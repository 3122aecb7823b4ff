//! `audiocap status`: where every shard of a dataset stands; exit 0 when all are
//! committed, 4 when some are not yet, 2 when the shards do not make one dataset.

use audiocap::dataset::{DatasetStatus, dataset_status, render_status};

use super::dataset::{DatasetArgs, runtime};
use super::exit::Exit;

pub fn run(args: DatasetArgs) -> anyhow::Result<Exit> {
    let location = match args.location() {
        Ok(l) => l,
        Err(exit) => return Ok(exit),
    };
    let status = runtime()?.block_on(dataset_status(location.store.as_ref(), &location.prefix))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&location.uri(), &status));
    }
    Ok(exit(&status))
}

fn exit(status: &DatasetStatus) -> Exit {
    if !status.problems.is_empty() {
        Exit::Inconsistent
    } else if status.complete {
        Exit::Ok
    } else {
        Exit::Incomplete
    }
}
