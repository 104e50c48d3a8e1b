//! NIfTI-1 and NIfTI-2 volumes (`.nii`, `.nii.gz`).
//!
//! NIfTI-1 and NIfTI-2 headers are parsed here from the published layouts (nifti1.h,
//! nifti2.h, NIfTI DFWG), the byte order taken from `sizeof_hdr` as nibabel does.
//! The shape is nibabel's `dim[1..=dim[0]]`, unit dimensions kept (leading, inner and
//! trailing); zero or negative sizes, `dim[0]` outside 1..=7 and a `vox_offset`
//! inside the header are refused with an error naming the file.
//! The data are converted to `f32`, scaled by `scl_slope`/`scl_inter` with nibabel's
//! rule (a slope of 0 or non-finite means "no scaling"), and reordered from the
//! file's Fortran order to C order over the nibabel shape, so
//! `MedImage::data[((x*ny + y)*nz + z)...]` equals `img.get_fdata()[x, y, z]`.
//!
//! The affine follows nibabel's `get_best_affine`: the sform when `sform_code > 0`,
//! else the qform (quaternion, NIfTI-1 standard) when `qform_code > 0`, else the
//! pixdim scaling centred on the volume with x flipped (nibabel `get_base_affine`).

use std::io::Read;
use std::path::Path;

use crate::error::{IoError, Result};
use crate::medimage::{Layout, MedImage, Photometric, SourceFormat};

/// Parsed header fields medvlm needs, common to NIfTI-1 and NIfTI-2.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiInfo {
    /// 1 or 2.
    pub version: u8,
    /// Data shape (`dim[1..=dim[0]]`).
    pub dims: Vec<usize>,
    /// NIfTI datatype code (2 = uint8, 4 = int16, 16 = float32, ...).
    pub datatype: i16,
    /// `pixdim[0..8]` (`pixdim[0]` is qfac).
    pub pixdim: [f64; 8],
    pub vox_offset: u64,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub qform_code: i32,
    pub sform_code: i32,
    pub quatern: [f64; 3],
    pub qoffset: [f64; 3],
    pub srow: [[f64; 4]; 3],
    pub big_endian: bool,
}

