//! ICMP errors about switched flows, both families. An error quotes the
//! start of the packet it is about; when that packet is one of a flow
//! bgswitch switched, the error is translated the way the flow was, so it
//! reaches the host that sent the packet in terms that host knows:
//!
//! - about a packet client → backend (destination unreachable, fragmentation
//!   needed / packet too big, time exceeded, parameter problem, from the
//!   backend or from a router between the load balancer and the backend,
//!   on its way to the client): the quoted destination becomes the VIP and
//!   port, and an error from the backend itself comes from the VIP;
//! - about a packet VIP → client (a reply, as the client saw it; from a
//!   router on the client's side, or the client, addressed to the VIP): the
//!   quoted source becomes the backend and its port, and the error goes to
//!   the backend.
//!
//! Every checksum the rewrite touches is updated incrementally: the quoted
//! IPv4 header's, the quoted TCP/UDP one's (when the quote holds it), the
//! ICMP one's (for ICMPv6 also through its pseudo-header) and the outer
//! IPv4 header's. A correct incremental update leaves each covered region's
//! one's-complement sum as it was, so a socket buffer's CHECKSUM_COMPLETE
//! sum stays right too (ICMP is never checksum-offloaded). The error is
//! then forwarded like any rewritten frame. Anything else (echo to a VIP,
//! errors about other traffic, quotes too short to name a flow) passes
//! untouched.

