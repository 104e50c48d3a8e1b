//! VOI windowing: map values after the Modality LUT to display brightness in `[0, 1]`,
//! the way a radiologist reads them.
//!
//! The window function is DICOM's linear VOI LUT (PS3.3 C.11.2.1.2.1): with centre
//! `c` and width `w`, `x <= c - 0.5 - (w-1)/2` maps to 0, `x > c - 0.5 + (w-1)/2`
//! to 1, and values in between to `(x - (c - 0.5)) / (w - 1) + 0.5`.
//! MONOCHROME1 images are inverted after windowing (`1 - y`, PS3.3 C.7.6.3.1.2).
//!
//! Named CT presets (centre/width in HU), from the standard radiology windows
//! listed by Radiopaedia, "Windowing (CT)":
//!
//! | name          | centre | width |
//! |---------------|-------:|------:|
//! | `lung`        |   -600 |  1500 |
//! | `mediastinum` |     50 |   350 |
//! | `bone`        |    400 |  1800 |
//! | `brain`       |     40 |    80 |
//! | `abdomen`     |     50 |   400 |
//! | `soft-tissue` |     40 |   400 |

use std::str::FromStr;

use crate::error::{IoError, Result};
use crate::medimage::{Photometric, Plane};

/// Named CT windows (see the module table).
pub const PRESETS: &[(&str, f64, f64)] = &[
    ("lung", -600.0, 1500.0),
    ("mediastinum", 50.0, 350.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
    ("abdomen", 50.0, 400.0),
    ("soft-tissue", 40.0, 400.0),
];

/// How to map values to `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Window {
    /// No VOI: min-max scaling of the plane (for export and inspection).
    None,
    /// The file's first window if it has one, else percentile clipping 0.5–99.5 for grey
    /// images; 8/16-bit colour is divided by its maximum value. The default.
    Auto,
    /// The file's window number `k` (0-based); an error if the file has none.
    File(usize),
    /// Explicit centre and width (also what named presets resolve to).
    CenterWidth { center: f64, width: f64 },
    /// Clip to the `low`–`high` percentiles of the plane, then scale linearly.
    Percentile { low: f64, high: f64 },
}

impl Window {
    /// A named preset (`lung`, `mediastinum`, `bone`, `brain`, `abdomen`, `soft-tissue`).
    pub fn preset(name: &str) -> Option<Window> {
        let n = name.to_ascii_lowercase().replace('_', "-");
        let n = if n == "softtissue" || n == "soft" {
            "soft-tissue".to_string()
        } else {
            n
        };
        PRESETS
            .iter()
            .find(|(p, _, _)| *p == n)
            .map(|(_, c, w)| Window::CenterWidth {
                center: *c,
                width: *w,
            })
    }
}

impl FromStr for Window {
    type Err = IoError;
    /// Parse `none`, `auto`, `file`, `file:K`, a preset name, `C/W` (e.g. `-600/1500`)
    /// or `pLOW-HIGH` (e.g. `p0.5-99.5`).
    fn from_str(s: &str) -> Result<Window> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let bad = |why: &str| {
            IoError::InvalidArgument(format!(
                "invalid window '{t}': {why}; use none, auto, file, file:K, a preset ({}), C/W like -600/1500, or pLOW-HIGH like p1-99",
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            ))
        };
        match lower.as_str() {
            "none" => return Ok(Window::None),
            "auto" => return Ok(Window::Auto),
            "file" => return Ok(Window::File(0)),
            _ => {}
        }
        if let Some(k) = lower.strip_prefix("file:") {
            return k
                .parse()
                .map(Window::File)
                .map_err(|_| bad("bad window index"));
        }
        if let Some(w) = Window::preset(&lower) {
            return Ok(w);
        }
        if let Some(rest) = lower.strip_prefix('p') {
            let (a, b) = rest
                .split_once(['-', ','])
                .ok_or_else(|| bad("percentiles need LOW-HIGH"))?;
            let low: f64 = a.parse().map_err(|_| bad("bad low percentile"))?;
            let high: f64 = b.parse().map_err(|_| bad("bad high percentile"))?;
            if !(0.0..=100.0).contains(&low) || !(0.0..=100.0).contains(&high) || low >= high {
                return Err(bad("need 0 <= LOW < HIGH <= 100"));
            }
            return Ok(Window::Percentile { low, high });
        }
        if let Some((a, b)) = t.split_once('/') {
            let center: f64 = a.trim().parse().map_err(|_| bad("bad centre"))?;
            let width: f64 = b.trim().parse().map_err(|_| bad("bad width"))?;
            // Rust parses "inf" and "NaN" as numbers; neither makes a window.
            if !center.is_finite() {
                return Err(bad("the centre must be a finite number"));
            }
            if !width.is_finite() || width < 1.0 {
                return Err(bad("the width must be a finite number >= 1"));
            }
            return Ok(Window::CenterWidth { center, width });
        }
        Err(bad("unknown name"))
    }
}

