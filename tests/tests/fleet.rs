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
    a.sw.cli_ok(&["flip", "web", "--force"]).unwrap();
}
