//! Anomaly detection and localisation on a labelled manifest, what `medvlm anomaly fit|eval|
//! predict` runs: a study is normal when its only label is `normal` and anomalous otherwise;
//! its finding masks (where the manifest lists them) are the ground truth of localisation.
//!
//! Per modality (the manifest's `modality` field; one group without it):
//! * **fit** ([`fit`]): the memory ([`crate::anomaly::NormalMemory`]) of the patch tokens of
//!   `shots` normal training images drawn with a seed, and the decision threshold at a target
//!   false-positive rate on other normal images (the calibration split when given, else the
//!   training normals outside the memory);
//! * **score**: anomaly maps at the model's input size and image scores (the map maximum);
//! * **zero-shot** (no normal images; WinCLIP, Jeong et al., CVPR 2023), two variants
//!   evaluated beside the memory method, both against the state prompts of [`state_prompts`]:
//!   *patch tokens*, each projected patch token's highest cosine to an abnormal state minus its
//!   cosine to the normal state, mapped like the memory's scores; and *windows*
//!   ([`crate::winclip`]), WinCLIP's multi-scale windows of patches embedded like whole images,
//!   their abnormal probabilities aggregated per patch (harmonic mean) and averaged over the
//!   scales ([`AnomalyOptions::windows`]), the image score the whole image's abnormal
//!   probability;
//! * **window memory and WinCLIP+** (when the tower has windows): the memory images' window
//!   embeddings per scale ([`crate::winclip::WindowMemory`]), a test window scored by its
//!   distance to the nearest normal window, with its own threshold on the calibration
//!   normals; WinCLIP+ averages the zero-shot windows' map with the few-shot map (the mean
//!   of the patch memory's and the window memory's), and likewise the image scores. With
//!   [`AnomalyOptions::decide_with`] the window memory is what `predict` decides with;
//! * **weak supervision** (optional, [`AnomalyOptions::weak_steps`]): a window scorer trained
//!   from the training manifest's normal / abnormal labels only ([`crate::window_mil`]);
//! * **evaluate** ([`AnomalyDetector::evaluate`]): image AUROC, pixel AUROC and AUPRO
//!   ([`medvlm_eval::anomaly`]) and the decision's false-positive and true-positive rates at
//!   the threshold; the same for two baselines with the same normal images: *global*, the
//!   cosine distance of an image's mean patch token to the nearest normal one (image level
//!   only), and *pixel difference*, the smoothed absolute difference from the mean normal
//!   image (localisation). Pixel metrics use the images whose every finding has a mask
//!   (anomalous studies with an unmasked finding are counted and left out of them);
//! * **supervised** (optional, [`AnomalyOptions::supervised_steps`]): where the training
//!   manifest has finding masks, a head trained on them, the "masks where present" variant of
//!   MVFA (Huang et al., CVPR 2024) and AnomalyCLIP (Zhou et al., ICLR 2024): the text-guided
//!   segmentation head ([`crate::segmentation::TextSegHead`]) trained to draw the union of an
//!   image's finding masks (empty for a normal image) from the frozen patch tokens, the image,
//!   and the modality's abnormal-state text embedding; its sigmoid map is the anomaly map and
//!   the map's maximum the image score, with its own threshold on the same calibration
//!   normals. When a detector has it, it is the method `predict` (and the service) decide with;
//!   `eval` reports it beside the memory.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use medvlm_eval::anomaly::{aupro, pixel_auroc, PixelMap, DEFAULT_FPR_LIMIT};
use medvlm_eval::auroc::auroc_binary;
use medvlm_models::vlm::l2_normalize;
use medvlm_models::LoadedModel;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::anomaly::{anomaly_maps, image_scores, MemoryConfig, NormalMemory, Threshold};
use crate::card::read_json_card;
use crate::segmentation::{
    predict_probabilities, train_head, SegHeadConfig, SegSample, TextSegHead,
};
use crate::segmentation_pipeline::{
    load_images, load_images_visiting, model_fingerprint, LoadedImage, SegItem, SegPipelineError,
    SegTask,
};
use crate::winclip::WindowScores;
use candle_nn::{VarBuilder, VarMap};

/// Errors of the anomaly pipeline (they name the file and the reason).
#[derive(Debug, thiserror::Error)]
pub enum AnomalyPipelineError {
    /// Reading images, masks or the model.
    #[error(transparent)]
    Data(Box<SegPipelineError>),
    /// The anomaly core.
    #[error(transparent)]
    Anomaly(#[from] crate::anomaly::AnomalyError),
    /// A metric.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// The supervised head.
    #[error(transparent)]
    Head(#[from] crate::segmentation::SegError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

impl From<SegPipelineError> for AnomalyPipelineError {
    fn from(e: SegPipelineError) -> Self {
        AnomalyPipelineError::Data(Box::new(e))
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, AnomalyPipelineError>;

fn file_err(path: &Path, reason: impl ToString) -> AnomalyPipelineError {
    AnomalyPipelineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// One study of an anomaly task.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyItem {
    /// The image and its finding masks.
    pub item: SegItem,
    /// Whether the study is normal (its only label is `normal`).
    pub normal: bool,
    /// Whether every finding of an anomalous study has a mask (pixel metrics need it).
    pub fully_masked: bool,
}

/// The studies of a manifest (optionally one split).
#[derive(Debug, Clone)]
pub struct AnomalyTask {
    /// The manifest.
    pub manifest: PathBuf,
    /// The studies, in manifest order.
    pub items: Vec<AnomalyItem>,
}

impl AnomalyTask {
    /// Reads `manifest`; a study is normal when its labels (the `labels` list, else `label`)
    /// are exactly `normal`. A listed mask file that does not exist is an error naming it.
    pub fn from_manifest(manifest: &Path, split: Option<&str>) -> Result<Self> {
        // The images, masks (checked to exist) and labels as the segmentation task reads them.
        let seg = SegTask::from_manifest(manifest, split)?;
        let mut items = Vec::with_capacity(seg.items.len());
        for item in seg.items {
            if item.labels.is_empty() {
                return Err(file_err(
                    manifest,
                    format!(
                        "record {} has no label (normal or findings)",
                        item.image.display()
                    ),
                ));
            }
            let normal = item.labels == ["normal"];
            let masked: std::collections::BTreeSet<&str> =
                item.findings.iter().map(|f| f.label.as_str()).collect();
            let fully_masked = normal || item.labels.iter().all(|l| masked.contains(l.as_str()));
            items.push(AnomalyItem {
                item,
                normal,
                fully_masked,
            });
        }
        Ok(Self {
            manifest: seg.manifest,
            items,
        })
    }

    fn modalities(&self) -> Vec<Option<String>> {
        let mut v: Vec<Option<String>> =
            self.items.iter().map(|i| i.item.modality.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    fn seg_task(&self, idx: &[usize]) -> SegTask {
        SegTask {
            manifest: self.manifest.clone(),
            items: idx.iter().map(|&i| self.items[i].item.clone()).collect(),
        }
    }
}

/// Settings of [`fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyOptions {
    /// Normal images per modality in the memory (the few shots).
    pub shots: usize,
    /// Seed of the draw (and of the memory subset).
    pub seed: u64,
    /// Target false-positive rate of the threshold on the calibration normals.
    pub fpr: f64,
    /// Memory size limit and map smoothing.
    pub memory: MemoryConfig,
    /// Steps of the supervised head trained on the training manifest's finding masks (see
    /// the module docs); 0 (the default): no supervised branch, the detector sees normal
    /// images only.
    #[serde(default)]
    pub supervised_steps: usize,
    /// Most training images of the supervised head (normal or with every finding masked; a
    /// seeded draw beyond it). Default 800.
    #[serde(default = "default_supervised_images")]
    pub supervised_images: usize,
    /// WinCLIP's window scales (sides in patches) of the zero-shot windows, the window memory
    /// and the weak scorer; empty: no windows (evaluation as cheap as the memory's). Cards
    /// written before the windows existed read the default.
    #[serde(default)]
    pub windows: crate::winclip::WindowConfig,
    /// The method the detector decides with when it has no supervised head (which decides
    /// when present). Cards written before the choice existed read `memory`.
    #[serde(default)]
    pub decide_with: DecisionMethod,
    /// Steps of the weakly supervised window scorer trained from the training manifest's
    /// image labels only ([`crate::window_mil`]); 0 (the default): none. Its training images
    /// are a seeded draw of at most `supervised_images` per modality.
    #[serde(default)]
    pub weak_steps: usize,
}

/// What a detector without a supervised head decides with (`predict`, the service).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionMethod {
    /// The memory of normal patch tokens (the default).
    #[default]
    Memory,
    /// WinCLIP+'s window memory (needs a tower with windows; see [`crate::winclip`]).
    WindowMemory,
}

impl std::str::FromStr for DecisionMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "memory" => Ok(Self::Memory),
            "window-memory" => Ok(Self::WindowMemory),
            _ => Err(format!(
                "unknown decision method {s:?} (memory or window-memory)"
            )),
        }
    }
}

fn default_supervised_images() -> usize {
    800
}

impl Default for AnomalyOptions {
    fn default() -> Self {
        Self {
            shots: 16,
            seed: 0,
            fpr: 0.05,
            memory: MemoryConfig::default(),
            supervised_steps: 0,
            supervised_images: default_supervised_images(),
            windows: Default::default(),
            decide_with: DecisionMethod::Memory,
            weak_steps: 0,
        }
    }
}

/// The supervised branch of one modality: its abnormal-state text and its threshold.
#[derive(Debug, Clone)]
pub struct SupervisedModality {
    /// The modality's abnormal-state text embedding `[E]` (L2-normalised), the head's prompt.
    pub text: Tensor,
    /// The decision threshold on the supervised image scores.
    pub threshold: Threshold,
}

/// The supervised head shared by the modalities, with its parameters.
pub struct SupervisedHead {
    /// The head.
    pub head: TextSegHead,
    /// Its parameters.
    pub varmap: VarMap,
}

/// The supervised branch in the card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisedCard {
    /// The head's configuration.
    pub head: SegHeadConfig,
    /// Training images (normal, or anomalous with every finding masked).
    pub n_train_images: usize,
    /// Of them, anomalous.
    pub n_train_anomalous: usize,
    /// Anomalous training images left out because a finding has no mask.
    pub n_skipped_unmasked: usize,
    /// Mean loss of the last 10 steps.
    pub final_loss: f32,
}

/// The fitted detector of one modality.
#[derive(Debug, Clone)]
pub struct ModalityDetector {
    /// The modality (`None`: the manifest has no modality field).
    pub modality: Option<String>,
    /// Normal patch features.
    pub memory: NormalMemory,
    /// The decision threshold on image scores.
    pub threshold: Threshold,
    /// Baseline: mean patch token of each memory image, L2-normalised `[K, D]`.
    pub normal_means: Tensor,
    /// Baseline: the mean normal grey image at the model's size.
    pub normal_grey: Vec<f32>,
    /// The memory images.
    pub memory_images: Vec<PathBuf>,
    /// Zero-shot branch: L2-normalised text embeddings `[1 + F, E]`, row 0 the normal state
    /// and one row per abnormal state (`None`: the tower has no projected patch tokens).
    pub zero_shot_text: Option<Tensor>,
    /// The supervised branch (`None`: the detector has no supervised head).
    pub supervised: Option<SupervisedModality>,
    /// WinCLIP+'s window-level memory of the memory images (`None`: the tower has no
    /// windows, or the detector predates them).
    pub window_memory: Option<crate::winclip::WindowMemory>,
    /// The window memory's threshold on the calibration normals (with a window memory).
    pub window_threshold: Option<Threshold>,
    /// The method decided with when there is no supervised branch.
    pub decide_with: DecisionMethod,
    /// The window scorer trained from image labels (`None`: not asked for, or no windows).
    pub weak: Option<crate::window_mil::WindowScorer>,
}

impl ModalityDetector {
    /// Whether decisions come from the window memory: no supervised branch, `decide_with`
    /// asks for it, and the detector has it (fit and load refuse the choice otherwise).
    pub fn decides_with_windows(&self) -> bool {
        self.supervised.is_none()
            && self.decide_with == DecisionMethod::WindowMemory
            && self.window_memory.is_some()
            && self.window_threshold.is_some()
    }

