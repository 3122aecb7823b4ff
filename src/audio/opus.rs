//! Opus: the identification header (RFC 7845 §5.1) and a packet decoder on the
//! pure-Rust `opus-pure` crate (a port of libopus, checked by its authors against
//! libopus 1.6.1 and fuzzed; no C library at build or run time). `tests/codecs.rs`
//! checks it against libopus here too, sample by sample.
//!
//! The demuxers (symphonia's Ogg, Matroska/WebM and MP4 readers) hand over the
//! `OpusHead` as the track's extra data and one Opus packet at a time; this module
//! turns each packet into `f32` frames at 48 kHz (the rate Opus always decodes at;
//! mono and stereo streams straight to mono, surround interleaved), drops the
//! encoder's pre-skip from the start of the stream, trims the
//! end padding the container signals, and applies the header's output gain.
//! Channel mapping family 0 (mono, stereo) and family 1 in its standard Vorbis
//! layouts (up to 7.1) are decoded; other mappings are refused as unsupported (the
//! ffmpeg fallback reads them).

use opus_pure::{Error as OpusError, OpusDecoder, OpusMSDecoder, multistream::ChannelLayout};

/// The only rate Opus decodes at here (the container's rate is 48 kHz too).
pub const OPUS_RATE: u32 = 48_000;

/// Most frames one Opus packet decodes to: 120 ms at 48 kHz.
const MAX_PACKET_FRAMES: usize = 5_760;

/// What the `OpusHead` identification header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusHead {
    /// Output channels.
    pub channels: usize,
    /// Frames (at 48 kHz) to drop from the start of the decoded stream.
    pub pre_skip: u16,
    /// The rate of the audio before encoding (informational; 0 when unknown).
    pub input_rate: u32,
    /// Output gain in Q7.8 dB.
    pub gain_q8: i16,
    /// Channel mapping family (0: mono/stereo, 1: Vorbis order, 255: unordered).
    pub family: u8,
    /// Opus streams in each packet.
    pub streams: usize,
    /// Of those, the stereo (coupled) ones.
    pub coupled: usize,
    /// For each output channel, the decoded channel it takes (255: silence).
    pub mapping: Vec<u8>,
}

/// Why an Opus stream cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpusHeadError {
    #[error("no Opus identification header (OpusHead) in the track's codec data")]
    Missing,
    #[error("the Opus identification header is cut short ({0} bytes)")]
    Short(usize),
    #[error("Opus encapsulation version {0} is not supported (major version 0 is)")]
    Version(u8),
    #[error("the Opus header declares zero channels")]
    ZeroChannels,
    #[error("the Opus header's channel mapping is invalid: {0}")]
    Mapping(String),
}

impl OpusHead {
    /// Parses an `OpusHead` packet (magic included), as Ogg and Matroska store it.
    pub fn parse(data: &[u8]) -> Result<Self, OpusHeadError> {
        Self::parse_with(data, false)
    }

    /// Parses MP4's `dOps` box body behind an `OpusHead` magic, as symphonia's MP4
    /// reader hands it over: the same fields, in big-endian order (ISO/IEC 14496-12
    /// Opus encapsulation, §4.3.2).
    pub fn parse_mp4(data: &[u8]) -> Result<Self, OpusHeadError> {
        Self::parse_with(data, true)
    }

    fn parse_with(data: &[u8], big_endian: bool) -> Result<Self, OpusHeadError> {
        if !data.starts_with(b"OpusHead") {
            return Err(OpusHeadError::Missing);
        }
        if data.len() < 19 {
            return Err(OpusHeadError::Short(data.len()));
        }
        let version = data[8];
        // Minor versions are compatible; major version 0 is the only one defined.
        if version >> 4 != 0 {
            return Err(OpusHeadError::Version(version));
        }
        let channels = usize::from(data[9]);
        if channels == 0 {
            return Err(OpusHeadError::ZeroChannels);
        }
        let (pre_skip, input_rate, gain_q8) = if big_endian {
            (
                u16::from_be_bytes([data[10], data[11]]),
                u32::from_be_bytes([data[12], data[13], data[14], data[15]]),
                i16::from_be_bytes([data[16], data[17]]),
            )
        } else {
            (
                u16::from_le_bytes([data[10], data[11]]),
                u32::from_le_bytes([data[12], data[13], data[14], data[15]]),
                i16::from_le_bytes([data[16], data[17]]),
            )
        };
        let family = data[18];
        let (streams, coupled, mapping) = if family == 0 {
            if channels > 2 {
                return Err(OpusHeadError::Mapping(format!(
                    "family 0 carries 1 or 2 channels, not {channels}"
                )));
            }
            (1, channels - 1, (0..channels as u8).collect())
        } else {
            let table = data
                .get(19..21 + channels)
                .ok_or(OpusHeadError::Short(data.len()))?;
            let (streams, coupled) = (usize::from(table[0]), usize::from(table[1]));
            if streams == 0 || coupled > streams || streams + coupled > 255 {
                return Err(OpusHeadError::Mapping(format!(
                    "{streams} streams of which {coupled} coupled"
                )));
            }
            let mapping = table[2..].to_vec();
            if let Some(&bad) = mapping
                .iter()
                .find(|&&m| m != 255 && usize::from(m) >= streams + coupled)
            {
                return Err(OpusHeadError::Mapping(format!(
                    "channel index {bad} beyond the {} decoded channels",
                    streams + coupled
                )));
            }
            (streams, coupled, mapping)
        };
        Ok(Self {
            channels,
            pre_skip,
            input_rate,
            gain_q8,
            family,
            streams,
            coupled,
            mapping,
        })
    }
}

