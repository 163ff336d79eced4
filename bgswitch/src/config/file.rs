//! The config file's format: the TOML as written (`Raw*`), and its parse
//! and validation into the daemon's types, with errors that name the
//! file, the key and the reason.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bgswitch_common::{DEFAULT_MAX_FLOWS, MAX_BACKENDS, MAX_INTERFACES, MAX_SERVICES};
use serde::Deserialize;

use super::{
    units::{endpoint, parse_duration, parse_size},
    AttachSetting, CheckConfig, Config, ConfigError, FleetConfig, HealthConfig, HealthKind,
    Protocol, ServiceConfig, TlsProbe,
};
use crate::paths;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Option<Vec<RawInterface>>,
    attach: Option<String>,
    /// The older name of `attach` (auto, native, generic).
    xdp_mode: Option<String>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    state_dir: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    max_flows: Option<i64>,
    udp_idle_timeout: Option<String>,
    tcp_idle_timeout: Option<String>,
    journal_max_size: Option<RawSize>,
    metrics_listen: Option<String>,
    #[serde(default)]
    service: Vec<RawService>,
    fleet: Option<RawFleet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    etcd: Option<Vec<String>>,
    cluster: Option<String>,
    host: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
}

/// An interface: its name, or a table naming it and its attachment on one
/// line (`{ name = "veth1", attach = "tc" }`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawInterface {
    Name(String),
    Table(RawInterfaceTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterfaceTable {
    name: String,
    attach: Option<String>,
}

/// A size: bytes, or text with a unit ("64MiB").
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<String>,
    path: Option<String>,
    status: Option<String>,
    host: Option<String>,
    expect: Option<String>,
    sni: Option<String>,
    ca: Option<PathBuf>,
    insecure: Option<bool>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    vip: Option<String>,
    protocol: Option<String>,
    blue: Option<Vec<String>>,
    green: Option<Vec<String>>,
    health: Option<RawHealth>,
    stateless: Option<bool>,
    check: Option<Vec<RawCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Option<String>,
    command: Option<Vec<String>>,
    when: Option<Vec<String>>,
    timeout: Option<String>,
    interval: Option<String>,
    user: Option<String>,
}

/// The `socket` key alone, for the commands that talk to the daemon: found
/// even where the rest of the file would not pass (a config being edited
/// must not keep `bgswitch status` from the daemon running on the old one).
/// `None`: the key is not given (the default socket).
pub fn socket_of(path: &Path, text: &str) -> Result<Option<PathBuf>, ConfigError> {
    #[derive(Deserialize)]
    struct JustSocket {
        socket: Option<PathBuf>,
    }
    let err = |reason: String| ConfigError {
        file: path.display().to_string(),
        key: "socket".into(),
        reason,
    };
    let raw: JustSocket = toml::from_str(text).map_err(|e| err(e.message().to_string()))?;
    match raw.socket {
        Some(p) if !p.is_absolute() => {
            Err(err(format!("'{}' must be an absolute path", p.display())))
        }
        other => Ok(other),
    }
}

