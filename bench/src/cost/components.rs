//! The component micro-programs: what each step of the path costs alone
//! (a helper, a lookup, a rewrite), measured the way the cases are.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::HashMap,
    programs::{TestRun as _, TestRunOptions, Xdp},
    Ebpf,
};
use bgswitch_tests::{in_netns, ip_ns};
use serde_json::{json, Value};

use super::{
    xdp_ctx, Bed, PassProgram, CLIENT, FRAME_LEN, NEXT_HOP, TCP_PORT, VIP, XDP_PASS, XDP_REDIRECT,
};
use crate::{
    frames::{frame, L4},
    objects,
    stats::{median, Summary},
    sys,
};

/// Component costs: micro-programs (`xdp_parts`) doing one thing bgswitch's
/// fast path does, as it does it and as a proposal would, priced against
/// XDP_PASS with a large repeat (none of them changes the next run's input).
pub fn components(rounds: usize, repeat: u32, cpu: usize) -> Result<Value> {
    const PARTS: [(&str, &str); COMPONENTS] = [
        ("part_ktime", "bpf_ktime_get_ns()"),
        ("part_jiffies", "bpf_jiffies64() (tick resolution; inlined by the verifier)"),
        ("part_ktime_coarse", "bpf_ktime_get_coarse_ns() (tick resolution)"),
        ("part_hash20", "hash map lookup, 20-byte key, hit (like SERVICES)"),
        ("part_lru40", "LRU hash lookup, 40-byte key, hit (like FLOWS)"),
        ("part_lru16", "LRU hash lookup, 16-byte key, hit (an IPv4-only flow key)"),
        ("part_lru40_update", "LRU hash update of an existing 40-byte key (the first version's flow table)"),
        ("part_lru16_update", "LRU hash update of an existing 16-byte key, 48-byte value (a new flow writes one entry like it, of 80 bytes)"),
        ("part_lru16_update_pcpu", "the same with per-CPU LRU lists (BPF_F_NO_COMMON_LRU)"),
        ("part_fib_zeroed", "bpf_fib_lookup, parameters zeroed with core::mem::zeroed() (a call to the byte-loop memset) — as transmit.rs does"),
        ("part_fib_words", "bpf_fib_lookup, parameters zeroed with sixteen 4-byte stores"),
        ("part_fib_direct", "bpf_fib_lookup with BPF_FIB_LOOKUP_DIRECT, parameters zeroed with stores"),
        ("part_devmap_check_redirect", "DevMapHash lookup, then redirect through it — as transmit.rs does"),
        ("part_devmap_redirect", "DevMapHash redirect alone"),
        ("part_devmap_array_redirect", "DevMap (array) redirect alone"),
        ("part_redirect_ifindex", "bpf_redirect to an ifindex (the device is looked up after the program, outside this measure)"),
    ];
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<Value> {
        sys::pin_thread(cpu)?;
        let mut pass = PassProgram::load()?;
        let mut parts = Ebpf::load(objects::XDP_PARTS).context("loading xdp_parts")?;
        for (name, _) in PARTS {
            let p: &mut Xdp = parts
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("verifying {name}"))?;
        }
        let f = frame(
            SocketAddrV4::new(CLIENT, 40001),
            SocketAddrV4::new(VIP, TCP_PORT),
            L4::Ack,
            64,
            FRAME_LEN,
        );
        {
            let mut h: HashMap<_, [u8; 20], u32> =
                HashMap::try_from(parts.map_mut("HASH20").context("HASH20")?)?;
            h.insert(<[u8; 20]>::try_from(&f[14..34])?, 1, 0)?;
            let mut l: HashMap<_, [u8; 40], [u8; 40]> =
                HashMap::try_from(parts.map_mut("LRU40").context("LRU40")?)?;
            l.insert(<[u8; 40]>::try_from(&f[14..54])?, [1; 40], 0)?;
            let mut l: HashMap<_, [u8; 16], [u8; 40]> =
                HashMap::try_from(parts.map_mut("LRU16").context("LRU16")?)?;
            l.insert(<[u8; 16]>::try_from(&f[14..30])?, [1; 40], 0)?;
            for m in ["LRU16_48", "LRU16_48_PCPU"] {
                let mut l: HashMap<_, [u8; 16], [u8; 48]> =
                    HashMap::try_from(parts.map_mut(m).context("LRU16_48")?)?;
                l.insert(<[u8; 16]>::try_from(&f[14..30])?, [1; 48], 0)?;
            }
            let mut d: aya::maps::DevMapHash<_> =
                aya::maps::DevMapHash::try_from(parts.map_mut("PORTS").context("PORTS")?)?;
            d.insert(bed.v0 + 1, bed.v1, None, 0)?;
            let mut a: aya::maps::DevMap<_> =
                aya::maps::DevMap::try_from(parts.map_mut("PORT_ARRAY").context("PORT_ARRAY")?)?;
            a.set(1, bed.v1, None, 0)?;
        }
        // The FIB parts add the first byte of the MAC the lookup found to
        // their sink, and their return code (0 on success, 1-8 otherwise):
        // a first byte above 8 makes a successful lookup recognisable.
        ip_ns(
            bed.name(),
            &[
                "neigh",
                "replace",
                NEXT_HOP,
                "lladdr",
                "0a:00:00:00:01:02",
                "dev",
                "v1",
                "nud",
                "permanent",
            ],
        )?;
        let ctx = xdp_ctx(f.len(), bed.v0);
        let mut run_part = |name: &str| -> Result<f64> {
            let sink = |parts: &Ebpf| -> Result<u64> {
                let m: aya::maps::PerCpuArray<_, u64> =
                    aya::maps::PerCpuArray::try_from(parts.map("OUT").context("OUT")?)?;
                Ok(m.get(&0, 0)?.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
            };
            let before = sink(&parts)?;
            let p: &mut Xdp = parts.program_mut(name).context("program")?.try_into()?;
            let mut out = vec![0u8; f.len() + 256];
            let r = p.test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::new()
            })?;
            let added = sink(&parts)?.wrapping_sub(before);
            check_part(name, r.return_value, added, u64::from(repeat))?;
            ensure!(
                r.duration > Duration::ZERO,
                "{name}: the kernel timed {repeat} runs at zero"
            );
            Ok(r.duration.as_nanos() as f64)
        };
        let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut base = Vec::new();
        for round in 0..rounds {
            for k in 0..=PARTS.len() {
                let i = (k + round) % (PARTS.len() + 1);
                let mut v = Vec::new();
                for _ in 0..3 {
                    v.push(if i == PARTS.len() {
                        pass.run(&f, bed.v0, repeat)?.1.as_nanos() as f64
                    } else {
                        run_part(PARTS[i].0)?
                    });
                }
                if i == PARTS.len() {
                    base.push(median(&v));
                } else {
                    per.entry(PARTS[i].0).or_default().push(median(&v));
                }
            }
        }
        let rows: Vec<Value> = PARTS
            .iter()
            .map(|(name, label)| {
                let d: Vec<f64> = per[name].iter().zip(&base).map(|(a, b)| a - b).collect();
                json!({"part": name, "label": label, "over_baseline_ns": Summary::of(&d)})
            })
            .collect();
        ensure!(
            base.len() == rounds && base.iter().all(|b| b.is_finite() && *b > 0.0),
            "the XDP_PASS baseline was not timed in every round: {base:?}"
        );
        Ok(json!({
            "status": "measured",
            "checked": "every call of every part returned its verdict and did its work on every run (lookups hit, updates succeeded, FIB lookups found the neighbour, clocks read)",
            "method": format!("micro-programs in bench/ebpf/src/bin/xdp_parts.rs on the 64-byte established-ACK frame, ingress v0 of the part-1 namespace (routes and neighbours as there); repeat {repeat}, 3 calls per round, {rounds} interleaved rounds; median (min–max) over rounds of the difference to XDP_PASS"),
            "baseline_ns": Summary::of(&base),
            "components": rows,
        }))
    })??;
    drop(bed);
    Ok(r)
}

