//! Loading a model directory of any family (weights + tokenizer +
//! preprocessing), and saving one that loads back the same way.
//!
//! Family detection: `config.json` with `model_type` `clip` or `siglip`, or
//! an `open_clip_config.json` (BiomedCLIP layout).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::biomedclip::BiomedClip;
use crate::clip::{ClipConfig, ClipModel};
use crate::error::{ModelError, Result};
use crate::openclip::OpenClipResNet;
use crate::preprocess::{PreprocessConfig, Resample, Resize};
use crate::siglip::{SiglipConfig, SiglipModel};
use crate::source::{ModelSource, EXPECTED_FILES};
use crate::tokenizer::{Padding, TextTokenizer};
use crate::vlm::{Family, VisionLanguageModel};
use crate::weights::{save_safetensors_atomic, LoadMode, WeightFile, DEFAULT_IGNORED};

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype (default f32). bf16 on the CPU loads the weights in f32 and runs the
    /// linear layers' products in bf16 with f32 accumulation, everything else in f32
    /// ([`crate::compute::ComputePlan::CpuBf16Linear`]; needs AVX512-BF16 and
    /// [`LoadMode::Frozen`]); the model then reports f32 as its dtype.
    pub dtype: DType,
    pub mode: LoadMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            mode: LoadMode::Frozen,
        }
    }
}

/// A loaded model with its tokenizer and preprocessing.
pub struct LoadedModel {
    pub model: Box<dyn VisionLanguageModel>,
    pub tokenizer: TextTokenizer,
    pub preprocess: PreprocessConfig,
    pub family: Family,
    /// The model directory.
    pub dir: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("family", &self.family)
            .field("dir", &self.dir)
            .finish()
    }
}

/// Detect the family of a model directory.
pub fn detect_family(dir: &Path) -> Result<Family> {
    let cfg = dir.join("config.json");
    if cfg.is_file() {
        let text = std::fs::read_to_string(&cfg).map_err(|e| ModelError::io(&cfg, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::config(&cfg, e))?;
        return match v.get("model_type").and_then(|m| m.as_str()) {
            Some("clip") => Ok(Family::Clip),
            Some("siglip") => Ok(Family::Siglip),
            Some(other) => Err(ModelError::UnknownFamily {
                family: other.to_string(),
                path: cfg,
                supported:
                    "clip, siglip (config.json model_type), biomedclip, openclip (open_clip_config.json)"
                        .into(),
            }),
            None => Err(ModelError::config(&cfg, "no model_type field")),
        };
    }
    let open_clip = dir.join("open_clip_config.json");
    if open_clip.is_file() {
        let text =
            std::fs::read_to_string(&open_clip).map_err(|e| ModelError::io(&open_clip, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::config(&open_clip, e))?;
        return Ok(if crate::openclip::is_native_config(&v) {
            Family::OpenClip
        } else {
            Family::Biomedclip
        });
    }
    Err(ModelError::MissingFile {
        path: cfg,
        reason: format!(
            "neither config.json nor open_clip_config.json in {}; a model directory holds {EXPECTED_FILES}",
            dir.display()
        ),
    })
}

/// The weight file of an HF-layout directory: `model.safetensors`, else `pytorch_model.bin`.
pub fn find_hf_weights(dir: &Path) -> Result<PathBuf> {
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(ModelError::MissingFile {
        path: dir.join("model.safetensors"),
        reason: "no weights: expected model.safetensors or pytorch_model.bin".into(),
    })
}

/// Resolve `spec` (directory, `hf:ORG/NAME`, preset) and load it.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let dir = ModelSource::parse(spec)?.resolve()?;
    load_model_dir(&dir, opts)
}

fn hf_preprocess(dir: &Path) -> Result<PreprocessConfig> {
    let p = dir.join("preprocessor_config.json");
    if !p.is_file() {
        return Err(ModelError::MissingFile {
            path: p,
            reason: "the image preprocessing config is missing".into(),
        });
    }
    PreprocessConfig::from_hf_file(&p)
}

/// open_clip's image transform: Resize(shortest edge, bicubic) + CenterCrop + Normalize.
fn open_clip_preprocess(size: usize, mean: [f32; 3], std: [f32; 3]) -> PreprocessConfig {
    PreprocessConfig {
        resize: Some(Resize::ShortestEdge(size)),
        crop: Some((size, size)),
        mean,
        std,
        resample: Resample::Bicubic,
    }
}

/// Load a model directory.
pub fn load_model_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let family = detect_family(dir)?;
    // bf16 on the CPU: f32 weights with bf16 linear products, refused before reading weights
    // on a CPU without the instruction or for a trainable model.
    let cpu_bf16 = opts.dtype == DType::BF16 && opts.device.is_cpu();
    if cpu_bf16 {
        crate::compute::compute_plan(opts.dtype, &opts.device)?;
        if !matches!(opts.mode, LoadMode::Frozen) {
            return Err(ModelError::invalid(
                "bf16 on the CPU is for inference (linear layers in bf16 have no backward \
                 pass); load a trainable model in f32",
            ));
        }
    }
    let opts = &LoadOptions {
        dtype: if cpu_bf16 { DType::F32 } else { opts.dtype },
        ..opts.clone()
    };
    let (model, tokenizer, preprocess): (Box<dyn VisionLanguageModel>, _, _) = match family {
        Family::Clip => {
            let cfg = ClipConfig::from_file(&dir.join("config.json"))?;
            let wf = WeightFile::open(find_hf_weights(dir)?)?;
            let m = wf.load(
                opts.dtype,
                &opts.device,
                &opts.mode,
                DEFAULT_IGNORED,
                |vb| ClipModel::load(vb, &cfg),
            )?;
            let tok = TextTokenizer::from_file(
                &dir.join("tokenizer.json"),
                cfg.text_config.max_position_embeddings,
                Padding::MaxLength,
            )?;
            (Box::new(m), tok, hf_preprocess(dir)?)
        }
        Family::Siglip => {
            let cfg = SiglipConfig::from_file(&dir.join("config.json"))?;
            let wf = WeightFile::open(find_hf_weights(dir)?)?;
            let m = wf.load(
                opts.dtype,
                &opts.device,
                &opts.mode,
                DEFAULT_IGNORED,
                |vb| SiglipModel::load(vb, &cfg),
            )?;
            let tok = TextTokenizer::from_file(
                &dir.join("tokenizer.json"),
                cfg.text_config.max_position_embeddings,
                Padding::MaxLength,
            )?;
            (Box::new(m), tok, hf_preprocess(dir)?)
        }
        Family::OpenClip => {
            let m = OpenClipResNet::from_dir(dir, opts.dtype, &opts.device, &opts.mode)?;
            let c = m.config();
            let pre = open_clip_preprocess(c.vision.image_size, c.mean, c.std);
            // open_clip pads with 0 to the context length.
            let tok = TextTokenizer::from_file(
                &dir.join("tokenizer.json"),
                c.text.context_length,
                Padding::MaxLength,
            )?;
            (Box::new(m), tok, pre)
        }
        Family::Biomedclip => {
            let m = BiomedClip::from_dir(dir, opts.dtype, &opts.device, &opts.mode)?;
            let c = m.config();
            let pre = open_clip_preprocess(c.vision.image_size, c.mean, c.std);
            // open_clip's HF tokenizer pads to the context length. A local
            // hf_tokenizer_name folder serves when the model folder has no tokenizer.json.
            let own = dir.join("tokenizer.json");
            let file = match &c.tokenizer_file {
                Some(f) if !own.is_file() => f.clone(),
                _ => own,
            };
            let tok = TextTokenizer::from_file(&file, c.context_length, Padding::MaxLength)?;
            (Box::new(m), tok, pre)
        }
    };
    let mut model = model;
    if cpu_bf16 {
        model.pack_linear_bf16()?;
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        preprocess,
        family,
        dir: dir.to_path_buf(),
    })
}

