//! Pixel-buffer helpers: blur, area downsampling, mask boxes, the patient
//! positioning transform, and the smooth deformation used for registration.

use rand::Rng;

use crate::noise::ValueNoise;

/// Separable Gaussian blur of an interleaved `w x h x ch` buffer in place,
/// with the kernel cut at 2.5 sigma and clamped borders
/// ([`medvlm_io::transforms::gaussian_blur_in_place`]). Skipped below sigma =
/// 0.3 px, where the kernel is a near-identity.
pub(crate) fn gaussian_blur(buf: &mut [f32], w: usize, h: usize, ch: usize, sigma: f32) {
    if sigma < 0.3 {
        return;
    }
    medvlm_io::transforms::gaussian_blur_in_place(buf, w, h, ch, sigma, 2.5);
}

/// Quantise a `[0, 1]` value to u8 with rounding.
#[inline]
pub(crate) fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Average-pool an interleaved u8 image by `factor` (each output pixel is the
/// rounded mean of a `factor x factor` block): the degradation model of the
/// super-resolution task.
pub(crate) fn downsample_area(img: &[u8], w: usize, h: usize, ch: usize, factor: usize) -> Vec<u8> {
    let (ow, oh) = (w / factor, h / factor);
    let mut out = vec![0u8; ow * oh * ch];
    let n = (factor * factor) as u32;
    for oy in 0..oh {
        for ox in 0..ow {
            for c in 0..ch {
                let mut acc = 0u32;
                for dy in 0..factor {
                    let row = (oy * factor + dy) * w;
                    for dx in 0..factor {
                        acc += img[(row + ox * factor + dx) * ch + c] as u32;
                    }
                }
                out[(oy * ow + ox) * ch + c] = ((acc + n / 2) / n) as u8;
            }
        }
    }
    out
}

/// Tight bounding box `[x0, y0, x1, y1)` of the non-zero pixels of a mask, or
/// `None` for an empty mask.
pub(crate) fn mask_box(mask: &[u8], w: usize, h: usize) -> Option<[u32; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0usize, 0usize);
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] != 0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    (x0 != usize::MAX).then_some([x0 as u32, y0 as u32, x1 as u32, y1 as u32])
}

/// Patient positioning: a similarity transform (rotation, isotropic scale,
/// shift) from image coordinates in `[0, 1]^2` to the anatomy's own
/// coordinates, so each study is rendered as if the patient or the slide were
/// placed slightly differently.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pose {
    cos: f32,
    sin: f32,
    inv_scale: f32,
    tx: f32,
    ty: f32,
}

impl Pose {
    /// Random pose: rotation within +-`max_deg`, scale in `[1 - ds, 1 + ds]`,
    /// shift within +-`max_shift` of the field of view.
    pub(crate) fn random<R: Rng>(rng: &mut R, max_deg: f32, ds: f32, max_shift: f32) -> Self {
        let angle = rng.random_range(-max_deg..=max_deg).to_radians();
        let scale = rng.random_range(1.0 - ds..=1.0 + ds);
        Self {
            cos: angle.cos(),
            sin: angle.sin(),
            inv_scale: 1.0 / scale,
            tx: rng.random_range(-max_shift..=max_shift),
            ty: rng.random_range(-max_shift..=max_shift),
        }
    }

    /// Anatomy coordinates of the image point `(u, v)`.
    #[inline]
    pub(crate) fn to_anatomy(self, u: f32, v: f32) -> (f32, f32) {
        let x = (u - 0.5 - self.tx) * self.inv_scale;
        let y = (v - 0.5 - self.ty) * self.inv_scale;
        (
            self.cos * x + self.sin * y + 0.5,
            -self.sin * x + self.cos * y + 0.5,
        )
    }
}

