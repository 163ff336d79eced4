//! The network-namespace test bed, dual-stack.
//!
//! ```text
//!  {p}-cli                  {p}-lb                       {p}-sw            backends
//! ┌────────────────┐      ┌────────────────────┐      ┌─────────────┐    ┌──────────────────────┐
//! │ c0             ├──────┤ lbc           lbb  ├──────┤ swl         │    │ {p}-b1: eth0         │
//! │ 198.18.0.2/24  │ veth │ 198.18.0.1/24      │ veth │     br0 ────┼────┤ 198.18.1.11/24       │
//! │ 2001:db8:18::2 │      │ 2001:db8:18::1     │      │  pb1 pb2 .. │    │ 2001:db8:18:1::11/64 │
//! │ default via    │      │    198.18.1.1/24   │      └─────────────┘    │ default via .1.1     │
//! │  198.18.0.1,   │      │ 2001:db8:18:1::1/64│                         │  and 2001:db8:18:1::1│
//! │  2001:db8:18::1│      │  (XDP goes here)   │                         └──────────────────────┘
//! └────────────────┘      └────────────────────┘
//! ```
//!
//! Every segment has an IPv4 /24 and an IPv6 /64 that mirrors it
//! (`198.18.S.H` ↔ `2001:db8:18:S::H`, the host part written the same in
//! hex digits), and every IPv4 route has its IPv6 twin. IPv6 addresses are
//! added with `nodad` and duplicate address detection is off in every
//! namespace (also for link-local addresses, which neighbour discovery
//! needs), so no test waits for it. The kernel's default offloads are kept.
//!
//! The client reaches the virtual IPs [`VIP`] and [`VIP6`] (configured
//! nowhere) through its default routes, i.e. through the load-balancer
//! namespace, where the daemon under test attaches its XDP program to
//! `lbc`/`lbb`. IPv4 forwarding in the load-balancer namespace is explicitly
//! off (`net.ipv4.ip_forward=0`, so a host default inherited by new
//! namespaces does not leak in): the daemon has to turn it on. IPv6
//! forwarding is on there (`net.ipv6.conf.all.forwarding=1`). Reverse-path
//! filtering is off there.
//!
//! [`TopologyOptions::client_mtu`] narrows the client's link (both ends of
//! `c0`/`lbc`), e.g. to IPv6's minimum of 1280 bytes;
//! [`TopologyOptions::lb_client_mtu`] and
//! [`TopologyOptions::lb_backend_mtu`] narrow only the load balancer's end
//! of a link (a narrower hop than the sender's own link).
//!
//! Every [`Topology`] has its own name prefix (`bgs{pid}x{n}`), so many can
//! exist side by side in one process and across processes; dropping it
//! stops its servers and deletes its namespaces (also when a test panics).
//! Namespaces left behind by processes that died are removed by
//! [`cleanup_stale`], which [`Topology::create`] calls first.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::netns::{find_program, in_netns, ip, ip_ns, list_netns, ns_exec, run};
use crate::servers::{HttpServer, UdpEchoServer};

/// The virtual IP the client talks to; not configured on any interface.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Address of the client (`c0` in the client namespace).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Address of the load balancer on the client side (`lbc`), the client's gateway.
pub const LB_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Address of the load balancer on the backend side (`lbb`), the backends' gateway.
pub const LB_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Prefix length of both subnets.
pub const PREFIX_LEN: u8 = 24;

/// The IPv6 virtual IP the client talks to (mirrors [`VIP`]); not
/// configured on any interface.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x10);
/// The client's IPv6 address (`c0`), mirroring [`CLIENT_ADDR`].
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x2);
/// The load balancer's IPv6 address on the client side (`lbc`), the
/// client's IPv6 gateway.
pub const LB_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x1);
/// The load balancer's IPv6 address on the backend side (`lbb`), the
/// backends' IPv6 gateway.
pub const LB_BACKEND_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 1, 0, 0, 0, 0x1);
/// Prefix length of both IPv6 subnets.
pub const PREFIX_LEN6: u8 = 64;

