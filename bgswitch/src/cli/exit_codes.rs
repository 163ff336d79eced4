//! The exit codes of every command (also in `--help` and the README), and
//! a client error that carries one.

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
