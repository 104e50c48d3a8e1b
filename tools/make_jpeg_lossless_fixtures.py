#!/usr/bin/env python3
"""JPEG Lossless (ITU-T T.81 Process 14) test files of 12- and 16-bit grey images, which the
pydicom wheel does not ship, made from its uncompressed MR_small.dcm / CT_small.dcm.

The frames are written by the small lossless-JPEG encoder below (T.81 Annex H: one component,
predictor 1..7, sample precision 12 or 16, one DC Huffman table), because GDCM's encoder always
writes a 16-bit precision with predictor 1. Each file is then decoded by GDCM through pydicom
(an implementation independent of this encoder and of medvlm) and must equal its source
pixels; the Rust tests compare medvlm's decoding with the uncompressed source.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install python-gdcm pydicom numpy
    /tmp/pyref/bin/python tools/make_jpeg_lossless_fixtures.py crates/medvlm-io/tests/data
"""
import copy
import os
import sys

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian


class BitWriter:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value, bits):
        for i in range(bits - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0x00)  # byte stuffing
                self.acc, self.n = 0, 0

    def flush(self):
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with ones
        return bytes(self.out)


def segment(marker, payload):
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def encode_lossless(img, precision, predictor):
    h, w = img.shape
    x = img.astype(np.int64)
    # 17 categories, every code 5 bits long (canonical codes 0..16; no all-ones code).
    counts = [0] * 16
    counts[4] = 17
    code_of = {s: s for s in range(17)}
    bw = BitWriter()
    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                pred = 1 << (precision - 1)
            elif r == 0:
                pred = x[r, c - 1]
            elif c == 0:
                pred = x[r - 1, c]
            else:
                ra, rb, rc = x[r, c - 1], x[r - 1, c], x[r - 1, c - 1]
                pred = {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1),
                        6: rb + ((ra - rc) >> 1), 7: (ra + rb) >> 1}[predictor]
            diff = (int(x[r, c]) - int(pred)) % 65536
            if diff >= 32768:
                diff -= 65536
            if diff == -32768:
                diff = 32768
            ssss = 0 if diff == 0 else int(abs(diff)).bit_length()
            bw.put(code_of[ssss], 5)
            if 0 < ssss < 16:
                bw.put(diff if diff > 0 else diff - 1 + (1 << ssss), ssss)
    data = bw.flush()
    sof = bytes([precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, predictor, 0, 0])
    return (b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos)
            + data + b"\xff\xd9")


def write(src_ds, stored, out, name, precision, predictor, uid):
    ds = copy.deepcopy(src_ds)
    frame = encode_lossless(stored, precision, predictor)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid
    path = os.path.join(out, name)
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    got = back.pixel_array
    want = src_ds.pixel_array
    assert got.shape == want.shape and np.array_equal(got, want), name
    print(f"{name}: {uid}, precision {precision}, predictor {predictor}, {got.shape}, "
          f"range {got.min()}..{got.max()}, {os.path.getsize(path)} bytes; decoded by "
          f"pydicom/GDCM equal to the source")


def main():
    out = sys.argv[1]
    wheel = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    mr = pydicom.dcmread(os.path.join(wheel, "MR_small.dcm"))
    ct = pydicom.dcmread(os.path.join(wheel, "CT_small.dcm"))

    # A 12-bit MR: the same image with Bits Stored 12 (its values, 127..2145, fit).
    mr12 = copy.deepcopy(mr)
    arr12 = np.clip(mr.pixel_array.astype(np.int32), 0, 4095).astype(np.uint16)
    mr12.BitsStored, mr12.HighBit, mr12.PixelRepresentation = 12, 11, 0
    mr12.PixelData = arr12.tobytes()
    mr12.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    mr12.save_as(os.path.join(out, "MR_small_12bit.dcm"), enforce_file_format=True)
    mr12 = pydicom.dcmread(os.path.join(out, "MR_small_12bit.dcm"))

    def stored(ds):
        # The stored bit patterns (signed data as its two's-complement bits).
        return np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)

    write(mr12, stored(mr12), out, "MR_small_12bit_jpeg_lossless_sv1.dcm", 12, 1,
          "1.2.840.10008.1.2.4.70")
    write(mr12, stored(mr12), out, "MR_small_12bit_jpeg_lossless_p14_pred4.dcm", 12, 4,
          "1.2.840.10008.1.2.4.57")
    write(ct, stored(ct), out, "CT_small_jpeg_lossless_p14_pred6.dcm", 16, 6,
          "1.2.840.10008.1.2.4.57")
    write(mr, stored(mr), out, "MR_small_jpeg_lossless_p14_pred7.dcm", 16, 7,
          "1.2.840.10008.1.2.4.57")


if __name__ == "__main__":
    main()
