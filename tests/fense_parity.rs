//! FENSE, SBERT-sim, the fluency error rate and SPIDEr-FL against the reference
//! (aac-metrics 0.6.0 on tiny random weights in the published formats:
//! `fense-tiny/reference.json` and `embeddings.safetensors`), step by step: token ids,
//! hidden states, pooled and normalised embeddings, the detector's [CLS] state and
//! probabilities, then every per-candidate number and the corpus scores.

use std::path::{Path, PathBuf};

use audiocap::eval::fense::{FenseModels, FensePaths, SentenceBert, penalty_factor};
use audiocap::model::bert::pad_batch;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::common::{fixtures, load_safetensors, max_abs_diff};

const TOLERANCE: f64 = 1e-5;

#[derive(Deserialize)]
struct Reference {
    corpus: Corpus,
    candidates: Vec<Candidate>,
    debug_sentences: Vec<Debug>,
}

#[derive(Deserialize)]
struct Corpus {
    sbert_sim: f64,
    fer: f64,
    fense: f64,
    spider_fl: f64,
}

#[derive(Deserialize)]
struct Candidate {
    candidate: String,
    references: Vec<String>,
    sbert_sim: f64,
    p_error: f64,
    has_error: bool,
    penalty_factor: f64,
    fense: f64,
    spider_input: f64,
    spider_fl: f64,
}

#[derive(Deserialize)]
struct Debug {
    key: String,
    text: String,
    echecker_text: String,
}

fn dir() -> PathBuf {
    fixtures().join("fense-tiny")
}

fn reference() -> Reference {
    let path = dir().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("parsing reference.json")
}

