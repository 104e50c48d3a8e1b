//! Multi-task learning as a task: findings, question-answer pairs and reports read from one
//! manifest, the frozen image tower's embeddings (and its text tower's question embeddings)
//! computed once, the shared trunk and heads of [`crate::multitask`] trained jointly, the
//! saved model folder, evaluation, the comparison with single-task models, and prediction for
//! image files.
//!
//! Records: `labels` (findings; `label` when `labels` is absent) for classification, `qa`
//! (`question`, `answer`; closed questions flagged by the record's `qa_closed` list, or, without
//! it, those answered yes or no) for VQA, `text` for the report. A record may lack some of
//! them; a head trains on the records that have its targets.
//!
//! Protocol ([`evaluate`], [`compare`]): classification is scored by macro AUROC over the
//! training findings vocabulary (findings without a positive or negative in the evaluated set
//! are left out of the mean) and macro F1 at probability 0.5; VQA by exact-match accuracy of
//! the predicted answer (lower-cased) on closed, open and all questions (an answer never seen
//! in training counts wrong); reports (greedy decoding) by clinical efficacy
//! ([`medvlm_eval::report_labeller`], the phantom lexicon, uncertain mentions present), macro
//! and micro F1. [`compare`] trains the multi-task model and, with the same settings and seed,
//! one single-task model per head (the other weights at 0) on the same embeddings, and
//! scores every model on every evaluated manifest.
//!
//! Model folder ([`MultiTaskModel::save`]): `multitask.safetensors` (`trunk.*`,
//! `classification.*`, `vqa.*`, `report.*`), `tokenizer.json` (the report word tokenizer)
//! and last `multitask.json` (the card: settings, vocabularies, the image model's spec and
//! fingerprint, the training record), each written atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use medvlm_eval::report_labeller::clinical_efficacy;
use medvlm_models::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::card::read_json_card;
use crate::multitask::{
    file_err, train_multitask, EpochLosses, Head, MultiTaskConfig, MultiTaskError, MultiTaskNet,
    NetDims, Result, TaskWeights, TrainTargets,
};
use crate::report_generation::EOS_ID;
use crate::report_pipeline::{detokenize, encode_report, image_embeddings, phantom_lexicon};

/// Format tag of the card.
pub const FORMAT: &str = "medvlm-multitask/1";
const CARD_FILE: &str = "multitask.json";
const WEIGHTS_FILE: &str = "multitask.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";

/// One question about an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaItem {
    /// The question.
    pub question: String,
    /// The reference answer (lower-cased, trimmed).
    pub answer: String,
    /// Whether it is a closed (yes/no) question.
    pub closed: bool,
}

/// One image and its targets.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiTaskItem {
    /// The image file.
    pub image: PathBuf,
    /// Its findings, if given.
    pub findings: Option<Vec<String>>,
    /// Its report, if given.
    pub report: Option<String>,
    /// Its questions.
    pub qa: Vec<QaItem>,
    /// The record's `modality`, when given (reports are labelled in their modality).
    pub modality: Option<String>,
}

/// The records of a manifest with their targets.
#[derive(Debug, Clone)]
pub struct MultiTaskSet {
    /// The manifest.
    pub manifest: PathBuf,
    /// The records, in manifest order.
    pub items: Vec<MultiTaskItem>,
}

impl MultiTaskSet {
    /// The records of `manifest` (those of `split` when given). An empty selection, or one in
    /// which no record has findings, questions or a report, is an error naming the file.
    pub fn from_manifest(manifest: &Path, split: Option<&str>) -> Result<Self> {
        let m = medvlm_io::read_manifest(manifest).map_err(|e| file_err(manifest, e))?;
        let mut items = Vec::new();
        for rec in &m.records {
            if split.is_some_and(|s| rec.split.as_deref() != Some(s)) {
                continue;
            }
            let findings = if !rec.labels.is_empty() {
                Some(rec.labels.clone())
            } else {
                rec.label.clone().map(|l| vec![l])
            };
            let closed_flags: Option<Vec<bool>> = rec
                .extra
                .get("qa_closed")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().map(|b| b.as_bool().unwrap_or(false)).collect());
            let qa = rec
                .qa
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    let answer = p.answer.trim().to_lowercase();
                    let closed = match &closed_flags {
                        Some(f) => f.get(j).copied().unwrap_or(false),
                        None => answer == "yes" || answer == "no",
                    };
                    QaItem {
                        question: p.question.trim().to_string(),
                        answer,
                        closed,
                    }
                })
                .collect();
            let report = rec
                .text
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            items.push(MultiTaskItem {
                image: m.image_path(rec),
                findings,
                report,
                qa,
                modality: rec
                    .extra
                    .get("modality")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            });
        }
        if items.is_empty() {
            return Err(file_err(
                manifest,
                match split {
                    Some(s) => format!("no record of split {s:?}"),
                    None => "no records".to_string(),
                },
            ));
        }
        if items
            .iter()
            .all(|i| i.findings.is_none() && i.report.is_none() && i.qa.is_empty())
        {
            return Err(file_err(
                manifest,
                "no record has findings (`labels`), question-answer pairs (`qa`) or a report (`text`); multi-task learning needs at least one",
            ));
        }
        Ok(Self {
            manifest: manifest.to_path_buf(),
            items,
        })
    }
}

