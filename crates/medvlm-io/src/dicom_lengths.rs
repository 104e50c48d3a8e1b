//! A check of the value lengths a DICOM file declares, before the file is parsed.
//!
//! dicom-object allocates (and zeroes) the length an element declares before it finds that
//! the file is shorter: a damaged 40 kB file declaring a 2 GB element briefly took over 2 GB.
//! [`check_declared_lengths`] walks the element headers (seeking over values, reading no
//! value but the transfer syntax UID) and refuses any defined length that runs past the end
//! of its enclosing item, sequence or file, naming the element and the byte offset. Undefined
//! lengths (sequences, items, encapsulated pixel data) are walked into; the fragments of
//! encapsulated pixel data are checked but not parsed as elements. Deflated data sets are
//! not walked (their bytes are compressed).

use std::io::{Read, Seek, SeekFrom};

const UNDEFINED: u32 = 0xFFFF_FFFF;
/// VRs whose explicit-VR header has a 2-byte length (PS3.5 7.1.2). Every other VR, an
/// unknown one included (read as UN, as dicom-rs reads it), has 2 reserved bytes and a 4-byte
/// length.
const SHORT_VRS: &[&[u8; 2]] = &[
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];
/// The known VRs with a 4-byte length.
const LONG_VRS: &[&[u8; 2]] = &[
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV",
];
/// Nesting depth beyond which a file is refused (real files nest a few levels).
const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy)]
struct Encoding {
    explicit: bool,
    little: bool,
}

struct Walker<R> {
    r: R,
    len: u64,
    /// The transfer syntax UID, once the meta group's (0002,0010) has been read.
    ts: Option<String>,
}

enum Stop {
    /// A delimiter (item or sequence) at this offset ended the walk.
    Delimiter,
    /// The end of the range.
    End,
}

