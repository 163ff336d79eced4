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
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{loaded_maps, HashMap, Map, MapData, MapInfo},
    programs::{TestRun as _, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use bgswitch::{
    config::AttachSetting,
    dataplane::{backend_of, backend_stat_id, service_key, AttachMode, Dataplane, LoadOptions},
    model::Colour,
};
use bgswitch_common::{
    maps as names, FlowEntry, FlowEntry6, FlowKey, FlowKey4, PROTO_TCP, PROTO_UDP,
};
use bgswitch_tests::{in_netns, ip_ns, TempNetns};
use serde_json::{json, Value};

use crate::{
    frames::{frame, frame6, verify, verify6, L4},
    objects,
    stats::{interquartile_mean, median, Summary},
    sys,
};

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

/// Ids of the maps named `name` loaded now.
fn map_ids(name: &str) -> HashSet<u32> {
    loaded_maps()
        .flatten()
        .filter(|m| m.name_as_str() == Some(name))
        .map(|m| m.id())
        .collect()
}

/// The map named `name` with `max_entries` that is not in `before`: the one a
/// data plane loaded just now created.
fn new_map(name: &str, max_entries: u32, before: &HashSet<u32>) -> Option<MapInfo> {
    loaded_maps()
        .flatten()
        .filter(|m| m.name_as_str() == Some(name))
        .filter(|m| m.max_entries() == max_entries && !before.contains(&m.id()))
        .max_by_key(|m| m.id())
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
    let before = map_ids(names::FLOWS);
    let before6 = map_ids(names::FLOWS6);
    let before_half = map_ids(names::HALF_OPEN);
    let before_half6 = map_ids(names::HALF_OPEN6);
    let mut dp = Dataplane::load(&LoadOptions {
        bpffs: None,
        max_flows,
    })
    .context("loading the bgswitch XDP program")?;
    let flows = new_map(names::FLOWS, max_flows, &before);
    let flows_memlock = flows.as_ref().and_then(memlock);
    let flows_id = flows.as_ref().map(MapInfo::id);
    let flows6 = new_map(names::FLOWS6, max_flows, &before6);
    let flows6_memlock = flows6.as_ref().and_then(memlock);
    let flows6_id = flows6.as_ref().map(MapInfo::id);
    let half = bgswitch::dataplane::half_open_slots(max_flows);
    let half_open_id = new_map(names::HALF_OPEN, half, &before_half)
        .as_ref()
        .map(MapInfo::id);
    let half_open6_id = new_map(names::HALF_OPEN6, half, &before_half6)
        .as_ref()
        .map(MapInfo::id);
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Pass,
    PassSingle,
    NewFresh,
    /// The client's ACK that completes a fresh handshake (its SYN and the
    /// backend's SYN-ACK run untimed first): the record moves from the
    /// half-open table to `FLOWS`.
    CompleteFresh,
    EstablishedSingle,
    Established,
    Udp,
    Reply,
    NonVip,
    StatelessNewFresh,
    StatelessNew,
    StatelessEstablished,
    StatelessReply,
    TcEstablished,
    TcReply,
    TcNonVip,
    /// The IPv6 baselines: XDP_PASS on the IPv6 frames.
    Pass6,
    Pass6Single,
    New6Fresh,
    Established6Single,
    Established6,
    Udp6,
    Reply6,
    NonVip6,
    TcEstablished6,
    TcReply6,
}

impl Case {
    fn key(self) -> &'static str {
        match self {
            Case::Pass => "xdp_pass",
            Case::PassSingle => "xdp_pass_repeat1",
            Case::NewFresh => "new_tcp_flow_cold",
            Case::CompleteFresh => "handshake_completion_cold",
            Case::EstablishedSingle => "established_tcp_cold",
            Case::Established => "established_tcp",
            Case::Udp => "udp",
            Case::Reply => "backend_reply",
            Case::NonVip => "non_vip",
            Case::StatelessNewFresh => "stateless_new_tcp_flow_cold",
            Case::StatelessNew => "stateless_new_tcp_flow",
            Case::StatelessEstablished => "stateless_established_tcp",
            Case::StatelessReply => "stateless_backend_reply",
            Case::TcEstablished => "tc_established_tcp",
            Case::TcReply => "tc_backend_reply",
            Case::TcNonVip => "tc_non_vip",
            Case::Pass6 => "ipv6_xdp_pass",
            Case::Pass6Single => "ipv6_xdp_pass_repeat1",
            Case::New6Fresh => "ipv6_new_tcp_flow_cold",
            Case::Established6Single => "ipv6_established_tcp_cold",
            Case::Established6 => "ipv6_established_tcp",
            Case::Udp6 => "ipv6_udp",
            Case::Reply6 => "ipv6_backend_reply",
            Case::NonVip6 => "ipv6_non_vip",
            Case::TcEstablished6 => "ipv6_tc_established_tcp",
            Case::TcReply6 => "ipv6_tc_backend_reply",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Case::Pass => "XDP_PASS baseline (repeat N)",
            Case::PassSingle => "XDP_PASS baseline (repeat 1)",
            Case::NewFresh => "new TCP flow (SYN, fresh 5-tuple), cold: repeat 1",
            Case::CompleteFresh => {
                "the client's ACK completing a fresh handshake (record moved to FLOWS), cold: repeat 1"
            }
            Case::EstablishedSingle => "established TCP packet, cold: repeat 1",
            Case::Established => "established TCP packet",
            Case::Udp => "UDP packet (established flow)",
            Case::Reply => "backend reply",
            Case::NonVip => "non-VIP packet",
            Case::StatelessNewFresh => {
                "stateless service: new TCP flow (SYN, fresh 5-tuple), cold: repeat 1"
            }
            Case::StatelessNew => "stateless service: new TCP flow (SYN)",
            Case::StatelessEstablished => "stateless service: established TCP packet",
            Case::StatelessReply => "stateless service: backend reply",
            Case::TcEstablished => "TC program: established TCP packet",
            Case::TcReply => "TC program: backend reply",
            Case::TcNonVip => "TC program: non-VIP packet",
            Case::Pass6 => "IPv6: XDP_PASS baseline (repeat N)",
            Case::Pass6Single => "IPv6: XDP_PASS baseline (repeat 1)",
            Case::New6Fresh => "IPv6: new TCP flow (SYN, fresh 5-tuple), cold: repeat 1",
            Case::Established6Single => "IPv6: established TCP packet, cold: repeat 1",
            Case::Established6 => "IPv6: established TCP packet",
            Case::Udp6 => "IPv6: UDP packet (established flow)",
            Case::Reply6 => "IPv6: backend reply",
            Case::NonVip6 => "IPv6: non-VIP packet",
            Case::TcEstablished6 => "IPv6, TC program: established TCP packet",
            Case::TcReply6 => "IPv6, TC program: backend reply",
        }
    }
    fn single(self) -> bool {
        matches!(
            self,
            Case::PassSingle
                | Case::NewFresh
                | Case::CompleteFresh
                | Case::EstablishedSingle
                | Case::StatelessNewFresh
                | Case::Pass6Single
                | Case::New6Fresh
                | Case::Established6Single
        )
    }
    fn baseline(self) -> bool {
        matches!(
            self,
            Case::Pass | Case::PassSingle | Case::Pass6 | Case::Pass6Single
        )
    }
    /// The XDP_PASS case this case's cost is taken over: the same family's
    /// frames, the same repeat.
    fn base(self) -> Case {
        let v6 = matches!(
            self,
            Case::New6Fresh
                | Case::Established6Single
                | Case::Established6
                | Case::Udp6
                | Case::Reply6
                | Case::NonVip6
                | Case::TcEstablished6
                | Case::TcReply6
        );
        match (v6, self.single()) {
            (false, false) => Case::Pass,
            (false, true) => Case::PassSingle,
            (true, false) => Case::Pass6,
            (true, true) => Case::Pass6Single,
        }
    }
}

/// One correctness check run before measuring.
fn check(checks: &mut Vec<Value>, name: &str, ok: bool, detail: String) {
    checks.push(json!({"check": name, "ok": ok, "detail": detail}));
}

