//! Attachments: the program on each configured interface, held through a
//! pinned link or filter (or taken over from what an earlier daemon left,
//! of this layout or an older one), the maps that say where the programs
//! may send (`TX_PORTS` for XDP, `ATTACHED` for all), the interfaces
//! watched for re-creation and link changes, and detach. How a program
//! meets an interface is the hook's (`hook.rs`); nothing here knows XDP or
//! TC.

use std::{ffi::CString, io, os::fd::AsRawFd as _, path::Path};

use bgswitch_common::{attach as kind, maps as map_names};

use super::{
    hook::{self, AttachMode, Held},
    io_err, map_err,
    pins::{link_pin_path, remove_layout_if_unused},
    Dataplane, DataplaneError, Result,
};
use crate::{config::AttachSetting, paths};

/// One attached interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// The program was swapped into what a previous daemon left.
    pub adopted: bool,
    /// Why this mode: the setting, or what `auto` saw.
    pub reason: String,
    /// The first mode `auto` tried was refused; why.
    pub fallback_reason: Option<String>,
}

impl Dataplane {
    /// Serves `iface` as `setting` asks: takes over what an earlier daemon
    /// left there in a mode the setting may use, or attaches afresh (then
    /// removes what was left in another mode: the interface is never
    /// without the program), and records where the programs may send.
    pub fn attach(&mut self, iface: &str, setting: AttachSetting) -> Result<Attachment> {
        let index = ifindex(iface).ok_or_else(|| DataplaneError::UnknownInterface(iface.into()))?;
        let (tries, reason) = AttachMode::choose(setting, iface);
        let mut kept: Option<(AttachMode, Held)> = None;
        let mut leftover = Vec::new();
        if let Some(bpffs) = self.bpffs.clone() {
            for m in AttachMode::ALL {
                let pin = link_pin_path(&bpffs, iface, m);
                if !pin.exists() {
                    continue;
                }
                if kept.is_some() || !tries.contains(&m) {
                    leftover.push(m);
                    continue;
                }
                match m.adopt(&mut self.ebpf, iface, &pin) {
                    Ok(held) => kept = Some((m, held)),
                    Err(e) => {
                        log::warn!(
                            "{iface}: what an earlier daemon pinned at {} is stale ({e}); attaching afresh",
                            pin.display()
                        );
                        let _ = std::fs::remove_file(&pin);
                        if m == AttachMode::TcNetlink {
                            hook::remove_filter(iface);
                        }
                    }
                }
            }
        }
        if kept.is_none() {
            kept = self.adopt_older_layout(iface, &tries)?;
        }
        let mut fallback_reason = None;
        let (mode, held, was_adopted) = match kept {
            Some((m, held)) => (m, held, true),
            None => {
                let mut last = None;
                let mut got = None;
                for (n, &m) in tries.iter().enumerate() {
                    match m.attach(&mut self.ebpf, iface, index) {
                        Ok(Ok(held)) => {
                            got = Some((m, held));
                            break;
                        }
                        Ok(Err(e)) => {
                            if let Some(next) = tries.get(n + 1) {
                                let why = format!("{} refused: {e}", m.describe());
                                log::warn!("{iface}: {why}; falling back to {}", next.describe());
                                fallback_reason = Some(why);
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
                let Some((m, held)) = got else {
                    let (m, source) = last.expect("at least one mode tried");
                    return Err(DataplaneError::Attach {
                        iface: iface.into(),
                        mode: m.as_str(),
                        source,
                    });
                };
                let held = match &self.bpffs {
                    Some(bpffs) => m.pin(&mut self.ebpf, held, &link_pin_path(bpffs, iface, m))?,
                    None => held,
                };
                (m, held, false)
            }
        };
        // What an earlier daemon left in another mode goes once this one
        // holds the interface.
        if let Some(bpffs) = self.bpffs.clone() {
            for m in leftover {
                let _ = std::fs::remove_file(link_pin_path(&bpffs, iface, m));
                if m == AttachMode::TcNetlink {
                    hook::remove_filter(iface);
                }
                log::warn!(
                    "{iface}: an earlier daemon served it with {}; now {} ({reason})",
                    m.describe(),
                    mode.describe()
                );
            }
        }
        self.release_older_layouts(iface);
        self.add_port(index, mode)?;
        let a = Attachment {
            interface: iface.into(),
            ifindex: index,
            mode,
            adopted: was_adopted,
            reason: reason.clone(),
            fallback_reason,
        };
        log::info!(
            "{iface} (ifindex {index}): {} {} ({reason})",
            mode.describe(),
            if was_adopted { "adopted" } else { "attached" },
        );
        self.links.insert(iface.into(), (a.clone(), held));
        self.watched.insert(iface.into(), (setting, oper_up(iface)));
        Ok(a)
    }

    /// Checks every attached interface: one deleted and re-created (new
    /// ifindex) or whose link went defunct gets the program attached again;
    /// a vanished one is reported; link down/up is reported with whether the
    /// program is still attached. Returns what it saw, for the log.
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
                                "{name} is back (ifindex {}): {} attached again",
                                a.ifindex,
                                a.mode.describe()
                            ),
                        )),
                        Err(e) => notes.push((
                            log::Level::Error,
                            format!("{name} is back but attaching failed: {e}"),
                        )),
                    }
                }
                continue;
            };
            let (old_index, mode) = (att.ifindex, att.mode);
            // A link's device, as the kernel has it (a netlink filter goes
            // with its device: the ifindex tells).
            let defunct = mode != AttachMode::TcNetlink
                && self
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
                        Some(false) => {
                            notes.push((log::Level::Warn, format!("{name}: link is down")))
                        }
                        Some(true) => notes.push((
                            log::Level::Info,
                            format!(
                                "{name}: link is up again; {} still attached (ifindex {old_index})",
                                mode.describe()
                            ),
                        )),
                        None => {}
                    }
                }
                continue;
            }
            // Gone, replaced, or the link lost its device: drop the old attachment.
            if let Some((a, held)) = self.links.remove(&name) {
                // A filter went with its device: nothing to remove.
                if let Held::Link(link) = held {
                    drop(link);
                }
                if let Some(b) = &self.bpffs {
                    let _ = std::fs::remove_file(link_pin_path(b, &name, a.mode));
                }
                self.remove_port(a.ifindex);
                self.bump_flow_gen();
            }
            match current {
                None => notes.push((log::Level::Warn, format!("{name} (ifindex {old_index}) disappeared; the program will be attached again when it returns"))),
                Some(i) => match self.attach(&name, setting) {
                    Ok(a) => notes.push((log::Level::Warn, format!("{name} was re-created (ifindex {old_index} → {i}): {} attached again", a.mode.describe()))),
                    Err(e) => notes.push((log::Level::Error, format!("{name} was re-created but attaching failed: {e}"))),
                },
            }
        }
        notes
    }

    /// Lets the programs send to interface `index`, served in `mode` (done
    /// by `attach`): `ATTACHED` for the TC program, `TX_PORTS` too for the
    /// XDP program's redirects when the mode is XDP.
    pub fn add_port(&mut self, index: u32, mode: AttachMode) -> Result<()> {
        let how = if mode.is_xdp() { kind::XDP } else { kind::TC };
        self.attached
            .insert(index, how, 0)
            .map_err(map_err(map_names::ATTACHED, "insert"))?;
        if mode.is_xdp() {
            self.tx_ports.insert(index, index, None, 0).map_err(|e| {
                DataplaneError::Invalid(format!("adding ifindex {index} to TX_PORTS: {e}"))
            })?;
        } else {
            let _ = self.tx_ports.remove(index);
        }
        // Next hops looked up while it was missing went to the stack.
        self.bump_flow_gen();
        Ok(())
    }

    /// The programs no longer send to interface `index`.
    fn remove_port(&mut self, index: u32) {
        let _ = self.tx_ports.remove(index);
        let _ = self.attached.remove(&index);
    }

    /// A link pinned by a daemon of an older map layout
    /// (`<bpffs>/bgswitch/v<N>/links/`) in one of the modes `tries` holds the
    /// interface: this program is swapped into it (no detach, no gap in
    /// forwarding) and the pin moved here. The old layout's flows are not
    /// carried over (their maps have another shape): open connections are
    /// chosen afresh, which is logged. The old layout's directory goes once
    /// it holds no more links.
    fn adopt_older_layout(
        &mut self,
        iface: &str,
        tries: &[AttachMode],
    ) -> Result<Option<(AttachMode, Held)>> {
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
            for &m in tries {
                let old_pin = old_root
                    .join("links")
                    .join(format!("{}-{iface}", m.as_str()));
                if !old_pin.exists() {
                    continue;
                }
                let link = match m.adopt(&mut self.ebpf, iface, &old_pin) {
                    Ok(link) => link,
                    Err(e) => {
                        log::warn!(
                            "{iface}: link {} of layout {name} is stale ({e}); attaching afresh",
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
                    "{iface}: took over the link of map layout {name} (now v{}); flows recorded by the old layout are not carried over",
                    bgswitch_common::LAYOUT_VERSION
                );
                remove_layout_if_unused(&old_root);
                return Ok(Some((m, link)));
            }
        }
        Ok(None)
    }

    /// What daemons of older map layouts left pinned on `iface` and this
    /// one did not take over (another mode): removed, now that this daemon
    /// holds the interface; an older layout's directory goes once it holds
    /// no more links.
    fn release_older_layouts(&mut self, iface: &str) {
        let Some(bpffs) = self.bpffs.clone() else {
            return;
        };
        let current = paths::pin_root(&bpffs);
        let Ok(dirs) = std::fs::read_dir(bpffs.join(paths::PIN_DIR)) else {
            return;
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
                if std::fs::remove_file(&old_pin).is_ok() {
                    if m == AttachMode::TcNetlink {
                        hook::remove_filter(iface);
                    }
                    log::warn!("{iface}: removed the {} of map layout {name}", m.describe());
                    remove_layout_if_unused(&old_root);
                }
            }
        }
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.links.values().map(|(a, _)| a.clone()).collect()
    }

    /// Removes `iface`'s attachment (and its pin).
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        self.watched.remove(iface);
        if let Some((a, held)) = self.links.remove(iface) {
            let released = held.release();
            if let Some(bpffs) = &self.bpffs {
                let pin = link_pin_path(bpffs, iface, a.mode);
                std::fs::remove_file(&pin).map_err(io_err("unpinning", &pin))?;
            }
            self.remove_port(a.ifindex);
            self.bump_flow_gen();
            released?;
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

/// The interface index a pinned link is attached to (0 once its device is
/// gone), read with BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD (the `xdp` and
/// `tcx` members of `bpf_link_info` both start with it).
fn link_ifindex(pin: &Path) -> io::Result<u32> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let fd = super::pins::open_pin(pin)?;
    // struct bpf_link_info: type, id, prog_id, (pad), then the union;
    // xdp.ifindex and tcx.ifindex at 16.
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
