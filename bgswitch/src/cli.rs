//! The command line: argument definitions, the control-socket client and the
//! human-readable output.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand};

use crate::{
    api::{PreviewAction, Request, Response, Status},
    model::Colour,
    paths,
    state::JournalEntry,
};

#[derive(Parser, Debug)]
#[command(
    name = "bgswitch",
    version,
    about = "Kernel-level blue/green traffic switcher (XDP and TC)",
    long_about = "bgswitch switches new flows of a virtual IP:port between a blue and a green \
                  backend pool in the kernel's fast path (XDP on NICs, TC on veths, bridges \
                  and taps); open flows stay where they are until they end.\n\n\
                  Every command but `daemon` talks to the running daemon over its control \
                  socket: the `socket` of the config (--config, default \
                  /etc/bgswitch/bgswitch.toml), unless --socket or BGSWITCH_SOCKET names \
                  another.\n\n\
                  Durations are written like 500ms, 30s, 5m, 1h.\n\n\
                  Exit codes: 0 done; 1 refused or failed (nothing changed; the reason on \
                  stderr); 2 a wrong command line; 3 `flip --watch D --wait`: the watch rolled \
                  the flip back; 4 a wait ran out (--wait-drained, --fleet-wait); 5 no daemon \
                  answers at the socket (not running, or no permission)."
)]
pub struct Cli {
    /// The config file. The daemon runs from it; every other command finds
    /// the daemon's socket in it (its `socket` key) [default:
    /// /etc/bgswitch/bgswitch.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's control socket, instead of the config's `socket`.
    #[arg(long, global = true, env = "BGSWITCH_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load and attach the XDP and TC programs, serve the
    /// control socket. `--check`: validate the config and the host only.
    Daemon {
        /// Check the config as the daemon would (syntax, services, pools,
        /// limits, interfaces present) and print what it would serve;
        /// change nothing; exit 0 if it would start, 1 otherwise.
        #[arg(long)]
        check: bool,
    },
    /// Send new flows of SERVICE to the other colour (or the one given).
    Flip {
        /// The service (its `name` in the config).
        service: String,
        /// The colour new flows go to: blue or green (default: the one that
        /// is not active).
        #[arg(long, value_parser = parse_colour, value_name = "blue|green")]
        to: Option<Colour>,
        /// Also move open flows (they break: their backend changes), and
        /// switch even to a pool whose health checks fail, without running
        /// the service's before-flip checks (journalled as forced).
        #[arg(long)]
        force: bool,
        /// Why, for the journal (`history` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Watch the new colour this long (e.g. 5m) and switch back by itself
        /// if its health checks fail or its error rate passes --max-error-rate.
        #[arg(long, value_parser = parse_dur, value_name = "DURATION")]
        watch: Option<Duration>,
        /// With --watch: errors (backend RSTs + unanswered SYNs) per new flow,
        /// e.g. 0.05, that trigger the automatic rollback.
        #[arg(long, requires = "watch", value_name = "RATIO")]
        max_error_rate: Option<f64>,
        /// Switch back unless `bgswitch confirm SERVICE` arrives within this
        /// long (e.g. 10m).
        #[arg(long, value_parser = parse_dur, value_name = "DURATION")]
        confirm_within: Option<Duration>,
        /// With --watch: return only when the watch ends — exit 0 when it
        /// passed, 3 when it rolled the flip back (for pipelines).
        #[arg(long, requires = "watch")]
        wait: bool,
        /// One JSON event per line on stdout (the change, then what
        /// --wait, --wait-drained and --fleet-wait see), for pipelines.
        #[arg(long)]
        json: bool,
        /// Return only once the old colour has no live flows (or --timeout passes).
        #[arg(long)]
        wait_drained: bool,
        /// With --wait-drained: give up after this long (non-zero exit).
        #[arg(long, value_parser = parse_dur, default_value = "10m", requires = "wait_drained", value_name = "DURATION")]
        timeout: Duration,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Send PERCENT of new flows to the idle colour (0 ends the split).
    Shift {
        /// The service (its `name` in the config).
        service: String,
        /// The idle colour: blue or green.
        #[arg(long, value_parser = parse_colour, value_name = "blue|green")]
        to: Colour,
        /// 0 to 100, at most two decimals (steps of 0.01 %).
        #[arg(long)]
        percent: f64,
        /// Why, for the journal (`history` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Skip the service's before-flip checks (journalled as forced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Run SERVICE's before-flip checks (`[[service.check]]`) against a
    /// colour now and report each; changes nothing. Exit 0 when all
    /// passed, 1 otherwise.
    Check {
        /// The service (its `name` in the config).
        service: String,
        /// The colour under test (default: the idle one, as a flip would).
        #[arg(long, value_parser = parse_colour, value_name = "blue|green")]
        colour: Option<Colour>,
        /// Machine-readable output (one JSON array of runs).
        #[arg(long)]
        json: bool,
    },
    /// Print a shell's completion script for bgswitch: bash, zsh or fish
    /// (e.g. `bgswitch completions bash > /etc/bash_completion.d/bgswitch`).
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// New flows from these source prefixes always reach the idle colour.
    Preview {
        /// The service (its `name` in the config).
        service: String,
        /// add or del a prefix, or list the service's prefixes.
        #[arg(value_parser = ["add", "del", "list"])]
        action: String,
        /// ADDR/LEN (a bare address is one host), for add and del. Host
        /// bits are cleared, and the answer says what was stored.
        cidr: Option<String>,
        /// With add: accept a /0 prefix (every client: all new flows go to
        /// the idle colour, as a flip would send them).
        #[arg(long)]
        force: bool,
        /// Why, for the journal (`history` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Confirm a flip made with --confirm-within.
    Confirm {
        /// The service (its `name` in the config).
        service: String,
        /// Why, for the journal (`history` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// The journal of every change of SERVICE.
    History {
        /// The service (its `name` in the config).
        service: String,
        /// Machine-readable output (one JSON array).
        #[arg(long)]
        json: bool,
    },
    /// Take back SERVICE's last change of traffic; again, the one before it,
    /// and so on (the last 32).
    Undo {
        /// The service (its `name` in the config).
        service: String,
        /// Why, for the journal (`history` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Go back to the colour before the last flip.
    Rollback {
        /// The service (its `name` in the config).
        service: String,
        /// Why, for the journal (`history` shows it).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Show services, colours, flows, counters and interfaces.
    Status {
        /// Only this service (its `name` in the config); all without it.
        service: Option<String>,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
        /// The fleet's state and every host's view of it (`[fleet]`): per
        /// service and host, the generation applied, lag, health view, last
        /// seen, reachable.
        #[arg(long)]
        fleet: bool,
    },
    /// Make the daemon re-read its config (a bad config changes nothing).
    Reload,
    /// Every service live, refreshed each second: active colour, per colour
    /// packets/s, new flows/s, live flows, RSTs/s, unanswered SYNs, backend
    /// health, guards running. Needs only the socket. q quits.
    Top {
        /// How often it refreshes.
        #[arg(long, value_parser = parse_dur, default_value = "1s", value_name = "DURATION")]
        interval: Duration,
    },
    /// Run the frames of a pcap file through the XDP (or TC) program with the
    /// configured services and saved state, on private maps (the live flow
    /// table and counters are not touched): where would each packet go?
    /// Uses the running daemon's config (and so its state) unless --config
    /// names another.
    Simulate {
        /// Report only this service's frames; all without it.
        service: Option<String>,
        /// The capture to read (pcap, Ethernet frames).
        #[arg(long, value_name = "FILE")]
        pcap: PathBuf,
        /// Write the output frames here (pcap).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Machine-readable output (one JSON array).
        #[arg(long)]
        json: bool,
        /// Pretend the frames arrived on this interface (FIB decisions).
        #[arg(long, value_name = "IFACE")]
        ingress: Option<String>,
        /// The program the frames go through: xdp (as a physical NIC's
        /// frames) or tc (as a veth's, bridge's or tap's).
        #[arg(long, value_enum, default_value_t)]
        program: crate::simulate::Program,
    },
    /// Remove the programs and every pin (the daemon exits). Traffic to
    /// the VIPs is no longer switched.
    Detach {
        /// When no daemon answers: remove the pins under the config's
        /// `bpffs` anyway (refused while a daemon holds that data plane).
        #[arg(long)]
        force: bool,
    },
}

/// The exit codes of every command, for scripts and pipelines (also in the
/// README and `bgswitch --help`).
pub mod exit {
    /// Done (a watched flip waited for with `--wait`: its watch passed).
    pub const SUCCESS: i32 = 0;
    /// The daemon refused (or the command failed): the reason on stderr;
    /// nothing changed.
    pub const REFUSED: i32 = 1;
    /// The command line is wrong (clap's own code).
    pub const USAGE: i32 = 2;
    /// `flip --watch D --wait`: the watch rolled the flip back.
    pub const ROLLED_BACK: i32 = 3;
    /// A wait ran out: `--wait-drained` (`--timeout`), `--fleet-wait`.
    pub const TIMED_OUT: i32 = 4;
    /// No daemon answers at the socket (not running, or no permission).
    pub const UNREACHABLE: i32 = 5;
}

/// A client error that carries its exit code.
#[derive(Debug)]
pub struct Exit(pub i32, pub String);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Exit {}

/// The shells `completions` writes for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `bgswitch completions SHELL`: the script on stdout.
pub fn completions(shell: CompletionShell) {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    let out = &mut std::io::stdout();
    match shell {
        CompletionShell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "bgswitch", out)
        }
        CompletionShell::Zsh => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "bgswitch", out)
        }
        CompletionShell::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "bgswitch", out)
        }
    }
}

