use clap::Parser as _;

use bgswitch::{
    cli::{self, Cli, Command},
    daemon::Daemon,
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::CheckSupervise {
            parent,
            uid,
            gid,
            argv,
        } => bgswitch::checks::supervise(*parent, *uid, *gid, argv),
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
        _ => match cli::run_client(&cli) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("bgswitch: error: {e:#}");
                1
            }
        },
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
