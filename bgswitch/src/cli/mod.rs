//! The command line: argument definitions (this file) and what each command
//! does with the daemon (`run_client`); the socket client (`client.rs`), the
//! waits after a change (`wait.rs`), text output (`render.rs`), exit codes
//! (`exit_codes.rs`), completions and man pages (`docs.rs`). The commands
//! that need the data plane or draw a terminal UI run in the full binary
//! (`local.rs`); the client binary (`main.rs`) links none of that.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::anyhow;
use clap::{Parser, Subcommand};

use crate::{
    api::{PreviewAction, Request},
    model::Colour,
    paths,
};

mod client;
mod docs;
mod exit_codes;
pub mod local;
mod render;
mod wait;

pub use client::{call, reach, Reach};
use client::{denied, exchange};
pub use docs::{completions, man_pages, CompletionShell};
pub use exit_codes::{exit, Exit};
pub use render::{render_checks, render_fleet, render_history, render_status};
use wait::{wait_drained, wait_fleet, wait_watch, Progress};

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

/// The commands. Each one's arguments are built only when it is the one
/// run (`defer`): building all of them took a quarter of the client's CPU
/// time at start, and every flip is a whole process.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
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

// What a change of a fleet's state may add (`[fleet]` in the config). A
// comment, not a doc comment: flattened into deferred subcommands (see
// `Command`), a doc comment would become their about text.
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

/// A command's exit code: its own, or for an error (printed here) the one
/// an [`Exit`] carries, else [`exit::REFUSED`].
pub fn exit_code(r: anyhow::Result<i32>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bgswitch: error: {e:#}");
            e.downcast_ref::<Exit>().map_or(exit::REFUSED, |x| x.0)
        }
    }
}

/// What `detach` does when no daemon answers: the full binary removes the
/// pins ([`local::detach_offline`]); the client binary hands the command to
/// the full one.
pub type OfflineDetach = fn(&Cli, &Path, &str, bool) -> anyhow::Result<i32>;

/// Runs a client command (every command but `daemon`, `completions` and
/// those of [`local`]); returns the process exit code.
pub fn run_client(cli: &Cli, offline_detach: OfflineDetach) -> anyhow::Result<i32> {
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
        Command::Top { .. } | Command::Simulate { .. } => {
            unreachable!("run by the full binary (cli::local)")
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
                return offline_detach(cli, &socket, &source, *force);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks over every command, deferred ones
    /// included (built here; a run builds only the command it runs).
    #[test]
    fn the_definitions_are_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    /// A deferred command keeps its own about text (a flattened struct's
    /// doc comment would replace it).
    #[test]
    fn deferred_commands_keep_their_about() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let flip = cmd.find_subcommand("flip").expect("flip");
        assert_eq!(
            flip.get_about().map(|a| a.to_string()).as_deref(),
            Some("Send new flows of SERVICE to the other colour (or the one given)")
        );
    }
}
