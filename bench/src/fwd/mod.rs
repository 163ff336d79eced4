//! Part 2 (forwarding rate on one core) and the forwarding half of part 5.
//!
//! Three namespaces: `gen` —g0/l0— `lb` —l1/s0— `sink`. The generator is the
//! project's own XDP program (`xdp_gen`) run through BPF_PROG_TEST_RUN in
//! live-frames mode on one pinned CPU, with g0 as its ingress: every frame is
//! written whole and XDP_TXed out of g0, so it arrives on l0 in the load
//! balancer. The receiver is `xdp_sink` on s0 (counts, drops); the floor puts
//! the sink on l0 instead. Softirq processing of every hop runs on the
//! generator's CPU (veth schedules the peer's NAPI locally), so a run measures
//! one core doing generator + load balancer + receiver; the floor is the
//! generator + receiver alone.
//!
//! Configurations: floor; the redirect ceiling (`xdp_redirect` on l0: the
//! MACs and a DevMap redirect to l1, nothing else — the most any XDP load
//! balancer can reach on this path); bgswitch (XDP on l0 and l1, redirect l0 → l1) with
//! 1, 10 000 and 1 000 000 flows; bgswitch's TC program (clsact ingress on
//! l0 and l1, `bpf_redirect` l0 → l1; l0 takes the XDP frames with GRO on,
//! as the kernel and nftables paths do) with 1 and 10 000 flows; plain kernel forwarding (ip_forward, no XDP
//! on l0, GRO on so l0 takes XDP frames); nftables DNAT (prerouting dnat to
//! the sink) with 1 and 10 000 flows. Frames: 64 B Ethernet+IPv4+UDP, UDP
//! checksum 0. IPv6: bgswitch's table path (FLOWS6 and its per-CPU flow
//! cache) with 1 and 10 000 flows, the kernel's own IPv6 forwarding,
//! and a floor of its own, from `xdp_gen6` (64 B Ethernet+IPv6+UDP, a
//! valid UDP checksum). Two CPUs: the veths have two queues each, and two
//! generators run at once, pinned to CPUs 0 and 1, each with flows of its
//! own (`GenConfig::spread`): a frame is sent, forwarded and received on
//! its generator's CPU, as RSS keeps a flow on one queue; bgswitch's table
//! path and a stateless service, 10 000 flows per CPU, against the same
//! with one generator, and the floor and the redirect ceiling with two
//! generators (what the machine gives a second CPU on this path, without
//! bgswitch; the two-CPU rows' share of the floor is of this one). Each round runs every configuration once (the order rotates),
//! counting generated frames (the run's `repeat`) and frames delivered to the
//! sink; rates are delivered frames over the run's wall time.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::xdp::XdpLinkId,
    Ebpf, Pod,
};
use bgswitch::{config::AttachSetting, dataplane::Dataplane};
use bgswitch_bench_ebpf::{GenConfig, RedirectConfig};
use bgswitch_tests::TempNetns;
use serde_json::{json, Value};

use crate::{
    stats::{median, Summary},
    sys,
};

mod flood;
mod follow;
mod gross;
mod options;
mod rig;
mod spin;

pub use gross::assert_gross;
use options::Config;
pub use options::FwdOptions;
pub use spin::spin;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The follow measurement's green backend (blue is `SINK_ADDR`), on s0 too.
const SINK_ADDR2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
const PORT: u16 = 5353;
/// The follow measurement's service: UDP VIP:FOLLOW_PORT, blue → SINK_ADDR,
/// green → SINK_ADDR2.
const FOLLOW_PORT: u16 = PORT + 1;
const FOLLOW_ID: u32 = 2;
/// The SYN-flood measurement's service: TCP VIP:FLOOD_PORT (a table
/// service), blue → SINK_ADDR, green → SINK_ADDR2.
const FLOOD_PORT: u16 = PORT + 2;
const FLOOD_ID: u32 = 4;
/// Its established connections' sources: 198.18.40.0 + (i >> 8), ports
/// 40000 + (i & 0xff).
const ESTABLISHED_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 0);
/// The flood's spoofed sources: 198.19.64.0 + (flow >> 15), inside the
/// test bed's own 198.18.0.0/15 and apart from its VIP (198.19.0.10).
const FLOOD_SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 64, 0);
const FRAME_LEN: usize = 64;
/// Sources of generated flows: 198.18.16.0 + (flow >> 15), ports 1024 + (flow & 0x7fff).
const SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 0);
const SRC_PORT_BASE: u16 = 1024;
/// The IPv6 twins (`2001:db8:18:S::H` of `198.18.S.H`): the VIP, the sink,
/// the generator, and the sources of generated flows (2001:db8:18:16::
/// + (flow >> 15) in the last word).
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x10);
const SINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 1, 0, 0, 0, 2);
const GEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);
const SRC6_BASE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0x16, 0, 0, 0, 0);
/// The IPv6 service: UDP VIP6:PORT → SINK6:PORT.
const V6_ID: u32 = 3;

