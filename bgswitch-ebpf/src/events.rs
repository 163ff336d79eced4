//! Rare events an operator should hear about — a frame bgswitch rewrote but
//! cannot forward itself, a flow it could not record, a pool with no
//! backends — logged through aya-log into the daemon's log. At most one
//! message per kind and CPU per [`LOG_INTERVAL_REFRESHES`] refreshes (one
//! second): the global counters say how often each happened. Nothing on the
//! established path logs.

use bgswitch_common::LOG_INTERVAL_REFRESHES;

use crate::{
    flow::now,
    maps::{LOG_GATE, SETTINGS},
};

/// Ticks between two messages of one kind on one CPU before the daemon
/// wrote the settings (one second at HZ 1000, four at HZ 250).
const INTERVAL_WITHOUT_SETTINGS: u64 = 1000;

/// Whether a message of `kind` (a `global` counter index) may be logged
/// now on this CPU; if so, the gate closes for the interval.
#[inline(always)]
pub fn gate(kind: u32) -> bool {
    let interval = SETTINGS.get(0).map_or(INTERVAL_WITHOUT_SETTINGS, |s| {
        s.refresh * LOG_INTERVAL_REFRESHES
    });
    let Some(last) = LOG_GATE.get_ptr_mut(kind) else {
        return false;
    };
    let now = now();
    // SAFETY: this CPU's slot; XDP runs are not nested on one CPU.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < interval {
            return false;
        }
        *last = now;
    }
    true
}
