//! The three switchers compared in parts 3 and 4, each on its own test
//! topology (client, load balancer, two blue and two green backends running
//! the same HTTP server): bgswitch (the real daemon and CLI), nftables DNAT
//! (a ruleset swapped with `nft -f`) and HAProxy in `mode tcp` (servers
//! switched through its runtime API).
//!
//! For a fair comparison of TCP through veth, the nftables and HAProxy load
//! balancers carry an XDP_PASS program on both interfaces: attaching XDP to a
//! veth turns off TSO/GSO on its peer, which bgswitch's attachment does too.

use std::{
    fs::File,
    net::SocketAddrV4,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::MapData;
use bgswitch_tests::{
    in_netns,
    netns::netns_path,
    switcher::{default_services, Switcher, HTTP_PORT, UDP_PORT},
    Colour, Topology, TopologyOptions, VIP,
};

use crate::{cost::PassProgram, sys};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bgswitch,
    Nft,
    Haproxy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Bgswitch, Kind::Nft, Kind::Haproxy];
    pub fn key(self) -> &'static str {
        match self {
            Kind::Bgswitch => "bgswitch",
            Kind::Nft => "nftables_dnat",
            Kind::Haproxy => "haproxy_tcp",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Kind::Bgswitch => "bgswitch",
            Kind::Nft => "nftables DNAT",
            Kind::Haproxy => "HAProxy (mode tcp)",
        }
    }
    /// Why this system cannot run here, if it cannot.
    pub fn missing(self) -> Option<String> {
        let need = match self {
            Kind::Bgswitch => return None,
            Kind::Nft => "nft",
            Kind::Haproxy => "haproxy",
        };
        sys::have(need)
            .is_none()
            .then(|| format!("`{need}` is not installed (cargo xtask bench installs it)"))
    }
}

/// The HTTP service's address.
pub fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