use bgswitch_common::{
    csum::Delta, global, Addr, FlowKey, ServiceKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{
    context::{ptr_at, Packet, TCP_CHECK, UDP_CHECK},
    family::{Family, V4, V6},
    frame::{Frame, IP_OFF},
    maps::{count, REPLY_SOURCES, TOO_BIG},
    parse::{load16, load32},
    service::maybe,
    transmit::{resolve, transmit},
};

/// ICMP error types that quote the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAM_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAM_PROBLEM: u8 = 4;

/// The ICMP header's length (type, code, checksum, 4 bytes of the rest).
const ICMP_LEN: usize = 8;
const IPV6_LEN: usize = 40;

/// What an error quotes: the offset of the quoted TCP/UDP header and the
/// quoted packet's 5-tuple.
struct Quote {
    l4: usize,
    proto: u8,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
}

/// Which way the quoted packet's flow was switched, and its two ends.
#[derive(PartialEq, Eq)]
enum Way {
    /// The quote is client → backend; the error goes to the client.
    ToClient,
    /// The quote is VIP → client; the error goes to the backend.
    ToBackend,
}

struct Translation {
    way: Way,
    vip: Addr,
    vport: u16,
    backend: Addr,
    bport: u16,
}

/// An ICMP frame: a translated error is forwarded, everything else passes
/// untouched (counted as not a service's).
#[inline(always)]
pub fn run_icmp<C: Packet>(ctx: &C, v6: bool) -> u32 {
    let r = if v6 { translate6(ctx) } else { translate4(ctx) };
    match r {
        Some(f) => forward(ctx, &f),
        None => {
            count(global::PASS_NOT_SERVICE);
            C::PASS
        }
    }
}

/// The flow a quote belongs to, if bgswitch switched it.
#[inline(always)]
fn match_quote<F: Family>(q: &Quote, family: u8) -> Option<Translation> {
    // Client → backend: the backend's reply source names the VIP.
    let backend = ServiceKey {
        addr: q.dst,
        port: q.dport,
        proto: q.proto,
        family,
    };
    // SAFETY: plain Copy values read once.
    if let Some(rs) = unsafe { REPLY_SOURCES.get(&backend) } {
        let (vip, vport) = (rs.vip, rs.vport);
        let key = FlowKey {
            src: q.src,
            dst: vip,
            sport: q.sport,
            dport: vport,
            proto: q.proto,
            family,
            _pad: [0; 2],
        };
        let e = F::lookup_any(&key)?;
        // SAFETY: LRU values stay valid for the program's run (RCU); read
        // only.
        let e = unsafe { &mut *e };
        let ok = F::peer(e) == q.dst && F::flow(e).peer_port == q.dport;
        return ok.then_some(Translation {
            way: Way::ToClient,
            vip,
            vport,
            backend: q.dst,
            bport: q.dport,
        });
    }
    // VIP → client: the flow's record names the backend.
    if !maybe(0, &q.src) {
        return None;
    }
    let key = FlowKey {
        src: q.dst,
        dst: q.src,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        family,
        _pad: [0; 2],
    };
    let e = F::lookup_any(&key)?;
    // SAFETY: as above.
    let e = unsafe { &mut *e };
    let (backend, bport) = (F::peer(e), F::flow(e).peer_port);
    Some(Translation {
        way: Way::ToBackend,
        vip: q.src,
        vport: q.sport,
        backend,
        bport,
    })
}

/// The quoted TCP/UDP checksum's offset, if the quote holds it (and, for
/// UDP, it is not 0: no checksum).
#[inline(always)]
fn quoted_l4_check<C: Packet>(ctx: &C, q: &Quote) -> Option<*mut u16> {
    let off = q.l4
        + if q.proto == PROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
    let p = ptr_at::<_, u16>(ctx, off)?;
    // SAFETY: bounds-checked by ptr_at.
    if q.proto == PROTO_UDP && unsafe { core::ptr::read_volatile(p) } == 0 {
        return None;
    }
    Some(p)
}

/// Writes `v` at `off` bytes past `p` (unaligned packet stores are fine on
/// the 64-bit JITs).
///
/// SAFETY: `p + off .. p + off + 4` lies in a bounds-checked header.
#[inline(always)]
unsafe fn store32(p: *mut u8, off: usize, v: u32) {
    core::ptr::write_volatile(p.add(off).cast::<u32>(), v);
}

/// SAFETY: as for [`store32`], two bytes.
#[inline(always)]
unsafe fn store16(p: *mut u8, off: usize, v: u16) {
    core::ptr::write_volatile(p.add(off).cast::<u16>(), v);
}

/// The quoted port's new value and the change of the quoted TCP/UDP
/// checksum for `addr` (through its pseudo-header) and the port; returns
/// the ICMP checksum's share of both (port, L4 checksum).
///
/// SAFETY: `l4` is the quote's bounds-checked 8-byte TCP/UDP start.
#[inline(always)]
unsafe fn rewrite_quoted_l4<C: Packet>(
    ctx: &C,
    q: &Quote,
    l4: *mut u8,
    port_off: usize,
    old_port: u16,
    new_port: u16,
    addr: Delta,
) -> Delta {
    store16(l4, port_off, new_port);
    let mut icmp = Delta::ZERO.add16(old_port, new_port);
    if let Some(check) = quoted_l4_check(ctx, q) {
        let old = core::ptr::read_volatile(check);
        let new = addr.add16(old_port, new_port).apply(old);
        core::ptr::write_volatile(check, new);
        icmp = icmp.add16(old, new);
    }
    icmp
}

/// An IPv4 ICMP error about a switched flow, translated in place; the
/// outer packet as a [`Frame`] to forward.
#[inline(always)]
fn translate4<C: Packet>(ctx: &C) -> Option<Frame> {
    let ip = ptr_at::<_, [u8; 20]>(ctx, IP_OFF)?.cast::<u8>();
    // SAFETY: inside the 20 bytes checked above.
    let (vihl, tot_len, frag, ttl) = unsafe {
        (
            *ip,
            u16::from_be(load16(ip, 2)) as usize,
            u16::from_be(load16(ip, 6)),
            *ip.add(8),
        )
    };
    let ihl = (vihl & 0x0f) as usize * 4;
    if vihl >> 4 != 4 || ihl < 20 || frag & 0x3fff != 0 {
        return None;
    }
    // Every byte read below is bounds-checked against the packet itself;
    // the length the header claims only has to be plausible. (Comparing it
    // with the frame's length here lets the compiler fold the pointer
    // checks below into scalar ones, which the verifier cannot follow.)
    if tot_len < ihl + ICMP_LEN + 20 + 8 {
        return None;
    }
    let icmp_off = IP_OFF + ihl;
    // ICMP header and the quoted IPv4 header's first 20 bytes.
    let icmp = ptr_at::<_, [u8; ICMP_LEN + 20]>(ctx, icmp_off)?.cast::<u8>();
    // SAFETY: inside the 28 bytes checked above.
    let ty = unsafe { *icmp };
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED && ty != ICMP_PARAM_PROBLEM {
        return None;
    }
    let qip_off = icmp_off + ICMP_LEN;
    // SAFETY: as above.
    let qip = unsafe { icmp.add(ICMP_LEN) };
    // SAFETY: inside the quoted header's 20 bytes.
    let (qvihl, qfrag, qproto) = unsafe { (*qip, u16::from_be(load16(qip, 6)), *qip.add(9)) };
    let qihl = (qvihl & 0x0f) as usize * 4;
    // Only a quote of a first fragment (or whole packet) holds ports.
    if qvihl >> 4 != 4 || qihl < 20 || qfrag & 0x1fff != 0 {
        return None;
    }
    if qproto != PROTO_TCP && qproto != PROTO_UDP {
        return None;
    }
    let ql4_off = qip_off + qihl;
    let ql4 = ptr_at::<_, [u8; 8]>(ctx, ql4_off)?.cast::<u8>();
    // SAFETY: inside the headers checked above.
    let q = unsafe {
        Quote {
            l4: ql4_off,
            proto: qproto,
            src: [load32(qip, 12), 0, 0, 0],
            dst: [load32(qip, 16), 0, 0, 0],
            sport: load16(ql4, 0),
            dport: load16(ql4, 2),
        }
    };
    let t = match_quote::<V4>(&q, FAMILY_IPV4)?;
    // SAFETY: inside the outer header.
    let (outer_src, outer_dst) = unsafe { (load32(ip, 12), load32(ip, 16)) };
    // The quoted address and port that change, and the outer one.
    let (qaddr_off, old, new, qport_off, old_port, new_port) = match t.way {
        Way::ToClient => (16, t.backend[0], t.vip[0], 2, t.bport, t.vport),
        Way::ToBackend => (12, t.vip[0], t.backend[0], 0, t.vport, t.bport),
    };
    if t.way == Way::ToBackend && outer_dst != t.vip[0] {
        return None;
    }
    let addr = Delta::ZERO.add32(old, new);
    // SAFETY: every offset below lies inside a header bounds-checked above.
    let (src, dst) = unsafe {
        store32(qip, qaddr_off, new);
        let old_check = load16(qip, 10);
        let new_check = addr.apply(old_check);
        store16(qip, 10, new_check);
        let l4 = rewrite_quoted_l4(ctx, &q, ql4, qport_off, old_port, new_port, addr);
        // The quoted address, the quoted header's checksum, port and L4
        // checksum all lie in the ICMP message.
        let sum = addr.add16(old_check, new_check).plus(l4);
        // The ICMP checksum covers the message only (no pseudo-header).
        // The pointers are still those of parse: no helper ran since.
        let icmp = ptr_at::<_, [u8; 4]>(ctx, icmp_off)?.cast::<u8>();
        store16(icmp, 2, sum.apply(load16(icmp, 2)));
        let ip = ptr_at::<_, [u8; 20]>(ctx, IP_OFF)?.cast::<u8>();
        match t.way {
            Way::ToClient if outer_src == t.backend[0] => {
                // From the backend itself: from the VIP.
                store32(ip, 12, t.vip[0]);
                let d = Delta::ZERO.add32(outer_src, t.vip[0]);
                store16(ip, 10, d.apply(load16(ip, 10)));
                (t.vip[0], outer_dst)
            }
            Way::ToClient => (outer_src, outer_dst),
            Way::ToBackend => {
                store32(ip, 16, t.backend[0]);
                let d = Delta::ZERO.add32(outer_dst, t.backend[0]);
                store16(ip, 10, d.apply(load16(ip, 10)));
                (outer_src, t.backend[0])
            }
        }
    };
    count(global::ICMP_TRANSLATED);
    Some(Frame {
        ip: ip.cast(),
        l4: icmp_off,
        proto: PROTO_ICMP,
        family: FAMILY_IPV4,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ttl,
        tot_len: tot_len as u16,
        frame_len: ctx.len() as u64,
    })
}

/// An ICMPv6 error about a switched flow, translated in place; the outer
/// packet as a [`Frame`] to forward.
#[inline(always)]
fn translate6<C: Packet>(ctx: &C) -> Option<Frame> {
    let ip = ptr_at::<_, [u8; IPV6_LEN]>(ctx, IP_OFF)?.cast::<u8>();
    // SAFETY: inside the 40 bytes checked above.
    let (version, payload_len, hop_limit) =
        unsafe { (*ip >> 4, u16::from_be(load16(ip, 4)) as usize, *ip.add(7)) };
    if version != 6 {
        return None;
    }
    // As for IPv4: only plausible; the reads are bounds-checked.
    if payload_len < ICMP_LEN + IPV6_LEN + 8 {
        return None;
    }
    let icmp_off = IP_OFF + IPV6_LEN;
    let icmp = ptr_at::<_, [u8; ICMP_LEN + IPV6_LEN]>(ctx, icmp_off)?.cast::<u8>();
    // SAFETY: inside the 48 bytes checked above.
    let ty = unsafe { *icmp };
    if !matches!(
        ty,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAM_PROBLEM
    ) {
        return None;
    }
    let qip_off = icmp_off + ICMP_LEN;
    // SAFETY: as above.
    let qip = unsafe { icmp.add(ICMP_LEN) };
    // SAFETY: inside the quoted 40-byte header. A quote whose TCP/UDP
    // header sits behind extension headers passes untouched.
    let (qversion, qproto) = unsafe { (*qip >> 4, *qip.add(6)) };
    if qversion != 6 || (qproto != PROTO_TCP && qproto != PROTO_UDP) {
        return None;
    }
    let ql4_off = qip_off + IPV6_LEN;
    let ql4 = ptr_at::<_, [u8; 8]>(ctx, ql4_off)?.cast::<u8>();
    let word = |p: *const u8, off: usize| -> Addr {
        // SAFETY: callers pass an address inside a checked header.
        unsafe {
            [
                load32(p, off),
                load32(p, off + 4),
                load32(p, off + 8),
                load32(p, off + 12),
            ]
        }
    };
    // SAFETY: inside the 8 bytes checked above.
    let (sport, dport) = unsafe { (load16(ql4, 0), load16(ql4, 2)) };
    let q = Quote {
        l4: ql4_off,
        proto: qproto,
        src: word(qip, 8),
        dst: word(qip, 24),
        sport,
        dport,
    };
    let t = match_quote::<V6>(&q, FAMILY_IPV6)?;
    let (outer_src, outer_dst) = (word(ip, 8), word(ip, 24));
    let (qaddr_off, old, new, qport_off, old_port, new_port) = match t.way {
        Way::ToClient => (24, t.backend, t.vip, 2, t.bport, t.vport),
        Way::ToBackend => (8, t.vip, t.backend, 0, t.vport, t.bport),
    };
    if t.way == Way::ToBackend && outer_dst != t.vip {
        return None;
    }
    let addr = Delta::ZERO.add_addr(&old, &new, 4);
    // The outer address that changes, if one does (through the ICMPv6
    // pseudo-header).
    let (outer_off, outer_old, outer_new) = match t.way {
        Way::ToClient if outer_src == t.backend => (8, outer_src, t.vip),
        Way::ToClient => (0, outer_src, outer_src),
        Way::ToBackend => (24, outer_dst, t.backend),
    };
    // SAFETY: every offset below lies inside a header bounds-checked above;
    // no helper ran since.
    unsafe {
        for (i, w) in new.iter().enumerate() {
            store32(qip, qaddr_off + 4 * i, *w);
        }
        let l4 = rewrite_quoted_l4(ctx, &q, ql4, qport_off, old_port, new_port, addr);
        let outer = Delta::ZERO.add_addr(&outer_old, &outer_new, 4);
        let sum = addr.plus(l4).plus(outer);
        let icmp = ptr_at::<_, [u8; 4]>(ctx, icmp_off)?.cast::<u8>();
        store16(icmp, 2, sum.apply(load16(icmp, 2)));
        if outer_off != 0 {
            let ip = ptr_at::<_, [u8; IPV6_LEN]>(ctx, IP_OFF)?.cast::<u8>();
            for (i, w) in outer_new.iter().enumerate() {
                store32(ip, outer_off + 4 * i, *w);
            }
        }
    }
    let (src, dst) = match t.way {
        Way::ToClient if outer_src == t.backend => (t.vip, outer_dst),
        Way::ToClient => (outer_src, outer_dst),
        Way::ToBackend => (outer_src, t.backend),
    };
    count(global::ICMP_TRANSLATED);
    Some(Frame {
        ip: ip.cast(),
        l4: icmp_off,
        proto: PROTO_ICMPV6,
        family: FAMILY_IPV6,
        src,
        dst,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ttl: hop_limit,
        tot_len: (IPV6_LEN + payload_len) as u16,
        frame_len: ctx.len() as u64,
    })
}

/// Forwards a translated error: the next hop looked up (no record keeps
/// one for ICMP), TTL or hop limit decremented, sent; to the stack when it
/// cannot be sent now (TTL ≤ 1 too: the stack answers).
#[inline(always)]
fn forward<C: Packet>(ctx: &C, f: &Frame) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return C::PASS;
    }
    match resolve(ctx, f) {
        Ok(hop) => transmit(ctx, f, hop.ifindex, &hop.dmac, &hop.smac, None),
        Err(unresolved) => unresolved.map_or(C::PASS, |egress| ctx.unresolved(f, egress)),
    }
}

