//! A fleet of load-balancer hosts switching as one through etcd, with real
//! parts: Debian's etcd in a namespace of its own, two load balancers (each
//! a whole served test bed: clients, bridge, backends) whose daemons share
//! one desired state.

use std::time::{Duration, Instant};

use bgswitch_tests::{
    fleet::{fleet_table, Etcd},
    http_get,
    switcher::{default_services, require_root, served_topology, service, Switcher, HTTP_PORT},
    Topology, VIP,
};

/// One load-balancer host: its test bed and its daemon.
struct Host {
    topo: Topology,
    sw: Switcher,
}

fn host(etcd: &mut Etcd, name: &str, services: &str, env: &[(&str, &str)]) -> Host {
    let topo = served_topology().expect("topology with servers");
    let endpoints = etcd.link(topo.lb_ns()).expect("linked to etcd");
    let mut sw = Switcher::new(
        &topo,
        &format!("{services}\n{}", fleet_table(&endpoints, "test", name)),
    )
    .expect("switcher");
    sw.start_with_env(env).expect("daemon starts");
    Host { topo, sw }
}

/// etcd and two hosts, lb1 and lb2, with the default services.
fn fleet(env2: &[(&str, &str)]) -> (Etcd, Host, Host) {
    require_root();
    let mut etcd = Etcd::start(1).expect("etcd");
    let services = |t: &Topology| default_services(t);
    let a = {
        let topo = served_topology().expect("topology with servers");
        let endpoints = etcd.link(topo.lb_ns()).expect("linked to etcd");
        let mut sw = Switcher::new(
            &topo,
            &format!(
                "{}\n{}",
                services(&topo),
                fleet_table(&endpoints, "test", "lb1")
            ),
        )
        .expect("switcher");
        sw.start().expect("daemon starts");
        Host { topo, sw }
    };
    let b = {
        let topo = served_topology().expect("topology with servers");
        let s = services(&topo);
        drop(topo);
        host(&mut etcd, "lb2", &s, env2)
    };
    wait_live(&a, 2);
    (etcd, a, b)
}

fn fleet_status(h: &Host) -> serde_json::Value {
    let out = h.sw.cli(&["status", "--fleet", "--json"]).unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap()
}

