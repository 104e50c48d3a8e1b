//! Report generation from image embeddings: ClipCap's prefix mapping (Mokady et al. 2021,
//! "ClipCap: CLIP Prefix for Image Captioning") in front of a GPT-2-layout causal decoder
//! ([`medvlm_models::gpt2`]), trained with token cross-entropy on the reports (R2Gen and
//! PromptMRG are the medical anchors; this is the prefix-mapping variant).
//!
//! A frozen image tower's pooled embedding `[E]` goes through an MLP
//! `E -> (P x W) / 2 -> tanh -> P x W`, giving `P` prefix embeddings of the decoder's width
//! `W`; the report's tokens follow, and the decoder predicts each token from the prefix and the
//! tokens before it. The loss is the mean cross-entropy over the report's tokens and its
//! end-of-text token (padding excluded). Decoding is greedy (batched) or beam search.
//!
//! Defaults ([`ReportGenConfig::default`]): prefix of 10, decoder width 128, 2 blocks, 4
//! heads, reports up to 120 tokens, AdamW lr 1e-3 with 5 % warm-up and cosine decay, weight
//! decay 0.01, batch 32, 12 epochs, seed 0; the vocabulary is the training reports' words seen
//! at least twice (lower-cased; punctuation as tokens).

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use medvlm_models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::{EpochTraining, EpochTrainingConfig};
use medvlm_train::optim::{Gradients, NamedVar};
use serde::{Deserialize, Serialize};

/// Errors of report generation.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] medvlm_train::optim::OptimError),
    /// Model loading or decoding error.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// Metric error.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of report generation.
pub type Result<T> = std::result::Result<T, ReportError>;

/// Padding token id of the word tokenizer ([`medvlm_train::pretrain::build_word_tokenizer`]).
pub const PAD_ID: u32 = 0;
/// End-of-text token id of the word tokenizer.
pub const EOS_ID: u32 = 3;

/// Shape and training settings; see the module documentation for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportGenConfig {
    /// Prefix embeddings made from the image embedding.
    pub prefix_len: usize,
    /// Decoder width.
    pub width: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Decoder attention heads.
    pub heads: usize,
    /// Longest report in tokens (with its end-of-text token); longer ones are cut.
    pub max_tokens: usize,
    /// Passes over the training reports.
    pub epochs: usize,
    /// Reports per update.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (matrices only).
    pub weight_decay: f64,
    /// Seed of initialisation and batch order.
    pub seed: u64,
    /// Minimum count of a word to enter the vocabulary.
    pub min_word_count: usize,
    /// Findings of the diagnosis prompt (PromptMRG's idea, see [`ReportGenerator`]); 0 (the
    /// default, and what cards without the field mean): no prompt.
    #[serde(skip_serializing_if = "is_zero")]
    pub findings: usize,
    /// With a diagnosis prompt: probability that a training report's image embedding is
    /// zeroed for an update, so that the decoder learns to state findings from the prompt
    /// alone (why: trained only with prompts that agree with the image, it can learn to
    /// follow the image prefix and drop findings the prompt calls). 0: never.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub image_dropout: f64,
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Default for ReportGenConfig {
    fn default() -> Self {
        Self {
            prefix_len: 10,
            width: 128,
            layers: 2,
            heads: 4,
            max_tokens: 120,
            epochs: 12,
            batch: 32,
            lr: 1e-3,
            weight_decay: 0.01,
            seed: 0,
            min_word_count: 2,
            findings: 0,
            image_dropout: 0.0,
        }
    }
}

