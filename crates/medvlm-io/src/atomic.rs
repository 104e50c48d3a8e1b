//! Atomic file writes, the one implementation every medvlm crate uses for outputs,
//! checkpoints, caches and model directories: write a temporary file in the destination
//! folder, fsync it, rename it over the destination and fsync the folder, so a crash or a
//! SIGKILL leaves either the old file or the new one, never a half-written one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Run `fill` on a buffered temporary file next to `path`, then move it to `path` atomically.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    write_atomic_via(path, |tmp| {
        let file = std::fs::File::create(tmp)?;
        let mut buf = std::io::BufWriter::new(file);
        fill(&mut buf)?;
        buf.into_inner().map_err(|e| e.into_error())?;
        Ok(())
    })
}

/// For writers that take a path (e.g. `safetensors` savers): `produce` writes the temporary
/// path it is given, which is then fsynced and moved to `path` atomically. The temporary
/// file is removed if `produce` fails.
pub fn write_atomic_via<F>(path: &Path, produce: F) -> Result<()>
where
    F: FnOnce(&Path) -> std::io::Result<()>,
{
    let dir = parent_dir(path);
    let tmp = dir.join(temp_name(path));
    // The mode an ordinary new file gets here (0666 less the umask, so 0644 by default).
    // Some writers create their file private (0600, as a temporary file would be); the
    // output gets the ordinary mode whatever `produce` did.
    let ordinary_mode = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions());
    let written = ordinary_mode
        .and_then(|mode| {
            produce(&tmp)?;
            std::fs::set_permissions(&tmp, mode)
        })
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(IoError::os(path, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(IoError::os(path, e));
    }
    sync_dir(&dir)
}

/// Fsyncs a directory so that renames into it survive a crash; a no-op where the platform
/// cannot open or sync directories.
pub fn sync_dir(dir: &Path) -> Result<()> {
    match std::fs::File::open(dir).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        // Windows cannot open a directory as a file; some filesystems refuse the fsync.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(IoError::os(dir, e)),
    }
}

/// `.NAME.tmp-PID`, or `.STEM.tmp-PID.EXT` when the name has an extension, so writers that
/// choose the format from the extension (image encoders, plotters) still see it.
fn temp_name(path: &Path) -> String {
    let pid = std::process::id();
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => format!(
            ".{}.tmp-{pid}.{}",
            stem.to_string_lossy(),
            ext.to_string_lossy()
        ),
        _ => format!(
            ".{}.tmp-{pid}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "out".to_string())
        ),
    }
}

/// Writes a folder atomically: `fill` writes the files into a fresh temporary sibling
/// `.NAME.tmp-PID`, which then replaces `out` (an earlier folder at `out` is removed only once
/// the new one is complete, so a failure leaves the old folder). The temporary folder is
/// removed when `fill` fails. `io_err` turns a file-system error on a path into the caller's
/// error type.
pub fn write_dir_atomic<E>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
    io_err: impl Fn(&Path, std::io::Error) -> E,
) -> std::result::Result<(), E> {
    let parent = parent_dir(out);
    std::fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    let tmp = parent.join(temp_name(out));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| io_err(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
    // Best effort: the rename is durable once the parent is synced.
    let _ = sync_dir(&parent);
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_replaced_only_once_the_new_one_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        write_dir_atomic(
            &out,
            |t| std::fs::write(t.join("a"), b"1").map_err(|e| io(t, e)),
            io,
        )
        .unwrap();
        assert_eq!(std::fs::read(out.join("a")).unwrap(), b"1");
        // A failing writer leaves the old folder and no temporary one.
        let e = write_dir_atomic(
            &out,
            |t| {
                std::fs::write(t.join("a"), b"2").map_err(|e| io(t, e))?;
                Err("disk full".to_string())
            },
            io,
        )
        .unwrap_err();
        assert_eq!(e, "disk full");
        assert_eq!(std::fs::read(out.join("a")).unwrap(), b"1");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "a temporary folder was left behind");
        // A complete writer replaces it, old files included.
        write_dir_atomic(
            &out,
            |t| std::fs::write(t.join("b"), b"3").map_err(|e| io(t, e)),
            io,
        )
        .unwrap();
        assert!(!out.join("a").exists() && out.join("b").is_file());
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
    }

    #[test]
    fn a_failed_producer_keeps_the_old_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("weights.safetensors");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_via(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("weights.safetensors"), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn outputs_get_the_ordinary_mode_even_from_private_writers() {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, b"x").unwrap();
        let ordinary = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        let p = dir.path().join("out.safetensors");
        // A writer that replaces its file with a private one (0600), as temp-file writers do.
        write_atomic_via(&p, |tmp| {
            let _ = std::fs::remove_file(tmp);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)?;
            drop(f);
            Ok(())
        })
        .unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, ordinary, "{mode:o} vs {ordinary:o}");
        write_atomic(&dir.path().join("b.json"), b"{}").unwrap();
        let mode = std::fs::metadata(dir.path().join("b.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, ordinary);
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/folder/out.txt");
        let err = write_atomic(&p, b"x").unwrap_err();
        assert!(err.to_string().contains("out.txt"), "{err}");
    }
}
