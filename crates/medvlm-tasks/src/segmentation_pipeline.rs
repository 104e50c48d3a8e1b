//! Text-guided segmentation end to end (issue #16): a task read from a manifest of images and
//! per-finding masks, frozen patch tokens and prompt embeddings from a loaded model, the
//! [`TextSegHead`] trained on them, the training-free patch-text similarity baseline
//! (MaskCLIP, Zhou et al., ECCV 2022) with its threshold chosen on the training split, both
//! evaluated with `medvlm_eval::segmentation` per finding and per modality, and the trained
//! head saved as an artefact folder ([`Segmenter`]) that predicts masks for image files,
//! NIfTI volumes included (slice by slice).
//!
//! # Data
//!
//! A manifest record (medvlm-io format) is one image; its `masks` `[{label, path}]` are its
//! findings (paths relative to the manifest, 2-D, non-zero = inside, the image's size; a
//! missing or unreadable file or a size mismatch is an error naming the file); the optional
//! extra key `modality` groups findings per modality. A *class* is a (modality, label) pair
//! named `modality/label` (or `label` without a modality), so `brain_mri/tumour` and
//! `histology/tumour` are different prompts. Each class is prompted with the mean embedding
//! of its prompts (L2-normalised, CLIP's prompt ensembling): for phantom modalities the
//! report-style prompts of `medvlm_phantoms::report_prompts` (the texts a phantom-pretrained
//! model read), otherwise "`label words` in `modality words`".
//!
//! Images are mapped to the model's input size `S` by a plain resize (no crop, so a mask
//! maps back to the image exactly), masks by nearest neighbour; metrics are computed at `S`
//! (the phantoms' own resolution when they are generated at the model's size).
//!
//! # Samples and empty masks
//!
//! Every (image, class of the image's modality) pair is a sample: *present* when the image
//! has the finding (target = union of its masks of that label), *absent* otherwise (target
//! empty). Training uses every present pair and one absent pair per image (seeded), so the
//! head learns to answer "nothing" to a finding that is not there. Evaluation reports Dice,
//! IoU and HD95 (MONAI convention, pixels at `S`) over the **present** pairs, per class and
//! per modality; a prediction that is empty on a present finding scores Dice 0 and has no
//! HD95 (counted as undefined, never dropped). The absent pairs are reported separately as
//! the share of empty predictions and the mean predicted area ([`AbsentStats`]), since Dice
//! is undefined when both masks are empty.
//!
//! # Defaults
//!
//! Head: [`SegHeadConfig::new`] (width 64, 300 AdamW steps of batch 16, lr 1e-3, threshold
//! 0.5, the tower's final patch tokens, a pixel encoder of width 16; [`TrainOptions::layers`]
//! picks intermediate layers instead, recorded in the card and used by evaluation and
//! prediction). Baseline: one threshold per class on the cosine similarity, chosen among 41 evenly
//! spaced values between the smallest and largest similarity seen on the training split to
//! maximise the mean Dice of that class's present training pairs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use medvlm_eval::segmentation::{SegmentationCase, SegmentationSummary};
use medvlm_io::{Plane, PlaneSelect, SourceFormat, Window};
use medvlm_models::preprocess::Resize;
use medvlm_models::{LoadedModel, PreprocessConfig};

use crate::card::read_json_card;
use crate::segmentation::{
    predict_masks, similarity_masks, train_head_with, SegError, SegHeadConfig, SegSample,
    TextSegHead, TunedTower,
};
use medvlm_train::bottleneck::{
    apply_bottleneck_adapters, load_bottleneck_adapters, save_bottleneck_adapters,
    set_bottleneck_enabled, AdapterSpec,
};
use medvlm_train::finetune::Towers;
use medvlm_train::lora::{
    apply_lora, load_lora_adapters, save_lora_adapters, set_lora_enabled, set_lora_training,
    LoraSpec,
};

