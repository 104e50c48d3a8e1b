//! medvlm-train: the training engine. Losses (CLIP InfoNCE, SigLIP sigmoid, label-aware
//! variants), AdamW with weight-decay rules and gradient accumulation, the warm-up + cosine
//! schedule, the resumable training loop, atomic checkpoints, contrastive (continued)
//! pretraining, fine-tuning modes (frozen towers, partial, BitFit) and LoRA.
//!
//! It knows nothing of adaptation methods: `medvlm-adapt`'s methods and the task heads use it,
//! never the other way round. The entry point of a training run is [`trainer::train`], which
//! drives any [`trainer::TrainModel`] over a [`trainer::BatchSource`]; `medvlm pretrain` builds
//! one with [`pretrain`], `medvlm finetune` with [`finetune`]. The task heads of `medvlm-tasks`
//! train in loops of their own, seeded with [`init`] (parameters) and [`minibatch`] (sample
//! order, AdamW and its schedule). The losses are plain functions:
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use medvlm_train::losses::clip_loss;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let image = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev)?;
//! let matched = Tensor::new(&[[0.9f32, 0.1], [0.1, 0.9]], &dev)?;
//! let swapped = Tensor::new(&[[0.1f32, 0.9], [0.9, 0.1]], &dev)?;
//! let log_scale = Tensor::new(&[100f32.ln()], &dev)?.squeeze(0)?;
//! let good: f32 = clip_loss(&image, &matched, &log_scale)?.to_scalar()?;
//! let bad: f32 = clip_loss(&image, &swapped, &log_scale)?.to_scalar()?;
//! assert!(good < 0.01 && bad > 10.0); // pairs on the diagonal are what InfoNCE rewards
//! # Ok(())
//! # }
//! ```

pub mod bottleneck;
pub mod checkpoint;
pub mod data;
pub mod finetune;
pub mod init;
pub mod lora;
pub mod losses;
pub mod minibatch;
pub mod optim;
pub mod pretrain;
pub mod pretrain_run;
pub mod quickstart;
pub mod schedule;
pub mod text_section;
pub mod train_config;
pub mod trainer;
