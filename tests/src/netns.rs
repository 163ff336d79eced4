//! Network-namespace helpers.
//!
//! * [`in_netns`] runs a closure on a fresh thread that has joined a named
//!   network namespace (one created with `ip netns add`). Sockets created by
//!   the closure belong to that namespace for their whole life, whichever
//!   thread uses them afterwards, so the usual pattern is "create the socket
//!   inside, use it outside".
//! * [`ip`], [`ip_ns`] and [`ns_exec`] run iproute2 commands and turn a
//!   failure into an error that names the command and carries its stderr.
//! * A few small queries ([`list_netns`], [`netns_exists`], [`ifindex`],
//!   [`mac_address`], [`find_program`]).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Directories where iproute2 keeps the bind mounts of named namespaces.
/// `/var/run` is normally a symlink to `/run`; both are searched.
pub const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Returns the path of the bind mount of the named network namespace.
pub fn netns_path(ns: &str) -> Result<PathBuf> {
    if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
        bail!("invalid network namespace name {ns:?}");
    }
    NETNS_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(ns))
        .find(|path| path.exists())
        .with_context(|| {
            format!("network namespace {ns:?} not found in /run/netns or /var/run/netns")
        })
}

/// Runs `f` on a new thread that has first joined the network namespace `ns`
/// with `setns(2)`, waits for it and returns its result.
///
/// Only the helper thread changes namespace; the caller's thread is not
/// affected. Sockets that `f` creates stay in `ns` and may be used from any
/// thread afterwards. Because the thread is joined before returning, `f` may
/// borrow from the caller (the bounds are looser than `'static`).
///
/// A panic inside `f` is propagated to the caller unchanged.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(ns)?;
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {ns:?} ({})", path.display()))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netns".to_owned())
            .spawn_scoped(scope, move || -> Result<T> {
                // SAFETY: `file` is an open descriptor for the lifetime of the
                // call; setns only changes the namespace of this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("setns into network namespace {ns:?}"));
                }
                drop(file);
                Ok(f())
            })
            .with_context(|| format!("spawning a thread for network namespace {ns:?}"))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Renders a command line for error messages.
fn render(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args...`, returning its output if it exits successfully and
/// an error naming the command (with its stderr) otherwise.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("failed to run `{}`", render(program, args)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            render(program, args),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs `ip args...` (iproute2) in the caller's namespace.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

/// Runs `ip -n ns args...`, i.e. an iproute2 command acting on namespace `ns`.
pub fn ip_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Runs `cmd args...` inside namespace `ns` through `ip netns exec` and
/// returns its output; a non-zero exit status is an error naming the command
/// and carrying its stderr.
pub fn ns_exec(ns: &str, cmd: &str, args: &[&str]) -> Result<Output> {
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    run("ip", &full).with_context(|| format!("running `{cmd}` in network namespace {ns:?}"))
}

/// Lists the named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let output = run("ip", &["netns", "list"])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Whether a named network namespace with this name exists.
pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).is_ok()
}

/// Interface index of `ifname` inside namespace `ns`.
pub fn ifindex(ns: &str, ifname: &str) -> Result<u32> {
    let name = CString::new(ifname).with_context(|| format!("bad interface name {ifname:?}"))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = in_netns(ns, || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
    if index == 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("interface {ifname:?} in network namespace {ns:?}"));
    }
    Ok(index)
}

/// MAC address of `ifname` inside namespace `ns` (from `ip -br link show`).
pub fn mac_address(ns: &str, ifname: &str) -> Result<[u8; 6]> {
    let output = run("ip", &["-n", ns, "-br", "link", "show", "dev", ifname])?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = text
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC address for {ifname:?} in {ns:?}: {text:?}"))?;
    parse_mac(field)
        .with_context(|| format!("MAC address of {ifname:?} in network namespace {ns:?}"))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("short MAC {text:?}"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text:?}"))?;
    }
    if parts.next().is_some() {
        bail!("long MAC {text:?}");
    }
    Ok(mac)
}

/// Looks for an executable named `name` in `$PATH` and the usual sbin
/// directories (which are not always in a non-login root `$PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether the current process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test unless it can run here (root, and iproute2 on the
/// PATH): privileged tests run for real, in CI too, and never report "ok"
/// without having run.
///
/// ```no_run
/// bgswitch_tests::require_privileged("my_test");
/// ```
pub fn require_privileged(test: &str) {
    assert!(
        is_root(),
        "{test} needs root (network namespaces, XDP): run the suite as root (cargo xtask test)"
    );
    assert!(
        find_program("ip").is_some(),
        "{test} needs `ip` (iproute2) on the PATH: cargo xtask demo installs it"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mac() {
        assert_eq!(
            parse_mac("02:00:0a:ff:10:01").unwrap(),
            [2, 0, 10, 255, 16, 1]
        );
        assert!(parse_mac("02:00:0a").is_err());
        assert!(parse_mac("02:00:0a:ff:10:01:05").is_err());
        assert!(parse_mac("zz:00:0a:ff:10:01").is_err());
    }

    #[test]
    fn rejects_bad_names() {
        assert!(netns_path("").is_err());
        assert!(netns_path("../etc").is_err());
        assert!(netns_path("bgs-definitely-not-there").is_err());
    }

    #[test]
    fn in_netns_runs_closure_and_propagates_errors() {
        require_privileged("in_netns_runs_closure_and_propagates_errors");
        let name = format!("bgsnt{}", std::process::id());
        ip(&["netns", "add", &name]).unwrap();
        let borrowed = String::from("borrowed");
        let result = in_netns(&name, || format!("{borrowed} ok"));
        let lo = ifindex(&name, "lo");
        let missing = in_netns("bgs-no-such-namespace", || ());
        let _ = ip(&["netns", "del", &name]);
        assert_eq!(result.unwrap(), "borrowed ok");
        assert_eq!(lo.unwrap(), 1);
        let err = format!("{:#}", missing.unwrap_err());
        assert!(err.contains("bgs-no-such-namespace"), "{err}");
    }

    #[test]
    fn command_errors_name_the_command() {
        require_privileged("command_errors_name_the_command");
        let err = format!(
            "{:#}",
            ip(&["link", "show", "dev", "nonexistent0"]).unwrap_err()
        );
        assert!(err.contains("ip link show dev nonexistent0"), "{err}");
        assert!(err.contains("nonexistent0"), "{err}");
    }
}
