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
//! WinCLIP+ (few-shot) adds a window-level memory of normal reference images
//! ([`WindowMemory`]): each test window's cosine distance to the nearest reference window of
//! its scale, aggregated the same way.
//!
//! Defaults ([`WindowConfig::default`]): windows of 2 x 2 and 3 x 3 patches (WinCLIP's small
//! and middle scales on ViT-B/16+'s 15 x 15 grid), stride 1 patch.

use candle_core::{DType, Tensor, D};
use medvlm_models::vlm::l2_normalize;
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
    let norm = |t: &Tensor| l2_normalize(&t.to_dtype(DType::F32)?);
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

/// Most window sequences [`window_embeddings`] sends through the tower at once.
const WINDOW_SEQUENCES: usize = 2048;

/// The embeddings of every window of each scale of `config`, `[B, W_s, E]` per scale
/// (L2-normalised, f32 on the CPU), and of the whole images `[B, E]` (likewise).
pub fn window_embeddings(
    model: &dyn VisionLanguageModel,
    pixels: &Tensor,
    grid: (usize, usize),
    config: &WindowConfig,
) -> Result<(Vec<Tensor>, Tensor)> {
    window_embeddings_in_passes(model, pixels, grid, config, WINDOW_SEQUENCES)
}

/// [`window_embeddings`] with at most `max_sequences` window sequences per pass of the tower
/// (at least one window per pass).
pub fn window_embeddings_in_passes(
    model: &dyn VisionLanguageModel,
    pixels: &Tensor,
    grid: (usize, usize),
    config: &WindowConfig,
    max_sequences: usize,
) -> Result<(Vec<Tensor>, Tensor)> {
    if config.scales.is_empty() {
        return Err(AnomalyError::Invalid("no window scale given".into()));
    }
    let cpu = |t: Tensor| -> Result<Tensor> {
        Ok(l2_normalize(
            &t.to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?,
        )?)
    };
    let whole = cpu(model.encode_image(pixels)?.embeds)?;
    // At most WINDOW_SEQUENCES sequences per pass of the tower (a 224 px ViT-B/16 has 169
    // windows of 2 x 2 patches per image), so memory stays bounded for large batches.
    let b = pixels.dim(0)?.max(1);
    let per_pass = (max_sequences / b).max(1);
    let per_scale = config
        .scales
        .iter()
        .map(|&side| {
            let windows = square_windows(grid, side, config.stride)?;
            let parts = windows
                .chunks(per_pass)
                .map(|w| cpu(model.encode_image_windows(pixels, w)?))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 1)?)
        })
        .collect::<Result<_>>()?;
    Ok((per_scale, whole))
}

/// The model's logit scale `exp(logit_scale)`.
pub fn logit_scale(model: &dyn VisionLanguageModel) -> Result<f64> {
    Ok(model
        .logit_scale()
        .to_dtype(DType::F32)?
        .exp()?
        .to_scalar::<f32>()? as f64)
}

/// Per image, the mean over the scales of the harmonic aggregation of per-window scores
/// (`scores[s]` `[B, W_s]` for scale `s` of `config`).
pub(crate) fn aggregate_scales(
    scores: &[Vec<Vec<f32>>],
    grid: (usize, usize),
    config: &WindowConfig,
) -> Result<Vec<Vec<f32>>> {
    if scores.len() != config.scales.len() {
        return Err(AnomalyError::Invalid(format!(
            "window scores of {} scales for a config of {}",
            scores.len(),
            config.scales.len()
        )));
    }
    let n_patches = grid.0 * grid.1;
    let b = scores.first().map_or(0, Vec::len);
    let mut maps = vec![vec![0f32; n_patches]; b];
    for (s, &side) in scores.iter().zip(&config.scales) {
        let windows = square_windows(grid, side, config.stride)?;
        for (map, per_image) in maps.iter_mut().zip(s) {
            let agg = harmonic_aggregate(per_image, &windows, n_patches)?;
            for (m, a) in map.iter_mut().zip(agg) {
                *m += a / config.scales.len() as f32;
            }
        }
    }
    Ok(maps)
}

/// WinCLIP's zero-shot scores from [`window_embeddings`]' output against the state
/// embeddings `states` `[1 + F, E]` (normal first) at logit scale `scale`.
pub fn zero_shot_from(
    per_scale: &[Tensor],
    whole: &Tensor,
    states: &Tensor,
    scale: f64,
    grid: (usize, usize),
    config: &WindowConfig,
) -> Result<WindowScores> {
    let image_scores = abnormal_probabilities(whole, states, scale)?;
    let scores = per_scale
        .iter()
        .map(|emb| {
            let (b, w, e) = emb.dims3()?;
            let p = abnormal_probabilities(&emb.reshape((b * w, e))?, states, scale)?;
            Ok(p.chunks(w).map(<[f32]>::to_vec).collect())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(WindowScores {
        patch_maps: aggregate_scales(&scores, grid, config)?,
        image_scores,
    })
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
    let (per_scale, whole) = window_embeddings(model, pixels, grid, config)?;
    zero_shot_from(
        &per_scale,
        &whole,
        states,
        logit_scale(model)?,
        grid,
        config,
    )
}

/// WinCLIP+'s window-level reference memory (section 4.3): per scale, the embeddings of every
/// window of the normal reference images. A test window scores `1 - max cos` against the
/// windows of its scale (any position); patches aggregate like the zero-shot maps (harmonic
/// mean over their windows, mean over scales).
#[derive(Debug, Clone)]
pub struct WindowMemory {
    /// Per scale of the config, `[M_s, E]` rows of unit length.
    pub per_scale: Vec<Tensor>,
}

impl WindowMemory {
    /// The memory of the normal images' window embeddings (per scale `[N, W_s, E]`, as
    /// [`window_embeddings`] gives them).
    pub fn fit(per_scale: &[Tensor]) -> Result<Self> {
        Ok(Self {
            per_scale: per_scale
                .iter()
                .map(|t| {
                    let (n, w, e) = t.dims3()?;
                    Ok(l2_normalize(&t.reshape((n * w, e))?)?)
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Patch maps of test images from their window embeddings (per scale `[B, W_s, E]`).
    pub fn patch_maps(
        &self,
        per_scale: &[Tensor],
        grid: (usize, usize),
        config: &WindowConfig,
    ) -> Result<Vec<Vec<f32>>> {
        if per_scale.len() != self.per_scale.len() || per_scale.len() != config.scales.len() {
            return Err(AnomalyError::Invalid(format!(
                "{} window scales against a memory of {} (config: {})",
                per_scale.len(),
                self.per_scale.len(),
                config.scales.len()
            )));
        }
        let scores = per_scale
            .iter()
            .zip(&self.per_scale)
            .map(|(emb, mem)| {
                let (b, w, e) = emb.dims3()?;
                let best = l2_normalize(&emb.reshape((b * w, e))?)?
                    .matmul(&mem.t()?)?
                    .max(D::Minus1)?
                    .affine(-1.0, 1.0)?
                    .to_vec1::<f32>()?;
                Ok(best.chunks(w).map(<[f32]>::to_vec).collect())
            })
            .collect::<Result<Vec<_>>>()?;
        aggregate_scales(&scores, grid, config)
    }
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
