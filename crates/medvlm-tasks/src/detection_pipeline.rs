//! Detection and phrase grounding end to end (issue #16): a task read from a manifest of
//! images and per-finding boxes, frozen patch tokens and prompt embeddings from a loaded
//! model (the segmentation pipeline's readers: [`SegTask::from_manifest`], [`load_images`],
//! [`prompt_embeddings`]), the OWL-ViT-style [`DetectionHead`] trained on them, two
//! baselines, evaluation with `medvlm_eval::detection` per class and per modality, and the
//! trained head saved as an artefact folder ([`Detector`]) that boxes what a prompt names in
//! image files.
//!
//! # Data
//!
//! A manifest record (medvlm-io format) is one image; its `boxes` `[{label, x0, y0, x1, y1}]`
//! are its findings, in the image's pixels (`x` along columns, `y` along rows, `x1`/`y1`
//! exclusive edges, as COCO's `[x, y, x + w, y + h]`). A box that is not finite, is empty
//! (`x1 <= x0` or `y1 <= y0`) or lies outside the image is an error naming the image and the
//! box. Classes are (modality, label) pairs with at least one box, named and prompted as in
//! the segmentation pipeline ([`class_name`], [`default_prompts`]).
//!
//! Images are resized (no crop) to the model's input size `S`; boxes are kept as fractions of
//! the image and metrics are computed in pixels at `S` (the phantoms' own resolution when
//! they are generated at the model's size).
//!
//! # Samples, grounding and detection
//!
//! Every (image, class of the image's modality) pair is a sample: *present* when the image
//! has boxes of that label, *absent* otherwise. Training uses every present pair and one
//! absent pair per image (seeded), as the segmentation head. Evaluation:
//!
//! - **Grounding** (MedRPG's protocol): each true box is a phrase (the class prompt) and each
//!   method gives one box for it, for the head the box of the token scoring highest for the
//!   class's text embedding ([`crate::detection::ground`]). Acc@0.5 (IoU >= 0.5) and mIoU,
//!   *micro* over all phrases and *macro* as the mean over classes; per modality the same.
//! - **Detection**: over every (image, class) pair, present or absent, each token's box with
//!   its score after non-maximum suppression at IoU 0.5 (at most 100), against the true
//!   boxes: COCO mAP@[.5:.95] and mAP@.5, *macro* over classes (COCO's average) and *micro*
//!   (all classes' detections ranked together), per modality too.
//!
//! Baselines: **heatmap** (zero-shot; only for towers whose patch tokens project into the
//! text space): the patch-text cosine map of the class embedding, thresholded, and the box
//! of the largest 4-connected region of cells at or above the threshold (its highest cosine
//! is the detection score; one detection per pair). One threshold per class, chosen on the
//! training split among 41 values evenly spaced between the smallest and largest cosine seen
//! there, maximising the mean IoU of its boxes with the class's true boxes. **Centre**
//! (grounding only, it has no score): a box centred in the image with the class's mean
//! training box width and height.
//!
//! # Defaults
//!
//! Head: [`DetHeadConfig::new`] (width 64, 1500 AdamW steps of batch 64, lr 1e-2, weight
//! decay 1e-4; loss weights focal 2, L1 5, GIoU 2, alpha 0.25, gamma 2; NMS IoU 0.5, 100
//! detections per pair).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use medvlm_eval::detection::{
    box_iou, coco_average_precision, grounding_accuracy, DetectedBox, DetectionSummary,
    GroundTruthBox, GroundingSummary,
};
use medvlm_io::{Plane, PlaneSelect};
use medvlm_models::LoadedModel;

use crate::card::read_json_card;
use crate::detection::{
    centre_box, detect, ground, heatmap_box, token_predictions, train_head, Bbox, DetError,
    DetHeadConfig, DetSample, DetectionHead,
};
use crate::segmentation_pipeline::{
    class_name, default_prompts, encode_patches, load_head_artefact, load_images,
    model_fingerprint, plane_of, prepare, prompt_embeddings, save_head_artefact, seg_preprocess,
    stem_of, volume_planes, write_png, LoadedImage, SegClass, SegPipelineError, SegTask,
    VolumePlanes,
};

