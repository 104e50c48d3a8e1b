//! Visual question answering as a task: question-answer pairs from a manifest's `qa` lists,
//! the frozen VLM's image and question embeddings (cached once per image and per distinct
//! question), the fused classifier of [`crate::vqa`] and its question-only baseline trained
//! on them, the saved answerer folder, evaluation the VQA-RAD way beside two baselines, and
//! answers for image files.
//!
//! Protocol ([`evaluate`]): every question-answer pair of the evaluated manifest (or split)
//! gets one answer, the training answer with the highest probability. **Answer rule**: exact
//! match after normalisation (trim, lower-case, runs of white space made one space) of the
//! predicted and the reference answer; an answer never seen in training cannot be predicted
//! and counts as wrong (such pairs are counted in the evaluation). A question is **closed**
//! when the record's `qa_closed` flags say so (what `medvlm phantoms generate` writes) or,
//! without flags, when its answer is yes or no (VQA-RAD's closed questions); every other
//! question is open. Accuracy is reported for closed, open and all questions (VQA-RAD's
//! "closed", "open" and "overall"), per question `kind` and per record `modality`, for:
//! - the fused classifier (image and question), or the generated answers of
//!   [`crate::vqa_generative`] (same rule, [`assemble_evaluation`]);
//! - the question-only baseline: the same classifier trained with the image zeroed, what
//!   language priors alone reach;
//! - the majority baseline: the most frequent training answer of the same question text
//!   (of the same `kind` for a question never seen in training, else of all questions).
//!
//! Artefact folder ([`VqaModel::save`], written to a temporary folder and renamed):
//! `vqa_model.json` (the card: settings, the answer and question-word vocabularies, the
//! per-question answer sets, the VLM's spec and fingerprint, the majority baseline, the
//! training record) and `classifier.safetensors` (`fused.*` and `question_only.*`
//! classifiers with their word vectors, `image_mean`/`image_std` and
//! `question_mean`/`question_std` standardisers).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use medvlm_models::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::card::read_json_card;
use crate::vqa::{
    predict_pairs, train_head, Result, Standardiser, VqaConfig, VqaError, VqaHead, VqaPairs,
};

/// Format tag of the card.
pub const FORMAT: &str = "medvlm-vqa/1";
const CARD_FILE: &str = "vqa_model.json";
const WEIGHTS_FILE: &str = "classifier.safetensors";

/// The answer rule of the classifier, as the evaluation states it.
pub const ANSWER_RULE: &str = "exact match after trim, lower-case and single spaces; answers unseen in training count as wrong";
/// The answer rule of generated answers.
pub const GENERATED_ANSWER_RULE: &str =
    "exact match of the generated text after trim, lower-case and single spaces";