/// Runs part 1. Returns its JSON section.
pub fn program_cost(opts: &CostOptions) -> Result<Value> {
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<Value> {
        sys::pin_thread(opts.cpu)?;
        let mut pass = PassProgram::load()?;
        let mut l = load_identity(&bed, opts.max_flows)?;
        let dp = &mut l.dp;
        keep_in_dispatcher(dp, &mut pass)?;
        let (v0, v1) = (bed.v0, bed.v1);
        let vip80 = SocketAddrV4::new(VIP, TCP_PORT);
        let vip53 = SocketAddrV4::new(VIP, UDP_PORT);
        let est_client = SocketAddrV4::new(CLIENT, 40001);
        let syn_client = SocketAddrV4::new(CLIENT, 40000);
        let udp_client = SocketAddrV4::new(CLIENT, 40002);
        let syn = frame(syn_client, vip80, L4::Syn, 255, FRAME_LEN);
        let est_open = frame(est_client, vip80, L4::Syn, 255, FRAME_LEN);
        let est = frame(est_client, vip80, L4::Ack, 255, FRAME_LEN);
        let est_synack = frame(vip80, est_client, L4::SynAck, 255, FRAME_LEN);
        let udp = frame(udp_client, vip53, L4::Udp, 255, FRAME_LEN);
        let reply = frame(vip80, est_client, L4::Ack, 255, FRAME_LEN);
        let vip81 = SocketAddrV4::new(VIP, STATELESS_PORT);
        let sl_client = SocketAddrV4::new(CLIENT, 40004);
        let sl_syn = frame(sl_client, vip81, L4::Syn, 255, FRAME_LEN);
        let sl_est = frame(sl_client, vip81, L4::Ack, 255, FRAME_LEN);
        let sl_reply = frame(vip81, sl_client, L4::Ack, 255, FRAME_LEN);
        let nonvip = frame(
            SocketAddrV4::new(CLIENT, 40003),
            "198.18.1.99:80".parse()?,
            L4::Ack,
            255,
            FRAME_LEN,
        );
        let v6 = |ip, port| SocketAddrV6::new(ip, port, 0, 0);
        let vip6_80 = v6(VIP6, TCP_PORT);
        let vip6_53 = v6(VIP6, UDP_PORT);
        let est6_client = v6(CLIENT6, 40001);
        let syn6_client = v6(CLIENT6, 40000);
        let udp6_client = v6(CLIENT6, 40002);
        let syn6 = frame6(syn6_client, vip6_80, L4::Syn, 255, FRAME_LEN);
        let est6_open = frame6(est6_client, vip6_80, L4::Syn, 255, FRAME_LEN);
        let est6 = frame6(est6_client, vip6_80, L4::Ack, 255, FRAME_LEN);
        let est6_synack = frame6(vip6_80, est6_client, L4::SynAck, 255, FRAME_LEN);
        let udp6 = frame6(udp6_client, vip6_53, L4::Udp, 255, FRAME_LEN);
        let reply6 = frame6(vip6_80, est6_client, L4::Ack, 255, FRAME_LEN);
        let nonvip6 = frame6(
            v6(CLIENT6, 40003),
            "[2001:db8:18:1::99]:80".parse()?,
            L4::Ack,
            255,
            FRAME_LEN,
        );

        // Correctness first, with repeat = 1.
        let mut checks = Vec::new();
        let g = |dp: &Dataplane, n: &str| global(dp, n);
        let (a, out, _) = dp.test_run(&est_open, Some(v0), 1)?;
        check(
            &mut checks,
            "SYN to the VIP is redirected, identity-rewritten, TTL-1, checksums valid, recorded half-open",
            a == XDP_REDIRECT
                && verify(&out) == Some((est_client, vip80, 254))
                && g(dp, "half_open") == 1,
            format!("action {a}, {:?}, half_open {}", verify(&out), g(dp, "half_open")),
        );
        let (a, out, _) = dp.test_run(&est_synack, Some(v1), 1)?;
        check(
            &mut checks,
            "the backend's SYN-ACK follows the half-open record back",
            a == XDP_REDIRECT && verify(&out) == Some((vip80, est_client, 254)),
            format!("action {a}, {:?}", verify(&out)),
        );
        let promoted = g(dp, "promoted");
        let before = (
            g(dp, "flow_hits"),
            g(dp, "replies"),
            g(dp, "pass_not_service"),
        );
        let (a, out, _) = dp.test_run(&est, Some(v0), 1)?;
        check(
            &mut checks,
            "the client's ACK completes the handshake (promoted +1), follows its record (flow_hits +1) and is redirected",
            a == XDP_REDIRECT
                && verify(&out) == Some((est_client, vip80, 254))
                && g(dp, "flow_hits") == before.0 + 1
                && g(dp, "promoted") == promoted + 1,
            format!(
                "action {a}, flow_hits {} -> {}, promoted +{}",
                before.0,
                g(dp, "flow_hits"),
                g(dp, "promoted") - promoted
            ),
        );
        let (a, out, _) = dp.test_run(&reply, Some(v1), 1)?;
        check(
            &mut checks,
            "backend reply is rewritten back (replies +1) and redirected",
            a == XDP_REDIRECT
                && verify(&out) == Some((vip80, est_client, 254))
                && g(dp, "replies") == before.1 + 1,
            format!("action {a}, replies {} -> {}", before.1, g(dp, "replies")),
        );
        let (a, out, _) = dp.test_run(&udp, Some(v0), 1)?;
        check(
            &mut checks,
            "UDP to the VIP is redirected",
            a == XDP_REDIRECT && verify(&out) == Some((udp_client, vip53, 254)),
            format!("action {a}"),
        );
        let (a, out, _) = dp.test_run(&nonvip, Some(v0), 1)?;
        check(
            &mut checks,
            "non-VIP packet passes byte for byte (pass_not_service +1)",
            a == XDP_PASS && out == nonvip && g(dp, "pass_not_service") == before.2 + 1,
            format!("action {a}"),
        );
        let nf = dp.colour_stats(0, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&syn, Some(v0), 1)?;
        let nf2 = dp.colour_stats(0, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "SYN of a fresh 5-tuple records a new flow (new_flows +1) and is redirected",
            a == XDP_REDIRECT && nf2 - nf == 1 && verify(&out) == Some((syn_client, vip80, 254)),
            format!("action {a}, new_flows +{}", nf2 - nf),
        );
        let (a, out, _) = dp.test_run(&est, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "repeat N forwards every run (TTL 255 - N after N runs)",
            a == XDP_REDIRECT && verify(&out).map(|v| v.2) == Some(255 - opts.repeat as u8),
            format!("action {a}, TTL {:?}", verify(&out).map(|v| v.2)),
        );
        let hits = g(dp, "flow_hits");
        let (a, _, _) = dp.test_run(&est, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "repeated established ACK hits its record on every run",
            a == XDP_REDIRECT && g(dp, "flow_hits") - hits == u64::from(opts.repeat),
            format!("flow_hits +{}", g(dp, "flow_hits") - hits),
        );
        let recorded = |dp: &Dataplane| -> Result<u64> {
            Ok(dp
                .flow_counts(Duration::from_secs(30), Duration::from_secs(3600))?
                .values()
                .map(|c| c.recorded)
                .sum())
        };
        let (rec, sl) = (recorded(dp)?, g(dp, "stateless"));
        let (a1, out1, _) = dp.test_run(&sl_syn, Some(v0), 1)?;
        let (a2, out2, _) = dp.test_run(&sl_est, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "stateless service: SYN and repeated ACK are redirected by the hash (stateless +1+N), nothing recorded",
            a1 == XDP_REDIRECT
                && a2 == XDP_REDIRECT
                && verify(&out1) == Some((sl_client, vip81, 254))
                && verify(&out2).map(|v| v.2) == Some(255 - opts.repeat as u8)
                && g(dp, "stateless") - sl == 1 + u64::from(opts.repeat)
                && recorded(dp)? == rec,
            format!(
                "actions {a1}/{a2}, stateless +{}, records {} -> {}",
                g(dp, "stateless") - sl,
                rec,
                recorded(dp)?
            ),
        );
        let replies = g(dp, "replies");
        let (a, out, _) = dp.test_run(&sl_reply, Some(v1), 1)?;
        check(
            &mut checks,
            "stateless service: the backend's reply is rewritten back by the hash check (replies +1)",
            a == XDP_REDIRECT
                && verify(&out) == Some((vip81, sl_client, 254))
                && g(dp, "replies") == replies + 1,
            format!("action {a}"),
        );
        // The TC program: the same packets, the same records, a TC verdict.
        let (a, out, _) = dp.test_run_tc(&est, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "TC program: established ACK is redirected (TC_ACT_REDIRECT), identity-rewritten, TTL-1",
            a == TC_ACT_REDIRECT && verify(&out) == Some((est_client, vip80, 254)),
            format!("action {a}, {:?}", verify(&out)),
        );
        let (a, out, _) = dp.test_run_tc(&reply, Some(v1), 0, 1)?;
        check(
            &mut checks,
            "TC program: backend reply is rewritten back and redirected",
            a == TC_ACT_REDIRECT && verify(&out) == Some((vip80, est_client, 254)),
            format!("action {a}, {:?}", verify(&out)),
        );
        let (a, out, _) = dp.test_run_tc(&nonvip, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "TC program: non-VIP packet is left to the stack (TC_ACT_UNSPEC) byte for byte",
            a == TC_ACT_UNSPEC && out == nonvip,
            format!("action {a}"),
        );
        // IPv6: the same checks on the IPv6 services (FLOWS6, no flow
        // cache), hop limit for TTL.
        let before = (
            g(dp, "flow_hits"),
            g(dp, "replies"),
            g(dp, "pass_not_service"),
        );
        let nf = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&est6_open, Some(v0), 1)?;
        let nf2 = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "IPv6: SYN to the VIP records a new flow (new_flows +1), is redirected, identity-rewritten, hop limit -1, checksum valid",
            a == XDP_REDIRECT
                && nf2 - nf == 1
                && verify6(&out) == Some((est6_client, vip6_80, 254)),
            format!("action {a}, new_flows +{}, {:?}", nf2 - nf, verify6(&out)),
        );
        let (a, out, _) = dp.test_run(&est6_synack, Some(v1), 1)?;
        check(
            &mut checks,
            "IPv6: the backend's SYN-ACK follows the half-open record back",
            a == XDP_REDIRECT && verify6(&out) == Some((vip6_80, est6_client, 254)),
            format!("action {a}, {:?}", verify6(&out)),
        );
        let before = (before.0, g(dp, "replies"), before.2);
        let promoted = g(dp, "promoted");
        let (a, out, _) = dp.test_run(&est6, Some(v0), 1)?;
        check(
            &mut checks,
            "IPv6: the client's ACK completes the handshake (promoted +1), follows its record (flow_hits +1) and is redirected",
            a == XDP_REDIRECT
                && verify6(&out) == Some((est6_client, vip6_80, 254))
                && g(dp, "flow_hits") == before.0 + 1
                && g(dp, "promoted") == promoted + 1,
            format!(
                "action {a}, flow_hits {} -> {}, promoted +{}, {:?}",
                before.0,
                g(dp, "flow_hits"),
                g(dp, "promoted") - promoted,
                verify6(&out)
            ),
        );
        let (a, out, _) = dp.test_run(&reply6, Some(v1), 1)?;
        check(
            &mut checks,
            "IPv6: backend reply is rewritten back (replies +1) and redirected",
            a == XDP_REDIRECT
                && verify6(&out) == Some((vip6_80, est6_client, 254))
                && g(dp, "replies") == before.1 + 1,
            format!(
                "action {a}, replies {} -> {}, {:?}",
                before.1,
                g(dp, "replies"),
                verify6(&out)
            ),
        );
        let nf = dp.colour_stats(UDP6_ID, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&udp6, Some(v0), 1)?;
        let nf2 = dp.colour_stats(UDP6_ID, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "IPv6: UDP to the VIP records its flow and is redirected, checksum valid",
            a == XDP_REDIRECT
                && nf2 - nf == 1
                && verify6(&out) == Some((udp6_client, vip6_53, 254)),
            format!("action {a}, new_flows +{}, {:?}", nf2 - nf, verify6(&out)),
        );
        let (a, out, _) = dp.test_run(&nonvip6, Some(v0), 1)?;
        check(
            &mut checks,
            "IPv6: non-VIP packet passes byte for byte (pass_not_service +1)",
            a == XDP_PASS && out == nonvip6 && g(dp, "pass_not_service") == before.2 + 1,
            format!("action {a}"),
        );
        let nf = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&syn6, Some(v0), 1)?;
        let nf2 = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "IPv6: SYN of a fresh 5-tuple records a new flow (new_flows +1) and is redirected",
            a == XDP_REDIRECT
                && nf2 - nf == 1
                && verify6(&out) == Some((syn6_client, vip6_80, 254)),
            format!("action {a}, new_flows +{}", nf2 - nf),
        );
        let hits = g(dp, "flow_hits");
        let (a, out, _) = dp.test_run(&est6, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "IPv6: repeated established ACK hits its record and is forwarded on every run (flow_hits +N, hop limit 255 - N)",
            a == XDP_REDIRECT
                && verify6(&out).map(|v| v.2) == Some(255 - opts.repeat as u8)
                && g(dp, "flow_hits") - hits == u64::from(opts.repeat),
            format!(
                "action {a}, hop limit {:?}, flow_hits +{}",
                verify6(&out).map(|v| v.2),
                g(dp, "flow_hits") - hits
            ),
        );
        let replies = g(dp, "replies");
        let (a, out, _) = dp.test_run(&reply6, Some(v1), opts.repeat)?;
        check(
            &mut checks,
            "IPv6: repeated backend reply is rewritten back on every run (replies +N)",
            a == XDP_REDIRECT
                && verify6(&out) == Some((vip6_80, est6_client, 255 - opts.repeat as u8))
                && g(dp, "replies") - replies == u64::from(opts.repeat),
            format!("action {a}, replies +{}", g(dp, "replies") - replies),
        );
        let (a, out, _) = dp.test_run_tc(&est6, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "IPv6, TC program: established ACK is redirected (TC_ACT_REDIRECT), identity-rewritten, hop limit -1",
            a == TC_ACT_REDIRECT && verify6(&out) == Some((est6_client, vip6_80, 254)),
            format!("action {a}, {:?}", verify6(&out)),
        );
        let (a, out, _) = dp.test_run_tc(&reply6, Some(v1), 0, 1)?;
        check(
            &mut checks,
            "IPv6, TC program: backend reply is rewritten back and redirected",
            a == TC_ACT_REDIRECT && verify6(&out) == Some((vip6_80, est6_client, 254)),
            format!("action {a}, {:?}", verify6(&out)),
        );
        // Two flows of each family in its flow table (the completed
        // handshake's, the UDP flow's); the fresh SYN's record waits in the
        // family's half-open table.
        let held6 = l.flows6_id.map(count_entries6).transpose()?.unwrap_or(0);
        let held4 = l.flows_id.map(count_entries).transpose()?.unwrap_or(0);
        let half6 = l
            .half_open6_id
            .map(count_entries6)
            .transpose()?
            .unwrap_or(0);
        let half4 = l.half_open_id.map(count_entries).transpose()?.unwrap_or(0);
        check(
            &mut checks,
            "IPv6 flows are recorded in FLOWS6 (2 entries) and HALF_OPEN6 (1), the IPv4 ones in FLOWS (2) and HALF_OPEN (1)",
            held6 == 2 && held4 == 2 && half6 == 1 && half4 == 1,
            format!("FLOWS6 {held6}, FLOWS {held4}, HALF_OPEN6 {half6}, HALF_OPEN {half4}"),
        );
        let (a, out, _) = dp.test_run_tc(&nonvip6, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "IPv6, TC program: non-VIP packet is left to the stack (TC_ACT_UNSPEC) byte for byte",
            a == TC_ACT_UNSPEC && out == nonvip6,
            format!("action {a}"),
        );
        let (a, _) = pass.run(&est, v0, opts.repeat)?;
        let (a6, _) = pass.run(&est6, v0, opts.repeat)?;
        check(
            &mut checks,
            "baseline returns XDP_PASS (IPv4 and IPv6 frames)",
            a == XDP_PASS && a6 == XDP_PASS,
            format!("actions {a}/{a6}"),
        );
        let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
        if !failed.is_empty() {
            bail!("program-cost correctness checks failed: {failed:?}");
        }

        // Measurement.
        let cases = [
            Case::Pass,
            Case::PassSingle,
            Case::NewFresh,
            Case::CompleteFresh,
            Case::EstablishedSingle,
            Case::Established,
            Case::Udp,
            Case::Reply,
            Case::NonVip,
            Case::StatelessNewFresh,
            Case::StatelessNew,
            Case::StatelessEstablished,
            Case::StatelessReply,
            Case::TcEstablished,
            Case::TcReply,
            Case::TcNonVip,
            Case::Pass6,
            Case::Pass6Single,
            Case::New6Fresh,
            Case::Established6Single,
            Case::Established6,
            Case::Udp6,
            Case::Reply6,
            Case::NonVip6,
            Case::TcEstablished6,
            Case::TcReply6,
        ];
        let mut per_round: BTreeMap<Case, Vec<f64>> = BTreeMap::new();
        let mut fresh = 0u32;
        let started = Instant::now();
        for round in 0..opts.rounds {
            for k in 0..cases.len() {
                let case = cases[(k + round) % cases.len()];
                let n = if case.single() {
                    opts.single_calls
                } else {
                    opts.calls
                };
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let ns = match case {
                        Case::Pass => pass.run(&est, v0, opts.repeat)?.1,
                        Case::PassSingle => {
                            // The same frame shape as NewFresh, built the same way.
                            let f = frame(client(0, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                            pass.run(&f, v0, 1)?.1
                        }
                        Case::NewFresh => {
                            fresh += 1;
                            let f = frame(client(0, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::CompleteFresh => {
                            fresh += 1;
                            let c = client(3, fresh);
                            dp.test_run(&frame(c, vip80, L4::Syn, 255, FRAME_LEN), Some(v0), 1)?;
                            let sa = frame(vip80, c, L4::SynAck, 255, FRAME_LEN);
                            dp.test_run(&sa, Some(v1), 1)?;
                            let f = frame(c, vip80, L4::Ack, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::EstablishedSingle => dp.test_run(&est, Some(v0), 1)?.2,
                        Case::Established => dp.test_run(&est, Some(v0), opts.repeat)?.2,
                        Case::Udp => dp.test_run(&udp, Some(v0), opts.repeat)?.2,
                        Case::Reply => dp.test_run(&reply, Some(v1), opts.repeat)?.2,
                        Case::NonVip => dp.test_run(&nonvip, Some(v0), opts.repeat)?.2,
                        Case::StatelessNewFresh => {
                            fresh += 1;
                            let f = frame(client(1, fresh), vip81, L4::Syn, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::StatelessNew => dp.test_run(&sl_syn, Some(v0), opts.repeat)?.2,
                        Case::StatelessEstablished => {
                            dp.test_run(&sl_est, Some(v0), opts.repeat)?.2
                        }
                        Case::StatelessReply => dp.test_run(&sl_reply, Some(v1), opts.repeat)?.2,
                        Case::TcEstablished => dp.test_run_tc(&est, Some(v0), 0, opts.repeat)?.2,
                        Case::TcReply => dp.test_run_tc(&reply, Some(v1), 0, opts.repeat)?.2,
                        Case::TcNonVip => dp.test_run_tc(&nonvip, Some(v0), 0, opts.repeat)?.2,
                        Case::Pass6 => pass.run(&est6, v0, opts.repeat)?.1,
                        Case::Pass6Single => {
                            let f = frame6(client6(0, fresh), vip6_80, L4::Syn, 255, FRAME_LEN);
                            pass.run(&f, v0, 1)?.1
                        }
                        Case::New6Fresh => {
                            fresh += 1;
                            let f = frame6(client6(0, fresh), vip6_80, L4::Syn, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::Established6Single => dp.test_run(&est6, Some(v0), 1)?.2,
                        Case::Established6 => dp.test_run(&est6, Some(v0), opts.repeat)?.2,
                        Case::Udp6 => dp.test_run(&udp6, Some(v0), opts.repeat)?.2,
                        Case::Reply6 => dp.test_run(&reply6, Some(v1), opts.repeat)?.2,
                        Case::NonVip6 => dp.test_run(&nonvip6, Some(v0), opts.repeat)?.2,
                        Case::TcEstablished6 => dp.test_run_tc(&est6, Some(v0), 0, opts.repeat)?.2,
                        Case::TcReply6 => dp.test_run_tc(&reply6, Some(v1), 0, opts.repeat)?.2,
                    };
                    v.push(ns.as_nanos() as f64);
                }
                // Single runs come in clock steps: the middle half's mean.
                let v = if case.single() {
                    interquartile_mean(&v)
                } else {
                    median(&v)
                };
                per_round.entry(case).or_default().push(v);
            }
        }
        let elapsed = started.elapsed();
        let nf_total = dp.colour_stats(0, Colour::Blue)?.new_flows;
        let nf6_total = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;

        let mut rows = Vec::new();
        for &case in cases.iter().filter(|c| !c.baseline()) {
            let base = case.base();
            let diffs: Vec<f64> = per_round[&case]
                .iter()
                .zip(&per_round[&base])
                .map(|(c, b)| c - b)
                .collect();
            let d = Summary::of(&diffs);
            let abs = Summary::of(&per_round[&case]);
            rows.push(json!({
                "case": case.key(),
                "label": case.label(),
                "repeat": if case.single() { 1 } else { opts.repeat },
                "absolute_ns": abs,
                "over_baseline_ns": d,
                "program_only_mpps": if d.median > 0.0 { 1000.0 / d.median } else { f64::INFINITY },
            }));
        }
        // The new flow, warm: the established packet's warm cost plus what a
        // new flow adds over it when both run cold (per round).
        let new_warm = |est: Case, pass: Case, new: Case, est1: Case| -> Summary {
            let v: Vec<f64> = (0..opts.rounds)
                .map(|i| {
                    per_round[&est][i] - per_round[&pass][i] + per_round[&new][i]
                        - per_round[&est1][i]
                })
                .collect();
            Summary::of(&v)
        };
        let warm_row = |key: &str, label: &str, d: Summary| {
            json!({
                "case": key,
                "label": label,
                "repeat": opts.repeat,
                "absolute_ns": Value::Null,
                "over_baseline_ns": d,
                "program_only_mpps": if d.median > 0.0 { 1000.0 / d.median } else { f64::INFINITY },
            })
        };
        let d = new_warm(
            Case::Established,
            Case::Pass,
            Case::NewFresh,
            Case::EstablishedSingle,
        );
        rows.insert(
            0,
            warm_row(
                "new_tcp_flow",
                "new TCP flow (SYN, fresh 5-tuple): established (repeat N) + (new − established, both repeat 1)",
                d,
            ),
        );
        // A whole new connection records twice: the SYN (half-open) and
        // the client's ACK that completes the handshake (into FLOWS).
        let whole: Vec<f64> = (0..opts.rounds)
            .map(|i| {
                let est1 = per_round[&Case::EstablishedSingle][i];
                per_round[&Case::Established][i] - per_round[&Case::Pass][i]
                    + (per_round[&Case::NewFresh][i] - est1)
                    + (per_round[&Case::CompleteFresh][i] - est1)
            })
            .collect();
        rows.insert(
            1,
            warm_row(
                "new_tcp_connection",
                "new TCP connection, both recording packets: established (repeat N) + (SYN − established) + (completing ACK − established), the cold ones repeat 1",
                Summary::of(&whole),
            ),
        );
        let d6 = new_warm(
            Case::Established6,
            Case::Pass6,
            Case::New6Fresh,
            Case::Established6Single,
        );
        let at = rows
            .iter()
            .position(|r| r["case"] == Case::New6Fresh.key())
            .unwrap_or(rows.len());
        rows.insert(
            at,
            warm_row(
                "ipv6_new_tcp_flow",
                "IPv6: new TCP flow (SYN, fresh 5-tuple): established (repeat N) + (new − established, both repeat 1)",
                d6,
            ),
        );
        // IPv6 against IPv4, round by round (each over its own family's
        // baseline): the established packet, the reply, the TC program's.
        let ratio = |c6: Case, c4: Case| -> Summary {
            let v: Vec<f64> = (0..opts.rounds)
                .map(|i| {
                    (per_round[&c6][i] - per_round[&c6.base()][i])
                        / (per_round[&c4][i] - per_round[&c4.base()][i])
                })
                .collect();
            Summary::of(&v)
        };
        let of_median = |c6: Case, c4: Case| -> Option<f64> {
            let m = |c: Case| {
                rows.iter()
                    .find(|r| r["case"] == c.key())
                    .and_then(|r| r["over_baseline_ns"]["median"].as_f64())
            };
            Some(m(c6)? / m(c4)?)
        };
        let v6_vs_v4 = json!({
            "method": "cost over XDP_PASS of the IPv6 case / cost over XDP_PASS of the IPv4 case; per_round: the ratio in each round, median (min–max); of_medians: the ratio of the two medians",
            "established_tcp": {
                "per_round": ratio(Case::Established6, Case::Established),
                "of_medians": of_median(Case::Established6, Case::Established),
            },
            "backend_reply": {
                "per_round": ratio(Case::Reply6, Case::Reply),
                "of_medians": of_median(Case::Reply6, Case::Reply),
            },
            "udp": {
                "per_round": ratio(Case::Udp6, Case::Udp),
                "of_medians": of_median(Case::Udp6, Case::Udp),
            },
            "tc_established_tcp": {
                "per_round": ratio(Case::TcEstablished6, Case::TcEstablished),
                "of_medians": of_median(Case::TcEstablished6, Case::TcEstablished),
            },
            "new_tcp_flow_cold": {
                "per_round": ratio(Case::New6Fresh, Case::NewFresh),
                "of_medians": of_median(Case::New6Fresh, Case::NewFresh),
            },
        });
        Ok(json!({
            "status": "measured",
            "method": "BPF_PROG_TEST_RUN on one pinned CPU; per round and case the median of several calls (of single runs, repeat 1, which the kernel times in steps of about 10 ns here: the mean of the middle half of the calls); cost = per-round difference to xdp_pass (same frame, same ingress, same repeat); median (min–max) over rounds; identity rewrite (backend = VIP) so repeat > 1 re-runs the full forwarding path",
            "cpu": opts.cpu,
            "rounds": opts.rounds,
            "calls_per_round": opts.calls,
            "repeat": opts.repeat,
            "single_calls_per_round": opts.single_calls,
            "frame_bytes": FRAME_LEN,
            "max_flows": opts.max_flows,
            "baseline_ns": {
                "repeat_n": Summary::of(&per_round[&Case::Pass]),
                "repeat_1": Summary::of(&per_round[&Case::PassSingle]),
                "ipv6_repeat_n": Summary::of(&per_round[&Case::Pass6]),
                "ipv6_repeat_1": Summary::of(&per_round[&Case::Pass6Single]),
            },
            "ipv6_frame_bytes": { "tcp": est6.len(), "udp": udp6.len() },
            "cases": rows,
            "ipv6_vs_ipv4": v6_vs_v4,
            "checks": checks,
            "new_flows_recorded": nf_total,
            "ipv6_new_flows_recorded": nf6_total,
            "elapsed_s": elapsed.as_secs_f64(),
        }))
    })??;
    drop(bed);
    Ok(r)
}

/// Part 5, program-cost and memory half: the cost of an established packet
/// (hot: one flow repeated; spread: a random recorded flow per call) and of a
/// new flow as the table fills from 1 flow to its maximum; kernel memory per
/// flow from the kernel's own accounting of the FLOWS map.
pub fn scale(opts: &CostOptions) -> Result<Value> {
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<Value> {
        sys::pin_thread(opts.cpu)?;
        let mut pass = PassProgram::load()?;
        // Memory: two table sizes, to separate per-flow from fixed cost.
        let small_flows = 65_536u32.min(opts.scale_max_flows / 2).max(1024);
        let small = load_identity(&bed, small_flows)?;
        let small_memlock = small.flows_memlock;
        let small_memlock6 = small.flows6_memlock;
        drop(small);
        let avail_before = sys::meminfo("MemAvailable");
        let mut l = load_identity(&bed, opts.scale_max_flows)?;
        let avail_after = sys::meminfo("MemAvailable");
        let big_memlock = l.flows_memlock;
        let big_memlock6 = l.flows6_memlock;
        let dp = &mut l.dp;
        keep_in_dispatcher(dp, &mut pass)?;
        let v0 = bed.v0;
        let vip80 = SocketAddrV4::new(VIP, TCP_PORT);
        let vip81 = SocketAddrV4::new(VIP, STATELESS_PORT);
        let key_value = std::mem::size_of::<FlowKey4>() + std::mem::size_of::<FlowEntry>();
        let key_value6 = std::mem::size_of::<FlowKey>() + std::mem::size_of::<FlowEntry6>();

        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut filled = 0u32;
        let mut fresh = 0u32;
        let mut levels = Vec::new();
        let fill_started = Instant::now();
        // Every packet of the scale run is to the TCP service (blue, one
        // backend): each is redirected, and each either follows a record
        // (flow_hits) or makes one (new_flows); records leave the table only
        // by eviction.
        let recorded =
            |dp: &Dataplane| -> Result<u64> { Ok(dp.colour_stats(0, Colour::Blue)?.new_flows) };
        let (flows_id, half_id) = (l.flows_id, l.half_open_id);
        // Records in either table: the timed new flows' SYNs stay half open.
        let entries = || -> Result<u64> {
            Ok(
                count_entries(flows_id.context("the FLOWS map was not found by id")?)?
                    + count_entries(half_id.context("the HALF_OPEN map was not found by id")?)?,
            )
        };
        let mut not_redirected = 0u64;
        for &level in &opts.fill_levels {
            let level = level.min(opts.scale_max_flows);
            let (fill_from, rec0) = (filled, recorded(dp)?);
            // Each flow's whole handshake: the SYN (half-open), the
            // backend's SYN-ACK, the client's ACK (into FLOWS).
            while filled < level {
                let c = client(1, filled);
                let f = frame(c, vip80, L4::Syn, 255, FRAME_LEN);
                if dp.test_run(&f, Some(v0), 1)?.0 != XDP_REDIRECT {
                    not_redirected += 1;
                }
                // A reply, not a packet to the VIP: it completes the
                // half-open record whatever its next hop.
                let sa = frame(vip80, c, L4::SynAck, 255, FRAME_LEN);
                dp.test_run(&sa, Some(v0), 1)?;
                let ack = frame(c, vip80, L4::Ack, 255, FRAME_LEN);
                if dp.test_run(&ack, Some(v0), 1)?.0 != XDP_REDIRECT {
                    not_redirected += 1;
                }
                filled += 1;
            }
            let fill_recorded = recorded(dp)? - rec0;
            let entries_after_fill = entries()?;
            let hot = frame(client(1, 0), vip80, L4::Ack, 255, FRAME_LEN);
            let mut r_pass = Vec::new();
            let mut r_hot = Vec::new();
            let mut r_pass1 = Vec::new();
            let mut r_spread = Vec::new();
            let mut r_new = Vec::new();
            // Hits and records of each kind of call, read between the
            // timed loops (never inside one).
            let mut spread_calls = 0u64;
            let (mut hot_runs, mut hot_hits, mut hot_recorded) = (0u64, 0u64, 0u64);
            let (mut spread_hits, mut spread_recorded) = (0u64, 0u64);
            let (mut new_syns, mut new_recorded) = (0u64, 0u64);
            let counts = |dp: &Dataplane| -> Result<(u64, u64)> {
                Ok((global(dp, "flow_hits"), recorded(dp)?))
            };
            for _ in 0..opts.scale_rounds {
                let mut a = Vec::new();
                let mut b = Vec::new();
                let c0 = counts(dp)?;
                for _ in 0..opts.calls {
                    a.push(pass.run(&hot, v0, opts.repeat)?.1.as_nanos() as f64);
                    let (act, _, d) = dp.test_run(&hot, Some(v0), opts.repeat)?;
                    not_redirected += u64::from(act != XDP_REDIRECT);
                    b.push(d.as_nanos() as f64);
                    hot_runs += u64::from(opts.repeat);
                }
                let c1 = counts(dp)?;
                r_pass.push(median(&a));
                r_hot.push(median(&b));
                let mut p1 = Vec::new();
                let mut s1 = Vec::new();
                let mut n1 = Vec::new();
                for _ in 0..opts.scale_single_calls {
                    let i = (next() % u64::from(filled)) as u32;
                    let f = frame(client(1, i), vip80, L4::Ack, 255, FRAME_LEN);
                    p1.push(pass.run(&f, v0, 1)?.1.as_nanos() as f64);
                    let (act, _, d) = dp.test_run(&f, Some(v0), 1)?;
                    not_redirected += u64::from(act != XDP_REDIRECT);
                    s1.push(d.as_nanos() as f64);
                    spread_calls += 1;
                }
                let c2 = counts(dp)?;
                for _ in 0..opts.scale_single_calls / 4 {
                    fresh += 1;
                    let f = frame(client(2, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                    let (act, _, d) = dp.test_run(&f, Some(v0), 1)?;
                    not_redirected += u64::from(act != XDP_REDIRECT);
                    n1.push(d.as_nanos() as f64);
                    new_syns += 1;
                }
                let c3 = counts(dp)?;
                hot_hits += c1.0 - c0.0;
                hot_recorded += c1.1 - c0.1;
                spread_hits += c2.0 - c1.0;
                spread_recorded += c2.1 - c1.1;
                new_recorded += c3.1 - c2.1;
                r_pass1.push(interquartile_mean(&p1));
                r_spread.push(interquartile_mean(&s1));
                r_new.push(interquartile_mean(&n1));
            }
            let spread_hit_ratio = spread_hits as f64 / spread_calls.max(1) as f64;
            let recorded_total = recorded(dp)?;
            let entries_now = entries()?;
            let diff = |x: &[f64], y: &[f64]| -> Vec<f64> {
                x.iter().zip(y).map(|(a, b)| a - b).collect()
            };
            levels.push(json!({
                "flows": level,
                "established_hot_ns": Summary::of(&diff(&r_hot, &r_pass)),
                "established_spread_ns": Summary::of(&diff(&r_spread, &r_pass1)),
                "new_flow_ns": Summary::of(&diff(&r_new, &r_pass1)),
                "spread_hit_ratio": spread_hit_ratio,
                "check": {
                    "filled_from": fill_from,
                    "fill_syns": level - fill_from,
                    "fill_recorded": fill_recorded,
                    "entries_after_fill": entries_after_fill,
                    "hot_runs": hot_runs,
                    "hot_hits": hot_hits,
                    "hot_recorded": hot_recorded,
                    "spread_calls": spread_calls,
                    "spread_hits": spread_hits,
                    "spread_recorded": spread_recorded,
                    "new_flow_syns": new_syns,
                    "new_flow_recorded": new_recorded,
                    "recorded_total": recorded_total,
                    "entries": entries_now,
                    "evicted": recorded_total.saturating_sub(entries_now),
                    "not_redirected_total": not_redirected,
                },
            }));
            eprintln!(
                "bench: scale: {level} flows measured ({:.0} s since start)",
                fill_started.elapsed().as_secs_f64()
            );
        }
        // The stateless service records nothing: its cost can only depend on
        // how many clients there are, so it is measured once the table is
        // full, with a random client among as many as each level's flows,
        // every level in every round (interleaved, so the machine's slow
        // phases, which last minutes, touch every level alike).
        let sizes: Vec<u32> = opts
            .fill_levels
            .iter()
            .map(|&n| n.clamp(1, opts.scale_max_flows))
            .collect();
        let mut r_sl: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
        for _ in 0..opts.scale_rounds {
            for (k, &clients) in sizes.iter().enumerate() {
                let mut p1 = Vec::new();
                let mut sl1 = Vec::new();
                for _ in 0..opts.scale_single_calls {
                    let i = (next() % u64::from(clients)) as u32;
                    let f = frame(client(1, i), vip81, L4::Ack, 255, FRAME_LEN);
                    p1.push(pass.run(&f, v0, 1)?.1.as_nanos() as f64);
                    sl1.push(dp.test_run(&f, Some(v0), 1)?.2.as_nanos() as f64);
                }
                // Single runs (repeat 1) come in clock steps: the middle
                // half's mean.
                r_sl[k].push(interquartile_mean(&sl1) - interquartile_mean(&p1));
            }
        }
        for (level, sl) in levels.iter_mut().zip(&r_sl) {
            level["stateless_spread_ns"] = json!(Summary::of(sl));
        }
        let entries = l.flows_id.map(count_entries).transpose()?;
        let slope = |small: Option<u64>, big: Option<u64>| match (small, big) {
            (Some(s), Some(b)) if opts.scale_max_flows > small_flows && b >= s => {
                Some((b - s) as f64 / f64::from(opts.scale_max_flows - small_flows))
            }
            _ => None,
        };
        let per_flow_slope = slope(small_memlock, big_memlock);
        let per_flow_slope6 = slope(small_memlock6, big_memlock6);
        let meminfo_delta = match (avail_before, avail_after) {
            (Some(b), Some(a)) if b > a => Some((b - a) as f64 / f64::from(opts.scale_max_flows)),
            _ => None,
        };
        Ok(json!({
            "status": "measured",
            "method": "one data plane with FLOWS sized for scale_max_flows; filled with SYNs of distinct 5-tuples through BPF_PROG_TEST_RUN; at each level: hot = one recorded flow, repeat N, minus xdp_pass repeat N; spread = a random recorded flow per call, repeat 1, minus xdp_pass repeat 1 (cache-cold lookups); stateless spread = measured after the fill (the table full): a random client among as many as the level's flows to the stateless service (nothing recorded), repeat 1, minus xdp_pass repeat 1 with the same frame, every level in every round; new = a fresh 5-tuple per call (evicts when full); per round, the repeat-1 figures are the mean of the middle half of the calls (single runs are timed in steps of about 10 ns here); median (min–max) over rounds",
            "scale_max_flows": opts.scale_max_flows,
            "levels": levels,
            "flow_entries_after_fill": entries,
            "flows_recorded_after_fill": entries,
            "memory": {
                "flow_key_plus_entry_bytes": key_value,
                "entries_per_flow": 1,
                "flows_map_memlock_bytes": big_memlock,
                "flows_map_memlock_bytes_small": small_memlock,
                "small_max_flows": small_flows,
                "bytes_per_flow_memlock": big_memlock.map(|b| b as f64 / f64::from(opts.scale_max_flows)),
                "bytes_per_flow_slope": per_flow_slope,
                "bytes_per_flow_memavailable_delta": meminfo_delta,
                // FLOWS6, the IPv6 flows' table, sized alike (the same
                // max_flows) in the same two data planes.
                "ipv6": {
                    "flow_key_plus_entry_bytes": key_value6,
                    "flows_map_memlock_bytes": big_memlock6,
                    "flows_map_memlock_bytes_small": small_memlock6,
                    "bytes_per_flow_memlock": big_memlock6.map(|b| b as f64 / f64::from(opts.scale_max_flows)),
                    "bytes_per_flow_slope": per_flow_slope6,
                    "computed_bytes_per_flow": bgswitch::dataplane::FLOW_BYTES_V6,
                },
                "computed_bytes_per_flow": bgswitch::dataplane::FLOW_BYTES_V4,
            },
            "elapsed_s": fill_started.elapsed().as_secs_f64(),
        }))
    })??;
    drop(bed);
    Ok(r)
}

/// Fails unless part 1's correctness checks all passed (quick mode).
pub fn assert_checks(section: &Value) -> Result<()> {
    let checks = section["checks"].as_array().context("no checks")?;
    ensure!(!checks.is_empty(), "no checks ran");
    for c in checks {
        ensure!(c["ok"] == true, "check failed: {c}");
    }
    Ok(())
}

/// Quick mode: the scale part filled the table it reports on and measured
/// what it says. The kernel charged more for the large table than for the
/// small one, and at least key + value per flow; every packet was redirected;
/// each level's fill made one record per SYN and the table held them all
/// (beyond half its size an LRU map may evict: there, three quarters);
/// every timed call either followed its record or, its record evicted, made
/// a new one, so the spread's hit ratio is 1 where nothing was evicted and
/// its misses never outnumber the evictions.
pub fn assert_scale(section: &Value, opts: &CostOptions) -> Result<()> {
    ensure!(
        section["status"] == "measured",
        "scale: {}",
        section["status"]
    );
    let u = |v: &Value, k: &str| v[k].as_u64().with_context(|| format!("no {k} in {v}"));
    let mem = &section["memory"];
    let (big, small) = (
        u(mem, "flows_map_memlock_bytes")?,
        u(mem, "flows_map_memlock_bytes_small")?,
    );
    ensure!(
        small > 0 && big > small,
        "FLOWS memory not growing with its size: {big} B for {} flows, {small} B for {}",
        opts.scale_max_flows,
        mem["small_max_flows"]
    );
    let slope = mem["bytes_per_flow_slope"].as_f64().unwrap_or(0.0);
    let kv = u(mem, "flow_key_plus_entry_bytes")? as f64;
    ensure!(
        slope >= kv,
        "{slope} B per flow is less than a key and an entry ({kv} B): {mem}"
    );
    let levels = section["levels"].as_array().context("no levels")?;
    ensure!(
        levels.len() == opts.fill_levels.len(),
        "{} levels measured, want {}",
        levels.len(),
        opts.fill_levels.len()
    );
    let max = u64::from(opts.scale_max_flows);
    let mut entries_before = 0;
    for (l, &want) in levels.iter().zip(&opts.fill_levels) {
        let c = &l["check"];
        let flows = u(l, "flows")?;
        ensure!(
            flows == u64::from(want.min(opts.scale_max_flows)),
            "level {l}: want {want} flows"
        );
        ensure!(
            u(c, "not_redirected_total")? == 0,
            "scale: packets to the VIP not redirected: {c}"
        );
        ensure!(
            u(c, "fill_recorded")? == u(c, "fill_syns")?,
            "level {flows}: the fill's SYNs did not each make a record: {c}"
        );
        let held = u(c, "entries_after_fill")?;
        let need = if flows <= max / 2 {
            flows
        } else {
            flows * 3 / 4
        };
        ensure!(
            held >= need && held > entries_before,
            "level {flows}: the table holds {held} flows after the fill (want at least {need}, and more than the level before's {entries_before}): {c}"
        );
        entries_before = held;
        let evicted = u(c, "evicted")?;
        if u(c, "recorded_total")? <= max / 2 {
            ensure!(
                evicted == 0,
                "level {flows}: a half-empty table evicted {evicted} flows: {c}"
            );
        }
        let (calls, hits, made) = (
            u(c, "spread_calls")?,
            u(c, "spread_hits")?,
            u(c, "spread_recorded")?,
        );
        ensure!(calls > 0, "level {flows}: no spread calls: {c}");
        ensure!(
            hits + made == calls
                && u(c, "hot_hits")? + u(c, "hot_recorded")? == u(c, "hot_runs")?
                && u(c, "new_flow_recorded")? == u(c, "new_flow_syns")?,
            "level {flows}: a packet neither followed a record nor made one: {c}"
        );
        ensure!(
            made + u(c, "hot_recorded")? <= evicted,
            "level {flows}: {made} spread calls missed recorded flows, {evicted} flows were evicted: {c}"
        );
        let ratio = l["spread_hit_ratio"].as_f64().unwrap_or(-1.0);
        ensure!(
            ratio == hits as f64 / calls as f64 && (evicted > 0 || ratio == 1.0),
            "level {flows}: spread hit ratio {ratio} with {evicted} flows evicted: {c}"
        );
    }
    Ok(())
}

/// Runs one case in a loop for `seconds` on the bench CPU (to profile it with
/// `perf record -C <cpu>`). Returns runs and mean ns per run.
pub fn spin(case: &str, seconds: f64, cpu: usize, max_flows: u32) -> Result<(u64, f64)> {
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<(u64, f64)> {
        sys::pin_thread(cpu)?;
        let mut pass = PassProgram::load()?;
        let mut l = load_identity(&bed, max_flows)?;
        let dp = &mut l.dp;
        keep_in_dispatcher(dp, &mut pass)?;
        let vip80 = SocketAddrV4::new(VIP, TCP_PORT);
        let c = SocketAddrV4::new(CLIENT, 40001);
        dp.test_run(&frame(c, vip80, L4::Syn, 255, FRAME_LEN), Some(bed.v0), 1)?;
        let vip6 = SocketAddrV6::new(VIP6, TCP_PORT, 0, 0);
        let c6 = SocketAddrV6::new(CLIENT6, 40001, 0, 0);
        dp.test_run(&frame6(c6, vip6, L4::Syn, 255, FRAME_LEN), Some(bed.v0), 1)?;
        let (f, ingress) = match case {
            "established6" | "pass6" => (frame6(c6, vip6, L4::Ack, 255, FRAME_LEN), bed.v0),
            "reply6" => (frame6(vip6, c6, L4::Ack, 255, FRAME_LEN), bed.v1),
            "established" | "pass" => (frame(c, vip80, L4::Ack, 255, FRAME_LEN), bed.v0),
            "reply" => (frame(vip80, c, L4::Ack, 255, FRAME_LEN), bed.v1),
            "nonvip" => (
                frame(c, "198.18.1.99:80".parse()?, L4::Ack, 255, FRAME_LEN),
                bed.v0,
            ),
            "syn" | "newflow" => (frame(c, vip80, L4::Syn, 255, FRAME_LEN), bed.v0),
            "stateless" => (
                frame(
                    c,
                    SocketAddrV4::new(VIP, STATELESS_PORT),
                    L4::Ack,
                    255,
                    FRAME_LEN,
                ),
                bed.v0,
            ),
            other => bail!("unknown case {other}"),
        };
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        let (mut runs, mut total) = (0u64, 0f64);
        let mut fresh = 0u32;
        while Instant::now() < end {
            if case == "newflow" {
                // A fresh 5-tuple per call, run once: part 1's cold new flow.
                fresh += 1;
                let f = frame(client(0, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                total += dp.test_run(&f, Some(ingress), 1)?.2.as_nanos() as f64;
                runs += 1;
                continue;
            }
            let d = if case == "pass" || case == "pass6" {
                pass.run(&f, ingress, 200)?.1
            } else {
                dp.test_run(&f, Some(ingress), 200)?.2
            };
            runs += 200;
            total += d.as_nanos() as f64 * 200.0;
        }
        Ok((runs, total / runs.max(1) as f64))
    })??;
    drop(bed);
    Ok(r)
}

/// Component costs: micro-programs (`xdp_parts`) doing one thing bgswitch's
/// fast path does, as it does it and as a proposal would, priced against
/// XDP_PASS with a large repeat (none of them changes the next run's input).
pub fn components(rounds: usize, repeat: u32, cpu: usize) -> Result<Value> {
    const PARTS: [(&str, &str); COMPONENTS] = [
        ("part_ktime", "bpf_ktime_get_ns()"),
        ("part_jiffies", "bpf_jiffies64() (tick resolution; inlined by the verifier)"),
        ("part_ktime_coarse", "bpf_ktime_get_coarse_ns() (tick resolution)"),
        ("part_hash20", "hash map lookup, 20-byte key, hit (like SERVICES)"),
        ("part_lru40", "LRU hash lookup, 40-byte key, hit (like FLOWS)"),
        ("part_lru16", "LRU hash lookup, 16-byte key, hit (an IPv4-only flow key)"),
        ("part_lru40_update", "LRU hash update of an existing 40-byte key (the first version's flow table)"),
        ("part_lru16_update", "LRU hash update of an existing 16-byte key, 48-byte value (a new flow writes one entry like it, of 80 bytes)"),
        ("part_lru16_update_pcpu", "the same with per-CPU LRU lists (BPF_F_NO_COMMON_LRU)"),
        ("part_fib_zeroed", "bpf_fib_lookup, parameters zeroed with core::mem::zeroed() (a call to the byte-loop memset) — as transmit.rs does"),
        ("part_fib_words", "bpf_fib_lookup, parameters zeroed with sixteen 4-byte stores"),
        ("part_fib_direct", "bpf_fib_lookup with BPF_FIB_LOOKUP_DIRECT, parameters zeroed with stores"),
        ("part_devmap_check_redirect", "DevMapHash lookup, then redirect through it — as transmit.rs does"),
        ("part_devmap_redirect", "DevMapHash redirect alone"),
        ("part_devmap_array_redirect", "DevMap (array) redirect alone"),
        ("part_redirect_ifindex", "bpf_redirect to an ifindex (the device is looked up after the program, outside this measure)"),
    ];
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<Value> {
        sys::pin_thread(cpu)?;
        let mut pass = PassProgram::load()?;
        let mut parts = Ebpf::load(objects::XDP_PARTS).context("loading xdp_parts")?;
        for (name, _) in PARTS {
            let p: &mut Xdp = parts
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("verifying {name}"))?;
        }
        let f = frame(
            SocketAddrV4::new(CLIENT, 40001),
            SocketAddrV4::new(VIP, TCP_PORT),
            L4::Ack,
            64,
            FRAME_LEN,
        );
        {
            let mut h: HashMap<_, [u8; 20], u32> =
                HashMap::try_from(parts.map_mut("HASH20").context("HASH20")?)?;
            h.insert(<[u8; 20]>::try_from(&f[14..34])?, 1, 0)?;
            let mut l: HashMap<_, [u8; 40], [u8; 40]> =
                HashMap::try_from(parts.map_mut("LRU40").context("LRU40")?)?;
            l.insert(<[u8; 40]>::try_from(&f[14..54])?, [1; 40], 0)?;
            let mut l: HashMap<_, [u8; 16], [u8; 40]> =
                HashMap::try_from(parts.map_mut("LRU16").context("LRU16")?)?;
            l.insert(<[u8; 16]>::try_from(&f[14..30])?, [1; 40], 0)?;
            for m in ["LRU16_48", "LRU16_48_PCPU"] {
                let mut l: HashMap<_, [u8; 16], [u8; 48]> =
                    HashMap::try_from(parts.map_mut(m).context("LRU16_48")?)?;
                l.insert(<[u8; 16]>::try_from(&f[14..30])?, [1; 48], 0)?;
            }
            let mut d: aya::maps::DevMapHash<_> =
                aya::maps::DevMapHash::try_from(parts.map_mut("PORTS").context("PORTS")?)?;
            d.insert(bed.v0 + 1, bed.v1, None, 0)?;
            let mut a: aya::maps::DevMap<_> =
                aya::maps::DevMap::try_from(parts.map_mut("PORT_ARRAY").context("PORT_ARRAY")?)?;
            a.set(1, bed.v1, None, 0)?;
        }
        // The FIB parts add the first byte of the MAC the lookup found to
        // their sink, and their return code (0 on success, 1-8 otherwise):
        // a first byte above 8 makes a successful lookup recognisable.
        ip_ns(
            bed.name(),
            &[
                "neigh",
                "replace",
                NEXT_HOP,
                "lladdr",
                "0a:00:00:00:01:02",
                "dev",
                "v1",
                "nud",
                "permanent",
            ],
        )?;
        let ctx = xdp_ctx(f.len(), bed.v0);
        let mut run_part = |name: &str| -> Result<f64> {
            let sink = |parts: &Ebpf| -> Result<u64> {
                let m: aya::maps::PerCpuArray<_, u64> =
                    aya::maps::PerCpuArray::try_from(parts.map("OUT").context("OUT")?)?;
                Ok(m.get(&0, 0)?.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
            };
            let before = sink(&parts)?;
            let p: &mut Xdp = parts.program_mut(name).context("program")?.try_into()?;
            let mut out = vec![0u8; f.len() + 256];
            let r = p.test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::new()
            })?;
            let added = sink(&parts)?.wrapping_sub(before);
            check_part(name, r.return_value, added, u64::from(repeat))?;
            ensure!(
                r.duration > Duration::ZERO,
                "{name}: the kernel timed {repeat} runs at zero"
            );
            Ok(r.duration.as_nanos() as f64)
        };
        let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut base = Vec::new();
        for round in 0..rounds {
            for k in 0..=PARTS.len() {
                let i = (k + round) % (PARTS.len() + 1);
                let mut v = Vec::new();
                for _ in 0..3 {
                    v.push(if i == PARTS.len() {
                        pass.run(&f, bed.v0, repeat)?.1.as_nanos() as f64
                    } else {
                        run_part(PARTS[i].0)?
                    });
                }
                if i == PARTS.len() {
                    base.push(median(&v));
                } else {
                    per.entry(PARTS[i].0).or_default().push(median(&v));
                }
            }
        }
        let rows: Vec<Value> = PARTS
            .iter()
            .map(|(name, label)| {
                let d: Vec<f64> = per[name].iter().zip(&base).map(|(a, b)| a - b).collect();
                json!({"part": name, "label": label, "over_baseline_ns": Summary::of(&d)})
            })
            .collect();
        ensure!(
            base.len() == rounds && base.iter().all(|b| b.is_finite() && *b > 0.0),
            "the XDP_PASS baseline was not timed in every round: {base:?}"
        );
        Ok(json!({
            "status": "measured",
            "checked": "every call of every part returned its verdict and did its work on every run (lookups hit, updates succeeded, FIB lookups found the neighbour, clocks read)",
            "method": format!("micro-programs in bench/ebpf/src/bin/xdp_parts.rs on the 64-byte established-ACK frame, ingress v0 of the part-1 namespace (routes and neighbours as there); repeat {repeat}, 3 calls per round, {rounds} interleaved rounds; median (min–max) over rounds of the difference to XDP_PASS"),
            "baseline_ns": Summary::of(&base),
            "components": rows,
        }))
    })??;
    drop(bed);
    Ok(r)
}

/// The number of component micro-programs [`components`] prices.
pub const COMPONENTS: usize = 16;

/// What one call of a component micro-program must show, `repeat` runs:
/// its verdict (the redirects redirect, the rest pass) and what it added to
/// its sink map `OUT` — every lookup a hit (the value stored for its key on
/// every run; LRU40's value is 1, or 2 once `part_lru40_update` wrote it),
/// every update a success (nothing added), every FIB lookup a success with
/// the neighbour's MAC (first byte 0x0a, so 10 per run), every clock read
/// non-zero. A part that measured something else (a miss, a failed lookup, a
/// redirect that fell back to XDP_PASS) fails here instead of being priced.
fn check_part(name: &str, verdict: u32, added: u64, repeat: u64) -> Result<()> {
    let redirects = name.contains("redirect");
    let want_verdict = if redirects { XDP_REDIRECT } else { XDP_PASS };
    ensure!(
        verdict == want_verdict,
        "{name} returned {verdict}, want {want_verdict}"
    );
    let ok = match name {
        "part_ktime" | "part_jiffies" | "part_ktime_coarse" => added != 0,
        "part_hash20" | "part_lru16" => added == repeat,
        "part_lru40" => added == repeat || added == 2 * repeat,
        "part_lru40_update" | "part_lru16_update" | "part_lru16_update_pcpu" => added == 0,
        "part_fib_zeroed" | "part_fib_words" | "part_fib_direct" => added == 10 * repeat,
        _ if redirects => added == 0,
        _ => bail!("{name}: no check for this component"),
    };
    ensure!(
        ok,
        "{name} did not do its work on every one of {repeat} runs (added {added} to its sink)"
    );
    Ok(())
}

/// Quick mode: every component was measured in every round, with finite
/// figures (what [`components`] checked of each call is in its `checked`).
pub fn assert_components(section: &Value, rounds: usize) -> Result<()> {
    ensure!(
        section["status"] == "measured",
        "components: {}",
        section["status"]
    );
    let rows = section["components"]
        .as_array()
        .context("no component rows")?;
    ensure!(
        rows.len() == COMPONENTS,
        "{} component rows, want {COMPONENTS}",
        rows.len()
    );
    let finite = |v: &Value| v.as_f64().is_some_and(f64::is_finite);
    for r in rows {
        let d = &r["over_baseline_ns"];
        ensure!(
            d["n"].as_u64() == Some(rounds as u64)
                && finite(&d["median"])
                && finite(&d["min"])
                && finite(&d["max"]),
            "component not measured in each of {rounds} rounds: {r}"
        );
    }
    let b = &section["baseline_ns"];
    ensure!(
        b["n"].as_u64() == Some(rounds as u64) && b["min"].as_f64().is_some_and(|m| m > 0.0),
        "baseline not measured in each of {rounds} rounds: {b}"
    );
    Ok(())
}
