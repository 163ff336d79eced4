//! The XDP program on crafted frames through BPF_PROG_TEST_RUN.
//!
//! Frames are built and checked with `etherparse`, an implementation
//! independent of the program's own checksum code. Each test runs in a fresh
//! network namespace so FIB lookups see a known routing table.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use bgswitch::{
    dataplane::{backend_of, backend_stat_id, service_key, Dataplane, LoadOptions},
    model::Colour,
};
use bgswitch_common::{PROTO_TCP, PROTO_UDP};
use bgswitch_tests::{flowhash, in_netns, ip, TempNetns};
use etherparse::{IpNumber, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn blue() -> Vec<SocketAddr> {
    vec![
        "198.18.1.11:8080".parse().unwrap(),
        "198.18.1.12:8080".parse().unwrap(),
    ]
}
fn green() -> Vec<SocketAddr> {
    vec![
        "198.18.1.21:8080".parse().unwrap(),
        "198.18.1.22:8080".parse().unwrap(),
    ]
}

/// A loaded program with a TCP service on VIP:80 (id 0) and a UDP service on
/// VIP:53 (id 1).
struct Fixture {
    dp: Dataplane,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_max_flows(4096)
    }

    fn with_max_flows(max_flows: u32) -> Fixture {
        let mut fx = Fixture::without_settings(max_flows);
        fx.dp
            .set_settings(
                std::time::Duration::from_secs(30),
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        fx
    }

    /// The services, before the daemon wrote the settings: no half-open
    /// table (a SYN's record fails, E2BIG), the log gates' fallback interval.
    fn without_settings(max_flows: u32) -> Fixture {
        let mut dp = Dataplane::load(&LoadOptions {
            bpffs: None,
            max_flows,
        })
        .expect("load the XDP program (verifier)");
        let pool = |id, c: Colour, addrs: &[SocketAddr]| {
            addrs
                .iter()
                .enumerate()
                .map(|(i, a)| backend_of(*a, backend_stat_id(id, c, i as u32)))
                .collect::<Vec<_>>()
        };
        dp.write_service(
            0,
            service_key(SocketAddr::V4(SocketAddrV4::new(VIP, 80)), PROTO_TCP),
            &pool(0, Colour::Blue, &blue()),
            &pool(0, Colour::Green, &green()),
            Colour::Blue,
        )
        .unwrap();
        let ublue: Vec<SocketAddr> = vec!["198.18.1.11:5353".parse().unwrap()];
        let ugreen: Vec<SocketAddr> = vec!["198.18.1.21:5353".parse().unwrap()];
        dp.write_service(
            1,
            service_key(SocketAddr::V4(SocketAddrV4::new(VIP, 53)), PROTO_UDP),
            &pool(1, Colour::Blue, &ublue),
            &pool(1, Colour::Green, &ugreen),
            Colour::Blue,
        )
        .unwrap();
        Fixture { dp }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (action, out, _) = self.dp.test_run(frame, None, 1).expect("test run");
        (action, out)
    }
}

/// Creates the veth pair v0/v1 in `ns` (both up), gives v0 `addrs`, turns
/// on forwarding and returns v0's ifindex (as seen from the namespace).
fn veth_v0(ns: &str, addrs: &[&str]) -> u32 {
    ip(&[
        "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ])
    .unwrap();
    for a in addrs {
        ip(&["-n", ns, "addr", "add", a, "dev", "v0"]).unwrap();
    }
    ip(&["-n", ns, "link", "set", "v0", "up"]).unwrap();
    ip(&["-n", ns, "link", "set", "v1", "up"]).unwrap();
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    bgswitch::dataplane::ifindex("v0").unwrap()
}

/// A permanent neighbour entry on v0.
fn neigh(ns: &str, addr: &str, mac: &str) {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        "v0",
        "nud",
        "permanent",
    ])
    .unwrap();
}

/// Runs `f` as root inside a fresh network namespace with only `lo`.
fn in_scratch_ns(f: impl FnOnce(&str) + Send) {
    bgswitch_tests::switcher::require_root();
    let ns = TempNetns::create().expect("create a network namespace");
    let name = ns.name().to_string();
    in_netns(&name, || f(&name)).expect("enter the namespace");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum L4 {
    Syn,
    SynAck,
    Ack,
    Fin,
    Rst,
    Udp,
}

fn frame(src: SocketAddrV4, dst: SocketAddrV4, l4: L4, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(
        src.ip().octets(),
        dst.ip().octets(),
        ttl,
    );
    let mut out = Vec::new();
    match l4 {
        L4::Udp => b
            .udp(src.port(), dst.port())
            .write(&mut out, payload)
            .unwrap(),
        _ => {
            // The client's sequence numbers start at 1000, the backend's
            // at 0: an ACK (acknowledging 1) completes the handshake a
            // SYN-ACK began.
            let seq = if l4 == L4::SynAck { 0 } else { 1000 };
            let t = b.tcp(src.port(), dst.port(), seq, 65535);
            let t = match l4 {
                L4::Syn => t.syn(),
                L4::SynAck => t.syn().ack(1001),
                L4::Ack => t.ack(1),
                L4::Fin => t.fin().ack(1),
                L4::Rst => t.rst(),
                L4::Udp => unreachable!(),
            };
            t.write(&mut out, payload).unwrap()
        }
    }
    out
}

/// `frame` with the IPv4 header's DF bit cleared (and its checksum
/// recomputed): a packet the stack may fragment.
fn without_df(mut f: Vec<u8>) -> Vec<u8> {
    let (mut h, _) = Ipv4Header::from_slice(&f[14..]).unwrap();
    h.dont_fragment = false;
    h.header_checksum = h.calc_header_checksum();
    let b = h.to_bytes();
    f[14..14 + b.len()].copy_from_slice(&b);
    f
}

/// Whether `out` is an ICMP "fragmentation needed" with next-hop MTU `mtu`.
fn is_frag_needed(out: &[u8], mtu: u16) -> bool {
    let p = SlicedPacket::from_ethernet(out).expect("parses");
    matches!(
        &p.transport,
        Some(TransportSlice::Icmpv4(i)) if i.icmp_type()
            == etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }
            )
    )
}

fn v4(a: &str) -> SocketAddrV4 {
    a.parse().unwrap()
}

/// Checks IPv4 and L4 checksums of `frame` with etherparse; returns
/// (src, dst, ttl).
fn verify(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4, u8) {
    let p = SlicedPacket::from_ethernet(frame).expect("output frame parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (sp, dp) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.calc_checksum_ipv4(h.source, h.destination).unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                assert_eq!(u.checksum(), want, "UDP checksum");
            }
            (u.source_port(), u.destination_port())
        }
        _ => panic!("no TCP/UDP"),
    };
    (
        SocketAddrV4::new(h.source.into(), sp),
        SocketAddrV4::new(h.destination.into(), dp),
        h.time_to_live,
    )
}

/// The backend the program must pick for a new flow: the flow hash as
/// `bgswitch_tests::flowhash` writes it from its definition (not the
/// program's own code, `bgswitch_common::hash`).
fn predicted(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, pool: &[SocketAddr]) -> SocketAddrV4 {
    let i = flowhash::backend_v4(
        src.ip().octets(),
        src.port(),
        dst.ip().octets(),
        dst.port(),
        proto,
        pool.len(),
    );
    match pool[i] {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    }
}

#[test]
fn syn_to_vip_is_rewritten_to_the_predicted_blue_backend_byte_for_byte() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let client = SocketAddrV4::new(CLIENT, 40000);
        let vip = SocketAddrV4::new(VIP, 80);
        let input = frame(client, vip, L4::Syn, 64, b"");
        let (action, out) = fx.run(&input);
        // No route in the scratch namespace: the rewritten frame goes to the stack.
        assert_eq!(action, XDP_PASS);
        let backend = predicted(client, vip, PROTO_TCP, &blue());
        let expected = frame(client, backend, L4::Syn, 64, b"");
        assert_eq!(
            out, expected,
            "exactly the input with the destination rewritten"
        );
        assert_eq!(verify(&out), (client, backend, 64));
        let st = fx.dp.colour_stats(0, Colour::Blue).unwrap();
        assert_eq!((st.packets, st.new_flows), (1, 1));
        let g = fx.dp.colour_stats(0, Colour::Green).unwrap();
        assert_eq!((g.packets, g.new_flows), (0, 0));
    });
}

#[test]
fn replies_are_rewritten_back_to_the_vip_and_unknown_replies_are_not() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let client = SocketAddrV4::new(CLIENT, 40001);
        let vip = SocketAddrV4::new(VIP, 80);
        let (_, fwd) = fx.run(&frame(client, vip, L4::Syn, 64, b""));
        let (_, backend, _) = verify(&fwd);
        // The backend answers the client directly.
        let reply = frame(backend, client, L4::SynAck, 64, b"");
        let (action, out) = fx.run(&reply);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame(vip, client, L4::SynAck, 64, b""));
        assert_eq!(verify(&out), (vip, client, 64));
        let st = fx.dp.colour_stats(0, Colour::Blue).unwrap();
        assert_eq!((st.reply_packets, st.syn_acks), (1, 1));
        // A packet from the same backend to another client port is no reply of ours.
        let stranger = frame(backend, SocketAddrV4::new(CLIENT, 40999), L4::Ack, 64, b"x");
        assert_eq!(fx.run(&stranger), (XDP_PASS, stranger.clone()));
    });
}

#[test]
fn removing_a_service_keeps_the_other_services_flows_and_replies() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        // A third service on another VIP, with its own backends.
        let vip2 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 20), 80);
        let b2: SocketAddr = "198.18.1.31:8080".parse().unwrap();
        let g2: SocketAddr = "198.18.1.41:8080".parse().unwrap();
        fx.dp
            .write_service(
                2,
                service_key(SocketAddr::V4(vip2), PROTO_TCP),
                &[backend_of(b2, backend_stat_id(2, Colour::Blue, 0))],
                &[backend_of(g2, backend_stat_id(2, Colour::Green, 0))],
                Colour::Blue,
            )
            .unwrap();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = SocketAddrV4::new(CLIENT, 40100);
        let (_, out) = fx.run(&frame(c, vip2, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, v4("198.18.1.31:8080"));
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        let b0 = verify(&out).1;
        // Service 0 (VIP .10) goes; its flows with it.
        fx.dp
            .remove_service(0, &service_key(SocketAddr::V4(vip), PROTO_TCP))
            .unwrap();
        let late = frame(c, vip, L4::Ack, 64, b"");
        assert_eq!(
            fx.run(&late),
            (XDP_PASS, late.clone()),
            "a removed VIP passes"
        );
        let late_reply = frame(b0, c, L4::Ack, 64, b"");
        assert_eq!(fx.run(&late_reply), (XDP_PASS, late_reply.clone()));
        // The other VIP's flow and its replies carry on.
        let (_, out) = fx.run(&frame(c, vip2, L4::Ack, 64, b"x"));
        assert_eq!(verify(&out).1, v4("198.18.1.31:8080"));
        let (action, out) = fx.run(&frame(v4("198.18.1.31:8080"), c, L4::Ack, 64, b"y"));
        assert_eq!(action, XDP_PASS);
        assert_eq!(
            out,
            frame(vip2, c, L4::Ack, 64, b"y"),
            "reply rewritten to VIP .20"
        );
        // And the UDP service on the removed VIP's address keeps working.
        let u = SocketAddrV4::new(CLIENT, 40101);
        let (_, out) = fx.run(&frame(u, SocketAddrV4::new(VIP, 53), L4::Udp, 64, b"q"));
        assert_eq!(verify(&out).1, v4("198.18.1.11:5353"));
    });
}

/// Word `i` of `dp`'s `ADDR_FILTER` map.
fn filter_word(dp: &mut Dataplane, i: u32) -> u64 {
    use aya::maps::{Array, Map, MapData};
    let id = dp.map_id(bgswitch_common::maps::ADDR_FILTER).unwrap();
    let words: Array<_, u64> = Array::try_from(Map::Array(MapData::from_id(id).unwrap())).unwrap();
    words.get(&i, 0).unwrap()
}

/// The IPv4 services' index (`bgswitch_common::SERVICE_INDEX`): a new flow
/// finds its service by one load of its VIP and port's slot; two services
/// on one slot share it and are found through `SERVICES`; a removed service
/// and a moved VIP leave their slot, so their old VIP passes untouched.
#[test]
fn the_services_index_follows_shared_slots_removals_and_moved_vips() {
    use bgswitch_common::{service_entry, stateless_slot, SERVICE_INDEX, SERVICE_SHARED};
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let slot_of = |a: SocketAddrV4| {
            SERVICE_INDEX + stateless_slot(u32::from(*a.ip()).to_be(), a.port().to_be())
        };
        let entry_of = |a: SocketAddrV4, proto, id| {
            service_entry(u32::from(*a.ip()).to_be(), a.port().to_be(), proto, id)
        };
        assert_eq!(
            filter_word(&mut fx.dp, slot_of(vip)),
            entry_of(vip, PROTO_TCP, 0)
        );
        let udp = SocketAddrV4::new(VIP, 53);
        assert_eq!(
            filter_word(&mut fx.dp, slot_of(udp)),
            entry_of(udp, PROTO_UDP, 1)
        );
        // A VIP and port on the same slot as VIP:80, served by service 5.
        let other = (1024..u16::MAX)
            .map(|p| SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 30), p))
            .find(|a| slot_of(*a) == slot_of(vip))
            .expect("a port sharing VIP:80's slot");
        let b5: SocketAddr = "198.18.1.51:8080".parse().unwrap();
        fx.dp
            .write_service(
                5,
                service_key(SocketAddr::V4(other), PROTO_TCP),
                &[backend_of(b5, backend_stat_id(5, Colour::Blue, 0))],
                &[backend_of(b5, backend_stat_id(5, Colour::Green, 0))],
                Colour::Blue,
            )
            .unwrap();
        assert_eq!(filter_word(&mut fx.dp, slot_of(vip)), SERVICE_SHARED);
        let c = SocketAddrV4::new(CLIENT, 40200);
        let (_, out) = fx.run(&frame(c, other, L4::Syn, 64, b""));
        assert_eq!(
            verify(&out).1,
            v4("198.18.1.51:8080"),
            "found through SERVICES"
        );
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, &blue()));
        // Service 5 goes: the slot is VIP:80's alone again.
        fx.dp
            .remove_service(5, &service_key(SocketAddr::V4(other), PROTO_TCP))
            .unwrap();
        assert_eq!(
            filter_word(&mut fx.dp, slot_of(vip)),
            entry_of(vip, PROTO_TCP, 0)
        );
        let syn = frame(SocketAddrV4::new(CLIENT, 40201), other, L4::Syn, 64, b"");
        assert_eq!(
            fx.run(&syn),
            (XDP_PASS, syn.clone()),
            "a removed VIP passes"
        );
        // Service 0 moves to another VIP (written there, then its old VIP's
        // entry removed, as the daemon does).
        let moved = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 31), 80);
        fx.dp
            .write_service(
                0,
                service_key(SocketAddr::V4(moved), PROTO_TCP),
                &pool(0, Colour::Blue, &blue()),
                &pool(0, Colour::Green, &green()),
                Colour::Blue,
            )
            .unwrap();
        fx.dp
            .remove_service_key(&service_key(SocketAddr::V4(vip), PROTO_TCP))
            .unwrap();
        assert_eq!(filter_word(&mut fx.dp, slot_of(vip)), 0);
        assert_eq!(
            filter_word(&mut fx.dp, slot_of(moved)),
            entry_of(moved, PROTO_TCP, 0)
        );
        let c2 = SocketAddrV4::new(CLIENT, 40202);
        let syn = frame(c2, vip, L4::Syn, 64, b"");
        assert_eq!(fx.run(&syn), (XDP_PASS, syn.clone()), "the old VIP passes");
        let (_, out) = fx.run(&frame(c2, moved, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(c2, moved, PROTO_TCP, &blue()));
    });
}

