//! The desired state and the rules that change it: colours, generations,
//! flip and rollback. Pure: no IO, no clocks (callers pass the time in), and
//! no knowledge of the config file (the config builds these types, not the
//! other way round).
//!
//! This file holds the types; `rules.rs` the changes (flip, rollback,
//! shift, preview, confirm, undo, the end of a guard) and their tests.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// Blue or green.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Blue,
    Green,
}

impl Colour {
    pub const BOTH: [Colour; 2] = [Colour::Blue, Colour::Green];

    pub const fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }
    /// The value the data plane uses (`bgswitch_common::BLUE`/`GREEN`).
    pub const fn index(self) -> u32 {
        match self {
            Colour::Blue => bgswitch_common::BLUE,
            Colour::Green => bgswitch_common::GREEN,
        }
    }
    pub const fn from_index(i: u32) -> Colour {
        if i == bgswitch_common::GREEN {
            Colour::Green
        } else {
            Colour::Blue
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        })
    }
}

impl FromStr for Colour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Colour::Blue),
            "green" => Ok(Colour::Green),
            _ => Err(format!("'{s}' is not blue or green")),
        }
    }
}

/// What kind of change a journal entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Flip,
    Rollback,
    /// The daemon rolled back by itself (watch or confirmation deadline).
    AutoRollback,
    Shift,
    PreviewAdd,
    PreviewDel,
    Confirm,
    Undo,
    /// A flip's watch ended without a rollback (an event: traffic, the
    /// generation and the service's last change stay as they were).
    WatchPassed,
    /// A flip's watch and confirmation deadline dropped because no rollback
    /// could be made (an event, like `WatchPassed`).
    GuardCleared,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flip => "flip",
            Self::Rollback => "rollback",
            Self::AutoRollback => "automatic rollback",
            Self::Shift => "shift",
            Self::PreviewAdd => "preview add",
            Self::PreviewDel => "preview del",
            Self::Confirm => "confirm",
            Self::Undo => "undo",
            Self::WatchPassed => "watch passed",
            Self::GuardCleared => "guard cleared",
        })
    }
}

/// The part of a service's state a change can alter, before and after.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub active: Option<Colour>,
    /// Share of new flows sent to the idle colour, in basis points.
    pub canary_bp: u32,
    /// Source prefixes whose new flows go to the idle colour.
    pub preview: Vec<String>,
}

/// One change of a service's state (also a journal line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub generation_before: u64,
    pub generation: u64,
    pub from: Colour,
    pub to: Colour,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// Who asked (socket peer credentials, or "bgswitch" for the daemon).
    pub user: String,
    pub reason: Option<String>,
    /// `--force`: open flows were moved and/or a health refusal overridden.
    pub forced: bool,
    /// The user's checks that decided the change (before a flip or shift:
    /// passed, or skipped by `--force`; during a watch: the one that
    /// failed), or its refusal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckRecord>,
    /// The host it was made on (a fleet's journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Made on this host alone (`--local`), not through the fleet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    #[serde(default)]
    pub before: Snapshot,
    #[serde(default)]
    pub after: Snapshot,
}

impl Change {
    /// What the change altered, in words: the colour (`blue → green`), the
    /// canary share (`canary 25.00% → 0.00% of new flows to green`), each
    /// preview prefix added or deleted (`preview del 0.0.0.0/0`), joined by
    /// "; " — or, for a change of none of them, what it did (`green
    /// confirmed`, `no change of traffic`).
    pub fn describe(&self) -> String {
        let (b, a) = (&self.before, &self.after);
        let mut parts = Vec::new();
        if self.from != self.to
            || matches!(
                self.kind,
                ChangeKind::Flip | ChangeKind::Rollback | ChangeKind::AutoRollback
            )
        {
            parts.push(format!("{} → {}", self.from, self.to));
        }
        if b.canary_bp != a.canary_bp {
            parts.push(format!(
                "canary {:.2}% → {:.2}% of new flows to {}",
                f64::from(b.canary_bp) / 100.0,
                f64::from(a.canary_bp) / 100.0,
                self.to.other()
            ));
        }
        for p in a.preview.iter().filter(|p| !b.preview.contains(p)) {
            parts.push(format!("preview add {p}"));
        }
        for p in b.preview.iter().filter(|p| !a.preview.contains(p)) {
            parts.push(format!("preview del {p}"));
        }
        if parts.is_empty() {
            return match self.kind {
                ChangeKind::Confirm => format!("{} confirmed", self.to),
                _ => "no change of traffic".into(),
            };
        }
        parts.join("; ")
    }
}

