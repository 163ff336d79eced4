//! "The data plane follows the store": a flip in the middle of a stream of
//! new flows, and where the first frame of the new colour falls.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{ensure, Context as _, Result};
use aya::maps::{Array, PerCpuArray, PerCpuValues};
use bgswitch::model::Colour;
use bgswitch_bench_ebpf::{GenConfig, SEQ_NEW_COUNT, SEQ_NEW_MIN, SEQ_OLD_COUNT, SEQ_OLD_MAX};
use bgswitch_common::PROTO_UDP;
use serde_json::{json, Value};

use super::rig::generate;
use super::{
    Config, Rig, FOLLOW_ID, FOLLOW_PORT, SINK_ADDR, SINK_ADDR2, SRC_BASE, SRC_PORT_BASE, VIP,
};
use crate::{stats::Summary, sys};

impl Rig {
    /// How the data plane follows a flip: `trials` times, a run of `frames`
    /// new UDP flows (one per frame, each tagged with its sequence number)
    /// to the follow service, flipped blue → green at a random moment by
    /// one `Dataplane::set_active` (the 32-bit store) from another thread.
    /// `xdp_sink_seq` on s0 records the last sequence number that reached
    /// blue and the first that reached green.
    pub(super) fn follow(&mut self, trials: usize, frames: u32, cpu: usize) -> Result<Value> {
        let table = self.opts.max_flows;
        let batch = self.opts.batch;
        self.set(Config::Bgswitch(1))?;
        ensure!(
            self.attached == table,
            "the default data plane is not attached"
        );
        self.seq_sink(true)?;
        let addr = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        {
            let mut c: Array<_, [u32; 2]> =
                Array::try_from(self.sinkp.map_mut("SEQ_CONFIG").context("no SEQ_CONFIG")?)?;
            c.set(0, [addr(SINK_ADDR), addr(SINK_ADDR2)], 0)?;
        }
        // Every frame a flow of its own: its colour is the control word's
        // when it is processed. The cursor runs on across trials, so no
        // frame meets a record of an earlier trial.
        self.set_gen(GenConfig {
            dst_mac: self.l0_mac,
            src_mac: self.g0_mac,
            src_ip: SRC_BASE.octets(),
            dst_ip: VIP.octets(),
            dst_port: FOLLOW_PORT.to_be_bytes(),
            src_port_base: SRC_PORT_BASE,
            flows: u32::MAX,
            proto: PROTO_UDP,
            tag: 1,
            syn: 0,
            spread: 0,
            src_ip6: [0; 16],
            dst_ip6: [0; 16],
        })?;
        self.gen_prog = "xdp_gen";
        let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
        let mut rows = Vec::new();
        // A trial counts only if the store fell within the frames the sink
        // got (some reached each colour); one where the generator's frames
        // were mostly dropped on the way (a stalled softirq: this VM), or
        // ended before the store, is run again, at most `trials` times in
        // all, and counted.
        let mut void = 0usize;
        while rows.len() < trials && void < trials {
            let dp = self.dps.get_mut(&table).context("no data plane")?;
            dp.set_active(FOLLOW_ID, Colour::Blue)?;
            std::thread::sleep(Duration::from_millis(20));
            {
                let mut seq: PerCpuArray<_, [u32; 4]> =
                    PerCpuArray::try_from(self.sinkp.map_mut("SEQ").context("no SEQ")?)?;
                let n = seq.get(&0, 0)?.len();
                seq.set(0, PerCpuValues::try_from(vec![[0, u32::MAX, 0, 0]; n])?, 0)?;
            }
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let delay = Duration::from_micros(10_000 + (seed >> 33) % 30_000);
            let gen_ns = self.gen.name().to_string();
            let (genp, g0, gen_state) = (&mut self.genp, self.g0, &self.gen_state);
            // The flip from a thread on another CPU than the generator's.
            let other = if cpu == 0 { 1 } else { 0 };
            let (before, run) = std::thread::scope(|sc| -> Result<_> {
                let g = sc.spawn(move || {
                    generate(genp, "xdp_gen", &gen_ns, g0, frames, frames, batch, cpu)
                });
                let f = sc.spawn(move || -> Result<u32> {
                    sys::pin_thread(other)?;
                    std::thread::sleep(delay);
                    // Frames generated so far, read just before the store.
                    let before = gen_state.get(&1, 0)?[cpu];
                    dp.set_active(FOLLOW_ID, Colour::Green)?;
                    Ok(before)
                });
                let panicked = |_| anyhow::anyhow!("a follow thread panicked");
                let run = g.join().map_err(panicked)??;
                let before = f.join().map_err(panicked)??;
                Ok((before, run))
            })?;
            std::thread::sleep(Duration::from_millis(20));
            let seq: PerCpuArray<_, [u32; 4]> =
                PerCpuArray::try_from(self.sinkp.map("SEQ").context("no SEQ")?)?;
            let v = seq.get(&0, 0)?;
            let old_max = v.iter().map(|x| x[SEQ_OLD_MAX as usize]).max().unwrap_or(0);
            let new_min = v
                .iter()
                .map(|x| x[SEQ_NEW_MIN as usize])
                .min()
                .unwrap_or(u32::MAX);
            let old: u64 = v.iter().map(|x| u64::from(x[SEQ_OLD_COUNT as usize])).sum();
            let new: u64 = v.iter().map(|x| u64::from(x[SEQ_NEW_COUNT as usize])).sum();
            if old == 0 || new == 0 {
                void += 1;
                continue;
            }
            rows.push(json!({
                "frames": run.0,
                "wall_s": run.1.as_secs_f64(),
                "flip_after_ms": delay.as_secs_f64() * 1e3,
                "generated_before_store": before,
                "last_on_old": old_max,
                "first_on_new": new_min,
                "on_old": old,
                "on_new": new,
                // No frame reached the old colour after one reached the new.
                "clean_cut": old > 0 && new > 0 && old_max < new_min,
                // Frames generated after the reading before the store and
                // before the first frame the new colour got (≤ 0: frames
                // already queued when the word changed took the new colour).
                "lag_frames": i64::from(new_min) - i64::from(before),
            }));
        }
        self.seq_sink(false)?;
        let lags: Vec<f64> = rows
            .iter()
            .filter_map(|r| r["lag_frames"].as_i64())
            .map(|v| v as f64)
            .collect();
        Ok(json!({
            "method": format!("{trials} trials; in each, the generator sends {frames} UDP frames (batch {batch}) on CPU {cpu}, every frame a new flow to VIP:{FOLLOW_PORT} tagged with its sequence number; another thread reads the generator's frame count, then flips the service blue → green with one Dataplane::set_active (the control word's 32-bit store) 10–40 ms into the run; xdp_sink_seq on s0 records the last sequence number to blue's backend and the first to green's; a trial in which no frame reached one of the colours (the store after the frames the sink got, or most frames dropped on the way) does not count and is run again ({void} such)"),
            "batch": batch,
            "trials": rows,
            "void_trials": void,
            "all_clean": rows.len() == trials && rows.iter().all(|r| r["clean_cut"] == true),
            "lag_frames": Summary::of(&lags),
        }))
    }
}
