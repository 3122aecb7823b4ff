//! Named tensors from checkpoint files, with errors that say which file and which
//! tensor is wrong.
//!
//! Safetensors files are memory-mapped: a tensor is copied out of the map once, when
//! it is requested, and converted to the compute dtype, so a multi-gigabyte
//! checkpoint never sits in memory twice. Torch zip checkpoints (`.pt`) are read by
//! [`super::checkpoint`] and handed over as in-memory tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};

/// Why a model could not be loaded. Every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid {format} file: {message}", file.display())]
    Format {
        file: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{}: invalid configuration: {message}", file.display())]
    Config { file: PathBuf, message: String },
    #[error("{}: missing tensor `{name}`", file.display())]
    MissingTensor { file: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {actual:?}, expected {expected:?}", file.display())]
    Shape {
        file: PathBuf,
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{}: tensor `{name}` has unsupported dtype {dtype:?} (expected f32, f16 or bf16)", file.display())]
    DType {
        file: PathBuf,
        name: String,
        dtype: DType,
    },
    #[error("{}: tensor `{name}`: {source}", file.display())]
    Tensor {
        file: PathBuf,
        name: String,
        /// Boxed: candle's error is large and this one travels through many `Result`s.
        source: Box<candle_core::Error>,
    },
}

impl LoadError {
    /// A candle error raised on tensor `name` of `file`.
    pub fn tensor(
        file: impl Into<PathBuf>,
        name: impl Into<String>,
        source: candle_core::Error,
    ) -> Self {
        LoadError::Tensor {
            file: file.into(),
            name: name.into(),
            source: Box::new(source),
        }
    }

    pub fn config(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        LoadError::Config {
            file: file.into(),
            message: message.into(),
        }
    }

    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadError::Io {
            file: file.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, LoadError>;

enum Store {
    /// Memory-mapped safetensors files; `route` maps a tensor name to its file.
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        route: HashMap<String, usize>,
    },
    /// Tensors already in memory (read from a torch checkpoint).
    InMemory {
        file: PathBuf,
        tensors: HashMap<String, Tensor>,
    },
}

struct Inner {
    store: Store,
    /// Where the weights came from as a whole (a file or a model directory).
    origin: PathBuf,
    dtype: DType,
    device: Device,
}

/// A view of a checkpoint's tensors under a name prefix, like candle's `VarBuilder`
/// but with errors that name the file. Cheap to clone.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    prefix: String,
}

impl Weights {
    /// Memory-maps one or more safetensors files (the shards of one checkpoint).
    /// `origin` names the checkpoint as a whole in errors (e.g. the model directory).
    pub fn from_safetensors(
        origin: impl Into<PathBuf>,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut mapped = Vec::with_capacity(files.len());
        let mut route = HashMap::new();
        for (index, file) in files.iter().enumerate() {
            if !file.is_file() {
                return Err(LoadError::io(
                    file,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we
            // rely on it not being truncated while the model is loaded.
            let st = unsafe { MmapedSafetensors::new(file) }.map_err(|e| LoadError::Format {
                file: file.clone(),
                format: "safetensors",
                message: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                route.insert(name, index);
            }
            mapped.push((file.clone(), st));
        }
        Ok(Self::new(
            Store::Safetensors {
                files: mapped,
                route,
            },
            origin.into(),
            dtype,
            device,
        ))
    }

    /// Wraps tensors already in memory, read from `file`.
    pub fn from_tensors(
        file: impl Into<PathBuf>,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let file = file.into();
        Self::new(
            Store::InMemory {
                file: file.clone(),
                tensors,
            },
            file,
            dtype,
            device,
        )
    }

    fn new(store: Store, origin: PathBuf, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                origin,
                dtype,
                device: device.clone(),
            }),
            prefix: String::new(),
        }
    }

    /// The same weights seen under `prefix.`.
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            part.to_string()
        } else {
            format!("{}.{part}", self.prefix)
        };
        Self {
            inner: self.inner.clone(),
            prefix,
        }
    }

    /// The full tensor name of `name` under the current prefix.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The current name prefix (a module path such as `model.layers.0.self_attn.q_proj`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The checkpoint as a whole (file or directory), for messages.
    pub fn origin(&self) -> &Path {
        &self.inner.origin
    }

    /// The file that holds `full_name`, or the origin when no file does.
    fn file_of(&self, full_name: &str) -> &Path {
        match &self.inner.store {
            Store::Safetensors { files, route } => route
                .get(full_name)
                .map(|&i| files[i].0.as_path())
                .unwrap_or(&self.inner.origin),
            Store::InMemory { file, .. } => file,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = self.full_name(name);
        match &self.inner.store {
            Store::Safetensors { route, .. } => route.contains_key(&full),
            Store::InMemory { tensors, .. } => tensors.contains_key(&full),
        }
    }

    /// Every tensor name under the current prefix (full names), sorted.
    pub fn names(&self) -> Vec<String> {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.prefix)
        };
        let mut names: Vec<String> = match &self.inner.store {
            Store::Safetensors { route, .. } => route.keys().cloned().collect(),
            Store::InMemory { tensors, .. } => tensors.keys().cloned().collect(),
        };
        names.retain(|n| n.starts_with(&prefix));
        names.sort();
        names
    }

    /// The tensor `name` with any shape, in the file's own dtype, on the CPU.
    fn load_raw(&self, full: &str) -> Result<Tensor> {
        let missing = || LoadError::MissingTensor {
            file: self.file_of(full).to_path_buf(),
            name: full.to_string(),
        };
        match &self.inner.store {
            Store::Safetensors { files, route } => {
                let index = *route.get(full).ok_or_else(missing)?;
                let (file, st) = &files[index];
                st.load(full, &Device::Cpu)
                    .map_err(|source| LoadError::tensor(file.clone(), full.to_string(), source))
            }
            Store::InMemory { tensors, .. } => tensors.get(full).cloned().ok_or_else(missing),
        }
    }

    /// A floating-point tensor with any shape, converted to the compute dtype and device.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        let raw = self.load_raw(&full)?;
        if !matches!(
            raw.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(LoadError::DType {
                file: self.file_of(&full).to_path_buf(),
                name: full,
                dtype: raw.dtype(),
            });
        }
        raw.to_dtype(self.inner.dtype)
            .and_then(|t| t.to_device(&self.inner.device))
            .map_err(|source| LoadError::tensor(self.file_of(&full).to_path_buf(), full, source))
    }

    /// A floating-point tensor that must have exactly `shape`.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        let expected: Shape = shape.into();
        let tensor = self.get_any_shape(name)?;
        if tensor.shape() != &expected {
            let full = self.full_name(name);
            return Err(LoadError::Shape {
                file: self.file_of(&full).to_path_buf(),
                name: full,
                actual: tensor.dims().to_vec(),
                expected: expected.dims().to_vec(),
            });
        }
        Ok(tensor)
    }

    /// Wraps a candle error raised while building a module from tensor `name`.
    pub fn tensor_error(&self, name: &str, source: candle_core::Error) -> LoadError {
        let full = self.full_name(name);
        LoadError::tensor(self.file_of(&full).to_path_buf(), full, source)
    }

    /// `{prefix}.weight` [out, in] and, when `bias`, `{prefix}.bias` [out].
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<candle_nn::Linear> {
        let weight = self.get("weight", (out_dim, in_dim))?;
        let bias = if bias {
            Some(self.get("bias", out_dim)?)
        } else {
            None
        };
        Ok(candle_nn::Linear::new(weight, bias))
    }

    /// `{prefix}.weight` and `{prefix}.bias`, both [dim].
    pub fn layer_norm(&self, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
        let weight = self.get("weight", dim)?;
        let bias = self.get("bias", dim)?;
        Ok(candle_nn::LayerNorm::new(weight, bias, eps))
    }
}

