//! The daemon's TOML configuration: parsing and validation.
//!
//! Pure: reads no files but the one it is given, touches no interfaces. Every
//! error names the file, the key and the reason. Checks that need the host
//! (does the interface exist?) live in the daemon, which runs them before it
//! changes anything.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use bgswitch_common::{DEFAULT_MAX_FLOWS, MAX_BACKENDS, MAX_INTERFACES, MAX_SERVICES};
use serde::Deserialize;

use crate::{model::Colour, paths};

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    pub socket: PathBuf,
    /// Group whose members may use the control socket (besides root).
    pub socket_group: Option<String>,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub max_flows: u32,
    pub udp_idle_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    /// The journal is moved to `journal.1.jsonl` (replacing the one there)
    /// once it is longer than this and the snapshot includes all of it.
    pub journal_max_size: u64,
    /// Where the Prometheus endpoint listens (`/metrics`); off when unset.
    pub metrics_listen: Option<SocketAddr>,
    pub services: Vec<ServiceConfig>,
}

impl Config {
    /// The configured services' names, in the file's order (what
    /// `DesiredState::reconcile` takes).
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(|s| s.name.as_str())
    }
}

/// Active health checks of a service's backends (`[service.health]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make a backend up.
    pub rise: u32,
    /// Consecutive failures that make a backend down.
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// `GET path`; a status in `status` (inclusive) is a success.
    Http { path: String, status: (u16, u16) },
}

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode; fall back to generic with a warning.
    Auto,
    Native,
    Generic,
}

impl fmt::Display for XdpModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => bgswitch_common::PROTO_TCP,
            Self::Udp => bgswitch_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One service: a virtual address and its two pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub blue: Vec<SocketAddr>,
    pub green: Vec<SocketAddr>,
    pub health: Option<HealthConfig>,
    /// Stable periods without the flow table (TCP only): see
    /// `bgswitch_common::control`.
    pub stateless: bool,
}

impl ServiceConfig {
    pub fn pool(&self, colour: Colour) -> &[SocketAddr] {
        match colour {
            Colour::Blue => &self.blue,
            Colour::Green => &self.green,
        }
    }
}

