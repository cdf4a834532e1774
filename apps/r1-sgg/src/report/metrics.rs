//! Training metrics as JSON Lines: one JSON object per line, written as the run
//! goes (each line reaches the OS before `write` returns), and read back to
//! plot a run's history, resumed runs included.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An open JSONL metrics file that records are appended to, one per line.
pub struct MetricsLog {
    file: File,
    line: Vec<u8>,
}

impl MetricsLog {
    /// Creates the log at `path`, emptying any file already there (a new run).
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::create(path)?,
            line: Vec::new(),
        })
    }

    /// Opens the log at `path` to add records after those already there (a
    /// resumed run), creating it if missing. A last line cut short by a crash
    /// is dropped first, so that the next record starts on a line of its own.
    pub fn append(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let keep = complete_len(&mut file)?;
        if keep < file.metadata()?.len() {
            file.set_len(keep)?;
        }
        Ok(Self {
            file,
            line: Vec::new(),
        })
    }

    /// Writes `record` as one JSON line and hands it to the OS. The line is
    /// written with a single call, so a record that fails to serialize leaves
    /// nothing behind.
    pub fn write<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, record)?;
        self.line.push(b'\n');
        self.file.write_all(&self.line)?;
        self.file.flush()
    }

    /// Reads every record of the log at `path`, in order. Blank lines are
    /// skipped, and so is a last line without its newline that does not
    /// parse (a write cut short by a crash); any other bad line is an
    /// [`io::ErrorKind::InvalidData`] error naming its line number.
    pub fn read<T: DeserializeOwned>(path: &Path) -> io::Result<Vec<T>> {
        let bytes = std::fs::read(path)?;
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let mut records = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            if line.trim_ascii().is_empty() {
                continue;
            }
            match serde_json::from_slice(line) {
                Ok(record) => records.push(record),
                // The last piece has no newline after it: an unfinished write.
                Err(_) if i + 1 == lines.len() => break,
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}:{}: {e}", path.display(), i + 1),
                    ))
                }
            }
        }
        Ok(records)
    }
}

/// The length of `file` up to and including its last newline (0 if it has none).
fn complete_len(file: &mut File) -> io::Result<u64> {
    let mut end = file.metadata()?.len();
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let piece = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(piece)?;
        if let Some(at) = piece.iter().rposition(|&b| b == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::path::PathBuf;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Step {
        step: usize,
        reward: f64,
        phase: String,
    }

    fn step(i: usize) -> Step {
        Step {
            step: i,
            reward: i as f64 / 4.0,
            phase: if i.is_multiple_of(2) { "sft" } else { "grpo" }.to_string(),
        }
    }

    fn clean(path: &Path) {
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// A fresh path in a scratch directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("r1_sgg_metrics_{}_{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("metrics.jsonl")
    }

    #[test]
    fn records_round_trip_one_per_line() {
        let path = scratch("round_trip");
        let mut log = MetricsLog::create(&path).unwrap();
        for i in 0..5 {
            log.write(&step(i)).unwrap();
            // Each record is on disk as soon as it is written.
            assert_eq!(MetricsLog::read::<Step>(&path).unwrap().len(), i + 1);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5);
        assert!(text.ends_with('\n'));
        let back: Vec<Step> = MetricsLog::read(&path).unwrap();
        assert_eq!(back, (0..5).map(step).collect::<Vec<_>>());
        // `create` starts over.
        MetricsLog::create(&path).unwrap().write(&step(9)).unwrap();
        assert_eq!(MetricsLog::read::<Step>(&path).unwrap(), vec![step(9)]);
        clean(&path);
    }

    #[test]
    fn append_continues_a_log_and_creates_a_missing_one() {
        let path = scratch("append");
        let mut log = MetricsLog::append(&path).unwrap();
        log.write(&step(0)).unwrap();
        log.write(&step(1)).unwrap();
        drop(log);
        let mut log = MetricsLog::append(&path).unwrap();
        log.write(&step(2)).unwrap();
        let back: Vec<Step> = MetricsLog::read(&path).unwrap();
        assert_eq!(back, (0..3).map(step).collect::<Vec<_>>());
        clean(&path);
    }

    #[test]
    fn a_truncated_last_line_is_ignored_and_dropped_on_append() {
        let path = scratch("truncated");
        let mut log = MetricsLog::create(&path).unwrap();
        log.write(&step(0)).unwrap();
        log.write(&step(1)).unwrap();
        drop(log);
        // A crash in the middle of writing step 2 (cut inside a multi-byte
        // character, too).
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"step\":2,\"reward\":0.5,\"phase\":\"gr\xc3")
            .unwrap();
        drop(file);
        let back: Vec<Step> = MetricsLog::read(&path).unwrap();
        assert_eq!(back, vec![step(0), step(1)]);
        // Resuming drops the partial line, so later records stay readable.
        let mut log = MetricsLog::append(&path).unwrap();
        log.write(&step(2)).unwrap();
        let back: Vec<Step> = MetricsLog::read(&path).unwrap();
        assert_eq!(back, (0..3).map(step).collect::<Vec<_>>());
        // A log that is nothing but a partial line reads as empty.
        std::fs::write(&path, b"{\"step\":").unwrap();
        assert!(MetricsLog::read::<Step>(&path).unwrap().is_empty());
        MetricsLog::append(&path).unwrap().write(&step(4)).unwrap();
        assert_eq!(MetricsLog::read::<Step>(&path).unwrap(), vec![step(4)]);
        clean(&path);
    }

    #[test]
    fn a_bad_line_before_the_end_is_an_error() {
        let path = scratch("corrupt");
        std::fs::write(
            &path,
            "{\"step\":0,\"reward\":0.0,\"phase\":\"sft\"}\nnot json\n\n",
        )
        .unwrap();
        let err = MetricsLog::read::<Step>(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(":2:"), "{err}");
        let missing = scratch("missing");
        assert!(MetricsLog::read::<Step>(&missing).is_err());
        clean(&path);
        clean(&missing);
    }
}
