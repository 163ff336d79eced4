//! End to end: the real daemon and CLI switching real TCP and UDP traffic
//! between real servers in network namespaces.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use bgswitch_tests::{
    http_get,
    switcher::{
        colour, default_services, require_root, served_and_started as setup, served_topology,
        RequestLoad, Switcher, HTTP_PORT, UDP_PORT,
    },
    Colour, KeepAliveClient, Topology, UdpClient, VIP,
};

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}
fn echo() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, UDP_PORT)
}

#[test]
fn flip_moves_new_connections_while_open_ones_finish_on_blue() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    for _ in 0..8 {
        let r = http_get(&cli, web(), "/").unwrap_or_else(|e| {
            panic!(
                "request through the VIP: {e:#}\n{}\n{}",
                sw.cli(&["status"]).map(|o| o.stdout).unwrap_or_default(),
                sw.log_tail()
            )
        });
        assert_eq!(colour(&r.body), "blue", "{r:?}\n{}", sw.log_tail());
    }
    // A long-lived connection opened before the flip.
    let mut long = KeepAliveClient::connect(&cli, web()).unwrap();
    let first = long.get("/").unwrap();
    assert_eq!(colour(&first.body), "blue");

    let out = sw
        .cli_ok(&["flip", "web", "--reason", "release 2"])
        .unwrap();
    assert!(out.contains("blue → green"), "{out}");

    for i in 0..3 {
        let r = long.get("/").unwrap();
        assert_eq!(
            r.body, first.body,
            "open connection must stay on its backend (request {i})"
        );
    }
    let mut greens = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(colour(&r.body), "green", "{r:?}");
        greens.insert(r.backend);
    }
    assert_eq!(
        greens.len(),
        2,
        "new flows spread over both green backends: {greens:?}"
    );
    // A request that is in flight during the flip completes on blue.
    let st = sw.status().unwrap();
    let web_st = &st["services"][0];
    assert_eq!(web_st["active"], "green");
    assert_eq!(web_st["colours"][0]["colour"], "blue");
    assert!(
        web_st["colours"][0]["live_flows"].as_u64().unwrap() >= 1,
        "{web_st}"
    );
    assert!(web_st["colours"][1]["new_flows"].as_u64().unwrap() >= 16);
    drop(long);

    let out = sw.cli_ok(&["rollback", "web"]).unwrap();
    assert!(out.contains("green → blue"), "{out}");
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "blue");
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["generation"], 3);
    assert_eq!(st["services"][0]["last_change"]["kind"], "rollback");
    let text = sw.cli_ok(&["status", "web"]).unwrap();
    assert!(text.contains("active: blue"), "{text}");
    // Veths with the kernel's default offloads: `auto` takes TC, and says why.
    assert!(text.contains("interfaces: lbb (tc) lbc (tc)"), "{text}");
    assert!(
        text.contains("lbb: TC (tcx link): auto: a virtual device (no driver behind it)"),
        "{text}"
    );
}

#[test]
fn udp_flows_are_pinned_and_new_ones_follow_the_flip() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    let old = UdpClient::new(&cli).unwrap();
    let a = old.request(echo(), b"1").unwrap();
    assert!(a.starts_with("blue "), "{a}\n{}", sw.log_tail());
    sw.cli_ok(&["flip", "echo", "--to", "green"]).unwrap();
    let b = old.request(echo(), b"2").unwrap();
    assert_eq!(
        a.split(' ').nth(1),
        b.split(' ').nth(1),
        "same backend after the flip"
    );
    assert!(b.starts_with("blue "), "{b}");
    let fresh = UdpClient::new(&cli).unwrap();
    let c = fresh.request(echo(), b"3").unwrap();
    assert!(c.starts_with("green "), "{c}");
    // Flipping again to the active colour changes nothing and succeeds.
    let out = sw.cli_ok(&["flip", "echo", "--to", "green"]).unwrap();
    assert!(out.contains("already green"), "{out}");
}