impl ReportGenConfig {
    /// Whether the settings can work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ReportError::Invalid(m));
        if self.prefix_len == 0 || self.max_tokens < 2 {
            return bad("prefix_len must be >= 1 and max_tokens >= 2".into());
        }
        if self.width == 0 || self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return bad(format!(
                "width {} must be a positive multiple of heads {}",
                self.width, self.heads
            ));
        }
        if self.layers == 0 || self.epochs == 0 || self.batch == 0 {
            return bad("layers, epochs and batch must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        if !(0.0..1.0).contains(&self.image_dropout) {
            return bad(format!(
                "image_dropout {} must be in [0, 1)",
                self.image_dropout
            ));
        }
        Ok(())
    }

    /// The decoder's GPT-2 configuration for a vocabulary of `vocab` tokens.
    pub fn decoder_config(&self, vocab: usize) -> Gpt2Config {
        let mut c = Gpt2Config::small(
            vocab,
            self.prefix_len + self.findings + self.max_tokens,
            self.width,
            self.layers,
            self.heads,
        );
        c.eos_token_id = Some(EOS_ID);
        c
    }
}

/// ClipCap's MLP from an image embedding to `prefix_len` decoder embeddings.
#[derive(Debug, Clone)]
pub struct PrefixMapper {
    l1: Linear,
    l2: Linear,
    prefix_len: usize,
    width: usize,
}

impl PrefixMapper {
    /// Parameters `l1`, `l2` under `vb`.
    pub fn new(vb: VarBuilder, image_dim: usize, prefix_len: usize, width: usize) -> Result<Self> {
        let out = prefix_len * width;
        let hidden = (out / 2).max(1);
        Ok(Self {
            l1: candle_nn::linear(image_dim, hidden, vb.pp("l1"))?,
            l2: candle_nn::linear(hidden, out, vb.pp("l2"))?,
            prefix_len,
            width,
        })
    }

    /// Prefix embeddings `[B, P, W]` of image embeddings `[B, E]`.
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let b = image.dim(0)?;
        Ok(self
            .l2
            .forward(&self.l1.forward(image)?.tanh()?)?
            .reshape((b, self.prefix_len, self.width))?)
    }
}

/// The prefix mapper and the decoder.
///
/// With a diagnosis prompt ([`ReportGenConfig::findings`] = `F` > 0; PromptMRG, Jin et al.,
/// AAAI 2024, "Promptmrg: Diagnosis-driven prompts for medical report generation"): after the
/// image prefix come `F` more prefix embeddings, one per finding of a lexicon, each a learned
/// vector for "finding k absent" or "finding k present" (`prompt.weight`, row `2k + state`).
/// Training feeds the states a labeller reads in the reference report; generation feeds the
/// states a findings classifier predicts ([`crate::report_findings`]). Why: the decoder
/// trained on one pooled embedding writes the most probable report and names rare findings
/// seldom; a classifier with per-finding thresholds decides each finding on its own, and
/// the decoder learns to state what the prompt says.
#[derive(Debug, Clone)]
pub struct ReportGenerator {
    /// Image embedding -> prefix.
    pub mapper: PrefixMapper,
    /// Finding-state embeddings `[2F, W]` of the diagnosis prompt (`None` without one).
    pub prompt: Option<candle_nn::Embedding>,
    /// The decoder.
    pub decoder: Gpt2LmHeadModel,
    /// Settings.
    pub cfg: ReportGenConfig,
    /// Width of the image embeddings it reads.
    pub image_dim: usize,
}

impl ReportGenerator {
    /// Builds (or loads, from a checkpoint's `vb`) the mapper under `mapper` and the decoder
    /// under `decoder.transformer`.
    pub fn new(
        vb: VarBuilder,
        cfg: &ReportGenConfig,
        image_dim: usize,
        vocab: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        let dcfg = cfg.decoder_config(vocab);
        let prompt = if cfg.findings > 0 {
            Some(candle_nn::embedding(
                2 * cfg.findings,
                cfg.width,
                vb.pp("prompt"),
            )?)
        } else {
            None
        };
        Ok(Self {
            mapper: PrefixMapper::new(vb.pp("mapper"), image_dim, cfg.prefix_len, cfg.width)?,
            prompt,
            decoder: Gpt2LmHeadModel::load(vb.pp("decoder"), &dcfg, "transformer")?,
            cfg: cfg.clone(),
            image_dim,
        })
    }

