//! Forwarding a rewritten frame: the next hop kept in a flow record (or a
//! backend's, for stateless services) while it is current, else
//! `bpf_fib_lookup`; then the TTL, the MACs, and out of the egress
//! interface the way the context sends (XDP_TX or a DevMap redirect;
//! `bpf_redirect`). A frame with no usable next hop goes to the stack (or,
//! in TC, to the kernel's neighbour output while its neighbour is
//! unresolved).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
};
use bgswitch_common::{csum::Delta, global, tail, Addr, BackendHop, FlowEntry};

use crate::{
    context::Packet,
    events,
    frame::Frame,
    maps::{count, count2, BACKEND_HOPS, FIB6, TOO_BIG},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

/// What a kept next hop or cache slot needs to be current.
#[derive(Clone, Copy)]
pub struct Fresh {
    /// The flow-cache generation now.
    pub gen: u32,
    /// `Settings::refresh` (0 without settings: nothing is fresh).
    pub refresh: u64,
}

/// One direction's cached next hop inside a flow entry.
pub struct Nh<'a> {
    pub ifindex: &'a mut u32,
    pub dmac: &'a mut [u8; 6],
    pub smac: &'a mut [u8; 6],
    pub len: &'a mut u16,
    pub gen: &'a mut u32,
    pub at: &'a mut u32,
}

impl<'a> Nh<'a> {
    /// Towards the backend.
    #[inline(always)]
    pub fn forward(e: &'a mut FlowEntry) -> Self {
        Nh {
            ifindex: &mut e.nh_ifindex,
            dmac: &mut e.nh_dmac,
            smac: &mut e.nh_smac,
            len: &mut e.nh_len,
            gen: &mut e.nh_gen,
            at: &mut e.nh_at,
        }
    }

    /// Towards a backend of a stateless service.
    #[inline(always)]
    pub fn backend(h: &'a mut BackendHop) -> Self {
        Nh {
            ifindex: &mut h.ifindex,
            dmac: &mut h.dmac,
            smac: &mut h.smac,
            len: &mut h.len,
            gen: &mut h.gen,
            at: &mut h.at,
        }
    }

    /// Whether the kept next hop serves this packet: one was found, under
    /// the current generation, within the refresh, for a packet at least as
    /// long (the MTU check).
    #[inline(always)]
    pub fn usable(&self, f: &Frame, now: u64, fresh: Fresh) -> bool {
        *self.ifindex != 0
            && *self.gen == fresh.gen
            && u64::from((now as u32).wrapping_sub(*self.at)) <= fresh.refresh
            && f.tot_len <= *self.len
    }

    /// Towards the client.
    #[inline(always)]
    pub fn reply(e: &'a mut FlowEntry) -> Self {
        Nh {
            ifindex: &mut e.rnh_ifindex,
            dmac: &mut e.rnh_dmac,
            smac: &mut e.rnh_smac,
            len: &mut e.rnh_len,
            gen: &mut e.rnh_gen,
            at: &mut e.rnh_at,
        }
    }
}

/// Forwards a rewritten packet through a cached next hop, or looks the next
/// hop up (and keeps it) when there is none, when its generation is old, when
/// it is older than the refresh, or when the packet is longer than the one
/// it was looked up for (the MTU check). Counts `also` with the transmit.
/// `defer`: as for [`resolve_as`].
#[inline(always)]
pub fn send<C: Packet>(
    ctx: &C,
    f: &Frame,
    nh: Nh,
    now: u64,
    fresh: Fresh,
    also: Option<u32>,
    defer: bool,
) -> u32 {
    if nh.usable(f, now, fresh) {
        return transmit(ctx, f, *nh.ifindex, nh.dmac, nh.smac, also);
    }
    let hop = match resolve_as(ctx, f, defer) {
        Ok(hop) => hop,
        Err(unresolved) => {
            *nh.ifindex = 0;
            if let Some(a) = also {
                count(a);
            }
            return unresolved.map_or(C::PASS, |egress| ctx.unresolved(f, egress));
        }
    };
    // Byte stores: an array assignment may become a memcpy call here.
    for i in 0..6 {
        // SAFETY: in-bounds writes to fields of a valid entry.
        unsafe {
            core::ptr::write_volatile(&mut nh.dmac[i], hop.dmac[i]);
            core::ptr::write_volatile(&mut nh.smac[i], hop.smac[i]);
        }
    }
    *nh.len = f.tot_len;
    *nh.gen = fresh.gen;
    *nh.at = now as u32;
    *nh.ifindex = hop.ifindex;
    transmit(ctx, f, hop.ifindex, &hop.dmac, &hop.smac, also)
}

