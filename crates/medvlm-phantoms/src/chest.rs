//! Posteroanterior chest radiograph phantom.
//!
//! Anatomy in its own unit square (x to the image right = patient left, y
//! down): a torso ellipse of soft tissue; two lung fields (elliptic apices,
//! tapered bases cut by domed hemidiaphragms, the right one higher) with
//! vascular markings that fade from the hila; heart, mediastinum, trachea and
//! spine in the midline; clavicles and ten posterior ribs per side; a gastric
//! bubble under the left hemidiaphragm. Air is dark and dense tissue bright,
//! as on a radiograph. Findings change the anatomy where they are:
//! nodules and masses (dense, masses lobulated), pleural effusion (dependent
//! fluid with a meniscus hiding the costophrenic angle), pneumothorax (a
//! lucent rim without markings outside a visible pleural line),
//! cardiomegaly (cardiothoracic ratio above 0.5) and consolidation (patchy
//! dense airspace). One anatomy unit is 350 mm.

use rand::Rng;

use crate::noise::Fbm;
use crate::raster::Pose;
use crate::{Draft, Laterality, Rendered, Severity};

const MM_PER_UNIT: f32 = 350.0;

/// Lung field geometry of one side.
#[derive(Clone, Copy)]
struct Lung {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    /// Height of the costophrenic angle (lowest point of the lung).
    base: f32,
    /// Medial direction: +1 for the image-left lung (patient right).
    medial: f32,
}

impl Lung {
    #[inline]
    fn dome(&self, x: f32) -> f32 {
        let t = (x - self.cx) / self.rx;
        self.base - 0.07 * (1.0 - t * t).max(0.0)
    }

    #[inline]
    fn contains(&self, x: f32, y: f32) -> bool {
        if y > self.dome(x) {
            return false;
        }
        let dx = (x - self.cx) / self.rx;
        if y < self.cy {
            let dy = (y - self.cy) / self.ry;
            dx * dx + dy * dy < 1.0
        } else {
            // Below the equator the lateral wall tapers a little.
            let t = (y - self.cy) / (self.base - self.cy);
            dx.abs() < 1.0 - 0.2 * t * t
        }
    }

    fn zone(&self, y: f32) -> &'static str {
        let top = self.cy - self.ry;
        let t = (y - top) / (self.base - top);
        if t < 0.36 {
            ZONES[0]
        } else if t < 0.64 {
            ZONES[1]
        } else {
            ZONES[2]
        }
    }

    /// Patient side of this lung (radiological convention).
    fn laterality(&self) -> Laterality {
        if self.medial > 0.0 {
            Laterality::Right
        } else {
            Laterality::Left
        }
    }
}

enum Lesion {
    /// Round dense lesion; `lobes` are (amplitude, frequency, phase) of the
    /// border (empty for a nodule).
    Round {
        cx: f32,
        cy: f32,
        r: f32,
        density: f32,
        lobes: Vec<(f32, f32, f32)>,
    },
    Effusion {
        side: usize,
        level: f32,
    },
    Pneumothorax {
        side: usize,
        hx: f32,
        hy: f32,
        f: f32,
    },
    Cardiomegaly,
    Consolidation {
        side: usize,
        cx: f32,
        cy: f32,
        rx: f32,
        ry: f32,
    },
}

/// Lung zones, top to bottom.
const ZONES: [&str; 3] = ["upper", "mid", "lower"];
/// Where an effusion is described: small ones blunt the angle only.
const EFFUSION_SITES: [&str; 2] = ["costophrenic angle", "lung base"];
const CARDIAC_SITE: &str = "cardiac silhouette";

/// Every location [`render`] can give a finding of `label` ("right upper
/// zone", "left apex", ...); empty for a label it does not draw.
pub(crate) fn locations(label: &str) -> Vec<String> {
    let sides = [Laterality::Right, Laterality::Left];
    let sites: Vec<String> = match label {
        "nodule" | "mass" | "consolidation" => ZONES.iter().map(|z| format!("{z} zone")).collect(),
        "pleural_effusion" => EFFUSION_SITES.iter().map(|s| s.to_string()).collect(),
        "pneumothorax" => vec!["apex".to_string()],
        "cardiomegaly" => return vec![CARDIAC_SITE.to_string()],
        _ => return Vec::new(),
    };
    sides
        .iter()
        .flat_map(|lat| sites.iter().map(move |s| format!("{} {s}", lat.name())))
        .collect()
}

