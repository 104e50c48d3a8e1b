//! Strategy 1: zero-shot prompting (Radford et al., ICML 2021, "Learning
//! Transferable Visual Models From Natural Language Supervision").
//!
//! Four variants, all training-free, all with logits
//! `s * norm(f) . w_c` where `s` is the logit scale (default 100):
//!
//! * `zero-shot`: single template; `w_c` is the normalised embedding of the
//!   first prompt of class c (e.g. "a photo of a {class}.").
//! * `zero-shot-ensemble`: template ensemble (CLIP, section 3.1.4); `w_c` is
//!   the mean of the L2-normalised embeddings of all prompts of class c,
//!   renormalised.
//! * `zero-shot-descriptions`: class descriptions (Pratt et al., ICCV 2023,
//!   "What does a platypus look like?" (CuPL); Menon & Vondrick, ICLR 2023,
//!   "Visual Classification via Description from Large Language Models").
//!   The descriptions come from a JSON file `{ "class": ["description", ...] }`
//!   read by [`load_class_descriptions`], are encoded by the caller, and are
//!   ensembled exactly as templates are (CuPL's formulation: the mean of the
//!   normalised description embeddings).
//! * `zero-shot-mixture`: the prompts ensembled in probability space; the
//!   logit of class c is `log mean_p exp(s * norm(f) . t_p)` over its normalised
//!   prompt embeddings `t_p` (the class as a mixture of the texts that could
//!   describe it; `medvlm_train::pretrain::prompt_mixture_scores`). For prompt sets
//!   that differ in content rather than wording (a lesion's size and location),
//!   whose mean embedding is a blurred centre; CLIP ensembles in embedding
//!   space for its cost (section 3.1.4). medvlm's quickstart evaluates this way.
//! * `zero-shot-pairs`: multi-label with positive/negative prompt pairs
//!   (e.g. "an X-ray showing {label}" / "an X-ray with no {label}", as in
//!   CheXzero, Tiu et al., Nat. Biomed. Eng. 2022): per label, a softmax over
//!   the pair `[s f.p_c, s f.n_c]`, i.e. `P(label c) = sigmoid(s f.(p_c - n_c))`,
//!   so the classifier's logit for label c is `s f.(p_c - n_c)`.
//!
//! No hyperparameters; the support set is ignored (it may be empty).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::fewshot::TaskKind;
use crate::method::{
    make_card, normalized_input, AdaptInput, AdaptationMethod, AdaptedClassifier, ClassifierCard,
    MethodError, Result, SavedTensors,
};

/// How prompts are turned into class weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroShotVariant {
    /// First prompt of each class.
    SingleTemplate,
    /// Mean of normalised prompt embeddings.
    TemplateEnsemble,
    /// Mean of normalised description embeddings.
    Descriptions,
    /// Mean over the prompts of `exp(logit)`, in log space.
    PromptMixture,
    /// Positive/negative prompt pairs, one sigmoid per label.
    PositiveNegativePairs,
}

/// Zero-shot prompting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZeroShot {
    /// Variant.
    pub variant: ZeroShotVariant,
}

impl ZeroShot {
    /// Builds the variant registered as `name`; zero-shot has no tunable
    /// hyperparameters, so any override is an error.
    pub fn from_name(name: &str, overrides: Option<&serde_json::Value>) -> Result<Self> {
        let variant = match name {
            "zero-shot" => ZeroShotVariant::SingleTemplate,
            "zero-shot-ensemble" => ZeroShotVariant::TemplateEnsemble,
            "zero-shot-descriptions" => ZeroShotVariant::Descriptions,
            "zero-shot-mixture" => ZeroShotVariant::PromptMixture,
            "zero-shot-pairs" => ZeroShotVariant::PositiveNegativePairs,
            _ => {
                return Err(MethodError::InvalidInput(format!(
                    "'{name}' is not a zero-shot variant"
                )))
            }
        };
        if let Some(o) = overrides {
            if o.as_object().is_none_or(|m| !m.is_empty()) {
                return Err(MethodError::BadHyperparameters {
                    method: name.into(),
                    reason: "zero-shot methods have no hyperparameters".into(),
                });
            }
        }
        Ok(Self { variant })
    }

