//! Property tests of the config parser, `bgswitch::config::parse`.
//!
//! Two generators, both driven by a seeded xorshift:
//!
//! * **structured**: configs built from the documented keys with valid
//!   values, then (most of the time) exactly one fault — a bad value, a
//!   wrong type, a duplicate, a pool too large, an unknown key… A config
//!   without a fault must be accepted and mean exactly what was written; a
//!   config with one must be refused with an error that names the file, the
//!   offending key and a reason.
//! * **mutated**: the packaged example, the configs of the parser's own
//!   tests and generated ones, mutated as text (lines dropped, duplicated,
//!   swapped and cut; values replaced; tables renamed; quotes, brackets,
//!   multi-byte and control characters inserted).
//!
//! For every input: no panic; a refusal is an `Err(ConfigError)` whose
//! `file`, `key` and `reason` are non-empty and whose `key` reads as a key;
//! an accepted config satisfies the documented invariants (1..=64
//! interfaces, unique and well-formed; 1..=64 backends per pool; at most 256
//! services with valid, unique names; unique VIPs; a backend belongs to one
//! pool of one service, is of its VIP's family and is not the VIP; an IPv6
//! service is not stateless; absolute
//! paths; limits of max_flows and timeouts). `BGSWITCH_FUZZ_CONFIGS` sets
//! the number of inputs per generator (default 10 000).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    time::{Duration, Instant},
};

use bgswitch::config::{parse, AttachSetting, Config, ConfigError, Protocol};
use bgswitch_tests::rng::Rng;

const FILE: &str = "/etc/bgswitch/bgswitch.toml";
const DEFAULT_CONFIGS: usize = 10_000;
const MAX_REPORTED: usize = 10;

const PACKAGED: &str = include_str!("../../packaging/bgswitch.toml");
/// The configs of `bgswitch/src/config.rs`'s own tests.
const PARSER_TESTS: [&str; 3] = [
    r#"
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
"#,
    "interfaces = [\"eth0\"]\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.4:80\"\nprotocol = \"udp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n",
    "interfaces = [\"eth0\"]\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"250ms\"\ntimeout = \"100ms\"\nfall = 2\n",
];

// ---------------------------------------------------------------------------
// Randomness.

// ---------------------------------------------------------------------------
// Structured configs.

/// A TOML value as written.
#[derive(Clone, Debug)]
enum V {
    S(String),
    I(i64),
    A(Vec<V>),
    /// Written verbatim (wrong types, odd syntax).
    Raw(String),
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn emit(v: &V) -> String {
    match v {
        V::S(s) => quote(s),
        V::I(i) => i.to_string(),
        V::A(items) => format!(
            "[{}]",
            items.iter().map(emit).collect::<Vec<_>>().join(", ")
        ),
        V::Raw(r) => r.clone(),
    }
}

fn strs(items: &[String]) -> V {
    V::A(items.iter().map(|s| V::S(s.clone())).collect())
}

#[derive(Clone, Debug)]
struct GService {
    /// Written keys in order (a key may be missing or unknown).
    keys: Vec<(String, V)>,
    health: Option<Vec<(String, V)>>,
    /// What a valid service means.
    name: String,
    vip: SocketAddr,
    protocol: Protocol,
    blue: Vec<SocketAddr>,
    green: Vec<SocketAddr>,
}

#[derive(Clone, Debug)]
struct GConfig {
    top: Vec<(String, V)>,
    services: Vec<GService>,
    interfaces: Vec<String>,
    /// What `attach_of` must say per interface (the global setting, the
    /// older `xdp_mode`'s, or an interface's own).
    attach: Vec<(String, AttachSetting)>,
    max_flows: Option<u32>,
    udp_idle: Option<Duration>,
    tcp_idle: Option<Duration>,
    journal_max: Option<u64>,
}

impl GConfig {
    fn text(&self) -> String {
        let mut t = String::new();
        for (k, v) in &self.top {
            t.push_str(&format!("{k} = {}\n", emit(v)));
        }
        for s in &self.services {
            t.push_str("\n[[service]]\n");
            for (k, v) in &s.keys {
                t.push_str(&format!("{k} = {}\n", emit(v)));
            }
            if let Some(h) = &s.health {
                t.push_str("[service.health]\n");
                for (k, v) in h {
                    t.push_str(&format!("{k} = {}\n", emit(v)));
                }
            }
        }
        t
    }

    fn set_top(&mut self, key: &str, v: V) {
        match self.top.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.top.push((key.into(), v)),
        }
    }
}

impl GService {
    fn set(&mut self, key: &str, v: V) {
        match self.keys.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.keys.push((key.into(), v)),
        }
    }
    fn remove(&mut self, key: &str) {
        self.keys.retain(|(k, _)| k != key);
    }
}

const DURATIONS: [(&str, u64); 8] = [
    ("1s", 1000),
    ("30s", 30_000),
    ("1.5s", 1500),
    ("2m", 120_000),
    ("1h", 3_600_000),
    ("168h", 604_800_000),
    ("1000ms", 1000),
    (" 45s ", 45_000),
];

