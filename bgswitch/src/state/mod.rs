//! Where the desired state is kept, and the host's own files beside it.
//!
//! The seam is [`DesiredStore`]: the daemon's loop loads the state from it
//! at start, records every change in it before the data plane follows,
//! keeps it whole on its ticks and at shutdown, reads history from it, and
//! is told through it of changes made elsewhere. One implementation today,
//! [`LocalStore`]: two files in the state directory (and the journal's
//! rotated part):
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
//!
//! The directory also keeps what belongs to this host alone, whatever the
//! store ([`StateDir`]): the lock that keeps a second daemon out and the
//! kernel tick rate measured in this boot.
//!
//! Inside: `local` (the store), `journal` (lines, reading, history),
//! `snapshot` (the file and its writers), `dir` (lock, tick rate).

mod dir;
mod fleet;
mod journal;
mod local;
mod snapshot;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use tokio::sync::mpsc::UnboundedReceiver;

pub use dir::StateDir;
pub use fleet::{EtcdStore, FleetHost, FleetLocal, FleetService, FleetStatus, HostReport};
pub use journal::{read_history, JournalEntry};
pub use local::LocalStore;
pub use snapshot::STATE_VERSION;

use crate::{
    config::Config,
    model::{Change, DesiredState, ServiceState},
};

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
    /// The fleet's store (etcd) refused or did not answer.
    #[error("{0}")]
    Fleet(String),
}

impl StateError {
    /// Whether the fleet's store did not answer (as opposed to refusing).
    pub fn unreachable(&self) -> bool {
        matches!(self, Self::Fleet(m) if m.contains("unreachable"))
    }
}

/// Unix time in milliseconds (journal lines, reports, checks, deadlines).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where the desired state is kept: the seam between the daemon's loop and
/// its durable (or, for a fleet, shared) desired state.
pub trait DesiredStore {
    /// The desired state as kept, at start.
    fn load(&mut self) -> Result<DesiredState, StateError>;

    /// Records a change of `service` with the service's whole state after
    /// it. The change is durable once this returns Ok; the data plane
    /// follows only then.
    fn record(
        &mut self,
        service: &str,
        change: &Change,
        after: &ServiceState,
    ) -> Result<(), StateError>;

    /// Records that a recorded change did not happen after all (the data
    /// plane refused it): `before` is the service's state again.
    fn record_revert(
        &mut self,
        service: &str,
        why: &str,
        change: &Change,
        before: &ServiceState,
    ) -> Result<(), StateError>;

    /// Records an attempt that was refused: it changed nothing.
    fn record_refusal(
        &mut self,
        service: &str,
        why: &str,
        change: &Change,
    ) -> Result<(), StateError>;

    /// Keeps the whole state now, over any older copy (start, reload).
    fn save(&mut self, state: &DesiredState) -> Result<(), StateError>;

    /// The loop's tick: what the store does off a request's path.
    fn upkeep(&mut self, state: &DesiredState);

    /// At shutdown: the state kept whole, if anything is still due.
    fn close(&mut self, state: &DesiredState);

    /// Settings a reload may change.
    fn reconfigure(&mut self, config: &Config);

    /// A reader of the history, to run off the loop: the entries of one
    /// service (all when `None`), oldest first.
    fn history(&self) -> HistoryReader;

    /// Changes made elsewhere (by other hosts), in the order they were
    /// made, for the loop to follow; taken once. `None`: this store's
    /// changes are all the loop's own.
    fn changes(&mut self) -> Option<UnboundedReceiver<ExternalChange>>;

    // What a fleet's store adds; a store of this host alone has none of it.

    /// Records a change of this host alone (`--local`): a fleet's store
    /// keeps it here and marks the service diverged from the fleet.
    fn record_local(
        &mut self,
        service: &str,
        change: &Change,
        after: &ServiceState,
    ) -> Result<(), StateError> {
        self.record(service, change, after)
    }

    /// A change made elsewhere has been applied here (`changes`): kept.
    fn applied(&mut self, _ext: &ExternalChange) {}

    /// A change made elsewhere was seen at `revision` and left as it was
    /// (this host has it already): later changes compare against it.
    fn seen(&mut self, _service: &str, _revision: i64) {}

    /// For a service changed here alone (`record_local`): the generation
    /// its first such change started from.
    fn diverged(&self, _service: &str) -> Option<u64> {
        None
    }

    /// The service is one with the fleet again.
    fn clear_diverged(&mut self, _service: &str) {}

    /// Tells the fleet what this host applied, sees and serves.
    fn report(&mut self, _report: HostReport) {}

    /// The live hosts' reports (`None`: no fleet).
    fn peers(&self) -> Option<Result<Vec<HostReport>, String>> {
        None
    }

    /// This host's view of the fleet's store (`None`: no fleet).
    fn fleet_local(&self) -> Option<FleetLocal> {
        None
    }

    /// A reader of `status --fleet`, to run off the loop (`None`: no fleet).
    fn fleet(&self) -> Option<FleetReader> {
        None
    }
}

/// Reads the fleet's status off the loop (see [`DesiredStore::fleet`]).
pub type FleetReader = Box<dyn FnOnce() -> Result<FleetStatus, String> + Send>;

/// Reads a store's history off the loop (see [`DesiredStore::history`]).
pub type HistoryReader =
    Box<dyn FnOnce(Option<&str>) -> Result<Vec<JournalEntry>, StateError> + Send>;

/// A change of a service made elsewhere, with the service's whole state
/// after it: the loop makes it its own and moves the data plane.
#[derive(Clone, Debug, PartialEq)]
pub struct ExternalChange {
    pub service: String,
    pub change: Change,
    pub after: ServiceState,
    /// Where the store has it (etcd's revision of the service's state).
    pub revision: i64,
}
