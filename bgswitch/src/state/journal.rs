//! The journal (`journal.jsonl`): one JSON line per change or refused
//! attempt, appended with one fdatasync each and kept whole lines; read
//! line by line for `history` (both parts, after a rotation) and from the
//! end for loading.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::StateError;
use crate::{
    model::{Change, ServiceState},
    paths,
};

/// One line of the journal: a change (or a refused attempt) of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub service: String,
    /// "ok", or "refused: …" for an attempt that changed nothing.
    pub outcome: String,
    #[serde(flatten)]
    pub change: Change,
    /// A change's place in the journal: numbered from 1, one more per change
    /// (refused attempts have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The service's whole state after the change (with its last change):
    /// what loading replays over an older snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ServiceState>,
}

/// Appends one entry to the journal at `path` (one JSON line,
/// fdatasynced). A line left unfinished by a crash is ended first (loading
/// skips it); a failed append is cut off again, so the journal stays whole
/// lines.
pub(super) fn append(path: &Path, entry: &JournalEntry) -> Result<(), StateError> {
    let path = path.to_path_buf();
    let werr = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_vec(entry).map_err(|e| werr(std::io::Error::other(e)))?;
    line.push(b'\n');
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&path)
        .map_err(werr)?;
    let len = f.metadata().map_err(werr)?.len();
    if len > 0 {
        let mut last = [0u8];
        f.read_exact_at(&mut last, len - 1).map_err(werr)?;
        if last[0] != b'\n' {
            line.insert(0, b'\n');
        }
    }
    let written = (&f).write_all(&line).and_then(|()| f.sync_data());
    if let Err(e) = written {
        let _ = f.set_len(len);
        return Err(werr(e));
    }
    Ok(())
}

/// The entries of `service` (all when `None`) in the journal of the state
/// directory `dir`, oldest first: the part rotation moved away
/// (`journal.1.jsonl`), then the journal. The journal is opened first: a
/// rotation between the two opens finds one file twice (read once), never
/// neither.
pub fn read_history(dir: &Path, service: Option<&str>) -> Result<Vec<JournalEntry>, StateError> {
    let current = dir.join(paths::JOURNAL_FILE);
    let rotated = dir.join(paths::JOURNAL_ROTATED_FILE);
    let now = open_existing(&current)?;
    let before = open_existing(&rotated)?;
    let same = match (&now, &before) {
        (Some(a), Some(b)) => same_file(a, b),
        _ => false,
    };
    let mut out = Vec::new();
    if let Some(f) = before {
        read_entries(f, &rotated, service, &mut out)?;
    }
    if let Some(f) = now.filter(|_| !same) {
        read_entries(f, &current, service, &mut out)?;
    }
    Ok(out)
}

/// The file at `path` opened for reading; `None` if there is none.
fn open_existing(path: &Path) -> Result<Option<File>, StateError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.into(),
            source,
        }),
    }
}

fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Appends the entries of `service` in `file` (read from `path`) to `out`.
/// Read line by line (memory for one line, not the file: a journal of a
/// long-running daemon is tens of MB). A line of another service is passed
/// over without being parsed (every line starts with its service), so a
/// service's history costs its own lines, not the whole journal's.
fn read_entries(
    file: File,
    path: &Path,
    service: Option<&str>,
    out: &mut Vec<JournalEntry>,
) -> Result<(), StateError> {
    let rerr = |source| StateError::Read {
        path: path.into(),
        source,
    };
    let prefix = service.map(|s| {
        let name = serde_json::to_string(s).unwrap_or_default();
        format!("{{\"service\":{name},")
    });
    let mut reader = BufReader::with_capacity(JOURNAL_READ_BUFFER, file);
    let mut line = Vec::new();
    for i in 0.. {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(rerr)? == 0 {
            break;
        }
        if prefix
            .as_deref()
            .is_some_and(|p| !line.starts_with(p.as_bytes()))
        {
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            log::warn!(
                "{}:{}: unreadable journal line: not UTF-8",
                path.display(),
                i + 1
            );
            continue;
        };
        if let Some(e) = parse_line(path, i, text.trim_end_matches(['\n', '\r'])) {
            if service.is_none_or(|s| s == e.service) {
                out.push(e);
            }
        }
    }
    Ok(())
}

/// How much of the journal `read_entries` holds at a time.
const JOURNAL_READ_BUFFER: usize = 256 * 1024;

/// The journal's text; empty if there is none yet.
pub(super) fn read_text(path: &Path) -> Result<String, StateError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(StateError::Read {
            path: path.into(),
            source,
        }),
    }
}

/// One journal line; `None` for a blank or unreadable one (logged, but for
/// a line cut short: a crash's, or the one being written).
pub(super) fn parse_line(path: &Path, i: usize, line: &str) -> Option<JournalEntry> {
    if line.trim().is_empty() {
        return None;
    }
    match serde_json::from_str::<JournalEntry>(line) {
        Ok(e) => Some(e),
        Err(e) if e.is_eof() => None,
        Err(e) => {
            log::warn!("{}:{}: unreadable journal line: {e}", path.display(), i + 1);
            None
        }
    }
}

/// The sequence number of a journal line, read without parsing the line:
/// the top-level `"seq":N` (inside strings a quote is escaped, so the text
/// cannot stand there; the recorded state has no such field).
pub(super) fn line_seq(line: &str) -> Option<u64> {
    let at = line.rfind("\"seq\":")? + 6;
    let digits = line[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}
