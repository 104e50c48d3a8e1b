//! Dermoscopy phantom (RGB).
//!
//! Skin of a random tone with a fine texture and skin lines, seen through the
//! circular field of a contact dermoscope (dark corners), sometimes crossed by
//! hairs. At most one pigmented lesion, with the features of the ABCD rule
//! (Stolz et al., Eur. J. Dermatol. 1994): a benign naevus is small,
//! symmetric, regularly bordered, a single brown with a regular network; a
//! melanoma-like lesion is larger, asymmetric, with an irregular notched
//! border and several colours (black, brown, blue-grey veil, pink-white
//! regression). One anatomy unit is 20 mm.

use std::f32::consts::TAU;

use rand::Rng;

use crate::noise::Fbm;
use crate::{Draft, Laterality, Rendered, Severity};

const MM_PER_UNIT: f32 = 20.0;

struct Hair {
    cos: f32,
    sin: f32,
    offset: f32,
    bend: f32,
    freq: f32,
    phase: f32,
    width: f32,
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn field_position(x: f32, y: f32) -> &'static str {
    let (dx, dy) = (x - 0.5, y - 0.5);
    if dx.abs() < 0.06 && dy.abs() < 0.06 {
        return FIELD_POSITIONS[0];
    }
    match (dy < 0.0, dx < 0.0) {
        (true, true) => FIELD_POSITIONS[1],
        (true, false) => FIELD_POSITIONS[2],
        (false, true) => FIELD_POSITIONS[3],
        (false, false) => FIELD_POSITIONS[4],
    }
}

/// The positions [`field_position`] names: every location of a lesion.
pub(crate) const FIELD_POSITIONS: [&str; 5] = [
    "centre of the field",
    "upper left of the field",
    "upper right of the field",
    "lower left of the field",
    "lower right of the field",
];