/// A set's inputs as the frozen VLM sees them.
#[derive(Debug, Clone)]
pub struct EmbeddedSet {
    /// L2-normalised image embeddings `[N, E]`.
    pub images: Tensor,
    /// The distinct questions.
    pub questions: Vec<String>,
    /// Their L2-normalised text embeddings `[Q, D]` (one placeholder row when the set has
    /// no question, so that the width is known).
    pub question_embeds: Tensor,
    /// Row in `questions` of each item's each question.
    pub question_rows: Vec<Vec<usize>>,
}

/// Embeds a set's images and questions with the frozen model `m`.
pub fn embed_set(set: &MultiTaskSet, m: &LoadedModel, device: &Device) -> Result<EmbeddedSet> {
    let files: Vec<PathBuf> = set.items.iter().map(|i| i.image.clone()).collect();
    let images = image_embeddings(m, &files, device)?;
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut questions = Vec::new();
    let question_rows = set
        .items
        .iter()
        .map(|it| {
            it.qa
                .iter()
                .map(|q| {
                    *index.entry(q.question.clone()).or_insert_with(|| {
                        questions.push(q.question.clone());
                        questions.len() - 1
                    })
                })
                .collect()
        })
        .collect();
    let question_embeds = embed_questions(m, &questions, device)?;
    Ok(EmbeddedSet {
        images,
        questions,
        question_embeds,
        question_rows,
    })
}

fn embed_questions(m: &LoadedModel, questions: &[String], device: &Device) -> Result<Tensor> {
    let texts: Vec<String> = if questions.is_empty() {
        vec!["question".to_string()]
    } else {
        questions.to_vec()
    };
    let t = medvlm_models::embed::embed_texts(m, &texts, 64, device)?;
    Ok(medvlm_models::vlm::l2_normalize(&t)?.to_device(device)?)
}

/// What the saved model records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiTaskCard {
    /// [`FORMAT`].
    pub format: String,
    /// The image model as given (`--model`).
    pub model_spec: String,
    /// Fingerprint of the image model's folder.
    pub model_fingerprint: String,
    /// Sizes of the network.
    pub dims: NetDims,
    /// Settings (with the loss weights).
    pub config: MultiTaskConfig,
    /// Findings vocabulary (classification outputs, in order).
    pub findings: Vec<String>,
    /// Answer vocabulary (VQA outputs, in order).
    pub answers: Vec<String>,
    /// The training manifest.
    pub train_manifest: String,
    /// Split used, if any.
    pub train_split: Option<String>,
    /// Training images.
    pub n_train: usize,
    /// Reports cut to `report_max_tokens`.
    pub n_truncated: usize,
    /// Losses of each epoch.
    pub epoch_losses: Vec<EpochLosses>,
    /// Seconds of training (embeddings excluded).
    pub train_seconds: f64,
}

/// A trained multi-task model and its report tokenizer.
pub struct MultiTaskModel {
    /// The card.
    pub card: MultiTaskCard,
    /// The network.
    pub net: MultiTaskNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// Report word tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
}

