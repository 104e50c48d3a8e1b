//! NumPy `.npy` format 1.0/2.0 (NEP 1, "A simple file format for NumPy arrays"):
//! a float32 writer for `medvlm convert` and a reader for the dtypes MedMNIST and
//! common tools produce (`u1`, `i1`, `<u2`, `<i2`, `<i4`, `<i8`, `<u8`, `<f4`, `<f8`, `|b1`).

use std::path::Path;

use crate::error::{IoError, Result};

/// A decoded array: values as `f64` in C order (Fortran-ordered files are reordered).
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    /// The file's dtype descriptor, e.g. `"|u1"`, `"<f4"`.
    pub descr: String,
    pub data: Vec<f64>,
}

/// Encode a float32 little-endian C-order `.npy` (format 1.0).
pub fn encode_npy_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let n = crate::medimage::checked_len(shape).unwrap_or(usize::MAX);
    if n != data.len() {
        return Err(IoError::InvalidArgument(format!(
            "npy: {} values for shape {shape:?}",
            data.len()
        )));
    }
    let shape_str = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // magic(6) + version(2) + len(2) + header + '\n' must be a multiple of 64
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Write a float32 `.npy` atomically.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes = encode_npy_f32(shape, data).map_err(|e| IoError::Npy {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::atomic::write_atomic(path, &bytes)
}

/// Read a `.npy` file.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| IoError::os(path, e))?;
    decode_npy(&bytes).map_err(|reason| IoError::Npy {
        path: path.to_path_buf(),
        reason,
    })
}

fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let k = header.find(&format!("'{key}'"))?;
    let rest = &header[k + key.len() + 2..];
    let colon = rest.find(':')?;
    Some(rest[colon + 1..].trim_start())
}

/// Parsed `.npy` header: dtype descriptor, Fortran order, shape, and the byte
/// offset where the data start.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    pub data_offset: usize,
}

/// Parse the header of `.npy` bytes.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (magic \\x93NUMPY missing)".into());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or("header has no 'descr'")?
        .to_string();
    if descr.len() < 3 {
        return Err(format!("unsupported dtype {descr}"));
    }
    let fortran = dict_value(header, "fortran_order")
        .map(|v| v.starts_with("True"))
        .ok_or("header has no 'fortran_order'")?;
    let shape_txt = dict_value(header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or("header has no 'shape'")?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry '{s}'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    Ok(NpyHeader {
        descr,
        fortran_order: fortran,
        shape,
        data_offset: start + hlen,
    })
}

/// Decode `.npy` bytes.
pub fn decode_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    let NpyHeader {
        descr,
        fortran_order: fortran,
        shape,
        data_offset,
    } = parse_header(bytes)?;
    // A descriptor is an ASCII byte-order mark, a kind letter and a size (`<f4`, `|u1`); a
    // damaged header can hold anything, and the slicing below needs ASCII.
    if !descr.is_ascii() || descr.len() < 3 {
        return Err(format!("unsupported dtype {descr:?}"));
    }
    let (start, hlen) = (data_offset, 0usize);
    let n = crate::medimage::checked_len(&shape)
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let body = &bytes[start + hlen..];
    let (size, big) = {
        let order = descr.chars().next().unwrap_or('|');
        let size: usize = descr[2..]
            .parse()
            .map_err(|_| format!("unsupported dtype {descr}"))?;
        (size, order == '>')
    };
    if n.checked_mul(size).is_none_or(|need| body.len() < need) {
        return Err(format!(
            "truncated data: {} bytes, {} expected for shape {shape:?} {descr}",
            body.len(),
            n.saturating_mul(size)
        ));
    }
    let kind = &descr[1..2];
    macro_rules! conv {
        ($t:ty, $s:expr) => {
            body[..n * $s]
                .chunks_exact($s)
                .map(|c| {
                    let mut a = [0u8; $s];
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
    let mut data: Vec<f64> = match (kind, size) {
        ("u", 1) | ("b", 1) => body[..n].iter().map(|&b| b as f64).collect(),
        ("i", 1) => body[..n].iter().map(|&b| b as i8 as f64).collect(),
        ("u", 2) => conv!(u16, 2),
        ("i", 2) => conv!(i16, 2),
        ("u", 4) => conv!(u32, 4),
        ("i", 4) => conv!(i32, 4),
        ("u", 8) => conv!(u64, 8),
        ("i", 8) => conv!(i64, 8),
        ("f", 4) => conv!(f32, 4),
        ("f", 8) => conv!(f64, 8),
        _ => return Err(format!("unsupported dtype {descr}")),
    };
    if fortran && shape.len() > 1 {
        data = crate::medimage::fortran_to_c(&data, &shape);
    }
    Ok(NpyArray { shape, descr, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose descriptor is not ASCII (found by the fuzzer: the decoder sliced it at
    /// a byte inside a multi-byte character and panicked) is an error naming the descriptor.
    #[test]
    fn non_ascii_or_short_descriptors_are_errors() {
        let good = encode_npy_f32(&[2], &[1.0, 2.0]).unwrap();
        assert_eq!(decode_npy(&good).unwrap().shape, vec![2]);
        // Replacements of the same byte length as `'<f4'`, so the header length still holds.
        for bad in ["'|\u{283}'", "'|\u{39a}'", "'|u' "] {
            assert_eq!(bad.len(), 5);
            let at = good.windows(5).position(|w| w == b"'<f4'").unwrap();
            let mut bytes = good.clone();
            bytes[at..at + 5].copy_from_slice(bad.as_bytes());
            let err = match decode_npy(&bytes) {
                Ok(_) => panic!("{bad:?} accepted"),
                Err(e) => e,
            };
            assert!(err.contains("unsupported dtype"), "{bad:?}: {err}");
        }
    }
}
