//! Generative answers: the report decoder of [`crate::report_generation`] (ClipCap's prefix
//! mapping into a GPT-2-layout decoder, Mokady et al. 2021) reads the image prefix and the
//! question's tokens and writes the answer, the open-ended variant of medical VQA (van
//! Sonsbeek et al., "Open-Ended Medical Visual Question Answering Through Prefix Tuning of
//! Language Models", MICCAI 2023, fine-tune a pretrained GPT-2; here the small decoder is
//! trained from scratch).
//!
//! Image features are those of the classifier ([`crate::vqa_pipeline::image_features`]:
//! the pooled embedding and the 2 x 2 patch grid), standardised with the training statistics.
//! Each training sequence is the question's word tokens, then the answer's, then EOS; the
//! loss is the report decoder's mean token cross-entropy over the whole sequence (the
//! question's tokens too: a simplification of answer-only losses). At answering time the
//! question's tokens are the prompt after the prefix and greedy decoding writes the answer up
//! to EOS; the answer is scored with the classifier's exact-match rule. The vocabulary is the
//! training questions' and answers' words (lower-cased; punctuation as tokens), so an answer
//! with a word never seen in training cannot be written.
//!
//! Defaults ([`generative_config`]): prefix of 4, decoder width 64, 2 blocks, 4 heads,
//! sequences up to 32 tokens, AdamW lr 2e-3 with 5 % warm-up and cosine decay, weight decay
//! 0.01, batch 64, 5 epochs, seed 0, every word kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use medvlm_models::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::card::read_json_card;
use crate::report_generation::{train_generator, ReportGenConfig, ReportGenerator, EOS_ID};
use crate::vqa::{Result, Standardiser, VqaError};
use crate::vqa_pipeline::{
    assemble_evaluation, encode_pairs, image_features, normalise_answer, AnswerSet,
    MajorityBaseline, VqaEvaluation, VqaTask, GENERATED_ANSWER_RULE,
};

/// Format tag of the generative answerer's card.
pub const GEN_FORMAT: &str = "medvlm-vqa-gen/1";
/// The card file; its presence marks a generative answerer folder.
pub const GEN_CARD_FILE: &str = "vqa_generator.json";
const WEIGHTS_FILE: &str = "generator.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";
const NORM_FILE: &str = "image_norm.safetensors";

fn file_err(path: &Path, reason: impl std::fmt::Display) -> VqaError {
    VqaError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The decoder settings of the generative answerer (see the module documentation).
pub fn generative_config() -> ReportGenConfig {
    ReportGenConfig {
        prefix_len: 4,
        width: 64,
        layers: 2,
        heads: 4,
        max_tokens: 32,
        epochs: 5,
        batch: 64,
        lr: 2e-3,
        weight_decay: 0.01,
        seed: 0,
        min_word_count: 1,
        findings: 0,
        image_dropout: 0.0,
    }
}

/// What the saved generative answerer records of its training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenVqaCard {
    /// [`GEN_FORMAT`].
    pub format: String,
    /// The VLM as given (`--model`).
    pub model_spec: String,
    /// Fingerprint of the VLM's folder.
    pub model_fingerprint: String,
    /// Patch grid of the image features.
    pub image_grid: usize,
    /// Width of the image features.
    pub image_dim: usize,
    /// Tokens of the word tokenizer.
    pub vocab_size: usize,
    /// Decoder settings.
    pub config: ReportGenConfig,
    /// The distinct normalised training answers (to count unseen reference answers).
    pub answers: Vec<String>,
    /// The majority baseline.
    pub majority: MajorityBaseline,
    /// The training manifest.
    pub train_manifest: String,
    /// Split used, if any.
    pub train_split: Option<String>,
    /// Training question-answer pairs.
    pub n_train_pairs: usize,
    /// Sequences cut to `max_tokens`.
    pub n_truncated: usize,
    /// Mean loss of each epoch.
    pub epoch_losses: Vec<f32>,
}

/// A trained generative answerer.
pub struct GenVqaModel {
    /// The card.
    pub card: GenVqaCard,
    /// Prefix mapper and decoder.
    pub generator: ReportGenerator,
    /// The word tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Image feature standardiser.
    pub image_norm: Standardiser,
    weights: HashMap<String, Tensor>,
}

/// Settings of [`train_generative`].
#[derive(Debug, Clone)]
pub struct GenTrainOptions {
    /// VLM spec.
    pub model_spec: String,
    /// Decoder settings.
    pub config: ReportGenConfig,
    /// Patch grid of the image features.
    pub image_grid: usize,
    /// Split of the manifest to train on.
    pub split: Option<String>,
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| VqaError::Invalid(format!("tokenizer: {e}")))?
        .get_ids()
        .to_vec())
}

