//! The config applied to the data plane: every service's pools (by health),
//! colour, canary share and preview prefixes, the interfaces attached and
//! detached; at start, on reload (`SIGHUP` or `bgswitch reload`), and for
//! one service after a health change.

use std::collections::HashMap;

use anyhow::{bail, Context as _};

use super::{
    start::{check_environment, enable_ipv6_forward},
    Daemon,
};
use crate::{
    api::Response,
    config,
    dataplane::{backend_of, backend_stat_id, service_key},
    health::{self, Health},
    model::{self, Colour},
};

impl Daemon {
    /// The backends of a pool that serve new flows, with their counter ids.
    fn serving_pool(
        &self,
        svc: &config::ServiceConfig,
        id: u32,
        colour: Colour,
    ) -> Vec<bgswitch_common::Backend> {
        let states: Vec<Health> = (0..svc.pool(colour).len())
            .map(|i| self.health_of(&svc.name, colour, i))
            .collect();
        let (serving, _) = health::serving(&states);
        serving
            .into_iter()
            .map(|i| backend_of(svc.pool(colour)[i], backend_stat_id(id, colour, i as u32)))
            .collect()
    }

    /// Writes one service (pools by health, colour, canary, preview) to the
    /// data plane.
    pub(super) fn sync_service(&mut self, name: &str) -> anyhow::Result<()> {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .with_context(|| format!("service {name} is not configured"))?;
        let st = self.state.service(name)?.clone();
        let blue = self.serving_pool(&svc, st.id, Colour::Blue);
        let green = self.serving_pool(&svc, st.id, Colour::Green);
        let key = service_key(svc.vip, svc.protocol.number());
        self.dataplane
            .set_stateless(st.id, svc.may_run_stateless() && self.rules_by_destination);
        self.dataplane
            .write_service(st.id, key, &blue, &green, st.active)?;
        self.dataplane.set_canary(st.id, st.canary_bp)?;
        let prefixes = st
            .preview
            .iter()
            .map(|p| model::parse_cidr(p))
            .collect::<Result<Vec<_>, _>>()?;
        self.dataplane.set_preview(st.id, &prefixes)?;
        Ok(())
    }

    /// Makes the data plane serve the configured services with the desired
    /// state, and attach to the configured interfaces only.
    pub(super) fn apply_config(&mut self) -> anyhow::Result<()> {
        self.dataplane
            .set_settings(self.config.udp_idle_timeout, self.config.tcp_idle_timeout)?;
        let names: Vec<String> = self
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let mut wanted = HashMap::new();
        for name in &names {
            self.sync_service(name)?;
            let svc = self
                .config
                .services
                .iter()
                .find(|s| &s.name == name)
                .expect("listed");
            wanted.insert(
                service_key(svc.vip, svc.protocol.number()),
                self.state.service(name)?.id,
            );
        }
        for (key, id) in self.dataplane.service_keys()? {
            if wanted.get(&key) != Some(&id) {
                if !wanted.values().any(|w| *w == id) {
                    self.dataplane.remove_service(id, &key)?;
                } else {
                    // Same id now serves another VIP: drop only the old key.
                    self.dataplane.remove_service_key(&key)?;
                }
            }
        }
        self.health.retain(|(s, _, _), _| names.contains(s));
        for iface in self.config.interfaces.clone() {
            if self
                .dataplane
                .attachments()
                .iter()
                .any(|a| a.interface == iface)
            {
                continue;
            }
            self.dataplane
                .attach(&iface, self.config.attach_of(&iface))?;
        }
        let attached: Vec<String> = self
            .dataplane
            .attachments()
            .into_iter()
            .map(|a| a.interface)
            .collect();
        for iface in attached {
            if !self.config.interfaces.contains(&iface) {
                log::info!("{iface}: no longer configured, detaching XDP");
                self.dataplane.detach(&iface)?;
            }
        }
        self.dataplane
            .detach_unknown_pins(&self.config.interfaces)?;
        Ok(())
    }

    pub(super) fn reload(&mut self) -> Response {
        match self.try_reload() {
            Ok(msg) => {
                log::info!("{msg}");
                Response::ok(msg)
            }
            Err(e) => Response::error(format!("{e:#}; the running state is unchanged")),
        }
    }

    fn try_reload(&mut self) -> anyhow::Result<String> {
        let new = config::load(&self.config.path)?;
        check_environment(&new)?;
        for (key, same) in [
            ("bpffs", new.bpffs == self.config.bpffs),
            ("state_dir", new.state_dir == self.config.state_dir),
            ("socket", new.socket == self.config.socket),
            ("socket_group", new.socket_group == self.config.socket_group),
            ("max_flows", new.max_flows == self.config.max_flows),
            (
                "metrics_listen",
                new.metrics_listen == self.config.metrics_listen,
            ),
            ("fleet", new.fleet == self.config.fleet),
        ] {
            if !same {
                bail!(
                    "{}: {key}: changing it needs a daemon restart",
                    new.path.display()
                );
            }
        }
        enable_ipv6_forward(&new)?;
        let mut state = self.state.clone();
        let (added, removed) = state.reconcile(new.service_names())?;
        self.store.save(&state)?;
        let old_config = std::mem::replace(&mut self.config, new);
        let old_state = std::mem::replace(&mut self.state, state);
        if let Err(e) = self.apply_config() {
            // Put back what we can: the old config and state, re-applied.
            self.config = old_config;
            self.state = old_state;
            let _ = self.store.save(&self.state);
            let _ = self.apply_config();
            return Err(e.context("applying the new config failed; restored the old one"));
        }
        self.store.reconfigure(&self.config);
        self.start_probes();
        Ok(format!(
            "reloaded {}: {} services ({} added, {} removed)",
            self.config.path.display(),
            self.config.services.len(),
            added.len(),
            removed.len()
        ))
    }
}
