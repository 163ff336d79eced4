//! Part 5, daemon side: resident memory and CPU of the real `bgswitch daemon`
//! (in a topology's load-balancer namespace), idle and while health-checking
//! 256 backends; flips with the most services; the control socket while the
//! daemon works (a long journal, `history`, snapshots).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use bgswitch::state::JournalEntry;
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
    /// Flips timed with the most services configured.
    pub flips: usize,
    /// The journal's length for the daemon under work.
    pub journal_lines: usize,
    /// Idle and health-checking 256 backends measured too (not only the
    /// most services).
    pub idle_and_health: bool,
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
        ..TopologyOptions::default()
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
        ..TopologyOptions::default()
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
/// does not touch. Then the same daemon under work (`under_work`).
fn many_services(o: &DaemonOptions) -> Result<Value> {
    let topo = Topology::create(TopologyOptions {
        blue: 1,
        green: 1,
        ..TopologyOptions::default()
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
            let a = bgswitch::cli::call(&sw.socket(), &flip_request(&format!("s{i}")))?;
            ensure!(a.ok, "flip s{i}: {}", a.error.unwrap_or_default());
        }
    }
    // The snapshot is written once changes pause for a second.
    std::thread::sleep(Duration::from_millis(1500));
    let bin = bgswitch_bin()?;
    let mut times = Vec::with_capacity(o.flips);
    for _ in 0..o.flips {
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
    let mut v = json!({
        "status": "measured",
        "services": n,
        "changes_before": n * rounds,
        "command_ms": Summary::of(&times),
        "command_ms_p90": percentile(&times, 90.0),
        "flips": o.flips,
        "rss_bytes": sw.pid().and_then(sys::rss_bytes),
        "state_file_bytes": size("state.json"),
        "journal_bytes": size("journal.jsonl"),
    });
    v["under_work"] = under_work(&mut sw, o.journal_lines, o.flips * 2)
        .unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}));
    Ok(v)
}

fn flip_request(service: &str) -> bgswitch::api::Request {
    bgswitch::api::Request::Flip {
        service: service.into(),
        to: None,
        force: false,
        reason: None,
        watch_ms: None,
        max_error_rate: None,
        confirm_within_ms: None,
        local: false,
    }
}

/// `n` flips of `service`, `gap` apart, each timed from connecting to the
/// answer (the daemon's own time: no process is spawned), in ms.
fn flip_round_trips(socket: &Path, service: &str, n: usize, gap: Duration) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let a = bgswitch::cli::call(socket, &flip_request(service))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(a.ok, "flip {service}: {}", a.error.unwrap_or_default());
        std::thread::sleep(gap);
    }
    Ok(times)
}

/// Rewrites the stopped daemon's journal to `lines` lines: its own lines
/// repeated in front of them (a daemon that has run for long), numbered
/// anew from 1, and the snapshot's number moved by as many, so the snapshot
/// still includes them all (nothing to replay). Returns the lines added.
fn pad_journal(state_dir: &Path, lines: usize) -> Result<usize> {
    let journal = state_dir.join("journal.jsonl");
    let own: Vec<JournalEntry> = std::fs::read_to_string(&journal)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("the daemon's journal")?;
    ensure!(
        !own.is_empty() && own.iter().all(|e| e.seq.is_some()),
        "expected numbered changes only in {}",
        journal.display()
    );
    let added = lines.saturating_sub(own.len());
    let mut text = String::with_capacity(lines * 800);
    let all = own.iter().cycle().take(added).chain(own.iter());
    for (i, e) in all.enumerate() {
        let mut e = e.clone();
        e.seq = Some(i as u64 + 1);
        text.push_str(&serde_json::to_string(&e)?);
        text.push('\n');
    }
    let state = state_dir.join("state.json");
    let mut snap: Value = serde_json::from_str(&std::fs::read_to_string(&state)?)?;
    let seq = snap["journal_seq"]
        .as_u64()
        .context("state.json: journal_seq")?;
    ensure!(
        seq == own.len() as u64,
        "the snapshot includes {seq} of {} changes (stopped with SIGTERM?)",
        own.len()
    );
    snap["journal_seq"] = json!(seq + added as u64);
    std::fs::write(&journal, text)?;
    std::fs::write(&state, serde_json::to_string_pretty(&snap)? + "\n")?;
    Ok(added)
}