#[test]
fn open_flows_stay_on_blue_across_a_flip_while_new_flows_go_green() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let old = SocketAddrV4::new(CLIENT, 41000);
        let (_, out) = fx.run(&frame(old, vip, L4::Syn, 64, b""));
        let (_, before, _) = verify(&out);
        assert!(blue().contains(&SocketAddr::V4(before)));

        fx.dp.set_active(0, Colour::Green).unwrap();

        for l4 in [L4::Ack, L4::Ack, L4::Fin] {
            let (_, out) = fx.run(&frame(old, vip, l4, 64, b"GET / HTTP/1.1\r\n\r\n"));
            assert_eq!(verify(&out).1, before, "open flow must keep its backend");
        }
        for port in 42000..42020 {
            let c = SocketAddrV4::new(CLIENT, port);
            let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
            let dst = verify(&out).1;
            assert_eq!(dst, predicted(c, vip, PROTO_TCP, &green()));
        }
        // And back: rollback sends new flows to blue again, green flows stay.
        let g = SocketAddrV4::new(CLIENT, 42000);
        let green_backend = predicted(g, vip, PROTO_TCP, &green());
        fx.dp.set_active(0, Colour::Blue).unwrap();
        let (_, out) = fx.run(&frame(g, vip, L4::Ack, 64, b""));
        assert_eq!(verify(&out).1, green_backend);
        let st = fx.dp.colour_stats(0, Colour::Green).unwrap();
        assert_eq!(st.new_flows, 20);
    });
}

#[test]
fn non_syn_without_record_goes_to_the_active_colour_and_is_recorded() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        fx.dp.set_active(0, Colour::Green).unwrap();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = SocketAddrV4::new(CLIENT, 43000);
        let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b"data"));
        let first = verify(&out).1;
        assert_eq!(first, predicted(c, vip, PROTO_TCP, &green()));
        fx.dp.set_active(0, Colour::Blue).unwrap();
        let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b"more"));
        assert_eq!(verify(&out).1, first, "recorded on its first packet");
    });
}

/// A client's ACK acknowledging `ack` (`frame`'s ACKs acknowledge 1).
fn ack_frame(src: SocketAddrV4, dst: SocketAddrV4, ack: u32) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1000, 65535)
        .ack(ack)
        .write(&mut out, b"")
        .unwrap();
    out
}

#[test]
fn a_syn_waits_half_open_until_the_clients_ack_acknowledges_the_backends_syn_ack() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = SocketAddrV4::new(CLIENT, 43100);
        let b = predicted(c, vip, PROTO_TCP, &blue());
        let day = std::time::Duration::from_secs(86_400);
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, b);
        assert_eq!(counter(&fx.dp, "half_open"), 1);
        // Counted (it is a connection being opened on blue), not yet in FLOWS.
        assert_eq!(
            fx.dp.flow_counts(day, day).unwrap()[&(0, Colour::Blue)].live,
            1
        );
        // An ACK before any SYN-ACK, and after it one acknowledging the
        // wrong number (a blind guess): forwarded by the half-open record,
        // not promoted.
        let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b""));
        assert_eq!(verify(&out).1, b);
        let (_, out) = fx.run(&frame(b, c, L4::SynAck, 64, b""));
        assert_eq!(verify(&out).0, vip, "the SYN-ACK is rewritten back");
        fx.dp.set_active(0, Colour::Green).unwrap();
        let (_, out) = fx.run(&ack_frame(c, vip, 7));
        assert_eq!(
            verify(&out).1,
            b,
            "follows its half-open record across a flip"
        );
        assert_eq!(counter(&fx.dp, "promoted"), 0);
        // The ACK that acknowledges the SYN-ACK completes it.
        let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b""));
        assert_eq!(verify(&out).1, b);
        assert_eq!(counter(&fx.dp, "promoted"), 1);
        let hits = counter(&fx.dp, "flow_hits");
        let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b"data"));
        assert_eq!(verify(&out).1, b);
        assert_eq!(counter(&fx.dp, "flow_hits"), hits + 1);
        let blue = fx.dp.flow_counts(day, day).unwrap()[&(0, Colour::Blue)];
        assert_eq!((blue.recorded, blue.live), (1, 1), "one record, moved");
        assert_eq!(counter(&fx.dp, "record_missing"), 0);
    });
}

#[test]
fn a_connection_without_a_record_is_completed_only_once_its_backend_answers_other_than_rst() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = SocketAddrV4::new(CLIENT, 43200);
        let b = predicted(c, vip, PROTO_TCP, &blue());
        let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b"data"));
        assert_eq!(verify(&out).1, b);
        assert_eq!(counter(&fx.dp, "record_missing"), 1);
        assert_eq!(counter(&fx.dp, "half_open"), 1);
        // The backend resets it (a spoofed segment): never promoted.
        fx.run(&frame(b, c, L4::Rst, 64, b""));
        fx.run(&frame(c, vip, L4::Ack, 64, b""));
        assert_eq!(counter(&fx.dp, "promoted"), 0);
        // Another such connection, which its backend answers: promoted at
        // the client's next packet.
        let c2 = SocketAddrV4::new(CLIENT, 43201);
        let b2 = predicted(c2, vip, PROTO_TCP, &blue());
        fx.run(&frame(c2, vip, L4::Ack, 64, b"data"));
        fx.run(&frame(c2, vip, L4::Ack, 64, b""));
        assert_eq!(
            counter(&fx.dp, "promoted"),
            0,
            "not before the backend answered"
        );
        let (_, out) = fx.run(&frame(b2, c2, L4::Ack, 64, b"reply"));
        assert_eq!(verify(&out).0, vip);
        fx.run(&frame(c2, vip, L4::Ack, 64, b""));
        assert_eq!(counter(&fx.dp, "promoted"), 1);
        assert_eq!(counter(&fx.dp, "record_missing"), 2);
    });
}

#[test]
fn a_syn_flood_larger_than_the_tables_evicts_no_established_flow() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new(); // FLOWS 4096, HALF_OPEN 1024
        let vip = SocketAddrV4::new(VIP, 80);
        // 100 established connections on blue.
        let open: Vec<SocketAddrV4> = (0..100)
            .map(|i| SocketAddrV4::new(CLIENT, 30000 + i))
            .collect();
        for &c in &open {
            let b = predicted(c, vip, PROTO_TCP, &blue());
            fx.run(&frame(c, vip, L4::Syn, 64, b""));
            fx.run(&frame(b, c, L4::SynAck, 64, b""));
            fx.run(&frame(c, vip, L4::Ack, 64, b""));
        }
        assert_eq!(counter(&fx.dp, "promoted"), 100);
        fx.dp.set_active(0, Colour::Green).unwrap();
        // 20 000 SYNs from distinct spoofed sources (198.19.0.0/16): five
        // times the flow table, twenty times the half-open table.
        for i in 0..20_000u32 {
            let src =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 0)) + i);
            let c = SocketAddrV4::new(src, 1024 + (i % 50_000) as u16);
            let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
            assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, &green()));
        }
        assert_eq!(counter(&fx.dp, "half_open"), 100 + 20_000);
        assert_eq!(
            fx.dp.colour_stats(0, Colour::Green).unwrap().new_flows,
            20_000
        );
        // Every established connection still drains on blue, by its record.
        for &c in &open {
            let (_, out) = fx.run(&frame(c, vip, L4::Ack, 64, b"next request"));
            assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, &blue()));
        }
        assert_eq!(counter(&fx.dp, "record_missing"), 0);
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(
            fx.dp.flow_counts(day, day).unwrap()[&(0, Colour::Blue)].live,
            100
        );
    });
}

/// The half-open bucket of an IPv4 client → VIP 5-tuple, as the program
/// computes it (`bgswitch_common::half_open_bucket4` at `half_shift`).
fn half_open_bucket(c: SocketAddrV4, vip: SocketAddrV4, shift: u8) -> u32 {
    let key = bgswitch_common::FlowKey4 {
        src: u32::from_ne_bytes(c.ip().octets()),
        dst: u32::from_ne_bytes(vip.ip().octets()),
        sport: c.port().to_be(),
        dport: vip.port().to_be(),
        proto: PROTO_TCP,
        _pad0: 0,
        _pad1: 0,
    };
    bgswitch_common::half_open_bucket4(&key, u32::from(shift))
}

#[test]
fn half_open_records_share_two_way_buckets_and_a_lost_one_costs_its_flow_one_retransmitted_syn() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new(); // half-open: 1024 records, 512 buckets
        let shift = fx.dp.settings().unwrap().half_shift;
        assert_eq!(shift, 32 - 9, "512 buckets");
        let vip = SocketAddrV4::new(VIP, 80);
        // Three clients whose 5-tuples share one bucket.
        let first = SocketAddrV4::new(CLIENT, 40000);
        let bucket = half_open_bucket(first, vip, shift);
        let same: Vec<SocketAddrV4> = (40001..u16::MAX)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .filter(|c| half_open_bucket(*c, vip, shift) == bucket)
            .take(2)
            .collect();
        let (c1, c2, c3) = (first, same[0], same[1]);
        let day = std::time::Duration::from_secs(86_400);
        let half_live =
            |fx: &Fixture| fx.dp.flow_counts(day, day).unwrap()[&(0, Colour::Blue)].live;
        for c in [c1, c2] {
            fx.run(&frame(c, vip, L4::Syn, 64, b""));
        }
        assert_eq!(half_live(&fx), 2, "two ways: both held");
        // A third SYN of the bucket takes the older way, c1's.
        fx.run(&frame(c3, vip, L4::Syn, 64, b""));
        assert_eq!(half_live(&fx), 2);
        // c2's handshake completes by its record.
        let b2 = predicted(c2, vip, PROTO_TCP, &blue());
        let (_, out) = fx.run(&frame(b2, c2, L4::SynAck, 64, b""));
        assert_eq!(verify(&out).0, vip, "c2's SYN-ACK is rewritten back");
        fx.run(&frame(c2, vip, L4::Ack, 64, b""));
        assert_eq!(counter(&fx.dp, "promoted"), 1);
        // c1's record is gone: its backend's SYN-ACK is not translated
        // (the client will send its SYN again)...
        let b1 = predicted(c1, vip, PROTO_TCP, &blue());
        let (action, out) = fx.run(&frame(b1, c1, L4::SynAck, 64, b""));
        assert_eq!(action, XDP_PASS);
        assert_eq!(verify(&out).0, b1, "left as the backend sent it");
        // ... and its retransmitted SYN is recorded again (in the way c2's
        // promotion emptied), to the same backend, and completes.
        let (_, out) = fx.run(&frame(c1, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, b1);
        let (_, out) = fx.run(&frame(b1, c1, L4::SynAck, 64, b""));
        assert_eq!(verify(&out).0, vip);
        let (_, out) = fx.run(&frame(c1, vip, L4::Ack, 64, b""));
        assert_eq!(verify(&out).1, b1);
        assert_eq!(counter(&fx.dp, "promoted"), 2);
        // c3 still waits half open in the bucket; flushing the service
        // empties its way.
        let blue = fx.dp.flow_counts(day, day).unwrap()[&(0, Colour::Blue)];
        assert_eq!((blue.recorded, blue.live), (3, 3));
        assert_eq!(fx.dp.flush_service(0).unwrap(), 3);
        assert!(fx.dp.flow_counts(day, day).unwrap().is_empty());
    });
}

#[test]
fn a_syn_after_close_chooses_afresh_but_a_retransmitted_syn_does_not() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = SocketAddrV4::new(CLIENT, 44000);
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        let b = verify(&out).1;
        fx.dp.set_active(0, Colour::Green).unwrap();
        // Retransmitted SYN of the same, still open connection: same backend.
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, b);
        // The client resets; the port is reused for a new connection.
        fx.run(&frame(c, vip, L4::Rst, 64, b""));
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, &green()));
    });
}

#[test]
fn idle_flows_expire_on_the_data_planes_tick_clock() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        // The tick rate is measured at load; the clock advances at that rate.
        let hz = fx.dp.hz();
        assert!([100, 250, 300, 1000].contains(&hz), "HZ {hz}");
        let (j0, t0) = (fx.dp.jiffies().unwrap(), Instant::now());
        std::thread::sleep(Duration::from_millis(200));
        let (j1, dt) = (fx.dp.jiffies().unwrap(), t0.elapsed());
        let expect = dt.as_secs_f64() * hz as f64;
        assert!(
            ((j1 - j0) as f64 - expect).abs() <= 2.0,
            "{} ticks in {dt:?} at {hz} Hz",
            j1 - j0
        );

        let idle = Duration::from_millis(100);
        fx.dp.set_settings(idle, idle).unwrap();
        let udp_vip = SocketAddrV4::new(VIP, 53);
        let tcp_vip = SocketAddrV4::new(VIP, 80);
        let u = SocketAddrV4::new(CLIENT, 47000);
        let t = SocketAddrV4::new(CLIENT, 47001);
        let (_, out) = fx.run(&frame(u, udp_vip, L4::Udp, 64, b"a"));
        assert_eq!(verify(&out).1, v4("198.18.1.11:5353"));
        let (_, out) = fx.run(&frame(t, tcp_vip, L4::Syn, 64, b""));
        let tcp_blue = verify(&out).1;
        fx.dp.set_active(0, Colour::Green).unwrap();
        fx.dp.set_active(1, Colour::Green).unwrap();
        let live = |fx: &Fixture, id: u32| {
            fx.dp.flow_counts(idle, idle).unwrap()[&(id, Colour::Blue)].live
        };
        assert_eq!((live(&fx, 0), live(&fx, 1)), (1, 1));
        // Within the timeout both stay on blue.
        let (_, out) = fx.run(&frame(u, udp_vip, L4::Udp, 64, b"b"));
        assert_eq!(verify(&out).1, v4("198.18.1.11:5353"));
        // Idle past the timeout: not live any more; the next datagram, and a
        // SYN reusing the TCP 5-tuple, are chosen afresh (green).
        std::thread::sleep(idle * 3);
        assert_eq!((live(&fx, 0), live(&fx, 1)), (0, 0));
        let (_, out) = fx.run(&frame(u, udp_vip, L4::Udp, 64, b"c"));
        assert_eq!(verify(&out).1, v4("198.18.1.21:5353"));
        let (_, out) = fx.run(&frame(t, tcp_vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(t, tcp_vip, PROTO_TCP, &green()));
        assert_ne!(verify(&out).1, tcp_blue);
    });
}

#[test]
fn udp_rewrite_keeps_a_zero_checksum_zero_and_fixes_a_real_one() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 53);
        let c = SocketAddrV4::new(CLIENT, 45000);
        let backend = v4("198.18.1.11:5353");
        let input = frame(c, vip, L4::Udp, 64, b"query");
        let (action, out) = fx.run(&input);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame(c, backend, L4::Udp, 64, b"query"));
        verify(&out);
        // Same datagram with the checksum zeroed ("none"): stays zero.
        let mut zero = frame(SocketAddrV4::new(CLIENT, 45001), vip, L4::Udp, 64, b"q");
        zero[14 + 20 + 6] = 0;
        zero[14 + 20 + 7] = 0;
        let (_, out) = fx.run(&zero);
        assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
        assert_eq!(&out[30..34], &[198, 18, 1, 11]);
        // The reply is rewritten back.
        let (_, out) = fx.run(&frame(backend, c, L4::Udp, 64, b"answer"));
        assert_eq!(out, frame(vip, c, L4::Udp, 64, b"answer"));
    });
}

#[test]
fn ip_options_are_skipped_by_header_length() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let c = SocketAddrV4::new(CLIENT, 46000);
        let vip = SocketAddrV4::new(VIP, 80);
        let build = |dst: SocketAddrV4| {
            let mut h =
                Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT.octets(), dst.ip().octets()).unwrap();
            h.options = [1u8, 1, 1, 0][..].try_into().unwrap();
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
                .tcp(c.port(), dst.port(), 7, 1000)
                .syn()
                .write(&mut out, b"")
                .unwrap();
            out
        };
        let input = build(vip);
        assert_eq!(input[14] & 0x0f, 6, "IHL 6: four bytes of options");
        let (_, out) = fx.run(&input);
        let backend = predicted(c, vip, PROTO_TCP, &blue());
        assert_eq!(out, build(backend));
        assert_eq!(verify(&out).1, backend);
    });
}

