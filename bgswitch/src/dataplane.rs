//! The only code that talks to aya: load the XDP program, pin and adopt maps,
//! attach to interfaces through pinned links, write services and pools, flip
//! with one aligned 32-bit store, and read counters and the flow table.
//!
//! Pins live under `<bpffs>/bgswitch/v<LAYOUT_VERSION>/{maps,links}/`. A new
//! daemon loads the program against the pinned maps (so flows and counters
//! survive) and swaps its program into the pinned links atomically
//! (`bpf_link_update`), so a restart never detaches.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    ffi::CString,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, DevMapHash, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use bgswitch_common::{
    control, flow_flags, global, ipv4_to_addr, ipv6_to_addr, maps as names, port_to_wire, Backend,
    BackendStats, ColourStats, FlowEntry, FlowKey4, PreviewKey, ReplySource, ServiceKey,
    ServiceValue, Settings, ADDR_FILTER_WORDS, BACKEND_ENTRIES, BACKEND_STAT_ENTRIES, FAMILY_IPV4,
    FAMILY_IPV6, MAX_BACKENDS, MAX_INTERFACES, MAX_PREVIEW_PREFIXES, MAX_SERVICES, POOL_SLOTS,
    PROGRAM_NAME, STATELESS_SLOTS,
};

use crate::{config::XdpModeSetting, model::Colour, netlink, paths};

/// The XDP object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bgswitch"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// A pool slot that was just deselected is not rewritten for this long, so a
/// packet that read the old control word on another CPU has long finished.
const SLOT_QUARANTINE: Duration = Duration::from_millis(20);

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

/// The XDP mode an interface ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
}

impl AttachMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
    fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// One attached interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// The program was swapped into a link a previous daemon pinned.
    pub adopted: bool,
    /// Native mode was asked for (auto) but refused; why.
    pub fallback_reason: Option<String>,
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
    bpffs: Option<PathBuf>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    control: MappedArray,
    pool_sizes: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    flows: HashMap<MapData, FlowKey4, FlowEntry>,
    /// The same map, for batch reads (aya 0.14 has no batch API).
    flows_fd: std::os::fd::OwnedFd,
    settings: Array<MapData, Settings>,
    tx_ports: DevMapHash<MapData>,
    service_stats: PerCpuArray<MapData, ColourStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    global_stats: PerCpuArray<MapData, [u64; global::COUNT as usize]>,
    preview: LpmTrie<MapData, PreviewKey, u32>,
    reply_sources: HashMap<MapData, ServiceKey, ReplySource>,
    links: BTreeMap<String, (Attachment, FdLink)>,
    /// The mode each interface was asked for, and its last seen link state.
    watched: BTreeMap<String, (XdpModeSetting, Option<bool>)>,
    /// When each (service, slot) was last deselected.
    freed: StdHashMap<(u32, u32), Instant>,
    /// Services that may run stateless in their stable periods (see
    /// `bgswitch_common::control`): configured so, and allowed now.
    stateless: std::collections::HashSet<u32>,
    /// What `SETTINGS` holds (once written).
    settings_now: Option<Settings>,
    /// Services in a transition that has an orphan pool, and since when
    /// (this process's view: a transition found at load starts then).
    transitions: StdHashMap<u32, Instant>,
    /// The data plane's clock (kernel ticks).
    clock: Clock,
    /// Slots of this load's per-CPU flow cache.
    cache_slots: u32,
    /// The mapped `ADDR_FILTER` bitmaps.
    addr_filter: MappedArray,
    /// The mapped `FLOW_GEN` counter (shared with the netlink watcher).
    flow_gen: std::sync::Arc<GenCounter>,
    /// Whole reads of `FLOWS` begun through this handle (`flow_counts`,
    /// `flow_scan`).
    table_reads: std::cell::Cell<u64>,
}

/// The kernel's tick rate, once known in this process (see
/// `Clock::measure_hz`, `assume_hz`).
static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The tick rates a kernel can be built with (CONFIG_HZ).
pub const CONFIG_HZ: [u64; 14] = [
    24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200,
];

/// Takes `hz` as the kernel's tick rate instead of measuring it (250 ms) at
/// the next `Dataplane::load`: a rate measured earlier in this boot (it is
/// fixed at boot). Refused (false) if it is not a rate a kernel can be
/// built with, or another is known already.
pub fn assume_hz(hz: u64) -> bool {
    CONFIG_HZ.contains(&hz) && *HZ.get_or_init(|| hz) == hz
}

/// The data plane's clock: flow times are kernel ticks (`jiffies`), which
/// the XDP program reads for ~2 ns. The clock program reads `jiffies` and
/// CLOCK_MONOTONIC side by side; the tick rate is measured from two such
/// readings 250 ms apart, once per process.
struct Clock {
    out: Array<MapData, u64>,
    hz: u64,
}

impl Clock {
    fn load(ebpf: &mut Ebpf) -> Result<Self> {
        let program: &mut aya::programs::SocketFilter = ebpf
            .program_mut(bgswitch_common::CLOCK_PROGRAM_NAME)
            .ok_or_else(|| {
                DataplaneError::Invalid(format!(
                    "no program {} in the object",
                    bgswitch_common::CLOCK_PROGRAM_NAME
                ))
            })?
            .try_into()?;
        program.load()?;
        let out = Array::try_from(
            ebpf.take_map(names::CLOCK)
                .ok_or(DataplaneError::MissingMap(names::CLOCK))?,
        )
        .map_err(map_err(names::CLOCK, "open"))?;
        let mut clock = Self { out, hz: 0 };
        clock.hz = clock.measure_hz(ebpf)?;
        Ok(clock)
    }

    /// `(jiffies, CLOCK_MONOTONIC ns)`, read together in the kernel.
    fn sample(&self, ebpf: &Ebpf) -> Result<(u64, u64)> {
        let program: &aya::programs::SocketFilter = ebpf
            .program(bgswitch_common::CLOCK_PROGRAM_NAME)
            .ok_or(DataplaneError::Invalid("the clock program is gone".into()))?
            .try_into()?;
        let frame = [0u8; 64];
        program.test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat: 1,
            ..TestRunOptions::new()
        })?;
        let j = self.out.get(&0, 0).map_err(map_err(names::CLOCK, "get"))?;
        let ns = self.out.get(&1, 0).map_err(map_err(names::CLOCK, "get"))?;
        Ok((j, ns))
    }

    /// Ticks per second. Each sample reads `jiffies` and CLOCK_MONOTONIC in
    /// one program run, so a pair is consistent whatever the scheduler does
    /// to this thread; two pairs 250 ms apart give the rate to about one
    /// tick in 25 (at HZ 100), snapped to the nearest rate the kernel can
    /// be built with when within 3 % of it. Measured once per process (the
    /// rate is fixed at boot).
    fn measure_hz(&self, ebpf: &Ebpf) -> Result<u64> {
        if let Some(hz) = HZ.get() {
            return Ok(*hz);
        }
        let (j0, t0) = self.sample(ebpf)?;
        std::thread::sleep(Duration::from_millis(250));
        let (j1, t1) = self.sample(ebpf)?;
        if j1 <= j0 || t1 <= t0 {
            return Err(DataplaneError::Invalid(
                "the kernel tick (jiffies) did not advance in 250 ms".into(),
            ));
        }
        let measured = (j1 - j0) as f64 * 1e9 / (t1 - t0) as f64;
        let nearest = CONFIG_HZ
            .iter()
            .copied()
            .min_by(|a, b| {
                (*a as f64 - measured)
                    .abs()
                    .total_cmp(&(*b as f64 - measured).abs())
            })
            .unwrap_or(1000);
        let hz = if (nearest as f64 - measured).abs() <= 0.03 * nearest as f64 {
            nearest
        } else {
            measured.round() as u64
        };
        if !(10..=10_000).contains(&hz) {
            return Err(DataplaneError::Invalid(format!(
                "measured a kernel tick rate of {measured:.1} Hz, which cannot be right"
            )));
        }
        Ok(*HZ.get_or_init(|| hz))
    }

    /// A duration in ticks, rounded up.
    fn ticks(&self, d: Duration) -> u64 {
        (d.as_nanos() * u128::from(self.hz)).div_ceil(1_000_000_000) as u64
    }
}

