//! Part 1 (program cost) and the program-cost and memory half of part 5
//! (scale), through BPF_PROG_TEST_RUN.
//!
//! Method: the bgswitch program (loaded by `bgswitch::dataplane`, maps
//! private) and the `xdp_pass` baseline run on the same frames with the same
//! ingress interface, on one pinned CPU, in interleaved rounds (the case order
//! rotates every round). Each round yields, per case, the median over several
//! calls of the kernel's per-run time; the reported cost is the per-round
//! difference to the baseline, as a median with min–max over rounds.
//!
//! `repeat > 1` reruns the program on the frame the previous run rewrote, so
//! services are configured with an identity rewrite (backend = VIP); with
//! routes and permanent neighbours in a scratch namespace every packet takes
//! the full path (lookup, rewrite, FIB lookup, TTL and MACs, redirect). The TTL
//! starts at 255 and `repeat` stays below 250, so no run hits the TTL check.
//!
//! New flows cannot be repeated (the first run records the flow), so a SYN
//! with a fresh 5-tuple runs once per call (repeat = 1), as do an established
//! packet and the baseline in the same rounds. A single run per call is cold
//! (the syscall has just disturbed caches and predictors), so the reported
//! new-flow cost is the established packet's warm cost (repeat N) plus what a
//! new flow adds over an established packet when both run cold.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{TestRun as _, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use bgswitch::{
    config::AttachSetting,
    dataplane::{backend_of, backend_stat_id, service_key, AttachMode, Dataplane, LoadOptions},
    model::Colour,
};
use bgswitch_common::{
    maps as names, FlowEntry, FlowEntry6, FlowKey, FlowKey4, HalfOpen4, HalfOpen6, PROTO_TCP,
    PROTO_UDP,
};
use bgswitch_tests::{ip_ns, TempNetns};
use serde_json::{json, Value};

use crate::{objects, sys};

mod cases;
mod components;
mod program;
mod scale;
mod spin;

use cases::Case;
pub use components::{assert_components, components};
pub use program::{assert_checks, program_cost};
pub use scale::{assert_scale, scale};
pub use spin::spin;

pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;
/// The TC program's verdicts: left to the stack, sent.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Next hop towards the VIP (= the identity "backend") and to the client.
const NEXT_HOP: &str = "198.18.1.2";
const TCP_PORT: u16 = 80;
/// A stateless TCP service (service 2), in its stable period.
const STATELESS_PORT: u16 = 81;
const UDP_PORT: u16 = 53;
const FRAME_LEN: usize = 64;
/// The IPv6 twins (`2001:db8:18:S::H` of `198.18.S.H`): the client, the
/// VIP (of services 3, TCP, and 4, UDP, on the same ports as IPv4's), the
/// next hop towards it. An IPv6 TCP frame is 74 bytes (its headers alone);
/// an IPv6 UDP frame 64. None of these addresses shares an `ADDR_FILTER`
/// bit with the IPv4 ones, so the IPv4 packets take the same path as
/// without IPv6 services.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x10);
const NEXT_HOP6: &str = "2001:db8:18:1::2";
/// Service ids of the IPv6 services.
const TCP6_ID: u32 = 3;
const UDP6_ID: u32 = 4;

/// How much to measure.
#[derive(Clone, Debug)]
pub struct CostOptions {
    pub rounds: usize,
    /// Calls per case per round with `repeat`.
    pub calls: usize,
    pub repeat: u32,
    /// Calls per round of the repeat = 1 cases.
    pub single_calls: usize,
    /// Flow table size of part 1's data plane.
    pub max_flows: u32,
    /// Flow table size of the scale run, and the fill levels measured.
    pub scale_max_flows: u32,
    pub fill_levels: Vec<u32>,
    pub scale_rounds: usize,
    pub scale_single_calls: usize,
    pub cpu: usize,
}

