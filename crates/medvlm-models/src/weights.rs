//! Weight files: open a model's weights as a candle [`VarBuilder`], check that
//! the file holds exactly the tensors the model asks for, and save weights
//! atomically.
//!
//! Supported formats:
//! - `model.safetensors`: memory-mapped (no copy until a tensor is used);
//! - `pytorch_model.bin` / `open_clip_pytorch_model.bin` (PyTorch zip pickle):
//!   read with `candle_core::pickle`, an opcode interpreter that only builds
//!   data (dicts, tuples, tensor references) and never imports or executes code.
//!
//! Storage dtypes f32, f16 and bf16 are converted to the compute dtype asked
//! for when the tensor is fetched.
//!
//! Loading goes through [`WeightFile::load`]: the model's own `load(vb, cfg)`
//! constructor runs against a checking backend that records every tensor the
//! model requests. Missing tensors and tensors of the wrong shape are replaced
//! by zeros so that loading continues and *all* problems are collected; at the
//! end any problem (including tensors in the file that the model never asked
//! for) becomes one [`ModelError::WeightsMismatch`] that lists them with shapes.
//!
//! With [`LoadMode::Trainable`] every loaded tensor is wrapped in a
//! [`candle_core::Var`] and registered in a [`VarMap`] under its checkpoint
//! name, so fine-tuning code (full, partial, BitFit) selects parameters by name
//! from the map; with [`LoadMode::Frozen`] the tensors are plain constants.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::error::{ModelError, NamedShape, Result, ShapeMismatch};

/// Buffers that checkpoints often carry but models do not need as weights
/// (HF `position_ids`, batch-norm counters). Suffix patterns, see [`name_matches`].
pub const DEFAULT_IGNORED: &[&str] = &["position_ids", "num_batches_tracked"];

/// On-disk format of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// safetensors, memory-mapped.
    Safetensors,
    /// PyTorch zip archive with a pickled state dict.
    PyTorchPickle,
}

impl WeightFormat {
    /// Format from the file name: `.safetensors` or `.bin` / `.pt` / `.pth`.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "safetensors" => Some(WeightFormat::Safetensors),
            "bin" | "pt" | "pth" => Some(WeightFormat::PyTorchPickle),
            _ => None,
        }
    }
}

/// How loaded tensors are held.
#[derive(Clone)]
pub enum LoadMode {
    /// Constant tensors (inference, frozen backbones).
    Frozen,
    /// Every tensor becomes a `Var` registered in this map under its checkpoint name.
    Trainable(VarMap),
}

impl std::fmt::Debug for LoadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadMode::Frozen => f.write_str("Frozen"),
            LoadMode::Trainable(_) => f.write_str("Trainable(VarMap)"),
        }
    }
}

enum Store {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pickle(candle_core::pickle::PthTensors),
}

