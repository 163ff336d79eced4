//! Loading: the program and its maps, adopting the pinned maps after
//! checking their shape (so flows and counters survive a restart), the
//! per-CPU flow cache sized to the CPUs, and running the program on a
//! frame (BPF_PROG_TEST_RUN) for tests and `simulate`.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    os::fd::AsFd as _,
    path::Path,
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::LpmTrie, Array, DevMapHash, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray,
    },
    programs::{TestRun as _, TestRunOptions},
    EbpfLoader,
};
use bgswitch_common::{
    global, maps as names, Backend, BackendStats, ColourStats, FlowEntry, FlowEntry6, FlowKey,
    FlowKey4, HalfOpen4, HalfOpen6, PreviewKey, ReplySource, ServiceKey, ServiceValue, Settings,
    ADDR_FILTER_LEN, BACKEND_ENTRIES, BACKEND_STAT_ENTRIES, MAX_INTERFACES, MAX_PREVIEW_PREFIXES,
    MAX_SERVICES, POOL_SLOTS,
};

use super::{
    bpffs,
    clock::Clock,
    flow_gen::GenCounter,
    flows::{FlowTables, HalfTable, Table},
    hook, io_err, map_err,
    mapped::MappedArray,
    pins, Dataplane, DataplaneError, LoadOptions, Result, BPF_F_MMAPABLE,
};
use crate::paths;

/// The XDP object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bgswitch"));