/// Errors of the segmentation pipeline; each names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum SegPipelineError {
    /// The manifest could not be read.
    #[error("cannot read the segmentation manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        source: medvlm_io::IoError,
    },
    /// A mask file listed in the manifest is missing or cannot be decoded.
    #[error("mask {path} (finding `{label}` of {image}) cannot be read: {reason}")]
    Mask {
        path: PathBuf,
        label: String,
        image: PathBuf,
        reason: String,
    },
    /// A mask whose size differs from its image's.
    #[error(
        "mask {path} is {mask_rows}x{mask_cols} but its image {image} is {image_rows}x{image_cols}"
    )]
    MaskSize {
        path: PathBuf,
        image: PathBuf,
        mask_rows: usize,
        mask_cols: usize,
        image_rows: usize,
        image_cols: usize,
    },
    /// An image that cannot be read.
    #[error("image {path} cannot be read: {reason}")]
    Image { path: PathBuf, reason: String },
    /// A file that cannot be written or read back.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// The head failed.
    #[error(transparent)]
    Head(#[from] SegError),
    /// A metric failed.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// LoRA adapters of the image tower could not be applied, saved or loaded.
    #[error(transparent)]
    Lora(#[from] medvlm_train::finetune::FinetuneError),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, SegPipelineError>;

fn file_err(path: &Path, reason: impl ToString) -> SegPipelineError {
    SegPipelineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The task read from a manifest
// ---------------------------------------------------------------------------------------

/// One finding's mask file.
#[derive(Debug, Clone, PartialEq)]
pub struct FindingMask {
    /// Finding label (`nodule`).
    pub label: String,
    /// The mask file (resolved against the manifest's folder).
    pub path: PathBuf,
}

/// One image of a segmentation task and its findings.
#[derive(Debug, Clone, PartialEq)]
pub struct SegItem {
    /// The image file.
    pub image: PathBuf,
    /// The manifest's `modality` extra key, when present.
    pub modality: Option<String>,
    /// Its findings (none for a normal image).
    pub findings: Vec<FindingMask>,
    /// Its labels as the manifest gives them (the `labels` list, else `label`; may name
    /// findings without a mask, or `normal`).
    pub labels: Vec<String>,
    /// Its `boxes` `[{label, x0, y0, x1, y1}]` in the image's pixels, as the manifest gives
    /// them (checked against the image's size by the detection pipeline).
    pub boxes: Vec<medvlm_io::BoundingBox>,
}

/// A segmentation task: the images of one manifest (optionally one split) with their masks.
#[derive(Debug, Clone)]
pub struct SegTask {
    /// The manifest file.
    pub manifest: PathBuf,
    /// The images, in manifest order.
    pub items: Vec<SegItem>,
}

impl SegTask {
    /// Reads `manifest` (JSONL or CSV, medvlm-io format); with `split`, only its records.
    /// Mask files are checked to exist here (an error names the first missing one); their
    /// pixels are read by [`load_images`].
    pub fn from_manifest(manifest: &Path, split: Option<&str>) -> Result<Self> {
        let m =
            medvlm_io::read_manifest(manifest).map_err(|source| SegPipelineError::Manifest {
                path: manifest.to_path_buf(),
                source,
            })?;
        let mut items = Vec::new();
        for rec in &m.records {
            if let Some(s) = split {
                if rec.split.as_deref() != Some(s) {
                    continue;
                }
            }
            let image = m.image_path(rec);
            let findings: Vec<FindingMask> = rec
                .masks
                .iter()
                .map(|r| FindingMask {
                    label: r.label.clone(),
                    path: m.resolve(&r.path),
                })
                .collect();
            for f in &findings {
                if !f.path.is_file() {
                    return Err(SegPipelineError::Mask {
                        path: f.path.clone(),
                        label: f.label.clone(),
                        image: image.clone(),
                        reason: "no such file".into(),
                    });
                }
            }
            let labels = if rec.labels.is_empty() {
                rec.label.iter().cloned().collect()
            } else {
                rec.labels.clone()
            };
            items.push(SegItem {
                labels,
                boxes: rec.boxes.clone(),
                image,
                modality: rec
                    .extra
                    .get("modality")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                findings,
            });
        }
        if items.is_empty() {
            return Err(SegPipelineError::Invalid(format!(
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

/// The class name of a finding: `modality/label`, or `label` without a modality.
pub fn class_name(modality: Option<&str>, label: &str) -> String {
    match modality {
        Some(m) => format!("{m}/{label}"),
        None => label.to_string(),
    }
}

/// A prompted class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegClass {
    /// `modality/label` or `label`.
    pub name: String,
    /// Modality, when the manifest gives one.
    pub modality: Option<String>,
    /// Finding label.
    pub label: String,
    /// Prompts whose mean embedding conditions the head.
    pub prompts: Vec<String>,
}

/// The class a prompt names: the class of that name (`modality/label`), else the only class
/// with that label; `None` when no class, or several, match.
pub fn class_named(classes: &[SegClass], prompt: &str) -> Option<usize> {
    classes.iter().position(|c| c.name == prompt).or_else(|| {
        let mut by_label = classes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.label == prompt);
        match (by_label.next(), by_label.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    })
}

/// Default prompts of a class (see the module docs).
pub fn default_prompts(modality: Option<&str>, label: &str) -> Vec<String> {
    if let Some(m) = modality.and_then(|m| m.parse::<medvlm_phantoms::Modality>().ok()) {
        if let Some(p) = medvlm_phantoms::report_prompts(m, label) {
            if !p.is_empty() {
                return p;
            }
        }
    }
    let words = label.replace('_', " ");
    vec![match modality {
        Some(m) => format!("{words} in {}", m.replace('_', " ")),
        None => words,
    }]
}

/// The classes of a task: every (modality, label) that has a mask, sorted by name.
pub fn task_classes(task: &SegTask) -> Vec<SegClass> {
    let mut seen: BTreeMap<String, SegClass> = BTreeMap::new();
    for it in &task.items {
        for f in &it.findings {
            let name = class_name(it.modality.as_deref(), &f.label);
            seen.entry(name.clone()).or_insert_with(|| SegClass {
                name,
                modality: it.modality.clone(),
                label: f.label.clone(),
                prompts: default_prompts(it.modality.as_deref(), &f.label),
            });
        }
    }
    seen.into_values().collect()
}

// ---------------------------------------------------------------------------------------
// Pixels
// ---------------------------------------------------------------------------------------

/// Reads a 2-D image file as a plane in `[0, 1]`: PNG/JPEG/TIFF scaled by their bit depth
/// (as the models' own preprocessing reads them), DICOM/NIfTI/npy through medvlm-io's plane
/// selection and automatic window.
pub fn read_plane(path: &Path) -> Result<Plane> {
    let img = medvlm_io::load_any(path).map_err(|e| SegPipelineError::Image {
        path: path.to_path_buf(),
        reason: medvlm_io::guard::error_chain(&e),
    })?;
    plane_of(path, &img, &PlaneSelect::default())
}

pub(crate) fn plane_of(path: &Path, img: &medvlm_io::MedImage, sel: &PlaneSelect) -> Result<Plane> {
    let bad = |e: medvlm_io::IoError| SegPipelineError::Image {
        path: path.to_path_buf(),
        reason: medvlm_io::guard::error_chain(&e),
    };
    if img.format == SourceFormat::Raster {
        let mut p = img.plane(sel).map_err(bad)?;
        let max = ((1u32 << img.bits_stored.unwrap_or(8).min(16)) - 1) as f32;
        p.data
            .iter_mut()
            .for_each(|v| *v = (*v / max).clamp(0.0, 1.0));
        Ok(p)
    } else {
        medvlm_io::preprocess::windowed_plane(img, sel, &Window::Auto).map_err(bad)
    }
}

/// Nearest-neighbour resampling of a `rows x cols` 0/1 mask to `out_rows x out_cols`
/// (pixel centres mapped onto each other).
pub fn resize_mask(
    mask: &[u8],
    (rows, cols): (usize, usize),
    (out_rows, out_cols): (usize, usize),
) -> Vec<u8> {
    let mut out = vec![0u8; out_rows * out_cols];
    for y in 0..out_rows {
        let sy = (((y as f64 + 0.5) * rows as f64 / out_rows as f64) as usize).min(rows - 1);
        for x in 0..out_cols {
            let sx = (((x as f64 + 0.5) * cols as f64 / out_cols as f64) as usize).min(cols - 1);
            out[y * out_cols + x] = mask[sy * cols + sx];
        }
    }
    out
}

/// The model's preprocessing with a plain resize to its input size and no crop, so a
/// prediction maps back onto the whole image.
pub(crate) fn seg_preprocess(m: &LoadedModel, size: usize) -> PreprocessConfig {
    PreprocessConfig {
        resize: Some(Resize::Exact {
            height: size,
            width: size,
        }),
        crop: None,
        ..m.preprocess.clone()
    }
}

/// A plane turned into the model's input `3 x S x S` and the head's grey input `S x S`.
pub(crate) struct Prepared {
    pub(crate) pixels: Vec<f32>,
    pub(crate) grey: Vec<f32>,
}

pub(crate) fn prepare(
    pre: &PreprocessConfig,
    plane: &Plane,
    size: usize,
    path: &Path,
) -> Result<Prepared> {
    let pixels = pre
        .apply_array(&plane.data, plane.rows, plane.cols, plane.channels)
        .map_err(|e| SegPipelineError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    // The grey level in [0, 1] of the resized image: the normalisation undone, channels
    // averaged.
    let n = size * size;
    let mut grey = vec![0f32; n];
    for c in 0..3 {
        for (i, g) in grey.iter_mut().enumerate() {
            *g += (pixels[c * n + i] * pre.std[c] + pre.mean[c]) / 3.0;
        }
    }
    Ok(Prepared { pixels, grey })
}

fn read_mask(f: &FindingMask, image: &Path, shape: (usize, usize)) -> Result<Vec<u8>> {
    let mask_err = |reason: String| SegPipelineError::Mask {
        path: f.path.clone(),
        label: f.label.clone(),
        image: image.to_path_buf(),
        reason,
    };
    let img =
        medvlm_io::load_any(&f.path).map_err(|e| mask_err(medvlm_io::guard::error_chain(&e)))?;
    let plane = img
        .plane(&PlaneSelect::default())
        .map_err(|e| mask_err(medvlm_io::guard::error_chain(&e)))?;
    if (plane.rows, plane.cols) != shape {
        return Err(SegPipelineError::MaskSize {
            path: f.path.clone(),
            image: image.to_path_buf(),
            mask_rows: plane.rows,
            mask_cols: plane.cols,
            image_rows: shape.0,
            image_cols: shape.1,
        });
    }
    Ok(plane
        .data
        .chunks(plane.channels)
        .map(|px| u8::from(px[0] > 0.0))
        .collect())
}

/// One image at the model's size with its frozen features and its masks.
pub struct LoadedImage {
    /// The file.
    pub path: PathBuf,
    /// Its modality, when known.
    pub modality: Option<String>,
    /// Grey input `[1, S, S]`.
    pub grey: Tensor,
    /// Patch tokens `[N, D]` of the frozen tower (read with layers: the layers' patch tokens
    /// side by side, `[N, L * D]`, see [`load_images_with_layers`]).
    pub patches: Tensor,
    /// Patch tokens in the joint space `[N, E]` (baseline), when the tower has them.
    pub projected: Option<Tensor>,
    /// Masks at `S x S` (0/1) by finding label (several masks of one label are joined).
    pub masks: BTreeMap<String, Vec<u8>>,
    /// The file's own size `(rows, cols)` before the resize to `S`.
    pub shape: (usize, usize),
}

/// Reads every image and mask of `task` (a mask of the wrong size or an unreadable file
/// stops it with an error naming the file) and computes the frozen patch tokens, in
/// batches of 32.
pub fn load_images(m: &LoadedModel, task: &SegTask, device: &Device) -> Result<Vec<LoadedImage>> {
    load_images_with_layers(m, task, &[], device)
}

/// [`load_images`] with the patch tokens of the image-tower layers `layers` (counted from 1,
/// see [`SegHeadConfig::layers`]) side by side in [`LoadedImage::patches`]; empty `layers`:
/// the final patch tokens, as [`load_images`].
pub fn load_images_with_layers(
    m: &LoadedModel,
    task: &SegTask,
    layers: &[usize],
    device: &Device,
) -> Result<Vec<LoadedImage>> {
    Ok(load_images_for_head(m, task, layers, HeadLoading::default(), None, device)?.0)
}

/// A function shown every batch of preprocessed pixels `[B, 3, S, S]` (on the device) as
/// [`load_images_visiting`] reads them, in the order of the task's items.
pub type PixelVisitor<'a> = &'a mut dyn FnMut(&Tensor) -> Result<()>;

/// [`load_images`], showing each batch's pixel tensor to `visit` (for another pass of the
/// tower over the same pixels, e.g. WinCLIP's windows) without reading the files again or
/// keeping every image's pixels.
pub fn load_images_visiting(
    m: &LoadedModel,
    task: &SegTask,
    visit: PixelVisitor,
    device: &Device,
) -> Result<Vec<LoadedImage>> {
    Ok(load_images_for_head(m, task, &[], HeadLoading::default(), Some(visit), device)?.0)
}

/// What [`load_images_for_head`] does besides [`load_images_with_layers`]'s work.
#[derive(Debug, Clone, Copy, Default)]
struct HeadLoading {
    /// Also return each image's pixel tensor `[3, S, S]` (on the device), for training
    /// through the image tower.
    keep_pixels: bool,
    /// Compute the projected tokens (the training-free baseline's) with the tower's LoRA or
    /// bottleneck adapters switched off, the patch tokens with them on.
    frozen_projection: bool,
}

/// [`load_images_with_layers`] and, by `how`, the pixel tensors and a projection of the
/// tower without its adapters, each image read once.
fn load_images_for_head(
    m: &LoadedModel,
    task: &SegTask,
    layers: &[usize],
    how: HeadLoading,
    mut visit: Option<PixelVisitor>,
    device: &Device,
) -> Result<(Vec<LoadedImage>, Vec<Tensor>)> {
    let size = m.model.image_size();
    let pre = seg_preprocess(m, size);
    let mut out = Vec::with_capacity(task.items.len());
    let mut kept = Vec::new();
    for chunk in task.items.chunks(32) {
        let mut pixels = Vec::with_capacity(chunk.len());
        let mut partial = Vec::with_capacity(chunk.len());
        for it in chunk {
            let plane = read_plane(&it.image)?;
            let shape = (plane.rows, plane.cols);
            let mut masks: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for f in &it.findings {
                let mk = resize_mask(&read_mask(f, &it.image, shape)?, shape, (size, size));
                let e = masks
                    .entry(f.label.clone())
                    .or_insert_with(|| vec![0; size * size]);
                e.iter_mut().zip(&mk).for_each(|(a, b)| *a |= *b);
            }
            let p = prepare(&pre, &plane, size, &it.image)?;
            pixels.push(p.pixels);
            partial.push((it, p.grey, masks, shape));
        }
        let px = pre.batch(&pixels, device)?;
        let (patches, projected) = if how.frozen_projection {
            let projected = with_adapters_off(m, || {
                let out = m.model.encode_image(&px)?;
                Ok(m.model
                    .project_patch_tokens(&out)?
                    .map(to_cpu_f32)
                    .transpose()?)
            })?;
            (to_cpu_f32(encode_tokens(m, &px, layers)?)?, projected)
        } else {
            encode_patches_with_layers(m, &px, layers)?
        };
        if let Some(v) = visit.as_mut() {
            v(&px)?;
        }
        if how.keep_pixels {
            for i in 0..chunk.len() {
                kept.push(px.get(i)?);
            }
        }
        for (i, (it, grey, masks, shape)) in partial.into_iter().enumerate() {
            out.push(LoadedImage {
                path: it.image.clone(),
                modality: it.modality.clone(),
                grey: Tensor::from_vec(grey, (1, size, size), &Device::Cpu)?,
                patches: patches.get(i)?,
                projected: projected.as_ref().map(|p| p.get(i)).transpose()?,
                masks,
                shape,
            });
        }
    }
    Ok((out, kept))
}

/// Runs `f` with the image tower's adapters on `m` (LoRA, bottleneck; if any) switched off,
/// and on again after.
fn with_adapters_off<T>(m: &LoadedModel, f: impl FnOnce() -> Result<T>) -> Result<T> {
    set_lora_enabled(m.model.as_ref(), false);
    set_bottleneck_enabled(m.model.as_ref(), false);
    let out = f();
    set_lora_enabled(m.model.as_ref(), true);
    set_bottleneck_enabled(m.model.as_ref(), true);
    out
}

fn to_cpu_f32(t: Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)?.to_device(&Device::Cpu)
}

/// Planes (e.g. the slices of a volume, all from `path`) prepared as [`load_images`] prepares
/// files, without masks.
pub fn load_planes(
    m: &LoadedModel,
    planes: &[Plane],
    path: &Path,
    modality: Option<String>,
    device: &Device,
) -> Result<Vec<LoadedImage>> {
    load_planes_visiting(m, planes, path, modality, None, device)
}

/// [`load_planes`], showing each batch's pixel tensor to `visit` (as
/// [`load_images_visiting`]).
pub fn load_planes_visiting(
    m: &LoadedModel,
    planes: &[Plane],
    path: &Path,
    modality: Option<String>,
    mut visit: Option<PixelVisitor>,
    device: &Device,
) -> Result<Vec<LoadedImage>> {
    let size = m.model.image_size();
    let pre = seg_preprocess(m, size);
    let mut out = Vec::with_capacity(planes.len());
    for chunk in planes.chunks(32) {
        let mut pixels = Vec::with_capacity(chunk.len());
        let mut greys = Vec::with_capacity(chunk.len());
        for plane in chunk {
            let p = prepare(&pre, plane, size, path)?;
            pixels.push(p.pixels);
            greys.push((p.grey, (plane.rows, plane.cols)));
        }
        let px = pre.batch(&pixels, device)?;
        if let Some(v) = visit.as_mut() {
            v(&px)?;
        }
        let (patches, projected) = encode_patches(m, &px)?;
        for (i, (grey, shape)) in greys.into_iter().enumerate() {
            out.push(LoadedImage {
                path: path.to_path_buf(),
                modality: modality.clone(),
                grey: Tensor::from_vec(grey, (1, size, size), &Device::Cpu)?,
                patches: patches.get(i)?,
                projected: projected.as_ref().map(|p| p.get(i)).transpose()?,
                masks: BTreeMap::new(),
                shape,
            });
        }
    }
    Ok(out)
}

/// Patch tokens `[B, N, D]` and, when the tower has them, projected patch tokens `[B, N, E]`,
/// as f32 on the CPU.
pub(crate) fn encode_patches(m: &LoadedModel, px: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    encode_patches_with_layers(m, px, &[])
}

/// Patch tokens `[B, N, D]` (of `layers` side by side, or the final ones) in f32, keeping
/// the graph to the tower's parameters.
fn encode_tokens(m: &LoadedModel, px: &Tensor, layers: &[usize]) -> Result<Tensor> {
    let t = if layers.is_empty() {
        m.model.encode_image(px)?.patch_tokens()?
    } else {
        layer_tokens(m, px, layers)?
    };
    Ok(t.to_dtype(DType::F32)?)
}

/// The patch tokens of `layers` (counted from 1, non-empty) side by side, `[B, N, L * D]`.
fn layer_tokens(m: &LoadedModel, px: &Tensor, layers: &[usize]) -> Result<Tensor> {
    let states = m.model.encode_image_layers(px, layers)?;
    let tokens = (0..layers.len())
        .map(|i| states.patch_tokens(i))
        .collect::<medvlm_models::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&tokens, 2)?)
}

/// [`encode_patches`] with the patch tokens of `layers` (counted from 1) side by side,
/// `[B, N, L * D]`, in place of the final ones (empty `layers`: the final ones). The
/// projected tokens (the baseline's) stay those of the final output.
pub(crate) fn encode_patches_with_layers(
    m: &LoadedModel,
    px: &Tensor,
    layers: &[usize],
) -> Result<(Tensor, Option<Tensor>)> {
    let out = m.model.encode_image(px)?;
    let patches = if layers.is_empty() {
        to_cpu_f32(out.patch_tokens()?)?
    } else {
        to_cpu_f32(layer_tokens(m, px, layers)?)?
    };
    let projected = m
        .model
        .project_patch_tokens(&out)?
        .map(to_cpu_f32)
        .transpose()?;
    Ok((patches, projected))
}

/// Checks image-tower layers for the segmentation head against the model: the head's rules
/// ([`SegHeadConfig::check_layers`]) and the tower's depth (a clear error naming it).
pub fn check_layers_for_model(layers: &[usize], m: &LoadedModel) -> Result<()> {
    if layers.is_empty() {
        return Ok(());
    }
    let probe = SegHeadConfig {
        layers: layers.to_vec(),
        ..SegHeadConfig::new(1, 1, (1, 1), 1)
    };
    probe.check_layers()?;
    medvlm_models::vlm::check_vision_layers(layers, m.model.vision_num_layers())?;
    Ok(())
}

/// One L2-normalised text embedding per prompt list (the normalised mean of its prompts'
/// normalised embeddings), `[C, E]` f32 on the CPU.
pub fn prompt_embeddings(
    m: &LoadedModel,
    prompt_lists: &[Vec<String>],
    device: &Device,
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(prompt_lists.len());
    for prompts in prompt_lists {
        if prompts.is_empty() {
            return Err(SegPipelineError::Invalid("a class has no prompts".into()));
        }
        let e = medvlm_models::vlm::l2_normalize(&medvlm_models::embed::embed_texts(
            m, prompts, 64, device,
        )?)?;
        rows.push(e.mean_keepdim(0)?);
    }
    Ok(medvlm_models::vlm::l2_normalize(&Tensor::cat(&rows, 0)?)?)
}

// ---------------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------------

/// A (image, class) pair: its class index, whether the finding is present, and the image.
#[derive(Debug, Clone, Copy)]
pub struct PairRef {
    /// Index into the images.
    pub image: usize,
    /// Index into the classes.
    pub class: usize,
    /// Whether the image has the finding.
    pub present: bool,
}

/// Pairs of images with the classes of their modality, and the findings that have no class
/// (a label the classes do not know), as `(image file, label)`.
pub fn pairs(
    images: &[LoadedImage],
    classes: &[SegClass],
) -> (Vec<PairRef>, Vec<(PathBuf, String)>) {
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    for (i, img) in images.iter().enumerate() {
        for (c, cls) in classes.iter().enumerate() {
            if cls.modality != img.modality {
                continue;
            }
            out.push(PairRef {
                image: i,
                class: c,
                present: img.masks.contains_key(&cls.label),
            });
        }
        for label in img.masks.keys() {
            if !classes
                .iter()
                .any(|c| c.modality == img.modality && &c.label == label)
            {
                unknown.push((img.path.clone(), label.clone()));
            }
        }
    }
    (out, unknown)
}

fn target(img: &LoadedImage, cls: &SegClass, size: usize) -> Vec<u8> {
    img.masks
        .get(&cls.label)
        .cloned()
        .unwrap_or_else(|| vec![0; size * size])
}

fn sample(img: &LoadedImage, cls: &SegClass, text: &Tensor, size: usize) -> Result<SegSample> {
    let mask: Vec<f32> = target(img, cls, size).iter().map(|&v| v as f32).collect();
    Ok(SegSample {
        patches: img.patches.clone(),
        text: text.clone(),
        grey: img.grey.clone(),
        mask: Tensor::from_vec(mask, (1, size, size), &Device::Cpu)?,
    })
}

// ---------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------

/// Settings of [`train_segmenter`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Model spec (directory, `hf:ORG/NAME` or preset), recorded in the card.
    pub model_spec: String,
    /// Optimiser steps; `None`: the default of [`SegHeadConfig::new`] (300).
    pub steps: Option<usize>,
    /// Head batch; `None`: the default (16).
    pub batch: Option<usize>,
    /// Head width; `None`: the default (64).
    pub width: Option<usize>,
    /// Learning rate; `None`: the default (1e-3).
    pub lr: Option<f64>,
    /// Learning rate of the tower's LoRA or adapters; `None`: [`ADAPTER_TOWER_LR`] for
    /// bottleneck adapters, the head's for LoRA ([`SegHeadConfig::tower_lr`]).
    pub tower_lr: Option<f64>,
    /// Seed of the head and of the absent pairs drawn.
    pub seed: u64,
    /// Split of the training manifest to use (`None`: every record).
    pub split: Option<String>,
    /// Image-tower layers the head reads (counted from 1, increasing; see
    /// [`SegHeadConfig::layers`]); empty: the final patch tokens (the default).
    pub layers: Vec<usize>,
    /// Width of the pixel encoder ([`SegHeadConfig::pixel_width`]); `None`: the default.
    pub pixel_width: Option<usize>,
    /// Standardise each image's grey input ([`SegHeadConfig::grey_standardise`]); `None`:
    /// the default.
    pub grey_standardise: Option<bool>,
    /// LoRA adapters in the image tower, trained with the head (see [`SegLora`]); `None`:
    /// the tower stays frozen (the default).
    pub lora: Option<SegLora>,
    /// Bottleneck adapters in the image tower, trained with the head (see [`SegAdapter`]);
    /// `None`: none (the default). Not together with `lora`.
    pub adapter: Option<SegAdapter>,
}

/// LoRA in the image tower of a segmenter (Hu et al., ICLR 2022), trained with the head from
/// the segmentation loss: VLSM-Adapter's setting (Dhakal et al., MICCAI 2024, adapters in a
/// frozen vision-language segmenter's encoder) with the engine's LoRA wrapping
/// ([`medvlm_train::lora`]). Only the image tower is adapted; the text tower and so the
/// classes' embeddings stay as they are. Saved beside the head in PEFT's layout (`lora/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegLora {
    /// Rank `r`.
    pub rank: usize,
    /// Scaling numerator (`alpha / r`).
    pub alpha: f64,
    /// Target layers in [`medvlm_train::lora`]'s notation (`q`, `v`, `fc1`, ...), image
    /// tower only.
    pub targets: Vec<String>,
}

impl SegLora {
    /// Rank 8, alpha 16 (PEFT's common setting), on `q` and `v` of every block.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: 2.0 * rank as f64,
            targets: vec!["q".into(), "v".into()],
        }
    }

    /// The engine's spec: these settings on the image tower, no dropout.
    pub fn spec(&self) -> LoraSpec {
        LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            dropout: 0.0,
            targets: self.targets.clone(),
            towers: Towers::Vision,
        }
    }
}

/// Folder of a segmenter's LoRA adapters inside its artefact folder.
pub const LORA_DIR: &str = "lora";

/// Bottleneck adapters in the image tower of a segmenter (Houlsby et al., ICML 2019), trained
/// with the head from the segmentation loss: VLSM-Adapter's adapter variant (Dhakal et al.,
/// MICCAI 2024) with the engine's wrapping ([`medvlm_train::bottleneck`]). Image tower only;
/// saved beside the head in `adapter/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegAdapter {
    /// Bottleneck width.
    pub bottleneck: usize,
    /// Target layers in [`medvlm_train::lora`]'s notation (default `out`, `fc2`: Houlsby's
    /// two places in each block).
    pub targets: Vec<String>,
}

