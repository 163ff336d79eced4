//! Health probes: one task per backend of every service with health
//! checks, each result an event; the rise/fall state per backend, and the
//! pools rewritten when a backend goes down or comes back.

use std::{net::SocketAddr, time::Duration};

use tokio::sync::mpsc;

use super::{Daemon, Event};
use crate::{
    config::HealthConfig,
    health::{self, Health},
    model::Colour,
};

impl Daemon {
    pub(super) fn health_of(&self, service: &str, colour: Colour, index: usize) -> Health {
        self.health
            .get(&(service.to_string(), colour, index))
            .map_or(Health::Unknown, |h| h.state)
    }

    /// (Re)starts one probe task per backend of every service with health checks.
    pub(super) fn start_probes(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
        let Some(tx) = self.tx.clone() else {
            return;
        };
        let mut n = 0usize;
        for svc in &self.config.services {
            let Some(cfg) = svc.health.clone() else {
                continue;
            };
            for colour in Colour::BOTH {
                for (index, addr) in svc.pool(colour).iter().enumerate() {
                    n += 1;
                    self.probes.push(tokio::spawn(probe_loop(
                        tx.clone(),
                        svc.name.clone(),
                        colour,
                        index,
                        *addr,
                        cfg.clone(),
                        health::jitter(cfg.interval, n),
                    )));
                }
            }
        }
        if n > 0 {
            log::info!("health checks: {n} backends");
        }
    }

    pub(super) fn on_probe(
        &mut self,
        service: &str,
        colour: Colour,
        index: usize,
        result: Result<(), String>,
    ) {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return;
        };
        let Some(cfg) = svc.health.clone() else {
            return;
        };
        let Some(addr) = svc.pool(colour).get(index).copied() else {
            return;
        };
        let h = self
            .health
            .entry((service.to_string(), colour, index))
            .or_default();
        let err = result.as_ref().err().cloned();
        let Some(new) = h.observe(result, cfg.rise, cfg.fall) else {
            return;
        };
        match new {
            Health::Down => log::warn!(
                "{service} {colour} backend {addr} is DOWN after {} failed checks: {}; it gets no new flows",
                cfg.fall,
                err.unwrap_or_default()
            ),
            _ => log::info!("{service} {colour} backend {addr} is {new:?} after {} good checks", cfg.rise),
        }
        let states: Vec<Health> = (0..svc.pool(colour).len())
            .map(|i| self.health_of(service, colour, i))
            .collect();
        if health::serving(&states).1 {
            log::error!(
                "{service}: NO healthy backend in the {colour} pool; it keeps serving with all of them"
            );
        }
        if let Err(e) = self.sync_service(service) {
            log::error!("{service}: updating the pools after a health change failed: {e:#}");
        }
        self.publish_report();
    }
}

/// Probes one backend forever, sending each result to the loop.
async fn probe_loop(
    tx: mpsc::Sender<Event>,
    service: String,
    colour: Colour,
    index: usize,
    addr: SocketAddr,
    cfg: HealthConfig,
    offset: Duration,
) {
    tokio::time::sleep(offset).await;
    let mut t = tokio::time::interval(cfg.interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (The host checks at start and reload made it once already.)
    let prober = health::Prober::new(&cfg);
    loop {
        t.tick().await;
        let result = match &prober {
            Ok(p) => p.probe(addr).await,
            Err(e) => Err(e.clone()),
        };
        let ev = Event::Probe {
            service: service.clone(),
            colour,
            index,
            result,
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}
