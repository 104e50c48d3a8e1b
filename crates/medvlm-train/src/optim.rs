//! Optimisation engine: AdamW with per-parameter weight-decay exclusions and exportable
//! state, gradient accumulation, global-norm clipping, and parameter freezing.
//!
//! * [`AdamW`]: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight
//!   Decay Regularization", ICLR 2019), the same update as `torch.optim.AdamW`:
//!   `theta <- theta (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
//!   `theta <- theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, with a step
//!   counter `t` per parameter. Defaults are PyTorch's (`betas = (0.9, 0.999)`, `eps = 1e-8`,
//!   `weight_decay = 0.01`); CLIP used `(0.9, 0.98)`, `1e-6`, `0.2`. Unlike `candle_nn::AdamW`
//!   it decays only selected parameters and exposes its moments and step counters so a
//!   checkpoint can restore it exactly. f32 parameters on the CPU are updated in place
//!   (three passes, no temporaries), bit-identically to the composed tensor ops used otherwise.
//! * [`WeightDecayRule`]: which parameters are not decayed. Following open_clip, tensors of
//!   rank < 2 (biases, norm gains, scalars such as `logit_scale`) and names containing a
//!   pattern (norms, biases, embeddings, `logit_scale`/`logit_bias`) are excluded.
//! * [`GradAccumulator`]: sums gradients of equal-sized micro-batches and divides by their
//!   number, so for a mean loss the result equals the gradient of the full batch.
//! * [`Gradients::clip_global_norm`]: `torch.nn.utils.clip_grad_norm_` semantics: when the
//!   global L2 norm exceeds `max_norm`, every gradient is scaled by `max_norm / (norm + 1e-6)`.
//! * Freezing: [`split_by_prefix`] (locked-image / locked-text tuning, Zhai et al., "LiT:
//!   Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022) and [`last_k_blocks`]
//!   (partial fine-tuning of the last k transformer blocks).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use medvlm_models::fused::{f32_slice, f32_slice_mut};
use serde::{Deserialize, Serialize};

/// Why an optimiser operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Two parameters share a name.
    #[error("duplicate parameter name {0:?}")]
    DuplicateName(String),
    /// A hyper-parameter is out of range.
    #[error("invalid optimiser setting {name}: {reason}")]
    InvalidSetting {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Restored state does not match the parameters.
    #[error("optimiser state mismatch: {0}")]
    StateMismatch(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, OptimError>;

/// A trainable tensor and its name (module path, e.g. `vision_model.encoder.layers.3.mlp.fc1.weight`).
pub type NamedVar = (String, Var);

/// The variables of a `VarMap` in name order: the order seeded initialisers draw in and
/// checkpoints list, so a seed gives the same model on every run. (A lock poisoned by a
/// panic elsewhere still holds valid variables, so it is read through.)
pub fn varmap_params(varmap: &candle_nn::VarMap) -> Vec<NamedVar> {
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut v: Vec<NamedVar> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Which parameters get weight decay; see the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightDecayRule {
    /// Case-insensitive substrings; a parameter whose name contains one is not decayed.
    pub exclude_name_patterns: Vec<String>,
    /// Parameters of rank below this are not decayed (2 excludes vectors and scalars).
    pub min_rank: usize,
}

impl Default for WeightDecayRule {
    fn default() -> Self {
        Self {
            exclude_name_patterns: [
                "bias",
                "norm",
                "ln_",
                "embedding",
                "logit_scale",
                "logit_bias",
                "class_token",
                "cls_token",
                "pos_embed",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            min_rank: 2,
        }
    }
}

impl WeightDecayRule {
    /// Whether parameter `name` of rank `rank` is decayed.
    pub fn decays(&self, name: &str, rank: usize) -> bool {
        let lower = name.to_lowercase();
        rank >= self.min_rank
            && !self
                .exclude_name_patterns
                .iter()
                .any(|p| lower.contains(&p.to_lowercase()))
    }
}

/// AdamW hyper-parameters (PyTorch defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator term.
    pub eps: f64,
    /// Decoupled weight decay, multiplied by the learning rate.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let bad = |name, reason: &str| {
            Err(OptimError::InvalidSetting {
                name,
                reason: reason.to_string(),
            })
        };
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "must be in [0, 1)");
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", "must be positive");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be >= 0");
        }
        Ok(())
    }
}

