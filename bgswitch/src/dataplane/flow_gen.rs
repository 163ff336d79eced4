//! `FLOW_GEN`: one u64 that only userspace writes. Bumping it makes every
//! CPU's flow-cache slot and every kept next hop stale at once: after flow
//! deletions, interface changes, and the kernel's route, neighbour and
//! link notifications (`watch_kernel_changes`).

use std::{io, sync::atomic::Ordering, time::Duration};

use super::{mapped::MappedArray, Dataplane};
use crate::netlink;

/// The mapped `FLOW_GEN` counter: one u64 that only userspace writes.
pub(super) struct GenCounter(pub(super) MappedArray);

// SAFETY: the mapping is only accessed through atomics, and unmapped once
// (on drop of the last owner).
unsafe impl Send for GenCounter {}

// SAFETY: as above.
unsafe impl Sync for GenCounter {}

impl GenCounter {
    pub(super) fn word(&self) -> &std::sync::atomic::AtomicU64 {
        self.0.word64(0)
    }

    fn bump(&self) {
        self.word().fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn get(&self) -> u64 {
        self.word().load(Ordering::SeqCst)
    }
}

impl Dataplane {
    /// Invalidates every CPU's flow cache and every flow's cached next hop
    /// (see `bgswitch_common::CachedFlow`).
    pub fn bump_flow_gen(&self) {
        self.flow_gen.bump();
    }

    /// The current `FLOW_GEN` value.
    pub fn flow_gen(&self) -> u64 {
        self.flow_gen.get()
    }

    /// Starts a thread that listens to the kernel's route, neighbour,
    /// address, rule and link notifications (netlink, in the caller's
    /// network namespace) and bumps `FLOW_GEN` on each, so open flows look
    /// their next hop up again at once instead of at their next refresh.
    /// Bursts are folded: at most one bump per 10 ms after the first. The
    /// thread ends after this data plane is dropped.
    pub fn watch_kernel_changes(&self) -> io::Result<()> {
        let mut sock = netlink::RouteEvents::open()?;
        let gen = std::sync::Arc::downgrade(&self.flow_gen);
        std::thread::Builder::new()
            .name("bgswitch-netlink".into())
            .spawn(move || loop {
                match sock.wait(Duration::from_secs(1)) {
                    Ok(false) => {}
                    Ok(true) => {
                        let Some(g) = gen.upgrade() else { return };
                        g.bump();
                        drop(g);
                        std::thread::sleep(Duration::from_millis(10));
                        if sock.drain() {
                            if let Some(g) = gen.upgrade() {
                                g.bump();
                            }
                        }
                    }
                    Err(e) => {
                        log::warn!("netlink route events: {e}; next hops refresh on their own");
                        return;
                    }
                }
                if gen.strong_count() == 0 {
                    return;
                }
            })?;
        Ok(())
    }
}
