//! The control socket's protocol: one JSON object per line each way.
//!
//! A client writes a [`Request`] line and reads a [`Response`] line; it may
//! send several requests on one connection. Lines longer than
//! [`MAX_REQUEST_BYTES`] are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::AttachMode,
    health::Health,
    model::{Change, CheckPhase, CheckRecord, Colour, Confirm, Watch},
    state::{FleetLocal, FleetStatus, JournalEntry},
};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// New flows of `service` go to `to` (default: the other colour).
    Flip {
        service: String,
        #[serde(default)]
        to: Option<Colour>,
        /// Move open flows too, and switch even to an unhealthy pool.
        #[serde(default)]
        force: bool,
        #[serde(default)]
        reason: Option<String>,
        /// Watch the new colour this long (ms) and roll back if it fails.
        #[serde(default)]
        watch_ms: Option<u64>,
        /// With `watch_ms`: errors per new flow that trigger a rollback.
        #[serde(default)]
        max_error_rate: Option<f64>,
        /// Roll back unless `confirm` arrives within this long (ms).
        #[serde(default)]
        confirm_within_ms: Option<u64>,
        /// This host alone (a fleet's emergency path: etcd is not asked).
        #[serde(default)]
        local: bool,
    },
    /// Send `percent` of new flows to the idle colour `to` (0 ends it).
    Shift {
        service: String,
        to: Colour,
        percent: f64,
        #[serde(default)]
        reason: Option<String>,
        /// Skip the before-flip checks (journalled as forced).
        #[serde(default)]
        force: bool,
        /// This host alone (a fleet's emergency path: etcd is not asked).
        #[serde(default)]
        local: bool,
    },
    /// Run the service's before-flip checks against `colour` (default: the
    /// idle one) and report; changes nothing.
    Check {
        service: String,
        #[serde(default)]
        colour: Option<Colour>,
    },
    /// Add, remove or list preview prefixes.
    Preview {
        service: String,
        action: PreviewAction,
        #[serde(default)]
        cidr: Option<String>,
        /// Accept a /0 prefix (every client).
        #[serde(default)]
        force: bool,
        #[serde(default)]
        reason: Option<String>,
        /// This host alone (a fleet's emergency path: etcd is not asked).
        #[serde(default)]
        local: bool,
    },
    /// Confirm a flip made with a confirmation deadline.
    Confirm {
        service: String,
        #[serde(default)]
        reason: Option<String>,
        /// This host alone (a fleet's emergency path: etcd is not asked).
        #[serde(default)]
        local: bool,
    },
    /// The journal of a service.
    History { service: String },
    /// Take back the service's newest change of traffic not taken back yet.
    Undo {
        service: String,
        #[serde(default)]
        reason: Option<String>,
        /// This host alone (a fleet's emergency path: etcd is not asked).
        #[serde(default)]
        local: bool,
    },
    /// Back to the colour before the last flip.
    Rollback {
        service: String,
        #[serde(default)]
        reason: Option<String>,
        /// This host alone (a fleet's emergency path: etcd is not asked).
        #[serde(default)]
        local: bool,
    },
    /// The fleet's desired state and every host's view (`status --fleet`).
    Fleet,
    /// The state of one or all services, interfaces and counters.
    Status {
        #[serde(default)]
        service: Option<String>,
    },
    /// Re-read the config file; a bad one changes nothing.
    Reload,
    /// Remove the programs and every pin, then exit.
    Detach,
}

impl Request {
    /// Whether the request asks for this host alone (`--local`).
    pub fn local(&self) -> bool {
        match self {
            Self::Flip { local, .. }
            | Self::Shift { local, .. }
            | Self::Preview { local, .. }
            | Self::Confirm { local, .. }
            | Self::Undo { local, .. }
            | Self::Rollback { local, .. } => *local,
            _ => false,
        }
    }

    /// The request in words, as the command line says it (for the log):
    /// `preview add 198.18.0.0/24 on web`, `flip web to green, forced`.
    pub fn describe(&self) -> String {
        let words = self.words();
        if self.local() {
            words + ", on this host alone (--local)"
        } else {
            words
        }
    }

