//! A spoofed SYN flood does not break established connections: the real
//! daemon with the smallest flow table (`max_flows = 1024`) serves one TCP
//! service (a table service, not stateless) through the VIP; an idle
//! keep-alive connection opened on blue keeps being served by its blue
//! backend after a flip to green although 4000 spoofed SYNs (each from its
//! own address of 198.19.128.0/17, nobody's in the test bed, with a random
//! port) reached the data plane in between — more half-open flows than the
//! table holds — while new connections go to green; and after a flood new
//! connections (keep-alive ones too) are recorded and served normally,
//! `status` answers as before, and a flip made while a flood arrives
//! completes.
//!
//! The flood is sent from the client namespace through a raw socket, so it
//! takes the client's own path to the load balancer (TC on the veths, the
//! kernel's default offloads); the daemon's counters prove it was
//! forwarded, so no test passes because the frames were lost on the way.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use bgswitch_tests::{
    flood::{send_syn_flood, FloodReport, SynFlood},
    http_get,
    switcher::{colour, require_root, served_topology, service, Switcher, HTTP_PORT},
    Colour, KeepAliveClient, Topology, CLIENT_ADDR, LB_BACKEND_ADDR, LB_CLIENT_ADDR, VIP,
};

/// Spoofed SYNs per flood: about four times the flow table's 1024 entries.
const FLOOD: usize = 4000;

/// Where the spoofed sources come from: the upper half of 198.19.0.0/16
/// (the VIP, 198.19.0.10, is in the lower half), inside the test bed's
/// 198.18.0.0/15 and used by nothing in it.
const FLOOD_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
/// The prefix length of [`FLOOD_NET`].
const FLOOD_PREFIX: u8 = 17;

/// The smallest flow table the config accepts.
const MAX_FLOWS: u32 = 1024;

/// How long the flood's half-open flows sit in the data plane before the
/// idle connection speaks again: longer than a flow-cache slot stays fresh
/// (one refresh, 100 ms), so its next packet takes the flow table.
const SETTLE: Duration = Duration::from_millis(200);

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

