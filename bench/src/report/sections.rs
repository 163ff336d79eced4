//! The paragraphs and tables of RESULTS.md's parts that have more than one
//! table row's worth to say (TC, IPv6, memory, the fleet, the daemon under
//! work, the follow and flood tests, part 2's rows).

use std::fmt::Write as _;

use serde_json::Value;

use super::{case, f, num, status, summ};

/// What the TC attachment costs against XDP on the same path, and why.
pub(super) fn tc_paragraph(w: &mut String, r: &Value, p2: &Value) {
    let rows = p2["configs"].as_array();
    let find = |key: &str| rows.and_then(|a| a.iter().find(|c| c["config"] == key));
    let (Some(x), Some(t)) = (
        find("bgswitch_10000_flows"),
        find("bgswitch_tc_10000_flows"),
    ) else {
        return;
    };
    let ns = |c: &Value| c["ns_per_packet"].as_f64().unwrap_or(f64::NAN);
    let (xn, tn) = (ns(x), ns(t));
    let kernel = find("kernel_forwarding_10000_flows").map_or(f64::NAN, ns);
    let nft = find("nftables_dnat_10000_flows").map_or(f64::NAN, ns);
    let prog = |key: &str| f(&case(r, key)["over_baseline_ns"]["median"]).unwrap_or(f64::NAN);
    let (px, pt) = (prog("established_tcp"), prog("tc_established_tcp"));
    let _ = writeln!(
        w,
        "**TC beside XDP.** With 10 000 flows a frame through the TC attachment takes {tn:.0} ns \
         end to end where XDP takes {xn:.0} ns ({:.1}× the time), plain kernel forwarding \
         {kernel:.0} ns and nftables DNAT {nft:.0} ns. The program is not most of it: an \
         established packet costs the TC program {pt:.0} ns and the XDP program {px:.0} ns \
         (part 1; the same source compiled twice). The difference in the program is the L4 \
         checksum, which on a socket buffer may be partial and so goes through \
         `bpf_l4_csum_replace` (one call for the address, one more only when the port \
         changes) where XDP patches it in place; the IPv4 header is patched in place by both. \
         The rest is the kernel's socket-buffer path, which nftables DNAT pays as well: the \
         frame becomes a socket buffer and passes GRO and the receive path before TC sees it, \
         and `bpf_redirect` sends it through the egress device's `dev_queue_xmit` instead of \
         XDP's bulked `ndo_xdp_xmit`. What TC buys is correctness wherever frames arrive as \
         socket buffers with partial checksums or as GSO aggregates (veth, bridges, tun/tap), \
         where XDP loses every such frame; there `attach = \"auto\"` takes TC, and native XDP \
         stays where a NIC's driver delivers complete frames.\n",
        tn / xn
    );
}

/// Part 1's IPv6 cases against IPv4's.
pub(super) fn ipv6_cost_paragraph(w: &mut String, r: &Value, p1: &Value) {
    let v = &p1["ipv6_vs_ipv4"];
    if v.is_null() {
        return;
    }
    let ns = |key: &str| num(&case(r, key)["over_baseline_ns"]["median"], 1);
    let pair = |k6: &str, k4: &str, vkey: &str, what: &str| {
        format!(
            "{what} {} ns against {} ns ({} ×, per round {})",
            ns(k6),
            ns(k4),
            num(&v[vkey]["of_medians"], 2),
            summ(&v[vkey]["per_round"], 2)
        )
    };
    let met = v["established_tcp"]["of_medians"]
        .as_f64()
        .map_or(
            "not measured",
            |x| if x <= 1.10 { "met" } else { "**missed**" },
        );
    let _ = writeln!(
        w,
        "**IPv6 beside IPv4.** Each family's cases are priced over XDP_PASS run on its own frames \
         (IPv6 frames: TCP {} B, its headers alone; UDP {} B). IPv6 costs {}; {}; {}; {}; a cold new \
         flow (repeat 1){}. The target for the established packet (at most 10 % over IPv4's) is \
         {met}. Both families' established packets take their per-CPU flow cache. IPv6's slot is \
         keyed by the whole 40-byte 5-tuple, its addresses compared as four 64-bit words read \
         from the header, and keeps its direction's TCP/UDP checksum delta, computed when the \
         slot is filled (the IPv6 header has no checksum of its own); until this round the slot \
         was compared word by word and its path took the ordinary rewrite (four address words \
         through the checksum update per packet): 1.17–1.21× per round then, in three \
         interleaved pairs of part 1 alone, against 1.05–1.10× after. What IPv6 still adds is \
         its own program (a tail call from the IPv4 one, its own 512-byte stack), the longer \
         parse and the 40-byte key.\n",
        num(&p1["ipv6_frame_bytes"]["tcp"], 0),
        num(&p1["ipv6_frame_bytes"]["udp"], 0),
        pair(
            "ipv6_established_tcp",
            "established_tcp",
            "established_tcp",
            "an established TCP packet"
        ),
        pair(
            "ipv6_backend_reply",
            "backend_reply",
            "backend_reply",
            "a backend reply"
        ),
        pair("ipv6_udp", "udp", "udp", "a UDP packet"),
        pair(
            "ipv6_tc_established_tcp",
            "tc_established_tcp",
            "tc_established_tcp",
            "the TC program's established packet"
        ),
        pair(
            "ipv6_new_tcp_flow_cold",
            "new_tcp_flow_cold",
            "new_tcp_flow_cold",
            ""
        ),
    );
}

