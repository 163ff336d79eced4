//! Targets and RESULTS.md, both computed from the results JSON: the
//! targets table (`targets.rs`), the paragraphs and tables of the parts
//! (`sections.rs`), the text of what the profiles showed and what was tried
//! (`profile.rs`), and here the document's order and the value helpers
//! they share.

use std::fmt::Write as _;

use serde_json::Value;

mod profile;
mod sections;
mod targets;

pub use profile::PROFILE;
pub use targets::targets;

use profile::fill_profile;
use sections::*;

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn num(v: &Value, d: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.d$}"),
        Some(_) => "∞".into(),
        None => match v.as_u64() {
            Some(u) => u.to_string(),
            None => "—".into(),
        },
    }
}

/// `median (min–max)` of a Summary object.
fn summ(v: &Value, d: usize) -> String {
    if v.get("median").is_none() {
        return "—".into();
    }
    format!(
        "{} ({}–{})",
        num(&v["median"], d),
        num(&v["min"], d),
        num(&v["max"], d)
    )
}

fn status(v: &Value) -> Option<String> {
    match v.get("status").and_then(Value::as_str) {
        Some("measured") => None,
        Some(s) => Some(s.to_string()),
        None if v.is_null() => Some("not measured: this part was not run".into()),
        None => None,
    }
}

fn case<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["program_cost"]["cases"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["case"] == key))
        .unwrap_or(&Value::Null)
}

fn fwd<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["forwarding"]["configs"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["config"] == key))
        .unwrap_or(&Value::Null)
}

/// A figure with two decimals for the profile text (rounded to whole ns
/// otherwise).
fn two_decimals(v: &Value) -> Option<f64> {
    v.as_f64().map(|x| (x * 100.0).round() / 100.0)
}

