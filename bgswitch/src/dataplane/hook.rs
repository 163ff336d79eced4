//! How the program meets an interface: the hook's modes (XDP native or
//! generic; TC through a tcx bpf_link, or a clsact filter made through
//! netlink before Linux 6.6), which mode a setting chooses and why, a
//! fresh attachment, one an earlier daemon left taken over (the program
//! swapped in atomically), and its removal. Attachments, pins, adoption,
//! re-attachment and detach (`attach.rs`) go through it and know nothing of
//! XDP or TC.

use std::{mem::ManuallyDrop, path::Path};

use aya::{
    programs::{
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle},
        xdp::XdpLink,
        Link as _, LinkOrder, ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf,
};
use bgswitch_common::{tail, PROGRAM_NAME, TC_PROGRAM_NAME};

use super::{DataplaneError, Result};
use crate::config::AttachSetting;

/// The mode an interface's program was attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// XDP in the driver: frames before any socket buffer exists.
    Native,
    /// XDP on socket buffers (slower; only when configured).
    Generic,
    /// TC (clsact ingress) through a tcx bpf_link (Linux 6.6+), pinned.
    Tc,
    /// TC through a clsact filter made with netlink (before Linux 6.6, or
    /// forced): it stays in the kernel until removed.
    TcNetlink,
}

/// The clsact filter bgswitch makes through netlink: its priority and
/// handle, fixed so a later daemon finds it.
const FILTER_PRIORITY: u16 = 0x4247;
const FILTER_HANDLE: u16 = 1;

/// Forces TC through netlink even where tcx exists (tests of the path
/// older kernels take).
const FORCE_NETLINK_ENV: &str = "BGSWITCH_TC_NETLINK";

/// A program's hold on an interface.
pub enum Held {
    /// A bpf_link (XDP, tcx), pinned while bgswitch serves the interface.
    Link(FdLink),
    /// A clsact filter made through netlink: it stays in the kernel until
    /// removed, so it is never detached by being dropped.
    Filter(ManuallyDrop<SchedClassifierLink>),
}

