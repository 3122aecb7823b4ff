//! Which formats are read, by what: the extensions a folder listing takes by default
//! ([`super::AUDIO_EXTENSIONS`]), the name and reader of each, the magic numbers of
//! formats only ffmpeg reads (to name them when an object has no extension), and the
//! decoder report `audiocap doctor` prints.

use std::path::Path;

use super::ffmpeg::{self, FfmpegSetting};

/// What reads a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// symphonia, or the Opus decoder, in this binary.
    Native,
    /// An `ffmpeg` child process (when one is available).
    Ffmpeg,
}

/// A family of files with the extensions they go by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub name: &'static str,
    pub extensions: &'static [&'static str],
    pub reader: Reader,
}

const fn native(name: &'static str, extensions: &'static [&'static str]) -> Format {
    Format {
        name,
        extensions,
        reader: Reader::Native,
    }
}

const fn ffmpeg_only(name: &'static str, extensions: &'static [&'static str]) -> Format {
    Format {
        name,
        extensions,
        reader: Reader::Ffmpeg,
    }
}

/// Every format a folder listing takes by default. Native containers may still hold
/// a codec only ffmpeg decodes (AC-3 in Matroska, AMR in 3GP): those are tried
/// natively first, then handed to ffmpeg.
pub const FORMATS: &[Format] = &[
    native("WAV", &["wav", "wave", "bwf"]),
    native("FLAC", &["flac"]),
    native(
        "MPEG audio (layer 1, 2, 3)",
        &["mp3", "mp2", "mp1", "mpa", "mpga"],
    ),
    native("Ogg (Vorbis, Opus, FLAC)", &["ogg", "oga"]),
    native("Opus", &["opus"]),
    native("AAC (ADTS)", &["aac", "adts"]),
    native(
        "MP4 / QuickTime (AAC, ALAC, Opus, MP3)",
        &["m4a", "m4b", "m4r", "mp4", "m4v", "mov", "alac"],
    ),
    native("AIFF", &["aif", "aiff", "aifc"]),
    native("Core Audio Format", &["caf"]),
    native("Matroska / WebM", &["mka", "mkv", "webm", "weba"]),
    ffmpeg_only("Windows Media Audio (ASF)", &["wma", "asf", "wmv"]),
    ffmpeg_only("AC-3 / E-AC-3", &["ac3", "eac3", "ec3"]),
    ffmpeg_only("DTS", &["dts"]),
    ffmpeg_only("WavPack", &["wv"]),
    ffmpeg_only("Monkey's Audio", &["ape"]),
    ffmpeg_only("AMR", &["amr", "awb", "3gp", "3g2"]),
    ffmpeg_only("RealAudio", &["ra", "rm", "rmvb"]),
    ffmpeg_only("True Audio", &["tta"]),
    ffmpeg_only("Musepack", &["mpc"]),
    ffmpeg_only("Speex", &["spx"]),
    ffmpeg_only("Sun AU", &["au", "snd"]),
    ffmpeg_only("Creative Voice", &["voc"]),
    ffmpeg_only("Wave64 / RF64", &["w64", "rf64"]),
    ffmpeg_only("DSD", &["dsf", "dff"]),
    ffmpeg_only("GSM", &["gsm"]),
    ffmpeg_only(
        "video (AVI, FLV, MPEG, MPEG-TS, MXF, DV)",
        &[
            "avi", "flv", "mpg", "mpeg", "vob", "ts", "m2ts", "mts", "mxf", "dv", "ogv",
        ],
    ),
];

/// The format an extension (no dot, any case) belongs to.
pub fn format_of_extension(extension: &str) -> Option<&'static Format> {
    let extension = extension.to_ascii_lowercase();
    FORMATS
        .iter()
        .find(|f| f.extensions.contains(&extension.as_str()))
}

/// The format a file's first bytes say it is, for formats only ffmpeg reads.
pub fn sniff_ffmpeg_only(head: &[u8]) -> Option<&'static str> {
    const ASF: [u8; 8] = [0x30, 0x26, 0xb2, 0x75, 0x8e, 0x66, 0xcf, 0x11];
    let starts = |magic: &[u8]| head.starts_with(magic);
    Some(if starts(&ASF) {
        "Windows Media Audio (ASF)"
    } else if starts(b"wvpk") {
        "WavPack"
    } else if starts(b"MAC ") {
        "Monkey's Audio"
    } else if starts(b"#!AMR") {
        "AMR"
    } else if starts(b".RMF") || starts(b".ra\xfd") {
        "RealAudio"
    } else if starts(b"TTA1") {
        "True Audio"
    } else if starts(b"MPCK") || starts(b"MP+") {
        "Musepack"
    } else if starts(&[0x0b, 0x77]) {
        "AC-3 / E-AC-3"
    } else if starts(&[0x7f, 0xfe, 0x80, 0x01]) {
        "DTS"
    } else if starts(b".snd") {
        "Sun AU"
    } else if starts(b"Creative Voice File") {
        "Creative Voice"
    } else if starts(b"DSD ") || starts(b"FRM8") {
        "DSD"
    } else if starts(b"riff") || starts(b"RF64") {
        "Wave64 / RF64"
    } else if starts(b"RIFF") && head.get(8..12) == Some(b"AVI ") {
        "video (AVI)"
    } else if starts(b"FLV") {
        "video (FLV)"
    } else if starts(&[0, 0, 1, 0xba]) {
        "video (MPEG program stream)"
    } else if head.len() > 188 && head[0] == 0x47 && head[188] == 0x47 {
        "video (MPEG transport stream)"
    } else {
        return None;
    })
}