/// Spawns `cmd` with its network namespace set to the one `netns` (an open
/// `/run/netns/<name>`) names — without `ip netns exec`, which also remounts
/// /sys and would add its own time to a measured command. The child gets
/// SIGKILL when the thread that spawned it exits.
pub fn spawn_in(netns: &File, cmd: &mut Command) -> std::io::Result<Child> {
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Dies with the bench, even if the bench is killed (HAProxy).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

/// The `CONTROL` words of a running daemon, mapped read-only from the pin.
pub struct ControlView {
    ptr: *const u8,
    len: usize,
}

// SAFETY: read-only shared memory read with volatile loads.
unsafe impl Send for ControlView {}
unsafe impl Sync for ControlView {}

impl ControlView {
    pub fn open(bpffs: &Path) -> Result<Self> {
        let pin = bgswitch::paths::map_pin(bpffs, bgswitch_common::maps::CONTROL);
        let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let len = 4096;
        // SAFETY: mapping a BPF_F_MMAPABLE array read-only and shared.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap of CONTROL: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The 256 control words.
    pub fn words(&self) -> Vec<u32> {
        (0..256)
            // SAFETY: within the mapping; 8-byte stride, 4-byte aligned.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(i * 8) as *const u32) })
            .collect()
    }
}

impl Drop for ControlView {
    fn drop(&mut self) {
        // SAFETY: unmapping what open() mapped.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

/// When a flip was invoked and when it was seen done.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlipTiming {
    /// CLOCK_MONOTONIC ns just before the command was spawned.
    pub start_ns: u64,
    /// The whole command, spawn to exit.
    pub command_ns: u64,
    /// Invocation to the new state being in place (the control word seen
    /// changed for bgswitch; the API's answer for HAProxy; nft's exit — its
    /// commit is synchronous — for nftables).
    pub applied_ns: Option<u64>,
}

/// One switcher on its own topology.
pub struct System {
    pub kind: Kind,
    pub topo: Topology,
    dir: PathBuf,
    switcher: Option<Switcher>,
    control: Option<ControlView>,
    pass: Option<PassProgram>,
    haproxy: Option<Child>,
    lb_netns: File,
    active: Colour,
}

impl System {
    pub fn create(kind: Kind) -> Result<System> {
        if let Some(why) = kind.missing() {
            bail!("{why}");
        }
        let mut topo = Topology::create(TopologyOptions {
            blue: 2,
            green: 2,
            tx_csum_off: true,
        })?;
        topo.start_servers(HTTP_PORT, UDP_PORT)?;
        let dir = PathBuf::from("/run/bgswitch-bench").join(topo.prefix());
        std::fs::create_dir_all(&dir)?;
        let lb = topo.lb_ns().to_string();
        let cli = topo.client_ns().to_string();
        // Many short connections: a wide port range, reuse of TIME_WAIT ports.
        sys::ns_sysctl(&cli, "net.ipv4.ip_local_port_range", "1024 65000")?;
        sys::ns_sysctl(&cli, "net.ipv4.tcp_tw_reuse", "1")?;
        let lb_netns = File::open(netns_path(&lb)?)?;
        let mut s = System {
            kind,
            topo,
            dir,
            switcher: None,
            control: None,
            pass: None,
            haproxy: None,
            lb_netns,
            active: Colour::Blue,
        };
        match kind {
            Kind::Bgswitch => {
                let mut sw = Switcher::new(&s.topo, &default_services(&s.topo))?;
                sw.start()?;
                s.control = Some(ControlView::open(&sw.bpffs())?);
                s.switcher = Some(sw);
            }
            Kind::Nft => {
                s.attach_pass()?;
                sys::ns_sysctl(&lb, "net.ipv4.ip_forward", "1")?;
                s.nft_apply(Colour::Blue)?;
            }
            Kind::Haproxy => {
                s.attach_pass()?;
                bgswitch_tests::ip_ns(&lb, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
                s.start_haproxy()?;
            }
        }
        // The VIP answers (from blue) before anything is measured.
        let ok = sys::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            crate::load::request(&cli, vip()).is_ok_and(|c| c == Colour::Blue)
        });
        ensure!(ok, "{}: the VIP does not answer from blue", kind.label());
        Ok(s)
    }

    fn attach_pass(&mut self) -> Result<()> {
        let mut pass = PassProgram::load()?;
        let lb = self.topo.lb_ns().to_string();
        in_netns(&lb, || -> Result<()> {
            for i in self.topo.lb_interfaces() {
                pass.attach(i)?;
            }
            Ok(())
        })??;
        self.pass = Some(pass);
        Ok(())
    }

    fn backends(&self, c: Colour) -> Vec<String> {
        self.topo
            .backends_of(c)
            .map(|b| b.addr.to_string())
            .collect()
    }

    fn nft_file(&self, c: Colour) -> Result<PathBuf> {
        let map = self
            .backends(c)
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i} : {a}"))
            .collect::<Vec<_>>()
            .join(", ");
        let n = self.backends(c).len();
        let text = format!(
            "table ip bgbench {{\n\
             \tchain pre {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             \tchain post {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             }}\n\
             flush chain ip bgbench pre\n\
             add rule ip bgbench pre ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen random mod {n} map {{ {} }}\n\
             add rule ip bgbench pre ip daddr {VIP} udp dport {UDP_PORT} dnat to numgen random mod {n} map {{ {} }}\n",
            map,
            map,
        );
        let path = self.dir.join(format!("nft-{c}.conf"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn nft_apply(&mut self, c: Colour) -> Result<()> {
        let file = self.nft_file(c)?;
        let nft = sys::have("nft").context("nft not installed")?;
        let out = spawn_in(
            &self.lb_netns,
            Command::new(nft)
                .arg("-f")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?
        .wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn haproxy_socket(&self) -> PathBuf {
        self.dir.join("haproxy.sock")
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let sock = self.haproxy_socket();
        let server = |b: &bgswitch_tests::Backend| {
            format!(
                "    server {} {}:{HTTP_PORT}{}\n",
                b.name,
                b.addr,
                if b.colour == Colour::Blue {
                    ""
                } else {
                    " disabled"
                }
            )
        };
        let servers: String = self.topo.backends().iter().map(server).collect();
        let cfg = format!(
            "global\n    stats socket {} mode 600 level admin\n    maxconn 4096\n\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend web\n    bind {VIP}:{HTTP_PORT}\n    default_backend web\n\n\
             backend web\n    balance roundrobin\n{servers}",
            sock.display()
        );
        let path = self.dir.join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let log = File::create(self.dir.join("haproxy.log"))?;
        let haproxy = sys::have("haproxy").context("haproxy not installed")?;
        let child = spawn_in(
            &self.lb_netns,
            Command::new(haproxy)
                .args(["-db", "-f"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        self.haproxy = Some(child);
        let up = sys::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            haproxy_api(&sock, "show info").is_ok()
        });
        if !up {
            let log = std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default();
            bail!("haproxy did not start: {log}");
        }
        Ok(())
    }

    /// The colour new flows go to now.
    pub fn active(&self) -> Colour {
        self.active
    }

    /// Switches new flows to `to`, timing the whole command.
    pub fn flip(&mut self, to: Colour) -> Result<FlipTiming> {
        let t = match self.kind {
            Kind::Bgswitch => self.flip_bgswitch(to)?,
            Kind::Nft => {
                let file = self.nft_file(to)?;
                let nft = sys::have("nft").context("nft not installed")?;
                let mut cmd = Command::new(nft);
                cmd.arg("-f")
                    .arg(&file)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let start_ns = sys::now_ns();
                let out = spawn_in(&self.lb_netns, &mut cmd)?.wait_with_output()?;
                let end = sys::now_ns();
                ensure!(
                    out.status.success(),
                    "nft -f: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                FlipTiming {
                    start_ns,
                    command_ns: end - start_ns,
                    applied_ns: Some(end - start_ns),
                }
            }
            Kind::Haproxy => {
                let cmds: Vec<String> = [Colour::Blue, Colour::Green]
                    .iter()
                    .flat_map(|&c| {
                        let state = if c == to { "ready" } else { "maint" };
                        self.topo
                            .backends_of(c)
                            .map(move |b| format!("set server web/{} state {state}", b.name))
                    })
                    .collect();
                // New colour first, then the old one to maintenance: never no server.
                let mut ordered: Vec<&String> =
                    cmds.iter().filter(|c| c.ends_with("ready")).collect();
                ordered.extend(cmds.iter().filter(|c| c.ends_with("maint")));
                let line = ordered
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(";");
                let exe = std::env::current_exe()?;
                let start_ns = sys::now_ns();
                let out = Command::new(exe)
                    .arg("--haproxy-api")
                    .arg(self.haproxy_socket())
                    .arg(&line)
                    .stdin(Stdio::null())
                    .output()?;
                let end = sys::now_ns();
                ensure!(
                    out.status.success(),
                    "haproxy runtime API: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let answered: Option<u64> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("answered_ns ")?.trim().parse().ok());
                FlipTiming {
                    start_ns,
                    command_ns: end - start_ns,
                    applied_ns: answered.map(|a| a.saturating_sub(start_ns)),
                }
            }
        };
        self.active = to;
        Ok(t)
    }

    fn flip_bgswitch(&mut self, to: Colour) -> Result<FlipTiming> {
        let sw = self.switcher.as_ref().context("no daemon")?;
        let control = self.control.as_ref().context("no CONTROL view")?;
        let before = control.words();
        let bin = bgswitch_tests::switcher::bgswitch_bin()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(sw.socket())
            .args(["flip", "web", "--to", to.as_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let done = std::sync::atomic::AtomicBool::new(false);
        let (start_ns, out, seen) = std::thread::scope(|s| -> Result<_> {
            let watcher = s.spawn(|| {
                // Poll the mapped words (a 10 µs sleep between reads, so the
                // watcher does not take a CPU from the command it times).
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                loop {
                    if control.words() != before {
                        return Some(sys::now_ns());
                    }
                    if done.load(std::sync::atomic::Ordering::Relaxed)
                        || std::time::Instant::now() > deadline
                    {
                        return (control.words() != before).then(sys::now_ns);
                    }
                    std::thread::sleep(Duration::from_micros(10));
                }
            });
            let start_ns = sys::now_ns();
            let out = cmd.output();
            let end = sys::now_ns();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let seen = watcher.join().ok().flatten();
            Ok((start_ns, out.map(|o| (o, end)), seen))
        })?;
        let (out, end) = out?;
        ensure!(
            out.status.success(),
            "bgswitch flip: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(FlipTiming {
            start_ns,
            command_ns: end - start_ns,
            applied_ns: seen.map(|t| t.saturating_sub(start_ns)),
        })
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some(mut c) = self.haproxy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.control = None;
        self.switcher = None;
        self.pass = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends one line to HAProxy's runtime API and returns the answer.
pub use bgswitch_tests::soak::haproxy_api;
