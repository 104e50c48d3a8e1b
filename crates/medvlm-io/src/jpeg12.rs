//! 12-bit sequential DCT JPEG (ITU-T T.81 process 4, "JPEG Extended", DICOM
//! 1.2.840.10008.1.2.4.51) for one grey component, which `jpeg-decoder` does not
//! support. Written for medvlm from T.81: Huffman entropy decoding (F.2.2), 8- or
//! 16-bit quantisation tables, restart intervals, a separable floating-point
//! inverse DCT (A.3.3), level shift by 2048 and clamping to 0..4095.
//! Progressive and arithmetic-coded JPEG and colour 12-bit JPEG are refused with a
//! clear error.

/// Zig-zag order: `ZIGZAG[k]` is the natural (row-major) index of the k-th coefficient.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// A Huffman table in the form of T.81 F.2.2.3 (MAXCODE / VALPTR / MINCODE).
#[derive(Clone, Default)]
struct Huffman {
    maxcode: [i32; 17],
    valptr: [i32; 17],
    mincode: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self, String> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total != values.len() || total > 256 {
            return Err("invalid Huffman table".into());
        }
        let mut h = Huffman {
            maxcode: [-1; 17],
            values,
            ..Default::default()
        };
        let mut code = 0i32;
        let mut k = 0i32;
        for l in 1..=16 {
            let n = counts[l - 1] as i32;
            if n > 0 {
                h.valptr[l] = k;
                h.mincode[l] = code;
                code += n;
                k += n;
                h.maxcode[l] = code - 1;
            }
            if code > (1 << l) {
                return Err("invalid Huffman table (over-subscribed)".into());
            }
            code <<= 1;
        }
        Ok(h)
    }
}

/// Entropy-coded bits: 0xFF 0x00 is a data 0xFF; another marker ends the data.
struct Bits<'a> {
    d: &'a [u8],
    pos: usize,
    acc: u32,
    n: u32,
    /// a marker (or the end) was reached; zeros are supplied from here on
    hit_marker: bool,
    padding: u32,
}

impl<'a> Bits<'a> {
    fn byte(&mut self) -> u32 {
        if self.hit_marker || self.pos >= self.d.len() {
            self.hit_marker = true;
            self.padding += 8;
            return 0;
        }
        let b = self.d[self.pos];
        if b == 0xFF {
            match self.d.get(self.pos + 1) {
                Some(0x00) => {
                    self.pos += 2;
                    return 0xFF;
                }
                _ => {
                    self.hit_marker = true;
                    self.padding += 8;
                    return 0;
                }
            }
        }
        self.pos += 1;
        b as u32
    }
    fn bit(&mut self) -> i32 {
        if self.n == 0 {
            self.acc = self.byte();
            self.n = 8;
        }
        self.n -= 1;
        ((self.acc >> self.n) & 1) as i32
    }
    fn bits(&mut self, s: u32) -> i32 {
        let mut v = 0;
        for _ in 0..s {
            v = (v << 1) | self.bit();
        }
        v
    }
    /// Expect an RSTn marker at the current (byte-aligned) position.
    fn restart(&mut self) -> Result<(), String> {
        self.n = 0;
        let at = self.pos;
        if self.d.get(at) == Some(&0xFF) && matches!(self.d.get(at + 1), Some(0xD0..=0xD7)) {
            self.pos += 2;
            self.hit_marker = false;
            self.padding = 0;
            Ok(())
        } else {
            Err(format!(
                "missing restart marker at byte {at} of the JPEG data"
            ))
        }
    }
    fn decode(&mut self, h: &Huffman) -> Result<u8, String> {
        let mut code = self.bit();
        for l in 1..=16 {
            if code <= h.maxcode[l] {
                let j = h.valptr[l] + code - h.mincode[l];
                return h
                    .values
                    .get(j as usize)
                    .copied()
                    .ok_or_else(|| "corrupt JPEG data (Huffman code)".to_string());
            }
            code = (code << 1) | self.bit();
        }
        Err("corrupt JPEG data (no Huffman code matches)".into())
    }
}

fn extend(v: i32, s: u32) -> i32 {
    if s == 0 {
        0
    } else if v < 1 << (s - 1) {
        v - (1 << s) + 1
    } else {
        v
    }
}

/// Separable 8x8 inverse DCT (T.81 A.3.3), in place, on dequantised coefficients.
fn idct(block: &mut [f64; 64], cos: &[[f64; 8]; 8]) {
    let mut tmp = [0f64; 64];
    for y in 0..8 {
        for x in 0..8 {
            let mut s = 0.0;
            for u in 0..8 {
                s += cos[x][u] * block[y * 8 + u];
            }
            tmp[y * 8 + x] = s;
        }
    }
    for x in 0..8 {
        for y in 0..8 {
            let mut s = 0.0;
            for v in 0..8 {
                s += cos[y][v] * tmp[v * 8 + x];
            }
            block[y * 8 + x] = s;
        }
    }
}

/// A decoded grey image: `width * height` samples, 0..4095.
pub(crate) struct Gray12 {
    pub width: usize,
    pub height: usize,
    pub samples: Vec<u16>,
}