/// A configuration error: where and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Option<Vec<String>>,
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
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: "(file)".into(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
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

    let interfaces = raw.interfaces.unwrap_or_default();
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

    let xdp_mode = match raw.xdp_mode.as_deref().unwrap_or("auto") {
        "auto" => XdpModeSetting::Auto,
        "native" => XdpModeSetting::Native,
        "generic" => XdpModeSetting::Generic,
        other => {
            return Err(err(
                "xdp_mode",
                format!("'{other}' is not one of auto, native, generic"),
            ))
        }
    };

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
                        format!("{addr} is not of the VIP's address family"),
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
        services.push(ServiceConfig {
            name,
            vip,
            protocol,
            blue,
            green,
            health,
            stateless,
        });
    }
    for (i, s) in services.iter().enumerate() {
        if !s.vip.is_ipv4() {
            return Err(err(
                &format!("service[{i}] ({}).vip", s.name),
                "IPv6 services are not supported yet".into(),
            ));
        }
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

    Ok(Config {
        path: path.to_path_buf(),
        metrics_listen,
        interfaces,
        xdp_mode,
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

/// Parses a size in bytes: "65536", "512KiB", "64MiB", "1GiB".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("'{text}' is not a size like 65536, 512KiB, 64MiB or 1GiB");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

fn health(
    h: RawHealth,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HealthConfig, ConfigError> {
    let kind = match h.kind.as_deref().unwrap_or("tcp") {
        "tcp" => {
            if h.path.is_some() || h.status.is_some() {
                return Err(err(
                    "kind",
                    "path and status apply to kind = \"http\" only".into(),
                ));
            }
            HealthKind::Tcp
        }
        "http" => {
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
            HealthKind::Http {
                path,
                status: (lo, hi),
            }
        }
        other => return Err(err("kind", format!("'{other}' is not tcp or http"))),
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

/// Parses "250ms", "1s", "1.5s", "2m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{text}' has no unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 250ms, 30s, 5m, 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{text}': unknown unit '{unit}' (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs > 7.0 * 86400.0 {
        return Err(format!("'{text}' is longer than 7 days"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn endpoint(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("'{text}' is not ADDRESS:PORT (e.g. 198.18.1.11:8080)"))?;
    if addr.port() == 0 {
        return Err(format!("'{text}': port 0 is not a service port"));
    }
    match addr.ip() {
        IpAddr::V4(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => {
            Err(format!("'{text}': {a} cannot be a unicast endpoint"))
        }
        IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => {
            Err(format!("'{text}': {a} cannot be a unicast endpoint"))
        }
        _ => Ok(addr),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces = ["eth0", "eth1"]
xdp_mode = "native"
state_dir = "/var/lib/bgswitch"
udp_idle_timeout = "45s"

[[service]]
name = "web"
vip = "198.19.0.10:80"
protocol = "tcp"
blue = ["198.18.1.11:8080", "198.18.1.12:8080"]
green = ["198.18.1.21:8080"]
"#;

    fn check_err(text: &str, key: &str, reason_part: &str) {
        let e = parse(Path::new("/etc/bgswitch/bgswitch.toml"), text)
            .expect_err("config must be refused");
        assert_eq!(e.file, "/etc/bgswitch/bgswitch.toml");
        assert_eq!(e.key, key, "{e}");
        assert!(e.reason.contains(reason_part), "{e}");
    }

    fn with_service(s: &str) -> String {
        format!("interfaces = [\"eth0\"]\n[[service]]\n{s}")
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(Path::new("x.toml"), GOOD).unwrap();
        assert_eq!(c.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.xdp_mode, XdpModeSetting::Native);
        assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(c.udp_idle_timeout, Duration::from_secs(45));
        assert_eq!(c.tcp_idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.journal_max_size, 64 << 20);
        assert_eq!(c.socket, PathBuf::from(paths::DEFAULT_SOCKET));
        assert_eq!(c.bpffs, PathBuf::from(paths::DEFAULT_BPFFS));
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.vip, "198.19.0.10:80".parse().unwrap());
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.blue.len(), 2);
        assert_eq!(s.green, vec!["198.18.1.21:8080".parse().unwrap()]);
    }

    #[test]
    fn journal_max_size_takes_binary_units_within_bounds() {
        for (text, n) in [("65536", 65536), ("512KiB", 512 << 10), ("1GiB", 1 << 30)] {
            let c = parse(
                Path::new("x.toml"),
                &format!("interfaces = [\"eth0\"]\njournal_max_size = \"{text}\""),
            )
            .unwrap();
            assert_eq!(c.journal_max_size, n, "{text}");
        }
        let c = parse(
            Path::new("x.toml"),
            "interfaces = [\"eth0\"]\njournal_max_size = 1048576",
        )
        .unwrap();
        assert_eq!(c.journal_max_size, 1 << 20, "bytes as an integer");
        check_err(
            "interfaces = [\"eth0\"]\njournal_max_size = -5",
            "journal_max_size",
            "not a size",
        );
        for (text, why) in [
            ("1KiB", "outside"),
            ("17GiB", "outside"),
            ("64MB", "not a size"),
            ("-1", "not a size"),
            ("MiB", "not a size"),
            ("99999999999999999999GiB", "not a size"),
        ] {
            check_err(
                &format!("interfaces = [\"eth0\"]\njournal_max_size = \"{text}\""),
                "journal_max_size",
                why,
            );
        }
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        check_err("", "interfaces", "at least one");
        check_err(
            "interfaces = [\"eth0\", \"eth0\"]",
            "interfaces[1]",
            "twice",
        );
        check_err(
            "interfaces = [\"eth0\"]\nxdp_mode = \"fast\"",
            "xdp_mode",
            "not one of",
        );
        check_err(
            "interfaces = [\"eth0\"]\nmax_flows = 10",
            "max_flows",
            "outside",
        );
        check_err(
            "interfaces = [\"eth0\"]\nudp_idle_timeout = \"10\"",
            "udp_idle_timeout",
            "no unit",
        );
        check_err(
            "interfaces = [\"eth0\"]\nbogus = 1",
            "line 2 column 1",
            "unknown field",
        );
        check_err(
            &with_service(
                "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\n",
            ),
            "service[0] (a).green",
            "empty",
        );
        check_err(
            &with_service("name = \"a\"\nvip = \"1.2.3.4\"\nprotocol = \"tcp\"\n"),
            "service[0] (a).vip",
            "ADDRESS:PORT",
        );
        check_err(
            &with_service("name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"sctp\"\n"),
            "service[0] (a).protocol",
            "not tcp or udp",
        );
        check_err(
            &with_service(
                "name = \"a\"\nvip = \"1.2.3.4:53\"\nprotocol = \"udp\"\nstateless = true\nblue = [\"1.2.3.5:53\"]\ngreen = [\"1.2.3.6:53\"]\n",
            ),
            "service[0] (a).stateless",
            "needs protocol = \"tcp\"",
        );
        check_err(
            &with_service(
                "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nstateless = \"yes\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n",
            ),
            "line 6 column 13",
            "expected a boolean",
        );
        check_err(
            &with_service(
                "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.5:80\"]\n",
            ),
            "service[0] (a).green[0]",
            "already a backend of a.blue",
        );
        check_err(
            &with_service(
                "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.7:80\"]\ngreen = [\"1.2.3.8:80\"]\n",
            ),
            "service[1] (b).vip",
            "already the VIP of service 'a'",
        );
        check_err(
            &with_service("name = \"bad name\"\n"),
            "service[0].name",
            "must be",
        );
    }

    #[test]
    fn a_backend_may_not_be_another_services_vip_nor_an_invalid_interface() {
        check_err(
            &with_service(
                "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.9:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.9:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.7:80\"]\ngreen = [\"1.2.3.8:80\"]\n",
            ),
            "service[0] (a).blue[0]",
            "is the VIP of service 'b'",
        );
        for bad in ["eth0:1", "a b", "..", "a\\tb"] {
            check_err(
                &format!("interfaces = [\"{bad}\"]"),
                "interfaces[0]",
                "not a valid interface name",
            );
        }
        check_err(
            "interfaces = [\"eth0\"]\nname =",
            "line 2 column 7",
            "invalid TOML",
        );
    }

    #[test]
    fn same_vip_address_with_other_port_or_protocol_is_fine() {
        let text = with_service(
            "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.4:80\"\nprotocol = \"udp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n",
        );
        let c = parse(Path::new("x"), &text).unwrap();
        assert_eq!(c.services.len(), 2);
    }

    #[test]
    fn the_packaged_example_config_is_valid() {
        let c = parse(
            Path::new("packaging/bgswitch.toml"),
            include_str!("../../packaging/bgswitch.toml"),
        )
        .unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.xdp_mode, XdpModeSetting::Auto);
    }

    #[test]
    fn health_tables() {
        let base = "interfaces = [\"eth0\"]\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[service.health]\n";
        let c = parse(Path::new("x"), &format!("{base}kind = \"http\"\npath = \"/healthz\"\ninterval = \"250ms\"\ntimeout = \"100ms\"\nfall = 2\n")).unwrap();
        let h = c.services[0].health.clone().unwrap();
        assert_eq!(
            h.kind,
            HealthKind::Http {
                path: "/healthz".into(),
                status: (200, 399)
            }
        );
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall),
            (Duration::from_millis(250), Duration::from_millis(100), 2, 2)
        );
        let c = parse(Path::new("x"), base).unwrap();
        assert_eq!(c.services[0].health.as_ref().unwrap().kind, HealthKind::Tcp);
        check_err(
            &format!("{base}kind = \"icmp\"\n"),
            "service[0] (a).health.kind",
            "not tcp or http",
        );
        check_err(
            &format!("{base}kind = \"http\"\nstatus = \"500-200\"\n"),
            "service[0] (a).health.status",
            "range",
        );
        check_err(
            &format!("{base}interval = \"1s\"\ntimeout = \"2s\"\n"),
            "service[0] (a).health.timeout",
            "longer",
        );
        check_err(
            &format!("{base}rise = 0\n"),
            "service[0] (a).health.rise",
            "outside",
        );
        check_err(
            &format!("{base}path = \"/x\"\n"),
            "service[0] (a).health.kind",
            "apply to kind",
        );
        check_err(
            "interfaces = [\"eth0\"]\nmetrics_listen = \"localhost\"\n",
            "metrics_listen",
            "ADDRESS:PORT",
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("9999h").is_err());
    }
}
