//! Axial T1-weighted post-contrast brain MRI phantom, at the level of the
//! lateral ventricles.
//!
//! Concentric layers in an elliptic head: bright scalp fat, dark cortical
//! bone with a marrow stripe, a thin CSF rim, grey-matter cortex folded by
//! sulci, white matter; lateral ventricles, deep grey nuclei and the
//! interhemispheric fissure in the middle. Findings: a ring-enhancing tumour
//! with a necrotic core and surrounding oedema, a homogeneous bright
//! (subacute) haemorrhage with a dark rim, and a dark wedge-shaped territorial
//! infarct reaching the cortex. Radiological convention: the patient's right
//! is on the image left. One anatomy unit is 200 mm.

use std::f32::consts::PI;

use rand::Rng;

use crate::noise::{Fbm, ValueNoise};
use crate::raster::Pose;
use crate::{Draft, Laterality, Rendered, Severity};

const MM_PER_UNIT: f32 = 200.0;

enum Lesion {
    Tumour {
        cx: f32,
        cy: f32,
        r: f32,
    },
    Haemorrhage {
        cx: f32,
        cy: f32,
        r: f32,
    },
    Infarct {
        theta: f32,
        half_width: f32,
        inner: f32,
    },
}

fn lobe(x: f32, y: f32, rho: f32) -> &'static str {
    let (ax, ay) = (x - 0.5, y - 0.5);
    if rho < 0.4 {
        REGIONS[0]
    } else if ay < -0.1 {
        REGIONS[1]
    } else if ay > 0.2 {
        REGIONS[2]
    } else if ax.abs() > 0.2 && ay > -0.05 {
        REGIONS[3]
    } else {
        REGIONS[4]
    }
}

/// The regions [`lobe`] names.
const REGIONS: [&str; 5] = [
    "basal ganglia",
    "frontal lobe",
    "occipital lobe",
    "temporal lobe",
    "parietal lobe",
];

/// Every location [`render`] can give a lesion ("left frontal lobe", ...).
pub(crate) fn locations() -> Vec<String> {
    [Laterality::Right, Laterality::Left]
        .iter()
        .flat_map(|lat| REGIONS.iter().map(move |r| format!("{} {r}", lat.name())))
        .collect()
}

fn side_of(x: f32) -> Laterality {
    if x < 0.5 {
        Laterality::Right
    } else {
        Laterality::Left
    }
}

