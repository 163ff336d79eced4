//! Attachments: the program on each configured interface through a pinned
//! link (or swapped into one an earlier daemon pinned, of this layout or
//! an older one), the redirect map, the interfaces watched for
//! re-creation and link changes, and detach. How a link is made is the
//! hook's (`hook.rs`); nothing here knows XDP.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::Path,
};

use aya::programs::links::{FdLink, PinnedLink};

use super::{
    hook::AttachMode,
    io_err,
    pins::{link_pin_path, remove_layout_if_unused},
    Dataplane, DataplaneError, Result,
};
use crate::{config::XdpModeSetting, paths};

/// One attached interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// The program was swapped into a link a previous daemon pinned.
    pub adopted: bool,
    /// Native mode was asked for (auto) but refused; why.
    pub fallback_reason: Option<String>,
}

impl Dataplane {
    /// Attaches (or adopts the pinned attachment) on `iface` and adds it to
    /// the redirect map.
    pub fn attach(&mut self, iface: &str, mode: XdpModeSetting) -> Result<Attachment> {
        let mode_setting = mode;
        let index = ifindex(iface).ok_or_else(|| DataplaneError::UnknownInterface(iface.into()))?;
        let mut fallback_reason = None;
        let mut adopted = None;
        if let Some(bpffs) = self.bpffs.clone() {
            for m in AttachMode::ALL {
                let pin = link_pin_path(&bpffs, iface, m);
                if !pin.exists() {
                    continue;
                }
                match self.adopt_link(&pin, m) {
                    Ok(link) => adopted = Some((m, link)),
                    Err(e) => {
                        log::warn!(
                            "{iface}: pinned XDP link {} is stale ({e}); attaching afresh",
                            pin.display()
                        );
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
        }
        if adopted.is_none() {
            adopted = self.adopt_older_layout(iface)?;
        }
        let (mode, link, was_adopted) = match adopted {
            Some((m, link)) => (m, link, true),
            None => {
                let mut last = None;
                let mut got = None;
                for &m in AttachMode::tries(mode) {
                    match m.attach(&mut self.ebpf, index) {
                        Ok(Ok(fd)) => {
                            got = Some((m, fd));
                            break;
                        }
                        Ok(Err(e)) => {
                            if mode == XdpModeSetting::Auto && m == AttachMode::Native {
                                let reason = format!("native XDP refused: {e}");
                                log::warn!("{iface}: {reason}; falling back to generic (skb) mode, which is slower");
                                fallback_reason = Some(reason);
                            }
                            last = Some((m, e));
                        }
                        Err(e) => {
                            return Err(match e {
                                DataplaneError::Invalid(m) => {
                                    DataplaneError::Invalid(format!("{iface}: {m}"))
                                }
                                e => e,
                            })
                        }
                    }
                }
                let Some((m, fd)) = got else {
                    let (m, source) = last.expect("at least one mode tried");
                    return Err(DataplaneError::Attach {
                        iface: iface.into(),
                        mode: m.as_str(),
                        source,
                    });
                };
                let link = match &self.bpffs {
                    Some(bpffs) => {
                        let pin = link_pin_path(bpffs, iface, m);
                        let pinned = fd.pin(&pin).map_err(|e| DataplaneError::Io {
                            op: "pinning the XDP link at",
                            path: pin.clone(),
                            source: io::Error::other(e.to_string()),
                        })?;
                        FdLink::from(pinned)
                    }
                    None => fd,
                };
                (m, link, false)
            }
        };
        self.add_tx_port(index)?;
        let a = Attachment {
            interface: iface.into(),
            ifindex: index,
            mode,
            adopted: was_adopted,
            fallback_reason,
        };
        log::info!(
            "{iface} (ifindex {index}): XDP {} in {} mode",
            if was_adopted { "adopted" } else { "attached" },
            mode.as_str()
        );
        self.links.insert(iface.into(), (a.clone(), link));
        self.watched
            .insert(iface.into(), (mode_setting, oper_up(iface)));
        Ok(a)
    }

    /// Checks every attached interface: one deleted and re-created (new
    /// ifindex) or whose link went defunct gets the program attached again;
    /// a vanished one is reported; link down/up is reported with whether XDP
    /// is still attached. Returns what it saw, for the log.
    pub fn check_interfaces(&mut self) -> Vec<(log::Level, String)> {
        let mut notes = Vec::new();
        let names: Vec<String> = self.watched.keys().cloned().collect();
        for name in names {
            let (setting, last_up) = self.watched[&name];
            let current = ifindex(&name);
            let Some((att, _)) = self.links.get(&name) else {
                // Vanished earlier; attach again once it is back.
                if current.is_some() {
                    match self.attach(&name, setting) {
                        Ok(a) => notes.push((
                            log::Level::Warn,
                            format!(
                                "{name} is back (ifindex {}): XDP attached again in {} mode",
                                a.ifindex,
                                a.mode.as_str()
                            ),
                        )),
                        Err(e) => notes.push((
                            log::Level::Error,
                            format!("{name} is back but attaching XDP failed: {e}"),
                        )),
                    }
                }
                continue;
            };
            let (old_index, mode) = (att.ifindex, att.mode);
            let defunct = self
                .bpffs
                .as_ref()
                .and_then(|b| link_ifindex(&link_pin_path(b, &name, mode)).ok())
                .is_some_and(|i| i != old_index);
            if current == Some(old_index) && !defunct {
                let up = oper_up(&name);
                if up != last_up {
                    if let Some(w) = self.watched.get_mut(&name) {
                        w.1 = up;
                    }
                    match up {
                        Some(false) => notes.push((log::Level::Warn, format!("{name}: link is down"))),
                        Some(true) => notes.push((log::Level::Info, format!("{name}: link is up again; XDP still attached (ifindex {old_index}, {} mode)", mode.as_str()))),
                        None => {}
                    }
                }
                continue;
            }
            // Gone, replaced, or the link lost its device: drop the old attachment.
            if let Some((a, link)) = self.links.remove(&name) {
                drop(link);
                if let Some(b) = &self.bpffs {
                    let _ = std::fs::remove_file(link_pin_path(b, &name, a.mode));
                }
                let _ = self.tx_ports.remove(a.ifindex);
                self.bump_flow_gen();
                self.bump_flow_gen();
            }
            match current {
                None => notes.push((log::Level::Warn, format!("{name} (ifindex {old_index}) disappeared; XDP will be attached again when it returns"))),
                Some(i) => match self.attach(&name, setting) {
                    Ok(a) => notes.push((log::Level::Warn, format!("{name} was re-created (ifindex {old_index} → {i}): XDP attached again in {} mode", a.mode.as_str()))),
                    Err(e) => notes.push((log::Level::Error, format!("{name} was re-created but attaching XDP failed: {e}"))),
                },
            }
        }
        notes
    }

    /// Lets the program redirect to interface `index` (done by `attach`).
    pub fn add_tx_port(&mut self, index: u32) -> Result<()> {
        self.tx_ports.insert(index, index, None, 0).map_err(|e| {
            DataplaneError::Invalid(format!("adding ifindex {index} to TX_PORTS: {e}"))
        })?;
        // Next hops looked up while it was missing went to the stack.
        self.bump_flow_gen();
        Ok(())
    }

    /// An XDP link pinned by a daemon of an older map layout
    /// (`<bpffs>/bgswitch/v<N>/links/`) holds the interface: this program is
    /// swapped into it (no detach, no gap in forwarding) and the pin moved
    /// here. The old layout's flows are not carried over (their maps have
    /// another shape): open connections are chosen afresh, which is logged.
    /// The old layout's directory goes once it holds no more links.
    fn adopt_older_layout(&mut self, iface: &str) -> Result<Option<(AttachMode, FdLink)>> {
        let Some(bpffs) = self.bpffs.clone() else {
            return Ok(None);
        };
        let current = paths::pin_root(&bpffs);
        let Ok(dirs) = std::fs::read_dir(bpffs.join(paths::PIN_DIR)) else {
            return Ok(None);
        };
        for dir in dirs.flatten() {
            let old_root = dir.path();
            let name = dir.file_name().to_string_lossy().into_owned();
            if old_root == current || !name.starts_with('v') {
                continue;
            }
            for m in AttachMode::ALL {
                let old_pin = old_root
                    .join("links")
                    .join(format!("{}-{iface}", m.as_str()));
                if !old_pin.exists() {
                    continue;
                }
                let link = match self.adopt_link(&old_pin, m) {
                    Ok(link) => link,
                    Err(e) => {
                        log::warn!(
                            "{iface}: XDP link {} of layout {name} is stale ({e}); attaching afresh",
                            old_pin.display()
                        );
                        let _ = std::fs::remove_file(&old_pin);
                        continue;
                    }
                };
                let new_pin = link_pin_path(&bpffs, iface, m);
                std::fs::rename(&old_pin, &new_pin)
                    .map_err(io_err("moving the link pin to", &new_pin))?;
                log::warn!(
                    "{iface}: took over the XDP link of map layout {name} (now v{}); flows recorded by the old layout are not carried over",
                    bgswitch_common::LAYOUT_VERSION
                );
                remove_layout_if_unused(&old_root);
                return Ok(Some((m, link)));
            }
        }
        Ok(None)
    }

    /// Swaps this daemon's program into a pinned link (atomic replace).
    fn adopt_link(&mut self, pin: &Path, mode: AttachMode) -> Result<FdLink> {
        let pinned =
            PinnedLink::from_pin(pin).map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        mode.adopt(&mut self.ebpf, FdLink::from(pinned))
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.links.values().map(|(a, _)| a.clone()).collect()
    }

    /// Removes `iface`'s attachment (and its pin).
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        self.watched.remove(iface);
        if let Some((a, link)) = self.links.remove(iface) {
            drop(link);
            if let Some(bpffs) = &self.bpffs {
                let pin = link_pin_path(bpffs, iface, a.mode);
                std::fs::remove_file(&pin).map_err(io_err("unpinning", &pin))?;
            }
            let _ = self.tx_ports.remove(a.ifindex);
            self.bump_flow_gen();
        }
        Ok(())
    }
}

/// The interface index of `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The name of the interface with index `index` in this network namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Whether `iface`'s operational state is up (`None` if unknown).
fn oper_up(iface: &str) -> Option<bool> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/operstate")).ok()?;
    match s.trim() {
        "up" | "unknown" => Some(true),
        "down" | "lowerlayerdown" | "notpresent" | "dormant" => Some(false),
        _ => None,
    }
}

/// The interface index a pinned XDP link is attached to (0 once its device
/// is gone), read with BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD.
fn link_ifindex(pin: &Path) -> io::Result<u32> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
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
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned here.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, (pad), then the union; xdp.ifindex at 16.
    let mut info = [0u8; 256];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: bpf(2) writing at most info.len() bytes into info.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}
