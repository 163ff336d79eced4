//! Shared network-namespace test bed for bgswitch.
//!
//! Used by the integration tests of this crate and by `cargo xtask demo`.
//! Everything here needs root on Linux, plus iproute2 (`ip`) and `ethtool`.
//!
//! * [`netns`]: run code inside a named network namespace ([`in_netns`]) and
//!   run iproute2 commands ([`ip`], [`ns_exec`]).
//! * [`topology`]: [`Topology`], a client, a load-balancer namespace, a
//!   bridge and blue/green backends, all in namespaces of their own and
//!   deleted on drop.
//! * [`servers`]: HTTP and UDP servers running on threads of this process
//!   with their sockets in a backend namespace.
//! * [`clients`]: HTTP (one-shot and keep-alive) and UDP clients with
//!   timeouts on every operation.
//! * [`flood`]: spoofed TCP SYN floods from a namespace (raw socket).
//!
//! ```no_run
//! use bgswitch_tests::{http_get, Topology, TopologyOptions, VIP};
//! use std::net::SocketAddrV4;
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut topo = Topology::create(TopologyOptions::default())?;
//! topo.start_servers(80, 5353)?;
//! // ... start the daemon in topo.lb_ns() on topo.lb_interfaces() ...
//! let reply = http_get(topo.client_ns(), SocketAddrV4::new(VIP, 80), "/")?;
//! assert_eq!(reply.body, "blue b1\n");
//! # Ok(())
//! # }
//! ```

pub mod clients;
pub mod fleet;
pub mod flood;
pub mod flowhash;
mod http;
pub mod netns;
pub mod peers;
pub mod rng;
pub mod servers;
pub mod soak;
pub mod switcher;
pub mod topology;

pub use clients::{
    http_get, udp_request, HttpReply, KeepAliveClient, UdpClient, CONNECT_TIMEOUT, IO_TIMEOUT,
};
pub use netns::{
    in_netns, ip, ip_ns, is_root, list_netns, netns_exists, ns_exec, require_privileged,
};
pub use servers::{HttpServer, UdpEchoServer};
pub use topology::{
    cleanup_stale, Backend, Colour, TempNetns, Topology, TopologyOptions, CLIENT_ADDR,
    CLIENT_ADDR6, LB_BACKEND_ADDR, LB_BACKEND_ADDR6, LB_CLIENT_ADDR, LB_CLIENT_ADDR6, VIP, VIP6,
};

