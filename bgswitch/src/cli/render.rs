//! The text output of `status`, `status --fleet`, `history` and the checks'
//! report.

use crate::{api::Status, state::JournalEntry};

/// The text form of `status --fleet`.
pub fn render_fleet(f: &crate::state::FleetStatus) -> String {
    let l = &f.local;
    let mut out = format!(
        "fleet {} (this host: {}), etcd {}: {}\n",
        l.cluster,
        l.host,
        l.etcd.join(", "),
        if l.reachable {
            "reachable".to_string()
        } else {
            format!(
                "UNREACHABLE{}{}",
                l.unreachable_since_ms
                    .map(|s| format!(" since {} UTC", unix_time(s / 1000)))
                    .unwrap_or_default(),
                l.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        }
    );
    if !l.diverged.is_empty() {
        out += &format!("  DIVERGED here (--local): {}\n", l.diverged.join(", "));
    }
    for s in &f.services {
        out += &format!(
            "{}  generation {}  active: {}{}\n",
            s.name,
            s.generation,
            s.active.map_or("?".into(), |c| c.to_string()),
            s.changed_by
                .as_deref()
                .map(|c| format!("  (last: {c})"))
                .unwrap_or_default()
        );
        if !s.mismatched.is_empty() {
            out += &format!(
                "  DEFINITIONS DIFFER on {}: changes are refused until they agree (or --force)\n",
                s.mismatched.join(", ")
            );
        }
        for h in &f.hosts {
            let applied = h.report.applied.get(&s.name).copied();
            let health = h
                .report
                .unhealthy
                .get(&s.name)
                .map(|m| {
                    m.iter()
                        .map(|(c, b)| format!("{c}: {}", b.join(", ")))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_else(|| "all up".into());
            out += &format!(
                "  {:<16} applied {:<6} lag {:<4} {:<10} last seen {:.1} s ago  health: {}{}\n",
                h.report.host,
                applied.map_or("-".into(), |a| a.to_string()),
                applied.map_or("-".into(), |a| s.generation.saturating_sub(a).to_string()),
                if h.live { "reachable" } else { "GONE" },
                h.last_seen_ms_ago as f64 / 1000.0,
                health,
                if h.report.diverged.contains(&s.name) {
                    "  DIVERGED (--local)"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// The report of the user's checks that ran for a request: one line per
/// run, then the tail of the output of each that did not pass.
pub fn render_checks(runs: &[crate::model::CheckRecord]) -> String {
    let mut out = String::new();
    for r in runs {
        out += &format!(
            "check {:<20} {:<6} {} ({:.1} s)\n",
            r.name,
            r.colour.to_string(),
            r.outcome,
            r.duration_ms as f64 / 1000.0
        );
        if !r.outcome.passed() {
            for l in r
                .output
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                out += &format!("    | {l}\n");
            }
        }
    }
    out
}

/// The text form of `history`.
pub fn render_history(h: &[JournalEntry]) -> String {
    let mut out = String::new();
    for e in h {
        let c = &e.change;
        let secs = c.at_ms / 1000;
        out += &format!(
            "{} gen {}→{} {:<18} {}→{} canary {:.2}% preview [{}] by {}{}{}{}{}\n",
            unix_time(secs),
            c.generation_before,
            c.generation,
            c.kind.to_string(),
            c.from,
            c.to,
            f64::from(c.after.canary_bp) / 100.0,
            c.after.preview.join(","),
            c.user,
            match (&c.host, c.local) {
                (Some(h), false) => format!(" on {h}"),
                (Some(h), true) => format!(" on {h} alone (--local)"),
                (None, true) => " on this host alone (--local)".to_string(),
                (None, false) => String::new(),
            },
            if c.forced { " (forced)" } else { "" },
            c.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            if e.outcome == "ok" {
                String::new()
            } else {
                format!(" [{}]", e.outcome)
            },
        );
        for r in &c.checks {
            out += &format!("    {}\n", r.describe());
        }
    }
    if out.is_empty() {
        out = "no changes recorded\n".into();
    }
    out
}

/// UTC "YYYY-MM-DD HH:MM:SS" of a Unix time (civil-from-days).
pub(crate) fn unix_time(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The text form of `status`.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    for svc in &s.services {
        out += &format!(
            "{}  {}/{}  active: {}  generation {}{}\n",
            svc.name,
            svc.vip,
            svc.protocol,
            svc.active,
            svc.generation,
            svc.previous
                .map(|p| format!("  (rollback → {p})"))
                .unwrap_or_default()
        );
        match svc.fast_path.as_str() {
            "stateless" => {
                out += "  stateless: packets follow the active pool's hash; flows are not recorded (live flows of the active colour are not counted)
"
            }
            "transition" => {
                out += "  transition: flows are recorded; connections of the last stateless period keep its pool until a TCP idle timeout has passed
";
                if let Some(t) = &svc.transition {
                    out += &format!(
                        "  transition for {} s (idle timeout {} s); {} recorded connection{} on another backend than the active pool's hash chooses{}
",
                        t.since_s,
                        t.idle_timeout_s,
                        t.disagreeing,
                        if t.disagreeing == 1 { "" } else { "s" },
                        match t.disagreeing {
                            0 => "",
                            1 => ": the stable period waits for it to end",
                            _ => ": the stable period waits for them to end",
                        }
                    );
                }
            }
            _ => {}
        }
        if svc.canary_percent > 0.0 {
            out += &format!(
                "  canary: {:.2}% of new flows to {}\n",
                svc.canary_percent,
                svc.active.other()
            );
        }
        if !svc.preview.is_empty() {
            out += &format!(
                "  preview → {}: {}\n",
                svc.active.other(),
                svc.preview.join(", ")
            );
        }
        if let Some(w) = &svc.watch {
            out += &format!(
                "  watching {} until {} UTC{}\n",
                w.colour,
                unix_time(w.until_ms / 1000),
                w.max_error_rate
                    .map(|r| format!(", max error rate {r}"))
                    .unwrap_or_default()
            );
        }
        if let Some(c) = &svc.confirm {
            out += &format!(
                "  WAITING FOR CONFIRMATION of {} until {} UTC (bgswitch confirm {})\n",
                c.colour,
                unix_time(c.deadline_ms / 1000),
                svc.name
            );
        }
        if let Some(r) = &svc.rolled_back {
            out += &format!("  ROLLED BACK automatically: {r}\n");
        }
        for c in &svc.colours {
            out += &format!(
                "  {}{:<6} live flows {:<6} new flows {:<8} packets {:<10} bytes {:<12} replies {:<8} RSTs {} unanswered SYNs {}{}\n",
                if c.active { "*" } else { " " },
                c.colour.to_string(),
                if c.untracked {
                    format!("{}+", c.live_flows)
                } else {
                    c.live_flows.to_string()
                },
                c.new_flows,
                c.packets,
                c.bytes,
                c.reply_packets,
                c.backend_rsts,
                c.unanswered_syns,
                if c.all_down {
                    "  NO HEALTHY BACKEND"
                } else if !c.pool_healthy {
                    "  (pool not healthy)"
                } else {
                    ""
                }
            );
            for b in &c.backends {
                out += &format!(
                    "           {:<24} {:<8} new flows {:<8} packets {:<10} replies {}{}\n",
                    b.address,
                    if svc.health_checks {
                        format!("{:?}", b.health).to_lowercase()
                    } else {
                        String::new()
                    },
                    b.new_flows,
                    b.packets,
                    b.reply_packets,
                    b.health_error
                        .as_deref()
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default()
                );
            }
        }
        for c in &svc.checks {
            let when: Vec<String> = c.when.iter().map(ToString::to_string).collect();
            out += &format!(
                "  check {:<20} ({}, as {}){}: {}\n",
                c.name,
                when.join(", "),
                c.user,
                if c.running { " RUNNING" } else { "" },
                match &c.last {
                    None => "not run yet".to_string(),
                    Some(r) => format!(
                        "last {} against {} at {} UTC: {} ({:.1} s)",
                        r.phase,
                        r.colour,
                        unix_time(r.at_ms / 1000),
                        r.outcome,
                        r.duration_ms as f64 / 1000.0
                    ),
                }
            );
        }
        if let Some(ch) = &svc.last_change {
            out += &format!(
                "  last change: {} {} → {} by {}{}\n",
                ch.kind,
                ch.from,
                ch.to,
                ch.user,
                ch.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(f) = &s.fleet {
        out += &format!(
            "fleet {} (this host: {}): etcd {}{}\n",
            f.cluster,
            f.host,
            if f.reachable {
                "reachable".to_string()
            } else {
                format!(
                    "UNREACHABLE{}: serving the state last applied; changes need --local",
                    f.unreachable_since_ms
                        .map(|t| format!(" since {} UTC", unix_time(t / 1000)))
                        .unwrap_or_default()
                )
            },
            if f.diverged.is_empty() {
                String::new()
            } else {
                format!("; DIVERGED (--local): {}", f.diverged.join(", "))
            }
        );
    }
    if let Some(p) = &s.pins {
        out += &format!(
            "pins: {} ({}): {}\n",
            p.bpffs,
            p.note,
            if p.outlive_daemon {
                "the data plane outlives the daemon"
            } else {
                "the data plane goes with the daemon"
            }
        );
    }
    let w = &s.durable_writes;
    if let (Some(mean), Some(last)) = (w.mean_seconds(), w.last_seconds) {
        out += &format!(
            "durable writes: {} change{} made durable in {:.2} ms on average, the last in {:.2} ms\n",
            w.count,
            if w.count == 1 { "" } else { "s" },
            mean * 1e3,
            last * 1e3
        );
    }
    out += if s.backend_hops {
        "next hops: new IPv4 flows take their backend's (the routing rules select by destination)\n"
    } else {
        "next hops: every new flow looks its own up (a routing rule selects on more than the destination)\n"
    };
    out += "interfaces:";
    if s.interfaces.is_empty() {
        out += " none";
    }
    for i in &s.interfaces {
        out += &format!(
            " {} ({}{})",
            i.name,
            i.mode.as_str(),
            if i.adopted { ", adopted" } else { "" }
        );
    }
    out += "\n";
    for i in &s.interfaces {
        out += &format!("  {}: {}: {}", i.name, i.mode.describe(), i.reason);
        if let Some(f) = &i.fallback_reason {
            out += &format!(" ({f})");
        }
        out += "\n";
    }
    let nonzero: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out += &format!(
        "counters: {}\n",
        if nonzero.is_empty() {
            "all zero".to_string()
        } else {
            nonzero.join(" ")
        }
    );
    out
}