    fn words(&self) -> String {
        let why = |r: &Option<String>| {
            r.as_deref()
                .map(|r| format!(" (reason: {r})"))
                .unwrap_or_default()
        };
        let ms = |m: u64| format!("{:.1} s", m as f64 / 1000.0);
        match self {
            Self::Flip {
                service,
                to,
                force,
                reason,
                watch_ms,
                max_error_rate,
                confirm_within_ms,
                ..
            } => {
                let mut t = format!("flip {service}");
                if let Some(c) = to {
                    t += &format!(" to {c}");
                }
                if *force {
                    t += ", forced";
                }
                if let Some(w) = watch_ms {
                    t += &format!(", watched for {}", ms(*w));
                    if let Some(r) = max_error_rate {
                        t += &format!(" (error rate at most {r})");
                    }
                }
                if let Some(c) = confirm_within_ms {
                    t += &format!(", to be confirmed within {}", ms(*c));
                }
                t + &why(reason)
            }
            Self::Shift {
                service,
                to,
                percent,
                reason,
                force,
                ..
            } => format!(
                "shift {percent}% of {service}'s new flows to {to}{}{}",
                if *force { ", forced" } else { "" },
                why(reason)
            ),
            Self::Check {
                service,
                colour: None,
            } => format!("check {service}"),
            Self::Check {
                service,
                colour: Some(c),
            } => format!("check {service} against {c}"),
            Self::Preview {
                service,
                action,
                cidr,
                force,
                reason,
                ..
            } => format!(
                "preview {}{} on {service}{}{}",
                match action {
                    PreviewAction::Add => "add",
                    PreviewAction::Del => "del",
                    PreviewAction::List => "list",
                },
                cidr.as_deref().map(|c| format!(" {c}")).unwrap_or_default(),
                if *force { ", forced" } else { "" },
                why(reason)
            ),
            Self::Confirm {
                service, reason, ..
            } => format!("confirm {service}{}", why(reason)),
            Self::History { service } => format!("history of {service}"),
            Self::Undo {
                service, reason, ..
            } => format!("undo {service}{}", why(reason)),
            Self::Rollback {
                service, reason, ..
            } => format!("rollback {service}{}", why(reason)),
            Self::Fleet => "status --fleet".into(),
            Self::Status { service: None } => "status".into(),
            Self::Status { service: Some(s) } => format!("status of {s}"),
            Self::Reload => "reload".into(),
            Self::Detach => "detach".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewAction {
    Add,
    Del,
    List,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// One line saying what went wrong (when `ok` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One line saying what happened (when `ok` is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<JournalEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Vec<String>>,
    /// The user's checks that ran for this request (a flip or shift they
    /// cleared or refused, `check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<CheckRecord>>,
    /// `status --fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            ..Self::default()
        }
    }
    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Self::default()
        }
    }
}

/// Everything `bgswitch status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    /// Global data plane counters (passed, malformed, fragments, FIB outcomes, …).
    pub counters: BTreeMap<String, u64>,
    /// Whole reads of the flow table by this daemon (for live-flow counts,
    /// and for transitions that may end), since it started.
    #[serde(default)]
    pub flow_table_scans: u64,
    /// Whether new IPv4 flows take their backend's kept next hop (the
    /// host's routing rules select by destination alone, read once a
    /// second), or each looks its own up.
    #[serde(default)]
    pub backend_hops: bool,
    /// Where the pins are, and whether the data plane outlives the daemon.
    #[serde(default)]
    pub pins: Option<PinsStatus>,
    pub config: String,
    pub pid: u32,
    /// This host's view of its fleet (`[fleet]`).
    #[serde(default)]
    pub fleet: Option<FleetLocal>,
    /// Configured interfaces the program does not serve now.
    #[serde(default)]
    pub unserved: Vec<String>,
    /// How long this daemon took to make its changes durable.
    #[serde(default)]
    pub durable_writes: DurableWrites,
}

/// Upper bounds (seconds) of [`DurableWrites`]' buckets: 100 µs doubling
/// to 6.6 s, the range of a disk's cache flush up to an etcd that barely
/// answers.
pub const DURABLE_WRITE_BUCKETS: [f64; 17] = {
    let mut b = [0.0001; 17];
    let mut i = 1;
    while i < b.len() {
        b[i] = b[i - 1] * 2.0;
        i += 1;
    }
    b
};

/// The time each change took to become durable before the data plane
/// followed it — the desired-state store's record: the local journal's
/// line written and fdatasynced, or a fleet's etcd transaction — since the
/// daemon started. A flip waits for it; a slow disk or etcd shows here
/// first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DurableWrites {
    pub count: u64,
    pub sum_seconds: f64,
    /// Changes per bucket of [`DURABLE_WRITE_BUCKETS`] (not cumulative),
    /// and a last one for longer ones.
    pub buckets: Vec<u64>,
    pub last_seconds: Option<f64>,
}

