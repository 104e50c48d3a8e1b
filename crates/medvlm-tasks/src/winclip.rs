//! Zero-shot anomaly maps from windows of the patch grid (WinCLIP, Jeong et al., CVPR 2023,
//! "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", section 4.2).
//!
//! A CLIP tower aligns its *pooled* token with text, not its patch tokens one by one, so
//! comparing patch tokens with the state prompts localises poorly. WinCLIP instead embeds
//! small windows of the image the way the tower embeds a whole image: for each window (a
//! square of `k x k` patches) the tower runs on the class token and the window's patch tokens
//! only ([`medvlm_models::ImageEncoder::encode_image_windows`]), and the window's embedding is
//! scored against the normal and abnormal state embeddings like an image
//! ([`abnormal_probabilities`]: softmax over the states at the model's logit scale, the
//! abnormal probability `1 - p(normal)`). A patch's score at one scale is the **harmonic
//! mean** of the scores of the windows that contain it ([`harmonic_aggregate`]: one low
//! score, a window that looks normal, pulls it down); the map is the mean over the scales.
//! The image score is the abnormal probability of the whole image (WinCLIP's zero-shot
//! classification).
//!
//! Defaults ([`WindowConfig::default`]): windows of 2 x 2 and 3 x 3 patches (WinCLIP's small
//! and middle scales on ViT-B/16+'s 15 x 15 grid), stride 1 patch.

use candle_core::{DType, Tensor, D};
use medvlm_models::VisionLanguageModel;
use serde::{Deserialize, Serialize};

use crate::anomaly::{AnomalyError, Result};

/// Window scales of [`zero_shot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowConfig {
    /// Window sides in patches, one map per side (averaged).
    pub scales: Vec<usize>,
    /// Step between windows, in patches.
    pub stride: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            scales: vec![2, 3],
            stride: 1,
        }
    }
}