/// Trains a multi-task model on an embedded set (`model_spec` and `fingerprint` describe
/// the image model for the card); `on_epoch` after each epoch.
pub fn train_embedded(
    set: &MultiTaskSet,
    emb: &EmbeddedSet,
    cfg: &MultiTaskConfig,
    model_spec: &str,
    fingerprint: &str,
    train_split: Option<&str>,
    on_epoch: &mut dyn FnMut(usize, &EpochLosses),
) -> Result<MultiTaskModel> {
    cfg.validate()?;
    let findings: Vec<String> = set
        .items
        .iter()
        .flat_map(|i| i.findings.iter().flatten().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let answers: Vec<String> = set
        .items
        .iter()
        .flat_map(|i| i.qa.iter().map(|q| q.answer.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let finding_id: HashMap<&str, usize> = findings
        .iter()
        .enumerate()
        .map(|(i, f)| (f.as_str(), i))
        .collect();
    let answer_id: HashMap<&str, u32> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| (a.as_str(), i as u32))
        .collect();
    let texts: Vec<&str> = set
        .items
        .iter()
        .filter_map(|i| i.report.as_deref())
        .collect();
    let tokenizer = medvlm_train::pretrain::build_word_tokenizer(&texts, cfg.min_word_count)
        .map_err(|e| MultiTaskError::Invalid(e.to_string()))?;
    let mut n_truncated = 0;
    let mut reports = Vec::with_capacity(set.items.len());
    for it in &set.items {
        reports.push(match &it.report {
            Some(r) => {
                let (ids, cut) = encode_report(&tokenizer, r, cfg.report_max_tokens)?;
                n_truncated += usize::from(cut);
                Some(ids)
            }
            None => None,
        });
    }
    let targets = TrainTargets {
        images: emb.images.clone(),
        findings: set
            .items
            .iter()
            .map(|it| {
                it.findings.as_ref().map(|fs| {
                    let mut v = vec![0.0f32; findings.len()];
                    for f in fs {
                        v[finding_id[f.as_str()]] = 1.0;
                    }
                    v
                })
            })
            .collect(),
        questions: emb.question_embeds.clone(),
        qa: set
            .items
            .iter()
            .zip(&emb.question_rows)
            .map(|(it, rows)| {
                it.qa
                    .iter()
                    .zip(rows)
                    .map(|(q, &r)| (r as u32, answer_id[q.answer.as_str()]))
                    .collect()
            })
            .collect(),
        reports,
    };
    let dims = NetDims {
        image_dim: emb.images.dim(1)?,
        question_dim: emb.question_embeds.dim(1)?,
        n_findings: findings.len(),
        n_answers: answers.len(),
        vocab: tokenizer.get_vocab_size(true),
    };
    let t0 = Instant::now();
    let trained = train_multitask(cfg, dims, &targets, on_epoch)?;
    let card = MultiTaskCard {
        format: FORMAT.into(),
        model_spec: model_spec.to_string(),
        model_fingerprint: fingerprint.to_string(),
        dims,
        config: cfg.clone(),
        findings,
        answers,
        train_manifest: set.manifest.display().to_string(),
        train_split: train_split.map(str::to_string),
        n_train: set.items.len(),
        n_truncated,
        epoch_losses: trained.epoch_losses,
        train_seconds: t0.elapsed().as_secs_f64(),
    };
    Ok(MultiTaskModel {
        card,
        net: trained.net,
        varmap: trained.varmap,
        tokenizer,
    })
}

/// Settings of [`train_and_save`] and [`compare`].
#[derive(Debug, Clone)]
pub struct MultiTaskOptions {
    /// Image model spec (`medvlm_models::load_model`).
    pub model_spec: String,
    /// Settings.
    pub config: MultiTaskConfig,
    /// Split of the training manifest (`None`: every record).
    pub split: Option<String>,
}

fn load_image_model(spec: &str, device: &Device) -> Result<LoadedModel> {
    let lopts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    Ok(medvlm_models::load_model(spec, &lopts)?)
}

/// Reads `manifest`, loads the image model, trains and writes the model folder `out`.
pub fn train_and_save(
    manifest: &Path,
    opts: &MultiTaskOptions,
    out: &Path,
    device: &Device,
    on_epoch: &mut dyn FnMut(usize, &EpochLosses),
) -> Result<MultiTaskCard> {
    opts.config.validate()?;
    let set = MultiTaskSet::from_manifest(manifest, opts.split.as_deref())?;
    let m = load_image_model(&opts.model_spec, device)?;
    let emb = embed_set(&set, &m, device)?;
    let fp = crate::segmentation_pipeline::model_fingerprint(&opts.model_spec, &m);
    let model = train_embedded(
        &set,
        &emb,
        &opts.config,
        &opts.model_spec,
        &fp,
        opts.split.as_deref(),
        on_epoch,
    )?;
    model.save(out)?;
    Ok(model.card)
}

impl MultiTaskModel {
    /// Writes the model folder `out` (see the module documentation): weights and tokenizer
    /// first, the card last, each atomically, so a folder with a card is complete.
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
        let weights = out.join(WEIGHTS_FILE);
        let tensors: HashMap<String, Tensor> = medvlm_train::optim::varmap_params(&self.varmap)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        medvlm_io::atomic::write_atomic_via(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| file_err(&weights, e))?;
        let tok = out.join(TOKENIZER_FILE);
        let tok_json = self
            .tokenizer
            .to_string(false)
            .map_err(|e| file_err(&tok, e))?;
        medvlm_io::atomic::write_atomic(&tok, tok_json.as_bytes())
            .map_err(|e| file_err(&tok, e))?;
        let card = out.join(CARD_FILE);
        let json = serde_json::to_vec_pretty(&self.card).map_err(|e| file_err(&card, e))?;
        medvlm_io::atomic::write_atomic(&card, &json).map_err(|e| file_err(&card, e))
    }

    /// Loads a model folder and its image model; the third value is a warning when the image
    /// model's fingerprint differs from the card's.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, LoadedModel, Option<String>)> {
        let card_path = dir.join(CARD_FILE);
        let card: MultiTaskCard = read_json_card(
            dir,
            CARD_FILE,
            FORMAT,
            "multi-task model",
            |c: &MultiTaskCard| c.format.as_str(),
            file_err,
        )?;
        card.config
            .validate()
            .map_err(|e| file_err(&card_path, e))?;
        if card.findings.len() != card.dims.n_findings || card.answers.len() != card.dims.n_answers
        {
            return Err(file_err(
                &card_path,
                "the vocabularies do not match the network's sizes",
            ));
        }
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| file_err(&tok_path, e))?;
        if tokenizer.get_vocab_size(true) != card.dims.vocab {
            return Err(file_err(
                &tok_path,
                format!(
                    "{} tokens, the report decoder was trained for {}",
                    tokenizer.get_vocab_size(true),
                    card.dims.vocab
                ),
            ));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let tensors =
            candle_core::safetensors::load(&wpath, device).map_err(|e| file_err(&wpath, e))?;
        let varmap = VarMap::new();
        let net = MultiTaskNet::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            &card.config,
            card.dims,
        )?;
        for (name, var) in medvlm_train::optim::varmap_params(&varmap) {
            let t = tensors
                .get(&name)
                .ok_or_else(|| file_err(&wpath, format!("no tensor `{name}`")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(file_err(
                    &wpath,
                    format!(
                        "tensor `{name}` is {:?}, the settings need {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        let m = load_image_model(&card.model_spec, device)?;
        let fp = crate::segmentation_pipeline::model_fingerprint(&card.model_spec, &m);
        let warning = (fp != card.model_fingerprint).then(|| {
            format!(
                "the image model {} is not the one the multi-task model was trained with (fingerprint differs)",
                card.model_spec
            )
        });
        Ok((
            Self {
                card,
                net,
                varmap,
                tokenizer,
            },
            m,
            warning,
        ))
    }

    /// Heads trained (positive weight).
    pub fn heads(&self) -> Vec<Head> {
        self.card.config.weights.active()
    }

    fn check_width(&self, images: &Tensor) -> Result<()> {
        if images.dim(1)? != self.card.dims.image_dim {
            return Err(MultiTaskError::Invalid(format!(
                "image embeddings are {} wide; the model reads {}",
                images.dim(1)?,
                self.card.dims.image_dim
            )));
        }
        Ok(())
    }

    /// Finding probabilities `[N, L]` (row-major) of image embeddings `[N, E]`.
    pub fn finding_probs(&self, images: &Tensor) -> Result<Vec<f32>> {
        self.check_width(images)?;
        let h = self.net.trunk.forward(images)?;
        let p = candle_nn::ops::sigmoid(&self.net.finding_logits(&h)?)?;
        Ok(p.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Predicted answer ids and their probabilities for (image row, question embedding)
    /// pairs.
    pub fn answer(
        &self,
        images: &Tensor,
        rows: &[usize],
        questions: &Tensor,
    ) -> Result<Vec<(usize, f32)>> {
        self.check_width(images)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.len() != questions.dim(0)? {
            return Err(MultiTaskError::Invalid(format!(
                "{} image rows for {} questions",
                rows.len(),
                questions.dim(0)?
            )));
        }
        let h = self.net.trunk.forward(images)?;
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            images.device(),
        )?;
        let logits = self.net.vqa.forward(&h.index_select(&idx, 0)?, questions)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let best = probs.argmax(1)?.to_vec1::<u32>()?;
        let p = probs.to_vec2::<f32>()?;
        Ok(best
            .into_iter()
            .zip(p)
            .map(|(b, row)| (b as usize, row[b as usize]))
            .collect())
    }

    /// Greedy reports for image embeddings `[N, E]`.
    pub fn reports(&self, images: &Tensor) -> Result<Vec<String>> {
        self.check_width(images)?;
        let h = self.net.trunk.forward(images)?;
        let n = h.dim(0)?;
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let ids = self.net.report.generate_greedy(
                &h.narrow(0, start, len)?,
                self.card.config.report_max_tokens,
            )?;
            for t in ids {
                // Ids 0-3 are padding, start, unknown and end: a report shows none of them.
                let words: Vec<String> = t
                    .iter()
                    .filter(|&&i| i > EOS_ID)
                    .filter_map(|&i| self.tokenizer.id_to_token(i))
                    .collect();
                out.push(detokenize(&words));
            }
        }
        Ok(out)
    }
}

/// Classification scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationScores {
    /// Images scored.
    pub n: usize,
    /// Macro AUROC over the findings defined in the set.
    pub macro_auroc: Option<f64>,
    /// Macro F1 at probability 0.5 over the findings vocabulary.
    pub macro_f1: f64,
}

/// VQA scores (exact match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaScores {
    /// Closed questions.
    pub n_closed: usize,
    /// Open questions.
    pub n_open: usize,
    /// Accuracy on closed questions.
    pub closed: Option<f64>,
    /// Accuracy on open questions.
    pub open: Option<f64>,
    /// Accuracy on all questions.
    pub overall: f64,
}

/// Report scores (clinical efficacy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportScores {
    /// Reports scored.
    pub n: usize,
    /// Macro F1 over the lexicon's findings.
    pub ce_macro_f1: f64,
    /// Micro F1.
    pub ce_micro_f1: f64,
}

/// Scores of one model on one set; `None` for a head it did not train or that the set has
/// no targets for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskScores {
    /// Findings classification.
    pub classification: Option<ClassificationScores>,
    /// VQA.
    pub vqa: Option<VqaScores>,
    /// Reports.
    pub report: Option<ReportScores>,
}

/// Scores `model` on an embedded set (see the module documentation).
pub fn evaluate(
    model: &MultiTaskModel,
    set: &MultiTaskSet,
    emb: &EmbeddedSet,
) -> Result<TaskScores> {
    if emb.question_embeds.dim(1)? != model.card.dims.question_dim {
        return Err(MultiTaskError::Invalid(format!(
            "question embeddings are {} wide; the model reads {} (another text model?)",
            emb.question_embeds.dim(1)?,
            model.card.dims.question_dim
        )));
    }
    let heads = model.heads();
    let dev = emb.images.device();
    let mut scores = TaskScores::default();
    if heads.contains(&Head::Classification) {
        let rows: Vec<usize> = (0..set.items.len())
            .filter(|&i| set.items[i].findings.is_some())
            .collect();
        if !rows.is_empty() {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                dev,
            )?;
            let probs = model.finding_probs(&emb.images.index_select(&idx, 0)?)?;
            let vocab = &model.card.findings;
            let mut targets = Vec::with_capacity(rows.len() * vocab.len());
            for &r in &rows {
                let fs = set.items[r].findings.as_deref().unwrap_or_default();
                targets.extend(vocab.iter().map(|v| fs.contains(v)));
            }
            let l = vocab.len();
            let auroc = medvlm_eval::auroc::auroc_multilabel(&probs, &targets, l)?;
            let f1 = medvlm_eval::multilabel::multilabel_f1(&probs, &targets, l, 0.5)?;
            scores.classification = Some(ClassificationScores {
                n: rows.len(),
                macro_auroc: auroc.macro_auroc,
                macro_f1: f1.macro_f1,
            });
        }
    }
    if heads.contains(&Head::Vqa) {
        let mut rows = Vec::new();
        let mut qrows = Vec::new();
        let mut refs = Vec::new();
        for (i, (it, qr)) in set.items.iter().zip(&emb.question_rows).enumerate() {
            for (q, &r) in it.qa.iter().zip(qr) {
                rows.push(i);
                qrows.push(r as u32);
                refs.push(q);
            }
        }
        if !rows.is_empty() {
            let n = qrows.len();
            let q = emb
                .question_embeds
                .index_select(&Tensor::from_vec(qrows, n, dev)?, 0)?;
            let pred = model.answer(&emb.images, &rows, &q)?;
            let mut hit = [0usize; 2];
            let mut count = [0usize; 2];
            for ((a, _), r) in pred.iter().zip(&refs) {
                let k = usize::from(r.closed);
                count[k] += 1;
                hit[k] += usize::from(model.card.answers[*a] == r.answer);
            }
            let acc = |k: usize| (count[k] > 0).then(|| hit[k] as f64 / count[k] as f64);
            scores.vqa = Some(VqaScores {
                n_closed: count[1],
                n_open: count[0],
                closed: acc(1),
                open: acc(0),
                overall: (hit[0] + hit[1]) as f64 / n as f64,
            });
        }
    }
    if heads.contains(&Head::Report) {
        let rows: Vec<usize> = (0..set.items.len())
            .filter(|&i| set.items[i].report.is_some())
            .collect();
        if !rows.is_empty() {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                dev,
            )?;
            let generated = model.reports(&emb.images.index_select(&idx, 0)?)?;
            let refs: Vec<String> = rows
                .iter()
                .filter_map(|&r| set.items[r].report.clone())
                .collect();
            let modalities: Vec<Option<String>> = rows
                .iter()
                .map(|&r| set.items[r].modality.clone())
                .collect();
            let ce = clinical_efficacy(&generated, &refs, &modalities, &phantom_lexicon(), true)
                .map_err(|e| file_err(&set.manifest, e))?;
            scores.report = Some(ReportScores {
                n: rows.len(),
                ce_macro_f1: ce.macro_avg.f1,
                ce_micro_f1: ce.micro.f1,
            });
        }
    }
    Ok(scores)
}

