//! LoRA: low-rank adaptation of linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
//! Large Language Models", ICLR 2022).
//!
//! A frozen layer `y = x Wᵀ + b` becomes `y = x Wᵀ + b + (α/r) · drop(x) Aᵀ Bᵀ` with
//! `A` `[r, in]` and `B` `[out, r]`. As in the paper (and HF PEFT), `A` starts from a
//! Kaiming-uniform draw (`U(-1/√in, 1/√in)`, PyTorch's `kaiming_uniform_(a=√5)`; seeded here)
//! and `B` from zeros, so training starts exactly at the pretrained model. Dropout (inverted,
//! probability `dropout`) acts on the adapter input only and only in training mode
//! ([`set_lora_training`]); its masks come from a seeded ChaCha stream per layer, so runs
//! are reproducible.
//!
//! Adapters are [`LinearWrapper`]s pushed onto the model's [`LinearLayer`]s, so the model code
//! is untouched. Their parameters are named as PEFT names them, `<module path>.lora_A.weight`
//! and `<module path>.lora_B.weight`, and live in a `VarMap` of their own (never the base
//! model's, so a plain export of the base map stays loadable).
//!
//! [`merge_lora`] folds `W ← W + (α/r) B A` into the base weights and removes the adapters,
//! which is how a fine-tuned model is exported: the result is a plain checkpoint any medvlm
//! command (and transformers) loads.
//!
//! # Choosing layers
//! [`LoraSpec::targets`] entries are matched against module paths:
//! - the short roles `q`, `k`, `v`, `out`, `fc1`, `fc2` map to each family's names
//!   (HF CLIP/SigLIP `self_attn.q_proj` ... `mlp.fc2`; BERT `attention.self.query`,
//!   `attention.output.dense`, `intermediate.dense`, `output.dense`; timm ViT `attn.proj`,
//!   `mlp.fc1/fc2`, and `q`/`k`/`v` select the fused `attn.qkv`);
//! - any other entry matches a path equal to it or ending with `.` + entry (`q_proj`,
//!   `mlp.fc1`, `visual_projection`, a full path);
//! - a `text:` or `vision:` prefix restricts an entry to one tower (`vision:q`).
//!
//! [`LoraSpec::towers`] further restricts every entry. A spec that matches no layer is an
//! error that lists the model's linear layers.
//!
//! # Saving adapters alone
//! [`save_lora_adapters`] writes the adapters without the base model in PEFT's layout
//! (`adapter_config.json` with `peft_type`, `r`, `lora_alpha`, `lora_dropout`,
//! `target_modules`; `adapter_model.safetensors` with `base_model.model.<path>.lora_A.weight`
//! / `.lora_B.weight`), and [`load_lora_adapters`] puts them back onto a base model.
//!
//! # Presets
//! [`LoraSpec::clip_lora`]: CLIP-LoRA (Zanella & Ben Ayed 2024, "Low-Rank Few-Shot Adaptation
//! of Vision-Language Models", CVPRW): `r = 2`, `α = 1`, dropout 0.25, on `q`, `k`, `v` of every
//! block of both encoders.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Tensor, Var};
use candle_nn::VarMap;
use medvlm_models::{LinearLayer, LinearLayers, LinearWrapper};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::finetune::{FinetuneError, Result, Towers};
use crate::optim::NamedVar;
use crate::train_config::LoraConfig;

/// What LoRA to apply: rank, scaling, dropout, target layers and towers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank `r` (>= 1). Default 8.
    pub rank: usize,
    /// Scaling numerator: the update is `(alpha / rank) B A`. Default 16.
    pub alpha: f64,
    /// Dropout probability on the adapter input, in [0, 1). Default 0.
    pub dropout: f64,
    /// Target layers (see the module documentation). Default `["q_proj", "v_proj"]`.
    pub targets: Vec<String>,
    /// Towers to adapt. Default both.
    pub towers: Towers,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self::from_config(&LoraConfig::default(), Towers::Both)
    }
}

