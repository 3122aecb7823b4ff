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
        .or_else(|_| EnvFilter::try_new(pipeline_filter(&logging.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The filter a pipeline's `logging.level` stands for. The decoder library logs an
/// ERROR of its own for every input it cannot read, which the input's row already
/// records with its kind; those lines are left out unless the level names the
/// decoder (`info,symphonia=debug`).
fn pipeline_filter(level: &str) -> String {
    if level.contains("symphonia") {
        level.to_string()
    } else {
        format!("{level},symphonia=off")
    }
}

#[cfg(test)]
mod tests {
    use super::pipeline_filter;

    #[test]
    fn the_decoders_own_error_lines_are_left_out_unless_asked_for() {
        assert_eq!(pipeline_filter("info"), "info,symphonia=off");
        assert_eq!(
            pipeline_filter("warn,audiocap=debug"),
            "warn,audiocap=debug,symphonia=off"
        );
        assert_eq!(
            pipeline_filter("info,symphonia=debug"),
            "info,symphonia=debug"
        );
        for level in ["info", "debug", "warn,audiocap=trace"] {
            let filter = pipeline_filter(level);
            assert!(
                tracing_subscriber::EnvFilter::try_new(&filter).is_ok(),
                "{filter}"
            );
        }
    }
}
