//! Running sessions where the model runs: values copied between the host and the
//! device, runs whose outputs stay bound in device memory, and sessions for the small
//! helper graphs the engine builds at run time (cache rows, prompts, audio queues).
//!
//! Failures copying a value or describing device memory are reported against the
//! `decoder` graph, whose cache they nearly always concern.

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensorValueType, DynValue};

use super::error::{EngineError, Result, run_error};
use super::runtime::session_builder;
use crate::config::DeviceSpec;
use crate::onnx::Graph;

/// A copy of `value` in `device`'s memory, allocated by ONNX Runtime.
pub(super) fn to_device(value: &DynValue, device: DeviceSpec) -> Result<DynValue> {
    let tensor = value
        .view()
        .downcast::<DynTensorValueType>()
        .map_err(|e| EngineError::Input(format!("cache value is not a tensor: {e}")))?;
    let (kind, id) = location(device);
    Ok(tensor
        .to(kind, id)
        .map_err(run_error("decoder"))?
        .into_dyn())
}

/// Where ONNX Runtime allocates for `device`.
fn location(device: DeviceSpec) -> (AllocationDevice<'static>, i32) {
    match device {
        DeviceSpec::Cpu => (AllocationDevice::CPU, 0),
        DeviceSpec::Cuda(id) => (AllocationDevice::CUDA, id as i32),
    }
}

/// Device memory of `device`, for outputs bound where the model runs.
pub(super) fn device_memory(device: DeviceSpec) -> Result<MemoryInfo<'static>> {
    let (kind, id) = location(device);
    MemoryInfo::new(kind, id, AllocatorType::Device, MemoryType::Default)
        .map_err(run_error("decoder"))
}

/// A session for a small helper graph built at run time (weights inline), on
/// `device`, one thread: it moves or reshapes values, it computes next to nothing.
pub(super) fn helper_session(g: Graph, device: DeviceSpec, what: &str) -> Result<Session> {
    let bytes = g
        .into_bytes(env!("CARGO_PKG_VERSION"))
        .map_err(|e| EngineError::Input(format!("building the {what} graph: {e}")))?;
    session_builder(&device, Some(1))?
        .commit_from_memory(&bytes)
        .map_err(|source| EngineError::Load {
            path: format!("<{what} graph>").into(),
            source,
        })
}

/// Runs a session with `inputs` bound as they are and `outputs` allocated where the
/// model runs (`device`): nothing returns to the host. The outputs come back in order.
pub(super) fn run_bound(
    session: &mut Session,
    graph: &'static str,
    device: DeviceSpec,
    inputs: &[(String, &DynValue)],
    outputs: &[String],
) -> Result<Vec<DynValue>> {
    let fail = |source| EngineError::Run { graph, source };
    let memory = device_memory(device)?;
    let mut binding = session.create_binding().map_err(fail)?;
    for (name, value) in inputs {
        binding.bind_input(name, value).map_err(fail)?;
    }
    for name in outputs {
        binding.bind_output_to_device(name, &memory).map_err(fail)?;
    }
    let mut results = session.run_binding(&binding).map_err(fail)?;
    outputs
        .iter()
        .map(|name| {
            results
                .remove(name.as_str())
                .ok_or_else(|| EngineError::MissingOutput {
                    graph,
                    name: name.clone(),
                })
        })
        .collect()
}
