//! The desired state and the rules that change it: colours, generations,
//! flip and rollback. Pure: no IO, no clocks (callers pass the time in).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::config::Config;

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
    #[serde(default)]
    pub before: Snapshot,
    #[serde(default)]
    pub after: Snapshot,
}

/// Who asks for a change, when, and why.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub user: String,
    pub reason: Option<String>,
    pub force: bool,
    pub at_ms: u64,
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

impl DesiredState {
    /// Makes the state match the configured services: new services get the
    /// lowest free id and start on blue; services no longer configured are
    /// forgotten. Returns the names of the added and removed services.
    pub fn reconcile(&mut self, config: &Config) -> Result<(Vec<String>, Vec<String>), ModelError> {
        let wanted: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted.contains(&n.as_str()))
            .cloned()
            .collect();
        for n in &removed {
            self.services.remove(n);
        }
        let mut added = Vec::new();
        for name in wanted {
            if self.services.contains_key(name) {
                continue;
            }
            let used: Vec<u32> = self.services.values().map(|s| s.id).collect();
            let id = (0..bgswitch_common::MAX_SERVICES)
                .find(|i| !used.contains(i))
                .ok_or(ModelError::TooManyServices(bgswitch_common::MAX_SERVICES))?;
            self.services.insert(
                name.to_string(),
                ServiceState {
                    id,
                    active: Colour::Blue,
                    generation: 1,
                    previous: None,
                    canary_bp: 0,
                    preview: Vec::new(),
                    watch: None,
                    confirm: None,
                    rolled_back: None,
                    flips: 0,
                    rollbacks: 0,
                    history: Vec::new(),
                },
            );
            added.push(name.to_string());
        }
        Ok((added, removed))
    }

    /// Services new to the state (`added` by `reconcile`) that a running
    /// data plane already serves (`running`: name → what it has) keep what it
    /// has — colour, canary share, preview prefixes (those that parse) and,
    /// where no other service holds it, id —
    /// instead of starting on blue: a state directory lost or replaced while
    /// the pinned data plane forwarded must not flip traffic back. The other
    /// added services take the lowest free ids. Returns the names adopted.
    pub fn adopt_running(
        &mut self,
        added: &[String],
        running: &BTreeMap<String, Running>,
    ) -> Vec<String> {
        let mut taken: BTreeSet<u32> = self
            .services
            .iter()
            .filter(|(n, _)| !added.contains(n))
            .map(|(_, s)| s.id)
            .collect();
        let mut adopted = Vec::new();
        let mut unplaced = Vec::new();
        for name in added {
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            match running.get(name) {
                Some(r) => {
                    s.active = r.active;
                    s.canary_bp = r.canary_bp.min(control_full());
                    s.preview = r
                        .preview
                        .iter()
                        .filter_map(|p| parse_cidr(p).ok())
                        .map(|(ip, len)| format!("{ip}/{len}"))
                        .take(MAX_PREVIEW_PER_SERVICE)
                        .collect();
                    adopted.push(name.clone());
                    if r.id < bgswitch_common::MAX_SERVICES && taken.insert(r.id) {
                        s.id = r.id;
                    } else {
                        unplaced.push(name);
                    }
                }
                None => unplaced.push(name),
            }
        }
        for name in unplaced {
            let id = (0..bgswitch_common::MAX_SERVICES)
                .find(|i| !taken.contains(i))
                .expect("reconcile found an id for every service");
            taken.insert(id);
            if let Some(s) = self.services.get_mut(name) {
                s.id = id;
            }
        }
        adopted
    }

    /// Cuts every service's history to [`HISTORY_KEPT`] (state files of
    /// older versions kept more).
    pub fn trim_history(&mut self) {
        self.services
            .values_mut()
            .for_each(ServiceState::trim_history);
    }

    pub fn service(&self, name: &str) -> Result<&ServiceState, ModelError> {
        self.services
            .get(name)
            .ok_or_else(|| ModelError::UnknownService(name.to_string()))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut ServiceState, ModelError> {
        self.services
            .get_mut(name)
            .ok_or_else(|| ModelError::UnknownService(name.to_string()))
    }

    /// New flows of `name` go to `to` (default: the other colour). Ends any
    /// canary share (its idle colour changes) and earlier guards.
    pub fn flip(
        &mut self,
        name: &str,
        to: Option<Colour>,
        req: &Request,
        guards: &FlipGuards,
    ) -> Result<FlipOutcome, ModelError> {
        let s = self.service_mut(name)?;
        let to = to.unwrap_or(s.active.other());
        if to == s.active && !req.force && guards == &FlipGuards::default() {
            return Ok(FlipOutcome::Unchanged {
                active: s.active,
                generation: s.generation,
            });
        }
        let change = s.apply(ChangeKind::Flip, req, |s| {
            if to != s.active {
                s.previous = Some(s.active);
            }
            s.active = to;
            s.canary_bp = 0;
            s.watch = guards.watch_ms.map(|ms| Watch {
                colour: to,
                started_ms: req.at_ms,
                until_ms: req.at_ms + ms,
                max_error_rate: guards.max_error_rate,
            });
            s.confirm = guards.confirm_within_ms.map(|ms| Confirm {
                colour: to,
                deadline_ms: req.at_ms + ms,
            });
        });
        s.flips += 1;
        Ok(FlipOutcome::Changed(change))
    }

    /// Back to the colour before the last flip.
    pub fn rollback(&mut self, name: &str, req: &Request) -> Result<Change, ModelError> {
        self.roll_back(name, req, ChangeKind::Rollback)
    }

    /// The daemon's own rollback: a watch failed or a confirmation was missed.
    pub fn auto_rollback(
        &mut self,
        name: &str,
        why: &str,
        at_ms: u64,
    ) -> Result<Change, ModelError> {
        let req = Request {
            user: "bgswitch".into(),
            reason: Some(why.to_string()),
            force: false,
            at_ms,
        };
        let c = self.roll_back(name, &req, ChangeKind::AutoRollback)?;
        self.service_mut(name)?.rolled_back = Some(why.to_string());
        Ok(c)
    }

    fn roll_back(
        &mut self,
        name: &str,
        req: &Request,
        kind: ChangeKind,
    ) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        let to = s
            .previous
            .filter(|p| *p != s.active)
            .ok_or_else(|| ModelError::NothingToRollBack(name.to_string()))?;
        let c = s.apply(kind, req, |s| {
            s.previous = Some(s.active);
            s.active = to;
            s.canary_bp = 0;
            s.watch = None;
            s.confirm = None;
        });
        s.rollbacks += 1;
        Ok(c)
    }

    /// Sends `basis_points` of new flows to the idle colour `to`.
    pub fn shift(
        &mut self,
        name: &str,
        to: Colour,
        basis_points: u32,
        req: &Request,
    ) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        if basis_points > control_full() {
            return Err(ModelError::Invalid(
                "the share must be within 0..=100 %".into(),
            ));
        }
        if to == s.active && basis_points != 0 {
            return Err(ModelError::Invalid(format!(
                "{to} is already active; shift sends part of new flows to the idle colour ({})",
                to.other()
            )));
        }
        Ok(s.apply(ChangeKind::Shift, req, |s| s.canary_bp = basis_points))
    }

    /// Adds a preview prefix (new flows from it reach the idle colour).
    pub fn preview_add(
        &mut self,
        name: &str,
        cidr: &str,
        req: &Request,
    ) -> Result<Change, ModelError> {
        let (ip, len) = parse_cidr(cidr)?;
        let text = format!("{ip}/{len}");
        let s = self.service_mut(name)?;
        if s.preview.contains(&text) {
            return Err(ModelError::Invalid(format!(
                "{text} is already a preview prefix of {name}"
            )));
        }
        if s.preview.len() >= MAX_PREVIEW_PER_SERVICE {
            return Err(ModelError::Invalid(format!(
                "at most {MAX_PREVIEW_PER_SERVICE} preview prefixes per service"
            )));
        }
        Ok(s.apply(ChangeKind::PreviewAdd, req, |s| s.preview.push(text)))
    }

    /// Removes a preview prefix.
    pub fn preview_del(
        &mut self,
        name: &str,
        cidr: &str,
        req: &Request,
    ) -> Result<Change, ModelError> {
        let (ip, len) = parse_cidr(cidr)?;
        let text = format!("{ip}/{len}");
        let s = self.service_mut(name)?;
        if !s.preview.contains(&text) {
            return Err(ModelError::Invalid(format!(
                "{text} is not a preview prefix of {name}"
            )));
        }
        Ok(s.apply(ChangeKind::PreviewDel, req, |s| {
            s.preview.retain(|p| *p != text)
        }))
    }

    /// Confirms a flip made with a confirmation deadline.
    pub fn confirm(&mut self, name: &str, req: &Request) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        if s.confirm.is_none() {
            return Err(ModelError::Invalid(format!(
                "{name} has no flip waiting for confirmation"
            )));
        }
        Ok(s.apply(ChangeKind::Confirm, req, |s| s.confirm = None))
    }

    /// Restores the state before `last` (the service's most recent change).
    pub fn undo(&mut self, name: &str, last: &Change, req: &Request) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        let Some(before_active) = last.before.active else {
            return Err(ModelError::Invalid(
                "the last change has no recorded state to restore".into(),
            ));
        };
        Ok(s.apply(ChangeKind::Undo, req, |s| {
            if before_active != s.active {
                s.previous = Some(s.active);
            }
            s.active = before_active;
            s.canary_bp = last.before.canary_bp;
            s.preview = last.before.preview.clone();
            s.watch = None;
            s.confirm = None;
        }))
    }

    /// Ends the watch of `name` that passed (an error if it has none): no
    /// change of traffic, so the generation and the service's last change
    /// stay. The event is returned for the journal (and `history`).
    pub fn end_watch(&mut self, name: &str, at_ms: u64) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        let Some(w) = s.watch.take() else {
            return Err(ModelError::Invalid(format!("{name} has no watch")));
        };
        let secs = w.until_ms.saturating_sub(w.started_ms) as f64 / 1000.0;
        let why = format!("{} watched for {secs:.1} s; no rollback", w.colour);
        Ok(s.event(ChangeKind::WatchPassed, at_ms, why))
    }

    /// Drops the watch and the confirmation deadline of `name` (an error if
    /// it has neither) when no rollback can be made: `why`. An event, like
    /// `end_watch`.
    pub fn clear_guard(&mut self, name: &str, why: &str, at_ms: u64) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        // Both taken (`|`, not `||`).
        if !(s.watch.take().is_some() | s.confirm.take().is_some()) {
            return Err(ModelError::Invalid(format!("{name} has no guard")));
        }
        Ok(s.event(ChangeKind::GuardCleared, at_ms, why.to_string()))
    }
}

