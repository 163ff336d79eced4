//! ICMP errors about switched flows, both families, through the XDP and
//! the TC program with BPF_PROG_TEST_RUN: translated so each host hears of its own
//! packet in terms it knows (the client of its packet to the VIP, the
//! backend of its reply), every checksum right. Frames are built and the
//! expected ones computed with `etherparse`, independently of the program's
//! checksum code: an expected frame is the error as the host should get
//! it, built afresh, quoting the packet that host really sent.

use std::net::{IpAddr, SocketAddr};

use bgswitch::{
    dataplane::{backend_of, backend_stat_id, service_key, Dataplane, LoadOptions},
    model::Colour,
};
use bgswitch_common::PROTO_TCP;
use bgswitch_tests::{in_netns, TempNetns};
use etherparse::{
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Type, Icmpv6Type,
    PacketBuilder,
};

const XDP_PASS: u32 = 2;
/// TC's "not mine" (TC_ACT_UNSPEC), its pass.
const TC_PASS: u32 = u32::MAX;

/// Which program a frame runs through.
#[derive(Clone, Copy, Debug)]
enum Program {
    Xdp,
    Tc,
}

impl Program {
    fn pass(self) -> u32 {
        match self {
            Program::Xdp => XDP_PASS,
            Program::Tc => TC_PASS,
        }
    }
}
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// One family's addresses: client, VIP:80, the one blue backend, a router
/// between the load balancer and the backends, one on the client's side.
struct Net {
    client: SocketAddr,
    vip: SocketAddr,
    backend: SocketAddr,
    green: SocketAddr,
    router_backend_side: IpAddr,
    router_client_side: IpAddr,
}

fn v4() -> Net {
    Net {
        client: "198.18.0.2:40000".parse().unwrap(),
        vip: "198.19.0.10:80".parse().unwrap(),
        backend: "198.18.1.11:8080".parse().unwrap(),
        green: "198.18.1.21:8080".parse().unwrap(),
        router_backend_side: "198.18.1.1".parse().unwrap(),
        router_client_side: "198.18.0.1".parse().unwrap(),
    }
}

fn v6() -> Net {
    Net {
        client: "[fd00:0:0:1::2]:40000".parse().unwrap(),
        vip: "[fd00:0:0:9::10]:80".parse().unwrap(),
        backend: "[fd00:0:0:2::11]:8080".parse().unwrap(),
        green: "[fd00:0:0:2::21]:8080".parse().unwrap(),
        router_backend_side: "fd00:0:0:2::1".parse().unwrap(),
        router_client_side: "fd00:0:0:1::1".parse().unwrap(),
    }
}

/// A loaded program with the IPv4 service (id 0) and the IPv6 one (id 1),
/// one backend a colour.
fn load() -> Dataplane {
    let mut dp = Dataplane::load(&LoadOptions {
        bpffs: None,
        max_flows: 4096,
    })
    .expect("load the program (verifier)");
    dp.set_settings(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    for (id, n) in [(0, v4()), (1, v6())] {
        dp.write_service(
            id,
            service_key(n.vip, PROTO_TCP),
            &[backend_of(n.backend, backend_stat_id(id, Colour::Blue, 0))],
            &[backend_of(n.green, backend_stat_id(id, Colour::Green, 0))],
            Colour::Blue,
        )
        .unwrap();
    }
    dp
}

fn in_scratch_ns(f: impl FnOnce() + Send) {
    bgswitch_tests::switcher::require_root();
    let ns = TempNetns::create().expect("create a network namespace");
    let name = ns.name().to_string();
    in_netns(&name, f).expect("enter the namespace");
}

fn builder(
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => unreachable!("one family"),
    }
}

/// A TCP segment `src` → `dst` (SYN, or SYN-ACK), with a little payload so
/// a quote of it holds the TCP checksum.
fn tcp(src: SocketAddr, dst: SocketAddr, syn_ack: bool) -> Vec<u8> {
    let t = builder(src.ip(), dst.ip(), 64).tcp(src.port(), dst.port(), 1000, 65535);
    let t = if syn_ack { t.syn().ack(1) } else { t.syn() };
    let mut out = Vec::new();
    t.write(&mut out, b"quoted").unwrap();
    out
}

