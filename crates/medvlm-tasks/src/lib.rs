//! medvlm-tasks: task heads on the encoders of `medvlm-models`, trained with the engine of
//! `medvlm-train`, one module per task (and a `_pipeline` module that reads the task from a
//! manifest, trains, evaluates beside its baselines, saves the artefact and predicts on files):
//!
//! - text-guided segmentation ([`segmentation`], [`segmentation_pipeline`]): a CLIPSeg-style
//!   FiLM decoder on frozen patch tokens and the training-free patch-text similarity baseline;
//!   masks for image files and NIfTI volumes;
//! - few-shot anomaly detection and localisation ([`anomaly`], [`anomaly_pipeline`]): a memory
//!   of normal patch features, nearest-neighbour maps, a threshold chosen on normal images;
//! - detection and phrase grounding ([`detection`], [`detection_pipeline`]): an OWL-ViT-style
//!   box head with Hungarian matching and focal + L1 + GIoU losses, against the heatmap and
//!   centre-box baselines, scored with COCO mAP and grounding Acc@0.5;
//! - report generation ([`report_generation`], [`report_findings`], [`report_pipeline`]): a
//!   ClipCap prefix mapping into a GPT-2-layout decoder with a PromptMRG-style diagnosis
//!   prompt from a findings classifier, scored with language and clinical-efficacy metrics
//!   against the nearest-neighbour-report baseline;
//! - deformable registration ([`registration`], [`registration_pipeline`]): a
//!   VoxelMorph-style U-Net predicting a velocity field, scaling and squaring, a
//!   differentiable bilinear spatial transformer, scored with EPE against the known field,
//!   Dice of warped masks and folding;
//! - super-resolution of grey images ([`super_resolution`], [`super_resolution_pipeline`]): an
//!   EDSR-style residual network over bicubic upsampling, x2 and x4, scored with PSNR/SSIM
//!   against bicubic, optionally conditioned on the report's text embedding;
//! - visual question answering ([`vqa`], [`vqa_pipeline`], [`vqa_generative`]):
//!   PubMedCLIP-style classification over the training answers from frozen image and
//!   question embeddings, and generative answers from the report decoder, scored VQA-RAD's
//!   way (closed, open, overall accuracy) against question-only and majority baselines;
//! - text-conditioned image synthesis ([`synthesis`], [`synthesis_pipeline`]): a small
//!   conditional DDPM on the VLM's prompt embedding with classifier-free guidance and a DDIM
//!   sampler, scored with FID/KID in the VLM's feature space, prompt alignment and a
//!   real-trained classifier on generated images;
//! - text conditioning shared by registration and super-resolution ([`text_condition`]): the
//!   frozen VLM text tower, the prompt-length check and a zero-initialised FiLM layer;
//! - multi-task learning ([`multitask`], [`multitask_pipeline`]): one shared trunk on the
//!   frozen image embedding with findings-classification, VQA and report heads trained
//!   jointly with per-task loss weights, compared with single-task models of the same shape.
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
mod card;
pub mod detection;
pub mod detection_pipeline;
pub mod multitask;
pub mod multitask_pipeline;
pub mod registration;
pub mod registration_pipeline;
pub mod report_findings;
pub mod report_generation;
pub mod report_pipeline;
pub mod segmentation;
pub mod segmentation_pipeline;
pub mod super_resolution;
pub mod super_resolution_pipeline;
pub mod synthesis;
pub mod synthesis_pipeline;
pub mod text_condition;
pub mod vqa;
pub mod vqa_generative;
pub mod vqa_pipeline;
pub mod winclip;
pub mod window_mil;
