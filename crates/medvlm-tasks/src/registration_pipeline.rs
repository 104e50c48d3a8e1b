//! Deformable registration end to end (issue #18): image pairs read from a manifest (the
//! phantom benchmark's `moved/` copies and their known `deformation/` fields), the
//! [`crate::registration::RegNet`] trained on them without labels, the trained
//! network saved as a folder ([`Registrar`]) and applied to image files, and evaluated with
//! `medvlm_eval::registration` against the identity and the known field.
//!
//! # Data and direction
//!
//! A manifest record with the extra key `moved` is a pair: the **moving** image is `moved`,
//! the **fixed** image is `image`; we register moving -> fixed, i.e. predict the pull-back
//! field `w` with `moved(x + w(x)) ≈ image(x)`. Images are read as grey levels in `[0, 1]`
//! (PNG/JPEG/TIFF scaled by bit depth, DICOM/NIfTI auto-windowed; colour averaged over
//! channels); both must have one size, divisible by `2^levels`.
//!
//! The optional key `deformation` is the phantom's field `u` (`.npy`, float32 `[2, H, W]`,
//! `dx, dy` in pixels) with `moved(x) = image(x + u(x))` (bilinear, clamped; see
//! `medvlm_phantoms`). The true moving -> fixed field is therefore the **inverse** of `u`
//! (`w(x) + u(x + w(x)) = 0`), computed numerically (`medvlm_eval::registration::invert`,
//! 30 fixed-point iterations); end-point error compares the prediction with it.
//!
//! Masks: the record's `masks` belong to the fixed image (their union is used). The moving
//! image's mask is made the way `moved` was made, by warping the fixed mask with `u`
//! (bilinear, threshold 0.5). Dice *before* compares the moving mask with the fixed one,
//! Dice *after* the moving mask warped by the predicted field with the fixed one; the
//! *oracle* row warps it with the true inverse (the best this mask protocol allows, since
//! two interpolations blur the border).
//!
//! # Artefact
//!
//! A registrar folder holds `registration.safetensors` (the network) and `registrar.json`
//! ([`RegCard`]: settings, image size, training summary), each written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use medvlm_eval::registration::{
    folding_share, inverse_residual, invert, warp as warp_plain, warp_mask, RegistrationCase,
    RegistrationSummary,
};
use medvlm_io::Plane;

use crate::registration::{
    predict_fields, train, LossTerms, PairTensors, RegConfig, RegError, RegNet, TrainedRegNet,
};
use crate::segmentation_pipeline::read_plane;
use crate::text_condition::TextConditionError;
pub use crate::text_condition::TextConditioner;

