//! PyTorch zip checkpoints (`pytorch_model.bin`, `adapter_model.bin`: what `torch.save` has
//! written since PyTorch 1.6) read as untrusted input.
//!
//! The archive holds `<dir>/data.pkl`, a pickled state dict whose tensors are strided views
//! of storages, and `<dir>/data/<key>`, each storage's bytes. [`pickle::state_dict`] reads the
//! pickle without running it; [`Archive`] then checks every tensor against its storage before
//! anything is read (dtype known, strides in bounds, the storage entry present, uncompressed
//! and as long as the pickle says), so a file that claims more than it holds fails at open
//! with the tensor named, and reading a tensor allocates only bytes the file has.
//!
//! ```no_run
//! let mut archive = pth_reader::Archive::open(std::path::Path::new("pytorch_model.bin"))?;
//! let names: Vec<String> = archive.tensors().keys().cloned().collect();
//! for name in names {
//!     let bytes = archive.read(&name)?.expect("listed"); // row-major, little-endian
//!     println!("{name}: {:?} {}", archive.tensors()[&name].shape, bytes.len());
//! }
//! # Ok::<(), pth_reader::Error>(())
//! ```

pub mod pickle;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub use pickle::{PickleError, StorageRef, TensorRef};

/// The largest `data.pkl` read (a state dict of 10,000 tensors pickles to about 1 MB).
const MAX_PICKLE: u64 = 64 << 20;
/// Most dimensions of a tensor.
const MAX_DIMS: usize = 32;

/// Why a checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a readable zip archive, or no `data.pkl` in it.
    #[error("not a PyTorch zip checkpoint: {0}")]
    Archive(String),
    /// The pickle is malformed or not a state dict.
    #[error("data.pkl: {0}")]
    Pickle(#[from] PickleError),
    /// A tensor's description does not fit its storage.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Element types of PyTorch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// float64.
    F64,
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    BF16,
    /// int64.
    I64,
    /// int32.
    I32,
    /// int16.
    I16,
    /// int8.
    I8,
    /// uint8.
    U8,
    /// bool (one byte).
    Bool,
}

impl Dtype {
    /// From the storage class name the pickle gives (`FloatStorage`, ...).
    pub fn from_storage_class(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Dtype::F64,
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// A tensor of the state dict, checked against its storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub strides: Vec<usize>,
    /// First element in the storage.
    pub offset: usize,
    /// The archive entry holding the storage.
    pub entry: String,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the elements lie in row-major order from `offset` on.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }
}

/// An opened checkpoint: its tensors, checked, and the archive to read them from.
pub struct Archive<R> {
    zip: zip::ZipArchive<R>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Archive<std::io::BufReader<std::fs::File>> {
    /// Opens a checkpoint file.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::new(std::io::BufReader::new(std::fs::File::open(path)?))
    }
}

