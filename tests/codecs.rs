//! Every codec an archive holds (issue 28): the formats symphonia reads natively
//! (AIFF, CAF, MPEG layer 2, Matroska/WebM), Opus in Ogg, WebM and MP4 on the
//! pure-Rust decoder (checked sample by sample against libopus, and by fbank and
//! caption against the same audio in WAV), and the ffmpeg fallback: with Debian's
//! `ffmpeg` (installed by `.ci/run`) and without it, switched off or pointed at a
//! path that does not exist, and with stand-in programs that hang or fail.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arrow_array::{Array, StringArray};
use audiocap::audio::decode::{DecodeError, decode_file};
use audiocap::audio::fbank::{Fbank, FbankConfig};
use audiocap::audio::ffmpeg::{FfmpegOptions, FfmpegSetting};
use audiocap::audio::frontend::{FrontEnd, FrontEndError, ModelAudio};
use audiocap::audio::segment::SegmentConfig;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::audio_inputs::{amplitude, data, db, residual_rms, two_tone};

const MODEL_RATE: u32 = 16_000;

/// Debian's ffmpeg, which `.ci/run` installs; the tests that need it say so.
fn ffmpeg() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("ffmpeg"))
            .find(|p| p.is_file())
    });
    found.expect(
        "these tests need ffmpeg on PATH (`apt-get install -y ffmpeg`; .ci/run installs it)",
    )
}