fn valid_config(rng: &mut Rng, services: usize) -> GConfig {
    let if_pool = [
        "eth0",
        "eth1",
        "ens3",
        "lbc",
        "lbb",
        "bond0.100",
        "veth-x_1",
        "abcdefghijklmno",
    ];
    let mut interfaces: Vec<String> = Vec::new();
    for _ in 0..1 + rng.index(4) {
        let n = rng.pick(&if_pool).to_string();
        if !interfaces.contains(&n) {
            interfaces.push(n);
        }
    }
    let mut g = GConfig {
        top: vec![("interfaces".into(), strs(&interfaces))],
        services: Vec::new(),
        attach: Vec::new(),
        interfaces,
        max_flows: None,
        udp_idle: None,
        tcp_idle: None,
        journal_max: None,
    };
    // The attachment: the default, `attach`, or its older name `xdp_mode`;
    // some interfaces with one of their own, inline.
    let mut global = AttachSetting::Auto;
    if rng.percent(30) {
        let (m, set) = *rng.pick(&[
            ("auto", AttachSetting::Auto),
            ("native", AttachSetting::Xdp),
            ("generic", AttachSetting::XdpGeneric),
        ]);
        g.top.push(("xdp_mode".into(), V::S(m.into())));
        global = set;
    } else if rng.percent(40) {
        global = *rng.pick(&ATTACH);
        g.top.push(("attach".into(), V::S(global.as_str().into())));
    }
    let mut entries = Vec::new();
    for i in &g.interfaces {
        if rng.percent(25) {
            let own = *rng.pick(&ATTACH);
            entries.push(V::Raw(format!(
                "{{ name = {}, attach = {} }}",
                quote(i),
                quote(own.as_str())
            )));
            g.attach.push((i.clone(), own));
        } else {
            entries.push(V::S(i.clone()));
            g.attach.push((i.clone(), global));
        }
    }
    g.set_top("interfaces", V::A(entries));
    for key in ["socket", "state_dir", "bpffs"] {
        if rng.percent(30) {
            g.top.push((key.into(), V::S(format!("/run/x/{key}/ü ñ"))));
        }
    }
    if rng.percent(20) {
        g.top.push(("socket_group".into(), V::S("bgswitch".into())));
    }
    if rng.percent(40) {
        let n = *rng.pick(&[1024u32, 262_144, 67_108_864, 100_000]);
        g.top.push(("max_flows".into(), V::I(n.into())));
        g.max_flows = Some(n);
    }
    for (key, slot) in [("udp_idle_timeout", 0), ("tcp_idle_timeout", 1)] {
        if rng.percent(40) {
            let (text, ms) = *rng.pick(&DURATIONS);
            g.top.push((key.into(), V::S(text.into())));
            let d = Some(Duration::from_millis(ms));
            if slot == 0 {
                g.udp_idle = d;
            } else {
                g.tcp_idle = d;
            }
        }
    }
    if rng.percent(30) {
        let (text, n) = *rng.pick(&[
            ("16KiB", 16u64 << 10),
            ("65536", 65536),
            ("64MiB", 64 << 20),
            ("16GiB", 16 << 30),
            ("1 GiB", 1 << 30),
        ]);
        let v = if rng.percent(30) {
            V::I(n as i64)
        } else {
            V::S(text.into())
        };
        g.top.push(("journal_max_size".into(), v));
        g.journal_max = Some(n);
    }
    if rng.percent(15) {
        let m = *rng.pick(&["127.0.0.1:9477", "[::1]:9477", "0.0.0.0:1"]);
        g.top.push(("metrics_listen".into(), V::S(m.into())));
    }
    let names = [
        "web", "dns", "api", "a", "b-2", "x_y.z", "Z9", "svc.1", "-", ".",
    ];
    let long_name = "n".repeat(64);
    let mut used_vips = BTreeSet::new();
    let mut next_backend = 0u32;
    for i in 0..services {
        let name = if i < names.len() && rng.percent(90) {
            names[i].to_string()
        } else if i == 0 && rng.percent(50) {
            long_name.clone()
        } else {
            format!("svc-{i}")
        };
        let protocol = if rng.percent(50) {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let vip = loop {
            let v: SocketAddr = format!(
                "198.19.{}.{}:{}",
                rng.index(2),
                1 + rng.index(254),
                rng.pick(&[80, 443, 53, 65535])
            )
            .parse()
            .unwrap();
            if used_vips.insert((v, protocol)) {
                break v;
            }
        };
        let mut pool = |rng: &mut Rng| -> Vec<SocketAddr> {
            let n = match rng.index(100) {
                0..=89 => 1 + rng.index(4),
                90..=97 => 5 + rng.index(60),
                _ => 64,
            };
            (0..n)
                .map(|_| {
                    next_backend += 1;
                    let b = next_backend;
                    format!(
                        "10.{}.{}.{}:{}",
                        b >> 16,
                        (b >> 8) & 0xff,
                        b & 0xff,
                        1 + rng.index(65535)
                    )
                    .parse()
                    .unwrap()
                })
                .collect()
        };
        let blue = pool(rng);
        let green = pool(rng);
        let sv = |p: &[SocketAddr]| strs(&p.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        let mut keys = vec![
            ("name".to_string(), V::S(name.clone())),
            ("vip".into(), V::S(vip.to_string())),
            ("protocol".into(), V::S(protocol.to_string())),
            ("blue".into(), sv(&blue)),
            ("green".into(), sv(&green)),
        ];
        // Keys in any order.
        for k in (1..keys.len()).rev() {
            let j = rng.index(k + 1);
            keys.swap(k, j);
        }
        let health = rng.percent(20).then(|| {
            let mut h = Vec::new();
            if rng.percent(50) {
                h.push(("kind".to_string(), V::S("http".into())));
                if rng.percent(50) {
                    h.push(("path".into(), V::S("/healthz?x=1".into())));
                }
                if rng.percent(50) {
                    h.push((
                        "status".into(),
                        V::S(rng.pick(&["200", "200-399", "100-599"]).to_string()),
                    ));
                }
            }
            if rng.percent(50) {
                h.push(("interval".into(), V::S("2s".into())));
                h.push(("timeout".into(), V::S("2s".into())));
            }
            if rng.percent(50) {
                h.push(("rise".into(), V::I(1 + rng.index(100) as i64)));
                h.push(("fall".into(), V::I(1 + rng.index(100) as i64)));
            }
            h
        });
        g.services.push(GService {
            keys,
            health,
            name,
            vip,
            protocol,
            blue,
            green,
        });
    }
    g
}

/// Adds one fault; returns the key the error must name (a fragment of it).
fn add_fault(rng: &mut Rng, g: &mut GConfig) -> String {
    let n = g.services.len();
    let svc_at = |i: usize, g: &GConfig| format!("service[{i}] ({})", g.services[i].name);
    let with_services = n > 0;
    loop {
        match rng.index(42) {
            0 => {
                g.top.retain(|(k, _)| k != "interfaces");
                return "interfaces".into();
            }
            1 => {
                g.set_top("interfaces", V::A(vec![]));
                return "interfaces".into();
            }
            2 => {
                let mut ifs = g.interfaces.clone();
                let at = ifs.len();
                ifs.push(ifs[rng.index(at)].clone());
                g.set_top("interfaces", strs(&ifs));
                return format!("interfaces[{at}]");
            }
            3 => {
                let mut ifs = g.interfaces.clone();
                let at = rng.index(ifs.len() + 1);
                let bad = rng.pick(&["", "a/b", "has space", "sixteen_chars_xx", "nul\0"]);
                ifs.insert(at, bad.to_string());
                g.set_top("interfaces", strs(&ifs));
                return format!("interfaces[{at}]");
            }
            4 => {
                let ifs: Vec<String> = (0..65).map(|i| format!("if{i}")).collect();
                g.set_top("interfaces", strs(&ifs));
                return "interfaces".into();
            }
            5 => match rng.index(4) {
                0 => {
                    let m = rng.pick(&["fast", "Native", "", "xdp"]);
                    g.set_top("xdp_mode", V::S(m.to_string()));
                    return "xdp_mode".into();
                }
                1 => {
                    let m = rng.pick(&["fast", "TC", "", "native", "generic"]);
                    g.top.retain(|(k, _)| k != "xdp_mode");
                    g.set_top("attach", V::S(m.to_string()));
                    return "attach".into();
                }
                2 => {
                    // Both names at once: which one is meant?
                    g.set_top("attach", V::S("tc".into()));
                    g.set_top("xdp_mode", V::S("native".into()));
                    return "xdp_mode".into();
                }
                _ => {
                    let at = rng.index(g.interfaces.len());
                    let m = rng.pick(&["fast", "XDP", "", "native"]);
                    let entries = g
                        .interfaces
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            if i == at {
                                V::Raw(format!("{{ name = {}, attach = {} }}", quote(n), quote(m)))
                            } else {
                                V::S(n.clone())
                            }
                        })
                        .collect();
                    g.set_top("interfaces", V::A(entries));
                    return format!("interfaces[{at}].attach");
                }
            },
            6 => {
                let v = *rng.pick(&[0i64, 1023, 67_108_865, -1, i64::MAX]);
                g.set_top("max_flows", V::I(v));
                return "max_flows".into();
            }
            7 | 8 => {
                let key = if rng.percent(50) {
                    "udp_idle_timeout"
                } else {
                    "tcp_idle_timeout"
                };
                let v = rng.pick(&[
                    "10",
                    "s",
                    "999ms",
                    "0s",
                    "1d",
                    "169h",
                    "1e3s",
                    "-1s",
                    "1..5s",
                    "",
                    "5 m",
                    "99999999999999999999999999999h",
                ]);
                g.set_top(key, V::S(v.to_string()));
                return key.into();
            }
            9 => {
                let key = *rng.pick(&["socket", "state_dir", "bpffs"]);
                g.set_top(
                    key,
                    V::S(rng.pick(&["relative/x", "", "./x", "x"]).to_string()),
                );
                return key.into();
            }
            10 => {
                let v = rng.pick(&["", "a:b", "a/b", "a b"]);
                g.set_top("socket_group", V::S(v.to_string()));
                return "socket_group".into();
            }
            11 => {
                let v = rng.pick(&["localhost", "127.0.0.1", ":9477", "1.2.3.4:99999"]);
                g.set_top("metrics_listen", V::S(v.to_string()));
                return "metrics_listen".into();
            }
            12 => {
                g.top.push((
                    rng.pick(&["bogus", "interface", "services", "xdp-mode"])
                        .to_string(),
                    V::I(1),
                ));
                return "line ".into();
            }
            13 => {
                let key = *rng.pick(&["max_flows", "xdp_mode", "interfaces", "socket"]);
                let v = match key {
                    "max_flows" => V::S("1024".into()),
                    "interfaces" if rng.percent(50) => V::Raw("{ eth0 = true }".into()),
                    "interfaces" => V::S("eth0".into()),
                    _ => V::I(7),
                };
                g.set_top(key, v);
                return "line ".into();
            }
            14 if n < 256 && with_services && rng.percent(20) => {
                // 257 services.
                let mut big = valid_config(rng, 257);
                big.top = g.top.clone();
                *g = big;
                return "service".into();
            }
            15 if with_services => {
                let i = rng.index(n);
                g.services[i].remove("name");
                return format!("service[{i}].name");
            }
            16 if with_services => {
                let i = rng.index(n);
                let bad = rng
                    .pick(&["", "bad name", "ü", "a/b", "x\ty", &"n".repeat(65)])
                    .to_string();
                g.services[i].set("name", V::S(bad));
                return format!("service[{i}].name");
            }
            17 if n >= 2 => {
                let i = 1 + rng.index(n - 1);
                let prev = g.services[rng.index(i)].name.clone();
                g.services[i].set("name", V::S(prev.clone()));
                g.services[i].name = prev;
                return format!("{}.name", svc_at(i, g));
            }
            18 if with_services => {
                let i = rng.index(n);
                g.services[i].remove("protocol");
                return format!("{}.protocol", svc_at(i, g));
            }
            19 if with_services => {
                let i = rng.index(n);
                g.services[i].set("protocol", V::S(rng.pick(&["sctp", "TCP", ""]).to_string()));
                return format!("{}.protocol", svc_at(i, g));
            }
            20 if with_services => {
                let i = rng.index(n);
                g.services[i].remove("vip");
                return format!("{}.vip", svc_at(i, g));
            }
            21 | 22 if with_services => {
                let i = rng.index(n);
                let bad = rng.pick(&[
                    "198.19.0.10",
                    "198.19.0.10:0",
                    "0.0.0.0:80",
                    "255.255.255.255:80",
                    "224.0.0.1:80",
                    "198.19.0.300:80",
                    "web:80",
                    "198.19.0.10:65536",
                    "[ff02::1]:80",
                    "[::]:80",
                    "",
                ]);
                g.services[i].set("vip", V::S(bad.to_string()));
                return format!("{}.vip", svc_at(i, g));
            }
            23 if n >= 2 => {
                let i = 1 + rng.index(n - 1);
                let j = rng.index(i);
                let (vip, proto) = (g.services[j].vip, g.services[j].protocol);
                g.services[i].set("vip", V::S(vip.to_string()));
                g.services[i].set("protocol", V::S(proto.to_string()));
                g.services[i].vip = vip;
                g.services[i].protocol = proto;
                return format!("{}.vip", svc_at(i, g));
            }
            24 | 25 if with_services => {
                let i = rng.index(n);
                let colour = *rng.pick(&["blue", "green"]);
                if rng.percent(50) {
                    g.services[i].remove(colour);
                } else {
                    g.services[i].set(colour, V::A(vec![]));
                }
                return format!("{}.{colour}", svc_at(i, g));
            }
            26 if with_services => {
                let i = rng.index(n);
                let colour = *rng.pick(&["blue", "green"]);
                let pool: Vec<String> = (0..65)
                    .map(|k| format!("10.200.{}.{}:80", k / 200, 1 + k % 200))
                    .collect();
                g.services[i].set(colour, strs(&pool));
                return format!("{}.{colour}", svc_at(i, g));
            }
            27..=30 if with_services => {
                let i = rng.index(n);
                let colour = *rng.pick(&["blue", "green"]);
                let mut pool: Vec<String> = if colour == "blue" {
                    g.services[i].blue.iter().map(|a| a.to_string()).collect()
                } else {
                    g.services[i].green.iter().map(|a| a.to_string()).collect()
                };
                // Insert (or, in a full pool, replace) one bad backend.
                let full = pool.len() >= 64;
                let at = rng.index(pool.len() + usize::from(!full));
                let vip = g.services[i].vip.to_string();
                let dup = pool.first().cloned().unwrap_or_default();
                let bad = match rng.index(9) {
                    0 => "10.0.0.1".to_string(),
                    1 => "10.0.0.1:0".into(),
                    2 => "224.1.1.1:80".into(),
                    3 => "[2001:db8::1]:80".into(),
                    4 => vip,
                    5 if at > 0 => dup,
                    6 => "10.0.0.256:1".into(),
                    7 => " 10.0.0.1:80".into(),
                    _ => "0.0.0.0:53".into(),
                };
                if full {
                    pool[at] = bad;
                } else {
                    pool.insert(at, bad);
                }
                g.services[i].set(colour, strs(&pool));
                return format!("{}.{colour}[{at}]", svc_at(i, g));
            }
            31 if n >= 2 => {
                // A backend of an earlier service (same protocol) reused.
                let i = 1 + rng.index(n - 1);
                let j = rng.index(i);
                let proto = g.services[j].protocol;
                if g.services[..i]
                    .iter()
                    .any(|s| s.vip == g.services[i].vip && s.protocol == proto)
                {
                    continue;
                }
                g.services[i].set("protocol", V::S(proto.to_string()));
                g.services[i].protocol = proto;
                let reused = g.services[j].green[0].to_string();
                let mut pool: Vec<String> =
                    g.services[i].blue.iter().map(|a| a.to_string()).collect();
                // Appended, or in a full pool in place of the last one (a
                // 65th backend would be a fault of its own).
                if pool.len() >= 64 {
                    pool.pop();
                }
                pool.push(reused);
                let at = pool.len() - 1;
                g.services[i].set("blue", strs(&pool));
                return format!("{}.blue[{at}]", svc_at(i, g));
            }
            32 if with_services => {
                let i = rng.index(n);
                g.services[i]
                    .keys
                    .push(("colour".into(), V::S("blue".into())));
                return "line ".into();
            }
            33 if with_services => {
                let i = rng.index(n);
                g.services[i].set("blue", V::S("10.0.0.1:80".into()));
                return "line ".into();
            }
            34..=37 if with_services => {
                let i = rng.index(n);
                let (k, v, key) = match rng.index(7) {
                    0 => ("kind", V::S("icmp".into()), "kind"),
                    1 => ("rise", V::I(0), "rise"),
                    2 => ("fall", V::I(101), "fall"),
                    3 => ("status", V::S("500-200".into()), "status"),
                    4 => ("interval", V::S("5ms".into()), "interval"),
                    5 => ("path", V::S("no-slash".into()), "path"),
                    _ => ("timeout", V::S("1h".into()), "timeout"),
                };
                let mut h = vec![("interval".to_string(), V::S("1s".into()))];
                if matches!(key, "status" | "path") {
                    h.push(("kind".into(), V::S("http".into())));
                }
                h.retain(|(hk, _)| hk != k);
                h.push((k.to_string(), v));
                g.services[i].health = Some(h);
                return format!("{}.health.{key}", svc_at(i, g));
            }
            38 if with_services => {
                // An IPv6 service (its backends too) that breaks a rule
                // of its own: an IPv4 backend in it, or stateless.
                let i = rng.index(n);
                g.services[i].set("vip", V::S(format!("[2001:db8::{}]:80", i + 1)));
                g.services[i].set("blue", strs(&[format!("[2001:db8:1::{}]:80", i + 1)]));
                if rng.index(2) == 0 {
                    g.services[i].set("green", strs(&[format!("198.18.2.{}:80", i + 1)]));
                    return format!("({}).green[0]", g.services[i].name);
                }
                g.services[i].set("green", strs(&[format!("[2001:db8:2::{}]:80", i + 1)]));
                g.services[i].set("stateless", V::Raw("true".into()));
                return format!("({}).stateless", g.services[i].name);
            }
            39 => {
                g.top
                    .push(("interfaces".into(), strs(&["eth9".to_string()])));
                return "line ".into();
            }
            40 => {
                let v = *rng.pick(&["16383", "17GiB", "1KiB", "64MB", "", "-1", "1.5MiB", "MiB"]);
                g.set_top("journal_max_size", V::S(v.into()));
                return "journal_max_size".into();
            }
            41 => {
                let v = *rng.pick(&[0i64, -1, 16383, 17 << 30, i64::MAX]);
                g.set_top("journal_max_size", V::I(v));
                return "journal_max_size".into();
            }
            _ => continue,
        }
    }
}