/// Gradients by parameter name.
#[derive(Debug, Clone, Default)]
pub struct Gradients(pub BTreeMap<String, Tensor>);

impl Gradients {
    /// Picks the gradients of `params` out of a backward pass; parameters that received no
    /// gradient are absent.
    pub fn from_grad_store(store: &GradStore, params: &[NamedVar]) -> Self {
        Self(
            params
                .iter()
                .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
                .collect(),
        )
    }

    /// Global L2 norm over every gradient (computed in f64).
    pub fn global_norm(&self) -> Result<f64> {
        let mut sq = 0.0f64;
        for g in self.0.values() {
            sq += if g.device().is_cpu() && g.dtype() == DType::F32 {
                sum_of_squares_f32(&g.contiguous()?)?
            } else {
                g.to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?
            };
        }
        Ok(sq.sqrt())
    }

    /// Scales all gradients so that their global norm is at most `max_norm`
    /// (`clip_grad_norm_` semantics). Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in self.0.values_mut() {
                *g = g.affine(coef, 0.0)?;
            }
        }
        Ok(norm)
    }
}

/// Sums the gradients of several micro-batches; see the module documentation.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: BTreeMap<String, Tensor>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients of one micro-batch's backward pass.
    pub fn add(&mut self, store: &GradStore, params: &[NamedVar]) -> Result<()> {
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                let next = match self.sum.remove(name) {
                    Some(s) => (s + g)?,
                    None => g,
                };
                self.sum.insert(name.clone(), next);
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Number of micro-batches added so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The mean gradient over the micro-batches; resets the accumulator.
    pub fn finish(&mut self) -> Result<Gradients> {
        let n = self.micro_batches.max(1) as f64;
        let sum = std::mem::take(&mut self.sum);
        self.micro_batches = 0;
        let mut out = BTreeMap::new();
        for (k, g) in sum {
            // One micro-batch: its gradients are the mean already (no pass over them).
            let g = if n == 1.0 { g } else { g.affine(1.0 / n, 0.0)? };
            out.insert(k, g);
        }
        Ok(Gradients(out))
    }
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Step counters and settings of an [`AdamW`], the JSON half of its state (the moments are the
/// tensor half, see [`AdamW::state_tensors`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWMeta {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Number of updates applied to each parameter.
    pub steps: BTreeMap<String, u64>,
}

/// AdamW over named variables; see the module documentation.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
}

fn moment_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