/// The one service: `web`, HTTP on the VIP, the topology's blue and green
/// backends, the flow table's path (no `stateless`).
fn web_only(topo: &Topology) -> String {
    let pool = |c: Colour| {
        topo.backends_of(c)
            .map(|b| format!("\"{}:{HTTP_PORT}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nblue = [{}]\ngreen = [{}]\n",
        web(),
        pool(Colour::Blue),
        pool(Colour::Green),
    )
}

/// The default test bed with a daemon serving [`web_only`] with a flow
/// table of [`MAX_FLOWS`] entries; checks that the flood's sources are
/// none of the test bed's addresses.
fn setup() -> (Topology, Switcher) {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let flood = flood();
    let used = [CLIENT_ADDR, LB_CLIENT_ADDR, LB_BACKEND_ADDR, VIP]
        .into_iter()
        .chain(topo.backends().iter().map(|b| b.addr));
    for addr in used {
        assert!(
            !flood.contains(addr),
            "{addr} is in the flood's {FLOOD_NET}/{FLOOD_PREFIX}"
        );
    }
    let services = web_only(&topo);
    let mut sw = Switcher::new(&topo, &services).expect("switcher");
    let text = sw.config_text(&services);
    assert!(text.contains("max_flows = 65536"), "{text}");
    sw.write_config(&text.replace("max_flows = 65536", &format!("max_flows = {MAX_FLOWS}")))
        .expect("write the config");
    sw.start().expect("daemon starts");
    (topo, sw)
}

/// The flood of these tests: [`FLOOD`] SYNs from [`FLOOD_NET`].
fn flood() -> SynFlood {
    SynFlood::new(FLOOD_NET, FLOOD_PREFIX, FLOOD)
}

/// The status of colour `c` of `web` in a `status --json` answer.
fn web_colour(st: &serde_json::Value, c: Colour) -> &serde_json::Value {
    service(st, "web")["colours"]
        .as_array()
        .and_then(|all| all.iter().find(|x| x["colour"] == c.as_str()))
        .unwrap_or_else(|| panic!("no colour {c} in web's status: {st}"))
}

/// A counter of colour `c` of `web`.
fn count(st: &serde_json::Value, c: Colour, name: &str) -> u64 {
    web_colour(st, c)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} for {c}: {st}"))
}

/// `web`'s flow counts per colour, in one line (for messages).
fn flows(st: &serde_json::Value) -> String {
    [Colour::Blue, Colour::Green]
        .map(|c| {
            format!(
                "{c}: {} live, {} recorded, {} unanswered SYNs",
                count(st, c, "live_flows"),
                count(st, c, "recorded_flows"),
                count(st, c, "unanswered_syns"),
            )
        })
        .join("; ")
}

/// Sends the flood from the client namespace to the VIP while the service
/// sends new flows to `to`, waits [`SETTLE`], and checks that the flood
/// reached the data plane: every SYN was sent and at least 90 % of them
/// were forwarded to `to` (its packet counter). Prints what the counters
/// saw; returns the flood's report and the status after it.
fn flood_the_vip(topo: &Topology, sw: &Switcher, to: Colour) -> (FloodReport, serde_json::Value) {
    let before = sw.status().expect("status before the flood");
    let flood = flood();
    let report = send_syn_flood(topo.client_ns(), web(), &flood)
        .unwrap_or_else(|e| panic!("the flood: {e:#}"));
    std::thread::sleep(SETTLE);
    let after = sw.status().expect("status after the flood");
    let delta = |name: &str| count(&after, to, name) - count(&before, to, name);
    let (packets, new_flows) = (delta("packets"), delta("new_flows"));
    eprintln!(
        "flood: {} of {FLOOD} spoofed SYNs sent in {:?} from {} CPUs ({} retries, seed {}); \
         {to}: +{packets} packets, +{new_flows} new flows, {} recorded flows, \
         +{} SYN-ACKs; {}; counters {}",
        report.sent,
        report.elapsed,
        report.cpus,
        report.retries,
        report.seed,
        count(&after, to, "recorded_flows"),
        delta("syn_acks"),
        flows(&after),
        after["counters"],
    );
    assert_eq!(report.sent, FLOOD, "every spoofed SYN sent: {report:?}");
    assert!(
        packets >= FLOOD as u64 * 9 / 10,
        "the flood did not reach the data plane: {packets} of {FLOOD} SYNs forwarded to {to}\n{}\n{}",
        service(&after, "web"),
        sw.log_tail()
    );
    (report, after)
}

#[test]
fn a_spoofed_syn_flood_after_a_flip_does_not_break_a_connection_draining_on_blue() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    let mut idle = KeepAliveClient::connect(&cli, web()).expect("keep-alive connection");
    let first = idle
        .get("/")
        .unwrap_or_else(|e| panic!("first request: {e:#}\n{}", sw.log_tail()));
    assert_eq!(colour(&first.body), "blue", "{first:?}");

    let out = sw
        .cli_ok(&["flip", "web", "--reason", "release 2 under a SYN flood"])
        .unwrap();
    assert!(out.contains("blue → green"), "{out}");
    let st = sw.status().unwrap();
    assert_eq!(count(&st, Colour::Blue, "live_flows"), 1, "the idle one");

    let (report, after) = flood_the_vip(&topo, &sw, Colour::Green);

    // The idle connection speaks again: still its blue backend.
    let t = Instant::now();
    let next = idle.get("/").unwrap_or_else(|e| {
        panic!(
            "the idle keep-alive connection (served by {}) after {} spoofed SYNs: {e:#} \
             (after {:?})\nweb after the flood: {}\n{}",
            first.backend,
            report.sent,
            t.elapsed(),
            flows(&after),
            sw.log_tail()
        )
    });
    assert_eq!(
        (colour(&next.body), next.backend.as_str()),
        ("blue", first.backend.as_str()),
        "the idle connection drains on its blue backend after the flood: {next:?}"
    );
    // The flood's SYNs were recorded half-open, and no packet of an open
    // connection found its record missing.
    let st = sw.status().unwrap();
    let counter = |name: &str| st["counters"][name].as_u64().unwrap_or(0);
    assert!(
        counter("half_open") >= FLOOD as u64 * 9 / 10,
        "{}",
        st["counters"]
    );
    assert_eq!(counter("record_missing"), 0, "{}", st["counters"]);
    // New connections go to green.
    for i in 0..4 {
        let r = http_get(&cli, web(), "/")
            .unwrap_or_else(|e| panic!("new connection {i} after the flood: {e:#}"));
        assert_eq!(colour(&r.body), "green", "new connection {i}: {r:?}");
    }
    // Blue still counts its open connection, and is drained once it
    // closes.
    let st = sw.status().unwrap();
    assert_eq!(
        count(&st, Colour::Blue, "live_flows"),
        1,
        "blue's open connection is still recorded: {}",
        flows(&st)
    );
    assert_eq!(idle.get("/").unwrap().backend, first.backend);
    drop(idle);
    sw.wait_for(Duration::from_secs(5), "web's blue drained", |st| {
        count(st, Colour::Blue, "live_flows") == 0
    });
}

