//! Half-open TCP flows: a new connection's record waits in `HALF_OPEN`
//! (`HALF_OPEN6`) until the client shows it is really there, and only then
//! moves to the flow table, so a flood of SYNs from spoofed sources can
//! evict only other half-open records, never an established connection's
//! (which may be draining on the old colour).
//!
//! What completes a record:
//! - after a SYN: the backend's SYN-ACK passed (its initial sequence number
//!   is kept, 16 bits of it) and the client's next packet acknowledges it;
//!   a spoofed source never sees the SYN-ACK, so it would have to guess;
//! - a connection whose record was missing (evicted, or older than the
//!   table): the backend answered with anything but RST (a backend resets
//!   a segment of a connection it does not have) and the client sent again.

use bgswitch_common::{flow_flags, FlowEntry};

use crate::{
    context::{ptr_at, Packet},
    frame::{Frame, TCP_ACK, TCP_RST, TCP_SYN},
};

/// The low 16 bits of the TCP header's 32-bit word at `off` (4: the
/// sequence number, 8: the acknowledgement number), host order; `NONE`
/// if the header is cut short there. (A sentinel, not an `Option`: LLVM
/// fills an absent `Option<u16>`'s payload from whatever register it has,
/// here a pointer, and the verifier refuses the masking that follows.)
#[inline(always)]
fn low16<C: Packet>(ctx: &C, f: &Frame, off: usize) -> u32 {
    let Some(p) = ptr_at::<C, [u8; 2]>(ctx, f.l4 + off + 2) else {
        return NONE;
    };
    let p = p.cast::<u8>();
    // SAFETY: bounds-checked by `ptr_at`; byte loads.
    let (hi, lo) = unsafe {
        (
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
        )
    };
    u32::from(u16::from_be_bytes([hi, lo]))
}

/// `low16`'s answer for a header cut short.
const NONE: u32 = u32::MAX;

/// A backend's packet of a half-open flow: what it says of the connection.
#[inline(always)]
pub fn backend_said<C: Packet>(ctx: &C, f: &Frame, e: &mut FlowEntry) {
    if f.tcp_flags & TCP_RST != 0 {
        return;
    }
    if f.tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        let seq = low16(ctx, f, 4);
        if seq == NONE {
            return;
        }
        e.isn = (seq as u16).wrapping_add(1);
    }
    e.flags |= flow_flags::ANSWERED;
}

/// Whether the client's packet (not a SYN) of a half-open flow completes
/// it (see the module's doc).
#[inline(always)]
pub fn completes<C: Packet>(ctx: &C, f: &Frame, e: &FlowEntry) -> bool {
    if e.flags & flow_flags::ANSWERED == 0 {
        return false;
    }
    if e.flags & flow_flags::ESTABLISHED == 0 {
        // No SYN-ACK passed: a connection whose record was missing, which
        // its backend did not reset.
        return true;
    }
    if f.tcp_flags & TCP_ACK == 0 {
        return false;
    }
    low16(ctx, f, 8) == u32::from(e.isn)
}