/// Linear percentile of sorted values (NumPy's default "linear" method).
fn percentile_sorted(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let frac = pos - i as f64;
    let a = sorted[i] as f64;
    let b = sorted[(i + 1).min(sorted.len() - 1)] as f64;
    a + (b - a) * frac
}

/// Percentiles `low` and `high` of the non-NaN values (NumPy "linear" method).
pub fn percentiles(values: &[f32], low: f64, high: f64) -> (f64, f64) {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.len() < 4096 {
        v.sort_by(|a, b| a.total_cmp(b));
        return (percentile_sorted(&v, low), percentile_sorted(&v, high));
    }
    // Large planes: partial selection of the two neighbouring order statistics
    // instead of a full sort.
    let mut at = |q: f64| -> f64 {
        let pos = q / 100.0 * (v.len() - 1) as f64;
        let i = pos.floor() as usize;
        let frac = pos - i as f64;
        let (_, a, rest) = v.select_nth_unstable_by(i, |x, y| x.total_cmp(y));
        let a = *a as f64;
        let b = rest
            .iter()
            .copied()
            .min_by(|x, y| x.total_cmp(y))
            .map(|b| b as f64)
            .unwrap_or(a);
        a + (b - a) * frac
    };
    let lo = at(low);
    let hi = at(high);
    (lo, hi)
}

/// A resolved window function.
#[derive(Debug, Clone, Copy)]
enum Mapping {
    Zero,
    Linear { lo: f64, span: f64 },
    Voi { c: f64, w: f64 },
}

impl Mapping {
    #[inline]
    fn apply(self, x: f32) -> f32 {
        let x = x as f64;
        match self {
            Mapping::Zero => 0.0,
            Mapping::Linear { lo, span } => ((x - lo) / span).clamp(0.0, 1.0) as f32,
            Mapping::Voi { c, w } => {
                if x <= c - 0.5 - (w - 1.0) / 2.0 {
                    0.0
                } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                    1.0
                } else {
                    (((x - (c - 0.5)) / (w - 1.0).max(f64::MIN_POSITIVE)) + 0.5).clamp(0.0, 1.0)
                        as f32
                }
            }
        }
    }
}

/// Apply a window to a plane, returning values in `[0, 1]` (MONOCHROME1 inverted).
///
/// `file_windows` are the centre/width pairs stored in the file; `bits_stored`
/// scales colour images under [`Window::Auto`].
pub fn apply_window(
    plane: &Plane,
    window: &Window,
    file_windows: &[(f64, f64)],
    photometric: Photometric,
    bits_stored: Option<u16>,
) -> Result<Plane> {
    let linear = |lo: f64, hi: f64| {
        if hi > lo {
            Mapping::Linear { lo, span: hi - lo }
        } else {
            Mapping::Zero
        }
    };
    let voi = |c: f64, w: f64| Mapping::Voi { c, w };
    let f: Mapping = match window {
        Window::None => {
            let (lo, hi) = crate::medimage::min_max(&plane.data);
            linear(lo as f64, hi as f64)
        }
        Window::CenterWidth { center, width } => voi(*center, *width),
        Window::File(k) => {
            let (c, w) = file_windows.get(*k).copied().ok_or_else(|| {
                IoError::InvalidArgument(format!(
                    "window file:{k} requested but the file stores {} window(s)",
                    file_windows.len()
                ))
            })?;
            voi(c, w)
        }
        Window::Percentile { low, high } => {
            let (lo, hi) = percentiles(&plane.data, *low, *high);
            linear(lo, hi)
        }
        Window::Auto => {
            if plane.channels == 3 {
                let max = match bits_stored {
                    Some(b) if b <= 16 => ((1u32 << b) - 1) as f64,
                    _ => crate::medimage::min_max(&plane.data).1.max(1.0) as f64,
                };
                linear(0.0, max)
            } else if let Some(&(c, w)) = file_windows.first() {
                voi(c, w)
            } else {
                let (lo, hi) = percentiles(&plane.data, 0.5, 99.5);
                linear(lo, hi)
            }
        }
    };
    let invert = photometric == Photometric::Monochrome1;
    let data = plane
        .data
        .iter()
        .map(|&x| {
            let y = if x.is_nan() { 0.0 } else { f.apply(x) };
            if invert {
                1.0 - y
            } else {
                y
            }
        })
        .collect();
    Plane::new(plane.rows, plane.cols, plane.channels, data)
}
