//! Visual question answering as classification over the training answers, on a frozen
//! vision-language model: the PubMedCLIP recipe (Eslami et al., "PubMedCLIP: How Much Does
//! CLIP Benefit Visual Question Answering in the Medical Domain?", Findings of EACL 2023;
//! arXiv 2021) of a CLIP image encoder feeding a fused classifier whose classes are the
//! answers seen in training, scored the VQA-RAD way (Lau et al., "A dataset of clinically
//! generated visual questions and answers about radiology images", Sci. Data 2018: closed
//! and open questions reported apart).
//!
//! Inputs are cached once per image and once per distinct question: the frozen image
//! tower's pooled embedding and the frozen text tower's embedding of the question (both
//! L2-normalised, in the model's shared space). Unlike PubMedCLIP, which encodes the question
//! with GloVe vectors and an LSTM trained with the classifier, the question here goes
//! through the same VLM's frozen text tower; because a tower trained on reports can map
//! different questions to nearly the same point (its vocabulary lacks "how", "which",
//! "many"), a learned bag of word vectors over the training questions' words (the trained
//! part of PubMedCLIP's question encoder, without the LSTM's word order) is added to it by
//! default (`question_words`).
//!
//! Image features: the pooled, projected embedding `v_e` (L2-normalised, the question's
//! shared space) and, by default (`image_grid` 2), the tower's last-layer patch tokens
//! mean-pooled on a 2 x 2 grid, `v_g` (4 D values): one pooled vector cannot say which side a
//! finding is on, the grid can. PubMedCLIP feeds the pooled features only (`image_grid` 0).
//! By default (`pixel_grid` 16) the image's own grey levels follow, averaged on a 16 x 16
//! grid and standardised per image, `v_p` (256 values; see [`VqaConfig::pixel_grid`]).
//!
//! Fusion ([`VqaHead`]): each frozen input is standardised with the training mean and
//! standard deviation of its dimensions; the question vector is `q = q_tower + W b`, with `b`
//! the mean one-hot of the question's known words and `W` learned (`E x V`, no bias); then
//! `[v_e, v_g, v_p, q, v_e * q]` (concatenation with the element-wise product, the bilinear term
//! of MLB/MUTAN kept to its diagonal) goes through `H -> GELU -> H -> GELU -> A` over the `A`
//! training answers. The loss is cross-entropy. The question-only baseline ([`train_head`]
//! with `use_image: false`) is the same MLP with the image set to zero (so `v_e * q` is zero
//! too): what language priors alone reach.
//!
//! At prediction a question seen in training may only get an answer it had there
//! (`mask_answers`; [`predict_pairs`]'s mask): a classifier over all answers otherwise
//! sometimes answers "where is ...?" with "no" on images unlike its training images, the
//! mistake that question-type-conditioned answering (QCR, Zhan et al. 2020) removes.
//!
//! Defaults ([`VqaConfig::default`]): word vectors on, 2 x 2 patch grid, 16 x 16 pixel grid,
//! answers masked per
//! question, hidden width 256, AdamW lr 2e-3 (weight decay 0.01 on matrices) with 5 % warm-up
//! and cosine decay, batch 128, 30 epochs, seed 0.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::{EpochTraining, EpochTrainingConfig};
use medvlm_train::optim::{Gradients, NamedVar};
use serde::{Deserialize, Serialize};

/// Errors of visual question answering.
#[derive(Debug, thiserror::Error)]
pub enum VqaError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] medvlm_train::optim::OptimError),
    /// Model loading or encoding error.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// Error of the report decoder (generative answers).
    #[error(transparent)]
    Report(#[from] crate::report_generation::ReportError),
    /// A file could not be read or written, or holds bad data.
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

/// Result of visual question answering.
pub type Result<T> = std::result::Result<T, VqaError>;

/// Settings of the fused classifier; see the module documentation for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VqaConfig {
    /// Width of the two hidden layers.
    pub hidden: usize,
    /// Passes over the training question-answer pairs.
    pub epochs: usize,
    /// Pairs per update.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (matrices only).
    pub weight_decay: f64,
    /// Seed of initialisation and batch order.
    pub seed: u64,
    /// Add learned word vectors of the question's words to its frozen text embedding.
    pub question_words: bool,
    /// Also feed the image tower's patch tokens mean-pooled on a `g x g` grid (0: only the
    /// pooled image embedding).
    pub image_grid: usize,
    /// Also feed the image's own pixels: the tower's input grey levels (the mean of its
    /// normalised channels) averaged on a `k x k` grid, each image standardised by its own
    /// mean and spread (default 16; 0: none). A small tower's features miss small findings
    /// and shift with the site; the low-resolution pixels are the segmentation head's pixel
    /// encoder idea (U-Net's skips) for a classifier. Saved answerers without the field read
    /// 0, as they were trained.
    #[serde(default)]
    pub pixel_grid: usize,
    /// Limit a question seen in training to the answers it had there (closed questions to
    /// yes/no, "where" questions to places, ...); unseen questions may get any answer.
    pub mask_answers: bool,
}