fn nerr(path: &Path, reason: impl Into<String>) -> IoError {
    IoError::Nifti {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read the whole file, gunzipping when it starts with the gzip magic.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| IoError::os(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| nerr(path, format!("gzip stream is corrupt or truncated: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Read a NIfTI-1 or NIfTI-2 file. See the module docs for conventions.
pub fn read_nifti(path: &Path) -> Result<MedImage> {
    let bytes = read_bytes(path)?;
    let info = parse_header(path, &bytes)?;
    let data = read_data(path, &bytes, &info)?;
    let affine = best_affine(&info);
    Ok(MedImage {
        shape: info.dims.clone(),
        layout: Layout::Volume {
            dims: info.dims.clone(),
        },
        data,
        photometric: Photometric::Monochrome2,
        format: if info.version == 2 {
            SourceFormat::Nifti2
        } else {
            SourceFormat::Nifti1
        },
        file_windows: Vec::new(),
        modality: None,
        transfer_syntax: None,
        affine: Some(affine),
        spacing: info.pixdim[1..=info.dims.len().min(7)].to_vec(),
        bits_stored: None,
        warnings: Vec::new(),
    })
}

/// Parse the header of NIfTI bytes (already gunzipped).
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<NiftiInfo> {
    if bytes.len() < 4 {
        return Err(nerr(path, "file too short for a NIfTI header"));
    }
    let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let be = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    match (le, be) {
        (348, _) | (_, 348) => parse_nifti1(path, bytes),
        (540, _) => parse_nifti2(path, bytes, false),
        (_, 540) => parse_nifti2(path, bytes, true),
        _ => Err(nerr(
            path,
            format!(
                "not a NIfTI file: sizeof_hdr is {le}, expected 348 (NIfTI-1) or 540 (NIfTI-2)"
            ),
        )),
    }
}

/// Fixed-offset reads of a NIfTI header in its byte order (the callers check the length).
struct HeaderBytes<'a> {
    b: &'a [u8],
    big: bool,
}

impl HeaderBytes<'_> {
    fn bytes<const N: usize>(&self, o: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[o..o + N]);
        if self.big {
            a.reverse();
        }
        a
    }
    fn i16(&self, o: usize) -> i16 {
        i16::from_le_bytes(self.bytes(o))
    }
    fn i32(&self, o: usize) -> i32 {
        i32::from_le_bytes(self.bytes(o))
    }
    fn i64(&self, o: usize) -> i64 {
        i64::from_le_bytes(self.bytes(o))
    }
    fn f32(&self, o: usize) -> f64 {
        f64::from(f32::from_le_bytes(self.bytes(o)))
    }
    fn f64(&self, o: usize) -> f64 {
        f64::from_le_bytes(self.bytes(o))
    }
}

fn parse_nifti1(path: &Path, b: &[u8]) -> Result<NiftiInfo> {
    if b.len() < 348 {
        return Err(nerr(
            path,
            format!("truncated NIfTI-1 header: {} of 348 bytes", b.len()),
        ));
    }
    // Byte order from sizeof_hdr, as nibabel does (nifti1.h field offsets).
    let big = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) != 348;
    let h = HeaderBytes { b, big };
    let (i16_at, i32_at, f32_at) = (|o| h.i16(o), |o| h.i32(o), |o| h.f32(o));
    match &b[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => {
            return Err(nerr(
                path,
                "two-file NIfTI-1 (.hdr/.img, magic 'ni1') is not supported; convert to .nii",
            ))
        }
        other => {
            return Err(nerr(
                path,
                format!("invalid NIfTI-1 header: magic is {other:?}, not \"n+1\\0\""),
            ))
        }
    }
    let ndim = i16_at(40) as i64;
    let mut raw_dims: Vec<i64> = (1..=7).map(|k| i16_at(40 + 2 * k) as i64).collect();
    // FreeSurfer's large-vector convention (nibabel get_data_shape): dim[1] = -1
    // with dim[2] = dim[3] = 1 means the length is in glmin.
    if raw_dims[..3] == [-1, 1, 1] && i32_at(144) > 0 {
        raw_dims[0] = i32_at(144) as i64;
    }
    let dims = check_dims(path, ndim, &raw_dims)?;
    let mut pixdim = [0f64; 8];
    for (k, p) in pixdim.iter_mut().enumerate() {
        *p = f32_at(76 + 4 * k);
    }
    let row = |o: usize| [f32_at(o), f32_at(o + 4), f32_at(o + 8), f32_at(o + 12)];
    Ok(NiftiInfo {
        version: 1,
        dims,
        datatype: i16_at(70),
        pixdim,
        vox_offset: check_vox_offset(path, f32_at(108), 352, "NIfTI-1")?,
        scl_slope: f32_at(112),
        scl_inter: f32_at(116),
        qform_code: i16_at(252) as i32,
        sform_code: i16_at(254) as i32,
        quatern: [f32_at(256), f32_at(260), f32_at(264)],
        qoffset: [f32_at(268), f32_at(272), f32_at(276)],
        srow: [row(280), row(296), row(312)],
        big_endian: big,
    })
}

/// nibabel's data shape, `dim[1..=dim[0]]`, refusing what nibabel would turn into
/// an empty or impossible array: `dim[0]` outside 1..=7, a zero or negative size.
fn check_dims(path: &Path, ndim: i64, raw: &[i64]) -> Result<Vec<usize>> {
    if !(1..=7).contains(&ndim) {
        return Err(nerr(
            path,
            format!("invalid dim[0] = {ndim}: the number of dimensions must be 1 to 7"),
        ));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for (k, &d) in raw[..ndim as usize].iter().enumerate() {
        if d == 0 {
            return Err(nerr(
                path,
                format!(
                    "dim[{}] = 0 (dims {:?}): the image is empty",
                    k + 1,
                    &raw[..ndim as usize]
                ),
            ));
        }
        if d < 0 {
            return Err(nerr(
                path,
                format!(
                    "negative dim[{}] = {d} (dims {:?})",
                    k + 1,
                    &raw[..ndim as usize]
                ),
            ));
        }
        dims.push(d as usize);
    }
    Ok(dims)
}

/// Byte offset of the data: finite, whole, and after the header and its 4-byte
/// extension flag (nibabel would read the header itself as voxels when it is 0).
fn check_vox_offset(path: &Path, v: f64, min: u64, kind: &str) -> Result<u64> {
    if !v.is_finite() || v < min as f64 || v.fract() != 0.0 || v > u64::MAX as f64 {
        return Err(nerr(
            path,
            format!(
                "invalid vox_offset {v}: the data of a single-file {kind} start at a whole \
                 byte offset of {min} or more (after the header)"
            ),
        ));
    }
    Ok(v as u64)
}

fn parse_nifti2(path: &Path, b: &[u8], big: bool) -> Result<NiftiInfo> {
    if b.len() < 540 {
        return Err(nerr(
            path,
            format!("truncated NIfTI-2 header: {} of 540 bytes", b.len()),
        ));
    }
    if &b[4..7] != b"n+2" {
        return Err(nerr(
            path,
            "NIfTI-2 magic is not 'n+2' (two-file .hdr/.img is not supported)",
        ));
    }
    let h = HeaderBytes { b, big };
    let (i16_at, i32_at, i64_at, f64_at) = (|o| h.i16(o), |o| h.i32(o), |o| h.i64(o), |o| h.f64(o));
    let raw_dims: Vec<i64> = (1..=7).map(|k| i64_at(16 + 8 * k)).collect();
    let dims = check_dims(path, i64_at(16), &raw_dims)?;
    let mut pixdim = [0f64; 8];
    for (k, p) in pixdim.iter_mut().enumerate() {
        *p = f64_at(104 + 8 * k);
    }
    let row = |o: usize| [f64_at(o), f64_at(o + 8), f64_at(o + 16), f64_at(o + 24)];
    let vox = i64_at(168);
    let vox_offset = check_vox_offset(path, vox as f64, 544, "NIfTI-2")?;
    Ok(NiftiInfo {
        version: 2,
        dims,
        datatype: i16_at(12),
        pixdim,
        vox_offset,
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        qform_code: i32_at(344),
        sform_code: i32_at(348),
        quatern: [f64_at(352), f64_at(360), f64_at(368)],
        qoffset: [f64_at(376), f64_at(384), f64_at(392)],
        srow: [row(400), row(432), row(464)],
        big_endian: big,
    })
}

/// Name and byte size of a NIfTI datatype code.
fn datatype_info(code: i16) -> Option<(&'static str, usize)> {
    Some(match code {
        2 => ("uint8", 1),
        4 => ("int16", 2),
        8 => ("int32", 4),
        16 => ("float32", 4),
        64 => ("float64", 8),
        256 => ("int8", 1),
        512 => ("uint16", 2),
        768 => ("uint32", 4),
        1024 => ("int64", 8),
        1280 => ("uint64", 8),
        _ => return None,
    })
}

fn read_data(path: &Path, bytes: &[u8], info: &NiftiInfo) -> Result<Vec<f32>> {
    let (type_name, size) = datatype_info(info.datatype).ok_or_else(|| {
        nerr(
            path,
            format!(
                "unsupported datatype code {} (supported: integer and float scalars; \
                 complex and RGB are not)",
                info.datatype
            ),
        )
    })?;
    let n = crate::medimage::checked_len(&info.dims)
        .ok_or_else(|| nerr(path, format!("dimensions {:?} overflow", info.dims)))?;
    let start = info.vox_offset as usize;
    let need = n
        .checked_mul(size)
        .and_then(|b| b.checked_add(start))
        .ok_or_else(|| nerr(path, "dimensions overflow"))?;
    if bytes.len() < need {
        return Err(nerr(
            path,
            format!(
                "truncated data: {} bytes after the header, {} needed for {:?} {type_name}",
                bytes.len().saturating_sub(start),
                n * size,
                info.dims
            ),
        ));
    }
    let raw = &bytes[start..need];
    let big = info.big_endian;
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    (if big {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    }) as f64
                })
                .collect::<Vec<f64>>()
        };
    }
    let vals: Vec<f64> = match info.datatype {
        2 => raw.iter().map(|&v| v as f64).collect(),
        256 => raw.iter().map(|&v| v as i8 as f64).collect(),
        4 => conv!(i16, 2),
        512 => conv!(u16, 2),
        8 => conv!(i32, 4),
        768 => conv!(u32, 4),
        16 => conv!(f32, 4),
        64 => conv!(f64, 8),
        1024 => conv!(i64, 8),
        _ => conv!(u64, 8),
    };
    // nibabel: slope 0 / NaN / inf means unscaled; a non-finite intercept is 0.
    let (slope, inter) = if info.scl_slope == 0.0 || !info.scl_slope.is_finite() {
        (1.0, 0.0)
    } else {
        let i = if info.scl_inter.is_finite() {
            info.scl_inter
        } else {
            0.0
        };
        (info.scl_slope, i)
    };
    // Fortran (file) order -> C order over dims.
    let scaled: Vec<f32> = vals.iter().map(|v| (v * slope + inter) as f32).collect();
    drop(vals);
    Ok(crate::medimage::fortran_to_c(&scaled, &info.dims))
}

