//! Start-up: the config and the host checked, the lock taken, the desired
//! state loaded (and what a pinned data plane already serves adopted for
//! services the state lacks), the data plane loaded or adopted and made to
//! match. Nothing changes before all of it is known to be good.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    path::Path,
};

use anyhow::{bail, Context as _};
use bgswitch_common::control;

use super::Daemon;
use crate::{
    config::{self, Config},
    dataplane::{self, service_key, Dataplane, LoadOptions},
    model::{self, Colour, DesiredState},
    paths,
    state::{DesiredStore, EtcdStore, LocalStore, StateDir},
};

/// Host checks a config must pass before the daemon acts on it.
pub(super) fn check_environment(config: &Config) -> anyhow::Result<()> {
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
    crate::checks::check_host(config)?;
    for (i, svc) in config.services.iter().enumerate() {
        let Some(h) = &svc.health else { continue };
        if let config::HealthKind::Http { tls: Some(t), .. } = &h.kind {
            crate::health::Prober::new(h).map_err(|e| {
                anyhow::anyhow!(
                    "{}: service[{i}] ({}).health.ca: {e}",
                    config.path.display(),
                    svc.name
                )
            })?;
            if t.insecure {
                log::warn!(
                    "{}: HTTPS health checks of {} do NOT verify the backends' certificates (insecure = true): anyone on the path can answer for them",
                    config.path.display(),
                    svc.name
                );
            }
        }
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

/// With an IPv6 service configured, turns on IPv6 forwarding
/// (`net.ipv6.conf.all.forwarding`): `bpf_fib_lookup` answers an IPv6
/// lookup only where the host forwards IPv6, and the stack forwards what
/// the program hands it. Logged loudly, with the interfaces it costs router
/// advertisements (a forwarding host ignores them unless `accept_ra` is 2).
pub(super) fn enable_ipv6_forward(config: &Config) -> anyhow::Result<()> {
    let Some(svc) = config.services.iter().find(|s| s.vip.is_ipv6()) else {
        return Ok(());
    };
    let p = "/proc/sys/net/ipv6/conf/all/forwarding";
    let cur = std::fs::read_to_string(p).with_context(|| {
        format!(
            "reading {p} (service {} is IPv6: is IPv6 disabled on this host?)",
            svc.name
        )
    })?;
    if cur.trim() == "1" {
        return Ok(());
    }
    std::fs::write(p, "1").with_context(|| {
        format!(
            "enabling IPv6 forwarding ({p}), which IPv6 service {} needs",
            svc.name
        )
    })?;
    log::warn!(
        "enabled IPv6 forwarding (net.ipv6.conf.all.forwarding=1) for IPv6 service {}: the kernel's FIB lookup refuses IPv6 otherwise. A forwarding host ignores router advertisements on interfaces whose accept_ra is 1: set accept_ra=2 on an uplink configured by them",
        svc.name
    );
    for name in &config.interfaces {
        let ra = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
        if std::fs::read_to_string(&ra).is_ok_and(|t| t.trim() == "1") {
            log::warn!(
                "{name}: accept_ra is 1, so router advertisements are now ignored there (routes and addresses learnt from them expire): `sysctl -w net.ipv6.conf.{name}.accept_ra=2` if it needs them"
            );
        }
    }
    Ok(())
}

/// The kernel memory the flow tables may take, per family a service of
/// the config has (each family's table holds up to `max_flows`, its
/// half-open table a quarter of that, at least 1024).
fn flow_memory(config: &Config) -> String {
    let mut parts = Vec::new();
    for (v6, name, per_flow) in [
        (false, "IPv4", dataplane::FLOW_BYTES_V4),
        (true, "IPv6", dataplane::FLOW_BYTES_V6),
    ] {
        if config.services.iter().any(|s| s.vip.is_ipv6() == v6) {
            let mib = |n: u32| n as f64 * per_flow as f64 / f64::from(1 << 20);
            parts.push(format!(
                "{name} {per_flow} B each, up to {:.1} MiB, and {:.1} MiB of half-open TCP records",
                mib(config.max_flows),
                dataplane::half_open_bytes(config.max_flows, v6) as f64 / f64::from(1 << 20)
            ));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" per family ({})", parts.join("; "))
    }
}

/// Takes the tick rate an earlier start in this boot (`boot_id`) measured,
/// if it kept one: the rate is fixed at boot, and measuring it takes 250 ms.
fn assume_kept_tick_rate(dir: &StateDir, boot_id: &str) -> bool {
    !boot_id.is_empty()
        && dir
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

impl Daemon {
    /// `bgswitch daemon --check`: the config and the host as `start` checks
    /// them (syntax, services, pools, limits, interfaces present, the
    /// socket's group), and a summary of what the daemon would serve and
    /// how it would attach. Touches nothing: no state, pins or lock.
    pub fn check(config_path: &Path) -> anyhow::Result<String> {
        let config = config::load(config_path)?;
        check_environment(&config)?;
        let mut out = format!("{}: ok\n", config.path.display());
        for svc in &config.services {
            out += &format!(
                "  service {}: {}/{}, blue {} backend{}, green {} backend{}{}{}\n",
                svc.name,
                svc.vip,
                svc.protocol,
                svc.blue.len(),
                if svc.blue.len() == 1 { "" } else { "s" },
                svc.green.len(),
                if svc.green.len() == 1 { "" } else { "s" },
                svc.health
                    .as_ref()
                    .map(|h| match &h.kind {
                        config::HealthKind::Tcp => ", TCP health checks".to_string(),
                        config::HealthKind::Http {
                            path, tls: None, ..
                        } => format!(", HTTP health checks of {path}"),
                        config::HealthKind::Http {
                            path, tls: Some(t), ..
                        } => format!(
                            ", HTTPS health checks of {path}{}",
                            if t.insecure {
                                " (certificates NOT verified)"
                            } else {
                                ""
                            }
                        ),
                    })
                    .unwrap_or_default(),
                if svc.stateless { ", stateless" } else { "" },
            );
            for c in &svc.checks {
                out += &format!(
                    "    check {}: {} as {}, {}{}, timeout {:?}\n",
                    c.name,
                    c.command.join(" "),
                    c.user,
                    match (c.before_flip, c.during_watch) {
                        (true, true) => "before flips and during watches",
                        (true, false) => "before flips",
                        _ => "during watches",
                    },
                    if c.during_watch {
                        format!(" (every {:?})", c.interval)
                    } else {
                        String::new()
                    },
                    c.timeout
                );
            }
        }
        if let Some(f) = &config.fleet {
            out += &format!(
                "  fleet {} as host {}: desired state shared through etcd at {} (not contacted by --check)\n",
                f.cluster,
                f.host,
                f.etcd.join(", ")
            );
        }
        for name in &config.interfaces {
            let (tries, why) = dataplane::AttachMode::choose(config.attach_of(name), name);
            let modes: Vec<&str> = tries.iter().map(|m| m.describe()).collect();
            out += &format!("  interface {name}: {} ({why})\n", modes.join(", else "));
        }
        out += &format!(
            "  socket {}{}, state in {}, pins under {}, flow table {} flows{}\n",
            config.socket.display(),
            config
                .socket_group
                .as_deref()
                .map(|g| format!(" (group {g})"))
                .unwrap_or_default(),
            config.state_dir.display(),
            config.bpffs.join(paths::PIN_DIR).display(),
            config.max_flows,
            flow_memory(&config),
        );
        Ok(out)
    }

    /// Reads the config, takes the lock, loads the desired state, loads or
    /// adopts the data plane and makes it match. Fails before changing
    /// anything if the config or the state is bad.
    pub fn start(config_path: &Path) -> anyhow::Result<Self> {
        let config = config::load(config_path)?;
        check_environment(&config)?;
        let socket_gid = config.socket_group.as_deref().map(group_id).transpose()?;
        let dir = StateDir::open(&config.state_dir)?;
        let lock = dir.lock()?;
        let local = LocalStore::open(dir.path())?;
        let mut store: Box<dyn DesiredStore> = match &config.fleet {
            None => Box::new(local),
            Some(f) => {
                log::info!(
                    "fleet {}: this host is {}; desired state shared through etcd at {}",
                    f.cluster,
                    f.host,
                    f.etcd.join(", ")
                );
                Box::new(EtcdStore::open(local, f)?)
            }
        };
        store.reconfigure(&config);
        let mut state = store.load()?;
        state.trim_history();
        let (added, removed) = state.reconcile(config.service_names())?;
        for n in &removed {
            log::info!("service {n}: no longer configured, removing");
        }
        let boot_id = std::fs::read_to_string(paths::BOOT_ID)
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let kept = assume_kept_tick_rate(&dir, &boot_id);
        let dataplane = Dataplane::load(&LoadOptions {
            bpffs: Some(config.bpffs.clone()),
            max_flows: config.max_flows,
        })?;
        if !kept && !boot_id.is_empty() {
            if let Err(e) = dir.keep_tick_rate(&boot_id, dataplane.hz()) {
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
        enable_ipv6_forward(&config)?;
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
        if let Some(p) = dataplane.pin_place() {
            log::info!(
                "pins under {} ({}): the data plane outlives this daemon",
                p.configured.display(),
                p.note
            );
        }
        log::info!(
            "flow tables: {} flows{}",
            config.max_flows,
            flow_memory(&config)
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
            scan_waiting: Vec::new(),
            rules_by_destination: false,
            durable_writes: Default::default(),
            transition_scan_at: None,
            pressure: Default::default(),
            checks: Default::default(),
            asking_local: false,
            _lock: lock,
        };
        daemon.rules_by_destination = daemon.read_rules();
        // Written with the settings `apply_config` writes.
        daemon
            .dataplane
            .set_backend_hops(daemon.rules_by_destination)?;
        daemon.apply_config()?;
        Ok(daemon)
    }
}
