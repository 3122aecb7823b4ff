//! Input listing and fetching (`audiocap::storage`): local trees, an in-memory store,
//! manifests in every format, and the same checks on emulators of each object store
//! (S3: moto, GCS: fake-gcs-server, Azure Blob: Azurite).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use audiocap::storage::{
    FetchError, FetchedAudio, ListOptions, Listed, Location, Source, SpoolOptions, StorageError,
    StorageOptions, fetch, list_inputs, list_location,
};
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::common::azurite::Azurite;
use crate::common::fixtures;
use crate::common::gcs::FakeGcs;
use crate::common::s3::MotoServer;
use crate::common::servers::TestStore;

/// Every item of a listing as `ok <uri> <size>` / `failed <uri>` / `ERROR <message>`
/// (files skipped for their extension left out: `listed_with_skips` shows them).
async fn listed(
    stream: futures::stream::BoxStream<'static, Result<Listed, StorageError>>,
) -> Vec<String> {
    listed_with_skips(stream)
        .await
        .into_iter()
        .filter(|line| !line.starts_with("skipped "))
        .collect()
}

/// [`listed`] with `skipped <uri> .<extension>` lines too.
async fn listed_with_skips(
    stream: futures::stream::BoxStream<'static, Result<Listed, StorageError>>,
) -> Vec<String> {
    stream
        .map(|item| match item {
            Ok(Listed::Input(input)) => match input.size {
                Some(size) => format!("ok {} {size}", input.uri),
                None => format!("ok {}", input.uri),
            },
            Ok(Listed::Failed { uri, error }) => format!("failed {uri}: {error}"),
            Ok(Listed::Skipped { uri, extension }) => format!("skipped {uri} .{extension}"),
            Err(e) => format!("ERROR {e}"),
        })
        .collect()
        .await
}

async fn list(sources: &[Source], options: &ListOptions, storage: &StorageOptions) -> Vec<String> {
    listed(list_inputs(sources, options, storage).unwrap()).await
}

fn path(p: &Path) -> Source {
    Source::Path(p.to_string_lossy().into_owned())
}

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (name, bytes) in [
        ("a.wav", 3usize),
        ("b.txt", 1),
        ("empty.wav", 0),
        ("sub/c.FLAC", 4),
        ("sub/deep/d.mp3", 5),
        ("sub/skip.tmp.wav", 6),
        ("z/e.wav", 7),
    ] {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, vec![1u8; bytes]).unwrap();
    }
    dir
}

#[tokio::test]
async fn local_folders_are_walked_sorted_with_filters() {
    let dir = tree();
    let root = dir.path();
    let r = root.to_string_lossy();
    let storage = StorageOptions::default();
    let all = list(&[path(root)], &ListOptions::default(), &storage).await;
    assert_eq!(
        all,
        [
            format!("ok {r}/a.wav 3"),
            format!("ok {r}/empty.wav 0"),
            format!("ok {r}/sub/c.FLAC 4"),
            format!("ok {r}/sub/deep/d.mp3 5"),
            format!("ok {r}/sub/skip.tmp.wav 6"),
            format!("ok {r}/z/e.wav 7"),
        ]
    );

    let filtered = ListOptions {
        include: vec!["sub/**".into()],
        exclude: vec!["*.tmp.wav".into(), "deep/**".into(), "sub/deep/**".into()],
        extensions: None,
    };
    assert_eq!(
        list(&[path(root)], &filtered, &storage).await,
        [format!("ok {r}/sub/c.FLAC 4")]
    );

    let any = ListOptions {
        extensions: Some(vec![]),
        ..Default::default()
    };
    let every = list(&[path(&root.join("sub"))], &any, &storage).await;
    assert_eq!(every.len(), 3, "{every:?}");
    let txt = ListOptions {
        extensions: Some(vec![".TXT".into()]),
        ..Default::default()
    };
    assert_eq!(
        list(&[path(root)], &txt, &storage).await,
        [format!("ok {r}/b.txt 1")]
    );
    // What the extensions leave out is listed as skipped, for the run's summary;
    // what include/exclude leave out is not.
    let only_txt_in_sub = ListOptions {
        extensions: Some(vec!["txt".into()]),
        exclude: vec!["deep/**".into()],
        ..Default::default()
    };
    let sub = root.join("sub");
    let s = sub.to_string_lossy();
    assert_eq!(
        listed_with_skips(list_inputs(&[path(&sub)], &only_txt_in_sub, &storage).unwrap()).await,
        [
            format!("skipped {s}/c.FLAC .flac"),
            format!("skipped {s}/skip.tmp.wav .wav"),
        ]
    );

    // Explicit files are taken whatever their extension; missing ones are per-input
    // failures; the listing goes on.
    let explicit = list(
        &[
            path(&root.join("b.txt")),
            path(&root.join("nope.wav")),
            path(&root.join("z")),
        ],
        &ListOptions::default(),
        &storage,
    )
    .await;
    assert_eq!(
        explicit,
        [
            format!("ok {r}/b.txt 1"),
            format!("failed {r}/nope.wav: {r}/nope.wav: not found"),
            format!("ok {r}/z/e.wav 7"),
        ]
    );
}

