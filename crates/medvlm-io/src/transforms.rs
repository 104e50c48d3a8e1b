//! Image transforms on windowed planes (values in `[0, 1]`, HWC): aspect-preserving
//! resize with pad or crop, centre and random crops, flips, small rotations,
//! Gaussian blur, brightness/contrast/gamma jitter and Gaussian noise.
//!
//! Two pipelines: [`EvalTransform`] (deterministic resize only) and
//! [`TrainTransform`] (random augmentation). Randomness is seeded per sample:
//! [`TrainTransform::apply_seeded`]`(plane, seed, index)` draws from a ChaCha8
//! stream keyed by `(seed, index)`, so results do not depend on thread scheduling.
//! Resizing uses the `image` crate's triangle (bilinear, antialiased when
//! shrinking) filter.

use image::{ImageBuffer, Luma, Rgb};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{IoError, Result};
use crate::medimage::Plane;

/// How an aspect-preserving resize reaches a square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fit {
    /// Scale the longer side to the target and pad the rest with 0 (black), centred.
    #[default]
    Pad,
    /// Scale the shorter side to the target and cut the rest, centred.
    Crop,
    /// Ignore the aspect ratio.
    Stretch,
}

/// Resize a plane to `rows x cols` (triangle filter).
pub fn resize(plane: &Plane, rows: usize, cols: usize) -> Result<Plane> {
    if rows == 0 || cols == 0 {
        return Err(IoError::InvalidArgument(format!(
            "cannot resize to {rows}x{cols}"
        )));
    }
    if plane.rows == rows && plane.cols == cols {
        return Ok(plane.clone());
    }
    let filter = image::imageops::FilterType::Triangle;
    let (w, h) = (plane.cols as u32, plane.rows as u32);
    let data = match plane.channels {
        1 => {
            let buf: ImageBuffer<Luma<f32>, Vec<f32>> =
                ImageBuffer::from_raw(w, h, plane.data.clone())
                    .ok_or_else(|| IoError::InvalidArgument("plane size mismatch".into()))?;
            image::imageops::resize(&buf, cols as u32, rows as u32, filter).into_raw()
        }
        3 => {
            let buf: ImageBuffer<Rgb<f32>, Vec<f32>> =
                ImageBuffer::from_raw(w, h, plane.data.clone())
                    .ok_or_else(|| IoError::InvalidArgument("plane size mismatch".into()))?;
            image::imageops::resize(&buf, cols as u32, rows as u32, filter).into_raw()
        }
        c => {
            return Err(IoError::InvalidArgument(format!(
                "resize needs 1 or 3 channels, got {c}"
            )))
        }
    };
    Plane::new(rows, cols, plane.channels, data)
}

/// Crop `rows x cols` starting at (`top`, `left`); the part outside the plane is 0.
pub fn crop(plane: &Plane, top: isize, left: isize, rows: usize, cols: usize) -> Plane {
    let ch = plane.channels;
    let mut out = vec![0f32; rows * cols * ch];
    for r in 0..rows {
        let sr = top + r as isize;
        if sr < 0 || sr >= plane.rows as isize {
            continue;
        }
        for c in 0..cols {
            let sc = left + c as isize;
            if sc < 0 || sc >= plane.cols as isize {
                continue;
            }
            let s = (sr as usize * plane.cols + sc as usize) * ch;
            let d = (r * cols + c) * ch;
            out[d..d + ch].copy_from_slice(&plane.data[s..s + ch]);
        }
    }
    Plane {
        rows,
        cols,
        channels: ch,
        data: out,
    }
}

/// Centre crop (or centre pad, if the plane is smaller) to `rows x cols`.
pub fn center_crop(plane: &Plane, rows: usize, cols: usize) -> Plane {
    let top = (plane.rows as isize - rows as isize) / 2;
    let left = (plane.cols as isize - cols as isize) / 2;
    crop(plane, top, left, rows, cols)
}

/// Aspect-preserving resize to a `size x size` square (see [`Fit`]).
pub fn resize_square(plane: &Plane, size: usize, fit: Fit) -> Result<Plane> {
    let (h, w) = (plane.rows as f64, plane.cols as f64);
    match fit {
        Fit::Stretch => resize(plane, size, size),
        Fit::Pad | Fit::Crop => {
            let scale = if fit == Fit::Pad {
                size as f64 / h.max(w)
            } else {
                size as f64 / h.min(w)
            };
            let nh = ((h * scale).round() as usize).max(1);
            let nw = ((w * scale).round() as usize).max(1);
            let r = resize(plane, nh, nw)?;
            Ok(center_crop(&r, size, size))
        }
    }
}

