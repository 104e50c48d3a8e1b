//! Weak supervision over WinCLIP's windows: a window scorer trained from image-level labels
//! only (normal / abnormal), by multiple-instance learning (an image is a bag of windows,
//! abnormal when at least one window is; Ilse et al., ICML 2018, frame the pooling choices).
//!
//! Each window embedding `e` of [`crate::winclip::window_embeddings`] (unit length) gets the
//! logit `s = v·e + b`. `v` starts at the zero-shot comparison, `scale · (a - n)` with `a` the
//! mean abnormal-state and `n` the normal-state text embedding (unit length), so that before
//! training `sigmoid(s)` is WinCLIP's two-state abnormal probability; training moves `v` and
//! `b` (a residual on the text side, the image tower frozen). An image's logit is the
//! log-mean-exp of its windows' logits over every scale (a smooth maximum: one confident
//! window is enough, many are more), trained with binary cross-entropy against the image
//! label (AdamW, full batch). The map: `sigmoid(s)` per window, aggregated per patch as the
//! zero-shot maps (harmonic mean over its windows, mean over scales); the image score is the
//! sigmoid of the image logit.
//!
//! Defaults ([`WindowMilConfig::default`]): 300 steps, lr 1e-2, no weight decay.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::anomaly::{AnomalyError, Result};
use crate::winclip::{aggregate_scales, WindowConfig};

/// Training settings of [`train_window_scorer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowMilConfig {
    /// Full-batch AdamW steps.
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
}

impl Default for WindowMilConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            lr: 1e-2,
        }
    }
}

/// A trained window scorer: `s = direction · e + bias`.
#[derive(Debug, Clone)]
pub struct WindowScorer {
    /// `[E]`.
    pub direction: Tensor,
    /// Scalar `[1]`.
    pub bias: Tensor,
}