/// Runs ffmpeg with `args` (quiet, overwriting) and checks it succeeded.
fn ffmpeg_run(args: &[&str]) {
    let out = Command::new(ffmpeg())
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// make.sh's two-tone stereo clip, `seconds` long, encoded by ffmpeg with `codec`
/// (and `extra` arguments) into `path`.
fn encode_tone(path: &Path, seconds: f64, codec: &str, extra: &[&str]) {
    let source = format!(
        "aevalsrc=exprs=0.5*sin(2*PI*440*t)|0.25*sin(2*PI*1000*t):sample_rate=44100:\
         duration={seconds}"
    );
    let mut args = vec!["-f", "lavfi", "-i", &source, "-c:a", codec];
    args.extend_from_slice(extra);
    let out = path.to_str().unwrap();
    args.push(out);
    ffmpeg_run(&args);
}

fn front_end(ffmpeg: FfmpegOptions) -> FrontEnd {
    FrontEnd::new(MODEL_RATE, SegmentConfig::default())
        .unwrap()
        .with_ffmpeg(ffmpeg)
}

fn at_model_rate(path: &Path, ffmpeg: FfmpegOptions) -> Result<ModelAudio, FrontEndError> {
    let file = std::fs::File::open(path).unwrap();
    let hint = path.extension().and_then(|e| e.to_str());
    front_end(ffmpeg).decode_to_rate(std::io::BufReader::new(file), hint)
}

/// Checks the two tones of make.sh's clip at 16 kHz over its middle second: both at
/// their level, little else.
fn assert_two_tones(label: &str, samples: &[f32], rate: f64, max_residual_db: f64) {
    let from = (0.25 * rate) as usize;
    let to = from + rate as usize;
    assert!(samples.len() >= to, "{label}: {} samples", samples.len());
    let a440 = amplitude(samples, rate, 440.0, from, to);
    let a1000 = amplitude(samples, rate, 1_000.0, from, to);
    let noise = residual_rms(samples, rate, &[440.0, 1_000.0], from, to);
    println!(
        "{label}: 440 Hz {:+.3} dB, 1 kHz {:+.3} dB, residual {:.1} dB",
        db(a440 / 0.25),
        db(a1000 / 0.125),
        db(noise / 0.25)
    );
    assert!(db(a440 / 0.25).abs() < 0.5, "{label}: 440 Hz at {a440}");
    assert!(db(a1000 / 0.125).abs() < 0.5, "{label}: 1 kHz at {a1000}");
    assert!(
        db(noise / 0.25) < max_residual_db,
        "{label}: residual {noise}"
    );
}

#[test]
fn aiff_caf_mp2_and_matroska_decode_natively() {
    // (file, codec, frames: 0.2 s of PCM exactly; 1.5 s of lossy within two frames)
    for (file, codec, frames) in [
        ("tone.aiff", "pcm_s16be", 8_820..=8_820),
        ("tone.caf", "pcm_s16le", 8_820..=8_820),
        ("tone.mp2", "mp2", 66_150..=66_150 + 2 * 1_152 + 1_105),
        ("tone_vorbis.mka", "vorbis", 66_150..=66_150 + 2_048),
    ] {
        let decoded = decode_file(&data(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let info = &decoded.info;
        assert_eq!(
            (info.sample_rate, info.channels, info.codec.as_str()),
            (44_100, 2, codec),
            "{file}"
        );
        assert!(frames.contains(&info.frames), "{file}: {info:?}");
        assert_eq!(info.warnings(), None, "{file}: {info:?}");
        if codec.starts_with("pcm") {
            let max_diff = decoded
                .samples
                .iter()
                .enumerate()
                .map(|(i, &s)| (f64::from(s) - two_tone(i as f64 / 44_100.0)).abs())
                .fold(0.0, f64::max);
            assert!(max_diff <= 1.0 / 32_768.0, "{file}: max diff {max_diff}");
        } else {
            assert_two_tones(file, &decoded.samples, 44_100.0, -30.0);
        }
    }
}

#[test]
fn opus_decodes_in_ogg_webm_and_mp4() {
    for file in ["tone_opus.ogg", "tone_opus.webm", "tone_opus.mp4"] {
        let decoded = decode_file(&data(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let info = &decoded.info;
        println!("{file}: {info:?}");
        assert_eq!(
            (info.sample_rate, info.channels, info.codec.as_str()),
            (48_000, 2, "opus"),
            "{file}"
        );
        assert_eq!(info.skipped_packets, 0, "{file}");
        // 1.5 s at 48 kHz; the pre-skip is dropped, so Ogg (whose last page trims the
        // end padding) is exact, and the others keep at most one 20 ms frame of it.
        let exact = 72_000;
        if file.ends_with(".ogg") {
            assert_eq!(info.frames, exact, "{file}");
        } else {
            assert!(
                (exact..=exact + 960).contains(&info.frames),
                "{file}: {info:?}"
            );
        }
        assert_two_tones(file, &decoded.samples, 48_000.0, -30.0);
        // Resampled to the model's rate like every other source.
        let audio = at_model_rate(&data(file), FfmpegOptions::off()).unwrap();
        assert_eq!(audio.rate, MODEL_RATE);
        assert_two_tones(
            &format!("{file} at 16 kHz"),
            &audio.samples,
            16_000.0,
            -30.0,
        );
    }
}

/// The pure-Rust decoder against libopus (through ffmpeg's `libopus` decoder), sample
/// by sample, on the same packets.
#[test]
fn opus_decodes_as_libopus_does() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["tone_opus.ogg", "bench_10s.opus"] {
        let raw = dir.path().join(format!("{file}.f32"));
        ffmpeg_run(&[
            "-c:a",
            "libopus",
            "-i",
            data(file).to_str().unwrap(),
            "-ac",
            "2",
            "-f",
            "f32le",
            raw.to_str().unwrap(),
        ]);
        let stereo: Vec<f32> = std::fs::read(&raw)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let reference: Vec<f32> = stereo
            .chunks_exact(2)
            .map(|p| (p[0] + p[1]) / 2.0)
            .collect();
        let ours = decode_file(&data(file)).unwrap().samples;
        assert_eq!(ours.len(), reference.len(), "{file}: length");
        let signal: f64 = reference.iter().map(|&x| f64::from(x).powi(2)).sum();
        let error: f64 = ours
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        let max = ours
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let snr = 10.0 * (signal / error.max(1e-30)).log10();
        println!(
            "{file}: {} samples, SNR against libopus {snr:.1} dB, max diff {max:e}",
            ours.len()
        );
        // 16-bit output (the decoder's) against libopus's float output.
        assert!(snr > 70.0, "{file}: SNR {snr:.1} dB against libopus");
        assert!(max < 2e-3, "{file}: max diff {max}");
    }
}

/// A captioned clip as WAV and as Opus (Ogg and WebM, 96 kbps): the fbank differs by
/// what the codec loses, and the bundled model's captions are the same.
#[test]
fn opus_fbank_and_captions_match_the_same_audio_in_wav() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let samples = repo.join("exported_models/samples");
    let dir = tempfile::tempdir().unwrap();
    let wav_dir = dir.path().join("wav");
    let opus_dir = dir.path().join("opus");
    std::fs::create_dir_all(&wav_dir).unwrap();
    std::fs::create_dir_all(&opus_dir).unwrap();
    let clips = [
        "0ad-actor-fauna-animal-cattle_06",
        "speech-en-gb-scotland_m3-00",
        "wesnoth-ambient-birds2",
    ];
    let fbank = Fbank::new(FbankConfig::default()).unwrap();
    for (i, clip) in clips.iter().enumerate() {
        let wav = samples.join(format!("{clip}.wav"));
        std::fs::copy(&wav, wav_dir.join(format!("{clip}.wav"))).unwrap();
        let ext = if i % 2 == 0 { "opus" } else { "webm" };
        let opus = opus_dir.join(format!("{clip}.{ext}"));
        ffmpeg_run(&[
            "-i",
            wav.to_str().unwrap(),
            "-c:a",
            "libopus",
            "-b:a",
            "96k",
            opus.to_str().unwrap(),
        ]);
        let a = at_model_rate(&wav, FfmpegOptions::off()).unwrap();
        let b = at_model_rate(&opus, FfmpegOptions::off()).unwrap();
        assert_eq!(b.info.codec, "opus");
        // The same length: to within the resampler's rounding from Ogg (whose last
        // page trims the end padding), within one 20 ms frame from WebM.
        let slack = if ext == "opus" { 2 } else { 320 };
        assert!(
            a.samples.len().abs_diff(b.samples.len()) <= slack,
            "{clip}: {} vs {}",
            a.samples.len(),
            b.samples.len()
        );
        let (fa, fb) = (fbank.compute(&a.samples), fbank.compute(&b.samples));
        let n = fa.data.len().min(fb.data.len());
        let mean_abs = fa.data[..n]
            .iter()
            .zip(&fb.data[..n])
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / n as f32;
        let spread = {
            let mean = fa.data[..n].iter().sum::<f32>() / n as f32;
            fa.data[..n].iter().map(|x| (x - mean).abs()).sum::<f32>() / n as f32
        };
        println!(
            "{clip}: fbank mean |diff| {mean_abs:.4} (the WAV's mean |deviation| {spread:.4})"
        );
        // Coding loss shows mostly in the quietest bins (Opus's noise floor where the
        // WAV is silent): small against the fbank's spread (measured: 1-9% of it).
        assert!(mean_abs < 0.15 * spread, "{clip}: {mean_abs} vs {spread}");
    }

    let model = repo.join("exported_models/audiocap-sounds-small");
    let captions = |folder: &Path| -> BTreeMap<String, String> {
        let out = dir.path().join(format!(
            "{}.parquet",
            folder.file_name().unwrap().to_string_lossy()
        ));
        let ran = Command::new(env!("CARGO_BIN_EXE_audiocap"))
            .args(["caption", "--model", model.to_str().unwrap(), "--out"])
            .arg(&out)
            .arg(folder)
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        read_rows(&out)
            .into_iter()
            .map(|row| {
                assert_eq!(row.error, None, "{}", row.uri);
                let stem = Path::new(&row.uri)
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (stem, row.caption.unwrap_or_default())
            })
            .collect()
    };
    let from_wav = captions(&wav_dir);
    let from_opus = captions(&opus_dir);
    println!("WAV: {from_wav:#?}\nOpus: {from_opus:#?}");
    assert_eq!(from_wav.len(), clips.len());
    assert_eq!(from_wav, from_opus);
}

/// One row of a captions file or dataset.
#[derive(Debug, Clone)]
struct Row {
    uri: String,
    codec: Option<String>,
    caption: Option<String>,
    error: Option<String>,
    error_kind: Option<String>,
}

fn read_rows(path: &Path) -> Vec<Row> {
    let files = crate::common::parquet_files(path);
    let mut rows = Vec::new();
    for file in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let value = |c: &StringArray, i: usize| c.is_valid(i).then(|| c.value(i).to_string());
            let (uri, codec, caption) = (column("uri"), column("codec"), column("caption"));
            let (error, kind) = (column("error"), column("error_kind"));
            for i in 0..batch.num_rows() {
                rows.push(Row {
                    uri: uri.value(i).to_string(),
                    codec: value(&codec, i),
                    caption: value(&caption, i),
                    error: value(&error, i),
                    error_kind: value(&kind, i),
                });
            }
        }
    }
    rows
}

/// Clips that only ffmpeg decodes: (file name, ffmpeg encoder and options, the
/// `codec` ffmpeg reports).
const FFMPEG_ONLY: &[(&str, &str, &[&str], &str)] = &[
    ("tone.wma", "wmav2", &["-b:a", "128k"], "ffmpeg:wmav2"),
    ("tone.ac3", "ac3", &["-b:a", "192k"], "ffmpeg:ac3"),
    ("tone.wv", "wavpack", &[], "ffmpeg:wavpack"),
    ("tone.tta", "tta", &[], "ffmpeg:tta"),
    // A native container holding a codec only ffmpeg decodes.
    ("tone_ac3.mka", "ac3", &["-b:a", "192k"], "ffmpeg:ac3"),
];

fn ffmpeg_only_clips(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    FFMPEG_ONLY
        .iter()
        .map(|(name, codec, extra, reported)| {
            let path = dir.join(name);
            encode_tone(&path, 1.5, codec, extra);
            (path, *reported)
        })
        .collect()
}

#[test]
fn ffmpeg_decodes_what_no_native_decoder_reads() {
    let dir = tempfile::tempdir().unwrap();
    let ffmpeg = FfmpegOptions {
        setting: FfmpegSetting::Path(ffmpeg()),
        ..FfmpegOptions::default()
    };
    for (path, reported) in ffmpeg_only_clips(dir.path()) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // From the file in place, and from bytes (ffmpeg reads them on its stdin).
        let from_file =
            at_model_rate(&path, ffmpeg.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes = std::fs::read(&path).unwrap();
        let from_bytes = front_end(ffmpeg.clone())
            .decode_to_rate(std::io::Cursor::new(bytes), None)
            .unwrap_or_else(|e| panic!("{name} from bytes: {e}"));
        for (how, audio) in [("file", &from_file), ("bytes", &from_bytes)] {
            let info = &audio.info;
            println!("{name} ({how}): {info:?}");
            assert_eq!(info.codec, reported, "{name}");
            assert_eq!((info.sample_rate, info.channels), (44_100, 2), "{name}");
            // 1.5 s, give or take the codec's delay and padding; at the source's rate.
            assert!(
                (1.45..1.6).contains(&info.duration_secs()),
                "{name}: {} s",
                info.duration_secs()
            );
            assert_two_tones(&format!("{name} ({how})"), &audio.samples, 16_000.0, -30.0);
        }
        // Without ffmpeg the same file says what it is and what would read it.
        for off in [
            FfmpegOptions::off(),
            FfmpegOptions {
                setting: FfmpegSetting::Path(dir.path().join("no/such/ffmpeg")),
                ..FfmpegOptions::default()
            },
        ] {
            let error = at_model_rate(&path, off.clone()).unwrap_err();
            let FrontEndError::Decode(error) = error else {
                panic!("{name}: {error}");
            };
            let message = error.to_string();
            println!("{name} without ffmpeg: {message}");
            assert!(
                matches!(error, DecodeError::NeedsFfmpeg { .. }),
                "{name}: {error:?}"
            );
            assert_eq!(error.kind(), "unsupported_codec");
            assert!(message.contains("install ffmpeg"), "{message}");
            let named = if name.ends_with(".mka") {
                "codec ac3".to_string()
            } else {
                format!("(.{})", name.rsplit('.').next().unwrap())
            };
            assert!(message.contains(&named), "{name}: {message}");
        }
    }
    // An object without an extension is named by its first bytes.
    let wma = std::fs::read(dir.path().join("tone.wma")).unwrap();
    let error = front_end(FfmpegOptions::off())
        .decode_to_rate(std::io::Cursor::new(wma), None)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("Windows Media Audio (ASF): no native decoder"),
        "{error}"
    );
}