/// The expected shape of each map, checked against pins before adopting them.
fn expected_maps(max_flows: u32) -> [(&'static str, MapType, u32, u32, u32, u32); 14] {
    use std::mem::size_of;
    let sz = |n: usize| n as u32;
    [
        (
            names::SERVICES,
            MapType::Hash,
            sz(size_of::<ServiceKey>()),
            sz(size_of::<ServiceValue>()),
            MAX_SERVICES,
            0,
        ),
        (
            names::CONTROL,
            MapType::Array,
            4,
            4,
            MAX_SERVICES,
            BPF_F_MMAPABLE,
        ),
        (
            names::POOL_SIZES,
            MapType::Array,
            4,
            4,
            MAX_SERVICES * POOL_SLOTS,
            0,
        ),
        (
            names::BACKENDS,
            MapType::Array,
            4,
            sz(size_of::<Backend>()),
            BACKEND_ENTRIES,
            0,
        ),
        (
            names::FLOWS,
            MapType::LruHash,
            sz(size_of::<FlowKey4>()),
            sz(size_of::<FlowEntry>()),
            max_flows,
            0,
        ),
        (
            names::SETTINGS,
            MapType::Array,
            4,
            sz(size_of::<Settings>()),
            1,
            0,
        ),
        (
            names::TX_PORTS,
            MapType::DevMapHash,
            4,
            8,
            MAX_INTERFACES,
            0,
        ),
        (
            names::SERVICE_STATS,
            MapType::PerCpuArray,
            4,
            sz(size_of::<ColourStats>()),
            MAX_SERVICES * 2,
            0,
        ),
        (
            names::BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            sz(size_of::<BackendStats>()),
            BACKEND_STAT_ENTRIES,
            0,
        ),
        (
            names::GLOBAL_STATS,
            MapType::PerCpuArray,
            4,
            8 * global::COUNT,
            1,
            0,
        ),
        (
            names::PREVIEW,
            MapType::LpmTrie,
            4 + sz(size_of::<PreviewKey>()),
            4,
            MAX_PREVIEW_PREFIXES,
            0,
        ),
        (names::FLOW_GEN, MapType::Array, 4, 8, 1, BPF_F_MMAPABLE),
        (
            names::REPLY_SOURCES,
            MapType::Hash,
            sz(size_of::<ServiceKey>()),
            sz(size_of::<ReplySource>()),
            BACKEND_STAT_ENTRIES,
            0,
        ),
        (
            names::ADDR_FILTER,
            MapType::Array,
            4,
            8,
            2 * ADDR_FILTER_WORDS + STATELESS_SLOTS,
            BPF_F_MMAPABLE,
        ),
    ]
}

fn map_data(m: &Map) -> Option<&MapData> {
    match m {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::DevMapHash(d)
        | Map::LpmTrie(d) => Some(d),
        _ => None,
    }
}

fn describe(t: MapType, k: u32, v: u32, n: u32, flags: u32) -> String {
    format!("{t:?} key {k} B, value {v} B, {n} entries, flags {flags:#x}")
}

fn check_shape(
    info: &MapInfo,
    path: &Path,
    want: &(&str, MapType, u32, u32, u32, u32),
) -> Result<()> {
    let (_, t, k, v, n, f) = *want;
    let found_t = info.map_type().unwrap_or(MapType::Unspecified);
    if found_t != t
        || info.key_size() != k
        || info.value_size() != v
        || info.max_entries() != n
        || info.map_flags() & BPF_F_MMAPABLE != f & BPF_F_MMAPABLE
    {
        return Err(DataplaneError::MapMismatch {
            path: path.into(),
            expected: describe(t, k, v, n, f),
            found: describe(
                found_t,
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                info.map_flags(),
            ),
        });
    }
    Ok(())
}

/// Mounts a bpffs at `path` unless one is there already.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let bpffs_err = |reason: String| DataplaneError::Bpffs {
        path: path.into(),
        reason,
    };
    if !path.exists() {
        std::fs::create_dir_all(path)
            .map_err(|e| bpffs_err(format!("cannot create the mount point: {e}")))?;
    }
    if is_bpffs(path) {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).map_err(|_| bpffs_err("path contains NUL".into()));
    let target = c(&path.to_string_lossy())?;
    let fstype = c("bpf")?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(bpffs_err(format!(
            "not a bpffs and mounting one failed: {}",
            io::Error::last_os_error()
        )));
    }
    log::info!("mounted a bpffs at {}", path.display());
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DataplaneError {
    let path = path.to_path_buf();
    move |source| DataplaneError::Io { op, path, source }
}

/// The interface index of `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The name of the interface with index `index` in this network namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The data plane form of an endpoint.
pub fn backend_of(addr: SocketAddr, stat_id: u32) -> Backend {
    let (a, family) = addr_of(addr.ip());
    Backend {
        addr: a,
        port: port_to_wire(addr.port()),
        family,
        _pad: 0,
        stat_id,
    }
}

/// The data plane form of an IP address and its family tag.
pub fn addr_of(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => (ipv4_to_addr(v4.octets()), FAMILY_IPV4),
        IpAddr::V6(v6) => (ipv6_to_addr(v6.octets()), FAMILY_IPV6),
    }
}

/// The `SERVICES` key of a virtual address.
pub fn service_key(vip: SocketAddr, proto: u8) -> ServiceKey {
    let (addr, family) = addr_of(vip.ip());
    ServiceKey {
        addr,
        port: port_to_wire(vip.port()),
        proto,
        family,
    }
}

/// The `ADDR_FILTER` word of service `id`'s stateless slot, and the entry
/// that says "this is service `id` in a stable period".
fn stateless_slot_of(key: &ServiceKey, id: u32) -> (u32, u64) {
    (
        2 * ADDR_FILTER_WORDS + bgswitch_common::stateless_slot(key.addr[0], key.port),
        bgswitch_common::stateless_entry(key.addr[0], key.port, id),
    )
}

/// Index of a configured backend's counters.
pub const fn backend_stat_id(service: u32, colour: Colour, index: u32) -> u32 {
    service * 2 * MAX_BACKENDS + colour.index() * MAX_BACKENDS + index
}

/// The live flows of one colour of one service, counted from the flow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowCounts {
    /// Forward entries still open: UDP seen within the idle timeout, TCP not
    /// closed (FIN both ways or RST) and seen within the TCP idle timeout.
    pub live: u64,
    /// Forward entries in the table, live or not.
    pub recorded: u64,
    /// TCP flows whose SYN got no SYN-ACK (nor RST) within the SYN timeout.
    pub unanswered: u64,
    /// Flows sent to this colour by a preview prefix.
    pub preview: u64,
    /// Of a service in a transition: live entries whose backend is not the
    /// one the active pool's hash chooses (a stable period can start only
    /// without any).
    pub disagreeing: u64,
}

/// A TCP SYN unanswered for this long counts as an error.
pub const SYN_TIMEOUT_S: u64 = 2;

/// A flow-table read prepared on the daemon's loop, to run on another
/// thread (see `Dataplane::flow_scan`).
pub struct FlowScan {
    fd: std::os::fd::OwnedFd,
    rules: FlowRules,
    /// The control word of each service in a transition when the scan was
    /// prepared (`Dataplane::end_transition` wants it unchanged).
    pub words: StdHashMap<u32, u32>,
}

impl FlowScan {
    /// Reads the whole flow table (batches) and counts it.
    pub fn count(&self) -> io::Result<StdHashMap<(u32, Colour), FlowCounts>> {
        let entries = lookup_batch::<FlowKey4, FlowEntry>(self.fd.as_fd())?;
        Ok(self.rules.count_entries(entries))
    }
}

/// What makes a flow live, unanswered or idle as of one moment (`now`), all
/// in kernel ticks.
struct FlowRules {
    now: u64,
    udp_idle: u64,
    tcp_idle: u64,
    syn_timeout: u64,
    /// The active pool of each service in a transition.
    choices: StdHashMap<u32, Vec<Backend>>,
}