impl LoraSpec {
    /// From the `[finetune.lora]` table, restricted to `towers`.
    pub fn from_config(c: &LoraConfig, towers: Towers) -> Self {
        Self {
            rank: c.rank,
            alpha: c.alpha,
            dropout: c.dropout,
            targets: c.targets.clone(),
            towers,
        }
    }

    /// CLIP-LoRA (Zanella & Ben Ayed 2024): `r = 2`, `α = 1`, dropout 0.25, `q`, `k`, `v` of
    /// every block of both encoders.
    pub fn clip_lora() -> Self {
        Self {
            rank: 2,
            alpha: 1.0,
            dropout: 0.25,
            targets: vec!["q".into(), "k".into(), "v".into()],
            towers: Towers::Both,
        }
    }

    /// `alpha / rank`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| FinetuneError::Setting {
            key: key.to_string(),
            reason,
        };
        if self.rank == 0 {
            return Err(bad("finetune.lora.rank", "must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad(
                "finetune.lora.alpha",
                format!("must be a positive finite number, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "finetune.lora.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if self.targets.is_empty() || self.targets.iter().any(|t| t.trim().is_empty()) {
            return Err(bad(
                "finetune.lora.targets",
                "must list at least one layer name".into(),
            ));
        }
        Ok(())
    }
}

/// The tower a module path belongs to, from its first component (HF `text_model.` /
/// `vision_model.` / projections, open_clip `text.` / `visual.`).
pub fn tower_of(path: &str) -> Option<Towers> {
    let first = path.split('.').next().unwrap_or("");
    match first {
        "text_model"
        | "text_projection"
        | "text"
        | "transformer"
        | "token_embedding"
        | "positional_embedding"
        | "ln_final" => Some(Towers::Text),
        "vision_model" | "visual_projection" | "visual" => Some(Towers::Vision),
        _ => None,
    }
}

fn ends_with_component(path: &str, suffix: &str) -> bool {
    path == suffix || path.ends_with(&format!(".{suffix}"))
}

/// Whether `path` has the role `role` (`q`, `k`, `v`, `out`, `fc1`, `fc2`) in one of the
/// layouts medvlm loads.
fn has_role(path: &str, role: &str) -> bool {
    let e = |s: &str| ends_with_component(path, s);
    match role {
        "q" => e("q_proj") || e("attention.self.query") || e("attn.qkv"),
        "k" => e("k_proj") || e("attention.self.key") || e("attn.qkv"),
        "v" => e("v_proj") || e("attention.self.value") || e("attn.qkv"),
        "out" => e("out_proj") || e("attention.output.dense") || e("attn.proj"),
        "fc1" => e("mlp.fc1") || e("intermediate.dense") || e("mlp.c_fc"),
        "fc2" => {
            e("mlp.fc2") || (e("output.dense") && !e("attention.output.dense")) || e("mlp.c_proj")
        }
        _ => false,
    }
}

/// Whether one target entry (see the module documentation) selects `path`.
pub fn target_matches(target: &str, path: &str) -> bool {
    let (tower, name) = match target.split_once(':') {
        Some(("text", rest)) => (Some(Towers::Text), rest),
        Some(("vision", rest)) => (Some(Towers::Vision), rest),
        _ => (None, target),
    };
    if let Some(t) = tower {
        if tower_of(path) != Some(t) {
            return false;
        }
    }
    if matches!(name, "q" | "k" | "v" | "out" | "fc1" | "fc2") {
        has_role(path, name)
    } else {
        ends_with_component(path, name)
    }
}

/// Module paths of `layers` selected by `spec` (targets and towers), in model order.
/// Errors when a target entry matches nothing, naming it and listing the model's layers.
pub fn lora_targets(paths: &[String], spec: &LoraSpec) -> Result<Vec<String>> {
    spec.validate()?;
    let in_towers = |p: &str| match spec.towers {
        Towers::Both => true,
        t => tower_of(p) == Some(t),
    };
    for target in &spec.targets {
        let prefix_ok = match target.split_once(':') {
            Some((pre, _)) => pre == "text" || pre == "vision",
            None => true,
        };
        if !prefix_ok {
            return Err(FinetuneError::Setting {
                key: "finetune.lora.targets".into(),
                reason: format!(
                    "{target:?}: the only tower prefixes are \"text:\" and \"vision:\""
                ),
            });
        }
        if !paths
            .iter()
            .any(|p| in_towers(p) && target_matches(target, p))
        {
            return Err(FinetuneError::NoLoraTarget {
                target: target.clone(),
                towers: spec.towers,
                available: summarise_paths(paths),
            });
        }
    }
    Ok(paths
        .iter()
        .filter(|p| in_towers(p) && spec.targets.iter().any(|t| target_matches(t, p)))
        .cloned()
        .collect())
}

/// Distinct layer names with block indices collapsed (`text_model.encoder.layers.*.self_attn.q_proj`),
/// for error messages.
fn summarise_paths(paths: &[String]) -> String {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in paths {
        let s: Vec<&str> = p
            .split('.')
            .map(|c| {
                if c.chars().all(|ch| ch.is_ascii_digit()) {
                    "*"
                } else {
                    c
                }
            })
            .collect();
        let s = s.join(".");
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
    out.join(", ")
}

/// One LoRA adapter on a linear layer; see the module documentation.
#[derive(Debug)]
pub struct LoraLinear {
    path: String,
    a: Var,
    b: Var,
    scaling: f64,
    dropout: f64,
    training: AtomicBool,
    enabled: AtomicBool,
    rng: Mutex<ChaCha8Rng>,
}

impl LoraLinear {
    /// A fresh adapter for `layer`: `A` `[rank, in]` Kaiming-uniform from `seed`, `B` zeros.
    pub fn new(layer: &LinearLayer, spec: &LoraSpec, seed: u64) -> Result<Self> {
        let (out_dim, in_dim) = (layer.out_features(), layer.in_features());
        let w = layer.weight();
        let (dtype, device) = (w.dtype(), w.device().clone());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a_vals: Vec<f32> = (0..spec.rank * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::from_vec(a_vals, (spec.rank, in_dim), &device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_dim, spec.rank), dtype, &device)?;
        Self::from_tensors(layer.path(), &a, &b, spec.scaling(), spec.dropout, seed)
    }

    /// An adapter from given `A` `[r, in]` and `B` `[out, r]` (e.g. loaded from a PEFT file).
    pub fn from_tensors(
        path: &str,
        a: &Tensor,
        b: &Tensor,
        scaling: f64,
        dropout: f64,
        seed: u64,
    ) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb {
            return Err(FinetuneError::Setting {
                key: "lora".into(),
                reason: format!(
                    "{path}: lora_A {:?} and lora_B {:?} disagree on the rank",
                    a.dims(),
                    b.dims()
                ),
            });
        }
        Ok(Self {
            path: path.to_string(),
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scaling,
            dropout,
            training: AtomicBool::new(false),
            enabled: AtomicBool::new(true),
            // A stream distinct from the one that drew A.
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15)),
        })
    }

    /// Module path of the adapted layer.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// `A` `[r, in]`.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// `B` `[out, r]`.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }
    /// Whether dropout is active.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
    /// Switch dropout on (training) or off (evaluation, the default).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed)
    }
    /// Whether the adapter adds its update (the default) or passes the base layer's output
    /// through unchanged.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
    /// Switch the adapter's update on (the default) or off, as PEFT's `disable_adapter()`:
    /// off, the layer computes the base model's output.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }
    /// PEFT names of the two parameters with their vars.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        vec![
            (format!("{}.lora_A.weight", self.path), self.a.clone()),
            (format!("{}.lora_B.weight", self.path), self.b.clone()),
        ]
    }
    /// The weight update `(alpha/r) B A` `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }

    fn dropout_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.is_training() || self.dropout == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.dropout;
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("LoRA dropout RNG poisoned".into()))?;
            (0..n)
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

