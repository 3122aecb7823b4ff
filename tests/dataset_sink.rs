//! The Parquet dataset sink against `InMemory` and a local folder: visibility only on
//! commit, size-targeted parts, unique names, create-only commit records, kills,
//! resume, and the folder read as a dataset by polars and pyarrow.

use std::collections::{HashMap, HashSet};
use std::path::Path as FsPath;
use std::sync::Arc;

use audiocap::dataset::{
    CommittedPart, DatasetError, DatasetManifest, DatasetStatus, DatasetWriter,
    DatasetWriterOptions, FinalizeOutcome, MANIFEST_FILE, SUCCESS_FILE, ShardState, StoreKind,
    commit_record_path, committed_inputs, dataset_status, finalize,
};
use audiocap::output::{CaptionRow, schema};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};

const META_KEY: &str = "audiocap.pipeline";

/// Rows of one input: `segments` segments, captions that zstd cannot shrink much so
/// sizes are predictable.
fn input(uri: &str, segments: u32, run_id: &str) -> Vec<CaptionRow> {
    let mut state = uri.bytes().fold(0x9e37_79b9_u64, |h, b| {
        h.wrapping_mul(0x100_0000_01b3) ^ u64::from(b)
    });
    (0..segments)
        .map(|segment_index| {
            let caption: String = (0..120)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    char::from(b'a' + (state >> 59) as u8 % 26)
                })
                .collect();
            CaptionRow {
                uri: uri.to_string(),
                segment_index,
                start_s: Some(f64::from(segment_index) * 10.0),
                end_s: Some(f64::from(segment_index + 1) * 10.0),
                caption: Some(caption),
                score: Some(-0.5),
                model: "m@1".into(),
                run_id: run_id.into(),
                processed_at_us: 1,
                ..Default::default()
            }
        })
        .collect()
}

fn options(shard: u32, shards: u32, run_id: &str) -> DatasetWriterOptions {
    let mut o = DatasetWriterOptions::new(shard, shards, run_id);
    o.metadata = vec![(META_KEY.into(), format!("{{\"run\":\"{run_id}\"}}"))];
    o
}

fn memory() -> (Arc<dyn ObjectStore>, StoreKind) {
    (Arc::new(InMemory::new()), StoreKind::Object)
}

fn local(dir: &FsPath) -> (Arc<dyn ObjectStore>, StoreKind) {
    let store = LocalFileSystem::new_with_prefix(dir).unwrap();
    (
        Arc::new(store),
        StoreKind::Local {
            root: dir.to_path_buf(),
        },
    )
}

/// Names of the objects directly under `prefix` that a reader of the folder reads
/// (pyarrow, polars and DuckDB skip names starting with `_` or `.`).
async fn listed(store: &dyn ObjectStore, prefix: &Path) -> Vec<String> {
    let mut names: Vec<String> = store
        .list_with_delimiter(Some(prefix))
        .await
        .unwrap()
        .objects
        .iter()
        .filter_map(|o| o.location.filename().map(str::to_owned))
        .filter(|name| !name.starts_with(['_', '.']))
        .collect();
    names.sort();
    names
}

/// A writer that must open.
async fn open(
    store: &Arc<dyn ObjectStore>,
    prefix: &Path,
    kind: &StoreKind,
    options: DatasetWriterOptions,
) -> DatasetWriter {
    DatasetWriter::open(store.clone(), prefix.clone(), kind.clone(), options)
        .await
        .unwrap()
}

/// The bytes of a committed part holding `rows`.
async fn part_bytes(rows: &[CaptionRow]) -> bytes::Bytes {
    let (store, kind) = memory();
    let mut w = open(&store, &Path::from("d"), &kind, options(0, 1, "r")).await;
    w.write_input(rows).await.unwrap();
    let part = w.flush().await.unwrap().unwrap();
    let path = Path::from(format!("d/{}", part.name));
    store.get(&path).await.unwrap().bytes().await.unwrap()
}

/// The inputs shard `index` of `count` already committed under `prefix`, as a set.
async fn committed(
    store: &Arc<dyn ObjectStore>,
    prefix: &Path,
    index: u32,
    count: u32,
    candidates: impl IntoIterator<Item = String>,
) -> HashSet<String> {
    let spill = tempfile::tempdir().unwrap();
    let mut set = committed_inputs(store.clone(), prefix, index, count, spill.path())
        .await
        .unwrap();
    let found: HashSet<String> = candidates
        .into_iter()
        .filter(|k| set.contains(k).unwrap())
        .collect();
    assert_eq!(
        found.len(),
        set.len(),
        "the set holds keys beyond the candidates"
    );
    found
}

