//! Audio decoding: any supported container and codec to mono `f32` samples.
//!
//! Decoding streams packet by packet through symphonia: each packet is decoded,
//! down-mixed to mono (the mean of the channels) and handed to a callback, so memory
//! does not grow with the length of the input; only [`decode_file`] and
//! [`decode_bytes`], which collect the samples, hold the whole output. Samples keep the
//! file's sample rate (resampling is a separate step) and symphonia's scaling to
//! `[-1, 1)` (a 16-bit sample `s` becomes `s / 32768`).
//!
//! Supported natively: WAV and AIFF (8/16/24/32-bit integer PCM, 32/64-bit float PCM,
//! A-law, µ-law, MS and IMA ADPCM), CAF, FLAC, MPEG layer 1/2/3, AAC (ADTS or MP4),
//! ALAC, Vorbis and Opus (in Ogg, MP4/M4A and Matroska/WebM; Opus through
//! [`super::opus`]). Anything else (AC-3, WMA, WavPack, ...) is refused by
//! [`decode_stream`] with an error that names the container or codec;
//! [`decode_stream_or_ffmpeg`] hands it to the ffmpeg fallback ([`super::ffmpeg`])
//! instead, or says that ffmpeg would read it.
//!
//! Many channels: every channel counts equally in the mono mean (an LFE channel
//! included), and [`AudioInfo::channels`] reports how many there were. WAV carries up to
//! 26 channels (18 in `WAVE_FORMAT_EXTENSIBLE` with a speaker mask), FLAC up to 8; a
//! header that declares more is [`DecodeError::TooManyChannels`].
//!
//! Symphonia is asked to skip a packet that fails to decode (its recommended
//! handling); skipped packets are counted in [`AudioInfo::skipped_packets`], and a
//! stream in which no packet decodes at all is an error. Symphonia panics on a few
//! malformed inputs (for example arithmetic overflow in header parsing); such a panic is
//! caught and reported as [`DecodeError::DecoderPanic`], so no input can bring the
//! caller down.

use std::any::Any;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use symphonia::core::audio::{Audio, GenericAudioBufferRef};
use symphonia::core::codecs::CodecParameters;
use symphonia::core::codecs::audio::well_known::*;
use symphonia::core::codecs::audio::{
    AudioCodecId, AudioCodecParameters, AudioDecoder, AudioDecoderOptions, CODEC_ID_NULL_AUDIO,
};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

use super::ffmpeg::{FfmpegError, FfmpegInput, FfmpegOptions};
use super::opus::{OPUS_RATE, OpusHead, OpusHeadError, OpusStream};

/// Highest sample rate accepted, in Hz; anything above is taken for a corrupt header.
pub const MAX_SAMPLE_RATE: u32 = 768_000;

/// Containers that can be decoded natively, for error messages.
const SUPPORTED_CONTAINERS: &str =
    "WAV, AIFF, CAF, FLAC, MPEG audio, AAC (ADTS), Ogg, MP4/M4A, Matroska/WebM";

/// How much of the start of an input is re-read to explain why it could not be opened.
const HEAD_LEN: u64 = 4096;

/// What was decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioInfo {
    /// Sample rate of the decoded audio in Hz (the file's own rate, not resampled).
    pub sample_rate: u32,
    /// Number of channels in the file before the down-mix to mono.
    pub channels: usize,
    /// Symphonia's short name of the codec, e.g. `"pcm_s16le"` or `"flac"`.
    pub codec: String,
    /// Number of mono samples delivered (audio frames decoded).
    pub frames: u64,
    /// Corrupt packets skipped mid-stream: rejected by the decoder, or dropped by the
    /// demuxer (seen as a jump in the packet timestamps; a corrupt run at the very end of
    /// the stream is not seen). Non-zero means the samples have gaps.
    pub skipped_packets: u64,
    /// Frames the container's header declares, when it declares them.
    pub declared_frames: Option<u64>,
    /// The data ended before the stream did: inside a packet, or short of the frames
    /// the header declares (by more than a codec's padding). What is there is kept.
    pub truncated: bool,
}

impl AudioInfo {
    /// Duration of the decoded audio in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.frames as f64 / f64::from(self.sample_rate)
    }

    /// What a reader of the captions should know about the audio behind them
    /// (truncated, corrupt packets skipped), `; `-joined; `None` when nothing.
    pub fn warnings(&self) -> Option<String> {
        let mut warnings = Vec::new();
        if self.truncated {
            let rate = f64::from(self.sample_rate.max(1));
            warnings.push(match self.declared_frames {
                Some(declared) if declared > self.frames => format!(
                    "truncated: the data ends after {:.2} s of the {:.2} s the header declares",
                    self.frames as f64 / rate,
                    declared as f64 / rate
                ),
                _ => format!(
                    "truncated: the data ends inside a packet, after {:.2} s",
                    self.frames as f64 / rate
                ),
            });
        }
        if self.skipped_packets > 0 {
            warnings.push(format!(
                "{} corrupt packet(s) skipped: the audio has gaps",
                self.skipped_packets
            ));
        }
        (!warnings.is_empty()).then(|| warnings.join("; "))
    }
}

/// Frames a lossy stream may fall short of its header by without being truncated
/// (encoder delay and padding trimmed by the decoder).
fn padding_slack(codec: &str) -> u64 {
    if codec.starts_with("pcm") || codec == "flac" || codec == "alac" {
        0
    } else {
        4096
    }
}

/// A whole input decoded to mono.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Mono samples (the mean of the channels), nominally in `[-1, 1]`.
    pub samples: Vec<f32>,
    /// What was decoded.
    pub info: AudioInfo,
}

/// Why an input could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Reading or seeking the input failed.
    #[error("read error: {0}")]
    Io(#[source] io::Error),
    /// The input has no bytes at all.
    #[error("the input is empty (0 bytes)")]
    Empty,
    /// No supported container was recognised: not audio, or a container we do not read.
    #[error("not a recognised audio file (supported containers: {SUPPORTED_CONTAINERS})")]
    UnknownFormat,
    /// The container was recognised but holds audio in a codec we cannot decode.
    #[error("unsupported codec: {codec}")]
    UnsupportedCodec {
        /// The codec's short name (e.g. `"mp3"`, `"adpcm_ms"`), or what is known of it.
        codec: String,
    },
    /// The container uses a feature we cannot decode (other than an unknown codec).
    #[error("unsupported stream: {detail}")]
    Unsupported {
        /// What the demuxer or decoder said.
        detail: String,
    },
    /// The container has no audio track.
    #[error("the container has no audio track")]
    NoAudioTrack,
    /// The input ends before its header does.
    #[error("the input is truncated: it ends inside the container header")]
    Truncated,
    /// The container header is invalid.
    #[error("malformed container header: {detail}")]
    Malformed {
        /// What the demuxer said.
        detail: String,
    },
    /// The audio data is corrupt: the demuxer lost the stream, or no packet decoded.
    #[error("corrupt audio data after {frames} frames: {detail}")]
    Corrupt {
        /// Frames decoded before the failure.
        frames: u64,
        /// What the demuxer or decoder said.
        detail: String,
    },
    /// The audio track declares zero channels.
    #[error("the audio track has zero channels")]
    ZeroChannels,
    /// The header declares more channels than the container's reader can lay out.
    #[error("the header declares {channels} channels, more than the {container} reader supports")]
    TooManyChannels {
        /// The declared count.
        channels: u32,
        /// The container, e.g. `"WAV"`.
        container: &'static str,
    },
    /// The sample rate is missing (reported as 0) or absurd.
    #[error("invalid sample rate {rate} Hz (expected 1..={MAX_SAMPLE_RATE})")]
    InvalidSampleRate {
        /// The declared rate; 0 when none is declared.
        rate: u32,
    },
    /// The sample rate changes part-way through the stream.
    #[error("the sample rate changes mid-stream from {from} Hz to {to} Hz")]
    SampleRateChanged {
        /// The rate so far.
        from: u32,
        /// The new rate.
        to: u32,
    },
    /// A decoded sample is NaN or infinite (only possible with floating-point PCM).
    #[error("non-finite sample {value} at frame {frame}")]
    NonFiniteSample {
        /// Index of the mono sample.
        frame: u64,
        /// The offending value after the down-mix.
        value: f32,
    },
    /// Symphonia panicked on this input (a bug in symphonia, caught here).
    #[error("the decoder crashed on this input: {message}")]
    DecoderPanic {
        /// The panic message.
        message: String,
    },
    /// No native decoder reads it and the ffmpeg fallback is not available.
    #[error(
        "{what}: no native decoder reads it; install ffmpeg (or set `[decode] ffmpeg` to its \
         path) to read it ({reason})"
    )]
    NeedsFfmpeg {
        /// The format or codec, as far as it is known (`codec ac3`, `WavPack (.wv)`).
        what: String,
        /// Why there is no ffmpeg (switched off, not on PATH, not a file).
        reason: String,
    },
    /// No native decoder reads it, and ffmpeg could not either.
    #[error("{native}; ffmpeg could not read it either: {detail}")]
    FfmpegFailed {
        /// Why the native decoders refused it.
        native: Box<DecodeError>,
        /// The last line of ffmpeg's stderr.
        detail: String,
    },
    /// ffmpeg took longer than its time limit and was stopped.
    #[error(
        "ffmpeg took longer than {seconds} s ([decode] ffmpeg_timeout_seconds) after {frames} frames and was stopped"
    )]
    FfmpegTimeout {
        /// The limit.
        seconds: f64,
        /// Frames delivered before.
        frames: u64,
    },
}