impl CostOptions {
    pub fn full(cpu: usize) -> Self {
        let max = 1 << 20;
        Self {
            rounds: 31,
            calls: 15,
            repeat: 200,
            single_calls: 401,
            max_flows: 262_144,
            scale_max_flows: max,
            fill_levels: vec![1, 1_000, 10_000, 100_000, 500_000, 1_000_000, max],
            scale_rounds: 7,
            scale_single_calls: 801,
            cpu,
        }
    }
    pub fn quick(cpu: usize) -> Self {
        Self {
            rounds: 3,
            calls: 3,
            repeat: 50,
            single_calls: 21,
            max_flows: 4096,
            scale_max_flows: 4096,
            fill_levels: vec![1, 1000, 4096],
            scale_rounds: 1,
            scale_single_calls: 21,
            cpu,
        }
    }
}

/// A scratch namespace with two veths: v0 faces clients (198.18.0.1/24 and
/// 2001:db8:18::1/64, the client's neighbour known), v1 faces the next hop
/// towards the VIP (198.18.1.1/24 and 2001:db8:18:1::1/64, neighbour
/// known); forwarding on for both families, IPv6 addresses without
/// duplicate address detection.
pub struct Bed {
    ns: TempNetns,
    pub v0: u32,
    pub v1: u32,
}

impl Bed {
    pub fn create() -> Result<Bed> {
        let ns = TempNetns::create()?;
        let n = ns.name().to_string();
        let ipn = |args: &[&str]| ip_ns(&n, args);
        // Before the links: they take the namespace's defaults.
        sys::ns_sysctl(&n, "net.ipv6.conf.all.accept_dad", "0")?;
        sys::ns_sysctl(&n, "net.ipv6.conf.default.accept_dad", "0")?;
        ipn(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
        ipn(&["addr", "add", "198.18.0.1/24", "dev", "v0"])?;
        ipn(&["addr", "add", "198.18.1.1/24", "dev", "v1"])?;
        ipn(&[
            "-6",
            "addr",
            "add",
            "2001:db8:18::1/64",
            "dev",
            "v0",
            "nodad",
        ])?;
        ipn(&[
            "-6",
            "addr",
            "add",
            "2001:db8:18:1::1/64",
            "dev",
            "v1",
            "nodad",
        ])?;
        ipn(&["link", "set", "v0", "up"])?;
        ipn(&["link", "set", "v1", "up"])?;
        ipn(&[
            "neigh",
            "replace",
            &CLIENT.to_string(),
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "v0",
            "nud",
            "permanent",
        ])?;
        ipn(&[
            "neigh",
            "replace",
            NEXT_HOP,
            "lladdr",
            "02:00:00:00:01:02",
            "dev",
            "v1",
            "nud",
            "permanent",
        ])?;
        ipn(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            NEXT_HOP,
            "dev",
            "v1",
        ])?;
        ipn(&[
            "route",
            "add",
            "198.18.64.0/18",
            "via",
            "198.18.0.2",
            "dev",
            "v0",
        ])?;
        ipn(&[
            "-6",
            "neigh",
            "replace",
            &CLIENT6.to_string(),
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "v0",
            "nud",
            "permanent",
        ])?;
        ipn(&[
            "-6",
            "neigh",
            "replace",
            NEXT_HOP6,
            "lladdr",
            "02:00:00:00:01:02",
            "dev",
            "v1",
            "nud",
            "permanent",
        ])?;
        ipn(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            NEXT_HOP6,
            "dev",
            "v1",
        ])?;
        ipn(&[
            "-6",
            "route",
            "add",
            "2001:db8:18:64::/64",
            "via",
            &CLIENT6.to_string(),
            "dev",
            "v0",
        ])?;
        sys::ns_sysctl(&n, "net.ipv4.ip_forward", "1")?;
        sys::ns_sysctl(&n, "net.ipv6.conf.all.forwarding", "1")?;
        let v0 = bgswitch_tests::netns::ifindex(&n, "v0")?;
        let v1 = bgswitch_tests::netns::ifindex(&n, "v1")?;
        Ok(Bed { ns, v0, v1 })
    }
    pub fn name(&self) -> &str {
        self.ns.name()
    }
}

/// The baseline program.
pub struct PassProgram {
    ebpf: Ebpf,
}

