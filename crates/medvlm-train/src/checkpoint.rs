//! Training checkpoints: weights, optimiser state and loop state, written atomically so a
//! run killed at any instant (SIGKILL, power loss) resumes from the last complete checkpoint
//! and continues on exactly the same trajectory.
//!
//! Layout under the checkpoint root:
//!
//! ```text
//! <root>/step-000123/model.safetensors      trainable weights, by parameter name
//! <root>/step-000123/optimizer.safetensors  AdamW moments (exp_avg.<name>, exp_avg_sq.<name>)
//! <root>/step-000123/state.json             CheckpointState: step, epoch, position in the
//!                                           epoch, seed, RNG states, AdamW step counters and
//!                                           settings, config hash
//! <root>/latest                             name of the newest complete checkpoint directory
//! ```
//!
//! Atomicity: a checkpoint is written into a hidden temporary directory in the same root,
//! every file is fsynced, the directory is fsynced and then renamed to `step-NNNNNN` (rename is
//! atomic on POSIX file systems), and only then is `latest` replaced (temporary file, fsync,
//! rename, fsync of the root). A directory named `step-*` is therefore always complete, and
//! `latest` never points to a partial checkpoint. Temporary directories left by a crash are
//! removed by the next save.
//!
//! What must be saved for an exact resume: everything that influences the trajectory. The
//! weights, the optimiser moments and per-parameter step counters, the update count (which is
//! also the learning-rate schedule position), the epoch and the number of micro-batches already
//! consumed in it (data order is re-derived from `seed` and the epoch), and the exact state of
//! every random generator still in use (augmentation, dropout), captured as [`RngState`].

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::optim::{AdamW, AdamWMeta, NamedVar, OptimError};

/// File name of the weights inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the optimiser moments inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the JSON state inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";
/// Pointer file naming the newest complete checkpoint directory.
pub const LATEST_FILE: &str = "latest";
/// Version of the checkpoint format written by this code.
pub const FORMAT_VERSION: u32 = 1;

