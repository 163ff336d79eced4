//! One run of a check from the daemon's side, off its loop: the supervisor
//! started with the check's clean environment, its output (stdout and
//! stderr on one pipe) read while it runs — the last [`OUTPUT_KEPT`] bytes
//! kept —, and at the timeout the supervisor told to kill the check's
//! process group.

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{io::AsyncReadExt as _, net::unix::pipe};

use super::{
    host,
    supervise::{NOT_RUN, NOT_RUN_CODE, SUPERVISE_COMMAND},
};
use crate::{
    config::CheckConfig,
    model::{CheckOutcome, CheckPhase, CheckRecord, Colour},
    paths,
    state::now_ms,
};

/// Output kept per run: its last bytes (stdout and stderr together).
pub const OUTPUT_KEPT: usize = 4096;

/// How long the supervisor gets to kill the check's group and exit once
/// told to, before the daemon stops waiting for it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What a check runs against: it gets these in its environment as
/// `BGSWITCH_SERVICE`, `BGSWITCH_VIP`, `BGSWITCH_COLOUR` and
/// `BGSWITCH_BACKENDS` (address:port, comma-separated; IPv6 in brackets).
#[derive(Clone, Debug)]
pub struct Target {
    pub service: String,
    pub vip: SocketAddr,
    pub colour: Colour,
    pub backends: Vec<SocketAddr>,
}

impl Target {
    fn env(&self, phase: CheckPhase) -> Vec<(&'static str, String)> {
        vec![
            ("PATH", paths::CHECK_PATH.to_string()),
            ("BGSWITCH_SERVICE", self.service.clone()),
            ("BGSWITCH_VIP", self.vip.to_string()),
            ("BGSWITCH_COLOUR", self.colour.to_string()),
            (
                "BGSWITCH_BACKENDS",
                self.backends
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("BGSWITCH_PHASE", phase.to_string()),
        ]
    }
}

/// Runs `checks` against `target` at once, in parallel; the records in the
/// checks' order.
pub async fn run_all(
    checks: Vec<CheckConfig>,
    target: Target,
    phase: CheckPhase,
) -> Vec<CheckRecord> {
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in checks.iter().cloned().enumerate() {
        let t = target.clone();
        set.spawn(async move { (i, run(&c, &t, phase).await) });
    }
    let mut out: Vec<Option<CheckRecord>> = vec![None; checks.len()];
    while let Some(r) = set.join_next().await {
        if let Ok((i, rec)) = r {
            out[i] = Some(rec);
        }
    }
    out.into_iter()
        .zip(&checks)
        .map(|(r, c)| {
            r.unwrap_or_else(|| CheckRecord {
                name: c.name.clone(),
                phase,
                colour: target.colour,
                at_ms: now_ms(),
                duration_ms: 0,
                outcome: CheckOutcome::Error {
                    why: "its task ended without a result".into(),
                },
                output: String::new(),
            })
        })
        .collect()
}

/// Runs one check against `target`; never fails (a check that could not
/// start is a record saying why).
pub async fn run(check: &CheckConfig, target: &Target, phase: CheckPhase) -> CheckRecord {
    let at_ms = now_ms();
    let started = Instant::now();
    let (outcome, output) = match run_inner(check, target, phase).await {
        Ok(r) => r,
        Err(why) => (CheckOutcome::Error { why }, String::new()),
    };
    CheckRecord {
        name: check.name.clone(),
        phase,
        colour: target.colour,
        at_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        outcome,
        output,
    }
}

async fn run_inner(
    check: &CheckConfig,
    target: &Target,
    phase: CheckPhase,
) -> Result<(CheckOutcome, String), String> {
    let user = host::user(&check.user)?;
    let program = host::program(&check.command[0], &user)?;
    let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let err_writer = writer.try_clone().map_err(|e| format!("pipe: {e}"))?;
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg(SUPERVISE_COMMAND)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--uid")
        .arg(user.uid.to_string())
        .arg("--gid")
        .arg(user.gid.to_string())
        .arg("--")
        .arg(&program)
        .args(&check.command[1..])
        .env_clear()
        .envs(target.env(phase))
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(writer)))
        .stderr(Stdio::from(OwnedFd::from(err_writer)))
        // Never SIGKILL the supervisor: it is what kills the check's group.
        .kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting its supervisor: {e}"))?;
    // The write ends now live in the supervisor (and the check) alone.
    drop(cmd);
    let mut rx = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        .map_err(|e| format!("reading its output: {e}"))?;
    let mut tail = Tail::default();
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + check.timeout;
    let mut timed_out = false;
    let mut eof = false;
    let status = loop {
        tokio::select! {
            n = rx.read(&mut buf), if !eof => match n {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => tail.push(&buf[..n]),
            },
            s = child.wait() => break s,
            () = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                if let Some(pid) = child.id() {
                    // SAFETY: the supervisor is our child, not yet reaped.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                match tokio::time::timeout(KILL_WAIT, child.wait()).await {
                    Ok(s) => break s,
                    Err(_) => return Err(format!(
                        "its supervisor did not exit within {KILL_WAIT:?} of the timeout"
                    )),
                }
            }
        }
    };
    // What is left in the pipe: the group is gone, so its write ends are
    // closed (a process that left the group may hold one: not waited for).
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while !eof {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => tail.push(&buf[..n]),
            }
        }
    })
    .await;
    let output = tail.text();
    if timed_out {
        return Ok((
            CheckOutcome::Timeout {
                after_ms: check.timeout.as_millis() as u64,
            },
            output,
        ));
    }
    let status = status.map_err(|e| format!("waiting for its supervisor: {e}"))?;
    use std::os::unix::process::ExitStatusExt as _;
    let outcome = match (status.code(), status.signal()) {
        (Some(0), _) => CheckOutcome::Passed,
        (Some(NOT_RUN_CODE), _) if output.lines().any(|l| l.starts_with(NOT_RUN)) => {
            let why = output
                .lines()
                .find_map(|l| l.strip_prefix(NOT_RUN))
                .unwrap_or_default()
                .trim()
                .to_string();
            return Err(why);
        }
        (code, signal) => CheckOutcome::Failed { code, signal },
    };
    Ok((outcome, output))
}

/// The last `OUTPUT_KEPT` bytes of a stream.
#[derive(Default)]
struct Tail {
    bytes: std::collections::VecDeque<u8>,
    dropped: bool,
}

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.bytes.extend(b);
        if self.bytes.len() > OUTPUT_KEPT {
            let extra = self.bytes.len() - OUTPUT_KEPT;
            self.bytes.drain(..extra);
            self.dropped = true;
        }
    }

    /// As text (lossy), from the first whole line when the start was cut.
    fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let all = [a, b].concat();
        let s = String::from_utf8_lossy(&all).into_owned();
        if self.dropped {
            match s.find('\n') {
                Some(p) => format!("[…]\n{}", &s[p + 1..]),
                None => format!("[…]{s}"),
            }
        } else {
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes_from_a_whole_line() {
        let mut t = Tail::default();
        t.push(b"first\n");
        assert_eq!(t.text(), "first\n");
        for i in 0..2000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        let s = t.text();
        assert!(s.starts_with("[…]\nline "), "{}", &s[..20]);
        assert!(s.ends_with("line 1999\n"));
        assert!(s.len() <= OUTPUT_KEPT + 8);
    }
}
