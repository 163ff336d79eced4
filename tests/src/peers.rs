//! The peers bgswitch is compared with, set up in one place for the test
//! bed (`soak`) and the benchmark (`bench/src/systems.rs`), each in the
//! load-balancer namespace of a [`Topology`]:
//!
//! * [`NftDnat`]: nftables DNAT, a `nat` table whose prerouting chain sends
//!   VIP:HTTP_PORT/tcp (`web`) and VIP:UDP_PORT/udp (`echo`) to the active
//!   colour's backends (`numgen random`), replaced as a whole with one
//!   `nft -f` per flip. Conntrack keeps existing flows where they are and
//!   un-NATs replies, which come back through the lb (the backends route
//!   through it).
//! * [`Haproxy`]: HAProxy in `mode tcp` listening on VIP:HTTP_PORT (the VIP
//!   is a local address there), one backend `web` holding every server, the
//!   inactive colour's in maintenance at start. A flip sets the new
//!   colour's servers `ready`, then the old colour's `drain` (no new
//!   connections, open ones stay), through the runtime API on its stats
//!   socket. Only `web`: `mode tcp` cannot carry UDP.
//!
//! Programs run in the namespace through `setns` ([`spawn_in`]), not `ip
//! netns exec`, which also remounts /sys and would add its own time to a
//! measured command. Each peer removes what it set up when dropped.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    netns::{find_program, ip_ns, netns_path, ns_exec},
    switcher::{HTTP_PORT, UDP_PORT},
    topology::{Colour, Topology, VIP},
};

/// Installs `package` with apt-get if `program` is missing (as `cargo
/// xtask` does for its own tools). One caller at a time: dpkg takes a lock.
pub fn ensure_program(program: &str, package: &str) -> Result<PathBuf> {
    static APT: Mutex<()> = Mutex::new(());
    let _apt = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find_program(program) {
        return Ok(p);
    }
    eprintln!("installing {package} with apt-get (for `{program}`)");
    for args in [
        &["update", "-q"][..],
        &["install", "-y", "-q", "--no-install-recommends", package][..],
    ] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    find_program(program).with_context(|| format!("`{program}` missing after installing {package}"))
}