// ---------------------------------------------------------------------------
// Properties.

/// Problems with one parse result (empty: fine), each with its kind.
fn check_result(r: &Result<Config, ConfigError>) -> Vec<(&'static str, String)> {
    let mut bad = Vec::new();
    match r {
        Err(e) => {
            if e.file != FILE {
                bad.push(("error names another file", format!("{:?}", e.file)));
            }
            if e.key.trim().is_empty() {
                bad.push(("error with an empty key", e.to_string()));
            } else if !key_reads_as_a_key(&e.key) {
                bad.push(("error key does not read as a key", format!("{:?}", e.key)));
            }
            if e.reason.trim().is_empty() {
                bad.push(("error with an empty reason", format!("{:?}", e.to_string())));
            }
            let shown = e.to_string();
            if !shown.starts_with(FILE) || !shown.contains(&e.key) {
                bad.push(("error text lacks file or key", shown));
            }
        }
        Ok(c) => bad.extend(
            invariants(c)
                .into_iter()
                .map(|b| ("accepted config breaks an invariant", b)),
        ),
    }
    bad
}

/// Every value `attach` takes.
const ATTACH: [AttachSetting; 4] = [
    AttachSetting::Auto,
    AttachSetting::Xdp,
    AttachSetting::XdpGeneric,
    AttachSetting::Tc,
];

