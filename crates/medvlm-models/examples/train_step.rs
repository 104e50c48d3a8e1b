//! Times one contrastive training step (forward through both towers, a CLIP loss, backward) of
//! the `medvlm quickstart` model size: CLIP with 3-layer towers of width 64, 64 px images in
//! 8 px patches, batch 64, 24-token texts. A measurement tool, not a test:
//!
//!     cargo run --release -p medvlm-models --example train_step [-- STEPS]
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::vlm::{ImageEncoder, TextEncoder};
use medvlm_models::TokenBatch;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let dev = Device::Cpu;
    let mut cfg = ClipConfig::tiny(130, 64, 8);
    cfg.text_config.num_hidden_layers = 3;
    cfg.vision_config.num_hidden_layers = 3;
    cfg.text_config.max_position_embeddings = 80;
    let varmap = VarMap::new();
    let model = ClipModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let (b, len) = (64usize, 24usize);
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 64, 64), &dev)?;
    let ids: Vec<u32> = (0..b * len).map(|i| 3 + (i * 7919 % 120) as u32).collect();
    let tokens = TokenBatch {
        input_ids: Tensor::from_vec(ids, (b, len), &dev)?,
        attention_mask: Tensor::ones((b, len), DType::U32, &dev)?,
    };
    let labels = Tensor::arange(0u32, b as u32, &dev)?;
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        let t = Instant::now();
        let img = model.encode_image(&pixels)?.embeds;
        let txt = model.encode_text(&tokens)?.embeds;
        let img = img.broadcast_div(&img.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
        let txt = txt.broadcast_div(&txt.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
        let logits = (img.matmul(&txt.t()?)? * 14.3)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let grads = loss.backward()?;
        let n = varmap
            .all_vars()
            .iter()
            .filter(|v| grads.get(v).is_some())
            .count();
        if step >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
        if step == 0 {
            println!("{} trainable tensors receive gradients", n);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "forward + backward, batch {b}: median {:.1} ms, min {:.1} ms over {steps} steps",
        times[times.len() / 2] * 1e3,
        times[0] * 1e3
    );
    Ok(())
}
