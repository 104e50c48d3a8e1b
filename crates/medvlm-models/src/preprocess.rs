//! Image preprocessing from a model's own config: resize (bicubic by
//! default), centre crop, rescale to `[0, 1]`, normalise with mean/std,
//! output `[3, H, W]` channel-first. Grey images are replicated to three
//! channels (as PIL's `convert("RGB")` does in the HF processors).
//!
//! Read from HF `preprocessor_config.json` (`CLIPImageProcessor`:
//! `size.shortest_edge` + `crop_size`; `SiglipImageProcessor`:
//! `size.height/width`, no crop) or built from open_clip's `preprocess_cfg`.
//!
//! Resampling uses the `image` crate's separable filters in f32
//! (Catmull-Rom = PIL bicubic with a = -0.5, support widened when
//! downsampling like PIL), and clamps to `[0, 1]` after resizing as PIL's
//! 8-bit output does. PIL rounds the resized image to 8 bits; we do not, so
//! results differ from HF by up to about one grey level (≈ 1e-2 after
//! normalisation); the model parity tests feed identical pixel values instead.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, Rgb};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Resampling filter (PIL codes in HF configs: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resample {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Resample {
    fn from_pil(code: i64) -> Self {
        match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            _ => Resample::Bicubic,
        }
    }
    fn pil_code(&self) -> i64 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
        }
    }
    fn filter(&self) -> FilterType {
        match self {
            Resample::Nearest => FilterType::Nearest,
            Resample::Bilinear => FilterType::Triangle,
            Resample::Bicubic => FilterType::CatmullRom,
            Resample::Lanczos => FilterType::Lanczos3,
        }
    }
}

/// How the image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Shorter side to this length, aspect ratio kept (CLIP).
    ShortestEdge(usize),
    /// Exactly `height x width` (SigLIP).
    Exact { height: usize, width: usize },
}

/// Preprocessing parameters of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub resize: Option<Resize>,
    /// Centre crop `(height, width)`.
    pub crop: Option<(usize, usize)>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resample: Resample,
}

