//! Contrastive image-text pretraining (Radford et al., "Learning Transferable Visual Models
//! From Natural Language Supervision", ICML 2021): a two-tower model trained with the CLIP
//! (or SigLIP / label-aware) loss of [`crate::losses::ContrastiveHead`], from scratch or from a
//! pretrained HF CLIP/SigLIP directory.
//!
//! - [`build_word_tokenizer`]: a word-level tokenizer built from the training texts, for
//!   from-scratch models (no hub): lower-cased, split on whitespace and punctuation, words seen
//!   at least `min_count` times (default 2), CLIP-style `<|startoftext|>` / `<|endoftext|>`
//!   around every text. Its `tokenizer.json` is saved in the model directory and the CLIP text
//!   tower pools the first `<|endoftext|>` (the `eos_token_id` of the saved config).
//! - [`scratch_clip_config`]: the HF `CLIPConfig` of `[model.scratch]`.
//! - [`ContrastiveModel`]: any loaded [`VisionLanguageModel`] with its trainable `VarMap`, the
//!   contrastive head and the [`TrainModel`] implementation used by [`crate::trainer::train`];
//!   [`ContrastiveModel::save`] writes a model directory that `medvlm embed` / `medvlm
//!   zero-shot` load like a hub model.
//! - [`embed_images`], [`embed_texts`], [`zero_shot`], [`retrieval`]: the evaluation used each
//!   epoch and by `medvlm quickstart`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use medvlm_io::Plane;
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::model_dir::{save_model_dir, save_open_clip_dir, varmap_tensors, SaveModelDir};
use medvlm_models::modified_resnet::ModifiedResNetConfig;
use medvlm_models::openclip::{OpenClipConfig, OpenClipResNet, OpenClipTextConfig, TextPool};
use medvlm_models::preprocess::PreprocessConfig;
use medvlm_models::tokenizer::{Padding, TextTokenizer};
use medvlm_models::{Family, VisionLanguageModel};

use crate::data::{pixel_tensor, ImageTextBatch, Normalise};
use crate::losses::{ContrastiveHead, LossKind};
use crate::optim::NamedVar;
use crate::train_config::{LossConfig, ScratchModelConfig, TrainConfig};
use crate::trainer::{Result, TrainError, TrainModel};

/// Padding token of [`build_word_tokenizer`] (id 0).
pub const PAD_TOKEN: &str = "<pad>";
/// Start-of-text token (id 1).
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// Unknown-word token (id 2).
pub const UNK_TOKEN: &str = "<unk>";
/// End-of-text token, the pooled position of the CLIP text tower (id 3).
pub const EOS_TOKEN: &str = "<|endoftext|>";

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

