//! The durable desired state and the lock that keeps a second daemon out.
//!
//! Two files in the state directory (and the journal's rotated part):
//! - `journal.jsonl`, appended with one fdatasync per line: every change of a
//!   service (with the service's whole state after it and a sequence number)
//!   and every refused attempt. A change is durable once its line is.
//! - `state.json`, a snapshot of the whole desired state with the sequence
//!   number of the last journal line it includes, replaced atomically (write a
//!   temporary file, fsync, rename, fsync the directory) off the request path;
//!   the periodic one on a thread of its own, and never over a later one.
//!
//! Loading reads the snapshot and replays the journal's later lines, so a
//! change acknowledged before a crash is kept even if no snapshot followed.
//! Past a size, once the snapshot includes all of it, the journal is moved
//! to `journal.1.jsonl` (replacing the part there): loading never needs that
//! part, and `history` reads both.

use std::{
    cell::Cell,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    model::{Change, DesiredState, ServiceState},
    paths,
};

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;

/// The snapshot file: read as `StateFile<DesiredState>`, written from a
/// borrowed state (no copy of every service to serialise it).
#[derive(Serialize, Deserialize)]
struct StateFile<S> {
    version: u32,
    /// The sequence number of the last journal line this snapshot includes
    /// (0: none; files written before the journal carried states).
    #[serde(default)]
    journal_seq: u64,
    #[serde(flatten)]
    state: S,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a bgswitch state file ({reason}); refusing to start on a guessed colour — \
         fix or move the file aside"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is missing, but {journal} records changes: a daemon ran here before, and \
         starting afresh would put every service back on blue; refusing to guess — restore the \
         state file (or, to start afresh on purpose, move the journal aside)"
    )]
    Missing { path: PathBuf, journal: PathBuf },
    #[error("another bgswitch daemon holds {path} (pid {pid})")]
    Locked { path: PathBuf, pid: String },
}

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

/// The state directory and its files.
#[derive(Debug)]
pub struct StateStore {
    /// The sequence number of the last change journalled.
    last_seq: Cell<u64>,
    /// When the last change was journalled.
    last_change: Cell<Option<Instant>>,
    /// The number the next snapshot is given: a snapshot replaces the file
    /// only if no later one is there (they may be written out of order).
    next_ticket: Cell<u64>,
    /// The state directory, with the snapshot's writers.
    snapshots: Arc<Snapshots>,
}

/// The snapshot file's writers: the loop (`save`) and a thread it starts
/// (`save_in_background`).
#[derive(Debug)]
struct Snapshots {
    /// The state directory.
    dir: PathBuf,
    /// Held while a snapshot is written; the ticket of the newest written.
    written: Mutex<u64>,
    /// The sequence number the newest snapshot written includes.
    saved_seq: AtomicU64,
    /// A snapshot is being written off the loop.
    busy: AtomicBool,
    /// The last snapshot failed (logged once until one works again).
    failing: AtomicBool,
    /// The journal part a rotation replaced is being removed off the loop.
    retiring: AtomicBool,
}