/// Loads the model folder `dir` and scores it on `manifest` (its `split` when given); the
/// second value is the image-model warning of [`MultiTaskModel::load`].
pub fn evaluate_manifest(
    dir: &Path,
    manifest: &Path,
    split: Option<&str>,
    device: &Device,
) -> Result<(TaskScores, Option<String>)> {
    let set = MultiTaskSet::from_manifest(manifest, split)?;
    let (model, m, warning) = MultiTaskModel::load(dir, device)?;
    let emb = embed_set(&set, &m, device)?;
    Ok((evaluate(&model, &set, &emb)?, warning))
}

/// What the model says about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The image file.
    pub image: String,
    /// Every finding of the vocabulary with its probability, most likely first (empty when
    /// the classification head was not trained).
    pub findings: Vec<(String, f32)>,
    /// The generated report (when the report head was trained).
    pub report: Option<String>,
    /// (question, answer, probability) for each question asked (when the VQA head was
    /// trained).
    pub answers: Vec<(String, String, f32)>,
}

/// Predictions for image files with the model folder `dir`: findings, a report and the
/// answers to `questions` for each image, in input order (an unreadable file is an error
/// naming it). The second value is the image-model warning.
pub fn predict_files(
    dir: &Path,
    images: &[PathBuf],
    questions: &[String],
    device: &Device,
) -> Result<(Vec<Prediction>, Option<String>)> {
    let (model, m, warning) = MultiTaskModel::load(dir, device)?;
    let emb = image_embeddings(&m, images, device)?;
    let heads = model.heads();
    let n = images.len();
    let mut out: Vec<Prediction> = images
        .iter()
        .map(|p| Prediction {
            image: p.display().to_string(),
            findings: Vec::new(),
            report: None,
            answers: Vec::new(),
        })
        .collect();
    if heads.contains(&Head::Classification) {
        let l = model.card.findings.len();
        let probs = model.finding_probs(&emb)?;
        for (pred, row) in out.iter_mut().zip(probs.chunks_exact(l.max(1))) {
            let mut f: Vec<(String, f32)> = model
                .card
                .findings
                .iter()
                .cloned()
                .zip(row.iter().copied())
                .collect();
            f.sort_by(|a, b| b.1.total_cmp(&a.1));
            pred.findings = f;
        }
    }
    if heads.contains(&Head::Report) {
        for (pred, r) in out.iter_mut().zip(model.reports(&emb)?) {
            pred.report = Some(r);
        }
    }
    if heads.contains(&Head::Vqa) && !questions.is_empty() {
        let q = embed_questions(&m, questions, device)?;
        if q.dim(1)? != model.card.dims.question_dim {
            return Err(MultiTaskError::Invalid(format!(
                "question embeddings are {} wide; the model reads {}",
                q.dim(1)?,
                model.card.dims.question_dim
            )));
        }
        let k = questions.len();
        let rows: Vec<usize> = (0..n).flat_map(|i| std::iter::repeat_n(i, k)).collect();
        let qi: Vec<u32> = (0..n).flat_map(|_| 0..k as u32).collect();
        let qv = q.index_select(&Tensor::from_vec(qi, n * k, device)?, 0)?;
        let answers = model.answer(&emb, &rows, &qv)?;
        for (j, (a, p)) in answers.into_iter().enumerate() {
            out[j / k]
                .answers
                .push((questions[j % k].clone(), model.card.answers[a].clone(), p));
        }
    }
    Ok((out, warning))
}