/// Copies one kept next hop into another (byte stores for the MACs: an
/// array assignment may become a memcpy call here).
#[inline(always)]
fn copy_nh(from: &Nh, to: &mut Nh) {
    for i in 0..6 {
        // SAFETY: in-bounds writes to fields of valid entries.
        unsafe {
            core::ptr::write_volatile(&mut to.dmac[i], from.dmac[i]);
            core::ptr::write_volatile(&mut to.smac[i], from.smac[i]);
        }
    }
    *to.len = *from.len;
    *to.gen = *from.gen;
    *to.at = *from.at;
    *to.ifindex = *from.ifindex;
}

/// Whether a backend's kept next hop (`BACKEND_HOPS`) serves this packet:
/// kept for this backend address, by this program type, and usable
/// ([`Nh::usable`]).
#[inline(always)]
pub fn hop_serves<C: Packet>(
    hop: &mut BackendHop,
    peer: u32,
    f: &Frame,
    now: u64,
    fresh: Fresh,
) -> bool {
    hop.peer == peer && u32::from(hop.by) == C::KIND && Nh::backend(hop).usable(f, now, fresh)
}

/// Records what a backend's kept next hop (`BACKEND_HOPS`) is now for:
/// the backend and the VIP, with the rewrite's checksum deltas, which are
/// the same for every packet from `vip:vport` to `peer:peer_port` (IPv4,
/// wire order), and the program type that looked it up. The next hop
/// itself depends on the backend alone.
#[inline(always)]
pub fn keep_for<C: Packet>(hop: &mut BackendHop, vip: u32, vport: u16, peer: u32, peer_port: u16) {
    hop.by = C::KIND as u16;
    let addr = Delta::ZERO.add32(vip, peer);
    hop.ip_delta = addr.ttl_decrement().folded();
    hop.l4_delta = addr.add16(vport, peer_port).folded();
    hop.peer = peer;
    hop.peer_port = peer_port;
    hop.vip = vip;
    hop.vport = vport;
}

/// Sends a new IPv4 flow of a table service (`e` its record, rewritten
/// already) by its backend's kept next hop when that one is this
/// backend's and serves this packet ([`Nh::usable`]), the record taking a
/// copy: no `bpf_fib_lookup` per new flow, as a stateless service's
/// packets have none. Else [`send`] looks it up for the record (deferring
/// a too-long packet, as for any new flow) and the backend's hop keeps
/// it. Only while the host's routing rules select by destination alone
/// (`Settings::backend_hops`): then the next hop towards a backend is the
/// same for every client.
#[inline(always)]
pub fn send_new_by_backend<C: Packet>(
    ctx: &C,
    f: &Frame,
    e: &mut FlowEntry,
    stat: u32,
    now: u64,
    fresh: Fresh,
) -> u32 {
    let Some(hop) = BACKEND_HOPS.get_ptr_mut(stat) else {
        return send(ctx, f, Nh::forward(e), now, fresh, None, true);
    };
    // SAFETY: this CPU's slot; runs of the program are not nested on one
    // CPU.
    let hop = unsafe { &mut *hop };
    let peer = e.peer;
    // The slot is the backend position's: after a reload it may be
    // another address's.
    if hop_serves::<C>(hop, peer, f, now, fresh) {
        copy_nh(&Nh::backend(hop), &mut Nh::forward(e));
        return transmit(ctx, f, hop.ifindex, &hop.dmac, &hop.smac, None);
    }
    let action = send(ctx, f, Nh::forward(e), now, fresh, None, true);
    if e.nh_ifindex != 0 {
        let port = e.peer_port;
        copy_nh(&Nh::forward(e), &mut Nh::backend(hop));
        keep_for::<C>(hop, f.dst[0], f.dport, peer, port);
    }
    action
}

