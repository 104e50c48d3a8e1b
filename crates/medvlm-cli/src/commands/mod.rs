//! One module per subcommand.

pub mod adapt;
pub mod bench;
pub mod common;
pub mod convert;
pub mod data;
pub mod embed;
pub mod finetune;
pub mod models;
pub mod phantoms;
pub mod predict;
pub mod pretrain;
pub mod quickstart;
pub mod tuning;
pub mod zero_shot;
