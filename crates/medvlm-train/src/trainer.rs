//! The training loop shared by `medvlm pretrain` and `medvlm finetune`.
//!
//! [`train`] runs epochs of seeded, shuffled micro-batches from a [`BatchSource`] through a
//! [`TrainModel`]'s loss, accumulates gradients ([`GradAccumulator`]), clips their global norm,
//! applies AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) with
//! the linear warm-up + cosine schedule of CLIP/open_clip ([`WarmupCosine`]), writes atomic
//! checkpoints ([`CheckpointDir`]) and a JSONL log, and resumes exactly.
//!
//! Exact resume: everything that shapes the trajectory is a function of the run seed and the
//! position in the run, or is stored in the checkpoint. The order of epoch `e` is a ChaCha8
//! permutation seeded by `(seed, e)` ([`epoch_order`]); the augmentation of a sample is seeded by
//! `(seed, epoch, sample index)` by the batch source; weights, AdamW moments and step counters,
//! and the loop position (`step`, `epoch`, `batch_in_epoch`) are in the checkpoint. A run killed
//! after a checkpoint and resumed therefore ends with bit-identical weights (tested by
//! `medvlm-cli/tests/pretrain_cli.rs`).
//!
//! Defaults: see [`LoopConfig::from_train_config`] (they are the `[optim]`, `[data]` and
//! `[checkpoint]` keys of `docs/training.md`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointDir, CheckpointError, TrainState};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, NamedVar, OptimError, WeightDecayRule};
use crate::schedule::WarmupCosine;
use crate::train_config::TrainConfig;

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Tensor computation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// Checkpoint error.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Loss error.
    #[error(transparent)]
    Loss(#[from] crate::losses::LossError),
    /// Configuration error (names the key).
    #[error(transparent)]
    Config(#[from] crate::train_config::ConfigError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Data could not be loaded.
    #[error("data: {0}")]
    Data(String),
    /// Model error.
    #[error("model: {0}")]
    Model(String),
    /// A setting or input is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The loss became NaN or infinite.
    #[error("the loss is not finite ({loss}) at step {step}; lower optim.lr or check the data")]
    NonFinite {
        /// The loss value.
        loss: f64,
        /// The update index.
        step: u64,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TrainError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings of the loop itself.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopConfig {
    /// Run seed (data order; the batch source derives augmentation from it too).
    pub seed: u64,
    /// Passes over the data.
    pub epochs: u64,
    /// Optional cap on optimiser updates.
    pub max_steps: Option<u64>,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Global gradient-norm clip.
    pub clip_norm: Option<f64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Linear warm-up updates.
    pub warmup_steps: u64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Checkpoint every N updates (also at each epoch end and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep: usize,
    /// Batches prepared ahead by the loader thread (default 2).
    pub prefetch: usize,
}

impl LoopConfig {
    /// The loop settings of a training configuration file.
    pub fn from_train_config(cfg: &TrainConfig) -> Self {
        let o = &cfg.optim;
        Self {
            seed: cfg.seed,
            epochs: o.epochs,
            max_steps: o.max_steps,
            batch_size: cfg.data.batch_size,
            grad_accum: o.grad_accum,
            clip_norm: o.clip_norm,
            lr: o.lr,
            min_lr: o.min_lr,
            warmup_steps: o.warmup_steps,
            adamw: AdamWConfig {
                beta1: o.betas[0],
                beta2: o.betas[1],
                eps: o.eps,
                weight_decay: o.weight_decay,
            },
            checkpoint_every: cfg.checkpoint.every_n_steps,
            keep: cfg.checkpoint.keep,
            prefetch: 2,
        }
    }

    /// Micro-batches used per epoch for `n` samples: full batches only (a contrastive loss
    /// needs the batch size it was tuned for), rounded down to a multiple of `grad_accum`.
    /// When `n < batch_size` the single batch is the whole data set.
    pub fn micro_batches_per_epoch(&self, n: usize) -> usize {
        let b = self.batch_size.max(1);
        let full = if n < b { usize::from(n >= 2) } else { n / b };
        full / self.grad_accum.max(1) * self.grad_accum.max(1)
    }

    /// Optimiser updates per epoch for `n` samples.
    pub fn updates_per_epoch(&self, n: usize) -> u64 {
        (self.micro_batches_per_epoch(n) / self.grad_accum.max(1)) as u64
    }

    /// Total optimiser updates of the run for `n` samples.
    pub fn total_steps(&self, n: usize) -> u64 {
        let t = self.epochs * self.updates_per_epoch(n);
        self.max_steps.map_or(t, |m| m.min(t))
    }

    /// The learning-rate schedule for `n` samples.
    pub fn schedule(&self, n: usize) -> WarmupCosine {
        WarmupCosine {
            base_lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps(n),
            min_lr: self.min_lr,
        }
    }
}

/// Salt mixed into the run seed for the data-order generator, so that its stream differs from
/// other generators seeded by the same run seed (initialisation, augmentation).
const ORDER_SALT: u64 = 0x6f72_6465_725f_7631;

/// The sample order of epoch `epoch`: a ChaCha8 shuffle seeded by `(seed, epoch)`, so it does
/// not depend on anything that happened before (resume-safe).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ORDER_SALT);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// Where batches come from. `load` is called on a loader thread, ahead of the loop
/// ([`LoopConfig::prefetch`] batches), so it may use its own thread pool.
pub trait BatchSource: Sync {
    /// A prepared batch (tensors on the compute device, or whatever the model needs).
    type Batch: Send;
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads the samples `indices` for epoch `epoch` (augmentation must be a function of the
    /// run seed, `epoch` and the sample index only, for exact resume).
    fn load(&self, indices: &[usize], epoch: u64) -> Result<Self::Batch>;
    /// The sample order of `epoch` (consecutive `batch_size` slices become the micro-batches).
    /// Default: [`epoch_order`]. An override must also depend on `(seed, epoch)` only.
    fn epoch_order(&self, seed: u64, epoch: u64, batch_size: usize) -> Vec<usize> {
        let _ = batch_size;
        epoch_order(seed, epoch, self.len())
    }
}

/// An epoch order whose micro-batches each hold samples of one group where possible: the
/// samples are shuffled as in [`epoch_order`], split by `group_of`, cut into `batch_size`
/// chunks per group, and the chunks shuffled (seeded by `(seed, epoch)` as well); the
/// remainders of the groups, fewer than a batch each, are shuffled together at the end (the
/// trainer drops a final partial batch; another epoch has another remainder).
pub fn grouped_epoch_order(
    seed: u64,
    epoch: u64,
    batch_size: usize,
    group_of: impl Fn(usize) -> usize,
    n: usize,
) -> Vec<usize> {
    let order = epoch_order(seed, epoch, n);
    let b = batch_size.max(1);
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        groups.entry(group_of(i)).or_default().push(i);
    }
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut rest: Vec<usize> = Vec::new();
    for members in groups.into_values() {
        let full = members.len() / b * b;
        chunks.extend(members[..full].chunks(b).map(<[usize]>::to_vec));
        rest.extend_from_slice(&members[full..]);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ORDER_SALT ^ GROUP_SALT);
    rng.set_stream(epoch);
    chunks.shuffle(&mut rng);
    rest.shuffle(&mut rng);
    let mut out: Vec<usize> = chunks.into_iter().flatten().collect();
    out.extend(rest);
    out
}

/// Salt of the chunk shuffle of [`grouped_epoch_order`].
const GROUP_SALT: u64 = 0x6772_6f75_7073;

/// A model being trained.
pub trait TrainModel<B> {
    /// The scalar loss of one micro-batch (a graph through the trainable `Var`s).
    fn loss(&mut self, batch: &B) -> Result<Tensor>;
    /// Called after every optimiser update (e.g. to clamp the logit scale).
    fn after_update(&mut self) -> Result<()> {
        Ok(())
    }
    /// Scalars to log with each update (e.g. `temperature`).
    fn log_scalars(&self) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
}

/// One logged optimiser update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Updates done after this one (1-based).
    pub step: u64,
    /// Epoch of the update (0-based).
    pub epoch: u64,
    /// Mean loss of the update's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient global norm before clipping.
    pub grad_norm: f64,
    /// Model scalars ([`TrainModel::log_scalars`]).
    #[serde(flatten)]
    pub scalars: BTreeMap<String, f64>,
}

/// Hooks called by [`train`]; every method has a no-op default.
pub trait Callbacks<M> {
    /// Before the first update: the update the run starts at and the total.
    fn on_start(&mut self, _start_step: u64, _total_steps: u64) {}
    /// After every update.
    fn on_update(&mut self, _record: &StepRecord) {}
    /// At the end of each epoch, before its checkpoint: validation metrics to log (JSON
    /// object), if any.
    fn on_epoch_end(
        &mut self,
        _epoch: u64,
        _step: u64,
        _model: &M,
    ) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
    /// After a checkpoint was written.
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) {}
}

/// Callbacks that do nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCallbacks;
impl<M> Callbacks<M> for NoCallbacks {}

/// Where the loop writes.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// Checkpoint directory (`step-NNNNNN/` sub-directories and `latest`).
    pub checkpoints: PathBuf,
    /// JSONL log: one object per update (`step`, `epoch`, `loss`, `lr`, `grad_norm`, model
    /// scalars) and one per evaluated epoch (`epoch`, `step`, `val`).
    pub log: PathBuf,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Update the run started at (0, or the resumed checkpoint's step).
    pub start_step: u64,
    /// Updates done in total.
    pub steps: u64,
    /// Epochs completed.
    pub epochs: u64,
    /// Loss of the last update.
    pub final_loss: Option<f64>,
    /// Directory of the last checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Per-update records of this invocation.
    pub records: Vec<StepRecord>,
    /// Validation metrics of each epoch evaluated by this invocation.
    pub validation: Vec<serde_json::Value>,
}

/// Keeps only the log lines written up to `step` (inclusive) when a run resumes, so the log of
/// a resumed run equals the log of an uninterrupted one. Lines that are not JSON are dropped.
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v.get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s <= step)
        {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::checkpoint::write_atomic(path, kept.as_bytes())?;
    Ok(())
}

fn append_log(file: &mut std::fs::File, path: &Path, value: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_string(value).map_err(|e| TrainError::Invalid(e.to_string()))?;
    line.push('\n');
    // One write call per line: a killed run leaves at most one partial line, which
    // `truncate_log` drops on resume.
    file.write_all(line.as_bytes()).map_err(io_err(path))?;
    file.flush().map_err(io_err(path))
}

/// Runs (or, with `resume`, continues) training. `params` are the trainable parameters (names
/// are the checkpoint names); `config_hash` identifies the configuration so a checkpoint of a
/// different run is refused. Returns what was done.
#[allow(clippy::too_many_arguments)]
pub fn train<S, M, C>(
    params: Vec<NamedVar>,
    model: &mut M,
    data: &S,
    cfg: &LoopConfig,
    paths: &RunPaths,
    resume: bool,
    config_hash: &str,
    callbacks: &mut C,
) -> Result<TrainSummary>
where
    S: BatchSource,
    M: TrainModel<S::Batch>,
    C: Callbacks<M>,
{
    let n = data.len();
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return Err(TrainError::Invalid(
            "batch_size and grad_accum must be at least 1".into(),
        ));
    }
    if params.is_empty() {
        return Err(TrainError::Invalid(
            "nothing to train: no trainable parameters".into(),
        ));
    }
    let micro_per_epoch = cfg.micro_batches_per_epoch(n);
    if micro_per_epoch == 0 {
        return Err(TrainError::Invalid(format!(
            "{n} training samples give no full update of {} x {} samples; lower data.batch_size or optim.grad_accum",
            cfg.batch_size, cfg.grad_accum
        )));
    }
    let schedule = cfg.schedule(n);
    let total = schedule.total_steps;
    let mut optimizer = AdamW::new(params.clone(), cfg.adamw, &WeightDecayRule::default())?;
    let ckpt = CheckpointDir::new(&paths.checkpoints, Some(cfg.keep))?;

    let mut state = TrainState::new(cfg.seed, config_hash);
    if resume {
        let loaded = ckpt
            .load_latest(&candle_core::Device::Cpu)?
            .ok_or_else(|| {
                TrainError::Invalid(format!(
                    "--resume: no checkpoint in {}",
                    paths.checkpoints.display()
                ))
            })?;
        state = loaded.restore(&params, &mut optimizer, Some(config_hash))?;
        truncate_log(&paths.log, state.step)?;
    } else if ckpt.latest()?.is_some() {
        return Err(TrainError::Invalid(format!(
            "{} already holds checkpoints; pass --resume to continue that run or choose another output_dir",
            paths.checkpoints.display()
        )));
    } else if paths.log.exists() {
        std::fs::remove_file(&paths.log).map_err(io_err(&paths.log))?;
    }
    if let Some(dir) = paths.log.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(io_err(&paths.log))?;

    let start_step = state.step;
    callbacks.on_start(start_step, total);
    let mut summary = TrainSummary {
        start_step,
        steps: state.step,
        epochs: state.epoch,
        final_loss: None,
        last_checkpoint: None,
        records: Vec::new(),
        validation: Vec::new(),
    };
    let accum = cfg.grad_accum;
    let prefetch = cfg.prefetch.max(1);

    while state.step < total && state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let order = data.epoch_order(cfg.seed, epoch, cfg.batch_size);
        let bs = cfg.batch_size.min(n);
        let plan: Vec<Vec<usize>> = (0..micro_per_epoch)
            .map(|b| order[b * bs..(b + 1) * bs].to_vec())
            .collect();
        let first = state.batch_in_epoch as usize;
        let steps_left = (total - state.step) as usize;
        let last = micro_per_epoch.min(first + steps_left * accum);

        let epoch_result: Result<bool> = std::thread::scope(|scope| {
            let (tx, rx) = sync_channel::<Result<S::Batch>>(prefetch);
            let plan_ref = &plan;
            scope.spawn(move || {
                for indices in &plan_ref[first..last] {
                    let batch = data.load(indices, epoch);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            let mut acc = GradAccumulator::new();
            let mut loss_sum = 0.0;
            // Wall time per phase of the current update, for the debug log (`medvlm -vv`);
            // kept out of the JSONL log, which must be identical across a resumed run.
            let (mut forward, mut backward) = (Duration::ZERO, Duration::ZERO);
            for _ in first..last {
                let batch = rx
                    .recv()
                    .map_err(|_| TrainError::Data("the loader thread stopped".into()))??;
                let started = Instant::now();
                let loss = model.loss(&batch)?;
                forward += started.elapsed();
                let lv = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if !lv.is_finite() {
                    return Err(TrainError::NonFinite {
                        loss: lv,
                        step: state.step,
                    });
                }
                loss_sum += lv;
                let started = Instant::now();
                let grads = loss.backward()?;
                acc.add(&grads, &params)?;
                backward += started.elapsed();
                state.batch_in_epoch += 1;
                if acc.micro_batches() == accum {
                    let started = Instant::now();
                    let mut g = acc.finish()?;
                    let grad_norm = match cfg.clip_norm {
                        Some(c) => g.clip_global_norm(c)?,
                        None => g.global_norm()?,
                    };
                    let lr = schedule.lr(state.step);
                    optimizer.step(&g, lr)?;
                    model.after_update()?;
                    tracing::debug!(
                        step = state.step + 1,
                        forward_ms = forward.as_secs_f64() * 1e3,
                        backward_ms = backward.as_secs_f64() * 1e3,
                        optimizer_ms = started.elapsed().as_secs_f64() * 1e3,
                        "update timing"
                    );
                    (forward, backward) = (Duration::ZERO, Duration::ZERO);
                    state.step += 1;
                    let record = StepRecord {
                        step: state.step,
                        epoch,
                        loss: loss_sum / accum as f64,
                        lr,
                        grad_norm,
                        scalars: model.log_scalars()?,
                    };
                    loss_sum = 0.0;
                    append_log(&mut log, &paths.log, &record)?;
                    callbacks.on_update(&record);
                    summary.final_loss = Some(record.loss);
                    summary.records.push(record);
                    let epoch_done = state.batch_in_epoch as usize == micro_per_epoch;
                    if state.step.is_multiple_of(cfg.checkpoint_every)
                        && !epoch_done
                        && state.step < total
                    {
                        let dir = ckpt.save(&params, &optimizer, &state)?;
                        callbacks.on_checkpoint(state.step, &dir);
                        summary.last_checkpoint = Some(dir);
                    }
                    if state.step >= total {
                        break;
                    }
                }
            }
            Ok(state.batch_in_epoch as usize == micro_per_epoch)
        });
        let epoch_complete = epoch_result?;
        if epoch_complete {
            if let Some(val) = callbacks.on_epoch_end(epoch, state.step, model)? {
                let rec = serde_json::json!({"epoch": epoch, "step": state.step, "val": val});
                append_log(&mut log, &paths.log, &rec)?;
                summary.validation.push(val);
            }
            state.epoch += 1;
            state.batch_in_epoch = 0;
        }
        let dir = ckpt.save(&params, &optimizer, &state)?;
        callbacks.on_checkpoint(state.step, &dir);
        summary.last_checkpoint = Some(dir);
        if !epoch_complete {
            break;
        }
    }
    summary.steps = state.step;
    summary.epochs = state.epoch;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_order_is_a_permutation_with_single_group_batches() {
        let group = |i: usize| i % 3;
        let a = grouped_epoch_order(5, 2, 4, group, 40);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..40).collect::<Vec<_>>(),
            "every sample exactly once"
        );
        // Groups of 14, 13, 13 samples give 3 + 3 + 3 full batches of 4, then 4 left over.
        for chunk in a[..36].chunks(4) {
            assert!(
                chunk.iter().all(|&i| group(i) == group(chunk[0])),
                "mixed batch {chunk:?}"
            );
        }
        assert_eq!(a, grouped_epoch_order(5, 2, 4, group, 40));
        assert_ne!(a, grouped_epoch_order(5, 3, 4, group, 40));
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(7, 3, 50);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(7, 3, 50), "same (seed, epoch), same order");
        assert_ne!(a, epoch_order(7, 4, 50), "another epoch, another order");
        assert_ne!(a, epoch_order(8, 3, 50), "another seed, another order");
    }

    #[test]
    fn update_counts_use_full_batches_and_whole_accumulations() {
        let mut c = LoopConfig {
            seed: 0,
            epochs: 3,
            max_steps: None,
            batch_size: 8,
            grad_accum: 2,
            clip_norm: None,
            lr: 1e-3,
            min_lr: 0.0,
            warmup_steps: 0,
            adamw: AdamWConfig::default(),
            checkpoint_every: 10,
            keep: 1,
            prefetch: 2,
        };
        // 45 samples: 5 full batches of 8, 2 whole accumulations of 2 -> 4 micro-batches.
        assert_eq!(c.micro_batches_per_epoch(45), 4);
        assert_eq!(c.updates_per_epoch(45), 2);
        assert_eq!(c.total_steps(45), 6);
        c.max_steps = Some(5);
        assert_eq!(c.total_steps(45), 5);
        c.grad_accum = 1;
        // Fewer samples than a batch: one batch of everything (at least 2 for a contrastive loss).
        assert_eq!(c.micro_batches_per_epoch(5), 1);
        assert_eq!(c.micro_batches_per_epoch(1), 0);
    }
}