    /// Length of the whole prefix: the image prefix and the diagnosis prompt.
    pub fn prefix_len(&self) -> usize {
        self.cfg.prefix_len + self.cfg.findings
    }

    /// The decoder's prefix `[B, P (+ F), W]`: the mapped image embeddings `[B, E]`, then with
    /// a diagnosis prompt the embeddings of the finding states `[B, F]` (u32, 0 absent, 1
    /// present), which it then requires.
    pub fn prefix(&self, images: &Tensor, states: Option<&Tensor>) -> Result<Tensor> {
        let mapped = self.mapper.forward(images)?;
        match (&self.prompt, states) {
            (None, None) => Ok(mapped),
            (Some(table), Some(states)) => {
                let (b, f) = states.dims2()?;
                if f != self.cfg.findings || b != images.dim(0)? {
                    return Err(ReportError::Invalid(format!(
                        "finding states {:?} for {} images and a prompt of {} findings",
                        states.dims(),
                        images.dim(0)?,
                        self.cfg.findings
                    )));
                }
                let offsets = Tensor::arange_step(0u32, 2 * f as u32, 2, states.device())?;
                let rows = states.broadcast_add(&offsets.unsqueeze(0)?)?;
                Ok(Tensor::cat(&[&mapped, &table.forward(&rows)?], 1)?)
            }
            (None, Some(_)) => Err(ReportError::Invalid(
                "finding states given to a generator without a diagnosis prompt".into(),
            )),
            (Some(_), None) => Err(ReportError::Invalid(
                "this generator reads a diagnosis prompt: finding states are required".into(),
            )),
        }
    }

    /// Mean token cross-entropy of `targets` `[B, T]` (report tokens then EOS, right-padded
    /// with [`PAD_ID`]) given image embeddings `[B, E]`.
    pub fn loss(&self, images: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.loss_prompted(images, None, targets)
    }