/// Client interface, in the client namespace.
pub const CLIENT_IF: &str = "c0";
/// Load-balancer interface facing the client (peer of [`CLIENT_IF`]).
pub const LB_CLIENT_IF: &str = "lbc";
/// Load-balancer interface facing the backends (peer of [`SWITCH_UPLINK_IF`]).
pub const LB_BACKEND_IF: &str = "lbb";
/// Switch-namespace end of the load balancer's backend link, a port of [`BRIDGE_IF`].
pub const SWITCH_UPLINK_IF: &str = "swl";
/// The bridge in the switch namespace.
pub const BRIDGE_IF: &str = "br0";
/// Interface of every backend, in its own namespace.
pub const BACKEND_IF: &str = "eth0";

/// Start of every namespace name this module creates.
pub const PREFIX_START: &str = "bgs";

/// Most backends of one colour (addresses `.11..=.19` and `.21..=.29`).
pub const MAX_PER_COLOUR: usize = 9;

/// How long `create` waits for new links to become operational.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Backend colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// The blue pool.
    Blue,
    /// The green pool.
    Green,
}

impl Colour {
    /// `"blue"` or `"green"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }

    /// The other colour.
    pub fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Colour {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "blue" => Ok(Colour::Blue),
            "green" => Ok(Colour::Green),
            _ => bail!("unknown colour {s:?} (expected blue or green)"),
        }
    }
}

/// One backend: its own namespace with [`BACKEND_IF`] on the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Short name: `b1`, `b2`, ... for blue and `g1`, `g2`, ... for green.
    pub name: String,
    /// Which pool it belongs to.
    pub colour: Colour,
    /// Its network namespace (`{prefix}-{name}`).
    pub ns: String,
    /// Its address on [`BACKEND_IF`]: `198.18.1.(10+i)` blue, `198.18.1.(20+i)` green.
    pub addr: Ipv4Addr,
    /// Its IPv6 address on [`BACKEND_IF`]: `2001:db8:18:1::(10+i)` blue,
    /// `2001:db8:18:1::(20+i)` green (the IPv4 host part's digits, in hex).
    pub addr6: Ipv6Addr,
}

impl Backend {
    /// Name of its bridge port in the switch namespace (`p{name}`).
    pub fn switch_port(&self) -> String {
        format!("p{}", self.name)
    }

    /// Its address of `family` (4 or 6).
    ///
    /// # Panics
    /// On another family (a bug in the calling test).
    pub fn addr_of(&self, family: u8) -> std::net::IpAddr {
        match family {
            4 => self.addr.into(),
            6 => self.addr6.into(),
            _ => panic!("no IP family {family}"),
        }
    }
}

/// What to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopologyOptions {
    /// Number of blue backends (0..=9, default 2).
    pub blue: usize,
    /// Number of green backends (0..=9, default 2).
    pub green: usize,
    /// Stand in for physical NICs around the load balancer, for the test of
    /// the XDP path: senders compute complete checksums (`ethtool -K c0
    /// tx off`, the same on every backend's `eth0`), as a NIC delivers them,
    /// and the peers of the lb's veths have GRO on (an XDP redirect into a
    /// veth delivers only then). Default false: every namespace keeps the
    /// kernel's default offloads, as containers, VMs and namespace test beds
    /// do.
    pub like_physical_nics: bool,
    /// The MTU of the client's link (`c0` and `lbc`), e.g. `Some(1280)`
    /// (IPv6's minimum) for transfers through a narrow link; `None` (the
    /// default) keeps the veth default of 1500.
    pub client_mtu: Option<u32>,
    /// The MTU of the load balancer's end of the client link alone (`lbc`;
    /// the client's `c0` keeps 1500 or `client_mtu`): a hop narrower than
    /// the client's own link, which the client's MSS does not reflect, so
    /// a backend's full-sized segments towards the client need path MTU
    /// discovery through the VIP. (A veth drops a frame longer than its
    /// receiving end's MTU, unless GSO: the client's own frames to the lb
    /// must stay within it, or be TCP segments the kernel aggregated.)
    pub lb_client_mtu: Option<u32>,
    /// The MTU of the load balancer's end of the backend link alone
    /// (`lbb`; the bridge and the backends keep 1500): the same, for a
    /// client's full-sized segments towards a backend.
    pub lb_backend_mtu: Option<u32>,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            blue: 2,
            green: 2,
            like_physical_nics: false,
            client_mtu: None,
            lb_client_mtu: None,
            lb_backend_mtu: None,
        }
    }
}

