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
    api::{Request, Response, Status},
    model::Colour,
    paths,
};

#[derive(Parser, Debug)]
#[command(
    name = "bgswitch",
    version,
    about = "Kernel-level blue/green traffic switcher (XDP)",
    long_about = "bgswitch switches new flows of a virtual IP:port between a blue and a green \
                  backend pool in the kernel's XDP fast path; open flows stay where they are \
                  until they end."
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "BGSWITCH_SOCKET", default_value = paths::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load and attach the XDP program, serve the control socket.
    Daemon {
        #[arg(long, default_value = paths::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Send new flows of SERVICE to the other colour (or the one given).
    Flip {
        service: String,
        /// Target colour (default: the one that is not active).
        #[arg(long, value_parser = parse_colour)]
        to: Option<Colour>,
        /// Also move open flows (they break: their backend changes).
        #[arg(long)]
        force: bool,
        /// Why, for the journal.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Go back to the colour before the last flip.
    Rollback {
        service: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show services, colours, flows, counters and interfaces.
    Status {
        service: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make the daemon re-read its config (a bad config changes nothing).
    Reload,
    /// Remove the XDP programs and every pin (the daemon exits). Traffic to
    /// the VIPs is no longer switched.
    Detach {
        /// Used when no daemon answers: remove the pins under this config's bpffs.
        #[arg(long, default_value = paths::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn parse_colour(s: &str) -> Result<Colour, String> {
    s.parse()
}

/// Sends one request and reads the response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the bgswitch daemon at {} (is it running? see --socket)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("reading the daemon's answer")?;
    if answer.is_empty() {
        return Err(anyhow!(
            "the daemon closed the connection without answering"
        ));
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid")
}

/// Runs a client command; returns the process exit code.
pub fn run_client(cli: &Cli) -> anyhow::Result<i32> {
    let (req, json) = match &cli.command {
        Command::Daemon { .. } => unreachable!("handled by main"),
        Command::Flip {
            service,
            to,
            force,
            reason,
        } => (
            Request::Flip {
                service: service.clone(),
                to: *to,
                force: *force,
                reason: reason.clone(),
            },
            false,
        ),
        Command::Rollback { service, reason } => (
            Request::Rollback {
                service: service.clone(),
                reason: reason.clone(),
            },
            false,
        ),
        Command::Status { service, json } => (
            Request::Status {
                service: service.clone(),
            },
            *json,
        ),
        Command::Reload => (Request::Reload, false),
        Command::Detach { config } => {
            if !cli.socket.exists() || UnixStream::connect(&cli.socket).is_err() {
                return detach_offline(config);
            }
            (Request::Detach, false)
        }
    };
    let resp = call(&cli.socket, &req)?;
    if !resp.ok {
        eprintln!(
            "bgswitch: error: {}",
            resp.error.as_deref().unwrap_or("request failed")
        );
        return Ok(1);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&resp.status)?);
    } else if let Some(status) = &resp.status {
        print!("{}", render_status(status));
    } else if let Some(m) = &resp.message {
        println!("{m}");
    }
    Ok(0)
}

fn detach_offline(config: &Path) -> anyhow::Result<i32> {
    let c = crate::config::load(config)?;
    crate::dataplane::remove_pins(&c.bpffs)?;
    println!(
        "no daemon answered; removed the pins under {} (XDP detached)",
        c.bpffs.join(paths::PIN_DIR).display()
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
        for c in &svc.colours {
            out += &format!(
                "  {}{:<6} live flows {:<6} new flows {:<8} packets {:<10} bytes {:<12} replies {}\n",
                if c.active { "*" } else { " " },
                c.colour.to_string(),
                c.live_flows,
                c.new_flows,
                c.packets,
                c.bytes,
                c.reply_packets
            );
            for b in &c.backends {
                out += &format!(
                    "           {:<24} new flows {:<8} packets {:<10} replies {}\n",
                    b.address, b.new_flows, b.packets, b.reply_packets
                );
            }
        }
        if let Some(ch) = &svc.last_change {
            out += &format!(
                "  last change: {:?} {} → {} by {}{}\n",
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
    out += "interfaces:";
    if s.interfaces.is_empty() {
        out += " none";
    }
    for i in &s.interfaces {
        out += &format!(
            " {} ({:?}{})",
            i.name,
            i.mode,
            if i.adopted { ", adopted" } else { "" }
        )
        .to_lowercase();
    }
    out += "\n";
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