fn key_reads_as_a_key(key: &str) -> bool {
    const TOP: [&str; 14] = [
        "interfaces",
        "attach",
        "xdp_mode",
        "socket",
        "socket_group",
        "state_dir",
        "bpffs",
        "max_flows",
        "udp_idle_timeout",
        "tcp_idle_timeout",
        "journal_max_size",
        "metrics_listen",
        "service",
        "(syntax)",
    ];
    if TOP.contains(&key) {
        return true;
    }
    if let Some(rest) = key.strip_prefix("line ") {
        let mut parts = rest.split(" column ");
        return matches!(
            (parts.next(), parts.next(), parts.next()),
            (Some(l), Some(c), None) if l.parse::<usize>().is_ok() && c.parse::<usize>().is_ok()
        );
    }
    if let Some(i) = key.strip_prefix("interfaces[") {
        let i = i.strip_suffix(".attach").unwrap_or(i);
        return i
            .strip_suffix(']')
            .is_some_and(|n| n.parse::<usize>().is_ok());
    }
    key.starts_with("service[") || key.starts_with("service (")
}

fn valid_service_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn unicast(a: &SocketAddr) -> bool {
    a.port() != 0
        && match a.ip() {
            IpAddr::V4(v) => !(v.is_unspecified() || v.is_broadcast() || v.is_multicast()),
            IpAddr::V6(v) => {
                !(v.is_unspecified()
                    || v.is_multicast()
                    || v.is_unicast_link_local()
                    || v.to_ipv4_mapped().is_some())
            }
        }
}

