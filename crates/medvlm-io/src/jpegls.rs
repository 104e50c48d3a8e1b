//! JPEG-LS decoding (ITU-T T.87 | ISO/IEC 14495-1), lossless and near-lossless, for
//! the DICOM transfer syntaxes 1.2.840.10008.1.2.4.80 and .81. Written for medvlm
//! from the standard (pure Rust, no C library): one or three components, 2 to 16
//! bits, interleave modes none / line / sample, preset coding parameters (LSE id 1).
//! Not supported (clear errors): sub-sampled components, mapping tables (LSE id
//! 2/3), restart intervals, point transform.

/// A decoded frame: samples in pixel order (components interleaved).
pub(crate) struct Frame {
    pub width: usize,
    pub height: usize,
    pub components: usize,
    pub precision: u8,
    pub samples: Vec<u16>,
}

const J: [u32; 32] = [
    0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13,
    14, 15,
];

#[derive(Clone, Copy)]
struct Params {
    maxval: i32,
    t1: i32,
    t2: i32,
    t3: i32,
    reset: i32,
}

/// Default thresholds (T.87 C.2.4.1.1), with values given in an LSE segment kept.
fn default_params(maxval: i32, near: i32, given: Option<Params>) -> Params {
    let clamp = |i: i32, j: i32| if i > maxval || i < j { j } else { i };
    // BASIC_T1..3 = 3, 7, 21
    let (bt1, bt2, bt3) = (3, 7, 21);
    let (t1, t2, t3) = if maxval >= 128 {
        let f = (maxval.min(4095) + 128) / 256;
        let t1 = clamp(f * (bt1 - 2) + 2 + 3 * near, near + 1);
        let t2 = clamp(f * (bt2 - 3) + 3 + 5 * near, t1);
        let t3 = clamp(f * (bt3 - 4) + 4 + 7 * near, t2);
        (t1, t2, t3)
    } else {
        let f = 256 / (maxval + 1);
        let t1 = clamp((bt1 / f + 3 * near).max(2), near + 1);
        let t2 = clamp((bt2 / f + 5 * near).max(3), t1);
        let t3 = clamp((bt3 / f + 7 * near).max(4), t2);
        (t1, t2, t3)
    };
    let mut p = Params {
        maxval,
        t1,
        t2,
        t3,
        reset: 64,
    };
    if let Some(g) = given {
        if g.t1 != 0 {
            p.t1 = g.t1;
        }
        if g.t2 != 0 {
            p.t2 = g.t2;
        }
        if g.t3 != 0 {
            p.t3 = g.t3;
        }
        if g.reset != 0 {
            p.reset = g.reset;
        }
    }
    p
}

/// Bits of one scan's entropy-coded data (markers already cut off); after a 0xFF
/// byte the next byte carries 7 bits (T.87 A.1: bit stuffing).
struct Bits<'a> {
    d: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    prev_ff: bool,
    /// zero bits supplied past the end of the data
    padding: u64,
}

impl<'a> Bits<'a> {
    fn new(d: &'a [u8]) -> Self {
        Bits {
            d,
            pos: 0,
            acc: 0,
            n: 0,
            prev_ff: false,
            padding: 0,
        }
    }
    fn fill(&mut self) {
        while self.n <= 48 {
            if self.pos < self.d.len() {
                let b = self.d[self.pos] as u64;
                self.pos += 1;
                if self.prev_ff {
                    self.acc = (self.acc << 7) | (b & 0x7F);
                    self.n += 7;
                    self.prev_ff = false;
                } else {
                    self.acc = (self.acc << 8) | b;
                    self.n += 8;
                    self.prev_ff = b == 0xFF;
                }
            } else {
                self.acc <<= 8;
                self.n += 8;
                self.padding += 8;
            }
        }
    }
    #[inline]
    fn bit(&mut self) -> u32 {
        if self.n == 0 {
            self.fill();
        }
        self.n -= 1;
        ((self.acc >> self.n) & 1) as u32
    }
    #[inline]
    fn bits(&mut self, k: u32) -> i32 {
        if k == 0 {
            return 0;
        }
        if self.n < k {
            self.fill();
        }
        self.n -= k;
        ((self.acc >> self.n) & ((1u64 << k) - 1)) as i32
    }
    /// True when more bits were consumed than the data hold (truncated scan).
    fn overrun(&self) -> bool {
        self.padding > self.n as u64
    }
}

