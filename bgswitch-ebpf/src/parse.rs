//! Bounds-checked header access and the parse of one frame into what the
//! rest of the program needs. Nothing here writes to the packet.

use aya_ebpf::programs::XdpContext;
use bgswitch_common::{Addr, FAMILY_IPV4, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

/// Why a frame is not ours to rewrite.
pub enum Skip {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, …).
    NotIp,
    /// IPv4 but neither TCP nor UDP.
    NotTcpUdp,
    /// A fragment.
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;

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
    /// IPv4 total length (host order), for the FIB's MTU check.
    pub tot_len: u16,
    /// Whole frame length, for byte counters.
    pub frame_len: u64,
}

/// Pointer to a `T` at `offset` bytes into the packet, if it lies wholly inside.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn ne16(b: [u8; 2]) -> u16 {
    u16::from_ne_bytes(b)
}

/// Parses Ethernet + IPv4 + TCP/UDP. Every length the headers claim is checked
/// against the frame and against each other.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Frame, Skip> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(Skip::NotIp);
    }
    let ip_off = EthHdr::LEN;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ip_off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let iph = unsafe { &*ip };
    if iph.vihl >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    let ihl = ((iph.vihl & 0x0f) as usize) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(Skip::Malformed);
    }
    let tot_len = u16::from_be_bytes(iph.tot_len) as usize;
    let frame_len = ctx.data_end() - ctx.data();
    if tot_len < ihl || ip_off + tot_len > frame_len {
        return Err(Skip::Malformed);
    }
    // MF set or a non-zero offset: a fragment. The reserved bit is left alone.
    if u16::from_be_bytes(iph.frags) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    let proto = iph.proto;
    let l4 = ip_off + ihl;
    let l4_len = tot_len - ihl;
    let (sport, dport, tcp_flags) = match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Skip::Malformed)?;
            // SAFETY: bounds checked by ptr_at.
            let t = unsafe { &*tcp };
            let raw: *const u8 = tcp.cast();
            // SAFETY: byte 12 and 13 lie inside the 20-byte header checked above.
            let (doff, flags) = unsafe { (((*raw.add(12)) >> 4) as usize * 4, *raw.add(13)) };
            if doff < TcpHdr::LEN || doff > l4_len {
                return Err(Skip::Malformed);
            }
            (ne16(t.source), ne16(t.dest), flags)
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Skip::Malformed)?;
            // SAFETY: bounds checked by ptr_at.
            let u = unsafe { &*udp };
            let ulen = u16::from_be_bytes(u.len) as usize;
            if ulen < UdpHdr::LEN || ulen > l4_len {
                return Err(Skip::Malformed);
            }
            (ne16(u.src), ne16(u.dst), 0)
        }
        _ => return Err(Skip::NotTcpUdp),
    };
    Ok(Frame {
        ip,
        l4,
        proto,
        family: FAMILY_IPV4,
        src: [u32::from_ne_bytes(iph.src_addr), 0, 0, 0],
        dst: [u32::from_ne_bytes(iph.dst_addr), 0, 0, 0],
        sport,
        dport,
        tcp_flags,
        ttl: iph.ttl,
        tot_len: tot_len as u16,
        frame_len: frame_len as u64,
    })
}
