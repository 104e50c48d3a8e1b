//! Metrics of deformable image registration on 2-D displacement fields: end-point error
//! against a known field, the share of folded pixels (non-positive Jacobian determinant), and
//! Dice of masks carried by the predicted transform, with the field algebra they need
//! (bilinear pull-back warp, composition, numerical inverse).
//!
//! # Convention
//!
//! A *field* is a displacement in pixels stored planar, `[2, H, W]` flattened: `field[..H*W]`
//! is `dx`, `field[H*W..]` is `dy` (the phantoms' `deformation/<id>.npy` layout). It describes
//! the transform `T(x) = x + u(x)` and is used as a **pull-back** (backward warp):
//! `warped(x) = image(T(x))`, bilinear, coordinates clamped to the image (replicated border).
//! The phantom generator makes `moved = image ∘ T_u` this way, so registering `moved` back
//! onto `image` needs the field `w` with `moved ∘ T_w = image`, i.e. `T_u ∘ T_w = id`:
//! `w(x) + u(x + w(x)) = 0`, the inverse ([`invert`]). End-point error compares a predicted
//! pull-back field with that inverse, pixel by pixel, in pixels.
//!
//! Folding follows the usual registration reports (e.g. VoxelMorph, Balakrishnan et al., IEEE
//! TMI 2019; Learn2Reg): the share of pixels where `det(∇T) = (1 + ∂x dx)(1 + ∂y dy) - ∂y dx
//! ∂x dy <= 0`, with central differences inside and one-sided differences on the border (as
//! `numpy.gradient`).

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

fn check_field(what: &'static str, field: &[f32], (h, w): (usize, usize)) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(EvalError::Empty("field of zero size"));
    }
    if field.len() != 2 * h * w {
        return Err(EvalError::LengthMismatch {
            what,
            got: field.len(),
            expected: 2 * h * w,
        });
    }
    if let Some(position) = field.iter().position(|v| !v.is_finite()) {
        return Err(EvalError::NonFinite { what, position });
    }
    Ok(())
}

/// Bilinear sample of a single-channel `h x w` image at `(sx, sy)` (pixel units), the
/// coordinates clamped to the image first.
fn sample(img: &[f32], (h, w): (usize, usize), sx: f32, sy: f32) -> f32 {
    let sx = sx.clamp(0.0, (w - 1) as f32);
    let sy = sy.clamp(0.0, (h - 1) as f32);
    let x0 = (sx.floor() as usize).min(w.saturating_sub(2));
    let y0 = (sy.floor() as usize).min(h.saturating_sub(2));
    let x1 = (x0 + 1).min(w - 1);
    let y1 = (y0 + 1).min(h - 1);
    let tx = sx - x0 as f32;
    let ty = sy - y0 as f32;
    let top = img[y0 * w + x0] * (1.0 - tx) + img[y0 * w + x1] * tx;
    let bottom = img[y1 * w + x0] * (1.0 - tx) + img[y1 * w + x1] * tx;
    top * (1.0 - ty) + bottom * ty
}

/// Pull-back warp of a single-channel `h x w` image: `out(x) = image(x + field(x))`,
/// bilinear, clamped border (see the module documentation).
pub fn warp(image: &[f32], field: &[f32], shape: (usize, usize)) -> Result<Vec<f32>> {
    check_field("field", field, shape)?;
    let (h, w) = shape;
    if image.len() != h * w {
        return Err(EvalError::LengthMismatch {
            what: "image",
            got: image.len(),
            expected: h * w,
        });
    }
    let n = h * w;
    let mut out = vec![0f32; n];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            out[i] = sample(image, shape, x as f32 + field[i], y as f32 + field[n + i]);
        }
    }
    Ok(out)
}

/// A 0/1 mask carried by a pull-back field: the mask warped bilinearly as a fraction and
/// thresholded at 0.5.
pub fn warp_mask(mask: &[u8], field: &[f32], shape: (usize, usize)) -> Result<Vec<u8>> {
    let soft: Vec<f32> = mask.iter().map(|&m| f32::from(u8::from(m > 0))).collect();
    Ok(warp(&soft, field, shape)?
        .into_iter()
        .map(|v| u8::from(v >= 0.5))
        .collect())
}

