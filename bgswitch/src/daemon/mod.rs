//! The daemon: one loop over a closed set of events — control requests,
//! health-probe results, timer ticks, metric scrapes, signals, changes made
//! elsewhere — that owns the data plane and the desired state. IO tasks
//! (`server`, probes) only produce events; every change happens here, in
//! order.
//!
//! Order of a change: the desired-state store records it (the local store:
//! a journal line with the service's new state, fdatasynced) first, then
//! the data plane follows with 32-bit stores; the snapshot (`state.json`)
//! is rewritten later, once changes pause. A crash in between leaves a
//! recorded change the next daemon replays and applies at start, so a
//! change happens whole or not at all.
//!
//! Inside: `event` (what the loop reacts to), `server` (the IO edges),
//! `run` (the loop and its tick), `start` (start-up and adoption),
//! `apply` (the config applied, reload), `changes` (requests that change a
//! service), `guards` (watch and confirm), `gates` (the user's checks before a
//! change and during a watch), `fleet` (what this host tells a fleet, the
//! fleet's guard of a flip), `probes` (health), `scans`
//! (flow-table scans, transitions), `pressure` (warnings of a flow table
//! under pressure), `status`, `kernel_log`.

mod apply;
mod changes;
mod event;
mod fleet;
mod gates;
mod guards;
mod kernel_log;
mod pressure;
mod probes;
mod run;
mod scans;
mod server;
mod start;
mod status;

use std::{collections::HashMap, fs::File, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

pub use event::{Event, Gate, Peer, StatusWaiter};

use crate::{
    config::Config,
    dataplane::Dataplane,
    health::BackendHealth,
    model::{Colour, DesiredState},
    state::DesiredStore,
};
use guards::Baseline;

/// The daemon's state: config, desired state, health, data plane.
pub struct Daemon {
    config: Config,
    /// Where the desired state is kept (the local journal and snapshot).
    store: Box<dyn DesiredStore>,
    state: DesiredState,
    dataplane: Dataplane,
    socket_gid: Option<u32>,
    health: HashMap<(String, Colour, usize), BackendHealth>,
    probes: Vec<JoinHandle<()>>,
    baselines: HashMap<String, Baseline>,
    tx: Option<mpsc::Sender<Event>>,
    ticks: u64,
    /// Whether a flow-table scan runs (off the loop), and who waits for the
    /// next one: every answer comes from a scan begun after its request.
    scan_running: bool,
    scan_waiting: Vec<StatusWaiter>,
    /// Whether the host's IPv4 routing rules pick routes by destination
    /// only: stateless services need it, and table services' new flows
    /// use it (both keep one next hop per backend).
    rules_by_destination: bool,
    /// When the last scan for due transitions began: while a transition
    /// cannot end (live records still disagree), a whole-table read at most
    /// every `TRANSITION_SCAN_EVERY`.
    transition_scan_at: Option<std::time::Instant>,
    /// The flow-table counters as last read (`pressure`).
    pressure: pressure::Pressure,
    /// How long each change took to become durable (`Daemon::durably`).
    durable_writes: crate::api::DurableWrites,
    /// The user's checks: runs under way, last results (`gates`).
    checks: gates::CheckBook,
    /// The request being handled asked for `--local` (`changes`).
    asking_local: bool,
    _lock: File,
}

use crate::state::now_ms;

fn ms(d: Duration) -> String {
    format!("{d:?}")
}
