//! Text-conditioned synthesis end to end, what `medvlm synthesize train|sample|eval` runs:
//! classes and prompts read from a manifest, their text embeddings from the frozen VLM's text
//! tower, the conditional DDPM of [`crate::synthesis`] trained on the images, saved as an
//! artefact folder ([`Synthesizer`]), sampled for a prompt, and evaluated against the real
//! test images in the VLM's own image-feature space.
//!
//! # Classes and prompts
//!
//! With [`Condition::Modality`] (the default) a class is a modality (the manifest's extra key
//! `modality`) prompted with its name in words ("chest X-ray", "brain MRI"); with
//! [`Condition::Finding`] a class is `modality/label` (the record's `label`, else its first
//! `labels` entry) prompted as "`modality words` with `label words`" ("chest X-ray with
//! pleural effusion"; "normal chest X-ray" for `normal`). A record without what its class
//! needs is an error naming the image. The condition of an image is the L2-normalised text
//! embedding of its class's prompt. At sampling time a prompt that names a class
//! (`chest_xray`, `chest_xray/nodule`, or the prompt text itself) uses that class's stored
//! embedding; other text is embedded as given (best effort: the model saw only the class
//! prompts). **A prompt longer than the text tower's context is refused** (the tokenizer
//! would silently truncate it).
//!
//! # Images
//!
//! Each record's image as read by the models' preprocessing (PNG/JPEG/TIFF by bit depth,
//! DICOM/NIfTI through the automatic window), resized to the model's size by bicubic
//! interpolation when it differs, grey repeated to three channels (the model is RGB, as the
//! phantoms' dermoscopy and histology are), values in `[0, 1]`.
//!
//! # Evaluation ([`Synthesizer::evaluate`])
//!
//! `n_per_class` images are generated per class of the test manifest (DDIM, guidance and
//! seed as given). Every image, real or generated, is embedded with the VLM's image tower
//! (the model's preprocessing, plain resize, projected embedding, L2-normalised): **all the
//! metrics live in this VLM image-feature space**, not in Inception-v3's, so FID/KID values
//! are not comparable with published ones.
//!
//! * **FID (VLM features)** and **KID (VLM features)** (`medvlm_eval::generative`; KID with
//!   100 subsets of `min(1000, n)`) between the real test images and all the generated
//!   ones; beside them the same between an equally large random draw of real *training*
//!   images and the test images, the floor a perfect generator would reach at that size.
//! * **Alignment** (CLIP-style): the mean cosine between an image's embedding and its class
//!   prompt's text embedding, and the share of images whose own class prompt is the most
//!   similar of all class prompts (zero-shot accuracy), for generated and for real test
//!   images.
//! * **Classifier accuracy**: a multinomial logistic regression on the image embeddings
//!   trained on the real training images (`train_manifest`) is tested on the real test
//!   images and on the generated images of each prompted class (target: generated
//!   accuracy >= 0.8 x real accuracy); and the reverse, a probe trained on the generated
//!   images tested on the real test images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use medvlm_eval::generative::{frechet_distance, kernel_distance, KidConfig};
use medvlm_io::Plane;
use medvlm_models::LoadedModel;

use crate::card::read_json_card;
use crate::segmentation_pipeline::{
    load_head_artefact, model_fingerprint, read_plane, save_head_artefact, seg_preprocess,
    SegPipelineError,
};
use crate::super_resolution::bicubic_resize;
use crate::synthesis::{
    sample, train_ddpm, DdimOptions, DiffusionUNet, SynthConfig, SynthError, SynthSample,
};

/// Errors of the synthesis pipeline; each names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum SynthPipelineError {
    /// The manifest could not be read.
    #[error("cannot read the manifest {path}: {source}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: medvlm_io::IoError,
    },
    /// A record that cannot be used.
    #[error("image {path}: {reason}")]
    Record {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A prompt that cannot be used.
    #[error("prompt `{prompt}`: {reason}")]
    Prompt {
        /// The prompt (shortened when long).
        prompt: String,
        /// Why.
        reason: String,
    },
    /// Artefact files, images and model errors (named there; boxed, it is large).
    #[error(transparent)]
    Files(Box<SegPipelineError>),
    /// The diffusion model failed.
    #[error(transparent)]
    Model(#[from] SynthError),
    /// The VLM failed.
    #[error(transparent)]
    Vlm(#[from] medvlm_models::ModelError),
    /// A metric failed.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, SynthPipelineError>;

impl From<SegPipelineError> for SynthPipelineError {
    fn from(e: SegPipelineError) -> Self {
        Self::Files(Box::new(e))
    }
}

fn file_err(path: &Path, reason: impl ToString) -> SynthPipelineError {
    SynthPipelineError::Files(Box::new(SegPipelineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }))
}

// ---------------------------------------------------------------------------------------
// Classes and prompts
// ---------------------------------------------------------------------------------------

/// What a class is (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// One class per modality.
    #[default]
    Modality,
    /// One class per (modality, finding label).
    Finding,
}

impl std::str::FromStr for Condition {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "modality" => Ok(Self::Modality),
            "finding" => Ok(Self::Finding),
            o => Err(format!("condition `{o}`: `modality` or `finding`")),
        }
    }
}

/// A prompted class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthClass {
    /// `modality` or `modality/label`.
    pub name: String,
    /// Its prompt.
    pub prompt: String,
}

