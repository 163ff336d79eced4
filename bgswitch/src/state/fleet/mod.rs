//! The desired state of a fleet (`[fleet]`), shared through etcd: the
//! [`DesiredStore`](super::DesiredStore) the daemons of several
//! load-balancer hosts use to switch as one.
//!
//! Keys, under `/bgswitch/<cluster>/`:
//! - `state/<service>` — the service's whole state (JSON, as the local
//!   journal keeps it). A change is one transaction comparing the key's
//!   revision with the one this host last saw: of two concurrent changes
//!   exactly one wins, the other is refused naming who moved it.
//! - `journal/<service>/<generation>` — the change (who, when, why, from
//!   which host), written in the same transaction; `refused/<service>/…` —
//!   refused attempts. `history` reads both.
//! - `hosts/<host>` (under a lease: gone a few seconds after the host) and
//!   `seen/<host>` — what each host applied, sees and serves (`report`).
//!
//! Every host follows `state/` (a watch, read in full on every
//! reconnection) and applies changes in revision order; it keeps what it
//! applied in its own state directory too (a [`LocalStore`]), so a daemon
//! started while etcd is down serves the last state it applied. While etcd
//! does not answer, changes are refused, except `--local` ones, kept here
//! and marked diverged; when etcd answers again the loop proposes them to
//! the fleet if the fleet's state is still the one they started from, or
//! takes the fleet's (`daemon/changes.rs`, `follow`).
//!
//! Inside: `etcd` (the client's runtime, follower, publisher), `report`
//! (what hosts publish, what `status --fleet` shows).

mod etcd;
mod report;

use std::collections::{BTreeMap, HashMap};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::{mpsc::UnboundedReceiver, watch};

pub use report::{FleetHost, FleetLocal, FleetService, FleetStatus, HostReport};

use super::{DesiredStore, ExternalChange, HistoryReader, JournalEntry, LocalStore, StateError};
use crate::{
    config::{Config, FleetConfig},
    model::{Change, DesiredState, ServiceState},
};

/// A host's report is put again at least this often (ms).
const REPORT_EVERY_MS: u64 = 2000;

/// The fleet's key layout.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    root: String,
}

impl Keys {
    fn new(cluster: &str) -> Self {
        Self {
            root: format!("/bgswitch/{cluster}/"),
        }
    }
    fn states(&self) -> String {
        format!("{}state/", self.root)
    }
    fn state(&self, service: &str) -> String {
        format!("{}state/{service}", self.root)
    }
    fn journal(&self, service: &str, generation: u64) -> String {
        format!("{}journal/{service}/{generation:020}", self.root)
    }
    fn journals(&self, service: Option<&str>) -> String {
        match service {
            Some(s) => format!("{}journal/{s}/", self.root),
            None => format!("{}journal/", self.root),
        }
    }
    fn refused(&self, service: &str, at_ms: u64, host: &str) -> String {
        format!("{}refused/{service}/{at_ms:020}-{host}", self.root)
    }
    fn refusals(&self, service: Option<&str>) -> String {
        match service {
            Some(s) => format!("{}refused/{s}/", self.root),
            None => format!("{}refused/", self.root),
        }
    }
    fn host(&self, host: &str) -> String {
        format!("{}hosts/{host}", self.root)
    }
    fn hosts(&self) -> String {
        format!("{}hosts/", self.root)
    }
    fn seen(&self, host: &str) -> String {
        format!("{}seen/{host}", self.root)
    }
    fn seens(&self) -> String {
        format!("{}seen/", self.root)
    }
    fn service_of(&self, key: &[u8]) -> Option<String> {
        let k = std::str::from_utf8(key).ok()?;
        let s = k.strip_prefix(&self.states())?;
        (!s.is_empty() && !s.contains('/')).then(|| s.to_string())
    }
}