/// The control socket while the daemon does its slower work, with the most
/// services: restarts with the journal as it is and with `lines` lines (how
/// long until the socket answers), `history` of one service, and `flips`
/// flips of another round-trip timed alone (every 64th change makes a
/// snapshot of all services due) and while `history` is read back to back
/// on another connection.
fn under_work(sw: &mut Switcher, lines: usize, flips: usize) -> Result<Value> {
    let restart = |sw: &mut Switcher| -> Result<f64> {
        sw.stop()?;
        let t = Instant::now();
        sw.start()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let start_short_ms = restart(sw)?;
    sw.stop()?;
    let added = pad_journal(&sw.state_dir(), lines)?;
    let start_long_ms = restart(sw)?;
    let journal_bytes = std::fs::metadata(sw.state_dir().join("journal.jsonl"))?.len();
    let socket = sw.socket();
    let history = bgswitch::api::Request::History {
        service: "s9".into(),
    };
    let mut history_ms = Vec::new();
    let mut history_entries = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let a = bgswitch::cli::call(&socket, &history)?;
        history_ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(a.ok, "history s9: {}", a.error.unwrap_or_default());
        history_entries = a.history.map_or(0, |h| h.len());
    }
    let gap = Duration::from_millis(10);
    let alone = flip_round_trips(&socket, "s7", flips, gap)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (during, histories) = std::thread::scope(|s| -> Result<(Vec<f64>, usize)> {
        let reader = s.spawn(|| -> Result<usize> {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a = bgswitch::cli::call(&socket, &history)?;
                ensure!(a.ok, "history s9: {}", a.error.unwrap_or_default());
                n += 1;
            }
            Ok(n)
        });
        let during = flip_round_trips(&socket, "s7", flips, gap);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = reader
            .join()
            .map_err(|_| anyhow::anyhow!("history reader panicked"))??;
        Ok((during?, n))
    })?;
    Ok(json!({
        "status": "measured",
        "journal_lines": lines,
        "journal_lines_repeated": added,
        "journal_bytes": journal_bytes,
        "start_ms_journal_as_is": start_short_ms,
        "start_ms_long_journal": start_long_ms,
        "history_ms": Summary::of(&history_ms),
        "history_entries": history_entries,
        "flips": flips,
        "flip_gap_ms": gap.as_secs_f64() * 1e3,
        "flip_ms_alone": Summary::of(&alone),
        "flip_ms_alone_p99": percentile(&alone, 99.0),
        "flip_ms_during_history": Summary::of(&during),
        "flip_ms_during_history_p99": percentile(&during, 99.0),
        "histories_during": histories,
    }))
}

pub fn run(o: &DaemonOptions) -> Result<Value> {
    let skipped = || json!({"status": "not measured: only the most services asked for"});
    let idle = if o.idle_and_health {
        idle(o).unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}))
    } else {
        skipped()
    };
    let health = if o.idle_and_health {
        health(o).unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}))
    } else {
        skipped()
    };
    let many =
        many_services(o).unwrap_or_else(|e| json!({"status": format!("not measured: {e:#}")}));
    Ok(json!({
        "method": "the real daemon (target of BGSWITCH_BIN) in a topology's lb namespace; RSS from /proc/PID/status VmRSS; CPU from utime+stime in /proc/PID/stat over the window",
        "idle": idle,
        "health_checks_256_backends": health,
        "flips_with_most_services": many,
    }))
}

/// Quick mode: the daemon under work was measured, and `history` of a long
/// journal does not hold flips up. Were it read on the loop, a flip sent
/// while it is read back to back would wait for the one in progress: half
/// a `history` in the median. The median flip must stay under a quarter.
pub fn assert_gross(section: &Value) -> Result<()> {
    let u = &section["flips_with_most_services"]["under_work"];
    ensure!(
        u["status"] == "measured",
        "the daemon under work: {}",
        u["status"]
    );
    let (flip, history) = (
        u["flip_ms_during_history"]["median"]
            .as_f64()
            .unwrap_or(f64::MAX),
        u["history_ms"]["median"].as_f64().unwrap_or(0.0),
    );
    ensure!(
        flip < history / 4.0,
        "flips waited for history: median {flip:.2} ms while history takes {history:.2} ms"
    );
    Ok(())
}
