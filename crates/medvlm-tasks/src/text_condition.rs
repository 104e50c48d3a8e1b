//! Text conditioning shared by the image-to-image heads (registration, super-resolution):
//! the frozen VLM text tower that embeds a prompt ([`TextConditioner`]), the check that a
//! prompt fits the tower's context ([`check_prompt_fits`]), and the FiLM layer that turns a
//! text embedding into a per-channel scale and shift of a network's features ([`Film`]).
//!
//! # FiLM
//!
//! Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018:
//! features `x` become `x (1 + γ(t)) + β(t)`, with `(γ, β)` one linear map of the
//! L2-normalised text embedding `t`. The `1 +` and a zero initialisation of the linear map
//! (the heads' seeded initialisers zero every parameter named `film*`) make the conditioned
//! network start exactly as the unconditioned one, so text can only be learned in, not
//! imposed at random (TextSCF, Chen et al., conditions registration this way).

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use medvlm_models::LoadedModel;

/// Errors of text conditioning.
#[derive(Debug, thiserror::Error)]
pub enum TextConditionError {
    /// The text model cannot be loaded or run.
    #[error("text model {spec}: {reason}")]
    Model {
        /// The model spec.
        spec: String,
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
    /// Text given to, or missing from, a network (the message says which).
    #[error("{0}")]
    Input(String),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, TextConditionError>;

/// Refuses a prompt longer than the text tower's context (counted with the tokenizer's
/// special tokens, without its truncation, which would otherwise cut it silently) or empty,
/// naming both lengths.
pub fn check_prompt_fits(m: &LoadedModel, prompt: &str) -> Result<()> {
    let ctx = m.tokenizer.context_length();
    let mut tok = m.tokenizer.inner().clone();
    let short: String = prompt.chars().take(60).collect();
    let shown = if short.len() < prompt.len() {
        format!("{short}...")
    } else {
        short
    };
    let perr = |reason: String| TextConditionError::Prompt {
        prompt: shown.clone(),
        reason,
    };
    tok.with_truncation(None).map_err(|e| perr(e.to_string()))?;
    tok.with_padding(None);
    let n = tok
        .encode(prompt, true)
        .map_err(|e| perr(e.to_string()))?
        .len();
    if n > ctx {
        return Err(perr(format!(
            "{n} tokens, longer than the text tower's context of {ctx} tokens; shorten the prompt"
        )));
    }
    if prompt.trim().is_empty() {
        return Err(perr("empty prompt".into()));
    }
    Ok(())
}

/// The text tower that conditions a network: the loaded VLM, its spec and fingerprint.
pub struct TextConditioner {
    /// Model spec as given (`medvlm_models::load_model`).
    pub spec: String,
    /// The model (its text tower is used).
    pub model: LoadedModel,
}

impl TextConditioner {
    /// Loads the model of `spec`.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let opts = medvlm_models::LoadOptions {
            device: device.clone(),
            ..Default::default()
        };
        let model =
            medvlm_models::load_model(spec, &opts).map_err(|e| TextConditionError::Model {
                spec: spec.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            spec: spec.to_string(),
            model,
        })
    }

    /// Width of the text embedding.
    pub fn embed_dim(&self) -> usize {
        self.model.model.embed_dim()
    }

    /// The model's fingerprint (files, family), as the other heads record it.
    pub fn fingerprint(&self) -> String {
        crate::segmentation_pipeline::model_fingerprint(&self.spec, &self.model)
    }

    /// [`check_prompt_fits`] with this tower.
    pub fn check_fits(&self, prompt: &str) -> Result<()> {
        check_prompt_fits(&self.model, prompt)
    }

    /// L2-normalised text embeddings `[N, D]` of `prompts`, each distinct prompt embedded
    /// once; an empty prompt, or one longer than the context, is refused.
    pub fn embed(&self, prompts: &[String], device: &Device) -> Result<Tensor> {
        let mut distinct: Vec<String> = prompts.to_vec();
        distinct.sort();
        distinct.dedup();
        if distinct.iter().any(|p| p.trim().is_empty()) {
            return Err(TextConditionError::Input(
                "a text-conditioned network needs a non-empty prompt for every input".into(),
            ));
        }
        for p in &distinct {
            self.check_fits(p)?;
        }
        let model_err = |e: medvlm_models::ModelError| TextConditionError::Model {
            spec: self.spec.clone(),
            reason: e.to_string(),
        };
        let e = medvlm_models::embed::embed_texts(&self.model, &distinct, 64, device)
            .map_err(model_err)?;
        let e = medvlm_models::vlm::l2_normalize(&e).map_err(model_err)?;
        let idx: Vec<u32> = prompts
            .iter()
            .map(|p| distinct.binary_search(p).unwrap_or(0) as u32)
            .collect();
        Ok(
            e.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?
                .to_device(device)?,
        )
    }
}