/// An ICMP error `from` → `to` quoting `quote` (an IP packet): IPv4's
/// "fragmentation needed" or `unreachable`'s "port unreachable"; IPv6's
/// "packet too big" or "port unreachable".
fn error(from: IpAddr, to: IpAddr, quote: &[u8], unreachable: bool) -> Vec<u8> {
    let b = builder(from, to, 64);
    let mut out = Vec::new();
    if from.is_ipv4() {
        let t = if unreachable {
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
        } else {
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1280,
            })
        };
        b.icmpv4(t).write(&mut out, quote).unwrap();
    } else {
        let t = if unreachable {
            Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
        } else {
            Icmpv6Type::PacketTooBig { mtu: 1280 }
        };
        b.icmpv6(t).write(&mut out, quote).unwrap();
    }
    out
}

fn run(dp: &mut Dataplane, prog: Program, frame: &[u8]) -> (u32, Vec<u8>) {
    let (action, out, _) = match prog {
        Program::Xdp => dp.test_run(frame, None, 1),
        Program::Tc => dp.test_run_tc(frame, None, 0, 1),
    }
    .expect("test run");
    (action, out)
}

fn counter(dp: &Dataplane, name: &str) -> u64 {
    dp.global_stats()
        .unwrap()
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

/// The IP packet of an Ethernet frame.
fn ip(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

fn errors_about_switched_flows_are_translated(n: &Net, prog: Program) {
    let mut dp = load();
    let run = |dp: &mut Dataplane, frame: &[u8]| run(dp, prog, frame);
    let before = counter(&dp, "icmp_translated");
    // The client's SYN to the VIP, as the program sends it on (no route in
    // the scratch namespace: to the stack, rewritten; TTL as it was).
    let syn = tcp(n.client, n.vip, false);
    let (action, to_backend) = run(&mut dp, &syn);
    assert_eq!(action, prog.pass());
    assert_eq!(
        to_backend,
        tcp(n.client, n.backend, false),
        "the SYN goes to the one blue backend"
    );

    // Too big for a link behind the load balancer, said by the backend: the
    // client hears it from the VIP, about its own SYN to the VIP.
    let from_backend = error(n.backend.ip(), n.client.ip(), ip(&to_backend), false);
    let (action, out) = run(&mut dp, &from_backend);
    assert_eq!(action, prog.pass());
    assert_eq!(
        out,
        error(n.vip.ip(), n.client.ip(), ip(&syn), false),
        "from the backend: from and about the VIP, every checksum right"
    );

    // The same said by a router between the load balancer and the backend:
    // it stays the router's, about the client's SYN to the VIP.
    let from_router = error(n.router_backend_side, n.client.ip(), ip(&to_backend), false);
    let (_, out) = run(&mut dp, &from_router);
    assert_eq!(
        out,
        error(n.router_backend_side, n.client.ip(), ip(&syn), false),
        "from a router: the router's, about the VIP"
    );

    // The backend's reply, as the program sends it to the client.
    let syn_ack = tcp(n.backend, n.client, true);
    let (_, to_client) = run(&mut dp, &syn_ack);
    assert_eq!(
        to_client,
        tcp(n.vip, n.client, true),
        "the reply comes from the VIP"
    );
    // An error about that reply, from a router on the client's side (or
    // the client), to the VIP: the backend hears of its own reply.
    for unreachable in [false, true] {
        let to_vip = error(
            n.router_client_side,
            n.vip.ip(),
            ip(&to_client),
            unreachable,
        );
        let (_, out) = run(&mut dp, &to_vip);
        assert_eq!(
            out,
            error(
                n.router_client_side,
                n.backend.ip(),
                ip(&syn_ack),
                unreachable
            ),
            "to the backend, about its reply (unreachable: {unreachable})"
        );
    }
    assert_eq!(counter(&dp, "icmp_translated") - before, 4);

    // Errors about no switched flow pass untouched: another client port, a
    // backend port that is not the flow's, and a quote cut before the ports.
    let mut other = n.client;
    other.set_port(40001);
    let unknown = [
        error(
            n.backend.ip(),
            other.ip(),
            ip(&tcp(other, n.backend, false)),
            false,
        ),
        error(
            n.router_client_side,
            n.vip.ip(),
            ip(&tcp(n.vip, other, true)),
            true,
        ),
        {
            let q = ip(&to_backend);
            let hdr = if n.client.is_ipv4() { 20 } else { 40 };
            error(n.backend.ip(), n.client.ip(), &q[..hdr + 2], false)
        },
    ];
    for (i, input) in unknown.iter().enumerate() {
        let (action, out) = run(&mut dp, input);
        assert_eq!(action, prog.pass(), "case {i}");
        assert_eq!(&out, input, "case {i}: untouched");
    }
    assert_eq!(counter(&dp, "icmp_translated") - before, 4);
}

#[test]
fn icmpv4_errors_about_switched_flows_are_translated_both_ways() {
    for prog in [Program::Xdp, Program::Tc] {
        in_scratch_ns(|| errors_about_switched_flows_are_translated(&v4(), prog));
    }
}

#[test]
fn icmpv6_errors_about_switched_flows_are_translated_both_ways() {
    for prog in [Program::Xdp, Program::Tc] {
        in_scratch_ns(|| errors_about_switched_flows_are_translated(&v6(), prog));
    }
}

#[test]
fn echo_to_a_vip_goes_to_the_stack_unchanged() {
    in_scratch_ns(|| {
        let mut dp = load();
        for n in [v4(), v6()] {
            let b = builder(n.client.ip(), n.vip.ip(), 64);
            let mut echo = Vec::new();
            if n.client.is_ipv4() {
                b.icmpv4_echo_request(7, 1)
                    .write(&mut echo, b"ping")
                    .unwrap();
            } else {
                b.icmpv6_echo_request(7, 1)
                    .write(&mut echo, b"ping")
                    .unwrap();
            }
            for prog in [Program::Xdp, Program::Tc] {
                let (action, out) = run(&mut dp, prog, &echo);
                assert_eq!(action, prog.pass(), "{prog:?}");
                assert_eq!(out, echo, "{prog:?}");
            }
        }
        assert_eq!(counter(&dp, "icmp_translated"), 0);
    });
}

/// An ICMPv6 error about a switched flow is translated only right after the
/// IPv6 header (the parse finds it there and hands it to the ICMP program);
/// behind an extension header (here 8 bytes of destination options) it
/// passes untouched, as every ICMPv6 message there does.
#[test]
fn an_icmpv6_error_behind_an_extension_header_passes_untouched() {
    in_scratch_ns(|| {
        let n = v6();
        let mut dp = load();
        for prog in [Program::Xdp, Program::Tc] {
            let syn = tcp(n.client, n.vip, false);
            let (_, to_backend) = run(&mut dp, prog, &syn);
            let plain = error(n.backend.ip(), n.client.ip(), ip(&to_backend), false);
            // Next header 60 (destination options) in the IPv6 header, the
            // options header (next header 58, length 0: 8 bytes, a PadN of
            // four) before the ICMPv6 message, the payload length 8 more.
            // The ICMPv6 checksum's pseudo-header is the same.
            let mut behind = plain[..14 + 40].to_vec();
            behind[14 + 6] = 60;
            let len = u16::from_be_bytes([behind[14 + 4], behind[14 + 5]]) + 8;
            behind[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
            behind.extend_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
            behind.extend_from_slice(&plain[14 + 40..]);
            let before = counter(&dp, "icmp_translated");
            let (action, out) = run(&mut dp, prog, &behind);
            assert_eq!(action, prog.pass(), "{prog:?}");
            assert_eq!(out, behind, "{prog:?}: untouched");
            assert_eq!(counter(&dp, "icmp_translated"), before, "{prog:?}");
            let (_, out) = run(&mut dp, prog, &plain);
            assert_ne!(out, plain, "{prog:?}: right after the header, translated");
            assert_eq!(counter(&dp, "icmp_translated"), before + 1, "{prog:?}");
        }
    });
}

/// The expected error for a packet too big for the next hop: from the VIP
/// (IPv4 without DF, as the program builds it), to `to`, quoting the first
/// 504 bytes of what the sender sent, TTL or hop limit 63 (forwarded once),
/// in a frame to MAC `dst` from MAC `src`.
fn too_big_error(
    n: &Net,
    to: IpAddr,
    quote: &[u8],
    mtu: u16,
    (dst, src): ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(src, dst);
    let mut out = Vec::new();
    match (n.vip.ip(), to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = etherparse::Ipv4Header::new(
                0,
                63,
                etherparse::IpNumber::ICMP,
                s.octets(),
                d.octets(),
            )
            .unwrap();
            h.dont_fragment = false;
            eth.ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ))
                .write(&mut out, &quote[..504])
                .unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 63)
            .icmpv6(Icmpv6Type::PacketTooBig {
                mtu: u32::from(mtu),
            })
            .write(&mut out, &quote[..504])
            .unwrap(),
        _ => unreachable!(),
    }
    out
}

