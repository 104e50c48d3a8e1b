//! medvlm-adapt: adapting VLMs. The training engine (losses, optimisers,
//! schedules, checkpoints) and the five adaptation strategies, one file per
//! method under `methods/`, behind the shared traits in `method`.

pub mod checkpoint;
pub mod data;
pub mod feature_cache;
pub mod fewshot;
pub mod finetune;
pub mod lora;
pub mod losses;
pub mod method;
pub mod methods;
pub mod optim;
pub mod pretrain;
pub mod schedule;
pub mod text_section;
pub mod train_config;
pub mod trainer;
