//! A bounded pickle reader for torch checkpoints: it interprets the opcodes that
//! `torch.save` writes into a plain value tree and never imports or calls anything.
//!
//! Every length in the stream is checked against the bytes that are really there
//! before anything is allocated, nesting is at most [`MAX_DEPTH`] levels, and the
//! values built (memo copies included) are at most [`MAX_NODES`] plus
//! [`NODES_PER_BYTE`] per input byte, so a crafted pickle is an error, never a panic, a deep recursion or an
//! unbounded allocation.

use std::collections::HashMap;

/// Deepest nesting accepted (a state dict is about 6 levels deep).
pub(crate) const MAX_DEPTH: u32 = 100;
/// Values that may be built beyond [`NODES_PER_BYTE`] per input byte (memo copies
/// count). The BEATs checkpoint builds about 0.5 values per byte.
pub(crate) const MAX_NODES: u64 = 1 << 16;
/// Values allowed per byte of pickle.
pub(crate) const NODES_PER_BYTE: u64 = 4;

/// One unpickled value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// A `GLOBAL` reference, kept as its two names.
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `callable(*args)` (REDUCE, NEWOBJ), never called.
    Reduce {
        callable: Box<Value>,
        args: Box<Value>,
    },
    /// `object.__setstate__(state)` (BUILD) of anything but a dict.
    Build {
        object: Box<Value>,
        state: Box<Value>,
    },
    /// A persistent id (BINPERSID): in torch checkpoints, a storage reference.
    PersistentId(Box<Value>),
}

impl Value {
    pub(crate) fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global { module: m, name: n } if m == module && n == name)
    }
}

/// A value with its nesting depth and size (in values).
#[derive(Debug, Clone)]
struct Node {
    value: Value,
    depth: u32,
    nodes: u64,
}

impl Node {
    fn leaf(value: Value) -> Self {
        Node {
            value,
            depth: 1,
            nodes: 1,
        }
    }
}

enum Slot {
    Mark,
    Item(Node),
}

struct Machine<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Node>,
    /// Values still allowed to be built.
    budget: u64,
}