fn file_err(path: &Path, reason: impl std::fmt::Display) -> VqaError {
    VqaError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// An answer (or question) as compared: trimmed, lower-cased, white space runs as one space.
pub fn normalise_answer(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// One question about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaItem {
    /// The image file.
    pub image: PathBuf,
    /// The question, trimmed.
    pub question: String,
    /// The reference answer, normalised ([`normalise_answer`]).
    pub answer: String,
    /// The question's `kind`, when given.
    pub kind: Option<String>,
    /// The record's `modality`, when given.
    pub modality: Option<String>,
    /// Closed (yes/no) or open; see the module documentation.
    pub closed: bool,
}

/// Question-answer pairs read from a manifest.
#[derive(Debug, Clone)]
pub struct VqaTask {
    /// The manifest.
    pub manifest: PathBuf,
    /// The pairs, in manifest order.
    pub items: Vec<VqaItem>,
}

impl VqaTask {
    /// The `qa` pairs of the records of `manifest` (those of `split` when given). Records
    /// without questions are skipped; an empty question or answer, or `qa_closed` flags that
    /// do not match the questions, is an error naming the record.
    pub fn from_manifest(manifest: &Path, split: Option<&str>) -> Result<Self> {
        let m = medvlm_io::read_manifest(manifest).map_err(|e| file_err(manifest, e))?;
        let mut items = Vec::new();
        for (i, rec) in m.records.iter().enumerate() {
            if split.is_some_and(|s| rec.split.as_deref() != Some(s)) {
                continue;
            }
            let flags: Option<Vec<bool>> = match rec.extra.get("qa_closed") {
                None => None,
                Some(v) => {
                    let flags = v
                        .as_array()
                        .map(|a| a.iter().map(|b| b.as_bool()).collect::<Option<Vec<_>>>());
                    match flags {
                        Some(Some(f)) if f.len() == rec.qa.len() => Some(f),
                        _ => {
                            return Err(file_err(
                                manifest,
                                format!(
                                    "record {} ({}): `qa_closed` must be a list of {} true/false flags, one per question",
                                    i + 1,
                                    rec.image,
                                    rec.qa.len()
                                ),
                            ))
                        }
                    }
                }
            };
            for (j, qa) in rec.qa.iter().enumerate() {
                let question = qa.question.trim();
                if question.is_empty() {
                    return Err(file_err(
                        manifest,
                        format!(
                            "record {} ({}): question {} is empty",
                            i + 1,
                            rec.image,
                            j + 1
                        ),
                    ));
                }
                let answer = normalise_answer(&qa.answer);
                if answer.is_empty() {
                    return Err(file_err(
                        manifest,
                        format!(
                            "record {} ({}): question {:?} has no answer",
                            i + 1,
                            rec.image,
                            question
                        ),
                    ));
                }
                let closed = match &flags {
                    Some(f) => f[j],
                    None => answer == "yes" || answer == "no",
                };
                items.push(VqaItem {
                    image: m.image_path(rec),
                    question: question.to_string(),
                    answer,
                    kind: qa.kind.clone(),
                    modality: rec
                        .extra
                        .get("modality")
                        .and_then(|v| v.as_str())
                        .map(str::to_string),
                    closed,
                });
            }
        }
        if items.is_empty() {
            return Err(file_err(
                manifest,
                match split {
                    Some(s) => format!("no question-answer pair (`qa`) in split {s:?}"),
                    None => "no question-answer pair (`qa`) in any record".to_string(),
                },
            ));
        }
        Ok(Self {
            manifest: manifest.to_path_buf(),
            items,
        })
    }
}

/// Frozen embeddings of a task's distinct images and questions, and which rows each pair reads.
#[derive(Debug)]
pub struct EncodedPairs {
    /// Image features `[I, E + G]` ([`image_features`]), one row per distinct image.
    pub images: Tensor,
    /// L2-normalised text-tower embeddings `[Q, E]`, one per distinct question.
    pub questions: Tensor,
    /// The distinct questions, in row order.
    pub question_texts: Vec<String>,
    /// Per pair: image row, question row.
    pub index: Vec<(u32, u32)>,
}

/// L2-normalised image embeddings `[N, E]` of files (an unreadable file is an error naming it).
pub fn image_embeddings(m: &LoadedModel, files: &[PathBuf], device: &Device) -> Result<Tensor> {
    let e = medvlm_models::embed::embed_image_files(m, files, 32, false, device, &|_| {})?;
    let t = e
        .embeds
        .ok_or_else(|| VqaError::Invalid("no image could be embedded".into()))?;
    Ok(medvlm_models::vlm::l2_normalize(&t)?.to_device(device)?)
}

/// L2-normalised text-tower embeddings `[N, E]` of questions (each must be non-empty).
pub fn question_embeddings(
    m: &LoadedModel,
    questions: &[String],
    device: &Device,
) -> Result<Tensor> {
    if let Some(i) = questions.iter().position(|q| q.trim().is_empty()) {
        return Err(VqaError::Invalid(format!(
            "question {} is empty; ask something about the image",
            i + 1
        )));
    }
    let t = medvlm_models::embed::embed_texts(m, questions, 64, device)?;
    Ok(medvlm_models::vlm::l2_normalize(&t)?.to_device(device)?)
}

/// Mean of patch tokens `[B, N, D]` (a square `s x s` grid, row-major) over each cell of a
/// `g x g` grid (cell `i` spans rows `i s / g` to `(i + 1) s / g`), as `[B, g g D]` (cells
/// row-major, then channels).
pub fn grid_pool(tokens: &Tensor, g: usize) -> Result<Tensor> {
    let (b, n, d) = tokens.dims3()?;
    let side = (n as f64).sqrt().round() as usize;
    if side * side != n {
        return Err(VqaError::Invalid(format!(
            "{n} patch tokens do not form a square grid"
        )));
    }
    if g == 0 || g > side {
        return Err(VqaError::Invalid(format!(
            "a {g} x {g} grid does not fit {side} x {side} patch tokens"
        )));
    }
    let t = tokens.reshape((b, side, side, d))?;
    let mut cells = Vec::with_capacity(g * g);
    for cy in 0..g {
        let (y0, y1) = (cy * side / g, (cy + 1) * side / g);
        for cx in 0..g {
            let (x0, x1) = (cx * side / g, (cx + 1) * side / g);
            cells.push(
                t.narrow(1, y0, y1 - y0)?
                    .narrow(2, x0, x1 - x0)?
                    .mean((1, 2))?,
            );
        }
    }
    Ok(Tensor::cat(&cells, 1)?)
}

/// Image features `[N, E + g g D]`: the L2-normalised embedding, then (when `grid > 0`) the
/// patch tokens mean-pooled on a `grid x grid` grid ([`grid_pool`]); an unreadable file is an
/// error naming it.
pub fn image_features(
    m: &LoadedModel,
    files: &[PathBuf],
    grid: usize,
    device: &Device,
) -> Result<Tensor> {
    answerer_image_features(m, files, grid, 0, device)
}

/// Grey levels of the tower's input `px` `[B, C, S, S]` (the mean of its normalised channels)
/// averaged on a `k x k` grid (cells as [`grid_pool`]'s, any input size), each image then
/// standardised by its own mean and spread over the cells: `[B, k k]` (cells row-major).
pub fn pixel_cells(px: &Tensor, k: usize) -> Result<Tensor> {
    let (b, _, size, _) = px.dims4()?;
    if k == 0 || k > size {
        return Err(VqaError::Invalid(format!(
            "a {k} x {k} pixel grid does not fit the model's {size} px input"
        )));
    }
    let grey = px
        .to_dtype(DType::F32)?
        .mean(1)?
        .reshape((b, size * size, 1))?;
    let cells = grid_pool(&grey, k)?;
    // Per-image z-scoring (as nnU-Net normalises MRI): a site's brightness and contrast drop
    // out; what is left is where the image is brighter or darker than itself.
    let centred = cells.broadcast_sub(&cells.mean_keepdim(1)?)?;
    let std = (centred.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?;
    Ok(centred.broadcast_div(&std)?)
}

/// The answerer's image features, each file read once: the L2-normalised embedding, then (when
/// `grid > 0`) the patch tokens pooled on a `grid x grid` grid ([`grid_pool`]), then (when
/// `pixel_grid > 0`) the image's own grey levels on a `pixel_grid x pixel_grid` grid
/// ([`pixel_cells`]); an unreadable file is an error naming it.
pub fn answerer_image_features(
    m: &LoadedModel,
    files: &[PathBuf],
    grid: usize,
    pixel_grid: usize,
    device: &Device,
) -> Result<Tensor> {
    if grid == 0 && pixel_grid == 0 {
        return image_embeddings(m, files, device);
    }
    let mut rows = Vec::new();
    medvlm_models::embed::for_each_pixel_batch(m, files, 32, false, device, &|_| {}, |px| {
        let out = m.model.encode_image(px)?;
        let mut parts = vec![medvlm_models::vlm::l2_normalize(
            &out.embeds.to_dtype(DType::F32)?,
        )?];
        if grid > 0 {
            parts.push(
                grid_pool(&out.patch_tokens()?.to_dtype(DType::F32)?, grid).map_err(|e| {
                    VqaError::Invalid(format!(
                        "{e}; image_grid 0 (`--image-grid 0`) uses the pooled embedding only"
                    ))
                })?,
            );
        }
        if pixel_grid > 0 {
            parts.push(pixel_cells(px, pixel_grid)?);
        }
        rows.push(Tensor::cat(&parts, 1)?.to_device(&Device::Cpu)?);
        Ok::<(), VqaError>(())
    })?;
    if rows.is_empty() {
        return Err(VqaError::Invalid("no image could be embedded".into()));
    }
    Ok(Tensor::cat(&rows, 0)?.to_device(device)?)
}

/// Embeds each distinct image (features of [`image_features`] with `grid`) and question of
/// `items` once.
pub fn encode_pairs(
    m: &LoadedModel,
    items: &[VqaItem],
    grid: usize,
    device: &Device,
) -> Result<EncodedPairs> {
    encode_pairs_with_pixels(m, items, grid, 0, device)
}

/// [`encode_pairs`] with the image features of [`answerer_image_features`].
pub fn encode_pairs_with_pixels(
    m: &LoadedModel,
    items: &[VqaItem],
    grid: usize,
    pixel_grid: usize,
    device: &Device,
) -> Result<EncodedPairs> {
    let mut image_row: HashMap<&Path, u32> = HashMap::new();
    let mut files = Vec::new();
    let mut question_row: HashMap<&str, u32> = HashMap::new();
    let mut questions = Vec::new();
    let mut index = Vec::with_capacity(items.len());
    for it in items {
        let i = *image_row.entry(it.image.as_path()).or_insert_with(|| {
            files.push(it.image.clone());
            files.len() as u32 - 1
        });
        let q = *question_row.entry(it.question.as_str()).or_insert_with(|| {
            questions.push(it.question.clone());
            questions.len() as u32 - 1
        });
        index.push((i, q));
    }
    Ok(EncodedPairs {
        images: answerer_image_features(m, &files, grid, pixel_grid, device)?,
        questions: question_embeddings(m, &questions, device)?,
        question_texts: questions,
        index,
    })
}

/// The words of a question as the word vectors read them: lower-cased runs of letters and
/// digits.
pub fn question_tokens(question: &str) -> Vec<String> {
    question
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The sorted distinct words of questions.
pub fn question_vocabulary(questions: &[String]) -> Vec<String> {
    let mut words: Vec<String> = questions.iter().flat_map(|q| question_tokens(q)).collect();
    words.sort();
    words.dedup();
    words
}

/// Bags of words `[Q, V]`: row `i` is the mean one-hot of the words of question `i` found in
/// `vocab` (sorted); unknown words are left out, and a question with none is a zero row.
pub fn bags_of_words(questions: &[String], vocab: &[String], device: &Device) -> Result<Tensor> {
    let v = vocab.len();
    let mut data = vec![0f32; questions.len() * v];
    for (i, q) in questions.iter().enumerate() {
        let known: Vec<usize> = question_tokens(q)
            .iter()
            .filter_map(|w| vocab.binary_search(w).ok())
            .collect();
        for &k in &known {
            data[i * v + k] += 1.0 / known.len() as f32;
        }
    }
    Ok(Tensor::from_vec(data, (questions.len(), v), device)?)
}

/// The majority baseline: the most frequent training answer per question text, per kind,
/// and overall (ties: the answer first seen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MajorityBaseline {
    /// Normalised question -> answer.
    pub by_question: BTreeMap<String, String>,
    /// Kind -> answer.
    pub by_kind: BTreeMap<String, String>,
    /// The most frequent answer of all.
    pub overall: String,
}

fn most_frequent<'a>(answers: impl Iterator<Item = &'a str>) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for a in answers {
        match counts.iter_mut().find(|(b, _)| *b == a) {
            Some(c) => c.1 += 1,
            None => counts.push((a, 1)),
        }
    }
    // max_by_key keeps the last of equals; reverse so the first seen wins ties.
    counts
        .iter()
        .rev()
        .max_by_key(|c| c.1)
        .map(|c| c.0.to_string())
        .unwrap_or_default()
}