/// A veth v0 (MTU `mtu`) in `ns` leading to the client's and the backends'
/// networks, with permanent neighbours; returns (v0's ifindex, its MAC).
fn link(ns: &str, n: &Net, mtu: u32) -> (u32, [u8; 6]) {
    let ip = |args: &[&str]| bgswitch_tests::ip(&[&["-n", ns], args].concat()).unwrap();
    ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ip(&["link", "set", "v0", "mtu", &mtu.to_string()]);
    ip(&["link", "set", "v0", "up"]);
    ip(&["link", "set", "v1", "up"]);
    let (net, plen) = if n.client.is_ipv4() {
        ("198.18.0.1", "/16")
    } else {
        ("fd00::1", "/48")
    };
    ip(&["addr", "add", &format!("{net}{plen}"), "dev", "v0", "nodad"]);
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
    for (host, mac) in [
        (n.client.ip(), "02:00:00:00:00:02"),
        (n.backend.ip(), "02:00:00:00:01:11"),
    ] {
        ip(&[
            "neigh",
            "replace",
            &host.to_string(),
            "lladdr",
            mac,
            "dev",
            "v0",
            "nud",
            "permanent",
        ]);
    }
    let idx = bgswitch::dataplane::ifindex("v0").unwrap();
    (idx, bgswitch_tests::netns::mac_address(ns, "v0").unwrap())
}