    /// The name of the method the detector decides with: `supervised`, `window-memory` or
    /// `memory`.
    pub fn decision_method(&self) -> &'static str {
        if self.supervised.is_some() {
            "supervised"
        } else if self.decides_with_windows() {
            "window-memory"
        } else {
            "memory"
        }
    }

    /// The threshold of the method the detector decides with: the supervised branch's when
    /// it has one, else the window memory's or the memory's by `decide_with`.
    pub fn decision_threshold(&self) -> &Threshold {
        match (&self.supervised, &self.window_threshold) {
            (Some(s), _) => &s.threshold,
            (None, Some(t)) if self.decides_with_windows() => t,
            _ => &self.threshold,
        }
    }
}

/// Anomaly maps at `size` and image scores (the maps' maxima) from per-patch scores on
/// `grid`, smoothed with `sigma`.
fn scored_from_patch_maps(
    patch_maps: &[Vec<f32>],
    grid: (usize, usize),
    size: usize,
    sigma: f64,
) -> Result<Vec<ScoredImage>> {
    let flat: Vec<f32> = patch_maps.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (patch_maps.len(), grid.0 * grid.1), &Device::Cpu)?;
    scored_from_patch_scores(&t, grid, size, sigma)
}

/// [`scored_from_patch_maps`] from a tensor of patch scores `[N, P]`.
fn scored_from_patch_scores(
    patch_scores: &Tensor,
    grid: (usize, usize),
    size: usize,
    sigma: f64,
) -> Result<Vec<ScoredImage>> {
    let maps = anomaly_maps(patch_scores, grid, size, sigma)?;
    let scores = image_scores(&maps);
    Ok(maps
        .into_iter()
        .zip(scores)
        .map(|(map, score)| ScoredImage { map, score })
        .collect())
}

/// A pixel visitor (for [`load_images_visiting`], [`load_planes_visiting`]) that appends the
/// window memory's patch maps of each batch to `out`.
fn window_memory_visitor<'a>(
    model: &'a LoadedModel,
    memory: &'a crate::winclip::WindowMemory,
    grid: (usize, usize),
    config: &'a crate::winclip::WindowConfig,
    out: &'a mut Vec<Vec<f32>>,
) -> impl FnMut(&Tensor) -> std::result::Result<(), SegPipelineError> + 'a {
    move |px: &Tensor| {
        let err = |e: crate::anomaly::AnomalyError| {
            SegPipelineError::Invalid(format!("WinCLIP windows: {e}"))
        };
        let (per_scale, _) =
            crate::winclip::window_embeddings(model.model.as_ref(), px, grid, config)
                .map_err(err)?;
        out.extend(memory.patch_maps(&per_scale, grid, config).map_err(err)?);
        Ok(())
    }
}

/// The normal and abnormal state prompts of a modality's zero-shot branch: for a phantom
/// modality its report-style impressions of `normal` and of each finding (one abnormal state
/// per finding); otherwise generic wording.
pub fn state_prompts(modality: Option<&str>) -> (Vec<String>, Vec<Vec<String>>) {
    if let Some(m) = modality.and_then(|m| m.parse::<medvlm_phantoms::Modality>().ok()) {
        let normal = medvlm_phantoms::report_prompts(m, "normal").unwrap_or_default();
        let abnormal: Vec<Vec<String>> = m
            .findings()
            .iter()
            .filter_map(|f| medvlm_phantoms::report_prompts(m, f))
            .filter(|p| !p.is_empty())
            .collect();
        if !normal.is_empty() && !abnormal.is_empty() {
            return (normal, abnormal);
        }
    }
    let what = format!("{} image", modality.unwrap_or("medical").replace('_', " "));
    let compose = |states: &[&str]| -> Vec<String> {
        states
            .iter()
            .flat_map(|st| {
                let object = st.replace("{}", &what);
                STATE_TEMPLATES
                    .iter()
                    .map(move |t| t.replace("{}", &object))
            })
            .collect()
    };
    (compose(NORMAL_STATES), vec![compose(ABNORMAL_STATES)])
}

/// WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, section 4.1): state
/// words, each in every template, the embeddings of a state averaged. WinCLIP's words describe
/// industrial objects ("flawless", "damaged"); these describe findings.
const NORMAL_STATES: &[&str] = &[
    "a normal {}",
    "a healthy {}",
    "an unremarkable {}",
    "a {} without abnormality",
    "a {} with no findings",
];
const ABNORMAL_STATES: &[&str] = &[
    "an abnormal {}",
    "a {} with a lesion",
    "a {} with an abnormality",
    "a {} with a pathological finding",
    "a {} showing disease",
];
const STATE_TEMPLATES: &[&str] = &[
    "{}.",
    "a photo of {}.",
    "an example of {}.",
    "a medical image of {}.",
    "a scan showing {}.",
];

/// Zero-shot patch scores `[N, P]`: for each projected patch token, the highest cosine to an
/// abnormal state minus the cosine to the normal state (WinCLIP's two-state comparison; the
/// difference orders patches as the softmax over the states does).
fn zero_shot_patch_scores(projected: &Tensor, text: &Tensor) -> Result<Tensor> {
    let (n, p, e) = projected.dims3()?;
    let q = l2_normalize(&projected.reshape((n * p, e))?)?;
    let sims = q.matmul(&text.t()?)?; // [N*P, 1+F]
    let normal = sims.narrow(1, 0, 1)?.squeeze(1)?;
    let abnormal = sims.narrow(1, 1, text.dim(0)? - 1)?.max(D::Minus1)?;
    Ok((abnormal - normal)?.reshape((n, p))?)
}

/// The card of a saved detector (`anomaly.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnomalyCard {
    /// `medvlm-anomaly/1`.
    pub format: String,
    /// Model spec.
    pub model_spec: String,
    /// Model fingerprint.
    pub model_fingerprint: String,
    /// Input size of the maps.
    pub image_size: usize,
    /// The options.
    pub options: AnomalyOptions,
    /// Per modality: name, threshold, memory images, patch grid.
    pub modalities: Vec<ModalityCard>,
    /// The supervised branch (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised: Option<SupervisedCard>,
    /// medvlm version.
    pub medvlm_version: String,
}

/// One modality in the card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModalityCard {
    /// The modality.
    pub modality: Option<String>,
    /// The threshold.
    pub threshold: Threshold,
    /// The memory images.
    pub memory_images: Vec<PathBuf>,
    /// The patch grid.
    pub grid: (usize, usize),
    /// The supervised branch's threshold (absent: no supervised branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised_threshold: Option<Threshold>,
    /// The window memory's threshold (absent: no window memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_threshold: Option<Threshold>,
    /// What the weak window scorer trained on (absent: no weak scorer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weak_training: Option<WeakTraining>,
}