/// Where a rewritten frame goes next: the egress interface and both MACs,
/// as `bpf_fib_lookup` answered them.
#[repr(C)]
pub struct Hop {
    pub ifindex: u32,
    /// At offset 4: 4-byte aligned (see `transmit`).
    pub dmac: [u8; 6],
    /// At offset 10: 2 mod 4.
    pub smac: [u8; 6],
}

/// Looks up the route and neighbour of the frame's (rewritten) destination.
/// An error (counted) when the frame cannot be sent by the program now:
/// `Some(egress)` when the route leaves through an interface the context
/// may send to but the neighbour entry is missing (the context's
/// `unresolved`: the stack resolves ARP and forwards, ip_forward is on),
/// `None` when it should go to the stack (no route, the MTU, or an egress
/// interface the context cannot send to).
#[inline(always)]
pub fn resolve<C: Packet>(ctx: &C, f: &Frame) -> Result<Hop, Option<u32>> {
    resolve_as(ctx, f, false)
}

/// [`resolve`]; with `defer`, a packet too long for its next hop is left
/// for the caller to hand to the too-big program ([`too_big_after`]) once
/// it has done what must be done first (a new flow recorded).
#[inline(always)]
pub fn resolve_as<C: Packet>(ctx: &C, f: &Frame, defer: bool) -> Result<Hop, Option<u32>> {
    // Zeroed with sixteen explicit stores: `mem::zeroed()` of 64 bytes becomes a
    // call to a byte-at-a-time memset on this target (~60 ns per packet).
    let mut raw = core::mem::MaybeUninit::<FibParams>::uninit();
    // IPv6: this CPU's scratch slot (the IPv6 program's stack is near the
    // verifier's limit); IPv4: the stack (`raw` is unused, and so never
    // allocated, in the IPv6 program, and the other way round).
    let w = if f.v6() {
        match FIB6.get_ptr_mut(0) {
            Some(p) => p.cast::<u32>(),
            None => return Err(None),
        }
    } else {
        // 4-byte stores: the struct is only 4-byte aligned, and the
        // verifier refuses misaligned 8-byte stack stores.
        raw.as_mut_ptr().cast::<u32>()
    };
    // SAFETY: FibParams is 64 bytes of plain integers; every byte is written
    // (volatile, so the stores are not merged back into a memset call), and
    // zero is a valid value for all of them.
    // Used in place (moving it out would copy, and the copy is a memset again).
    let p: &mut FibParams = unsafe {
        for i in 0..16 {
            core::ptr::write_volatile(w.add(i), 0);
        }
        &mut *w.cast::<FibParams>()
    };
    p.l4_protocol = f.proto;
    p.__bindgen_anon_1.tot_len = f.tot_len;
    // The destination, for the rare-event logs.
    let dst: Addr = if f.v6() {
        let (vcf, src, dst) = ctx.ip6_fields(f).ok_or(None)?;
        p.family = AF_INET6;
        // The traffic class and flow label, as the kernel's own lookup
        // takes them (the version bits masked off).
        p.__bindgen_anon_2.flowinfo = vcf & u32::from_be(0x0fff_ffff);
        p.__bindgen_anon_3.ipv6_src = src;
        p.__bindgen_anon_4.ipv6_dst = dst;
        dst
    } else {
        let (tos, src, dst) = ctx.ip_fields(f).ok_or(None)?;
        p.family = AF_INET;
        p.__bindgen_anon_2.tos = tos;
        p.__bindgen_anon_3.ipv4_src = src;
        p.__bindgen_anon_4.ipv4_dst = dst;
        [dst, 0, 0, 0]
    };
    let ingress = ctx.ingress();
    p.ifindex = ingress;
    count(global::FIB_LOOKUPS);
    // SAFETY: helper call with a valid context and a params struct of the right size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let egress = p.ifindex;
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
            // Longer than the next hop's MTU. An IPv4 packet without DF
            // passes, rewritten: the stack fragments and forwards it (the
            // path goes on, recording its flow). Any other goes to the
            // too-big program, which answers its sender (`icmp::too_big`;
            // the rest of this packet's path — a flow's record or next
            // hop, a cache slot — is not needed for a packet that does not
            // leave); if that program is not there, it passes too.
            // SAFETY: the helper wrote the MTU over `tot_len`.
            let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            count(global::FIB_OTHER);
            if ctx.may_fragment(f) {
                return Err(None);
            }
            if let Some(t) = TOO_BIG.get_ptr_mut(0) {
                // SAFETY: this CPU's slot.
                unsafe { *t = u32::from(mtu) };
                if !defer {
                    ctx.tail_call(tail::TOO_BIG);
                }
            }
            return Err(None);
        }
        if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            // The kernel resolves the neighbour: routine, not logged. An
            // egress the context cannot send to: the stack's, unlogged too.
            count(global::FIB_NO_NEIGH);
            let ours = egress == ingress || ctx.may_send_to(egress);
            return Err(ours.then_some(egress));
        }
        {
            count(global::FIB_OTHER);
            events::note(global::FIB_OTHER, &dst, f.v6(), rc as u32, 0);
        }
        return Err(None);
    }
    if !sendable(ctx, ingress, egress, &dst, f.v6()) {
        return Err(None);
    }
    Ok(Hop {
        ifindex: egress,
        dmac: p.dmac,
        smac: p.smac,
    })
}

