//! `bgswitch-bench`: the benchmark suite of issue 5, run by `cargo xtask
//! bench` (full: writes `bench/RESULTS.md` and `bench/results.json`) and, in
//! quick mode, by `cargo xtask test` (correctness counters and gross ratios
//! only, never absolute times).
//!
//! Parts, in the order they run:
//! 1. program cost (BPF_PROG_TEST_RUN) — [`cost`];
//! 4. flip latency — [`flip`];
//! 5. scale: memory per flow and cost as the table fills — [`cost::scale`];
//! 2. forwarding rate through veth with a live-frames XDP generator — [`fwd`];
//! 3. TCP/HTTP through the VIP — [`http`];
//! 5. the daemon: memory and CPU, flips with the most services, the daemon
//!    under work — [`daemon`] (quick mode: the last two, with a gross check).
//!
//! Every part that fails or cannot run records why instead of numbers.

mod cost;
mod daemon;
mod fleet;
mod flip;
mod frames;
mod fwd;
mod http;
mod load;
mod objects;
mod report;
mod stats;
mod sys;
mod systems;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "bgswitch benchmark suite (run as root; see bench/RESULTS.md)")]
struct Args {
    /// CI mode: correctness counters and gross ratios only, never absolute times.
    #[arg(long)]
    quick: bool,
    /// Where to write results.json and RESULTS.md.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only these parts (comma-separated): cost, components, flip,
    /// scale, forwarding, http, fleet, daemon (services: only its flips
    /// with the most services and the daemon under work).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Profiling aid: run one program-cost case (established, reply, nonvip,
    /// syn, pass, stateless: an ACK to the stateless service; newflow: a fresh
    /// 5-tuple's SYN per call, repeat 1; established6, reply6, pass6: IPv6) in a
    /// loop for --seconds on the bench CPU, then exit.
    #[arg(long)]
    spin: Option<String>,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Profiling aid: run one forwarding configuration (floor, redirect, bgswitch:N,
    /// kernel:N, nft:N, stateless:N, nfttcp:N, new, floor6, bgswitch6:N, kernel6:N; two CPUs:
    /// bgswitch2:N, stateless2:N, N flows per CPU; floor2, redirect2) repeatedly for
    /// --seconds, then exit.
    #[arg(long)]
    spin_fwd: Option<String>,
    /// Internal: send LINE to HAProxy's runtime API at SOCKET, print the
    /// answer and the CLOCK_MONOTONIC time it arrived (one whole process per
    /// HAProxy switch, like `bgswitch flip` and `nft -f`).
    #[arg(long, num_args = 2, value_names = ["SOCKET", "LINE"], hide = true)]
    haproxy_api: Option<Vec<String>>,
    /// Rewrite RESULTS.md (and the targets) from the results.json in --out,
    /// measuring nothing.
    #[arg(long)]
    render: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgswitch-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if let Some(a) = &args.haproxy_api {
        let answer = systems::haproxy_api(std::path::Path::new(&a[0]), &a[1])?;
        println!("answered_ns {}", sys::now_ns());
        print!("{answer}");
        if answer.lines().any(|l| !l.trim().is_empty()) {
            bail!("HAProxy answered: {answer}");
        }
        return Ok(());
    }
    if args.render {
        let dir = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/bench"));
        let path = dir.join("results.json");
        let mut all: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        all["targets"] = Value::Array(report::targets(&all["results"]));
        all["profile_text"] = json!(report::PROFILE);
        std::fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")?;
        std::fs::write(dir.join("RESULTS.md"), report::markdown(&all))?;
        return Ok(());
    }
    if !bgswitch_tests::is_root() {
        bail!("the benchmarks load XDP programs and create network namespaces: run as root");
    }
    objects::check()?;
    let cpu = sys::bench_cpu();
    if let Some(spec) = &args.spin_fwd {
        let mpps = fwd::spin(spec, args.seconds, cpu)?;
        println!("{spec}: {mpps:.3} Mpps on CPU {cpu}");
        return Ok(());
    }
    if let Some(case) = &args.spin {
        let (runs, ns) = cost::spin(case, args.seconds, cpu, 262_144)?;
        println!("{case}: {runs} runs on CPU {cpu}, {ns:.1} ns per run");
        return Ok(());
    }
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    let mut record = |name: &str, r: Result<Value>| -> Result<()> {
        match r {
            Ok(v) => {
                results.insert(name.into(), v);
                Ok(())
            }
            Err(e) if !args.quick => {
                eprintln!("bench: {name}: not measured: {e:#}");
                results.insert(
                    name.into(),
                    json!({"status": format!("not measured: {e:#}")}),
                );
                Ok(())
            }
            Err(e) => Err(e.context(format!("quick bench, part {name}"))),
        }
    };
    let copts = if args.quick {
        cost::CostOptions::quick(cpu)
    } else {
        cost::CostOptions::full(cpu)
    };
    if want("cost") {
        eprintln!("bench: part 1, program cost");
        let r = cost::program_cost(&copts);
        if args.quick {
            if let Ok(v) = &r {
                cost::assert_checks(v)?;
            }
        }
        record("program_cost", r)?;
    }
    if want("components") {
        eprintln!("bench: part 1, component costs");
        let (rounds, repeat) = if args.quick { (1, 1000) } else { (9, 100_000) };
        let r = cost::components(rounds, repeat, cpu);
        if args.quick {
            if let Ok(v) = &r {
                cost::assert_components(v, rounds)?;
            }
        }
        record("components", r)?;
    }
    if want("flip") {
        eprintln!("bench: part 4, flip");
        let fopts = if args.quick {
            flip::FlipOptions::quick()
        } else {
            flip::FlipOptions::full()
        };
        let r = flip::run(&fopts);
        if args.quick {
            if let Ok(v) = &r {
                flip::assert_clean(v)?;
            }
        }
        record("flip", r)?;
    }
    if want("scale") {
        eprintln!("bench: part 5, scale (program cost and memory as the table fills)");
        let r = cost::scale(&copts);
        if args.quick {
            if let Ok(v) = &r {
                cost::assert_scale(v, &copts)?;
            }
        }
        record("scale_cost", r)?;
    }
    if want("forwarding") {
        eprintln!("bench: part 2, forwarding rate (and part 5's forwarding half)");
        let o = if args.quick {
            fwd::FwdOptions::quick(cpu)
        } else {
            fwd::FwdOptions::full(cpu)
        };
        let r = fwd::run(&o);
        if args.quick {
            if let Ok(v) = &r {
                fwd::assert_gross(v)?;
            }
        }
        record("forwarding", r)?;
    }
    if want("http") && !args.quick {
        eprintln!("bench: part 3, TCP/HTTP");
        record("http", http::run(&http::HttpOptions::full()))?;
    }
    if want("fleet") {
        eprintln!("bench: part 6, a fleet of three hosts (etcd)");
        let o = if args.quick {
            fleet::FleetOptions::quick()
        } else {
            fleet::FleetOptions::full()
        };
        let r = fleet::run(&o);
        if args.quick {
            if let Ok(v) = &r {
                fleet::assert_gross(v)?;
            }
        }
        record("fleet", r)?;
    }
    let services_only = args.quick || args.only.iter().any(|o| o == "services");
    if want("daemon") || services_only {
        eprintln!("bench: part 5, the daemon: memory, CPU, the most services, under work");
        let r = daemon::run(&daemon::DaemonOptions {
            window: std::time::Duration::from_secs(10),
            flips: if args.quick { 20 } else { 100 },
            journal_lines: 102_400,
            idle_and_health: !services_only,
        });
        if args.quick {
            if let Ok(v) = &r {
                daemon::assert_gross(v)?;
            }
        }
        record("daemon", r)?;
    }
    let results = Value::Object(results);
    let commit = sys::run("git", &["rev-parse", "--short=12", "HEAD"])
        .map(|c| c.trim().to_string())
        .unwrap_or_default();
    let dirty = sys::run("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_ok_and(|s| !s.trim().is_empty());
    let mut out = json!({
        "meta": {
            "quick": args.quick,
            "date": sys::run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default().trim(),
            "commit": if dirty { format!("{commit} (with uncommitted changes)") } else { commit },
            "bgswitch_bin": bgswitch_tests::switcher::bgswitch_bin().map(|p| p.display().to_string()).unwrap_or_default(),
            "bench_bin": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
            "machine": sys::machine(),
            "elapsed_s": started.elapsed().as_secs_f64(),
        },
        "results": results,
    });
    out["targets"] = Value::Array(report::targets(&out["results"]));
    out["profile_text"] = json!(report::PROFILE);
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let md = dir.join("RESULTS.md");
    std::fs::write(&md, report::markdown(&out))
        .with_context(|| format!("writing {}", md.display()))?;
    eprintln!("bench: wrote {} and {}", path.display(), md.display());
    Ok(())
}