enum Inner {
    Single(Box<OpusDecoder>),
    Multi(Box<OpusMSDecoder>),
}

/// Decodes the packets of one Opus track, in order.
pub struct OpusStream {
    inner: Inner,
    /// The stream's channels, and the channels decoded (1 for mono and stereo).
    channels: usize,
    out_channels: usize,
    /// Pre-skip frames still to drop.
    to_skip: usize,
    /// Linear output gain from the header (1 for 0 dB).
    gain: f32,
    /// Interleaved output of the last packet.
    pcm: Vec<f32>,
}

impl std::fmt::Debug for OpusStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusStream")
            .field("channels", &self.channels)
            .field("to_skip", &self.to_skip)
            .field("gain", &self.gain)
            .finish_non_exhaustive()
    }
}

impl OpusStream {
    /// A decoder for the stream `head` describes, at 48 kHz.
    pub fn new(head: &OpusHead) -> Result<Self, OpusHeadError> {
        let refused = |e: OpusError| OpusHeadError::Mapping(e.to_string());
        let (inner, out_channels) = if head.family == 0 {
            // One stream, decoded straight to mono: the decoder mixes the channels
            // before synthesis (CELT averages the two spectra, SILK gives its mid
            // channel), the mean of the channels at about half the cost of stereo.
            let decoder = OpusDecoder::new(OPUS_RATE as i32, 1).map_err(refused)?;
            (Inner::Single(Box::new(decoder)), 1)
        } else {
            // The decoder knows the standard layouts only; the header must be one.
            let standard = ChannelLayout::surround(head.channels, head.family).map_err(refused)?;
            if (
                standard.nb_streams,
                standard.nb_coupled_streams,
                &standard.mapping,
            ) != (head.streams, head.coupled, &head.mapping)
            {
                return Err(OpusHeadError::Mapping(format!(
                    "{} streams ({} coupled) mapped as {:?}: not the standard layout of {} \
                     channels, which is all the decoder reads",
                    head.streams, head.coupled, head.mapping, head.channels
                )));
            }
            let decoder = OpusMSDecoder::new(OPUS_RATE as i32, head.channels, head.family)
                .map_err(refused)?;
            (Inner::Multi(Box::new(decoder)), head.channels)
        };
        Ok(Self {
            inner,
            channels: head.channels,
            out_channels,
            to_skip: usize::from(head.pre_skip),
            // RFC 7845 §5.1: gain in Q7.8 dB, applied to the decoded output.
            gain: 10f32.powf(f32::from(head.gain_q8) / (20.0 * 256.0)),
            pcm: vec![0.0; MAX_PACKET_FRAMES * out_channels],
        })
    }

    /// The stream's channels (the header's count).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Channels interleaved in what [`OpusStream::decode`] returns: 1 for mono and
    /// stereo streams (mixed by the decoder), every channel of a surround stream.
    pub fn decoded_channels(&self) -> usize {
        self.out_channels
    }