    /// [`Self::loss`] with the diagnosis prompt's finding states `[B, F]` (see
    /// [`Self::prefix`]).
    pub fn loss_prompted(
        &self,
        images: &Tensor,
        states: Option<&Tensor>,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = targets.dims2()?;
        let p = self.prefix_len();
        let prefix = self.prefix(images, states)?;
        // The decoder reads the prefix and every target token but the last; position
        // p - 1 + i predicts target i.
        let embeds = if t > 1 {
            let inputs = targets.narrow(1, 0, t - 1)?;
            Tensor::cat(
                &[&prefix, &self.decoder.transformer.embed_tokens(&inputs)?],
                1,
            )?
        } else {
            prefix
        };
        let logits = self
            .decoder
            .forward_embeds(&embeds, None)?
            .narrow(1, p - 1, t)?
            .reshape((b * t, ()))?;
        let flat = targets.flatten_all()?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&flat.unsqueeze(1)?, 1)?.squeeze(1)?;
        let mask = flat.ne(PAD_ID)?.to_dtype(DType::F32)?;
        let n = mask.sum_all()?.to_scalar::<f32>()?;
        if n == 0.0 {
            return Err(ReportError::Invalid("a batch without report tokens".into()));
        }
        Ok(((picked * mask)?.sum_all()? / (-(n as f64)))?)
    }

    /// Greedy decoding of a batch of image embeddings `[B, E]`: up to `max_new` tokens each,
    /// a report ending at its first EOS (not included).
    pub fn generate_greedy(&self, images: &Tensor, max_new: usize) -> Result<Vec<Vec<u32>>> {
        self.generate_greedy_prompted(images, None, max_new)
    }

    /// [`Self::generate_greedy`] with the diagnosis prompt's finding states `[B, F]`.
    pub fn generate_greedy_prompted(
        &self,
        images: &Tensor,
        states: Option<&Tensor>,
        max_new: usize,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_greedy_held(images, states, None, max_new, &mut |_, _| true)
    }

    /// Greedy decoding whose end is held: where row `i` would emit EOS after `tokens` and
    /// `may_end(i, tokens)` says no, it takes its most probable word instead (ids 0-3, the
    /// special tokens, excluded) and goes on. A row that reaches `max_new` tokens without
    /// being let end is cut back to where its end was first held, so holding never leaves a
    /// report longer than unheld decoding plus whatever the decoder wrote until it was let
    /// end. With `may_end` always true this is [`Self::generate_greedy_prompted`].
    ///
    /// Why: a decoder trained on reports whose findings agree with the image prefix sometimes
    /// ends a report before stating a finding the diagnosis prompt calls present;
    /// `ReportModel`'s faithful decoding holds the end until the report states them.
    pub fn generate_greedy_held(
        &self,
        images: &Tensor,
        states: Option<&Tensor>,
        guidance: Option<PromptGuidance>,
        max_new: usize,
        may_end: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<Vec<u32>>> {
        let b = images.dim(0)?;
        let max_new = max_new.min(self.cfg.max_tokens);
        let prefix = self.prefix(images, states)?;
        let contrast = guidance
            .as_ref()
            .map(|g| self.prefix(images, Some(g.contrast_states)))
            .transpose()?;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut first_hold: Vec<Option<usize>> = vec![None; b];
        for step in 0..max_new {
            // The report so far, embedded once for the prompt's prefix and the contrast's.
            let written = if step == 0 {
                None
            } else {
                let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
                let ids = Tensor::from_vec(flat, (b, step), images.device())?;
                Some(self.decoder.transformer.embed_tokens(&ids)?)
            };
            let next = |prefix: &Tensor| -> Result<Tensor> {
                let embeds = match &written {
                    None => prefix.clone(),
                    Some(w) => Tensor::cat(&[prefix, w], 1)?,
                };
                let t = embeds.dim(1)?;
                Ok(self
                    .decoder
                    .forward_embeds(&embeds, None)?
                    .i((.., t - 1, ..))?)
            };
            let logits = next(&prefix)?;
            let logits = match (&guidance, &contrast) {
                (Some(g), Some(c)) => {
                    // Classifier-free guidance on log-probabilities: lp + s (lp - lp_contrast).
                    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                    let lc = candle_nn::ops::log_softmax(&next(c)?, D::Minus1)?;
                    (&lp + ((&lp - lc)? * g.scale)?)?
                }
                _ => logits,
            };
            let last = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (i, &tok) in last.iter().enumerate() {
                // A finished report keeps emitting EOS so all rows stay one length.
                let tok = if done[i] {
                    EOS_ID
                } else if tok == EOS_ID && !may_end(i, &tokens[i]) {
                    first_hold[i].get_or_insert(tokens[i].len());
                    let row = logits.get(i)?.to_vec1::<f32>()?;
                    let best = (EOS_ID as usize + 1..row.len())
                        .max_by(|&a, &c| row[a].total_cmp(&row[c]))
                        .unwrap_or(EOS_ID as usize);
                    best as u32
                } else {
                    tok
                };
                done[i] |= tok == EOS_ID;
                tokens[i].push(tok);
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(tokens
            .into_iter()
            .zip(done.iter().zip(&first_hold))
            .map(|(t, (&ended, &held))| {
                let keep = match held {
                    Some(at) if !ended => at,
                    _ => t.len(),
                };
                t.into_iter()
                    .take(keep)
                    .take_while(|&x| x != EOS_ID)
                    .collect()
            })
            .collect())
    }

    /// Beam search for one image embedding `[E]` ([`Gpt2LmHeadModel::beam_search`], length
    /// penalty 1); the report without its EOS.
    pub fn generate_beam(&self, image: &Tensor, beams: usize, max_new: usize) -> Result<Vec<u32>> {
        self.generate_beam_prompted(image, None, beams, max_new)
    }

    /// [`Self::generate_beam`] with the diagnosis prompt's finding states `[F]`.
    pub fn generate_beam_prompted(
        &self,
        image: &Tensor,
        states: Option<&Tensor>,
        beams: usize,
        max_new: usize,
    ) -> Result<Vec<u32>> {
        let states = states.map(|s| s.unsqueeze(0)).transpose()?;
        let prefix = self
            .prefix(&image.unsqueeze(0)?, states.as_ref())?
            .squeeze(0)?;
        let d = self.decoder.beam_search(
            Some(&prefix),
            &[],
            max_new.min(self.cfg.max_tokens),
            Some(EOS_ID),
            beams,
            1.0,
        )?;
        Ok(d.tokens.into_iter().take_while(|&x| x != EOS_ID).collect())
    }
}

/// Classifier-free guidance of greedy decoding towards the diagnosis prompt (Sanchez et al.
/// 2023, "Stay on topic with classifier-free guidance"): each step's log-probabilities
/// `lp` under the prompt become `lp + scale (lp - lp_c)`, `lp_c` those under
/// `contrast_states` (e.g. every finding absent), so the words the prompt's findings make
/// likelier are made likelier still. `scale` 0 is plain decoding.
#[derive(Debug, Clone, Copy)]
pub struct PromptGuidance<'a> {
    /// The finding states `[B, F]` to contrast with.
    pub contrast_states: &'a Tensor,
    /// The guidance scale.
    pub scale: f64,
}

/// Re-draws every parameter from a seeded generator (candle's initialisers use the thread's
/// RNG): biases 0, layer-norm scales 1, decoder matrices and embeddings (the diagnosis
/// prompt's too) N(0, 0.02) as GPT-2, mapper matrices N(0, 1 / fan_in). Parameters are visited in name order.
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(
        params,
        seed,
        0x2e90_77ca,
        |name, dims| {
            if name.ends_with("bias") {
                Init::Zeros
            } else if name.contains(".ln_") && name.ends_with("weight") {
                Init::Ones
            } else if name.starts_with("mapper.") {
                Init::Normal {
                    std: (1.0 / dims.get(1).copied().unwrap_or(1).max(1) as f32).sqrt(),
                }
            } else {
                Init::Normal { std: 0.02 }
            }
        },
    )?)
}