/// A modality name in words: `_` to spaces, `mri`/`ct`/`pet` upper-case, `xray` as `X-ray`.
pub fn modality_words(modality: &str) -> String {
    modality
        .split('_')
        .map(|w| match w {
            "mri" | "ct" | "pet" => w.to_ascii_uppercase(),
            "xray" => "X-ray".to_string(),
            _ => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The class name and prompt of a record's modality and label under `condition`.
pub fn class_of(condition: Condition, modality: &str, label: Option<&str>) -> Option<SynthClass> {
    let words = modality_words(modality);
    match condition {
        Condition::Modality => Some(SynthClass {
            name: modality.to_string(),
            prompt: words,
        }),
        Condition::Finding => {
            let label = label?;
            let prompt = if label == "normal" {
                format!("normal {words}")
            } else {
                format!("{words} with {}", label.replace('_', " "))
            };
            Some(SynthClass {
                name: format!("{modality}/{label}"),
                prompt,
            })
        }
    }
}

/// One image of the task and its class.
#[derive(Debug, Clone)]
pub struct SynthItem {
    /// The image file.
    pub image: PathBuf,
    /// Index into the task's classes.
    pub class: usize,
}

/// The images of a manifest (or split) with their classes.
#[derive(Debug, Clone)]
pub struct SynthTask {
    /// The manifest read.
    pub manifest: PathBuf,
    /// The classes, sorted by name.
    pub classes: Vec<SynthClass>,
    /// The images.
    pub items: Vec<SynthItem>,
}

impl SynthTask {
    /// Reads `manifest`; with `split`, only its records. A record without a modality (or,
    /// for [`Condition::Finding`], a label) is an error naming its image.
    pub fn from_manifest(
        manifest: &Path,
        split: Option<&str>,
        condition: Condition,
    ) -> Result<Self> {
        let m =
            medvlm_io::read_manifest(manifest).map_err(|source| SynthPipelineError::Manifest {
                path: manifest.to_path_buf(),
                source,
            })?;
        let mut by_name: BTreeMap<String, SynthClass> = BTreeMap::new();
        let mut raw = Vec::new();
        for r in m
            .records
            .iter()
            .filter(|r| split.is_none() || r.split.as_deref() == split)
        {
            let image = m.image_path(r);
            let modality = r.extra.get("modality").and_then(|v| v.as_str());
            let label = r.label.as_deref().or(r.labels.first().map(String::as_str));
            let Some(modality) = modality else {
                return Err(SynthPipelineError::Record {
                    path: image,
                    reason: "no `modality` in its manifest record (classes are modalities)".into(),
                });
            };
            let Some(cls) = class_of(condition, modality, label) else {
                return Err(SynthPipelineError::Record {
                    path: image,
                    reason: "no `label` in its manifest record (classes are modality/label)".into(),
                });
            };
            raw.push((image, cls.name.clone()));
            by_name.entry(cls.name.clone()).or_insert(cls);
        }
        if raw.is_empty() {
            return Err(SynthPipelineError::Invalid(format!(
                "{}: no records{}",
                manifest.display(),
                split
                    .map(|s| format!(" in split `{s}`"))
                    .unwrap_or_default()
            )));
        }
        let classes: Vec<SynthClass> = by_name.into_values().collect();
        let items = raw
            .into_iter()
            .map(|(image, name)| SynthItem {
                image,
                class: classes.iter().position(|c| c.name == name).unwrap_or(0),
            })
            .collect();
        Ok(Self {
            manifest: manifest.to_path_buf(),
            classes,
            items,
        })
    }
}

/// Refuses a prompt longer than the text tower's context (counted with the tokenizer's
/// special tokens, without its truncation), naming both lengths
/// ([`crate::text_condition::check_prompt_fits`]).
pub fn check_prompt_fits(m: &LoadedModel, prompt: &str) -> Result<()> {
    use crate::text_condition::TextConditionError;
    crate::text_condition::check_prompt_fits(m, prompt).map_err(|e| match e {
        TextConditionError::Prompt { prompt, reason } => {
            SynthPipelineError::Prompt { prompt, reason }
        }
        other => SynthPipelineError::Invalid(other.to_string()),
    })
}

/// L2-normalised text embeddings `[T, E]` of prompts (each checked to fit the context).
pub fn prompt_embeddings(m: &LoadedModel, prompts: &[String], device: &Device) -> Result<Tensor> {
    for p in prompts {
        check_prompt_fits(m, p)?;
    }
    let e = medvlm_models::embed::embed_texts(m, prompts, 64, device)?;
    Ok(medvlm_models::vlm::l2_normalize(&e)?)
}

// ---------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------

/// Reads an image as `size x size x channels` channels-last values in `[0, 1]` (see the module
/// doc); an unreadable file is an error naming it.
pub fn load_pixels(path: &Path, size: usize, channels: usize) -> Result<Vec<f32>> {
    let plane = read_plane(path)?;
    let c_in = plane.channels;
    if c_in != 1 && c_in != 3 {
        return Err(SynthPipelineError::Record {
            path: path.to_path_buf(),
            reason: format!("{c_in} channels; grey or RGB images only"),
        });
    }
    // Per channel planes, resized if needed.
    let mut planes: Vec<Vec<f32>> = (0..c_in)
        .map(|k| plane.data.iter().skip(k).step_by(c_in).copied().collect())
        .collect();
    if (plane.rows, plane.cols) != (size, size) {
        for p in &mut planes {
            *p = bicubic_resize(p, plane.rows, plane.cols, size, size).map_err(|e| {
                SynthPipelineError::Record {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        }
    }
    let mut out = Vec::with_capacity(size * size * channels);
    let px = |i: usize, k: usize| match (c_in, channels) {
        (1, _) => planes[0][i],
        (3, 1) => 0.299 * planes[0][i] + 0.587 * planes[1][i] + 0.114 * planes[2][i],
        _ => planes[k.min(c_in - 1)][i],
    };
    for i in 0..size * size {
        out.extend((0..channels).map(|k| px(i, k).clamp(0.0, 1.0)));
    }
    Ok(out)
}

/// L2-normalised image embeddings (one row per image) of channels-last `[S, S, C]` images in
/// `[0, 1]` by the VLM's image tower (its preprocessing with a plain resize to its size).
pub fn image_embeddings(
    m: &LoadedModel,
    images: &[Vec<f32>],
    size: usize,
    channels: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let pre = seg_preprocess(m, m.model.image_size());
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(32) {
        let mut pixels = Vec::with_capacity(chunk.len());
        for img in chunk {
            pixels.push(pre.apply_array(img, size, size, channels)?);
        }
        let px = pre.batch(&pixels, device)?;
        let e = m.model.encode_image(&px)?.embeds;
        let e =
            medvlm_models::vlm::l2_normalize(&e.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
        out.extend(e.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Writes channels-last `[0, 1]` pixels as an 8-bit PNG.
pub fn write_image_png(path: &Path, pixels: &[f32], size: usize, channels: usize) -> Result<()> {
    let plane = Plane {
        rows: size,
        cols: size,
        channels,
        data: pixels.to_vec(),
    };
    medvlm_io::raster::write_png(path, &plane)
        .map_err(|e| file_err(path, medvlm_io::guard::error_chain(&e)))
}

/// Writes a grid: one row per entry of `rows` (its images side by side), each tile `size`
/// px enlarged `zoom` times, 2-pixel white gaps; rows may differ in length.
pub fn write_grid(
    path: &Path,
    rows: &[Vec<&[f32]>],
    size: usize,
    channels: usize,
    zoom: usize,
) -> Result<()> {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    if rows.is_empty() || ncols == 0 {
        return Err(SynthPipelineError::Invalid("no images for the grid".into()));
    }
    let zoom = zoom.max(1);
    let t = size * zoom;
    let gap = 2;
    let (h, w) = (
        rows.len() * t + (rows.len() + 1) * gap,
        ncols * t + (ncols + 1) * gap,
    );
    let mut canvas = vec![1.0f32; h * w * channels];
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            if img.len() != size * size * channels {
                return Err(SynthPipelineError::Invalid(
                    "a grid image of the wrong size".into(),
                ));
            }
            let (y0, x0) = (gap + r * (t + gap), gap + c * (t + gap));
            for y in 0..t {
                for x in 0..t {
                    for k in 0..channels {
                        canvas[((y0 + y) * w + x0 + x) * channels + k] =
                            img[((y / zoom) * size + x / zoom) * channels + k];
                    }
                }
            }
        }
    }
    let plane = Plane {
        rows: h,
        cols: w,
        channels,
        data: canvas,
    };
    medvlm_io::raster::write_png(path, &plane)
        .map_err(|e| file_err(path, medvlm_io::guard::error_chain(&e)))
}

// ---------------------------------------------------------------------------------------
// The artefact
// ---------------------------------------------------------------------------------------

/// The JSON card of a synthesizer artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthCard {
    /// `medvlm-synthesizer/1`.
    pub format: String,
    /// Network and training settings.
    pub config: SynthConfig,
    /// What a class is.
    pub condition: Condition,
    /// The classes and prompts, in the order of the stored text embeddings.
    pub classes: Vec<SynthClass>,
    /// The VLM spec whose text tower conditions the model.
    pub model_spec: String,
    /// Fingerprint of that model folder.
    pub model_fingerprint: String,
    /// The training manifest.
    pub train_manifest: String,
    /// Its split used (`None`: every record).
    pub train_split: Option<String>,
    /// Training images.
    pub n_train_images: usize,
    /// Mean loss of the last 50 steps.
    pub final_loss: f32,
    /// Wall-clock training time in seconds (the diffusion model only).
    pub train_seconds: f64,
}

/// Format tag of the card.
pub const CARD_FORMAT: &str = "medvlm-synthesizer/1";
const CARD_FILE: &str = "synthesizer.json";
const WEIGHTS_FILE: &str = "weights.safetensors";

/// A trained synthesizer with its VLM (what the artefact folder holds, plus the model).
pub struct Synthesizer {
    /// The card.
    pub card: SynthCard,
    /// The diffusion network (averaged weights).
    pub net: DiffusionUNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// The classes' prompt embeddings `[C, E]`, L2-normalised.
    pub class_text: Tensor,
    /// The frozen VLM.
    pub model: LoadedModel,
}

/// Settings of [`train_synthesizer`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// VLM spec (directory, `hf:ORG/NAME` or preset).
    pub model_spec: String,
    /// Network and training settings (`text_dim` is set from the VLM).
    pub config: SynthConfig,
    /// What a class is.
    pub condition: Condition,
    /// Split of the manifest to train on (`None`: every record).
    pub split: Option<String>,
    /// Use at most this many images (the first ones).
    pub max_images: Option<usize>,
}

fn load_vlm(spec: &str, device: &Device) -> Result<LoadedModel> {
    let opts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    Ok(medvlm_models::load_model(spec, &opts)?)
}

/// Trains a synthesizer on `manifest` (see the module doc); `progress(step, loss)` after each
/// step.
pub fn train_synthesizer(
    manifest: &Path,
    opts: &TrainOptions,
    device: &Device,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<Synthesizer> {
    opts.config.validate()?;
    let task = SynthTask::from_manifest(manifest, opts.split.as_deref(), opts.condition)?;
    let model = load_vlm(&opts.model_spec, device)?;
    let prompts: Vec<String> = task.classes.iter().map(|c| c.prompt.clone()).collect();
    let class_text = prompt_embeddings(&model, &prompts, device)?;
    let mut cfg = opts.config.clone();
    cfg.text_dim = class_text.dim(1)?;
    let rows = class_text.to_vec2::<f32>()?;
    let n = opts
        .max_images
        .unwrap_or(task.items.len())
        .min(task.items.len());
    let mut samples = Vec::with_capacity(n);
    for it in &task.items[..n] {
        samples.push(SynthSample {
            pixels: load_pixels(&it.image, cfg.image_size, cfg.channels)?,
            text: rows[it.class].clone(),
        });
    }
    let t0 = std::time::Instant::now();
    let trained = train_ddpm(&cfg, &samples, device, progress)?;
    let tail = &trained.losses[trained.losses.len().saturating_sub(50)..];
    let final_loss = if tail.is_empty() {
        f32::NAN
    } else {
        tail.iter().sum::<f32>() / tail.len() as f32
    };
    Ok(Synthesizer {
        card: SynthCard {
            format: CARD_FORMAT.into(),
            config: cfg,
            condition: opts.condition,
            classes: task.classes.clone(),
            model_spec: opts.model_spec.clone(),
            model_fingerprint: model_fingerprint(&opts.model_spec, &model),
            train_manifest: manifest.display().to_string(),
            train_split: opts.split.clone(),
            n_train_images: n,
            final_loss,
            train_seconds: t0.elapsed().as_secs_f64(),
        },
        net: trained.net,
        varmap: trained.varmap,
        class_text,
        model,
    })
}

/// What [`Synthesizer::sample_prompt`] made.
pub struct Generated {
    /// Channels-last `[S, S, C]` images in `[0, 1]`.
    pub images: Vec<Vec<f32>>,
    /// The class the prompt named, if any (else it was embedded as free text).
    pub class: Option<String>,
}

/// Settings of one sampling run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleOptions {
    /// Guidance scale `w` (1: no guidance).
    pub guidance: f64,
    /// DDIM settings.
    pub ddim: DdimOptions,
    /// Seed of the noise.
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            guidance: 3.0,
            ddim: DdimOptions::default(),
            seed: 0,
        }
    }
}

impl Synthesizer {
    /// Writes `dir/weights.safetensors` (the network and the class embeddings) then
    /// `dir/synthesizer.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        Ok(save_head_artefact(
            dir,
            WEIGHTS_FILE,
            CARD_FILE,
            &self.varmap,
            &self.class_text,
            &self.card,
        )?)
    }

    /// Reads a synthesizer folder's card (a missing folder or card is an error naming it).
    pub fn read_card(dir: &Path) -> Result<SynthCard> {
        if !dir.join(CARD_FILE).is_file() {
            return Err(file_err(
                dir,
                format!("not a synthesizer folder (no {CARD_FILE}); train one with `medvlm synthesize train`"),
            ));
        }
        read_json_card(
            dir,
            CARD_FILE,
            CARD_FORMAT,
            "synthesizer",
            |c: &SynthCard| c.format.as_str(),
            file_err,
        )
    }

    /// Loads a synthesizer folder with its VLM (`model` instead of the card's spec when
    /// given); also returns a warning when the VLM's fingerprint differs from the card's.
    pub fn load(
        dir: &Path,
        model: Option<&str>,
        device: &Device,
    ) -> Result<(Self, Option<String>)> {
        let card = Self::read_card(dir)?;
        card.config
            .validate()
            .map_err(|e| file_err(&dir.join(CARD_FILE), e))?;
        let spec = model.unwrap_or(&card.model_spec).to_string();
        let vlm = load_vlm(&spec, device)?;
        let warning = (model_fingerprint(&spec, &vlm) != card.model_fingerprint).then(|| {
            format!(
                "the model `{spec}` differs from the one the synthesizer was trained with (`{}`): prompts of free text are embedded by a different tower",
                card.model_spec
            )
        });
        let varmap = VarMap::new();
        let net = DiffusionUNet::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            &card.config,
        )?;
        let class_text =
            load_head_artefact(dir, WEIGHTS_FILE, &varmap, card.classes.len(), device)?;
        Ok((
            Self {
                card,
                net,
                varmap,
                class_text,
                model: vlm,
            },
            warning,
        ))
    }

    /// The class a prompt names: its name (`chest_xray`, `chest_xray/nodule`) or its prompt
    /// text.
    pub fn class_named(&self, prompt: &str) -> Option<usize> {
        self.card
            .classes
            .iter()
            .position(|c| c.name == prompt || c.prompt == prompt)
    }

    /// The condition of a prompt: its class's stored embedding, else the text tower's
    /// embedding of the text (a prompt longer than the context is refused either way).
    pub fn prompt_condition(&self, prompt: &str) -> Result<(Vec<f32>, Option<usize>)> {
        check_prompt_fits(&self.model, prompt)?;
        if let Some(c) = self.class_named(prompt) {
            return Ok((self.class_text.get(c)?.to_vec1::<f32>()?, Some(c)));
        }
        let device = self.net_device();
        let e = prompt_embeddings(&self.model, &[prompt.to_string()], &device)?;
        Ok((e.get(0)?.to_vec1::<f32>()?, None))
    }

    fn net_device(&self) -> Device {
        self.class_text.device().clone()
    }

    /// Generates `n` images for a prompt (batches of 16; image `i` of a run is the same for
    /// a seed whatever `n` is only within one batch).
    pub fn sample_prompt(&self, prompt: &str, n: usize, opts: &SampleOptions) -> Result<Generated> {
        let (text, class) = self.prompt_condition(prompt)?;
        let images = self.sample_embedding(&text, n, opts)?;
        Ok(Generated {
            images,
            class: class.map(|c| self.card.classes[c].name.clone()),
        })
    }

    fn sample_embedding(
        &self,
        text: &[f32],
        n: usize,
        opts: &SampleOptions,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(n);
        let mut batch_idx = 0u64;
        while out.len() < n {
            let b = (n - out.len()).min(16);
            let seed = opts.seed.wrapping_add(batch_idx.wrapping_mul(0x9e37_79b9));
            out.extend(sample(
                &self.net,
                &vec![text.to_vec(); b],
                opts.guidance,
                &opts.ddim,
                seed,
            )?);
            batch_idx += 1;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

/// A multinomial logistic regression on feature rows (the "classifier trained on real
/// images"): features scaled by `sqrt(d)` (unit-norm embeddings to unit-scale entries),
/// full-batch gradient descent, 300 steps of rate 0.5, L2 penalty 1e-4, zero start.
pub struct LinearProbe {
    weights: Vec<f64>,
    bias: Vec<f64>,
    dim: usize,
    classes: usize,
}

impl LinearProbe {
    /// Fits the probe to `rows` labelled `labels` (in `0..classes`).
    pub fn fit(rows: &[Vec<f32>], labels: &[usize], classes: usize) -> Result<Self> {
        let dim = rows.first().map(Vec::len).unwrap_or(0);
        if rows.is_empty() || rows.len() != labels.len() || classes == 0 || dim == 0 {
            return Err(SynthPipelineError::Invalid(
                "the probe needs labelled feature rows".into(),
            ));
        }
        if labels.iter().any(|&l| l >= classes) {
            return Err(SynthPipelineError::Invalid(
                "a probe label out of range".into(),
            ));
        }
        let scale = (dim as f64).sqrt();
        let n = rows.len() as f64;
        let mut p = Self {
            weights: vec![0.0; classes * dim],
            bias: vec![0.0; classes],
            dim,
            classes,
        };
        for _ in 0..300 {
            let mut gw = vec![0.0; classes * dim];
            let mut gb = vec![0.0; classes];
            for (x, &y) in rows.iter().zip(labels) {
                let probs = p.probabilities(x);
                for c in 0..classes {
                    let d = probs[c] - f64::from(u8::from(c == y));
                    gb[c] += d / n;
                    for (k, &v) in x.iter().enumerate() {
                        gw[c * dim + k] += d * f64::from(v) * scale / n;
                    }
                }
            }
            for (w, g) in p.weights.iter_mut().zip(&gw) {
                *w -= 0.5 * (g + 1e-4 * *w);
            }
            for (b, g) in p.bias.iter_mut().zip(&gb) {
                *b -= 0.5 * g;
            }
        }
        Ok(p)
    }

    fn probabilities(&self, x: &[f32]) -> Vec<f64> {
        let scale = (self.dim as f64).sqrt();
        let logits: Vec<f64> = (0..self.classes)
            .map(|c| {
                self.bias[c]
                    + x.iter()
                        .enumerate()
                        .map(|(k, &v)| self.weights[c * self.dim + k] * f64::from(v) * scale)
                        .sum::<f64>()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    /// The most probable class of a row.
    pub fn predict(&self, x: &[f32]) -> usize {
        let p = self.probabilities(x);
        (0..self.classes)
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0)
    }

    /// Share of `rows` predicted as their label.
    pub fn accuracy(&self, rows: &[Vec<f32>], labels: &[usize]) -> f64 {
        if rows.is_empty() {
            return f64::NAN;
        }
        let right = rows
            .iter()
            .zip(labels)
            .filter(|(x, &y)| self.predict(x) == y)
            .count();
        right as f64 / rows.len() as f64
    }
}

/// Settings of [`Synthesizer::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalOptions {
    /// Images generated per class.
    pub n_per_class: usize,
    /// Sampling settings.
    pub sample: SampleOptions,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            n_per_class: 32,
            sample: SampleOptions::default(),
        }
    }
}

/// CLIP-style alignment of a set of images with their class prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    /// Mean cosine between an image's embedding and its class prompt's embedding.
    pub mean_cosine: f64,
    /// Share of images whose own class prompt is the most similar class prompt.
    pub zero_shot_accuracy: f64,
}

/// Per-class results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassResult {
    /// Class name.
    pub class: String,
    /// Its prompt.
    pub prompt: String,
    /// Real test images of the class.
    pub n_real: usize,
    /// Generated images.
    pub n_generated: usize,
    /// Accuracy of the real-trained probe on the real test images of the class.
    pub real_accuracy: f64,
    /// Its accuracy on the generated images of the class.
    pub generated_accuracy: f64,
    /// Mean cosine of generated images with the prompt.
    pub generated_cosine: f64,
    /// Mean cosine of real test images with the prompt.
    pub real_cosine: f64,
}

