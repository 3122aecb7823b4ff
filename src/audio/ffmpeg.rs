//! The fallback decoder: an `ffmpeg` child process for what no native decoder reads
//! (WMA, AC-3, AMR, WavPack, RealAudio, ...).
//!
//! ffmpeg reads the input (its path, or the bytes on its stdin), takes the first audio
//! stream, down-mixes it to mono (its own down-mix matrix, normalised so it adds no
//! gain: the mean for stereo, a weighted mean with the centre louder for surround) and
//! resamples it to the rate asked for, and writes raw 32-bit float samples to its
//! stdout. They are read as they come, 64 KiB at a time through a queue of four
//! chunks, so memory stays bounded whatever the length of the input, and handed on
//! like the native decoder's packets. The time spent waiting for ffmpeg (not the time
//! the caller spends on the samples) is limited: past the limit the child is killed.
//! When ffmpeg fails, its stderr's last line says why. What ffmpeg prints about the
//! stream (codec, rate, channels) becomes the row's `codec` (`ffmpeg:wmav2`), source
//! rate and channel count.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where ffmpeg comes from: `true` (the default) finds `ffmpeg` on `PATH`, `false`
/// turns the fallback off, a string is the executable's path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FfmpegSetting {
    #[default]
    Search,
    Off,
    Path(PathBuf),
}

