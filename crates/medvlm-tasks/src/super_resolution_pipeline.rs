//! Super-resolution end to end, what `medvlm upscale train|eval|apply` runs: pairs made from
//! the images of a manifest, the [`SrNet`] trained on them, evaluated against bicubic
//! upsampling with PSNR and SSIM, saved as an artefact folder ([`Upscaler`]) and applied to
//! image files.
//!
//! # Protocol
//!
//! * **Images**: each manifest record's `image` (PNG/JPEG/TIFF scaled by their bit depth,
//!   DICOM/NIfTI/npy through medvlm-io's plane selection and automatic window) as one grey
//!   plane in `[0, 1]`, rounded to 8 bits. **A colour image is converted to grey** with the
//!   ITU-R BT.601 luma weights `0.299 R + 0.587 G + 0.114 B` (the model is single-channel);
//!   the evaluation counts how many were converted, and `apply` says so per file.
//! * **Degradation** (BasicSR's "BI" convention, as EDSR and SwinIR): the low-resolution
//!   input is the high-resolution image downsampled by bicubic interpolation with
//!   antialiasing (MATLAB `imresize`, [`crate::super_resolution::bicubic_resize`]) and
//!   rounded to 8 bits. The phantom folders' own `lowres/` copies (area downsampling, factor
//!   4) are *not* used: they are a different degradation.
//! * **Baseline**: bicubic upsampling of the same input (MATLAB `imresize`, `a = -0.5`).
//! * **Metrics**: PSNR and SSIM of the 8-bit rounded output against the 8-bit ground truth
//!   with `medvlm_eval::image_quality` (single channel, `scale` pixels cropped from each side,
//!   BasicSR's `crop_border`), averaged over images; overall and per modality (the manifest's
//!   `modality` field).
//!
//! * **Text conditioning** (optional, `TrainOptions::text_model`): each image is conditioned
//!   on its record's report (`text`), the section given by `text_section` (default
//!   `exam_impression`, the examination line and impression the quickstart text tower was
//!   trained on; [`TextSection`]), embedded by the model's text tower and L2-normalised
//!   ([`TextConditioner`]); the network reads it by FiLM ([`crate::super_resolution`]). The
//!   card records the text model, its fingerprint and the section; loading refuses a text
//!   model whose fingerprint differs. `eval` conditions each image on its own report,
//!   `apply` on the prompt given. A record without a report, a prompt longer than the text
//!   tower's context, a conditioned upscaler without text or an unconditioned one with a
//!   prompt are errors.
//!
//! The size must be divisible by the scale (2 or 4) and leave at least
//! [`MIN_LR_SIDE`] low-resolution pixels per side; otherwise the error names the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use medvlm_eval::image_quality::{psnr, ssim, ImageRef};
use medvlm_io::{Plane, PlaneSelect, SourceFormat, Window};
use medvlm_train::text_section::TextSection;

use crate::card::read_json_card;
use crate::super_resolution::{
    bicubic_resize, check_hr_size, quantise_u8, train_sr, upscale_conditioned, SrConfig, SrError,
    SrNet, SrPair, MIN_LR_SIDE,
};
use crate::text_condition::{TextConditionError, TextConditioner};