/// Unpickles `bytes` (up to its STOP opcode). The error says what is wrong and at
/// which byte offset.
pub(crate) fn unpickle(bytes: &[u8]) -> Result<Value, String> {
    let mut machine = Machine {
        bytes,
        at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        budget: MAX_NODES.saturating_add(NODES_PER_BYTE.saturating_mul(bytes.len() as u64)),
    };
    loop {
        let offset = machine.at;
        match machine.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("pickle byte {offset}: {e}")),
        }
    }
    match machine.stack.pop() {
        Some(Slot::Item(top)) => Ok(top.value),
        _ => Err("pickle: STOP with no value on the stack".into()),
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(format!(
                "needs {n} bytes but only {left} are left (truncated or a bad length)"
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Result<usize, String> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| format!("length {n} does not fit in memory"))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL name without its newline")?;
        let mut line = &rest[..end];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let text = String::from_utf8_lossy(line).into_owned();
        self.at += end + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<String, String> {
        let data = self.take(n)?.to_vec();
        String::from_utf8(data).map_err(|e| format!("a string that is not UTF-8: {e}"))
    }

    fn spend(&mut self, nodes: u64) -> Result<(), String> {
        self.budget = self.budget.checked_sub(nodes).ok_or_else(|| {
            format!("builds more values than the value limit ({MAX_NODES} plus {NODES_PER_BYTE} per byte)")
        })?;
        Ok(())
    }

    fn push_leaf(&mut self, value: Value) -> Result<(), String> {
        self.spend(1)?;
        self.stack.push(Slot::Item(Node::leaf(value)));
        Ok(())
    }

    /// Pushes a container built from `children`, checking depth.
    fn push_built(&mut self, children: &[&Node], build: Value) -> Result<(), String> {
        let item = container(children, build)?;
        self.spend(1)?;
        self.stack.push(Slot::Item(item));
        Ok(())
    }

    fn pop(&mut self) -> Result<Node, String> {
        match self.stack.pop() {
            Some(Slot::Item(item)) => Ok(item),
            Some(Slot::Mark) => Err("a MARK where a value was expected".into()),
            None => Err("pops an empty stack".into()),
        }
    }

    fn top(&mut self) -> Result<&mut Node, String> {
        match self.stack.last_mut() {
            Some(Slot::Item(item)) => Ok(item),
            Some(Slot::Mark) => Err("a MARK where a value was expected".into()),
            None => Err("reads an empty stack".into()),
        }
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Node>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or("no MARK to pop to")?;
        let items = self
            .stack
            .split_off(mark + 1)
            .into_iter()
            .filter_map(|s| match s {
                Slot::Item(item) => Some(item),
                Slot::Mark => None,
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&mut self, id: u32) -> Result<(), String> {
        let item = self
            .memo
            .get(&id)
            .ok_or_else(|| format!("memo entry {id} was never stored"))?;
        let nodes = item.nodes;
        let copy = item.clone_bounded(self.budget)?;
        self.spend(nodes)?;
        self.stack.push(Slot::Item(copy));
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> Result<(), String> {
        let budget = self.budget;
        let item = self.top()?;
        let nodes = item.nodes;
        let copy = item.clone_bounded(budget)?;
        self.spend(nodes)?;
        self.memo.insert(id, copy);
        Ok(())
    }

    /// Appends `items` to the list or dict on top of the stack.
    fn extend_top(&mut self, items: Vec<Node>, pairs: bool) -> Result<(), String> {
        let top = self.top()?;
        let depth = items.iter().map(|i| i.depth + 1).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        top.depth = top.depth.max(depth);
        top.nodes = top
            .nodes
            .saturating_add(items.iter().map(|i| i.nodes).sum::<u64>());
        match (&mut top.value, pairs) {
            (Value::List(list), false) => list.extend(items.into_iter().map(|i| i.value)),
            (Value::Dict(dict), true) => {
                if !items.len().is_multiple_of(2) {
                    return Err("SETITEMS with an odd number of values".into());
                }
                let mut values = items.into_iter().map(|i| i.value);
                while let (Some(k), Some(v)) = (values.next(), values.next()) {
                    dict.push((k, v));
                }
            }
            (_, false) => return Err("APPEND(S) to something that is not a list".into()),
            (_, true) => return Err("SETITEM(S) on something that is not a dict".into()),
        }
        Ok(())
    }

    /// One opcode; true at STOP.
    fn step(&mut self) -> Result<bool, String> {
        let op = self.u8()?;
        match op {
            0x80 => {
                self.u8()?; // PROTO: the version does not change how we read.
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint only.
            }
            b'.' => return Ok(true),
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_leaf(Value::Global { module, name })?;
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?.value;
                let module = self.pop()?.value;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => {
                        self.push_leaf(Value::Global { module, name })?
                    }
                    _ => return Err("STACK_GLOBAL of values that are not strings".into()),
                }
            }
            b'K' => {
                let v = self.u8()?;
                self.push_leaf(Value::Int(v.into()))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push_leaf(Value::Int(v.into()))?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push_leaf(Value::Int(v.into()))?;
            }
            0x8a => {
                // LONG1: little-endian two's complement.
                let n = usize::from(self.u8()?);
                if n > 8 {
                    return Err(format!("a LONG1 of {n} bytes does not fit in 64 bits"));
                }
                let data = self.take(n)?;
                let negative = data.last().is_some_and(|&b| b & 0x80 != 0);
                let mut raw = [if negative { 0xff } else { 0 }; 8];
                raw[..n].copy_from_slice(data);
                self.push_leaf(Value::Int(i64::from_le_bytes(raw)))?;
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.push_leaf(Value::Float(v))?;
            }
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.utf8(n)?;
                self.push_leaf(Value::Str(s))?;
            }
            0x8c => {
                let n = usize::from(self.u8()?);
                let s = self.utf8(n)?;
                self.push_leaf(Value::Str(s))?;
            }
            0x8d => {
                let n = self.len_u64()?;
                let s = self.utf8(n)?;
                self.push_leaf(Value::Str(s))?;
            }
            b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'C' => usize::from(self.u8()?),
                    b'B' => self.u32()? as usize,
                    _ => self.len_u64()?,
                };
                let data = self.take(n)?.to_vec();
                self.push_leaf(Value::Bytes(data))?;
            }
            b'N' => self.push_leaf(Value::None)?,
            0x88 => self.push_leaf(Value::Bool(true))?,
            0x89 => self.push_leaf(Value::Bool(false))?,
            b')' => self.push_leaf(Value::Tuple(Vec::new()))?,
            b']' => self.push_leaf(Value::List(Vec::new()))?,
            b'}' => self.push_leaf(Value::Dict(Vec::new()))?,
            b'(' => self.stack.push(Slot::Mark),
            b't' => {
                let items = self.pop_to_mark()?;
                let refs: Vec<&Node> = items.iter().collect();
                let item = container(&refs, Value::None)?;
                let value = Value::Tuple(items.into_iter().map(|i| i.value).collect());
                self.spend(1)?;
                self.stack.push(Slot::Item(Node { value, ..item }));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                let refs: Vec<&Node> = items.iter().collect();
                let item = container(&refs, Value::None)?;
                let value = Value::Tuple(items.into_iter().map(|i| i.value).collect());
                self.spend(1)?;
                self.stack.push(Slot::Item(Node { value, ..item }));
            }
            b'd' => {
                let items = self.pop_to_mark()?;
                if !items.len().is_multiple_of(2) {
                    return Err("DICT with an odd number of values".into());
                }
                self.push_leaf(Value::Dict(Vec::new()))?;
                self.extend_top(items, true)?;
            }
            b'a' => {
                let item = self.pop()?;
                self.extend_top(vec![item], false)?;
            }
            b'e' => {
                let items = self.pop_to_mark()?;
                self.extend_top(items, false)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_top(vec![key, value], true)?;
            }
            b'u' => {
                let items = self.pop_to_mark()?;
                self.extend_top(items, true)?;
            }
            b'Q' => {
                let id = self.pop()?;
                let value = Value::PersistentId(Box::new(id.value.clone()));
                self.push_built(&[&id], value)?;
            }
            b'R' | 0x81 => {
                // REDUCE, NEWOBJ: recorded, never called. An OrderedDict (or
                // defaultdict) is a plain dict.
                let args = self.pop()?;
                let callable = self.pop()?;
                if callable.value.is_global("collections", "OrderedDict")
                    || callable.value.is_global("collections", "defaultdict")
                {
                    self.push_leaf(Value::Dict(Vec::new()))?;
                } else {
                    let value = Value::Reduce {
                        callable: Box::new(callable.value.clone()),
                        args: Box::new(args.value.clone()),
                    };
                    self.push_built(&[&callable, &args], value)?;
                }
            }
            b'b' => {
                let state = self.pop()?;
                let object = self.pop()?;
                match (object.value, state.value) {
                    (Value::Dict(mut dict), Value::Dict(more)) => {
                        dict.extend(more);
                        let item = Node {
                            value: Value::Dict(dict),
                            depth: object.depth.max(state.depth),
                            nodes: object.nodes.saturating_add(state.nodes),
                        };
                        self.stack.push(Slot::Item(item));
                    }
                    (o, s) => {
                        let o = Node { value: o, ..object };
                        let s = Node { value: s, ..state };
                        let value = Value::Build {
                            object: Box::new(o.value.clone()),
                            state: Box::new(s.value.clone()),
                        };
                        self.push_built(&[&o, &s], value)?;
                    }
                }
            }
            b'h' => {
                let id = self.u8()?;
                self.memo_get(id.into())?;
            }
            b'j' => {
                let id = self.u32()?;
                self.memo_get(id)?;
            }
            b'q' => {
                let id = self.u8()?;
                self.memo_put(id.into())?;
            }
            b'r' => {
                let id = self.u32()?;
                self.memo_put(id)?;
            }
            0x94 => {
                // MEMOIZE: the next free memo index.
                let id = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                self.memo_put(id)?;
            }
            b'0' => {
                self.stack.pop().ok_or("POP of an empty stack")?;
            }
            b'2' => {
                let budget = self.budget;
                let top = self.top()?;
                let nodes = top.nodes;
                let copy = top.clone_bounded(budget)?;
                self.spend(nodes)?;
                self.stack.push(Slot::Item(copy));
            }
            other => return Err(format!("unsupported opcode 0x{other:02x}")),
        }
        Ok(false)
    }
}