/// The field of `T_outer ∘ T_inner` (first `inner`, then `outer`):
/// `c(x) = inner(x) + outer(x + inner(x))`, `outer` sampled bilinearly. Warping with `c`
/// equals warping with `outer` and then with `inner` (pull-backs compose in reverse).
pub fn compose(outer: &[f32], inner: &[f32], shape: (usize, usize)) -> Result<Vec<f32>> {
    check_field("outer field", outer, shape)?;
    check_field("inner field", inner, shape)?;
    let (h, w) = shape;
    let n = h * w;
    let (ox, oy) = outer.split_at(n);
    let mut out = vec![0f32; 2 * n];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let sx = x as f32 + inner[i];
            let sy = y as f32 + inner[n + i];
            out[i] = inner[i] + sample(ox, shape, sx, sy);
            out[n + i] = inner[n + i] + sample(oy, shape, sx, sy);
        }
    }
    Ok(out)
}

/// The inverse of a field by fixed-point iteration, `w <- -u(x + w(x))` (`iterations` times,
/// from `w = -u`): the field with `T_u ∘ T_w = id`. Converges when the field's gradient is
/// below 1 in norm, as for smooth, invertible fields; [`inverse_residual`] says how well.
pub fn invert(field: &[f32], shape: (usize, usize), iterations: usize) -> Result<Vec<f32>> {
    check_field("field", field, shape)?;
    let (h, w) = shape;
    let n = h * w;
    let (ux, uy) = field.split_at(n);
    let mut inv: Vec<f32> = field.iter().map(|v| -v).collect();
    for _ in 0..iterations {
        let mut next = vec![0f32; 2 * n];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let sx = x as f32 + inv[i];
                let sy = y as f32 + inv[n + i];
                next[i] = -sample(ux, shape, sx, sy);
                next[n + i] = -sample(uy, shape, sx, sy);
            }
        }
        inv = next;
    }
    Ok(inv)
}

/// Mean norm (pixels) of `T_u ∘ T_w - id`, i.e. of `compose(u, w)`: 0 when `w` inverts `u`.
pub fn inverse_residual(field: &[f32], inverse: &[f32], shape: (usize, usize)) -> Result<f64> {
    let c = compose(field, inverse, shape)?;
    let n = shape.0 * shape.1;
    Ok(c[..n]
        .iter()
        .zip(&c[n..])
        .map(|(a, b)| f64::from(a.hypot(*b)))
        .sum::<f64>()
        / n as f64)
}

/// Determinant of the Jacobian of `T(x) = x + u(x)` at every pixel (`h x w`, row-major):
/// central differences inside, one-sided on the border.
pub fn jacobian_determinant(field: &[f32], shape: (usize, usize)) -> Result<Vec<f32>> {
    check_field("field", field, shape)?;
    let (h, w) = shape;
    let n = h * w;
    let d_dx = |plane: &[f32], y: usize, x: usize| -> f32 {
        if w == 1 {
            return 0.0;
        }
        let (a, b) = (x.saturating_sub(1), (x + 1).min(w - 1));
        (plane[y * w + b] - plane[y * w + a]) / (b - a) as f32
    };
    let d_dy = |plane: &[f32], y: usize, x: usize| -> f32 {
        if h == 1 {
            return 0.0;
        }
        let (a, b) = (y.saturating_sub(1), (y + 1).min(h - 1));
        (plane[b * w + x] - plane[a * w + x]) / (b - a) as f32
    };
    let (ux, uy) = field.split_at(n);
    let mut det = vec![0f32; n];
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (1.0 + d_dx(ux, y, x), d_dy(ux, y, x));
            let (c, d) = (d_dx(uy, y, x), 1.0 + d_dy(uy, y, x));
            det[y * w + x] = a * d - b * c;
        }
    }
    Ok(det)
}

/// Share of pixels (0..1) whose Jacobian determinant is `<= 0` (folding).
pub fn folding_share(field: &[f32], shape: (usize, usize)) -> Result<f64> {
    let det = jacobian_determinant(field, shape)?;
    Ok(det.iter().filter(|&&d| d <= 0.0).count() as f64 / det.len() as f64)
}

/// Mean end-point error (pixels): the mean over pixels of `|pred(x) - truth(x)|`.
pub fn endpoint_error(pred: &[f32], truth: &[f32], shape: (usize, usize)) -> Result<f64> {
    check_field("predicted field", pred, shape)?;
    check_field("reference field", truth, shape)?;
    let n = shape.0 * shape.1;
    Ok((0..n)
        .map(|i| f64::from((pred[i] - truth[i]).hypot(pred[n + i] - truth[n + i])))
        .sum::<f64>()
        / n as f64)
}