    /// Class weights `[C, D]` (normalised) and, for pairs, negative weights.
    fn weights(&self, input: &AdaptInput) -> Result<(Tensor, Option<Tensor>)> {
        let texts = input.texts;
        match self.variant {
            ZeroShotVariant::SingleTemplate => {
                let first: Vec<Tensor> = texts
                    .prompts
                    .iter()
                    .map(|p| p.narrow(0, 0, 1))
                    .collect::<candle_core::Result<_>>()?;
                Ok((
                    crate::method::l2_normalize(
                        &Tensor::cat(&first, 0)?.to_dtype(candle_core::DType::F32)?,
                    )?,
                    None,
                ))
            }
            ZeroShotVariant::TemplateEnsemble
            | ZeroShotVariant::Descriptions
            | ZeroShotVariant::PromptMixture => Ok((texts.ensemble_weights()?, None)),
            ZeroShotVariant::PositiveNegativePairs => {
                let neg = texts.negative_ensemble_weights()?.ok_or_else(|| {
                    MethodError::InvalidInput(
                        "zero-shot-pairs needs negative prompts for every label (ClassTexts::negative_prompts)".into(),
                    )
                })?;
                Ok((texts.ensemble_weights()?, Some(neg)))
            }
        }
    }
}

impl AdaptationMethod for ZeroShot {
    fn name(&self) -> &'static str {
        match self.variant {
            ZeroShotVariant::SingleTemplate => "zero-shot",
            ZeroShotVariant::TemplateEnsemble => "zero-shot-ensemble",
            ZeroShotVariant::Descriptions => "zero-shot-descriptions",
            ZeroShotVariant::PromptMixture => "zero-shot-mixture",
            ZeroShotVariant::PositiveNegativePairs => "zero-shot-pairs",
        }
    }

    fn requires_encoder(&self) -> bool {
        false
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>> {
        input.texts.validate()?;
        let (weights, negative) = self.weights(input)?;
        let task = if negative.is_some() {
            TaskKind::MultiLabel
        } else {
            TaskKind::MultiClass
        };
        let card = make_card(
            self,
            input,
            task,
            self.hyperparameters(),
            serde_json::Value::Null,
        )?;
        let mut classifier = ZeroShotClassifier::new(card, weights, negative)?;
        if self.variant == ZeroShotVariant::PromptMixture {
            let per_class = input
                .texts
                .prompts
                .iter()
                .map(|p| crate::method::l2_normalize(&p.to_dtype(candle_core::DType::F32)?))
                .collect::<Result<Vec<_>>>()?;
            classifier.mixture = Some(PromptMixture::new(per_class)?);
        }
        Ok(Box::new(classifier))
    }
}

/// A zero-shot classifier: normalised class weights (and negative weights
/// for prompt pairs).
#[derive(Debug, Clone)]
pub struct ZeroShotClassifier {
    card: ClassifierCard,
    weights: Tensor,
    negative: Option<Tensor>,
    /// `weights - negative` for pairs, else `weights`: the effective `[C, D]`.
    effective: Tensor,
    /// `zero-shot-mixture`: every class's normalised prompt embeddings.
    mixture: Option<PromptMixture>,
}

/// The prompts of `zero-shot-mixture`: all of them `[P, D]` in class order (what is saved,
/// with the count per class), and each class's rows as a view.
#[derive(Debug, Clone)]
struct PromptMixture {
    prompts: Tensor,
    counts: Tensor,
    per_class: Vec<Tensor>,
}

impl PromptMixture {
    fn new(per_class: Vec<Tensor>) -> Result<Self> {
        let counts: Vec<u32> = per_class
            .iter()
            .map(|p| p.dim(0).map(|n| n as u32))
            .collect::<candle_core::Result<_>>()?;
        let n = counts.len();
        Ok(Self {
            prompts: Tensor::cat(&per_class, 0)?,
            counts: Tensor::from_vec(counts, n, &candle_core::Device::Cpu)?,
            per_class,
        })
    }
}

impl ZeroShotClassifier {
    fn new(card: ClassifierCard, weights: Tensor, negative: Option<Tensor>) -> Result<Self> {
        let effective = match &negative {
            Some(n) => (&weights - n)?,
            None => weights.clone(),
        };
        Ok(Self {
            card,
            weights,
            negative,
            effective,
            mixture: None,
        })
    }

