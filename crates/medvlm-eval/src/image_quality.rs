//! Image-quality metrics of restored or generated images against a reference, with the
//! conventions of BasicSR's `calculate_psnr` / `calculate_ssim` (what EDSR- and SwinIR-style
//! super-resolution papers report):
//!
//! * values on the 8-bit scale `[0, 255]` (scale `[0, 1]` images by 255 first), row-major
//!   `height x width x channels`;
//! * `crop_border` pixels removed from every side before measuring (for x`s` super-resolution
//!   BasicSR crops `s`);
//! * **PSNR** `= 10 log10(255^2 / MSE)` over every remaining value (infinite for identical
//!   images);
//! * **SSIM** (Wang et al., IEEE TIP 2004): an 11x11 Gaussian window of sigma 1.5, the SSIM map
//!   kept where the window fits inside the image (a "valid" filter), `C1 = (0.01 * 255)^2`,
//!   `C2 = (0.03 * 255)^2`, the mean of the map per channel, then the mean over channels.
//!
//! Single-channel images are measured as they are (no colour conversion).
//! `tools/make_image_quality_reference.py` follows BasicSR's algorithm with OpenCV; the tests
//! match it to 1e-9.

use crate::error::{EvalError, Result};

/// A row-major `height x width x channels` image on the 8-bit scale.
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    /// The values.
    pub data: &'a [f64],
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Channels (1 or 3).
    pub channels: usize,
}

fn check_pair(a: &ImageRef, b: &ImageRef, crop: usize) -> Result<(usize, usize)> {
    if (a.height, a.width, a.channels) != (b.height, b.width, b.channels) {
        return Err(EvalError::InvalidParameter {
            name: "images",
            reason: format!(
                "shapes differ: {}x{}x{} and {}x{}x{}",
                a.height, a.width, a.channels, b.height, b.width, b.channels
            ),
        });
    }
    for (what, img) in [("image", a), ("reference", b)] {
        if img.data.len() != img.height * img.width * img.channels {
            return Err(EvalError::LengthMismatch {
                what,
                got: img.data.len(),
                expected: img.height * img.width * img.channels,
            });
        }
        if let Some(p) = img.data.iter().position(|v| !v.is_finite()) {
            return Err(EvalError::NonFinite { what, position: p });
        }
    }
    if a.height <= 2 * crop || a.width <= 2 * crop {
        return Err(EvalError::InvalidParameter {
            name: "crop_border",
            reason: format!(
                "cropping {crop} pixels from each side leaves nothing of a {}x{} image",
                a.height, a.width
            ),
        });
    }
    Ok((a.height - 2 * crop, a.width - 2 * crop))
}

/// The cropped channel `c` of an image, row-major.
fn channel(img: &ImageRef, c: usize, crop: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity((img.height - 2 * crop) * (img.width - 2 * crop));
    for y in crop..img.height - crop {
        for x in crop..img.width - crop {
            out.push(img.data[(y * img.width + x) * img.channels + c]);
        }
    }
    out
}

/// PSNR in dB of `image` against `reference` after cropping `crop_border` pixels per side.
pub fn psnr(image: &ImageRef, reference: &ImageRef, crop_border: usize) -> Result<f64> {
    check_pair(image, reference, crop_border)?;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for c in 0..image.channels {
        for (a, b) in channel(image, c, crop_border)
            .iter()
            .zip(channel(reference, c, crop_border))
        {
            sum += (a - b) * (a - b);
            n += 1;
        }
    }
    let mse = sum / n as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    })
}

/// The normalised 11-tap Gaussian of sigma 1.5 (as `cv2.getGaussianKernel(11, 1.5)`).
fn gaussian_11() -> [f64; 11] {
    let mut k = [0.0; 11];
    for (i, v) in k.iter_mut().enumerate() {
        let d = i as f64 - 5.0;
        *v = (-d * d / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = k.iter().sum();
    k.map(|v| v / s)
}

/// "Valid" 2-D filtering with the separable 11x11 window: `(h - 10) x (w - 10)` outputs.
fn filter_valid(x: &[f64], h: usize, w: usize, k: &[f64; 11]) -> Vec<f64> {
    let (oh, ow) = (h - 10, w - 10);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        for xo in 0..ow {
            rows[y * ow + xo] = (0..11).map(|j| k[j] * x[y * w + xo + j]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for yo in 0..oh {
        for xo in 0..ow {
            out[yo * ow + xo] = (0..11).map(|j| k[j] * rows[(yo + j) * ow + xo]).sum();
        }
    }
    out
}

fn ssim_channel(a: &[f64], b: &[f64], h: usize, w: usize) -> f64 {
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let k = gaussian_11();
    let mu1 = filter_valid(a, h, w, &k);
    let mu2 = filter_valid(b, h, w, &k);
    let sq = |v: &[f64]| v.iter().map(|x| x * x).collect::<Vec<f64>>();
    let e11 = filter_valid(&sq(a), h, w, &k);
    let e22 = filter_valid(&sq(b), h, w, &k);
    let ab: Vec<f64> = a.iter().zip(b).map(|(x, y)| x * y).collect();
    let e12 = filter_valid(&ab, h, w, &k);
    let n = mu1.len();
    let mut sum = 0.0;
    for i in 0..n {
        let (m1, m2) = (mu1[i], mu2[i]);
        let s1 = e11[i] - m1 * m1;
        let s2 = e22[i] - m2 * m2;
        let s12 = e12[i] - m1 * m2;
        sum +=
            ((2.0 * m1 * m2 + c1) * (2.0 * s12 + c2)) / ((m1 * m1 + m2 * m2 + c1) * (s1 + s2 + c2));
    }
    sum / n as f64
}

/// SSIM of `image` against `reference` after cropping `crop_border` pixels per side; needs at
/// least 11x11 pixels left.
pub fn ssim(image: &ImageRef, reference: &ImageRef, crop_border: usize) -> Result<f64> {
    let (h, w) = check_pair(image, reference, crop_border)?;
    if h < 11 || w < 11 {
        return Err(EvalError::InvalidParameter {
            name: "images",
            reason: format!("SSIM's 11x11 window needs at least 11x11 pixels, got {h}x{w}"),
        });
    }
    let total: f64 = (0..image.channels)
        .map(|c| {
            ssim_channel(
                &channel(image, c, crop_border),
                &channel(reference, c, crop_border),
                h,
                w,
            )
        })
        .sum();
    Ok(total / image.channels as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_and_errors() {
        let v: Vec<f64> = (0..16 * 16).map(|i| (i % 251) as f64).collect();
        let img = ImageRef {
            data: &v,
            height: 16,
            width: 16,
            channels: 1,
        };
        assert_eq!(psnr(&img, &img, 1).unwrap(), f64::INFINITY);
        assert!((ssim(&img, &img, 0).unwrap() - 1.0).abs() < 1e-12);
        // MSE 1 on the 8-bit scale: 10 log10(65025) dB.
        let w: Vec<f64> = v.iter().map(|x| x + 1.0).collect();
        let other = ImageRef { data: &w, ..img };
        assert!((psnr(&img, &other, 0).unwrap() - 10.0 * 65025f64.log10()).abs() < 1e-12);
        assert!(psnr(&img, &other, 8).is_err());
        assert!(ssim(&img, &other, 3).is_err()); // 10x10 left
    }
}
