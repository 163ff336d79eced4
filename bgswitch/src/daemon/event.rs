//! What the daemon's loop reacts to: one closed set of events, produced by
//! the IO edges (`server`: the control socket, signals, the `/metrics`
//! endpoint), the health probes, the ticker, the flow-table scans and the
//! desired-state store, and handled in one place (`run`).

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::{
    api::{Request, Response},
    dataplane::FlowCounts,
    model::{CheckRecord, Colour},
    state::ExternalChange,
};

/// Who is on the other end of a control connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub user: String,
}

impl std::fmt::Display for Peer {
    /// "root (pid 1234)", or the user alone when the pid is not known.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(p) => write!(f, "{} (pid {p})", self.user),
            None => f.write_str(&self.user),
        }
    }
}

/// Everything the loop reacts to.
pub enum Event {
    Request {
        req: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
        /// Resolved once the answer is written to the client (or dropped
        /// if it could not be).
        written: oneshot::Receiver<()>,
    },
    Probe {
        service: String,
        colour: Colour,
        index: usize,
        result: Result<(), String>,
    },
    Tick,
    Scrape {
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
    Reload,
    Shutdown(&'static str),
    /// A request's before-flip checks (run off the loop) are done.
    Gated {
        gate: Gate,
        records: Vec<CheckRecord>,
    },
    /// A `during-watch` check's run is done.
    WatchChecked {
        service: String,
        /// The service's generation when it began.
        generation: u64,
        record: CheckRecord,
    },
    /// A change made elsewhere (`DesiredStore::changes`): followed here.
    Followed(ExternalChange),
    /// A flow-table scan (run off the loop) is done; its waiters get their
    /// status now.
    FlowsCounted {
        counts: std::io::Result<HashMap<(u32, Colour), FlowCounts>>,
        waiters: Vec<StatusWaiter>,
        /// The control words of services in a transition when the scan
        /// began, and when it began.
        words: HashMap<u32, u32>,
        at: std::time::Instant,
    },
}

/// A request waiting for its before-flip checks (`gates`).
pub struct Gate {
    pub(super) req: Request,
    pub(super) peer: Peer,
    pub(super) reply: oneshot::Sender<Response>,
    pub(super) service: String,
    pub(super) colour: Colour,
    /// The service's generation when the checks began: a change made
    /// meanwhile voids them.
    pub(super) generation: u64,
}

/// A status answer that waits for a flow-table scan.
pub enum StatusWaiter {
    Status {
        only: Option<String>,
        reply: oneshot::Sender<Response>,
    },
    Scrape {
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
}
