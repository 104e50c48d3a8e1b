//! Times one contrastive training step (forward through both towers, a CLIP loss, backward) of
//! the `medvlm quickstart` model size, batch 64, 64 px images, 24-token texts: `vit` = CLIP with
//! 3-layer towers of width 64 and 8 px patches (`--image-tower vit`); `resnet` = the default,
//! CLIP's ModifiedResNet (one block per stage, width 32, batch norm on batch statistics) with
//! the same 3-layer text tower. A measurement tool, not a test:
//!
//!     cargo run --release -p medvlm-models --example train_step [-- STEPS [vit|resnet]]
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::modified_resnet::ModifiedResNetConfig;
use medvlm_models::openclip::{OpenClipConfig, OpenClipResNet, OpenClipTextConfig, TextPool};
use medvlm_models::{ImageEncoder, TokenBatch, VisionLanguageModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let dev = Device::Cpu;
    let tower = std::env::args().nth(2).unwrap_or_else(|| "vit".into());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut cfg = ClipConfig::tiny(130, 64, 8);
    cfg.text_config.num_hidden_layers = 3;
    cfg.vision_config.num_hidden_layers = 3;
    cfg.text_config.max_position_embeddings = 80;
    let model: Box<dyn VisionLanguageModel> = match tower.as_str() {
        "vit" => Box::new(ClipModel::load(vb, &cfg)?),
        "resnet" => {
            let t = &cfg.text_config;
            let oc = OpenClipConfig {
                embed_dim: cfg.projection_dim,
                quick_gelu: true,
                vision: ModifiedResNetConfig {
                    layers: vec![1, 1, 1, 1],
                    width: 32,
                    image_size: 64,
                    head_width: 64,
                    output_dim: cfg.projection_dim,
                },
                text: OpenClipTextConfig {
                    context_length: 80,
                    vocab_size: t.vocab_size,
                    width: t.hidden_size,
                    heads: t.num_attention_heads,
                    layers: 3,
                    mlp_ratio: (t.intermediate_size / t.hidden_size) as f64,
                    pool: TextPool::Eos(3),
                },
                mean: [0.5; 3],
                std: [0.5; 3],
            };
            let m = OpenClipResNet::load(vb, &oc)?;
            m.set_training(true);
            Box::new(m)
        }
        other => return Err(format!("image tower {other:?}: vit or resnet").into()),
    };
    println!("{tower}: projection {}", model.embed_dim());
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