/// A fleet's store: etcd, and this host's state directory beside it.
pub struct EtcdStore {
    local: LocalStore,
    etcd: etcd::Etcd,
    keys: Keys,
    cfg: FleetConfig,
    /// The revision of each service's state key this host last saw: what a
    /// change compares against.
    revs: HashMap<String, i64>,
    /// Services changed here alone (`--local`), with the generation the
    /// first such change started from.
    diverged: BTreeMap<String, u64>,
    /// The revision `load` read at; the follower starts after it.
    loaded_at: i64,
    /// `load` read the fleet's state (etcd answered at start).
    loaded: bool,
    reports: watch::Sender<HostReport>,
    publishing: bool,
}

impl EtcdStore {
    /// `local`: this host's state directory. Makes no call to etcd.
    pub fn open(local: LocalStore, cfg: &FleetConfig) -> anyhow::Result<Self> {
        let etcd = etcd::Etcd::open(cfg)?;
        let (reports, _) = watch::channel(HostReport {
            host: cfg.host.clone(),
            ..HostReport::default()
        });
        Ok(Self {
            local,
            etcd,
            keys: Keys::new(&cfg.cluster),
            cfg: cfg.clone(),
            revs: HashMap::new(),
            diverged: BTreeMap::new(),
            loaded_at: 0,
            loaded: false,
            reports,
            publishing: false,
        })
    }

    fn fleet_error(&self, what: &str, e: &str) -> StateError {
        let since = self
            .etcd
            .reach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since_ms;
        StateError::Fleet(format!(
            "{what}: etcd ({}) unreachable{}: {e}; the data plane keeps the state last applied (a change with --local applies on this host only)",
            self.cfg.etcd.join(", "),
            since
                .map(|s| format!(" for {:.1} s", crate::state::now_ms().saturating_sub(s) as f64 / 1000.0))
                .unwrap_or_default()
        ))
    }

    /// The change, as the fleet's journal keeps it: with this host's name.
    fn entry(&self, service: &str, outcome: String, change: &Change) -> JournalEntry {
        let mut change = change.clone();
        change.host = Some(self.cfg.host.clone());
        JournalEntry {
            service: service.to_string(),
            outcome,
            change,
            seq: None,
            state: None,
        }
    }
}

impl DesiredStore for EtcdStore {
    /// This host's state directory, then, if etcd answers, the fleet's
    /// state of every service it has (the fleet's wins); a service the
    /// fleet lacks is written there from this host's state.
    fn load(&mut self) -> Result<DesiredState, StateError> {
        let mut state = self.local.load()?;
        let keys = self.keys.clone();
        let prefix = keys.states();
        let read = self.etcd.call(move |mut c| async move {
            c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
        });
        match read {
            Err(e) => {
                log::warn!(
                    "fleet {}: etcd unreachable at start ({e}): serving the state this host last applied",
                    self.cfg.cluster
                );
            }
            Ok(resp) => {
                self.loaded = true;
                self.loaded_at = resp.header().map_or(0, |h| h.revision());
                for kv in resp.kvs() {
                    let Some(name) = keys.service_of(kv.key()) else {
                        continue;
                    };
                    let fleet: ServiceState = match serde_json::from_slice(kv.value()) {
                        Ok(s) => s,
                        Err(e) => {
                            log::error!("fleet: state of {name}: {e}; ignored");
                            continue;
                        }
                    };
                    self.revs.insert(name.clone(), kv.mod_revision());
                    if let Ok(mine) = state.service(&name) {
                        if mine.generation != fleet.generation || mine.active != fleet.active {
                            log::info!(
                                "fleet: {name}: taking the fleet's state (generation {}, {}) over this host's (generation {}, {})",
                                fleet.generation, fleet.active, mine.generation, mine.active
                            );
                            let _ = state.follow(&name, &fleet);
                        }
                    }
                }
            }
        }
        Ok(state)
    }