pub(crate) fn render<R: Rng>(rng: &mut R, size: usize, labels: &[&'static str]) -> Rendered {
    let pose = Pose::random(rng, 7.0, 0.05, 0.03);
    let rx = 0.36 + rng.random_range(-0.02..0.02);
    let ry = 0.44 + rng.random_range(-0.02..0.02);
    let vent_scale = rng.random_range(0.8..1.25);
    let gyri_phase = rng.random_range(0.0..2.0 * PI);
    let head_rho = |x: f32, y: f32| (((x - 0.5) / rx).powi(2) + ((y - 0.5) / ry).powi(2)).sqrt();

    let mut lesions: Vec<(Lesion, Draft)> = Vec::new();
    for &label in labels {
        let extent: f32 = rng.random();
        let sev = Severity::from_unit(extent);
        let hemi = if rng.random::<bool>() { -1.0 } else { 1.0 };
        let (lesion, cx, cy, size_mm) = match label {
            "tumour" => {
                let r = 0.05 + 0.05 * extent;
                let (cx, cy) = place(rng, hemi, rx, ry, 0.35, 0.62);
                (Lesion::Tumour { cx, cy, r }, cx, cy, 2.0 * r * MM_PER_UNIT)
            }
            "haemorrhage" => {
                let r = 0.035 + 0.045 * extent;
                let (cx, cy) = if rng.random::<f32>() < 0.6 {
                    (
                        0.5 + hemi * rng.random_range(0.09..0.14),
                        0.5 + rng.random_range(-0.04..0.04),
                    )
                } else {
                    place(rng, hemi, rx, ry, 0.45, 0.65)
                };
                (
                    Lesion::Haemorrhage { cx, cy, r },
                    cx,
                    cy,
                    2.0 * r * MM_PER_UNIT,
                )
            }
            _ => {
                // A wedge towards the side of the head (MCA-like territory),
                // or towards the front or back.
                let base = if hemi < 0.0 { PI } else { 0.0 };
                let theta = base + rng.random_range(-0.9..0.9);
                let half_width = 0.22 + 0.22 * extent;
                let inner = 0.5 - 0.2 * extent;
                let mid = (inner + 0.9) / 2.0;
                let cx = 0.5 + mid * rx * theta.cos();
                let cy = 0.5 + mid * ry * theta.sin();
                let arc = 2.0 * half_width * 0.9 * rx;
                (
                    Lesion::Infarct {
                        theta,
                        half_width,
                        inner,
                    },
                    cx,
                    cy,
                    arc.max((0.9 - inner) * rx) * MM_PER_UNIT,
                )
            }
        };
        let lat = side_of(cx);
        let location = format!("{} {}", lat.name(), lobe(cx, cy, head_rho(cx, cy)));
        lesions.push((
            lesion,
            Draft {
                label,
                location,
                laterality: lat,
                size_mm,
                severity: sev,
                mask: vec![0u8; size * size],
            },
        ));
    }

    let texture = Fbm::new(rng, 6, 3);
    let wobble = ValueNoise::new(rng, 6);
    let mut pixels = vec![0.0f32; size * size];
    let inv = 1.0 / size as f32;
    for py in 0..size {
        let v = (py as f32 + 0.5) * inv;
        for px in 0..size {
            let u = (px as f32 + 0.5) * inv;
            let (x, y) = pose.to_anatomy(u, v);
            let idx = py * size + px;
            let rho = head_rho(x, y) * (1.0 + 0.03 * (wobble.at(x, y) - 0.5));
            if rho > 1.0 {
                pixels[idx] = 0.02;
                continue;
            }
            let n = texture.at(x, y);
            let theta = (y - 0.5).atan2(x - 0.5);
            let mut parenchyma = false;
            let mut val = if rho > 0.955 {
                0.72 + 0.08 * n
            } else if rho > 0.9 {
                // Cortical bone (dark) around a marrow stripe.
                if (rho - 0.927).abs() < 0.01 {
                    0.38
                } else {
                    0.08
                }
            } else if rho > 0.88 {
                0.12
            } else {
                parenchyma = true;
                let gyr = (theta * 26.0 + gyri_phase + 9.0 * n).sin();
                let wm_edge = 0.7 + 0.05 * gyr + 0.06 * (n - 0.5);
                if rho < wm_edge {
                    0.66 + 0.05 * n
                } else if gyr > 0.8 && rho > wm_edge + 0.03 {
                    0.13
                } else {
                    0.42 + 0.05 * n
                }
            };
            if parenchyma {
                let ax = x - 0.5;
                // Deep grey nuclei.
                let dg = ((ax.abs() - 0.12) / 0.05).powi(2) + ((y - 0.51) / 0.08).powi(2);
                if dg < 1.0 {
                    val = 0.48 + 0.04 * n;
                }
                // Lateral ventricles: two tilted ellipses with frontal horns.
                let s = ax.signum();
                let (vx, vy) = (ax.abs() - 0.055 * vent_scale, y - 0.47);
                let (c, sn) = (0.2f32.cos(), 0.2f32.sin() * s);
                let (rxv, ryv) = (c * vx + sn * vy, -sn * vx + c * vy);
                let vent =
                    (rxv / (0.03 * vent_scale)).powi(2) + (ryv / (0.13 * vent_scale)).powi(2);
                if vent < 1.0 {
                    val = 0.1;
                }
                // Interhemispheric fissure.
                if ax.abs() < 0.006 && !(0.34..0.66).contains(&y) {
                    val = 0.14;
                }
            }
            for (lesion, draft) in lesions.iter_mut() {
                let inside = match *lesion {
                    Lesion::Tumour { cx, cy, r } => {
                        let d = ((x - cx).powi(2) + (y - cy).powi(2)).sqrt();
                        if d < r {
                            val = if d < 0.62 * r { 0.2 + 0.06 * n } else { 0.93 };
                            true
                        } else {
                            if d < 1.8 * r && parenchyma && val > 0.3 {
                                // Vasogenic oedema darkens white matter on T1.
                                val = val * 0.7 + 0.1;
                            }
                            false
                        }
                    }
                    Lesion::Haemorrhage { cx, cy, r } => {
                        let d = ((x - cx).powi(2) + (y - cy).powi(2)).sqrt();
                        if d < r {
                            val = if d > 0.85 * r { 0.25 } else { 0.9 + 0.05 * n };
                            true
                        } else {
                            false
                        }
                    }
                    Lesion::Infarct {
                        theta: t0,
                        half_width,
                        inner,
                    } => {
                        let mut dt = (theta - t0).abs();
                        if dt > PI {
                            dt = 2.0 * PI - dt;
                        }
                        if parenchyma && dt < half_width && rho > inner && val > 0.2 {
                            val = 0.2 + 0.05 * n;
                            true
                        } else {
                            false
                        }
                    }
                };
                if inside {
                    draft.mask[idx] = 255;
                }
            }
            pixels[idx] = val;
        }
    }
    Rendered {
        pixels,
        drafts: lesions.into_iter().map(|(_, d)| d).collect(),
    }
}

/// A point in one hemisphere (`hemi` -1 = image left) at normalised radius
/// between `rho_min` and `rho_max` of the head ellipse.
fn place<R: Rng>(
    rng: &mut R,
    hemi: f32,
    rx: f32,
    ry: f32,
    rho_min: f32,
    rho_max: f32,
) -> (f32, f32) {
    let rho = rng.random_range(rho_min..rho_max);
    // Angles within the hemisphere, away from the midline.
    let a = rng.random_range(-1.2..1.2f32);
    let theta = if hemi < 0.0 { PI - a } else { a };
    (0.5 + rho * rx * theta.cos(), 0.5 + rho * ry * theta.sin())
}
