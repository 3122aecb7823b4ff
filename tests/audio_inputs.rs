//! The audio front end on real encoded files (made by `tests/data/audio/make.sh`) and on
//! every kind of bad input, through the entry points the pipeline calls.

use std::f64::consts::PI;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use audiocap::audio::decode::{AudioInfo, DecodeError, decode_file};
use audiocap::audio::ffmpeg::FfmpegOptions;
use audiocap::audio::frontend::{
    FrontEnd, FrontEndError, decode_file_segments, decode_file_to_rate,
};
use audiocap::audio::segment::{SegmentAudio, SegmentConfig, plan_segments};

const RATE: f64 = 44_100.0;
const MODEL_RATE: u32 = 16_000;

pub(crate) fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/audio")
        .join(name)
}

/// The mono mean of make.sh's stereo clip at time `t`.
pub(crate) fn two_tone(t: f64) -> f64 {
    (0.5 * (2.0 * PI * 440.0 * t).sin() + 0.25 * (2.0 * PI * 1000.0 * t).sin()) / 2.0
}

/// Amplitude of the `freq` component of `x` (sampled at `rate`) over `x[from..to]`, by
/// projection on sine and cosine (exact when the span holds whole cycles).
pub(crate) fn amplitude(x: &[f32], rate: f64, freq: f64, from: usize, to: usize) -> f64 {
    let (mut s, mut c) = (0.0, 0.0);
    for (i, &v) in x.iter().enumerate().take(to).skip(from) {
        let w = 2.0 * PI * freq * i as f64 / rate;
        s += f64::from(v) * w.sin();
        c += f64::from(v) * w.cos();
    }
    2.0 * s.hypot(c) / (to - from) as f64
}

/// RMS of `x[from..to]` after removing its components at `freqs` (fitted in phase).
pub(crate) fn residual_rms(x: &[f32], rate: f64, freqs: &[f64], from: usize, to: usize) -> f64 {
    let mut fits = Vec::new();
    for &f in freqs {
        let (mut s, mut c) = (0.0, 0.0);
        for (i, &v) in x.iter().enumerate().take(to).skip(from) {
            let w = 2.0 * PI * f * i as f64 / rate;
            s += f64::from(v) * w.sin();
            c += f64::from(v) * w.cos();
        }
        let n = (to - from) as f64;
        fits.push((f, 2.0 * s / n, 2.0 * c / n));
    }
    let energy: f64 = (from..to)
        .map(|i| {
            let model: f64 = fits
                .iter()
                .map(|&(f, a, b)| {
                    let w = 2.0 * PI * f * i as f64 / rate;
                    a * w.sin() + b * w.cos()
                })
                .sum();
            (f64::from(x[i]) - model).powi(2)
        })
        .sum();
    (energy / (to - from) as f64).sqrt()
}

pub(crate) fn db(ratio: f64) -> f64 {
    20.0 * ratio.log10()
}