/// nibabel's `get_best_affine` (see module docs), row-major 4x4.
pub fn best_affine(info: &NiftiInfo) -> [[f64; 4]; 4] {
    if info.sform_code > 0 {
        let s = info.srow;
        return [s[0], s[1], s[2], [0.0, 0.0, 0.0, 1.0]];
    }
    let zoom = |k: usize| {
        let z = info.pixdim.get(k).copied().unwrap_or(1.0);
        if z == 0.0 {
            1.0
        } else {
            z
        }
    };
    if info.qform_code > 0 {
        let [b, c, d] = info.quatern;
        let w2 = 1.0 - (b * b + c * c + d * d);
        let a = if w2 < 0.0 { 0.0 } else { w2.sqrt() };
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if info.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let z = [zoom(1), zoom(2), zoom(3) * qfac];
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = r[i][j] * z[j];
            }
            m[i][3] = info.qoffset[i];
        }
        m[3][3] = 1.0;
        return m;
    }
    // nibabel get_base_affine: x flipped, origin at the volume centre.
    let dim = |k: usize| info.dims.get(k).copied().unwrap_or(1) as f64;
    let z = [-zoom(1), zoom(2), zoom(3)];
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        m[i][i] = z[i];
        m[i][3] = -((dim(i) - 1.0) / 2.0) * z[i];
    }
    m[3][3] = 1.0;
    m
}

