//! H&E colorectal histology patch phantom (RGB), in the spirit of the tissue
//! classes of Kather et al. (PLOS Med. 2019, NCT-CRC-HE-100K).
//!
//! Haematoxylin and eosin concentration maps are painted first and turned into
//! colour by Beer-Lambert absorption with the site's stain vectors
//! (Ruifrok & Johnston 2001), so stain differences between sites act like
//! real ones. Normal mucosa: loose pink lamina propria with round crypts
//! (white lumen, an epithelial ring, basal nuclei). Finding regions are
//! noise-deformed blobs of a different tissue: tumour (crowded large
//! pleomorphic nuclei, irregular cribriform lumens, purple background),
//! stroma (dense pink collagen streaks, sparse spindle nuclei) and
//! lymphocyte-rich tissue (sheets of small round dark nuclei). One anatomy
//! unit is 0.5 mm.

use std::f32::consts::TAU;

use rand::Rng;

use crate::noise::{Fbm, ValueNoise};
use crate::site::Acquisition;
use crate::{Draft, Laterality, Rendered, Severity};

const MM_PER_UNIT: f32 = 0.5;
const GLAND_SPACING: f32 = 0.2;

#[derive(Clone, Copy, PartialEq)]
enum Tissue {
    Normal,
    Tumour,
    Stroma,
    Lymphocytes,
}

struct Region {
    tissue: Tissue,
    cx: f32,
    cy: f32,
    r: f32,
    shape: ValueNoise,
}

impl Region {
    #[inline]
    fn contains(&self, x: f32, y: f32) -> bool {
        let e = ((x - self.cx).powi(2) + (y - self.cy).powi(2)) / (self.r * self.r);
        e + 0.9 * (self.shape.at(x, y) - 0.5) < 1.0
    }
}

fn patch_position(x: f32, y: f32) -> &'static str {
    let (dx, dy) = (x - 0.5, y - 0.5);
    if dx.abs() < 0.1 && dy.abs() < 0.1 {
        return "centre of the patch";
    }
    match (dy < 0.0, dx < 0.0) {
        (true, true) => "upper left of the patch",
        (true, false) => "upper right of the patch",
        (false, true) => "lower left of the patch",
        (false, false) => "lower right of the patch",
    }
}

struct Nucleus {
    x: f32,
    y: f32,
    rx: f32,
    ry: f32,
    angle: f32,
    h: f32,
}