/// Errors of the super-resolution pipeline; each names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum SrPipelineError {
    /// The manifest could not be read.
    #[error("cannot read the manifest {path}: {source}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: medvlm_io::IoError,
    },
    /// An image that cannot be read or used.
    #[error("image {path}: {reason}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file that cannot be written or read back.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The network failed.
    #[error(transparent)]
    Model(#[from] SrError),
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
pub type Result<T> = std::result::Result<T, SrPipelineError>;

fn file_err(path: &Path, reason: impl ToString) -> SrPipelineError {
    SrPipelineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn image_err(path: &Path, reason: impl ToString) -> SrPipelineError {
    SrPipelineError::Image {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

/// One image of the task.
#[derive(Debug, Clone)]
pub struct SrItem {
    /// The image file.
    pub image: PathBuf,
    /// The manifest's `modality`, if any.
    pub modality: Option<String>,
    /// The record's report (`text`), if any.
    pub report: Option<String>,
}

impl SrItem {
    /// The text that conditions a text-conditioned upscaler on this image: the `section` of
    /// its report; no report (or an empty section) is an error naming the image.
    pub fn prompt(&self, section: TextSection) -> Result<String> {
        let report = self.report.as_deref().unwrap_or("").trim();
        let text = section.select(report).text;
        if text.trim().is_empty() {
            return Err(image_err(
                &self.image,
                "no report (`text`) to condition the text-conditioned upscaler on",
            ));
        }
        Ok(text)
    }
}

/// The images of a manifest (or split).
#[derive(Debug, Clone)]
pub struct SrTask {
    /// The manifest read.
    pub manifest: PathBuf,
    /// Its images.
    pub items: Vec<SrItem>,
}

impl SrTask {
    /// Reads `manifest` (JSONL or CSV, medvlm-io format); with `split`, only its records.
    pub fn from_manifest(manifest: &Path, split: Option<&str>) -> Result<Self> {
        let m = medvlm_io::read_manifest(manifest).map_err(|source| SrPipelineError::Manifest {
            path: manifest.to_path_buf(),
            source,
        })?;
        let items: Vec<SrItem> = m
            .records
            .iter()
            .filter(|r| split.is_none() || r.split.as_deref() == split)
            .map(|r| SrItem {
                image: m.image_path(r),
                modality: r
                    .extra
                    .get("modality")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                report: r.text.clone(),
            })
            .collect();
        if items.is_empty() {
            return Err(SrPipelineError::Invalid(format!(
                "{}: no records{}",
                manifest.display(),
                split
                    .map(|s| format!(" in split `{s}`"))
                    .unwrap_or_default()
            )));
        }
        Ok(Self {
            manifest: manifest.to_path_buf(),
            items,
        })
    }
}

/// A grey image in `[0, 1]`, row-major.
#[derive(Debug, Clone)]
pub struct GreyImage {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The values, rounded to 8 bits.
    pub data: Vec<f32>,
    /// Whether the file was colour and was converted with the BT.601 luma weights.
    pub from_colour: bool,
}

/// Reads an image file as one grey plane in `[0, 1]` rounded to 8 bits (see the module doc;
/// colour is converted to luma). A missing or corrupt file is an error naming it.
pub fn read_grey(path: &Path) -> Result<GreyImage> {
    if !path.is_file() {
        return Err(image_err(path, "no such file"));
    }
    let img = medvlm_io::load_any(path)
        .map_err(|e| image_err(path, medvlm_io::guard::error_chain(&e)))?;
    let bad = |e: medvlm_io::IoError| image_err(path, medvlm_io::guard::error_chain(&e));
    let sel = PlaneSelect::default();
    let plane: Plane = if img.format == SourceFormat::Raster {
        let mut p = img.plane(&sel).map_err(bad)?;
        let max = ((1u32 << img.bits_stored.unwrap_or(8).min(16)) - 1) as f32;
        p.data
            .iter_mut()
            .for_each(|v| *v = (*v / max).clamp(0.0, 1.0));
        p
    } else {
        medvlm_io::preprocess::windowed_plane(&img, &sel, &Window::Auto).map_err(bad)?
    };
    let (mut data, from_colour) = match plane.channels {
        1 => (plane.data, false),
        3 => (
            plane
                .data
                .chunks_exact(3)
                .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
                .collect(),
            true,
        ),
        c => {
            return Err(image_err(
                path,
                format!("{c} channels; grey or RGB images only"),
            ))
        }
    };
    quantise_u8(&mut data);
    Ok(GreyImage {
        rows: plane.rows,
        cols: plane.cols,
        data,
        from_colour,
    })
}

/// The pair of an image file at `scale` (the degradation of the module doc); a size the
/// scale does not divide, or too small, is an error naming the file.
pub fn load_pair(path: &Path, scale: usize) -> Result<(SrPair, bool)> {
    let g = read_grey(path)?;
    check_hr_size(g.rows, g.cols, scale).map_err(|e| image_err(path, e))?;
    let pair = SrPair::from_hr(g.data, g.rows, g.cols, scale).map_err(|e| image_err(path, e))?;
    Ok((pair, g.from_colour))
}

// ---------------------------------------------------------------------------------------
// The artefact
// ---------------------------------------------------------------------------------------

/// The JSON card of an upscaler artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpscalerCard {
    /// `medvlm-upscaler/1`.
    pub format: String,
    /// Network and training settings (the scale included).
    pub config: SrConfig,
    /// The degradation and conventions, in words.
    pub protocol: String,
    /// The training manifest.
    pub train_manifest: String,
    /// Its split used (`None`: every record).
    pub train_split: Option<String>,
    /// Training images.
    pub n_train_images: usize,
    /// Of which converted from colour.
    pub n_colour_converted: usize,
    /// Mean loss of the last 50 steps.
    pub final_loss: f32,
    /// Wall-clock training time in seconds.
    pub train_seconds: f64,
    /// The model whose text tower conditions the network (`config.text_dim > 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_model: Option<String>,
    /// Its fingerprint when trained (loading refuses another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_model_fingerprint: Option<String>,
    /// The part of each report that was embedded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_section: Option<TextSection>,
}

/// Format tag of the card.
pub const CARD_FORMAT: &str = "medvlm-upscaler/1";
const CARD_FILE: &str = "upscaler.json";
const WEIGHTS_FILE: &str = "weights.safetensors";
/// The protocol recorded in every card.
pub const PROTOCOL: &str = "grey (BT.601 luma for colour), 8-bit; LR = MATLAB-imresize bicubic downsampling with antialiasing, rounded to 8 bits; output = bicubic(LR) + residual network";

/// A trained upscaler in memory (what the artefact folder holds).
pub struct Upscaler {
    /// The card.
    pub card: UpscalerCard,
    /// The network.
    pub net: SrNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// The text tower of a text-conditioned upscaler.
    pub text: Option<TextConditioner>,
}

impl Upscaler {
    /// Writes `dir/weights.safetensors` then `dir/upscaler.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let tensors: HashMap<String, Tensor> = medvlm_train::optim::varmap_params(&self.varmap)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let weights = dir.join(WEIGHTS_FILE);
        medvlm_io::atomic::write_atomic_via(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| file_err(&weights, medvlm_io::guard::error_chain(&e)))?;
        let card_path = dir.join(CARD_FILE);
        let json = serde_json::to_vec_pretty(&self.card).map_err(|e| file_err(&card_path, e))?;
        medvlm_io::atomic::write_atomic(&card_path, &json)
            .map_err(|e| file_err(&card_path, medvlm_io::guard::error_chain(&e)))
    }

    /// Loads an upscaler folder written by [`Self::save`] (and, for a text-conditioned one,
    /// its text model, refused when its fingerprint differs from the card's).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let card_path = dir.join(CARD_FILE);
        let card: UpscalerCard = read_json_card(
            dir,
            CARD_FILE,
            CARD_FORMAT,
            "upscaler",
            |c: &UpscalerCard| c.format.as_str(),
            file_err,
        )?;
        card.config
            .validate()
            .map_err(|e| file_err(&card_path, e))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors =
            candle_core::safetensors::load(&weights, device).map_err(|e| file_err(&weights, e))?;
        let varmap = VarMap::new();
        let net = SrNet::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            &card.config,
        )?;
        for (name, var) in medvlm_train::optim::varmap_params(&varmap) {
            let t = tensors
                .get(&name)
                .ok_or_else(|| file_err(&weights, format!("no tensor `{name}`")))?;
            var.set(t)
                .map_err(|e| file_err(&weights, format!("tensor `{name}`: {e}")))?;
        }
        let text = match (&card.text_model, card.config.text_dim) {
            (Some(spec), d) if d > 0 => {
                let t = TextConditioner::load(spec, device)?;
                if t.embed_dim() != d {
                    return Err(file_err(
                        &card_path,
                        format!(
                            "the text model {spec} embeds {} wide; the network reads {d}",
                            t.embed_dim()
                        ),
                    ));
                }
                if card.text_model_fingerprint.as_deref() != Some(t.fingerprint().as_str()) {
                    // Another tower embeds the same report elsewhere: the FiLM maps would
                    // read meaningless conditions.
                    return Err(file_err(
                        &card_path,
                        format!(
                            "the text model {spec} is not the one the upscaler was trained with \
                             (its fingerprint differs: files changed or another model)"
                        ),
                    ));
                }
                Some(t)
            }
            (None, 0) => None,
            _ => {
                return Err(file_err(
                    &card_path,
                    "text_dim and text_model disagree (one is set without the other)",
                ))
            }
        };
        Ok(Self {
            card,
            net,
            varmap,
            text,
        })
    }

    /// The upscaling factor.
    pub fn scale(&self) -> usize {
        self.card.config.scale
    }

    /// Super-resolves a low-resolution grey image with an unconditioned upscaler: `scale`
    /// times larger, in `[0, 1]` (a text-conditioned one refuses: see
    /// [`Self::upscale_prompted`]).
    pub fn upscale(&self, lr: &GreyImage) -> Result<Vec<f32>> {
        self.upscale_prompted(lr, None)
    }

    /// [`Self::upscale`] conditioned on `prompt`, which a text-conditioned upscaler needs and
    /// an unconditioned one refuses ([`Self::check_prompt`]).
    pub fn upscale_prompted(&self, lr: &GreyImage, prompt: Option<&str>) -> Result<Vec<f32>> {
        let text = match self.check_prompt(prompt)? {
            Some(p) => self.text_embeddings(&[p])?.pop(),
            None => None,
        };
        Ok(upscale_conditioned(
            &self.net,
            &lr.data,
            lr.rows,
            lr.cols,
            text.as_deref(),
        )?)
    }

    /// The prompt a user gives: required (non-empty, within the text tower's context) by a
    /// text-conditioned upscaler, refused by an unconditioned one.
    pub fn check_prompt(&self, prompt: Option<&str>) -> Result<Option<String>> {
        match (&self.text, prompt.map(str::trim)) {
            (Some(t), Some(p)) if !p.is_empty() => {
                t.check_fits(p)?;
                Ok(Some(p.to_string()))
            }
            (Some(t), _) => Err(SrPipelineError::Invalid(format!(
                "this upscaler is text-conditioned (trained with the text tower of {}): give a \
                 prompt, the report's {} (e.g. \"Single PA view of the chest. Moderate pleural \
                 effusion.\")",
                t.spec,
                self.card
                    .text_section
                    .unwrap_or(TextSection::ExamImpression)
                    .name()
            ))),
            (None, Some(_)) => Err(SrPipelineError::Invalid(
                "this upscaler is not text-conditioned: it takes no prompt".into(),
            )),
            (None, None) => Ok(None),
        }
    }

    /// The L2-normalised text embedding of each prompt (a text-conditioned upscaler only).
    pub fn text_embeddings(&self, prompts: &[String]) -> Result<Vec<Vec<f32>>> {
        let t = self.text.as_ref().ok_or_else(|| {
            SrPipelineError::Invalid("this upscaler is not text-conditioned".into())
        })?;
        let device = self.net_device();
        Ok(t.embed(prompts, &device)?
            .to_device(&Device::Cpu)?
            .to_vec2()?)
    }

    fn net_device(&self) -> Device {
        medvlm_train::optim::varmap_params(&self.varmap)
            .first()
            .map(|(_, v)| v.as_tensor().device().clone())
            .unwrap_or(Device::Cpu)
    }
}