/// Trains the generative answerer on `task` with the VLM `m`; `on_epoch(epoch, loss)`.
pub fn train_generative(
    task: &VqaTask,
    m: &LoadedModel,
    opts: &GenTrainOptions,
    device: &Device,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<GenVqaModel> {
    opts.config.validate()?;
    let enc = encode_pairs(m, &task.items, opts.image_grid, device)?;
    let image_norm = Standardiser::fit(&enc.images)?;
    let images = image_norm.apply(&enc.images)?;
    let rows = Tensor::from_vec(
        enc.index.iter().map(|p| p.0).collect::<Vec<_>>(),
        enc.index.len(),
        images.device(),
    )?;
    let per_pair = images.index_select(&rows, 0)?;
    let texts: Vec<&str> = task
        .items
        .iter()
        .flat_map(|it| [it.question.as_str(), it.answer.as_str()])
        .collect();
    let tokenizer =
        medvlm_train::pretrain::build_word_tokenizer(&texts, opts.config.min_word_count)
            .map_err(|e| VqaError::Invalid(e.to_string()))?;
    let max = opts.config.max_tokens;
    let mut seqs = Vec::with_capacity(task.items.len());
    let mut n_truncated = 0;
    for it in &task.items {
        let mut ids = encode(&tokenizer, &it.question)?;
        ids.extend(encode(&tokenizer, &it.answer)?);
        n_truncated += usize::from(ids.len() + 1 > max);
        ids.truncate(max - 1);
        ids.push(EOS_ID);
        seqs.push(ids);
    }
    let vocab = tokenizer.get_vocab_size(true);
    let trained = train_generator(&opts.config, &per_pair, &seqs, vocab, on_epoch)?;
    let mut answers: Vec<String> = task.items.iter().map(|i| i.answer.clone()).collect();
    answers.sort();
    answers.dedup();
    let card = GenVqaCard {
        format: GEN_FORMAT.into(),
        model_spec: opts.model_spec.clone(),
        model_fingerprint: crate::segmentation_pipeline::model_fingerprint(&opts.model_spec, m),
        image_grid: opts.image_grid,
        image_dim: images.dim(1)?,
        vocab_size: vocab,
        config: opts.config.clone(),
        answers,
        majority: MajorityBaseline::fit(&task.items),
        train_manifest: task.manifest.display().to_string(),
        train_split: opts.split.clone(),
        n_train_pairs: seqs.len(),
        n_truncated,
        epoch_losses: trained.epoch_losses,
    };
    Ok(GenVqaModel {
        card,
        generator: trained.generator,
        tokenizer,
        image_norm,
        weights: medvlm_models::model_dir::varmap_tensors(&trained.varmap)?,
    })
}

impl GenVqaModel {
    /// Writes the folder `out` (card, `generator.safetensors`, `tokenizer.json`,
    /// `image_norm.safetensors`), replacing an earlier one only once the new one is complete.
    pub fn save(&self, out: &Path) -> Result<()> {
        medvlm_io::atomic::write_dir_atomic(
            out,
            |tmp: &Path| -> Result<()> {
                let card =
                    serde_json::to_string_pretty(&self.card).map_err(|e| file_err(out, e))?;
                std::fs::write(tmp.join(GEN_CARD_FILE), card)
                    .map_err(|e| file_err(&tmp.join(GEN_CARD_FILE), e))?;
                let cpu = |m: &HashMap<String, Tensor>| -> Result<HashMap<String, Tensor>> {
                    m.iter()
                        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
                        .collect()
                };
                candle_core::safetensors::save(&cpu(&self.weights)?, tmp.join(WEIGHTS_FILE))
                    .map_err(|e| file_err(&tmp.join(WEIGHTS_FILE), e))?;
                let norm: HashMap<String, Tensor> = [
                    ("image_mean".to_string(), self.image_norm.mean.clone()),
                    ("image_std".to_string(), self.image_norm.std.clone()),
                ]
                .into_iter()
                .collect();
                candle_core::safetensors::save(&cpu(&norm)?, tmp.join(NORM_FILE))
                    .map_err(|e| file_err(&tmp.join(NORM_FILE), e))?;
                self.tokenizer
                    .save(tmp.join(TOKENIZER_FILE), false)
                    .map_err(|e| file_err(&tmp.join(TOKENIZER_FILE), e))?;
                Ok(())
            },
            file_err,
        )
    }

    /// Reads a generative answerer folder (without its VLM). A tokenizer whose vocabulary
    /// does not match the decoder's is refused, naming the tokenizer file.
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let card: GenVqaCard = read_json_card(
            dir,
            GEN_CARD_FILE,
            GEN_FORMAT,
            "generative VQA answerer",
            |c: &GenVqaCard| c.format.as_str(),
            file_err,
        )?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| file_err(&tok_path, e))?;
        if tokenizer.get_vocab_size(true) != card.vocab_size {
            return Err(file_err(
                &tok_path,
                format!(
                    "{} tokens, the decoder was trained for {}",
                    tokenizer.get_vocab_size(true),
                    card.vocab_size
                ),
            ));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let weights =
            candle_core::safetensors::load(&wpath, device).map_err(|e| file_err(&wpath, e))?;
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        let generator = ReportGenerator::new(vb, &card.config, card.image_dim, card.vocab_size)
            .map_err(|e| file_err(&wpath, format!("does not fit the card: {e}")))?;
        let npath = dir.join(NORM_FILE);
        let mut norm =
            candle_core::safetensors::load(&npath, device).map_err(|e| file_err(&npath, e))?;
        let mut take = |name: &str| {
            norm.remove(name)
                .ok_or_else(|| file_err(&npath, format!("no `{name}` tensor")))
        };
        let image_norm = Standardiser {
            mean: take("image_mean")?,
            std: take("image_std")?,
        };
        Ok(Self {
            card,
            generator,
            tokenizer,
            image_norm,
            weights,
        })
    }

    /// Reads the folder and loads its VLM; the second value is a warning when the VLM's
    /// fingerprint differs from the card's.
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

    /// Greedy answers for pairs: `pairs` index rows of the raw image features `images`
    /// `[I, D]` and of `questions`.
    pub fn answer_features(
        &self,
        images: &Tensor,
        questions: &[String],
        pairs: &[(u32, u32)],
    ) -> Result<Vec<String>> {
        let prefixes = self
            .generator
            .mapper
            .forward(&self.image_norm.apply(images)?)?;
        let prompts: Vec<Vec<u32>> = questions
            .iter()
            .map(|q| encode(&self.tokenizer, q))
            .collect::<Result<_>>()?;
        let max = self.card.config.max_tokens;
        let mut out = Vec::with_capacity(pairs.len());
        for &(i, q) in pairs {
            let prompt = &prompts[q as usize];
            if prompt.len() + 1 >= max {
                return Err(VqaError::Invalid(format!(
                    "the question {:?} has {} tokens; the decoder holds {} with the answer",
                    questions[q as usize],
                    prompt.len(),
                    max
                )));
            }
            let d = self.generator.decoder.greedy(
                Some(&prefixes.get(i as usize)?),
                prompt,
                max - prompt.len(),
                Some(EOS_ID),
            )?;
            // Ids 0-3 are padding, start, unknown and end: an answer shows none of them.
            let words: Vec<String> = d
                .tokens
                .iter()
                .take_while(|&&t| t != EOS_ID)
                .filter(|&&t| t > EOS_ID)
                .filter_map(|&t| self.tokenizer.id_to_token(t))
                .collect();
            out.push(normalise_answer(&crate::report_pipeline::detokenize(
                &words,
            )));
        }
        Ok(out)
    }
}

