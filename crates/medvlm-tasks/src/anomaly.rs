//! Few-shot anomaly detection and localisation with a memory of normal patch features (the
//! few-shot branch of WinCLIP+, Jeong et al., CVPR 2023, and of MVFA, Huang et al., CVPR
//! 2024, on the nearest-neighbour scoring of PatchCore, Roth et al., CVPR 2022).
//!
//! The frozen image tower's patch tokens of a few *normal* images form the memory
//! ([`NormalMemory::fit`]; L2-normalised, optionally subsampled to `max_size` rows with a
//! fixed seed). A test patch's anomaly score is its cosine distance to the nearest memory
//! row, `1 - max_m cos(p, m)` ([`NormalMemory::patch_scores`]); the patch grid is upsampled
//! bilinearly to the image size and smoothed with a Gaussian (sigma 4 px, as PatchCore) into
//! an anomaly map ([`anomaly_maps`]); the image score is the map's maximum. A threshold chosen
//! on normal calibration images ([`Threshold::on_normals`]: the score that at most a given
//! share of them exceed) turns the score into a decision.
//!
//! Defaults ([`MemoryConfig::default`]): every patch of the normal images kept up to 20,000
//! rows (then a seeded random subset), Gaussian sigma 4 px, threshold at a 5 % false-positive
//! rate on the calibration normals.

use candle_core::{DType, Device, Tensor, D};
use medvlm_models::vlm::l2_normalize;
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Errors of the anomaly module.
#[derive(Debug, thiserror::Error)]
pub enum AnomalyError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, AnomalyError>;

/// Settings of the memory and the maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Most memory rows kept (a seeded random subset beyond it).
    pub max_size: usize,
    /// Seed of the subset.
    pub seed: u64,
    /// Gaussian smoothing of the upsampled map, in pixels (0: none).
    pub sigma: f64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_size: 20_000,
            seed: 0,
            sigma: 4.0,
        }
    }
}

/// L2-normalised patch features of normal images.
#[derive(Debug, Clone)]
pub struct NormalMemory {
    /// `[M, D]` rows of unit length.
    pub features: Tensor,
    /// The patch grid `(rows, cols)` the features came from.
    pub grid: (usize, usize),
    /// Settings.
    pub config: MemoryConfig,
}

impl NormalMemory {
    /// The memory of normal images' patch tokens `[N, P, D]` on a `grid` (`P = rows * cols`).
    pub fn fit(
        normal_patches: &Tensor,
        grid: (usize, usize),
        config: MemoryConfig,
    ) -> Result<Self> {
        let (n, p, d) = normal_patches.dims3()?;
        if n == 0 || p != grid.0 * grid.1 {
            return Err(AnomalyError::Invalid(format!(
                "normal patch tokens {:?} do not fit a {}x{} grid of at least one image",
                normal_patches.dims(),
                grid.0,
                grid.1
            )));
        }
        if config.max_size == 0 {
            return Err(AnomalyError::Invalid("max_size must be at least 1".into()));
        }
        let mut rows = normal_patches.to_dtype(DType::F32)?.reshape((n * p, d))?;
        if n * p > config.max_size {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            let mut keep: Vec<u32> = sample(&mut rng, n * p, config.max_size)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            keep.sort_unstable();
            let idx = Tensor::new(keep.as_slice(), rows.device())?;
            rows = rows.index_select(&idx, 0)?;
        }
        Ok(Self {
            features: l2_normalize(&rows)?,
            grid,
            config,
        })
    }

    /// Anomaly score of every patch of `patches` `[N, P, D]`: the cosine distance to the
    /// nearest memory row, `[N, P]`.
    pub fn patch_scores(&self, patches: &Tensor) -> Result<Tensor> {
        let (n, p, d) = patches.dims3()?;
        let (_, md) = self.features.dims2()?;
        if p != self.grid.0 * self.grid.1 || d != md {
            return Err(AnomalyError::Invalid(format!(
                "patch tokens {:?} do not match the memory's {}x{} grid of width {md}",
                patches.dims(),
                self.grid.0,
                self.grid.1
            )));
        }
        let q = l2_normalize(&patches.to_dtype(DType::F32)?.reshape((n * p, d))?)?;
        // In chunks of queries, so the similarity matrix stays small.
        let chunk = 1024;
        let mut best = Vec::with_capacity(n * p);
        let mem_t = self.features.t()?.contiguous()?;
        let mut start = 0;
        while start < n * p {
            let len = chunk.min(n * p - start);
            let sim = q.narrow(0, start, len)?.matmul(&mem_t)?;
            best.push(sim.max(D::Minus1)?);
            start += len;
        }
        let best = Tensor::cat(&best, 0)?;
        Ok(best.affine(-1.0, 1.0)?.reshape((n, p))?)
    }
}

/// A 1-D Gaussian kernel of `sigma` pixels, truncated at 4 sigma (as scipy's
/// `gaussian_filter`), normalised to sum 1.
fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5).floor() as i64;
    let k: Vec<f64> = (-radius..=radius)
        .map(|x| (-(x * x) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.iter().map(|v| (v / s) as f32).collect()
}

/// Separable Gaussian blur of one `h x w` map with reflected borders.
fn blur(map: &[f32], h: usize, w: usize, sigma: f64) -> Vec<f32> {
    if sigma <= 0.0 {
        return map.to_vec();
    }
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let reflect = |i: i64, n: usize| -> usize {
        let n = n as i64;
        let mut i = i;
        // scipy's 'reflect' mode: d c b a | a b c d | d c b a
        while i < 0 || i >= n {
            if i < 0 {
                i = -i - 1;
            }
            if i >= n {
                i = 2 * n - i - 1;
            }
        }
        i as usize
    };
    let mut tmp = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(j, kv)| kv * map[y * w + reflect(x as i64 + j as i64 - r, w)])
                .sum();
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(j, kv)| kv * tmp[reflect(y as i64 + j as i64 - r, h) * w + x])
                .sum();
        }
    }
    out
}

