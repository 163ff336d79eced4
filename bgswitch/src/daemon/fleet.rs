//! The daemon in a fleet (`[fleet]`, the store `state::EtcdStore`): what
//! this host tells the others (applied generations, its health view, its
//! definitions, interfaces), and the guard a flip passes on every live
//! host's view: no host may see the target colour unhealthy, and every
//! live host must serve the same definition of the service.

use std::collections::BTreeMap;

use super::{now_ms, Daemon};
use crate::{model::Colour, state::HostReport};

impl Daemon {
    /// Tells the fleet what this host applied and sees (nothing without a
    /// fleet); the store puts it when it changed.
    pub(super) fn publish_report(&mut self) {
        if self.store.fleet_local().is_none() {
            return;
        }
        let mut report = HostReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            at_ms: now_ms(),
            interfaces: self.config.interfaces.clone(),
            ..HostReport::default()
        };
        for svc in &self.config.services {
            if let Ok(st) = self.state.service(&svc.name) {
                report.applied.insert(svc.name.clone(), st.generation);
            }
            report
                .definitions
                .insert(svc.name.clone(), svc.definition_digest());
            let mut by_colour = BTreeMap::new();
            for c in Colour::BOTH {
                let bad = self.unhealthy(&svc.name, c);
                if !bad.is_empty() {
                    by_colour.insert(c, bad);
                }
            }
            if !by_colour.is_empty() {
                report.unhealthy.insert(svc.name.clone(), by_colour);
            }
        }
        self.store.report(report);
    }

    /// Why the fleet refuses a change of `service` sending new flows to
    /// `target` (a flip; a shift or preview prefix, with `None` health
    /// being asked): a live host that sees the target unhealthy (naming
    /// host and backends), or one whose definition of the service differs
    /// from this host's. `None` without a fleet, or when etcd does not
    /// answer (the change itself is refused then). Rollbacks, undos and
    /// confirmations are never held up by it.
    pub(super) fn fleet_refusal(&self, service: &str, target: Option<Colour>) -> Option<String> {
        let me = self.store.fleet_local()?.host;
        let peers = self.store.peers()?.ok()?;
        let mine = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)?
            .definition_digest();
        let mut why = Vec::new();
        for p in peers.iter().filter(|p| p.host != me) {
            if let Some((t, bad)) =
                target.and_then(|t| Some((t, p.unhealthy.get(service)?.get(&t)?)))
            {
                why.push(format!("{} sees {t} unhealthy: {}", p.host, bad.join(", ")));
            }
            match p.definitions.get(service) {
                Some(d) if *d != mine => why.push(format!(
                    "{} serves another definition of {service} (VIP, protocol or pools differ from this host's)",
                    p.host
                )),
                None => why.push(format!("{} does not serve {service}", p.host)),
                _ => {}
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}
