//! Whether a device computes in a dtype, asked before any work: candle's CPU backend has no
//! bf16 matrix product, so a bf16 run on the CPU would otherwise fail deep inside the first
//! forward pass (after the weights were made), with an error that names an op, not the choice.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

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
                ", or a CUDA GPU (build with --features cuda) for bf16/f16"
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
}
