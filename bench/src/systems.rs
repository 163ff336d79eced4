//! The switchers compared in parts 3 and 4, each on its own test topology
//! (client, load balancer, two blue and two green backends behind a bridge
//! running the same HTTP server): bgswitch (the real daemon and CLI; `auto`
//! serves the veths with TC), nftables DNAT (a ruleset swapped with `nft
//! -f`) and HAProxy in `mode tcp` (servers switched through its runtime API),
//! every veth with the kernel's default offloads (TSO, partial checksums) as
//! in containers; and, for part 3, bgswitch's XDP path on a topology
//! standing in for physical NICs (senders' complete checksums, GRO on the
//! peers) — with XDP on a veth its peer loses TSO/GSO, so that row segments
//! otherwise than the others.

use std::{
    net::SocketAddrV4,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::MapData;
pub use bgswitch_tests::peers::{haproxy_api, spawn_in};
use bgswitch_tests::{
    peers::{Haproxy, NftDnat},
    switcher::{default_services, Switcher, HTTP_PORT, UDP_PORT},
    Colour, Topology, TopologyOptions, VIP,
};

use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// bgswitch as `auto` serves veths: TC.
    Bgswitch,
    /// bgswitch's XDP path, on veths standing in for physical NICs.
    BgswitchXdp,
    Nft,
    Haproxy,
}

