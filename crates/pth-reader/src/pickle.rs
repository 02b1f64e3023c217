//! A restricted unpickler for PyTorch state dicts: the opcodes `torch.save` writes (protocols
//! 2 to 4), no code run, no class instantiated. It knows four callables — `OrderedDict` (an
//! empty dict), `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` (a tensor view of a
//! storage) and `_rebuild_parameter` (the tensor it wraps); anything else it builds is an
//! opaque object that the state dict then skips.
//!
//! Why not a general unpickler: a pickle is a program, and a hostile one can ask for a
//! string of 4 GB, nest tuples a million deep (a recursive drop overflows the stack) or
//! double an object with every memo fetch. Here every length is checked against the bytes
//! left, nesting is capped, memo fetches share instead of copying, and the copying that
//! mutation of shared containers needs is counted against a budget proportional to the input.

use std::collections::HashMap;
use std::rc::Rc;

/// Deepest nesting of containers accepted (a state dict needs 4).
const MAX_DEPTH: usize = 64;

/// A pickle that cannot be read as a state dict: where (byte offset) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pickle byte {offset}: {message}")]
pub struct PickleError {
    /// Byte offset of the opcode at fault.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// A storage as the pickle names it (its bytes are `<prefix>data/<key>` in the archive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The storage class's name (`FloatStorage`, ...), which gives the dtype.
    pub class: String,
    /// The key: the file name under `data/`.
    pub key: String,
    /// Elements the storage holds, as the pickle says.
    pub numel: u64,
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// Its storage.
    pub storage: StorageRef,
    /// First element, in elements of the storage.
    pub offset: u64,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Strides, in elements.
    pub strides: Vec<u64>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Global(Rc<str>, Rc<str>),
    /// A tuple or a list.
    Seq(Rc<Container<Value>>),
    Dict(Rc<Container<(Value, Value)>>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// What an unknown callable or class would have built.
    Object,
}

#[derive(Debug, Clone)]
struct Container<T> {
    items: Vec<T>,
    depth: usize,
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Seq(c) => c.depth,
            Value::Dict(c) => c.depth,
            _ => 0,
        }
    }

    fn seq(items: Vec<Value>) -> Value {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        Value::Seq(Rc::new(Container { items, depth }))
    }

    fn dict(items: Vec<(Value, Value)>) -> Value {
        let depth = 1 + items
            .iter()
            .map(|(k, v)| k.depth().max(v.depth()))
            .max()
            .unwrap_or(0);
        Value::Dict(Rc::new(Container { items, depth }))
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Global(..) => "a global",
            Value::Seq(_) => "a tuple or list",
            Value::Dict(_) => "a dict",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Object => "an object",
        }
    }
}

/// The unpickler's state over one pickle.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for errors.
    op_at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Elements copied so far by mutation of shared containers, and the most allowed.
    copied: usize,
    copy_budget: usize,
}

/// Runs `pickle` and returns the state dict it builds: every `name → tensor` entry of the
/// top-level dict (entries whose value is not a tensor are skipped, as `_metadata` is).
pub fn state_dict(pickle: &[u8]) -> Result<Vec<(String, TensorRef)>, PickleError> {
    let mut m = Machine {
        data: pickle,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
        copy_budget: 1 << 20 | pickle.len().saturating_mul(16),
    };
    let top = m.run()?;
    let Value::Dict(dict) = top else {
        return Err(m.error(format!("the pickle holds {}, not a state dict", top.kind())));
    };
    let mut out = Vec::new();
    for (k, v) in &dict.items {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            out.push((name.to_string(), (**t).clone()));
        }
    }
    Ok(out)
}