/// Named tensors of a `VarMap` (e.g. a model built with `VarBuilder::from_varmap`).
pub fn varmap_tensors(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::invalid("VarMap lock poisoned"))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    medvlm_io::atomic::write_atomic(path, bytes).map_err(|e| ModelError::io(path, e.into_io()))
}

/// What a saved HF-layout model directory contains.
pub struct SaveModelDir<'a> {
    /// `config.json` contents (e.g. `serde_json::to_value(&clip_config)`).
    pub config: serde_json::Value,
    /// Weights by checkpoint name.
    pub tensors: &'a HashMap<String, Tensor>,
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Pad token written to tokenizer_config.json (so it loads back with the same pad id).
    pub pad_token: Option<&'a str>,
    pub preprocess: &'a PreprocessConfig,
    /// `image_processor_type`, e.g. `CLIPImageProcessor`.
    pub processor_type: &'a str,
}

fn write_tokenizer_files(dir: &Path, what: &SaveModelDir) -> Result<()> {
    let tok = what
        .tokenizer
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer {
            path: dir.join("tokenizer.json"),
            reason: e.to_string(),
        })?;
    write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
    let mut tc = serde_json::json!({ "backend": "tokenizers" });
    if let Some(p) = what.pad_token {
        tc["pad_token"] = serde_json::Value::String(p.to_string());
    }
    write_atomic(&dir.join("tokenizer_config.json"), &to_json(&tc)?)
}

fn to_json(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| ModelError::invalid(e.to_string()))
}

/// Write an open_clip-layout directory: `what.config` as `open_clip_config.json` (it carries
/// the image normalisation in `preprocess_cfg`), `open_clip_model.safetensors`,
/// `tokenizer.json` and `tokenizer_config.json`, each atomically. The result loads with
/// [`load_model_dir`].
pub fn save_open_clip_dir(dir: &Path, what: &SaveModelDir) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_atomic(
        &dir.join(crate::openclip::CONFIG_FILE),
        &to_json(&what.config)?,
    )?;
    save_safetensors_atomic(&dir.join("open_clip_model.safetensors"), what.tensors)?;
    write_tokenizer_files(dir, what)
}

/// Write `config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json` and `preprocessor_config.json` into `dir`
/// (created if needed), each atomically. The result loads with
/// [`load_model_dir`] (and with transformers).
pub fn save_model_dir(dir: &Path, what: &SaveModelDir) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_atomic(&dir.join("config.json"), &to_json(&what.config)?)?;
    save_safetensors_atomic(&dir.join("model.safetensors"), what.tensors)?;
    write_tokenizer_files(dir, what)?;
    write_atomic(
        &dir.join("preprocessor_config.json"),
        &to_json(&what.preprocess.to_hf_json(what.processor_type))?,
    )
}
