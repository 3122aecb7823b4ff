//! Sound-event tags and audio embeddings beside the captions (issue 25): a pipeline
//! on the fine-tuned tiny BEATs writes a dataset with `tags` and `embedding`, and
//! DuckDB answers the README's queries on it; `audiocap caption` writes the f16
//! projector embedding; models that cannot give what is asked for are refused before
//! anything runs; a retried run carries the columns over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use audiocap::pipeline::PipelineConfig;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::fixtures;

/// The tiny captioner with the fine-tuned BEATs encoder, exported once per process
/// (into the temp folder; exports of ended test processes are removed first).
fn tagger_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        crate::common::export_per_process("audiocap-tagger-model-", |dir| {
            crate::common::export_tiny_tagger(dir, &[])
        })
    })
}

fn audiocap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running audiocap")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The four fixture clips and a file that is not audio.
fn audio_folder(dir: &Path) -> PathBuf {
    let audio = dir.join("audio");
    std::fs::create_dir_all(&audio).unwrap();
    for clip in [
        "chirp_2p5s.wav",
        "clipped_1s.wav",
        "noise_0p3s.wav",
        "sine_1s.wav",
    ] {
        std::fs::copy(
            fixtures().join("e2e-tiny/audio").join(clip),
            audio.join(clip),
        )
        .unwrap();
    }
    std::fs::write(audio.join("broken.wav"), b"not a wav file").unwrap();
    audio
}

fn write_pipeline(dir: &Path, model: &Path, audio: &Path, out: &Path, output: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
[input]
sources = ["{audio}"]
[batching]
batch_size = 2
[generation]
max_new_tokens = 3
[workers]
decode_threads = 2
[output]
uri = "{out}"
{output}
[run]
resume = true
max_failed_fraction = 1.0
[logging]
progress = "off"
"#,
        model = model.display(),
        audio = audio.display(),
        out = out.display(),
    );
    let name = out.file_name().unwrap().to_string_lossy();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Every row of the Parquet files under `path` (a file or a dataset folder).
fn read_rows(path: &Path) -> (Vec<RecordBatch>, Vec<(String, Option<String>)>) {
    let files = crate::common::parquet_files(path);
    let mut batches = Vec::new();
    let mut footer = Vec::new();
    for file in files {
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file).unwrap()).unwrap();
        for kv in builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .cloned()
            .unwrap_or_default()
        {
            footer.push((kv.key, kv.value));
        }
        batches.extend(builder.build().unwrap().map(Result::unwrap));
    }
    (batches, footer)
}

/// Per file name: its tags (label, score) and embedding, `None` for an error row.
type ClipColumns = BTreeMap<String, Option<(Vec<(String, f32)>, Vec<f32>)>>;

fn clip_columns(batches: &[RecordBatch]) -> ClipColumns {
    let mut clips = BTreeMap::new();
    for batch in batches {
        let uri = batch.column_by_name("uri").unwrap().as_string::<i32>();
        let tags = batch.column_by_name("tags").unwrap().as_list::<i32>();
        let embedding = batch
            .column_by_name("embedding")
            .unwrap()
            .as_fixed_size_list();
        for i in 0..batch.num_rows() {
            let name = Path::new(uri.value(i))
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if tags.is_null(i) {
                assert!(embedding.is_null(i), "{name}: an embedding without tags");
                clips.insert(name, None);
                continue;
            }
            let entries = tags.value(i);
            let entries = entries.as_struct();
            let labels = entries.column(0).as_string::<i32>();
            let scores = entries.column(1).as_primitive::<Float32Type>();
            let tags = (0..entries.len())
                .map(|j| (labels.value(j).to_string(), scores.value(j)))
                .collect();
            let values = embedding.value(i);
            let values: Vec<f32> = match values.data_type() {
                DataType::Float16 => values
                    .as_primitive::<Float16Type>()
                    .values()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
                _ => values.as_primitive::<Float32Type>().values().to_vec(),
            };
            clips.insert(name, Some((tags, values)));
        }
    }
    clips
}

