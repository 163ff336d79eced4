//! Requests that change a service (flip, rollback, shift, preview,
//! confirm, undo), each made on a copy of that service alone, recorded in
//! the desired-state store first and then applied to the data plane; the
//! refusals (an unhealthy target) recorded too; changes made elsewhere
//! followed; and the other requests' answers.

use std::time::Duration;

use super::{guards::Baseline, now_ms, Daemon, Peer};
use crate::{
    api::{PreviewAction, Request, Response},
    dataplane,
    health::Health,
    model::{self, Colour, DesiredState, FlipGuards, FlipOutcome},
    state::{DesiredStore, ExternalChange, HistoryReader, StateError},
};

/// Fault injection (tests only): `BGSWITCH_FAULT_DELAY_COMMIT_MS` makes every
/// change wait this long after its journal line is written and before the
/// data plane moves.
static FAULT_DELAY_COMMIT: std::sync::LazyLock<Option<Duration>> = std::sync::LazyLock::new(|| {
    std::env::var("BGSWITCH_FAULT_DELAY_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
});

impl Daemon {
    pub(super) fn handle(&mut self, req: Request, peer: &Peer) -> Response {
        self.handle_checked(req, peer, Vec::new())
    }

    /// `handle`, for a flip or a shift that `checks` (the service's
    /// before-flip checks, `gates`) cleared: they are journalled with it.
    /// With `--force` the checks did not run, and the journal says so.
    pub(super) fn handle_checked(
        &mut self,
        req: Request,
        peer: &Peer,
        checks: Vec<model::CheckRecord>,
    ) -> Response {
        let summary = req.describe();
        self.asking_local = req.local();
        let resp = match req {
            Request::Flip {
                service,
                to,
                force,
                reason,
                watch_ms,
                max_error_rate,
                confirm_within_ms,
                ..
            } => {
                let mut r = self.request(peer, reason, force);
                r.checks = match self.state.service(&service) {
                    Ok(st) if force => self.skipped_checks(&service, to.unwrap_or(st.active.other())),
                    _ => checks,
                };
                self.flip(
                    &service,
                    to,
                    r,
                    FlipGuards {
                        watch_ms,
                        max_error_rate,
                        confirm_within_ms,
                    },
                )
            }
            Request::Rollback {
                service, reason, ..
            } => {
                let req = self.request(peer, reason, false);
                self.change(&service, |s| s.rollback(&service, &req))
            }
            Request::Shift {
                service,
                to,
                percent,
                reason,
                force,
                ..
            } => {
                let steps = percent * 100.0;
                if !(0.0..=100.0).contains(&percent) || !percent.is_finite() {
                    Response::error(format!("--percent {percent}: must be within 0..=100"))
                } else if (steps - steps.round()).abs() > 1e-6 {
                    Response::error(format!(
                        "--percent {percent}: at most two decimals (the share moves in steps of 0.01 %)"
                    ))
                } else {
                    let bp = (percent * 100.0).round() as u32;
                    let mut req = self.request(peer, reason, force);
                    match (!force && !req.local && bp > 0)
                        .then(|| self.fleet_refusal(&service, None))
                        .flatten()
                    {
                        Some(why) => Response::error(format!(
                            "refusing to shift {percent}% of {service} to {to}: {why}; use --force to override"
                        )),
                        None => {
                            req.checks = if force && bp > 0 {
                                self.skipped_checks(&service, to)
                            } else {
                                checks
                            };
                            self.change(&service, |s| s.shift(&service, to, bp, &req))
                        }
                    }
                }
            }
            Request::Preview {
                service,
                action,
                cidr,
                force,
                reason,
                ..
            } => self.preview(&service, action, cidr, force, reason, peer),
            Request::Confirm {
                service, reason, ..
            } => {
                let req = self.request(peer, reason, false);
                self.change(&service, |s| s.confirm(&service, &req))
            }
            // (A known service's history is read off the loop, in `run`.)
            Request::History { service } => match self.state.service(&service) {
                Err(e) => Response::error(e.to_string()),
                Ok(_) => history_response(self.store.history(), &service),
            },
            Request::Undo {
                service, reason, ..
            } => self.undo(&service, reason, peer),
            // (Read off the loop, in `run`, with a fleet.)
            Request::Fleet => Response::error(
                "this daemon has no [fleet] in its config: it keeps its desired state alone",
            ),
            // (A service with before-flip checks is answered by `gates`.)
            Request::Check { service, .. } => match self.state.service(&service) {
                Err(e) => Response::error(e.to_string()),
                Ok(_) => Response::error(format!(
                    "{service} has no before-flip checks ([[service.check]] with when = [\"before-flip\", …] in {})",
                    self.config.path.display()
                )),
            },
            Request::Status { service } => self.status(service.as_deref()),
            Request::Reload => self.reload(),
            Request::Detach => self.detach(),
        };
        self.asking_local = false;
        if resp.ok {
            log::debug!("{peer}: {summary}: ok");
        } else {
            log::warn!(
                "{peer}: {summary}: refused: {}",
                resp.error.as_deref().unwrap_or("")
            );
        }
        resp
    }

    pub(super) fn request(
        &self,
        peer: &Peer,
        reason: Option<String>,
        force: bool,
    ) -> model::Request {
        model::Request {
            user: peer.user.clone(),
            reason,
            force,
            at_ms: now_ms(),
            checks: Vec::new(),
            local: self.asking_local,
        }
    }

    /// A desired state holding a copy of `service` alone: what a change of
    /// it is made on (model changes touch one service), instead of a copy of
    /// every service's state on each request.
    pub(super) fn scratch(&self, service: &str) -> DesiredState {
        DesiredState {
            services: self
                .state
                .services
                .get_key_value(service)
                .map(|(k, v)| (k.clone(), v.clone()))
                .into_iter()
                .collect(),
        }
    }

    /// Applies a model change to a copy of the service and commits it.
    pub(super) fn change(
        &mut self,
        service: &str,
        f: impl FnOnce(&mut DesiredState) -> Result<model::Change, model::ModelError>,
    ) -> Response {
        let mut next = self.scratch(service);
        match f(&mut next) {
            Err(e) => Response::error(e.to_string()),
            Ok(change) => self.commit(service, next, change, false),
        }
    }

    /// Backends of `colour` that keep a pool from being healthy.
    pub(super) fn unhealthy(&self, service: &str, colour: Colour) -> Vec<String> {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return Vec::new();
        };
        if svc.health.is_none() {
            return Vec::new();
        }
        svc.pool(colour)
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match self.health_of(service, colour, i) {
                Health::Up => None,
                Health::Down => Some(format!("{a} (down)")),
                Health::Unknown => Some(format!("{a} (not checked yet)")),
            })
            .collect()
    }

    pub(super) fn flip(
        &mut self,
        service: &str,
        to: Option<Colour>,
        req: model::Request,
        guards: FlipGuards,
    ) -> Response {
        let Ok(st) = self.state.service(service) else {
            return Response::error(format!("no service named '{service}'"));
        };
        let target = to.unwrap_or(st.active.other());
        if target != st.active {
            let bad = self.unhealthy(service, target);
            if !bad.is_empty() && !req.force {
                let msg = format!(
                    "refusing to flip {service} to {target}: its pool is not healthy: {}; use --force to override",
                    bad.join(", ")
                );
                self.journal_refusal(service, &req, target, &msg);
                return Response::error(msg);
            }
            if !bad.is_empty() {
                log::warn!(
                    "{service}: flip to an unhealthy {target} forced by {}: {}",
                    req.user,
                    bad.join(", ")
                );
            }
            if !req.local {
                if let Some(why) = self.fleet_refusal(service, Some(target)) {
                    if !req.force {
                        let msg = format!(
                            "refusing to flip {service} to {target}: {why}; use --force to override"
                        );
                        self.journal_refusal(service, &req, target, &msg);
                        return Response::error(msg);
                    }
                    log::warn!(
                        "{service}: flip to {target} forced by {} over the fleet: {why}",
                        req.user
                    );
                }
            }
        }
        let mut next = self.scratch(service);
        match next.flip(service, to, &req, &guards) {
            Err(e) => Response::error(e.to_string()),
            Ok(FlipOutcome::Unchanged { active, generation }) => Response::ok(format!(
                "{service}: already {active} (generation {generation}); nothing changed"
            )),
            Ok(FlipOutcome::Changed(change)) => {
                self.baselines.remove(service);
                let id = next.service(service).map(|s| s.id);
                let resp = self.commit(service, next, change.clone(), true);
                if resp.ok && guards.watch_ms.is_some() {
                    // The error rate is judged on flows from this moment on.
                    if let Some(Ok(stats)) =
                        id.ok().map(|id| self.dataplane.colour_stats(id, change.to))
                    {
                        self.baselines
                            .insert(service.to_string(), Baseline::new(stats));
                    }
                }
                resp
            }
        }
    }

    pub(super) fn journal_refusal(
        &mut self,
        service: &str,
        req: &model::Request,
        to: Colour,
        why: &str,
    ) {
        let Ok(st) = self.state.service(service) else {
            return;
        };
        let change = model::Change {
            kind: model::ChangeKind::Flip,
            generation_before: st.generation,
            generation: st.generation,
            from: st.active,
            to,
            at_ms: req.at_ms,
            user: req.user.clone(),
            reason: req.reason.clone(),
            forced: req.force,
            checks: req.checks.clone(),
            host: None,
            local: req.local,
            before: st.snapshot(),
            after: st.snapshot(),
        };
        if let Err(e) = self.store.record_refusal(service, why, &change) {
            log::error!("journal: {e}");
        }
    }

    pub(super) fn preview(
        &mut self,
        service: &str,
        action: PreviewAction,
        cidr: Option<String>,
        force: bool,
        reason: Option<String>,
        peer: &Peer,
    ) -> Response {
        let req = self.request(peer, reason, force);
        match (action, cidr) {
            (PreviewAction::List, _) => match self.state.service(service) {
                Ok(s) => Response {
                    ok: true,
                    preview: Some(s.preview.clone()),
                    ..Response::default()
                },
                Err(e) => Response::error(e.to_string()),
            },
            (_, None) => Response::error("preview add/del needs a CIDR"),
            (_, Some(_)) if !force && !req.local && self.fleet_refusal(service, None).is_some() => {
                let why = self.fleet_refusal(service, None).unwrap_or_default();
                Response::error(format!(
                    "refusing to change {service}'s preview prefixes: {why}; use --force to override"
                ))
            }
            (PreviewAction::Add, Some(c)) => {
                let Some(vip) = self.config.services.iter().find(|s| s.name == service) else {
                    return Response::error(format!("no service named '{service}'"));
                };
                let vip = vip.vip.ip();
                let resp = self.change(service, |s| s.preview_add(service, &c, vip, force, &req));
                with_host_bits_note(resp, &c)
            }
            (PreviewAction::Del, Some(c)) => {
                let resp = self.change(service, |s| s.preview_del(service, &c, &req));
                with_host_bits_note(resp, &c)
            }
        }
    }

    /// Takes back the service's newest change of traffic not taken back
    /// yet (its state keeps the steps: no journal read).
    fn undo(&mut self, service: &str, reason: Option<String>, peer: &Peer) -> Response {
        let req = self.request(peer, reason, false);
        self.change(service, |s| s.undo(service, &req))
    }

    /// A record made durable by the store (`f`), its time kept in the
    /// durable writes' account when it succeeds.
    pub(super) fn durably<T>(
        &mut self,
        f: impl FnOnce(&mut dyn DesiredStore) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let started = std::time::Instant::now();
        let r = f(self.store.as_mut());
        if r.is_ok() {
            self.durable_writes.observe(started.elapsed());
        }
        r
    }

    /// Journals the change with the service's new state (durable once that
    /// line is), then moves the data plane; the snapshot follows on a tick.
    /// `next` holds the changed service (see `scratch`).
    pub(super) fn commit(
        &mut self,
        service: &str,
        mut next: DesiredState,
        change: model::Change,
        may_move_flows: bool,
    ) -> Response {
        let Some(after) = next.services.remove(service) else {
            return Response::error(format!("no service named '{service}'"));
        };
        let id = after.id;
        let recorded = self.durably(|store| {
            if change.local {
                return store.record_local(service, &change, &after);
            }
            match store.record(service, &change, &after) {
                // A rollback never waits for a quorum: the daemon's own
                // goes ahead on this host alone while etcd does not answer.
                Err(e) if e.unreachable() && change.kind == model::ChangeKind::AutoRollback => {
                    log::warn!("{service}: {e}: rolling back on this host alone");
                    let mut change = change.clone();
                    change.local = true;
                    store.record_local(service, &change, &after)
                }
                r => r,
            }
        });
        if let Err(e) = recorded {
            return Response::error(format!("{e}; nothing changed"));
        }
        if let Some(d) = *FAULT_DELAY_COMMIT {
            // Fault injection for tests: widen the window between the durable
            // write and the data plane, where a crash must not split a change.
            std::thread::sleep(d);
        }
        let old = self.state.services.insert(service.to_string(), after);
        if let Err(e) = self.move_dataplane(service, id, &change) {
            let why = format!("data plane: {e:#}");
            // `old` is there: `next` was made from it (see `scratch`).
            if let Some(before) = old {
                let journalled = self.store.record_revert(service, &why, &change, &before);
                self.state.services.insert(service.to_string(), before);
                if let Err(je) = journalled {
                    log::error!("{service}: journalling the revert: {je}; writing the snapshot");
                    if let Err(se) = self.store.save(&self.state) {
                        log::error!("{service}: {se}: a restart would apply the refused change");
                    }
                }
            }
            let _ = self.sync_service(service);
            return Response::error(format!("{why}; nothing changed"));
        }
        let mut moved = String::new();
        if change.forced && may_move_flows {
            match self.dataplane.flush_flows(id, change.to) {
                Ok(n) => moved = format!("; moved {n} open flows"),
                Err(e) => moved = format!("; moving open flows failed: {e}"),
            }
        }
        let what = match change.kind {
            model::ChangeKind::PreviewAdd
            | model::ChangeKind::PreviewDel
            | model::ChangeKind::Confirm => change.describe(),
            model::ChangeKind::Undo => format!("undo: {}", change.describe()),
            kind => format!("{kind} {}", change.describe()),
        };
        let msg = format!(
            "{service}: {what} (generation {} → {}){moved}{}",
            change.generation_before,
            change.generation,
            if change.local && self.store.fleet_local().is_some() {
                " on this host alone (--local): the fleet gets it when etcd answers, unless it moved meanwhile"
            } else {
                ""
            }
        );
        log::info!(
            "{msg} by {}{}",
            change.user,
            change
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        self.publish_report();
        Response {
            ok: true,
            message: Some(msg),
            change: Some(change),
            ..Response::default()
        }
    }

    /// The data plane side of a change: only what the change altered, so a
    /// flip is the one 32-bit store it promises (plus nothing).
    fn move_dataplane(
        &mut self,
        service: &str,
        id: u32,
        change: &model::Change,
    ) -> anyhow::Result<()> {
        let (b, a) = (&change.before, &change.after);
        if b.preview != a.preview {
            return self.sync_service(service);
        }
        if b.active != a.active || change.forced {
            self.dataplane.set_active(id, change.to)?;
        }
        if b.canary_bp != a.canary_bp {
            self.dataplane.set_canary(id, a.canary_bp)?;
        }
        Ok(())
    }

    pub(super) fn detach(&mut self) -> Response {
        // The pins as this process reaches them (through an outer mount
        // namespace's root when it runs in a private one).
        let bpffs = self
            .dataplane
            .pin_place()
            .map_or_else(|| self.config.bpffs.clone(), |p| p.root.clone());
        let ifaces: Vec<String> = self
            .dataplane
            .attachments()
            .into_iter()
            .map(|a| a.interface)
            .collect();
        for i in &ifaces {
            if let Err(e) = self.dataplane.detach(i) {
                return Response::error(format!("detaching {i}: {e}"));
            }
        }
        if let Err(e) = dataplane::remove_pins(&bpffs) {
            return Response::error(format!("removing pins: {e}"));
        }
        log::info!(
            "detached from {ifaces:?} and removed the pins under {}; exiting",
            self.config.bpffs.display()
        );
        Response::ok(format!(
            "detached from {} interfaces and removed all pins; the daemon exits",
            ifaces.len()
        ))
    }
}

