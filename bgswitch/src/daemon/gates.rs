//! The user's checks in the daemon (`[[service.check]]`, run by
//! `crate::checks`): the gate before a flip or a shift to a non-zero share
//! (the checks run off the loop, in parallel, while other requests are
//! answered; the change is made when they all passed and the service did
//! not change meanwhile, else refused naming the check), `bgswitch check`,
//! the runs during a watch (a failure rolls back), and the book of their
//! results that `status` and `/metrics` show.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use tokio::sync::oneshot;

use super::{now_ms, Daemon, Event, Gate, Peer};
use crate::{
    api::{CheckStatus, Request, Response},
    checks::{self, Target},
    model::{CheckOutcome, CheckPhase, CheckRecord, Colour},
};

/// Results of the checks, per service and check.
#[derive(Default)]
pub(super) struct CheckBook {
    last: HashMap<(String, String), CheckRecord>,
    runs: HashMap<(String, String), BTreeMap<String, u64>>,
    running: HashMap<(String, String), usize>,
    /// During a watch: when each check last started, and for which
    /// generation of its service (a new flip starts them afresh).
    watch_started: HashMap<(String, String), (u64, Instant)>,
}

impl CheckBook {
    fn started(&mut self, service: &str, name: &str) {
        *self
            .running
            .entry((service.to_string(), name.to_string()))
            .or_default() += 1;
    }

    fn finished(&mut self, service: &str, r: &CheckRecord) {
        let key = (service.to_string(), r.name.clone());
        if let Some(n) = self.running.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        *self
            .runs
            .entry(key.clone())
            .or_default()
            .entry(r.outcome.label().to_string())
            .or_default() += 1;
        self.last.insert(key, r.clone());
    }
}

/// "1 of 2 before-flip checks failed: check 'a' …; check 'b' …".
fn failures(records: &[CheckRecord]) -> Option<String> {
    let failed: Vec<String> = records
        .iter()
        .filter(|r| !r.outcome.passed())
        .map(CheckRecord::describe)
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "{} of {} checks failed: {}",
            failed.len(),
            records.len(),
            failed.join("; ")
        )
    })
}

impl Daemon {
    /// What a request's gate would run: the service, the colour under test
    /// and the checks. `None`: it goes straight to `handle` (no checks
    /// apply, `--force`, nothing to change, or a refusal `handle` gives).
    fn gate_plan(
        &self,
        req: &Request,
    ) -> Option<(String, Colour, Vec<crate::config::CheckConfig>)> {
        let (service, colour) = match req {
            Request::Flip {
                service,
                to,
                force: false,
                ..
            } => {
                let st = self.state.service(service).ok()?;
                let target = to.unwrap_or(st.active.other());
                // An unhealthy target is refused by `handle` at once.
                if target == st.active || !self.unhealthy(service, target).is_empty() {
                    return None;
                }
                (service, target)
            }
            Request::Shift {
                service,
                to,
                percent,
                force: false,
                ..
            } => {
                let st = self.state.service(service).ok()?;
                if *to == st.active || !(*percent > 0.0 && *percent <= 100.0) {
                    return None;
                }
                (service, *to)
            }
            Request::Check { service, colour } => {
                let st = self.state.service(service).ok()?;
                (service, colour.unwrap_or(st.active.other()))
            }
            _ => return None,
        };
        let svc = self.config.services.iter().find(|s| &s.name == service)?;
        let list: Vec<_> = svc.checks_in(CheckPhase::BeforeFlip).cloned().collect();
        (!list.is_empty()).then(|| (service.clone(), colour, list))
    }

    /// Whether `req` waits for checks (`start_gate`) before its answer.
    pub(super) fn needs_checks(&self, req: &Request) -> bool {
        self.gate_plan(req).is_some()
    }

    fn target(&self, service: &str, colour: Colour) -> Option<Target> {
        let svc = self.config.services.iter().find(|s| s.name == service)?;
        Some(target_of(svc, colour))
    }