/// Errors of the detection pipeline; each names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum DetPipelineError {
    /// A box of the manifest that cannot be a box of its image.
    #[error("{}: box `{}` [{}, {}, {}, {}] of {} ({}x{} px): {}", .0.manifest.display(), .0.label, .0.x0, .0.y0, .0.x1, .0.y1, .0.image.display(), .0.rows, .0.cols, .0.reason)]
    Box(Box<BadBox>),
    /// A prompt that is not a class of the detector.
    #[error("prompt `{prompt}` is not a class of the detector (it had no boxes in the training manifest {train_manifest}); classes: {classes}; pass --free-text to ground any text (best effort)")]
    UnknownClass {
        prompt: String,
        train_manifest: String,
        classes: String,
    },
    /// Reading the task, the images or the model failed (shared with segmentation).
    #[error(transparent)]
    Seg(Box<SegPipelineError>),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// The head failed.
    #[error(transparent)]
    Head(#[from] DetError),
    /// A metric failed.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file that cannot be written.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// A manifest box that cannot be a box of its image (rows and cols are 0 when the image has
/// not been read yet).
#[derive(Debug, Clone, PartialEq)]
pub struct BadBox {
    /// The manifest.
    pub manifest: PathBuf,
    /// The image the box belongs to.
    pub image: PathBuf,
    /// The box's label.
    pub label: String,
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Right edge (exclusive).
    pub x1: f32,
    /// Bottom edge (exclusive).
    pub y1: f32,
    /// The image's rows.
    pub rows: usize,
    /// The image's columns.
    pub cols: usize,
    /// What is wrong.
    pub reason: String,
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, DetPipelineError>;

impl From<SegPipelineError> for DetPipelineError {
    fn from(e: SegPipelineError) -> Self {
        Self::Seg(Box::new(e))
    }
}

fn file_err(path: &Path, reason: impl ToString) -> DetPipelineError {
    DetPipelineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------------------

/// Reads a detection task: [`SegTask::from_manifest`] (its records keep their `boxes`), with
/// each box checked to be finite and non-empty here (against the image's size once the
/// pixels are read, [`load_det_images`]).
pub fn read_task(manifest: &Path, split: Option<&str>) -> Result<SegTask> {
    let task = SegTask::from_manifest(manifest, split)?;
    for it in &task.items {
        for b in &it.boxes {
            let reason = if ![b.x0, b.y0, b.x1, b.y1].iter().all(|v| v.is_finite()) {
                Some("not finite")
            } else if b.x1 <= b.x0 || b.y1 <= b.y0 {
                Some("empty (needs x0 < x1 and y0 < y1)")
            } else {
                None
            };
            if let Some(r) = reason {
                return Err(box_err(&task, &it.image, b, (0, 0), r));
            }
        }
    }
    Ok(task)
}

fn box_err(
    task: &SegTask,
    image: &Path,
    b: &medvlm_io::BoundingBox,
    (rows, cols): (usize, usize),
    reason: &str,
) -> DetPipelineError {
    DetPipelineError::Box(Box::new(BadBox {
        manifest: task.manifest.clone(),
        image: image.to_path_buf(),
        label: b.label.clone(),
        x0: b.x0,
        y0: b.y0,
        x1: b.x1,
        y1: b.y1,
        rows,
        cols,
        reason: reason.into(),
    }))
}

/// The classes of a task: every (modality, label) with a box, sorted by name.
pub fn box_classes(task: &SegTask) -> Vec<SegClass> {
    let mut seen: BTreeMap<String, SegClass> = BTreeMap::new();
    for it in &task.items {
        for b in &it.boxes {
            let name = class_name(it.modality.as_deref(), &b.label);
            seen.entry(name.clone()).or_insert_with(|| SegClass {
                name,
                modality: it.modality.clone(),
                label: b.label.clone(),
                prompts: default_prompts(it.modality.as_deref(), &b.label),
            });
        }
    }
    seen.into_values().collect()
}

/// One image with its frozen features and its boxes.
pub struct DetImage {
    /// The image, its features (and masks, unused here).
    pub image: LoadedImage,
    /// True boxes `[x0, y0, x1, y1]` as fractions of the image, by label.
    pub boxes: BTreeMap<String, Vec<Bbox>>,
}

/// Reads the images of `task` with their frozen patch tokens ([`load_images`]) and their
/// boxes, each checked to lie inside its image (a box outside is an error naming it).
pub fn load_det_images(m: &LoadedModel, task: &SegTask, device: &Device) -> Result<Vec<DetImage>> {
    let images = load_images(m, task, device)?;
    let mut out = Vec::with_capacity(images.len());
    for (it, image) in task.items.iter().zip(images) {
        let (rows, cols) = image.shape;
        let mut boxes: BTreeMap<String, Vec<Bbox>> = BTreeMap::new();
        for b in &it.boxes {
            if b.x0 < 0.0 || b.y0 < 0.0 || b.x1 > cols as f32 || b.y1 > rows as f32 {
                return Err(box_err(
                    task,
                    &it.image,
                    b,
                    (rows, cols),
                    "outside the image",
                ));
            }
            boxes.entry(b.label.clone()).or_default().push([
                f64::from(b.x0) / cols as f64,
                f64::from(b.y0) / rows as f64,
                f64::from(b.x1) / cols as f64,
                f64::from(b.y1) / rows as f64,
            ]);
        }
        out.push(DetImage { image, boxes });
    }
    Ok(out)
}

/// An (image, class) pair and the class's true boxes in the image (empty: absent).
#[derive(Debug, Clone)]
pub struct DetPair {
    /// Index into the images.
    pub image: usize,
    /// Index into the classes.
    pub class: usize,
    /// True boxes (fractions).
    pub boxes: Vec<Bbox>,
}

/// Pairs of images with the classes of their modality, and the boxes that have no class, as
/// `(image file, label)`.
pub fn det_pairs(
    images: &[DetImage],
    classes: &[SegClass],
) -> (Vec<DetPair>, Vec<(PathBuf, String)>) {
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    for (i, img) in images.iter().enumerate() {
        for (c, cls) in classes.iter().enumerate() {
            if cls.modality != img.image.modality {
                continue;
            }
            out.push(DetPair {
                image: i,
                class: c,
                boxes: img.boxes.get(&cls.label).cloned().unwrap_or_default(),
            });
        }
        for (label, bs) in &img.boxes {
            if !classes
                .iter()
                .any(|c| c.modality == img.image.modality && &c.label == label)
            {
                unknown.extend(bs.iter().map(|_| (img.image.path.clone(), label.clone())));
            }
        }
    }
    (out, unknown)
}

/// The patch grid of `n` tokens: square, at least 2x2 (a tower whose "patch tokens" are a
/// single pooled vector has nothing to place a box with).
pub fn patch_grid(n: usize) -> Result<(usize, usize)> {
    let side = (n as f64).sqrt().round() as usize;
    if side * side != n {
        return Err(DetPipelineError::Invalid(format!(
            "the model gives {n} patch tokens, not a square grid: no spatial features to box with"
        )));
    }
    if side < 2 {
        return Err(DetPipelineError::Invalid(format!(
            "the model gives {n} patch token(s): no spatial features to box with (a grid of at least 2x2 is needed)"
        )));
    }
    Ok((side, side))
}

// ---------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------

/// Settings of [`train_detector`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Model spec (directory, `hf:ORG/NAME` or preset), recorded in the card.
    pub model_spec: String,
    /// Optimiser steps; `None`: the default of [`DetHeadConfig::new`] (1500).
    pub steps: Option<usize>,
    /// Batch; `None`: the default (64).
    pub batch: Option<usize>,
    /// Box MLP width; `None`: the default (64).
    pub width: Option<usize>,
    /// Learning rate; `None`: the default (1e-2).
    pub lr: Option<f64>,
    /// Seed of the head and of the absent pairs drawn.
    pub seed: u64,
    /// Split of the training manifest to use (`None`: every record).
    pub split: Option<String>,
}

/// The JSON card of a detector artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetCard {
    /// `medvlm-detector/1`.
    pub format: String,
    /// Head configuration.
    pub head: DetHeadConfig,
    /// The model's input size (metrics are in pixels at this size).
    pub image_size: usize,
    /// The model spec it was trained on.
    pub model_spec: String,
    /// The model family.
    pub model_family: String,
    /// Fingerprint of the model folder (as the segmenter's).
    pub model_fingerprint: String,
    /// The classes and their prompts, in the order of the stored text embeddings.
    pub classes: Vec<SegClass>,
    /// Mean true box `(width, height)` of each class on the training split, as fractions of
    /// the image (the centre baseline's box).
    pub mean_box_size: BTreeMap<String, [f64; 2]>,
    /// The heatmap baseline's threshold of each class (chosen on the training split); empty
    /// when the tower has no projected patch tokens.
    pub heatmap_thresholds: BTreeMap<String, f32>,
    /// The training manifest.
    pub train_manifest: String,
    /// Training images.
    pub n_train_images: usize,
    /// Training samples (present + absent pairs).
    pub n_train_samples: usize,
    /// Training boxes.
    pub n_train_boxes: usize,
    /// Mean loss of the last 10 steps.
    pub final_loss: f32,
}

/// Format tag of the card.
pub const CARD_FORMAT: &str = "medvlm-detector/1";
const CARD_FILE: &str = "detector.json";
const HEAD_FILE: &str = "head.safetensors";

/// A trained detector in memory (what the artefact folder holds).
pub struct Detector {
    /// The card.
    pub card: DetCard,
    /// The head.
    pub head: DetectionHead,
    /// The head's parameters.
    pub varmap: VarMap,
    /// The classes' text embeddings `[C, E]`.
    pub class_text: Tensor,
    /// The frozen model.
    pub model: LoadedModel,
}

/// What [`train_detector`] made.
pub struct TrainOutcome {
    /// The detector.
    pub detector: Detector,
    /// The head's total loss at each step.
    pub losses: Vec<f32>,
}

/// Trains a detector on `task` with the loaded model `m`: classes from the task's boxes,
/// frozen features, the head, and the baselines' settings.
pub fn train_detector(
    m: LoadedModel,
    task: &SegTask,
    opts: &TrainOptions,
    device: &Device,
) -> Result<TrainOutcome> {
    let classes = box_classes(task);
    if classes.is_empty() {
        return Err(DetPipelineError::Invalid(format!(
            "{}: no boxes, nothing to learn",
            task.manifest.display()
        )));
    }
    let images = load_det_images(&m, task, device)?;
    let prompts: Vec<Vec<String>> = classes.iter().map(|c| c.prompts.clone()).collect();
    let class_text = prompt_embeddings(&m, &prompts, device)?;
    let (n_tokens, feature_dim) = images[0].image.patches.dims2()?;
    let grid = patch_grid(n_tokens)?;
    let mut cfg = DetHeadConfig::new(feature_dim, class_text.dim(1)?, grid);
    cfg.seed = opts.seed;
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
    cfg.validate()?;
    let (all_pairs, _) = det_pairs(&images, &classes);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x00de_7ec7);
    let mut chosen: Vec<&DetPair> = all_pairs.iter().filter(|p| !p.boxes.is_empty()).collect();
    for i in 0..images.len() {
        let absent: Vec<&DetPair> = all_pairs
            .iter()
            .filter(|p| p.image == i && p.boxes.is_empty())
            .collect();
        if let Some(p) = absent.choose(&mut rng) {
            chosen.push(p);
        }
    }
    let samples: Vec<DetSample> = chosen
        .iter()
        .map(|p| sample(&images[p.image], &class_text, p))
        .collect::<Result<_>>()?;
    let trained = train_head(&cfg, &samples, device)?;
    let mut mean_box_size = BTreeMap::new();
    for (c, cls) in classes.iter().enumerate() {
        let bs: Vec<&Bbox> = all_pairs
            .iter()
            .filter(|p| p.class == c)
            .flat_map(|p| p.boxes.iter())
            .collect();
        if !bs.is_empty() {
            let n = bs.len() as f64;
            mean_box_size.insert(
                cls.name.clone(),
                [
                    bs.iter().map(|b| b[2] - b[0]).sum::<f64>() / n,
                    bs.iter().map(|b| b[3] - b[1]).sum::<f64>() / n,
                ],
            );
        }
    }
    let heatmap_thresholds =
        choose_heatmap_thresholds(&images, &all_pairs, &classes, &class_text, grid)?;
    let tail = &trained.losses[trained.losses.len().saturating_sub(10)..];
    let final_loss = tail.iter().map(|t| t.total).sum::<f32>() / tail.len().max(1) as f32;
    let card = DetCard {
        format: CARD_FORMAT.into(),
        head: cfg,
        image_size: m.model.image_size(),
        model_spec: opts.model_spec.clone(),
        model_family: m.family.to_string(),
        model_fingerprint: model_fingerprint(&opts.model_spec, &m),
        classes,
        mean_box_size,
        heatmap_thresholds,
        train_manifest: task.manifest.display().to_string(),
        n_train_images: images.len(),
        n_train_samples: samples.len(),
        n_train_boxes: all_pairs.iter().map(|p| p.boxes.len()).sum(),
        final_loss,
    };
    Ok(TrainOutcome {
        losses: trained.losses.iter().map(|t| t.total).collect(),
        detector: Detector {
            card,
            head: trained.head,
            varmap: trained.varmap,
            class_text,
            model: m,
        },
    })
}

