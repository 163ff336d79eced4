//! This CPU's flow cache (`FLOW_CACHE`): a copy of a flow record's
//! decision for one direction, used while its key, generation, freshness
//! and length rules hold (see `bgswitch_common::CachedFlow`), so an
//! established packet of a cached flow needs no hash lookup. Filled and
//! cleared by the stages that take the flow table's path.

use bgswitch_common::{
    cache_slot, control, csum::Delta, flow_flags, global, CachedFlow, FlowEntry, FlowKey4,
};

use crate::{
    context::{Packet, Side},
    flow::same_key,
    frame::Frame,
    maps::{account, count, CONTROL, FLOW_CACHE},
    transmit::{transmit_l2, Fresh},
};

/// Where a packet's flow-cache slot is, and what it needs to be valid.
pub struct Cache {
    pub slot: Option<*mut CachedFlow>,
    pub key: FlowKey4,
    pub fresh: Fresh,
    /// `Settings::cache_shift`.
    pub shift: u32,
    /// `Settings::backend_hops`: a new IPv4 flow may take its backend's
    /// kept next hop.
    pub backend_hops: bool,
}

/// This CPU's `FLOW_CACHE` slot of a 5-tuple: its region (`1 << (32 -
/// shift)` slots per CPU id) and the slot within. The verifier inlines both
/// the CPU id and the array lookup; an index past the array (a CPU id the
/// daemon did not size for) finds no slot, and the packet takes the
/// `FLOWS` path.
#[inline(always)]
pub fn cache_index(key: &FlowKey4, shift: u32) -> u32 {
    // SAFETY: no arguments, no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    (cpu << ((32 - shift) & 31)) | cache_slot(key, shift)
}

/// Whether the packet can take the slot's decision: the rules of
/// `bgswitch_common::CachedFlow` that need the slot (the caller checked TTL
/// > 1 and no SYN, FIN or RST).
#[inline(always)]
pub fn cache_hit(c: &CachedFlow, cache: &Cache, f: &Frame, now: u64) -> bool {
    same_key(&c.key, &cache.key)
        && c.gen == cache.fresh.gen
        && c.nh_ifindex != 0
        && u64::from((now as u32).wrapping_sub(c.last_seen)) <= cache.fresh.refresh
        && f.tot_len <= c.nh_len
}

/// A cached flow's packet: what `to_backend` or `from_backend` would do for
/// it with the entry unchanged. `None`: the service is disabled (the slow path
/// says so and counts it).
#[inline(always)]
pub fn cached<C: Packet>(ctx: &C, f: &Frame, c: &CachedFlow) -> Option<u32> {
    let reverse = c.flags & flow_flags::REVERSE != 0;
    if !reverse {
        let word = CONTROL.get_ptr(c.service)?;
        // SAFETY: one 32-bit load of an array slot.
        if !control::enabled(unsafe { core::ptr::read_volatile(word) }) {
            return None;
        }
    }
    account(c.backend_stat as u32, f.frame_len, false, reverse);
    let (side, hit) = if reverse {
        (Side::Src, global::REPLIES)
    } else {
        (Side::Dst, global::FLOW_HITS)
    };
    if ctx
        .rewrite_cached(f, side, c.peer, c.peer_port, c.ip_delta, c.l4_delta)
        .is_none()
    {
        count(global::MALFORMED);
        return Some(C::PASS);
    }
    Some(transmit_l2(
        ctx,
        c.nh_ifindex,
        &c.nh_dmac,
        &c.nh_smac,
        Some(hit),
    ))
}

/// Which direction of a flow a cache slot serves.
#[derive(Clone, Copy)]
pub enum Dir {
    /// Client → VIP: rewritten to the entry's backend.
    Forward,
    /// Backend → client: rewritten back to the VIP.
    Reply { vip: u32, vport: u16 },
}

/// The older of two low-32-bit tick stamps.
#[inline(always)]
fn older(a: u32, b: u32) -> u32 {
    if (a.wrapping_sub(b) as i32) < 0 {
        a
    } else {
        b
    }
}