impl Kind {
    /// The switchers part 4 compares (the XDP path flips as TC does).
    pub const ALL: [Kind; 3] = [Kind::Bgswitch, Kind::Nft, Kind::Haproxy];
    /// Part 3's: these and bgswitch's XDP path.
    pub const HTTP: [Kind; 4] = [Kind::Bgswitch, Kind::BgswitchXdp, Kind::Nft, Kind::Haproxy];
    pub fn key(self) -> &'static str {
        match self {
            Kind::Bgswitch => "bgswitch",
            Kind::BgswitchXdp => "bgswitch_xdp",
            Kind::Nft => "nftables_dnat",
            Kind::Haproxy => "haproxy_tcp",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Kind::Bgswitch => "bgswitch (TC)",
            Kind::BgswitchXdp => "bgswitch (XDP, NIC-like veths)",
            Kind::Nft => "nftables DNAT",
            Kind::Haproxy => "HAProxy (mode tcp)",
        }
    }
    /// Why this system cannot run here, if it cannot.
    pub fn missing(self) -> Option<String> {
        let need = match self {
            Kind::Bgswitch | Kind::BgswitchXdp => return None,
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
    /// A watcher thread polled for the new state while the command ran
    /// (bgswitch, every other flip): its `command_ns` shares the CPUs with
    /// that polling, so command times are taken from the other flips.
    pub watched: bool,
}

/// One switcher on its own topology.
pub struct System {
    pub kind: Kind,
    pub topo: Topology,
    dir: PathBuf,
    switcher: Option<Switcher>,
    control: Option<ControlView>,
    nft: Option<NftDnat>,
    haproxy: Option<Haproxy>,
    active: Colour,
    /// bgswitch flips so far: every other one is watched (see `flip`).
    flips: u64,
}

impl System {
    pub fn create(kind: Kind) -> Result<System> {
        if let Some(why) = kind.missing() {
            bail!("{why}");
        }
        let mut topo = Topology::create(TopologyOptions {
            blue: 2,
            green: 2,
            like_physical_nics: kind == Kind::BgswitchXdp,
            ..TopologyOptions::default()
        })?;
        topo.start_servers(HTTP_PORT, UDP_PORT)?;
        let dir = PathBuf::from("/run/bgswitch-bench").join(topo.prefix());
        std::fs::create_dir_all(&dir)?;
        let cli = topo.client_ns().to_string();
        // Many short connections: a wide port range, reuse of TIME_WAIT ports.
        sys::ns_sysctl(&cli, "net.ipv4.ip_local_port_range", "1024 65000")?;
        sys::ns_sysctl(&cli, "net.ipv4.tcp_tw_reuse", "1")?;
        let mut s = System {
            kind,
            topo,
            dir,
            switcher: None,
            control: None,
            nft: None,
            haproxy: None,
            active: Colour::Blue,
            flips: 0,
        };
        match kind {
            Kind::Bgswitch | Kind::BgswitchXdp => {
                let sw = Switcher::new(&s.topo, &default_services(&s.topo))?;
                if kind == Kind::BgswitchXdp {
                    let text = std::fs::read_to_string(sw.config_path())?;
                    sw.write_config(&text.replace("attach = \"auto\"", "attach = \"xdp\""))?;
                }
                let mut sw = sw;
                sw.start()?;
                s.control = Some(ControlView::open(&sw.bpffs())?);
                s.switcher = Some(sw);
            }
            Kind::Nft => {
                s.nft = Some(NftDnat::start(&s.topo)?);
            }
            Kind::Haproxy => {
                s.haproxy = Some(Haproxy::start(&s.topo)?);
            }
        }
        // The VIP answers (from blue) before anything is measured.
        let ok = sys::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            crate::load::request(&cli, vip()).is_ok_and(|c| c == Colour::Blue)
        });
        ensure!(ok, "{}: the VIP does not answer from blue", kind.label());
        Ok(s)
    }

    /// The colour new flows go to now.
    pub fn active(&self) -> Colour {
        self.active
    }

    /// bgswitch's own account of its durable writes (its status), for
    /// the flips between two reads; None for the peers.
    pub fn durable_writes(&self) -> Option<bgswitch::api::DurableWrites> {
        let sw = self.switcher.as_ref()?;
        let r = bgswitch::cli::call(
            &sw.socket(),
            &bgswitch::api::Request::Status { service: None },
        )
        .ok()?;
        Some(r.status?.durable_writes)
    }

    /// Switches new flows to `to`, timing the whole command.
    pub fn flip(&mut self, to: Colour) -> Result<FlipTiming> {
        let t = match self.kind {
            Kind::Bgswitch | Kind::BgswitchXdp => self.flip_bgswitch(to)?,
            Kind::Nft => {
                let nft = self.nft.as_mut().context("no nftables ruleset")?;
                nft.set_active("web", to)?;
                nft.set_active("echo", to)?;
                let file = nft.ruleset()?;
                let mut cmd = nft.load_command(&file);
                let start_ns = sys::now_ns();
                nft.run_in_lb(&mut cmd)?;
                let end = sys::now_ns();
                FlipTiming {
                    start_ns,
                    command_ns: end - start_ns,
                    applied_ns: Some(end - start_ns),
                    watched: false,
                }
            }
            Kind::Haproxy => {
                let h = self.haproxy.as_ref().context("no haproxy")?;
                let line = h.flip_line(to);
                let exe = std::env::current_exe()?;
                let start_ns = sys::now_ns();
                let out = Command::new(exe)
                    .arg("--haproxy-api")
                    .arg(h.socket())
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
                    watched: false,
                }
            }
        };
        self.active = to;
        Ok(t)
    }

    /// bgswitch's flip, spawn to exit; every other flip also watched for
    /// the control word's change (a thread polling the mapped word, which
    /// takes CPU the command would have: those flips give the applied
    /// times, the others the command times).
    fn flip_bgswitch(&mut self, to: Colour) -> Result<FlipTiming> {
        self.flips += 1;
        let watch = self.flips.is_multiple_of(2);
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
            let watcher = watch.then(|| {
                s.spawn(|| {
                    // Poll the mapped words (a 10 µs sleep between reads, so the
                    // watcher takes little of a CPU).
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
                })
            });
            let start_ns = sys::now_ns();
            let out = cmd.output();
            let end = sys::now_ns();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let seen = watcher.and_then(|w| w.join().ok().flatten());
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
            watched: watch,
        })
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.haproxy = None;
        self.nft = None;
        self.control = None;
        self.switcher = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
