//! A continued-pretraining run as library calls, what `medvlm pretrain` and `medvlm quickstart`
//! do: read the image-text pairs of the configuration ([`load_pretrain_data`]), train with
//! checkpoints and save the model directory ([`train_and_save`]), and validate every few
//! epochs with zero-shot classification over the validation labels and image-text retrieval
//! ([`validate`], [`EpochValidation`]).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use medvlm_eval::classification::ClassificationReport;
use medvlm_io::Plane;

use crate::data::{self, ImageTextSample};
use crate::pretrain::{embed_images, embed_texts, retrieval, zero_shot, ContrastiveModel};
use crate::train_config::{BatchGrouping, TrainConfig};
use crate::trainer::{self, Callbacks, LoopConfig, Result, RunPaths, TrainError, TrainSummary};

/// A class of the zero-shot evaluation: the label the samples carry and its prompts (their
/// normalised embeddings are averaged: prompt ensembling, Radford et al. 2021).
#[derive(Debug, Clone)]
pub struct ZeroShotClass {
    /// Label as found in [`ImageTextSample::labels`] (first label = primary).
    pub label: String,
    /// Prompt text.
    pub prompts: Vec<String>,
}

/// Classes from the primary labels of `samples`, prompt = the label with `_` as spaces.
pub fn classes_from_labels(samples: &[ImageTextSample]) -> Vec<ZeroShotClass> {
    let mut labels: Vec<String> = samples
        .iter()
        .filter_map(|s| s.labels.first().cloned())
        .collect();
    labels.sort();
    labels.dedup();
    labels
        .into_iter()
        .map(|l| ZeroShotClass {
            prompts: vec![l.replace('_', " ")],
            label: l,
        })
        .collect()
}

/// Each class's L2-normalised prompt embeddings `[P_c, E]`, for
/// [`crate::pretrain::prompt_mixture_scores`] / [`zero_shot`].
pub fn prompt_embeddings(
    model: &ContrastiveModel,
    classes: &[ZeroShotClass],
) -> Result<Vec<Tensor>> {
    classes
        .iter()
        .map(|c| {
            if c.prompts.is_empty() {
                return Err(TrainError::Invalid(format!(
                    "class {} has no prompt",
                    c.label
                )));
            }
            let prompts: Vec<&str> = c.prompts.iter().map(String::as_str).collect();
            embed_texts(model, &prompts, 256)
        })
        .collect()
}

/// The model's logit scale `1 / temperature`, with which zero-shot prompts are scored.
pub fn logit_scale(model: &ContrastiveModel) -> Result<f64> {
    Ok(1.0 / model.temperature()?)
}

/// Validation metrics of `model` on `samples`, as written to `train_log.jsonl`: zero-shot
/// accuracy / balanced accuracy over `classes` (`zero_shot_*`; samples whose primary label is
/// not a class are left out and counted in `zero_shot_unlabelled`), and retrieval
/// recall@1/5/10 in both directions (`image_to_text_recall@K`, `text_to_image_recall@K`;
/// identical texts count as matches).
pub fn validate(
    model: &ContrastiveModel,
    samples: &[ImageTextSample],
    classes: &[ZeroShotClass],
) -> Result<serde_json::Value> {
    let planes: Vec<&Plane> = samples.iter().map(|s| &s.image).collect();
    let img = embed_images(model, &planes, 64)?;
    let mut out = serde_json::Map::new();
    if classes.len() >= 2 {
        let pred = zero_shot(
            &img,
            &prompt_embeddings(model, classes)?,
            logit_scale(model)?,
        )?;
        let mut y_true = Vec::new();
        let mut y_pred = Vec::new();
        for (s, p) in samples.iter().zip(&pred) {
            if let Some(t) = s
                .labels
                .first()
                .and_then(|l| classes.iter().position(|c| &c.label == l))
            {
                y_true.push(t);
                y_pred.push(*p);
            }
        }
        if !y_true.is_empty() {
            let r = ClassificationReport::new(&y_true, &y_pred, classes.len())
                .map_err(|e| TrainError::Invalid(format!("zero-shot validation: {e}")))?;
            out.insert("zero_shot_accuracy".into(), r.accuracy.into());
            out.insert(
                "zero_shot_balanced_accuracy".into(),
                r.balanced_accuracy.into(),
            );
            out.insert("zero_shot_classes".into(), classes.len().into());
            out.insert(
                "zero_shot_unlabelled".into(),
                (samples.len() - y_true.len()).into(),
            );
        }
    }
    let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
    if texts.iter().all(|t| !t.is_empty()) {
        let te = embed_texts(model, &texts, 64)?;
        let r = retrieval(&img, &te, &texts, &[1, 5, 10])?;
        for (dir, rk) in [
            ("image_to_text", &r.image_to_text),
            ("text_to_image", &r.text_to_image),
        ] {
            for k in [1, 5, 10] {
                if let Some(v) = rk.at(k) {
                    out.insert(format!("{dir}_recall@{k}"), v.into());
                }
            }
        }
    }
    Ok(serde_json::Value::Object(out))
}

/// Validation every `every_epochs` epochs, for a [`Callbacks::on_epoch_end`].
#[derive(Debug, Clone)]
pub struct EpochValidation<'a> {
    /// Validation samples.
    pub samples: &'a [ImageTextSample],
    /// Zero-shot classes.
    pub classes: Vec<ZeroShotClass>,
    /// Evaluate every N epochs (0: never).
    pub every_epochs: u64,
}

