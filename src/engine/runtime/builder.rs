//! Session builders for a device: the execution providers it takes, each asked for
//! with `error_on_failure`, so CUDA never falls back to the CPU without a word.

use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::Session;
use ort::session::builder::{AutoDevicePolicy, SessionBuilder};

use super::library::{RuntimeError, runtime};
use crate::config::DeviceSpec;

/// The execution providers for `device`, each with `error_on_failure`: a device that
/// cannot be used is an error, never a silent fall-back to the CPU.
pub fn execution_providers(
    device: &DeviceSpec,
) -> Result<Vec<ExecutionProviderDispatch>, RuntimeError> {
    match *device {
        // ort's `CPU::default()` turns ONNX Runtime's CPU memory arena *off*; without
        // it every large intermediate (the encoder's attention scores are tens of MB per
        // batch) is a fresh mmap whose pages fault in on every run: half the CPU time
        // went to the kernel and `audiocap run` ran at half speed.
        DeviceSpec::Cpu => Ok(vec![
            ep::CPU::default()
                .with_arena_allocator(true)
                .build()
                .error_on_failure(),
        ]),
        DeviceSpec::Cuda(index) => {
            let id = i32::try_from(index).map_err(|_| RuntimeError::DeviceIndex(index))?;
            Ok(vec![
                ep::CUDA::default()
                    .with_device_id(id)
                    // f32 exports compute in f32: TF32 matmuls (10-bit mantissa) flip
                    // greedy choices whose logits are ~1e-3 apart. f16 exports are
                    // unaffected; speed work belongs in the f16 path.
                    .with_tf32(false)
                    .build()
                    .error_on_failure(),
            ])
        }
    }
}

/// A session builder in the process's environment for `device`, with `intra_threads`
/// threads inside each operator (`None`: ONNX Runtime's default, one per core). Commit
/// it with `commit_from_file`. Loads ONNX Runtime first if need be.
///
/// No execution provider is chosen automatically: the session runs on `device` or this
/// returns an error (a CPU-only library, or a CUDA provider that fails to register).
pub fn session_builder(
    device: &DeviceSpec,
    intra_threads: Option<usize>,
) -> Result<SessionBuilder, RuntimeError> {
    let rt = runtime()?;
    if matches!(device, DeviceSpec::Cuda(_)) && !rt.info.cuda_available {
        return Err(RuntimeError::CudaNotInBuild {
            device: *device,
            library: rt.info.library.clone(),
        });
    }
    let providers = execution_providers(device)?;

    let builder = Session::builder(&rt.environment)
        .map_err(|e| session_error("create the session options", e))?;
    let builder = builder
        .with_auto_device(AutoDevicePolicy::PreferCPU)
        .map_err(|e| session_error("turn off automatic device selection", e))?;
    let builder = match intra_threads {
        Some(threads) => builder
            .with_intra_threads(threads)
            .map_err(|e| session_error("intra-op threads", e))?,
        None => builder,
    };
    builder
        .with_execution_providers(providers)
        .map_err(|e| match device {
            DeviceSpec::Cuda(_) => RuntimeError::Cuda {
                device: *device,
                source: detach(e),
            },
            DeviceSpec::Cpu => session_error("CPU execution provider", e),
        })
}

fn session_error<R>(what: &'static str, e: ort::Error<R>) -> RuntimeError {
    RuntimeError::Session {
        what,
        source: detach(e),
    }
}

/// An `ort` error without the builder it hands back on failure (which is not `Send`).
fn detach<R>(e: ort::Error<R>) -> ort::Error {
    ort::Error::new_with_code(e.code(), e.message().trim_end())
}
