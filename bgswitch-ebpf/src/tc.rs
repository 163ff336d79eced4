//! The TC (clsact ingress) context: socket buffers, as containers, VMs on
//! tap devices and veth pairs hand them over — their TCP/UDP checksum may
//! be partial (CHECKSUM_PARTIAL: the field holds only the pseudo-header
//! sum) and they may stand for many segments (GSO). The L4 checksum goes
//! through the kernel's helper (`bpf_l4_csum_replace`, `BPF_F_PSEUDO_HDR`
//! for addresses), right for every checksum state; the IPv4 header is
//! rewritten in place as in XDP (`ipv4.rs`). Frames leave with
//! `bpf_redirect`, or `bpf_redirect_neigh` while the neighbour is
//! unresolved. Packet pointers are taken afresh after every helper that may
//! move the data.

use aya_ebpf::{
    bindings::{
        BPF_CSUM_LEVEL_RESET, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_csum_level, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use bgswitch_common::{Addr, PROTO_TCP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    context::{ptr_at, Packet, Side, TCP_CHECK, UDP_CHECK},
    frame::{Frame, IP_OFF},
    ipv4, ipv6,
    maps::{ATTACHED, TAIL_TC},
};

/// What the path reads of a frame, at most: Ethernet, IPv6 with the
/// extension headers the parse walks (longer than IPv4 with options), TCP
/// with options. The linear part of a socket buffer is pulled to this
/// length (or the frame's, if shorter) when it holds less.
pub const HEADERS: u32 = (EthHdr::LEN + Ipv6Hdr::LEN + 256 + 60) as u32;

/// The context's socket buffer, as a value LLVM cannot see through: each
/// read of `data` and `data_end` then loads at its offset from the context
/// pointer itself. Otherwise LLVM keeps `ctx + 76` and `ctx + 80` in
/// registers for the whole path, and the verifier refuses a load through a
/// context pointer so moved ("dereference of modified ctx ptr").
#[inline(always)]
fn opaque(ctx: &TcContext) -> *mut aya_ebpf::bindings::__sk_buff {
    core::hint::black_box(ctx.skb.skb)
}

/// Makes the headers readable directly (see [`HEADERS`]). A frame whose
/// data cannot be pulled is parsed as it is (and found short, passed).
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    let want = if ctx.len() < HEADERS {
        ctx.len()
    } else {
        HEADERS
    };
    // Most frames' headers are linear already (a short frame wholly).
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(want);
    }
}

impl Packet for TcContext {
    /// Not this program's: whatever comes next (another tcx program, a
    /// clsact filter, the stack) decides, as if bgswitch were not there.
    const PASS: u32 = TC_ACT_UNSPEC as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const KIND: u32 = bgswitch_common::attach::TC;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context's own socket buffer. Volatile, like the
        // other fields below: every read a load at its offset from the
        // context pointer itself. Plain loads let LLVM keep `ctx + 76` and
        // `ctx + 80` in registers across the path, and the verifier
        // refuses a load through a context pointer so moved.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*opaque(self)).data)) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*opaque(self)).data_end)) as usize }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.skb.skb).gso_size)) }
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.skb.skb).vlan_present)) != 0 }
    }

    #[inline(always)]
    fn ingress(&self) -> u32 {
        // SAFETY: as above (at clsact ingress, the receiving device).
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.skb.skb).ifindex)) }
    }

    #[inline(always)]
    fn ip_fields(&self, _f: &Frame) -> Option<(u8, u32, u32)> {
        let ip = ptr_at::<_, Ipv4Hdr>(self, IP_OFF)?;
        // SAFETY: bounds-checked just now.
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
        if f.v6() {
            return false;
        }
        match ptr_at::<_, Ipv4Hdr>(self, IP_OFF) {
            // SAFETY: bounds-checked just now.
            Some(ip) => unsafe { ipv4::may_fragment(ip) },
            None => false,
        }
    }

    #[inline(always)]
    fn ip6_fields(&self, _f: &Frame) -> Option<(u32, Addr, Addr)> {
        let ip = ptr_at::<_, Ipv6Hdr>(self, IP_OFF)?;
        // SAFETY: bounds-checked just now.
        Some(unsafe { ipv6::fields(ip.cast()) })
    }

    /// The IP header in place (see `ipv4`, `ipv6`), then the L4 checksum
    /// for the address (through the pseudo-header: the helper keeps a
    /// partial checksum partial; one call per 32-bit word) and the port,
    /// then the new port.
    #[inline(always)]
    fn rewrite(&self, f: &Frame, side: Side, addr: &Addr, port: u16) -> Option<()> {
        if f.v6() {
            let ip = ptr_at::<_, Ipv6Hdr>(self, IP_OFF)?;
            // SAFETY: bounds-checked just now.
            unsafe { ipv6::rewrite_addr(ip.cast(), f, side, addr) };
            let old = match side {
                Side::Dst => &f.dst,
                Side::Src => &f.src,
            };
            for i in 1..4 {
                l4_csum_addr(self, f, old[i], addr[i])?;
            }
        } else {
            let ip = ptr_at::<_, Ipv4Hdr>(self, IP_OFF)?;
            // SAFETY: bounds-checked just now.
            unsafe { ipv4::rewrite_addr(ip, f, side, addr[0]) };
        }
        rewrite_l4(self, f, side, addr[0], port)
    }

    /// The IPv4 header with the cached delta (see `ipv4`). The L4 deltas are
    /// for complete checksums; a partial one takes only the pseudo-header's
    /// part, so that checksum goes through the helpers.
    #[inline(always)]
    fn rewrite_cached(
        &self,
        f: &Frame,
        side: Side,
        addr: u32,
        port: u16,
        ip_delta: u16,
        _l4_delta: u16,
    ) -> Option<()> {
        let ip = ptr_at::<_, Ipv4Hdr>(self, IP_OFF)?;
        // SAFETY: bounds-checked just now; ttl > 1 (caller).
        unsafe { ipv4::rewrite_cached(ip, side, addr, ip_delta) };
        rewrite_l4(self, f, side, addr, port)
    }

    #[inline(always)]
    fn decrement_ttl(&self, f: &Frame) -> Option<()> {
        if f.v6() {
            let ip = ptr_at::<_, Ipv6Hdr>(self, IP_OFF)?;
            // SAFETY: bounds-checked just now (the data may have moved
            // since parse); hop limit > 1 (caller).
            unsafe { ipv6::decrement_hop_limit(ip.cast()) };
            return Some(());
        }
        let ip = ptr_at::<_, Ipv4Hdr>(self, IP_OFF)?;
        // SAFETY: bounds-checked just now (the data may have moved since
        // parse); ttl > 1 (caller).
        unsafe { ipv4::decrement_ttl(ip) };
        Some(())
    }

    /// Cut first: `bpf_skb_change_tail` also makes a GSO packet (many
    /// segments, one of which was too long) one plain packet. Then the new
    /// room at the front, and the checksum state reset: a partial
    /// checksum's offsets would point into the quote.
    #[inline(always)]
    fn room_for_error(&self, front: u32, total: u32) -> Option<bool> {
        // SAFETY: the context's own socket buffer; flags 0.
        if unsafe { bpf_skb_change_tail(self.skb.skb, total - front, 0) } != 0 {
            return None;
        }
        // SAFETY: as above.
        let ok = unsafe {
            bpf_skb_change_head(self.skb.skb, front, 0) == 0
                && bpf_csum_level(self.skb.skb, BPF_CSUM_LEVEL_RESET as u64) >= 0
        };
        Some(ok)
    }

    #[inline(always)]
    fn tail_call(&self, index: u32) {
        // SAFETY: the context is this program's own.
        unsafe { TAIL_TC.tail_call(self, index) };
    }

    /// Any interface bgswitch serves (`ATTACHED`), with XDP or TC: a socket
    /// buffer can be sent to either.
    #[inline(always)]
    fn may_send_to(&self, egress: u32) -> bool {
        // SAFETY: only presence is read.
        unsafe { ATTACHED.get(&egress) }.is_some()
    }

    #[inline(always)]
    fn send_to(&self, egress: u32) -> u32 {
        // SAFETY: plain helper call; flags 0 (egress).
        unsafe { bpf_redirect(egress, 0) as u32 }
    }

    #[inline(always)]
    fn unresolved(&self, f: &Frame, egress: u32) -> u32 {
        if self.decrement_ttl(f).is_none() {
            return Self::PASS;
        }
        // SAFETY: no parameters: the kernel looks the neighbour up itself.
        unsafe { bpf_redirect_neigh(egress, core::ptr::null_mut(), 0, 0) as u32 }
    }
}