/// One trained model of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// `multi-task` or `single-task <head>`.
    pub name: String,
    /// Its loss weights.
    pub weights: TaskWeights,
    /// Seconds of training.
    pub train_seconds: f64,
    /// Losses of its last epoch.
    pub final_losses: EpochLosses,
}

/// Scores of every run on one evaluated set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetScores {
    /// The manifest.
    pub manifest: String,
    /// Images.
    pub n: usize,
    /// One entry per run, in [`Comparison::runs`] order.
    pub scores: Vec<TaskScores>,
}

/// The multi-task model against single-task models on the same data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The training manifest.
    pub train_manifest: String,
    /// Training images.
    pub n_train: usize,
    /// Seconds to embed the training images and questions once (shared by every run).
    pub embed_seconds: f64,
    /// The settings (multi-task weights; each single-task run keeps one of them).
    pub config: MultiTaskConfig,
    /// The runs: the multi-task model first, then one single-task model per active head.
    pub runs: Vec<RunSummary>,
    /// Scores per evaluated manifest.
    pub sets: Vec<SetScores>,
}

/// Trains the multi-task model and one single-task model per active head on `train` and
/// scores them all on each manifest of `evals` (see the module documentation). The
/// multi-task model is written to `save` when given. `progress` receives one line per stage.
pub fn compare(
    train: &Path,
    evals: &[PathBuf],
    opts: &MultiTaskOptions,
    save: Option<&Path>,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Comparison> {
    opts.config.validate()?;
    let set = MultiTaskSet::from_manifest(train, opts.split.as_deref())?;
    let eval_sets = evals
        .iter()
        .map(|p| MultiTaskSet::from_manifest(p, None))
        .collect::<Result<Vec<_>>>()?;
    let m = load_image_model(&opts.model_spec, device)?;
    let fp = crate::segmentation_pipeline::model_fingerprint(&opts.model_spec, &m);
    let t0 = Instant::now();
    let emb = embed_set(&set, &m, device)?;
    let embed_seconds = t0.elapsed().as_secs_f64();
    progress(&format!(
        "embedded {} training images in {embed_seconds:.1} s",
        set.items.len()
    ));
    let eval_embs = eval_sets
        .iter()
        .map(|s| embed_set(s, &m, device))
        .collect::<Result<Vec<_>>>()?;
    let mut plans = vec![("multi-task".to_string(), opts.config.weights)];
    for h in opts.config.weights.active() {
        plans.push((
            format!("single-task {}", h.name()),
            opts.config.weights.only(h),
        ));
    }
    let mut runs = Vec::new();
    let mut per_run_scores: Vec<Vec<TaskScores>> = Vec::new();
    for (name, weights) in plans {
        let cfg = MultiTaskConfig {
            weights,
            ..opts.config.clone()
        };
        let model = train_embedded(
            &set,
            &emb,
            &cfg,
            &opts.model_spec,
            &fp,
            opts.split.as_deref(),
            &mut |e, l| {
                progress(&format!(
                    "{name}: epoch {} loss {:.4} (classification {}, vqa {}, report {})",
                    e + 1,
                    l.total,
                    fmt_loss(l.classification),
                    fmt_loss(l.vqa),
                    fmt_loss(l.report)
                ))
            },
        )?;
        progress(&format!(
            "{name}: trained in {:.1} s",
            model.card.train_seconds
        ));
        if name == "multi-task" {
            if let Some(dir) = save {
                model.save(dir)?;
            }
        }
        per_run_scores.push(
            eval_sets
                .iter()
                .zip(&eval_embs)
                .map(|(s, e)| evaluate(&model, s, e))
                .collect::<Result<_>>()?,
        );
        runs.push(RunSummary {
            name,
            weights,
            train_seconds: model.card.train_seconds,
            final_losses: model.card.epoch_losses.last().copied().unwrap_or_default(),
        });
    }
    let sets = eval_sets
        .iter()
        .enumerate()
        .map(|(k, s)| SetScores {
            manifest: s.manifest.display().to_string(),
            n: s.items.len(),
            scores: per_run_scores.iter().map(|r| r[k].clone()).collect(),
        })
        .collect();
    Ok(Comparison {
        train_manifest: set.manifest.display().to_string(),
        n_train: set.items.len(),
        embed_seconds,
        config: opts.config.clone(),
        runs,
        sets,
    })
}

fn fmt_loss(l: Option<f32>) -> String {
    l.map_or("-".into(), |v| format!("{v:.4}"))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.3}"))
}

