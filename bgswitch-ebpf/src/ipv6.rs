//! The IPv6 header's rewrites, the same in both contexts. The header has no
//! checksum: an address change reaches only the TCP/UDP checksum (through
//! the pseudo-header), and the hop limit none.

use bgswitch_common::{csum::Delta, Addr};

use crate::{context::Side, frame::Frame};

/// Offsets of the source and destination addresses in the header.
const SRC: usize = 8;
const DST: usize = 24;

/// Replaces the address of `side` (four whole-word stores); returns the
/// address change, for the L4 pseudo-header.
///
/// SAFETY: `ip` points to the frame's bounds-checked 40-byte IPv6 header
/// (`f.ip` while no helper that may move the packet data ran since parse,
/// else taken afresh).
#[inline(always)]
pub unsafe fn rewrite_addr(ip: *mut u8, f: &Frame, side: Side, addr: &Addr) -> Delta {
    let old = match side {
        Side::Dst => &f.dst,
        Side::Src => &f.src,
    };
    write_addr(ip, side, addr);
    Delta::ZERO.add_addr(old, addr, 4)
}

/// Replaces the address of `side` (four whole-word stores), for a caller
/// that knows the checksum change already (the cached path).
///
/// SAFETY: as for [`rewrite_addr`].
#[inline(always)]
pub unsafe fn write_addr(ip: *mut u8, side: Side, addr: &Addr) {
    let off = match side {
        Side::Dst => DST,
        Side::Src => SRC,
    };
    let w = ip.add(off).cast::<u32>();
    for (i, a) in addr.iter().enumerate() {
        core::ptr::write_volatile(w.add(i), *a);
    }
}

/// Decrements the hop limit. The caller checked it is > 1.
///
/// SAFETY: as for [`rewrite_addr`].
#[inline(always)]
pub unsafe fn decrement_hop_limit(ip: *mut u8) {
    *ip.add(7) -= 1;
}

/// The IPv6 header's first word (version, traffic class, flow label), source
/// and destination, as they lie in memory.
///
/// SAFETY: as for [`rewrite_addr`].
#[inline(always)]
pub unsafe fn fields(ip: *const u8) -> (u32, Addr, Addr) {
    let w = ip.cast::<u32>();
    let r = |i: usize| core::ptr::read_volatile(w.add(i));
    (r(0), [r(2), r(3), r(4), r(5)], [r(6), r(7), r(8), r(9)])
}
