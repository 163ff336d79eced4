//! IPv6 services end to end, beside IPv4 ones in one daemon: the real
//! daemon and CLI switching real TCP and UDP traffic of both families
//! between real servers in dual-stack namespaces with the kernel's default
//! offloads (TC on the veths), and path MTU discovery through both VIPs
//! across links narrower than the senders'.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use bgswitch_tests::{
    clients::{http_download, http_upload},
    http_get,
    switcher::{
        colour, dual_stack_services, require_root, served_topology, served_topology_with, service,
        RequestLoad, Switcher, HEALTH, HTTP_PORT, UDP_PORT,
    },
    Colour, KeepAliveClient, Topology, TopologyOptions, UdpClient, VIP, VIP6,
};

fn web() -> SocketAddr {
    SocketAddrV4::new(VIP, HTTP_PORT).into()
}
fn echo() -> SocketAddr {
    SocketAddrV4::new(VIP, UDP_PORT).into()
}
fn web6() -> SocketAddr {
    SocketAddr::new(VIP6.into(), HTTP_PORT)
}
fn echo6() -> SocketAddr {
    SocketAddr::new(VIP6.into(), UDP_PORT)
}

/// A daemon serving `services` (with a config prelude if any) on `topo`.
fn started(topo: &Topology, services: &str) -> Switcher {
    let mut sw = Switcher::new(topo, services).expect("switcher");
    sw.start().expect("daemon starts");
    sw
}

/// The default test bed with `web`, `echo`, `web6` and `echo6` served.
fn setup() -> (Topology, Switcher) {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let sw = started(&topo, &dual_stack_services(&topo));
    (topo, sw)
}

#[test]
fn a_v6_flip_moves_new_connections_while_open_ones_drain_and_v4_is_untouched() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    for _ in 0..6 {
        let r = http_get(&cli, web6(), "/")
            .unwrap_or_else(|e| panic!("request through the IPv6 VIP: {e:#}\n{}", sw.log_tail()));
        assert_eq!(colour(&r.body), "blue", "{r:?}");
    }
    // Open connections of both families, before the flip.
    let mut long6 = KeepAliveClient::connect(&cli, web6()).unwrap();
    let first6 = long6.get("/").unwrap();
    assert_eq!(colour(&first6.body), "blue");
    let mut long4 = KeepAliveClient::connect(&cli, web()).unwrap();
    let first4 = long4.get("/").unwrap();
    assert_eq!(colour(&first4.body), "blue");

    let out = sw
        .cli_ok(&["flip", "web6", "--reason", "release 2 (v6)"])
        .unwrap();
    assert!(out.contains("blue → green"), "{out}");

    for i in 0..3 {
        let r = long6.get("/").unwrap();
        assert_eq!(r.body, first6.body, "open v6 connection, request {i}");
    }
    let mut greens = BTreeSet::new();
    for _ in 0..16 {
        let r = http_get(&cli, web6(), "/").unwrap();
        assert_eq!(colour(&r.body), "green", "{r:?}");
        greens.insert(r.backend);
    }
    assert_eq!(greens.len(), 2, "new v6 flows on both greens: {greens:?}");
    // The IPv4 service on the same port is another service: still blue.
    for _ in 0..4 {
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(colour(&r.body), "blue", "{r:?}");
    }
    assert_eq!(long4.get("/").unwrap().body, first4.body);

    let st = sw.status().unwrap();
    let w6 = service(&st, "web6");
    assert_eq!(w6["vip"], format!("[{VIP6}]:{HTTP_PORT}"), "{w6}");
    assert_eq!(w6["protocol"], "tcp");
    assert_eq!(w6["active"], "green");
    assert_eq!(w6["fast_path"], "table", "{w6}");
    assert_eq!(w6["colours"][0]["live_flows"], 1, "the open v6 one: {w6}");
    assert!(
        w6["colours"][1]["new_flows"].as_u64().unwrap() >= 16,
        "{w6}"
    );
    let backends: Vec<_> = w6["colours"][1]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<_> = topo
        .backends_of(Colour::Green)
        .map(|b| format!("[{}]:{HTTP_PORT}", b.addr6))
        .collect();
    assert_eq!(backends, want);
    let w4 = service(&st, "web");
    assert_eq!(w4["active"], "blue");
    assert_eq!(w4["colours"][0]["live_flows"], 1, "the open v4 one: {w4}");

    // The open v6 connection ends: blue is drained.
    drop(long6);
    sw.wait_for(Duration::from_secs(5), "web6's blue drained", |st| {
        service(st, "web6")["colours"][0]["live_flows"] == 0
    });
    let text = sw.cli_ok(&["status", "web6"]).unwrap();
    assert!(text.contains("active: green"), "{text}");
    assert!(text.contains(&VIP6.to_string()), "{text}");

    let out = sw.cli_ok(&["rollback", "web6"]).unwrap();
    assert!(out.contains("green → blue"), "{out}");
    let r = http_get(&cli, web6(), "/").unwrap();
    assert_eq!(colour(&r.body), "blue");
    let st = sw.status().unwrap();
    let w6 = service(&st, "web6");
    assert_eq!(w6["generation"], 3);
    assert_eq!(w6["last_change"]["kind"], "rollback");
    assert_eq!(service(&st, "web")["generation"], 1);
    assert_eq!(long4.get("/").unwrap().body, first4.body);
}

