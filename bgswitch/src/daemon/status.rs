//! What `status`, `status --json` and `/metrics` show: per service and
//! colour, the desired state, counters, health and live flows; per
//! interface, its attachment; the global counters.

use std::collections::HashMap;

use super::Daemon;
use crate::{
    api::{
        self, BackendStatus, ColourStatus, InterfaceStatus, Response, ServiceStatus,
        TransitionStatus,
    },
    dataplane::{self, backend_stat_id},
    health::{self, Health},
    model::Colour,
};

pub(super) fn status_response(status: anyhow::Result<api::Status>) -> Response {
    match status {
        Ok(status) => Response {
            ok: true,
            status: Some(status),
            ..Response::default()
        },
        Err(e) => Response::error(format!("{e:#}")),
    }
}

/// A service's live records whose backend is not the active pool's hash
/// choice, in a scan's counts (both colours): a transition ends at none.
pub(super) fn disagreeing(counts: &HashMap<(u32, Colour), dataplane::FlowCounts>, id: u32) -> u64 {
    Colour::BOTH
        .iter()
        .filter_map(|c| counts.get(&(id, *c)))
        .map(|c| c.disagreeing)
        .sum()
}

impl Daemon {
    pub(super) fn status(&self, only: Option<&str>) -> Response {
        status_response(self.collect_status(only))
    }

    fn collect_status(&self, only: Option<&str>) -> anyhow::Result<api::Status> {
        if let Some(name) = only {
            self.state.service(name)?;
        }
        let flows = self
            .dataplane
            .flow_counts(self.config.udp_idle_timeout, self.config.tcp_idle_timeout)?;
        self.collect_status_with(only, &flows)
    }

    pub(super) fn collect_status_with(
        &self,
        only: Option<&str>,
        flows: &HashMap<(u32, Colour), dataplane::FlowCounts>,
    ) -> anyhow::Result<api::Status> {
        if let Some(name) = only {
            self.state.service(name)?;
        }
        let mut services = Vec::new();
        for svc in &self.config.services {
            if only.is_some_and(|n| n != svc.name) {
                continue;
            }
            let st = self.state.service(&svc.name)?;
            let mut colours = Vec::new();
            for c in Colour::BOTH {
                let stats = self.dataplane.colour_stats(st.id, c)?;
                let fc = flows.get(&(st.id, c)).copied().unwrap_or_default();
                let states: Vec<Health> = (0..svc.pool(c).len())
                    .map(|i| self.health_of(&svc.name, c, i))
                    .collect();
                let (serving, all_down) = health::serving(&states);
                let mut backends = Vec::new();
                for (i, a) in svc.pool(c).iter().enumerate() {
                    let b = self
                        .dataplane
                        .backend_stats(backend_stat_id(st.id, c, i as u32))?;
                    let h = self.health.get(&(svc.name.clone(), c, i));
                    backends.push(BackendStatus {
                        address: a.to_string(),
                        packets: b.packets,
                        bytes: b.bytes,
                        new_flows: b.new_flows,
                        reply_packets: b.reply_packets,
                        health: states[i],
                        health_error: h.and_then(|h| h.last_error.clone()),
                        serving: serving.contains(&i),
                    });
                }
                colours.push(ColourStatus {
                    colour: c,
                    active: c == st.active,
                    backends,
                    live_flows: fc.live,
                    untracked: self.dataplane.untracked_colour(st.id) == Some(c),
                    recorded_flows: fc.recorded,
                    packets: stats.packets,
                    bytes: stats.bytes,
                    new_flows: stats.new_flows,
                    reply_packets: stats.reply_packets,
                    reply_bytes: stats.reply_bytes,
                    backend_rsts: stats.backend_rsts,
                    syn_acks: stats.syn_acks,
                    unanswered_syns: fc.unanswered,
                    preview_flows: fc.preview,
                    pool_healthy: self.unhealthy(&svc.name, c).is_empty(),
                    all_down: svc.health.is_some() && all_down,
                });
            }
            services.push(ServiceStatus {
                name: svc.name.clone(),
                vip: svc.vip.to_string(),
                protocol: svc.protocol.to_string(),
                active: st.active,
                generation: st.generation,
                previous: st.previous,
                colours,
                last_change: st.history.last().cloned(),
                canary_percent: f64::from(st.canary_bp) / 100.0,
                preview: st.preview.clone(),
                watch: st.watch.clone(),
                confirm: st.confirm.clone(),
                rolled_back: st.rolled_back.clone(),
                flips: st.flips,
                rollbacks: st.rollbacks,
                health_checks: svc.health.is_some(),
                transition: self
                    .dataplane
                    .transition_since(st.id)
                    .map(|t| TransitionStatus {
                        since_s: t.elapsed().as_secs(),
                        idle_timeout_s: self.config.tcp_idle_timeout.as_secs(),
                        disagreeing: disagreeing(flows, st.id),
                    }),
                checks: self.check_status(&svc.name),
                fast_path: if self.dataplane.is_stateless(st.id) {
                    "stateless"
                } else if self.dataplane.transition_since(st.id).is_some() {
                    "transition"
                } else {
                    "table"
                }
                .to_string(),
            });
        }
        let attachments = self.dataplane.attachments();
        // Configured interfaces the program does not serve now (gone,
        // re-created and not attached yet, or taken by someone else).
        let unserved = self
            .config
            .interfaces
            .iter()
            .filter(|name| {
                let now = dataplane::ifindex(name);
                !attachments
                    .iter()
                    .any(|a| &a.interface == *name && Some(a.ifindex) == now)
            })
            .cloned()
            .collect();
        let interfaces = attachments
            .into_iter()
            .map(|a| InterfaceStatus {
                name: a.interface,
                ifindex: a.ifindex,
                mode: a.mode,
                adopted: a.adopted,
                reason: a.reason,
                fallback_reason: a.fallback_reason,
            })
            .collect();
        let mut counters: std::collections::BTreeMap<String, u64> = self
            .dataplane
            .global_stats()?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // How often every kept next hop and flow-cache slot was invalidated
        // (route, neighbour or link changes, flow deletions): pinned, so
        // monotonic across restarts like the kernel's counters.
        counters.insert("cache_invalidations".to_string(), self.dataplane.flow_gen());
        Ok(api::Status {
            services,
            interfaces,
            counters,
            flow_table_scans: self.dataplane.flow_table_reads(),
            backend_hops: self.rules_by_destination,
            pins: self.dataplane.pin_place().map(|p| api::PinsStatus {
                bpffs: p.configured.display().to_string(),
                outlive_daemon: true,
                note: p.note.clone(),
            }),
            config: self.config.path.display().to_string(),
            pid: std::process::id(),
            fleet: self.store.fleet_local(),
            unserved,
            durable_writes: self.durable_writes.clone(),
        })
    }
}
