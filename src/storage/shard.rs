//! Shards: N workers each take the inputs whose URI hashes to their index, so the N
//! together cover every input exactly once without talking to each other.
//!
//! The assignment is [`shard_of`]: the first 8 bytes of SHA-256 of the URI's UTF-8
//! bytes, read as a big-endian u64, modulo the shard count. In Python:
//!
//! ```text
//! int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big") % count
//! ```
//!
//! The URI is the canonical one a row carries ([`super::Location::uri_of`]), so a
//! resumed or re-sharded run assigns the same input the same way.

use sha2::{Digest, Sha256};

/// This worker's shard: it processes inputs with `shard_of(uri, count) == index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: u32,
    pub count: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShardError {
    #[error("shard count must be at least 1, got 0")]
    ZeroCount,
    #[error("shard index {index} is out of range for {count} shards (valid: 0..{count})")]
    IndexOutOfRange { index: u32, count: u32 },
    #[error("{var}={value:?} is not a non-negative integer")]
    BadEnv { var: &'static str, value: String },
    #[error(
        "the shard index comes from {source_name} but the shard count is not known: pass the count explicitly (e.g. --shard-count = the Job's completions)"
    )]
    MissingCount { source_name: &'static str },
    #[error("a shard index was given but no shard count (pass the count too)")]
    IndexWithoutCount,
    #[error("inconsistent shard settings: {first} but {second}")]
    Conflict { first: String, second: String },
    #[error("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")]
    SlurmBelowMin { id: u32, min: u32 },
}

/// The shard `uri` belongs to among `count` shards (`count` 0 is treated as 1).
/// See the module documentation for the exact, reproducible definition.
pub fn shard_of(uri: &str, count: u32) -> u32 {
    let digest = Sha256::digest(uri.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(count.max(1))) as u32
}

/// One scheduler's view of the shard: an index and, when it says so, a count.
struct EnvShard {
    name: &'static str,
    index: u32,
    count: Option<u32>,
}

impl ShardSpec {
    /// All inputs, one worker.
    pub const SINGLE: ShardSpec = ShardSpec { index: 0, count: 1 };

    /// Whether `uri` belongs to this shard.
    pub fn owns(&self, uri: &str) -> bool {
        shard_of(uri, self.count) == self.index
    }

