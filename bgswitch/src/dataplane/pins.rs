//! The bpffs and what bgswitch pins in it: maps and links under
//! `<bpffs>/bgswitch/v<LAYOUT_VERSION>/`, older layouts' directories, and
//! tearing it all down.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use super::{hook::AttachMode, io_err, Dataplane, DataplaneError, Result};
use crate::paths;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

pub(super) fn link_pin_path(bpffs: &Path, iface: &str, mode: AttachMode) -> PathBuf {
    paths::link_pin(bpffs, &format!("{}-{iface}", mode.as_str()))
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

/// Removes every bgswitch pin under `bpffs` (links first, which detaches XDP
/// from each interface once no process holds the link; then maps).
pub fn remove_pins(bpffs: &Path) -> Result<()> {
    let root = bpffs.join(paths::PIN_DIR);
    if !root.exists() {
        return Ok(());
    }
    let links = paths::pin_root(bpffs).join("links");
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path()).map_err(io_err("unpinning", &e.path()))?;
        }
    }
    std::fs::remove_dir_all(&root).map_err(io_err("removing", &root))
}

impl Dataplane {
    /// Removes pinned links of interfaces that are not configured (left by an
    /// earlier daemon with another config), which detaches them.
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
            let iface = name.split_once('-').map_or(name.as_str(), |(_, i)| i);
            if !configured.iter().any(|c| c == iface) {
                log::info!("{iface}: pinned XDP link from an earlier config; detaching");
                std::fs::remove_file(e.path()).map_err(io_err("unpinning", &e.path()))?;
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