/// An opened weight file: its tensor names/shapes/dtypes and lazy access to the data.
pub struct WeightFile {
    path: PathBuf,
    format: WeightFormat,
    store: Arc<Store>,
    infos: BTreeMap<String, (Vec<usize>, DType)>,
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl WeightFile {
    /// Open `path` (format from its extension) and read its tensor index.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let format = WeightFormat::from_path(&path).ok_or_else(|| ModelError::Weights {
            path: path.clone(),
            reason: "unknown weight file extension (expected .safetensors, .bin, .pt or .pth)"
                .into(),
        })?;
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                reason: "weight file does not exist".into(),
            });
        }
        let werr = |e: candle_core::Error| ModelError::Weights {
            path: path.clone(),
            reason: e.to_string(),
        };
        let mut infos = BTreeMap::new();
        let store = match format {
            WeightFormat::Safetensors => {
                // SAFETY: the file is memory-mapped read-only; like every mmap
                // user we rely on nobody truncating the file while it is open.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }
                    .map_err(werr)?;
                for (name, view) in st.tensors() {
                    let dt = DType::try_from(view.dtype()).map_err(|e| ModelError::Weights {
                        path: path.clone(),
                        reason: format!("tensor {name}: {e}"),
                    })?;
                    infos.insert(name, (view.shape().to_vec(), dt));
                }
                Store::Safetensors(st)
            }
            WeightFormat::PyTorchPickle => {
                let pth = open_pickle(&path)?;
                for (name, info) in pth.tensor_infos() {
                    infos.insert(name.clone(), (info.layout.dims().to_vec(), info.dtype));
                }
                Store::Pickle(pth)
            }
        };
        Ok(Self {
            path,
            format,
            store: Arc::new(store),
            infos,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's format.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Names, shapes and storage dtypes of all tensors in the file (sorted by name).
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], DType)> {
        self.infos
            .iter()
            .map(|(n, (s, d))| (n.as_str(), s.as_slice(), *d))
    }

    /// Shapes of all tensors, for [`check_tensors`].
    pub fn named_shapes(&self) -> Vec<NamedShape> {
        self.infos
            .iter()
            .map(|(n, (s, _))| NamedShape {
                name: n.clone(),
                shape: s.clone(),
            })
            .collect()
    }

    /// Read one tensor converted to `dtype` on `device`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = read_tensor(&self.store, name, device).map_err(|e| ModelError::Weights {
            path: self.path.clone(),
            reason: format!("tensor {name}: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// A plain (unchecked) VarBuilder over the file; prefer [`WeightFile::load`].
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = CheckingBackend {
            store: self.store.clone(),
            infos: Arc::new(self.infos.clone()),
            log: Arc::new(Mutex::new(RequestLog::default())),
            varmap: None,
            lenient: false,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Build a model with `build(vb)` against this file, checking names and shapes.
    ///
    /// `ignore_unexpected` lists patterns (see [`name_matches`]) of file tensors
    /// the model is allowed not to use, e.g. [`DEFAULT_IGNORED`].
    pub fn load<M>(
        &self,
        dtype: DType,
        device: &Device,
        mode: &LoadMode,
        ignore_unexpected: &[&str],
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<M> {
        let log = Arc::new(Mutex::new(RequestLog::default()));
        let backend = CheckingBackend {
            store: self.store.clone(),
            infos: Arc::new(self.infos.clone()),
            log: log.clone(),
            varmap: match mode {
                LoadMode::Frozen => None,
                LoadMode::Trainable(vm) => Some(vm.clone()),
            },
            lenient: true,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let built = build(vb);
        let log = log
            .lock()
            .map_err(|_| ModelError::invalid("weight request log poisoned"))?;
        if let Some(err) = &log.read_error {
            return Err(ModelError::Weights {
                path: self.path.clone(),
                reason: err.clone(),
            });
        }
        let requested: Vec<NamedShape> = log.requested.clone();
        drop(log);
        check_tensors(
            &self.path,
            &requested,
            &self.named_shapes(),
            ignore_unexpected,
        )?;
        Ok(built?)
    }
}

fn open_pickle(path: &Path) -> Result<candle_core::pickle::PthTensors> {
    // A .bin is a zip archive holding `*/data.pkl`; the state dict may be the
    // top-level object or sit under "state_dict" (open_clip training checkpoints).
    let werr = |e: candle_core::Error| ModelError::Weights {
        path: path.to_path_buf(),
        reason: format!("not a readable PyTorch zip checkpoint: {e}"),
    };
    check_pickle_lengths(path)?;
    // candle's pickle reader indexes tuples from the file without checking their length; a
    // damaged file must be this file's error, not a panic.
    let open = |key: Option<&str>| {
        medvlm_io::guard::quiet_catch(|| candle_core::pickle::PthTensors::new(path, key)).map_err(
            |reason| ModelError::Weights {
                path: path.to_path_buf(),
                reason,
            },
        )
    };
    let pth = open(None)?.map_err(werr)?;
    if pth.tensor_infos().is_empty() {
        if let Ok(Ok(inner)) = open(Some("state_dict")) {
            if !inner.tensor_infos().is_empty() {
                return Ok(inner);
            }
        }
        return Err(ModelError::Weights {
            path: path.to_path_buf(),
            reason: "the pickle holds no tensors (expected a state dict)".into(),
        });
    }
    Ok(pth)
}

/// Refuses a PyTorch zip checkpoint whose `data.pkl` declares a string or bytes object longer
/// than the pickle itself. candle's reader allocates such a length before reading it, so a
/// damaged 200 kB file could ask for 4 GB and abort the process (an allocation failure cannot
/// be caught). The scan walks the opcodes of pickle protocols 0-5 with their argument sizes
/// and stops at STOP or at an opcode it does not know (candle reports those).
fn check_pickle_lengths(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |reason: String| ModelError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| bad(format!("not a readable PyTorch zip checkpoint: {e}")))?;
    let Some(name) = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_string)
    else {
        return Err(bad("no data.pkl in the zip archive".into()));
    };
    let entry = archive
        .by_name(&name)
        .map_err(|e| bad(format!("{name}: {e}")))?;
    // The pickle holds only the structure (tensor data are other entries): 256 MB is far
    // beyond any real checkpoint's data.pkl.
    const MAX_PICKLE: u64 = 256 << 20;
    let mut pickle = Vec::new();
    entry
        .take(MAX_PICKLE + 1)
        .read_to_end(&mut pickle)
        .map_err(|e| bad(format!("{name}: {e}")))?;
    if pickle.len() as u64 > MAX_PICKLE {
        return Err(bad(format!("{name} is larger than {MAX_PICKLE} bytes")));
    }
    scan_pickle(&pickle).map_err(|r| bad(format!("{name}: {r}")))
}

/// Walks pickle opcodes, checking every declared length against the bytes left.
fn scan_pickle(b: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let uint = |at: usize, n: usize| -> Option<u64> {
        let s = b.get(at..at + n)?;
        let mut v = 0u64;
        for (k, &x) in s.iter().enumerate() {
            v |= u64::from(x) << (8 * k);
        }
        Some(v)
    };
    let truncated = |op: u8, at: usize| format!("truncated at opcode 0x{op:02x} (byte {at})");
    while i < b.len() {
        let op = b[i];
        let at = i;
        i += 1;
        // (bytes of a length prefix, or of a fixed argument with no payload)
        let (prefix, payload): (usize, bool) = match op {
            b'.' => return Ok(()), // STOP
            // fixed-size arguments
            b'K' | b'q' | b'h' | 0x80 | 0x82 => (1, false),
            b'M' | 0x83 => (2, false),
            b'J' | b'r' | b'j' | 0x84 => (4, false),
            b'G' | 0x95 => (8, false),
            // length-prefixed payloads
            b'C' | b'U' | 0x8c | 0x8a => (1, true),
            b'X' | b'B' | b'T' | 0x8b => (4, true),
            0x8d | 0x8e | 0x96 => (8, true),
            // newline-terminated arguments (GLOBAL and INST take two lines)
            b'c' | b'i' | b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'p' | b'g' => {
                let lines = if op == b'c' || op == b'i' { 2 } else { 1 };
                for _ in 0..lines {
                    match b[i..].iter().position(|&x| x == b'\n') {
                        Some(n) => i += n + 1,
                        None => return Err(truncated(op, at)),
                    }
                }
                continue;
            }
            // no argument
            b'('
            | b')'
            | b']'
            | b'}'
            | b'a'
            | b'e'
            | b's'
            | b'u'
            | b't'
            | b'N'
            | b'R'
            | b'b'
            | b'0'
            | b'1'
            | b'2'
            | b'Q'
            | b'l'
            | b'd'
            | b'o'
            | 0x81
            | 0x85..=0x94
            | 0x97
            | 0x98 => (0, false),
            // an opcode this scan does not know: leave the verdict to candle
            _ => return Ok(()),
        };
        let Some(n) = uint(i, prefix) else {
            return Err(truncated(op, at));
        };
        i += prefix;
        if payload {
            let left = (b.len() - i) as u64;
            if n > left {
                return Err(format!(
                    "opcode 0x{op:02x} at byte {at} declares {n} bytes but only {left} follow \
                     (a damaged file)"
                ));
            }
            i += n as usize;
        }
    }
    Err("the pickle ends without a STOP opcode".into())
}

fn read_tensor(store: &Store, name: &str, device: &Device) -> candle_core::Result<Tensor> {
    match store {
        Store::Safetensors(st) => st.load(name, device),
        Store::Pickle(p) => match p.get(name)? {
            Some(t) => t.to_device(device),
            None => candle_core::bail!("tensor {name} not found"),
        },
    }
}

/// Whether tensor `name` matches `pattern`: equal, or `name` ends with
/// `.pattern`, or `pattern` ends with `.` and `name` starts with it.
pub fn name_matches(name: &str, pattern: &str) -> bool {
    if name == pattern {
        return true;
    }
    if pattern.ends_with('.') {
        return name.starts_with(pattern);
    }
    name.strip_suffix(pattern)
        .is_some_and(|head| head.ends_with('.'))
}

/// Compare the tensors a model expects with those present in a file.
///
/// Returns [`ModelError::WeightsMismatch`] naming `path` and listing missing,
/// unexpected (not matching `ignore_unexpected`) and wrongly shaped tensors.
pub fn check_tensors(
    path: &Path,
    expected: &[NamedShape],
    present: &[NamedShape],
    ignore_unexpected: &[&str],
) -> Result<()> {
    let present_map: BTreeMap<&str, &[usize]> = present
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    let expected_names: HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut missing = Vec::new();
    let mut wrong_shape = Vec::new();
    let mut seen = HashSet::new();
    for e in expected {
        if !seen.insert(e.name.as_str()) {
            continue;
        }
        match present_map.get(e.name.as_str()) {
            None => missing.push(e.clone()),
            Some(shape) if *shape != e.shape.as_slice() => wrong_shape.push(ShapeMismatch {
                name: e.name.clone(),
                expected: e.shape.clone(),
                found: shape.to_vec(),
            }),
            Some(_) => {}
        }
    }
    let unexpected: Vec<NamedShape> = present
        .iter()
        .filter(|p| !expected_names.contains(p.name.as_str()))
        .filter(|p| {
            !ignore_unexpected
                .iter()
                .any(|pat| name_matches(&p.name, pat))
        })
        .cloned()
        .collect();
    if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
        Ok(())
    } else {
        Err(ModelError::WeightsMismatch {
            path: path.to_path_buf(),
            missing,
            unexpected,
            wrong_shape,
        })
    }
}

