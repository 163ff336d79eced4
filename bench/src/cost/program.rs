//! Part 1 proper: every case against the XDP_PASS baseline, in rounds,
//! and the checks the quick mode asserts.

use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use bgswitch::{dataplane::Dataplane, model::Colour};
use bgswitch_tests::in_netns;
use serde_json::{json, Value};

use super::{
    check, client, client6, count_entries, count_entries6, count_half4, count_half6, global,
    keep_in_dispatcher, load_identity, Bed, Case, CostOptions, PassProgram, CLIENT, CLIENT6,
    FRAME_LEN, STATELESS_PORT, TCP6_ID, TCP_PORT, TC_ACT_REDIRECT, TC_ACT_UNSPEC, UDP6_ID,
    UDP_PORT, VIP, VIP6, XDP_PASS, XDP_REDIRECT,
};
use crate::{
    frames::{frame, frame6, verify, verify6, L4},
    stats::{interquartile_mean, median, Summary},
    sys,
};

/// Runs part 1. Returns its JSON section.
pub fn program_cost(opts: &CostOptions) -> Result<Value> {
    let bed = Bed::create()?;
    let ns = bed.name().to_string();
    let r = in_netns(&ns, || -> Result<Value> {
        sys::pin_thread(opts.cpu)?;
        let mut pass = PassProgram::load()?;
        let mut l = load_identity(&bed, opts.max_flows)?;
        let dp = &mut l.dp;
        keep_in_dispatcher(dp, &mut pass)?;
        let (v0, v1) = (bed.v0, bed.v1);
        let vip80 = SocketAddrV4::new(VIP, TCP_PORT);
        let vip53 = SocketAddrV4::new(VIP, UDP_PORT);
        let est_client = SocketAddrV4::new(CLIENT, 40001);
        let syn_client = SocketAddrV4::new(CLIENT, 40000);
        let udp_client = SocketAddrV4::new(CLIENT, 40002);
        let syn = frame(syn_client, vip80, L4::Syn, 255, FRAME_LEN);
        let est_open = frame(est_client, vip80, L4::Syn, 255, FRAME_LEN);
        let est = frame(est_client, vip80, L4::Ack, 255, FRAME_LEN);
        let est_synack = frame(vip80, est_client, L4::SynAck, 255, FRAME_LEN);
        let udp = frame(udp_client, vip53, L4::Udp, 255, FRAME_LEN);
        let reply = frame(vip80, est_client, L4::Ack, 255, FRAME_LEN);
        let vip81 = SocketAddrV4::new(VIP, STATELESS_PORT);
        let sl_client = SocketAddrV4::new(CLIENT, 40004);
        let sl_syn = frame(sl_client, vip81, L4::Syn, 255, FRAME_LEN);
        let sl_est = frame(sl_client, vip81, L4::Ack, 255, FRAME_LEN);
        let sl_reply = frame(vip81, sl_client, L4::Ack, 255, FRAME_LEN);
        let nonvip = frame(
            SocketAddrV4::new(CLIENT, 40003),
            "198.18.1.99:80".parse()?,
            L4::Ack,
            255,
            FRAME_LEN,
        );
        let v6 = |ip, port| SocketAddrV6::new(ip, port, 0, 0);
        let vip6_80 = v6(VIP6, TCP_PORT);
        let vip6_53 = v6(VIP6, UDP_PORT);
        let est6_client = v6(CLIENT6, 40001);
        let syn6_client = v6(CLIENT6, 40000);
        let udp6_client = v6(CLIENT6, 40002);
        let syn6 = frame6(syn6_client, vip6_80, L4::Syn, 255, FRAME_LEN);
        let est6_open = frame6(est6_client, vip6_80, L4::Syn, 255, FRAME_LEN);
        let est6 = frame6(est6_client, vip6_80, L4::Ack, 255, FRAME_LEN);
        let est6_synack = frame6(vip6_80, est6_client, L4::SynAck, 255, FRAME_LEN);
        let udp6 = frame6(udp6_client, vip6_53, L4::Udp, 255, FRAME_LEN);
        let reply6 = frame6(vip6_80, est6_client, L4::Ack, 255, FRAME_LEN);
        let nonvip6 = frame6(
            v6(CLIENT6, 40003),
            "[2001:db8:18:1::99]:80".parse()?,
            L4::Ack,
            255,
            FRAME_LEN,
        );

        // Correctness first, with repeat = 1.
        let mut checks = Vec::new();
        let g = |dp: &Dataplane, n: &str| global(dp, n);
        let (a, out, _) = dp.test_run(&est_open, Some(v0), 1)?;
        check(
            &mut checks,
            "SYN to the VIP is redirected, identity-rewritten, TTL-1, checksums valid, recorded half-open",
            a == XDP_REDIRECT
                && verify(&out) == Some((est_client, vip80, 254))
                && g(dp, "half_open") == 1,
            format!("action {a}, {:?}, half_open {}", verify(&out), g(dp, "half_open")),
        );
        let (a, out, _) = dp.test_run(&est_synack, Some(v1), 1)?;
        check(
            &mut checks,
            "the backend's SYN-ACK follows the half-open record back",
            a == XDP_REDIRECT && verify(&out) == Some((vip80, est_client, 254)),
            format!("action {a}, {:?}", verify(&out)),
        );
        let promoted = g(dp, "promoted");
        let before = (
            g(dp, "flow_hits"),
            g(dp, "replies"),
            g(dp, "pass_not_service"),
        );
        let (a, out, _) = dp.test_run(&est, Some(v0), 1)?;
        check(
            &mut checks,
            "the client's ACK completes the handshake (promoted +1), follows its record (flow_hits +1) and is redirected",
            a == XDP_REDIRECT
                && verify(&out) == Some((est_client, vip80, 254))
                && g(dp, "flow_hits") == before.0 + 1
                && g(dp, "promoted") == promoted + 1,
            format!(
                "action {a}, flow_hits {} -> {}, promoted +{}",
                before.0,
                g(dp, "flow_hits"),
                g(dp, "promoted") - promoted
            ),
        );
        let (a, out, _) = dp.test_run(&reply, Some(v1), 1)?;
        check(
            &mut checks,
            "backend reply is rewritten back (replies +1) and redirected",
            a == XDP_REDIRECT
                && verify(&out) == Some((vip80, est_client, 254))
                && g(dp, "replies") == before.1 + 1,
            format!("action {a}, replies {} -> {}", before.1, g(dp, "replies")),
        );
        let (a, out, _) = dp.test_run(&udp, Some(v0), 1)?;
        check(
            &mut checks,
            "UDP to the VIP is redirected",
            a == XDP_REDIRECT && verify(&out) == Some((udp_client, vip53, 254)),
            format!("action {a}"),
        );
        let (a, out, _) = dp.test_run(&nonvip, Some(v0), 1)?;
        check(
            &mut checks,
            "non-VIP packet passes byte for byte (pass_not_service +1)",
            a == XDP_PASS && out == nonvip && g(dp, "pass_not_service") == before.2 + 1,
            format!("action {a}"),
        );
        let nf = dp.colour_stats(0, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&syn, Some(v0), 1)?;
        let nf2 = dp.colour_stats(0, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "SYN of a fresh 5-tuple records a new flow (new_flows +1) and is redirected",
            a == XDP_REDIRECT && nf2 - nf == 1 && verify(&out) == Some((syn_client, vip80, 254)),
            format!("action {a}, new_flows +{}", nf2 - nf),
        );
        let (a, out, _) = dp.test_run(&est, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "repeat N forwards every run (TTL 255 - N after N runs)",
            a == XDP_REDIRECT && verify(&out).map(|v| v.2) == Some(255 - opts.repeat as u8),
            format!("action {a}, TTL {:?}", verify(&out).map(|v| v.2)),
        );
        let hits = g(dp, "flow_hits");
        let (a, _, _) = dp.test_run(&est, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "repeated established ACK hits its record on every run",
            a == XDP_REDIRECT && g(dp, "flow_hits") - hits == u64::from(opts.repeat),
            format!("flow_hits +{}", g(dp, "flow_hits") - hits),
        );
        let recorded = |dp: &Dataplane| -> Result<u64> {
            Ok(dp
                .flow_counts(Duration::from_secs(30), Duration::from_secs(3600))?
                .values()
                .map(|c| c.recorded)
                .sum())
        };
        let (rec, sl) = (recorded(dp)?, g(dp, "stateless"));
        let (a1, out1, _) = dp.test_run(&sl_syn, Some(v0), 1)?;
        let (a2, out2, _) = dp.test_run(&sl_est, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "stateless service: SYN and repeated ACK are redirected by the hash (stateless +1+N), nothing recorded",
            a1 == XDP_REDIRECT
                && a2 == XDP_REDIRECT
                && verify(&out1) == Some((sl_client, vip81, 254))
                && verify(&out2).map(|v| v.2) == Some(255 - opts.repeat as u8)
                && g(dp, "stateless") - sl == 1 + u64::from(opts.repeat)
                && recorded(dp)? == rec,
            format!(
                "actions {a1}/{a2}, stateless +{}, records {} -> {}",
                g(dp, "stateless") - sl,
                rec,
                recorded(dp)?
            ),
        );
        let replies = g(dp, "replies");
        let (a, out, _) = dp.test_run(&sl_reply, Some(v1), 1)?;
        check(
            &mut checks,
            "stateless service: the backend's reply is rewritten back by the hash check (replies +1)",
            a == XDP_REDIRECT
                && verify(&out) == Some((vip81, sl_client, 254))
                && g(dp, "replies") == replies + 1,
            format!("action {a}"),
        );
        // The TC program: the same packets, the same records, a TC verdict.
        let (a, out, _) = dp.test_run_tc(&est, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "TC program: established ACK is redirected (TC_ACT_REDIRECT), identity-rewritten, TTL-1",
            a == TC_ACT_REDIRECT && verify(&out) == Some((est_client, vip80, 254)),
            format!("action {a}, {:?}", verify(&out)),
        );
        let (a, out, _) = dp.test_run_tc(&reply, Some(v1), 0, 1)?;
        check(
            &mut checks,
            "TC program: backend reply is rewritten back and redirected",
            a == TC_ACT_REDIRECT && verify(&out) == Some((vip80, est_client, 254)),
            format!("action {a}, {:?}", verify(&out)),
        );
        let (a, out, _) = dp.test_run_tc(&nonvip, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "TC program: non-VIP packet is left to the stack (TC_ACT_UNSPEC) byte for byte",
            a == TC_ACT_UNSPEC && out == nonvip,
            format!("action {a}"),
        );
        // IPv6: the same checks on the IPv6 services (FLOWS6, no flow
        // cache), hop limit for TTL.
        let before = (
            g(dp, "flow_hits"),
            g(dp, "replies"),
            g(dp, "pass_not_service"),
        );
        let nf = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&est6_open, Some(v0), 1)?;
        let nf2 = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "IPv6: SYN to the VIP records a new flow (new_flows +1), is redirected, identity-rewritten, hop limit -1, checksum valid",
            a == XDP_REDIRECT
                && nf2 - nf == 1
                && verify6(&out) == Some((est6_client, vip6_80, 254)),
            format!("action {a}, new_flows +{}, {:?}", nf2 - nf, verify6(&out)),
        );
        let (a, out, _) = dp.test_run(&est6_synack, Some(v1), 1)?;
        check(
            &mut checks,
            "IPv6: the backend's SYN-ACK follows the half-open record back",
            a == XDP_REDIRECT && verify6(&out) == Some((vip6_80, est6_client, 254)),
            format!("action {a}, {:?}", verify6(&out)),
        );
        let before = (before.0, g(dp, "replies"), before.2);
        let promoted = g(dp, "promoted");
        let (a, out, _) = dp.test_run(&est6, Some(v0), 1)?;
        check(
            &mut checks,
            "IPv6: the client's ACK completes the handshake (promoted +1), follows its record (flow_hits +1) and is redirected",
            a == XDP_REDIRECT
                && verify6(&out) == Some((est6_client, vip6_80, 254))
                && g(dp, "flow_hits") == before.0 + 1
                && g(dp, "promoted") == promoted + 1,
            format!(
                "action {a}, flow_hits {} -> {}, promoted +{}, {:?}",
                before.0,
                g(dp, "flow_hits"),
                g(dp, "promoted") - promoted,
                verify6(&out)
            ),
        );
        let (a, out, _) = dp.test_run(&reply6, Some(v1), 1)?;
        check(
            &mut checks,
            "IPv6: backend reply is rewritten back (replies +1) and redirected",
            a == XDP_REDIRECT
                && verify6(&out) == Some((vip6_80, est6_client, 254))
                && g(dp, "replies") == before.1 + 1,
            format!(
                "action {a}, replies {} -> {}, {:?}",
                before.1,
                g(dp, "replies"),
                verify6(&out)
            ),
        );
        let nf = dp.colour_stats(UDP6_ID, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&udp6, Some(v0), 1)?;
        let nf2 = dp.colour_stats(UDP6_ID, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "IPv6: UDP to the VIP records its flow and is redirected, checksum valid",
            a == XDP_REDIRECT
                && nf2 - nf == 1
                && verify6(&out) == Some((udp6_client, vip6_53, 254)),
            format!("action {a}, new_flows +{}, {:?}", nf2 - nf, verify6(&out)),
        );
        let (a, out, _) = dp.test_run(&nonvip6, Some(v0), 1)?;
        check(
            &mut checks,
            "IPv6: non-VIP packet passes byte for byte (pass_not_service +1)",
            a == XDP_PASS && out == nonvip6 && g(dp, "pass_not_service") == before.2 + 1,
            format!("action {a}"),
        );
        let nf = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        let (a, out, _) = dp.test_run(&syn6, Some(v0), 1)?;
        let nf2 = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;
        check(
            &mut checks,
            "IPv6: SYN of a fresh 5-tuple records a new flow (new_flows +1) and is redirected",
            a == XDP_REDIRECT
                && nf2 - nf == 1
                && verify6(&out) == Some((syn6_client, vip6_80, 254)),
            format!("action {a}, new_flows +{}", nf2 - nf),
        );
        let hits = g(dp, "flow_hits");
        let (a, out, _) = dp.test_run(&est6, Some(v0), opts.repeat)?;
        check(
            &mut checks,
            "IPv6: repeated established ACK hits its record and is forwarded on every run (flow_hits +N, hop limit 255 - N)",
            a == XDP_REDIRECT
                && verify6(&out).map(|v| v.2) == Some(255 - opts.repeat as u8)
                && g(dp, "flow_hits") - hits == u64::from(opts.repeat),
            format!(
                "action {a}, hop limit {:?}, flow_hits +{}",
                verify6(&out).map(|v| v.2),
                g(dp, "flow_hits") - hits
            ),
        );
        let replies = g(dp, "replies");
        let (a, out, _) = dp.test_run(&reply6, Some(v1), opts.repeat)?;
        check(
            &mut checks,
            "IPv6: repeated backend reply is rewritten back on every run (replies +N)",
            a == XDP_REDIRECT
                && verify6(&out) == Some((vip6_80, est6_client, 255 - opts.repeat as u8))
                && g(dp, "replies") - replies == u64::from(opts.repeat),
            format!("action {a}, replies +{}", g(dp, "replies") - replies),
        );
        let (a, out, _) = dp.test_run_tc(&est6, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "IPv6, TC program: established ACK is redirected (TC_ACT_REDIRECT), identity-rewritten, hop limit -1",
            a == TC_ACT_REDIRECT && verify6(&out) == Some((est6_client, vip6_80, 254)),
            format!("action {a}, {:?}", verify6(&out)),
        );
        let (a, out, _) = dp.test_run_tc(&reply6, Some(v1), 0, 1)?;
        check(
            &mut checks,
            "IPv6, TC program: backend reply is rewritten back and redirected",
            a == TC_ACT_REDIRECT && verify6(&out) == Some((vip6_80, est6_client, 254)),
            format!("action {a}, {:?}", verify6(&out)),
        );
        // Two flows of each family in its flow table (the completed
        // handshake's, the UDP flow's); the fresh SYN's record waits in the
        // family's half-open table.
        let held6 = l.flows6_id.map(count_entries6).transpose()?.unwrap_or(0);
        let held4 = l.flows_id.map(count_entries).transpose()?.unwrap_or(0);
        let half6 = l.half_open6_id.map(count_half6).transpose()?.unwrap_or(0);
        let half4 = l.half_open_id.map(count_half4).transpose()?.unwrap_or(0);
        check(
            &mut checks,
            "IPv6 flows are recorded in FLOWS6 (2 entries) and HALF_OPEN6 (1), the IPv4 ones in FLOWS (2) and HALF_OPEN (1)",
            held6 == 2 && held4 == 2 && half6 == 1 && half4 == 1,
            format!("FLOWS6 {held6}, FLOWS {held4}, HALF_OPEN6 {half6}, HALF_OPEN {half4}"),
        );
        let (a, out, _) = dp.test_run_tc(&nonvip6, Some(v0), 0, 1)?;
        check(
            &mut checks,
            "IPv6, TC program: non-VIP packet is left to the stack (TC_ACT_UNSPEC) byte for byte",
            a == TC_ACT_UNSPEC && out == nonvip6,
            format!("action {a}"),
        );
        let (a, _) = pass.run(&est, v0, opts.repeat)?;
        let (a6, _) = pass.run(&est6, v0, opts.repeat)?;
        check(
            &mut checks,
            "baseline returns XDP_PASS (IPv4 and IPv6 frames)",
            a == XDP_PASS && a6 == XDP_PASS,
            format!("actions {a}/{a6}"),
        );
        let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
        if !failed.is_empty() {
            bail!("program-cost correctness checks failed: {failed:?}");
        }

        // Measurement.
        let cases = [
            Case::Pass,
            Case::PassSingle,
            Case::NewFresh,
            Case::CompleteFresh,
            Case::EstablishedSingle,
            Case::Established,
            Case::Udp,
            Case::Reply,
            Case::NonVip,
            Case::StatelessNewFresh,
            Case::StatelessNew,
            Case::StatelessEstablished,
            Case::StatelessReply,
            Case::TcEstablished,
            Case::TcReply,
            Case::TcNonVip,
            Case::Pass6,
            Case::Pass6Single,
            Case::New6Fresh,
            Case::Established6Single,
            Case::Established6,
            Case::Udp6,
            Case::Reply6,
            Case::NonVip6,
            Case::TcEstablished6,
            Case::TcReply6,
        ];
        let mut per_round: BTreeMap<Case, Vec<f64>> = BTreeMap::new();
        let mut fresh = 0u32;
        let started = Instant::now();
        for round in 0..opts.rounds {
            for k in 0..cases.len() {
                let case = cases[(k + round) % cases.len()];
                let n = if case.single() {
                    opts.single_calls
                } else {
                    opts.calls
                };
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let ns = match case {
                        Case::Pass => pass.run(&est, v0, opts.repeat)?.1,
                        Case::PassSingle => {
                            // The same frame shape as NewFresh, built the same way.
                            let f = frame(client(0, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                            pass.run(&f, v0, 1)?.1
                        }
                        Case::NewFresh => {
                            fresh += 1;
                            let f = frame(client(0, fresh), vip80, L4::Syn, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::CompleteFresh => {
                            fresh += 1;
                            let c = client(3, fresh);
                            dp.test_run(&frame(c, vip80, L4::Syn, 255, FRAME_LEN), Some(v0), 1)?;
                            let sa = frame(vip80, c, L4::SynAck, 255, FRAME_LEN);
                            dp.test_run(&sa, Some(v1), 1)?;
                            let f = frame(c, vip80, L4::Ack, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::EstablishedSingle => dp.test_run(&est, Some(v0), 1)?.2,
                        Case::Established => dp.test_run(&est, Some(v0), opts.repeat)?.2,
                        Case::Udp => dp.test_run(&udp, Some(v0), opts.repeat)?.2,
                        Case::Reply => dp.test_run(&reply, Some(v1), opts.repeat)?.2,
                        Case::NonVip => dp.test_run(&nonvip, Some(v0), opts.repeat)?.2,
                        Case::StatelessNewFresh => {
                            fresh += 1;
                            let f = frame(client(1, fresh), vip81, L4::Syn, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::StatelessNew => dp.test_run(&sl_syn, Some(v0), opts.repeat)?.2,
                        Case::StatelessEstablished => {
                            dp.test_run(&sl_est, Some(v0), opts.repeat)?.2
                        }
                        Case::StatelessReply => dp.test_run(&sl_reply, Some(v1), opts.repeat)?.2,
                        Case::TcEstablished => dp.test_run_tc(&est, Some(v0), 0, opts.repeat)?.2,
                        Case::TcReply => dp.test_run_tc(&reply, Some(v1), 0, opts.repeat)?.2,
                        Case::TcNonVip => dp.test_run_tc(&nonvip, Some(v0), 0, opts.repeat)?.2,
                        Case::Pass6 => pass.run(&est6, v0, opts.repeat)?.1,
                        Case::Pass6Single => {
                            let f = frame6(client6(0, fresh), vip6_80, L4::Syn, 255, FRAME_LEN);
                            pass.run(&f, v0, 1)?.1
                        }
                        Case::New6Fresh => {
                            fresh += 1;
                            let f = frame6(client6(0, fresh), vip6_80, L4::Syn, 255, FRAME_LEN);
                            dp.test_run(&f, Some(v0), 1)?.2
                        }
                        Case::Established6Single => dp.test_run(&est6, Some(v0), 1)?.2,
                        Case::Established6 => dp.test_run(&est6, Some(v0), opts.repeat)?.2,
                        Case::Udp6 => dp.test_run(&udp6, Some(v0), opts.repeat)?.2,
                        Case::Reply6 => dp.test_run(&reply6, Some(v1), opts.repeat)?.2,
                        Case::NonVip6 => dp.test_run(&nonvip6, Some(v0), opts.repeat)?.2,
                        Case::TcEstablished6 => dp.test_run_tc(&est6, Some(v0), 0, opts.repeat)?.2,
                        Case::TcReply6 => dp.test_run_tc(&reply6, Some(v1), 0, opts.repeat)?.2,
                    };
                    v.push(ns.as_nanos() as f64);
                }
                // Single runs come in clock steps: the middle half's mean.
                let v = if case.single() {
                    interquartile_mean(&v)
                } else {
                    median(&v)
                };
                per_round.entry(case).or_default().push(v);
            }
        }
        let elapsed = started.elapsed();
        let nf_total = dp.colour_stats(0, Colour::Blue)?.new_flows;
        let nf6_total = dp.colour_stats(TCP6_ID, Colour::Blue)?.new_flows;

        let mut rows = Vec::new();
        for &case in cases.iter().filter(|c| !c.baseline()) {
            let base = case.base();
            let diffs: Vec<f64> = per_round[&case]
                .iter()
                .zip(&per_round[&base])
                .map(|(c, b)| c - b)
                .collect();
            let d = Summary::of(&diffs);
            let abs = Summary::of(&per_round[&case]);
            rows.push(json!({
                "case": case.key(),
                "label": case.label(),
                "repeat": if case.single() { 1 } else { opts.repeat },
                "absolute_ns": abs,
                "over_baseline_ns": d,
                "program_only_mpps": if d.median > 0.0 { 1000.0 / d.median } else { f64::INFINITY },
            }));
        }
        // The new flow, warm: the established packet's warm cost plus what a
        // new flow adds over it when both run cold (per round).
        let new_warm = |est: Case, pass: Case, new: Case, est1: Case| -> Summary {
            let v: Vec<f64> = (0..opts.rounds)
                .map(|i| {
                    per_round[&est][i] - per_round[&pass][i] + per_round[&new][i]
                        - per_round[&est1][i]
                })
                .collect();
            Summary::of(&v)
        };
        let warm_row = |key: &str, label: &str, d: Summary| {
            json!({
                "case": key,
                "label": label,
                "repeat": opts.repeat,
                "absolute_ns": Value::Null,
                "over_baseline_ns": d,
                "program_only_mpps": if d.median > 0.0 { 1000.0 / d.median } else { f64::INFINITY },
            })
        };
        let d = new_warm(
            Case::Established,
            Case::Pass,
            Case::NewFresh,
            Case::EstablishedSingle,
        );
        rows.insert(
            0,
            warm_row(
                "new_tcp_flow",
                "new TCP flow (SYN, fresh 5-tuple): established (repeat N) + (new − established, both repeat 1)",
                d,
            ),
        );
        // A whole new connection records twice: the SYN (half-open) and
        // the client's ACK that completes the handshake (into FLOWS).
        let whole: Vec<f64> = (0..opts.rounds)
            .map(|i| {
                let est1 = per_round[&Case::EstablishedSingle][i];
                per_round[&Case::Established][i] - per_round[&Case::Pass][i]
                    + (per_round[&Case::NewFresh][i] - est1)
                    + (per_round[&Case::CompleteFresh][i] - est1)
            })
            .collect();
        rows.insert(
            1,
            warm_row(
                "new_tcp_connection",
                "new TCP connection, both recording packets: established (repeat N) + (SYN − established) + (completing ACK − established), the cold ones repeat 1",
                Summary::of(&whole),
            ),
        );
        let d6 = new_warm(
            Case::Established6,
            Case::Pass6,
            Case::New6Fresh,
            Case::Established6Single,
        );
        let at = rows
            .iter()
            .position(|r| r["case"] == Case::New6Fresh.key())
            .unwrap_or(rows.len());
        rows.insert(
            at,
            warm_row(
                "ipv6_new_tcp_flow",
                "IPv6: new TCP flow (SYN, fresh 5-tuple): established (repeat N) + (new − established, both repeat 1)",
                d6,
            ),
        );
        // IPv6 against IPv4, round by round (each over its own family's
        // baseline): the established packet, the reply, the TC program's.
        let ratio = |c6: Case, c4: Case| -> Summary {
            let v: Vec<f64> = (0..opts.rounds)
                .map(|i| {
                    (per_round[&c6][i] - per_round[&c6.base()][i])
                        / (per_round[&c4][i] - per_round[&c4.base()][i])
                })
                .collect();
            Summary::of(&v)
        };
        let of_median = |c6: Case, c4: Case| -> Option<f64> {
            let m = |c: Case| {
                rows.iter()
                    .find(|r| r["case"] == c.key())
                    .and_then(|r| r["over_baseline_ns"]["median"].as_f64())
            };
            Some(m(c6)? / m(c4)?)
        };
        let v6_vs_v4 = json!({
            "method": "cost over XDP_PASS of the IPv6 case / cost over XDP_PASS of the IPv4 case; per_round: the ratio in each round, median (min–max); of_medians: the ratio of the two medians",
            "established_tcp": {
                "per_round": ratio(Case::Established6, Case::Established),
                "of_medians": of_median(Case::Established6, Case::Established),
            },
            "backend_reply": {
                "per_round": ratio(Case::Reply6, Case::Reply),
                "of_medians": of_median(Case::Reply6, Case::Reply),
            },
            "udp": {
                "per_round": ratio(Case::Udp6, Case::Udp),
                "of_medians": of_median(Case::Udp6, Case::Udp),
            },
            "tc_established_tcp": {
                "per_round": ratio(Case::TcEstablished6, Case::TcEstablished),
                "of_medians": of_median(Case::TcEstablished6, Case::TcEstablished),
            },
            "new_tcp_flow_cold": {
                "per_round": ratio(Case::New6Fresh, Case::NewFresh),
                "of_medians": of_median(Case::New6Fresh, Case::NewFresh),
            },
        });
        Ok(json!({
            "status": "measured",
            "method": "BPF_PROG_TEST_RUN on one pinned CPU; per round and case the median of several calls (of single runs, repeat 1, which the kernel times in steps of about 10 ns here: the mean of the middle half of the calls); cost = per-round difference to xdp_pass (same frame, same ingress, same repeat); median (min–max) over rounds; identity rewrite (backend = VIP) so repeat > 1 re-runs the full forwarding path",
            "cpu": opts.cpu,
            "rounds": opts.rounds,
            "calls_per_round": opts.calls,
            "repeat": opts.repeat,
            "single_calls_per_round": opts.single_calls,
            "frame_bytes": FRAME_LEN,
            "max_flows": opts.max_flows,
            "baseline_ns": {
                "repeat_n": Summary::of(&per_round[&Case::Pass]),
                "repeat_1": Summary::of(&per_round[&Case::PassSingle]),
                "ipv6_repeat_n": Summary::of(&per_round[&Case::Pass6]),
                "ipv6_repeat_1": Summary::of(&per_round[&Case::Pass6Single]),
            },
            "ipv6_frame_bytes": { "tcp": est6.len(), "udp": udp6.len() },
            "cases": rows,
            "ipv6_vs_ipv4": v6_vs_v4,
            "checks": checks,
            "new_flows_recorded": nf_total,
            "ipv6_new_flows_recorded": nf6_total,
            "elapsed_s": elapsed.as_secs_f64(),
        }))
    })??;
    drop(bed);
    Ok(r)
}

/// Fails unless part 1's correctness checks all passed (quick mode).
pub fn assert_checks(section: &Value) -> Result<()> {
    let checks = section["checks"].as_array().context("no checks")?;
    ensure!(!checks.is_empty(), "no checks ran");
    for c in checks {
        ensure!(c["ok"] == true, "check failed: {c}");
    }
    Ok(())
}
