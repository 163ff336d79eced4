//! The etcd side of a fleet's store, on a runtime of its own (one thread):
//! the client, calls made from the daemon's loop with a bounded wait, the
//! follower (a watch of the services' states, resynchronised in full on
//! every reconnection), and the publisher of this host's report under a
//! lease.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use tokio::sync::{mpsc::UnboundedSender, watch};

use super::{report::HostReport, Keys};
use crate::{
    config::FleetConfig,
    model::ServiceState,
    state::{now_ms, ExternalChange},
};

/// Fault injection (tests only): `BGSWITCH_FAULT_DELAY_FOLLOW_MS` makes
/// the follower hold every change of the fleet this long before the loop
/// gets it (two hosts' changes made "at once", deterministically).
static FAULT_DELAY_FOLLOW: std::sync::LazyLock<Option<Duration>> = std::sync::LazyLock::new(|| {
    std::env::var("BGSWITCH_FAULT_DELAY_FOLLOW_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
});

/// How long a call from the loop waits for etcd.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The lease of a host's report: it disappears this long after the host.
const LEASE_TTL_S: i64 = 6;

/// Whether etcd answers, since when not, and why.
#[derive(Clone, Debug, Default)]
pub(super) struct Reach {
    pub reachable: bool,
    pub since_ms: Option<u64>,
    pub error: Option<String>,
}

pub(super) struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub reach: Arc<Mutex<Reach>>,
}

impl Reach {
    fn ok(&mut self) {
        if !self.reachable {
            if let Some(since) = self.since_ms {
                log::info!(
                    "fleet: etcd answers again (unreachable for {:.1} s)",
                    (now_ms().saturating_sub(since)) as f64 / 1000.0
                );
            }
        }
        self.reachable = true;
        self.since_ms = None;
        self.error = None;
    }

    fn failed(&mut self, e: &str) {
        if self.reachable || self.since_ms.is_none() {
            log::warn!(
                "fleet: etcd unreachable ({e}): the data plane keeps the state last applied; changes are refused (--local applies on this host only)"
            );
            self.since_ms = Some(now_ms());
        }
        self.reachable = false;
        self.error = Some(e.to_string());
    }
}

impl Etcd {
    /// The client (connected lazily: no call is made here).
    pub fn open(cfg: &FleetConfig) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bgswitch-etcd")
            .enable_all()
            .build()?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(ca) = &cfg.ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(
                std::fs::read(ca).map_err(|e| anyhow::anyhow!("fleet.ca {}: {e}", ca.display()))?,
            ));
            if let (Some(c), Some(k)) = (&cfg.cert, &cfg.key) {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(c)
                        .map_err(|e| anyhow::anyhow!("fleet.cert {}: {e}", c.display()))?,
                    std::fs::read(k)
                        .map_err(|e| anyhow::anyhow!("fleet.key {}: {e}", k.display()))?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        if let (Some(u), Some(p)) = (&cfg.user, &cfg.password_file) {
            let pw = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("fleet.password_file {}: {e}", p.display()))?;
            opts = opts.with_user(u.clone(), pw.trim_end_matches(['\n', '\r']).to_string());
        }
        let endpoints = cfg.etcd.clone();
        let client = rt
            .block_on(async move { Client::connect(endpoints, Some(opts)).await })
            .map_err(|e| anyhow::anyhow!("fleet: etcd client for {:?}: {e}", cfg.etcd))?;
        Ok(Self {
            rt,
            client,
            reach: Arc::new(Mutex::new(Reach {
                reachable: true,
                ..Reach::default()
            })),
        })
    }

    /// Runs `f` with a client on etcd's runtime and waits for it at most
    /// `CALL_TIMEOUT` (the loop's own thread blocks meanwhile); an error
    /// marks etcd unreachable.
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let client = self.client.clone();
        self.rt.spawn(async move {
            let r = tokio::time::timeout(CALL_TIMEOUT, f(client))
                .await
                .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(CALL_TIMEOUT + Duration::from_millis(500))
            .unwrap_or_else(|_| Err(format!("no answer within {CALL_TIMEOUT:?}")));
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            Ok(_) => reach.ok(),
            Err(e) => reach.failed(e),
        }
        r
    }

    /// A closure to run a call off the loop (history, fleet status).
    pub fn caller(&self) -> (Client, tokio::runtime::Handle) {
        (self.client.clone(), self.rt.handle().clone())
    }

    /// Starts the follower: every state of `keys`' services from
    /// `after_revision` on, as changes made elsewhere, in revision order;
    /// on every (re)connection the whole prefix is read first.
    pub fn follow(&self, keys: Keys, after_revision: i64, tx: UnboundedSender<ExternalChange>) {
        let client = self.client.clone();
        let reach = self.reach.clone();
        self.rt.spawn(async move {
            let mut from = after_revision;
            loop {
                let err = follow_once(client.clone(), &keys, &mut from, &tx, &reach).await;
                if tx.is_closed() {
                    return;
                }
                reach.lock().unwrap_or_else(|e| e.into_inner()).failed(&err);
                tokio::time::sleep(Duration::from_millis(500)).await;
                // Resynchronise in full: events may have been compacted.
                from = 0;
            }
        });
    }

    /// Starts the publisher of this host's report: put under a lease
    /// (`hosts/<host>`) whenever it changes, and without (`seen/<host>`);
    /// the lease kept alive, granted again after an outage.
    pub fn publish(&self, keys: Keys, mut reports: watch::Receiver<HostReport>) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            loop {
                if let Err(e) = publish_once(client.clone(), &keys, &mut reports).await {
                    if reports.has_changed().is_err() {
                        return;
                    }
                    log::debug!("fleet: publishing this host's report: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// One connection's worth of following; returns why it ended.
async fn follow_once(
    mut client: Client,
    keys: &Keys,
    from: &mut i64,
    tx: &UnboundedSender<ExternalChange>,
    reach: &Mutex<Reach>,
) -> String {
    let prefix = keys.states();
    if *from == 0 {
        // The whole prefix: every service's state now.
        let resp = match client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => return e.to_string(),
        };
        reach.lock().unwrap_or_else(|e| e.into_inner()).ok();
        *from = resp.header().map_or(0, |h| h.revision());
        for kv in resp.kvs() {
            if let Some(c) = change_of(keys, kv.key(), kv.value(), kv.mod_revision()) {
                let _ = tx.send(c);
            }
        }
    }
    let mut stream = match client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(*from + 1),
            ),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    reach.lock().unwrap_or_else(|e| e.into_inner()).ok();
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    return format!(
                        "watch cancelled ({}; compacted at {})",
                        resp.cancel_reason(),
                        resp.compact_revision()
                    );
                }
                for ev in resp.events() {
                    if ev.event_type() != EventType::Put {
                        continue;
                    }
                    if let Some(d) = *FAULT_DELAY_FOLLOW {
                        // Fault injection (tests only): this host sees the
                        // fleet's changes late.
                        tokio::time::sleep(d).await;
                    }
                    if let Some(kv) = ev.kv() {
                        *from = (*from).max(kv.mod_revision());
                        if let Some(c) = change_of(keys, kv.key(), kv.value(), kv.mod_revision()) {
                            if tx.send(c).is_err() {
                                return "the daemon stopped following".into();
                            }
                        }
                    }
                }
            }
            Ok(None) => return "the watch ended".into(),
            Err(e) => return e.to_string(),
        }
    }
}