/// Evaluates a generative answerer on `task`: its answers and the majority baseline (no
/// question-only baseline is trained beside it), scored like the classifier's.
pub fn evaluate_generative(
    model: &GenVqaModel,
    image_model: &LoadedModel,
    task: &VqaTask,
    device: &Device,
) -> Result<VqaEvaluation> {
    let enc = encode_pairs(image_model, &task.items, model.card.image_grid, device)?;
    let answers = model.answer_features(&enc.images, &enc.question_texts, &enc.index)?;
    Ok(assemble_evaluation(
        task,
        enc.images.dim(0)?,
        AnswerSet {
            method: "generative decoder (greedy)".into(),
            answer_rule: GENERATED_ANSWER_RULE,
            answers: answers.into_iter().map(|a| (a, None)).collect(),
            question_only: None,
        },
        &model.card.majority,
        &model.card.answers,
    ))
}

/// Whether `dir` holds a generative answerer (its card file exists).
pub fn is_generative(dir: &Path) -> bool {
    dir.join(GEN_CARD_FILE).is_file()
}

/// Reads `manifest`, loads the VLM, trains the generative answerer and writes `out`.
pub fn train_generative_and_save(
    manifest: &Path,
    opts: &GenTrainOptions,
    out: &Path,
    device: &Device,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<GenVqaCard> {
    let task = VqaTask::from_manifest(manifest, opts.split.as_deref())?;
    let lopts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let m = medvlm_models::load_model(&opts.model_spec, &lopts)?;
    let model = train_generative(&task, &m, opts, device, on_epoch)?;
    model.save(out)?;
    Ok(model.card)
}

/// Generated answers to `question` about image files with the folder `dir`, in input order.
pub fn answer_files_generative(
    dir: &Path,
    images: &[PathBuf],
    question: &str,
    device: &Device,
) -> Result<(Vec<String>, Option<String>)> {
    if question.trim().is_empty() {
        return Err(VqaError::Invalid(
            "the question is empty; ask something about the image".into(),
        ));
    }
    let (model, m, warning) = GenVqaModel::load(dir, device)?;
    let v = image_features(&m, images, model.card.image_grid, device)?;
    let pairs: Vec<(u32, u32)> = (0..images.len() as u32).map(|i| (i, 0)).collect();
    Ok((
        model.answer_features(&v, &[question.trim().to_string()], &pairs)?,
        warning,
    ))
}
