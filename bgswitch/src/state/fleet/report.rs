//! What the hosts of a fleet tell each other, and what `status --fleet`
//! shows: plain types, shared with the socket protocol.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Colour;

/// What a host publishes under its lease (`hosts/<host>`), and without it
/// (`seen/<host>`, so a host that went away is still listed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    /// bgswitch's version on it.
    pub version: String,
    /// Unix time in milliseconds of this report.
    pub at_ms: u64,
    /// The generation it applied, per service.
    pub applied: BTreeMap<String, u64>,
    /// Backends it does not see up (down, or not checked yet), per service
    /// and colour: "198.18.1.21:8080 (down)".
    #[serde(default)]
    pub unhealthy: BTreeMap<String, BTreeMap<Colour, Vec<String>>>,
    /// A digest of each service's definition (VIP, protocol, pools): hosts
    /// whose digests differ do not serve the same service.
    #[serde(default)]
    pub definitions: BTreeMap<String, String>,
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Services changed on this host alone (`--local`) and not yet
    /// reconciled with the fleet.
    #[serde(default)]
    pub diverged: Vec<String>,
}

/// This host's view of the fleet's store, for `status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetLocal {
    pub cluster: String,
    pub host: String,
    pub etcd: Vec<String>,
    pub reachable: bool,
    /// Since when etcd has not answered (Unix ms), while it does not.
    pub unreachable_since_ms: Option<u64>,
    /// The last error talking to etcd.
    pub error: Option<String>,
    /// Services changed here alone (`--local`), not yet reconciled.
    pub diverged: Vec<String>,
}

/// `status --fleet`: the fleet's desired state and every host's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub local: FleetLocal,
    pub services: Vec<FleetService>,
    /// Every host that ever reported, live (its lease holds) or not.
    pub hosts: Vec<FleetHost>,
}

/// A service as the fleet keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetService {
    pub name: String,
    pub generation: u64,
    pub active: Option<Colour>,
    /// Who made its last change, and from which host.
    pub changed_by: Option<String>,
    /// Live hosts whose definition of it differs from the others' (the
    /// most common digest is taken as the fleet's).
    pub mismatched: Vec<String>,
}

/// One host in `status --fleet`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHost {
    pub live: bool,
    /// Milliseconds since its last report.
    pub last_seen_ms_ago: u64,
    pub report: HostReport,
}

impl FleetStatus {
    /// Live hosts that have not applied `generation` of `service`.
    pub fn behind(&self, service: &str, generation: u64) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| h.live)
            .filter(|h| h.report.applied.get(service).copied().unwrap_or(0) < generation)
            .map(|h| {
                format!(
                    "{} (at generation {})",
                    h.report.host,
                    h.report.applied.get(service).copied().unwrap_or(0)
                )
            })
            .collect()
    }
}
