//! Caption metrics on 10,000 candidates × 5 references: seconds for tokenization and
//! counting, BLEU-1..4, ROUGE-L, CIDEr-D, all three through `score_corpus`, and METEOR
//! through its jar when Java and the jar are found (one JVM, as `audiocap eval` runs
//! it). Captions are synthetic, 8-20 words from a fixed vocabulary, drawn by a seeded
//! generator, so every run scores the same corpus.
//!
//! FENSE (Sentence-BERT + fluency-error detector on candle, CPU) is timed on the first
//! 1,000 candidates × 5 references with random weights of the real models' shapes:
//! `paraphrase-TinyBERT-L6-v2` (6 layers × 312, 12 heads, 1,200 inner) and the
//! detector's `bert-base-uncased` (12 × 768, 12 heads, 3,072 inner), both with the
//! 30,522-token vocabulary (the bench's words plus filler entries).
//!
//! `cargo bench --bench eval_metrics` (add `-- --no-meteor` to skip the JVM,
//! `-- --fense-only` for FENSE alone).

use std::time::Instant;

use std::collections::HashMap;
use std::path::Path;

use audiocap::eval::fense::{FenseModels, FluencyDetector, SentenceBert};
use audiocap::eval::jvm::{Environment, JavaPaths};
use audiocap::eval::meteor::{MeteorSetup, meteor};
use audiocap::eval::{PreparedCorpus, score_corpus};
use audiocap::model::bert::{BertConfig, BertModel, BertTokenizer};
use audiocap::model::weights::Weights;
use candle_core::{DType, Device, Tensor};

const CANDIDATES: usize = 10_000;
const REFERENCES: usize = 5;
/// Candidates FENSE is timed on.
const FENSE_CANDIDATES: usize = 1_000;

/// Words of sound descriptions; function words repeat so n-grams recur as in real
/// captions.
const VOCABULARY: &[&str] = &[
    "a",
    "a",
    "a",
    "the",
    "the",
    "is",
    "is",
    "are",
    "and",
    "and",
    "while",
    "with",
    "in",
    "on",
    "of",
    "from",
    "at",
    "as",
    "by",
    "into",
    "then",
    "loudly",
    "softly",
    "repeatedly",
    "in the background",
    "in the distance",
    "dog",
    "dogs",
    "bird",
    "birds",
    "man",
    "woman",
    "child",
    "children",
    "people",
    "crowd",
    "car",
    "cars",
    "truck",
    "train",
    "engine",
    "motorcycle",
    "airplane",
    "helicopter",
    "rain",
    "wind",
    "water",
    "stream",
    "waves",
    "thunder",
    "fire",
    "door",
    "bell",
    "phone",
    "clock",
    "music",
    "guitar",
    "piano",
    "drum",
    "machine",
    "vehicle",
    "horn",
    "siren",
    "footsteps",
    "voice",
    "voices",
    "barks",
    "barking",
    "chirp",
    "chirping",
    "sing",
    "singing",
    "speaks",
    "speaking",
    "talks",
    "talking",
    "laughs",
    "laughing",
    "cheers",
    "passes",
    "passing",
    "runs",
    "running",
    "idles",
    "honks",
    "rings",
    "ringing",
    "ticks",
    "plays",
    "playing",
    "falls",
    "falling",
    "blows",
    "blowing",
    "flows",
    "flowing",
    "crash",
    "crashing",
    "rumbles",
    "crackles",
    "closes",
    "opens",
    "slams",
    "knocks",
    "beeps",
    "buzzes",
    "hums",
    "whistles",
    "loud",
    "quiet",
    "heavy",
    "light",
    "steady",
    "distant",
    "nearby",
    "small",
    "large",
    "old",
    "metal",
    "wooden",
    "busy",
    "street",
    "road",
    "room",
    "forest",
    "beach",
    "kitchen",
    "roof",
    "window",
    "station",
    "park",
    "field",
    "city",
    "river",
    "several",
    "two",
    "many",
    "someone",
    "something",
    "over",
    "under",
    "near",
    "down",
    "up",
    "by",
];

/// xorshift64*: small, seeded, the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn caption(&mut self) -> String {
        let words = 8 + self.below(13);
        let mut text: Vec<&str> = (0..words)
            .map(|_| VOCABULARY[self.below(VOCABULARY.len())])
            .collect();
        // Most captions start with an article, as real ones do.
        if self.below(4) != 0 {
            text[0] = "a";
        }
        let mut caption = text.join(" ");
        if self.below(3) == 0 {
            caption.push('.');
        }
        caption
    }
}

