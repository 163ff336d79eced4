//! Where the pins live, so that the data plane outlives the daemon.
//!
//! Pins (maps and links) keep the data plane running while no daemon does,
//! as long as the bpffs holding them is mounted. A daemon started in a
//! private mount namespace — `ip netns exec` makes one, a slave of the one
//! it was started from — that mounted a bpffs itself would have it seen by
//! nobody else and gone with its last process, taking every pin and link
//! with it. So the daemon finds the nearest ancestor process in another
//! mount namespace (where it was started from: the host's, or a
//! container's) and keeps its pins in the bpffs at the configured path
//! there, reached through that namespace's root (an open descriptor, held
//! for the data plane's life), mounting one there when missing, as systemd
//! does at boot. Where it cannot, it refuses to start rather than attach
//! something that would vanish with it.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use super::{DataplaneError, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where this daemon's pins are, and why they outlive it.
#[derive(Debug)]
pub struct PinPlace {
    /// The configured bpffs path.
    pub configured: PathBuf,
    /// The path the daemon pins under: the configured one, or the same path
    /// in an outer mount namespace reached through its root.
    pub root: PathBuf,
    /// Why the pins outlive the daemon, for the log and status.
    pub note: String,
    /// The outer namespace's root, held open: `root` goes through it.
    _outer: Option<OwnedFd>,
}

/// Finds (or mounts) the bpffs at `configured` where it outlives this
/// process (see the module's doc).
pub fn place(configured: &Path) -> Result<PinPlace> {
    let Some(outer) = outer_namespace() else {
        ensure_bpffs(configured)?;
        return Ok(PinPlace {
            configured: configured.into(),
            root: configured.into(),
            note: "in this process's mount namespace, the outermost it can reach".into(),
            _outer: None,
        });
    };
    let root_fd = open_dir(&format!("/proc/{}/root", outer.pid))
        .map_err(|e| refusal(configured, &outer, &format!("opening its root: {e}")))?;
    let through = PathBuf::from(format!("/proc/self/fd/{}", root_fd.as_raw_fd()))
        .join(configured.strip_prefix("/").unwrap_or(configured));
    let place = |root: PathBuf, note: String| PinPlace {
        configured: configured.into(),
        root,
        note,
        _outer: Some(root_fd),
    };
    if is_bpffs(&through) {
        if is_bpffs(configured) && same_fs(configured, &through) {
            // The outer mount is seen here too: nothing to go through.
            return Ok(PinPlace {
                configured: configured.into(),
                root: configured.into(),
                note: format!(
                    "mounted in the mount namespace of {} (pid {}), seen here too",
                    outer.comm, outer.pid
                ),
                _outer: None,
            });
        }
        let note = format!(
            "in the mount namespace of {} (pid {}); this daemon runs in a private one",
            outer.comm, outer.pid
        );
        return Ok(place(through, note));
    }
    mount_in(&outer, configured)
        .map_err(|e| refusal(configured, &outer, &format!("mounting a bpffs there: {e}")))?;
    if !is_bpffs(&through) {
        return Err(refusal(
            configured,
            &outer,
            "the bpffs mounted there is not reachable",
        ));
    }
    log::info!(
        "mounted a bpffs at {} in the mount namespace of {} (pid {}), where it outlives this daemon (it runs in a private one)",
        configured.display(),
        outer.comm,
        outer.pid
    );
    let note = format!(
        "mounted by this daemon in the mount namespace of {} (pid {}); this daemon runs in a private one",
        outer.comm, outer.pid
    );
    Ok(place(through, note))
}

/// Where a daemon started like this process would have put its pins, as
/// [`place`] finds it, without mounting anything: for removing them with
/// no daemon running (`bgswitch detach`). `None` when no bpffs is there.
pub fn locate_pins(configured: &Path) -> Option<PinPlace> {
    let here = || {
        is_bpffs(configured).then(|| PinPlace {
            configured: configured.into(),
            root: configured.into(),
            note: "in this process's mount namespace".into(),
            _outer: None,
        })
    };
    let Some(outer) = outer_namespace() else {
        return here();
    };
    let Ok(root_fd) = open_dir(&format!("/proc/{}/root", outer.pid)) else {
        return here();
    };
    let through = PathBuf::from(format!("/proc/self/fd/{}", root_fd.as_raw_fd()))
        .join(configured.strip_prefix("/").unwrap_or(configured));
    if !is_bpffs(&through) {
        return here();
    }
    Some(PinPlace {
        configured: configured.into(),
        root: through,
        note: format!(
            "in the mount namespace of {} (pid {})",
            outer.comm, outer.pid
        ),
        _outer: Some(root_fd),
    })
}