impl<R: Read + Seek> Walker<R> {
    fn bytes<const N: usize>(&mut self, at: u64) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.r.read_exact(&mut b))
            .map_err(|e| format!("reading the element header at byte {at}: {e}"))?;
        Ok(b)
    }

    fn u16(b: [u8; 2], little: bool) -> u16 {
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    }

    fn u32(b: [u8; 4], little: bool) -> u32 {
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    }

    /// Walks elements from `pos` to `end` (or to a delimiter); returns where it stopped and
    /// why. `pixel_fragments`: the range holds the items of encapsulated pixel data.
    fn walk(
        &mut self,
        mut pos: u64,
        end: u64,
        enc: Encoding,
        depth: usize,
        pixel_fragments: bool,
        only_group: Option<u16>,
    ) -> Result<(u64, Stop), String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "sequences nested more than {MAX_DEPTH} deep at byte {pos}"
            ));
        }
        while pos < end {
            if end - pos < 8 {
                // Trailing padding shorter than a header: left to the parser.
                return Ok((end, Stop::End));
            }
            let head: [u8; 8] = self.bytes(pos)?;
            let group = Self::u16([head[0], head[1]], enc.little);
            let element = Self::u16([head[2], head[3]], enc.little);
            if only_group.is_some_and(|g| g != group) {
                return Ok((pos, Stop::End));
            }
            let tag = format!("({group:04X},{element:04X})");
            if group == 0xFFFE {
                let len = Self::u32([head[4], head[5], head[6], head[7]], enc.little);
                match element {
                    0xE00D | 0xE0DD => return Ok((pos + 8, Stop::Delimiter)),
                    0xE000 => {
                        let start = pos + 8;
                        if len == UNDEFINED {
                            if pixel_fragments {
                                return Err(format!(
                                    "pixel data fragment at byte {pos} has an undefined length"
                                ));
                            }
                            let (after, stop) =
                                self.walk(start, end, enc, depth + 1, false, None)?;
                            if !matches!(stop, Stop::Delimiter) {
                                return Err(format!(
                                    "item at byte {pos} has no item delimiter before byte {end}"
                                ));
                            }
                            pos = after;
                        } else {
                            self.check_fits(&tag, "item", pos, start, len, end)?;
                            if !pixel_fragments {
                                self.walk(start, start + len as u64, enc, depth + 1, false, None)?;
                            }
                            pos = start + len as u64;
                        }
                        continue;
                    }
                    _ => return Err(format!("unknown item tag {tag} at byte {pos}")),
                }
            }
            let (vr, len, header) = if enc.explicit {
                let vr = [head[4], head[5]];
                if SHORT_VRS.iter().any(|v| v[..] == vr) {
                    (
                        Some(vr),
                        u32::from(Self::u16([head[6], head[7]], enc.little)),
                        8,
                    )
                } else {
                    // Every other VR, an unknown one included, has a 4-byte length; an unknown
                    // VR is read as UN, as dicom-rs reads it.
                    let l: [u8; 4] = self.bytes(pos + 8)?;
                    let known = LONG_VRS.iter().any(|v| v[..] == vr);
                    (
                        Some(if known { vr } else { *b"UN" }),
                        Self::u32(l, enc.little),
                        12,
                    )
                }
            } else {
                (
                    None,
                    Self::u32([head[4], head[5], head[6], head[7]], enc.little),
                    8,
                )
            };
            let start = pos + header;
            if len == UNDEFINED {
                let pixels = group == 0x7FE0 && element == 0x0010;
                // An undefined-length UN holds implicit VR little endian (PS3.5 6.2.2).
                let inner = if vr == Some(*b"UN") {
                    Encoding {
                        explicit: false,
                        little: true,
                    }
                } else {
                    enc
                };
                let (after, stop) = self.walk(start, end, inner, depth + 1, pixels, None)?;
                if !matches!(stop, Stop::Delimiter) {
                    return Err(format!(
                        "element {tag} at byte {pos} has an undefined length and no sequence \
                         delimiter before byte {end}"
                    ));
                }
                pos = after;
                continue;
            }
            self.check_fits(&tag, "element", pos, start, len, end)?;
            if group == 0x0002 && element == 0x0010 && len <= 64 {
                let mut v = vec![0u8; len as usize];
                self.r
                    .seek(SeekFrom::Start(start))
                    .and_then(|_| self.r.read_exact(&mut v))
                    .map_err(|e| format!("reading the transfer syntax UID: {e}"))?;
                self.ts = Some(
                    String::from_utf8_lossy(&v)
                        .trim_end_matches(['\0', ' '])
                        .to_string(),
                );
            }
            if vr == Some(*b"SQ") {
                self.walk(start, start + len as u64, enc, depth + 1, false, None)?;
            }
            pos = start + len as u64;
        }
        Ok((pos, Stop::End))
    }

    fn check_fits(
        &self,
        tag: &str,
        what: &str,
        pos: u64,
        start: u64,
        len: u32,
        end: u64,
    ) -> Result<(), String> {
        let room = end.saturating_sub(start);
        if len as u64 > room {
            let within = if end == self.len {
                "the file".to_string()
            } else {
                "its enclosing item or sequence".to_string()
            };
            return Err(format!(
                "{what} {tag} at byte {pos} declares {len} bytes but only {room} remain in \
                 {within} (a damaged or truncated file)"
            ));
        }
        Ok(())
    }
}

fn encoding_of(uid: &str) -> Option<Encoding> {
    match uid {
        "1.2.840.10008.1.2" => Some(Encoding {
            explicit: false,
            little: true,
        }),
        "1.2.840.10008.1.2.2" => Some(Encoding {
            explicit: true,
            little: false,
        }),
        // Deflated: the data set is compressed and cannot be walked.
        "1.2.840.10008.1.2.1.99" => None,
        _ => Some(Encoding {
            explicit: true,
            little: true,
        }),
    }
}