impl StateStore {
    /// Creates the directory (mode 0750) if needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.into(),
            source,
        })?;
        Ok(Self {
            last_seq: Cell::new(0),
            last_change: Cell::new(None),
            next_ticket: Cell::new(0),
            snapshots: Arc::new(Snapshots {
                dir: dir.into(),
                written: Mutex::new(0),
                saved_seq: AtomicU64::new(0),
                busy: AtomicBool::new(false),
                failing: AtomicBool::new(false),
                retiring: AtomicBool::new(false),
            }),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.snapshots.dir.join(paths::STATE_FILE)
    }

    /// Reads the snapshot (a missing file is an empty state: first start,
    /// unless a journal is there) and replays the journal's changes it does
    /// not include yet.
    pub fn load(&self) -> Result<DesiredState, StateError> {
        let Some((mut state, snapshot_seq)) = self.load_snapshot()? else {
            // Every daemon writes the snapshot at start, before any journal
            // line: a journal without one means the file was lost.
            for name in [paths::JOURNAL_FILE, paths::JOURNAL_ROTATED_FILE] {
                let journal = self.snapshots.dir.join(name);
                if fs::metadata(&journal).is_ok_and(|m| m.len() > 0) {
                    return Err(StateError::Missing {
                        path: self.path(),
                        journal,
                    });
                }
            }
            return Ok(DesiredState::default());
        };
        let path = self.journal_path();
        let text = read_text(&path)?;
        // Numbers only grow along the file, so the changes to replay are the
        // lines after the last one numbered within the snapshot: found from
        // the end, without parsing the lines before them.
        let lines: Vec<&str> = text.lines().collect();
        let last_seen = lines.iter().rev().find_map(|l| line_seq(l)).unwrap_or(0);
        let start = lines
            .iter()
            .rposition(|l| line_seq(l).is_some_and(|n| n <= snapshot_seq))
            .map_or(0, |i| i + 1);
        let mut last = snapshot_seq.max(last_seen);
        let (mut replayed, mut skipped) = (0, 0);
        for (i, line) in lines.iter().enumerate().skip(start) {
            let Some(entry) = parse_line(&path, i, line) else {
                continue;
            };
            let (Some(seq), Some(after)) = (entry.seq, entry.state) else {
                continue;
            };
            last = last.max(seq);
            if seq <= snapshot_seq {
                continue;
            }
            let Some(now) = state.services.get_mut(&entry.service) else {
                skipped += 1;
                continue;
            };
            *now = after;
            replayed += 1;
        }
        if skipped > 0 {
            log::warn!(
                "{}: {skipped} changes after the snapshot are of services it does not have; skipped",
                self.journal_path().display()
            );
        }
        if replayed > 0 {
            log::info!(
                "{}: {replayed} changes journalled after it (numbers {} to {last}) replayed from {}",
                self.path().display(),
                snapshot_seq + 1,
                self.journal_path().display()
            );
        }
        self.last_seq.set(last);
        self.snapshots
            .saved_seq
            .store(if replayed > 0 { snapshot_seq } else { last }, SeqCst);
        Ok(state)
    }

    /// The snapshot and the number of the last change it includes; `None`
    /// if there is no snapshot file.
    fn load_snapshot(&self) -> Result<Option<(DesiredState, u64)>, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let file: StateFile<DesiredState> =
            serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if file.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!(
                    "version {} (this daemon reads {STATE_VERSION})",
                    file.version
                ),
            });
        }
        Ok(Some((file.state, file.journal_seq)))
    }

    /// Replaces the snapshot atomically with `state`, which must include
    /// every change journalled so far; on error the old file is intact. Waits
    /// for a snapshot being written in the background, if any.
    pub fn save(&self, state: &DesiredState) -> Result<(), StateError> {
        let (ticket, seq) = (self.ticket(), self.last_seq.get());
        self.snapshots.write(ticket, seq, state)
    }

    /// Like `save`, on a thread of its own, for the loop's periodic
    /// snapshot: the loop pays for the copy of `state` it passes, not for
    /// serialising and three fsyncs. A later `save` wins over it whichever
    /// finishes first. `None` if one is still being written (try again
    /// later). Errors are logged (once until a snapshot works again); the
    /// journal keeps the changes meanwhile.
    pub fn save_in_background(&self, state: DesiredState) -> Option<std::thread::JoinHandle<()>> {
        if self.snapshots.busy.swap(true, SeqCst) {
            return None;
        }
        let (ticket, seq) = (self.ticket(), self.last_seq.get());
        let snapshots = Arc::clone(&self.snapshots);
        let spawned = std::thread::Builder::new()
            .name("bgswitch-snapshot".into())
            .spawn(move || {
                let r = snapshots.write(ticket, seq, &state);
                snapshots.report(&r);
                snapshots.busy.store(false, SeqCst);
            });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                self.snapshots.busy.store(false, SeqCst);
                self.snapshots.report(&Err(StateError::Write {
                    path: self.path(),
                    source: e,
                }));
                None
            }
        }
    }

    fn ticket(&self) -> u64 {
        let t = self.next_ticket.get() + 1;
        self.next_ticket.set(t);
        t
    }

    /// Whether the snapshot lacks journalled changes and none came for
    /// `quiet` (or `most` are waiting): time to `save`, off a request's path.
    pub fn snapshot_due(&self, quiet: Duration, most: u64) -> bool {
        let waiting = self
            .last_seq
            .get()
            .saturating_sub(self.snapshots.saved_seq.load(SeqCst));
        waiting > 0
            && (waiting >= most || self.last_change.get().is_none_or(|t| t.elapsed() >= quiet))
    }

    pub fn journal_path(&self) -> PathBuf {
        self.snapshots.dir.join(paths::JOURNAL_FILE)
    }

    /// The state directory (`read_history` reads the journal's parts there).
    pub fn dir(&self) -> &Path {
        &self.snapshots.dir
    }

    /// Moves the journal to `journal.1.jsonl` (replacing the part there)
    /// once it is longer than `max` bytes and the snapshot includes every
    /// change in it, so loading never needs the part moved away; `history`
    /// reads both. Called on the loop, where appends are made, so no line
    /// lands in the part being moved. Returns the size moved, if it moved.
    pub fn rotate_journal(&self, max: u64) -> Result<Option<u64>, StateError> {
        if self.snapshots.saved_seq.load(SeqCst) < self.last_seq.get()
            || self.snapshots.retiring.load(SeqCst)
        {
            return Ok(None);
        }
        let path = self.journal_path();
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        if len <= max {
            return Ok(None);
        }
        // The part moved away before is not unlinked here: freeing a file
        // of tens of MB took 15-20 ms on this disk. It gets a second name
        // first, so the rename drops only one of its links; a thread of its
        // own unlinks it and syncs the directory.
        let dir = &self.snapshots.dir;
        let to = dir.join(paths::JOURNAL_ROTATED_FILE);
        let retired = dir.join(format!("{}.old", paths::JOURNAL_ROTATED_FILE));
        let found = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        // One left by a crash is removed here (rare).
        found(fs::remove_file(&retired))
            .and_then(|()| found(fs::hard_link(&to, &retired)))
            .map_err(|source| StateError::Write {
                path: retired.clone(),
                source,
            })?;
        fs::rename(&path, &to).map_err(|source| StateError::Write {
            path: to.clone(),
            source,
        })?;
        self.snapshots.retiring.store(true, SeqCst);
        let snapshots = Arc::clone(&self.snapshots);
        let spawned = std::thread::Builder::new()
            .name("bgswitch-retire".into())
            .spawn(move || {
                let r = found(fs::remove_file(&retired))
                    .and_then(|()| File::open(&snapshots.dir)?.sync_all());
                if let Err(e) = r {
                    log::warn!("journal rotation: removing {}: {e}", retired.display());
                }
                snapshots.retiring.store(false, SeqCst);
            });
        if spawned.is_err() {
            self.snapshots.retiring.store(false, SeqCst);
        }
        Ok(Some(len))
    }

    /// Journals a change of `service` with its whole state after it: one
    /// line, fdatasynced. The change is durable when this returns Ok; the
    /// snapshot follows later (`snapshot_due`).
    pub fn append_change(
        &self,
        service: &str,
        change: &Change,
        after: &ServiceState,
    ) -> Result<u64, StateError> {
        self.append_state(service, "ok".into(), change, after)
    }

    /// Journals that a journalled change did not happen after all (the data
    /// plane refused it): `before` is the service's state again.
    pub fn append_revert(
        &self,
        service: &str,
        why: &str,
        change: &Change,
        before: &ServiceState,
    ) -> Result<u64, StateError> {
        self.append_state(service, format!("reverted: {why}"), change, before)
    }

    fn append_state(
        &self,
        service: &str,
        outcome: String,
        change: &Change,
        state: &ServiceState,
    ) -> Result<u64, StateError> {
        let seq = self.last_seq.get() + 1;
        self.append_journal(&JournalEntry {
            service: service.to_string(),
            outcome,
            change: change.clone(),
            seq: Some(seq),
            state: Some(state.clone()),
        })?;
        self.last_seq.set(seq);
        self.last_change.set(Some(Instant::now()));
        Ok(seq)
    }

    /// Appends one entry to the journal (one JSON line, fdatasynced). A line
    /// left unfinished by a crash is ended first (loading skips it); a failed
    /// append is cut off again, so the journal stays whole lines.
    pub fn append_journal(&self, entry: &JournalEntry) -> Result<(), StateError> {
        let path = self.journal_path();
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

    /// The journal entries of `service` (all services when `None`), oldest
    /// first. Unreadable lines are skipped and reported in the log.
    pub fn read_journal(&self, service: Option<&str>) -> Result<Vec<JournalEntry>, StateError> {
        read_history(&self.snapshots.dir, service)
    }

    /// The kernel tick rate kept by `keep_tick_rate` for the boot `boot_id`,
    /// if that is this file's boot (anything else, or no file: `None`).
    pub fn kept_tick_rate(&self, boot_id: &str) -> Option<u64> {
        let text = fs::read_to_string(self.snapshots.dir.join(paths::TICK_RATE_FILE)).ok()?;
        let mut words = text.split_whitespace();
        let (boot, hz) = (words.next()?, words.next()?);
        if boot != boot_id || words.next().is_some() {
            return None;
        }
        hz.parse().ok()
    }

    /// Keeps the tick rate measured in the boot `boot_id` for the next
    /// start in the same boot (best effort: the rate can be measured again).
    pub fn keep_tick_rate(&self, boot_id: &str, hz: u64) -> Result<(), StateError> {
        let path = self.snapshots.dir.join(paths::TICK_RATE_FILE);
        let tmp = self
            .snapshots
            .dir
            .join(format!("{}.tmp", paths::TICK_RATE_FILE));
        fs::write(&tmp, format!("{boot_id} {hz}\n"))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| StateError::Write { path, source })
    }

    /// Takes the daemon lock (an exclusive `flock` held for the process's
    /// life). A second daemon on the same state directory gets `Locked`.
    pub fn lock(&self) -> Result<File, StateError> {
        let path = self.snapshots.dir.join(paths::LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&path)
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a valid, owned fd.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let pid = fs::read_to_string(&path).unwrap_or_default();
            return Err(StateError::Locked {
                path,
                pid: pid.trim().to_string(),
            });
        }
        f.set_len(0).ok();
        let _ = writeln!(f, "{}", std::process::id());
        Ok(f)
    }
}

