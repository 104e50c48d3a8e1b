//! DICOM reading (dicom-rs: `dicom-object` + `dicom-pixeldata`) and a minimal
//! Secondary Capture writer.
//!
//! Reading follows DICOM PS3.3 C.7.6.3 (Image Pixel module) and C.11.1 (Modality LUT):
//! samples are unpacked by Bits Allocated / Bits Stored / Pixel Representation,
//! then `value * RescaleSlope + RescaleIntercept` is applied to monochrome images,
//! so CT comes out in Hounsfield units. Colour is returned as RGB: YBR_FULL is
//! converted with the ITU-R BT.601 full-range matrix (the one pydicom uses) and
//! PALETTE COLOR through its lookup tables. MONOCHROME1 is kept as stored and
//! flagged in [`MedImage::photometric`]; windowing inverts it.
//!
//! Transfer syntaxes decodable in this build: implicit/explicit VR little endian,
//! explicit VR big endian, deflated explicit VR little endian, RLE lossless (medvlm's
//! own validated decoder, [`crate::rle`], 8/16/32 bits allocated), JPEG baseline /
//! extended (8-bit) / lossless (via `jpeg-decoder`), 12-bit grey JPEG extended
//! (medvlm's own decoder, [`crate::jpeg12`]), JPEG 2000 when the `jpeg2000` cargo feature of this crate is
//! enabled (default), and JPEG-LS lossless / near-lossless (medvlm's own pure-Rust
//! decoder, [`crate::jpegls`]). Anything else gives
//! [`IoError::UnsupportedTransferSyntax`] naming the syntax and the file.
//! Bit-packed 1-bit data, native YBR_FULL_422 and JPEG colour frames with
//! Photometric Interpretation RGB are also decoded here (see `prepare_pixels`), and
//! files without preamble or file meta information are read like pydicom's
//! `force=True` ([`open_with_notes`]).

use std::path::Path;

use crate::dicom_lengths::check_declared_lengths;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{
    file::ReadPreamble, DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions,
};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use crate::error::{IoError, Result};
use crate::medimage::{Layout, MedImage, Photometric, SourceFormat};

/// SOP Class UID of Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Explicit VR Little Endian transfer syntax UID.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Name and UID of a transfer syntax, for messages: `"RLE Lossless (1.2.840.10008.1.2.5)"`.
pub fn transfer_syntax_label(uid: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{} ({uid})", ts.name()),
        None => format!("unknown transfer syntax ({uid})"),
    }
}

/// Open a DICOM file (header and pixel data), with a clear error when it is not one.
///
/// Like pydicom's `dcmread(..., force=True)`, files without the 128-byte preamble
/// (starting with `DICM`, or directly with the file meta group) and bare data sets
/// without any file meta information are read too; see [`open_with_notes`].
pub fn open(path: &Path) -> Result<DefaultDicomObject> {
    open_with_notes(path).map(|(obj, _)| obj)
}

/// [`open`], also returning what was unusual about the file's structure (no
/// preamble, no file meta information and the transfer syntax guessed), for
/// [`MedImage::warnings`].
pub fn open_with_notes(path: &Path) -> Result<(DefaultDicomObject, Vec<String>)> {
    let head = read_head(path, 132)?;
    let parse_err = |ts: String, reason: String| IoError::Dicom {
        path: path.to_path_buf(),
        transfer_syntax: ts,
        reason: format!("cannot parse the data set: {reason}"),
    };
    if head.len() >= 132 && &head[128..132] == b"DICM" {
        let f = std::fs::File::open(path).map_err(|e| IoError::os(path, e))?;
        check_declared_lengths(std::io::BufReader::new(f), Some(132), None)
            .map_err(|reason| parse_err(meta_ts_or_unknown(path), reason))?;
        let obj = crate::guard::quiet_catch(|| OpenFileOptions::new().open_file(path))
            .map_err(|p| parse_err(meta_ts_or_unknown(path), p))?
            .map_err(|e| parse_err(meta_ts_or_unknown(path), crate::guard::error_chain(&e)))?;
        return Ok((obj, Vec::new()));
    }
    let bytes = std::fs::read(path).map_err(|e| IoError::os(path, e))?;
    let from_meta_group = |with_magic: &[u8], note: String| {
        let ts = || meta_ts_of(with_magic).unwrap_or_else(|| "unknown".into());
        check_declared_lengths(std::io::Cursor::new(with_magic), Some(4), None)
            .map_err(|reason| parse_err(ts(), reason))?;
        let r = crate::guard::quiet_catch(|| {
            OpenFileOptions::new()
                .read_preamble(ReadPreamble::Never)
                .from_reader(with_magic)
        });
        let obj = r
            .map_err(|p| parse_err(ts(), p))?
            .map_err(|e| parse_err(ts(), crate::guard::error_chain(&e)))?;
        Ok::<_, IoError>((obj, vec![format!("{}: {note}", path.display())]))
    };
    if bytes.starts_with(b"DICM") {
        return from_meta_group(
            &bytes,
            "no 128-byte preamble before 'DICM' (read anyway)".into(),
        );
    }
    if bytes.len() >= 8 && bytes[0..2] == [0x02, 0x00] && is_vr(&bytes[4..6]) {
        let mut with_magic = b"DICM".to_vec();
        with_magic.extend_from_slice(&bytes);
        return from_meta_group(
            &with_magic,
            "no preamble and no 'DICM' prefix; the file meta group starts at byte 0 (read anyway)"
                .into(),
        );
    }
    let Some(ts) = guess_bare_transfer_syntax(&bytes) else {
        return Err(IoError::Dicom {
            path: path.to_path_buf(),
            transfer_syntax: "unknown".into(),
            reason: "not a DICOM file: no 'DICM' at byte 128 or 0, no file meta group at \
                     byte 0, and the first bytes are not a data element of group 0008 or \
                     later in a known byte order"
                .into(),
        });
    };
    let label = transfer_syntax_label(ts.uid());
    check_declared_lengths(std::io::Cursor::new(&bytes), None, Some(ts.uid()))
        .map_err(|reason| parse_err(label.clone(), reason))?;
    let ds = crate::guard::quiet_catch(|| InMemDicomObject::read_dataset_with_ts(&bytes[..], ts))
        .map_err(|p| parse_err(label.clone(), p))?
        .map_err(|e| parse_err(label.clone(), crate::guard::error_chain(&e)))?;
    let sop_class = elem_str(&ds, tags::SOP_CLASS_UID).unwrap_or_default();
    let sop_instance = elem_str(&ds, tags::SOP_INSTANCE_UID).unwrap_or_default();
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(ts.uid())
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .build()
        .map_err(|e| parse_err(label.clone(), crate::guard::error_chain(&e)))?;
    let note = format!(
        "{}: no file meta information (no preamble, no 'DICM'): read as a bare data set \
         in {label}, guessed from its first element like pydicom's force=True",
        path.display()
    );
    Ok((ds.with_exact_meta(meta), vec![note]))
}

