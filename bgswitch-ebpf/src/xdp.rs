//! The XDP context: frames as the driver hands them over, whose checksums
//! are complete (a physical NIC's) — rewritten in place with RFC 1624
//! incremental updates of the IPv4 and the L4 (pseudo-header) checksums (a
//! UDP checksum of 0 stays 0; IPv6 has no header checksum) — and sent with
//! XDP_TX or a DevMap redirect.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use bgswitch_common::{csum::Delta, Addr, PROTO_TCP};
use network_types::ip::Ipv4Hdr;

use crate::{
    context::{ptr_at, Packet, Side, TCP_CHECK, UDP_CHECK},
    frame::Frame,
    ipv4, ipv6,
    maps::{TAIL_XDP, TX_PORTS},
};

impl Packet for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const KIND: u32 = bgswitch_common::attach::XDP;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        false
    }

    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn ip_fields(&self, f: &Frame) -> Option<(u8, u32, u32)> {
        let ip = f.ip.cast::<Ipv4Hdr>();
        // SAFETY: f.ip is bounds-checked (parse); nothing moved the data.
        Some(unsafe {
            (
                (*ip).tos,
                u32::from_ne_bytes((*ip).src_addr),
                u32::from_ne_bytes((*ip).dst_addr),
            )
        })
    }

    #[inline(always)]
    fn may_fragment(&self, f: &Frame) -> bool {
        // SAFETY: f.ip is the bounds-checked IPv4 header of an IPv4 frame.
        !f.v6() && unsafe { ipv4::may_fragment(f.ip.cast()) }
    }

    #[inline(always)]
    fn ip6_fields(&self, f: &Frame) -> Option<(u32, Addr, Addr)> {
        // SAFETY: f.ip is a bounds-checked IPv6 header (parse); nothing
        // moved the data.
        Some(unsafe { ipv6::fields(f.ip) })
    }

    /// Replaces the source or destination address and port, updating the
    /// IPv4 and L4 checksums incrementally.
    #[inline(always)]
    fn rewrite(&self, f: &Frame, side: Side, addr: &Addr, port: u16) -> Option<()> {
        let old_port = match side {
            Side::Dst => f.dport,
            Side::Src => f.sport,
        };
        // SAFETY: f.ip was bounds-checked by parse() for its family; the
        // packet has not been resized.
        let addr_delta = unsafe {
            if f.v6() {
                ipv6::rewrite_addr(f.ip, f, side, addr)
            } else {
                ipv4::rewrite_addr(f.ip.cast(), f, side, addr[0])
            }
        };
        rewrite_l4(self, f, side, port, addr_delta.add16(old_port, port))
    }

    #[inline(always)]
    fn rewrite_cached(
        &self,
        f: &Frame,
        side: Side,
        addr: u32,
        port: u16,
        ip_delta: u16,
        l4_delta: u16,
    ) -> Option<()> {
        // SAFETY: as above; ttl > 1 (caller).
        unsafe { ipv4::rewrite_cached(f.ip.cast(), side, addr, ip_delta) };
        rewrite_l4_cached(self, f, side, port, l4_delta)
    }

    #[inline(always)]
    fn rewrite_cached6(
        &self,
        f: &Frame,
        side: Side,
        addr: &Addr,
        port: u16,
        l4_delta: u16,
    ) -> Option<()> {
        // SAFETY: as above (an IPv6 frame: the cache6 path).
        unsafe { ipv6::write_addr(f.ip, side, addr) };
        rewrite_l4_cached(self, f, side, port, l4_delta)
    }

    #[inline(always)]
    fn decrement_ttl(&self, f: &Frame) -> Option<()> {
        // SAFETY: as above; ttl > 1 (caller).
        unsafe {
            if f.v6() {
                ipv6::decrement_hop_limit(f.ip)
            } else {
                ipv4::decrement_ttl(f.ip.cast())
            }
        };
        Some(())
    }

    #[inline(always)]
    fn room_for_error(&self, front: u32, total: u32) -> Option<bool> {
        // SAFETY: the context's own frame; negative: more headroom used.
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(front as i32)) } != 0 {
            return None;
        }
        // The length from the helper: one computed from the packet pointers
        // would be folded into arithmetic on `data_end`, which the verifier
        // refuses.
        // SAFETY: the context's own frame.
        let len = unsafe { bpf_xdp_get_buff_len(self.ctx) } as i32;
        // SAFETY: as above; the frame only gets shorter.
        Some(unsafe { bpf_xdp_adjust_tail(self.ctx, total as i32 - len) } == 0)
    }

    #[inline(always)]
    fn tail_call(&self, index: u32) {
        // SAFETY: the context is this program's own.
        unsafe { TAIL_XDP.tail_call(self, index) };
    }

    /// An interface bgswitch serves with XDP (`TX_PORTS`): a DevMap redirect
    /// into a device another way (a veth whose peer has neither XDP nor
    /// GRO, say) could be dropped silently.
    #[inline(always)]
    fn may_send_to(&self, egress: u32) -> bool {
        TX_PORTS.get_ifindex(egress).is_some()
    }

    #[inline(always)]
    fn send_to(&self, egress: u32) -> u32 {
        if egress == self.ingress() {
            return xdp_action::XDP_TX;
        }
        TX_PORTS
            .redirect(egress, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS)
    }

    #[inline(always)]
    fn unresolved(&self, _f: &Frame, _egress: u32) -> u32 {
        xdp_action::XDP_PASS
    }
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
        ptr_at::<_, [u8; TCP_CHECK + 2]>(ctx, f.l4)?.cast()
    } else {
        ptr_at::<_, [u8; UDP_CHECK + 2]>(ctx, f.l4)?.cast()
    };
    let check_off = if tcp { TCP_CHECK } else { UDP_CHECK };
    // SAFETY: both offsets lie inside the bounds-checked header (2-byte
    // aligned fields; packet pointers allow such stores on the 64-bit JITs).
    Some(unsafe { (h.add(port_off).cast(), h.add(check_off).cast(), tcp) })
}

/// Writes the port of `side` and applies a cached path's folded `delta`
/// (address through the pseudo-header, and port) to the TCP or UDP
/// checksum; a UDP checksum of 0 stays 0.
#[inline(always)]
fn rewrite_l4_cached(ctx: &XdpContext, f: &Frame, side: Side, port: u16, delta: u16) -> Option<()> {
    let (port_ptr, check, tcp) = l4_fields(ctx, f, side)?;
    // SAFETY: bounds-checked by l4_fields.
    unsafe {
        *port_ptr = port;
        *check = if tcp {
            Delta::apply_folded(delta, *check)
        } else {
            Delta::from_folded(delta).apply_udp(*check)
        };
    }
    Some(())
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
