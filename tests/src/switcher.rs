//! Runs the real `bgswitch daemon` inside a topology's load-balancer namespace
//! and drives it with the real CLI.
//!
//! Everything lives under `/run/bgswitch-test/<prefix>/`: a bpffs mounted at
//! `bpf/` in the host's mount namespace (so pins outlive a killed daemon,
//! which runs under `ip netns exec` in a mount namespace of its own), the
//! state directory, the socket, the config and the daemon's log. `Drop` kills
//! the daemon, detaches (removes the pins), unmounts and deletes the
//! directory, also when a test panics.

use std::{
    ffi::CString,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::topology::{Colour, Topology, TopologyOptions, LB_BACKEND_IF, LB_CLIENT_IF, VIP, VIP6};

/// Port of the HTTP service on the VIP and on every backend.
pub const HTTP_PORT: u16 = 8080;
/// Port of the UDP echo service on the VIP and on every backend.
pub const UDP_PORT: u16 = 5353;

/// A `[service.health]` table of quick HTTP checks (every 200 ms, down
/// after two failures, up after two successes), for the service table it
/// follows.
pub const HEALTH: &str = "[service.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n";

/// Where the `bgswitch` binary is: `$BGSWITCH_BIN`, else next to the test
/// binary's `deps/` directory (`target/<profile>/bgswitch`).
/// The niceness the packaged unit gives the daemon (`Nice=` of
/// packaging/bgswitch.service, 0 without one): daemons started here run
/// with it, as installed.
pub fn daemon_nice() -> i32 {
    include_str!("../../packaging/bgswitch.service")
        .lines()
        .find_map(|l| l.strip_prefix("Nice="))
        .map_or(0, |v| {
            v.trim().parse().expect("the unit's Nice= is a number")
        })
}

pub fn bgswitch_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BGSWITCH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("no profile directory")?;
    }
    let bin = dir.join("bgswitch");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (`cargo build -p bgswitch`) or set BGSWITCH_BIN; \
             `cargo xtask test` does both",
            bin.display()
        );
    }
    Ok(bin)
}

/// The `[[service]]` tables for a topology: an HTTP service and a UDP echo
/// service on the VIP, each with the topology's blue and green backends.
pub fn default_services(topo: &Topology) -> String {
    let pool = |c: Colour, port: u16| {
        topo.backends()
            .iter()
            .filter(|b| b.colour == c)
            .map(|b| format!("\"{}:{port}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}:{HTTP_PORT}\"\nprotocol = \"tcp\"\nblue = [{}]\ngreen = [{}]\n\n\
         [[service]]\nname = \"echo\"\nvip = \"{VIP}:{UDP_PORT}\"\nprotocol = \"udp\"\nblue = [{}]\ngreen = [{}]\n",
        pool(Colour::Blue, HTTP_PORT),
        pool(Colour::Green, HTTP_PORT),
        pool(Colour::Blue, UDP_PORT),
        pool(Colour::Green, UDP_PORT),
    )
}

/// The IPv6 twins of [`default_services`]: `web6` (HTTP) and `echo6` (UDP
/// echo) on `[VIP6]` and the same ports, with every backend's IPv6 address.
pub fn v6_services(topo: &Topology) -> String {
    let pool = |c: Colour, port: u16| {
        topo.backends_of(c)
            .map(|b| format!("\"[{}]:{port}\"", b.addr6))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[service]]\nname = \"web6\"\nvip = \"[{VIP6}]:{HTTP_PORT}\"\nprotocol = \"tcp\"\nblue = [{}]\ngreen = [{}]\n\n\
         [[service]]\nname = \"echo6\"\nvip = \"[{VIP6}]:{UDP_PORT}\"\nprotocol = \"udp\"\nblue = [{}]\ngreen = [{}]\n",
        pool(Colour::Blue, HTTP_PORT),
        pool(Colour::Green, HTTP_PORT),
        pool(Colour::Blue, UDP_PORT),
        pool(Colour::Green, UDP_PORT),
    )
}

/// IPv4 and IPv6 services side by side in one daemon: `web`, `echo`
/// ([`default_services`]), then `web6`, `echo6` ([`v6_services`]).
pub fn dual_stack_services(topo: &Topology) -> String {
    format!("{}\n{}", default_services(topo), v6_services(topo))
}

/// Colour ("blue"/"green") of a test server's response body "colour name\n"
/// (or of a UDP echo "colour name payload").
pub fn colour(body: &str) -> &str {
    body.split_whitespace().next().unwrap_or("")
}

/// The service called `name` in a `status --json` answer.
///
/// # Panics
/// If there is none (a bug in the calling test).
pub fn service<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name:?} in status: {status}"))
}