/// The DICOM value representations (PS3.5 6.2), to recognise explicit VR encoding.
const VRS: &[&[u8; 2]] = &[
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
];

fn is_vr(b: &[u8]) -> bool {
    VRS.iter().any(|v| v[..] == *b)
}

/// Transfer syntax of a data set without file meta information, from its first
/// element the way pydicom's `force=True` does: a known VR at bytes 4..6 means
/// explicit VR; the group number (0008 or later, below 0x0100 in the right byte
/// order for a normal data set) gives the byte order.
fn guess_bare_transfer_syntax(
    b: &[u8],
) -> Option<&'static dicom_transfer_syntax_registry::TransferSyntax> {
    if b.len() < 8 {
        return None;
    }
    let le = u16::from_le_bytes([b[0], b[1]]);
    let be = u16::from_be_bytes([b[0], b[1]]);
    let little = if (0x0008..0x0100).contains(&le) {
        true
    } else if (0x0008..0x0100).contains(&be) {
        false
    } else {
        return None;
    };
    let uid = match (is_vr(&b[4..6]), little) {
        (true, true) => EXPLICIT_VR_LE,
        (true, false) => "1.2.840.10008.1.2.2",
        (false, true) => "1.2.840.10008.1.2",
        (false, false) => return None, // implicit VR big endian is not a DICOM encoding
    };
    TransferSyntaxRegistry.get(uid)
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| IoError::os(path, e))?;
    let mut buf = Vec::with_capacity(n);
    f.take(n as u64)
        .read_to_end(&mut buf)
        .map_err(|e| IoError::os(path, e))?;
    Ok(buf)
}

/// Best-effort transfer syntax of a file whose data set is unreadable: parse only the meta group.
fn meta_transfer_syntax(path: &Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut r = std::io::BufReader::new(f);
    let mut pre = [0u8; 128];
    std::io::Read::read_exact(&mut r, &mut pre).ok()?;
    meta_ts_of(r)
}

fn meta_ts_or_unknown(path: &Path) -> String {
    meta_transfer_syntax(path).unwrap_or_else(|| "unknown".into())
}

/// Transfer syntax label from a reader positioned at `DICM` + the file meta group.
fn meta_ts_of(r: impl std::io::Read) -> Option<String> {
    let meta = crate::guard::quiet_catch(|| dicom_object::FileMetaTable::from_reader(r))
        .ok()?
        .ok()?;
    Some(transfer_syntax_label(meta.transfer_syntax()))
}

/// Text of an element; an element stored with VR UN (pydicom reads it with the
/// dictionary's VR) is taken as its bytes in ASCII / Latin-1.
fn elem_str(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = if e.vr() == VR::UN {
        e.to_bytes()
            .ok()?
            .iter()
            .map(|&b| b as char)
            .collect::<String>()
    } else {
        e.to_str().ok()?.into_owned()
    };
    Some(s.trim_end_matches(['\0', ' ']).trim().to_string())
}

fn elem_f64s(obj: &InMemDicomObject, tag: Tag) -> Vec<f64> {
    let Some(e) = obj.element_opt(tag).ok().flatten() else {
        return Vec::new();
    };
    if e.vr() == VR::UN {
        // a decimal string stored as UN (values separated by backslashes)
        return elem_str(obj, tag)
            .map(|s| {
                s.split('\\')
                    .map_while(|v| v.trim().parse::<f64>().ok())
                    .collect()
            })
            .unwrap_or_default();
    }
    e.to_multi_float64().ok().unwrap_or_default()
}

fn elem_u16(obj: &InMemDicomObject, tag: Tag) -> Option<u16> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u16>().ok())
}

/// Read a DICOM file into a [`MedImage`] (all frames, Modality LUT applied).
pub fn read_dicom(path: &Path) -> Result<MedImage> {
    let (obj, notes) = open_with_notes(path)?;
    let mut img = decode_object(path, &obj)?;
    img.warnings.splice(0..0, notes);
    Ok(img)
}

