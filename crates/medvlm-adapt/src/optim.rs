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
//!   checkpoint can restore it exactly.
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
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
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
            out.insert(k, g.affine(1.0 / n, 0.0)?);
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
            let md = p.exp_avg.dtype();
            let g = g.to_dtype(md)?;
            p.step += 1;
            let theta = p.var.as_tensor().to_dtype(md)?;
            let theta = if p.decay && c.weight_decay > 0.0 {
                theta.affine(1.0 - lr * c.weight_decay, 0.0)?
            } else {
                theta
            };
            p.exp_avg = (p.exp_avg.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            p.exp_avg_sq =
                (p.exp_avg_sq.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let bc1 = 1.0 - c.beta1.powi(p.step as i32);
            let bc2 = 1.0 - c.beta2.powi(p.step as i32);
            let denom = p
                .exp_avg_sq
                .affine(1.0 / bc2, 0.0)?
                .sqrt()?
                .affine(1.0, c.eps)?;
            let update = p.exp_avg.affine(lr / bc1, 0.0)?.div(&denom)?;
            let next = (theta - update)?.to_dtype(p.var.dtype())?;
            p.var.set(&next)?;
        }
        Ok(())
    }

    /// The moments as named tensors: `exp_avg.<name>` and `exp_avg_sq.<name>`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
        }
        out
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
                Ok(t.to_dtype(p.exp_avg.dtype())?
                    .to_device(p.var.as_tensor().device())?)
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
