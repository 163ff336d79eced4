//! How the program meets an interface: the hook's modes (XDP, native or
//! generic), the order a setting tries them in, a fresh link, and a pinned
//! link taken over (the program swapped in atomically with
//! `bpf_link_update`). Attachments, pins, adoption, re-attachment and
//! detach (`attach.rs`) go through it and know nothing of XDP.

use aya::{
    programs::{links::FdLink, xdp::XdpLink, ProgramError, Xdp, XdpMode},
    Ebpf,
};
use bgswitch_common::PROGRAM_NAME;

use super::{DataplaneError, Result};
use crate::config::XdpModeSetting;

/// The mode an interface's program was attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
}

impl AttachMode {
    /// Every mode, in the order pins are looked for.
    pub const ALL: [AttachMode; 2] = [AttachMode::Native, AttachMode::Generic];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    /// The modes `setting` tries, in order; a mode after the first is a
    /// fallback, which is logged and shown with its reason.
    pub fn tries(setting: XdpModeSetting) -> &'static [AttachMode] {
        match setting {
            XdpModeSetting::Auto => &[AttachMode::Native, AttachMode::Generic],
            XdpModeSetting::Native => &[AttachMode::Native],
            XdpModeSetting::Generic => &[AttachMode::Generic],
        }
    }

    /// Attaches the program of `ebpf` to interface `ifindex` in this mode:
    /// a bpf_link, which the caller pins. The inner error is the kernel
    /// refusing this mode (the caller may try the next); the outer one
    /// anything else.
    pub fn attach(
        self,
        ebpf: &mut Ebpf,
        ifindex: u32,
    ) -> Result<std::result::Result<FdLink, ProgramError>> {
        let prog = program(ebpf)?;
        let id = match prog.attach_to_if_index(ifindex, self.xdp_mode()) {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let link = prog.take_link(id)?;
        FdLink::try_from(link).map(Ok).map_err(|e| {
            DataplaneError::Invalid(format!(
                "the kernel attached XDP without a bpf_link ({e}); bgswitch needs Linux >= 5.9"
            ))
        })
    }

    /// Swaps the program of `ebpf` into `pinned`, a link of this hook an
    /// earlier daemon pinned (atomic: no gap in forwarding).
    pub fn adopt(self, ebpf: &mut Ebpf, pinned: FdLink) -> Result<FdLink> {
        let xdp_link =
            XdpLink::try_from(pinned).map_err(|e| DataplaneError::Invalid(e.to_string()))?;
        let prog = program(ebpf)?;
        let id = prog.attach_to_link(xdp_link)?;
        let link = prog.take_link(id)?;
        FdLink::try_from(link).map_err(|e| DataplaneError::Invalid(e.to_string()))
    }

    fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// The data plane's XDP program in `ebpf`.
pub(super) fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| DataplaneError::Invalid(format!("no program {PROGRAM_NAME}")))?
        .try_into()?)
}
