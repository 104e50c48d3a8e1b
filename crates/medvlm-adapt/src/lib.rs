//! medvlm-adapt: adapting VLMs. The five adaptation strategies, one file per method under
//! `methods/`, behind the shared traits in `method`; tasks built from manifests (`task`), their
//! class prompts (`prompts`) and image features (`features`, through the content-keyed
//! `feature_cache`), the methods that fit and score through the encoders on image files
//! (`encoders`), the adapted-model artefact and its card (`artefact`), an artefact loaded
//! for prediction (`predictor`), the few-shot protocol (`fewshot`), and the pipeline that
//! draws, fits, evaluates and writes an artefact (`pipeline::adapt`, all of `medvlm adapt`) or
//! sweeps methods over shots and seeds (`fewshot_sweep::sweep`, all of `medvlm bench
//! fewshot`). Methods that train an encoder (prompt learning, LoRA, BitFit, partial and full
//! fine-tuning) use the training engine in `medvlm-train`, which does not depend on this crate.
//!
//! The entry point of few-shot adaptation on frozen features is
//! [`method::method_by_name`]: a method fits a classifier from class prompt embeddings and a
//! labelled support set (`examples/adapt_manifest.rs` does it from a manifest and a model).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use medvlm_adapt::method::{method_by_name, AdaptInput, ClassTexts, SupportSet};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // One prompt embedding per class, and four labelled support embeddings (D = 2).
//! let texts = ClassTexts {
//!     class_names: vec!["normal".into(), "effusion".into()],
//!     prompts: vec![
//!         Tensor::new(&[[1f32, 0.0]], &dev)?,
//!         Tensor::new(&[[0f32, 1.0]], &dev)?,
//!     ],
//!     negative_prompts: None,
//! };
//! let feats = Tensor::new(&[[0.9f32, 0.2], [0.8, 0.1], [0.1, 0.9], [0.3, 0.8]], &dev)?;
//! let support = SupportSet::multi_class(feats, vec![0, 0, 1, 1]);
//! let clf = method_by_name("tip-adapter", None)?.fit(&AdaptInput::frozen(&texts, &support))?;
//! let p: Vec<Vec<f32>> = clf.probabilities(&Tensor::new(&[[0.2f32, 0.95]], &dev)?)?.to_vec2()?;
//! assert!(p[0][1] > 0.9); // near the effusion images and prompt
//! # Ok(())
//! # }
//! ```

pub mod artefact;
pub mod encoders;
pub mod feature_cache;
pub mod features;
pub mod fewshot;
pub mod fewshot_sweep;
pub mod method;
pub mod methods;
pub mod pipeline;
pub mod predictor;
pub mod prompts;
pub mod task;
pub mod zero_shot;