/// The metric rows of one head: (name, value of a score set).
type MetricRow = (&'static str, Head, fn(&TaskScores) -> Option<f64>);

const METRICS: [MetricRow; 7] = [
    ("findings macro AUROC", Head::Classification, |s| {
        s.classification.as_ref().and_then(|c| c.macro_auroc)
    }),
    ("findings macro F1@0.5", Head::Classification, |s| {
        s.classification.as_ref().map(|c| c.macro_f1)
    }),
    ("VQA closed accuracy", Head::Vqa, |s| {
        s.vqa.as_ref().and_then(|v| v.closed)
    }),
    ("VQA open accuracy", Head::Vqa, |s| {
        s.vqa.as_ref().and_then(|v| v.open)
    }),
    ("VQA overall accuracy", Head::Vqa, |s| {
        s.vqa.as_ref().map(|v| v.overall)
    }),
    ("report CE macro F1", Head::Report, |s| {
        s.report.as_ref().map(|r| r.ce_macro_f1)
    }),
    ("report CE micro F1", Head::Report, |s| {
        s.report.as_ref().map(|r| r.ce_micro_f1)
    }),
];

impl TaskScores {
    /// A plain-text list of the scores present.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (name, _, get) in METRICS {
            if let Some(v) = get(self) {
                s.push_str(&format!("{name:<24} {v:.3}\n"));
            }
        }
        s
    }
}