    /// Rebuilds from a saved card and tensors.
    pub fn from_saved(card: ClassifierCard, saved: &SavedTensors) -> Result<Self> {
        let shape = [card.class_names.len(), card.feature_dim];
        let weights = saved.get_shaped("text_weights", &shape)?;
        let negative = if card.method == "zero-shot-pairs" {
            Some(saved.get_shaped("negative_text_weights", &shape)?)
        } else {
            None
        };
        let mixture = if card.method == "zero-shot-mixture" {
            let c = card.class_names.len();
            let counts: Vec<u32> = saved
                .get_shaped("prompt_counts", &[c])?
                .to_dtype(candle_core::DType::U32)?
                .to_vec1()?;
            if counts.contains(&0) {
                return Err(MethodError::BadCheckpoint {
                    path: saved.path().to_path_buf(),
                    reason: format!("prompt_counts {counts:?} has a class without prompts"),
                });
            }
            let total = counts.iter().map(|&n| n as usize).sum::<usize>();
            let all = saved.get_shaped("prompt_weights", &[total, card.feature_dim])?;
            let mut per_class = Vec::with_capacity(c);
            let mut start = 0;
            for n in counts {
                per_class.push(all.narrow(0, start, n as usize)?);
                start += n as usize;
            }
            Some(PromptMixture::new(per_class)?)
        } else {
            None
        };
        let mut classifier = Self::new(card, weights, negative)?;
        classifier.mixture = mixture;
        Ok(classifier)
    }

    /// The normalised class weights `[C, D]`.
    pub fn text_weights(&self) -> &Tensor {
        &self.weights
    }
}

impl AdaptedClassifier for ZeroShotClassifier {
    fn card(&self) -> &ClassifierCard {
        &self.card
    }

    fn logits(&self, image_features: &Tensor) -> Result<Tensor> {
        let f = normalized_input(&self.card, image_features)?;
        if let Some(m) = &self.mixture {
            return medvlm_train::pretrain::prompt_mixture_scores(
                &f,
                &m.per_class,
                self.card.logit_scale,
            )
            .map_err(|e| MethodError::InvalidInput(e.to_string()));
        }
        Ok((f.matmul(&self.effective.t()?)? * self.card.logit_scale)?)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("text_weights".to_string(), self.weights.clone())];
        if let Some(n) = &self.negative {
            v.push(("negative_text_weights".to_string(), n.clone()));
        }
        if let Some(m) = &self.mixture {
            v.push(("prompt_weights".to_string(), m.prompts.clone()));
            v.push(("prompt_counts".to_string(), m.counts.clone()));
        }
        v
    }
}

/// Reads a class-descriptions JSON file (`{ "class name": ["description",
/// ...], ... }`) and returns the descriptions in the order of `class_names`.
///
/// Errors name the file and say what to change: a class in the file that is
/// not one of `class_names` (with the known names), a class with no entry or
/// an empty list, or malformed JSON.
pub fn load_class_descriptions(path: &Path, class_names: &[String]) -> Result<Vec<Vec<String>>> {
    let err = |reason: String| MethodError::Descriptions {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let map: BTreeMap<String, Vec<String>> = serde_json::from_str(&text).map_err(|e| {
        err(format!(
            "expected a JSON object of class name -> list of descriptions: {e}"
        ))
    })?;
    let known: BTreeSet<&str> = class_names.iter().map(String::as_str).collect();
    let unknown: Vec<&String> = map.keys().filter(|k| !known.contains(k.as_str())).collect();
    if !unknown.is_empty() {
        return Err(err(format!(
            "unknown class name(s) {unknown:?}; the task's classes are {class_names:?}: rename the keys to match"
        )));
    }
    class_names
        .iter()
        .map(|c| match map.get(c) {
            Some(d) if !d.is_empty() => Ok(d.clone()),
            Some(_) => Err(err(format!(
                "class '{c}' has an empty list of descriptions; add at least one"
            ))),
            None => Err(err(format!(
                "class '{c}' has no descriptions; add a \"{c}\": [...] entry"
            ))),
        })
        .collect()
}
