//! Part 6: a fleet of three load-balancer hosts flips as one. Three served
//! test beds, each with its daemon in a fleet sharing one etcd (Debian's, in
//! a namespace of its own); each flip is `bgswitch flip` on the first host,
//! and the control word of the service is watched on every host (the mapped
//! `CONTROL` array of each, polled every ~10 µs): "all applied" is the
//! command's start to the last host's store, "disagreement" the first
//! host's store to the last's. The peer is the same change made host by
//! host with `nft -f` on each (as a loop over hosts or a configuration
//! management run makes it): its window is the first host's `nft -f`
//! returning to the last's.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};

use bgswitch_tests::{
    fleet::{fleet_table, Etcd},
    peers::NftDnat,
    switcher::{default_services, served_topology, Switcher},
    Colour, Topology,
};

use crate::{
    stats::{percentile, Summary},
    sys,
    systems::ControlView,
};

pub struct FleetOptions {
    pub hosts: usize,
    pub flips: usize,
    pub gap: Duration,
}

impl FleetOptions {
    pub fn full() -> Self {
        Self {
            hosts: 3,
            flips: 50,
            gap: Duration::from_millis(50),
        }
    }
    pub fn quick() -> Self {
        Self {
            hosts: 3,
            flips: 5,
            gap: Duration::from_millis(50),
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn with_p99(samples: &[f64]) -> Value {
    let s = Summary::of(samples);
    json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n, "p99": percentile(samples, 99.0)})
}

pub fn run(o: &FleetOptions) -> Result<Value> {
    let mut etcd = Etcd::start(1)?;
    let mut hosts: Vec<(Topology, Switcher)> = Vec::new();
    for i in 0..o.hosts {
        let topo = served_topology()?;
        let endpoints = etcd.link(topo.lb_ns())?;
        let mut sw = Switcher::new(
            &topo,
            &format!(
                "{}\n{}",
                default_services(&topo),
                fleet_table(&endpoints, "bench", &format!("lb{}", i + 1))
            ),
        )?;
        sw.start()?;
        hosts.push((topo, sw));
    }
    // Every host reports within a second or two.
    std::thread::sleep(Duration::from_millis(2500));
    let views: Vec<ControlView> = hosts
        .iter()
        .map(|(_, sw)| ControlView::open(&sw.bpffs()))
        .collect::<Result<_>>()?;
    let bin = bgswitch_tests::switcher::bgswitch_bin()?;
    let mut all = Vec::new();
    let mut window = Vec::new();
    let mut command = Vec::new();
    let mut to = Colour::Green;
    for _ in 0..o.flips {
        let before: Vec<Vec<u32>> = views.iter().map(ControlView::words).collect();
        let done = AtomicBool::new(false);
        let (start, end, seen) = std::thread::scope(|s| -> Result<_> {
            let watcher = s.spawn(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let mut at: Vec<Option<u64>> = vec![None; views.len()];
                while at.iter().any(Option::is_none) && std::time::Instant::now() < deadline {
                    for (i, v) in views.iter().enumerate() {
                        if at[i].is_none() && v.words() != before[i] {
                            at[i] = Some(sys::now_ns());
                        }
                    }
                    if done.load(Ordering::Relaxed) && at.iter().all(Option::is_some) {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(10));
                }
                at
            });
            let start = sys::now_ns();
            let out = Command::new(&bin)
                .arg("--socket")
                .arg(hosts[0].1.socket())
                .args(["flip", "web", "--to", to.as_str()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()?;
            let end = sys::now_ns();
            done.store(true, Ordering::Relaxed);
            ensure!(
                out.status.success(),
                "flip: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok((start, end, watcher.join().expect("watcher")))
        })?;
        let seen: Vec<u64> = seen
            .into_iter()
            .collect::<Option<_>>()
            .context("a host did not apply a flip within 5 s")?;
        let (first, last) = (
            *seen.iter().min().unwrap_or(&start),
            *seen.iter().max().unwrap_or(&start),
        );
        all.push(ms(last - start));
        window.push(ms(last - first));
        command.push(ms(end - start));
        to = to.other();
        std::thread::sleep(o.gap);
    }
    drop(views);
    // The peer, on the same hosts: nftables DNAT, host by host.
    for (_, sw) in &mut hosts {
        sw.stop()?;
    }
    let mut nfts: Vec<NftDnat> = hosts
        .iter()
        .map(|(t, _)| NftDnat::start(t))
        .collect::<Result<_>>()?;
    let mut peer_all = Vec::new();
    let mut peer_window = Vec::new();
    let mut to = Colour::Green;
    for _ in 0..o.flips {
        let start = sys::now_ns();
        let mut applied = Vec::new();
        for n in &mut nfts {
            n.set_active("web", to)?;
            let file = n.ruleset()?;
            n.run_in_lb(&mut n.load_command(&file))?;
            applied.push(sys::now_ns());
        }
        peer_all.push(ms(applied[applied.len() - 1] - start));
        peer_window.push(ms(applied[applied.len() - 1] - applied[0]));
        to = to.other();
        std::thread::sleep(o.gap);
    }
    drop(nfts);
    drop(hosts);
    etcd.stop();
    Ok(json!({
        "hosts": o.hosts,
        "flips": o.flips,
        "bgswitch": {
            "all_applied_ms": with_p99(&all),
            "disagreement_ms": with_p99(&window),
            "command_ms": with_p99(&command),
        },
        "nftables_host_by_host": {
            "all_applied_ms": with_p99(&peer_all),
            "disagreement_ms": with_p99(&peer_window),
        },
    }))
}

/// Quick mode: every flip reached every host (`run` fails otherwise), and
/// the hosts disagreed for less time than the host-by-host peer (medians;
/// a gross ratio, never an absolute time).
pub fn assert_gross(v: &Value) -> Result<()> {
    let b = v["bgswitch"]["disagreement_ms"]["median"]
        .as_f64()
        .context("no fleet disagreement")?;
    let p = v["nftables_host_by_host"]["disagreement_ms"]["median"]
        .as_f64()
        .context("no peer disagreement")?;
    ensure!(
        b < p,
        "fleet: hosts disagreed for {b:.2} ms (median), longer than nft -f host by host ({p:.2} ms)"
    );
    Ok(())
}