#[test]
fn what_ffmpeg_cannot_read_either_keeps_its_kind_and_gets_ffmpegs_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("garbage.wma");
    std::fs::write(&fake, b"this is not windows media at all\n".repeat(64)).unwrap();
    let ffmpeg = FfmpegOptions {
        setting: FfmpegSetting::Path(ffmpeg()),
        ..FfmpegOptions::default()
    };
    let FrontEndError::Decode(error) = at_model_rate(&fake, ffmpeg).unwrap_err() else {
        panic!("not a decode error");
    };
    let message = error.to_string();
    assert_eq!(error.kind(), "not_audio", "{message}");
    assert!(
        message.starts_with("not a recognised audio file")
            && message.contains("; ffmpeg could not read it either: ")
            && message.ends_with("Invalid data found when processing input"),
        "{message}"
    );
}

/// Writes an executable shell script standing in for ffmpeg.
fn stand_in(dir: &Path, name: &str, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn an_ffmpeg_that_hangs_is_stopped_and_one_that_fails_is_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.wma");
    std::fs::write(&input, b"0123456789".repeat(100)).unwrap();

    // It never writes a sample: stopped at the limit (not the script's 30 s).
    let hangs = stand_in(dir.path(), "hangs", "exec sleep 30");
    let started = Instant::now();
    let error = at_model_rate(
        &input,
        FfmpegOptions {
            setting: FfmpegSetting::Path(hangs),
            timeout: Duration::from_millis(500),
        },
    )
    .unwrap_err();
    let took = started.elapsed();
    let FrontEndError::Decode(error) = error else {
        panic!("{error}");
    };
    assert!(
        matches!(error, DecodeError::FfmpegTimeout { .. }),
        "{error:?}"
    );
    assert_eq!(error.kind(), "ffmpeg_timeout");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // It writes some samples, then fails: the error says how far it got, and its
    // last stderr line is the reason.
    let fails = stand_in(
        dir.path(),
        "fails",
        "head -c 64000 /dev/zero; echo 'Stream #0:0: Audio: fakec, 8000 Hz, mono' >&2; \
         echo 'x.wma: Error while decoding stream: the disk is on fire' >&2; exit 1",
    );
    let mut front_end = front_end(FfmpegOptions {
        setting: FfmpegSetting::Path(fails),
        ..FfmpegOptions::default()
    });
    let error = front_end
        .decode_file_segments(&input, |_| ControlFlow::Continue(()))
        .unwrap_err();
    let FrontEndError::Decode(error) = error else {
        panic!("{error}");
    };
    assert!(
        matches!(&error, DecodeError::Corrupt { frames: 16_000, detail }
            if detail == "ffmpeg: x.wma: Error while decoding stream: the disk is on fire"),
        "{error:?}"
    );
}