#[test]
fn everything_that_is_not_a_vip_flow_passes_byte_for_byte() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let c = SocketAddrV4::new(CLIENT, 47000);
        let vip = SocketAddrV4::new(VIP, 80);
        let syn = frame(c, vip, L4::Syn, 64, b"");
        let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
        // ARP request.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&CLIENT.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&VIP.octets());
        cases.push(("arp".into(), arp));
        // IPv6 TCP to port 80 of an address that is no VIP (the program
        // parses IPv6: it passes as no service's).
        let mut v6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv6(
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
                64,
            )
            .tcp(47000, 80, 1, 100)
            .syn()
            .write(&mut v6, b"")
            .unwrap();
        cases.push(("ipv6".into(), v6));
        cases.push((
            "other port".into(),
            frame(c, SocketAddrV4::new(VIP, 81), L4::Syn, 64, b""),
        ));
        cases.push((
            "other address".into(),
            frame(c, v4("198.19.0.11:80"), L4::Syn, 64, b""),
        ));
        cases.push((
            "udp to the tcp service".into(),
            frame(c, vip, L4::Udp, 64, b"x"),
        ));
        cases.push((
            "tcp to the udp service".into(),
            frame(c, SocketAddrV4::new(VIP, 53), L4::Syn, 64, b""),
        ));
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv4(CLIENT.octets(), VIP.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut icmp, b"ping")
            .unwrap();
        cases.push(("icmp".into(), icmp));
        cases.push(("ttl 1".into(), frame(c, vip, L4::Syn, 1, b"")));
        cases.push(("ttl 0".into(), frame(c, vip, L4::Syn, 0, b"")));
        let mut mf = syn.clone();
        mf[20] |= 0x20; // more fragments
        cases.push(("first fragment".into(), mf));
        let mut off = syn.clone();
        off[21] = 0x10; // offset 16 * 8
        cases.push(("non-first fragment".into(), off));
        let mut ihl = syn.clone();
        ihl[14] = 0x44;
        cases.push(("ihl 4".into(), ihl));
        let mut ver = syn.clone();
        ver[14] = 0x65;
        cases.push(("version 6 in an IPv4 frame".into(), ver));
        let mut long = syn.clone();
        long[16] = 0x05; // total length 1280+ beyond the frame
        cases.push(("total length beyond frame".into(), long));
        let mut doff = syn.clone();
        doff[14 + 20 + 12] = 0x40; // data offset 4
        cases.push(("tcp data offset 4".into(), doff));
        let mut udp_len = frame(c, SocketAddrV4::new(VIP, 53), L4::Udp, 64, b"abc");
        udp_len[14 + 20 + 4] = 0x10; // udp length beyond the IP payload
        cases.push(("udp length beyond payload".into(), udp_len));
        for cut in 0..syn.len() {
            cases.push((format!("truncated at {cut}"), syn[..cut].to_vec()));
        }
        let before = fx.dp.global_stats().unwrap();
        for (what, input) in &cases {
            if input.len() < 14 {
                // The kernel refuses test-run frames shorter than an Ethernet header.
                continue;
            }
            let (action, out) = fx.run(input);
            assert_eq!(action, XDP_PASS, "{what}");
            assert_eq!(&out, input, "{what}: must pass untouched");
        }
        let after = fx.dp.global_stats().unwrap();
        let delta = |name: &str| {
            let get = |v: &Vec<(&str, u64)>| v.iter().find(|(n, _)| *n == name).unwrap().1;
            get(&after) - get(&before)
        };
        assert_eq!(delta("fragment"), 2);
        assert_eq!(delta("ttl_exceeded"), 2);
        assert_eq!(delta("pass_not_ip"), 1, "arp");
        assert_eq!(
            delta("pass_not_service"),
            6,
            "ipv6, other port, other address, udp to tcp, tcp to udp, icmp"
        );
        assert!(delta("malformed") >= 5 + 39, "{}", delta("malformed"));
        let st = fx.dp.colour_stats(0, Colour::Blue).unwrap();
        assert_eq!(
            st.packets, 0,
            "no untouched frame may count as service traffic"
        );
    });
}