impl LinearWrapper for LoraLinear {
    fn kind(&self) -> &str {
        "lora"
    }
    fn forward(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        if !self.is_enabled() {
            return Ok(y);
        }
        let x = self.dropout_input(x)?;
        let h = candle_nn::Linear::new(self.a.as_tensor().clone(), None).forward(&x)?;
        let d = candle_nn::Linear::new(self.b.as_tensor().clone(), None).forward(&h)?;
        y + (d * self.scaling)?
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn lora_of(w: &Arc<dyn LinearWrapper>) -> Option<&LoraLinear> {
    w.as_any().downcast_ref::<LoraLinear>()
}

/// Adds LoRA adapters to the layers `spec` selects and registers their parameters in
/// `adapters` (a `VarMap` separate from the base model's) under PEFT names. Layer `i` (in
/// model order) draws `A` from `seed + i`. Returns the new trainable parameters.
///
/// Errors, before touching the model, when a target matches no layer or a layer already
/// carries LoRA.
pub fn apply_lora(
    model: &mut dyn LinearLayers,
    spec: &LoraSpec,
    adapters: &VarMap,
    seed: u64,
) -> Result<Vec<NamedVar>> {
    let paths = model.linear_paths();
    let targets = lora_targets(&paths, spec)?;
    let chosen: BTreeSet<&str> = targets.iter().map(|s| s.as_str()).collect();
    for layer in model.linear_layers() {
        if chosen.contains(layer.path()) && layer.wrappers().iter().any(|w| lora_of(w).is_some()) {
            return Err(FinetuneError::Setting {
                key: "finetune.lora".into(),
                reason: format!("{} already carries a LoRA adapter", layer.path()),
            });
        }
        // B A has rank at most min(in, out): a larger rank adds parameters, not capacity
        // (and an absurd one would exhaust memory).
        let full = layer.in_features().min(layer.out_features());
        if chosen.contains(layer.path()) && spec.rank > full {
            return Err(FinetuneError::Setting {
                key: "finetune.lora.rank".into(),
                reason: format!(
                    "rank {} exceeds the full rank {full} of {} ({} -> {})",
                    spec.rank,
                    layer.path(),
                    layer.in_features(),
                    layer.out_features()
                ),
            });
        }
    }
    let mut out = Vec::new();
    let mut data = adapters
        .data()
        .lock()
        .map_err(|_| FinetuneError::Internal("adapter VarMap lock poisoned".into()))?;
    for (i, layer) in model
        .linear_layers_mut()
        .into_iter()
        .filter(|l| chosen.contains(l.path()))
        .enumerate()
    {
        let lora = LoraLinear::new(layer, spec, seed.wrapping_add(i as u64))?;
        for (name, var) in lora.named_vars() {
            if data.contains_key(&name) {
                return Err(FinetuneError::Setting {
                    key: "finetune.lora".into(),
                    reason: format!("parameter {name} already exists in the adapter map"),
                });
            }
            data.insert(name.clone(), var.clone());
            out.push((name, var));
        }
        layer.push_wrapper(Arc::new(lora));
    }
    Ok(out)
}

/// The LoRA adapters currently on `model`'s layers.
pub fn lora_adapters(model: &dyn LinearLayers) -> Vec<Arc<dyn LinearWrapper>> {
    wrappers_of::<LoraLinear>(model)
}

/// The wrappers of type `T` on `model`'s layers, in model order.
pub(crate) fn wrappers_of<T: 'static>(model: &dyn LinearLayers) -> Vec<Arc<dyn LinearWrapper>> {
    model
        .linear_layers()
        .into_iter()
        .flat_map(|l| {
            l.wrappers()
                .iter()
                .filter(|w| w.as_any().is::<T>())
                .cloned()
        })
        .collect()
}

/// Switches dropout of every LoRA adapter on `model` on (`true`) or off. Returns how many
/// adapters were switched.
pub fn set_lora_training(model: &dyn LinearLayers, on: bool) -> usize {
    let adapters = lora_adapters(model);
    for w in &adapters {
        if let Some(l) = lora_of(w) {
            l.set_training(on);
        }
    }
    adapters.len()
}

/// Switches every LoRA adapter on `model` on (`true`, the default) or off: off, the model
/// computes the base model's outputs (PEFT's `disable_adapter()`), e.g. for a baseline that
/// must not see the adaptation. Returns how many adapters were switched.
pub fn set_lora_enabled(model: &dyn LinearLayers, on: bool) -> usize {
    let adapters = lora_adapters(model);
    for w in &adapters {
        if let Some(l) = lora_of(w) {
            l.set_enabled(on);
        }
    }
    adapters.len()
}

/// Checks that every LoRA layer in `layers` (module paths) has its own weight tensor
/// `{path}.weight` in `base`, the trainable model's `VarMap`, so [`merge_lora`] can merge into
/// it. open_clip's q/k/v projections are row blocks of one fused `in_proj_weight` and cannot.
pub fn check_mergeable(layers: &[String], base: &VarMap) -> Result<()> {
    let data = base
        .data()
        .lock()
        .map_err(|_| FinetuneError::Internal("base VarMap lock poisoned".into()))?;
    let missing: Vec<&str> = layers
        .iter()
        .filter(|p| !data.contains_key(&format!("{p}.weight")))
        .map(String::as_str)
        .collect();
    if let Some(first) = missing.first() {
        return Err(FinetuneError::Setting {
            key: "finetune.lora.targets".into(),
            reason: format!(
                "LoRA on {} layer(s) (e.g. {first}) could not be merged into the exported \
                 weights: they are parts of a fused checkpoint tensor (open_clip's \
                 in_proj_weight); target out, fc1 or fc2 there instead",
                missing.len()
            ),
        });
    }
    Ok(())
}

/// Folds every LoRA adapter into its layer's weight (`W ← W + (α/r) B A`) and removes the
/// adapter; other wrappers stay. When `base` is given and holds `<path>.weight` (a model loaded
/// with [`medvlm_models::LoadMode::Trainable`]), that variable is updated in place too, so a
/// save of `base` contains the merged weights; a layer missing from `base` is an error (see
/// [`check_mergeable`]). Returns the merged module paths.
pub fn merge_lora(model: &mut dyn LinearLayers, base: Option<&VarMap>) -> Result<Vec<String>> {
    let mut merged = Vec::new();
    for layer in model.linear_layers_mut() {
        if !layer.wrappers().iter().any(|w| lora_of(w).is_some()) {
            continue;
        }
        if layer.is_int8() {
            return Err(medvlm_models::ModelError::invalid(format!(
                "{}: the layer runs in int8 (its f32 weight was dropped); merge LoRA before \
                 quantising",
                layer.path()
            ))
            .into());
        }
        let wrappers = layer.take_wrappers();
        let mut weight = layer.weight().detach();
        for w in &wrappers {
            if let Some(l) = lora_of(w) {
                // Sum in f32, whatever the storage dtype, to keep low-precision rounding once.
                let delta = l.delta_weight()?.to_dtype(DType::F32)?;
                weight =
                    (weight.to_dtype(DType::F32)? + delta)?.to_dtype(layer.weight().dtype())?;
            }
        }
        let name = format!("{}.weight", layer.path());
        let in_map = match base {
            Some(vm) => {
                let data = vm
                    .data()
                    .lock()
                    .map_err(|_| FinetuneError::Internal("base VarMap lock poisoned".into()))?;
                match data.get(&name) {
                    Some(var) => {
                        var.set(&weight)?;
                        Some(var.as_tensor().clone())
                    }
                    // The layer's weight is a view of a fused checkpoint tensor (open_clip's
                    // `in_proj_weight` holds q, k and v): merging only into the layer would
                    // leave the exported weights without the adapter.
                    None => {
                        return Err(FinetuneError::Setting {
                            key: "finetune.lora.targets".into(),
                            reason: format!(
                                "LoRA on {} cannot be merged into the exported weights: the \
                                 checkpoint has no tensor {name} (it is part of a fused \
                                 tensor); target other modules",
                                layer.path()
                            ),
                        })
                    }
                }
            }
            None => None,
        };
        layer.set_weight(in_map.unwrap_or(weight))?;
        for w in wrappers {
            if lora_of(&w).is_none() {
                layer.push_wrapper(w);
            }
        }
        merged.push(layer.path().to_string());
    }
    Ok(merged)
}

/// Number of scalar parameters in `vars`.
pub fn count_params(vars: &[NamedVar]) -> usize {
    vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
}

/// File names of a saved adapter (PEFT's).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// See [`ADAPTER_CONFIG`].
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before module paths in adapter files.
const PEFT_PREFIX: &str = "base_model.model.";

fn adapter_err(path: &Path, reason: impl Into<String>) -> FinetuneError {
    FinetuneError::Adapter {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes the LoRA adapters on `model` (created with `spec`) into `dir` in PEFT's layout (see
/// the module documentation), each file atomically. Returns the number of adapted layers;
/// errors when the model carries no adapter.
pub fn save_lora_adapters(model: &dyn LinearLayers, spec: &LoraSpec, dir: &Path) -> Result<usize> {
    let mut tensors = HashMap::new();
    let mut n = 0;
    for w in lora_adapters(model) {
        if let Some(l) = lora_of(&w) {
            for (name, var) in l.named_vars() {
                tensors.insert(format!("{PEFT_PREFIX}{name}"), var.as_tensor().clone());
            }
            n += 1;
        }
    }
    if n == 0 {
        return Err(adapter_err(
            dir,
            "the model carries no LoRA adapter to save",
        ));
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.targets,
        "bias": "none",
        "medvlm_towers": spec.towers.to_string(),
    });
    write_adapter_files(dir, &config, &tensors)?;
    Ok(n)
}

/// Writes an adapter folder: `dir/adapter_config.json` (`config`) and
/// `dir/adapter_model.safetensors` (`tensors`), each atomically.
pub(crate) fn write_adapter_files(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| FinetuneError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let bytes =
        serde_json::to_vec_pretty(config).map_err(|e| adapter_err(&cfg_path, e.to_string()))?;
    medvlm_io::atomic::write_atomic(&cfg_path, &bytes).map_err(|e| FinetuneError::Io {
        path: cfg_path.clone(),
        source: e.into_io(),
    })?;
    medvlm_models::weights::save_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS), tensors)?;
    Ok(())
}