impl MajorityBaseline {
    /// The baseline of training pairs.
    pub fn fit(items: &[VqaItem]) -> Self {
        let mut by_q: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        let mut by_k: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for it in items {
            by_q.entry(normalise_answer(&it.question))
                .or_default()
                .push(&it.answer);
            if let Some(k) = &it.kind {
                by_k.entry(k.clone()).or_default().push(&it.answer);
            }
        }
        Self {
            by_question: by_q
                .into_iter()
                .map(|(q, a)| (q, most_frequent(a.into_iter())))
                .collect(),
            by_kind: by_k
                .into_iter()
                .map(|(k, a)| (k, most_frequent(a.into_iter())))
                .collect(),
            overall: most_frequent(items.iter().map(|i| i.answer.as_str())),
        }
    }

    /// The baseline's answer to a question.
    pub fn answer(&self, question: &str, kind: Option<&str>) -> &str {
        self.by_question
            .get(&normalise_answer(question))
            .or_else(|| kind.and_then(|k| self.by_kind.get(k)))
            .unwrap_or(&self.overall)
    }
}

/// What the saved answerer records of its training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaCard {
    /// [`FORMAT`].
    pub format: String,
    /// The VLM as given (`--model`).
    pub model_spec: String,
    /// Fingerprint of the VLM's folder.
    pub model_fingerprint: String,
    /// Width of its image and text embeddings.
    pub embed_dim: usize,
    /// Width of the image features (the embedding, then the pooled grid).
    #[serde(default)]
    pub image_dim: usize,
    /// Classifier settings.
    pub config: VqaConfig,
    /// The answer vocabulary (normalised training answers, most frequent first).
    pub answers: Vec<String>,
    /// The word vectors' vocabulary: the training questions' words, sorted (empty without
    /// word vectors).
    #[serde(default)]
    pub question_words: Vec<String>,
    /// Training pairs of each answer.
    pub answer_counts: Vec<usize>,
    /// Normalised training question -> the answers (indices) it had in training, the
    /// mask of `mask_answers`.
    #[serde(default)]
    pub answers_by_question: BTreeMap<String, Vec<u32>>,
    /// The majority baseline.
    pub majority: MajorityBaseline,
    /// The training manifest.
    pub train_manifest: String,
    /// Split used, if any.
    pub train_split: Option<String>,
    /// Training question-answer pairs.
    pub n_train_pairs: usize,
    /// Distinct training images.
    pub n_train_images: usize,
    /// Distinct training questions.
    pub n_train_questions: usize,
    /// Mean loss of each epoch of the fused classifier.
    pub epoch_losses: Vec<f32>,
    /// Mean loss of each epoch of the question-only baseline.
    pub question_only_epoch_losses: Vec<f32>,
}