impl SegAdapter {
    /// Houlsby's placement (after the attention output and the MLP) with this bottleneck.
    pub fn new(bottleneck: usize) -> Self {
        Self {
            bottleneck,
            targets: AdapterSpec::default().targets,
        }
    }

    /// The engine's spec: these settings on the image tower.
    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            bottleneck: self.bottleneck,
            targets: self.targets.clone(),
            towers: Towers::Vision,
        }
    }
}

/// Folder of a segmenter's bottleneck adapters inside its artefact folder.
pub const ADAPTER_DIR: &str = "adapter";

/// A trained segmenter in memory (what the artefact folder holds).
pub struct Segmenter {
    /// The card.
    pub card: SegCard,
    /// The head.
    pub head: TextSegHead,
    /// The head's parameters.
    pub varmap: VarMap,
    /// The classes' text embeddings `[C, E]`.
    pub class_text: Tensor,
    /// The frozen model.
    pub model: LoadedModel,
}

/// The JSON card of a segmenter artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegCard {
    /// `medvlm-segmenter/1`.
    pub format: String,
    /// Head configuration (threshold included).
    pub head: SegHeadConfig,
    /// The model spec it was trained on.
    pub model_spec: String,
    /// The model family.
    pub model_family: String,
    /// Fingerprint of the model folder (spec, family, file names, sizes, mtimes).
    pub model_fingerprint: String,
    /// The classes and their prompts, in the order of the stored text embeddings.
    pub classes: Vec<SegClass>,
    /// The similarity baseline's threshold of each class (chosen on the training split);
    /// empty when the tower has no projected patch tokens.
    pub baseline_thresholds: BTreeMap<String, f32>,
    /// The training manifest.
    pub train_manifest: String,
    /// Training images.
    pub n_train_images: usize,
    /// Training samples (present + absent pairs).
    pub n_train_samples: usize,
    /// Mean loss of the last 10 steps.
    pub final_loss: f32,
    /// LoRA adapters of the image tower trained with the head (in `lora/`); absent: the
    /// tower is frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<SegLora>,
    /// Bottleneck adapters of the image tower trained with the head (in `adapter/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<SegAdapter>,
}

