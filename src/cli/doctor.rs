//! `audiocap doctor`: which decoders read audio here (native formats, Opus, the ffmpeg
//! fallback), and which ONNX Runtime library is used and what it offers.

use clap::Args;

use super::exit::Exit;
use audiocap::audio::ffmpeg::FfmpegSetting;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The ffmpeg to report on, as `[decode] ffmpeg` says it: `true` (find it on
    /// PATH), `false` or its path.
    #[arg(long, default_value = "true", value_parser = FfmpegSetting::from_flag)]
    pub ffmpeg: FfmpegSetting,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<Exit> {
    print!(
        "{}",
        audiocap::audio::formats::decoder_report(&args.ffmpeg).render()
    );
    println!("{}", audiocap::engine::runtime::doctor_report());
    Ok(Exit::Ok)
}