/// The expected shape of each map, checked against pins before adopting them.
fn expected_maps(max_flows: u32) -> [(&'static str, MapType, u32, u32, u32, u32); 20] {
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
        // Pinned so their entries stay while no daemon runs: the kernel
        // empties a program array when the last user reference to it goes.
        (
            bgswitch_common::tail::XDP_MAP,
            MapType::ProgramArray,
            4,
            4,
            bgswitch_common::tail::COUNT,
            0,
        ),
        (
            bgswitch_common::tail::TC_MAP,
            MapType::ProgramArray,
            4,
            4,
            bgswitch_common::tail::COUNT,
            0,
        ),
        (
            names::FLOWS6,
            MapType::LruHash,
            sz(size_of::<FlowKey>()),
            sz(size_of::<FlowEntry6>()),
            max_flows,
            0,
        ),
        (
            names::HALF_OPEN,
            MapType::Array,
            4,
            sz(size_of::<HalfOpen4>()),
            half_open_buckets(max_flows),
            BPF_F_MMAPABLE,
        ),
        (
            names::HALF_OPEN6,
            MapType::Array,
            4,
            sz(size_of::<HalfOpen6>()),
            half_open_buckets(max_flows),
            BPF_F_MMAPABLE,
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
        (names::ATTACHED, MapType::Hash, 4, 4, MAX_INTERFACES, 0),
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
            ADDR_FILTER_LEN,
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
        | Map::LpmTrie(d)
        | Map::ProgramArray(d) => Some(d),
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

impl Dataplane {
    /// Loads the XDP program and its maps (adopting pinned maps when a pin
    /// root is given).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, opts.max_flows);
        loader.map_max_entries(names::FLOWS6, opts.max_flows);
        loader.map_max_entries(names::HALF_OPEN, half_open_buckets(opts.max_flows));
        loader.map_max_entries(names::HALF_OPEN6, half_open_buckets(opts.max_flows));
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
        // IPv6: a quarter of the slots (`CACHE6_SHIFT_EXTRA`), one region
        // per CPU id too.
        loader.map_max_entries(
            names::FLOW_CACHE6,
            (cache_slots >> bgswitch_common::CACHE6_SHIFT_EXTRA) * cpu_ids,
        );
        let pin_place = opts.bpffs.as_deref().map(bpffs::place).transpose()?;
        // One controller per pinned data plane: taken before any pin is
        // read or adopted.
        let pin_lock = match &pin_place {
            None => None,
            Some(place) => Some(pins::lock_pins(&place.root).map_err(|e| match e {
                DataplaneError::Held { pid, .. } => DataplaneError::Held {
                    path: place.configured.join(paths::PIN_DIR),
                    pid,
                },
                other => other,
            })?),
        };
        if let Some(place) = &pin_place {
            let bpffs = &place.root;
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
        // The programs are verified when first used (`hook`): a host with
        // only TC attachments does not pay for the XDP program's
        // verification at every start, nor one with only XDP for TC's.
        let mut ebpf = loader.load(OBJECT)?;
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
        let flows = FlowTables {
            v4: Table::open(names::FLOWS, take(names::FLOWS)?)?,
            v6: Table::open(names::FLOWS6, take(names::FLOWS6)?)?,
            half4: HalfTable::open(names::HALF_OPEN, take(names::HALF_OPEN)?)?,
            half6: HalfTable::open(names::HALF_OPEN6, take(names::HALF_OPEN6)?)?,
        };
        let settings =
            Array::try_from(take(names::SETTINGS)?).map_err(map_err(names::SETTINGS, "open"))?;
        let tx_ports = DevMapHash::try_from(take(names::TX_PORTS)?)
            .map_err(map_err(names::TX_PORTS, "open"))?;
        let attached =
            HashMap::try_from(take(names::ATTACHED)?).map_err(map_err(names::ATTACHED, "open"))?;
        let service_stats = PerCpuArray::try_from(take(names::SERVICE_STATS)?)
            .map_err(map_err(names::SERVICE_STATS, "open"))?;
        let backend_stats = PerCpuArray::try_from(take(names::BACKEND_STATS)?)
            .map_err(map_err(names::BACKEND_STATS, "open"))?;
        let global_stats = PerCpuArray::try_from(take(names::GLOBAL_STATS)?)
            .map_err(map_err(names::GLOBAL_STATS, "open"))?;
        let preview =
            LpmTrie::try_from(take(names::PREVIEW)?).map_err(map_err(names::PREVIEW, "open"))?;
        let reply_sources = HashMap::try_from(take(names::REPLY_SOURCES)?)
            .map_err(map_err(names::REPLY_SOURCES, "open"))?;
        let filter_map = take(names::ADDR_FILTER)?;
        let addr_filter = match &filter_map {
            Map::Array(data) => {
                MappedArray::map(data.fd().as_fd(), ADDR_FILTER_LEN).map_err(|e| {
                    DataplaneError::Io {
                        op: "mmap",
                        path: names::ADDR_FILTER.into(),
                        source: e,
                    }
                })?
            }
            _ => {
                return Err(DataplaneError::Invalid(
                    "ADDR_FILTER is not an array".into(),
                ))
            }
        };
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
        let clock = Clock::load(&mut ebpf)?;
        Ok(Self {
            ebpf,
            bpffs: pin_place.as_ref().map(|p| p.root.clone()),
            pin_place,
            services,
            control,
            pool_sizes,
            backends,
            flows,
            settings,
            tx_ports,
            attached,
            // The mappings hold their own references to the maps, but the
            // programs, loaded later, refer to them by these descriptors.
            _mapped_maps: [control_map, filter_map, flow_gen_map],
            _pin_lock: pin_lock,
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
            backend_hops: false,
            clock,
            cache_slots,
            half_buckets: half_open_buckets(opts.max_flows),
            addr_filter,
            flow_gen,
            table_reads: std::cell::Cell::new(0),
        })
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
        let prog = hook::xdp_program(&mut self.ebpf)?;
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

    /// Like [`Dataplane::test_run`], through the TC program (loaded on
    /// first use): the verdict is a TC action (`TC_ACT_UNSPEC`, -1 as u32,
    /// for a frame the program leaves to what comes next; 7,
    /// `TC_ACT_REDIRECT`, for one it sends). `ingress` sets the socket
    /// buffer's device; `gso_size` makes it stand for segments of that many
    /// payload bytes (0: one packet).
    pub fn test_run_tc(
        &mut self,
        frame: &[u8],
        ingress: Option<u32>,
        gso_size: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff (192 bytes): ifindex at 40, gso_segs at 164,
        // gso_size at 176; the kernel takes only these (and a few others)
        // from a test run's context.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ingress.unwrap_or(0).to_ne_bytes());
        if gso_size != 0 {
            ctx[164..168].copy_from_slice(&2u32.to_ne_bytes());
            ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        }
        let with_ctx = ingress.is_some() || gso_size != 0;
        let prog = hook::tc_program(&mut self.ebpf)?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: with_ctx.then_some(&ctx[..]),
            repeat,
            ..TestRunOptions::new()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration))
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

    /// The instructions the kernel's verifier processed for each program
    /// loaded so far (name, count; kernel 5.16 and later report it): the
    /// verifier refuses a program past one million, and the XDP and TC
    /// programs are large, so tests watch the headroom.
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let n = prog.info().ok()?.verified_instruction_count()?;
                Some((name.to_owned(), n))
            })
            .collect();
        out.sort();
        out
    }

    /// The kernel's id of this data plane's map `name`, among the maps its
    /// XDP programs use (the entry point and the programs it tail-calls,
    /// loaded on first use): how a test or the bench opens one map of this
    /// load, when other loads may be alive beside it.
    pub fn map_id(&mut self, name: &str) -> Result<u32> {
        hook::xdp_program(&mut self.ebpf)?;
        for (_, prog) in self.ebpf.programs() {
            let Ok(info) = prog.info() else {
                // Not loaded (TC, not used yet).
                continue;
            };
            for id in info.map_ids()?.unwrap_or_default() {
                if MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(name)) {
                    return Ok(id);
                }
            }
        }
        Err(DataplaneError::Invalid(format!(
            "no loaded program of this data plane uses a map {name}"
        )))
    }

    /// Slots of the per-CPU flow cache (64 bytes each, on every possible CPU).
    pub fn flow_cache_slots(&self) -> u32 {
        self.cache_slots
    }
}

/// The records each half-open table holds (TCP flows between their SYN
/// and the client's ACK, and connections whose record was missing, see
/// `bgswitch-ebpf/src/handshake.rs`): a quarter of `max_flows`, at least
/// 1024, as a power of two (a bucket is a hash's top bits). Honest
/// handshakes stay in it for one round trip; a SYN flood churns it, and
/// only it.
pub fn half_open_slots(max_flows: u32) -> u32 {
    (max_flows / 4).clamp(1024, 1 << 30).next_power_of_two()
}

/// The two-way buckets of each half-open table (`bgswitch_common::HalfOpen`).
pub fn half_open_buckets(max_flows: u32) -> u32 {
    half_open_slots(max_flows) / 2
}

/// Kernel memory of one half-open table (IPv6's if `v6`).
pub fn half_open_bytes(max_flows: u32, v6: bool) -> u64 {
    let bucket = if v6 {
        std::mem::size_of::<HalfOpen6>()
    } else {
        std::mem::size_of::<HalfOpen4>()
    };
    u64::from(half_open_buckets(max_flows)) * bucket as u64
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
}