#[derive(Clone, Copy)]
struct Ctx {
    a: i32,
    b: i32,
    c: i32,
    n: i32,
}

#[derive(Clone, Copy)]
struct RunCtx {
    a: i32,
    n: i32,
    nn: i32,
    ri_type: i32,
}

/// Decoder state of one scan.
struct Scan<'a, 'b> {
    bits: &'b mut Bits<'a>,
    p: Params,
    near: i32,
    range: i32,
    qbpp: u32,
    limit: i32,
    ctx: Vec<Ctx>,
    run: [RunCtx; 2],
}

impl Scan<'_, '_> {
    fn quantize(&self, d: i32) -> i32 {
        let p = &self.p;
        if d <= -p.t3 {
            -4
        } else if d <= -p.t2 {
            -3
        } else if d <= -p.t1 {
            -2
        } else if d < -self.near {
            -1
        } else if d <= self.near {
            0
        } else if d < p.t1 {
            1
        } else if d < p.t2 {
            2
        } else if d < p.t3 {
            3
        } else {
            4
        }
    }

    /// Limited-length Golomb code (T.87 A.5.3).
    fn golomb(&mut self, k: u32, limit: i32) -> Result<i32, String> {
        let mut high = 0i32;
        while self.bits.bit() == 0 {
            high += 1;
            if high > limit || self.bits.overrun() {
                return Err("corrupt or truncated JPEG-LS data (Golomb code too long)".into());
            }
        }
        if high >= limit - (self.qbpp as i32 + 1) {
            return Ok(self.bits.bits(self.qbpp) + 1);
        }
        if k >= 31 {
            return Err("corrupt JPEG-LS data (Golomb parameter out of range)".into());
        }
        Ok((high << k) + self.bits.bits(k))
    }

    fn fix(&self, v: i32) -> i32 {
        let step = 2 * self.near + 1;
        let v = if v < -self.near {
            v + self.range * step
        } else if v > self.p.maxval + self.near {
            v - self.range * step
        } else {
            v
        };
        v.clamp(0, self.p.maxval)
    }

    /// Regular-mode sample (T.87 A.4 - A.6).
    fn regular(&mut self, ra: i32, rb: i32, rc: i32, rd: i32) -> Result<i32, String> {
        let q = 81 * self.quantize(rd - rb) + 9 * self.quantize(rb - rc) + self.quantize(rc - ra);
        let (sign, q) = if q < 0 {
            (-1, -q as usize)
        } else {
            (1, q as usize)
        };
        let pred = if rc >= ra.max(rb) {
            ra.min(rb)
        } else if rc <= ra.min(rb) {
            ra.max(rb)
        } else {
            ra + rb - rc
        };
        let cx = self.ctx[q];
        let px = (pred + sign * cx.c).clamp(0, self.p.maxval);
        let mut k = 0u32;
        while (cx.n << k) < cx.a {
            k += 1;
            if k > 24 {
                return Err("corrupt JPEG-LS data (context out of range)".into());
            }
        }
        let m = self.golomb(k, self.limit)?;
        let mut err = if m & 1 == 0 { m >> 1 } else { -((m + 1) >> 1) };
        if self.near == 0 && k == 0 && 2 * cx.b + cx.n - 1 < 0 {
            err = -err - 1;
        }
        // context update (A.6)
        let c = &mut self.ctx[q];
        c.a += err.abs();
        c.b += err * (2 * self.near + 1);
        if c.n == self.p.reset {
            c.a >>= 1;
            c.b >>= 1;
            c.n >>= 1;
        }
        c.n += 1;
        if c.b + c.n <= 0 {
            c.b += c.n;
            if c.b <= -c.n {
                c.b = -c.n + 1;
            }
            if c.c > -128 {
                c.c -= 1;
            }
        } else if c.b > 0 {
            c.b -= c.n;
            if c.b > 0 {
                c.b = 0;
            }
            if c.c < 127 {
                c.c += 1;
            }
        }
        Ok(self.fix(px + sign * err * (2 * self.near + 1)))
    }

