//! Part 4: flips. For each switcher, on its own topology, under continuous
//! client load (one prober opening a new connection per request, plus
//! keep-alive clients), flip blue ↔ green `flips` times and measure:
//!
//! * the whole command, spawn to exit (`bgswitch flip`, `nft -f`, and a
//!   process that sends one runtime-API line to HAProxy);
//! * invocation to the new state in place (bgswitch: the mapped control word
//!   seen changed; HAProxy: the API's answer; nftables: nft's exit, its commit
//!   being synchronous);
//! * invocation to the first new flow answered by the new colour: the start of
//!   the first probe begun after the invocation that the new colour answered
//!   (an upper bound; its resolution is the probe interval, reported);
//! * failed requests (probes and keep-alive requests) over all flips, and new
//!   flows begun after the command returned that still reached the old colour.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use bgswitch_tests::Colour;
use serde_json::{json, Value};

use crate::{
    load::Load,
    stats::{median, percentile, Summary},
    systems::{vip, FlipTiming, Kind, System},
};

#[derive(Clone, Debug)]
pub struct FlipOptions {
    pub flips: usize,
    pub gap: Duration,
    pub keepalive: usize,
    pub kinds: Vec<Kind>,
}

impl FlipOptions {
    pub fn full() -> Self {
        Self {
            flips: 100,
            gap: Duration::from_millis(40),
            keepalive: 2,
            kinds: Kind::ALL.to_vec(),
        }
    }
    pub fn quick() -> Self {
        Self {
            flips: 10,
            gap: Duration::from_millis(40),
            keepalive: 2,
            kinds: vec![Kind::Bgswitch],
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Flips one system `opts.flips` times under load.
/// The mean of the durable writes bgswitch's daemon made between two
/// reads of its account, in ms (None for the peers).
fn durable_mean_ms(
    before: Option<bgswitch::api::DurableWrites>,
    after: Option<bgswitch::api::DurableWrites>,
) -> Option<f64> {
    let (b, a) = (before?, after?);
    let n = a.count.checked_sub(b.count).filter(|&n| n > 0)?;
    Some((a.sum_seconds - b.sum_seconds) / n as f64 * 1e3)
}

pub fn measure(sys_: &mut System, opts: &FlipOptions) -> Result<Value> {
    let cli = sys_.topo.client_ns().to_string();
    let load = Load::start(&cli, vip(), opts.keepalive)?;
    std::thread::sleep(Duration::from_millis(300));
    let writes_before = sys_.durable_writes();
    let mut flips: Vec<(Colour, FlipTiming)> = Vec::with_capacity(opts.flips);
    let mut error = None;
    for _ in 0..opts.flips {
        let to = sys_.active().other();
        match sys_.flip(to) {
            Ok(t) => flips.push((to, t)),
            Err(e) => {
                error = Some(format!("{e:#}"));
                break;
            }
        }
        std::thread::sleep(opts.gap);
    }
    let durable_ms = durable_mean_ms(writes_before, sys_.durable_writes());
    std::thread::sleep(Duration::from_millis(200));
    let ka_requests = load.ka_requests.load(std::sync::atomic::Ordering::Relaxed);
    let ka_failures = load.ka_failures.load(std::sync::atomic::Ordering::Relaxed);
    let probes = load.finish();
    if let Some(e) = error {
        anyhow::bail!("flip failed after {} flips: {e}", flips.len());
    }

    // Command times from the flips nothing watched (see `FlipTiming::watched`).
    let command: Vec<f64> = flips
        .iter()
        .filter(|(_, t)| !t.watched)
        .map(|(_, t)| ms(t.command_ns))
        .collect();
    let applied: Vec<f64> = flips
        .iter()
        .filter_map(|(_, t)| t.applied_ns.map(ms))
        .collect();
    let mut first_new = Vec::new();
    let mut stale_after_return = 0u64;
    let mut unobserved = 0usize;
    // Flips whose window (command returned to the next flip) held no
    // answered probe: nothing there could show a new flow going astray.
    let mut untested_after_return = 0usize;
    for (i, (to, t)) in flips.iter().enumerate() {
        let end = flips.get(i + 1).map_or(u64::MAX, |(_, n)| n.start_ns);
        let returned = t.start_ns + t.command_ns;
        let window = probes
            .iter()
            .filter(|p| p.start_ns >= t.start_ns && p.start_ns < end);
        let mut first = None;
        let mut after_return = 0usize;
        for p in window {
            if p.start_ns > returned && p.outcome.is_ok() {
                after_return += 1;
            }
            match &p.outcome {
                Ok(c) if c == to && first.is_none() => first = Some(p.start_ns - t.start_ns),
                Ok(c) if c != to && p.start_ns > returned => stale_after_return += 1,
                _ => {}
            }
        }
        match first {
            Some(f) => first_new.push(ms(f)),
            None => unobserved += 1,
        }
        if after_return == 0 {
            untested_after_return += 1;
        }
    }
    let probe_failures = probes.iter().filter(|p| p.outcome.is_err()).count() as u64;
    let first_error = probes
        .iter()
        .find_map(|p| p.outcome.as_ref().err().cloned());
    let gaps: Vec<f64> = probes
        .windows(2)
        .map(|w| ms(w[1].start_ns - w[0].start_ns))
        .collect();
    Ok(json!({
        "status": "measured",
        "flips": flips.len(),
        "command_ms": Summary::of(&command),
        "command_ms_p90": percentile(&command, 90.0),
        "applied_ms": Summary::of(&applied),
        "applied_observed": applied.len(),
        "flips_watched": flips.iter().filter(|(_, t)| t.watched).count(),
        "first_new_flow_on_new_colour_ms": Summary::of(&first_new),
        "first_new_flow_unobserved": unobserved,
        "flips_without_a_probe_after_command_returned": untested_after_return,
        "probe_interval_ms_median": median(&gaps),
        "new_flows_on_old_colour_after_command_returned": stale_after_return,
        "probes": probes.len(),
        "probe_failures": probe_failures,
        "keepalive_requests": ka_requests,
        "keepalive_failures": ka_failures,
        "failed_requests": probe_failures + ka_failures,
        "first_error": first_error,
        "durable_write_mean_ms": durable_ms,
    }))
}

/// The same commands with no client load: what the command costs by itself.
pub fn measure_idle(sys_: &mut System, flips: usize) -> Result<Value> {
    let mut command = Vec::new();
    let mut applied = Vec::new();
    let writes_before = sys_.durable_writes();
    for _ in 0..flips {
        let to = sys_.active().other();
        let t = sys_.flip(to)?;
        if !t.watched {
            command.push(ms(t.command_ns));
        }
        if let Some(a) = t.applied_ns {
            applied.push(ms(a));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(json!({
        "flips": flips,
        "command_ms": Summary::of(&command),
        "applied_ms": Summary::of(&applied),
        "durable_write_mean_ms": durable_mean_ms(writes_before, sys_.durable_writes()),
    }))
}

/// Spawn-to-exit of a trivial process and of `bgswitch --version`: the floor
/// under any "whole process" figure.
fn spawn_floor(n: usize) -> Value {
    let time = |cmd: &std::path::Path, arg: Option<&str>| -> Option<f64> {
        let mut v = Vec::new();
        for _ in 0..n {
            let mut c = std::process::Command::new(cmd);
            if let Some(a) = arg {
                c.arg(a);
            }
            let t = std::time::Instant::now();
            c.stdout(std::process::Stdio::null()).status().ok()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Some(median(&v))
    };
    let bin = bgswitch_tests::switcher::bgswitch_bin().ok();
    let writes = durable_writes(n).ok();
    json!({
        "true_ms": time(std::path::Path::new("/bin/true"), None),
        "bgswitch_version_ms": bin.and_then(|b| time(&b, Some("--version"))),
        "journal_append_ms": writes.map(|w| w.0),
        "snapshot_write_ms": writes.map(|w| w.1),
    })
}

/// What the daemon's durable writes cost on the file system its state
/// directory is on here (under /run), in ms (medians of `n`, 20 ms apart as
/// changes come): `journal`, what a change waits for (append a 1.2-KB line,
/// fdatasync); `snapshot`, what the daemon does once changes pause (write a
/// 20-KB `state.json` to a temporary file, fsync, rename over, fsync the
/// directory), which a change waited for as well until the journal carried
/// whole service states.
fn durable_writes(n: usize) -> Result<(f64, f64)> {
    use std::io::Write as _;
    let dir = std::path::PathBuf::from("/run/bgswitch-bench")
        .join(format!("fsync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut journal, mut snapshot) = (Vec::new(), Vec::new());
    let r = (|| -> Result<()> {
        for _ in 0..n {
            let t = std::time::Instant::now();
            let mut j = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("journal"))?;
            j.write_all(&[b'y'; 1200])?;
            j.sync_data()?;
            journal.push(t.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(20));
            let t = std::time::Instant::now();
            let tmp = dir.join("state.json.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&[b'x'; 20_000])?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join("state.json"))?;
            std::fs::File::open(&dir)?.sync_all()?;
            snapshot.push(t.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    Ok((median(&journal), median(&snapshot)))
}

/// Part 4 for every system in `opts.kinds`.
pub fn run(opts: &FlipOptions) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for &kind in &opts.kinds {
        eprintln!("bench: flip: {}", kind.label());
        let r = System::create(kind).and_then(|mut s| {
            let mut v = measure(&mut s, opts)?;
            v["without_load"] = measure_idle(&mut s, opts.flips)?;
            Ok(v)
        });
        let v = match r {
            Ok(v) => v,
            Err(e) => json!({"status": format!("not measured: {e:#}")}),
        };
        out.insert(kind.key().into(), v);
    }
    Ok(json!({
        "process_spawn_ms": spawn_floor(31),
        "method": format!(
            "{} flips per system alternating blue/green, {} ms apart, under load (1 prober: new connection per request; {} keep-alive clients); commands timed spawn to exit from CLOCK_MONOTONIC; bgswitch's command times from every other flip, its applied times from the others (a thread polling the control word runs only during those, so it takes no CPU from the commands timed)",
            opts.flips, opts.gap.as_millis(), opts.keepalive),
        "systems": out,
    }))
}

/// Quick mode: every watched bgswitch flip (every other one) was seen
/// changing the mapped control word; every flip was
/// followed, before the next flip, by a new flow on the new colour and by at
/// least one answered probe begun after the command returned; no request
/// failed (of many made) and no new flow reached the old colour after the
/// command returned.
pub fn assert_clean(section: &Value) -> Result<()> {
    let b = &section["systems"]["bgswitch"];
    ensure!(b["status"] == "measured", "bgswitch flips: {}", b["status"]);
    let flips = b["flips"].as_u64().unwrap_or(0);
    ensure!(flips > 0, "no flip was made: {b}");
    let count = |k: &str| b[k].as_u64().with_context(|| format!("no {k} in {b}"));
    let watched = count("flips_watched")?;
    ensure!(
        watched > 0 && count("applied_observed")? == watched,
        "the control word was not seen changed after every watched flip: {b}"
    );
    ensure!(
        count("probes")? >= flips && count("keepalive_requests")? >= flips,
        "too little load to judge the flips (probes and keep-alive requests each fewer than the flips): {b}"
    );
    ensure!(
        count("failed_requests")? == 0,
        "bgswitch flips failed requests: {b}"
    );
    ensure!(
        count("new_flows_on_old_colour_after_command_returned")? == 0,
        "new flows reached the old colour after the flip returned: {b}"
    );
    ensure!(
        count("first_new_flow_unobserved")? == 0,
        "not every flip was followed by a new flow on the new colour: {b}"
    );
    ensure!(
        count("flips_without_a_probe_after_command_returned")? == 0,
        "not every flip had a new flow begun after the command returned: {b}"
    );
    Ok(())
}
