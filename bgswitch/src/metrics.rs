//! The Prometheus/OpenMetrics exposition of a status snapshot, encoded with
//! `prometheus-client`. Counters come straight from the kernel's per-CPU
//! counters, so they are monotonic across daemon restarts (the maps are
//! pinned) and reset only when the pins are removed.

use prometheus_client::{
    encoding::{text::encode, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

use crate::{
    api::{DurableWrites, Status, DURABLE_WRITE_BUCKETS},
    health::Health,
};

/// [`DurableWrites`] as a histogram: a snapshot's counts, encoded as they
/// are (prometheus-client's own histogram only counts what it observes).
#[derive(Debug)]
struct WriteTimes(DurableWrites);

impl EncodeMetric for WriteTimes {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let w = &self.0;
        let buckets: Vec<(f64, u64)> = DURABLE_WRITE_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, le)| (le, w.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(w.sum_seconds, w.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Families {
    registry: Registry,
}

// prometheus-client ends every HELP text with a period: ours are written
// as sentences, so theirs is taken off first.
fn help(text: &str) -> &str {
    text.trim_end_matches('.')
}

impl Families {
    fn counter(&mut self, name: &str, text: &str) -> Family<Labels, Counter> {
        let f = Family::<Labels, Counter>::default();
        self.registry.register(name, help(text), f.clone());
        f
    }
    fn gauge(&mut self, name: &str, text: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.registry.register(name, help(text), f.clone());
        f
    }
    fn gauge_f(&mut self, name: &str, text: &str) -> Family<Labels, Gauge<f64, AtomicU64>> {
        let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        self.registry.register(name, help(text), f.clone());
        f
    }
}

/// The exposition formats a scraper may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 (what `render` writes).
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// Content negotiation on an `Accept` header: the Prometheus text
    /// format when the scraper prefers `text/plain` (by its q-values) or
    /// asks for nothing else it knows; OpenMetrics otherwise (also with no
    /// header, or `*/*` alone).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::OpenMetrics;
        };
        let (mut om, mut text) = (None::<f64>, None::<f64>);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f64>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut om,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |o| o.max(q)));
        }
        match (om, text) {
            (_, None) | (None, Some(0.0)) => Self::OpenMetrics,
            (None, Some(_)) => Self::Prometheus,
            (Some(o), Some(t)) if t > o => Self::Prometheus,
            _ => Self::OpenMetrics,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// `openmetrics` (what `render` wrote) in this format.
    pub fn encode(self, openmetrics: String) -> String {
        match self {
            Self::OpenMetrics => openmetrics,
            Self::Prometheus => to_prometheus_text(&openmetrics),
        }
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter's
/// family is named by its samples (`…_total`) in HELP and TYPE, and
/// `# UNIT` and `# EOF` go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out += &l,
            None => out += line,
        }
        out.push('\n');
    }
    out
}