/// Report token ids padded to one length: `[B, T]` with [`PAD_ID`].
pub fn pad_batch(rows: &[&[u32]], device: &Device) -> Result<Tensor> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut flat = Vec::with_capacity(rows.len() * t);
    for r in rows {
        flat.extend_from_slice(r);
        flat.extend(std::iter::repeat_n(PAD_ID, t - r.len()));
    }
    Ok(Tensor::from_vec(flat, (rows.len(), t), device)?)
}

/// A trained generator and its training record.
pub struct TrainedGenerator {
    /// The generator.
    pub generator: ReportGenerator,
    /// Its parameters (names `mapper.*`, `decoder.transformer.*`).
    pub varmap: VarMap,
    /// Mean loss of each epoch.
    pub epoch_losses: Vec<f32>,
}

/// Trains a generator on image embeddings `[N, E]` and their report token ids (each ending
/// with EOS, at most `cfg.max_tokens`), with the engine's AdamW and warm-up + cosine schedule;
/// `on_epoch(epoch, mean_loss)` after each epoch.
pub fn train_generator(
    cfg: &ReportGenConfig,
    images: &Tensor,
    reports: &[Vec<u32>],
    vocab: usize,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<TrainedGenerator> {
    train_generator_prompted(cfg, images, None, reports, vocab, on_epoch)
}

/// [`train_generator`] with the diagnosis prompt's finding states `[N, F]` (u32 0/1, the
/// findings the reference reports state; required exactly when `cfg.findings > 0`).
pub fn train_generator_prompted(
    cfg: &ReportGenConfig,
    images: &Tensor,
    states: Option<&Tensor>,
    reports: &[Vec<u32>],
    vocab: usize,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<TrainedGenerator> {
    cfg.validate()?;
    let (n, e) = images.dims2()?;
    if n != reports.len() || n == 0 {
        return Err(ReportError::Invalid(format!(
            "{n} image embeddings for {} reports",
            reports.len()
        )));
    }
    if let Some(i) = reports
        .iter()
        .position(|r| r.is_empty() || r.len() > cfg.max_tokens)
    {
        return Err(ReportError::Invalid(format!(
            "report {i} has {} tokens; expected 1 to {}",
            reports[i].len(),
            cfg.max_tokens
        )));
    }
    let dev = images.device().clone();
    let varmap = VarMap::new();
    let generator = ReportGenerator::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        cfg,
        e,
        vocab,
    )?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    let mut run = EpochTraining::new(
        params.clone(),
        n,
        &EpochTrainingConfig {
            epochs: cfg.epochs,
            batch: cfg.batch,
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            seed: cfg.seed,
        },
    )?;
    let mut epoch_losses = Vec::with_capacity(cfg.epochs);
    let mut dropout_rng = {
        use rand::SeedableRng;
        rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x1ad6_d809)
    };
    for epoch in 0..cfg.epochs {
        let mut sum = 0.0f64;
        for chunk in run.epoch_batches() {
            let idx = Tensor::from_vec(
                chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                chunk.len(),
                &dev,
            )?;
            let mut x = images.index_select(&idx, 0)?;
            if cfg.image_dropout > 0.0 && states.is_some() {
                use rand::Rng;
                let keep: Vec<f32> = (0..chunk.len())
                    .map(|_| f32::from(!dropout_rng.random_bool(cfg.image_dropout)))
                    .collect();
                let keep = Tensor::from_vec(keep, (chunk.len(), 1), &dev)?;
                x = x.broadcast_mul(&keep)?;
            }
            let st = states.map(|s| s.index_select(&idx, 0)).transpose()?;
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| reports[i].as_slice()).collect();
            let y = pad_batch(&rows, &dev)?;
            let loss = generator.loss_prompted(&x, st.as_ref(), &y)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(ReportError::Invalid(format!(
                    "the loss is not finite ({value}) at update {}; lower the learning rate",
                    run.updates()
                )));
            }
            let grads = Gradients::from_grad_store(&loss.backward()?, &params);
            run.update(&grads)?;
            sum += value as f64 * chunk.len() as f64;
        }
        let mean = (sum / n as f64) as f32;
        epoch_losses.push(mean);
        on_epoch(epoch, mean);
    }
    Ok(TrainedGenerator {
        generator,
        varmap,
        epoch_losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Two kinds of "image" (embeddings near two points) with one report each: the generator
    /// learns to write each kind's report for unseen embeddings of that kind, greedy and
    /// beam alike.
    #[test]
    fn learns_to_write_the_report_of_each_kind_of_image() {
        let dev = Device::Cpu;
        let reports: [Vec<u32>; 2] = [vec![4, 5, 6, 7, EOS_ID], vec![8, 6, 9, EOS_ID]];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let point = |kind: usize, rng: &mut ChaCha8Rng| -> Vec<f32> {
            use rand::Rng;
            (0..8)
                .map(|d| if d % 2 == kind { 1.0 } else { 0.0 } + rng.random_range(-0.1..0.1))
                .collect()
        };
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..64 {
            x.extend(point(i % 2, &mut rng));
            y.push(reports[i % 2].clone());
        }
        let images = Tensor::from_vec(x, (64, 8), &dev).unwrap();
        let cfg = ReportGenConfig {
            prefix_len: 2,
            width: 32,
            layers: 1,
            heads: 2,
            max_tokens: 8,
            epochs: 30,
            batch: 16,
            lr: 3e-3,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let t = train_generator(&cfg, &images, &y, 12, &mut |_, l| seen.push(l)).unwrap();
        assert_eq!(seen, t.epoch_losses);
        assert!(seen[0] > 1.5 && *seen.last().unwrap() < 0.2, "{seen:?}");
        let test: Vec<f32> = [point(0, &mut rng), point(1, &mut rng)].concat();
        let test = Tensor::from_vec(test, (2, 8), &dev).unwrap();
        let out = t.generator.generate_greedy(&test, 8).unwrap();
        assert_eq!(out[0], reports[0][..4]);
        assert_eq!(out[1], reports[1][..3]);
        // Held ends: never let end -> cut back to where the end was first held (the unheld
        // report); held once (row 1 only) -> the unheld report, then words (no special
        // token), until the decoder ends it again.
        let never = t
            .generator
            .generate_greedy_held(&test, None, None, 8, &mut |_, _| false)
            .unwrap();
        assert_eq!(never, out);
        let mut asked: Vec<(usize, Vec<u32>)> = Vec::new();
        let once = t
            .generator
            .generate_greedy_held(&test, None, None, 8, &mut |i, ids| {
                asked.push((i, ids.to_vec()));
                !(i == 1 && asked.iter().filter(|(r, _)| *r == 1).count() == 1)
            })
            .unwrap();
        assert_eq!(once[0], out[0]);
        assert!(asked.contains(&(0, out[0].clone())), "{asked:?}");
        assert!(asked.contains(&(1, out[1].clone())), "{asked:?}");
        assert!(once[1].len() > out[1].len(), "{once:?}");
        assert_eq!(once[1][..out[1].len()], out[1][..]);
        assert!(
            once[1][out[1].len()..].iter().all(|&x| x > EOS_ID),
            "{once:?}"
        );
        let beam = t
            .generator
            .generate_beam(&test.i(1).unwrap(), 3, 8)
            .unwrap();
        assert_eq!(beam, reports[1][..3]);
    }

    /// Images that say nothing (noise) and a diagnosis prompt that says everything: the
    /// generator writes the report the finding states call for, and flipping the states flips
    /// the report.
    #[test]
    fn the_diagnosis_prompt_decides_what_the_report_states() {
        use rand::Rng;
        let dev = Device::Cpu;
        let reports: [Vec<u32>; 2] = [vec![4, 5, 6, EOS_ID], vec![7, 8, EOS_ID]];
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 64;
        let x: Vec<f32> = (0..n * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let images = Tensor::from_vec(x, (n, 8), &dev).unwrap();
        // Finding 0 present -> report 0; finding 1 present -> report 1.
        let states: Vec<u32> = (0..n)
            .flat_map(|i| [(i % 2 == 0) as u32, (i % 2) as u32])
            .collect();
        let states = Tensor::from_vec(states, (n, 2), &dev).unwrap();
        let y: Vec<Vec<u32>> = (0..n).map(|i| reports[i % 2].clone()).collect();
        let cfg = ReportGenConfig {
            prefix_len: 2,
            width: 32,
            layers: 1,
            heads: 2,
            max_tokens: 8,
            epochs: 30,
            batch: 16,
            lr: 3e-3,
            findings: 2,
            ..Default::default()
        };
        let t =
            train_generator_prompted(&cfg, &images, Some(&states), &y, 12, &mut |_, _| {}).unwrap();
        let g = &t.generator;
        assert_eq!(g.prefix_len(), 4);
        let test = images.narrow(0, 0, 2).unwrap();
        // Rows 0 and 1 trained with states (1, 0) and (0, 1); ask for the opposite.
        let flipped = Tensor::new(&[[0u32, 1], [1, 0]], &dev).unwrap();
        let out = g
            .generate_greedy_prompted(&test, Some(&flipped), 8)
            .unwrap();
        assert_eq!(out[0], reports[1][..2]);
        assert_eq!(out[1], reports[0][..3]);
        let beam = g
            .generate_beam_prompted(&test.i(0).unwrap(), Some(&flipped.i(0).unwrap()), 2, 8)
            .unwrap();
        assert_eq!(beam, reports[1][..2]);
        // Guidance: scale 0 is plain decoding; otherwise each step takes the argmax of
        // lp + s (lp - lp_contrast), checked by hand on the first token (contrast: the
        // training states, the opposite of the prompt).
        let train_states = states.narrow(0, 0, 2).unwrap();
        let guided = |scale: f64| {
            g.generate_greedy_held(
                &test,
                Some(&flipped),
                Some(PromptGuidance {
                    contrast_states: &train_states,
                    scale,
                }),
                8,
                &mut |_, _| true,
            )
            .unwrap()
        };
        assert_eq!(guided(0.0), out);
        let first_lp = |st: &Tensor| {
            let logits = g
                .decoder
                .forward_embeds(&g.prefix(&test, Some(st)).unwrap(), None)
                .unwrap();
            let t = logits.dim(1).unwrap();
            candle_nn::ops::log_softmax(&logits.i((.., t - 1, ..)).unwrap(), D::Minus1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (lp, lc) = (first_lp(&flipped), first_lp(&train_states));
        for scale in [0.5, 3.0] {
            let got = guided(scale);
            for row in 0..2 {
                let score = |k: usize| lp[row][k] + scale as f32 * (lp[row][k] - lc[row][k]);
                let best = (0..lp[row].len())
                    .max_by(|&a, &b| score(a).total_cmp(&score(b)))
                    .unwrap();
                assert_eq!(got[row][0] as usize, best, "scale {scale}, row {row}");
            }
        }
        // Image dropout trains on zeroed embeddings for some reports (so the losses differ)
        // and still follows the prompt; a probability of 1 is refused.
        let dropped = train_generator_prompted(
            &ReportGenConfig {
                image_dropout: 0.5,
                ..cfg.clone()
            },
            &images,
            Some(&states),
            &y,
            12,
            &mut |_, _| {},
        )
        .unwrap();
        assert_ne!(dropped.epoch_losses, t.epoch_losses);
        let out = dropped
            .generator
            .generate_greedy_prompted(&test, Some(&flipped), 8)
            .unwrap();
        assert_eq!(out[0], reports[1][..2]);
        let bad = ReportGenConfig {
            image_dropout: 1.0,
            ..cfg.clone()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("image_dropout"));
        // Without states, or with the wrong number, it refuses.
        let err = g.generate_greedy(&test, 8).unwrap_err().to_string();
        assert!(err.contains("finding states are required"), "{err}");
        let three = Tensor::new(&[[0u32, 1, 0], [1, 0, 0]], &dev).unwrap();
        let err = g
            .generate_greedy_prompted(&test, Some(&three), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prompt of 2 findings"), "{err}");
    }

    #[test]
    fn padding_does_not_count_in_the_loss() {
        let dev = Device::Cpu;
        let cfg = ReportGenConfig {
            prefix_len: 2,
            width: 16,
            layers: 1,
            heads: 2,
            max_tokens: 8,
            ..Default::default()
        };
        let varmap = VarMap::new();
        let g = ReportGenerator::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            &cfg,
            4,
            10,
        )
        .unwrap();
        seeded_init(&medvlm_train::optim::varmap_params(&varmap), 3).unwrap();
        let img = Tensor::new(&[[0.5f32, -0.2, 0.1, 0.9]], &dev).unwrap();
        let short = pad_batch(&[&[4, 5, EOS_ID]], &dev).unwrap();
        let padded = pad_batch(&[&[4, 5, EOS_ID], &[4, 5, 6, 7, 8, EOS_ID]], &dev)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        assert_eq!(padded.dims(), &[1, 6]);
        let a = g.loss(&img, &short).unwrap().to_scalar::<f32>().unwrap();
        let b = g.loss(&img, &padded).unwrap().to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        assert!(a > 1.0);
    }

    #[test]
    fn unusable_settings_and_data_are_refused() {
        let bad = ReportGenConfig {
            width: 30,
            heads: 4,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("multiple"));
        let dev = Device::Cpu;
        let images = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let cfg = ReportGenConfig {
            max_tokens: 4,
            ..Default::default()
        };
        let err = train_generator(&cfg, &images, &[vec![4, EOS_ID]], 10, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("2 image embeddings for 1 reports"), "{err}");
        let long = vec![vec![4, 5, 6, 7, 8, EOS_ID], vec![4, EOS_ID]];
        let err = train_generator(&cfg, &images, &long, 10, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("6 tokens"), "{err}");
    }
}