impl DecodeError {
    /// The short kind of the failure (a row's `error_kind`, the summary's counts).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Open { .. } => "unreadable",
            DecodeError::Io(_) => "read_error",
            DecodeError::Empty => "empty",
            DecodeError::UnknownFormat => "not_audio",
            DecodeError::UnsupportedCodec { .. } | DecodeError::NeedsFfmpeg { .. } => {
                "unsupported_codec"
            }
            DecodeError::Unsupported { .. } => "unsupported_stream",
            DecodeError::NoAudioTrack => "no_audio_track",
            DecodeError::Truncated => "truncated",
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::Corrupt { .. } => "corrupt",
            DecodeError::ZeroChannels => "zero_channels",
            DecodeError::TooManyChannels { .. } => "too_many_channels",
            DecodeError::InvalidSampleRate { .. } => "invalid_sample_rate",
            DecodeError::SampleRateChanged { .. } => "sample_rate_changed",
            DecodeError::NonFiniteSample { .. } => "non_finite_samples",
            DecodeError::DecoderPanic { .. } => "decoder_crash",
            // What the native decoders said is what the input is.
            DecodeError::FfmpegFailed { native, .. } => native.kind(),
            DecodeError::FfmpegTimeout { .. } => "ffmpeg_timeout",
        }
    }

    /// Whether ffmpeg may read what the native decoders refused with this error
    /// (a format, codec or layout they do not handle, before any sample).
    fn ffmpeg_may_read(&self) -> bool {
        matches!(
            self,
            DecodeError::UnknownFormat
                | DecodeError::UnsupportedCodec { .. }
                | DecodeError::Unsupported { .. }
                | DecodeError::NoAudioTrack
                | DecodeError::Malformed { .. }
                | DecodeError::TooManyChannels { .. }
                | DecodeError::DecoderPanic { .. }
        )
    }
}

/// The fallback for inputs no native decoder reads: ffmpeg, delivering mono samples
/// at `rate` (the model's).
#[derive(Debug, Clone, Copy)]
pub struct Fallback<'a> {
    pub ffmpeg: &'a FfmpegOptions,
    pub rate: u32,
    /// The input as a local file, when it is one (ffmpeg then reads it in place and
    /// may seek; otherwise it reads the bytes from its stdin).
    pub path: Option<&'a Path>,
}

/// [`decode_stream_with_rate`], then, for an input the native decoders refuse before
/// any sample (see [`DecodeError::ffmpeg_may_read`]), `fallback`'s ffmpeg. Samples
/// from ffmpeg arrive at `fallback.rate`; the result's `sample_rate` and `channels`
/// are the stream's own, as ffmpeg reports them, and `frames` is counted at that rate.
/// Without ffmpeg, a format known to need it is [`DecodeError::NeedsFfmpeg`].
pub fn decode_stream_or_ffmpeg<R, F>(
    mut source: R,
    hint_extension: Option<&str>,
    fallback: &Fallback<'_>,
    mut on_samples: F,
) -> Result<AudioInfo, DecodeError>
where
    R: Read + Seek + Send + Sync,
    F: FnMut(u32, &[f32]) -> ControlFlow<()>,
{
    let mut delivered = false;
    let native = decode_stream_with_rate(&mut source, hint_extension, |rate, chunk| {
        delivered = true;
        on_samples(rate, chunk)
    });
    let native = match native {
        Err(error) if !delivered && error.ffmpeg_may_read() => error,
        other => return other,
    };
    let program = match super::ffmpeg::locate(&fallback.ffmpeg.setting) {
        Ok(program) => program,
        Err(reason) => return Err(needs_ffmpeg(native, hint_extension, &mut source, reason)),
    };
    source.rewind().map_err(DecodeError::Io)?;
    let input = match fallback.path {
        Some(path) => FfmpegInput::Path(path),
        None => FfmpegInput::Reader(&mut source),
    };
    let rate = fallback.rate;
    let decoded = super::ffmpeg::decode(
        &program,
        input,
        rate,
        fallback.ffmpeg.timeout,
        &mut |chunk| on_samples(rate, chunk),
    );
    match decoded {
        Ok(decoded) => {
            let source_rate = decoded
                .source_rate
                .filter(|r| (1..=MAX_SAMPLE_RATE).contains(r));
            let sample_rate = source_rate.unwrap_or(rate);
            let frames = (decoded.frames as f64 * f64::from(sample_rate) / f64::from(rate)).round();
            Ok(AudioInfo {
                sample_rate,
                channels: decoded.channels.unwrap_or(1),
                codec: decoded.codec,
                frames: frames as u64,
                skipped_packets: 0,
                declared_frames: None,
                truncated: false,
            })
        }
        Err(FfmpegError::Failed { detail, frames: 0 }) => Err(DecodeError::FfmpegFailed {
            native: Box::new(native),
            detail,
        }),
        Err(FfmpegError::Failed { detail, frames }) => Err(DecodeError::Corrupt {
            frames,
            detail: format!("ffmpeg: {detail}"),
        }),
        Err(error @ FfmpegError::Spawn { .. }) => Err(DecodeError::FfmpegFailed {
            native: Box::new(native),
            detail: error.to_string(),
        }),
        Err(FfmpegError::Timeout { seconds, frames }) => {
            Err(DecodeError::FfmpegTimeout { seconds, frames })
        }
        Err(FfmpegError::NonFinite { frame, value }) => {
            Err(DecodeError::NonFiniteSample { frame, value })
        }
        Err(FfmpegError::Io(error)) => Err(DecodeError::Io(error)),
    }
}

/// The error for an input the native decoders refused when there is no ffmpeg: what
/// the format or codec is, when the codec, the extension or the first bytes say.
fn needs_ffmpeg<R: Read + Seek>(
    native: DecodeError,
    hint_extension: Option<&str>,
    source: &mut R,
    reason: String,
) -> DecodeError {
    let mut head = Vec::new();
    let _ = source
        .rewind()
        .and_then(|()| source.by_ref().take(HEAD_LEN).read_to_end(&mut head));
    let by_extension = hint_extension.and_then(|ext| {
        super::formats::format_of_extension(ext)
            .filter(|f| f.reader == super::formats::Reader::Ffmpeg)
            .map(|f| format!("{} (.{})", f.name, ext.to_ascii_lowercase()))
    });
    let what = match &native {
        DecodeError::UnsupportedCodec { codec } if !codec.starts_with("unknown") => {
            Some(format!("codec {codec}"))
        }
        _ => by_extension.or_else(|| super::formats::sniff_ffmpeg_only(&head).map(str::to_string)),
    };
    match what {
        Some(what) => DecodeError::NeedsFfmpeg { what, reason },
        None => native,
    }
}