impl AdamW {
    /// Creates the optimiser; weight decay applies to the parameters `rule` selects.
    pub fn new(params: Vec<NamedVar>, config: AdamWConfig, rule: &WeightDecayRule) -> Result<Self> {
        config.validate()?;
        let mut seen = BTreeSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::DuplicateName(name));
            }
            let t = var.as_tensor();
            let md = moment_dtype(t.dtype());
            states.push(ParamState {
                decay: rule.decays(&name, t.rank()),
                exp_avg: Tensor::zeros(t.shape(), md, t.device())?,
                exp_avg_sq: Tensor::zeros(t.shape(), md, t.device())?,
                step: 0,
                name,
                var,
            });
        }
        Ok(Self {
            config,
            params: states,
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Names of the parameters that are weight-decayed.
    pub fn decayed_names(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Names of all parameters, in order.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// Applies one update with learning rate `lr`. Parameters without a gradient are left
    /// untouched (their step counter does not advance), as in PyTorch.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(OptimError::InvalidSetting {
                name: "lr",
                reason: format!("must be finite and >= 0, got {lr}"),
            });
        }
        let c = self.config;
        for p in &mut self.params {
            let Some(g) = grads.0.get(&p.name) else {
                continue;
            };
            p.step += 1;
            if in_place_f32(p, g) {
                update_in_place(p, &g.contiguous()?, &c, lr)?;
            } else {
                update_composed(p, g, &c, lr)?;
            }
        }
        Ok(())
    }

    /// The moments as named tensors: `exp_avg.<name>` and `exp_avg_sq.<name>`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            // Copies: the moments are updated in place by later steps.
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.copy()?);
            out.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.copy()?);
        }
        Ok(out)
    }

    /// Settings and per-parameter step counters.
    pub fn meta(&self) -> AdamWMeta {
        AdamWMeta {
            config: self.config,
            steps: self
                .params
                .iter()
                .map(|p| (p.name.clone(), p.step))
                .collect(),
        }
    }

    /// Restores moments and step counters saved by [`Self::state_tensors`] and [`Self::meta`].
    /// Every parameter must be present with the right shape; extra entries are an error too,
    /// so a checkpoint of a different model is never half-loaded.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &AdamWMeta,
    ) -> Result<()> {
        let expected = 2 * self.params.len();
        if tensors.len() != expected || meta.steps.len() != self.params.len() {
            return Err(OptimError::StateMismatch(format!(
                "checkpoint has {} moment tensors and {} step counters, optimiser has {} parameters",
                tensors.len(),
                meta.steps.len(),
                self.params.len()
            )));
        }
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |key: String| -> Result<Tensor> {
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| OptimError::StateMismatch(format!("missing {key}")))?;
                if t.dims() != p.var.as_tensor().dims() {
                    return Err(OptimError::StateMismatch(format!(
                        "{key} has shape {:?}, parameter has {:?}",
                        t.dims(),
                        p.var.as_tensor().dims()
                    )));
                }
                // A fresh copy: the moments are updated in place, the caller's map is not.
                Ok(t.to_dtype(p.exp_avg.dtype())?
                    .to_device(p.var.as_tensor().device())?
                    .copy()?)
            };
            let m = get(format!("exp_avg.{}", p.name))?;
            let v = get(format!("exp_avg_sq.{}", p.name))?;
            let step = *meta.steps.get(&p.name).ok_or_else(|| {
                OptimError::StateMismatch(format!("missing step counter of {}", p.name))
            })?;
            restored.push((m, v, step));
        }
        for (p, (m, v, step)) in self.params.iter_mut().zip(restored) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
            p.step = step;
        }
        self.config = meta.config;
        Ok(())
    }
}

/// `Σ g²` of a contiguous f32 CPU tensor in f64, in one parallel pass without temporaries.
fn sum_of_squares_f32(g: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    let (storage, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("sum of squares: not a CPU tensor".into()).into());
    };
    let values = f32_slice(cpu, layout, "sum of squares")?;
    Ok(values
        .par_chunks(UPDATE_CHUNK)
        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum())
}

/// Whether one parameter's update can run in place: f32 on the CPU for the parameter, its
/// moments and its gradient, and parameter and moments contiguous (the kernels write them as
/// flat slices).
fn in_place_f32(p: &ParamState, g: &Tensor) -> bool {
    let t = p.var.as_tensor();
    let dtypes = [
        t.dtype(),
        g.dtype(),
        p.exp_avg.dtype(),
        p.exp_avg_sq.dtype(),
    ];
    t.device().is_cpu()
        && dtypes == [DType::F32; 4]
        && [t, &p.exp_avg, &p.exp_avg_sq]
            .iter()
            .all(|x| x.is_contiguous())
}