/// Reads an adapter saved by [`save_lora_adapters`] (or by PEFT for the same architecture)
/// from `dir` and puts it onto `model`, registering the parameters in `adapters` (trainable,
/// dropout off). Every layer named in the file must exist with matching shapes, else nothing
/// is changed and the error names the layer. Returns the adapter's settings and parameters.
pub fn load_lora_adapters(
    model: &mut dyn LinearLayers,
    dir: &Path,
    adapters: &VarMap,
) -> Result<(LoraSpec, Vec<NamedVar>)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| FinetuneError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| adapter_err(&cfg_path, e.to_string()))?;
    let rank = v["r"]
        .as_u64()
        .filter(|&r| r >= 1)
        .ok_or_else(|| adapter_err(&cfg_path, "missing or invalid \"r\""))? as usize;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or_else(|| adapter_err(&cfg_path, "missing or invalid \"lora_alpha\""))?;
    let dropout = v["lora_dropout"].as_f64().unwrap_or(0.0);
    let targets: Vec<String> = match &v["target_modules"] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let towers = match v["medvlm_towers"].as_str() {
        Some("vision") => Towers::Vision,
        Some("text") => Towers::Text,
        _ => Towers::Both,
    };
    let spec = LoraSpec {
        rank,
        alpha,
        dropout,
        targets,
        towers,
    };
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&w_path, &candle_core::Device::Cpu)
        .map_err(|e| adapter_err(&w_path, e.to_string()))?;
    let out = install_lora_tensors(model, &spec, tensors, adapters, &w_path)?;
    Ok((spec, out))
}

