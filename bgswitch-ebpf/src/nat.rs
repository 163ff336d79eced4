//! Rewriting a parsed frame: the destination towards a backend, or the source
//! of a reply back to the virtual address, with incremental checksums; and the
//! forwarding step (FIB lookup, MACs, TTL, XDP_TX or redirect).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
    EbpfContext,
};
use bgswitch_common::{csum::Delta, global, Addr, PROTO_TCP};
use network_types::eth::EthHdr;

use aya_log_ebpf::warn;

use crate::{
    events,
    maps::{count, count2, TX_PORTS},
    parse::{ptr_at, Frame},
};

const AF_INET: u8 = 2;
const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
/// Offset of the checksum in the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// Which address and port of the frame a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination (client → backend).
    Dst,
    /// Source (backend reply → client, source becomes the VIP).
    Src,
}

/// Replaces the source or destination address and port, updating the IPv4 and
/// L4 checksums incrementally. Returns `None` only if a header vanished, which
/// parse() already ruled out.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, f: &Frame, side: Side, addr: &Addr, port: u16) -> Option<()> {
    let ip = f.ip;
    let (old_addr, old_port) = match side {
        Side::Dst => (f.dst, f.dport),
        Side::Src => (f.src, f.sport),
    };
    let addr_delta = Delta::ZERO.add32(old_addr[0], addr[0]);
    // SAFETY: f.ip was bounds-checked by parse(); the packet has not been resized.
    unsafe {
        let new = addr[0].to_ne_bytes();
        match side {
            Side::Dst => (*ip).dst_addr = new,
            Side::Src => (*ip).src_addr = new,
        }
        let check = addr_delta.apply(u16::from_ne_bytes((*ip).check));
        (*ip).check = check.to_ne_bytes();
    }
    rewrite_l4(ctx, f, side, port, addr_delta.add16(old_port, port))
}

/// The port of `side` and the checksum of the frame's TCP or UDP header,
/// with one bounds check (a TCP header's first 18 bytes hold both ports and
/// the checksum, a UDP header's 8), and whether it is TCP.
#[inline(always)]
fn l4_fields(ctx: &XdpContext, f: &Frame, side: Side) -> Option<(*mut u16, *mut u16, bool)> {
    let port_off = match side {
        Side::Src => 0,
        Side::Dst => 2,
    };
    let tcp = f.proto == PROTO_TCP;
    let h: *mut u8 = if tcp {
        ptr_at::<[u8; TCP_CHECK + 2]>(ctx, f.l4)?.cast()
    } else {
        ptr_at::<[u8; UDP_CHECK + 2]>(ctx, f.l4)?.cast()
    };
    let check_off = if tcp { TCP_CHECK } else { UDP_CHECK };
    // SAFETY: both offsets lie inside the bounds-checked header (2-byte
    // aligned fields; packet pointers allow such stores on the 64-bit JITs).
    Some(unsafe { (h.add(port_off).cast(), h.add(check_off).cast(), tcp) })
}

/// Writes the port of `side` and applies `delta` (address through the
/// pseudo-header, and port) to the TCP or UDP checksum; a UDP checksum of 0
/// stays 0.
#[inline(always)]
fn rewrite_l4(ctx: &XdpContext, f: &Frame, side: Side, port: u16, delta: Delta) -> Option<()> {
    let (port_ptr, check, tcp) = l4_fields(ctx, f, side)?;
    // SAFETY: bounds-checked by l4_fields.
    unsafe {
        *port_ptr = port;
        *check = if tcp {
            delta.apply(*check)
        } else {
            delta.apply_udp(*check)
        };
    }
    Some(())
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

/// The cached path's rewrite: the address and port of `side`, the TTL, and
/// both checksums from the flow's precomputed deltas (see
/// `bgswitch_common::CachedFlow`). The caller checked TTL > 1.
#[inline(always)]
pub fn rewrite_cached(
    ctx: &XdpContext,
    f: &Frame,
    side: Side,
    addr: u32,
    port: u16,
    ip_delta: u16,
    l4_delta: u16,
) -> Option<()> {
    let ip = f.ip.cast::<u8>();
    // SAFETY: f.ip was bounds-checked by parse(); ttl > 1 (caller). Whole-
    // word stores (the header's byte arrays would be written byte by byte).
    unsafe {
        let addr_off = match side {
            Side::Dst => 16,
            Side::Src => 12,
        };
        core::ptr::write_volatile(ip.add(addr_off).cast::<u32>(), addr);
        *ip.add(8) -= 1;
        let check = ip.add(10).cast::<u16>();
        let c = Delta::apply_folded(ip_delta, core::ptr::read_volatile(check));
        core::ptr::write_volatile(check, c);
    }
    let (port_ptr, check, tcp) = l4_fields(ctx, f, side)?;
    // SAFETY: bounds-checked by l4_fields.
    unsafe {
        *port_ptr = port;
        *check = if tcp {
            Delta::apply_folded(l4_delta, *check)
        } else {
            Delta::from_folded(l4_delta).apply_udp(*check)
        };
    }
    Some(())
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
