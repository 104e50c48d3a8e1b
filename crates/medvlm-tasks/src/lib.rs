//! medvlm-tasks: task heads on the encoders of `medvlm-models`, trained with the engine of
//! `medvlm-train`, one module per task. Now: text-guided segmentation
//! ([`segmentation`]: a CLIPSeg-style FiLM decoder on frozen patch tokens, and the
//! training-free patch-text similarity baseline; [`segmentation_pipeline`]: the task read
//! from a manifest of images and masks, training, evaluation per finding and modality, the
//! saved segmenter and prediction on image files and NIfTI volumes), and few-shot anomaly
//! detection and localisation ([`anomaly`]: a memory of normal patch features,
//! nearest-neighbour maps, a threshold chosen on normal images), and deformable registration
//! ([`registration`]: a VoxelMorph-style U-Net predicting a velocity field, scaling and
//! squaring, a differentiable bilinear spatial transformer and the losses;
//! [`registration_pipeline`]: pairs from a manifest, training, evaluation against the known
//! field, the saved registrar and its application to image files).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use medvlm_tasks::segmentation::{SegHeadConfig, TextSegHead};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // A ViT with 768-wide patch tokens on a 14x14 grid at 224 px, 512-wide text embeddings.
//! let cfg = SegHeadConfig::new(768, 512, (14, 14), 224);
//! let varmap = VarMap::new();
//! let head = TextSegHead::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
//! let patches = Tensor::zeros((2, 196, 768), DType::F32, &dev)?;
//! let text = Tensor::zeros((2, 512), DType::F32, &dev)?;
//! let grey = Tensor::zeros((2, 1, 224, 224), DType::F32, &dev)?;
//! assert_eq!(head.forward(&patches, &text, &grey)?.dims(), &[2, 1, 224, 224]);
//! // A grid that does not divide the input by a power of two is refused.
//! assert!(SegHeadConfig::new(768, 512, (14, 14), 200).upsample_steps().is_err());
//! # Ok(())
//! # }
//! ```

pub mod anomaly;
pub mod anomaly_pipeline;
pub mod registration;
pub mod registration_pipeline;
pub mod segmentation;
pub mod segmentation_pipeline;