#[test]
fn forwarding_sets_macs_and_ttl_and_picks_tx_redirect_or_stack() {
    in_scratch_ns(|ns| {
        // v0 faces the backends (198.18.1.0/24, neighbours known), v1 does not.
        let v0 = veth_v0(ns, &["198.18.1.1/24"]);
        neigh(ns, "198.18.1.11", "02:00:00:00:01:11");
        let v1 = bgswitch::dataplane::ifindex("v1").unwrap();
        let v0_mac = std::fs::read_to_string("/sys/class/net/v0/address");
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        // Find a client port whose flow goes to 198.18.1.11 (neighbour known).
        let c = (48000..49000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .unwrap();
        let (action, out, _) = fx
            .dp
            .test_run(&frame(c, vip, L4::Syn, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_TX, "egress = ingress: XDP_TX");
        assert_eq!(
            verify(&out),
            (c, v4("198.18.1.11:8080"), 63),
            "TTL decremented"
        );
        assert_eq!(
            &out[0..6],
            &[2, 0, 0, 0, 1, 0x11],
            "destination MAC of the neighbour"
        );
        // /sys is the host's view in this thread; compare with what ip says instead.
        let _ = v0_mac;
        let mac = bgswitch_tests::netns::mac_address(ns, "v0").unwrap();
        assert_eq!(&out[6..12], &mac, "source MAC of the egress interface");

        // Arriving on v1, leaving on v0: v0 not in TX_PORTS → to the stack, L2 untouched.
        let c2 = (49000..50000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .unwrap();
        let input = frame(c2, vip, L4::Syn, 64, b"");
        let (action, out, _) = fx.dp.test_run(&input, Some(v1), 1).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(verify(&out).2, 64, "TTL left to the stack");
        assert_eq!(&out[0..12], &input[0..12]);
        // With v0 in TX_PORTS the frame is redirected.
        fx.dp
            .add_port(v0, bgswitch::dataplane::AttachMode::Native)
            .unwrap();
        let (action, out, _) = fx
            .dp
            .test_run(&frame(c2, vip, L4::Ack, 64, b""), Some(v1), 1)
            .unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(verify(&out).2, 63);

        // No neighbour for 198.18.1.12: rewritten, passed to the stack to resolve.
        let c3 = (50000..51000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.12:8080"))
            .unwrap();
        let input = frame(c3, vip, L4::Syn, 64, b"");
        let (action, out, _) = fx.dp.test_run(&input, Some(v0), 1).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(verify(&out), (c3, v4("198.18.1.12:8080"), 64));
        let g = fx.dp.global_stats().unwrap();
        let get = |n: &str| g.iter().find(|(k, _)| *k == n).unwrap().1;
        assert_eq!(
            (
                get("xdp_tx"),
                get("redirect"),
                get("fib_no_neigh"),
                get("egress_unknown")
            ),
            (1, 1, 1, 1)
        );
    });
}

/// Collects the data plane's log messages (aya-log records).
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<(log::Level, String)>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

impl Collect {
    fn take(&self) -> Vec<(log::Level, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[test]
fn rare_events_reach_the_log_once_per_kind_and_second_across_cpus() {
    in_scratch_ns(|ns| {
        let v0 = veth_v0(ns, &["198.18.1.1/24"]);
        neigh(ns, "198.18.1.11", "02:00:00:00:01:11");
        let v1 = bgswitch::dataplane::ifindex("v1").unwrap();
        let mut fx = Fixture::new();
        let logs = Collect::default();
        let mut reader = fx.dp.kernel_log(logs.clone()).unwrap();
        let vip = SocketAddrV4::new(VIP, 80);
        let to_b11: Vec<SocketAddrV4> = (49000..51000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .filter(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .take(5)
            .collect();
        // Arriving on v1, leaving through v0, which bgswitch is not attached
        // to (TX_PORTS): five new flows, run on alternate CPUs (where there
        // are two), one message.
        for (i, c) in to_b11.iter().enumerate() {
            bgswitch_tests::pin_to_cpu(i);
            let (action, _, _) = fx
                .dp
                .test_run(&frame(*c, vip, L4::Syn, 64, b""), Some(v1), 1)
                .unwrap();
            assert_eq!(action, XDP_PASS);
        }
        reader.flush();
        let msgs = logs.take();
        let g = fx.dp.global_stats().unwrap();
        let get = |n: &str| g.iter().find(|(k, _)| *k == n).unwrap().1;
        assert_eq!(get("egress_unknown"), 5);
        assert_eq!(msgs.len(), 1, "one message: {msgs:?}");
        let egress = &msgs[0];
        assert_eq!(egress.0, log::Level::Warn);
        assert!(
            egress.1.contains("towards 198.18.1.11")
                && egress.1.contains(&format!("through ifindex {v0},"))
                && egress.1.contains("egress_unknown"),
            "{egress:?}"
        );
        // Within the second, more of the same stay counted, not logged.
        let c = to_b11[0];
        fx.dp
            .test_run(&frame(c, vip, L4::Ack, 64, b""), Some(v1), 1)
            .unwrap();
        reader.flush();
        assert_eq!(logs.take(), vec![]);
        println!("logged: {msgs:?}");
    });
}

/// Sets pool `index`'s size to 0 in `dp`'s `POOL_SIZES` map.
fn empty_pool(dp: &mut Dataplane, index: u32) {
    use aya::maps::{Array, Map, MapData};
    let id = dp.map_id(bgswitch_common::maps::POOL_SIZES).unwrap();
    let mut sizes: Array<_, u32> =
        Array::try_from(Map::Array(MapData::from_id(id).unwrap())).unwrap();
    sizes.set(index, 0, 0).unwrap();
}

/// Each kind of rare event's message, with the numbers it names, written
/// by the log program once the frame's verdict is known (`events.rs`): no
/// route (IPv4 and IPv6), an empty pool, a flow that could not be recorded
/// (IPv4 and IPv6; a data plane without settings has no half-open table).
/// The egress message is above. One event per packet: a second one on the
/// same path waits for the next packet (its gate stays open).
#[test]
fn every_rare_event_reaches_the_log_with_what_it_names() {
    in_scratch_ns(|_| {
        let vip = SocketAddrV4::new(VIP, 80);
        let c = SocketAddrV4::new(CLIENT, 40000);
        let backend = predicted(c, vip, PROTO_TCP, &blue());
        let contains = |msgs: &[(log::Level, String)], level, parts: &[&str]| {
            assert!(
                msgs.len() == 1
                    && msgs[0].0 == level
                    && parts.iter().all(|p| msgs[0].1.contains(p)),
                "one {level} message with {parts:?}: {msgs:?}"
            );
        };
        // No route in the scratch namespace. Service 4's active pool is
        // emptied behind the daemon's back (it never writes an empty pool:
        // the program's guard against a torn or foreign write).
        let mut fx = Fixture::new();
        let vip81 = SocketAddrV4::new(VIP, 81);
        fx.dp
            .write_service(
                4,
                service_key(SocketAddr::V4(vip81), PROTO_TCP),
                &pool(4, Colour::Blue, &blue()),
                &pool(4, Colour::Green, &green()),
                Colour::Blue,
            )
            .unwrap();
        let slot = bgswitch_common::control::slot(fx.dp.control_word(4), 0);
        empty_pool(&mut fx.dp, 4 * bgswitch_common::POOL_SLOTS + slot);
        let logs = Collect::default();
        let mut reader = fx.dp.kernel_log(logs.clone()).unwrap();
        let (action, _) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        assert_eq!(action, XDP_PASS);
        reader.flush();
        let towards = format!("no usable route towards {} ", backend.ip());
        contains(
            &logs.take(),
            log::Level::Warn,
            &[&towards, "(counter fib_other)"],
        );
        let (action, _) = fx.run(&frame(c, vip81, L4::Syn, 64, b""));
        assert_eq!(action, XDP_PASS);
        reader.flush();
        contains(
            &logs.take(),
            log::Level::Warn,
            &[
                "service 4 has no backend in its pool of colour 0",
                "no_backend",
            ],
        );

        // Without settings: no half-open table, so a SYN's record fails
        // (E2BIG). Its first SYN logs the missing route, the second the
        // record; IPv6 after the gates' interval.
        let mut dp = Fixture::without_settings(4096).dp;
        let vip6 = SocketAddrV6::new(VIP6, 80, 0, 0);
        dp.write_service(
            TCP6,
            service_key(SocketAddr::V6(vip6), PROTO_TCP),
            &pool(TCP6, Colour::Blue, &blue6()),
            &pool(TCP6, Colour::Green, &green6()),
            Colour::Blue,
        )
        .unwrap();
        let logs = Collect::default();
        let mut reader = dp.kernel_log(logs.clone()).unwrap();
        let mut run = |frame: &[u8]| {
            let (action, _, _) = dp.test_run(frame, None, 1).unwrap();
            assert_eq!(action, XDP_PASS);
            reader.flush();
            logs.take()
        };
        let syn = frame(c, vip, L4::Syn, 64, b"");
        contains(&run(&syn), log::Level::Warn, &[&towards]);
        let failed = format!(
            "a new flow to {} could not be recorded in the flow table (error -7)",
            backend.ip()
        );
        contains(
            &run(&syn),
            log::Level::Error,
            &[&failed, "flow_insert_failed"],
        );
        assert_eq!(run(&syn), vec![], "within the interval, counted only");
        // The gates' interval without settings: 1000 ticks.
        std::thread::sleep(Duration::from_millis(
            1000 * 1000 / Fixture::new().dp.hz() + 200,
        ));
        let c6 = SocketAddrV6::new(CLIENT6, 40000, 0, 0);
        let syn6 = frame6(c6, vip6, L4::Syn, 64, b"");
        let (_, out6) = Fixture::dual().run(&syn6);
        let backend6 = verify6(&out6).1;
        let towards6 = format!("no usable route towards {} ", backend6.ip());
        contains(
            &run(&syn6),
            log::Level::Warn,
            &[&towards6, "(counter fib_other)"],
        );
        let failed6 = format!(
            "a new flow to {} could not be recorded in the flow table (error -7)",
            backend6.ip()
        );
        contains(&run(&syn6), log::Level::Error, &[&failed6]);
    });
}

/// A noted event whose packet leaves without its verdict flushed (a new
/// flow that could not be recorded, too long for its next hop: the too-big
/// program takes it, and drops it) does not hold this CPU's slot: a later
/// packet's event, from the next tick on, is logged.
#[test]
fn an_event_left_by_a_too_big_answer_does_not_block_later_messages() {
    in_scratch_ns(|ns| {
        bgswitch_tests::pin_to_cpu(0);
        let v0 = veth_v0(ns, &["198.18.1.1/24"]);
        neigh(ns, "198.18.1.11", "02:00:00:00:01:11");
        neigh(ns, "198.18.1.12", "02:00:00:00:01:12");
        ip(&["-n", ns, "link", "set", "v0", "mtu", "1000"]).unwrap();
        // Without settings: no half-open table, so a SYN's record fails.
        let mut dp = Fixture::without_settings(4096).dp;
        let vip = SocketAddrV4::new(VIP, 80);
        // A second service whose backend has no route.
        let vip2 = SocketAddrV4::new(VIP, 81);
        let far: SocketAddr = "198.18.9.9:8080".parse().unwrap();
        dp.write_service(
            6,
            service_key(SocketAddr::V4(vip2), PROTO_TCP),
            &[backend_of(far, backend_stat_id(6, Colour::Blue, 0))],
            &[backend_of(far, backend_stat_id(6, Colour::Green, 0))],
            Colour::Blue,
        )
        .unwrap();
        let logs = Collect::default();
        let mut reader = dp.kernel_log(logs.clone()).unwrap();
        let c = SocketAddrV4::new(CLIENT, 40300);
        let (action, _, _) = dp
            .test_run(&frame(c, vip, L4::Syn, 64, &[0u8; 1200]), Some(v0), 1)
            .unwrap();
        assert_eq!(
            action, XDP_DROP,
            "no record to translate its error through: dropped, as a router would"
        );
        reader.flush();
        assert_eq!(logs.take(), vec![], "its event is left unflushed");
        std::thread::sleep(Duration::from_millis(20));
        let (action, _, _) = dp
            .test_run(&frame(c, vip2, L4::Syn, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_PASS);
        reader.flush();
        let msgs = logs.take();
        assert!(
            msgs.len() == 1 && msgs[0].1.contains("no usable route towards 198.18.9.9 "),
            "the later event's message: {msgs:?}"
        );
    });
}

#[test]
fn a_flows_next_hop_is_cached_and_follows_neighbour_and_mtu_changes() {
    in_scratch_ns(|ns| {
        let v0 = veth_v0(ns, &["198.18.1.1/24"]);
        let neigh = |mac: &str| neigh(ns, "198.18.1.11", mac);
        neigh("02:00:00:00:01:11");
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = (48000..49000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .unwrap();
        let lookups = |fx: &Fixture| {
            let g = fx.dp.global_stats().unwrap();
            g.iter().find(|(k, _)| *k == "fib_lookups").unwrap().1
        };
        let (action, out, _) = fx
            .dp
            .test_run(&frame(c, vip, L4::Syn, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, 0x11]);
        assert_eq!(
            lookups(&fx),
            1,
            "the flow's first packet looks up its next hop"
        );

        // Established packets use the hop kept in the flow entry: one lookup
        // per refresh + 1 ticks of traffic at most (bounded by the time
        // taken here).
        let tick_ns = 1_000_000_000 / fx.dp.hz();
        let refresh = fx.dp.refresh_ticks();
        let started = Instant::now();
        for _ in 0..200 {
            let (action, out, _) = fx
                .dp
                .test_run(&frame(c, vip, L4::Ack, 64, b""), Some(v0), 1)
                .unwrap();
            assert_eq!(action, XDP_TX);
            assert_eq!(verify(&out), (c, v4("198.18.1.11:8080"), 63));
            assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, 0x11]);
        }
        let ticks = started.elapsed().as_nanos() as u64 / tick_ns + 1;
        let refreshes = ticks / (refresh + 1) + 1;
        let extra = lookups(&fx) - 1;
        assert!(
            extra <= refreshes,
            "200 established packets made {extra} lookups (allowed: {refreshes})"
        );

        // Without a netlink watcher, a neighbour change reaches the open
        // flow at its next refresh.
        neigh("02:00:00:00:02:22");
        std::thread::sleep(Duration::from_nanos((refresh + 2) * tick_ns));
        let (action, out, _) = fx
            .dp
            .test_run(&frame(c, vip, L4::Ack, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 2, 0x22], "the new neighbour MAC");

        // A packet longer than the one the hop was looked up for is looked up
        // again, so the MTU check is never skipped: over the MTU without DF,
        // it goes to the stack (which fragments it); with DF, its sender
        // gets "fragmentation needed" (tests/tests/icmp.rs checks that frame
        // byte for byte).
        ip(&["-n", ns, "link", "set", "v0", "mtu", "1000"]).unwrap();
        let before = lookups(&fx);
        let big = without_df(frame(c, vip, L4::Ack, 64, &[0u8; 1200]));
        let (action, out, _) = fx.dp.test_run(&big, Some(v0), 1).unwrap();
        assert_eq!(action, XDP_PASS, "over the egress MTU: to the stack");
        assert_eq!(verify(&out).2, 64, "TTL left to the stack");
        assert_eq!(lookups(&fx), before + 1);
        let (_, out, _) = fx
            .dp
            .test_run(&frame(c, vip, L4::Ack, 64, &[0u8; 1200]), Some(v0), 1)
            .unwrap();
        assert!(is_frag_needed(&out, 1000), "with DF: fragmentation needed");
        // A small packet still fits and is transmitted.
        let (action, _, _) = fx
            .dp
            .test_run(&frame(c, vip, L4::Ack, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_TX);
    });
}

#[test]
fn route_and_neighbour_changes_reach_open_flows_at_once_through_netlink() {
    in_scratch_ns(|ns| {
        let v0 = veth_v0(ns, &["198.18.1.1/24"]);
        let neigh = |mac: &str| neigh(ns, "198.18.1.11", mac);
        neigh("02:00:00:00:01:11");
        let mut fx = Fixture::new();
        fx.dp.watch_kernel_changes().unwrap();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = (48000..49000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .unwrap();
        let mac_of = |fx: &mut Fixture, l4: L4| {
            let (action, out, _) = fx
                .dp
                .test_run(&frame(c, vip, l4, 64, b""), Some(v0), 1)
                .unwrap();
            assert_eq!(action, XDP_TX);
            out[0..6].to_vec()
        };
        assert_eq!(mac_of(&mut fx, L4::Syn), [2, 0, 0, 0, 1, 0x11]);
        assert_eq!(mac_of(&mut fx, L4::Ack), [2, 0, 0, 0, 1, 0x11]);
        // The change is heard over netlink and bumps the generation; the very
        // next packet looks the next hop up again (well before its refresh).
        let gen = fx.dp.flow_gen();
        let changed = Instant::now();
        neigh("02:00:00:00:02:22");
        while fx.dp.flow_gen() == gen {
            assert!(
                changed.elapsed() < Duration::from_secs(2),
                "no netlink event"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let seen = changed.elapsed();
        assert_eq!(mac_of(&mut fx, L4::Ack), [2, 0, 0, 0, 2, 0x22]);
        println!(
            "neighbour change reached the open flow {seen:?} after `ip neigh replace` (refresh: {} ms)",
            bgswitch_common::REFRESH_MS
        );
        // A neighbour that only changes state (REACHABLE, STALE, … as ARP
        // does all the time on a busy host) with the same address moves no
        // next hop: no bump, so the flow caches stay warm.
        let gen = fx.dp.flow_gen();
        for i in 0..40 {
            let state = ["probe", "delay", "reachable", "stale"][i % 4];
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                "198.18.1.11",
                "lladdr",
                "02:00:00:00:02:22",
                "dev",
                "v0",
                "nud",
                state,
            ])
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            fx.dp.flow_gen(),
            gen,
            "neighbour state changes with the same address bump nothing"
        );
        assert_eq!(mac_of(&mut fx, L4::Ack), [2, 0, 0, 0, 2, 0x22]);
        // A route change too: with the route gone, the flow's packets go to
        // the stack at once.
        let gen = fx.dp.flow_gen();
        ip(&["-n", ns, "addr", "del", "198.18.1.1/24", "dev", "v0"]).unwrap();
        while fx.dp.flow_gen() == gen {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (action, _, _) = fx
            .dp
            .test_run(&frame(c, vip, L4::Ack, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_PASS, "no route: to the stack");
    });
}

#[test]
fn established_packets_come_from_the_per_cpu_cache_and_a_flush_reaches_them() {
    in_scratch_ns(|ns| {
        // Clients' subnet too, so replies leave with XDP_TX and are cached.
        let v0 = veth_v0(ns, &["198.18.1.1/24", "198.18.0.1/24"]);
        for (addr, mac) in [
            ("198.18.1.11", "02:00:00:00:01:11"),
            ("198.18.1.12", "02:00:00:00:01:12"),
            ("198.18.1.21", "02:00:00:00:01:21"),
            ("198.18.1.22", "02:00:00:00:01:22"),
            ("198.18.0.2", "02:00:00:00:00:02"),
        ] {
            neigh(ns, addr, mac);
        }
        let mut fx = Fixture::new();
        let tick_ns = 1_000_000_000 / fx.dp.hz();
        let refresh = fx.dp.refresh_ticks();
        let vip = SocketAddrV4::new(VIP, 80);
        let counter = |fx: &Fixture, name: &str| {
            let g = fx.dp.global_stats().unwrap();
            g.iter().find(|(k, _)| *k == name).unwrap().1
        };
        let send = |fx: &mut Fixture, c: SocketAddrV4, l4: L4| {
            let (action, out, _) = fx
                .dp
                .test_run(&frame(c, vip, l4, 64, b""), Some(v0), 1)
                .unwrap();
            assert_eq!(action, XDP_TX);
            verify(&out).1
        };
        // The SYN fills this CPU's slot; the ACKs after it are served from it
        // (only a refresh every `refresh` + 1 ticks takes FLOWS again),
        // with the same decision and counters.
        let c = SocketAddrV4::new(CLIENT, 41000);
        let blue_backend = send(&mut fx, c, L4::Syn);
        assert_eq!(blue_backend, predicted(c, vip, PROTO_TCP, &blue()));
        fx.dp.set_active(0, Colour::Green).unwrap();
        let fills = counter(&fx, "flow_cache_fills");
        let hits = counter(&fx, "flow_hits");
        let started = Instant::now();
        for _ in 0..200 {
            assert_eq!(
                send(&mut fx, c, L4::Ack),
                blue_backend,
                "open flow stays on blue"
            );
        }
        let ticks = started.elapsed().as_nanos() as u64 / tick_ns + 1;
        let refills = counter(&fx, "flow_cache_fills") - fills;
        assert!(
            refills <= ticks / (refresh + 1) + 1,
            "200 packets took the FLOWS path {refills} times in {ticks} ticks"
        );
        assert_eq!(counter(&fx, "flow_hits") - hits, 200);

        // Flushing blue's flows (what a drain timeout does) reaches a flow
        // whose slot is fresh: its next packet is an orphan and goes to the
        // active colour, green.
        let mut fresh = false;
        for port in 41001..41011 {
            let c = SocketAddrV4::new(CLIENT, port);
            assert_eq!(
                send(&mut fx, c, L4::Syn),
                predicted(c, vip, PROTO_TCP, &green())
            );
            fx.dp.set_active(0, Colour::Blue).unwrap();
            let t = Instant::now();
            send(&mut fx, c, L4::Ack);
            assert!(fx.dp.flush_flows(0, Colour::Blue).unwrap() >= 1);
            let after = send(&mut fx, c, L4::Ack);
            fresh |= (t.elapsed().as_nanos() as u64) < tick_ns;
            assert_eq!(
                after,
                predicted(c, vip, PROTO_TCP, &blue()),
                "a flushed flow is not served from a stale cache slot"
            );
            if fresh {
                break;
            }
        }
        assert!(fresh, "never ran a flush within one tick of a cache fill");

        // A closed flow's 5-tuple reused by a SYN that cannot be forwarded
        // (longer than the MTU: to the stack) is still chosen afresh, and
        // its cached slot stops serving the old decision.
        let c = SocketAddrV4::new(CLIENT, 41100);
        let old = send(&mut fx, c, L4::Syn);
        assert_eq!(old, predicted(c, vip, PROTO_TCP, &blue()));
        send(&mut fx, c, L4::Ack);
        send(&mut fx, c, L4::Rst);
        fx.dp.set_active(0, Colour::Green).unwrap();
        ip(&["-n", ns, "link", "set", "v0", "mtu", "1000"]).unwrap();
        let (action, _, _) = fx
            .dp
            .test_run(
                &without_df(frame(c, vip, L4::Syn, 64, &[0u8; 1200])),
                Some(v0),
                1,
            )
            .unwrap();
        assert_eq!(action, XDP_PASS, "over the MTU: to the stack");
        assert_eq!(
            send(&mut fx, c, L4::Ack),
            predicted(c, vip, PROTO_TCP, &green()),
            "the reused 5-tuple follows its new record, not the cached old one"
        );
        ip(&["-n", ns, "link", "set", "v0", "mtu", "1500"]).unwrap();

        // Replies are cached too; once the flow's 5-tuple is reused on another
        // backend, the old backend's late packets are not rewritten any more.
        let reply = |fx: &mut Fixture, from: SocketAddrV4, to: SocketAddrV4, l4: L4| {
            fx.dp
                .test_run(&frame(from, to, l4, 64, b""), Some(v0), 1)
                .unwrap()
        };
        fx.dp.set_active(0, Colour::Blue).unwrap();
        let c = (41200..42000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| {
                predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080")
                    && predicted(*c, vip, PROTO_TCP, &green()) == v4("198.18.1.21:8080")
            })
            .unwrap();
        let (b1, b2) = (v4("198.18.1.11:8080"), v4("198.18.1.21:8080"));
        assert_eq!(send(&mut fx, c, L4::Syn), b1);
        let (action, out, _) = reply(&mut fx, b1, c, L4::SynAck);
        assert_eq!(action, XDP_TX);
        assert_eq!(verify(&out).0, vip, "reply rewritten to the VIP");
        let fills = counter(&fx, "flow_cache_fills");
        let (action, out, _) = reply(&mut fx, b1, c, L4::Ack);
        assert_eq!((action, verify(&out).0), (XDP_TX, vip));
        assert_eq!(
            counter(&fx, "flow_cache_fills"),
            fills,
            "served from the cache"
        );
        send(&mut fx, c, L4::Rst);
        fx.dp.set_active(0, Colour::Green).unwrap();
        assert_eq!(
            send(&mut fx, c, L4::Syn),
            b2,
            "the reused 5-tuple goes green"
        );
        let late = frame(b1, c, L4::Ack, 64, b"");
        let (action, out, _) = fx.dp.test_run(&late, Some(v0), 1).unwrap();
        assert_eq!(
            action, XDP_PASS,
            "the old backend's late packet is not the new flow's reply"
        );
        assert_eq!(out, late, "and passes untouched");
        let (action, out, _) = reply(&mut fx, b2, c, L4::SynAck);
        assert_eq!((action, verify(&out).0), (XDP_TX, vip));
    });
}

#[test]
fn preview_prefixes_and_canary_share_choose_the_idle_colour_for_new_flows_only() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let inside = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 52000);
        let outside = SocketAddrV4::new(Ipv4Addr::new(198, 18, 5, 5), 52000);
        // An open flow from the preview prefix, recorded before the prefix exists.
        let early = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 52001);
        let (_, out) = fx.run(&frame(early, vip, L4::Syn, 64, b""));
        assert!(blue().contains(&SocketAddr::V4(verify(&out).1)));
        fx.dp
            .set_preview(0, &[("198.18.0.0".parse().unwrap(), 24)])
            .unwrap();
        let (_, out) = fx.run(&frame(inside, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(inside, vip, PROTO_TCP, &green()));
        let (_, out) = fx.run(&frame(outside, vip, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(outside, vip, PROTO_TCP, &blue()));
        let (_, out) = fx.run(&frame(early, vip, L4::Ack, 64, b""));
        assert!(
            blue().contains(&SocketAddr::V4(verify(&out).1)),
            "open flow keeps its colour"
        );
        // Removing the prefix: new flows from it go blue again.
        fx.dp.set_preview(0, &[]).unwrap();
        let again = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 52002);
        let (_, out) = fx.run(&frame(again, vip, L4::Syn, 64, b""));
        assert!(blue().contains(&SocketAddr::V4(verify(&out).1)));

        // Canary: 100 % sends every new flow to the idle colour, 0 % none.
        fx.dp.set_canary(0, 10_000).unwrap();
        for p in 53000..53010 {
            let c = SocketAddrV4::new(CLIENT, p);
            let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
            assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, &green()));
        }
        fx.dp.set_canary(0, 0).unwrap();
        let c = SocketAddrV4::new(CLIENT, 53100);
        let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
        assert!(blue().contains(&SocketAddr::V4(verify(&out).1)));
        // An orphan (non-SYN without record) never takes the canary side.
        fx.dp.set_canary(0, 10_000).unwrap();
        let o = SocketAddrV4::new(CLIENT, 53200);
        let (_, out) = fx.run(&frame(o, vip, L4::Ack, 64, b""));
        assert!(blue().contains(&SocketAddr::V4(verify(&out).1)));
    });
}

#[test]
fn flow_counts_read_the_whole_table_in_batches() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::with_max_flows(16_384);
        let vip = SocketAddrV4::new(VIP, 80);
        // 5000 whole handshakes (SYN, the backend's SYN-ACK, the client's
        // ACK): 5000 entries in FLOWS, more than one 4096-entry batch; and
        // 300 SYNs alone, which wait in HALF_OPEN and are counted too.
        for p in 0..5300u16 {
            let c = SocketAddrV4::new(CLIENT, 20000 + p);
            fx.run(&frame(c, vip, L4::Syn, 64, b""));
            if p < 5000 {
                let b = predicted(c, vip, PROTO_TCP, &blue());
                fx.run(&frame(b, c, L4::SynAck, 64, b""));
                fx.run(&frame(c, vip, L4::Ack, 64, b""));
            }
        }
        assert_eq!(counter(&fx.dp, "half_open"), 5300);
        assert_eq!(counter(&fx.dp, "promoted"), 5000);
        // The 300 lone SYNs share 2048 two-way buckets: a third SYN of a
        // bucket takes the way written first (the completed handshakes'
        // ways were emptied by their promotion).
        let shift = fx.dp.settings().unwrap().half_shift;
        let mut buckets: std::collections::HashMap<u32, Vec<u16>> = Default::default();
        for p in 5000..5300u16 {
            let c = SocketAddrV4::new(CLIENT, 20000 + p);
            let b = buckets.entry(half_open_bucket(c, vip, shift)).or_default();
            b.push(p);
            if b.len() > 2 {
                b.remove(0);
            }
        }
        let held: u64 = buckets.values().map(|b| b.len() as u64).sum();
        assert!(held > 290, "{held} of 300 held");
        let day = std::time::Duration::from_secs(86_400);
        let counts = fx.dp.flow_counts(day, day).unwrap();
        let blue = counts[&(0, Colour::Blue)];
        assert_eq!(blue.recorded, 5000 + held);
        assert_eq!(blue.live, 5000 + held);
        assert!(!counts.contains_key(&(0, Colour::Green)));
        // Flushing uses the same reader, and empties both tables.
        assert_eq!(fx.dp.flush_flows(0, Colour::Green).unwrap(), 5000 + held);
        assert!(fx.dp.flow_counts(day, day).unwrap().is_empty());
    });
}

/// A global counter by name.
fn counter(dp: &Dataplane, name: &str) -> u64 {
    dp.global_stat(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

fn recorded(dp: &Dataplane) -> u64 {
    dp.flow_counts(Duration::from_secs(30), Duration::from_secs(3600))
        .unwrap()
        .values()
        .map(|c| c.recorded)
        .sum()
}

/// For the per-backend next-hop tests: this thread pinned to one CPU
/// (next hops are kept per CPU), v0 with both blue backends' neighbours,
/// and a fixture; returns v0's ifindex with it.
fn two_blue_neighbours(ns: &str) -> (u32, Fixture) {
    bgswitch_tests::pin_to_cpu(0);
    let v0 = veth_v0(ns, &["198.18.1.1/24"]);
    neigh(ns, "198.18.1.11", "02:00:00:00:01:11");
    neigh(ns, "198.18.1.12", "02:00:00:00:01:12");
    (v0, Fixture::new())
}

/// Reloads service 0 (TCP) with another address, 198.18.1.12:8081, in
/// blue's first position (whose counter and next-hop slots were
/// 198.18.1.11:8080's) and returns that pool.
fn reload_blue_moved(fx: &mut Fixture) -> Vec<SocketAddr> {
    let moved: Vec<SocketAddr> = vec![
        "198.18.1.12:8081".parse().unwrap(),
        "198.18.1.11:8080".parse().unwrap(),
    ];
    fx.dp
        .write_service(
            0,
            service_key(SocketAddr::V4(SocketAddrV4::new(VIP, 80)), PROTO_TCP),
            &pool(0, Colour::Blue, &moved),
            &pool(0, Colour::Green, &green()),
            Colour::Blue,
        )
        .unwrap();
    moved
}

/// Makes service 0 (TCP) stateless and starts its stable period.
fn stable(fx: &mut Fixture) {
    fx.dp.set_stateless(0, true);
    let w = fx.dp.control_word(0);
    fx.dp
        .end_transition(0, w)
        .unwrap()
        .expect("the transition ends");
    assert!(fx.dp.is_stateless(0));
}

#[test]
fn a_stateless_service_records_nothing_when_stable_and_keeps_connections_through_a_flip() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        stable(&mut fx);
        let vip = SocketAddrV4::new(VIP, 80);
        let clients: Vec<_> = (44000..44010)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .collect();
        // Stable: a SYN and the packets after it take the hash choice;
        // nothing is recorded.
        for c in &clients {
            for l4 in [L4::Syn, L4::Ack] {
                let (_, out) = fx.run(&frame(*c, vip, l4, 64, b"x"));
                assert_eq!(verify(&out).1, predicted(*c, vip, PROTO_TCP, &blue()));
            }
        }
        assert_eq!(recorded(&fx.dp), 0, "a stable period records nothing");
        assert_eq!(counter(&fx.dp, "stateless"), 20);
        assert_eq!(fx.dp.settings().unwrap().stateless, 1, "the check is on");
        assert_eq!(fx.dp.colour_stats(0, Colour::Blue).unwrap().new_flows, 10);
        // Replies come back from the VIP; a backend's packet to a client
        // whose 5-tuple hashes to another backend is not a reply of ours.
        let c = clients[0];
        let b = predicted(c, vip, PROTO_TCP, &blue());
        let (_, out) = fx.run(&frame(b, c, L4::Ack, 64, b"y"));
        assert_eq!(verify(&out).0, vip);
        let other = blue()
            .into_iter()
            .map(|a| match a {
                SocketAddr::V4(a) => a,
                SocketAddr::V6(_) => unreachable!(),
            })
            .find(|a| *a != b)
            .unwrap();
        let input = frame(other, c, L4::Ack, 64, b"y");
        let (action, out) = fx.run(&input);
        assert_eq!((action, &out), (XDP_PASS, &input), "untouched");

        // The flip: a transition. Connections of the stable period keep
        // blue (recorded at their next packet), new ones go green.
        fx.dp.set_active(0, Colour::Green).unwrap();
        assert!(!fx.dp.is_stateless(0));
        assert!(fx.dp.transition_since(0).is_some());
        assert_eq!(
            fx.dp.settings().unwrap().stateless,
            0,
            "no stable period left: TCP packets skip the check"
        );
        assert_eq!(fx.dp.untracked_colour(0), Some(Colour::Blue));
        // The backend speaks first: still the VIP's reply.
        let c9 = clients[9];
        let b9 = predicted(c9, vip, PROTO_TCP, &blue());
        let (_, out) = fx.run(&frame(b9, c9, L4::Ack, 64, b"push"));
        assert_eq!(verify(&out).0, vip);
        for c in &clients[..5] {
            let (_, out) = fx.run(&frame(*c, vip, L4::Ack, 64, b"x"));
            assert_eq!(verify(&out).1, predicted(*c, vip, PROTO_TCP, &blue()));
        }
        assert_eq!(counter(&fx.dp, "orphans"), 5);
        assert_eq!(recorded(&fx.dp), 5);
        let fresh: Vec<_> = (45000..45005)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .collect();
        for c in &fresh {
            for l4 in [L4::Syn, L4::Ack] {
                let (_, out) = fx.run(&frame(*c, vip, l4, 64, b"x"));
                assert_eq!(verify(&out).1, predicted(*c, vip, PROTO_TCP, &green()));
            }
        }
        // Recorded connections keep their backend through another change.
        fx.dp.set_active(0, Colour::Blue).unwrap();
        fx.dp.set_active(0, Colour::Green).unwrap();
        let (_, out) = fx.run(&frame(clients[0], vip, L4::Ack, 64, b"x"));
        assert_eq!(verify(&out).1, b);
        // The scan finds the five blue records disagreeing with the active
        // pool's choice; the green ones agree.
        let counts = fx
            .dp
            .flow_counts(Duration::from_secs(30), Duration::from_secs(3600))
            .unwrap();
        assert_eq!(counts[&(0, Colour::Blue)].disagreeing, 5);
        assert_eq!(counts[&(0, Colour::Green)].disagreeing, 0);
        // A transition ends only under the word its scan saw.
        let w = fx.dp.control_word(0);
        assert_eq!(fx.dp.end_transition(0, w ^ 1).unwrap(), None);
        // Ending it removes the records (nothing reads them when stable):
        // every packet takes green's hash choice then, new and old alike.
        assert_eq!(fx.dp.end_transition(0, w).unwrap(), Some(10));
        assert!(fx.dp.is_stateless(0));
        assert_eq!(recorded(&fx.dp), 0);
        for c in clients.iter().chain(&fresh) {
            let (_, out) = fx.run(&frame(*c, vip, L4::Ack, 64, b"x"));
            assert_eq!(verify(&out).1, predicted(*c, vip, PROTO_TCP, &green()));
        }
        assert_eq!(recorded(&fx.dp), 0);
        // `flip --force` during a transition: connections without a record
        // follow the active colour too.
        fx.dp.set_active(0, Colour::Blue).unwrap();
        fx.dp.flush_flows(0, Colour::Blue).unwrap();
        assert_eq!(fx.dp.transition_since(0), None);
        let (_, out) = fx.run(&frame(clients[1], vip, L4::Ack, 64, b"x"));
        assert_eq!(
            verify(&out).1,
            predicted(clients[1], vip, PROTO_TCP, &blue())
        );
    });
}

#[test]
fn a_pool_change_in_a_stable_period_moves_no_open_connection() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        stable(&mut fx);
        let vip = SocketAddrV4::new(VIP, 80);
        let pool = |addrs: &[SocketAddr], c: Colour| {
            addrs
                .iter()
                .enumerate()
                .map(|(i, a)| backend_of(*a, backend_stat_id(0, c, i as u32)))
                .collect::<Vec<_>>()
        };
        let key = service_key(SocketAddr::V4(vip), PROTO_TCP);
        // Connections of the stable period on both blue backends.
        let clients: Vec<_> = (46000..46040)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .collect();
        let before: Vec<_> = clients
            .iter()
            .map(|c| predicted(*c, vip, PROTO_TCP, &blue()))
            .collect();
        assert!(before.iter().any(|b| SocketAddr::V4(*b) == blue()[1]));
        // A health check takes the first blue backend out, then a third one
        // joins, then the first comes back: three pool changes, each a new
        // slot, while the stable period's pool stays the orphans' pool.
        let third: SocketAddr = "198.18.1.13:8080".parse().unwrap();
        let changes = [
            vec![blue()[1]],
            vec![blue()[1], third],
            vec![blue()[0], blue()[1], third],
        ];
        for (n, want) in changes.iter().enumerate() {
            let mut b = pool(want, Colour::Blue);
            // Keep each backend's own counter position.
            for (i, a) in want.iter().enumerate() {
                let pos = [blue()[0], blue()[1], third]
                    .iter()
                    .position(|x| x == a)
                    .unwrap();
                b[i].stat_id = backend_stat_id(0, Colour::Blue, pos as u32);
            }
            fx.dp
                .write_service(0, key, &b, &pool(&green(), Colour::Green), Colour::Blue)
                .unwrap();
            assert!(!fx.dp.is_stateless(0), "change {n} is a transition");
            for (c, b) in clients.iter().zip(&before) {
                let (_, out) = fx.run(&frame(*c, vip, L4::Ack, 64, b"x"));
                assert_eq!(
                    verify(&out).1,
                    *b,
                    "change {n}: an open connection keeps its backend"
                );
            }
            // New connections take the new pool.
            let c = SocketAddrV4::new(CLIENT, 47000 + n as u16);
            let (_, out) = fx.run(&frame(c, vip, L4::Syn, 64, b""));
            assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, want));
        }
        assert_eq!(
            counter(&fx.dp, "orphans"),
            40,
            "recorded at their first packet"
        );
    });
}

