//! The snapshot file (`state.json`): the whole desired state and the
//! number of the last journal line it includes, replaced atomically, and
//! its writers (the loop's synchronous save and a thread of its own), of
//! which a later one always wins.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
        Mutex, PoisonError,
    },
};

use serde::{Deserialize, Serialize};

use super::StateError;
use crate::{model::DesiredState, paths};

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

/// The snapshot file's writers: the loop (`save`) and a thread it starts
/// (`save_in_background`).
#[derive(Debug)]
pub(super) struct Snapshots {
    /// The state directory.
    pub(super) dir: PathBuf,
    /// Held while a snapshot is written; the ticket of the newest written.
    pub(super) written: Mutex<u64>,
    /// The sequence number the newest snapshot written includes.
    pub(super) saved_seq: AtomicU64,
    /// A snapshot is being written off the loop.
    pub(super) busy: AtomicBool,
    /// The last snapshot failed (logged once until one works again).
    pub(super) failing: AtomicBool,
    /// The journal part a rotation replaced is being removed off the loop.
    pub(super) retiring: AtomicBool,
}

impl Snapshots {
    /// Writes the snapshot of `state`, which includes the journal up to
    /// `seq`, unless a snapshot with a later ticket is already in place.
    pub(super) fn write(
        &self,
        ticket: u64,
        seq: u64,
        state: &DesiredState,
    ) -> Result<(), StateError> {
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
    pub(super) fn report(&self, r: &Result<(), StateError>) {
        match r {
            Err(e) if !self.failing.swap(true, SeqCst) => {
                log::error!("snapshot: {e}; changes are kept in the journal until one is written")
            }
            Ok(()) if self.failing.swap(false, SeqCst) => log::info!("snapshot: written again"),
            _ => {}
        }
    }
}

/// The snapshot in `dir` and the number of the last change it includes;
/// `None` if there is no snapshot file.
pub(super) fn load_snapshot(dir: &Path) -> Result<Option<(DesiredState, u64)>, StateError> {
    let path = dir.join(paths::STATE_FILE);
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
