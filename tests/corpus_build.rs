//! `audiocap corpus build` on a Debian package the test builds itself (`dpkg-deb`):
//! audio in a folder and in a zip archive, a silent, a corrupt, an unmatched and a
//! skipped file; synthetic signals and mixtures. Checks the manifests (Clotho layout,
//! readable by the trainer), the clips, the per-sound split (crops never straddle
//! splits), the fixed test list, the report, and that a rebuild is identical.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::write_wav;

pub fn audiocap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_audiocap"))
        .args(args)
        .output()
        .expect("run audiocap")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A decaying tone (bell), noise bursts (dog), long noise (rain) or a gust (wind).
fn sound(kind: &str, variant: usize, seconds: f32) -> Vec<f32> {
    let rate = 16_000.0f32;
    let n = (seconds * rate) as usize;
    let mut state = 0x9E37_79B9_7F4A_7C15u64.wrapping_add(variant as u64 * 31);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..n)
        .map(|i| {
            let t = i as f32 / rate;
            match kind {
                "bell" => {
                    0.5 * (-3.0 * t).exp()
                        * (2.0 * std::f32::consts::PI * (800.0 + 50.0 * variant as f32) * t).sin()
                }
                "dog" => {
                    if t % 0.5 < 0.15 {
                        0.4 * noise()
                    } else {
                        0.0
                    }
                }
                _ => 0.2 * noise(),
            }
        })
        .collect()
}

/// Builds `test-sounds_1.0_all.deb` with a folder of WAVs and a zip of WAVs; returns
/// its path and SHA-256.
pub fn build_deb(dir: &Path) -> (PathBuf, String) {
    let root = dir.join("pkg");
    let sounds = root.join("usr/share/test-sounds/folder");
    std::fs::create_dir_all(sounds.join("animals")).unwrap();
    std::fs::create_dir_all(sounds.join("things")).unwrap();
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: test-sounds\nVersion: 1.0\nArchitecture: all\nMaintainer: audiocap tests <t@example.org>\nDescription: sounds for a test\n",
    )
    .unwrap();
    for v in 0..6 {
        let secs = 1.0 + 0.2 * v as f32;
        write_wav(
            &sounds.join(format!("animals/dog{v}.wav")),
            16_000,
            1,
            &sound("dog", v, secs),
        );
        write_wav(
            &sounds.join(format!("things/bell{v}.wav")),
            22_050,
            2,
            &sound("bell", v, secs),
        );
    }
    // Same name, other extension: its clip needs a name of its own.
    write_wav(
        &sounds.join("animals/dog0.wave"),
        16_000,
        1,
        &sound("dog", 7, 1.5),
    );
    for v in 0..3 {
        // 25 s: three 10 s crops each.
        write_wav(
            &sounds.join(format!("things/rain{v}.wav")),
            16_000,
            1,
            &sound("rain", v, 25.0),
        );
    }
    // A byte-identical copy under another name: left out, never in two splits.
    std::fs::copy(
        sounds.join("things/rain0.wav"),
        sounds.join("things/rainz.wav"),
    )
    .unwrap();
    write_wav(
        &sounds.join("things/silent.wav"),
        16_000,
        1,
        &vec![0.0; 16_000],
    );
    std::fs::write(
        sounds.join("things/corrupt.wav"),
        b"RIFF\x10\0\0\0WAVEjunkjunk",
    )
    .unwrap();
    write_wav(
        &sounds.join("things/unknown.wav"),
        16_000,
        1,
        &sound("rain", 9, 1.0),
    );
    write_wav(
        &sounds.join("things/jingle.wav"),
        16_000,
        1,
        &sound("bell", 9, 1.0),
    );

    // A zip with stored members under a prefix, as 0 A.D. ships its sounds.
    let zip_path = root.join("usr/share/test-sounds/archive.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for v in 0..4 {
        let wav = dir.join("member.wav");
        write_wav(&wav, 16_000, 1, &sound("wind", 20 + v, 2.0));
        zip.start_file(format!("data/audio/weather/wind{v}.wav"), options)
            .unwrap();
        zip.write_all(&std::fs::read(&wav).unwrap()).unwrap();
    }
    zip.start_file("data/readme.txt", options).unwrap();
    zip.write_all(b"not audio").unwrap();
    zip.finish().unwrap();

    let deb = dir.join("debs/test-sounds_1.0_all.deb");
    std::fs::create_dir_all(deb.parent().unwrap()).unwrap();
    let out = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sha = audiocap::corpus::packages::sha256_file(&deb).unwrap();
    (deb, sha)
}

