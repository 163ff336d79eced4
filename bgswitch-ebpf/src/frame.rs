//! What parsing found: a frame's fields as the stages read them, and the
//! offsets and TCP flags they name. Below both the context seam and the
//! parse, which fills it.

use bgswitch_common::{Addr, FAMILY_IPV6};
use network_types::eth::EthHdr;

/// Where the IP header (either family) starts (after an untagged Ethernet
/// header).
pub const IP_OFF: usize = EthHdr::LEN;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed IPv4 or IPv6 TCP/UDP frame: pointers into the packet plus
/// copies of the fields the lookups need.
pub struct Frame {
    /// The IP header (an `Ipv4Hdr` or an `Ipv6Hdr`, by `family`).
    pub ip: *mut u8,
    /// Start of the L4 header.
    pub l4: usize,
    pub proto: u8,
    pub family: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Wire order.
    pub sport: u16,
    /// Wire order.
    pub dport: u16,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// The IP length (IPv4 total length; IPv6 header, extension headers
    /// and payload) of the longest packet the frame stands for (host
    /// order), for the MTU checks: its length, or for a GSO packet the
    /// headers plus one segment.
    pub tot_len: u16,
    /// Whole frame length, for byte counters.
    pub frame_len: u64,
}

impl Frame {
    /// Whether the frame is IPv6.
    #[inline(always)]
    pub fn v6(&self) -> bool {
        self.family == FAMILY_IPV6
    }
}
