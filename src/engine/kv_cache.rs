//! The decoder's KV cache as ONNX Runtime values, wherever the model runs.
//!
//! Eager exports grow the cache by concatenation: each step returns new values.
//! Fused exports (`GroupQueryAttention`) keep one preallocated buffer per layer and
//! kind, [rows, kv_heads, capacity, head_dim], bound as both the past input and the
//! present output so each step writes its keys in place. Those buffers are made zeroed
//! by a small graph where the model runs ([`ZeroFiller`]): ort binds only values ONNX
//! Runtime allocated to outputs, never views of Rust memory.
//!
//! Continuous batching puts newly prefilled rows into free rows of a running cache
//! with a small graph of `ScatterND` nodes bound in place the same way: only the
//! new rows are written. Beam search and finished rows leaving a batch pick rows with
//! a graph of `Gather` nodes: the cache never leaves the device.

use ort::session::Session;
use ort::value::{DynValue, Tensor};

use super::error::{EngineError, Result, run_error};
use super::session::{helper_session, run_bound};
use crate::config::DeviceSpec;
use crate::manifest::ExportDtype;
use crate::onnx::{DataType, Dim, Graph};

/// What the row helpers need to know about a model's cache: where it lives, its
/// element type, how many values (two per layer) and their fixed dimensions.
#[derive(Debug, Clone, Copy)]
pub struct CacheLayout {
    pub device: DeviceSpec,
    pub dtype: ExportDtype,
    pub values: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CacheLayout {
    fn float(&self) -> DataType {
        match self.dtype {
            ExportDtype::F32 => DataType::Float,
            ExportDtype::F16 => DataType::Float16,
        }
    }

    /// [batch, kv_heads, positions, head_dim] with the two free dimensions named.
    fn dims(&self, batch: &str, positions: &str) -> Vec<Dim> {
        vec![
            Dim::named(batch),
            Dim::Fixed(self.kv_heads),
            Dim::named(positions),
            Dim::Fixed(self.head_dim),
        ]
    }

    /// A session for a helper graph built at run time, on the cache's device.
    fn session(&self, g: Graph, what: &str) -> Result<Session> {
        helper_session(g, self.device, what)
    }
}

/// Zero-filled fused-attention buffers made where the model runs: `shape` [4] int64
/// ([rows, kv_heads, capacity, head_dim]) → `zeros.{i}`, two per layer. On a GPU the
/// fill is a device kernel: no host memory to clear and copy over (a prefill of 32
/// rows of an 8B model's cache is 155 MB), and every admission of a new batch size
/// needs fresh buffers. Zeros, not whatever the allocator hands out: the attention
/// kernel reads whole blocks past a row's length, and masked garbage that happens to
/// be NaN would still poison the softmax's weighted sum.
pub struct ZeroFiller {
    session: Session,
    values: usize,
    device: DeviceSpec,
}

impl ZeroFiller {
    pub fn new(layout: CacheLayout) -> Result<Self> {
        let float = layout.float();
        let mut g = Graph::new("zero_cache", float);
        let shape = g.input(SHAPE, DataType::Int64, &[Dim::Fixed(4)]);
        let zero = g.scalar(0.0);
        for i in 0..layout.values {
            let zeros = g.op("Expand", &[&zero, &shape], vec![]);
            g.output(
                &zeros,
                &zeros_name(i),
                float,
                &layout.dims("rows", "capacity"),
            );
        }
        Ok(Self {
            session: layout.session(g, "cache-zeroing")?,
            values: layout.values,
            device: layout.device,
        })
    }

    /// Zeroed buffers of `shape`, where the model runs.
    pub fn zeros(&mut self, shape: [usize; 4]) -> Result<Vec<DynValue>> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let dims = Tensor::from_array((vec![4usize], dims))
            .map_err(run_error("decoder"))?
            .into_dyn();
        let outputs: Vec<String> = (0..self.values).map(zeros_name).collect();
        run_bound(
            &mut self.session,
            "zero_cache",
            self.device,
            &[(SHAPE.to_string(), &dims)],
            &outputs,
        )
    }
}