/// `audiocap run` over a folder of many codecs: with ffmpeg on PATH every one is
/// captioned and its `codec` says which decoder read it; with `[decode] ffmpeg =
/// false` the ffmpeg-only ones are error rows that say what would read them; with an
/// extension list that leaves them out, the summary counts them by extension.
#[test]
fn a_run_captions_every_codec_and_says_what_it_skipped() {
    use crate::pipeline_run::{run, write_pipeline};
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("audio");
    std::fs::create_dir_all(&audio).unwrap();
    for name in [
        "tone_opus.ogg",
        "tone_opus.webm",
        "tone.mp2",
        "tone_vorbis.mka",
    ] {
        std::fs::copy(data(name), audio.join(name)).unwrap();
    }
    encode_tone(&audio.join("tone.wma"), 1.5, "wmav2", &[]);
    encode_tone(&audio.join("tone.wv"), 1.5, "wavpack", &[]);
    std::fs::write(audio.join("notes.txt"), "recorded in 1998\n").unwrap();

    let by_name = |out: &Path| -> BTreeMap<String, Row> {
        read_rows(out)
            .into_iter()
            .map(|row| {
                let name = Path::new(&row.uri)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (name, row)
            })
            .collect()
    };
    let captioned = |row: &Row| row.caption.is_some() && row.error.is_none();

    // ffmpeg on PATH (the default).
    let out = dir.path().join("with");
    let pipeline = write_pipeline(dir.path(), &audio, out.to_str().unwrap());
    let ran = run(&pipeline, &[]);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert_eq!(
        ran.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(
        stdout.contains("skipped by extension (input.extensions): 1 .txt"),
        "{stdout}"
    );
    let rows = by_name(&out);
    let codecs: Vec<(&str, Option<&str>)> = rows
        .iter()
        .map(|(name, row)| (name.as_str(), row.codec.as_deref()))
        .collect();
    assert_eq!(
        codecs,
        [
            ("tone.mp2", Some("mp2")),
            ("tone.wma", Some("ffmpeg:wmav2")),
            ("tone.wv", Some("ffmpeg:wavpack")),
            ("tone_opus.ogg", Some("opus")),
            ("tone_opus.webm", Some("opus")),
            ("tone_vorbis.mka", Some("vorbis")),
        ]
    );
    assert!(rows.values().all(captioned), "{rows:#?}");

    // ffmpeg switched off.
    let out = dir.path().join("without");
    let pipeline = write_pipeline(dir.path(), &audio, out.to_str().unwrap());
    let ran = run(&pipeline, &["decode.ffmpeg=false".to_string()]);
    assert_eq!(
        ran.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&ran.stdout)
    );
    let rows = by_name(&out);
    for (name, what) in [("tone.wma", "Windows Media Audio"), ("tone.wv", "WavPack")] {
        let row = &rows[name];
        assert_eq!(
            row.error_kind.as_deref(),
            Some("unsupported_codec"),
            "{row:?}"
        );
        let error = row.error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with(what) && error.contains("install ffmpeg"),
            "{error}"
        );
    }
    for name in [
        "tone.mp2",
        "tone_opus.ogg",
        "tone_opus.webm",
        "tone_vorbis.mka",
    ] {
        assert!(captioned(&rows[name]), "{name}: {:?}", rows[name]);
    }

    // An extension list that leaves the ffmpeg-only files out: counted, not silent.
    let out = dir.path().join("opted_out");
    let pipeline = write_pipeline(dir.path(), &audio, out.to_str().unwrap());
    let ran = run(
        &pipeline,
        &[r#"input.extensions=["ogg", "webm", "mka", "mp2"]"#.to_string()],
    );
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert_eq!(ran.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("skipped by extension (input.extensions): 1 .txt, 1 .wma, 1 .wv"),
        "{stdout}"
    );
    assert_eq!(by_name(&out).len(), 4);
}