/// The servers of one backend.
#[derive(Debug, Default)]
struct BackendServers {
    http: Option<HttpServer>,
    udp: Option<UdpEchoServer>,
    /// The same servers on the backend's IPv6 address.
    http6: Option<HttpServer>,
    udp6: Option<UdpEchoServer>,
}

/// A complete test bed; see the [module docs](self). Deleted on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    opts: TopologyOptions,
    client_ns: String,
    lb_ns: String,
    switch_ns: String,
    backends: Vec<Backend>,
    /// Namespaces actually created so far, deleted on drop.
    created: Vec<String>,
    servers: BTreeMap<String, BackendServers>,
    /// (HTTP, UDP) ports given to `start_servers`.
    ports: Option<(u16, u16)>,
}

impl Topology {
    /// Builds a topology (see the [module docs](self)). Leftovers of dead
    /// processes are removed first; if a step fails, whatever was already
    /// created is deleted again.
    pub fn create(opts: TopologyOptions) -> Result<Topology> {
        for (what, mtu) in [
            ("client_mtu", opts.client_mtu),
            ("lb_client_mtu", opts.lb_client_mtu),
            ("lb_backend_mtu", opts.lb_backend_mtu),
        ] {
            if let Some(mtu) = mtu {
                ensure!(
                    (1280..=65535).contains(&mtu),
                    "{what} {mtu}: must be 1280..=65535 (IPv6's minimum MTU is 1280)"
                );
            }
        }
        ensure!(
            opts.blue <= MAX_PER_COLOUR && opts.green <= MAX_PER_COLOUR,
            "at most {MAX_PER_COLOUR} backends per colour (asked for {} blue, {} green)",
            opts.blue,
            opts.green
        );
        if opts.like_physical_nics && find_program("ethtool").is_none() {
            bail!("`ethtool` not found: install it (e.g. `apt-get install ethtool`); a topology standing in for physical NICs needs it");
        }
        cleanup_stale(PREFIX_START);
        let mut topology = Self::planned(opts);
        let prefix = topology.prefix.clone();
        // On error `topology` is dropped here, deleting what was created.
        topology
            .build()
            .with_context(|| format!("creating test topology {prefix}"))?;
        Ok(topology)
    }