    /// Length of a run of `ra` in a line with `left` samples left (T.87 A.7.1).
    fn run_length(&mut self, run_index: &mut usize, left: usize) -> Result<usize, String> {
        let mut count = 0usize;
        while self.bits.bit() == 1 {
            let step = 1usize << J[*run_index];
            let c = step.min(left - count);
            count += c;
            if c == step {
                *run_index = (*run_index + 1).min(31);
            }
            if count == left {
                return Ok(count);
            }
            if self.bits.overrun() {
                return Err("truncated JPEG-LS data (in a run)".into());
            }
        }
        count += self.bits.bits(J[*run_index]) as usize;
        if count > left {
            return Err("corrupt JPEG-LS data (run past the end of the line)".into());
        }
        Ok(count)
    }

    /// Run interruption sample error (T.87 A.7.2).
    fn ri_error(&mut self, which: usize, run_index: usize) -> Result<i32, String> {
        let rc = self.run[which];
        let temp = rc.a + (rc.n >> 1) * rc.ri_type;
        let mut k = 0u32;
        while (rc.n << k) < temp {
            k += 1;
            if k > 24 {
                return Err("corrupt JPEG-LS data (run context out of range)".into());
            }
        }
        let em = self.golomb(k, self.limit - J[run_index] as i32 - 1)?;
        let t = em + rc.ri_type;
        let map = t & 1;
        let abs = (t + map) / 2;
        let err = if ((k != 0 || 2 * rc.nn < rc.n) as i32) == map {
            -abs
        } else {
            abs
        };
        let r = &mut self.run[which];
        if err < 0 {
            r.nn += 1;
        }
        r.a += (em + 1 - r.ri_type) >> 1;
        if r.n == self.p.reset {
            r.a >>= 1;
            r.n >>= 1;
            r.nn >>= 1;
        }
        r.n += 1;
        Ok(err)
    }

    fn reconstruct(&self, px: i32, err: i32) -> i32 {
        self.fix(px + err * (2 * self.near + 1))
    }

    /// One line of one component (interleave modes 0 and 1). `prev` and `cur` have
    /// `width + 2` entries: index 0 is left of the line, `width + 1` right of it.
    fn line(&mut self, prev: &[i32], cur: &mut [i32], run_index: &mut usize) -> Result<(), String> {
        let w = cur.len() - 2;
        let mut x = 1;
        while x <= w {
            let (ra, rb, rc, rd) = (cur[x - 1], prev[x], prev[x - 1], prev[x + 1]);
            let nr = self.near;
            if (rd - rb).abs() <= nr && (rb - rc).abs() <= nr && (rc - ra).abs() <= nr {
                let n = self.run_length(run_index, w + 1 - x)?;
                cur[x..x + n].fill(ra);
                x += n;
                if x > w {
                    break;
                }
                let rb = prev[x];
                cur[x] = if (ra - rb).abs() <= nr {
                    let e = self.ri_error(1, *run_index)?;
                    self.reconstruct(ra, e)
                } else {
                    let e = self.ri_error(0, *run_index)?;
                    self.reconstruct(rb, if rb - ra < 0 { -e } else { e })
                };
                *run_index = run_index.saturating_sub(1);
                x += 1;
            } else {
                cur[x] = self.regular(ra, rb, rc, rd)?;
                x += 1;
            }
        }
        Ok(())
    }

