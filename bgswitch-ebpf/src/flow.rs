//! Flow keys and the TCP state a flow record keeps (FIN each way, RST).

use bgswitch_common::{flow_flags, Addr, FlowKey, FlowKey4};

use crate::frame::{Frame, TCP_FIN, TCP_RST};

/// Copies an address word by word: a plain `*dst = *src` into map memory
/// became a call to the byte-at-a-time `memmove` (or, for a constant,
/// `memset`) subprogram on this target (found with `llvm-objdump -dr -l`).
#[inline(always)]
pub fn set_addr(dst: &mut Addr, src: &Addr) {
    for i in 0..4 {
        // SAFETY: in-bounds aligned 32-bit stores (volatile, so they are
        // not merged back into a call).
        unsafe { core::ptr::write_volatile(&mut dst[i], src[i]) };
    }
}

/// The `FLOWS` key of a 5-tuple (IPv4: the first address word).
#[inline(always)]
pub fn key4(k: &FlowKey) -> FlowKey4 {
    FlowKey4::of(k)
}

#[inline(always)]
pub fn flow_key(f: &Frame) -> FlowKey {
    FlowKey {
        src: f.src,
        dst: f.dst,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        family: f.family,
        _pad: [0; 2],
    }
}

/// Field-wise key equality (the padding is not compared).
#[inline(always)]
pub fn same_key(a: &FlowKey4, b: &FlowKey4) -> bool {
    a.src == b.src
        && a.dst == b.dst
        && a.sport == b.sport
        && a.dport == b.dport
        && a.proto == b.proto
}

/// FIN/RST bits of a packet, as flow flags for the given direction.
#[inline(always)]
pub fn close_flags(tcp_flags: u8, fin: u8) -> u8 {
    let mut out = 0;
    if tcp_flags & TCP_FIN != 0 {
        out |= fin;
    }
    if tcp_flags & TCP_RST != 0 {
        out |= flow_flags::RST;
    }
    out
}

#[inline(always)]
pub fn closed(flags: u8) -> bool {
    flags & flow_flags::RST != 0
        || flags & (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
            == (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
}