/// A smooth random displacement field for the registration task: per-pixel
/// displacements `(dx, dy)` in pixels, interpolated with a smoothstep fade
/// from a coarse `grid x grid` lattice of random control displacements
/// (a free-form-deformation-like model, Rueckert et al., IEEE TMI 1999,
/// with a C1 interpolant instead of cubic B-splines). Stored planar:
/// `field[0..w*h]` is dx, `field[w*h..]` is dy.
pub(crate) fn random_deformation<R: Rng>(rng: &mut R, w: usize, h: usize, max_px: f32) -> Vec<f32> {
    const GRID: usize = 4;
    let nx = ValueNoise::new(rng, GRID);
    let ny = ValueNoise::new(rng, GRID);
    let mut field = vec![0.0f32; 2 * w * h];
    let (plane_x, plane_y) = field.split_at_mut(w * h);
    for y in 0..h {
        let v = (y as f32 + 0.5) / h as f32;
        for x in 0..w {
            let u = (x as f32 + 0.5) / w as f32;
            plane_x[y * w + x] = (nx.at(u, v) * 2.0 - 1.0) * max_px;
            plane_y[y * w + x] = (ny.at(u, v) * 2.0 - 1.0) * max_px;
        }
    }
    field
}

/// Backward warp: `moved[y, x] = image(x + dx[y, x], y + dy[y, x])` with
/// bilinear interpolation and clamped borders.
pub(crate) fn warp(img: &[u8], w: usize, h: usize, ch: usize, field: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    let (plane_x, plane_y) = field.split_at(w * h);
    let max_x = (w - 1) as f32;
    let max_y = (h - 1) as f32;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let sx = (x as f32 + plane_x[i]).clamp(0.0, max_x);
            let sy = (y as f32 + plane_y[i]).clamp(0.0, max_y);
            let x0 = (sx as usize).min(w - 1);
            let y0 = (sy as usize).min(h - 1);
            let x1 = (x0 + 1).min(w - 1);
            let y1 = (y0 + 1).min(h - 1);
            let tx = sx - x0 as f32;
            let ty = sy - y0 as f32;
            for c in 0..ch {
                let a = img[(y0 * w + x0) * ch + c] as f32;
                let b = img[(y0 * w + x1) * ch + c] as f32;
                let cc = img[(y1 * w + x0) * ch + c] as f32;
                let d = img[(y1 * w + x1) * ch + c] as f32;
                let top = a + (b - a) * tx;
                let bottom = cc + (d - cc) * tx;
                out[i * ch + c] = (top + (bottom - top) * ty + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blur_keeps_constant_image_and_spreads_a_spike() {
        let mut flat = vec![0.4f32; 16 * 16];
        gaussian_blur(&mut flat, 16, 16, 1, 1.5);
        assert!(flat.iter().all(|v| (v - 0.4).abs() < 1e-5));
        let mut spike = vec![0.0f32; 15 * 15];
        spike[7 * 15 + 7] = 1.0;
        gaussian_blur(&mut spike, 15, 15, 1, 1.0);
        let total: f32 = spike.iter().sum();
        assert!((total - 1.0).abs() < 1e-4);
        assert!(spike[7 * 15 + 7] < 0.2 && spike[7 * 15 + 8] > 0.05);
    }

    #[test]
    fn downsample_averages_blocks() {
        let img = [0u8, 255, 10, 20, 255, 0, 30, 40];
        // 4 x 2 grey image, factor 2 -> 2 x 1.
        let out = downsample_area(&img, 4, 2, 1, 2);
        assert_eq!(out, vec![128, 25]);
    }

    #[test]
    fn mask_box_is_tight() {
        let mut mask = vec![0u8; 8 * 6];
        mask[2 * 8 + 3] = 255;
        mask[4 * 8 + 5] = 255;
        assert_eq!(mask_box(&mask, 8, 6), Some([3, 2, 6, 5]));
        assert_eq!(mask_box(&[0u8; 4], 2, 2), None);
    }

    #[test]
    fn warp_with_constant_shift_moves_pixels() {
        let (w, h) = (6, 4);
        let img: Vec<u8> = (0..(w * h) as u8).collect();
        let mut field = vec![0.0f32; 2 * w * h];
        field[..w * h].iter_mut().for_each(|d| *d = 1.0);
        let moved = warp(&img, w, h, 1, &field);
        // moved[y, x] = img[y, x + 1] except at the clamped right border.
        assert_eq!(moved[0], img[1]);
        assert_eq!(moved[2 * w + 3], img[2 * w + 4]);
        assert_eq!(moved[w - 1], img[w - 1]);
    }
}