    /// One line of `nc` interleaved components (interleave mode 2).
    fn line_sample(
        &mut self,
        prev: &[i32],
        cur: &mut [i32],
        nc: usize,
        run_index: &mut usize,
    ) -> Result<(), String> {
        let w = cur.len() / nc - 2;
        let at = |v: &[i32], x: usize, c: usize| v[x * nc + c];
        let mut x = 1;
        while x <= w {
            let nr = self.near;
            let flat = (0..nc).all(|c| {
                let (ra, rb, rc, rd) = (
                    at(cur, x - 1, c),
                    at(prev, x, c),
                    at(prev, x - 1, c),
                    at(prev, x + 1, c),
                );
                (rd - rb).abs() <= nr && (rb - rc).abs() <= nr && (rc - ra).abs() <= nr
            });
            if flat {
                let n = self.run_length(run_index, w + 1 - x)?;
                for i in x..x + n {
                    for c in 0..nc {
                        cur[i * nc + c] = cur[(x - 1) * nc + c];
                    }
                }
                x += n;
                if x > w {
                    break;
                }
                for c in 0..nc {
                    let (ra, rb) = (at(cur, x - 1, c), at(prev, x, c));
                    let e = self.ri_error(0, *run_index)?;
                    cur[x * nc + c] = self.reconstruct(rb, if rb - ra < 0 { -e } else { e });
                }
                *run_index = run_index.saturating_sub(1);
            } else {
                for c in 0..nc {
                    let (ra, rb, rc, rd) = (
                        at(cur, x - 1, c),
                        at(prev, x, c),
                        at(prev, x - 1, c),
                        at(prev, x + 1, c),
                    );
                    cur[x * nc + c] = self.regular(ra, rb, rc, rd)?;
                }
            }
            x += 1;
        }
        Ok(())
    }
}

fn ceil_log2(v: i32) -> u32 {
    let mut k = 0;
    while (1i64 << k) < v as i64 {
        k += 1;
    }
    k
}