fn sample(img: &DetImage, class_text: &Tensor, p: &DetPair) -> Result<DetSample> {
    Ok(DetSample {
        tokens: img.image.patches.clone(),
        text: class_text.get(p.class)?,
        boxes: p.boxes.clone(),
    })
}

/// Cosine of each patch (projected into the joint space) with a normalised text embedding.
fn patch_cosines(projected: &Tensor, text: &Tensor) -> Result<Vec<f32>> {
    let p = projected.broadcast_div(
        &projected
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?,
    )?;
    Ok(p.matmul(&text.unsqueeze(1)?)?.squeeze(1)?.to_vec1()?)
}

/// Per class, the heatmap threshold maximising the mean IoU of its boxes with the class's
/// true boxes on the training pairs (41 candidates between the smallest and largest cosine
/// seen); none when the tower has no projected patch tokens.
fn choose_heatmap_thresholds(
    images: &[DetImage],
    pairs: &[DetPair],
    classes: &[SegClass],
    class_text: &Tensor,
    grid: (usize, usize),
) -> Result<BTreeMap<String, f32>> {
    let mut out = BTreeMap::new();
    if images.iter().any(|i| i.image.projected.is_none()) {
        return Ok(out);
    }
    for (c, cls) in classes.iter().enumerate() {
        let text = class_text.get(c)?;
        let mut maps = Vec::new();
        for p in pairs.iter().filter(|p| p.class == c && !p.boxes.is_empty()) {
            if let Some(proj) = &images[p.image].image.projected {
                maps.push((patch_cosines(proj, &text)?, &p.boxes));
            }
        }
        if maps.is_empty() {
            continue;
        }
        let all = maps.iter().flat_map(|(s, _)| s.iter().copied());
        let (lo, hi) = all.fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let mut best = (f64::MIN, lo);
        for k in 0..=40 {
            let thr = lo + (hi - lo) * k as f32 / 40.0;
            let (mut sum, mut n) = (0.0, 0usize);
            for (s, bs) in &maps {
                let (pred, _) = heatmap_box(s, grid, thr)?;
                for b in bs.iter() {
                    sum += box_iou(&pred, b);
                    n += 1;
                }
            }
            let mean = sum / n.max(1) as f64;
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

impl Detector {
    /// Writes `dir/head.safetensors` (the head's parameters and the classes' text
    /// embeddings) and then `dir/detector.json` (the card), each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        Ok(save_head_artefact(
            dir,
            HEAD_FILE,
            CARD_FILE,
            &self.varmap,
            &self.class_text,
            &self.card,
        )?)
    }

    /// Reads a detector folder's card.
    pub fn read_card(dir: &Path) -> Result<DetCard> {
        read_json_card(
            dir,
            CARD_FILE,
            CARD_FORMAT,
            "detector",
            |c: &DetCard| c.format.as_str(),
            file_err,
        )
    }

    /// Loads a detector folder with its model: `model` when given (a spec), else the card's
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
        if m.model.image_size() != card.image_size {
            return Err(DetPipelineError::Invalid(format!(
                "the model's input size {} differs from the detector's {}",
                m.model.image_size(),
                card.image_size
            )));
        }
        let varmap = VarMap::new();
        let head = DetectionHead::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            &card.head,
        )?;
        let class_text = load_head_artefact(dir, HEAD_FILE, &varmap, card.classes.len(), device)?;
        let fp = model_fingerprint(&spec, &m);
        let warning = (fp != card.model_fingerprint).then(|| {
            format!(
                "the model `{spec}` differs from the one the detector was trained on (`{}`; fingerprints differ)",
                card.model_spec
            )
        });
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
    /// or its label (when only one class has that label); other text is refused
    /// ([`DetPipelineError::UnknownClass`]) unless `free_text`, when the model embeds it (best
    /// effort: the head was trained on the classes' embeddings). Returns the embedding and the
    /// class name used, if any.
    pub fn prompt_embedding(
        &self,
        prompt: &str,
        free_text: bool,
        device: &Device,
    ) -> Result<(Tensor, Option<String>)> {
        let classes = &self.card.classes;
        if let Some(i) = crate::segmentation_pipeline::class_named(classes, prompt) {
            return Ok((self.class_text.get(i)?, Some(classes[i].name.clone())));
        }
        if !free_text {
            return Err(DetPipelineError::UnknownClass {
                prompt: prompt.into(),
                train_manifest: self.card.train_manifest.clone(),
                classes: classes
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let t = prompt_embeddings(&self.model, &[vec![prompt.to_string()]], device)?;
        Ok((t.get(0)?, None))
    }
}

/// Loads a training manifest and a model, trains, saves the artefact to `out`, and, with
/// `val`, evaluates the trained detector on that manifest (every record).
pub fn train_and_save(
    manifest: &Path,
    val: Option<&Path>,
    opts: &TrainOptions,
    out: &Path,
    device: &Device,
) -> Result<(DetCard, Option<DetEvaluation>)> {
    let task = read_task(manifest, opts.split.as_deref())?;
    let val_task = val.map(|v| read_task(v, None)).transpose()?;
    let lopts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let m = medvlm_models::load_model(&opts.model_spec, &lopts)?;
    let trained = train_detector(m, &task, opts, device)?;
    trained.detector.save(out)?;
    let eval = val_task
        .map(|t| trained.detector.evaluate(&t, None, device))
        .transpose()?;
    Ok((trained.detector.card, eval))
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

/// Grounding figures of one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundingEval {
    /// Over all phrases (micro).
    pub micro: GroundingSummary,
    /// Mean over classes of the per-class Acc@0.5 (macro).
    pub macro_accuracy_at_50: f64,
    /// Mean over classes of the per-class mIoU (macro).
    pub macro_mean_iou: f64,
    /// Per class.
    pub per_class: BTreeMap<String, GroundingSummary>,
    /// Per modality: (micro, macro Acc@0.5, macro mIoU).
    pub per_modality: BTreeMap<String, (GroundingSummary, f64, f64)>,
}

/// Detection figures of one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionEval {
    /// Over every class.
    pub all: DetectionSummary,
    /// Per modality (over its classes).
    pub per_modality: BTreeMap<String, DetectionSummary>,
}

/// The evaluation of a detector on a task: the head and the baselines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetEvaluation {
    /// The manifest evaluated.
    pub manifest: String,
    /// Images.
    pub n_images: usize,
    /// (image, class) pairs scored for detection.
    pub n_pairs: usize,
    /// Phrases (true boxes of known classes) grounded.
    pub n_phrases: usize,
    /// Boxes not evaluated because the detector has no class for their label, as
    /// `file: label` (counted, not hidden).
    pub skipped_boxes: Vec<String>,
    /// Metric resolution (the model's input size).
    pub image_size: usize,
    /// The class names, in the order of the class indices.
    pub classes: Vec<String>,
    /// Grounding: the head.
    pub grounding_head: GroundingEval,
    /// Grounding: the heatmap baseline (`None` without projected patch tokens).
    pub grounding_heatmap: Option<GroundingEval>,
    /// Grounding: the centre-box baseline.
    pub grounding_centre: GroundingEval,
    /// Detection: the head.
    pub detection_head: DetectionEval,
    /// Detection: the heatmap baseline (one box per pair).
    pub detection_heatmap: Option<DetectionEval>,
}