impl Snapshots {
    /// Writes the snapshot of `state`, which includes the journal up to
    /// `seq`, unless a snapshot with a later ticket is already in place.
    fn write(&self, ticket: u64, seq: u64, state: &DesiredState) -> Result<(), StateError> {
        let path = self.dir.join(paths::STATE_FILE);
        let tmp = self.dir.join(format!("{}.tmp", paths::STATE_FILE));
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&StateFile {
            version: STATE_VERSION,
            journal_seq: seq,
            state,
        })
        .map_err(|e| werr(std::io::Error::other(e)))?;
        let mut newest = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        if *newest > ticket {
            // A later state is in place already.
            return Ok(());
        }
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        } else {
            *newest = ticket;
            self.saved_seq.fetch_max(seq, SeqCst);
        }
        result.map_err(werr)
    }

    /// Logs a failed snapshot once, and the first that works after it.
    fn report(&self, r: &Result<(), StateError>) {
        match r {
            Err(e) if !self.failing.swap(true, SeqCst) => {
                log::error!("snapshot: {e}; changes are kept in the journal until one is written")
            }
            Ok(()) if self.failing.swap(false, SeqCst) => log::info!("snapshot: written again"),
            _ => {}
        }
    }
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
fn read_text(path: &Path) -> Result<String, StateError> {
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
fn parse_line(path: &Path, i: usize, line: &str) -> Option<JournalEntry> {
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
fn line_seq(line: &str) -> Option<u64> {
    let at = line.rfind("\"seq\":")? + 6;
    let digits = line[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Colour, ServiceState};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bgswitch-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_missing_and_corrupt() {
        let d = tmpdir("rt");
        let store = StateStore::open(&d).unwrap();
        assert_eq!(store.load().unwrap(), DesiredState::default());
        let mut s = DesiredState::default();
        s.services.insert(
            "web".into(),
            ServiceState {
                id: 3,
                active: Colour::Green,
                generation: 7,
                previous: Some(Colour::Blue),
                canary_bp: 250,
                preview: vec!["198.18.0.0/24".into()],
                watch: None,
                confirm: Some(crate::model::Confirm {
                    colour: Colour::Green,
                    deadline_ms: 99,
                }),
                rolled_back: None,
                flips: 1,
                rollbacks: 0,
                history: vec![],
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!d.join("state.json.tmp").exists());
        fs::write(store.path(), "{ not json").unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("refusing to start"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn journal_appends_and_filters() {
        let d = tmpdir("journal");
        let store = StateStore::open(&d).unwrap();
        assert!(store.read_journal(None).unwrap().is_empty());
        let mut st = DesiredState::default();
        let cfg = crate::config::parse(
            Path::new("t"),
            "interfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"1.1.1.1:1\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:1\"]\ngreen=[\"1.1.1.3:1\"]\n[[service]]\nname=\"b\"\nvip=\"1.1.1.1:2\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:2\"]\ngreen=[\"1.1.1.3:2\"]\n",
        )
        .unwrap();
        st.reconcile(cfg.service_names()).unwrap();
        let req = crate::model::Request::default();
        for name in ["a", "b", "a"] {
            let crate::model::FlipOutcome::Changed(change) =
                st.flip(name, None, &req, &Default::default()).unwrap()
            else {
                panic!()
            };
            store
                .append_journal(&JournalEntry {
                    service: name.into(),
                    outcome: "ok".into(),
                    change,
                    seq: None,
                    state: None,
                })
                .unwrap();
        }
        fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap()
            .write_all(b"garbage line\n")
            .unwrap();
        assert_eq!(store.read_journal(None).unwrap().len(), 3);
        let a = store.read_journal(Some("a")).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].change.generation, 3);
        fs::remove_dir_all(&d).unwrap();
    }

    fn two_services() -> DesiredState {
        let cfg = crate::config::parse(
            Path::new("t"),
            "interfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"1.1.1.1:1\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:1\"]\ngreen=[\"1.1.1.3:1\"]\n[[service]]\nname=\"b\"\nvip=\"1.1.1.1:2\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:2\"]\ngreen=[\"1.1.1.3:2\"]\n",
        )
        .unwrap();
        let mut st = DesiredState::default();
        st.reconcile(cfg.service_names()).unwrap();
        st
    }

    /// Flips `name` in `st` and journals it as the daemon does.
    fn flip_journalled(store: &StateStore, st: &mut DesiredState, name: &str) -> Change {
        let req = crate::model::Request {
            user: "t".into(),
            ..Default::default()
        };
        let crate::model::FlipOutcome::Changed(change) =
            st.flip(name, None, &req, &Default::default()).unwrap()
        else {
            panic!()
        };
        store
            .append_change(name, &change, st.service(name).unwrap())
            .unwrap();
        change
    }

    #[test]
    fn changes_after_the_snapshot_are_replayed_from_the_journal() {
        let d = tmpdir("replay");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        flip_journalled(&store, &mut st, "a");
        store.save(&st).unwrap();
        let snapshot = fs::read(store.path()).unwrap();
        assert!(!store.snapshot_due(Duration::ZERO, 1));
        // Acknowledged, journalled, not in the snapshot yet.
        flip_journalled(&store, &mut st, "a");
        flip_journalled(&store, &mut st, "b");
        assert!(store.snapshot_due(Duration::ZERO, 100));
        assert!(!store.snapshot_due(Duration::from_secs(60), 100));
        assert!(store.snapshot_due(Duration::from_secs(60), 2));
        assert_eq!(fs::read(store.path()).unwrap(), snapshot);
        // A crash in the middle of the next line.
        fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap()
            .write_all(b"{\"service\":\"a\",\"outcome\":\"ok\",\"kind\":\"fl")
            .unwrap();

        let again = StateStore::open(&d).unwrap();
        let loaded = again.load().unwrap();
        assert_eq!(loaded, st, "history and every field replayed");
        assert_eq!(loaded.services["a"].generation, 3);
        assert_eq!(loaded.services["a"].history.len(), 1);
        assert!(again.snapshot_due(Duration::ZERO, 1));
        // The next change ends the torn line and numbers on.
        let mut st2 = loaded.clone();
        flip_journalled(&again, &mut st2, "b");
        assert_eq!(
            again.read_journal(None).unwrap().last().unwrap().seq,
            Some(4)
        );
        let third = StateStore::open(&d).unwrap();
        assert_eq!(third.load().unwrap(), st2);
        // A snapshot that includes them all: nothing is replayed twice.
        third.save(&st2).unwrap();
        assert!(!third.snapshot_due(Duration::ZERO, 1));
        assert_eq!(StateStore::open(&d).unwrap().load().unwrap(), st2);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_snapshot_never_replaces_a_later_one_and_the_background_one_lands() {
        let d = tmpdir("order");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        flip_journalled(&store, &mut st, "a");
        let (older, ticket, seq) = (st.clone(), store.ticket(), store.last_seq.get());
        flip_journalled(&store, &mut st, "b");
        store.save(&st).unwrap();
        // The earlier snapshot finishes last (its thread was slow): it must
        // not put the older state back.
        store.snapshots.write(ticket, seq, &older).unwrap();
        assert_eq!(store.load_snapshot().unwrap(), Some((st.clone(), 2)));

        flip_journalled(&store, &mut st, "a");
        assert!(store.snapshot_due(Duration::ZERO, 1));
        store.snapshots.busy.store(true, SeqCst);
        assert!(
            store.save_in_background(st.clone()).is_none(),
            "one at a time"
        );
        store.snapshots.busy.store(false, SeqCst);
        store
            .save_in_background(st.clone())
            .unwrap()
            .join()
            .unwrap();
        assert!(!store.snapshot_due(Duration::ZERO, 1));
        assert_eq!(store.load_snapshot().unwrap(), Some((st.clone(), 3)));

        // A snapshot that cannot be written leaves the changes due.
        flip_journalled(&store, &mut st, "b");
        let tmp = d.join("state.json.tmp");
        fs::create_dir(&tmp).unwrap();
        store
            .save_in_background(st.clone())
            .unwrap()
            .join()
            .unwrap();
        assert!(store.snapshot_due(Duration::ZERO, 1));
        assert_eq!(store.load_snapshot().unwrap().unwrap().1, 3);
        fs::remove_dir(&tmp).unwrap();
        store
            .save_in_background(st.clone())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(store.load_snapshot().unwrap(), Some((st, 4)));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_revert_record_restores_the_state_and_its_history() {
        let d = tmpdir("revert");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        flip_journalled(&store, &mut st, "a");
        store.save(&st).unwrap();
        let before = st.clone();
        let change = flip_journalled(&store, &mut st, "a");
        store
            .append_revert(
                "a",
                "data plane: test",
                &change,
                before.service("a").unwrap(),
            )
            .unwrap();
        let loaded = StateStore::open(&d).unwrap().load().unwrap();
        assert_eq!(loaded, before);
        let j = store.read_journal(Some("a")).unwrap();
        assert_eq!(j.last().unwrap().outcome, "reverted: data plane: test");
        // The last change (what status shows and undo restores) is the one
        // before the reverted one; a new change takes its generation again.
        let first = store.read_journal(Some("a")).unwrap()[0].change.clone();
        assert_eq!(loaded.services["a"].history, [first]);
        let mut st = before;
        let again = flip_journalled(&store, &mut st, "a");
        assert_eq!(again.generation, change.generation);
        let loaded = StateStore::open(&d).unwrap().load().unwrap();
        assert_eq!(loaded.services["a"].history, [again]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_rotated_journal_goes_on_numbering_after_the_snapshot() {
        let d = tmpdir("rotate");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        for _ in 0..3 {
            flip_journalled(&store, &mut st, "a");
        }
        store.save(&st).unwrap();
        // Moved away by hand (the snapshot has all of it); a new daemon
        // starts an empty one.
        fs::rename(store.journal_path(), d.join("journal.jsonl.1")).unwrap();
        let again = StateStore::open(&d).unwrap();
        let mut st2 = again.load().unwrap();
        assert_eq!(st2, st);
        flip_journalled(&again, &mut st2, "a");
        assert_eq!(again.read_journal(None).unwrap()[0].seq, Some(4));
        assert_eq!(StateStore::open(&d).unwrap().load().unwrap(), st2);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_daemon_rotates_a_long_journal_once_the_snapshot_has_it_and_history_reads_both() {
        let d = tmpdir("selfrotate");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        store.save(&st).unwrap();
        for _ in 0..4 {
            flip_journalled(&store, &mut st, "a");
        }
        let len = fs::metadata(store.journal_path()).unwrap().len();
        // Long enough, but the snapshot lacks the changes: not yet.
        assert_eq!(store.rotate_journal(len - 1).unwrap(), None);
        store.save(&st).unwrap();
        assert_eq!(
            store.rotate_journal(len).unwrap(),
            None,
            "not longer than max"
        );
        assert_eq!(store.rotate_journal(len - 1).unwrap(), Some(len));
        assert!(!store.journal_path().exists());
        let rotated = d.join(paths::JOURNAL_ROTATED_FILE);
        assert_eq!(fs::metadata(&rotated).unwrap().len(), len);
        assert_eq!(store.rotate_journal(0).unwrap(), None, "no journal");
        flip_journalled(&store, &mut st, "a");
        flip_journalled(&store, &mut st, "b");
        // History: the part moved away, then the journal, in order.
        let seqs = |h: Vec<JournalEntry>| h.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>();
        assert_eq!(seqs(store.read_journal(None).unwrap()), [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            seqs(store.read_journal(Some("a")).unwrap()),
            [1, 2, 3, 4, 5]
        );
        // A restart replays the journal over the snapshot: the moved part
        // is not needed, and numbering goes on.
        let again = StateStore::open(&d).unwrap();
        let mut st2 = again.load().unwrap();
        assert_eq!(st2, st);
        flip_journalled(&again, &mut st2, "b");
        assert_eq!(
            seqs(again.read_journal(None).unwrap()),
            [1, 2, 3, 4, 5, 6, 7]
        );
        // The next rotation replaces the moved part: two parts at most. The
        // replaced part is removed off the caller's thread; one a crash
        // left is removed first.
        let retired = d.join(format!("{}.old", paths::JOURNAL_ROTATED_FILE));
        fs::write(&retired, "left by a crash").unwrap();
        again.save(&st2).unwrap();
        assert!(again.rotate_journal(1).unwrap().is_some());
        assert_eq!(seqs(again.read_journal(None).unwrap()), [5, 6, 7]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while retired.exists() || again.snapshots.retiring.load(SeqCst) {
            assert!(Instant::now() < deadline, "the replaced part stays");
            std::thread::sleep(Duration::from_millis(10));
        }
        flip_journalled(&again, &mut st2, "a");
        // A rotation between history's two opens: one file under both
        // names, read once.
        fs::remove_file(&rotated).unwrap();
        fs::hard_link(again.journal_path(), &rotated).unwrap();
        assert_eq!(seqs(again.read_journal(None).unwrap()), [8]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_lost_snapshot_beside_a_journal_is_refused_not_taken_for_a_first_start() {
        let d = tmpdir("lost");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        store.save(&st).unwrap();
        flip_journalled(&store, &mut st, "a");
        fs::remove_file(store.path()).unwrap();
        let e = StateStore::open(&d).unwrap().load().unwrap_err();
        assert!(matches!(e, StateError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("refusing to guess"), "{e}");
        // Only the rotated part left: the same.
        fs::rename(store.journal_path(), d.join(paths::JOURNAL_ROTATED_FILE)).unwrap();
        let e = StateStore::open(&d).unwrap().load().unwrap_err();
        assert!(matches!(e, StateError::Missing { .. }), "{e}");
        // Moved aside on purpose: a first start.
        fs::remove_file(d.join(paths::JOURNAL_ROTATED_FILE)).unwrap();
        assert_eq!(
            StateStore::open(&d).unwrap().load().unwrap(),
            DesiredState::default()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_tick_rate_is_kept_for_its_own_boot_only() {
        let d = tmpdir("tick");
        let store = StateStore::open(&d).unwrap();
        assert_eq!(store.kept_tick_rate("boot-a"), None, "no file");
        store.keep_tick_rate("boot-a", 250).unwrap();
        assert_eq!(store.kept_tick_rate("boot-a"), Some(250));
        assert_eq!(store.kept_tick_rate("boot-b"), None, "another boot");
        for junk in ["", "boot-a", "boot-a x", "boot-a 250 1"] {
            fs::write(d.join(paths::TICK_RATE_FILE), junk).unwrap();
            assert_eq!(store.kept_tick_rate("boot-a"), None, "{junk:?}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_append_leaves_whole_lines() {
        let d = tmpdir("failappend");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        flip_journalled(&store, &mut st, "a");
        let len = fs::metadata(store.journal_path()).unwrap().len();
        // A line the file system refuses: a directory where the journal is.
        fs::rename(store.journal_path(), d.join("j")).unwrap();
        fs::create_dir(store.journal_path()).unwrap();
        let req = crate::model::Request::default();
        let mut st2 = st.clone();
        let crate::model::FlipOutcome::Changed(change) =
            st2.flip("a", None, &req, &Default::default()).unwrap()
        else {
            panic!()
        };
        assert!(store
            .append_change("a", &change, st2.service("a").unwrap())
            .is_err());
        fs::remove_dir(store.journal_path()).unwrap();
        fs::rename(d.join("j"), store.journal_path()).unwrap();
        assert_eq!(fs::metadata(store.journal_path()).unwrap().len(), len);
        // The failed change took no number.
        flip_journalled(&store, &mut st, "a");
        let j = store.read_journal(None).unwrap();
        assert_eq!(
            j.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [Some(1), Some(2)]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_service_reads_its_own_lines_and_numbers_are_read_without_parsing() {
        let d = tmpdir("own");
        let store = StateStore::open(&d).unwrap();
        let mut st = two_services();
        flip_journalled(&store, &mut st, "a");
        flip_journalled(&store, &mut st, "b");
        flip_journalled(&store, &mut st, "a");
        let a = store.read_journal(Some("a")).unwrap();
        assert_eq!(
            a.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [Some(1), Some(3)]
        );
        assert_eq!(store.read_journal(Some("")).unwrap(), []);
        // A name that starts with another's.
        let mut ab = a[0].clone();
        ab.service = "ab".into();
        ab.seq = Some(4);
        // A reason that spells the field inside a string cannot fool it.
        ab.change.reason = Some("\"seq\":99".into());
        store.append_journal(&ab).unwrap();
        assert_eq!(store.read_journal(Some("a")).unwrap().len(), 2);
        assert_eq!(store.read_journal(Some("ab")).unwrap(), [ab.clone()]);
        let text = fs::read_to_string(store.journal_path()).unwrap();
        let seqs: Vec<Option<u64>> = text.lines().map(line_seq).collect();
        assert_eq!(seqs, [Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(
            line_seq("{\"service\":\"a\",\"outcome\":\"refused: x\"}"),
            None
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn second_lock_is_refused() {
        let d = tmpdir("lock");
        let store = StateStore::open(&d).unwrap();
        let held = store.lock().unwrap();
        let e = store.lock().unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(held);
        store.lock().unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
