//! The daemon: one loop over a closed set of events — control requests,
//! health-probe results, timer ticks, metric scrapes, signals — that owns the
//! data plane and the desired state. IO tasks ([`crate::server`], probes)
//! only produce events; every change happens here, in order.
//!
//! Order of a change: the journal line with the service's new state is
//! written (fdatasynced) first, then the data plane follows with 32-bit
//! stores; the snapshot (`state.json`) is rewritten later, once changes
//! pause. A crash in between leaves a journalled change the next daemon
//! replays and applies at start, so a change happens whole or not at all.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fs::File,
    io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use bgswitch_common::{control, ColourStats};
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    api::{
        self, BackendStatus, ColourStatus, InterfaceStatus, PreviewAction, Request, Response,
        ServiceStatus, TransitionStatus,
    },
    config::{self, Config, HealthConfig},
    dataplane::{self, backend_of, backend_stat_id, service_key, Dataplane, LoadOptions},
    health::{self, BackendHealth, Health},
    metrics,
    model::{self, Colour, DesiredState, FlipGuards, FlipOutcome},
    paths,
    server::{self, Peer},
    state::{self, JournalEntry, StateStore},
};

/// How often watches and confirmation deadlines are checked.
const TICK: Duration = Duration::from_millis(200);
/// The snapshot (`state.json`) is rewritten once changes have paused this
/// long, or when this many wait in the journal: off the path of a request.
const SNAPSHOT_QUIET: Duration = Duration::from_secs(1);
const SNAPSHOT_AFTER_CHANGES: u64 = 64;
/// New flows needed before an error rate is judged.
const MIN_ERROR_SAMPLE: u64 = 10;