/// A trained answerer: the fused classifier, the baselines and the standardisers.
pub struct VqaModel {
    /// The card.
    pub card: VqaCard,
    /// Image and question classifier.
    pub fused: VqaHead,
    /// Question-only baseline.
    pub question_only: VqaHead,
    /// Image embedding standardiser.
    pub image_norm: Standardiser,
    /// Question embedding standardiser.
    pub question_norm: Standardiser,
    weights: HashMap<String, Tensor>,
}

/// Settings of [`train`].
#[derive(Debug, Clone)]
pub struct VqaTrainOptions {
    /// VLM spec (`medvlm_models::load_model`).
    pub model_spec: String,
    /// Classifier settings.
    pub config: VqaConfig,
    /// Split of the manifest to train on (`None`: every record).
    pub split: Option<String>,
}

/// Which classifier an epoch callback reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trained {
    /// The fused classifier.
    Fused,
    /// The question-only baseline.
    QuestionOnly,
}

/// Trains the fused classifier and the question-only baseline on `task` with the VLM `m`
/// (loaded from `opts.model_spec`); `on_epoch(which, epoch, loss)` after each epoch.
pub fn train(
    task: &VqaTask,
    m: &LoadedModel,
    opts: &VqaTrainOptions,
    device: &Device,
    on_epoch: &mut dyn FnMut(Trained, usize, f32),
) -> Result<VqaModel> {
    opts.config.validate()?;
    let enc = encode_pairs_with_pixels(
        m,
        &task.items,
        opts.config.image_grid,
        opts.config.pixel_grid,
        device,
    )?;
    // Answer vocabulary, most frequent first (ties in order of first appearance).
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut row: HashMap<&str, usize> = HashMap::new();
    for it in &task.items {
        let r = *row.entry(it.answer.as_str()).or_insert_with(|| {
            counts.push((it.answer.clone(), 0));
            counts.len() - 1
        });
        counts[r].1 += 1;
    }
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(counts[i].1), i));
    let answers: Vec<String> = order.iter().map(|&i| counts[i].0.clone()).collect();
    let answer_counts: Vec<usize> = order.iter().map(|&i| counts[i].1).collect();
    let answer_index: HashMap<&str, u32> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| (a.as_str(), i as u32))
        .collect();
    let image_norm = Standardiser::fit(&enc.images)?;
    let question_norm = Standardiser::fit(&enc.questions)?;
    let images = image_norm.apply(&enc.images)?;
    let questions = question_norm.apply(&enc.questions)?;
    let question_words = if opts.config.question_words {
        question_vocabulary(&enc.question_texts)
    } else {
        Vec::new()
    };
    let bags = if question_words.is_empty() {
        None
    } else {
        Some(bags_of_words(&enc.question_texts, &question_words, device)?)
    };
    let pairs: Vec<(u32, u32, u32)> = task
        .items
        .iter()
        .zip(&enc.index)
        .map(|(it, &(i, q))| (i, q, answer_index[it.answer.as_str()]))
        .collect();
    let data = VqaPairs {
        images: &images,
        questions: &questions,
        question_words: bags.as_ref(),
        pairs: &pairs,
    };
    let fused = train_head(&opts.config, &data, answers.len(), true, &mut |e, l| {
        on_epoch(Trained::Fused, e, l)
    })?;
    let q_only = train_head(&opts.config, &data, answers.len(), false, &mut |e, l| {
        on_epoch(Trained::QuestionOnly, e, l)
    })?;
    let mut weights = HashMap::new();
    for (prefix, vm) in [("fused", &fused.varmap), ("question_only", &q_only.varmap)] {
        for (k, v) in medvlm_models::model_dir::varmap_tensors(vm)? {
            weights.insert(format!("{prefix}.{k}"), v);
        }
    }
    weights.insert("image_mean".into(), image_norm.mean.clone());
    weights.insert("image_std".into(), image_norm.std.clone());
    weights.insert("question_mean".into(), question_norm.mean.clone());
    weights.insert("question_std".into(), question_norm.std.clone());
    let mut answers_by_question: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (it, p) in task.items.iter().zip(&pairs) {
        let a = answers_by_question
            .entry(normalise_answer(&it.question))
            .or_default();
        if let Err(at) = a.binary_search(&p.2) {
            a.insert(at, p.2);
        }
    }
    let card = VqaCard {
        format: FORMAT.into(),
        model_spec: opts.model_spec.clone(),
        model_fingerprint: crate::segmentation_pipeline::model_fingerprint(&opts.model_spec, m),
        embed_dim: enc.questions.dim(1)?,
        image_dim: enc.images.dim(1)?,
        config: opts.config.clone(),
        answers,
        question_words,
        answer_counts,
        answers_by_question,
        majority: MajorityBaseline::fit(&task.items),
        train_manifest: task.manifest.display().to_string(),
        train_split: opts.split.clone(),
        n_train_pairs: pairs.len(),
        n_train_images: enc.images.dim(0)?,
        n_train_questions: enc.questions.dim(0)?,
        epoch_losses: fused.epoch_losses,
        question_only_epoch_losses: q_only.epoch_losses,
    };
    Ok(VqaModel {
        card,
        fused: fused.head,
        question_only: q_only.head,
        image_norm,
        question_norm,
        weights,
    })
}