impl Default for VqaConfig {
    fn default() -> Self {
        Self {
            question_words: true,
            image_grid: 2,
            pixel_grid: 16,
            mask_answers: true,
            hidden: 256,
            epochs: 30,
            batch: 128,
            lr: 2e-3,
            weight_decay: 0.01,
            seed: 0,
        }
    }
}

impl VqaConfig {
    /// Whether the settings can work.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 || self.epochs == 0 || self.batch == 0 {
            return Err(VqaError::Invalid(
                "hidden, epochs and batch must be at least 1".into(),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(VqaError::Invalid(format!(
                "lr {} must be positive",
                self.lr
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(VqaError::Invalid(format!(
                "weight_decay {} must be >= 0",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// Per-dimension mean and standard deviation of training embeddings; standardising makes the
/// small spread of L2-normalised embeddings usable by an MLP at a common learning rate.
#[derive(Debug, Clone)]
pub struct Standardiser {
    /// `[E]`.
    pub mean: Tensor,
    /// `[E]`, at least 1e-6.
    pub std: Tensor,
}

impl Standardiser {
    /// Statistics of the rows of `x` `[N, E]`.
    pub fn fit(x: &Tensor) -> Result<Self> {
        let mean = x.mean(0)?;
        let centred = x.broadcast_sub(&mean)?;
        let std = centred.sqr()?.mean(0)?.sqrt()?.clamp(1e-6, f32::MAX)?;
        Ok(Self { mean, std })
    }

    /// `(x - mean) / std` for `x` `[N, E]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(D::Minus1)? != self.mean.dim(0)? {
            return Err(VqaError::Invalid(format!(
                "embeddings are {} wide; the classifier reads {}",
                x.dim(D::Minus1)?,
                self.mean.dim(0)?
            )));
        }
        Ok(x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?)
    }
}

/// The fused classifier over answers (see the module documentation).
#[derive(Debug, Clone)]
pub struct VqaHead {
    words: Option<Linear>,
    l1: Linear,
    l2: Linear,
    out: Linear,
    /// Embedding width `E` of image and question.
    pub dim: usize,
    /// Image features after the embedding (`G`, the pooled patch-token grid; 0 without).
    pub extra: usize,
    /// Number of answers `A`.
    pub n_answers: usize,
    /// Question word vocabulary size `V` (0: no word vectors).
    pub n_words: usize,
}

impl VqaHead {
    /// Parameters `l1`, `l2`, `out` (and `words` when `n_words > 0`) under `vb`; the image
    /// input is `E + extra` wide.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        extra: usize,
        hidden: usize,
        n_answers: usize,
        n_words: usize,
    ) -> Result<Self> {
        if dim == 0 || hidden == 0 || n_answers == 0 {
            return Err(VqaError::Invalid(format!(
                "a classifier needs positive widths and answers (embeddings {dim}, hidden {hidden}, answers {n_answers})"
            )));
        }
        Ok(Self {
            words: if n_words > 0 {
                Some(candle_nn::linear_no_bias(n_words, dim, vb.pp("words"))?)
            } else {
                None
            },
            l1: candle_nn::linear(3 * dim + extra, hidden, vb.pp("l1"))?,
            l2: candle_nn::linear(hidden, hidden, vb.pp("l2"))?,
            out: candle_nn::linear(hidden, n_answers, vb.pp("out"))?,
            dim,
            extra,
            n_answers,
            n_words,
        })
    }

    /// Answer logits `[B, A]` of standardised image features `[B, E + extra]` (the embedding
    /// first), question embeddings `[B, E]` and the questions' bags of words `[B, V]`
    /// (ignored, and may be `None`, without word vectors).
    pub fn forward(
        &self,
        image: &Tensor,
        question: &Tensor,
        words: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = question.dim(0)?;
        if image.dims() != [b, self.dim + self.extra] || question.dims() != [b, self.dim] {
            return Err(VqaError::Invalid(format!(
                "image {:?} and question {:?} inputs must be [B, {}] and [B, {}]",
                image.dims(),
                question.dims(),
                self.dim + self.extra,
                self.dim
            )));
        }
        let question = match (&self.words, words) {
            (Some(w), Some(b)) if b.dims() == [question.dim(0)?, self.n_words] => {
                (question + w.forward(b)?)?
            }
            (Some(_), _) => {
                return Err(VqaError::Invalid(format!(
                    "the classifier reads bags of {} question words; got {:?}",
                    self.n_words,
                    words.map(|b| b.dims().to_vec())
                )))
            }
            (None, _) => question.clone(),
        };
        let product = (image.narrow(1, 0, self.dim)? * &question)?;
        let fused = Tensor::cat(&[image, &question, &product], 1)?;
        let h = self.l1.forward(&fused)?.gelu()?;
        let h = self.l2.forward(&h)?.gelu()?;
        Ok(self.out.forward(&h)?)
    }
}

/// Weights uniform in `+-1/sqrt(fan_in)` (PyTorch's `nn.Linear` range), biases zero, from a
/// seeded generator so that a seed gives the same classifier.
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(
        params,
        seed,
        0x7a11_5e3d,
        |name, dims| {
            if name.ends_with("bias") {
                Init::Zeros
            } else {
                Init::Uniform {
                    bound: 1.0 / (dims.get(1).copied().unwrap_or(1).max(1) as f32).sqrt(),
                }
            }
        },
    )?)
}

/// Training data: cached embeddings and, per pair, which image, which question, which answer.
#[derive(Debug, Clone)]
pub struct VqaPairs<'a> {
    /// Standardised image features `[I, E + G]`: the embedding, then any grid features.
    pub images: &'a Tensor,
    /// Standardised question embeddings `[Q, E]`.
    pub questions: &'a Tensor,
    /// Bags of words of the questions `[Q, V]` (`None`: no word vectors).
    pub question_words: Option<&'a Tensor>,
    /// Per pair: row of `images`, row of `questions`, answer index.
    pub pairs: &'a [(u32, u32, u32)],
}

/// A trained classifier with its parameters.
pub struct TrainedHead {
    /// The classifier.
    pub head: VqaHead,
    /// Its parameters (`l1.*`, `l2.*`, `out.*`).
    pub varmap: VarMap,
    /// Mean loss of each epoch.
    pub epoch_losses: Vec<f32>,
}

/// Image and question inputs `[B, E]` and bags of words `[B, V]` of a batch of pairs; the
/// image is zeros when `use_image` is false (the question-only baseline).
pub fn batch_inputs(
    data: &VqaPairs,
    batch: &[(u32, u32, u32)],
    use_image: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dev = data.images.device();
    let qi = Tensor::from_vec(
        batch.iter().map(|p| p.1).collect::<Vec<_>>(),
        batch.len(),
        dev,
    )?;
    let q = data.questions.index_select(&qi, 0)?;
    let w = data
        .question_words
        .map(|b| b.index_select(&qi, 0))
        .transpose()?;
    let v = if use_image {
        let ii = Tensor::from_vec(
            batch.iter().map(|p| p.0).collect::<Vec<_>>(),
            batch.len(),
            dev,
        )?;
        data.images.index_select(&ii, 0)?
    } else {
        Tensor::zeros((batch.len(), data.images.dim(1)?), DType::F32, dev)?
    };
    Ok((v, q, w))
}

/// Trains a classifier over `n_answers` answers on `data` with cross-entropy, the engine's
/// AdamW and warm-up + cosine schedule; `use_image: false` trains the question-only
/// baseline. `on_epoch(epoch, mean_loss)` after each epoch.
pub fn train_head(
    cfg: &VqaConfig,
    data: &VqaPairs,
    n_answers: usize,
    use_image: bool,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<TrainedHead> {
    cfg.validate()?;
    let (n_img, image_width) = data.images.dims2()?;
    let (n_q, dim) = data.questions.dims2()?;
    if image_width < dim {
        return Err(VqaError::Invalid(format!(
            "image features are {image_width} wide and question embeddings {dim}; the fusion needs the image embedding in the question's shared width first"
        )));
    }
    if data.pairs.is_empty() {
        return Err(VqaError::Invalid(
            "no question-answer pairs to train on".into(),
        ));
    }
    if let Some(p) = data
        .pairs
        .iter()
        .find(|p| p.0 as usize >= n_img || p.1 as usize >= n_q || p.2 as usize >= n_answers)
    {
        return Err(VqaError::Invalid(format!(
            "pair {p:?} is out of range ({n_img} images, {n_q} questions, {n_answers} answers)"
        )));
    }
    let n_words = match data.question_words {
        Some(b) => {
            let (rows, v) = b.dims2()?;
            if rows != n_q || v == 0 {
                return Err(VqaError::Invalid(format!(
                    "bags of words {:?} for {n_q} questions",
                    b.dims()
                )));
            }
            v
        }
        None => 0,
    };
    let dev = data.images.device().clone();
    let varmap = VarMap::new();
    let head = VqaHead::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        dim,
        image_width - dim,
        cfg.hidden,
        n_answers,
        n_words,
    )?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    let n = data.pairs.len();
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
    for epoch in 0..cfg.epochs {
        let mut sum = 0.0f64;
        for rows in run.epoch_batches() {
            let chunk: Vec<(u32, u32, u32)> = rows.iter().map(|&i| data.pairs[i]).collect();
            let (v, q, w) = batch_inputs(data, &chunk, use_image)?;
            let y = Tensor::from_vec(
                chunk.iter().map(|p| p.2).collect::<Vec<_>>(),
                chunk.len(),
                &dev,
            )?;
            let loss = candle_nn::loss::cross_entropy(&head.forward(&v, &q, w.as_ref())?, &y)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(VqaError::Invalid(format!(
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
    Ok(TrainedHead {
        head,
        varmap,
        epoch_losses,
    })
}

/// The best answer index and its softmax probability for each row of logits `[B, A]`.
pub fn best_answers(logits: &Tensor) -> Result<Vec<(u32, f32)>> {
    let probs = candle_nn::ops::softmax(logits, D::Minus1)?;
    let best = probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let p = probs.max(D::Minus1)?.to_vec1::<f32>()?;
    Ok(best.into_iter().zip(p).collect())
}

/// Predicted answer indices and probabilities for every pair of `data`, in batches of 512.
/// `answer_mask` `[Q, A]` (0 for an allowed answer, a large negative number otherwise) limits
/// each question to its allowed answers; the probability is then within those.
pub fn predict_pairs(
    head: &VqaHead,
    data: &VqaPairs,
    use_image: bool,
    answer_mask: Option<&Tensor>,
) -> Result<Vec<(u32, f32)>> {
    if let Some(m) = answer_mask {
        if m.dims() != [data.questions.dim(0)?, head.n_answers] {
            return Err(VqaError::Invalid(format!(
                "answer mask {:?} for {} questions and {} answers",
                m.dims(),
                data.questions.dim(0)?,
                head.n_answers
            )));
        }
    }
    let mut out = Vec::with_capacity(data.pairs.len());
    for chunk in data.pairs.chunks(512) {
        let (v, q, w) = batch_inputs(data, chunk, use_image)?;
        let mut logits = head.forward(&v, &q, w.as_ref())?;
        if let Some(m) = answer_mask {
            let qi = Tensor::from_vec(
                chunk.iter().map(|p| p.1).collect::<Vec<_>>(),
                chunk.len(),
                m.device(),
            )?;
            logits = (logits + m.index_select(&qi, 0)?)?;
        }
        out.extend(best_answers(&logits)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Two questions about two kinds of image. Question 0 ("which kind?") needs the image;
    /// question 1 ("is it kind 0?") has an answer that also depends on the image. The fused
    /// classifier learns both; the question-only baseline cannot beat the per-question prior.
    #[test]
    fn fused_classifier_uses_the_image_and_the_question_only_baseline_cannot() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut img = Vec::new();
        let kinds: Vec<usize> = (0..80).map(|i| i % 2).collect();
        for &k in &kinds {
            for d in 0..8 {
                img.push(if d % 2 == k { 1.0f32 } else { 0.0 } + rng.random_range(-0.3..0.3));
            }
        }
        let images = Tensor::from_vec(img, (80, 8), &dev).unwrap();
        let questions = Tensor::from_vec(
            (0..16)
                .map(|i| {
                    if i < 8 {
                        (i as f32).sin()
                    } else {
                        (i as f32).cos()
                    }
                })
                .collect::<Vec<_>>(),
            (2, 8),
            &dev,
        )
        .unwrap();
        let st = Standardiser::fit(&images).unwrap();
        let images = st.apply(&images).unwrap();
        let sq = Standardiser::fit(&questions).unwrap();
        let questions = sq.apply(&questions).unwrap();
        // Answers: 0 "kind a", 1 "kind b", 2 "yes", 3 "no".
        let mut pairs = Vec::new();
        for (i, &k) in kinds.iter().enumerate() {
            pairs.push((i as u32, 0, k as u32));
            pairs.push((i as u32, 1, if k == 0 { 2 } else { 3 }));
        }
        let (train, test) = pairs.split_at(120);
        let cfg = VqaConfig {
            hidden: 32,
            epochs: 40,
            batch: 16,
            lr: 5e-3,
            ..Default::default()
        };
        let data = VqaPairs {
            images: &images,
            questions: &questions,
            question_words: None,
            pairs: train,
        };
        let mut seen = Vec::new();
        let fused = train_head(&cfg, &data, 4, true, &mut |_, l| seen.push(l)).unwrap();
        assert_eq!(seen, fused.epoch_losses);
        assert!(seen[0] > 0.8 && *seen.last().unwrap() < 0.1, "{seen:?}");
        let q_only = train_head(&cfg, &data, 4, false, &mut |_, _| {}).unwrap();
        let test_data = VqaPairs {
            pairs: test,
            ..data
        };
        let acc = |pred: Vec<(u32, f32)>| {
            pred.iter().zip(test).filter(|(p, t)| p.0 == t.2).count() as f32 / test.len() as f32
        };
        let fused_acc = acc(predict_pairs(&fused.head, &test_data, true, None).unwrap());
        let q_acc = acc(predict_pairs(&q_only.head, &test_data, false, None).unwrap());
        assert_eq!(fused_acc, 1.0);
        // Without the image each question has two equally likely answers.
        assert!((0.4..=0.6).contains(&q_acc), "{q_acc}");
        // The question-only prediction never depends on the image.
        let preds = predict_pairs(&q_only.head, &test_data, false, None).unwrap();
        for (p, t) in preds.iter().zip(test) {
            let same_q = preds.iter().zip(test).find(|(_, u)| u.1 == t.1).unwrap().0;
            assert_eq!(p.0, same_q.0);
        }
    }

    #[test]
    fn same_seed_same_classifier_and_bad_data_refused() {
        let dev = Device::Cpu;
        let images = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let questions = Tensor::new(&[[0.5f32, 0.5]], &dev).unwrap();
        let pairs = [(0, 0, 0), (1, 0, 1)];
        let data = VqaPairs {
            images: &images,
            questions: &questions,
            question_words: None,
            pairs: &pairs,
        };
        let cfg = VqaConfig {
            hidden: 4,
            epochs: 2,
            batch: 1,
            ..Default::default()
        };
        let a = train_head(&cfg, &data, 2, true, &mut |_, _| {}).unwrap();
        let b = train_head(&cfg, &data, 2, true, &mut |_, _| {}).unwrap();
        assert_eq!(a.epoch_losses, b.epoch_losses);
        let bad = [(0, 0, 2)];
        let err = train_head(
            &cfg,
            &VqaPairs {
                pairs: &bad,
                ..data.clone()
            },
            2,
            true,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("out of range"), "{err}");
        let wide = Tensor::zeros((1, 3), DType::F32, &dev).unwrap();
        // A question wider than the image embedding cannot be multiplied with it.
        let err = train_head(
            &cfg,
            &VqaPairs {
                questions: &wide,
                ..data.clone()
            },
            2,
            true,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("shared width first"), "{err}");
        let err = VqaConfig {
            batch: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    /// Two questions the frozen tower maps to the same point, with different answers: only
    /// the learned word vectors tell them apart.
    #[test]
    fn word_vectors_separate_questions_the_tower_confuses() {
        let dev = Device::Cpu;
        let images = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
        let questions =
            Tensor::new(&[[0.3f32, -0.1, 0.2, 0.5], [0.3, -0.1, 0.2, 0.5]], &dev).unwrap();
        // Words: 0 "how", 1 "many", 2 "is", 3 "there".
        let bags = Tensor::new(&[[0.5f32, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], &dev).unwrap();
        let pairs: Vec<(u32, u32, u32)> = (0..20).map(|i| (0, i % 2, i % 2)).collect();
        let cfg = VqaConfig {
            hidden: 8,
            epochs: 30,
            batch: 4,
            lr: 1e-2,
            ..Default::default()
        };
        let with_words = VqaPairs {
            images: &images,
            questions: &questions,
            question_words: Some(&bags),
            pairs: &pairs,
        };
        let without = VqaPairs {
            question_words: None,
            ..with_words.clone()
        };
        let acc = |data: &VqaPairs| {
            let t = train_head(&cfg, data, 2, false, &mut |_, _| {}).unwrap();
            predict_pairs(&t.head, data, false, None)
                .unwrap()
                .iter()
                .zip(&pairs)
                .filter(|(p, t)| p.0 == t.2)
                .count()
        };
        assert_eq!(acc(&with_words), 20);
        assert_eq!(acc(&without), 10);
    }
}