impl SegCard {
    /// Whether the image tower carries adapters trained with the head (LoRA or bottleneck).
    pub fn tower_tuned(&self) -> bool {
        self.lora.is_some() || self.adapter.is_some()
    }
}

/// Format tag of the card.
pub const CARD_FORMAT: &str = "medvlm-segmenter/1";
const CARD_FILE: &str = "segmenter.json";
const HEAD_FILE: &str = "head.safetensors";
const CLASS_TEXT_KEY: &str = "class_text";

/// Fingerprint of a loaded model: sha256 of its spec, family and its folder's file names,
/// sizes and modification times (cheap; changes when the weights are rewritten).
pub fn model_fingerprint(spec: &str, m: &LoadedModel) -> String {
    let mut h = Sha256::new();
    h.update(spec.as_bytes());
    h.update(m.family.to_string().as_bytes());
    if let Ok(entries) = std::fs::read_dir(&m.dir) {
        let mut files: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                md.is_file().then(|| {
                    let t = md
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    format!("{}:{}:{t}", e.file_name().to_string_lossy(), md.len())
                })
            })
            .collect();
        files.sort();
        for f in files {
            h.update(f.as_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The bottleneck adapters' default learning rate (the head keeps its own, 1e-3). At the
/// head's rate the adapters moved the tower's tokens faster than the head learnt the small
/// findings, and one of two seeds collapsed to empty masks for brain MRI and chest (test Dice
/// 0.434); at 3e-4 for the adapters neither seed collapsed (0.731 and 0.693;
/// docs/segmentation.md, 2026-12-05).
pub const ADAPTER_TOWER_LR: f64 = 3e-4;

/// What [`train_segmenter`] made.
pub struct TrainOutcome {
    /// The segmenter.
    pub segmenter: Segmenter,
    /// The head's loss at each step.
    pub losses: Vec<f32>,
}

/// Trains a segmenter on `task` with the loaded model `m`: classes from the task, frozen
/// features, the head, and the baseline's thresholds.
pub fn train_segmenter(
    mut m: LoadedModel,
    task: &SegTask,
    opts: &TrainOptions,
    device: &Device,
) -> Result<TrainOutcome> {
    let classes = task_classes(task);
    if classes.is_empty() {
        return Err(SegPipelineError::Invalid(format!(
            "{}: no masks, nothing to learn",
            task.manifest.display()
        )));
    }
    check_layers_for_model(&opts.layers, &m)?;
    if opts.lora.is_some() && opts.adapter.is_some() {
        return Err(SegPipelineError::Invalid(
            "choose LoRA or bottleneck adapters for the image tower, not both".into(),
        ));
    }
    match opts.tower_lr {
        Some(_) if opts.lora.is_none() && opts.adapter.is_none() => {
            return Err(SegPipelineError::Invalid(
                "a tower learning rate needs LoRA or bottleneck adapters in the tower (the frozen \
                 tower has nothing to train)"
                    .into(),
            ))
        }
        Some(lr) if !(lr.is_finite() && lr > 0.0) => {
            return Err(SegPipelineError::Invalid(format!(
                "tower learning rate {lr}: must be a positive number"
            )))
        }
        _ => {}
    }
    // With LoRA or adapters the pixels are kept for the tower's passes during training (read once).
    let (images, pixels) = load_images_for_head(
        &m,
        task,
        &opts.layers,
        HeadLoading {
            keep_pixels: opts.lora.is_some() || opts.adapter.is_some(),
            ..Default::default()
        },
        None,
        device,
    )?;
    let prompts: Vec<Vec<String>> = classes.iter().map(|c| c.prompts.clone()).collect();
    let class_text = prompt_embeddings(&m, &prompts, device)?;
    let size = m.model.image_size();
    let (n_tokens, joined_dim) = images[0].patches.dims2()?;
    let feature_dim = joined_dim / opts.layers.len().max(1);
    let side = (n_tokens as f64).sqrt().round() as usize;
    if side * side != n_tokens {
        return Err(SegPipelineError::Invalid(format!(
            "{n_tokens} patch tokens do not form a square grid"
        )));
    }
    let mut cfg = SegHeadConfig::new(feature_dim, class_text.dim(1)?, (side, side), size);
    cfg.seed = opts.seed;
    cfg.layers = opts.layers.clone();
    if let Some(v) = opts.steps {
        cfg.steps = v;
    }
    if let Some(v) = opts.batch {
        cfg.batch = v;
    }
    if let Some(v) = opts.width {
        cfg.width = v;
    }
    if let Some(v) = opts.lr {
        cfg.lr = v;
    }
    cfg.tower_lr = opts
        .tower_lr
        .or(opts.adapter.as_ref().map(|_| ADAPTER_TOWER_LR));
    if let Some(v) = opts.pixel_width {
        cfg.pixel_width = v;
    }
    if let Some(v) = opts.grey_standardise {
        cfg.grey_standardise = v;
    }
    let (all_pairs, _) = pairs(&images, &classes);
    // Every present pair, and one absent pair per image (seeded).
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x00ab_5e47);
    let mut chosen: Vec<PairRef> = all_pairs.iter().filter(|p| p.present).copied().collect();
    for i in 0..images.len() {
        let absent: Vec<&PairRef> = all_pairs
            .iter()
            .filter(|p| p.image == i && !p.present)
            .collect();
        if let Some(p) = absent.choose(&mut rng) {
            chosen.push(**p);
        }
    }
    let samples: Vec<SegSample> = chosen
        .iter()
        .map(|p| {
            sample(
                &images[p.image],
                &classes[p.class],
                &class_text.get(p.class)?,
                size,
            )
        })
        .collect::<Result<_>>()?;
    // The tower's trainable parameters: LoRA's or the bottleneck adapters'.
    let adapters = VarMap::new();
    let tuned = match (&opts.lora, &opts.adapter) {
        (Some(lora), _) => {
            if lora.rank == 0 {
                return Err(SegPipelineError::Invalid(
                    "the LoRA rank must be at least 1".into(),
                ));
            }
            Some(apply_lora(
                m.model.as_mut(),
                &lora.spec(),
                &adapters,
                opts.seed,
            )?)
        }
        (None, Some(a)) => Some(apply_bottleneck_adapters(
            m.model.as_mut(),
            &a.spec(),
            &adapters,
            opts.seed,
        )?),
        (None, None) => None,
    };
    let trained = match tuned {
        None => train_head_with(&cfg, &samples, None, device)?,
        Some(params) => {
            let image_of: Vec<usize> = chosen.iter().map(|p| p.image).collect();
            let model = &m;
            let layers = &opts.layers;
            let encode = |idx: &[usize]| -> crate::segmentation::Result<Tensor> {
                let px: Vec<&Tensor> = idx.iter().map(|&i| &pixels[image_of[i]]).collect();
                let px = Tensor::stack(&px, 0)?;
                encode_tokens(model, &px, layers)
                    .map_err(|e| SegError::Invalid(format!("image tower: {e}")))
            };
            set_lora_training(m.model.as_ref(), true);
            let tower = TunedTower {
                params,
                encode: &encode,
            };
            let trained = train_head_with(&cfg, &samples, Some(&tower), device);
            set_lora_training(m.model.as_ref(), false);
            trained?
        }
    };
    let baseline_thresholds = choose_baseline_thresholds(&images, &classes, &class_text, &cfg)?;
    let tail = &trained.losses[trained.losses.len().saturating_sub(10)..];
    let final_loss = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    let card = SegCard {
        format: CARD_FORMAT.into(),
        head: cfg,
        model_spec: opts.model_spec.clone(),
        model_family: m.family.to_string(),
        model_fingerprint: model_fingerprint(&opts.model_spec, &m),
        classes,
        baseline_thresholds,
        train_manifest: task.manifest.display().to_string(),
        n_train_images: images.len(),
        n_train_samples: samples.len(),
        final_loss,
        lora: opts.lora.clone(),
        adapter: opts.adapter.clone(),
    };
    Ok(TrainOutcome {
        losses: trained.losses,
        segmenter: Segmenter {
            card,
            head: trained.head,
            varmap: trained.varmap,
            class_text,
            model: m,
        },
    })
}

/// Cosine similarity of each patch with the text, `[N]`.
fn patch_similarity(projected: &Tensor, text: &Tensor) -> Result<Vec<f32>> {
    let p = medvlm_models::vlm::l2_normalize(projected)?;
    Ok(p.matmul(&text.unsqueeze(1)?)?.squeeze(1)?.to_vec1()?)
}

/// The grid map upsampled (nearest) to `S x S` and thresholded.
fn threshold_map(sim: &[f32], side: usize, size: usize, thr: f32) -> Vec<u8> {
    let f = size / side;
    let mut out = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            out[y * size + x] = u8::from(sim[(y / f) * side + x / f] >= thr);
        }
    }
    out
}

