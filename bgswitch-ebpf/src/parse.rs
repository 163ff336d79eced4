//! Bounds-checked header access and the parse of one frame into what the
//! rest of the program needs. Nothing here writes to the packet.

use bgswitch_common::{FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    context::{ptr_at, Packet},
    frame::{Frame, IP_OFF},
};

/// Why a frame is not ours to rewrite.
pub enum Skip {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged — in the frame or in a
    /// socket buffer's metadata —, …).
    NotIp,
    /// IP but neither TCP nor UDP (IPv6: also behind an extension header
    /// the walk does not take, or past its bounds).
    NotTcpUdp,
    /// A fragment (IPv6: a fragment header).
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
    /// IPv6: for the IPv6 program (`parse6`).
    Ipv6,
    /// ICMP (IPv4), or ICMPv6 right after the IPv6 header: for the ICMP
    /// program.
    Icmp,
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// IPv6 extension headers the walk steps over to find TCP or UDP
/// (hop-by-hop options, routing with no segments left, destination options:
/// each `(len + 1) * 8` bytes, its next header in byte 0), and the fragment
/// header, which ends it: a fragment is not ours.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// At most this many extension headers, of at most this many bytes in all,
/// are walked; a frame with more passes untouched.
const IPV6_MAX_EXT: usize = 4;
const IPV6_MAX_EXT_BYTES: usize = 256;

/// A 16-bit field at `off` bytes past `p`, as it lies in memory. One load:
/// the fields' arrays are byte arrays, which the BPF backend would read byte
/// by byte and reassemble.
///
/// SAFETY: `p + off .. p + off + 2` lies inside a bounds-checked header.
#[inline(always)]
pub unsafe fn load16(p: *const u8, off: usize) -> u16 {
    // Packet fields may sit at any 2-byte offset; the verifier allows such
    // loads on the 64-bit JITs (x86-64, arm64) and so do the CPUs.
    core::ptr::read_volatile(p.add(off).cast::<u16>())
}

/// A 32-bit field at `off` bytes past `p`, as it lies in memory (one load).
///
/// SAFETY: as for [`load16`].
#[inline(always)]
pub unsafe fn load32(p: *const u8, off: usize) -> u32 {
    core::ptr::read_volatile(p.add(off).cast::<u32>())
}

/// The frame's EtherType (host order), if it is an untagged Ethernet frame.
#[inline(always)]
fn ether_type<C: Packet>(ctx: &C) -> Result<u16, Skip> {
    if ctx.vlan_tagged() {
        return Err(Skip::NotIp);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    Ok(u16::from_be(unsafe { (*eth).ether_type }))
}

/// An untagged IP frame's family: `Some(true)` for IPv6, `Some(false)` for
/// IPv4, `None` for anything else (which [`parse`] counts and passes).
#[inline(always)]
pub fn ip_family<C: Packet>(ctx: &C) -> Option<bool> {
    match ether_type(ctx) {
        Ok(ETH_P_IPV6) => Some(true),
        Ok(ETH_P_IP) => Some(false),
        _ => None,
    }
}

/// Parses Ethernet + IPv4 + TCP/UDP. Every length the headers claim is
/// checked against the frame and against each other.
#[inline(always)]
pub fn parse<C: Packet>(ctx: &C) -> Result<Frame, Skip> {
    match ether_type(ctx)? {
        ETH_P_IP => parse4(ctx),
        ETH_P_IPV6 => Err(Skip::Ipv6),
        _ => Err(Skip::NotIp),
    }
}

/// The TCP or UDP header at `l4`, inside an IP payload of `l4_len` bytes:
/// (source port, destination port, TCP flags, header length).
#[inline(always)]
fn parse_l4<C: Packet>(
    ctx: &C,
    proto: u8,
    l4: usize,
    l4_len: usize,
) -> Result<(u16, u16, u8, usize), Skip> {
    match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Skip::Malformed)?;
            let raw: *const u8 = tcp.cast();
            // SAFETY: byte 12 and 13 lie inside the 20-byte header checked above.
            let (doff, flags) = unsafe { (((*raw.add(12)) >> 4) as usize * 4, *raw.add(13)) };
            if doff < TcpHdr::LEN || doff > l4_len {
                return Err(Skip::Malformed);
            }
            // SAFETY: inside the checked 20-byte header.
            Ok(unsafe { (load16(raw, 0), load16(raw, 2), flags, doff) })
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Skip::Malformed)?;
            let raw: *const u8 = udp.cast();
            // SAFETY: inside the 8-byte header checked by ptr_at.
            let ulen = u16::from_be(unsafe { load16(raw, 4) }) as usize;
            if ulen < UdpHdr::LEN || ulen > l4_len {
                return Err(Skip::Malformed);
            }
            // SAFETY: as above.
            Ok(unsafe { (load16(raw, 0), load16(raw, 2), 0, UdpHdr::LEN) })
        }
        _ => Err(Skip::NotTcpUdp),
    }
}

/// The IP length of the longest packet a frame stands for: a GSO packet
/// leaves as segments of `gso` bytes of payload each.
#[inline(always)]
fn longest<C: Packet>(ctx: &C, headers: usize, ip_len: usize) -> u16 {
    let gso = ctx.gso_size() as usize;
    if gso != 0 && headers + gso < ip_len {
        (headers + gso) as u16
    } else {
        ip_len as u16
    }
}

