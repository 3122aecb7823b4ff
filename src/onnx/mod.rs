//! A small ONNX graph builder over the prost messages in [`proto`].
//!
//! Graphs are built op by op with generated value names; weights come from candle
//! tensors and are written either inline or, for models past protobuf's 2 GB limit,
//! streamed to an external-data file as they are added (so an 8B-parameter model is
//! never held in memory as a whole).
//!
//! `export` builds the model's graphs with it and `engine` the small helper graphs it
//! runs beside them (cache rows, prompts); it uses nothing else of the crate.

pub mod proto;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use prost::Message;

pub use proto::DataType;
use proto::*;

/// The opset the exporter targets: 18 takes reduction axes as inputs, and has
/// LayerNormalization (17).
pub const OPSET: i64 = 18;
/// IR version that goes with opset 18 (ONNX 1.13).
pub const IR_VERSION: i64 = 8;
/// ONNX Runtime's contrib operators (version 1 of the domain).
pub const CONTRIB_DOMAIN: &str = "com.microsoft";
/// Protobuf cannot serialise messages past 2 GiB; models near that go external.
pub const INLINE_LIMIT_BYTES: u64 = 1_800_000_000;
/// Tensors smaller than this stay inline even in an external-data model.
const EXTERNAL_MIN_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("weight `{name}`: {source}")]
    Tensor {
        name: String,
        source: Box<candle_core::Error>,
    },
    #[error(
        "the model's inline data is {bytes} bytes, past protobuf's 2 GB limit; export with external data"
    )]
    TooLarge { bytes: u64 },
}

pub type Result<T> = std::result::Result<T, OnnxError>;

/// A named value in a graph (an input, an initializer or a node output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value(pub String);

impl Value {
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// One dimension of a graph input or output.
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(usize),
    /// A symbolic dimension (`batch`, `sequence`, ...).
    Named(String),
}

impl Dim {
    pub fn named(name: &str) -> Self {
        Dim::Named(name.to_string())
    }
}

/// Where large initializers go.
struct ExternalData {
    /// The data file, relative to the model file (what the model records).
    location: String,
    path: PathBuf,
    writer: BufWriter<File>,
    offset: u64,
}

/// A graph under construction.
pub struct Graph {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next_id: usize,
    /// Element type of weights and floating-point activations.
    float: DataType,
    external: Option<ExternalData>,
    inline_bytes: u64,
    scope: String,
    /// Initializer names in use (ONNX requires them unique).
    names: std::collections::HashSet<String>,
    /// Node outputs renamed to graph outputs (see [`Graph::output`]): old → new.
    aliases: std::collections::HashMap<String, String>,
}

impl Graph {
    /// A graph whose weights are stored inline.
    pub fn new(name: &str, float: DataType) -> Self {
        Self {
            name: name.to_string(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            next_id: 0,
            float,
            external: None,
            inline_bytes: 0,
            scope: String::new(),
            names: std::collections::HashSet::new(),
            aliases: std::collections::HashMap::new(),
        }
    }

    /// A graph whose large weights are streamed to `data_path` (beside the model file
    /// it will be saved as) while the graph is built.
    pub fn with_external_data(name: &str, float: DataType, data_path: &Path) -> Result<Self> {
        let file = File::create(data_path).map_err(|source| OnnxError::Io {
            path: data_path.to_path_buf(),
            source,
        })?;
        let location = data_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut graph = Self::new(name, float);
        graph.external = Some(ExternalData {
            location,
            path: data_path.to_path_buf(),
            writer: BufWriter::with_capacity(8 << 20, file),
            offset: 0,
        });
        Ok(graph)
    }

    /// Element type of floating-point values in this graph.
    pub fn float(&self) -> DataType {
        self.float
    }

    /// Prefixes generated names with `scope` (readability of the exported graph).
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        if self.scope.is_empty() {
            format!("{hint}_{}", self.next_id)
        } else {
            format!("{}/{hint}_{}", self.scope, self.next_id)
        }
    }

    pub fn input(&mut self, name: &str, dtype: DataType, dims: &[Dim]) -> Value {
        self.inputs.push(value_info(name, dtype, dims));
        Value(name.to_string())
    }

    /// The name a value has now (a node output may have been renamed to a graph
    /// output's name).
    fn resolve(&self, name: &str) -> String {
        let mut current = name;
        while let Some(next) = self.aliases.get(current) {
            current = next;
        }
        current.to_string()
    }