/// Parses and validates config text; `path` is used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let err = |key: &str, reason: String| ConfigError {
        file: file.clone(),
        key: key.to_string(),
        reason,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let key = e
            .span()
            .map(|s| line_col(text, s.start))
            .map(|(l, c)| format!("line {l} column {c}"))
            .unwrap_or_else(|| "(syntax)".into());
        let msg = e.message().trim();
        let reason = if msg.is_empty() {
            "invalid TOML here (a key without a value, an unclosed string or array, or a \
             stray control character)"
                .to_string()
        } else {
            msg.to_string()
        };
        err(&key, reason)
    })?;

    let global = match (raw.attach.as_deref(), raw.xdp_mode.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(err(
                "xdp_mode",
                "give `attach` alone (xdp_mode is its older name)".into(),
            ))
        }
        (Some(a), None) => AttachSetting::parse(a).ok_or_else(|| {
            err(
                "attach",
                format!("'{a}' is not one of auto, xdp, xdp-generic, tc"),
            )
        })?,
        (None, Some(m)) => match m {
            "auto" => AttachSetting::Auto,
            "native" => AttachSetting::Xdp,
            "generic" => AttachSetting::XdpGeneric,
            other => {
                return Err(err(
                    "xdp_mode",
                    format!("'{other}' is not one of auto, native, generic"),
                ))
            }
        },
        (None, None) => AttachSetting::Auto,
    };
    let mut attach = BTreeMap::new();
    let mut interfaces = Vec::new();
    for (i, entry) in raw.interfaces.unwrap_or_default().into_iter().enumerate() {
        let (name, setting) = match entry {
            RawInterface::Name(n) => (n, global),
            RawInterface::Table(t) => {
                let setting = match t.attach.as_deref() {
                    None => global,
                    Some(a) => AttachSetting::parse(a).ok_or_else(|| {
                        err(
                            &format!("interfaces[{i}].attach"),
                            format!("'{a}' is not one of auto, xdp, xdp-generic, tc"),
                        )
                    })?,
                };
                (t.name, setting)
            }
        };
        attach.insert(name.clone(), setting);
        interfaces.push(name);
    }
    if interfaces.is_empty() {
        return Err(err("interfaces", "must name at least one interface".into()));
    }
    if interfaces.len() > MAX_INTERFACES as usize {
        return Err(err(
            "interfaces",
            format!("at most {MAX_INTERFACES} interfaces"),
        ));
    }
    let mut seen_if = BTreeSet::new();
    for (i, name) in interfaces.iter().enumerate() {
        // The kernel's rules (dev_valid_name): 1-15 bytes, not "." or "..",
        // no '/', ':' or whitespace.
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(err(
                &format!("interfaces[{i}]"),
                format!("'{name}' is not a valid interface name"),
            ));
        }
        if !seen_if.insert(name) {
            return Err(err(
                &format!("interfaces[{i}]"),
                format!("'{name}' is listed twice"),
            ));
        }
    }

    let max_flows = match raw.max_flows {
        None => DEFAULT_MAX_FLOWS,
        Some(n) if (1024..=(1 << 26)).contains(&n) => n as u32,
        Some(n) => return Err(err("max_flows", format!("{n} is outside 1024..=67108864"))),
    };
    let udp_idle_timeout = duration_key(&raw.udp_idle_timeout, "30s", "udp_idle_timeout", &err)?;
    let tcp_idle_timeout = duration_key(&raw.tcp_idle_timeout, "1h", "tcp_idle_timeout", &err)?;
    let size_text = match &raw.journal_max_size {
        None => "64MiB".to_string(),
        Some(RawSize::Bytes(n)) => n.to_string(),
        Some(RawSize::Text(t)) => t.clone(),
    };
    let journal_max_size = match parse_size(&size_text) {
        Ok(n) if (JOURNAL_MIN..=JOURNAL_MAX).contains(&n) => n,
        Ok(_) => {
            return Err(err(
                "journal_max_size",
                format!("'{size_text}' is outside 16KiB..=16GiB (16384..=17179869184 bytes)"),
            ))
        }
        Err(r) => return Err(err("journal_max_size", r)),
    };

    if let Some(g) = &raw.socket_group {
        if g.is_empty() || g.contains([':', '/', ' ', '\0']) {
            return Err(err("socket_group", format!("'{g}' is not a group name")));
        }
    }
    for (key, p) in [
        ("socket", &raw.socket),
        ("state_dir", &raw.state_dir),
        ("bpffs", &raw.bpffs),
    ] {
        if let Some(p) = p {
            if !p.is_absolute() {
                return Err(err(
                    key,
                    format!("'{}' must be an absolute path", p.display()),
                ));
            }
        }
    }

    if raw.service.len() > MAX_SERVICES as usize {
        return Err(err("service", format!("at most {MAX_SERVICES} services")));
    }
    let mut services = Vec::new();
    let mut names = BTreeMap::new();
    let mut vips = BTreeMap::new();
    let mut backends: BTreeMap<(SocketAddr, Protocol), String> = BTreeMap::new();
    for (i, s) in raw.service.into_iter().enumerate() {
        let at = |k: &str| format!("service[{i}].{k}");
        let name = s
            .name
            .ok_or_else(|| err(&at("name"), "is required".into()))?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(err(
                &at("name"),
                format!("'{name}' must be 1-64 characters of A-Z a-z 0-9 - _ ."),
            ));
        }
        let at = |k: &str| format!("service[{i}] ({name}).{k}");
        if let Some(prev) = names.insert(name.clone(), i) {
            return Err(err(
                &at("name"),
                format!("duplicate service name (also service[{prev}])"),
            ));
        }
        let protocol = match s.protocol.as_deref() {
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                return Err(err(&at("protocol"), format!("'{other}' is not tcp or udp")))
            }
            None => return Err(err(&at("protocol"), "is required (tcp or udp)".into())),
        };
        let vip_text = s.vip.ok_or_else(|| err(&at("vip"), "is required".into()))?;
        let vip = endpoint(&vip_text).map_err(|r| err(&at("vip"), r))?;
        if let Some(prev) = vips.insert((vip, protocol), name.clone()) {
            return Err(err(
                &at("vip"),
                format!("{vip}/{protocol} is already the VIP of service '{prev}'"),
            ));
        }
        let mut pools = Vec::new();
        for (colour, list) in [("blue", s.blue), ("green", s.green)] {
            let list = list.unwrap_or_default();
            if list.is_empty() {
                return Err(err(
                    &at(colour),
                    "pool is empty: give 1 to 64 backends".into(),
                ));
            }
            if list.len() > MAX_BACKENDS as usize {
                return Err(err(
                    &at(colour),
                    format!("{} backends; at most {MAX_BACKENDS}", list.len()),
                ));
            }
            let mut pool = Vec::new();
            for (j, b) in list.iter().enumerate() {
                let key = format!("{}[{j}]", at(colour));
                let addr = endpoint(b).map_err(|r| err(&key, r))?;
                if addr.is_ipv4() != vip.is_ipv4() {
                    return Err(err(
                        &key,
                        format!(
                            "{addr} is {} but the VIP {vip} is {}: one address family per \
                             service (VIP and every backend of both colours)",
                            family_name(&addr),
                            family_name(&vip)
                        ),
                    ));
                }
                if addr == vip {
                    return Err(err(&key, "a backend cannot be the VIP itself".into()));
                }
                if let Some(prev) = backends.insert((addr, protocol), format!("{name}.{colour}")) {
                    return Err(err(
                        &key,
                        format!(
                            "{addr}/{protocol} is already a backend of {prev}: replies could \
                             not be told apart"
                        ),
                    ));
                }
                pool.push(addr);
            }
            pools.push(pool);
        }
        let green = pools.pop().unwrap_or_default();
        let blue = pools.pop().unwrap_or_default();
        let health = match s.health {
            None => None,
            Some(h) => Some(health(h, &|k: &str, r: String| {
                err(&at(&format!("health.{k}")), r)
            })?),
        };
        let stateless = s.stateless.unwrap_or(false);
        if stateless && protocol != Protocol::Tcp {
            return Err(err(
                &at("stateless"),
                "needs protocol = \"tcp\": a UDP packet carries nothing that tells a new flow \
                 from an old one, so UDP flows are always recorded"
                    .into(),
            ));
        }
        if stateless && vip.is_ipv6() {
            return Err(err(
                &at("stateless"),
                "IPv6 services use the flow table; stateless periods are IPv4-only".into(),
            ));
        }
        let mut checks: Vec<CheckConfig> = Vec::new();
        for (j, c) in s.check.unwrap_or_default().into_iter().enumerate() {
            let c = check(c, &|k: &str, r: String| {
                err(&at(&format!("check[{j}].{k}")), r)
            })?;
            if let Some(k) = checks.iter().position(|o| o.name == c.name) {
                return Err(err(
                    &at(&format!("check[{j}].name")),
                    format!("'{}' is also the name of check[{k}]", c.name),
                ));
            }
            checks.push(c);
        }
        if checks.len() > MAX_CHECKS {
            return Err(err(
                &at("check"),
                format!("{} checks; at most {MAX_CHECKS}", checks.len()),
            ));
        }
        services.push(ServiceConfig {
            name,
            vip,
            protocol,
            blue,
            green,
            health,
            stateless,
            checks,
        });
    }
    for (i, s) in services.iter().enumerate() {
        for (colour, pool) in [("blue", &s.blue), ("green", &s.green)] {
            for (j, b) in pool.iter().enumerate() {
                if let Some(other) = vips.get(&(*b, s.protocol)) {
                    return Err(err(
                        &format!("service[{i}] ({}).{colour}[{j}]", s.name),
                        format!(
                            "{b}/{} is the VIP of service '{other}', not a backend",
                            s.protocol
                        ),
                    ));
                }
            }
        }
    }

    let metrics_listen = match raw.metrics_listen {
        None => None,
        Some(t) => Some(t.parse::<SocketAddr>().map_err(|_| {
            err(
                "metrics_listen",
                format!("'{t}' is not ADDRESS:PORT (e.g. 127.0.0.1:9477)"),
            )
        })?),
    };

    let fleet = match raw.fleet {
        None => None,
        Some(f) => Some(fleet(f, &|k: &str, r: String| {
            err(&format!("fleet.{k}"), r)
        })?),
    };

    Ok(Config {
        path: path.to_path_buf(),
        fleet,
        metrics_listen,
        interfaces,
        attach,
        socket: raw.socket.unwrap_or_else(|| paths::DEFAULT_SOCKET.into()),
        socket_group: raw.socket_group,
        state_dir: raw
            .state_dir
            .unwrap_or_else(|| paths::DEFAULT_STATE_DIR.into()),
        bpffs: raw.bpffs.unwrap_or_else(|| paths::DEFAULT_BPFFS.into()),
        max_flows,
        udp_idle_timeout,
        tcp_idle_timeout,
        journal_max_size,
        services,
    })
}