/// The evaluation of a synthesizer against a real test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthEvaluation {
    /// The test manifest and split.
    pub manifest: String,
    /// Its split.
    pub split: Option<String>,
    /// The manifest the probe was trained on (real images) and its split.
    pub train_manifest: String,
    /// Real test images.
    pub n_real_test: usize,
    /// Real training images the probe saw.
    pub n_real_train: usize,
    /// Generated images.
    pub n_generated: usize,
    /// Sampling settings.
    pub sample: SampleOptions,
    /// Where the metrics are computed.
    pub feature_space: String,
    /// FID (VLM features), real test vs generated.
    pub fid_vlm: f64,
    /// The same for an equally large draw of real training images (the floor at this size).
    pub fid_vlm_real_reference: f64,
    /// KID (VLM features) mean and std, real test vs generated.
    pub kid_vlm: medvlm_eval::generative::KidScore,
    /// KID of the real reference draw.
    pub kid_vlm_real_reference: medvlm_eval::generative::KidScore,
    /// Alignment of generated images with their prompts.
    pub alignment_generated: Alignment,
    /// Alignment of real test images with their class prompts.
    pub alignment_real: Alignment,
    /// Real-trained probe on real test images.
    pub probe_real_on_real: f64,
    /// Real-trained probe on generated images of the prompted class.
    pub probe_real_on_generated: f64,
    /// `probe_real_on_generated / probe_real_on_real` (target >= 0.8).
    pub accuracy_ratio: f64,
    /// Generated-trained probe on real test images (the reverse).
    pub probe_generated_on_real: f64,
    /// Per class.
    pub per_class: Vec<ClassResult>,
    /// Wall-clock seconds spent generating.
    pub generation_seconds: f64,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn alignment(feats: &[Vec<f32>], labels: &[usize], text: &[Vec<f32>]) -> Alignment {
    let n = feats.len().max(1) as f64;
    let mut cos = 0.0;
    let mut right = 0usize;
    for (f, &y) in feats.iter().zip(labels) {
        let sims: Vec<f64> = text.iter().map(|t| cosine(f, t)).collect();
        cos += sims[y];
        let best = (0..sims.len())
            .max_by(|&a, &b| sims[a].total_cmp(&sims[b]))
            .unwrap_or(0);
        right += usize::from(best == y);
    }
    Alignment {
        mean_cosine: cos / n,
        zero_shot_accuracy: right as f64 / n,
    }
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

/// Generated images of one class, kept for the grid.
pub struct ClassExamples {
    /// Class name.
    pub class: String,
    /// A few real test images of the class.
    pub real: Vec<Vec<f32>>,
    /// Its generated images.
    pub generated: Vec<Vec<f32>>,
}

impl Synthesizer {
    /// Evaluates against the real test images of `task` with a probe trained on the real
    /// images of `train` (see the module doc). Test classes unknown to the synthesizer are an
    /// error. Returns the evaluation and the images per class, for a grid.
    pub fn evaluate(
        &self,
        task: &SynthTask,
        train: &SynthTask,
        opts: &EvalOptions,
    ) -> Result<(SynthEvaluation, Vec<ClassExamples>)> {
        if opts.n_per_class < 2 {
            return Err(SynthPipelineError::Invalid(
                "at least 2 images per class are needed for FID/KID".into(),
            ));
        }
        let cfg = &self.card.config;
        let (size, ch) = (cfg.image_size, cfg.channels);
        let device = self.net_device();
        // Map each task class to the synthesizer's class index.
        let map = |t: &SynthTask| -> Result<Vec<usize>> {
            t.items
                .iter()
                .map(|it| {
                    let name = &t.classes[it.class].name;
                    self.class_named(name)
                        .ok_or_else(|| SynthPipelineError::Record {
                            path: it.image.clone(),
                            reason: format!(
                                "class `{name}` is not one of the synthesizer's ({})",
                                self.card
                                    .classes
                                    .iter()
                                    .map(|c| c.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        })
                })
                .collect()
        };
        let test_labels = map(task)?;
        let train_labels = map(train)?;
        let load_all = |t: &SynthTask| -> Result<Vec<Vec<f32>>> {
            t.items
                .iter()
                .map(|it| load_pixels(&it.image, size, ch))
                .collect()
        };
        let test_px = load_all(task)?;
        let train_px = load_all(train)?;
        let test_f = image_embeddings(&self.model, &test_px, size, ch, &device)?;
        let train_f = image_embeddings(&self.model, &train_px, size, ch, &device)?;
        let k = self.card.classes.len();
        let text: Vec<Vec<f32>> = self.class_text.to_vec2::<f32>()?;
        // The classes present in the test set are the ones generated.
        let mut present: Vec<usize> = test_labels.clone();
        present.sort_unstable();
        present.dedup();
        let t0 = std::time::Instant::now();
        let mut gen_px = Vec::new();
        let mut gen_labels = Vec::new();
        for (i, &c) in present.iter().enumerate() {
            let o = SampleOptions {
                seed: opts.sample.seed.wrapping_add(1000 * i as u64),
                ..opts.sample
            };
            let imgs = self.sample_embedding(&text[c], opts.n_per_class, &o)?;
            gen_labels.extend(std::iter::repeat_n(c, imgs.len()));
            gen_px.extend(imgs);
        }
        let generation_seconds = t0.elapsed().as_secs_f64();
        let gen_f = image_embeddings(&self.model, &gen_px, size, ch, &device)?;
        let dim = text[0].len();
        // FID/KID.
        let fid_vlm = frechet_distance(&flat(&test_f), &flat(&gen_f), dim)?;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.sample.seed ^ 0x0f1d);
        let mut idx: Vec<usize> = (0..train_f.len()).collect();
        idx.shuffle(&mut rng);
        let reference: Vec<Vec<f32>> = idx
            .iter()
            .take(gen_f.len())
            .map(|&i| train_f[i].clone())
            .collect();
        let fid_ref = frechet_distance(&flat(&test_f), &flat(&reference), dim)?;
        let kid_cfg = KidConfig::default();
        let kid = kernel_distance(&flat(&test_f), &flat(&gen_f), dim, &kid_cfg)?;
        let kid_ref = kernel_distance(&flat(&test_f), &flat(&reference), dim, &kid_cfg)?;
        // Probes.
        let probe = LinearProbe::fit(&train_f, &train_labels, k)?;
        let real_acc = probe.accuracy(&test_f, &test_labels);
        let gen_acc = probe.accuracy(&gen_f, &gen_labels);
        let reverse = LinearProbe::fit(&gen_f, &gen_labels, k)?;
        let rev_acc = reverse.accuracy(&test_f, &test_labels);
        let mut per_class = Vec::new();
        let mut examples = Vec::new();
        for &c in &present {
            let pick = |f: &[Vec<f32>], l: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
                f.iter()
                    .zip(l)
                    .filter(|(_, &y)| y == c)
                    .map(|(x, &y)| (x.clone(), y))
                    .unzip()
            };
            let (rf, rl) = pick(&test_f, &test_labels);
            let (gf, gl) = pick(&gen_f, &gen_labels);
            per_class.push(ClassResult {
                class: self.card.classes[c].name.clone(),
                prompt: self.card.classes[c].prompt.clone(),
                n_real: rf.len(),
                n_generated: gf.len(),
                real_accuracy: probe.accuracy(&rf, &rl),
                generated_accuracy: probe.accuracy(&gf, &gl),
                generated_cosine: alignment(&gf, &gl, &text).mean_cosine,
                real_cosine: alignment(&rf, &rl, &text).mean_cosine,
            });
            examples.push(ClassExamples {
                class: self.card.classes[c].name.clone(),
                real: test_px
                    .iter()
                    .zip(&test_labels)
                    .filter(|(_, &y)| y == c)
                    .take(4)
                    .map(|(p, _)| p.clone())
                    .collect(),
                generated: gen_px
                    .iter()
                    .zip(&gen_labels)
                    .filter(|(_, &y)| y == c)
                    .take(4)
                    .map(|(p, _)| p.clone())
                    .collect(),
            });
        }
        Ok((
            SynthEvaluation {
                manifest: task.manifest.display().to_string(),
                split: None,
                train_manifest: train.manifest.display().to_string(),
                n_real_test: test_f.len(),
                n_real_train: train_f.len(),
                n_generated: gen_f.len(),
                sample: opts.sample,
                feature_space: format!(
                    "L2-normalised {dim}-d image embeddings of the VLM `{}`",
                    self.card.model_spec
                ),
                fid_vlm,
                fid_vlm_real_reference: fid_ref,
                kid_vlm: kid,
                kid_vlm_real_reference: kid_ref,
                alignment_generated: alignment(&gen_f, &gen_labels, &text),
                alignment_real: alignment(&test_f, &test_labels, &text),
                probe_real_on_real: real_acc,
                probe_real_on_generated: gen_acc,
                accuracy_ratio: gen_acc / real_acc,
                probe_generated_on_real: rev_acc,
                per_class,
                generation_seconds,
            },
            examples,
        ))
    }
}

impl SynthEvaluation {
    /// A plain-text summary and one line per class.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "synthesis: {} generated ({} per class, DDIM {} steps, eta {}, guidance {}, seed {}) vs {} real test images of {}\n",
            self.n_generated,
            self.per_class.first().map_or(0, |c| c.n_generated),
            self.sample.ddim.steps,
            self.sample.ddim.eta,
            self.sample.guidance,
            self.sample.seed,
            self.n_real_test,
            self.manifest
        ));
        s.push_str(&format!("feature space: {}\n", self.feature_space));
        s.push_str(&format!(
            "FID (VLM features) {:.4}   [real train draw of the same size: {:.4}]\n",
            self.fid_vlm, self.fid_vlm_real_reference
        ));
        s.push_str(&format!(
            "KID (VLM features) {:.5} ± {:.5}   [real reference: {:.5} ± {:.5}] ({} subsets of {})\n",
            self.kid_vlm.mean,
            self.kid_vlm.std,
            self.kid_vlm_real_reference.mean,
            self.kid_vlm_real_reference.std,
            self.kid_vlm.subsets,
            self.kid_vlm.subset_size
        ));
        s.push_str(&format!(
            "alignment (cosine with the prompt / zero-shot accuracy): generated {:.4} / {:.3}, real {:.4} / {:.3}\n",
            self.alignment_generated.mean_cosine,
            self.alignment_generated.zero_shot_accuracy,
            self.alignment_real.mean_cosine,
            self.alignment_real.zero_shot_accuracy
        ));
        s.push_str(&format!(
            "classifier trained on {} real images: real test {:.3}, generated {:.3} (ratio {:.3}; target >= 0.8)\n",
            self.n_real_train,
            self.probe_real_on_real,
            self.probe_real_on_generated,
            self.accuracy_ratio
        ));
        s.push_str(&format!(
            "classifier trained on the generated images: real test {:.3}\n",
            self.probe_generated_on_real
        ));
        s.push_str(&format!(
            "{:<28} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8}\n",
            "class", "n_real", "n_gen", "acc_real", "acc_gen", "cos_real", "cos_gen"
        ));
        for c in &self.per_class {
            s.push_str(&format!(
                "{:<28} {:>6} {:>6} {:>9.3} {:>9.3} {:>8.4} {:>8.4}\n",
                c.class,
                c.n_real,
                c.n_generated,
                c.real_accuracy,
                c.generated_accuracy,
                c.real_cosine,
                c.generated_cosine
            ));
        }
        s
    }
}