#[test]
fn doctor_reports_the_decoders_and_where_ffmpeg_is() {
    let doctor = |ffmpeg: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_audiocap"))
            .args(["doctor", "--ffmpeg", ffmpeg])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let found = doctor(ffmpeg().to_str().unwrap());
    assert!(
        found.starts_with("decoders:\n  native:\n    WAV (.wav, .wave, .bwf)\n"),
        "{found}"
    );
    assert!(found.contains("  opus: opus-pure 0.2.2 (pure Rust; Ogg, Matroska/WebM and MP4)\n"));
    let line = found.lines().find(|l| l.starts_with("  ffmpeg: ")).unwrap();
    assert!(
        line.starts_with(&format!(
            "  ffmpeg: {} (ffmpeg version ",
            ffmpeg().display()
        )),
        "{line}"
    );
    let off = doctor("false");
    assert!(
        off.contains("  ffmpeg: not available (switched off by `[decode] ffmpeg = false`); the formats below give error rows\n    Windows Media Audio (ASF) (.wma, .asf, .wmv)\n"),
        "{off}"
    );
}

/// ffmpeg opens nothing but the input: a playlist that names a URL is refused, not
/// fetched.
#[test]
fn ffmpeg_opens_nothing_but_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let playlist = dir.path().join("playlist.wma");
    std::fs::write(
        &playlist,
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/a.wav\n#EXT-X-ENDLIST\n",
    )
    .unwrap();
    let ffmpeg = FfmpegOptions {
        setting: FfmpegSetting::Path(ffmpeg()),
        ..FfmpegOptions::default()
    };
    for from_file in [true, false] {
        let mut front_end = front_end(ffmpeg.clone());
        let result = if from_file {
            front_end.decode_file_segments(&playlist, |_| ControlFlow::Continue(()))
        } else {
            let bytes = std::fs::read(&playlist).unwrap();
            front_end.decode_segments(std::io::Cursor::new(bytes), Some("wma"), |_| {
                ControlFlow::Continue(())
            })
        };
        let Err(FrontEndError::Decode(error)) = result else {
            panic!("the playlist decoded: {result:?}");
        };
        assert!(
            matches!(error, DecodeError::FfmpegFailed { .. }),
            "{error:?}"
        );
    }
}