/// The decoders this build and machine have, for `audiocap doctor`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderReport {
    /// Native formats (name and extensions).
    pub native: Vec<String>,
    /// The Opus decoder's name and version.
    pub opus: String,
    /// Where ffmpeg was looked for and what was found.
    pub ffmpeg: FfmpegReport,
}

/// The ffmpeg fallback as configured.
#[derive(Debug, Clone, PartialEq)]
pub enum FfmpegReport {
    /// Found: its path and the first line of `ffmpeg -version`.
    Found { path: String, version: String },
    /// Not available, and why (switched off, not on PATH, not runnable).
    Unavailable { reason: String },
}

/// What decodes on this machine with `setting` for ffmpeg (runs `ffmpeg -version`).
pub fn decoder_report(setting: &FfmpegSetting) -> DecoderReport {
    let native = FORMATS
        .iter()
        .filter(|f| f.reader == Reader::Native)
        .map(|f| format!("{} (.{})", f.name, f.extensions.join(", .")))
        .collect();
    let ffmpeg = match ffmpeg::locate(setting) {
        Ok(path) => match ffmpeg::version(&path) {
            Ok(version) => FfmpegReport::Found {
                path: path.display().to_string(),
                version,
            },
            Err(reason) => FfmpegReport::Unavailable {
                reason: format!("{}: {reason}", path.display()),
            },
        },
        Err(reason) => FfmpegReport::Unavailable { reason },
    };
    DecoderReport {
        native,
        opus: format!(
            "opus-pure {} (pure Rust; Ogg, Matroska/WebM and MP4)",
            OPUS_DECODER_VERSION
        ),
        ffmpeg,
    }
}

/// The version of the `opus-pure` crate this build uses (Cargo.toml pins it).
const OPUS_DECODER_VERSION: &str = "0.2.2";

impl DecoderReport {
    /// Lines for the terminal.
    pub fn render(&self) -> String {
        let mut s = String::from("decoders:\n  native:\n");
        for line in &self.native {
            s.push_str(&format!("    {line}\n"));
        }
        s.push_str(&format!("  opus: {}\n", self.opus));
        match &self.ffmpeg {
            FfmpegReport::Found { path, version } => s.push_str(&format!(
                "  ffmpeg: {path} ({version}); reads the formats below and any other it knows\n"
            )),
            FfmpegReport::Unavailable { reason } => s.push_str(&format!(
                "  ffmpeg: not available ({reason}); the formats below give error rows\n"
            )),
        }
        for f in FORMATS.iter().filter(|f| f.reader == Reader::Ffmpeg) {
            s.push_str(&format!("    {} (.{})\n", f.name, f.extensions.join(", .")));
        }
        s
    }
}

/// The lower-cased extension of a path, if any.
pub fn extension_of(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_extensions_are_the_formats_extensions() {
        let mut from_formats: Vec<&str> = FORMATS
            .iter()
            .flat_map(|f| f.extensions.iter().copied())
            .collect();
        let mut listed = super::super::AUDIO_EXTENSIONS.to_vec();
        from_formats.sort_unstable();
        listed.sort_unstable();
        let before = from_formats.len();
        from_formats.dedup();
        assert_eq!(before, from_formats.len(), "an extension in two formats");
        assert_eq!(from_formats, listed);
        assert_eq!(format_of_extension("WMA").unwrap().reader, Reader::Ffmpeg);
        assert_eq!(format_of_extension("opus").unwrap().reader, Reader::Native);
        assert!(format_of_extension("txt").is_none());
    }

    #[test]
    fn the_reported_opus_decoder_is_the_one_built_in() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
        let entry = format!("name = \"opus-pure\"\nversion = \"{OPUS_DECODER_VERSION}\"");
        assert!(lock.contains(&entry), "Cargo.lock has no {entry:?}");
    }

    #[test]
    fn the_report_says_what_reads_what_and_why_ffmpeg_is_missing() {
        let report = decoder_report(&FfmpegSetting::Off);
        assert_eq!(
            report.ffmpeg,
            FfmpegReport::Unavailable {
                reason: "switched off by `[decode] ffmpeg = false`".to_string()
            }
        );
        let text = report.render();
        assert!(
            text.contains("    Matroska / WebM (.mka, .mkv, .webm, .weba)\n"),
            "{text}"
        );
        assert!(text.contains("  opus: opus-pure "), "{text}");
        assert!(text.contains("    WavPack (.wv)\n"), "{text}");
    }

    #[test]
    fn magic_numbers_name_what_only_ffmpeg_reads() {
        let asf = [0x30, 0x26, 0xb2, 0x75, 0x8e, 0x66, 0xcf, 0x11, 0xa6, 0xd9];
        assert_eq!(sniff_ffmpeg_only(&asf), Some("Windows Media Audio (ASF)"));
        assert_eq!(sniff_ffmpeg_only(b"wvpk\x00\x00"), Some("WavPack"));
        assert_eq!(
            sniff_ffmpeg_only(&[0x0b, 0x77, 1, 2]),
            Some("AC-3 / E-AC-3")
        );
        assert_eq!(sniff_ffmpeg_only(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(sniff_ffmpeg_only(b"hello"), None);
    }
}
