//! Flow-table scans, run on a blocking thread one at a time (a large table
//! takes long to read; flips never wait for it): the status answers that
//! need live-flow counts, and the transitions of stateless services that
//! may end (no live record disagreeing with the active pool's hash), with
//! the routing rules that allow stable periods at all.

use std::{collections::HashMap, time::Duration};

use super::{
    status::{disagreeing, status_response},
    Daemon, Event, StatusWaiter,
};
use crate::{dataplane, metrics, model::Colour};

/// How often a due transition may read the whole flow table to see whether
/// it can end (about 0.8 s of a blocking thread per million flows).
const TRANSITION_SCAN_EVERY: Duration = Duration::from_secs(5);

impl Daemon {
    /// Once a second: a scan for the transitions that may end, unless one
    /// runs or one began less than `TRANSITION_SCAN_EVERY` ago.
    pub(super) fn scan_for_transitions(&mut self) {
        let rested = self
            .transition_scan_at
            .is_none_or(|t| t.elapsed() >= TRANSITION_SCAN_EVERY);
        if rested && !self.scan_running && !self.transitions_due().is_empty() {
            self.transition_scan_at = Some(std::time::Instant::now());
            self.start_scan(Vec::new());
        }
    }

    /// Live-flow counts need the whole flow table read, which takes long
    /// with a large table (hundreds of ms for a million flows): it runs on a
    /// blocking thread, so flips and other requests are not held up. One
    /// scan at a time; requests arriving meanwhile wait for the next one.
    pub(super) fn status_request(&mut self, w: StatusWaiter) {
        if self.scan_running {
            self.scan_waiting.push(w);
        } else {
            self.start_scan(vec![w]);
        }
    }

    fn start_scan(&mut self, waiters: Vec<StatusWaiter>) {
        let (udp, tcp) = (self.config.udp_idle_timeout, self.config.tcp_idle_timeout);
        let (Some(tx), Ok(scan)) = (self.tx.clone(), self.dataplane.flow_scan(udp, tcp)) else {
            // No loop to come back to, or the clock or descriptor failed:
            // count here.
            let counts = self.dataplane.flow_counts(udp, tcp).map_err(Into::into);
            return self.answer_status(counts, waiters);
        };
        self.scan_running = true;
        let words = scan.words.clone();
        let at = std::time::Instant::now();
        tokio::spawn(async move {
            let counts = tokio::task::spawn_blocking(move || scan.count())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let _ = tx
                .send(Event::FlowsCounted {
                    counts,
                    waiters,
                    words,
                    at,
                })
                .await;
        });
    }