/// The update with candle's tensor ops (any dtype or device): about a dozen temporaries the
/// size of the parameter.
fn update_composed(p: &mut ParamState, g: &Tensor, c: &AdamWConfig, lr: f64) -> Result<()> {
    let md = p.exp_avg.dtype();
    let g = g.to_dtype(md)?;
    let theta = p.var.as_tensor().to_dtype(md)?;
    let theta = if p.decay && c.weight_decay > 0.0 {
        theta.affine(1.0 - lr * c.weight_decay, 0.0)?
    } else {
        theta
    };
    p.exp_avg = (p.exp_avg.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
    p.exp_avg_sq = (p.exp_avg_sq.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let (bc1, bc2) = bias_corrections(c, p.step);
    let denom = p
        .exp_avg_sq
        .affine(1.0 / bc2, 0.0)?
        .sqrt()?
        .affine(1.0, c.eps)?;
    let update = p.exp_avg.affine(lr / bc1, 0.0)?.div(&denom)?;
    let next = (theta - update)?.to_dtype(p.var.dtype())?;
    p.var.set(&next)?;
    Ok(())
}

/// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
fn bias_corrections(c: &AdamWConfig, step: u64) -> (f64, f64) {
    let t = step as i32;
    (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t))
}

/// The same update as [`update_composed`], in place on the parameter's and the moments'
/// storage: three passes and no temporaries. Each constant is rounded to f32 and each
/// operation done in the order candle's ops do it (`affine` is `x·mul + add`), so the result
/// is bit-identical (tested).
fn update_in_place(p: &mut ParamState, g: &Tensor, c: &AdamWConfig, lr: f64) -> Result<()> {
    let (bc1, bc2) = bias_corrections(c, p.step);
    p.exp_avg.inplace_op2(
        g,
        &MomentUpdate {
            beta: c.beta1 as f32,
            one_minus_beta: (1.0 - c.beta1) as f32,
            square: false,
        },
    )?;
    p.exp_avg_sq.inplace_op2(
        g,
        &MomentUpdate {
            beta: c.beta2 as f32,
            one_minus_beta: (1.0 - c.beta2) as f32,
            square: true,
        },
    )?;
    let decay = (p.decay && c.weight_decay > 0.0).then_some((1.0 - lr * c.weight_decay) as f32);
    p.var.as_tensor().inplace_op3(
        &p.exp_avg,
        &p.exp_avg_sq,
        &ParamUpdate {
            decay,
            step_size: (lr / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: c.eps as f32,
        },
    )?;
    Ok(())
}

/// Elements per rayon task of the in-place kernels.
const UPDATE_CHUNK: usize = 1 << 15;

/// `m ← m·β + g·(1 − β)`, or with `square` `v ← v·β + g²·(1 − β)`, in place.
struct MomentUpdate {
    beta: f32,
    one_minus_beta: f32,
    square: bool,
}

impl candle_core::InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "medvlm-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let m = f32_slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!(
                "{}: {} moments, {} gradients",
                self.name(),
                m.len(),
                g.len()
            )
        }
        let (b, k) = (self.beta, self.one_minus_beta);
        let square = self.square;
        m.par_chunks_mut(UPDATE_CHUNK)
            .zip(g.par_chunks(UPDATE_CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = if square { g * g } else { g };
                    *m = (*m * b + 0.0) + (g * k + 0.0);
                }
            });
        Ok(())
    }
}

/// `θ ← θ·(1 − lr·wd) − (m·lr/bc₁) / (√(v/bc₂) + ε)` in place (the decay factor only for
/// decayed parameters).
struct ParamUpdate {
    decay: Option<f32>,
    step_size: f32,
    inv_bc2: f32,
    eps: f32,
}

impl candle_core::InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "medvlm-adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let theta = f32_slice_mut(s1, l1, self.name())?;
        let m = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        if m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("{}: parameter and moments differ in size", self.name())
        }
        let ParamUpdate {
            decay,
            step_size,
            inv_bc2,
            eps,
        } = *self;
        theta
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(m.par_chunks(UPDATE_CHUNK).zip(v.par_chunks(UPDATE_CHUNK)))
            .for_each(|(theta, (m, v))| {
                for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                    let kept = match decay {
                        Some(d) => *t * d + 0.0,
                        None => *t,
                    };
                    let denom = ((v * inv_bc2 + 0.0).sqrt()) * 1.0 + eps;
                    *t = kept - (m * step_size + 0.0) / denom;
                }
            });
        Ok(())
    }
}

/// Splits parameters into (trainable, frozen): a parameter is frozen when its name starts
/// with one of `frozen_prefixes` (e.g. `["vision_model.", "visual."]` to lock the image tower).
pub fn split_by_prefix(
    params: Vec<NamedVar>,
    frozen_prefixes: &[String],
) -> (Vec<NamedVar>, Vec<NamedVar>) {
    params
        .into_iter()
        .partition(|(n, _)| !frozen_prefixes.iter().any(|p| n.starts_with(p.as_str())))
}