#[derive(Clone, Copy)]
#[allow(dead_code)] // read by the kernel
struct GenCfg(GenConfig);
// SAFETY: repr(C), integers and byte arrays only, no implicit padding.
unsafe impl Pod for GenCfg {}

#[derive(Clone, Copy)]
#[allow(dead_code)] // read by the kernel
struct RedirectCfg(RedirectConfig);
// SAFETY: repr(C), integers and byte arrays only, no implicit padding.
unsafe impl Pod for RedirectCfg {}

/// The namespaces and programs.
/// Fields drop in order: programs and links first, namespaces last.
struct Rig {
    g0: u32,
    /// The generator program the next run uses: `xdp_gen` or `xdp_gen6`.
    gen_prog: &'static str,
    l0_mac: [u8; 6],
    g0_mac: [u8; 6],
    genp: Ebpf,
    /// The generator's per-CPU state ([0] next flow, [1] frames generated),
    /// taken out of `genp` so it can be read while the generator runs.
    gen_state: PerCpuArray<MapData, u32>,
    sinkp: Ebpf,
    /// s0's receiver: `xdp_sink`, or `xdp_sink_seq` while flips are watched.
    sink_link: Option<XdpLinkId>,
    seq_link: Option<XdpLinkId>,
    /// Sink program links: (namespace is lb, l0) for the floor, (sink, s0).
    floor_link: Option<XdpLinkId>,
    /// `xdp_redirect`, and its link on l0 while attached.
    redirp: Ebpf,
    redirect_link: Option<XdpLinkId>,
    /// Data planes by flow-table size.
    dps: BTreeMap<u32, Dataplane>,
    /// The table size of the data plane attached to l0/l1 now (0: none),
    /// and how.
    attached: u32,
    attached_as: AttachSetting,
    nft_on: bool,
    /// Queues each veth end uses now (2 for the two-CPU rows, else 1).
    queues: u32,
    lb_file: File,
    opts: FwdOptions,
    gen: TempNetns,
    lb: TempNetns,
    sink: TempNetns,
}

struct Sample {
    rate_mpps: f64,
    sent: u64,
    delivered: u64,
    hit_ratio: Option<f64>,
}

fn run_config(rig: &mut Rig, c: Config, frames: u32, opts: &FwdOptions) -> Result<Sample> {
    run_config_chunked(rig, c, frames, frames, opts)
}

fn run_config_chunked(
    rig: &mut Rig,
    c: Config,
    frames: u32,
    chunk: u32,
    opts: &FwdOptions,
) -> Result<Sample> {
    rig.set(c)?;
    rig.configure_gen(c)?;
    let which = rig.attached;
    // Stateless packets are no flow-table hits: their own counter.
    let hit = if matches!(c, Config::Stateless(_) | Config::Stateless2(_)) {
        "stateless"
    } else {
        "flow_hits"
    };
    let hits0 = rig.bg_global(which, hit);
    let redir0 = rig.bg_global(which, "redirect");
    let (sent, delivered, wall) = if c.two_cpus() {
        rig.run_two(frames, chunk, opts.batch)?
    } else {
        rig.run(frames, chunk, opts.batch, opts.cpu)?
    };
    let hits = rig.bg_global(which, hit) - hits0;
    let redir = rig.bg_global(which, "redirect") - redir0;
    Ok(Sample {
        rate_mpps: delivered as f64 / wall.as_secs_f64() / 1e6,
        sent,
        delivered,
        hit_ratio: (which != 0).then(|| hits as f64 / redir.max(1) as f64),
    })
}

