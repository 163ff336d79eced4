//! The only code that talks to aya: load the XDP program, pin and adopt maps,
//! attach to interfaces through pinned links, write services and pools, flip
//! with one aligned 32-bit store, and read counters and the flow table.
//!
//! Pins live under `<bpffs>/bgswitch/v<LAYOUT_VERSION>/{maps,links}/`. A new
//! daemon loads the program against the pinned maps (so flows and counters
//! survive) and swaps its program into the pinned links atomically
//! (`bpf_link_update`), so a restart never detaches.
//!
//! Inside, by concern:
//! - `load` — the program and its maps (pinned ones adopted after a shape
//!   check), the flow cache's size, test runs;
//! - `bpffs` — where the pins live so they outlive the daemon (a private
//!   mount namespace's own bpffs would not);
//! - `pins` — the pin layout, teardown;
//! - `hook` — how the program meets an interface (XDP, native or generic);
//! - `attach` — attachments through pinned links, adoption, interfaces
//!   watched and re-attached, detach;
//! - `services` — services, pools and control words (flip, canary, preview);
//! - `transitions` — stable periods of stateless services, the address
//!   filter;
//! - `flows` — flow-table reads (counts, scans) and flushes;
//! - `counters` — the program's counters;
//! - `clock` — kernel ticks, the tick rate, the timeouts in `SETTINGS`;
//! - `flow_gen` — `FLOW_GEN` and the netlink watcher that bumps it;
//! - `mapped` — the mmapped arrays written through atomics.

mod attach;
mod bpffs;
mod clock;
mod counters;
mod flow_gen;
mod flows;
mod hook;
mod load;
mod mapped;
mod pins;
mod services;
mod transitions;

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::ProgramError,
    Ebpf,
};
use bgswitch_common::{
    global, Backend, BackendStats, ColourStats, PreviewKey, ReplySource, ServiceKey, ServiceValue,
    Settings,
};

pub use attach::{ifindex, ifname, Attachment};
pub use bpffs::{ensure_bpffs, locate_pins, PinPlace};
pub use clock::{assume_hz, monotonic_ns, CONFIG_HZ};
pub use flows::{
    kernel_bytes_per_flow, FlowCounts, FlowScan, FLOW_BYTES_V4, FLOW_BYTES_V6, SYN_TIMEOUT_S,
};
pub use hook::AttachMode;
pub use load::{cpu_id_bound, half_open_buckets, half_open_bytes, half_open_slots};
pub use pins::{lock_pins, remove_pins, PinLock};
pub use services::{addr_of, backend_of, backend_stat_id, service_key};

use crate::config::AttachSetting;
use clock::Clock;
use flow_gen::GenCounter;
use hook::Held;
use mapped::MappedArray;

use bgswitch_common::BPF_F_MMAPABLE;

/// Errors of the data plane, each naming what failed and on which object.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this bgswitch binary was built without its XDP program (AYA_BUILD_SKIP); rebuild it")]
    NoObject,
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error(
        "pinned map {path} does not match this bgswitch (expected {expected}, found {found}); \
         it belongs to another version or configuration. Run `bgswitch detach` to remove the \
         old pins (this drops open flows), or restore the matching max_flows"
    )]
    MapMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("map {name}: {op}: {source}")]
    Map {
        name: &'static str,
        op: String,
        source: aya::maps::MapError,
    },
    #[error("map {0} missing from the XDP object")]
    MissingMap(&'static str),
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error("attaching XDP to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "the data plane pinned under {path} is held by another bgswitch daemon{}: one daemon \
         per data plane. Stop that one first (its socket answers `bgswitch status`), or give \
         this one another `bpffs`",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(
    name: &'static str,
    op: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Map { name, op, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DataplaneError {
    let path = path.to_path_buf();
    move |source| DataplaneError::Io { op, path, source }
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pin root (a bpffs mount). `None`: private maps, nothing pinned (tests,
    /// simulation).
    pub bpffs: Option<PathBuf>,
    /// Flow table size in flows (one entry each).
    pub max_flows: u32,
}

/// The userspace handle on the running data plane.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The pin root as this process reaches it (see `bpffs.rs`).
    bpffs: Option<PathBuf>,
    /// Where the pins are and why they outlive the daemon.
    pin_place: Option<PinPlace>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    control: MappedArray,
    pool_sizes: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    /// The flow tables and the half-open tables, both families.
    flows: flows::FlowTables,
    settings: Array<MapData, Settings>,
    /// Where the XDP program redirects: the XDP attachments.
    tx_ports: DevMapHash<MapData>,
    /// Every attachment, XDP or TC (ifindex → `bgswitch_common::attach`):
    /// where the TC program sends.
    attached: HashMap<MapData, u32, u32>,
    /// The mmapped maps' handles, kept open: a program loaded later (TC)
    /// is relocated against their descriptors.
    _mapped_maps: [aya::maps::Map; 3],
    /// One controller per pinned data plane (none without pins).
    _pin_lock: Option<pins::PinLock>,
    service_stats: PerCpuArray<MapData, ColourStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    global_stats: PerCpuArray<MapData, [u64; global::COUNT as usize]>,
    preview: LpmTrie<MapData, PreviewKey, u32>,
    reply_sources: HashMap<MapData, ServiceKey, ReplySource>,
    links: BTreeMap<String, (Attachment, Held)>,
    /// The setting each interface was attached with, and its last seen
    /// link state.
    watched: BTreeMap<String, (AttachSetting, Option<bool>)>,
    /// When each (service, slot) was last deselected.
    freed: StdHashMap<(u32, u32), Instant>,
    /// Services that may run stateless in their stable periods (see
    /// `bgswitch_common::control`): configured so, and allowed now.
    stateless: HashSet<u32>,
    /// What `SETTINGS` holds (once written).
    settings_now: Option<Settings>,
    /// Whether table services' new IPv4 flows may take their backend's
    /// kept next hop (`Settings::backend_hops`; see `set_backend_hops`).
    backend_hops: bool,
    /// Services in a transition that has an orphan pool, and since when
    /// (this process's view: a transition found at load starts then).
    transitions: StdHashMap<u32, Instant>,
    /// The data plane's clock (kernel ticks).
    clock: Clock,
    /// Slots of this load's per-CPU flow cache.
    cache_slots: u32,
    /// Buckets of each half-open table (`Settings::half_shift`).
    half_buckets: u32,
    /// The mapped `ADDR_FILTER` bitmaps.
    addr_filter: MappedArray,
    /// The mapped `FLOW_GEN` counter (shared with the netlink watcher).
    flow_gen: Arc<GenCounter>,
    /// Whole reads of the flow tables (`FLOWS` and `FLOWS6`) begun through this handle (`flow_counts`,
    /// `flow_scan`).
    table_reads: Cell<u64>,
}

impl Dataplane {
    /// Where the pins are and why they outlive the daemon (`None`: private
    /// maps, nothing pinned).
    pub fn pin_place(&self) -> Option<&PinPlace> {
        self.pin_place.as_ref()
    }
}