/// A change `undo` can take back: a change of traffic (flip, rollback,
/// automatic rollback, shift, preview add or del) and the state before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoStep {
    pub kind: ChangeKind,
    /// The generation the change made.
    pub generation: u64,
    pub before: Snapshot,
}

/// Steps `undo` can go back per service.
pub const UNDO_KEPT: usize = 32;

/// Who asks for a change, when, and why.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub user: String,
    pub reason: Option<String>,
    pub force: bool,
    pub at_ms: u64,
    /// The checks that cleared the change (carried into its `Change`).
    pub checks: Vec<CheckRecord>,
    /// `--local`: this host alone (a fleet's emergency path).
    pub local: bool,
}

/// When a user's check runs (`[[service.check]] when`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckPhase {
    /// Against the target colour before a flip (or a shift to a non-zero
    /// share) is made; a failure refuses it.
    BeforeFlip,
    /// Every `interval` against the new colour while a flip is watched; a
    /// failure rolls back.
    DuringWatch,
    /// `bgswitch check`: asked for, deciding nothing.
    OnDemand,
}

impl fmt::Display for CheckPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BeforeFlip => "before-flip",
            Self::DuringWatch => "during-watch",
            Self::OnDemand => "on demand",
        })
    }
}

/// How one run of a user's check ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CheckOutcome {
    /// Exited 0.
    Passed,
    /// Exited non-zero (`code`) or was killed by a signal (`signal`).
    Failed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// Killed, with its process group, at its timeout.
    Timeout { after_ms: u64 },
    /// Could not be started (a missing user or program, fork failed, …).
    Error { why: String },
    /// Not run: `--force` overrode the checks.
    Skipped,
}

impl CheckOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, Self::Passed | Self::Skipped)
    }

    /// The metrics label: passed, failed, timeout, error, skipped.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed { .. } => "failed",
            Self::Timeout { .. } => "timeout",
            Self::Error { .. } => "error",
            Self::Skipped => "skipped",
        }
    }
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passed => f.write_str("passed"),
            Self::Failed {
                code: Some(c),
                signal: _,
            } => write!(f, "failed: exit status {c}"),
            Self::Failed {
                code: None,
                signal: Some(s),
            } => write!(f, "failed: killed by signal {s}"),
            Self::Failed { .. } => f.write_str("failed"),
            Self::Timeout { after_ms } => write!(
                f,
                "timed out after {:.1} s (killed with its process group)",
                *after_ms as f64 / 1000.0
            ),
            Self::Error { why } => write!(f, "could not run: {why}"),
            Self::Skipped => f.write_str("skipped (--force)"),
        }
    }
}

/// One run of a user's check (`[[service.check]]`): what ran against
/// which colour, when, how it ended, and the tail of its output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub name: String,
    pub phase: CheckPhase,
    pub colour: Colour,
    /// Unix time in milliseconds when it started.
    pub at_ms: u64,
    pub duration_ms: u64,
    #[serde(flatten)]
    pub outcome: CheckOutcome,
    /// The last lines of its output (stdout and stderr together).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
}