impl FlowRules {
    fn count_entries(
        &self,
        entries: Vec<(FlowKey4, FlowEntry)>,
    ) -> StdHashMap<(u32, Colour), FlowCounts> {
        let now = self.now;
        let mut out: StdHashMap<(u32, Colour), FlowCounts> = StdHashMap::new();
        for (key, e) in entries {
            let c = out
                .entry((e.service, Colour::from_index(e.colour as u32)))
                .or_default();
            c.recorded += 1;
            if e.flags & flow_flags::PREVIEW != 0 {
                c.preview += 1;
            }
            // A flow created after `now` was read (the scan runs a little
            // later) is young, not four billion ticks old.
            let age = ((now as u32).wrapping_sub(e.created) as i32).max(0) as u64;
            if key.proto == bgswitch_common::PROTO_TCP
                && e.flags & (flow_flags::ESTABLISHED | flow_flags::RST) == 0
                && age >= self.syn_timeout
            {
                c.unanswered += 1;
            }
            let idle = now.saturating_sub(e.last_seen);
            let live = if key.proto == bgswitch_common::PROTO_UDP {
                idle <= self.udp_idle
            } else {
                let closed = e.flags & flow_flags::RST != 0
                    || e.flags & (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
                        == (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND);
                !closed && idle <= self.tcp_idle
            };
            if live {
                c.live += 1;
                if let Some(pool) = self.choices.get(&e.service) {
                    let k = bgswitch_common::FlowKey {
                        src: [key.src, 0, 0, 0],
                        dst: [key.dst, 0, 0, 0],
                        sport: key.sport,
                        dport: key.dport,
                        proto: key.proto,
                        family: bgswitch_common::FAMILY_IPV4,
                        _pad: [0; 2],
                    };
                    let i = bgswitch_common::hash::reduce(
                        bgswitch_common::hash::flow_hash(&k, bgswitch_common::hash::BACKEND_SEED),
                        pool.len() as u32,
                    );
                    let agrees = pool.get(i as usize).is_some_and(|b| {
                        b.addr[0] == e.peer
                            && b.port == e.peer_port
                            && b.stat_id == u32::from(e.backend_stat)
                    });
                    if !agrees {
                        c.disagreeing += 1;
                    }
                }
            }
        }
        out
    }
}

impl Dataplane {
    /// Loads the XDP program and its maps (adopting pinned maps when a pin
    /// root is given).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, opts.max_flows);
        let cache_slots = flow_cache_slots(opts.max_flows);
        // One region of `cache_slots` per CPU id (see the map's doc).
        let cpu_ids = cpu_id_bound();
        loader.map_max_entries(
            names::FLOW_CACHE,
            cache_slots.checked_mul(cpu_ids).ok_or_else(|| {
                DataplaneError::Invalid(format!(
                    "flow cache: {cache_slots} slots × {cpu_ids} CPU ids overflow"
                ))
            })?,
        );
        if let Some(bpffs) = &opts.bpffs {
            ensure_bpffs(bpffs)?;
            for sub in ["maps", "links"] {
                let d = paths::pin_root(bpffs).join(sub);
                std::fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
            }
            for want in expected_maps(opts.max_flows) {
                let path = paths::map_pin(bpffs, want.0);
                if path.exists() {
                    let info =
                        MapInfo::from_pin(&path).map_err(map_err(want.0, "reading the pin"))?;
                    check_shape(&info, &path, &want)?;
                }
                loader.map_pin_path(want.0, path);
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or_else(|| {
                    DataplaneError::Invalid(format!("no program {PROGRAM_NAME} in the object"))
                })?
                .try_into()?;
            prog.load()?;
        }
        // The maps we got (pinned or new) must have the shape this code
        // expects; checked on every load so the table cannot drift.
        for want in expected_maps(opts.max_flows) {
            let map = ebpf.map(want.0).ok_or(DataplaneError::MissingMap(want.0))?;
            let info = map_data(map)
                .ok_or(DataplaneError::MissingMap(want.0))?
                .info()
                .map_err(map_err(want.0, "info"))?;
            check_shape(&info, Path::new(want.0), &want)?;
        }
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name));
        let services =
            HashMap::try_from(take(names::SERVICES)?).map_err(map_err(names::SERVICES, "open"))?;
        let control_map = take(names::CONTROL)?;
        let control = match &control_map {
            Map::Array(data) => MappedArray::map(data.fd().as_fd(), MAX_SERVICES).map_err(|e| {
                DataplaneError::Io {
                    op: "mmap",
                    path: names::CONTROL.into(),
                    source: e,
                }
            })?,
            _ => return Err(DataplaneError::Invalid("CONTROL is not an array".into())),
        };
        let pool_sizes = Array::try_from(take(names::POOL_SIZES)?)
            .map_err(map_err(names::POOL_SIZES, "open"))?;
        let backends =
            Array::try_from(take(names::BACKENDS)?).map_err(map_err(names::BACKENDS, "open"))?;
        let flows_map = take(names::FLOWS)?;
        let flows_fd = match &flows_map {
            Map::LruHashMap(d) => {
                d.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| DataplaneError::Io {
                        op: "duplicating the fd of",
                        path: names::FLOWS.into(),
                        source: e,
                    })?
            }
            _ => return Err(DataplaneError::Invalid("FLOWS is not an LRU hash".into())),
        };
        let flows = HashMap::try_from(flows_map).map_err(map_err(names::FLOWS, "open"))?;
        let settings =
            Array::try_from(take(names::SETTINGS)?).map_err(map_err(names::SETTINGS, "open"))?;
        let tx_ports = DevMapHash::try_from(take(names::TX_PORTS)?)
            .map_err(map_err(names::TX_PORTS, "open"))?;
        let service_stats = PerCpuArray::try_from(take(names::SERVICE_STATS)?)
            .map_err(map_err(names::SERVICE_STATS, "open"))?;
        let backend_stats = PerCpuArray::try_from(take(names::BACKEND_STATS)?)
            .map_err(map_err(names::BACKEND_STATS, "open"))?;
        let global_stats = PerCpuArray::try_from(take(names::GLOBAL_STATS)?)
            .map_err(map_err(names::GLOBAL_STATS, "open"))?;
        let preview =
            LpmTrie::try_from(take(names::PREVIEW)?).map_err(map_err(names::PREVIEW, "open"))?;
        // The mapping holds its own reference to the map; the Map handle may go.
        drop(control_map);
        let reply_sources = HashMap::try_from(take(names::REPLY_SOURCES)?)
            .map_err(map_err(names::REPLY_SOURCES, "open"))?;
        let filter_map = take(names::ADDR_FILTER)?;
        let addr_filter = match &filter_map {
            Map::Array(data) => {
                { MappedArray::map(data.fd().as_fd(), 2 * ADDR_FILTER_WORDS + STATELESS_SLOTS) }
                    .map_err(|e| DataplaneError::Io {
                        op: "mmap",
                        path: names::ADDR_FILTER.into(),
                        source: e,
                    })?
            }
            _ => {
                return Err(DataplaneError::Invalid(
                    "ADDR_FILTER is not an array".into(),
                ))
            }
        };
        drop(filter_map);
        let flow_gen_map = take(names::FLOW_GEN)?;
        let flow_gen = match &flow_gen_map {
            Map::Array(data) => {
                MappedArray::map(data.fd().as_fd(), 1).map_err(|e| DataplaneError::Io {
                    op: "mmap",
                    path: names::FLOW_GEN.into(),
                    source: e,
                })?
            }
            _ => return Err(DataplaneError::Invalid("FLOW_GEN is not an array".into())),
        };
        let flow_gen = std::sync::Arc::new(GenCounter(flow_gen));
        drop(flow_gen_map);
        let clock = Clock::load(&mut ebpf)?;
        Ok(Self {
            ebpf,
            bpffs: opts.bpffs.clone(),
            services,
            control,
            pool_sizes,
            backends,
            flows,
            flows_fd,
            settings,
            tx_ports,
            service_stats,
            backend_stats,
            global_stats,
            preview,
            reply_sources,
            links: BTreeMap::new(),
            watched: BTreeMap::new(),
            freed: StdHashMap::new(),
            stateless: Default::default(),
            transitions: StdHashMap::new(),
            settings_now: None,
            clock,
            cache_slots,
            addr_filter,
            flow_gen,
            table_reads: std::cell::Cell::new(0),
        })
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| DataplaneError::Invalid(format!("no program {PROGRAM_NAME}")))?
            .try_into()?)
    }

    /// Runs the program once on `frame` through BPF_PROG_TEST_RUN (maps are
    /// the live ones of this handle). Returns the XDP action and output frame.
    /// `ingress` sets the receiving interface (ifindex in the caller's network
    /// namespace); without it the kernel uses loopback.
    pub fn test_run(
        &mut self,
        frame: &[u8],
        ingress: Option<u32>,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ingress.unwrap_or(0), 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let prog = self.program()?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ingress.is_some().then_some(&ctx[..]),
            repeat,
            ..TestRunOptions::new()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration))
    }

    /// The refresh of flow entries and next hops, in ticks (see
    /// `Settings::refresh`).
    pub fn refresh_ticks(&self) -> u64 {
        self.clock
            .ticks(Duration::from_millis(bgswitch_common::REFRESH_MS))
            .max(1)
    }

    /// Starts reading the data plane's own log messages (aya-log records of
    /// rare events: no route, an egress interface without bgswitch, a flow
    /// not recorded, an empty pool) into `logger`. The caller calls `flush`
    /// on the reader when its fd is readable. Once per load: the ring buffer
    /// has one reader.
    pub fn kernel_log<T: log::Log>(&mut self, logger: T) -> Result<aya_log::EbpfLogger<T>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| DataplaneError::Invalid(format!("the data plane's log (AYA_LOGS): {e}")))
    }

    /// Slots of the per-CPU flow cache (64 bytes each, on every possible CPU).
    pub fn flow_cache_slots(&self) -> u32 {
        self.cache_slots
    }

    /// The kernel's tick rate (HZ), as measured at load.
    pub fn hz(&self) -> u64 {
        self.clock.hz
    }

    /// The data plane's clock now (`jiffies`).
    pub fn jiffies(&self) -> Result<u64> {
        Ok(self.clock.sample(&self.ebpf)?.0)
    }

    /// Sets the flow timeouts.
    pub fn set_settings(&mut self, udp_idle: Duration, tcp_idle: Duration) -> Result<()> {
        let refresh = self.refresh_ticks();
        // At least one tick longer than the refresh: a flow the per-CPU
        // cache serves (last seen at most `refresh` ago) is never idle.
        let s = Settings {
            udp_idle: self.clock.ticks(udp_idle).max(refresh + 1),
            tcp_idle: self.clock.ticks(tcp_idle).max(refresh + 1),
            refresh,
            cache_shift: 32 - self.cache_slots.trailing_zeros(),
            stateless: u32::from(self.any_stable()),
        };
        self.settings
            .set(0, s, 0)
            .map_err(map_err(names::SETTINGS, "set"))?;
        self.settings_now = Some(s);
        Ok(())
    }

    /// The `SETTINGS` entry as the program reads it.
    pub fn settings(&self) -> Result<Settings> {
        self.settings
            .get(&0, 0)
            .map_err(map_err(names::SETTINGS, "get"))
    }

    /// Whether some service's control word is in a stable period.
    fn any_stable(&self) -> bool {
        self.services
            .iter()
            .flatten()
            .any(|(_, v)| control::stateless(self.control.load(v.id)))
    }

    /// Sets `Settings::stateless` (once settings are written): on before a
    /// stable period starts, off after the last one ended.
    fn set_stateless_flag(&mut self, on: bool) -> Result<()> {
        let Some(mut s) = self.settings_now else {
            return Ok(());
        };
        if (s.stateless != 0) == on {
            return Ok(());
        }
        s.stateless = u32::from(on);
        self.settings
            .set(0, s, 0)
            .map_err(map_err(names::SETTINGS, "set"))?;
        self.settings_now = Some(s);
        Ok(())
    }

    /// Attaches (or adopts the pinned attachment) on `iface` and adds it to
    /// the redirect map.
    pub fn attach(&mut self, iface: &str, mode: XdpModeSetting) -> Result<Attachment> {
        let mode_setting = mode;
        let index = ifindex(iface).ok_or_else(|| DataplaneError::UnknownInterface(iface.into()))?;
        let mut fallback_reason = None;
        let mut adopted = None;
        if let Some(bpffs) = self.bpffs.clone() {
            for m in [AttachMode::Native, AttachMode::Generic] {
                let pin = link_pin_path(&bpffs, iface, m);
                if !pin.exists() {
                    continue;
                }
                match self.adopt_link(&pin) {
                    Ok(link) => adopted = Some((m, link)),
                    Err(e) => {
                        log::warn!(
                            "{iface}: pinned XDP link {} is stale ({e}); attaching afresh",
                            pin.display()
                        );
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
        }
        if adopted.is_none() {
            adopted = self.adopt_older_layout(iface)?;
        }
        let (mode, link, was_adopted) = match adopted {
            Some((m, link)) => (m, link, true),
            None => {
                let tries: &[AttachMode] = match mode {
                    XdpModeSetting::Auto => &[AttachMode::Native, AttachMode::Generic],
                    XdpModeSetting::Native => &[AttachMode::Native],
                    XdpModeSetting::Generic => &[AttachMode::Generic],
                };
                let mut last = None;
                let mut got = None;
                for &m in tries {
                    let prog = self.program()?;
                    match prog.attach_to_if_index(index, m.xdp_mode()) {
                        Ok(id) => {
                            let link = prog.take_link(id)?;
                            let fd = FdLink::try_from(link).map_err(|e| DataplaneError::Invalid(format!(
                                "{iface}: the kernel attached XDP without a bpf_link ({e}); bgswitch needs Linux >= 5.9"
                            )))?;
                            got = Some((m, fd));
                            break;
                        }
                        Err(e) => {
                            if mode == XdpModeSetting::Auto && m == AttachMode::Native {
                                let reason = format!("native XDP refused: {e}");
                                log::warn!("{iface}: {reason}; falling back to generic (skb) mode, which is slower");
                                fallback_reason = Some(reason);
                            }
                            last = Some((m, e));
                        }
                    }
                }
                let Some((m, fd)) = got else {
                    let (m, source) = last.expect("at least one mode tried");
                    return Err(DataplaneError::Attach {
                        iface: iface.into(),
                        mode: m.as_str(),
                        source,
                    });
                };
                let link = match &self.bpffs {
                    Some(bpffs) => {
                        let pin = link_pin_path(bpffs, iface, m);
                        let pinned = fd.pin(&pin).map_err(|e| DataplaneError::Io {
                            op: "pinning the XDP link at",
                            path: pin.clone(),
                            source: io::Error::other(e.to_string()),
                        })?;
                        FdLink::from(pinned)
                    }
                    None => fd,
                };
                (m, link, false)
            }
        };
        self.add_tx_port(index)?;
        let a = Attachment {
            interface: iface.into(),
            ifindex: index,
            mode,
            adopted: was_adopted,
            fallback_reason,
        };
        log::info!(
            "{iface} (ifindex {index}): XDP {} in {} mode",
            if was_adopted { "adopted" } else { "attached" },
            mode.as_str()
        );
        self.links.insert(iface.into(), (a.clone(), link));
        self.watched
            .insert(iface.into(), (mode_setting, oper_up(iface)));
        Ok(a)
    }

    /// Checks every attached interface: one deleted and re-created (new
    /// ifindex) or whose link went defunct gets the program attached again;
    /// a vanished one is reported; link down/up is reported with whether XDP
    /// is still attached. Returns what it saw, for the log.
    pub fn check_interfaces(&mut self) -> Vec<(log::Level, String)> {
        let mut notes = Vec::new();
        let names: Vec<String> = self.watched.keys().cloned().collect();
        for name in names {
            let (setting, last_up) = self.watched[&name];
            let current = ifindex(&name);
            let Some((att, _)) = self.links.get(&name) else {
                // Vanished earlier; attach again once it is back.
                if current.is_some() {
                    match self.attach(&name, setting) {
                        Ok(a) => notes.push((
                            log::Level::Warn,
                            format!(
                                "{name} is back (ifindex {}): XDP attached again in {} mode",
                                a.ifindex,
                                a.mode.as_str()
                            ),
                        )),
                        Err(e) => notes.push((
                            log::Level::Error,
                            format!("{name} is back but attaching XDP failed: {e}"),
                        )),
                    }
                }
                continue;
            };
            let (old_index, mode) = (att.ifindex, att.mode);
            let defunct = self
                .bpffs
                .as_ref()
                .and_then(|b| link_ifindex(&link_pin_path(b, &name, mode)).ok())
                .is_some_and(|i| i != old_index);
            if current == Some(old_index) && !defunct {
                let up = oper_up(&name);
                if up != last_up {
                    if let Some(w) = self.watched.get_mut(&name) {
                        w.1 = up;
                    }
                    match up {
                        Some(false) => notes.push((log::Level::Warn, format!("{name}: link is down"))),
                        Some(true) => notes.push((log::Level::Info, format!("{name}: link is up again; XDP still attached (ifindex {old_index}, {} mode)", mode.as_str()))),
                        None => {}
                    }
                }
                continue;
            }
            // Gone, replaced, or the link lost its device: drop the old attachment.
            if let Some((a, link)) = self.links.remove(&name) {
                drop(link);
                if let Some(b) = &self.bpffs {
                    let _ = std::fs::remove_file(link_pin_path(b, &name, a.mode));
                }
                let _ = self.tx_ports.remove(a.ifindex);
                self.bump_flow_gen();
                self.bump_flow_gen();
            }
            match current {
                None => notes.push((log::Level::Warn, format!("{name} (ifindex {old_index}) disappeared; XDP will be attached again when it returns"))),
                Some(i) => match self.attach(&name, setting) {
                    Ok(a) => notes.push((log::Level::Warn, format!("{name} was re-created (ifindex {old_index} → {i}): XDP attached again in {} mode", a.mode.as_str()))),
                    Err(e) => notes.push((log::Level::Error, format!("{name} was re-created but attaching XDP failed: {e}"))),
                },
            }
        }
        notes
    }

    /// Lets the program redirect to interface `index` (done by `attach`).
    pub fn add_tx_port(&mut self, index: u32) -> Result<()> {
        self.tx_ports.insert(index, index, None, 0).map_err(|e| {
            DataplaneError::Invalid(format!("adding ifindex {index} to TX_PORTS: {e}"))
        })?;
        // Next hops looked up while it was missing went to the stack.
        self.bump_flow_gen();
        Ok(())
    }

    /// An XDP link pinned by a daemon of an older map layout
    /// (`<bpffs>/bgswitch/v<N>/links/`) holds the interface: this program is
    /// swapped into it (no detach, no gap in forwarding) and the pin moved
    /// here. The old layout's flows are not carried over (their maps have
    /// another shape): open connections are chosen afresh, which is logged.
    /// The old layout's directory goes once it holds no more links.
    fn adopt_older_layout(&mut self, iface: &str) -> Result<Option<(AttachMode, FdLink)>> {
        let Some(bpffs) = self.bpffs.clone() else {
            return Ok(None);
        };
        let current = paths::pin_root(&bpffs);
        let Ok(dirs) = std::fs::read_dir(bpffs.join(paths::PIN_DIR)) else {
            return Ok(None);
        };
        for dir in dirs.flatten() {
            let old_root = dir.path();
            let name = dir.file_name().to_string_lossy().into_owned();
            if old_root == current || !name.starts_with('v') {
                continue;
            }
            for m in [AttachMode::Native, AttachMode::Generic] {
                let old_pin = old_root
                    .join("links")
                    .join(format!("{}-{iface}", m.as_str()));
                if !old_pin.exists() {
                    continue;
                }
                let link = match self.adopt_link(&old_pin) {
                    Ok(link) => link,
                    Err(e) => {
                        log::warn!(
                            "{iface}: XDP link {} of layout {name} is stale ({e}); attaching afresh",
                            old_pin.display()
                        );
                        let _ = std::fs::remove_file(&old_pin);
                        continue;
                    }
                };
                let new_pin = link_pin_path(&bpffs, iface, m);
                std::fs::rename(&old_pin, &new_pin)
                    .map_err(io_err("moving the link pin to", &new_pin))?;
                log::warn!(
                    "{iface}: took over the XDP link of map layout {name} (now v{}); flows recorded by the old layout are not carried over",
                    bgswitch_common::LAYOUT_VERSION
                );
                remove_layout_if_unused(&old_root);
                return Ok(Some((m, link)));
            }
        }
        Ok(None)
    }

    /// Swaps this daemon's program into a pinned link (atomic replace).
    fn adopt_link(&mut self, pin: &Path) -> Result<FdLink> {
        let pinned =
            PinnedLink::from_pin(pin).map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        let fd = FdLink::from(pinned);
        let xdp_link = XdpLink::try_from(fd).map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        let prog = self.program()?;
        let id = prog.attach_to_link(xdp_link)?;
        let link = prog.take_link(id)?;
        FdLink::try_from(link).map_err(|e| DataplaneError::Invalid(e.to_string()))
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.links.values().map(|(a, _)| a.clone()).collect()
    }

    /// Removes `iface`'s attachment (and its pin).
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        self.watched.remove(iface);
        if let Some((a, link)) = self.links.remove(iface) {
            drop(link);
            if let Some(bpffs) = &self.bpffs {
                let pin = link_pin_path(bpffs, iface, a.mode);
                std::fs::remove_file(&pin).map_err(io_err("unpinning", &pin))?;
            }
            let _ = self.tx_ports.remove(a.ifindex);
            self.bump_flow_gen();
        }
        Ok(())
    }

    /// The control word of service `id`.
    pub fn control_word(&self, id: u32) -> u32 {
        self.control.load(id)
    }

    /// The backends in a pool slot.
    fn read_pool(&self, id: u32, slot: u32) -> Result<Vec<Backend>> {
        let base = id * POOL_SLOTS + slot;
        let n = self
            .pool_sizes
            .get(&base, 0)
            .map_err(map_err(names::POOL_SIZES, "get"))?;
        (0..n.min(MAX_BACKENDS))
            .map(|i| {
                self.backends
                    .get(&(base * MAX_BACKENDS + i), 0)
                    .map_err(map_err(names::BACKENDS, "get"))
            })
            .collect()
    }

    fn write_pool(&mut self, id: u32, slot: u32, pool: &[Backend]) -> Result<()> {
        let base = id * POOL_SLOTS + slot;
        for (i, b) in pool.iter().enumerate() {
            self.backends
                .set(base * MAX_BACKENDS + i as u32, b, 0)
                .map_err(map_err(names::BACKENDS, "set"))?;
        }
        self.pool_sizes
            .set(base, pool.len() as u32, 0)
            .map_err(map_err(names::POOL_SIZES, "set"))
    }

    /// Makes service `id` serve `key` with these pools and active colour.
    /// Pools that differ from what the data plane has are written to free
    /// slots first; then one 32-bit store selects them (and the colour), so a
    /// packet sees either the old service or the new, never a mix.
    pub fn write_service(
        &mut self,
        id: u32,
        key: ServiceKey,
        blue: &[Backend],
        green: &[Backend],
        active: Colour,
    ) -> Result<()> {
        if id >= MAX_SERVICES {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} out of range"
            )));
        }
        for pool in [blue, green] {
            if pool.is_empty() || pool.len() > MAX_BACKENDS as usize {
                return Err(DataplaneError::Invalid(format!(
                    "a pool must have 1..={MAX_BACKENDS} backends"
                )));
            }
        }
        let old = self.control.load(id);
        let mut slots = [u32::MAX; 2];
        if control::orphan(old).is_some() && !self.transitions.contains_key(&id) {
            // A transition left by an earlier daemon: it lasts from now.
            self.transitions.insert(id, Instant::now());
        }
        if control::enabled(old) {
            for c in Colour::BOTH {
                let s = control::slot(old, c.index());
                let want = if c == Colour::Blue { blue } else { green };
                if self.read_pool(id, s)? == want {
                    slots[c.index() as usize] = s;
                }
            }
        }
        for c in Colour::BOTH {
            if slots[c.index() as usize] != u32::MAX {
                continue;
            }
            // The orphan pool stays untouched while its transition lasts.
            let in_use: Vec<u32> = if control::enabled(old) {
                let mut v = vec![control::slot(old, 0), control::slot(old, 1)];
                v.extend(control::orphan(old).map(|(_, s)| s));
                v
            } else {
                vec![]
            };
            let slot = self.free_slot(id, &in_use, &slots);
            let want = if c == Colour::Blue { blue } else { green };
            self.write_pool(id, slot, want)?;
            slots[c.index() as usize] = slot;
        }
        let canary = if control::enabled(old) {
            control::canary(old)
        } else {
            0
        };
        let word =
            control::encode(active.index(), slots[0], slots[1], canary) | (old & control::PREVIEW);
        let word = self.store_word(id, word);
        if control::enabled(old) {
            for c in 0..2 {
                let s = control::slot(old, c);
                if !slots.contains(&s) && control::orphan(word).map(|(_, o)| o) != Some(s) {
                    self.freed.insert((id, s), Instant::now());
                }
            }
        }
        // The address bitmaps first: a clear bit makes the program skip the
        // lookups below.
        self.filter_add(0, &key.addr);
        for b in blue.iter().chain(green) {
            self.filter_add(ADDR_FILTER_WORDS, &b.addr);
        }
        // Replies of every backend written here find their VIP. Entries of
        // backends that leave the pools stay (their open flows drain) until
        // the service goes.
        let source = ReplySource {
            vip: key.addr,
            vport: key.port,
            _pad: 0,
            service: id,
        };
        for b in blue.iter().chain(green) {
            let from = ServiceKey {
                addr: b.addr,
                port: b.port,
                proto: key.proto,
                family: b.family,
            };
            self.reply_sources
                .insert(from, source, 0)
                .map_err(map_err(names::REPLY_SOURCES, "insert"))?;
        }
        self.services
            .insert(key, ServiceValue { id }, 0)
            .map_err(map_err(names::SERVICES, "insert"))
    }

    /// Stores service `id`'s control word `new` (its stateless and orphan
    /// bits are this function's): a stable period of a stateless service
    /// lasts while the active colour, its pool slot, no canary and no
    /// preview stay and the service may run stateless; any other word
    /// starts a transition, whose orphan pool is the stable period's, in the
    /// same store. In a transition, the orphan pool stays. Returns the word
    /// stored.
    fn store_word(&mut self, id: u32, new: u32) -> u32 {
        let old = self.control.load(id);
        let keep = new & !(control::STATELESS | control::ORPHAN_BITS);
        let word = if control::enabled(old) && control::stateless(old) {
            let active = control::active(old);
            let stable = control::active(keep) == active
                && control::slot(keep, active) == control::slot(old, active)
                && self.may_be_stable(id, keep);
            if stable {
                keep | control::STATELESS
            } else {
                self.transitions.insert(id, Instant::now());
                control::with_orphan(keep, active, control::slot(old, active))
            }
        } else if control::enabled(old) {
            keep | (old & control::ORPHAN_BITS)
        } else {
            keep
        };
        self.control.store(id, word);
        if control::stateless(old) && !control::stateless(word) {
            // The stateless slot goes after the word: a packet that still
            // finds it reads the word and takes the table path.
            self.rebuild_filter();
            if !self.any_stable() {
                // Failing, the flag stays on: one load per TCP packet more.
                let _ = self.set_stateless_flag(false);
            }
        }
        word
    }

    /// Whether service `id` may be in a stable period under word `w`:
    /// allowed to run stateless, no canary share, no preview prefixes.
    fn may_be_stable(&self, id: u32, w: u32) -> bool {
        self.stateless.contains(&id) && control::canary(w) == 0 && w & control::PREVIEW == 0
    }

    /// Whether service `id` would start a stable period if its transition
    /// ended now.
    pub fn may_start_stable_period(&self, id: u32) -> bool {
        self.may_be_stable(id, self.control.load(id))
    }

    /// `old` without its orphan pool: the transition is over here, and the
    /// orphan pool's slot, unless a colour uses it, is freed (quarantined).
    fn without_orphan(&mut self, id: u32, old: u32) -> u32 {
        self.transitions.remove(&id);
        if let Some((_, s)) = control::orphan(old) {
            if s != control::slot(old, 0) && s != control::slot(old, 1) {
                self.freed.insert((id, s), Instant::now());
            }
        }
        old & !control::ORPHAN_BITS
    }

    /// Lets service `id` run stateless in its stable periods, or not (not
    /// configured so, or the host's routing rules make a backend's next hop
    /// depend on the client): a stable period in course ends in a
    /// transition at once.
    pub fn set_stateless(&mut self, id: u32, allowed: bool) {
        if allowed {
            self.stateless.insert(id);
            return;
        }
        self.stateless.remove(&id);
        let old = self.control.load(id);
        if control::stateless(old) {
            self.store_word(id, old);
        }
    }

    /// Whether service `id` is in a stable period (stateless now).
    pub fn is_stateless(&self, id: u32) -> bool {
        control::stateless(self.control.load(id))
    }

    /// When service `id`'s transition began, if it has an orphan pool.
    pub fn transition_since(&self, id: u32) -> Option<Instant> {
        control::orphan(self.control.load(id))?;
        Some(
            self.transitions
                .get(&id)
                .copied()
                .unwrap_or_else(Instant::now),
        )
    }

    /// The colour whose connections of the last stateless period may still
    /// be open without a record (the orphan pool's), if any.
    pub fn untracked_colour(&self, id: u32) -> Option<Colour> {
        let w = self.control.load(id);
        if control::stateless(w) {
            return Some(Colour::from_index(control::active(w)));
        }
        control::orphan(w).map(|(c, _)| Colour::from_index(c))
    }

    /// Ends a transition of service `id` if its control word is still
    /// `expected` (what the scan that cleared it saw): the orphan pool goes,
    /// and a service that may run stateless starts a stable period (its
    /// `ADDR_FILTER` slot first, then the word), and the records of the transition
    /// go, which nothing reads in a stable period and a later transition
    /// must not find. Returns whether it ended, and how many records went.
    pub fn end_transition(&mut self, id: u32, expected: u32) -> Result<Option<u64>> {
        let old = self.control.load(id);
        if old != expected || !control::enabled(old) || control::stateless(old) {
            return Ok(None);
        }
        let stable = self.may_be_stable(id, old);
        let mut word = self.without_orphan(id, old);
        if stable {
            let key = self
                .service_keys()?
                .into_iter()
                .find(|(_, v)| *v == id)
                .map(|(k, _)| k)
                .ok_or_else(|| DataplaneError::Invalid(format!("service id {id} has no VIP")))?;
            // Its slot, unless another stable service holds it (then its
            // packets find the word through `SERVICES`, more slowly).
            let (i, entry) = stateless_slot_of(&key, id);
            let slot = self.addr_filter.word64(i);
            let held = slot.load(Ordering::SeqCst);
            if held & bgswitch_common::STATELESS_VALID == 0 || held == entry {
                slot.store(entry, Ordering::SeqCst);
            }
            word |= control::STATELESS;
            self.set_stateless_flag(true)?;
        }
        self.control.store(id, word);
        let flushed = if stable { self.flush_service(id)? } else { 0 };
        Ok(Some(flushed))
    }

    /// A slot not selected now nor by the new word, least recently freed;
    /// waits out the quarantine if it was freed just now.
    fn free_slot(&self, id: u32, in_use: &[u32], taken: &[u32; 2]) -> u32 {
        let mut best = None;
        for s in 0..POOL_SLOTS {
            if in_use.contains(&s) || taken.contains(&s) {
                continue;
            }
            let freed = self.freed.get(&(id, s)).copied();
            match (best, freed) {
                (None, _) => best = Some((s, freed)),
                (Some((_, Some(b))), Some(f)) if f < b => best = Some((s, freed)),
                (Some((_, Some(_))), None) => best = Some((s, None)),
                _ => {}
            }
        }
        let (slot, freed) = best.expect("8 slots, at most 5 excluded");
        if let Some(f) = freed {
            let age = f.elapsed();
            if age < SLOT_QUARANTINE {
                std::thread::sleep(SLOT_QUARANTINE - age);
            }
        }
        slot
    }

    /// Flips service `id` to `colour`: one aligned 32-bit store.
    pub fn set_active(&mut self, id: u32, colour: Colour) -> Result<()> {
        let old = self.control.load(id);
        if !control::enabled(old) {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is not configured"
            )));
        }
        let word = (old & !control::ACTIVE_MASK) | colour.index();
        self.store_word(id, word);
        Ok(())
    }

    /// Sends `basis_points` (0..=10000) of new flows to the idle colour: one
    /// 32-bit store.
    pub fn set_canary(&mut self, id: u32, basis_points: u32) -> Result<()> {
        let old = self.control.load(id);
        if !control::enabled(old) {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is not configured"
            )));
        }
        if basis_points > control::CANARY_FULL {
            return Err(DataplaneError::Invalid(format!(
                "canary share {basis_points} > 10000"
            )));
        }
        let word = (old & !(control::CANARY_MASK << control::CANARY_SHIFT))
            | (basis_points << control::CANARY_SHIFT);
        self.store_word(id, word);
        Ok(())
    }

    /// Makes new flows of service `id` from these source prefixes go to the
    /// idle colour (and only these: others of the service are removed).
    pub fn set_preview(&mut self, id: u32, prefixes: &[(IpAddr, u8)]) -> Result<()> {
        let old = self.control.load(id);
        if !control::enabled(old) {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is not configured"
            )));
        }
        let wanted: Vec<LpmKey<PreviewKey>> = prefixes
            .iter()
            .map(|(ip, len)| {
                let (addr, _) = addr_of(*ip);
                LpmKey::new(32 + u32::from(*len), PreviewKey { service: id, addr })
            })
            .collect();
        for k in &wanted {
            self.preview
                .insert(k, 1, 0)
                .map_err(map_err(names::PREVIEW, "insert"))?;
        }
        let stale: Vec<LpmKey<PreviewKey>> = self
            .preview
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                k.data().service == id
                    && !wanted
                        .iter()
                        .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        let bit = if wanted.is_empty() {
            0
        } else {
            control::PREVIEW
        };
        // Set the bit after adding entries, clear it before removing them.
        let word = (self.control.load(id) & !control::PREVIEW) | bit;
        self.store_word(id, word);
        for k in stale {
            match self.preview.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::PREVIEW, "remove")(e)),
            }
        }
        Ok(())
    }

    /// The preview prefixes the data plane holds for service `id` (IPv4,
    /// the only family services have), as "ADDR/LEN", in the map's order.
    pub fn preview_prefixes(&self, id: u32) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for k in self.preview.keys() {
            let k = k.map_err(map_err(names::PREVIEW, "iterate"))?;
            let (data, bits) = (k.data(), k.prefix_len());
            if data.service != id || !(32..=64).contains(&bits) {
                continue;
            }
            let ip = std::net::Ipv4Addr::from(data.addr[0].to_ne_bytes());
            out.push(format!("{ip}/{}", bits - 32));
        }
        Ok(out)
    }

    /// Stops serving `key` (service `id`).
    pub fn remove_service(&mut self, id: u32, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(names::SERVICES, "remove")(e)),
        }
        self.control.store(id, 0);
        self.transitions.remove(&id);
        // The id may serve another VIP later; its old flows must not follow.
        self.flush_service(id)?;
        let gone: Vec<ServiceKey> = self
            .reply_sources
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.service == id)
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            match self.reply_sources.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::REPLY_SOURCES, "remove")(e)),
            }
        }
        self.rebuild_filter();
        if !self.any_stable() {
            self.set_stateless_flag(false)?;
        }
        Ok(())
    }

    /// Sets `addr`'s bit in the `ADDR_FILTER` bitmap at word `base`.
    fn filter_add(&self, base: u32, addr: &bgswitch_common::Addr) {
        let (word, mask) = bgswitch_common::addr_bit(addr);
        self.addr_filter
            .word64(base + word)
            .fetch_or(mask, Ordering::SeqCst);
    }

    /// Recomputes the bitmaps from the services and reply sources there are
    /// (after a service went, with its flows) and the services in a stable
    /// period: each word is stored whole, and a bit still needed is set
    /// before and after, so no packet ever sees it clear.
    fn rebuild_filter(&self) {
        let mut bits = vec![0u64; (2 * ADDR_FILTER_WORDS + STATELESS_SLOTS) as usize];
        let mut services: Vec<(ServiceKey, u32)> = self
            .services
            .iter()
            .flatten()
            .map(|(k, v)| (k, v.id))
            .collect();
        // The slot of a service that holds it now stays its own.
        let now_held = |k: &ServiceKey, id: u32| {
            let (i, entry) = stateless_slot_of(k, id);
            self.addr_filter.word64(i).load(Ordering::SeqCst) == entry
        };
        services.sort_by_key(|(k, id)| (!now_held(k, *id), *id));
        for (k, id) in services {
            let (w, m) = bgswitch_common::addr_bit(&k.addr);
            bits[w as usize] |= m;
            if control::stateless(self.control.load(id)) {
                let (i, entry) = stateless_slot_of(&k, id);
                if bits[i as usize] == 0 {
                    bits[i as usize] = entry;
                }
            }
        }
        for k in self.reply_sources.keys().flatten() {
            let (w, m) = bgswitch_common::addr_bit(&k.addr);
            bits[(ADDR_FILTER_WORDS + w) as usize] |= m;
        }
        for (i, b) in bits.into_iter().enumerate() {
            self.addr_filter.word64(i as u32).store(b, Ordering::SeqCst);
        }
    }

    /// Removes only the `SERVICES` entry of `key`.
    pub fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::SERVICES, "remove")(e)),
        }
    }

    /// Removes pinned links of interfaces that are not configured (left by an
    /// earlier daemon with another config), which detaches them.
    pub fn detach_unknown_pins(&mut self, configured: &[String]) -> Result<()> {
        let Some(bpffs) = &self.bpffs else {
            return Ok(());
        };
        let dir = paths::pin_root(bpffs).join("links");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let iface = name.split_once('-').map_or(name.as_str(), |(_, i)| i);
            if !configured.iter().any(|c| c == iface) {
                log::info!("{iface}: pinned XDP link from an earlier config; detaching");
                std::fs::remove_file(e.path()).map_err(io_err("unpinning", &e.path()))?;
            }
        }
        Ok(())
    }

    /// The VIPs the data plane serves now, with their service ids.
    pub fn service_keys(&self) -> Result<Vec<(ServiceKey, u32)>> {
        self.services
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.id)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::SERVICES, "iterate"))
    }

    /// Counters of one colour of a service, summed over CPUs: its traffic
    /// the sum of its backend positions' counters (the program counts a
    /// packet once, in its backend's slot), its RSTs and SYN-ACKs its own.
    pub fn colour_stats(&self, id: u32, colour: Colour) -> Result<ColourStats> {
        let v = self
            .service_stats
            .get(&(id * 2 + colour.index()), 0)
            .map_err(map_err(names::SERVICE_STATS, "get"))?;
        let mut a = v.iter().fold(ColourStats::default(), |mut a, s| {
            a.backend_rsts += s.backend_rsts;
            a.syn_acks += s.syn_acks;
            a
        });
        for i in 0..MAX_BACKENDS {
            let b = self.backend_stats(backend_stat_id(id, colour, i))?;
            a.packets += b.packets;
            a.bytes += b.bytes;
            a.new_flows += b.new_flows;
            a.reply_packets += b.reply_packets;
            a.reply_bytes += b.reply_bytes;
        }
        Ok(a)
    }

    /// Counters of one backend, summed over CPUs.
    pub fn backend_stats(&self, stat_id: u32) -> Result<BackendStats> {
        let v = self
            .backend_stats
            .get(&stat_id, 0)
            .map_err(map_err(names::BACKEND_STATS, "get"))?;
        Ok(v.iter().fold(BackendStats::default(), |mut a, s| {
            a.packets += s.packets;
            a.bytes += s.bytes;
            a.new_flows += s.new_flows;
            a.reply_packets += s.reply_packets;
            a.reply_bytes += s.reply_bytes;
            a
        }))
    }

    /// The global counters, summed over CPUs, with their names.
    pub fn global_stats(&self) -> Result<Vec<(&'static str, u64)>> {
        let per_cpu = self
            .global_stats
            .get(&0, 0)
            .map_err(map_err(names::GLOBAL_STATS, "get"))?;
        Ok(global::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, per_cpu.iter().map(|c| c[i]).sum()))
            .collect())
    }

    /// Counts forward flow entries per (service id, colour).
    pub fn flow_counts(
        &self,
        udp_idle: Duration,
        tcp_idle: Duration,
    ) -> Result<StdHashMap<(u32, Colour), FlowCounts>> {
        let rules = self.flow_rules(udp_idle, tcp_idle)?;
        self.table_reads.set(self.table_reads.get() + 1);
        Ok(rules.count_entries(self.flow_entries()?))
    }

    /// Whole reads of the flow table begun through this handle: each takes
    /// about 0.8 s of a thread per million flows.
    pub fn flow_table_reads(&self) -> u64 {
        self.table_reads.get()
    }

    /// The same count, prepared to run on another thread (the daemon's
    /// event loop must not wait for a large table): a duplicate of the
    /// table's descriptor and the clock read now. `FlowScan::count` reads
    /// the table in batches only; where the kernel refuses batches it says
    /// so (`EINVAL`/`ENOTSUPP`) and `flow_counts` is the way.
    pub fn flow_scan(&self, udp_idle: Duration, tcp_idle: Duration) -> Result<FlowScan> {
        let fd = self.flows_fd.try_clone().map_err(io_err(
            "duplicating the descriptor of",
            Path::new(names::FLOWS),
        ))?;
        let rules = self.flow_rules(udp_idle, tcp_idle)?;
        let words = rules
            .choices
            .keys()
            .map(|id| (*id, self.control.load(*id)))
            .collect();
        self.table_reads.set(self.table_reads.get() + 1);
        Ok(FlowScan { fd, rules, words })
    }

    fn flow_rules(&self, udp_idle: Duration, tcp_idle: Duration) -> Result<FlowRules> {
        let mut choices = StdHashMap::new();
        for (_, id) in self.service_keys()? {
            let w = self.control.load(id);
            let in_transition = control::enabled(w)
                && !control::stateless(w)
                && (control::orphan(w).is_some() || self.stateless.contains(&id));
            if in_transition {
                choices.insert(
                    id,
                    self.read_pool(id, control::slot(w, control::active(w)))?,
                );
            }
        }
        Ok(FlowRules {
            now: self.jiffies()?,
            udp_idle: self.clock.ticks(udp_idle),
            tcp_idle: self.clock.ticks(tcp_idle),
            syn_timeout: SYN_TIMEOUT_S * self.clock.hz,
            choices,
        })
    }

    /// Every entry of the flow table: read in batches (BPF_MAP_LOOKUP_BATCH,
    /// thousands of entries per syscall), or entry by entry where the kernel
    /// refuses batches.
    fn flow_entries(&self) -> Result<Vec<(FlowKey4, FlowEntry)>> {
        match lookup_batch::<FlowKey4, FlowEntry>(self.flows_fd.as_fd()) {
            Ok(v) => Ok(v),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(524) => {
                let mut v = Vec::new();
                for item in self.flows.iter() {
                    match item {
                        Ok(kv) => v.push(kv),
                        // Evicted between "next key" and "lookup": skip it.
                        Err(aya::maps::MapError::KeyNotFound) => continue,
                        Err(e) => return Err(map_err(names::FLOWS, "iterate")(e)),
                    }
                }
                Ok(v)
            }
            Err(e) => Err(DataplaneError::Io {
                op: "BPF_MAP_LOOKUP_BATCH on",
                path: names::FLOWS.into(),
                source: e,
            }),
        }
    }

    /// Forgets every flow of service `id` not on `keep` (both directions), so
    /// their next packets follow the active colour (`flip --force`). Returns
    /// how many flows were moved.
    pub fn flush_flows(&mut self, id: u32, keep: Colour) -> Result<u64> {
        // Connections of a stateless period without a record would go to
        // the orphan pool: they follow the active colour too.
        let w = self.control.load(id);
        if control::orphan(w).is_some_and(|(c, _)| c != keep.index()) {
            let word = self.without_orphan(id, w);
            self.control.store(id, word);
        }
        self.flush(id, Some(keep))
    }

    /// Forgets every flow of service `id` (both colours, both directions).
    pub fn flush_service(&mut self, id: u32) -> Result<u64> {
        self.flush(id, None)
    }

    fn flush(&mut self, id: u32, keep: Option<Colour>) -> Result<u64> {
        let mut doomed = Vec::new();
        for (k, e) in self.flow_entries()? {
            if e.service == id && keep.is_none_or(|k| e.colour as u32 != k.index()) {
                doomed.push(k);
            }
        }
        let mut moved = 0;
        let mut result = Ok(());
        for k in doomed {
            match self.flows.remove(&k) {
                Ok(()) => moved += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    result = Err(map_err(names::FLOWS, "remove")(e));
                    break;
                }
            }
        }
        // After the deletions: per-CPU cache slots of deleted flows stop
        // being used (a CPU that reads the new generation no longer finds
        // the entries).
        if moved > 0 || result.is_err() {
            self.bump_flow_gen();
        }
        result.map(|()| moved)
    }

    /// Invalidates every CPU's flow cache and every flow's cached next hop
    /// (see `bgswitch_common::CachedFlow`).
    pub fn bump_flow_gen(&self) {
        self.flow_gen.bump();
    }

    /// The current `FLOW_GEN` value.
    pub fn flow_gen(&self) -> u64 {
        self.flow_gen.get()
    }

    /// Starts a thread that listens to the kernel's route, neighbour,
    /// address, rule and link notifications (netlink, in the caller's
    /// network namespace) and bumps `FLOW_GEN` on each, so open flows look
    /// their next hop up again at once instead of at their next refresh.
    /// Bursts are folded: at most one bump per 10 ms after the first. The
    /// thread ends after this data plane is dropped.
    pub fn watch_kernel_changes(&self) -> io::Result<()> {
        let mut sock = netlink::RouteEvents::open()?;
        let gen = std::sync::Arc::downgrade(&self.flow_gen);
        std::thread::Builder::new()
            .name("bgswitch-netlink".into())
            .spawn(move || loop {
                match sock.wait(Duration::from_secs(1)) {
                    Ok(false) => {}
                    Ok(true) => {
                        let Some(g) = gen.upgrade() else { return };
                        g.bump();
                        drop(g);
                        std::thread::sleep(Duration::from_millis(10));
                        if sock.drain() {
                            if let Some(g) = gen.upgrade() {
                                g.bump();
                            }
                        }
                    }
                    Err(e) => {
                        log::warn!("netlink route events: {e}; next hops refresh on their own");
                        return;
                    }
                }
                if gen.strong_count() == 0 {
                    return;
                }
            })?;
        Ok(())
    }

    /// Tears everything down: detaches every interface and removes every
    /// pin. Traffic to the VIPs stops being switched.
    pub fn destroy(mut self) -> Result<()> {
        let ifaces: Vec<String> = self.links.keys().cloned().collect();
        for i in ifaces {
            self.detach(&i)?;
        }
        if let Some(bpffs) = self.bpffs.take() {
            remove_pins(&bpffs)?;
        }
        Ok(())
    }
}

