//! Image files and texts to embeddings with a loaded model: what `medvlm embed`, the few-shot
//! commands and the feature cache compute, as a library call.
//!
//! [`preprocess_file`] reads any file medvlm-io reads (PNG/JPEG/TIFF through the model's own
//! image preprocessing; DICOM, NIfTI and npy through medvlm-io's plane selection and automatic
//! window) into the model's input. [`embed_image_files`] preprocesses a batch in parallel and
//! embeds it, keeping the order; unreadable files stop it with an error naming the file, or
//! with `skip_bad` are counted and returned in [`ImageEmbeddings::skipped`], never dropped
//! silently.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::model_dir::LoadedModel;
use crate::preprocess::{load_and_preprocess, PreprocessConfig};

/// Extensions decoded by the model's raster preprocessing (the `image` crate).
const RASTER_EXTS: &[&str] = &["png", "jpg", "jpeg", "tif", "tiff", "bmp"];

fn ext_of(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

/// Reads and preprocesses one image file to the model's `3 * H * W` input values.
pub fn preprocess_file(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    if RASTER_EXTS.contains(&ext_of(path).as_str()) {
        return load_and_preprocess(path, cfg);
    }
    let img = medvlm_io::load_any(path)?;
    let plane = medvlm_io::preprocess::windowed_plane(
        &img,
        &medvlm_io::PlaneSelect::default(),
        &medvlm_io::Window::Auto,
    )?;
    cfg.apply_array(&plane.data, plane.rows, plane.cols, plane.channels)
        .map_err(|e| ModelError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// An image that could not be read, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The file.
    pub path: String,
    /// The error, with its causes.
    pub error: String,
}

/// Image embeddings of the readable images, in input order.
#[derive(Debug)]
pub struct ImageEmbeddings {
    /// `[N, D]` f32 on the CPU (`None` when no image was readable).
    pub embeds: Option<Tensor>,
    /// The files embedded, in the order of the rows.
    pub paths: Vec<PathBuf>,
    /// The files skipped (only with `skip_bad`).
    pub skipped: Vec<Skipped>,
}

/// The readable files of a batched pass over image files, and the skipped ones.
#[derive(Debug, Default)]
pub struct PixelPass {
    /// The files given to `each`, in input order.
    pub paths: Vec<PathBuf>,
    /// The files skipped (only with `skip_bad`).
    pub skipped: Vec<Skipped>,
}

/// Preprocesses (in parallel) `paths` in batches of `batch` (at least 1) with the model's
/// preprocessing and calls `each` with the pixels `[b, 3, H, W]` of the readable files of
/// every batch. Without `skip_bad` the first unreadable file is an error naming it
/// ([`ModelError::UnreadableImage`]); with it, such files are listed in the result.
/// `on_progress(n)` is called after each batch with the number of files it covered. Shared
/// by [`embed_image_files`] and every other pass that scores image files through a model.
pub fn for_each_pixel_batch<E: From<ModelError>>(
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    skip_bad: bool,
    device: &Device,
    on_progress: &dyn Fn(u64),
    mut each: impl FnMut(&Tensor) -> std::result::Result<(), E>,
) -> std::result::Result<PixelPass, E> {
    let mut pass = PixelPass::default();
    for chunk in paths.chunks(batch.max(1)) {
        let pre: Vec<Result<Vec<f32>>> = chunk
            .par_iter()
            .map(|p| preprocess_file(p, &m.preprocess))
            .collect();
        let mut ok = Vec::with_capacity(chunk.len());
        for (p, r) in chunk.iter().zip(pre) {
            match r {
                Ok(v) => {
                    ok.push(v);
                    pass.paths.push(p.clone());
                }
                Err(e) if skip_bad => pass.skipped.push(Skipped {
                    path: p.display().to_string(),
                    error: medvlm_io::guard::error_chain(&e),
                }),
                Err(e) => {
                    return Err(ModelError::UnreadableImage {
                        path: p.clone(),
                        source: Box::new(e),
                    }
                    .into())
                }
            }
        }
        if !ok.is_empty() {
            each(&m.preprocess.batch(&ok, device)?)?;
        }
        on_progress(chunk.len() as u64);
    }
    Ok(pass)
}

/// Preprocesses (in parallel) and embeds `paths` in batches of `batch` (at least 1) with the
/// image tower of `m`. Without `skip_bad` the first unreadable file is an error naming it;
/// with it, such files are listed in the result. `on_progress(n)` is called after each batch
/// with the number of files it covered.
pub fn embed_image_files(
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    skip_bad: bool,
    device: &Device,
    on_progress: &dyn Fn(u64),
) -> Result<ImageEmbeddings> {
    let mut rows = Vec::new();
    let pass = for_each_pixel_batch(m, paths, batch, skip_bad, device, on_progress, |px| {
        let e = m
            .model
            .encode_image(px)?
            .embeds
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        rows.push(e);
        Ok::<(), ModelError>(())
    })?;
    let embeds = if rows.is_empty() {
        None
    } else {
        Some(Tensor::cat(&rows, 0)?)
    };
    Ok(ImageEmbeddings {
        embeds,
        paths: pass.paths,
        skipped: pass.skipped,
    })
}

/// Text embeddings `[T, D]` f32 on the CPU, in batches of `batch` (at least 1).
pub fn embed_texts(
    m: &LoadedModel,
    texts: &[String],
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut rows = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let tokens = m.tokenizer.encode_batch(chunk, device)?;
        rows.push(
            m.model
                .encode_text(&tokens)?
                .embeds
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        );
    }
    if rows.is_empty() {
        return Err(ModelError::invalid("no texts to embed"));
    }
    Ok(Tensor::cat(&rows, 0)?)
}