impl Comparison {
    /// A plain-text table per evaluated set: each metric of each head, multi-task against
    /// the single-task model of that head, then the training times.
    pub fn render_table(&self) -> String {
        let mut s = format!(
            "trained on {} ({} images; embeddings {:.1} s, shared)\n",
            self.train_manifest, self.n_train, self.embed_seconds
        );
        for set in &self.sets {
            s.push_str(&format!(
                "\n{} ({} images)\n{:<24} {:>11} {:>12} {:>8}\n",
                set.manifest, set.n, "metric", "multi-task", "single-task", "delta"
            ));
            for (name, head, get) in METRICS {
                let single = self
                    .runs
                    .iter()
                    .position(|r| r.name == format!("single-task {}", head.name()));
                let (Some(mt), Some(st)) = (
                    set.scores.first().and_then(get),
                    single.and_then(|k| set.scores.get(k)).and_then(get),
                ) else {
                    continue;
                };
                s.push_str(&format!(
                    "{name:<24} {:>11} {:>12} {:>+8.3}\n",
                    fmt_opt(Some(mt)),
                    fmt_opt(Some(st)),
                    mt - st
                ));
            }
        }
        s.push_str("\ntraining time\n");
        for r in &self.runs {
            s.push_str(&format!("{:<28} {:>8.1} s\n", r.name, r.train_seconds));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Two kinds of image (embeddings near two points) with their findings, answers and
    /// reports: the trained model scores perfectly on them, and the saved folder loads back
    /// into a model that predicts the same.
    #[test]
    fn trained_model_scores_its_toy_task_and_survives_a_save_and_load() {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let reports = [
            "a small nodule in the right upper lobe.",
            "no acute cardiopulmonary abnormality.",
        ];
        let mut x = Vec::new();
        let mut items = Vec::new();
        for i in 0..48 {
            let k = i % 2;
            x.extend(
                (0..8)
                    .map(|d| (if d % 2 == k { 1.0 } else { 0.0 }) + rng.random_range(-0.1f32..0.1)),
            );
            items.push(MultiTaskItem {
                image: PathBuf::from(format!("img{i}.png")),
                findings: Some(vec![if k == 0 { "nodule" } else { "normal" }.to_string()]),
                report: Some(reports[k].to_string()),
                qa: vec![QaItem {
                    question: "Is this study normal?".into(),
                    answer: if k == 0 { "no" } else { "yes" }.into(),
                    closed: true,
                }],
                modality: Some("chest_xray".into()),
            });
        }
        let set = MultiTaskSet {
            manifest: PathBuf::from("toy.jsonl"),
            items,
        };
        let emb = EmbeddedSet {
            images: Tensor::from_vec(x, (48, 8), &dev).unwrap(),
            questions: vec!["Is this study normal?".into()],
            question_embeds: Tensor::new(&[[0.6f32, 0.8]], &dev).unwrap(),
            question_rows: vec![vec![0]; 48],
        };
        let cfg = MultiTaskConfig {
            trunk_width: 16,
            trunk_layers: 1,
            vqa_hidden: 16,
            report_prefix: 2,
            report_width: 16,
            report_layers: 1,
            report_heads: 2,
            report_max_tokens: 16,
            min_word_count: 1,
            epochs: 25,
            batch: 16,
            lr: 3e-3,
            ..Default::default()
        };
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../medvlm-models/tests/fixtures/clip"
        );
        let model = train_embedded(&set, &emb, &cfg, fixture, "fp", None, &mut |_, _| {}).unwrap();
        assert_eq!(model.card.findings, ["nodule", "normal"]);
        assert_eq!(model.card.answers, ["no", "yes"]);
        let s = evaluate(&model, &set, &emb).unwrap();
        let c = s.classification.unwrap();
        assert_eq!((c.n, c.macro_auroc, c.macro_f1), (48, Some(1.0), 1.0));
        let v = s.vqa.unwrap();
        assert_eq!(
            (v.n_closed, v.n_open, v.closed, v.overall),
            (48, 0, Some(1.0), 1.0)
        );
        let r = s.report.unwrap();
        assert_eq!(r.n, 48);
        assert!(r.ce_micro_f1 > 0.99, "{r:?}");
        let generated = model.reports(&emb.images.narrow(0, 0, 2).unwrap()).unwrap();
        assert_eq!(generated, reports);

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("mt");
        model.save(&out).unwrap();
        let (back, _, warning) = MultiTaskModel::load(&out, &dev).unwrap();
        // The card's fingerprint is not the fixture's.
        assert!(warning.is_some());
        assert_eq!(back.card, model.card);
        assert_eq!(
            back.finding_probs(&emb.images).unwrap(),
            model.finding_probs(&emb.images).unwrap()
        );
        assert_eq!(
            back.reports(&emb.images.narrow(0, 0, 2).unwrap()).unwrap(),
            generated
        );
        // A card with another format is refused by name.
        let card = out.join("multitask.json");
        let text = std::fs::read_to_string(&card).unwrap();
        std::fs::write(&card, text.replace(FORMAT, "medvlm-multitask/0")).unwrap();
        let e = MultiTaskModel::load(&out, &dev).err().unwrap().to_string();
        assert!(e.contains("multitask.json") && e.contains("format"), "{e}");
    }

    #[test]
    fn manifests_without_targets_or_records_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.jsonl", "");
        let e = MultiTaskSet::from_manifest(&empty, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.jsonl"), "{e}");
        let bare = write(dir.path(), "bare.jsonl", "{\"image\": \"a.png\"}\n");
        let e = MultiTaskSet::from_manifest(&bare, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bare.jsonl") && e.contains("no record has findings"),
            "{e}"
        );
        let one = write(
            dir.path(),
            "one.jsonl",
            "{\"image\": \"a.png\", \"split\": \"train\", \"labels\": [\"x\"]}\n",
        );
        let e = MultiTaskSet::from_manifest(&one, Some("test"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no record of split \"test\""), "{e}");
    }

    #[test]
    fn closed_questions_follow_qa_closed_or_yes_no() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(
            dir.path(),
            "m.jsonl",
            concat!(
                "{\"image\": \"a.png\", \"qa\": [{\"question\": \"Q1\", \"answer\": \"Yes\"}, {\"question\": \"Q2\", \"answer\": \"lung\"}], \"qa_closed\": [false, true]}\n",
                "{\"image\": \"b.png\", \"label\": \"nodule\", \"qa\": [{\"question\": \"Q1\", \"answer\": \"No \"}, {\"question\": \"Q2\", \"answer\": \"liver\"}]}\n"
            ),
        );
        let s = MultiTaskSet::from_manifest(&m, None).unwrap();
        let closed: Vec<Vec<bool>> = s
            .items
            .iter()
            .map(|i| i.qa.iter().map(|q| q.closed).collect())
            .collect();
        assert_eq!(closed, vec![vec![false, true], vec![true, false]]);
        assert_eq!(s.items[1].qa[0].answer, "no");
        assert_eq!(s.items[0].findings, None);
        assert_eq!(s.items[1].findings, Some(vec!["nodule".to_string()]));
    }
}
