//! The exit codes of every `audiocap` command, in one place, so a scheduler can act on
//! them: 0 done, 1 fatal, 2 invalid input (or, for `status` and `finalize`, shards
//! that do not make one dataset: retrying will not help), 3 some inputs failed, 4 not
//! complete yet (retry later).

/// How a command ended. Library functions return typed outcomes; each command in
/// `src/cli/` maps its outcome to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every input captioned, the command did what it was asked; for `status`: every
    /// shard committed; for `finalize`: the dataset finalized.
    Ok,
    /// Fatal: the model could not be loaded or the run could not proceed.
    Fatal,
    /// Invalid arguments or configuration (also clap's code for usage errors).
    InvalidConfig,
    /// The run finished but some inputs failed (each has an error row).
    SomeInputsFailed,
    /// `status`, `finalize`: some shards are not committed yet; retry once they are.
    Incomplete,
    /// `status`, `finalize`: the shards do not make one dataset (several models,
    /// settings or shard counts, or committed parts gone); retrying will not help.
    Inconsistent,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Fatal => 1,
            Exit::InvalidConfig | Exit::Inconsistent => 2,
            Exit::SomeInputsFailed => 3,
            Exit::Incomplete => 4,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are an interface: schedulers and scripts test for them.
    #[test]
    fn codes_keep_their_numbers() {
        let codes = [
            (Exit::Ok, 0),
            (Exit::Fatal, 1),
            (Exit::InvalidConfig, 2),
            (Exit::Inconsistent, 2),
            (Exit::SomeInputsFailed, 3),
            (Exit::Incomplete, 4),
        ];
        for (exit, code) in codes {
            assert_eq!(exit.code(), code, "{exit:?}");
        }
    }
}