fn dice_u8(p: &[u8], g: &[u8]) -> f64 {
    let (mut i, mut s) = (0usize, 0usize);
    for (&a, &b) in p.iter().zip(g) {
        i += (a & b) as usize;
        s += a as usize + b as usize;
    }
    if s == 0 {
        1.0
    } else {
        2.0 * i as f64 / s as f64
    }
}

/// Per class, the threshold of the similarity map that maximises the mean Dice of its present
/// training pairs (41 candidates between the smallest and largest similarity seen).
fn choose_baseline_thresholds(
    images: &[LoadedImage],
    classes: &[SegClass],
    class_text: &Tensor,
    cfg: &SegHeadConfig,
) -> Result<BTreeMap<String, f32>> {
    let mut out = BTreeMap::new();
    let side = cfg.grid.0;
    let size = cfg.image_size;
    for (c, cls) in classes.iter().enumerate() {
        let text = class_text.get(c)?;
        let mut maps = Vec::new();
        for img in images {
            let (Some(proj), Some(mask)) = (&img.projected, img.masks.get(&cls.label)) else {
                continue;
            };
            if img.modality != cls.modality {
                continue;
            }
            maps.push((patch_similarity(proj, &text)?, mask));
        }
        if maps.is_empty() {
            continue;
        }
        let lo = maps
            .iter()
            .flat_map(|(s, _)| s.iter())
            .fold(f32::MAX, |a, &b| a.min(b));
        let hi = maps
            .iter()
            .flat_map(|(s, _)| s.iter())
            .fold(f32::MIN, |a, &b| a.max(b));
        let mut best = (f64::MIN, lo);
        for k in 0..=40 {
            let thr = lo + (hi - lo) * k as f32 / 40.0;
            let mean = maps
                .iter()
                .map(|(s, g)| dice_u8(&threshold_map(s, side, size, thr), g))
                .sum::<f64>()
                / maps.len() as f64;
            if mean > best.0 {
                best = (mean, thr);
            }
        }
        out.insert(cls.name.clone(), best.1);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Artefact
// ---------------------------------------------------------------------------------------

/// Writes a head artefact folder: `dir/head_file` (safetensors: the head's parameters and
/// the classes' text embeddings under `class_text`) and then `dir/card_file` (the JSON card),
/// each atomically (temporary file + rename), the card last so that a folder with a card is
/// complete. Shared by the segmenter and the detector.
pub(crate) fn save_head_artefact<C: Serialize>(
    dir: &Path,
    head_file: &str,
    card_file: &str,
    varmap: &VarMap,
    class_text: &Tensor,
    card: &C,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| SegPipelineError::Invalid("poisoned varmap".into()))?;
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    };
    tensors.insert(CLASS_TEXT_KEY.into(), class_text.clone());
    let head_path = dir.join(head_file);
    medvlm_io::atomic::write_atomic_via(&head_path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| file_err(&head_path, medvlm_io::guard::error_chain(&e)))?;
    let card_path = dir.join(card_file);
    let json = serde_json::to_vec_pretty(card).map_err(|e| file_err(&card_path, e))?;
    medvlm_io::atomic::write_atomic(&card_path, &json)
        .map_err(|e| file_err(&card_path, medvlm_io::guard::error_chain(&e)))
}

/// Reads a head artefact's tensors (see [`save_head_artefact`]) into `varmap`, whose
/// variables the freshly built head has declared (each must be in the file), and returns
/// the classes' text embeddings `[n_classes, E]` on the CPU.
pub(crate) fn load_head_artefact(
    dir: &Path,
    head_file: &str,
    varmap: &VarMap,
    n_classes: usize,
    device: &Device,
) -> Result<Tensor> {
    let head_path = dir.join(head_file);
    let mut tensors =
        candle_core::safetensors::load(&head_path, device).map_err(|e| file_err(&head_path, e))?;
    let class_text = tensors
        .remove(CLASS_TEXT_KEY)
        .ok_or_else(|| file_err(&head_path, "no class_text tensor"))?
        .to_device(&Device::Cpu)?;
    if class_text.dim(0)? != n_classes {
        return Err(file_err(
            &head_path,
            format!(
                "{} class embeddings for {n_classes} classes in the card",
                class_text.dim(0)?
            ),
        ));
    }
    let data = varmap
        .data()
        .lock()
        .map_err(|_| SegPipelineError::Invalid("poisoned varmap".into()))?;
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| file_err(&head_path, format!("no tensor `{name}`")))?;
        var.set(t)
            .map_err(|e| file_err(&head_path, format!("tensor `{name}`: {e}")))?;
    }
    Ok(class_text)
}