struct Phrase {
    class: usize,
    modality: String,
    truth: Bbox,
    pred: Bbox,
}

fn grounding_eval(phrases: &[Phrase], classes: &[SegClass]) -> Result<GroundingEval> {
    let summarise = |ps: &[&Phrase]| -> Result<(
        GroundingSummary,
        f64,
        f64,
        BTreeMap<String, GroundingSummary>,
    )> {
        let pred: Vec<Bbox> = ps.iter().map(|p| p.pred).collect();
        let truth: Vec<Bbox> = ps.iter().map(|p| p.truth).collect();
        let micro = grounding_accuracy(&pred, &truth)?;
        let mut per_class = BTreeMap::new();
        let ids: BTreeSet<usize> = ps.iter().map(|p| p.class).collect();
        for c in ids {
            let sub: Vec<&&Phrase> = ps.iter().filter(|p| p.class == c).collect();
            let pred: Vec<Bbox> = sub.iter().map(|p| p.pred).collect();
            let truth: Vec<Bbox> = sub.iter().map(|p| p.truth).collect();
            per_class.insert(classes[c].name.clone(), grounding_accuracy(&pred, &truth)?);
        }
        let k = per_class.len().max(1) as f64;
        let macro_acc = per_class.values().map(|g| g.accuracy_at_50).sum::<f64>() / k;
        let macro_iou = per_class.values().map(|g| g.mean_iou).sum::<f64>() / k;
        Ok((micro, macro_acc, macro_iou, per_class))
    };
    let all: Vec<&Phrase> = phrases.iter().collect();
    let (micro, macro_accuracy_at_50, macro_mean_iou, per_class) = summarise(&all)?;
    let mut per_modality = BTreeMap::new();
    let mods: BTreeSet<&str> = phrases.iter().map(|p| p.modality.as_str()).collect();
    for m in mods {
        let sub: Vec<&Phrase> = phrases.iter().filter(|p| p.modality == m).collect();
        let (mi, ma, mm, _) = summarise(&sub)?;
        per_modality.insert(m.to_string(), (mi, ma, mm));
    }
    Ok(GroundingEval {
        micro,
        macro_accuracy_at_50,
        macro_mean_iou,
        per_class,
        per_modality,
    })
}