/// Decodes a whole file to mono. The file's extension, if any, is a hint for the probe.
pub fn decode_file(path: &Path) -> Result<DecodedAudio, DecodeError> {
    let open_error = |source| DecodeError::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(open_error)?;
    let metadata = file.metadata().map_err(open_error)?;
    if metadata.is_dir() {
        return Err(open_error(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    let hint = path.extension().and_then(|ext| ext.to_str());
    collect(file, hint)
}

/// Decodes an in-memory object (e.g. one fetched from object storage) to mono.
pub fn decode_bytes(
    bytes: &[u8],
    hint_extension: Option<&str>,
) -> Result<DecodedAudio, DecodeError> {
    collect(Cursor::new(bytes), hint_extension)
}

fn collect<R>(source: R, hint_extension: Option<&str>) -> Result<DecodedAudio, DecodeError>
where
    R: Read + Seek + Send + Sync,
{
    let mut samples = Vec::new();
    let info = decode_stream(source, hint_extension, |chunk| {
        samples.extend_from_slice(chunk);
        ControlFlow::Continue(())
    })?;
    Ok(DecodedAudio { samples, info })
}

/// Decodes `source` packet by packet, handing each packet's mono samples to
/// `on_samples` as soon as it is decoded.
///
/// The whole source is decoded, from byte 0. `hint_extension` (e.g. `"wav"`, no dot)
/// speeds up the probe but is never trusted. `on_samples` receives consecutive chunks
/// of mono samples (the mean of the channels); it returns
/// [`ControlFlow::Break`] to stop early, in which case the result describes what was
/// delivered up to then. Memory use is bounded by one packet, whatever the input's
/// length.
///
/// A panic in `on_samples` is propagated to the caller unchanged.
pub fn decode_stream<R, F>(
    source: R,
    hint_extension: Option<&str>,
    mut on_samples: F,
) -> Result<AudioInfo, DecodeError>
where
    R: Read + Seek + Send + Sync,
    F: FnMut(&[f32]) -> ControlFlow<()>,
{
    decode_stream_with_rate(source, hint_extension, |_, chunk| on_samples(chunk))
}

/// [`decode_stream`] whose callback also receives the stream's sample rate (known
/// from the first decoded packet on, constant for the stream), so a resampler can be
/// set up before the first samples arrive.
pub fn decode_stream_with_rate<R, F>(
    mut source: R,
    hint_extension: Option<&str>,
    mut on_samples: F,
) -> Result<AudioInfo, DecodeError>
where
    R: Read + Seek + Send + Sync,
    F: FnMut(u32, &[f32]) -> ControlFlow<()>,
{
    // Symphonia's own panics become errors; the callback's are re-raised untouched.
    let mut callback_panic: Option<Box<dyn Any + Send>> = None;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        decode_source(
            &mut source,
            hint_extension,
            &mut |rate: u32, chunk: &[f32]| match panic::catch_unwind(AssertUnwindSafe(|| {
                on_samples(rate, chunk)
            })) {
                Ok(flow) => flow,
                Err(payload) => {
                    callback_panic = Some(payload);
                    ControlFlow::Break(())
                }
            },
        )
    }));
    if let Some(payload) = callback_panic {
        panic::resume_unwind(payload);
    }
    result.unwrap_or_else(|payload| {
        Err(DecodeError::DecoderPanic {
            message: panic_message(payload.as_ref()),
        })
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "unknown panic".to_owned()
    }
}

fn decode_source<R>(
    source: &mut R,
    hint_extension: Option<&str>,
    on_samples: &mut dyn FnMut(u32, &[f32]) -> ControlFlow<()>,
) -> Result<AudioInfo, DecodeError>
where
    R: Read + Seek + Send + Sync,
{
    let len = source.seek(SeekFrom::End(0)).map_err(DecodeError::Io)?;
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    source.rewind().map_err(DecodeError::Io)?;
    refuse_before_probe(source)?;

    let mut hint = Hint::new();
    if let Some(extension) = hint_extension {
        hint.with_extension(extension);
    }
    // Matched in place so that the borrow of `source` ends with this statement.
    let error = match open_format(&mut *source, len, &hint, true) {
        Ok(format) => return decode_packets(format, on_samples),
        Err(error) => error,
    };
    // Opening a seekable Ogg stream scans its last pages for the duration, which fails
    // on a file cut short; read as a plain stream it decodes up to the cut.
    let error = if matches!(&error, SymphoniaError::IoError(e) if e.kind() == io::ErrorKind::UnexpectedEof)
        && starts_with(source, b"OggS")
    {
        match open_format(&mut *source, len, &hint, false) {
            Ok(format) => return decode_packets(format, on_samples),
            Err(error) => error,
        }
    } else {
        error
    };
    Err(explain_open_failure(error, source))
}

/// Probes `source` (of `len` bytes) for a container and opens it.
fn open_format<'s, R>(
    source: &'s mut R,
    len: u64,
    hint: &Hint,
    seekable: bool,
) -> symphonia::core::errors::Result<Box<dyn FormatReader + 's>>
where
    R: Read + Seek + Send + Sync,
{
    let stream = MediaSourceStream::new(
        Box::new(SeekableSource {
            inner: source,
            len,
            seekable,
        }),
        MediaSourceStreamOptions::default(),
    );
    symphonia::default::get_probe().probe(
        hint,
        stream,
        FormatOptions::default(),
        MetadataOptions::default(),
    )
}

/// Whether `source` starts with `magic`; leaves it at byte 0.
fn starts_with<R: Read + Seek>(source: &mut R, magic: &[u8]) -> bool {
    let mut head = vec![0; magic.len()];
    let matched = source
        .rewind()
        .and_then(|()| source.read_exact(&mut head))
        .is_ok()
        && head == magic;
    source.rewind().is_ok() && matched
}

/// Refuses, from the first bytes, a WAV header that symphonia cannot lay out: more than
/// 26 channels, which its WAV reader can overflow on (a panic) before it says so.
/// Leaves `source` at byte 0.
fn refuse_before_probe<R: Read + Seek>(source: &mut R) -> Result<(), DecodeError> {
    let mut head = Vec::new();
    source
        .by_ref()
        .take(HEAD_LEN)
        .read_to_end(&mut head)
        .map_err(DecodeError::Io)?;
    source.rewind().map_err(DecodeError::Io)?;
    match wav_format(&head) {
        Some(fmt) if fmt.channels > MAX_WAV_CHANNELS => Err(DecodeError::TooManyChannels {
            channels: u32::from(fmt.channels),
            container: "WAV",
        }),
        _ => Ok(()),
    }
}

/// Most channels symphonia's WAV reader lays out (its table of speaker positions).
const MAX_WAV_CHANNELS: u16 = 26;

/// Any `Read + Seek` as a symphonia source of known length.
struct SeekableSource<R> {
    inner: R,
    len: u64,
    /// Whether demuxers may seek (they always may read from the start).
    seekable: bool,
}

impl<R: Read> Read for SeekableSource<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: Seek> Seek for SeekableSource<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<R: Read + Seek + Send + Sync> MediaSource for SeekableSource<R> {
    fn is_seekable(&self) -> bool {
        self.seekable
    }

    fn byte_len(&self) -> Option<u64> {
        Some(self.len)
    }
}

fn check_sample_rate(rate: u32) -> Result<u32, DecodeError> {
    if (1..=MAX_SAMPLE_RATE).contains(&rate) {
        Ok(rate)
    } else {
        Err(DecodeError::InvalidSampleRate { rate })
    }
}

/// The audio track to decode.
struct SelectedTrack {
    id: u32,
    params: AudioCodecParameters,
    /// Frames the container says the track has, if it says.
    declared_frames: Option<u64>,
}

/// Picks the default audio track and checks what its header declares.
fn select_track(format: &dyn FormatReader) -> Result<SelectedTrack, DecodeError> {
    let unidentified = || DecodeError::UnsupportedCodec {
        codec: "unknown (the container does not identify it)".to_owned(),
    };
    let Some(track) = format.default_track(TrackType::Audio) else {
        return Err(match format.first_track(TrackType::Audio) {
            Some(_) => unidentified(),
            None => DecodeError::NoAudioTrack,
        });
    };
    let Some(CodecParameters::Audio(params)) = &track.codec_params else {
        return Err(DecodeError::NoAudioTrack);
    };
    if params.codec == CODEC_ID_NULL_AUDIO {
        return Err(unidentified());
    }
    if params
        .channels
        .as_ref()
        .is_some_and(|channels| channels.count() == 0)
    {
        return Err(DecodeError::ZeroChannels);
    }
    if let Some(rate) = params.sample_rate {
        check_sample_rate(rate)?;
    }
    Ok(SelectedTrack {
        id: track.id,
        params: params.clone(),
        declared_frames: track.num_frames,
    })
}

