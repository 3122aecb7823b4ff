//! `audiocap corpus`: the captioning corpus built from freely licensed sound
//! collections packaged by Debian, `espeak-ng` speech and synthetic signals
//! (definition in the repository's `corpus/` folder).
//!
//! A build: pinned packages are unpacked ([`packages`]); their recordings listed
//! ([`sources`]) and captioned by the first matching sound rule ([`catalog`]); every
//! recording assigned to train / validation / test per sound (so each sound is in
//! each split and crops of one recording never straddle splits); decoded, resampled,
//! trimmed and cut into clips ([`clips`]); speech ([`speech`]) and signals
//! ([`synth`]) added; mixtures of two clips of one split made; and per split a
//! Clotho-layout CSV (`file_name, caption_1..caption_5`, plus labels, source,
//! recording, licence and attribution) written with `corpus.json` (what was built
//! from what, counts, everything left out and why).

pub mod catalog;
pub mod clips;
pub mod packages;
pub mod sources;
pub mod speech;
pub mod synth;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::atomic;
use crate::config::audiocap_home;
use crate::rng::SplitMix64;
use catalog::{Catalog, SignalKind};
use sources::{Recording, RecordingReader};

/// The three splits, in manifest order.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// Where clips wait (under the staging folder) until every recording is decoded and
/// the splits are known.
const PENDING: &str = "pending";

/// What `corpus build` does.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The output folder (must not exist unless `overwrite`).
    pub out: PathBuf,
    /// A folder of already downloaded `.deb`s, searched before `apt-get download`.
    pub debs: Option<PathBuf>,
    /// Downloads and unpacked packages, kept between builds.
    pub cache: PathBuf,
    /// Build only these parts: source ids, `speech`, `synthetic`, `mixtures` (empty:
    /// everything).
    pub only: Vec<String>,
    pub overwrite: bool,
    /// Write the catalog's test list from this build's split (fixes the test split).
    pub write_test_split: bool,
    /// Worker threads for decoding and writing clips.
    pub threads: usize,
}