/// Options of [`train_upscaler`].
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Network and training settings (`config.text_dim` is set from the text model).
    pub config: SrConfig,
    /// Split of the manifest to train on (`None`: every record).
    pub split: Option<String>,
    /// Use at most this many images (the first ones), for quick runs.
    pub max_images: Option<usize>,
    /// Condition each image on its report through this model's text tower (`None`: an
    /// unconditioned upscaler).
    pub text_model: Option<String>,
    /// The part of each report embedded (default `exam_impression`); only with
    /// `text_model`.
    pub text_section: Option<TextSection>,
}

/// Trains an upscaler on the images of `manifest`; `progress(step, loss)` after each step.
pub fn train_upscaler(
    manifest: &Path,
    opts: &TrainOptions,
    device: &Device,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<Upscaler> {
    opts.config.validate()?;
    if opts.text_section.is_some() && opts.text_model.is_none() {
        return Err(SrPipelineError::Invalid(
            "a report section is only used with a text model".into(),
        ));
    }
    let task = SrTask::from_manifest(manifest, opts.split.as_deref())?;
    let n = opts
        .max_images
        .unwrap_or(task.items.len())
        .min(task.items.len());
    let text = opts
        .text_model
        .as_deref()
        .map(|spec| TextConditioner::load(spec, device))
        .transpose()?;
    let section = text
        .as_ref()
        .map(|_| opts.text_section.unwrap_or(TextSection::ExamImpression));
    let mut config = opts.config.clone();
    config.text_dim = text.as_ref().map_or(0, TextConditioner::embed_dim);
    let mut pairs = Vec::with_capacity(n);
    let mut prompts = Vec::new();
    let mut colour = 0;
    for item in &task.items[..n] {
        if let (Some(t), Some(sec)) = (&text, section) {
            let p = item.prompt(sec)?;
            t.check_fits(&p).map_err(|e| image_err(&item.image, e))?;
            prompts.push(p);
        }
        let (p, c) = load_pair(&item.image, config.scale)?;
        colour += usize::from(c);
        pairs.push(p);
    }
    if let Some(t) = &text {
        let rows = t.embed(&prompts, device)?.to_vec2::<f32>()?;
        for (p, row) in pairs.iter_mut().zip(rows) {
            p.text = Some(row);
        }
    }
    let t0 = std::time::Instant::now();
    let trained = train_sr(&config, &pairs, device, progress)?;
    let tail = &trained.losses[trained.losses.len().saturating_sub(50)..];
    let final_loss = if tail.is_empty() {
        f32::NAN
    } else {
        tail.iter().sum::<f32>() / tail.len() as f32
    };
    Ok(Upscaler {
        card: UpscalerCard {
            format: CARD_FORMAT.into(),
            config,
            protocol: PROTOCOL.into(),
            train_manifest: manifest.display().to_string(),
            train_split: opts.split.clone(),
            n_train_images: n,
            n_colour_converted: colour,
            final_loss,
            train_seconds: t0.elapsed().as_secs_f64(),
            text_model: text.as_ref().map(|t| t.spec.clone()),
            text_model_fingerprint: text.as_ref().map(TextConditioner::fingerprint),
            text_section: section,
        },
        net: trained.net,
        varmap: trained.varmap,
        text,
    })
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

/// Mean PSNR (dB) and SSIM of one method over a group of images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityScores {
    /// Mean PSNR.
    pub psnr: f64,
    /// Mean SSIM.
    pub ssim: f64,
}

/// The scores of a group of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupScores {
    /// `all` or the modality.
    pub group: String,
    /// Images.
    pub n: usize,
    /// Bicubic upsampling.
    pub bicubic: QualityScores,
    /// The network.
    pub model: QualityScores,
}

