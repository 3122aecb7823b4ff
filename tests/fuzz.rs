//! Bounded fuzzing of every parser that reads untrusted bytes (issue 21, point 5):
//! the audio front end, the `.pt` reader, the safetensors header reader, pipeline
//! TOML, manifest lines, commit records and the JSON files of a FENSE model folder.
//!
//! Each target replays a small seed corpus (built here, or read in place from
//! `../shared/fixtures`, `tests/data/` and `pipelines/`) through a deterministic
//! mutator (bit flips, byte inserts and deletes, splices, length fields overwritten
//! with 0 / 0xFFFFFFFF / i64::MAX, numbers overwritten with absurd values,
//! truncation) driven by `SplitMix64`. Every input must come back as `Ok` or `Err`:
//! never a panic (`catch_unwind`), and never a single allocation above
//! [`ALLOCATION_CAP`] on the fuzzing thread (a watching global allocator, armed only
//! around each input, records the largest request).
//!
//! CI runs a few thousand inputs in all. `AUDIOCAP_FUZZ_ITERATIONS=N` runs N inputs
//! per target instead (`scripts/fuzz.sh`), and `AUDIOCAP_FUZZ_SEED` picks another
//! mutation stream. A failure prints the target, iteration and seed, and writes the
//! input to `target/fuzz-findings/`; findings become named regression tests next to
//! the code they fix.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

use audiocap::rng::SplitMix64;
use candle_core::{DType, Device};

use crate::common::fixtures;

/// The largest single allocation an input may ask for (a 4 GiB string or a Vec
/// sized by a record field asks for far more).
const ALLOCATION_CAP: usize = 256 << 20;

