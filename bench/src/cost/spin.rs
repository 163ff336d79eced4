//! `--spin`: one program-cost case in a loop, for profiling and A/B.

use std::{
    net::{SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use bgswitch_tests::in_netns;

use super::{
    client, keep_in_dispatcher, load_identity, Bed, PassProgram, CLIENT, CLIENT6, FRAME_LEN,
    STATELESS_PORT, TCP_PORT, VIP, VIP6,
};
use crate::{
    frames::{frame, frame6, L4},
    sys,
};

/// Runs one case in a loop for `seconds` on the bench CPU (to profile it with
/// `perf record -C <cpu>`). Returns runs and mean ns per run.
pub fn spin(case: &str, seconds: f64, cpu: usize, max_flows: u32) -> Result<(u64, f64)> {
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<(u64, f64)> {
        sys::pin_thread(cpu)?;
        let mut pass = PassProgram::load()?;
        let mut l = load_identity(&bed, max_flows)?;
        let dp = &mut l.dp;
        keep_in_dispatcher(dp, &mut pass)?;
        let vip80 = SocketAddrV4::new(VIP, TCP_PORT);
        let c = SocketAddrV4::new(CLIENT, 40001);
        dp.test_run(&frame(c, vip80, L4::Syn, 255, FRAME_LEN), Some(bed.v0), 1)?;
        let vip6 = SocketAddrV6::new(VIP6, TCP_PORT, 0, 0);
        let c6 = SocketAddrV6::new(CLIENT6, 40001, 0, 0);
        dp.test_run(&frame6(c6, vip6, L4::Syn, 255, FRAME_LEN), Some(bed.v0), 1)?;
        let (f, ingress) = match case {
            "established6" | "pass6" => (frame6(c6, vip6, L4::Ack, 255, FRAME_LEN), bed.v0),
            "reply6" => (frame6(vip6, c6, L4::Ack, 255, FRAME_LEN), bed.v1),
            "established" | "pass" => (frame(c, vip80, L4::Ack, 255, FRAME_LEN), bed.v0),
            "reply" => (frame(vip80, c, L4::Ack, 255, FRAME_LEN), bed.v1),
            "nonvip" => (
                frame(c, "198.18.1.99:80".parse()?, L4::Ack, 255, FRAME_LEN),
                bed.v0,
            ),
            "syn" | "newflow" => (frame(c, vip80, L4::Syn, 255, FRAME_LEN), bed.v0),
            "stateless" => (
                frame(
                    c,
                    SocketAddrV4::new(VIP, STATELESS_PORT),
                    L4::Ack,
                    255,
                    FRAME_LEN,
                ),
                bed.v0,
            ),
            other => bail!("unknown case {other}"),
        };
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        let (mut runs, mut total) = (0u64, 0f64);
        let mut fresh = 0u32;
        while Instant::now() < end {
            if case == "newflow" {
                // A fresh 5-tuple per call, run once: part 1's cold new flow.
                fresh += 1;
                let f = frame(client(0, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                total += dp.test_run(&f, Some(ingress), 1)?.2.as_nanos() as f64;
                runs += 1;
                continue;
            }
            let d = if case == "pass" || case == "pass6" {
                pass.run(&f, ingress, 200)?.1
            } else {
                dp.test_run(&f, Some(ingress), 200)?.2
            };
            runs += 200;
            total += d.as_nanos() as f64 * 200.0;
        }
        Ok((runs, total / runs.max(1) as f64))
    })??;
    drop(bed);
    Ok(r)
}