/// One registered pair's metrics. Dice values are `None` when the pair has no mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationCase {
    /// Mean end-point error of the predicted field (pixels).
    pub epe: f64,
    /// The identity's end-point error (the reference field's mean norm).
    pub epe_identity: f64,
    /// Share of folded pixels of the predicted transform.
    pub folding: f64,
    /// Dice of the moving mask and the fixed mask (no registration).
    pub dice_before: Option<f64>,
    /// Dice of the moving mask warped by the predicted field and the fixed mask.
    pub dice_after: Option<f64>,
}

impl RegistrationCase {
    /// Metrics of one pair: `pred` and `truth` pull-back fields moving -> fixed; with masks,
    /// `moving_mask` is warped by `pred` and compared with `fixed_mask`.
    pub fn new(
        pred: &[f32],
        truth: &[f32],
        shape: (usize, usize),
        masks: Option<(&[u8], &[u8])>,
    ) -> Result<Self> {
        let zero = vec![0f32; pred.len()];
        let (dice_before, dice_after) = match masks {
            Some((moving, fixed)) => {
                let warped = warp_mask(moving, pred, shape)?;
                (
                    crate::segmentation::dice(moving, fixed, shape)?,
                    crate::segmentation::dice(&warped, fixed, shape)?,
                )
            }
            None => (None, None),
        };
        Ok(Self {
            epe: endpoint_error(pred, truth, shape)?,
            epe_identity: endpoint_error(&zero, truth, shape)?,
            folding: folding_share(pred, shape)?,
            dice_before,
            dice_after,
        })
    }
}

/// Means over pairs (Dice over the pairs that have masks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationSummary {
    /// Number of pairs.
    pub pairs: usize,
    /// Number of pairs with a mask.
    pub pairs_with_masks: usize,
    /// Mean end-point error (pixels).
    pub epe: f64,
    /// Mean end-point error of the identity (pixels).
    pub epe_identity: f64,
    /// Mean share of folded pixels.
    pub folding: f64,
    /// Largest share of folded pixels of any pair.
    pub folding_max: f64,
    /// Mean Dice before registration.
    pub dice_before: Option<f64>,
    /// Mean Dice after registration.
    pub dice_after: Option<f64>,
}