#[test]
fn daemon_killed_and_restarted_under_load_loses_nothing() {
    let (topo, mut sw) = setup();
    sw.cli_ok(&["flip", "web"]).unwrap();
    let load = RequestLoad::start(topo.client_ns(), web(), Colour::Green);
    std::thread::sleep(Duration::from_millis(500));
    sw.kill();
    let during = load.counts().ok;
    std::thread::sleep(Duration::from_millis(1000));
    assert!(load.counts().ok > during, "traffic flows with no daemon");
    sw.start().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let seen = load.stop();
    let st = sw.status().unwrap();
    assert_eq!(
        st["services"][0]["active"], "green",
        "state kept across SIGKILL"
    );
    assert_eq!(st["services"][0]["generation"], 2);
    assert_eq!(st["interfaces"][0]["adopted"], true, "{st}");
    assert!(
        st["services"][0]["colours"][1]["new_flows"]
            .as_u64()
            .unwrap()
            >= seen.ok,
        "counters survive the restart: {st}"
    );
    assert_eq!(seen.failed, 0, "no failed request\n{}", sw.log_tail());
    assert_eq!(seen.wrong, 0, "no request reached blue");
    assert!(seen.ok > 20);
    eprintln!("{} requests, none failed", seen.ok);
}

#[test]
fn bad_config_is_refused_and_the_running_state_kept() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    sw.cli_ok(&["flip", "web"]).unwrap();
    let good = std::fs::read_to_string(sw.config_path()).unwrap();
    for (bad, key) in [
        (good.replace("\"lbb\"", "\"nosuch0\""), "interfaces[1]"),
        (
            good.replace("198.19.0.10:5353", "198.19.0.10:8080")
                .replace("protocol = \"udp\"", "protocol = \"tcp\""),
            "service[1] (echo).vip",
        ),
        (
            good.replace(
                "green = [\"198.18.1.21:8080\", \"198.18.1.22:8080\"]",
                "green = []",
            ),
            "service[0] (web).green",
        ),
        (
            good.replace("198.18.1.11:8080", "198.18.1.300:8080"),
            "service[0] (web).blue[0]",
        ),
        (good.clone() + "\nthis is not toml", "line"),
    ] {
        sw.write_config(&bad).unwrap();
        let out = sw.cli(&["reload"]).unwrap();
        assert_ne!(out.code, 0, "bad config must be refused: {bad}");
        assert!(
            out.stderr.contains(&sw.config_path().display().to_string()),
            "names the file: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(key),
            "names the key {key}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("unchanged"), "{}", out.stderr);
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(
            colour(&r.body),
            "green",
            "traffic keeps flowing on the running state"
        );
    }
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["active"], "green");
    assert_eq!(st["services"].as_array().unwrap().len(), 2);
    // A good reload that adds nothing keeps the state too.
    sw.write_config(&good).unwrap();
    sw.cli_ok(&["reload"]).unwrap();
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "green");
}

#[test]
fn unknown_service_and_bad_requests_get_clear_errors() {
    let (_topo, sw) = setup();
    let out = sw.cli(&["flip", "nosuch"]).unwrap();
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim(),
        "bgswitch: error: no service named 'nosuch'"
    );
    let out = sw.cli(&["rollback", "web"]).unwrap();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("no flip to roll back"),
        "{}",
        out.stderr
    );
    // Raw garbage on the socket: refused, daemon still answers.
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sw.socket()).unwrap();
    s.write_all(b"{\"cmd\":\"format_disk\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(
        line.contains("\"ok\":false") && line.contains("malformed request"),
        "{line}"
    );
    assert_eq!(sw.status().unwrap()["services"][0]["generation"], 1);
    assert!(sw.log().contains("malformed request refused"));
}

#[test]
fn detach_removes_programs_and_pins_and_a_second_daemon_is_refused() {
    let (topo, mut sw) = setup();
    let (code, err) = sw.start_expect_failure().unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("another bgswitch daemon"), "{err}");
    sw.cli_ok(&["detach"])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sw.log_tail()));
    sw.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!sw.bpffs().join("bgswitch").exists(), "pins removed");
    let out = std::process::Command::new("ip")
        .args(["-n", topo.lb_ns(), "link", "show", "lbc"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("xdp"), "XDP detached: {text}");
    assert!(
        http_get(topo.client_ns(), web(), "/").is_err(),
        "VIP no longer served"
    );
}

