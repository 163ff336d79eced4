//! Part 3: TCP/HTTP through the VIP with wrk, keep-alive and a new connection
//! per request, for bgswitch (TC, as `auto` serves veths), nftables DNAT and
//! HAProxy (mode tcp), each on its own topology with the same four HTTP
//! backends (the test bed's server, thread per connection, in this process)
//! and the kernel's default offloads; and bgswitch's XDP path on veths
//! standing in for physical NICs (see `systems.rs`). Rounds interleave the
//! systems.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    stats::{median, Summary},
    sys,
    systems::{vip, Kind, System},
};

#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub rounds: usize,
    pub seconds: u32,
    pub connections: u32,
    pub threads: u32,
    /// The paced keep-alive mode: connections, each waiting `paced_gap_ms`
    /// after an answer before its next request.
    pub paced_connections: u32,
    pub paced_gap_ms: u32,
}

impl HttpOptions {
    pub fn full() -> Self {
        Self {
            rounds: 3,
            seconds: 5,
            connections: 16,
            threads: 1,
            paced_connections: 64,
            paced_gap_ms: 1,
        }
    }
}

/// How wrk loads the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Keep-alive connections, each sending its next request as soon as
    /// the answer is in (closed loop: as fast as the path allows).
    KeepAlive,
    /// A new connection per request, as fast as the path allows.
    Close,
    /// Keep-alive connections that wait a fixed gap after each answer
    /// (wrk's `delay()`): nearly the same offered load for every system,
    /// below what any of them saturates at, so latencies compare at equal
    /// load (a saturated closed loop's p99 grows with the load it reached).
    Paced,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::KeepAlive, Mode::Close, Mode::Paced];
    fn key(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keepalive",
            Mode::Close => "new_connection_per_request",
            Mode::Paced => "keepalive_paced",
        }
    }
}

/// What one wrk run reported.
#[derive(Clone, Debug, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e3)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().context("Requests/sec")?;
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = parse_duration_ms(v).context("50%")?;
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = parse_duration_ms(v).context("99%")?;
        } else if t.contains(" requests in ") {
            w.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if w.rps == 0.0 {
        bail!("no Requests/sec in wrk's output: {out}");
    }
    Ok(w)
}

/// wrk's script for [`Mode::Paced`]: `gap_ms` between an answer and the
/// connection's next request.
fn paced_script(gap_ms: u32) -> Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "bgswitch-bench-{}-paced-{gap_ms}.lua",
        std::process::id()
    ));
    std::fs::write(&path, format!("function delay()\n  return {gap_ms}\nend\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn wrk(s: &System, o: &HttpOptions, mode: Mode, script: &std::path::Path) -> Result<Wrk> {
    let wrk = sys::have("wrk").context("wrk is not installed")?;
    let url = format!("http://{}/", vip());
    let conns = if mode == Mode::Paced {
        o.paced_connections
    } else {
        o.connections
    };
    let (t, c, d) = (
        format!("-t{}", o.threads),
        format!("-c{conns}"),
        format!("-d{}s", o.seconds),
    );
    let mut args = vec![
        wrk.to_str().context("path")?,
        t.as_str(),
        c.as_str(),
        d.as_str(),
        "--latency",
        "--timeout",
        "2s",
    ];
    match mode {
        Mode::KeepAlive => {}
        Mode::Close => args.extend(["-H", "Connection: close"]),
        Mode::Paced => args.extend(["-s", script.to_str().context("script path")?]),
    }
    args.push(&url);
    let out = sys::ns_run(s.topo.client_ns(), args[0], &args[1..])?;
    parse_wrk(&out)
}

/// Runs part 3.
pub fn run(o: &HttpOptions) -> Result<Value> {
    if sys::have("wrk").is_none() {
        bail!("wrk is not installed (cargo xtask bench installs it)");
    }
    let mut systems = Vec::new();
    let mut skipped = serde_json::Map::new();
    for k in Kind::HTTP {
        match System::create(k) {
            Ok(s) => systems.push(s),
            Err(e) => {
                skipped.insert(
                    k.key().into(),
                    json!({"status": format!("not measured: {e:#}")}),
                );
            }
        }
    }
    let script = paced_script(o.paced_gap_ms)?;
    let mut res: Vec<[Vec<Wrk>; 3]> = systems.iter().map(|_| Default::default()).collect();
    let ran = (|| -> Result<()> {
        for round in 0..o.rounds {
            for k in 0..systems.len() {
                let i = (k + round) % systems.len();
                for (m, mode) in Mode::ALL.into_iter().enumerate() {
                    let w = wrk(&systems[i], o, mode, &script)
                        .with_context(|| format!("wrk against {}", systems[i].kind.label()))?;
                    res[i][m].push(w);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            eprintln!("bench: http: round {} of {} done", round + 1, o.rounds);
        }
        Ok(())
    })();
    // The script goes whether the runs did or not.
    let _ = std::fs::remove_file(&script);
    ran?;
    let mut out = skipped;
    for (i, s) in systems.iter().enumerate() {
        let summary = |m: usize| {
            let v = &res[i][m];
            let rps: Vec<f64> = v.iter().map(|w| w.rps).collect();
            json!({
                "requests_per_second": Summary::of(&rps),
                "p50_ms": median(&v.iter().map(|w| w.p50_ms).collect::<Vec<_>>()),
                "p99_ms": median(&v.iter().map(|w| w.p99_ms).collect::<Vec<_>>()),
                "requests": v.iter().map(|w| w.requests).sum::<u64>(),
                "errors": v.iter().map(|w| w.errors).sum::<u64>(),
            })
        };
        let mut v = json!({"status": "measured"});
        for (m, mode) in Mode::ALL.into_iter().enumerate() {
            v[mode.key()] = summary(m);
        }
        out.insert(s.kind.key().into(), v);
    }
    Ok(json!({
        "method": format!("wrk -t{} -c{} -d{}s --latency (new connection per request: -H 'Connection: close'; paced keep-alive: -c{} with a script whose delay() makes each connection wait {} ms after an answer before its next request, the same offered load for every system, below saturation) from the client namespace to VIP:8080; {} interleaved rounds; medians over rounds (requests/s with min–max)", o.threads, o.connections, o.seconds, o.paced_connections, o.paced_gap_ms, o.rounds),
        "backends": "4 (2 blue, 2 green) HTTP servers of the test bed, thread per connection; only blue serves",
        "veth_offload_caveat": "every veth keeps the kernel's default offloads (TSO, GRO off, partial checksums), as in containers: bgswitch serves them with TC (what `attach = \"auto\"` takes there), nftables and HAProxy run on the same path. The XDP row stands in for physical NICs (senders compute complete checksums, the peers of the load balancer's veths have GRO on, and XDP on a veth removes TSO/GSO from its peer): it segments otherwise and is shown for what the XDP path costs, not against the peers. Everything (wrk, load balancer, backends) shares the machine's 2 CPUs.",
        "systems": out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://198.19.0.10:8080/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.02ms  310.00us   8.00ms   90.00%\n  Latency Distribution\n     50%  850.00us\n     75%    1.10ms\n     90%    1.40ms\n     99%    2.50ms\n  75000 requests in 5.00s, 9.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  15000.50\nTransfer/sec:      1.80MB\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.rps, 15000.5);
        assert!((w.p50_ms - 0.85).abs() < 1e-9);
        assert_eq!(w.p99_ms, 2.5);
        assert_eq!(w.requests, 75000);
        assert_eq!(w.errors, 3);
    }
}
