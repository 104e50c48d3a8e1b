//! Coverage-less byte mutations: stacked random edits of one input, with
//! splicing from a second input and per-target token dictionaries.

use std::io::{Cursor, Read, Write};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Largest input the mutator produces; bigger results are truncated.
pub const MAX_INPUT: usize = 1 << 20;

const INTERESTING_8: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x40];
const INTERESTING_16: &[u16] = &[
    0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xfffe, 0xffff,
];
const INTERESTING_32: &[u32] = &[
    0,
    1,
    2,
    0xff,
    0xffff,
    0x1_0000,
    0x10_0000,
    0x4000_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];
const INTERESTING_64: &[u64] = &[
    0,
    1,
    0xffff_ffff,
    0x1_0000_0000,
    0x100_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_ffff,
];

/// One stacked mutation of `input`: 1 to 8 random edits. `other` is a second
/// input for splicing; `dict` holds tokens worth inserting for this format.
pub fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut data = input.to_vec();
    let n = 1 << rng.random_range(0..4u32);
    for _ in 0..n {
        mutate_once(rng, &mut data, other, dict);
    }
    data.truncate(MAX_INPUT);
    data
}

fn pos(rng: &mut ChaCha8Rng, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        rng.random_range(0..len)
    }
}

/// A length for range operations: mostly short, sometimes long.
fn span(rng: &mut ChaCha8Rng, max: usize) -> usize {
    if max == 0 {
        return 0;
    }
    let cap = if rng.random_bool(0.8) {
        max.min(16)
    } else {
        max
    };
    rng.random_range(1..=cap)
}

fn write_int(data: &mut [u8], at: usize, v: u64, width: usize, big_endian: bool) {
    let bytes = if big_endian {
        v.to_be_bytes()[8 - width..].to_vec()
    } else {
        v.to_le_bytes()[..width].to_vec()
    };
    data[at..at + width].copy_from_slice(&bytes);
}

