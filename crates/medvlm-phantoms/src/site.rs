//! Acquisition sites and nuisance: each site has its own appearance (blur,
//! contrast, gamma, exposure, noise, colour / stain), jittered per study, so a
//! held-out site measures domain shift (as in the WILDS Camelyon17 split,
//! Koh et al., ICML 2021).

use rand::{Rng, RngCore};

/// SplitMix64 (Steele, Lea & Flood, OOPSLA 2014): a tiny fast generator for
/// per-pixel noise.
pub(crate) struct SplitMix64(pub u64);

impl RngCore for SplitMix64 {
    #[inline]
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

use crate::noise::{approx_gaussian, ValueNoise};
use crate::raster::gaussian_blur;

/// Names of the acquisition sites; the last one is held out for testing.
pub const SITES: [&str; 4] = ["site_a", "site_b", "site_c", "site_d"];

/// Index into [`SITES`] of the site that only appears in the
/// `test_heldout_site` split.
pub const HELD_OUT_SITE: usize = 3;

/// Per-study acquisition parameters.
#[derive(Debug, Clone)]
pub(crate) struct Acquisition {
    /// Gaussian point-spread sigma in pixels at 128 px (scaled with size).
    pub blur_px: f32,
    pub contrast: f32,
    pub gamma: f32,
    pub exposure: f32,
    /// Noise standard deviation on the `[0, 1]` scale.
    pub noise: f32,
    /// Per-channel gain (colour cast of a camera or scanner).
    pub tint: [f32; 3],
    /// Amplitude of a smooth multiplicative field (MRI bias field, uneven
    /// illumination).
    pub shading: f32,
    /// Stain vectors of haematoxylin and eosin as optical densities per RGB
    /// channel (histology only).
    pub stain_h: [f32; 3],
    pub stain_e: [f32; 3],
}

/// Site style, before per-study jitter.
struct SiteStyle {
    blur_px: f32,
    contrast: f32,
    gamma: f32,
    exposure: f32,
    noise: f32,
    tint: [f32; 3],
    shading: f32,
    stain_h: [f32; 3],
    stain_e: [f32; 3],
}

fn site_style(site: usize) -> SiteStyle {
    // Stain vectors near Ruifrok & Johnston (Anal. Quant. Cytol. Histol.
    // 2001) H&E, varied per site as scanners and staining protocols do.
    match site {
        0 => SiteStyle {
            blur_px: 0.5,
            contrast: 1.0,
            gamma: 1.0,
            exposure: 0.0,
            noise: 0.02,
            tint: [1.0, 1.0, 1.0],
            shading: 0.10,
            stain_h: [0.65, 0.70, 0.29],
            stain_e: [0.07, 0.99, 0.11],
        },
        1 => SiteStyle {
            blur_px: 0.35,
            contrast: 1.15,
            gamma: 0.9,
            exposure: 0.02,
            noise: 0.015,
            tint: [1.02, 0.98, 0.95],
            shading: 0.15,
            stain_h: [0.60, 0.75, 0.28],
            stain_e: [0.10, 0.95, 0.15],
        },
        2 => SiteStyle {
            blur_px: 0.7,
            contrast: 0.9,
            gamma: 1.1,
            exposure: -0.03,
            noise: 0.03,
            tint: [0.97, 1.0, 1.04],
            shading: 0.2,
            stain_h: [0.70, 0.65, 0.32],
            stain_e: [0.05, 1.0, 0.08],
        },
        // The held-out site: softer, noisier, darker, with a different colour
        // cast and stain; still within what a model should survive.
        _ => SiteStyle {
            blur_px: 1.0,
            contrast: 0.8,
            gamma: 1.3,
            exposure: -0.05,
            noise: 0.045,
            tint: [1.06, 0.95, 1.02],
            shading: 0.25,
            stain_h: [0.55, 0.80, 0.35],
            stain_e: [0.15, 0.90, 0.20],
        },
    }
}

impl Acquisition {
    /// Site style with per-study jitter.
    pub(crate) fn sample<R: Rng>(rng: &mut R, site: usize) -> Self {
        let s = site_style(site);
        let mut j = |spread: f32| 1.0 + rng.random_range(-spread..=spread);
        let jitter3 = |v: [f32; 3], f: &mut dyn FnMut(f32) -> f32| {
            [v[0] * f(0.04), v[1] * f(0.04), v[2] * f(0.04)]
        };
        let blur_px = s.blur_px * j(0.2);
        let contrast = s.contrast * j(0.1);
        let gamma = s.gamma * j(0.08);
        let noise = s.noise * j(0.25);
        let shading = s.shading * j(0.3);
        let tint = jitter3(s.tint, &mut j);
        let stain_h = jitter3(s.stain_h, &mut j);
        let stain_e = jitter3(s.stain_e, &mut j);
        let exposure = s.exposure + rng.random_range(-0.04..=0.04);
        Self {
            blur_px,
            contrast,
            gamma,
            exposure,
            noise,
            tint,
            shading,
            stain_h,
            stain_e,
        }
    }

    /// Apply blur, shading, contrast / exposure / gamma, colour cast and noise
    /// to a rendered `[0, 1]` image, and quantise it to u8.
    pub(crate) fn apply<R: Rng>(
        &self,
        rng: &mut R,
        pixels: &mut [f32],
        w: usize,
        h: usize,
        ch: usize,
    ) -> Vec<u8> {
        gaussian_blur(pixels, w, h, ch, self.blur_px * w as f32 / 128.0);
        let shade = ValueNoise::new(rng, 2);
        // Gamma through a lookup table: powf per pixel would cost more than
        // rendering the anatomy.
        const LUT: usize = 1024;
        let gamma_lut: Vec<f32> = (0..=LUT)
            .map(|k| (k as f32 / LUT as f32).powf(self.gamma))
            .collect();
        let mut out = vec![0u8; pixels.len()];
        // Film and MRI noise is on the signal; the same noise is used across
        // RGB channels at half strength plus independent colour noise, as in
        // camera sensors.
        let colour = ch == 3;
        // Per-pixel noise from a SplitMix64 stream seeded by the study's
        // ChaCha stream: deterministic, and cheaper than ChaCha per sample.
        let mut noise_rng = SplitMix64(rng.next_u64());
        let rng = &mut noise_rng;
        for y in 0..h {
            let v = (y as f32 + 0.5) / h as f32;
            for x in 0..w {
                let u = (x as f32 + 0.5) / w as f32;
                let gain = 1.0 + self.shading * (shade.at(u, v) - 0.5);
                let common = approx_gaussian(rng) * self.noise;
                for c in 0..ch {
                    let i = (y * w + x) * ch + c;
                    let mut val = pixels[i] * gain;
                    val = (val - 0.5) * self.contrast + 0.5 + self.exposure;
                    val = val.clamp(0.0, 1.0);
                    let t = val * LUT as f32;
                    let k = (t as usize).min(LUT - 1);
                    val = gamma_lut[k] + (gamma_lut[k + 1] - gamma_lut[k]) * (t - k as f32);
                    if colour {
                        val *= self.tint[c];
                        val += common * 0.5 + approx_gaussian(rng) * self.noise * 0.5;
                    } else {
                        val += common;
                    }
                    out[i] = crate::raster::to_u8(val);
                }
            }
        }
        out
    }
}
