//! Flips under load: the real daemon flips `web` and `echo` back and forth
//! (60 times each by default, in well under a minute) while keep-alive HTTP
//! connections, new HTTP connections, a sequence-numbered UDP stream and new
//! UDP flows run through the VIP. Pass criteria (printed as a table): no
//! failed TCP connection or request, no response from the wrong colour or
//! backend, no lost, duplicated or misdirected UDP datagram in steady state.
//! `BGSWITCH_SOAK_FLIPS` changes the number of flips.

use bgswitch_tests::{
    soak::{self, SoakOptions},
    switcher::{default_services, Switcher, HTTP_PORT, UDP_PORT},
    Topology, TopologyOptions,
};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged test: run as root (cargo xtask test)"
    );
}

#[test]
fn flips_under_load_fail_no_request_and_misdirect_nothing() {
    require_root();
    // Senders compute full checksums, as real NICs deliver them (see e2e.rs).
    let mut topo = Topology::create(TopologyOptions {
        tx_csum_off: true,
        ..TopologyOptions::default()
    })
    .expect("topology");
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