/// The documented invariants of an accepted config.
fn invariants(c: &Config) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            bad.push(what);
        }
    };
    check(c.path == Path::new(FILE), format!("path {:?}", c.path));
    check(
        (1..=64).contains(&c.interfaces.len()),
        format!("{} interfaces", c.interfaces.len()),
    );
    let unique_ifs: BTreeSet<_> = c.interfaces.iter().collect();
    check(
        unique_ifs.len() == c.interfaces.len(),
        format!("interfaces repeat: {:?}", c.interfaces),
    );
    for i in &c.interfaces {
        check(
            !i.is_empty() && i.len() <= 15 && !i.contains(['/', ' ', '\0']),
            format!("interface name {i:?}"),
        );
    }
    for (what, p) in [
        ("socket", &c.socket),
        ("state_dir", &c.state_dir),
        ("bpffs", &c.bpffs),
    ] {
        check(p.is_absolute(), format!("{what} {p:?} is not absolute"));
    }
    if let Some(g) = &c.socket_group {
        check(
            !g.is_empty() && !g.contains([':', '/', ' ', '\0']),
            format!("socket_group {g:?}"),
        );
    }
    check(
        (1024..=1 << 26).contains(&c.max_flows),
        format!("max_flows {}", c.max_flows),
    );
    for (what, d) in [
        ("udp_idle_timeout", c.udp_idle_timeout),
        ("tcp_idle_timeout", c.tcp_idle_timeout),
    ] {
        check(
            d >= Duration::from_secs(1) && d <= Duration::from_secs(7 * 86_400),
            format!("{what} {d:?}"),
        );
    }
    check(
        (16 << 10..=16 << 30).contains(&c.journal_max_size),
        format!("journal_max_size {}", c.journal_max_size),
    );
    check(
        c.services.len() <= 256,
        format!("{} services", c.services.len()),
    );
    let mut names = BTreeSet::new();
    let mut vips = BTreeSet::new();
    let mut backends: BTreeMap<(SocketAddr, Protocol), String> = BTreeMap::new();
    for s in &c.services {
        check(
            valid_service_name(&s.name),
            format!("service name {:?}", s.name),
        );
        check(
            names.insert(&s.name),
            format!("service name {:?} twice", s.name),
        );
        check(
            vips.insert((s.vip, s.protocol)),
            format!("VIP {}/{} twice", s.vip, s.protocol),
        );
        check(unicast(&s.vip), format!("VIP {} of {}", s.vip, s.name));
        check(
            !(s.stateless && s.vip.is_ipv6()),
            format!("IPv6 service {} accepted as stateless", s.name),
        );
        for (colour, pool) in [("blue", &s.blue), ("green", &s.green)] {
            check(
                (1..=64).contains(&pool.len()),
                format!("{}.{colour}: {} backends", s.name, pool.len()),
            );
            for b in pool.iter() {
                check(unicast(b), format!("{}.{colour}: backend {b}", s.name));
                check(
                    b.is_ipv4() == s.vip.is_ipv4(),
                    format!("{}.{colour}: backend {b} not of the VIP's family", s.name),
                );
                check(
                    *b != s.vip,
                    format!("{}.{colour}: backend is the VIP", s.name),
                );
                if let Some(prev) =
                    backends.insert((*b, s.protocol), format!("{}.{colour}", s.name))
                {
                    check(
                        false,
                        format!(
                            "backend {b}/{} in {prev} and {}.{colour}",
                            s.protocol, s.name
                        ),
                    );
                }
            }
        }
    }
    bad
}

