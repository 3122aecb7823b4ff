//! Torch zip checkpoints (`torch.save` since PyTorch 1.6) read without executing any
//! pickle code.
//!
//! [`super::pickle`] interprets the opcodes of `data.pkl` into a plain value tree and
//! `_rebuild_tensor_v2` records are mapped onto the raw storages in the zip; nothing
//! from the file is ever imported or called. The released BEATs checkpoints are a
//! dict `{"cfg": dict, "model": state_dict}`: [`read_torch_value`] returns such
//! non-tensor entries as JSON, [`read_torch_state_dict`] the tensors.
//!
//! Untrusted files: every allocation is bounded by the file's real size (a pickle or
//! a tensor larger than the file is refused before it is read), and a crafted file
//! (bad opcodes, lengths, shapes, strides, offsets, zip entries) is a
//! [`LoadError::Format`] naming the file and, where there is one, the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pickle::{Value, unpickle};
use super::weights::{LoadError, Result};

type Archive = zip::ZipArchive<BufReader<File>>;

fn format_error(file: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Format {
        file: file.to_path_buf(),
        format: "torch zip checkpoint",
        message: message.into(),
    }
}

/// The archive and the file's real size.
fn open(file: &Path) -> Result<(Archive, u64)> {
    if !file.is_file() {
        return Err(LoadError::io(
            file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let handle = File::open(file).map_err(|e| LoadError::io(file, e))?;
    let len = handle.metadata().map_err(|e| LoadError::io(file, e))?.len();
    let zip = zip::ZipArchive::new(BufReader::new(handle))
        .map_err(|e| format_error(file, e.to_string()))?;
    Ok((zip, len))
}

/// The names of the archive's `data.pkl` entries.
fn pickle_names(zip: &Archive) -> Vec<String> {
    zip.file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect()
}

/// Reads entry `name` whole, refusing more bytes than the file has.
fn read_entry(zip: &mut Archive, file: &Path, name: &str, limit: u64) -> Result<Vec<u8>> {
    let entry = zip
        .by_name(name)
        .map_err(|e| format_error(file, format!("{name}: {e}")))?;
    let declared = entry.size();
    if declared > limit {
        return Err(format_error(
            file,
            format!("{name} says it holds {declared} bytes, more than the whole file ({limit})"),
        ));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    entry
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format_error(file, format!("{name}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(format_error(
            file,
            format!("{name} expands to more bytes than the whole file ({limit})"),
        ));
    }
    Ok(bytes)
}

fn read_pickle(zip: &mut Archive, file: &Path, name: &str, limit: u64) -> Result<Value> {
    let bytes = read_entry(zip, file, name, limit)?;
    unpickle(&bytes).map_err(|e| format_error(file, format!("{name}: {e}")))
}

/// The tensors of the state dict stored under `key` (or at the top level).
pub fn read_torch_state_dict(file: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let (mut zip, file_len) = open(file)?;
    let mut tensors = HashMap::new();
    for pkl in pickle_names(&zip) {
        let object = read_pickle(&mut zip, file, &pkl, file_len)?;
        let dir = pkl.strip_suffix(".pkl").unwrap_or(&pkl).to_string();
        for (name, record) in tensor_records(file, object, key)? {
            let tensor = read_tensor(&mut zip, file_len, &dir, &record)
                .map_err(|message| format_error(file, format!("tensor `{name}`: {message}")))?;
            tensors.insert(name, tensor);
        }
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
    let (mut zip, file_len) = open(file)?;
    let pkl_name = pickle_names(&zip)
        .into_iter()
        .next()
        .ok_or_else(|| format_error(file, "no data.pkl in the archive"))?;
    let object = read_pickle(&mut zip, file, &pkl_name, file_len)?;
    Ok(to_json(object))
}

/// Where one tensor's data is: its storage entry and its view of it.
#[derive(Debug)]
struct TensorRecord {
    /// The storage's key: the entry `{dir}/{storage}` of the archive.
    storage: String,
    /// Elements in the storage.
    storage_len: u64,
    dtype: DType,
    /// In elements.
    offset: u64,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The state dict's tensor records, like torch's `load`: a scripted module's state,
/// else the object (or its entry `key`) as a dict of tensors.
fn tensor_records(
    file: &Path,
    object: Value,
    key: Option<&str>,
) -> Result<Vec<(String, TensorRecord)>> {
    let object = match object {
        Value::Build { object, state } => match *object {
            Value::Reduce { callable, .. } if callable.is_global("__torch__", "Module") => *state,
            _ => return Ok(Vec::new()),
        },
        other => other,
    };
    let object = match (key, object) {
        (Some(key), Value::Dict(entries)) => entries
            .into_iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v)
            .ok_or_else(|| format_error(file, format!("key {key} not found")))?,
        (_, other) => other,
    };
    let Value::Dict(entries) = object else {
        return Ok(Vec::new());
    };
    let mut records = Vec::new();
    for (name, value) in entries {
        let Value::Str(name) = name else { continue };
        match tensor_record(value) {
            Ok(Some(record)) => records.push((name, record)),
            Ok(None) => {}
            Err(Skip::Unsupported(class)) => {
                tracing::warn!(file = %file.display(), tensor = %name, %class, "skipping a tensor of an unsupported storage type");
            }
            Err(Skip::Malformed(message)) => {
                return Err(format_error(file, format!("tensor `{name}`: {message}")));
            }
        }
    }
    Ok(records)
}

enum Skip {
    /// A storage class without a candle dtype (as candle's own reader, skipped).
    Unsupported(String),
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> Skip {
    Skip::Malformed(what.into())
}

/// The record of a `_rebuild_tensor_v2` call (possibly wrapped in a parameter or a
/// tensor subclass), `None` for anything else.
fn tensor_record(value: Value) -> std::result::Result<Option<TensorRecord>, Skip> {
    let Value::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (callable, args) = if callable.is_global("torch._tensor", "_rebuild_from_type_v2") {
        // (func, new_type, args, state)
        match *args {
            Value::Tuple(mut items) if items.len() >= 3 => {
                let inner = items.swap_remove(2);
                (Box::new(items.swap_remove(0)), Box::new(inner))
            }
            _ => return Err(malformed("_rebuild_from_type_v2 without its arguments")),
        }
    } else if callable.is_global("torch._utils", "_rebuild_parameter") {
        // (data, requires_grad, backward_hooks)
        match *args {
            Value::Tuple(mut items) if !items.is_empty() => match items.swap_remove(0) {
                Value::Reduce { callable, args } => (callable, args),
                _ => return Err(malformed("_rebuild_parameter of something not rebuilt")),
            },
            _ => return Err(malformed("_rebuild_parameter without its arguments")),
        }
    } else {
        (callable, args)
    };
    if !callable.is_global("torch._utils", "_rebuild_tensor_v2") {
        return Ok(None);
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks, ...)
    let Value::Tuple(args) = *args else {
        return Err(malformed("_rebuild_tensor_v2 arguments are not a tuple"));
    };
    let [storage, offset, size, stride, ..] = args.as_slice() else {
        return Err(malformed(format!(
            "_rebuild_tensor_v2 has {} arguments, not at least 4",
            args.len()
        )));
    };
    // ("storage", storage_type, key, location, numel)
    let Value::PersistentId(storage) = storage else {
        return Err(malformed("the storage is not a persistent id"));
    };
    let Value::Tuple(storage) = storage.as_ref() else {
        return Err(malformed("the storage id is not a tuple"));
    };
    let [
        _,
        Value::Global { name: class, .. },
        Value::Str(key),
        _,
        numel,
        ..,
    ] = storage.as_slice()
    else {
        return Err(malformed(
            "the storage id is not (\"storage\", type, key, location, numel)",
        ));
    };
    let dtype = match class.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" => DType::U8,
        "LongStorage" => DType::I64,
        other => return Err(Skip::Unsupported(other.to_string())),
    };
    let count = |v: &Value, what: &str| match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => Err(malformed(format!("{what} is {other:?}, not a count"))),
    };
    let dims = |v: &Value, what: &str| match v {
        Value::Tuple(items) => items
            .iter()
            .map(|i| {
                count(i, what).and_then(|n| {
                    usize::try_from(n).map_err(|_| malformed(format!("{what} {n} is too large")))
                })
            })
            .collect::<std::result::Result<Vec<usize>, Skip>>(),
        _ => Err(malformed(format!("{what} is not a tuple"))),
    };
    let shape = dims(size, "a size")?;
    let stride = dims(stride, "a stride")?;
    if shape.len() != stride.len() {
        return Err(malformed(format!(
            "size {shape:?} and stride {stride:?} differ in rank"
        )));
    }
    Ok(Some(TensorRecord {
        storage: key.clone(),
        storage_len: count(numel, "the storage size")?,
        dtype,
        offset: count(offset, "the storage offset")?,
        shape,
        stride,
    }))
}

/// Whether `stride` walks `shape` in row-major (or, `reversed`, column-major) order;
/// dims of size 1 take any stride.
fn dense(shape: &[usize], stride: &[usize], reversed: bool) -> bool {
    let mut pairs: Vec<(usize, usize)> =
        shape.iter().copied().zip(stride.iter().copied()).collect();
    if !reversed {
        pairs.reverse();
    }
    let mut acc = Some(1usize);
    for (dim, stride) in pairs {
        if dim > 1 && Some(stride) != acc {
            return false;
        }
        acc = acc.and_then(|a| a.checked_mul(dim));
    }
    true
}

/// Reads one tensor, checking its view against its storage, the entry and the file
/// before anything is allocated.
fn read_tensor(
    zip: &mut Archive,
    file_len: u64,
    dir: &str,
    record: &TensorRecord,
) -> std::result::Result<Tensor, String> {
    let TensorRecord {
        storage,
        storage_len,
        dtype,
        offset,
        shape,
        stride,
    } = record;
    let elem = dtype.size_in_bytes() as u64;
    let elements = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| format!("shape {shape:?} has more elements than fit in 64 bits"))?;
    let c_order = dense(shape, stride, false);
    let fortran = dense(shape, stride, true);
    if !c_order && !fortran {
        return Err(format!(
            "shape {shape:?} with stride {stride:?} is not contiguous (not supported)"
        ));
    }
    let too_big = || format!("shape {shape:?} at offset {offset} overflows");
    let end = offset.checked_add(elements).ok_or_else(too_big)?;
    if end > *storage_len {
        return Err(format!(
            "shape {shape:?} at element offset {offset} needs {end} elements, \
             but its storage {storage} holds {storage_len}"
        ));
    }
    let (skip, bytes) = match (offset.checked_mul(elem), elements.checked_mul(elem)) {
        (Some(skip), Some(bytes)) => (skip, bytes),
        _ => return Err(too_big()),
    };
    if skip.saturating_add(bytes) > file_len {
        return Err(format!(
            "needs {} bytes of storage {storage}, more than the whole file ({file_len})",
            skip.saturating_add(bytes)
        ));
    }
    let path = format!("{dir}/{storage}");
    let mut entry = zip
        .by_name(&path)
        .map_err(|e| format!("storage entry {path}: {e}"))?;
    if entry.size() < skip + bytes {
        return Err(format!(
            "storage entry {path} holds {} bytes, the tensor needs {}",
            entry.size(),
            skip + bytes
        ));
    }
    std::io::copy(&mut entry.by_ref().take(skip), &mut std::io::sink())
        .map_err(|e| format!("storage entry {path}: {e}"))?;
    let mut data = Vec::with_capacity(bytes as usize);
    entry
        .take(bytes)
        .read_to_end(&mut data)
        .map_err(|e| format!("storage entry {path}: {e}"))?;
    if data.len() as u64 != bytes {
        return Err(format!(
            "storage entry {path} ends after {} of the {bytes} bytes the tensor needs",
            data.len()
        ));
    }
    let candle_err = |e: candle_core::Error| e.to_string();
    if shape.len() > 1 && fortran {
        // Column-major: read as the reversed shape, then permute back.
        let reversed: Vec<usize> = shape.iter().rev().copied().collect();
        let tensor =
            Tensor::from_raw_buffer(&data, *dtype, &reversed, &Device::Cpu).map_err(candle_err)?;
        let dims: Vec<usize> = (0..shape.len()).rev().collect();
        tensor.permute(dims).map_err(candle_err)
    } else {
        Tensor::from_raw_buffer(&data, *dtype, shape, &Device::Cpu).map_err(candle_err)
    }
}

fn to_json(object: Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match object {
        Value::Int(i) => Json::from(i),
        Value::Float(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s),
        Value::Bool(b) => Json::Bool(b),
        Value::None => Json::Null,
        Value::Tuple(items) | Value::List(items) => {
            Json::Array(items.into_iter().map(to_json).collect())
        }
        Value::Dict(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let key = match k {
                    Value::Str(s) => s,
                    Value::Int(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                map.insert(key, to_json(v));
            }
            Json::Object(map)
        }
        // An object rebuilt by a callable (OrderedDict and friends are already dicts):
        // a `Build` whose state is a dict keeps that state, anything else has no JSON form.
        Value::Build { state, .. } => match *state {
            Value::Dict(_) => to_json(*state),
            _ => Json::Null,
        },
        _ => Json::Null,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn string(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }

    fn int(p: &mut Vec<u8>, v: i32) {
        p.push(b'J');
        p.extend(v.to_le_bytes());
    }

    fn ints(p: &mut Vec<u8>, values: &[i32]) {
        p.push(b'(');
        values.iter().for_each(|&v| int(p, v));
        p.push(b't');
    }

    /// `{"w": tensor}` as torch pickles it: a float storage of `numel` elements and a
    /// view of it.
    fn tensor_pickle(numel: i32, offset: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}'];
        string(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        string(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        string(&mut p, "0");
        string(&mut p, "cpu");
        int(&mut p, numel);
        p.extend(b"tQ");
        int(&mut p, offset);
        ints(&mut p, size);
        ints(&mut p, stride);
        p.extend(b"\x89ccollections\nOrderedDict\n)RtRs.");
        p
    }

    fn zip_file(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        file
    }

    fn checkpoint(pickle: &[u8], storage_bytes: usize) -> tempfile::NamedTempFile {
        let data: Vec<u8> = (0..storage_bytes / 4)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        zip_file(&[("archive/data.pkl", pickle), ("archive/data/0", &data)])
    }

    fn load_error(pickle: &[u8], storage_bytes: usize) -> String {
        let file = checkpoint(pickle, storage_bytes);
        let error = read_torch_state_dict(file.path(), None).unwrap_err();
        assert!(matches!(error, LoadError::Format { .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.contains(&file.path().display().to_string()), "{text}");
        text
    }

    #[test]
    fn a_well_formed_checkpoint_loads_row_and_column_major_views() {
        let file = checkpoint(&tensor_pickle(6, 0, &[2, 3], &[3, 1]), 24);
        let tensors = read_torch_state_dict(file.path(), None).unwrap();
        let w = tensors["w"].to_vec2::<f32>().unwrap();
        assert_eq!(w, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]);
        let file = checkpoint(&tensor_pickle(6, 0, &[2, 3], &[1, 2]), 24);
        let tensors = read_torch_state_dict(file.path(), None).unwrap();
        let w = tensors["w"].to_vec2::<f32>().unwrap();
        assert_eq!(w, [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]);
        let file = checkpoint(&tensor_pickle(6, 2, &[4], &[1]), 24);
        let tensors = read_torch_state_dict(file.path(), None).unwrap();
        assert_eq!(tensors["w"].to_vec1::<f32>().unwrap(), [2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn a_shape_larger_than_its_storage_is_an_error_naming_the_tensor() {
        let e = load_error(&tensor_pickle(6, 0, &[2, 4], &[4, 1]), 24);
        assert!(
            e.contains("tensor `w`: shape [2, 4]") && e.contains("holds 6"),
            "{e}"
        );
        // 2^93 elements: refused before any allocation.
        let huge = i32::MAX;
        let e = load_error(&tensor_pickle(6, 0, &[huge, huge, huge], &[0, 0, 1]), 24);
        assert!(e.contains("tensor `w`"), "{e}");
        let e = load_error(&tensor_pickle(6, 5, &[2], &[1]), 24);
        assert!(e.contains("at element offset 5 needs 7 elements"), "{e}");
        let e = load_error(&tensor_pickle(-1, 0, &[2], &[1]), 24);
        assert!(e.contains("not a count"), "{e}");
        let e = load_error(&tensor_pickle(6, 0, &[-2, 3], &[3, 1]), 24);
        assert!(e.contains("not a count"), "{e}");
    }

    #[test]
    fn a_storage_larger_than_the_file_is_refused_before_it_is_read() {
        let e = load_error(&tensor_pickle(i32::MAX, 0, &[i32::MAX], &[1]), 24);
        assert!(e.contains("more than the whole file"), "{e}");
        let e = load_error(&tensor_pickle(60, 0, &[60], &[1]), 24);
        assert!(e.contains("holds 24 bytes, the tensor needs 240"), "{e}");
    }

    #[test]
    fn strided_views_and_missing_storages_are_errors() {
        let e = load_error(&tensor_pickle(6, 0, &[2, 2], &[3, 2]), 24);
        assert!(e.contains("is not contiguous"), "{e}");
        let e = load_error(&tensor_pickle(6, 0, &[2, 3], &[3]), 24);
        assert!(e.contains("differ in rank"), "{e}");
        let file = zip_file(&[("archive/data.pkl", &tensor_pickle(6, 0, &[6], &[1]))]);
        let e = read_torch_state_dict(file.path(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage entry archive/data/0"), "{e}");
    }

    #[test]
    fn crafted_pickles_and_archives_are_errors_naming_the_file() {
        let e = load_error(b"\x80\x02X\xff\xff\xff\xffabc.", 0);
        assert!(
            e.contains("archive/data.pkl: pickle byte 2: needs 4294967295 bytes"),
            "{e}"
        );
        let truncated = tensor_pickle(6, 0, &[6], &[1]);
        let e = load_error(&truncated[..truncated.len() / 2], 24);
        assert!(e.contains("archive/data.pkl: pickle byte"), "{e}");
        // A rebuild call with too few arguments.
        let e = load_error(
            b"}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Rs.",
            0,
        );
        assert!(
            e.contains("tensor `w`: _rebuild_tensor_v2 has 0 arguments"),
            "{e}"
        );
        let e = load_error(
            b"}X\x01\x00\x00\x00wctorch._utils\n_rebuild_parameter\n)Rs.",
            0,
        );
        assert!(
            e.contains("_rebuild_parameter without its arguments"),
            "{e}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"PK\x03\x04 not really a zip").unwrap();
        let e = read_torch_state_dict(file.path(), None).unwrap_err();
        assert!(matches!(e, LoadError::Format { .. }), "{e:?}");
        assert!(read_torch_value(file.path()).is_err());
    }

    #[test]
    fn values_read_as_json() {
        let file = checkpoint(
            b"\x80\x02}(X\x01\x00\x00\x00aK\x07X\x01\x00\x00\x00b\x88u.",
            0,
        );
        let value = read_torch_value(file.path()).unwrap();
        assert_eq!(value, serde_json::json!({"a": 7, "b": true}));
    }
}