/// Bounds of `journal_max_size`.
const JOURNAL_MIN: u64 = 16 << 10;

const JOURNAL_MAX: u64 = 16 << 30;

fn health(
    h: RawHealth,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HealthConfig, ConfigError> {
    let kind_text = h.kind.as_deref().unwrap_or("tcp");
    if kind_text != "https" {
        for (key, given) in [
            ("sni", h.sni.is_some()),
            ("ca", h.ca.is_some()),
            ("insecure", h.insecure.is_some()),
        ] {
            if given {
                return Err(err(key, "applies to kind = \"https\" only".into()));
            }
        }
    }
    let kind = match kind_text {
        "tcp" => {
            if h.path.is_some() || h.status.is_some() || h.host.is_some() || h.expect.is_some() {
                return Err(err(
                    "kind",
                    "path, status, host and expect apply to kind = \"http\" or \"https\" only"
                        .into(),
                ));
            }
            HealthKind::Tcp
        }
        "http" | "https" => {
            let path = h.path.unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err(
                    "path",
                    format!("'{path}' must start with / and contain no spaces"),
                ));
            }
            let status_text = h.status.unwrap_or_else(|| "200-399".into());
            let range = status_text
                .split_once('-')
                .map_or((status_text.as_str(), status_text.as_str()), |(a, b)| {
                    (a, b)
                });
            let lo: u16 = range.0.trim().parse().map_err(|_| {
                err(
                    "status",
                    format!("'{status_text}' is not a status or range like 200-399"),
                )
            })?;
            let hi: u16 = range.1.trim().parse().map_err(|_| {
                err(
                    "status",
                    format!("'{status_text}' is not a status or range like 200-399"),
                )
            })?;
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return Err(err(
                    "status",
                    format!("'{status_text}' is not a range within 100-599"),
                ));
            }
            if let Some(host) = &h.host {
                if host.is_empty()
                    || host.len() > 255
                    || host.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(err("host", format!("'{host}' is not a Host header value")));
                }
            }
            if let Some(e) = &h.expect {
                if e.is_empty() || e.len() > 256 {
                    return Err(err("expect", "must be 1 to 256 bytes of the body".into()));
                }
            }
            let tls = if kind_text == "https" {
                let insecure = h.insecure.unwrap_or(false);
                if insecure && h.ca.is_some() {
                    return Err(err(
                        "insecure",
                        "give `ca` (verify against it) or `insecure = true` (verify nothing), not both"
                            .into(),
                    ));
                }
                if let Some(ca) = &h.ca {
                    if !ca.is_absolute() {
                        return Err(err(
                            "ca",
                            format!("'{}' must be an absolute path", ca.display()),
                        ));
                    }
                }
                if let Some(sni) = &h.sni {
                    if sni.is_empty()
                        || sni.len() > 253
                        || !sni
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                    {
                        return Err(err("sni", format!("'{sni}' is not a DNS name")));
                    }
                }
                Some(TlsProbe {
                    sni: h.sni,
                    ca: h.ca,
                    insecure,
                })
            } else {
                None
            };
            HealthKind::Http {
                path,
                status: (lo, hi),
                host: h.host,
                expect: h.expect,
                tls,
            }
        }
        other => return Err(err("kind", format!("'{other}' is not tcp, http or https"))),
    };
    let dur = |v: &Option<String>, default: &str, key: &str| -> Result<Duration, ConfigError> {
        let t = v.as_deref().unwrap_or(default);
        let d = parse_duration(t).map_err(|r| err(key, r))?;
        if d < Duration::from_millis(10) {
            return Err(err(key, format!("'{t}' is shorter than 10ms")));
        }
        Ok(d)
    };
    let interval = dur(&h.interval, "1s", "interval")?;
    let timeout = dur(&h.timeout, "500ms", "timeout")?;
    if timeout > interval {
        return Err(err("timeout", "must not be longer than interval".into()));
    }
    let count = |v: Option<i64>, default: u32, key: &str| -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if (1..=100).contains(&n) => Ok(n as u32),
            Some(n) => Err(err(key, format!("{n} is outside 1..=100"))),
        }
    };
    Ok(HealthConfig {
        kind,
        interval,
        timeout,
        rise: count(h.rise, 2, "rise")?,
        fall: count(h.fall, 3, "fall")?,
    })
}

