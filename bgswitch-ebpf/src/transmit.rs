//! Forwarding a rewritten frame: the next hop kept in a flow record (or a
//! backend's, for stateless services) while it is current, else
//! `bpf_fib_lookup`; then the TTL, the MACs, and XDP_TX or a DevMap
//! redirect. A frame with no usable next hop goes to the stack.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
    EbpfContext,
};
use bgswitch_common::{csum::Delta, global, BackendHop, FlowEntry};
use network_types::eth::EthHdr;

use aya_log_ebpf::warn;

use crate::{
    events,
    maps::{count, count2, TX_PORTS},
    parse::{ptr_at, Frame},
};

const AF_INET: u8 = 2;
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
#[inline(always)]
pub fn send(ctx: &XdpContext, f: &Frame, nh: Nh, now: u64, fresh: Fresh, also: Option<u32>) -> u32 {
    if nh.usable(f, now, fresh) {
        return transmit(ctx, f, *nh.ifindex, nh.dmac, nh.smac, also);
    }
    let Some(hop) = resolve(ctx, f) else {
        *nh.ifindex = 0;
        if let Some(a) = also {
            count(a);
        }
        return xdp_action::XDP_PASS;
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
/// `None` (counted) when the frame should go to the stack instead: no
/// neighbour entry yet (the stack resolves ARP and forwards, ip_forward is
/// on), no route, the MTU, or an egress interface bgswitch is not attached to.
#[inline(always)]
pub fn resolve(ctx: &XdpContext, f: &Frame) -> Option<Hop> {
    let ip = f.ip;
    // Zeroed with sixteen explicit stores: `mem::zeroed()` of 64 bytes becomes a
    // call to a byte-at-a-time memset on this target (~60 ns per packet).
    let mut raw = core::mem::MaybeUninit::<FibParams>::uninit();
    // 4-byte stores: the struct is only 4-byte aligned, and the verifier
    // refuses misaligned 8-byte stack stores.
    let w = raw.as_mut_ptr().cast::<u32>();
    // SAFETY: FibParams is 64 bytes of plain integers; every byte is written
    // (volatile, so the stores are not merged back into a memset call), and
    // zero is a valid value for all of them.
    // Used in place (moving it out would copy, and the copy is a memset again).
    let p: &mut FibParams = unsafe {
        for i in 0..16 {
            core::ptr::write_volatile(w.add(i), 0);
        }
        &mut *raw.as_mut_ptr()
    };
    p.family = AF_INET;
    p.l4_protocol = f.proto;
    // SAFETY: f.ip is bounds-checked (parse); reading fields of the header.
    unsafe {
        p.__bindgen_anon_1.tot_len = f.tot_len;
        p.__bindgen_anon_2.tos = (*ip).tos;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
    }
    let ingress = ctx.ingress_ifindex() as u32;
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
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            // The stack resolves the neighbour: routine, not logged.
            count(global::FIB_NO_NEIGH);
        } else {
            count(global::FIB_OTHER);
            if events::gate(global::FIB_OTHER) {
                // SAFETY: bounds-checked by parse(); the rewritten address.
                let dst = unsafe { (*ip).dst_addr };
                warn!(
                    ctx,
                    "data plane: no usable route towards {:i} (bpf_fib_lookup: {}; no route, unreachable, forwarding off, or over the MTU): rewritten frames go to the kernel stack (counter fib_other)",
                    dst,
                    rc
                );
            }
        }
        return None;
    }
    let egress = p.ifindex;
    if egress != ingress && TX_PORTS.get_ifindex(egress).is_none() {
        count(global::EGRESS_UNKNOWN);
        if events::gate(global::EGRESS_UNKNOWN) {
            // SAFETY: as above.
            let dst = unsafe { (*ip).dst_addr };
            warn!(
                ctx,
                "data plane: the route towards {:i} leaves through ifindex {}, which bgswitch is not attached to: rewritten frames go to the kernel stack (counter egress_unknown); add that interface to `interfaces`",
                dst,
                egress
            );
        }
        return None;
    }
    Some(Hop {
        ifindex: egress,
        dmac: p.dmac,
        smac: p.smac,
    })
}

/// Sends a rewritten frame to a resolved next hop: decrements the TTL, writes
/// the MACs and transmits (XDP_TX back out of the ingress interface, else a
/// DevMap redirect); counts TX or REDIRECT, and `also`. The caller checked
/// TTL > 1.
#[inline(always)]
pub fn transmit(
    ctx: &XdpContext,
    f: &Frame,
    egress: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    also: Option<u32>,
) -> u32 {
    let ip = f.ip;
    // SAFETY: ip is bounds-checked; ttl > 1 was checked by the caller.
    unsafe {
        let ttl_word = ((*ip).ttl, (*ip).proto);
        let old = u16::from_ne_bytes([ttl_word.0, ttl_word.1]);
        let new = u16::from_ne_bytes([ttl_word.0 - 1, ttl_word.1]);
        (*ip).ttl = ttl_word.0 - 1;
        let check = Delta::ZERO
            .add16(old, new)
            .apply(u16::from_ne_bytes((*ip).check));
        (*ip).check = check.to_ne_bytes();
    }
    transmit_l2(ctx, egress, dmac, smac, also)
}

/// Writes the MACs of a resolved next hop and transmits; counts TX or
/// REDIRECT, and `also` with the same counter lookup.
#[inline(always)]
pub fn transmit_l2(
    ctx: &XdpContext,
    egress: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    also: Option<u32>,
) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: eth is bounds-checked.
    unsafe {
        // Four loads and four stores (an array assignment becomes a memmove
        // call here). Every `dmac` starts 4-byte aligned and every `smac` at
        // 2 mod 4 (FlowEntry, CachedFlow and Hop are laid out so), like the
        // destination and source MACs of the frame (XDP data is aligned).
        let d0 = core::ptr::read_volatile(dmac.as_ptr().cast::<u32>());
        let d1 = core::ptr::read_volatile(dmac.as_ptr().add(4).cast::<u16>());
        let s0 = core::ptr::read_volatile(smac.as_ptr().cast::<u16>());
        let s1 = core::ptr::read_volatile(smac.as_ptr().add(2).cast::<u32>());
        let mac = eth.cast::<u8>();
        core::ptr::write_volatile(mac.cast::<u32>(), d0);
        core::ptr::write_volatile(mac.add(4).cast::<u16>(), d1);
        core::ptr::write_volatile(mac.add(6).cast::<u16>(), s0);
        core::ptr::write_volatile(mac.add(8).cast::<u32>(), s1);
    }
    let tx = egress == ctx.ingress_ifindex() as u32;
    let what = if tx { global::TX } else { global::REDIRECT };
    match also {
        Some(a) => count2(what, a),
        None => count(what),
    }
    if tx {
        return xdp_action::XDP_TX;
    }
    TX_PORTS
        .redirect(egress, xdp_action::XDP_PASS as u64)
        .unwrap_or(xdp_action::XDP_PASS)
}