fn duckdb(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "DuckDB failed (pip install duckdb): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// A run on the tagger writes the default 5 tags (by score) and the encoder
/// embedding (48 values, kind and dimension in the footer); DuckDB finds the clips
/// tagged Siren above 0.5 (the reference says chirp and noise) and the nearest clips
/// by cosine similarity; `--retry-failed` carries both columns over.
#[test]
fn a_dataset_with_tags_and_embeddings_answers_the_readme_queries() {
    let dir = tempfile::tempdir().unwrap();
    let audio = audio_folder(dir.path());
    let out = dir.path().join("captions");
    let pipeline = write_pipeline(
        dir.path(),
        tagger_model(),
        &audio,
        &out,
        "embedding = \"encoder\"",
    );
    let check = audiocap(&["run", pipeline.to_str().unwrap(), "--check"]);
    assert!(check.status.success(), "{}", text(&check));
    let run = audiocap(&["run", pipeline.to_str().unwrap()]);
    assert!(run.status.success(), "{}", text(&run));
    let (batches, footer) = read_rows(&out);
    let value = |k: &str| {
        footer
            .iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| v.clone())
    };
    assert_eq!(value("audiocap.embedding_kind").as_deref(), Some("encoder"));
    assert_eq!(value("audiocap.embedding_dim").as_deref(), Some("48"));
    assert_eq!(value("audiocap.embedding_dtype").as_deref(), Some("f32"));
    let clips = clip_columns(&batches);
    assert_eq!(clips.len(), 5, "{clips:?}");
    assert_eq!(clips["broken.wav"], None);
    let reference = crate::common::load_safetensors("beats-tiny-tagger/reference.safetensors");
    for (name, columns) in &clips {
        let Some((tags, embedding)) = columns else {
            continue;
        };
        assert_eq!(tags.len(), 5, "{name}: {tags:?}");
        assert!(
            tags.windows(2).all(|w| w[0].1 >= w[1].1),
            "{name}: {tags:?}"
        );
        assert_eq!(embedding.len(), 48);
        // The WAV clips are the reference waveforms in 16 bits, through our fbank
        // (whose pure-tone bins differ from the reference's float32 noise: see the
        // fixtures' README), hence a looser bound than the model's 1e-4.
        let want = reference[&format!("{}.tag_probs", name.trim_end_matches(".wav"))]
            .to_vec1::<f32>()
            .unwrap();
        let labels = crate::common::TAGGER_LABELS;
        for (label, score) in tags {
            let i = labels.iter().position(|l| l == label).unwrap();
            assert!(
                (score - want[i]).abs() < 5e-3,
                "{name} {label}: {score} vs {}",
                want[i]
            );
        }
    }

    // The README's queries.
    let glob = format!("{}/*.parquet", out.display());
    let sirens = duckdb(&format!(
        "import duckdb\n\
         rows = duckdb.sql(\"\"\"select regexp_extract(uri, '[^/]*$') as name\n\
           from (select uri, unnest(tags) as t from read_parquet('{glob}'))\n\
           where t.label = 'Siren' and t.score > 0.5 order by name\"\"\").fetchall()\n\
         print(','.join(r[0] for r in rows))"
    ));
    assert_eq!(sirens, "chirp_2p5s.wav,noise_0p3s.wav");
    let target = audio.join("chirp_2p5s.wav").display().to_string();
    let nearest = duckdb(&format!(
        "import duckdb\n\
         rows = duckdb.sql(\"\"\"select regexp_extract(uri, '[^/]*$'),\n\
             array_cosine_similarity(embedding::FLOAT[48],\n\
               (select embedding::FLOAT[48] from read_parquet('{glob}') where uri = '{target}')) as sim\n\
           from read_parquet('{glob}') where embedding is not null order by sim desc limit 10\"\"\").fetchall()\n\
         print(';'.join(f'{{n}}={{s:.5f}}' for n, s in rows))"
    ));
    let query = clips["chirp_2p5s.wav"].as_ref().unwrap().1.clone();
    let mut expected: Vec<(String, f64)> = clips
        .iter()
        .filter_map(|(n, c)| c.as_ref().map(|(_, e)| (n.clone(), cosine(&query, e))))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    let expected: Vec<String> = expected
        .iter()
        .map(|(n, s)| format!("{n}={s:.5}"))
        .collect();
    assert_eq!(nearest, expected.join(";"));
    assert!(nearest.starts_with("chirp_2p5s.wav=1.00000"), "{nearest}");

    // Fused attention with continuous batching and the encoder on its own thread
    // (the GPU configuration): the same tags and embeddings.
    let fused = dir.path().join("fused-model");
    crate::common::export_tiny_tagger(&fused, &["--attention", "fused"]);
    let fused_out = dir.path().join("fused-captions");
    let fused_pipeline = write_pipeline(
        dir.path(),
        &fused,
        &audio,
        &fused_out,
        "embedding = \"encoder\"",
    );
    let run = audiocap(&[
        "run",
        fused_pipeline.to_str().unwrap(),
        "--set",
        "batching.decoder_rows=3",
        "--set",
        "batching.encoder_thread=true",
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let continuous = clip_columns(&read_rows(&fused_out).0);
    assert_eq!(
        continuous.keys().collect::<Vec<_>>(),
        clips.keys().collect::<Vec<_>>()
    );
    for (name, columns) in &continuous {
        match (columns, &clips[name]) {
            (None, None) => {}
            (Some((tags, emb)), Some((want_tags, want_emb))) => {
                let labels =
                    |t: &[(String, f32)]| t.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
                assert_eq!(labels(tags), labels(want_tags), "{name}");
                for (a, b) in tags
                    .iter()
                    .zip(want_tags)
                    .map(|(a, b)| (a.1, b.1))
                    .chain(emb.iter().zip(want_emb).map(|(a, b)| (*a, *b)))
                {
                    assert!((a - b).abs() < 1e-4, "{name}: {a} vs {b}");
                }
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    // --retry-failed: the part holding broken.wav is replaced by one with the other
    // rows, their tags and embeddings as they were.
    let retry = audiocap(&["run", pipeline.to_str().unwrap(), "--retry-failed"]);
    assert!(retry.status.success(), "{}", text(&retry));
    let (batches, _) = read_rows(&out);
    assert_eq!(clip_columns(&batches), clips);
    let replaced = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("parquet")
        })
        .count();
    assert!(
        replaced >= 2,
        "a replacement part and the retried input's part"
    );
}

/// `audiocap caption` with the flags: top 2 tags above 0.3, the projector embedding
/// (the decoder's 64 values) in f16; DuckDB reads it.
#[test]
fn caption_writes_f16_projector_embeddings_and_filtered_tags() {
    let dir = tempfile::tempdir().unwrap();
    let audio = audio_folder(dir.path());
    let out = dir.path().join("captions.parquet");
    let run = audiocap(&[
        "caption",
        "--model",
        tagger_model().to_str().unwrap(),
        "--tags",
        "2",
        "--min-tag-score",
        "0.8",
        "--embedding",
        "projector",
        "--embedding-dtype",
        "f16",
        "--max-new-tokens",
        "3",
        "--out",
        out.to_str().unwrap(),
        audio.to_str().unwrap(),
    ]);
    // broken.wav is an error row: exit code 3.
    assert_eq!(run.status.code(), Some(3), "{}", text(&run));
    let (batches, footer) = read_rows(&out);
    assert!(footer.contains(&("audiocap.embedding_kind".into(), Some("projector".into()))));
    assert!(footer.contains(&("audiocap.embedding_dim".into(), Some("64".into()))));
    let field = batches[0]
        .schema()
        .field_with_name("embedding")
        .unwrap()
        .clone();
    assert_eq!(
        field.data_type(),
        &DataType::FixedSizeList(
            std::sync::Arc::new(arrow_schema::Field::new("item", DataType::Float16, false)),
            64
        )
    );
    let clips = clip_columns(&batches);
    // Reference: chirp's best is Siren 0.832 (then Dog 0.719 < 0.8); sine's Bird
    // 0.999, Music 0.994 (Speech 0.990 is third).
    let labels = |name: &str| -> Vec<String> {
        clips[name]
            .as_ref()
            .unwrap()
            .0
            .iter()
            .map(|t| t.0.clone())
            .collect()
    };
    assert_eq!(labels("chirp_2p5s.wav"), ["Siren"]);
    assert_eq!(
        labels("sine_1s.wav"),
        ["Bird vocalization, bird call, bird song", "Music"]
    );
    assert!(clips.values().flatten().all(|(_, e)| e.len() == 64));
    let read = duckdb(&format!(
        "import duckdb\n\
         print(duckdb.sql(\"select count(embedding), max(len(embedding)) from read_parquet('{}')\").fetchall()[0])",
        out.display()
    ));
    assert_eq!(read, "(4, 64)");
}

/// Asked for what the model cannot give, `--check`, `run` and `caption` say so
/// (exit 2) before any work: tags from a model without a tagging head, the encoder
/// embedding from an export from before that output (the bundled model); bad
/// values are listed together with the file's other problems.
#[test]
fn tags_and_embeddings_the_model_lacks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let audio = audio_folder(dir.path());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundled = repo.join("exported_models/audiocap-sounds-small");
    let pipeline = write_pipeline(
        dir.path(),
        &bundled,
        &audio,
        &dir.path().join("out"),
        "tags = 3\nembedding = \"encoder\"",
    );
    for args in [
        vec!["run", pipeline.to_str().unwrap(), "--check"],
        vec!["run", pipeline.to_str().unwrap()],
    ] {
        let out = audiocap(&args);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(
            said.contains("output.tags: the model audiocap-sounds-small has no tags"),
            "{said}"
        );
        assert!(said.contains("output.embedding: \"encoder\""), "{said}");
        assert!(said.contains("re-export it"), "{said}");
    }
    assert!(!dir.path().join("out").exists());
    let out = audiocap(&[
        "caption",
        "--model",
        bundled.to_str().unwrap(),
        "--tags",
        "2",
        "--out",
        dir.path().join("c.parquet").to_str().unwrap(),
        audio.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--tags: the model audiocap-sounds-small has no tags"));
    // The bundled model's projector embedding needs nothing new.
    let projector = write_pipeline(
        dir.path(),
        &bundled,
        &audio,
        &dir.path().join("out"),
        "embedding = \"projector\"",
    );
    let out = audiocap(&["run", projector.to_str().unwrap(), "--check"]);
    assert!(out.status.success(), "{}", text(&out));

    let err = PipelineConfig::parse(
        "[model]\npath = \"m\"\n[input]\nsources = [\"a/\"]\n[output]\nuri = \"o\"\n\
         embedding = \"pca\"\nembedding_dtype = \"f8\"\nmin_tag_score = 2.0\ntags = 200000\n",
        "p.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    for part in [
        "output.embedding",
        "unknown variant `pca`",
        "output.embedding_dtype",
        "output.min_tag_score: must be a probability between 0 and 1, got 2",
        "output.tags: 200000: must be between 0 and 100000",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
}