/// One answer with the classifier's probability for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The answer (normalised form of a training answer).
    pub answer: String,
    /// Its softmax probability.
    pub confidence: f32,
}

impl VqaModel {
    /// Writes the artefact folder `out` (see the module documentation), replacing an earlier
    /// one only once the new one is complete.
    pub fn save(&self, out: &Path) -> Result<()> {
        medvlm_io::atomic::write_dir_atomic(
            out,
            |tmp: &Path| -> Result<()> {
                let card =
                    serde_json::to_string_pretty(&self.card).map_err(|e| file_err(out, e))?;
                std::fs::write(tmp.join(CARD_FILE), card)
                    .map_err(|e| file_err(&tmp.join(CARD_FILE), e))?;
                let cpu: HashMap<String, Tensor> = self
                    .weights
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
                    .collect::<Result<_>>()?;
                candle_core::safetensors::save(&cpu, tmp.join(WEIGHTS_FILE))
                    .map_err(|e| file_err(&tmp.join(WEIGHTS_FILE), e))?;
                Ok(())
            },
            file_err,
        )
    }

    /// Reads an artefact folder (without its VLM).
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let card_path = dir.join(CARD_FILE);
        let card: VqaCard = read_json_card(
            dir,
            CARD_FILE,
            FORMAT,
            "VQA answerer",
            |c: &VqaCard| c.format.as_str(),
            file_err,
        )?;
        if card.answers.is_empty() || card.answers.len() != card.answer_counts.len() {
            return Err(file_err(
                &card_path,
                "the answer vocabulary is empty or its counts do not match it",
            ));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let weights =
            candle_core::safetensors::load(&wpath, device).map_err(|e| file_err(&wpath, e))?;
        let get = |name: &str| {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| file_err(&wpath, format!("no `{name}` tensor")))
        };
        let image_norm = Standardiser {
            mean: get("image_mean")?,
            std: get("image_std")?,
        };
        let question_norm = Standardiser {
            mean: get("question_mean")?,
            std: get("question_std")?,
        };
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        let head = |prefix: &str| {
            VqaHead::new(
                vb.pp(prefix),
                card.embed_dim,
                card.image_dim.saturating_sub(card.embed_dim),
                card.config.hidden,
                card.answers.len(),
                card.question_words.len(),
            )
            .map_err(|e| {
                file_err(
                    &wpath,
                    format!(
                        "{prefix} classifier does not fit the card ({} answers, widths {} and {}): {e}",
                        card.answers.len(),
                        card.image_dim,
                        card.embed_dim
                    ),
                )
            })
        };
        let fused = head("fused")?;
        let question_only = head("question_only")?;
        Ok(Self {
            card,
            fused,
            question_only,
            image_norm,
            question_norm,
            weights,
        })
    }

    /// Reads an artefact folder and loads its VLM; the second value is a warning when the
    /// VLM's fingerprint differs from the card's.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, LoadedModel, Option<String>)> {
        let model = Self::read(dir, device)?;
        let lopts = medvlm_models::LoadOptions {
            device: device.clone(),
            ..Default::default()
        };
        let m = medvlm_models::load_model(&model.card.model_spec, &lopts)?;
        let fp = crate::segmentation_pipeline::model_fingerprint(&model.card.model_spec, &m);
        let warning = (fp != model.card.model_fingerprint).then(|| {
            format!(
                "the model {} is not the one the answerer was trained with (fingerprint differs)",
                model.card.model_spec
            )
        });
        Ok((model, m, warning))
    }

    fn to_answers(&self, best: Vec<(u32, f32)>) -> Vec<Answer> {
        best.into_iter()
            .map(|(i, p)| Answer {
                answer: self.card.answers[i as usize].clone(),
                confidence: p,
            })
            .collect()
    }

    /// Answers of the fused classifier (`use_image`) or of the question-only baseline for
    /// pairs of L2-normalised embeddings: `pairs` index rows of `images` `[I, E]` and
    /// `questions` `[Q, E]`, the embeddings of `question_texts`.
    pub fn answer_embedded(
        &self,
        images: &Tensor,
        questions: &Tensor,
        question_texts: &[String],
        pairs: &[(u32, u32)],
        use_image: bool,
    ) -> Result<Vec<Answer>> {
        if question_texts.len() != questions.dim(0)? {
            return Err(VqaError::Invalid(format!(
                "{} question texts for {} question embeddings",
                question_texts.len(),
                questions.dim(0)?
            )));
        }
        let images = self.image_norm.apply(images)?;
        let questions = self.question_norm.apply(questions)?;
        let bags = if self.card.question_words.is_empty() {
            None
        } else {
            Some(bags_of_words(
                question_texts,
                &self.card.question_words,
                questions.device(),
            )?)
        };
        let triples: Vec<(u32, u32, u32)> = pairs.iter().map(|&(i, q)| (i, q, 0)).collect();
        let data = VqaPairs {
            images: &images,
            questions: &questions,
            question_words: bags.as_ref(),
            pairs: &triples,
        };
        let head = if use_image {
            &self.fused
        } else {
            &self.question_only
        };
        let mask = if self.card.config.mask_answers {
            Some(self.answer_mask(question_texts, questions.device())?)
        } else {
            None
        };
        Ok(self.to_answers(predict_pairs(head, &data, use_image, mask.as_ref())?))
    }

    /// The additive answer mask `[Q, A]` of questions: for a question seen in training, 0 at
    /// the answers it had and -1e9 elsewhere; zeros for a question never seen.
    pub fn answer_mask(&self, question_texts: &[String], device: &Device) -> Result<Tensor> {
        let a = self.card.answers.len();
        let mut data = vec![0f32; question_texts.len() * a];
        for (i, q) in question_texts.iter().enumerate() {
            if let Some(allowed) = self.card.answers_by_question.get(&normalise_answer(q)) {
                let row = &mut data[i * a..(i + 1) * a];
                row.fill(-1e9);
                for &k in allowed {
                    if let Some(x) = row.get_mut(k as usize) {
                        *x = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(data, (question_texts.len(), a), device)?)
    }
}

/// Accuracy over a set of questions.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Accuracy {
    /// Questions answered correctly.
    pub correct: usize,
    /// Questions.
    pub n: usize,
    /// `correct / n` (0 when `n` is 0).
    pub accuracy: f64,
}

impl Accuracy {
    fn add(&mut self, ok: bool) {
        self.n += 1;
        self.correct += usize::from(ok);
        self.accuracy = self.correct as f64 / self.n as f64;
    }
}

/// Accuracies of one method.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct VqaScores {
    /// Closed questions.
    pub closed: Accuracy,
    /// Open questions.
    pub open: Accuracy,
    /// All questions.
    pub overall: Accuracy,
    /// Per question kind (`-` for pairs without one).
    pub per_kind: BTreeMap<String, Accuracy>,
    /// Per record `modality` (`-` for records without one): closed, open, all.
    pub per_modality: BTreeMap<String, [Accuracy; 3]>,
}