/// Whether `iface`'s operational state is up (`None` if unknown).
fn oper_up(iface: &str) -> Option<bool> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/operstate")).ok()?;
    match s.trim() {
        "up" | "unknown" => Some(true),
        "down" | "lowerlayerdown" | "notpresent" | "dormant" => Some(false),
        _ => None,
    }
}

/// The interface index a pinned XDP link is attached to (0 once its device
/// is gone), read with BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD.
fn link_ifindex(pin: &Path) -> io::Result<u32> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: bpf(2) with a zeroed attr whose first field points at a valid C string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned here.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, (pad), then the union; xdp.ifindex at 16.
    let mut info = [0u8; 256];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: bpf(2) writing at most info.len() bytes into info.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

fn link_pin_path(bpffs: &Path, iface: &str, mode: AttachMode) -> PathBuf {
    paths::link_pin(bpffs, &format!("{}-{iface}", mode.as_str()))
}

/// The per-CPU flow cache's size: the flows one CPU would see if `max_flows`
/// were spread over the CPUs this process may run on, as a power of two
/// within `FLOW_CACHE_MIN_SLOTS..=FLOW_CACHE_SLOTS` (so a host with many
/// CPUs does not pay 4 MiB on each).
fn flow_cache_slots(max_flows: u32) -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (max_flows / cpus.max(1)).max(1).next_power_of_two().clamp(
        bgswitch_common::FLOW_CACHE_MIN_SLOTS,
        bgswitch_common::FLOW_CACHE_SLOTS,
    )
}

