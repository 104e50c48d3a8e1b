//! MedMNIST v2 `.npz` files (Yang et al., "MedMNIST v2: a large-scale lightweight
//! benchmark for 2D and 3D biomedical image classification", Scientific Data 2023):
//! a zip of `.npy` arrays `{train,val,test}_images` (uint8, `[N, H, W]`,
//! `[N, H, W, 3]` or 3-D `[N, D, H, W]`) and `{split}_labels` (`[N, 1]` class
//! indices, or `[N, K]` 0/1 for multi-label ChestMNIST).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};
use crate::medimage::{Layout, MedImage, Photometric, SourceFormat};
use crate::npy::{decode_npy, parse_header};

/// One split of a MedMNIST file.
#[derive(Debug, Clone, PartialEq)]
pub struct MedMnistSplit {
    /// uint8 pixels of all images, C order.
    pub images: Vec<u8>,
    /// Array shape, `[N, ...]`.
    pub images_shape: Vec<usize>,
    /// Labels, `N * label_width` values.
    pub labels: Vec<i64>,
    /// 1 for multi-class, K for multi-label.
    pub label_width: usize,
}

impl MedMnistSplit {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.images_shape.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Labels of image `i`.
    pub fn label(&self, i: usize) -> &[i64] {
        &self.labels[i * self.label_width..(i + 1) * self.label_width]
    }

    /// Image `i` as a [`MedImage`] (grey `[H, W]`, RGB `[H, W, 3]`, or a 3-D
    /// volume `[D, H, W]` kept as frames).
    pub fn image(&self, i: usize) -> Result<MedImage> {
        if i >= self.len() {
            return Err(IoError::InvalidArgument(format!(
                "image {i} out of range ({} images)",
                self.len()
            )));
        }
        let shape = self.images_shape[1..].to_vec();
        let per: usize = shape.iter().product();
        let data = self.images[i * per..(i + 1) * per]
            .iter()
            .map(|&v| v as f32)
            .collect();
        let (frames, rows, cols, channels) = match shape[..] {
            [h, w] => (1, h, w, 1),
            [h, w, 3] => (1, h, w, 3),
            [d, h, w] => (d, h, w, 1),
            _ => {
                return Err(IoError::InvalidArgument(format!(
                    "unsupported MedMNIST image shape {shape:?}"
                )))
            }
        };
        Ok(MedImage {
            data,
            shape,
            layout: Layout::Planar {
                frames,
                rows,
                cols,
                channels,
            },
            photometric: if channels == 3 {
                Photometric::Rgb
            } else {
                Photometric::Monochrome2
            },
            format: SourceFormat::Npy,
            file_windows: Vec::new(),
            modality: None,
            transfer_syntax: None,
            affine: None,
            spacing: Vec::new(),
            bits_stored: Some(8),
            warnings: Vec::new(),
        })
    }
}

/// A MedMNIST dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct MedMnist {
    pub path: PathBuf,
    /// `train`, `val`, `test` (whichever are present).
    pub splits: BTreeMap<String, MedMnistSplit>,
}

fn err(path: &Path, reason: impl Into<String>) -> IoError {
    IoError::Npy {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read a MedMNIST `.npz`. Errors if no split has both images and labels, or if
/// image and label counts differ.
pub fn read_medmnist(path: &Path) -> Result<MedMnist> {
    let file = std::fs::File::open(path).map_err(|e| IoError::os(path, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| err(path, format!("not a valid .npz (zip) archive: {e}")))?;
    let mut read_entry = |name: &str| -> Result<Option<Vec<u8>>> {
        let mut f = match zip.by_name(name) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(err(path, format!("{name}: {e}"))),
        };
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| err(path, format!("{name}: {e}")))?;
        Ok(Some(buf))
    };
    let mut splits = BTreeMap::new();
    for split in ["train", "val", "test"] {
        let images = read_entry(&format!("{split}_images.npy"))?;
        let labels = read_entry(&format!("{split}_labels.npy"))?;
        let (images, labels) = match (images, labels) {
            (None, None) => continue,
            (Some(i), Some(l)) => (i, l),
            _ => {
                return Err(err(
                    path,
                    format!("{split}: images without labels or labels without images"),
                ))
            }
        };
        let h = parse_header(&images).map_err(|e| err(path, format!("{split}_images: {e}")))?;
        if h.descr != "|u1" || h.fortran_order {
            return Err(err(
                path,
                format!(
                    "{split}_images: expected C-ordered uint8, got {} (fortran={})",
                    h.descr, h.fortran_order
                ),
            ));
        }
        let n = crate::medimage::checked_len(&h.shape).ok_or_else(|| {
            err(
                path,
                format!("{split}_images: shape {:?} too large", h.shape),
            )
        })?;
        let pix = images
            .get(h.data_offset..h.data_offset + n)
            .ok_or_else(|| err(path, format!("{split}_images: truncated data")))?
            .to_vec();
        let l = decode_npy(&labels).map_err(|e| err(path, format!("{split}_labels: {e}")))?;
        let count = h.shape.first().copied().unwrap_or(0);
        let lcount = l.shape.first().copied().unwrap_or(0);
        if count != lcount || h.shape.len() < 3 {
            return Err(err(
                path,
                format!(
                    "{split}: images shape {:?} and labels shape {:?} disagree",
                    h.shape, l.shape
                ),
            ));
        }
        let label_width = l.shape.get(1).copied().unwrap_or(1);
        splits.insert(
            split.to_string(),
            MedMnistSplit {
                images: pix,
                images_shape: h.shape,
                labels: l.data.iter().map(|&v| v as i64).collect(),
                label_width,
            },
        );
    }
    if splits.is_empty() {
        return Err(err(
            path,
            "no {train,val,test}_images.npy / _labels.npy arrays found",
        ));
    }
    Ok(MedMnist {
        path: path.to_path_buf(),
        splits,
    })
}