    pub(super) fn flows_counted(
        &mut self,
        counts: std::io::Result<HashMap<(u32, Colour), dataplane::FlowCounts>>,
        waiters: Vec<StatusWaiter>,
        words: HashMap<u32, u32>,
        at: std::time::Instant,
    ) {
        self.scan_running = false;
        let counts = match counts {
            Ok(c) => Ok(c),
            // A kernel without batch reads of this map: entry by entry, here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(524) => {
                self.dataplane
                    .flow_counts(self.config.udp_idle_timeout, self.config.tcp_idle_timeout)
                    .map_err(Into::into)
            }
            Err(e) => Err(anyhow::Error::new(e).context("reading the flow table")),
        };
        // The waiters get the counts of the state they were read in; a
        // transition that ends now (and drops its records) shows in the next.
        let ended = counts.as_ref().ok().cloned();
        self.answer_status(counts, waiters);
        if let Some(c) = ended {
            self.end_transitions(&c, &words, at);
        }
        if !self.scan_waiting.is_empty() {
            let next = std::mem::take(&mut self.scan_waiting);
            self.start_scan(next);
        }
    }

    fn answer_status(
        &self,
        counts: anyhow::Result<HashMap<(u32, Colour), dataplane::FlowCounts>>,
        waiters: Vec<StatusWaiter>,
    ) {
        for w in waiters {
            let status = |only: Option<&str>| match &counts {
                Ok(c) => self.collect_status_with(only, c),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            };
            match w {
                StatusWaiter::Status { only, reply } => {
                    let _ = reply.send(status_response(status(only.as_deref())));
                }
                StatusWaiter::Scrape { reply } => {
                    let _ = reply.send(status(None).map(|s| metrics::render(&s)));
                }
            }
        }
    }

    /// Whether the IPv4 routing rules pick routes by destination only (a
    /// failure to read them counts as "no").
    pub(super) fn read_rules(&self) -> bool {
        crate::netlink::ipv4_rules_by_destination_only().unwrap_or_else(|e| {
            log::warn!("cannot read the IPv4 routing rules ({e}): every new flow looks its next hop up, and stateless services keep their flow table");
            false
        })
    }

    /// Once a second: a routing rule that selects on more than the
    /// destination makes every new IPv4 flow look its own next hop up
    /// (not its backend's) and ends every stable period (each flow records
    /// its own next hop again); when the rules are back, both return.
    pub(super) fn check_rules(&mut self) {
        let ok = self.read_rules();
        if ok == self.rules_by_destination {
            return;
        }
        self.rules_by_destination = ok;
        if let Err(e) = self.dataplane.set_backend_hops(ok) {
            log::error!(
                "routing rules changed, but the data plane's settings could not follow: {e:#}"
            );
        }
        if self.config.services.iter().any(|s| s.may_run_stateless()) {
            if ok {
                log::info!("routing rules select by destination only: stateless services may start stable periods");
            } else {
                log::warn!(
                    "a routing rule selects on more than the destination: stateless services record their flows again (a next hop per backend would be wrong for some clients)"
                );
            }
        }
        for svc in self.config.services.clone() {
            if let Ok(st) = self.state.service(&svc.name) {
                self.dataplane
                    .set_stateless(st.id, svc.may_run_stateless() && ok);
            }
        }
    }

    /// Services whose transition may end now: one with an orphan pool a TCP
    /// idle timeout after its transition began (no connection of the last
    /// stable period can be left), and one that may start a stable period
    /// and has no orphan pool at once (every open connection has a record).
    fn transitions_due(&self) -> Vec<u32> {
        let mut due = Vec::new();
        for svc in &self.config.services {
            let Ok(st) = self.state.service(&svc.name) else {
                continue;
            };
            let w = self.dataplane.control_word(st.id);
            if !bgswitch_common::control::enabled(w) || bgswitch_common::control::stateless(w) {
                continue;
            }
            match self.dataplane.transition_since(st.id) {
                Some(t) if t.elapsed() >= self.config.tcp_idle_timeout => due.push(st.id),
                Some(_) => {}
                None if self.dataplane.may_start_stable_period(st.id) => due.push(st.id),
                None => {}
            }
        }
        due
    }

    /// After a flow-table scan: ends the transitions that were due before
    /// it began and whose scan found no live record disagreeing with the
    /// active pool's hash choice.
    fn end_transitions(
        &mut self,
        counts: &HashMap<(u32, Colour), dataplane::FlowCounts>,
        words: &HashMap<u32, u32>,
        at: std::time::Instant,
    ) {
        for id in self.transitions_due() {
            let Some(&word) = words.get(&id) else {
                continue;
            };
            if let Some(t) = self.dataplane.transition_since(id) {
                if at < t + self.config.tcp_idle_timeout {
                    continue;
                }
            }
            if disagreeing(counts, id) > 0 {
                continue;
            }
            let name = self
                .state
                .services
                .iter()
                .find(|(_, s)| s.id == id)
                .map_or_else(|| format!("id {id}"), |(n, _)| n.clone());
            match self.dataplane.end_transition(id, word) {
                Ok(Some(flushed)) if self.dataplane.is_stateless(id) => log::info!(
                    "{name}: stable period begins: packets follow the active pool's hash without the flow table ({flushed} records of the transition removed)"
                ),
                Ok(Some(_)) => log::info!("{name}: transition over: connections of the last stateless period are gone"),
                Ok(None) => {}
                Err(e) => log::warn!("{name}: ending the transition failed: {e}"),
            }
        }
    }
}