/// Decode the pixel data of an opened DICOM object. See the module docs.
pub fn decode_object(path: &Path, obj: &DefaultDicomObject) -> Result<MedImage> {
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ts_label = transfer_syntax_label(&ts_uid);
    let dicom_err = |reason: String| IoError::Dicom {
        path: path.to_path_buf(),
        transfer_syntax: ts_label.clone(),
        reason,
    };
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        let sop = elem_str(obj, tags::SOP_CLASS_UID).unwrap_or_default();
        return Err(dicom_err(format!(
            "no Pixel Data (7FE0,0010) element: not an image (SOP class {sop})"
        )));
    }
    match TransferSyntaxRegistry.get(&ts_uid) {
        None => {
            return Err(IoError::UnsupportedTransferSyntax {
                path: path.to_path_buf(),
                name: "unknown".into(),
                uid: ts_uid.clone(),
                reason: "not in the transfer syntax registry".into(),
            })
        }
        Some(ts)
            if (ts.is_unsupported_pixel_encapsulation() || !ts.can_decode_all())
                && !JPEG_LS_UIDS.contains(&ts_uid.as_str()) =>
        {
            let name = ts.name().to_string();
            return Err(IoError::UnsupportedTransferSyntax {
                path: path.to_path_buf(),
                name,
                uid: ts_uid.clone(),
                reason: "no pixel data decoder for it is compiled in (see docs/io.md; \
                         JPEG 2000 needs cargo feature `jpeg2000` of medvlm-io)"
                    .into(),
            });
        }
        Some(_) => {}
    }
    let mut warnings = Vec::new();
    // RLE Lossless, 1-bit and native YBR_FULL_422 pixel data are decoded here into a
    // native 8/16/32-bit copy of the object, which dicom-pixeldata passes through.
    let prepared = crate::guard::quiet_catch(|| prepare_pixels(path, obj, &ts_uid, &mut warnings))
        .and_then(|r| r)
        .map_err(&dicom_err)?;
    let obj = prepared.as_ref().unwrap_or(obj);
    let decoded = match decode_guarded(obj) {
        Ok(d) => d,
        Err(first) => {
            // "Read what is readable": an invalid NumberOfFrames (e.g. "1A") is
            // replaced by the count implied by the native pixel data length.
            match repair_number_of_frames(obj) {
                Some((fixed, n)) => {
                    let d = decode_guarded(&fixed).map_err(&dicom_err)?;
                    warnings.push(format!(
                        "{}: invalid NumberOfFrames replaced by {n} (from the pixel data length)",
                        path.display()
                    ));
                    d
                }
                None => return Err(dicom_err(first)),
            }
        }
    };

    let rows = decoded.rows() as usize;
    let cols = decoded.columns() as usize;
    let frames = (decoded.number_of_frames() as usize).max(1);
    let spp = decoded.samples_per_pixel() as usize;
    let bits_alloc = decoded.bits_allocated();
    let bits_stored = decoded.bits_stored();
    let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let planar = decoded.planar_configuration() == dicom_pixeldata::PlanarConfiguration::PixelFirst;
    let pmi = decoded.photometric_interpretation().as_str().to_string();
    if rows == 0 || cols == 0 {
        return Err(dicom_err(format!(
            "empty image: {rows} rows x {cols} columns"
        )));
    }
    if spp != 1 && spp != 3 {
        return Err(dicom_err(format!(
            "unsupported Samples per Pixel {spp} (expected 1 or 3)"
        )));
    }
    let bytes_per = match bits_alloc {
        8 => 1,
        16 => 2,
        32 => 4,
        other => {
            return Err(dicom_err(format!(
                "unsupported Bits Allocated {other} (supported: 8, 16, 32)"
            )))
        }
    };
    if bits_stored == 0 || bits_stored > bits_alloc {
        return Err(dicom_err(format!(
            "Bits Stored {bits_stored} does not fit Bits Allocated {bits_alloc}"
        )));
    }
    let n_samples = crate::medimage::checked_len(&[frames, rows, cols, spp, bytes_per])
        .map(|b| b / bytes_per)
        .ok_or_else(|| {
            dicom_err(format!(
                "image size overflows: {frames} frame(s) of {rows}x{cols}x{spp}"
            ))
        })?;
    let raw = decoded.data();
    if raw.len() < n_samples * bytes_per {
        return Err(dicom_err(format!(
            "pixel data truncated: {} bytes, {} expected for {frames} frame(s) of \
             {rows}x{cols}x{spp} at {bits_alloc} bits",
            raw.len(),
            n_samples * bytes_per
        )));
    }
    let mut data = unpack_samples(raw, n_samples, bits_alloc, bits_stored, signed);

    // Planar configuration 1 (RRR...GGG...BBB per frame) -> interleaved.
    if spp == 3 && planar {
        let per = rows * cols;
        let mut out = vec![0f32; data.len()];
        for f in 0..frames {
            let src = &data[f * per * 3..(f + 1) * per * 3];
            let dst = &mut out[f * per * 3..(f + 1) * per * 3];
            for i in 0..per {
                for ch in 0..3 {
                    dst[i * 3 + ch] = src[ch * per + i];
                }
            }
        }
        data = out;
    }

    let (photometric, channels) = match pmi.as_str() {
        "MONOCHROME1" => (Photometric::Monochrome1, 1),
        "MONOCHROME2" => (Photometric::Monochrome2, 1),
        "RGB" => (Photometric::Rgb, 3),
        "YBR_FULL" => {
            ybr_full_to_rgb(&mut data);
            (Photometric::Rgb, 3)
        }
        "PALETTE COLOR" => {
            data = apply_palette(obj, &data).map_err(dicom_err)?;
            (Photometric::Rgb, 3)
        }
        other => {
            return Err(dicom_err(format!(
                "unsupported Photometric Interpretation {other} for decoded data"
            )))
        }
    };
    if channels != spp && pmi != "PALETTE COLOR" {
        return Err(dicom_err(format!(
            "Photometric Interpretation {pmi} with Samples per Pixel {spp}"
        )));
    }

    // Modality LUT (PS3.3 C.11.1): grey images only.
    if channels == 1 {
        let rescale = decoded.rescale().map_err(|e| dicom_err(e.to_string()))?;
        let per = rows * cols;
        for f in 0..frames {
            let r = if rescale.len() > 1 {
                rescale.get(f).or(rescale.first())
            } else {
                rescale.first()
            };
            if let Some(r) = r {
                if r.slope != 1.0 || r.intercept != 0.0 {
                    for v in &mut data[f * per..(f + 1) * per] {
                        *v = (*v as f64 * r.slope + r.intercept) as f32;
                    }
                }
            }
        }
    }

    let centres = elem_f64s(obj, tags::WINDOW_CENTER);
    let widths = elem_f64s(obj, tags::WINDOW_WIDTH);
    let file_windows = centres
        .iter()
        .zip(widths.iter())
        .filter(|(_, w)| **w > 0.0)
        .map(|(c, w)| (*c, *w))
        .collect();
    let mut shape = Vec::new();
    if frames > 1 {
        shape.push(frames);
    }
    shape.push(rows);
    shape.push(cols);
    if channels == 3 {
        shape.push(3);
    }
    Ok(MedImage {
        data,
        shape,
        layout: Layout::Planar {
            frames,
            rows,
            cols,
            channels,
        },
        photometric,
        format: SourceFormat::Dicom,
        file_windows,
        modality: elem_str(obj, tags::MODALITY),
        transfer_syntax: Some(ts_label),
        affine: None,
        spacing: elem_f64s(obj, tags::PIXEL_SPACING),
        bits_stored: Some(bits_stored),
        warnings,
    })
}

/// Decode pixel data, turning a decoder panic (on untrusted compressed bytes) into an error.
fn decode_guarded(
    obj: &DefaultDicomObject,
) -> std::result::Result<dicom_pixeldata::DecodedPixelData<'static>, String> {
    crate::guard::quiet_catch(|| obj.decode_pixel_data().map(|d| d.to_owned()))?.map_err(|e| {
        format!(
            "cannot decode pixel data: {}",
            crate::guard::error_chain(&e)
        )
    })
}