    fn record(
        &mut self,
        service: &str,
        change: &Change,
        after: &ServiceState,
    ) -> Result<(), StateError> {
        let key = self.keys.state(service);
        let rev = self.revs.get(service).copied().unwrap_or(0);
        // The fleet's copy names the host the change was made on.
        let mut shared = after.clone();
        if let Some(last) = shared.history.last_mut() {
            last.host = Some(self.cfg.host.clone());
        }
        let body = serde_json::to_vec(&shared).map_err(|e| StateError::Fleet(e.to_string()))?;
        let entry = serde_json::to_vec(&self.entry(service, "ok".into(), change))
            .map_err(|e| StateError::Fleet(e.to_string()))?;
        let journal = self.keys.journal(service, change.generation);
        let k2 = key.clone();
        let r = self.etcd.call(move |mut c| async move {
            c.txn(
                Txn::new()
                    .when([Compare::mod_revision(k2.clone(), CompareOp::Equal, rev)])
                    .and_then([
                        TxnOp::put(k2.clone(), body, None),
                        TxnOp::put(journal, entry, None),
                    ])
                    .or_else([TxnOp::get(k2, None)]),
            )
            .await
        });
        let resp =
            r.map_err(|e| self.fleet_error(&format!("{service}: recording the change"), &e))?;
        if !resp.succeeded() {
            // Who moved it: the state there now.
            let now = resp.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                    (
                        kv.mod_revision(),
                        serde_json::from_slice::<ServiceState>(kv.value()).ok(),
                    )
                }),
                _ => None,
            });
            let (now_rev, by) = match now {
                Some((r, Some(s))) => (
                    r,
                    s.history
                        .last()
                        .map(|c| {
                            format!(
                                "{} {} by {}{}, generation {}",
                                c.kind,
                                c.describe(),
                                c.user,
                                c.host
                                    .as_deref()
                                    .map(|h| format!(" on {h}"))
                                    .unwrap_or_default(),
                                s.generation
                            )
                        })
                        .unwrap_or_else(|| format!("generation {}", s.generation)),
                ),
                Some((r, None)) => (r, "a state this host cannot read".into()),
                None => (0, "its removal".into()),
            };
            if now_rev > 0 {
                log::info!("fleet: {service}: the fleet has it at revision {now_rev}; following");
            }
            return Err(StateError::Fleet(format!(
                "{service} was changed elsewhere since this host last saw it ({by}): this host follows that change — look at `status` and ask again"
            )));
        }
        if let Some(h) = resp.header() {
            self.revs.insert(service.to_string(), h.revision());
        }
        // This host keeps what it applied, for a start while etcd is down.
        // The fleet has the change: it is made whatever this copy does.
        if let Err(e) = self.local.record(service, change, after) {
            log::error!(
                "{service}: the fleet has the change, this host's copy of it failed: {e} (a start while etcd is down would serve the state before it)"
            );
        }
        self.diverged.remove(service);
        Ok(())
    }

    fn record_revert(
        &mut self,
        service: &str,
        why: &str,
        change: &Change,
        before: &ServiceState,
    ) -> Result<(), StateError> {
        // The fleet keeps the change (others may have applied it); this
        // host's data plane refused it: its own journal says so, and the
        // next change or follow puts it right.
        self.local.record_revert(service, why, change, before)
    }

    fn record_refusal(
        &mut self,
        service: &str,
        why: &str,
        change: &Change,
    ) -> Result<(), StateError> {
        self.local.record_refusal(service, why, change)?;
        let key = self.keys.refused(service, change.at_ms, &self.cfg.host);
        let body = serde_json::to_vec(&self.entry(service, format!("refused: {why}"), change))
            .map_err(|e| StateError::Fleet(e.to_string()))?;
        // Best effort: a refusal changes nothing, and etcd may be what refused.
        let _ = self
            .etcd
            .call(move |mut c| async move { c.put(key, body, None).await });
        Ok(())
    }

    fn record_local(
        &mut self,
        service: &str,
        change: &Change,
        after: &ServiceState,
    ) -> Result<(), StateError> {
        self.local.record(service, change, after)?;
        self.diverged
            .entry(service.to_string())
            .or_insert(change.generation_before);
        log::warn!(
            "fleet: {service}: changed on this host alone (--local, generation {} → {}): diverged from the fleet until etcd answers",
            change.generation_before, change.generation
        );
        Ok(())
    }

    fn applied(&mut self, ext: &ExternalChange) {
        self.revs.insert(ext.service.clone(), ext.revision);
        if let Err(e) = self.local.record(&ext.service, &ext.change, &ext.after) {
            log::error!("{}: keeping the change followed: {e}", ext.service);
        }
    }

    fn seen(&mut self, service: &str, revision: i64) {
        self.revs.insert(service.to_string(), revision);
    }

    fn diverged(&self, service: &str) -> Option<u64> {
        self.diverged.get(service).copied()
    }

    fn clear_diverged(&mut self, service: &str) {
        self.diverged.remove(service);
    }

    /// Keeps the state here; a service the fleet does not have yet (read
    /// at `load`, etcd answering) is written there from this host's state
    /// — only if still absent: the first host wins, the others follow.
    fn save(&mut self, state: &DesiredState) -> Result<(), StateError> {
        self.local.save(state)?;
        if !self.loaded {
            return Ok(());
        }
        for (name, st) in &state.services {
            if self.revs.contains_key(name) {
                continue;
            }
            let key = self.keys.state(name);
            let Ok(body) = serde_json::to_vec(st) else {
                continue;
            };
            let r = self.etcd.call(move |mut c| async move {
                c.txn(
                    Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key, body, None)]),
                )
                .await
            });
            match r {
                Ok(t) if t.succeeded() => {
                    if let Some(h) = t.header() {
                        self.revs.insert(name.clone(), h.revision());
                    }
                    log::info!("fleet: {name}: the fleet had no state of it; this host's is now the fleet's");
                }
                Ok(_) => {} // another host was first: followed
                Err(e) => log::warn!("fleet: {name}: writing its first state: {e}"),
            }
        }
        Ok(())
    }

    fn upkeep(&mut self, state: &DesiredState) {
        self.local.upkeep(state);
    }

    fn close(&mut self, state: &DesiredState) {
        self.local.close(state);
    }

    fn reconfigure(&mut self, config: &Config) {
        self.local.reconfigure(config);
    }

    fn history(&self) -> HistoryReader {
        let (client, rt) = self.etcd.caller();
        let keys = self.keys.clone();
        let local = self.local.history();
        Box::new(move |service| {
            let mut out = Vec::new();
            for prefix in [keys.journals(service), keys.refusals(service)] {
                match etcd::read_prefix(client.clone(), &rt, prefix) {
                    Ok((_, kvs)) => {
                        for (_, (v, _, _)) in kvs {
                            if let Ok(e) = serde_json::from_slice::<JournalEntry>(&v) {
                                out.push(e);
                            }
                        }
                    }
                    Err(e) => {
                        log::warn!("fleet: history from etcd: {e}; this host's journal instead");
                        return local(service);
                    }
                }
            }
            out.sort_by_key(|e| (e.change.at_ms, e.change.generation));
            Ok(out)
        })
    }

    fn changes(&mut self) -> Option<UnboundedReceiver<ExternalChange>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.etcd.follow(self.keys.clone(), self.loaded_at, tx);
        Some(rx)
    }

    fn report(&mut self, mut report: HostReport) {
        report.host = self.cfg.host.clone();
        report.diverged = self.diverged.keys().cloned().collect();
        if !self.publishing {
            self.publishing = true;
            self.etcd
                .publish(self.keys.clone(), self.reports.subscribe());
        }
        self.reports.send_if_modified(|r| {
            // A new report when something changed, and every 2 s anyway
            // (its time is the host's "last seen").
            let mut a = report.clone();
            a.at_ms = r.at_ms;
            if a == *r && report.at_ms < r.at_ms + REPORT_EVERY_MS {
                false
            } else {
                *r = report;
                true
            }
        });
    }

    fn peers(&self) -> Option<Result<Vec<HostReport>, String>> {
        let (client, rt) = self.etcd.caller();
        Some(
            etcd::read_prefix(client, &rt, self.keys.hosts()).map(|(_, kvs)| {
                kvs.into_values()
                    .filter_map(|(v, _, _)| serde_json::from_slice(&v).ok())
                    .collect()
            }),
        )
    }

    fn fleet_local(&self) -> Option<FleetLocal> {
        let r = self
            .etcd
            .reach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(FleetLocal {
            cluster: self.cfg.cluster.clone(),
            host: self.cfg.host.clone(),
            etcd: self.cfg.etcd.clone(),
            reachable: r.reachable,
            unreachable_since_ms: r.since_ms,
            error: r.error,
            diverged: self.diverged.keys().cloned().collect(),
        })
    }

    fn fleet(&self) -> Option<super::FleetReader> {
        let (client, rt) = self.etcd.caller();
        let keys = self.keys.clone();
        let local = self.fleet_local()?;
        Some(Box::new(move || fleet_status(client, &rt, &keys, local)))
    }
}