impl Segmenter {
    /// Writes `dir/head.safetensors` (the head's parameters and the classes' text embeddings)
    /// and then `dir/segmenter.json` (the card), each atomically (temporary file + rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if let Some(lora) = &self.card.lora {
            // Before the card, which is written last: a folder with a card is complete.
            save_lora_adapters(self.model.model.as_ref(), &lora.spec(), &dir.join(LORA_DIR))?;
        }
        if let Some(a) = &self.card.adapter {
            save_bottleneck_adapters(self.model.model.as_ref(), &a.spec(), &dir.join(ADAPTER_DIR))?;
        }
        save_head_artefact(
            dir,
            HEAD_FILE,
            CARD_FILE,
            &self.varmap,
            &self.class_text,
            &self.card,
        )
    }

    /// Reads a segmenter folder's card.
    pub fn read_card(dir: &Path) -> Result<SegCard> {
        read_json_card(
            dir,
            CARD_FILE,
            CARD_FORMAT,
            "segmenter",
            |c: &SegCard| c.format.as_str(),
            file_err,
        )
    }

    /// Loads a segmenter folder with its model: `model` when given (a spec), else the card's
    /// spec. Returns it and a warning when the model's fingerprint differs from the card's.
    pub fn load(
        dir: &Path,
        model: Option<&str>,
        device: &Device,
    ) -> Result<(Self, Option<String>)> {
        let card = Self::read_card(dir)?;
        let spec = model.unwrap_or(&card.model_spec).to_string();
        let opts = medvlm_models::LoadOptions {
            device: device.clone(),
            ..Default::default()
        };
        let m = medvlm_models::load_model(&spec, &opts)?;
        Self::with_model(dir, card, m, &spec, device)
    }

    /// [`Self::load`] with a model already loaded (`spec` is used for the fingerprint).
    pub fn with_model(
        dir: &Path,
        card: SegCard,
        mut m: LoadedModel,
        spec: &str,
        device: &Device,
    ) -> Result<(Self, Option<String>)> {
        let varmap = VarMap::new();
        let head = TextSegHead::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            &card.head,
        )?;
        let class_text = load_head_artefact(dir, HEAD_FILE, &varmap, card.classes.len(), device)?;
        let fp = model_fingerprint(spec, &m);
        let warning = (fp != card.model_fingerprint).then(|| {
            format!(
                "the model `{spec}` differs from the one the segmenter was trained on (`{}`; fingerprints differ)",
                card.model_spec
            )
        });
        if m.model.image_size() != card.head.image_size {
            return Err(SegPipelineError::Invalid(format!(
                "the model's input size {} differs from the segmenter's {}",
                m.model.image_size(),
                card.head.image_size
            )));
        }
        check_layers_for_model(&card.head.layers, &m).map_err(|e| {
            file_err(
                &dir.join(CARD_FILE),
                format!("the segmenter's image-tower layers do not fit the model `{spec}`: {e}"),
            )
        })?;
        if card.lora.is_some() {
            let lora_dir = dir.join(LORA_DIR);
            load_lora_adapters(m.model.as_mut(), &lora_dir, &VarMap::new()).map_err(|e| {
                file_err(
                    &lora_dir,
                    format!("the segmenter's image-tower LoRA adapters do not load onto the model `{spec}`: {e}"),
                )
            })?;
        }
        if card.adapter.is_some() {
            let adapter_dir = dir.join(ADAPTER_DIR);
            load_bottleneck_adapters(m.model.as_mut(), &adapter_dir, &VarMap::new()).map_err(
                |e| {
                    file_err(
                        &adapter_dir,
                        format!("the segmenter's image-tower bottleneck adapters do not load onto the model `{spec}`: {e}"),
                    )
                },
            )?;
        }
        Ok((
            Self {
                card,
                head,
                varmap,
                class_text,
                model: m,
            },
            warning,
        ))
    }

    /// The text embedding of a prompt: a class's stored embedding when the prompt is its name
    /// or its label (when only one class has that label), otherwise the prompt embedded by
    /// the model (the head was trained on the classes' embeddings; free text is best
    /// effort). Returns the embedding and the class name used, if any.
    pub fn prompt_embedding(
        &self,
        prompt: &str,
        device: &Device,
    ) -> Result<(Tensor, Option<String>)> {
        if let Some(i) = class_named(&self.card.classes, prompt) {
            return Ok((
                self.class_text.get(i)?,
                Some(self.card.classes[i].name.clone()),
            ));
        }
        let t = prompt_embeddings(&self.model, &[vec![prompt.to_string()]], device)?;
        Ok((t.get(0)?, None))
    }

    /// Masks (0/1, `rows x cols` of each plane) of `planes` for one text embedding.
    pub fn segment_planes(
        &self,
        planes: &[Plane],
        text: &Tensor,
        device: &Device,
    ) -> Result<Vec<Vec<u8>>> {
        let size = self.card.head.image_size;
        let pre = seg_preprocess(&self.model, size);
        let mut out = Vec::with_capacity(planes.len());
        for chunk in planes.chunks(32) {
            let mut pixels = Vec::new();
            let mut greys = Vec::new();
            for p in chunk {
                let prep = prepare(&pre, p, size, Path::new("<plane>"))?;
                pixels.push(prep.pixels);
                greys.push(prep.grey);
            }
            let px = pre.batch(&pixels, device)?;
            let (patches, _) =
                encode_patches_with_layers(&self.model, &px, &self.card.head.layers)?;
            let samples: Vec<SegSample> = greys
                .into_iter()
                .enumerate()
                .map(|(i, g)| {
                    Ok(SegSample {
                        patches: patches.get(i)?,
                        text: text.clone(),
                        grey: Tensor::from_vec(g, (1, size, size), &Device::Cpu)?,
                        mask: Tensor::zeros((1, size, size), DType::F32, &Device::Cpu)?,
                    })
                })
                .collect::<Result<_>>()?;
            for (m, p) in predict_masks(&self.head, &samples)?.into_iter().zip(chunk) {
                let v: Vec<u8> = m
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| u8::from(x > 0.5))
                    .collect();
                out.push(resize_mask(&v, (size, size), (p.rows, p.cols)));
            }
        }
        Ok(out)
    }
}

/// Loads a training manifest and a model, trains, saves the artefact to `out`, and, with
/// `val`, evaluates the saved segmenter on that manifest (every record).
pub fn train_and_save(
    manifest: &Path,
    val: Option<&Path>,
    opts: &TrainOptions,
    out: &Path,
    device: &Device,
) -> Result<(SegCard, Option<SegEvaluation>)> {
    let task = SegTask::from_manifest(manifest, opts.split.as_deref())?;
    // Read the validation manifest before the long part, so a bad one fails fast.
    let val_task = val.map(|v| SegTask::from_manifest(v, None)).transpose()?;
    let lopts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let m = medvlm_models::load_model(&opts.model_spec, &lopts)?;
    let trained = train_segmenter(m, &task, opts, device)?;
    trained.segmenter.save(out)?;
    let eval = val_task
        .map(|t| trained.segmenter.evaluate(&t, device))
        .transpose()?;
    Ok((trained.segmenter.card, eval))
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

/// Predictions on absent findings (empty ground truth), where Dice is undefined.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AbsentStats {
    /// Absent (image, class) pairs.
    pub n: usize,
    /// Of them, predicted empty (the right answer).
    pub n_empty_predictions: usize,
    /// Mean predicted area as a fraction of the image.
    pub mean_predicted_fraction: f64,
}

/// One method's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodEval {
    /// Over the present findings, per class (`modality/label`), macro-averaged over classes.
    pub findings: SegmentationSummary,
    /// Per modality (`-` when none is given), per class within it.
    pub per_modality: BTreeMap<String, SegmentationSummary>,
    /// Absent findings.
    pub absent: AbsentStats,
    /// Absent findings per modality.
    pub absent_per_modality: BTreeMap<String, AbsentStats>,
}

/// The evaluation of a segmenter on a task: the head and the similarity baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegEvaluation {
    /// The manifest evaluated.
    pub manifest: String,
    /// Images.
    pub n_images: usize,
    /// Present (image, class) pairs: the cases of the Dice/IoU/HD95 tables.
    pub n_present: usize,
    /// Absent pairs.
    pub n_absent: usize,
    /// Findings not evaluated because the segmenter has no class for their label, as
    /// `file: label` (counted, not hidden).
    pub skipped_findings: Vec<String>,
    /// Metric resolution (the model's input size).
    pub image_size: usize,
    /// The head's sigmoid threshold.
    pub head_threshold: f32,
    /// The trained head.
    pub head: MethodEval,
    /// The training-free baseline (`None` when the tower has no projected patch tokens).
    pub baseline: Option<MethodEval>,
}

struct Scored {
    class: usize,
    modality: String,
    present: bool,
    pred: Vec<u8>,
    gt: Vec<u8>,
}

fn method_eval(scored: &[Scored], classes: &[SegClass], size: usize) -> Result<MethodEval> {
    fn case<'a>(s: &'a Scored, classes: &'a [SegClass], size: usize) -> SegmentationCase<'a, u8> {
        SegmentationCase {
            label: &classes[s.class].name,
            pred: &s.pred,
            gt: &s.gt,
            shape: (size, size),
            spacing: None,
        }
    }
    let present: Vec<&Scored> = scored.iter().filter(|s| s.present).collect();
    if present.is_empty() {
        return Err(SegPipelineError::Invalid(
            "no present finding of a known class to evaluate".into(),
        ));
    }
    let cases: Vec<SegmentationCase<'_, u8>> =
        present.iter().map(|s| case(s, classes, size)).collect();
    let findings = SegmentationSummary::from_cases(&cases)?;
    let mut per_modality = BTreeMap::new();
    let modalities: std::collections::BTreeSet<&str> =
        scored.iter().map(|s| s.modality.as_str()).collect();
    let absent_stats = |it: &mut dyn Iterator<Item = &Scored>| {
        let mut a = AbsentStats::default();
        let mut frac = 0.0;
        for s in it {
            a.n += 1;
            let area = s.pred.iter().filter(|&&v| v > 0).count();
            a.n_empty_predictions += usize::from(area == 0);
            frac += area as f64 / s.pred.len() as f64;
        }
        a.mean_predicted_fraction = if a.n > 0 { frac / a.n as f64 } else { 0.0 };
        a
    };
    let mut absent_per_modality = BTreeMap::new();
    for m in modalities {
        let cases: Vec<SegmentationCase<'_, u8>> = present
            .iter()
            .filter(|s| s.modality == m)
            .map(|s| case(s, classes, size))
            .collect();
        if !cases.is_empty() {
            per_modality.insert(m.to_string(), SegmentationSummary::from_cases(&cases)?);
        }
        absent_per_modality.insert(
            m.to_string(),
            absent_stats(&mut scored.iter().filter(|s| !s.present && s.modality == m)),
        );
    }
    Ok(MethodEval {
        findings,
        per_modality,
        absent: absent_stats(&mut scored.iter().filter(|s| !s.present)),
        absent_per_modality,
    })
}