/// Checks the declared lengths of a DICOM stream: `meta_at` is the offset of the file meta
/// group (after `DICM`; its transfer syntax then decides the data set's encoding), or `None`
/// for a bare data set in the transfer syntax `bare_uid`. The error says which element
/// declares what, where.
pub(crate) fn check_declared_lengths<R: Read + Seek>(
    mut r: R,
    meta_at: Option<u64>,
    bare_uid: Option<&str>,
) -> Result<(), String> {
    let len = r
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("reading the file length: {e}"))?;
    let mut w = Walker { r, len, ts: None };
    let explicit_le = Encoding {
        explicit: true,
        little: true,
    };
    let (data_at, uid) = match meta_at {
        Some(at) => {
            // The group length (0002,0000) bounds the meta group, as the parser reads it;
            // without one, the group ends at the first element of another group.
            let group_len = (at + 12 <= len)
                .then(|| w.bytes::<12>(at))
                .transpose()?
                .filter(|h| h[0..4] == [0x02, 0x00, 0x00, 0x00] && &h[4..6] == b"UL")
                .map(|h| u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as u64);
            let after = match group_len {
                Some(g) => {
                    let end = at + 12 + g;
                    if end > len {
                        return Err(format!(
                            "the file meta group length (0002,0000) declares {g} bytes but only \
                             {} remain in the file (a damaged or truncated file)",
                            len.saturating_sub(at + 12)
                        ));
                    }
                    w.walk(at + 12, end, explicit_le, 0, false, None)?;
                    end
                }
                None => w.walk(at, len, explicit_le, 0, false, Some(0x0002))?.0,
            };
            // Without a transfer syntax the parser cannot read the data set as a Part 10
            // file; walk it as the default explicit VR little endian all the same.
            let uid = w.ts.clone().unwrap_or_else(|| "1.2.840.10008.1.2.1".into());
            (after, uid)
        }
        None => (0, bare_uid.unwrap_or("1.2.840.10008.1.2.1").to_string()),
    };
    let Some(enc) = encoding_of(&uid) else {
        return Ok(());
    };
    w.walk(data_at, len, enc, 0, false, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn explicit_le(tag: (u16, u16), vr: &[u8; 2], value: &[u8], declared: Option<u32>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&tag.0.to_le_bytes());
        b.extend_from_slice(&tag.1.to_le_bytes());
        b.extend_from_slice(vr);
        if !SHORT_VRS.contains(&vr) {
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&declared.unwrap_or(value.len() as u32).to_le_bytes());
        } else {
            b.extend_from_slice(&(declared.unwrap_or(value.len() as u32) as u16).to_le_bytes());
        }
        b.extend_from_slice(value);
        b
    }

    #[test]
    fn a_length_past_the_end_is_refused_with_the_element_and_offset() {
        let mut ds = explicit_le((0x0010, 0x0010), b"PN", b"DOE^J ", None);
        ds.extend(explicit_le(
            (0x7FE0, 0x0010),
            b"OW",
            &[1, 2, 3, 4],
            Some(2_000_000_000),
        ));
        let err = check_declared_lengths(Cursor::new(&ds), None, Some("1.2.840.10008.1.2.1"))
            .unwrap_err();
        assert!(
            err.contains("(7FE0,0010) at byte 14 declares 2000000000 bytes"),
            "{err}"
        );
        assert!(err.contains("only 4 remain in the file"), "{err}");
        // The same element with its true length passes.
        let mut ok = explicit_le((0x0010, 0x0010), b"PN", b"DOE^J ", None);
        ok.extend(explicit_le((0x7FE0, 0x0010), b"OW", &[1, 2, 3, 4], None));
        check_declared_lengths(Cursor::new(&ok), None, Some("1.2.840.10008.1.2.1")).unwrap();
    }

    #[test]
    fn lengths_inside_sequences_are_checked_against_their_item() {
        // SQ (undefined) > item (defined, 12 bytes) > element declaring 100 bytes.
        let inner = explicit_le((0x0008, 0x0100), b"SH", b"ABCD", Some(100));
        let mut ds = Vec::new();
        ds.extend_from_slice(&[0x08, 0x00, 0x15, 0x11]);
        ds.extend_from_slice(b"SQ\0\0");
        ds.extend_from_slice(&UNDEFINED.to_le_bytes());
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        ds.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        ds.extend_from_slice(&inner);
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let err = check_declared_lengths(Cursor::new(&ds), None, None).unwrap_err();
        assert!(err.contains("(0008,0100)"), "{err}");
        assert!(err.contains("its enclosing item or sequence"), "{err}");
    }
}