/// JPEG transfer syntaxes whose 8-bit colour frames jpeg-decoder decodes:
/// baseline, extended, lossless (process 14 and its SV1 selection).
const JPEG_8BIT_UIDS: &[&str] = &[
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

/// Transfer syntaxes with native (not encapsulated) pixel data.
const NATIVE_UIDS: &[&str] = &[
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
];

/// JPEG-LS lossless and near-lossless, decoded by [`crate::jpegls`].
const JPEG_LS_UIDS: &[&str] = &["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"];

/// RLE Lossless transfer syntax UID.
pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Replace pixel data that medvlm decodes itself by native samples in a copy of the
/// object (explicit VR little endian, Bits Allocated 8/16/32), or `None` when
/// dicom-pixeldata decodes the object as it is:
/// - RLE Lossless (any Bits Allocated; headers validated, see [`crate::rle`]);
/// - native Bits Allocated 1 (bit-packed, PS3.5 8.1.1: pixel `i` is bit `i % 8` of
///   byte `i / 8`, continuing across frames) -> 8-bit 0/1 values, as pydicom gives;
/// - JPEG-LS (lossless and near-lossless, [`crate::jpegls`]);
/// - 12-bit grey JPEG extended ([`crate::jpeg12`]);
/// - JPEG colour frames with Photometric Interpretation RGB -> decoded without a
///   YCbCr -> RGB transform;
/// - native YBR_FULL_422 (PS3.3 C.7.6.3.1.2: `Y1 Y2 Cb Cr` per pair of pixels) ->
///   full-resolution YBR_FULL (converted to RGB later, like pydicom).
fn prepare_pixels(
    path: &Path,
    obj: &DefaultDicomObject,
    ts_uid: &str,
    warnings: &mut Vec<String>,
) -> std::result::Result<Option<DefaultDicomObject>, String> {
    let pixel = obj
        .element(tags::PIXEL_DATA)
        .map_err(|e| format!("no Pixel Data: {e}"))?;
    let encapsulated = pixel.value().fragments().is_some();
    if encapsulated && NATIVE_UIDS.contains(&ts_uid) {
        return Err(format!(
            "the Pixel Data are encapsulated (compressed fragments) but the transfer syntax \
             is a native one; without file meta information the compression is unknown ({} \
             fragment(s))",
            pixel.value().fragments().map_or(0, |f| f.len())
        ));
    }
    let bits = elem_u16(obj, tags::BITS_ALLOCATED)
        .ok_or("missing or invalid Bits Allocated (0028,0100)")?;
    let pmi = elem_str(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    let is_rle = ts_uid == RLE_LOSSLESS;
    let spp0 = elem_u16(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let rgb_jpeg = JPEG_8BIT_UIDS.contains(&ts_uid) && spp0 == 3 && bits == 8 && pmi == "RGB";
    let is_jls = JPEG_LS_UIDS.contains(&ts_uid);
    let jpeg12 = JPEG_8BIT_UIDS[..2].contains(&ts_uid)
        && spp0 == 1
        && bits == 16
        && pixel
            .value()
            .fragments()
            .and_then(|f| f.first())
            .is_some_and(|f| crate::jpeg12::is_12_bit_sequential(f));
    if !(is_rle
        || rgb_jpeg
        || is_jls
        || jpeg12
        || (!encapsulated && (bits == 1 || pmi == "YBR_FULL_422")))
    {
        return Ok(None);
    }
    let rows = elem_u16(obj, tags::ROWS).ok_or("missing or invalid Rows (0028,0010)")? as usize;
    let cols =
        elem_u16(obj, tags::COLUMNS).ok_or("missing or invalid Columns (0028,0011)")? as usize;
    let spp = elem_u16(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as usize;
    if rows == 0 || cols == 0 {
        return Err(format!("empty image: {rows} rows x {cols} columns"));
    }
    if spp != 1 && spp != 3 {
        return Err(format!(
            "unsupported Samples per Pixel {spp} (expected 1 or 3)"
        ));
    }
    let declared_frames = match obj.element_opt(tags::NUMBER_OF_FRAMES).ok().flatten() {
        None => Some(1usize),
        Some(e) => e.to_int::<u32>().ok().map(|n| n as usize),
    };
    let pixels = rows * cols;
    let mut fixed = obj.clone();
    let us = |tag: Tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let out: Vec<u8> = if jpeg12 {
        // 12-bit lossy JPEG, which jpeg-decoder rejects: medvlm's own decoder
        let frags = pixel.value().fragments().unwrap_or(&[]);
        let frames = declared_frames.ok_or("invalid NumberOfFrames")?.max(1);
        let mut out = Vec::new();
        for (f, frag) in frames_of_fragments(frags, pixel.value().offset_table(), frames)?
            .iter()
            .enumerate()
        {
            let g = crate::jpeg12::decode(frag, rows, cols)
                .map_err(|e| format!("cannot decode pixel data: frame {}: {e}", f + 1))?;
            debug_assert_eq!((g.height, g.width), (rows, cols));
            out.extend(g.samples.iter().flat_map(|&v| v.to_ne_bytes()));
        }
        out
    } else if is_jls {
        let bytes = match bits {
            8 => 1,
            16 => 2,
            other => {
                return Err(format!(
                    "unsupported Bits Allocated {other} for JPEG-LS (supported: 8, 16)"
                ))
            }
        };
        let frags = pixel
            .value()
            .fragments()
            .ok_or("JPEG-LS pixel data are not encapsulated (no fragments)")?;
        let frames = declared_frames.ok_or("invalid NumberOfFrames")?.max(1);
        let mut out = Vec::new();
        for (f, frag) in frames_of_fragments(frags, pixel.value().offset_table(), frames)?
            .iter()
            .enumerate()
        {
            let fr = crate::jpegls::decode(frag, (rows, cols, spp))
                .map_err(|e| format!("cannot decode pixel data: frame {}: {e}", f + 1))?;
            if fr.width != cols
                || fr.height != rows
                || fr.components != spp
                || fr.precision as u16 > bits
            {
                return Err(format!(
                    "JPEG-LS frame {} is {}x{} with {} component(s) of {} bits, the data set \
                     says {rows}x{cols}x{spp} in {bits} bits",
                    f + 1,
                    fr.height,
                    fr.width,
                    fr.components,
                    fr.precision
                ));
            }
            if out.is_empty() {
                out.reserve(fr.samples.len() * bytes * frames);
            }
            if bytes == 1 {
                out.extend(fr.samples.iter().map(|&v| v as u8));
            } else {
                out.extend(fr.samples.iter().flat_map(|&v| v.to_ne_bytes()));
            }
        }
        if spp == 3 {
            fixed.put(us(tags::PLANAR_CONFIGURATION, 0));
        }
        out
    } else if rgb_jpeg {
        // PS3.5 8.2.1: JPEG colour data with Photometric Interpretation RGB were not
        // colour-transformed; jpeg-decoder would assume YCbCr when the stream has no
        // Adobe APP14 marker and component ids other than 'R','G','B' (pydicom
        // follows the Photometric Interpretation too).
        let frags = pixel
            .value()
            .fragments()
            .ok_or("JPEG pixel data are not encapsulated (no fragments)")?;
        let frames = declared_frames.ok_or("invalid NumberOfFrames")?.max(1);
        let frame_bytes = pixels * 3;
        let mut out = Vec::with_capacity(frame_bytes.saturating_mul(frames).min(1 << 30));
        for (f, frag) in frames_of_fragments(frags, pixel.value().offset_table(), frames)?
            .iter()
            .enumerate()
        {
            let mut dec = jpeg_decoder::Decoder::new(&frag[..]);
            dec.set_color_transform(jpeg_decoder::ColorTransform::RGB);
            let px = dec
                .decode()
                .map_err(|e| format!("cannot decode pixel data: JPEG frame {}: {e}", f + 1))?;
            let info = dec.info().ok_or("JPEG frame without a frame header")?;
            if info.pixel_format != jpeg_decoder::PixelFormat::RGB24
                || info.width as usize != cols
                || info.height as usize != rows
                || px.len() != frame_bytes
            {
                return Err(format!(
                    "JPEG frame {} is {}x{} {:?}, the data set says {rows}x{cols} RGB 8-bit",
                    f + 1,
                    info.height,
                    info.width,
                    info.pixel_format
                ));
            }
            out.extend_from_slice(&px);
        }
        fixed.put(us(tags::PLANAR_CONFIGURATION, 0));
        out
    } else if is_rle {
        let bytes = match bits {
            8 => 1,
            16 => 2,
            32 => 4,
            other => {
                return Err(format!(
                    "unsupported Bits Allocated {other} for RLE Lossless (supported: 8, 16, 32)"
                ))
            }
        };
        let frags = pixel
            .value()
            .fragments()
            .ok_or("RLE Lossless pixel data are not encapsulated (no fragments)")?;
        let frames = match declared_frames {
            Some(n) => n.max(1),
            None => {
                warnings.push(format!(
                    "{}: invalid NumberOfFrames replaced by {} (the number of RLE fragments)",
                    path.display(),
                    frags.len()
                ));
                frags.len().max(1)
            }
        };
        let per_frame = frames_of_fragments(frags, pixel.value().offset_table(), frames)?;
        let frame_bytes = pixels * spp * bytes;
        let total_in: usize = frags.iter().map(|f| f.len()).sum();
        // PackBits expands 2 bytes to at most 128: a header asking for more is corrupt
        // (and must not make us allocate it).
        let total_out = frame_bytes
            .checked_mul(frames)
            .filter(|&n| n <= total_in.saturating_mul(64).saturating_add(1 << 20))
            .ok_or_else(|| {
                format!(
                    "{frames} frame(s) of {rows}x{cols}x{spp} at {bits} bits cannot come from \
                     {total_in} bytes of RLE data"
                )
            })?;
        let mut out = vec![0u8; total_out];
        for (f, frag) in per_frame.iter().enumerate() {
            crate::rle::decode_frame(
                frag,
                pixels,
                spp,
                bytes,
                &mut out[f * frame_bytes..(f + 1) * frame_bytes],
            )
            .map_err(|e| format!("frame {}: {e}", f + 1))?;
        }
        if spp == 3 {
            fixed.put(us(tags::PLANAR_CONFIGURATION, 0));
        }
        out
    } else if bits == 1 {
        let frames = declared_frames
            .ok_or("invalid NumberOfFrames for bit-packed (1-bit) pixel data")?
            .max(1);
        let raw = pixel
            .to_bytes()
            .map_err(|e| format!("cannot read Pixel Data: {e}"))?;
        let n = crate::medimage::checked_len(&[frames, pixels, spp])
            .ok_or_else(|| format!("image size overflows: {frames} frame(s) of {rows}x{cols}"))?;
        if n.div_ceil(8) > raw.len() {
            return Err(format!(
                "pixel data truncated: {} bytes, {} needed for {frames} frame(s) of \
                 {rows}x{cols}x{spp} at 1 bit",
                raw.len(),
                n.div_ceil(8)
            ));
        }
        let out: Vec<u8> = (0..n).map(|i| (raw[i / 8] >> (i % 8)) & 1).collect();
        fixed.put(us(tags::BITS_ALLOCATED, 8));
        fixed.put(us(tags::BITS_STORED, 1));
        fixed.put(us(tags::HIGH_BIT, 0));
        out
    } else {
        // native YBR_FULL_422
        if bits != 8 || spp != 3 {
            return Err(format!(
                "YBR_FULL_422 with Bits Allocated {bits} and Samples per Pixel {spp} is not \
                 supported (8 and 3 are)"
            ));
        }
        if cols & 1 == 1 {
            return Err(format!(
                "YBR_FULL_422 needs an even number of columns, not {cols}"
            ));
        }
        let frames = declared_frames
            .ok_or("invalid NumberOfFrames for YBR_FULL_422 pixel data")?
            .max(1);
        let raw = pixel
            .to_bytes()
            .map_err(|e| format!("cannot read Pixel Data: {e}"))?;
        let need =
            crate::medimage::checked_len(&[frames, pixels, 2]).ok_or("image size overflows")?;
        if raw.len() < need {
            return Err(format!(
                "pixel data truncated: {} bytes, {need} expected for {frames} frame(s) of \
                 {rows}x{cols} YBR_FULL_422",
                raw.len()
            ));
        }
        let mut out = Vec::with_capacity(need / 2 * 3);
        for q in raw[..need].chunks_exact(4) {
            out.extend_from_slice(&[q[0], q[2], q[3], q[1], q[2], q[3]]);
        }
        fixed.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("YBR_FULL"),
        ));
        fixed.put(us(tags::PLANAR_CONFIGURATION, 0));
        out
    };
    fixed.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(out),
    ));
    fixed.meta_mut().transfer_syntax = EXPLICIT_VR_LE.to_string();
    Ok(Some(fixed))
}