impl Node {
    /// A copy, refused before cloning when it would exceed `budget` values.
    fn clone_bounded(&self, budget: u64) -> Result<Node, String> {
        if self.nodes > budget {
            return Err(format!(
                "a memo copy of {} values would exceed the value limit ({MAX_NODES} plus {NODES_PER_BYTE} per byte)",
                self.nodes
            ));
        }
        Ok(self.clone())
    }
}

/// The depth and size of a container holding `children` (the value is set by the
/// caller); an error when it is nested too deep.
fn container(children: &[&Node], value: Value) -> Result<Node, String> {
    let depth = 1 + children.iter().map(|c| c.depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let nodes = children.iter().fold(1u64, |n, c| n.saturating_add(c.nodes));
    Ok(Node {
        value,
        depth,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_protocol_2_dict() {
        // {"a": 1, "b": [2.5, "x"]} as pickle protocol 2 writes it.
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b'K', 1,
        ];
        p.extend([b'X', 1, 0, 0, 0, b'b', b']', b'q', 1, b'(', b'G']);
        p.extend(2.5f64.to_be_bytes());
        p.extend([b'X', 1, 0, 0, 0, b'x', b'e', b'u', b'.']);
        let value = unpickle(&p).unwrap();
        assert_eq!(
            value,
            Value::Dict(vec![
                (Value::Str("a".into()), Value::Int(1)),
                (
                    Value::Str("b".into()),
                    Value::List(vec![Value::Float(2.5), Value::Str("x".into())])
                ),
            ])
        );
    }

    #[test]
    fn long1_is_signed() {
        assert_eq!(unpickle(&[0x8a, 1, 0xff, b'.']).unwrap(), Value::Int(-1));
        assert_eq!(
            unpickle(&[0x8a, 2, 0xff, 0x00, b'.']).unwrap(),
            Value::Int(255)
        );
        let wide = unpickle(&[0x8a, 40, 0, b'.']).unwrap_err();
        assert!(wide.contains("does not fit in 64 bits"), "{wide}");
    }

    #[test]
    fn a_4_gib_string_length_is_an_error_not_an_allocation() {
        let e = unpickle(&[b'X', 0xff, 0xff, 0xff, 0xff, b'a', b'.']).unwrap_err();
        assert!(
            e.contains("needs 4294967295 bytes but only 2 are left"),
            "{e}"
        );
        let e = unpickle(&[0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).unwrap_err();
        assert!(e.contains("bytes but only 0 are left"), "{e}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut p = vec![b'N'];
        p.extend(std::iter::repeat_n(0x85, 100_000));
        p.push(b'.');
        let e = unpickle(&p).unwrap_err();
        assert!(e.contains("nested deeper than 100 levels"), "{e}");
    }

    #[test]
    fn memo_doubling_is_bounded() {
        // x = [None]; then 64 times: x = (x, x), through the memo.
        let mut p = vec![b'N', b'q', 0];
        for _ in 0..64 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0, b'0']);
        }
        p.extend([b'h', 0, b'.']);
        let e = unpickle(&p).unwrap_err();
        assert!(e.contains("value limit"), "{e}");
    }

    #[test]
    fn structural_errors_are_errors() {
        for bad in [
            &b"."[..],
            b"a.",
            b"(u.",
            b"}K\x01u.",
            b"}(K\x01u.",
            b"h\x05.",
            b"N",
            b"cfoo",
            b"\xff",
            b"0.",
        ] {
            assert!(unpickle(bad).is_err(), "{bad:?}");
        }
    }
}