#[tokio::test]
async fn local_globs_match_relative_to_their_literal_prefix() {
    let dir = tree();
    let r = dir.path().to_string_lossy().into_owned();
    let storage = StorageOptions::default();
    let options = ListOptions::default();
    let one_level = list(&[Source::Path(format!("{r}/*/*.wav"))], &options, &storage).await;
    assert_eq!(
        one_level,
        [
            format!("ok {r}/sub/skip.tmp.wav 6"),
            format!("ok {r}/z/e.wav 7")
        ]
    );
    let deep = list(
        &[Source::Path(format!("{r}/**/*.{{mp3,txt}}"))],
        &options,
        &storage,
    )
    .await;
    assert_eq!(
        deep,
        [
            format!("ok {r}/b.txt 1"),
            format!("ok {r}/sub/deep/d.mp3 5")
        ]
    );
    // Include/exclude apply to globs too.
    let excluded = ListOptions {
        exclude: vec!["skip.*".into()],
        ..Default::default()
    };
    let got = list(&[Source::Path(format!("{r}/*/*.wav"))], &excluded, &storage).await;
    assert_eq!(got, [format!("ok {r}/z/e.wav 7")]);
    // A glob below a folder that does not exist: the listing itself fails.
    let missing = list(
        &[Source::Path(format!("{r}/nope/*.wav"))],
        &options,
        &storage,
    )
    .await;
    assert_eq!(missing.len(), 1);
    assert!(
        missing[0].starts_with(&format!("ERROR listing {r}/nope/*.wav failed")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn unreadable_subfolders_are_per_input_failures() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tree();
    let locked = dir.path().join("sub");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read_dir(&locked).is_ok() {
        // Running as root: permissions do not stop reads, nothing to observe here.
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!("skipped: permissions are not enforced for this user");
        return;
    }
    let r = dir.path().to_string_lossy();
    let got = list(
        &[path(dir.path())],
        &ListOptions::default(),
        &StorageOptions::default(),
    )
    .await;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(
        got[2].starts_with(&format!("failed {r}/sub: {r}/sub: permission denied")),
        "{got:?}"
    );
    assert_eq!(got[3], format!("ok {r}/z/e.wav 7"));
}

#[tokio::test]
async fn in_memory_store_lists_globs_and_fetches() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    for (key, n) in [
        ("data/a.wav", 10usize),
        ("data/x/b.flac", 20),
        ("data/x/notes.md", 5),
        ("other/c.wav", 1),
    ] {
        store
            .put(&key.into(), PutPayload::from(vec![7u8; n]))
            .await
            .unwrap();
    }
    let at = |prefix: &str| Location::from_store(Arc::clone(&store), "memory://t", prefix.into());
    let options = ListOptions::default();
    let folder = listed(list_location(at("data"), None, &options).unwrap()).await;
    assert_eq!(
        folder,
        [
            "ok memory://t/data/a.wav 10",
            "ok memory://t/data/x/b.flac 20"
        ]
    );
    let glob = listed(list_location(at("data"), Some("*/*"), &options).unwrap()).await;
    assert_eq!(
        glob,
        [
            "ok memory://t/data/x/b.flac 20",
            "ok memory://t/data/x/notes.md 5"
        ]
    );
    let file = listed(list_location(at("data/x/notes.md"), None, &options).unwrap()).await;
    assert_eq!(file, ["ok memory://t/data/x/notes.md 5"]);
    let missing = listed(list_location(at("data/zz.wav"), None, &options).unwrap()).await;
    assert_eq!(
        missing,
        ["failed memory://t/data/zz.wav: memory://t/data/zz.wav: not found"]
    );

    let mut inputs = list_location(at("data"), None, &options).unwrap();
    let Some(Ok(Listed::Input(first))) = inputs.next().await else {
        panic!("no input")
    };
    let got = fetch(&first, &SpoolOptions::default()).await.unwrap();
    assert!(matches!(&got.audio, FetchedAudio::Memory(b) if b.as_ref() == [7u8; 10]));
}

fn write_parquet(path: &Path, column: &str, values: &[Option<&str>]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new(column, DataType::Utf8, true),
    ]));
    let ids: Vec<Option<String>> = (0..values.len()).map(|i| Some(i.to_string())).collect();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(values.to_vec())),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[tokio::test]
