#!/bin/sh
# Regenerates the encoded test clips in this folder (tests/audio_inputs.rs reads them).
# Made with ffmpeg 5.1 (Debian 12: `apt-get install -y ffmpeg`). Every clip is the same
# two-tone 44.1 kHz stereo signal, so a test can predict the decoded mono mean:
#   left  = 0.5  * sin(2 pi 440 t)
#   right = 0.25 * sin(2 pi 1000 t)
# The WAV clips are 0.2 s (so the widest, f64 stereo, stays under 200 KB); the
# compressed ones are 1.5 s. Output is deterministic for a given ffmpeg build
# (-fflags +bitexact, no metadata).
set -eu
cd "$(dirname "$0")"

tone() { # duration channels-expression
  echo "aevalsrc=exprs=$2:sample_rate=44100:duration=$1"
}
STEREO='0.5*sin(2*PI*440*t)|0.25*sin(2*PI*1000*t)'
FF="ffmpeg -hide_banner -loglevel error -y"
OUT="-map_metadata -1 -fflags +bitexact -flags +bitexact"

for fmt in u8 s16 s24 s32 f32 f64; do
  case $fmt in
    u8) codec=pcm_u8 ;;
    f32) codec=pcm_f32le ;;
    f64) codec=pcm_f64le ;;
    *) codec=pcm_${fmt}le ;;
  esac
  $FF -f lavfi -i "$(tone 0.2 "$STEREO")" -c:a $codec $OUT tone_$fmt.wav
done

$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a flac -sample_fmt s16 $OUT tone.flac
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a libmp3lame -b:a 128k $OUT tone.mp3
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a libvorbis -q:a 4 $OUT tone.ogg
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a aac -b:a 128k $OUT tone_aac.m4a
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a alac -sample_fmt s16p $OUT tone_alac.m4a
# A codec that is not decoded: Opus in Ogg (48 kHz, the only rate Opus codes).
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -ar 48000 -c:a libopus -b:a 64k $OUT tone_opus.ogg
# Eight channels (7.1), channel k = 0.1 * (k + 1) * sin(2 pi 250 (k + 1) t): the mono mean
# is known and every channel is heard in it. FLAC codes up to 8 channels.
EIGHT='0.1*sin(2*PI*250*t)|0.2*sin(2*PI*500*t)|0.3*sin(2*PI*750*t)|0.4*sin(2*PI*1000*t)|0.5*sin(2*PI*1250*t)|0.6*sin(2*PI*1500*t)|0.7*sin(2*PI*1750*t)|0.8*sin(2*PI*2000*t)'
$FF -f lavfi -i "$(tone 0.5 "$EIGHT")" -c:a flac -sample_fmt s16 $OUT tone_8ch.flac

# Longer clips for benches/frontend.rs (front-end throughput): the same signal, with a
# white noise floor so the codecs have broadband content to code, as in real
# recordings. FLAC is shorter, with a quieter floor, to stay under 200 KB.
NOISY='0.5*sin(2*PI*440*t)+0.02*random(0)-0.01|0.25*sin(2*PI*1000*t)+0.02*random(1)-0.01'
$FF -f lavfi -i "$(tone 10 "$NOISY")" -c:a libmp3lame -b:a 128k $OUT bench_10s.mp3
QUIET='0.5*sin(2*PI*440*t)+0.002*random(0)-0.001|0.25*sin(2*PI*1000*t)+0.002*random(1)-0.001'
$FF -f lavfi -i "$(tone 3 "$QUIET")" -c:a flac -sample_fmt s16 $OUT bench_3s.flac

# Formats symphonia reads natively since issue 28 (AIFF, CAF, MPEG layer 2, Vorbis in
# Matroska) and Opus in the three containers that carry it (Ogg above, WebM, MP4).
$FF -f lavfi -i "$(tone 0.2 "$STEREO")" -c:a pcm_s16be $OUT tone.aiff
$FF -f lavfi -i "$(tone 0.2 "$STEREO")" -c:a pcm_s16le $OUT tone.caf
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a mp2 -b:a 192k $OUT tone.mp2
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -c:a libvorbis -q:a 4 $OUT tone_vorbis.mka
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -ar 48000 -c:a libopus -b:a 64k $OUT tone_opus.webm
$FF -f lavfi -i "$(tone 1.5 "$STEREO")" -ar 48000 -c:a libopus -b:a 64k $OUT tone_opus.mp4
# Opus for benches/frontend.rs: the MP3 bench's signal at 64 kbps, a common Opus
# setting for music archives.
$FF -f lavfi -i "$(tone 10 "$NOISY")" -ar 48000 -c:a libopus -b:a 64k $OUT bench_10s.opus
