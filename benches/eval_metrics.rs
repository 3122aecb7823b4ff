//! Caption metrics on 10,000 candidates × 5 references: seconds for tokenization and
//! counting, BLEU-1..4, ROUGE-L, CIDEr-D, all three through `score_corpus`, and METEOR
//! through its jar when Java and the jar are found (one JVM, as `audiocap eval` runs
//! it). Captions are synthetic, 8-20 words from a fixed vocabulary, drawn by a seeded
//! generator, so every run scores the same corpus.
//!
//! `cargo bench --bench eval_metrics` (add `-- --no-meteor` to skip the JVM).

use std::time::Instant;

use audiocap::eval::jvm::{Environment, JavaPaths};
use audiocap::eval::meteor::{MeteorSetup, meteor};
use audiocap::eval::{PreparedCorpus, score_corpus};

const CANDIDATES: usize = 10_000;
const REFERENCES: usize = 5;

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

fn main() {
    let skip_meteor = std::env::args().any(|a| a == "--no-meteor");
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let candidates: Vec<String> = (0..CANDIDATES).map(|_| rng.caption()).collect();
    let references: Vec<Vec<String>> = (0..CANDIDATES)
        .map(|_| (0..REFERENCES).map(|_| rng.caption()).collect())
        .collect();
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