/// Whether the program may send a frame out of `egress` (the ingress
/// interface, or one the context may send to); counted and logged (rarely)
/// when not.
#[inline(always)]
fn sendable<C: Packet>(ctx: &C, ingress: u32, egress: u32, dst: &Addr, v6: bool) -> bool {
    if egress == ingress || ctx.may_send_to(egress) {
        return true;
    }
    count(global::EGRESS_UNKNOWN);
    events::note(global::EGRESS_UNKNOWN, dst, v6, egress, 0);
    false
}

/// Sends a rewritten frame to a resolved next hop: decrements the TTL, writes
/// the MACs and transmits (XDP_TX back out of the ingress interface, else a
/// DevMap redirect; TC: `bpf_redirect`); counts TX or REDIRECT, and `also`.
/// The caller checked TTL > 1.
#[inline(always)]
pub fn transmit<C: Packet>(
    ctx: &C,
    f: &Frame,
    egress: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    also: Option<u32>,
) -> u32 {
    if ctx.decrement_ttl(f).is_none() {
        return C::PASS;
    }
    transmit_l2(ctx, egress, dmac, smac, also)
}

/// Writes the MACs of a resolved next hop and transmits; counts TX or
/// REDIRECT, and `also` with the same counter lookup.
#[inline(always)]
pub fn transmit_l2<C: Packet>(
    ctx: &C,
    egress: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    also: Option<u32>,
) -> u32 {
    if ctx.write_macs(dmac, smac).is_none() {
        return C::PASS;
    }
    let what = if egress == ctx.ingress() {
        global::TX
    } else {
        global::REDIRECT
    };
    match also {
        Some(a) => count2(what, a),
        None => count(what),
    }
    ctx.send_to(egress)
}

/// After a deferred [`resolve_as`] passed the packet: if it was too long for
/// its next hop (this CPU's `TOO_BIG` slot is set; the too-big program
/// clears it), hand it to the too-big program now. A slot left set by a
/// tail call that failed (the program not loaded) fails again here.
#[inline(always)]
pub fn too_big_after<C: Packet>(ctx: &C) {
    if let Some(t) = TOO_BIG.get_ptr(0) {
        // SAFETY: this CPU's slot.
        if unsafe { *t } != 0 {
            ctx.tail_call(tail::TOO_BIG);
        }
    }
}