#[test]
fn after_a_spoofed_syn_flood_new_connections_are_served_and_status_answers() {
    let (topo, sw) = setup();
    let cli = topo.client_ns().to_string();
    let (report, _) = flood_the_vip(&topo, &sw, Colour::Blue);

    // `status` answers (printed how fast: a figure, not a test) and says
    // what it said before.
    let t = Instant::now();
    let st = sw.status().expect("status --json after the flood");
    eprintln!(
        "status --json after the flood answered in {:?}",
        t.elapsed()
    );
    let st_web = service(&st, "web");
    assert_eq!(st_web["active"], "blue", "{st_web}");
    assert_eq!(st_web["generation"], 1, "{st_web}");
    let text = sw.cli_ok(&["status", "web"]).expect("status web");
    assert!(text.contains("active: blue"), "{text}");

    // A fresh keep-alive connection and new one-shot connections work.
    let mut fresh = KeepAliveClient::connect(&cli, web()).unwrap_or_else(|e| {
        panic!(
            "a keep-alive connection after {} spoofed SYNs: {e:#}\n{}",
            report.sent,
            sw.log_tail()
        )
    });
    let first = fresh
        .get("/")
        .expect("first request on the fresh connection");
    assert_eq!(colour(&first.body), "blue", "{first:?}");
    for i in 0..5 {
        let r = fresh
            .get("/")
            .unwrap_or_else(|e| panic!("request {i} on the fresh connection: {e:#}"));
        assert_eq!(r.backend, first.backend, "request {i}");
    }
    for i in 0..4 {
        let r = http_get(&cli, web(), "/")
            .unwrap_or_else(|e| panic!("new connection {i} after the flood: {e:#}"));
        assert_eq!(colour(&r.body), "blue", "new connection {i}: {r:?}");
    }

    // It was recorded as any connection is: a flip leaves it on its
    // backend, new connections go to green.
    sw.cli_ok(&["flip", "web"]).expect("flip");
    let r = fresh.get("/").expect("the fresh connection after the flip");
    assert_eq!(r.backend, first.backend, "it drains on blue: {r:?}");
    let r = http_get(&cli, web(), "/").expect("a new connection after the flip");
    assert_eq!(colour(&r.body), "green", "{r:?}");
    let r = fresh.get("/").expect("the fresh connection, once more");
    assert_eq!(r.backend, first.backend, "{r:?}");

    // A flip made while a flood arrives completes (how long it took is
    // printed: a figure, not a test), and new connections follow it.
    let ns = topo.client_ns().to_string();
    let (flip, took, flood_report) = std::thread::scope(|sc| {
        let flooding = sc.spawn(|| send_syn_flood(&ns, web(), &flood()));
        let t = Instant::now();
        let flip = sw.cli_ok(&["flip", "web", "--reason", "back to blue under a SYN flood"]);
        let took = t.elapsed();
        (flip, took, flooding.join().expect("the flood thread"))
    });
    let flip = flip.expect("a flip during the flood");
    let flood_report = flood_report.unwrap_or_else(|e| panic!("the second flood: {e:#}"));
    eprintln!(
        "flip during a flood of {} spoofed SYNs ({:?}): {took:?}",
        flood_report.sent, flood_report.elapsed
    );
    assert!(flip.contains("green → blue"), "{flip}");
    let r = http_get(&cli, web(), "/").expect("a new connection after the flip");
    assert_eq!(colour(&r.body), "blue", "{r:?}");
    eprintln!("web at the end: {}", flows(&sw.status().unwrap()));
}
