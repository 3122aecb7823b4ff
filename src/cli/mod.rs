//! The command-line edge: one module per command, each with its flags (clap), their
//! translation into the library's plain options, the call, and the outcome mapped to
//! an [`exit::Exit`]. Nothing here decides more than that; the work is in the library.

pub mod bench;
pub mod caption;
pub mod corpus;
mod dataset;
pub mod doctor;
pub mod eval;
pub mod exit;
pub mod export;
pub mod finalize;
pub mod merge;
pub mod pretrain;
pub mod reference_caption;
pub mod run;
pub mod status;
pub mod train;

pub use dataset::DatasetArgs;

/// `tracing` to stderr: text or JSON lines, level from the pipeline unless
/// `RUST_LOG` is set.
pub fn init_logging(logging: &audiocap::pipeline::config::LoggingSection) {
    use audiocap::pipeline::config::LogFormat;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&logging.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