fn score(items: &[VqaItem], predicted: &[String]) -> VqaScores {
    let mut s = VqaScores::default();
    for (it, p) in items.iter().zip(predicted) {
        let ok = normalise_answer(p) == it.answer;
        if it.closed {
            s.closed.add(ok);
        } else {
            s.open.add(ok);
        }
        s.overall.add(ok);
        s.per_kind
            .entry(it.kind.clone().unwrap_or_else(|| "-".into()))
            .or_default()
            .add(ok);
        let m = s
            .per_modality
            .entry(it.modality.clone().unwrap_or_else(|| "-".into()))
            .or_default();
        m[usize::from(!it.closed)].add(ok);
        m[2].add(ok);
    }
    s
}

/// One example of the evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaExample {
    /// Image file.
    pub image: String,
    /// The question.
    pub question: String,
    /// Its kind.
    pub kind: Option<String>,
    /// The reference answer.
    pub truth: String,
    /// The answerer's answer.
    pub predicted: String,
    /// Its probability (the classifier's; `None` for generated answers).
    pub confidence: Option<f32>,
    /// The question-only baseline's answer (classifier only).
    pub question_only: Option<String>,
    /// The majority baseline's answer.
    pub majority: String,
}

/// The evaluation of an answerer on a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaEvaluation {
    /// The manifest evaluated.
    pub manifest: String,
    /// What answered: the classifier over the training answers, or the generative decoder.
    pub method: String,
    /// Question-answer pairs scored.
    pub n_pairs: usize,
    /// Distinct images.
    pub n_images: usize,
    /// The answer rule ([`ANSWER_RULE`] or [`GENERATED_ANSWER_RULE`]).
    pub answer_rule: String,
    /// Pairs whose reference answer is not in the training answers (wrong for the
    /// classifiers and the majority baseline).
    pub n_unseen_answers: usize,
    /// Of those, closed ones.
    pub n_unseen_closed: usize,
    /// The answerer (fused classifier or generative decoder).
    pub model: VqaScores,
    /// The question-only baseline (trained beside the classifier only).
    pub question_only: Option<VqaScores>,
    /// The majority-answer-per-question baseline.
    pub majority: VqaScores,
    /// One example per question kind (the first pair of each), then the first mistakes.
    pub examples: Vec<VqaExample>,
}