/// Whether a JPEG stream's frame header is a 12-bit sequential DCT one (SOF0/SOF1
/// with precision 12): the case [`decode`] is for.
pub(crate) fn is_12_bit_sequential(data: &[u8]) -> bool {
    let mut pos = 2;
    while pos + 4 <= data.len() && data[pos] == 0xFF {
        let m = data[pos + 1];
        let len = u16::from_be_bytes([data[pos + 2], data[pos + 3]]) as usize;
        if (0xC0..=0xCF).contains(&m) && m != 0xC4 && m != 0xC8 && m != 0xCC {
            return (m == 0xC0 || m == 0xC1) && data.get(pos + 4) == Some(&12);
        }
        pos += 2 + len;
    }
    false
}

/// Decode a 12-bit sequential Huffman JPEG with one component, expected to be
/// `rows x cols` (checked before any allocation).
pub(crate) fn decode(data: &[u8], rows: usize, cols: usize) -> Result<Gray12, String> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err("JPEG stream does not start with an SOI marker".into());
    }
    let seg = |pos: usize| -> Result<&[u8], String> {
        let len = data
            .get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or("JPEG stream truncated in a marker segment")?;
        data.get(pos + 2..pos + len)
            .filter(|_| len >= 2)
            .ok_or_else(|| "JPEG stream truncated in a marker segment".to_string())
    };
    let mut qt = [[0u16; 64]; 4];
    let mut dc: [Option<Huffman>; 4] = Default::default();
    let mut ac: [Option<Huffman>; 4] = Default::default();
    let mut frame: Option<(usize, usize, u8, usize)> = None; // height, width, comp id, qt
    let mut restart = 0usize;
    let mut pos = 2;
    loop {
        if pos + 2 > data.len() || data[pos] != 0xFF {
            return Err(format!("JPEG stream: expected a marker at byte {pos}"));
        }
        let m = data[pos + 1];
        pos += 2;
        match m {
            0xFF => pos -= 1,
            0xD8 | 0xD9 => return Err("JPEG stream ends before its scan".into()),
            0xDB => {
                let s = seg(pos)?;
                let mut i = 0;
                while i < s.len() {
                    let (pq, tq) = (s[i] >> 4, (s[i] & 3) as usize);
                    let n = if pq == 0 { 64 } else { 128 };
                    let t = s
                        .get(i + 1..i + 1 + n)
                        .ok_or("truncated quantisation table")?;
                    for k in 0..64 {
                        qt[tq][ZIGZAG[k]] = if pq == 0 {
                            t[k] as u16
                        } else {
                            u16::from_be_bytes([t[2 * k], t[2 * k + 1]])
                        };
                    }
                    i += 1 + n;
                }
                pos += s.len() + 2;
            }
            0xC4 => {
                let s = seg(pos)?;
                let mut i = 0;
                while i < s.len() {
                    let (tc, th) = (s[i] >> 4, (s[i] & 3) as usize);
                    let counts: [u8; 16] = s
                        .get(i + 1..i + 17)
                        .ok_or("truncated Huffman table")?
                        .try_into()
                        .unwrap();
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    let vals = s.get(i + 17..i + 17 + n).ok_or("truncated Huffman table")?;
                    let h = Huffman::new(&counts, vals.to_vec())?;
                    if tc == 0 {
                        dc[th] = Some(h);
                    } else {
                        ac[th] = Some(h);
                    }
                    i += 17 + n;
                }
                pos += s.len() + 2;
            }
            0xC0 | 0xC1 => {
                let s = seg(pos)?;
                if s.len() < 9 {
                    return Err("JPEG frame header too short".into());
                }
                let p = s[0];
                let h = u16::from_be_bytes([s[1], s[2]]) as usize;
                let w = u16::from_be_bytes([s[3], s[4]]) as usize;
                if p != 12 || s[5] != 1 {
                    return Err(format!(
                        "{p}-bit JPEG with {} components: only 12-bit grey is decoded here",
                        s[5]
                    ));
                }
                if (h, w) != (rows, cols) {
                    return Err(format!(
                        "JPEG frame is {h}x{w}, the data set says {rows}x{cols}"
                    ));
                }
                frame = Some((h, w, s[6], (s[8] & 3) as usize));
                pos += s.len() + 2;
            }
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(format!(
                    "JPEG process with SOF marker 0xFF{m:02X} (progressive, lossless, \
                     hierarchical or arithmetic) is not decoded for 12-bit data"
                ))
            }
            0xDD => {
                let s = seg(pos)?;
                restart = u16::from_be_bytes([s[0], *s.get(1).unwrap_or(&0)]) as usize;
                pos += s.len() + 2;
            }
            0xDA => {
                let s = seg(pos)?;
                let (h, w, id, tq) = frame.ok_or("JPEG scan before the frame header")?;
                if s.len() < 6 || s[0] != 1 || s[1] != id {
                    return Err("unsupported JPEG scan header".into());
                }
                let (td, ta) = ((s[2] >> 4) as usize & 3, (s[2] & 3) as usize);
                let (ss, se, a) = (s[3], s[4], s[5]);
                if ss != 0 || se != 63 || a != 0 {
                    return Err(format!(
                        "invalid scan for sequential JPEG: spectral selection {ss}..{se}, \
                         successive approximation {a:#04x} (must be 0..63 and 0)"
                    ));
                }
                let dct = dc[td]
                    .as_ref()
                    .ok_or("JPEG scan uses an undefined DC table")?;
                let act = ac[ta]
                    .as_ref()
                    .ok_or("JPEG scan uses an undefined AC table")?;
                pos += s.len() + 2;
                let mut bits = Bits {
                    d: &data[pos..],
                    pos: 0,
                    acc: 0,
                    n: 0,
                    hit_marker: false,
                    padding: 0,
                };
                return scan(&mut bits, dct, act, &qt[tq], h, w, restart);
            }
            0xE0..=0xEF | 0xFE | 0xDC | 0xDE | 0xDF => {
                let s = seg(pos)?;
                pos += s.len() + 2;
            }
            other => {
                return Err(format!(
                    "unexpected marker 0xFF{other:02X} in the JPEG stream"
                ))
            }
        }
    }
}