/// Where downloaded and unpacked packages are kept between builds unless told:
/// `corpus-cache` in [`audiocap_home`] (`.audiocap/corpus-cache` with neither
/// `AUDIOCAP_HOME` nor `HOME` set).
pub fn default_cache_dir() -> PathBuf {
    audiocap_home()
        .unwrap_or_else(|| PathBuf::from(".audiocap"))
        .join("corpus-cache")
}

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{0} exists (use --overwrite to replace it)")]
    Exists(PathBuf),
    #[error("--only names unknown parts: {0} (known: {1})")]
    UnknownParts(String, String),
    #[error(transparent)]
    Package(#[from] packages::PackageError),
    #[error(transparent)]
    Source(#[from] sources::SourceError),
    #[error("{0}")]
    Speech(String),
    /// A clip this build wrote could not be read back (for a mixture).
    #[error("{path}: {why}")]
    Clip { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One clip of the built corpus (a row of its split's CSV).
#[derive(Debug, Clone, Serialize)]
pub struct ClipRow {
    pub file_name: String,
    #[serde(skip)]
    pub split: &'static str,
    pub captions: Vec<String>,
    pub labels: Vec<String>,
    /// `0ad`, `speech`, `synthetic`, `mixture`, ...
    pub source: String,
    /// The recording it was cut from (mixtures: both, joined by `+`).
    pub recording: String,
    /// The sound rule (or speech group, signal kind) that captioned it.
    #[serde(skip)]
    pub rule: String,
    pub duration_s: f64,
    pub licence: String,
    pub attribution: String,
}

/// A recording or a recording left out, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct LeftOut {
    pub recording: String,
    pub why: String,
}

/// What a build made (`corpus.json`).
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub name: String,
    pub version: String,
    pub seed: u64,
    pub sample_rate: u32,
    pub packages: Vec<PackageRecord>,
    /// Clips per split.
    pub clips: BTreeMap<String, usize>,
    /// Recordings per split (mixtures not counted).
    pub recordings: BTreeMap<String, usize>,
    /// Hours of audio per split.
    pub hours: BTreeMap<String, f64>,
    /// Clips per source.
    pub sources: BTreeMap<String, usize>,
    /// Clips per label (over all splits).
    pub labels: BTreeMap<String, usize>,
    /// Whether the test split came from the catalog's fixed list.
    pub fixed_test_split: bool,
    /// Recordings no rule matched, per source.
    pub unmatched: BTreeMap<String, usize>,
    /// Recordings left out by `skip` rules, per source.
    pub skipped_by_rule: BTreeMap<String, usize>,
    /// Recordings that could not be used (undecodable, silent, too short).
    pub left_out: Vec<LeftOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageRecord {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub licence: String,
}

/// What one planned recording is made from.
#[derive(Debug, Clone)]
enum Origin {
    Packaged(Recording),
    Speech(speech::Utterance),
    Synthetic { kind: SignalKind, seed: u64 },
}

/// A recording to turn into clips.
#[derive(Debug, Clone)]
struct Planned {
    /// Stable id: `<source>/<path>`, `speech/<voice>/<n>`, `synthetic/<kind>/<n>`.
    id: String,
    /// File-name stem of its clips.
    stem: String,
    source: String,
    rule: String,
    labels: Vec<String>,
    pool: Vec<String>,
    licence: String,
    attribution: String,
    max_crops: usize,
    origin: Origin,
}

/// Builds the corpus into `options.out`.
pub fn build(catalog: &Catalog, options: &BuildOptions) -> Result<BuildReport, CorpusError> {
    let corpus = &catalog.corpus;
    let known: Vec<String> = corpus
        .sources
        .iter()
        .map(|s| s.id.clone())
        .chain(["speech", "synthetic", "mixtures"].map(String::from))
        .collect();
    let unknown: Vec<&String> = options.only.iter().filter(|o| !known.contains(o)).collect();
    if !unknown.is_empty() {
        return Err(CorpusError::UnknownParts(
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            known.join(", "),
        ));
    }
    let wanted = |part: &str| options.only.is_empty() || options.only.iter().any(|o| o == part);
    if options.out.exists() && !options.overwrite {
        return Err(CorpusError::Exists(options.out.clone()));
    }
    // Removed again if the build fails; committed in place of `out` at the end.
    let staged = atomic::Staging::new(&options.out);
    let staging = staged.path().to_path_buf();
    for dir in SPLITS
        .iter()
        .map(|s| staging.join("audio").join(s))
        .chain([staging.join(PENDING)])
    {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    }

    // Packages.
    let mut needed: BTreeSet<&str> = BTreeSet::new();
    for source in corpus.sources.iter().filter(|s| wanted(&s.id)) {
        needed.insert(&source.package);
    }
    if let Some(sp) = corpus.speech.as_ref().filter(|_| wanted("speech")) {
        needed.extend(sp.packages.iter().map(String::as_str));
    }
    let mut roots: HashMap<&str, PathBuf> = HashMap::new();
    let mut package_records = Vec::new();
    for name in needed {
        let Some(package) = catalog.package(name) else {
            continue;
        };
        tracing::info!(package = name, version = %package.version, "unpacking");
        roots.insert(
            name,
            packages::unpacked(package, options.debs.as_deref(), &options.cache)?,
        );
        package_records.push(PackageRecord {
            name: package.name.clone(),
            version: package.version.clone(),
            sha256: package.sha256.clone(),
            licence: package.licence.clone(),
        });
    }

    // Plan every recording.
    let mut planned = Vec::new();
    let mut unmatched = BTreeMap::new();
    let mut skipped_by_rule = BTreeMap::new();
    for source in corpus.sources.iter().filter(|s| wanted(&s.id)) {
        let (Some(root), Some(package), Some(rules)) = (
            roots.get(source.package.as_str()),
            catalog.package(&source.package),
            catalog.rules.get(&source.id),
        ) else {
            continue;
        };
        let recordings = sources::list(source, root)?;
        tracing::info!(source = %source.id, recordings = recordings.len(), "listed");
        for recording in recordings {
            match rules.find(&recording.path) {
                None => *unmatched.entry(source.id.clone()).or_insert(0) += 1,
                Some(rule) if rule.skip => {
                    *skipped_by_rule.entry(source.id.clone()).or_insert(0) += 1
                }
                Some(rule) => planned.push(Planned {
                    id: format!("{}/{}", source.id, recording.path),
                    stem: format!("{}-{}", source.id, file_stem(&recording.path)),
                    source: source.id.clone(),
                    rule: rule.id.clone(),
                    labels: rule.labels.clone(),
                    pool: rule.pool.clone(),
                    licence: rule
                        .licence
                        .clone()
                        .unwrap_or_else(|| package.licence.clone()),
                    attribution: rule
                        .attribution
                        .clone()
                        .unwrap_or_else(|| package.attribution.clone()),
                    max_crops: source.max_crops.unwrap_or(corpus.clips.max_crops),
                    origin: Origin::Packaged(recording),
                }),
            }
        }
    }
    let espeak = match corpus.speech.as_ref().filter(|_| wanted("speech")) {
        Some(spec) => {
            let speech_roots: Vec<PathBuf> = spec
                .packages
                .iter()
                .filter_map(|p| roots.get(p.as_str()).cloned())
                .collect();
            let espeak =
                speech::Espeak::locate(spec, &speech_roots).map_err(CorpusError::Speech)?;
            espeak.check(&staging).map_err(CorpusError::Speech)?;
            for (g, group) in spec.groups.iter().enumerate() {
                for voice in &group.voices {
                    let mut rng = SplitMix64::new(seed_of(corpus.seed, &format!("speech/{voice}")));
                    let mut order: Vec<usize> = (0..spec.sentences.len()).collect();
                    rng.shuffle(&mut order);
                    for n in 0..group.utterances {
                        let text = spec.sentences[order[n % order.len()]].clone();
                        planned.push(Planned {
                            id: format!("speech/{voice}/{n}"),
                            stem: format!("speech-{}-{n:02}", file_stem(voice)),
                            source: "speech".to_string(),
                            rule: format!("speech#{}", g + 1),
                            labels: group.text.labels.clone(),
                            pool: group.text.pool(),
                            licence: spec.licence.clone(),
                            attribution: spec.attribution.clone(),
                            max_crops: 1,
                            origin: Origin::Speech(speech::Utterance {
                                voice: voice.clone(),
                                text,
                                speed: 130 + rng.below(60) as u32,
                                pitch: 30 + rng.below(40) as u32,
                            }),
                        });
                    }
                }
            }
            Some(espeak)
        }
        None => None,
    };
    if wanted("synthetic") {
        for (s, synth) in corpus.synthetic.iter().enumerate() {
            let kind_name = format!("{:?}", synth.kind).to_lowercase();
            for n in 0..synth.count {
                let id = format!("synthetic/{kind_name}/{n}");
                planned.push(Planned {
                    stem: format!("synthetic-{kind_name}-{n:03}"),
                    source: "synthetic".to_string(),
                    rule: format!("synthetic#{}", s + 1),
                    labels: synth.text.labels.clone(),
                    pool: synth.text.pool(),
                    licence: "CC0-1.0".to_string(),
                    attribution: "generated by audiocap".to_string(),
                    max_crops: 1,
                    origin: Origin::Synthetic {
                        kind: synth.kind,
                        seed: seed_of(corpus.seed, &id),
                    },
                    id,
                });
            }
        }
    }

    // Unique clip names: `a/x.ogg` and `a/x.wav` would both be `src-a-x`.
    let mut taken: HashSet<String> = HashSet::new();
    for item in &mut planned {
        let mut stem = item.stem.clone();
        let mut n = 1;
        while !taken.insert(stem.clone()) {
            n += 1;
            stem = format!("{}-{n}", item.stem);
        }
        item.stem = stem;
    }

    // Clips, in parallel.
    let rows = Mutex::new(Vec::new());
    let left_out = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let threads = options.threads.max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut reader = RecordingReader::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = planned.get(i) else {
                        break;
                    };
                    match make_clips(item, catalog, espeak.as_ref(), &mut reader, &staging) {
                        Ok(made) => rows
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((i, made)),
                        Err(why) => {
                            left_out
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(LeftOut {
                                    recording: item.id.clone(),
                                    why,
                                })
                        }
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_multiple_of(200) || n == planned.len() {
                        tracing::info!(done = n, of = planned.len(), "recordings");
                    }
                }
            });
        }
    });
    let mut made = rows.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut left_out = left_out.into_inner().unwrap_or_else(|p| p.into_inner());
    // A recording whose audio equals an earlier one's (packages ship copies under
    // other names) is left out, so one sound never sits in two splits.
    made.sort_by_key(|(i, _)| *i);
    let mut first_with: HashMap<String, &str> = HashMap::new();
    let mut rows = Vec::new();
    for (i, clips) in made {
        let id = planned[i].id.as_str();
        match first_with.get(&clips.audio_sha256) {
            Some(first) => {
                for row in &clips.rows {
                    let _ = std::fs::remove_file(staging.join(PENDING).join(&row.file_name));
                }
                left_out.push(LeftOut {
                    recording: id.to_string(),
                    why: format!("same audio as {first}"),
                });
            }
            None => {
                first_with.insert(clips.audio_sha256, id);
                rows.extend(clips.rows);
            }
        }
    }
    rows.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    left_out.sort_by(|a, b| a.recording.cmp(&b.recording));

    // Splits, per sound.
    let test_list_path = catalog.test_list_path();
    let fixed_test: Option<HashSet<String>> = if options.write_test_split {
        None
    } else {
        std::fs::read_to_string(&test_list_path).ok().map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect()
        })
    };
    // Only recordings that gave clips take part, so a silent or corrupt recording
    // never takes a sound's place in the test split.
    let usable: HashSet<&str> = rows.iter().map(|r| r.recording.as_str()).collect();
    let kept: Vec<&Planned> = planned
        .iter()
        .filter(|p| usable.contains(p.id.as_str()))
        .collect();
    let splits = assign_splits(&kept, corpus.seed, &corpus.split, fixed_test.as_ref());
    let split_of: HashMap<&str, &'static str> = kept
        .iter()
        .zip(&splits)
        .map(|(p, s)| (p.id.as_str(), *s))
        .collect();
    for row in &mut rows {
        let split = split_of
            .get(row.recording.as_str())
            .copied()
            .unwrap_or("train");
        row.split = split;
        let from = staging.join(PENDING).join(&row.file_name);
        let to = staging.join("audio").join(split).join(&row.file_name);
        std::fs::rename(&from, &to).map_err(io(&to))?;
    }
    let _ = std::fs::remove_dir(staging.join(PENDING));

    let mut recordings: BTreeMap<String, usize> = BTreeMap::new();
    {
        let mut seen = HashSet::new();
        for row in &rows {
            if seen.insert(&row.recording) {
                *recordings.entry(row.split.to_string()).or_insert(0) += 1;
            }
        }
    }
    if wanted("mixtures") {
        let mixed = make_mixtures(&rows, catalog, &staging)?;
        rows.extend(mixed);
    }

    // Manifests and report.
    for split in SPLITS {
        let path = staging.join(format!("{split}.csv"));
        write_manifest(
            &path,
            rows.iter().filter(|r| r.split == split),
            corpus.clips.captions_per_clip,
        )?;
    }
    let mut report = BuildReport {
        name: corpus.name.clone(),
        version: corpus.version.clone(),
        seed: corpus.seed,
        sample_rate: corpus.clips.sample_rate,
        packages: package_records,
        clips: BTreeMap::new(),
        recordings,
        hours: BTreeMap::new(),
        sources: BTreeMap::new(),
        labels: BTreeMap::new(),
        fixed_test_split: fixed_test.is_some(),
        unmatched,
        skipped_by_rule,
        left_out,
    };
    for row in &rows {
        *report.clips.entry(row.split.to_string()).or_insert(0) += 1;
        *report.hours.entry(row.split.to_string()).or_insert(0.0) += row.duration_s / 3600.0;
        *report.sources.entry(row.source.clone()).or_insert(0) += 1;
        for label in &row.labels {
            *report.labels.entry(label.clone()).or_insert(0) += 1;
        }
    }
    let labels: Vec<&String> = report.labels.keys().collect();
    let labels_path = staging.join("labels.txt");
    std::fs::write(
        &labels_path,
        labels.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .map_err(io(&labels_path))?;
    let report_path = staging.join("corpus.json");
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    std::fs::write(&report_path, json).map_err(io(&report_path))?;

    if options.write_test_split {
        let mut test: Vec<&str> = kept
            .iter()
            .zip(&splits)
            .filter(|(_, s)| **s == "test")
            .map(|(p, _)| p.id.as_str())
            .collect();
        test.sort();
        let text = format!(
            "# The fixed test split of the {} corpus: one recording per line (written by\n\
             # `audiocap corpus build --write-test-split`; edit only to add new sounds).\n{}",
            corpus.name,
            test.iter().map(|t| format!("{t}\n")).collect::<String>()
        );
        std::fs::write(&test_list_path, text).map_err(io(&test_list_path))?;
    }

    staged.commit_dir().map_err(io(&options.out))?;
    Ok(report)
}

