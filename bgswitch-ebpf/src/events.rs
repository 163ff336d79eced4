//! Rare events an operator should hear about — a frame bgswitch rewrote but
//! cannot forward itself, a flow it could not record, a pool with no
//! backends — logged through aya-log into the daemon's log. About one
//! message per kind per [`LOG_INTERVAL_REFRESHES`] refreshes (one second),
//! whatever the number of CPUs: the global counters say how often each
//! happened. Nothing on the established path logs.

use bgswitch_common::LOG_INTERVAL_REFRESHES;

use crate::{
    clock::now,
    maps::{LOG_GATE, SETTINGS},
};

/// Ticks between two messages of one kind before the daemon wrote the
/// settings (one second at HZ 1000, four at HZ 250).
const INTERVAL_WITHOUT_SETTINGS: u64 = 1000;

/// Whether a message of `kind` (a `global` counter index) may be logged
/// now; if so, the gate closes for the interval. The gate is shared by all
/// CPUs (plain aligned 64-bit loads and stores, no lock): CPUs that pass it
/// at the same moment may each log once, so a burst on many CPUs gives a
/// few messages, not one per CPU every second.
#[inline(always)]
pub fn gate(kind: u32) -> bool {
    let interval = SETTINGS.get(0).map_or(INTERVAL_WITHOUT_SETTINGS, |s| {
        s.refresh * LOG_INTERVAL_REFRESHES
    });
    let Some(last) = LOG_GATE.get_ptr_mut(kind) else {
        return false;
    };
    let now = now();
    // SAFETY: an aligned array slot; single 64-bit loads and stores.
    unsafe {
        let seen = core::ptr::read_volatile(last);
        if seen != 0 && now.wrapping_sub(seen) < interval {
            return false;
        }
        core::ptr::write_volatile(last, now);
    }
    true
}
