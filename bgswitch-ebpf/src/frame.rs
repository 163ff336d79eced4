//! What parsing found: a frame's fields as the stages read them, and the
//! offsets and TCP flags they name. Below both the context seam and the
//! parse, which fills it.

use bgswitch_common::Addr;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// Where the IPv4 header starts (after an untagged Ethernet header).
pub const IP_OFF: usize = EthHdr::LEN;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed IPv4 TCP/UDP frame: pointers into the packet plus copies of the
/// fields the lookups need.
pub struct Frame {
    pub ip: *mut Ipv4Hdr,
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
    pub ttl: u8,
    /// The IPv4 length of the longest packet the frame stands for (host
    /// order), for the MTU checks: its total length, or for a GSO packet
    /// the headers plus one segment.
    pub tot_len: u16,
    /// Whole frame length, for byte counters.
    pub frame_len: u64,
}