/// Spawns `cmd` with its network namespace set to the one `netns` (an open
/// `/run/netns/<name>`) names. The child gets SIGKILL when the thread that
/// spawned it exits, even if the caller is killed.
pub fn spawn_in(netns: &File, cmd: &mut Command) -> std::io::Result<Child> {
    let fd = netns.as_raw_fd();
    // SAFETY: setns and prctl are async-signal-safe; the fd stays open
    // until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

/// A per-run directory for a peer's files.
fn peer_dir(topo: &Topology, what: &str) -> Result<PathBuf> {
    let dir = PathBuf::from("/run/bgswitch-peers").join(format!("{}-{what}", topo.prefix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The nftables table the peer owns in the lb namespace.
const NFT_TABLE: &str = "bgswitch_peer";

/// nftables DNAT in the lb namespace (see the module's doc).
pub struct NftDnat {
    nft: PathBuf,
    lb: File,
    dir: PathBuf,
    blue: Vec<String>,
    green: Vec<String>,
    /// Active colour of `web` and `echo`.
    active: [Colour; 2],
}

impl NftDnat {
    /// Turns on forwarding in the lb namespace and loads the ruleset, both
    /// services on blue.
    pub fn start(topo: &Topology) -> Result<Self> {
        let nft = ensure_program("nft", "nftables")?;
        let lb = File::open(netns_path(topo.lb_ns())?)?;
        ns_exec(topo.lb_ns(), "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let addrs = |c| topo.backends_of(c).map(|b| b.addr.to_string()).collect();
        let n = Self {
            nft,
            lb,
            dir: peer_dir(topo, "nft")?,
            blue: addrs(Colour::Blue),
            green: addrs(Colour::Green),
            active: [Colour::Blue; 2],
        };
        n.apply()?;
        Ok(n)
    }

    fn map(&self, c: Colour) -> (usize, String) {
        let addrs = if c == Colour::Blue {
            &self.blue
        } else {
            &self.green
        };
        let map = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i} : {a}"))
            .collect::<Vec<_>>()
            .join(", ");
        (addrs.len(), map)
    }

    /// Sends new flows of `service` (`web` or `echo`) to `to` in the
    /// ruleset [`NftDnat::ruleset`] writes next; nothing is loaded yet.
    pub fn set_active(&mut self, service: &str, to: Colour) -> Result<()> {
        let i = match service {
            "web" => 0,
            "echo" => 1,
            _ => bail!("no service {service:?}"),
        };
        self.active[i] = to;
        Ok(())
    }

    /// Writes the whole table for the active colours: the file one `nft
    /// -f` loads in one transaction.
    pub fn ruleset(&self) -> Result<PathBuf> {
        let (nw, web) = self.map(self.active[0]);
        let (ne, echo) = self.map(self.active[1]);
        let text = format!(
            "table ip {NFT_TABLE} {{\n\
             \tchain pre {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             \tchain post {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             }}\n\
             flush table ip {NFT_TABLE}\n\
             add rule ip {NFT_TABLE} pre ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen random mod {nw} map {{ {web} }}\n\
             add rule ip {NFT_TABLE} pre ip daddr {VIP} udp dport {UDP_PORT} dnat to numgen random mod {ne} map {{ {echo} }}\n"
        );
        let file = self.dir.join("ruleset.nft");
        std::fs::write(&file, text)?;
        Ok(file)
    }

    /// The `nft -f FILE` command, to run in the lb namespace.
    pub fn load_command(&self, file: &Path) -> Command {
        let mut c = Command::new(&self.nft);
        c.arg("-f")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Runs `cmd` in the lb namespace and waits for it.
    pub fn run_in_lb(&self, cmd: &mut Command) -> Result<Output> {
        let out = spawn_in(&self.lb, cmd)?.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    }

    /// Writes and loads the ruleset of the active colours.
    pub fn apply(&self) -> Result<()> {
        let file = self.ruleset()?;
        self.run_in_lb(&mut self.load_command(&file))?;
        Ok(())
    }

    /// Sends new flows of `service` to `to`: one `nft -f`.
    pub fn flip_to(&mut self, service: &str, to: Colour) -> Result<()> {
        self.set_active(service, to)?;
        self.apply()
    }
}

impl Drop for NftDnat {
    fn drop(&mut self) {
        let mut c = Command::new(&self.nft);
        c.args(["delete", "table", "ip", NFT_TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = spawn_in(&self.lb, &mut c).and_then(|mut ch| ch.wait());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy in `mode tcp` in the lb namespace (see the module's doc).
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    servers: Vec<(String, Colour)>,
}

impl Haproxy {
    /// Adds the VIP to the lb namespace's loopback and starts HAProxy
    /// there, blue's servers ready and green's in maintenance; returns once
    /// its runtime API answers.
    pub fn start(topo: &Topology) -> Result<Self> {
        let bin = ensure_program("haproxy", "haproxy")?;
        let lb = topo.lb_ns();
        ip_ns(lb, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        let dir = peer_dir(topo, "haproxy")?;
        let socket = dir.join("admin.sock");
        let servers: String = topo
            .backends()
            .iter()
            .map(|b| {
                let off = if b.colour == Colour::Blue {
                    ""
                } else {
                    " disabled"
                };
                format!("    server {} {}:{HTTP_PORT}{off}\n", b.name, b.addr)
            })
            .collect();
        let cfg = format!(
            "global\n    stats socket {} mode 600 level admin\n    maxconn 4096\n\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend web\n    bind {VIP}:{HTTP_PORT}\n    default_backend web\n\n\
             backend web\n    balance roundrobin\n{servers}",
            socket.display()
        );
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg)?;
        let log = File::create(dir.join("haproxy.log"))?;
        let netns = File::open(netns_path(lb)?)?;
        let child = spawn_in(
            &netns,
            Command::new(&bin)
                .arg("-db")
                .arg("-f")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )
        .context("starting haproxy")?;
        let h = Self {
            child,
            dir,
            socket,
            servers: topo
                .backends()
                .iter()
                .map(|b| (b.name.clone(), b.colour))
                .collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.api("show info").is_err() {
            if Instant::now() > deadline {
                bail!("haproxy did not start: {}", h.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(h)
    }

    /// HAProxy's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// The runtime API's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one line (commands separated by `;`) to the runtime API.
    pub fn api(&self, line: &str) -> Result<String> {
        haproxy_api(&self.socket, line)
    }

    /// The runtime-API line of a flip of `web` to `to`: the new colour's
    /// servers first, then the old colour's to `drain` (never no server).
    pub fn flip_line(&self, to: Colour) -> String {
        let mut cmds: Vec<String> = self
            .servers
            .iter()
            .filter(|(_, c)| *c == to)
            .map(|(name, _)| format!("set server web/{name} state ready"))
            .collect();
        cmds.extend(
            self.servers
                .iter()
                .filter(|(_, c)| *c != to)
                .map(|(name, _)| format!("set server web/{name} state drain")),
        );
        cmds.join(";")
    }

    /// Sends new connections of `service` (only `web`) to `to`.
    pub fn flip_to(&mut self, service: &str, to: Colour) -> Result<()> {
        if service != "web" {
            bail!("HAProxy in mode tcp carries only web, not {service:?}");
        }
        let answer = self.api(&self.flip_line(to))?;
        if !answer.trim().is_empty() {
            bail!("haproxy runtime API: {}", answer.trim());
        }
        Ok(())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request/answer exchange with HAProxy's runtime API.
pub fn haproxy_api(socket: &Path, line: &str) -> Result<String> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