/// Evaluates an answerer and its baselines on `task` (see the module documentation).
pub fn evaluate(
    model: &VqaModel,
    image_model: &LoadedModel,
    task: &VqaTask,
    device: &Device,
) -> Result<VqaEvaluation> {
    let enc = encode_pairs_with_pixels(
        image_model,
        &task.items,
        model.card.config.image_grid,
        model.card.config.pixel_grid,
        device,
    )?;
    let fused = model.answer_embedded(
        &enc.images,
        &enc.questions,
        &enc.question_texts,
        &enc.index,
        true,
    )?;
    let q_only = model.answer_embedded(
        &enc.images,
        &enc.questions,
        &enc.question_texts,
        &enc.index,
        false,
    )?;
    let q_answers: Vec<String> = q_only.into_iter().map(|a| a.answer).collect();
    Ok(assemble_evaluation(
        task,
        enc.images.dim(0)?,
        AnswerSet {
            method: "classifier over the training answers".into(),
            answer_rule: ANSWER_RULE,
            answers: fused
                .into_iter()
                .map(|a| (a.answer, Some(a.confidence)))
                .collect(),
            question_only: Some(q_answers),
        },
        &model.card.majority,
        &model.card.answers,
    ))
}

/// An answerer's answers to a task's questions, in task order.
#[derive(Debug, Clone)]
pub struct AnswerSet {
    /// What answered.
    pub method: String,
    /// Its answer rule.
    pub answer_rule: &'static str,
    /// Each answer, with its probability when the answerer gives one.
    pub answers: Vec<(String, Option<f32>)>,
    /// The question-only baseline's answers, when one was trained.
    pub question_only: Option<Vec<String>>,
}

/// Scores the answerer's answers (with their probabilities, when it has them), the
/// question-only answers (when given) and the majority baseline on `task`, and picks the
/// examples: the first pair of each kind, then the first 4 mistakes.
pub fn assemble_evaluation(
    task: &VqaTask,
    n_images: usize,
    set: AnswerSet,
    majority_baseline: &MajorityBaseline,
    training_answers: &[String],
) -> VqaEvaluation {
    let AnswerSet {
        method,
        answer_rule,
        answers,
        question_only,
    } = set;
    let majority: Vec<String> = task
        .items
        .iter()
        .map(|it| {
            majority_baseline
                .answer(&it.question, it.kind.as_deref())
                .to_string()
        })
        .collect();
    let known: std::collections::HashSet<&str> =
        training_answers.iter().map(String::as_str).collect();
    let unseen: Vec<&VqaItem> = task
        .items
        .iter()
        .filter(|it| !known.contains(it.answer.as_str()))
        .collect();
    let predicted: Vec<String> = answers.iter().map(|a| a.0.clone()).collect();
    let example = |i: usize| VqaExample {
        image: task.items[i].image.display().to_string(),
        question: task.items[i].question.clone(),
        kind: task.items[i].kind.clone(),
        truth: task.items[i].answer.clone(),
        predicted: answers[i].0.clone(),
        confidence: answers[i].1,
        question_only: question_only.as_ref().map(|q| q[i].clone()),
        majority: majority[i].clone(),
    };
    let mut seen_kinds = std::collections::HashSet::new();
    let mut examples: Vec<VqaExample> = (0..task.items.len())
        .filter(|&i| seen_kinds.insert(task.items[i].kind.clone()))
        .map(example)
        .collect();
    examples.extend(
        (0..task.items.len())
            .filter(|&i| normalise_answer(&answers[i].0) != task.items[i].answer)
            .take(4)
            .map(example),
    );
    VqaEvaluation {
        manifest: task.manifest.display().to_string(),
        method,
        n_pairs: task.items.len(),
        n_images,
        answer_rule: answer_rule.into(),
        n_unseen_answers: unseen.len(),
        n_unseen_closed: unseen.iter().filter(|it| it.closed).count(),
        model: score(&task.items, &predicted),
        question_only: question_only.as_ref().map(|q| score(&task.items, q)),
        majority: score(&task.items, &majority),
        examples,
    }
}

/// Reads `manifest`, loads the VLM, trains and writes the artefact folder `out`.
pub fn train_and_save(
    manifest: &Path,
    opts: &VqaTrainOptions,
    out: &Path,
    device: &Device,
    on_epoch: &mut dyn FnMut(Trained, usize, f32),
) -> Result<VqaCard> {
    let task = VqaTask::from_manifest(manifest, opts.split.as_deref())?;
    let lopts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let m = medvlm_models::load_model(&opts.model_spec, &lopts)?;
    let model = train(&task, &m, opts, device, on_epoch)?;
    model.save(out)?;
    Ok(model.card)
}

