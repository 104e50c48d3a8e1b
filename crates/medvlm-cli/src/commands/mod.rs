//! One module per subcommand.

pub mod adapt;
pub mod anomaly;
pub mod bench;
pub mod common;
pub mod convert;
pub mod data;
pub mod detect;
pub mod embed;
pub mod finetune;
pub mod index;
pub mod models;
pub mod multitask;
pub mod papers;
pub mod phantoms;
pub mod predict;
pub mod pretrain;
pub mod progress;
pub mod quickstart;
pub mod register;
pub mod report;
pub mod search;
pub mod segment;
pub mod serve;
pub mod synthesize;
pub mod task_args;
pub mod upscale;
pub mod vqa;
pub mod zero_shot;

/// clap parser of finite numbers that must not be negative (a scale or a weight).
pub fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(x) => Err(format!("{x} must be a finite number >= 0")),
        Err(e) => Err(e.to_string()),
    }
}

/// clap parser of counts that must be at least 1 (`--batch 0` would embed nothing, or loop).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