/// Reads a JSON configuration file into `T`, naming the file in any error.
pub fn read_json_config<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read_to_string(file).map_err(|e| LoadError::io(file, e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::config(file, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Weights {
        let mut tensors = HashMap::new();
        tensors.insert(
            "layer.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "layer.ids".to_string(),
            Tensor::zeros(3, DType::I64, &Device::Cpu).unwrap(),
        );
        Weights::from_tensors("ckpt.pt", tensors, DType::F32, &Device::Cpu)
    }

    #[test]
    fn errors_name_file_and_tensor() {
        let w = sample().pp("layer");
        let missing = w.get("bias", 2).unwrap_err().to_string();
        assert_eq!(missing, "ckpt.pt: missing tensor `layer.bias`");
        let shape = w.get("weight", (3, 2)).unwrap_err().to_string();
        assert_eq!(
            shape,
            "ckpt.pt: tensor `layer.weight` has shape [2, 3], expected [3, 2]"
        );
        let dtype = w.get_any_shape("ids").unwrap_err().to_string();
        assert!(
            dtype.contains("`layer.ids` has unsupported dtype I64"),
            "{dtype}"
        );
    }

    #[test]
    fn prefixes_compose() {
        let w = sample();
        assert_eq!(w.pp("a").pp(3).full_name("weight"), "a.3.weight");
        assert!(w.pp("layer").contains("weight"));
        assert_eq!(w.pp("layer").names(), vec!["layer.ids", "layer.weight"]);
    }
}
