//! Files that are never seen half-written.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary file [`write_atomically`] writes before renaming it over
/// `path`: `.<name>.tmp-<pid>` in the same folder (same file system, so the
/// rename is atomic; hidden; one per process and target).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` through [`temp_path`]: the folder is created if
/// needed, the temporary file is written and fsynced, renamed over `path`,
/// and the folder fsynced, so a crash or Ctrl-C at any moment leaves either
/// the previous file or the new one, never a torn one. The temporary file
/// is removed on failure.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let tmp = temp_path(path);
    let written = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable. Not possible on every platform; best effort.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A fresh, empty folder under the system's temporary folder, unique to
/// this process, call and `tag` (for tests).
#[cfg(test)]
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "r1_sgg_{tag}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    fs::create_dir_all(&dir).expect("a temporary folder");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = temp_dir("fs");
        let path = dir.join("a.txt");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        // A folder where the temporary file should go makes the write fail.
        fs::create_dir(temp_path(&path)).unwrap();
        assert!(write_atomically(&path, b"third").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"second");
        fs::remove_dir(temp_path(&path)).unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.txt"]);
        write_atomically(&dir.join("new/deeper/b.txt"), b"x").unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