/// Writes `bgswitch.8` and `bgswitch-<command>.8` for every visible
/// subcommand into `dir`; returns the files written.
pub fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    let mut write = |name: String, c: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.8"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).section("8").render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("bgswitch-{}", sub.get_name());
        write(
            name.clone(),
            sub.clone()
                .display_name(name)
                .bin_name(format!("bgswitch {}", sub.get_name())),
        )?;
    }
    write("bgswitch".into(), cmd)?;
    Ok(written)
}

/// What a change of a fleet's state may add (`[fleet]` in the config).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FleetArgs {
    /// Return once every live host of the fleet has applied the change
    /// (or fail after this long, naming the hosts that have not).
    #[arg(long, value_parser = parse_dur, value_name = "DURATION")]
    pub fleet_wait: Option<Duration>,
    /// This host alone, now, without etcd (an emergency path: a rollback
    /// must never wait for a quorum). The host is marked diverged; when
    /// etcd answers again the fleet takes the change if it did not move
    /// meanwhile, else the fleet's state wins (journalled).
    #[arg(long, conflicts_with = "fleet_wait")]
    pub local: bool,
}

impl Cli {
    /// The config file given, or the packaged one.
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| paths::DEFAULT_CONFIG.into())
    }

    /// The daemon's socket and where it came from: --socket or
    /// BGSWITCH_SOCKET, else the config's `socket`, else the default. A
    /// config named with --config must be readable; the packaged one may
    /// be missing (then the default socket), and if it does not parse the
    /// default socket is tried with a warning.
    pub fn socket(&self) -> anyhow::Result<(PathBuf, String)> {
        if let Some(s) = &self.socket {
            return Ok((s.clone(), "given with --socket or BGSWITCH_SOCKET".into()));
        }
        let path = self.config_path();
        let from_default = |why: String| {
            (
                PathBuf::from(paths::DEFAULT_SOCKET),
                format!("the default socket: {why}"),
            )
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if self.config.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(from_default(format!("no config at {}", path.display())));
            }
            Err(e) => {
                return Err(anyhow!(
                    "{}: cannot read it to find the daemon's socket: {e} (or give --socket)",
                    path.display()
                ))
            }
        };
        match crate::config::socket_of(&path, &text) {
            Ok(Some(s)) => Ok((s, format!("the `socket` of {}", path.display()))),
            Ok(None) => Ok(from_default(format!("{} gives none", path.display()))),
            Err(e) if self.config.is_none() => {
                eprintln!("bgswitch: warning: {e}; trying the default socket");
                Ok(from_default(format!("{} does not parse", path.display())))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn parse_colour(s: &str) -> Result<Colour, String> {
    s.parse()
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// How a connection to the daemon's socket went.
pub enum Reach {
    Connected(UnixStream),
    /// Nothing listens there (no socket, or a stale one).
    NoDaemon(std::io::Error),
    /// The socket is there but not for this user.
    Denied(std::io::Error),
}

/// Connects to the daemon's socket.
pub fn reach(socket: &Path) -> Reach {
    match UnixStream::connect(socket) {
        Ok(s) => Reach::Connected(s),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Reach::Denied(e),
        Err(e) => Reach::NoDaemon(e),
    }
}

/// What to say when the socket refuses this user.
fn denied(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow!(
        "{}: {e}: the daemon's socket is for root and the members of its `socket_group` \
         (see the config); run this as root, or as a member of that group",
        socket.display()
    )
}

/// Sends one request and reads the response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    match reach(socket) {
        Reach::Connected(stream) => exchange(stream, req),
        Reach::Denied(e) => Err(denied(socket, &e)),
        Reach::NoDaemon(e) => Err(anyhow!(
            "no bgswitch daemon answers at {} ({e}): is it running?",
            socket.display()
        )),
    }
}

/// One request and its answer on a connected socket.
fn exchange(stream: UnixStream, req: &Request) -> anyhow::Result<Response> {
    // A flip, a shift or `check` may wait for the service's checks (each
    // at most 10 minutes, run in parallel).
    let answer_within = match req {
        Request::Flip { .. } | Request::Shift { .. } | Request::Check { .. } => {
            Duration::from_secs(11 * 60)
        }
        _ => Duration::from_secs(30),
    };
    stream.set_read_timeout(Some(answer_within))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut stream = stream;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    // The daemon may refuse (and close) before reading our request: then the
    // write fails, but its reason is waiting to be read.
    let written = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    if answer.is_empty() {
        written.context("sending the request to the daemon")?;
        read.context("reading the daemon's answer")?;
        return Err(anyhow!(
            "the daemon closed the connection without answering"
        ));
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid")
}

/// Runs a client command; returns the process exit code.
pub fn run_client(cli: &Cli) -> anyhow::Result<i32> {
    let mut wait: Option<(String, Duration)> = None;
    let mut watch_wait: Option<String> = None;
    let mut fleet_wait: Option<(String, Duration)> = None;
    let mut fleet_args = |service: &str, f: &FleetArgs| {
        fleet_wait = f.fleet_wait.map(|d| (service.to_string(), d));
        f.local
    };
    let (req, json) = match &cli.command {
        Command::Daemon { .. } => unreachable!("handled by main"),
        Command::Flip {
            service,
            to,
            force,
            reason,
            watch,
            max_error_rate,
            confirm_within,
            wait_drained,
            timeout,
            fleet,
            wait: wait_watch,
            json,
        } => {
            if *wait_watch {
                watch_wait = Some(service.clone());
            }
            if let Some(r) = max_error_rate {
                if !(0.0..=1000.0).contains(r) {
                    return Err(anyhow!(
                        "--max-error-rate {r}: must be a non-negative ratio like 0.05"
                    ));
                }
            }
            if *wait_drained {
                wait = Some((service.clone(), *timeout));
            }
            (
                Request::Flip {
                    service: service.clone(),
                    to: *to,
                    force: *force,
                    reason: reason.clone(),
                    watch_ms: watch.map(|d| d.as_millis() as u64),
                    max_error_rate: *max_error_rate,
                    confirm_within_ms: confirm_within.map(|d| d.as_millis() as u64),
                    local: fleet_args(service, fleet),
                },
                *json,
            )
        }
        Command::Shift {
            service,
            to,
            percent,
            reason,
            force,
            fleet,
        } => (
            Request::Shift {
                service: service.clone(),
                to: *to,
                percent: *percent,
                reason: reason.clone(),
                force: *force,
                local: fleet_args(service, fleet),
            },
            false,
        ),
        Command::Check {
            service,
            colour,
            json,
        } => (
            Request::Check {
                service: service.clone(),
                colour: *colour,
            },
            *json,
        ),
        Command::Completions { .. } => unreachable!("handled by main"),
        Command::Top { interval } => {
            let (socket, _) = cli.socket()?;
            return crate::top::run(
                || {
                    let r = call(&socket, &Request::Status { service: None })?;
                    r.status
                        .ok_or_else(|| anyhow!(r.error.unwrap_or_else(|| "no status".into())))
                },
                *interval,
            );
        }
        Command::Preview {
            service,
            action,
            cidr,
            force,
            reason,
            fleet,
        } => (
            Request::Preview {
                service: service.clone(),
                action: match action.as_str() {
                    "add" => PreviewAction::Add,
                    "del" => PreviewAction::Del,
                    _ => PreviewAction::List,
                },
                cidr: cidr.clone(),
                force: *force,
                reason: reason.clone(),
                local: fleet_args(service, fleet),
            },
            false,
        ),
        Command::Confirm {
            service,
            reason,
            fleet,
        } => (
            Request::Confirm {
                service: service.clone(),
                reason: reason.clone(),
                local: fleet_args(service, fleet),
            },
            false,
        ),
        Command::History { service, json } => (
            Request::History {
                service: service.clone(),
            },
            *json,
        ),
        Command::Undo {
            service,
            reason,
            fleet,
        } => (
            Request::Undo {
                service: service.clone(),
                reason: reason.clone(),
                local: fleet_args(service, fleet),
            },
            false,
        ),
        Command::Rollback {
            service,
            reason,
            fleet,
        } => (
            Request::Rollback {
                service: service.clone(),
                reason: reason.clone(),
                local: fleet_args(service, fleet),
            },
            false,
        ),
        Command::Status {
            service: _,
            json,
            fleet: true,
        } => (Request::Fleet, *json),
        Command::Status {
            service,
            json,
            fleet: false,
        } => (
            Request::Status {
                service: service.clone(),
            },
            *json,
        ),
        Command::Reload => (Request::Reload, false),
        Command::Simulate {
            service,
            pcap,
            out,
            json,
            ingress,
            program,
        } => {
            // The running daemon's config (it knows its path), unless
            // --config names another; the packaged path without a daemon.
            let config = match &cli.config {
                Some(c) => c.clone(),
                None => cli
                    .socket()
                    .ok()
                    .and_then(|(s, _)| call(&s, &Request::Status { service: None }).ok())
                    .and_then(|r| r.status)
                    .map_or_else(|| cli.config_path(), |s| PathBuf::from(s.config)),
            };
            let outcomes = crate::simulate::run(
                &config,
                pcap,
                out.as_deref(),
                service.as_deref(),
                ingress.as_deref(),
                *program,
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&outcomes)?);
            } else {
                print!("{}", crate::simulate::render(&outcomes));
            }
            return Ok(0);
        }
        Command::Detach { .. } => (Request::Detach, false),
    };
    let (socket, source) = cli.socket()?;
    let stream = match reach(&socket) {
        Reach::Connected(s) => s,
        Reach::Denied(e) => {
            return Err(Exit(exit::UNREACHABLE, format!("{:#}", denied(&socket, &e))).into())
        }
        Reach::NoDaemon(e) => {
            if let Command::Detach { force } = &cli.command {
                return detach_offline(&cli.config_path(), &socket, &source, *force);
            }
            return Err(Exit(
                exit::UNREACHABLE,
                format!(
                    "no bgswitch daemon answers at {} ({e}): is it running? (the socket is {source}; \
                     --socket overrides)",
                    socket.display()
                ),
            )
            .into());
        }
    };
    let resp = exchange(stream, &req)?;
    if let Some(runs) = &resp.checks {
        if json {
            println!("{}", serde_json::to_string_pretty(runs)?);
        } else if resp.ok {
            print!("{}", render_checks(runs));
        } else {
            eprint!("{}", render_checks(runs));
        }
    }
    if !resp.ok {
        eprintln!(
            "bgswitch: error: {}",
            resp.error.as_deref().unwrap_or("request failed")
        );
        return Ok(1);
    }
    if json {
        if let (Some(c), Request::Flip { service, .. }) = (&resp.change, &req) {
            println!(
                "{}",
                serde_json::json!({"event": "changed", "service": service, "change": c})
            );
        } else if resp.checks.is_some() {
        } else if let Some(f) = &resp.fleet {
            println!("{}", serde_json::to_string_pretty(f)?);
        } else if let Some(h) = &resp.history {
            println!("{}", serde_json::to_string_pretty(h)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&resp.status)?);
        }
    } else if let Some(f) = &resp.fleet {
        print!("{}", render_fleet(f));
    } else if let Some(status) = &resp.status {
        print!("{}", render_status(status));
    } else if let Some(h) = &resp.history {
        print!("{}", render_history(h));
    } else if let Some(p) = &resp.preview {
        for prefix in p {
            println!("{prefix}");
        }
    } else if let Some(m) = &resp.message {
        println!("{m}");
    }
    if let (Some((service, within)), Some(change)) = (fleet_wait, &resp.change) {
        let code = wait_fleet(&socket, &service, change.generation, within)?;
        if code != 0 {
            return Ok(code);
        }
    }
    let mut progress = Progress::new(json);
    if let (Some(service), Some(change)) = (watch_wait, &resp.change) {
        let code = wait_watch(&socket, &service, change.generation, &mut progress)?;
        if code != exit::SUCCESS {
            return Ok(code);
        }
    }
    if let (Some((service, timeout)), Some(change)) = (wait, &resp.change) {
        return wait_drained(&socket, &service, change.from, timeout, &mut progress);
    }
    Ok(0)
}