    /// Decodes one packet to interleaved frames, less the pre-skip still due and
    /// `trim_end` frames of end padding. An error means this packet is bad (the stream
    /// may go on with the next one).
    pub fn decode(&mut self, packet: &[u8], trim_end: usize) -> Result<&[f32], OpusError> {
        if packet.is_empty() {
            // An empty packet would ask for loss concealment; there is nothing to decode.
            return Err(OpusError::InvalidPacket("empty packet"));
        }
        let frames = match &mut self.inner {
            Inner::Single(d) => d.decode(packet, MAX_PACKET_FRAMES, &mut self.pcm)?,
            Inner::Multi(d) => d.decode(packet, MAX_PACKET_FRAMES, &mut self.pcm)?,
        };
        let frames = frames.min(MAX_PACKET_FRAMES);
        let skip = self.to_skip.min(frames);
        self.to_skip -= skip;
        let end = frames.saturating_sub(trim_end).max(skip);
        let out = &mut self.pcm[skip * self.out_channels..end * self.out_channels];
        if self.gain != 1.0 {
            for sample in out.iter_mut() {
                *sample *= self.gain;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(channels: u8, pre_skip: u16, gain: i16, family: u8, table: &[u8]) -> Vec<u8> {
        let mut h = b"OpusHead".to_vec();
        h.push(1);
        h.push(channels);
        h.extend_from_slice(&pre_skip.to_le_bytes());
        h.extend_from_slice(&44_100u32.to_le_bytes());
        h.extend_from_slice(&gain.to_le_bytes());
        h.push(family);
        h.extend_from_slice(table);
        h
    }

    #[test]
    fn headers_parse_and_bad_ones_are_refused() {
        let stereo = OpusHead::parse(&head(2, 312, 0, 0, &[])).unwrap();
        assert_eq!(
            (stereo.channels, stereo.pre_skip, stereo.streams),
            (2, 312, 1)
        );
        assert_eq!((stereo.coupled, stereo.input_rate), (1, 44_100));
        // MP4's dOps: the same fields big-endian (and version 0).
        let mut dops = b"OpusHead\x00\x02\x01\x38\x00\x00\xac\x44\x00\x00\x00".to_vec();
        dops[17] = 0;
        let mp4 = OpusHead::parse_mp4(&dops).unwrap();
        assert_eq!(
            (mp4.channels, mp4.pre_skip, mp4.input_rate),
            (2, 312, 44_100)
        );
        // 5.1 in family 1: 4 streams, 2 coupled, Vorbis order.
        let surround = OpusHead::parse(&head(6, 0, 0, 1, &[4, 2, 0, 4, 1, 2, 3, 5])).unwrap();
        assert_eq!(surround.mapping, vec![0, 4, 1, 2, 3, 5]);
        assert!(OpusStream::new(&surround).is_ok());
        // The same streams mapped otherwise: valid, but not a layout the decoder reads.
        let swapped = OpusHead::parse(&head(6, 0, 0, 1, &[4, 2, 4, 0, 1, 2, 3, 5])).unwrap();
        assert!(matches!(
            OpusStream::new(&swapped),
            Err(OpusHeadError::Mapping(_))
        ));

        let refused = |bytes: &[u8]| OpusHead::parse(bytes).unwrap_err();
        assert_eq!(refused(b"OggS...."), OpusHeadError::Missing);
        assert_eq!(
            refused(&head(2, 0, 0, 0, &[])[..12]),
            OpusHeadError::Short(12)
        );
        assert_eq!(refused(&head(0, 0, 0, 0, &[])), OpusHeadError::ZeroChannels);
        let mut v2 = head(2, 0, 0, 0, &[]);
        v2[8] = 0x20;
        assert_eq!(refused(&v2), OpusHeadError::Version(0x20));
        assert!(matches!(
            refused(&head(3, 0, 0, 0, &[])),
            OpusHeadError::Mapping(_)
        ));
        // A table cut short, and one that points past the decoded channels.
        assert!(matches!(
            refused(&head(6, 0, 0, 1, &[4, 2, 0])),
            OpusHeadError::Short(_)
        ));
        assert!(matches!(
            refused(&head(2, 0, 0, 1, &[1, 0, 0, 7])),
            OpusHeadError::Mapping(_)
        ));
        assert!(matches!(
            refused(&head(2, 0, 0, 1, &[0, 0, 0, 0])),
            OpusHeadError::Mapping(_)
        ));
    }

    /// A CELT-only packet of digital silence (TOC: config 31, 20 ms fullband, mono,
    /// one frame; a body of one zero byte decodes as silence).
    const SILENT_20MS: [u8; 2] = [0xf8, 0x00];

    #[test]
    fn pre_skip_is_dropped_across_packets_and_end_padding_trimmed() {
        let head = OpusHead::parse(&head(1, 1_000, 0, 0, &[])).unwrap();
        let mut stream = OpusStream::new(&head).unwrap();
        // 960 frames per packet: the first is skipped whole, 40 frames of the second.
        assert_eq!(stream.decode(&SILENT_20MS, 0).unwrap().len(), 0);
        assert_eq!(stream.decode(&SILENT_20MS, 0).unwrap().len(), 920);
        assert_eq!(stream.decode(&SILENT_20MS, 0).unwrap().len(), 960);
        assert_eq!(stream.decode(&SILENT_20MS, 160).unwrap().len(), 800);
        assert_eq!(stream.decode(&SILENT_20MS, 5_000).unwrap().len(), 0);
        assert!(stream.decode(&[], 0).is_err());
    }

    #[test]
    fn output_gain_is_applied() {
        // +6.02 dB (Q7.8: 1541) doubles the amplitude.
        let head = OpusHead::parse(&head(1, 0, 1_541, 0, &[])).unwrap();
        let stream = OpusStream::new(&head).unwrap();
        assert!((stream.gain - 2.0).abs() < 1e-3, "{}", stream.gain);
    }
}