/// Orientation codes of an affine, like nibabel's `aff2axcodes`: for each voxel axis
/// the world direction it mostly points to (`R`/`L`, `A`/`P`, `S`/`I`).
pub fn axis_codes(affine: &[[f64; 4]; 4]) -> [char; 3] {
    let mut out = ['?'; 3];
    let mut used = [false; 3];
    for (j, o) in out.iter_mut().enumerate() {
        let mut best = (0usize, 0.0f64);
        for (i, u) in used.iter().enumerate() {
            let v = affine[i][j];
            if !*u && v.abs() > best.1.abs() {
                best = (i, v);
            }
        }
        used[best.0] = true;
        *o = match (best.0, best.1 >= 0.0) {
            (0, true) => 'R',
            (0, false) => 'L',
            (1, true) => 'A',
            (1, false) => 'P',
            (2, true) => 'S',
            _ => 'I',
        };
    }
    out
}

/// An affine scaling voxel indices by `spacing` (mm), origin at voxel 0 (RAS+).
pub fn affine_from_spacing(spacing: [f64; 3]) -> [[f64; 4]; 4] {
    [
        [spacing[0], 0.0, 0.0, 0.0],
        [0.0, spacing[1], 0.0, 0.0],
        [0.0, 0.0, spacing[2], 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// Write a float32 NIfTI-1 single file, atomically; gzipped when `path` ends in `.gz`.
///
/// `data` is C-ordered over `dims` (`data[((x*ny + y)*nz + z)]` for 3-D), the same
/// convention [`read_nifti`] returns, so `read_nifti(write_nifti1(x)) == x`.
/// The affine is stored as the sform (code 1, scanner) and pixdim holds its column
/// norms; `scl_slope` is 1.
pub fn write_nifti1(
    path: &Path,
    data: &[f32],
    dims: &[usize],
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    if dims.is_empty() || dims.len() > 7 {
        return Err(IoError::InvalidArgument(format!(
            "{}: NIfTI needs 1 to 7 dimensions, got {}",
            path.display(),
            dims.len()
        )));
    }
    let n = crate::medimage::checked_len(dims).unwrap_or(usize::MAX);
    if n != data.len() {
        return Err(IoError::InvalidArgument(format!(
            "{}: {} values given for dims {dims:?} ({n} expected)",
            path.display(),
            data.len()
        )));
    }
    if let Some(d) = dims.iter().find(|&&d| d == 0 || d > i16::MAX as usize) {
        return Err(IoError::InvalidArgument(format!(
            "{}: NIfTI-1 dimension {d} out of range 1..=32767",
            path.display()
        )));
    }
    let mut h = vec![0u8; 352];
    let put_i16 = |h: &mut Vec<u8>, o: usize, v: i16| h[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put_i32 = |h: &mut Vec<u8>, o: usize, v: i32| h[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut Vec<u8>, o: usize, v: f32| h[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put_i32(&mut h, 0, 348);
    h[38] = b'r'; // "regular", as nibabel writes
    put_i16(&mut h, 40, dims.len() as i16);
    for k in 0..7 {
        put_i16(&mut h, 42 + 2 * k, *dims.get(k).unwrap_or(&1) as i16);
    }
    put_i16(&mut h, 70, 16); // float32
    put_i16(&mut h, 72, 32);
    let col_norm = |j: usize| {
        (0..3)
            .map(|i| affine[i][j] * affine[i][j])
            .sum::<f64>()
            .sqrt()
    };
    put_f32(&mut h, 76, 1.0); // qfac
    for k in 0..7 {
        let v = if k < 3 { col_norm(k) } else { 1.0 };
        put_f32(&mut h, 80 + 4 * k, v as f32);
    }
    put_f32(&mut h, 108, 352.0);
    put_f32(&mut h, 112, 1.0);
    put_f32(&mut h, 116, 0.0);
    h[123] = 2 | 8; // mm, seconds
    let descrip = b"medvlm";
    h[148..148 + descrip.len()].copy_from_slice(descrip);
    put_i16(&mut h, 252, 0); // qform_code
    put_i16(&mut h, 254, 1); // sform_code: scanner
    for (r, off) in [(0usize, 280usize), (1, 296), (2, 312)] {
        for (c, v) in affine[r].iter().enumerate() {
            put_f32(&mut h, off + 4 * c, *v as f32);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    // bytes 348..352: no extensions
    let mut body = h;
    body.reserve(n * 4);
    // C order -> Fortran (file) order.
    let start = body.len();
    body.resize(start + n * 4, 0);
    crate::medimage::for_each_fortran_to_c(dims, |fi, ci| {
        body[start + fi * 4..start + fi * 4 + 4].copy_from_slice(&data[ci].to_le_bytes());
    });
    let gz = path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("gz"))
        .unwrap_or(false);
    if gz {
        crate::atomic::write_atomic_with(path, |w| {
            let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::default());
            std::io::Write::write_all(&mut enc, &body)?;
            enc.finish()?;
            Ok(())
        })
    } else {
        crate::atomic::write_atomic(path, &body)
    }
}
