//! The desired state kept in the state directory: the journal and the
//! snapshot (see the module's face for their rules), the store a daemon
//! without a fleet uses.

use std::{
    cell::Cell,
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    journal::{self, line_seq, parse_line, read_history, read_text, JournalEntry},
    snapshot::{load_snapshot, Snapshots},
    DesiredStore, ExternalChange, HistoryReader, StateError,
};
use crate::{
    config::Config,
    model::{Change, DesiredState, ServiceState},
    paths,
};

/// The state directory and its files.
#[derive(Debug)]
pub struct LocalStore {
    /// The sequence number of the last change journalled.
    pub(super) last_seq: Cell<u64>,
    /// When the last change was journalled.
    last_change: Cell<Option<Instant>>,
    /// The number the next snapshot is given: a snapshot replaces the file
    /// only if no later one is there (they may be written out of order).
    next_ticket: Cell<u64>,
    /// The state directory, with the snapshot's writers.
    pub(super) snapshots: Arc<Snapshots>,
    /// The journal's size past which `upkeep` rotates it.
    journal_max_size: u64,
    /// The last journal rotation failed (logged once until one works).
    rotation_failing: bool,
    /// When `upkeep` last looked at the journal's size (once a second;
    /// the first look a second after the first upkeep, as the loop
    /// starts).
    pub(super) rotation_checked: Option<Instant>,
}

/// The snapshot (`state.json`) is rewritten once changes have paused this
/// long, or when this many wait in the journal: off the path of a request.
const SNAPSHOT_QUIET: Duration = Duration::from_secs(1);
const SNAPSHOT_AFTER_CHANGES: u64 = 64;
/// How often `upkeep` looks at the journal's size.
const ROTATION_CHECK_EVERY: Duration = Duration::from_secs(1);

impl LocalStore {
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
            journal_max_size: u64::MAX,
            rotation_failing: false,
            rotation_checked: None,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.snapshots.dir.join(paths::STATE_FILE)
    }

    /// Reads the snapshot (a missing file is an empty state: first start,
    /// unless a journal is there) and replays the journal's changes it does
    /// not include yet.
    pub fn load(&self) -> Result<DesiredState, StateError> {
        let Some((mut state, snapshot_seq)) = load_snapshot(&self.snapshots.dir)? else {
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

    pub(super) fn ticket(&self) -> u64 {
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

    /// The journal entries of `service` (all services when `None`), oldest
    /// first. Unreadable lines are skipped and reported in the log.
    /// Appends one entry to the journal (one JSON line, fdatasynced).
    pub fn append_journal(&self, entry: &JournalEntry) -> Result<(), StateError> {
        journal::append(&self.journal_path(), entry)
    }

    pub fn read_journal(&self, service: Option<&str>) -> Result<Vec<JournalEntry>, StateError> {
        read_history(&self.snapshots.dir, service)
    }

    /// Moves a journal longer than `journal_max_size` aside once the
    /// snapshot includes all of it (see `rotate_journal`); a failure is
    /// logged once until a rotation works again.
    fn rotate_when_due(&mut self) {
        let max = self.journal_max_size;
        match self.rotate_journal(max) {
            Ok(None) => {}
            Ok(Some(len)) => {
                self.rotation_failing = false;
                log::info!(
                    "journal: {len} bytes (journal_max_size {max}) moved to {}; history reads both",
                    paths::JOURNAL_ROTATED_FILE
                );
            }
            Err(e) if !self.rotation_failing => {
                self.rotation_failing = true;
                log::error!("journal rotation: {e}; the journal keeps growing until it works");
            }
            Err(_) => {}
        }
    }
}

impl DesiredStore for LocalStore {
    fn load(&mut self) -> Result<DesiredState, StateError> {
        LocalStore::load(self)
    }

    fn record(
        &mut self,
        service: &str,
        change: &Change,
        after: &ServiceState,
    ) -> Result<(), StateError> {
        self.append_change(service, change, after).map(|_| ())
    }

    fn record_revert(
        &mut self,
        service: &str,
        why: &str,
        change: &Change,
        before: &ServiceState,
    ) -> Result<(), StateError> {
        self.append_revert(service, why, change, before).map(|_| ())
    }

    fn record_refusal(
        &mut self,
        service: &str,
        why: &str,
        change: &Change,
    ) -> Result<(), StateError> {
        self.append_journal(&JournalEntry {
            service: service.to_string(),
            outcome: format!("refused: {why}"),
            change: change.clone(),
            seq: None,
            state: None,
        })
    }

    fn save(&mut self, state: &DesiredState) -> Result<(), StateError> {
        LocalStore::save(self, state)
    }

    /// The snapshot, on a thread of its own, once changes wait in the
    /// journal and none came for a second (or many wait): the loop pays
    /// for the copy of the state. Once a second, the journal's rotation,
    /// when due.
    fn upkeep(&mut self, state: &DesiredState) {
        if self.snapshot_due(SNAPSHOT_QUIET, SNAPSHOT_AFTER_CHANGES) {
            self.save_in_background(state.clone());
        }
        match self.rotation_checked {
            None => self.rotation_checked = Some(Instant::now()),
            Some(t) if t.elapsed() >= ROTATION_CHECK_EVERY => {
                self.rotation_checked = Some(Instant::now());
                self.rotate_when_due();
            }
            Some(_) => {}
        }
    }

    fn close(&mut self, state: &DesiredState) {
        if self.snapshot_due(Duration::ZERO, 1) {
            if let Err(e) = LocalStore::save(self, state) {
                log::error!("snapshot: {e}; the next start replays the journal");
            }
        }
    }

    fn reconfigure(&mut self, config: &Config) {
        self.journal_max_size = config.journal_max_size;
    }

    fn history(&self) -> HistoryReader {
        let dir = self.dir().to_path_buf();
        Box::new(move |service| read_history(&dir, service))
    }

    fn changes(&mut self) -> Option<UnboundedReceiver<ExternalChange>> {
        None
    }
}