fn refusal(configured: &Path, outer: &Outer, why: &str) -> DataplaneError {
    DataplaneError::Bpffs {
        path: configured.into(),
        reason: format!(
            "this daemon runs in a private mount namespace (as `ip netns exec` makes), where a bpffs it mounted would vanish with it, taking every pin and attachment; the mount namespace of {} (pid {}) would keep it, but {why}. Mount a bpffs there first (`mount -t bpf bpf {}` on the host), or start the daemon in the host's mount namespace",
            outer.comm,
            outer.pid,
            configured.display()
        ),
    }
}

/// The nearest ancestor in another mount namespace.
struct Outer {
    pid: u32,
    comm: String,
}

/// Walks up the parent processes to the first whose mount namespace is not
/// this process's; `None` when there is none this process may look at (it
/// runs in the outermost mount namespace it can reach).
fn outer_namespace() -> Option<Outer> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    let mut pid = parent_of("self")?;
    for _ in 0..64 {
        if pid == 0 {
            return None;
        }
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            // Not ours to look at (another user's, or a sandbox's init).
            return None;
        };
        if ns != own {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map_or_else(|_| "?".into(), |c| c.trim().to_string());
            return Some(Outer { pid, comm });
        }
        pid = parent_of(&pid.to_string())?;
    }
    None
}

fn parent_of(pid: &str) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn open_dir(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: a valid C string; the descriptor returned is owned here.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mounts a bpffs at `path` in `outer`'s mount namespace (creating the
/// mount point there): a child process enters the namespace (a process
/// with threads may not) and mounts.
fn mount_in(outer: &Outer, path: &Path) -> io::Result<()> {
    let ns = CString::new(format!("/proc/{}/ns/mnt", outer.pid)).map_err(io::Error::other)?;
    // Every prefix of the path, to create the directories one by one in the
    // child (no allocation after fork).
    let mut dirs = Vec::new();
    let mut p = PathBuf::new();
    for c in path.components() {
        p.push(c);
        dirs.push(CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?);
    }
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let bpf = CString::new("bpf").map_err(io::Error::other)?;
    // SAFETY: fork; the child makes only async-signal-safe system calls on
    // memory prepared before the fork, then _exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: the child: raw system calls only.
        unsafe {
            let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                libc::_exit(10);
            }
            for d in &dirs {
                libc::mkdir(d.as_ptr(), 0o755);
            }
            let rc = libc::mount(
                bpf.as_ptr(),
                target.as_ptr(),
                bpf.as_ptr(),
                0,
                std::ptr::null(),
            );
            libc::_exit(if rc == 0 { 0 } else { 11 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, 10) => Err(io::Error::other("entering its mount namespace was refused")),
        (true, 11) => Err(io::Error::other("mount(2) was refused")),
        _ => Err(io::Error::other(format!(
            "the mounting child ended with status {status}"
        ))),
    }
}

/// Mounts a bpffs at `path` unless one is there already.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let bpffs_err = |reason: String| DataplaneError::Bpffs {
        path: path.into(),
        reason,
    };
    if !path.exists() {
        std::fs::create_dir_all(path)
            .map_err(|e| bpffs_err(format!("cannot create the mount point: {e}")))?;
    }
    if is_bpffs(path) {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).map_err(|_| bpffs_err("path contains NUL".into()));
    let target = c(&path.to_string_lossy())?;
    let fstype = c("bpf")?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(bpffs_err(format!(
            "not a bpffs and mounting one failed: {}",
            io::Error::last_os_error()
        )));
    }
    log::info!("mounted a bpffs at {}", path.display());
    Ok(())
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Whether two paths are on one file system (one bpffs mount seen twice).
fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
