//! Front-end throughput: read + decode + resample + fbank, on one thread, in
//! x-realtime per core (seconds of audio per second of CPU), for 44.1 kHz stereo MP3,
//! FLAC and WAV sources and a 48 kHz stereo Opus source resampled to the model's
//! 16 kHz, and for WMA read by the ffmpeg fallback.
//!
//! `cargo bench --bench frontend` (add `-- --seconds N` to time each case for N
//! seconds, default 3). The MP3, FLAC and Opus sources are `tests/data/audio/bench_*`
//! (made by `tests/data/audio/make.sh`); the WAV is synthesised here, and the WMA is
//! the WAV encoded by ffmpeg (128 kbps `wmav2`) when ffmpeg is on PATH (else that case
//! is left out, and says so). Each case also reports the stages cumulatively (decode
//! only, + resample, + fbank) so a slow stage shows; ffmpeg decodes and resamples in
//! one step, so its case has no decode-only line. Per core is audio seconds over the
//! CPU seconds of this thread and of the ffmpeg children it waited for (from
//! `/proc/self/stat`, in 10 ms ticks); the wall-clock figure matches it on an idle
//! machine.

use std::hint::black_box;
use std::io::Cursor;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use audiocap::audio::decode::decode_stream;
use audiocap::audio::fbank::{Fbank, FbankConfig};
use audiocap::audio::ffmpeg::{FfmpegOptions, FfmpegSetting, locate};
use audiocap::audio::frontend::FrontEnd;
use audiocap::audio::segment::SegmentConfig;

/// A 16-bit stereo WAV of `seconds` at 44.1 kHz: the tests' two tones plus noise.
fn wav_source(seconds: usize) -> Vec<u8> {
    let rate = 44_100u32;
    let frames = rate as usize * seconds;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f64 / f64::from(1u32 << 24) - 0.5
    };
    let mut data = Vec::with_capacity(frames * 4);
    for i in 0..frames {
        let t = i as f64 / f64::from(rate);
        let left = 0.5 * (std::f64::consts::TAU * 440.0 * t).sin() + 0.02 * noise();
        let right = 0.25 * (std::f64::consts::TAU * 1000.0 * t).sin() + 0.02 * noise();
        for x in [left, right] {
            data.extend_from_slice(&((x * 32_767.0).round() as i16).to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(44 + data.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 4).to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

/// Which stages a run goes through.
#[derive(Clone, Copy)]
enum Stages {
    Decode,
    Resample,
    Fbank,
}

impl Stages {
    fn label(self) -> &'static str {
        match self {
            Stages::Decode => "decode",
            Stages::Resample => "decode+resample",
            Stages::Fbank => "decode+resample+fbank",
        }
    }
}

/// One pass over `bytes`; returns the seconds of audio it held.
fn run_once(
    bytes: &[u8],
    hint: &str,
    stages: Stages,
    front_end: &mut FrontEnd,
    fbank: &Fbank,
) -> f64 {
    let rate = front_end.rate();
    let info = match stages {
        Stages::Decode => decode_stream(Cursor::new(bytes), Some(hint), |chunk| {
            black_box(chunk);
            ControlFlow::Continue(())
        })
        .map_err(Into::into),
        Stages::Resample | Stages::Fbank => {
            front_end.decode_segments(Cursor::new(bytes), Some(hint), |segment| {
                if matches!(stages, Stages::Fbank) {
                    black_box(fbank.compute(&segment.samples));
                } else {
                    black_box(&segment.samples);
                }
                ControlFlow::Continue(())
            })
        }
    };
    match info {
        Ok(info) => {
            assert_eq!(rate, fbank.config().sample_rate);
            info.duration_secs()
        }
        Err(error) => panic!("the bench input does not decode: {error}"),
    }
}

/// CPU time this thread has run, from Linux's `/proc/thread-self/schedstat`, plus
/// that of the child processes waited for (ffmpeg; `/proc/self/stat`'s cutime and
/// cstime, in USER_HZ = 100 ticks): per-core throughput stays meaningful on a machine
/// busy with other work, where wall time does not. `None` elsewhere.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    let process = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = process.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?;
    Some(ns as f64 * 1e-9 + ticks as f64 / 100.0)
}

/// The WAV source encoded by ffmpeg as WMA (in memory), when ffmpeg is on PATH.
fn wma_source(wav: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let ffmpeg = locate(&FfmpegSetting::Search).ok()?;
    let mut child = Command::new(ffmpeg)
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "wav",
            "-i",
            "pipe:0",
        ])
        .args(["-c:a", "wmav2", "-b:a", "128k", "-f", "asf", "pipe:1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let wav = wav.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&wav));
    let out = child.wait_with_output().ok()?;
    writer.join().ok()?.ok()?;
    out.status.success().then_some(out.stdout)
}

fn main() {
    let mut seconds = 3.0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // `cargo bench` passes `--bench`; only `--seconds N` is ours.
        if arg == "--seconds" {
            seconds = args
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("--seconds takes a number"));
        }
    }
    let budget = Duration::from_secs_f64(seconds);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/audio");
    let read = |name: &str| {
        std::fs::read(data.join(name))
            .unwrap_or_else(|e| panic!("{}: {e} (run tests/data/audio/make.sh)", name))
    };
    let wav = wav_source(10);
    let mut sources = vec![
        ("MP3 128 kbps", "mp3", read("bench_10s.mp3")),
        ("Opus 64 kbps", "opus", read("bench_10s.opus")),
        ("FLAC 16-bit", "flac", read("bench_3s.flac")),
        ("WAV 16-bit", "wav", wav.clone()),
    ];
    match wma_source(&wav) {
        Some(wma) => sources.push(("WMA (ffmpeg)", "wma", wma)),
        None => println!("no ffmpeg on PATH: the WMA case (the ffmpeg fallback) is left out"),
    }
    let fbank = Fbank::new(FbankConfig::default()).unwrap_or_else(|e| panic!("fbank: {e}"));
    let rate = fbank.config().sample_rate;
    // The pipeline's default cut: inputs up to 30 s are one segment, longer ones 10 s windows.
    let mut front_end = FrontEnd::new(rate, SegmentConfig::default())
        .unwrap_or_else(|e| panic!("front end: {e}"))
        .with_ffmpeg(FfmpegOptions::default());

    println!(
        "front-end throughput, one thread, 44.1 kHz (Opus 48 kHz) stereo -> {rate} Hz mono, \
         {seconds} s per case"
    );
    for (name, hint, bytes) in &sources {
        for stages in [Stages::Decode, Stages::Resample, Stages::Fbank] {
            if *hint == "wma" && matches!(stages, Stages::Decode) {
                continue;
            }
            // Warm-up: builds the resampler and faults the pages in.
            let clip = run_once(bytes, hint, stages, &mut front_end, &fbank);
            let start = Instant::now();
            let cpu_start = thread_cpu_seconds();
            let mut audio = 0.0;
            let mut runs = 0;
            while start.elapsed() < budget {
                audio += run_once(bytes, hint, stages, &mut front_end, &fbank);
                runs += 1;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let cpu = cpu_start
                .zip(thread_cpu_seconds())
                .map_or(elapsed, |(from, to)| to - from);
            println!(
                "{name:<13} {:<22} {:>6.0}x realtime per core (CPU time), {:>6.0}x by wall clock  ({runs} x {clip:.1} s clip)",
                stages.label(),
                audio / cpu,
                audio / elapsed,
            );
        }
    }
}