/// Renders the OpenMetrics text for `status`.
pub fn render(status: &Status) -> String {
    let mut f = Families {
        registry: Registry::default(),
    };
    let packets = f.counter(
        "bgswitch_packets",
        "Packets switched, by service, colour and direction (to_backend, reply).",
    );
    let bytes = f.counter(
        "bgswitch_bytes",
        "Bytes switched (frames as received), by service, colour and direction.",
    );
    let new_flows = f.counter(
        "bgswitch_new_flows",
        "Flows whose colour and backend were chosen, by service and colour.",
    );
    let live = f.gauge(
        "bgswitch_live_flows",
        "Open flows pinned to a colour, counted in the kernel's flow table.",
    );
    let rsts = f.counter(
        "bgswitch_backend_resets",
        "TCP RSTs sent by the colour's backends (error signal).",
    );
    let unanswered = f.gauge(
        "bgswitch_unanswered_syns",
        "TCP flows whose SYN got no SYN-ACK in time, in the flow table (error signal).",
    );
    let active = f.gauge(
        "bgswitch_active_colour",
        "1 for the service's active colour, 0 for the other.",
    );
    let canary = f.gauge_f(
        "bgswitch_canary_share_ratio",
        "Share of new flows sent to the idle colour (0-1).",
    );
    let healthy = f.gauge(
        "bgswitch_backend_health",
        "1 for the backend's current health state (up, down, unknown).",
    );
    let backend_flows = f.counter("bgswitch_backend_new_flows", "Flows sent to a backend.");
    let flips = f.counter("bgswitch_flips", "Flips of the service (manual).");
    let rollbacks = f.counter(
        "bgswitch_rollbacks",
        "Rollbacks of the service (manual and automatic).",
    );
    let generation = f.gauge(
        "bgswitch_generation",
        "Generation of the service's desired state (bumped by every change).",
    );
    let disagreeing = f.gauge(
        "bgswitch_transition_disagreeing_connections",
        "In a stateless service's transition: live records on another backend than the active pool's hash chooses (the stable period waits for none).",
    );
    let scans = f.counter(
        "bgswitch_flow_table_scans",
        "Whole reads of the flow table by this daemon since it started (live-flow counts, transitions that may end).",
    );
    let fast_path = f.gauge(
        "bgswitch_fast_path",
        "1 for how the service's packets find their backend now (table, stateless, transition).",
    );
    let check_runs = f.counter(
        "bgswitch_check_runs",
        "Runs of the user's checks ([[service.check]]) since the daemon started, by service, check and result (passed, failed, timeout, error).",
    );
    let check_seconds = f.gauge_f(
        "bgswitch_check_duration_seconds",
        "How long the check's last run took, by service and check.",
    );
    let check_passed = f.gauge(
        "bgswitch_check_last_passed",
        "1 when the check's last run passed, 0 when it did not (no series before its first run).",
    );
    let fleet_reachable = f.gauge(
        "bgswitch_fleet_etcd_reachable",
        "1 while the fleet's etcd answers this host, 0 while it does not (the data plane keeps the state last applied).",
    );
    let fleet_unreachable = f.gauge(
        "bgswitch_fleet_etcd_unreachable_since_seconds",
        "Unix time since which the fleet's etcd has not answered (0 while it answers).",
    );
    let fleet_diverged = f.gauge(
        "bgswitch_fleet_diverged",
        "1 for a service changed on this host alone (--local) and not yet reconciled with the fleet.",
    );
    let xdp = f.counter(
        "bgswitch_xdp_events",
        "Data plane events by kind (passed, malformed, fragments, FIB outcomes, ...).",
    );
    let attached = f.gauge(
        "bgswitch_interface_attached",
        "1 per interface bgswitch serves, by mode (native, generic: XDP; tc, tc-netlink: TC).",
    );
    let serving = f.gauge(
        "bgswitch_interface_serving",
        "1 per configured interface the program serves now, 0 for one it does not (gone, not attached yet, or taken by something else).",
    );
    let auto_rollback = f.gauge(
        "bgswitch_automatic_rollback",
        "1 while the service's last change is an automatic rollback (a watch failed or a confirmation was missed), until the next change.",
    );
    let attachment = f.gauge(
        "bgswitch_interface_attachment",
        "1 per interface bgswitch serves, by mode and why it was chosen.",
    );

    for s in &status.services {
        let svc = s.name.as_str();
        for c in &s.colours {
            let colour = c.colour.to_string();
            let l =
                |dir: &str| labels(&[("service", svc), ("colour", &colour), ("direction", dir)]);
            packets.get_or_create(&l("to_backend")).inc_by(c.packets);
            packets.get_or_create(&l("reply")).inc_by(c.reply_packets);
            bytes.get_or_create(&l("to_backend")).inc_by(c.bytes);
            bytes.get_or_create(&l("reply")).inc_by(c.reply_bytes);
            let sc = labels(&[("service", svc), ("colour", &colour)]);
            new_flows.get_or_create(&sc).inc_by(c.new_flows);
            live.get_or_create(&sc).set(c.live_flows as i64);
            rsts.get_or_create(&sc).inc_by(c.backend_rsts);
            unanswered.get_or_create(&sc).set(c.unanswered_syns as i64);
            active.get_or_create(&sc).set(i64::from(c.active));
            for b in &c.backends {
                for state in [Health::Up, Health::Down, Health::Unknown] {
                    let name = format!("{state:?}").to_lowercase();
                    healthy
                        .get_or_create(&labels(&[
                            ("service", svc),
                            ("colour", &colour),
                            ("backend", &b.address),
                            ("state", &name),
                        ]))
                        .set(i64::from(b.health == state));
                }
                backend_flows
                    .get_or_create(&labels(&[
                        ("service", svc),
                        ("colour", &colour),
                        ("backend", &b.address),
                    ]))
                    .inc_by(b.new_flows);
            }
        }
        let sl = labels(&[("service", svc)]);
        auto_rollback
            .get_or_create(&sl)
            .set(i64::from(s.rolled_back.is_some()));
        canary.get_or_create(&sl).set(s.canary_percent / 100.0);
        flips.get_or_create(&sl).inc_by(s.flips);
        rollbacks.get_or_create(&sl).inc_by(s.rollbacks);
        generation.get_or_create(&sl).set(s.generation as i64);
        // 0 outside a transition, so the series is always there.
        disagreeing
            .get_or_create(&sl)
            .set(s.transition.as_ref().map_or(0, |t| t.disagreeing) as i64);
        for c in &s.checks {
            let cl = labels(&[("service", svc), ("check", &c.name)]);
            for result in ["passed", "failed", "timeout", "error"] {
                check_runs
                    .get_or_create(&labels(&[
                        ("service", svc),
                        ("check", &c.name),
                        ("result", result),
                    ]))
                    .inc_by(c.runs.get(result).copied().unwrap_or(0));
            }
            if let Some(last) = &c.last {
                check_seconds
                    .get_or_create(&cl)
                    .set(last.duration_ms as f64 / 1000.0);
                check_passed
                    .get_or_create(&cl)
                    .set(i64::from(last.outcome.passed()));
            }
        }
        for mode in ["table", "stateless", "transition"] {
            fast_path
                .get_or_create(&labels(&[("service", svc), ("mode", mode)]))
                .set(i64::from(s.fast_path == mode));
        }
    }
    scans
        .get_or_create(&labels(&[]))
        .inc_by(status.flow_table_scans);
    if let Some(fl) = &status.fleet {
        let l = labels(&[("cluster", &fl.cluster), ("host", &fl.host)]);
        fleet_reachable
            .get_or_create(&l)
            .set(i64::from(fl.reachable));
        fleet_unreachable
            .get_or_create(&l)
            .set(fl.unreachable_since_ms.map_or(0, |m| (m / 1000) as i64));
        for s in &status.services {
            fleet_diverged
                .get_or_create(&labels(&[("service", &s.name)]))
                .set(i64::from(fl.diverged.contains(&s.name)));
        }
    }
    for (k, v) in &status.counters {
        xdp.get_or_create(&labels(&[("event", k)])).inc_by(*v);
    }
    for name in &status.unserved {
        serving
            .get_or_create(&labels(&[("interface", name)]))
            .set(0);
    }
    for i in &status.interfaces {
        if !status.unserved.contains(&i.name) {
            serving
                .get_or_create(&labels(&[("interface", &i.name)]))
                .set(1);
        }
        attached
            .get_or_create(&labels(&[
                ("interface", &i.name),
                ("mode", i.mode.as_str()),
            ]))
            .set(1);
        attachment
            .get_or_create(&labels(&[
                ("interface", &i.name),
                ("mode", i.mode.as_str()),
                ("reason", &i.reason),
            ]))
            .set(1);
    }
    f.registry.register(
        "bgswitch_durable_write_duration_seconds",
        help("How long each change took to become durable before the data plane followed it (the journal line written and fdatasynced, or a fleet's etcd transaction), since the daemon started."),
        WriteTimes(status.durable_writes.clone()),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &f.registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scraper_chooses_the_format() {
        use Format::*;
        for (accept, want) in [
            (None, OpenMetrics),
            (Some("*/*"), OpenMetrics),
            (Some("text/plain"), Prometheus),
            (Some("text/plain; version=0.0.4"), Prometheus),
            (Some("application/openmetrics-text; version=1.0.0"), OpenMetrics),
            // Prometheus 2.x's own Accept: OpenMetrics first.
            (
                Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
                OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0.2, text/plain;q=0.9"),
                Prometheus,
            ),
            (Some("text/plain;q=0"), OpenMetrics),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples_and_has_no_eof() {
        let om = "# HELP a_b Packets switched.\n# TYPE a_b counter\na_b_total{x=\"1\"} 5\n# HELP g Live.\n# TYPE g gauge\ng 0\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_b_total Packets switched.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 5\n# HELP g Live.\n# TYPE g gauge\ng 0\n"
        );
    }

    #[test]
    fn durable_writes_are_a_cumulative_histogram_in_seconds() {
        use std::time::Duration;
        let mut status = Status::default();
        for us in [50, 300, 350, 10_000_000] {
            status.durable_writes.observe(Duration::from_micros(us));
        }
        let text = render(&status);
        let name = "bgswitch_durable_write_duration_seconds";
        for want in [
            format!("# TYPE {name} histogram"),
            format!("{name}_count 4"),
            format!("{name}_bucket{{le=\"0.0001\"}} 1"),
            format!("{name}_bucket{{le=\"0.0002\"}} 1"),
            format!("{name}_bucket{{le=\"0.0004\"}} 3"),
            format!("{name}_bucket{{le=\"6.5536\"}} 3"),
            format!("{name}_bucket{{le=\"+Inf\"}} 4"),
        ] {
            assert!(text.lines().any(|l| l == want), "{want} in:\n{text}");
        }
        let sum = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_sum ")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((sum - 10.0007).abs() < 1e-9, "{sum}");
        // The Prometheus text format keeps it as it is.
        assert!(to_prometheus_text(&text).contains(&format!("# TYPE {name} histogram")));
        // A daemon without changes yet: zero counts in every bucket.
        let empty = render(&Status::default());
        assert!(empty
            .lines()
            .any(|l| l == format!("{name}_bucket{{le=\"+Inf\"}} 0")));
    }

    #[test]
    fn every_help_text_ends_with_one_period() {
        let text = render(&Status::default());
        for l in text.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(l.ends_with('.') && !l.ends_with(".."), "{l}");
        }
        assert!(text.lines().any(|l| l.starts_with("# HELP ")));
    }
}