fn seconds(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// CPU seconds this process has used, all threads (Linux `/proc/self/stat`, user +
/// system, in USER_HZ = 100 ticks); 0 where it cannot be read. On a machine that other
/// work shares, wall time grows with the load and CPU time much less.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Runs `f`, printing its wall and CPU seconds under `label`.
fn timed<T>(label: &str, f: impl FnOnce() -> T) -> T {
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let out = f();
    println!(
        "{label:<28} {:>8.3} s  ({:.1} CPU s)",
        seconds(start),
        cpu_seconds() - cpu
    );
    out
}

/// A BERT config of the given shape with the bert-base-uncased vocabulary size.
fn bert_config(layers: usize, hidden: usize, heads: usize, inner: usize) -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": inner,
    }))
    .expect("a BERT config")
}

/// Random `BertModel` tensors (N(0, 0.02), LayerNorm 1 and 0) named under `prefix`.
fn bert_tensors(cfg: &BertConfig, prefix: &str, tensors: &mut HashMap<String, Tensor>) {
    let h = cfg.hidden_size;
    let mut put = |name: &str, t: candle_core::Result<Tensor>| {
        tensors.insert(format!("{prefix}{name}"), t.expect("a random tensor"));
    };
    // Uniform with standard deviation 0.02, seeded so every run scores alike.
    let mut rng = audiocap::rng::SplitMix64::new(0x00be_27f0);
    let half_width = 0.02 * 3f64.sqrt();
    let mut random = |shape: &[usize]| {
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * half_width) as f32)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    };
    let mut matrices = vec![
        ("embeddings.word_embeddings".to_string(), cfg.vocab_size),
        (
            "embeddings.position_embeddings".to_string(),
            cfg.max_position_embeddings,
        ),
        (
            "embeddings.token_type_embeddings".to_string(),
            cfg.type_vocab_size,
        ),
    ];
    let mut norms = vec!["embeddings.LayerNorm".to_string()];
    let mut linears = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let l = format!("encoder.layer.{i}");
        for (name, out, input) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", cfg.intermediate_size, h),
            ("output.dense", h, cfg.intermediate_size),
        ] {
            linears.push((format!("{l}.{name}"), out, input));
        }
        norms.push(format!("{l}.attention.output.LayerNorm"));
        norms.push(format!("{l}.output.LayerNorm"));
    }
    for (name, rows) in matrices.drain(..) {
        put(&format!("{name}.weight"), random(&[rows, h]));
    }
    for (name, out, input) in linears {
        put(&format!("{name}.weight"), random(&[out, input]));
        put(&format!("{name}.bias"), random(&[out]));
    }
    for name in norms {
        put(
            &format!("{name}.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu),
        );
        put(
            &format!("{name}.bias"),
            Tensor::zeros(h, DType::F32, &Device::Cpu),
        );
    }
}

/// A WordPiece vocabulary of 30,522 entries covering the bench's words.
fn write_vocab(dir: &Path) -> BertTokenizer {
    let mut entries: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
        .map(String::from)
        .into();
    for phrase in VOCABULARY {
        for word in phrase.split(' ') {
            if !entries.iter().any(|e| e == word) {
                entries.push(word.to_string());
            }
        }
    }
    let filler = 30522 - entries.len();
    entries.extend((0..filler).map(|i| format!("[unused{i}]")));
    std::fs::create_dir_all(dir).expect("creating the vocabulary folder");
    std::fs::write(dir.join("vocab.txt"), entries.join("\n") + "\n").expect("writing vocab.txt");
    BertTokenizer::from_dir(dir).expect("reading vocab.txt")
}