async fn manifests_in_every_format() {
    let dir = tree();
    let root = dir.path();
    let r = root.to_string_lossy().into_owned();
    let lists = root.join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(
        lists.join("m.csv"),
        format!("id,uri\n1,../a.wav\n2,{r}/b.txt\n3,\n4,s3://bkt/k/x.flac\n"),
    )
    .unwrap();
    std::fs::write(
        lists.join("m.jsonl"),
        "{\"path\": \"../sub/c.FLAC\", \"n\": 1}\n\n{\"path\": 5}\nnot json\n{\"path\": \"x/../y.wav\"}\n",
    )
    .unwrap();
    std::fs::write(
        lists.join("m.txt"),
        "# comment\n../z/e.wav\n\n  ../a.wav  \n",
    )
    .unwrap();
    write_parquet(
        &lists.join("m.parquet"),
        "file_name",
        &[Some("../a.wav"), None, Some("../sub/deep/d.mp3")],
    );
    std::fs::write(lists.join("cols.csv"), "id,audio\n1,a.wav\n").unwrap();
    let storage = StorageOptions {
        region: Some("us-east-1".into()),
        ..Default::default()
    };
    let manifest = |name: &str, column: Option<&str>| Source::Manifest {
        manifest: lists.join(name).to_string_lossy().into_owned(),
        column: column.map(str::to_string),
    };
    let l = lists.to_string_lossy();
    let options = ListOptions::default();
    assert_eq!(
        list(&[manifest("m.csv", None)], &options, &storage).await,
        [
            format!("ok {r}/a.wav"),
            format!("ok {r}/b.txt"),
            format!("failed {l}/m.csv#row=3: manifest {l}/m.csv, row 3: empty value"),
            "ok s3://bkt/k/x.flac".to_string(),
        ]
    );
    assert_eq!(
        list(&[manifest("m.jsonl", None)], &options, &storage).await,
        [
            format!("ok {r}/sub/c.FLAC"),
            format!(
                "failed {l}/m.jsonl#row=2: manifest {l}/m.jsonl, row 2: path is 5, not a string"
            ),
            format!(
                "failed {l}/m.jsonl#row=3: manifest {l}/m.jsonl, row 3: invalid JSON: expected ident at line 1 column 2"
            ),
            format!("ok {l}/y.wav"),
        ]
    );
    assert_eq!(
        list(&[manifest("m.txt", None)], &options, &storage).await,
        [format!("ok {r}/z/e.wav"), format!("ok {r}/a.wav")]
    );
    assert_eq!(
        list(&[manifest("m.parquet", None)], &options, &storage).await,
        [
            format!("ok {r}/a.wav"),
            format!("failed {l}/m.parquet#row=2: manifest {l}/m.parquet, row 2: null value"),
            format!("ok {r}/sub/deep/d.mp3"),
        ]
    );
    assert_eq!(
        list(&[manifest("m.parquet", Some("id"))], &options, &storage).await,
        [
            format!("ok {l}/0"),
            format!("ok {l}/1"),
            format!("ok {l}/2")
        ]
    );
    assert_eq!(
        list(&[manifest("cols.csv", None)], &options, &storage).await,
        [format!(
            "ERROR manifest {l}/cols.csv: no URI column uri / path / file_name (columns: id, audio)"
        )]
    );
    // A fatal error ends the stream: sources after it are not listed.
    let two = list(
        &[manifest("cols.csv", Some("nope")), manifest("m.txt", None)],
        &options,
        &storage,
    )
    .await;
    assert_eq!(two.len(), 1, "{two:?}");
    let err = list_inputs(&[manifest("m.xlsx", None)], &options, &storage)
        .err()
        .unwrap();
    assert!(err.to_string().contains("unknown manifest format"), "{err}");
}

