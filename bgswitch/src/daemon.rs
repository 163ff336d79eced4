//! The daemon: one loop over a closed set of events — control requests,
//! signals — that owns the data plane and the desired state. Connection
//! tasks only parse and forward requests; every change happens here, in order.
//!
//! Order of a change: the new desired state is written to disk first, then the
//! data plane follows with one 32-bit store. A crash between the two leaves a
//! state file the next daemon applies at start, so a flip happens whole or
//! not at all.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use crate::{
    api::{self, BackendStatus, ColourStatus, InterfaceStatus, Request, Response, ServiceStatus},
    config::{self, Config},
    dataplane::{self, backend_of, backend_stat_id, service_key, Dataplane, LoadOptions},
    model::{self, Colour, DesiredState, FlipOutcome},
    state::StateStore,
};

/// How long a client may take to send a request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most control connections served at once.
const MAX_CLIENTS: usize = 64;

/// Who is on the other end of a control connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub user: String,
}

/// Everything the loop reacts to.
enum Event {
    Request {
        req: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    },
    Reload,
    Shutdown(&'static str),
}

/// The daemon's state: config, desired state, data plane.
pub struct Daemon {
    config: Config,
    store: StateStore,
    state: DesiredState,
    dataplane: Dataplane,
    socket_gid: Option<u32>,
    _lock: File,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid returns static storage or null; copied out at once.
    let p = unsafe { libc::getpwuid(uid) };
    if p.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: pw_name of a non-null passwd entry is a valid C string.
    let name = unsafe { std::ffi::CStr::from_ptr((*p).pw_name) };
    name.to_string_lossy().into_owned()
}

/// Supplementary groups of a process, from /proc.
fn process_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
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
        let (added, removed) = state.reconcile(&config)?;
        for n in &added {
            log::info!("service {n}: new, starting on blue");
        }
        for n in &removed {
            log::info!("service {n}: no longer configured, removing");
        }
        store.save(&state)?;
        enable_ip_forward()?;
        let dataplane = Dataplane::load(&LoadOptions {
            bpffs: Some(config.bpffs.clone()),
            max_flows: config.max_flows,
        })?;
        let mut daemon = Self {
            config,
            store,
            state,
            dataplane,
            socket_gid,
            _lock: lock,
        };
        daemon.apply_config()?;
        Ok(daemon)
    }

    /// Makes the data plane serve the configured services with the desired
    /// colours, and attach to the configured interfaces only.
    fn apply_config(&mut self) -> anyhow::Result<()> {
        self.dataplane
            .set_settings(self.config.udp_idle_timeout, self.config.tcp_idle_timeout)?;
        let mut wanted = HashMap::new();
        for svc in &self.config.services {
            let st = self.state.service(&svc.name)?;
            let pool = |c: Colour| -> Vec<bgswitch_common::Backend> {
                svc.pool(c)
                    .iter()
                    .enumerate()
                    .map(|(i, a)| backend_of(*a, backend_stat_id(st.id, c, i as u32)))
                    .collect()
            };
            let key = service_key(svc.vip, svc.protocol.number());
            self.dataplane.write_service(
                st.id,
                key,
                &pool(Colour::Blue),
                &pool(Colour::Green),
                st.active,
            )?;
            wanted.insert(key, st.id);
        }
        for (key, id) in self.dataplane.service_keys()? {
            if wanted.get(&key) != Some(&id) {
                if !wanted.values().any(|w| *w == id) {
                    self.dataplane.remove_service(id, &key)?;
                } else {
                    // Same id now serves another VIP: drop only the old key.
                    let _ = self.dataplane.remove_service_key(&key);
                }
            }
        }
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

    /// Serves the control socket until a signal or `detach`.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let listener = self.bind_socket()?;
        let (tx, mut rx) = mpsc::channel::<Event>(256);
        let acceptor = tokio::spawn(accept_loop(listener, tx.clone(), self.socket_gid));
        let signals = tokio::spawn(signal_loop(tx.clone()));
        log::info!(
            "bgswitch daemon ready: {} services, interfaces {:?}, socket {}",
            self.config.services.len(),
            self.config.interfaces,
            self.config.socket.display()
        );
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Request { req, peer, reply } => {
                    let detach = matches!(req, Request::Detach);
                    let resp = self.handle(req, &peer);
                    let done = detach && resp.ok;
                    let _ = reply.send(resp);
                    if done {
                        // Let the connection task write the answer before
                        // the runtime (and the task) goes away.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
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
                    break;
                }
            }
        }
        acceptor.abort();
        signals.abort();
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
        ] {
            if !same {
                bail!(
                    "{}: {key}: changing it needs a daemon restart",
                    new.path.display()
                );
            }
        }
        let mut state = self.state.clone();
        let (added, removed) = state.reconcile(&new)?;
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
            } => self.flip(&service, to, force, reason, peer),
            Request::Rollback { service, reason } => self.rollback(&service, reason, peer),
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

    fn flip(
        &mut self,
        service: &str,
        to: Option<Colour>,
        force: bool,
        reason: Option<String>,
        peer: &Peer,
    ) -> Response {
        let req = self.request(peer, reason, force);
        let mut next = self.state.clone();
        match next.flip(service, to, &req) {
            Err(e) => Response::error(e.to_string()),
            Ok(FlipOutcome::Unchanged { active, generation }) => Response::ok(format!(
                "{service}: already {active} (generation {generation}); nothing changed"
            )),
            Ok(FlipOutcome::Changed(change)) => self.commit(service, next, change),
        }
    }

    fn rollback(&mut self, service: &str, reason: Option<String>, peer: &Peer) -> Response {
        let req = self.request(peer, reason, false);
        let mut next = self.state.clone();
        match next.rollback(service, &req) {
            Err(e) => Response::error(e.to_string()),
            Ok(change) => self.commit(service, next, change),
        }
    }

    /// Writes the new desired state, then moves the data plane.
    fn commit(&mut self, service: &str, next: DesiredState, change: model::Change) -> Response {
        let id = match next.service(service) {
            Ok(s) => s.id,
            Err(e) => return Response::error(e.to_string()),
        };
        if let Err(e) = self.store.save(&next) {
            return Response::error(format!("{e}; nothing changed"));
        }
        if let Err(e) = self.dataplane.set_active(id, change.to) {
            let _ = self.store.save(&self.state);
            return Response::error(format!("data plane: {e}; nothing changed"));
        }
        self.state = next;
        let mut moved = String::new();
        if change.forced {
            match self.dataplane.flush_flows(id, change.to) {
                Ok(n) => moved = format!("; moved {n} open flows"),
                Err(e) => moved = format!("; moving open flows failed: {e}"),
            }
        }
        let msg = format!(
            "{service}: {:?} {} → {} (generation {} → {}){moved}",
            change.kind, change.from, change.to, change.generation_before, change.generation
        )
        .to_lowercase();
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

    fn status(&self, only: Option<&str>) -> Response {
        match self.collect_status(only) {
            Ok(status) => Response {
                ok: true,
                status: Some(status),
                ..Response::default()
            },
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    fn collect_status(&self, only: Option<&str>) -> anyhow::Result<api::Status> {
        if let Some(name) = only {
            self.state.service(name)?;
        }
        let flows = self
            .dataplane
            .flow_counts(self.config.udp_idle_timeout, self.config.tcp_idle_timeout)?;
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
                let mut backends = Vec::new();
                for (i, a) in svc.pool(c).iter().enumerate() {
                    let b = self
                        .dataplane
                        .backend_stats(backend_stat_id(st.id, c, i as u32))?;
                    backends.push(BackendStatus {
                        address: a.to_string(),
                        packets: b.packets,
                        bytes: b.bytes,
                        new_flows: b.new_flows,
                        reply_packets: b.reply_packets,
                    });
                }
                colours.push(ColourStatus {
                    colour: c,
                    active: c == st.active,
                    backends,
                    live_flows: fc.live,
                    recorded_flows: fc.recorded,
                    packets: stats.packets,
                    bytes: stats.bytes,
                    new_flows: stats.new_flows,
                    reply_packets: stats.reply_packets,
                    reply_bytes: stats.reply_bytes,
                    backend_rsts: stats.backend_rsts,
                    syn_acks: stats.syn_acks,
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
        let counters = self
            .dataplane
            .global_stats()?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok(api::Status {
            services,
            interfaces,
            counters,
            config: self.config.path.display().to_string(),
            pid: std::process::id(),
        })
    }

    fn detach(&mut self) -> Response {
        let bpffs = self.config.bpffs.clone();
        // Detaching consumes the data plane; swap in nothing by tearing down pins.
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

async fn signal_loop(tx: mpsc::Sender<Event>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let ev = tokio::select! {
            _ = term.recv() => Event::Shutdown("SIGTERM"),
            _ = int.recv() => Event::Shutdown("SIGINT"),
            _ = hup.recv() => Event::Reload,
        };
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Event>, gid: Option<u32>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log::warn!("control socket: {MAX_CLIENTS} clients already connected; refusing one");
            let mut s = stream;
            let _ = write_response(
                &mut s,
                &Response::error("too many control connections; try again"),
            )
            .await;
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, tx, gid).await {
                log::warn!("control client: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn write_response(stream: &mut UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn serve_client(
    mut stream: UnixStream,
    tx: mpsc::Sender<Event>,
    gid: Option<u32>,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        user: user_name(cred.uid()),
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let allowed = peer.uid == 0
        || peer.uid == me
        || gid.is_some_and(|g| {
            peer.gid == g || peer.pid.is_some_and(|p| process_groups(p).contains(&g))
        });
    if !allowed {
        let _ = write_response(
            &mut stream,
            &Response::error("permission denied: not root nor in the socket group"),
        )
        .await;
        return Err(anyhow!(
            "refused {} (uid {}, pid {:?}): not root nor in the socket group",
            peer.user,
            peer.uid,
            peer.pid
        ));
    }
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read).take(api::MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(api::MAX_REQUEST_BYTES as u64 + 1);
        let n = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
            .await
        {
            Err(_) => {
                return Err(anyhow!(
                    "{}: no complete request within {REQUEST_TIMEOUT:?}; closing",
                    peer.user
                ));
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(());
        }
        if line.len() > api::MAX_REQUEST_BYTES || !line.ends_with(b"\n") {
            let resp = Response::error(format!(
                "request too long or not newline-terminated (limit {} bytes)",
                api::MAX_REQUEST_BYTES
            ));
            let mut l = serde_json::to_vec(&resp)?;
            l.push(b'\n');
            write.write_all(&l).await?;
            return Err(anyhow!(
                "{}: oversized or truncated request refused",
                peer.user
            ));
        }
        let resp = match serde_json::from_slice::<Request>(&line) {
            Err(e) => {
                log::warn!(
                    "{} (pid {:?}): malformed request refused: {e}",
                    peer.user,
                    peer.pid
                );
                Response::error(format!("malformed request: {e}"))
            }
            Ok(req) => {
                let (reply, rx) = oneshot::channel();
                if tx
                    .send(Event::Request {
                        req,
                        peer: peer.clone(),
                        reply,
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                rx.await
                    .unwrap_or_else(|_| Response::error("daemon is shutting down"))
            }
        };
        let mut l = serde_json::to_vec(&resp)?;
        l.push(b'\n');
        write.write_all(&l).await?;
    }
}

/// The config path the daemon uses when none is given.
pub fn default_config() -> PathBuf {
    PathBuf::from(crate::paths::DEFAULT_CONFIG)
}
