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
mod forward;
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
use bgswitch_common::global;

use crate::{
    context::Packet,
    maps::count,
    parse::{parse, Skip},
};

/// The path for a frame of either context: ICMP messages take
/// [`run_icmp`], other IPv6 frames [`run6`], the rest [`run4`]. Each is a
/// BPF subprogram with a stack frame of its own: inlined side by side, the
/// paths' stack slots pass the 512-byte limit; this dispatch keeps almost
/// none, so each path may use nearly all of it (the verifier counts a call
/// chain's frames together).
///
/// A packet the path passed because it is longer than its next hop's MTU
/// becomes the ICMP error its sender needs ([`too_big`]).
#[inline(always)]
fn run<C: Packet>(ctx: &C) -> u32 {
    let verdict = match parse::ip_family(ctx) {
        Some(v6) if icmp::is_icmp(ctx, v6) => return run_icmp(ctx, v6),
        Some(true) => run6(ctx),
        _ => run4(ctx),
    };
    if verdict == C::PASS {
        if let Some(mtu) = icmp::take_too_big() {
            return too_big(ctx, mtu);
        }
    }
    verdict
}

/// See `icmp::too_big`.
#[inline(never)]
fn too_big<C: Packet>(ctx: &C, mtu: u32) -> u32 {
    icmp::too_big(ctx, mtu)
}

/// ICMP, either family: errors about switched flows translated
/// (`icmp.rs`), the rest passed.
#[inline(never)]
fn run_icmp<C: Packet>(ctx: &C, v6: bool) -> u32 {
    icmp::run_icmp(ctx, v6)
}

/// Counts why a frame is not the path's and passes it untouched.
#[inline(always)]
fn skipped<C: Packet>(skip: Skip) -> u32 {
    count(match skip {
        Skip::NotIp => global::PASS_NOT_IP,
        Skip::NotTcpUdp => global::PASS_NOT_SERVICE,
        Skip::Fragment => global::FRAGMENT,
        Skip::Malformed => global::MALFORMED,
    });
    C::PASS
}

/// Everything but IPv6: parsed as IPv4 (what is not is counted and
/// passed), then `path::handle`.
#[inline(never)]
fn run4<C: Packet>(ctx: &C) -> u32 {
    match parse(ctx) {
        Ok(f) => path::handle(ctx, &f),
        Err(skip) => skipped::<C>(skip),
    }
}

/// IPv6: parsed, then `path::handle6`.
#[inline(never)]
fn run6<C: Packet>(ctx: &C) -> u32 {
    match parse::parse6(ctx) {
        Ok(f) => path::handle6(ctx, &f),
        Err(skip) => skipped::<C>(skip),
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