/// An evaluation of an upscaler on a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SrEvaluation {
    /// The manifest.
    pub manifest: String,
    /// The split (`None`: every record).
    pub split: Option<String>,
    /// Upscaling factor.
    pub scale: usize,
    /// Pixels cropped from each side before measuring.
    pub crop_border: usize,
    /// Images converted from colour.
    pub n_colour_converted: usize,
    /// Every image.
    pub overall: GroupScores,
    /// Per modality (sorted by name).
    pub per_modality: Vec<GroupScores>,
}

impl SrEvaluation {
    /// A plain-text table.
    pub fn report(&self) -> String {
        let mut s = format!(
            "x{} on {}{} ({} images, {} converted from colour; PSNR dB / SSIM, border {} px cropped)\n",
            self.scale,
            self.manifest,
            self.split
                .as_deref()
                .map(|s| format!(" [{s}]"))
                .unwrap_or_default(),
            self.overall.n,
            self.n_colour_converted,
            self.crop_border
        );
        s.push_str(&format!(
            "{:<16} {:>5} {:>14} {:>14} {:>8}\n",
            "group", "n", "bicubic", "model", "gain dB"
        ));
        for g in std::iter::once(&self.overall).chain(&self.per_modality) {
            s.push_str(&format!(
                "{:<16} {:>5} {:>7.2}/{:.4} {:>7.2}/{:.4} {:>+8.2}\n",
                g.group,
                g.n,
                g.bicubic.psnr,
                g.bicubic.ssim,
                g.model.psnr,
                g.model.ssim,
                g.model.psnr - g.bicubic.psnr
            ));
        }
        s
    }
}

fn to_255(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| (f64::from(x).clamp(0.0, 1.0) * 255.0).round())
        .collect()
}

