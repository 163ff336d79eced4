//! "A SYN flood against draining connections": established connections
//! recorded, then spoofed SYNs at the generator's full rate; who kept
//! their backend.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use bgswitch::{dataplane::Dataplane, model::Colour};
use bgswitch_bench_ebpf::GenConfig;
use bgswitch_common::PROTO_TCP;
use bgswitch_tests::{in_netns, netns::ifindex};
use serde_json::{json, Value};

use super::rig::generate;
use super::{
    Config, Rig, ESTABLISHED_BASE, FLOOD_ID, FLOOD_PORT, FLOOD_SRC_BASE, FRAME_LEN, SINK_ADDR,
    SRC_PORT_BASE, VIP,
};
use crate::frames::{frame, verify, L4};

impl Rig {
    /// A spoofed SYN flood at the generator's full rate against a table
    /// service while `established` connections drain on blue after a flip:
    /// the flood's rate, and whether every established connection kept its
    /// record (its next packet still goes to blue's backend).
    pub(super) fn syn_flood(&mut self, established: u32, frames: u32, cpu: usize) -> Result<Value> {
        let table = self.opts.max_flows;
        let batch = self.opts.batch;
        self.set(Config::Bgswitch(1))?;
        ensure!(
            self.attached == table,
            "the default data plane is not attached"
        );
        let lb = self.lb_name();
        let (l0, l1) = (ifindex(&lb, "l0")?, ifindex(&lb, "l1")?);
        let vip = SocketAddrV4::new(VIP, FLOOD_PORT);
        let blue = SocketAddrV4::new(SINK_ADDR, FLOOD_PORT);
        let client = |i: u32| {
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from(ESTABLISHED_BASE) + (i >> 8)),
                40000 + (i & 0xff) as u16,
            )
        };
        let dp = self.dps.get_mut(&table).context("no data plane")?;
        dp.set_active(FLOOD_ID, Colour::Blue)?;
        let g = |dp: &Dataplane, n: &str| dp.global_stat(n).ok().flatten().unwrap_or(0);
        // Whole handshakes through the program: SYN, the backend's SYN-ACK,
        // the client's ACK.
        let promoted0 = g(dp, "promoted");
        in_netns(&lb, || -> Result<()> {
            for i in 0..established {
                let c = client(i);
                dp.test_run(&frame(c, vip, L4::Syn, 64, FRAME_LEN), Some(l0), 1)?;
                dp.test_run(&frame(blue, c, L4::SynAck, 64, FRAME_LEN), Some(l1), 1)?;
                dp.test_run(&frame(c, vip, L4::Ack, 64, FRAME_LEN), Some(l0), 1)?;
            }
            Ok(())
        })??;
        let promoted = g(dp, "promoted") - promoted0;
        ensure!(
            promoted == u64::from(established),
            "{promoted} of {established} handshakes completed before the flood"
        );
        dp.set_active(FLOOD_ID, Colour::Green)?;
        let (half0, missing0) = (g(dp, "half_open"), g(dp, "record_missing"));
        // Every frame a SYN of a new 5-tuple (2^21 of them, eight times the
        // flow table), to the flipped service.
        let flows = 1u32 << 21;
        self.set_gen(GenConfig {
            dst_mac: self.l0_mac,
            src_mac: self.g0_mac,
            src_ip: FLOOD_SRC_BASE.octets(),
            dst_ip: VIP.octets(),
            dst_port: FLOOD_PORT.to_be_bytes(),
            src_port_base: SRC_PORT_BASE,
            flows,
            proto: PROTO_TCP,
            tag: 0,
            syn: 1,
            spread: 0,
            src_ip6: [0; 16],
            dst_ip6: [0; 16],
        })?;
        self.gen_prog = "xdp_gen";
        let delivered0 = self.delivered()?;
        let gen_ns = self.gen.name().to_string();
        let (sent, wall) = generate(
            &mut self.genp,
            "xdp_gen",
            &gen_ns,
            self.g0,
            frames,
            frames,
            batch,
            cpu,
        )?;
        std::thread::sleep(Duration::from_millis(20));
        let delivered = self.delivered()? - delivered0;
        let dp = self.dps.get_mut(&table).context("no data plane")?;
        let half = g(dp, "half_open") - half0;
        // Each established connection's next packet, after the flood.
        let hits0 = g(dp, "flow_hits");
        let mut on_blue = 0u32;
        in_netns(&lb, || -> Result<()> {
            for i in 0..established {
                let c = client(i);
                let (_, out, _) =
                    dp.test_run(&frame(c, vip, L4::Ack, 64, FRAME_LEN), Some(l0), 1)?;
                if verify(&out).is_some_and(|(_, to, _)| to == blue) {
                    on_blue += 1;
                }
            }
            Ok(())
        })??;
        let hits = g(dp, "flow_hits") - hits0;
        let missing = g(dp, "record_missing") - missing0;
        dp.set_active(FLOOD_ID, Colour::Blue)?;
        Ok(json!({
            "method": format!("{established} connections opened through the program (SYN, the backend's SYN-ACK, the client's ACK: BPF_PROG_TEST_RUN on l0/l1) on blue; the service flipped to green; then the generator sends {frames} TCP SYNs (64 B, batch {batch}, CPU {cpu}) at its full rate, every one a new 5-tuple from spoofed sources in 198.19.64.0/26 ({flows} tuples: {}x the flow table of {table}, {}x its half-open table); afterwards each established connection's next ACK is run through the program", flows / table.max(1), flows / bgswitch::dataplane::half_open_slots(table).max(1)),
            "flow_table": table,
            "half_open_table": bgswitch::dataplane::half_open_slots(table),
            "established": established,
            "flood_frames": sent,
            "flood_delivered": delivered,
            "flood_mpps": delivered as f64 / wall.as_secs_f64() / 1e6,
            "flood_half_open_records": half,
            "established_still_on_blue": on_blue,
            "established_flow_hits": hits,
            "record_missing": missing,
        }))
    }
}