/// A packet too long for the next hop towards the backend (a 1280-byte MTU
/// behind the load balancer), and a reply too long for the next hop
/// towards the client: each sender gets "fragmentation needed" / "packet
/// too big" about the packet it sent, so path MTU discovery works through
/// the VIP.
fn too_big_packets_are_answered(n: &Net, prog: Program) {
    let ns = TempNetns::create().expect("create a network namespace");
    let name = ns.name().to_string();
    in_netns(&name, || {
        let (v0, v0_mac) = link(&name, n, 1280);
        let mut dp = load();
        let run = |dp: &mut Dataplane, frame: &[u8]| {
            let (action, out, _) = match prog {
                Program::Xdp => dp.test_run(frame, Some(v0), 1),
                Program::Tc => dp.test_run_tc(frame, Some(v0), 0, 1),
            }
            .expect("test run");
            (action, out)
        };
        let sent = |prog: Program| match prog {
            Program::Xdp => 3, // XDP_TX
            Program::Tc => 7,  // TC_ACT_REDIRECT
        };
        // A 1400-byte data segment (with DF, as TCP sends).
        let big = |src: SocketAddr, dst: SocketAddr| {
            let t = builder(src.ip(), dst.ip(), 64)
                .tcp(src.port(), dst.port(), 1000, 65535)
                .ack(1);
            let mut out = Vec::new();
            t.write(&mut out, &[0x5a; 1400]).unwrap();
            out
        };
        // Open the flow with a small SYN (it fits).
        let (action, _) = run(&mut dp, &tcp(n.client, n.vip, false));
        assert_eq!(action, sent(prog), "the SYN is forwarded");
        let before = counter(&dp, "icmp_too_big_sent");
        let to_backend = big(n.client, n.vip);
        let (action, out) = run(&mut dp, &to_backend);
        assert_eq!(action, sent(prog), "the error is sent back");
        assert_eq!(
            out,
            too_big_error(
                n,
                n.client.ip(),
                ip(&to_backend),
                1280,
                ([2, 0, 0, 0, 0, 2], v0_mac)
            ),
            "the client hears from the VIP about its own packet"
        );
        // A reply too long for the way to the client: the backend hears of
        // its own reply.
        let reply = big(n.backend, n.client);
        let (action, out) = run(&mut dp, &reply);
        assert_eq!(action, sent(prog));
        let p = etherparse::SlicedPacket::from_ethernet(&out).expect("the error parses");
        match &p.net {
            Some(etherparse::NetSlice::Ipv4(h)) => {
                assert_eq!(IpAddr::from(h.header().destination()), n.backend.ip());
            }
            Some(etherparse::NetSlice::Ipv6(h)) => {
                assert_eq!(IpAddr::from(h.header().destination()), n.backend.ip());
            }
            _ => panic!("not IP"),
        }
        let icmp_payload = &out[out.len() - 504..];
        assert_eq!(
            icmp_payload,
            &ip(&reply)[..504],
            "quoting the backend's own reply"
        );
        assert_eq!(counter(&dp, "icmp_too_big_sent") - before, 2);
    })
    .expect("enter the namespace");
}

#[test]
fn packets_too_big_for_the_next_hop_are_answered_ipv4() {
    bgswitch_tests::switcher::require_root();
    for prog in [Program::Xdp, Program::Tc] {
        too_big_packets_are_answered(&v4(), prog);
    }
}

#[test]
fn packets_too_big_for_the_next_hop_are_answered_ipv6() {
    bgswitch_tests::switcher::require_root();
    for prog in [Program::Xdp, Program::Tc] {
        too_big_packets_are_answered(&v6(), prog);
    }
}