const TMP_PREFIX: &str = ".tmp-step-";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file system operation failed.
    #[error("checkpoint I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file exists but its content is not what a checkpoint contains.
    #[error("invalid checkpoint file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint does not fit the model or run being resumed.
    #[error("checkpoint {path} does not match this run: {reason}")]
    Mismatch {
        /// The checkpoint directory.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Restoring the optimiser failed.
    #[error("checkpoint {path}: {source}")]
    Optimizer {
        /// The checkpoint directory.
        path: PathBuf,
        /// The optimiser error.
        source: OptimError,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, CheckpointError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The exact state of a ChaCha8 generator (seed, stream and position in the key stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex-encoded.
    pub seed_hex: String,
    /// Stream number.
    pub stream: u64,
    /// Position in the key stream, in 32-bit words (decimal string: JSON has no u128).
    pub word_pos: String,
}

impl RngState {
    /// Captures the state of `rng`.
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        let seed_hex = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Self {
            seed_hex,
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// Rebuilds a generator that produces exactly the numbers the captured one would have.
    pub fn restore(&self) -> std::result::Result<ChaCha8Rng, String> {
        use rand::SeedableRng;
        if self.seed_hex.len() != 64 {
            return Err(format!(
                "RNG seed must be 64 hex digits, got {}",
                self.seed_hex.len()
            ));
        }
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.seed_hex[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("RNG seed is not hex: {e}"))?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .map_err(|e| format!("RNG word position {:?}: {e}", self.word_pos))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// The training-loop half of the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Optimiser updates done; also the learning-rate schedule position.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Micro-batches of the current epoch already consumed.
    pub batch_in_epoch: u64,
    /// Run seed (data order of epoch `e` is derived from `seed` and `e`).
    pub seed: u64,
    /// Named generators still in use (augmentation, dropout, ...).
    pub rng: BTreeMap<String, RngState>,
    /// SHA-256 of the training configuration, to refuse resuming a different run.
    pub config_hash: String,
    /// Free-form values to carry along (last loss, best metric, ...).
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl TrainState {
    /// A fresh state at step 0.
    pub fn new(seed: u64, config_hash: impl Into<String>) -> Self {
        Self {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            seed,
            rng: BTreeMap::new(),
            config_hash: config_hash.into(),
            extra: BTreeMap::new(),
        }
    }
}

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Checkpoint format version.
    pub format_version: u32,
    /// Loop state.
    pub train: TrainState,
    /// Optimiser settings and step counters.
    pub optimizer: AdamWMeta,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The directory it was read from.
    pub dir: PathBuf,
    /// Weights by parameter name.
    pub weights: HashMap<String, Tensor>,
    /// Optimiser moments.
    pub optimizer_tensors: HashMap<String, Tensor>,
    /// JSON state.
    pub state: CheckpointState,
}

/// SHA-256 (hex) of arbitrary bytes, e.g. a canonical serialisation of the run config.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sync_dir(path: &Path) -> Result<()> {
    medvlm_io::atomic::sync_dir(path).map_err(|e| io(path)(e.into_io()))
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes `bytes` to `path` atomically (medvlm-io's writer: temporary file in the same
/// directory, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    medvlm_io::atomic::write_atomic(path, bytes).map_err(|e| io(path)(e.into_io()))
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A directory of checkpoints; see the module documentation.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
    keep: Option<usize>,
}

impl CheckpointDir {
    /// Uses `root` (created if missing). `keep`: how many newest checkpoints to retain
    /// (`None` keeps all; `Some(0)` is treated as 1, the newest is never deleted).
    pub fn new(root: impl Into<PathBuf>, keep: Option<usize>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Self { root, keep })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Complete checkpoints, oldest first, as `(step, directory)`.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = parse_step_dir(&name) {
                if entry.path().is_dir() {
                    out.push((step, entry.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The directory `latest` points to, or `None` when no checkpoint was written yet.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.root.join(LATEST_FILE);
        let text = match fs::read_to_string(&pointer) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&pointer)(e)),
        };
        let name = text.trim();
        if parse_step_dir(name).is_none() {
            return Err(CheckpointError::Invalid {
                path: pointer,
                reason: format!(
                    "expected a checkpoint directory name like step-000123, got {name:?}"
                ),
            });
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(CheckpointError::Invalid {
                path: pointer,
                reason: format!("points to {name}, which does not exist"),
            });
        }
        Ok(Some(dir))
    }

    /// Writes a checkpoint of `weights` (the trainable parameters), `optimizer` and `train`
    /// atomically, updates `latest`, and prunes old checkpoints. Returns its directory.
    pub fn save(
        &self,
        weights: &[NamedVar],
        optimizer: &AdamW,
        train: &TrainState,
    ) -> Result<PathBuf> {
        self.remove_stale_temporaries()?;
        let name = step_dir_name(train.step);
        let tmp = self.root.join(format!(
            "{TMP_PREFIX}{:06}-{}",
            train.step,
            std::process::id()
        ));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io(&tmp))?;

        let weight_map: HashMap<String, Tensor> = weights
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let model_path = tmp.join(MODEL_FILE);
        candle_core::safetensors::save(&weight_map, &model_path).map_err(|e| {
            CheckpointError::Invalid {
                path: model_path.clone(),
                reason: format!("cannot serialise weights: {e}"),
            }
        })?;
        sync_file(&model_path)?;

        let optim_path = tmp.join(OPTIMIZER_FILE);
        let invalid = |e: &dyn std::fmt::Display| CheckpointError::Invalid {
            path: optim_path.clone(),
            reason: format!("cannot serialise optimiser state: {e}"),
        };
        let moments = optimizer.state_tensors().map_err(|e| invalid(&e))?;
        candle_core::safetensors::save(&moments, &optim_path).map_err(|e| invalid(&e))?;
        sync_file(&optim_path)?;

        let state = CheckpointState {
            format_version: FORMAT_VERSION,
            train: train.clone(),
            optimizer: optimizer.meta(),
        };
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&state).map_err(|e| CheckpointError::Invalid {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&state_path, json).map_err(io(&state_path))?;
        sync_file(&state_path)?;
        sync_dir(&tmp)?;

        let final_dir = self.root.join(&name);
        if final_dir.exists() {
            // Re-saving a step (e.g. after resuming from it): move the old one aside first,
            // because rename cannot replace a non-empty directory.
            let old = self.root.join(format!(
                "{TMP_PREFIX}old-{:06}-{}",
                train.step,
                std::process::id()
            ));
            fs::rename(&final_dir, &old).map_err(io(&final_dir))?;
            fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
            fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        }
        sync_dir(&self.root)?;
        write_atomic(&self.root.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
        self.prune(train.step)?;
        Ok(final_dir)
    }

    fn remove_stale_temporaries(&self) -> Result<()> {
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) && path.is_dir() {
                fs::remove_dir_all(&path).map_err(io(&path))?;
            } else if name.starts_with(&format!(".{LATEST_FILE}.tmp-")) && path.is_file() {
                // A pointer update interrupted before its rename.
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    fn prune(&self, newest: u64) -> Result<()> {
        let Some(keep) = self.keep else {
            return Ok(());
        };
        let keep = keep.max(1);
        let all = self.list()?;
        let excess = all.len().saturating_sub(keep);
        for (step, dir) in all.into_iter().take(excess) {
            if step != newest {
                fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
        }
        Ok(())
    }

    /// Reads the checkpoint `latest` points to (`None` if there is none).
    pub fn load_latest(&self, device: &Device) -> Result<Option<LoadedCheckpoint>> {
        match self.latest()? {
            Some(dir) => load(&dir, device).map(Some),
            None => Ok(None),
        }
    }
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: "file is missing".into(),
        });
    }
    candle_core::safetensors::load(path, device).map_err(|e| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads a checkpoint directory.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
    if state.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Invalid {
            path: state_path,
            reason: format!(
                "format version {} is not supported (expected {FORMAT_VERSION})",
                state.format_version
            ),
        });
    }
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        weights: load_tensors(&dir.join(MODEL_FILE), device)?,
        optimizer_tensors: load_tensors(&dir.join(OPTIMIZER_FILE), device)?,
        state,
    })
}