fn sample_in_lung<R: Rng>(
    rng: &mut R,
    lung: &Lung,
    heart: (f32, f32, f32, f32),
    margin: f32,
) -> (f32, f32) {
    for _ in 0..64 {
        let x = lung.cx + rng.random_range(-0.85..0.85) * lung.rx;
        let y = rng.random_range(lung.cy - lung.ry * 0.8..lung.base - 0.08);
        let hd = ((x - heart.0) / heart.2).powi(2) + ((y - heart.1) / heart.3).powi(2);
        if lung.contains(x - margin, y)
            && lung.contains(x + margin, y)
            && lung.contains(x, y + margin)
            && hd > 1.3
        {
            return (x, y);
        }
    }
    (lung.cx, lung.cy)
}

pub(crate) fn render<R: Rng>(rng: &mut R, size: usize, labels: &[&'static str]) -> Rendered {
    let pose = Pose::random(rng, 4.0, 0.05, 0.04);
    // Anatomical variation between patients.
    let lungs = [
        Lung {
            cx: 0.305 + rng.random_range(-0.01..0.01),
            cy: 0.44,
            rx: 0.155 + rng.random_range(-0.01..0.01),
            ry: 0.32 + rng.random_range(-0.02..0.02),
            base: 0.78 + rng.random_range(-0.02..0.02),
            medial: 1.0,
        },
        Lung {
            cx: 0.695 + rng.random_range(-0.01..0.01),
            cy: 0.44,
            rx: 0.155 + rng.random_range(-0.01..0.01),
            ry: 0.32 + rng.random_range(-0.02..0.02),
            base: 0.81 + rng.random_range(-0.02..0.02),
            medial: -1.0,
        },
    ];
    let cardiomegaly = labels.contains(&"cardiomegaly");
    let cm_extent: f32 = if cardiomegaly { rng.random() } else { 0.0 };
    // Heart: (cx, cy, rx, ry). Normal CTR ~0.42, cardiomegaly 0.55 - 0.7.
    let heart = if cardiomegaly {
        let rx = 0.17 + 0.05 * cm_extent;
        (0.57, 0.64, rx, 0.13 + 0.02 * cm_extent)
    } else {
        (0.555, 0.645, 0.125 + rng.random_range(-0.01..0.01), 0.11)
    };

    let mut lesions: Vec<(Lesion, Draft)> = Vec::new();
    for &label in labels {
        let side = rng.random_range(0..2usize);
        let lung = lungs[side];
        let extent: f32 = rng.random();
        let sev = Severity::from_unit(extent);
        let lat = lung.laterality();
        let (lesion, location, lat, size_mm) = match label {
            "nodule" | "mass" => {
                let count = if label == "nodule" && rng.random::<f32>() < 0.25 {
                    2
                } else {
                    1
                };
                for k in 0..count {
                    let lung = if k == 0 {
                        lung
                    } else {
                        lungs[rng.random_range(0..2usize)]
                    };
                    let r = if label == "nodule" {
                        0.022 + 0.018 * extent
                    } else {
                        0.055 + 0.04 * extent
                    };
                    let (cx, cy) = sample_in_lung(rng, &lung, heart, r * 0.7);
                    let lobes = if label == "mass" {
                        (0..3)
                            .map(|j| {
                                (
                                    rng.random_range(0.04..0.12),
                                    (2 + j) as f32 + rng.random_range(0..2) as f32,
                                    rng.random_range(0.0..std::f32::consts::TAU),
                                )
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let lesion = Lesion::Round {
                        cx,
                        cy,
                        r,
                        density: if label == "nodule" { 0.34 } else { 0.36 },
                        lobes,
                    };
                    let location = format!("{} {} zone", lung.laterality().name(), lung.zone(cy));
                    lesions.push((
                        lesion,
                        Draft {
                            label,
                            location,
                            laterality: lung.laterality(),
                            size_mm: 2.0 * r * MM_PER_UNIT,
                            severity: sev,
                            mask: Vec::new(),
                        },
                    ));
                }
                continue;
            }
            "pleural_effusion" => {
                let level = lung.base - 0.07 - 0.26 * extent;
                let loc = if extent < 0.34 {
                    EFFUSION_SITES[0]
                } else {
                    EFFUSION_SITES[1]
                };
                (
                    Lesion::Effusion { side, level },
                    format!("{} {loc}", lat.name()),
                    lat,
                    (lung.base - level) * MM_PER_UNIT,
                )
            }
            "pneumothorax" => {
                let f = 0.9 - 0.25 * extent;
                let hx = lung.cx + lung.medial * 0.04;
                let hy = lung.cy + 0.07;
                (
                    Lesion::Pneumothorax { side, hx, hy, f },
                    format!("{} apex", lat.name()),
                    lat,
                    (1.0 - f) * lung.rx * MM_PER_UNIT,
                )
            }
            "cardiomegaly" => (
                Lesion::Cardiomegaly,
                CARDIAC_SITE.to_string(),
                Laterality::None,
                2.0 * heart.2 * MM_PER_UNIT,
            ),
            _ => {
                let rx = 0.06 + 0.05 * extent;
                let ry = 0.07 + 0.05 * extent;
                let (cx, cy) = sample_in_lung(rng, &lung, heart, rx * 0.5);
                (
                    Lesion::Consolidation {
                        side,
                        cx,
                        cy,
                        rx,
                        ry,
                    },
                    format!("{} {} zone", lat.name(), lung.zone(cy)),
                    lat,
                    2.0 * rx.max(ry) * MM_PER_UNIT,
                )
            }
        };
        let sev = if label == "cardiomegaly" {
            Severity::from_unit(cm_extent)
        } else {
            sev
        };
        lesions.push((
            lesion,
            Draft {
                label,
                location,
                laterality: lat,
                size_mm,
                severity: sev,
                mask: Vec::new(),
            },
        ));
    }
    for (_, d) in lesions.iter_mut() {
        d.mask = vec![0u8; size * size];
    }

    let markings = Fbm::new(rng, 10, 3);
    let tissue = Fbm::new(rng, 4, 2);
    let patchy = Fbm::new(rng, 8, 2);
    let mut pixels = vec![0.0f32; size * size];
    let inv = 1.0 / size as f32;
    for py in 0..size {
        let v = (py as f32 + 0.5) * inv;
        for px in 0..size {
            let u = (px as f32 + 0.5) * inv;
            let (x, y) = pose.to_anatomy(u, v);
            // Superelliptic torso: square shoulders, straight flanks.
            let tdx = (x - 0.5) / 0.46;
            let tdy = (y - 0.64) / 0.6;
            let in_torso = tdx * tdx * tdx.abs() + tdy * tdy * tdy.abs() < 1.0;
            let idx = py * size + px;
            if !in_torso {
                pixels[idx] = 0.04 + 0.03 * tissue.at(x, y);
                continue;
            }
            // Soft tissue, denser towards the edges of the torso.
            let mut val = 0.48 + 0.08 * (tdx * tdx) + 0.06 * tissue.at(x, y);
            let side = usize::from(x >= 0.5);
            let lung = &lungs[side];
            let in_lung = lung.contains(x, y);
            // Vessel markings are only needed inside the lungs.
            let m = if in_lung { markings.at(x, y) } else { 0.5 };
            let mut lung_val = 0.0;
            if in_lung {
                let hilum_x = lung.cx + lung.medial * 0.1;
                let d = ((x - hilum_x).powi(2) + (y - 0.47).powi(2)).sqrt();
                let near_hilum = (1.0 - d / 0.28).clamp(0.0, 1.0);
                // Ridges of the noise look like branching vessels.
                let ridge = 1.0 - (2.0 * m - 1.0).abs();
                lung_val = 0.17 + (0.05 + 0.12 * near_hilum) * ridge * ridge + 0.05 * near_hilum;
                val = lung_val;
            }
            // Gastric bubble under the left hemidiaphragm.
            let gb = ((x - 0.66) / 0.06).powi(2) + ((y - lungs[1].base - 0.04) / 0.03).powi(2);
            if gb < 1.0 {
                val = 0.22;
            }
            // Mediastinum, trachea and spine.
            let ax = (x - 0.5).abs();
            let med_half = if y < 0.32 { 0.055 } else { 0.075 };
            if ax < med_half && y > 0.02 {
                val = val.max(0.58);
                if ax < 0.016 && y < 0.34 {
                    val = 0.32;
                }
            }
            if ax < 0.03 {
                val += 0.06 + 0.03 * (y * 90.0).sin().max(0.0);
            }
            // Heart (and its lesion).
            let hd = ((x - heart.0) / heart.2).powi(2) + ((y - heart.1) / heart.3).powi(2);
            if hd < 1.0 {
                val = val.max(0.6 + 0.03 * (1.0 - hd));
            }
            // Posterior ribs: descending arcs, one O(1) test per pixel.
            if y < lung.base + 0.03 && ax > 0.04 {
                let t = (ax / 0.36).min(1.2);
                // 4 s (1 - s) stands in for sin(pi s): same arc, no sine.
                let s = (0.8 * t).min(1.0);
                let base = y + 0.06 * 4.0 * s * (1.0 - s) - 0.05 * t - 0.1;
                let k = base / 0.068;
                let kf = k.round();
                let d = ((k - kf) * 0.068).abs();
                if (0.0..10.0).contains(&kf) && d < 0.012 {
                    // Cortical edges are denser than the middle of a rib.
                    val += if d > 0.008 { 0.075 } else { 0.05 };
                }
            }
            // Clavicles.
            if ax > 0.03 && ax < 0.31 {
                let cy = 0.165 - 0.2 * (ax - 0.03);
                if (y - cy).abs() < 0.013 {
                    val += 0.12;
                }
            }
            // Findings.
            for (lesion, draft) in lesions.iter_mut() {
                let inside = match *lesion {
                    Lesion::Round {
                        cx,
                        cy,
                        r,
                        density,
                        ref lobes,
                    } => {
                        let dx = x - cx;
                        let dy = y - cy;
                        let d2 = dx * dx + dy * dy;
                        let mut rr = r;
                        if !lobes.is_empty() {
                            let a = dy.atan2(dx);
                            rr *= 1.0
                                + lobes
                                    .iter()
                                    .map(|(amp, f, ph)| amp * (f * a + ph).cos())
                                    .sum::<f32>();
                        }
                        if d2 < rr * rr {
                            let q = d2 / (rr * rr);
                            val += density * (1.0 - q * q);
                            true
                        } else {
                            false
                        }
                    }
                    Lesion::Effusion { side: s, level } => {
                        let l = &lungs[s];
                        let lateral = ((x - l.cx) * -l.medial / l.rx).clamp(-1.0, 1.0);
                        // Meniscus: the fluid climbs the lateral chest wall.
                        let top = level - 0.05 * (lateral + 1.0);
                        if s == side && y > top && l.contains(x, y) {
                            val = 0.55 + 0.04 * m;
                            true
                        } else {
                            false
                        }
                    }
                    Lesion::Pneumothorax { side: s, hx, hy, f } => {
                        if s == side && in_lung {
                            let l = &lungs[s];
                            let e =
                                ((x - hx) / (l.rx * f)).powi(2) + ((y - hy) / (l.ry * f)).powi(2);
                            if e > 1.0 {
                                // No lung markings beyond the pleural edge.
                                val = 0.07 + (val - lung_val).max(0.0);
                                true
                            } else {
                                if e > 0.9 {
                                    val += 0.12;
                                }
                                false
                            }
                        } else {
                            false
                        }
                    }
                    Lesion::Cardiomegaly => hd < 1.0,
                    Lesion::Consolidation {
                        side: s,
                        cx,
                        cy,
                        rx,
                        ry,
                    } => {
                        if s == side && in_lung {
                            let e = ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2);
                            let p = patchy.at(x, y);
                            if e + 0.6 * (p - 0.5) < 1.0 {
                                val += 0.2 + 0.12 * p;
                                true
                            } else {
                                false
                            }
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