/// A seed for one named thing, from the corpus seed.
fn seed_of(seed: u64, name: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    u64::from_le_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ])
}

/// `a/b/rain_02.ogg` → `a-b-rain_02`: a file-name stem that keeps the path readable.
fn file_stem(path: &str) -> String {
    let without_ext = match path.rsplit_once('.') {
        Some((stem, ext)) if !ext.contains('/') => stem,
        _ => path,
    };
    without_ext
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => c,
            _ => '_',
        })
        .collect()
}

/// The split of every planned recording. Recordings of one sound (rule) are ordered
/// by a seeded hash of their id; the fixed test list (when given) decides the test
/// split, otherwise `test_fraction` of each sound with at least three recordings
/// (at least one); validation takes `validation_fraction` of the rest of each sound
/// with at least four recordings.
fn assign_splits(
    planned: &[&Planned],
    seed: u64,
    settings: &catalog::SplitSettings,
    fixed_test: Option<&HashSet<String>>,
) -> Vec<&'static str> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in planned.iter().enumerate() {
        groups.entry(&p.rule).or_default().push(i);
    }
    let mut out = vec!["train"; planned.len()];
    for members in groups.values_mut() {
        members.sort_by_key(|&i| seed_of(seed, &planned[i].id));
        let n = members.len();
        let rest: Vec<usize> = match fixed_test {
            Some(list) => {
                for &i in members.iter() {
                    if list.contains(&planned[i].id) {
                        out[i] = "test";
                    }
                }
                members
                    .iter()
                    .copied()
                    .filter(|&i| !list.contains(&planned[i].id))
                    .collect()
            }
            None => {
                let n_test = if n >= 3 {
                    ((n as f64 * settings.test_fraction).round() as usize).max(1)
                } else {
                    0
                };
                for &i in &members[..n_test] {
                    out[i] = "test";
                }
                members[n_test..].to_vec()
            }
        };
        let n_val = if rest.len() >= 3 && n >= 4 {
            ((n as f64 * settings.validation_fraction).round() as usize).max(1)
        } else {
            0
        };
        for &i in rest.iter().take(n_val) {
            out[i] = "validation";
        }
    }
    out
}