/// Every object in the store.
async fn all_objects(store: &dyn ObjectStore) -> Vec<String> {
    use futures::TryStreamExt;
    store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

/// Every committed part's rows as `uri` → row count, read with the parquet crate.
async fn rows_by_uri(store: &dyn ObjectStore, prefix: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for name in listed(store, prefix).await {
        let bytes = store
            .get(&prefix.clone().join(name.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            assert_eq!(batch.schema(), schema());
            let uris = batch.column(0).as_any();
            let uris = uris.downcast_ref::<arrow_array::StringArray>().unwrap();
            for uri in uris.iter().flatten() {
                *counts.entry(uri.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

async fn nothing_visible_before_commit(store: Arc<dyn ObjectStore>, kind: StoreKind) {
    let prefix = Path::from("out/captions");
    let mut o = options(0, 1, "r1");
    // Small chunks so the object-store part streams through a multipart upload.
    o.upload_chunk_bytes = 4096;
    o.row_group_bytes = 2048;
    let mut w = open(&store, &prefix, &kind, o).await;
    for i in 0..40 {
        w.write_input(&input(&format!("s3://b/{i}.wav"), 2, "r1"))
            .await
            .unwrap();
    }
    assert_eq!(w.open_rows(), 80);
    assert_eq!(listed(store.as_ref(), &prefix).await, Vec::<String>::new());
    let all: Vec<_> = all_objects(store.as_ref()).await;
    assert!(
        all.iter()
            .all(|p| !p.ends_with(".parquet") || p.contains("/_staging/")),
        "a part is visible before commit: {all:?}"
    );
    if let StoreKind::Local { root } = &kind {
        let staged = std::fs::read_dir(root.join("out/captions/_staging"))
            .unwrap()
            .count();
        assert_eq!(staged, 1, "the open part is staged");
    }
    let part = w.flush().await.unwrap().unwrap();
    assert_eq!((part.rows, part.inputs), (80, 40));
    assert_eq!(
        listed(store.as_ref(), &prefix).await,
        vec![part.name.clone()]
    );
    let size = store
        .head(&prefix.clone().join(part.name.as_str()))
        .await
        .unwrap()
        .size;
    assert_eq!(size, part.bytes);
    if let StoreKind::Local { root } = &kind {
        let staged = std::fs::read_dir(root.join("out/captions/_staging"))
            .unwrap()
            .count();
        assert_eq!(staged, 0, "the committed part left its staging file");
    }
}

#[tokio::test]
async fn parts_are_invisible_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    for (store, kind) in [memory(), local(dir.path())] {
        nothing_visible_before_commit(store, kind).await;
    }
}

/// Writes `inputs` inputs of 3 segments with 16 KiB parts; checks parts roll, hold
/// whole inputs, and the record adds up.
async fn size_target_rolls_parts(store: Arc<dyn ObjectStore>, kind: StoreKind) {
    let prefix = Path::from("ds");
    let mut o = options(2, 4, "r1");
    o.target_part_bytes = 64 << 10;
    o.row_group_bytes = 24 << 10;
    let mut w = open(&store, &prefix, &kind, o).await;
    let inputs = 600;
    for i in 0..inputs {
        w.write_input(&input(&format!("file:///a/{i:04}.flac"), 3, "r1"))
            .await
            .unwrap();
    }
    let record = w
        .finish(serde_json::json!({"config_digest": "abc"}))
        .await
        .unwrap();
    assert!(record.parts.len() >= 3, "{} parts", record.parts.len());
    assert_eq!((record.rows, record.inputs), (3 * inputs, inputs));
    assert_eq!(record.run["config_digest"], "abc");
    // Every part but the last is just past the target: an input is about 0.3 KiB
    // encoded, and the footer (not in the estimate) adds a few KiB.
    for p in &record.parts[..record.parts.len() - 1] {
        assert!(p.bytes >= 64 << 10 && p.bytes < 72 << 10, "{p:?}");
    }
    let mut names: Vec<String> = record.parts.iter().map(|p| p.name.clone()).collect();
    names.sort();
    assert_eq!(listed(store.as_ref(), &prefix).await, names);
    // Whole inputs: each part's URIs appear in no other part.
    let mut seen: HashMap<String, String> = HashMap::new();
    for p in &record.parts {
        let part_prefix = Path::from(format!("ds/{}", p.name));
        let bytes = store
            .get(&part_prefix)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        assert!(
            reader.metadata().num_row_groups() >= 2,
            "row groups by size"
        );
        let mut rows = 0;
        let mut uris = HashSet::new();
        for batch in reader.build().unwrap() {
            let batch = batch.unwrap();
            rows += batch.num_rows();
            let col = batch.column(0);
            let col = col
                .as_any()
                .downcast_ref::<arrow_array::StringArray>()
                .unwrap();
            uris.extend(col.iter().flatten().map(str::to_owned));
        }
        assert_eq!((rows as u64, uris.len() as u64), (p.rows, p.inputs));
        for uri in uris {
            if let Some(other) = seen.insert(uri.clone(), p.name.clone()) {
                panic!("{uri} is in {other} and {}", p.name);
            }
        }
    }
    let stored = store
        .get(&commit_record_path(&prefix, 2, 4, "r1"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        stored["parts"].as_array().unwrap().len(),
        record.parts.len()
    );
    assert_eq!(stored["rows"], 3 * inputs);
}

#[tokio::test]
async fn parts_roll_at_the_size_target() {
    let dir = tempfile::tempdir().unwrap();
    for (store, kind) in [memory(), local(dir.path())] {
        size_target_rolls_parts(store, kind).await;
    }
}

#[tokio::test]
async fn rows_limit_rolls_parts_too() {
    let (store, kind) = memory();
    let mut o = options(0, 1, "r");
    o.max_rows_per_part = 10;
    let mut w = open(&store, &Path::from("x"), &kind, o).await;
    for i in 0..7 {
        w.write_input(&input(&i.to_string(), 4, "r")).await.unwrap();
    }
    // 4+4+4 = 12 ≥ 10 commits after the third input; an input is never split.
    let rows: Vec<u64> = w.committed().iter().map(|p| p.rows).collect();
    assert_eq!(rows, vec![12, 12]);
    assert_eq!(w.open_rows(), 4);
}

#[tokio::test]
async fn part_age_commits_an_idle_part() {
    let (store, kind) = memory();
    // Young: an hour is never reached by a test, however slow the machine.
    let mut o = options(0, 1, "r");
    o.max_part_age = std::time::Duration::from_secs(3600);
    let mut w = open(&store, &Path::from("young"), &kind, o).await;
    w.write_input(&input("a", 1, "r")).await.unwrap();
    assert_eq!(
        w.commit_if_due().await.unwrap(),
        None,
        "young part committed"
    );
    // Old: past 50 ms after a sleep of 80 ms, however fast.
    let mut o = options(0, 1, "r");
    o.max_part_age = std::time::Duration::from_millis(50);
    let mut w = open(&store, &Path::from("x"), &kind, o).await;
    w.write_input(&input("a", 1, "r")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    let part = w.commit_if_due().await.unwrap().unwrap();
    assert_eq!(part.rows, 1);
    assert_eq!(
        listed(store.as_ref(), &Path::from("x")).await,
        vec![part.name]
    );
}

#[tokio::test]
async fn names_are_unique_across_runs_and_shards() {
    let (store, kind) = memory();
    let prefix = Path::from("ds");
    let mut all: Vec<CommittedPart> = Vec::new();
    for run in ["r1", "r2"] {
        for shard in 0..2 {
            let mut o = options(shard, 2, run);
            o.max_rows_per_part = 4;
            let mut w = open(&store, &prefix, &kind, o).await;
            for i in 0..5 {
                w.write_input(&input(&format!("{run}/{shard}/{i}"), 2, run))
                    .await
                    .unwrap();
            }
            all.extend(w.finish(serde_json::json!({})).await.unwrap().parts);
        }
    }
    let names: HashSet<&str> = all.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), all.len(), "duplicate part names: {all:?}");
    assert_eq!(listed(store.as_ref(), &prefix).await.len(), all.len());
    assert_eq!(all.len(), 2 * 2 * 3);
    for run in ["r1", "r2"] {
        for shard in 0..2 {
            let record = commit_record_path(&prefix, shard, 2, run);
            store.head(&record).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_run_reopened_after_a_kill_never_overwrites_its_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (store, kind) = local(dir.path());
    let prefix = Path::from("ds");
    let mut w = open(&store, &prefix, &kind, options(0, 1, "r")).await;
    w.write_input(&input("a", 2, "r")).await.unwrap();
    let first = w.flush().await.unwrap().unwrap();
    w.write_input(&input("b", 2, "r")).await.unwrap();
    drop(w); // killed: "b" was never committed
    let mut w = open(&store, &prefix, &kind, options(0, 1, "r")).await;
    w.write_input(&input("b", 2, "r")).await.unwrap();
    let record = w.finish(serde_json::json!({})).await.unwrap();
    assert_ne!(record.parts[0].name, first.name);
    let counts = rows_by_uri(store.as_ref(), &prefix).await;
    assert_eq!(counts, HashMap::from([("a".into(), 2), ("b".into(), 2)]));
}

#[tokio::test]
async fn commit_records_are_create_only() {
    let dir = tempfile::tempdir().unwrap();
    for (store, kind) in [memory(), local(dir.path())] {
        let prefix = Path::from("ds");
        let w = open(&store, &prefix, &kind, options(0, 1, "r")).await;
        let record = w.finish(serde_json::json!({"n": 1})).await.unwrap();
        assert!(record.parts.is_empty());
        // The same shard and run again: refused at open, before anything is written.
        let again = DatasetWriter::open(
            store.clone(),
            prefix.clone(),
            kind.clone(),
            options(0, 1, "r"),
        )
        .await;
        assert!(
            matches!(again, Err(DatasetError::AlreadyCommitted { .. })),
            "reopened a committed run"
        );
        // A writer that opened before the record appeared fails at finish and never
        // replaces it.
        let late = open(&store, &prefix, &kind, options(0, 2, "r")).await;
        let path = commit_record_path(&prefix, 0, 2, "r");
        store.put(&path, "{\"n\":0}".into()).await.unwrap();
        let result = late.finish(serde_json::json!({"n": 2})).await;
        assert!(matches!(result, Err(DatasetError::AlreadyCommitted { .. })));
        let kept = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&kept[..], b"{\"n\":0}");
    }
}

#[tokio::test]
async fn a_killed_local_writer_leaves_no_part_and_the_next_open_cleans_staging() {
    let dir = tempfile::tempdir().unwrap();
    let (store, kind) = local(dir.path());
    let prefix = Path::from("ds");
    let staging = dir.path().join("ds/_staging");
    let mut w0 = open(&store, &prefix, &kind, options(0, 2, "r1")).await;
    let mut w1 = open(&store, &prefix, &kind, options(1, 2, "r1")).await;
    w0.write_input(&input("a", 3, "r1")).await.unwrap();
    w1.write_input(&input("b", 3, "r1")).await.unwrap();
    drop(w0); // killed mid-part
    assert_eq!(listed(store.as_ref(), &prefix).await, Vec::<String>::new());
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 2);
    for shard in 0..2 {
        let done = committed(&store, &prefix, shard, 2, ["a".to_string(), "b".into()]).await;
        assert!(done.is_empty());
    }

    // Shard 0 restarts: its stale file goes, shard 1's live one stays.
    let w0 = open(&store, &prefix, &kind, options(0, 2, "r2")).await;
    let left: Vec<String> = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1);
    assert!(left[0].starts_with("part-00001-of-00002-r1-"), "{left:?}");
    w1.flush().await.unwrap().unwrap();
    drop(w0);
    let counts = rows_by_uri(store.as_ref(), &prefix).await;
    assert_eq!(counts, HashMap::from([("b".into(), 3)]));
}

#[tokio::test]
async fn a_killed_object_store_writer_leaves_nothing() {
    let (store, kind) = memory();
    let prefix = Path::from("ds");
    let mut o = options(0, 1, "r");
    o.upload_chunk_bytes = 1024;
    o.row_group_bytes = 1024;
    let mut w = open(&store, &prefix, &kind, o).await;
    for i in 0..50 {
        w.write_input(&input(&i.to_string(), 2, "r")).await.unwrap();
    }
    drop(w);
    let all: Vec<_> = all_objects(store.as_ref()).await;
    assert!(all.is_empty(), "{all:?}");
}

/// Commits inputs `0..20` over several parts, leaves `20..24` in an open part that is
/// killed (`24..30` never started), adds decoys readers ignore; resume must return
/// exactly `0..20`. Then a new run writes what is missing, and every input appears
/// exactly once.
async fn resume_is_exact(store: Arc<dyn ObjectStore>, kind: StoreKind) {
    let prefix = Path::from("runs/ds");
    let uri = |i: u32| format!("gs://bucket/audio/{i:03}.wav");
    let mut o = options(0, 2, "r1");
    o.max_rows_per_part = 9;
    o.row_group_bytes = 1024; // several row groups: several ranged reads per part
    let mut w = open(&store, &prefix, &kind, o).await;
    for i in 0..20 {
        w.write_input(&input(&uri(i), 1 + i % 3, "r1"))
            .await
            .unwrap();
    }
    w.flush().await.unwrap().unwrap();
    // 8 rows, below the 9-row limit: this part stays open until the kill.
    for i in 20..24 {
        w.write_input(&input(&uri(i), 2, "r1")).await.unwrap();
    }
    assert_eq!(w.open_rows(), 8);
    drop(w);
    let decoy = part_bytes(&input("decoy://never-committed", 1, "r0")).await;
    // Real parts where readers do not look.
    for hidden in [
        "_staging/decoy.zstd.parquet",
        "_old/decoy.parquet",
        "_decoy.zstd.parquet",
        ".decoy.zstd.parquet",
    ] {
        let path = Path::from(format!("{prefix}/{hidden}"));
        store.put(&path, decoy.clone().into()).await.unwrap();
    }

    let candidates = || {
        (0..30)
            .map(uri)
            .chain(["decoy://never-committed".to_string()])
    };
    let done = committed(&store, &prefix, 0, 2, candidates()).await;
    let expected: HashSet<String> = (0..20).map(uri).collect();
    assert_eq!(done, expected);
    // Shard 1 reads its own parts only (none).
    assert!(
        committed(&store, &prefix, 1, 2, candidates())
            .await
            .is_empty()
    );

    // Another shard count on the same dataset is refused: resume could not see the
    // other layout's inputs.
    let other = DatasetWriter::open(
        store.clone(),
        prefix.clone(),
        kind.clone(),
        options(0, 1, "x"),
    )
    .await
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(other.contains("shard count"), "{other}");

    let mut w = open(&store, &prefix, &kind, options(0, 2, "r2")).await;
    for i in (0..30).filter(|i| !done.contains(&uri(*i))) {
        w.write_input(&input(&uri(i), 2, "r2")).await.unwrap();
    }
    w.finish(serde_json::json!({})).await.unwrap();
    let counts = rows_by_uri(store.as_ref(), &prefix).await;
    let all: HashSet<String> = (0..30).map(uri).collect();
    assert_eq!(counts.keys().cloned().collect::<HashSet<_>>(), all);
    for i in 0..30 {
        let segments = if i < 20 { 1 + i % 3 } else { 2 };
        assert_eq!(counts[&uri(i)], segments as usize, "{}", uri(i));
    }
    assert_eq!(committed(&store, &prefix, 0, 2, candidates()).await, all);
}

#[tokio::test]
async fn resume_returns_exactly_the_committed_inputs() {
    let dir = tempfile::tempdir().unwrap();
    for (store, kind) in [memory(), local(dir.path())] {
        resume_is_exact(store, kind).await;
    }
}

#[tokio::test]
async fn resume_of_an_empty_or_missing_dataset_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    for (store, _) in [memory(), local(dir.path())] {
        let none = committed(&store, &Path::from("none"), 0, 1, ["a".to_string()]).await;
        assert!(none.is_empty());
    }
}

/// A local dataset of two shards, several parts each; returns the folder.
async fn write_local_dataset(dir: &FsPath) -> (std::path::PathBuf, u64) {
    let (store, kind) = local(dir);
    let prefix = Path::from("ds");
    let mut rows = 0;
    for shard in 0..2 {
        let mut o = options(shard, 2, "r1");
        o.max_rows_per_part = 25;
        let mut w = open(&store, &prefix, &kind, o).await;
        for i in 0..30 {
            let mut segs = input(&format!("/a/{shard}-{i}.wav"), 2, "r1");
            segs[1].caption = None;
            segs[1].error = Some("decode failed".into());
            w.write_input(&segs).await.unwrap();
        }
        rows += w.finish(serde_json::json!({})).await.unwrap().rows;
    }
    (dir.join("ds"), rows)
}

#[tokio::test]
async fn polars_reads_the_folder_as_a_dataset_with_metadata_in_every_footer() {
    use polars::prelude::{LazyFrame, PlRefPath};
    let dir = tempfile::tempdir().unwrap();
    let (folder, rows) = write_local_dataset(dir.path()).await;
    assert_eq!(rows, 120);
    let glob = format!("{}/*.parquet", folder.display());
    // Polars blocks on its own runtime: never on a tokio worker thread.
    // This build of polars has no UInt16 (`channels`); polars proper reads it.
    let readable: Vec<_> = schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "channels")
        .map(|f| polars::prelude::col(f.name().as_str()))
        .collect();
    let frame = tokio::task::spawn_blocking(move || {
        LazyFrame::scan_parquet(PlRefPath::new(glob), Default::default())
            .unwrap()
            .select(readable)
            .collect()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(frame.height(), 120);
    let names: Vec<String> = frame
        .get_column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let expected: Vec<String> = schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| n != "channels")
        .collect();
    assert_eq!(names, expected);
    assert_eq!(frame.column("error").unwrap().null_count(), 60);

    let mut parts = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            parts += 1;
            let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
            let kv = reader
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .unwrap();
            let value = kv
                .iter()
                .find(|k| k.key == META_KEY)
                .and_then(|k| k.value.clone());
            assert_eq!(
                value.as_deref(),
                Some("{\"run\":\"r1\"}"),
                "{}",
                path.display()
            );
        }
    }
    assert_eq!(parts, 2 * 3);
}

/// Needs pyarrow (`python3 -m pip install pyarrow`).
#[tokio::test]
async fn pyarrow_reads_the_folder_as_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, rows) = write_local_dataset(dir.path()).await;
    let script = r#"
import json, sys
import pyarrow.dataset as ds, pyarrow.parquet as pq
d = ds.dataset(sys.argv[1], format="parquet")
meta = [pq.read_metadata(f).metadata.get(sys.argv[2].encode()) for f in d.files]
print(json.dumps({
    "rows": d.count_rows(),
    "names": d.schema.names,
    "types": [str(t) for t in d.schema.types],
    "files": len(d.files),
    "meta": [m.decode() if m else None for m in meta],
}))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&folder)
        .arg(META_KEY)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "pyarrow failed (the test needs `python3 -m pip install pyarrow`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["rows"], rows);
    assert_eq!(got["files"], 6, "staging or commit files were read: {got}");
    let names: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(got["names"], serde_json::json!(names));
    let at = |name: &str| names.iter().position(|n| n == name).unwrap();
    assert_eq!(got["types"][at("processed_at")], "timestamp[us, tz=UTC]");
    assert_eq!(got["types"][at("channels")], "uint16");
    assert_eq!(got["types"][at("warnings")], "string");
    for m in got["meta"].as_array().unwrap() {
        assert_eq!(m, "{\"run\":\"r1\"}");
    }
}