/// IPv4 after the Ethernet header.
#[inline(always)]
fn parse4<C: Packet>(ctx: &C) -> Result<Frame, Skip> {
    let ip_off = IP_OFF;
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
    let ipb: *const u8 = ip.cast();
    // SAFETY: inside the 20-byte header checked above.
    let tot_len = u16::from_be(unsafe { load16(ipb, 2) }) as usize;
    let frame_len = ctx.len();
    if tot_len < ihl || ip_off + tot_len > frame_len {
        return Err(Skip::Malformed);
    }
    // MF set or a non-zero offset: a fragment. The reserved bit is left alone.
    // SAFETY: inside the header.
    if u16::from_be(unsafe { load16(ipb, 6) }) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    let proto = iph.proto;
    let l4 = ip_off + ihl;
    let (sport, dport, tcp_flags, l4_hdr) = match parse_l4(ctx, proto, l4, tot_len - ihl) {
        Ok(l4) => l4,
        // Looked at only when the protocol is not TCP or UDP.
        Err(Skip::NotTcpUdp) if proto == PROTO_ICMP => return Err(Skip::Icmp),
        Err(e) => return Err(e),
    };
    Ok(Frame {
        ip: ip.cast(),
        l4,
        proto,
        family: FAMILY_IPV4,
        // SAFETY: inside the header.
        src: [unsafe { load32(ipb, 12) }, 0, 0, 0],
        // SAFETY: inside the header.
        dst: [unsafe { load32(ipb, 16) }, 0, 0, 0],
        sport,
        dport,
        tcp_flags,
        ttl: iph.ttl,
        tot_len: longest(ctx, ihl + l4_hdr, tot_len),
        frame_len: frame_len as u64,
    })
}

/// Parses IPv6 after the Ethernet header (the caller checked
/// [`ip_family`]): the extension headers walked (see [`IPV6_MAX_EXT`]) to TCP
/// or UDP. Every length the headers claim is checked as for IPv4.
#[inline(always)]
pub fn parse6<C: Packet>(ctx: &C) -> Result<Frame, Skip> {
    let ip_off = IP_OFF;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ip_off).ok_or(Skip::Malformed)?;
    let ipb: *const u8 = ip.cast();
    // SAFETY: bounds checked by ptr_at (40 bytes).
    let (version, payload_len, mut next, hop_limit) = unsafe {
        (
            *ipb >> 4,
            u16::from_be(load16(ipb, 4)) as usize,
            *ipb.add(6),
            *ipb.add(7),
        )
    };
    if version != 6 {
        return Err(Skip::Malformed);
    }
    let frame_len = ctx.len();
    // A payload length of 0 is a jumbogram's (its length is in a
    // hop-by-hop option): not walked, passed.
    if payload_len == 0 || ip_off + Ipv6Hdr::LEN + payload_len > frame_len {
        return Err(Skip::Malformed);
    }
    let first = ip_off + Ipv6Hdr::LEN;
    let mut l4 = first;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            PROTO_TCP | PROTO_UDP => break,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                // Every one of these is at least 8 bytes long.
                let h: *const [u8; 4] = ptr_at(ctx, l4).ok_or(Skip::Malformed)?;
                // SAFETY: bounds checked by ptr_at.
                let (n, len, segments_left) =
                    unsafe { ((*h)[0], ((*h)[1] as usize + 1) * 8, (*h)[3]) };
                // A routing header with segments left: the packet is not at
                // its final destination (the stack processes the header),
                // and its TCP/UDP checksum covers that final destination,
                // not the address in the IPv6 header.
                if next == IPV6_ROUTING && segments_left != 0 {
                    return Err(Skip::NotTcpUdp);
                }
                next = n;
                l4 += len;
                if l4 - first > IPV6_MAX_EXT_BYTES {
                    return Err(Skip::NotTcpUdp);
                }
            }
            IPV6_FRAGMENT => return Err(Skip::Fragment),
            // ICMPv6 right after the fixed header: for the ICMP program (one
            // behind extension headers passes untouched).
            PROTO_ICMPV6 if l4 == first => return Err(Skip::Icmp),
            _ => return Err(Skip::NotTcpUdp),
        }
    }
    let ext = l4 - first;
    if ext > payload_len {
        return Err(Skip::Malformed);
    }
    let (sport, dport, tcp_flags, l4_hdr) = parse_l4(ctx, next, l4, payload_len - ext)?;
    let ip_len = Ipv6Hdr::LEN + payload_len;
    Ok(Frame {
        ip: ip.cast(),
        l4,
        proto: next,
        family: FAMILY_IPV6,
        // SAFETY: inside the 40-byte header.
        src: unsafe {
            [
                load32(ipb, 8),
                load32(ipb, 12),
                load32(ipb, 16),
                load32(ipb, 20),
            ]
        },
        // SAFETY: inside the 40-byte header.
        dst: unsafe {
            [
                load32(ipb, 24),
                load32(ipb, 28),
                load32(ipb, 32),
                load32(ipb, 36),
            ]
        },
        sport,
        dport,
        tcp_flags,
        ttl: hop_limit,
        tot_len: longest(ctx, Ipv6Hdr::LEN + ext + l4_hdr, ip_len),
        frame_len: frame_len as u64,
    })
}
