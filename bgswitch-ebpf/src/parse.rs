//! Bounds-checked header access and the parse of one frame into what the
//! rest of the program needs. Nothing here writes to the packet.

use bgswitch_common::{FAMILY_IPV4, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    context::{ptr_at, Packet},
    frame::{Frame, IP_OFF},
};

/// Why a frame is not ours to rewrite.
pub enum Skip {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged — in the frame or in a socket
    /// buffer's metadata —, …).
    NotIp,
    /// IPv4 but neither TCP nor UDP.
    NotTcpUdp,
    /// A fragment.
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

const ETH_P_IP: u16 = 0x0800;

/// A 16-bit field at `off` bytes past `p`, as it lies in memory. One load:
/// the fields' arrays are byte arrays, which the BPF backend would read byte
/// by byte and reassemble.
///
/// SAFETY: `p + off .. p + off + 2` lies inside a bounds-checked header.
#[inline(always)]
unsafe fn load16(p: *const u8, off: usize) -> u16 {
    // Packet fields may sit at any 2-byte offset; the verifier allows such
    // loads on the 64-bit JITs (x86-64, arm64) and so do the CPUs.
    core::ptr::read_volatile(p.add(off).cast::<u16>())
}

/// A 32-bit field at `off` bytes past `p`, as it lies in memory (one load).
///
/// SAFETY: as for [`load16`].
#[inline(always)]
unsafe fn load32(p: *const u8, off: usize) -> u32 {
    core::ptr::read_volatile(p.add(off).cast::<u32>())
}

/// Parses Ethernet + IPv4 + TCP/UDP. Every length the headers claim is checked
/// against the frame and against each other.
#[inline(always)]
pub fn parse<C: Packet>(ctx: &C) -> Result<Frame, Skip> {
    if ctx.vlan_tagged() {
        return Err(Skip::NotIp);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(Skip::NotIp);
    }
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
    let l4_len = tot_len - ihl;
    let (sport, dport, tcp_flags, l4_hdr) = match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Skip::Malformed)?;
            let raw: *const u8 = tcp.cast();
            // SAFETY: byte 12 and 13 lie inside the 20-byte header checked above.
            let (doff, flags) = unsafe { (((*raw.add(12)) >> 4) as usize * 4, *raw.add(13)) };
            if doff < TcpHdr::LEN || doff > l4_len {
                return Err(Skip::Malformed);
            }
            // SAFETY: inside the checked 20-byte header.
            unsafe { (load16(raw, 0), load16(raw, 2), flags, doff) }
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
            unsafe { (load16(raw, 0), load16(raw, 2), 0, UdpHdr::LEN) }
        }
        _ => return Err(Skip::NotTcpUdp),
    };
    // A GSO packet leaves as segments of `gso` bytes of payload each.
    let gso = ctx.gso_size() as usize;
    let longest = if gso != 0 && ihl + l4_hdr + gso < tot_len {
        ihl + l4_hdr + gso
    } else {
        tot_len
    };
    Ok(Frame {
        ip,
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
        tot_len: longest as u16,
        frame_len: frame_len as u64,
    })
}
