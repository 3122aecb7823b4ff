//! The bundled default model's recipe (scripts/build-default-model.sh) end to end on
//! a tiny corpus, through the same commands at toy sizes: corpus build, encoder
//! pre-training (tagger), decoder pre-training (language model + tokenizer), the
//! captioner's two stages (projector + LoRA, then LoRA runs merged by `cat`), ONNX
//! export, captions of the test split and their metrics. CI does not retrain the real
//! model; this proves the path it takes still runs.

use std::path::Path;

use crate::corpus_build::{audiocap, build_deb, ok, write_catalog};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_default_model_recipe_runs_end_to_end_at_toy_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (deb, sha) = build_deb(d);
    let catalog = write_catalog(d, &sha);
    let corpus = d.join("corpus");
    ok(&audiocap(&[
        "corpus",
        "build",
        "--catalog",
        &s(&catalog),
        "--out",
        &s(&corpus),
        "--debs",
        &s(deb.parent().unwrap()),
        "--cache",
        &s(&d.join("cache")),
    ]));

    // Encoder: a one-layer BEATs tagger, a few epochs.
    let enc_settings = d.join("encoder.toml");
    write(
        &enc_settings,
        "embed_dim = 16\nencoder_layers = 1\nencoder_embed_dim = 32\nencoder_ffn_embed_dim = 64\n\
         encoder_attention_heads = 2\nconv_pos = 8\nconv_pos_groups = 2\nnum_buckets = 16\n\
         max_distance = 64\nepochs = 3\nbatch_size = 8\npeak_lr = 3e-3\n",
    );
    let encoder = d.join("encoder");
    let pretrain_encoder = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "pretrain".to_string(),
            "encoder".into(),
            "--settings".into(),
            s(&enc_settings),
            "--manifest".into(),
            s(&corpus.join("train.csv")),
            "--audio".into(),
            s(&corpus.join("audio/train")),
            "--validation".into(),
            s(&corpus.join("validation.csv")),
            "--validation-audio".into(),
            s(&corpus.join("audio/validation")),
            "--min-clips-per-label".into(),
            "1".into(),
            "--out".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        ok(&audiocap(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    };
    let out = pretrain_encoder(&[], &encoder);
    assert!(out.contains("encoder:"), "{out}");
    // The baselines the model card compares the encoder with, in pretrain.json and
    // on their own (--baselines-only): the same figures.
    assert!(out.contains("fbank probe mAP"), "{out}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(encoder.join("pretrain.json")).unwrap()).unwrap();
    let best = summary["best_epoch"].as_u64().unwrap() as usize;
    assert_eq!(
        summary["best_validation"]["map"],
        summary["validation_map"][best - 1]
    );
    let probe = summary["baselines"]["fbank_probe"]["map"].as_f64().unwrap();
    let prior = summary["baselines"]["label_prior"]["map"].as_f64().unwrap();
    assert!(prior > 0.0 && prior < probe && probe <= 1.0, "{summary}");
    let baselines_dir = d.join("baselines");
    let out = pretrain_encoder(&["--baselines-only"], &baselines_dir);
    assert!(out.contains("label prior mAP"), "{out}");
    let alone: serde_json::Value =
        serde_json::from_slice(&std::fs::read(baselines_dir.join("baselines.json")).unwrap())
            .unwrap();
    assert_eq!(alone, summary["baselines"]);
    assert!(!baselines_dir.join("encoder.safetensors").exists());
    let labels: Vec<String> =
        serde_json::from_slice(&std::fs::read(encoder.join("labels.json")).unwrap()).unwrap();
    for l in ["dog", "bell", "rain", "wind", "beeps"] {
        assert!(labels.contains(&l.to_string()), "{labels:?}");
    }

    // Decoder: a two-layer Llama with a 300-token tokenizer, the label words in the
    // audio slot (the recipe's setting: the CLI reads the manifests' labels column).
    let dec_settings = d.join("decoder.toml");
    write(
        &dec_settings,
        "vocab_size = 300\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\n\
         num_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 128\n\
         epochs = 3\nbatch_size = 8\npeak_lr = 3e-3\naudio_slot = \"labels\"\n",
    );
    let decoder = d.join("decoder");
    ok(&audiocap(&[
        "pretrain",
        "decoder",
        "--settings",
        &s(&dec_settings),
        "--captions",
        &s(&corpus.join("train.csv")),
        "--validation",
        &s(&corpus.join("validation.csv")),
        "--out",
        &s(&decoder),
    ]));
    let pretrain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(decoder.join("pretrain.json")).unwrap()).unwrap();
    assert_eq!(pretrain["settings"]["audio_slot"], "labels");

    // The captioner: the recipe's two stages, at a few epochs.
    let run = d.join("captioner");
    let train = format!(
        "train = {{ captions = \"{c}/train.csv\", audio = \"{c}/audio/train\" }}\n\
         validation = {{ captions = \"{c}/validation.csv\", audio = \"{c}/audio/validation\" }}\n",
        c = s(&corpus)
    );
    let config = d.join("train.toml");
    write(
        &config,
        &format!(
            "[model]\nbeats = \"{enc}\"\nllm = \"{dec}\"\ndtype = \"f32\"\ndevice = \"cpu\"\noutput = \"{run}\"\n\
             [lora]\nr = 4\nalpha = 8\ndropout = 0.05\ntarget_modules = [\"q_proj\", \"k_proj\"]\n\
             [features]\ncache = \"{cache}\"\nmax_seconds = 10.0\n\
             [optimizer]\npeak_lr = 1e-3\n\
             [training]\nbatch_size = 8\neval_every_epochs = 2\neval_max_clips = 8\neval_max_new_tokens = 12\n\
             [[stages]]\nname = \"corpus\"\nepochs = 2\n{train}\n\
             [[stages]]\nname = \"merge\"\nepochs = 1\ntrain_projector = false\nlora_init = \"fresh\"\n\
             seeds = [1]\nmerge_with_previous = true\n{train}",
            enc = s(&encoder.join("encoder.safetensors")),
            dec = s(&decoder),
            run = s(&run),
            cache = s(&d.join("features")),
        ),
    );
    ok(&audiocap(&["train", &s(&config)]));
    let adapter: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.join("final/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    // Two runs merged by concatenation: rank 2 × 4.
    assert_eq!(adapter["r"], 8, "{adapter}");

    // Export, caption the test split, score it.
    let model = d.join("model");
    ok(&audiocap(&[
        "export",
        "--beats",
        &s(&encoder.join("encoder.safetensors")),
        "--llm",
        &s(&decoder),
        "--projector",
        &s(&run.join("final/projector.safetensors")),
        "--adapter",
        &s(&run.join("final/adapter")),
        "--name",
        "toy",
        "--out",
        &s(&model),
    ]));
    // Its throughput through the repository's benchmark (the model card's speed).
    let bench = d.join("bench.json");
    ok(&audiocap(&[
        "bench",
        "--model",
        &s(&model),
        "--repetitions",
        "1",
        "--batch-sizes",
        "1",
        "--encoder-batch",
        "2",
        "--e2e-batch",
        "2",
        "--clip-seconds",
        "2",
        "--quiet",
        "--work-dir",
        &s(&d.join("bench")),
        "--json",
        &s(&bench),
    ]));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bench).unwrap()).unwrap();
    assert!(
        report["model_dir"].as_str().unwrap().ends_with("model"),
        "{report}"
    );
    let e2e = report["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["stage"] == "end_to_end")
        .unwrap_or_else(|| panic!("{report}"));
    assert!(e2e["mean"].as_f64().unwrap() > 0.0, "{e2e}");
    let captions = d.join("captions.parquet");
    ok(&audiocap(&[
        "caption",
        "--model",
        &s(&model),
        "--out",
        &s(&captions),
        &s(&corpus.join("audio/test")),
    ]));
    let metrics = d.join("metrics.json");
    ok(&audiocap(&[
        "eval",
        "--pred",
        &s(&captions),
        "--refs",
        &s(&corpus.join("test.csv")),
        "--out",
        &s(&metrics),
        "--no-java-metrics",
    ]));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert!(m["scores"]["cider_d"].is_number(), "{m}");
    // The model card's reference points: the best constant caption among the
    // training captions, and how often a caption names its clip's sound.
    let report = ok(&audiocap(&[
        "eval",
        "--pred",
        &s(&captions),
        "--refs",
        &s(&corpus.join("test.csv")),
        "--out",
        &s(&metrics),
        "--no-java-metrics",
        "--constant-baseline",
        &s(&corpus.join("train.csv")),
        "--labels-column",
        "labels",
    ]));
    assert!(report.contains("best constant caption of"), "{report}");
    assert!(report.contains("class word named"), "{report}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    let b = &m["baselines"];
    assert!(
        b["best_constant_caption"]["cider_d"].as_f64().unwrap() > 0.0,
        "{b}"
    );
    let rate = b["class_word_rate"]["rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate), "{b}");
    assert!(
        b["class_word_rate"]["labelled_predictions"]
            .as_u64()
            .unwrap()
            > 0,
        "{b}"
    );
}

#[test]
fn bad_pretraining_settings_are_all_listed_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    write(
        &bad,
        "num_attention_heads = 3\nepochs = 0\npeak_lr = -1.0\n",
    );
    let out = audiocap(&[
        "pretrain",
        "decoder",
        "--captions",
        "unused.csv",
        "--out",
        "unused",
        "--settings",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in ["num_attention_heads", "epochs", "peak_lr"] {
        assert!(err.contains(expected), "{expected} missing in {err}");
    }
    write(&bad, "encoder_layers = 2\nlayers = 3\n");
    let out = audiocap(&[
        "pretrain",
        "encoder",
        "--manifest",
        "m.csv",
        "--audio",
        "a",
        "--out",
        "o",
        "--settings",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("layers"));
}

/// The bundled default model (exported_models/audiocap-sounds-small) on the bundled
/// samples (exported_models/samples: test-split clips the model never trained on):
/// every sample gets a caption of plain English words without chat special tokens or
/// repetition loops, and most captions name their clip's sound.
#[test]
fn the_bundled_model_captions_the_samples_fluently() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = repo.join("exported_models/audiocap-sounds-small");
    let samples = repo.join("exported_models/samples");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(manifest["name"], "audiocap-sounds-small");
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("captions.parquet");
    ok(&audiocap(&[
        "caption",
        "--model",
        model.to_str().unwrap(),
        "--out",
        parquet.to_str().unwrap(),
        samples.to_str().unwrap(),
    ]));

    let labels: std::collections::HashMap<String, Vec<String>> =
        csv::Reader::from_path(samples.join("samples.csv"))
            .unwrap()
            .deserialize::<std::collections::HashMap<String, String>>()
            .map(|row| {
                let row = row.unwrap();
                let labels = row["labels"].split(';').map(str::to_string).collect();
                (row["file_name"].clone(), labels)
            })
            .collect();
    let file = std::fs::File::open(&parquet).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut seen = 0;
    let mut named = 0;
    for batch in reader {
        let batch = batch.unwrap();
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<arrow_array::StringArray>()
                .unwrap()
                .clone()
        };
        let (uris, captions, errors) = (column("uri"), column("caption"), column("error"));
        for i in 0..batch.num_rows() {
            use arrow_array::Array;
            let name = Path::new(uris.value(i))
                .file_name()
                .unwrap()
                .to_string_lossy();
            assert!(errors.is_null(i), "{name}: {}", errors.value(i));
            let caption = captions.value(i);
            let words = audiocap::eval::baselines::words(caption);
            assert!(
                (2..=30).contains(&words.len()),
                "{name}: {caption:?} is not a caption"
            );
            assert!(
                !caption.contains("<|") && caption.chars().all(|c| !c.is_control()),
                "{name}: special tokens or control characters in {caption:?}"
            );
            // No loops: no word three times in a row, no word pair three times over.
            assert!(
                !words.windows(3).any(|w| w[0] == w[1] && w[1] == w[2]),
                "{name}: {caption:?} repeats a word"
            );
            let pairs: Vec<&[String]> = words.windows(2).collect();
            assert!(
                !pairs
                    .iter()
                    .any(|p| pairs.iter().filter(|q| q == &p).count() >= 3),
                "{name}: {caption:?} loops"
            );
            if audiocap::eval::baselines::mentions_label(caption, &labels[name.as_ref()]) {
                named += 1;
            }
            seen += 1;
        }
    }
    assert_eq!(seen, labels.len());
    assert!(
        named * 2 >= seen,
        "only {named} of {seen} sample captions name their clip's sound"
    );
}