fn detection_eval(
    gts: &[(String, GroundTruthBox)],
    dets: &[(String, DetectedBox)],
    n_classes: usize,
    max_detections: usize,
) -> Result<DetectionEval> {
    let g: Vec<GroundTruthBox> = gts.iter().map(|(_, g)| g.clone()).collect();
    let d: Vec<DetectedBox> = dets.iter().map(|(_, d)| d.clone()).collect();
    let all = coco_average_precision(&g, &d, n_classes, max_detections)?;
    let mut per_modality = BTreeMap::new();
    let mods: BTreeSet<&str> = gts.iter().map(|(m, _)| m.as_str()).collect();
    for m in mods {
        let g: Vec<GroundTruthBox> = gts
            .iter()
            .filter(|x| x.0 == m)
            .map(|x| x.1.clone())
            .collect();
        let d: Vec<DetectedBox> = dets
            .iter()
            .filter(|x| x.0 == m)
            .map(|x| x.1.clone())
            .collect();
        per_modality.insert(
            m.to_string(),
            coco_average_precision(&g, &d, n_classes, max_detections)?,
        );
    }
    Ok(DetectionEval { all, per_modality })
}

fn to_px(b: &Bbox, size: usize) -> Bbox {
    b.map(|v| v * size as f64)
}

/// Per-phrase predictions kept for overlays: (image index, class, truth, head, heatmap).
type OverlayCase = (usize, usize, Bbox, Bbox, Option<Bbox>);