#[test]
fn v6_udp_flows_are_pinned_and_new_ones_follow_the_flip() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    let old6 = UdpClient::new6(&cli).unwrap();
    let old4 = UdpClient::new(&cli).unwrap();
    let a = old6.request(echo6(), b"1").unwrap();
    assert!(a.starts_with("blue "), "{a}\n{}", sw.log_tail());
    let a4 = old4.request(echo(), b"1").unwrap();
    assert!(a4.starts_with("blue "), "{a4}");
    sw.cli_ok(&["flip", "echo6", "--to", "green"]).unwrap();
    let (b, from) = old6.request_from(echo6(), b"2").unwrap();
    assert_eq!(from, echo6(), "the answer comes from the VIP");
    assert_eq!(
        a.split(' ').nth(1),
        b.split(' ').nth(1),
        "same backend after the flip"
    );
    assert!(b.starts_with("blue "), "{b}");
    let mut greens = BTreeSet::new();
    for i in 0..8 {
        let fresh = UdpClient::new6(&cli).unwrap();
        let c = fresh.request(echo6(), format!("n{i}").as_bytes()).unwrap();
        assert!(c.starts_with("green "), "{c}");
        greens.insert(c.split(' ').nth(1).unwrap().to_owned());
    }
    assert!(!greens.is_empty());
    // The IPv4 echo, same port: not flipped.
    let b4 = old4.request(echo(), b"2").unwrap();
    assert_eq!(a4.split(' ').nth(1), b4.split(' ').nth(1));
    let c4 = UdpClient::new(&cli).unwrap().request(echo(), b"3").unwrap();
    assert!(c4.starts_with("blue "), "{c4}");
    let st = sw.status().unwrap();
    let e6 = service(&st, "echo6");
    assert_eq!(e6["protocol"], "udp");
    assert!(
        e6["colours"][0]["live_flows"].as_u64().unwrap() >= 1,
        "{e6}"
    );
    assert!(
        e6["colours"][1]["live_flows"].as_u64().unwrap() >= 1,
        "{e6}"
    );
    let out = sw.cli_ok(&["flip", "echo6", "--to", "green"]).unwrap();
    assert!(out.contains("already green"), "{out}");
}