    /// Picks a fresh prefix and works out names and addresses; creates
    /// nothing yet.
    fn planned(opts: TopologyOptions) -> Topology {
        let prefix = format!(
            "{PREFIX_START}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |suffix: &str| format!("{prefix}-{suffix}");
        let backend = |colour: Colour, i: usize| {
            let (letter, base) = match colour {
                Colour::Blue => ('b', 10),
                Colour::Green => ('g', 20),
            };
            let name = format!("{letter}{i}");
            let host = (base + i) as u16;
            Backend {
                ns: ns(&name),
                addr: Ipv4Addr::new(198, 18, 1, host as u8),
                // 198.18.1.11 ↔ 2001:db8:18:1::11: the same digits, in hex.
                addr6: Ipv6Addr::new(0x2001, 0xdb8, 0x18, 1, 0, 0, 0, host / 10 * 16 + host % 10),
                name,
                colour,
            }
        };
        let backends = (1..=opts.blue)
            .map(|i| backend(Colour::Blue, i))
            .chain((1..=opts.green).map(|i| backend(Colour::Green, i)))
            .collect();
        Topology {
            client_ns: ns("cli"),
            lb_ns: ns("lb"),
            switch_ns: ns("sw"),
            prefix: prefix.clone(),
            opts,
            backends,
            created: Vec::new(),
            servers: BTreeMap::new(),
            ports: None,
        }
    }

    /// Creates namespaces, links, addresses and routes.
    fn build(&mut self) -> Result<()> {
        let all: Vec<String> = [&self.client_ns, &self.lb_ns, &self.switch_ns]
            .into_iter()
            .cloned()
            .chain(self.backends.iter().map(|b| b.ns.clone()))
            .collect();
        for ns in &all {
            ip(&["netns", "add", ns])?;
            self.created.push(ns.clone());
            ip_ns(ns, &["link", "set", "lo", "up"])?;
            // No duplicate address detection, before any link exists (a
            // link takes the namespace's defaults, also a veth end moved
            // in): the link-local addresses neighbour discovery sends from
            // are usable at once, as are the global ones (added `nodad`).
            let sysctls = [
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
            ];
            set_sysctls(ns, &sysctls)?;
        }
        let (cli, lb, sw) = (&self.client_ns, &self.lb_ns, &self.switch_ns);
        let cidr = |addr: Ipv4Addr| format!("{addr}/{PREFIX_LEN}");
        let add6 = |ns: &str, addr: Ipv6Addr, dev: &str| {
            ip_ns(
                ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr}/{PREFIX_LEN6}"),
                    "dev",
                    dev,
                    "nodad",
                ],
            )
        };

        // client <-> load balancer
        ip_ns(
            cli,
            &[
                "link",
                "add",
                "name",
                CLIENT_IF,
                "type",
                "veth",
                "peer",
                "name",
                LB_CLIENT_IF,
                "netns",
                lb,
            ],
        )?;
        ip_ns(cli, &["addr", "add", &cidr(CLIENT_ADDR), "dev", CLIENT_IF])?;
        ip_ns(
            lb,
            &["addr", "add", &cidr(LB_CLIENT_ADDR), "dev", LB_CLIENT_IF],
        )?;
        add6(cli, CLIENT_ADDR6, CLIENT_IF)?;
        add6(lb, LB_CLIENT_ADDR6, LB_CLIENT_IF)?;
        if let Some(mtu) = self.opts.client_mtu {
            let mtu = mtu.to_string();
            ip_ns(cli, &["link", "set", CLIENT_IF, "mtu", &mtu])?;
            ip_ns(lb, &["link", "set", LB_CLIENT_IF, "mtu", &mtu])?;
        }
        if let Some(mtu) = self.opts.lb_client_mtu {
            ip_ns(lb, &["link", "set", LB_CLIENT_IF, "mtu", &mtu.to_string()])?;
        }