/// Builds a word-level tokenizer from `texts`; see the module documentation. Words are kept
/// when seen at least `min_count` times; the vocabulary is sorted by frequency, then
/// alphabetically, so it is deterministic.
pub fn build_word_tokenizer(texts: &[&str], min_count: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::Lowercase;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::PreTokenizer;

    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in texts {
        let mut pre = tokenizers::PreTokenizedString::from(t.to_lowercase());
        Whitespace {}
            .pre_tokenize(&mut pre)
            .map_err(|e| model_err(format!("tokenizer: {e}")))?;
        for (word, _, _) in pre.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        ) {
            *counts.entry(word.to_string()).or_default() += 1;
        }
    }
    let mut words: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(_, c)| *c >= min_count.max(1))
        .collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, s) in [PAD_TOKEN, BOS_TOKEN, UNK_TOKEN, EOS_TOKEN]
        .iter()
        .enumerate()
    {
        vocab.insert(s.to_string(), i as u32);
    }
    for (w, _) in words {
        let id = vocab.len() as u32;
        vocab.entry(w).or_insert(id);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token(UNK_TOKEN.to_string())
        .build()
        .map_err(|e| model_err(format!("tokenizer: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase));
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0"))
        .map_err(|e| model_err(format!("tokenizer template: {e}")))?
        .special_tokens(vec![(BOS_TOKEN, 1), (EOS_TOKEN, 3)])
        .build()
        .map_err(|e| model_err(format!("tokenizer template: {e}")))?;
    tok.with_post_processor(Some(post));
    tok.add_special_tokens(&[
        tokenizers::AddedToken::from(PAD_TOKEN, true),
        tokenizers::AddedToken::from(BOS_TOKEN, true),
        tokenizers::AddedToken::from(UNK_TOKEN, true),
        tokenizers::AddedToken::from(EOS_TOKEN, true),
    ]);
    Ok(tok)
}

/// The HF CLIP config of a from-scratch model (`[model.scratch]`), for a tokenizer of
/// `vocab_size` tokens (pad 0, BOS 1, EOS 3 as written by [`build_word_tokenizer`]).
pub fn scratch_clip_config(
    s: &ScratchModelConfig,
    vocab_size: usize,
    image_size: usize,
    loss: &LossConfig,
) -> Result<ClipConfig> {
    if s.family != "clip" {
        return Err(TrainError::Invalid(format!(
            "model.scratch.family = {:?}: from-scratch models are CLIP towers; train a CLIP tower with loss.kind = \"siglip\" for the sigmoid loss",
            s.family
        )));
    }
    if !image_size.is_multiple_of(s.patch_size) {
        return Err(TrainError::Invalid(format!(
            "data.image_size {image_size} is not a multiple of model.scratch.patch_size {}",
            s.patch_size
        )));
    }
    let mut c = ClipConfig::tiny(vocab_size, image_size, s.patch_size);
    c.projection_dim = s.projection_dim;
    c.logit_scale_init_value = loss.logit_scale_init();
    let t = &mut c.text_config;
    t.hidden_size = s.text_width;
    t.intermediate_size = s.text_width * s.mlp_ratio;
    t.num_hidden_layers = s.text_layers;
    t.num_attention_heads = s.text_heads;
    t.max_position_embeddings = s.context_length;
    t.pad_token_id = 0;
    t.bos_token_id = 1;
    t.eos_token_id = 3;
    let v = &mut c.vision_config;
    v.hidden_size = s.vision_width;
    v.intermediate_size = s.vision_width * s.mlp_ratio;
    v.num_hidden_layers = s.vision_layers;
    v.num_attention_heads = s.vision_heads;
    c.validate().map_err(TrainError::Invalid)?;
    Ok(c)
}

/// The ModifiedResNet of a from-scratch model with `image_tower = "resnet"`.
pub fn scratch_resnet_config(s: &ScratchModelConfig, image_size: usize) -> ModifiedResNetConfig {
    ModifiedResNetConfig {
        layers: s.resnet_layers.clone(),
        width: s.resnet_width,
        image_size,
        head_width: s.resnet_head_width,
        output_dim: s.projection_dim,
    }
}

/// The open_clip config of a from-scratch model with `image_tower = "resnet"`, for a tokenizer
/// of `vocab_size` tokens written by [`build_word_tokenizer`] (pooling at its end-of-text, id 3).
pub fn scratch_openclip_config(
    s: &ScratchModelConfig,
    vocab_size: usize,
    image_size: usize,
) -> Result<OpenClipConfig> {
    let vision = scratch_resnet_config(s, image_size);
    vision.validate().map_err(TrainError::Invalid)?;
    let preprocess = PreprocessConfig::clip(image_size);
    Ok(OpenClipConfig {
        embed_dim: s.projection_dim,
        // The ViT variant's towers use QuickGELU (HF CLIP's default); so does this text tower.
        quick_gelu: true,
        vision,
        text: OpenClipTextConfig {
            context_length: s.context_length,
            vocab_size,
            width: s.text_width,
            heads: s.text_heads,
            layers: s.text_layers,
            mlp_ratio: s.mlp_ratio as f64,
            pool: TextPool::Eos(3),
        },
        mean: preprocess.mean,
        std: preprocess.std,
    })
}

/// Architecture of a from-scratch model.
#[derive(Debug, Clone)]
pub enum ScratchArch {
    /// HF CLIP with a ViT image tower.
    Clip(ClipConfig),
    /// open_clip CLIP with a ModifiedResNet image tower.
    OpenClipResNet(OpenClipConfig),
}

/// Whether a parameter is a normalisation parameter or statistic (layer norm `*norm*` /
/// `ln_*`, batch norm `bn*` / `downsample.1`): these keep their constant initialisation.
fn is_normalisation(name: &str) -> bool {
    name.to_lowercase().contains("norm")
        || name.contains("running_")
        || name.contains("downsample.1.")
        || name
            .split('.')
            .any(|seg| seg.starts_with("ln_") || (seg.starts_with("bn") && seg.len() <= 3))
}

/// The scale of a bottleneck block's last batch norm (`visual.layerN.i.bn3.weight`).
fn is_residual_output_norm(name: &str) -> bool {
    name.starts_with("visual.layer") && name.ends_with(".bn3.weight")
}

/// Re-initialises every parameter of `varmap` from ChaCha8 streams seeded by `seed` and the
/// parameter name, because candle's CPU initialisers cannot be seeded: norms keep their
/// constant initialisation (weight 1, bias 0; batch-norm running mean 0 and variance 1; the
/// last batch-norm scale of each ResNet block 0), other biases are 0, embeddings and the class
/// token are N(0, 0.02^2) (as in CLIP), and the other weights N(0, 1/fan_in) (fan_in = product
/// of all but the first dimension).
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let data = varmap
        .data()
        .lock()
        .map_err(|_| model_err("VarMap lock poisoned"))?;
    for (name, var) in data.iter() {
        let lower = name.to_lowercase();
        if is_residual_output_norm(name) {
            // ResNet blocks start as identities (Goyal et al. 2017; open_clip's ModifiedResNet
            // initialisation): the last batch norm of each residual branch scales by zero.
            var.set(&var.zeros_like()?)?;
            continue;
        }
        if is_normalisation(name) || name == "logit_scale" || name == "logit_bias" {
            continue;
        }
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let std = if lower.ends_with("bias") {
            0.0
        } else if lower.contains("embedding") || dims.len() < 2 {
            0.02
        } else {
            let fan_in: usize = dims[1..].iter().product();
            1.0 / (fan_in.max(1) as f64).sqrt()
        };
        let digest = crate::checkpoint::sha256_hex(name.as_bytes());
        let stream = u64::from_str_radix(&digest[..16], 16).unwrap_or(0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if std == 0.0 {
                    return 0.0;
                }
                // Box-Muller.
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect();
        let t = Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// A two-tower model under contrastive training.
pub struct ContrastiveModel {
    /// The model (its `Var`s live in `varmap`).
    pub model: Box<dyn VisionLanguageModel>,
    /// Every parameter of the model, by checkpoint name.
    pub varmap: VarMap,
    /// Learnable temperature (and SigLIP bias); replaces the model's `logit_scale`.
    pub head: ContrastiveHead,
    /// Tokenizer.
    pub tokenizer: TextTokenizer,
    /// `config.json` of the model (written by [`ContrastiveModel::save`]).
    pub config_json: serde_json::Value,
    /// Image preprocessing written with the model.
    pub preprocess: PreprocessConfig,
    /// Pixel normalisation used in training (from `preprocess`).
    pub normalise: Normalise,
    /// Family.
    pub family: Family,
}

impl ContrastiveModel {
    /// A CLIP model initialised at random from `config` (seeded: candle's initialisers draw
    /// from the CPU device generator, seeded here with `seed`).
    pub fn scratch(
        arch: &ScratchArch,
        tokenizer: tokenizers::Tokenizer,
        loss: &LossConfig,
        seed: u64,
    ) -> Result<Self> {
        let device = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let (model, context_length, image_size, config_json, family): (
            Box<dyn VisionLanguageModel>,
            _,
            _,
            _,
            _,
        ) = match arch {
            ScratchArch::Clip(c) => (
                Box::new(ClipModel::load(vb, c)?),
                c.text_config.max_position_embeddings,
                c.vision_config.image_size,
                serde_json::to_value(c).map_err(model_err)?,
                Family::Clip,
            ),
            ScratchArch::OpenClipResNet(c) => (
                Box::new(OpenClipResNet::load(vb, c)?),
                c.text.context_length,
                c.vision.image_size,
                c.to_json(),
                Family::OpenClip,
            ),
        };
        seeded_init(&varmap, seed)?;
        let pad = tokenizer.token_to_id(PAD_TOKEN).unwrap_or(0);
        // Training pads to the longest text of the batch: with the causal mask and pooling
        // at the first end-of-text token, padding after it cannot change the embedding, so
        // this equals max-length padding (what the saved directory loads with) and costs less.
        let tokenizer = TextTokenizer::from_tokenizer(
            tokenizer,
            Path::new("tokenizer.json"),
            context_length,
            Padding::Longest,
            pad,
        )
        .map_err(model_err)?;
        let head = ContrastiveHead::new(
            loss.kind,
            loss.logit_scale_init(),
            loss.bias_init,
            loss.learnable_temperature,
            DType::F32,
            &device,
        )?;
        let preprocess = PreprocessConfig::clip(image_size);
        Ok(Self {
            model,
            varmap,
            head,
            tokenizer,
            config_json,
            normalise: Normalise {
                mean: preprocess.mean,
                std: preprocess.std,
            },
            preprocess,
            family,
        })
    }

    /// A pretrained HF CLIP or SigLIP directory loaded for training. The head starts from the
    /// model's own temperature (and bias). BiomedCLIP (open_clip layout) is refused: its
    /// directory cannot be written back in the same layout yet.
    pub fn pretrained(dir: &Path, loss: &LossConfig) -> Result<Self> {
        let varmap = VarMap::new();
        let opts = medvlm_models::LoadOptions {
            mode: medvlm_models::LoadMode::Trainable(varmap.clone()),
            ..Default::default()
        };
        let loaded = medvlm_models::load_model_dir(dir, &opts).map_err(model_err)?;
        if loaded.family == Family::Biomedclip {
            return Err(TrainError::Invalid(format!(
                "{}: BiomedCLIP (open_clip layout) cannot be pretrained further yet; use an HF CLIP or SigLIP directory",
                dir.display()
            )));
        }
        if matches!(
            (loaded.family, loss.kind),
            (Family::Siglip, LossKind::Clip) | (Family::Clip, LossKind::Siglip)
        ) {
            tracing::warn!(
                "training a {} model with the {:?} loss",
                loaded.family.name(),
                loss.kind
            );
        }
        let scale: f64 = loaded
            .model
            .logit_scale()
            .to_dtype(DType::F64)?
            .to_scalar()?;
        let bias = match loaded.model.logit_bias() {
            Some(b) => b.to_dtype(DType::F64)?.to_scalar()?,
            None => loss.bias_init,
        };
        let init = if loss.temperature_init.is_some() {
            loss.logit_scale_init()
        } else {
            scale
        };
        let head = ContrastiveHead::new(
            loss.kind,
            init,
            bias,
            loss.learnable_temperature,
            DType::F32,
            &Device::Cpu,
        )?;
        let cfg_path = dir.join(match loaded.family {
            Family::OpenClip => medvlm_models::openclip::CONFIG_FILE,
            _ => "config.json",
        });
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| TrainError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let config_json = serde_json::from_str(&text).map_err(model_err)?;
        Ok(Self {
            normalise: Normalise {
                mean: loaded.preprocess.mean,
                std: loaded.preprocess.std,
            },
            model: loaded.model,
            varmap,
            head,
            tokenizer: loaded.tokenizer,
            config_json,
            preprocess: loaded.preprocess,
            family: loaded.family,
        })
    }

    /// Every model parameter by name (sorted), without the model's own `logit_scale` /
    /// `logit_bias` (the head's replace them), followed by the head's trainable scalars.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let data = self.varmap.data().lock().map(|d| {
            let mut v: Vec<NamedVar> = d
                .iter()
                .filter(|(k, _)| k.as_str() != "logit_scale" && k.as_str() != "logit_bias")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        });
        let mut v = data.unwrap_or_default();
        v.extend(self.head.trainable_vars());
        v
    }

    /// Current temperature `T = 1 / exp(logit_scale)`.
    pub fn temperature(&self) -> Result<f64> {
        Ok(self.head.temperature()?)
    }

    /// Writes the model directory (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json, preprocessor_config.json), each file atomically. The trained
    /// temperature (and bias) replace the model's `logit_scale` (`logit_bias`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = varmap_tensors(&self.varmap).map_err(model_err)?;
        for (name, var) in self.head.vars() {
            tensors.insert(name, var.as_tensor().clone());
        }
        let processor = match self.family {
            Family::Siglip => "SiglipImageProcessor",
            _ => "CLIPImageProcessor",
        };

        let pad_token = self
            .tokenizer
            .inner()
            .id_to_token(self.tokenizer.pad_id())
            .unwrap_or_else(|| PAD_TOKEN.to_string());
        let what = SaveModelDir {
            config: self.config_json.clone(),
            tensors: &tensors,
            tokenizer: self.tokenizer.inner(),
            pad_token: Some(&pad_token),
            preprocess: &self.preprocess,
            processor_type: processor,
        };
        match self.family {
            Family::OpenClip => save_open_clip_dir(dir, &what),
            _ => save_model_dir(dir, &what),
        }
        .map_err(model_err)
    }
}

impl TrainModel<ImageTextBatch> for ContrastiveModel {
    fn loss(&mut self, batch: &ImageTextBatch) -> Result<Tensor> {
        // Batch statistics while training (the evaluation helpers switch back).
        self.model.set_training(true);
        self.head.batch_loss(self.model.as_ref(), batch)
    }

    fn after_update(&mut self) -> Result<()> {
        Ok(self.head.clamp_logit_scale()?)
    }

    fn log_scalars(&self) -> Result<BTreeMap<String, f64>> {
        self.head.log_scalars()
    }
}

/// L2-normalised image embeddings `[N, E]` of `planes` (RGB `[0, 1]`, at the model size), in
/// batches of `batch`.
pub fn embed_images(m: &ContrastiveModel, planes: &[&Plane], batch: usize) -> Result<Tensor> {
    // Running statistics: evaluation must not depend on the batch or update the statistics.
    m.model.set_training(false);
    let mut out = Vec::new();
    for chunk in planes.chunks(batch.max(1)) {
        let px = pixel_tensor(chunk, &m.normalise, &Device::Cpu)?;
        let e = m
            .model
            .encode_image(&px)
            .map_err(model_err)?
            .embeds
            .detach();
        out.push(crate::losses::l2_normalize(&e)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// L2-normalised text embeddings `[N, E]`.
pub fn embed_texts(m: &ContrastiveModel, texts: &[&str], batch: usize) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let tok = m
            .tokenizer
            .encode_batch(chunk, &Device::Cpu)
            .map_err(model_err)?;
        let e = m
            .model
            .encode_text(&tok)
            .map_err(model_err)?
            .embeds
            .detach();
        out.push(crate::losses::l2_normalize(&e)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Cosine similarities `[N_img, N_txt]` (row-major) of normalised embeddings.
pub fn similarity(images: &Tensor, texts: &Tensor) -> Result<Vec<f32>> {
    Ok(images
        .matmul(&texts.t()?)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Zero-shot class scores `[N_img, K]` when each class is a set of prompts, ensembled in
/// probability space: the score of class `c` for image `x` is
/// `log( mean_p exp(scale * cos(x, t_p)) )` over the class's prompts `t_p`, i.e. the class is a
/// mixture of the reports that could describe it, each scored as CLIP scores a text, and
/// `scale` is the model's logit scale (`1 / temperature`). CLIP (Radford et al. 2021, sec.
/// 3.1.4) averages the prompts' embeddings instead, which is cheaper and works when the
/// prompts are paraphrases; when they differ in content (the location and size of a lesion)
/// the mean embedding is a blurred centre that no image sits near. `prompt_embeds[c]` holds
/// class `c`'s L2-normalised prompt embeddings `[P_c, E]`; `image_embeds` is `[N_img, E]`,
/// normalised. Computed with the log-sum-exp shift, so large scales do not overflow.
pub fn prompt_mixture_scores(
    image_embeds: &Tensor,
    prompt_embeds: &[Tensor],
    scale: f64,
) -> Result<Tensor> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(TrainError::Invalid(format!(
            "prompt_mixture_scores: the logit scale must be a positive finite number, got {scale}"
        )));
    }
    let mut cols = Vec::with_capacity(prompt_embeds.len());
    for (c, pe) in prompt_embeds.iter().enumerate() {
        let p = pe.dim(0)?;
        if p == 0 {
            return Err(TrainError::Invalid(format!(
                "prompt_mixture_scores: class {c} has no prompt"
            )));
        }
        let logits = (image_embeds.matmul(&pe.t()?)? * scale)?;
        let max = logits.max_keepdim(1)?;
        let sum = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?;
        cols.push(((sum.log()? + max)? - (p as f64).ln())?);
    }
    Ok(Tensor::cat(&cols, 1)?)
}

/// Zero-shot predictions: for each image, the index of the class with the highest
/// [`prompt_mixture_scores`] (with one prompt per class: the most similar prompt).
pub fn zero_shot(
    image_embeds: &Tensor,
    prompt_embeds: &[Tensor],
    scale: f64,
) -> Result<Vec<usize>> {
    let scores = prompt_mixture_scores(image_embeds, prompt_embeds, scale)?;
    medvlm_eval::classification::argmax_rows(
        &scores.flatten_all()?.to_vec1::<f32>()?,
        prompt_embeds.len(),
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Image-text retrieval recall@K in both directions. A query's correct answers are every item
/// whose text is identical to its own (duplicate reports are common in clinical data), so a
/// retrieved image with the same report counts as correct.
pub fn retrieval(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    texts: &[&str],
    ks: &[usize],
) -> Result<medvlm_eval::retrieval::RetrievalReport> {
    let n = texts.len();
    let sims = similarity(image_embeds, text_embeds)?;
    let mut by_text: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, t) in texts.iter().enumerate() {
        by_text.entry(t).or_default().push(i);
    }
    let mut positives = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        for &j in &by_text[t] {
            positives.push((i, j));
        }
    }
    medvlm_eval::retrieval::retrieval_recall(&sims, n, n, &positives, ks)
        .map_err(|e| TrainError::Invalid(e.to_string()))
}

/// `model.scratch.tokenizer` value that builds a word-level tokenizer from the training texts
/// ([`build_word_tokenizer`], words seen at least twice).
pub const BUILD_WORDS: &str = "build:words";

fn bad(reason: impl Into<String>) -> TrainError {
    TrainError::Invalid(reason.into())
}

/// Applies `KEY=VALUE` overrides (dotted keys; the value is parsed as TOML, and a bare word
/// that is not valid TOML is taken as a string).
pub fn apply_overrides(doc: &mut toml::Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| bad(format!("--set {o:?}: expected KEY=VALUE")))?;
        let key = key.trim();
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t
                .remove("v")
                .ok_or_else(|| bad(format!("--set {o:?}: no value")))?,
            Err(_) => toml::Value::String(value.to_string()),
        };
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad(format!("--set {o:?}: empty key component")));
        }
        let mut table = &mut *doc;
        for p in &parts[..parts.len() - 1] {
            let entry = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| bad(format!("--set {key}: {p} is not a table")))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), parsed);
    }
    Ok(())
}