/// Fails the calling test unless it runs as root: privileged tests run for
/// real (in CI too) and are never skipped.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged test: run as root (cargo xtask test)"
    );
}

/// The served test bed with a daemon running on it for the default
/// services (fails the calling test unless it runs as root).
pub fn served_and_started() -> (Topology, Switcher) {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let mut sw = Switcher::new(&topo, &default_services(&topo)).expect("switcher");
    sw.start().expect("daemon starts");
    (topo, sw)
}

/// The test bed the switching tests and the demo use: the default topology
/// (two blue and two green backends behind a bridge) with HTTP and UDP
/// servers on every backend, every namespace with the kernel's default
/// offloads (a veth hands TCP/UDP over with partial checksums, and TSO
/// segments larger than the MTU): as containers and VMs send.
pub fn served_topology() -> Result<Topology> {
    served_topology_with(TopologyOptions::default())
}

/// Like [`served_topology`], built with `opts`.
pub fn served_topology_with(opts: TopologyOptions) -> Result<Topology> {
    let mut topo = Topology::create(opts)?;
    topo.start_servers(HTTP_PORT, UDP_PORT)?;
    Ok(topo)
}

/// Requests in a loop on a thread of their own: `GET /` on a new
/// connection each from namespace `ns` to `addr`, each answer checked to
/// come from `colour`, until [`RequestLoad::stop`] (or 60 s).
pub struct RequestLoad {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 3]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a [`RequestLoad`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadCounts {
    /// Answered by the expected colour.
    pub ok: u64,
    /// Answered by the other colour.
    pub wrong: u64,
    /// Failed (connect, timeout, reset, a bad answer); each is printed.
    pub failed: u64,
}

impl RequestLoad {
    pub fn start(ns: &str, addr: impl Into<SocketAddr>, colour: Colour) -> Self {
        let addr = addr.into();
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let thread = {
            let (stop, counts, ns) = (stop.clone(), counts.clone(), ns.to_owned());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let i = match crate::http_get(&ns, addr, "/") {
                        Ok(r) if self::colour(&r.body) == colour.as_str() => 0,
                        Ok(_) => 1,
                        Err(e) => {
                            eprintln!("request to {addr} failed: {e:#}");
                            2
                        }
                    };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self {
            stop,
            counts,
            thread: Some(thread),
        }
    }

    /// What it saw so far.
    pub fn counts(&self) -> LoadCounts {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        LoadCounts {
            ok: c(0),
            wrong: c(1),
            failed: c(2),
        }
    }

    /// Stops the loop and returns what it saw.
    pub fn stop(mut self) -> LoadCounts {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        self.counts()
    }
}

impl Drop for RequestLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The output of one CLI call.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A `bgswitch daemon` running in a topology's lb namespace.
pub struct Switcher {
    dir: PathBuf,
    lb_ns: String,
    bin: PathBuf,
    child: Option<Child>,
    mounted: bool,
}

impl Switcher {
    /// Prepares the directory, mounts the bpffs and writes a config with the
    /// topology's two lb interfaces and `services` (TOML `[[service]]` tables).
    /// Does not start the daemon.
    pub fn new(topo: &Topology, services: &str) -> Result<Self> {
        Self::prepared(topo, services, true)
    }

    /// Like [`Switcher::new`], but leaves the bpffs unmounted: the daemon,
    /// started with `ip netns exec` (a private mount namespace), must mount
    /// it where it outlives it. Unmounted on drop all the same.
    pub fn new_unmounted(topo: &Topology, services: &str) -> Result<Self> {
        Self::prepared(topo, services, false)
    }

    /// A daemon of a second load-balancer host beside `topo`'s: in
    /// namespace `ns`, with a directory of its own (`<prefix>-<tag>`), and
    /// the same interface names (each namespace has its own `lbc`, `lbb`).
    pub fn new_in(topo: &Topology, ns: &str, tag: &str, services: &str) -> Result<Self> {
        let mut s = Self::prepared_at(topo, &format!("{}-{tag}", topo.prefix()), services, true)?;
        s.lb_ns = ns.to_string();
        Ok(s)
    }

    fn prepared(topo: &Topology, services: &str, mount: bool) -> Result<Self> {
        Self::prepared_at(topo, topo.prefix(), services, mount)
    }

    fn prepared_at(topo: &Topology, name: &str, services: &str, mount: bool) -> Result<Self> {
        let bin = bgswitch_bin()?;
        remove_stale_dirs();
        let dir = PathBuf::from("/run/bgswitch-test").join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bpf"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut s = Self {
            dir,
            lb_ns: topo.lb_ns().to_string(),
            bin,
            child: None,
            mounted: false,
        };
        // The daemon's own mounting code, run in the host's mount namespace.
        if mount {
            bgswitch::dataplane::ensure_bpffs(&s.bpffs())?;
        }
        // Unmounted on drop either way (the daemon mounts it otherwise).
        s.mounted = true;
        s.write_config(&s.config_text(services))?;
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpf")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bgswitch.sock")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("bgswitch.toml")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// A full config for this switcher with the given services.
    pub fn config_text(&self, services: &str) -> String {
        format!(
            "interfaces = [\"{LB_CLIENT_IF}\", \"{LB_BACKEND_IF}\"]\n\
             attach = \"auto\"\n\
             socket = \"{}\"\n\
             state_dir = \"{}\"\n\
             bpffs = \"{}\"\n\
             max_flows = 65536\n\
             udp_idle_timeout = \"30s\"\n\n{services}",
            self.socket().display(),
            self.state_dir().display(),
            self.bpffs().display(),
        )
    }

    pub fn write_config(&self, text: &str) -> Result<()> {
        fs::write(self.config_path(), text).context("writing the config")
    }

    /// Starts the daemon and waits until it answers `status`.
    pub fn start(&mut self) -> Result<()> {
        self.start_with_env(&[])
    }

    /// Like [`Switcher::start`], with extra environment for the daemon
    /// (e.g. fault injection).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        if self.child.is_some() {
            bail!("daemon already running");
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lb_ns])
            .args(["nice", "-n", &daemon_nice().to_string()])
            .arg(&self.bin)
            .arg("daemon")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning bgswitch daemon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "daemon exited with {status} while starting:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(out) = self.cli(&["status"]) {
                if out.code == 0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("daemon did not answer within 20 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a daemon expecting it to fail; returns its exit code and log.
    /// A daemon still running after 20 s is killed and reported as an error
    /// (it started), so a regression fails the test instead of hanging it.
    pub fn start_expect_failure(&self) -> Result<(i32, String)> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.lb_ns])
            .arg(&self.bin)
            .arg("daemon")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning bgswitch daemon")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the daemon was expected to fail, but it is still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read as _;
            e.read_to_string(&mut err)?;
        }
        Ok((status.code().unwrap_or(-1), err))
    }

    /// The daemon's pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most 10 s, then SIGKILL).
    pub fn stop(&mut self) -> Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s.code());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("daemon ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the daemon to exit by itself (e.g. after `detach`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                self.child = None;
                return Ok(s.code());
            }
            if Instant::now() > deadline {
                bail!("daemon still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `bgswitch --socket <ours> ARGS...` (from the host namespace).
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput> {
        let out = Command::new(&self.bin)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running the bgswitch CLI")?;
        Ok(CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the CLI and fails unless it exits 0.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if out.code != 0 {
            bail!(
                "bgswitch {args:?} exited {}: {}{}",
                out.code,
                out.stdout,
                out.stderr
            );
        }
        Ok(out.stdout)
    }

    /// `bgswitch status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let text = self.cli_ok(&["status", "--json"])?;
        serde_json::from_str(&text).context("status --json is not JSON")
    }

    /// Polls `status --json` until `pred` holds (at most `within`), and
    /// returns that status; fails the calling test, naming `what`, the last
    /// status and the log's tail, otherwise.
    ///
    /// # Panics
    /// When `pred` does not hold in time, or the daemon does not answer.
    pub fn wait_for(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let st = self.status().expect("status --json");
            if pred(&st) {
                return st;
            }
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}\n{st:#}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last 40 lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The whole daemon log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Switcher {
    fn drop(&mut self) {
        self.kill();
        // Offline detach (--force: no daemon answers): removes the pinned
        // links (detaching the programs) and maps.
        let _ = Command::new(&self.bin)
            .arg("--socket")
            .arg(self.dir.join("no-daemon.sock"))
            .arg("detach")
            .arg("--force")
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if self.mounted {
            if let Ok(c) = CString::new(self.bpffs().as_os_str().as_encoded_bytes()) {
                // SAFETY: valid path; lazy unmount.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes what switchers of dead test processes left under
/// /run/bgswitch-test (a test killed before its Drop ran).
fn remove_stale_dirs() {
    let Ok(rd) = fs::read_dir("/run/bgswitch-test") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dead =
            crate::topology::prefix_pid(&name).is_some_and(|pid| !crate::topology::pid_alive(pid));
        if dead {
            if let Ok(c) = CString::new(e.path().join("bpf").as_os_str().as_encoded_bytes()) {
                // SAFETY: valid path; lazy unmount of a leftover bpffs.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