/// An accepted structured config must mean what was written.
fn same_meaning(g: &GConfig, c: &Config) -> Vec<String> {
    let mut bad = Vec::new();
    if c.interfaces != g.interfaces {
        bad.push(format!(
            "interfaces {:?} ≠ {:?}",
            c.interfaces, g.interfaces
        ));
    }
    for (i, want) in &g.attach {
        if c.attach_of(i) != *want {
            bad.push(format!("{i}: attach {:?} ≠ {want:?}", c.attach_of(i)));
        }
    }
    if let Some(m) = g.max_flows {
        if c.max_flows != m {
            bad.push(format!("max_flows {} ≠ {m}", c.max_flows));
        }
    }
    for (what, want, got) in [
        ("udp_idle_timeout", g.udp_idle, c.udp_idle_timeout),
        ("tcp_idle_timeout", g.tcp_idle, c.tcp_idle_timeout),
    ] {
        if want.is_some_and(|w| w != got) {
            bad.push(format!("{what} {got:?} ≠ {want:?}"));
        }
    }
    if let Some(n) = g.journal_max {
        if c.journal_max_size != n {
            bad.push(format!("journal_max_size {} ≠ {n}", c.journal_max_size));
        }
    }
    if c.services.len() != g.services.len() {
        bad.push(format!(
            "{} services ≠ {}",
            c.services.len(),
            g.services.len()
        ));
    }
    for (s, w) in c.services.iter().zip(&g.services) {
        if (s.name.as_str(), s.vip, s.protocol, &s.blue, &s.green)
            != (w.name.as_str(), w.vip, w.protocol, &w.blue, &w.green)
        {
            bad.push(format!("service {s:?} ≠ written {w:?}"));
        }
    }
    bad
}

fn parse_guarded(text: &str) -> Result<Result<Config, ConfigError>, String> {
    catch_unwind(AssertUnwindSafe(|| parse(Path::new(FILE), text))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(no message)".into())
    })
}

fn count() -> usize {
    std::env::var("BGSWITCH_FUZZ_CONFIGS")
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(DEFAULT_CONFIGS)
}

#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: BTreeMap<String, usize>,
    failures: Vec<String>,
    failed: usize,
    kinds: BTreeMap<&'static str, (usize, String)>,
}