/// How much of a too-long packet the error quotes: with the 8-byte ICMP
/// header, 512 bytes (the most `bpf_csum_diff` sums in one call; more than
/// the IP header and 8 bytes the sender needs to find its socket).
const QUOTE: usize = 504;
const ICMP_FRAG_NEEDED: u8 = 4;

/// The MTU `transmit::resolve` left for this run, if any (cleared).
#[inline(always)]
pub fn take_too_big() -> Option<u32> {
    let t = TOO_BIG.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    let mtu = unsafe { core::ptr::replace(t, 0) };
    (mtu != 0).then_some(mtu)
}

/// A rewritten packet the path passed because it is longer than the next
/// hop's `mtu`: its sender gets the error it needs for path MTU discovery
/// ("fragmentation needed" for IPv4 with DF set, "packet too big" for
/// IPv6), about the packet it sent. The frame becomes that error, built
/// around the rewritten packet as the next hop would have quoted it (from
/// where the packet was going, to its source), which is then translated
/// and forwarded like an error from the network (so the client hears it
/// from the VIP about its packet to the VIP, a backend from where its
/// reply was going about its reply). IPv4 without DF passes as it is: the
/// stack fragments it.
#[inline(always)]
pub fn too_big<C: Packet>(ctx: &C, mtu: u32) -> u32 {
    let Some(v6) = crate::parse::ip_family(ctx) else {
        return C::PASS;
    };
    match build_too_big(ctx, mtu, v6) {
        Built::No => C::PASS,
        Built::Broken => C::DROP,
        Built::Yes => {
            count(global::ICMP_TOO_BIG_SENT);
            let f = if v6 { translate6(ctx) } else { translate4(ctx) };
            match f {
                Some(f) => forward(ctx, &f),
                // About no recorded flow (a stateless service's packet):
                // an error the sender could not match. The packet was
                // too long to go on, as a router would drop it.
                None => C::DROP,
            }
        }
    }
}