const fn control_full() -> u32 {
    bgswitch_common::control::CANARY_FULL
}

impl ServiceState {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            active: Some(self.active),
            canary_bp: self.canary_bp,
            preview: self.preview.clone(),
        }
    }

    fn apply(
        &mut self,
        kind: ChangeKind,
        req: &Request,
        f: impl FnOnce(&mut ServiceState),
    ) -> Change {
        let before = self.snapshot();
        let from = self.active;
        f(self);
        if kind != ChangeKind::AutoRollback {
            self.rolled_back = None;
        }
        let change = Change {
            kind,
            generation_before: self.generation,
            generation: self.generation + 1,
            from,
            to: self.active,
            at_ms: req.at_ms,
            user: req.user.clone(),
            reason: req.reason.clone(),
            forced: req.force,
            before,
            after: self.snapshot(),
        };
        self.generation += 1;
        self.history.push(change.clone());
        self.trim_history();
        change
    }

    /// The daemon's record of something that changed no traffic (see
    /// `ChangeKind::WatchPassed`): not counted in the generation nor kept as
    /// the service's last change (`undo` undoes the change before it).
    fn event(&self, kind: ChangeKind, at_ms: u64, why: String) -> Change {
        Change {
            kind,
            generation_before: self.generation,
            generation: self.generation,
            from: self.active,
            to: self.active,
            at_ms,
            user: "bgswitch".into(),
            reason: Some(why),
            forced: false,
            before: self.snapshot(),
            after: self.snapshot(),
        }
    }

    fn trim_history(&mut self) {
        let extra = self.history.len().saturating_sub(HISTORY_KEPT);
        self.history.drain(..extra);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn cfg(names: &[&str]) -> Config {
        let mut text = String::from("interfaces = [\"eth0\"]\n");
        for (i, n) in names.iter().enumerate() {
            text += &format!(
                "[[service]]\nname = \"{n}\"\nvip = \"10.0.0.{}:80\"\nprotocol = \"tcp\"\nblue = [\"10.1.{i}.1:80\"]\ngreen = [\"10.2.{i}.1:80\"]\n",
                i + 1
            );
        }
        config::parse(Path::new("t"), &text).unwrap()
    }

    fn req() -> Request {
        Request {
            user: "root".into(),
            reason: Some("release 42".into()),
            force: false,
            at_ms: 1000,
        }
    }

    #[test]
    fn ids_are_stable_and_reused_lowest_first() {
        let mut s = DesiredState::default();
        let (added, removed) = s.reconcile(&cfg(&["a", "b", "c"])).unwrap();
        assert_eq!(added, ["a", "b", "c"]);
        assert!(removed.is_empty());
        assert_eq!(s.services["b"].id, 1);
        let (added, removed) = s.reconcile(&cfg(&["a", "c", "d"])).unwrap();
        assert_eq!(added, ["d"]);
        assert_eq!(removed, ["b"]);
        assert_eq!(s.services["a"].id, 0);
        assert_eq!(s.services["c"].id, 2);
        assert_eq!(s.services["d"].id, 1);
    }

    #[test]
    fn flip_rollback_and_generations() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["web"])).unwrap();
        assert_eq!(
            s.rollback("web", &req()),
            Err(ModelError::NothingToRollBack("web".into()))
        );
        let FlipOutcome::Changed(c) = s.flip("web", None, &req(), &FlipGuards::default()).unwrap()
        else {
            panic!("flip must change")
        };
        assert_eq!(
            (c.from, c.to, c.generation_before, c.generation),
            (Colour::Blue, Colour::Green, 1, 2)
        );
        assert_eq!(c.reason.as_deref(), Some("release 42"));
        assert_eq!(
            s.flip("web", Some(Colour::Green), &req(), &FlipGuards::default())
                .unwrap(),
            FlipOutcome::Unchanged {
                active: Colour::Green,
                generation: 2
            }
        );
        let r = s.rollback("web", &req()).unwrap();
        assert_eq!(
            (r.kind, r.from, r.to, r.generation),
            (ChangeKind::Rollback, Colour::Green, Colour::Blue, 3)
        );
        // A rollback of the rollback goes forward again.
        let r = s.rollback("web", &req()).unwrap();
        assert_eq!(r.to, Colour::Green);
        assert_eq!(s.services["web"].history, [r]);
        assert_eq!(
            s.flip("nope", None, &req(), &FlipGuards::default()),
            Err(ModelError::UnknownService("nope".into()))
        );
    }

    #[test]
    fn forced_flip_to_same_colour_is_a_change() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["web"])).unwrap();
        let mut r = req();
        r.force = true;
        let FlipOutcome::Changed(c) = s
            .flip("web", Some(Colour::Blue), &r, &FlipGuards::default())
            .unwrap()
        else {
            panic!("forced flip must be recorded")
        };
        assert!(c.forced);
        assert_eq!(s.services["web"].previous, None);
    }

    #[test]
    fn services_a_running_data_plane_serves_keep_its_colour_share_and_id() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["old"])).unwrap();
        s.services.get_mut("old").unwrap().id = 2;
        let (added, _) = s.reconcile(&cfg(&["old", "a", "b", "c"])).unwrap();
        assert_eq!(added, ["a", "b", "c"]);
        let running = BTreeMap::from([
            // Its id is free: kept.
            (
                "a".to_string(),
                Running {
                    id: 5,
                    active: Colour::Green,
                    canary_bp: 250,
                    preview: vec!["198.18.0.0/24".into(), "not a prefix".into()],
                },
            ),
            // Its id is held by a service the state had: a free one.
            (
                "b".to_string(),
                Running {
                    id: 2,
                    active: Colour::Green,
                    canary_bp: 0,
                    preview: Vec::new(),
                },
            ),
        ]);
        assert_eq!(s.adopt_running(&added, &running), ["a", "b"]);
        let st = |n: &str| s.services[n].clone();
        assert_eq!(
            (st("a").id, st("a").active, st("a").canary_bp),
            (5, Colour::Green, 250)
        );
        assert_eq!(st("a").preview, ["198.18.0.0/24"]);
        assert_eq!((st("b").active, st("b").canary_bp), (Colour::Green, 0));
        assert_eq!((st("c").active, st("old").id), (Colour::Blue, 2));
        let mut ids: Vec<u32> = s.services.values().map(|v| v.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4, "ids stay distinct: {:?}", s.services);
        assert!(![2, 5].contains(&st("b").id) && ![2, 5].contains(&st("c").id));
        assert_eq!(st("a").generation, 1, "no change made");
    }

    #[test]
    fn shift_preview_confirm_undo_and_auto_rollback() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["web"])).unwrap();
        assert!(
            s.shift("web", Colour::Blue, 1000, &req()).is_err(),
            "blue is active"
        );
        assert!(s.shift("web", Colour::Green, 10_001, &req()).is_err());
        let c = s.shift("web", Colour::Green, 1000, &req()).unwrap();
        assert_eq!((c.before.canary_bp, c.after.canary_bp), (0, 1000));
        let c = s.preview_add("web", "198.18.0.7/24", &req()).unwrap();
        assert_eq!(c.after.preview, ["198.18.0.0/24"]);
        assert!(
            s.preview_add("web", "198.18.0.0/24", &req()).is_err(),
            "duplicate"
        );
        assert!(s.preview_add("web", "198.18.0.0/33", &req()).is_err());
        assert!(s.preview_del("web", "10.0.0.0/8", &req()).is_err());
        // Undo the preview: back to no prefixes, canary kept.
        let last = s.services["web"].history.last().cloned().unwrap();
        s.undo("web", &last, &req()).unwrap();
        assert!(s.services["web"].preview.is_empty());
        assert_eq!(s.services["web"].canary_bp, 1000);
        // A guarded flip ends the canary and records the guards.
        let g = FlipGuards {
            watch_ms: Some(5000),
            max_error_rate: Some(0.1),
            confirm_within_ms: Some(60_000),
        };
        let FlipOutcome::Changed(_) = s.flip("web", None, &req(), &g).unwrap() else {
            panic!()
        };
        let st = &s.services["web"];
        assert_eq!(st.canary_bp, 0);
        assert_eq!(st.watch.as_ref().unwrap().until_ms, 6000);
        assert_eq!(st.confirm.as_ref().unwrap().deadline_ms, 61_000);
        // The guard's end is an event: no generation, not the last change.
        let mut ended = s.clone();
        let gen = ended.services["web"].generation;
        let e = ended.end_watch("web", 6000).unwrap();
        assert_eq!(
            (e.kind, e.generation_before, e.generation, e.from, e.to),
            (
                ChangeKind::WatchPassed,
                gen,
                gen,
                Colour::Green,
                Colour::Green
            )
        );
        assert_eq!(
            e.reason.as_deref(),
            Some("green watched for 5.0 s; no rollback")
        );
        let st = &ended.services["web"];
        assert!(st.watch.is_none() && st.confirm.is_some());
        assert_eq!(st.history.last().unwrap().kind, ChangeKind::Flip);
        assert!(ended.end_watch("web", 6000).is_err(), "no watch left");
        let e = ended.clear_guard("web", "cannot", 7000).unwrap();
        assert_eq!((e.kind, e.generation), (ChangeKind::GuardCleared, gen));
        assert!(ended.services["web"].confirm.is_none());
        assert!(
            ended.clear_guard("web", "cannot", 7000).is_err(),
            "no guard left"
        );
        let c = s.auto_rollback("web", "green failed", 2000).unwrap();
        assert_eq!(
            (c.kind, c.to, c.user.as_str()),
            (ChangeKind::AutoRollback, Colour::Blue, "bgswitch")
        );
        let st = &s.services["web"];
        assert!(st.watch.is_none() && st.confirm.is_none());
        assert_eq!(st.rolled_back.as_deref(), Some("green failed"));
        assert_eq!((st.flips, st.rollbacks), (1, 1));
        assert!(
            s.confirm("web", &req()).is_err(),
            "nothing to confirm after the rollback"
        );
    }

    #[test]
    fn cidrs_are_normalised() {
        assert_eq!(
            parse_cidr("10.1.2.3/8").unwrap(),
            ("10.0.0.0".parse().unwrap(), 8)
        );
        assert_eq!(
            parse_cidr("10.1.2.3").unwrap(),
            ("10.1.2.3".parse().unwrap(), 32)
        );
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().1, 0);
        assert_eq!(
            parse_cidr("2001:db8::1/32").unwrap(),
            ("2001:db8::".parse().unwrap(), 32)
        );
        assert!(parse_cidr("10.0.0.0/40").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }

    #[test]
    fn history_is_bounded() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["web"])).unwrap();
        for _ in 0..(HISTORY_KEPT + 10) {
            s.flip("web", None, &req(), &FlipGuards::default()).unwrap();
        }
        let st = &s.services["web"];
        assert_eq!(st.history.len(), HISTORY_KEPT);
        assert_eq!(st.history.last().unwrap().generation, st.generation);
        // A state file of an older version, with more.
        let last = st.history.last().cloned().unwrap();
        let w = s.services.get_mut("web").unwrap();
        w.history = vec![last.clone(); 16];
        s.trim_history();
        assert_eq!(s.services["web"].history, vec![last; HISTORY_KEPT]);
    }
}