/// One more than the highest CPU id the kernel may bring online
/// (`/sys/devices/system/cpu/possible`, e.g. "0-63"): every id
/// `bpf_get_smp_processor_id()` can return is below it. Without that file,
/// the CPUs this process may run on.
pub fn cpu_id_bound() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|t| cpu_list_bound(&t))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// One more than the highest CPU of a kernel CPU list ("0-3,8,10-11").
fn cpu_list_bound(text: &str) -> Option<u32> {
    let mut top = None;
    for part in text.trim().split(',') {
        let last = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                (a <= b).then_some(b)?
            }
            None => part.parse::<u32>().ok()?,
        };
        top = top.max(Some(last));
    }
    top?.checked_add(1)
}

/// Removes an older layout's pin directory (its maps) once no XDP link of it
/// is left pinned.
fn remove_layout_if_unused(old_root: &Path) {
    let links_left = std::fs::read_dir(old_root.join("links"))
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    if links_left == 0 {
        match std::fs::remove_dir_all(old_root) {
            Ok(()) => log::info!(
                "removed the pins of an older map layout at {}",
                old_root.display()
            ),
            Err(e) => log::warn!("could not remove {}: {e}", old_root.display()),
        }
    }
}

/// Removes every bgswitch pin under `bpffs` (links first, which detaches XDP
/// from each interface once no process holds the link; then maps).
pub fn remove_pins(bpffs: &Path) -> Result<()> {
    let root = bpffs.join(paths::PIN_DIR);
    if !root.exists() {
        return Ok(());
    }
    let links = paths::pin_root(bpffs).join("links");
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path()).map_err(io_err("unpinning", &e.path()))?;
        }
    }
    std::fs::remove_dir_all(&root).map_err(io_err("removing", &root))
}