/// Copies an entry's decision for one direction (as it is after this packet)
/// into this CPU's cache slot, if it has a next hop to use; clears the slot
/// of this 5-tuple otherwise.
#[inline(always)]
pub fn fill(cache: &Cache, e: &FlowEntry, dir: Dir) {
    let Some(c) = cache.slot else {
        return;
    };
    // SAFETY: this CPU's slot; every field written as a whole integer.
    let c = unsafe { &mut *c };
    let (ifindex, dmac, smac, len, gen, at) = match dir {
        Dir::Forward => (
            e.nh_ifindex,
            &e.nh_dmac,
            &e.nh_smac,
            e.nh_len,
            e.nh_gen,
            e.nh_at,
        ),
        Dir::Reply { .. } => (
            e.rnh_ifindex,
            &e.rnh_dmac,
            &e.rnh_smac,
            e.rnh_len,
            e.rnh_gen,
            e.rnh_at,
        ),
    };
    if ifindex == 0 || gen != cache.fresh.gen {
        // No next hop to cache (the frame went to the stack): the slot must
        // not keep serving an older decision for this flow, which this
        // packet may just have replaced (a SYN reusing a closed flow's
        // 5-tuple that is too long for the MTU, say).
        if same_key(&c.key, &cache.key) {
            c.nh_ifindex = 0;
        }
        return;
    }
    // Fresh while neither the entry's last-seen stamp nor this direction's
    // next hop is due for its refresh.
    let fresh = older(e.last_seen as u32, at);
    write_slot(
        c,
        cache,
        dir,
        Decision {
            peer: e.peer,
            peer_port: e.peer_port,
            colour: e.colour,
            service: e.service,
            stat: e.backend_stat,
            last_seen: fresh,
        },
        ifindex,
        dmac,
        smac,
        len,
    );
}

/// What a cache slot serves, besides its next hop.
pub struct Decision {
    /// The backend (forward; the reply's peer is the VIP).
    pub peer: u32,
    pub peer_port: u16,
    pub colour: u8,
    pub service: u32,
    pub stat: u16,
    /// Low 32 bits of the tick the slot is fresh from.
    pub last_seen: u32,
}

/// Writes this CPU's slot of the packet's 5-tuple (`c`): the decision for
/// direction `dir` and its next hop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn write_slot(
    c: &mut CachedFlow,
    cache: &Cache,
    dir: Dir,
    d: Decision,
    ifindex: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    len: u16,
) {
    count(global::FLOW_CACHE_FILLS);
    let (peer, peer_port, flags, old_addr, old_port) = match dir {
        Dir::Forward => (d.peer, d.peer_port, 0, cache.key.dst, cache.key.dport),
        Dir::Reply { vip, vport } => (
            vip,
            vport,
            flow_flags::REVERSE,
            cache.key.src,
            cache.key.sport,
        ),
    };
    c.key.src = cache.key.src;
    c.key.dst = cache.key.dst;
    c.key.sport = cache.key.sport;
    c.key.dport = cache.key.dport;
    c.key.proto = cache.key.proto;
    c.gen = cache.fresh.gen;
    c.last_seen = d.last_seen;
    c.peer = peer;
    c.peer_port = peer_port;
    c.colour = d.colour;
    c.flags = flags;
    c.service = d.service;
    c.nh_ifindex = ifindex;
    for i in 0..6 {
        // SAFETY: in-bounds writes (byte stores: no memcpy call).
        unsafe {
            core::ptr::write_volatile(&mut c.nh_dmac[i], dmac[i]);
            core::ptr::write_volatile(&mut c.nh_smac[i], smac[i]);
        }
    }
    c.nh_len = len;
    c.backend_stat = d.stat;
    // What this direction's rewrite changes, for every packet alike.
    let addr = Delta::ZERO.add32(old_addr, peer);
    c.ip_delta = addr.ttl_decrement().folded();
    c.l4_delta = addr.add16(old_port, peer_port).folded();
}

/// Clears this CPU's cache slot of `key`, if it holds it.
#[inline(always)]
pub fn forget(key: &FlowKey4, shift: u32) {
    if shift == 0 {
        return;
    }
    if let Some(c) = FLOW_CACHE.get_ptr_mut(cache_index(key, shift)) {
        // SAFETY: this CPU's slot.
        let c = unsafe { &mut *c };
        if same_key(&c.key, key) {
            c.nh_ifindex = 0;
        }
    }
}