/// Runs a blocking socket call again when it returns EINTR: a call with a
/// timeout (SO_RCVTIMEO) does so when the process is stopped and continued
/// (signal(7)), which says nothing about the peer.
pub fn retry_eintr<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Pins the calling thread to the `cpu`-th CPU it may run on (modulo their
/// number), so BPF_PROG_TEST_RUN runs the program on that CPU and its
/// per-CPU state (flow-cache slots) is deterministic. The CPUs are those of
/// the affinity the first caller had (before any pin narrowed it).
pub fn pin_to_cpu(cpu: usize) {
    static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    let allowed = ALLOWED.get_or_init(|| {
        // SAFETY: a zeroed cpu_set_t is valid.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: sched_getaffinity fills a set of the size it is given.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i is below CPU_SETSIZE.
            .filter(|&i| rc == 0 && unsafe { libc::CPU_ISSET(i, &set) })
            .collect();
        if cpus.is_empty() {
            vec![0]
        } else {
            cpus
        }
    });
    let target = allowed[cpu % allowed.len()];
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET within its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(target, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;
    use std::time::{Duration, Instant};

    const HTTP_PORT: u16 = 8080;
    const UDP_PORT: u16 = 5353;

    /// The whole test bed without the daemon: the VIP is unreachable, the
    /// backends answer from the load-balancer namespace, and dropping the
    /// topology removes every namespace.
    #[test]
    fn topology_without_xdp() {
        require_privileged("topology_without_xdp");
        let started = Instant::now();
        let mut topo = Topology::create(TopologyOptions::default()).expect("create topology");
        topo.start_servers(HTTP_PORT, UDP_PORT)
            .expect("start servers");
        println!(
            "created topology {} with {} namespaces in {:?}",
            topo.prefix(),
            topo.namespaces().len(),
            started.elapsed()
        );
        let prefix = topo.prefix().to_owned();
        let names = topo.namespaces().to_vec();
        let listed = list_netns().unwrap();
        for ns in &names {
            assert!(listed.contains(ns), "{ns} missing from {listed:?}");
        }
        assert_eq!(topo.lb_interfaces(), ["lbc", "lbb"]);
        assert_eq!(topo.backends().len(), 4);
        assert_eq!(topo.backend("g2").addr.to_string(), "198.18.1.22");
        assert_eq!(topo.backend("b1").colour.to_string(), "blue");

        // The client cannot reach the VIP: nothing forwards or answers yet.
        let vip = SocketAddrV4::new(VIP, HTTP_PORT);
        let t = Instant::now();
        let err = http_get(topo.client_ns(), vip, "/").expect_err("VIP must be unreachable");
        println!(
            "client -> VIP (HTTP) failed after {:?} as expected: {err:#}",
            t.elapsed()
        );
        assert!(t.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1));
        let mut udp = UdpClient::new(topo.client_ns()).unwrap();
        udp.set_timeout(Duration::from_millis(300)).unwrap();
        let err = udp
            .request(SocketAddrV4::new(VIP, UDP_PORT), b"ping")
            .expect_err("VIP must be unreachable over UDP");
        println!("client -> VIP (UDP) failed as expected: {err:#}");

        // The lb namespace sits on the backend subnet and reaches every backend.
        for backend in topo.backends() {
            let addr = SocketAddrV4::new(backend.addr, HTTP_PORT);
            let reply = http_get(topo.lb_ns(), addr, "/").unwrap();
            println!(
                "lb -> {} ({}): {} {:?}",
                backend.name, backend.addr, reply.status, reply.body
            );
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body, format!("{} {}\n", backend.colour, backend.name));
            assert_eq!(reply.backend, backend.name);
            let echo = udp_request(
                topo.lb_ns(),
                SocketAddrV4::new(backend.addr, UDP_PORT),
                b"hello",
            )
            .unwrap();
            assert_eq!(echo, format!("{} {} hello", backend.colour, backend.name));
        }

        // Keep-alive: many requests, one connection.
        let b1 = topo.backend("b1").clone();
        let b1_addr = SocketAddrV4::new(b1.addr, HTTP_PORT);
        let before = topo.http_server("b1").unwrap().connections_accepted();
        let mut client = KeepAliveClient::connect(topo.lb_ns(), b1_addr).unwrap();
        for _ in 0..20 {
            assert_eq!(client.get("/").unwrap().body, "blue b1\n");
        }
        let t = Instant::now();
        assert_eq!(client.get("/sleep/200").unwrap().backend, "b1");
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            topo.http_server("b1").unwrap().connections_accepted(),
            before + 1
        );

        // Stopping a server refuses new connections and ends open ones.
        topo.stop_server("b1").unwrap();
        assert!(
            client.get("/").is_err(),
            "keep-alive connection must be shut down"
        );
        let err = http_get(topo.lb_ns(), b1_addr, "/").expect_err("b1 is stopped");
        println!("lb -> b1 after stop_server failed as expected: {err:#}");
        topo.start_server("b1").unwrap();
        assert_eq!(
            http_get(topo.lb_ns(), b1_addr, "/").unwrap().body,
            "blue b1\n"
        );

        drop(topo);
        let listed = list_netns().unwrap();
        let left: Vec<_> = listed.iter().filter(|ns| ns.starts_with(&prefix)).collect();
        println!(
            "after drop: {} namespaces left with prefix {prefix}",
            left.len()
        );
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// With IP forwarding on in the lb namespace (what the daemon does), plain
    /// routing already carries client traffic to the backends and back: the
    /// addressing, routes, bridge and rp_filter settings are consistent.
    #[test]
    fn routing_through_lb() {
        require_privileged("routing_through_lb");
        let mut topo = Topology::create(TopologyOptions::default()).unwrap();
        topo.start_servers(HTTP_PORT, UDP_PORT).unwrap();
        ns_exec(topo.lb_ns(), "sysctl", &["-w", "net.ipv4.ip_forward=1"]).unwrap();
        let client = UdpClient::new(topo.client_ns()).unwrap();
        for backend in topo.backends() {
            let reply = http_get(
                topo.client_ns(),
                SocketAddrV4::new(backend.addr, HTTP_PORT),
                "/",
            )
            .unwrap();
            assert_eq!(reply.backend, backend.name);
            let (echo, from) = client
                .request_from(SocketAddrV4::new(backend.addr, UDP_PORT), b"x")
                .unwrap();
            assert_eq!(echo, format!("{} {} x", backend.colour, backend.name));
            assert_eq!(from, SocketAddrV4::new(backend.addr, UDP_PORT).into());
        }
        println!(
            "client reached all {} backends through the lb namespace from {}",
            topo.backends().len(),
            client.local_addr().unwrap()
        );
    }

    /// The IPv6 twin of `routing_through_lb`: with nothing but the lb
    /// namespace's IPv6 forwarding (on from the start), the client reaches
    /// every backend's IPv6 address over TCP and UDP and the answers come
    /// back through the lb (the backends' default route), while the IPv6 VIP
    /// answers nothing and IPv4 is not forwarded (the daemon's to turn on).
    #[test]
    fn routing_through_lb_v6() {
        require_privileged("routing_through_lb_v6");
        use std::net::{IpAddr, SocketAddr};
        let mut topo = Topology::create(TopologyOptions::default()).unwrap();
        topo.start_servers(HTTP_PORT, UDP_PORT).unwrap();
        let client = UdpClient::new6(topo.client_ns()).unwrap();
        for backend in topo.backends() {
            let http = SocketAddr::new(backend.addr6.into(), HTTP_PORT);
            let reply = http_get(topo.client_ns(), http, "/").unwrap();
            assert_eq!(reply.backend, backend.name);
            assert_eq!(reply.body, format!("{} {}\n", backend.colour, backend.name));
            let udp = SocketAddr::new(backend.addr6.into(), UDP_PORT);
            let (echo, from) = client.request_from(udp, b"x6").unwrap();
            assert_eq!(echo, format!("{} {} x6", backend.colour, backend.name));
            assert_eq!(from, udp);
            // `udp_request` binds a socket of the address's family.
            let echo = udp_request(topo.client_ns(), udp, b"y").unwrap();
            assert_eq!(echo, format!("{} {} y", backend.colour, backend.name));
        }
        let b1 = topo.backend("b1");
        assert_eq!(topo.http_server6("b1").unwrap().connections_accepted(), 1);
        assert_eq!(topo.http_server("b1").unwrap().connections_accepted(), 0);
        assert_eq!(
            topo.http_server6("b1").unwrap().local_addr(),
            SocketAddr::new(b1.addr6.into(), HTTP_PORT)
        );
        assert_eq!(
            client.local_addr().unwrap().ip(),
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        );
        // The lb reaches the backends' IPv6 addresses on its own segment.
        let reply = http_get(
            topo.lb_ns(),
            SocketAddr::new(topo.backend("g2").addr6.into(), HTTP_PORT),
            "/",
        )
        .unwrap();
        assert_eq!(reply.body, "green g2\n");
        // Nothing answers for the IPv6 VIP (the lb has no route for it).
        let t = Instant::now();
        let err = http_get(
            topo.client_ns(),
            SocketAddr::new(VIP6.into(), HTTP_PORT),
            "/",
        )
        .expect_err("the IPv6 VIP must be unreachable");
        println!(
            "client -> VIP6 failed after {:?} as expected: {err:#}",
            t.elapsed()
        );
        assert!(t.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1));
        // IPv4 forwarding stays off: the daemon under test turns it on.
        let err = http_get(topo.client_ns(), SocketAddrV4::new(b1.addr, HTTP_PORT), "/")
            .expect_err("IPv4 is not forwarded yet");
        println!("client -> b1 over IPv4 failed as expected: {err:#}");
        println!(
            "client reached all {} backends over IPv6 through the lb namespace",
            topo.backends().len()
        );
    }

    /// `client_mtu`: both ends of the client's link take the MTU, and a
    /// download of many segments crosses it through the lb (plain
    /// forwarding) over both families.
    #[test]
    fn a_narrow_client_link_carries_downloads_of_both_families() {
        require_privileged("a_narrow_client_link_carries_downloads_of_both_families");
        use std::net::SocketAddr;
        let mut topo = Topology::create(TopologyOptions {
            blue: 1,
            green: 0,
            client_mtu: Some(1280),
            ..TopologyOptions::default()
        })
        .unwrap();
        topo.start_servers(HTTP_PORT, UDP_PORT).unwrap();
        for (ns, link) in [
            (topo.client_ns(), "c0"),
            (topo.lb_ns(), "lbc"),
            (topo.lb_ns(), "lbb"),
        ] {
            let out = ns_exec(ns, "cat", &[&format!("/sys/class/net/{link}/mtu")]).unwrap();
            let mtu = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let want = if link == "lbb" { "1500" } else { "1280" };
            assert_eq!(mtu, want, "{link} in {ns}");
        }
        ns_exec(topo.lb_ns(), "sysctl", &["-w", "net.ipv4.ip_forward=1"]).unwrap();
        let b1 = topo.backend("b1").clone();
        const N: usize = 1 << 20;
        for addr in [b1.addr.into(), b1.addr6.into()] {
            let to: SocketAddr = SocketAddr::new(addr, HTTP_PORT);
            let t = clients::http_download(topo.client_ns(), to, N).unwrap();
            assert_eq!(t.backend, "b1");
            println!(
                "{N} bytes from {to} across the 1280-byte link in {:?}",
                t.elapsed
            );
        }
    }

    /// Several topologies at once, from several threads, with a custom shape
    /// and TX checksum offload turned off.
    #[test]
    fn parallel_topologies() {
        require_privileged("parallel_topologies");
        let handles: Vec<_> = (0..3)
            .map(|i| {
                std::thread::spawn(move || {
                    let opts = TopologyOptions {
                        blue: 1,
                        green: i + 1,
                        ..TopologyOptions::default()
                    };
                    let mut topo = Topology::create(opts).expect("create topology");
                    topo.start_servers(80, 53).expect("start servers");
                    let green = topo.backend(&format!("g{}", i + 1)).clone();
                    let reply =
                        http_get(topo.lb_ns(), SocketAddrV4::new(green.addr, 80), "/x").unwrap();
                    assert_eq!(reply.body, format!("green g{}\n", i + 1));
                    topo.prefix().to_owned()
                })
            })
            .collect();
        let prefixes: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let listed = list_netns().unwrap();
        for prefix in &prefixes {
            assert!(!listed.iter().any(|ns| ns.starts_with(prefix.as_str())));
        }
        println!("parallel topologies {prefixes:?} created, used and removed");
    }

    /// Namespaces of a dead process are removed; ours are kept.
    #[test]
    fn cleanup_removes_only_dead_owners() {
        require_privileged("cleanup_removes_only_dead_owners");
        // A pid that just exited (reuse within the test is very unlikely).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = format!("bgs{dead}x0-cli");
        let ours = format!("bgs{}x999999-cli", std::process::id());
        ip(&["netns", "add", &stale]).unwrap();
        ip(&["netns", "add", &ours]).unwrap();
        cleanup_stale("bgs");
        let stale_gone = !netns_exists(&stale);
        let ours_kept = netns_exists(&ours);
        let _ = ip(&["netns", "del", &stale]);
        let _ = ip(&["netns", "del", &ours]);
        assert!(stale_gone, "{stale} should have been removed");
        assert!(ours_kept, "{ours} belongs to a live process");
    }

    /// Many concurrent connections and long-lived requests.
    #[test]
    fn concurrent_connections() {
        require_privileged("concurrent_connections");
        let mut topo = Topology::create(TopologyOptions {
            blue: 1,
            green: 0,
            ..TopologyOptions::default()
        })
        .unwrap();
        topo.start_servers(80, 53).unwrap();
        let addr = SocketAddrV4::new(topo.backend("b1").addr, 80);
        let lb = topo.lb_ns().to_owned();
        let clients: Vec<_> = (0..100)
            .map(|_| KeepAliveClient::connect(&lb, addr).unwrap())
            .collect();
        let t = Instant::now();
        let handles: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                std::thread::spawn(move || {
                    let reply = client.get("/sleep/300").unwrap();
                    client.get("/").unwrap();
                    reply.body
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), "blue b1\n");
        }
        println!("100 concurrent /sleep/300 requests took {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(3));
        let server = topo.http_server("b1").unwrap();
        assert_eq!(server.connections_accepted(), 100);
        assert_eq!(server.requests_served(), 200);

        // Stopping interrupts a long sleep quickly.
        let mut sleeper = KeepAliveClient::connect(&lb, addr).unwrap();
        let waiter = std::thread::spawn(move || sleeper.get("/sleep/60000"));
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        topo.stop_server("b1").unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t.elapsed()
        );
        assert!(waiter.join().unwrap().is_err());
    }
}