/// Checks that a network of text width `text_dim` (0 = unconditioned) gets text embeddings
/// `[batch, text_dim]` exactly when it is conditioned; `net` names the network in the error
/// ("registration network").
pub fn check_text_input(
    text_dim: usize,
    text: Option<&Tensor>,
    batch: usize,
    net: &str,
) -> Result<()> {
    match (text_dim, text) {
        (0, None) => Ok(()),
        (0, Some(_)) => Err(TextConditionError::Input(format!(
            "this {net} is not text-conditioned: it takes no prompt"
        ))),
        (_, None) => Err(TextConditionError::Input(format!(
            "this {net} is text-conditioned: give a prompt"
        ))),
        (d, Some(t)) => {
            if t.dims2()? != (batch, d) {
                return Err(TextConditionError::Input(format!(
                    "text embeddings are {:?}; the network reads [{batch}, {d}]",
                    t.dims()
                )));
            }
            Ok(())
        }
    }
}

/// Where a feature map keeps its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    /// `[B, C, H, W]`.
    First,
    /// `[B, H, W, C]`.
    Last,
}

/// A FiLM layer (see the module doc): a linear map from the text embedding to `channels`
/// scales and `channels` shifts, parameters `weight` and `bias` under the given prefix
/// (name it `film...` so the seeded initialisers zero it).
pub struct Film {
    linear: candle_nn::Linear,
    channels: usize,
}

impl Film {
    /// The layer's parameters under `vb`.
    pub fn new(vb: VarBuilder, text_dim: usize, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear: candle_nn::linear(text_dim, 2 * channels, vb)?,
            channels,
        })
    }

    /// `x (1 + γ(t)) + β(t)` for features `x` (channels where `layout` says) and text
    /// embeddings `t` `[B, D]` (checked by [`check_text_input`] beforehand).
    pub fn modulate(&self, x: &Tensor, t: &Tensor, layout: Channels) -> Result<Tensor> {
        let b = t.dim(0)?;
        let gb = candle_nn::Module::forward(&self.linear, t)?;
        let ch = self.channels;
        let shape = match layout {
            Channels::First => (b, ch, 1, 1),
            Channels::Last => (b, 1, 1, ch),
        };
        let gamma = gb.narrow(1, 0, ch)?.reshape(shape)?;
        let beta = gb.narrow(1, ch, ch)?.reshape(shape)?;
        Ok(x.broadcast_mul(&(gamma + 1.0)?)?.broadcast_add(&beta)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    #[test]
    fn film_scales_and_shifts_each_channel_in_either_layout() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let film = Film::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), 1, 2).unwrap();
        // γ = (1, 2) t and β = (10, 20) t + (0.5, 0): rows of the weight, then the bias.
        for (name, var) in medvlm_train::optim::varmap_params(&varmap) {
            let v = if name.ends_with("weight") {
                Tensor::from_vec(vec![1f32, 2., 10., 20.], (4, 1), &dev)
            } else {
                Tensor::from_vec(vec![0f32, 0., 0.5, 0.], 4, &dev)
            };
            var.set(&v.unwrap()).unwrap();
        }
        let t = Tensor::from_vec(vec![1f32], (1, 1), &dev).unwrap();
        // Channels last: pixel values (3, 5) -> (3 * 2 + 10.5, 5 * 3 + 20).
        let x = Tensor::from_vec(vec![3f32, 5.], (1, 1, 1, 2), &dev).unwrap();
        let y = film.modulate(&x, &t, Channels::Last).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![16.5, 35.0]
        );
        let x = Tensor::from_vec(vec![3f32, 5.], (1, 2, 1, 1), &dev).unwrap();
        let y = film.modulate(&x, &t, Channels::First).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![16.5, 35.0]
        );
    }

    #[test]
    fn text_input_must_match_the_conditioning() {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(check_text_input(0, None, 2, "net").is_ok());
        assert!(check_text_input(3, Some(&t), 2, "net").is_ok());
        let e = check_text_input(0, Some(&t), 2, "net").unwrap_err();
        assert!(e.to_string().contains("not text-conditioned"), "{e}");
        let e = check_text_input(3, None, 2, "net").unwrap_err();
        assert!(e.to_string().contains("give a prompt"), "{e}");
        let e = check_text_input(4, Some(&t), 2, "net").unwrap_err();
        assert!(e.to_string().contains("[2, 4]"), "{e}");
        assert!(check_text_input(3, Some(&t), 1, "net").is_err());
    }
}