        // load balancer <-> switch
        ip_ns(
            lb,
            &[
                "link",
                "add",
                "name",
                LB_BACKEND_IF,
                "type",
                "veth",
                "peer",
                "name",
                SWITCH_UPLINK_IF,
                "netns",
                sw,
            ],
        )?;
        ip_ns(
            lb,
            &["addr", "add", &cidr(LB_BACKEND_ADDR), "dev", LB_BACKEND_IF],
        )?;
        add6(lb, LB_BACKEND_ADDR6, LB_BACKEND_IF)?;
        if let Some(mtu) = self.opts.lb_backend_mtu {
            ip_ns(lb, &["link", "set", LB_BACKEND_IF, "mtu", &mtu.to_string()])?;
        }
        ip_ns(
            sw,
            &[
                "link",
                "add",
                "name",
                BRIDGE_IF,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        ip_ns(sw, &["link", "set", SWITCH_UPLINK_IF, "master", BRIDGE_IF])?;

        // backends
        for backend in &self.backends {
            let port = backend.switch_port();
            let bns = backend.ns.as_str();
            ip_ns(
                bns,
                &[
                    "link", "add", "name", BACKEND_IF, "type", "veth", "peer", "name", &port,
                    "netns", sw,
                ],
            )?;
            ip_ns(sw, &["link", "set", &port, "master", BRIDGE_IF])?;
            ip_ns(
                bns,
                &["addr", "add", &cidr(backend.addr), "dev", BACKEND_IF],
            )?;
            add6(bns, backend.addr6, BACKEND_IF)?;
            ip_ns(sw, &["link", "set", &port, "up"])?;
            ip_ns(bns, &["link", "set", BACKEND_IF, "up"])?;
            ip_ns(
                bns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &LB_BACKEND_ADDR.to_string(),
                ],
            )?;
            ip_ns(
                bns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &LB_BACKEND_ADDR6.to_string(),
                ],
            )?;
        }