/// OpenAI CLIP normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP normalisation constants.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl PreprocessConfig {
    /// CLIP style: shortest edge `size`, centre crop `size`, CLIP mean/std.
    pub fn clip(size: usize) -> Self {
        PreprocessConfig {
            resize: Some(Resize::ShortestEdge(size)),
            crop: Some((size, size)),
            mean: CLIP_MEAN,
            std: CLIP_STD,
            resample: Resample::Bicubic,
        }
    }
    /// SigLIP style: resize to `size x size`, mean = std = 0.5.
    pub fn siglip(size: usize) -> Self {
        PreprocessConfig {
            resize: Some(Resize::Exact {
                height: size,
                width: size,
            }),
            crop: None,
            mean: [0.5; 3],
            std: [0.5; 3],
            resample: Resample::Bicubic,
        }
    }

    /// Output `(height, width)`.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        if let Some(c) = self.crop {
            return Some(c);
        }
        match self.resize {
            Some(Resize::Exact { height, width }) => Some((height, width)),
            _ => None,
        }
    }

    /// Read an HF `preprocessor_config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parse an HF `preprocessor_config.json` text; `path` is used in errors.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::config(path, e))?;
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
        let bad = |why: &str| ModelError::config(path, why);
        let resize = if flag("do_resize") {
            Some(match v.get("size") {
                Some(serde_json::Value::Number(n)) => Resize::ShortestEdge(
                    n.as_u64().ok_or_else(|| bad("size is not an integer"))? as usize,
                ),
                Some(serde_json::Value::Object(o)) => {
                    let g = |k: &str| o.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
                    match (g("shortest_edge"), g("height"), g("width")) {
                        (Some(s), _, _) => Resize::ShortestEdge(s),
                        (None, Some(height), Some(width)) => Resize::Exact { height, width },
                        _ => return Err(bad("size needs shortest_edge or height and width")),
                    }
                }
                _ => return Err(bad("do_resize is set but size is missing")),
            })
        } else {
            None
        };
        let do_crop = v
            .get("do_center_crop")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let crop = if do_crop {
            Some(match v.get("crop_size") {
                Some(serde_json::Value::Number(n)) => {
                    let s = n
                        .as_u64()
                        .ok_or_else(|| bad("crop_size is not an integer"))?
                        as usize;
                    (s, s)
                }
                Some(serde_json::Value::Object(o)) => {
                    let g = |k: &str| o.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
                    match (g("height"), g("width")) {
                        (Some(h), Some(w)) => (h, w),
                        _ => return Err(bad("crop_size needs height and width")),
                    }
                }
                _ => return Err(bad("do_center_crop is set but crop_size is missing")),
            })
        } else {
            None
        };
        let triple = |k: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None => Ok(default),
                Some(serde_json::Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Some(serde_json::Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| bad(&format!("{k} must hold numbers")))?
                            as f32;
                    }
                    Ok(out)
                }
                _ => Err(bad(&format!("{k} must be a number or 3 numbers"))),
            }
        };
        let (mean, std) = if flag("do_normalize") {
            (
                triple("image_mean", CLIP_MEAN)?,
                triple("image_std", CLIP_STD)?,
            )
        } else {
            ([0.0; 3], [1.0; 3])
        };
        if std.iter().any(|s| *s <= 0.0) {
            return Err(bad("image_std must be positive"));
        }
        let zero = match resize {
            Some(Resize::ShortestEdge(0)) => true,
            Some(Resize::Exact { height, width }) => height == 0 || width == 0,
            _ => false,
        } || crop.is_some_and(|(h, w)| h == 0 || w == 0);
        if zero {
            return Err(bad("size and crop_size must be positive"));
        }
        if resize.is_none() && crop.is_none() {
            return Err(bad(
                "neither do_resize nor do_center_crop: the model needs a fixed input size",
            ));
        }
        let resample = Resample::from_pil(v.get("resample").and_then(|x| x.as_i64()).unwrap_or(3));
        Ok(PreprocessConfig {
            resize,
            crop,
            mean,
            std,
            resample,
        })
    }

    /// The HF `preprocessor_config.json` form (for saving a model directory).
    pub fn to_hf_json(&self, processor: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "image_processor_type": processor,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "image_mean": self.mean,
            "image_std": self.std,
            "resample": self.resample.pil_code(),
            "do_resize": self.resize.is_some(),
            "do_center_crop": self.crop.is_some(),
        });
        match self.resize {
            Some(Resize::ShortestEdge(s)) => v["size"] = serde_json::json!({ "shortest_edge": s }),
            Some(Resize::Exact { height, width }) => {
                v["size"] = serde_json::json!({ "height": height, "width": width })
            }
            None => {}
        }
        if let Some((h, w)) = self.crop {
            v["crop_size"] = serde_json::json!({ "height": h, "width": w });
        }
        v
    }

    /// Preprocess a decoded image (8/16-bit, grey or colour; alpha dropped).
    pub fn apply_image(&self, img: &DynamicImage) -> Result<Vec<f32>> {
        let rgb = img.to_rgb32f();
        let (w, h) = rgb.dimensions();
        self.apply_rgb(rgb, h as usize, w as usize)
    }

    /// Preprocess an HWC array in `[0, 1]` with 1 (grey) or 3 channels, e.g. a
    /// windowed DICOM/NIfTI plane from medvlm-io.
    pub fn apply_array(
        &self,
        data: &[f32],
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<Vec<f32>> {
        if height == 0
            || width == 0
            || data.len() != height * width * channels
            || !(channels == 1 || channels == 3)
        {
            return Err(ModelError::invalid(format!(
                "image array of {} values is not {height}x{width}x{channels} with 1 or 3 channels",
                data.len()
            )));
        }
        let rgb: Vec<f32> = if channels == 3 {
            data.to_vec()
        } else {
            data.iter().flat_map(|&v| [v, v, v]).collect()
        };
        let buf = ImageBuffer::<Rgb<f32>, Vec<f32>>::from_raw(width as u32, height as u32, rgb)
            .ok_or_else(|| ModelError::invalid("image buffer size mismatch"))?;
        self.apply_rgb(buf, height, width)
    }

    fn apply_rgb(
        &self,
        img: ImageBuffer<Rgb<f32>, Vec<f32>>,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        if h == 0 || w == 0 {
            return Err(ModelError::invalid("empty image"));
        }
        let (nh, nw) = match self.resize {
            None => (h, w),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(s)) => {
                // HF get_resize_output_image_size: short side = s, long side = int(s * long / short).
                if h <= w {
                    (s, (s as f64 * w as f64 / h as f64) as usize)
                } else {
                    ((s as f64 * h as f64 / w as f64) as usize, s)
                }
            }
        };
        let img = if (nh, nw) != (h, w) {
            let mut r = image::imageops::resize(&img, nw as u32, nh as u32, self.resample.filter());
            for p in r.pixels_mut() {
                for c in p.0.iter_mut() {
                    *c = c.clamp(0.0, 1.0);
                }
            }
            r
        } else {
            img
        };
        let (ch, cw) = self.crop.unwrap_or((nh, nw));
        // HF center_crop: top = (H - h) // 2, left = (W - w) // 2; pads with
        // zeros when the crop is larger than the image.
        let top = (nh as isize - ch as isize).div_euclid(2);
        let left = (nw as isize - cw as isize).div_euclid(2);
        let n = ch * cw;
        let mut out = vec![0f32; 3 * n];
        for y in 0..ch {
            let sy = y as isize + top;
            for x in 0..cw {
                let sx = x as isize + left;
                let px = if sy >= 0 && sx >= 0 && (sy as usize) < nh && (sx as usize) < nw {
                    img.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0.0; 3]
                };
                for c in 0..3 {
                    out[c * n + y * cw + x] = (px[c] - self.mean[c]) / self.std[c];
                }
            }
        }
        Ok(out)
    }

    /// Stack preprocessed images (each `3 * H * W`) into `[B, 3, H, W]`.
    pub fn batch(&self, images: &[Vec<f32>], device: &Device) -> Result<Tensor> {
        let (h, w) = self
            .output_size()
            .ok_or_else(|| ModelError::invalid("preprocessing has no fixed output size"))?;
        let mut flat = Vec::with_capacity(images.len() * 3 * h * w);
        for im in images {
            if im.len() != 3 * h * w {
                return Err(ModelError::invalid("preprocessed image of the wrong size"));
            }
            flat.extend_from_slice(im);
        }
        Ok(Tensor::from_vec(flat, (images.len(), 3, h, w), device)?)
    }
}

/// Decode an image file (PNG, JPEG, TIFF) and preprocess it; errors name the file.
pub fn load_and_preprocess(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| ModelError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| ModelError::io(path, e))?
        .decode()
        .map_err(|e| ModelError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    cfg.apply_image(&img)
}