/// How a long wait reports as it goes: on a terminal one line rewritten
/// in place; otherwise a plain line when what it says changes (at most
/// every 10 s); with `--json` one JSON event per line on stdout, for
/// pipelines.
pub struct Progress {
    mode: ProgressMode,
    said: Option<(std::time::Instant, String)>,
}

enum ProgressMode {
    Tty,
    Plain,
    Json,
}

impl Progress {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal as _;
        Self {
            mode: if json {
                ProgressMode::Json
            } else if std::io::stderr().is_terminal() {
                ProgressMode::Tty
            } else {
                ProgressMode::Plain
            },
            said: None,
        }
    }

    /// How it stands now (`text` for people, `event` for pipelines).
    pub fn update(&mut self, text: &str, event: serde_json::Value) {
        match self.mode {
            ProgressMode::Json => println!("{event}"),
            ProgressMode::Tty => eprint!("\r{text}\x1b[K"),
            ProgressMode::Plain => {
                let due = self.said.as_ref().is_none_or(|(at, last)| {
                    last != text && at.elapsed() >= Duration::from_secs(10)
                });
                if due {
                    eprintln!("{text}");
                    self.said = Some((std::time::Instant::now(), text.to_string()));
                }
            }
        }
    }

    /// The end of the wait: said once, on stdout (stderr for `failed`).
    pub fn finish(&mut self, text: &str, event: serde_json::Value, failed: bool) {
        match self.mode {
            ProgressMode::Json => println!("{event}"),
            ProgressMode::Tty | ProgressMode::Plain => {
                if matches!(self.mode, ProgressMode::Tty) && self.said.is_none() {
                    eprint!("\r\x1b[K");
                }
                if failed {
                    eprintln!("bgswitch: error: {text}");
                } else {
                    println!("{text}");
                }
            }
        }
    }
}