        for (ns, link) in [
            (sw, BRIDGE_IF),
            (sw, SWITCH_UPLINK_IF),
            (lb, LB_BACKEND_IF),
            (lb, LB_CLIENT_IF),
            (cli, CLIENT_IF),
        ] {
            ip_ns(ns, &["link", "set", link, "up"])?;
        }
        ip_ns(
            cli,
            &[
                "route",
                "add",
                "default",
                "via",
                &LB_CLIENT_ADDR.to_string(),
            ],
        )?;
        ip_ns(
            cli,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &LB_CLIENT_ADDR6.to_string(),
            ],
        )?;

        // Load-balancer sysctls: no reverse-path filtering (the effective
        // value is the max of `all` and the interface's), IPv4 forwarding
        // explicitly off so the daemon under test has to enable it, IPv6
        // forwarding on (`all` sets every interface's too).
        let lb_sysctls = [
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/conf/lbc/rp_filter", "0"),
            ("net/ipv4/conf/lbb/rp_filter", "0"),
            ("net/ipv4/ip_forward", "0"),
            ("net/ipv6/conf/all/forwarding", "1"),
        ];
        set_sysctls(lb, &lb_sysctls)?;

        self.wait_links_up()?;

        if self.opts.like_physical_nics {
            // XDP_REDIRECT into a veth only delivers if the receiving end
            // has GRO (i.e. NAPI) enabled; a NIC's frames arrive with
            // complete checksums.
            ethtool(cli, CLIENT_IF, &["gro", "on"])?;
            ethtool(sw, SWITCH_UPLINK_IF, &["gro", "on"])?;
            ethtool(cli, CLIENT_IF, &["tx", "off"])?;
            for backend in &self.backends {
                ethtool(&backend.ns, BACKEND_IF, &["tx", "off"])?;
            }
        }
        Ok(())
    }

    /// Waits until every link created has operational state UP. Until the
    /// kernel's link watcher has processed a new carrier (which may take up
    /// to a second), a device still has the no-op qdisc and drops what it
    /// sends, which would make the first packets of a test vanish.
    fn wait_links_up(&self) -> Result<()> {
        let mut wanted: Vec<(&str, String)> = vec![
            (&self.client_ns, CLIENT_IF.to_owned()),
            (&self.lb_ns, LB_CLIENT_IF.to_owned()),
            (&self.lb_ns, LB_BACKEND_IF.to_owned()),
            (&self.switch_ns, SWITCH_UPLINK_IF.to_owned()),
            (&self.switch_ns, BRIDGE_IF.to_owned()),
        ];
        for backend in &self.backends {
            wanted.push((&backend.ns, BACKEND_IF.to_owned()));
            wanted.push((&self.switch_ns, backend.switch_port()));
        }
        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        loop {
            let mut down = Vec::new();
            let mut states: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
            for (ns, link) in &wanted {
                if !states.contains_key(ns) {
                    states.insert(ns, link_states(ns)?);
                }
                if states[ns].get(link).map(String::as_str) != Some("UP") {
                    down.push(format!("{link} in {ns}"));
                }
            }
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "links not up after {LINK_UP_TIMEOUT:?}: {}",
                    down.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unique name prefix of this topology (e.g. `bgs4242x0`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The options it was built with.
    pub fn options(&self) -> TopologyOptions {
        self.opts
    }

    /// The client namespace (`{prefix}-cli`).
    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }

    /// The load-balancer namespace (`{prefix}-lb`), where the daemon runs.
    pub fn lb_ns(&self) -> &str {
        &self.lb_ns
    }

    /// The switch namespace (`{prefix}-sw`) holding the bridge.
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// The load-balancer interfaces: `["lbc", "lbb"]` (client side, backend side).
    pub fn lb_interfaces(&self) -> [&'static str; 2] {
        [LB_CLIENT_IF, LB_BACKEND_IF]
    }

    /// All backends, blue first.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backends of one colour.
    pub fn backends_of(&self, colour: Colour) -> impl Iterator<Item = &Backend> + '_ {
        self.backends.iter().filter(move |b| b.colour == colour)
    }

    /// The backend called `name`, if any.
    pub fn try_backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The backend called `name`.
    ///
    /// # Panics
    /// If there is no such backend (a bug in the calling test).
    pub fn backend(&self, name: &str) -> &Backend {
        self.try_backend(name).unwrap_or_else(|| {
            panic!(
                "no backend {name:?} in topology {} (have {:?})",
                self.prefix,
                self.backends.iter().map(|b| &b.name).collect::<Vec<_>>()
            )
        })
    }

    /// All namespaces of this topology that exist (were created).
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// Starts an [`HttpServer`] on `http_port` and a [`UdpEchoServer`] on
    /// `udp_port` on every backend, bound to the backend's address, and the
    /// same two on its IPv6 address (each family's servers have their own
    /// counters). Servers already running are replaced. They are stopped
    /// when the topology is dropped.
    pub fn start_servers(&mut self, http_port: u16, udp_port: u16) -> Result<()> {
        self.servers.clear();
        self.ports = Some((http_port, udp_port));
        for backend in &self.backends {
            let colour = backend.colour.as_str();
            let http = |ip: std::net::IpAddr| {
                HttpServer::start(
                    &backend.ns,
                    SocketAddr::new(ip, http_port),
                    colour,
                    &backend.name,
                )
            };
            let udp = |ip: std::net::IpAddr| {
                UdpEchoServer::start(
                    &backend.ns,
                    SocketAddr::new(ip, udp_port),
                    colour,
                    &backend.name,
                )
            };
            let servers = BackendServers {
                http: Some(http(backend.addr.into())?),
                udp: Some(udp(backend.addr.into())?),
                http6: Some(http(backend.addr6.into())?),
                udp6: Some(udp(backend.addr6.into())?),
            };
            self.servers.insert(backend.name.clone(), servers);
        }
        Ok(())
    }

    /// Stops the HTTP servers of backend `name`, both families' (its UDP
    /// servers keep going): new connections are refused and open ones are
    /// shut down.
    pub fn stop_server(&mut self, name: &str) -> Result<()> {
        self.backend_checked(name)?;
        let servers = self
            .servers
            .get_mut(name)
            .with_context(|| format!("no servers started on backend {name}"))?;
        for mut http in [servers.http.take(), servers.http6.take()]
            .into_iter()
            .flatten()
        {
            http.stop();
        }
        Ok(())
    }

    /// Stops only the IPv6 HTTP server of backend `name` (its IPv4 one and
    /// its UDP servers keep going).
    pub fn stop_server6(&mut self, name: &str) -> Result<()> {
        self.backend_checked(name)?;
        let servers = self
            .servers
            .get_mut(name)
            .with_context(|| format!("no servers started on backend {name}"))?;
        if let Some(mut http) = servers.http6.take() {
            http.stop();
        }
        Ok(())
    }

    /// (Re)starts the HTTP servers of backend `name` (both families) on the
    /// port given to [`start_servers`](Self::start_servers). Does nothing
    /// for one that runs.
    pub fn start_server(&mut self, name: &str) -> Result<()> {
        let backend = self.backend_checked(name)?.clone();
        let (http_port, _) = self
            .ports
            .with_context(|| format!("start_server({name}): start_servers was never called"))?;
        let servers = self.servers.entry(backend.name.clone()).or_default();
        let start = |ip: std::net::IpAddr| {
            HttpServer::start(
                &backend.ns,
                SocketAddr::new(ip, http_port),
                backend.colour.as_str(),
                &backend.name,
            )
        };
        if servers.http.is_none() {
            servers.http = Some(start(backend.addr.into())?);
        }
        if servers.http6.is_none() {
            servers.http6 = Some(start(backend.addr6.into())?);
        }
        Ok(())
    }

    /// The running HTTP server of backend `name` (IPv4), if any.
    pub fn http_server(&self, name: &str) -> Option<&HttpServer> {
        self.servers.get(name)?.http.as_ref()
    }

    /// The running UDP server of backend `name` (IPv4), if any.
    pub fn udp_server(&self, name: &str) -> Option<&UdpEchoServer> {
        self.servers.get(name)?.udp.as_ref()
    }

    /// The running HTTP server of backend `name` on its IPv6 address, if any.
    pub fn http_server6(&self, name: &str) -> Option<&HttpServer> {
        self.servers.get(name)?.http6.as_ref()
    }

    /// The running UDP server of backend `name` on its IPv6 address, if any.
    pub fn udp_server6(&self, name: &str) -> Option<&UdpEchoServer> {
        self.servers.get(name)?.udp6.as_ref()
    }

    /// The (HTTP, UDP) ports of [`start_servers`](Self::start_servers), if called.
    pub fn server_ports(&self) -> Option<(u16, u16)> {
        self.ports
    }

    fn backend_checked(&self, name: &str) -> Result<&Backend> {
        self.try_backend(name)
            .ok_or_else(|| anyhow!("no backend {name:?} in topology {}", self.prefix))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Servers first, so no thread keeps a namespace's sockets alive.
        self.servers.clear();
        for ns in self.created.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// Writes `sysctls` (paths under `/proc/sys`, values) in namespace `ns`.
fn set_sysctls(ns: &str, sysctls: &[(&str, &str)]) -> Result<()> {
    in_netns(ns, || {
        sysctls.iter().try_for_each(|(key, value)| {
            std::fs::write(format!("/proc/sys/{key}"), value)
                .with_context(|| format!("setting {key}={value} in netns {ns:?}"))
        })
    })?
}

/// Operational state of every link in namespace `ns` (`ip -br link`).
fn link_states(ns: &str) -> Result<BTreeMap<String, String>> {
    let output = run("ip", &["-n", ns, "-br", "link", "show"])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.split('@').next()?.to_owned();
            Some((name, fields.next()?.to_owned()))
        })
        .collect())
}

