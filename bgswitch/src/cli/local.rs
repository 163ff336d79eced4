//! The commands the full binary (`bgswitchd`) runs in its own process
//! besides the daemon: `top` (the terminal UI), `simulate` (the data plane
//! in BPF_PROG_TEST_RUN) and `detach` when no daemon answers (the pins).
//! The client binary hands these over (exec) and links none of their code.

use std::path::{Path, PathBuf};

use anyhow::anyhow;

use super::{call, Cli, Command};
use crate::{api::Request, paths};

/// Runs `top` or `simulate`; `None` for any other command.
pub fn run_local(cli: &Cli) -> Option<anyhow::Result<i32>> {
    match &cli.command {
        Command::Top { .. } => Some(top(cli)),
        Command::Simulate { .. } => Some(simulate(cli)),
        _ => None,
    }
}

fn top(cli: &Cli) -> anyhow::Result<i32> {
    let Command::Top { interval } = &cli.command else {
        unreachable!("top")
    };
    let (socket, _) = cli.socket()?;
    crate::top::run(
        || {
            let r = call(&socket, &Request::Status { service: None })?;
            r.status
                .ok_or_else(|| anyhow!(r.error.unwrap_or_else(|| "no status".into())))
        },
        *interval,
    )
}

fn simulate(cli: &Cli) -> anyhow::Result<i32> {
    let Command::Simulate {
        service,
        pcap,
        out,
        json,
        ingress,
        program,
    } = &cli.command
    else {
        unreachable!("simulate")
    };
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
    Ok(0)
}

/// `detach` when no daemon answers at `socket`: the pins go only with
/// `--force`, and never while a daemon holds the data plane (one that
/// listens on another socket, say).
pub fn detach_offline(cli: &Cli, socket: &Path, source: &str, force: bool) -> anyhow::Result<i32> {
    let config = cli.config_path();
    let config = config.as_path();
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