/// A fitted detector with its model.
pub struct AnomalyDetector {
    /// Per modality.
    pub modalities: Vec<ModalityDetector>,
    /// The card.
    pub card: AnomalyCard,
    /// The supervised head (`None`: no supervised branch).
    pub supervised: Option<SupervisedHead>,
    model: LoadedModel,
}

const CARD_FORMAT: &str = "medvlm-anomaly/1";
const CARD_FILE: &str = "anomaly.json";
const TENSORS_FILE: &str = "memory.safetensors";
const SUPERVISED_FILE: &str = "supervised.safetensors";

/// The union of an image's finding masks as 0/1 floats (`size * size`).
fn union_mask(img: &LoadedImage, size: usize) -> Vec<f32> {
    let mut d = vec![0f32; size * size];
    for m in img.masks.values() {
        for (a, &b) in d.iter_mut().zip(m) {
            if b != 0 {
                *a = 1.0;
            }
        }
    }
    d
}

/// One abnormal-state text embedding per modality (the normalised mean of the embeddings of
/// every abnormal prompt of [`state_prompts`]), `[E]`.
fn abnormal_text(m: &LoadedModel, modality: Option<&str>, device: &Device) -> Result<Tensor> {
    let (_, abnormal) = state_prompts(modality);
    let all: Vec<String> = abnormal.into_iter().flatten().collect();
    Ok(crate::segmentation_pipeline::prompt_embeddings(m, &[all], device)?.get(0)?)
}

/// Trains the supervised head on `train`'s normal images and its anomalous images whose every
/// finding has a mask (at most `options.supervised_images`, a seeded draw), each paired with
/// its modality's abnormal text and the union of its masks.
fn train_supervised(
    m: &LoadedModel,
    train: &AnomalyTask,
    texts: &[(Option<String>, Tensor)],
    options: &AnomalyOptions,
    device: &Device,
) -> Result<(SupervisedHead, SupervisedCard)> {
    let mut idx: Vec<usize> = (0..train.items.len())
        .filter(|&i| train.items[i].fully_masked)
        .collect();
    let n_skipped_unmasked = train.items.len() - idx.len();
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x5b9e_7a11);
    idx.shuffle(&mut rng);
    idx.truncate(options.supervised_images);
    idx.sort_unstable();
    if idx.is_empty() {
        return Err(AnomalyPipelineError::Invalid(format!(
            "{}: no normal or fully masked images to train the supervised head on",
            train.manifest.display()
        )));
    }
    let n_train_anomalous = idx.iter().filter(|&&i| !train.items[i].normal).count();
    if n_train_anomalous == 0 {
        return Err(AnomalyPipelineError::Invalid(format!(
            "{}: the supervised head needs anomalous images with finding masks; none found",
            train.manifest.display()
        )));
    }
    let images = load_images(m, &train.seg_task(&idx), device)?;
    let size = images[0].grey.dim(1)?;
    let mut samples = Vec::with_capacity(images.len());
    for img in &images {
        let text = texts
            .iter()
            .find(|(mo, _)| mo == &img.modality)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| {
                AnomalyPipelineError::Invalid(format!(
                    "{}: no abnormal text for its modality",
                    img.path.display()
                ))
            })?;
        samples.push(SegSample {
            patches: img.patches.clone(),
            text,
            grey: img.grey.clone(),
            mask: Tensor::from_vec(union_mask(img, size), (1, size, size), &Device::Cpu)?,
        });
    }
    let (n_tokens, dim) = images[0].patches.dims2()?;
    let grid = grid_of(m, n_tokens)?;
    let mut cfg = SegHeadConfig::new(dim, texts[0].1.dim(0)?, grid, size);
    cfg.steps = options.supervised_steps;
    cfg.seed = options.seed;
    let trained = train_head(&cfg, &samples, device)?;
    let tail = &trained.losses[trained.losses.len().saturating_sub(10)..];
    let final_loss = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    Ok((
        SupervisedHead {
            head: trained.head,
            varmap: trained.varmap,
        },
        SupervisedCard {
            head: cfg,
            n_train_images: images.len(),
            n_train_anomalous,
            n_skipped_unmasked,
            final_loss,
        },
    ))
}

/// Supervised maps (sigmoid probabilities at the input size) and scores (the map maximum).
fn score_supervised(
    head: &SupervisedHead,
    text: &Tensor,
    images: &[LoadedImage],
) -> Result<Vec<ScoredImage>> {
    let samples: Vec<SegSample> = images
        .iter()
        .map(|img| {
            let (_, s, _) = img.grey.dims3()?;
            Ok(SegSample {
                patches: img.patches.clone(),
                text: text.clone(),
                grey: img.grey.clone(),
                mask: Tensor::zeros((1, s, s), DType::F32, &Device::Cpu)?,
            })
        })
        .collect::<Result<_>>()?;
    predict_probabilities(&head.head, &samples)?
        .into_iter()
        .map(|p| {
            let map: Vec<f32> = p.flatten_all()?.to_vec1()?;
            let score = map.iter().copied().fold(f32::MIN, f32::max);
            Ok(ScoredImage { map, score })
        })
        .collect()
}

/// The weakly supervised window scorer of one modality (see [`crate::window_mil`]): trained
/// on the window embeddings of a seeded draw of at most `supervised_images` of the
/// modality's training images with their normal / abnormal labels, from the zero-shot
/// direction of the state embeddings `text`.
fn train_weak(
    m: &LoadedModel,
    train: &AnomalyTask,
    modality: &Option<String>,
    text: &Tensor,
    grid: (usize, usize),
    options: &AnomalyOptions,
    device: &Device,
) -> Result<(crate::window_mil::WindowScorer, WeakTraining)> {
    let mut idx: Vec<usize> = (0..train.items.len())
        .filter(|&i| &train.items[i].item.modality == modality)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x3ea4_91c5);
    idx.shuffle(&mut rng);
    idx.truncate(options.supervised_images);
    idx.sort_unstable();
    let mut batches: Vec<Vec<Tensor>> = Vec::new();
    let mut visit = |px: &Tensor| -> std::result::Result<(), SegPipelineError> {
        let (per_scale, _) =
            crate::winclip::window_embeddings(m.model.as_ref(), px, grid, &options.windows)
                .map_err(|e| SegPipelineError::Invalid(format!("WinCLIP windows: {e}")))?;
        batches.push(per_scale);
        Ok(())
    };
    load_images_visiting(m, &train.seg_task(&idx), &mut visit, device)?;
    let per_scale = cat_scales(&batches)?;
    let labels: Vec<bool> = idx.iter().map(|&i| !train.items[i].normal).collect();
    let init = crate::window_mil::zero_shot_direction(
        text,
        crate::winclip::logit_scale(m.model.as_ref())?,
    )?;
    let config = crate::window_mil::WindowMilConfig {
        steps: options.weak_steps,
        ..Default::default()
    };
    let (scorer, losses) = crate::window_mil::train_window_scorer(
        &per_scale, &labels, &init, &config,
    )
    .map_err(|e| {
        AnomalyPipelineError::Invalid(format!(
            "modality {}: weak supervision: {e}",
            modality.as_deref().unwrap_or("(none)")
        ))
    })?;
    let tail = &losses[losses.len().saturating_sub(10)..];
    Ok((
        scorer,
        WeakTraining {
            n_images: labels.len(),
            n_abnormal: labels.iter().filter(|&&l| l).count(),
            final_loss: tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        },
    ))
}

/// What a modality's weak window scorer was trained on (in the card).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WeakTraining {
    /// Training images (normal and abnormal).
    pub n_images: usize,
    /// Of them abnormal.
    pub n_abnormal: usize,
    /// Mean loss of the last 10 steps.
    pub final_loss: f32,
}

/// Window embeddings of several batches (each per scale `[B_i, W_s, E]`) joined per scale
/// along the images.
fn cat_scales(batches: &[Vec<Tensor>]) -> Result<Vec<Tensor>> {
    let n_scales = batches.first().map_or(0, Vec::len);
    Ok((0..n_scales)
        .map(|k| Tensor::cat(&batches.iter().map(|b| &b[k]).collect::<Vec<_>>(), 0))
        .collect::<candle_core::Result<Vec<_>>>()?)
}

fn grid_of(m: &LoadedModel, patches: usize) -> Result<(usize, usize)> {
    let g = (patches as f64).sqrt().round() as usize;
    if g * g != patches {
        return Err(AnomalyPipelineError::Invalid(format!(
            "the image tower gives {patches} patch tokens, not a square grid (a ViT is needed; \
             model input {} px)",
            m.model.image_size()
        )));
    }
    Ok((g, g))
}

fn stack_patches(images: &[LoadedImage]) -> Result<Tensor> {
    let v: Vec<Tensor> = images.iter().map(|i| i.patches.clone()).collect();
    Ok(Tensor::stack(&v, 0)?)
}