fn scan(
    bits: &mut Bits,
    dct: &Huffman,
    act: &Huffman,
    q: &[u16; 64],
    h: usize,
    w: usize,
    restart: usize,
) -> Result<Gray12, String> {
    let mut cos = [[0f64; 8]; 8];
    for (x, row) in cos.iter_mut().enumerate() {
        for (u, c) in row.iter_mut().enumerate() {
            let cu = if u == 0 { 1.0 / 2f64.sqrt() } else { 1.0 };
            *c = cu / 2.0 * (((2 * x + 1) * u) as f64 * std::f64::consts::PI / 16.0).cos();
        }
    }
    let (bw, bh) = (w.div_ceil(8), h.div_ceil(8));
    let mut out = vec![0u16; w * h];
    let mut pred = 0i32;
    for b in 0..bw * bh {
        if restart > 0 && b > 0 && b % restart == 0 {
            bits.restart()?;
            pred = 0;
        }
        let mut coef = [0f64; 64];
        let t = bits.decode(dct)? as u32;
        if t > 16 {
            return Err("corrupt JPEG data (DC magnitude)".into());
        }
        pred += extend(bits.bits(t), t);
        coef[0] = pred as f64 * q[0] as f64;
        let mut k = 1;
        while k < 64 {
            let rs = bits.decode(act)?;
            let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
            if s == 0 {
                if r == 15 {
                    k += 16;
                    continue;
                }
                break;
            }
            k += r;
            if k > 63 {
                return Err("corrupt JPEG data (AC run past the block)".into());
            }
            let z = ZIGZAG[k];
            coef[z] = extend(bits.bits(s), s) as f64 * q[z] as f64;
            k += 1;
        }
        if bits.padding > 0 {
            return Err("JPEG data truncated (the scan ends before the last block)".into());
        }
        idct(&mut coef, &cos);
        let (by, bx) = (b / bw, b % bw);
        for y in 0..8 {
            let yy = by * 8 + y;
            if yy >= h {
                break;
            }
            for x in 0..8 {
                let xx = bx * 8 + x;
                if xx < w {
                    out[yy * w + xx] = (coef[y * 8 + x] + 2048.0).round().clamp(0.0, 4095.0) as u16;
                }
            }
        }
    }
    Ok(Gray12 {
        width: w,
        height: h,
        samples: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huffman_codes_are_canonical() {
        // two codes of length 2 (00, 01), one of length 3 (100)
        let mut counts = [0u8; 16];
        counts[1] = 2;
        counts[2] = 1;
        let h = Huffman::new(&counts, vec![5, 6, 7]).unwrap();
        let d = [0b0110_0000u8, 0];
        let mut b = Bits {
            d: &d,
            pos: 0,
            acc: 0,
            n: 0,
            hit_marker: false,
            padding: 0,
        };
        assert_eq!(b.decode(&h).unwrap(), 6);
        assert_eq!(b.decode(&h).unwrap(), 7);
        assert_eq!(b.decode(&h).unwrap(), 5);
    }

    #[test]
    fn extend_gives_negative_values_below_half_range() {
        assert_eq!(extend(0, 1), -1);
        assert_eq!(extend(1, 1), 1);
        assert_eq!(extend(2, 3), -5);
        assert_eq!(extend(6, 3), 6);
    }

    #[test]
    fn a_dc_only_block_is_flat() {
        let cos = {
            let mut c = [[0f64; 8]; 8];
            for (x, row) in c.iter_mut().enumerate() {
                for (u, v) in row.iter_mut().enumerate() {
                    let cu = if u == 0 { 1.0 / 2f64.sqrt() } else { 1.0 };
                    *v = cu / 2.0 * (((2 * x + 1) * u) as f64 * std::f64::consts::PI / 16.0).cos();
                }
            }
            c
        };
        let mut b = [0f64; 64];
        b[0] = 80.0;
        idct(&mut b, &cos);
        assert!(b.iter().all(|v| (v - 10.0).abs() < 1e-9));
    }
}