/// Runs part 2 (and, with `scale_max_flows`, part 5's forwarding half).
pub fn run(opts: &FwdOptions) -> Result<Value> {
    if sys::have("ethtool").is_none() {
        bail!("ethtool is not installed");
    }
    let mut rig = Rig::create(opts)?;
    let all = opts.configs();
    let (scale, configs): (Vec<Config>, Vec<Config>) =
        all.into_iter().partition(|c| matches!(c, Config::Scale(_)));

    // Warm-up: every flow seen (bgswitch tables and conntrack filled), caches warm.
    for &c in configs.iter().chain(&scale) {
        let frames = if c == Config::NewFlows {
            opts.frames / 4
        } else {
            c.flows().saturating_mul(2).max(opts.frames / 4)
        };
        run_config(&mut rig, c, frames, opts)
            .with_context(|| format!("warming up {}", c.label()))?;
    }
    let mut samples: BTreeMap<Config, Vec<Sample>> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..opts.rounds {
        for k in 0..configs.len() {
            let c = configs[(k + round) % configs.len()];
            let s = run_config(&mut rig, c, opts.frames, opts)?;
            samples.entry(c).or_default().push(s);
        }
        eprintln!(
            "bench: forwarding: round {} of {} done",
            round + 1,
            opts.rounds
        );
    }
    // The scale table after the main rounds (its fills are large).
    for round in 0..if scale.is_empty() {
        0
    } else {
        opts.rounds.min(3)
    } {
        for &c in &scale {
            let s = run_config(&mut rig, c, opts.frames, opts)?;
            samples.entry(c).or_default().push(s);
        }
        eprintln!("bench: forwarding: scale round {} done", round + 1);
    }
    // Loss with a paced generator (calls of one batch): frames the receiver
    // path could absorb, so any loss is the path's own. A run that lost
    // frames is run again, twice at most: a loss of the path's comes back,
    // where a softirq this VM stalled for milliseconds (seen: 23 308 of
    // 300 000 frames delivered in 28 ms) does not; the runs are counted.
    let mut paced = Vec::new();
    for &c in configs.iter().filter(|c| !matches!(c, Config::Floor)) {
        let mut runs = 0;
        let s = loop {
            runs += 1;
            let s = run_config_chunked(&mut rig, c, opts.paced_frames, opts.batch, opts)?;
            if s.delivered >= s.sent || runs == 3 {
                break s;
            }
        };
        paced.push(json!({
            "config": c.key(),
            "sent": s.sent,
            "delivered": s.delivered,
            "lost": s.sent.saturating_sub(s.delivered),
            "runs": runs,
        }));
    }
    let follow = if opts.follow_trials > 0 {
        let f = rig.follow(opts.follow_trials, opts.follow_frames, opts.cpu)?;
        eprintln!(
            "bench: forwarding: {} flips watched frame by frame",
            opts.follow_trials
        );
        f
    } else {
        Value::Null
    };
    let flood = if opts.flood_frames > 0 {
        let f = rig.syn_flood(opts.flood_established, opts.flood_frames, opts.cpu)?;
        eprintln!("bench: forwarding: SYN flood against draining connections");
        f
    } else {
        Value::Null
    };
    rig.set(Config::Kernel(1))?;
    let elapsed = started.elapsed();

    let rate = |c: Config| -> Option<f64> {
        samples
            .get(&c)
            .map(|v| median(&v.iter().map(|s| s.rate_mpps).collect::<Vec<_>>()))
    };
    let floor = rate(Config::Floor);
    // IPv6 rows against the IPv6 generator's floor (its frames cost the
    // generator more to write), and against the kernel's IPv6 forwarding.
    let floor6 = rate(Config::Floor6);
    // Two-CPU rows against the floor with two generators.
    let floor2 = rate(Config::Floor2);
    let kernel6 = opts.kernel6_flows.and_then(|n| rate(Config::Kernel6(n)));
    let nft10k = rate(Config::Nft(10_000))
        .or_else(|| opts.nft_flows.last().and_then(|&n| rate(Config::Nft(n))));
    let nft10k_tcp = rate(Config::NftTcp(10_000))
        .or_else(|| opts.nft_flows.last().and_then(|&n| rate(Config::NftTcp(n))));
    let mut rows = Vec::new();
    for (c, v) in &samples {
        let rates: Vec<f64> = v.iter().map(|s| s.rate_mpps).collect();
        let sent: u64 = v.iter().map(|s| s.sent).sum();
        let delivered: u64 = v.iter().map(|s| s.delivered).sum();
        let m = median(&rates);
        let hit = v.iter().filter_map(|s| s.hit_ratio).collect::<Vec<_>>();
        let floor = if c.ipv6() {
            floor6
        } else if c.two_cpus() {
            floor2
        } else {
            floor
        };
        rows.push(json!({
            "config": c.key(),
            "label": c.label(),
            "family": if c.ipv6() { 6 } else { 4 },
            "flows": c.flows(),
            "table_max_flows": (c.table(opts) != 0).then(|| c.table(opts)),
            "mpps": Summary::of(&rates),
            // In round order: rows of the same rounds pair up (see
            // `rate_ratio` in report/targets.rs).
            "mpps_by_round": rates,
            "ns_per_packet": if m > 0.0 { 1000.0 / m } else { f64::INFINITY },
            "lb_ns_per_packet_over_floor": floor.filter(|_| m > 0.0).map(|f| 1000.0 / m - 1000.0 / f),
            // TCP rows against nftables with TCP, the others with UDP.
            "ratio_to_nftables_dnat": if c.ipv6() {
                None
            } else if matches!(c, Config::Stateless(_) | Config::NftTcp(_)) {
                nft10k_tcp
            } else {
                nft10k
            }
            .map(|n| m / n),
            "ratio_to_kernel_forwarding_ipv6": if c.ipv6() { kernel6.map(|k| m / k) } else { None },
            "ratio_to_floor": floor.map(|f| m / f),
            "sent": sent,
            "delivered": delivered,
            "lost": sent.saturating_sub(delivered),
            "loss_ratio": 1.0 - delivered as f64 / sent.max(1) as f64,
            "flow_hit_ratio": (!hit.is_empty()).then(|| median(&hit)),
        }));
    }
    // bgswitch IPv6 against IPv4 with the same flows: rates and what each
    // adds over its own family's floor.
    let v6_vs_v4: Vec<Value> = opts
        .bg6_flows
        .iter()
        .filter_map(|&n| {
            let (r6, r4) = (rate(Config::Bgswitch6(n))?, rate(Config::Bgswitch(n))?);
            let over = |r: f64, f: Option<f64>| f.map(|f| 1000.0 / r - 1000.0 / f);
            Some(json!({
                "flows": n,
                "ipv6_mpps": r6,
                "ipv4_mpps": r4,
                "rate_ratio": r6 / r4,
                "ipv6_ns_per_packet": 1000.0 / r6,
                "ipv4_ns_per_packet": 1000.0 / r4,
                "ipv6_lb_ns_over_floor": over(r6, floor6),
                "ipv4_lb_ns_over_floor": over(r4, floor),
            }))
        })
        .collect();
    Ok(json!({
        "status": "measured",
        "ipv6_vs_ipv4": v6_vs_v4,
        "method": "xdp_gen in BPF_PROG_TEST_RUN live-frames mode on one pinned CPU (g0 XDP_TX → l0); xdp_sink counts at s0 (floor: at l0; the redirect ceiling: xdp_redirect on l0 writes the MACs and redirects to l1, nothing else); rate = frames delivered to the sink / wall time of the run; interleaved rounds with rotating order; median (min–max) over rounds",
        "frame_bytes": FRAME_LEN,
        "frames_per_run": opts.frames,
        "batch": opts.batch,
        "rounds": opts.rounds,
        "cpu": opts.cpu,
        "udp_checksum": 0,
        "bgswitch_udp_idle_timeout_s": 3600,
        "configs": rows,
        "paced": paced,
        "follow": follow,
        "syn_flood": flood,
        "paced_method": format!("each configuration once more with {} frames sent in calls of one batch ({} frames), so the generator cannot outrun the receiving path; loss here is the path's own (a run that lost frames is run again, at most three runs: a stalled softirq of this VM does not come back, a loss of the path's does; the last run is shown)", opts.paced_frames, opts.batch),
        "elapsed_s": elapsed.as_secs_f64(),
    }))
}
