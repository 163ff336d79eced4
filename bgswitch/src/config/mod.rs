//! The daemon's TOML configuration: parsing and validation.
//!
//! Pure: reads no files but the one it is given, touches no interfaces. Every
//! error names the file, the key and the reason. Checks that need the host
//! (does the interface exist?) live in the daemon, which runs them before it
//! changes anything.
//!
//! The types the daemon reads are here; the file's format and its
//! validation in `file.rs`; durations, sizes and endpoints in `units.rs`.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::model::Colour;

mod file;
#[cfg(test)]
mod tests;
mod units;

pub use file::{parse, socket_of};
pub use units::{parse_duration, parse_size};

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub interfaces: Vec<String>,
    /// How each interface is served: the global `attach`, or the one its
    /// line names (every configured interface has an entry).
    pub attach: BTreeMap<String, AttachSetting>,
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
    /// A fleet sharing one desired state through etcd (`[fleet]`); this
    /// host alone when unset.
    pub fleet: Option<FleetConfig>,
}

/// `[fleet]`: the etcd cluster that keeps the fleet's desired state, and
/// this host's name in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// Client URLs of the etcd members (`http://` or `https://`).
    pub etcd: Vec<String>,
    /// Keys live under `/bgswitch/<cluster>/`.
    pub cluster: String,
    /// This host's name in the fleet (default: the host name).
    pub host: String,
    /// TLS: the CA that signed the members' certificates, and this host's
    /// client certificate and key (all PEM files).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd authentication: the user, and a file holding the password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Config {
    /// The configured services' names, in the file's order (what
    /// `DesiredState::reconcile` takes).
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(|s| s.name.as_str())
    }

    /// How interface `name` is served (`auto` for one not configured).
    pub fn attach_of(&self, name: &str) -> AttachSetting {
        self.attach
            .get(name)
            .copied()
            .unwrap_or(AttachSetting::Auto)
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

/// A user's check program (`[[service.check]]`): run against a colour
/// before a flip and during a watch; it passes by exiting 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    pub name: String,
    /// argv (never through a shell); `command[0]` an absolute path, or a
    /// bare name looked up in the check's `PATH` (`checks::CHECK_PATH`).
    pub command: Vec<String>,
    pub before_flip: bool,
    pub during_watch: bool,
    pub timeout: Duration,
    /// How often it runs during a watch.
    pub interval: Duration,
    /// Who it runs as (never root).
    pub user: String,
}

impl CheckConfig {
    pub fn runs_in(&self, phase: crate::model::CheckPhase) -> bool {
        match phase {
            crate::model::CheckPhase::BeforeFlip => self.before_flip,
            crate::model::CheckPhase::DuringWatch => self.during_watch,
            crate::model::CheckPhase::OnDemand => true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// `GET path`; a status in `status` (inclusive) is a success, and,
    /// with `expect`, a body containing it. `host`: the Host header (default:
    /// the backend's address and port). `tls`: over TLS (`kind = "https"`).
    Http {
        path: String,
        status: (u16, u16),
        host: Option<String>,
        expect: Option<String>,
        tls: Option<TlsProbe>,
    },
}

/// An HTTPS health check's TLS: the name the certificate must carry (and
/// the SNI sent; default: the backend's IP address), the CA that signs it
/// (default: the host's CA bundle), or no verification at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsProbe {
    pub sni: Option<String>,
    pub ca: Option<PathBuf>,
    pub insecure: bool,
}

/// How bgswitch meets an interface (`attach`, globally or per interface).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachSetting {
    /// Native XDP on a device with a driver behind it (its frames arrive
    /// complete), TC on virtual devices and wherever native XDP is
    /// refused; never generic XDP.
    Auto,
    /// Native XDP only.
    Xdp,
    /// Generic (skb) XDP only: slower, and only right where frames arrive
    /// with complete checksums.
    XdpGeneric,
    /// TC (clsact ingress) only.
    Tc,
}

impl AttachSetting {
    /// The value as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }

    /// The setting `text` names, if any.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Auto, Self::Xdp, Self::XdpGeneric, Self::Tc]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl fmt::Display for AttachSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    /// The user's own checks (`[[service.check]]`), in the file's order.
    pub checks: Vec<CheckConfig>,
}

impl ServiceConfig {
    /// Whether the service may spend its stable periods stateless:
    /// configured so, and IPv4 (IPv6 services always use the flow table;
    /// the config refuses `stateless` for them, this holds anyway).
    pub fn may_run_stateless(&self) -> bool {
        self.stateless && self.vip.is_ipv4()
    }

    /// A digest of what every host of a fleet must agree on for this
    /// service to switch as one: its VIP, protocol and pools, in order (the
    /// order picks backends), and whether it is stateless. FNV-1a, hex.
    pub fn definition_digest(&self) -> String {
        let text = format!(
            "{}|{}|{:?}|{:?}|{}",
            self.vip, self.protocol, self.blue, self.green, self.stateless
        );
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Its checks that run in `phase`.
    pub fn checks_in(
        &self,
        phase: crate::model::CheckPhase,
    ) -> impl Iterator<Item = &CheckConfig> + '_ {
        self.checks.iter().filter(move |c| c.runs_in(phase))
    }

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

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: "(file)".into(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}