enum Built {
    /// The frame is as it was.
    No,
    /// The frame is the error.
    Yes,
    /// The frame was changed half-way (a helper failed).
    Broken,
}

/// One's-complement sum of `len` bytes at `p` (a multiple of 4, at most
/// 512), added to `seed`, unfolded.
///
/// SAFETY: `p .. p + len` is readable (packet or stack).
#[inline(always)]
unsafe fn sum(p: *const u8, len: u32, seed: u32) -> u32 {
    aya_ebpf::helpers::bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, len, seed) as u32
}

/// The complement of a sum folded to 16 bits: a checksum field.
#[inline(always)]
fn checksum(s: u32) -> u16 {
    !bgswitch_common::csum::fold(u64::from(s))
}

#[inline(always)]
fn build_too_big<C: Packet>(ctx: &C, mtu: u32, v6: bool) -> Built {
    let hdr = if v6 { IPV6_LEN } else { 20 };
    // What the new headers need of the packet: its MACs, addresses and
    // length (and, for IPv4, DF).
    let Some(old) = ptr_at::<_, [u8; IP_OFF + IPV6_LEN]>(ctx, 0)
        .or_else(|| ptr_at::<_, [u8; IP_OFF + 20]>(ctx, 0).map(|p| p.cast()))
    else {
        return Built::No;
    };
    let old = old.cast::<u8>();
    // SAFETY: inside the Ethernet and IPv4 headers checked above (20
    // bytes at least; the IPv6 fields only when the 40 were there).
    let (dmac, smac, ip_len, src, dst) = unsafe {
        let mac = |o: usize| (load32(old, o), load16(old, o + 4));
        let ip = old.add(IP_OFF);
        if v6 {
            if ptr_at::<_, [u8; IP_OFF + IPV6_LEN]>(ctx, 0).is_none() {
                return Built::No;
            }
            let a = |o: usize| {
                [
                    load32(ip, o),
                    load32(ip, o + 4),
                    load32(ip, o + 8),
                    load32(ip, o + 12),
                ]
            };
            (
                mac(0),
                mac(6),
                IPV6_LEN + u16::from_be(load16(ip, 4)) as usize,
                a(8),
                a(24),
            )
        } else {
            if u16::from_be(load16(ip, 6)) & 0x4000 == 0 {
                // No DF: the stack fragments it.
                return Built::No;
            }
            (
                mac(0),
                mac(6),
                u16::from_be(load16(ip, 2)) as usize,
                [load32(ip, 12), 0, 0, 0],
                [load32(ip, 16), 0, 0, 0],
            )
        }
    };
    // Never an error about an error (a translated ICMP message too long
    // for its next hop goes to the stack).
    // SAFETY: inside the IP header checked above (IPv4's protocol at 9,
    // IPv6's next header at 6).
    let proto = unsafe { *old.add(IP_OFF + if v6 { 6 } else { 9 }) };
    if ip_len < QUOTE || proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        return Built::No;
    }
    let msg = (ICMP_LEN + QUOTE) as u32;
    let total = (IP_OFF + hdr) as u32 + msg;
    match ctx.room_for_error((hdr + ICMP_LEN) as u32, total) {
        None => return Built::No,
        Some(false) => return Built::Broken,
        Some(true) => {}
    }
    let Some(p) = ptr_at::<_, [u8; IP_OFF + IPV6_LEN + ICMP_LEN + QUOTE]>(ctx, 0)
        .map(|p| p.cast::<u8>())
        .or_else(|| ptr_at::<_, [u8; IP_OFF + 20 + ICMP_LEN + QUOTE]>(ctx, 0).map(|p| p.cast()))
    else {
        return Built::Broken;
    };
    // SAFETY: every store below lies inside the `total` bytes checked just
    // now (the IPv6 layout only when they are that many).
    unsafe {
        // Back to the sender: the MACs swapped (forwarding sets the next
        // hop's anyway), the frame's EtherType.
        store32(p, 0, smac.0);
        store16(p, 4, smac.1);
        store32(p, 6, dmac.0);
        store16(p, 10, dmac.1);
        store16(p, 12, if v6 { 0x86ddu16 } else { 0x0800 }.to_be());
        let ip = p.add(IP_OFF);
        let icmp = ip.add(hdr);
        if v6 {
            if ptr_at::<_, [u8; IP_OFF + IPV6_LEN + ICMP_LEN + QUOTE]>(ctx, 0).is_none() {
                return Built::Broken;
            }
            store32(ip, 0, u32::from_be(0x6000_0000));
            store16(ip, 4, (msg as u16).to_be());
            *ip.add(6) = PROTO_ICMPV6;
            *ip.add(7) = 64;
            // From where the packet was going, to its source.
            for i in 0..4 {
                store32(ip, 8 + 4 * i, dst[i]);
                store32(ip, 24 + 4 * i, src[i]);
            }
            store32(
                icmp,
                0,
                u32::from_ne_bytes([ICMPV6_PACKET_TOO_BIG, 0, 0, 0]),
            );
            store32(icmp, 4, mtu.to_be());
            // The pseudo-header: addresses, length, next header.
            let pseudo = [
                dst[0],
                dst[1],
                dst[2],
                dst[3],
                src[0],
                src[1],
                src[2],
                src[3],
                msg.to_be(),
                u32::from(PROTO_ICMPV6).to_be(),
            ];
            let s = sum(pseudo.as_ptr().cast(), 40, 0);
            store16(icmp, 2, checksum(sum(icmp, msg, s)));
        } else {
            store32(ip, 0, u32::from_ne_bytes([0x45, 0, 0, 0]));
            store16(ip, 2, ((20 + msg) as u16).to_be());
            store32(ip, 4, 0);
            store32(ip, 8, u32::from_ne_bytes([64, PROTO_ICMP, 0, 0]));
            store32(ip, 12, dst[0]);
            store32(ip, 16, src[0]);
            store16(ip, 10, checksum(sum(ip, 20, 0)));
            store32(
                icmp,
                0,
                u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]),
            );
            store32(icmp, 4, (mtu & 0xffff).to_be());
            store16(icmp, 2, checksum(sum(icmp, msg, 0)));
        }
    }
    Built::Yes
}
