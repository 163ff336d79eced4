//! The desired state and the rules that change it: colours, generations,
//! flip and rollback. Pure: no IO, no clocks (callers pass the time in).

use std::{collections::BTreeMap, fmt, str::FromStr};

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
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Flip,
    Rollback,
}

/// One change of a service's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub generation_before: u64,
    pub generation: u64,
    pub from: Colour,
    pub to: Colour,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// Who asked (socket peer credentials).
    pub user: String,
    pub reason: Option<String>,
    /// Open flows were moved too.
    pub forced: bool,
}

/// Who asks for a change, when, and why.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub user: String,
    pub reason: Option<String>,
    pub force: bool,
    pub at_ms: u64,
}

/// The durable state of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Index into the data plane's per-service arrays; stable across restarts.
    pub id: u32,
    pub active: Colour,
    /// Bumped by every change.
    pub generation: u64,
    /// The colour before the last flip: where `rollback` goes.
    pub previous: Option<Colour>,
    /// The most recent changes, oldest first (at most [`HISTORY_KEPT`]).
    pub history: Vec<Change>,
}

/// Changes kept per service in the state file.
pub const HISTORY_KEPT: usize = 100;

/// Everything the daemon must remember across restarts and reboots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
                    history: Vec::new(),
                },
            );
            added.push(name.to_string());
        }
        Ok((added, removed))
    }

    pub fn service(&self, name: &str) -> Result<&ServiceState, ModelError> {
        self.services
            .get(name)
            .ok_or_else(|| ModelError::UnknownService(name.to_string()))
    }

    /// New flows of `name` go to `to` (default: the other colour).
    pub fn flip(
        &mut self,
        name: &str,
        to: Option<Colour>,
        req: &Request,
    ) -> Result<FlipOutcome, ModelError> {
        let s = self
            .services
            .get_mut(name)
            .ok_or_else(|| ModelError::UnknownService(name.to_string()))?;
        let to = to.unwrap_or(s.active.other());
        if to == s.active && !req.force {
            return Ok(FlipOutcome::Unchanged {
                active: s.active,
                generation: s.generation,
            });
        }
        Ok(FlipOutcome::Changed(s.apply(ChangeKind::Flip, to, req)))
    }

    /// Back to the colour before the last flip.
    pub fn rollback(&mut self, name: &str, req: &Request) -> Result<Change, ModelError> {
        let s = self
            .services
            .get_mut(name)
            .ok_or_else(|| ModelError::UnknownService(name.to_string()))?;
        let to = s
            .previous
            .filter(|p| *p != s.active)
            .ok_or_else(|| ModelError::NothingToRollBack(name.to_string()))?;
        Ok(s.apply(ChangeKind::Rollback, to, req))
    }
}

impl ServiceState {
    fn apply(&mut self, kind: ChangeKind, to: Colour, req: &Request) -> Change {
        let change = Change {
            kind,
            generation_before: self.generation,
            generation: self.generation + 1,
            from: self.active,
            to,
            at_ms: req.at_ms,
            user: req.user.clone(),
            reason: req.reason.clone(),
            forced: req.force,
        };
        if to != self.active {
            self.previous = Some(self.active);
        }
        self.active = to;
        self.generation += 1;
        self.history.push(change.clone());
        if self.history.len() > HISTORY_KEPT {
            let extra = self.history.len() - HISTORY_KEPT;
            self.history.drain(..extra);
        }
        change
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
        let FlipOutcome::Changed(c) = s.flip("web", None, &req()).unwrap() else {
            panic!("flip must change")
        };
        assert_eq!(
            (c.from, c.to, c.generation_before, c.generation),
            (Colour::Blue, Colour::Green, 1, 2)
        );
        assert_eq!(c.reason.as_deref(), Some("release 42"));
        assert_eq!(
            s.flip("web", Some(Colour::Green), &req()).unwrap(),
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
        assert_eq!(s.services["web"].history.len(), 3);
        assert_eq!(
            s.flip("nope", None, &req()),
            Err(ModelError::UnknownService("nope".into()))
        );
    }

    #[test]
    fn forced_flip_to_same_colour_is_a_change() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["web"])).unwrap();
        let mut r = req();
        r.force = true;
        let FlipOutcome::Changed(c) = s.flip("web", Some(Colour::Blue), &r).unwrap() else {
            panic!("forced flip must be recorded")
        };
        assert!(c.forced);
        assert_eq!(s.services["web"].previous, None);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = DesiredState::default();
        s.reconcile(&cfg(&["web"])).unwrap();
        for _ in 0..(HISTORY_KEPT + 10) {
            s.flip("web", None, &req()).unwrap();
        }
        let st = &s.services["web"];
        assert_eq!(st.history.len(), HISTORY_KEPT);
        assert_eq!(st.history.last().unwrap().generation, st.generation);
    }
}
