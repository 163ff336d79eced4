//! Stable periods and transitions of stateless services, and the address
//! filter (`ADDR_FILTER`) that holds the stateless slots and the VIP and
//! backend bitmaps. Only `store_word` writes a control word after setup.

use std::{sync::atomic::Ordering, time::Instant};

use bgswitch_common::{
    control, maps as names, ServiceKey, Settings, ADDR_FILTER_WORDS, FAMILY_IPV4, SERVICE_INDEX,
    SERVICE_SHARED, STATELESS_SLOTS,
};

use super::{map_err, Dataplane, DataplaneError, Result};
use crate::model::Colour;

/// The `ADDR_FILTER` word of service `id`'s stateless slot, and the entry
/// that says "this is service `id` in a stable period".
fn stateless_slot_of(key: &ServiceKey, id: u32) -> (u32, u64) {
    (
        2 * ADDR_FILTER_WORDS + bgswitch_common::stateless_slot(key.addr[0], key.port),
        bgswitch_common::stateless_entry(key.addr[0], key.port, id),
    )
}

impl Dataplane {
    /// Stores service `id`'s control word `new` (its stateless and orphan
    /// bits are this function's): a stable period of a stateless service
    /// lasts while the active colour, its pool slot, no canary and no
    /// preview stay and the service may run stateless; any other word
    /// starts a transition, whose orphan pool is the stable period's, in the
    /// same store. In a transition, the orphan pool stays. Returns the word
    /// stored.
    pub(super) fn store_word(&mut self, id: u32, new: u32) -> u32 {
        let old = self.control.load(id);
        let keep = new & !(control::STATELESS | control::ORPHAN_BITS);
        let word = if control::enabled(old) && control::stateless(old) {
            let active = control::active(old);
            let stable = control::active(keep) == active
                && control::slot(keep, active) == control::slot(old, active)
                && self.may_be_stable(id, keep);
            if stable {
                keep | control::STATELESS
            } else {
                self.transitions.insert(id, Instant::now());
                control::with_orphan(keep, active, control::slot(old, active))
            }
        } else if control::enabled(old) {
            keep | (old & control::ORPHAN_BITS)
        } else {
            keep
        };
        self.control.store(id, word);
        if control::stateless(old) && !control::stateless(word) {
            // The stateless slot goes after the word: a packet that still
            // finds it reads the word and takes the table path.
            self.rebuild_filter();
            if !self.any_stable() {
                // Failing, the flag stays on: one load per TCP packet more.
                let _ = self.set_stateless_flag(false);
            }
        }
        word
    }

    /// Whether service `id` may be in a stable period under word `w`:
    /// allowed to run stateless, no canary share, no preview prefixes.
    fn may_be_stable(&self, id: u32, w: u32) -> bool {
        self.stateless.contains(&id) && control::canary(w) == 0 && w & control::PREVIEW == 0
    }

    /// Whether service `id` would start a stable period if its transition
    /// ended now.
    pub fn may_start_stable_period(&self, id: u32) -> bool {
        self.may_be_stable(id, self.control.load(id))
    }

    /// `old` without its orphan pool: the transition is over here, and the
    /// orphan pool's slot, unless a colour uses it, is freed (quarantined).
    pub(super) fn without_orphan(&mut self, id: u32, old: u32) -> u32 {
        self.transitions.remove(&id);
        if let Some((_, s)) = control::orphan(old) {
            if s != control::slot(old, 0) && s != control::slot(old, 1) {
                self.freed.insert((id, s), Instant::now());
            }
        }
        old & !control::ORPHAN_BITS
    }

    /// Lets service `id` run stateless in its stable periods, or not (not
    /// configured so, or the host's routing rules make a backend's next hop
    /// depend on the client): a stable period in course ends in a
    /// transition at once.
    pub fn set_stateless(&mut self, id: u32, allowed: bool) {
        if allowed {
            self.stateless.insert(id);
            return;
        }
        self.stateless.remove(&id);
        let old = self.control.load(id);
        if control::stateless(old) {
            self.store_word(id, old);
        }
    }

