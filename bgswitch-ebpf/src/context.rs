//! The seam between the packet's path and the program type it runs in:
//! XDP (`xdp.rs`) on frames as the driver hands them over, TC (`tc.rs`) on
//! socket buffers. The path (parse, flows, choice, what a rewrite changes,
//! next hops) is written once against [`Packet`] and compiled into both
//! programs; what differs — how a checksum is updated, how a frame leaves,
//! the verdicts — is each context's.

use aya_ebpf::EbpfContext;
use bgswitch_common::Addr;

use crate::frame::Frame;

/// Which address and port of the frame a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination (client → backend).
    Dst,
    /// Source (backend reply → client, source becomes the VIP).
    Src,
}

/// Offset of the checksum in the TCP and UDP headers.
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

/// What the packet's path needs of its program type.
pub trait Packet: EbpfContext {
    /// The verdict that hands the frame to the kernel's stack.
    const PASS: u32;
    /// The verdict that drops the frame (one the program could not finish
    /// rewriting: never expected).
    const DROP: u32;
    /// This program type, as `bgswitch_common::attach` says it (kept with
    /// a backend's next hop: `BackendHop::by`).
    const KIND: u32;

    /// The start of the packet data the program may read directly.
    fn data(&self) -> usize;
    /// The end of that data.
    fn data_end(&self) -> usize;
    /// The whole frame's length (a socket buffer's may be longer than what
    /// it holds linearly).
    fn len(&self) -> usize;
    /// The payload size of each segment a GSO packet stands for, 0 for a
    /// packet that is one segment (XDP frames always are).
    fn gso_size(&self) -> u32;
    /// Whether the frame carries a VLAN tag the device took out of it (a
    /// socket buffer's metadata): such a frame is not the path's.
    fn vlan_tagged(&self) -> bool;
    /// The interface the frame came in on.
    fn ingress(&self) -> u32;

    /// The IPv4 header's TOS, source and destination as they are now (after
    /// a rewrite).
    fn ip_fields(&self, f: &Frame) -> Option<(u8, u32, u32)>;
    /// Whether the packet may be fragmented on its way: IPv4 with DF
    /// clear (never IPv6).
    fn may_fragment(&self, f: &Frame) -> bool;
    /// The IPv6 header's first word (version, traffic class, flow label),
    /// source and destination as they are now.
    fn ip6_fields(&self, f: &Frame) -> Option<(u32, Addr, Addr)>;
    /// Replaces the address and port of `side`, keeping the IPv4 (if any)
    /// and L4 checksums right. `None` only if a header vanished, which
    /// parsing ruled out.
    fn rewrite(&self, f: &Frame, side: Side, addr: &Addr, port: u16) -> Option<()>;
    /// The cached path's rewrite: the address and port of `side` and the
    /// TTL, with the flow's precomputed checksum deltas where the context
    /// can use them (see `bgswitch_common::CachedFlow`). IPv4 only (the
    /// cache holds IPv4 flows). The caller checked TTL > 1.
    #[allow(clippy::too_many_arguments)]
    fn rewrite_cached(
        &self,
        f: &Frame,
        side: Side,
        addr: u32,
        port: u16,
        ip_delta: u16,
        l4_delta: u16,
    ) -> Option<()>;
    /// The IPv6 cached path's rewrite: the address and port of `side`, with
    /// the flow's precomputed TCP/UDP checksum delta where the context can
    /// use it (see `bgswitch_common::CachedFlow6`); else the ordinary
    /// rewrite.
    #[inline(always)]
    fn rewrite_cached6(
        &self,
        f: &Frame,
        side: Side,
        addr: &Addr,
        port: u16,
        _l4_delta: u16,
    ) -> Option<()> {
        self.rewrite(f, side, addr, port)
    }
    /// Decrements the TTL or hop limit (the caller checked it is > 1).
    fn decrement_ttl(&self, f: &Frame) -> Option<()>;
    /// Writes the next hop's MACs (the same in both contexts; after the
    /// last helper that may move the data).
    #[inline(always)]
    fn write_macs(&self, dmac: &[u8; 6], smac: &[u8; 6]) -> Option<()> {
        let eth = ptr_at::<_, [u8; 14]>(self, 0)?;
        // SAFETY: eth is bounds-checked. Four loads and four stores (an
        // array assignment becomes a memmove call here). Every `dmac`
        // starts 4-byte aligned and every `smac` at 2 mod 4 (FlowEntry,
        // CachedFlow and Hop are laid out so), like the destination and
        // source MACs of an XDP frame (XDP data is aligned); unaligned
        // packet stores are fine on the 64-bit JITs.
        unsafe {
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
        Some(())
    }
    /// Makes the frame `front` bytes longer at its start and then `total`
    /// bytes long (cut at its end), for an ICMP error built around the
    /// start of the packet it quotes; the new bytes are uninitialised and
    /// every packet pointer is stale afterwards. `None` when the context
    /// cannot (the frame as it was); an error after the first step leaves
    /// a frame fit only to be dropped (`Some(false)`).
    fn room_for_error(&self, front: u32, total: u32) -> Option<bool>;
    /// Hands the frame to the program at `index` of this program type's
    /// tail-call array (`bgswitch_common::tail`); returns only if that
    /// fails (the program not loaded).
    fn tail_call(&self, index: u32);
    /// Whether the frame may be sent out of `egress` by this program type:
    /// an interface bgswitch serves in a way it can send to.
    fn may_send_to(&self, egress: u32) -> bool;
    /// Sends the frame (MACs written) out of `egress`: the verdict.
    fn send_to(&self, egress: u32) -> u32;
    /// The route leaves through `egress` but its neighbour is not resolved
    /// yet: the verdict. XDP hands the frame to the stack (which resolves
    /// the neighbour and forwards it, TTL and all); TC decrements the TTL
    /// and hands it to the kernel's neighbour output.
    fn unresolved(&self, f: &Frame, egress: u32) -> u32;
}

/// Pointer to a `T` at `offset` bytes into the packet, if it lies wholly
/// inside what the program may read.
#[inline(always)]
pub fn ptr_at<C: Packet + ?Sized, T>(ctx: &C, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