struct Watch;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = BIGGEST.try_with(|b| b.set(b.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the watch only
// reads and writes thread-local cells that never allocate.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static WATCH: Watch = Watch;

/// Inputs per target: `default` in CI, else `AUDIOCAP_FUZZ_ITERATIONS`.
fn iterations(default: usize) -> usize {
    std::env::var("AUDIOCAP_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("AUDIOCAP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21)
}

/// Small numbers in ASCII that parsers turn into sizes and counts.
const ABSURD_NUMBERS: &[&str] = &[
    "4000000000",
    "4294967296",
    "-1",
    "0",
    "1e309",
    "99999999999999999999999",
    "9223372036854775807",
    "-9223372036854775808",
    "NaN",
];

/// One mutation of `input`; `corpus` gives splice material.
fn mutate_once(rng: &mut SplitMix64, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let pos = |rng: &mut SplitMix64, len: usize| rng.below(len.max(1));
    match rng.below(10) {
        0 if !data.is_empty() => {
            let i = pos(rng, data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = pos(rng, data.len());
            data[i] = rng.next_u64() as u8;
        }
        2 => {
            let i = rng.below(data.len() + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if !data.is_empty() => {
            let i = pos(rng, data.len());
            let n = (1 + rng.below(32)).min(data.len() - i);
            data.drain(i..i + n);
        }
        4 if !corpus.is_empty() => {
            // Splice: our head, another input's tail.
            let other = &corpus[rng.below(corpus.len())];
            let cut = rng.below(data.len() + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        5 | 6 if data.len() >= 8 => {
            // A length field overwritten with an extreme value, little or big endian.
            let values: [&[u8]; 8] = [
                &0u32.to_le_bytes(),
                &u32::MAX.to_le_bytes(),
                &(i32::MAX as u32).to_le_bytes(),
                &0x8000_0000u32.to_be_bytes(),
                &i64::MAX.to_le_bytes(),
                &u64::MAX.to_le_bytes(),
                &i64::MAX.to_be_bytes(),
                &0xffffu16.to_le_bytes(),
            ];
            let value = values[rng.below(values.len())];
            let i = rng.below(data.len() - value.len() + 1);
            data[i..i + value.len()].copy_from_slice(value);
        }
        7 if !data.is_empty() => {
            data.truncate(rng.below(data.len()));
        }
        8 => {
            // A run of ASCII digits replaced by an absurd number.
            let digits: Vec<usize> = (0..data.len())
                .filter(|&i| data[i].is_ascii_digit())
                .collect();
            if digits.is_empty() {
                return;
            }
            let start = digits[rng.below(digits.len())];
            let end = (start..data.len())
                .find(|&i| !data[i].is_ascii_digit())
                .unwrap_or(data.len());
            let number = ABSURD_NUMBERS[rng.below(ABSURD_NUMBERS.len())];
            data.splice(start..end, number.bytes());
        }
        _ if !data.is_empty() => {
            // A chunk repeated (nesting, repeated records).
            let i = pos(rng, data.len());
            let n = (1 + rng.below(64)).min(data.len() - i);
            let chunk = data[i..i + n].to_vec();
            let times = 1 + rng.below(8);
            for _ in 0..times {
                data.splice(i..i, chunk.iter().copied());
            }
        }
        _ => {}
    }
}

fn mutate(rng: &mut SplitMix64, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        mutate_once(rng, &mut data, corpus);
    }
    data
}

fn save_finding(target: &str, iteration: usize, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{iteration}.bin"));
    let _ = std::fs::File::create(&path).and_then(|mut f| f.write_all(input));
    path
}

/// Runs `check` on the seeds (each must be accepted: `check` returns true), then on
/// `default` mutated inputs (or the env's count): each must return, accepted or not,
/// without panicking or asking for a huge allocation.
fn fuzz(target: &str, corpus: &[Vec<u8>], default: usize, mut check: impl FnMut(&[u8]) -> bool) {
    assert!(!corpus.is_empty(), "{target}: no seeds");
    let n = iterations(default);
    let mut rng = SplitMix64::derive(base_seed(), target.bytes().map(u64::from).sum());
    let started = Instant::now();
    // Panics are expected to be caught here, not printed for every input.
    let inputs = corpus
        .iter()
        .cloned()
        .chain((0..n).map(|_| mutate(&mut rng, corpus)));
    let mut accepted = 0;
    for (i, input) in inputs.enumerate() {
        BIGGEST.with(|b| b.set(0));
        ARMED.with(|a| a.set(true));
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
        ARMED.with(|a| a.set(false));
        let biggest = BIGGEST.with(|b| b.get());
        if i < corpus.len() {
            assert_eq!(
                outcome.as_ref().ok(),
                Some(&true),
                "{target}: seed {i} is not accepted"
            );
        }
        accepted += usize::from(outcome.as_ref().is_ok_and(|&ok| ok));
        if outcome.is_err() || biggest > ALLOCATION_CAP {
            let saved = save_finding(target, i, &input);
            panic!(
                "{target}: input {i} (seed {}) {}; saved to {}",
                base_seed(),
                if outcome.is_err() {
                    "panicked".to_string()
                } else {
                    format!("asked for a {biggest}-byte allocation")
                },
                saved.display()
            );
        }
    }
    eprintln!(
        "fuzz {target}: {} inputs ({accepted} accepted) in {:.1} s",
        corpus.len() + n,
        started.elapsed().as_secs_f64()
    );
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn audio_front_end() {
    // Every container and codec we decode (the clips are short).
    let mut corpus = Vec::new();
    for name in [
        "tone_s16.wav",
        "tone_u8.wav",
        "tone_f32.wav",
        "tone.flac",
        "tone.mp3",
        "tone.ogg",
        "tone_aac.m4a",
        "tone_alac.m4a",
        // Issue 28: AIFF, CAF, MPEG layer 2, Matroska, and Opus in its three containers.
        "tone.aiff",
        "tone.caf",
        "tone.mp2",
        "tone_vorbis.mka",
        "tone_opus.ogg",
        "tone_opus.webm",
        "tone_opus.mp4",
    ] {
        corpus.push(read(repo("tests/data/audio").join(name)));
    }
    fuzz("audio", &corpus, 1200, |input| {
        audiocap::audio::decode::decode_bytes(input, None).is_ok()
    });
}

/// A torch zip holding `pickle` as `archive/data.pkl` and the given storages.
fn torch_zip(pickle: &[u8], storages: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    for (name, data) in storages {
        zip.start_file(format!("archive/data/{name}"), options)
            .unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

#[test]
fn torch_checkpoints() {
    // The fixture's pickle and storages, re-zipped around mutated pickles (a
    // mutated zip alone mostly fails its CRC), plus mutated whole archives.
    let fixture = fixtures().join("beats-tiny/beats.pt");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&fixture).unwrap()).unwrap();
    let mut pickle = Vec::new();
    let mut storages = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if name.ends_with("data.pkl") {
            pickle = data;
        } else if let Some((_, key)) = name.split_once("/data/") {
            storages.push((key.to_string(), data));
        }
    }
    assert!(!pickle.is_empty() && !storages.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.pt");
    let load = |bytes: &[u8]| {
        std::fs::write(&file, bytes).unwrap();
        let tensors = audiocap::model::checkpoint::read_torch_state_dict(&file, Some("model"));
        let value = audiocap::model::checkpoint::read_torch_value(&file);
        tensors.is_ok() && value.is_ok()
    };
    fuzz("pickle", std::slice::from_ref(&pickle), 1000, |input| {
        load(&torch_zip(input, &storages))
    });
    let whole = vec![torch_zip(&pickle, &storages), read(&fixture)];
    fuzz("torch-zip", &whole, 300, load);
}

#[test]
fn safetensors_headers() {
    let mut corpus = vec![read(
        fixtures().join("e2e-tiny/adapters/a0/adapter_model.safetensors"),
    )];
    // A tiny file with a few dtypes, built here.
    let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"c":{"dtype":"I64","shape":[1],"data_offsets":[22,30]},"__metadata__":{"format":"pt"}}"#;
    let mut tiny = (header.len() as u64).to_le_bytes().to_vec();
    tiny.extend(header.as_bytes());
    tiny.extend([0u8; 30]);
    corpus.push(tiny);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.safetensors");
    fuzz("safetensors", &corpus, 1500, |input| {
        std::fs::write(&file, input).unwrap();
        let origin = dir.path();
        match audiocap::model::weights::Weights::from_safetensors(
            origin,
            std::slice::from_ref(&file),
            DType::F32,
            &Device::Cpu,
        ) {
            // Integer tensors are refused by get_any_shape (not a float weight).
            Ok(w) => w
                .names()
                .iter()
                .all(|name| w.get_any_shape(name).is_ok() || name == "c"),
            Err(_) => false,
        }
    });
}

#[test]
fn pipeline_toml() {
    let corpus: Vec<Vec<u8>> = std::fs::read_dir(repo("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        // The caption pipelines (the others are training recipes).
        .filter(|p| !p.file_name().unwrap().to_string_lossy().contains("train"))
        .map(read)
        .collect();
    assert!(corpus.len() >= 3, "{} pipelines", corpus.len());
    fuzz("pipeline-toml", &corpus, 1500, |input| {
        let text = String::from_utf8_lossy(input);
        match audiocap::pipeline::config::PipelineConfig::parse(&text, "p.toml", &[]) {
            Ok(config) => {
                let _ = config.validate();
                let _ = config.to_toml();
                true
            }
            Err(_) => false,
        }
    });
}

#[test]
fn manifest_lines() {
    let corpus: Vec<Vec<u8>> = [
        "uri,label\na.wav,x\n\"b,c.wav\",y\n\"q\"\"uote.wav\",z\n,empty\n",
        "{\"uri\": \"a.wav\", \"n\": 1}\n{\"uri\": \"s3://b/k.flac\"}\n\n{\"uri\": 5}\n",
        "# comment\na.wav\n  sub/b.mp3  \n/abs/c.ogg\nhttps://h/x.wav\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut turn = 0usize;
    fuzz("manifest", &corpus, 600, |input| {
        // Each input as every line format in turn.
        let ext = ["csv", "jsonl", "txt", "tsv"][turn % 4];
        turn += 1;
        let file = dir.path().join(format!("m.{ext}"));
        std::fs::write(&file, input).unwrap();
        let sources = [audiocap::storage::Source::Manifest {
            manifest: file.to_string_lossy().into_owned(),
            column: None,
        }];
        let options = audiocap::storage::ListOptions::default();
        let storage = audiocap::storage::StorageOptions::default();
        runtime.block_on(async {
            use futures::StreamExt;
            match audiocap::storage::list_inputs(&sources, &options, &storage) {
                Ok(stream) => stream.collect::<Vec<_>>().await.iter().all(|r| r.is_ok()),
                Err(_) => false,
            }
        })
    });
}

#[test]
fn commit_records() {
    let record = |index: u32, count: u32, parts: &str| {
        format!(
            r#"{{"shard_index": {index}, "shard_count": {count}, "run_id": "r{index}",
  "parts": [{parts}], "rows": 10, "inputs": 5, "bytes": 1000,
  "committed_at_us": 1700000000000000, "run": {{"config": "abc", "n": [1, 2.5, null]}},
  "shard_parts": ["part-0000{index}-of-0000{count}-r-00000.zstd.parquet"],
  "model": "m1", "config_digest": "d1"}}"#
        )
    };
    let part = r#"{"name": "part-00000-of-00002-r-00000.zstd.parquet", "rows": 10, "inputs": 5, "bytes": 1000}"#;
    let corpus = vec![
        record(0, 2, part).into_bytes(),
        record(1, 2, "").into_bytes(),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    fuzz("commit-record", &corpus, 1500, |input| {
        use object_store::ObjectStoreExt;
        let parsed = serde_json::from_slice::<audiocap::dataset::ShardCommitRecord>(input);
        let store = object_store::memory::InMemory::new();
        let prefix = object_store::path::Path::from("out");
        runtime.block_on(async {
            let path = object_store::path::Path::from("out/_commits/shard-00000-of-00002/r.json");
            store
                .put(&path, object_store::PutPayload::from(input.to_vec()))
                .await
                .unwrap();
            let status = audiocap::dataset::dataset_status(&store, &prefix).await;
            let _ = audiocap::dataset::finalize(&store, &prefix).await;
            parsed.is_ok() && status.is_ok()
        })
    });
}

#[test]
fn the_watch_sees_a_huge_allocation() {
    BIGGEST.with(|b| b.set(0));
    ARMED.with(|a| a.set(true));
    // Reserved, never touched: costs address space only.
    let huge: Vec<u8> = Vec::with_capacity(ALLOCATION_CAP + 1);
    ARMED.with(|a| a.set(false));
    drop(huge);
    assert!(BIGGEST.with(|b| b.get()) > ALLOCATION_CAP);
}

#[test]
fn fense_model_folders() {
    // A Sentence-BERT folder as published (the fense-tiny fixture's, read through
    // links; its vocab.txt rather than the 700 kB tokenizer.json, to keep each input
    // cheap) with one of its JSON files mutated.
    let fixture = fixtures().join("fense-tiny/sbert");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sbert");
    std::fs::create_dir_all(folder.join("1_Pooling")).unwrap();
    let files = [
        "modules.json",
        "1_Pooling/config.json",
        "config.json",
        "sentence_bert_config.json",
        "tokenizer_config.json",
    ];
    for name in ["model.safetensors", "vocab.txt"] {
        std::os::unix::fs::symlink(fixture.join(name), folder.join(name)).unwrap();
    }
    for name in files {
        std::fs::copy(fixture.join(name), folder.join(name)).unwrap();
    }
    for name in files {
        let seed = read(fixture.join(name));
        fuzz(
            &format!("sbert {name}"),
            std::slice::from_ref(&seed),
            60,
            |input| {
                std::fs::write(folder.join(name), input).unwrap();
                audiocap::eval::fense::SentenceBert::load(&folder, &Device::Cpu)
                    .and_then(|m| m.embed(&["a dog barks"]))
                    .is_ok()
            },
        );
        std::fs::write(folder.join(name), &seed).unwrap();
    }
}