pub(crate) fn render<R: Rng>(
    rng: &mut R,
    size: usize,
    labels: &[&'static str],
    acq: &Acquisition,
) -> Rendered {
    let mut regions: Vec<(Region, f32)> = Vec::new();
    for &label in labels {
        let tissue = match label {
            "tumour" => Tissue::Tumour,
            "stroma" => Tissue::Stroma,
            _ => Tissue::Lymphocytes,
        };
        let extent: f32 = rng.random();
        regions.push((
            Region {
                tissue,
                cx: rng.random_range(0.2..0.8),
                cy: rng.random_range(0.2..0.8),
                r: 0.2 + 0.2 * extent,
                shape: ValueNoise::new(rng, 5),
            },
            extent,
        ));
    }
    let tissue_at = |x: f32, y: f32| -> (Tissue, usize) {
        // Later regions lie on top, so masks do not overlap.
        for (k, (reg, _)) in regions.iter().enumerate().rev() {
            if reg.contains(x, y) {
                return (reg.tissue, k);
            }
        }
        (Tissue::Normal, usize::MAX)
    };

    // Crypts on a jittered grid.
    let cells = (1.0 / GLAND_SPACING).ceil() as usize + 2;
    let glands: Vec<(f32, f32, f32)> = (0..cells * cells)
        .map(|k| {
            let (i, j) = ((k % cells) as f32 - 1.0, (k / cells) as f32 - 1.0);
            (
                (i + 0.5) * GLAND_SPACING + rng.random_range(-0.05..0.05),
                (j + 0.5) * GLAND_SPACING + rng.random_range(-0.05..0.05),
                rng.random_range(0.055..0.08),
            )
        })
        .collect();
    let nearest_gland = |x: f32, y: f32| -> (f32, usize) {
        let ci = (x / GLAND_SPACING).floor() as isize + 1;
        let cj = (y / GLAND_SPACING).floor() as isize + 1;
        let mut best = (f32::MAX, 0usize);
        for dj in -1..=1 {
            for di in -1..=1 {
                let (i, j) = (ci + di, cj + dj);
                if i < 0 || j < 0 || i >= cells as isize || j >= cells as isize {
                    continue;
                }
                let k = j as usize * cells + i as usize;
                let (gx, gy, gr) = glands[k];
                // Squared distance in units of the crypt radius.
                let d2 = ((x - gx).powi(2) + (y - gy).powi(2)) / (gr * gr);
                if d2 < best.0 {
                    best = (d2, k);
                }
            }
        }
        (best.0.sqrt(), best.1)
    };

    let texture = Fbm::new(rng, 8, 3);
    let lumens = Fbm::new(rng, 10, 2);
    let fibre_angle: f32 = rng.random_range(0.0..TAU);
    let (fa_c, fa_s) = (fibre_angle.cos(), fibre_angle.sin());

    let n_px = size * size;
    let mut hx = vec![0.0f32; n_px];
    let mut eo = vec![0.0f32; n_px];
    let mut masks: Vec<Vec<u8>> = regions.iter().map(|_| vec![0u8; n_px]).collect();
    let inv = 1.0 / size as f32;
    for py in 0..size {
        let y = (py as f32 + 0.5) * inv;
        for px in 0..size {
            let x = (px as f32 + 0.5) * inv;
            let idx = py * size + px;
            let n = texture.at(x, y);
            let (tissue, k) = tissue_at(x, y);
            if k != usize::MAX {
                masks[k][idx] = 255;
            }
            let (h, e) = match tissue {
                Tissue::Normal => {
                    let (d, _) = nearest_gland(x, y);
                    if d < 0.5 {
                        (0.02, 0.04)
                    } else if d < 1.0 {
                        // Epithelium with pale goblet cells.
                        (0.15, 0.42 + 0.15 * n)
                    } else {
                        (0.07 + 0.04 * n, 0.36 + 0.12 * n)
                    }
                }
                Tissue::Tumour => {
                    if lumens.at(x, y) > 0.68 {
                        (0.03, 0.06)
                    } else {
                        (0.3 + 0.1 * n, 0.5 + 0.1 * n)
                    }
                }
                Tissue::Stroma => {
                    let streak = ((x * fa_c + y * fa_s) * 140.0 + 10.0 * n).sin();
                    (0.04, 0.62 + 0.16 * streak + 0.08 * n)
                }
                Tissue::Lymphocytes => (0.38 + 0.08 * n, 0.14 + 0.06 * n),
            };
            hx[idx] = h;
            eo[idx] = e;
        }
    }

    // Nuclei, by rejection sampling positions against the tissue map.
    let mut nuclei: Vec<Nucleus> = Vec::new();
    for (gx, gy, gr) in &glands {
        if tissue_at(*gx, *gy).0 != Tissue::Normal {
            continue;
        }
        let count = rng.random_range(10..15);
        for c in 0..count {
            let a = TAU * c as f32 / count as f32 + rng.random_range(-0.1..0.1);
            let (x, y) = (gx + 0.85 * gr * a.cos(), gy + 0.85 * gr * a.sin());
            if tissue_at(x, y).0 == Tissue::Normal {
                nuclei.push(Nucleus {
                    x,
                    y,
                    rx: 0.011,
                    ry: 0.006,
                    angle: a,
                    h: 0.9,
                });
            }
        }
    }
    let candidates = 2600;
    for _ in 0..candidates {
        let (x, y) = (rng.random::<f32>(), rng.random::<f32>());
        let u: f32 = rng.random();
        let (tissue, _) = tissue_at(x, y);
        // Candidate density is 2600 per unit area; keep a tissue-specific share.
        let nucleus = match tissue {
            Tissue::Normal if u < 0.06 => Some((0.006, 0.006, 0.8)),
            Tissue::Tumour if u < 0.45 => {
                let r = rng.random_range(0.009..0.016);
                Some((r, r * rng.random_range(0.6..1.0), 1.0))
            }
            Tissue::Stroma if u < 0.05 => Some((0.016, 0.004, 0.85)),
            Tissue::Lymphocytes => Some((0.0065, 0.0065, 1.1)),
            _ => None,
        };
        if let Some((rx, ry, h)) = nucleus {
            let angle = if tissue == Tissue::Stroma {
                fa_s.atan2(fa_c)
            } else {
                rng.random_range(0.0..TAU)
            };
            nuclei.push(Nucleus {
                x,
                y,
                rx,
                ry,
                angle,
                h,
            });
        }
    }
    let s = size as f32;
    for nu in &nuclei {
        let r = nu.rx.max(nu.ry) * s + 1.0;
        let (cx, cy) = (nu.x * s, nu.y * s);
        let (c, sn) = (nu.angle.cos(), nu.angle.sin());
        let x0 = (cx - r).floor().max(0.0) as usize;
        let x1 = ((cx + r).ceil() as usize).min(size);
        let y0 = (cy - r).floor().max(0.0) as usize;
        let y1 = ((cy + r).ceil() as usize).min(size);
        for py in y0..y1 {
            for px in x0..x1 {
                let (dx, dy) = ((px as f32 + 0.5 - cx) / s, (py as f32 + 0.5 - cy) / s);
                let (a, b) = ((c * dx + sn * dy) / nu.rx, (-sn * dx + c * dy) / nu.ry);
                let q = a * a + b * b;
                // Soft edge keeps sub-pixel nuclei visible as a tint.
                let w = (1.5 - q).clamp(0.0, 1.0);
                let i = py * size + px;
                hx[i] = hx[i].max(nu.h * w);
            }
        }
    }

    // Beer-Lambert: I = exp(-k (h * H + e * E)), exp tabulated on [0, 8].
    const K: f32 = 2.0;
    const STEPS: usize = 2048;
    const OD_MAX: f32 = 8.0;
    let exp_lut: Vec<f32> = (0..=STEPS)
        .map(|k| (-(k as f32) * OD_MAX / STEPS as f32).exp())
        .collect();
    let mut pixels = vec![0.0f32; n_px * 3];
    for i in 0..n_px {
        for c in 0..3 {
            let od = K * (hx[i] * acq.stain_h[c] + eo[i] * acq.stain_e[c]);
            let t = (od.max(0.0) * (STEPS as f32 / OD_MAX)).min(STEPS as f32 - 1.0);
            let k = t as usize;
            pixels[i * 3 + c] = exp_lut[k] + (exp_lut[k + 1] - exp_lut[k]) * (t - k as f32);
        }
    }

    let drafts = regions
        .iter()
        .zip(masks)
        .zip(labels)
        .map(|(((reg, extent), mask), &label)| Draft {
            label,
            location: patch_position(reg.cx, reg.cy).to_string(),
            laterality: Laterality::None,
            size_mm: 2.0 * reg.r * MM_PER_UNIT,
            severity: Severity::from_unit(*extent),
            mask,
        })
        .collect();
    Rendered { pixels, drafts }
}