impl Detector {
    /// Evaluates the head and the baselines on every (image, class of its modality) pair of
    /// `task` (see the module docs). With `overlays = (dir, n)`, also writes the first `n`
    /// phrases as PNGs (`ground_<k>_<stem>.png`: true box green, head red, heatmap blue).
    pub fn evaluate(
        &self,
        task: &SegTask,
        overlays: Option<(&Path, usize)>,
        device: &Device,
    ) -> Result<DetEvaluation> {
        let images = load_det_images(&self.model, task, device)?;
        let classes = &self.card.classes;
        let size = self.card.image_size;
        let grid = self.card.head.grid;
        let (pairs, unknown) = det_pairs(&images, classes);
        if !pairs.iter().any(|p| !p.boxes.is_empty()) {
            return Err(DetPipelineError::Invalid(format!(
                "{}: no box of a class the detector knows ({}) to evaluate",
                task.manifest.display(),
                classes
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let has_heatmap = !self.card.heatmap_thresholds.is_empty()
            && images.iter().all(|i| i.image.projected.is_some());
        let mut head_phr = Vec::new();
        let mut heat_phr = Vec::new();
        let mut centre_phr = Vec::new();
        let mut gts = Vec::new();
        let mut head_dets = Vec::new();
        let mut heat_dets = Vec::new();
        let mut cases: Vec<OverlayCase> = Vec::new();
        for chunk in pairs.chunks(256) {
            let samples: Vec<DetSample> = chunk
                .iter()
                .map(|p| sample(&images[p.image], &self.class_text, p))
                .collect::<Result<_>>()?;
            let preds = token_predictions(&self.head, &samples, device)?;
            for (p, toks) in chunk.iter().zip(preds) {
                let cls = &classes[p.class];
                let modality = images[p.image]
                    .image
                    .modality
                    .clone()
                    .unwrap_or_else(|| "-".into());
                let grounded = ground(&toks).map(|g| g.0).unwrap_or([0.0; 4]);
                for (bbox, score) in
                    detect(&toks, self.card.head.nms_iou, self.card.head.max_detections)
                {
                    head_dets.push((
                        modality.clone(),
                        DetectedBox {
                            image: p.image,
                            class: p.class,
                            bbox: to_px(&bbox, size),
                            score,
                        },
                    ));
                }
                let heat = if has_heatmap {
                    let thr = self
                        .card
                        .heatmap_thresholds
                        .get(&cls.name)
                        .copied()
                        .unwrap_or(f32::INFINITY);
                    let proj = images[p.image].image.projected.as_ref().ok_or_else(|| {
                        DetPipelineError::Invalid("no projected patch tokens".into())
                    })?;
                    let sim = patch_cosines(proj, &self.class_text.get(p.class)?)?;
                    let (b, s) = heatmap_box(&sim, grid, thr)?;
                    heat_dets.push((
                        modality.clone(),
                        DetectedBox {
                            image: p.image,
                            class: p.class,
                            bbox: to_px(&b, size),
                            score: s,
                        },
                    ));
                    Some(b)
                } else {
                    None
                };
                let [w, h] = self
                    .card
                    .mean_box_size
                    .get(&cls.name)
                    .copied()
                    .unwrap_or([0.25, 0.25]);
                let centre = centre_box(w, h);
                for t in &p.boxes {
                    gts.push((
                        modality.clone(),
                        GroundTruthBox {
                            image: p.image,
                            class: p.class,
                            bbox: to_px(t, size),
                        },
                    ));
                    let phrase = |pred: &Bbox| Phrase {
                        class: p.class,
                        modality: modality.clone(),
                        truth: to_px(t, size),
                        pred: to_px(pred, size),
                    };
                    head_phr.push(phrase(&grounded));
                    centre_phr.push(phrase(&centre));
                    if let Some(b) = &heat {
                        heat_phr.push(phrase(b));
                    }
                    if overlays.is_some_and(|(_, n)| cases.len() < n) {
                        cases.push((p.image, p.class, *t, grounded, heat));
                    }
                }
            }
        }
        if let Some((dir, _)) = overlays {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            for (k, (i, c, t, h, hm)) in cases.iter().enumerate() {
                let img = &images[*i].image;
                let plane = crate::segmentation_pipeline::read_plane(&img.path)?;
                let mut boxes = vec![(*t, GREEN), (*h, RED)];
                if let Some(b) = hm {
                    boxes.push((*b, BLUE));
                }
                let name = classes[*c].name.replace('/', "_");
                let path = dir.join(format!("ground_{k:03}_{}_{name}.png", stem_of(&img.path)));
                write_png(&path, &draw_boxes(&plane, &boxes, 4))?;
            }
        }
        let n_classes = classes.len();
        let maxd = self.card.head.max_detections;
        Ok(DetEvaluation {
            manifest: task.manifest.display().to_string(),
            n_images: images.len(),
            n_pairs: pairs.len(),
            n_phrases: head_phr.len(),
            skipped_boxes: unknown
                .into_iter()
                .map(|(p, l)| format!("{}: {l}", p.display()))
                .collect(),
            image_size: size,
            classes: classes.iter().map(|c| c.name.clone()).collect(),
            grounding_head: grounding_eval(&head_phr, classes)?,
            grounding_heatmap: if has_heatmap {
                Some(grounding_eval(&heat_phr, classes)?)
            } else {
                None
            },
            grounding_centre: grounding_eval(&centre_phr, classes)?,
            detection_head: detection_eval(&gts, &head_dets, n_classes, maxd)?,
            detection_heatmap: if has_heatmap {
                Some(detection_eval(&gts, &heat_dets, n_classes, maxd)?)
            } else {
                None
            },
        })
    }
}

impl DetEvaluation {
    /// A plain-text table: grounding Acc@0.5 / mIoU of the head and the baselines per class,
    /// per modality and over all (micro and macro); then detection mAP.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{}: {} images, {} phrases (true boxes) grounded, {} (image, class) pairs for detection; boxes in pixels at {}x{}\n",
            self.manifest, self.n_images, self.n_phrases, self.n_pairs, self.image_size, self.image_size
        ));
        if !self.skipped_boxes.is_empty() {
            s.push_str(&format!(
                "skipped {} boxes whose label the detector does not know (first: {})\n",
                self.skipped_boxes.len(),
                self.skipped_boxes[0]
            ));
        }
        s.push_str("grounding: Acc@0.5 / mIoU\n");
        s.push_str(&format!(
            "{:<30} {:>5} | {:>13} | {:>13} | {:>13}\n",
            "class", "n", "head", "heatmap", "centre"
        ));
        let cell = |g: Option<&GroundingSummary>| {
            g.map(|g| format!("{:.3} / {:.3}", g.accuracy_at_50, g.mean_iou))
                .unwrap_or_else(|| "-".into())
        };
        for (name, h) in &self.grounding_head.per_class {
            let hm = self
                .grounding_heatmap
                .as_ref()
                .and_then(|g| g.per_class.get(name));
            let c = self.grounding_centre.per_class.get(name);
            s.push_str(&format!(
                "{:<30} {:>5} | {:>13} | {:>13} | {:>13}\n",
                name,
                h.n,
                cell(Some(h)),
                cell(hm),
                cell(c)
            ));
        }
        let macro_cell = |a: f64, m: f64| format!("{a:.3} / {m:.3}");
        for (m, (hmi, hma, hmm)) in &self.grounding_head.per_modality {
            let hm = self
                .grounding_heatmap
                .as_ref()
                .and_then(|g| g.per_modality.get(m));
            let c = self.grounding_centre.per_modality.get(m);
            s.push_str(&format!(
                "{:<30} {:>5} | {:>13} | {:>13} | {:>13}\n",
                format!("[{m}] micro"),
                hmi.n,
                cell(Some(hmi)),
                cell(hm.map(|x| &x.0)),
                cell(c.map(|x| &x.0))
            ));
            s.push_str(&format!(
                "{:<30} {:>5} | {:>13} | {:>13} | {:>13}\n",
                format!("[{m}] macro"),
                "",
                macro_cell(*hma, *hmm),
                hm.map(|x| macro_cell(x.1, x.2))
                    .unwrap_or_else(|| "-".into()),
                c.map(|x| macro_cell(x.1, x.2))
                    .unwrap_or_else(|| "-".into())
            ));
        }
        let g = &self.grounding_head;
        s.push_str(&format!(
            "{:<30} {:>5} | {:>13} | {:>13} | {:>13}\n",
            "all, micro",
            g.micro.n,
            cell(Some(&g.micro)),
            cell(self.grounding_heatmap.as_ref().map(|x| &x.micro)),
            cell(Some(&self.grounding_centre.micro))
        ));
        s.push_str(&format!(
            "{:<30} {:>5} | {:>13} | {:>13} | {:>13}\n",
            "all, macro over classes",
            "",
            macro_cell(g.macro_accuracy_at_50, g.macro_mean_iou),
            self.grounding_heatmap
                .as_ref()
                .map(|x| macro_cell(x.macro_accuracy_at_50, x.macro_mean_iou))
                .unwrap_or_else(|| "n/a (no projected patch tokens)".into()),
            macro_cell(
                self.grounding_centre.macro_accuracy_at_50,
                self.grounding_centre.macro_mean_iou
            )
        ));
        s.push_str("detection: mAP@[.5:.95] / mAP@.5, macro over classes (micro)\n");
        let dcell = |d: &DetectionSummary| {
            format!(
                "{:.3} / {:.3} ({:.3} / {:.3})",
                d.map_50_95, d.map_50, d.micro_ap_50_95, d.micro_ap_50
            )
        };
        let mut rows: Vec<(String, &DetectionSummary, Option<&DetectionSummary>)> = self
            .detection_head
            .per_modality
            .iter()
            .map(|(m, d)| {
                (
                    format!("[{m}]"),
                    d,
                    self.detection_heatmap
                        .as_ref()
                        .and_then(|h| h.per_modality.get(m)),
                )
            })
            .collect();
        rows.push((
            "all".into(),
            &self.detection_head.all,
            self.detection_heatmap.as_ref().map(|h| &h.all),
        ));
        s.push_str(&format!(
            "{:<30} | {:>29} | {:>29}\n",
            "", "head", "heatmap"
        ));
        for (name, h, b) in rows {
            s.push_str(&format!(
                "{:<30} | {:>29} | {:>29}\n",
                name,
                dcell(h),
                b.map(dcell).unwrap_or_else(|| "-".into())
            ));
        }
        s
    }
}

/// Loads a detector and evaluates it on a manifest (optionally one split), optionally
/// writing overlays of the first phrases.
pub fn evaluate_manifest(
    detector: &Path,
    model: Option<&str>,
    manifest: &Path,
    split: Option<&str>,
    overlays: Option<(&Path, usize)>,
    device: &Device,
) -> Result<(DetEvaluation, Option<String>)> {
    let (det, warning) = Detector::load(detector, model, device)?;
    let task = read_task(manifest, split)?;
    Ok((det.evaluate(&task, overlays, device)?, warning))
}

// ---------------------------------------------------------------------------------------
// Prediction on files
// ---------------------------------------------------------------------------------------

const GREEN: [f32; 3] = [0.1, 0.9, 0.1];
const RED: [f32; 3] = [1.0, 0.1, 0.1];
const BLUE: [f32; 3] = [0.2, 0.4, 1.0];
const YELLOW: [f32; 3] = [1.0, 0.85, 0.1];

/// The plane upscaled `scale` times (nearest) in colour, with each box (fractions of the
/// image) drawn as a one-pixel outline in its colour, in order (later boxes on top).
pub fn draw_boxes(plane: &Plane, boxes: &[(Bbox, [f32; 3])], scale: usize) -> Plane {
    let scale = scale.max(1);
    let (rows, cols) = (plane.rows * scale, plane.cols * scale);
    let mut data = vec![0f32; rows * cols * 3];
    for r in 0..rows {
        for c in 0..cols {
            let i = (r / scale) * plane.cols + c / scale;
            for k in 0..3 {
                data[(r * cols + c) * 3 + k] = if plane.channels == 3 {
                    plane.data[3 * i + k]
                } else {
                    plane.data[i * plane.channels]
                };
            }
        }
    }
    for (b, colour) in boxes {
        let x0 = ((b[0] * cols as f64).round() as usize).min(cols - 1);
        let y0 = ((b[1] * rows as f64).round() as usize).min(rows - 1);
        let x1 = (((b[2] * cols as f64).round() as usize).max(1) - 1).clamp(x0, cols - 1);
        let y1 = (((b[3] * rows as f64).round() as usize).max(1) - 1).clamp(y0, rows - 1);
        let mut put = |r: usize, c: usize| {
            data[(r * cols + c) * 3..(r * cols + c) * 3 + 3].copy_from_slice(colour);
        };
        for c in x0..=x1 {
            put(y0, c);
            put(y1, c);
        }
        for r in y0..=y1 {
            put(r, x0);
            put(r, x1);
        }
    }
    Plane {
        rows,
        cols,
        channels: 3,
        data,
    }
}

/// A box in an image file's pixels with its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredBox {
    /// `[x0, y0, x1, y1]` in the file's pixels.
    pub bbox: Bbox,
    /// Sigmoid score of the token.
    pub score: f64,
}