impl AttachMode {
    /// Every mode, in the order pins are looked for.
    pub const ALL: [AttachMode; 4] = [
        AttachMode::Native,
        AttachMode::Generic,
        AttachMode::Tc,
        AttachMode::TcNetlink,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Tc => "tc",
            Self::TcNetlink => "tc-netlink",
        }
    }

    /// Whether this is an XDP mode (the XDP program redirects to such
    /// interfaces only).
    pub fn is_xdp(self) -> bool {
        matches!(self, Self::Native | Self::Generic)
    }

    /// What status shows: the program type and how it is held.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Native => "XDP native",
            Self::Generic => "XDP generic",
            Self::Tc => "TC (tcx link)",
            Self::TcNetlink => "TC (clsact filter)",
        }
    }

    /// The modes `setting` tries on `iface`, in order, and why: a mode
    /// after the first is a fallback, logged and shown with its reason.
    /// `auto` takes native XDP on a device with a driver behind it (frames
    /// arrive complete) and TC on a virtual one (veth, bridge, tun/tap, …,
    /// whose frames may carry partial checksums), and TC where native XDP
    /// is refused; never generic XDP.
    pub fn choose(setting: AttachSetting, iface: &str) -> (Vec<AttachMode>, String) {
        let tc = Self::tc_kind();
        match setting {
            AttachSetting::Xdp => (vec![Self::Native], "configured: attach = \"xdp\"".into()),
            AttachSetting::XdpGeneric => (
                vec![Self::Generic],
                "configured: attach = \"xdp-generic\"".into(),
            ),
            AttachSetting::Tc => (vec![tc], "configured: attach = \"tc\"".into()),
            AttachSetting::Auto => match device_driver(iface) {
                Some(driver) => (
                    vec![Self::Native, tc],
                    format!(
                        "auto: a device with a driver ({driver}): frames arrive complete, native XDP"
                    ),
                ),
                None => (
                    vec![tc],
                    "auto: a virtual device (no driver behind it): frames may carry partial checksums, TC"
                        .into(),
                ),
            },
        }
    }

    /// TC through tcx where the kernel has it (6.6+), else netlink.
    fn tc_kind() -> AttachMode {
        let forced = std::env::var_os(FORCE_NETLINK_ENV).is_some_and(|v| v == "1");
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if tcx && !forced {
            Self::Tc
        } else {
            Self::TcNetlink
        }
    }

    /// Attaches this mode's program of `ebpf` to interface `iface`
    /// (`ifindex`). The inner error is the kernel refusing this mode (the
    /// caller may try the next); the outer one anything else.
    pub fn attach(
        self,
        ebpf: &mut Ebpf,
        iface: &str,
        ifindex: u32,
    ) -> Result<std::result::Result<Held, ProgramError>> {
        let link = match self {
            Self::Native | Self::Generic => {
                let prog = xdp_program(ebpf)?;
                let mode = if self == Self::Native {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let id = match prog.attach_to_if_index(ifindex, mode) {
                    Ok(id) => id,
                    Err(e) => return Ok(Err(e)),
                };
                let link = prog.take_link(id)?;
                return FdLink::try_from(link).map(|l| Ok(Held::Link(l))).map_err(|e| {
                    DataplaneError::Invalid(format!(
                        "the kernel attached XDP without a bpf_link ({e}); bgswitch needs Linux >= 5.9"
                    ))
                });
            }
            Self::Tc => {
                let prog = tc_program(ebpf)?;
                let options = TcAttachOptions::TcxOrder(LinkOrder::default());
                match prog.attach_with_options(iface, TcAttachType::Ingress, options) {
                    Ok(id) => prog.take_link(id)?,
                    Err(e) => return Ok(Err(e)),
                }
            }
            Self::TcNetlink => {
                if let Err(e) = tc::qdisc_add_clsact(iface) {
                    // One that is there already is fine.
                    if !is_exists(&e) {
                        return Ok(Err(ProgramError::from(e)));
                    }
                }
                let prog = tc_program(ebpf)?;
                let options = TcAttachOptions::Netlink(NlOptions {
                    priority: FILTER_PRIORITY,
                    handle: TcHandle::new(0, FILTER_HANDLE),
                    classid: None,
                });
                match prog.attach_with_options(iface, TcAttachType::Ingress, options) {
                    Ok(id) => return Ok(Ok(Held::Filter(ManuallyDrop::new(prog.take_link(id)?)))),
                    Err(e) => return Ok(Err(e)),
                }
            }
        };
        FdLink::try_from(link)
            .map(|l| Ok(Held::Link(l)))
            .map_err(|e| {
                DataplaneError::Invalid(format!("the tcx attachment is not a bpf_link: {e}"))
            })
    }

    /// Takes over what an earlier daemon left on `iface` in this mode (its
    /// link pinned at `pin`, or its filter), swapping this load's program
    /// in atomically: no gap in forwarding.
    pub fn adopt(self, ebpf: &mut Ebpf, iface: &str, pin: &Path) -> Result<Held> {
        let invalid = |e: &dyn std::fmt::Display| DataplaneError::Invalid(e.to_string());
        match self {
            Self::Native | Self::Generic => {
                let fd = FdLink::from(
                    aya::programs::links::PinnedLink::from_pin(pin).map_err(|e| invalid(&e))?,
                );
                let xdp_link = XdpLink::try_from(fd).map_err(|e| invalid(&e))?;
                let prog = xdp_program(ebpf)?;
                let id = prog.attach_to_link(xdp_link)?;
                let link = prog.take_link(id)?;
                Ok(Held::Link(FdLink::try_from(link).map_err(|e| invalid(&e))?))
            }
            Self::Tc => {
                let fd = FdLink::from(
                    aya::programs::links::PinnedLink::from_pin(pin).map_err(|e| invalid(&e))?,
                );
                let tc_link = SchedClassifierLink::try_from(fd).map_err(|e| invalid(&e))?;
                let prog = tc_program(ebpf)?;
                let id = prog.attach_to_link(tc_link)?;
                let link = prog.take_link(id)?;
                Ok(Held::Link(FdLink::try_from(link).map_err(|e| invalid(&e))?))
            }
            Self::TcNetlink => {
                let filter = SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Ingress,
                    FILTER_PRIORITY,
                    TcHandle::new(0, FILTER_HANDLE),
                    None,
                )
                .map_err(|e| invalid(&e))?;
                let prog = tc_program(ebpf)?;
                // Replaces the filter's program (no create: it must be there).
                let id = prog.attach_to_link(filter)?;
                Ok(Held::Filter(ManuallyDrop::new(prog.take_link(id)?)))
            }
        }
    }

    /// Pins what holds the interface at `pin`: the link, or for a netlink
    /// filter this load's TC program (the mark a later daemon finds it by).
    pub fn pin(self, ebpf: &mut Ebpf, held: Held, pin: &Path) -> Result<Held> {
        let io = |e: &dyn std::fmt::Display| DataplaneError::Io {
            op: "pinning at",
            path: pin.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        };
        match held {
            Held::Link(fd) => Ok(Held::Link(FdLink::from(fd.pin(pin).map_err(|e| io(&e))?))),
            Held::Filter(f) => {
                let _ = std::fs::remove_file(pin);
                tc_program(ebpf)?.pin(pin).map_err(|e| io(&e))?;
                Ok(Held::Filter(f))
            }
        }
    }
}