impl DurableWrites {
    pub fn observe(&mut self, took: std::time::Duration) {
        let s = took.as_secs_f64();
        if self.buckets.len() != DURABLE_WRITE_BUCKETS.len() + 1 {
            self.buckets = vec![0; DURABLE_WRITE_BUCKETS.len() + 1];
        }
        let i = DURABLE_WRITE_BUCKETS
            .iter()
            .position(|&le| s <= le)
            .unwrap_or(DURABLE_WRITE_BUCKETS.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_seconds += s;
        self.last_seconds = Some(s);
    }

    /// The mean over the changes, in seconds.
    pub fn mean_seconds(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_seconds / self.count as f64)
    }
}

/// Where the data plane is pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinsStatus {
    /// The configured bpffs.
    pub bpffs: String,
    /// Whether the pins (and with them the attachments and maps) outlive
    /// the daemon: a daemon only runs with pins that do.
    pub outlive_daemon: bool,
    /// Where they are, and why.
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub active: Colour,
    pub generation: u64,
    pub previous: Option<Colour>,
    pub colours: Vec<ColourStatus>,
    pub last_change: Option<Change>,
    /// Share of new flows sent to the idle colour, in percent.
    pub canary_percent: f64,
    pub preview: Vec<String>,
    pub watch: Option<Watch>,
    pub confirm: Option<Confirm>,
    /// Why the daemon last rolled back by itself, if it did since the last change.
    pub rolled_back: Option<String>,
    pub flips: u64,
    pub rollbacks: u64,
    /// Whether `[service.health]` checks run.
    pub health_checks: bool,
    /// How packets find their backend: "table" (every flow recorded),
    /// "stateless" (a stable period: the active pool's hash, nothing
    /// recorded) or "transition" (records, and connections of the last
    /// stable period keep its pool).
    pub fast_path: String,
    /// In a transition: how far it is.
    #[serde(default)]
    pub transition: Option<TransitionStatus>,
    /// The user's checks (`[[service.check]]`).
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
}

/// One of a service's checks: how it is configured, its last run, its
/// runs since the daemon started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStatus {
    pub name: String,
    pub when: Vec<CheckPhase>,
    pub user: String,
    pub timeout_ms: u64,
    pub interval_ms: u64,
    /// A run is under way (a gate or a watch).
    pub running: bool,
    pub last: Option<CheckRecord>,
    /// Runs since the daemon started, by result (passed, failed, timeout,
    /// error).
    pub runs: BTreeMap<String, u64>,
}

/// A stateless service's transition (see `ServiceStatus::fast_path`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionStatus {
    /// Seconds since the change that began it.
    pub since_s: u64,
    /// The TCP idle timeout, in seconds: it cannot end before.
    pub idle_timeout_s: u64,
    /// Live records whose backend is not the one the active pool's hash
    /// chooses (connections opened or recorded since the change): the
    /// stable period waits until there are none.
    pub disagreeing: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColourStatus {
    pub colour: Colour,
    pub active: bool,
    pub backends: Vec<BackendStatus>,
    /// Open flows pinned to this colour, counted in the kernel's flow table.
    pub live_flows: u64,
    /// This colour may have open connections no record holds (those of a
    /// stable period of a stateless service), which `live_flows` does not
    /// count: it is not drained before its transition is over.
    pub untracked: bool,
    /// Flow records in the table (live or finished but not yet evicted).
    pub recorded_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub backend_rsts: u64,
    pub syn_acks: u64,
    /// TCP flows in the table whose SYN got no answer in time.
    pub unanswered_syns: u64,
    /// Flows sent here by a preview prefix.
    pub preview_flows: u64,
    /// Every backend up (always true without health checks).
    pub pool_healthy: bool,
    /// No backend is up: the pool serves with all of them (fail open).
    pub all_down: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub health: Health,
    pub health_error: Option<String>,
    /// Receives new flows now.
    pub serving: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// How the program meets it: native, generic (XDP), tc, tc-netlink.
    pub mode: AttachMode,
    pub adopted: bool,
    /// Why this mode: the setting, or what `auto` saw.
    #[serde(default)]
    pub reason: String,
    /// The first mode `auto` tried was refused; why.
    pub fallback_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_input_is_refused() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"flip","service":"web","to":"green"}"#).unwrap();
        assert_eq!(
            r,
            Request::Flip {
                service: "web".into(),
                to: Some(Colour::Green),
                force: false,
                reason: None,
                watch_ms: None,
                max_error_rate: None,
                confirm_within_ms: None,
                local: false,
            }
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"flip"}"#,
            r#"{"cmd":"flip","service":"web","to":"red"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"not json"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