/// Mirror left-right.
pub fn hflip(plane: &Plane) -> Plane {
    let mut out = plane.clone();
    let ch = plane.channels;
    for r in 0..plane.rows {
        for c in 0..plane.cols {
            let s = (r * plane.cols + (plane.cols - 1 - c)) * ch;
            let d = (r * plane.cols + c) * ch;
            out.data[d..d + ch].copy_from_slice(&plane.data[s..s + ch]);
        }
    }
    out
}

/// Mirror top-bottom.
pub fn vflip(plane: &Plane) -> Plane {
    let mut out = plane.clone();
    let row = plane.cols * plane.channels;
    for r in 0..plane.rows {
        let s = (plane.rows - 1 - r) * row;
        out.data[r * row..(r + 1) * row].copy_from_slice(&plane.data[s..s + row]);
    }
    out
}

/// Rotate by `degrees` (counter-clockwise) about the centre, bilinear, outside = 0.
pub fn rotate(plane: &Plane, degrees: f32) -> Plane {
    let (s, c) = degrees.to_radians().sin_cos();
    let cy = (plane.rows as f32 - 1.0) / 2.0;
    let cx = (plane.cols as f32 - 1.0) / 2.0;
    let ch = plane.channels;
    let mut out = vec![0f32; plane.data.len()];
    let get = |r: isize, cc: isize, k: usize| -> f32 {
        if r < 0 || cc < 0 || r >= plane.rows as isize || cc >= plane.cols as isize {
            0.0
        } else {
            plane.data[(r as usize * plane.cols + cc as usize) * ch + k]
        }
    };
    for r in 0..plane.rows {
        for col in 0..plane.cols {
            let (y, x) = (r as f32 - cy, col as f32 - cx);
            // inverse mapping: rotate the output coordinate back by -angle
            let sx = c * x - s * y + cx;
            let sy = s * x + c * y + cy;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for k in 0..ch {
                let v = get(y0, x0, k) * (1.0 - fx) * (1.0 - fy)
                    + get(y0, x0 + 1, k) * fx * (1.0 - fy)
                    + get(y0 + 1, x0, k) * (1.0 - fx) * fy
                    + get(y0 + 1, x0 + 1, k) * fx * fy;
                out[(r * plane.cols + col) * ch + k] = v;
            }
        }
    }
    Plane {
        rows: plane.rows,
        cols: plane.cols,
        channels: ch,
        data: out,
    }
}

/// Separable Gaussian blur of an interleaved `w x h x ch` buffer in place: kernel of
/// radius `ceil(truncate sigma)`, normalised, borders clamped; `sigma <= 0` leaves the
/// buffer as it is. (The phantom generator's acquisition blur, truncate 2.5, and the
/// training augmentation's, 3.)
pub fn gaussian_blur_in_place(
    buf: &mut [f32],
    w: usize,
    h: usize,
    ch: usize,
    sigma: f32,
    truncate: f32,
) {
    if sigma <= 0.0 || w == 0 || h == 0 {
        return;
    }
    let radius = (truncate * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    // Each row / column is copied into a border-padded line once, so the
    // inner loop has no clamping and vectorises.
    let r = radius as usize;
    let mut line = vec![0.0f32; w.max(h) + 2 * r];
    // One pass along a line of `len` samples at buffer positions `at(0..len)`.
    let mut blur_line = |buf: &mut [f32], len: usize, at: &dyn Fn(usize) -> usize| {
        for (i, v) in line.iter_mut().take(len + 2 * r).enumerate() {
            *v = buf[at((i as isize - radius).clamp(0, len as isize - 1) as usize)];
        }
        for p in 0..len {
            buf[at(p)] = kernel
                .iter()
                .zip(&line[p..p + 2 * r + 1])
                .map(|(k, v)| k * v)
                .sum();
        }
    };
    for c in 0..ch {
        for y in 0..h {
            blur_line(buf, w, &|x| (y * w + x) * ch + c);
        }
        for x in 0..w {
            blur_line(buf, h, &|y| (y * w + x) * ch + c);
        }
    }
}

/// Gaussian blur of each channel with standard deviation `sigma` pixels (kernel cut at 3
/// sigma, [`gaussian_blur_in_place`]); `sigma <= 0` returns a copy.
pub fn gaussian_blur(plane: &Plane, sigma: f32) -> Plane {
    let mut out = plane.clone();
    gaussian_blur_in_place(
        &mut out.data,
        plane.cols,
        plane.rows,
        plane.channels,
        sigma,
        3.0,
    );
    out
}

/// Deterministic evaluation pipeline: aspect-preserving resize to a square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalTransform {
    /// Side length; default 224.
    pub size: usize,
    pub fit: Fit,
}