impl Tally {
    /// Records a failing input: counted per kind; the first of each kind
    /// and the first few overall are shown in full.
    fn fail(&mut self, i: usize, problems: &[(&'static str, String)], text: &str) {
        self.failed += 1;
        for (kind, detail) in problems {
            let e = self.kinds.entry(kind).or_insert((0, String::new()));
            e.0 += 1;
            if e.1.is_empty() {
                e.1 = format!("#{i}: {detail}\ninput:\n{text}");
            }
        }
        if self.failures.len() < MAX_REPORTED {
            let all: Vec<String> = problems.iter().map(|(k, d)| format!("{k}: {d}")).collect();
            self.failures
                .push(format!("#{i}: {}\ninput:\n{text}", all.join("\n")));
        }
    }

    fn refused(&mut self, key: &str) {
        // Group "service[3] (web).blue[2]" as "service[i] (…).blue[j]".
        let mut k = String::new();
        let mut skip = false;
        for ch in key.chars() {
            match ch {
                '[' => {
                    k.push_str("[i]");
                    skip = true;
                }
                ']' => skip = false,
                '(' => {
                    k.push_str("(…)");
                    skip = true;
                }
                ')' => skip = false,
                c if c.is_ascii_digit() && key.starts_with("line") && !k.ends_with('N') => {
                    k.push('N')
                }
                c if c.is_ascii_digit() && key.starts_with("line") => {}
                c if !skip => k.push(c),
                _ => {}
            }
        }
        *self.refused.entry(k).or_default() += 1;
    }

    fn print(&self, title: &str, n: usize, took: Duration) {
        println!(
            "\n{title}: {n} configs in {took:.1?}: {} accepted, {} refused",
            self.accepted,
            n - self.accepted
        );
        for (k, v) in &self.refused {
            println!("    {v:>7}  refused at {k}");
        }
        println!("  failures: {}", self.failed);
        for (kind, (n, first)) in &self.kinds {
            println!("    {n:>7}  {kind}; first:\n{first}\n---");
        }
        for f in self.failures.iter().skip(1) {
            println!("---\n{f}");
        }
    }
}

#[test]
fn structured_configs_are_accepted_exactly_or_refused_at_the_faulty_key() {
    let n = count();
    let mut rng = rng_for(0x6267_7377_c0f1_0001);
    let mut tally = Tally::default();
    let t = Instant::now();
    for i in 0..n {
        let services = match rng.index(10) {
            0 => 0,
            1..=6 => 1 + rng.index(3),
            _ => 4 + rng.index(8),
        };
        let mut g = valid_config(&mut rng, services);
        let fault = rng.percent(70).then(|| add_fault(&mut rng, &mut g));
        let text = g.text();
        let r = match parse_guarded(&text) {
            Ok(r) => r,
            Err(panic) => {
                tally.fail(i, &[("parse panicked", panic)], &text);
                continue;
            }
        };
        let mut bad = check_result(&r);
        match (&fault, &r) {
            (None, Ok(c)) => {
                tally.accepted += 1;
                bad.extend(
                    same_meaning(&g, c)
                        .into_iter()
                        .map(|m| ("accepted config means something else", m)),
                );
            }
            (None, Err(e)) => bad.push(("a valid config was refused", e.to_string())),
            (Some(key), Ok(_)) => {
                tally.accepted += 1;
                bad.push(("accepted despite a fault", key.clone()));
            }
            (Some(key), Err(e)) => {
                tally.refused(&e.key);
                if !e.key.contains(key.as_str()) {
                    bad.push((
                        "the error names another key than the fault's",
                        format!("fault at {key:?}, error: {e}"),
                    ));
                }
            }
        }
        if !bad.is_empty() {
            tally.fail(i, &bad, &text);
        }
    }
    tally.print("structured configs", n, t.elapsed());
    assert_eq!(
        tally.failed, 0,
        "{} structured configs handled wrongly",
        tally.failed
    );
}

/// Text-level mutations.
fn mutate_text(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.index(5) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let at = rng.index(lines.len());
        match rng.index(16) {
            0 => {
                lines.remove(at);
            }
            1 => {
                let l = lines[at].clone();
                lines.insert(at, l);
            }
            2 => {
                let j = rng.index(lines.len());
                lines.swap(at, j);
            }
            3 | 4 => {
                // Replace a value.
                if let Some(eq) = lines[at].find('=') {
                    let v = rng.pick(&[
                        "\"\"",
                        "0",
                        "-1",
                        "1e9",
                        "true",
                        "[]",
                        "[\"\"]",
                        "{}",
                        "\"198.19.0.10:80\"",
                        "[\"10.0.0.1:80\", \"10.0.0.1:80\"]",
                        "\"x\"",
                        "\"1s\"",
                        "\"tcp\"",
                        "\"udp\"",
                        "9223372036854775807",
                        "\"\\u0000\"",
                        "\"é🦀\"",
                        "[1, \"a\"]",
                        "'lit'",
                        "\"\"\"multi\nline\"\"\"",
                        "1979-05-27T07:32:00Z",
                        "inf",
                        "nan",
                    ]);
                    let key = lines[at][..eq].to_string();
                    lines[at] = format!("{key}= {v}");
                }
            }
            5 => {
                let t = rng.pick(&[
                    "[[service]]",
                    "[service]",
                    "[[services]]",
                    "[service.health]",
                    "[[service.health]]",
                    "[health]",
                    "[[service]]\nname = \"dup\"",
                    "[]",
                    "[[",
                ]);
                lines.insert(at, t.to_string());
            }
            6 => {
                let kv = rng.pick(&[
                    "interfaces = [\"eth0\"]",
                    "interfaces = []",
                    "max_flows = 1023",
                    "xdp_mode = \"generic\"",
                    "attach = \"tc\"",
                    "attach = \"fast\"",
                    "interfaces = [{ name = \"eth0\", attach = \"xdp\" }]",
                    "interfaces = [{ attach = \"xdp\" }]",
                    "name = \"web\"",
                    "name = \"bad name\"",
                    "vip = \"[::1]:80\"",
                    "protocol = \"sctp\"",
                    "blue = [\"10.20.0.11:8443\"]",
                    "green = []",
                    "kind = \"http\"",
                    "rise = 0",
                    "socket_group = \"\"",
                    "udp_idle_timeout = \"0.5s\"",
                    "metrics_listen = \"127.0.0.1:9477\"",
                    "unknown = 1",
                ]);
                lines.insert(at, kv.to_string());
            }
            7 => {
                // Cut a line at a random character.
                let l = &lines[at];
                let cut = rng.index(l.chars().count() + 1);
                lines[at] = l.chars().take(cut).collect();
            }
            8 | 9 => {
                // Insert a character, often a structural or multi-byte one.
                let c = *rng.pick(&[
                    '"', '\'', '[', ']', '{', '}', '=', ',', '.', '#', '\\', '\t', '\0', '\r', 'é',
                    'ß', '€', '🦀', '\u{feff}', '\u{202e}', '\u{7f}', 'x', '0', ' ',
                ]);
                let l = &lines[at];
                let pos = rng.index(l.chars().count() + 1);
                let mut s: String = l.chars().take(pos).collect();
                s.push(c);
                s.extend(l.chars().skip(pos));
                lines[at] = s;
            }
            10 => {
                // Delete a character.
                let l = &lines[at];
                let n = l.chars().count();
                if n > 0 {
                    let pos = rng.index(n);
                    lines[at] = l
                        .chars()
                        .enumerate()
                        .filter(|(i, _)| *i != pos)
                        .map(|(_, c)| c)
                        .collect();
                }
            }
            11 => {
                // Duplicate a whole service block.
                let text = lines.join("\n");
                if let Some(p) = text.find("[[service]]") {
                    let block = text[p..].to_string();
                    lines.extend(block.lines().map(str::to_string));
                }
            }
            12 => {
                // Truncate the whole text at a random character.
                let text = lines.join("\n");
                let cut = rng.index(text.chars().count() + 1);
                let text: String = text.chars().take(cut).collect();
                lines = text.lines().map(str::to_string).collect();
            }
            13 => {
                // Grow a pool past 64 or a list of interfaces.
                let n = 60 + rng.index(10);
                let items: Vec<String> = (0..n)
                    .map(|i| format!("\"10.9.{}.{}:80\"", i / 250, 1 + i % 250))
                    .collect();
                let key = rng.pick(&["blue", "green", "interfaces"]);
                lines.insert(at, format!("{key} = [{}]", items.join(", ")));
            }
            14 => {
                // A non-ASCII byte sequence made valid UTF-8 (the parser
                // takes &str).
                let l = lines[at].clone().into_bytes();
                let mut b = l.clone();
                if !b.is_empty() {
                    let i = rng.index(b.len());
                    b[i] ^= 0x80 | (1 << rng.index(7)) as u8;
                }
                lines[at] = String::from_utf8_lossy(&b).into_owned();
            }
            _ => {
                lines.insert(at, "# comment with \"quotes\" and [brackets]".into());
            }
        }
    }
    let mut out = lines.join(if rng.percent(10) { "\r\n" } else { "\n" });
    if rng.percent(50) {
        out.push('\n');
    }
    out
}

#[test]
fn mutated_configs_never_panic_and_are_refused_clearly_or_satisfy_the_invariants() {
    let n = count();
    let mut rng = rng_for(0x6267_7377_c0f1_0002);
    let mut seeds: Vec<String> = vec![PACKAGED.to_string()];
    seeds.extend(PARSER_TESTS.iter().map(|s| s.to_string()));
    for k in 0..8 {
        seeds.push(valid_config(&mut rng, k).text());
    }
    for s in &seeds {
        assert!(
            parse(Path::new(FILE), s).is_ok(),
            "seed config must be valid:\n{s}"
        );
    }
    let mut tally = Tally::default();
    let t = Instant::now();
    for i in 0..n {
        let seed = rng.pick(&seeds).clone();
        let text = mutate_text(&mut rng, &seed);
        let r = match parse_guarded(&text) {
            Ok(r) => r,
            Err(panic) => {
                tally.fail(i, &[("parse panicked", panic)], &format!("{text:?}"));
                continue;
            }
        };
        match &r {
            Ok(_) => tally.accepted += 1,
            Err(e) => tally.refused(&e.key),
        }
        let bad = check_result(&r);
        if !bad.is_empty() {
            tally.fail(i, &bad, &format!("{text:?}"));
        }
    }
    tally.print("mutated configs", n, t.elapsed());
    assert_eq!(
        tally.failed, 0,
        "{} mutated configs handled wrongly",
        tally.failed
    );
}

#[test]
fn toml_syntax_errors_have_a_reason() {
    for (text, key) in [
        ("interfaces = [\"eth0\"]\nname =", "line 2 column 7"),
        ("interfaces = ", "line 1 column 14"),
        (
            "interfaces = [\"eth0\"]\n# a comment with a DEL \u{7f}\n",
            "line 2 column 24",
        ),
        (
            "interfaces = [\"eth0\"]\n\rmax_flows = 2048\n",
            "line 2 column 1",
        ),
    ] {
        let e = parse(Path::new(FILE), text).expect_err("not TOML");
        assert_eq!(e.key, key, "{text:?}");
        assert!(
            !e.reason.trim().is_empty(),
            "{text:?} is refused as {:?}: the reason is empty",
            e.to_string()
        );
    }
}

#[test]
fn interface_names_follow_the_kernels_rules() {
    for name in ["eth0:1", "a\tb", "a\nb", ".", ".."] {
        let text = format!("interfaces = [{}]\n", quote(name));
        let r = parse(Path::new(FILE), &text);
        assert!(
            matches!(&r, Err(e) if e.key == "interfaces[0]"),
            "interface name {name:?} must be refused at interfaces[0]; got {r:?}"
        );
    }
}

/// The fuzz's seeding, as before the generator moved to the test bed.
fn rng_for(seed: u64) -> Rng {
    Rng::from_state(seed | 1)
}