/// Anomaly maps `[N, size, size]` (row-major, one `Vec` per image) from patch scores `[N, P]`
/// on `grid`: bilinear upsampling (pixel centres aligned, as `align_corners=False`) and
/// Gaussian smoothing of `sigma` pixels.
pub fn anomaly_maps(
    patch_scores: &Tensor,
    grid: (usize, usize),
    size: usize,
    sigma: f64,
) -> Result<Vec<Vec<f32>>> {
    let (n, p) = patch_scores.dims2()?;
    if p != grid.0 * grid.1 || size == 0 {
        return Err(AnomalyError::Invalid(format!(
            "patch scores {:?} do not fit a {}x{} grid (or size 0)",
            patch_scores.dims(),
            grid.0,
            grid.1
        )));
    }
    let scores: Vec<f32> = patch_scores
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let (gh, gw) = grid;
    let sample = |g: &[f32], fy: f64, fx: f64| -> f32 {
        let y = (fy - 0.5).clamp(0.0, (gh - 1) as f64);
        let x = (fx - 0.5).clamp(0.0, (gw - 1) as f64);
        let (y0, x0) = (y.floor() as usize, x.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(gh - 1), (x0 + 1).min(gw - 1));
        let (ty, tx) = ((y - y0 as f64) as f32, (x - x0 as f64) as f32);
        let top = g[y0 * gw + x0] * (1.0 - tx) + g[y0 * gw + x1] * tx;
        let bottom = g[y1 * gw + x0] * (1.0 - tx) + g[y1 * gw + x1] * tx;
        top * (1.0 - ty) + bottom * ty
    };
    Ok((0..n)
        .map(|i| {
            let g = &scores[i * p..(i + 1) * p];
            let mut map = vec![0f32; size * size];
            for y in 0..size {
                for x in 0..size {
                    let fy = (y as f64 + 0.5) * gh as f64 / size as f64;
                    let fx = (x as f64 + 0.5) * gw as f64 / size as f64;
                    map[y * size + x] = sample(g, fy, fx);
                }
            }
            blur(&map, size, size, sigma)
        })
        .collect())
}

/// Image scores: the maximum of each map.
pub fn image_scores(maps: &[Vec<f32>]) -> Vec<f32> {
    maps.iter()
        .map(|m| m.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect()
}

/// A decision threshold on image scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// Scores above it are called anomalous.
    pub value: f32,
    /// The share of calibration normals allowed above it.
    pub target_false_positive_rate: f64,
    /// Calibration normals used.
    pub n_calibration: usize,
}

impl Threshold {
    /// The smallest score that at most `fpr` of the normal calibration scores exceed: the
    /// `ceil((1 - fpr) * n)`-th smallest (so the calibration FPR is at most `fpr`).
    pub fn on_normals(normal_scores: &[f32], fpr: f64) -> Result<Self> {
        if normal_scores.is_empty() {
            return Err(AnomalyError::Invalid(
                "no normal calibration images to choose the threshold on".into(),
            ));
        }
        if !(0.0..1.0).contains(&fpr) {
            return Err(AnomalyError::Invalid(format!(
                "false-positive rate {fpr} is not in [0, 1)"
            )));
        }
        if normal_scores.iter().any(|s| !s.is_finite()) {
            return Err(AnomalyError::Invalid(
                "a calibration score is not finite".into(),
            ));
        }
        let mut s = normal_scores.to_vec();
        s.sort_by(f32::total_cmp);
        let n = s.len();
        let k = (((1.0 - fpr) * n as f64).ceil() as usize).clamp(1, n);
        Ok(Self {
            value: s[k - 1],
            target_false_positive_rate: fpr,
            n_calibration: n,
        })
    }

    /// Whether each score is called anomalous.
    pub fn decide(&self, scores: &[f32]) -> Vec<bool> {
        scores.iter().map(|&s| s > self.value).collect()
    }
}

/// A device-independent helper for tests and callers: patch tokens from a row-major buffer.
pub fn patches_from(buf: &[f32], n: usize, p: usize, d: usize) -> Result<Tensor> {
    Ok(Tensor::from_slice(buf, (n, p, d), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_keeps_the_calibration_fpr_at_most_the_target() {
        let normals: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let t = Threshold::on_normals(&normals, 0.1).unwrap();
        // ceil(0.9 * 20) = 18th smallest = 17: two of twenty (10 %) are above.
        assert_eq!(t.value, 17.0);
        let called = t.decide(&normals).iter().filter(|&&b| b).count();
        assert_eq!(called, 2);
        assert!(Threshold::on_normals(&[], 0.1).is_err());
        assert!(Threshold::on_normals(&normals, 1.0).is_err());
    }

    #[test]
    fn gaussian_blur_keeps_a_constant_map_and_its_mass() {
        let map = vec![2.0f32; 16 * 12];
        let b = blur(&map, 16, 12, 2.0);
        assert!(b.iter().all(|v| (v - 2.0).abs() < 1e-5));
        let mut spike = vec![0f32; 21 * 21];
        spike[10 * 21 + 10] = 1.0;
        let b = blur(&spike, 21, 21, 1.5);
        assert!((b.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(b[10 * 21 + 10] > b[10 * 21 + 12]);
    }
}
