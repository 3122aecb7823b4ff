//! `audiocap corpus build` and `audiocap corpus check`: the captioning corpus built
//! from its definition folder, or the definition validated.

use std::path::PathBuf;

use super::exit::Exit;
use super::init_logging;

#[derive(clap::Subcommand)]
pub enum CorpusCommand {
    /// Fetch the pinned packages, cut and caption the clips, write OUT/{train,
    /// validation,test}.csv, OUT/audio/<split>/*.wav, labels.txt and corpus.json.
    Build(CorpusBuildArgs),
    /// Validate the corpus definition (every problem listed); build nothing.
    Check {
        /// The corpus definition folder.
        #[arg(long, default_value = "corpus")]
        catalog: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct CorpusBuildArgs {
    /// The corpus definition folder (corpus.toml, sounds/, test-split.txt).
    #[arg(long, default_value = "corpus")]
    catalog: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// A folder of already downloaded .deb files, searched before `apt-get download`.
    #[arg(long)]
    debs: Option<PathBuf>,
    /// Downloaded and unpacked packages, reused by later builds (default:
    /// ${AUDIOCAP_HOME:-~/.local/share/audiocap}/corpus-cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Build only these parts (source ids, speech, synthetic, mixtures), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Write the catalog's fixed test list from this build's split.
    #[arg(long)]
    write_test_split: bool,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(command: CorpusCommand) -> anyhow::Result<Exit> {
    use audiocap::corpus::{BuildOptions, build, catalog::Catalog, default_cache_dir};
    let (dir, args) = match command {
        CorpusCommand::Check { catalog } => (catalog, None),
        CorpusCommand::Build(args) => (args.catalog.clone(), Some(args)),
    };
    let catalog = match Catalog::load(&dir) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("error: {} problem(s) in {}:", problems.len(), dir.display());
            for p in problems {
                eprintln!("  - {p}");
            }
            return Ok(Exit::InvalidConfig);
        }
    };
    let Some(args) = args else {
        let rules: usize = catalog.rules.values().map(|r| r.rules.len()).sum();
        println!(
            "{}: valid ({} {}, {} sources, {} sound rules)",
            dir.display(),
            catalog.corpus.name,
            catalog.corpus.version,
            catalog.corpus.sources.len(),
            rules
        );
        return Ok(Exit::Ok);
    };
    // The Ogg demuxer logs every stream it opens, and malformed Vorbis comments,
    // which say nothing about the audio.
    init_logging(&audiocap::pipeline::config::LoggingSection {
        level: "info,symphonia_core=error,symphonia_format_ogg=error,symphonia_metadata=error,symphonia_codec_vorbis=error".to_string(),
        ..Default::default()
    });
    let cache = args.cache.unwrap_or_else(default_cache_dir);
    let options = BuildOptions {
        out: args.out,
        debs: args.debs,
        cache,
        only: args.only,
        overwrite: args.overwrite,
        write_test_split: args.write_test_split,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    };
    let report = build(&catalog, &options)?;
    for split in audiocap::corpus::SPLITS {
        println!(
            "{split:<10} {:>6} clips {:>6} recordings {:>7.2} h",
            report.clips.get(split).copied().unwrap_or(0),
            report.recordings.get(split).copied().unwrap_or(0),
            report.hours.get(split).copied().unwrap_or(0.0)
        );
    }
    println!(
        "{} labels; left out: {} unmatched, {} skipped by rule, {} unusable (see corpus.json)",
        report.labels.len(),
        report.unmatched.values().sum::<usize>(),
        report.skipped_by_rule.values().sum::<usize>(),
        report.left_out.len()
    );
    println!("corpus: {}", options.out.display());
    Ok(Exit::Ok)
}