#[test]
fn daemon_killed_and_restarted_under_v6_and_v4_load_loses_nothing() {
    let (topo, mut sw) = setup();
    sw.cli_ok(&["flip", "web6"]).unwrap();
    // One client per family at the same time: v6 to green, v4 to blue.
    let load6 = RequestLoad::start(topo.client_ns(), web6(), Colour::Green);
    let load4 = RequestLoad::start(topo.client_ns(), web(), Colour::Blue);
    std::thread::sleep(Duration::from_millis(500));
    sw.kill();
    let (during6, during4) = (load6.counts().ok, load4.counts().ok);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(load6.counts().ok > during6, "v6 flows with no daemon");
    assert!(load4.counts().ok > during4, "v4 flows with no daemon");
    sw.start().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (seen6, seen4) = (load6.stop(), load4.stop());
    let st = sw.status().unwrap();
    let w6 = service(&st, "web6");
    assert_eq!(w6["active"], "green", "state kept across SIGKILL");
    assert_eq!(w6["generation"], 2);
    assert_eq!(service(&st, "web")["active"], "blue");
    assert_eq!(st["interfaces"][0]["adopted"], true, "{st}");
    assert!(
        w6["colours"][1]["new_flows"].as_u64().unwrap() >= seen6.ok,
        "counters survive the restart: {w6}"
    );
    for (family, seen) in [("v6", seen6), ("v4", seen4)] {
        assert_eq!(
            seen.failed,
            0,
            "{family}: no failed request\n{}",
            sw.log_tail()
        );
        assert_eq!(seen.wrong, 0, "{family}: no request on the wrong colour");
        assert!(seen.ok > 10, "{family}: {seen:?}");
    }
    eprintln!("{seen6:?} over IPv6, {seen4:?} over IPv4");
}

#[test]
fn a_watched_v6_flip_rolls_back_when_greens_v6_backend_fails_its_health_checks() {
    require_root();
    let mut topo = served_topology().expect("topology with servers");
    // Health checks on web6 only: its table is followed by echo6's.
    let services = dual_stack_services(&topo).replacen(
        "\n\n[[service]]\nname = \"echo6\"",
        &format!("\n{HEALTH}\n[[service]]\nname = \"echo6\""),
        1,
    );
    assert!(services.contains(HEALTH));
    let sw = started(&topo, &services);
    sw.wait_for(Duration::from_secs(5), "web6's backends up", |st| {
        service(st, "web6")["colours"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["backends"].as_array().unwrap())
            .all(|b| b["health"] == "up")
    });
    sw.cli_ok(&[
        "flip",
        "web6",
        "--watch",
        "30s",
        "--reason",
        "release 4 (v6)",
    ])
    .unwrap();
    let cli = topo.client_ns().to_string();
    assert_eq!(colour(&http_get(&cli, web6(), "/").unwrap().body), "green");
    // g1's IPv6 server stops; its IPv4 one keeps answering.
    let broke = Instant::now();
    topo.stop_server6("g1").unwrap();
    let st = sw.wait_for(Duration::from_secs(3), "automatic rollback", |st| {
        service(st, "web6")["active"] == "blue"
    });
    eprintln!(
        "rolled back {:?} after g1's v6 server stopped",
        broke.elapsed()
    );
    let why = service(&st, "web6")["rolled_back"].as_str().unwrap();
    let g1 = format!("[{}]:{HTTP_PORT}", topo.backend("g1").addr6);
    assert!(why.contains("health") && why.contains(&g1), "{why}");
    for _ in 0..4 {
        assert_eq!(colour(&http_get(&cli, web6(), "/").unwrap().body), "blue");
    }
    let text = sw.cli_ok(&["history", "web6"]).unwrap();
    assert!(text.contains("automatic rollback"), "{text}");
    // The IPv4 service was not part of it.
    assert_eq!(service(&st, "web")["active"], "blue");
    assert!(topo.http_server("g1").is_some(), "g1's IPv4 server runs on");
}

/// A global data-plane counter from `status --json`.
fn counter(sw: &Switcher, name: &str) -> u64 {
    let st = sw.status().unwrap();
    st["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {st}"))
}

/// Bytes in each transfer across a narrow link: thousands of segments.
const BULK: usize = 4 << 20;

