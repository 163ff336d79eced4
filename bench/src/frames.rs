//! Test frames built with etherparse (an implementation independent of the
//! XDP program's own checksum code).

use std::net::{SocketAddrV4, SocketAddrV6};

use etherparse::{
    IpHeaders, NetSlice, PacketBuilder, PacketBuilderStep, SlicedPacket, TransportSlice,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// Sequence number 1000.
    Syn,
    /// A backend's SYN-ACK: sequence number 0, acknowledging the SYN.
    SynAck,
    /// Acknowledges the SYN-ACK (acknowledgement number 1): the client's
    /// ACK that completes the handshake, and every later packet.
    Ack,
    Udp,
}

/// A frame from `src` to `dst`, padded with payload to `len` bytes when it is
/// shorter (64 B frames by default).
pub fn frame(src: SocketAddrV4, dst: SocketAddrV4, l4: L4, ttl: u8, len: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(
        src.ip().octets(),
        dst.ip().octets(),
        ttl,
    );
    let hdr = 14 + 20 + if l4 == L4::Udp { 8 } else { 20 };
    transport(b, src.port(), dst.port(), l4, len.saturating_sub(hdr))
}

/// The transport part of a frame (`b`: its Ethernet and IP headers), with
/// `pad` bytes of payload.
fn transport(
    b: PacketBuilderStep<IpHeaders>,
    sport: u16,
    dport: u16,
    l4: L4,
    pad: usize,
) -> Vec<u8> {
    let payload = vec![0x5a; pad];
    let mut out = Vec::new();
    match l4 {
        L4::Udp => b
            .udp(sport, dport)
            .write(&mut out, &payload)
            .expect("UDP frame"),
        L4::Syn => b
            .tcp(sport, dport, 1000, 65535)
            .syn()
            .write(&mut out, &payload)
            .expect("TCP frame"),
        L4::SynAck => b
            .tcp(sport, dport, 0, 65535)
            .syn()
            .ack(1001)
            .write(&mut out, &payload)
            .expect("TCP frame"),
        L4::Ack => b
            .tcp(sport, dport, 1000, 65535)
            .ack(1)
            .write(&mut out, &payload)
            .expect("TCP frame"),
    }
    out
}

/// The IPv6 twin of [`frame`]: `hop` is the hop limit.
pub fn frame6(src: SocketAddrV6, dst: SocketAddrV6, l4: L4, hop: u8, len: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(
        src.ip().octets(),
        dst.ip().octets(),
        hop,
    );
    let hdr = 14 + 40 + if l4 == L4::Udp { 8 } else { 20 };
    transport(b, src.port(), dst.port(), l4, len.saturating_sub(hdr))
}

/// Source, destination and hop limit of an IPv6 frame whose L4 checksum is
/// correct (for UDP, never 0: IPv6 has no UDP without a checksum); None if
/// it does not parse or the checksum is wrong.
pub fn verify6(frame: &[u8]) -> Option<(SocketAddrV6, SocketAddrV6, u8)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        return None;
    };
    let h = ip.header().to_header();
    let (sp, dp) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            if t.checksum() != t.calc_checksum_ipv6(h.source, h.destination).ok()? {
                return None;
            }
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != u.to_header().calc_checksum_ipv6(&h, u.payload()).ok()? {
                return None;
            }
            (u.source_port(), u.destination_port())
        }
        _ => return None,
    };
    Some((
        SocketAddrV6::new(h.source.into(), sp, 0, 0),
        SocketAddrV6::new(h.destination.into(), dp, 0, 0),
        h.hop_limit,
    ))
}

/// Source, destination and TTL of a frame whose IPv4 and L4 checksums are
/// correct; None if it does not parse or a checksum is wrong.
pub fn verify(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u8)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let h = ip.header().to_header();
    if h.header_checksum != h.calc_header_checksum() {
        return None;
    }
    let (sp, dp) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            if t.checksum() != t.calc_checksum_ipv4(h.source, h.destination).ok()? {
                return None;
            }
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0
                && u.checksum() != u.to_header().calc_checksum_ipv4(&h, u.payload()).ok()?
            {
                return None;
            }
            (u.source_port(), u.destination_port())
        }
        _ => return None,
    };
    Some((
        SocketAddrV4::new(h.source.into(), sp),
        SocketAddrV4::new(h.destination.into(), dp),
        h.time_to_live,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_64_bytes_and_verify() {
        let a: SocketAddrV4 = "198.18.0.2:1000".parse().unwrap();
        let b: SocketAddrV4 = "198.19.0.10:80".parse().unwrap();
        for l4 in [L4::Syn, L4::Ack, L4::Udp] {
            let f = frame(a, b, l4, 64, 64);
            assert_eq!(f.len(), 64);
            assert_eq!(verify(&f), Some((a, b, 64)));
        }
    }

    #[test]
    fn ipv6_frames_are_64_bytes_or_their_headers_and_verify() {
        let a: SocketAddrV6 = "[2001:db8:18::2]:1000".parse().unwrap();
        let b: SocketAddrV6 = "[2001:db8:19::10]:80".parse().unwrap();
        for l4 in [L4::Syn, L4::Ack, L4::Udp] {
            let f = frame6(a, b, l4, 64, 64);
            assert!(f.len() == 64 || (l4 != L4::Udp && f.len() == 74));
            assert_eq!(verify6(&f), Some((a, b, 64)));
            assert_eq!(verify(&f), None);
        }
    }
}