#[test]
fn sigterm_keeps_the_data_plane_attached_and_a_reboot_comes_back_on_the_saved_colour() {
    let (topo, mut sw) = setup();
    let cli = topo.client_ns().to_string();
    sw.cli_ok(&["flip", "web", "--reason", "go green"]).unwrap();
    assert_eq!(sw.stop().unwrap(), Some(0), "SIGTERM exits cleanly");
    for _ in 0..3 {
        let r = http_get(&cli, web(), "/").expect("XDP keeps switching with the daemon stopped");
        assert_eq!(colour(&r.body), "green");
    }
    // A reboot loses bpffs: remove every pin (which also detaches XDP).
    // With no daemon, `detach` removes nothing without --force.
    let config = sw.config_path().display().to_string();
    let out = sw.cli(&["detach", "--config", &config]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert!(sw.bpffs().join("bgswitch").exists(), "nothing removed");
    assert_eq!(colour(&http_get(&cli, web(), "/").unwrap().body), "green");
    let out = sw.cli(&["detach", "--force", "--config", &config]).unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("no daemon answered"), "{}", out.stdout);
    // The kernel releases a link whose last reference went away a moment later.
    let t = Instant::now();
    while http_get(&cli, web(), "/").is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "nothing switches the VIP now"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sw.start().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(
        st["services"][0]["active"], "green",
        "never silently back on blue"
    );
    assert_eq!(st["services"][0]["generation"], 2);
    assert_eq!(st["interfaces"][0]["adopted"], false);
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "green");
}

#[test]
fn forced_flip_moves_open_flows_too() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    let mut long = KeepAliveClient::connect(&cli, web()).unwrap();
    assert_eq!(colour(&long.get("/").unwrap().body), "blue");
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["colours"][0]["live_flows"], 1);
    let out = sw
        .cli_ok(&["flip", "web", "--force", "--reason", "blue is broken"])
        .unwrap();
    assert!(out.contains("moved 1 open flows"), "{out}");
    // The open connection now reaches a green backend, which does not know it.
    assert!(
        long.get("/").is_err(),
        "a moved connection breaks (that is what --force means)"
    );
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["colours"][0]["live_flows"], 0, "{st}");
    assert_eq!(st["services"][0]["last_change"]["forced"], true);
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "green");
}

/// `web` with `stateless = true` and a short TCP idle timeout (5 s), so
/// transitions end within the test.
fn setup_stateless() -> (Topology, Switcher) {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let services = default_services(&topo).replacen(
        "protocol = \"tcp\"\n",
        "protocol = \"tcp\"\nstateless = true\n",
        1,
    );
    let mut sw =
        Switcher::new(&topo, &format!("tcp_idle_timeout = \"5s\"\n{services}")).expect("switcher");
    sw.start().expect("daemon starts");
    (topo, sw)
}