    /// Declares `value` as the graph output `name`. A node's output is renamed
    /// rather than copied by an Identity node: a copy of a graph output that other
    /// nodes also read (the logits, an eager KV cache) would cost a full pass over it
    /// on every run, since ONNX Runtime cannot remove it.
    pub fn output(&mut self, value: &Value, name: &str, dtype: DataType, dims: &[Dim]) {
        let current = self.resolve(&value.0);
        let produced = self.nodes.iter().any(|n| n.output.contains(&current));
        let already_output = self.outputs.iter().any(|o| o.name == current);
        if current != name && produced && !already_output && !self.names.contains(name) {
            for node in &mut self.nodes {
                for slot in node.input.iter_mut().chain(node.output.iter_mut()) {
                    if *slot == current {
                        *slot = name.to_string();
                    }
                }
            }
            self.aliases.insert(current, name.to_string());
        } else if current != name {
            self.nodes.push(NodeProto {
                input: vec![current],
                output: vec![name.to_string()],
                name: format!("output/{name}"),
                op_type: "Identity".into(),
                ..Default::default()
            });
        }
        self.outputs.push(value_info(name, dtype, dims));
    }

    /// An initializer from raw little-endian bytes.
    pub fn initializer(
        &mut self,
        name: &str,
        dtype: DataType,
        dims: &[usize],
        bytes: Vec<u8>,
    ) -> Result<Value> {
        let name = self.unique(name);
        let mut tensor = TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype as i32,
            name: name.clone(),
            ..Default::default()
        };
        match &mut self.external {
            Some(ext) if bytes.len() >= EXTERNAL_MIN_BYTES => {
                // Align each tensor to 4 KiB so runtimes can map it directly.
                let pad = (4096 - ext.offset % 4096) % 4096;
                let io_err = |source| OnnxError::Io {
                    path: ext.path.clone(),
                    source,
                };
                ext.writer
                    .write_all(&vec![0u8; pad as usize])
                    .map_err(io_err)?;
                ext.offset += pad;
                ext.writer
                    .write_all(&bytes)
                    .map_err(|source| OnnxError::Io {
                        path: ext.path.clone(),
                        source,
                    })?;
                tensor.data_location = 1;
                tensor.external_data = vec![
                    entry("location", &ext.location),
                    entry("offset", &ext.offset.to_string()),
                    entry("length", &bytes.len().to_string()),
                ];
                ext.offset += bytes.len() as u64;
            }
            _ => {
                self.inline_bytes += bytes.len() as u64;
                tensor.raw_data = bytes;
            }
        }
        self.initializers.push(tensor);
        Ok(Value(name))
    }

    /// `name`, or `name_2`, `name_3`, ... if it is taken.
    fn unique(&mut self, name: &str) -> String {
        let mut candidate = name.to_string();
        let mut n = 1;
        while !self.names.insert(candidate.clone()) {
            n += 1;
            candidate = format!("{name}_{n}");
        }
        candidate
    }

    /// A weight from a candle tensor, stored in the graph's float type.
    pub fn weight(&mut self, name: &str, tensor: &Tensor) -> Result<Value> {
        let bytes = tensor_bytes(tensor, self.float).map_err(|source| OnnxError::Tensor {
            name: name.to_string(),
            source: Box::new(source),
        })?;
        let dims = tensor.dims().to_vec();
        let float = self.float;
        self.initializer(name, float, &dims, bytes)
    }

    /// A weight stored in f32 whatever the graph's float type (normalisation
    /// parameters, which are applied in f32).
    pub fn weight_f32(&mut self, name: &str, tensor: &Tensor) -> Result<Value> {
        let bytes = tensor_bytes(tensor, DataType::Float).map_err(|source| OnnxError::Tensor {
            name: name.to_string(),
            source: Box::new(source),
        })?;
        let dims = tensor.dims().to_vec();
        self.initializer(name, DataType::Float, &dims, bytes)
    }

    /// A 1-D int64 constant.
    pub fn const_i64(&mut self, values: &[i64]) -> Value {
        let name = self.fresh("const");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_const(&name, DataType::Int64, &[values.len()], bytes)
    }

    /// A scalar (0-D) int64 constant.
    pub fn scalar_i64(&mut self, value: i64) -> Value {
        let name = self.fresh("const");
        self.push_const(&name, DataType::Int64, &[], value.to_le_bytes().to_vec())
    }

    /// A scalar (0-D) constant of the graph's float type.
    pub fn scalar(&mut self, value: f32) -> Value {
        let name = self.fresh("const");
        let float = self.float;
        self.push_const(&name, float, &[], float_bytes(&[value], float))
    }

    /// A scalar (0-D) f32 constant.
    pub fn scalar_f32(&mut self, value: f32) -> Value {
        let name = self.fresh("const");
        self.push_const(&name, DataType::Float, &[], value.to_le_bytes().to_vec())
    }

    /// A float constant of any shape in the given type.
    pub fn const_float(&mut self, values: &[f32], dims: &[usize], dtype: DataType) -> Value {
        let name = self.fresh("const");
        self.push_const(&name, dtype, dims, float_bytes(values, dtype))
    }

    fn push_const(&mut self, name: &str, dtype: DataType, dims: &[usize], bytes: Vec<u8>) -> Value {
        let name = self.unique(name);
        self.inline_bytes += bytes.len() as u64;
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype as i32,
            name: name.clone(),
            raw_data: bytes,
            ..Default::default()
        });
        Value(name)
    }

    /// A node with one output.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
    ) -> Value {
        self.op_n(op_type, inputs, attributes, 1).remove(0)
    }

    /// A node with `outputs` outputs.
    pub fn op_n(
        &mut self,
        op_type: &str,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
        outputs: usize,
    ) -> Vec<Value> {
        self.op_in_domain("", op_type, inputs, attributes, outputs)
    }

    /// A node of ONNX Runtime's contrib domain (`com.microsoft`, e.g.
    /// `GroupQueryAttention`) with `outputs` outputs. The model then imports that
    /// domain too.
    pub fn contrib_op(
        &mut self,
        op_type: &str,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
        outputs: usize,
    ) -> Vec<Value> {
        self.op_in_domain(CONTRIB_DOMAIN, op_type, inputs, attributes, outputs)
    }

    fn op_in_domain(
        &mut self,
        domain: &str,
        op_type: &str,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
        outputs: usize,
    ) -> Vec<Value> {
        let node_name = self.fresh(op_type);
        let outs: Vec<String> = (0..outputs).map(|i| format!("{node_name}:{i}")).collect();
        let inputs = inputs.iter().map(|v| self.resolve(&v.0)).collect();
        self.nodes.push(NodeProto {
            input: inputs,
            output: outs.clone(),
            name: node_name,
            op_type: op_type.to_string(),
            domain: domain.to_string(),
            attribute: attributes,
            ..Default::default()
        });
        outs.into_iter().map(Value).collect()
    }

    // Element-wise and shape helpers, one ONNX op each.

    pub fn add(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Div", &[a, b], vec![])
    }
    pub fn matmul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("MatMul", &[a, b], vec![])
    }
    pub fn neg(&mut self, x: &Value) -> Value {
        self.op("Neg", &[x], vec![])
    }
    pub fn sigmoid(&mut self, x: &Value) -> Value {
        self.op("Sigmoid", &[x], vec![])
    }
    pub fn cast(&mut self, x: &Value, to: DataType) -> Value {
        self.op("Cast", &[x], vec![attr_int("to", to as i64)])
    }
    pub fn shape(&mut self, x: &Value) -> Value {
        self.op("Shape", &[x], vec![])
    }
    pub fn reshape(&mut self, x: &Value, shape: &Value) -> Value {
        self.op("Reshape", &[x, shape], vec![])
    }
    /// Reshape to a constant shape (0 copies the input's dim, -1 infers one dim).
    pub fn reshape_to(&mut self, x: &Value, shape: &[i64]) -> Value {
        let s = self.const_i64(shape);
        self.reshape(x, &s)
    }
    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Value {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)])
    }
    pub fn softmax(&mut self, x: &Value, axis: i64) -> Value {
        self.op("Softmax", &[x], vec![attr_int("axis", axis)])
    }
    pub fn concat(&mut self, xs: &[&Value], axis: i64) -> Value {
        self.op("Concat", xs, vec![attr_int("axis", axis)])
    }
    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        let a = self.const_i64(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }
    pub fn squeeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        let a = self.const_i64(axes);
        self.op("Squeeze", &[x, &a], vec![])
    }
    /// `x[start:end]` along `axis` with constant bounds.
    pub fn slice(&mut self, x: &Value, axis: i64, start: i64, end: i64) -> Value {
        let s = self.const_i64(&[start]);
        let e = self.const_i64(&[end]);
        let a = self.const_i64(&[axis]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }
    /// `x[start:end]` along `axis` with bounds computed in the graph (1-D int64 of length 1).
    pub fn slice_dynamic(&mut self, x: &Value, axis: i64, start: &Value, end: &Value) -> Value {
        let a = self.const_i64(&[axis]);
        self.op("Slice", &[x, start, end, &a], vec![])
    }
    pub fn gather(&mut self, data: &Value, indices: &Value, axis: i64) -> Value {
        self.op("Gather", &[data, indices], vec![attr_int("axis", axis)])
    }
    /// Dimension `axis` of `x` as a 1-D int64 tensor of length 1.
    pub fn dim(&mut self, x: &Value, axis: i64) -> Value {
        let shape = self.shape(x);
        let idx = self.const_i64(&[axis]);
        self.gather(&shape, &idx, 0)
    }
    pub fn reduce_mean(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let a = self.const_i64(axes);
        self.op(
            "ReduceMean",
            &[x, &a],
            vec![attr_int("keepdims", keepdims as i64)],
        )
    }
    pub fn reduce_sum(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let a = self.const_i64(axes);
        self.op(
            "ReduceSum",
            &[x, &a],
            vec![attr_int("keepdims", keepdims as i64)],
        )
    }
    pub fn reduce_max(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let a = self.const_i64(axes);
        self.op(
            "ReduceMax",
            &[x, &a],
            vec![attr_int("keepdims", keepdims as i64)],
        )
    }
    pub fn where_(&mut self, condition: &Value, a: &Value, b: &Value) -> Value {
        self.op("Where", &[condition, a, b], vec![])
    }
    /// `[start, start+1, ..., end)` as int64, bounds as 0-D int64 values.
    pub fn range(&mut self, start: &Value, end: &Value) -> Value {
        let one = self.scalar_i64(1);
        self.op("Range", &[start, end, &one], vec![])
    }

    /// `x @ W^T + b` for a torch-layout weight [out, in] (stored transposed as [in, out]).
    pub fn linear(
        &mut self,
        x: &Value,
        name: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Value> {
        let wt = weight
            .t()
            .and_then(|t| t.contiguous())
            .map_err(|source| OnnxError::Tensor {
                name: format!("{name}.weight"),
                source: Box::new(source),
            })?;
        let w = self.weight(&format!("{name}.weight"), &wt)?;
        let y = self.matmul(x, &w);
        match bias {
            Some(b) => {
                let b = self.weight(&format!("{name}.bias"), b)?;
                Ok(self.add(&y, &b))
            }
            None => Ok(y),
        }
    }

    /// LayerNormalization over the last axis, computed in f32.
    pub fn layer_norm(
        &mut self,
        x: &Value,
        name: &str,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> Result<Value> {
        let w = self.weight_f32(&format!("{name}.weight"), weight)?;
        let b = self.weight_f32(&format!("{name}.bias"), bias)?;
        let x32 = self.to_f32(x);
        let y = self.op(
            "LayerNormalization",
            &[&x32, &w, &b],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
        );
        Ok(self.from_f32(&y))
    }

    /// Exact GELU: `0.5 · x · (1 + erf(x / √2))`.
    pub fn gelu_erf(&mut self, x: &Value) -> Value {
        let sqrt2 = self.scalar(std::f32::consts::SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let scaled = self.div(x, &sqrt2);
        let erf = self.op("Erf", &[&scaled], vec![]);
        let shifted = self.add(&erf, &one);
        let prod = self.mul(x, &shifted);
        self.mul(&prod, &half)
    }

    /// Casts a graph-float value to f32 (no-op node when already f32).
    pub fn to_f32(&mut self, x: &Value) -> Value {
        if self.float == DataType::Float {
            x.clone()
        } else {
            self.cast(x, DataType::Float)
        }
    }

    /// Casts an f32 value back to the graph's float type.
    pub fn from_f32(&mut self, x: &Value) -> Value {
        if self.float == DataType::Float {
            x.clone()
        } else {
            let float = self.float;
            self.cast(x, float)
        }
    }

    /// Finishes the graph as a model and writes it to `path` (with its external
    /// data file, if any, flushed). Returns the files written.
    pub fn save(
        mut self,
        path: &Path,
        producer_version: &str,
        metadata: &[(String, String)],
    ) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        if let Some(mut ext) = self.external.take() {
            ext.writer.flush().map_err(|source| OnnxError::Io {
                path: ext.path.clone(),
                source,
            })?;
            files.push(ext.path);
        }
        let bytes = self.encode(producer_version, metadata)?;
        std::fs::write(path, bytes).map_err(|source| OnnxError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        files.insert(0, path.to_path_buf());
        Ok(files)
    }

    /// The model's bytes, for a graph whose weights are all inline (a small helper
    /// graph built at run time, loaded from memory).
    pub fn into_bytes(self, producer_version: &str) -> Result<Vec<u8>> {
        self.encode(producer_version, &[])
    }

    fn encode(self, producer_version: &str, metadata: &[(String, String)]) -> Result<Vec<u8>> {
        if self.inline_bytes > INLINE_LIMIT_BYTES {
            return Err(OnnxError::TooLarge {
                bytes: self.inline_bytes,
            });
        }
        let mut opset_import = vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }];
        if self.nodes.iter().any(|n| n.domain == CONTRIB_DOMAIN) {
            opset_import.push(OperatorSetIdProto {
                domain: CONTRIB_DOMAIN.into(),
                version: 1,
            });
        }
        let model = ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: "audiocap".into(),
            producer_version: producer_version.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata.iter().map(|(k, v)| entry(k, v)).collect(),
            ..Default::default()
        };
        Ok(model.encode_to_vec())
    }
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

fn value_info(name: &str, dtype: DataType, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: dtype as i32,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(n) => DimensionValue::DimValue(*n as i64),
                                Dim::Named(s) => DimensionValue::DimParam(s.clone()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

/// Little-endian bytes of `values` in `dtype` (f32 or f16).
fn float_bytes(values: &[f32], dtype: DataType) -> Vec<u8> {
    match dtype {
        DataType::Float16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The tensor's values as little-endian bytes of `dtype`.
fn tensor_bytes(tensor: &Tensor, dtype: DataType) -> candle_core::Result<Vec<u8>> {
    // candle's safetensors view hands out the storage as bytes without a per-element
    // loop (the exporter converts billions of elements).
    use safetensors::View;
    let target = match dtype {
        DataType::Float16 => DType::F16,
        _ => DType::F32,
    };
    let flat = tensor.flatten_all()?.to_dtype(target)?.contiguous()?;
    Ok(flat.data().into_owned())
}

/// Parses an ONNX file back (for tests and `audiocap` checks of an export).
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    ModelProto::decode(bytes.as_slice()).map_err(|e| OnnxError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn saved_models_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Graph::new("t", DataType::Float);
        let x = g.input("x", DataType::Float, &[Dim::named("batch"), Dim::Fixed(2)]);
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let y = g.linear(&x, "fc", &w, None).unwrap();
        g.output(
            &y,
            "y",
            DataType::Float,
            &[Dim::named("batch"), Dim::Fixed(3)],
        );
        let path = dir.path().join("t.onnx");
        g.save(&path, "test", &[("k".into(), "v".into())]).unwrap();
        let model = read_model(&path).unwrap();
        let graph = model.graph.unwrap();
        assert_eq!(graph.input[0].name, "x");
        assert_eq!(graph.output[0].name, "y");
        assert_eq!(graph.initializer[0].dims, vec![2, 3]); // stored transposed
        assert_eq!(model.metadata_props[0].value, "v");
    }

    #[test]
    fn large_weights_go_to_external_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("m.onnx.data");
        let mut g = Graph::with_external_data("t", DataType::Float16, &data).unwrap();
        let big = Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap();
        let small = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let a = g.weight("big", &big).unwrap();
        let b = g.weight("big2", &big).unwrap();
        let c = g.weight("small", &small).unwrap();
        let s = g.add(&a, &b);
        let s = g.add(&s, &c);
        g.output(
            &s,
            "out",
            DataType::Float16,
            &[Dim::Fixed(64), Dim::Fixed(64)],
        );
        let files = g.save(&dir.path().join("m.onnx"), "test", &[]).unwrap();
        assert_eq!(files.len(), 2);
        let model = read_model(&dir.path().join("m.onnx")).unwrap();
        let inits = model.graph.unwrap().initializer;
        let big2 = inits.iter().find(|t| t.name == "big2").unwrap();
        assert_eq!(big2.data_location, 1);
        let offset: u64 = big2
            .external_data
            .iter()
            .find(|e| e.key == "offset")
            .unwrap()
            .value
            .parse()
            .unwrap();
        assert_eq!(offset % 4096, 0);
        assert_eq!(
            std::fs::metadata(&data).unwrap().len(),
            offset + 64 * 64 * 2
        );
        let small = inits.iter().find(|t| t.name == "small").unwrap();
        assert_eq!(small.data_location, 0);
        assert_eq!(small.raw_data.len(), 8);
    }
}
