//! Guarded releases end to end: health checks, refused and forced flips,
//! automatic rollback on health and on the kernel's error signal, the
//! confirmation dead-man's switch across restarts, canary share, preview
//! prefixes, drain evidence, journal/undo and the metrics endpoint.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use bgswitch_tests::{
    http_get,
    switcher::{
        colour, default_services, require_root, served_topology, Switcher, HEALTH, HTTP_PORT,
    },
    KeepAliveClient, Topology, VIP,
};

const METRICS: &str = "127.0.0.1:9477";

/// A topology with servers and a daemon; `health` adds HTTP checks to "web".
fn setup(health: bool) -> (Topology, Switcher) {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let mut services = format!(
        "metrics_listen = \"{METRICS}\"\n\n{}",
        default_services(&topo)
    );
    if health {
        // The health table belongs to the first [[service]] ("web").
        let at = services
            .find("\n\n[[service]]\nname = \"echo\"")
            .expect("echo service");
        services.insert_str(at, &format!("\n{HEALTH}"));
    }
    let mut sw = Switcher::new(&topo, &services).expect("switcher");
    sw.start().expect("daemon starts");
    (topo, sw)
}

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

fn backends_are(st: &serde_json::Value, colour: usize, health: &str) -> bool {
    st["services"][0]["colours"][colour]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["health"] == health)
}

#[test]
fn a_flip_to_an_unhealthy_pool_is_refused_unless_forced() {
    let (mut topo, sw) = setup(true);
    sw.wait_for(Duration::from_secs(5), "all up", |st| {
        backends_are(st, 0, "up") && backends_are(st, 1, "up")
    });
    topo.stop_server("g1").unwrap();
    sw.wait_for(Duration::from_secs(5), "g1 down", |st| {
        st["services"][0]["colours"][1]["backends"][0]["health"] == "down"
    });
    let out = sw.cli(&["flip", "web", "--reason", "release 3"]).unwrap();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("refusing to flip web to green"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("198.18.1.21:8080 (down)"),
        "names the failing backend: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("198.18.1.22"),
        "only the failing one: {}",
        out.stderr
    );
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "blue");
    let out = sw
        .cli_ok(&["flip", "web", "--force", "--reason", "hotfix"])
        .unwrap();
    assert!(out.contains("blue → green"), "{out}");
    // With g1 down, new flows reach only g2.
    for _ in 0..8 {
        let r = http_get(topo.client_ns(), web(), "/").unwrap();
        assert_eq!(r.body.trim(), "green g2");
    }
    let h: serde_json::Value =
        serde_json::from_str(&sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let h = h.as_array().unwrap();
    assert!(
        h[0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("refused: refusing to flip"),
        "{h:?}"
    );
    assert_eq!(h[1]["outcome"], "ok");
    assert_eq!(h[1]["forced"], true);
    assert_eq!(h[1]["user"], "root");
    assert_eq!(h[1]["reason"], "hotfix");
}

#[test]
fn a_watched_flip_rolls_back_by_itself_when_green_fails_its_health_checks() {
    let (mut topo, sw) = setup(true);
    sw.wait_for(Duration::from_secs(5), "all up", |st| {
        backends_are(st, 1, "up")
    });
    sw.cli_ok(&["flip", "web", "--watch", "30s", "--reason", "release 4"])
        .unwrap();
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "green"
    );
    let broke = Instant::now();
    topo.stop_server("g1").unwrap();
    let st = sw.wait_for(Duration::from_secs(3), "automatic rollback", |st| {
        st["services"][0]["active"] == "blue"
    });
    // interval 200 ms × fall 2, plus the 200 ms tick and probe timeouts.
    let took = broke.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "rolled back after {took:?}"
    );
    let why = st["services"][0]["rolled_back"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("health") && why.contains("198.18.1.21:8080"),
        "{why}"
    );
    for _ in 0..4 {
        assert_eq!(
            colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
            "blue"
        );
    }
    let text = sw.cli_ok(&["history", "web"]).unwrap();
    assert!(
        text.contains("automatic rollback") && text.contains("by bgswitch"),
        "{text}"
    );
    assert!(sw
        .cli_ok(&["status", "web"])
        .unwrap()
        .contains("ROLLED BACK automatically"));
    assert!(sw.log().contains("AUTOMATIC ROLLBACK"));
}