fn fixture_audio() -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = fixtures().join("e2e-tiny/audio");
    ["sine_1s.wav", "chirp_2p5s.wav", "noise_0p3s.wav"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
        .collect()
}

/// Uploads audio and a manifest to `server`, then runs [`store_checks_in_child`] in
/// a child process whose environment points object_store at the emulator (endpoint,
/// keys, ...) exactly as a real run gets its credentials, and whose storage options
/// are the pipeline's `[storage]` lines for it: this process's own environment is
/// never modified (other tests run in parallel).
fn listing_globs_manifests_and_fetches(server: &dyn TestStore) {
    upload(server);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "storage_inputs::store_checks_in_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .envs(server.env())
        .env(CHILD, "1")
        .env(CHILD_BASE, server.base())
        .env(CHILD_STORAGE, server.storage_toml())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
}

#[test]
fn s3_listing_globs_manifests_and_fetches() {
    listing_globs_manifests_and_fetches(&MotoServer::start("audio-bucket"));
}

#[test]
fn gcs_listing_globs_manifests_and_fetches() {
    listing_globs_manifests_and_fetches(&FakeGcs::start("audio-bucket"));
}

#[test]
fn azure_listing_globs_manifests_and_fetches() {
    listing_globs_manifests_and_fetches(&Azurite::start("audio-bucket"));
}

const CHILD: &str = "AUDIOCAP_STORE_TEST_CHILD";
/// `s3://audio-bucket` and the like.
const CHILD_BASE: &str = "AUDIOCAP_STORE_TEST_BASE";
/// `[storage]` options as TOML.
const CHILD_STORAGE: &str = "AUDIOCAP_STORE_TEST_STORAGE";

fn upload(server: &dyn TestStore) {
    let audio = fixture_audio();
    for (i, (name, bytes)) in audio.iter().enumerate() {
        let key = format!("set/{}/{name}", if i == 0 { "a" } else { "b" });
        server.put(&key, bytes.clone());
    }
    server.put("set/readme.txt", b"hi".to_vec());
    server.put("set/b/empty.wav", Vec::new());
    let manifest = format!(
        "uri\n../set/a/sine_1s.wav\n{}/set/b/noise_0p3s.wav\n../set/missing.wav\n",
        server.base()
    );
    server.put("lists/m.csv", manifest.into_bytes());
}

