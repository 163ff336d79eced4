//! The rules of the desired state: reconcile with the config, adopt what a
//! running data plane serves, and every change (flip, rollback, automatic
//! rollback, shift, preview, confirm, undo, the end of a watch or guard),
//! each made on one service and returned as a `Change`.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

impl DesiredState {
    /// Makes the state match the configured services (their names, in the
    /// config's order): new services get the lowest free id and start on
    /// blue; services no longer configured are forgotten. Returns the names
    /// of the added and removed services.
    pub fn reconcile<'a>(
        &mut self,
        configured: impl IntoIterator<Item = &'a str>,
    ) -> Result<(Vec<String>, Vec<String>), ModelError> {
        let wanted: Vec<&str> = configured.into_iter().collect();
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
                    undo: Vec::new(),
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

    /// The daemon's own rollback: a watch failed (its health checks, its
    /// error signal, or one of `checks`, the user's checks that failed) or
    /// a confirmation was missed.
    pub fn auto_rollback(
        &mut self,
        name: &str,
        why: &str,
        at_ms: u64,
        checks: Vec<CheckRecord>,
    ) -> Result<Change, ModelError> {
        let req = Request {
            user: "bgswitch".into(),
            reason: Some(why.to_string()),
            force: false,
            at_ms,
            checks,
            local: false,
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

    /// Adds a preview prefix (new flows from it reach the idle colour). A
    /// prefix of the other family than the service's VIP (`vip`) could
    /// never match and is refused; so is a /0 (every client: a flip by
    /// another name) unless `force`.
    pub fn preview_add(
        &mut self,
        name: &str,
        cidr: &str,
        vip: IpAddr,
        force: bool,
        req: &Request,
    ) -> Result<Change, ModelError> {
        let (ip, len) = parse_cidr(cidr)?;
        let text = format!("{ip}/{len}");
        if ip.is_ipv4() != vip.is_ipv4() {
            return Err(ModelError::Invalid(format!(
                "{text} is an {} prefix and {name}'s VIP {vip} is {}: it could never match a client",
                family(ip),
                family(vip)
            )));
        }
        if len == 0 && !force {
            return Err(ModelError::Invalid(format!(
                "{text} matches every client: every new flow of {name} would go to the idle \
                 colour, as a flip sends them (`bgswitch flip`), and stay there until it is \
                 deleted; give --force if that is meant"
            )));
        }
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

    /// Takes back the service's newest change of traffic not taken back
    /// yet: restores the state before it (colour, canary share, preview
    /// prefixes; guards end). Repeated, it walks back change by change, up
    /// to [`UNDO_KEPT`]; then there is nothing to undo.
    pub fn undo(&mut self, name: &str, req: &Request) -> Result<Change, ModelError> {
        let s = self.service_mut(name)?;
        let step = match s.undo.last() {
            Some(step) => step.clone(),
            // A state from before undo steps were kept: its last change.
            None => s
                .history
                .last()
                .filter(|c| undoable(c.kind) && c.before.active.is_some())
                .map(|c| UndoStep {
                    kind: c.kind,
                    generation: c.generation,
                    before: c.before.clone(),
                })
                .ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "nothing to undo: {name} has no change of traffic left to take back \
                         (undo goes back at most {UNDO_KEPT} changes)"
                    ))
                })?,
        };
        let before_active = step.before.active.unwrap_or(s.active);
        let change = s.apply(ChangeKind::Undo, req, |s| {
            s.undo.pop();
            if before_active != s.active {
                s.previous = Some(s.active);
            }
            s.active = before_active;
            s.canary_bp = step.before.canary_bp;
            s.preview = step.before.preview.clone();
            s.watch = None;
            s.confirm = None;
        });
        Ok(change)
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

    /// Takes `after`, the whole state of service `name` as a change made
    /// elsewhere left it (another host of a fleet), keeping what is this
    /// host's own: the service's id (each host numbers its services) and
    /// the history kept. Returns the state it replaces; an error for a
    /// service this state does not have.
    pub fn follow(&mut self, name: &str, after: &ServiceState) -> Result<ServiceState, ModelError> {
        let s = self.service_mut(name)?;
        let mut next = after.clone();
        next.id = s.id;
        next.trim_history();
        Ok(std::mem::replace(s, next))
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

/// Whether `undo` takes a change of this kind back: the changes of traffic.
fn undoable(kind: ChangeKind) -> bool {
    matches!(
        kind,
        ChangeKind::Flip
            | ChangeKind::Rollback
            | ChangeKind::AutoRollback
            | ChangeKind::Shift
            | ChangeKind::PreviewAdd
            | ChangeKind::PreviewDel
    )
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
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
            checks: req.checks.clone(),
            host: None,
            local: req.local,
            before,
            after: self.snapshot(),
        };
        self.generation += 1;
        if undoable(kind) {
            self.undo.push(UndoStep {
                kind,
                generation: change.generation,
                before: change.before.clone(),
            });
            let extra = self.undo.len().saturating_sub(UNDO_KEPT);
            self.undo.drain(..extra);
        }
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
            checks: Vec::new(),
            host: None,
            local: false,
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

    fn req() -> Request {
        Request {
            user: "root".into(),
            reason: Some("release 42".into()),
            force: false,
            at_ms: 1000,
            checks: Vec::new(),
            local: false,
        }
    }

    #[test]
    fn ids_are_stable_and_reused_lowest_first() {
        let mut s = DesiredState::default();
        let (added, removed) = s.reconcile(["a", "b", "c"]).unwrap();
        assert_eq!(added, ["a", "b", "c"]);
        assert!(removed.is_empty());
        assert_eq!(s.services["b"].id, 1);
        let (added, removed) = s.reconcile(["a", "c", "d"]).unwrap();
        assert_eq!(added, ["d"]);
        assert_eq!(removed, ["b"]);
        assert_eq!(s.services["a"].id, 0);
        assert_eq!(s.services["c"].id, 2);
        assert_eq!(s.services["d"].id, 1);
    }

    #[test]
    fn a_change_made_elsewhere_is_taken_whole_but_the_id_stays_this_hosts() {
        // Another host numbered its services otherwise: "web" is its 0.
        let mut there = DesiredState::default();
        there.reconcile(["web"]).unwrap();
        let FlipOutcome::Changed(_) = there
            .flip("web", None, &req(), &FlipGuards::default())
            .unwrap()
        else {
            panic!("flip must change")
        };
        let mut here = DesiredState::default();
        here.reconcile(["api", "web"]).unwrap();
        let before = here.follow("web", &there.services["web"]).unwrap();
        assert_eq!(before.active, Colour::Blue);
        let web = &here.services["web"];
        assert_eq!(web.id, 1, "this host's id, not the other's");
        assert_eq!(web.active, Colour::Green);
        assert_eq!(web.generation, 2);
        assert_eq!(web.history, there.services["web"].history);
        assert_eq!(
            here.follow("gone", &there.services["web"]),
            Err(ModelError::UnknownService("gone".into()))
        );
    }

    #[test]
    fn flip_rollback_and_generations() {
        let mut s = DesiredState::default();
        s.reconcile(["web"]).unwrap();
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
        s.reconcile(["web"]).unwrap();
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
        s.reconcile(["old"]).unwrap();
        s.services.get_mut("old").unwrap().id = 2;
        let (added, _) = s.reconcile(["old", "a", "b", "c"]).unwrap();
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
        s.reconcile(["web"]).unwrap();
        assert!(
            s.shift("web", Colour::Blue, 1000, &req()).is_err(),
            "blue is active"
        );
        assert!(s.shift("web", Colour::Green, 10_001, &req()).is_err());
        let c = s.shift("web", Colour::Green, 1000, &req()).unwrap();
        assert_eq!((c.before.canary_bp, c.after.canary_bp), (0, 1000));
        let c = s
            .preview_add("web", "198.18.0.7/24", v4(), false, &req())
            .unwrap();
        assert_eq!(c.after.preview, ["198.18.0.0/24"]);
        assert!(
            s.preview_add("web", "198.18.0.0/24", v4(), false, &req())
                .is_err(),
            "duplicate"
        );
        assert!(s
            .preview_add("web", "198.18.0.0/33", v4(), false, &req())
            .is_err());
        assert!(s.preview_del("web", "10.0.0.0/8", &req()).is_err());
        // Undo the preview: back to no prefixes, canary kept.
        s.undo("web", &req()).unwrap();
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
        let c = s
            .auto_rollback("web", "green failed", 2000, Vec::new())
            .unwrap();
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
        s.reconcile(["web"]).unwrap();
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

    fn v4() -> IpAddr {
        "198.19.0.10".parse().unwrap()
    }

    #[test]
    fn undo_walks_back_change_by_change_and_then_has_nothing_to_undo() {
        let mut s = DesiredState::default();
        s.reconcile(["web"]).unwrap();
        s.shift("web", Colour::Green, 2500, &req()).unwrap();
        let all = s
            .preview_add("web", "0.0.0.0/0", v4(), true, &req())
            .unwrap();
        assert_eq!(all.describe(), "preview add 0.0.0.0/0");
        // The first undo takes the /0 back, the second the canary share;
        // neither puts back what the one before it removed.
        let u1 = s.undo("web", &req()).unwrap();
        assert_eq!(u1.describe(), "preview del 0.0.0.0/0");
        assert!(s.services["web"].preview.is_empty());
        let u2 = s.undo("web", &req()).unwrap();
        assert_eq!(u2.describe(), "canary 25.00% → 0.00% of new flows to green");
        assert!(s.services["web"].preview.is_empty(), "the /0 stays gone");
        assert_eq!(s.services["web"].canary_bp, 0);
        let e = s.undo("web", &req()).unwrap_err().to_string();
        assert!(e.starts_with("nothing to undo"), "{e}");
        // A flip, a preview, then two undos: back on blue with no prefix.
        let FlipOutcome::Changed(f) = s.flip("web", None, &req(), &FlipGuards::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(f.describe(), "blue → green");
        s.preview_add("web", "198.18.0.5/24", v4(), false, &req())
            .unwrap();
        s.undo("web", &req()).unwrap();
        let back = s.undo("web", &req()).unwrap();
        assert_eq!(back.describe(), "green → blue");
        assert_eq!(s.services["web"].active, Colour::Blue);
        assert!(s.undo("web", &req()).is_err());
    }

    #[test]
    fn undo_keeps_at_most_its_limit_of_steps() {
        let mut s = DesiredState::default();
        s.reconcile(["web"]).unwrap();
        for i in 0..(UNDO_KEPT as u32 + 5) {
            s.shift("web", Colour::Green, i + 1, &req()).unwrap();
        }
        for _ in 0..UNDO_KEPT {
            s.undo("web", &req()).unwrap();
        }
        assert_eq!(s.services["web"].canary_bp, 5, "back {UNDO_KEPT} steps");
        assert!(s.undo("web", &req()).is_err());
    }

    #[test]
    fn a_state_from_before_undo_steps_undoes_its_last_change_once() {
        let mut s = DesiredState::default();
        s.reconcile(["web"]).unwrap();
        s.shift("web", Colour::Green, 1000, &req()).unwrap();
        s.services.get_mut("web").unwrap().undo.clear();
        s.undo("web", &req()).unwrap();
        assert_eq!(s.services["web"].canary_bp, 0);
        assert!(s.undo("web", &req()).is_err(), "the undo is not undone");
    }

    #[test]
    fn preview_prefixes_that_cannot_mean_what_is_meant_are_refused() {
        let mut s = DesiredState::default();
        s.reconcile(["web"]).unwrap();
        let e = s
            .preview_add("web", "2001:db8::/32", v4(), false, &req())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("IPv6 prefix") && e.contains("never match"),
            "{e}"
        );
        let e = s
            .preview_add("web", "0.0.0.0/0", v4(), false, &req())
            .unwrap_err()
            .to_string();
        assert!(e.contains("every client") && e.contains("--force"), "{e}");
        assert!(s.services["web"].preview.is_empty());
        assert_eq!(s.services["web"].generation, 1);
        let c = s
            .preview_add("web", "198.18.0.5/24", v4(), false, &req())
            .unwrap();
        assert_eq!(c.after.preview, ["198.18.0.0/24"]);
    }
}