/// Runs `ethtool -K ifname settings...` inside namespace `ns`.
fn ethtool(ns: &str, ifname: &str, settings: &[&str]) -> Result<()> {
    let program = find_program("ethtool")
        .context("`ethtool` not found: install it (e.g. `apt-get install ethtool`)")?;
    let program = program.to_string_lossy();
    let mut args = vec!["-K", ifname];
    args.extend_from_slice(settings);
    ns_exec(ns, &program, &args)
        .map(drop)
        .with_context(|| format!("ethtool on {ifname} in netns {ns:?}"))
}

/// Extracts the creating pid from a namespace name `bgs{pid}x{n}-...`.
pub(crate) fn prefix_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX_START)?;
    let (pid, rest) = rest.split_once('x')?;
    let counter = rest.split('-').next()?;
    if pid.is_empty() || counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&pid| pid > 0)
}

/// Whether a process with this pid exists.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Deletes namespaces whose names start with `prefix_start` (normally
/// [`PREFIX_START`]), follow the `bgs{pid}x{n}-...` pattern and whose
/// creating process is gone (left behind by a killed test run). Errors are
/// ignored; returns the names deleted.
pub fn cleanup_stale(prefix_start: &str) -> Vec<String> {
    let Ok(names) = list_netns() else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter(|name| name.starts_with(prefix_start))
        .filter(|name| prefix_pid(name).is_some_and(|pid| !pid_alive(pid)))
        .filter(|name| ip(&["netns", "del", name]).is_ok())
        .collect()
}

