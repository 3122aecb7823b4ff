//! The decoder's KV cache as ONNX Runtime values, wherever the model runs.
//!
//! Eager exports grow the cache by concatenation: each step returns new values.
//! Fused exports (`GroupQueryAttention`) keep one preallocated buffer per layer and
//! kind, [rows, kv_heads, capacity, head_dim], bound as both the past input and the
//! present output so each step writes its keys in place. Those buffers must be
//! values ONNX Runtime allocated (`Tensor::new`, or a copy ONNX Runtime made), never
//! views of Rust memory: ort only binds such values to outputs.
//!
//! Continuous batching puts newly prefilled rows into free rows of a running cache
//! with a small graph of `ScatterND` nodes bound in place the same way: only the
//! new rows are written.

use ndarray::Axis;
use ort::memory::{AllocationDevice, Allocator};
use ort::session::Session;
use ort::value::{DynTensorValueType, DynValue, Tensor, TensorElementType, ValueType};

use super::model::{EngineError, Result};
use super::runtime::{DeviceSpec, session_builder};
use crate::export::onnx::{DataType, Dim, Graph};
use crate::manifest::ExportDtype;

fn run_error(source: ort::Error) -> EngineError {
    EngineError::Run {
        graph: "decoder",
        source,
    }
}

/// A zero-filled tensor of `shape` in host memory that ONNX Runtime allocated.
fn host_zeros(dtype: ExportDtype, shape: &[usize]) -> Result<DynValue> {
    let allocator = Allocator::default();
    match dtype {
        ExportDtype::F32 => {
            let mut t = Tensor::<f32>::new(&allocator, shape.to_vec()).map_err(run_error)?;
            t.extract_tensor_mut().1.fill(0.0);
            Ok(t.into_dyn())
        }
        ExportDtype::F16 => {
            let mut t = Tensor::<half::f16>::new(&allocator, shape.to_vec()).map_err(run_error)?;
            t.extract_tensor_mut().1.fill(half::f16::ZERO);
            Ok(t.into_dyn())
        }
    }
}

/// A copy of `value` in `device`'s memory, allocated by ONNX Runtime.
pub fn to_device(value: &DynValue, device: DeviceSpec) -> Result<DynValue> {
    let tensor = value
        .view()
        .downcast::<DynTensorValueType>()
        .map_err(|e| EngineError::Input(format!("cache value is not a tensor: {e}")))?;
    let (kind, id) = match device {
        DeviceSpec::Cpu => (AllocationDevice::CPU, 0),
        DeviceSpec::Cuda(id) => (AllocationDevice::CUDA, id as i32),
    };
    Ok(tensor.to(kind, id).map_err(run_error)?.into_dyn())
}

/// Zero-filled fused-attention buffers for `rows` rows of `capacity` positions: two
/// per layer (key, then value), on `device`.
pub fn zeroed_buffers(
    device: DeviceSpec,
    dtype: ExportDtype,
    layers: usize,
    shape: [usize; 4],
) -> Result<Vec<DynValue>> {
    (0..2 * layers)
        .map(|_| {
            let host = host_zeros(dtype, &shape)?;
            match device {
                DeviceSpec::Cpu => Ok(host),
                DeviceSpec::Cuda(_) => to_device(&host, device),
            }
        })
        .collect()
}

/// Keeps rows `rows` (in that order, repeats allowed) of every cache value along the
/// batch axis: finished sequences leave the batch, beams follow their parents. The
/// result is in host memory that ONNX Runtime allocated, so it can be bound in place.
pub fn select_rows(values: Vec<DynValue>, rows: &[usize]) -> Result<Vec<DynValue>> {
    fn pick<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
        v: &DynValue,
        rows: &[usize],
    ) -> Result<DynValue> {
        let a = v.try_extract_array::<T>().map_err(run_error)?;
        let picked = a.select(Axis(0), rows);
        let mut out =
            Tensor::<T>::new(&Allocator::default(), picked.shape().to_vec()).map_err(run_error)?;
        let (_, data) = out.extract_tensor_mut();
        for (slot, value) in data.iter_mut().zip(picked.iter()) {
            *slot = *value;
        }
        Ok(out.into_dyn())
    }
    values
        .into_iter()
        .map(|v| match v.dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => pick::<half::f16>(&v, rows),
            _ => pick::<f32>(&v, rows),
        })
        .collect()
}

/// Names in the row-insertion graph.
const ROWS: &str = "rows";
fn cache_name(i: usize) -> String {
    format!("cache.{i}")
}
fn update_name(i: usize) -> String {
    format!("update.{i}")
}

/// Writes whole rows of fused-attention buffers in place: `cache.{i}` [R, kv, C, D]
/// (bound as input and output), `update.{i}` [n, kv, C, D], `rows` [n, 1] int64.
pub struct RowInserter {
    session: Session,
    values: usize,
}

impl RowInserter {
    /// The graph for `values` cache tensors (two per layer) of `float`'s type.
    pub fn new(
        device: DeviceSpec,
        dtype: ExportDtype,
        values: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let float = match dtype {
            ExportDtype::F32 => DataType::Float,
            ExportDtype::F16 => DataType::Float16,
        };
        let mut g = Graph::new("insert_rows", float);
        let rows = g.input(ROWS, DataType::Int64, &[Dim::named("n"), Dim::Fixed(1)]);
        let dims = |batch: &str| {
            vec![
                Dim::named(batch),
                Dim::Fixed(kv_heads),
                Dim::named("capacity"),
                Dim::Fixed(head_dim),
            ]
        };
        for i in 0..values {
            let cache = g.input(&cache_name(i), float, &dims("rows"));
            let update = g.input(&update_name(i), float, &dims("n"));
            let out = g.op("ScatterND", &[&cache, &rows, &update], vec![]);
            g.output(
                &out,
                &format!("{}.out", cache_name(i)),
                float,
                &dims("rows"),
            );
        }
        let bytes = g
            .into_bytes(env!("CARGO_PKG_VERSION"))
            .map_err(|e| EngineError::Input(format!("building the row-insertion graph: {e}")))?;
        let session = session_builder(&device, Some(1))?
            .commit_from_memory(&bytes)
            .map_err(run_error)?;
        Ok(Self { session, values })
    }

    /// Copies row `i` of every `update` value into row `rows[i]` of the matching
    /// `cache` value, in place; returns the cache values.
    pub fn insert(
        &mut self,
        mut cache: Vec<DynValue>,
        update: &[DynValue],
        rows: &[usize],
    ) -> Result<Vec<DynValue>> {
        if cache.len() != self.values || update.len() != self.values {
            return Err(EngineError::Input(format!(
                "inserting rows: {} cache and {} update values, expected {}",
                cache.len(),
                update.len(),
                self.values
            )));
        }
        let indices: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let indices = Tensor::from_array((vec![rows.len(), 1], indices))
            .map_err(run_error)?
            .into_dyn();
        let mut binding = self.session.create_binding().map_err(run_error)?;
        binding.bind_input(ROWS, &indices).map_err(run_error)?;
        for (i, (c, u)) in cache.iter_mut().zip(update).enumerate() {
            binding.bind_input(cache_name(i), c).map_err(run_error)?;
            binding.bind_input(update_name(i), u).map_err(run_error)?;
            binding
                .bind_output(format!("{}.out", cache_name(i)), c)
                .map_err(run_error)?;
        }
        let outputs = self.session.run_binding(&binding).map_err(run_error)?;
        drop(outputs);
        drop(binding);
        Ok(cache)
    }
}
