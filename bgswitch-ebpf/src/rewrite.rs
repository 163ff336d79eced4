//! Rewriting a parsed frame: the destination towards a backend, or the
//! source of a reply back to the virtual address, with incremental IPv4
//! and L4 checksums (RFC 1624; a UDP checksum of 0 stays 0). The cached
//! path applies a flow's precomputed deltas.

use aya_ebpf::programs::XdpContext;
use bgswitch_common::{csum::Delta, Addr, PROTO_TCP};

use crate::parse::{ptr_at, Frame};

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