/// One 32-bit word of an address through the L4 checksum's pseudo-header
/// (IPv6 addresses' words after the first; `rewrite_l4` does the first).
#[inline(always)]
fn l4_csum_addr(ctx: &TcContext, f: &Frame, old: u32, new: u32) -> Option<()> {
    if old == new {
        return Some(());
    }
    let tcp = f.proto == PROTO_TCP;
    let check = f.l4 + if tcp { TCP_CHECK } else { UDP_CHECK };
    let udp_zero = if tcp { 0 } else { BPF_F_MARK_MANGLED_0 as u64 };
    ctx.l4_csum_replace(
        check,
        u64::from(old),
        u64::from(new),
        BPF_F_PSEUDO_HDR as u64 | udp_zero | 4,
    )
    .ok()
}

/// The TCP or UDP half of a rewrite: the checksum for the address
/// (`BPF_F_PSEUDO_HDR`: the kernel updates a partial checksum, a complete one
/// and a CHECKSUM_COMPLETE sum as each needs) and, if it changes, for the
/// port, then the new port, its pointer taken afresh after the helpers.
#[inline(always)]
fn rewrite_l4(ctx: &TcContext, f: &Frame, side: Side, addr: u32, port: u16) -> Option<()> {
    let (old_addr, old_port, port_off) = match side {
        Side::Dst => (f.dst[0], f.dport, f.l4 + 2),
        Side::Src => (f.src[0], f.sport, f.l4),
    };
    let tcp = f.proto == PROTO_TCP;
    let check = f.l4 + if tcp { TCP_CHECK } else { UDP_CHECK };
    // A UDP checksum of 0 (none) stays 0; one that becomes 0 is written as
    // 0xffff.
    let udp_zero = if tcp { 0 } else { BPF_F_MARK_MANGLED_0 as u64 };
    ctx.l4_csum_replace(
        check,
        u64::from(old_addr),
        u64::from(addr),
        BPF_F_PSEUDO_HDR as u64 | udp_zero | 4,
    )
    .ok()?;
    if old_port == port {
        // A backend on the VIP's port (the common case): one helper call.
        return Some(());
    }
    ctx.l4_csum_replace(check, u64::from(old_port), u64::from(port), udp_zero | 2)
        .ok()?;
    let p = ptr_at::<_, u16>(ctx, port_off)?;
    // SAFETY: bounds-checked just now, after the last helper.
    unsafe { core::ptr::write_volatile(p, port) };
    Some(())
}