#[test]
fn a_stable_period_keeps_one_next_hop_and_rewrite_per_backend_for_all_its_clients() {
    in_scratch_ns(|ns| {
        let (v0, mut fx) = two_blue_neighbours(ns);
        stable(&mut fx);
        let vip = SocketAddrV4::new(VIP, 80);
        let run = |fx: &mut Fixture, c: SocketAddrV4, l4: L4, payload: &[u8]| {
            let (action, out, _) = fx
                .dp
                .test_run(&frame(c, vip, l4, 64, payload), Some(v0), 1)
                .unwrap();
            (action, out)
        };
        // Many clients, both backends: one FIB lookup per backend, then
        // the kept next hop and checksum deltas for every other packet,
        // every checksum right (`verify`) and every MAC the neighbour's.
        for (i, port) in (52000..52040).enumerate() {
            let c = SocketAddrV4::new(CLIENT, port);
            let b = predicted(c, vip, PROTO_TCP, &blue());
            let l4 = if i % 2 == 0 { L4::Syn } else { L4::Ack };
            let (action, out) = run(&mut fx, c, l4, b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(action, XDP_TX, "client {c}");
            assert_eq!(verify(&out), (c, b, 63), "client {c}");
            let last = if b == v4("198.18.1.11:8080") {
                0x11
            } else {
                0x12
            };
            assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, last], "client {c}");
        }
        assert_eq!(counter(&fx.dp, "fib_lookups"), 2, "one per backend");
        assert_eq!(counter(&fx.dp, "stateless"), 40);
        assert_eq!(recorded(&fx.dp), 0);
        // A neighbour's new MAC reaches the kept next hop (a generation).
        neigh(ns, "198.18.1.11", "02:00:00:00:02:11");
        fx.dp.bump_flow_gen();
        let c = (53000..54000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .unwrap();
        let (_, out) = run(&mut fx, c, L4::Ack, b"x");
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 2, 0x11]);
        // The same backend position with another address (a reload): the
        // kept deltas are not this rewrite's, so it is done afresh.
        let moved = reload_blue_moved(&mut fx);
        let w = fx.dp.control_word(0);
        fx.dp.end_transition(0, w).unwrap();
        for port in 54000..54020 {
            let c = SocketAddrV4::new(CLIENT, port);
            let (_, out) = run(&mut fx, c, L4::Ack, b"x");
            assert_eq!(verify(&out).1, predicted(c, vip, PROTO_TCP, &moved));
        }
    });
}

