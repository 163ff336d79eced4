//! Flips under load: the real daemon flips `web` and `echo` back and forth
//! (60 times each by default, in well under a minute) while keep-alive HTTP
//! connections, new HTTP connections, a sequence-numbered UDP stream and new
//! UDP flows run through the VIP. Pass criteria (printed as a table): no
//! failed TCP connection or request, no response from the wrong colour or
//! backend, no lost, duplicated or misdirected UDP datagram in steady state.
//! `BGSWITCH_SOAK_FLIPS` changes the number of flips.
//!
//! The same load and criteria also run against the peers a sysadmin would
//! use instead — nftables DNAT swapped with `nft -f`, and HAProxy (`mode
//! tcp`) switched through its runtime API — with a short, fixed number of
//! flips, for the comparison in the benchmark issue. The tests run one at a
//! time so that they do not share the CPUs.

use std::sync::Mutex;
use std::time::Instant;

use bgswitch_tests::{
    soak::{self, Haproxy, NftDnat, SoakOptions, SoakReport, Switch},
    switcher::{default_services, require_root, served_topology, Switcher, HTTP_PORT, UDP_PORT},
    Topology, TopologyOptions,
};

/// One run at a time: the criteria are timing-sensitive.
static SERIAL: Mutex<()> = Mutex::new(());

/// Flips of each peer run: short, fixed (not `BGSWITCH_SOAK_FLIPS`).
const PEER_FLIPS: usize = 20;

#[test]
fn flips_under_load_fail_no_request_and_misdirect_nothing() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The kernel's default offloads, as containers and VMs send.
    let mut topo = Topology::create(TopologyOptions::default()).expect("topology");
    topo.start_servers(HTTP_PORT, UDP_PORT).expect("servers");
    let mut sw = Switcher::new(&topo, &default_services(&topo)).expect("switcher");
    sw.start().expect("daemon starts");
    let mut opts = SoakOptions::default();
    if let Some(n) = std::env::var("BGSWITCH_SOAK_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        opts.flips = n;
    }
    let report = soak::run(&topo, &sw, &opts).expect("the load runs");
    println!("{}", report.table());
    let status = sw.cli(&["status"]).map(|o| o.stdout).unwrap_or_default();
    println!("{status}");
    let final_state = soak::check_final_state(&sw, &report);
    assert!(
        report.passed(),
        "pass criteria not met:\n{}\n{}",
        report.table(),
        sw.log_tail()
    );
    final_state.expect("the daemon counted every flip");
}

/// Criteria by name, for the peers' assertions.
fn measured(report: &SoakReport, name: &str) -> String {
    report
        .criteria
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.value.clone())
        .unwrap_or_else(|| panic!("no criterion {name:?} in\n{}", report.table()))
}

/// What every peer run must show: the harness ran — every flip made, traffic
/// of each kind carried. The rest is the comparison table, printed.
fn assert_ran(report: &SoakReport) {
    let failed = report
        .criteria
        .iter()
        .filter(|c| c.name.starts_with("flips of web") || c.want == "> 0")
        .find(|c| !c.ok);
    assert!(
        failed.is_none(),
        "the harness did not run:\n{}",
        report.table()
    );
}

/// nftables DNAT under the same load: flips swap the whole `nat` table with
/// one `nft -f`. Conntrack keeps open flows (keep-alive connections, the UDP
/// stream) on their backend and new flows follow the rules in place when
/// their first packet passes, so this peer is held to the same criteria as
/// bgswitch: nothing failed, nothing misdirected.
#[test]
fn nftables_dnat_under_the_same_load() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let topo = served_topology().expect("topology");
    let mut switch = Switch::Nft(NftDnat::start(&topo).expect("nftables ruleset"));
    let opts = SoakOptions {
        flips: PEER_FLIPS,
        ..SoakOptions::default()
    };
    let report = soak::run_with(&topo, &mut switch, &opts).expect("the load runs");
    println!("{}", report.table());
    println!("nftables run with set-up: {:.1?}", t.elapsed());
    assert_ran(&report);
    assert!(
        report.passed(),
        "pass criteria not met:\n{}",
        report.table()
    );
}

/// HAProxy (`mode tcp`) under the same load, `web` only (HAProxy in `mode
/// tcp` cannot carry UDP; the table says the UDP criteria are skipped):
/// flips set the new colour's servers `ready` and the old colour's `drain`
/// through the runtime API. Open connections stay on their server, new ones
/// go to the ready colour, so the TCP criteria are asserted as for bgswitch.
#[test]
fn haproxy_under_the_same_load() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let topo = served_topology().expect("topology");
    let haproxy = Haproxy::start(&topo).expect("haproxy");
    let mut switch = Switch::Haproxy(haproxy);
    let opts = SoakOptions {
        flips: PEER_FLIPS,
        ..SoakOptions::default()
    };
    let report = soak::run_with(&topo, &mut switch, &opts).expect("the load runs");
    println!("{}", report.table());
    println!("HAProxy run with set-up: {:.1?}", t.elapsed());
    assert_ran(&report);
    assert_eq!(measured(&report, "UDP stream and new UDP flows"), "skipped");
    let log = match &switch {
        Switch::Haproxy(h) => h.log(),
        _ => unreachable!(),
    };
    assert!(
        report.passed(),
        "pass criteria not met:\n{}\nhaproxy log:\n{log}",
        report.table()
    );
}
