//! The data plane's clock and the flow-cache generation: what a kept next
//! hop or cache slot is judged by.

use crate::maps::FLOW_GEN;

/// `jiffies`: kernel ticks, plenty for idle timeouts; the verifier inlines
/// the helper into one load (the clock helpers are calls).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, no preconditions.
    unsafe { aya_ebpf::helpers::bpf_jiffies64() }
}

/// The flow-cache generation (see `bgswitch_common::CachedFlow`).
#[inline(always)]
pub fn flow_gen() -> u32 {
    match FLOW_GEN.get_ptr(0) {
        // SAFETY: an aligned load of an array slot (the low half is enough).
        Some(p) => unsafe { core::ptr::read_volatile(p) as u32 },
        None => 0,
    }
}