#[test]
fn table_new_flows_take_their_backends_kept_next_hop_of_their_program_type_while_rules_allow() {
    in_scratch_ns(|ns| {
        let (v0, mut fx) = two_blue_neighbours(ns);
        fx.dp.set_backend_hops(true).unwrap();
        assert_eq!(fx.dp.settings().unwrap().backend_hops, 1);
        // The TC program's first run loads it, which takes longer than a
        // next hop stays fresh: done here, before any hop is kept.
        let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 9), 80);
        fx.dp
            .test_run_tc(
                &frame(SocketAddrV4::new(CLIENT, 40000), other, L4::Syn, 64, b""),
                Some(v0),
                0,
                1,
            )
            .unwrap();
        let vip = SocketAddrV4::new(VIP, 80);
        let run = |fx: &mut Fixture, c: SocketAddrV4, payload: &[u8]| {
            let (action, out, _) = fx
                .dp
                .test_run(&frame(c, vip, L4::Syn, 64, payload), Some(v0), 1)
                .unwrap();
            assert_eq!(action, XDP_TX, "client {c}");
            out
        };
        let mac_of = |b: SocketAddrV4| if b.ip().octets()[3] == 11 { 0x11 } else { 0x12 };
        // Forty new flows to two backends: one FIB lookup per backend,
        // every rewrite right and every MAC its backend's neighbour's.
        let clients: Vec<_> = (52000..52040)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .collect();
        for &c in &clients {
            let b = predicted(c, vip, PROTO_TCP, &blue());
            let out = run(&mut fx, c, b"");
            assert_eq!(verify(&out), (c, b, 63), "client {c}");
            assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, mac_of(b)], "client {c}");
        }
        assert_eq!(counter(&fx.dp, "fib_lookups"), 2, "one per backend");
        // Each flow's record took a copy: its retransmitted SYN (which its
        // half-open record forwards) looks nothing up.
        for &c in &clients {
            let out = run(&mut fx, c, b"");
            assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, mac_of(verify(&out).1)]);
        }
        assert_eq!(counter(&fx.dp, "fib_lookups"), 2);
        // A packet longer than the one the hop was looked up for is looked
        // up again (the MTU check is never skipped).
        let to_11 = |ports: std::ops::Range<u16>| {
            ports
                .map(|p| SocketAddrV4::new(CLIENT, p))
                .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
                .unwrap()
        };
        run(&mut fx, to_11(53000..53500), &[0u8; 600]);
        assert_eq!(counter(&fx.dp, "fib_lookups"), 3);
        // A neighbour's new MAC reaches the kept hop (a generation).
        neigh(ns, "198.18.1.11", "02:00:00:00:02:11");
        fx.dp.bump_flow_gen();
        let out = run(&mut fx, to_11(53500..54000), b"");
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 2, 0x11]);
        assert_eq!(counter(&fx.dp, "fib_lookups"), 4);
        // Each program type uses the hops it looked up itself: the XDP
        // program cannot send to every interface the TC program may (one
        // only TC serves), and a frame it rewrote for such a hop would go
        // to the stack with another host's MAC.
        let tc_syn = |fx: &mut Fixture, c: SocketAddrV4| {
            let (verdict, out, _) = fx
                .dp
                .test_run_tc(&frame(c, vip, L4::Syn, 64, b""), Some(v0), 0, 1)
                .unwrap();
            assert_eq!(verdict, TC_ACT_REDIRECT, "client {c}");
            assert_eq!(&out[0..6], &[2, 0, 0, 0, 2, 0x11], "client {c}");
        };
        tc_syn(&mut fx, to_11(56000..56500));
        assert_eq!(counter(&fx.dp, "fib_lookups"), 5, "not XDP's hop");
        tc_syn(&mut fx, to_11(56500..57000));
        assert_eq!(counter(&fx.dp, "fib_lookups"), 5, "TC's own hop");
        run(&mut fx, to_11(57000..57500), b"");
        assert_eq!(counter(&fx.dp, "fib_lookups"), 6, "not TC's hop");
        run(&mut fx, to_11(57500..58000), b"");
        assert_eq!(counter(&fx.dp, "fib_lookups"), 6, "XDP's own hop");
        // The same backend position with another address (a reload): the
        // hop is another backend's, so the new flow looks its own up.
        let moved = reload_blue_moved(&mut fx);
        let c = (54000..54500)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &moved) == v4("198.18.1.12:8081"))
            .unwrap();
        let out = run(&mut fx, c, b"");
        assert_eq!(verify(&out).1, v4("198.18.1.12:8081"));
        assert_eq!(
            &out[0..6],
            &[2, 0, 0, 0, 1, 0x12],
            "the moved backend's neighbour"
        );
        // Off (a routing rule that selects on the client): every new flow
        // looks its own next hop up.
        fx.dp.set_backend_hops(false).unwrap();
        assert_eq!(fx.dp.settings().unwrap().backend_hops, 0);
        let before = counter(&fx.dp, "fib_lookups");
        for p in 55000..55010 {
            run(&mut fx, SocketAddrV4::new(CLIENT, p), b"");
        }
        assert_eq!(counter(&fx.dp, "fib_lookups"), before + 10);
    });
}

const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

#[test]
fn tc_checks_a_gso_packet_segment_by_segment_and_sends_unresolved_ones_to_the_neighbour_output() {
    in_scratch_ns(|ns| {
        let v0 = veth_v0(ns, &["198.18.1.1/24"]);
        neigh(ns, "198.18.1.11", "02:00:00:00:01:11");
        let mut fx = Fixture::new();
        let vip = SocketAddrV4::new(VIP, 80);
        let c = (48000..49000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.11:8080"))
            .unwrap();
        let (verdict, out, _) = fx
            .dp
            .test_run_tc(&frame(c, vip, L4::Syn, 64, b""), Some(v0), 0, 1)
            .unwrap();
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "sent out of the route's interface"
        );
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, 0x11], "the neighbour's MAC");
        assert_eq!(verify(&out), (c, v4("198.18.1.11:8080"), 63));
        // 3 000 bytes of payload in one socket buffer: as one packet it is
        // over the 1 500-byte MTU (without DF the stack's, which fragments
        // it; with DF answered with "fragmentation needed"); as a GSO packet
        // of 1 448-byte segments each fits.
        let big = frame(c, vip, L4::Ack, 64, &[0x5a; 3000]);
        let (verdict, out, _) = fx
            .dp
            .test_run_tc(&without_df(big.clone()), Some(v0), 0, 1)
            .unwrap();
        assert_eq!(verdict, TC_ACT_UNSPEC, "over the MTU: the stack's");
        assert_eq!(verify(&out).2, 64, "TTL left to the stack");
        let (_, out, _) = fx.dp.test_run_tc(&big, Some(v0), 0, 1).unwrap();
        assert!(is_frag_needed(&out, 1500), "with DF: fragmentation needed");
        let (verdict, out, _) = fx.dp.test_run_tc(&big, Some(v0), 1448, 1).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT, "each segment fits");
        assert_eq!(verify(&out), (c, v4("198.18.1.11:8080"), 63));
        let (verdict, out, _) = fx.dp.test_run_tc(&big, Some(v0), 1480, 1).unwrap();
        assert_eq!(
            verdict, TC_ACT_UNSPEC,
            "segments of 1480 + 40 bytes do not fit"
        );
        assert!(
            is_frag_needed(&out, 1500),
            "the GSO packet became one fragmentation-needed error"
        );
        // A backend whose neighbour is not resolved yet: TTL decremented,
        // MACs left to the kernel's neighbour output.
        let c2 = (48000..49000)
            .map(|p| SocketAddrV4::new(CLIENT, p))
            .find(|c| predicted(*c, vip, PROTO_TCP, &blue()) == v4("198.18.1.12:8080"))
            .unwrap();
        let syn = frame(c2, vip, L4::Syn, 64, b"");
        let (verdict, out, _) = fx.dp.test_run_tc(&syn, Some(v0), 0, 1).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT, "to the neighbour output");
        assert_eq!(&out[0..12], &syn[0..12], "MACs are the neighbour output's");
        assert_eq!(verify(&out), (c2, v4("198.18.1.12:8080"), 63));
    });
}

// ---------------------------------------------------------------------------
// IPv6: the same program on IPv6 frames, checked the same way (etherparse).

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x10);
/// Ids of the IPv6 services of [`Fixture::dual`].
const TCP6: u32 = 2;
const UDP6: u32 = 3;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

fn blue6() -> Vec<SocketAddr> {
    vec![
        "[2001:db8:18:1::11]:8080".parse().unwrap(),
        "[2001:db8:18:1::12]:8080".parse().unwrap(),
    ]
}
fn green6() -> Vec<SocketAddr> {
    vec![
        "[2001:db8:18:1::21]:8080".parse().unwrap(),
        "[2001:db8:18:1::22]:8080".parse().unwrap(),
    ]
}

/// A pool of service `id`'s colour `c`, as the daemon writes it.
fn pool(id: u32, c: Colour, addrs: &[SocketAddr]) -> Vec<bgswitch_common::Backend> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| backend_of(*a, backend_stat_id(id, c, i as u32)))
        .collect()
}

impl Fixture {
    /// [`Fixture::new`]'s IPv4 services and, beside them in the same
    /// program, a TCP service on [VIP6]:80 (id 2) and a UDP service on
    /// [VIP6]:53 (id 3).
    fn dual() -> Fixture {
        let mut fx = Fixture::new();
        fx.dp
            .write_service(
                TCP6,
                service_key(SocketAddr::V6(SocketAddrV6::new(VIP6, 80, 0, 0)), PROTO_TCP),
                &pool(TCP6, Colour::Blue, &blue6()),
                &pool(TCP6, Colour::Green, &green6()),
                Colour::Blue,
            )
            .expect("the data plane takes an IPv6 service");
        let ublue: Vec<SocketAddr> = vec!["[2001:db8:18:1::11]:5353".parse().unwrap()];
        let ugreen: Vec<SocketAddr> = vec!["[2001:db8:18:1::21]:5353".parse().unwrap()];
        fx.dp
            .write_service(
                UDP6,
                service_key(SocketAddr::V6(SocketAddrV6::new(VIP6, 53, 0, 0)), PROTO_UDP),
                &pool(UDP6, Colour::Blue, &ublue),
                &pool(UDP6, Colour::Green, &ugreen),
                Colour::Blue,
            )
            .unwrap();
        fx
    }
}

fn v6(a: &str) -> SocketAddrV6 {
    a.parse().unwrap()
}

/// An IPv6 extension header to splice in: its type and its bytes (the
/// next-header byte is filled in by [`frame6_ext`]).
#[derive(Clone)]
struct Ext {
    kind: u8,
    bytes: Vec<u8>,
}

/// Options filling `n` bytes: PadN options (Pad1 for a single byte).
fn padding(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while n > 0 {
        if n == 1 {
            out.push(0);
            n = 0;
            continue;
        }
        let mut k = n.min(257);
        if n - k == 1 {
            k -= 1;
        }
        out.push(1);
        out.push((k - 2) as u8);
        out.extend(std::iter::repeat_n(0, k - 2));
        n -= k;
    }
    out
}

/// A hop-by-hop (0) or destination options (60) header of `len` bytes (a
/// multiple of 8), holding padding only.
fn opts(kind: u8, len: usize) -> Ext {
    assert!(len >= 8 && len.is_multiple_of(8) && len <= 2048);
    let mut bytes = vec![0, (len / 8 - 1) as u8];
    bytes.extend(padding(len - 2));
    Ext { kind, bytes }
}

/// A routing header of `len` bytes, type 253 (experimental, RFC 4727),
/// with `segments_left` segments left.
fn routing(len: usize, segments_left: u8) -> Ext {
    assert!(len >= 8 && len.is_multiple_of(8));
    let mut bytes = vec![0, (len / 8 - 1) as u8, 253, segments_left];
    bytes.resize(len, 0);
    Ext {
        kind: IPV6_ROUTING,
        bytes,
    }
}

/// A fragment header: offset (in 8-byte units) and the more-fragments flag.
fn fragment(offset: u16, more: bool) -> Ext {
    let field = offset << 3 | u16::from(more);
    let mut bytes = vec![0, 0];
    bytes.extend_from_slice(&field.to_be_bytes());
    bytes.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    Ext {
        kind: IPV6_FRAGMENT,
        bytes,
    }
}

/// An IPv6 frame built by etherparse (its checksums).
fn frame6(src: SocketAddrV6, dst: SocketAddrV6, l4: L4, hop: u8, payload: &[u8]) -> Vec<u8> {
    frame6_ext(src, dst, l4, hop, &[], payload)
}

/// [`frame6`] with the extension headers `exts` spliced in between the
/// IPv6 header and TCP/UDP, chained by their next-header bytes, the payload
/// length grown by theirs. The L4 checksum stays right: its pseudo-header
/// holds the upper-layer length and the addresses, not the extension
/// headers (a routing header with segments left would change the final
/// destination; those built here have none unless a test says so).
fn frame6_ext(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    l4: L4,
    hop: u8,
    exts: &[Ext],
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(
        src.ip().octets(),
        dst.ip().octets(),
        hop,
    );
    let mut out = Vec::new();
    match l4 {
        L4::Udp => b
            .udp(src.port(), dst.port())
            .write(&mut out, payload)
            .unwrap(),
        _ => {
            // The client's sequence numbers start at 1000, the backend's
            // at 0: an ACK (acknowledging 1) completes the handshake a
            // SYN-ACK began.
            let seq = if l4 == L4::SynAck { 0 } else { 1000 };
            let t = b.tcp(src.port(), dst.port(), seq, 65535);
            let t = match l4 {
                L4::Syn => t.syn(),
                L4::SynAck => t.syn().ack(1001),
                L4::Ack => t.ack(1),
                L4::Fin => t.fin().ack(1),
                L4::Rst => t.rst(),
                L4::Udp => unreachable!(),
            };
            t.write(&mut out, payload).unwrap()
        }
    }
    if exts.is_empty() {
        return out;
    }
    let upper = out[14 + 6];
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let mut bytes = e.bytes.clone();
        bytes[0] = exts.get(i + 1).map_or(upper, |n| n.kind);
        chain.extend(bytes);
    }
    out[14 + 6] = exts[0].kind;
    let plen = usize::from(u16::from_be_bytes([out[18], out[19]])) + chain.len();
    out[18..20].copy_from_slice(&u16::try_from(plen).unwrap().to_be_bytes());
    out.splice(54..54, chain);
    out
}

/// Checks an IPv6 frame with etherparse: the payload length is the
/// frame's, the TCP/UDP checksum is right for the header's addresses;
/// returns (src, dst, hop limit).
fn verify6(frame: &[u8]) -> (SocketAddrV6, SocketAddrV6, u8) {
    let p = SlicedPacket::from_ethernet(frame).expect("output frame parses");
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6")
    };
    let h = ip.header();
    assert_eq!(
        usize::from(h.payload_length()),
        frame.len() - 54,
        "payload length"
    );
    let (src, dst) = (h.source(), h.destination());
    let (sp, dp) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.calc_checksum_ipv6(src, dst).unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u
                .to_header()
                .calc_checksum_ipv6_raw(src, dst, u.payload())
                .unwrap();
            assert_eq!(u.checksum(), want, "UDP checksum");
            (u.source_port(), u.destination_port())
        }
        _ => panic!("no TCP/UDP"),
    };
    (
        SocketAddrV6::new(src.into(), sp, 0, 0),
        SocketAddrV6::new(dst.into(), dp, 0, 0),
        h.hop_limit(),
    )
}

/// The backend the program must pick for a new IPv6 flow (the model's
/// flow hash, see [`predicted`]).
fn predicted6(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    proto: u8,
    pool: &[SocketAddr],
) -> SocketAddrV6 {
    let i = flowhash::backend_v6(
        src.ip().octets(),
        src.port(),
        dst.ip().octets(),
        dst.port(),
        proto,
        pool.len(),
    );
    match pool[i] {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(_) => unreachable!(),
    }
}