fn mutate_once(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]]) {
    let len = data.len();
    match rng.random_range(0..15u32) {
        // Flip one bit.
        0 if len > 0 => {
            let p = pos(rng, len);
            data[p] ^= 1 << rng.random_range(0..8u32);
        }
        // Random byte.
        1 if len > 0 => {
            let p = pos(rng, len);
            data[p] = rng.random();
        }
        // Interesting byte.
        2 if len > 0 => {
            let p = pos(rng, len);
            data[p] = INTERESTING_8[rng.random_range(0..INTERESTING_8.len())];
        }
        // Interesting 16-bit value, either endianness.
        3 if len >= 2 => {
            let p = pos(rng, len - 1);
            let v = INTERESTING_16[rng.random_range(0..INTERESTING_16.len())] as u64;
            let be = rng.random_bool(0.5);
            write_int(data, p, v, 2, be);
        }
        // Interesting 32-bit value.
        4 if len >= 4 => {
            let p = pos(rng, len - 3);
            let v = INTERESTING_32[rng.random_range(0..INTERESTING_32.len())] as u64;
            let be = rng.random_bool(0.5);
            write_int(data, p, v, 4, be);
        }
        // Interesting 64-bit value.
        5 if len >= 8 => {
            let p = pos(rng, len - 7);
            let v = INTERESTING_64[rng.random_range(0..INTERESTING_64.len())];
            let be = rng.random_bool(0.5);
            write_int(data, p, v, 8, be);
        }
        // Small arithmetic on a 1/2/4-byte little-endian integer.
        6 if len >= 4 => {
            let width = [1usize, 2, 4][rng.random_range(0..3)];
            let p = pos(rng, len - width + 1);
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(&data[p..p + width]);
            let v = u64::from_le_bytes(b);
            let delta = rng.random_range(1..=35u64);
            let v = if rng.random_bool(0.5) {
                v.wrapping_add(delta)
            } else {
                v.wrapping_sub(delta)
            };
            write_int(data, p, v, width, false);
        }
        // Delete a range.
        7 if len > 1 => {
            let p = pos(rng, len);
            let n = span(rng, len - p);
            data.drain(p..p + n);
        }
        // Insert random bytes.
        8 => {
            let p = pos(rng, len + 1);
            let n = span(rng, 64);
            let fill: Vec<u8> = if rng.random_bool(0.5) {
                (0..n).map(|_| rng.random()).collect()
            } else {
                vec![INTERESTING_8[rng.random_range(0..INTERESTING_8.len())]; n]
            };
            data.splice(p..p, fill);
        }
        // Duplicate a range in place.
        9 if len > 0 => {
            let p = pos(rng, len);
            let n = span(rng, len - p);
            let chunk = data[p..p + n].to_vec();
            let at = pos(rng, len + 1);
            data.splice(at..at, chunk);
        }
        // Copy a range over another part.
        10 if len > 1 => {
            let src = pos(rng, len);
            let n = span(rng, len - src);
            let dst = pos(rng, len - n + 1);
            let chunk = data[src..src + n].to_vec();
            data[dst..dst + n].copy_from_slice(&chunk);
        }
        // Truncate.
        11 if len > 0 => {
            let keep = pos(rng, len);
            data.truncate(keep);
        }
        // Splice: prefix of this input, suffix of the other.
        12 if !other.is_empty() => {
            let cut = pos(rng, len + 1);
            let from = pos(rng, other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Dictionary token, inserted or overwriting.
        13 | 14 if !dict.is_empty() => {
            let tok = dict[rng.random_range(0..dict.len())];
            let p = pos(rng, len + 1);
            if rng.random_bool(0.5) || p + tok.len() > len {
                data.splice(p..p, tok.iter().copied());
            } else {
                data[p..p + tok.len()].copy_from_slice(tok);
            }
        }
        _ => {
            // The chosen edit did not fit this input: flip a byte or grow it.
            if len > 0 {
                let p = pos(rng, len);
                data[p] = data[p].wrapping_add(1);
            } else {
                data.push(rng.random());
            }
        }
    }
}

/// The entries of a zip archive: name and uncompressed bytes.
pub fn unzip(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut z = zip::ZipArchive::new(Cursor::new(bytes)).ok()?;
    let mut out = Vec::with_capacity(z.len().min(4096));
    for i in 0..z.len() {
        let mut f = z.by_index(i).ok()?;
        let name = f.name().to_string();
        let mut data = Vec::new();
        // Bound the read: a seed never holds more than a few MiB.
        (&mut f).take(64 << 20).read_to_end(&mut data).ok()?;
        out.push((name, data));
    }
    Some(out)
}

/// A zip archive (stored, no compression, like PyTorch writes) of `entries`.
pub fn zip_stored(entries: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    for (name, data) in entries {
        w.start_file(name.as_str(), opts).ok()?;
        w.write_all(data).ok()?;
    }
    Some(w.finish().ok()?.into_inner())
}

/// Mutate one entry of a zip archive and repack it, so that CRC checks pass and
/// the mutation reaches the parser of the entry. `prefer` picks the entry
/// (by name suffix) most of the time.
pub fn mutate_in_zip(
    rng: &mut ChaCha8Rng,
    archive: &[u8],
    other: &[u8],
    dict: &[&[u8]],
    prefer: &str,
) -> Option<Vec<u8>> {
    let mut entries = unzip(archive)?;
    if entries.is_empty() {
        return None;
    }
    let preferred: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n.ends_with(prefer))
        .map(|(i, _)| i)
        .collect();
    let idx = if !preferred.is_empty() && rng.random_bool(0.75) {
        preferred[rng.random_range(0..preferred.len())]
    } else {
        rng.random_range(0..entries.len())
    };
    // Splice partner: the same entry of the other archive when there is one.
    let other_entry = unzip(other)
        .and_then(|o| o.into_iter().find(|(n, _)| *n == entries[idx].0))
        .map(|(_, d)| d)
        .unwrap_or_default();
    let new = mutate(rng, &entries[idx].1, &other_entry, dict);
    entries[idx].1 = new;
    if rng.random_bool(0.05) {
        // Occasionally drop an entry altogether.
        let drop = rng.random_range(0..entries.len());
        entries.remove(drop);
    }
    zip_stored(&entries)
}

/// Gunzip, or `None` if `bytes` is not a complete gzip stream.
pub fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(64 << 20)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// Gzip with fast compression.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("writing to a Vec cannot fail");
    e.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mutation_is_reproducible_and_bounded() {
        let seed = b"hello world, this is a seed input".to_vec();
        let run = |s| {
            let mut rng = ChaCha8Rng::seed_from_u64(s);
            (0..200)
                .map(|_| mutate(&mut rng, &seed, b"other", &[b"tok"]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().all(|m| m.len() <= MAX_INPUT));
    }

    #[test]
    fn zip_roundtrip() {
        let e = vec![("a/data.pkl".to_string(), b"abc".to_vec())];
        let z = zip_stored(&e).unwrap();
        assert_eq!(unzip(&z).unwrap(), e);
        assert_eq!(gunzip(&gzip(b"xyz")).unwrap(), b"xyz");
    }
}