/// `struct xdp_md` for BPF_PROG_TEST_RUN: data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex.
pub fn xdp_ctx(len: usize, ingress: u32) -> Vec<u8> {
    [0u32, len as u32, 0, ingress, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

impl PassProgram {
    pub fn load() -> Result<Self> {
        objects::check()?;
        let mut ebpf = Ebpf::load(objects::XDP_PASS).context("loading xdp_pass")?;
        let prog: &mut Xdp = ebpf
            .program_mut("xdp_pass")
            .context("no xdp_pass program")?
            .try_into()?;
        prog.load().context("verifying xdp_pass")?;
        Ok(Self { ebpf })
    }

    /// Attaches the baseline to `iface` (in the calling thread's namespace).
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        self.program()
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching xdp_pass to {iface}"))?;
        Ok(())
    }

    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut("xdp_pass")
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    pub fn run(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> Result<(u32, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = xdp_ctx(frame.len(), ingress);
        let r = self.program().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::new()
        })?;
        Ok((r.return_value, r.duration))
    }
}

/// The kernel's accounting of a map's memory (`memlock` in fdinfo).
fn memlock(info: &MapInfo) -> Option<u64> {
    let fd = info.fd().ok()?;
    sys::fdinfo_memlock(fd.as_fd().as_raw_fd())
}