/// One blue and one green backend, `opts`' links, all four services.
fn setup_narrow(opts: TopologyOptions) -> (Topology, Switcher) {
    require_root();
    let topo = served_topology_with(TopologyOptions {
        blue: 1,
        green: 1,
        ..opts
    })
    .expect("topology with servers");
    let sw = started(&topo, &dual_stack_services(&topo));
    (topo, sw)
}

/// Downloads (or uploads) [`BULK`] bytes through `to`, byte for byte,
/// served by `want`; prints how long it took.
fn transfer(topo: &Topology, sw: &Switcher, to: SocketAddr, upload: bool, want: &str) {
    let (t, what) = if upload {
        let data = bgswitch_tests::servers::bulk_pattern(BULK);
        (http_upload(topo.client_ns(), to, &data), "to")
    } else {
        (http_download(topo.client_ns(), to, BULK), "from")
    };
    let t = t.unwrap_or_else(|e| {
        panic!(
            "{BULK} bytes {what} {to}: {e:#}\n{:#}\n{}",
            sw.status().unwrap()["counters"],
            sw.log_tail()
        )
    });
    assert_eq!(t.backend, want, "through {to}");
    eprintln!("{BULK} bytes {what} {to} ({want}) in {:?}", t.elapsed);
}

/// The path MTU namespace `ns` has learned towards `dst` (the `mtu` of
/// `ip route get`, which shows a cached exception), if any.
fn learned_mtu(ns: &str, dst: std::net::IpAddr) -> Option<u32> {
    let o = bgswitch_tests::ns_exec(ns, "ip", &["route", "get", &dst.to_string()]).unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

#[test]
fn downloads_through_both_vips_cross_a_1280_byte_client_link_before_and_after_a_flip() {
    let (topo, sw) = setup_narrow(TopologyOptions {
        client_mtu: Some(1280),
        ..TopologyOptions::default()
    });
    for to in [web(), web6()] {
        transfer(&topo, &sw, to, false, "b1");
    }
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.cli_ok(&["flip", "web6"]).unwrap();
    for to in [web(), web6()] {
        transfer(&topo, &sw, to, false, "g1");
    }
    // The client's MSS fits its own link: nothing was too big.
    assert_eq!(counter(&sw, "icmp_too_big_sent"), 0);
}

/// A hop narrower than both ends' links (the lb's end of the client link,
/// 1280 bytes; client and backends 1500, so the backend sends segments of
/// the client's MSS): each backend's first reply too long for the hop gets
/// a "fragmentation needed" / "packet too big" from the program, translated
/// to be about its reply (from the client), and the backend's kernel
/// lowers its path MTU towards the client — per backend, so again after
/// the flip. (TCP aggregates (GSO) too long for the hop are not cut into
/// an error: they pass to the stack, which drops them and addresses its
/// error to the VIP, where it is lost; the backend retransmits them at the
/// MTU it learned from the program's error about a single segment.)
#[test]
fn path_mtu_discovery_through_both_vips_for_downloads_across_a_narrower_hop() {
    let (topo, sw) = setup_narrow(TopologyOptions {
        lb_client_mtu: Some(1280),
        ..TopologyOptions::default()
    });
    let client = |to: SocketAddr| match to {
        SocketAddr::V4(_) => bgswitch_tests::CLIENT_ADDR.into(),
        SocketAddr::V6(_) => bgswitch_tests::CLIENT_ADDR6.into(),
    };
    for want in ["b1", "g1"] {
        let ns = topo.backend(want).ns.clone();
        for to in [web(), web6()] {
            assert_eq!(learned_mtu(&ns, client(to)), None, "{want}, {to}");
            let (sent, translated) = (
                counter(&sw, "icmp_too_big_sent"),
                counter(&sw, "icmp_translated"),
            );
            transfer(&topo, &sw, to, false, want);
            let sent = counter(&sw, "icmp_too_big_sent") - sent;
            let translated = counter(&sw, "icmp_translated") - translated;
            assert!(sent >= 1, "{want} through {to}: no error sent");
            assert!(translated >= sent, "{sent} sent, {translated} translated");
            assert_eq!(
                learned_mtu(&ns, client(to)),
                Some(1280),
                "{want} learned the hop's MTU towards the client ({to})"
            );
        }
        if want == "b1" {
            sw.cli_ok(&["flip", "web"]).unwrap();
            sw.cli_ok(&["flip", "web6"]).unwrap();
        }
    }
}

/// The same narrower hop on the backend side (the lb's end of its backend
/// link, 1280 bytes): a client's upload segments too long for it get the
/// error from the VIP about the client's packet to the VIP, so the
/// client's kernel lowers its path MTU towards the VIP. That MTU belongs to
/// the VIP, not a backend: after the flip green's uploads need no error.
#[test]
fn path_mtu_discovery_through_both_vips_for_uploads_across_a_narrower_hop() {
    let (topo, sw) = setup_narrow(TopologyOptions {
        lb_backend_mtu: Some(1280),
        ..TopologyOptions::default()
    });
    let cli = topo.client_ns().to_string();
    for to in [web(), web6()] {
        assert_eq!(learned_mtu(&cli, to.ip()), None, "{to}");
        let sent = counter(&sw, "icmp_too_big_sent");
        transfer(&topo, &sw, to, true, "b1");
        assert!(
            counter(&sw, "icmp_too_big_sent") > sent,
            "{to}: no error sent"
        );
        assert_eq!(learned_mtu(&cli, to.ip()), Some(1280), "towards {to}");
    }
    let sent = counter(&sw, "icmp_too_big_sent");
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.cli_ok(&["flip", "web6"]).unwrap();
    for to in [web(), web6()] {
        transfer(&topo, &sw, to, true, "g1");
    }
    assert_eq!(counter(&sw, "icmp_too_big_sent"), sent);
}

/// UDP through the same narrower hop, as an application that does its own
/// path MTU discovery (QUIC, DNS) sees it: a connected socket that sets
/// "don't fragment" sends a datagram too long for the hop; the program's
/// error comes back from the VIP about it, so the socket's next receive
/// reports EMSGSIZE, the kernel refuses the next datagram that long at
/// once, and one that fits is answered.
#[test]
fn udp_datagrams_too_long_for_a_narrower_hop_get_the_error_through_both_vips() {
    use std::os::fd::AsRawFd;
    let (topo, sw) = setup_narrow(TopologyOptions {
        lb_backend_mtu: Some(1280),
        ..TopologyOptions::default()
    });
    let cli = topo.client_ns().to_string();
    for to in [echo(), echo6()] {
        let sock = bgswitch_tests::in_netns(&cli, || {
            let local: SocketAddr = match to {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            std::net::UdpSocket::bind(local)
        })
        .unwrap()
        .unwrap();
        let (level, name, value) = match to {
            SocketAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            ),
            SocketAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            ),
        };
        // SAFETY: setsockopt(2) on our socket with an int option.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        sock.connect(to).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let sent = counter(&sw, "icmp_too_big_sent");
        let mut buf = [0u8; 2048];
        assert_eq!(sock.send(&[b'x'; 1400]).unwrap(), 1400, "{to}");
        let err = bgswitch_tests::retry_eintr(|| sock.recv(&mut buf))
            .expect_err("the error, not an answer");
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{to}: {err}");
        assert_eq!(counter(&sw, "icmp_too_big_sent"), sent + 1, "{to}");
        assert_eq!(learned_mtu(&cli, to.ip()), Some(1280), "towards {to}");
        let err = sock.send(&[b'x'; 1400]).expect_err("known too long");
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{to}: {err}");
        let fits = [b'y'; 1200];
        sock.send(&fits).unwrap();
        let n = bgswitch_tests::retry_eintr(|| sock.recv(&mut buf)).unwrap();
        assert_eq!(n, "blue b1 ".len() + fits.len(), "{to}");
        assert!(buf.starts_with(b"blue b1 y"), "{to}");
    }
}
