//! Shell completions (clap_complete) and man pages (clap_mangen), from the
//! same clap definitions as the commands.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Cli;

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