/// The block index of `name` under `block_prefix`: for prefix `vision_model.encoder.layers.`
/// and name `vision_model.encoder.layers.11.mlp.fc1.weight` it is `Some(11)`.
pub fn block_index(name: &str, block_prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(block_prefix)?;
    let digits: &str = rest.split('.').next()?;
    digits.parse().ok()
}

/// Names of the parameters in the last `k` blocks under `block_prefix` (the blocks with the
/// highest indices present). Returns an empty set when `k == 0` or no block matches.
pub fn last_k_blocks<'a>(
    names: impl IntoIterator<Item = &'a str>,
    block_prefix: &str,
    k: usize,
) -> BTreeSet<String> {
    let indexed: Vec<(&str, usize)> = names
        .into_iter()
        .filter_map(|n| block_index(n, block_prefix).map(|i| (n, i)))
        .collect();
    let Some(max) = indexed.iter().map(|(_, i)| *i).max() else {
        return BTreeSet::new();
    };
    if k == 0 {
        return BTreeSet::new();
    }
    let first = (max + 1).saturating_sub(k);
    indexed
        .into_iter()
        .filter(|(_, i)| *i >= first)
        .map(|(n, _)| n.to_string())
        .collect()
}

/// Block-list prefixes of the model layouts medvlm loads: HF CLIP/SigLIP towers
/// (`vision_model.encoder.layers.`, `text_model.encoder.layers.`), open_clip with a timm ViT and
/// an HF BERT (BiomedCLIP: `visual.trunk.blocks.`, `text.transformer.encoder.layer.`) and native
/// open_clip (`visual.transformer.resblocks.`, `transformer.resblocks.`).
pub const DEFAULT_BLOCK_PREFIXES: [&str; 6] = [
    "vision_model.encoder.layers.",
    "text_model.encoder.layers.",
    "visual.trunk.blocks.",
    "text.transformer.encoder.layer.",
    "visual.transformer.resblocks.",
    "transformer.resblocks.",
];

/// Name fragments of parameters that sit before the first block of a tower (input
/// embeddings and pre-norms); partial fine-tuning keeps them frozen.
pub const INPUT_SIDE_PATTERNS: [&str; 11] = [
    "embed",
    "cls_token",
    "class_embedding",
    "pos_",
    "position",
    "patch",
    "token_type",
    "pre_layrnorm",
    "pre_layernorm",
    "ln_pre",
    "norm_pre",
];

/// Which parameters of a pretrained model are trained.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainableSelection {
    /// Every parameter.
    All,
    /// Every parameter except those starting with one of the prefixes (locked tower).
    FreezePrefixes(Vec<String>),
    /// The last `k` blocks of every tower found under `block_prefixes`, plus the parameters
    /// after the blocks (final norms, heads, projections, logit scale/bias); input embeddings,
    /// pre-norms and earlier blocks stay frozen.
    LastKBlocks {
        /// Blocks per tower.
        k: usize,
        /// Block-list prefixes to look for.
        block_prefixes: Vec<String>,
    },
    /// Biases and `logit_scale` only (BitFit, Ben Zaken et al., ACL 2022).
    BiasesOnly,
    /// Nothing (e.g. LoRA: only the adapters, which are new parameters, are trained).
    Nothing,
}