impl Default for EvalTransform {
    fn default() -> Self {
        EvalTransform {
            size: 224,
            fit: Fit::Pad,
        }
    }
}

impl EvalTransform {
    pub fn apply(&self, plane: &Plane) -> Result<Plane> {
        resize_square(plane, self.size, self.fit)
    }
}

/// Random training augmentation. Defaults are mild, suitable for medical images
/// (no vertical flip: anatomy has an up; left-right flips are on, set `hflip_p = 0`
/// where laterality matters).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTransform {
    /// Output side length; default 224.
    pub size: usize,
    /// Random-resized-crop scale range (fraction of the side kept); default (0.85, 1.0).
    pub crop_scale: (f32, f32),
    /// Probability of a left-right flip; default 0.5.
    pub hflip_p: f32,
    /// Probability of a top-bottom flip; default 0.
    pub vflip_p: f32,
    /// Maximum absolute rotation in degrees; default 10.
    pub max_rotation_deg: f32,
    /// Additive brightness jitter amplitude; default 0.1.
    pub brightness: f32,
    /// Multiplicative contrast jitter amplitude around the mean; default 0.1.
    pub contrast: f32,
    /// Gamma range; default (0.8, 1.25).
    pub gamma: (f32, f32),
    /// Standard deviation of Gaussian noise; default 0.01.
    pub noise_std: f32,
    /// Range of the Gaussian blur's sigma in output pixels, drawn uniformly (an
    /// acquisition's point-spread function); default (0, 0): no blur.
    pub blur_sigma: (f32, f32),
}

impl Default for TrainTransform {
    fn default() -> Self {
        TrainTransform {
            size: 224,
            crop_scale: (0.85, 1.0),
            hflip_p: 0.5,
            vflip_p: 0.0,
            max_rotation_deg: 10.0,
            brightness: 0.1,
            contrast: 0.1,
            gamma: (0.8, 1.25),
            noise_std: 0.01,
            blur_sigma: (0.0, 0.0),
        }
    }
}

/// A ChaCha8 generator for sample `index` of a run seeded with `seed`.
pub fn sample_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

impl TrainTransform {
    /// Apply with the generator of sample `index` under `seed` (see [`sample_rng`]).
    pub fn apply_seeded(&self, plane: &Plane, seed: u64, index: u64) -> Result<Plane> {
        self.apply(plane, &mut sample_rng(seed, index))
    }

    /// Apply with a caller-provided generator.
    pub fn apply<R: Rng>(&self, plane: &Plane, rng: &mut R) -> Result<Plane> {
        // Random crop of a square-ish region, then resize to the target.
        let (lo, hi) = self.crop_scale;
        let frac = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            hi
        };
        let side = ((plane.rows.min(plane.cols) as f32) * frac)
            .round()
            .max(1.0) as usize;
        let top = rng.random_range(0..=plane.rows - side.min(plane.rows));
        let left = rng.random_range(0..=plane.cols - side.min(plane.cols));
        let p = crop(plane, top as isize, left as isize, side, side);
        let mut p = resize(&p, self.size, self.size)?;
        if rng.random::<f32>() < self.hflip_p {
            p = hflip(&p);
        }
        if rng.random::<f32>() < self.vflip_p {
            p = vflip(&p);
        }
        if self.max_rotation_deg > 0.0 {
            let a = rng.random_range(-self.max_rotation_deg..=self.max_rotation_deg);
            p = rotate(&p, a);
        }
        let (s0, s1) = self.blur_sigma;
        if s1 > 0.0 {
            let sigma = if s1 > s0 {
                rng.random_range(s0..=s1)
            } else {
                s1
            };
            p = gaussian_blur(&p, sigma);
        }
        let b = if self.brightness > 0.0 {
            rng.random_range(-self.brightness..=self.brightness)
        } else {
            0.0
        };
        let k = if self.contrast > 0.0 {
            1.0 + rng.random_range(-self.contrast..=self.contrast)
        } else {
            1.0
        };
        let (g0, g1) = self.gamma;
        let g = if g1 > g0 {
            (rng.random_range(g0.ln()..=g1.ln())).exp()
        } else {
            g0
        };
        let mean = p.data.iter().sum::<f32>() / p.data.len().max(1) as f32;
        for v in p.data.iter_mut() {
            let x = ((*v - mean) * k + mean + b).clamp(0.0, 1.0);
            *v = x.powf(g);
        }
        if self.noise_std > 0.0 {
            let normal = rand_distr::Normal::new(0.0f32, self.noise_std)
                .map_err(|e| IoError::InvalidArgument(format!("noise_std: {e}")))?;
            for v in p.data.iter_mut() {
                *v = (*v + rng.sample(normal)).clamp(0.0, 1.0);
            }
        }
        Ok(p)
    }
}
