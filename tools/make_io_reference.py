#!/usr/bin/env python3
"""Reference values for medvlm-io's DICOM and NIfTI readers.

Computes, for every file in crates/medvlm-io/tests/data, what pydicom / nibabel
decode: shape, min, max, mean, sum, values at fixed sampled positions, per-slab
sums along the first axis, and (NIfTI) the affine, orientation codes, a middle
slice and a maximum-intensity projection summary. DICOM values are taken after
the Modality LUT (pydicom.pixels.apply_modality_lut) and before any VOI LUT;
colour images are RGB as pydicom returns them (YBR converted). The output is
crates/medvlm-io/tests/fixtures/io_reference.json, which the Rust tests compare
against; the tests never run Python.

Needs: pip install pydicom==3.0.2 nibabel==5.4.2 numpy pylibjpeg pylibjpeg-libjpeg \
       pylibjpeg-openjpeg pylibjpeg-rle
(the pylibjpeg plugins decode JPEG 12-bit, JPEG-LS, JPEG 2000 and RLE).

Usage: python tools/make_io_reference.py [DATA_DIR] [OUT_JSON]
"""
import json
import os
import sys

import numpy as np
import nibabel as nib
import pydicom
from pydicom.pixels import apply_modality_lut

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "crates/medvlm-io/tests/data")
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "crates/medvlm-io/tests/fixtures/io_reference.json")

N_SAMPLES = 48


def summary(arr):
    arr = np.asarray(arr, dtype=np.float64)
    flat = arr.reshape(-1)
    rng = np.random.RandomState(0)
    idx = sorted(set(int(i) for i in rng.randint(0, flat.size, size=N_SAMPLES)))
    idx = sorted(set(idx + [0, flat.size - 1]))
    return {
        "shape": list(arr.shape),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "mean": float(flat.mean()),
        "sum": float(flat.sum()),
        "samples": [[i, float(flat[i])] for i in idx],
        # sums over everything but the first axis: catches row/frame/axis order mistakes
        "axis0_sums": [float(s) for s in arr.reshape(arr.shape[0], -1).sum(axis=1)],
    }


def dicom_entry(path):
    ds = pydicom.dcmread(path)
    entry = {
        "kind": "dicom",
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "photometric_in_file": str(ds.get("PhotometricInterpretation", "")),
        "modality": str(ds.get("Modality", "")),
        "bits_stored": int(ds.BitsStored),
    }
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - recorded as the expected outcome
        entry["pydicom_error"] = f"{type(exc).__name__}: {exc}"[:300]
        nof = ds.get("NumberOfFrames")
        if nof is None or str(nof).strip().isdigit():
            return entry
        # badVR.dcm: NumberOfFrames is not an integer. medvlm infers the frame count
        # from the pixel data length; do the same repair here for the reference.
        frame_bytes = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated // 8
        ds.NumberOfFrames = len(ds.PixelData) // frame_bytes
        entry["repaired"] = "NumberOfFrames"
        arr = ds.pixel_array
    if ds.get("SamplesPerPixel", 1) == 1:
        arr = apply_modality_lut(arr, ds)
    entry["lossy"] = ds.file_meta.TransferSyntaxUID in (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
    )
    wc = ds.get("WindowCenter")
    ww = ds.get("WindowWidth")
    if wc is not None and ww is not None:
        wc = list(wc) if isinstance(wc, pydicom.multival.MultiValue) else [wc]
        ww = list(ww) if isinstance(ww, pydicom.multival.MultiValue) else [ww]
        entry["windows"] = [[float(c), float(w)] for c, w in zip(wc, ww)]
    entry.update(summary(arr))
    return entry


def nifti_entry(path):
    img = nib.load(path)
    data = img.get_fdata()
    entry = {
        "kind": "nifti",
        "version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "affine": [[float(v) for v in row] for row in img.affine],
        "axcodes": "".join(nib.aff2axcodes(img.affine)),
        "zooms": [float(z) for z in img.header.get_zooms()],
    }
    entry.update(summary(data))
    if data.ndim not in (3, 4) or data.shape[1] <= 3:
        return entry  # the unit-dimension files: shape and values only
    vol0 = data if data.ndim == 3 else data[..., 0]
    mid = vol0.shape[2] // 2
    entry["z_slice"] = {"index": mid, **summary(vol0[:, :, mid])}
    entry["y_slice"] = {"index": 3, **summary(vol0[:, 3, :])}
    entry["z_mip"] = summary(vol0.max(axis=2))
    return entry


def voi_entry(path, center, width):
    """pydicom's linear VOI LUT (PS3.3 C.11.2.1.2.1) on the modality values,
    rescaled from pydicom's output range [y_min, y_max] to [0, 1]."""
    from pydicom.pixels import apply_windowing
    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.VOILUTFunction = "LINEAR"
    out = apply_windowing(arr, ds)
    bits = ds.BitsStored
    if ds.PixelRepresentation == 0:
        y_min, y_max = 0, 2**bits - 1
    else:
        y_min, y_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    norm = (out - y_min) / (y_max - y_min)
    return {"center": center, "width": width, **summary(norm)}