fn wait_live(h: &Host, n: usize) {
    let start = Instant::now();
    loop {
        let f = fleet_status(h);
        let live = f["hosts"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|h| h["live"] == true).count());
        if live == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{n} live hosts: {f:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn active(h: &Host) -> String {
    service(&h.sw.status().unwrap(), "web")["active"]
        .as_str()
        .unwrap()
        .to_string()
}

fn generation(h: &Host) -> u64 {
    service(&h.sw.status().unwrap(), "web")["generation"]
        .as_u64()
        .unwrap()
}

/// The colour a new connection through the host's VIP reaches.
fn served(h: &Host) -> String {
    let r = http_get(h.topo.client_ns(), (VIP, HTTP_PORT), "/").unwrap();
    r.body.split_whitespace().next().unwrap_or("").to_string()
}

fn wait_active(h: &Host, colour: &str, within: Duration) {
    let start = Instant::now();
    while active(h) != colour {
        assert!(
            start.elapsed() < within,
            "{colour} not applied within {within:?}\n{}",
            h.sw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_flip_on_one_host_is_applied_by_all_and_fleet_wait_returns_after_the_last() {
    let (_etcd, a, b) = fleet(&[]);
    assert_eq!((served(&a), served(&b)), ("blue".into(), "blue".into()));
    let out =
        a.sw.cli(&["flip", "web", "--reason", "release 7", "--fleet-wait", "5s"])
            .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("applied by every live host (2)"),
        "{out:?}"
    );
    // --fleet-wait returned after lb2 applied it: no waiting here.
    assert_eq!(active(&b), "green");
    assert_eq!((served(&a), served(&b)), ("green".into(), "green".into()));
    assert_eq!(generation(&a), generation(&b));
    // The fleet's journal: who, why, from which host; read on either host.
    let h: serde_json::Value =
        serde_json::from_str(&b.sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let last = h.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "flip");
    assert_eq!(last["host"], "lb1");
    assert_eq!(last["reason"], "release 7");
    // Status --fleet: both hosts, their generation, all up.
    let f = fleet_status(&b);
    let svc = f["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()
        .clone();
    assert_eq!(svc["active"], "green");
    for h in f["hosts"].as_array().unwrap() {
        assert_eq!(h["live"], true);
        assert_eq!(h["report"]["applied"]["web"], svc["generation"]);
    }
    let text = b.sw.cli_ok(&["status", "--fleet"]).unwrap();
    assert!(
        text.contains("lb1") && text.contains("lb2") && text.contains("lag 0"),
        "{text}"
    );
    // A rollback from the other host goes everywhere too.
    b.sw.cli_ok(&["rollback", "web", "--fleet-wait", "5s"])
        .unwrap();
    assert_eq!(active(&a), "blue");
}

#[test]
fn of_two_concurrent_changes_one_wins_and_every_host_converges() {
    // lb2 sees the fleet's changes 1.5 s late: its change, made meanwhile,
    // is made against a state the fleet no longer has.
    let (_etcd, a, b) = fleet(&[("BGSWITCH_FAULT_DELAY_FOLLOW_MS", "1500")]);
    a.sw.cli_ok(&["flip", "web", "--reason", "from lb1"])
        .unwrap();
    let out =
        b.sw.cli(&["shift", "web", "--to", "green", "--percent", "10"])
            .unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("changed elsewhere")
            && out.stderr.contains("flip blue → green by root on lb1"),
        "{out:?}"
    );
    // lb2 follows the winner; both agree.
    wait_active(&b, "green", Duration::from_secs(5));
    assert_eq!(generation(&a), generation(&b));
    assert_eq!(served(&b), "green");
}

#[test]
fn with_etcd_down_traffic_stays_changes_are_refused_and_a_local_rollback_propagates() {
    let (mut etcd, a, b) = fleet(&[]);
    a.sw.cli_ok(&["flip", "web", "--fleet-wait", "5s"]).unwrap();
    etcd.stop();
    // Fail static: traffic as it was.
    assert_eq!((served(&a), served(&b)), ("green".into(), "green".into()));
    let out = a.sw.cli(&["flip", "web"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("unreachable")
            && out.stderr.contains("nothing changed")
            && out.stderr.contains("--local"),
        "{out:?}"
    );
    assert_eq!(active(&a), "green");
    let st = a.sw.status().unwrap();
    assert_eq!(st["fleet"]["reachable"], false, "{st:#}");
    assert!(st["fleet"]["unreachable_since_ms"].as_u64().is_some());
    // The emergency path: at once, on this host alone.
    let t = Instant::now();
    let msg = a.sw.cli_ok(&["rollback", "web", "--local"]).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(msg.contains("on this host alone"), "{msg}");
    assert_eq!(served(&a), "blue");
    assert_eq!(served(&b), "green");
    let st = a.sw.status().unwrap();
    assert_eq!(st["fleet"]["diverged"][0], "web");

    // A daemon (re)started while etcd is down serves what it last applied.
    let mut b = b;
    b.sw.kill();
    b.sw.start().unwrap();
    assert_eq!(active(&b), "green");
    assert_eq!(served(&b), "green");

    // etcd back: the fleet had not moved, so lb1's rollback is the fleet's.
    etcd.restart().unwrap();
    wait_active(&b, "blue", Duration::from_secs(15));
    assert_eq!(served(&b), "blue");
    let start = Instant::now();
    while a.sw.status().unwrap()["fleet"]["diverged"]
        .as_array()
        .is_some_and(|d| !d.is_empty())
    {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(generation(&a), generation(&b));
}

#[test]
fn a_host_cut_off_from_etcd_misses_changes_says_so_and_catches_up_in_order() {
    let (etcd, a, b) = fleet(&[]);
    etcd.cut(b.topo.lb_ns(), true).unwrap();
    a.sw.cli_ok(&["flip", "web"]).unwrap();
    a.sw.cli_ok(&["shift", "web", "--to", "blue", "--percent", "25"])
        .unwrap();
    // lb2 keeps what it had, and says it is cut off once it tries etcd.
    assert_eq!(active(&b), "blue");
    let out = b.sw.cli(&["flip", "web"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("unreachable"), "{out:?}");
    assert_eq!(b.sw.status().unwrap()["fleet"]["reachable"], false);
    // Back: it catches up to the fleet's latest state.
    etcd.cut(b.topo.lb_ns(), false).unwrap();
    wait_active(&b, "green", Duration::from_secs(15));
    let start = Instant::now();
    while generation(&b) != generation(&a) {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    let sb = b.sw.status().unwrap();
    assert_eq!(service(&sb, "web")["canary_percent"], 25.0);
    assert_eq!(sb["fleet"]["reachable"], true);
}

#[test]
fn hosts_with_other_definitions_are_flagged_and_changes_refused_until_forced() {
    require_root();
    let mut etcd = Etcd::start(1).expect("etcd");
    let topo = served_topology().unwrap();
    let services = default_services(&topo);
    drop(topo);
    let a = host(&mut etcd, "lb1", &services, &[]);
    // lb2's green pool is one backend short.
    let topo2 = served_topology().unwrap();
    let mut other = default_services(&topo2);
    drop(topo2);
    let g2 = format!(", \"198.18.1.22:{HTTP_PORT}\"");
    assert!(other.contains(&g2));
    other = other.replacen(&g2, "", 1);
    let _b = host(&mut etcd, "lb2", &other, &[]);
    wait_live(&a, 2);
    let text = a.sw.cli_ok(&["status", "--fleet"]).unwrap();
    assert!(text.contains("DEFINITIONS DIFFER"), "{text}");
    let out = a.sw.cli(&["flip", "web"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("lb2 serves another definition of web"),
        "{out:?}"
    );
    let out =
        a.sw.cli(&["shift", "web", "--to", "green", "--percent", "5"])
            .unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("lb2 serves another definition"),
        "{out:?}"
    );
    // A rollback is never held up by it.
    a.sw.cli_ok(&["flip", "web", "--force"]).unwrap();
    a.sw.cli_ok(&["rollback", "web"]).unwrap();
}

/// `ip netns exec NS curl --local-port PORT http://VIP/`: the backend that
/// answers a connection from one fixed 5-tuple.
fn backend_for(h: &Host, port: u16) -> String {
    let out = bgswitch_tests::ns_exec(
        h.topo.client_ns(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "3",
            "--local-port",
            &port.to_string(),
            &format!("http://{VIP}:{HTTP_PORT}/"),
        ],
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_same_flow_reaches_the_same_backend_through_every_host() {
    let (_etcd, a, b) = fleet(&[]);
    a.sw.cli_ok(&["flip", "web", "--fleet-wait", "5s"]).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41016 {
        let (x, y) = (backend_for(&a, port), backend_for(&b, port));
        assert!(x.starts_with("green "), "{x}");
        assert_eq!(x, y, "client port {port}");
        seen.insert(x);
    }
    // Not one backend for all: the choice spreads.
    assert!(seen.len() > 1, "{seen:?}");
}

#[test]
fn a_watch_runs_on_every_host_and_the_first_that_sees_green_fail_rolls_back_for_all() {
    require_root();
    let mut etcd = Etcd::start(1).expect("etcd");
    let with_health = |t: &Topology| {
        let mut s = default_services(t);
        let at = s
            .find("\n\n[[service]]\nname = \"echo\"")
            .expect("echo service");
        s.insert_str(at, &format!("\n{}", bgswitch_tests::switcher::HEALTH));
        s
    };
    let topo = served_topology().unwrap();
    let services = with_health(&topo);
    drop(topo);
    let a = host(&mut etcd, "lb1", &services, &[]);
    let mut b = host(&mut etcd, "lb2", &services, &[]);
    wait_live(&a, 2);
    // A green backend down as lb2 sees it: a flip on lb1 is refused,
    // naming the host and the backend.
    b.topo.stop_server("g1").unwrap();
    let start = Instant::now();
    loop {
        let out = a.sw.cli(&["flip", "web"]).unwrap();
        if out.code == 1
            && out
                .stderr
                .contains("lb2 sees green unhealthy: 198.18.1.21:8080")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never refused for lb2's view: {out:?}"
        );
        if out.code == 0 {
            a.sw.cli_ok(&["rollback", "web"]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(active(&b), "blue");
    b.topo.start_server("g1").unwrap();
    // Every host sees every backend up before the flip.
    let start = Instant::now();
    while a.sw.cli(&["flip", "web", "--watch", "60s"]).unwrap().code != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            a.sw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_active(&b, "green", Duration::from_secs(5));
    // Green fails as lb2 sees it (its own green backends), not as lb1 does.
    for g in ["g1", "g2"] {
        b.topo.stop_server(g).unwrap();
    }
    wait_active(&a, "blue", Duration::from_secs(10));
    wait_active(&b, "blue", Duration::from_secs(5));
    let h: serde_json::Value =
        serde_json::from_str(&a.sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let rollbacks: Vec<_> = h
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "auto_rollback")
        .collect();
    assert_eq!(rollbacks.len(), 1, "one rollback for the fleet: {h:#}");
    assert_eq!(rollbacks[0]["host"], "lb2");
    assert!(
        rollbacks[0]["reason"]
            .as_str()
            .unwrap()
            .contains("failed health checks"),
        "{:#}",
        rollbacks[0]
    );
    for g in ["g1", "g2"] {
        b.topo.start_server(g).unwrap();
    }
}

#[test]
fn a_confirmation_deadline_is_enforced_by_any_live_host() {
    let (_etcd, mut a, b) = fleet(&[]);
    a.sw.cli_ok(&[
        "flip",
        "web",
        "--confirm-within",
        "3s",
        "--fleet-wait",
        "5s",
    ])
    .unwrap();
    assert_eq!(active(&b), "green");
    // The host the flip was made on goes away; lb2 keeps the deadline.
    a.sw.kill();
    wait_active(&b, "blue", Duration::from_secs(8));
    let st = b.sw.status().unwrap();
    assert!(
        service(&st, "web")["rolled_back"]
            .as_str()
            .unwrap()
            .contains("not confirmed"),
        "{st:#}"
    );
}

#[test]
fn a_three_member_etcd_loses_its_leader_during_flips_under_load() {
    require_root();
    let mut etcd = Etcd::start(3).expect("etcd");
    let topo = served_topology().unwrap();
    let services = default_services(&topo);
    drop(topo);
    let a = host(&mut etcd, "lb1", &services, &[]);
    let b = host(&mut etcd, "lb2", &services, &[]);
    wait_live(&a, 2);
    let loads = [
        bgswitch_tests::switcher::RequestLoad::start(
            a.topo.client_ns(),
            (VIP, HTTP_PORT),
            bgswitch_tests::Colour::Blue,
        ),
        bgswitch_tests::switcher::RequestLoad::start(
            b.topo.client_ns(),
            (VIP, HTTP_PORT),
            bgswitch_tests::Colour::Blue,
        ),
    ];
    let first = generation(&a);
    let mut refused = 0;
    for i in 0..20 {
        if i == 6 {
            let leader = etcd.leader().unwrap();
            etcd.stop_member(leader);
        }
        let to = if i % 2 == 0 { "green" } else { "blue" };
        // A flip refused while the members elect a leader is asked again;
        // one that was made although its answer was lost says so then
        // ("already …, nothing changed").
        let start = Instant::now();
        loop {
            let out =
                a.sw.cli(&["flip", "web", "--to", to, "--fleet-wait", "5s"])
                    .unwrap();
            if out.code == 0 {
                break;
            }
            refused += 1;
            assert!(
                out.stderr.contains("etcd") || out.stderr.contains("not applied"),
                "{out:?}"
            );
            assert!(start.elapsed() < Duration::from_secs(20), "{out:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_active(&b, to, Duration::from_secs(5));
    }
    let counts: Vec<_> = loads.into_iter().map(|l| l.stop()).collect();
    for c in &counts {
        assert_eq!(c.failed, 0, "{counts:?}");
        assert!(c.ok + c.wrong > 20, "{counts:?}");
    }
    // Every flip once: 20 generations, the same on both hosts, and the
    // fleet's journal has each exactly once.
    assert_eq!(generation(&a), first + 20, "{refused} refused attempts");
    assert_eq!(generation(&b), generation(&a));
    let h: serde_json::Value =
        serde_json::from_str(&b.sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let gens: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "ok" && e["kind"] == "flip")
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, ((first + 1)..=(first + 20)).collect::<Vec<_>>());
}

#[test]
fn a_standby_taking_over_under_load_serves_the_same_colour_and_keeps_stateless_connections() {
    require_root();
    let mut etcd = Etcd::start(1).expect("etcd");
    let topo = served_topology().unwrap();
    let standby = bgswitch_tests::fleet::Standby::create(&topo).expect("standby");
    // `web` stateless, with a short idle timeout: its transitions end
    // within the test.
    let services = format!(
        "tcp_idle_timeout = \"5s\"\n{}",
        default_services(&topo).replacen(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nstateless = true\n",
            1
        )
    );
    let endpoints = etcd.link(topo.lb_ns()).unwrap();
    let mut active_sw = Switcher::new(
        &topo,
        &format!("{services}\n{}", fleet_table(&endpoints, "test", "lb1")),
    )
    .unwrap();
    active_sw.start().unwrap();
    let endpoints = etcd.link(standby.ns()).unwrap();
    let mut standby_sw = Switcher::new_in(
        &topo,
        standby.ns(),
        "standby",
        &format!("{services}\n{}", fleet_table(&endpoints, "test", "lb2")),
    )
    .unwrap();
    standby_sw.start().unwrap();
    let a = Host {
        topo,
        sw: active_sw,
    };
    wait_live(&a, 2);
    a.sw.cli_ok(&["flip", "web", "--fleet-wait", "5s"]).unwrap();
    // The flip's transition ends on both hosts: a stable period, nothing
    // recorded per connection.
    for sw in [&a.sw, &standby_sw] {
        let start = Instant::now();
        while service(&sw.status().unwrap(), "web")["fast_path"] != "stateless" {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{}",
                sw.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let cli = a.topo.client_ns().to_string();
    let mut open: Vec<(bgswitch_tests::KeepAliveClient, String)> = (0..4)
        .map(|_| {
            let mut c = bgswitch_tests::KeepAliveClient::connect(&cli, (VIP, HTTP_PORT)).unwrap();
            let body = c.get("/").unwrap().body;
            assert!(body.starts_with("green "), "{body}");
            (c, body)
        })
        .collect();
    let load = bgswitch_tests::switcher::RequestLoad::start(
        &cli,
        (VIP, HTTP_PORT),
        bgswitch_tests::Colour::Green,
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = load.counts();
    standby.take_over().unwrap();
    // The open connections go on, through the standby, to the same backend.
    for (c, body) in &mut open {
        let again = c.get("/").unwrap().body;
        assert_eq!(&again, body);
    }
    // New connections go through the standby (one caught in the take-over
    // may wait out its connect timeout first).
    let start = Instant::now();
    while load.counts().ok <= before.ok + 5 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = load.stop();
    assert!(
        after.ok > before.ok + 5,
        "new connections through the standby: {before:?} → {after:?}"
    );
    assert_eq!(after.wrong, 0, "{after:?}");
    // The standby is the fleet's: a flip made there reaches the active too.
    standby_sw
        .cli_ok(&["flip", "web", "--fleet-wait", "5s"])
        .unwrap();
    assert_eq!(active(&a), "blue");
    let r = http_get(&cli, (VIP, HTTP_PORT), "/").unwrap();
    assert!(r.body.starts_with("blue "), "{}", r.body);
    drop(standby_sw);
    drop(standby);
}

#[test]
fn a_local_change_gives_way_when_the_fleet_moved_meanwhile() {
    let (etcd, a, b) = fleet(&[]);
    a.sw.cli_ok(&["flip", "web", "--fleet-wait", "5s"]).unwrap();
    // lb1 cut off: its emergency rollback is its own.
    etcd.cut(a.topo.lb_ns(), true).unwrap();
    let out = a.sw.cli(&["flip", "web"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    a.sw.cli_ok(&["rollback", "web", "--local"]).unwrap();
    assert_eq!(served(&a), "blue");
    // Meanwhile the fleet moves on without lb1.
    b.sw.cli_ok(&["shift", "web", "--to", "blue", "--percent", "20"])
        .unwrap();
    let fleet_generation = generation(&b);
    // lb1 back: the fleet's state wins over its local rollback.
    etcd.cut(a.topo.lb_ns(), false).unwrap();
    wait_active(&a, "green", Duration::from_secs(15));
    let start = Instant::now();
    while generation(&a) != fleet_generation {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            a.sw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = a.sw.status().unwrap();
    assert_eq!(service(&st, "web")["canary_percent"], 20.0);
    assert!(
        st["fleet"]["diverged"]
            .as_array()
            .is_some_and(|d| d.is_empty()),
        "{st:#}"
    );
    assert!(
        a.sw.log().contains("the fleet's state wins"),
        "{}",
        a.sw.log_tail()
    );
    // lb2 never left the fleet's state.
    assert_eq!(active(&b), "green");
}