/// FENSE of the first [`FENSE_CANDIDATES`] pairs with real-shaped random models.
fn bench_fense(candidates: &[String], references: &[Vec<String>]) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-fense");
    let tokenizer = write_vocab(&dir);
    let start = Instant::now();
    let sbert_cfg = bert_config(6, 312, 12, 1200);
    let mut tensors = HashMap::new();
    bert_tensors(&sbert_cfg, "", &mut tensors);
    let weights = Weights::from_tensors(&dir, tensors, DType::F32, &Device::Cpu);
    let model = BertModel::load(&weights, &sbert_cfg).expect("the Sentence-BERT");
    let sbert = SentenceBert::from_parts(model, tokenizer.clone(), 128, dir.clone());
    let detector_cfg = bert_config(12, 768, 12, 3072);
    let mut tensors = HashMap::new();
    bert_tensors(&detector_cfg, "encoder.", &mut tensors);
    // Fixed classifier rows, so every run flags the same candidates.
    let clf: Vec<f32> = (0..6 * 768)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.2)
        .collect();
    tensors.insert(
        "clf.weight".into(),
        Tensor::from_vec(clf, (6, 768), &Device::Cpu).expect("clf"),
    );
    tensors.insert(
        "clf.bias".into(),
        Tensor::zeros(6, DType::F32, &Device::Cpu).expect("clf"),
    );
    let weights = Weights::from_tensors(&dir, tensors, DType::F32, &Device::Cpu);
    let detector =
        FluencyDetector::from_parts(&weights, &detector_cfg, tokenizer, 6).expect("the detector");
    println!("{:<28} {:>8.3} s", "FENSE random models", seconds(start));

    let n = FENSE_CANDIDATES.min(candidates.len());
    let (candidates, references) = (&candidates[..n], &references[..n]);
    let sentences: Vec<&str> = candidates
        .iter()
        .chain(references.iter().flatten())
        .map(String::as_str)
        .collect();
    let tokens: usize = sentences
        .iter()
        .map(|s| sbert.tokenize(s).map_or(0, |t| t.len()))
        .sum();
    println!(
        "FENSE on {n} candidates x {REFERENCES} references: {} sentences, {tokens} Sentence-BERT tokens",
        sentences.len()
    );
    let embedded =
        timed("Sentence-BERT (TinyBERT-L6)", || sbert.embed(&sentences)).expect("embedding");
    let cands: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let probs =
        timed("detector (BERT-base)", || detector.probabilities(&cands)).expect("detecting");
    assert_eq!((embedded.len(), probs.len()), (sentences.len(), n));

    let models = FenseModels { sbert, detector };
    let scores = timed("FENSE (both models)", || {
        models.score(candidates, references)
    })
    .expect("FENSE");
    println!(
        "FENSE {:.4}, SBERT-sim {:.4}, FER {:.3}; load average {}",
        scores.fense,
        scores.sbert_sim,
        scores.fluency_error_rate,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

fn main() {
    let skip_meteor = std::env::args().any(|a| a == "--no-meteor");
    let fense_only = std::env::args().any(|a| a == "--fense-only");
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let candidates: Vec<String> = (0..CANDIDATES).map(|_| rng.caption()).collect();
    let references: Vec<Vec<String>> = (0..CANDIDATES)
        .map(|_| (0..REFERENCES).map(|_| rng.caption()).collect())
        .collect();
    if fense_only {
        println!(
            "candle CPU threads: {}",
            candle_core::utils::get_num_threads()
        );
        bench_fense(&candidates, &references);
        return;
    }
    println!("{CANDIDATES} candidates x {REFERENCES} references, 8-20 words each");

    let start = Instant::now();
    let corpus = match PreparedCorpus::new(&candidates, &references) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("preparing the corpus: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "{:<28} {:>8.3} s",
        "tokenize + count n-grams",
        seconds(start)
    );
    let start = Instant::now();
    let (bleu, _) = corpus.bleu();
    println!("{:<28} {:>8.3} s", "BLEU-1..4", seconds(start));
    let start = Instant::now();
    let rouge = corpus.rouge_l();
    println!("{:<28} {:>8.3} s", "ROUGE-L", seconds(start));
    let start = Instant::now();
    let cider = corpus.cider_d();
    println!("{:<28} {:>8.3} s", "CIDEr-D", seconds(start));

    let start = Instant::now();
    let scores = match score_corpus(&candidates, &references) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("scoring: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "{:<28} {:>8.3} s",
        "score_corpus (all native)",
        seconds(start)
    );
    // The separate runs and score_corpus agree; printed so a broken build shows.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert_eq!(bleu, scores.bleu);
    assert_eq!(mean(&rouge), scores.rouge_l);
    assert_eq!(mean(&cider), scores.cider_d);
    println!(
        "BLEU-4 {:.4}  ROUGE-L {:.4}  CIDEr-D {:.4}",
        scores.bleu[3], scores.rouge_l, scores.cider_d
    );

    bench_fense(&candidates, &references);

    if skip_meteor {
        return;
    }
    match MeteorSetup::discover(&JavaPaths::default(), &Environment::process()) {
        Ok(setup) => {
            let start = Instant::now();
            match meteor(&setup, &candidates, &references) {
                Ok(m) => println!(
                    "{:<28} {:>8.3} s  (METEOR {:.4}, JVM start included)",
                    "METEOR 1.5 jar",
                    seconds(start),
                    m.corpus
                ),
                Err(e) => println!("METEOR failed: {e}"),
            }
        }
        Err(why) => println!("METEOR not run: {why}"),
    }
}
