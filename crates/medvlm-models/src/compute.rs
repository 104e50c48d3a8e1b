//! Whether a device computes in a dtype, asked before any work: candle's CPU backend has no
//! bf16 matrix product, so a bf16 run on the CPU would otherwise fail deep inside the first
//! forward pass (after the weights were made), with an error that names an op, not the choice.
//!
//! [`compute_plan`] says how a requested dtype runs: natively (candle's kernels in that
//! dtype: f32 anywhere, bf16/f16 on a GPU), or, for bf16 on the CPU, with f32 tensors and the
//! linear layers' products in bf16 ([`ComputePlan::CpuBf16Linear`], PyTorch CPU autocast's
//! split: [`crate::bf16_gemm`]).

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// How a requested compute dtype runs on a device ([`compute_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputePlan {
    /// Weights and activations in this dtype, through candle's kernels.
    Native(DType),
    /// bf16 on the CPU: weights and activations f32; every linear layer's product in bf16
    /// (weights rounded and packed once, inputs rounded to nearest even in each pass) with f32
    /// accumulation; layer norm, softmax, activations, attention and convolutions in f32.
    /// Build the model in [`ComputePlan::storage_dtype`] (f32), then call
    /// [`crate::LinearLayers::pack_linear_bf16`].
    CpuBf16Linear,
}

impl ComputePlan {
    /// The dtype to build the weights and inputs in.
    pub fn storage_dtype(&self) -> DType {
        match self {
            ComputePlan::Native(d) => *d,
            ComputePlan::CpuBf16Linear => DType::F32,
        }
    }

    /// A short description for logs and benchmark output.
    pub fn describe(&self) -> String {
        match self {
            ComputePlan::Native(d) => format!("{d:?}"),
            ComputePlan::CpuBf16Linear => {
                "BF16 linear layers (f32 accumulation), F32 elsewhere".to_string()
            }
        }
    }
}

/// How `dtype` runs on `device`, or an error that says what to use instead, decided before
/// any weights are made. bf16 on the CPU is [`ComputePlan::CpuBf16Linear`] where the CPU has
/// AVX512-BF16 (refused elsewhere: the portable product would be slower than f32); every
/// other combination is [`check_compute_dtype`]'s native probe.
pub fn compute_plan(dtype: DType, device: &Device) -> Result<ComputePlan> {
    compute_plan_with(dtype, device, crate::bf16_gemm::cpu_has_bf16_dot())
}

/// [`compute_plan`] with the CPU's bf16 support given (`cpu_bf16`: the result of
/// [`crate::bf16_gemm::cpu_has_bf16_dot`]), so the refusal can be tested on any CPU.
pub fn compute_plan_with(dtype: DType, device: &Device, cpu_bf16: bool) -> Result<ComputePlan> {
    if dtype == DType::BF16 && device.is_cpu() {
        crate::bf16_gemm::cpu_support(cpu_bf16).map_err(ModelError::Invalid)?;
        return Ok(ComputePlan::CpuBf16Linear);
    }
    check_compute_dtype(dtype, device)?;
    Ok(ComputePlan::Native(dtype))
}

/// `Ok` when `device` runs the ops of the encoders (matrix product, softmax, layer norm's
/// reductions) in `dtype`; otherwise an error that names the dtype, the device and what
/// works instead.
pub fn check_compute_dtype(dtype: DType, device: &Device) -> Result<()> {
    // The ops and layouts the encoders use: a patch-embedding convolution (candle's CPU
    // convolution multiplies with its own kernel, which has no bf16 path even where the
    // plain matrix product widens bf16 to f32), a linear layer (batched input times a
    // transposed weight) and attention (4-D batched products with a transposed operand).
    let probe = || -> candle_core::Result<()> {
        let img = Tensor::ones((1, 3, 8, 8), dtype, device)?;
        let kernel = Tensor::ones((4, 3, 4, 4), dtype, device)?;
        let _ = img.conv2d(&kernel, 0, 4, 1, 1)?;
        let x = Tensor::ones((2, 3, 4), dtype, device)?;
        let w = Tensor::ones((5, 4), dtype, device)?;
        let _ = x.broadcast_matmul(&w.t()?)?;
        let q = Tensor::ones((1, 2, 3, 4), dtype, device)?;
        let scores = q.matmul(&q.transpose(2, 3)?)?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        let _ = attn.matmul(&q)?;
        let _ = x.sum_keepdim(2)?.sqrt()?;
        Ok(())
    };
    probe().map_err(|e| {
        let what = e.to_string();
        let op = what.lines().next().unwrap_or("").to_string();
        let device_name = if device.is_cpu() {
            "the CPU".to_string()
        } else {
            format!("{device:?}")
        };
        ModelError::Invalid(format!(
            "{dtype:?} compute is not supported on {device_name} by candle ({op}); use f32{}",
            if device.is_cpu() {
                ", bf16 (linear layers in bf16, on CPUs with AVX512-BF16), or a CUDA GPU \
                 (build with --features cuda) for bf16/f16"
            } else {
                ""
            }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_runs_on_the_cpu_and_an_unsupported_dtype_is_named() {
        check_compute_dtype(DType::F32, &Device::Cpu).unwrap();
        // candle's CPU convolution has no bf16 kernel (the case `bench embed --dtype bf16`
        // hit); if a later candle adds one, the probe passes, and then so must a real one.
        match check_compute_dtype(DType::BF16, &Device::Cpu) {
            Ok(()) => {
                let img = Tensor::ones((1, 3, 16, 16), DType::BF16, &Device::Cpu).unwrap();
                let k = Tensor::ones((2, 3, 16, 16), DType::BF16, &Device::Cpu).unwrap();
                assert!(
                    img.conv2d(&k, 0, 16, 1, 1).is_ok(),
                    "the probe and a real conv disagree"
                );
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("BF16") && msg.contains("use f32"), "{msg}");
                assert!(!msg.contains("   0:"), "no stack trace: {msg}");
            }
        }
    }

    #[test]
    fn bf16_on_the_cpu_is_the_linear_layer_plan_or_a_refusal_naming_the_instruction() {
        let cpu = Device::Cpu;
        assert_eq!(
            compute_plan_with(DType::BF16, &cpu, true).unwrap(),
            ComputePlan::CpuBf16Linear
        );
        assert_eq!(ComputePlan::CpuBf16Linear.storage_dtype(), DType::F32);
        let e = compute_plan_with(DType::BF16, &cpu, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("AVX512-BF16") && e.contains("use f32"), "{e}");
        assert_eq!(
            compute_plan_with(DType::F32, &cpu, false).unwrap(),
            ComputePlan::Native(DType::F32)
        );
        // f16 on the CPU stays as before: candle's probe decides (its convolution refuses).
        assert_eq!(
            compute_plan_with(DType::F16, &cpu, true).is_ok(),
            check_compute_dtype(DType::F16, &cpu).is_ok()
        );
    }
}
