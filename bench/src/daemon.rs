//! Part 5, daemon side: resident memory and CPU of the real `bgswitch daemon`
//! (in a topology's load-balancer namespace), idle and while health-checking
//! 256 backends.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use bgswitch_tests::{
    switcher::{bgswitch_bin, default_services, Switcher, HTTP_PORT, UDP_PORT},
    Colour, HttpServer, Topology, TopologyOptions, VIP,
};
use serde_json::{json, Value};

use crate::{
    stats::{percentile, Summary},
    sys,
};

#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// CPU is measured over this long.
    pub window: Duration,
    /// Health-check 256 backends too.
    pub health: bool,
    /// Flips timed with the most services configured.
    pub flips: usize,
}

fn measure(sw: &Switcher, window: Duration) -> Value {
    let Some(pid) = sw.pid() else {
        return json!({"status": "not measured: no daemon pid"});
    };
    let t0 = sys::cpu_ticks(pid);
    std::thread::sleep(window);
    let t1 = sys::cpu_ticks(pid);
    let cpu = match (t0, t1) {
        (Some(a), Some(b)) => {
            Some((b - a) as f64 / sys::ticks_per_second() as f64 / window.as_secs_f64() * 100.0)
        }
        _ => None,
    };
    json!({
        "status": "measured",
        "rss_bytes": sys::rss_bytes(pid),
        "cpu_percent_of_one_core": cpu,
        "window_s": window.as_secs_f64(),
    })
}

/// The daemon idle with the two test services.
fn idle(o: &DaemonOptions) -> Result<Value> {
    let mut topo = Topology::create(TopologyOptions {
        blue: 2,
        green: 2,
        tx_csum_off: true,
    })?;
    topo.start_servers(HTTP_PORT, UDP_PORT)?;
    let mut sw = Switcher::new(&topo, &default_services(&topo))?;
    sw.start()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut v = measure(&sw, o.window);
    v["config"] =
        json!("2 services (TCP, UDP), 2+2 backends each, no health checks, max_flows 65536");
    Ok(v)
}

/// The daemon health-checking 256 backends over HTTP every second: two TCP
/// services with 64 blue and 64 green backends each (four backend hosts, 64
/// HTTP servers each).
fn health(o: &DaemonOptions) -> Result<Value> {
    let topo = Topology::create(TopologyOptions {
        blue: 2,
        green: 2,
        tx_csum_off: true,
    })?;
    let mut servers = Vec::new();
    let mut pools = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for (s, base) in [(0usize, 8000u16), (1, 8100)] {
        for b in topo.backends() {
            let c = usize::from(b.colour == Colour::Green);
            for p in base..base + 32 {
                let addr = std::net::SocketAddrV4::new(b.addr, p);
                servers.push(HttpServer::start(&b.ns, addr, b.colour.as_str(), &b.name)?);
                pools[s][c].push(format!("\"{addr}\""));
            }
        }
    }
    let services: String = pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "[[service]]\nname = \"svc{i}\"\nvip = \"{VIP}:{}\"\nprotocol = \"tcp\"\nblue = [{}]\ngreen = [{}]\n\
                 [service.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\n",
                9000 + i,
                p[0].join(", "),
                p[1].join(", ")
            )
        })
        .collect();
    let mut sw = Switcher::new(&topo, &services)?;
    sw.start()?;
    // Let every backend come up (rise = 2 at 1 s) before measuring.
    std::thread::sleep(Duration::from_secs(4));
    let before: u64 = servers.iter().map(HttpServer::requests_served).sum();
    let mut v = measure(&sw, o.window);
    let after: u64 = servers.iter().map(HttpServer::requests_served).sum();
    v["config"] =
        json!("2 TCP services × (64 blue + 64 green) = 256 backends, HTTP health checks every 1 s");
    v["health_probes_per_second"] = json!((after - before) as f64 / o.window.as_secs_f64());
    v["backends"] = json!(servers.len());
    drop(sw);
    drop(servers);
    Ok(v)
}

/// Flips of one service with the most services the daemon takes, after four
/// changes of each: what a flip costs should not grow with the services it
/// does not touch.
fn many_services(flips: usize) -> Result<Value> {
    let topo = Topology::create(TopologyOptions {
        blue: 1,
        green: 1,
        tx_csum_off: true,
    })?;
    let addr = |c| {
        topo.backends_of(c)
            .next()
            .map(|b| b.addr)
            .context("a backend")
    };
    let (blue, green) = (addr(Colour::Blue)?, addr(Colour::Green)?);
    let n = bgswitch_common::MAX_SERVICES;
    let services: String = (0..n)
        .map(|i| {
            let port = 10_000 + i;
            format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"{VIP}:{port}\"\nprotocol = \"tcp\"\n\
                 blue = [\"{blue}:{port}\"]\ngreen = [\"{green}:{port}\"]\n\n"
            )
        })
        .collect();
    let mut sw = Switcher::new(&topo, &services)?;
    sw.start()?;
    let rounds = 4;
    for _ in 0..rounds {
        for i in 0..n {
            let flip = bgswitch::api::Request::Flip {
                service: format!("s{i}"),
                to: None,
                force: false,
                reason: None,
                watch_ms: None,
                max_error_rate: None,
                confirm_within_ms: None,
            };
            let a = bgswitch::cli::call(&sw.socket(), &flip)?;
            ensure!(a.ok, "flip s{i}: {}", a.error.unwrap_or_default());
        }
    }
    // The snapshot is written once changes pause for a second.
    std::thread::sleep(Duration::from_millis(1500));
    let bin = bgswitch_bin()?;
    let mut times = Vec::with_capacity(flips);
    for _ in 0..flips {
        let t = Instant::now();
        let out = Command::new(&bin)
            .arg("--socket")
            .arg(sw.socket())
            .args(["flip", "s7"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            out.status.success(),
            "bgswitch flip s7: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let size = |f: &str| {
        std::fs::metadata(sw.state_dir().join(f))
            .map(|m| m.len())
            .ok()
    };
    Ok(json!({
        "status": "measured",
        "services": n,
        "changes_before": n * rounds,
        "command_ms": Summary::of(&times),
        "command_ms_p90": percentile(&times, 90.0),
        "flips": flips,
        "rss_bytes": sw.pid().and_then(sys::rss_bytes),
        "state_file_bytes": size("state.json"),
        "journal_bytes": size("journal.jsonl"),
    }))
}

pub fn run(o: &DaemonOptions) -> Result<Value> {
    let idle = idle(o).unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}));
    let health = if o.health {
        health(o).unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}))
    } else {
        json!({"status": "not measured: skipped in quick mode"})
    };
    let many = many_services(o.flips)
        .unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}));
    Ok(json!({
        "method": "the real daemon (target of BGSWITCH_BIN) in a topology's lb namespace; RSS from /proc/PID/status VmRSS; CPU from utime+stime in /proc/PID/stat over the window",
        "idle": idle,
        "health_checks_256_backends": health,
        "flips_with_most_services": many,
    }))
}