/// PSNR and SSIM of `out` against `gt` (both `[0, 1]`, `rows x cols`) on the 8-bit scale.
pub fn quality(
    out: &[f32],
    gt: &[f32],
    rows: usize,
    cols: usize,
    crop: usize,
) -> Result<(f64, f64)> {
    let (a, b) = (to_255(out), to_255(gt));
    let ia = ImageRef {
        data: &a,
        height: rows,
        width: cols,
        channels: 1,
    };
    let ib = ImageRef {
        data: &b,
        height: rows,
        width: cols,
        channels: 1,
    };
    Ok((psnr(&ia, &ib, crop)?, ssim(&ia, &ib, crop)?))
}

/// One evaluated image, kept for the figure.
pub struct EvaluatedImage {
    /// The file.
    pub image: PathBuf,
    /// The modality.
    pub modality: Option<String>,
    /// The pair (ground truth, input, bicubic).
    pub pair: SrPair,
    /// The network's output in `[0, 1]`.
    pub output: Vec<f32>,
}

/// Evaluates `up` on every image of `task` (see the module doc; a text-conditioned upscaler
/// reads each image's own report); also returns the first image of each modality, for a
/// figure.
pub fn evaluate(up: &Upscaler, task: &SrTask) -> Result<(SrEvaluation, Vec<EvaluatedImage>)> {
    let s = up.scale();
    let texts: Vec<Option<Vec<f32>>> = match &up.text {
        Some(t) => {
            let sec = up.card.text_section.unwrap_or(TextSection::ExamImpression);
            let mut prompts = Vec::with_capacity(task.items.len());
            for item in &task.items {
                let p = item.prompt(sec)?;
                t.check_fits(&p).map_err(|e| image_err(&item.image, e))?;
                prompts.push(p);
            }
            up.text_embeddings(&prompts)?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => vec![None; task.items.len()],
    };
    let mut groups: BTreeMap<String, Vec<[f64; 4]>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut colour = 0;
    let mut examples: Vec<EvaluatedImage> = Vec::new();
    for (item, text) in task.items.iter().zip(&texts) {
        let (pair, c) = load_pair(&item.image, s)?;
        colour += usize::from(c);
        let out = upscale_conditioned(
            &up.net,
            &pair.lr,
            pair.rows / s,
            pair.cols / s,
            text.as_deref(),
        )?;
        let (bp, bs) = quality(&pair.bicubic, &pair.hr, pair.rows, pair.cols, s)?;
        let (mp, ms) = quality(&out, &pair.hr, pair.rows, pair.cols, s)?;
        let row = [bp, bs, mp, ms];
        all.push(row);
        let g = item.modality.clone().unwrap_or_else(|| "-".into());
        groups.entry(g).or_default().push(row);
        if !examples.iter().any(|e| e.modality == item.modality) {
            examples.push(EvaluatedImage {
                image: item.image.clone(),
                modality: item.modality.clone(),
                pair,
                output: out,
            });
        }
    }
    let summarise = |group: &str, rows: &[[f64; 4]]| -> GroupScores {
        let n = rows.len().max(1) as f64;
        let mean = |k: usize| rows.iter().map(|r| r[k]).sum::<f64>() / n;
        GroupScores {
            group: group.into(),
            n: rows.len(),
            bicubic: QualityScores {
                psnr: mean(0),
                ssim: mean(1),
            },
            model: QualityScores {
                psnr: mean(2),
                ssim: mean(3),
            },
        }
    };
    let per_modality = if groups.len() > 1 || !groups.contains_key("-") {
        groups.iter().map(|(g, r)| summarise(g, r)).collect()
    } else {
        Vec::new()
    };
    Ok((
        SrEvaluation {
            manifest: task.manifest.display().to_string(),
            split: None,
            scale: s,
            crop_border: s,
            n_colour_converted: colour,
            overall: summarise("all", &all),
            per_modality,
        },
        examples,
    ))
}

/// [`evaluate`] on a manifest (and split).
pub fn evaluate_manifest(
    up: &Upscaler,
    manifest: &Path,
    split: Option<&str>,
) -> Result<(SrEvaluation, Vec<EvaluatedImage>)> {
    let task = SrTask::from_manifest(manifest, split)?;
    let (mut ev, ex) = evaluate(up, &task)?;
    ev.split = split.map(str::to_string);
    Ok((ev, ex))
}

/// Writes a figure: one row per example with the input (nearest-neighbour enlarged), the
/// bicubic upsampling, the network's output, the ground truth and the absolute error of the
/// output magnified 4 times; each tile enlarged `zoom` times, 2-pixel white gaps.
pub fn write_grid(path: &Path, examples: &[EvaluatedImage], zoom: usize) -> Result<()> {
    if examples.is_empty() {
        return Err(SrPipelineError::Invalid(
            "no examples for the figure".into(),
        ));
    }
    let zoom = zoom.max(1);
    let (th, tw) = (examples[0].pair.rows * zoom, examples[0].pair.cols * zoom);
    if examples
        .iter()
        .any(|e| e.pair.rows * zoom != th || e.pair.cols * zoom != tw)
    {
        return Err(SrPipelineError::Invalid(
            "the figure's examples differ in size".into(),
        ));
    }
    let gap = 2;
    let cols_n = 5;
    let (h, w) = (
        examples.len() * th + (examples.len() + 1) * gap,
        cols_n * tw + (cols_n + 1) * gap,
    );
    let mut canvas = vec![1.0f32; h * w];
    for (r, e) in examples.iter().enumerate() {
        let p = &e.pair;
        let s = p.scale;
        let (rows, cols) = (p.rows, p.cols);
        let nearest: Vec<f32> = (0..rows * cols)
            .map(|i| p.lr[(i / cols / s) * (cols / s) + (i % cols) / s])
            .collect();
        let bic: Vec<f32> = p.bicubic.iter().map(|v| v.clamp(0.0, 1.0)).collect();
        let diff: Vec<f32> = e
            .output
            .iter()
            .zip(&p.hr)
            .map(|(a, b)| ((a - b).abs() * 4.0).min(1.0))
            .collect();
        for (c, tile) in [&nearest, &bic, &e.output, &p.hr, &diff].iter().enumerate() {
            let (y0, x0) = (gap + r * (th + gap), gap + c * (tw + gap));
            for y in 0..th {
                for x in 0..tw {
                    canvas[(y0 + y) * w + x0 + x] = tile[(y / zoom) * cols + x / zoom];
                }
            }
        }
    }
    let plane = Plane {
        rows: h,
        cols: w,
        channels: 1,
        data: canvas,
    };
    medvlm_io::raster::write_png(path, &plane)
        .map_err(|e| file_err(path, medvlm_io::guard::error_chain(&e)))
}

// ---------------------------------------------------------------------------------------
// Applying to files
// ---------------------------------------------------------------------------------------

/// One file upscaled by [`apply_files`].
#[derive(Debug, Clone, Serialize)]
pub struct AppliedFile {
    /// The input.
    pub input: PathBuf,
    /// The written PNG.
    pub output: PathBuf,
    /// Input size `(rows, cols)`.
    pub input_size: (usize, usize),
    /// Output size.
    pub output_size: (usize, usize),
    /// Whether the input was colour (converted to grey first).
    pub from_colour: bool,
}

/// Refuses a low-resolution image smaller than [`MIN_LR_SIDE`] px per side (the error names
/// `path`).
pub fn check_lr_size(g: &GreyImage, path: &Path) -> Result<()> {
    if g.rows < MIN_LR_SIDE || g.cols < MIN_LR_SIDE {
        return Err(image_err(
            path,
            format!(
                "{}x{} is too small to upscale (at least {MIN_LR_SIDE} px per side)",
                g.rows, g.cols
            ),
        ));
    }
    Ok(())
}

/// Upscales each file (taken as a low-resolution image, any size of at least
/// [`MIN_LR_SIDE`] px per side) and writes `<stem>_x<scale>.png` (8-bit grey) to `out`; a
/// text-conditioned upscaler reads `prompt` for every file (required; an unconditioned one
/// refuses it). The prompt and every file are checked before any is written; an unreadable
/// file is an error naming it.
pub fn apply_files(
    up: &Upscaler,
    files: &[PathBuf],
    prompt: Option<&str>,
    out: &Path,
) -> Result<Vec<AppliedFile>> {
    crate::segmentation_pipeline::check_distinct_stems(files)
        .map_err(|e| SrPipelineError::Invalid(e.to_string()))?;
    let s = up.scale();
    let text = match up.check_prompt(prompt)? {
        Some(p) => up.text_embeddings(&[p])?.pop(),
        None => None,
    };
    let mut inputs = Vec::with_capacity(files.len());
    for f in files {
        let g = read_grey(f)?;
        check_lr_size(&g, f)?;
        inputs.push(g);
    }
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let mut done = Vec::with_capacity(files.len());
    for (f, g) in files.iter().zip(inputs) {
        let hr = upscale_conditioned(&up.net, &g.data, g.rows, g.cols, text.as_deref())?;
        let dest = out.join(format!(
            "{}_x{s}.png",
            crate::segmentation_pipeline::stem_of(f)
        ));
        let plane = Plane {
            rows: g.rows * s,
            cols: g.cols * s,
            channels: 1,
            data: hr,
        };
        medvlm_io::raster::write_png(&dest, &plane)
            .map_err(|e| file_err(&dest, medvlm_io::guard::error_chain(&e)))?;
        done.push(AppliedFile {
            input: f.clone(),
            output: dest,
            input_size: (g.rows, g.cols),
            output_size: (g.rows * s, g.cols * s),
            from_colour: g.from_colour,
        });
    }
    Ok(done)
}

/// The bicubic upsampling of a low-resolution grey image by `scale`, clipped to `[0, 1]`
/// (the baseline, for comparison with [`Upscaler::upscale`]).
pub fn bicubic_upscale(lr: &GreyImage, scale: usize) -> Result<Vec<f32>> {
    let v = bicubic_resize(&lr.data, lr.rows, lr.cols, lr.rows * scale, lr.cols * scale)?;
    Ok(v.into_iter().map(|x| x.clamp(0.0, 1.0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_grey_png(path: &Path, rows: usize, cols: usize, seed: usize) {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (y, x) = ((i / cols) as f32, (i % cols) as f32);
                let disc = (y - rows as f32 / 2.0).powi(2) + (x - (seed % cols) as f32).powi(2)
                    < (rows as f32 / 4.0).powi(2);
                if disc {
                    0.8
                } else {
                    0.2 + 0.1 * ((x + y * seed as f32) * 0.3).sin()
                }
            })
            .collect();
        medvlm_io::raster::write_png(path, &Plane::new(rows, cols, 1, data).unwrap()).unwrap();
    }

    fn tiny_manifest(dir: &Path, n: usize, side: usize) -> PathBuf {
        let mut lines = String::new();
        for i in 0..n {
            write_grey_png(&dir.join(format!("im{i}.png")), side, side, 3 + 5 * i);
            lines.push_str(&format!(
                "{{\"image\":\"im{i}.png\",\"split\":\"{}\",\"modality\":\"m{}\"}}\n",
                if i < n - 2 { "train" } else { "test" },
                i % 2
            ));
        }
        let m = dir.join("manifest.jsonl");
        std::fs::write(&m, lines).unwrap();
        m
    }

    fn tiny_options() -> TrainOptions {
        TrainOptions {
            config: SrConfig {
                features: 8,
                blocks: 1,
                patch: 16,
                steps: 5,
                batch: 2,
                ..SrConfig::default()
            },
            split: Some("train".into()),
            ..TrainOptions::default()
        }
    }

    #[test]
    fn saved_upscaler_predicts_identically_and_apply_writes_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny_manifest(dir.path(), 5, 32);
        let up = train_upscaler(&m, &tiny_options(), &Device::Cpu, &mut |_, _| {}).unwrap();
        assert_eq!(up.card.n_train_images, 3);
        let art = dir.path().join("up");
        up.save(&art).unwrap();
        let back = Upscaler::load(&art, &Device::Cpu).unwrap();
        assert_eq!(back.card, up.card);
        let lr = read_grey(&dir.path().join("im4.png")).unwrap();
        let a = up.upscale(&lr).unwrap();
        let b = back.upscale(&lr).unwrap();
        assert_eq!(a.len(), 64 * 64);
        assert_eq!(a, b);
        // Five Adam steps moved the tail off zero: the output is not the bicubic image.
        let bic = bicubic_upscale(&lr, 2).unwrap();
        assert!(a.iter().zip(&bic).any(|(x, y)| (x - y).abs() > 1e-4));
        let out = dir.path().join("out");
        let e = apply_files(&back, &[dir.path().join("im4.png")], Some("Chest."), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not text-conditioned"), "{e}");
        assert!(!out.exists());
        // Two inputs that would both write `im4_x2.png`: refused before anything is written.
        std::fs::create_dir_all(dir.path().join("copy")).unwrap();
        std::fs::copy(dir.path().join("im4.png"), dir.path().join("copy/im4.png")).unwrap();
        let same = [dir.path().join("im4.png"), dir.path().join("copy/im4.png")];
        let e = apply_files(&back, &same, None, &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("same name"), "{e}");
        assert!(!out.exists());
        let done = apply_files(&back, &[dir.path().join("im4.png")], None, &out).unwrap();
        assert_eq!(done[0].output_size, (64, 64));
        let written = read_grey(&done[0].output).unwrap();
        assert_eq!((written.rows, written.cols), (64, 64));
        let (ev, ex) = evaluate_manifest(&back, &m, Some("test")).unwrap();
        assert_eq!(ev.overall.n, 2);
        assert_eq!(ev.per_modality.len(), 2);
        assert_eq!(ex.len(), 2);
        let grid = dir.path().join("grid.png");
        write_grid(&grid, &ex, 1).unwrap();
        let g = read_grey(&grid).unwrap();
        assert_eq!((g.rows, g.cols), (2 * 32 + 3 * 2, 5 * 32 + 6 * 2));
    }

    fn clip_fixture() -> String {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../medvlm-models/tests/fixtures/clip")
            .display()
            .to_string()
    }

    /// `tiny_manifest` with a short report per record (the fixture's context is 24 tokens).
    fn texted_manifest(dir: &Path, n: usize, side: usize) -> PathBuf {
        let m = tiny_manifest(dir, n, side);
        let reports = ["Chest. Effusion.", "Brain. Normal.", "Skin. Naevus."];
        let lines: String = std::fs::read_to_string(&m)
            .unwrap()
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["text"] = serde_json::json!(reports[i % 3]);
                format!("{v}\n")
            })
            .collect();
        std::fs::write(&m, lines).unwrap();
        m
    }

    #[test]
    fn a_text_conditioned_upscaler_reads_reports_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let m = texted_manifest(dir.path(), 5, 32);
        let fixture = clip_fixture();
        let opts = TrainOptions {
            text_model: Some(fixture.clone()),
            ..tiny_options()
        };
        let up = train_upscaler(&m, &opts, &Device::Cpu, &mut |_, _| {}).unwrap();
        let dim = up.text.as_ref().unwrap().embed_dim();
        assert_eq!(up.card.config.text_dim, dim);
        assert_eq!(up.card.text_model.as_deref(), Some(fixture.as_str()));
        assert_eq!(up.card.text_section, Some(TextSection::ExamImpression));
        assert_eq!(
            up.card.text_model_fingerprint,
            Some(up.text.as_ref().unwrap().fingerprint())
        );
        let art = dir.path().join("up-text");
        up.save(&art).unwrap();
        let back = Upscaler::load(&art, &Device::Cpu).unwrap();
        assert_eq!(back.card, up.card);
        let lr = read_grey(&dir.path().join("im4.png")).unwrap();
        let a = up.upscale_prompted(&lr, Some("Chest. Effusion.")).unwrap();
        assert_eq!(
            a,
            back.upscale_prompted(&lr, Some("Chest. Effusion."))
                .unwrap()
        );
        // The prompt reaches the network (trained FiLM maps are no longer zero).
        let b = back.upscale_prompted(&lr, Some("Brain. Normal.")).unwrap();
        assert!(
            a.iter().zip(&b).any(|(x, y)| x != y),
            "two prompts, one output"
        );
        // A prompt is required, non-empty and within the context; nothing is written
        // otherwise.
        let out = dir.path().join("out");
        let file = [dir.path().join("im4.png")];
        for p in [None, Some("  ")] {
            let e = apply_files(&back, &file, p, &out).unwrap_err().to_string();
            assert!(
                e.contains("text-conditioned") && e.contains("give a prompt"),
                "{e}"
            );
        }
        let long = "Chest radiograph with a large effusion. ".repeat(3);
        let e = apply_files(&back, &file, Some(&long), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("context of 24 tokens"), "{e}");
        assert!(!out.exists(), "nothing written for a bad prompt");
        let done = apply_files(&back, &file, Some("Skin. Naevus."), &out).unwrap();
        assert_eq!(done[0].output_size, (64, 64));
        // eval conditions each image on its own report.
        let (ev, _) = evaluate_manifest(&back, &m, Some("test")).unwrap();
        assert_eq!(ev.overall.n, 2);
        // A record without a report cannot be evaluated (or trained on): the error names it.
        let bare = dir.path().join("bare.jsonl");
        std::fs::write(&bare, "{\"image\":\"im1.png\"}\n").unwrap();
        let e = evaluate_manifest(&back, &bare, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("im1.png") && e.contains("no report"), "{e}");
        let e = train_upscaler(
            &bare,
            &TrainOptions {
                split: None,
                ..opts.clone()
            },
            &Device::Cpu,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("im1.png") && e.contains("no report"), "{e}");
        // A report longer than the context: the error names the image.
        let verbose = dir.path().join("verbose.jsonl");
        std::fs::write(
            &verbose,
            format!("{{\"image\":\"im2.png\",\"text\":\"{long}\"}}\n"),
        )
        .unwrap();
        let e = train_upscaler(
            &verbose,
            &TrainOptions {
                split: None,
                ..opts.clone()
            },
            &Device::Cpu,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("im2.png") && e.contains("context of 24 tokens"),
            "{e}"
        );
        // Another text model (here: the same files under another fingerprint) is refused.
        let card_path = art.join(CARD_FILE);
        let original = std::fs::read(&card_path).unwrap();
        let mut card: serde_json::Value = serde_json::from_slice(&original).unwrap();
        card["text_model_fingerprint"] = serde_json::json!("0000");
        std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
        let e = Upscaler::load(&art, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("upscaler.json") && e.contains("fingerprint differs"),
            "{e}"
        );
        // A card whose text model disagrees with text_dim is refused.
        let mut card: serde_json::Value = serde_json::from_slice(&original).unwrap();
        card["text_model"] = serde_json::Value::Null;
        std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
        let e = Upscaler::load(&art, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("text_dim and text_model disagree"), "{e}");
        // A report section without a text model is refused.
        let e = train_upscaler(
            &m,
            &TrainOptions {
                text_section: Some(TextSection::Report),
                ..tiny_options()
            },
            &Device::Cpu,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("only used with a text model"), "{e}");
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny_manifest(dir.path(), 3, 32);
        // Missing file.
        let missing = dir.path().join("nope.png");
        let e = read_grey(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.png") && e.contains("no such file"), "{e}");
        // Corrupt file.
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not a png at all").unwrap();
        let e = read_grey(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
        // A size the scale does not divide.
        let odd = dir.path().join("odd.png");
        write_grey_png(&odd, 33, 32, 1);
        let e = load_pair(&odd, 2).unwrap_err().to_string();
        assert!(
            e.contains("odd.png") && e.contains("does not divide"),
            "{e}"
        );
        // Too small for x4.
        let small = dir.path().join("small.png");
        write_grey_png(&small, 16, 16, 1);
        let e = load_pair(&small, 4).unwrap_err().to_string();
        assert!(e.contains("small.png") && e.contains("too small"), "{e}");
        let out = dir.path().join("out");
        let e = apply_files(
            &train_upscaler(&m, &tiny_options(), &Device::Cpu, &mut |_, _| {}).unwrap(),
            &[dir.path().join("im0.png"), dir.path().join("tiny.png")],
            None,
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tiny.png"), "{e}");
        assert!(!out.exists(), "nothing is written when an input is bad");
        // Scale 3.
        let mut opts = tiny_options();
        opts.config.scale = 3;
        let e = train_upscaler(&m, &opts, &Device::Cpu, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x2 or x4"), "{e}");
        // A manifest image whose size x4 cannot use.
        let mut opts = tiny_options();
        opts.config.scale = 4;
        opts.split = None;
        let m2 = dir.path().join("m2.jsonl");
        std::fs::write(&m2, "{\"image\":\"odd.png\"}\n").unwrap();
        let e = train_upscaler(&m2, &opts, &Device::Cpu, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("odd.png"), "{e}");
        // A card of another format.
        let art = dir.path().join("art");
        std::fs::create_dir_all(&art).unwrap();
        std::fs::write(art.join(CARD_FILE), "{\"format\":\"x\"}").unwrap();
        let e = Upscaler::load(&art, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("upscaler.json"), "{e}");
    }
}