def raster_fixtures(out_dir):
    """Small PNG/TIFF/JPEG files written with Pillow from fixed NumPy arrays; the
    reference is the array Pillow reads back (so JPEG loss is included; 4:4:4 so no chroma upsampling differences)."""
    from PIL import Image
    rng = np.random.RandomState(7)
    entries = {}
    grey8 = rng.randint(0, 256, size=(9, 13)).astype(np.uint8)
    grey16 = rng.randint(0, 65536, size=(7, 5)).astype(np.uint16)
    rgb8 = rng.randint(0, 256, size=(6, 10, 3)).astype(np.uint8)
    specs = [
        ("raster_grey8.png", Image.fromarray(grey8), {}),
        ("raster_grey16.png", Image.fromarray(grey16), {}),
        ("raster_rgb8.png", Image.fromarray(rgb8), {}),
        ("raster_grey8.tif", Image.fromarray(grey8), {}),
        ("raster_grey16.tif", Image.fromarray(grey16), {}),
        ("raster_rgb8.tif", Image.fromarray(rgb8), {}),
        ("raster_rgb8.jpg", Image.fromarray(rgb8), {"quality": 95, "subsampling": 0}),
    ]
    for name, img, kw in specs:
        path = os.path.join(out_dir, name)
        img.save(path, **kw)
        back = np.asarray(Image.open(path))
        entries[name] = {"kind": "raster", "lossy": name.endswith(".jpg"), **summary(back)}
    return entries


def medmnist_fixture(out_dir):
    """A tiny MedMNIST-layout .npz (grey 2-D, multi-class) written with NumPy."""
    rng = np.random.RandomState(11)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.randint(0, 256, size=(n, 8, 8)).astype(np.uint8)
        arrays[f"{split}_labels"] = rng.randint(0, 4, size=(n, 1)).astype(np.int64)
    path = os.path.join(out_dir, "medmnist_tiny.npz")
    np.savez_compressed(path, **arrays)
    entry = {"kind": "medmnist"}
    for split in ("train", "val", "test"):
        entry[split] = {
            "labels": arrays[f"{split}_labels"].reshape(-1).tolist(),
            **summary(arrays[f"{split}_images"]),
        }
    return entry


