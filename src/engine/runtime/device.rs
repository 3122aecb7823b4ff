//! The devices sessions run on, as the command line and pipeline files name them:
//! `cpu`, `cuda` (device 0) or `cuda:N`.

use std::fmt;
use std::str::FromStr;

/// A device to run sessions on: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// The CUDA execution provider on this device index.
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(id) => write!(f, "cuda:{id}"),
        }
    }
}

/// A device string that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device `{given}`: expected `cpu`, `cuda` (CUDA device 0) or `cuda:N` \
     (CUDA device index N, e.g. `cuda:1`)"
)]
pub struct ParseDeviceError {
    /// The string that was given.
    pub given: String,
}

impl FromStr for DeviceSpec {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseDeviceError {
            given: s.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                // `usize::from_str` accepts a leading `+`; a device index is plain digits.
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                index.parse().map(Self::Cuda).map_err(|_| invalid())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses_the_valid_forms() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CPU".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(" cuda:12 ".parse(), Ok(DeviceSpec::Cuda(12)));
        for s in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            assert_eq!(s.to_string().parse(), Ok(s));
        }
    }

    #[test]
    fn device_spec_rejects_others_and_lists_the_valid_forms() {
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda0",
            "cuda:1:2",
            "cpu:0",
            "cuda:99999999999999999999999",
        ] {
            let err = bad.parse::<DeviceSpec>().expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{bad}`")), "{msg}");
            for form in ["`cpu`", "`cuda`", "`cuda:N`"] {
                assert!(msg.contains(form), "{msg}");
            }
        }
    }
}