    /// Whether service `id` is in a stable period (stateless now).
    pub fn is_stateless(&self, id: u32) -> bool {
        control::stateless(self.control.load(id))
    }

    /// When service `id`'s transition began, if it has an orphan pool.
    pub fn transition_since(&self, id: u32) -> Option<Instant> {
        control::orphan(self.control.load(id))?;
        Some(
            self.transitions
                .get(&id)
                .copied()
                .unwrap_or_else(Instant::now),
        )
    }

    /// The colour whose connections of the last stateless period may still
    /// be open without a record (the orphan pool's), if any.
    pub fn untracked_colour(&self, id: u32) -> Option<Colour> {
        let w = self.control.load(id);
        if control::stateless(w) {
            return Some(Colour::from_index(control::active(w)));
        }
        control::orphan(w).map(|(c, _)| Colour::from_index(c))
    }

    /// Ends a transition of service `id` if its control word is still
    /// `expected` (what the scan that cleared it saw): the orphan pool goes,
    /// and a service that may run stateless starts a stable period (its
    /// `ADDR_FILTER` slot first, then the word), and the records of the transition
    /// go, which nothing reads in a stable period and a later transition
    /// must not find. Returns whether it ended, and how many records went.
    pub fn end_transition(&mut self, id: u32, expected: u32) -> Result<Option<u64>> {
        let old = self.control.load(id);
        if old != expected || !control::enabled(old) || control::stateless(old) {
            return Ok(None);
        }
        // The VIP of a service that may be stable; an IPv6 one never is
        // (the program serves IPv6 through the flow table only).
        let stable_key = if self.may_be_stable(id, old) {
            let key = self
                .service_keys()?
                .into_iter()
                .find(|(_, v)| *v == id)
                .map(|(k, _)| k)
                .ok_or_else(|| DataplaneError::Invalid(format!("service id {id} has no VIP")))?;
            (key.family == FAMILY_IPV4).then_some(key)
        } else {
            None
        };
        let stable = stable_key.is_some();
        let mut word = self.without_orphan(id, old);
        if let Some(key) = stable_key {
            // Its slot, unless another stable service holds it (then its
            // packets find the word through `SERVICES`, more slowly).
            let (i, entry) = stateless_slot_of(&key, id);
            let slot = self.addr_filter.word64(i);
            let held = slot.load(Ordering::SeqCst);
            if held & bgswitch_common::STATELESS_VALID == 0 || held == entry {
                slot.store(entry, Ordering::SeqCst);
            }
            word |= control::STATELESS;
            self.set_stateless_flag(true)?;
        }
        self.control.store(id, word);
        let flushed = if stable { self.flush_service(id)? } else { 0 };
        Ok(Some(flushed))
    }

    /// Whether some service's control word is in a stable period.
    pub(super) fn any_stable(&self) -> bool {
        self.services
            .iter()
            .flatten()
            .any(|(_, v)| control::stateless(self.control.load(v.id)))
    }

    /// Lets table services' new IPv4 flows take their backend's kept next
    /// hop (`BACKEND_HOPS`) instead of a `bpf_fib_lookup` each: only while
    /// the host's IPv4 routing rules select by destination alone (the
    /// daemon reads them once a second), so the next hop towards a backend
    /// is the same for every client. Off until said; written into
    /// `SETTINGS` now if settings are written, else with them.
    pub fn set_backend_hops(&mut self, on: bool) -> Result<()> {
        self.backend_hops = on;
        self.set_settings_flag(|s| &mut s.backend_hops, on)
    }

    /// Sets `Settings::stateless` (once settings are written): on before a
    /// stable period starts, off after the last one ended.
    pub(super) fn set_stateless_flag(&mut self, on: bool) -> Result<()> {
        self.set_settings_flag(|s| &mut s.stateless, on)
    }

