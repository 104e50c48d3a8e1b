//! [`MedImage`]: the one in-memory type every reader produces.
//!
//! Values are `f32` **after the Modality LUT** (DICOM rescale slope/intercept, so CT is
//! in Hounsfield units; NIfTI `scl_slope`/`scl_inter`) and **before any VOI/windowing**.
//! `data` is C-ordered (row-major) over `shape`, and `shape` is the shape NumPy users
//! expect: `[rows, cols]` for one grey frame, `[rows, cols, 3]` for colour,
//! `[frames, rows, cols(, 3)]` for multi-frame DICOM, and for NIfTI the shape
//! nibabel's `get_fdata()` gives (`[x, y, z, ...]`).

use crate::error::{IoError, Result};

/// Where an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Dicom,
    Nifti1,
    Nifti2,
    /// PNG, JPEG or TIFF.
    Raster,
    /// One image of a MedMNIST `.npz`, or a `.npy` array.
    Npy,
}

/// How the stored values map to display brightness / colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Photometric {
    /// Low value = black (the usual grey scale).
    Monochrome2,
    /// Low value = white (some X-ray detectors); inverted after windowing.
    Monochrome1,
    /// Three channels R, G, B (YBR and palette colour are converted to this on read).
    Rgb,
}

/// How the array is organised.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// Planar images (DICOM, PNG, ...): `frames` of `rows x cols x channels`.
    Planar {
        frames: usize,
        rows: usize,
        cols: usize,
        channels: usize,
    },
    /// A NIfTI volume: `dims` are the nibabel data shape (`x, y, z, t, ...`).
    Volume { dims: Vec<usize> },
}

/// A decoded medical image. See the module docs for the value and shape conventions.
#[derive(Debug, Clone)]
pub struct MedImage {
    /// Values after the Modality LUT, C-ordered over `shape`.
    pub data: Vec<f32>,
    /// NumPy-style shape of `data`.
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub photometric: Photometric,
    pub format: SourceFormat,
    /// Window centre/width pairs stored in the file (DICOM (0028,1050)/(0028,1051)).
    pub file_windows: Vec<(f64, f64)>,
    /// DICOM Modality (CT, MR, ...) when known.
    pub modality: Option<String>,
    /// DICOM transfer syntax as `name (UID)` when the source is DICOM.
    pub transfer_syntax: Option<String>,
    /// Voxel-to-world affine (NIfTI sform, else qform, else pixdim scaling), row-major 4x4.
    pub affine: Option<[[f64; 4]; 4]>,
    /// Voxel sizes (NIfTI pixdim[1..], DICOM PixelSpacing row/col) when known.
    pub spacing: Vec<f64>,
    /// Bits stored per sample in the source (8, 12, 16, ...), when known.
    pub bits_stored: Option<u16>,
    /// Problems worked around while reading (e.g. an invalid NumberOfFrames that
    /// was inferred from the pixel data length). Callers should report them.
    pub warnings: Vec<String>,
}

/// A single 2-D plane: `rows x cols x channels`, C-ordered, `channels` 1 or 3.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    pub rows: usize,
    pub cols: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Plane {
    /// Build a plane, checking that `data` has `rows * cols * channels` values.
    pub fn new(rows: usize, cols: usize, channels: usize, data: Vec<f32>) -> Result<Plane> {
        if data.len() != rows * cols * channels {
            return Err(IoError::InvalidArgument(format!(
                "plane of {rows}x{cols}x{channels} needs {} values, got {}",
                rows * cols * channels,
                data.len()
            )));
        }
        Ok(Plane {
            rows,
            cols,
            channels,
            data,
        })
    }

    /// Value at (row, col, channel).
    #[inline]
    pub fn at(&self, r: usize, c: usize, ch: usize) -> f32 {
        self.data[(r * self.cols + c) * self.channels + ch]
    }
}

/// Which 2-D plane of an image to take.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlaneSelect {
    /// DICOM frame, or NIfTI volume index along the 4th axis. Default 0.
    pub frame: Option<usize>,
    /// NIfTI axis to slice across (0 = x, 1 = y, 2 = z). Default 2.
    pub axis: Option<usize>,
    /// Slice index along `axis`; default the middle slice.
    pub slice: Option<usize>,
    /// Maximum-intensity projection along `axis` instead of one slice.
    pub mip: bool,
}

impl MedImage {
    /// Number of frames (DICOM) or volumes (4-D NIfTI; 1 for 3-D).
    pub fn frames(&self) -> usize {
        match &self.layout {
            Layout::Planar { frames, .. } => *frames,
            Layout::Volume { dims } => dims.iter().skip(3).product::<usize>().max(1),
        }
    }

    /// Minimum and maximum of `data` (NaN ignored); `(0, 0)` when empty.
    pub fn min_max(&self) -> (f32, f32) {
        min_max(&self.data)
    }