    /// Starts the before-flip checks of `req` off the loop; `on_gated`
    /// answers it when they are done.
    pub(super) fn start_gate(
        &mut self,
        req: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    ) {
        let (Some((service, colour, list)), Some(tx)) = (self.gate_plan(&req), self.tx.clone())
        else {
            let _ = reply.send(self.handle(req, &peer));
            return;
        };
        let Some(target) = self.target(&service, colour) else {
            let _ = reply.send(Response::error(format!("no service named '{service}'")));
            return;
        };
        let generation = self.state.service(&service).map_or(0, |s| s.generation);
        let phase = if matches!(req, Request::Check { .. }) {
            CheckPhase::OnDemand
        } else {
            CheckPhase::BeforeFlip
        };
        log::info!(
            "{peer}: {}: running {} check{} against {colour} first ({})",
            req.describe(),
            list.len(),
            if list.len() == 1 { "" } else { "s" },
            list.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for c in &list {
            self.checks.started(&service, &c.name);
        }
        let gate = Gate {
            req,
            peer,
            reply,
            service,
            colour,
            generation,
        };
        tokio::spawn(async move {
            let records = checks::run_all(list, target, phase).await;
            let _ = tx.send(Event::Gated { gate, records }).await;
        });
    }

    /// The checks of a gate are done: answer `check`, refuse the change
    /// (journalled with the checks), or make it.
    pub(super) fn on_gated(&mut self, gate: Gate, records: Vec<CheckRecord>) {
        let Gate {
            req,
            peer,
            reply,
            service,
            colour,
            generation,
        } = gate;
        for r in &records {
            self.checks.finished(&service, r);
        }
        let failed = failures(&records);
        let resp = if matches!(req, Request::Check { .. }) {
            match &failed {
                None => Response::ok(format!(
                    "{service}: {} check{} passed against {colour}",
                    records.len(),
                    if records.len() == 1 { "" } else { "s" }
                )),
                Some(f) => {
                    log::warn!("{peer}: check {service} against {colour}: {f}");
                    Response::error(format!("{service}: {f}"))
                }
            }
        } else if let Some(f) = failed {
            let what = match &req {
                Request::Shift { percent, .. } => {
                    format!("shift {percent}% of {service} to {colour}")
                }
                _ => format!("flip {service} to {colour}"),
            };
            let msg = format!("refusing to {what}: {f}; use --force to override");
            let mut r = self.request(&peer, req_reason(&req), false);
            r.checks = records.clone();
            self.journal_refusal(&service, &r, colour, &msg);
            log::warn!("{peer}: {}: refused: {msg}", req.describe());
            Response::error(msg)
        } else if self
            .state
            .service(&service)
            .is_ok_and(|s| s.generation != generation)
        {
            let now = self.state.service(&service).map_or(0, |s| s.generation);
            let msg = format!(
                "{service} changed while its checks ran (generation {generation} → {now}): nothing changed; ask again"
            );
            log::warn!("{peer}: {}: refused: {msg}", req.describe());
            Response::error(msg)
        } else {
            self.handle_checked(req, &peer, records.clone())
        };
        let _ = reply.send(Response {
            checks: Some(records),
            ..resp
        });
    }

    /// Records saying the before-flip checks of `service` were skipped
    /// (`--force`), for the journal; none when it has none.
    pub(super) fn skipped_checks(&self, service: &str, colour: Colour) -> Vec<CheckRecord> {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return Vec::new();
        };
        svc.checks_in(CheckPhase::BeforeFlip)
            .map(|c| CheckRecord {
                name: c.name.clone(),
                phase: CheckPhase::BeforeFlip,
                colour,
                at_ms: now_ms(),
                duration_ms: 0,
                outcome: CheckOutcome::Skipped,
                output: String::new(),
            })
            .collect()
    }

    /// Every tick: while a flip is watched, each `during-watch` check of
    /// its service runs every `interval` against the watched colour (one
    /// run of a check at a time).
    pub(super) fn run_watch_checks(&mut self) {
        let Some(tx) = self.tx.clone() else {
            return;
        };
        let now = Instant::now();
        for svc in &self.config.services {
            let Ok(st) = self.state.service(&svc.name) else {
                continue;
            };
            let Some(w) = &st.watch else {
                continue;
            };
            for c in svc.checks_in(CheckPhase::DuringWatch) {
                let key = (svc.name.clone(), c.name.clone());
                if self.checks.running.get(&key).copied().unwrap_or(0) > 0 {
                    continue;
                }
                let due = match self.checks.watch_started.get(&key) {
                    Some((g, at)) => *g != st.generation || now - *at >= c.interval,
                    None => true,
                };
                if !due {
                    continue;
                }
                self.checks
                    .watch_started
                    .insert(key.clone(), (st.generation, now));
                *self.checks.running.entry(key).or_default() += 1;
                let target = target_of(svc, w.colour);
                let (c, tx, generation) = (c.clone(), tx.clone(), st.generation);
                let service = svc.name.clone();
                tokio::spawn(async move {
                    let record = checks::run(&c, &target, CheckPhase::DuringWatch).await;
                    let _ = tx
                        .send(Event::WatchChecked {
                            service,
                            generation,
                            record,
                        })
                        .await;
                });
            }
        }
    }

    /// A `during-watch` run is done: a failure while the same watch holds
    /// rolls back, naming the check.
    pub(super) fn on_watch_checked(&mut self, service: &str, generation: u64, record: CheckRecord) {
        self.checks.finished(service, &record);
        if record.outcome.passed() {
            log::debug!("{service}: {}", record.describe());
            return;
        }
        let watched = self
            .state
            .service(service)
            .is_ok_and(|s| s.generation == generation && s.watch.is_some());
        if !watched {
            log::warn!(
                "{service}: {} (after its watch ended: no rollback)",
                record.describe()
            );
            return;
        }
        let why = format!("during the watch, {}", record.describe());
        self.auto_rollback(service, &why, vec![record]);
    }

    /// `status`: each configured check of `service`, its last run and
    /// runs by result.
    pub(super) fn check_status(&self, service: &str) -> Vec<CheckStatus> {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return Vec::new();
        };
        svc.checks
            .iter()
            .map(|c| {
                let key = (service.to_string(), c.name.clone());
                CheckStatus {
                    name: c.name.clone(),
                    when: [CheckPhase::BeforeFlip, CheckPhase::DuringWatch]
                        .into_iter()
                        .filter(|p| c.runs_in(*p))
                        .collect(),
                    user: c.user.clone(),
                    timeout_ms: c.timeout.as_millis() as u64,
                    interval_ms: c.interval.as_millis() as u64,
                    running: self.checks.running.get(&key).copied().unwrap_or(0) > 0,
                    last: self.checks.last.get(&key).cloned(),
                    runs: self.checks.runs.get(&key).cloned().unwrap_or_default(),
                }
            })
            .collect()
    }
}

/// What `svc`'s checks run against when they test `colour`: every
/// configured backend of it.
fn target_of(svc: &crate::config::ServiceConfig, colour: Colour) -> Target {
    Target {
        service: svc.name.clone(),
        vip: svc.vip,
        colour,
        backends: svc.pool(colour).to_vec(),
    }
}

fn req_reason(req: &Request) -> Option<String> {
    match req {
        Request::Flip { reason, .. } | Request::Shift { reason, .. } => reason.clone(),
        _ => None,
    }
}