/// Decode one JPEG-LS image (SOI .. EOI) that should be `expect` = (rows, columns,
/// components); a frame header saying otherwise is an error before any allocation.
pub(crate) fn decode(data: &[u8], expect: (usize, usize, usize)) -> Result<Frame, String> {
    let u16_at = |o: usize| -> Result<usize, String> {
        data.get(o..o + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| "JPEG-LS stream truncated in a marker segment".to_string())
    };
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err("JPEG-LS stream does not start with an SOI marker".into());
    }
    let mut pos = 2;
    let mut sof: Option<(u8, usize, usize, Vec<u8>)> = None; // precision, height, width, ids
    let mut preset: Option<Params> = None;
    let mut planes: Vec<Vec<i32>> = Vec::new(); // per component, height * width
    let mut done = vec![];
    loop {
        if pos + 2 > data.len() {
            return Err("JPEG-LS stream truncated (no EOI marker)".into());
        }
        if data[pos] != 0xFF {
            return Err(format!("JPEG-LS stream: expected a marker at byte {pos}"));
        }
        let m = data[pos + 1];
        if m == 0xFF {
            pos += 1; // fill byte
            continue;
        }
        pos += 2;
        match m {
            0xD9 => break,
            0xF7 => {
                let len = u16_at(pos)?;
                let s = data
                    .get(pos + 2..pos + len)
                    .ok_or("JPEG-LS stream truncated in the SOF55 segment")?;
                if s.len() < 6 {
                    return Err("JPEG-LS SOF55 segment too short".into());
                }
                let p = s[0];
                let h = u16::from_be_bytes([s[1], s[2]]) as usize;
                let w = u16::from_be_bytes([s[3], s[4]]) as usize;
                let nc = s[5] as usize;
                if !(2..=16).contains(&p) || h == 0 || w == 0 || nc == 0 || s.len() < 6 + 3 * nc {
                    return Err(format!(
                        "unsupported or invalid JPEG-LS frame header: {p} bits, {h}x{w}, {nc} component(s)"
                    ));
                }
                if (h, w, nc) != expect {
                    return Err(format!(
                        "JPEG-LS frame is {h}x{w} with {nc} component(s), the data set says \
                         {}x{} with {}",
                        expect.0, expect.1, expect.2
                    ));
                }
                let mut ids = Vec::with_capacity(nc);
                for c in 0..nc {
                    let hv = s[7 + 3 * c];
                    if hv != 0x11 {
                        return Err("sub-sampled JPEG-LS components are not supported".to_string());
                    }
                    ids.push(s[6 + 3 * c]);
                }
                planes = vec![vec![0; h * w]; nc];
                done = vec![false; nc];
                sof = Some((p, h, w, ids));
                pos += len;
            }
            0xF8 => {
                let len = u16_at(pos)?;
                let s = data
                    .get(pos + 2..pos + len)
                    .ok_or("JPEG-LS stream truncated in an LSE segment")?;
                if s.first() != Some(&1) || s.len() < 11 {
                    return Err(format!(
                        "JPEG-LS LSE segment of type {:?} (mapping tables / extended \
                         parameters) is not supported",
                        s.first()
                    ));
                }
                let g = |i: usize| u16::from_be_bytes([s[i], s[i + 1]]) as i32;
                preset = Some(Params {
                    maxval: g(1),
                    t1: g(3),
                    t2: g(5),
                    t3: g(7),
                    reset: g(9),
                });
                pos += len;
            }
            0xDD => {
                let len = u16_at(pos)?;
                if len >= 4 && u16_at(pos + 2)? != 0 {
                    return Err("JPEG-LS restart intervals are not supported".into());
                }
                pos += len;
            }
            0xDA => {
                let (prec, h, w, ids) =
                    sof.as_ref().ok_or("JPEG-LS scan before the frame header")?;
                let len = u16_at(pos)?;
                let s = data
                    .get(pos + 2..pos + len)
                    .ok_or("JPEG-LS stream truncated in the SOS segment")?;
                let ns = *s.first().ok_or("empty SOS segment")? as usize;
                if ns == 0 || s.len() < 1 + 2 * ns + 3 {
                    return Err("invalid JPEG-LS SOS segment".into());
                }
                let mut comps = Vec::with_capacity(ns);
                for c in 0..ns {
                    let id = s[1 + 2 * c];
                    let k = ids
                        .iter()
                        .position(|&i| i == id)
                        .ok_or_else(|| format!("JPEG-LS scan names unknown component {id}"))?;
                    if s[2 + 2 * c] != 0 {
                        return Err("JPEG-LS mapping tables are not supported".into());
                    }
                    comps.push(k);
                }
                let near = s[1 + 2 * ns] as i32;
                let ilv = s[2 + 2 * ns];
                if s[3 + 2 * ns] & 0x0F != 0 {
                    return Err("JPEG-LS point transform is not supported".into());
                }
                if (ilv == 0) != (ns == 1) || ilv > 2 {
                    return Err(format!(
                        "JPEG-LS interleave mode {ilv} with {ns} component(s) in a scan"
                    ));
                }
                pos += len;
                // entropy-coded data up to the next marker (0xFF followed by >= 0x80)
                let start = pos;
                let mut end = start;
                while end + 1 < data.len() && !(data[end] == 0xFF && data[end + 1] >= 0x80) {
                    end += 1;
                }
                if end + 1 >= data.len() {
                    end = data.len();
                }
                let maxval = preset
                    .map(|p| p.maxval)
                    .filter(|&m| m != 0)
                    .unwrap_or((1i32 << prec) - 1);
                if near < 0 || near > (maxval / 2).min(255) {
                    return Err(format!("invalid JPEG-LS NEAR {near}"));
                }
                let p = default_params(maxval, near, preset);
                let range = (maxval + 2 * near) / (2 * near + 1) + 1;
                let qbpp = ceil_log2(range);
                let bpp = ceil_log2(maxval + 1).max(2) as i32;
                let limit = 2 * (bpp + bpp.max(8));
                let a0 = ((range + 32) / 64).max(2);
                let mut bits = Bits::new(&data[start..end]);
                let mut scan = Scan {
                    bits: &mut bits,
                    p,
                    near,
                    range,
                    qbpp,
                    limit,
                    ctx: vec![
                        Ctx {
                            a: a0,
                            b: 0,
                            c: 0,
                            n: 1
                        };
                        365
                    ],
                    run: [
                        RunCtx {
                            a: a0,
                            n: 1,
                            nn: 0,
                            ri_type: 0,
                        },
                        RunCtx {
                            a: a0,
                            n: 1,
                            nn: 0,
                            ri_type: 1,
                        },
                    ],
                };
                decode_scan(&mut scan, &comps, ilv, *h, *w, &mut planes)?;
                if scan.bits.overrun() {
                    return Err("JPEG-LS scan data truncated".into());
                }
                for &c in &comps {
                    done[c] = true;
                }
                pos = end;
            }
            0xE0..=0xEF | 0xFE => {
                pos += u16_at(pos)?;
            }
            other => {
                return Err(format!(
                    "unexpected marker 0xFF{other:02X} in a JPEG-LS stream"
                ))
            }
        }
    }
    let (precision, height, width, ids) = sof.ok_or("JPEG-LS stream without a frame header")?;
    if let Some(c) = done.iter().position(|d| !d) {
        return Err(format!(
            "JPEG-LS stream has no scan for component {}",
            c + 1
        ));
    }
    let nc = ids.len();
    let mut samples = vec![0u16; height * width * nc];
    for (c, plane) in planes.iter().enumerate() {
        for (i, &v) in plane.iter().enumerate() {
            samples[i * nc + c] = v as u16;
        }
    }
    Ok(Frame {
        width,
        height,
        components: nc,
        precision,
        samples,
    })
}