/// Decodes (or generates) one recording and writes its clips to the pending folder.
/// The clips of one recording and the SHA-256 of its decoded audio.
struct MadeClips {
    rows: Vec<ClipRow>,
    audio_sha256: String,
}

fn make_clips(
    item: &Planned,
    catalog: &Catalog,
    espeak: Option<&speech::Espeak>,
    reader: &mut RecordingReader,
    staging: &Path,
) -> Result<MadeClips, String> {
    let settings = &catalog.corpus.clips;
    let rate = settings.sample_rate;
    let mut trim = true;
    let samples = match &item.origin {
        Origin::Packaged(recording) => {
            let bytes = reader.read(recording).map_err(|e| e.to_string())?;
            let audio =
                crate::audio::frontend::decode_bytes_to_rate(&bytes, recording.extension(), rate)
                    .map_err(|e| format!("undecodable: {e}"))?;
            audio.samples
        }
        Origin::Speech(utterance) => {
            let espeak = espeak.ok_or("speech without espeak-ng")?;
            let tmp = staging.join(format!("{}.espeak.wav", item.stem));
            espeak.speak(utterance, &tmp)?;
            let audio = crate::audio::frontend::decode_file_to_rate(&tmp, rate)
                .map_err(|e| format!("espeak-ng output: {e}"));
            let _ = std::fs::remove_file(&tmp);
            audio?.samples
        }
        Origin::Synthetic { kind, seed } => {
            // Generated signals are exactly as long as intended (silence included).
            trim = false;
            synth::generate(
                *kind,
                rate,
                settings.max_seconds,
                &mut SplitMix64::new(*seed),
            )
        }
    };
    if samples.iter().any(|s| !s.is_finite()) {
        return Err("non-finite samples".to_string());
    }
    let mut hasher = Sha256::new();
    for s in &samples {
        hasher.update(s.to_le_bytes());
    }
    let audio_sha256 = hex::encode(hasher.finalize());
    let threshold = clips::db_to_amplitude(settings.silence_db);
    let kept: &[f32] = if trim {
        clips::trim_silence(&samples, rate, threshold).ok_or("silent")?
    } else {
        &samples
    };
    let min_len = (settings.min_seconds * rate as f64) as usize;
    if kept.len() < min_len {
        return Err(format!(
            "too short after trimming silence ({:.2} s)",
            kept.len() as f64 / rate as f64
        ));
    }
    let crop_len = (settings.max_seconds * rate as f64) as usize;
    let starts = clips::crop_starts(kept.len(), crop_len, item.max_crops);
    let mut rows = Vec::new();
    for (k, &start) in starts.iter().enumerate() {
        let mut clip = kept[start..(start + crop_len).min(kept.len())].to_vec();
        if trim && clips::rms(&clip) < threshold {
            continue;
        }
        clips::limit_peak(&mut clip);
        let file_name = if starts.len() == 1 {
            format!("{}.wav", item.stem)
        } else {
            format!("{}-c{k}.wav", item.stem)
        };
        let path = staging.join(PENDING).join(&file_name);
        clips::write_wav(&path, &clip, rate).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut rng = SplitMix64::new(seed_of(catalog.corpus.seed, &file_name));
        rows.push(ClipRow {
            captions: draw_captions(&item.pool, settings.captions_per_clip, &mut rng),
            file_name,
            split: "",
            labels: item.labels.clone(),
            source: item.source.clone(),
            recording: item.id.clone(),
            rule: item.rule.clone(),
            duration_s: clip.len() as f64 / rate as f64,
            licence: item.licence.clone(),
            attribution: item.attribution.clone(),
        });
    }
    if rows.is_empty() {
        return Err("every crop is silent".to_string());
    }
    Ok(MadeClips { rows, audio_sha256 })
}