/// The compressed bytes of each frame: one fragment per frame, all fragments for a
/// single frame, fragments grouped by the Basic Offset Table, or (JPEG-family
/// codestreams without a table) grouped up to each fragment ending with EOI.
fn frames_of_fragments<'a>(
    frags: &'a [Vec<u8>],
    offset_table: Option<&[u32]>,
    frames: usize,
) -> std::result::Result<Vec<std::borrow::Cow<'a, [u8]>>, String> {
    use std::borrow::Cow;
    if frags.len() == frames {
        return Ok(frags.iter().map(|f| Cow::Borrowed(&f[..])).collect());
    }
    if frames == 1 {
        return Ok(vec![Cow::Owned(frags.concat())]);
    }
    let table = offset_table.unwrap_or(&[]);
    if table.len() != frames {
        // JPEG-family codestreams end with EOI (FF D9; the item may be padded with
        // one zero byte): a frame ends with the fragment that ends with EOI.
        let ends_with_eoi = |f: &[u8]| {
            let f = f.strip_suffix(&[0u8]).unwrap_or(f);
            f.ends_with(&[0xFF, 0xD9])
        };
        if frags.first().is_some_and(|f| f.starts_with(&[0xFF, 0xD8])) {
            let mut out = Vec::with_capacity(frames);
            let mut first = 0;
            for (i, f) in frags.iter().enumerate() {
                if ends_with_eoi(f) {
                    out.push(Cow::Owned(frags[first..=i].concat()));
                    first = i + 1;
                }
            }
            if out.len() == frames && first == frags.len() {
                return Ok(out);
            }
        }
        return Err(format!(
            "{} pixel data fragments for {frames} frames and no usable Basic Offset Table \
             ({} entries)",
            frags.len(),
            table.len()
        ));
    }
    // Item positions: each fragment item has an 8-byte header.
    let mut starts = Vec::with_capacity(frags.len());
    let mut pos = 0u64;
    for f in frags {
        starts.push(pos);
        pos += 8 + f.len() as u64;
    }
    let mut out = Vec::with_capacity(frames);
    for (k, &off) in table.iter().enumerate() {
        let first = starts
            .iter()
            .position(|&s| s == off as u64)
            .ok_or_else(|| {
                format!("Basic Offset Table entry {k} ({off}) is not the start of a fragment")
            })?;
        let end = match table.get(k + 1) {
            Some(&next) => starts
                .iter()
                .position(|&s| s == next as u64)
                .filter(|&e| e > first)
                .ok_or_else(|| format!("Basic Offset Table entry {} ({next}) is invalid", k + 1))?,
            None => frags.len(),
        };
        out.push(Cow::Owned(frags[first..end].concat()));
    }
    Ok(out)
}