impl CheckRecord {
    /// One line: `check 'checkout' against green: failed: exit status 1
    /// (0.4 s); last output: …`.
    pub fn describe(&self) -> String {
        let last: Vec<&str> = self
            .output
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let tail = last[last.len().saturating_sub(3)..].join(" | ");
        format!(
            "check '{}' against {}: {} ({:.1} s){}",
            self.name,
            self.colour,
            self.outcome,
            self.duration_ms as f64 / 1000.0,
            if tail.is_empty() || self.outcome.passed() {
                String::new()
            } else {
                format!("; last output: {tail}")
            }
        )
    }
}

/// A watch after a flip: roll back if the new colour fails before `until_ms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    pub colour: Colour,
    pub started_ms: u64,
    pub until_ms: u64,
    /// Errors (backend RSTs + unanswered SYNs) per new flow that trigger a rollback.
    pub max_error_rate: Option<f64>,
}

/// A dead-man's switch: roll back unless confirmed before `deadline_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirm {
    pub colour: Colour,
    pub deadline_ms: u64,
}

/// The durable state of one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Index into the data plane's per-service arrays; stable across restarts.
    pub id: u32,
    pub active: Colour,
    /// Bumped by every change.
    pub generation: u64,
    /// The colour before the last flip: where `rollback` goes.
    pub previous: Option<Colour>,
    #[serde(default)]
    pub canary_bp: u32,
    #[serde(default)]
    pub preview: Vec<String>,
    #[serde(default)]
    pub watch: Option<Watch>,
    #[serde(default)]
    pub confirm: Option<Confirm>,
    /// Why the daemon last rolled back by itself (cleared by the next change).
    #[serde(default)]
    pub rolled_back: Option<String>,
    #[serde(default)]
    pub flips: u64,
    #[serde(default)]
    pub rollbacks: u64,
    /// The most recent changes, oldest first (at most [`HISTORY_KEPT`]; state
    /// files of older versions may hold more, cut at the next change).
    pub history: Vec<Change>,
    /// The changes `undo` takes back, newest last (at most [`UNDO_KEPT`]):
    /// an undo takes the newest off, so undos walk back change by change.
    #[serde(default)]
    pub undo: Vec<UndoStep>,
}

/// Changes kept per service in the state (the last, which status shows); the
/// journal keeps them all, and `history` reads it.
pub const HISTORY_KEPT: usize = 1;

/// What a running data plane has for a service (see
/// `DesiredState::adopt_running`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub id: u32,
    pub active: Colour,
    pub canary_bp: u32,
    /// Its preview prefixes ("ADDR/LEN").
    pub preview: Vec<String>,
}

/// Everything the daemon must remember across restarts and reboots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub services: BTreeMap<String, ServiceState>,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("no service named '{0}'")]
    UnknownService(String),
    #[error("service '{0}' has no flip to roll back")]
    NothingToRollBack(String),
    #[error("no free service slot: at most {0} services")]
    TooManyServices(u32),
    #[error("{0}")]
    Invalid(String),
}

/// The outcome of a flip request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlipOutcome {
    Changed(Change),
    /// Already on the requested colour; nothing changed.
    Unchanged {
        active: Colour,
        generation: u64,
    },
}

/// Guards attached to a flip.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlipGuards {
    /// Watch for this long (ms) after the flip.
    pub watch_ms: Option<u64>,
    pub max_error_rate: Option<f64>,
    /// Roll back unless confirmed within this long (ms).
    pub confirm_within_ms: Option<u64>,
}

/// Most preview prefixes per service.
pub const MAX_PREVIEW_PER_SERVICE: usize = 64;

/// Parses "ADDR/LEN" (or a bare address) into a normalised prefix: host bits
/// cleared, e.g. "198.18.0.7/24" → (198.18.0.0, 24).
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), ModelError> {
    let bad = || ModelError::Invalid(format!("'{text}' is not a prefix like 198.18.0.0/24"));
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = addr.trim().parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len {
        None => max,
        Some(l) => l.trim().parse().map_err(|_| bad())?,
    };
    if len > max {
        return Err(bad());
    }
    let ip = match ip {
        IpAddr::V4(v4) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    };
    Ok((ip, len))
}

mod rules;
