//! Torch zip checkpoints (`torch.save` since PyTorch 1.6) read without executing any
//! pickle code.
//!
//! candle's pickle reader interprets the opcodes into a plain value tree and maps
//! `_rebuild_tensor_v2` records onto the raw storages in the zip; nothing from the
//! file is ever imported or called. The released BEATs checkpoints are a dict
//! `{"cfg": dict, "model": state_dict}`: [`read_torch_value`] returns such
//! non-tensor entries as JSON, [`read_torch_state_dict`] the tensors.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::Tensor;
use candle_core::pickle::{Object, PthTensors, Stack};

use super::weights::{LoadError, Result};

fn format_error(file: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Format {
        file: file.to_path_buf(),
        format: "torch zip checkpoint",
        message: message.into(),
    }
}

/// The tensors of the state dict stored under `key` (or at the top level).
pub fn read_torch_state_dict(file: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    if !file.is_file() {
        return Err(LoadError::io(
            file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let pth = PthTensors::new(file, key).map_err(|e| format_error(file, e.to_string()))?;
    let mut tensors = HashMap::with_capacity(pth.tensor_infos().len());
    for name in pth.tensor_infos().keys() {
        let tensor = pth
            .get(name)
            .map_err(|source| LoadError::tensor(file.to_path_buf(), name.clone(), source))?
            .ok_or_else(|| LoadError::MissingTensor {
                file: file.to_path_buf(),
                name: name.clone(),
            })?;
        tensors.insert(name.clone(), tensor);
    }
    if tensors.is_empty() {
        return Err(format_error(
            file,
            match key {
                Some(key) => format!("no tensors under key {key:?}"),
                None => "no tensors".to_string(),
            },
        ));
    }
    Ok(tensors)
}

/// The pickled top-level object as JSON. Tensors and other objects that have no JSON
/// form become `null`; dicts, lists, tuples, numbers, strings and booleans keep their
/// values.
pub fn read_torch_value(file: &Path) -> Result<serde_json::Value> {
    let handle = std::fs::File::open(file).map_err(|e| LoadError::io(file, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(handle))
        .map_err(|e| format_error(file, e.to_string()))?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| format_error(file, "no data.pkl in the archive"))?;
    let entry = zip
        .by_name(&pkl_name)
        .map_err(|e| format_error(file, e.to_string()))?;
    let mut reader = BufReader::new(entry);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| format_error(file, format!("{pkl_name}: {e}")))?;
    let object = stack
        .finalize()
        .map_err(|e| format_error(file, format!("{pkl_name}: {e}")))?;
    Ok(to_json(object))
}

fn to_json(object: Object) -> serde_json::Value {
    use serde_json::Value;
    match object {
        Object::Int(i) => Value::from(i),
        Object::Long(i) => Value::from(i),
        Object::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        Object::Unicode(s) => Value::String(s),
        Object::Bool(b) => Value::Bool(b),
        Object::None => Value::Null,
        Object::Tuple(items) | Object::List(items) => {
            Value::Array(items.into_iter().map(to_json).collect())
        }
        Object::Dict(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let key = match k {
                    Object::Unicode(s) => s,
                    Object::Int(i) => i.to_string(),
                    Object::Long(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                map.insert(key, to_json(v));
            }
            Value::Object(map)
        }
        // An object rebuilt by a callable (OrderedDict and friends are already dicts):
        // a `Build` whose state is a dict keeps that state, anything else has no JSON form.
        Object::Build { args, .. } => match *args {
            Object::Dict(_) => to_json(*args),
            _ => Value::Null,
        },
        _ => Value::Null,
    }
}
