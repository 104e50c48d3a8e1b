//! PNG, JPEG and TIFF (8- and 16-bit, grey and RGB) through the `image` crate, and
//! an 8-bit PNG writer for windowed planes.
//!
//! Values are kept as stored (0–255 or 0–65535), so 16-bit images keep their
//! precision until windowing. Alpha channels are dropped (with a warning in
//! [`MedImage::warnings`]); grey+alpha becomes grey.

use std::path::Path;

use image::{DynamicImage, ImageEncoder};

use crate::error::{IoError, Result};
use crate::medimage::{Layout, MedImage, Photometric, Plane, SourceFormat};

fn rerr(path: &Path, reason: impl Into<String>) -> IoError {
    IoError::Raster {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read a PNG / JPEG / TIFF file.
pub fn read_raster(path: &Path) -> Result<MedImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| IoError::os(path, e))?
        .with_guessed_format()
        .map_err(|e| IoError::os(path, e))?;
    let img = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| rerr(path, "the image decoder panicked on this file"))?
        .map_err(|e| rerr(path, e.to_string()))?;
    from_dynamic(path, img)
}

fn from_dynamic(path: &Path, img: DynamicImage) -> Result<MedImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut warnings = Vec::new();
    let (channels, bits, data): (usize, u16, Vec<f32>) = match img {
        DynamicImage::ImageLuma8(b) => (1, 8, b.into_raw().into_iter().map(|v| v as f32).collect()),
        DynamicImage::ImageLuma16(b) => {
            (1, 16, b.into_raw().into_iter().map(|v| v as f32).collect())
        }
        DynamicImage::ImageRgb8(b) => (3, 8, b.into_raw().into_iter().map(|v| v as f32).collect()),
        DynamicImage::ImageRgb16(b) => {
            (3, 16, b.into_raw().into_iter().map(|v| v as f32).collect())
        }
        DynamicImage::ImageLumaA8(b) => {
            warnings.push(format!("{}: alpha channel dropped", path.display()));
            (
                1,
                8,
                b.into_raw().chunks_exact(2).map(|p| p[0] as f32).collect(),
            )
        }
        DynamicImage::ImageLumaA16(b) => {
            warnings.push(format!("{}: alpha channel dropped", path.display()));
            (
                1,
                16,
                b.into_raw().chunks_exact(2).map(|p| p[0] as f32).collect(),
            )
        }
        DynamicImage::ImageRgba8(b) => {
            warnings.push(format!("{}: alpha channel dropped", path.display()));
            (
                3,
                8,
                b.into_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
                    .collect(),
            )
        }
        DynamicImage::ImageRgba16(b) => {
            warnings.push(format!("{}: alpha channel dropped", path.display()));
            (
                3,
                16,
                b.into_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
                    .collect(),
            )
        }
        DynamicImage::ImageRgb32F(b) => (3, 32, b.into_raw()),
        DynamicImage::ImageRgba32F(b) => {
            warnings.push(format!("{}: alpha channel dropped", path.display()));
            (
                3,
                32,
                b.into_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect(),
            )
        }
        other => {
            return Err(rerr(
                path,
                format!("unsupported pixel layout {:?}", other.color()),
            ))
        }
    };
    let mut shape = vec![h, w];
    if channels == 3 {
        shape.push(3);
    }
    Ok(MedImage {
        data,
        shape,
        layout: Layout::Planar {
            frames: 1,
            rows: h,
            cols: w,
            channels,
        },
        photometric: if channels == 3 {
            Photometric::Rgb
        } else {
            Photometric::Monochrome2
        },
        format: SourceFormat::Raster,
        file_windows: Vec::new(),
        modality: None,
        transfer_syntax: None,
        affine: None,
        spacing: Vec::new(),
        bits_stored: if bits <= 16 { Some(bits) } else { None },
        warnings,
    })
}

/// Quantise `[0, 1]` values to bytes (round half up, clipped).
pub fn to_u8(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0 + 0.5).floor() as u8)
        .collect()
}

/// Encode a plane with values in `[0, 1]` as an 8-bit grey or RGB PNG.
pub fn encode_png(plane: &Plane) -> Result<Vec<u8>> {
    let color = match plane.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => {
            return Err(IoError::InvalidArgument(format!(
                "PNG needs 1 or 3 channels, got {c}"
            )))
        }
    };
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            &to_u8(&plane.data),
            plane.cols as u32,
            plane.rows as u32,
            color,
        )
        .map_err(|e| IoError::InvalidArgument(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Write a plane with values in `[0, 1]` as an 8-bit PNG, atomically.
pub fn write_png(path: &Path, plane: &Plane) -> Result<()> {
    let bytes = encode_png(plane).map_err(|e| rerr(path, e.to_string()))?;
    crate::atomic::write_atomic(path, &bytes)
}

/// Write a 16-bit grey PNG from raw samples (e.g. phantom masks or raw detector values).
pub fn write_png_u16(path: &Path, pixels: &[u16], rows: usize, cols: usize) -> Result<()> {
    if pixels.len() != rows * cols {
        return Err(rerr(
            path,
            format!("{} pixels for {rows}x{cols}", pixels.len()),
        ));
    }
    let bytes: Vec<u8> = pixels.iter().flat_map(|v| v.to_be_bytes()).collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            &bytes,
            cols as u32,
            rows as u32,
            image::ExtendedColorType::L16,
        )
        .map_err(|e| rerr(path, e.to_string()))?;
    crate::atomic::write_atomic(path, &out)
}