#[test]
fn a_watched_flip_rolls_back_on_the_kernel_error_signal() {
    // No health checks: only the XDP program's counters can tell.
    let (mut topo, sw) = setup(false);
    topo.stop_server("g1").unwrap();
    topo.stop_server("g2").unwrap();
    sw.cli_ok(&["flip", "web", "--watch", "30s", "--max-error-rate", "0.2"])
        .unwrap();
    let mut refused = 0;
    for _ in 0..40 {
        if http_get(topo.client_ns(), web(), "/").is_err() {
            refused += 1;
        }
        if sw.status().unwrap()["services"][0]["active"] == "blue" {
            break;
        }
    }
    let st = sw.wait_for(Duration::from_secs(3), "rollback on RSTs", |st| {
        st["services"][0]["active"] == "blue"
    });
    assert!(refused >= 10, "green refused connections ({refused})");
    let why = st["services"][0]["rolled_back"].as_str().unwrap();
    assert!(why.contains("error rate") && why.contains("RSTs"), "{why}");
    assert!(
        st["services"][0]["colours"][1]["backend_rsts"]
            .as_u64()
            .unwrap()
            >= 10
    );
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "blue"
    );
}

#[test]
fn a_watched_flip_rolls_back_when_green_silently_drops_connections() {
    // Green's links are down: SYNs vanish, nobody answers (no RST either).
    let (topo, sw) = setup(false);
    for b in topo.backends().iter().filter(|b| b.name.starts_with('g')) {
        bgswitch_tests::ip(&["-n", &b.ns, "link", "set", "eth0", "down"]).unwrap();
    }
    sw.cli_ok(&["flip", "web", "--watch", "30s", "--max-error-rate", "0.5"])
        .unwrap();
    let cli = topo.client_ns().to_string();
    // Twelve connection attempts at once; each times out on its own.
    let attempts: Vec<_> = (0..12)
        .map(|_| {
            let cli = cli.clone();
            std::thread::spawn(move || http_get(&cli, web(), "/").is_err())
        })
        .collect();
    let failed = attempts
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|failed| *failed)
        .count();
    assert_eq!(failed, 12, "green answers nothing");
    let st = sw.wait_for(
        Duration::from_secs(6),
        "rollback on unanswered SYNs",
        |st| st["services"][0]["active"] == "blue",
    );
    let why = st["services"][0]["rolled_back"].as_str().unwrap();
    assert!(
        why.contains("unanswered SYNs") && why.contains("0 RSTs"),
        "{why}"
    );
    assert_eq!(colour(&http_get(&cli, web(), "/").unwrap().body), "blue");
}

#[test]
fn confirm_within_rolls_back_unless_confirmed_even_across_restarts() {
    let (topo, mut sw) = setup(false);
    // Not confirmed: back to blue after the deadline.
    sw.cli_ok(&["flip", "web", "--confirm-within", "1s"])
        .unwrap();
    assert!(sw
        .cli_ok(&["status"])
        .unwrap()
        .contains("WAITING FOR CONFIRMATION"));
    let st = sw.wait_for(Duration::from_secs(3), "deadline rollback", |st| {
        st["services"][0]["active"] == "blue"
    });
    assert!(st["services"][0]["rolled_back"]
        .as_str()
        .unwrap()
        .contains("not confirmed"));

    // Confirmed after a daemon restart: stays.
    sw.cli_ok(&["flip", "web", "--confirm-within", "3s"])
        .unwrap();
    sw.kill();
    sw.start().unwrap();
    assert!(
        sw.status().unwrap()["services"][0]["confirm"].is_object(),
        "deadline survives the restart"
    );
    sw.cli_ok(&["confirm", "web"]).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["active"], "green");
    assert!(st["services"][0]["rolled_back"].is_null());
    assert!(
        sw.cli(&["confirm", "web"]).unwrap().code != 0,
        "nothing left to confirm"
    );

    // The deadline passes while no daemon runs: the next daemon rolls back.
    sw.cli_ok(&["flip", "web", "--confirm-within", "1s"])
        .unwrap();
    sw.kill();
    std::thread::sleep(Duration::from_millis(1500));
    sw.start().unwrap();
    let st = sw.wait_for(Duration::from_secs(2), "rollback at start", |st| {
        st["services"][0]["active"] == "green"
    });
    assert!(st["services"][0]["rolled_back"]
        .as_str()
        .unwrap()
        .contains("not confirmed"));
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "green"
    );
}