/// The starting direction: `scale · (mean abnormal - normal)` from the state embeddings
/// `[1 + F, E]` (row 0 normal), each row L2-normalised first.
pub fn zero_shot_direction(states: &Tensor, scale: f64) -> Result<Tensor> {
    let (k, _) = states.dims2()?;
    if k < 2 {
        return Err(AnomalyError::Invalid(
            "the state embeddings need a normal and at least one abnormal row".into(),
        ));
    }
    let s =
        medvlm_models::vlm::l2_normalize(&states.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
    let normal = s.get(0)?;
    let abnormal = s.narrow(0, 1, k - 1)?.mean(0)?;
    Ok(((abnormal - normal)? * scale)?)
}

/// Window logits `[N, W_s]` of one scale's embeddings `[N, W_s, E]`.
fn logits(direction: &Tensor, bias: &Tensor, emb: &Tensor) -> candle_core::Result<Tensor> {
    let (n, w, e) = emb.dims3()?;
    emb.reshape((n * w, e))?
        .matmul(&direction.unsqueeze(1)?)?
        .reshape((n, w))?
        .broadcast_add(bias)
}

/// Image logits `[N]`: the log-mean-exp of every window's logit over the scales.
fn image_logits(
    direction: &Tensor,
    bias: &Tensor,
    per_scale: &[Tensor],
) -> candle_core::Result<Tensor> {
    let all = per_scale
        .iter()
        .map(|e| logits(direction, bias, e))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let all = Tensor::cat(&all, 1)?;
    let w = all.dim(1)? as f64;
    // log(mean(exp(x))) = max + log(sum(exp(x - max))) - log(W)
    let max = all.max_keepdim(1)?.detach();
    let lse = all.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()?;
    (lse + max)?.affine(1.0, -w.ln())?.squeeze(1)
}

/// Trains the scorer on the window embeddings (per scale `[N, W_s, E]`, unit rows) of `N`
/// images with their labels (`true`: abnormal), from `init` `[E]` (see
/// [`zero_shot_direction`]). Returns it and the loss of each step.
pub fn train_window_scorer(
    per_scale: &[Tensor],
    labels: &[bool],
    init: &Tensor,
    config: &WindowMilConfig,
) -> Result<(WindowScorer, Vec<f32>)> {
    let n = per_scale.first().map_or(0, |t| t.dims()[0]);
    if per_scale.is_empty() || n == 0 || labels.len() != n {
        return Err(AnomalyError::Invalid(format!(
            "{} labels for {n} images' windows",
            labels.len()
        )));
    }
    if labels.iter().all(|&l| l) || labels.iter().all(|&l| !l) {
        return Err(AnomalyError::Invalid(
            "weak supervision needs both normal and abnormal training images".into(),
        ));
    }
    let direction = Var::from_tensor(&init.to_dtype(DType::F32)?)?;
    let bias = Var::zeros(1, DType::F32, &Device::Cpu)?;
    let params = vec![
        ("direction".to_string(), direction.clone()),
        ("bias".to_string(), bias.clone()),
    ];
    let mut opt = medvlm_train::minibatch::adamw(params.clone(), 0.0)
        .map_err(|e| AnomalyError::Invalid(format!("optimiser: {e}")))?;
    let target = Tensor::from_vec(
        labels.iter().map(|&l| l as u8 as f32).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let mut losses = Vec::with_capacity(config.steps);
    for _ in 0..config.steps {
        let z = image_logits(direction.as_tensor(), bias.as_tensor(), per_scale)?;
        let loss = medvlm_train::losses::bce_with_logits(&z, &target)
            .map_err(|e| AnomalyError::Invalid(format!("loss: {e}")))?;
        let grads = medvlm_train::optim::Gradients::from_grad_store(&loss.backward()?, &params);
        opt.step(&grads, config.lr)
            .map_err(|e| AnomalyError::Invalid(format!("optimiser: {e}")))?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok((
        WindowScorer {
            direction: direction.as_tensor().detach(),
            bias: bias.as_tensor().detach(),
        },
        losses,
    ))
}

impl WindowScorer {
    /// Per image, the patch map (mean over scales of the harmonic aggregation of the windows'
    /// probabilities) and the image score (sigmoid of the image logit).
    pub fn score(
        &self,
        per_scale: &[Tensor],
        grid: (usize, usize),
        config: &WindowConfig,
    ) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let probs = per_scale
            .iter()
            .map(|emb| {
                Ok(
                    candle_nn::ops::sigmoid(&logits(&self.direction, &self.bias, emb)?)?
                        .to_vec2::<f32>()?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let maps = aggregate_scales(&probs, grid, config)?;
        let scores =
            candle_nn::ops::sigmoid(&image_logits(&self.direction, &self.bias, per_scale)?)?
                .to_vec1::<f32>()?;
        Ok((maps, scores))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two scales of 4 and 1 windows in 2-D; abnormal images have one window along `y`.
    fn toy(n: usize) -> (Vec<Tensor>, Vec<bool>) {
        let mut a = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let abnormal = i % 2 == 1;
            labels.push(abnormal);
            for w in 0..4 {
                let hit = abnormal && w == i % 4;
                a.extend_from_slice(if hit { &[0.0f32, 1.0] } else { &[1.0, 0.0] });
            }
        }
        let small = Tensor::from_vec(a, (n, 4, 2), &Device::Cpu).unwrap();
        let big = Tensor::ones((n, 1, 2), DType::F32, &Device::Cpu)
            .unwrap()
            .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)
            .unwrap();
        (vec![small, big], labels)
    }

    #[test]
    fn image_logit_is_the_log_mean_exp_of_the_windows() {
        let (emb, _) = toy(2);
        let d = Tensor::new(&[0.0f32, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        let z = image_logits(&d, &b, &emb)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Image 1 (abnormal): windows 0.5 (x3), 3.5 (one along y), and 0.5 + 3/sqrt(2).
        let s = [0.5f64, 0.5, 0.5, 3.5, 0.5 + 3.0 / 2f64.sqrt()];
        let want = (s.iter().map(|v| v.exp()).sum::<f64>() / 5.0).ln();
        assert!((z[1] as f64 - want).abs() < 1e-5, "{} vs {want}", z[1]);
    }

    #[test]
    fn training_from_image_labels_finds_the_abnormal_windows() {
        let (emb, labels) = toy(16);
        // Start from a direction that knows nothing.
        let init = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let (scorer, losses) =
            train_window_scorer(&emb, &labels, &init, &WindowMilConfig::default()).unwrap();
        assert!(losses.last().unwrap() < &(losses[0] * 0.5), "{losses:?}");
        let d = scorer.direction.to_vec1::<f32>().unwrap();
        assert!(d[1] > d[0] + 1.0, "{d:?}");
        // Windows: a 2x2 grid of patches with side-1 windows and one side-2 window.
        let cfg = WindowConfig {
            scales: vec![1, 2],
            stride: 1,
        };
        let (maps, scores) = scorer.score(&emb, (2, 2), &cfg).unwrap();
        // Image 1's abnormal window is patch 1: its patch scores highest.
        let m = &maps[1];
        assert!(m[1] > m[0] && m[1] > m[2] && m[1] > m[3], "{m:?}");
        assert!(scores[1] > scores[0] && scores[3] > scores[2]);
        assert!(
            train_window_scorer(&emb, &[true; 16], &init, &WindowMilConfig::default()).is_err()
        );
    }

    #[test]
    fn the_start_is_the_zero_shot_comparison() {
        let states = Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0], [0.0, 3.0]], &Device::Cpu).unwrap();
        let d = zero_shot_direction(&states, 10.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(d, vec![-10.0, 10.0]);
        assert!(zero_shot_direction(&states.narrow(0, 0, 1).unwrap(), 1.0).is_err());
    }
}
