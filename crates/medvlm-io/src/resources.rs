//! Memory and disk checks before long work: a command that would need more than the
//! machine has (a typo such as `vision_width = 100000`, `--n 18446744073709551615`) is
//! refused at once with its estimate, instead of being killed by the kernel or filling the
//! disk hours later. Estimates are the caller's; this module reads what is available and
//! words the refusal.

use std::path::Path;

use crate::error::{IoError, Result};

/// Bytes of memory the kernel says can be allocated without swapping (`MemAvailable` of
/// `/proc/meminfo`); `None` where that is not known (not Linux), so no check is made.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Bytes free to an unprivileged writer on the file system that holds `path` (or, for a
/// path that does not exist yet, its nearest existing ancestor); `None` where unknown.
pub fn available_disk(path: &Path) -> Option<u64> {
    let existing = path
        .ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
        .unwrap_or(Path::new("."));
    statvfs_available(existing)
}

#[cfg(unix)]
fn statvfs_available(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a zeroed, writable statvfs that
    // the call fills; nothing else is touched.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // the field widths differ between platforms
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

#[cfg(not(unix))]
fn statvfs_available(_p: &Path) -> Option<u64> {
    None
}

/// `1.5 GB`, `320 MB`, `4.2e6 TB`: decimal units, as `df -H` prints them.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes.max(0.0);
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if v >= 1e5 {
        format!("{v:.1e} {}", UNITS[u])
    } else if v >= 100.0 || u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Refuses `what` when its estimated memory (`bytes`) exceeds what is available, unless
/// `force`. The message gives both figures and `how_to_force` (e.g. "pass --force").
pub fn ensure_memory(what: &str, bytes: f64, force: bool, how_to_force: &str) -> Result<()> {
    match available_memory() {
        Some(avail) if !force && bytes > avail as f64 => Err(IoError::InvalidArgument(format!(
            "{what} needs about {} of memory, and {} is available; make it smaller, or \
             {how_to_force} to start anyway",
            human_bytes(bytes),
            human_bytes(avail as f64)
        ))),
        _ => Ok(()),
    }
}

/// Refuses `what` when its estimated output (`bytes`) exceeds the free space where `dir`
/// lives, unless `force`.
pub fn ensure_disk(
    what: &str,
    bytes: f64,
    dir: &Path,
    force: bool,
    how_to_force: &str,
) -> Result<()> {
    match available_disk(dir) {
        Some(avail) if !force && bytes > avail as f64 => Err(IoError::InvalidArgument(format!(
            "{what} needs about {} of disk, and {} is free in {}; make it smaller, or \
             {how_to_force} to start anyway",
            human_bytes(bytes),
            human_bytes(avail as f64),
            dir.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_like_df() {
        assert_eq!(human_bytes(999.0), "999 B");
        assert_eq!(human_bytes(1500.0), "1.5 kB");
        assert_eq!(human_bytes(41e9), "41.0 GB");
        assert_eq!(human_bytes(320e6), "320 MB");
        assert_eq!(human_bytes(4.2e18), "4.2e6 TB");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn what_is_available_is_read_and_absurd_needs_are_refused() {
        let mem = available_memory().expect("MemAvailable on Linux");
        assert!(mem > 1 << 20, "{mem}");
        let dir = tempfile::tempdir().unwrap();
        let disk = available_disk(&dir.path().join("not/yet/made")).expect("statvfs");
        assert!(disk > 0);
        let err = ensure_disk("writing it", 1e30, dir.path(), false, "pass --force")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs about 1.0e18 TB of disk") && err.contains("pass --force"),
            "{err}"
        );
        ensure_disk("writing it", 1e30, dir.path(), true, "pass --force").unwrap();
        ensure_disk("writing it", 10.0, dir.path(), false, "pass --force").unwrap();
        let err = ensure_memory("a model", 1e30, false, "pass --force")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("of memory") && err.contains("available"),
            "{err}"
        );
        ensure_memory("a model", 1e3, false, "pass --force").unwrap();
    }
}