impl Machine<'_> {
    fn error(&self, message: impl Into<String>) -> PickleError {
        PickleError {
            offset: self.op_at,
            message: message.into(),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], PickleError> {
        if n > self.data.len() - self.pos {
            return Err(self.error(format!(
                "needs {n} bytes, {} are left",
                self.data.len() - self.pos
            )));
        }
        let b = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn le(&mut self, n: usize) -> Result<u64, PickleError> {
        Ok(self
            .bytes(n)?
            .iter()
            .rev()
            .fold(0u64, |v, &b| v << 8 | u64::from(b)))
    }

    fn line(&mut self) -> Result<Rc<str>, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.error("GLOBAL without a newline"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, len: u64) -> Result<Value, PickleError> {
        let len = usize::try_from(len).map_err(|_| self.error("string length overflows"))?;
        let err = self.error("string is not UTF-8");
        let b = self.bytes(len)?;
        let s = std::str::from_utf8(b).map_err(|_| err)?.into();
        Ok(Value::Str(s))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if v.depth() > MAX_DEPTH {
            return Err(self.error(format!("containers nested deeper than {MAX_DEPTH}")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err(self.error("pops past a MARK"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.error("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let at = self
            .marks
            .pop()
            .ok_or_else(|| self.error("no MARK to pop to"))?;
        Ok(self.stack.split_off(at))
    }

    /// The container on top of the stack, made unique (copied if a memo entry shares it; the
    /// copy is counted against the budget).
    fn top_mut(&mut self) -> Result<&mut Value, PickleError> {
        if self.marks.last() == Some(&self.stack.len()) || self.stack.is_empty() {
            return Err(self.error("no container on the stack"));
        }
        let len = match self.stack.last() {
            Some(Value::Seq(c)) if Rc::strong_count(c) > 1 => c.items.len(),
            Some(Value::Dict(c)) if Rc::strong_count(c) > 1 => c.items.len(),
            _ => 0,
        };
        self.copied += len;
        if self.copied > self.copy_budget {
            return Err(self.error("too much copying of shared containers"));
        }
        Ok(self.stack.last_mut().expect("checked"))
    }

    fn extend_list(&mut self, values: Vec<Value>) -> Result<(), PickleError> {
        let deepest = values.iter().map(Value::depth).max().unwrap_or(0);
        let depth_error = self.error(format!("containers nested deeper than {MAX_DEPTH}"));
        match self.top_mut()? {
            Value::Seq(c) => {
                let c = Rc::make_mut(c);
                c.items.extend(values);
                c.depth = c.depth.max(deepest + 1);
                if c.depth > MAX_DEPTH {
                    return Err(depth_error);
                }
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.error(format!("APPEND to {kind}")))
            }
        }
    }

    fn extend_dict(&mut self, mut flat: Vec<Value>) -> Result<(), PickleError> {
        if !flat.len().is_multiple_of(2) {
            return Err(self.error("SETITEMS with an odd number of values"));
        }
        let deepest = flat.iter().map(Value::depth).max().unwrap_or(0);
        let depth_error = self.error(format!("containers nested deeper than {MAX_DEPTH}"));
        match self.top_mut()? {
            Value::Dict(c) => {
                let c = Rc::make_mut(c);
                let mut it = flat.drain(..);
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    c.items.push((k, v));
                }
                c.depth = c.depth.max(deepest + 1);
                if c.depth > MAX_DEPTH {
                    return Err(depth_error);
                }
                Ok(())
            }
            // Items set on an object (a dict subclass we do not model) are dropped with it.
            Value::Object => Ok(()),
            other => {
                let kind = other.kind();
                Err(self.error(format!("SETITEM on {kind}")))
            }
        }
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.op_at = self.pos;
            let op = *self.bytes(1)?.first().expect("one byte");
            match op {
                0x80 => {
                    self.bytes(1)?; // PROTO
                }
                0x95 => {
                    self.bytes(8)?; // FRAME: a length hint only
                }
                b'.' => {
                    let top = self.pop()?;
                    return Ok(top);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(module, name))?;
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.error("STACK_GLOBAL without two strings"));
                    };
                    self.push(Value::Global(module, name))?;
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.push(Value::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.le(1)?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.le(1)? as usize;
                    if n > 8 {
                        return Err(self.error(format!("LONG1 of {n} bytes")));
                    }
                    let raw = self.le(n)?;
                    let v = if n == 0 {
                        0
                    } else {
                        let shift = 64 - 8 * n as u32;
                        ((raw << shift) as i64) >> shift
                    };
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    self.bytes(8)?;
                    self.push(Value::Float)?;
                }
                b'X' => {
                    let n = self.le(4)?;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.le(1)?;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.le(8)?;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?;
                }
                b'(' => self.marks.push(self.stack.len()),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::seq(items))?;
                }
                b')' => self.push(Value::seq(Vec::new()))?,
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::seq(items))?;
                }
                b']' => self.push(Value::seq(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::seq(items))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                b'}' => self.push(Value::dict(Vec::new()))?,
                b'd' => {
                    let flat = self.pop_mark()?;
                    self.push(Value::dict(Vec::new()))?;
                    self.extend_dict(flat)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![k, v])?;
                }
                b'u' => {
                    let flat = self.pop_mark()?;
                    self.extend_dict(flat)?;
                }
                b'q' | b'r' | 0x94 => {
                    let id = match op {
                        b'q' => self.le(1)? as u32,
                        b'r' => self.le(4)? as u32,
                        _ => self.memo.len() as u32,
                    };
                    let top = self
                        .stack
                        .last()
                        .filter(|_| self.marks.last() != Some(&self.stack.len()))
                        .cloned()
                        .ok_or_else(|| self.error("memo put of nothing"))?;
                    self.memo.insert(id, top);
                }
                b'h' | b'j' => {
                    let id = if op == b'h' {
                        self.le(1)? as u32
                    } else {
                        self.le(4)? as u32
                    };
                    let v = self
                        .memo
                        .get(&id)
                        .cloned()
                        .ok_or_else(|| self.error(format!("memo {id} was never put")))?;
                    self.push(v)?;
                }
                0x88 | 0x89 => self.push(Value::Bool)?,
                b'N' => self.push(Value::None)?,
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                0x81 => {
                    self.pop()?;
                    self.pop()?;
                    self.push(Value::Object)?;
                }
                b'b' => {
                    // BUILD sets an object's state; a dict keeps its items (the state of
                    // torch's OrderedDict is its `_metadata`, which no tensor needs).
                    self.pop()?;
                    self.top_mut()?;
                }
                other => {
                    return Err(self.error(format!(
                        "opcode 0x{other:02x} is not one a PyTorch state dict uses"
                    )))
                }
            }
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value, PickleError> {
        let bad =
            || self.error("a persistent id that is not ('storage', class, key, location, numel)");
        let Value::Seq(t) = pid else {
            return Err(bad());
        };
        match t.items.as_slice() {
            [Value::Str(tag), Value::Global(_, class), Value::Str(key), _, Value::Int(numel)]
                if &**tag == "storage" && *numel >= 0 =>
            {
                Ok(Value::Storage(Rc::new(StorageRef {
                    class: class.to_string(),
                    key: key.to_string(),
                    numel: *numel as u64,
                })))
            }
            _ => Err(bad()),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let Value::Global(module, name) = &callable else {
            return Ok(Value::Object);
        };
        let args = match &args {
            Value::Seq(t) => t.items.as_slice(),
            _ => return Ok(Value::Object),
        };
        Ok(match (&**module, &**name) {
            ("collections", "OrderedDict") if args.is_empty() => Value::dict(Vec::new()),
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                let [Value::Storage(s), Value::Int(offset), size, stride, ..] = args else {
                    return Err(self.error(format!(
                        "{name} with arguments other than (storage, offset, size, stride, ...)"
                    )));
                };
                let ints = |v: &Value| match v {
                    Value::Seq(t) => t
                        .items
                        .iter()
                        .map(|x| match x {
                            Value::Int(i) if *i >= 0 => Some(*i as u64),
                            _ => None,
                        })
                        .collect::<Option<Vec<u64>>>(),
                    _ => None,
                };
                let (Some(shape), Some(strides)) = (ints(size), ints(stride)) else {
                    return Err(
                        self.error(format!("{name}: size or stride is not a tuple of ints"))
                    );
                };
                if shape.len() != strides.len() || *offset < 0 {
                    return Err(self.error(format!(
                        "{name}: {} sizes but {} strides, offset {offset}",
                        shape.len(),
                        strides.len()
                    )));
                }
                Value::Tensor(Rc::new(TensorRef {
                    storage: (**s).clone(),
                    offset: *offset as u64,
                    shape,
                    strides,
                }))
            }
            ("torch._utils", "_rebuild_parameter") => match args.first() {
                Some(t @ Value::Tensor(_)) => t.clone(),
                _ => Value::Object,
            },
            _ => Value::Object,
        })
    }
}
