//! From a decoded [`MedImage`] to model input: pick a plane, window it, replicate grey
//! to 3 channels, resize for the model. Normalisation with a model's mean/std is
//! left to the model crate (CLIP, SigLIP and BiomedCLIP use different constants).

use crate::error::Result;
use crate::medimage::{MedImage, Plane, PlaneSelect};
use crate::transforms::{EvalTransform, Fit, TrainTransform};
use crate::window::{apply_window, Window};

/// Options of [`to_model_input`].
#[derive(Debug, Clone, PartialEq)]
pub struct InputOptions {
    /// Which plane (frame / slice / MIP); default frame 0, middle axial slice.
    pub select: PlaneSelect,
    /// Windowing; default [`Window::Auto`].
    pub window: Window,
    /// Output side length (square); default 224.
    pub size: usize,
    /// Aspect-preserving fit; default [`Fit::Pad`] (nothing cut off).
    pub fit: Fit,
}

impl Default for InputOptions {
    fn default() -> Self {
        InputOptions {
            select: PlaneSelect::default(),
            window: Window::Auto,
            size: 224,
            fit: Fit::Pad,
        }
    }
}

/// A 3-channel image in `[0, 1]`, channel-first (`CHW`), ready for a vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    pub height: usize,
    pub width: usize,
    /// `3 * height * width` values, channel-first.
    pub data: Vec<f32>,
}

/// Select a plane and window it: values in `[0, 1]`, 1 or 3 channels.
pub fn windowed_plane(img: &MedImage, select: &PlaneSelect, window: &Window) -> Result<Plane> {
    let plane = img.plane(select)?;
    apply_window(
        &plane,
        window,
        &img.file_windows,
        img.photometric,
        img.bits_stored,
    )
}

/// Replicate a grey plane to RGB (3 channels); RGB planes are returned unchanged.
pub fn to_rgb(plane: Plane) -> Plane {
    if plane.channels == 3 {
        return plane;
    }
    let data = plane.data.iter().flat_map(|&v| [v, v, v]).collect();
    Plane {
        rows: plane.rows,
        cols: plane.cols,
        channels: 3,
        data,
    }
}

/// HWC -> CHW.
pub fn to_chw(plane: &Plane) -> Vec<f32> {
    let n = plane.rows * plane.cols;
    let mut out = vec![0f32; n * plane.channels];
    for i in 0..n {
        for c in 0..plane.channels {
            out[c * n + i] = plane.data[i * plane.channels + c];
        }
    }
    out
}

/// Plane selection, windowing, grey-to-RGB and the deterministic eval resize.
pub fn to_model_input(img: &MedImage, opts: &InputOptions) -> Result<ModelInput> {
    let plane = windowed_plane(img, &opts.select, &opts.window)?;
    let t = EvalTransform {
        size: opts.size,
        fit: opts.fit,
    };
    // Resize before replicating grey to RGB: a third of the work.
    let out = to_rgb(t.apply(&plane)?);
    Ok(ModelInput {
        height: out.rows,
        width: out.cols,
        data: to_chw(&out),
    })
}

/// Training-time counterpart of [`to_model_input`]: plane selection and windowing
/// as in `opts`, then the random [`TrainTransform`] seeded by `(seed, index)`
/// (`opts.size`/`opts.fit` are not used; `train.size` sets the output size).
pub fn to_train_input(
    img: &MedImage,
    opts: &InputOptions,
    train: &TrainTransform,
    seed: u64,
    index: u64,
) -> Result<ModelInput> {
    let plane = windowed_plane(img, &opts.select, &opts.window)?;
    let out = to_rgb(train.apply_seeded(&plane, seed, index)?);
    Ok(ModelInput {
        height: out.rows,
        width: out.cols,
        data: to_chw(&out),
    })
}