impl Held {
    /// Lets go of the interface: a link is dropped (it detaches once no pin
    /// or process holds it), a filter removed through netlink.
    pub fn release(self) -> Result<()> {
        match self {
            Held::Link(link) => {
                drop(link);
                Ok(())
            }
            Held::Filter(f) => ManuallyDrop::into_inner(f)
                .detach()
                .map_err(DataplaneError::Program),
        }
    }
}

/// Removes the netlink filter bgswitch made on `iface`, if there is one (a
/// mark pinned by a daemon that is gone).
pub fn remove_filter(iface: &str) {
    if let Ok(f) = SchedClassifierLink::attached(
        iface,
        TcAttachType::Ingress,
        FILTER_PRIORITY,
        TcHandle::new(0, FILTER_HANDLE),
        None,
    ) {
        let _ = f.detach();
    }
}

fn is_exists(e: &tc::TcError) -> bool {
    match e {
        tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
        tc::TcError::AlreadyAttached => true,
        _ => false,
    }
}

/// The driver behind `iface` (`/sys/class/net/IF/device/driver`), if it has
/// a device at all: physical NICs (and virtio-net) do; veth, bridges,
/// tun/tap, macvlan, dummy and the like do not.
fn device_driver(iface: &str) -> Option<String> {
    let dev = Path::new("/sys/class/net").join(iface).join("device");
    if !dev.exists() {
        return None;
    }
    Some(
        std::fs::read_link(dev.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "unknown".into()),
    )
}

/// The data plane's XDP program in `ebpf`, loaded on first use (a daemon
/// without XDP attachments does not pay for its verification), with the
/// programs it tail-calls (`bgswitch_common::tail`: IPv6, ICMP, too big)
/// loaded and put in its program array first.
pub(super) fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    with_tail_calls::<Xdp>(ebpf, PROGRAM_NAME, &tail::XDP, tail::XDP_MAP)
}

/// The data plane's TC program in `ebpf`, loaded on first use (a daemon
/// without TC attachments does not pay for its verification), with the
/// programs it tail-calls, as for XDP.
pub(super) fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    with_tail_calls::<SchedClassifier>(ebpf, TC_PROGRAM_NAME, &tail::TC, tail::TC_MAP)
}