/// Writer options that stamp the model into the footers, as `audiocap run` does.
fn stamped(shard: u32, shards: u32, run_id: &str, model: &str) -> DatasetWriterOptions {
    let mut o = options(shard, shards, run_id);
    o.metadata.push(("audiocap.model".into(), model.into()));
    o.model = model.into();
    o.config_digest = "digest-1".into();
    o
}

fn states(status: &DatasetStatus) -> Vec<ShardState> {
    status.shards.iter().map(|s| s.state).collect()
}

/// Shard runs commit (one after a kill and a resume), `status` follows every step,
/// `finalize` refuses until all three shards committed, then writes a manifest whose
/// parts, rows, error rows and checksums match the objects, `_SUCCESS` last; again (or
/// twice at once) it writes nothing new; a later stray part makes it refuse again.
#[tokio::test]
async fn finalize_commits_the_dataset_once_every_shard_has() {
    use sha2::Digest;
    let (store, kind) = memory();
    let prefix = Path::from("ds");
    let status = dataset_status(store.as_ref(), &prefix).await.unwrap();
    assert_eq!(status.shard_count, None);
    assert!(!status.complete);

    let mut w = open(&store, &prefix, &kind, stamped(0, 3, "a", "m@1")).await;
    w.write_input(&input("s0/x", 2, "a")).await.unwrap();
    let mut failed = input("s0/bad", 1, "a");
    failed[0].caption = None;
    failed[0] = failed[0].failed(
        audiocap::output::RowFailure::Input("not_audio"),
        "decode: not audio",
        1,
    );
    w.write_input(&failed).await.unwrap();
    w.finish(serde_json::json!({})).await.unwrap();
    // Shard 1: killed after committing one part.
    let mut w = open(&store, &prefix, &kind, stamped(1, 3, "k", "m@1")).await;
    w.write_input(&input("s1/x", 3, "k")).await.unwrap();
    w.flush().await.unwrap().unwrap();
    drop(w);

    let status = dataset_status(store.as_ref(), &prefix).await.unwrap();
    assert_eq!(status.shard_count, Some(3));
    use ShardState::*;
    assert_eq!(states(&status), vec![Committed, InProgress, Missing]);
    assert_eq!((status.rows, status.error_rows), (6, 1));
    // Error rows by kind, from the parts' footers.
    let kinds = std::collections::BTreeMap::from([("not_audio".to_string(), 1)]);
    assert_eq!(status.error_rows_by_kind, kinds);
    assert_eq!(status.shards[0].error_rows_by_kind, kinds);
    assert!(status.shards[1].error_rows_by_kind.is_empty());
    let text = audiocap::dataset::render_status("ds", &status);
    assert!(text.contains("error rows by kind: not_audio 1\n"), "{text}");
    assert!(status.problems.is_empty(), "{:?}", status.problems);
    let outcome = finalize(store.as_ref(), &prefix).await.unwrap();
    assert!(
        matches!(outcome, FinalizeOutcome::Incomplete(_)),
        "{outcome:?}"
    );
    assert!(
        store
            .head(&prefix.clone().join(MANIFEST_FILE))
            .await
            .is_err()
    );

    // Shard 1 resumed by a new run (its record names the killed run's part too).
    let mut w = open(&store, &prefix, &kind, stamped(1, 3, "k2", "m@1")).await;
    w.write_input(&input("s1/y", 1, "k2")).await.unwrap();
    let record = w.finish(serde_json::json!({})).await.unwrap();
    assert_eq!(record.shard_parts.len(), 2);
    let mut w = open(&store, &prefix, &kind, stamped(2, 3, "c", "m@1")).await;
    w.write_input(&input("s2/x", 1, "c")).await.unwrap();
    w.finish(serde_json::json!({})).await.unwrap();

    let status = dataset_status(store.as_ref(), &prefix).await.unwrap();
    assert_eq!(states(&status), vec![Committed; 3]);
    assert!(status.complete && !status.finalized);
    assert_eq!(status.shards[1].committed_runs, vec!["k2".to_string()]);
    let FinalizeOutcome::Finalized(manifest) = finalize(store.as_ref(), &prefix).await.unwrap()
    else {
        panic!("not finalized");
    };
    assert_eq!(
        (manifest.rows, manifest.error_rows, manifest.shard_count),
        (8, 1, 3)
    );
    assert_eq!(manifest.error_rows_by_kind, kinds);
    assert_eq!(manifest.model, "m@1");
    assert_eq!(manifest.config_digest, "digest-1");
    let visible = listed(store.as_ref(), &prefix).await;
    let names: Vec<String> = manifest.parts.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, visible);
    for part in &manifest.parts {
        let bytes = store
            .get(&prefix.clone().join(part.name.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(part.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
        assert_eq!(part.bytes, bytes.len() as u64);
    }
    let read = |name: &'static str| {
        let store = store.clone();
        let path = prefix.clone().join(name);
        async move { store.get(&path).await.unwrap().bytes().await.unwrap() }
    };
    let manifest_bytes = read(MANIFEST_FILE).await;
    let success: serde_json::Value = serde_json::from_slice(&read(SUCCESS_FILE).await).unwrap();
    assert_eq!(
        success["sha256"],
        hex::encode(sha2::Sha256::digest(&manifest_bytes))
    );
    let back: DatasetManifest = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(back, manifest);

    // Again, and twice at once: the same bytes, nothing rewritten.
    let (a, b) = tokio::join!(
        finalize(store.as_ref(), &prefix),
        finalize(store.as_ref(), &prefix)
    );
    for outcome in [a.unwrap(), b.unwrap()] {
        assert!(matches!(outcome, FinalizeOutcome::AlreadyFinalized(ref m) if *m == manifest));
    }
    assert_eq!(read(MANIFEST_FILE).await, manifest_bytes);
    assert!(
        dataset_status(store.as_ref(), &prefix)
            .await
            .unwrap()
            .finalized
    );

    // A run of shard 0 that commits a part but not its record (a zombie, or a
    // re-run still going): the shard is in progress and finalize refuses.
    let mut w = open(&store, &prefix, &kind, stamped(0, 3, "z", "m@1")).await;
    w.write_input(&input("s0/late", 1, "z")).await.unwrap();
    w.flush().await.unwrap().unwrap();
    drop(w);
    let status = dataset_status(store.as_ref(), &prefix).await.unwrap();
    assert_eq!(status.shards[0].state, InProgress);
    assert_eq!(status.shards[0].uncommitted_parts.len(), 1);
    let outcome = finalize(store.as_ref(), &prefix).await.unwrap();
    assert!(
        matches!(outcome, FinalizeOutcome::Incomplete(_)),
        "{outcome:?}"
    );
}

/// Shards that do not make one dataset: another model, another pipeline, another
/// shard count, or a committed part gone. Finalize says so and writes nothing.
#[tokio::test]
async fn finalize_refuses_shards_that_are_not_one_dataset() {
    type Change = fn(&mut DatasetWriterOptions);
    let cases: [(&str, Change); 3] = [
        ("model", |o| {
            o.metadata.retain(|(k, _)| k != "audiocap.model");
            o.metadata.push(("audiocap.model".into(), "other@2".into()));
        }),
        ("pipeline", |o| o.config_digest = "digest-2".into()),
        ("shard count", |o| {
            *o = stamped(0, 4, "b", "m@1");
        }),
    ];
    for (what, change) in cases {
        let (store, kind) = memory();
        let prefix = Path::from("ds");
        let mut w = open(&store, &prefix, &kind, stamped(0, 2, "a", "m@1")).await;
        w.write_input(&input("x", 1, "a")).await.unwrap();
        w.finish(serde_json::json!({})).await.unwrap();
        let mut o = stamped(1, 2, "b", "m@1");
        change(&mut o);
        // A run refuses to add another shard count to a dataset, so that shard is
        // written elsewhere and copied in (as by hand, or by an older version).
        let elsewhere = Path::from("elsewhere");
        let target = if what == "shard count" {
            &elsewhere
        } else {
            &prefix
        };
        let mut w = open(&store, target, &kind, o).await;
        w.write_input(&input("y", 1, "b")).await.unwrap();
        w.finish(serde_json::json!({})).await.unwrap();
        for object in all_objects(store.as_ref()).await {
            if let Some(rest) = object.strip_prefix("elsewhere/") {
                let bytes = store.get(&Path::from(object.as_str())).await.unwrap();
                let bytes = bytes.bytes().await.unwrap();
                let to = Path::from(format!("ds/{rest}"));
                store.put(&to, bytes.into()).await.unwrap();
            }
        }
        let outcome = finalize(store.as_ref(), &prefix).await.unwrap();
        let FinalizeOutcome::Inconsistent(status) = outcome else {
            panic!("{what}: {outcome:?}");
        };
        assert_eq!(status.problems.len(), 1, "{what}: {:?}", status.problems);
        assert!(
            store
                .head(&prefix.clone().join(SUCCESS_FILE))
                .await
                .is_err()
        );
    }

    // A part named by a commit record deleted: the shard is damaged.
    let (store, kind) = memory();
    let prefix = Path::from("ds");
    let mut w = open(&store, &prefix, &kind, stamped(0, 1, "a", "m@1")).await;
    w.write_input(&input("x", 1, "a")).await.unwrap();
    let record = w.finish(serde_json::json!({})).await.unwrap();
    store
        .delete(&prefix.clone().join(record.parts[0].name.as_str()))
        .await
        .unwrap();
    let outcome = finalize(store.as_ref(), &prefix).await.unwrap();
    let FinalizeOutcome::Inconsistent(status) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(status.shards[0].state, ShardState::Damaged);
    assert_eq!(
        status.shards[0].missing_parts,
        vec![record.parts[0].name.clone()]
    );
}

/// Rows of an input whose single segment failed with `kind`.
fn failed_input(uri: &str, run_id: &str, kind: &'static str) -> Vec<CaptionRow> {
    let mut rows = input(uri, 1, run_id);
    rows[0].caption = None;
    rows[0] = rows[0].failed(
        audiocap::output::RowFailure::Input(kind),
        format!("decode: {kind}"),
        1,
    );
    rows
}

/// `--retry-failed` on one store: failed inputs leave the committed parts (the
/// others' rows are carried into replacements), so a run that captions them again
/// leaves each input's newest rows only, for readers, status and the manifest; a
/// finalized dataset is withdrawn first; a run stopped between committing a
/// replacement and deleting the part it replaces is completed by the next open.
async fn retry_failed_keeps_only_the_newest_rows(store: Arc<dyn ObjectStore>, kind: StoreKind) {
    let prefix = Path::from("ds");
    let mut o = stamped(0, 1, "a", "m@1");
    o.max_rows_per_part = 3;
    let mut w = open(&store, &prefix, &kind, o).await;
    // Part 0: ok1 (2 rows) + bad1; part 1: ok2 (2) + half (a captioned and a failed
    // segment); part 2: bad3 alone (nothing to carry).
    w.write_input(&input("ok1", 2, "a")).await.unwrap();
    w.write_input(&failed_input("bad1", "a", "not_audio"))
        .await
        .unwrap();
    w.write_input(&input("ok2", 2, "a")).await.unwrap();
    let mut half = input("half", 2, "a");
    half[1].caption = None;
    half[1] = half[1].failed(audiocap::output::RowFailure::Model, "model: device lost", 1);
    w.write_input(&half).await.unwrap();
    w.write_input(&failed_input("bad3", "a", "not_found"))
        .await
        .unwrap();
    w.finish(serde_json::json!({})).await.unwrap();
    let before = listed(store.as_ref(), &prefix).await;
    assert_eq!(before.len(), 3, "{before:?}");
    let first_part = store
        .get(&prefix.clone().join(before[0].as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(matches!(
        finalize(store.as_ref(), &prefix).await.unwrap(),
        FinalizeOutcome::Finalized(_)
    ));

    // The retry run takes the three failed inputs out before anything else.
    let mut w = open(&store, &prefix, &kind, stamped(0, 1, "b", "m@1")).await;
    let report = w.supersede_failed().await.unwrap();
    assert_eq!((report.parts, report.failed_inputs), (3, 3));
    for marker in [SUCCESS_FILE, MANIFEST_FILE] {
        let gone = store.head(&prefix.clone().join(marker)).await;
        assert!(gone.is_err(), "{marker} survived a change of the parts");
    }
    let names = ["ok1", "ok2", "bad1", "half", "bad3"].map(String::from);
    let done = committed(&store, &prefix, 0, 1, names).await;
    assert_eq!(done, HashSet::from(["ok1".into(), "ok2".into()]));
    let rows = rows_by_uri(store.as_ref(), &prefix).await;
    assert_eq!(rows, HashMap::from([("ok1".into(), 2), ("ok2".into(), 2)]));
    // Mid-run, the shard is in progress, not damaged: the parts its record names
    // are carried by replacements.
    let status = dataset_status(store.as_ref(), &prefix).await.unwrap();
    assert_eq!(states(&status), vec![ShardState::InProgress]);
    assert!(status.shards[0].missing_parts.is_empty(), "{status:?}");
    assert_eq!(status.error_rows, 0);

    // Captioned again, then committed: one set of rows per input.
    for uri in ["bad1", "half", "bad3"] {
        w.write_input(&input(uri, 2, "b")).await.unwrap();
    }
    let record = w.finish(serde_json::json!({})).await.unwrap();
    assert!(
        record.shard_parts.iter().all(|p| !before.contains(p)),
        "{:?}",
        record.shard_parts
    );
    let rows = rows_by_uri(store.as_ref(), &prefix).await;
    let expected: HashMap<String, usize> = ["ok1", "ok2", "bad1", "half", "bad3"]
        .iter()
        .map(|u| (u.to_string(), 2))
        .collect();
    assert_eq!(rows, expected);
    let FinalizeOutcome::Finalized(manifest) = finalize(store.as_ref(), &prefix).await.unwrap()
    else {
        panic!("not finalized after the retry");
    };
    assert_eq!((manifest.rows, manifest.error_rows), (10, 0));
    let names: Vec<String> = manifest.parts.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, listed(store.as_ref(), &prefix).await);

    // Nothing failed: a second retry changes nothing and keeps the dataset final.
    let mut w = open(&store, &prefix, &kind, stamped(0, 1, "c", "m@1")).await;
    assert_eq!(w.supersede_failed().await.unwrap().parts, 0);
    drop(w);
    assert!(store.head(&prefix.clone().join(SUCCESS_FILE)).await.is_ok());

    // A run killed after committing a replacement, before deleting what it
    // replaced: both are visible (ok1 twice) until the shard's next open.
    let restored = prefix.clone().join(before[0].as_str());
    store.put(&restored, first_part.into()).await.unwrap();
    assert_eq!(rows_by_uri(store.as_ref(), &prefix).await["ok1"], 4);
    let w = open(&store, &prefix, &kind, stamped(0, 1, "d", "m@1")).await;
    drop(w);
    assert!(store.head(&restored).await.is_err(), "not cleaned up");
    assert_eq!(rows_by_uri(store.as_ref(), &prefix).await, expected);
}

#[tokio::test]
async fn retry_failed_supersedes_failed_inputs_in_memory() {
    let (store, kind) = memory();
    retry_failed_keeps_only_the_newest_rows(store, kind).await;
}

#[tokio::test]
async fn retry_failed_supersedes_failed_inputs_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (store, kind) = local(dir.path());
    retry_failed_keeps_only_the_newest_rows(store, kind).await;
}