/// Global counters' changes since `before`.
fn deltas(dp: &Dataplane, before: &[(&'static str, u64)]) -> Vec<(&'static str, u64)> {
    let after = dp.global_stats().unwrap();
    after
        .iter()
        .map(|(n, v)| {
            let b = before.iter().find(|(m, _)| m == n).map_or(0, |(_, b)| *b);
            (*n, v - b)
        })
        .collect()
}

fn delta(d: &[(&'static str, u64)], name: &str) -> u64 {
    d.iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn v6_syn_to_a_v6_vip_is_rewritten_to_the_predicted_backend_and_the_reply_back() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let client = SocketAddrV6::new(CLIENT6, 40000, 0, 0);
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let input = frame6(client, vip, L4::Syn, 64, b"");
        let (action, out) = fx.run(&input);
        // IPv6 forwarding is off in the scratch namespace: the rewritten
        // frame goes to the stack, its hop limit left to the stack.
        assert_eq!(action, XDP_PASS);
        let backend = predicted6(client, vip, PROTO_TCP, &blue6());
        assert_eq!(
            out,
            frame6(client, backend, L4::Syn, 64, b""),
            "exactly the input with the destination rewritten"
        );
        assert_eq!(verify6(&out), (client, backend, 64));
        let st = fx.dp.colour_stats(TCP6, Colour::Blue).unwrap();
        assert_eq!((st.packets, st.new_flows), (1, 1));
        let g = fx.dp.colour_stats(TCP6, Colour::Green).unwrap();
        assert_eq!((g.packets, g.new_flows), (0, 0));
        let v4 = fx.dp.colour_stats(0, Colour::Blue).unwrap();
        assert_eq!(v4.packets, 0, "nothing counted on the IPv4 service");

        // The flow's next packets follow it, with data.
        let (_, out) = fx.run(&frame6(client, vip, L4::Ack, 64, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(
            out,
            frame6(client, backend, L4::Ack, 64, b"GET / HTTP/1.1\r\n\r\n")
        );

        // The backend answers the client: back to the VIP.
        let (action, out) = fx.run(&frame6(backend, client, L4::SynAck, 64, b""));
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame6(vip, client, L4::SynAck, 64, b""));
        assert_eq!(verify6(&out), (vip, client, 64));
        let st = fx.dp.colour_stats(TCP6, Colour::Blue).unwrap();
        assert_eq!((st.reply_packets, st.syn_acks), (1, 1));

        // From the same backend to another client port: no reply of ours.
        let stranger = frame6(
            backend,
            SocketAddrV6::new(CLIENT6, 40999, 0, 0),
            L4::Ack,
            64,
            b"x",
        );
        assert_eq!(fx.run(&stranger), (XDP_PASS, stranger.clone()));
        // From the other blue backend for this flow: not the flow's backend.
        let other = blue6()
            .into_iter()
            .map(|a| match a {
                SocketAddr::V6(a) => a,
                SocketAddr::V4(_) => unreachable!(),
            })
            .find(|a| *a != backend)
            .unwrap();
        let wrong = frame6(other, client, L4::Ack, 64, b"y");
        assert_eq!(fx.run(&wrong), (XDP_PASS, wrong.clone()));
    });
}

#[test]
fn v6_new_flows_spread_over_the_pool_as_the_model_predicts() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let mut seen = std::collections::BTreeSet::new();
        for port in 41000..41064 {
            let c = SocketAddrV6::new(CLIENT6, port, 0, 0);
            let (_, out) = fx.run(&frame6(c, vip, L4::Syn, 64, b""));
            let backend = predicted6(c, vip, PROTO_TCP, &blue6());
            assert_eq!(verify6(&out), (c, backend, 64), "client port {port}");
            seen.insert(backend);
        }
        assert_eq!(seen.len(), 2, "both blue backends chosen: {seen:?}");
        // A flip: open flows stay, new ones go green.
        fx.dp.set_active(TCP6, Colour::Green).unwrap();
        let old = SocketAddrV6::new(CLIENT6, 41000, 0, 0);
        let (_, out) = fx.run(&frame6(old, vip, L4::Ack, 64, b"more"));
        assert_eq!(verify6(&out).1, predicted6(old, vip, PROTO_TCP, &blue6()));
        let new = SocketAddrV6::new(CLIENT6, 41100, 0, 0);
        let (_, out) = fx.run(&frame6(new, vip, L4::Syn, 64, b""));
        assert_eq!(verify6(&out).1, predicted6(new, vip, PROTO_TCP, &green6()));
    });
}

#[test]
fn v6_udp_is_rewritten_both_ways_with_a_right_checksum() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let vip = SocketAddrV6::new(VIP6, 53, 0, 0);
        let c = SocketAddrV6::new(CLIENT6, 45000, 0, 0);
        let backend = v6("[2001:db8:18:1::11]:5353");
        let (action, out) = fx.run(&frame6(c, vip, L4::Udp, 64, b"query"));
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame6(c, backend, L4::Udp, 64, b"query"));
        assert_eq!(verify6(&out), (c, backend, 64));
        let (_, out) = fx.run(&frame6(backend, c, L4::Udp, 64, b"answer"));
        assert_eq!(out, frame6(vip, c, L4::Udp, 64, b"answer"));
        assert_eq!(verify6(&out), (vip, c, 64));
        // An odd-length payload (the checksum's last word padded).
        let c2 = SocketAddrV6::new(CLIENT6, 45001, 0, 0);
        let (_, out) = fx.run(&frame6(c2, vip, L4::Udp, 64, b"abc"));
        assert_eq!(out, frame6(c2, backend, L4::Udp, 64, b"abc"));
        let st = fx.dp.colour_stats(UDP6, Colour::Blue).unwrap();
        assert_eq!((st.packets, st.new_flows, st.reply_packets), (2, 2, 1));
    });
}

/// A veth pair like [`veth_v0`]'s with IPv6 addresses on v0 (no duplicate
/// address detection) and IPv6 forwarding on; returns v0's ifindex.
fn veth_v0_v6(ns: &str, addrs: &[&str]) -> u32 {
    let v0 = veth_v0(ns, &[]);
    for a in addrs {
        ip(&["-n", ns, "-6", "addr", "add", a, "dev", "v0", "nodad"]).unwrap();
    }
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
    v0
}

#[test]
fn v6_forwarding_decrements_the_hop_limit_sets_the_macs_and_leaves_hop_limit_1_to_the_stack() {
    in_scratch_ns(|ns| {
        let v0 = veth_v0_v6(ns, &["2001:db8:18:1::1/64", "2001:db8:18::1/64"]);
        neigh(ns, "2001:db8:18:1::11", "02:00:00:00:01:11");
        neigh(ns, "2001:db8:18::2", "02:00:00:00:00:02");
        let mut fx = Fixture::dual();
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let b11 = v6("[2001:db8:18:1::11]:8080");
        let c = (48000..49000)
            .map(|p| SocketAddrV6::new(CLIENT6, p, 0, 0))
            .find(|c| predicted6(*c, vip, PROTO_TCP, &blue6()) == b11)
            .unwrap();
        let input = frame6(c, vip, L4::Syn, 64, b"");
        let (action, out, _) = fx.dp.test_run(&input, Some(v0), 1).unwrap();
        assert_eq!(action, XDP_TX, "egress = ingress: XDP_TX");
        assert_eq!(verify6(&out), (c, b11, 63), "hop limit decremented");
        let mac = bgswitch_tests::netns::mac_address(ns, "v0").unwrap();
        let mut want = frame6(c, b11, L4::Syn, 63, b"");
        want[0..6].copy_from_slice(&[2, 0, 0, 0, 1, 0x11]);
        want[6..12].copy_from_slice(&mac);
        assert_eq!(out, want, "addresses, hop limit and MACs: nothing else");

        // The reply goes back out towards the client, from the VIP.
        let (action, out, _) = fx
            .dp
            .test_run(&frame6(b11, c, L4::SynAck, 64, b""), Some(v0), 1)
            .unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(verify6(&out), (vip, c, 63));
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 2]);

        // Hop limit 2 leaves with 1; hop limit 1 and 0 go to the stack
        // untouched (it answers with time exceeded).
        let (action, out, _) = fx
            .dp
            .test_run(&frame6(c, vip, L4::Ack, 2, b""), Some(v0), 1)
            .unwrap();
        assert_eq!((action, verify6(&out)), (XDP_TX, (c, b11, 1)));
        let before = fx.dp.global_stats().unwrap();
        for hop in [1, 0] {
            let input = frame6(c, vip, L4::Ack, hop, b"");
            let (action, out, _) = fx.dp.test_run(&input, Some(v0), 1).unwrap();
            assert_eq!((action, &out), (XDP_PASS, &input), "hop limit {hop}");
            let input = frame6(
                SocketAddrV6::new(CLIENT6, 47999, 0, 0),
                vip,
                L4::Syn,
                hop,
                b"",
            );
            let (action, out, _) = fx.dp.test_run(&input, Some(v0), 1).unwrap();
            assert_eq!(
                (action, &out),
                (XDP_PASS, &input),
                "new flow, hop limit {hop}"
            );
        }
        let d = deltas(&fx.dp, &before);
        assert_eq!(delta(&d, "ttl_exceeded"), 4);

        // No neighbour for ::12: rewritten, to the stack to resolve it.
        let b12 = v6("[2001:db8:18:1::12]:8080");
        let c3 = (50000..51000)
            .map(|p| SocketAddrV6::new(CLIENT6, p, 0, 0))
            .find(|c| predicted6(*c, vip, PROTO_TCP, &blue6()) == b12)
            .unwrap();
        let input = frame6(c3, vip, L4::Syn, 64, b"");
        let (action, out, _) = fx.dp.test_run(&input, Some(v0), 1).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame6(c3, b12, L4::Syn, 64, b""));
        let g = fx.dp.global_stats().unwrap();
        let get = |n: &str| g.iter().find(|(k, _)| *k == n).unwrap().1;
        assert_eq!((get("xdp_tx"), get("fib_no_neigh")), (3, 1));
    });
}

#[test]
fn v6_established_packets_come_from_the_per_cpu_cache_rewritten_with_right_checksums() {
    in_scratch_ns(|ns| {
        let v0 = veth_v0_v6(ns, &["2001:db8:18:1::1/64", "2001:db8:18::1/64"]);
        neigh(ns, "2001:db8:18:1::11", "02:00:00:00:01:11");
        neigh(ns, "2001:db8:18::2", "02:00:00:00:00:02");
        let mut fx = Fixture::dual();
        let fills = |fx: &Fixture| counter(&fx.dp, "flow_cache_fills");
        let mac = bgswitch_tests::netns::mac_address(ns, "v0").unwrap();
        let expect = |src, dst, l4, payload: &[u8], to: [u8; 6]| {
            let mut want = frame6(src, dst, l4, 63, payload);
            want[0..6].copy_from_slice(&to);
            want[6..12].copy_from_slice(&mac);
            want
        };
        let (to_backend, to_client) = ([2, 0, 0, 0, 1, 0x11], [2, 0, 0, 0, 0, 2]);
        // TCP: port 80 to 8080, every address word changed (the cached
        // rewrite applies the slot's one checksum delta for all of it).
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let b11 = v6("[2001:db8:18:1::11]:8080");
        let c = (52000..53000)
            .map(|p| SocketAddrV6::new(CLIENT6, p, 0, 0))
            .find(|c| predicted6(*c, vip, PROTO_TCP, &blue6()) == b11)
            .unwrap();
        let send = |fx: &mut Fixture, src, dst, l4, payload: &[u8]| {
            let (action, out, _) = fx
                .dp
                .test_run(&frame6(src, dst, l4, 64, payload), Some(v0), 1)
                .unwrap();
            assert_eq!(action, XDP_TX);
            verify6(&out);
            out
        };
        // The slots keep the next hop's length limit from the packet that
        // looked it up: the longest first.
        send(&mut fx, c, vip, L4::Syn, b"");
        send(&mut fx, b11, c, L4::SynAck, b"");
        send(&mut fx, c, vip, L4::Ack, &[0xff; 301]);
        send(&mut fx, b11, c, L4::Ack, &[0xff; 301]);
        let before = fills(&fx);
        for (i, payload) in [&b"GET / HTTP/1.1"[..], b"odd", b"", &[0xff; 301]]
            .into_iter()
            .enumerate()
        {
            let out = send(&mut fx, c, vip, L4::Ack, payload);
            assert_eq!(
                out,
                expect(c, b11, L4::Ack, payload, to_backend),
                "request {i}"
            );
            let out = send(&mut fx, b11, c, L4::Ack, payload);
            assert_eq!(
                out,
                expect(vip, c, L4::Ack, payload, to_client),
                "answer {i}"
            );
        }
        assert_eq!(fills(&fx), before, "all served from the cache");

        // UDP both ways, 53 to 5353.
        let uvip = SocketAddrV6::new(VIP6, 53, 0, 0);
        let u11 = v6("[2001:db8:18:1::11]:5353");
        let uc = SocketAddrV6::new(CLIENT6, 45100, 0, 0);
        send(&mut fx, uc, uvip, L4::Udp, b"query");
        send(&mut fx, u11, uc, L4::Udp, b"query");
        let before = fills(&fx);
        for payload in [&b"query"[..], b"abc"] {
            let out = send(&mut fx, uc, uvip, L4::Udp, payload);
            assert_eq!(out, expect(uc, u11, L4::Udp, payload, to_backend));
            let out = send(&mut fx, u11, uc, L4::Udp, payload);
            assert_eq!(out, expect(uvip, uc, L4::Udp, payload, to_client));
        }
        assert_eq!(fills(&fx), before, "UDP served from the cache too");
    });
}

#[test]
fn v6_extension_headers_are_walked_and_the_flow_still_rewritten() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let uvip = SocketAddrV6::new(VIP6, 53, 0, 0);
        let chains: Vec<(&str, Vec<Ext>)> = vec![
            ("hop-by-hop", vec![opts(IPV6_HOP_BY_HOP, 8)]),
            ("destination options", vec![opts(IPV6_DEST_OPTS, 16)]),
            ("routing, no segments left", vec![routing(24, 0)]),
            (
                "hop-by-hop, destination options, routing",
                vec![
                    opts(IPV6_HOP_BY_HOP, 8),
                    opts(IPV6_DEST_OPTS, 8),
                    routing(8, 0),
                ],
            ),
            (
                "four headers (the most walked)",
                vec![
                    opts(IPV6_HOP_BY_HOP, 8),
                    opts(IPV6_DEST_OPTS, 8),
                    routing(8, 0),
                    opts(IPV6_DEST_OPTS, 8),
                ],
            ),
            (
                "256 bytes of headers (the most walked)",
                vec![opts(IPV6_HOP_BY_HOP, 256)],
            ),
            (
                "256 bytes in three headers",
                vec![
                    opts(IPV6_HOP_BY_HOP, 128),
                    opts(IPV6_DEST_OPTS, 120),
                    routing(8, 0),
                ],
            ),
        ];
        for (i, (what, chain)) in chains.iter().enumerate() {
            let c = SocketAddrV6::new(CLIENT6, 46000 + i as u16, 0, 0);
            let backend = predicted6(c, vip, PROTO_TCP, &blue6());
            let input = frame6_ext(c, vip, L4::Syn, 64, chain, b"");
            let (action, out) = fx.run(&input);
            assert_eq!(action, XDP_PASS, "{what}");
            assert_eq!(
                out,
                frame6_ext(c, backend, L4::Syn, 64, chain, b""),
                "{what}: the destination rewritten, the headers kept"
            );
            // etherparse follows a chain of one of each kind, in order.
            if chain.len() <= 3 && !what.starts_with("256 bytes in") {
                assert_eq!(verify6(&out), (c, backend, 64), "{what}");
            }
            // Data, and the reply with the same headers.
            let (_, out) = fx.run(&frame6_ext(c, vip, L4::Ack, 64, chain, b"data"));
            assert_eq!(
                out,
                frame6_ext(c, backend, L4::Ack, 64, chain, b"data"),
                "{what}"
            );
            let (action, out) = fx.run(&frame6_ext(backend, c, L4::Ack, 64, chain, b"ok"));
            assert_eq!(action, XDP_PASS);
            assert_eq!(
                out,
                frame6_ext(vip, c, L4::Ack, 64, chain, b"ok"),
                "{what}: reply"
            );
            // UDP behind the same headers.
            let u = SocketAddrV6::new(CLIENT6, 46100 + i as u16, 0, 0);
            let ub = v6("[2001:db8:18:1::11]:5353");
            let (_, out) = fx.run(&frame6_ext(u, uvip, L4::Udp, 64, chain, b"q"));
            assert_eq!(
                out,
                frame6_ext(u, ub, L4::Udp, 64, chain, b"q"),
                "{what}: UDP"
            );
        }
        // Ethernet padding after the IPv6 packet (the payload length is
        // shorter than the frame): the packet is rewritten, the padding kept.
        let c = SocketAddrV6::new(CLIENT6, 46050, 0, 0);
        let backend = predicted6(c, vip, PROTO_TCP, &blue6());
        let mut input = frame6(c, vip, L4::Syn, 64, b"");
        input.extend_from_slice(&[0xee; 6]);
        let (_, out) = fx.run(&input);
        let mut want = frame6(c, backend, L4::Syn, 64, b"");
        want.extend_from_slice(&[0xee; 6]);
        assert_eq!(out, want, "padding after the packet");
    });
}

