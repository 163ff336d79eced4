//! The supervisor: `bgswitch __check-supervise --parent PID --uid U --gid G
//! -- PROGRAM ARGS…`, started by the daemon for each run of a check.
//!
//! It asks the kernel for SIGTERM when the daemon dies (`PR_SET_PDEATHSIG`,
//! checked against `--parent` for a daemon that died before) and to be
//! the reaper of every orphan below it (`PR_SET_CHILD_SUBREAPER`: a process
//! the check started that left its group with `setsid` still comes back to
//! it once its parent is gone), starts the
//! check as `U:G` (no supplementary groups) in a process group of its own,
//! with `/` as working directory, stdin from /dev/null and every inherited
//! descriptor above stderr closed at exec, then waits. When the check
//! exits, the rest of its group is killed, then every process left below
//! the supervisor, and the supervisor exits as the
//! check did (its code, or its signal); on SIGTERM, SIGINT or SIGHUP (the
//! daemon's timeout, or the daemon gone) the group is killed and it exits
//! by SIGKILL. Its environment is the check's: the daemon gives it a clean
//! one.
//!
//! When the supervisor itself cannot start the check it prints one line
//! beginning with [`NOT_RUN`] and exits [`NOT_RUN_CODE`].

use std::{
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, Stdio},
};

/// The hidden subcommand.
pub const SUPERVISE_COMMAND: &str = "__check-supervise";

/// The first words of the supervisor's own failure line.
pub(super) const NOT_RUN: &str = "bgswitch: check not run:";
/// The supervisor's exit code when it could not start the check.
pub(super) const NOT_RUN_CODE: i32 = 125;

/// The supervisor's command line after its name: `--parent PID --uid U
/// --gid G -- PROGRAM ARGS…` (the daemon writes it; anything else is
/// refused).
pub fn supervise_args(args: &[String]) -> i32 {
    let mut it = args.iter();
    let (mut parent, mut uid, mut gid) = (None, None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--parent" => parent = it.next().and_then(|v| v.parse::<i32>().ok()),
            "--uid" => uid = it.next().and_then(|v| v.parse::<u32>().ok()),
            "--gid" => gid = it.next().and_then(|v| v.parse::<u32>().ok()),
            "--" => break,
            other => {
                println!("{NOT_RUN} unknown supervisor argument {other:?}");
                return NOT_RUN_CODE;
            }
        }
    }
    let argv: Vec<String> = it.cloned().collect();
    match (parent, uid, gid) {
        (Some(p), Some(u), Some(g)) => supervise(p, u, g, &argv),
        _ => {
            println!("{NOT_RUN} usage: bgswitch {SUPERVISE_COMMAND} --parent PID --uid UID --gid GID -- PROGRAM [ARG…]");
            NOT_RUN_CODE
        }
    }
}

/// Runs the supervisor; returns the exit code (or does not return: a
/// check killed by a signal is mirrored by raising it).
pub fn supervise(parent: i32, uid: u32, gid: u32, argv: &[String]) -> i32 {
    let fail = |why: String| {
        println!("{NOT_RUN} {why}");
        NOT_RUN_CODE
    };
    let Some((program, args)) = argv.split_first() else {
        return fail("no program given".into());
    };
    if uid == 0 {
        return fail("refusing to run a check as root".into());
    }
    // The daemon may run at a raised priority (the packaged unit's
    // `Nice=`: its loop answers a rollback before the load it serves); the
    // user's checks do not share it: back to nice 0 (a lower priority is
    // always allowed; a daemon at a positive nice keeps its own).
    // SAFETY: plain calls on this process.
    unsafe {
        if libc::getpriority(libc::PRIO_PROCESS, 0) < 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        }
    }
    // SAFETY: plain signal-mask and prctl calls on this thread, with
    // initialised arguments; the supervisor has one thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0);
        set
    };
    // SAFETY: no preconditions.
    if unsafe { libc::getppid() } != parent {
        return fail("the daemon that asked for it is gone".into());
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .uid(uid)
        .gid(gid)
        .process_group(0)
        .current_dir("/")
        .stdin(Stdio::null());
    // SAFETY: close_range is async-signal-safe; CLOSE_RANGE_CLOEXEC leaves
    // the descriptors std itself uses until the exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    // (std drops supplementary groups when root sets a uid, and resets the
    // signal mask in the child.)
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("{program}: {e}")),
    };
    let pid = child.id() as i32;
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid set and out-pointer.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig == libc::SIGCHLD {
            // Has the check ended? (WNOWAIT: not reaped yet, so its pid —
            // the group's id — cannot be reused before the group is killed.)
            let mut w: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid out-pointer.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut w,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid is valid to read after waitid.
            if rc != 0 || unsafe { w.si_pid() } == 0 {
                continue;
            }
            // SAFETY: kills only the check's own process group.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
            let status = match child.wait() {
                Ok(s) => s,
                Err(e) => return fail(format!("waiting for {program}: {e}")),
            };
            kill_the_rest();
            if let Some(code) = status.code() {
                return code;
            }
            let s = status.signal().unwrap_or(libc::SIGKILL);
            mirror_signal(s);
        } else if sig > 0 {
            // SAFETY: kills only the check's own process group.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
            let _ = child.wait();
            kill_the_rest();
            mirror_signal(libc::SIGKILL);
        }
    }
}

/// Kills and reaps every process left below the supervisor (orphans of
/// the check come back to it, the subreaper), until it has no child.
fn kill_the_rest() {
    // SAFETY: no preconditions.
    let me = unsafe { libc::getpid() };
    loop {
        for pid in children_of(me) {
            // SAFETY: a child of ours, not reaped (so not reused).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut status = 0;
        // SAFETY: valid out-pointer; blocks until a child ends.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return; // ECHILD: none left
        }
    }
}

/// The processes whose parent is `parent` (from /proc/PID/stat).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // "pid (comm) state ppid …": comm may hold spaces and ')'.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Ends this process by signal `s`, as the check ended (no core dump).
fn mirror_signal(s: i32) -> ! {
    // SAFETY: resetting a handler, the core limit and the mask of this
    // single-threaded process before raising the signal on itself.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(s, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::raise(s);
        libc::raise(libc::SIGKILL);
    }
    unreachable!("killed by its own signal")
}
