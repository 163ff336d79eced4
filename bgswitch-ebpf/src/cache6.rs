//! This CPU's flow cache of IPv6 flows (`FLOW_CACHE6`, 96-byte slots): as `cache.rs` for
//! IPv4, under the same rules (`bgswitch_common::CachedFlow`), so an
//! established IPv6 packet of a cached flow needs no `FLOWS6` lookup (a
//! 40-byte key hashed, a bucket walked). The slot keeps its direction's
//! TCP/UDP checksum delta, computed once when it is filled: the cached
//! rewrite stores the four address words and the port and applies it
//! (`Packet::rewrite_cached6`).

use bgswitch_common::{
    cache6_slot, control, csum::Delta, flow_flags, global, Addr, CachedFlow6, FlowEntry, FlowKey,
    CACHE6_SHIFT_EXTRA, FAMILY_IPV6,
};

use crate::{
    context::{Packet, Side},
    flow::set_addr,
    frame::Frame,
    maps::{account, count, CONTROL, FLOW_CACHE6},
    transmit::{transmit, Fresh},
};

/// A 5-tuple by its parts (no 40-byte key built on a stack near the
/// verifier's limit).
#[derive(Clone, Copy)]
pub struct Tuple<'a> {
    pub src: &'a Addr,
    pub dst: &'a Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<'a> Tuple<'a> {
    /// A frame's 5-tuple as received.
    #[inline(always)]
    pub fn of(f: &'a Frame) -> Self {
        Tuple {
            src: &f.src,
            dst: &f.dst,
            sport: f.sport,
            dport: f.dport,
            proto: f.proto,
        }
    }

    /// A key's.
    #[inline(always)]
    pub fn key(k: &'a FlowKey) -> Self {
        Tuple {
            src: &k.src,
            dst: &k.dst,
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
        }
    }

    #[inline(always)]
    fn is(&self, k: &FlowKey) -> bool {
        k.src == *self.src
            && k.dst == *self.dst
            && k.sport == self.sport
            && k.dport == self.dport
            && k.proto == self.proto
    }
}

/// This CPU's `FLOW_CACHE6` slot of a 5-tuple, for `cache_shift` (0: no
/// cache).
#[inline(always)]
pub fn slot6(t: Tuple, cache_shift: u32) -> Option<*mut CachedFlow6> {
    if cache_shift == 0 {
        return None;
    }
    let shift = cache_shift + CACHE6_SHIFT_EXTRA;
    // SAFETY: no arguments, no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    let slot = cache6_slot(t.src, t.dst, t.sport, t.dport, t.proto, shift);
    FLOW_CACHE6.get_ptr_mut((cpu << ((32 - shift) & 31)) | slot)
}

/// Whether the slot holds the frame's 5-tuple: the addresses compared as
/// four 64-bit words read straight from the IPv6 header (as the key holds
/// them, source then destination), the ports and the protocol from the
/// frame.
#[inline(always)]
fn holds(c: &CachedFlow6, f: &Frame) -> bool {
    let key = (&c.key as *const FlowKey).cast::<u64>();
    // SAFETY: `f.ip` is the frame's 40-byte IPv6 header, bounds-checked by
    // parse6 (no helper has moved the data since); its addresses are the
    // 32 bytes from offset 8 (unaligned packet loads are fine on the 64-bit
    // JITs). The key is the slot's first field (array values are 8-byte
    // aligned) and starts with the same 32 bytes.
    let addrs = unsafe {
        let ip = f.ip.add(8).cast::<u64>();
        let word =
            |i: usize| core::ptr::read_volatile(ip.add(i)) == core::ptr::read_volatile(key.add(i));
        word(0) && word(1) && word(2) && word(3)
    };
    addrs && c.key.sport == f.sport && c.key.dport == f.dport && c.key.proto == f.proto
}

/// Whether the packet can take the slot's decision (the caller checked
/// hop limit > 1 and no SYN, FIN or RST).
#[inline(always)]
pub fn hit6(c: &CachedFlow6, fresh: Fresh, f: &Frame, now: u64) -> bool {
    holds(c, f)
        && c.gen == fresh.gen
        && c.nh_ifindex != 0
        && u64::from((now as u32).wrapping_sub(c.last_seen)) <= fresh.refresh
        && f.tot_len <= c.nh_len
}

