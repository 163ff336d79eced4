//! `bgswitchd`: the full binary — the daemon, and the commands that need
//! the data plane or a terminal UI (`top`, `simulate`, `detach` with no
//! daemon), completions, man pages and the checks' supervisor. Users type
//! `bgswitch`, the small client binary, which becomes this one (exec: same
//! pid, arguments, environment and descriptors) for these commands;
//! installed as /usr/libexec/bgswitch/bgswitchd, beside `bgswitch` in a
//! build tree. Every client command runs here too.

use clap::Parser as _;

use bgswitch::{
    cli::{self, Cli, Command},
    daemon::Daemon,
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    // Internal commands, outside clap (so completions and help never
    // offer them): a check's supervisor, and the man pages.
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(bgswitch::checks::SUPERVISE_COMMAND) => {
            std::process::exit(bgswitch::checks::supervise_args(&args[2..]))
        }
        Some("__man") => std::process::exit(match args.get(2) {
            None => {
                eprintln!("usage: bgswitch __man DIR");
                2
            }
            Some(dir) => match cli::man_pages(std::path::Path::new(dir)) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    0
                }
                Err(e) => {
                    eprintln!("bgswitch: error: {e:#}");
                    1
                }
            },
        }),
        _ => {}
    }
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Completions { shell } => {
            cli::completions(*shell);
            0
        }
        Command::Daemon { check: true } => match Daemon::check(&cli.config_path()) {
            Ok(summary) => {
                print!("{summary}");
                0
            }
            Err(e) => {
                eprintln!("bgswitch: error: {e:#}");
                1
            }
        },
        Command::Daemon { check: false } => match run_daemon(&cli.config_path()) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("{e:#}");
                1
            }
        },
        _ => cli::exit_code(
            cli::local::run_local(&cli)
                .unwrap_or_else(|| cli::run_client(&cli, cli::local::detach_offline)),
        ),
    };
    std::process::exit(code);
}

fn run_daemon(config: &std::path::Path) -> anyhow::Result<()> {
    let daemon = Daemon::start(config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(daemon.run())
}