/// Fault injection (tests only): `BGSWITCH_FAULT_DELAY_COMMIT_MS` makes every
/// change wait this long after its journal line is written and before the
/// data plane moves.
static FAULT_DELAY_COMMIT: std::sync::LazyLock<Option<Duration>> = std::sync::LazyLock::new(|| {
    std::env::var("BGSWITCH_FAULT_DELAY_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
});

/// Everything the loop reacts to.
pub enum Event {
    Request {
        req: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
        /// Resolved once the answer is written to the client (or dropped
        /// if it could not be).
        written: oneshot::Receiver<()>,
    },
    Probe {
        service: String,
        colour: Colour,
        index: usize,
        result: Result<(), String>,
    },
    Tick,
    Scrape {
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
    Reload,
    Shutdown(&'static str),
    /// A flow-table scan (run off the loop) is done; its waiters get their
    /// status now.
    FlowsCounted {
        counts: std::io::Result<HashMap<(u32, Colour), dataplane::FlowCounts>>,
        waiters: Vec<StatusWaiter>,
        /// The control words of services in a transition when the scan
        /// began, and when it began.
        words: HashMap<u32, u32>,
        at: std::time::Instant,
    },
}

/// A status answer that waits for a flow-table scan.
pub enum StatusWaiter {
    Status {
        only: Option<String>,
        reply: oneshot::Sender<Response>,
    },
    Scrape {
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
}

/// How long the daemon waits, after a detach, for its answer to be written.
const DETACH_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Counters at the start of a watch, to judge the error rate since, and the
/// new-flow count sampled once a second (to know which flows are older than
/// the SYN timeout).
#[derive(Clone)]
struct Baseline {
    stats: ColourStats,
    samples: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Baseline {
    fn new(stats: ColourStats) -> Self {
        Self {
            stats,
            samples: std::collections::VecDeque::new(),
        }
    }
}

/// The daemon's state: config, desired state, health, data plane.
pub struct Daemon {
    config: Config,
    store: StateStore,
    state: DesiredState,
    dataplane: Dataplane,
    socket_gid: Option<u32>,
    health: HashMap<(String, Colour, usize), BackendHealth>,
    probes: Vec<JoinHandle<()>>,
    baselines: HashMap<String, Baseline>,
    tx: Option<mpsc::Sender<Event>>,
    ticks: u64,
    /// Whether a flow-table scan runs (off the loop), and who waits for the
    /// next one: every answer comes from a scan begun after its request.
    scan_running: bool,
    scan_waiting: Vec<StatusWaiter>,
    /// The last journal rotation failed (logged once until one works).
    journal_rotation_failing: bool,
    /// Whether the host's routing rules pick routes by destination only
    /// (stateless services need it: they keep one next hop per backend).
    rules_by_destination: bool,
    /// When the last scan for due transitions began: while a transition
    /// cannot end (live records still disagree), a whole-table read at most
    /// every `TRANSITION_SCAN_EVERY`.
    transition_scan_at: Option<std::time::Instant>,
    _lock: File,
}

/// How often a due transition may read the whole flow table to see whether
/// it can end (about 0.8 s of a blocking thread per million flows).
const TRANSITION_SCAN_EVERY: Duration = Duration::from_secs(5);

/// A service's live records whose backend is not the active pool's hash
/// choice, in a scan's counts (both colours): a transition ends at none.
fn disagreeing(counts: &HashMap<(u32, Colour), dataplane::FlowCounts>, id: u32) -> u64 {
    Colour::BOTH
        .iter()
        .filter_map(|c| counts.get(&(id, *c)))
        .map(|c| c.disagreeing)
        .sum()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The daemon's logger for the data plane's own messages: the process's
/// logger, with each "ifindex N" the program reports followed by the
/// interface's name (the program only knows the index).
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        log::logger().enabled(m)
    }

    fn log(&self, r: &log::Record) {
        let text = name_ifindexes(&r.args().to_string(), dataplane::ifname);
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{text}"))
                .level(r.level())
                .target(r.target())
                .module_path(r.module_path())
                .file(r.file())
                .line(r.line())
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// `text` with " (name)" after every "ifindex N" whose name `name` knows.
fn name_ifindexes(text: &str, name: impl Fn(u32) -> Option<String>) -> String {
    const WORD: &str = "ifindex ";
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(i) = rest.find(WORD) {
        let after = &rest[i + WORD.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..i + WORD.len() + digits]);
        if let Some(n) = after[..digits].parse().ok().and_then(&name) {
            out.push_str(&format!(" ({n})"));
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Copies the data plane's own messages (rare events, at most one per kind
/// and CPU a second; see `bgswitch-ebpf/src/events.rs`) into the daemon's
/// log as they arrive.
async fn kernel_log_loop(mut fd: tokio::io::unix::AsyncFd<aya_log::EbpfLogger<KernelLog>>) {
    loop {
        let Ok(mut ready) = fd.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

fn status_response(status: anyhow::Result<api::Status>) -> Response {
    match status {
        Ok(status) => Response {
            ok: true,
            status: Some(status),
            ..Response::default()
        },
        Err(e) => Response::error(format!("{e:#}")),
    }
}

/// Host checks a config must pass before the daemon acts on it.
fn check_environment(config: &Config) -> anyhow::Result<()> {
    for (i, name) in config.interfaces.iter().enumerate() {
        if dataplane::ifindex(name).is_none() {
            bail!(
                "{}: interfaces[{i}]: interface '{name}' does not exist",
                config.path.display()
            );
        }
    }
    if let Some(g) = &config.socket_group {
        group_id(g).with_context(|| format!("{}: socket_group", config.path.display()))?;
    }
    Ok(())
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: getgrnam returns a pointer into static storage or null; read at once.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        bail!("group '{name}' does not exist");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*g).gr_gid })
}

fn enable_ip_forward() -> anyhow::Result<()> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    let cur = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
    if cur.trim() != "1" {
        std::fs::write(p, "1").with_context(|| format!("enabling IPv4 forwarding ({p})"))?;
        log::info!("enabled IPv4 forwarding (net.ipv4.ip_forward=1): rewritten packets without a neighbour entry are forwarded by the stack");
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{d:?}")
}

/// Takes the tick rate an earlier start in this boot (`boot_id`) measured,
/// if it kept one: the rate is fixed at boot, and measuring it takes 250 ms.
fn assume_kept_tick_rate(store: &StateStore, boot_id: &str) -> bool {
    !boot_id.is_empty()
        && store
            .kept_tick_rate(boot_id)
            .is_some_and(dataplane::assume_hz)
}

/// Logs the services new to the state: on blue, or kept as the running
/// data plane has them (`adopted`).
fn log_added(state: &DesiredState, added: &[String], adopted: &[String]) {
    for n in added {
        match state.services.get(n) {
            Some(s) if adopted.contains(n) => log::warn!(
                "service {n}: not in the state, but the running data plane serves it on {}{}{}: kept (was the state directory lost or replaced?)",
                s.active,
                if s.canary_bp > 0 {
                    format!(" with {:.2}% of new flows to {}", f64::from(s.canary_bp) / 100.0, s.active.other())
                } else {
                    String::new()
                },
                if s.preview.is_empty() {
                    String::new()
                } else {
                    format!(" and preview prefixes [{}]", s.preview.join(", "))
                }
            ),
            _ => log::info!("service {n}: new, starting on blue"),
        }
    }
}

/// What the data plane (pinned by an earlier daemon) has for the `added`
/// services whose VIP it serves, enabled (see `DesiredState::adopt_running`).
fn running_services(
    config: &Config,
    added: &[String],
    dataplane: &Dataplane,
) -> BTreeMap<String, model::Running> {
    let keys = match dataplane.service_keys() {
        Ok(k) => k,
        Err(e) => {
            log::warn!(
                "reading the services the data plane serves: {e:#}; new services start on blue"
            );
            return BTreeMap::new();
        }
    };
    let mut out = BTreeMap::new();
    for svc in config.services.iter().filter(|s| added.contains(&s.name)) {
        let key = service_key(svc.vip, svc.protocol.number());
        let Some(&(_, id)) = keys.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        let word = dataplane.control_word(id);
        if !control::enabled(word) {
            continue;
        }
        let preview = if word & control::PREVIEW != 0 {
            dataplane.preview_prefixes(id).unwrap_or_else(|e| {
                log::warn!(
                    "service {}: reading its preview prefixes: {e:#}; not kept",
                    svc.name
                );
                Vec::new()
            })
        } else {
            Vec::new()
        };
        out.insert(
            svc.name.clone(),
            model::Running {
                id,
                active: Colour::from_index(control::active(word)),
                canary_bp: control::canary(word),
                preview,
            },
        );
    }
    out
}

/// The answer to `history SERVICE`: its journal entries in the state
/// directory `dir`, oldest first.
fn history_response(dir: &Path, service: &str) -> Response {
    match state::read_history(dir, Some(service)) {
        Ok(mut h) => {
            // The recorded states are for replay, not for readers.
            h.iter_mut().for_each(|e| e.state = None);
            Response {
                ok: true,
                history: Some(h),
                ..Response::default()
            }
        }
        Err(e) => Response::error(e.to_string()),
    }
}

impl Daemon {
    /// Reads the config, takes the lock, loads the desired state, loads or
    /// adopts the data plane and makes it match. Fails before changing
    /// anything if the config or the state is bad.
    pub fn start(config_path: &Path) -> anyhow::Result<Self> {
        let config = config::load(config_path)?;
        check_environment(&config)?;
        let socket_gid = config.socket_group.as_deref().map(group_id).transpose()?;
        let store = StateStore::open(&config.state_dir)?;
        let lock = store.lock()?;
        let mut state = store.load()?;
        state.trim_history();
        let (added, removed) = state.reconcile(config.service_names())?;
        for n in &removed {
            log::info!("service {n}: no longer configured, removing");
        }
        let boot_id = std::fs::read_to_string(paths::BOOT_ID)
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let kept = assume_kept_tick_rate(&store, &boot_id);
        let dataplane = Dataplane::load(&LoadOptions {
            bpffs: Some(config.bpffs.clone()),
            max_flows: config.max_flows,
        })?;
        if !kept && !boot_id.is_empty() {
            if let Err(e) = store.keep_tick_rate(&boot_id, dataplane.hz()) {
                log::warn!("{e}: the next start measures the tick rate again");
            }
        }
        let adopted = state.adopt_running(&added, &running_services(&config, &added, &dataplane));
        log_added(&state, &added, &adopted);
        // Saved once the added services are adopted: a state saved before
        // would start them on blue at the next start. (Loading the data
        // plane changes no traffic; `apply_config` does, below.)
        store.save(&state)?;
        enable_ip_forward()?;
        log::info!(
            "data plane clock: HZ {} ({}); flows refresh their next hop every {} ticks",
            dataplane.hz(),
            if kept {
                "measured earlier in this boot"
            } else {
                "measured"
            },
            dataplane.refresh_ticks()
        );
        let slots = dataplane.flow_cache_slots();
        log::info!(
            "per-CPU flow cache: {slots} slots ({} KiB per CPU id, {} possible CPU ids)",
            u64::from(slots) * 64 / 1024,
            dataplane::cpu_id_bound()
        );
        match dataplane.watch_kernel_changes() {
            Ok(()) => log::info!(
                "watching route, neighbour and link changes (netlink): open flows look their next hop up again at once"
            ),
            Err(e) => log::warn!(
                "cannot watch route and neighbour changes ({e}): open flows pick them up within {} ms",
                bgswitch_common::REFRESH_MS
            ),
        }
        let mut daemon = Self {
            config,
            store,
            state,
            dataplane,
            socket_gid,
            health: HashMap::new(),
            probes: Vec::new(),
            baselines: HashMap::new(),
            tx: None,
            ticks: 0,
            scan_running: false,
            journal_rotation_failing: false,
            scan_waiting: Vec::new(),
            rules_by_destination: false,
            transition_scan_at: None,
            _lock: lock,
        };
        daemon.rules_by_destination = daemon.read_rules();
        daemon.apply_config()?;
        Ok(daemon)
    }

    fn health_of(&self, service: &str, colour: Colour, index: usize) -> Health {
        self.health
            .get(&(service.to_string(), colour, index))
            .map_or(Health::Unknown, |h| h.state)
    }

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
    fn sync_service(&mut self, name: &str) -> anyhow::Result<()> {
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
            .set_stateless(st.id, svc.stateless && self.rules_by_destination);
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
    fn apply_config(&mut self) -> anyhow::Result<()> {
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
            self.dataplane.attach(&iface, self.config.xdp_mode)?;
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

    /// (Re)starts one probe task per backend of every service with health checks.
    fn start_probes(&mut self) {
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

    /// Serves the control socket until a signal or `detach`.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let listener = self.bind_socket()?;
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        self.tx = Some(tx.clone());
        let mut tasks = vec![
            tokio::spawn(server::accept_loop(listener, tx.clone(), self.socket_gid)),
            tokio::spawn(async move {
                let _ = server::signal_loop(tx.clone()).await;
            }),
        ];
        let ticker = self.tx.clone().expect("set above");
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(TICK);
            loop {
                t.tick().await;
                if ticker.send(Event::Tick).await.is_err() {
                    return;
                }
            }
        }));
        if let Some(addr) = self.config.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics_listen {addr}"))?;
            log::info!("Prometheus metrics on http://{addr}/metrics");
            tasks.push(tokio::spawn(server::metrics_loop(
                l,
                self.tx.clone().expect("set"),
            )));
        }
        match self.dataplane.kernel_log(KernelLog) {
            // SAFETY: the reader owns the ring buffer's map fd, which stays
            // open and the same for the reader's life, and the AsyncFd owns
            // the reader.
            Ok(reader) => match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    reader,
                    tokio::io::Interest::READABLE,
                )
            } {
                Ok(fd) => tasks.push(tokio::spawn(kernel_log_loop(fd))),
                Err(e) => log::warn!("the data plane's log: {e}; its messages will not be shown"),
            },
            Err(e) => log::warn!("{e}; its messages will not be shown"),
        }
        self.start_probes();
        log::info!(
            "bgswitch daemon ready: {} services, interfaces {:?}, socket {}",
            self.config.services.len(),
            self.config.interfaces,
            self.config.socket.display()
        );
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Request {
                    req: Request::Status { service },
                    peer,
                    reply,
                    written: _,
                } if service
                    .as_deref()
                    .is_none_or(|n| self.state.service(n).is_ok()) =>
                {
                    log::debug!("{} (pid {:?}): status {service:?}", peer.user, peer.pid);
                    self.status_request(StatusWaiter::Status {
                        only: service,
                        reply,
                    });
                }
                Event::Request {
                    req: Request::History { service },
                    peer,
                    reply,
                    written: _,
                } if self.state.service(&service).is_ok() => {
                    // The journal is read on a blocking thread: a long one
                    // must not hold up flips.
                    log::debug!("{} (pid {:?}): history {service}", peer.user, peer.pid);
                    let dir = self.store.dir().to_path_buf();
                    tokio::task::spawn_blocking(move || {
                        let _ = reply.send(history_response(&dir, &service));
                    });
                }
                Event::Request {
                    req,
                    peer,
                    reply,
                    written,
                } => {
                    let detach = matches!(req, Request::Detach);
                    let resp = self.handle(req, &peer);
                    let done = detach && resp.ok;
                    let _ = reply.send(resp);
                    if done {
                        // The connection task writes the answer before the
                        // runtime (and the task) goes away; a client that
                        // does not read it is not waited for long.
                        let _ = tokio::time::timeout(DETACH_ANSWER_WAIT, written).await;
                        break;
                    }
                }
                Event::Probe {
                    service,
                    colour,
                    index,
                    result,
                } => self.on_probe(&service, colour, index, result),
                Event::Tick => self.on_tick(),
                Event::Scrape { reply } => self.status_request(StatusWaiter::Scrape { reply }),
                Event::FlowsCounted {
                    counts,
                    waiters,
                    words,
                    at,
                } => self.flows_counted(counts, waiters, words, at),
                Event::Reload => {
                    let r = self.reload();
                    if !r.ok {
                        log::error!("reload on SIGHUP refused: {}", r.error.unwrap_or_default());
                    }
                }
                Event::Shutdown(sig) => {
                    log::info!(
                        "{sig}: exiting; XDP stays attached and keeps switching on the last state"
                    );
                    if self.store.snapshot_due(Duration::ZERO, 1) {
                        if let Err(e) = self.store.save(&self.state) {
                            log::error!("snapshot: {e}; the next start replays the journal");
                        }
                    }
                    break;
                }
            }
        }
        for t in tasks.into_iter().chain(self.probes.drain(..)) {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.config.socket);
        Ok(())
    }

    fn bind_socket(&self) -> anyhow::Result<UnixListener> {
        let path = &self.config.socket;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => log::info!("removed stale socket {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
        let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("chmod 0660 {}", path.display()))?;
        if let Some(gid) = self.socket_gid {
            let c = CString::new(path.as_os_str().as_encoded_bytes())?;
            // SAFETY: valid path; uid -1 keeps the owner.
            if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("chgrp {} to gid {gid}", path.display()));
            }
        }
        Ok(l)
    }

    fn on_probe(
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
    }

    /// Starts writing the snapshot on a thread of its own if changes are
    /// waiting in the journal and none came for a second (or many wait).
    /// The loop pays for the copy of the state. The journal holds every
    /// change, so a failed snapshot is only logged and tried again.
    fn snapshot_in_background(&self) {
        if self
            .store
            .snapshot_due(SNAPSHOT_QUIET, SNAPSHOT_AFTER_CHANGES)
        {
            self.store.save_in_background(self.state.clone());
        }
    }

    /// Watches and confirmation deadlines; every second, the interfaces.
    fn on_tick(&mut self) {
        self.ticks += 1;
        self.snapshot_in_background();
        if self.ticks.is_multiple_of(5) {
            self.rotate_journal();
            for (level, note) in self.dataplane.check_interfaces() {
                log::log!(level, "{note}");
            }
            self.check_rules();
            let rested = self
                .transition_scan_at
                .is_none_or(|t| t.elapsed() >= TRANSITION_SCAN_EVERY);
            if rested && !self.scan_running && !self.transitions_due().is_empty() {
                self.transition_scan_at = Some(std::time::Instant::now());
                self.start_scan(Vec::new());
            }
        }
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
                    self.auto_rollback(&name, &why);
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
                self.auto_rollback(&name, &why);
            }
        }
    }

    /// Moves a journal longer than `journal_max_size` aside once the
    /// snapshot includes all of it (see `StateStore::rotate_journal`).
    fn rotate_journal(&mut self) {
        let max = self.config.journal_max_size;
        match self.store.rotate_journal(max) {
            Ok(None) => {}
            Ok(Some(len)) => {
                self.journal_rotation_failing = false;
                log::info!(
                    "journal: {len} bytes (journal_max_size {max}) moved to {}; history reads both",
                    paths::JOURNAL_ROTATED_FILE
                );
            }
            Err(e) if !self.journal_rotation_failing => {
                self.journal_rotation_failing = true;
                log::error!("journal rotation: {e}; the journal keeps growing until it works");
            }
            Err(_) => {}
        }
    }

    /// Whether the routing rules pick routes by destination only; read
    /// only while a service is configured stateless (a failure to read them
    /// counts as "no").
    fn read_rules(&self) -> bool {
        if !self.config.services.iter().any(|s| s.stateless) {
            return false;
        }
        crate::netlink::ipv4_rules_by_destination_only().unwrap_or_else(|e| {
            log::warn!("cannot read the IPv4 routing rules ({e}): stateless services keep their flow table");
            false
        })
    }

    /// Once a second: a routing rule that selects on more than the
    /// destination ends every stable period (each flow records its own
    /// next hop again); when the rules are back, stable periods may start.
    fn check_rules(&mut self) {
        let ok = self.read_rules();
        if ok == self.rules_by_destination {
            return;
        }
        self.rules_by_destination = ok;
        if self.config.services.iter().any(|s| s.stateless) {
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
                self.dataplane.set_stateless(st.id, svc.stateless && ok);
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

    fn auto_rollback(&mut self, name: &str, why: &str) {
        let mut next = self.scratch(name);
        match next.auto_rollback(name, why, now_ms()) {
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
        if let Err(e) = self.store.append_change(name, &change, &after) {
            log::error!(
                "{name}: journalling \"{}\": {e}; ended in memory only (a restart would end it again)",
                change.kind
            );
        }
        self.state.services.insert(name.to_string(), after);
    }

    fn reload(&mut self) -> Response {
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
        ] {
            if !same {
                bail!(
                    "{}: {key}: changing it needs a daemon restart",
                    new.path.display()
                );
            }
        }
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
        self.start_probes();
        Ok(format!(
            "reloaded {}: {} services ({} added, {} removed)",
            self.config.path.display(),
            self.config.services.len(),
            added.len(),
            removed.len()
        ))
    }

    fn handle(&mut self, req: Request, peer: &Peer) -> Response {
        let summary = format!("{req:?}");
        let resp = match req {
            Request::Flip {
                service,
                to,
                force,
                reason,
                watch_ms,
                max_error_rate,
                confirm_within_ms,
            } => self.flip(
                &service,
                to,
                self.request(peer, reason, force),
                FlipGuards {
                    watch_ms,
                    max_error_rate,
                    confirm_within_ms,
                },
            ),
            Request::Rollback { service, reason } => {
                let req = self.request(peer, reason, false);
                self.change(&service, |s| s.rollback(&service, &req))
            }
            Request::Shift {
                service,
                to,
                percent,
                reason,
            } => {
                if !(0.0..=100.0).contains(&percent) || !percent.is_finite() {
                    Response::error(format!("--percent {percent}: must be within 0..=100"))
                } else {
                    let bp = (percent * 100.0).round() as u32;
                    let req = self.request(peer, reason, false);
                    self.change(&service, |s| s.shift(&service, to, bp, &req))
                }
            }
            Request::Preview {
                service,
                action,
                cidr,
                reason,
            } => self.preview(&service, action, cidr, reason, peer),
            Request::Confirm { service, reason } => {
                let req = self.request(peer, reason, false);
                self.change(&service, |s| s.confirm(&service, &req))
            }
            // (A known service's history is read off the loop, in `run`.)
            Request::History { service } => match self.state.service(&service) {
                Err(e) => Response::error(e.to_string()),
                Ok(_) => history_response(self.store.dir(), &service),
            },
            Request::Undo { service, reason } => self.undo(&service, reason, peer),
            Request::Status { service } => self.status(service.as_deref()),
            Request::Reload => self.reload(),
            Request::Detach => self.detach(),
        };
        if resp.ok {
            log::debug!("{} (pid {:?}): {summary}: ok", peer.user, peer.pid);
        } else {
            log::warn!(
                "{} (pid {:?}): {summary}: refused: {}",
                peer.user,
                peer.pid,
                resp.error.as_deref().unwrap_or("")
            );
        }
        resp
    }

    fn request(&self, peer: &Peer, reason: Option<String>, force: bool) -> model::Request {
        model::Request {
            user: peer.user.clone(),
            reason,
            force,
            at_ms: now_ms(),
        }
    }

    /// A desired state holding a copy of `service` alone: what a change of
    /// it is made on (model changes touch one service), instead of a copy of
    /// every service's state on each request.
    fn scratch(&self, service: &str) -> DesiredState {
        DesiredState {
            services: self
                .state
                .services
                .get_key_value(service)
                .map(|(k, v)| (k.clone(), v.clone()))
                .into_iter()
                .collect(),
        }
    }

    /// Applies a model change to a copy of the service and commits it.
    fn change(
        &mut self,
        service: &str,
        f: impl FnOnce(&mut DesiredState) -> Result<model::Change, model::ModelError>,
    ) -> Response {
        let mut next = self.scratch(service);
        match f(&mut next) {
            Err(e) => Response::error(e.to_string()),
            Ok(change) => self.commit(service, next, change, false),
        }
    }

    /// Backends of `colour` that keep a pool from being healthy.
    fn unhealthy(&self, service: &str, colour: Colour) -> Vec<String> {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return Vec::new();
        };
        if svc.health.is_none() {
            return Vec::new();
        }
        svc.pool(colour)
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match self.health_of(service, colour, i) {
                Health::Up => None,
                Health::Down => Some(format!("{a} (down)")),
                Health::Unknown => Some(format!("{a} (not checked yet)")),
            })
            .collect()
    }

    fn flip(
        &mut self,
        service: &str,
        to: Option<Colour>,
        req: model::Request,
        guards: FlipGuards,
    ) -> Response {
        let Ok(st) = self.state.service(service) else {
            return Response::error(format!("no service named '{service}'"));
        };
        let target = to.unwrap_or(st.active.other());
        if target != st.active {
            let bad = self.unhealthy(service, target);
            if !bad.is_empty() && !req.force {
                let msg = format!(
                    "refusing to flip {service} to {target}: its pool is not healthy: {}; use --force to override",
                    bad.join(", ")
                );
                self.journal_refusal(service, &req, target, &msg);
                return Response::error(msg);
            }
            if !bad.is_empty() {
                log::warn!(
                    "{service}: flip to an unhealthy {target} forced by {}: {}",
                    req.user,
                    bad.join(", ")
                );
            }
        }
        let mut next = self.scratch(service);
        match next.flip(service, to, &req, &guards) {
            Err(e) => Response::error(e.to_string()),
            Ok(FlipOutcome::Unchanged { active, generation }) => Response::ok(format!(
                "{service}: already {active} (generation {generation}); nothing changed"
            )),
            Ok(FlipOutcome::Changed(change)) => {
                self.baselines.remove(service);
                let id = next.service(service).map(|s| s.id);
                let resp = self.commit(service, next, change.clone(), true);
                if resp.ok && guards.watch_ms.is_some() {
                    // The error rate is judged on flows from this moment on.
                    if let Some(Ok(stats)) =
                        id.ok().map(|id| self.dataplane.colour_stats(id, change.to))
                    {
                        self.baselines
                            .insert(service.to_string(), Baseline::new(stats));
                    }
                }
                resp
            }
        }
    }

    fn journal_refusal(&self, service: &str, req: &model::Request, to: Colour, why: &str) {
        let Ok(st) = self.state.service(service) else {
            return;
        };
        let entry = JournalEntry {
            service: service.to_string(),
            outcome: format!("refused: {why}"),
            change: model::Change {
                kind: model::ChangeKind::Flip,
                generation_before: st.generation,
                generation: st.generation,
                from: st.active,
                to,
                at_ms: req.at_ms,
                user: req.user.clone(),
                reason: req.reason.clone(),
                forced: req.force,
                before: st.snapshot(),
                after: st.snapshot(),
            },
            seq: None,
            state: None,
        };
        if let Err(e) = self.store.append_journal(&entry) {
            log::error!("journal: {e}");
        }
    }

    fn preview(
        &mut self,
        service: &str,
        action: PreviewAction,
        cidr: Option<String>,
        reason: Option<String>,
        peer: &Peer,
    ) -> Response {
        let req = self.request(peer, reason, false);
        match (action, cidr) {
            (PreviewAction::List, _) => match self.state.service(service) {
                Ok(s) => Response {
                    ok: true,
                    preview: Some(s.preview.clone()),
                    ..Response::default()
                },
                Err(e) => Response::error(e.to_string()),
            },
            (_, None) => Response::error("preview add/del needs a CIDR"),
            (PreviewAction::Add, Some(c)) => {
                self.change(service, |s| s.preview_add(service, &c, &req))
            }
            (PreviewAction::Del, Some(c)) => {
                self.change(service, |s| s.preview_del(service, &c, &req))
            }
        }
    }

    /// Undoes the service's last change: the one its state keeps (a change
    /// the data plane refused was reverted out of it), so no journal read.
    fn undo(&mut self, service: &str, reason: Option<String>, peer: &Peer) -> Response {
        let req = self.request(peer, reason, false);
        let last = match self.state.service(service) {
            Ok(s) => s.history.last().cloned(),
            Err(e) => return Response::error(e.to_string()),
        };
        let Some(last) = last else {
            return Response::error(format!("{service} has no change to undo"));
        };
        self.change(service, |s| s.undo(service, &last, &req))
    }

    /// Journals the change with the service's new state (durable once that
    /// line is), then moves the data plane; the snapshot follows on a tick.
    /// `next` holds the changed service (see `scratch`).
    fn commit(
        &mut self,
        service: &str,
        mut next: DesiredState,
        change: model::Change,
        may_move_flows: bool,
    ) -> Response {
        let Some(after) = next.services.remove(service) else {
            return Response::error(format!("no service named '{service}'"));
        };
        let id = after.id;
        if let Err(e) = self.store.append_change(service, &change, &after) {
            return Response::error(format!("{e}; nothing changed"));
        }
        if let Some(d) = *FAULT_DELAY_COMMIT {
            // Fault injection for tests: widen the window between the durable
            // write and the data plane, where a crash must not split a change.
            std::thread::sleep(d);
        }
        let old = self.state.services.insert(service.to_string(), after);
        if let Err(e) = self.move_dataplane(service, id, &change) {
            let why = format!("data plane: {e:#}");
            // `old` is there: `next` was made from it (see `scratch`).
            if let Some(before) = old {
                let journalled = self.store.append_revert(service, &why, &change, &before);
                self.state.services.insert(service.to_string(), before);
                if let Err(je) = journalled {
                    log::error!("{service}: journalling the revert: {je}; writing the snapshot");
                    if let Err(se) = self.store.save(&self.state) {
                        log::error!("{service}: {se}: a restart would apply the refused change");
                    }
                }
            }
            let _ = self.sync_service(service);
            return Response::error(format!("{why}; nothing changed"));
        }
        let mut moved = String::new();
        if change.forced && may_move_flows {
            match self.dataplane.flush_flows(id, change.to) {
                Ok(n) => moved = format!("; moved {n} open flows"),
                Err(e) => moved = format!("; moving open flows failed: {e}"),
            }
        }
        let what = match change.kind {
            model::ChangeKind::Shift => format!(
                "{:.2}% of new flows to {}",
                f64::from(change.after.canary_bp) / 100.0,
                change.to.other()
            ),
            model::ChangeKind::PreviewAdd | model::ChangeKind::PreviewDel => {
                format!("preview prefixes [{}]", change.after.preview.join(", "))
            }
            model::ChangeKind::Confirm => format!("{} confirmed", change.to),
            _ => format!("{} → {}", change.from, change.to),
        };
        let msg = format!(
            "{service}: {} {what} (generation {} → {}){moved}",
            change.kind, change.generation_before, change.generation
        );
        log::info!(
            "{msg} by {}{}",
            change.user,
            change
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        Response {
            ok: true,
            message: Some(msg),
            change: Some(change),
            ..Response::default()
        }
    }

    /// The data plane side of a change: only what the change altered, so a
    /// flip is the one 32-bit store it promises (plus nothing).
    fn move_dataplane(
        &mut self,
        service: &str,
        id: u32,
        change: &model::Change,
    ) -> anyhow::Result<()> {
        let (b, a) = (&change.before, &change.after);
        if b.preview != a.preview {
            return self.sync_service(service);
        }
        if b.active != a.active || change.forced {
            self.dataplane.set_active(id, change.to)?;
        }
        if b.canary_bp != a.canary_bp {
            self.dataplane.set_canary(id, a.canary_bp)?;
        }
        Ok(())
    }

    fn status(&self, only: Option<&str>) -> Response {
        status_response(self.collect_status(only))
    }

    /// Live-flow counts need the whole flow table read, which takes long
    /// with a large table (hundreds of ms for a million flows): it runs on a
    /// blocking thread, so flips and other requests are not held up. One
    /// scan at a time; requests arriving meanwhile wait for the next one.
    fn status_request(&mut self, w: StatusWaiter) {
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

    fn flows_counted(
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

    fn collect_status(&self, only: Option<&str>) -> anyhow::Result<api::Status> {
        if let Some(name) = only {
            self.state.service(name)?;
        }
        let flows = self
            .dataplane
            .flow_counts(self.config.udp_idle_timeout, self.config.tcp_idle_timeout)?;
        self.collect_status_with(only, &flows)
    }

    fn collect_status_with(
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
        let interfaces = self
            .dataplane
            .attachments()
            .into_iter()
            .map(|a| InterfaceStatus {
                name: a.interface,
                ifindex: a.ifindex,
                mode: a.mode,
                adopted: a.adopted,
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
            config: self.config.path.display().to_string(),
            pid: std::process::id(),
        })
    }

    fn detach(&mut self) -> Response {
        let bpffs = self.config.bpffs.clone();
        let ifaces: Vec<String> = self
            .dataplane
            .attachments()
            .into_iter()
            .map(|a| a.interface)
            .collect();
        for i in &ifaces {
            if let Err(e) = self.dataplane.detach(i) {
                return Response::error(format!("detaching {i}: {e}"));
            }
        }
        if let Err(e) = dataplane::remove_pins(&bpffs) {
            return Response::error(format!("removing pins: {e}"));
        }
        log::info!(
            "detached XDP from {ifaces:?} and removed the pins under {}; exiting",
            bpffs.display()
        );
        Response::ok(format!(
            "detached from {} interfaces and removed all pins; the daemon exits",
            ifaces.len()
        ))
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
    loop {
        t.tick().await;
        let result = health::probe(addr, &cfg).await;
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

#[cfg(test)]
mod tests {
    use super::name_ifindexes;

    #[test]
    fn kernel_messages_name_the_interfaces_they_index() {
        let name = |i: u32| (i == 5).then(|| "lbb".to_string());
        assert_eq!(
            name_ifindexes("leaves through ifindex 5, which", name),
            "leaves through ifindex 5 (lbb), which"
        );
        assert_eq!(
            name_ifindexes("ifindex 7 and ifindex 5", name),
            "ifindex 7 and ifindex 5 (lbb)"
        );
        assert_eq!(name_ifindexes("ifindex 5", name), "ifindex 5 (lbb)");
        assert_eq!(name_ifindexes("no index here", name), "no index here");
        assert_eq!(
            name_ifindexes("ends with ifindex ", name),
            "ends with ifindex "
        );
        assert_eq!(
            name_ifindexes("ifindex x, ifindex 55", name),
            "ifindex x, ifindex 55"
        );
    }
}