/// The candidates and their reference lists.
fn pairs(reference: &Reference) -> (Vec<String>, Vec<Vec<String>>) {
    reference
        .candidates
        .iter()
        .map(|c| (c.candidate.clone(), c.references.clone()))
        .unzip()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

fn models() -> FenseModels {
    FenseModels::load(&FensePaths::in_dir(dir())).expect("loading the fixture models")
}

fn close(label: &str, ours: f64, theirs: f64) {
    let diff = (ours - theirs).abs();
    eprintln!("{label}: ours {ours:.9} reference {theirs:.9} diff {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "{label}: ours {ours} reference {theirs} (diff {diff:e})"
    );
}

#[test]
fn tokens_hidden_states_and_embeddings_match_the_reference() {
    let reference = reference();
    let tensors = load_safetensors("fense-tiny/embeddings.safetensors");
    let m = models();
    for d in &reference.debug_sentences {
        let k = &d.key;
        // Sentence-BERT: ids, last hidden state, mean pooled, normalised.
        let sbert_ids = m.sbert.tokenize(&d.text).unwrap();
        assert_eq!(
            sbert_ids,
            ids(&tensors[&format!("{k}.sbert.input_ids")]),
            "{k} sbert ids"
        );
        let (batch, mask) = pad_batch(&[&sbert_ids], 0, &Device::Cpu).unwrap();
        let hidden = m
            .sbert
            .model()
            .forward(&batch, &mask)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = &tensors[&format!("{k}.sbert.token_embeddings")];
        assert!(
            max_abs_diff(&hidden, want) <= 1e-5,
            "{k} token embeddings: {}",
            max_abs_diff(&hidden, want)
        );
        let embedding =
            Tensor::new(m.sbert.embed(&[&d.text]).unwrap().remove(0), &Device::Cpu).unwrap();
        let want = &tensors[&format!("{k}.sbert.embedding")];
        assert!(max_abs_diff(&embedding, want) <= 1e-5, "{k} embedding");

        // Detector: punctuation stripped, ids (the reference pads to 64), [CLS] state.
        assert_eq!(
            audiocap::eval::fense::detector_text(&d.text),
            d.echecker_text,
            "{k}"
        );
        let det_ids = m.detector.tokenize(&d.text).unwrap();
        let padded = ids(&tensors[&format!("{k}.echecker.input_ids")]);
        let real = ids(&tensors[&format!("{k}.echecker.attention_mask")])
            .iter()
            .filter(|&&a| a == 1)
            .count();
        assert_eq!(det_ids, padded[..real], "{k} detector ids");
        assert!(padded[real..].iter().all(|&p| p == 0), "{k} padding");
        let (batch, mask) = pad_batch(&[&det_ids], 0, &Device::Cpu).unwrap();
        let encoder = m.detector.encoder();
        let cls = encoder
            .forward(&batch, &mask)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap();
        let first = encoder
            .forward_first_token(&batch, &mask)
            .unwrap()
            .get(0)
            .unwrap();
        assert!(
            max_abs_diff(&cls, &first) <= 1e-6,
            "{k}: the [CLS]-only pass differs"
        );
        let want = &tensors[&format!("{k}.echecker.cls_hidden")];
        assert!(
            max_abs_diff(&cls, want) <= 1e-5,
            "{k} cls hidden: {}",
            max_abs_diff(&cls, want)
        );
    }

    // Every candidate's and reference's embedding, batched as the scorer batches them.
    let cands: Vec<&str> = reference
        .candidates
        .iter()
        .map(|c| c.candidate.as_str())
        .collect();
    let refs: Vec<&str> = reference
        .candidates
        .iter()
        .flat_map(|c| c.references.iter().map(String::as_str))
        .collect();
    for (name, sentences) in [("cand_embeddings", &cands), ("ref_embeddings", &refs)] {
        let rows = m.sbert.embed(sentences).unwrap();
        let ours = Tensor::new(rows, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&ours, &tensors[name]);
        assert!(diff <= 1e-5, "{name}: max abs diff {diff:e}");
    }
    let probs = Tensor::new(m.detector.probabilities(&cands).unwrap(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&probs, &tensors["echecker.probs"]);
    assert!(
        diff <= 1e-5,
        "detector probabilities: max abs diff {diff:e}"
    );
}

#[test]
fn fense_per_candidate_and_corpus_match_the_reference() {
    let reference = reference();
    let m = models();
    let (candidates, references) = pairs(&reference);
    let scores = m.score(&candidates, &references).unwrap();
    assert_eq!(scores.per_clip.len(), candidates.len());
    for (i, (ours, want)) in scores
        .per_clip
        .iter()
        .zip(&reference.candidates)
        .enumerate()
    {
        close(&format!("{i} sbert_sim"), ours.sbert_sim, want.sbert_sim);
        close(&format!("{i} p_error"), ours.p_error, want.p_error);
        assert_eq!(
            ours.has_error, want.has_error,
            "{i} has_error (p_error {})",
            ours.p_error
        );
        assert_eq!(ours.penalty_factor(), want.penalty_factor, "{i} penalty");
        close(&format!("{i} fense"), ours.fense, want.fense);
    }
    close(
        "corpus sbert_sim",
        scores.sbert_sim,
        reference.corpus.sbert_sim,
    );
    assert_eq!(scores.fluency_error_rate, reference.corpus.fer);
    close("corpus fense", scores.fense, reference.corpus.fense);

    // SPIDEr-FL: the given SPIDEr values times the same penalty.
    let spider: Vec<f64> = reference
        .candidates
        .iter()
        .map(|c| c.spider_input)
        .collect();
    let (corpus, per_clip) = scores.spider_fl(&spider);
    for (i, (ours, want)) in per_clip.iter().zip(&reference.candidates).enumerate() {
        close(&format!("{i} spider_fl"), *ours, want.spider_fl);
    }
    close("corpus spider_fl", corpus, reference.corpus.spider_fl);
    assert_eq!(penalty_factor(true), 1.0 - 0.9);
}

/// Links every file of `from` but `skip` into `to` (recursively).
fn link_tree(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.contains(&name.to_str().unwrap()) {
            continue;
        }
        if entry.path().is_dir() {
            link_tree(&entry.path(), &to.join(&name), skip);
        } else {
            std::os::unix::fs::symlink(entry.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn vocab_txt_alone_and_separate_locations_give_the_same_scores() {
    let reference = reference();
    let tmp = tempfile::tempdir().unwrap();
    // No tokenizer.json anywhere: WordPiece from vocab.txt; the parts in other places.
    let sbert = tmp.path().join("my-sbert");
    link_tree(&dir().join("sbert"), &sbert, &["tokenizer.json"]);
    let base = tmp.path().join("base");
    link_tree(&dir().join("bert-base-uncased"), &base, &["tokenizer.json"]);
    let paths = FensePaths {
        models: None,
        sbert: Some(sbert.clone()),
        detector: Some(dir().join("echecker_clotho_audiocaps_base.ckpt")),
        detector_base: Some(base),
    };
    let m = FenseModels::load(&paths).unwrap();
    let (candidates, references) = pairs(&reference);
    let scores = m.score(&candidates, &references).unwrap();
    for (ours, want) in scores.per_clip.iter().zip(&reference.candidates) {
        close("sbert_sim", ours.sbert_sim, want.sbert_sim);
        assert_eq!(ours.has_error, want.has_error);
    }

    // A model directory in a form this port does not compute is refused by name.
    let other = tmp.path().join("cls-pooling");
    link_tree(&dir().join("sbert"), &other, &["1_Pooling"]);
    std::fs::create_dir_all(other.join("1_Pooling")).unwrap();
    std::fs::write(
        other.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    let e = SentenceBert::load(&other, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1_Pooling/config.json") && e.contains("mean pooling"),
        "{e}"
    );
    // A missing part names where it was looked for and how to get it.
    let e = FenseModels::load(&FensePaths::in_dir(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&tmp.path().join("sbert").display().to_string()),
        "{e}"
    );
    assert!(
        e.contains("paraphrase-TinyBERT-L6-v2") && e.contains("releases/download"),
        "{e}"
    );
}

#[test]
fn candidates_with_different_numbers_of_references_average_their_own() {
    let m = models();
    let reference = reference();
    // Candidate i keeps i % 5 + 1 of its references: its sbert_sim is the mean cosine
    // over exactly those, as the reference's per-candidate slice of the flat list.
    let (candidates, _) = pairs(&reference);
    let references: Vec<Vec<String>> = reference
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| c.references[..i % 5 + 1].to_vec())
        .collect();
    let scores = m.score(&candidates, &references).unwrap();
    let tensors = load_safetensors("fense-tiny/embeddings.safetensors");
    let cand = tensors["cand_embeddings"].to_vec2::<f32>().unwrap();
    let refs = tensors["ref_embeddings"].to_vec2::<f32>().unwrap();
    for (i, clip) in scores.per_clip.iter().enumerate() {
        let n = i % 5 + 1;
        let want: f64 = (0..n)
            .map(|j| {
                let r = &refs[i * 5 + j];
                cand[i]
                    .iter()
                    .zip(r)
                    .map(|(a, b)| f64::from(a * b))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n as f64;
        close(
            &format!("{i} sbert_sim over {n} references"),
            clip.sbert_sim,
            want,
        );
        assert_eq!(clip.has_error, reference.candidates[i].has_error);
    }
    assert!(m.score(&candidates[..1], &[vec![]]).is_err());
}