/// The `side x side` squares of patches on `grid` `(rows, cols)` at `stride` (row-major patch
/// indices), the last row and column of windows flush with the grid's edge so every patch is
/// in at least one window.
pub fn square_windows(grid: (usize, usize), side: usize, stride: usize) -> Result<Vec<Vec<usize>>> {
    let (gh, gw) = grid;
    if side == 0 || side > gh || side > gw {
        return Err(AnomalyError::Invalid(format!(
            "a window of {side} x {side} patches does not fit the {gh} x {gw} patch grid"
        )));
    }
    if stride == 0 {
        return Err(AnomalyError::Invalid(
            "window stride must be at least 1".into(),
        ));
    }
    let starts = |n: usize| {
        let mut s: Vec<usize> = (0..=n - side).step_by(stride).collect();
        if s.last() != Some(&(n - side)) {
            s.push(n - side);
        }
        s
    };
    let mut out = Vec::new();
    for &r in &starts(gh) {
        for &c in &starts(gw) {
            out.push(
                (r..r + side)
                    .flat_map(|y| (c..c + side).map(move |x| y * gw + x))
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Per patch, the harmonic mean of the scores of the windows holding it: `n / sum(1 / s)`
/// over its `n` windows (scores floored at 1e-6). `window_scores[i]` belongs to `windows[i]`.
pub fn harmonic_aggregate(
    window_scores: &[f32],
    windows: &[Vec<usize>],
    n_patches: usize,
) -> Result<Vec<f32>> {
    if window_scores.len() != windows.len() {
        return Err(AnomalyError::Invalid(format!(
            "{} window scores for {} windows",
            window_scores.len(),
            windows.len()
        )));
    }
    let mut inv = vec![0f64; n_patches];
    let mut count = vec![0u32; n_patches];
    for (s, w) in window_scores.iter().zip(windows) {
        for &p in w {
            let slot = inv.get_mut(p).ok_or_else(|| {
                AnomalyError::Invalid(format!("window patch {p} beyond {n_patches} patches"))
            })?;
            *slot += 1.0 / (*s as f64).max(1e-6);
            count[p] += 1;
        }
    }
    inv.iter()
        .zip(&count)
        .enumerate()
        .map(|(p, (&i, &n))| {
            if n == 0 {
                Err(AnomalyError::Invalid(format!("patch {p} is in no window")))
            } else {
                Ok((n as f64 / i) as f32)
            }
        })
        .collect()
}

/// Abnormal probability of each embedding `[M, E]` against the state embeddings `[1 + F, E]`
/// (row 0 the normal state, then one row per abnormal state): both sides L2-normalised,
/// `softmax(scale * cos)` over the states, `1 - p(normal)`.
pub fn abnormal_probabilities(embeds: &Tensor, states: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let (_, e) = embeds.dims2()?;
    let (k, se) = states.dims2()?;
    if k < 2 || se != e {
        return Err(AnomalyError::Invalid(format!(
            "state embeddings {:?} must be a normal and at least one abnormal state of width {e}",
            states.dims()
        )));
    }
    let norm = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        let n = t
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        t.broadcast_div(&n)
    };
    let states = norm(states)?.to_device(embeds.device())?;
    let logits = (norm(embeds)?.matmul(&states.t()?)? * scale)?;
    let p = candle_nn::ops::softmax_last_dim(&logits)?;
    Ok(p.narrow(1, 0, 1)?
        .squeeze(1)?
        .affine(-1.0, 1.0)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?)
}

/// WinCLIP's zero-shot scores of a batch of images.
#[derive(Debug, Clone)]
pub struct WindowScores {
    /// Per image, one score per patch of the grid (row-major), the mean over the scales of
    /// the harmonic aggregation of window scores.
    pub patch_maps: Vec<Vec<f32>>,
    /// Per image, the abnormal probability of the whole image.
    pub image_scores: Vec<f32>,
}

/// WinCLIP's zero-shot patch maps and image scores of `pixels` `[B, 3, S, S]` on the tower's
/// patch `grid`, against the state embeddings `states` `[1 + F, E]` (normal first), at the
/// model's logit scale.
pub fn zero_shot(
    model: &dyn VisionLanguageModel,
    pixels: &Tensor,
    states: &Tensor,
    grid: (usize, usize),
    config: &WindowConfig,
) -> Result<WindowScores> {
    if config.scales.is_empty() {
        return Err(AnomalyError::Invalid("no window scale given".into()));
    }
    let scale = model
        .logit_scale()
        .to_dtype(DType::F32)?
        .exp()?
        .to_scalar::<f32>()? as f64;
    let b = pixels.dim(0)?;
    let n_patches = grid.0 * grid.1;
    let whole = model.encode_image(pixels)?.embeds;
    let image_scores = abnormal_probabilities(&whole, states, scale)?;
    let mut patch_maps = vec![vec![0f32; n_patches]; b];
    for &side in &config.scales {
        let windows = square_windows(grid, side, config.stride)?;
        let emb = model.encode_image_windows(pixels, &windows)?;
        let (_, w, e) = emb.dims3()?;
        let probs = abnormal_probabilities(&emb.reshape((b * w, e))?, states, scale)?;
        for (i, map) in patch_maps.iter_mut().enumerate() {
            let agg = harmonic_aggregate(&probs[i * w..(i + 1) * w], &windows, n_patches)?;
            for (m, a) in map.iter_mut().zip(agg) {
                *m += a / config.scales.len() as f32;
            }
        }
    }
    Ok(WindowScores {
        patch_maps,
        image_scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_grid_and_stay_inside_it() {
        let w = square_windows((4, 5), 2, 1).unwrap();
        assert_eq!(w.len(), 3 * 4);
        assert_eq!(w[0], vec![0, 1, 5, 6]);
        assert_eq!(w.last().unwrap(), &vec![13, 14, 18, 19]);
        // Stride 2 on 5 columns: starts 0, 2 and the flush 3.
        let w = square_windows((4, 5), 2, 2).unwrap();
        assert_eq!(w.len(), 2 * 3);
        assert_eq!(w[2], vec![3, 4, 8, 9]);
        let mut seen = [false; 20];
        w.iter().flatten().for_each(|&p| seen[p] = true);
        assert!(seen.iter().all(|&s| s));
        assert_eq!(
            square_windows((3, 3), 3, 1).unwrap(),
            vec![(0..9).collect::<Vec<_>>()]
        );
        assert!(square_windows((3, 3), 4, 1).is_err());
        assert!(square_windows((3, 3), 0, 1).is_err());
        assert!(square_windows((3, 3), 2, 0).is_err());
    }

    #[test]
    fn harmonic_aggregation_by_hand() {
        // Patch 1 is in both windows: 2 / (1/0.5 + 1/0.25) = 1/3.
        let windows = vec![vec![0, 1], vec![1, 2]];
        let agg = harmonic_aggregate(&[0.5, 0.25], &windows, 3).unwrap();
        assert!((agg[0] - 0.5).abs() < 1e-6);
        assert!((agg[1] - 1.0 / 3.0).abs() < 1e-6);
        assert!((agg[2] - 0.25).abs() < 1e-6);
        assert!(harmonic_aggregate(&[0.5, 0.25], &windows, 4).is_err()); // patch 3 uncovered
        assert!(harmonic_aggregate(&[0.5], &windows, 3).is_err());
        assert!(harmonic_aggregate(&[0.5, 0.5], &[vec![0], vec![7]], 3).is_err());
    }

    #[test]
    fn probabilities_by_hand() {
        let dev = candle_core::Device::Cpu;
        // Normal state along x, one abnormal state along y; embeddings at 0 and 90 degrees
        // (lengths do not matter).
        let states = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let emb = Tensor::new(&[[3f32, 0.0], [0.0, 0.5]], &dev).unwrap();
        let p = abnormal_probabilities(&emb, &states, 2.0).unwrap();
        let e = |a: f32, b: f32| (b.exp()) / (a.exp() + b.exp());
        assert!((p[0] - e(2.0, 0.0)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - e(0.0, 2.0)).abs() < 1e-6, "{p:?}");
        assert!(abnormal_probabilities(&emb, &states.narrow(0, 0, 1).unwrap(), 1.0).is_err());
    }
}