fn fleet(
    f: RawFleet,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<FleetConfig, ConfigError> {
    let etcd = f.etcd.unwrap_or_default();
    if etcd.is_empty() {
        return Err(err(
            "etcd",
            "give the client URLs of the etcd members, e.g. [\"http://10.0.0.5:2379\"]".into(),
        ));
    }
    let tls = f.ca.is_some() || f.cert.is_some();
    for (i, u) in etcd.iter().enumerate() {
        let Some((scheme, rest)) = u.split_once("://") else {
            return Err(err(
                &format!("etcd[{i}]"),
                format!("'{u}' is not a URL like http://10.0.0.5:2379"),
            ));
        };
        if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', ' ']) {
            return Err(err(
                &format!("etcd[{i}]"),
                format!("'{u}' is not http://HOST:PORT or https://HOST:PORT"),
            ));
        }
        if (scheme == "https") != tls {
            return Err(err(
                &format!("etcd[{i}]"),
                if tls {
                    format!("'{u}' is http:// but ca/cert are given: use https:// for every member")
                } else {
                    format!(
                        "'{u}' is https://: give `ca` (and `cert`, `key` for client certificates)"
                    )
                },
            ));
        }
    }
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let cluster = f.cluster.ok_or_else(|| {
        err(
            "cluster",
            "is required (the key prefix /bgswitch/<cluster>/)".into(),
        )
    })?;
    if !name_ok(&cluster) {
        return Err(err(
            "cluster",
            format!("'{cluster}' must be 1-64 characters of A-Z a-z 0-9 - _ ."),
        ));
    }
    let host = match f.host {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    if !name_ok(&host) {
        return Err(err(
            "host",
            format!(
                "'{host}' must be 1-64 characters of A-Z a-z 0-9 - _ . (default: the host name)"
            ),
        ));
    }
    if f.cert.is_some() != f.key.is_some() {
        return Err(err("cert", "give `cert` and `key` together".into()));
    }
    if f.user.is_some() != f.password_file.is_some() {
        return Err(err(
            "user",
            "give `user` and `password_file` together".into(),
        ));
    }
    for (k, p) in [
        ("ca", &f.ca),
        ("cert", &f.cert),
        ("key", &f.key),
        ("password_file", &f.password_file),
    ] {
        if let Some(p) = p {
            if !p.is_absolute() {
                return Err(err(
                    k,
                    format!("'{}' must be an absolute path", p.display()),
                ));
            }
        }
    }
    Ok(FleetConfig {
        etcd,
        cluster,
        host,
        ca: f.ca,
        cert: f.cert,
        key: f.key,
        user: f.user,
        password_file: f.password_file,
    })
}

/// Checks per service at most.
const MAX_CHECKS: usize = 16;

/// Bounds of a check's `timeout` and `interval`.
const CHECK_TIMEOUT_MAX: Duration = Duration::from_secs(600);

fn check(
    c: RawCheck,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<CheckConfig, ConfigError> {
    let name = c.name.ok_or_else(|| err("name", "is required".into()))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
    {
        return Err(err(
            "name",
            format!("'{name}' must be 1-64 characters of A-Z a-z 0-9 - _ ."),
        ));
    }
    let command = c.command.unwrap_or_default();
    let Some(program) = command.first() else {
        return Err(err(
            "command",
            "is required: the program and its arguments, e.g. [\"/usr/local/bin/smoke\", \"--fast\"] (run directly, never through a shell)".into(),
        ));
    };
    if program.is_empty() || (program.contains('/') && !program.starts_with('/')) {
        return Err(err(
            "command",
            format!(
                "'{program}' must be an absolute path or a bare program name (looked up in {})",
                crate::paths::CHECK_PATH
            ),
        ));
    }
    if command.iter().any(|a| a.contains('\0')) {
        return Err(err("command", "an argument contains a NUL byte".into()));
    }
    let (mut before_flip, mut during_watch) = (false, false);
    match c.when {
        None => (before_flip, during_watch) = (true, true),
        Some(list) if list.is_empty() => {
            return Err(err(
                "when",
                "names no phase: give before-flip, during-watch or both".into(),
            ))
        }
        Some(list) => {
            for w in list {
                match w.as_str() {
                    "before-flip" => before_flip = true,
                    "during-watch" => during_watch = true,
                    other => {
                        return Err(err(
                            "when",
                            format!("'{other}' is not before-flip or during-watch"),
                        ))
                    }
                }
            }
        }
    }
    let dur = |v: &Option<String>, default: &str, key: &str, min: Duration| {
        let t = v.as_deref().unwrap_or(default);
        let d = parse_duration(t).map_err(|r| err(key, r))?;
        if d < min || d > CHECK_TIMEOUT_MAX {
            return Err(err(key, format!("'{t}' is outside {min:?}..=10m")));
        }
        Ok(d)
    };
    let timeout = dur(&c.timeout, "30s", "timeout", Duration::from_millis(100))?;
    let interval = dur(&c.interval, "10s", "interval", Duration::from_secs(1))?;
    let user = c.user.unwrap_or_else(|| "nobody".into());
    if user.is_empty() || user.contains([':', '/', ' ', '\0']) {
        return Err(err("user", format!("'{user}' is not a user name")));
    }
    if user == "root" || user.parse::<u32>() == Ok(0) {
        return Err(err(
            "user",
            "checks never run as root: name an unprivileged user (default: nobody)".into(),
        ));
    }
    Ok(CheckConfig {
        name,
        command,
        before_flip,
        during_watch,
        timeout,
        interval,
        user,
    })
}

fn duration_key(
    value: &Option<String>,
    default: &str,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Duration, ConfigError> {
    let text = value.as_deref().unwrap_or(default);
    let d = parse_duration(text).map_err(|r| err(key, r))?;
    if d < Duration::from_secs(1) {
        return Err(err(key, format!("'{text}' is shorter than 1s")));
    }
    Ok(d)
}

fn family_name(a: &SocketAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}