impl Segmenter {
    /// Evaluates the head and the baseline on every (image, class of its modality) pair of
    /// `task` (see the module docs for how present and absent findings are counted).
    pub fn evaluate(&self, task: &SegTask, device: &Device) -> Result<SegEvaluation> {
        // The training-free baseline reads the tower as published, without the adapters
        // trained for the head.
        let (images, _) = load_images_for_head(
            &self.model,
            task,
            &self.card.head.layers,
            HeadLoading {
                frozen_projection: self.card.tower_tuned(),
                ..Default::default()
            },
            None,
            device,
        )?;
        let classes = &self.card.classes;
        let size = self.card.head.image_size;
        let (prs, unknown) = pairs(&images, classes);
        let mut head_scored = Vec::with_capacity(prs.len());
        let mut base_scored = Vec::with_capacity(prs.len());
        let has_baseline = !self.card.baseline_thresholds.is_empty()
            && images.iter().all(|i| i.projected.is_some());
        for chunk in prs.chunks(64) {
            let samples: Vec<SegSample> = chunk
                .iter()
                .map(|p| {
                    sample(
                        &images[p.image],
                        &classes[p.class],
                        &self.class_text.get(p.class)?,
                        size,
                    )
                })
                .collect::<Result<_>>()?;
            let preds = predict_masks(&self.head, &samples)?;
            for (p, pred) in chunk.iter().zip(preds) {
                let img = &images[p.image];
                let cls = &classes[p.class];
                let gt = target(img, cls, size);
                let modality = img.modality.clone().unwrap_or_else(|| "-".into());
                let pred: Vec<u8> = pred
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| u8::from(x > 0.5))
                    .collect();
                if has_baseline {
                    let thr = self
                        .card
                        .baseline_thresholds
                        .get(&cls.name)
                        .copied()
                        .unwrap_or(f32::INFINITY);
                    let proj = img.projected.as_ref().ok_or_else(|| {
                        SegPipelineError::Invalid("no projected patch tokens".into())
                    })?;
                    let map = similarity_masks(
                        &proj.unsqueeze(0)?,
                        &self.class_text.get(p.class)?.unsqueeze(0)?,
                        self.card.head.grid,
                        size,
                        thr,
                    )?;
                    let bp: Vec<u8> = map
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(|x| u8::from(x > 0.5))
                        .collect();
                    base_scored.push(Scored {
                        class: p.class,
                        modality: modality.clone(),
                        present: p.present,
                        pred: bp,
                        gt: gt.clone(),
                    });
                }
                head_scored.push(Scored {
                    class: p.class,
                    modality,
                    present: p.present,
                    pred,
                    gt,
                });
            }
        }
        Ok(SegEvaluation {
            manifest: task.manifest.display().to_string(),
            n_images: images.len(),
            n_present: prs.iter().filter(|p| p.present).count(),
            n_absent: prs.iter().filter(|p| !p.present).count(),
            skipped_findings: unknown
                .into_iter()
                .map(|(p, l)| format!("{}: {l}", p.display()))
                .collect(),
            image_size: size,
            head_threshold: self.card.head.threshold,
            head: method_eval(&head_scored, classes, size)?,
            baseline: if has_baseline {
                Some(method_eval(&base_scored, classes, size)?)
            } else {
                None
            },
        })
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

impl SegEvaluation {
    /// A plain-text table: per class and per modality, head | baseline Dice, IoU, HD95, then
    /// the absent findings.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{}: {} images, {} present findings (Dice/IoU/HD95 over these), {} absent (image, class) pairs; metrics at {}x{} px, HD95 in pixels (MONAI)\n",
            self.manifest, self.n_images, self.n_present, self.n_absent, self.image_size, self.image_size
        ));
        if !self.skipped_findings.is_empty() {
            s.push_str(&format!(
                "skipped {} findings whose label the segmenter does not know (first: {})\n",
                self.skipped_findings.len(),
                self.skipped_findings[0]
            ));
        }
        s.push_str(&format!(
            "{:<28} {:>5} | {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>8}\n",
            "finding", "n", "Dice", "IoU", "HD95", "Dice", "IoU", "HD95", "no HD95"
        ));
        s.push_str(&format!(
            "{:<28} {:>5} | {:^20} | {:^20} |\n",
            "", "", "head", "similarity baseline"
        ));
        let row = |name: &str,
                   h: &medvlm_eval::segmentation::LabelStats,
                   b: Option<&medvlm_eval::segmentation::LabelStats>| {
            format!(
                "{:<28} {:>5} | {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>8}\n",
                name,
                h.n,
                fmt_opt(h.mean_dice, 3),
                fmt_opt(h.mean_iou, 3),
                fmt_opt(h.mean_hd95, 1),
                fmt_opt(b.and_then(|b| b.mean_dice), 3),
                fmt_opt(b.and_then(|b| b.mean_iou), 3),
                fmt_opt(b.and_then(|b| b.mean_hd95), 1),
                h.n_undefined_hd95
            )
        };
        for (name, h) in &self.head.findings.per_label {
            let b = self
                .baseline
                .as_ref()
                .and_then(|b| b.findings.per_label.get(name));
            s.push_str(&row(name, h, b));
        }
        let summary_row = |name: &str, h: &SegmentationSummary, b: Option<&SegmentationSummary>| {
            format!(
                "{:<28} {:>5} | {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} |\n",
                name,
                h.n_cases,
                fmt_opt(h.mean_dice, 3),
                fmt_opt(h.mean_iou, 3),
                fmt_opt(h.mean_hd95, 1),
                fmt_opt(b.and_then(|b| b.mean_dice), 3),
                fmt_opt(b.and_then(|b| b.mean_iou), 3),
                fmt_opt(b.and_then(|b| b.mean_hd95), 1),
            )
        };
        for (m, h) in &self.head.per_modality {
            let b = self.baseline.as_ref().and_then(|b| b.per_modality.get(m));
            s.push_str(&summary_row(&format!("[{m}] macro"), h, b));
        }
        s.push_str(&summary_row(
            "all findings, macro",
            &self.head.findings,
            self.baseline.as_ref().map(|b| &b.findings),
        ));
        let absent = |a: &AbsentStats| {
            format!(
                "{}/{} empty, mean area {:.3}",
                a.n_empty_predictions, a.n, a.mean_predicted_fraction
            )
        };
        s.push_str(&format!(
            "absent findings: head {}; baseline {}\n",
            absent(&self.head.absent),
            self.baseline
                .as_ref()
                .map(|b| absent(&b.absent))
                .unwrap_or_else(|| "n/a (no projected patch tokens)".into())
        ));
        s
    }
}

/// Loads a segmenter and evaluates it on a manifest (optionally one split).
pub fn evaluate_manifest(
    segmenter: &Path,
    model: Option<&str>,
    manifest: &Path,
    split: Option<&str>,
    device: &Device,
) -> Result<(SegEvaluation, Option<String>)> {
    let (seg, warning) = Segmenter::load(segmenter, model, device)?;
    let task = SegTask::from_manifest(manifest, split)?;
    Ok((seg.evaluate(&task, device)?, warning))
}

// ---------------------------------------------------------------------------------------
// Prediction on files
// ---------------------------------------------------------------------------------------

/// What [`Segmenter::predict_file`] wrote for one input.
#[derive(Debug, Clone, Serialize)]
pub struct PredictedFile {
    /// The input.
    pub input: PathBuf,
    /// The PNG mask (255 inside; for a volume, the slice with the largest predicted area).
    pub mask_png: PathBuf,
    /// The PNG overlay (the image with the mask in red).
    pub overlay_png: PathBuf,
    /// The NIfTI mask (NIfTI inputs only), with the input's affine and shape.
    pub mask_nifti: Option<PathBuf>,
    /// Predicted pixels (voxels).
    pub area: usize,
    /// Slices segmented (1 for a 2-D image).
    pub slices: usize,
}

/// Refuses inputs whose output files would share a name (`<stem>_...`: the file name without
/// its image extension), such as `a.dcm` and `a.nii` from two folders: the second would
/// silently overwrite the first's outputs. The error names both files.
pub(crate) fn check_distinct_stems(inputs: &[PathBuf]) -> Result<()> {
    let mut seen: HashMap<String, &PathBuf> = HashMap::new();
    for p in inputs {
        if let Some(first) = seen.insert(stem_of(p), p) {
            return Err(SegPipelineError::Invalid(format!(
                "{} and {} would write outputs of the same name (`{}_...`); rename one or \
                 predict them into different folders",
                first.display(),
                p.display(),
                stem_of(p)
            )));
        }
    }
    Ok(())
}