impl LoadedCheckpoint {
    /// Copies the saved weights into `params` and the saved state into `optimizer`, after
    /// checking that the names, shapes and config hash match. Returns the loop state.
    /// Every parameter must be in the checkpoint and vice versa.
    pub fn restore(
        &self,
        params: &[NamedVar],
        optimizer: &mut AdamW,
        expected_config_hash: Option<&str>,
    ) -> Result<TrainState> {
        let mismatch = |reason: String| CheckpointError::Mismatch {
            path: self.dir.clone(),
            reason,
        };
        if let Some(h) = expected_config_hash {
            if h != self.state.train.config_hash {
                return Err(mismatch(format!(
                    "config hash {} differs from this run's {h}: the configuration changed",
                    self.state.train.config_hash
                )));
            }
        }
        if self.weights.len() != params.len() {
            let missing: Vec<&str> = params
                .iter()
                .filter(|(n, _)| !self.weights.contains_key(n))
                .map(|(n, _)| n.as_str())
                .collect();
            return Err(mismatch(format!(
                "checkpoint has {} tensors, the model has {} trainable parameters (missing from the checkpoint: {missing:?})",
                self.weights.len(),
                params.len()
            )));
        }
        for (name, var) in params {
            let t = self
                .weights
                .get(name)
                .ok_or_else(|| mismatch(format!("parameter {name} is missing")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(mismatch(format!(
                    "parameter {name} has shape {:?} in the checkpoint, {:?} in the model",
                    t.dims(),
                    var.as_tensor().dims()
                )));
            }
        }
        optimizer
            .load_state(&self.optimizer_tensors, &self.state.optimizer)
            .map_err(|source| CheckpointError::Optimizer {
                path: self.dir.clone(),
                source,
            })?;
        for (name, var) in params {
            let t = &self.weights[name];
            let t = t
                .to_dtype(var.dtype())
                .and_then(|t| t.to_device(var.device()))
                .and_then(|t| var.set(&t))
                .map_err(|e| mismatch(format!("cannot restore {name}: {e}")));
            t?;
        }
        Ok(self.state.train.clone())
    }
}
