//! Times one LoRA fine-tuning step of a ViT-B/16 image tower (BiomedCLIP's: timm
//! `vit_base_patch16_224` + a bias-free projection to 512; random weights, no checkpoint):
//! LoRA rank 8, alpha 16 on every block's fused `qkv` projection (PEFT's `target_modules =
//! ["qkv"]` for timm towers), the base frozen; a batch of 224 px images against fixed unit
//! "text" embeddings, CLIP's image-to-text cross-entropy at logit scale 100; backward;
//! AdamW (lr 1e-4) on the adapters only. `benchmarks/lora_step_pytorch.py` is the same step
//! in PyTorch with PEFT. A measurement tool, not a test:
//!
//!     cargo run --release -p medvlm-train --example lora_step [-- STEPS [BATCH]]
//!
//! Prints the seconds of each step after two warm-up steps, their median, and the process's
//! peak resident set size.
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use medvlm_models::timm_vit::{RandomVitTower, TimmVitConfig};
use medvlm_train::lora::{apply_lora, LoraSpec};
use medvlm_train::optim::{AdamW, AdamWConfig, Gradients, WeightDecayRule};

/// The medvlm binary's allocator and its setting (crates/medvlm-cli/src/main.rs): mimalloc
/// that keeps freed pages for reuse, so the step is timed as `medvlm finetune` runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's `mi_option_purge_delay` (see the binary's `allocator_options`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator (never purge), valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map_or(Ok(5), |s| s.parse())?;
    let batch: usize = args.next().map_or(Ok(8), |s| s.parse())?;
    let dev = Device::Cpu;
    let cfg = TimmVitConfig::from_timm_name("vit_base_patch16_224")
        .ok_or("vit_base_patch16_224 missing from the timm table")?;
    let mut tower = RandomVitTower::new(&cfg, 512, DType::F32, &dev)?;
    let adapters = VarMap::new();
    let spec = LoraSpec {
        targets: vec!["qkv".into()],
        ..LoraSpec::default()
    };
    let params = apply_lora(&mut tower, &spec, &adapters, 0)?;
    let trainable: usize = params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    println!(
        "ViT-B/16 + proj 512: {} parameters, LoRA r={} alpha={} on {} layers ({} trainable), batch {batch}, {} threads",
        tower.num_parameters(),
        spec.rank,
        spec.alpha,
        params.len() / 2,
        trainable,
        rayon::current_num_threads()
    );
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig::default(),
        &WeightDecayRule::default(),
    )?;
    let s = cfg.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &dev)?;
    let text = Tensor::randn(0f32, 1.0, (batch, 512), &dev)?;
    let text = text.broadcast_div(&text.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
    let labels = Tensor::arange(0u32, batch as u32, &dev)?;
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        let t = Instant::now();
        let img = tower.embed(&pixels)?;
        let img = img.broadcast_div(&img.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
        let logits = (img.matmul(&text.t()?)? * 100.0)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let grads = Gradients::from_grad_store(&loss.backward()?, &params);
        opt.step(&grads, 1e-4)?;
        let dt = t.elapsed().as_secs_f64();
        println!(
            "step {step}: {dt:.3} s, loss {:.4}{}",
            loss.to_scalar::<f32>()?,
            if step < 2 { " (warm-up)" } else { "" }
        );
        if step >= 2 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median {:.3} s per step ({:.2} images/s), peak RSS {}",
        times[times.len() / 2],
        batch as f64 / times[times.len() / 2],
        peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    );
    Ok(())
}
