//! Rare events an operator should hear about — a frame bgswitch rewrote but
//! cannot forward itself, a flow it could not record, a pool with no
//! backends — logged through aya-log into the daemon's log. About one
//! message per kind per [`LOG_INTERVAL_REFRESHES`] refreshes (one second),
//! whatever the number of CPUs: the global counters say how often each
//! happened. Nothing on the established path logs.
//!
//! The path only notes an event ([`note`]: its kind and numbers in this
//! CPU's `EVENT` slot) and goes on; when the frame's verdict is known,
//! [`flush`] hands the frame to the log program (`tail::LOG`), which
//! writes the message and returns the verdict ([`log`]). aya-log's
//! formatting is many instructions, and the verifier walks it once per
//! path that reaches it: inlined at each site it was nine tenths of the
//! packet programs' verification (840 000 of the XDP program's million
//! instructions), leaving no room for a new branch.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya_log_ebpf::{error, warn};
use bgswitch_common::{global, tail, Addr, Event, LOG_INTERVAL_REFRESHES};

use crate::{
    clock::now,
    context::Packet,
    flow::set_addr,
    maps::{EVENT, LOG_GATE, SETTINGS},
};

/// Ticks between two messages of one kind before the daemon wrote the
/// settings (one second at HZ 1000, four at HZ 250).
const INTERVAL_WITHOUT_SETTINGS: u64 = 1000;

/// Whether a message of `kind` (a `global` counter index) may be logged
/// now; if so, the gate closes for the interval. The gate is shared by all
/// CPUs (plain aligned 64-bit loads and stores, no lock): CPUs that pass it
/// at the same moment may each log once, so a burst on many CPUs gives a
/// few messages, not one per CPU every second.
#[inline(always)]
pub fn gate(kind: u32) -> bool {
    // The array's one element always exists: zero until the daemon writes it.
    let interval = match SETTINGS.get(0) {
        Some(s) if s.refresh != 0 => s.refresh * LOG_INTERVAL_REFRESHES,
        _ => INTERVAL_WITHOUT_SETTINGS,
    };
    let Some(last) = LOG_GATE.get_ptr_mut(kind) else {
        return false;
    };
    let now = now();
    // SAFETY: an aligned array slot; single 64-bit loads and stores.
    unsafe {
        let seen = core::ptr::read_volatile(last);
        if seen != 0 && now.wrapping_sub(seen) < interval {
            return false;
        }
        core::ptr::write_volatile(last, now);
    }
    true
}

/// Notes an event of `kind` (a `global` counter index) for [`flush`], if
/// its gate is open: the address and numbers its message names (`v6`:
/// `addr` is an IPv6 address). The slot holds one event: a second one on
/// the same packet's path (a note of the same tick) is left to the next
/// packet that has it (its gate stays open); an older note, whose packet
/// left without a flush, is replaced.
#[inline(always)]
pub fn note(kind: u32, addr: &Addr, v6: bool, arg: u32, arg2: u16) -> bool {
    let Some(e) = EVENT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; runs are not nested on one CPU.
    let e = unsafe { &mut *e };
    let at = now() as u32;
    if (e.kind != 0 && e.at == at) || !gate(kind) {
        return false;
    }
    e.at = at;
    e.kind = kind + 1;
    set_addr(&mut e.addr, addr);
    e.arg = arg;
    e.arg2 = arg2;
    e.v6 = u16::from(v6);
    true
}

/// The frame's verdict, after the log program wrote the message of an
/// event this run noted: a tail call, which returns `action` (as does
/// this if no event was noted, or the log program is not loaded).
#[inline(always)]
pub fn flush<C: Packet>(ctx: &C, action: u32) -> u32 {
    let Some(e) = EVENT.get_ptr_mut(0) else {
        return action;
    };
    // SAFETY: as in `note`.
    let e = unsafe { &mut *e };
    if e.kind == 0 {
        return action;
    }
    e.action = action;
    ctx.tail_call(tail::LOG);
    // Not loaded: the event goes unlogged (its counter has it).
    e.kind = 0;
    action
}

/// The log program: writes the message of this CPU's noted event and
/// returns the verdict [`flush`] left.
#[inline(always)]
pub fn log<C: Packet>(ctx: &C) -> u32 {
    let Some(e) = EVENT.get_ptr_mut(0) else {
        return C::PASS;
    };
    // SAFETY: as in `note`.
    let slot = unsafe { &mut *e };
    let e: Event = *slot;
    slot.kind = 0;
    let ip = if e.v6 != 0 {
        let mut o = [0u8; 16];
        for (i, w) in e.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(e.addr[0].to_ne_bytes()))
    };
    match e.kind.wrapping_sub(1) {
        global::FLOW_INSERT_FAILED => error!(
            ctx,
            "data plane: a new flow to {:i} could not be recorded in the flow table (error {}): it is forwarded but not pinned to its backend (counter flow_insert_failed)",
            ip,
            e.arg as i32
        ),
        global::NO_BACKEND => warn!(
            ctx,
            "data plane: service {} has no backend in its pool of colour {} (0 blue, 1 green): new flows pass to the kernel stack untouched (counter no_backend)",
            e.arg,
            e.arg2
        ),
        global::FIB_OTHER => warn!(
            ctx,
            "data plane: no usable route towards {:i} (bpf_fib_lookup: {}; no route, unreachable, forwarding off, or over the MTU): rewritten frames go to the kernel stack (counter fib_other)",
            ip,
            e.arg as i32
        ),
        global::EGRESS_UNKNOWN => warn!(
            ctx,
            "data plane: the route towards {:i} leaves through ifindex {}, which this program cannot send to (bgswitch does not serve it, or serves it with TC where XDP cannot redirect): rewritten frames go to the kernel stack (counter egress_unknown); add that interface to `interfaces`",
            ip,
            e.arg
        ),
        _ => {}
    }
    e.action
}