/// Decodes the default audio track, packet by packet.
fn decode_packets(
    mut format: Box<dyn FormatReader + '_>,
    on_samples: &mut dyn FnMut(u32, &[f32]) -> ControlFlow<()>,
) -> Result<AudioInfo, DecodeError> {
    let track = select_track(format.as_ref())?;
    let mut decoder = make_decoder(&track.params, format.format_info().short_name)?;
    let mut info = AudioInfo {
        sample_rate: track.params.sample_rate.unwrap_or(0),
        channels: track
            .params
            .channels
            .as_ref()
            .map_or(0, |channels| channels.count()),
        codec: decoder.name().to_owned(),
        frames: 0,
        skipped_packets: 0,
        declared_frames: track.declared_frames.filter(|&n| n > 0),
        truncated: false,
    };
    let mut stopped = false;
    let mut first_skip_reason: Option<String> = None;
    let mut rate_seen = false;
    // Where the next packet should start, in the track's time base.
    let mut next_pts: Option<i128> = None;
    let mut planes: Vec<Vec<f32>> = Vec::new();
    let mut mono: Vec<f32> = Vec::new();

    loop {
        let packet = match format.next_packet() {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            // The input ends part-way through a packet: the end of the stream.
            Err(SymphoniaError::IoError(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                info.truncated = true;
                break;
            }
            Err(error) => return Err(stream_error(error, info.frames)),
        };
        if packet.track_id != track.id {
            continue;
        }
        // Demuxers that resynchronise past corrupt data (FLAC) drop it silently; the jump in
        // the timestamps shows it. One tick of slack for containers that round timestamps.
        let pts = i128::from(packet.pts.get());
        if let Some(expected) = next_pts
            && pts > expected + 1
        {
            info.skipped_packets += 1;
            first_skip_reason.get_or_insert_with(|| {
                format!("the demuxer skipped corrupt data between timestamps {expected} and {pts}")
            });
        }
        // A packet without a duration (Vorbis's priming packet, at a negative timestamp)
        // says nothing about where the next one starts.
        let dur = packet.dur.get();
        next_pts = (dur > 0).then(|| pts + i128::from(dur));

        let (rate, channels) = match &mut decoder {
            TrackDecoder::Symphonia(decoder) => {
                let buffer = match decoder.decode(&packet) {
                    Ok(buffer) => buffer,
                    // The packet is bad, the stream is not: skip it, as symphonia recommends.
                    Err(SymphoniaError::DecodeError(reason)) => {
                        info.skipped_packets += 1;
                        first_skip_reason.get_or_insert_with(|| reason.to_owned());
                        continue;
                    }
                    Err(SymphoniaError::IoError(error)) => {
                        info.skipped_packets += 1;
                        first_skip_reason.get_or_insert_with(|| error.to_string());
                        continue;
                    }
                    Err(error) => return Err(stream_error(error, info.frames)),
                };
                let frames = buffer.frames();
                if frames == 0 {
                    continue;
                }
                match &buffer {
                    // Float output (MP3, Vorbis, AAC): read the planes in place, no copy.
                    GenericAudioBufferRef::F32(buf) => {
                        let in_place: Vec<&[f32]> =
                            (0..buf.num_planes()).filter_map(|c| buf.plane(c)).collect();
                        downmix(&in_place, frames, &mut mono)?;
                    }
                    _ => {
                        buffer.copy_to_vecs_planar::<f32>(&mut planes);
                        downmix(&planes, frames, &mut mono)?;
                    }
                }
                (buffer.spec().rate(), buffer.spec().channels().count())
            }
            TrackDecoder::Opus(stream) => {
                let trim_end = usize::try_from(packet.trim_end.get()).unwrap_or(usize::MAX);
                let (channels, decoded) = (stream.channels(), stream.decoded_channels());
                match stream.decode(&packet.data, trim_end) {
                    Ok(interleaved) => downmix_interleaved(interleaved, decoded, &mut mono),
                    Err(error) => {
                        info.skipped_packets += 1;
                        first_skip_reason.get_or_insert_with(|| format!("opus: {error}"));
                        continue;
                    }
                }
                if mono.is_empty() {
                    continue;
                }
                (OPUS_RATE, channels)
            }
        };
        let frames = mono.len();

        let rate = check_sample_rate(rate)?;
        if !rate_seen {
            info.sample_rate = rate;
            info.channels = channels;
            rate_seen = true;
        } else if rate != info.sample_rate {
            return Err(DecodeError::SampleRateChanged {
                from: info.sample_rate,
                to: rate,
            });
        }
        if let Some(index) = mono.iter().position(|sample| !sample.is_finite()) {
            return Err(DecodeError::NonFiniteSample {
                frame: info.frames + index as u64,
                value: mono[index],
            });
        }
        info.frames += frames as u64;
        if on_samples(info.sample_rate, &mono).is_break() {
            stopped = true;
            break;
        }
    }
    if !stopped
        && let Some(declared) = info.declared_frames
        && info.frames + padding_slack(&info.codec) < declared
    {
        info.truncated = true;
    }

    if info.frames == 0 {
        if let Some(reason) = first_skip_reason {
            return Err(DecodeError::Corrupt {
                frames: 0,
                detail: format!(
                    "no audio packet could be decoded, {} were corrupt (first: {reason})",
                    info.skipped_packets
                ),
            });
        }
        if let Some(declared) = track.declared_frames.filter(|&declared| declared > 0) {
            return Err(DecodeError::Corrupt {
                frames: 0,
                detail: format!("the header declares {declared} frames but none could be read"),
            });
        }
    }
    check_sample_rate(info.sample_rate)?;
    Ok(info)
}

/// Mean of the channels into `mono`.
fn downmix<P: AsRef<[f32]>>(
    planes: &[P],
    frames: usize,
    mono: &mut Vec<f32>,
) -> Result<(), DecodeError> {
    mono.clear();
    match planes {
        [] => return Err(DecodeError::ZeroChannels),
        [only] => {
            let only = only.as_ref();
            mono.extend_from_slice(&only[..frames.min(only.len())]);
        }
        [first, rest @ ..] => {
            let first = first.as_ref();
            mono.extend_from_slice(&first[..frames.min(first.len())]);
            for plane in rest {
                for (sum, sample) in mono.iter_mut().zip(plane.as_ref()) {
                    *sum += sample;
                }
            }
            let count = planes.len() as f32;
            for sum in mono.iter_mut() {
                *sum /= count;
            }
        }
    }
    Ok(())
}

/// The decoder of the selected track: symphonia's, or the Opus decoder.
enum TrackDecoder {
    Symphonia(Box<dyn AudioDecoder>),
    Opus(OpusStream),
}

impl TrackDecoder {
    fn name(&self) -> &str {
        match self {
            Self::Symphonia(decoder) => decoder.codec_info().short_name,
            Self::Opus(_) => "opus",
        }
    }
}

/// Mean of the channels of interleaved frames into `mono`.
fn downmix_interleaved(interleaved: &[f32], channels: usize, mono: &mut Vec<f32>) {
    mono.clear();
    match channels {
        0 => {}
        1 => mono.extend_from_slice(interleaved),
        2 => mono.extend(
            interleaved
                .chunks_exact(2)
                .map(|pair| (pair[0] + pair[1]) * 0.5),
        ),
        n => {
            let scale = 1.0 / n as f32;
            mono.extend(
                interleaved
                    .chunks_exact(n)
                    .map(|frame| frame.iter().sum::<f32>() * scale),
            );
        }
    }
}

/// The decoder for the track of a container (symphonia's short name of its reader).
fn make_decoder(
    params: &AudioCodecParameters,
    container: &str,
) -> Result<TrackDecoder, DecodeError> {
    if params.codec == CODEC_ID_OPUS {
        // MP4's `dOps` box is the identification header in big-endian order.
        let parse = if container == "isomp4" {
            OpusHead::parse_mp4
        } else {
            OpusHead::parse
        };
        let head = params
            .extra_data
            .as_deref()
            .ok_or(OpusHeadError::Missing)
            .and_then(parse)
            .and_then(|head| OpusStream::new(&head));
        return head
            .map(TrackDecoder::Opus)
            .map_err(|error| DecodeError::Malformed {
                detail: error.to_string(),
            });
    }
    make_symphonia_decoder(params).map(TrackDecoder::Symphonia)
}

fn make_symphonia_decoder(
    params: &AudioCodecParameters,
) -> Result<Box<dyn AudioDecoder>, DecodeError> {
    let codecs = symphonia::default::get_codecs();
    if codecs.get_audio_decoder(params.codec).is_none() {
        return Err(DecodeError::UnsupportedCodec {
            codec: codec_name(params.codec),
        });
    }
    codecs
        .make_audio_decoder(params, &AudioDecoderOptions::default())
        .map_err(|error| match error {
            SymphoniaError::Unsupported(detail) => DecodeError::Unsupported {
                detail: format!("{} decoder: {detail}", codec_name(params.codec)),
            },
            SymphoniaError::IoError(error) => DecodeError::Io(error),
            other => DecodeError::Malformed {
                detail: symphonia_detail(&other),
            },
        })
}

/// Symphonia's message without its "malformed stream: " style prefix (the variant says that).
fn symphonia_detail(error: &SymphoniaError) -> String {
    match error {
        SymphoniaError::DecodeError(detail) | SymphoniaError::Unsupported(detail) => {
            (*detail).to_owned()
        }
        SymphoniaError::LimitError(detail) => format!("limit exceeded: {detail}"),
        other => other.to_string(),
    }
}

/// An error from the demuxer or decoder that ends the stream.
fn stream_error(error: SymphoniaError, frames: u64) -> DecodeError {
    match error {
        SymphoniaError::IoError(error) => DecodeError::Io(error),
        SymphoniaError::Unsupported(detail) => DecodeError::Unsupported {
            detail: detail.to_owned(),
        },
        SymphoniaError::ResetRequired => DecodeError::Unsupported {
            detail: "the stream's tracks or parameters change mid-stream".to_owned(),
        },
        other => DecodeError::Corrupt {
            frames,
            detail: symphonia_detail(&other),
        },
    }
}

/// Turns a failure to open the container into the most specific error, re-reading the
/// start of the input to name what symphonia does not (e.g. a WAV file's codec).
fn explain_open_failure<R: Read + Seek>(error: SymphoniaError, source: &mut R) -> DecodeError {
    let mut head = Vec::new();
    let head_read = source
        .rewind()
        .and_then(|()| source.by_ref().take(HEAD_LEN).read_to_end(&mut head));
    if head_read.is_ok()
        && let Some(explained) = explain_head(&head, &error)
    {
        return explained;
    }
    if is_mp4(&head)
        && let SymphoniaError::Unsupported(detail) = &error
        && detail.contains("moov")
    {
        // The track headers (`moov`) are missing; encoders that write them last leave
        // them out of a file cut short.
        return match mp4_is_cut_short(source) {
            Ok(true) => DecodeError::Truncated,
            _ => DecodeError::Malformed {
                detail: "MP4 without track headers (no moov atom)".to_owned(),
            },
        };
    }
    match error {
        SymphoniaError::IoError(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated
        }
        SymphoniaError::IoError(error) => DecodeError::Io(error),
        // The probe found no container it knows.
        SymphoniaError::Unsupported(detail) if detail.starts_with("core (probe)") => {
            DecodeError::UnknownFormat
        }
        SymphoniaError::Unsupported(detail) => DecodeError::Unsupported {
            detail: detail.to_owned(),
        },
        other => DecodeError::Malformed {
            detail: symphonia_detail(&other),
        },
    }
}

/// An ISO base media file (MP4, M4A, MOV): it starts with an `ftyp` box.
fn is_mp4(head: &[u8]) -> bool {
    head.get(4..8) == Some(b"ftyp")
}

/// Whether an MP4 file's top-level boxes run past the end of the input.
fn mp4_is_cut_short<R: Read + Seek>(source: &mut R) -> io::Result<bool> {
    let len = source.seek(SeekFrom::End(0))?;
    let mut at = 0u64;
    while at < len {
        source.seek(SeekFrom::Start(at))?;
        let mut header = [0u8; 16];
        let available = usize::try_from((len - at).min(16)).unwrap_or(16);
        source.read_exact(&mut header[..available])?;
        if available < 8 {
            return Ok(true);
        }
        let size = match u32::from_be_bytes([header[0], header[1], header[2], header[3]]) {
            // The box runs to the end of the file.
            0 => return Ok(false),
            // A 64-bit size follows the type.
            1 if available == 16 => u64::from_be_bytes([
                header[8], header[9], header[10], header[11], header[12], header[13], header[14],
                header[15],
            ]),
            1 => return Ok(true),
            size => u64::from(size),
        };
        if size < 8 {
            // Not a box: the file is corrupt rather than short.
            return Ok(false);
        }
        at = at.saturating_add(size);
    }
    Ok(at > len)
}

/// What the first bytes of the input say about why it could not be opened.
fn explain_head(head: &[u8], error: &SymphoniaError) -> Option<DecodeError> {
    // A container magic with too little after it for the probe to recognise it.
    if (head.starts_with(b"RIFF") && head.len() < 12)
        || (head.starts_with(b"fLaC") && head.len() < 42)
    {
        return Some(DecodeError::Truncated);
    }
    let fmt = wav_format(head)?;
    if fmt.channels == 0 {
        return Some(DecodeError::ZeroChannels);
    }
    // Symphonia lays out at most 26 channels (18 with an extensible speaker mask) and
    // says "invalid channel count" or "too many channels".
    if fmt.channels > 8 && symphonia_detail(error).contains("channel") {
        return Some(DecodeError::TooManyChannels {
            channels: u32::from(fmt.channels),
            container: "WAV",
        });
    }
    if let Err(error) = check_sample_rate(fmt.sample_rate) {
        return Some(error);
    }
    if matches!(error, SymphoniaError::Unsupported(_)) {
        let tag = match (fmt.tag, fmt.sub_tag) {
            (WAVE_FORMAT_EXTENSIBLE, Some(sub_tag)) => sub_tag,
            (tag, _) => tag,
        };
        if !SUPPORTED_WAVE_TAGS.contains(&tag) {
            return Some(DecodeError::UnsupportedCodec {
                codec: wave_tag_name(tag),
            });
        }
    }
    None
}

const WAVE_FORMAT_EXTENSIBLE: u16 = 0xfffe;
/// Format tags symphonia's WAV reader understands (PCM, MS ADPCM, float, A-law, µ-law, IMA
/// ADPCM); whether their decoder is built in is checked separately.
const SUPPORTED_WAVE_TAGS: [u16; 6] = [0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011];

/// The fields of a WAV `fmt ` chunk that explain a refusal.
struct WavFormat {
    tag: u16,
    channels: u16,
    sample_rate: u32,
    /// First two bytes of the sub-format GUID of `WAVE_FORMAT_EXTENSIBLE` (the format tag).
    sub_tag: Option<u16>,
}

/// Finds the `fmt ` chunk of a RIFF/WAVE file within `head`.
fn wav_format(head: &[u8]) -> Option<WavFormat> {
    if head.get(0..4)? != b"RIFF" || head.get(8..12)? != b"WAVE" {
        return None;
    }
    let u16_at = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = 12usize;
    loop {
        let id = head.get(at..at + 4)?;
        let size = usize::try_from(u32_at(at + 4)?).ok()?;
        let body = at + 8;
        if id == b"fmt " {
            let tag = u16_at(body)?;
            let sub_tag = if tag == WAVE_FORMAT_EXTENSIBLE && size >= 40 {
                u16_at(body + 24)
            } else {
                None
            };
            return Some(WavFormat {
                tag,
                channels: u16_at(body + 2)?,
                sample_rate: u32_at(body + 4)?,
                sub_tag,
            });
        }
        // Chunks are padded to an even length.
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
}

/// Name of a WAV format tag (the registered `WAVE_FORMAT_*` values of common codecs).
fn wave_tag_name(tag: u16) -> String {
    let name = match tag {
        0x0002 => "adpcm_ms",
        0x0011 => "adpcm_ima_wav",
        0x0031 => "gsm_ms",
        0x0050 => "mp2",
        0x0055 => "mp3",
        0x0092 | 0x2000 => "ac3",
        0x00ff | 0x1610 | 0x4143 | 0xa106 => "aac",
        0x0161..=0x0163 => "wma",
        0x2001 => "dts",
        0x566f | 0x674f | 0x6750 | 0x6751 | 0x676f | 0x6770 | 0x6771 => "vorbis",
        0x704f => "opus",
        0xf1ac => "flac",
        _ => return format!("WAV format tag {tag:#06x}"),
    };
    name.to_owned()
}

/// Short name of a codec: symphonia's when it has a decoder, else a well-known name.
fn codec_name(id: AudioCodecId) -> String {
    if let Some(registered) = symphonia::default::get_codecs().get_audio_decoder(id) {
        return registered.codec.info.short_name.to_owned();
    }
    let name = match id {
        CODEC_ID_ADPCM_G722 => "adpcm_g722",
        CODEC_ID_ADPCM_G726 => "adpcm_g726",
        CODEC_ID_ADPCM_G726LE => "adpcm_g726le",
        CODEC_ID_ADPCM_MS => "adpcm_ms",
        CODEC_ID_ADPCM_IMA_WAV => "adpcm_ima_wav",
        CODEC_ID_ADPCM_IMA_QT => "adpcm_ima_qt",
        CODEC_ID_VORBIS => "vorbis",
        CODEC_ID_OPUS => "opus",
        CODEC_ID_SPEEX => "speex",
        CODEC_ID_MUSEPACK => "musepack",
        CODEC_ID_MP1 => "mp1",
        CODEC_ID_MP2 => "mp2",
        CODEC_ID_MP3 => "mp3",
        CODEC_ID_AAC => "aac",
        CODEC_ID_AC3 => "ac3",
        CODEC_ID_EAC3 => "eac3",
        CODEC_ID_AC4 => "ac4",
        CODEC_ID_DCA => "dts",
        CODEC_ID_WMA => "wma",
        CODEC_ID_FLAC => "flac",
        CODEC_ID_WAVPACK => "wavpack",
        CODEC_ID_MONKEYS_AUDIO => "ape",
        CODEC_ID_ALAC => "alac",
        CODEC_ID_TTA => "tta",
        CODEC_ID_TRUEHD => "truehd",
        _ => return format!("codec id {id}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::f32::consts::TAU;

    const WAVE_FORMAT_PCM: u16 = 0x0001;
    const WAVE_FORMAT_IEEE_FLOAT: u16 = 0x0003;
    /// Largest difference allowed between a written and a decoded sample.
    const TOLERANCE: f32 = 1.0 / 32768.0;

    /// A RIFF/WAVE file: a 16-byte `fmt ` chunk, `extra` appended to it, and `data`.
    fn wav_with(
        tag: u16,
        channels: u16,
        rate: u32,
        bits: u16,
        extra: &[u8],
        data: &[u8],
    ) -> Vec<u8> {
        let block_align = channels.wrapping_mul(bits / 8);
        let mut fmt = Vec::new();
        fmt.extend_from_slice(&tag.to_le_bytes());
        fmt.extend_from_slice(&channels.to_le_bytes());
        fmt.extend_from_slice(&rate.to_le_bytes());
        fmt.extend_from_slice(&rate.wrapping_mul(u32::from(block_align)).to_le_bytes());
        fmt.extend_from_slice(&block_align.to_le_bytes());
        fmt.extend_from_slice(&bits.to_le_bytes());
        fmt.extend_from_slice(extra);

        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&((4 + 8 + fmt.len() + 8 + data.len()) as u32).to_le_bytes());
        out.extend_from_slice(b"WAVE");
        out.extend_from_slice(b"fmt ");
        out.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        out.extend_from_slice(&fmt);
        out.extend_from_slice(b"data");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    fn wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        wav_with(tag, channels, rate, bits, &[], data)
    }

    /// Interleaved 16-bit PCM; returns the file and the exact values it holds.
    fn wav_i16(channels: u16, rate: u32, samples: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let quantised: Vec<i16> = samples
            .iter()
            .map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
            .collect();
        let data: Vec<u8> = quantised.iter().flat_map(|s| s.to_le_bytes()).collect();
        let exact = quantised.iter().map(|&s| f32::from(s) / 32768.0).collect();
        (wav(WAVE_FORMAT_PCM, channels, rate, 16, &data), exact)
    }

    fn wav_i24(channels: u16, rate: u32, samples: &[f32]) -> Vec<u8> {
        let data: Vec<u8> = samples
            .iter()
            .flat_map(|&x| {
                let s = (x * 8_388_608.0).round().clamp(-8_388_608.0, 8_388_607.0) as i32;
                let [b0, b1, b2, _] = s.to_le_bytes();
                [b0, b1, b2]
            })
            .collect();
        wav(WAVE_FORMAT_PCM, channels, rate, 24, &data)
    }

    fn wav_f32(channels: u16, rate: u32, samples: &[f32]) -> Vec<u8> {
        let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        wav(WAVE_FORMAT_IEEE_FLOAT, channels, rate, 32, &data)
    }

    /// A 16-bit FLAC stream whose frames use verbatim subframes (no prediction), which
    /// is simple enough to write here and still goes through symphonia's FLAC path.
    fn flac_i16(channels: u8, rate: u32, interleaved: &[i16], block: usize) -> Vec<u8> {
        fn crc8(data: &[u8]) -> u8 {
            data.iter().fold(0u8, |mut crc, &byte| {
                crc ^= byte;
                for _ in 0..8 {
                    crc = if crc & 0x80 != 0 {
                        (crc << 1) ^ 0x07
                    } else {
                        crc << 1
                    };
                }
                crc
            })
        }
        fn crc16(data: &[u8]) -> u16 {
            data.iter().fold(0u16, |mut crc, &byte| {
                crc ^= u16::from(byte) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x8005
                    } else {
                        crc << 1
                    };
                }
                crc
            })
        }
        let channels_usize = usize::from(channels);
        let total_frames = interleaved.len() / channels_usize;
        let mut out = b"fLaC".to_vec();
        out.extend_from_slice(&[0x80, 0, 0, 34]); // last metadata block: STREAMINFO, 34 bytes
        out.extend_from_slice(&(block as u16).to_be_bytes()); // min block size
        out.extend_from_slice(&(block as u16).to_be_bytes()); // max block size
        out.extend_from_slice(&[0; 6]); // min and max frame size: unknown
        let packed = (u64::from(rate) << 44)
            | (u64::from(channels - 1) << 41)
            | (15 << 36)
            | total_frames as u64;
        out.extend_from_slice(&packed.to_be_bytes());
        out.extend_from_slice(&[0; 16]); // MD5: unknown
        for (number, frames) in interleaved.chunks(block * channels_usize).enumerate() {
            assert!(number < 128, "one-byte frame numbers only");
            let frame_len = frames.len() / channels_usize;
            let mut frame = vec![
                0xff,
                0xf8,                         // sync, fixed block size
                0x70, // block size in 16 bits at the end, rate from STREAMINFO
                ((channels - 1) << 4) | 0x08, // independent channels, 16 bits per sample
                number as u8,
            ];
            frame.extend_from_slice(&((frame_len - 1) as u16).to_be_bytes());
            frame.push(crc8(&frame));
            for channel in 0..channels_usize {
                frame.push(0x02); // verbatim subframe, no wasted bits
                for sample in frames.iter().skip(channel).step_by(channels_usize) {
                    frame.extend_from_slice(&sample.to_be_bytes());
                }
            }
            let crc = crc16(&frame);
            frame.extend_from_slice(&crc.to_be_bytes());
            out.extend_from_slice(&frame);
        }
        out
    }

    /// Deterministic pseudo-random bytes (xorshift64*).
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    /// A test signal in [-1, 1]: a tone plus the extremes and zero.
    fn signal(len: usize, rate: u32, freq: f32) -> Vec<f32> {
        let mut out: Vec<f32> = (0..len)
            .map(|i| 0.8 * (TAU * freq * i as f32 / rate as f32).sin())
            .collect();
        for (i, value) in [(1, -1.0), (2, 0.999_969), (3, 0.0)] {
            if i < len {
                out[i] = value;
            }
        }
        out
    }

    fn assert_close(decoded: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(decoded.len(), expected.len(), "length");
        for (i, (d, e)) in decoded.iter().zip(expected).enumerate() {
            assert!(
                (d - e).abs() <= tolerance,
                "sample {i}: decoded {d}, expected {e}"
            );
        }
    }

    fn decode_err(bytes: &[u8], hint: Option<&str>) -> DecodeError {
        match decode_bytes(bytes, hint) {
            Ok(decoded) => panic!("expected an error, decoded {:?}", decoded.info),
            Err(error) => error,
        }
    }

    #[test]
    fn decode_pcm16_mono() {
        let written = signal(3000, 16_000, 440.0);
        let (bytes, _) = wav_i16(1, 16_000, &written);
        let decoded = decode_bytes(&bytes, Some("wav")).unwrap();
        assert_eq!(
            decoded.info,
            AudioInfo {
                sample_rate: 16_000,
                channels: 1,
                codec: "pcm_s16le".to_owned(),
                frames: 3000,
                skipped_packets: 0,
                declared_frames: Some(3000),
                truncated: false,
            }
        );
        assert_close(&decoded.samples, &written, TOLERANCE);
    }

    #[test]
    fn decode_pcm24_mono() {
        let written = signal(2000, 44_100, 1000.0);
        let decoded = decode_bytes(&wav_i24(1, 44_100, &written), None).unwrap();
        assert_eq!(decoded.info.codec, "pcm_s24le");
        assert_eq!(
            (decoded.info.sample_rate, decoded.info.channels),
            (44_100, 1)
        );
        assert_close(&decoded.samples, &written, TOLERANCE);
    }

    #[test]
    fn decode_float32_mono_is_exact() {
        let written = signal(1500, 48_000, 300.0);
        let decoded = decode_bytes(&wav_f32(1, 48_000, &written), Some("wav")).unwrap();
        assert_eq!(decoded.info.codec, "pcm_f32le");
        assert_eq!(
            (decoded.info.sample_rate, decoded.info.channels),
            (48_000, 1)
        );
        assert_eq!(decoded.samples, written);
    }

    #[test]
    fn stereo_is_downmixed_to_the_mean() {
        let left = signal(2500, 22_050, 440.0);
        let right: Vec<f32> = signal(2500, 22_050, 97.0)
            .iter()
            .map(|x| -0.5 * x)
            .collect();
        let interleaved: Vec<f32> = left
            .iter()
            .zip(&right)
            .flat_map(|(&l, &r)| [l, r])
            .collect();
        let expected: Vec<f32> = left
            .iter()
            .zip(&right)
            .map(|(l, r)| (l + r) / 2.0)
            .collect();

        let (bytes, _) = wav_i16(2, 22_050, &interleaved);
        let decoded = decode_bytes(&bytes, Some("wav")).unwrap();
        assert_eq!((decoded.info.channels, decoded.info.frames), (2, 2500));
        assert_eq!(decoded.info.codec, "pcm_s16le");
        assert_close(&decoded.samples, &expected, TOLERANCE);

        let decoded = decode_bytes(&wav_f32(2, 22_050, &interleaved), Some("wav")).unwrap();
        assert_eq!(decoded.info.channels, 2);
        assert_close(&decoded.samples, &expected, 1e-7);

        // Three channels: the mean of all three.
        let third = signal(2500, 22_050, 1234.0);
        let interleaved: Vec<f32> = (0..2500)
            .flat_map(|i| [left[i], right[i], third[i]])
            .collect();
        let expected: Vec<f32> = (0..2500)
            .map(|i| (left[i] + right[i] + third[i]) / 3.0)
            .collect();
        let decoded = decode_bytes(&wav_f32(3, 22_050, &interleaved), None).unwrap();
        assert_eq!(decoded.info.channels, 3);
        assert_close(&decoded.samples, &expected, 1e-6);
    }

    #[test]
    fn streams_packet_by_packet_and_stops_on_break() {
        let written = signal(10_000, 16_000, 440.0);
        let (bytes, exact) = wav_i16(1, 16_000, &written);

        let mut chunks = Vec::new();
        let info = decode_stream(Cursor::new(&bytes), Some("wav"), |chunk| {
            chunks.push(chunk.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(info.frames, 10_000);
        assert!(
            chunks.len() > 1,
            "one chunk per packet, not one for the file"
        );
        assert!(
            chunks
                .iter()
                .all(|chunk| !chunk.is_empty() && chunk.len() <= 4096)
        );
        assert_eq!(chunks.concat(), exact);

        // Stopping early reports what was delivered.
        let mut delivered = 0;
        let info = decode_stream(Cursor::new(&bytes), None, |chunk| {
            delivered += chunk.len();
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!(info.frames, delivered as u64);
        assert!(delivered < 10_000);
    }

    #[test]
    fn decode_stream_reads_a_file_from_the_start() {
        let (bytes, exact) = wav_i16(1, 8000, &signal(700, 8000, 440.0));
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        // The file's position is at its end after writing: decoding starts at byte 0 anyway.
        let mut samples = Vec::new();
        let info = decode_stream(&mut file, None, |chunk| {
            samples.extend_from_slice(chunk);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!((info.frames, info.sample_rate), (700, 8000));
        assert_eq!(samples, exact);
    }

    #[test]
    fn decode_file_reads_path_and_reports_open_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tone.wav");
        let (bytes, exact) = wav_i16(1, 16_000, &signal(1000, 16_000, 440.0));
        std::fs::write(&path, &bytes).unwrap();
        let decoded = decode_file(&path).unwrap();
        assert_eq!(decoded.samples, exact);

        let missing = dir.path().join("missing.wav");
        match decode_file(&missing) {
            Err(DecodeError::Open { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Open, got {other:?}"),
        }
        assert!(matches!(
            decode_file(dir.path()),
            Err(DecodeError::Open { .. })
        ));

        let empty = dir.path().join("empty.wav");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(decode_file(&empty), Err(DecodeError::Empty)));
    }

    #[test]
    fn empty_input_is_empty_error() {
        assert!(matches!(decode_err(&[], None), DecodeError::Empty));
        assert!(matches!(decode_err(&[], Some("wav")), DecodeError::Empty));
    }

    #[test]
    fn non_audio_bytes_are_unknown_format() {
        for (seed, len) in [(1, 1), (2, 3), (3, 44), (4, 1000), (5, 70_000)] {
            let error = decode_err(&random_bytes(seed, len), Some("wav"));
            assert!(
                matches!(error, DecodeError::UnknownFormat),
                "{len} bytes: {error:?}"
            );
        }
        let text = b"this is a text file, not audio\n".repeat(20);
        assert!(matches!(
            decode_err(&text, None),
            DecodeError::UnknownFormat
        ));
        // A RIFF file of another form (AVI).
        let mut avi = wav_i16(1, 8000, &[0.0; 10]).0;
        avi[8..12].copy_from_slice(b"AVI ");
        assert!(matches!(decode_err(&avi, None), DecodeError::UnknownFormat));
    }

    #[test]
    fn truncated_header_is_truncated_error() {
        let (bytes, _) = wav_i16(1, 16_000, &signal(100, 16_000, 440.0));
        // Every cut from the RIFF magic to the end of the data chunk's header.
        for cut in 4..44 {
            let error = decode_err(&bytes[..cut], Some("wav"));
            assert!(
                matches!(error, DecodeError::Truncated),
                "cut at {cut}: {error:?}"
            );
        }
        let flac = flac_i16(1, 16_000, &[0; 100], 64);
        for cut in [4, 8, 20, 41] {
            let error = decode_err(&flac[..cut], None);
            assert!(
                matches!(error, DecodeError::Truncated),
                "flac cut at {cut}: {error:?}"
            );
        }
    }

    #[test]
    fn truncated_data_keeps_what_is_there() {
        // A file that ends before its data chunk does (an interrupted download or
        // recording): the end of the file is the end of the stream.
        let (bytes, exact) = wav_i16(1, 16_000, &signal(5000, 16_000, 440.0));
        for cut in [44 + 2 * 3000, 44 + 2 * 3000 + 1] {
            let decoded = decode_bytes(&bytes[..cut], Some("wav")).unwrap();
            assert_eq!(decoded.info.frames, 3000, "cut at {cut}");
            assert_eq!(decoded.samples, exact[..3000]);
            // ... and says so.
            assert!(decoded.info.truncated, "cut at {cut}");
            let warnings = decoded.info.warnings().unwrap();
            assert!(
                warnings.starts_with("truncated: the data ends after 0.19 s of the 0.31 s"),
                "{warnings}"
            );
        }
        let whole = decode_bytes(&bytes, Some("wav")).unwrap();
        assert!(!whole.info.truncated);
        assert_eq!(whole.info.warnings(), None);
    }

    #[test]
    fn zero_channels_and_absurd_rates_are_refused() {
        let data = [0u8; 64];
        let error = decode_err(&wav(WAVE_FORMAT_PCM, 0, 16_000, 16, &data), None);
        assert!(matches!(error, DecodeError::ZeroChannels), "{error:?}");
        for rate in [0, MAX_SAMPLE_RATE + 1, u32::MAX] {
            let error = decode_err(&wav(WAVE_FORMAT_PCM, 1, rate, 16, &data), None);
            assert!(
                matches!(error, DecodeError::InvalidSampleRate { rate: r } if r == rate),
                "{rate} Hz: {error:?}"
            );
        }
        let decoded =
            decode_bytes(&wav(WAVE_FORMAT_PCM, 1, MAX_SAMPLE_RATE, 16, &data), None).unwrap();
        assert_eq!(decoded.info.sample_rate, MAX_SAMPLE_RATE);
    }

    #[test]
    fn non_finite_samples_are_errors() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut written = signal(2000, 16_000, 440.0);
            written[1500] = bad;
            let error = decode_err(&wav_f32(1, 16_000, &written), None);
            assert!(
                matches!(error, DecodeError::NonFiniteSample { frame: 1500, .. }),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn unsupported_codecs_are_named() {
        // MPEG layer 3 in WAV: the WAV reader refuses the format tag.
        let error = decode_err(
            &wav_with(0x0055, 1, 16_000, 0, &[0, 0], &[0; 32]),
            Some("wav"),
        );
        assert!(
            matches!(&error, DecodeError::UnsupportedCodec { codec } if codec == "mp3"),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "unsupported codec: mp3");
        // An unknown tag is named by its number.
        let error = decode_err(&wav_with(0x1234, 1, 16_000, 16, &[0, 0], &[0; 32]), None);
        assert!(
            matches!(&error, DecodeError::UnsupportedCodec { codec } if codec == "WAV format tag 0x1234"),
            "{error:?}"
        );
    }

    #[test]
    fn ima_adpcm_in_wav_decodes() {
        // One 256-byte block of silence: 505 frames.
        let mut ima = wav_with(0x0011, 1, 16_000, 4, &[2, 0, 0xf9, 0x01], &[0; 256]);
        ima[32..34].copy_from_slice(&256u16.to_le_bytes()); // block align
        let decoded = decode_bytes(&ima, None).unwrap();
        assert_eq!(decoded.info.codec, "adpcm_ima_wav");
        assert_eq!(decoded.info.frames, 505);
        assert!(decoded.samples.iter().all(|&s| s.abs() < 1e-3));
    }

    #[test]
    fn flac_round_trip() {
        let left = signal(1000, 32_000, 440.0);
        let right = signal(1000, 32_000, 3000.0);
        let interleaved: Vec<i16> = left
            .iter()
            .zip(&right)
            .flat_map(|(&l, &r)| [(l * 32767.0) as i16, (r * 32767.0) as i16])
            .collect();
        let expected: Vec<f32> = interleaved
            .chunks(2)
            .map(|pair| (f32::from(pair[0]) / 32768.0 + f32::from(pair[1]) / 32768.0) / 2.0)
            .collect();
        let bytes = flac_i16(2, 32_000, &interleaved, 256);
        let decoded = decode_bytes(&bytes, Some("flac")).unwrap();
        assert_eq!(
            decoded.info,
            AudioInfo {
                sample_rate: 32_000,
                channels: 2,
                codec: "flac".to_owned(),
                frames: 1000,
                skipped_packets: 0,
                declared_frames: Some(1000),
                truncated: false,
            }
        );
        assert_close(&decoded.samples, &expected, 1e-7);
    }

    #[test]
    fn fixture_clips_match_the_reference_waveforms() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
        let sine = decode_file(&fixtures.join("e2e-tiny/audio/sine_1s.wav")).unwrap();
        assert_eq!(sine.samples.len(), 16_000);
        assert_eq!(sine.info.sample_rate, 16_000);
        assert_eq!(sine.info.channels, 1);
        assert_eq!(sine.info.codec, "pcm_s16le");

        // The clips are the fbank cases' float waveforms, rounded to 16 bits.
        let cases = std::fs::read(fixtures.join("fbank/cases.safetensors")).unwrap();
        let cases = safetensors::SafeTensors::deserialize(&cases).unwrap();
        for clip in ["sine_1s", "chirp_2p5s", "noise_0p3s", "clipped_1s"] {
            let decoded =
                decode_file(&fixtures.join(format!("e2e-tiny/audio/{clip}.wav"))).unwrap();
            let reference: Vec<f32> = cases
                .tensor(&format!("{clip}.waveform"))
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(decoded.info.sample_rate, 16_000, "{clip}");
            // Rounded to nearest, except that clipped_1s's +1.0 becomes 32767 / 32768.
            assert_close(&decoded.samples, &reference, TOLERANCE);
        }
    }

    #[test]
    fn mangled_inputs_never_panic() {
        let (wav_bytes, _) = wav_i16(2, 16_000, &signal(3000, 16_000, 440.0));
        let flac_bytes = flac_i16(1, 16_000, &vec![1000; 2000], 256);
        let mut outcomes = [0usize; 2];
        for original in [wav_bytes, flac_bytes].iter() {
            for seed in 0..300u64 {
                let noise = random_bytes(seed + 1, 16);
                let mut bytes = original.clone();
                // Overwrite a few bytes, biased towards the headers, then maybe truncate.
                for pair in noise[..8].chunks(2) {
                    let at = usize::from(pair[0]) * if seed % 2 == 0 { 1 } else { 37 };
                    if let Some(byte) = bytes.get_mut(at % original.len()) {
                        *byte = pair[1];
                    }
                }
                if seed % 3 == 0 {
                    bytes.truncate(usize::from(noise[9]) * 31);
                }
                match decode_bytes(&bytes, None) {
                    Ok(decoded) => {
                        assert_eq!(decoded.samples.len() as u64, decoded.info.frames);
                        assert!(decoded.samples.iter().all(|s| s.is_finite()));
                        outcomes[0] += 1;
                    }
                    Err(_) => outcomes[1] += 1,
                }
            }
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    #[test]
    fn corrupt_packets_are_skipped_and_counted() {
        let written: Vec<i16> = (0..1000).map(|i| (i * 7 - 3500) as i16).collect();
        let bytes = flac_i16(1, 16_000, &written, 256);
        // STREAMINFO ends at byte 42; each frame is 8 header + 1 + 512 + 2 CRC bytes.
        let frame_start = |frame: usize| 42 + 523 * frame;

        // One corrupt frame mid-stream: the FLAC demuxer drops it (bad CRC) and the
        // timestamps jump; the other frames decode.
        let mut damaged = bytes.clone();
        damaged[frame_start(1) + 100] ^= 0x55;
        let decoded = decode_bytes(&damaged, None).unwrap();
        assert_eq!(decoded.info.skipped_packets, 1);
        assert_eq!(decoded.info.frames, 1000 - 256);
        let expected: Vec<f32> = written[..256]
            .iter()
            .chain(&written[512..])
            .map(|&s| f32::from(s) / 32768.0)
            .collect();
        assert_eq!(decoded.samples, expected);

        // Every frame corrupt: nothing decodes, which is an error.
        let mut damaged = bytes.clone();
        for frame in 0..4 {
            damaged[frame_start(frame) + 100] ^= 0x55;
        }
        let error = decode_err(&damaged, None);
        assert!(
            matches!(error, DecodeError::Corrupt { frames: 0, .. }),
            "{error:?}"
        );
    }

    #[test]
    #[should_panic(expected = "the callback's own panic")]
    fn a_panic_in_the_callback_is_not_swallowed() {
        let (bytes, _) = wav_i16(1, 16_000, &signal(100, 16_000, 440.0));
        let _ = decode_stream(Cursor::new(&bytes), None, |_| {
            panic!("the callback's own panic")
        });
    }

    #[test]
    fn absurd_channel_count_is_an_error_not_a_crash() {
        let error = decode_err(&wav(WAVE_FORMAT_PCM, 27, 16_000, 16, &[0; 64]), None);
        assert_eq!(
            error.to_string(),
            "the header declares 27 channels, more than the WAV reader supports"
        );
        // Symphonia's WAV reader multiplies channels by bytes per sample in 16 bits, which
        // overflows (a panic where overflow checks are on) for 65535: refused before.
        for channels in [27, 1000, u16::MAX] {
            let bytes = wav(WAVE_FORMAT_PCM, channels, 16_000, 16, &[0; 64]);
            let error = decode_err(&bytes, None);
            assert!(
                matches!(error, DecodeError::TooManyChannels { channels: c, container: "WAV" } if c == u32::from(channels)),
                "{channels} channels: {error:?}"
            );
        }
    }

    #[test]
    fn many_channels_are_averaged_and_counted() {
        // 8, 12 and 26 channels; channel k is a tone at 100 (k + 1) Hz.
        for channels in [8u16, 12, 26] {
            let n = usize::from(channels);
            let tones: Vec<Vec<f32>> = (0..n)
                .map(|k| signal(800, 16_000, 100.0 * (k + 1) as f32))
                .collect();
            let interleaved: Vec<f32> = (0..800)
                .flat_map(|i| tones.iter().map(move |t| t[i]))
                .collect();
            let expected: Vec<f32> = (0..800)
                .map(|i| tones.iter().map(|t| t[i]).sum::<f32>() / f32::from(channels))
                .collect();
            let decoded = decode_bytes(&wav_f32(channels, 16_000, &interleaved), None).unwrap();
            assert_eq!(decoded.info.channels, n);
            assert_eq!(decoded.info.frames, 800);
            assert_close(&decoded.samples, &expected, 1e-6);
        }
    }
}