/// Number of entries (both directions) in the FLOWS map with this id.
fn count_entries(id: u32) -> Result<u64> {
    let data = MapData::from_id(id).context("opening FLOWS by id")?;
    let map: HashMap<MapData, FlowKey4, FlowEntry> =
        HashMap::try_from(Map::LruHashMap(data)).context("FLOWS as a hash map")?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Number of entries in the FLOWS6 map with this id.
fn count_entries6(id: u32) -> Result<u64> {
    let data = MapData::from_id(id).context("opening FLOWS6 by id")?;
    let map: HashMap<MapData, FlowKey, FlowEntry6> =
        HashMap::try_from(Map::LruHashMap(data)).context("FLOWS6 as a hash map")?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Records held in the half-open table (IPv4 or IPv6, by bucket type) with
/// this id: its ways that hold a whole record.
fn count_half<B: aya::Pod + HalfBucket>(id: u32) -> Result<u64> {
    let data = MapData::from_id(id).context("opening a half-open table by id")?;
    let map: Array<MapData, B> =
        Array::try_from(Map::Array(data)).context("a half-open table as an array")?;
    let mut n = 0;
    for b in map.iter() {
        let b = b.context("reading a half-open bucket")?;
        n += u64::from(b.holds(0)) + u64::from(b.holds(1));
    }
    Ok(n)
}

/// A half-open table's bucket type.
pub trait HalfBucket {
    fn holds(&self, way: usize) -> bool;
}

impl HalfBucket for HalfOpen4 {
    fn holds(&self, way: usize) -> bool {
        HalfOpen4::holds(self, way)
    }
}

impl HalfBucket for HalfOpen6 {
    fn holds(&self, way: usize) -> bool {
        HalfOpen6::holds(self, way)
    }
}

/// Records in the IPv4 half-open table with this id.
pub fn count_half4(id: u32) -> Result<u64> {
    count_half::<HalfOpen4>(id)
}

/// Records in the IPv6 half-open table with this id.
pub fn count_half6(id: u32) -> Result<u64> {
    count_half::<HalfOpen6>(id)
}

/// A data plane with identity services: TCP VIP:80 and UDP VIP:53, each
/// colour's only backend being the VIP itself, and their IPv6 twins on
/// VIP6.
pub struct Loaded {
    pub dp: Dataplane,
    /// Kernel memory of the FLOWS map (IPv4 flows).
    pub flows_memlock: Option<u64>,
    pub flows_id: Option<u32>,
    /// The same of the FLOWS6 map (IPv6 flows).
    pub flows6_memlock: Option<u64>,
    pub flows6_id: Option<u32>,
    /// The half-open tables' ids.
    pub half_open_id: Option<u32>,
    pub half_open6_id: Option<u32>,
}

pub fn load_identity(bed: &Bed, max_flows: u32) -> Result<Loaded> {
    let mut dp = Dataplane::load(&LoadOptions {
        bpffs: None,
        max_flows,
    })
    .context("loading the bgswitch XDP program")?;
    // This load's own maps (the XDP program's), by id.
    let mut id_of = |name| dp.map_id(name).ok();
    let flows_id = id_of(names::FLOWS);
    let flows6_id = id_of(names::FLOWS6);
    let half_open_id = id_of(names::HALF_OPEN);
    let half_open6_id = id_of(names::HALF_OPEN6);
    let memlock_of = |id: Option<u32>| MapInfo::from_id(id?).ok().as_ref().and_then(memlock);
    let flows_memlock = memlock_of(flows_id);
    let flows6_memlock = memlock_of(flows6_id);
    dp.set_settings(Duration::from_secs(30), Duration::from_secs(3600))?;
    // As the daemon does: new flows take their backend's kept next hop
    // while the routing rules select by destination alone.
    dp.set_backend_hops(bgswitch::netlink::ipv4_rules_by_destination_only()?)?;
    dp.set_stateless(2, true);
    let v4 = |port| SocketAddr::V4(SocketAddrV4::new(VIP, port));
    let v6 = |port| SocketAddr::V6(SocketAddrV6::new(VIP6, port, 0, 0));
    for (id, vip, proto) in [
        (0, v4(TCP_PORT), PROTO_TCP),
        (1, v4(UDP_PORT), PROTO_UDP),
        (2, v4(STATELESS_PORT), PROTO_TCP),
        (TCP6_ID, v6(TCP_PORT), PROTO_TCP),
        (UDP6_ID, v6(UDP_PORT), PROTO_UDP),
    ] {
        let pool = |c: Colour| vec![backend_of(vip, backend_stat_id(id, c, 0))];
        dp.write_service(
            id,
            service_key(vip, proto),
            &pool(Colour::Blue),
            &pool(Colour::Green),
            Colour::Blue,
        )?;
    }
    let w = dp.control_word(2);
    dp.end_transition(2, w)?;
    ensure!(dp.is_stateless(2), "service 2 did not become stateless");
    dp.add_port(bed.v0, AttachMode::Native)?;
    dp.add_port(bed.v1, AttachMode::Native)?;
    Ok(Loaded {
        dp,
        flows_memlock,
        flows_id,
        flows6_memlock,
        flows6_id,
        half_open_id,
        half_open6_id,
    })
}

/// Attaches both programs in the bed (bgswitch on v0, the baseline on v1; no
/// traffic flows there). BPF_PROG_TEST_RUN puts the program it runs into the
/// XDP dispatcher and takes it out again afterwards; for a program not already
/// there that rebuilds the dispatcher image and waits for an RCU grace period
/// (~20 ms per call here). An attached program stays in the dispatcher, so each
/// call costs microseconds and the timed loop is the same.
pub fn keep_in_dispatcher(dp: &mut Dataplane, pass: &mut PassProgram) -> Result<()> {
    dp.attach("v0", AttachSetting::Xdp)
        .context("attaching bgswitch to v0")?;
    pass.attach("v1")
}

fn global(dp: &Dataplane, name: &str) -> u64 {
    dp.global_stat(name).ok().flatten().unwrap_or(0)
}

/// Source of the i-th distinct client flow of a block.
fn client(block: u8, i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(198, 18, 64 + block, (i >> 15) as u8),
        1024 + (i & 0x7fff) as u16,
    )
}

/// The IPv6 twin of [`client`]: 2001:db8:18:64::block:(i >> 15).
fn client6(block: u8, i: u32) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x18,
            0x64,
            0,
            0,
            u16::from(block),
            (i >> 15) as u16,
        ),
        1024 + (i & 0x7fff) as u16,
        0,
        0,
    )
}

/// One correctness check run before measuring.
fn check(checks: &mut Vec<Value>, name: &str, ok: bool, detail: String) {
    checks.push(json!({"check": name, "ok": ok, "detail": detail}));
}