fn grey_of(img: &LoadedImage) -> Result<Vec<f32>> {
    Ok(img.grey.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// Fits one detector per modality of `train` (see the module docs). `calib`: the split whose
/// normal images set the threshold; without it, the training normals outside the memory.
pub fn fit(
    m: LoadedModel,
    model_spec: &str,
    train: &AnomalyTask,
    calib: Option<&AnomalyTask>,
    options: &AnomalyOptions,
    device: &Device,
) -> Result<AnomalyDetector> {
    if options.shots == 0 {
        return Err(AnomalyPipelineError::Invalid(
            "shots must be at least 1".into(),
        ));
    }
    // WinCLIP's windows (zero-shot windows, window memory, weak scorer): when the tower
    // encodes windows and scales are given (none: `--no-windows`).
    let uses_windows = m.model.supports_image_windows() && !options.windows.scales.is_empty();
    let mut modalities = Vec::new();
    let mut cards = Vec::new();
    let mut size = 0;
    let supervised = if options.supervised_steps > 0 {
        let texts: Vec<(Option<String>, Tensor)> = train
            .modalities()
            .into_iter()
            .map(|mo| Ok((mo.clone(), abnormal_text(&m, mo.as_deref(), device)?)))
            .collect::<Result<_>>()?;
        Some((train_supervised(&m, train, &texts, options, device)?, texts))
    } else {
        None
    };
    for modality in train.modalities() {
        let mut normals: Vec<usize> = (0..train.items.len())
            .filter(|&i| train.items[i].normal && train.items[i].item.modality == modality)
            .collect();
        let name = modality.clone().unwrap_or_else(|| "(no modality)".into());
        if normals.len() < options.shots {
            return Err(AnomalyPipelineError::Invalid(format!(
                "{}: modality {name} has {} normal training image(s), fewer than the {} shots",
                train.manifest.display(),
                normals.len(),
                options.shots
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        normals.shuffle(&mut rng);
        let (mem_idx, rest) = normals.split_at(options.shots);
        // The memory images' pixels (a few shots) are kept for their windows (WinCLIP+),
        // embedded once the patch grid is known.
        let mut mem_pixels: Vec<Tensor> = Vec::new();
        let mem_images = if uses_windows {
            let mut keep = |px: &Tensor| -> std::result::Result<(), SegPipelineError> {
                mem_pixels.push(px.clone());
                Ok(())
            };
            load_images_visiting(&m, &train.seg_task(mem_idx), &mut keep, device)?
        } else {
            load_images(&m, &train.seg_task(mem_idx), device)?
        };
        size = (mem_images[0].grey.dim(1)?).max(size);
        let patches = stack_patches(&mem_images)?;
        let grid = grid_of(&m, patches.dim(1)?)?;
        if uses_windows {
            for &side in &options.windows.scales {
                crate::winclip::square_windows(grid, side, options.windows.stride)?;
            }
        }
        let memory = NormalMemory::fit(&patches, grid, options.memory.clone())?;
        let normal_means = l2_normalize(&patches.mean(1)?)?;
        let greys: Vec<Vec<f32>> = mem_images.iter().map(grey_of).collect::<Result<_>>()?;
        let normal_grey: Vec<f32> = (0..greys[0].len())
            .map(|p| greys.iter().map(|g| g[p]).sum::<f32>() / greys.len() as f32)
            .collect();
        let window_memory = if mem_pixels.is_empty() {
            None
        } else {
            let batches = mem_pixels
                .iter()
                .map(|px| {
                    Ok(crate::winclip::window_embeddings(
                        m.model.as_ref(),
                        px,
                        grid,
                        &options.windows,
                    )?
                    .0)
                })
                .collect::<Result<Vec<_>>>()?;
            Some(crate::winclip::WindowMemory::fit(&cat_scales(&batches)?)?)
        };
        if options.decide_with == DecisionMethod::WindowMemory
            && window_memory.is_none()
            && options.supervised_steps == 0
        {
            return Err(AnomalyPipelineError::Invalid(
                "deciding with the window memory needs WinCLIP's windows: an image tower that \
                 encodes them (a ViT with a class token: CLIP, BiomedCLIP) and window scales"
                    .into(),
            ));
        }
        // Calibration normals (with the window memory's maps of the same pixels).
        let calib_task = match calib {
            Some(c) => {
                let idx: Vec<usize> = (0..c.items.len())
                    .filter(|&i| c.items[i].normal && c.items[i].item.modality == modality)
                    .collect();
                c.seg_task(&idx)
            }
            None => train.seg_task(rest),
        };
        let mut calib_window_maps = Vec::new();
        let calib_images = match &window_memory {
            Some(wm) => {
                let mut visit =
                    window_memory_visitor(&m, wm, grid, &options.windows, &mut calib_window_maps);
                load_images_visiting(&m, &calib_task, &mut visit, device)?
            }
            None => load_images(&m, &calib_task, device)?,
        };
        if calib_images.is_empty() {
            return Err(AnomalyPipelineError::Invalid(format!(
                "modality {name}: no normal calibration images (give a calibration split, or \
                 more normal training images than shots)"
            )));
        }
        let s = memory.patch_scores(&stack_patches(&calib_images)?)?;
        let maps = anomaly_maps(&s, grid, size, options.memory.sigma)?;
        let threshold = Threshold::on_normals(&image_scores(&maps), options.fpr)?;
        let window_threshold = match &window_memory {
            Some(_) => {
                let scored =
                    scored_from_patch_maps(&calib_window_maps, grid, size, options.memory.sigma)?;
                let scores: Vec<f32> = scored.iter().map(|s| s.score).collect();
                Some(Threshold::on_normals(&scores, options.fpr)?)
            }
            None => None,
        };
        let supervised_branch = match &supervised {
            Some(((head, _), texts)) => {
                let text = texts
                    .iter()
                    .find(|(mo, _)| mo == &modality)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| {
                        AnomalyPipelineError::Invalid(format!("modality {name}: no abnormal text"))
                    })?;
                let scores: Vec<f32> = score_supervised(head, &text, &calib_images)?
                    .iter()
                    .map(|s| s.score)
                    .collect();
                Some(SupervisedModality {
                    text,
                    threshold: Threshold::on_normals(&scores, options.fpr)?,
                })
            }
            None => None,
        };
        let memory_images: Vec<PathBuf> = mem_images.iter().map(|i| i.path.clone()).collect();
        let zero_shot_text = if mem_images[0].projected.is_some() || uses_windows {
            let (normal, abnormal) = state_prompts(modality.as_deref());
            let mut lists = vec![normal];
            lists.extend(abnormal);
            Some(crate::segmentation_pipeline::prompt_embeddings(
                &m, &lists, device,
            )?)
        } else {
            None
        };
        let weak = match (&window_memory, &zero_shot_text, options.weak_steps) {
            (Some(_), Some(text), steps) if steps > 0 => Some(train_weak(
                &m, train, &modality, text, grid, options, device,
            )?),
            (None, _, steps) if steps > 0 => {
                return Err(AnomalyPipelineError::Invalid(
                    "weak supervision trains on WinCLIP windows: it needs an image tower that \
                     encodes them (a ViT with a class token: CLIP, BiomedCLIP) and window scales"
                        .into(),
                ))
            }
            _ => None,
        };
        let (weak, weak_training) = match weak {
            Some((scorer, t)) => (Some(scorer), Some(t)),
            None => (None, None),
        };
        cards.push(ModalityCard {
            modality: modality.clone(),
            threshold,
            memory_images: memory_images.clone(),
            grid,
            supervised_threshold: supervised_branch.as_ref().map(|s| s.threshold),
            window_threshold,
            weak_training,
        });
        modalities.push(ModalityDetector {
            modality,
            memory,
            threshold,
            normal_means,
            normal_grey,
            memory_images,
            zero_shot_text,
            supervised: supervised_branch,
            window_memory,
            window_threshold,
            decide_with: options.decide_with,
            weak,
        });
    }
    let (supervised, supervised_card) = match supervised {
        Some(((head, card), _)) => (Some(head), Some(card)),
        None => (None, None),
    };
    let card = AnomalyCard {
        format: CARD_FORMAT.into(),
        model_spec: model_spec.to_string(),
        model_fingerprint: model_fingerprint(model_spec, &m),
        image_size: size,
        options: options.clone(),
        modalities: cards,
        supervised: supervised_card,
        medvlm_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(AnomalyDetector {
        modalities,
        card,
        supervised,
        model: m,
    })
}

/// Scores of one image by one method.
#[derive(Debug, Clone)]
pub struct ScoredImage {
    /// Anomaly map at the model's input size, row-major.
    pub map: Vec<f32>,
    /// Image score.
    pub score: f32,
}

impl ScoredImage {
    /// The map as a `size x size` grey plane in `[0, 1]` for display: `map / (2 threshold)`,
    /// so mid-grey is the decision threshold and white twice it.
    pub fn map_plane(
        &self,
        size: usize,
        threshold: f32,
    ) -> std::result::Result<medvlm_io::Plane, String> {
        let t = threshold.max(1e-6);
        medvlm_io::Plane::new(
            size,
            size,
            1,
            self.map
                .iter()
                .map(|v| (v / (2.0 * t)).clamp(0.0, 1.0))
                .collect(),
        )
        .map_err(|e| e.to_string())
    }
}

/// Metrics of one method on one modality.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodMetrics {
    /// Image AUROC (normal vs anomalous).
    pub image_auroc: Option<f64>,
    /// Pixel AUROC over the fully masked images.
    pub pixel_auroc: Option<f64>,
    /// AUPRO up to FPR 0.3 over the fully masked images.
    pub aupro: Option<f64>,
}

/// Evaluation of one modality.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModalityEvaluation {
    /// The modality.
    pub modality: Option<String>,
    /// Normal test images.
    pub n_normal: usize,
    /// Anomalous test images.
    pub n_anomalous: usize,
    /// Anomalous images left out of the pixel metrics (a finding without a mask).
    pub n_unmasked: usize,
    /// The memory method.
    pub memory: MethodMetrics,
    /// The zero-shot branch on patch tokens (no normal images; `None` without projected
    /// patch tokens).
    pub zero_shot: Option<MethodMetrics>,
    /// The zero-shot branch on WinCLIP's windows (`None`: the tower has no windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_shot_windows: Option<MethodMetrics>,
    /// WinCLIP+'s window-level memory alone (`None`: the detector has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_memory: Option<MethodMetrics>,
    /// The window memory's decision at its threshold: shares of normal (FPR) and anomalous
    /// (TPR) images called anomalous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_memory_rates: Option<(f64, f64)>,
    /// The window scorer trained from image labels only (`None`: the detector has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_weak: Option<MethodMetrics>,
    /// WinCLIP+: the mean of the zero-shot windows' map and the few-shot map (the mean of the
    /// patch memory's and the window memory's), and of their image scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winclip_plus: Option<MethodMetrics>,
    /// Baseline: mean patch token's distance to the nearest normal (image level).
    pub global_baseline_image_auroc: Option<f64>,
    /// Baseline: smoothed difference from the mean normal image (localisation).
    pub pixel_difference_baseline: MethodMetrics,
    /// Share of normal test images above the threshold.
    pub false_positive_rate: f64,
    /// Share of anomalous test images above the threshold.
    pub true_positive_rate: f64,
    /// The threshold's target FPR.
    pub target_false_positive_rate: f64,
    /// The supervised branch (`None`: the detector has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised: Option<SupervisedEvaluation>,
}

/// The supervised branch's metrics and its decision at its own threshold.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisedEvaluation {
    /// Image AUROC, pixel AUROC, AUPRO.
    pub metrics: MethodMetrics,
    /// Share of normal test images above its threshold.
    pub false_positive_rate: f64,
    /// Share of anomalous test images above its threshold.
    pub true_positive_rate: f64,
}

/// Evaluation of a detector on a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnomalyEvaluation {
    /// The manifest.
    pub manifest: PathBuf,
    /// Per modality.
    pub modalities: Vec<ModalityEvaluation>,
}

impl AnomalyDetector {
    /// The model.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    fn detector_of(&self, modality: &Option<String>) -> Result<&ModalityDetector> {
        self.modalities
            .iter()
            .find(|d| &d.modality == modality)
            .ok_or_else(|| {
                AnomalyPipelineError::Invalid(format!(
                    "the detector has no memory for modality {} (fitted: {})",
                    modality.as_deref().unwrap_or("(none)"),
                    self.modalities
                        .iter()
                        .map(|d| d.modality.as_deref().unwrap_or("(none)"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Maps and scores of loaded images of one modality by the method the detector decides
    /// with: the supervised branch when it has one, else the memory (compare with
    /// [`ModalityDetector::decision_threshold`]).
    /// `window_maps`: the window memory's patch maps of the same images, needed when the
    /// detector decides with it ([`ModalityDetector::decides_with_windows`]).
    pub fn score(
        &self,
        det: &ModalityDetector,
        images: &[LoadedImage],
        window_maps: &[Vec<f32>],
    ) -> Result<Vec<ScoredImage>> {
        match (&self.supervised, &det.supervised) {
            (Some(head), Some(s)) => score_supervised(head, &s.text, images),
            _ if det.decides_with_windows() => {
                if window_maps.len() != images.len() {
                    return Err(AnomalyPipelineError::Invalid(format!(
                        "{} window-memory maps for {} images",
                        window_maps.len(),
                        images.len()
                    )));
                }
                scored_from_patch_maps(
                    window_maps,
                    det.memory.grid,
                    self.card.image_size,
                    det.memory.config.sigma,
                )
            }
            _ => self.score_memory(det, images),
        }
    }

    /// Memory-method maps and scores of loaded images of one modality.
    pub fn score_memory(
        &self,
        det: &ModalityDetector,
        images: &[LoadedImage],
    ) -> Result<Vec<ScoredImage>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let s = det.memory.patch_scores(&stack_patches(images)?)?;
        scored_from_patch_scores(
            &s,
            det.memory.grid,
            self.card.image_size,
            det.memory.config.sigma,
        )
    }

    /// Evaluates on `task` per modality (see the module docs).
    pub fn evaluate(&self, task: &AnomalyTask, device: &Device) -> Result<AnomalyEvaluation> {
        let mut out = Vec::new();
        for modality in task.modalities() {
            let det = self.detector_of(&modality)?;
            let idx: Vec<usize> = (0..task.items.len())
                .filter(|&i| task.items[i].item.modality == modality)
                .collect();
            // WinCLIP's windows read the pixels of each batch as the images are loaded: the
            // zero-shot scores and, with a window memory, its maps.
            let mut windows: Option<WindowScores> = None;
            let mut window_memory_maps: Vec<Vec<f32>> = Vec::new();
            let mut weak_maps: Vec<Vec<f32>> = Vec::new();
            let mut weak_scores: Vec<f32> = Vec::new();
            let images = match (
                &det.zero_shot_text,
                self.model.model.supports_image_windows()
                    && !self.card.options.windows.scales.is_empty(),
            ) {
                (Some(text), true) => {
                    let acc = windows.get_or_insert(WindowScores {
                        patch_maps: Vec::new(),
                        image_scores: Vec::new(),
                    });
                    let wm_maps = &mut window_memory_maps;
                    let (wk_maps, wk_scores) = (&mut weak_maps, &mut weak_scores);
                    let mut visit = |px: &Tensor| -> std::result::Result<(), SegPipelineError> {
                        let err = |e: crate::anomaly::AnomalyError| {
                            SegPipelineError::Invalid(format!("WinCLIP windows: {e}"))
                        };
                        let model = self.model.model.as_ref();
                        let (grid, cfg) = (det.memory.grid, &self.card.options.windows);
                        let (per_scale, whole) =
                            crate::winclip::window_embeddings(model, px, grid, cfg).map_err(err)?;
                        let scale = crate::winclip::logit_scale(model).map_err(err)?;
                        let z = crate::winclip::zero_shot_from(
                            &per_scale, &whole, text, scale, grid, cfg,
                        )
                        .map_err(err)?;
                        acc.patch_maps.extend(z.patch_maps);
                        acc.image_scores.extend(z.image_scores);
                        if let Some(wm) = &det.window_memory {
                            wm_maps.extend(wm.patch_maps(&per_scale, grid, cfg).map_err(err)?);
                        }
                        if let Some(w) = &det.weak {
                            let (maps, scores) = w.score(&per_scale, grid, cfg).map_err(err)?;
                            wk_maps.extend(maps);
                            wk_scores.extend(scores);
                        }
                        Ok(())
                    };
                    load_images_visiting(&self.model, &task.seg_task(&idx), &mut visit, device)?
                }
                _ => load_images(&self.model, &task.seg_task(&idx), device)?,
            };
            let scored = self.score_memory(det, &images)?;
            let anomalous: Vec<bool> = idx.iter().map(|&i| !task.items[i].normal).collect();
            let masked: Vec<bool> = idx.iter().map(|&i| task.items[i].fully_masked).collect();
            let size = self.card.image_size;
            let defect: Vec<Vec<bool>> = images
                .iter()
                .map(|im| {
                    let mut d = vec![false; size * size];
                    for m in im.masks.values() {
                        for (a, &b) in d.iter_mut().zip(m) {
                            *a |= b != 0;
                        }
                    }
                    d
                })
                .collect();
            let scores: Vec<f32> = scored.iter().map(|s| s.score).collect();
            let pixel_metrics = |maps: &[&Vec<f32>]| -> Result<MethodMetrics> {
                let pm: Vec<PixelMap> = maps
                    .iter()
                    .zip(&defect)
                    .zip(&masked)
                    .filter(|(_, &m)| m)
                    .map(|((map, d), _)| PixelMap {
                        scores: map,
                        defect: d,
                        height: size,
                        width: size,
                    })
                    .collect();
                Ok(MethodMetrics {
                    image_auroc: None,
                    pixel_auroc: if pm.is_empty() {
                        None
                    } else {
                        pixel_auroc(&pm)?
                    },
                    aupro: if pm.is_empty() {
                        None
                    } else {
                        aupro(&pm, DEFAULT_FPR_LIMIT)?
                    },
                })
            };
            let mut memory = pixel_metrics(&scored.iter().map(|s| &s.map).collect::<Vec<_>>())?;
            memory.image_auroc = auroc_binary(&scores, &anomalous)?;
            // Baselines with the same normal images.
            let means = l2_normalize(&stack_patches(&images)?.mean(1)?)?;
            let global: Vec<f32> = means
                .matmul(&det.normal_means.t()?)?
                .max(D::Minus1)?
                .affine(-1.0, 1.0)?
                .to_vec1()?;
            let diff_maps: Vec<Vec<f32>> = images
                .iter()
                .map(|im| {
                    let g = grey_of(im)?;
                    let d: Vec<f32> = g
                        .iter()
                        .zip(&det.normal_grey)
                        .map(|(a, b)| (a - b).abs())
                        .collect();
                    let t = Tensor::from_vec(d, (1, size * size), &Device::Cpu)?;
                    // Reuse the map smoothing at full resolution (grid = size).
                    Ok(anomaly_maps(&t, (size, size), size, det.memory.config.sigma)?.remove(0))
                })
                .collect::<Result<_>>()?;
            let mut diff = pixel_metrics(&diff_maps.iter().collect::<Vec<_>>())?;
            diff.image_auroc = auroc_binary(&image_scores(&diff_maps), &anomalous)?;
            let zero_shot = match (
                &det.zero_shot_text,
                images.iter().all(|i| i.projected.is_some()),
            ) {
                (Some(text), true) => {
                    let proj: Vec<Tensor> =
                        images.iter().filter_map(|i| i.projected.clone()).collect();
                    let s = zero_shot_patch_scores(&Tensor::stack(&proj, 0)?, text)?;
                    let maps = anomaly_maps(&s, det.memory.grid, size, det.memory.config.sigma)?;
                    let mut zm = pixel_metrics(&maps.iter().collect::<Vec<_>>())?;
                    zm.image_auroc = auroc_binary(&image_scores(&maps), &anomalous)?;
                    Some(zm)
                }
                _ => None,
            };
            // The WinCLIP branches' maps at the image size (maps and image scores).
            let at_size = |patch_maps: &[Vec<f32>]| {
                scored_from_patch_maps(patch_maps, det.memory.grid, size, det.memory.config.sigma)
            };
            fn maps_of(s: &[ScoredImage]) -> Vec<&Vec<f32>> {
                s.iter().map(|x| &x.map).collect()
            }
            fn scores_of(s: &[ScoredImage]) -> Vec<f32> {
                s.iter().map(|x| x.score).collect()
            }
            let mean_maps = |a: &[&Vec<f32>], b: &[&Vec<f32>]| -> Vec<Vec<f32>> {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| x.iter().zip(y.iter()).map(|(p, q)| (p + q) / 2.0).collect())
                    .collect()
            };
            let metrics_of = |maps: &[&Vec<f32>], image: &[f32]| -> Result<MethodMetrics> {
                let mut m = pixel_metrics(maps)?;
                m.image_auroc = auroc_binary(image, &anomalous)?;
                Ok(m)
            };
            let window_scored = if window_memory_maps.is_empty() {
                None
            } else {
                Some(at_size(&window_memory_maps)?)
            };
            let window_memory = match &window_scored {
                Some(ws) => Some(metrics_of(&maps_of(ws), &scores_of(ws))?),
                None => None,
            };
            let window_weak = if det.weak.is_some() && !weak_maps.is_empty() {
                Some(metrics_of(&maps_of(&at_size(&weak_maps)?), &weak_scores)?)
            } else {
                None
            };
            let (zero_shot_windows, winclip_plus) = match &windows {
                Some(z) => {
                    let zero = at_size(&z.patch_maps)?;
                    // WinCLIP+: the few-shot map is the mean of the patch memory's and the
                    // window memory's (when the detector has one); the result, the mean of
                    // the zero-shot and few-shot maps, and of their image scores (the
                    // zero-shot probability, the few-shot map's maximum).
                    let memory_maps = maps_of(&scored);
                    let few_mean = window_scored
                        .as_ref()
                        .map(|ws| mean_maps(&memory_maps, &maps_of(ws)));
                    let (few, few_scores) = match &few_mean {
                        Some(m) => (m.iter().collect(), image_scores(m)),
                        None => (memory_maps, scores_of(&scored)),
                    };
                    let plus_maps = mean_maps(&maps_of(&zero), &few);
                    let plus_scores: Vec<f32> = z
                        .image_scores
                        .iter()
                        .zip(few_scores)
                        .map(|(a, b)| (a + b) / 2.0)
                        .collect();
                    (
                        Some(metrics_of(&maps_of(&zero), &z.image_scores)?),
                        Some(metrics_of(
                            &plus_maps.iter().collect::<Vec<_>>(),
                            &plus_scores,
                        )?),
                    )
                }
                None => (None, None),
            };
            // Share of normal (false) and anomalous (true) images called anomalous.
            let rates = |called: &[bool]| {
                let rate = |want: bool| {
                    let n = anomalous.iter().filter(|&&a| a == want).count();
                    let hit = called
                        .iter()
                        .zip(&anomalous)
                        .filter(|(&c, &a)| c && a == want)
                        .count();
                    if n == 0 {
                        0.0
                    } else {
                        hit as f64 / n as f64
                    }
                };
                (rate(false), rate(true))
            };
            let supervised = match (&self.supervised, &det.supervised) {
                (Some(head), Some(s)) => {
                    let sc = score_supervised(head, &s.text, &images)?;
                    let mut metrics =
                        pixel_metrics(&sc.iter().map(|x| &x.map).collect::<Vec<_>>())?;
                    let sscores: Vec<f32> = sc.iter().map(|x| x.score).collect();
                    metrics.image_auroc = auroc_binary(&sscores, &anomalous)?;
                    let (fpr, tpr) = rates(&s.threshold.decide(&sscores));
                    Some(SupervisedEvaluation {
                        metrics,
                        false_positive_rate: fpr,
                        true_positive_rate: tpr,
                    })
                }
                _ => None,
            };
            let (memory_fpr, memory_tpr) = rates(&det.threshold.decide(&scores));
            let window_memory_rates = match (&det.window_threshold, &window_scored) {
                (Some(t), Some(ws)) => Some(rates(&t.decide(&scores_of(ws)))),
                _ => None,
            };
            out.push(ModalityEvaluation {
                modality,
                n_normal: anomalous.iter().filter(|&&a| !a).count(),
                n_anomalous: anomalous.iter().filter(|&&a| a).count(),
                n_unmasked: anomalous
                    .iter()
                    .zip(&masked)
                    .filter(|(&a, &m)| a && !m)
                    .count(),
                memory,
                zero_shot,
                zero_shot_windows,
                window_memory,
                window_memory_rates,
                window_weak,
                winclip_plus,
                global_baseline_image_auroc: auroc_binary(&global, &anomalous)?,
                pixel_difference_baseline: diff,
                false_positive_rate: memory_fpr,
                true_positive_rate: memory_tpr,
                target_false_positive_rate: det.threshold.target_false_positive_rate,
                supervised,
            });
        }
        Ok(AnomalyEvaluation {
            manifest: task.manifest.clone(),
            modalities: out,
        })
    }

    /// Writes `dir/memory.safetensors` (memory rows, baseline means and mean grey per
    /// modality) and `dir/anomaly.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let mut tensors: std::collections::HashMap<String, Tensor> =
            std::collections::HashMap::new();
        for (i, d) in self.modalities.iter().enumerate() {
            tensors.insert(format!("{i}.memory"), d.memory.features.clone());
            tensors.insert(format!("{i}.normal_means"), d.normal_means.clone());
            if let Some(t) = &d.zero_shot_text {
                tensors.insert(format!("{i}.zero_shot_text"), t.clone());
            }
            if let Some(w) = &d.weak {
                tensors.insert(format!("{i}.weak_direction"), w.direction.clone());
                tensors.insert(format!("{i}.weak_bias"), w.bias.clone());
            }
            if let Some(wm) = &d.window_memory {
                for (k, t) in wm.per_scale.iter().enumerate() {
                    tensors.insert(format!("{i}.window_memory.{k}"), t.clone());
                }
            }
            let n = d.normal_grey.len();
            tensors.insert(
                format!("{i}.normal_grey"),
                Tensor::from_slice(&d.normal_grey, n, &Device::Cpu)?,
            );
        }
        let path = dir.join(TENSORS_FILE);
        medvlm_io::atomic::write_atomic_via(&path, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| file_err(&path, medvlm_io::guard::error_chain(&e)))?;
        if let Some(head) = &self.supervised {
            let mut t: std::collections::HashMap<String, Tensor> = {
                let data = head
                    .varmap
                    .data()
                    .lock()
                    .map_err(|_| AnomalyPipelineError::Invalid("poisoned varmap".into()))?;
                data.iter()
                    .map(|(k, v)| (format!("head.{k}"), v.as_tensor().clone()))
                    .collect()
            };
            for (i, d) in self.modalities.iter().enumerate() {
                if let Some(s) = &d.supervised {
                    t.insert(format!("{i}.abnormal_text"), s.text.clone());
                }
            }
            let path = dir.join(SUPERVISED_FILE);
            medvlm_io::atomic::write_atomic_via(&path, |tmp| {
                candle_core::safetensors::save(&t, tmp).map_err(std::io::Error::other)
            })
            .map_err(|e| file_err(&path, medvlm_io::guard::error_chain(&e)))?;
        }
        let card_path = dir.join(CARD_FILE);
        let json = serde_json::to_vec_pretty(&self.card).map_err(|e| file_err(&card_path, e))?;
        medvlm_io::atomic::write_atomic(&card_path, &json)
            .map_err(|e| file_err(&card_path, medvlm_io::guard::error_chain(&e)))
    }

    /// Loads a saved detector with its model (`model`: another spec for the same weights).
    pub fn load(dir: &Path, model: Option<&str>, device: &Device) -> Result<Self> {
        let card: AnomalyCard = read_json_card(
            dir,
            CARD_FILE,
            CARD_FORMAT,
            "anomaly detector",
            |c: &AnomalyCard| c.format.as_str(),
            file_err,
        )?;
        let spec = model.unwrap_or(&card.model_spec).to_string();
        let opts = medvlm_models::LoadOptions {
            device: device.clone(),
            ..Default::default()
        };
        let m = medvlm_models::load_model(&spec, &opts)?;
        let path = dir.join(TENSORS_FILE);
        let tensors =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| file_err(&path, e))?;
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .ok_or_else(|| file_err(&path, format!("tensor `{k}` is missing")))
        };
        let supervised_tensors = match &card.supervised {
            Some(_) => {
                let p = dir.join(SUPERVISED_FILE);
                Some((
                    candle_core::safetensors::load(&p, &Device::Cpu)
                        .map_err(|e| file_err(&p, e))?,
                    p,
                ))
            }
            None => None,
        };
        let supervised = match (&card.supervised, &supervised_tensors) {
            (Some(sc), Some((t, p))) => {
                let varmap = VarMap::new();
                let head = TextSegHead::new(
                    VarBuilder::from_varmap(&varmap, DType::F32, device),
                    &sc.head,
                )?;
                let data = varmap
                    .data()
                    .lock()
                    .map_err(|_| AnomalyPipelineError::Invalid("poisoned varmap".into()))?;
                for (name, var) in data.iter() {
                    let v = t
                        .get(&format!("head.{name}"))
                        .ok_or_else(|| file_err(p, format!("tensor `head.{name}` is missing")))?;
                    var.set(v)
                        .map_err(|e| file_err(p, format!("tensor `head.{name}`: {e}")))?;
                }
                drop(data);
                Some(SupervisedHead { head, varmap })
            }
            _ => None,
        };
        let mut modalities = Vec::new();
        for (i, mc) in card.modalities.iter().enumerate() {
            let supervised_branch = match (&mc.supervised_threshold, &supervised_tensors) {
                (Some(th), Some((t, p))) => Some(SupervisedModality {
                    text: t
                        .get(&format!("{i}.abnormal_text"))
                        .cloned()
                        .ok_or_else(|| {
                            file_err(p, format!("tensor `{i}.abnormal_text` is missing"))
                        })?,
                    threshold: *th,
                }),
                (Some(_), None) => {
                    return Err(file_err(
                        &dir.join(CARD_FILE),
                        "a modality has a supervised threshold but the card no supervised head",
                    ))
                }
                _ => None,
            };
            modalities.push(ModalityDetector {
                modality: mc.modality.clone(),
                memory: NormalMemory {
                    features: get(format!("{i}.memory"))?,
                    grid: mc.grid,
                    config: card.options.memory.clone(),
                },
                threshold: mc.threshold,
                normal_means: get(format!("{i}.normal_means"))?,
                normal_grey: get(format!("{i}.normal_grey"))?.to_vec1()?,
                memory_images: mc.memory_images.clone(),
                zero_shot_text: tensors.get(&format!("{i}.zero_shot_text")).cloned(),
                supervised: supervised_branch,
                // Detectors written before the window memory have none.
                window_memory: (0..card.options.windows.scales.len())
                    .map(|k| tensors.get(&format!("{i}.window_memory.{k}")).cloned())
                    .collect::<Option<Vec<_>>>()
                    .filter(|per_scale| !per_scale.is_empty())
                    .map(|per_scale| crate::winclip::WindowMemory { per_scale }),
                window_threshold: mc.window_threshold,
                decide_with: card.options.decide_with,
                weak: match (
                    tensors.get(&format!("{i}.weak_direction")),
                    tensors.get(&format!("{i}.weak_bias")),
                ) {
                    (Some(d), Some(b)) => Some(crate::window_mil::WindowScorer {
                        direction: d.clone(),
                        bias: b.clone(),
                    }),
                    _ if card.options.weak_steps > 0 => {
                        return Err(file_err(
                            &path,
                            format!("tensors `{i}.weak_direction` / `{i}.weak_bias` are missing"),
                        ))
                    }
                    _ => None,
                },
            });
            let d = modalities
                .last()
                .ok_or_else(|| AnomalyPipelineError::Invalid("no modality loaded".into()))?;
            if d.supervised.is_none()
                && d.decide_with == DecisionMethod::WindowMemory
                && !d.decides_with_windows()
            {
                return Err(file_err(
                    &path,
                    format!(
                        "the detector decides with the window memory, but modality {} has no \
                         window memory or threshold",
                        d.modality.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
        }
        Ok(Self {
            modalities,
            card,
            supervised,
            model: m,
        })
    }

    /// Scores image files of a modality: the loaded images (grey at the model's size), their
    /// maps and scores, and the decisions.
    pub fn predict_files(
        &self,
        files: &[PathBuf],
        modality: Option<&str>,
        device: &Device,
    ) -> Result<Vec<(LoadedImage, ScoredImage, bool)>> {
        let modality = modality.map(str::to_string);
        let det = self.detector_of(&modality)?;
        let task = SegTask {
            manifest: PathBuf::new(),
            items: files
                .iter()
                .map(|f| SegItem {
                    labels: Vec::new(),
                    boxes: Vec::new(),
                    image: f.clone(),
                    modality: modality.clone(),
                    findings: Vec::new(),
                })
                .collect(),
        };
        let mut window_maps = Vec::new();
        let images = match (&det.window_memory, det.decides_with_windows()) {
            (Some(wm), true) => {
                let cfg = &self.card.options.windows;
                let mut visit =
                    window_memory_visitor(&self.model, wm, det.memory.grid, cfg, &mut window_maps);
                load_images_visiting(&self.model, &task, &mut visit, device)?
            }
            _ => load_images(&self.model, &task, device)?,
        };
        let scored = self.score(det, &images, &window_maps)?;
        Ok(images
            .into_iter()
            .zip(scored)
            .map(|(im, s)| {
                let called = s.score > det.decision_threshold().value;
                (im, s, called)
            })
            .collect())
    }
}

impl AnomalyEvaluation {
    /// A Markdown table: per modality, image AUROC, pixel AUROC and AUPRO of the memory method
    /// and the baselines, and the decision's FPR/TPR.
    pub fn render_table(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        let mut s = String::from(
            "| modality | normal / anomalous | image AUROC (memory / zero-shot / global / pixel diff) | pixel AUROC (memory / zero-shot / pixel diff) | AUPRO@0.3 (memory / zero-shot / pixel diff) | FPR / TPR at threshold |\n|---|---|---|---|---|---|\n",
        );
        for m in &self.modalities {
            s.push_str(&format!(
                "| {} | {} / {}{} | {} / {} / {} / {} | {} / {} / {} | {} / {} / {} | {:.3} / {:.3} (target FPR {}) |\n",
                m.modality.as_deref().unwrap_or("-"),
                m.n_normal,
                m.n_anomalous,
                if m.n_unmasked > 0 {
                    format!(" ({} unmasked)", m.n_unmasked)
                } else {
                    String::new()
                },
                f(m.memory.image_auroc),
                f(m.zero_shot.as_ref().and_then(|z| z.image_auroc)),
                f(m.global_baseline_image_auroc),
                f(m.pixel_difference_baseline.image_auroc),
                f(m.memory.pixel_auroc),
                f(m.zero_shot.as_ref().and_then(|z| z.pixel_auroc)),
                f(m.pixel_difference_baseline.pixel_auroc),
                f(m.memory.aupro),
                f(m.zero_shot.as_ref().and_then(|z| z.aupro)),
                f(m.pixel_difference_baseline.aupro),
                m.false_positive_rate,
                m.true_positive_rate,
                m.target_false_positive_rate
            ));
        }
        if self
            .modalities
            .iter()
            .any(|m| m.zero_shot_windows.is_some() || m.winclip_plus.is_some())
        {
            s.push_str(
                "\nWinCLIP (zero-shot windows: window embeddings against the state prompts; window memory: nearest normal window; WinCLIP+: zero-shot and few-shot maps averaged):\n\n| modality | image AUROC (windows / window memory / WinCLIP+) | pixel AUROC (windows / window memory / WinCLIP+) | AUPRO@0.3 (windows / window memory / WinCLIP+) | window memory FPR / TPR at its threshold |\n|---|---|---|---|---|\n",
            );
            for m in &self.modalities {
                let w = m.zero_shot_windows.as_ref();
                let wm = m.window_memory.as_ref();
                let p = m.winclip_plus.as_ref();
                let three = |g: fn(&MethodMetrics) -> Option<f64>| {
                    format!(
                        "{} / {} / {}",
                        f(w.and_then(g)),
                        f(wm.and_then(g)),
                        f(p.and_then(g))
                    )
                };
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    m.modality.as_deref().unwrap_or("-"),
                    three(|x| x.image_auroc),
                    three(|x| x.pixel_auroc),
                    three(|x| x.aupro),
                    m.window_memory_rates
                        .map_or("-".to_string(), |(f, t)| format!("{f:.3} / {t:.3}")),
                ));
            }
        }
        // Image AUROC, pixel AUROC and AUPRO as three table cells.
        let cells = |x: &MethodMetrics| {
            format!(
                "{} | {} | {}",
                f(x.image_auroc),
                f(x.pixel_auroc),
                f(x.aupro)
            )
        };
        if self.modalities.iter().any(|m| m.window_weak.is_some()) {
            s.push_str(
                "\nWeakly supervised window scorer (trained from image labels only, MIL over the WinCLIP windows):\n\n| modality | image AUROC | pixel AUROC | AUPRO@0.3 |\n|---|---|---|---|\n",
            );
            for m in &self.modalities {
                if let Some(w) = &m.window_weak {
                    s.push_str(&format!(
                        "| {} | {} |\n",
                        m.modality.as_deref().unwrap_or("-"),
                        cells(w)
                    ));
                }
            }
        }
        if self.modalities.iter().any(|m| m.supervised.is_some()) {
            s.push_str(
                "\nSupervised head (trained on the training manifest's finding masks; the detector decides with it):\n\n| modality | image AUROC | pixel AUROC | AUPRO@0.3 | FPR / TPR at its threshold |\n|---|---|---|---|---|\n",
            );
            for m in &self.modalities {
                if let Some(sv) = &m.supervised {
                    s.push_str(&format!(
                        "| {} | {} | {:.3} / {:.3} |\n",
                        m.modality.as_deref().unwrap_or("-"),
                        cells(&sv.metrics),
                        sv.false_positive_rate,
                        sv.true_positive_rate
                    ));
                }
            }
        }
        s
    }
}

/// One predicted image: its score, decision and the files written.
#[derive(Debug, Clone, Serialize)]
pub struct PredictedAnomaly {
    /// The input.
    pub input: PathBuf,
    /// Image score (a volume: the highest slice score).
    pub score: f32,
    /// Whether the score is above the modality's threshold.
    pub anomalous: bool,
    /// The anomaly map as an 8-bit PNG (0 = lowest, 128 = the threshold, 255 = twice it);
    /// a volume: the slice with the highest score.
    pub map_png: PathBuf,
    /// The image with the region above the threshold outlined (a volume: the same slice).
    pub overlay_png: PathBuf,
    /// A NIfTI input: the anomaly map of every slice at the input's grid, float32, with its
    /// affine (`<stem>_anomaly.nii.gz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_nifti: Option<PathBuf>,
    /// A NIfTI input: the axis cut across, each slice's score and the slice shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices: Option<SliceScores>,
}

/// The slices of a volume scored by [`AnomalyDetector::predict_and_write`].
#[derive(Debug, Clone, Serialize)]
pub struct SliceScores {
    /// Axis cut across (0, 1, 2 = NIfTI x, y, z).
    pub axis: usize,
    /// Each slice's image score.
    pub scores: Vec<f32>,
    /// The slice with the highest score (shown in the PNGs).
    pub best: usize,
}

impl AnomalyDetector {
    /// Scores image files of a modality and writes `<stem>_anomaly.png` and
    /// `<stem>_overlay.png` per image into `out` (atomically). A NIfTI file is scored slice
    /// by slice across `axis` (0, 1, 2 = x, y, z; a 2-D NIfTI across its unit axis): its score
    /// is the highest slice score, its PNGs show that slice, and `<stem>_anomaly.nii.gz` holds
    /// every slice's map resized to the slice (triangle filter) with the input's affine.
    pub fn predict_and_write(
        &self,
        files: &[PathBuf],
        modality: Option<&str>,
        axis: usize,
        out: &Path,
        device: &Device,
    ) -> Result<Vec<PredictedAnomaly>> {
        if axis > 2 {
            return Err(AnomalyPipelineError::Invalid(format!(
                "axis {axis} is not 0, 1 or 2"
            )));
        }
        crate::segmentation_pipeline::check_distinct_stems(files)?;
        std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
        let det = self.detector_of(&modality.map(str::to_string))?;
        let mut loaded: Vec<Option<medvlm_io::MedImage>> = Vec::with_capacity(files.len());
        for f in files {
            // Only NIfTI files are read here; the others go through the batched 2-D path.
            let is_nifti = {
                let name = f.to_string_lossy().to_ascii_lowercase();
                name.ends_with(".nii") || name.ends_with(".nii.gz")
            };
            loaded.push(if is_nifti {
                Some(medvlm_io::load_any(f).map_err(|e| {
                    AnomalyPipelineError::from(SegPipelineError::Image {
                        path: f.clone(),
                        reason: medvlm_io::guard::error_chain(&e),
                    })
                })?)
            } else {
                None
            });
        }
        let flat: Vec<PathBuf> = files
            .iter()
            .zip(&loaded)
            .filter(|(_, l)| l.is_none())
            .map(|(f, _)| f.clone())
            .collect();
        let mut flat_scored = if flat.is_empty() {
            Vec::new()
        } else {
            self.predict_files(&flat, modality, device)?
        }
        .into_iter();
        let mut rows = Vec::with_capacity(files.len());
        for (file, img) in files.iter().zip(loaded) {
            match img {
                None => {
                    let (image, scored, called) = flat_scored
                        .next()
                        .ok_or_else(|| AnomalyPipelineError::Invalid("missing score".into()))?;
                    let (map_png, overlay_png) =
                        self.write_pngs(file, &image, &scored, det, out)?;
                    rows.push(PredictedAnomaly {
                        input: file.clone(),
                        score: scored.score,
                        anomalous: called,
                        map_png,
                        overlay_png,
                        map_nifti: None,
                        slices: None,
                    });
                }
                Some(img) => rows.push(self.predict_volume(file, &img, det, axis, out, device)?),
            }
        }
        Ok(rows)
    }

    /// `<stem>_anomaly.png` and `<stem>_overlay.png` of one scored image.
    fn write_pngs(
        &self,
        file: &Path,
        image: &LoadedImage,
        scored: &ScoredImage,
        det: &ModalityDetector,
        out: &Path,
    ) -> Result<(PathBuf, PathBuf)> {
        let size = self.card.image_size;
        let t = det.decision_threshold().value.max(1e-6);
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let stem = stem.strip_suffix(".nii").unwrap_or(&stem).to_string();
        let map_plane = scored
            .map_plane(size, det.decision_threshold().value)
            .map_err(|e| file_err(file, e))?;
        let map_png = out.join(format!("{stem}_anomaly.png"));
        medvlm_io::raster::write_png(&map_png, &map_plane)
            .map_err(|e| file_err(&map_png, medvlm_io::guard::error_chain(&e)))?;
        // The image as the model saw it, so the outline sits on the map's pixels.
        let grey = grey_of(image)?;
        let seen = medvlm_io::Plane::new(size, size, 1, grey).map_err(|e| file_err(file, e))?;
        let region: Vec<u8> = scored.map.iter().map(|&v| u8::from(v > t)).collect();
        let overlay_png = out.join(format!("{stem}_overlay.png"));
        medvlm_io::raster::write_png(
            &overlay_png,
            &crate::segmentation_pipeline::overlay(&seen, &region),
        )
        .map_err(|e| file_err(&overlay_png, medvlm_io::guard::error_chain(&e)))?;
        Ok((map_png, overlay_png))
    }

    fn predict_volume(
        &self,
        file: &Path,
        img: &medvlm_io::MedImage,
        det: &ModalityDetector,
        axis: usize,
        out: &Path,
        device: &Device,
    ) -> Result<PredictedAnomaly> {
        use crate::segmentation_pipeline::{load_planes_visiting, scatter_slice, volume_planes};
        let vp = volume_planes(file, img, axis)?;
        let mut window_maps = Vec::new();
        let images = match (&det.window_memory, det.decides_with_windows()) {
            (Some(wm), true) => {
                let cfg = &self.card.options.windows;
                let mut visit =
                    window_memory_visitor(&self.model, wm, det.memory.grid, cfg, &mut window_maps);
                let v: crate::segmentation_pipeline::PixelVisitor = &mut visit;
                load_planes_visiting(
                    &self.model,
                    &vp.planes,
                    file,
                    det.modality.clone(),
                    Some(v),
                    device,
                )?
            }
            _ => load_planes_visiting(
                &self.model,
                &vp.planes,
                file,
                det.modality.clone(),
                None,
                device,
            )?,
        };
        let scored = self.score(det, &images, &window_maps)?;
        let scores: Vec<f32> = scored.iter().map(|s| s.score).collect();
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)))
            .ok_or_else(|| {
                AnomalyPipelineError::Invalid(format!("{}: no slices", file.display()))
            })?;
        let size = self.card.image_size;
        let mut volume = vec![0f32; vp.dims3.iter().product()];
        for (k, (s, plane)) in scored.iter().zip(&vp.planes).enumerate() {
            let map = medvlm_io::Plane::new(size, size, 1, s.map.clone())
                .and_then(|m| medvlm_io::transforms::resize(&m, plane.rows, plane.cols))
                .map_err(|e| file_err(file, medvlm_io::guard::error_chain(&e)))?;
            scatter_slice(
                &mut volume,
                vp.dims3,
                vp.axis,
                k,
                (plane.rows, plane.cols),
                &map.data,
            );
        }
        let (map_png, overlay_png) =
            self.write_pngs(file, &images[best], &scored[best], det, out)?;
        let stem = map_png
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix("_anomaly.png"))
            .unwrap_or("image")
            .to_string();
        let nii = out.join(format!("{stem}_anomaly.nii.gz"));
        let affine = img
            .affine
            .unwrap_or_else(|| medvlm_io::volume::affine_from_spacing([1.0, 1.0, 1.0]));
        medvlm_io::volume::write_nifti1(&nii, &volume, &img.shape, &affine)
            .map_err(|e| file_err(&nii, medvlm_io::guard::error_chain(&e)))?;
        Ok(PredictedAnomaly {
            input: file.to_path_buf(),
            score: scores[best],
            anomalous: scores[best] > det.decision_threshold().value,
            map_png,
            overlay_png,
            map_nifti: Some(nii),
            slices: Some(SliceScores {
                axis: vp.axis,
                scores,
                best,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_prompts_use_the_phantom_vocabulary_or_generic_wording() {
        let (normal, abnormal) = state_prompts(Some("chest_xray"));
        assert!(!normal.is_empty());
        let m: medvlm_phantoms::Modality = "chest_xray".parse().unwrap();
        assert_eq!(abnormal.len(), m.findings().len());
        assert!(abnormal.iter().all(|p| !p.is_empty()));
        // Other modalities: WinCLIP's compositional ensemble, every state in every template.
        let (normal, abnormal) = state_prompts(Some("ultrasound"));
        assert_eq!(normal.len(), NORMAL_STATES.len() * STATE_TEMPLATES.len());
        assert_eq!(abnormal.len(), 1);
        assert_eq!(
            abnormal[0].len(),
            ABNORMAL_STATES.len() * STATE_TEMPLATES.len()
        );
        assert_eq!(normal[0], "a normal ultrasound image.");
        assert!(normal.contains(&"a photo of an unremarkable ultrasound image.".to_string()));
        assert!(abnormal[0]
            .contains(&"a medical image of a ultrasound image with a lesion.".to_string()));
        assert!(normal.iter().all(|p| p.contains("ultrasound image")));
        let (n2, _) = state_prompts(Some("knee_mri"));
        assert!(n2.contains(&"a scan showing a healthy knee mri image.".to_string()));
    }
}
