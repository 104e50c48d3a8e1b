//! medvlm-models: vision-language model families on candle.
//!
//! - [`clip`]: HF `CLIPModel` (OpenAI CLIP, PubMedCLIP, PLIP);
//! - [`siglip`]: HF `SiglipModel` (SigLIP, MedSigLIP);
//! - [`biomedclip`]: open_clip layout with a timm ViT ([`timm_vit`]) and an HF
//!   BERT text tower ([`bert`]);
//! - [`openclip`]: open_clip layout with CLIP's ModifiedResNet ([`modified_resnet`], on the
//!   channels-last convolutions of [`conv`]) and open_clip's text transformer;
//! - [`weights`]: safetensors / PyTorch pickle loading with name/shape checks;
//! - [`vlm`]: the common trait and the extension points for adaptation;
//! - [`linear`]: wrappable linear layers (LoRA, adapters, BitFit);
//! - [`transformer`]: the pre-norm encoder shared by CLIP and SigLIP;
//! - [`tokenizer`], [`preprocess`]: text and image inputs from each model's own files;
//! - [`source`], [`presets`], [`model_dir`]: where models come from, loading and saving.
//!
//! Typical use: `load_model("pubmedclip", &LoadOptions::default())` returns a
//! [`LoadedModel`] (model + tokenizer + preprocessing) for any family, and [`embed`] turns
//! image files and texts into embeddings with it.
//!
//! - [`embed`]: image files (PNG ... DICOM, NIfTI) and texts to embeddings.
//! - [`random_towers`] (and [`timm_vit::RandomVitTower`]): full-size towers with random
//!   weights for `medvlm bench embed`.
//!
//! ```
//! use medvlm_models::{embed::embed_texts, load_model, LoadOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The tiny random-weight CLIP of the parity tests (a folder in HF CLIPModel layout).
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip");
//! let m = load_model(dir, &LoadOptions::default())?;
//! let texts = ["a chest radiograph".to_string(), "a brain MRI".to_string()];
//! let e = embed_texts(&m, &texts, 8, &candle_core::Device::Cpu)?;
//! assert_eq!(e.dims(), &[2, m.model.embed_dim()]);
//! # Ok(())
//! # }
//! ```

pub mod attention;
pub mod bert;
pub mod bf16_gemm;
pub mod biomedclip;
pub mod clip;
pub mod compute;
pub mod conv;
pub mod embed;
pub mod error;
pub mod fastmath;
pub mod fused;
pub mod gpt2;
pub mod hub;
pub mod linear;
pub mod model_dir;
pub mod modified_resnet;
pub mod openclip;
pub mod preprocess;
pub mod presets;
pub mod random_towers;
pub mod siglip;
pub mod source;
pub mod timm_vit;
pub mod tokenizer;
pub mod tokenizer_convert;
pub mod transformer;
pub mod vlm;
pub mod weights;

pub use error::{ModelError, Result};
pub use linear::{Int8Packing, LinearLayer, LinearLayers, LinearWrapper};
pub use model_dir::{load_model, load_model_dir, LoadOptions, LoadedModel};
pub use preprocess::PreprocessConfig;
pub use tokenizer::{Padding, TextTokenizer};
pub use vlm::{
    Family, ImageEncoder, TextEncoder, TextOutput, TextPrompt, TokenBatch, VisionLanguageModel,
    VisionOutput, VisualPrompts,
};
pub use weights::{LoadMode, WeightFile};