/// Reads a whole hash map with BPF_MAP_LOOKUP_BATCH (Linux 5.6).
fn lookup_batch<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut chunk = 4096usize;
    let mut out = Vec::new();
    let mut token = [0u64; 2];
    let mut first = true;
    loop {
        let mut keys = vec![K::default(); chunk];
        let mut values = vec![V::default(); chunk];
        let mut next = [0u64; 2];
        // union bpf_attr, batch: in_batch, out_batch, keys, values, count,
        // map_fd, elem_flags, flags.
        let mut attr = [0u64; 8];
        attr[0] = if first { 0 } else { token.as_ptr() as u64 };
        attr[1] = next.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = chunk as u64 | (u64::from(fd.as_raw_fd() as u32) << 32);
        // SAFETY: the kernel writes at most `count` keys and values into
        // buffers of that many elements, and the batch token into `next`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let got = (attr[4] & 0xffff_ffff) as usize;
        match &err {
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                // A bucket holds more entries than the buffer: grow it.
                chunk *= 4;
                continue;
            }
            Some(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                return Err(io::Error::new(e.kind(), e.to_string()));
            }
            _ => {}
        }
        out.extend(keys.into_iter().zip(values).take(got));
        if err.is_some() {
            return Ok(out); // ENOENT: that was the last batch.
        }
        token = next;
        first = false;
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A `BPF_F_MMAPABLE` array of 8-byte slots mapped into this process, read
/// and written through atomics: the `CONTROL` words (a flip is one aligned
/// 32-bit atomic store into the kernel's memory), the `ADDR_FILTER` bitmaps
/// and the `FLOW_GEN` counter.
struct MappedArray {
    ptr: *mut u8,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for MappedArray {}

/// Array maps lay elements out at a stride of the value size rounded up to
/// 8; every mapped array here has values of at most 8 bytes.
const MAPPED_STRIDE: usize = 8;

impl MappedArray {
    fn map(fd: BorrowedFd<'_>, entries: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries as usize * MAPPED_STRIDE).div_ceil(page) * page;
        // SAFETY: mapping a BPF_F_MMAPABLE array map fd, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            entries,
        })
    }

    fn word(&self, id: u32) -> &AtomicU32 {
        assert!(id < self.entries, "service id {id} out of range");
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base, stride 8),
        // and the mapping lives as long as self.
        unsafe { &*(self.ptr.add(id as usize * MAPPED_STRIDE) as *const AtomicU32) }
    }

    fn load(&self, id: u32) -> u32 {
        self.word(id).load(Ordering::SeqCst)
    }

    /// Slot `id` of an array of u64 values.
    fn word64(&self, id: u32) -> &std::sync::atomic::AtomicU64 {
        assert!(id < self.entries, "word {id} out of range");
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base,
        // stride 8), and the mapping lives as long as self.
        unsafe {
            &*(self.ptr.add(id as usize * MAPPED_STRIDE) as *const std::sync::atomic::AtomicU64)
        }
    }

    fn store(&self, id: u32, word: u32) {
        self.word(id).store(word, Ordering::SeqCst);
    }
}