#[test]
fn lossless_codecs_decode_to_the_encoded_samples() {
    // (file, codec, frames, largest difference from the analytic signal: the format's
    // quantisation step, halved by the two-channel mean and doubled for safety)
    let cases = [
        ("tone_u8.wav", "pcm_u8", 8_820, 1.0 / 128.0),
        ("tone_s16.wav", "pcm_s16le", 8_820, 1.0 / 32_768.0),
        ("tone_s24.wav", "pcm_s24le", 8_820, 1.0 / 8_388_608.0),
        ("tone_s32.wav", "pcm_s32le", 8_820, 1e-7),
        ("tone_f32.wav", "pcm_f32le", 8_820, 1e-7),
        ("tone_f64.wav", "pcm_f64le", 8_820, 1e-7),
        ("tone.flac", "flac", 66_150, 1.0 / 32_768.0),
        ("tone_alac.m4a", "alac", 66_150, 1.0 / 32_768.0),
    ];
    for (file, codec, frames, tolerance) in cases {
        let decoded = decode_file(&data(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            decoded.info,
            AudioInfo {
                sample_rate: 44_100,
                channels: 2,
                codec: codec.to_owned(),
                frames,
                skipped_packets: 0,
                declared_frames: decoded.info.declared_frames,
                truncated: false,
            },
            "{file}"
        );
        let max_diff = decoded
            .samples
            .iter()
            .enumerate()
            .map(|(i, &s)| (f64::from(s) - two_tone(i as f64 / RATE)).abs())
            .fold(0.0, f64::max);
        println!("{file}: max diff {max_diff:e}");
        assert!(max_diff <= tolerance, "{file}: max diff {max_diff}");
    }
}

#[test]
fn lossy_codecs_keep_duration_and_tone_levels() {
    // (file, codec): 1.5 s encoded; encoder delay and padding may add up to a frame or
    // two (MP3 1152, AAC 1024 samples per frame) where the container does not trim them.
    for (file, codec) in [
        ("tone.mp3", "mp3"),
        ("tone.ogg", "vorbis"),
        ("tone_aac.m4a", "aac"),
    ] {
        let decoded = decode_file(&data(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let info = &decoded.info;
        println!("{file}: {info:?}");
        assert_eq!(
            (info.sample_rate, info.channels, info.codec.as_str()),
            (44_100, 2, codec),
            "{file}"
        );
        assert_eq!(info.skipped_packets, 0, "{file}");
        // Whole files: nothing to warn about (a codec's padding is not truncation).
        assert_eq!(info.warnings(), None, "{file}: {info:?}");
        assert!(
            (66_150..=66_150 + 2 * 1_152 + 1_105).contains(&info.frames),
            "{file}: {} frames",
            info.frames
        );
        // The middle second (whole cycles of both tones), away from the codec's edges.
        let (from, to) = (11_025, 11_025 + 44_100);
        let a440 = amplitude(&decoded.samples, RATE, 440.0, from, to);
        let a1000 = amplitude(&decoded.samples, RATE, 1_000.0, from, to);
        let noise = residual_rms(&decoded.samples, RATE, &[440.0, 1_000.0], from, to);
        println!(
            "{file}: 440 Hz {:+.3} dB, 1 kHz {:+.3} dB, residual {:.1} dB",
            db(a440 / 0.25),
            db(a1000 / 0.125),
            db(noise / 0.25)
        );
        assert!(db(a440 / 0.25).abs() < 0.5, "{file}: 440 Hz at {a440}");
        assert!(db(a1000 / 0.125).abs() < 0.5, "{file}: 1 kHz at {a1000}");
        // Coding noise and any misplaced content stay well below the tones.
        assert!(db(noise / 0.25) < -30.0, "{file}: residual {noise}");
    }
}

/// A file cut short (an interrupted copy) still decodes what is there, and says so,
/// in every container that declares its length.
#[test]
fn truncated_files_keep_what_is_there_and_are_flagged() {
    for file in [
        "tone_s16.wav",
        "tone.flac",
        "tone.mp3",
        "bench_3s.flac",
        "bench_10s.mp3",
    ] {
        let bytes = std::fs::read(data(file)).unwrap();
        let whole = audiocap::audio::decode::decode_bytes(&bytes, file.rsplit('.').next())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(whole.info.warnings(), None, "{file}: {:?}", whole.info);
        let cut = &bytes[..bytes.len() * 6 / 10];
        let part = audiocap::audio::decode::decode_bytes(cut, file.rsplit('.').next())
            .unwrap_or_else(|e| panic!("{file} cut: {e}"));
        assert!(
            part.info.frames > 0 && part.info.frames < whole.info.frames,
            "{file}"
        );
        let warnings = part.info.warnings().unwrap_or_default();
        assert!(
            warnings.starts_with("truncated: the data ends"),
            "{file}: {warnings:?} {:?}",
            part.info
        );
    }
}

#[test]
fn eight_channels_are_averaged_into_mono() {
    let decoded = decode_file(&data("tone_8ch.flac")).unwrap();
    assert_eq!(
        (
            decoded.info.channels,
            decoded.info.frames,
            decoded.info.codec.as_str()
        ),
        (8, 22_050, "flac")
    );
    // Channel k holds 0.1 (k + 1) sin(2 pi 250 (k + 1) t).
    let expected = |t: f64| {
        (0..8)
            .map(|k| {
                let k = f64::from(k + 1);
                0.1 * k * (2.0 * PI * 250.0 * k * t).sin()
            })
            .sum::<f64>()
            / 8.0
    };
    let max_diff = decoded
        .samples
        .iter()
        .enumerate()
        .map(|(i, &s)| (f64::from(s) - expected(i as f64 / RATE)).abs())
        .fold(0.0, f64::max);
    assert!(max_diff <= 1.0 / 32_768.0, "max diff {max_diff}");
}

#[test]
fn front_end_resamples_and_segments_real_files() {
    // 1.5 s at 44.1 kHz is 24000 samples at 16 kHz; 0.5 s windows with a 0.25 s hop.
    let config = SegmentConfig {
        max_seconds: 1.0,
        window_seconds: 0.5,
        hop_seconds: 0.25,
        min_last_seconds: 0.1,
    };
    let mut front_end = FrontEnd::new(MODEL_RATE, config).unwrap();
    let whole = decode_file_to_rate(&data("tone.flac"), MODEL_RATE).unwrap();
    assert_eq!(whole.samples.len(), 24_000);
    // The resampler keeps both tones' levels (within 0.1 dB) over the middle second.
    let rate = f64::from(MODEL_RATE);
    let a1000 = amplitude(&whole.samples, rate, 1_000.0, 4_000, 20_000);
    let a440 = amplitude(&whole.samples, rate, 440.0, 4_000, 20_000);
    assert!(db(a1000 / 0.125).abs() < 0.1, "1 kHz at {a1000}");
    assert!(db(a440 / 0.25).abs() < 0.1, "440 Hz at {a440}");

    for file in [
        "tone.flac",
        "tone.mp3",
        "tone.ogg",
        "tone_aac.m4a",
        "tone_alac.m4a",
    ] {
        let mut segments: Vec<SegmentAudio> = Vec::new();
        let info = front_end
            .decode_file_segments(&data(file), |segment| {
                segments.push(segment);
                ControlFlow::Continue(())
            })
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        // The resampler gives round(frames * 16000 / 44100) samples.
        let len = ((2 * info.frames * u64::from(MODEL_RATE) + 44_100) / 88_200) as usize;
        let plan = plan_segments(len, MODEL_RATE, &config);
        let got: Vec<_> = segments.iter().map(SegmentAudio::segment).collect();
        assert_eq!(got, plan, "{file}");
        assert_eq!(segments[1].start_secs(MODEL_RATE), 0.25);
        assert_eq!(segments[1].end_secs(MODEL_RATE), 0.75);
        if file == "tone.flac" {
            // Segments are slices of the whole clip at the model's rate.
            for segment in &segments {
                assert_eq!(
                    segment.samples,
                    whole.samples[segment.start_sample..segment.end_sample],
                    "{file} segment {}",
                    segment.index
                );
            }
        }
    }
}

/// A WAV file of `seconds` of 16-bit mono at `rate`, generated as it is read: nothing
/// but the read position is stored, whatever its length.
struct SyntheticWav {
    rate: u32,
    frames: u64,
    pos: u64,
}

impl SyntheticWav {
    const HEADER: u64 = 44;

    fn new(rate: u32, seconds: u64) -> Self {
        Self {
            rate,
            frames: u64::from(rate) * seconds,
            pos: 0,
        }
    }

    fn len(&self) -> u64 {
        Self::HEADER + 2 * self.frames
    }

    fn header(&self) -> [u8; 44] {
        let data_len = (2 * self.frames) as u32;
        let mut h = [0u8; 44];
        h[0..4].copy_from_slice(b"RIFF");
        h[4..8].copy_from_slice(&(36 + data_len).to_le_bytes());
        h[8..16].copy_from_slice(b"WAVEfmt ");
        h[16..20].copy_from_slice(&16u32.to_le_bytes());
        h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
        h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
        h[24..28].copy_from_slice(&self.rate.to_le_bytes());
        h[28..32].copy_from_slice(&(2 * self.rate).to_le_bytes());
        h[32..34].copy_from_slice(&2u16.to_le_bytes());
        h[34..36].copy_from_slice(&16u16.to_le_bytes());
        h[36..40].copy_from_slice(b"data");
        h[40..44].copy_from_slice(&data_len.to_le_bytes());
        h
    }

    /// One period of the audio data: a sawtooth of 256 frames (512 bytes).
    fn period() -> Vec<u8> {
        (0..256i16)
            .flat_map(|i| ((i - 128) * 64).to_le_bytes())
            .collect()
    }
}

impl Read for SyntheticWav {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        let (header, period) = (self.header(), Self::period());
        let mut filled = 0;
        while filled < n {
            let at = self.pos + filled as u64;
            // Copy from the header or the period, whichever holds byte `at`.
            let (from, offset) = if at < Self::HEADER {
                (&header[..], at as usize)
            } else {
                (&period[..], ((at - Self::HEADER) % 512) as usize)
            };
            let take = (from.len() - offset).min(n - filled);
            buf[filled..filled + take].copy_from_slice(&from[offset..offset + take]);
            filled += take;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SyntheticWav {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek"))?;
        Ok(self.pos)
    }
}

#[test]
fn two_hours_stream_through_a_bounded_buffer() {
    // Two hours at 8 kHz, resampled to 16 kHz while decoding and cut into 10 s windows
    // with a 5 s hop. The segmenter may hold at most one window (or `max_seconds`,
    // equal here) plus one resampler output chunk: nothing grows with the length.
    let config = SegmentConfig {
        max_seconds: 10.0,
        window_seconds: 10.0,
        hop_seconds: 5.0,
        min_last_seconds: 1.0,
    };
    let source = SyntheticWav::new(8_000, 2 * 3600);
    let mut front_end = FrontEnd::new(MODEL_RATE, config).unwrap();
    let mut count = 0u32;
    let mut last_end = 0;
    let info = front_end
        .decode_segments(source, Some("wav"), |segment| {
            assert_eq!(segment.index, count);
            assert_eq!(segment.start_sample, count as usize * 80_000);
            assert_eq!(segment.samples.len(), 160_000);
            last_end = segment.end_sample;
            count += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(info.frames, 8_000 * 7_200);
    assert_eq!(last_end, 16_000 * 7_200);
    // Windows start every 5 s; the last full one ends at the end of the stream.
    assert_eq!(count, 1_439);
    let window = 160_000;
    let hop = 80_000;
    let peak = front_end.peak_buffered();
    println!("peak buffered: {peak} samples");
    // One resampler push gives at most a few thousand samples (one FFT block).
    assert!(peak < window + 8_192, "peak {peak}");
    assert!(peak < window + hop);
}

/// What the front end, without the ffmpeg fallback, says about one input.
fn front_end_error(path: &Path) -> String {
    let mut segments = 0;
    let mut front_end = FrontEnd::new(MODEL_RATE, SegmentConfig::default())
        .unwrap()
        .with_ffmpeg(FfmpegOptions::off());
    match front_end.decode_file_segments(path, |_| {
        segments += 1;
        ControlFlow::Continue(())
    }) {
        Ok(info) => panic!("{}: decoded {info:?}", path.display()),
        Err(error) => {
            assert_eq!(segments, 0, "{}", path.display());
            error.to_string()
        }
    }
}

/// A RIFF/WAVE file with a 16-byte `fmt ` chunk.
fn wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block_align = channels.wrapping_mul(bits / 8);
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((36 + data.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.wrapping_mul(u32::from(block_align)).to_le_bytes());
    out.extend_from_slice(&block_align.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

#[test]
fn every_bad_input_gets_a_specific_error_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let read = |name: &str| std::fs::read(data(name)).unwrap();
    let mut tone = vec![0.1f32; 4_000];
    let mut nan = tone.clone();
    nan[1_234] = f32::NAN;
    tone[3_000] = f32::NEG_INFINITY;
    let mut corrupt_flac = read("tone.flac");
    // Garble every audio frame: they start after the last metadata block.
    let mut audio_start = 4;
    loop {
        let block = &corrupt_flac[audio_start..audio_start + 4];
        audio_start += 4
            + usize::from(block[1]) * 65_536
            + usize::from(block[2]) * 256
            + usize::from(block[3]);
        if block[0] & 0x80 != 0 {
            break;
        }
    }
    for (i, b) in corrupt_flac.iter_mut().enumerate().skip(audio_start + 16) {
        *b = (i * 151 % 251) as u8;
    }
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty.wav", Vec::new()),
        ("text.wav", b"not audio at all, just words\n".repeat(40)),
        ("image.mp3", {
            let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
            png.extend((0..2_000u32).map(|i| (i * 7 % 256) as u8));
            png
        }),
        ("truncated_header.wav", read("tone_s16.wav")[..30].to_vec()),
        ("truncated_header.flac", read("tone.flac")[..20].to_vec()),
        ("truncated_header.m4a", read("tone_aac.m4a")[..200].to_vec()),
        ("corrupt.flac", corrupt_flac),
        ("mp3_in.wav", {
            let mut bytes = wav(0x0055, 1, 16_000, 0, &[0; 32]);
            bytes[20..22].copy_from_slice(&0x0055u16.to_le_bytes());
            bytes
        }),
        ("nan.wav", wav(3, 1, 16_000, 32, &f32_bytes(&nan))),
        ("inf.wav", wav(3, 1, 16_000, 32, &f32_bytes(&tone))),
        ("27ch.wav", wav(1, 27, 16_000, 16, &[0; 540])),
        ("zero_rate.wav", wav(1, 1, 0, 16, &[0; 64])),
        ("huge_rate.wav", wav(1, 1, 10_000_000, 16, &[0; 64])),
        ("tiny_rate.wav", wav(1, 1, 500, 16, &[0; 64])),
    ];
    for (name, bytes) in &files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    std::fs::create_dir(dir.path().join("folder.wav")).unwrap();
    let missing = dir.path().join("missing.wav");

    let expected: Vec<(PathBuf, String)> = [
        ("empty.wav", "the input is empty (0 bytes)".to_owned()),
        (
            "text.wav",
            "not a recognised audio file (supported containers: WAV, AIFF, CAF, FLAC, MPEG \
             audio, AAC (ADTS), Ogg, MP4/M4A, Matroska/WebM)"
                .to_owned(),
        ),
        (
            "image.mp3",
            "not a recognised audio file (supported containers: WAV, AIFF, CAF, FLAC, MPEG \
             audio, AAC (ADTS), Ogg, MP4/M4A, Matroska/WebM)"
                .to_owned(),
        ),
        (
            "truncated_header.wav",
            "the input is truncated: it ends inside the container header".to_owned(),
        ),
        (
            "truncated_header.flac",
            "the input is truncated: it ends inside the container header".to_owned(),
        ),
        (
            "truncated_header.m4a",
            "the input is truncated: it ends inside the container header".to_owned(),
        ),
        (
            "corrupt.flac",
            "corrupt audio data after 0 frames".to_owned(),
        ),
        (
            "mp3_in.wav",
            "codec mp3: no native decoder reads it; install ffmpeg (or set `[decode] ffmpeg` \
             to its path) to read it (switched off by `[decode] ffmpeg = false`)"
                .to_owned(),
        ),
        ("nan.wav", "non-finite sample NaN at frame 1234".to_owned()),
        ("inf.wav", "non-finite sample -inf at frame 3000".to_owned()),
        (
            "27ch.wav",
            "the header declares 27 channels, more than the WAV reader supports".to_owned(),
        ),
        (
            "zero_rate.wav",
            "invalid sample rate 0 Hz (expected 1..=768000)".to_owned(),
        ),
        (
            "huge_rate.wav",
            "invalid sample rate 10000000 Hz (expected 1..=768000)".to_owned(),
        ),
        (
            "tiny_rate.wav",
            "resampling: unsupported input sample rate 500 Hz (supported: 1000..=768000 Hz)"
                .to_owned(),
        ),
        (
            "folder.wav",
            format!(
                "cannot open {}: is a directory",
                dir.path().join("folder.wav").display()
            ),
        ),
    ]
    .into_iter()
    .map(|(name, message)| (dir.path().join(name), message))
    .chain([(
        missing.clone(),
        format!(
            "cannot open {}: No such file or directory (os error 2)",
            missing.display()
        ),
    )])
    .collect();

    // One run over every input, as the pipeline does: each fails on its own.
    let mut wrong = Vec::new();
    for (path, message) in &expected {
        let got = front_end_error(path);
        println!("{}: {got}", path.display());
        if !got.starts_with(message.as_str()) {
            wrong.push(format!(
                "{}: got {got:?}, expected {message:?}",
                path.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // A file cut part-way through its audio keeps what is there (an interrupted
    // download): fewer frames, no error. The Ogg file is cut inside its last page (its
    // 1.5 s are three pages; a page is the smallest unit it can decode).
    for (name, keep) in [("tone.flac", 0.66), ("tone.mp3", 0.66), ("tone.ogg", 0.85)] {
        let bytes = read(name);
        let path = dir.path().join(format!("cut_{name}"));
        std::fs::write(&path, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
        match decode_file(&path) {
            Ok(decoded) => {
                println!("cut {name}: {} frames", decoded.info.frames);
                assert!(
                    (20_000..66_150).contains(&decoded.info.frames),
                    "cut {name}: {} frames",
                    decoded.info.frames
                );
            }
            Err(error) => panic!("cut {name}: {error}"),
        }
    }

    // An M4A written by ffmpeg keeps its track headers (`moov`) at the end, so a cut
    // one has none and nothing can be decoded.
    let bytes = read("tone_aac.m4a");
    let path = dir.path().join("cut_tone_aac.m4a");
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert!(matches!(decode_file(&path), Err(DecodeError::Truncated)));

    // A front-end error keeps its decode error for callers that match on it.
    let error = decode_file_segments(&missing, MODEL_RATE, &SegmentConfig::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(
        error,
        FrontEndError::Decode(DecodeError::Open { .. })
    ));
}