/// A bare network namespace with only `lo` (up), deleted on drop. Named like
/// a topology's namespaces so [`cleanup_stale`] also removes leftovers.
pub struct TempNetns {
    name: String,
}

impl TempNetns {
    /// Creates `bgs{pid}x{n}-tmp`.
    pub fn create() -> Result<Self> {
        cleanup_stale(PREFIX_START);
        let name = format!(
            "{PREFIX_START}{}x{}-tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TempNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefix_pid() {
        assert_eq!(prefix_pid("bgs1234x0-cli"), Some(1234));
        assert_eq!(prefix_pid("bgs99x12-b1"), Some(99));
        assert_eq!(prefix_pid("bgs99x12"), Some(99));
        assert_eq!(prefix_pid("bgsx1-cli"), None);
        assert_eq!(prefix_pid("bgsnt77"), None);
        assert_eq!(prefix_pid("bgs12xy-cli"), None);
        assert_eq!(prefix_pid("other1x1-cli"), None);
    }

    #[test]
    fn colour_round_trips() {
        for colour in [Colour::Blue, Colour::Green] {
            assert_eq!(colour.to_string().parse::<Colour>().unwrap(), colour);
            assert_ne!(colour.other(), colour);
        }
        assert!("red".parse::<Colour>().is_err());
    }

    fn leftovers(prefix: &str) -> Vec<String> {
        list_netns()
            .unwrap()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{prefix}-")))
            .collect()
    }

    #[test]
    fn failed_build_cleans_up() {
        crate::require_privileged("failed_build_cleans_up");
        let mut topology = Topology::planned(TopologyOptions::default());
        // Bridge port "pthisnameistoolong" exceeds 15 characters: the build
        // fails after several namespaces and links already exist.
        topology.backends[3].name = "thisnameistoolong".to_owned();
        let prefix = topology.prefix.clone();
        let err = topology.build().expect_err("bad interface name must fail");
        assert!(topology.created.len() >= 4, "{:?}", topology.created);
        drop(topology);
        let message = format!("{err:#}");
        assert!(message.contains("pthisnameistoolong"), "{message}");
        assert_eq!(leftovers(&prefix), Vec::<String>::new());
    }

    #[test]
    fn panicking_test_cleans_up() {
        crate::require_privileged("panicking_test_cleans_up");
        let result = std::panic::catch_unwind(|| {
            let mut topology = Topology::create(TopologyOptions {
                blue: 1,
                green: 1,
                ..TopologyOptions::default()
            })
            .unwrap();
            topology.start_servers(80, 53).unwrap();
            let prefix = topology.prefix().to_owned();
            std::panic::panic_any(prefix);
        });
        let prefix = *result.unwrap_err().downcast::<String>().unwrap();
        assert_eq!(leftovers(&prefix), Vec::<String>::new());
    }

    #[test]
    fn rejects_bad_options() {
        let err = Topology::create(TopologyOptions {
            blue: 10,
            green: 0,
            ..TopologyOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("at most 9"), "{err}");
        let err = Topology::create(TopologyOptions {
            client_mtu: Some(1279),
            ..TopologyOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("1280"), "{err}");
    }
}