/// `status --fleet`, read from etcd.
fn fleet_status(
    client: etcd_client::Client,
    rt: &tokio::runtime::Handle,
    keys: &Keys,
    local: FleetLocal,
) -> Result<FleetStatus, String> {
    let (_, states) = etcd::read_prefix(client.clone(), rt, keys.states())?;
    let (_, live) = etcd::read_prefix(client.clone(), rt, keys.hosts())?;
    let (_, seen) = etcd::read_prefix(client, rt, keys.seens())?;
    let now = crate::state::now_ms();
    let mut hosts: BTreeMap<String, FleetHost> = BTreeMap::new();
    for (live_flag, kvs) in [(false, &seen), (true, &live)] {
        for (v, _, _) in kvs.values() {
            if let Ok(r) = serde_json::from_slice::<HostReport>(v) {
                hosts.insert(
                    r.host.clone(),
                    FleetHost {
                        live: live_flag,
                        last_seen_ms_ago: now.saturating_sub(r.at_ms),
                        report: r,
                    },
                );
            }
        }
    }
    let mut services = Vec::new();
    for (k, (v, _, _)) in &states {
        let Some(name) = keys.service_of(k.as_bytes()) else {
            continue;
        };
        let Ok(s) = serde_json::from_slice::<ServiceState>(v) else {
            continue;
        };
        // The fleet's definition: the digest most live hosts have.
        let mut digests: BTreeMap<&str, usize> = BTreeMap::new();
        for h in hosts.values().filter(|h| h.live) {
            if let Some(d) = h.report.definitions.get(&name) {
                *digests.entry(d.as_str()).or_default() += 1;
            }
        }
        let common = digests.iter().max_by_key(|(_, n)| **n).map(|(d, _)| *d);
        let mismatched = hosts
            .values()
            .filter(|h| h.live)
            .filter(|h| {
                h.report
                    .definitions
                    .get(&name)
                    .is_some_and(|d| Some(d.as_str()) != common)
            })
            .map(|h| h.report.host.clone())
            .collect();
        services.push(FleetService {
            changed_by: s.history.last().map(|c| {
                format!(
                    "{} by {}{}",
                    c.kind,
                    c.user,
                    c.host
                        .as_deref()
                        .map(|h| format!(" on {h}"))
                        .unwrap_or_default()
                )
            }),
            name,
            generation: s.generation,
            active: Some(s.active),
            mismatched,
        });
    }
    Ok(FleetStatus {
        local,
        services,
        hosts: hosts.into_values().collect(),
    })
}