    /// The shard from explicit values, else from the scheduler's environment:
    ///
    /// - Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX` (the count must be explicit:
    ///   Kubernetes does not export the number of completions);
    /// - AWS Batch array jobs: `AWS_BATCH_JOB_ARRAY_INDEX`, with the count from
    ///   `AWS_BATCH_JOB_ARRAY_SIZE` when set, else explicit;
    /// - Slurm job arrays: `(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    ///   SLURM_ARRAY_TASK_STEP` of `SLURM_ARRAY_TASK_COUNT`.
    ///
    /// An explicit index wins over the environment (both index and count are then
    /// taken as given). Schedulers that are all present must agree, and an explicit
    /// count must agree with the scheduler's. Nothing set: [`ShardSpec::SINGLE`].
    /// `env` looks a variable up (`|k| std::env::var(k).ok()` in production).
    pub fn resolve(
        explicit_index: Option<u32>,
        explicit_count: Option<u32>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ShardSpec, ShardError> {
        if explicit_count == Some(0) {
            return Err(ShardError::ZeroCount);
        }
        if let Some(index) = explicit_index {
            let count = explicit_count.ok_or(ShardError::IndexWithoutCount)?;
            return Self::checked(index, count);
        }
        let found = env_shards(env)?;
        let Some(first) = found.first() else {
            return Ok(ShardSpec {
                index: 0,
                count: explicit_count.unwrap_or(1),
            });
        };
        for other in &found[1..] {
            if other.index != first.index {
                return Err(ShardError::Conflict {
                    first: format!("{} gives shard index {}", first.name, first.index),
                    second: format!("{} gives {}", other.name, other.index),
                });
            }
        }
        let mut count: Option<(u32, String)> = explicit_count.map(|c| (c, "explicit".into()));
        for shard in &found {
            let Some(c) = shard.count else { continue };
            match &count {
                Some((known, from)) if *known != c => {
                    return Err(ShardError::Conflict {
                        first: format!("the {from} shard count is {known}"),
                        second: format!("{} gives {c}", shard.name),
                    });
                }
                Some(_) => {}
                None => count = Some((c, shard.name.to_string())),
            }
        }
        let (count, _) = count.ok_or(ShardError::MissingCount {
            source_name: first.name,
        })?;
        Self::checked(first.index, count)
    }

    fn checked(index: u32, count: u32) -> Result<ShardSpec, ShardError> {
        if count == 0 {
            return Err(ShardError::ZeroCount);
        }
        if index >= count {
            return Err(ShardError::IndexOutOfRange { index, count });
        }
        Ok(ShardSpec { index, count })
    }
}

fn env_shards(env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<EnvShard>, ShardError> {
    let int = |var: &'static str| -> Result<Option<u32>, ShardError> {
        match env(var) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ShardError::BadEnv { var, value: v }),
        }
    };
    let mut found = Vec::new();
    if let Some(index) = int("JOB_COMPLETION_INDEX")? {
        found.push(EnvShard {
            name: "JOB_COMPLETION_INDEX (Kubernetes)",
            index,
            count: None,
        });
    }
    if let Some(index) = int("AWS_BATCH_JOB_ARRAY_INDEX")? {
        found.push(EnvShard {
            name: "AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch)",
            index,
            count: int("AWS_BATCH_JOB_ARRAY_SIZE")?,
        });
    }
    if let Some(id) = int("SLURM_ARRAY_TASK_ID")? {
        let min = int("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = int("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let offset = id
            .checked_sub(min)
            .ok_or(ShardError::SlurmBelowMin { id, min })?;
        found.push(EnvShard {
            name: "SLURM_ARRAY_TASK_ID (Slurm)",
            index: offset / step,
            count: int("SLURM_ARRAY_TASK_COUNT")?,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Explicit index, explicit count, environment, expected result.
    type Case = (
        Option<u32>,
        Option<u32>,
        Vec<(&'static str, &'static str)>,
        Result<ShardSpec, ShardError>,
    );

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn pinned_values_match_the_documented_python() {
        // From the Python one-liner in the module documentation.
        assert_eq!(shard_of("s3://bucket/audio/a.flac", 7), 4);
        assert_eq!(shard_of("s3://bucket/audio/a.flac", 1000), 726);
        assert_eq!(shard_of("/data/x.wav", 7), 1);
        assert_eq!(shard_of("/data/x.wav", 1000), 954);
        assert_eq!(shard_of("gs://b/k/é.mp3", 7), 6);
        assert_eq!(shard_of("gs://b/k/é.mp3", 1000), 124);
        assert_eq!(shard_of("", 1000), 652);
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("anything", 0), 0);
    }

    #[test]
    fn shards_partition_the_inputs() {
        let uris: Vec<String> = (0..5000).map(|i| format!("s3://b/k/{i}.wav")).collect();
        for count in [1u32, 2, 3, 8, 13] {
            let mut seen = vec![0u32; uris.len()];
            let mut sizes = vec![0usize; count as usize];
            for index in 0..count {
                let spec = ShardSpec { index, count };
                for (i, uri) in uris.iter().enumerate() {
                    if spec.owns(uri) {
                        seen[i] += 1;
                        sizes[index as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "count {count}");
            // A good hash spreads 5000 inputs evenly: every shard within 20% of the mean.
            let mean = uris.len() as f64 / f64::from(count);
            for s in sizes {
                assert!(
                    (s as f64 - mean).abs() < 0.2 * mean,
                    "count {count}: {s} vs {mean}"
                );
            }
        }
    }

    #[test]
    fn resolves_from_explicit_values_and_environments() {
        let none = env(&[]);
        let cases: Vec<Case> = vec![
            (None, None, vec![], Ok(ShardSpec::SINGLE)),
            (
                Some(2),
                Some(4),
                vec![("JOB_COMPLETION_INDEX", "1")],
                Ok(ShardSpec { index: 2, count: 4 }),
            ),
            (
                None,
                Some(4),
                vec![("JOB_COMPLETION_INDEX", "3")],
                Ok(ShardSpec { index: 3, count: 4 }),
            ),
            (
                None,
                None,
                vec![("JOB_COMPLETION_INDEX", "3")],
                Err(ShardError::MissingCount {
                    source_name: "JOB_COMPLETION_INDEX (Kubernetes)",
                }),
            ),
            (
                None,
                None,
                vec![
                    ("AWS_BATCH_JOB_ARRAY_INDEX", "5"),
                    ("AWS_BATCH_JOB_ARRAY_SIZE", "10"),
                ],
                Ok(ShardSpec {
                    index: 5,
                    count: 10,
                }),
            ),
            (
                None,
                None,
                vec![
                    ("SLURM_ARRAY_TASK_ID", "7"),
                    ("SLURM_ARRAY_TASK_MIN", "5"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                Ok(ShardSpec { index: 2, count: 4 }),
            ),
            (
                None,
                None,
                vec![
                    ("SLURM_ARRAY_TASK_ID", "9"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "5"),
                ],
                Ok(ShardSpec { index: 4, count: 5 }),
            ),
            (
                None,
                None,
                vec![
                    ("SLURM_ARRAY_TASK_ID", "4"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                Err(ShardError::IndexOutOfRange { index: 4, count: 4 }),
            ),
            (
                None,
                None,
                vec![("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MIN", "2")],
                Err(ShardError::SlurmBelowMin { id: 1, min: 2 }),
            ),
            (
                Some(4),
                Some(4),
                vec![],
                Err(ShardError::IndexOutOfRange { index: 4, count: 4 }),
            ),
            (Some(1), None, vec![], Err(ShardError::IndexWithoutCount)),
            (None, Some(0), vec![], Err(ShardError::ZeroCount)),
            (None, Some(3), vec![], Ok(ShardSpec { index: 0, count: 3 })),
            (
                None,
                None,
                vec![("JOB_COMPLETION_INDEX", "x1")],
                Err(ShardError::BadEnv {
                    var: "JOB_COMPLETION_INDEX",
                    value: "x1".into(),
                }),
            ),
        ];
        for (i, (index, count, vars, want)) in cases.into_iter().enumerate() {
            let got = ShardSpec::resolve(index, count, &env(&vars));
            assert_eq!(got, want, "case {i}: {index:?} {count:?} {vars:?}");
        }
        assert_eq!(ShardSpec::resolve(None, None, &none), Ok(ShardSpec::SINGLE));
    }

    #[test]
    fn disagreeing_environments_are_errors() {
        let two_indices = env(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        let err = ShardSpec::resolve(None, Some(4), &two_indices).unwrap_err();
        assert!(matches!(err, ShardError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("JOB_COMPLETION_INDEX"), "{err}");

        let agree = env(&[
            ("JOB_COMPLETION_INDEX", "2"),
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            ShardSpec::resolve(None, None, &agree),
            Ok(ShardSpec { index: 2, count: 4 })
        );

        let count_clash = env(&[
            ("AWS_BATCH_JOB_ARRAY_INDEX", "1"),
            ("AWS_BATCH_JOB_ARRAY_SIZE", "8"),
        ]);
        let err = ShardSpec::resolve(None, Some(4), &count_clash).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inconsistent shard settings: the explicit shard count is 4 but AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch) gives 8"
        );
    }
}