impl Serialize for FfmpegSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Search => s.serialize_bool(true),
            Self::Off => s.serialize_bool(false),
            Self::Path(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

impl<'de> Deserialize<'de> for FfmpegSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FfmpegSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "`true` (find ffmpeg on PATH), `false` (no ffmpeg) or the path of the \
                     ffmpeg executable",
                )
            }
            fn visit_bool<E>(self, v: bool) -> Result<FfmpegSetting, E> {
                Ok(if v {
                    FfmpegSetting::Search
                } else {
                    FfmpegSetting::Off
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FfmpegSetting, E> {
                if v.trim().is_empty() {
                    return Err(E::custom(
                        "an empty path: write the ffmpeg executable's path, `true` or `false`",
                    ));
                }
                Ok(FfmpegSetting::Path(PathBuf::from(v)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl FfmpegSetting {
    /// A command-line value: `true` (find it on PATH), `false` (off) or a path.
    pub fn from_flag(value: &str) -> Result<Self, String> {
        match value.trim() {
            "true" => Ok(Self::Search),
            "false" => Ok(Self::Off),
            "" => Err("expected `true`, `false` or the path of the ffmpeg executable".into()),
            path => Ok(Self::Path(PathBuf::from(path))),
        }
    }
}

/// The fallback's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfmpegOptions {
    pub setting: FfmpegSetting,
    /// Longest ffmpeg may keep the caller waiting, over the whole input.
    pub timeout: Duration,
}

/// Default of [`FfmpegOptions::timeout`], in seconds: a 10-hour recording decodes in
/// well under a minute.
pub const DEFAULT_TIMEOUT_SECONDS: f64 = 600.0;

impl Default for FfmpegOptions {
    fn default() -> Self {
        Self {
            setting: FfmpegSetting::Search,
            timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_SECONDS),
        }
    }
}

impl FfmpegOptions {
    /// No fallback.
    pub fn off() -> Self {
        Self {
            setting: FfmpegSetting::Off,
            ..Self::default()
        }
    }
}

/// The ffmpeg executable `setting` names, or why there is none.
pub fn locate(setting: &FfmpegSetting) -> Result<PathBuf, String> {
    match setting {
        FfmpegSetting::Off => Err("switched off by `[decode] ffmpeg = false`".to_string()),
        FfmpegSetting::Path(path) => {
            if path.is_file() {
                Ok(path.clone())
            } else {
                Err(format!(
                    "`[decode] ffmpeg` = {} is not a file",
                    path.display()
                ))
            }
        }
        FfmpegSetting::Search => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("ffmpeg"))
                    .find(|candidate| is_executable(candidate))
            })
            .ok_or_else(|| "no ffmpeg on PATH".to_string()),
    }
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// The first line of `ffmpeg -version` (e.g. `ffmpeg version 5.1.6-0+deb12u1`).
pub fn version(path: &Path) -> Result<String, String> {
    let output = Command::new(path)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().unwrap_or_default();
    if output.status.success() && first.starts_with("ffmpeg version") {
        Ok(first
            .split(" Copyright")
            .next()
            .unwrap_or(first)
            .to_string())
    } else {
        Err(format!(
            "`-version` did not answer as ffmpeg does ({})",
            output.status
        ))
    }
}

/// What ffmpeg is given to read.
pub enum FfmpegInput<'a, R> {
    /// A local file (ffmpeg may seek in it).
    Path(&'a Path),
    /// Bytes written to its stdin from the start of this reader.
    Reader(&'a mut R),
}

/// What ffmpeg decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfmpegDecoded {
    /// `ffmpeg:` and ffmpeg's name of the codec, e.g. `ffmpeg:wmav2`.
    pub codec: String,
    /// The stream's own rate and channel count, as ffmpeg reports them.
    pub source_rate: Option<u32>,
    pub channels: Option<usize>,
    /// Mono samples delivered, at the rate asked for.
    pub frames: u64,
}

/// Why ffmpeg did not decode the input.
#[derive(Debug, thiserror::Error)]
pub enum FfmpegError {
    #[error("cannot start {}: {source}", path.display())]
    Spawn { path: PathBuf, source: io::Error },
    /// It exited with an error; `frames` were delivered before.
    #[error("{detail}")]
    Failed { detail: String, frames: u64 },
    #[error("ffmpeg took longer than {seconds} s and was stopped")]
    Timeout { seconds: f64, frames: u64 },
    #[error("non-finite sample {value} at frame {frame}")]
    NonFinite { frame: u64, value: f32 },
    #[error("reading ffmpeg's output: {0}")]
    Io(io::Error),
}

/// Samples read from stdout at a time, and chunks queued.
const CHUNK_BYTES: usize = 64 << 10;
const QUEUED_CHUNKS: usize = 4;
/// How long ffmpeg may take to exit once its output has ended.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Lines of stderr kept for the error message, and the longest kept of each.
const KEPT_LINES: usize = 16;
const MAX_LINE: usize = 1024;

/// Decodes `input` with the ffmpeg at `program` to mono `f32` at `rate` Hz, handing
/// the samples to `on_samples` as they come; [`ControlFlow::Break`] stops ffmpeg.
pub fn decode<R: Read + Send>(
    program: &Path,
    input: FfmpegInput<'_, R>,
    rate: u32,
    timeout: Duration,
    on_samples: &mut dyn FnMut(&[f32]) -> ControlFlow<()>,
) -> Result<FfmpegDecoded, FfmpegError> {
    let mut command = Command::new(program);
    command.args(["-hide_banner", "-nostats", "-loglevel", "info"]);
    // The input is untrusted: ffmpeg may open nothing but it (no network, no other
    // protocol a playlist-like input could name). A path is given as a `file:` URL so
    // that a colon in it is not read as a protocol.
    let (input_arg, from_stdin) = match &input {
        FfmpegInput::Path(path) => {
            let mut url = std::ffi::OsString::from("file:");
            url.push(path.as_os_str());
            (url, false)
        }
        FfmpegInput::Reader(_) => ("pipe:0".into(), true),
    };
    if !from_stdin {
        command.arg("-nostdin");
    }
    command
        .args([
            "-protocol_whitelist",
            if from_stdin { "pipe" } else { "file" },
        ])
        .arg("-i")
        .arg(input_arg)
        .args(["-map", "0:a:0", "-vn", "-sn", "-dn", "-af"])
        // Down-mixed by ffmpeg's matrix, normalised so that no gain is added (for
        // stereo: the mean of the channels, as the native path does).
        .arg(format!(
            "aresample=rematrix_maxval=1.0:ochl=mono:osr={rate}"
        ))
        .args(["-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"])
        .stdin(if from_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| FfmpegError::Spawn {
        path: program.to_path_buf(),
        source,
    })?;
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill(&mut child);
        return Err(FfmpegError::Io(io::Error::other("no pipes to ffmpeg")));
    };
    let stdin = child.stdin.take();

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(QUEUED_CHUNKS);
        scope.spawn(move || {
            loop {
                let mut chunk = vec![0u8; CHUNK_BYTES];
                match read_full(&mut stdout, &mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.send(Ok(chunk)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        let log = scope.spawn(move || read_log(stderr));
        if let (FfmpegInput::Reader(reader), Some(mut stdin)) = (input, stdin) {
            scope.spawn(move || {
                // A broken pipe means ffmpeg has read all it wants, or has failed.
                let _ = io::copy(reader, &mut stdin);
            });
        }

        let mut waited = Duration::ZERO;
        let mut frames = 0u64;
        let mut carry: Vec<u8> = Vec::with_capacity(4);
        let mut samples: Vec<f32> = Vec::with_capacity(CHUNK_BYTES / 4 + 1);
        let mut outcome: Result<(), FfmpegError> = Ok(());
        let mut stopped = false;
        loop {
            let left = timeout.saturating_sub(waited);
            let wait_started = Instant::now();
            let received = rx.recv_timeout(left);
            waited += wait_started.elapsed();
            let bytes = match received {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => {
                    outcome = Err(FfmpegError::Io(e));
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    outcome = Err(FfmpegError::Timeout {
                        seconds: timeout.as_secs_f64(),
                        frames,
                    });
                    break;
                }
            };
            samples.clear();
            decode_samples(&mut carry, &bytes, &mut samples);
            if let Some(index) = samples.iter().position(|s| !s.is_finite()) {
                outcome = Err(FfmpegError::NonFinite {
                    frame: frames + index as u64,
                    value: samples[index],
                });
                break;
            }
            frames += samples.len() as u64;
            if !samples.is_empty() && on_samples(&samples).is_break() {
                stopped = true;
                break;
            }
        }
        let failed_early = outcome.is_err() || stopped;
        drop(rx);
        if failed_early {
            kill(&mut child);
        }
        // After the end of its output ffmpeg only closes its files; wait for it
        // within what is left of the time limit (and a moment more).
        let status = wait_within(&mut child, timeout.saturating_sub(waited).max(EXIT_GRACE));
        let log = log.join().unwrap_or_default();
        outcome?;
        let codec = format!("ffmpeg:{}", log.codec.as_deref().unwrap_or("unknown"));
        match status {
            Some(status) if status.success() || stopped => Ok(FfmpegDecoded {
                codec,
                source_rate: log.rate,
                channels: log.channels,
                frames,
            }),
            Some(status) => Err(FfmpegError::Failed {
                detail: log
                    .last_error()
                    .unwrap_or_else(|| format!("ffmpeg {status}")),
                frames,
            }),
            None => Err(FfmpegError::Timeout {
                seconds: timeout.as_secs_f64(),
                frames,
            }),
        }
    })
}

/// Appends the samples of `carry` + `bytes` to `out`; leaves the bytes of a last,
/// unfinished sample in `carry` for the next chunk.
fn decode_samples(carry: &mut Vec<u8>, bytes: &[u8], out: &mut Vec<f32>) {
    let mut rest = bytes;
    if !carry.is_empty() {
        let need = (4 - carry.len()).min(rest.len());
        carry.extend_from_slice(&rest[..need]);
        rest = &rest[need..];
        if carry.len() < 4 {
            return;
        }
        out.push(f32::from_le_bytes([carry[0], carry[1], carry[2], carry[3]]));
        carry.clear();
    }
    let whole = rest.chunks_exact(4);
    carry.extend_from_slice(whole.remainder());
    out.extend(whole.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
}

/// Reads until `buf` is full or the stream ends.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The child's exit status, waiting at most `limit` (then it is killed: `None`).
fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                kill(child);
                return None;
            }
        }
    }
}

/// What ffmpeg's stderr said.
#[derive(Debug, Default)]
struct Log {
    codec: Option<String>,
    rate: Option<u32>,
    channels: Option<usize>,
    /// The last lines (each cut at [`MAX_LINE`] bytes).
    tail: VecDeque<String>,
}

impl Log {
    /// The line that says why ffmpeg failed: the last one that is not progress,
    /// a summary or advice.
    fn last_error(&self) -> Option<String> {
        let noise = |l: &str| {
            l.starts_with("size=")
                || l.starts_with("video:")
                || l.starts_with("To ignore this")
                || l.starts_with("Conversion failed")
                || l.starts_with("Error opening output")
                || l.starts_with("Exiting normally")
        };
        self.tail
            .iter()
            .rev()
            .map(|l| l.trim())
            .find(|l| !l.is_empty() && !noise(l))
            .map(str::to_string)
    }
}

/// Reads stderr to its end, line by line (bounded), noting the mapped audio stream.
fn read_log(stderr: impl Read) -> Log {
    let mut log = Log::default();
    let mut reader = BufReader::new(stderr);
    let mut inputs: Vec<String> = Vec::new();
    let mut mapped: Option<String> = None;
    let mut in_mapping = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_capped(&mut reader, &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.starts_with("Stream mapping:") {
            in_mapping = true;
        } else if in_mapping && mapped.is_none() && text.trim_start().starts_with("Stream #") {
            mapped = Some(text.trim().to_string());
            in_mapping = false;
        } else if text.trim_start().starts_with("Stream #")
            && text.contains(": Audio: ")
            && inputs.len() < 64
        {
            inputs.push(text.trim().to_string());
        }
        if log.tail.len() == KEPT_LINES {
            log.tail.pop_front();
        }
        log.tail.push_back(text);
    }
    // `Stream #0:1 -> #0:0 (wmav2 (native) -> pcm_f32le (native))`
    let stream = mapped.as_deref().and_then(|m| {
        let id = m.strip_prefix("Stream #")?.split_whitespace().next()?;
        let codec = m.split_once('(')?.1.split_whitespace().next()?;
        Some((id.to_string(), codec.to_string()))
    });
    if let Some((id, codec)) = stream {
        log.codec = Some(codec);
        // `Stream #0:1(eng): Audio: wmav2 (...), 44100 Hz, stereo, fltp, 64 kb/s`
        let prefix = format!("Stream #{id}");
        if let Some(line) = inputs.iter().find(|l| {
            l.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with([':', '(', '[']))
        }) && let Some((_, spec)) = line.split_once(": Audio: ")
        {
            let fields: Vec<&str> = spec.split(", ").collect();
            if let Some(i) = fields.iter().position(|f| f.ends_with(" Hz")) {
                log.rate = fields[i].trim_end_matches(" Hz").trim().parse().ok();
                log.channels = fields.get(i + 1).and_then(|l| channels_of_layout(l));
            }
        }
    }
    log
}