/// If NumberOfFrames is present but not an integer and the pixel data are native,
/// return a copy with the frame count inferred from the pixel data length.
fn repair_number_of_frames(obj: &DefaultDicomObject) -> Option<(DefaultDicomObject, u32)> {
    let nof = obj.element_opt(tags::NUMBER_OF_FRAMES).ok().flatten()?;
    if nof.to_int::<u32>().is_ok() {
        return None;
    }
    let rows = elem_u16(obj, tags::ROWS)? as usize;
    let cols = elem_u16(obj, tags::COLUMNS)? as usize;
    let spp = elem_u16(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as usize;
    let bits = elem_u16(obj, tags::BITS_ALLOCATED)? as usize;
    let frame_bytes = crate::medimage::checked_len(&[rows, cols, spp, bits])? / 8;
    let pix = obj.element(tags::PIXEL_DATA).ok()?.to_bytes().ok()?;
    if frame_bytes == 0 || pix.len() < frame_bytes {
        return None;
    }
    let n = (pix.len() / frame_bytes) as u32;
    let mut fixed = obj.clone();
    fixed.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from(n.to_string()),
    ));
    Some((fixed, n))
}

/// Unpack native-endian samples into f32, honouring Bits Stored (masking unsigned
/// values, sign-extending signed ones, PS3.5 8.1.1).
fn unpack_samples(
    raw: &[u8],
    n: usize,
    bits_alloc: u16,
    bits_stored: u16,
    signed: bool,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let shift = 32 - bits_stored as u32;
    let fix = |v: u32| -> f32 {
        if signed {
            (((v << shift) as i32) >> shift) as f32
        } else if bits_stored < 32 {
            (v & ((1u32 << bits_stored) - 1)) as f32
        } else {
            v as f32
        }
    };
    match bits_alloc {
        8 => out.extend(raw[..n].iter().map(|&b| fix(b as u32))),
        16 => out.extend(
            raw[..n * 2]
                .chunks_exact(2)
                .map(|c| fix(u16::from_ne_bytes([c[0], c[1]]) as u32)),
        ),
        _ => out.extend(
            raw[..n * 4]
                .chunks_exact(4)
                .map(|c| fix(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))),
        ),
    }
    out
}

/// YBR_FULL -> RGB, ITU-R BT.601 full range (PS3.3 C.7.6.3.1.2), rounded and clipped
/// to 0..255 the way pydicom's `convert_color_space` does.
fn ybr_full_to_rgb(data: &mut [f32]) {
    for px in data.chunks_exact_mut(3) {
        let y = px[0];
        let cb = px[1] - 128.0;
        let cr = px[2] - 128.0;
        let r = y + 1.402 * cr;
        let g = y - (0.114 * 1.772 / 0.587) * cb - (0.299 * 1.402 / 0.587) * cr;
        let b = y + 1.772 * cb;
        px[0] = (r + 0.5).floor().clamp(0.0, 255.0);
        px[1] = (g + 0.5).floor().clamp(0.0, 255.0);
        px[2] = (b + 0.5).floor().clamp(0.0, 255.0);
    }
}

/// PALETTE COLOR (PS3.3 C.7.6.3.1.5): map each index through the red/green/blue LUTs.
/// Output values are the LUT entries as stored (8- or 16-bit).
fn apply_palette(obj: &InMemDicomObject, idx: &[f32]) -> std::result::Result<Vec<f32>, String> {
    let mut luts = Vec::new();
    for (desc_tag, data_tag, name) in [
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            "red",
        ),
        (
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            "green",
        ),
        (
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            "blue",
        ),
    ] {
        let desc: Vec<i64> = obj
            .element_opt(desc_tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_int::<i64>().ok())
            .ok_or_else(|| format!("PALETTE COLOR without a {name} LUT descriptor"))?;
        if desc.len() != 3 {
            return Err(format!(
                "{name} LUT descriptor has {} values, not 3",
                desc.len()
            ));
        }
        let entries = if desc[0] == 0 {
            65536
        } else {
            desc[0] as usize & 0xFFFF
        };
        let first = desc[1] & 0xFFFF;
        let bits = desc[2];
        let bytes = obj
            .element_opt(data_tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_bytes().ok().map(|b| b.into_owned()))
            .ok_or_else(|| {
                format!("PALETTE COLOR without {name} LUT data (segmented LUTs are not supported)")
            })?;
        let table: Vec<f32> = if bits == 8 && bytes.len() == entries {
            bytes.iter().map(|&b| b as f32).collect()
        } else {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as f32)
                .collect()
        };
        if table.len() < entries {
            return Err(format!(
                "{name} LUT data has {} entries, descriptor says {entries}",
                table.len()
            ));
        }
        luts.push((first, table));
    }
    let mut out = Vec::with_capacity(idx.len() * 3);
    for &v in idx {
        for (first, table) in &luts {
            let i = (v as i64 - first).clamp(0, table.len() as i64 - 1) as usize;
            out.push(table[i]);
        }
    }
    Ok(out)
}