impl<R: Read + Seek> Archive<R> {
    /// Reads the archive's index and state dict, and checks every tensor against its storage.
    pub fn new(mut reader: R) -> Result<Self, Error> {
        let len = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(0))?;
        let archive_err = |e: zip::result::ZipError| Error::Archive(e.to_string());
        let mut zip = zip::ZipArchive::new(reader).map_err(archive_err)?;
        let names: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok())
            .map(|n| n.into_owned())
            .collect();
        let pickles: Vec<&String> = names
            .iter()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let [pkl] = pickles.as_slice() else {
            return Err(Error::Archive(format!(
                "{} top-level data.pkl entries (one expected; the pre-1.6 format is not supported)",
                pickles.len()
            )));
        };
        let prefix = pkl.strip_suffix("data.pkl").expect("filtered").to_string();
        if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut order = String::new();
            f.by_ref().take(16).read_to_string(&mut order)?;
            if order.trim() != "little" {
                return Err(Error::Archive(format!(
                    "byte order `{}` is not little-endian",
                    order.trim()
                )));
            }
        }
        let mut pickle = Vec::new();
        zip.by_name(pkl)
            .map_err(archive_err)?
            .take(MAX_PICKLE + 1)
            .read_to_end(&mut pickle)?;
        if pickle.len() as u64 > MAX_PICKLE {
            return Err(Error::Archive(format!(
                "data.pkl is larger than {MAX_PICKLE} bytes"
            )));
        }
        let mut tensors = BTreeMap::new();
        for (name, t) in pickle::state_dict(&pickle)? {
            let info = check(&mut zip, len, &prefix, &t).map_err(|message| Error::Tensor {
                name: name.clone(),
                message,
            })?;
            tensors.insert(name, info);
        }
        Ok(Archive { zip, tensors })
    }

    /// The state dict's tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The bytes of tensor `name`, row-major and little-endian (`None`: no such tensor).
    pub fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let size = info.dtype.size();
        let mut entry = self
            .zip
            .by_name(&info.entry)
            .map_err(|e| Error::Archive(e.to_string()))?;
        let numel = info.numel();
        if numel == 0 {
            return Ok(Some(Vec::new()));
        }
        if info.is_contiguous() {
            std::io::copy(
                &mut entry.by_ref().take((info.offset * size) as u64),
                &mut std::io::sink(),
            )?;
            let mut out = vec![0u8; numel * size];
            entry.read_exact(&mut out)?;
            return Ok(Some(out));
        }
        // A strided view: read the storage up to the last element, then gather.
        let last = last_element(info).expect("checked at open");
        let mut storage = vec![0u8; (last + 1) * size];
        entry.read_exact(&mut storage)?;
        let mut out = Vec::with_capacity(numel * size);
        let mut index = vec![0usize; info.shape.len()];
        for _ in 0..numel {
            let at = info.offset
                + index
                    .iter()
                    .zip(&info.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&storage[at * size..(at + 1) * size]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < info.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(Some(out))
    }
}

/// The storage index of a non-empty tensor's last element (`None` on overflow).
fn last_element(info: &TensorInfo) -> Option<usize> {
    info.shape
        .iter()
        .zip(&info.strides)
        .try_fold(info.offset, |acc, (&d, &s)| {
            acc.checked_add((d - 1).checked_mul(s)?)
        })
}

/// Checks a pickled tensor against its storage entry (present, uncompressed, as long as the
/// pickle says, inside the archive) and returns it as a [`TensorInfo`].
fn check<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    archive_len: u64,
    prefix: &str,
    t: &TensorRef,
) -> Result<TensorInfo, String> {
    let dtype = Dtype::from_storage_class(&t.storage.class)
        .ok_or_else(|| format!("storage class `{}` is not supported", t.storage.class))?;
    let usize_of = |v: u64| usize::try_from(v).map_err(|_| format!("{v} overflows"));
    if t.shape.len() > MAX_DIMS {
        return Err(format!("{} dimensions", t.shape.len()));
    }
    let shape = t
        .shape
        .iter()
        .map(|&d| usize_of(d))
        .collect::<Result<Vec<_>, _>>()?;
    let strides = t
        .strides
        .iter()
        .map(|&d| usize_of(d))
        .collect::<Result<Vec<_>, _>>()?;
    let info = TensorInfo {
        dtype,
        offset: usize_of(t.offset)?,
        entry: format!("{prefix}data/{}", t.storage.key),
        shape,
        strides,
    };
    let storage_bytes = t
        .storage
        .numel
        .checked_mul(dtype.size() as u64)
        .ok_or("storage size overflows")?;
    let file = zip
        .by_name(&info.entry)
        .map_err(|_| format!("its storage `{}` is not in the archive", info.entry))?;
    if file.compression() != zip::CompressionMethod::Stored {
        return Err(format!("its storage `{}` is compressed", info.entry));
    }
    if file.size() < storage_bytes || file.size() > archive_len {
        return Err(format!(
            "its storage `{}` holds {} bytes, the pickle says {storage_bytes}",
            info.entry,
            file.size()
        ));
    }
    let numel = info
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("its element count overflows")?;
    if (numel as u64).saturating_mul(dtype.size() as u64) > storage_bytes {
        // An expanded view (stride 0) would be materialised larger than the file backs.
        return Err(format!(
            "shape {:?} has more elements than its storage of {}",
            info.shape, t.storage.numel
        ));
    }
    if numel > 0 {
        let last = last_element(&info).ok_or("its strides overflow")?;
        if last as u64 >= t.storage.numel {
            return Err(format!(
                "shape {:?}, strides {:?} and offset {} reach element {last} of a storage of {}",
                info.shape, info.strides, info.offset, t.storage.numel
            ));
        }
    }
    Ok(info)
}