/// A watch that passes ends without a rollback and is journalled like a
/// change: `history` shows it, the flip stays the service's last change (so
/// `undo` undoes the flip), and it stays ended when the daemon is killed
/// right after it, before any snapshot could include it.
#[test]
fn a_watch_that_passes_is_journalled_and_stays_ended_across_a_kill() {
    let (topo, mut sw) = setup(false);
    sw.cli_ok(&["flip", "web", "--watch", "3s"]).unwrap();
    assert!(sw.status().unwrap()["services"][0]["watch"].is_object());
    // The flip's snapshot (1 s after it) still has the watch; the end comes
    // 3 s after the flip, and the kill within a poll of it.
    sw.wait_for(Duration::from_secs(6), "the watch ends", |st| {
        st["services"][0]["watch"].is_null()
    });
    sw.kill();
    let passed = |sw: &Switcher| sw.log().matches("watch of green passed").count();
    assert_eq!(passed(&sw), 1, "{}", sw.log_tail());
    sw.start().unwrap();
    // A restart with the watch still on would end it again on its first tick.
    std::thread::sleep(Duration::from_millis(1000));
    let st = sw.status().unwrap();
    let web_st = &st["services"][0];
    assert!(web_st["watch"].is_null(), "{web_st:#}");
    assert_eq!(web_st["active"], "green");
    assert_eq!(web_st["last_change"]["kind"], "flip", "{web_st:#}");
    assert_eq!(passed(&sw), 1, "ended twice:\n{}", sw.log_tail());
    let h: serde_json::Value =
        serde_json::from_str(&sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let h = h.as_array().unwrap();
    let kinds: Vec<&str> = h.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["flip", "watch_passed"], "{h:?}");
    let (flip, end) = (&h[0], &h[1]);
    assert_eq!(end["outcome"], "ok");
    assert_eq!(end["user"], "bgswitch");
    assert_eq!(end["seq"], flip["seq"].as_u64().unwrap() + 1, "{h:?}");
    assert_eq!(end["generation"], flip["generation"], "no traffic changed");
    assert_eq!(end["generation_before"], flip["generation"]);
    assert!(sw
        .cli_ok(&["history", "web"])
        .unwrap()
        .contains("watch passed"));
    // The event is not the change `undo` undoes.
    let out = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(out.contains("green → blue"), "{out}");
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "blue"
    );
}

#[test]
fn a_ten_percent_shift_sends_about_ten_percent_of_new_flows_to_green() {
    let (topo, sw) = setup(false);
    let out = sw
        .cli_ok(&["shift", "web", "--to", "green", "--percent", "10"])
        .unwrap();
    assert!(out.contains("10.00% of new flows to green"), "{out}");
    assert!(
        sw.cli(&["shift", "web", "--to", "blue", "--percent", "10"])
            .unwrap()
            .code
            != 0,
        "blue is active"
    );
    assert!(
        sw.cli(&["shift", "web", "--to", "green", "--percent", "101"])
            .unwrap()
            .code
            != 0
    );
    let n = 600;
    let mut green = 0;
    for _ in 0..n {
        if colour(&http_get(topo.client_ns(), web(), "/").unwrap().body) == "green" {
            green += 1;
        }
    }
    let share = green as f64 / n as f64;
    // Binomial sd at 10 % of 600 is 1.2 %; allow ±5 %.
    assert!((0.05..=0.15).contains(&share), "green share {share}");
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["canary_percent"], 10.0);
    sw.cli_ok(&["shift", "web", "--to", "green", "--percent", "0"])
        .unwrap();
    for _ in 0..30 {
        assert_eq!(
            colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
            "blue"
        );
    }
    eprintln!("10% shift: {green}/{n} new flows reached green");
}

#[test]
fn preview_prefixes_reach_the_idle_colour_and_undo_restores() {
    let (topo, sw) = setup(false);
    sw.cli_ok(&[
        "preview",
        "web",
        "add",
        "198.18.0.2/32",
        "--reason",
        "testers",
    ])
    .unwrap();
    assert_eq!(
        sw.cli_ok(&["preview", "web", "list"]).unwrap().trim(),
        "198.18.0.2/32"
    );
    for _ in 0..6 {
        assert_eq!(
            colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
            "green"
        );
    }
    let st = sw.status().unwrap();
    assert!(
        st["services"][0]["colours"][1]["preview_flows"]
            .as_u64()
            .unwrap()
            >= 6
    );
    // Undo the preview: the client is back on blue.
    let out = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(out.contains("undo"), "{out}");
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "blue"
    );
    assert!(
        sw.cli(&["preview", "web", "del", "198.18.0.2/32"])
            .unwrap()
            .code
            != 0,
        "already gone"
    );
    assert!(
        sw.cli(&["preview", "web", "add", "not-a-cidr"])
            .unwrap()
            .code
            != 0
    );
    let h: serde_json::Value =
        serde_json::from_str(&sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let kinds: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["preview_add", "undo"]);
}

