//! What `--data` and `--eval-data` name, and loading it: R1-SGG's JSONL
//! export ([`jsonl`](super::jsonl)) or its Hugging Face parquet shards
//! ([`parquet`](mod@super::parquet)), one shard, a folder of them or a glob.

use std::path::{Path, PathBuf};

use super::jsonl::read_jsonl;
use super::parquet::ParquetDataset;
use super::{BadRows, DataError, Sample, Skipped};

/// A dataset on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A JSONL file in R1-SGG's export layout, beside its images.
    Jsonl(PathBuf),
    /// Parquet shards in R1-SGG's Hugging Face layout, read in this order.
    Parquet(Vec<PathBuf>),
}

impl DataSource {
    /// What `spec` names:
    /// - a `.jsonl` file;
    /// - a `.parquet` shard;
    /// - a folder: its `*.parquet` shards, sorted by name (the Hub's
    ///   `data/train-00000-of-00012.parquet`, ... read in order);
    /// - a glob whose last component has `*` or `?` (quoted, so the shell
    ///   leaves it): the matching files of that folder, sorted, all
    ///   `.parquet` (`'data/train-*.parquet'`).
    ///
    /// Anything else, a folder without shards or a glob matching nothing is a
    /// [`DataError::Source`]; a folder that cannot be listed, a
    /// [`DataError::Io`]. Files are not opened here.
    pub fn resolve(spec: &Path) -> Result<Self, DataError> {
        let bad = |reason: &str| DataError::Source {
            path: spec.to_path_buf(),
            reason: reason.to_string(),
        };
        let folder = match spec.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if folder.to_string_lossy().contains(['*', '?']) {
            return Err(bad("wildcards are read in the file name only"));
        }
        let name = spec.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(pattern) = name.as_deref().filter(|n| n.contains(['*', '?'])) {
            let shards = list(folder, |n| matches(pattern, n))?;
            if shards.is_empty() {
                return Err(bad("the pattern matches no file"));
            }
            if !shards.iter().all(|p| has_extension(p, "parquet")) {
                return Err(bad("a pattern must match parquet shards (*.parquet) only"));
            }
            return Ok(DataSource::Parquet(shards));
        }
        if spec.is_dir() {
            let shards = list(spec, |n| n.ends_with(".parquet"))?;
            if shards.is_empty() {
                return Err(bad("a folder of data must hold *.parquet shards; it has none"));
            }
            return Ok(DataSource::Parquet(shards));
        }
        if has_extension(spec, "jsonl") {
            Ok(DataSource::Jsonl(spec.to_path_buf()))
        } else if has_extension(spec, "parquet") {
            Ok(DataSource::Parquet(vec![spec.to_path_buf()]))
        } else {
            Err(bad(
                "expected a .jsonl file, a .parquet shard, a folder of shards or a quoted \
                 pattern such as 'data/train-*.parquet'",
            ))
        }
    }
}

/// Every sample of `source`, in order, each passed through `keep` as soon
/// as it is read, so only what `keep` returns is held (the trainer keeps
/// a resized copy; a parquet set's full-size images are decoded one row
/// group at a time). Malformed records fail or are skipped per `bad_rows`;
/// the skipped ones are counted in the returned [`Skipped`].
pub fn load_samples(
    source: &DataSource,
    bad_rows: BadRows,
    mut keep: impl FnMut(Sample) -> Sample,
) -> Result<(Vec<Sample>, Skipped), DataError> {
    let mut skipped = Skipped::default();
    let mut samples = Vec::new();
    let mut take = |item: Result<Sample, DataError>| -> Result<(), DataError> {
        if let Some(sample) = bad_rows.filter(item, &mut skipped)? {
            samples.push(keep(sample));
        }
        Ok(())
    };
    match source {
        DataSource::Jsonl(path) => read_jsonl(path)?.try_for_each(&mut take)?,
        DataSource::Parquet(shards) => ParquetDataset::open(shards)?
            .iter()
            .try_for_each(|r| take(r.map(|r| r.sample)))?,
    }
    Ok((samples, skipped))
}

/// The files of `folder` whose names pass `wanted`, sorted by name.
fn list(folder: &Path, wanted: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: folder.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Hidden files: a writer's temporary (`.x.parquet.tmp-1`) or an OS's.
        if !name.starts_with('.') && wanted(&name) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters and `?` for one.
fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Backtracking to the last `*` only: linear in practice, never exponential.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        match p.get(i) {
            Some('*') => {
                star = Some((i, j));
                i += 1;
            }
            Some(&c) if c == '?' || c == n[j] => {
                i += 1;
                j += 1;
            }
            _ => match star {
                Some((si, sj)) => {
                    i = si + 1;
                    j = sj + 1;
                    star = Some((si, sj + 1));
                }
                None => return false,
            },
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::fs::temp_dir;

    #[test]
    fn patterns_match_like_a_shell() {
        for (pattern, name, want) in [
            ("train-*.parquet", "train-00000-of-00002.parquet", true),
            ("train-*.parquet", "test-00000-of-00001.parquet", false),
            ("*.parquet", ".parquet", true),
            ("*", "", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*b*b", "abab", true),
            ("*b*b", "abba", false),
            ("a*", "ba", false),
            ("ü*?", "üx", true),
        ] {
            assert_eq!(matches(pattern, name), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn resolves_files_folders_and_patterns() {
        let dir = temp_dir("source");
        for name in [
            "b-1.parquet",
            "a-2.parquet",
            "a-1.parquet",
            "notes.txt",
            ".a-0.parquet.tmp-1",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.join("sub.parquet")).unwrap();
        let shards = |names: &[&str]| DataSource::Parquet(names.iter().map(|n| dir.join(n)).collect());
        assert_eq!(
            DataSource::resolve(&dir).unwrap(),
            shards(&["a-1.parquet", "a-2.parquet", "b-1.parquet"])
        );
        assert_eq!(
            DataSource::resolve(&dir.join("a-*.parquet")).unwrap(),
            shards(&["a-1.parquet", "a-2.parquet"])
        );
        assert_eq!(
            DataSource::resolve(&dir.join("?-1.parquet")).unwrap(),
            shards(&["a-1.parquet", "b-1.parquet"])
        );
        assert_eq!(
            DataSource::resolve(&dir.join("x.parquet")).unwrap(),
            shards(&["x.parquet"])
        );
        assert_eq!(
            DataSource::resolve(Path::new("d/train.JSONL")).unwrap(),
            DataSource::Jsonl("d/train.JSONL".into())
        );
        for (spec, needle) in [
            (dir.join("c-*.parquet"), "matches no file"),
            (dir.join("*"), "parquet shards (*.parquet) only"),
            (dir.join("*/a.parquet"), "file name only"),
            (dir.join("notes.txt"), "expected a .jsonl file"),
        ] {
            let err = DataSource::resolve(&spec).unwrap_err();
            assert!(matches!(err, DataError::Source { .. }), "{err:?}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        let empty = dir.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(DataSource::resolve(&empty)
            .unwrap_err()
            .to_string()
            .contains("has none"));
        let err = DataSource::resolve(&dir.join("missing/*.parquet")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
