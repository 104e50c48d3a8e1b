//! The data path of training: image-text samples from a manifest (or built in memory), the
//! train and eval transforms of `medvlm-io`, and batches for [`crate::trainer::train`].
//!
//! Images are decoded once, in parallel (rayon, `data.workers` threads), windowed to `[0, 1]`
//! ([`medvlm_io::Window::Auto`]) and resized to the training size, so an epoch only applies the
//! cheap random augmentation. Augmentation of sample `i` in epoch `e` uses the ChaCha8 stream
//! `i` of a generator seeded by `(seed, e)` ([`augment_seed`]), so batches are reproducible and
//! independent of thread count and of where a run was resumed. The trainer prepares batches
//! ahead on a loader thread ([`crate::trainer::LoopConfig::prefetch`]).
//!
//! Pixels are normalised with the model's mean/std (CLIP's by default, as written to the saved
//! `preprocessor_config.json`), so a trained model sees the same inputs in `medvlm embed`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use medvlm_io::transforms::{Fit, TrainTransform};
use medvlm_io::{Manifest, Plane, PlaneSelect, Window};
use medvlm_models::tokenizer::TextTokenizer;
use medvlm_models::TokenBatch;
use rayon::prelude::*;

use crate::text_section::TextSection;
use crate::train_config::AugmentConfig;
use crate::trainer::{BatchSource, Result, TrainError};

/// One image-text pair.
#[derive(Debug, Clone)]
pub struct ImageTextSample {
    /// Identifier (the manifest's image path, or a study id).
    pub id: String,
    /// RGB image, HWC, values in `[0, 1]`, already at the training size.
    pub image: Plane,
    /// The paired text (report or caption).
    pub text: String,
    /// Labels (primary label first when known), for zero-shot evaluation.
    pub labels: Vec<String>,
    /// Group the sample belongs to (e.g. the modality), for per-group evaluation.
    pub group: Option<String>,
}

/// What loading a manifest skipped (nothing is dropped silently).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Records read.
    pub records: usize,
    /// Samples kept.
    pub kept: usize,
    /// Records skipped because their image could not be read, with the reason.
    pub bad_images: Vec<(PathBuf, String)>,
}

/// Replaces each sample's text by its `section` ([`TextSection::select`]) and returns how
/// many reports had no `Impression:` header and fell back to their last sentence.
pub fn apply_text_section(samples: &mut [ImageTextSample], section: TextSection) -> usize {
    let mut fell_back = 0;
    for s in samples.iter_mut() {
        let sel = section.select(&s.text);
        fell_back += usize::from(sel.fell_back);
        s.text = sel.text;
    }
    fell_back
}

/// Converts a decoded plane in `[0, 1]` (grey or RGB) to an RGB plane of `size x size`.
pub fn to_training_plane(plane: &Plane, size: usize) -> Result<Plane> {
    let t = medvlm_io::transforms::EvalTransform {
        size,
        fit: Fit::Crop,
    };
    let p = t
        .apply(plane)
        .map_err(|e| TrainError::Data(format!("resize: {e}")))?;
    Ok(medvlm_io::preprocess::to_rgb(p))
}

/// An RGB plane from interleaved u8 pixels (1 or 3 channels), e.g. a generated image.
pub fn plane_from_u8(pixels: &[u8], width: usize, height: usize, channels: usize) -> Result<Plane> {
    let data = pixels.iter().map(|&v| v as f32 / 255.0).collect();
    Plane::new(height, width, channels, data).map_err(|e| TrainError::Data(e.to_string()))
}

