//! The bpffs and what bgswitch pins in it: maps and links under
//! `<bpffs>/bgswitch/v<LAYOUT_VERSION>/`, older layouts' directories, and
//! tearing it all down.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use super::{
    hook::{self, AttachMode},
    io_err, Dataplane, DataplaneError, Result,
};
use crate::paths;

/// The data plane's lock: an exclusive `flock` on its pin directory
/// (`<bpffs>/bgswitch`), held while the daemon lives (the kernel drops it
/// with the process). One controller per pinned data plane, whatever its
/// state directory or socket; `detach` without a daemon takes it too.
#[derive(Debug)]
pub struct PinLock {
    _dir: OwnedFd,
}

/// Takes the data plane's lock under `bpffs` (the directory is made if
/// missing). Another process holding it: [`DataplaneError::Held`], with its
/// pid where the kernel's lock table shows it.
pub fn lock_pins(bpffs: &Path) -> Result<PinLock> {
    let dir = bpffs.join(paths::PIN_DIR);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| DataplaneError::Invalid(format!("{}: a NUL in the path", dir.display())))?;
    // SAFETY: a valid C string; the descriptor is owned at once.
    let raw = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io_err("opening", &dir)(std::io::Error::last_os_error()));
    }
    // SAFETY: just opened, owned here alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DataplaneError::Held {
                path: dir,
                pid: lock_holder(&fd),
            });
        }
        return Err(io_err("locking", &dir)(e));
    }
    Ok(PinLock { _dir: fd })
}

/// Who holds a `flock` on the file open as `fd`: the pid `/proc/locks`
/// gives for its device and inode (as this process's pid namespace sees it).
fn lock_holder(fd: &OwnedFd) -> Option<u32> {
    // SAFETY: fstat into a zeroed struct on a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(st.st_dev),
        libc::minor(st.st_dev),
        st.st_ino
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Where what holds `iface` in `mode` is pinned: `<mode>-<iface>` under
/// the layout's `links/`.
pub(super) fn link_pin_path(bpffs: &Path, iface: &str, mode: AttachMode) -> PathBuf {
    paths::link_pin(bpffs, &format!("{}-{iface}", mode.as_str()))
}

/// The mode and interface a pin under `links/` names (`<mode>-<iface>`).
fn pin_name(name: &str) -> Option<(AttachMode, &str)> {
    // The longest mode name first ("tc-netlink-x" also starts with "tc-").
    let mut modes = AttachMode::ALL;
    modes.sort_by_key(|m| std::cmp::Reverse(m.as_str().len()));
    modes.into_iter().find_map(|m| {
        name.strip_prefix(m.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .map(|iface| (m, iface))
    })
}

/// Removes the pin `name` under `links`, and with it what it holds: a link
/// detaches once no process holds it; a netlink filter is removed.
fn unpin(links: &Path, name: &str) -> Result<()> {
    let path = links.join(name);
    // Detached first, at once: removing the pin alone frees the link (and
    // takes the program off its hook) later, on a kernel work queue, so
    // for a moment after `detach` says so the program would still switch.
    // (A netlink filter's pin is its program, not a link.)
    let netlink = matches!(pin_name(name), Some((AttachMode::TcNetlink, _)));
    let detached = if netlink { Ok(()) } else { detach_link(&path) };
    if let Err(e) = detached {
        log::warn!(
            "{}: could not detach the link before unpinning it ({e}); it goes with its pin",
            path.display()
        );
    }
    std::fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
    if let Some((AttachMode::TcNetlink, iface)) = pin_name(name) {
        hook::remove_filter(iface);
    }
    Ok(())
}

/// A descriptor of the BPF object pinned at `pin` (BPF_OBJ_GET).
pub(super) fn open_pin(pin: &Path) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: bpf(2) with a zeroed attr whose first field points at a valid C string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Takes the link pinned at `pin` off its hook now (BPF_LINK_DETACH; XDP
/// and tcx links support it). The link object stays, detached, until its
/// last reference goes.
fn detach_link(pin: &Path) -> std::io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let fd = open_pin(pin)?;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32);
    // SAFETY: bpf(2) with a zeroed attr naming a link descriptor owned here.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes an older layout's pin directory (its maps) once no XDP link of it
/// is left pinned.
pub(super) fn remove_layout_if_unused(old_root: &Path) {
    let links_left = std::fs::read_dir(old_root.join("links"))
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    if links_left == 0 {
        match std::fs::remove_dir_all(old_root) {
            Ok(()) => log::info!(
                "removed the pins of an older map layout at {}",
                old_root.display()
            ),
            Err(e) => log::warn!("could not remove {}: {e}", old_root.display()),
        }
    }
}

/// Removes every bgswitch pin under `bpffs` (links first, which detaches the
/// program from each interface once no process holds the link, and removes
/// netlink filters; then maps).
pub fn remove_pins(bpffs: &Path) -> Result<()> {
    let root = bpffs.join(paths::PIN_DIR);
    if !root.exists() {
        return Ok(());
    }
    let links = paths::pin_root(bpffs).join("links");
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            unpin(&links, &e.file_name().to_string_lossy())?;
        }
    }
    std::fs::remove_dir_all(&root).map_err(io_err("removing", &root))
}

impl Dataplane {
    /// Removes what an earlier daemon with another config left pinned on
    /// interfaces that are not configured now, which detaches them.
    pub fn detach_unknown_pins(&mut self, configured: &[String]) -> Result<()> {
        let Some(bpffs) = &self.bpffs else {
            return Ok(());
        };
        let dir = paths::pin_root(bpffs).join("links");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((mode, iface)) = pin_name(&name) else {
                continue;
            };
            if !configured.iter().any(|c| c == iface) {
                log::info!(
                    "{iface}: {} from an earlier config; detaching",
                    mode.describe()
                );
                unpin(&dir, &name)?;
            }
        }
        Ok(())
    }

    /// Tears everything down: detaches every interface and removes every
    /// pin. Traffic to the VIPs stops being switched.
    pub fn destroy(mut self) -> Result<()> {
        let ifaces: Vec<String> = self.links.keys().cloned().collect();
        for i in ifaces {
            self.detach(&i)?;
        }
        if let Some(bpffs) = self.bpffs.take() {
            remove_pins(&bpffs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_name_gives_its_mode_and_interface_the_longest_mode_first() {
        assert_eq!(pin_name("native-eth0"), Some((AttachMode::Native, "eth0")));
        assert_eq!(pin_name("generic-e-1"), Some((AttachMode::Generic, "e-1")));
        assert_eq!(pin_name("tc-veth1"), Some((AttachMode::Tc, "veth1")));
        assert_eq!(
            pin_name("tc-netlink-veth1"),
            Some((AttachMode::TcNetlink, "veth1"))
        );
        assert_eq!(pin_name("tc-netlink"), Some((AttachMode::Tc, "netlink")));
        assert_eq!(pin_name("other-eth0"), None);
        assert_eq!(pin_name("tceth0"), None);
        for m in AttachMode::ALL {
            let name = format!("{}-lbb", m.as_str());
            assert_eq!(pin_name(&name), Some((m, "lbb")), "{name}");
        }
    }
}