fn resolve(base: &Path, p: &Path) -> std::path::PathBuf {
    if p.is_absolute() || p.as_os_str() == BUILD_WORDS {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Reads the config file, applies `overrides`, validates it for `command` (unknown keys and
/// out-of-range values are errors naming the key) and makes relative paths relative to the
/// config file's directory.
pub fn load_pretrain_config(
    path: &Path,
    overrides: &[String],
    command: crate::train_config::Command,
) -> Result<TrainConfig> {
    use crate::train_config::ConfigError;
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| {
        TrainError::Config(ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })?;
    apply_overrides(&mut doc, overrides)?;
    let text = toml::to_string(&doc).map_err(|e| bad(e.to_string()))?;
    let mut cfg = TrainConfig::from_toml_str(&text, path)?;
    cfg.validate(command)?;
    let base = path.parent().unwrap_or(Path::new("."));
    cfg.output_dir = resolve(base, &cfg.output_dir);
    cfg.data.manifest = resolve(base, &cfg.data.manifest);
    cfg.data.val_manifest = cfg.data.val_manifest.as_ref().map(|p| resolve(base, p));
    if let Some(s) = &mut cfg.model.scratch {
        s.tokenizer = resolve(base, &s.tokenizer);
    }
    if let Some(src) = &cfg.model.source {
        let p = Path::new(src);
        if !p.is_absolute() && base.join(p).is_dir() {
            cfg.model.source = Some(base.join(p).to_string_lossy().into_owned());
        }
    }
    Ok(cfg)
}

/// The configuration as TOML (written beside the run as `config.resolved.toml`).
pub fn config_toml(cfg: &TrainConfig) -> Result<String> {
    toml::to_string(cfg).map_err(|e| bad(e.to_string()))
}

/// Builds the model `cfg` asks for: from scratch (`[model.scratch]`, tokenizer from its file or
/// built from `train_texts` with [`BUILD_WORDS`]) or a pretrained directory / hub-cache source
/// (`model.source`, whose input size must equal `data.image_size`).
pub fn build_model(cfg: &TrainConfig, train_texts: &[&str]) -> Result<ContrastiveModel> {
    if let Some(s) = &cfg.model.scratch {
        let tok = if s.tokenizer.as_os_str() == BUILD_WORDS {
            build_word_tokenizer(train_texts, 2)?
        } else {
            tokenizers::Tokenizer::from_file(&s.tokenizer).map_err(|e| {
                bad(format!(
                    "model.scratch.tokenizer {}: {e} (or set it to \"{BUILD_WORDS}\" to build one from the training texts)",
                    s.tokenizer.display()
                ))
            })?
        };
        let vocab = tok.get_vocab_size(true);
        let arch = if s.image_tower == "resnet" {
            ScratchArch::OpenClipResNet(scratch_openclip_config(s, vocab, cfg.data.image_size)?)
        } else {
            ScratchArch::Clip(scratch_clip_config(
                s,
                vocab,
                cfg.data.image_size,
                &cfg.loss,
            )?)
        };
        ContrastiveModel::scratch(&arch, tok, &cfg.loss, cfg.seed)
    } else {
        let src = cfg
            .model
            .source
            .as_deref()
            .ok_or_else(|| bad("model.source is not set"))?;
        let dir = medvlm_models::source::ModelSource::parse(src)
            .and_then(|s| s.resolve())
            .map_err(|e| bad(format!("model.source {src:?}: {e}")))?;
        let m = ContrastiveModel::pretrained(&dir, &cfg.loss)?;
        let size = m.model.image_size();
        if size != cfg.data.image_size {
            return Err(bad(format!(
                "data.image_size = {} but the model {} takes {size} px images; set data.image_size = {size}",
                cfg.data.image_size,
                dir.display()
            )));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_resnet_starts_with_identity_blocks_and_unit_norms() {
        let tok = build_word_tokenizer(&["a b", "a b"], 1).unwrap();
        let cfg: TrainConfig = TrainConfig::from_toml_str(
            r#"output_dir = "o"
[model.scratch]
tokenizer = "build:words"
image_tower = "resnet"
resnet_width = 4
projection_dim = 16
text_width = 16
text_layers = 1
[data]
manifest = "m.jsonl"
image_size = 32
"#,
            Path::new("c.toml"),
        )
        .unwrap();
        let s = cfg.model.scratch.as_ref().unwrap();
        let vocab = tok.get_vocab_size(true);
        let arch = ScratchArch::OpenClipResNet(scratch_openclip_config(s, vocab, 32).unwrap());
        let m = ContrastiveModel::scratch(&arch, tok, &cfg.loss, 3).unwrap();
        assert_eq!(m.family, Family::OpenClip);
        let t = varmap_tensors(&m.varmap).unwrap();
        let values = |name: &str| -> Vec<f32> { t[name].flatten_all().unwrap().to_vec1().unwrap() };
        assert!(values("visual.layer1.0.bn3.weight")
            .iter()
            .all(|v| *v == 0.0));
        assert!(values("visual.layer1.0.bn2.weight")
            .iter()
            .all(|v| *v == 1.0));
        assert!(values("visual.layer2.0.downsample.1.running_var")
            .iter()
            .all(|v| *v == 1.0));
        assert!(values("visual.bn1.running_mean").iter().all(|v| *v == 0.0));
        assert!(values("transformer.resblocks.0.ln_1.weight")
            .iter()
            .all(|v| *v == 1.0));
        // Convolutions are drawn N(0, 1/fan_in): fan_in of conv2 is 2 * 3 * 3 = 18.
        let w = values("visual.conv2.weight");
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        assert!(w.iter().any(|v| *v != 0.0) && var < 4.0 / 18.0, "{var}");
        // Seeded: the same seed gives the same weights.
        let tok = build_word_tokenizer(&["a b", "a b"], 1).unwrap();
        let again = ContrastiveModel::scratch(&arch, tok, &cfg.loss, 3).unwrap();
        let t2 = varmap_tensors(&again.varmap).unwrap();
        let w2: Vec<f32> = t2["visual.conv2.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w, w2);
    }

    #[test]
    fn prompt_mixture_scores_are_log_mean_exp_of_scaled_cosines() {
        let dev = Device::Cpu;
        // Two unit images; class 0 has two prompts that differ in content, class 1 one.
        let images = Tensor::new(&[[1.0f32, 0.0], [0.6, 0.8]], &dev).unwrap();
        let class0 = Tensor::new(&[[1.0f32, 0.0], [-0.6, 0.8]], &dev).unwrap();
        let class1 = Tensor::new(&[[0.8f32, 0.6]], &dev).unwrap();
        let scale = 20.0;
        let s = prompt_mixture_scores(&images, &[class0.clone(), class1.clone()], scale)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let lme = |a: f64, b: f64| (((scale * a).exp() + (scale * b).exp()) / 2.0).ln();
        let expected = [
            [lme(1.0, -0.6), scale * 0.8],
            [lme(0.6, 0.28), scale * 0.96],
        ];
        for (row, exp) in s.iter().zip(expected) {
            for (v, e) in row.iter().zip(exp) {
                assert!(
                    (*v as f64 - e).abs() < 1e-4 * e.abs().max(1.0),
                    "{v} vs {e}"
                );
            }
        }
        // The first image is one of class 0's prompts, and the mixture gives it class 0; the
        // mean embedding of class 0, [0.2, 0.4] normalised (cosine 0.45 with the image), would
        // lose to class 1 (cosine 0.8).
        assert!(s[0][0] > s[0][1]);
        assert!(s[1][1] > s[1][0]);
        assert_eq!(
            zero_shot(&images, &[class0, class1], scale).unwrap(),
            [0, 1]
        );
        // A large scale does not overflow (the log-sum-exp shift).
        let big = prompt_mixture_scores(
            &images,
            &[Tensor::new(&[[1.0f32, 0.0]], &dev).unwrap()],
            1e4,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert!((big[0][0] - 1e4).abs() < 1.0 && big[1][0].is_finite());
        // Bad input: a class without prompts, a scale that is not positive.
        let empty = Tensor::zeros((0, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(prompt_mixture_scores(&images, &[empty], 1.0)
            .unwrap_err()
            .to_string()
            .contains("class 0 has no prompt"));
        assert!(prompt_mixture_scores(&images, &[], 0.0).is_err());
    }

    #[test]
    fn word_tokenizer_wraps_texts_and_keeps_end_of_text_when_truncating() {
        let texts = [
            "No pleural effusion.",
            "Small pleural effusion, left base.",
            "Normal chest.",
        ];
        let tok = build_word_tokenizer(&texts, 2).unwrap();
        assert_eq!(tok.token_to_id(PAD_TOKEN), Some(0));
        assert_eq!(tok.token_to_id(BOS_TOKEN), Some(1));
        assert_eq!(tok.token_to_id(UNK_TOKEN), Some(2));
        assert_eq!(tok.token_to_id(EOS_TOKEN), Some(3));
        // Seen twice: kept; seen once: unknown.
        assert!(tok.token_to_id("effusion").is_some());
        assert!(tok.token_to_id("base").is_none());
        let t =
            TextTokenizer::from_tokenizer(tok, Path::new("t"), 5, Padding::MaxLength, 0).unwrap();
        let ids = t.encode_ids("PLEURAL effusion base").unwrap();
        let pleural = t.token_to_id("pleural").unwrap();
        let effusion = t.token_to_id("effusion").unwrap();
        assert_eq!(ids, vec![1, pleural, effusion, 2, 3]);
        let long = t
            .encode_ids("pleural effusion pleural effusion pleural")
            .unwrap();
        assert_eq!(long.len(), 5);
        assert_eq!((long[0], long[4]), (1, 3), "{long:?}");
    }
}
