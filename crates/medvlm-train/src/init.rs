//! Seeded (re-)initialisation of the task heads' parameters.
//!
//! Why it exists: candle's initialisers (`VarBuilder::from_varmap` with its `Init` rules) draw
//! from the thread's random generator, which the CPU device cannot seed, so two runs with the
//! same seed would start from different weights and train to different results. The heads of
//! `medvlm-tasks` are therefore built with candle and then re-drawn here: [`seeded_init`]
//! visits the parameters in the order given (name order, from
//! [`crate::optim::varmap_params`]) and fills each from one ChaCha8 generator seeded with
//! `seed ^ salt` (each head has its own salt, so a head's stream is not another's), as its
//! [`Init`] rule says. A seed thus gives the same head on every run and every machine.
//!
//! Each head keeps its rule (which parameters start at zero, at one, or from a normal or
//! uniform distribution of which width) in its own module, next to the layers it describes.
//! The contrastive models of [`crate::pretrain`] use per-parameter streams instead
//! ([`crate::pretrain::seeded_init`]).

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::optim::{NamedVar, OptimError, Result};

/// How one parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every value 0 (biases, zero-initialised output layers); draws nothing.
    Zeros,
    /// Every value 1 (normalisation scales); draws nothing.
    Ones,
    /// Values from `N(0, std^2)`, one draw per value.
    Normal {
        /// Standard deviation (finite, at least 0).
        std: f32,
    },
    /// Values uniform in `[-bound, bound)`, one draw per value.
    Uniform {
        /// Half-width (finite, above 0).
        bound: f32,
    },
}

/// The fan-in of a weight of shape `dims`: the product of all but the first dimension
/// (`[out, in]` of a linear layer, `[out, in, kh, kw]` of a convolution), at least 1.
pub fn fan_in(dims: &[usize]) -> usize {
    dims.iter().skip(1).product::<usize>().max(1)
}

/// The standard deviation of He et al.'s ("Delving Deep into Rectifiers", ICCV 2015)
/// Kaiming-normal initialisation, `sqrt(2 / fan_in)` (candle's and PyTorch's default gain for
/// ReLU-like activations), in f32.
pub fn kaiming_std(dims: &[usize]) -> f32 {
    (2.0 / fan_in(dims) as f32).sqrt()
}

/// Re-draws every parameter of `params`, in the order given, from one ChaCha8 generator seeded
/// with `seed ^ salt`: `rule(name, dims)` says how each starts (see the module documentation).
/// Only [`Init::Normal`] and [`Init::Uniform`] parameters advance the generator, one draw per
/// value in row-major order. An unusable width is an error naming the parameter.
pub fn seeded_init(
    params: &[NamedVar],
    seed: u64,
    salt: u64,
    rule: impl Fn(&str, &[usize]) -> Init,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    for (name, var) in params {
        let t = var.as_tensor();
        let dims = t.dims().to_vec();
        let n = t.elem_count();
        let values: Vec<f32> = match rule(name, &dims) {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal { std } => {
                let normal = Normal::new(0.0f32, std).map_err(|e| bad_width(name, e))?;
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
            Init::Uniform { bound } => {
                if !(bound.is_finite() && bound > 0.0) {
                    return Err(bad_width(name, format!("uniform bound {bound}")));
                }
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            }
        };
        var.set(&Tensor::from_vec(values, dims, t.device())?)?;
    }
    Ok(())
}

fn bad_width(name: &str, reason: impl std::fmt::Display) -> OptimError {
    OptimError::InvalidSetting {
        name: "initialisation",
        reason: format!("parameter `{name}`: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn var(dims: &[usize]) -> Var {
        Var::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The draws are exactly those of one `ChaCha8Rng::seed_from_u64(seed ^ salt)` stream
    /// taken in parameter order (normal, then uniform), constant parameters taking none: the
    /// trained heads and their recorded results depend on this order and generator.
    #[test]
    fn draws_in_parameter_order_from_one_salted_chacha8_stream() {
        let params: Vec<NamedVar> = vec![
            ("a.bias".into(), var(&[3])),
            ("a.weight".into(), var(&[2, 3])),
            ("b.scale".into(), var(&[4])),
            ("c.weight".into(), var(&[5])),
        ];
        let rule = |name: &str, dims: &[usize]| {
            if name.ends_with("bias") {
                Init::Zeros
            } else if name.ends_with("scale") {
                Init::Ones
            } else if dims.len() == 2 {
                Init::Normal { std: 0.5 }
            } else {
                Init::Uniform { bound: 0.25 }
            }
        };
        seeded_init(&params, 7, 0x5a17, rule).unwrap();

        let mut rng = ChaCha8Rng::seed_from_u64(7 ^ 0x5a17);
        let normal = Normal::new(0.0f32, 0.5).unwrap();
        let want_normal: Vec<f32> = (0..6).map(|_| normal.sample(&mut rng)).collect();
        let want_uniform: Vec<f32> = (0..5).map(|_| rng.random_range(-0.25f32..0.25)).collect();
        assert_eq!(values(&params[0].1), vec![0.0; 3]);
        assert_eq!(values(&params[1].1), want_normal);
        assert_eq!(values(&params[2].1), vec![1.0; 4]);
        assert_eq!(values(&params[3].1), want_uniform);
        assert!(want_uniform.iter().all(|v| v.abs() <= 0.25));
        assert_eq!(params[1].1.dims(), &[2, 3]);

        // Another salt is another stream.
        seeded_init(&params, 7, 0x5a18, rule).unwrap();
        assert_ne!(values(&params[1].1), want_normal);
    }

    #[test]
    fn fan_in_and_kaiming_width() {
        assert_eq!(fan_in(&[8, 3, 3, 3]), 27);
        assert_eq!(fan_in(&[8]), 1);
        assert_eq!(kaiming_std(&[4, 8]), 0.5);
    }

    #[test]
    fn an_unusable_width_names_the_parameter() {
        let params: Vec<NamedVar> = vec![("head.weight".into(), var(&[2]))];
        let e = seeded_init(&params, 0, 0, |_, _| Init::Normal { std: f32::NAN })
            .unwrap_err()
            .to_string();
        assert!(e.contains("head.weight"), "{e}");
        let e = seeded_init(&params, 0, 0, |_, _| Init::Uniform { bound: 0.0 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("head.weight"), "{e}");
    }
}