/// What [`Detector::predict_file`] found and wrote for one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictedBoxes {
    /// The input.
    pub input: PathBuf,
    /// The grounded box: the best-scoring token's.
    pub grounding: ScoredBox,
    /// Detections with a score of at least the minimum, after suppression.
    pub detections: Vec<ScoredBox>,
    /// The overlay PNG (grounded box red, other detections yellow).
    pub overlay_png: PathBuf,
    /// The JSON of this record.
    pub json: PathBuf,
    /// For a 3-D NIfTI volume: the boxes of every slice and the grounded 3-D box;
    /// `grounding`, `detections` and the overlay are then those of the best slice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeBoxes>,
}

/// Boxes of a volume read slice by slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeBoxes {
    /// The axis cut across (0, 1, 2 = NIfTI x, y, z).
    pub axis: usize,
    /// The slice with the highest grounding score.
    pub best_slice: usize,
    /// Each slice's grounded box and detections, in its plane's pixels (`x` = column,
    /// `y` = row; the plane's rows and columns are the two other axes in order).
    pub per_slice: Vec<PlaneBoxes>,
    /// The grounded 3-D box ([`link_slices`]).
    pub grounding: VoxelBox,
}

/// A box of voxels, inclusive index ranges in NIfTI axis order (x, y, z).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VoxelBox {
    /// Smallest voxel index per axis.
    pub min: [usize; 3],
    /// Largest voxel index per axis.
    pub max: [usize; 3],
    /// The best slice's grounding score.
    pub score: f64,
}

/// Minimum overlap of the grounded boxes of neighbouring slices for one 3-D box.
pub const SLICE_LINK_IOU: f64 = 0.3;

/// The grounded 3-D box of a volume from its slices' grounded boxes (`per_slice[k]` of slice
/// `k` across `axis`, planes of `rows x cols`): the best-scoring slice's box, extended to the
/// neighbouring slices, one at a time in both directions, while the next slice's grounded box
/// scores at least `min_score` and overlaps the last one taken by IoU >= [`SLICE_LINK_IOU`];
/// the in-plane extent is the union of the linked boxes, rounded outwards to whole pixels.
pub fn link_slices(
    per_slice: &[PlaneBoxes],
    axis: usize,
    (rows, cols): (usize, usize),
    min_score: f64,
) -> Option<(usize, VoxelBox)> {
    let best = (0..per_slice.len()).max_by(|&a, &b| {
        per_slice[a]
            .grounding
            .score
            .total_cmp(&per_slice[b].grounding.score)
            .then(b.cmp(&a))
    })?;
    let linked = |k: usize, prev: usize| {
        let (g, p) = (&per_slice[k].grounding, &per_slice[prev].grounding);
        g.score >= min_score && box_iou(&g.bbox, &p.bbox) >= SLICE_LINK_IOU
    };
    let (mut lo, mut hi) = (best, best);
    while lo > 0 && linked(lo - 1, lo) {
        lo -= 1;
    }
    while hi + 1 < per_slice.len() && linked(hi + 1, hi) {
        hi += 1;
    }
    let mut b = per_slice[best].grounding.bbox;
    for s in &per_slice[lo..=hi] {
        let g = s.grounding.bbox;
        b = [
            b[0].min(g[0]),
            b[1].min(g[1]),
            b[2].max(g[2]),
            b[3].max(g[3]),
        ];
    }
    let span = |a: f64, z: f64, n: usize| {
        let first = (a.floor().max(0.0) as usize).min(n.saturating_sub(1));
        let last = ((z.ceil() as usize).saturating_sub(1)).clamp(first, n.saturating_sub(1));
        (first, last)
    };
    let (r0, r1) = span(b[1], b[3], rows);
    let (c0, c1) = span(b[0], b[2], cols);
    let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
    let mut min = [0usize; 3];
    let mut max = [0usize; 3];
    (min[axis], max[axis]) = (lo, hi);
    (min[others[0]], max[others[0]]) = (r0, r1);
    (min[others[1]], max[others[1]]) = (c0, c1);
    Some((
        best,
        VoxelBox {
            min,
            max,
            score: per_slice[best].grounding.score,
        },
    ))
}

/// The boxes [`Detector::boxes_in_plane`] finds, in the plane's pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaneBoxes {
    /// The grounded box: the best-scoring token's.
    pub grounding: ScoredBox,
    /// Detections with a score of at least the minimum, after suppression.
    pub detections: Vec<ScoredBox>,
}

/// The plane with the grounded box in red and the other detections in yellow, enlarged so
/// the longer side is about 256 pixels (at most 8x).
pub fn boxes_overlay(plane: &Plane, found: &PlaneBoxes) -> Plane {
    let frac = |b: &Bbox| {
        [
            b[0] / plane.cols as f64,
            b[1] / plane.rows as f64,
            b[2] / plane.cols as f64,
            b[3] / plane.rows as f64,
        ]
    };
    let mut drawn: Vec<(Bbox, [f32; 3])> = found
        .detections
        .iter()
        .map(|d| (frac(&d.bbox), YELLOW))
        .collect();
    drawn.push((frac(&found.grounding.bbox), RED));
    let scale = (256 / plane.rows.max(plane.cols).max(1)).clamp(1, 8);
    draw_boxes(plane, &drawn, scale)
}

impl Detector {
    /// Every token's box (fractions of the image) and score for `planes` and one text
    /// embedding.
    pub fn token_boxes(
        &self,
        planes: &[Plane],
        text: &Tensor,
        device: &Device,
    ) -> Result<Vec<Vec<(Bbox, f64)>>> {
        let size = self.card.image_size;
        let pre = seg_preprocess(&self.model, size);
        let mut out = Vec::with_capacity(planes.len());
        for chunk in planes.chunks(32) {
            let mut pixels = Vec::new();
            for p in chunk {
                pixels.push(prepare(&pre, p, size, Path::new("<plane>"))?.pixels);
            }
            let px = pre.batch(&pixels, device)?;
            let (patches, _) = encode_patches(&self.model, &px)?;
            let samples: Vec<DetSample> = (0..chunk.len())
                .map(|i| {
                    Ok(DetSample {
                        tokens: patches.get(i)?,
                        text: text.clone(),
                        boxes: vec![],
                    })
                })
                .collect::<Result<_>>()?;
            out.extend(token_predictions(&self.head, &samples, device)?);
        }
        Ok(out)
    }

