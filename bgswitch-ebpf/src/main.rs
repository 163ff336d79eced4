//! The bgswitch data plane: one packet path compiled into two programs, XDP
//! (`bgswitch`, frames as a physical NIC's driver hands them over) and TC
//! (`bgswitch_tc`, clsact ingress: socket buffers, whose checksums may be
//! partial and which may stand for many segments, as veth pairs, bridges
//! and tap devices hand them over). `context.rs` is the seam between them.
//!
//! The packet's path: parse → look up the service (client → VIP) or the reverse
//! flow (backend → client) → follow or choose the flow → rewrite → forward.
//! Everything else passes to the stack untouched. The program makes no policy
//! decisions: colours, pools and shares are read from maps the daemon writes.
#![no_std]
#![no_main]
// Map keys go to the helpers by reference on purpose: the kernel is handed a
// pointer to the key where it already is (often inside a map value), with no
// copy onto the 512-byte stack; clippy's by-value suggestion would add one.
#![allow(clippy::needless_borrows_for_generic_args)]

// The packet's path, stage by stage (ARCHITECTURE.md's diagram): parse,
// path, stateless, cache, forward, reply, transmit.
mod cache;
mod cache6;
mod forward;
mod half_open;
mod handshake;
mod icmp;
mod parse;
mod path;
mod reply;
mod stateless;
mod transmit;
// The seam and its two contexts.
mod context;
mod ipv4;
mod ipv6;
mod tc;
mod xdp;
// What the stages share.
mod clock;
mod events;
mod family;
mod flow;
mod frame;
mod maps;
mod service;

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::{classifier, socket_filter, xdp},
    programs::{SkBuffContext, TcContext, XdpContext},
};
use bgswitch_common::{global, tail};

use crate::{
    context::Packet,
    maps::count,
    parse::{parse, Skip},
};

/// The path for a frame of either context: parsed, then `path::handle`
/// (IPv4 TCP/UDP, inlined here: no call on its way); IPv6 frames and ICMP
/// messages go to their own programs with a tail call (`bgswitch_common::
/// tail`), each with a 512-byte stack of its own (a BPF-to-BPF call would
/// count its frame with this one's, and cost the IPv4 path a call); what
/// parsing skips is counted and passed.
#[inline(always)]
fn run<C: Packet>(ctx: &C) -> u32 {
    let frame = match parse(ctx) {
        Ok(f) => f,
        Err(Skip::Ipv6) => return tail(ctx, tail::IPV6),
        Err(Skip::Icmp) => return tail(ctx, tail::ICMP),
        Err(skip) => return skipped::<C>(skip),
    };
    logged(ctx, path::handle(ctx, &frame))
}

/// The verdict, once the message of a rare event noted on the path is
/// written (`events.rs`). Such an event ends in PASS (no route, an egress
/// this program cannot send to, an empty pool), but for a flow that could
/// not be recorded, whose path writes it; a packet forwarded by the program
/// reads nothing more here.
#[inline(always)]
fn logged<C: Packet>(ctx: &C, action: u32) -> u32 {
    if action == C::PASS {
        events::flush(ctx, action)
    } else {
        action
    }
}

/// The IPv6 programs' path: parsed (extension headers walked), then
/// `path::handle6`; ICMPv6 to the ICMP program (found by the parse, not by
/// a read of its own before it).
#[inline(always)]
fn run6<C: Packet>(ctx: &C) -> u32 {
    let frame = match parse::parse6(ctx) {
        Ok(f) => f,
        Err(Skip::Icmp) => return tail(ctx, tail::ICMP),
        Err(skip) => return skipped::<C>(skip),
    };
    logged(ctx, path::handle6(ctx, &frame))
}

/// Hands the frame to the program at `index`; if that fails (the daemon
/// did not load it), the frame passes as it is.
#[inline(always)]
fn tail<C: Packet>(ctx: &C, index: u32) -> u32 {
    ctx.tail_call(index);
    C::PASS
}

/// Counts why a frame is not the path's and passes it untouched.
#[inline(always)]
fn skipped<C: Packet>(skip: Skip) -> u32 {
    count(match skip {
        Skip::NotIp => global::PASS_NOT_IP,
        Skip::NotTcpUdp | Skip::Ipv6 | Skip::Icmp => global::PASS_NOT_SERVICE,
        Skip::Fragment => global::FRAGMENT,
        Skip::Malformed => global::MALFORMED,
    });
    C::PASS
}

/// The ICMP programs' path: errors about switched flows translated
/// (`icmp.rs`), the rest passed.
#[inline(always)]
fn run_icmp<C: Packet>(ctx: &C) -> u32 {
    match parse::ip_family(ctx) {
        Some(v6) => logged(ctx, icmp::run_icmp(ctx, v6)),
        None => C::PASS,
    }
}

/// The too-big programs' path (`icmp::too_big`).
#[inline(always)]
fn run_too_big<C: Packet>(ctx: &C) -> u32 {
    match icmp::take_too_big() {
        Some(mtu) => logged(ctx, icmp::too_big(ctx, mtu)),
        None => C::PASS,
    }
}

#[xdp]
#[inline(always)]
pub fn bgswitch(ctx: XdpContext) -> u32 {
    run(&ctx)
}

#[classifier]
#[inline(always)]
pub fn bgswitch_tc(ctx: TcContext) -> i32 {
    tc::pull_headers(&ctx);
    run(&ctx) as i32
}

// The tail-called programs (`bgswitch_common::tail`), XDP then TC. The TC
// entry point has pulled the headers already.

#[xdp]
#[inline(always)]
pub fn bgswitch_ipv6(ctx: XdpContext) -> u32 {
    run6(&ctx)
}

#[xdp]
#[inline(always)]
pub fn bgswitch_icmp(ctx: XdpContext) -> u32 {
    run_icmp(&ctx)
}

#[xdp]
#[inline(always)]
pub fn bgswitch_too_big(ctx: XdpContext) -> u32 {
    run_too_big(&ctx)
}

#[xdp]
#[inline(always)]
pub fn bgswitch_log(ctx: XdpContext) -> u32 {
    events::log(&ctx)
}

#[classifier]
#[inline(always)]
pub fn bgswitch_tc_ipv6(ctx: TcContext) -> i32 {
    run6(&ctx) as i32
}

#[classifier]
#[inline(always)]
pub fn bgswitch_tc_icmp(ctx: TcContext) -> i32 {
    run_icmp(&ctx) as i32
}

#[classifier]
#[inline(always)]
pub fn bgswitch_tc_too_big(ctx: TcContext) -> i32 {
    run_too_big(&ctx) as i32
}

#[classifier]
#[inline(always)]
pub fn bgswitch_tc_log(ctx: TcContext) -> i32 {
    events::log(&ctx) as i32
}

/// The data plane's clock, for userspace: `jiffies` and CLOCK_MONOTONIC side
/// by side in `CLOCK` (run through BPF_PROG_TEST_RUN, never attached). The
/// daemon measures the tick rate from two ticks and converts flow times.
#[socket_filter]
pub fn bgswitch_clock(_ctx: SkBuffContext) -> i64 {
    // SAFETY: no arguments, no preconditions.
    let (j, ns) = unsafe { (bpf_jiffies64(), bpf_ktime_get_ns()) };
    if let Some(p) = maps::CLOCK.get_ptr_mut(0) {
        // SAFETY: array slot of this map.
        unsafe { *p = j };
    }
    if let Some(p) = maps::CLOCK.get_ptr_mut(1) {
        // SAFETY: as above.
        unsafe { *p = ns };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