    /// Sets one flag byte of `SETTINGS` (once settings are written), a
    /// whole-entry update only when it changes.
    fn set_settings_flag(&mut self, flag: fn(&mut Settings) -> &mut u8, on: bool) -> Result<()> {
        let Some(mut s) = self.settings_now else {
            return Ok(());
        };
        if (*flag(&mut s) != 0) == on {
            return Ok(());
        }
        *flag(&mut s) = u8::from(on);
        self.settings
            .set(0, s, 0)
            .map_err(map_err(names::SETTINGS, "set"))?;
        self.settings_now = Some(s);
        Ok(())
    }

    /// Sets `addr`'s bit in the `ADDR_FILTER` bitmap at word `base`.
    pub(super) fn filter_add(&self, base: u32, addr: &bgswitch_common::Addr) {
        let (word, mask) = bgswitch_common::addr_bit(addr);
        self.addr_filter
            .word64(base + word)
            .fetch_or(mask, Ordering::SeqCst);
    }

    /// Recomputes the bitmaps from the services and reply sources there are
    /// (after a service went, with its flows) and the services in a stable
    /// period: each word is stored whole, and a bit still needed is set
    /// before and after, so no packet ever sees it clear.
    pub(super) fn rebuild_filter(&self) {
        // Up to the services' index, which `sync_service_index` keeps.
        let mut bits = vec![0u64; SERVICE_INDEX as usize];
        let mut services: Vec<(ServiceKey, u32)> = self
            .services
            .iter()
            .flatten()
            .map(|(k, v)| (k, v.id))
            .collect();
        // The slot of a service that holds it now stays its own.
        let now_held = |k: &ServiceKey, id: u32| {
            let (i, entry) = stateless_slot_of(k, id);
            self.addr_filter.word64(i).load(Ordering::SeqCst) == entry
        };
        services.sort_by_key(|(k, id)| (!now_held(k, *id), *id));
        for (k, id) in services {
            let (w, m) = bgswitch_common::addr_bit(&k.addr);
            bits[w as usize] |= m;
            if control::stateless(self.control.load(id)) {
                let (i, entry) = stateless_slot_of(&k, id);
                if bits[i as usize] == 0 {
                    bits[i as usize] = entry;
                }
            }
        }
        for k in self.reply_sources.keys().flatten() {
            let (w, m) = bgswitch_common::addr_bit(&k.addr);
            bits[(ADDR_FILTER_WORDS + w) as usize] |= m;
        }
        for (i, b) in bits.into_iter().enumerate() {
            self.addr_filter.word64(i as u32).store(b, Ordering::SeqCst);
        }
    }

    /// The IPv4 services' index as `SERVICES` has it now, one word per slot
    /// (`bgswitch_common::SERVICE_INDEX`): a slot of two services or more
    /// is shared. An error reading `SERVICES` is returned, never taken for
    /// an empty table (that would stop serving the services it missed).
    fn service_index(&self) -> Result<Vec<u64>> {
        let mut words = vec![0u64; STATELESS_SLOTS as usize];
        for (k, id) in self.service_keys()? {
            if k.family != FAMILY_IPV4 {
                continue;
            }
            let w = &mut words[bgswitch_common::stateless_slot(k.addr[0], k.port) as usize];
            *w = if *w == 0 {
                bgswitch_common::service_entry(k.addr[0], k.port, k.proto, id)
            } else {
                SERVICE_SHARED
            };
        }
        Ok(words)
    }

    /// Brings the services' index in line with `SERVICES` (after a service
    /// was written or went, or one of its VIPs was removed): each slot that
    /// changes is stored whole. A service is found through it only once
    /// `SERVICES` has it, and is no longer found once its entry went.
    pub(super) fn sync_service_index(&self) -> Result<()> {
        for (slot, e) in (0..).zip(self.service_index()?) {
            let word = self.addr_filter.word64(SERVICE_INDEX + slot);
            if word.load(Ordering::SeqCst) != e {
                word.store(e, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}
