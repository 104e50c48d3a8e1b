//! Bottleneck adapters inside a frozen encoder (Houlsby et al., ICML 2019, "Parameter-Efficient
//! Transfer Learning for NLP"; VLSM-Adapter, Dhakal et al., MICCAI 2024, puts them into the
//! encoders of CLIP-based segmentation models).
//!
//! An adapter on a linear layer's output `y` adds a small residual MLP of `y`:
//! `y + W_up · GELU(W_down · y + b_down) + b_up`, with `W_down` `[m, out]` and `W_up` `[out, m]`
//! for a bottleneck width `m`. As in the paper, the adapter starts near the identity: `W_down`
//! from a seeded Kaiming-uniform draw (`U(-1/√out, 1/√out)`), `W_up` and both biases from
//! zeros, so training starts exactly at the pretrained model. Houlsby et al. place one adapter
//! after the attention block's output projection and one after the MLP's second layer, each
//! before its residual addition: the default targets `out` and `fc2` (the roles of
//! [`crate::lora`]'s module documentation).
//!
//! Adapters are [`LinearWrapper`]s pushed onto the model's [`LinearLayer`]s (the model code is
//! untouched), with parameters named `<module path>.adapter_down.weight` / `.bias` and
//! `<module path>.adapter_up.weight` / `.bias` in a `VarMap` of their own.
//! [`save_bottleneck_adapters`] writes `adapter_config.json` (`adapter_type: "bottleneck"`,
//! `bottleneck`, `target_modules`, `medvlm_towers`) and `adapter_model.safetensors`;
//! [`load_bottleneck_adapters`] puts them back onto the same base model.
//!
//! Defaults ([`AdapterSpec::default`]): bottleneck 16, targets `out` and `fc2`, image tower.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Module, Tensor, Var};
use candle_nn::VarMap;
use medvlm_models::{LinearLayer, LinearLayers, LinearWrapper};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::finetune::{FinetuneError, Result, Towers};
use crate::lora::{target_matches, tower_of, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::optim::NamedVar;

/// Which adapters to add: bottleneck width, target layers and towers.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// Bottleneck width `m` (>= 1).
    pub bottleneck: usize,
    /// Target layers, in [`crate::lora`]'s notation (`out`, `fc2`, `vision:fc2`, a path).
    pub targets: Vec<String>,
    /// Towers to adapt.
    pub towers: Towers,
}

impl Default for AdapterSpec {
    fn default() -> Self {
        Self {
            bottleneck: 16,
            targets: vec!["out".into(), "fc2".into()],
            towers: Towers::Vision,
        }
    }
}