#[derive(Default)]
struct RequestLog {
    requested: Vec<NamedShape>,
    read_error: Option<String>,
}

/// VarBuilder backend that serves tensors from a [`WeightFile`], records
/// each request, and (in lenient mode) substitutes zeros for missing or
/// misshapen tensors so every problem is reported at once.
struct CheckingBackend {
    store: Arc<Store>,
    infos: Arc<BTreeMap<String, (Vec<usize>, DType)>>,
    log: Arc<Mutex<RequestLog>>,
    varmap: Option<VarMap>,
    lenient: bool,
}

impl CheckingBackend {
    fn record(&self, name: &str, shape: &[usize]) {
        if let Ok(mut log) = self.log.lock() {
            log.requested.push(NamedShape {
                name: name.to_string(),
                shape: shape.to_vec(),
            });
        }
    }

    fn register(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        match &self.varmap {
            None => Ok(t),
            Some(vm) => {
                let mut data = vm
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
                if let Some(existing) = data.get(name) {
                    // Tied weights requested twice share one Var.
                    return Ok(existing.as_tensor().clone());
                }
                let var = Var::from_tensor(&t)?;
                let out = var.as_tensor().clone();
                data.insert(name.to_string(), var);
                Ok(out)
            }
        }
    }
}

impl SimpleBackend for CheckingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.record(name, s.dims());
        let matches = self
            .infos
            .get(name)
            .is_some_and(|(shape, _)| shape.as_slice() == s.dims());
        if !matches {
            if self.lenient {
                // Reported by check_tensors after the build finishes.
                let z = Tensor::zeros(s, dtype, dev)?;
                return self.register(name, z);
            }
            match self.infos.get(name) {
                None => candle_core::bail!("tensor {name} not found"),
                Some((shape, _)) => {
                    candle_core::bail!("tensor {name}: expected shape {s:?}, found {shape:?}")
                }
            }
        }
        let t = match read_tensor(&self.store, name, dev).and_then(|t| t.to_dtype(dtype)) {
            Ok(t) => t,
            Err(e) => {
                if let Ok(mut log) = self.log.lock() {
                    log.read_error.get_or_insert(format!("tensor {name}: {e}"));
                }
                return Err(e);
            }
        };
        self.register(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((shape, _)) = self.infos.get(name) else {
            candle_core::bail!("tensor {name} not found")
        };
        let shape = shape.clone();
        self.get(
            Shape::from(shape),
            name,
            candle_nn::Init::Const(0.),
            dtype,
            dev,
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }
}

