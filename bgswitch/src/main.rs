//! `bgswitch`, the command users type: the client of the daemon's socket
//! (flip, status, rollback, …). A flip is a whole process, so this binary
//! is kept small: it links the argument definitions, the socket client and
//! the text output, and none of the data plane, async runtime, etcd client,
//! HTTP server or terminal UI. For `daemon`, `top`, `simulate`,
//! `completions`, `detach` when no daemon answers, and the internal
//! commands it becomes the full binary, `bgswitchd` (`bin/bgswitchd.rs`),
//! by exec: the same pid, arguments, environment and descriptors.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf};

use clap::Parser as _;

use bgswitch::{
    cli::{self, Cli, Command},
    paths,
};

fn main() {
    // Internal commands (outside clap): the full binary's.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a.to_str().is_some_and(|a| a.starts_with("__")))
    {
        become_full();
    }
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Daemon { .. }
        | Command::Top { .. }
        | Command::Simulate { .. }
        | Command::Completions { .. } => become_full(),
        _ => cli::exit_code(cli::run_client(&cli, |_, _, _, _| become_full())),
    };
    std::process::exit(code);
}

/// The full binary: beside this one (a build tree, or both installed in
/// one directory), else where the package puts it.
fn full_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|me| me.with_file_name(paths::FULL_BINARY_NAME))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(paths::FULL_BINARY))
}

/// Becomes the full binary with this process's arguments; returns only to
/// exit with the reason it could not.
fn become_full() -> ! {
    let full = full_binary();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new(&full).args(args).exec();
    eprintln!(
        "bgswitch: error: cannot run {}: {err} (the daemon, `top`, `simulate`, `completions` \
         and `detach` without a daemon are in that binary, which the package installs with \
         this one)",
        full.display()
    );
    std::process::exit(cli::exit::REFUSED);
}
