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

/// Writes `bytes` to `path` through an [`AtomicFile`]: a crash or Ctrl-C at
/// any moment leaves either the previous file or the new one, never a torn
/// one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// A file written in pieces that appears at its path whole or not at all:
/// writes go to [`temp_path`] (the folder is created if needed), and
/// [`commit`](Self::commit) fsyncs it, renames it over the path and fsyncs
/// the folder. Dropped uncommitted (an error midway), the temporary file is
/// removed and the path keeps its previous file. For files too large to
/// build in memory first, such as parquet shards.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once committed.
    file: Option<fs::File>,
}

impl AtomicFile {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        fs::create_dir_all(folder(path))?;
        let tmp = temp_path(path);
        let file = fs::File::create(&tmp)?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    /// Puts the file in place (see the type's docs).
    pub fn commit(mut self) -> io::Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let moved = file.sync_all().and_then(|()| {
            drop(file);
            fs::rename(&self.tmp, &self.path)
        });
        if let Err(e) = moved {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        // Make the rename itself durable. Not possible on every platform; best effort.
        if let Ok(d) = fs::File::open(folder(&self.path)) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The open temporary file; an error after `commit` (which takes `self`,
    /// so only reachable through a bug).
    fn file(&mut self) -> io::Result<&mut fs::File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("write after commit"))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file()?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The folder `path` is in (`.` for a bare file name).
fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
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

    #[test]
    fn an_atomic_file_appears_whole_on_commit_and_never_otherwise() {
        let dir = temp_dir("atomic_file");
        let path = dir.join("shard.bin");
        write_atomically(&path, b"old").unwrap();
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"new ").unwrap();
        // Half-written: the old file is still in place.
        assert_eq!(fs::read(&path).unwrap(), b"old");
        file.write_all(b"contents").unwrap();
        file.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        // Dropped uncommitted (an error midway): old file kept, temporary gone.
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"partial").unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["shard.bin"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