pub(crate) fn render<R: Rng>(rng: &mut R, size: usize, labels: &[&'static str]) -> Rendered {
    // One lesion at most: the first chosen label.
    let lesion = labels.first().copied();
    let tone: f32 = rng.random_range(0.0..0.6);
    let skin = lerp3([0.93, 0.78, 0.70], [0.68, 0.48, 0.36], tone);
    let fov = rng.random_range(0.47..0.56);
    let line_angle: f32 = rng.random_range(0.0..TAU);
    let (la_c, la_s) = (line_angle.cos(), line_angle.sin());
    let n_hairs = if rng.random::<f32>() < 0.5 {
        0
    } else {
        rng.random_range(1..4)
    };
    let hairs: Vec<Hair> = (0..n_hairs)
        .map(|_| {
            let a: f32 = rng.random_range(0.0..TAU);
            Hair {
                cos: a.cos(),
                sin: a.sin(),
                offset: rng.random_range(-0.4..0.4),
                bend: rng.random_range(0.0..0.08),
                freq: rng.random_range(2.0..6.0),
                phase: rng.random_range(0.0..TAU),
                width: rng.random_range(0.002..0.004),
            }
        })
        .collect();

    let melanoma = lesion == Some("melanoma");
    let extent: f32 = rng.random();
    let radius = if melanoma {
        0.19 + 0.1 * extent
    } else {
        0.11 + 0.07 * extent
    };
    let (lcx, lcy) = (
        0.5 + rng.random_range(-0.07..0.07),
        0.5 + rng.random_range(-0.07..0.07),
    );
    let aspect = rng.random_range(0.8..1.0);
    let orient: f32 = rng.random_range(0.0..TAU);
    let harmonics: Vec<(f32, f32, f32)> = if melanoma {
        (2..7)
            .map(|k| {
                (
                    rng.random_range(0.04..0.12),
                    k as f32,
                    rng.random_range(0.0..TAU),
                )
            })
            .collect()
    } else {
        vec![(
            rng.random_range(0.01..0.04),
            2.0,
            rng.random_range(0.0..TAU),
        )]
    };
    // Melanoma colours are darker off-centre (asymmetry).
    let (ecx, ecy) = (
        lcx + rng.random_range(-0.5..0.5) * radius,
        lcy + rng.random_range(-0.5..0.5) * radius,
    );
    let brown = lerp3([0.55, 0.36, 0.24], [0.42, 0.26, 0.17], rng.random());

    // Border radius by angle, tabulated: five cosines per pixel would cost
    // more than the rest of the image.
    const ANGLES: usize = 512;
    let border: Vec<f32> = (0..=ANGLES)
        .map(|k| {
            let a = k as f32 / ANGLES as f32 * TAU - std::f32::consts::PI;
            radius
                * (1.0
                    + harmonics
                        .iter()
                        .map(|(amp, f, ph)| amp * (f * a + ph).cos())
                        .sum::<f32>())
        })
        .collect();
    let (orient_c, orient_s) = (orient.cos(), orient.sin());
    let max_r = border.iter().fold(0.0f32, |m, &r| m.max(r));
    let inv = 1.0 / size as f32;
    // Pigment network lattice, separable: sin(110 x) sin(110 y).
    let net_axis: Vec<f32> = (0..size)
        .map(|k| (((k as f32 + 0.5) * inv) * 110.0).sin())
        .collect();
    let texture = Fbm::new(rng, 6, 3);
    let colours = Fbm::new(rng, 5, 3);
    let mut mask = vec![0u8; size * size];
    let mut pixels = vec![0.0f32; size * size * 3];
    for py in 0..size {
        let y = (py as f32 + 0.5) * inv;
        for px in 0..size {
            let x = (px as f32 + 0.5) * inv;
            let idx = py * size + px;
            let n = texture.at(x, y);
            let lines = ((x * la_c + y * la_s) * 70.0 + 5.0 * n).sin();
            let shade = 1.0 + 0.08 * (n - 0.5) - 0.025 * lines.max(0.0);
            let mut rgb = [skin[0] * shade, skin[1] * shade, skin[2] * shade];
            if lesion.is_some() {
                let (dx, dy) = (x - lcx, y - lcy);
                let (ex, ey) = (
                    orient_c * dx + orient_s * dy,
                    (-orient_s * dx + orient_c * dy) / aspect,
                );
                let d2 = ex * ex + ey * ey;
                let q = if d2 < max_r * max_r {
                    let a = ey.atan2(ex);
                    let k = (((a + std::f32::consts::PI) / TAU) * ANGLES as f32) as usize;
                    d2.sqrt() / border[k.min(ANGLES)]
                } else {
                    2.0
                };
                if q < 1.0 {
                    mask[idx] = 255;
                    let col = if melanoma {
                        let cn = colours.at(x, y);
                        let ecc =
                            (((x - ecx).powi(2) + (y - ecy).powi(2)).sqrt() / radius).min(1.0);
                        let t = cn - 0.25 * (1.0 - ecc);
                        if t < 0.3 {
                            [0.16, 0.10, 0.09]
                        } else if t < 0.48 {
                            [0.40, 0.24, 0.16]
                        } else if t < 0.62 {
                            [0.38, 0.40, 0.50]
                        } else {
                            [0.86, 0.70, 0.72]
                        }
                    } else {
                        // Regular network: a lattice of slightly darker lines.
                        let net = (net_axis[px] * net_axis[py]).abs();
                        let k = 0.85 + 0.15 * q - 0.12 * (net > 0.7) as i32 as f32;
                        [brown[0] * k, brown[1] * k, brown[2] * k]
                    };
                    // Soft rim blends into the skin.
                    let w = ((1.0 - q) / 0.12).min(1.0);
                    rgb = lerp3(rgb, col, w);
                }
            }
            for h in &hairs {
                let along = (x - 0.5) * h.cos + (y - 0.5) * h.sin;
                let across = -(x - 0.5) * h.sin + (y - 0.5) * h.cos - h.offset;
                if (across - h.bend * (h.freq * along + h.phase).sin()).abs() < h.width {
                    rgb = [0.18, 0.12, 0.09];
                }
            }
            let r = ((x - 0.5).powi(2) + (y - 0.5).powi(2)).sqrt();
            if r > fov {
                let k = (1.0 - (r - fov) / 0.03).clamp(0.0, 1.0) * 0.3;
                rgb = [rgb[0] * k, rgb[1] * k, rgb[2] * k];
            }
            pixels[idx * 3..idx * 3 + 3].copy_from_slice(&rgb);
        }
    }
    let drafts = match lesion {
        Some(label) => vec![Draft {
            label,
            location: field_position(lcx, lcy).to_string(),
            laterality: Laterality::None,
            size_mm: 2.0 * radius * MM_PER_UNIT,
            severity: Severity::from_unit(extent),
            mask,
        }],
        None => Vec::new(),
    };
    Rendered { pixels, drafts }
}