#[test]
fn v6_frames_that_are_not_ours_pass_byte_for_byte() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let c = SocketAddrV6::new(CLIENT6, 47000, 0, 0);
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let uvip = SocketAddrV6::new(VIP6, 53, 0, 0);
        let syn = frame6(c, vip, L4::Syn, 64, b"");
        // (what, frame, the counter it must count in)
        let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
        let mut case = |what: &str, frame: Vec<u8>, counter: &'static str| {
            cases.push((what.to_owned(), frame, counter));
        };
        case(
            "other port",
            frame6(c, SocketAddrV6::new(VIP6, 81, 0, 0), L4::Syn, 64, b""),
            "pass_not_service",
        );
        case(
            "other address",
            frame6(c, v6("[2001:db8:19::11]:80"), L4::Syn, 64, b""),
            "pass_not_service",
        );
        case(
            "the IPv4 VIP's bytes as an IPv6 address",
            frame6(c, v6("[::c613:a]:80"), L4::Syn, 64, b""),
            "pass_not_service",
        );
        case(
            "udp to the tcp service",
            frame6(c, vip, L4::Udp, 64, b"x"),
            "pass_not_service",
        );
        case(
            "tcp to the udp service",
            frame6(c, uvip, L4::Syn, 64, b""),
            "pass_not_service",
        );
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv6(CLIENT6.octets(), VIP6.octets(), 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        case("icmpv6 echo to the VIP", echo, "pass_not_service");
        case(
            "hop limit 1",
            frame6(c, vip, L4::Syn, 1, b""),
            "ttl_exceeded",
        );
        case(
            "hop limit 0",
            frame6(c, vip, L4::Syn, 0, b""),
            "ttl_exceeded",
        );
        case(
            "first fragment",
            frame6_ext(c, vip, L4::Syn, 64, &[fragment(0, true)], b""),
            "fragment",
        );
        case(
            "non-first fragment behind hop-by-hop",
            frame6_ext(
                c,
                vip,
                L4::Syn,
                64,
                &[opts(IPV6_HOP_BY_HOP, 8), fragment(2, false)],
                b"",
            ),
            "fragment",
        );
        case(
            "atomic fragment (offset 0, no more fragments)",
            frame6_ext(c, vip, L4::Syn, 64, &[fragment(0, false)], b""),
            "fragment",
        );
        for (kind, name) in [
            (59u8, "no next header"),
            (51, "AH"),
            (135, "mobility"),
            (253, "experimental"),
        ] {
            let mut unknown = routing(8, 0);
            unknown.kind = kind;
            case(
                &format!("{name} header ({kind})"),
                frame6_ext(c, vip, L4::Syn, 64, &[unknown.clone()], b""),
                "pass_not_service",
            );
            case(
                &format!("{name} header ({kind}) behind destination options"),
                frame6_ext(
                    c,
                    vip,
                    L4::Syn,
                    64,
                    &[opts(IPV6_DEST_OPTS, 8), unknown],
                    b"",
                ),
                "pass_not_service",
            );
        }
        case(
            "five extension headers",
            frame6_ext(
                c,
                vip,
                L4::Syn,
                64,
                &[
                    opts(IPV6_HOP_BY_HOP, 8),
                    opts(IPV6_DEST_OPTS, 8),
                    routing(8, 0),
                    opts(IPV6_DEST_OPTS, 8),
                    opts(IPV6_DEST_OPTS, 8),
                ],
                b"",
            ),
            "pass_not_service",
        );
        case(
            "264 bytes of extension headers",
            frame6_ext(c, vip, L4::Syn, 64, &[opts(IPV6_HOP_BY_HOP, 264)], b""),
            "pass_not_service",
        );
        case(
            "264 bytes in two headers",
            frame6_ext(
                c,
                vip,
                L4::Syn,
                64,
                &[opts(IPV6_HOP_BY_HOP, 256), opts(IPV6_DEST_OPTS, 8)],
                b"",
            ),
            "pass_not_service",
        );
        // A jumbogram: payload length 0, the length in a hop-by-hop option.
        let mut jumbo = opts(IPV6_HOP_BY_HOP, 8);
        jumbo.bytes[2..8].copy_from_slice(&[0xc2, 4, 0, 1, 0, 20]);
        let mut j = frame6_ext(c, vip, L4::Syn, 64, &[jumbo], b"");
        j[18..20].copy_from_slice(&[0, 0]);
        case("jumbogram (payload length 0)", j, "malformed");
        let mut zero = syn.clone();
        zero[18..20].copy_from_slice(&[0, 0]);
        case("payload length 0, no hop-by-hop", zero, "malformed");
        let mut long = syn.clone();
        long[19] += 1;
        case("payload length one beyond the frame", long, "malformed");
        let mut longer = syn.clone();
        longer[18] = 0x05;
        case("payload length 1280+ beyond the frame", longer, "malformed");
        // The payload length ends inside the extension headers.
        let mut short = frame6_ext(c, vip, L4::Syn, 64, &[opts(IPV6_HOP_BY_HOP, 16)], b"");
        short[18..20].copy_from_slice(&8u16.to_be_bytes());
        case("payload length ends inside the headers", short, "malformed");
        // The payload length ends inside the TCP header.
        let mut cut_tcp = syn.clone();
        cut_tcp[18..20].copy_from_slice(&12u16.to_be_bytes());
        case("payload length ends inside TCP", cut_tcp, "malformed");
        let mut ver = syn.clone();
        ver[14] = 0x45;
        case("version 4 in an IPv6 frame", ver, "malformed");
        let mut doff = syn.clone();
        doff[54 + 12] = 0x40;
        case("tcp data offset 4", doff, "malformed");
        let mut doff_long = syn.clone();
        doff_long[54 + 12] = 0xf0;
        case("tcp data offset beyond the payload", doff_long, "malformed");
        let mut udp_len = frame6(c, uvip, L4::Udp, 64, b"abc");
        udp_len[54 + 4..54 + 6].copy_from_slice(&0x10u16.to_be_bytes());
        case("udp length beyond the payload", udp_len, "malformed");
        let mut udp_short = frame6(c, uvip, L4::Udp, 64, b"abc");
        udp_short[54 + 4..54 + 6].copy_from_slice(&7u16.to_be_bytes());
        case("udp length below its header", udp_short, "malformed");
        // An extension header running past the frame (its length lies).
        let mut lying = frame6_ext(c, vip, L4::Syn, 64, &[opts(IPV6_HOP_BY_HOP, 8)], b"");
        lying[54 + 1] = 20;
        case(
            "extension header length beyond the frame",
            lying,
            "malformed",
        );
        // Truncations of a SYN behind two extension headers, at every length
        // from the Ethernet header on (the kernel refuses shorter test runs):
        // the payload length then always lies.
        let chained = frame6_ext(
            c,
            vip,
            L4::Syn,
            64,
            &[opts(IPV6_HOP_BY_HOP, 8), opts(IPV6_DEST_OPTS, 16)],
            b"",
        );
        for cut in 14..chained.len() {
            case(
                &format!("truncated at {cut}"),
                chained[..cut].to_vec(),
                "malformed",
            );
        }
        for cut in 14..syn.len() {
            case(
                &format!("plain SYN truncated at {cut}"),
                syn[..cut].to_vec(),
                "malformed",
            );
        }

        let before = fx.dp.global_stats().unwrap();
        for (what, input, _) in &cases {
            let (action, out) = fx.run(input);
            assert_eq!(action, XDP_PASS, "{what}");
            assert_eq!(&out, input, "{what}: must pass untouched");
        }
        let d = deltas(&fx.dp, &before);
        for counter in [
            "pass_not_service",
            "ttl_exceeded",
            "fragment",
            "malformed",
            "pass_not_ip",
        ] {
            let want = cases.iter().filter(|(_, _, c)| *c == counter).count() as u64;
            assert_eq!(delta(&d, counter), want, "counter {counter}");
        }
        for colour in [Colour::Blue, Colour::Green] {
            for id in [0, 1, TCP6, UDP6] {
                let st = fx.dp.colour_stats(id, colour).unwrap();
                assert_eq!(
                    (st.packets, st.new_flows),
                    (0, 0),
                    "no untouched frame may count as service traffic ({id} {colour:?})"
                );
            }
        }
        // And the SYN itself, whole, is rewritten: the cases above were
        // refused for what they changed, not for the flow.
        let (_, out) = fx.run(&syn);
        assert_eq!(verify6(&out).1, predicted6(c, vip, PROTO_TCP, &blue6()));
    });
}

/// A routing header with segments left names the packet's final
/// destination: the TCP/UDP checksum covers that address, not the VIP in
/// the header, and the packet is not at its end (the stack processes the
/// header). It passes untouched, as no service's; with no segments left
/// the same header is walked (see above).
#[test]
fn v6_a_routing_header_with_segments_left_passes_untouched() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let c = SocketAddrV6::new(CLIENT6, 47500, 0, 0);
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);
        let before = fx.dp.global_stats().unwrap();
        for chain in [
            vec![routing(24, 1)],
            vec![opts(IPV6_HOP_BY_HOP, 8), routing(40, 2)],
            vec![
                opts(IPV6_DEST_OPTS, 8),
                routing(24, 255),
                opts(IPV6_DEST_OPTS, 8),
            ],
        ] {
            let input = frame6_ext(c, vip, L4::Syn, 64, &chain, b"");
            let (action, out) = fx.run(&input);
            assert_eq!((action, &out), (XDP_PASS, &input));
        }
        assert_eq!(delta(&deltas(&fx.dp, &before), "pass_not_service"), 3);
        let st = fx.dp.colour_stats(TCP6, Colour::Blue).unwrap();
        assert_eq!(st.packets, 0);
    });
}

#[test]
fn v4_and_v6_services_side_by_side_keep_their_own_flows_and_colours() {
    in_scratch_ns(|_| {
        let mut fx = Fixture::dual();
        let vip4 = SocketAddrV4::new(VIP, 80);
        let vip6 = SocketAddrV6::new(VIP6, 80, 0, 0);
        let c4 = SocketAddrV4::new(CLIENT, 52000);
        let c6 = SocketAddrV6::new(CLIENT6, 52000, 0, 0);
        let (_, out) = fx.run(&frame(c4, vip4, L4::Syn, 64, b""));
        let b4 = predicted(c4, vip4, PROTO_TCP, &blue());
        assert_eq!(out, frame(c4, b4, L4::Syn, 64, b""));
        let (_, out) = fx.run(&frame6(c6, vip6, L4::Syn, 64, b""));
        let b6 = predicted6(c6, vip6, PROTO_TCP, &blue6());
        assert_eq!(out, frame6(c6, b6, L4::Syn, 64, b""));

        // A flip of the IPv6 service moves its new flows only.
        fx.dp.set_active(TCP6, Colour::Green).unwrap();
        let n4 = SocketAddrV4::new(CLIENT, 52001);
        let n6 = SocketAddrV6::new(CLIENT6, 52001, 0, 0);
        let (_, out) = fx.run(&frame(n4, vip4, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(n4, vip4, PROTO_TCP, &blue()));
        let (_, out) = fx.run(&frame6(n6, vip6, L4::Syn, 64, b""));
        assert_eq!(verify6(&out).1, predicted6(n6, vip6, PROTO_TCP, &green6()));
        // Open flows of both keep their backends, and their replies.
        let (_, out) = fx.run(&frame6(c6, vip6, L4::Ack, 64, b"x"));
        assert_eq!(verify6(&out).1, b6);
        let (_, out) = fx.run(&frame(c4, vip4, L4::Ack, 64, b"x"));
        assert_eq!(verify(&out).1, b4);
        let (_, out) = fx.run(&frame6(b6, c6, L4::Ack, 64, b"y"));
        assert_eq!(out, frame6(vip6, c6, L4::Ack, 64, b"y"));
        let (_, out) = fx.run(&frame(b4, c4, L4::Ack, 64, b"y"));
        assert_eq!(out, frame(vip4, c4, L4::Ack, 64, b"y"));
        // A flip of the IPv4 service, the other way round.
        fx.dp.set_active(0, Colour::Green).unwrap();
        fx.dp.set_active(TCP6, Colour::Blue).unwrap();
        let m4 = SocketAddrV4::new(CLIENT, 52002);
        let m6 = SocketAddrV6::new(CLIENT6, 52002, 0, 0);
        let (_, out) = fx.run(&frame(m4, vip4, L4::Syn, 64, b""));
        assert_eq!(verify(&out).1, predicted(m4, vip4, PROTO_TCP, &green()));
        let (_, out) = fx.run(&frame6(m6, vip6, L4::Syn, 64, b""));
        assert_eq!(verify6(&out).1, predicted6(m6, vip6, PROTO_TCP, &blue6()));

        // The same client port and backend port across families are two
        // flows: a v6 reply never takes the v4 flow's VIP, nor the reverse.
        let st4 = fx.dp.colour_stats(0, Colour::Blue).unwrap();
        let st6 = fx.dp.colour_stats(TCP6, Colour::Blue).unwrap();
        let g6 = fx.dp.colour_stats(TCP6, Colour::Green).unwrap();
        assert_eq!((st4.new_flows, st4.reply_packets), (2, 1));
        assert_eq!((st6.new_flows, st6.reply_packets), (2, 1));
        assert_eq!(g6.new_flows, 1);
    });
}

/// The verifier's limit: instructions processed per program load.
const VERIFIER_LIMIT: u32 = 1_000_000;

/// The XDP and TC programs (with the programs they tail-call) load at the
/// table sizes the suite, the bench and the default configuration use, with
/// half the verifier's limit to spare. The verifier walks every path: with
/// aya-log's formatting inlined at each rare event's site the XDP program
/// took 840 000 of the million (TC 945 000), and one more branch on the
/// new-flow path passed the limit; the messages are written by their own
/// program now (`events.rs`), and this catches the next such growth before
/// a kernel whose verifier is a little stricter refuses the program.
#[test]
fn the_programs_load_with_verifier_headroom_at_every_table_size() {
    in_scratch_ns(|_| {
        for max_flows in [
            1024,
            4096,
            65_536,
            bgswitch_common::DEFAULT_MAX_FLOWS,
            1 << 21,
        ] {
            let mut fx = Fixture::with_max_flows(max_flows);
            let syn = client_syn();
            fx.dp
                .test_run(&syn, None, 1)
                .expect("the XDP program loads");
            fx.dp
                .test_run_tc(&syn, None, 0, 1)
                .expect("the TC program loads");
            let counts = fx.dp.verified_instructions();
            eprintln!("max_flows {max_flows}: {counts:?}");
            assert!(
                counts.iter().any(|(n, _)| n == "bgswitch")
                    && counts.iter().any(|(n, _)| n == "bgswitch_tc"),
                "both programs report their count (kernel 5.16+): {counts:?}"
            );
            for (name, n) in counts {
                assert!(
                    n < VERIFIER_LIMIT / 2,
                    "max_flows {max_flows}: {name} took {n} verifier instructions, more than half the limit ({VERIFIER_LIMIT})"
                );
            }
        }
    });
}

/// The flow caches' slots start on cache lines: the kernel puts a
/// memory-mapped array's values on a page boundary and a plain one's after
/// its header (56 mod 64 on Linux 6.18), where each 64-B slot would take two
/// cold lines to read instead of one.
#[test]
fn the_flow_caches_are_page_aligned_so_a_slot_is_one_cache_line() {
    use bgswitch_common::BPF_F_MMAPABLE;
    in_scratch_ns(|_| {
        let mut fx = Fixture::new();
        fx.dp.test_run(&client_syn(), None, 1).unwrap();
        for name in [
            bgswitch_common::maps::FLOW_CACHE,
            bgswitch_common::maps::FLOW_CACHE6,
        ] {
            let id = fx.dp.map_id(name).unwrap();
            let info = aya::maps::MapInfo::from_id(id).unwrap();
            assert_ne!(
                info.map_flags() & BPF_F_MMAPABLE,
                0,
                "{name} is created memory-mapped (page-aligned values)"
            );
        }
    });
}

/// A client's SYN to the VIP's port 80: what loads the programs.
fn client_syn() -> Vec<u8> {
    frame(
        SocketAddrV4::new(CLIENT, 40000),
        SocketAddrV4::new(VIP, 80),
        L4::Syn,
        64,
        b"",
    )
}