/// [`Synthesizer::evaluate`] on manifests: test `manifest` (and `split`), the probe's real
/// training images from `train_manifest` (and `train_split`), classes as the synthesizer's
/// card says.
pub fn evaluate_manifest(
    synth: &Synthesizer,
    manifest: &Path,
    split: Option<&str>,
    train_manifest: &Path,
    train_split: Option<&str>,
    opts: &EvalOptions,
) -> Result<(SynthEvaluation, Vec<ClassExamples>)> {
    let task = SynthTask::from_manifest(manifest, split, synth.card.condition)?;
    let train = SynthTask::from_manifest(train_manifest, train_split, synth.card.condition)?;
    let (mut ev, ex) = synth.evaluate(&task, &train, opts)?;
    ev.split = split.map(str::to_string);
    Ok((ev, ex))
}

/// Writes the evaluation grid: per class one row of real test images then one row of
/// generated ones.
pub fn write_examples_grid(
    path: &Path,
    examples: &[ClassExamples],
    size: usize,
    channels: usize,
    zoom: usize,
) -> Result<()> {
    let mut rows: Vec<Vec<&[f32]>> = Vec::new();
    for e in examples {
        rows.push(e.real.iter().map(Vec::as_slice).collect());
        rows.push(e.generated.iter().map(Vec::as_slice).collect());
    }
    write_grid(path, &rows, size, channels, zoom)
}