/// The number of component micro-programs [`components`] prices.
pub const COMPONENTS: usize = 16;

/// What one call of a component micro-program must show, `repeat` runs:
/// its verdict (the redirects redirect, the rest pass) and what it added to
/// its sink map `OUT` — every lookup a hit (the value stored for its key on
/// every run; LRU40's value is 1, or 2 once `part_lru40_update` wrote it),
/// every update a success (nothing added), every FIB lookup a success with
/// the neighbour's MAC (first byte 0x0a, so 10 per run), every clock read
/// non-zero. A part that measured something else (a miss, a failed lookup, a
/// redirect that fell back to XDP_PASS) fails here instead of being priced.
fn check_part(name: &str, verdict: u32, added: u64, repeat: u64) -> Result<()> {
    let redirects = name.contains("redirect");
    let want_verdict = if redirects { XDP_REDIRECT } else { XDP_PASS };
    ensure!(
        verdict == want_verdict,
        "{name} returned {verdict}, want {want_verdict}"
    );
    let ok = match name {
        "part_ktime" | "part_jiffies" | "part_ktime_coarse" => added != 0,
        "part_hash20" | "part_lru16" => added == repeat,
        "part_lru40" => added == repeat || added == 2 * repeat,
        "part_lru40_update" | "part_lru16_update" | "part_lru16_update_pcpu" => added == 0,
        "part_fib_zeroed" | "part_fib_words" | "part_fib_direct" => added == 10 * repeat,
        _ if redirects => added == 0,
        _ => bail!("{name}: no check for this component"),
    };
    ensure!(
        ok,
        "{name} did not do its work on every one of {repeat} runs (added {added} to its sink)"
    );
    Ok(())
}

/// Quick mode: every component was measured in every round, with finite
/// figures (what [`components`] checked of each call is in its `checked`).
pub fn assert_components(section: &Value, rounds: usize) -> Result<()> {
    ensure!(
        section["status"] == "measured",
        "components: {}",
        section["status"]
    );
    let rows = section["components"]
        .as_array()
        .context("no component rows")?;
    ensure!(
        rows.len() == COMPONENTS,
        "{} component rows, want {COMPONENTS}",
        rows.len()
    );
    let finite = |v: &Value| v.as_f64().is_some_and(f64::is_finite);
    for r in rows {
        let d = &r["over_baseline_ns"];
        ensure!(
            d["n"].as_u64() == Some(rounds as u64)
                && finite(&d["median"])
                && finite(&d["min"])
                && finite(&d["max"]),
            "component not measured in each of {rounds} rounds: {r}"
        );
    }
    let b = &section["baseline_ns"];
    ensure!(
        b["n"].as_u64() == Some(rounds as u64) && b["min"].as_f64().is_some_and(|m| m > 0.0),
        "baseline not measured in each of {rounds} rounds: {b}"
    );
    Ok(())
}