/// Puts LoRA adapters given as tensors (`<path>.lora_A.weight` / `.lora_B.weight`, with or
/// without PEFT's `base_model.model.` prefix) onto `model` with `spec`'s scaling and dropout,
/// registering them in `adapters` (dropout off). Every layer named must exist with shapes that
/// fit `spec.rank`, else nothing is changed and the error names `origin` (the file the
/// tensors came from) and the layer. Returns the new parameters.
pub fn install_lora_tensors(
    model: &mut dyn LinearLayers,
    spec: &LoraSpec,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    adapters: &VarMap,
    origin: &Path,
) -> Result<Vec<NamedVar>> {
    let (w_path, rank) = (origin, spec.rank);
    // path -> (A, B)
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let name = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_string();
        if let Some(p) = name.strip_suffix(".lora_A.weight") {
            pairs.entry(p.to_string()).or_default().0 = Some(t);
        } else if let Some(p) = name.strip_suffix(".lora_B.weight") {
            pairs.entry(p.to_string()).or_default().1 = Some(t);
        } else {
            return Err(adapter_err(w_path, format!("unexpected tensor {name}")));
        }
    }
    if pairs.is_empty() {
        return Err(adapter_err(w_path, "no LoRA tensors"));
    }
    // Check everything before touching the model.
    let mut planned = Vec::new();
    {
        let layers = model.linear_layers();
        for (path, (a, b)) in &pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(adapter_err(
                    w_path,
                    format!("{path}: lora_A or lora_B is missing"),
                ));
            };
            let layer = layers.iter().find(|l| l.path() == path).ok_or_else(|| {
                adapter_err(w_path, format!("the model has no linear layer {path}"))
            })?;
            let (out_dim, in_dim) = (layer.out_features(), layer.in_features());
            if a.dims() != [rank, in_dim] || b.dims() != [out_dim, rank] {
                return Err(adapter_err(
                    w_path,
                    format!(
                        "{path}: lora_A {:?} / lora_B {:?} do not fit the layer [{out_dim}, {in_dim}] at rank {rank}",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            if layer.wrappers().iter().any(|w| lora_of(w).is_some()) {
                return Err(adapter_err(
                    w_path,
                    format!("{path} already carries a LoRA adapter"),
                ));
            }
            let (dev, dt) = (layer.weight().device().clone(), layer.weight().dtype());
            planned.push((
                path.clone(),
                a.to_device(&dev)?.to_dtype(dt)?,
                b.to_device(&dev)?.to_dtype(dt)?,
            ));
        }
    }
    let mut data = adapters
        .data()
        .lock()
        .map_err(|_| FinetuneError::Internal("adapter VarMap lock poisoned".into()))?;
    let mut out = Vec::new();
    for (i, (path, a, b)) in planned.into_iter().enumerate() {
        let lora = LoraLinear::from_tensors(&path, &a, &b, spec.scaling(), spec.dropout, i as u64)?;
        for (name, var) in lora.named_vars() {
            data.insert(name.clone(), var.clone());
            out.push((name, var));
        }
        model.wrap_linear(&path, Arc::new(lora))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn roles_suffixes_and_tower_prefixes() {
        let hf = "text_model.encoder.layers.3.self_attn.q_proj";
        assert!(target_matches("q", hf));
        assert!(target_matches("q_proj", hf));
        assert!(target_matches("self_attn.q_proj", hf));
        assert!(target_matches("text:q", hf));
        assert!(!target_matches("vision:q", hf));
        assert!(!target_matches("k", hf));
        // Suffixes match whole components only.
        assert!(!target_matches("_proj", hf));
        assert!(!target_matches("proj", hf));
        let bert = "text.transformer.encoder.layer.0.output.dense";
        assert!(target_matches("fc2", bert));
        assert!(!target_matches("fc1", bert));
        assert!(!target_matches("out", bert));
        let bert_attn_out = "text.transformer.encoder.layer.0.attention.output.dense";
        assert!(target_matches("out", bert_attn_out));
        assert!(!target_matches("fc2", bert_attn_out));
        let timm = "visual.trunk.blocks.4.attn.qkv";
        assert!(target_matches("q", timm) && target_matches("v", timm));
        assert!(target_matches("vision:k", timm));
        assert!(!target_matches("out", timm));
        assert_eq!(tower_of("visual_projection"), Some(Towers::Vision));
        assert_eq!(tower_of("logit_scale"), None);
        // open_clip's own layout (the `openclip` family).
        let oc_mlp = "transformer.resblocks.1.mlp.c_fc";
        assert!(target_matches("text:fc1", oc_mlp) && !target_matches("fc2", oc_mlp));
        assert!(target_matches("fc2", "transformer.resblocks.1.mlp.c_proj"));
        assert!(!target_matches("fc2", "visual.attnpool.c_proj"));
        assert!(target_matches("vision:q", "visual.attnpool.q_proj"));
        assert_eq!(tower_of("positional_embedding"), Some(Towers::Text));
        assert_eq!(
            tower_of("visual.attnpool.positional_embedding"),
            Some(Towers::Vision)
        );
    }

    #[test]
    fn selection_follows_towers_and_reports_what_exists() {
        let p = paths(&[
            "text_model.encoder.layers.0.self_attn.q_proj",
            "text_model.encoder.layers.1.self_attn.q_proj",
            "vision_model.encoder.layers.0.self_attn.q_proj",
            "vision_model.encoder.layers.0.mlp.fc1",
            "visual_projection",
        ]);
        let mut spec = LoraSpec {
            targets: vec!["q".into()],
            ..LoraSpec::default()
        };
        assert_eq!(lora_targets(&p, &spec).unwrap().len(), 3);
        spec.towers = Towers::Vision;
        assert_eq!(
            lora_targets(&p, &spec).unwrap(),
            vec!["vision_model.encoder.layers.0.self_attn.q_proj".to_string()]
        );
        spec.targets = vec!["q".into(), "fc2".into()];
        let err = lora_targets(&p, &spec).unwrap_err().to_string();
        assert!(err.contains("\"fc2\""), "{err}");
        assert!(
            err.contains("text_model.encoder.layers.*.self_attn.q_proj"),
            "{err}"
        );
        assert!(
            err.contains("vision_model.encoder.layers.*.mlp.fc1"),
            "{err}"
        );
        spec.targets = vec!["q".into()];
        spec.rank = 0;
        assert!(lora_targets(&p, &spec)
            .unwrap_err()
            .to_string()
            .contains("finetune.lora.rank"));
        spec.rank = 2;
        spec.dropout = 1.0;
        assert!(lora_targets(&p, &spec)
            .unwrap_err()
            .to_string()
            .contains("finetune.lora.dropout"));
    }

    /// A LoRA adapter cannot be folded into a layer whose f32 weight int8 packing dropped:
    /// refused, naming the layer, rather than merged into the placeholder.
    #[test]
    fn merging_into_an_int8_layer_is_refused() {
        struct One(LinearLayer);
        impl LinearLayers for One {
            fn linear_layers(&self) -> Vec<&LinearLayer> {
                vec![&self.0]
            }
            fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
                vec![&mut self.0]
            }
        }
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 32), &dev).unwrap();
        let mut m = One(LinearLayer::new("enc.fc1", w, None));
        let lora = LoraLinear::new(&m.0, &LoraSpec::default(), 0).unwrap();
        m.0.push_wrapper(Arc::new(lora));
        m.0.pack_int8().unwrap();
        let e = merge_lora(&mut m, None).unwrap_err().to_string();
        assert!(e.contains("enc.fc1") && e.contains("int8"), "{e}");
        assert_eq!(m.0.wrappers().len(), 1, "the adapter stays");
    }

    #[test]
    fn clip_lora_preset_matches_the_paper() {
        let s = LoraSpec::clip_lora();
        assert_eq!((s.rank, s.alpha, s.dropout), (2, 1.0, 0.25));
        assert_eq!(s.scaling(), 0.5);
        assert_eq!(s.targets, vec!["q", "k", "v"]);
        assert_eq!(s.towers, Towers::Both);
    }
}