def synthetic_dicoms(out_dir):
    """Small DICOMs written with pydicom for pixel formats the real files lack:
    PALETTE COLOR, native YBR_FULL, planar configuration 1, signed 12-bit
    MONOCHROME1 with rescale, 8-bit multi-frame, a deflated data set, 1-bit
    multi-frame with frames starting mid-byte, and a
    transfer syntax nobody here decodes (MPEG2)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, generate_uid
    from pydicom.pixels import convert_color_space

    rng = np.random.RandomState(5)

    def base(rows, cols, spp, pmi, bits_alloc, bits_stored, signed, ts=ExplicitVRLittleEndian, frames=None):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[pmi, str(rows), str(ts)])
        meta.TransferSyntaxUID = ts
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "OT"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = spp
        ds.PhotometricInterpretation = pmi
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_alloc, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if spp == 3:
            ds.PlanarConfiguration = 0
        if frames is not None:
            ds.NumberOfFrames = frames
        return ds

    files = {}
    # PALETTE COLOR: 8-bit indices, 16-bit LUTs with 256 entries, first mapped 0
    ds = base(6, 7, 1, "PALETTE COLOR", 8, 8, False)
    idx = rng.randint(0, 256, size=(6, 7)).astype(np.uint8)
    lut = np.arange(256, dtype=np.uint16)
    for colour, table in (("Red", lut * 257), ("Green", (255 - lut) * 257), ("Blue", (lut * 7 % 256) * 257)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    ds.PixelData = idx.tobytes()
    files["syn_palette.dcm"] = ds
    # native YBR_FULL, interleaved
    ds = base(5, 4, 3, "YBR_FULL", 8, 8, False)
    ybr = rng.randint(0, 256, size=(5, 4, 3)).astype(np.uint8)
    ds.PixelData = ybr.tobytes()
    files["syn_ybr_full.dcm"] = ds
    # RGB, planar configuration 1 (RRR GGG BBB)
    ds = base(3, 5, 3, "RGB", 8, 8, False)
    ds.PlanarConfiguration = 1
    rgb = rng.randint(0, 256, size=(3, 5, 3)).astype(np.uint8)
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    files["syn_rgb_planar1.dcm"] = ds
    # MONOCHROME1, signed 12 bits stored in 16, rescale 2 / -100
    ds = base(4, 6, 1, "MONOCHROME1", 16, 12, True)
    vals = rng.randint(-2048, 2048, size=(4, 6)).astype(np.int16)
    ds.PixelData = (vals.astype(np.uint16) & 0x0FFF).astype("<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 0, 4000
    files["syn_mono1_signed12.dcm"] = ds
    # 8-bit grey, 3 frames
    ds = base(4, 5, 1, "MONOCHROME2", 8, 8, False, frames=3)
    ds.PixelData = rng.randint(0, 256, size=(3, 4, 5)).astype(np.uint8).tobytes()
    files["syn_multiframe_u8.dcm"] = ds
    # deflated explicit VR little endian
    ds = base(4, 4, 1, "MONOCHROME2", 16, 16, False, ts=DeflatedExplicitVRLittleEndian)
    ds.PixelData = rng.randint(0, 65536, size=(4, 4)).astype("<u2").tobytes()
    files["syn_deflated.dcm"] = ds

    # 1-bit, 3 frames of 5x7: 35 bits per frame, so frames start mid-byte (the
    # packed bits continue across frames, PS3.5 8.1.1)
    from pydicom.pixels import pack_bits
    ds = base(5, 7, 1, "MONOCHROME2", 1, 1, False, frames=3)
    ds.PixelData = pack_bits(rng.randint(0, 2, size=(3, 5, 7)).astype(np.uint8))
    files["syn_1bit_3frames.dcm"] = ds
    # MPEG2 Main Profile / Main Level (no decoder in medvlm or pydicom): the
    # "unsupported transfer syntax" case. The fragment is an MPEG-2 sequence header
    # start code followed by zeros, not a video.
    from pydicom.encaps import encapsulate
    ds = base(4, 4, 1, "MONOCHROME2", 8, 8, False, ts=pydicom.uid.MPEG2MPML)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(12)])
    ds["PixelData"].VR = "OB"
    files["syn_mpeg2_unsupported.dcm"] = ds

    entries = {}
    for name, ds in files.items():
        path = os.path.join(out_dir, name)
        ds.save_as(path, enforce_file_format=True)
        entry = dicom_entry(path)
        if name == "syn_ybr_full.dcm":
            # make the YBR->RGB conversion explicit (pydicom's convert_color_space)
            raw = pydicom.dcmread(path).pixel_array
            arr = raw if not np.array_equal(raw, ybr) else convert_color_space(raw, "YBR_FULL", "RGB")
            entry.update(summary(arr))
        if name == "syn_palette.dcm":
            from pydicom.pixels import apply_color_lut
            d2 = pydicom.dcmread(path)
            entry.update(summary(apply_color_lut(d2.pixel_array, d2)))
        entries[name] = entry
    return entries


def nifti_unit_dims(out_dir):
    """Small NIfTI-1 files written by nibabel with leading, inner and trailing unit
    dimensions (and a 2-D one): nibabel's shape is dim[1..dim[0]], never squeezed."""
    rng = np.random.RandomState(13)
    specs = [
        ("nib_leading_unit.nii", (1, 6, 5), np.int16),
        ("nib_trailing_units.nii", (6, 5, 1, 1), np.float32),
        ("nib_2d.nii", (6, 5), np.uint8),
        ("nib_5d_inner_unit.nii.gz", (4, 3, 2, 1, 2), np.int16),
    ]
    entries = {}
    for name, shape, dtype in specs:
        arr = rng.randint(0, 200, size=shape).astype(dtype)
        aff = np.diag([2.0, 1.5, 3.0, 1.0])
        aff[:3, 3] = [-5.0, 7.0, 1.0]
        img = nib.Nifti1Image(arr, aff)
        img.header.set_data_shape(shape)
        path = os.path.join(out_dir, name)
        img.to_filename(path)
        entry = nifti_entry(path)
        assert tuple(entry["shape"]) == shape, (name, entry["shape"])
        entries[name] = entry
    return entries


def main():
    out = {"generator": "tools/make_io_reference.py", "pydicom": pydicom.__version__,
           "nibabel": nib.__version__, "numpy": np.__version__, "files": {}}
    for name in sorted(os.listdir(DATA)):
        path = os.path.join(DATA, name)
        if name.endswith(".dcm"):
            try:
                out["files"][name] = dicom_entry(path)
            except Exception as exc:  # noqa: BLE001
                out["files"][name] = {"kind": "dicom", "pydicom_error": f"{type(exc).__name__}: {exc}"[:300]}
        elif name.endswith(".nii") or name.endswith(".nii.gz"):
            out["files"][name] = nifti_entry(path)
    out["voi"] = {
        "CT_small.dcm lung": voi_entry(os.path.join(DATA, "CT_small.dcm"), -600.0, 1500.0),
        "MR_small.dcm file": voi_entry(os.path.join(DATA, "MR_small.dcm"), 600.0, 1600.0),
    }
    out["files"].update(raster_fixtures(DATA))
    out["files"].update(synthetic_dicoms(DATA))
    out["files"].update(nifti_unit_dims(DATA))
    out["files"]["medmnist_tiny.npz"] = medmnist_fixture(DATA)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(out['files'])} files")


if __name__ == "__main__":
    main()