impl RegistrationSummary {
    /// Summary of `cases`; an error when there are none.
    pub fn new(cases: &[RegistrationCase]) -> Result<Self> {
        if cases.is_empty() {
            return Err(EvalError::Empty("no registration cases"));
        }
        let n = cases.len() as f64;
        let mean = |f: &dyn Fn(&RegistrationCase) -> f64| cases.iter().map(f).sum::<f64>() / n;
        let before: Vec<f64> = cases.iter().filter_map(|c| c.dice_before).collect();
        let after: Vec<f64> = cases.iter().filter_map(|c| c.dice_after).collect();
        let avg = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        Ok(Self {
            pairs: cases.len(),
            pairs_with_masks: after.len(),
            epe: mean(&|c| c.epe),
            epe_identity: mean(&|c| c.epe_identity),
            folding: mean(&|c| c.folding),
            folding_max: cases.iter().map(|c| c.folding).fold(0.0, f64::max),
            dice_before: avg(&before),
            dice_after: avg(&after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant(shape: (usize, usize), dx: f32, dy: f32) -> Vec<f32> {
        let n = shape.0 * shape.1;
        let mut f = vec![dx; 2 * n];
        f[n..].iter_mut().for_each(|v| *v = dy);
        f
    }

    #[test]
    fn integer_shift_is_exact_inside_and_clamped_outside() {
        let shape = (5, 6);
        let img: Vec<f32> = (0..30).map(|v| v as f32).collect();
        let out = warp(&img, &constant(shape, 1.0, 2.0), shape).unwrap();
        // out[y, x] = img[y + 2, x + 1] inside.
        assert_eq!(out[6 + 2], img[3 * 6 + 3]);
        assert_eq!(out[0], img[2 * 6 + 1]);
        // Last column samples x = 6, clamped to 5.
        assert_eq!(out[5], img[2 * 6 + 5]);
    }

    #[test]
    fn half_pixel_shift_averages_neighbours() {
        let shape = (1, 4);
        let img = [0.0, 2.0, 4.0, 8.0];
        let out = warp(&img, &constant(shape, 0.5, 0.0), shape).unwrap();
        assert_eq!(out, vec![1.0, 3.0, 6.0, 8.0]);
    }

    #[test]
    fn jacobian_of_an_affine_field_is_its_determinant() {
        // u(x, y) = A (x, y) with A = [[0.2, 0.1], [-0.3, 0.5]]: det(I + A) = 1.2*1.5+0.03.
        let shape = (6, 7);
        let n = 42;
        let mut f = vec![0f32; 2 * n];
        for y in 0..6 {
            for x in 0..7 {
                f[y * 7 + x] = 0.2 * x as f32 + 0.1 * y as f32;
                f[n + y * 7 + x] = -0.3 * x as f32 + 0.5 * y as f32;
            }
        }
        let det = jacobian_determinant(&f, shape).unwrap();
        assert!(det.iter().all(|d| (d - 1.83).abs() < 1e-5), "{det:?}");
        assert_eq!(folding_share(&f, shape).unwrap(), 0.0);
        // A reflection x -> -x (u = -2x) folds everywhere.
        let mut r = vec![0f32; 2 * n];
        for y in 0..6 {
            for x in 0..7 {
                r[y * 7 + x] = -2.0 * x as f32;
            }
        }
        assert_eq!(folding_share(&r, shape).unwrap(), 1.0);
    }

    #[test]
    fn endpoint_error_of_known_fields() {
        let shape = (3, 3);
        let a = constant(shape, 3.0, 4.0);
        let z = constant(shape, 0.0, 0.0);
        assert!((endpoint_error(&a, &z, shape).unwrap() - 5.0).abs() < 1e-12);
        assert_eq!(endpoint_error(&a, &a, shape).unwrap(), 0.0);
        assert!(endpoint_error(&a, &a[..9], shape).is_err());
    }

    #[test]
    fn inverse_of_a_smooth_field_composes_to_identity() {
        let (h, w) = (16, 16);
        let n = h * w;
        let mut u = vec![0f32; 2 * n];
        for y in 0..h {
            for x in 0..w {
                u[y * w + x] = 1.5 * ((y as f32) * 0.3).sin();
                u[n + y * w + x] = 1.0 * ((x as f32) * 0.25).cos();
            }
        }
        let inv = invert(&u, (h, w), 30).unwrap();
        let naive: Vec<f32> = u.iter().map(|v| -v).collect();
        let good = inverse_residual(&u, &inv, (h, w)).unwrap();
        let bad = inverse_residual(&u, &naive, (h, w)).unwrap();
        assert!(good < 0.02 && bad > 0.1, "{good} {bad}");
    }

    #[test]
    fn dice_before_and_after_on_a_known_shift() {
        // A 4x4 square moved right by 2: the true pull-back moving -> fixed is dx = +2.
        let shape = (10, 10);
        let mut fixed = vec![0u8; 100];
        let mut moving = vec![0u8; 100];
        for y in 3..7 {
            for x in 2..6 {
                fixed[y * 10 + x] = 1;
                moving[y * 10 + x + 2] = 1;
            }
        }
        let truth = constant(shape, 2.0, 0.0);
        let c = RegistrationCase::new(&truth, &truth, shape, Some((&moving, &fixed))).unwrap();
        assert_eq!(c.dice_before, Some(0.5));
        assert_eq!(c.dice_after, Some(1.0));
        assert_eq!(c.epe, 0.0);
        assert!((c.epe_identity - 2.0).abs() < 1e-12);
        let s = RegistrationSummary::new(&[c]).unwrap();
        assert_eq!((s.pairs, s.pairs_with_masks), (1, 1));
        assert!(RegistrationSummary::new(&[]).is_err());
    }

    #[test]
    fn bad_fields_are_errors() {
        assert!(warp(&[0.0; 4], &[0.0; 6], (2, 2)).is_err());
        assert!(warp(&[0.0; 3], &[0.0; 8], (2, 2)).is_err());
        assert!(folding_share(&[f32::NAN; 8], (2, 2)).is_err());
        assert!(jacobian_determinant(&[], (0, 0)).is_err());
    }
}
