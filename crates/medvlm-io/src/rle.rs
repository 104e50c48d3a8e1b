//! DICOM RLE Lossless decoding (PS3.5 Annex G), written for medvlm so that every
//! header field is validated before use and any Bits Allocated (8, 16, 32) works.
//!
//! A frame is one fragment: a 64-byte header (number of segments, then 15
//! little-endian `u32` segment offsets from the start of the fragment) followed by
//! the segments. Each segment holds one byte of one sample for every pixel (most
//! significant byte first, PS3.5 G.2), PackBits-compressed (G.3.1).

/// Size of the RLE header that starts every frame's fragment.
const HEADER_LEN: usize = 64;

/// Check a fragment's RLE header against the image it should hold and return the
/// byte range of each segment. Errors name what is wrong.
pub(crate) fn segment_ranges(
    frag: &[u8],
    expected_segments: usize,
) -> Result<Vec<std::ops::Range<usize>>, String> {
    if frag.len() < HEADER_LEN {
        return Err(format!(
            "RLE header truncated: the fragment has {} bytes, the header alone needs {HEADER_LEN}",
            frag.len()
        ));
    }
    let word = |i: usize| {
        u32::from_le_bytes([
            frag[4 * i],
            frag[4 * i + 1],
            frag[4 * i + 2],
            frag[4 * i + 3],
        ])
    };
    let n = word(0) as usize;
    if n != expected_segments {
        return Err(format!(
            "RLE header declares {n} segment(s), {expected_segments} expected \
             (samples per pixel x bytes per sample)"
        ));
    }
    if n == 0 || n > 15 {
        return Err(format!(
            "RLE header declares {n} segments (1 to 15 allowed)"
        ));
    }
    let offsets: Vec<usize> = (1..=n).map(|i| word(i) as usize).collect();
    if offsets[0] != HEADER_LEN {
        return Err(format!(
            "RLE segment 1 starts at offset {}, not right after the 64-byte header",
            offsets[0]
        ));
    }
    for (i, &start) in offsets.iter().enumerate() {
        if start >= frag.len() {
            return Err(format!(
                "RLE segment {} starts at offset {start}, past the end of the {}-byte fragment \
                 (truncated or corrupt)",
                i + 1,
                frag.len()
            ));
        }
    }
    let mut ranges = Vec::with_capacity(n);
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(frag.len());
        if end <= start {
            return Err(format!(
                "RLE segment offsets are not increasing: segment {} at {start}, segment {} at {end}",
                i + 1,
                i + 2
            ));
        }
        ranges.push(start..end);
    }
    Ok(ranges)
}

/// PackBits-decode `seg` into `out`, which must be filled exactly. Bytes a segment
/// decodes to beyond `out.len()` (encoders pad segments to even length) are ignored.
fn unpack_bits(seg: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut i = 0usize;
    let mut o = 0usize;
    while o < out.len() && i < seg.len() {
        let h = seg[i] as i8;
        i += 1;
        if h >= 0 {
            let n = h as usize + 1;
            let Some(src) = seg.get(i..i + n) else {
                return Err(format!(
                    "literal run of {n} bytes at segment byte {} runs past the end of the \
                     {}-byte segment",
                    i - 1,
                    seg.len()
                ));
            };
            let take = n.min(out.len() - o);
            out[o..o + take].copy_from_slice(&src[..take]);
            o += take;
            i += n;
        } else if h != -128 {
            let n = (1 - h as isize) as usize;
            let Some(&v) = seg.get(i) else {
                return Err("replicate run without its byte at the end of the segment".into());
            };
            let take = n.min(out.len() - o);
            out[o..o + take].fill(v);
            o += take;
            i += 1;
        }
    }
    if o < out.len() {
        return Err(format!(
            "segment decodes to {o} bytes, {} expected (truncated or corrupt)",
            out.len()
        ));
    }
    Ok(())
}

/// Decode one RLE frame into `out`: `pixels * spp * bytes` bytes, samples interleaved
/// (planar configuration 0), each sample in native byte order.
pub(crate) fn decode_frame(
    frag: &[u8],
    pixels: usize,
    spp: usize,
    bytes: usize,
    out: &mut [u8],
) -> Result<(), String> {
    debug_assert_eq!(out.len(), pixels * spp * bytes);
    let ranges = segment_ranges(frag, spp * bytes)?;
    let mut plane = vec![0u8; pixels];
    for (k, r) in ranges.into_iter().enumerate() {
        unpack_bits(&frag[r], &mut plane).map_err(|e| format!("RLE segment {}: {e}", k + 1))?;
        let sample = k / bytes;
        let significance = bytes - 1 - k % bytes; // 0 = least significant byte
        let pos = if cfg!(target_endian = "little") {
            significance
        } else {
            bytes - 1 - significance
        };
        let stride = spp * bytes;
        for (p, &v) in plane.iter().enumerate() {
            out[p * stride + sample * bytes + pos] = v;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offsets: &[u32]) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&(offsets.len() as u32).to_le_bytes());
        for (i, o) in offsets.iter().enumerate() {
            h[4 + 4 * i..8 + 4 * i].copy_from_slice(&o.to_le_bytes());
        }
        h
    }

    #[test]
    fn packbits_runs_and_literals() {
        // literal 3 bytes, replicate 0x07 four times, no-op, literal 1
        let seg = [2u8, 1, 2, 3, (-3i8) as u8, 7, 0x80, 0, 9];
        let mut out = [0u8; 8];
        unpack_bits(&seg, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 7, 7, 7, 7, 9]);
        let mut short = [0u8; 9];
        assert!(unpack_bits(&seg, &mut short)
            .unwrap_err()
            .contains("8 bytes, 9 expected"));
    }

    #[test]
    fn sixteen_bit_two_pixels() {
        // samples 0x0102, 0x0304: MSB segment [1, 3], LSB segment [2, 4]
        let mut f = header(&[64, 67]);
        f.extend_from_slice(&[1, 1, 3]);
        f.extend_from_slice(&[1, 2, 4]);
        let mut out = [0u8; 4];
        decode_frame(&f, 2, 1, 2, &mut out).unwrap();
        assert_eq!(
            [
                u16::from_ne_bytes([out[0], out[1]]),
                u16::from_ne_bytes([out[2], out[3]])
            ],
            [0x0102, 0x0304]
        );
    }

    #[test]
    fn bad_headers_are_errors() {
        let mut out = [0u8; 4];
        assert!(decode_frame(&[0u8; 10], 2, 1, 2, &mut out)
            .unwrap_err()
            .contains("header truncated"));
        let f = header(&[64]);
        assert!(decode_frame(&f, 2, 1, 2, &mut out)
            .unwrap_err()
            .contains("declares 1 segment(s), 2 expected"));
        let mut f = header(&[64, 1000]);
        f.extend_from_slice(&[1, 1, 3]);
        assert!(decode_frame(&f, 2, 1, 2, &mut out)
            .unwrap_err()
            .contains("past the end"));
        let mut f = header(&[66, 64]);
        f.extend_from_slice(&[1, 1, 3, 0]);
        assert!(decode_frame(&f, 2, 1, 2, &mut out).is_err());
    }
}