fn met(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// RESULTS.md.
pub fn markdown(all: &Value) -> String {
    let r = &all["results"];
    let m = &all["meta"];
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# bgswitch benchmark results\n");
    let _ = writeln!(
        w,
        "Written by `cargo xtask bench{}` ({}); the same numbers are in `results.json` next to \
         this file. Machine: {}, {} CPUs, {} GiB, Linux {}; commit {}. Run took {:.0} s.\n",
        if m["quick"] == true {
            " --quick` — quick mode: correctness counters and gross ratios only; do not read the times"
        } else {
            ""
        },
        m["date"].as_str().unwrap_or("?"),
        m["machine"]["cpu_model"].as_str().unwrap_or("?"),
        m["machine"]["cpus"],
        m["machine"]["memory_gib"],
        m["machine"]["kernel"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
        m["elapsed_s"].as_f64().unwrap_or(0.0),
    );
    let _ = writeln!(
        w,
        "This is a 2-CPU virtual machine shared with other work; figures vary ±30 % from run to \
         run. Every comparison below is made within this one run (interleaved rounds, pinned CPU, \
         medians with min–max over rounds); never compare absolute numbers across runs or \
         machines. The bgswitch binary measured: `{}`.\n",
        m["bgswitch_bin"].as_str().unwrap_or("?")
    );

    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| target | wanted | measured | | where |");
    let _ = writeln!(w, "|---|---|---|---|---|");
    for t in all["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            w,
            "| {} | {} | {} {} | {} | {} |",
            t["target"].as_str().unwrap_or(""),
            t["wanted"].as_str().unwrap_or(""),
            num(&t["value"], 1),
            t["unit"].as_str().unwrap_or(""),
            met(&t["met"]),
            t["note"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(w);
    if let Some(p) = all["profile_text"].as_str() {
        let _ = writeln!(w, "{}\n", fill_profile(p, r));
    }

    // Part 1.
    let p1 = &r["program_cost"];
    let _ = writeln!(w, "## 1. Program cost (BPF_PROG_TEST_RUN)\n");
    if let Some(st) = status(p1) {
        let _ = writeln!(w, "{st}\n");
    } else {
        let _ = writeln!(
            w,
            "{}. CPU {}, {} rounds; per round {} calls of repeat {} (repeat-1 cases: {} calls). \
             Baseline XDP_PASS: {} ns per run at repeat {}, {} ns at repeat 1; on the IPv6 frames \
             (the IPv6 cases' baseline) {} and {} ns.\n",
            p1["method"].as_str().unwrap_or(""),
            p1["cpu"],
            p1["rounds"],
            p1["calls_per_round"],
            p1["repeat"],
            p1["single_calls_per_round"],
            summ(&p1["baseline_ns"]["repeat_n"], 1),
            p1["repeat"],
            summ(&p1["baseline_ns"]["repeat_1"], 1),
            summ(&p1["baseline_ns"]["ipv6_repeat_n"], 1),
            summ(&p1["baseline_ns"]["ipv6_repeat_1"], 1),
        );
        let _ = writeln!(
            w,
            "| packet | over XDP_PASS, ns | absolute, ns | program-only Mpps |"
        );
        let _ = writeln!(w, "|---|---|---|---|");
        for c in p1["cases"].as_array().into_iter().flatten() {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} |",
                c["label"].as_str().unwrap_or(""),
                summ(&c["over_baseline_ns"], 1),
                summ(&c["absolute_ns"], 1),
                num(&c["program_only_mpps"], 2)
            );
        }
        let _ = writeln!(w, "\nProgram-only Mpps = 1000 / (ns over baseline): the rate one core could sustain if the program were all it did. \
            Repeat-1 figures are cold runs (each call enters the kernel afresh; caches and branch predictors are disturbed): \
            compare the established packet here (repeat {}) with the same packet at repeat 1 in part 5's 1-flow row.\n", p1["repeat"]);
        ipv6_cost_paragraph(w, r, p1);
        let _ = writeln!(
            w,
            "Correctness checks before measuring (repeat 1 unless stated):\n"
        );
        for c in p1["checks"].as_array().into_iter().flatten() {
            let _ = writeln!(
                w,
                "- {} {} ({})",
                if c["ok"] == true { "✔" } else { "✘" },
                c["check"].as_str().unwrap_or(""),
                c["detail"].as_str().unwrap_or("")
            );
        }
        let _ = writeln!(w);
    }
    if let Some(c) = r.get("components") {
        if let Some(st) = status(c) {
            let _ = writeln!(w, "Component costs: {st}\n");
        } else {
            let _ = writeln!(w, "### Where the time goes: component costs\n");
            let _ = writeln!(w, "{}\n", c["method"].as_str().unwrap_or(""));
            let _ = writeln!(w, "| component | ns over XDP_PASS |");
            let _ = writeln!(w, "|---|---|");
            for x in c["components"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    w,
                    "| {} | {} |",
                    x["label"].as_str().unwrap_or(""),
                    summ(&x["over_baseline_ns"], 1)
                );
            }
            let _ = writeln!(w);
        }
    }

    // Part 2.
    let p2 = &r["forwarding"];
    let _ = writeln!(
        w,
        "## 2. Forwarding rate, one core, veth + namespaces, 64-byte frames\n"
    );
    if let Some(st) = status(p2) {
        let _ = writeln!(w, "{st}\n");
    } else {
        let _ = writeln!(
            w,
            "{}. {} frames per run, batch {}, {} rounds, CPU {}; UDP checksum 0 (no receiver pays for \
             verifying a checksum a NIC would have verified); bgswitch's UDP idle timeout set to 1 h \
             so flows stay recorded between rounds. \"lb ns/pkt over floor\" = ns per packet minus \
             the floor's: what the load balancer adds.\n",
            p2["method"].as_str().unwrap_or(""),
            p2["frames_per_run"], p2["batch"], p2["rounds"], p2["cpu"]
        );
        let _ = writeln!(w, "| configuration | flow table (max_flows) | Mpps | ns/pkt | lb ns/pkt over floor | × nftables DNAT (10k) | of floor | sent | delivered | lost | flow hits |");
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
        for c in p2["configs"].as_array().into_iter().flatten() {
            if c["config"]
                .as_str()
                .is_some_and(|k| k.starts_with("bgswitch_full_table"))
            {
                continue;
            }
            fwd_row(w, c);
        }
        let _ = writeln!(w);
        ipv6_fwd_paragraph(w, p2);
        tc_paragraph(w, r, p2);
        let _ = writeln!(
            w,
            "Loss in the table above happens when the kernel defers softirq work to ksoftirqd on the \
             generator's CPU (under contention from other work) while the generator keeps filling a \
             veth ring. Paced check: {}.\n",
            p2["paced_method"].as_str().unwrap_or("")
        );
        let _ = writeln!(w, "| configuration | sent | delivered | lost |");
        let _ = writeln!(w, "|---|---|---|---|");
        for c in p2["paced"].as_array().into_iter().flatten() {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} |",
                c["config"].as_str().unwrap_or(""),
                num(&c["sent"], 0),
                num(&c["delivered"], 0),
                num(&c["lost"], 0)
            );
        }
        let _ = writeln!(w);
    }

    // Part 3.
    let p3 = &r["http"];
    let _ = writeln!(w, "## 3. TCP/HTTP through the VIP\n");
    if let Some(st) = status(p3).filter(|_| p3.get("systems").is_none()) {
        let _ = writeln!(w, "{st}\n");
    } else {
        let _ = writeln!(
            w,
            "{} Backends: {}.\n",
            p3["method"].as_str().unwrap_or(""),
            p3["backends"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            w,
            "Veth offload caveat: {}\n",
            p3["veth_offload_caveat"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            w,
            "| system | mode | requests/s | p50 ms | p99 ms | requests | errors |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|");
        for k in ["bgswitch", "nftables_dnat", "haproxy_tcp", "bgswitch_xdp"] {
            let s = &p3["systems"][k];
            let k = match k {
                "bgswitch" => "bgswitch (TC)",
                "bgswitch_xdp" => "bgswitch (XDP, NIC-like veths)",
                other => other,
            };
            if let Some(st) = status(s) {
                let _ = writeln!(w, "| {k} | — | {st} | | | | |");
                continue;
            }
            for (mode, label) in [
                ("keepalive", "keep-alive"),
                ("new_connection_per_request", "new connection per request"),
                ("keepalive_paced", "keep-alive, paced (equal load)"),
            ] {
                let x = &s[mode];
                let _ = writeln!(
                    w,
                    "| {k} | {label} | {} | {} | {} | {} | {} |",
                    summ(&x["requests_per_second"], 0),
                    num(&x["p50_ms"], 3),
                    num(&x["p99_ms"], 3),
                    num(&x["requests"], 0),
                    num(&x["errors"], 0)
                );
            }
        }
        let _ = writeln!(w);
    }

    // Part 4.
    let p4 = &r["flip"];
    let _ = writeln!(w, "## 4. Flip\n");
    if let Some(st) = status(p4).filter(|_| p4.get("systems").is_none()) {
        let _ = writeln!(w, "{st}\n");
    } else {
        let _ = writeln!(w, "{}. \"Applied\": invocation to the new state in place — bgswitch: the control word seen changed in the mapped `CONTROL` array (polled every ~10 µs); HAProxy: the runtime API's answer; nftables: `nft -f` exiting (its commit is synchronous). \"First new flow\": invocation to the start of the first new connection the new colour answered (resolution: the probe interval). The nftables and HAProxy commands run in the load balancer's namespace by `setns` in the child (no `ip netns exec`); HAProxy's switch is one process sending one runtime-API line (`set server … state ready` for the new colour, then `drain` for the old: open connections stay).\n",
            p4["method"].as_str().unwrap_or(""));
        let _ = writeln!(w, "| system | command, ms | applied, ms | first new flow on new colour, ms | probe interval, ms | failed requests / total | new flows on old colour after return |");
        let _ = writeln!(w, "|---|---|---|---|---|---|---|");
        for k in ["bgswitch", "nftables_dnat", "haproxy_tcp"] {
            let s = &p4["systems"][k];
            if let Some(st) = status(s) {
                let _ = writeln!(w, "| {k} | {st} | | | | | |");
                continue;
            }
            let total =
                s["probes"].as_u64().unwrap_or(0) + s["keepalive_requests"].as_u64().unwrap_or(0);
            let _ = writeln!(
                w,
                "| {k} | {} | {} | {} | {} | {} / {total} | {} |",
                summ(&s["command_ms"], 2),
                summ(&s["applied_ms"], 2),
                summ(&s["first_new_flow_on_new_colour_ms"], 2),
                num(&s["probe_interval_ms_median"], 2),
                num(&s["failed_requests"], 0),
                num(&s["new_flows_on_old_colour_after_command_returned"], 0)
            );
            if let Some(e) = s["first_error"].as_str() {
                let _ = writeln!(w, "| | first error: {e} | | | | | |");
            }
        }
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "The same commands with no client load (5 ms apart): what a command costs by itself. \
             For scale, spawn to exit of `/bin/true` takes {} ms here and of `bgswitch --version` {} ms (medians).\n",
            num(&p4["process_spawn_ms"]["true_ms"], 2),
            num(&p4["process_spawn_ms"]["bgswitch_version_ms"], 2)
        );
        let _ = writeln!(w, "| system | command, ms | applied, ms |");
        let _ = writeln!(w, "|---|---|---|");
        for k in ["bgswitch", "nftables_dnat", "haproxy_tcp"] {
            let s = &p4["systems"][k]["without_load"];
            if s.is_null() {
                continue;
            }
            let _ = writeln!(
                w,
                "| {k} | {} | {} |",
                summ(&s["command_ms"], 2),
                summ(&s["applied_ms"], 2)
            );
        }
        let _ = writeln!(w);
    }
    follow_section(w, &r["forwarding"]["follow"]);
    flood_section(w, &r["forwarding"]["syn_flood"]);

    // Part 5.
    let _ = writeln!(w, "## 5. Scale\n");
    let sc = &r["scale_cost"];
    if let Some(st) = status(sc) {
        let _ = writeln!(w, "Program cost and memory: {st}\n");
    } else {
        let mem = &sc["memory"];
        let _ = writeln!(w, "### Memory per flow\n");
        let _ = writeln!(
            w,
            "The flow table is an LRU hash with {} entry per flow ({} B key + value per entry; \
             replies find their flow through the backend's service). The per-CPU flow cache \
             adds 64 B per slot on every possible CPU (4 MiB per CPU here), not counted here. The kernel accounts {} B for a table of {} flows and {} B for {} flows: **{} B per flow** \
             (slope), {} B per flow including fixed parts. The drop in MemAvailable when the large \
             table was created gives {} B per flow (noisy: the machine is shared). LRU maps are \
             preallocated: this memory is taken at load, whatever the number of live flows.\n",
            mem["entries_per_flow"],
            mem["flow_key_plus_entry_bytes"],
            num(&mem["flows_map_memlock_bytes"], 0), sc["scale_max_flows"],
            num(&mem["flows_map_memlock_bytes_small"], 0), mem["small_max_flows"],
            num(&mem["bytes_per_flow_slope"], 1),
            num(&mem["bytes_per_flow_memlock"], 1),
            num(&mem["bytes_per_flow_memavailable_delta"], 0),
        );
        memory_by_family(w, mem, sc);
        let _ = writeln!(w, "### Program cost as the table fills\n");
        let _ = writeln!(w, "{} Table: {} flows (max_flows). After filling, {} flows were recorded (an LRU map starts evicting somewhat before it is full).\n",
            sc["method"].as_str().unwrap_or(""), sc["scale_max_flows"], num(&sc["flows_recorded_after_fill"], 0));
        let _ = writeln!(w, "| flows in table | established, hot (ns over XDP_PASS) | established, random flow (ns over XDP_PASS, repeat 1) | new flow (ns over XDP_PASS, repeat 1) | random-flow hit ratio | stateless service, a random client among as many (ns over XDP_PASS, repeat 1; table full, levels interleaved) |");
        let _ = writeln!(w, "|---|---|---|---|---|---|");
        for l in sc["levels"].as_array().into_iter().flatten() {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                l["flows"],
                summ(&l["established_hot_ns"], 1),
                summ(&l["established_spread_ns"], 1),
                summ(&l["new_flow_ns"], 1),
                num(&l["spread_hit_ratio"], 3),
                summ(&l["stateless_spread_ns"], 1)
            );
        }
        let _ = writeln!(w);
    }
    if status(p2).is_none() {
        let _ = writeln!(w, "### Forwarding rate as the table fills\n");
        let _ = writeln!(w, "One data plane whose table holds {} flows, the generator cycling through N flows (same method as part 2, fewer rounds).\n",
            p2["configs"].as_array().and_then(|a| a.iter().find(|c| c["config"].as_str().is_some_and(|k| k.starts_with("bgswitch_full_table")))).map_or("—".into(), |c| num(&c["table_max_flows"], 0)));
        let _ = writeln!(w, "| configuration | flow table (max_flows) | Mpps | ns/pkt | lb ns/pkt over floor | × nftables DNAT (10k) | of floor | sent | delivered | lost | flow hits |");
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
        for c in p2["configs"].as_array().into_iter().flatten() {
            if c["config"]
                .as_str()
                .is_some_and(|k| k.starts_with("bgswitch_full_table"))
            {
                fwd_row(w, c);
            }
        }
        let _ = writeln!(w);
    }
    let d = &r["daemon"];
    let _ = writeln!(w, "### Daemon\n");
    if d.is_null() {
        let _ = writeln!(w, "not measured: this part was not run\n");
    } else {
        let _ = writeln!(w, "{}.\n", d["method"].as_str().unwrap_or(""));
        let _ = writeln!(
            w,
            "| state | resident memory | CPU (% of one core) | notes |"
        );
        let _ = writeln!(w, "|---|---|---|---|");
        for (k, label) in [
            ("idle", "idle"),
            ("health_checks_256_backends", "health-checking 256 backends"),
        ] {
            let x = &d[k];
            if let Some(st) = status(x) {
                let _ = writeln!(w, "| {label} | {st} | | |");
                continue;
            }
            let rss = x["rss_bytes"]
                .as_f64()
                .map_or("—".into(), |b| format!("{:.1} MiB", b / 1048576.0));
            let mut note = x["config"].as_str().unwrap_or("").to_string();
            if let Some(p) = x["health_probes_per_second"].as_f64() {
                let _ = write!(note, "; {p:.0} probes/s answered");
            }
            let _ = writeln!(
                w,
                "| {label} | {rss} | {} | {note} |",
                num(&x["cpu_percent_of_one_core"], 2)
            );
        }
        let _ = writeln!(w);
        let m = &d["flips_with_most_services"];
        if let Some(st) = status(m) {
            let _ = writeln!(w, "Flips with the most services: {st}\n");
        } else if !m.is_null() {
            let kib = |v: &Value| {
                v.as_f64()
                    .map_or("—".into(), |b| format!("{:.0} KiB", b / 1024.0))
            };
            let _ = writeln!(
                w,
                "Flips with the most services: {} TCP services, {} changes made first (each flipped {} times over the socket); \
                 then `bgswitch flip` of one service {} times, 20 ms apart, no client load, spawn to exit: {} ms, p90 {} ms \
                 (part 4's two services without load: {} ms). Daemon resident memory {}; `state.json` {}, journal {}.\n",
                num(&m["services"], 0),
                num(&m["changes_before"], 0),
                m["changes_before"].as_f64().zip(m["services"].as_f64()).map_or("?".into(), |(c, s)| format!("{:.0}", c / s)),
                num(&m["flips"], 0),
                summ(&m["command_ms"], 2),
                num(&m["command_ms_p90"], 2),
                summ(&r["flip"]["systems"]["bgswitch"]["without_load"]["command_ms"], 2),
                m["rss_bytes"].as_f64().map_or("—".into(), |b| format!("{:.1} MiB", b / 1048576.0)),
                kib(&m["state_file_bytes"]),
                kib(&m["journal_bytes"]),
            );
            under_work_section(w, &m["under_work"]);
        }
    }
    fleet_section(w, &r["fleet"]);
    if let Some(n) = all["notes"].as_str() {
        let _ = writeln!(w, "{n}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row<'a>(t: &'a [Value], name: &str) -> &'a Value {
        t.iter()
            .find(|x| x["target"] == name)
            .unwrap_or_else(|| panic!("no targets row {name:?}"))
    }

    #[test]
    fn forwarding_is_measured_against_the_redirect_ceiling_and_flips_against_haproxy() {
        let config = |key: &str, mpps: f64| {
            json!({"config": key, "mpps": {"median": mpps}, "ns_per_packet": 1000.0 / mpps,
                   "ratio_to_floor": mpps / 8.0})
        };
        let flip = |load: f64, idle: f64| {
            json!({"command_ms": {"median": load}, "applied_ms": {"median": load - 0.5},
                   "flips": 100, "without_load": {"command_ms": {"median": idle},
                   "applied_ms": {"median": idle - 0.5}, "flips": 100}})
        };
        let r = json!({
            "forwarding": {"configs": [
                config("generator_to_drop_floor", 8.0),
                config("xdp_redirect_ceiling", 5.0),
                config("bgswitch_10000_flows", 4.0),
                config("bgswitch_stateless_10000_flows", 4.5),
            ]},
            "flip": {"systems": {"bgswitch": flip(3.0, 1.0), "haproxy_tcp": flip(2.0, 1.5)}},
        });
        let t = targets(&r);
        let table = row(&t, "forwarding rate vs the redirect ceiling, 10 000 flows");
        assert!((table["value"].as_f64().unwrap() - 80.0).abs() < 1e-9);
        assert_eq!(table["met"], false);
        let stateless = row(
            &t,
            "stateless service: forwarding rate vs the redirect ceiling, 10 000 flows",
        );
        assert!((stateless["value"].as_f64().unwrap() - 90.0).abs() < 1e-9);
        assert_eq!(stateless["met"], true);
        assert!(!t
            .iter()
            .any(|x| x["target"].as_str().unwrap().contains("floor")));
        let load = row(
            &t,
            "`bgswitch flip`, whole process, median, under client load",
        );
        assert_eq!(
            (load["value"].as_f64(), &load["met"]),
            (Some(3.0), &json!(false))
        );
        let idle = row(&t, "`bgswitch flip`, whole process, median, idle");
        assert_eq!(
            (idle["value"].as_f64(), &idle["met"]),
            (Some(1.0), &json!(true))
        );
        assert!(idle["note"]
            .as_str()
            .unwrap()
            .contains("HAProxy's switch (a process sending one runtime-API line): 1.50 ms"));
    }
}