#[tokio::test]
#[ignore = "run by the *_listing_globs_manifests_and_fetches tests, with an emulator's environment"]
async fn store_checks_in_child() {
    let (Some(_), Ok(b)) = (std::env::var_os(CHILD), std::env::var(CHILD_BASE)) else {
        eprintln!("skipped: runs inside the *_listing_globs_manifests_and_fetches tests");
        return;
    };
    let b = b.as_str();
    let scheme = b.split("://").next().unwrap();
    let storage: StorageOptions =
        toml::from_str(&std::env::var(CHILD_STORAGE).unwrap_or_default()).unwrap();
    let audio = fixture_audio();
    let options = ListOptions::default();
    let size = |name: &str| audio.iter().find(|(n, _)| n == name).unwrap().1.len();

    let folder = list(&[Source::Path(format!("{b}/set/"))], &options, &storage).await;
    assert_eq!(
        folder,
        [
            format!("ok {b}/set/a/sine_1s.wav {}", size("sine_1s.wav")),
            format!("ok {b}/set/b/chirp_2p5s.wav {}", size("chirp_2p5s.wav")),
            format!("ok {b}/set/b/empty.wav 0"),
            format!("ok {b}/set/b/noise_0p3s.wav {}", size("noise_0p3s.wav")),
        ]
    );
    let glob = list(
        &[Source::Path(format!("{b}/set/b/*_[0-9]p*.wav"))],
        &options,
        &storage,
    )
    .await;
    assert_eq!(
        glob,
        [
            format!("ok {b}/set/b/chirp_2p5s.wav {}", size("chirp_2p5s.wav")),
            format!("ok {b}/set/b/noise_0p3s.wav {}", size("noise_0p3s.wav"))
        ]
    );
    let manifest = Source::Manifest {
        manifest: format!("{b}/lists/m.csv"),
        column: None,
    };
    assert_eq!(
        list(std::slice::from_ref(&manifest), &options, &storage).await,
        [
            format!("ok {b}/set/a/sine_1s.wav"),
            format!("ok {b}/set/b/noise_0p3s.wav"),
            format!("ok {b}/set/missing.wav"),
        ]
    );

    // Fetch everything the manifest and the folder list: bytes come back intact, a
    // large object is spooled, missing and empty objects are per-input errors.
    let spool = SpoolOptions {
        memory_limit: 20_000,
        dir: None,
    };
    let mut inputs = list_inputs(
        &[manifest, Source::Path(format!("{b}/set/b/empty.wav"))],
        &options,
        &storage,
    )
    .unwrap();
    let mut outcomes = Vec::new();
    while let Some(item) = inputs.next().await {
        let Ok(Listed::Input(input)) = item else {
            panic!("{item:?}")
        };
        match fetch(&input, &spool).await {
            Ok(got) => {
                let name = input.uri.rsplit('/').next().unwrap().to_string();
                let want = &audio.iter().find(|(n, _)| *n == name).unwrap().1;
                let bytes = match &got.audio {
                    FetchedAudio::Memory(b) => b.to_vec(),
                    FetchedAudio::Spooled(f) => std::fs::read(f.path()).unwrap(),
                    FetchedAudio::Local(p) => panic!("local {p:?}"),
                };
                assert_eq!(&bytes, want, "{name}");
                let how = if matches!(got.audio, FetchedAudio::Spooled(_)) {
                    "spooled"
                } else {
                    "memory"
                };
                outcomes.push(format!("{name} {how}"));
            }
            Err(FetchError::NotFound { uri }) => outcomes.push(format!("not found {uri}")),
            Err(FetchError::Empty { uri }) => outcomes.push(format!("empty {uri}")),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        outcomes,
        [
            "sine_1s.wav spooled".to_string(),
            "noise_0p3s.wav memory".to_string(),
            format!("not found {b}/set/missing.wav"),
            format!("empty {b}/set/b/empty.wav"),
        ]
    );

    // A missing bucket fails the listing as a whole, with the location in the message.
    let missing = list(
        &[Source::Path(format!("{scheme}://no-such-bucket/x/"))],
        &options,
        &storage,
    )
    .await;
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].starts_with(&format!(
            "ERROR listing {scheme}://no-such-bucket/x/ failed"
        )),
        "{missing:?}"
    );
}