/// Errors of the registration pipeline; each names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum RegPipelineError {
    /// The manifest could not be read.
    #[error("cannot read the registration manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        source: medvlm_io::IoError,
    },
    /// An image, mask or field that is missing or cannot be decoded.
    #[error("{path} cannot be read: {reason}")]
    Read { path: PathBuf, reason: String },
    /// Two images (or an image and a mask or field) of different sizes.
    #[error("{path} is {got:?} but {other} is {expected:?}")]
    Size {
        path: PathBuf,
        got: Vec<usize>,
        other: String,
        expected: Vec<usize>,
    },
    /// A file that cannot be written.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The network failed.
    #[error(transparent)]
    Net(#[from] RegError),
    /// A metric failed.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The text tower or a prompt failed.
    #[error(transparent)]
    Text(#[from] TextConditionError),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, RegPipelineError>;

fn read_err(path: &Path, reason: impl ToString) -> RegPipelineError {
    RegPipelineError::Read {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn file_err(path: &Path, reason: impl ToString) -> RegPipelineError {
    RegPipelineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A grey image in `[0, 1]`: `(pixels, (rows, cols))`, colour averaged over channels.
pub fn read_grey(path: &Path) -> Result<(Vec<f32>, (usize, usize))> {
    if !path.is_file() {
        return Err(read_err(path, "no such file"));
    }
    let plane = read_plane(path).map_err(|e| read_err(path, e))?;
    let c = plane.channels.max(1);
    let grey = plane
        .data
        .chunks(c)
        .map(|px| px.iter().sum::<f32>() / c as f32)
        .collect();
    Ok((grey, (plane.rows, plane.cols)))
}

/// A displacement field file (`.npy`, `[2, H, W]`, `dx, dy` in pixels) checked against the
/// image size `shape`.
pub fn read_field(path: &Path, shape: (usize, usize)) -> Result<Vec<f32>> {
    let arr = medvlm_io::npy::read_npy(path).map_err(|e| read_err(path, e))?;
    let expected = vec![2, shape.0, shape.1];
    if arr.shape != expected {
        return Err(RegPipelineError::Size {
            path: path.to_path_buf(),
            got: arr.shape,
            other: "the field of its image (shape [2, H, W])".into(),
            expected,
        });
    }
    if arr.data.iter().any(|v| !v.is_finite()) {
        return Err(read_err(path, "the field has non-finite values"));
    }
    Ok(arr.data.iter().map(|&v| v as f32).collect())
}

fn read_mask(path: &Path, shape: (usize, usize), image: &Path) -> Result<Vec<u8>> {
    if !path.is_file() {
        return Err(read_err(path, "no such file"));
    }
    let img = medvlm_io::load_any(path).map_err(|e| read_err(path, e))?;
    let plane = img
        .plane(&medvlm_io::PlaneSelect::default())
        .map_err(|e| read_err(path, e))?;
    if (plane.rows, plane.cols) != shape {
        return Err(RegPipelineError::Size {
            path: path.to_path_buf(),
            got: vec![plane.rows, plane.cols],
            other: format!("its image {}", image.display()),
            expected: vec![shape.0, shape.1],
        });
    }
    Ok(plane
        .data
        .chunks(plane.channels.max(1))
        .map(|px| u8::from(px[0] > 0.0))
        .collect())
}

/// One (moving, fixed) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct RegPair {
    /// The fixed image's file stem.
    pub id: String,
    /// Modality (the manifest's `modality` key, or the id before `_<number>`).
    pub modality: String,
    /// Moving image file.
    pub moving_path: PathBuf,
    /// Fixed image file.
    pub fixed_path: PathBuf,
    /// Moving grey levels.
    pub moving: Vec<f32>,
    /// Fixed grey levels.
    pub fixed: Vec<f32>,
    /// `(rows, cols)`.
    pub shape: (usize, usize),
    /// The known field `u` with `moving(x) = fixed(x + u(x))`, when given.
    pub known_field: Option<Vec<f32>>,
    /// Union of the fixed image's masks, when it has any.
    pub fixed_mask: Option<Vec<u8>>,
    /// The text a text-conditioned registrar reads for this pair ([`pair_prompt`]).
    pub prompt: String,
}

/// The prompt of a pair for text conditioning: the modality in words, with the findings when
/// there are any (`"brain mri with tumour"`, `"chest xray"`); `normal` adds nothing.
pub fn pair_prompt(modality: &str, findings: &[String]) -> String {
    let mut p = modality.replace('_', " ");
    let found: Vec<&str> = findings
        .iter()
        .map(String::as_str)
        .filter(|f| !f.is_empty() && *f != "normal")
        .collect();
    if !found.is_empty() {
        p.push_str(" with ");
        p.push_str(&found.join(", ").replace('_', " "));
    }
    p
}

impl RegPair {
    /// Reads one pair from files (sizes must agree; an unreadable file is an error naming it).
    pub fn from_files(
        moving: &Path,
        fixed: &Path,
        known_field: Option<&Path>,
        masks: &[PathBuf],
    ) -> Result<Self> {
        let (m, ms) = read_grey(moving)?;
        let (f, fs) = read_grey(fixed)?;
        if ms != fs {
            return Err(RegPipelineError::Size {
                path: moving.to_path_buf(),
                got: vec![ms.0, ms.1],
                other: format!("the fixed image {}", fixed.display()),
                expected: vec![fs.0, fs.1],
            });
        }
        let known_field = known_field.map(|p| read_field(p, fs)).transpose()?;
        let mut fixed_mask: Option<Vec<u8>> = None;
        for p in masks {
            let mk = read_mask(p, fs, fixed)?;
            match &mut fixed_mask {
                Some(acc) => acc.iter_mut().zip(&mk).for_each(|(a, b)| *a |= b),
                None => fixed_mask = Some(mk),
            }
        }
        let id = fixed
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let modality = id
            .rsplit_once('_')
            .map(|(a, _)| a.to_string())
            .unwrap_or_else(|| id.clone());
        Ok(Self {
            prompt: pair_prompt(&modality, &[]),
            id,
            modality,
            moving_path: moving.to_path_buf(),
            fixed_path: fixed.to_path_buf(),
            moving: m,
            fixed: f,
            shape: fs,
            known_field,
            fixed_mask,
        })
    }

    /// The moving image's mask: the fixed mask warped by the known field (as `moved` was
    /// made); `None` without a mask or a known field.
    pub fn moving_mask(&self) -> Result<Option<Vec<u8>>> {
        match (&self.fixed_mask, &self.known_field) {
            (Some(m), Some(u)) => Ok(Some(warp_mask(m, u, self.shape)?)),
            _ => Ok(None),
        }
    }
}

/// Reads the pairs of `manifest` (records with a `moved` key; with `split`, only that
/// split's; with `limit`, the first `limit`). No pair, a missing file or mismatched sizes
/// are errors.
pub fn load_pairs(
    manifest: &Path,
    split: Option<&str>,
    limit: Option<usize>,
) -> Result<Vec<RegPair>> {
    let m = medvlm_io::read_manifest(manifest).map_err(|source| RegPipelineError::Manifest {
        path: manifest.to_path_buf(),
        source,
    })?;
    let mut pairs = Vec::new();
    for rec in &m.records {
        if limit.is_some_and(|l| pairs.len() >= l) {
            break;
        }
        if split.is_some_and(|s| rec.split.as_deref() != Some(s)) {
            continue;
        }
        let Some(moved) = rec.extra.get("moved").and_then(|v| v.as_str()) else {
            continue;
        };
        let field = rec
            .extra
            .get("deformation")
            .and_then(|v| v.as_str())
            .map(|p| m.resolve(p));
        let masks: Vec<PathBuf> = rec.masks.iter().map(|r| m.resolve(&r.path)).collect();
        let mut pair = RegPair::from_files(
            &m.resolve(moved),
            &m.image_path(rec),
            field.as_deref(),
            &masks,
        )?;
        if let Some(modality) = rec.extra.get("modality").and_then(|v| v.as_str()) {
            pair.modality = modality.to_string();
        }
        let findings: Vec<String> = if rec.labels.is_empty() {
            rec.label.iter().cloned().collect()
        } else {
            rec.labels.clone()
        };
        pair.prompt = pair_prompt(&pair.modality, &findings);
        pairs.push(pair);
    }
    if pairs.is_empty() {
        return Err(RegPipelineError::Invalid(format!(
            "{}: no record with a `moved` image{}",
            manifest.display(),
            split
                .map(|s| format!(" in split `{s}`"))
                .unwrap_or_default()
        )));
    }
    let shape = pairs[0].shape;
    if let Some(p) = pairs.iter().find(|p| p.shape != shape) {
        return Err(RegPipelineError::Size {
            path: p.fixed_path.clone(),
            got: vec![p.shape.0, p.shape.1],
            other: format!("the first pair's image {}", pairs[0].fixed_path.display()),
            expected: vec![shape.0, shape.1],
        });
    }
    Ok(pairs)
}

/// Stacks pairs into `[N, 1, H, W]` tensors (with masks when `with_masks`, and the prompts'
/// text embeddings when `text` is given).
pub fn pair_tensors(
    pairs: &[RegPair],
    with_masks: bool,
    text: Option<&TextConditioner>,
    device: &Device,
) -> Result<PairTensors> {
    let (h, w) = pairs
        .first()
        .map(|p| p.shape)
        .ok_or_else(|| RegPipelineError::Invalid("no pairs".into()))?;
    let n = pairs.len();
    let stack = |f: &dyn Fn(&RegPair) -> Vec<f32>| -> Result<Tensor> {
        let data: Vec<f32> = pairs.iter().flat_map(f).collect();
        Ok(Tensor::from_vec(data, (n, 1, h, w), device)?)
    };
    let masks = if with_masks {
        let mut mm = Vec::with_capacity(n * h * w);
        let mut fm = Vec::with_capacity(n * h * w);
        for p in pairs {
            let zero = vec![0u8; h * w];
            let moving = p.moving_mask()?.unwrap_or_else(|| zero.clone());
            let fixed = if p.known_field.is_some() {
                p.fixed_mask.clone().unwrap_or(zero)
            } else {
                zero
            };
            mm.extend(moving.iter().map(|&v| f32::from(v)));
            fm.extend(fixed.iter().map(|&v| f32::from(v)));
        }
        Some((
            Tensor::from_vec(mm, (n, 1, h, w), device)?,
            Tensor::from_vec(fm, (n, 1, h, w), device)?,
        ))
    } else {
        None
    };
    let text = text
        .map(|t| {
            let prompts: Vec<String> = pairs.iter().map(|p| p.prompt.clone()).collect();
            t.embed(&prompts, device)
        })
        .transpose()?;
    Ok(PairTensors {
        moving: stack(&|p| p.moving.clone())?,
        fixed: stack(&|p| p.fixed.clone())?,
        masks,
        text,
    })
}

/// The registrar's card (`registrar.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegCard {
    /// Network and training settings.
    pub config: RegConfig,
    /// Image size `(rows, cols)` it was trained at (other sizes divisible by `2^levels` work).
    pub image_size: (usize, usize),
    /// Training manifest.
    pub manifest: String,
    /// Training pairs.
    pub n_train_pairs: usize,
    /// Mean loss terms of the last 50 steps.
    pub final_terms: Option<LossTerms>,
    /// Wall-clock training time (s).
    pub train_seconds: f64,
    /// The model whose text tower conditions the network (`config.text_dim > 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_model: Option<String>,
    /// Its fingerprint when trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_model_fingerprint: Option<String>,
}

/// A trained registration network and its card.
pub struct Registrar {
    /// The network.
    pub net: RegNet,
    varmap: VarMap,
    /// The card.
    pub card: RegCard,
    /// The text tower of a text-conditioned registrar.
    pub text: Option<TextConditioner>,
    /// Set by [`Registrar::load`] when the text model's files differ from training.
    pub warning: Option<String>,
}

const WEIGHTS_FILE: &str = "registration.safetensors";
const CARD_FILE: &str = "registrar.json";

impl Registrar {
    /// Trains on the pairs of `manifest` (see [`load_pairs`]), conditioned on each pair's
    /// prompt through the text tower of `text_model` when given; `progress` as in
    /// [`crate::registration::train`].
    pub fn train(
        manifest: &Path,
        split: Option<&str>,
        limit: Option<usize>,
        cfg: &RegConfig,
        text_model: Option<&str>,
        device: &Device,
        progress: impl FnMut(usize, &LossTerms),
    ) -> Result<Self> {
        let pairs = load_pairs(manifest, split, limit)?;
        Self::train_on(
            &pairs,
            &manifest.display().to_string(),
            cfg,
            text_model,
            device,
            progress,
        )
    }

    /// Trains on loaded pairs (text-conditioned when `text_model` is given: `cfg.text_dim`
    /// is then set to its embedding width).
    pub fn train_on(
        pairs: &[RegPair],
        source: &str,
        cfg: &RegConfig,
        text_model: Option<&str>,
        device: &Device,
        progress: impl FnMut(usize, &LossTerms),
    ) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let text = text_model
            .map(|spec| TextConditioner::load(spec, device))
            .transpose()?;
        let mut cfg = cfg.clone();
        cfg.text_dim = match &text {
            Some(t) => t.model.model.embed_dim(),
            None => 0,
        };
        let cfg = &cfg;
        let tensors = pair_tensors(pairs, cfg.mask_dice_weight > 0.0, text.as_ref(), device)?;
        let TrainedRegNet {
            net,
            varmap,
            history,
        } = train(cfg, &tensors, device, progress)?;
        let k = history.len().min(50);
        let final_terms = (k > 0).then(|| {
            let recent = &history[history.len() - k..];
            LossTerms {
                total: recent.iter().map(|t| t.total).sum::<f32>() / k as f32,
                similarity: recent.iter().map(|t| t.similarity).sum::<f32>() / k as f32,
                smoothness: recent.iter().map(|t| t.smoothness).sum::<f32>() / k as f32,
            }
        });
        Ok(Self {
            net,
            varmap,
            card: RegCard {
                config: cfg.clone(),
                image_size: pairs[0].shape,
                manifest: source.to_string(),
                n_train_pairs: pairs.len(),
                final_terms,
                train_seconds: t0.elapsed().as_secs_f64(),
                text_model: text.as_ref().map(|t| t.spec.clone()),
                text_model_fingerprint: text.as_ref().map(TextConditioner::fingerprint),
            },
            text,
            warning: None,
        })
    }

    /// Writes `dir/registration.safetensors` then `dir/registrar.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors: std::collections::HashMap<String, Tensor> =
            medvlm_train::optim::varmap_params(&self.varmap)
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect();
        medvlm_io::atomic::write_atomic_via(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| file_err(&weights, e))?;
        let card = dir.join(CARD_FILE);
        let json = serde_json::to_vec_pretty(&self.card).map_err(|e| file_err(&card, e))?;
        medvlm_io::atomic::write_atomic(&card, &json).map_err(|e| file_err(&card, e))
    }

    /// Loads a registrar folder written by [`Registrar::save`] (and, for a text-conditioned
    /// one, its text model; a warning goes to the log when that model's files changed).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let card_path = dir.join(CARD_FILE);
        let bytes = std::fs::read(&card_path).map_err(|e| read_err(&card_path, e))?;
        let card: RegCard = serde_json::from_slice(&bytes).map_err(|e| read_err(&card_path, e))?;
        card.config
            .validate(card.image_size)
            .map_err(|e| read_err(&card_path, e))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors =
            candle_core::safetensors::load(&weights, device).map_err(|e| read_err(&weights, e))?;
        let varmap = VarMap::new();
        let net = RegNet::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            &card.config,
        )?;
        for (name, var) in medvlm_train::optim::varmap_params(&varmap) {
            let t = tensors
                .get(&name)
                .ok_or_else(|| read_err(&weights, format!("no tensor `{name}`")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(read_err(
                    &weights,
                    format!(
                        "tensor `{name}` is {:?}, the settings need {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        let mut warning = None;
        let text = match (&card.text_model, card.config.text_dim) {
            (Some(spec), d) if d > 0 => {
                let t = TextConditioner::load(spec, device)?;
                if t.model.model.embed_dim() != d {
                    return Err(read_err(
                        &card_path,
                        format!(
                            "the text model {spec} embeds {} wide; the network reads {d}",
                            t.model.model.embed_dim()
                        ),
                    ));
                }
                if card.text_model_fingerprint.as_deref() != Some(t.fingerprint().as_str()) {
                    warning = Some(format!(
                        "the text model {spec} is not the one the registrar was trained with (fingerprint differs)"
                    ));
                }
                Some(t)
            }
            (None, 0) => None,
            _ => {
                return Err(read_err(
                    &card_path,
                    "text_dim and text_model disagree (one is set without the other)",
                ))
            }
        };
        Ok(Self {
            net,
            varmap,
            card,
            text,
            warning,
        })
    }

    /// Predicted pull-back fields (moving -> fixed), one planar `[2, H, W]` vector per pair.
    pub fn register(&self, pairs: &[RegPair]) -> Result<Vec<Vec<f32>>> {
        let device = self.net_device()?;
        let t = pair_tensors(pairs, false, self.text.as_ref(), &device)?;
        let u = predict_fields(&self.net, &t.moving, &t.fixed, t.text.as_ref())?;
        let mut out = Vec::with_capacity(pairs.len());
        for i in 0..pairs.len() {
            out.push(u.get(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    fn net_device(&self) -> Result<Device> {
        let vars = medvlm_train::optim::varmap_params(&self.varmap);
        Ok(vars
            .first()
            .map(|(_, v)| v.as_tensor().device().clone())
            .unwrap_or(Device::Cpu))
    }

    /// Evaluates on `pairs` (which need known fields): the network, the identity and the
    /// oracle (the true inverse field), overall and per modality.
    pub fn evaluate(&self, pairs: &[RegPair]) -> Result<RegEvaluation> {
        let fields = self.register(pairs)?;
        evaluate_fields(pairs, &fields)
    }
}

/// Metrics of one method on a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodRow {
    /// All pairs.
    pub all: RegistrationSummary,
    /// Per modality.
    pub per_modality: BTreeMap<String, RegistrationSummary>,
}

/// An evaluation: the network, the identity (no registration) and the oracle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegEvaluation {
    /// The predicted fields.
    pub network: MethodRow,
    /// The zero field.
    pub identity: MethodRow,
    /// The true inverse of the known field (its EPE is 0 by definition).
    pub oracle: MethodRow,
    /// Mean residual `|T_u ∘ T_w - id|` of the numerical inverse (pixels).
    pub inverse_residual: f64,
    /// Mean similarity (MSE of grey levels) after warping with the predicted fields.
    pub mse_after: f64,
    /// Mean MSE before warping.
    pub mse_before: f64,
}

fn row(pairs: &[RegPair], cases: &[RegistrationCase]) -> Result<MethodRow> {
    let mut groups: BTreeMap<String, Vec<RegistrationCase>> = BTreeMap::new();
    for (p, c) in pairs.iter().zip(cases) {
        groups
            .entry(p.modality.clone())
            .or_default()
            .push(c.clone());
    }
    let per_modality = groups
        .into_iter()
        .map(|(k, v)| Ok((k, RegistrationSummary::new(&v)?)))
        .collect::<Result<_>>()?;
    Ok(MethodRow {
        all: RegistrationSummary::new(cases)?,
        per_modality,
    })
}

/// Evaluates predicted pull-back fields (moving -> fixed) against the pairs' known fields.
pub fn evaluate_fields(pairs: &[RegPair], fields: &[Vec<f32>]) -> Result<RegEvaluation> {
    if pairs.len() != fields.len() || pairs.is_empty() {
        return Err(RegPipelineError::Invalid(format!(
            "{} pairs and {} fields",
            pairs.len(),
            fields.len()
        )));
    }
    let (mut net, mut id, mut oracle) = (Vec::new(), Vec::new(), Vec::new());
    let (mut resid, mut mse_b, mut mse_a) = (0.0, 0.0, 0.0);
    for (p, pred) in pairs.iter().zip(fields) {
        let u = p.known_field.as_ref().ok_or_else(|| {
            RegPipelineError::Invalid(format!(
                "pair {} has no known field (`deformation`): cannot evaluate",
                p.id
            ))
        })?;
        let truth = invert(u, p.shape, 30)?;
        resid += inverse_residual(u, &truth, p.shape)?;
        let mm = p.moving_mask()?;
        let masks = mm.as_deref().zip(p.fixed_mask.as_deref());
        let zero = vec![0f32; truth.len()];
        net.push(RegistrationCase::new(pred, &truth, p.shape, masks)?);
        id.push(RegistrationCase::new(&zero, &truth, p.shape, masks)?);
        oracle.push(RegistrationCase::new(&truth, &truth, p.shape, masks)?);
        let warped = warp_plain(&p.moving, pred, p.shape)?;
        let n = p.fixed.len() as f64;
        mse_a += warped
            .iter()
            .zip(&p.fixed)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / n;
        mse_b += p
            .moving
            .iter()
            .zip(&p.fixed)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / n;
    }
    let k = pairs.len() as f64;
    Ok(RegEvaluation {
        network: row(pairs, &net)?,
        identity: row(pairs, &id)?,
        oracle: row(pairs, &oracle)?,
        inverse_residual: resid / k,
        mse_after: mse_a / k,
        mse_before: mse_b / k,
    })
}

impl RegEvaluation {
    /// A plain-text table: one line per method and modality.
    pub fn render_table(&self) -> String {
        let fmt = |v: Option<f64>| v.map(|d| format!("{d:.3}")).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "{:<10} {:<12} {:>5} {:>8} {:>10} {:>10} {:>11} {:>11}\n",
            "method", "modality", "pairs", "EPE px", "fold %", "fold max %", "Dice", "(masks)"
        );
        for (name, r) in [
            ("identity", &self.identity),
            ("network", &self.network),
            ("oracle", &self.oracle),
        ] {
            let mut line = |m: &str, x: &RegistrationSummary| {
                s.push_str(&format!(
                    "{:<10} {:<12} {:>5} {:>8.3} {:>10.3} {:>10.3} {:>11} {:>11}\n",
                    name,
                    m,
                    x.pairs,
                    x.epe,
                    100.0 * x.folding,
                    100.0 * x.folding_max,
                    fmt(x.dice_after),
                    x.pairs_with_masks
                ));
            };
            line("all", &r.all);
            for (m, x) in &r.per_modality {
                line(m, x);
            }
        }
        s.push_str(&format!(
            "grey-level MSE before {:.5}, after {:.5}; inverse residual of the known fields {:.4} px\n",
            self.mse_before, self.mse_after, self.inverse_residual
        ));
        s
    }
}

/// Evaluates a saved registrar on a manifest's pairs.
pub fn evaluate_manifest(
    dir: &Path,
    manifest: &Path,
    split: Option<&str>,
    limit: Option<usize>,
    device: &Device,
) -> Result<(RegEvaluation, Vec<RegPair>, Vec<Vec<f32>>)> {
    let reg = Registrar::load(dir, device)?;
    if let Some(w) = &reg.warning {
        eprintln!("warning: {w}");
    }
    let pairs = load_pairs(manifest, split, limit)?;
    let fields = reg.register(&pairs)?;
    Ok((evaluate_fields(&pairs, &fields)?, pairs, fields))
}

/// What [`apply_files`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The warped moving image (PNG).
    pub warped: PathBuf,
    /// The field (`.npy`, `[2, H, W]`, pull-back moving -> fixed).
    pub field: PathBuf,
    /// The warped mask, when a moving mask was given.
    pub warped_mask: Option<PathBuf>,
    /// Share of folded pixels.
    pub folding: f64,
    /// Grey-level MSE before and after.
    pub mse: (f64, f64),
}

/// One pair registered in memory by [`Registrar::apply_pair`].
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The pull-back field moving -> fixed, planar `[2, H, W]` (`dx, dy` in pixels).
    pub field: Vec<f32>,
    /// The moving image warped by the field (grey levels in `[0, 1]`).
    pub warped: Vec<f32>,
    /// Share of pixels whose Jacobian determinant is not positive (folding).
    pub folding: f64,
    /// Grey-level MSE against the fixed image, before and after.
    pub mse: (f64, f64),
}

impl Registrar {
    /// Checks that a pair of size `shape` can be registered by this network (divisible by
    /// `2^levels`, at least 2 x 2); the error states the rule.
    pub fn check_size(&self, shape: (usize, usize)) -> Result<()> {
        self.card
            .config
            .validate(shape)
            .map_err(|e| RegPipelineError::Invalid(e.to_string()))
    }

    /// The prompt a pair gets from a user: required (non-empty) by a text-conditioned
    /// registrar, refused by an unconditioned one.
    pub fn check_prompt(&self, prompt: Option<&str>) -> Result<String> {
        match (&self.card.text_model, prompt.map(str::trim)) {
            (Some(_), Some(p)) if !p.is_empty() => Ok(p.to_string()),
            (Some(m), _) => Err(RegPipelineError::Invalid(format!(
                "this registrar is text-conditioned (trained with the text tower of {m}): give a \
                 prompt naming the modality and findings, e.g. \"brain mri with tumour\""
            ))),
            (None, Some(_)) => Err(RegPipelineError::Invalid(
                "this registrar is not text-conditioned: it takes no prompt".into(),
            )),
            (None, None) => Ok(String::new()),
        }
    }

    /// Registers one pair in memory: the field, the warped moving image, folding and MSE.
    pub fn apply_pair(&self, pair: &RegPair) -> Result<Registered> {
        self.check_size(pair.shape)?;
        let field = self
            .register(std::slice::from_ref(pair))?
            .pop()
            .ok_or_else(|| RegPipelineError::Invalid("no field".into()))?;
        let warped = warp_plain(&pair.moving, &field, pair.shape)?;
        let mse = |a: &[f32]| {
            a.iter()
                .zip(&pair.fixed)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
                / a.len() as f64
        };
        Ok(Registered {
            folding: folding_share(&field, pair.shape)?,
            mse: (mse(&pair.moving), mse(&warped)),
            field,
            warped,
        })
    }
}

/// Registers `moving` onto `fixed` with a saved registrar and writes `out/warped.png`,
/// `out/field.npy` and, with `moving_mask`, `out/warped_mask.png`. A text-conditioned
/// registrar needs `prompt` (see [`pair_prompt`]); an unconditioned one refuses it.
pub fn apply_files(
    dir: &Path,
    moving: &Path,
    fixed: &Path,
    moving_mask: Option<&Path>,
    prompt: Option<&str>,
    out: &Path,
    device: &Device,
) -> Result<Applied> {
    let reg = Registrar::load(dir, device)?;
    if let Some(w) = &reg.warning {
        eprintln!("warning: {w}");
    }
    let mut pair = RegPair::from_files(moving, fixed, None, &[])?;
    pair.prompt = reg.check_prompt(prompt)?;
    let done = reg.apply_pair(&pair)?;
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let (rows, cols) = pair.shape;
    let warped_path = out.join("warped.png");
    let plane =
        Plane::new(rows, cols, 1, done.warped.clone()).map_err(|e| file_err(&warped_path, e))?;
    medvlm_io::raster::write_png(&warped_path, &plane).map_err(|e| file_err(&warped_path, e))?;
    let field_path = out.join("field.npy");
    medvlm_io::npy::write_npy_f32(&field_path, &[2, rows, cols], &done.field)
        .map_err(|e| file_err(&field_path, e))?;
    let warped_mask = match moving_mask {
        Some(p) => {
            let m = read_mask(p, pair.shape, moving)?;
            let w = warp_mask(&m, &done.field, pair.shape)?;
            let path = out.join("warped_mask.png");
            let plane = Plane::new(rows, cols, 1, w.iter().map(|&v| f32::from(v)).collect())
                .map_err(|e| file_err(&path, e))?;
            medvlm_io::raster::write_png(&path, &plane).map_err(|e| file_err(&path, e))?;
            Some(path)
        }
        None => None,
    };
    Ok(Applied {
        warped: warped_path,
        field: field_path,
        warped_mask,
        folding: done.folding,
        mse: done.mse,
    })
}

/// Indices of up to `k` pairs for a figure: the first pair of each modality in turn, then
/// the following ones.
pub fn figure_pairs(pairs: &[RegPair], k: usize) -> Vec<usize> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out: Vec<usize> = (0..pairs.len())
        .filter(|&i| seen.insert(pairs[i].modality.clone()))
        .take(k)
        .collect();
    for i in 0..pairs.len() {
        if out.len() >= k {
            break;
        }
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// An image grid for the docs: one row per pair, columns moving, fixed, warped,
/// |fixed - moving|, |fixed - warped| (both ×4 for visibility), and the predicted field as
/// colour (red = dx, blue = dy, grey = 0, ±`max_px` saturates), separated by 2-px gaps;
/// each tile upscaled ×`zoom` (nearest).
pub fn comparison_grid(
    pairs: &[RegPair],
    fields: &[Vec<f32>],
    zoom: usize,
    max_px: f32,
) -> Result<Plane> {
    let first = pairs
        .first()
        .ok_or_else(|| RegPipelineError::Invalid("no pairs for the grid".into()))?;
    if fields.len() != pairs.len() || zoom == 0 {
        return Err(RegPipelineError::Invalid(
            "one field per pair and a zoom of at least 1 are needed".into(),
        ));
    }
    let (h, w) = first.shape;
    let gap = 2;
    let cols_n = 6;
    let (th, tw) = (h * zoom, w * zoom);
    let rows = pairs.len() * (th + gap) - gap;
    let cols = cols_n * (tw + gap) - gap;
    let mut data = vec![1f32; rows * cols * 3];
    for (r, (p, f)) in pairs.iter().zip(fields).enumerate() {
        if p.shape != (h, w) {
            return Err(RegPipelineError::Invalid(format!(
                "pair {} has another size than the first",
                p.id
            )));
        }
        let warped = warp_plain(&p.moving, f, p.shape)?;
        let n = h * w;
        let tiles: Vec<Box<dyn Fn(usize) -> [f32; 3]>> = vec![
            Box::new(|i| [p.moving[i]; 3]),
            Box::new(|i| [p.fixed[i]; 3]),
            Box::new(|i| [warped[i]; 3]),
            Box::new(|i| [((p.fixed[i] - p.moving[i]).abs() * 4.0).min(1.0); 3]),
            Box::new(|i| [((p.fixed[i] - warped[i]).abs() * 4.0).min(1.0); 3]),
            Box::new(move |i| {
                let dx = (f[i] / max_px).clamp(-1.0, 1.0);
                let dy = (f[n + i] / max_px).clamp(-1.0, 1.0);
                [0.5 + 0.5 * dx, 0.5, 0.5 + 0.5 * dy]
            }),
        ];
        for (c, tile) in tiles.iter().enumerate() {
            for y in 0..th {
                for x in 0..tw {
                    let rgb = tile((y / zoom) * w + x / zoom);
                    let oy = r * (th + gap) + y;
                    let ox = c * (tw + gap) + x;
                    let o = (oy * cols + ox) * 3;
                    data[o..o + 3].copy_from_slice(&rgb);
                }
            }
        }
    }
    Plane::new(rows, cols, 3, data).map_err(|e| RegPipelineError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth blob image and its copy moved by a smooth known field, written as a tiny
    /// phantom-style folder (images/, moved/, deformation/, masks/, manifest.jsonl).
    fn write_pairs(dir: &Path, n: usize, size: usize) -> PathBuf {
        for sub in ["images", "moved", "deformation", "masks"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut lines = Vec::new();
        for k in 0..n {
            let (cx, cy) = (
                size as f32 * (0.35 + 0.05 * (k % 4) as f32),
                size as f32 * (0.4 + 0.05 * (k % 3) as f32),
            );
            let img: Vec<f32> = (0..size * size)
                .map(|i| {
                    let (x, y) = ((i % size) as f32, (i / size) as f32);
                    let r2 = ((x - cx).powi(2) + (y - cy).powi(2)) / (size as f32 * 0.18).powi(2);
                    0.1 + 0.8 * (-r2).exp()
                })
                .collect();
            let mask: Vec<f32> = img.iter().map(|&v| f32::from(u8::from(v > 0.5))).collect();
            let nn = size * size;
            let mut u = vec![0f32; 2 * nn];
            let amp = 1.5 + 0.3 * (k % 3) as f32;
            for i in 0..nn {
                let (x, y) = ((i % size) as f32, (i / size) as f32);
                u[i] = amp * (y / size as f32 * 3.0 + k as f32).sin();
                u[nn + i] = amp * (x / size as f32 * 2.5 - k as f32).cos();
            }
            let moved = warp_plain(&img, &u, (size, size)).unwrap();
            let id = format!("blob_{k:06}");
            let png = |p: &Path, v: Vec<f32>| {
                medvlm_io::raster::write_png(p, &Plane::new(size, size, 1, v).unwrap()).unwrap()
            };
            png(&dir.join(format!("images/{id}.png")), img);
            png(&dir.join(format!("moved/{id}.png")), moved);
            png(&dir.join(format!("masks/{id}_0_blob.png")), mask);
            medvlm_io::npy::write_npy_f32(
                &dir.join(format!("deformation/{id}.npy")),
                &[2, size, size],
                &u,
            )
            .unwrap();
            lines.push(format!(
                r#"{{"image":"images/{id}.png","moved":"moved/{id}.png","deformation":"deformation/{id}.npy","masks":[{{"label":"blob","path":"masks/{id}_0_blob.png"}}]}}"#
            ));
        }
        let manifest = dir.join("manifest.jsonl");
        std::fs::write(&manifest, lines.join("\n")).unwrap();
        manifest
    }

    fn tiny_cfg() -> RegConfig {
        RegConfig {
            width: 8,
            levels: 2,
            integration_steps: 5,
            steps: 60,
            batch: 4,
            lr: 3e-3,
            smoothness: 0.01,
            ..RegConfig::default()
        }
    }

    #[test]
    fn tiny_training_beats_identity_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_pairs(dir.path(), 6, 32);
        let pairs = load_pairs(&manifest, None, None).unwrap();
        assert_eq!(pairs.len(), 6);
        let reg = Registrar::train_on(&pairs, "tiny", &tiny_cfg(), None, &Device::Cpu, |_, _| {})
            .unwrap();
        let e = reg.evaluate(&pairs).unwrap();
        assert!(
            e.mse_after < 0.7 * e.mse_before,
            "MSE after {} vs before {}",
            e.mse_after,
            e.mse_before
        );
        assert!(
            e.network.all.epe < e.identity.all.epe,
            "{}",
            e.render_table()
        );
        assert!(e.oracle.all.epe == 0.0 && e.inverse_residual < 0.05);
        // Save / load gives the same fields.
        let out = dir.path().join("reg");
        reg.save(&out).unwrap();
        let back = Registrar::load(&out, &Device::Cpu).unwrap();
        let a = reg.register(&pairs[..2]).unwrap();
        let b = back.register(&pairs[..2]).unwrap();
        assert_eq!(a, b);
        assert_eq!(back.card, reg.card);
        // apply writes the warped image and the field.
        let applied = apply_files(
            &out,
            &pairs[0].moving_path,
            &pairs[0].fixed_path,
            None,
            None,
            &dir.path().join("applied"),
            &Device::Cpu,
        )
        .unwrap();
        assert!(applied.warped.is_file() && applied.field.is_file());
        assert!(applied.mse.1 < applied.mse.0);
        let grid = comparison_grid(&pairs[..2], &a, 2, 3.0).unwrap();
        assert_eq!((grid.rows, grid.cols), (2 * 64 + 2, 6 * 64 + 10));
        // An unconditioned registrar refuses a prompt.
        let e = back
            .check_prompt(Some("brain mri"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not text-conditioned"), "{e}");
    }

    fn clip_fixture() -> String {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../medvlm-models/tests/fixtures/clip")
            .display()
            .to_string()
    }

    #[test]
    fn a_text_conditioned_registrar_reads_its_prompts_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_pairs(dir.path(), 4, 16);
        let mut pairs = load_pairs(&manifest, None, None).unwrap();
        // The phantom-style prompt: modality words and findings.
        assert_eq!(
            pair_prompt("brain_mri", &["tumour".into()]),
            "brain mri with tumour"
        );
        assert_eq!(pair_prompt("chest_xray", &["normal".into()]), "chest xray");
        pairs[1].prompt = "dermoscopy with melanoma".into();
        let cfg = RegConfig {
            steps: 5,
            ..tiny_cfg()
        };
        let fixture = clip_fixture();
        let reg = Registrar::train_on(
            &pairs,
            "tiny",
            &cfg,
            Some(&fixture),
            &Device::Cpu,
            |_, _| {},
        )
        .unwrap();
        let dim = reg.text.as_ref().unwrap().model.model.embed_dim();
        assert_eq!(reg.card.config.text_dim, dim);
        assert_eq!(reg.card.text_model.as_deref(), Some(fixture.as_str()));
        let out = dir.path().join("reg-text");
        reg.save(&out).unwrap();
        let back = Registrar::load(&out, &Device::Cpu).unwrap();
        assert!(back.warning.is_none());
        assert_eq!(
            reg.register(&pairs).unwrap(),
            back.register(&pairs).unwrap()
        );
        // Each pair's own prompt reaches the network: two pairs with different prompts get
        // different text rows (that the network uses them is registration.rs's test).
        let tensors = crate::registration_pipeline::pair_tensors(
            &pairs[..2],
            false,
            back.text.as_ref(),
            &Device::Cpu,
        )
        .unwrap();
        let t = tensors.text.unwrap();
        assert_eq!(t.dims(), &[2, dim]);
        let rows = t.to_vec2::<f32>().unwrap();
        assert!(
            rows[0]
                .iter()
                .zip(&rows[1])
                .any(|(a, b)| (a - b).abs() > 1e-6),
            "two prompts gave one text embedding"
        );
        // Prompts are required by apply, and an empty one is refused.
        for p in [None, Some("  ")] {
            let e = apply_files(
                &out,
                &pairs[0].moving_path,
                &pairs[0].fixed_path,
                None,
                p,
                &dir.path().join("applied"),
                &Device::Cpu,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("text-conditioned"), "{e}");
        }
        let applied = apply_files(
            &out,
            &pairs[0].moving_path,
            &pairs[0].fixed_path,
            None,
            Some("blob"),
            &dir.path().join("applied"),
            &Device::Cpu,
        )
        .unwrap();
        assert!(applied.field.is_file());
        // A card whose text model disagrees with text_dim is refused.
        let card_path = out.join("registrar.json");
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
        card["text_model"] = serde_json::Value::Null;
        std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
        let e = Registrar::load(&out, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("text_dim and text_model disagree"), "{e}");
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_pairs(dir.path(), 1, 16);
        let id = "blob_000000";
        let img = dir.path().join(format!("images/{id}.png"));
        let moved = dir.path().join(format!("moved/{id}.png"));
        // Images of different sizes.
        let other = dir.path().join("other.png");
        medvlm_io::raster::write_png(&other, &Plane::new(8, 16, 1, vec![0.5; 128]).unwrap())
            .unwrap();
        let e = RegPair::from_files(&other, &img, None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("other.png") && e.contains("[8, 16]"), "{e}");
        // A field of the wrong shape.
        let bad_field = dir.path().join("bad.npy");
        medvlm_io::npy::write_npy_f32(&bad_field, &[2, 8, 16], &vec![0.0; 256]).unwrap();
        let e = RegPair::from_files(&moved, &img, Some(&bad_field), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.npy") && e.contains("[2, 16, 16]"), "{e}");
        // A missing file and a corrupt one.
        let e = RegPair::from_files(&dir.path().join("nope.png"), &img, None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.png") && e.contains("no such file"), "{e}");
        let corrupt = dir.path().join("corrupt.png");
        std::fs::write(&corrupt, b"not a png").unwrap();
        let e = RegPair::from_files(&corrupt, &img, None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupt.png"), "{e}");
        // A manifest without pairs, and a missing registrar.
        let plain = dir.path().join("plain.jsonl");
        std::fs::write(&plain, format!(r#"{{"image":"images/{id}.png"}}"#)).unwrap();
        let e = load_pairs(&plain, None, None).unwrap_err().to_string();
        assert!(e.contains("no record with a `moved` image"), "{e}");
        assert!(load_pairs(&manifest, Some("test"), None).is_err());
        let e = Registrar::load(&dir.path().join("none"), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("registrar.json"), "{e}");
    }
}