/// The mapped `FLOW_GEN` counter: one u64 that only userspace writes.
struct GenCounter(MappedArray);

// SAFETY: the mapping is only accessed through atomics, and unmapped once
// (on drop of the last owner).
unsafe impl Send for GenCounter {}
// SAFETY: as above.
unsafe impl Sync for GenCounter {}

impl GenCounter {
    fn word(&self) -> &std::sync::atomic::AtomicU64 {
        self.0.word64(0)
    }

    fn bump(&self) {
        self.word().fetch_add(1, Ordering::SeqCst);
    }

    fn get(&self) -> u64 {
        self.word().load(Ordering::SeqCst)
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_cache_is_a_power_of_two_within_bounds_and_cpu_lists_count() {
        for flows in [1, 1024, 4096, 262_144, 67_108_864] {
            let n = flow_cache_slots(flows);
            assert!(n.is_power_of_two(), "{flows}: {n}");
            assert!(
                (bgswitch_common::FLOW_CACHE_MIN_SLOTS..=bgswitch_common::FLOW_CACHE_SLOTS)
                    .contains(&n),
                "{flows}: {n}"
            );
        }
        assert_eq!(cpu_list_bound("0-63\n"), Some(64));
        assert_eq!(cpu_list_bound("0,2-3,8"), Some(9));
        assert_eq!(cpu_list_bound("8,0-3"), Some(9));
        assert_eq!(cpu_list_bound("0"), Some(1));
        assert_eq!(cpu_list_bound("x"), None);
        assert_eq!(cpu_list_bound("3-1"), None);
        assert!(cpu_id_bound() >= 1);
    }

    #[test]
    fn backend_stat_ids_do_not_collide() {
        let mut seen = std::collections::HashSet::new();
        for s in [0, 1, MAX_SERVICES - 1] {
            for c in Colour::BOTH {
                for i in [0, MAX_BACKENDS - 1] {
                    let id = backend_stat_id(s, c, i);
                    assert!(id < BACKEND_STAT_ENTRIES);
                    assert!(seen.insert(id));
                }
            }
        }
    }
}