impl EpochValidation<'_> {
    /// [`validate`] at the end of epoch `epoch` (0-based) when it is due.
    pub fn at_epoch_end(
        &self,
        epoch: u64,
        model: &ContrastiveModel,
    ) -> Result<Option<serde_json::Value>> {
        if self.every_epochs == 0 || !(epoch + 1).is_multiple_of(self.every_epochs) {
            return Ok(None);
        }
        validate(model, self.samples, &self.classes)
            .map(Some)
            .map_err(|e| TrainError::Invalid(format!("validation: {e}")))
    }
}

/// The image-text pairs a pretraining configuration names, read and decoded.
#[derive(Debug)]
pub struct PretrainData {
    /// Training pairs (their text reduced to `data.text_section`).
    pub train: Vec<ImageTextSample>,
    /// Validation pairs, when `data.val_manifest` is set.
    pub val: Option<Vec<ImageTextSample>>,
    /// Training records read.
    pub records: usize,
    /// Training records skipped because their image could not be read (`skip_bad`), with
    /// the reason.
    pub bad_images: Vec<(PathBuf, String)>,
    /// Training reports without an `Impression:` header, whose last sentence was used.
    pub text_section_fallbacks: usize,
}

/// Reads `data.manifest` (and `data.val_manifest`) at `data.image_size`; with `skip_bad`,
/// unreadable images are skipped and listed instead of stopping the run.
pub fn load_pretrain_data(cfg: &TrainConfig, skip_bad: bool) -> Result<PretrainData> {
    let read = |key: &str, path: &Path, require_text: bool| {
        let manifest = medvlm_io::read_manifest(path)
            .map_err(|e| TrainError::Data(format!("{key} {}: {e}", path.display())))?;
        data::samples_from_manifest(
            &manifest,
            None,
            cfg.data.image_size,
            require_text,
            skip_bad,
            cfg.data.workers,
        )
    };
    let (mut train, report) = read("data.manifest", &cfg.data.manifest, true)?;
    let section = cfg.data.text_section;
    let text_section_fallbacks = data::apply_text_section(&mut train, section);
    let val = match &cfg.data.val_manifest {
        Some(p) => {
            let mut v = read("data.val_manifest", p, false)?.0;
            data::apply_text_section(&mut v, section);
            Some(v)
        }
        None => None,
    };
    Ok(PretrainData {
        train,
        val,
        records: report.records,
        bad_images: report.bad_images,
        text_section_fallbacks,
    })
}

/// The SHA-256 of the resolved configuration (checkpoints of another configuration are
/// refused on resume).
pub fn config_hash(cfg: &TrainConfig) -> Result<String> {
    let text = serde_json::to_string(cfg)
        .map_err(|e| TrainError::Invalid(format!("serialising the configuration: {e}")))?;
    Ok(crate::checkpoint::sha256_hex(text.as_bytes()))
}

/// Trains `model` on `train` with the configuration's loop settings (augmentation, batch
/// grouping, frozen parts), writing checkpoints and `train_log.jsonl` under
/// `cfg.output_dir`, then saves the model directory `output_dir/model`.
pub fn train_and_save<C: Callbacks<ContrastiveModel>>(
    cfg: &TrainConfig,
    model: &mut ContrastiveModel,
    train: &[ImageTextSample],
    resume: bool,
    callbacks: &mut C,
) -> Result<TrainSummary> {
    let loop_cfg = LoopConfig::from_train_config(cfg);
    if loop_cfg.micro_batches_per_epoch(train.len()) == 0 {
        return Err(TrainError::Invalid(format!(
            "{} training samples give no full update of data.batch_size {} x optim.grad_accum {}",
            train.len(),
            cfg.data.batch_size,
            cfg.optim.grad_accum
        )));
    }
    if cfg.loss.kind == crate::losses::LossKind::LabelAware {
        if let Some(s) = train.iter().find(|s| s.labels.is_empty()) {
            return Err(TrainError::Invalid(format!(
                "loss.kind = \"label_aware\" needs labels (`label` or `labels` in the manifest) \
                 for every training sample; {} has none",
                s.id
            )));
        }
    }
    let augment = (!data::augment_is_identity(&cfg.data.augment))
        .then(|| data::train_transform(&cfg.data.augment, cfg.data.image_size));
    // The batch source tokenises with its own handle of the tokenizer, since the model is
    // borrowed mutably by the loop.
    let tokenizer = model.tokenizer.clone();
    let mut source =
        data::ContrastiveBatches::new(train, &tokenizer, augment, cfg.seed, cfg.data.workers)?;
    source.normalise = model.normalise;
    source.group_batches = cfg.data.batch_grouping == BatchGrouping::Group;
    if source.group_batches && train.iter().all(|s| s.group.is_none()) {
        return Err(TrainError::Invalid(
            "data.batch_grouping = \"group\" needs a `modality` field in the training \
             manifest's records; none has one"
                .into(),
        ));
    }
    std::fs::create_dir_all(&cfg.output_dir).map_err(|source| TrainError::Io {
        path: cfg.output_dir.clone(),
        source,
    })?;
    let paths = RunPaths {
        checkpoints: cfg.output_dir.join("checkpoints"),
        log: cfg.output_dir.join("train_log.jsonl"),
    };
    // `[freeze]`: a locked tower (LiT) or the last k blocks only.
    let all = model.named_vars();
    let trainable = crate::optim::select_trainable(
        all.iter().map(|(n, _)| n.as_str()),
        &cfg.freeze_selection(),
    )?;
    let (params, _frozen) = crate::optim::partition_trainable(all, &trainable);
    let hash = config_hash(cfg)?;
    let summary = trainer::train(
        params, model, &source, &loop_cfg, &paths, resume, &hash, callbacks,
    )?;
    let out = cfg.output_dir.join("model");
    model
        .save(&out)
        .map_err(|e| TrainError::Model(format!("saving the model to {}: {e}", out.display())))?;
    Ok(summary)
}