/// What [`sample_to_files`] wrote.
pub struct SampledFiles {
    /// The class the prompt named, if any.
    pub class: Option<String>,
    /// One PNG per image: `<out>/sample_<i>.png`.
    pub images: Vec<PathBuf>,
    /// The grid of every image: `<out>/grid.png` (8 per row).
    pub grid: PathBuf,
}

/// Generates `n` images for `prompt` and writes them as 8-bit PNGs and a grid to `out`
/// (created). The prompt is checked before anything is written.
pub fn sample_to_files(
    synth: &Synthesizer,
    prompt: &str,
    n: usize,
    opts: &SampleOptions,
    out: &Path,
) -> Result<SampledFiles> {
    if n == 0 {
        return Err(SynthPipelineError::Invalid("asked for 0 images".into()));
    }
    let g = synth.sample_prompt(prompt, n, opts)?;
    let (size, ch) = (synth.card.config.image_size, synth.card.config.channels);
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let mut images = Vec::with_capacity(n);
    for (i, img) in g.images.iter().enumerate() {
        let p = out.join(format!("sample_{i:03}.png"));
        write_image_png(&p, img, size, ch)?;
        images.push(p);
    }
    let rows: Vec<Vec<&[f32]>> = g
        .images
        .chunks(8)
        .map(|c| c.iter().map(Vec::as_slice).collect())
        .collect();
    let grid = out.join("grid.png");
    write_grid(&grid, &rows, size, ch, 1)?;
    Ok(SampledFiles {
        class: g.class,
        images,
        grid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_of_classes() {
        assert_eq!(modality_words("chest_xray"), "chest X-ray");
        assert_eq!(modality_words("brain_mri"), "brain MRI");
        let c = class_of(Condition::Finding, "chest_xray", Some("pleural_effusion")).unwrap();
        assert_eq!(c.name, "chest_xray/pleural_effusion");
        assert_eq!(c.prompt, "chest X-ray with pleural effusion");
        let c = class_of(Condition::Finding, "histology", Some("normal")).unwrap();
        assert_eq!(c.prompt, "normal histology");
        assert!(class_of(Condition::Finding, "histology", None).is_none());
        let c = class_of(Condition::Modality, "dermoscopy", Some("naevus")).unwrap();
        assert_eq!(
            (c.name.as_str(), c.prompt.as_str()),
            ("dermoscopy", "dermoscopy")
        );
        assert_eq!("finding".parse::<Condition>().unwrap(), Condition::Finding);
        assert!("organ".parse::<Condition>().is_err());
    }

    #[test]
    fn probe_separates_separable_classes_and_fails_on_shuffled_labels() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let centres = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..90 {
            let c = i % 3;
            let noise = crate::synthesis::normal_values(3, &mut rng);
            rows.push(
                centres[c]
                    .iter()
                    .zip(&noise)
                    .map(|(a, b)| a + 0.2 * b)
                    .collect::<Vec<f32>>(),
            );
            labels.push(c);
        }
        let p = LinearProbe::fit(&rows[..60], &labels[..60], 3).unwrap();
        assert!(p.accuracy(&rows[60..], &labels[60..]) > 0.9);
        // Labels that do not follow the features: near chance on held-out rows.
        let shuffled: Vec<usize> = (0..90).map(|i| (i / 3) % 3).collect();
        let q = LinearProbe::fit(&rows[..60], &shuffled[..60], 3).unwrap();
        assert!(q.accuracy(&rows[60..], &shuffled[60..]) < 0.6);
        assert!(LinearProbe::fit(&rows, &labels[..3], 3).is_err());
    }

    #[test]
    fn alignment_counts_the_closest_prompt() {
        let text = vec![vec![1.0f32, 0.0], vec![0.0, 1.0]];
        let feats = vec![vec![0.8f32, 0.6], vec![0.6, 0.8], vec![1.0, 0.0]];
        let a = alignment(&feats, &[0, 0, 1], &text);
        assert!((a.mean_cosine - (0.8 + 0.6 + 0.0) / 3.0).abs() < 1e-6);
        assert!((a.zero_shot_accuracy - 1.0 / 3.0).abs() < 1e-9);
    }
}