/// Reads the samples of `manifest`, optionally only one split. With `require_text`, a record
/// without text is an error naming it (pretraining needs pairs). Images that cannot be decoded
/// are skipped and listed in the report when `skip_bad`, else an error.
pub fn samples_from_manifest(
    manifest: &Manifest,
    split: Option<&str>,
    image_size: usize,
    require_text: bool,
    skip_bad: bool,
    workers: usize,
) -> Result<(Vec<ImageTextSample>, LoadReport)> {
    let records: Vec<_> = manifest
        .records
        .iter()
        .filter(|r| split.is_none_or(|s| r.split.as_deref() == Some(s)))
        .collect();
    if records.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no records{}",
            manifest.source.display(),
            split
                .map(|s| format!(" in split {s:?}"))
                .unwrap_or_default()
        )));
    }
    if require_text {
        if let Some((i, r)) = records
            .iter()
            .enumerate()
            .find(|(_, r)| r.text.as_deref().is_none_or(|t| t.trim().is_empty()))
        {
            return Err(TrainError::Data(format!(
                "{}: record {} ({}) has no text; pretraining needs an image-text pair in every record (the `text` field)",
                manifest.source.display(),
                i + 1,
                r.image
            )));
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers.max(1))
        .build()
        .map_err(|e| TrainError::Data(format!("cannot start loader threads: {e}")))?;
    let loaded: Vec<std::result::Result<ImageTextSample, (PathBuf, String)>> = pool.install(|| {
        records
            .par_iter()
            .map(|r| {
                let path = manifest.image_path(r);
                let plane = medvlm_io::load_any(&path)
                    .and_then(|img| {
                        medvlm_io::preprocess::windowed_plane(
                            &img,
                            &PlaneSelect::default(),
                            &Window::Auto,
                        )
                    })
                    .map_err(|e| (path.clone(), e.to_string()))?;
                let image = to_training_plane(&plane, image_size)
                    .map_err(|e| (path.clone(), e.to_string()))?;
                let mut labels = Vec::new();
                if let Some(l) = &r.label {
                    labels.push(l.clone());
                }
                for l in &r.labels {
                    if !labels.contains(l) {
                        labels.push(l.clone());
                    }
                }
                Ok(ImageTextSample {
                    id: r.image.clone(),
                    image,
                    text: r.text.clone().unwrap_or_default(),
                    labels,
                    group: r
                        .extra
                        .get("modality")
                        .and_then(|m| m.as_str())
                        .map(str::to_string),
                })
            })
            .collect()
    });
    let mut report = LoadReport {
        records: records.len(),
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(loaded.len());
    for item in loaded {
        match item {
            Ok(s) => samples.push(s),
            Err((path, reason)) => {
                if !skip_bad {
                    return Err(TrainError::Data(format!(
                        "cannot read image {}: {reason}",
                        path.display()
                    )));
                }
                report.bad_images.push((path, reason));
            }
        }
    }
    report.kept = samples.len();
    Ok((samples, report))
}

/// The training augmentation of `[data.augment]` at `size` pixels. `crop_scale` is an area
/// range; `TrainTransform` takes a side fraction, hence the square root.
pub fn train_transform(aug: &AugmentConfig, size: usize) -> TrainTransform {
    TrainTransform {
        size,
        crop_scale: (
            aug.crop_scale[0].sqrt() as f32,
            aug.crop_scale[1].sqrt() as f32,
        ),
        hflip_p: if aug.horizontal_flip { 0.5 } else { 0.0 },
        vflip_p: 0.0,
        max_rotation_deg: aug.rotation_degrees as f32,
        brightness: aug.brightness as f32,
        contrast: aug.contrast as f32,
        gamma: ((1.0 / (1.0 + aug.gamma)) as f32, (1.0 + aug.gamma) as f32),
        noise_std: aug.noise_std as f32,
        blur_sigma: (0.0, aug.blur_sigma as f32),
    }
}

/// Whether `aug` changes anything (the identity is skipped for speed).
pub fn augment_is_identity(aug: &AugmentConfig) -> bool {
    aug.crop_scale == [1.0, 1.0]
        && !aug.horizontal_flip
        && aug.rotation_degrees == 0.0
        && aug.brightness == 0.0
        && aug.contrast == 0.0
        && aug.gamma == 0.0
        && aug.noise_std == 0.0
        && aug.blur_sigma == 0.0
}

/// Seed of the augmentation generators of epoch `epoch` (sample `i` uses stream `i`).
pub fn augment_seed(seed: u64, epoch: u64) -> u64 {
    // splitmix64 of (seed, epoch): distinct, well-mixed seeds per epoch.
    let mut z = seed
        .wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch.wrapping_add(1)))
        .wrapping_add(0x6175_676d_656e_7431);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per-channel normalisation `(x - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalise {
    /// Channel means.
    pub mean: [f32; 3],
    /// Channel standard deviations.
    pub std: [f32; 3],
}

impl Normalise {
    /// CLIP's constants (OpenAI CLIP `preprocess`).
    pub const CLIP: Normalise = Normalise {
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };

    /// HWC RGB `[0, 1]` plane to normalised CHW values.
    pub fn chw(&self, plane: &Plane) -> Vec<f32> {
        let mut v = medvlm_io::preprocess::to_chw(plane);
        let n = plane.rows * plane.cols;
        for c in 0..3 {
            for x in &mut v[c * n..(c + 1) * n] {
                *x = (*x - self.mean[c]) / self.std[c];
            }
        }
        v
    }
}

/// Stacks planes (all `size x size` RGB) into a normalised `[B, 3, H, W]` tensor.
pub fn pixel_tensor(planes: &[&Plane], norm: &Normalise, device: &Device) -> Result<Tensor> {
    let first = planes
        .first()
        .ok_or_else(|| TrainError::Data("empty batch".into()))?;
    let (h, w) = (first.rows, first.cols);
    let mut data = Vec::with_capacity(planes.len() * 3 * h * w);
    for p in planes {
        if p.rows != h || p.cols != w || p.channels != 3 {
            return Err(TrainError::Data(format!(
                "batch mixes image shapes {}x{}x{} and {h}x{w}x3",
                p.rows, p.cols, p.channels
            )));
        }
        data.extend(norm.chw(p));
    }
    Ok(Tensor::from_vec(data, (planes.len(), 3, h, w), device)?)
}

/// A batch of image-text pairs.
#[derive(Debug)]
pub struct ImageTextBatch {
    /// `[B, 3, H, W]` normalised pixels.
    pub pixels: Tensor,
    /// Tokenised texts.
    pub tokens: TokenBatch,
    /// Sample indices.
    pub indices: Vec<usize>,
    /// `[B, L]` multi-hot labels over [`ContrastiveBatches::label_vocab`] (for the
    /// label-aware loss); all zeros for a sample without labels.
    pub labels: Tensor,
}

/// Contrastive batches of [`ImageTextSample`]s: augmented images and tokenised texts.
pub struct ContrastiveBatches<'a> {
    /// The samples.
    pub samples: &'a [ImageTextSample],
    /// The tokenizer of the model.
    pub tokenizer: &'a TextTokenizer,
    /// Augmentation (`None`: images used as stored).
    pub augment: Option<TrainTransform>,
    /// Normalisation of the model.
    pub normalise: Normalise,
    /// Run seed.
    pub seed: u64,
    /// Compute device.
    pub device: Device,
    /// Loader thread pool.
    pub pool: rayon::ThreadPool,
    /// Every label of the samples, sorted: the columns of [`ImageTextBatch::labels`].
    pub label_vocab: Vec<String>,
    /// `data.batch_grouping = "group"`: each batch drawn from one [`ImageTextSample::group`]
    /// (e.g. one modality) where possible, see [`crate::trainer::grouped_epoch_order`].
    pub group_batches: bool,
}

impl<'a> ContrastiveBatches<'a> {
    /// Builds the source with `workers` loader threads.
    pub fn new(
        samples: &'a [ImageTextSample],
        tokenizer: &'a TextTokenizer,
        augment: Option<TrainTransform>,
        seed: u64,
        workers: usize,
    ) -> Result<Self> {
        let mut label_vocab: Vec<String> = samples
            .iter()
            .flat_map(|s| s.labels.iter().cloned())
            .collect();
        label_vocab.sort();
        label_vocab.dedup();
        Ok(Self {
            label_vocab,
            group_batches: false,
            samples,
            tokenizer,
            augment,
            normalise: Normalise::CLIP,
            seed,
            device: Device::Cpu,
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(workers.max(1))
                .build()
                .map_err(|e| TrainError::Data(format!("cannot start loader threads: {e}")))?,
        })
    }
}

impl BatchSource for ContrastiveBatches<'_> {
    type Batch = ImageTextBatch;

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn epoch_order(&self, seed: u64, epoch: u64, batch_size: usize) -> Vec<usize> {
        if !self.group_batches {
            return crate::trainer::epoch_order(seed, epoch, self.samples.len());
        }
        let names: Vec<Option<&str>> = self.samples.iter().map(|s| s.group.as_deref()).collect();
        let mut distinct: Vec<Option<&str>> = names.clone();
        distinct.sort();
        distinct.dedup();
        let group_of = |i: usize| distinct.binary_search(&names[i]).unwrap_or(0);
        crate::trainer::grouped_epoch_order(seed, epoch, batch_size, group_of, self.samples.len())
    }

    fn load(&self, indices: &[usize], epoch: u64) -> Result<ImageTextBatch> {
        let seed = augment_seed(self.seed, epoch);
        let planes: Vec<Plane> = self.pool.install(|| {
            indices
                .par_iter()
                .map(|&i| {
                    let s = &self.samples[i];
                    match &self.augment {
                        Some(t) => t
                            .apply_seeded(&s.image, seed, i as u64)
                            .map_err(|e| TrainError::Data(format!("augment {}: {e}", s.id))),
                        None => Ok(s.image.clone()),
                    }
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let refs: Vec<&Plane> = planes.iter().collect();
        let pixels = pixel_tensor(&refs, &self.normalise, &self.device)?;
        let texts: Vec<&str> = indices
            .iter()
            .map(|&i| self.samples[i].text.as_str())
            .collect();
        let tokens = self
            .tokenizer
            .encode_batch(&texts, &self.device)
            .map_err(|e| TrainError::Data(format!("tokenise: {e}")))?;
        let width = self.label_vocab.len().max(1);
        let mut multi_hot = vec![0f32; indices.len() * width];
        for (row, &i) in indices.iter().enumerate() {
            for l in &self.samples[i].labels {
                if let Ok(col) = self.label_vocab.binary_search(l) {
                    multi_hot[row * width + col] = 1.0;
                }
            }
        }
        let labels = Tensor::from_vec(multi_hot, (indices.len(), width), &self.device)?;
        Ok(ImageTextBatch {
            pixels,
            tokens,
            indices: indices.to_vec(),
            labels,
        })
    }
}