/// Metadata of a Secondary Capture written by [`write_secondary_capture`].
/// Every field is optional; defaults give a valid anonymous image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScMetadata {
    /// Modality (0008,0060); default `"OT"` (other).
    pub modality: Option<String>,
    pub study_description: Option<String>,
    pub series_description: Option<String>,
    pub body_part: Option<String>,
    /// Patient name/ID to write (e.g. a phantom id); default empty (type 2 attributes).
    pub patient_name: Option<String>,
    pub patient_id: Option<String>,
    /// Rescale slope and intercept (Modality LUT), e.g. `(1.0, -1024.0)` for CT in HU.
    pub rescale: Option<(f64, f64)>,
    /// Window centre and width to store.
    pub window: Option<(f64, f64)>,
    /// Pixel spacing in mm, (row spacing, column spacing).
    pub pixel_spacing: Option<(f64, f64)>,
    /// SOP Instance UID; default a deterministic `2.25.` UID derived from the pixels
    /// and metadata (same input, same file).
    pub sop_instance_uid: Option<String>,
    /// Study Instance UID; default derived like the SOP Instance UID.
    pub study_instance_uid: Option<String>,
    /// Series Instance UID; default derived like the SOP Instance UID.
    pub series_instance_uid: Option<String>,
}

/// A sample type the Secondary Capture writer accepts: `u8` (8-bit), `u16` (16-bit
/// unsigned) or `i16` (16-bit signed, Pixel Representation 1).
pub trait ScPixel: Copy {
    const BITS: u16;
    const SIGNED: bool;
    fn le_bytes(self, out: &mut Vec<u8>);
}
impl ScPixel for u8 {
    const BITS: u16 = 8;
    const SIGNED: bool = false;
    fn le_bytes(self, out: &mut Vec<u8>) {
        out.push(self)
    }
}
impl ScPixel for u16 {
    const BITS: u16 = 16;
    const SIGNED: bool = false;
    fn le_bytes(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes())
    }
}
impl ScPixel for i16 {
    const BITS: u16 = 16;
    const SIGNED: bool = true;
    fn le_bytes(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes())
    }
}

/// FNV-1a 64-bit, used to derive deterministic UIDs (not for security).
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A `2.25.<decimal>` UID (PS3.5 B.2) derived from `bytes` and a salt.
pub fn derived_uid(bytes: &[u8], salt: &str) -> String {
    let hi = fnv1a(bytes, fnv1a(salt.as_bytes(), 1));
    let lo = fnv1a(bytes, fnv1a(salt.as_bytes(), 2));
    // 2.25 UIDs must not have leading zeros; u128 decimal has none.
    let v = ((hi as u128) << 64 | lo as u128) >> 1;
    format!("2.25.{}", v.max(1))
}