/// A state key's value as a change made elsewhere (none for one that does
/// not parse, logged, or that carries no change yet).
fn change_of(keys: &Keys, key: &[u8], value: &[u8], revision: i64) -> Option<ExternalChange> {
    let service = keys.service_of(key)?;
    let after: ServiceState = match serde_json::from_slice(value) {
        Ok(s) => s,
        Err(e) => {
            log::error!(
                "fleet: {}: not a service state ({e}); ignored",
                String::from_utf8_lossy(key)
            );
            return None;
        }
    };
    let change = after.history.last().cloned()?;
    Some(ExternalChange {
        service,
        change,
        after,
        revision,
    })
}

async fn publish_once(
    mut client: Client,
    keys: &Keys,
    reports: &mut watch::Receiver<HostReport>,
) -> Result<(), String> {
    let lease = client
        .lease_grant(LEASE_TTL_S, None)
        .await
        .map_err(|e| e.to_string())?
        .id();
    let (mut keeper, mut acks) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut put = true;
    loop {
        if put {
            let report = reports.borrow_and_update().clone();
            let body = serde_json::to_vec(&report).map_err(|e| e.to_string())?;
            client
                .put(
                    keys.host(&report.host),
                    body.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map_err(|e| e.to_string())?;
            client
                .put(keys.seen(&report.host), body, None)
                .await
                .map_err(|e| e.to_string())?;
            put = false;
        }
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(|e| e.to_string())?;
                match acks.message().await {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    Ok(_) => return Err("the lease expired".into()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            changed = reports.changed() => {
                if changed.is_err() {
                    let _ = client.lease_revoke(lease).await;
                    return Err("the daemon stopped".into());
                }
                put = true;
            }
        }
    }
}

/// Keys under a prefix: key → (value, mod revision, lease).
pub(super) type Kvs = HashMap<String, (Vec<u8>, i64, i64)>;

/// Reads of the fleet's keys off the loop (fleet status, history): the
/// store's revision and the keys under `prefix`.
pub(super) fn read_prefix(
    client: Client,
    rt: &tokio::runtime::Handle,
    prefix: String,
) -> Result<(i64, Kvs), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let mut client = client;
        let r = tokio::time::timeout(
            CALL_TIMEOUT,
            client.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map(|r| {
            let rev = r.header().map_or(0, |h| h.revision());
            let kvs = r
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        (kv.value().to_vec(), kv.mod_revision(), kv.lease()),
                    )
                })
                .collect();
            (rev, kvs)
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(CALL_TIMEOUT + Duration::from_millis(500))
        .unwrap_or_else(|_| Err(format!("no answer within {CALL_TIMEOUT:?}")))
}