/// A cached IPv6 flow's packet: what `to_backend` or `from_backend` would
/// do with the record unchanged. `None`: the service is disabled.
#[inline(always)]
pub fn cached6<C: Packet>(ctx: &C, f: &Frame, c: &CachedFlow6) -> Option<u32> {
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
        .rewrite_cached6(f, side, &c.peer, c.peer_port, c.l4_delta)
        .is_none()
    {
        count(global::MALFORMED);
        return Some(C::PASS);
    }
    Some(transmit(
        ctx,
        f,
        c.nh_ifindex,
        &c.nh_dmac,
        &c.nh_smac,
        Some(hit),
    ))
}

/// Which direction of a flow a slot serves, and what its packets are
/// rewritten to.
pub enum Dir6<'a> {
    /// Client → VIP: to the backend.
    Forward { backend: &'a Addr },
    /// Backend → client: back to the VIP.
    Reply { vip: &'a Addr, vport: u16 },
}

/// Copies a record's decision for one direction (as it is after this
/// packet, whose 5-tuple is `t`) into this CPU's slot, if it has a next
/// hop to use; clears the slot of this 5-tuple otherwise.
#[inline(always)]
pub fn fill6(t: Tuple, cache_shift: u32, fresh: Fresh, e: &FlowEntry, dir: Dir6) {
    let Some(c) = slot6(t, cache_shift) else {
        return;
    };
    // SAFETY: this CPU's slot; every field written as a whole integer.
    let c = unsafe { &mut *c };
    let (ifindex, dmac, smac, len, gen, at, peer, peer_port, flags, old, old_port) = match dir {
        Dir6::Forward { backend } => (
            e.nh_ifindex,
            &e.nh_dmac,
            &e.nh_smac,
            e.nh_len,
            e.nh_gen,
            e.nh_at,
            backend,
            e.peer_port,
            0,
            t.dst,
            t.dport,
        ),
        Dir6::Reply { vip, vport } => (
            e.rnh_ifindex,
            &e.rnh_dmac,
            &e.rnh_smac,
            e.rnh_len,
            e.rnh_gen,
            e.rnh_at,
            vip,
            vport,
            flow_flags::REVERSE,
            t.src,
            t.sport,
        ),
    };
    if ifindex == 0 || gen != fresh.gen {
        // No next hop to cache: the slot must not keep serving an older
        // decision for this flow.
        if t.is(&c.key) {
            c.nh_ifindex = 0;
        }
        return;
    }
    count(global::FLOW_CACHE_FILLS);
    set_addr(&mut c.key.src, t.src);
    set_addr(&mut c.key.dst, t.dst);
    c.key.sport = t.sport;
    c.key.dport = t.dport;
    c.key.proto = t.proto;
    c.key.family = FAMILY_IPV6;
    set_addr(&mut c.peer, peer);
    c.gen = fresh.gen;
    // Fresh while neither the record's last-seen stamp nor this
    // direction's next hop is due for its refresh.
    let (a, b) = (e.last_seen as u32, at);
    c.last_seen = if (a.wrapping_sub(b) as i32) < 0 { a } else { b };
    c.service = e.service;
    c.nh_ifindex = ifindex;
    for i in 0..6 {
        // SAFETY: in-bounds writes (byte stores: no memcpy call).
        unsafe {
            core::ptr::write_volatile(&mut c.nh_dmac[i], dmac[i]);
            core::ptr::write_volatile(&mut c.nh_smac[i], smac[i]);
        }
    }
    c.nh_len = len;
    c.backend_stat = e.backend_stat;
    c.peer_port = peer_port;
    c.colour = e.colour;
    c.flags = flags;
    // What this direction's rewrite changes, for every packet alike.
    c.l4_delta = Delta::ZERO
        .add_addr(old, peer, 4)
        .add16(old_port, peer_port)
        .folded();
}

/// Clears this CPU's slot of `t`, if it holds it.
#[inline(always)]
pub fn forget6(t: Tuple, cache_shift: u32) {
    if let Some(c) = slot6(t, cache_shift) {
        // SAFETY: this CPU's slot.
        let c = unsafe { &mut *c };
        if t.is(&c.key) {
            c.nh_ifindex = 0;
        }
    }
}