/// One service's status, as a wait polls it.
fn service_status(socket: &Path, service: &str) -> anyhow::Result<crate::api::ServiceStatus> {
    let resp = call(
        socket,
        &Request::Status {
            service: Some(service.to_string()),
        },
    )?;
    resp.status
        .and_then(|s| s.services.into_iter().next())
        .ok_or_else(|| {
            anyhow!(
                "no status for {service}: {}",
                resp.error.as_deref().unwrap_or("")
            )
        })
}

/// `flip --watch D --wait`: polls the service until its watch ends; exit 0
/// when it passed, 3 when it rolled the flip (generation `flipped`) back.
/// Shows the time left and the watched colour's signals (new flows, backend
/// RSTs, unanswered SYNs, health) as it goes.
fn wait_watch(
    socket: &Path,
    service: &str,
    flipped: u64,
    progress: &mut Progress,
) -> anyhow::Result<i32> {
    loop {
        let s = service_status(socket, service)?;
        let s = &s;
        let rolled_back = s.last_change.as_ref().is_some_and(|c| {
            c.kind == crate::model::ChangeKind::AutoRollback && c.generation_before >= flipped
        });
        if rolled_back {
            let why = s.rolled_back.clone().unwrap_or_default();
            progress.finish(
                &format!("{service}: ROLLED BACK by the watch: {why}"),
                serde_json::json!({"event": "rolled_back", "service": service, "active": s.active, "why": why}),
                true,
            );
            return Ok(exit::ROLLED_BACK);
        }
        match &s.watch {
            Some(w) if s.generation >= flipped => {
                let left = w.until_ms.saturating_sub(crate::state::now_ms()) / 1000;
                let c = s.colours.iter().find(|c| c.colour == w.colour);
                let (new, rsts, unanswered) = c.map_or((0, 0, 0), |c| {
                    (c.new_flows, c.backend_rsts, c.unanswered_syns)
                });
                let health = c.map_or(String::new(), |c| {
                    if s.health_checks {
                        format!(
                            ", health {}/{} up",
                            c.backends
                                .iter()
                                .filter(|b| b.health == crate::health::Health::Up)
                                .count(),
                            c.backends.len()
                        )
                    } else {
                        String::new()
                    }
                });
                progress.update(
                    &format!(
                        "{service}: watching {} — {left} s left; {new} new flows, {rsts} backend RSTs, {unanswered} unanswered SYNs{health}",
                        w.colour
                    ),
                    serde_json::json!({"event": "watch", "service": service, "colour": w.colour, "left_s": left,
                        "new_flows": new, "backend_rsts": rsts, "unanswered_syns": unanswered}),
                );
            }
            _ => {
                let text = if s.generation != flipped {
                    format!(
                        "{service}: the watch ended (generation {} now: changed since the flip)",
                        s.generation
                    )
                } else {
                    format!("{service}: the watch passed; {} stays", s.active)
                };
                progress.finish(
                    &text,
                    serde_json::json!({"event": "watch_passed", "service": service, "active": s.active, "generation": s.generation}),
                    false,
                );
                return Ok(exit::SUCCESS);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the fleet until every live host has applied `generation` of
/// `service` (exit 0), or `within` passes (exit 1, naming those that
/// have not).
fn wait_fleet(
    socket: &Path,
    service: &str,
    generation: u64,
    within: Duration,
) -> anyhow::Result<i32> {
    let start = std::time::Instant::now();
    loop {
        let resp = call(socket, &Request::Fleet)?;
        let Some(f) = resp.fleet else {
            return Err(anyhow!(
                "--fleet-wait: {}",
                resp.error.as_deref().unwrap_or("no fleet status")
            ));
        };
        let behind = f.behind(service, generation);
        if behind.is_empty() {
            println!(
                "{service}: generation {generation} applied by every live host ({}) after {:.3} s",
                f.hosts.iter().filter(|h| h.live).count(),
                start.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if start.elapsed() >= within {
            eprintln!(
                "bgswitch: error: {service}: generation {generation} not applied within {within:?} by: {}",
                behind.join(", ")
            );
            return Ok(exit::TIMED_OUT);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The text form of `status --fleet`.
pub fn render_fleet(f: &crate::state::FleetStatus) -> String {
    let l = &f.local;
    let mut out = format!(
        "fleet {} (this host: {}), etcd {}: {}\n",
        l.cluster,
        l.host,
        l.etcd.join(", "),
        if l.reachable {
            "reachable".to_string()
        } else {
            format!(
                "UNREACHABLE{}{}",
                l.unreachable_since_ms
                    .map(|s| format!(" since {} UTC", unix_time(s / 1000)))
                    .unwrap_or_default(),
                l.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        }
    );
    if !l.diverged.is_empty() {
        out += &format!("  DIVERGED here (--local): {}\n", l.diverged.join(", "));
    }
    for s in &f.services {
        out += &format!(
            "{}  generation {}  active: {}{}\n",
            s.name,
            s.generation,
            s.active.map_or("?".into(), |c| c.to_string()),
            s.changed_by
                .as_deref()
                .map(|c| format!("  (last: {c})"))
                .unwrap_or_default()
        );
        if !s.mismatched.is_empty() {
            out += &format!(
                "  DEFINITIONS DIFFER on {}: changes are refused until they agree (or --force)\n",
                s.mismatched.join(", ")
            );
        }
        for h in &f.hosts {
            let applied = h.report.applied.get(&s.name).copied();
            let health = h
                .report
                .unhealthy
                .get(&s.name)
                .map(|m| {
                    m.iter()
                        .map(|(c, b)| format!("{c}: {}", b.join(", ")))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_else(|| "all up".into());
            out += &format!(
                "  {:<16} applied {:<6} lag {:<4} {:<10} last seen {:.1} s ago  health: {}{}\n",
                h.report.host,
                applied.map_or("-".into(), |a| a.to_string()),
                applied.map_or("-".into(), |a| s.generation.saturating_sub(a).to_string()),
                if h.live { "reachable" } else { "GONE" },
                h.last_seen_ms_ago as f64 / 1000.0,
                health,
                if h.report.diverged.contains(&s.name) {
                    "  DIVERGED (--local)"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// Polls status until `colour` of `service` has no live flows.
fn wait_drained(
    socket: &Path,
    service: &str,
    colour: Colour,
    timeout: Duration,
    progress: &mut Progress,
) -> anyhow::Result<i32> {
    let start = std::time::Instant::now();
    loop {
        let (live, untracked) = service_status(socket, service)?
            .colours
            .iter()
            .find(|c| c.colour == colour)
            .map(|c| (c.live_flows, c.untracked))
            .ok_or_else(|| anyhow!("no status for {service}'s {colour}"))?;
        let elapsed = start.elapsed().as_secs_f64();
        if live == 0 && !untracked {
            progress.finish(
                &format!("{service}: {colour} drained after {elapsed:.1}s"),
                serde_json::json!({"event": "drained", "service": service, "colour": colour, "after_s": elapsed}),
                false,
            );
            return Ok(0);
        }
        if start.elapsed() >= timeout {
            let text = if untracked {
                format!(
                    "{service}: {colour} may still have connections of its stateless period after {timeout:?} ({live} recorded live): it is drained once the transition is over, a TCP idle timeout after the change"
                )
            } else {
                format!("{service}: {live} flows still live on {colour} after {timeout:?}")
            };
            progress.finish(
                &text,
                serde_json::json!({"event": "drain_timed_out", "service": service, "colour": colour, "live_flows": live}),
                true,
            );
            return Ok(exit::TIMED_OUT);
        }
        progress.update(
            &format!(
                "{service}: draining {colour}: {live} live flow{}{} ({elapsed:.0} s)",
                if live == 1 { "" } else { "s" },
                if untracked { " (and its stateless period's)" } else { "" }
            ),
            serde_json::json!({"event": "draining", "service": service, "colour": colour, "live_flows": live, "elapsed_s": elapsed}),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The report of the user's checks that ran for a request: one line per
/// run, then the tail of the output of each that did not pass.
pub fn render_checks(runs: &[crate::model::CheckRecord]) -> String {
    let mut out = String::new();
    for r in runs {
        out += &format!(
            "check {:<20} {:<6} {} ({:.1} s)\n",
            r.name,
            r.colour.to_string(),
            r.outcome,
            r.duration_ms as f64 / 1000.0
        );
        if !r.outcome.passed() {
            for l in r
                .output
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                out += &format!("    | {l}\n");
            }
        }
    }
    out
}

/// The text form of `history`.
pub fn render_history(h: &[JournalEntry]) -> String {
    let mut out = String::new();
    for e in h {
        let c = &e.change;
        let secs = c.at_ms / 1000;
        out += &format!(
            "{} gen {}→{} {:<18} {}→{} canary {:.2}% preview [{}] by {}{}{}{}{}\n",
            unix_time(secs),
            c.generation_before,
            c.generation,
            c.kind.to_string(),
            c.from,
            c.to,
            f64::from(c.after.canary_bp) / 100.0,
            c.after.preview.join(","),
            c.user,
            match (&c.host, c.local) {
                (Some(h), false) => format!(" on {h}"),
                (Some(h), true) => format!(" on {h} alone (--local)"),
                (None, true) => " on this host alone (--local)".to_string(),
                (None, false) => String::new(),
            },
            if c.forced { " (forced)" } else { "" },
            c.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            if e.outcome == "ok" {
                String::new()
            } else {
                format!(" [{}]", e.outcome)
            },
        );
        for r in &c.checks {
            out += &format!("    {}\n", r.describe());
        }
    }
    if out.is_empty() {
        out = "no changes recorded\n".into();
    }
    out
}

/// UTC "YYYY-MM-DD HH:MM:SS" of a Unix time (civil-from-days).
fn unix_time(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `detach` when no daemon answers at `socket`: the pins go only with
/// `--force`, and never while a daemon holds the data plane (one that
/// listens on another socket, say).
fn detach_offline(config: &Path, socket: &Path, source: &str, force: bool) -> anyhow::Result<i32> {
    let c = crate::config::load(config)?;
    let pins = c.bpffs.join(paths::PIN_DIR);
    // Where a daemon started like this command put them (through an outer
    // mount namespace when this one is private, as `ip netns exec` makes).
    let place =
        crate::dataplane::locate_pins(&c.bpffs).filter(|p| p.root.join(paths::PIN_DIR).exists());
    let Some(place) = place else {
        println!(
            "no daemon answered at {}, and nothing is pinned under {}: nothing to detach",
            socket.display(),
            pins.display()
        );
        return Ok(0);
    };
    let _lock = match crate::dataplane::lock_pins(&place.root) {
        Ok(lock) => lock,
        Err(crate::dataplane::DataplaneError::Held { pid, .. }) => {
            eprintln!(
                "bgswitch: error: no daemon answered at {} ({source}), but a bgswitch daemon{} \
                 holds the data plane under {}: nothing removed. Reach it on its own socket \
                 (--config with its config, or --socket), or stop it first",
                socket.display(),
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                pins.display()
            );
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    if !force {
        eprintln!(
            "bgswitch: error: no daemon answered at {} ({source}); the data plane under {} \
             keeps switching without one. `bgswitch detach --force` removes its pins: the \
             programs detach and traffic to the VIPs is no longer switched",
            socket.display(),
            pins.display()
        );
        return Ok(1);
    }
    crate::dataplane::remove_pins(&place.root)?;
    println!(
        "no daemon answered; removed the pins under {} ({}): the programs are detached (run it in the daemon's network namespace for netlink filters)",
        pins.display(),
        place.note
    );
    Ok(0)
}

/// The text form of `status`.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    for svc in &s.services {
        out += &format!(
            "{}  {}/{}  active: {}  generation {}{}\n",
            svc.name,
            svc.vip,
            svc.protocol,
            svc.active,
            svc.generation,
            svc.previous
                .map(|p| format!("  (rollback → {p})"))
                .unwrap_or_default()
        );
        match svc.fast_path.as_str() {
            "stateless" => {
                out += "  stateless: packets follow the active pool's hash; flows are not recorded (live flows of the active colour are not counted)
"
            }
            "transition" => {
                out += "  transition: flows are recorded; connections of the last stateless period keep its pool until a TCP idle timeout has passed
";
                if let Some(t) = &svc.transition {
                    out += &format!(
                        "  transition for {} s (idle timeout {} s); {} recorded connection{} on another backend than the active pool's hash chooses{}
",
                        t.since_s,
                        t.idle_timeout_s,
                        t.disagreeing,
                        if t.disagreeing == 1 { "" } else { "s" },
                        match t.disagreeing {
                            0 => "",
                            1 => ": the stable period waits for it to end",
                            _ => ": the stable period waits for them to end",
                        }
                    );
                }
            }
            _ => {}
        }
        if svc.canary_percent > 0.0 {
            out += &format!(
                "  canary: {:.2}% of new flows to {}\n",
                svc.canary_percent,
                svc.active.other()
            );
        }
        if !svc.preview.is_empty() {
            out += &format!(
                "  preview → {}: {}\n",
                svc.active.other(),
                svc.preview.join(", ")
            );
        }
        if let Some(w) = &svc.watch {
            out += &format!(
                "  watching {} until {} UTC{}\n",
                w.colour,
                unix_time(w.until_ms / 1000),
                w.max_error_rate
                    .map(|r| format!(", max error rate {r}"))
                    .unwrap_or_default()
            );
        }
        if let Some(c) = &svc.confirm {
            out += &format!(
                "  WAITING FOR CONFIRMATION of {} until {} UTC (bgswitch confirm {})\n",
                c.colour,
                unix_time(c.deadline_ms / 1000),
                svc.name
            );
        }
        if let Some(r) = &svc.rolled_back {
            out += &format!("  ROLLED BACK automatically: {r}\n");
        }
        for c in &svc.colours {
            out += &format!(
                "  {}{:<6} live flows {:<6} new flows {:<8} packets {:<10} bytes {:<12} replies {:<8} RSTs {} unanswered SYNs {}{}\n",
                if c.active { "*" } else { " " },
                c.colour.to_string(),
                if c.untracked {
                    format!("{}+", c.live_flows)
                } else {
                    c.live_flows.to_string()
                },
                c.new_flows,
                c.packets,
                c.bytes,
                c.reply_packets,
                c.backend_rsts,
                c.unanswered_syns,
                if c.all_down {
                    "  NO HEALTHY BACKEND"
                } else if !c.pool_healthy {
                    "  (pool not healthy)"
                } else {
                    ""
                }
            );
            for b in &c.backends {
                out += &format!(
                    "           {:<24} {:<8} new flows {:<8} packets {:<10} replies {}{}\n",
                    b.address,
                    if svc.health_checks {
                        format!("{:?}", b.health).to_lowercase()
                    } else {
                        String::new()
                    },
                    b.new_flows,
                    b.packets,
                    b.reply_packets,
                    b.health_error
                        .as_deref()
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default()
                );
            }
        }
        for c in &svc.checks {
            let when: Vec<String> = c.when.iter().map(ToString::to_string).collect();
            out += &format!(
                "  check {:<20} ({}, as {}){}: {}\n",
                c.name,
                when.join(", "),
                c.user,
                if c.running { " RUNNING" } else { "" },
                match &c.last {
                    None => "not run yet".to_string(),
                    Some(r) => format!(
                        "last {} against {} at {} UTC: {} ({:.1} s)",
                        r.phase,
                        r.colour,
                        unix_time(r.at_ms / 1000),
                        r.outcome,
                        r.duration_ms as f64 / 1000.0
                    ),
                }
            );
        }
        if let Some(ch) = &svc.last_change {
            out += &format!(
                "  last change: {} {} → {} by {}{}\n",
                ch.kind,
                ch.from,
                ch.to,
                ch.user,
                ch.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(f) = &s.fleet {
        out += &format!(
            "fleet {} (this host: {}): etcd {}{}\n",
            f.cluster,
            f.host,
            if f.reachable {
                "reachable".to_string()
            } else {
                format!(
                    "UNREACHABLE{}: serving the state last applied; changes need --local",
                    f.unreachable_since_ms
                        .map(|t| format!(" since {} UTC", unix_time(t / 1000)))
                        .unwrap_or_default()
                )
            },
            if f.diverged.is_empty() {
                String::new()
            } else {
                format!("; DIVERGED (--local): {}", f.diverged.join(", "))
            }
        );
    }
    if let Some(p) = &s.pins {
        out += &format!(
            "pins: {} ({}): {}\n",
            p.bpffs,
            p.note,
            if p.outlive_daemon {
                "the data plane outlives the daemon"
            } else {
                "the data plane goes with the daemon"
            }
        );
    }
    out += "interfaces:";
    if s.interfaces.is_empty() {
        out += " none";
    }
    for i in &s.interfaces {
        out += &format!(
            " {} ({}{})",
            i.name,
            i.mode.as_str(),
            if i.adopted { ", adopted" } else { "" }
        );
    }
    out += "\n";
    for i in &s.interfaces {
        out += &format!("  {}: {}: {}", i.name, i.mode.describe(), i.reason);
        if let Some(f) = &i.fallback_reason {
            out += &format!(" ({f})");
        }
        out += "\n";
    }
    let nonzero: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out += &format!(
        "counters: {}\n",
        if nonzero.is_empty() {
            "all zero".to_string()
        } else {
            nonzero.join(" ")
        }
    );
    out
}