fn decode_scan(
    scan: &mut Scan,
    comps: &[usize],
    ilv: u8,
    h: usize,
    w: usize,
    planes: &mut [Vec<i32>],
) -> Result<(), String> {
    let nc = comps.len();
    if ilv == 2 {
        let mut prev = vec![0i32; (w + 2) * nc];
        let mut cur = vec![0i32; (w + 2) * nc];
        let mut run_index = 0usize;
        for y in 0..h {
            for c in 0..nc {
                prev[(w + 1) * nc + c] = prev[w * nc + c];
                cur[c] = prev[nc + c];
            }
            scan.line_sample(&prev, &mut cur, nc, &mut run_index)?;
            for (c, &k) in comps.iter().enumerate() {
                for x in 0..w {
                    planes[k][y * w + x] = cur[(x + 1) * nc + c];
                }
            }
            std::mem::swap(&mut prev, &mut cur);
            if scan.bits.overrun() {
                return Err("JPEG-LS scan data truncated".into());
            }
        }
        return Ok(());
    }
    let mut prev = vec![vec![0i32; w + 2]; nc];
    let mut cur = vec![vec![0i32; w + 2]; nc];
    let mut run_index = vec![0usize; nc];
    for y in 0..h {
        for (c, &k) in comps.iter().enumerate() {
            prev[c][w + 1] = prev[c][w];
            cur[c][0] = prev[c][1];
            scan.line(&prev[c], &mut cur[c], &mut run_index[c])?;
            planes[k][y * w..(y + 1) * w].copy_from_slice(&cur[c][1..=w]);
            std::mem::swap(&mut prev[c], &mut cur[c]);
        }
        if scan.bits.overrun() {
            return Err("JPEG-LS scan data truncated".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_thresholds_of_t87() {
        let p = default_params(255, 0, None);
        assert_eq!((p.t1, p.t2, p.t3, p.reset), (3, 7, 21, 64));
        // 16-bit: the values in the LSE segment of JPEGLSNearLossless_16.dcm
        let p = default_params(65535, 0, None);
        assert_eq!((p.t1, p.t2, p.t3), (18, 67, 276));
        let p = default_params(255, 2, None);
        assert_eq!((p.t1, p.t2, p.t3), (9, 17, 35));
    }

    #[test]
    fn a_byte_after_0xff_carries_seven_bits() {
        let d = [0xFF, 0x7F, 0x80];
        let mut b = Bits::new(&d);
        assert_eq!(b.bits(15), 0x7FFF);
        assert_eq!(b.bits(8), 0x80);
        assert!(!b.overrun());
        b.bits(1);
        assert!(b.overrun());
    }
}