/// Names of the trainable parameters among `names` under `selection`. Errors when the
/// selection matches nothing it should (no block list found, no bias), with the reason.
pub fn select_trainable<'a>(
    names: impl IntoIterator<Item = &'a str>,
    selection: &TrainableSelection,
) -> Result<BTreeSet<String>> {
    let all: Vec<&str> = names.into_iter().collect();
    let out: BTreeSet<String> = match selection {
        TrainableSelection::All => all.iter().map(|s| s.to_string()).collect(),
        TrainableSelection::Nothing => BTreeSet::new(),
        TrainableSelection::FreezePrefixes(prefixes) => all
            .iter()
            .filter(|n| !prefixes.iter().any(|p| n.starts_with(p.as_str())))
            .map(|s| s.to_string())
            .collect(),
        TrainableSelection::BiasesOnly => {
            let set: BTreeSet<String> = all
                .iter()
                .filter(|n| n.ends_with("bias") || **n == "logit_scale")
                .map(|s| s.to_string())
                .collect();
            if !set.iter().any(|n| n.ends_with("bias")) {
                return Err(OptimError::InvalidSetting {
                    name: "finetune.mode",
                    reason: "bitfit: the model has no bias parameters".into(),
                });
            }
            set
        }
        TrainableSelection::LastKBlocks { k, block_prefixes } => {
            if *k == 0 {
                return Err(OptimError::InvalidSetting {
                    name: "last_k",
                    reason: "must be at least 1".into(),
                });
            }
            let found: Vec<&String> = block_prefixes
                .iter()
                .filter(|p| all.iter().any(|n| block_index(n, p).is_some()))
                .collect();
            if found.is_empty() {
                return Err(OptimError::InvalidSetting {
                    name: "last_k",
                    reason: format!(
                        "no transformer block list found in the model (looked for {block_prefixes:?})"
                    ),
                });
            }
            let mut set = BTreeSet::new();
            for p in &found {
                set.extend(last_k_blocks(all.iter().copied(), p, *k));
            }
            for n in &all {
                let in_block = found.iter().any(|p| block_index(n, p).is_some());
                let lower = n.to_lowercase();
                let input_side = INPUT_SIDE_PATTERNS.iter().any(|p| lower.contains(p));
                if !in_block && !input_side {
                    set.insert(n.to_string());
                }
            }
            set
        }
    };
    Ok(out)
}

/// Splits `params` into (trainable, frozen) by a set of trainable names.
pub fn partition_trainable(
    params: Vec<NamedVar>,
    trainable: &BTreeSet<String>,
) -> (Vec<NamedVar>, Vec<NamedVar>) {
    params.into_iter().partition(|(n, _)| trainable.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn state(name: &str, decay: bool, values: &Tensor) -> ParamState {
        let t = values.copy().unwrap();
        ParamState {
            name: name.into(),
            decay,
            step: 0,
            exp_avg: t.zeros_like().unwrap(),
            exp_avg_sq: t.zeros_like().unwrap(),
            var: Var::from_tensor(&t).unwrap(),
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn in_place_update_is_bit_identical_to_the_composed_ops() {
        let dev = Device::Cpu;
        let c = AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        };
        // More elements than one rayon task, with exact zeros among the gradients.
        let theta = Tensor::randn(0f32, 1.0, 3 * UPDATE_CHUNK + 7, &dev).unwrap();
        for decay in [true, false] {
            let (mut a, mut b) = (state("w", decay, &theta), state("w", decay, &theta));
            for step in 1..=4 {
                let g = Tensor::randn(0f32, 0.1, theta.shape(), &dev).unwrap();
                let g = g.broadcast_mul(&g.gt(0.02).unwrap().to_dtype(DType::F32).unwrap());
                let g = g.unwrap();
                let lr = 1e-3 * step as f64;
                a.step += 1;
                b.step += 1;
                update_composed(&mut a, &g, &c, lr).unwrap();
                update_in_place(&mut b, &g, &c, lr).unwrap();
                for (x, y, what) in [
                    (a.var.as_tensor(), b.var.as_tensor(), "parameter"),
                    (&a.exp_avg, &b.exp_avg, "first moment"),
                    (&a.exp_avg_sq, &b.exp_avg_sq, "second moment"),
                ] {
                    assert_eq!(bits(x), bits(y), "{what}, step {step}, decay {decay}");
                }
            }
        }
    }

    #[test]
    fn saved_moments_are_not_changed_by_later_in_place_steps() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones(5, DType::F32, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), w)],
            AdamWConfig::default(),
            &WeightDecayRule::default(),
        )
        .unwrap();
        let g = Gradients([("w".to_string(), Tensor::full(0.5f32, 5, &dev).unwrap())].into());
        opt.step(&g, 0.1).unwrap();
        let saved = opt.state_tensors().unwrap();
        let before = bits(&saved["exp_avg.w"]);
        opt.step(&g, 0.1).unwrap();
        assert_eq!(bits(&saved["exp_avg.w"]), before);
        assert_ne!(bits(&opt.state_tensors().unwrap()["exp_avg.w"]), before);
    }
}