/// One line into `out` (without keeping more than [`MAX_LINE`] bytes of it).
fn read_line_capped(reader: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        // ffmpeg ends progress lines with '\r'.
        let end = buf.iter().position(|&b| b == b'\n' || b == b'\r');
        let take = end.map_or(buf.len(), |e| e + 1);
        let room = MAX_LINE.saturating_sub(out.len());
        out.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take);
        total += take;
        if end.is_some() {
            return Ok(total);
        }
    }
}

/// Channels of an ffmpeg channel layout name (`mono`, `stereo`, `5.1(side)`,
/// `6 channels`).
fn channels_of_layout(layout: &str) -> Option<usize> {
    let layout = layout.trim();
    if let Some(n) = layout.strip_suffix(" channels") {
        return n.trim().parse().ok();
    }
    let base = layout.split('(').next().unwrap_or(layout);
    Some(match base {
        "mono" => 1,
        "stereo" | "downmix" => 2,
        "2.1" | "3.0" => 3,
        "3.1" | "4.0" | "quad" => 4,
        "4.1" | "5.0" => 5,
        "5.1" | "6.0" | "hexagonal" => 6,
        "6.1" | "7.0" => 7,
        "7.1" | "octagonal" => 8,
        "hexadecagonal" => 16,
        _ => return None,
    })
}