/// Loads the artefact `dir` and evaluates it on `manifest` (its `split` when given);
/// `mask_answers` overrides the card's setting. The second value is the model warning of
/// [`VqaModel::load`].
pub fn evaluate_manifest(
    dir: &Path,
    manifest: &Path,
    split: Option<&str>,
    mask_answers: Option<bool>,
    device: &Device,
) -> Result<(VqaEvaluation, Option<String>)> {
    let task = VqaTask::from_manifest(manifest, split)?;
    let (mut model, m, warning) = VqaModel::load(dir, device)?;
    if let Some(mask) = mask_answers {
        model.card.config.mask_answers = mask;
    }
    Ok((evaluate(&model, &m, &task, device)?, warning))
}

/// An answerer with the VLM it reads, ready to answer questions about image files (what
/// `medvlm vqa answer` uses).
pub struct Answerer {
    /// The classifier and baselines.
    pub model: VqaModel,
    /// Its VLM.
    pub image_model: LoadedModel,
}

impl Answerer {
    /// Loads the artefact `dir` and its VLM; the second value is the model warning of
    /// [`VqaModel::load`].
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, Option<String>)> {
        let (model, image_model, warning) = VqaModel::load(dir, device)?;
        Ok((Self { model, image_model }, warning))
    }

    /// The answer to `question` about each image file, in input order (an empty question or
    /// an unreadable file is an error naming it).
    pub fn answer_files(
        &self,
        images: &[PathBuf],
        question: &str,
        device: &Device,
    ) -> Result<Vec<Answer>> {
        let texts = [question.trim().to_string()];
        let q = question_embeddings(&self.image_model, &texts, device)?;
        let v = answerer_image_features(
            &self.image_model,
            images,
            self.model.card.config.image_grid,
            self.model.card.config.pixel_grid,
            device,
        )?;
        let pairs: Vec<(u32, u32)> = (0..images.len() as u32).map(|i| (i, 0)).collect();
        self.model.answer_embedded(&v, &q, &texts, &pairs, true)
    }
}

/// Answers to `question` about image files with the artefact `dir`, in input order.
pub fn answer_files(
    dir: &Path,
    images: &[PathBuf],
    question: &str,
    device: &Device,
) -> Result<(Vec<Answer>, Option<String>)> {
    if question.trim().is_empty() {
        return Err(VqaError::Invalid(
            "the question is empty; ask something about the image".into(),
        ));
    }
    let (a, warning) = Answerer::load(dir, device)?;
    Ok((a.answer_files(images, question, device)?, warning))
}

impl VqaEvaluation {
    /// A plain-text table: closed, open, overall and per-kind accuracy of the classifier and
    /// the two baselines, then examples.
    pub fn render_table(&self) -> String {
        let mut s = format!(
            "{} questions about {} images of {}; answerer: {}\nanswer rule: {}\n{} questions ({} closed) have an answer never seen in training\n",
            self.n_pairs,
            self.n_images,
            self.manifest,
            self.method,
            self.answer_rule,
            self.n_unseen_answers,
            self.n_unseen_closed
        );
        s.push_str(&format!(
            "{:<22} {:>6} {:>14} {:>14} {:>10}\n",
            "questions", "n", "image+question", "question only", "majority"
        ));
        // (row name, how to read one accuracy of a method's scores)
        type Pick<'a> = Box<dyn Fn(&VqaScores) -> Accuracy + 'a>;
        let mut rows: Vec<(String, Pick)> = vec![
            ("closed".into(), Box::new(|m: &VqaScores| m.closed)),
            ("open".into(), Box::new(|m: &VqaScores| m.open)),
            ("overall".into(), Box::new(|m: &VqaScores| m.overall)),
        ];
        for k in self.model.per_kind.keys() {
            rows.push((
                format!("kind {k}"),
                Box::new(move |m: &VqaScores| m.per_kind.get(k).copied().unwrap_or_default()),
            ));
        }
        for modality in self.model.per_modality.keys() {
            for (i, part) in ["closed", "open"].iter().enumerate() {
                rows.push((
                    format!("{modality} {part}"),
                    Box::new(move |m: &VqaScores| {
                        m.per_modality.get(modality).copied().unwrap_or_default()[i]
                    }),
                ));
            }
        }
        for (name, pick) in rows {
            let a = pick(&self.model);
            let q = match &self.question_only {
                Some(q) => format!("{:.3}", pick(q).accuracy),
                None => "-".into(),
            };
            s.push_str(&format!(
                "{:<22} {:>6} {:>14.3} {:>14} {:>10.3}\n",
                name,
                a.n,
                a.accuracy,
                q,
                pick(&self.majority).accuracy
            ));
        }
        for e in self.examples.iter().take(6) {
            s.push_str(&format!(
                "\n{}\n  Q: {} ({})\n  true: {}  predicted: {}{}  question only: {}  majority: {}\n",
                e.image,
                e.question,
                e.kind.as_deref().unwrap_or("-"),
                e.truth,
                e.predicted,
                e.confidence.map(|c| format!(" ({c:.2})")).unwrap_or_default(),
                e.question_only.as_deref().unwrap_or("-"),
                e.majority
            ));
        }
        s
    }
}