/// What loading a program of either type takes.
trait Loadable {
    fn load_it(&mut self) -> std::result::Result<(), ProgramError>;
    fn loaded_fd(&self) -> std::result::Result<&aya::programs::ProgramFd, ProgramError>;
}

impl Loadable for Xdp {
    fn load_it(&mut self) -> std::result::Result<(), ProgramError> {
        self.load()
    }
    fn loaded_fd(&self) -> std::result::Result<&aya::programs::ProgramFd, ProgramError> {
        self.fd()
    }
}

impl Loadable for SchedClassifier {
    fn load_it(&mut self) -> std::result::Result<(), ProgramError> {
        self.load()
    }
    fn loaded_fd(&self) -> std::result::Result<&aya::programs::ProgramFd, ProgramError> {
        self.fd()
    }
}

/// The entry point `name`, loaded on first use after the programs it
/// tail-calls (`tails`, by index), which go in the program array `map`.
fn with_tail_calls<'a, P: Loadable + 'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
    tails: &[&str],
    map: &str,
) -> Result<&'a mut P>
where
    for<'b> &'b mut P: TryFrom<&'b mut aya::programs::Program, Error = ProgramError>,
{
    if program::<P>(ebpf, name)?.loaded_fd().is_err() {
        let mut fds = Vec::new();
        for tail_name in tails {
            let prog: &mut P = program(ebpf, tail_name)?;
            prog.load_it()?;
            fds.push(
                prog.loaded_fd()?
                    .try_clone()
                    .map_err(|e| DataplaneError::Io {
                        op: "duplicating the fd of",
                        path: (*tail_name).into(),
                        source: e,
                    })?,
            );
        }
        fill_tail_calls(ebpf, map, &fds)?;
        program::<P>(ebpf, name)?.load_it()?;
    }
    program(ebpf, name)
}

/// The program `name` of `ebpf`, as its type.
fn program<'a, P: 'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    for<'b> &'b mut P: TryFrom<&'b mut aya::programs::Program, Error = ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Invalid(format!("no program {name}")))?
        .try_into()?)
}

/// Puts the tail-called programs' `fds` in the program array `map`, at
/// their indexes.
fn fill_tail_calls(ebpf: &mut Ebpf, map: &str, fds: &[aya::programs::ProgramFd]) -> Result<()> {
    let data = ebpf
        .map_mut(map)
        .ok_or_else(|| DataplaneError::Invalid(format!("no map {map}")))?;
    let mut array = aya::maps::ProgramArray::try_from(data)
        .map_err(|e| DataplaneError::Invalid(format!("{map} is not a program array: {e}")))?;
    for (i, fd) in fds.iter().enumerate() {
        array
            .set(i as u32, fd, 0)
            .map_err(|e| DataplaneError::Invalid(format!("{map}[{i}]: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_tc_on_a_virtual_device_and_a_setting_says_why() {
        // Loopback has no driver behind it, like veth, bridges and tun/tap.
        let (tries, why) = AttachMode::choose(AttachSetting::Auto, "lo");
        assert_eq!(tries, [AttachMode::tc_kind()]);
        assert!(why.starts_with("auto: a virtual device"), "{why}");
        let (tries, why) = AttachMode::choose(AttachSetting::Xdp, "lo");
        assert_eq!(tries, [AttachMode::Native]);
        assert_eq!(why, "configured: attach = \"xdp\"");
        let (tries, _) = AttachMode::choose(AttachSetting::XdpGeneric, "lo");
        assert_eq!(tries, [AttachMode::Generic]);
        let (tries, _) = AttachMode::choose(AttachSetting::Tc, "lo");
        assert_eq!(tries, [AttachMode::tc_kind()]);
        assert!(AttachMode::ALL
            .iter()
            .all(|m| m.is_xdp() == matches!(m, AttachMode::Native | AttachMode::Generic)));
    }
}