    /// Extract one 2-D plane. For DICOM/rasters the frame; for NIfTI the slice
    /// `data[:, :, k]` (axis 2), `data[:, k, :]` (axis 1) or `data[k, :, :]` (axis 0)
    /// with the nibabel index order kept (rows = first remaining axis), or the
    /// maximum-intensity projection along that axis.
    pub fn plane(&self, sel: &PlaneSelect) -> Result<Plane> {
        let frame = sel.frame.unwrap_or(0);
        match &self.layout {
            Layout::Planar {
                frames,
                rows,
                cols,
                channels,
            } => {
                if frame >= *frames {
                    return Err(IoError::InvalidArgument(format!(
                        "frame {frame} out of range: the image has {frames} frame(s)"
                    )));
                }
                if sel.slice.is_some() || sel.axis.is_some() || sel.mip {
                    return Err(IoError::InvalidArgument(
                        "--axis/--slice/--mip apply to volumes (NIfTI); use --frame for DICOM"
                            .into(),
                    ));
                }
                let n = rows * cols * channels;
                Plane::new(
                    *rows,
                    *cols,
                    *channels,
                    self.data[frame * n..(frame + 1) * n].to_vec(),
                )
            }
            Layout::Volume { dims } => volume_plane(&self.data, dims, sel),
        }
    }
}

fn volume_plane(data: &[f32], dims: &[usize], sel: &PlaneSelect) -> Result<Plane> {
    // Treat 2-D volumes as [x, y, 1].
    let (nx, ny, nz) = (
        dims.first().copied().unwrap_or(1),
        dims.get(1).copied().unwrap_or(1),
        dims.get(2).copied().unwrap_or(1),
    );
    let per_vol = nx * ny * nz;
    let vols = dims.iter().skip(3).product::<usize>().max(1);
    let frame = sel.frame.unwrap_or(0);
    if frame >= vols {
        return Err(IoError::InvalidArgument(format!(
            "volume index {frame} out of range: the image has {vols} volume(s)"
        )));
    }
    let axis = sel.axis.unwrap_or(2);
    if axis > 2 {
        return Err(IoError::InvalidArgument(format!(
            "axis {axis} out of range: use 0 (x), 1 (y) or 2 (z)"
        )));
    }
    let extent = [nx, ny, nz][axis];
    // C order over [x, y, z, t...]: index = (((x*ny + y)*nz + z)*vols + t)
    let at = |x: usize, y: usize, z: usize| data[((x * ny + y) * nz + z) * vols + frame];
    let (rows, cols) = match axis {
        0 => (ny, nz),
        1 => (nx, nz),
        _ => (nx, ny),
    };
    let value = |r: usize, c: usize, k: usize| match axis {
        0 => at(k, r, c),
        1 => at(r, k, c),
        _ => at(r, c, k),
    };
    let _ = per_vol;
    let mut out = Vec::with_capacity(rows * cols);
    if sel.mip {
        for r in 0..rows {
            for c in 0..cols {
                let mut m = f32::NEG_INFINITY;
                for k in 0..extent {
                    m = m.max(value(r, c, k));
                }
                out.push(m);
            }
        }
    } else {
        let k = sel.slice.unwrap_or(extent / 2);
        if k >= extent {
            return Err(IoError::InvalidArgument(format!(
                "slice {k} out of range: axis {axis} has {extent} slices"
            )));
        }
        for r in 0..rows {
            for c in 0..cols {
                out.push(value(r, c, k));
            }
        }
    }
    Plane::new(rows, cols, 1, out)
}

/// Minimum and maximum of a slice, ignoring NaN; `(0, 0)` when empty or all NaN.
pub fn min_max(v: &[f32]) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &x in v {
        if x.is_nan() {
            continue;
        }
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        (0.0, 0.0)
    } else {
        (lo, hi)
    }
}

/// C-order (row-major) strides of `dims`, in elements.
fn c_strides(dims: &[usize]) -> Vec<usize> {
    let mut cs = vec![1usize; dims.len()];
    for k in (0..dims.len().saturating_sub(1)).rev() {
        cs[k] = cs[k + 1] * dims[k + 1];
    }
    cs
}

/// Visit every element in first-axis-fastest (Fortran) order, passing its
/// C-order index; the C index is updated incrementally (no per-element products).
pub(crate) fn for_each_fortran_to_c(dims: &[usize], mut f: impl FnMut(usize, usize)) {
    let n: usize = dims.iter().product();
    if n == 0 {
        return;
    }
    let cs = c_strides(dims);
    let mut idx = vec![0usize; dims.len()];
    let mut c = 0usize;
    for fi in 0..n {
        f(fi, c);
        for k in 0..dims.len() {
            idx[k] += 1;
            c += cs[k];
            if idx[k] < dims[k] {
                break;
            }
            c -= cs[k] * dims[k];
            idx[k] = 0;
        }
    }
}

/// Reorder Fortran-ordered values to C order over `dims`.
pub(crate) fn fortran_to_c<T: Copy + Default>(src: &[T], dims: &[usize]) -> Vec<T> {
    let mut out = vec![T::default(); src.len()];
    for_each_fortran_to_c(dims, |fi, ci| out[ci] = src[fi]);
    out
}

/// Number of elements of `dims`, or `None` if the product overflows `usize`
/// (a hostile header could claim absurd dimensions).
pub fn checked_len(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}