/// Write a single-frame MONOCHROME2 Secondary Capture image (explicit VR little
/// endian, with file meta information), atomically.
///
/// `pixels` are `rows * cols` samples in row-major order. Errors if the length does
/// not match or `rows`/`cols` exceed 65535.
pub fn write_secondary_capture<P: ScPixel>(
    path: &Path,
    pixels: &[P],
    rows: usize,
    cols: usize,
    meta: &ScMetadata,
) -> Result<()> {
    if pixels.len() != rows * cols || rows == 0 || cols == 0 {
        return Err(IoError::InvalidArgument(format!(
            "{}: {} pixels given for a {rows}x{cols} image",
            path.display(),
            pixels.len()
        )));
    }
    if rows > 65535 || cols > 65535 {
        return Err(IoError::InvalidArgument(format!(
            "{}: {rows}x{cols} exceeds the DICOM limit of 65535 rows/columns",
            path.display()
        )));
    }
    let mut pix = Vec::with_capacity(pixels.len() * (P::BITS as usize / 8) + 1);
    for &p in pixels {
        p.le_bytes(&mut pix);
    }
    if pix.len() % 2 == 1 {
        pix.push(0); // DICOM values have even length
    }
    let salt = format!(
        "{rows}x{cols}|{:?}|{:?}|{:?}|{:?}",
        meta.study_description, meta.series_description, meta.modality, meta.patient_id
    );
    let sop_uid = meta
        .sop_instance_uid
        .clone()
        .unwrap_or_else(|| derived_uid(&pix, &format!("sop|{salt}")));
    let study_uid = meta
        .study_instance_uid
        .clone()
        .unwrap_or_else(|| derived_uid(&pix, &format!("study|{salt}")));
    let series_uid = meta
        .series_instance_uid
        .clone()
        .unwrap_or_else(|| derived_uid(&pix, &format!("series|{salt}")));

    let mut obj = InMemDicomObject::new_empty();
    let mut put_str = |tag: Tag, vr: VR, v: &str| {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    put_str(tags::SOP_CLASS_UID, VR::UI, SECONDARY_CAPTURE_SOP_CLASS);
    put_str(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
    put_str(tags::STUDY_DATE, VR::DA, "");
    put_str(tags::STUDY_TIME, VR::TM, "");
    put_str(tags::ACCESSION_NUMBER, VR::SH, "");
    put_str(
        tags::MODALITY,
        VR::CS,
        meta.modality.as_deref().unwrap_or("OT"),
    );
    put_str(tags::CONVERSION_TYPE, VR::CS, "WSD");
    put_str(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
    if let Some(d) = &meta.study_description {
        put_str(tags::STUDY_DESCRIPTION, VR::LO, d);
    }
    if let Some(d) = &meta.series_description {
        put_str(tags::SERIES_DESCRIPTION, VR::LO, d);
    }
    put_str(
        tags::PATIENT_NAME,
        VR::PN,
        meta.patient_name.as_deref().unwrap_or(""),
    );
    put_str(
        tags::PATIENT_ID,
        VR::LO,
        meta.patient_id.as_deref().unwrap_or(""),
    );
    put_str(tags::PATIENT_BIRTH_DATE, VR::DA, "");
    put_str(tags::PATIENT_SEX, VR::CS, "");
    if let Some(b) = &meta.body_part {
        put_str(tags::BODY_PART_EXAMINED, VR::CS, b);
    }
    put_str(tags::STUDY_INSTANCE_UID, VR::UI, &study_uid);
    put_str(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    put_str(tags::STUDY_ID, VR::SH, "");
    put_str(tags::SERIES_NUMBER, VR::IS, "1");
    put_str(tags::INSTANCE_NUMBER, VR::IS, "1");
    put_str(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    if let Some((r, c)) = meta.pixel_spacing {
        put_str(
            tags::PIXEL_SPACING,
            VR::DS,
            &format!("{}\\{}", fmt_ds(r), fmt_ds(c)),
        );
    }
    if let Some((c, w)) = meta.window {
        put_str(tags::WINDOW_CENTER, VR::DS, &fmt_ds(c));
        put_str(tags::WINDOW_WIDTH, VR::DS, &fmt_ds(w));
    }
    if let Some((slope, intercept)) = meta.rescale {
        put_str(tags::RESCALE_INTERCEPT, VR::DS, &fmt_ds(intercept));
        put_str(tags::RESCALE_SLOPE, VR::DS, &fmt_ds(slope));
        put_str(tags::RESCALE_TYPE, VR::LO, "US");
    }
    let us = |tag: Tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    obj.put(us(tags::SAMPLES_PER_PIXEL, 1));
    obj.put(us(tags::ROWS, rows as u16));
    obj.put(us(tags::COLUMNS, cols as u16));
    obj.put(us(tags::BITS_ALLOCATED, P::BITS));
    obj.put(us(tags::BITS_STORED, P::BITS));
    obj.put(us(tags::HIGH_BIT, P::BITS - 1));
    obj.put(us(tags::PIXEL_REPRESENTATION, P::SIGNED as u16));
    let pixel_vr = if P::BITS == 8 { VR::OB } else { VR::OW };
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        pixel_vr,
        PrimitiveValue::from(pix),
    ));

    let file_obj = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .media_storage_sop_class_uid(SECONDARY_CAPTURE_SOP_CLASS)
                .media_storage_sop_instance_uid(sop_uid.as_str())
                .implementation_class_uid("2.25.301662245463312097372906766437353096021")
                .implementation_version_name("MEDVLM_0_1"),
        )
        .map_err(|e| IoError::InvalidArgument(format!("{}: {e}", path.display())))?;
    write_file_object(path, &file_obj)
}

/// Write a DICOM file object atomically (temp file + rename).
pub fn write_file_object(path: &Path, obj: &DefaultDicomObject) -> Result<()> {
    let mut bytes = Vec::new();
    obj.write_all(&mut bytes).map_err(|e| IoError::Dicom {
        path: path.to_path_buf(),
        transfer_syntax: transfer_syntax_label(obj.meta().transfer_syntax()),
        reason: format!("cannot encode: {}", crate::guard::error_chain(&e)),
    })?;
    crate::atomic::write_atomic(path, &bytes)
}

/// Decimal string for a DS value (max 16 characters, PS3.5 6.2).
fn fmt_ds(v: f64) -> String {
    let s = format!("{v}");
    if s.len() <= 16 {
        s
    } else {
        let mut p = 10usize;
        loop {
            let s = format!("{v:.*e}", p);
            if s.len() <= 16 || p == 0 {
                return s;
            }
            p -= 1;
        }
    }
}

/// Patient-identifying attributes medvlm never prints and `data check` warns about
/// (a subset of PS3.15 Annex E table E.1-1 that carries direct identifiers).
pub const IDENTIFYING_TAGS: &[(Tag, &str)] = &[
    (tags::PATIENT_NAME, "PatientName"),
    (tags::PATIENT_ID, "PatientID"),
    (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
    (tags::PATIENT_ADDRESS, "PatientAddress"),
    (Tag(0x0010, 0x1000), "OtherPatientIDs"),
    (tags::OTHER_PATIENT_NAMES, "OtherPatientNames"),
    (tags::PATIENT_TELEPHONE_NUMBERS, "PatientTelephoneNumbers"),
    (tags::PATIENT_MOTHER_BIRTH_NAME, "PatientMotherBirthName"),
    (Tag(0x0010, 0x1090), "MedicalRecordLocator"),
    (tags::REFERRING_PHYSICIAN_NAME, "ReferringPhysicianName"),
    (tags::INSTITUTION_NAME, "InstitutionName"),
    (tags::INSTITUTION_ADDRESS, "InstitutionAddress"),
    (tags::ACCESSION_NUMBER, "AccessionNumber"),
];

/// Names of the identifying attributes that are present with a non-empty value
/// (the values themselves are never returned, so they cannot leak into logs).
pub fn identifying_attributes_present(obj: &InMemDicomObject) -> Vec<&'static str> {
    IDENTIFYING_TAGS
        .iter()
        .filter(|(tag, _)| {
            obj.element_opt(*tag)
                .ok()
                .flatten()
                .map(|e| {
                    e.to_bytes()
                        .map(|b| b.iter().any(|&c| c != 0 && c != b' ' && c != b'^'))
                        .unwrap_or(false)
                })
                .unwrap_or(false)
        })
        .map(|(_, name)| *name)
        .collect()
}

/// Basic header facts of a DICOM object for `data check` (no identifying values).
pub fn rows_cols_bits(obj: &InMemDicomObject) -> (Option<u16>, Option<u16>, Option<u16>) {
    (
        elem_u16(obj, tags::ROWS),
        elem_u16(obj, tags::COLUMNS),
        elem_u16(obj, tags::BITS_STORED),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn fragments_are_grouped_into_frames() {
        let f = |b: &[u8]| b.to_vec();
        // two frames in five fragments, no offset table: split at EOI
        let frags = vec![
            f(&[0xFF, 0xD8, 1]),
            f(&[2, 0xFF, 0xD9, 0]),
            f(&[0xFF, 0xD8, 3, 0]),
            f(&[4]),
            f(&[5, 0xFF, 0xD9]),
        ];
        let got = super::frames_of_fragments(&frags, None, 2).unwrap();
        assert_eq!(got[0].as_ref(), &[0xFF, 0xD8, 1, 2, 0xFF, 0xD9, 0]);
        assert_eq!(got[1].as_ref(), &[0xFF, 0xD8, 3, 0, 4, 5, 0xFF, 0xD9]);
        // the same with a Basic Offset Table (item headers are 8 bytes)
        let got = super::frames_of_fragments(&frags, Some(&[0, 3 + 8 + 4 + 8]), 2).unwrap();
        assert_eq!(got[1].as_ref(), &[0xFF, 0xD8, 3, 0, 4, 5, 0xFF, 0xD9]);
        // three frames claimed: an error naming the counts
        let e = super::frames_of_fragments(&frags, None, 3).unwrap_err();
        assert!(e.contains("5 pixel data fragments for 3 frames"), "{e}");
        let e = super::frames_of_fragments(&frags, Some(&[0, 5]), 2).unwrap_err();
        assert!(e.contains("entry 1 (5) is invalid"), "{e}");
    }

    #[test]
    fn a_decoder_panic_becomes_the_error_message() {
        let r: std::result::Result<(), String> = crate::guard::quiet_catch(|| {
            panic!("index out of bounds: the len is 3 but the index is 9")
        });
        let e = r.unwrap_err();
        assert!(e.contains("internal panic: index out of bounds"), "{e}");
        assert_eq!(crate::guard::quiet_catch(|| 5).unwrap(), 5);
    }
}
