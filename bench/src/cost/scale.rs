//! Part 5's program half: memory per flow and what a packet costs as the
//! flow table fills.

use std::{net::SocketAddrV4, time::Instant};

use anyhow::{ensure, Context as _, Result};
use bgswitch::{dataplane::Dataplane, model::Colour};
use bgswitch_common::{FlowEntry, FlowEntry6, FlowKey, FlowKey4};
use bgswitch_tests::in_netns;
use serde_json::{json, Value};

use super::{
    client, count_entries, count_half4, global, keep_in_dispatcher, load_identity, Bed,
    CostOptions, PassProgram, FRAME_LEN, STATELESS_PORT, TCP_PORT, VIP, XDP_REDIRECT,
};
use crate::{
    frames::{frame, L4},
    stats::{interquartile_mean, median, Summary},
    sys,
};

/// Part 5, program-cost and memory half: the cost of an established packet
/// (hot: one flow repeated; spread: a random recorded flow per call) and of a
/// new flow as the table fills from 1 flow to its maximum; kernel memory per
/// flow from the kernel's own accounting of the FLOWS map.
pub fn scale(opts: &CostOptions) -> Result<Value> {
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<Value> {
        sys::pin_thread(opts.cpu)?;
        let mut pass = PassProgram::load()?;
        // Memory: two table sizes, to separate per-flow from fixed cost.
        let small_flows = 65_536u32.min(opts.scale_max_flows / 2).max(1024);
        let small = load_identity(&bed, small_flows)?;
        let small_memlock = small.flows_memlock;
        let small_memlock6 = small.flows6_memlock;
        drop(small);
        let avail_before = sys::meminfo("MemAvailable");
        let mut l = load_identity(&bed, opts.scale_max_flows)?;
        let avail_after = sys::meminfo("MemAvailable");
        let big_memlock = l.flows_memlock;
        let big_memlock6 = l.flows6_memlock;
        let dp = &mut l.dp;
        keep_in_dispatcher(dp, &mut pass)?;
        let v0 = bed.v0;
        let vip80 = SocketAddrV4::new(VIP, TCP_PORT);
        let vip81 = SocketAddrV4::new(VIP, STATELESS_PORT);
        let key_value = std::mem::size_of::<FlowKey4>() + std::mem::size_of::<FlowEntry>();
        let key_value6 = std::mem::size_of::<FlowKey>() + std::mem::size_of::<FlowEntry6>();

        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut filled = 0u32;
        let mut fresh = 0u32;
        let mut levels = Vec::new();
        let fill_started = Instant::now();
        // Every packet of the scale run is to the TCP service (blue, one
        // backend): each is redirected, and each either follows a record
        // (flow_hits) or makes one (new_flows); records leave the table only
        // by eviction.
        let recorded =
            |dp: &Dataplane| -> Result<u64> { Ok(dp.colour_stats(0, Colour::Blue)?.new_flows) };
        let (flows_id, half_id) = (l.flows_id, l.half_open_id);
        // Records in either table: the timed new flows' SYNs stay half open.
        let entries = || -> Result<u64> {
            Ok(
                count_entries(flows_id.context("the FLOWS map was not found by id")?)?
                    + count_half4(half_id.context("the HALF_OPEN map was not found by id")?)?,
            )
        };
        let mut not_redirected = 0u64;
        for &level in &opts.fill_levels {
            let level = level.min(opts.scale_max_flows);
            let (fill_from, rec0) = (filled, recorded(dp)?);
            // Each flow's whole handshake: the SYN (half-open), the
            // backend's SYN-ACK, the client's ACK (into FLOWS).
            while filled < level {
                let c = client(1, filled);
                let f = frame(c, vip80, L4::Syn, 255, FRAME_LEN);
                if dp.test_run(&f, Some(v0), 1)?.0 != XDP_REDIRECT {
                    not_redirected += 1;
                }
                // A reply, not a packet to the VIP: it completes the
                // half-open record whatever its next hop.
                let sa = frame(vip80, c, L4::SynAck, 255, FRAME_LEN);
                dp.test_run(&sa, Some(v0), 1)?;
                let ack = frame(c, vip80, L4::Ack, 255, FRAME_LEN);
                if dp.test_run(&ack, Some(v0), 1)?.0 != XDP_REDIRECT {
                    not_redirected += 1;
                }
                filled += 1;
            }
            let fill_recorded = recorded(dp)? - rec0;
            let entries_after_fill = entries()?;
            let hot = frame(client(1, 0), vip80, L4::Ack, 255, FRAME_LEN);
            let mut r_pass = Vec::new();
            let mut r_hot = Vec::new();
            let mut r_pass1 = Vec::new();
            let mut r_spread = Vec::new();
            let mut r_new = Vec::new();
            // Hits and records of each kind of call, read between the
            // timed loops (never inside one).
            let mut spread_calls = 0u64;
            let (mut hot_runs, mut hot_hits, mut hot_recorded) = (0u64, 0u64, 0u64);
            let (mut spread_hits, mut spread_recorded) = (0u64, 0u64);
            let (mut new_syns, mut new_recorded) = (0u64, 0u64);
            let counts = |dp: &Dataplane| -> Result<(u64, u64)> {
                Ok((global(dp, "flow_hits"), recorded(dp)?))
            };
            for _ in 0..opts.scale_rounds {
                let mut a = Vec::new();
                let mut b = Vec::new();
                let c0 = counts(dp)?;
                for _ in 0..opts.calls {
                    a.push(pass.run(&hot, v0, opts.repeat)?.1.as_nanos() as f64);
                    let (act, _, d) = dp.test_run(&hot, Some(v0), opts.repeat)?;
                    not_redirected += u64::from(act != XDP_REDIRECT);
                    b.push(d.as_nanos() as f64);
                    hot_runs += u64::from(opts.repeat);
                }
                let c1 = counts(dp)?;
                r_pass.push(median(&a));
                r_hot.push(median(&b));
                let mut p1 = Vec::new();
                let mut s1 = Vec::new();
                let mut n1 = Vec::new();
                for _ in 0..opts.scale_single_calls {
                    let i = (next() % u64::from(filled)) as u32;
                    let f = frame(client(1, i), vip80, L4::Ack, 255, FRAME_LEN);
                    p1.push(pass.run(&f, v0, 1)?.1.as_nanos() as f64);
                    let (act, _, d) = dp.test_run(&f, Some(v0), 1)?;
                    not_redirected += u64::from(act != XDP_REDIRECT);
                    s1.push(d.as_nanos() as f64);
                    spread_calls += 1;
                }
                let c2 = counts(dp)?;
                for _ in 0..opts.scale_single_calls / 4 {
                    fresh += 1;
                    let f = frame(client(2, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                    let (act, _, d) = dp.test_run(&f, Some(v0), 1)?;
                    not_redirected += u64::from(act != XDP_REDIRECT);
                    n1.push(d.as_nanos() as f64);
                    new_syns += 1;
                }
                let c3 = counts(dp)?;
                hot_hits += c1.0 - c0.0;
                hot_recorded += c1.1 - c0.1;
                spread_hits += c2.0 - c1.0;
                spread_recorded += c2.1 - c1.1;
                new_recorded += c3.1 - c2.1;
                r_pass1.push(interquartile_mean(&p1));
                r_spread.push(interquartile_mean(&s1));
                r_new.push(interquartile_mean(&n1));
            }
            let spread_hit_ratio = spread_hits as f64 / spread_calls.max(1) as f64;
            let recorded_total = recorded(dp)?;
            let entries_now = entries()?;
            let diff = |x: &[f64], y: &[f64]| -> Vec<f64> {
                x.iter().zip(y).map(|(a, b)| a - b).collect()
            };
            levels.push(json!({
                "flows": level,
                "established_hot_ns": Summary::of(&diff(&r_hot, &r_pass)),
                "established_spread_ns": Summary::of(&diff(&r_spread, &r_pass1)),
                "new_flow_ns": Summary::of(&diff(&r_new, &r_pass1)),
                "spread_hit_ratio": spread_hit_ratio,
                "check": {
                    "filled_from": fill_from,
                    "fill_syns": level - fill_from,
                    "fill_recorded": fill_recorded,
                    "entries_after_fill": entries_after_fill,
                    "hot_runs": hot_runs,
                    "hot_hits": hot_hits,
                    "hot_recorded": hot_recorded,
                    "spread_calls": spread_calls,
                    "spread_hits": spread_hits,
                    "spread_recorded": spread_recorded,
                    "new_flow_syns": new_syns,
                    "new_flow_recorded": new_recorded,
                    "recorded_total": recorded_total,
                    "entries": entries_now,
                    "evicted": recorded_total.saturating_sub(entries_now),
                    "not_redirected_total": not_redirected,
                },
            }));
            eprintln!(
                "bench: scale: {level} flows measured ({:.0} s since start)",
                fill_started.elapsed().as_secs_f64()
            );
        }
        // The stateless service records nothing: its cost can only depend on
        // how many clients there are, so it is measured once the table is
        // full, with a random client among as many as each level's flows,
        // every level in every round (interleaved, so the machine's slow
        // phases, which last minutes, touch every level alike).
        let sizes: Vec<u32> = opts
            .fill_levels
            .iter()
            .map(|&n| n.clamp(1, opts.scale_max_flows))
            .collect();
        let mut r_sl: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
        for _ in 0..opts.scale_rounds {
            for (k, &clients) in sizes.iter().enumerate() {
                let mut p1 = Vec::new();
                let mut sl1 = Vec::new();
                for _ in 0..opts.scale_single_calls {
                    let i = (next() % u64::from(clients)) as u32;
                    let f = frame(client(1, i), vip81, L4::Ack, 255, FRAME_LEN);
                    p1.push(pass.run(&f, v0, 1)?.1.as_nanos() as f64);
                    sl1.push(dp.test_run(&f, Some(v0), 1)?.2.as_nanos() as f64);
                }
                // Single runs (repeat 1) come in clock steps: the middle
                // half's mean.
                r_sl[k].push(interquartile_mean(&sl1) - interquartile_mean(&p1));
            }
        }
        for (level, sl) in levels.iter_mut().zip(&r_sl) {
            level["stateless_spread_ns"] = json!(Summary::of(sl));
        }
        let entries = l.flows_id.map(count_entries).transpose()?;
        let slope = |small: Option<u64>, big: Option<u64>| match (small, big) {
            (Some(s), Some(b)) if opts.scale_max_flows > small_flows && b >= s => {
                Some((b - s) as f64 / f64::from(opts.scale_max_flows - small_flows))
            }
            _ => None,
        };
        let per_flow_slope = slope(small_memlock, big_memlock);
        let per_flow_slope6 = slope(small_memlock6, big_memlock6);
        let meminfo_delta = match (avail_before, avail_after) {
            (Some(b), Some(a)) if b > a => Some((b - a) as f64 / f64::from(opts.scale_max_flows)),
            _ => None,
        };
        Ok(json!({
            "status": "measured",
            "method": "one data plane with FLOWS sized for scale_max_flows; filled with SYNs of distinct 5-tuples through BPF_PROG_TEST_RUN; at each level: hot = one recorded flow, repeat N, minus xdp_pass repeat N; spread = a random recorded flow per call, repeat 1, minus xdp_pass repeat 1 (cache-cold lookups); stateless spread = measured after the fill (the table full): a random client among as many as the level's flows to the stateless service (nothing recorded), repeat 1, minus xdp_pass repeat 1 with the same frame, every level in every round; new = a fresh 5-tuple per call (evicts when full); per round, the repeat-1 figures are the mean of the middle half of the calls (single runs are timed in steps of about 10 ns here); median (min–max) over rounds",
            "scale_max_flows": opts.scale_max_flows,
            "levels": levels,
            "flow_entries_after_fill": entries,
            "flows_recorded_after_fill": entries,
            "memory": {
                "flow_key_plus_entry_bytes": key_value,
                "entries_per_flow": 1,
                "flows_map_memlock_bytes": big_memlock,
                "flows_map_memlock_bytes_small": small_memlock,
                "small_max_flows": small_flows,
                "bytes_per_flow_memlock": big_memlock.map(|b| b as f64 / f64::from(opts.scale_max_flows)),
                "bytes_per_flow_slope": per_flow_slope,
                "bytes_per_flow_memavailable_delta": meminfo_delta,
                // FLOWS6, the IPv6 flows' table, sized alike (the same
                // max_flows) in the same two data planes.
                "ipv6": {
                    "flow_key_plus_entry_bytes": key_value6,
                    "flows_map_memlock_bytes": big_memlock6,
                    "flows_map_memlock_bytes_small": small_memlock6,
                    "bytes_per_flow_memlock": big_memlock6.map(|b| b as f64 / f64::from(opts.scale_max_flows)),
                    "bytes_per_flow_slope": per_flow_slope6,
                    "computed_bytes_per_flow": bgswitch::dataplane::FLOW_BYTES_V6,
                },
                "computed_bytes_per_flow": bgswitch::dataplane::FLOW_BYTES_V4,
            },
            "elapsed_s": fill_started.elapsed().as_secs_f64(),
        }))
    })??;
    drop(bed);
    Ok(r)
}

/// Quick mode: the scale part filled the table it reports on and measured
/// what it says. The kernel charged more for the large table than for the
/// small one, and at least key + value per flow; every packet was redirected;
/// each level's fill made one record per SYN and the table held them all
/// (beyond half its size an LRU map may evict: there, three quarters);
/// every timed call either followed its record or, its record evicted, made
/// a new one, so the spread's hit ratio is 1 where nothing was evicted and
/// its misses never outnumber the evictions.
pub fn assert_scale(section: &Value, opts: &CostOptions) -> Result<()> {
    ensure!(
        section["status"] == "measured",
        "scale: {}",
        section["status"]
    );
    let u = |v: &Value, k: &str| v[k].as_u64().with_context(|| format!("no {k} in {v}"));
    let mem = &section["memory"];
    let (big, small) = (
        u(mem, "flows_map_memlock_bytes")?,
        u(mem, "flows_map_memlock_bytes_small")?,
    );
    ensure!(
        small > 0 && big > small,
        "FLOWS memory not growing with its size: {big} B for {} flows, {small} B for {}",
        opts.scale_max_flows,
        mem["small_max_flows"]
    );
    let slope = mem["bytes_per_flow_slope"].as_f64().unwrap_or(0.0);
    let kv = u(mem, "flow_key_plus_entry_bytes")? as f64;
    ensure!(
        slope >= kv,
        "{slope} B per flow is less than a key and an entry ({kv} B): {mem}"
    );
    let levels = section["levels"].as_array().context("no levels")?;
    ensure!(
        levels.len() == opts.fill_levels.len(),
        "{} levels measured, want {}",
        levels.len(),
        opts.fill_levels.len()
    );
    let max = u64::from(opts.scale_max_flows);
    let mut entries_before = 0;
    for (l, &want) in levels.iter().zip(&opts.fill_levels) {
        let c = &l["check"];
        let flows = u(l, "flows")?;
        ensure!(
            flows == u64::from(want.min(opts.scale_max_flows)),
            "level {l}: want {want} flows"
        );
        ensure!(
            u(c, "not_redirected_total")? == 0,
            "scale: packets to the VIP not redirected: {c}"
        );
        ensure!(
            u(c, "fill_recorded")? == u(c, "fill_syns")?,
            "level {flows}: the fill's SYNs did not each make a record: {c}"
        );
        let held = u(c, "entries_after_fill")?;
        let need = if flows <= max / 2 {
            flows
        } else {
            flows * 3 / 4
        };
        ensure!(
            held >= need && held > entries_before,
            "level {flows}: the table holds {held} flows after the fill (want at least {need}, and more than the level before's {entries_before}): {c}"
        );
        entries_before = held;
        let evicted = u(c, "evicted")?;
        if u(c, "recorded_total")? <= max / 2 {
            ensure!(
                evicted == 0,
                "level {flows}: a half-empty table evicted {evicted} flows: {c}"
            );
        }
        let (calls, hits, made) = (
            u(c, "spread_calls")?,
            u(c, "spread_hits")?,
            u(c, "spread_recorded")?,
        );
        ensure!(calls > 0, "level {flows}: no spread calls: {c}");
        ensure!(
            hits + made == calls
                && u(c, "hot_hits")? + u(c, "hot_recorded")? == u(c, "hot_runs")?
                && u(c, "new_flow_recorded")? == u(c, "new_flow_syns")?,
            "level {flows}: a packet neither followed a record nor made one: {c}"
        );
        ensure!(
            made + u(c, "hot_recorded")? <= evicted,
            "level {flows}: {made} spread calls missed recorded flows, {evicted} flows were evicted: {c}"
        );
        let ratio = l["spread_hit_ratio"].as_f64().unwrap_or(-1.0);
        ensure!(
            ratio == hits as f64 / calls as f64 && (evicted > 0 || ratio == 1.0),
            "level {flows}: spread hit ratio {ratio} with {evicted} flows evicted: {c}"
        );
    }
    Ok(())
}