/// `count` captions from the pool: distinct while the pool lasts, capitalised.
fn draw_captions(pool: &[String], count: usize, rng: &mut SplitMix64) -> Vec<String> {
    let mut order: Vec<usize> = (0..pool.len()).collect();
    rng.shuffle(&mut order);
    (0..count)
        .filter_map(|k| order.get(k % order.len().max(1)))
        .map(|&i| sentence_case(&pool[i]))
        .collect()
}

/// First letter upper case, as AudioCaps and Clotho captions are written.
fn sentence_case(clause: &str) -> String {
    let mut chars = clause.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn lower_first(caption: &str) -> String {
    let mut chars = caption.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Mixtures of two clips of one split with disjoint labels: the shorter sits
/// `quieter_db` below the longer and starts at a random point of it; captions join
/// the two clips' captions with the catalog's joiners.
fn make_mixtures(
    rows: &[ClipRow],
    catalog: &Catalog,
    staging: &Path,
) -> Result<Vec<ClipRow>, CorpusError> {
    let corpus = &catalog.corpus;
    let m = &corpus.mixtures;
    let rate = corpus.clips.sample_rate;
    let mut out = Vec::new();
    for (split, count) in [
        ("train", m.train),
        ("validation", m.validation),
        ("test", m.test),
    ] {
        // Silence mixes into nothing audible; speech over speech is babble.
        let pool: Vec<&ClipRow> = rows
            .iter()
            .filter(|r| r.split == split && !r.labels.iter().any(|l| l == "silence"))
            .collect();
        if pool.len() < 2 {
            continue;
        }
        let mut rng = SplitMix64::new(seed_of(corpus.seed, &format!("mixtures/{split}")));
        let mut made = 0;
        let mut tries = 0;
        while made < count && tries < count * 20 {
            tries += 1;
            let a = pool[rng.below(pool.len())];
            let b = pool[rng.below(pool.len())];
            if a.recording == b.recording
                || a.labels.iter().any(|l| b.labels.contains(l))
                || (a.source == "speech" && b.source == "speech")
            {
                continue;
            }
            let read = |row: &ClipRow| {
                let path = staging.join("audio").join(split).join(&row.file_name);
                crate::audio::decode::decode_file(&path)
                    .map(|d| d.samples)
                    .map_err(|e| CorpusError::Clip {
                        path: path.clone(),
                        why: e.to_string(),
                    })
            };
            let (mut xa, mut xb) = (read(a)?, read(b)?);
            // The longer clip is the bed the shorter one is laid on.
            let (a, b) = if xb.len() > xa.len() {
                std::mem::swap(&mut xa, &mut xb);
                (b, a)
            } else {
                (a, b)
            };
            let quieter = m.quieter_db[0] + (m.quieter_db[1] - m.quieter_db[0]) * rng.next_f64();
            let offset = if xa.len() > xb.len() {
                rng.below(xa.len() - xb.len() + 1)
            } else {
                0
            };
            let mixed = clips::mix(&xa, &xb, quieter, offset);
            let file_name = format!("mixture-{split}-{made:04}.wav");
            let path = staging.join("audio").join(split).join(&file_name);
            clips::write_wav(&path, &mixed, rate).map_err(io(&path))?;
            let captions = (0..corpus.clips.captions_per_clip)
                .map(|k| {
                    let joiner = &m.joiners[rng.below(m.joiners.len())];
                    let ca = lower_first(&a.captions[k % a.captions.len()]);
                    let cb = lower_first(&b.captions[(k + 1) % b.captions.len()]);
                    sentence_case(&joiner.replace("{a}", &ca).replace("{b}", &cb))
                })
                .collect();
            let mut labels = a.labels.clone();
            labels.extend(b.labels.iter().cloned());
            let licence = if a.licence == b.licence {
                a.licence.clone()
            } else {
                format!("{} AND {}", a.licence, b.licence)
            };
            out.push(ClipRow {
                file_name,
                split: a.split,
                captions,
                labels,
                source: "mixture".to_string(),
                recording: format!("{}+{}", a.recording, b.recording),
                rule: "mixture".to_string(),
                duration_s: mixed.len() as f64 / rate as f64,
                licence,
                attribution: if a.attribution == b.attribution {
                    a.attribution.clone()
                } else {
                    format!("{}; {}", a.attribution, b.attribution)
                },
            });
            made += 1;
        }
    }
    Ok(out)
}

/// A split's CSV in the Clotho layout plus the corpus columns.
fn write_manifest<'a>(
    path: &Path,
    rows: impl Iterator<Item = &'a ClipRow>,
    captions: usize,
) -> Result<(), CorpusError> {
    let mut writer = csv::Writer::from_path(path).map_err(|e| CorpusError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let mut header = vec!["file_name".to_string()];
    header.extend((1..=captions).map(|i| format!("caption_{i}")));
    header.extend(
        [
            "labels",
            "source",
            "recording",
            "duration_s",
            "licence",
            "attribution",
        ]
        .map(String::from),
    );
    let csv_err = |e: csv::Error| CorpusError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    };
    writer.write_record(&header).map_err(csv_err)?;
    for row in rows {
        let mut record = vec![row.file_name.clone()];
        record.extend(row.captions.iter().cloned());
        record.extend([
            row.labels.join(";"),
            row.source.clone(),
            row.recording.clone(),
            format!("{:.3}", row.duration_s),
            row.licence.clone(),
            row.attribution.clone(),
        ]);
        writer.write_record(&record).map_err(csv_err)?;
    }
    writer.flush().map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(id: &str, rule: &str) -> Planned {
        Planned {
            id: id.to_string(),
            stem: file_stem(id),
            source: "s".into(),
            rule: rule.into(),
            labels: vec!["x".into()],
            pool: vec![],
            licence: "CC0-1.0".into(),
            attribution: "a".into(),
            max_crops: 1,
            origin: Origin::Synthetic {
                kind: SignalKind::Beeps,
                seed: 0,
            },
        }
    }

    #[test]
    fn every_sound_with_enough_recordings_is_in_every_split() {
        let settings = catalog::SplitSettings::default();
        let mut items = Vec::new();
        for rule in ["a", "b"] {
            for i in 0..20 {
                items.push(planned(&format!("{rule}/{i}"), rule));
            }
        }
        items.push(planned("c/0", "c"));
        items.push(planned("c/1", "c"));
        let refs: Vec<&Planned> = items.iter().collect();
        let splits = assign_splits(&refs, 1, &settings, None);
        for rule in ["a", "b"] {
            let of = |s: &str| {
                items
                    .iter()
                    .zip(&splits)
                    .filter(|(p, x)| p.rule == rule && **x == s)
                    .count()
            };
            assert_eq!(of("test"), 3);
            assert_eq!(of("validation"), 2);
            assert_eq!(of("train"), 15);
        }
        // Two recordings: both train (no held-out copy of a sound seen once).
        assert_eq!(&splits[40..], &["train", "train"]);
        // Deterministic, and independent of the listing order.
        let mut reversed: Vec<Planned> = items.clone();
        reversed.reverse();
        let again = assign_splits(&reversed.iter().collect::<Vec<_>>(), 1, &settings, None);
        for (i, item) in items.iter().enumerate() {
            let j = reversed.iter().position(|p| p.id == item.id).unwrap();
            assert_eq!(splits[i], again[j]);
        }
    }

    #[test]
    fn a_fixed_test_list_decides_the_test_split() {
        let settings = catalog::SplitSettings::default();
        let items: Vec<Planned> = (0..10).map(|i| planned(&format!("a/{i}"), "a")).collect();
        let fixed: HashSet<String> = ["a/3", "a/7"].map(String::from).into_iter().collect();
        let refs: Vec<&Planned> = items.iter().collect();
        let splits = assign_splits(&refs, 5, &settings, Some(&fixed));
        for (p, s) in items.iter().zip(&splits) {
            assert_eq!(*s == "test", fixed.contains(&p.id), "{}", p.id);
        }
        assert_eq!(splits.iter().filter(|s| **s == "validation").count(), 1);
    }

    #[test]
    fn captions_are_distinct_while_the_pool_lasts_and_sentence_cased() {
        let pool: Vec<String> = (0..7).map(|i| format!("a dog barks {i} times")).collect();
        let drawn = draw_captions(&pool, 5, &mut SplitMix64::new(3));
        assert_eq!(drawn.len(), 5);
        assert_eq!(drawn.iter().collect::<HashSet<_>>().len(), 5);
        assert!(drawn.iter().all(|c| c.starts_with("A dog barks")));
    }

    #[test]
    fn file_stems_keep_the_path_readable() {
        assert_eq!(
            file_stem("ambient/weather/rain 1.ogg"),
            "ambient-weather-rain_1"
        );
        assert_eq!(file_stem("en-us+m3"), "en-us_m3");
    }
}