/// Part 2's IPv6 rows against IPv4's.
pub(super) fn ipv6_fwd_paragraph(w: &mut String, p2: &Value) {
    let Some(v) = p2["ipv6_vs_ipv4"].as_array().filter(|a| !a.is_empty()) else {
        return;
    };
    let rows = p2["configs"].as_array();
    let find = |pre: &str| {
        rows.and_then(|a| {
            a.iter()
                .find(|c| c["config"].as_str().is_some_and(|k| k.starts_with(pre)))
        })
    };
    let each: Vec<String> = v
        .iter()
        .map(|x| {
            format!(
                "with {} {} IPv6 {} Mpps against IPv4 {} Mpps ({} ×{})",
                x["flows"],
                if x["flows"] == 1 { "flow" } else { "flows" },
                num(&x["ipv6_mpps"], 3),
                num(&x["ipv4_mpps"], 3),
                num(&x["rate_ratio"], 2),
                if x["ipv6_lb_ns_over_floor"].is_null() || x["ipv4_lb_ns_over_floor"].is_null() {
                    String::new()
                } else {
                    format!(
                        "; over each family's floor {} ns against {} ns per packet",
                        num(&x["ipv6_lb_ns_over_floor"], 0),
                        num(&x["ipv4_lb_ns_over_floor"], 0)
                    )
                },
            )
        })
        .collect();
    let kernel = find("ipv6_kernel_forwarding_").map_or(String::new(), |k| {
        format!(
            " The kernel's own IPv6 forwarding ({}) reaches {} Mpps; bgswitch's IPv6 rows are {} of it.",
            k["label"].as_str().unwrap_or(""),
            num(&k["mpps"]["median"], 3),
            v.iter()
                .filter_map(|x| {
                    let k = k["mpps"]["median"].as_f64()?;
                    let n = &x["flows"];
                    let unit = if *n == 1 { "flow" } else { "flows" };
                    Some(format!("{:.2} × ({n} {unit})", x["ipv6_mpps"].as_f64()? / k))
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    let _ = writeln!(
        w,
        "**IPv6.** Frames from `xdp_gen6` (64 B: Ethernet, IPv6, UDP with a valid checksum and no \
         payload); the IPv6 rows' share of the floor and time over it are against the IPv6 \
         generator's own floor; their \"× nftables\" column is empty (no IPv6 DNAT row). bgswitch: {}.{kernel}\n",
        each.join("; "),
    );
}

/// Part 5's memory per flow, IPv4 (`FLOWS`) and IPv6 (`FLOWS6`).
pub(super) fn memory_by_family(w: &mut String, mem: &Value, sc: &Value) {
    let m6 = &mem["ipv6"];
    if m6.is_null() {
        return;
    }
    let _ = writeln!(
        w,
        "Per family (the two tables are sized alike, {} and {} flows in the two data planes; \
         \"computed\": element header, key and value, bucket):\n",
        sc["scale_max_flows"], mem["small_max_flows"]
    );
    let _ = writeln!(
        w,
        "| family | table | key + value, B | computed, B per flow | kernel's accounting, B per flow (slope) | including fixed parts |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for (fam, table, m, computed) in [
        ("IPv4", "FLOWS", mem, &mem["computed_bytes_per_flow"]),
        ("IPv6", "FLOWS6", m6, &m6["computed_bytes_per_flow"]),
    ] {
        let _ = writeln!(
            w,
            "| {fam} | `{table}` | {} | {} | {} | {} |",
            num(&m["flow_key_plus_entry_bytes"], 0),
            num(computed, 0),
            num(&m["bytes_per_flow_slope"], 1),
            num(&m["bytes_per_flow_memlock"], 1),
        );
    }
    let _ = writeln!(w);
}

/// Part 6: a fleet of hosts flipping as one.
pub(super) fn fleet_section(w: &mut String, fl: &Value) {
    if fl.is_null() {
        return;
    }
    let _ = writeln!(w, "## 6. A fleet of hosts (etcd)\n");
    if let Some(st) = status(fl) {
        let _ = writeln!(w, "{st}\n");
        return;
    }
    let _ = writeln!(
        w,
        "{} load-balancer hosts (each a served test bed with its daemon), one etcd member (Debian's etcd-server) in a namespace of its own linked to each; {} flips with `bgswitch flip` on the first host, the service's control word watched on every host through its mapped `CONTROL` array (polled every ~10 µs). \"All applied\": the command's start to the last host's store; \"disagreement\": the first host's store to the last's. The peer makes the same change host by host with `nft -f` on each (as a loop over hosts does), the daemons stopped; its window is the first host's `nft -f` returning to the last's. Median (min–max), p99.\n",
        fl["hosts"], fl["flips"]
    );
    let _ = writeln!(
        w,
        "| system | all applied, ms | p99 | hosts disagree, ms | p99 | command, ms |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    let b = &fl["bgswitch"];
    let _ = writeln!(
        w,
        "| bgswitch (etcd) | {} | {} | {} | {} | {} |",
        summ(&b["all_applied_ms"], 2),
        num(&b["all_applied_ms"]["p99"], 2),
        summ(&b["disagreement_ms"], 2),
        num(&b["disagreement_ms"]["p99"], 2),
        summ(&b["command_ms"], 2),
    );
    let p = &fl["nftables_host_by_host"];
    let _ = writeln!(
        w,
        "| nftables DNAT, `nft -f` host by host | {} | {} | {} | {} | — |\n",
        summ(&p["all_applied_ms"], 2),
        num(&p["all_applied_ms"]["p99"], 2),
        summ(&p["disagreement_ms"], 2),
        num(&p["disagreement_ms"]["p99"], 2),
    );
}

/// Part 5: the control socket while the daemon does its slower work.
pub(super) fn under_work_section(w: &mut String, u: &Value) {
    if let Some(st) = status(u) {
        let _ = writeln!(w, "The daemon under work: {st}\n");
        return;
    }
    let mib = u["journal_bytes"]
        .as_f64()
        .map_or("—".into(), |b| format!("{:.0} MB", b / 1e6));
    let _ = writeln!(
        w,
        "The daemon under work: the same daemon and services, its journal then padded to {} lines ({mib}: its own {} lines \
         repeated in front of them, numbered anew, the snapshot's number moved on by as many, so a restart replays nothing), \
         as after a long life; round trips over the socket from connecting to the answer (no process spawned; `bgswitch::cli::call`). \
         Flips are of one service, {} of them {} ms apart; every 64th change makes a snapshot of all 256 services due. \
         Reproduce: `bgswitch-bench --only services --out DIR` (`BGSWITCH_BIN=…` for another daemon).\n",
        num(&u["journal_lines"], 0),
        u["journal_lines"]
            .as_u64()
            .zip(u["journal_lines_repeated"].as_u64())
            .map_or("?".into(), |(a, b)| (a - b).to_string()),
        num(&u["flips"], 0),
        num(&u["flip_gap_ms"], 0),
    );
    let _ = writeln!(w, "| measure | median (min–max), ms | p99 | max |");
    let _ = writeln!(w, "|---|---|---|---|");
    let _ = writeln!(
        w,
        "| restart (SIGTERM, then spawn to the first answered `status`, polled every 50 ms), journal as it was | {} | | |",
        num(&u["start_ms_journal_as_is"], 0)
    );
    let _ = writeln!(
        w,
        "| the same with the long journal | {} | | |",
        num(&u["start_ms_long_journal"], 0)
    );
    let _ = writeln!(
        w,
        "| `history` of one service ({} entries), 5 times | {} | | |",
        num(&u["history_entries"], 0),
        summ(&u["history_ms"], 1)
    );
    let _ = writeln!(
        w,
        "| flip, alone | {} | {} | {} |",
        summ(&u["flip_ms_alone"], 2),
        num(&u["flip_ms_alone_p99"], 2),
        num(&u["flip_ms_alone"]["max"], 2)
    );
    let _ = writeln!(
        w,
        "| flip, while `history` is read back to back on another connection ({} read meanwhile) | {} | {} | {} |\n",
        num(&u["histories_during"], 0),
        summ(&u["flip_ms_during_history"], 2),
        num(&u["flip_ms_during_history_p99"], 2),
        num(&u["flip_ms_during_history"]["max"], 2)
    );
}

/// Part 4's frame-by-frame view of flips (measured on part 2's rig).
pub(super) fn follow_section(w: &mut String, f: &Value) {
    let Some(trials) = f["trials"].as_array() else {
        return;
    };
    let _ = writeln!(
        w,
        "### The data plane follows the store
"
    );
    let _ = writeln!(
        w,
        "On part 2's namespaces: {}. \"Lag\": the first frame the new colour got minus the \
         frames generated when the flipping thread read the count just before the store (≤ 0: \
         frames already queued when the word changed took the new colour). One NAPI batch is {} \
         frames.\n",
        f["method"].as_str().unwrap_or(""),
        f["batch"]
    );
    let clean = trials.iter().filter(|t| t["clean_cut"] == true).count();
    let _ = writeln!(
        w,
        "| flips | clean cuts (no frame to the old colour after one to the new) | lag, frames: median (min–max) | frames per flip to old / new colour (first flip) |"
    );
    let _ = writeln!(w, "|---|---|---|---|");
    let _ = writeln!(
        w,
        "| {} | {clean} | {} | {} / {} |\n",
        trials.len(),
        summ(&f["lag_frames"], 0),
        trials[0]["on_old"],
        trials[0]["on_new"]
    );
}

/// Part 4's SYN flood against draining connections (on part 2's rig).
pub(super) fn flood_section(w: &mut String, f: &Value) {
    if f.is_null() {
        return;
    }
    let _ = writeln!(w, "### A SYN flood against draining connections\n");
    let _ = writeln!(
        w,
        "On part 2's namespaces: {}. A SYN's record waits in the half-open table until the \
         client's ACK acknowledges the backend's SYN-ACK, so spoofed SYNs churn that table \
         alone.\n",
        f["method"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        w,
        "| flood, Mpps | SYNs sent / delivered | half-open records made | established: still on blue | their packets that found their record | packets that found no record |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    let _ = writeln!(
        w,
        "| {} | {} / {} | {} | {} of {} | {} | {} |\n",
        num(&f["flood_mpps"], 3),
        f["flood_frames"],
        f["flood_delivered"],
        f["flood_half_open_records"],
        f["established_still_on_blue"],
        f["established"],
        f["established_flow_hits"],
        f["record_missing"]
    );
}

pub(super) fn fwd_row(w: &mut String, c: &Value) {
    let _ = writeln!(
        w,
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        c["label"].as_str().unwrap_or(""),
        num(&c["table_max_flows"], 0),
        summ(&c["mpps"], 3),
        num(&c["ns_per_packet"], 0),
        num(&c["lb_ns_per_packet_over_floor"], 0),
        num(&c["ratio_to_nftables_dnat"], 2),
        c["ratio_to_floor"]
            .as_f64()
            .map_or("—".into(), |v| format!("{:.0} %", v * 100.0)),
        num(&c["sent"], 0),
        num(&c["delivered"], 0),
        num(&c["lost"], 0),
        num(&c["flow_hit_ratio"], 3),
    );
}