pub(crate) fn stem_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "image".into());
    for ext in [
        ".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".npy",
    ] {
        if name.to_ascii_lowercase().ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    name
}

/// An overlay: the plane in grey (or colour) with the mask blended in red (alpha 0.45).
pub fn overlay(plane: &Plane, mask: &[u8]) -> Plane {
    let n = plane.rows * plane.cols;
    let mut data = Vec::with_capacity(n * 3);
    for (i, &inside) in mask.iter().enumerate().take(n) {
        let rgb = if plane.channels == 3 {
            [
                plane.data[3 * i],
                plane.data[3 * i + 1],
                plane.data[3 * i + 2],
            ]
        } else {
            [plane.data[i]; 3]
        };
        let a = if inside > 0 { 0.45 } else { 0.0 };
        data.push(rgb[0] * (1.0 - a) + a);
        data.push(rgb[1] * (1.0 - a));
        data.push(rgb[2] * (1.0 - a));
    }
    Plane {
        rows: plane.rows,
        cols: plane.cols,
        channels: 3,
        data,
    }
}

pub(crate) fn write_png(path: &Path, plane: &Plane) -> Result<()> {
    medvlm_io::raster::write_png(path, plane)
        .map_err(|e| file_err(path, medvlm_io::guard::error_chain(&e)))
}

fn mask_plane(mask: &[u8], rows: usize, cols: usize) -> Plane {
    Plane {
        rows,
        cols,
        channels: 1,
        data: mask.iter().map(|&v| f32::from(v)).collect(),
    }
}

/// The slices of a 2-D or 3-D NIfTI volume across one axis, as the task heads read them.
pub struct VolumePlanes {
    /// One plane per slice; plane rows and columns are the two remaining axes in order.
    pub planes: Vec<Plane>,
    /// The axis cut across: the one asked for, or for a 2-D volume (one of a single slice)
    /// its unit axis.
    pub axis: usize,
    /// The first three dimensions (missing ones 1).
    pub dims3: [usize; 3],
}

/// Writes the `rows x cols` values of slice `k` across `axis` into a volume of `dims3`
/// (index `(x ny + y) nz + z`, the layout `medvlm_io::volume::write_nifti1` reads); the
/// slice's rows and columns are the two remaining axes in order, as [`volume_planes`] cuts.
pub fn scatter_slice(
    volume: &mut [f32],
    dims3: [usize; 3],
    axis: usize,
    k: usize,
    (rows, cols): (usize, usize),
    values: &[f32],
) {
    let (ny, nz) = (dims3[1], dims3[2]);
    for r in 0..rows {
        for c in 0..cols {
            let (x, y, z) = match axis {
                0 => (k, r, c),
                1 => (r, k, c),
                _ => (r, c, k),
            };
            volume[(x * ny + y) * nz + z] = values[r * cols + c];
        }
    }
}

/// Cuts a NIfTI volume into its slices across `axis` (0, 1 or 2; NIfTI axes x, y, z). 4-D
/// volumes (a fourth dimension above 1) are refused.
pub fn volume_planes(input: &Path, img: &medvlm_io::MedImage, axis: usize) -> Result<VolumePlanes> {
    if axis > 2 {
        return Err(SegPipelineError::Invalid(format!(
            "axis {axis} is not 0, 1 or 2"
        )));
    }
    let dims = &img.shape;
    if dims.len() > 3 && dims[3..].iter().any(|&d| d > 1) {
        return Err(SegPipelineError::Invalid(format!(
            "{}: a {}-D volume ({dims:?}); only 2-D and 3-D NIfTI are read slice by slice",
            input.display(),
            dims.len()
        )));
    }
    let mut d3 = [1usize; 3];
    for (i, d) in dims.iter().take(3).enumerate() {
        d3[i] = *d;
    }
    // A 2-D NIfTI (or one of a single slice) is cut across its unit axis.
    let axis = if d3.iter().all(|&d| d > 1) {
        axis
    } else {
        (0..3).rev().find(|&a| d3[a] == 1).unwrap_or(axis)
    };
    let planes = (0..d3[axis])
        .map(|k| {
            let sel = PlaneSelect {
                axis: Some(axis),
                slice: Some(k),
                ..Default::default()
            };
            plane_of(input, img, &sel)
        })
        .collect::<Result<_>>()?;
    Ok(VolumePlanes {
        planes,
        axis,
        dims3: d3,
    })
}

impl Segmenter {
    /// Segments one file for one text embedding and writes `<stem>_mask.png` and
    /// `<stem>_overlay.png` to `out`; for NIfTI input also `<stem>_mask.nii.gz`, float32
    /// 0/1 with the input's affine and shape. A 3-D volume is segmented slice by slice
    /// across `axis` (0, 1 or 2; NIfTI axes x, y, z) and reassembled; its PNGs show the
    /// slice with the largest predicted area. 4-D volumes are refused.
    pub fn predict_file(
        &self,
        input: &Path,
        text: &Tensor,
        axis: usize,
        out: &Path,
        device: &Device,
    ) -> Result<PredictedFile> {
        if axis > 2 {
            return Err(SegPipelineError::Invalid(format!(
                "axis {axis} is not 0, 1 or 2"
            )));
        }
        std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
        let img = medvlm_io::load_any(input).map_err(|e| SegPipelineError::Image {
            path: input.to_path_buf(),
            reason: medvlm_io::guard::error_chain(&e),
        })?;
        let stem = stem_of(input);
        let mask_png = out.join(format!("{stem}_mask.png"));
        let overlay_png = out.join(format!("{stem}_overlay.png"));
        let is_nifti = matches!(img.format, SourceFormat::Nifti1 | SourceFormat::Nifti2);
        if !is_nifti {
            let plane = plane_of(input, &img, &PlaneSelect::default())?;
            let mask = self
                .segment_planes(std::slice::from_ref(&plane), text, device)?
                .remove(0);
            write_png(&mask_png, &mask_plane(&mask, plane.rows, plane.cols))?;
            write_png(&overlay_png, &overlay(&plane, &mask))?;
            return Ok(PredictedFile {
                input: input.to_path_buf(),
                mask_png,
                overlay_png,
                mask_nifti: None,
                area: mask.iter().map(|&v| v as usize).sum(),
                slices: 1,
            });
        }
        let VolumePlanes {
            planes,
            axis,
            dims3: d3,
        } = volume_planes(input, &img, axis)?;
        let dims = img.shape.clone();
        let n_slices = d3[axis];
        let masks = self.segment_planes(&planes, text, device)?;
        let mut volume = vec![0f32; d3.iter().product()];
        for (k, (mask, plane)) in masks.iter().zip(&planes).enumerate() {
            let values: Vec<f32> = mask.iter().map(|&v| f32::from(v)).collect();
            scatter_slice(&mut volume, d3, axis, k, (plane.rows, plane.cols), &values);
        }
        let best = masks
            .iter()
            .enumerate()
            .max_by_key(|(k, m)| (m.iter().map(|&v| v as usize).sum::<usize>(), usize::MAX - k))
            .map(|(k, _)| k)
            .unwrap_or(0);
        let p = &planes[best];
        write_png(&mask_png, &mask_plane(&masks[best], p.rows, p.cols))?;
        write_png(&overlay_png, &overlay(p, &masks[best]))?;
        let affine = img
            .affine
            .unwrap_or_else(|| medvlm_io::volume::affine_from_spacing([1.0, 1.0, 1.0]));
        let nii = out.join(format!("{stem}_mask.nii.gz"));
        medvlm_io::volume::write_nifti1(&nii, &volume, &dims, &affine)
            .map_err(|e| file_err(&nii, medvlm_io::guard::error_chain(&e)))?;
        Ok(PredictedFile {
            input: input.to_path_buf(),
            mask_png,
            overlay_png,
            mask_nifti: Some(nii),
            area: volume.iter().filter(|&&v| v > 0.0).count(),
            slices: n_slices,
        })
    }
}

/// Loads a segmenter and segments `inputs` for `prompt`, writing into `out`. Returns the
/// files written, the class the prompt matched (if any) and the model warning (if any).
pub fn predict_files(
    segmenter: &Path,
    model: Option<&str>,
    prompt: &str,
    inputs: &[PathBuf],
    axis: usize,
    out: &Path,
    device: &Device,
) -> Result<(Vec<PredictedFile>, Option<String>, Option<String>)> {
    check_distinct_stems(inputs)?;
    let (seg, warning) = Segmenter::load(segmenter, model, device)?;
    let (text, class) = seg.prompt_embedding(prompt, device)?;
    let files = inputs
        .iter()
        .map(|p| seg.predict_file(p, &text, axis, out, device))
        .collect::<Result<Vec<_>>>()?;
    Ok((files, class, warning))
}

#[cfg(test)]
mod stem_tests {
    use super::*;

    /// Two inputs whose outputs would share a name (the same stem from two folders, or a
    /// study's DICOM and NIfTI copies) are refused, naming both; distinct stems pass.
    #[test]
    fn inputs_with_the_same_output_name_are_refused() {
        let ok = [PathBuf::from("a/x.png"), PathBuf::from("a/y.png")];
        assert!(check_distinct_stems(&ok).is_ok());
        for pair in [
            ["a/x.png", "b/x.png"],
            ["s/brain_5.dcm", "s/brain_5.nii.gz"],
        ] {
            let inputs: Vec<PathBuf> = pair.iter().map(PathBuf::from).collect();
            let msg = check_distinct_stems(&inputs).unwrap_err().to_string();
            assert!(msg.contains(pair[0]) && msg.contains(pair[1]), "{msg}");
        }
    }
}