pub fn write_catalog(dir: &Path, sha: &str) -> PathBuf {
    let catalog = dir.join("catalog");
    std::fs::create_dir_all(catalog.join("sounds")).unwrap();
    std::fs::write(
        catalog.join("corpus.toml"),
        format!(
            r#"
name = "test-corpus"
version = "1"
seed = 7

[[package]]
name = "test-sounds"
version = "1.0"
sha256 = "{sha}"
licence = "CC0-1.0"
attribution = "test sounds"

[[source]]
id = "folder"
package = "test-sounds"
kind = "dir"
path = "usr/share/test-sounds/folder"

[[source]]
id = "archive"
package = "test-sounds"
kind = "zip"
path = "usr/share/test-sounds/archive.zip"
prefix = "data/audio/"

[[synthetic]]
kind = "beeps"
count = 4
labels = ["beeps"]
captions = ["beeps repeat", "short beeps sound", "a device beeps", "beeps go on", "regular beeps"]

[mixtures]
train = 6
validation = 1
test = 2
"#
        ),
    )
    .unwrap();
    let five = |label: &str| {
        (1..=5)
            .map(|i| format!("\"a {label} sound number {i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(
        catalog.join("sounds/folder.toml"),
        format!(
            r#"
source = "folder"

[[sound]]
match = ["animals/dog*.wav", "animals/dog*.wave"]
labels = ["dog"]
subjects = ["a dog", "a small dog"]
actions = ["barks", "barks twice", "yaps"]

[[sound]]
match = ["things/bell*.wav"]
labels = ["bell"]
captions = [{bell}]

[[sound]]
match = ["things/jingle.wav"]
skip = true

[[sound]]
match = ["things/{{rain*,silent,corrupt}}.wav"]
labels = ["rain"]
licence = "CC-BY-4.0"
attribution = "rain by someone"
captions = [{rain}]
"#,
            bell = five("bell"),
            rain = five("rain"),
        ),
    )
    .unwrap();
    std::fs::write(
        catalog.join("sounds/archive.toml"),
        format!(
            "source = \"archive\"\n\n[[sound]]\nmatch = [\"weather/wind*.wav\"]\nlabels = [\"wind\"]\ncaptions = [{}]\n",
            five("wind")
        ),
    )
    .unwrap();
    catalog
}

struct Row {
    split: String,
    file_name: String,
    captions: Vec<String>,
    labels: Vec<String>,
    source: String,
    recording: String,
    licence: String,
}

fn read_rows(out: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for split in ["train", "validation", "test"] {
        let mut reader = csv::Reader::from_path(out.join(format!("{split}.csv"))).unwrap();
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(
            header,
            [
                "file_name",
                "caption_1",
                "caption_2",
                "caption_3",
                "caption_4",
                "caption_5",
                "labels",
                "source",
                "recording",
                "duration_s",
                "licence",
                "attribution"
            ]
        );
        for record in reader.records() {
            let r = record.unwrap();
            rows.push(Row {
                split: split.to_string(),
                file_name: r[0].to_string(),
                captions: (1..=5).map(|i| r[i].to_string()).collect(),
                labels: r[6].split(';').map(String::from).collect(),
                source: r[7].to_string(),
                recording: r[8].to_string(),
                licence: r[10].to_string(),
            });
        }
    }
    rows
}

#[test]
fn a_corpus_is_built_from_a_debian_package_split_per_sound_and_rebuilt_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (deb, sha) = build_deb(dir.path());
    let catalog = write_catalog(dir.path(), &sha);
    let out = dir.path().join("corpus");
    let cache = dir.path().join("cache");
    let debs = deb.parent().unwrap().to_str().unwrap().to_string();
    let build = |extra: &[&str]| {
        let mut args = vec![
            "corpus",
            "build",
            "--catalog",
            catalog.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--debs",
            &debs,
            "--cache",
            cache.to_str().unwrap(),
            "--threads",
            "2",
        ];
        args.extend_from_slice(extra);
        audiocap(&args)
    };
    let summary = ok(&build(&["--write-test-split"]));
    assert!(summary.contains("test"), "{summary}");

    let rows = read_rows(&out);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("corpus.json")).unwrap()).unwrap();
    // Left out: the silent, the corrupt and the copied file (with reasons), one
    // unmatched, one skipped.
    let left_out: Vec<(String, String)> = report["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["recording"].as_str().unwrap().to_string(),
                l["why"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(left_out.len(), 3, "{left_out:?}");
    assert!(left_out.iter().any(
        |(r, w)| r == "folder/things/rainz.wav" && w == "same audio as folder/things/rain0.wav"
    ));
    assert!(
        left_out
            .iter()
            .any(|(r, w)| r == "folder/things/silent.wav" && w == "silent")
    );
    assert!(
        left_out
            .iter()
            .any(|(r, w)| r == "folder/things/corrupt.wav" && w.contains("undecodable"))
    );
    assert_eq!(report["unmatched"]["folder"], 1);
    assert_eq!(report["skipped_by_rule"]["folder"], 1);
    assert_eq!(report["packages"][0]["sha256"], sha.as_str());

    // Every recording's clips: 7 dogs, 6 bells, 3 rains × 3 crops, 4 winds, 4 beeps.
    let singles: Vec<&Row> = rows.iter().filter(|r| r.source != "mixture").collect();
    assert_eq!(singles.len(), 7 + 6 + 9 + 4 + 4);
    let names: HashSet<&str> = singles.iter().map(|r| r.file_name.as_str()).collect();
    assert!(
        names.contains("folder-animals-dog0.wav") && names.contains("folder-animals-dog0-2.wav")
    );
    let mut split_of_recording: HashMap<&str, &str> = HashMap::new();
    for row in &singles {
        // Crops of one recording never straddle splits.
        let s = split_of_recording
            .entry(&row.recording)
            .or_insert(&row.split);
        assert_eq!(*s, row.split, "{}", row.recording);
        // Every caption names the sound; five distinct, sentence case.
        for c in &row.captions {
            assert!(
                row.labels
                    .iter()
                    .any(|l| c.to_lowercase().contains(l.as_str())),
                "{c:?} vs {:?}",
                row.labels
            );
            assert!(c.chars().next().unwrap().is_uppercase(), "{c}");
        }
        assert_eq!(row.captions.iter().collect::<HashSet<_>>().len(), 5);
        let audio = out.join("audio").join(&row.split).join(&row.file_name);
        let decoded = audiocap::audio::decode::decode_file(&audio).unwrap();
        assert_eq!(decoded.info.sample_rate, 16_000);
        let secs = decoded.info.duration_secs();
        assert!(
            (0.15..=10.0).contains(&secs),
            "{} is {secs} s",
            row.file_name
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.recording.starts_with("archive/weather/wind"))
    );
    assert!(
        singles
            .iter()
            .filter(|r| r.labels == ["rain"])
            .all(|r| r.licence == "CC-BY-4.0")
    );
    // Each sound with at least three recordings has a test recording.
    for label in ["dog", "bell", "rain", "wind", "beeps"] {
        assert!(
            singles
                .iter()
                .any(|r| r.split == "test" && r.labels == [label]),
            "no {label} in test"
        );
    }
    // Mixtures: parents from the mixture's own split, labels of both.
    let mixtures: Vec<&Row> = rows.iter().filter(|r| r.source == "mixture").collect();
    assert_eq!(mixtures.len(), 6 + 1 + 2);
    for m in &mixtures {
        let (a, b) = m.recording.split_once('+').unwrap();
        assert_eq!(split_of_recording[a], m.split);
        assert_eq!(split_of_recording[b], m.split);
        assert!(m.labels.len() >= 2);
    }

    // The trainer reads the manifests as the Clotho layout.
    let set = audiocap::train::data::load_train_set(
        &out.join("train.csv"),
        &out.join("audio/train"),
        None,
    )
    .unwrap();
    assert_eq!(
        set.clips.len(),
        rows.iter().filter(|r| r.split == "train").count()
    );
    assert!(set.missing_audio.is_empty(), "{:?}", set.missing_audio);

    // The test list was written; a rebuild is byte-identical and follows the list.
    let list = std::fs::read_to_string(catalog.join("test-split.txt")).unwrap();
    let listed: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
    let test_recordings: HashSet<&str> = singles
        .iter()
        .filter(|r| r.split == "test")
        .map(|r| r.recording.as_str())
        .collect();
    assert_eq!(
        listed.iter().copied().collect::<HashSet<_>>(),
        test_recordings
    );
    let before: Vec<Vec<u8>> = ["train.csv", "validation.csv", "test.csv"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    let refused = build(&[]);
    assert!(
        !refused.status.success(),
        "an existing corpus must not be overwritten"
    );
    ok(&build(&["--overwrite"]));
    for (f, b) in ["train.csv", "validation.csv", "test.csv"]
        .iter()
        .zip(&before)
    {
        assert_eq!(
            &std::fs::read(out.join(f)).unwrap(),
            b,
            "{f} changed on rebuild"
        );
    }
    // Move one dog recording into the fixed list: it goes to test.
    let dog_train = singles
        .iter()
        .find(|r| r.split == "train" && r.labels == ["dog"])
        .unwrap()
        .recording
        .clone();
    std::fs::write(
        catalog.join("test-split.txt"),
        format!("{list}{dog_train}\n"),
    )
    .unwrap();
    ok(&build(&["--overwrite"]));
    let rows = read_rows(&out);
    assert!(
        rows.iter()
            .any(|r| r.recording == dog_train && r.split == "test")
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("corpus.json")).unwrap()).unwrap();
    assert_eq!(report["fixed_test_split"], true);
}

#[test]
fn a_bad_catalog_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = write_catalog(dir.path(), "not-a-hash");
    std::fs::write(
        catalog.join("sounds/archive.toml"),
        "source = \"archive\"\n[[sound]]\nmatch = [\"a[\"]\nlabels = [\"Wind\"]\ncaptions = [\"gusts\"]\n",
    )
    .unwrap();
    let out = audiocap(&["corpus", "check", "--catalog", catalog.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "sha256",
        "bad glob",
        "label `Wind`",
        "at least 5 needed",
        "contains none of the labels",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn the_repository_corpus_definition_is_valid() {
    let out = audiocap(&[
        "corpus",
        "check",
        "--catalog",
        concat!(env!("CARGO_MANIFEST_DIR"), "/corpus"),
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("valid"), "{stdout}");
}

/// The repository's own definition on its real, pinned packages: the small ones
/// (the freedesktop sound theme and espeak-ng, about 6 MB from the Debian archive,
/// cached under target/ between runs) with speech, synthetic signals and mixtures.
#[test]
fn the_repository_corpus_builds_speech_and_sounds_from_the_pinned_packages() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = root.join("target/corpus-cache");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("corpus");
    // The repository's fixed test list is read (not written: no --write-test-split).
    let stdout = ok(&audiocap(&[
        "corpus",
        "build",
        "--catalog",
        root.join("corpus").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--only",
        "freedesktop,speech,synthetic,mixtures",
    ]));
    let rows = read_rows(&out);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("corpus.json")).unwrap()).unwrap();
    let speech: Vec<&Row> = rows.iter().filter(|r| r.source == "speech").collect();
    // 14 voices × 12 utterances, none lost.
    assert_eq!(speech.len(), 14 * 12, "{stdout}");
    assert!(
        speech
            .iter()
            .all(|r| r.labels.contains(&"speech".to_string()))
    );
    for row in speech.iter().take(20) {
        let audio = out.join("audio").join(&row.split).join(&row.file_name);
        let decoded = audiocap::audio::decode::decode_file(&audio).unwrap();
        // Speech of a sentence: seconds long and clearly audible.
        let secs = decoded.info.duration_secs();
        assert!((1.0..=10.0).contains(&secs), "{}: {secs} s", row.file_name);
        let rms = audiocap::corpus::clips::rms(&decoded.samples);
        assert!(rms > 0.01, "{}: rms {rms}", row.file_name);
    }
    assert!(rows.iter().filter(|r| r.source == "freedesktop").count() >= 15);
    // Only very short theme sounds may be left out (too short after trimming).
    for l in report["left_out"].as_array().unwrap() {
        let why = l["why"].as_str().unwrap();
        assert!(why.starts_with("too short"), "{l}");
    }
    for split in ["train", "validation", "test"] {
        assert!(
            rows.iter()
                .any(|r| r.split == split && r.source == "speech"),
            "{split}"
        );
        assert!(
            rows.iter()
                .any(|r| r.split == split && r.source == "mixture"),
            "{split}"
        );
    }
    let names: Vec<&str> = report["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"espeak-ng") && names.contains(&"sound-theme-freedesktop"));
    // espeak-ng's whole library closure comes from pinned packages (libpcaudio0 links
    // PulseAudio, which no fresh machine has).
    assert!(names.contains(&"libpulse0"), "{names:?}");

    // The same definition without libpulse0: the build stops before speaking, naming
    // the libraries, instead of writing 168 unusable recordings. (In this test, not a
    // test of its own: both would unpack into the same cache at once.)
    let definition = dir.path().join("definition");
    copy_dir(&root.join("corpus"), &definition);
    let toml = std::fs::read_to_string(definition.join("corpus.toml")).unwrap();
    let speech_list = toml.find("[speech]").unwrap();
    let (head, tail) = toml.split_at(speech_list);
    let without = format!("{head}{}", tail.replacen("    \"libpulse0\",\n", "", 1));
    assert_ne!(without, toml, "libpulse0 is in [speech] packages");
    std::fs::write(definition.join("corpus.toml"), without).unwrap();
    let out = audiocap(&[
        "corpus",
        "build",
        "--catalog",
        definition.to_str().unwrap(),
        "--out",
        dir.path().join("broken").to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--only",
        "speech",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // Where PulseAudio is not on the machine the libraries are missing; where it is
    // (Debian's ffmpeg, which .ci/run installs for the codec tests, pulls it in) they
    // would come from the machine. Either way the build names them and stops.
    assert!(
        stderr.contains("not in any of the speech packages: libpulse-simple.so.0, libpulse.so.0")
            || (stderr.contains(
                "taken from this machine, not from a pinned package: libpulse-simple.so.0 ("
            ) && stderr.contains("), libpulse.so.0 (")),
        "{stderr}"
    );
    assert!(!dir.path().join("broken").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