const SHAPE: &str = "shape";
fn zeros_name(i: usize) -> String {
    format!("zeros.{i}")
}

/// Keeps rows of every cache value on the device they are on: `cache.{i}` [R, ...],
/// `rows` [n] int64 → `picked.{i}` [n, ...].
pub struct RowGatherer {
    session: Session,
    values: usize,
    device: DeviceSpec,
}

impl RowGatherer {
    pub fn new(layout: CacheLayout) -> Result<Self> {
        let float = layout.float();
        let mut g = Graph::new("gather_rows", float);
        let rows = g.input(ROWS, DataType::Int64, &[Dim::named("n")]);
        for i in 0..layout.values {
            let cache = g.input(&cache_name(i), float, &layout.dims("rows", "positions"));
            let picked = g.gather(&cache, &rows, 0);
            g.output(
                &picked,
                &picked_name(i),
                float,
                &layout.dims("n", "positions"),
            );
        }
        Ok(Self {
            session: layout.session(g, "row-gather")?,
            values: layout.values,
            device: layout.device,
        })
    }

    /// Rows `rows` (in that order, repeats allowed) of every value, as new values
    /// where the model runs.
    pub fn gather(&mut self, cache: Vec<DynValue>, rows: &[usize]) -> Result<Vec<DynValue>> {
        if cache.len() != self.values {
            return Err(EngineError::Input(format!(
                "gathering rows: {} cache values, expected {}",
                cache.len(),
                self.values
            )));
        }
        let indices: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let indices = Tensor::from_array((vec![rows.len()], indices))
            .map_err(run_error("decoder"))?
            .into_dyn();
        let mut inputs = vec![(ROWS.to_string(), &indices)];
        inputs.extend(cache.iter().enumerate().map(|(i, c)| (cache_name(i), c)));
        let outputs: Vec<String> = (0..self.values).map(picked_name).collect();
        run_bound(
            &mut self.session,
            "gather_rows",
            self.device,
            &inputs,
            &outputs,
        )
    }
}

fn picked_name(i: usize) -> String {
    format!("picked.{i}")
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
    pub fn new(layout: CacheLayout) -> Result<Self> {
        let float = layout.float();
        let mut g = Graph::new("insert_rows", float);
        let rows = g.input(ROWS, DataType::Int64, &[Dim::named("n"), Dim::Fixed(1)]);
        for i in 0..layout.values {
            let cache = g.input(&cache_name(i), float, &layout.dims("rows", "capacity"));
            let update = g.input(&update_name(i), float, &layout.dims("n", "capacity"));
            let out = g.op("ScatterND", &[&cache, &rows, &update], vec![]);
            let name = format!("{}.out", cache_name(i));
            g.output(&out, &name, float, &layout.dims("rows", "capacity"));
        }
        Ok(Self {
            session: layout.session(g, "row-insertion")?,
            values: layout.values,
        })
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
            .map_err(run_error("decoder"))?
            .into_dyn();
        let mut binding = self
            .session
            .create_binding()
            .map_err(run_error("decoder"))?;
        binding
            .bind_input(ROWS, &indices)
            .map_err(run_error("decoder"))?;
        for (i, (c, u)) in cache.iter_mut().zip(update).enumerate() {
            binding
                .bind_input(cache_name(i), c)
                .map_err(run_error("decoder"))?;
            binding
                .bind_input(update_name(i), u)
                .map_err(run_error("decoder"))?;
            binding
                .bind_output(format!("{}.out", cache_name(i)), c)
                .map_err(run_error("decoder"))?;
        }
        let outputs = self
            .session
            .run_binding(&binding)
            .map_err(run_error("decoder"))?;
        drop(outputs);
        drop(binding);
        Ok(cache)
    }
}