    /// The grounded box and the detections scoring at least `min_score` (after suppression)
    /// of what `text` names in `plane`, in the plane's pixels.
    pub fn boxes_in_plane(
        &self,
        plane: &Plane,
        text: &Tensor,
        min_score: f64,
        device: &Device,
    ) -> Result<PlaneBoxes> {
        let toks = self
            .token_boxes(std::slice::from_ref(plane), text, device)?
            .remove(0);
        let (g, gs) = ground(&toks)
            .ok_or_else(|| DetPipelineError::Invalid("the model gave no tokens".into()))?;
        let px = |b: &Bbox| {
            [
                b[0] * plane.cols as f64,
                b[1] * plane.rows as f64,
                b[2] * plane.cols as f64,
                b[3] * plane.rows as f64,
            ]
        };
        Ok(PlaneBoxes {
            grounding: ScoredBox {
                bbox: px(&g),
                score: gs,
            },
            detections: detect(&toks, self.card.head.nms_iou, self.card.head.max_detections)
                .into_iter()
                .filter(|d| d.1 >= min_score)
                .map(|d| ScoredBox {
                    bbox: px(&d.0),
                    score: d.1,
                })
                .collect(),
        })
    }

    /// Boxes what `text` names in one image file and writes `<stem>_boxes.png` (the image
    /// with the grounded box in red and the other detections scoring at least `min_score` in
    /// yellow) and `<stem>_boxes.json` to `out`. PNG/JPEG/TIFF/DICOM/npy: one plane. NIfTI:
    /// every slice across `axis` (0, 1, 2 = x, y, z; a 2-D NIfTI across its unit axis), the
    /// slices linked into a grounded 3-D box ([`link_slices`]); the PNG shows the best slice.
    pub fn predict_file(
        &self,
        input: &Path,
        text: &Tensor,
        min_score: f64,
        axis: usize,
        out: &Path,
        device: &Device,
    ) -> Result<PredictedBoxes> {
        std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
        let img = medvlm_io::load_any(input).map_err(|e| {
            DetPipelineError::from(SegPipelineError::Image {
                path: input.to_path_buf(),
                reason: medvlm_io::guard::error_chain(&e),
            })
        })?;
        let is_nifti = matches!(
            img.format,
            medvlm_io::SourceFormat::Nifti1 | medvlm_io::SourceFormat::Nifti2
        );
        let (plane, found, volume) = if is_nifti {
            let VolumePlanes {
                planes,
                axis,
                dims3,
            } = volume_planes(input, &img, axis)?;
            let per_slice = planes
                .iter()
                .map(|p| self.boxes_in_plane(p, text, min_score, device))
                .collect::<Result<Vec<_>>>()?;
            let (rows, cols) = (planes[0].rows, planes[0].cols);
            let (best, grounding) = link_slices(&per_slice, axis, (rows, cols), min_score)
                .ok_or_else(|| {
                    DetPipelineError::Invalid(format!("{}: no slices", input.display()))
                })?;
            debug_assert_eq!(dims3[axis], per_slice.len());
            let found = per_slice[best].clone();
            let plane = planes[best].clone();
            (
                plane,
                found,
                Some(VolumeBoxes {
                    axis,
                    best_slice: best,
                    per_slice,
                    grounding,
                }),
            )
        } else {
            let plane = plane_of(input, &img, &PlaneSelect::default())?;
            let found = self.boxes_in_plane(&plane, text, min_score, device)?;
            (plane, found, None)
        };
        let stem = stem_of(input);
        let overlay_png = out.join(format!("{stem}_boxes.png"));
        let json = out.join(format!("{stem}_boxes.json"));
        write_png(&overlay_png, &boxes_overlay(&plane, &found))?;
        let rec = PredictedBoxes {
            input: input.to_path_buf(),
            grounding: found.grounding,
            detections: found.detections,
            overlay_png,
            json: json.clone(),
            volume,
        };
        let bytes = serde_json::to_vec_pretty(&rec).map_err(|e| file_err(&json, e))?;
        medvlm_io::atomic::write_atomic(&json, &bytes)
            .map_err(|e| file_err(&json, medvlm_io::guard::error_chain(&e)))?;
        Ok(rec)
    }
}

/// Loads a detector and boxes what `prompt` names in `inputs`, writing into `out`. Returns
/// the records, the class the prompt matched (if any) and the model warning (if any).
#[allow(clippy::too_many_arguments)]
pub fn predict_files(
    detector: &Path,
    model: Option<&str>,
    prompt: &str,
    free_text: bool,
    inputs: &[PathBuf],
    min_score: f64,
    axis: usize,
    out: &Path,
    device: &Device,
) -> Result<(Vec<PredictedBoxes>, Option<String>, Option<String>)> {
    crate::segmentation_pipeline::check_distinct_stems(inputs)?;
    let (det, warning) = Detector::load(detector, model, device)?;
    let (text, class) = det.prompt_embedding(prompt, free_text, device)?;
    for p in inputs {
        if !p.is_file() {
            return Err(DetPipelineError::from(SegPipelineError::Image {
                path: p.clone(),
                reason: "no such file".into(),
            }));
        }
    }
    let files = inputs
        .iter()
        .map(|p| det.predict_file(p, &text, min_score, axis, out, device))
        .collect::<Result<Vec<_>>>()?;
    Ok((files, class, warning))
}

#[cfg(test)]
mod link_tests {
    use super::*;

    fn slice(bbox: Bbox, score: f64) -> PlaneBoxes {
        PlaneBoxes {
            grounding: ScoredBox { bbox, score },
            detections: vec![],
        }
    }

    #[test]
    fn slices_link_while_they_overlap_and_score() {
        let a = [10.0, 20.0, 30.0, 40.0];
        let per = vec![
            slice([40.0, 40.0, 50.0, 50.0], 0.9), // high score but elsewhere: not linked
            slice(a, 0.6),
            slice([11.0, 21.0, 31.5, 41.0], 0.95), // best
            slice(a, 0.2),                         // overlaps but scores too low
            slice(a, 0.8),
        ];
        let (best, b) = link_slices(&per, 0, (64, 48), 0.5).unwrap();
        assert_eq!(best, 2);
        // Slices 1..=2 across axis 0; rows (y) are axis 1, columns (x) axis 2.
        assert_eq!(b.min, [1, 20, 10]);
        assert_eq!(b.max, [2, 40, 31]);
        assert_eq!(b.score, 0.95);
        // Across axis 2 the plane rows are axis 0 and the columns axis 1; clamped to the
        // plane.
        let per = vec![slice([-3.0, 50.0, 60.0, 70.0], 0.7)];
        let (_, b) = link_slices(&per, 2, (64, 48), 0.5).unwrap();
        assert_eq!((b.min, b.max), ([50, 0, 0], [63, 47, 0]));
        assert!(link_slices(&[], 2, (64, 48), 0.5).is_none());
    }
}