/// Write named tensors to a safetensors file atomically (temp file in the
/// same folder, then rename), so readers never see a half-written file.
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> Result<()> {
    medvlm_io::atomic::write_atomic_via(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        reason: format!("cannot write: {}", e.into_io()),
    })
}

/// Save all variables of `varmap` (checkpoint names) to `path` atomically.
pub fn save_varmap_atomic(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::invalid("VarMap lock poisoned"))?;
    let tensors = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    save_safetensors_atomic(path, &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_patterns() {
        assert!(name_matches(
            "text_model.embeddings.position_ids",
            "position_ids"
        ));
        assert!(!name_matches(
            "text_model.embeddings.xposition_ids",
            "position_ids"
        ));
        assert!(name_matches("pooler.dense.weight", "pooler."));
        assert!(!name_matches("encoder.pooler.dense.weight", "pooler."));
    }

    fn ns(name: &str, shape: &[usize]) -> NamedShape {
        NamedShape {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn checker_lists_missing_unexpected_and_wrong_shapes() {
        let expected = vec![ns("a.weight", &[2, 3]), ns("b.weight", &[4]), ns("c", &[1])];
        let present = vec![
            ns("a.weight", &[2, 3]),
            ns("b.weight", &[5]),
            ns("d.bias", &[7]),
            ns("x.position_ids", &[1, 77]),
        ];
        let err = check_tensors(
            Path::new("m.safetensors"),
            &expected,
            &present,
            DEFAULT_IGNORED,
        )
        .unwrap_err();
        match &err {
            ModelError::WeightsMismatch {
                missing,
                unexpected,
                wrong_shape,
                ..
            } => {
                assert_eq!(missing, &vec![ns("c", &[1])]);
                assert_eq!(unexpected, &vec![ns("d.bias", &[7])]);
                assert_eq!(wrong_shape.len(), 1);
                assert_eq!(wrong_shape[0].found, vec![5]);
            }
            other => panic!("unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("m.safetensors"), "{msg}");
        assert!(msg.contains("missing:    c [1]"), "{msg}");
        assert!(msg.contains("unexpected: d.bias [7]"), "{msg}");
        assert!(msg.contains("b.weight expected [4], found [5]"), "{msg}");
        check_tensors(Path::new("m"), &expected[..1], &present[..1], &[]).unwrap();
    }

    #[test]
    fn pickle_lengths_beyond_the_data_are_refused_before_reading() {
        // PROTO 2, EMPTY_DICT, BINPUT 0, SHORT_BINUNICODE "ab", STOP: fine.
        super::scan_pickle(b"\x80\x02}q\x00\x8c\x02ab.").unwrap();
        // GLOBAL with its two lines, then STOP.
        super::scan_pickle(b"\x80\x02ctorch\nFloatStorage\nq\x01.").unwrap();
        // BINUNICODE declaring 2 GB in a 12-byte pickle (what made candle allocate it).
        let e = super::scan_pickle(b"\x80\x02X\xff\xff\xff\x7fabc.").unwrap_err();
        assert!(
            e.contains("declares 2147483647 bytes but only 4 follow"),
            "{e}"
        );
        // Truncated argument and a missing STOP.
        assert!(super::scan_pickle(b"\x80")
            .unwrap_err()
            .contains("truncated"));
        assert!(super::scan_pickle(b"\x80\x02}")
            .unwrap_err()
            .contains("without a STOP"));
    }
}