fn setting(key: &str, reason: impl Into<String>) -> FinetuneError {
    FinetuneError::Setting {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Module paths of `paths` selected by `spec`, in model order; a target matching nothing is
/// an error naming it.
pub fn adapter_targets(paths: &[String], spec: &AdapterSpec) -> Result<Vec<String>> {
    if spec.bottleneck == 0 {
        return Err(setting("adapter.bottleneck", "must be at least 1"));
    }
    if spec.targets.is_empty() || spec.targets.iter().any(|t| t.trim().is_empty()) {
        return Err(setting(
            "adapter.targets",
            "must list at least one layer name",
        ));
    }
    let in_towers = |p: &str| match spec.towers {
        Towers::Both => true,
        t => tower_of(p) == Some(t),
    };
    for t in &spec.targets {
        if !paths.iter().any(|p| in_towers(p) && target_matches(t, p)) {
            return Err(setting(
                "adapter.targets",
                format!(
                    "{t:?} matches no linear layer of the model (towers: {})",
                    spec.towers
                ),
            ));
        }
    }
    Ok(paths
        .iter()
        .filter(|p| in_towers(p) && spec.targets.iter().any(|t| target_matches(t, p)))
        .cloned()
        .collect())
}

/// One bottleneck adapter on a linear layer's output; see the module documentation.
#[derive(Debug)]
pub struct BottleneckAdapter {
    path: String,
    down_w: Var,
    down_b: Var,
    up_w: Var,
    up_b: Var,
    enabled: AtomicBool,
}

impl BottleneckAdapter {
    /// A fresh adapter for `layer` with bottleneck `m`: `W_down` Kaiming-uniform from `seed`,
    /// the rest zeros (the adapter adds nothing until trained).
    pub fn new(layer: &LinearLayer, m: usize, seed: u64) -> Result<Self> {
        let out = layer.out_features();
        let w = layer.weight();
        let (dtype, device) = (w.dtype(), w.device().clone());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (out as f64).sqrt();
        let down: Vec<f32> = (0..m * out)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Self::from_tensors(
            layer.path(),
            &Tensor::from_vec(down, (m, out), &device)?.to_dtype(dtype)?,
            &Tensor::zeros(m, dtype, &device)?,
            &Tensor::zeros((out, m), dtype, &device)?,
            &Tensor::zeros(out, dtype, &device)?,
        )
    }

    /// An adapter from its four tensors (e.g. read from a saved adapter), shapes checked.
    pub fn from_tensors(
        path: &str,
        down_w: &Tensor,
        down_b: &Tensor,
        up_w: &Tensor,
        up_b: &Tensor,
    ) -> Result<Self> {
        let (m, out) = down_w.dims2()?;
        if down_b.dims() != [m] || up_w.dims() != [out, m] || up_b.dims() != [out] {
            return Err(setting(
                "adapter",
                format!(
                    "{path}: adapter tensors disagree: down {:?} + {:?}, up {:?} + {:?}",
                    down_w.dims(),
                    down_b.dims(),
                    up_w.dims(),
                    up_b.dims()
                ),
            ));
        }
        Ok(Self {
            path: path.to_string(),
            down_w: Var::from_tensor(down_w)?,
            down_b: Var::from_tensor(down_b)?,
            up_w: Var::from_tensor(up_w)?,
            up_b: Var::from_tensor(up_b)?,
            enabled: AtomicBool::new(true),
        })
    }

    /// Module path of the adapted layer.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The bottleneck width.
    pub fn bottleneck(&self) -> usize {
        self.down_b.as_tensor().dims()[0]
    }
    /// Whether the adapter adds its output (the default) or passes the layer's through.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
    /// Switch the adapter on (the default) or off (the base model's output).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }
    /// The four parameters with their names.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let p = &self.path;
        vec![
            (format!("{p}.adapter_down.weight"), self.down_w.clone()),
            (format!("{p}.adapter_down.bias"), self.down_b.clone()),
            (format!("{p}.adapter_up.weight"), self.up_w.clone()),
            (format!("{p}.adapter_up.bias"), self.up_b.clone()),
        ]
    }
}

impl LinearWrapper for BottleneckAdapter {
    fn kind(&self) -> &str {
        "bottleneck"
    }
    fn forward(&self, _x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        if !self.is_enabled() {
            return Ok(y);
        }
        let down = candle_nn::Linear::new(
            self.down_w.as_tensor().clone(),
            Some(self.down_b.as_tensor().clone()),
        );
        let up = candle_nn::Linear::new(
            self.up_w.as_tensor().clone(),
            Some(self.up_b.as_tensor().clone()),
        );
        let h = down.forward(&y)?.gelu_erf()?;
        &y + up.forward(&h)?
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn adapter_of(w: &Arc<dyn LinearWrapper>) -> Option<&BottleneckAdapter> {
    w.as_any().downcast_ref::<BottleneckAdapter>()
}

/// The bottleneck adapters on `model`'s layers, in model order.
pub fn bottleneck_adapters(model: &dyn LinearLayers) -> Vec<Arc<dyn LinearWrapper>> {
    crate::lora::wrappers_of::<BottleneckAdapter>(model)
}

/// Switches every bottleneck adapter on `model` on or off (off: the base model's outputs).
/// Returns how many were switched.
pub fn set_bottleneck_enabled(model: &dyn LinearLayers, on: bool) -> usize {
    let adapters = bottleneck_adapters(model);
    adapters
        .iter()
        .filter_map(adapter_of)
        .for_each(|a| a.set_enabled(on));
    adapters.len()
}

fn register(adapters: &VarMap, vars: &[NamedVar]) -> Result<()> {
    let mut data = adapters
        .data()
        .lock()
        .map_err(|_| FinetuneError::Internal("adapter VarMap lock poisoned".into()))?;
    for (name, var) in vars {
        if data.contains_key(name) {
            return Err(setting(
                "adapter",
                format!("parameter {name} already exists in the adapter map"),
            ));
        }
        data.insert(name.clone(), var.clone());
    }
    Ok(())
}

/// Adds a bottleneck adapter to each layer `spec` selects and registers its parameters in
/// `adapters` (separate from the base model's `VarMap`); layer `i` (model order) draws from
/// `seed + i`. Errors, before touching the model, when a target matches nothing or a layer
/// already carries a bottleneck adapter. Returns the new trainable parameters.
pub fn apply_bottleneck_adapters(
    model: &mut dyn LinearLayers,
    spec: &AdapterSpec,
    adapters: &VarMap,
    seed: u64,
) -> Result<Vec<NamedVar>> {
    let targets = adapter_targets(&model.linear_paths(), spec)?;
    for layer in model.linear_layers() {
        if !targets.iter().any(|t| t == layer.path()) {
            continue;
        }
        if layer.wrappers().iter().any(|w| adapter_of(w).is_some()) {
            return Err(setting(
                "adapter",
                format!("{} already carries a bottleneck adapter", layer.path()),
            ));
        }
        // A bottleneck narrower than the layer is the point (and an absurd width would
        // exhaust memory).
        if spec.bottleneck > layer.out_features() {
            return Err(setting(
                "adapter.bottleneck",
                format!(
                    "{} is wider than the output of {} ({}): a bottleneck must be at most the \
                     layer's width",
                    spec.bottleneck,
                    layer.path(),
                    layer.out_features()
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for (i, layer) in model
        .linear_layers_mut()
        .into_iter()
        .filter(|l| targets.iter().any(|t| t == l.path()))
        .enumerate()
    {
        let a = BottleneckAdapter::new(layer, spec.bottleneck, seed.wrapping_add(i as u64))?;
        let vars = a.named_vars();
        register(adapters, &vars)?;
        out.extend(vars);
        layer.push_wrapper(Arc::new(a));
    }
    Ok(out)
}

fn adapter_err(path: &Path, reason: impl Into<String>) -> FinetuneError {
    FinetuneError::Adapter {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes the bottleneck adapters on `model` (made with `spec`) into `dir`, each file
/// atomically. Returns the number of adapted layers; errors when the model has none.
pub fn save_bottleneck_adapters(
    model: &dyn LinearLayers,
    spec: &AdapterSpec,
    dir: &Path,
) -> Result<usize> {
    let mut tensors = HashMap::new();
    let mut n = 0;
    for w in bottleneck_adapters(model) {
        if let Some(a) = adapter_of(&w) {
            for (name, var) in a.named_vars() {
                tensors.insert(name, var.as_tensor().clone());
            }
            n += 1;
        }
    }
    if n == 0 {
        return Err(adapter_err(
            dir,
            "the model carries no bottleneck adapter to save",
        ));
    }
    let config = serde_json::json!({
        "adapter_type": "bottleneck",
        "bottleneck": spec.bottleneck,
        "activation": "gelu",
        "target_modules": spec.targets,
        "medvlm_towers": spec.towers.to_string(),
    });
    crate::lora::write_adapter_files(dir, &config, &tensors)?;
    Ok(n)
}

/// Reads adapters saved by [`save_bottleneck_adapters`] from `dir` and puts them onto
/// `model`, registering the parameters in `adapters`. Every layer named must exist with a
/// matching width, else nothing is changed and the error names the file and the layer.
/// Returns the settings and the parameters.
pub fn load_bottleneck_adapters(
    model: &mut dyn LinearLayers,
    dir: &Path,
    adapters: &VarMap,
) -> Result<(AdapterSpec, Vec<NamedVar>)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| FinetuneError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| adapter_err(&cfg_path, e.to_string()))?;
    if v["adapter_type"].as_str() != Some("bottleneck") {
        return Err(adapter_err(
            &cfg_path,
            "not a bottleneck adapter (adapter_type is not \"bottleneck\")",
        ));
    }
    let bottleneck = v["bottleneck"]
        .as_u64()
        .filter(|&m| m >= 1)
        .ok_or_else(|| adapter_err(&cfg_path, "missing or invalid \"bottleneck\""))?
        as usize;
    let targets: Vec<String> = v["target_modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let towers = match v["medvlm_towers"].as_str() {
        Some("text") => Towers::Text,
        Some("both") => Towers::Both,
        _ => Towers::Vision,
    };
    let spec = AdapterSpec {
        bottleneck,
        targets,
        towers,
    };
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&w_path, &candle_core::Device::Cpu)
        .map_err(|e| adapter_err(&w_path, e.to_string()))?;
    // path -> the four tensors, by suffix.
    const PARTS: [&str; 4] = [
        ".adapter_down.weight",
        ".adapter_down.bias",
        ".adapter_up.weight",
        ".adapter_up.bias",
    ];
    let mut by_layer: BTreeMap<String, [Option<Tensor>; 4]> = BTreeMap::new();
    for (name, t) in tensors {
        let (path, k) = PARTS
            .iter()
            .enumerate()
            .find_map(|(k, s)| name.strip_suffix(s).map(|p| (p.to_string(), k)))
            .ok_or_else(|| adapter_err(&w_path, format!("unexpected tensor {name}")))?;
        by_layer.entry(path).or_default()[k] = Some(t);
    }
    if by_layer.is_empty() {
        return Err(adapter_err(&w_path, "no adapter tensors"));
    }
    // Check everything before touching the model.
    let mut planned = Vec::new();
    {
        let layers = model.linear_layers();
        for (path, parts) in &by_layer {
            let [Some(dw), Some(db), Some(uw), Some(ub)] = parts else {
                return Err(adapter_err(&w_path, format!("{path}: a tensor is missing")));
            };
            let layer = layers.iter().find(|l| l.path() == path).ok_or_else(|| {
                adapter_err(&w_path, format!("the model has no linear layer {path}"))
            })?;
            if layer.wrappers().iter().any(|w| adapter_of(w).is_some()) {
                return Err(adapter_err(
                    &w_path,
                    format!("{path} already carries a bottleneck adapter"),
                ));
            }
            let (dtype, device) = (layer.weight().dtype(), layer.weight().device().clone());
            let prep = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?
                    .to_dtype(dtype)?
                    .to_device(&device)?)
            };
            let a = BottleneckAdapter::from_tensors(
                path,
                &prep(dw)?,
                &prep(db)?,
                &prep(uw)?,
                &prep(ub)?,
            )
            .map_err(|e| adapter_err(&w_path, e.to_string()))?;
            if a.bottleneck() != bottleneck || uw.dims()[0] != layer.out_features() {
                return Err(adapter_err(
                    &w_path,
                    format!(
                        "{path}: adapter of width {} for a {}-wide layer, the config says {bottleneck}",
                        a.bottleneck(),
                        layer.out_features()
                    ),
                ));
            }
            planned.push(a);
        }
    }
    let mut out = Vec::new();
    for a in planned {
        let vars = a.named_vars();
        register(adapters, &vars)?;
        out.extend(vars);
        let path = a.path().to_string();
        if let Some(layer) = model
            .linear_layers_mut()
            .into_iter()
            .find(|l| l.path() == path)
        {
            layer.push_wrapper(Arc::new(a));
        }
    }
    Ok((spec, out))
}