impl Daemon {
    /// A change made elsewhere (another host of a fleet, through the
    /// store): the service takes the state recorded with it and the data
    /// plane follows, as for a change of this daemon's own, without
    /// recording it again (the store keeps it as applied). A service this
    /// host does not serve is skipped; one it has at that generation
    /// already (its own change coming back, a resynchronisation) is left
    /// as it is. A service changed here alone (`--local`) while etcd did
    /// not answer: if the fleet is still where that change started, the
    /// change is proposed to the fleet (which then follows it); if the
    /// fleet moved meanwhile, the fleet's state wins, journalled.
    pub(super) fn follow(&mut self, ext: ExternalChange) {
        let Ok(current) = self.state.service(&ext.service).cloned() else {
            return;
        };
        if let Some(base) = self.store.diverged(&ext.service) {
            self.store.seen(&ext.service, ext.revision);
            self.store.clear_diverged(&ext.service);
            if ext.after.generation == base {
                let mut mine = current.clone();
                let Some(mut change) = mine.history.last().cloned() else {
                    return;
                };
                change.reason = Some(format!(
                    "{} [made with --local while etcd did not answer; proposed to the fleet]",
                    change.reason.as_deref().unwrap_or("")
                ));
                change.local = false;
                mine.history = vec![change.clone()];
                match self.durably(|store| store.record(&ext.service, &change, &mine)) {
                    Ok(()) => {
                        log::warn!(
                            "fleet: {}: the change made on this host alone ({}) is now the fleet's (generation {} → {})",
                            ext.service,
                            change.describe(),
                            base,
                            mine.generation
                        );
                        self.publish_report();
                        return;
                    }
                    // The fleet moved in the meantime: it wins, below.
                    Err(e) => log::error!(
                        "fleet: {}: proposing the change made on this host alone: {e}",
                        ext.service
                    ),
                }
            }
            log::warn!(
                "fleet: {}: the fleet moved while this host was cut off (generation {base} → {} by {}): the fleet's state wins over the change made here alone ({})",
                ext.service,
                ext.after.generation,
                ext.change.user,
                current.history.last().map(|c| c.describe()).unwrap_or_default()
            );
            let mut why = ext.change.clone();
            why.local = true;
            if let Err(e) = self.store.record_refusal(
                &ext.service,
                "a change made on this host alone (--local) was superseded by the fleet's when etcd answered again",
                &why,
            ) {
                log::error!("journal: {e}");
            }
        } else if ext.after.generation <= current.generation {
            if ext.after.snapshot() == current.snapshot() {
                // This host's own change coming back, or one it has.
                self.store.seen(&ext.service, ext.revision);
                return;
            }
            // The fleet keeps another state at a generation this host has
            // passed (hosts that started apart): the fleet's wins.
            log::warn!(
                "fleet: {}: the fleet's state (generation {}) differs from this host's (generation {}): taking the fleet's",
                ext.service,
                ext.after.generation,
                current.generation
            );
        }
        let ExternalChange {
            service,
            change,
            after,
            revision: _,
        } = ext.clone();
        let before = match self.state.follow(&service, &after) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("a change made elsewhere ({}): {e}; skipped", change.kind);
                return;
            }
        };
        self.baselines.remove(&service);
        self.store.applied(&ext);
        // From this host's state (it may have missed changes in between),
        // not from the change's own before.
        let mut step = change.clone();
        step.before = before.snapshot();
        step.after = after.snapshot();
        step.from = before.active;
        step.to = after.active;
        if let Err(e) = self.move_dataplane(&service, before.id, &step) {
            log::error!(
                "{service}: following a change made elsewhere ({}): data plane: {e:#}; rewriting the service",
                change.kind
            );
            if let Err(e) = self.sync_service(&service) {
                log::error!("{service}: {e:#}");
            }
            return;
        }
        if change.forced && change.kind == model::ChangeKind::Flip {
            if let Err(e) = self.dataplane.flush_flows(before.id, after.active) {
                log::error!("{service}: moving open flows: {e}");
            }
        }
        log::info!(
            "{service}: {} {} → {} (generation {} → {}) by {}{}, made elsewhere: followed",
            change.kind,
            before.active,
            after.active,
            before.generation,
            after.generation,
            change.user,
            change
                .host
                .as_deref()
                .map(|h| format!(" on {h}"))
                .unwrap_or_default()
        );
        self.publish_report();
    }
}

/// The answer to `history SERVICE`: its changes as `read` (the store's
/// history reader) finds them, oldest first.
pub(super) fn history_response(read: HistoryReader, service: &str) -> Response {
    match read(Some(service)) {
        Ok(mut h) => {
            // The recorded states are for replay, not for readers.
            h.iter_mut().for_each(|e| e.state = None);
            Response {
                ok: true,
                history: Some(h),
                ..Response::default()
            }
        }
        Err(e) => Response::error(e.to_string()),
    }
}

/// Says so when the prefix `given` had host bits set, which were cleared
/// (198.18.0.5/24 is stored as 198.18.0.0/24).
fn with_host_bits_note(mut resp: Response, given: &str) -> Response {
    let Ok((ip, len)) = model::parse_cidr(given) else {
        return resp;
    };
    let written: Option<std::net::IpAddr> =
        given.split('/').next().and_then(|a| a.trim().parse().ok());
    if let (Some(m), Some(w)) = (resp.message.as_mut(), written) {
        if w != ip {
            *m += &format!(" ({given} has host bits set: stored as {ip}/{len})");
        }
    }
    resp
}
