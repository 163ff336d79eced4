//! The user's own checks (`[[service.check]]`): programs that run against
//! a colour before a flip and during a watch, and pass by exiting 0.
//!
//! Other people's programs, run safely: never as root (the configured
//! user, its primary group, no supplementary groups), no inherited
//! descriptors, a clean environment (`PATH` and the `BGSWITCH_*`
//! variables of [`Target`]), `/` as working directory, a process group of
//! their own, killed with everything in it at the timeout, when the check
//! exits, and when the daemon exits or is killed.
//!
//! - `host.rs` — what the host must have for a check: its user (not
//!   root) and an executable program; run at start, on reload and by
//!   `daemon --check`, so a bad one is a config error naming file and key.
//! - `run.rs` — one run from the daemon's side, off its loop: the
//!   supervisor started, the output's tail kept, the timeout.
//! - `supervise.rs` — the supervisor (`bgswitch __check-supervise`, a
//!   process of its own between the daemon and the check): it starts the
//!   check in its own process group as its user, and kills that group when
//!   the check ends, when asked (the timeout), and when the daemon dies
//!   (`PR_SET_PDEATHSIG`: a SIGKILLed daemon leaves no check behind).

mod host;
mod run;
mod supervise;

pub use host::{check_host, program, user, User};
pub use run::{run, run_all, Target, OUTPUT_KEPT};
pub use supervise::{supervise, supervise_args, SUPERVISE_COMMAND};
