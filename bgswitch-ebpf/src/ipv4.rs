//! The IPv4 header's rewrites, the same in both contexts: its checksum is
//! never offloaded, so it is always complete and is updated in place (RFC
//! 1624). A rewrite that keeps it right leaves the header's one's-complement
//! sum as it was — and with it a socket buffer's CHECKSUM_COMPLETE sum,
//! which is why the TC context needs no helper for this header either.

use bgswitch_common::csum::Delta;
use network_types::ip::Ipv4Hdr;

use crate::{context::Side, frame::Frame};

/// Replaces the address of `side` and updates the header checksum; returns
/// the address change, for the L4 pseudo-header.
///
/// SAFETY: `ip` points to the frame's bounds-checked IPv4 header (`f.ip`
/// while no helper that may move the packet data ran since parse, else
/// taken afresh).
#[inline(always)]
pub unsafe fn rewrite_addr(ip: *mut Ipv4Hdr, f: &Frame, side: Side, addr: u32) -> Delta {
    let old = match side {
        Side::Dst => f.dst[0],
        Side::Src => f.src[0],
    };
    let delta = Delta::ZERO.add32(old, addr);
    let new = addr.to_ne_bytes();
    match side {
        Side::Dst => (*ip).dst_addr = new,
        Side::Src => (*ip).src_addr = new,
    }
    (*ip).check = delta.apply(u16::from_ne_bytes((*ip).check)).to_ne_bytes();
    delta
}

/// The cached path's header rewrite: the address of `side` and the TTL, with
/// the flow's precomputed checksum delta for both (one load and one store
/// of the checksum). The caller checked TTL > 1.
///
/// SAFETY: as for [`rewrite_addr`].
#[inline(always)]
pub unsafe fn rewrite_cached(ip: *mut Ipv4Hdr, side: Side, addr: u32, ip_delta: u16) {
    let ip = ip.cast::<u8>();
    let addr_off = match side {
        Side::Dst => 16,
        Side::Src => 12,
    };
    // Whole-word stores (the header's byte arrays would be written byte by
    // byte).
    core::ptr::write_volatile(ip.add(addr_off).cast::<u32>(), addr);
    *ip.add(8) -= 1;
    let check = ip.add(10).cast::<u16>();
    let c = Delta::apply_folded(ip_delta, core::ptr::read_volatile(check));
    core::ptr::write_volatile(check, c);
}

/// Whether the packet may be fragmented on its way (DF clear).
///
/// SAFETY: as for [`rewrite_addr`].
#[inline(always)]
pub unsafe fn may_fragment(ip: *const Ipv4Hdr) -> bool {
    let frag = core::ptr::read_volatile(ip.cast::<u8>().add(6).cast::<u16>());
    u16::from_be(frag) & 0x4000 == 0
}

/// Decrements the TTL and updates the checksum. The caller checked TTL > 1.
///
/// SAFETY: as for [`rewrite_addr`].
#[inline(always)]
pub unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    let (ttl, proto) = ((*ip).ttl, (*ip).proto);
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    (*ip).ttl = ttl - 1;
    (*ip).check = Delta::ZERO
        .add16(old, new)
        .apply(u16::from_ne_bytes((*ip).check))
        .to_ne_bytes();
}
