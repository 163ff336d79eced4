//! The guards of a flip: a watch (health checks and the error signal of the
//! new colour) that rolls back by itself, and a confirmation deadline; a
//! guard's end (passed, or no rollback possible) journalled like a change.

use std::time::Duration;

use bgswitch_common::ColourStats;

use super::{ms, now_ms, Daemon};
use crate::{
    config, dataplane,
    health::Health,
    model::{self, DesiredState},
};

/// New flows needed before an error rate is judged.
const MIN_ERROR_SAMPLE: u64 = 10;

/// Counters at the start of a watch, to judge the error rate since, and the
/// new-flow count sampled once a second (to know which flows are older than
/// the SYN timeout).
#[derive(Clone)]
pub(super) struct Baseline {
    stats: ColourStats,
    samples: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Baseline {
    pub(super) fn new(stats: ColourStats) -> Self {
        Self {
            stats,
            samples: std::collections::VecDeque::new(),
        }
    }
}

impl Daemon {
    /// Every tick: a confirmation deadline passed rolls back; a watch that
    /// ran its time ends (journalled), one that sees its colour fail rolls
    /// back.
    pub(super) fn check_guards(&mut self) {
        let now = now_ms();
        let names: Vec<String> = self.state.services.keys().cloned().collect();
        for name in names {
            let Ok(st) = self.state.service(&name).cloned() else {
                continue;
            };
            if let Some(c) = &st.confirm {
                if now >= c.deadline_ms {
                    let why = format!(
                        "not confirmed within the deadline (bgswitch confirm {name}); back to {}",
                        c.colour.other()
                    );
                    self.auto_rollback(&name, &why, Vec::new());
                    continue;
                }
            }
            let Some(w) = &st.watch else {
                self.baselines.remove(&name);
                continue;
            };
            if now >= w.until_ms {
                log::info!("{name}: watch of {} passed; no rollback", w.colour);
                self.end_guard(&name, |s| s.end_watch(&name, now));
                self.baselines.remove(&name);
                continue;
            }
            if let Some(why) = self.watch_failure(&name, st.id, w) {
                self.auto_rollback(&name, &why, Vec::new());
            }
        }
    }

    /// Why the watched colour failed, if it did.
    fn watch_failure(&mut self, name: &str, id: u32, w: &model::Watch) -> Option<String> {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == name)?
            .clone();
        if let Some(cfg) = &svc.health {
            let down: Vec<String> = svc
                .pool(w.colour)
                .iter()
                .enumerate()
                .filter(|(i, _)| self.health_of(name, w.colour, *i) == Health::Down)
                .map(|(_, a)| a.to_string())
                .collect();
            if !down.is_empty() {
                return Some(format!(
                    "{} backends failed health checks ({} × {}): {}",
                    w.colour,
                    cfg.fall,
                    ms(cfg.interval),
                    down.join(", ")
                ));
            }
        }
        let max = w.max_error_rate?;
        // Judged once a second.
        if !self.ticks.is_multiple_of(5) {
            return None;
        }
        let stats = self.dataplane.colour_stats(id, w.colour).ok()?;
        let tcp = svc.protocol == config::Protocol::Tcp;
        let base = self
            .baselines
            .entry(name.to_string())
            .or_insert_with(|| Baseline::new(stats));
        let now = std::time::Instant::now();
        base.samples.push_back((now, stats.new_flows));
        let syn_timeout = Duration::from_secs(dataplane::SYN_TIMEOUT_S);
        while base.samples.len() > 2 && now - base.samples[1].0 >= syn_timeout {
            base.samples.pop_front();
        }
        let new_flows = stats.new_flows.saturating_sub(base.stats.new_flows);
        if new_flows < MIN_ERROR_SAMPLE {
            return None;
        }
        let rsts = stats.backend_rsts.saturating_sub(base.stats.backend_rsts);
        // Unanswered SYNs from the kernel's counters, without scanning the flow
        // table: flows chosen at least the SYN timeout ago, minus the SYN-ACKs
        // and RSTs their backends sent. Conservative: an RST on an established
        // connection or a retransmitted SYN-ACK only lowers the estimate.
        let unanswered = match base.samples.front() {
            Some((at, old_new)) if tcp && now - *at >= syn_timeout => old_new
                .saturating_sub(base.stats.new_flows)
                .saturating_sub(stats.syn_acks.saturating_sub(base.stats.syn_acks))
                .saturating_sub(rsts),
            _ => 0,
        };
        let rate = (rsts + unanswered) as f64 / new_flows as f64;
        (rate > max).then(|| {
            format!(
                "{} error rate {:.3} > {max} ({rsts} RSTs from backends + {unanswered} unanswered SYNs over {new_flows} new flows)",
                w.colour, rate
            )
        })
    }

    /// Rolls `name` back by itself, journalling why (and the user's
    /// `checks` that failed, when one did).
    pub(super) fn auto_rollback(&mut self, name: &str, why: &str, checks: Vec<model::CheckRecord>) {
        let mut next = self.scratch(name);
        match next.auto_rollback(name, why, now_ms(), checks) {
            Ok(change) => {
                log::warn!(
                    "{name}: AUTOMATIC ROLLBACK {} → {}: {why}",
                    change.from,
                    change.to
                );
                let r = self.commit(name, next, change, false);
                if !r.ok {
                    log::error!(
                        "{name}: automatic rollback failed: {}",
                        r.error.unwrap_or_default()
                    );
                }
            }
            Err(e) => {
                log::error!("{name}: cannot roll back ({e}); clearing the guard");
                let why = format!("cannot roll back ({e}): {why}");
                self.end_guard(name, |s| s.clear_guard(name, &why, now_ms()));
            }
        }
        self.baselines.remove(name);
    }

    /// Ends a flip's guard without a rollback (a watch that passed, a guard
    /// no rollback can satisfy): journalled like a change, one line with the
    /// service's state after it, and the snapshot follows on a tick. If the
    /// journal cannot take the line, the guard ends all the same, in memory:
    /// a restart would find it again, past its time, and end it again.
    fn end_guard(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut DesiredState) -> Result<model::Change, model::ModelError>,
    ) {
        let mut next = self.scratch(name);
        let change = match f(&mut next) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{name}: {e}");
                return;
            }
        };
        let Some(after) = next.services.remove(name) else {
            return;
        };
        if let Err(e) = self.durably(|store| store.record(name, &change, &after)) {
            log::error!(
                "{name}: journalling \"{}\": {e}; ended in memory only (a restart would end it again)",
                change.kind
            );
        }
        self.state.services.insert(name.to_string(), after);
    }
}