#[test]
fn wait_drained_returns_when_the_last_blue_connection_closes() {
    let (topo, sw) = setup(false);
    let mut long = KeepAliveClient::connect(topo.client_ns(), web()).unwrap();
    assert_eq!(colour(&long.get("/").unwrap().body), "blue");
    let bin = bgswitch_tests::switcher::bgswitch_bin().unwrap();
    let socket = sw.socket();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || {
        std::process::Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .args(["flip", "web", "--wait-drained", "--timeout", "20s"])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !waiter.is_finished(),
        "must wait while a blue connection is open"
    );
    assert_eq!(colour(&long.get("/").unwrap().body), "blue");
    drop(long);
    let out = waiter.join().unwrap();
    let took = start.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("blue drained"),
        "{out:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A green connection stays open: the wait times out with a non-zero exit.
    let mut g = KeepAliveClient::connect(topo.client_ns(), web()).unwrap();
    assert_eq!(colour(&g.get("/").unwrap().body), "green");
    let out = sw
        .cli(&["flip", "web", "--wait-drained", "--timeout", "1s"])
        .unwrap();
    assert_eq!(out.code, 4, "a wait that ran out: {out:?}");
    assert!(
        out.stderr.contains("1 flows still live on green"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_metrics_endpoint_serves_the_documented_series() {
    let (topo, sw) = setup(true);
    sw.wait_for(Duration::from_secs(5), "all up", |st| {
        backends_are(st, 0, "up")
    });
    for _ in 0..5 {
        http_get(topo.client_ns(), web(), "/").unwrap();
    }
    sw.cli_ok(&["shift", "web", "--to", "green", "--percent", "12.5"])
        .unwrap();
    let addr: SocketAddrV4 = METRICS.parse().unwrap();
    let r = http_get(topo.lb_ns(), addr, "/metrics").unwrap();
    assert_eq!(r.status, 200);
    let m = r.body;
    for series in [
        "bgswitch_packets_total{service=\"web\",colour=\"blue\",direction=\"to_backend\"}",
        "bgswitch_bytes_total{service=\"web\",colour=\"blue\",direction=\"reply\"}",
        "bgswitch_new_flows_total{service=\"web\",colour=\"blue\"} 5",
        "bgswitch_live_flows{service=\"web\",colour=\"green\"} 0",
        "bgswitch_backend_resets_total{service=\"web\",colour=\"green\"} 0",
        "bgswitch_unanswered_syns{service=\"web\",colour=\"blue\"} 0",
        "bgswitch_active_colour{service=\"web\",colour=\"blue\"} 1",
        "bgswitch_active_colour{service=\"web\",colour=\"green\"} 0",
        "bgswitch_canary_share_ratio{service=\"web\"} 0.125",
        "bgswitch_backend_health{service=\"web\",colour=\"blue\",backend=\"198.18.1.11:8080\",state=\"up\"} 1",
        "bgswitch_flips_total{service=\"web\"} 0",
        "bgswitch_rollbacks_total{service=\"web\"} 0",
        "bgswitch_generation{service=\"web\"} 2",
        "bgswitch_fast_path{service=\"web\",mode=\"table\"} 1",
        "bgswitch_fast_path{service=\"web\",mode=\"stateless\"} 0",
        "bgswitch_xdp_events_total{event=\"stateless\"} 0",
        "bgswitch_xdp_events_total{event=\"malformed\"} 0",
        "bgswitch_xdp_events_total{event=\"cache_invalidations\"}",
        "bgswitch_interface_attached{interface=\"lbc\",mode=\"tc\"} 1",
        "bgswitch_interface_attachment{interface=\"lbc\",mode=\"tc\",reason=\"auto: a virtual device",
        "\nbgswitch_flow_table_scans_total ",
        "bgswitch_transition_disagreeing_connections{service=\"web\"} 0",
        // The shift was made durable once.
        "\nbgswitch_durable_write_duration_seconds_count 1\n",
        "\nbgswitch_durable_write_duration_seconds_bucket{le=\"+Inf\"} 1\n",
        "# TYPE bgswitch_packets counter",
        "# EOF",
    ] {
        assert!(m.contains(series), "missing {series}\n{m}");
    }
    // Every series the packaged Grafana dashboard queries is served.
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana-dashboard.json"
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(json["panels"].as_array().unwrap().len() >= 5);
    let mut names: Vec<&str> = dash
        .match_indices("bgswitch_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    for n in names {
        assert!(
            m.contains(&format!("\n{n}{{")) || m.contains(&format!("\n{n} ")),
            "dashboard queries {n}, which /metrics does not serve"
        );
    }
    let st = sw.cli_ok(&["status"]).unwrap();
    assert!(
        st.contains("durable writes: 1 change made durable in "),
        "{st}"
    );
    let nf = http_get(topo.lb_ns(), addr, "/other").unwrap();
    assert_eq!(nf.status, 404);
}