/// Waits up to `within` for `web`'s fast path to be `want`; its status then.
fn wait_fast_path(sw: &Switcher, want: &str, within: Duration) -> serde_json::Value {
    let end = Instant::now() + within;
    loop {
        let st = sw.status().unwrap();
        let web = st["services"][0].clone();
        if web["fast_path"] == want {
            return web;
        }
        assert!(
            Instant::now() < end,
            "web's fast path is {} after {within:?}, not {want}\n{}",
            web["fast_path"],
            sw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stateless_service_keeps_connections_through_a_flip_and_a_routing_rule() {
    let (topo, sw) = setup_stateless();
    let cli = topo.client_ns().to_string();
    // No flow needs a record: the stable period starts at once.
    wait_fast_path(&sw, "stateless", Duration::from_secs(5));
    let mut long = KeepAliveClient::connect(&cli, web()).unwrap();
    let first = long.get("/").unwrap();
    assert_eq!(colour(&first.body), "blue");
    for _ in 0..6 {
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(colour(&r.body), "blue", "{r:?}");
    }
    let st = sw.status().unwrap();
    assert!(st["counters"]["stateless"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["backend_hops"], true, "the default rules: {st}");
    let web_st = &st["services"][0];
    assert_eq!(web_st["colours"][0]["recorded_flows"], 0, "{web_st}");
    assert_eq!(web_st["colours"][0]["untracked"], true, "{web_st}");

    // The flip: the open connection, which has no record, stays on its
    // blue backend; new connections go green.
    // Blue is not drained while connections of its stable period may live,
    // which no record counts.
    let out = sw
        .cli(&["flip", "web", "--wait-drained", "--timeout", "1s"])
        .unwrap();
    assert_eq!(out.code, 4, "a wait that ran out: {out:?}");
    assert!(out.stderr.contains("stateless period"), "{out:?}");
    let web_st = wait_fast_path(&sw, "transition", Duration::from_secs(1));
    assert_eq!(web_st["active"], "green");
    assert_eq!(web_st["colours"][0]["untracked"], true, "{web_st}");
    for i in 0..3 {
        let r = long.get("/").unwrap();
        assert_eq!(r.body, first.body, "request {i} of the open connection");
    }
    for _ in 0..6 {
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(colour(&r.body), "green", "{r:?}");
    }
    let st = sw.status().unwrap();
    assert!(st["counters"]["orphans"].as_u64().unwrap() >= 1, "{st}");
    let text = sw.cli_ok(&["status", "web"]).unwrap();
    assert!(text.contains("transition:"), "{text}");
    assert!(
        text.contains("1 recorded connection on another backend"),
        "{text}"
    );

    // While the open connection lives, its record disagrees with the active
    // pool's hash, so the transition cannot end; the daemon reads the whole
    // flow table to see whether it may at most every 5 s (not every second).
    let st = sw.status().unwrap();
    let t = &st["services"][0]["transition"];
    assert_eq!(t["disagreeing"], 1, "{st}");
    assert_eq!(t["idle_timeout_s"], 5, "{st}");
    let scans0 = st["flow_table_scans"].as_u64().unwrap();
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_secs(2));
        // Keeps its record live (the idle timeout is 5 s).
        assert_eq!(long.get("/").unwrap().body, first.body);
    }
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["fast_path"], "transition", "{st}");
    assert!(st["services"][0]["transition"]["since_s"].as_u64().unwrap() >= 12);
    // This status's own read, and one to three for the transition (a read
    // at most every 5 s; checked once a second, so 5 to 6 s apart).
    let scans = st["flow_table_scans"].as_u64().unwrap() - scans0;
    assert!(
        (2..=4).contains(&scans),
        "{scans} reads of the flow table in 12 s of a transition"
    );

    // The connection ends; after the idle timeout the transition is over
    // and its records are gone.
    drop(long);
    let web_st = wait_fast_path(&sw, "stateless", Duration::from_secs(15));
    assert_eq!(web_st["colours"][0]["recorded_flows"], 0, "{web_st}");
    assert_eq!(web_st["colours"][1]["recorded_flows"], 0, "{web_st}");
    assert!(
        sw.log().contains("stable period begins"),
        "{}",
        sw.log_tail()
    );
    for _ in 0..4 {
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(colour(&r.body), "green", "{r:?}");
    }

    // A source-based routing rule: a next hop per backend would be wrong
    // for some clients, so the service records its flows again.
    bgswitch_tests::ip_ns(
        topo.lb_ns(),
        &[
            "rule",
            "add",
            "from",
            "198.18.0.0/15",
            "lookup",
            "main",
            "pref",
            "100",
        ],
    )
    .unwrap();
    wait_fast_path(&sw, "transition", Duration::from_secs(3));
    assert!(sw.log().contains("routing rule"), "{}", sw.log_tail());
    // Table services' new flows look their own next hops up too.
    let st = sw.status().unwrap();
    assert_eq!(st["backend_hops"], false, "{st}");
    let text = sw.cli_ok(&["status"]).unwrap();
    assert!(
        text.contains("next hops: every new flow looks its own up"),
        "{text}"
    );
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "green", "{r:?}");
    bgswitch_tests::ip_ns(topo.lb_ns(), &["rule", "del", "pref", "100"]).unwrap();
    wait_fast_path(&sw, "stateless", Duration::from_secs(15));
    assert_eq!(sw.status().unwrap()["backend_hops"], true);
}

#[test]
fn a_stateless_services_period_and_transition_survive_daemon_kills() {
    let (topo, mut sw) = setup_stateless();
    let cli = topo.client_ns().to_string();
    wait_fast_path(&sw, "stateless", Duration::from_secs(5));
    let mut long = KeepAliveClient::connect(&cli, web()).unwrap();
    let first = long.get("/").unwrap();
    assert_eq!(colour(&first.body), "blue");

    // Killed in a stable period: XDP keeps switching; the next daemon finds
    // the period in the pinned control word and keeps it (no transition).
    sw.kill();
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "blue");
    sw.start().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["fast_path"], "stateless", "{st}");
    assert_eq!(long.get("/").unwrap().body, first.body);

    // Killed in a transition: the next daemon keeps the orphan pool, so the
    // connection of the stable period stays on its blue backend.
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.kill();
    sw.start().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["fast_path"], "transition", "{st}");
    assert_eq!(st["services"][0]["active"], "green", "{st}");
    for i in 0..3 {
        let r = long.get("/").unwrap();
        assert_eq!(r.body, first.body, "request {i} of the open connection");
    }
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "green", "{r:?}");
    // The new daemon ends the transition once the connection is gone.
    drop(long);
    wait_fast_path(&sw, "stateless", Duration::from_secs(15));
    let r = http_get(&cli, web(), "/").unwrap();
    assert_eq!(colour(&r.body), "green", "{r:?}");
}
