//! Services, their pools and control words: a pool is written to a free
//! slot before one aligned 32-bit store of the control word selects it; a
//! flip, a canary share and the preview bit are that one store too.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key as LpmKey;
use bgswitch_common::{
    control, ipv4_to_addr, ipv6_to_addr, maps as names, port_to_wire, Backend, PreviewKey,
    ReplySource, ServiceKey, ServiceValue, ADDR_FILTER_WORDS, FAMILY_IPV4, FAMILY_IPV6,
    MAX_BACKENDS, MAX_SERVICES, POOL_SLOTS,
};

use super::{map_err, Dataplane, DataplaneError, Result};
use crate::model::Colour;

/// A pool slot that was just deselected is not rewritten for this long, so a
/// packet that read the old control word on another CPU has long finished.
const SLOT_QUARANTINE: Duration = Duration::from_millis(20);

/// The data plane form of an endpoint.
pub fn backend_of(addr: SocketAddr, stat_id: u32) -> Backend {
    let (a, family) = addr_of(addr.ip());
    Backend {
        addr: a,
        port: port_to_wire(addr.port()),
        family,
        _pad: 0,
        stat_id,
    }
}

/// The data plane form of an IP address and its family tag.
pub fn addr_of(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => (ipv4_to_addr(v4.octets()), FAMILY_IPV4),
        IpAddr::V6(v6) => (ipv6_to_addr(v6.octets()), FAMILY_IPV6),
    }
}

/// The `SERVICES` key of a virtual address.
pub fn service_key(vip: SocketAddr, proto: u8) -> ServiceKey {
    let (addr, family) = addr_of(vip.ip());
    ServiceKey {
        addr,
        port: port_to_wire(vip.port()),
        proto,
        family,
    }
}

/// A `PREVIEW` key's address and trie prefix length (32 for the service id,
/// then the CIDR's) as "ADDR/LEN" of the family given; `None` for a length
/// that family cannot have.
fn prefix_text(addr: &[u32; 4], bits: u32, v6: bool) -> Option<String> {
    let len = bits.checked_sub(32)?;
    let ip = if v6 {
        if len > 128 {
            return None;
        }
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        if len > 32 {
            return None;
        }
        IpAddr::from(addr[0].to_ne_bytes())
    };
    Some(format!("{ip}/{len}"))
}

/// Index of a configured backend's counters.
pub const fn backend_stat_id(service: u32, colour: Colour, index: u32) -> u32 {
    service * 2 * MAX_BACKENDS + colour.index() * MAX_BACKENDS + index
}

impl Dataplane {
    /// The control word of service `id`.
    pub fn control_word(&self, id: u32) -> u32 {
        self.control.load(id)
    }

    /// The backends in a pool slot.
    pub(super) fn read_pool(&self, id: u32, slot: u32) -> Result<Vec<Backend>> {
        let base = id * POOL_SLOTS + slot;
        let n = self
            .pool_sizes
            .get(&base, 0)
            .map_err(map_err(names::POOL_SIZES, "get"))?;
        (0..n.min(MAX_BACKENDS))
            .map(|i| {
                self.backends
                    .get(&(base * MAX_BACKENDS + i), 0)
                    .map_err(map_err(names::BACKENDS, "get"))
            })
            .collect()
    }

    fn write_pool(&mut self, id: u32, slot: u32, pool: &[Backend]) -> Result<()> {
        let base = id * POOL_SLOTS + slot;
        for (i, b) in pool.iter().enumerate() {
            self.backends
                .set(base * MAX_BACKENDS + i as u32, b, 0)
                .map_err(map_err(names::BACKENDS, "set"))?;
        }
        self.pool_sizes
            .set(base, pool.len() as u32, 0)
            .map_err(map_err(names::POOL_SIZES, "set"))
    }

    /// Makes service `id` serve `key` with these pools and active colour.
    /// Pools that differ from what the data plane has are written to free
    /// slots first; then one 32-bit store selects them (and the colour), so a
    /// packet sees either the old service or the new, never a mix.
    pub fn write_service(
        &mut self,
        id: u32,
        key: ServiceKey,
        blue: &[Backend],
        green: &[Backend],
        active: Colour,
    ) -> Result<()> {
        if id >= MAX_SERVICES {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} out of range"
            )));
        }
        for pool in [blue, green] {
            if pool.is_empty() || pool.len() > MAX_BACKENDS as usize {
                return Err(DataplaneError::Invalid(format!(
                    "a pool must have 1..={MAX_BACKENDS} backends"
                )));
            }
        }
        let old = self.control.load(id);
        let mut slots = [u32::MAX; 2];
        if control::orphan(old).is_some() && !self.transitions.contains_key(&id) {
            // A transition left by an earlier daemon: it lasts from now.
            self.transitions.insert(id, Instant::now());
        }
        if control::enabled(old) {
            for c in Colour::BOTH {
                let s = control::slot(old, c.index());
                let want = if c == Colour::Blue { blue } else { green };
                if self.read_pool(id, s)? == want {
                    slots[c.index() as usize] = s;
                }
            }
        }
        for c in Colour::BOTH {
            if slots[c.index() as usize] != u32::MAX {
                continue;
            }
            // The orphan pool stays untouched while its transition lasts.
            let in_use: Vec<u32> = if control::enabled(old) {
                let mut v = vec![control::slot(old, 0), control::slot(old, 1)];
                v.extend(control::orphan(old).map(|(_, s)| s));
                v
            } else {
                vec![]
            };
            let slot = self.free_slot(id, &in_use, &slots);
            let want = if c == Colour::Blue { blue } else { green };
            self.write_pool(id, slot, want)?;
            slots[c.index() as usize] = slot;
        }
        let canary = if control::enabled(old) {
            control::canary(old)
        } else {
            0
        };
        let word =
            control::encode(active.index(), slots[0], slots[1], canary) | (old & control::PREVIEW);
        let word = self.store_word(id, word);
        if control::enabled(old) {
            for c in 0..2 {
                let s = control::slot(old, c);
                if !slots.contains(&s) && control::orphan(word).map(|(_, o)| o) != Some(s) {
                    self.freed.insert((id, s), Instant::now());
                }
            }
        }
        // The address bitmaps first: a clear bit makes the program skip the
        // lookups below.
        self.filter_add(0, &key.addr);
        for b in blue.iter().chain(green) {
            self.filter_add(ADDR_FILTER_WORDS, &b.addr);
        }
        // Replies of every backend written here find their VIP. Entries of
        // backends that leave the pools stay (their open flows drain) until
        // the service goes.
        let source = ReplySource {
            vip: key.addr,
            vport: key.port,
            _pad: 0,
            service: id,
        };
        for b in blue.iter().chain(green) {
            let from = ServiceKey {
                addr: b.addr,
                port: b.port,
                proto: key.proto,
                family: b.family,
            };
            self.reply_sources
                .insert(from, source, 0)
                .map_err(map_err(names::REPLY_SOURCES, "insert"))?;
        }
        self.services
            .insert(key, ServiceValue { id }, 0)
            .map_err(map_err(names::SERVICES, "insert"))?;
        self.sync_service_index()
    }

    /// A slot not selected now nor by the new word, least recently freed;
    /// waits out the quarantine if it was freed just now.
    fn free_slot(&self, id: u32, in_use: &[u32], taken: &[u32; 2]) -> u32 {
        let mut best = None;
        for s in 0..POOL_SLOTS {
            if in_use.contains(&s) || taken.contains(&s) {
                continue;
            }
            let freed = self.freed.get(&(id, s)).copied();
            match (best, freed) {
                (None, _) => best = Some((s, freed)),
                (Some((_, Some(b))), Some(f)) if f < b => best = Some((s, freed)),
                (Some((_, Some(_))), None) => best = Some((s, None)),
                _ => {}
            }
        }
        let (slot, freed) = best.expect("8 slots, at most 5 excluded");
        if let Some(f) = freed {
            let age = f.elapsed();
            if age < SLOT_QUARANTINE {
                std::thread::sleep(SLOT_QUARANTINE - age);
            }
        }
        slot
    }

    /// Flips service `id` to `colour`: one aligned 32-bit store.
    pub fn set_active(&mut self, id: u32, colour: Colour) -> Result<()> {
        let old = self.control.load(id);
        if !control::enabled(old) {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is not configured"
            )));
        }
        let word = (old & !control::ACTIVE_MASK) | colour.index();
        self.store_word(id, word);
        Ok(())
    }

    /// Sends `basis_points` (0..=10000) of new flows to the idle colour: one
    /// 32-bit store.
    pub fn set_canary(&mut self, id: u32, basis_points: u32) -> Result<()> {
        let old = self.control.load(id);
        if !control::enabled(old) {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is not configured"
            )));
        }
        if basis_points > control::CANARY_FULL {
            return Err(DataplaneError::Invalid(format!(
                "canary share {basis_points} > 10000"
            )));
        }
        let word = (old & !(control::CANARY_MASK << control::CANARY_SHIFT))
            | (basis_points << control::CANARY_SHIFT);
        self.store_word(id, word);
        Ok(())
    }

    /// Makes new flows of service `id` from these source prefixes go to the
    /// idle colour (and only these: others of the service are removed).
    pub fn set_preview(&mut self, id: u32, prefixes: &[(IpAddr, u8)]) -> Result<()> {
        let old = self.control.load(id);
        if !control::enabled(old) {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is not configured"
            )));
        }
        let wanted: Vec<LpmKey<PreviewKey>> = prefixes
            .iter()
            .map(|(ip, len)| {
                let (addr, _) = addr_of(*ip);
                LpmKey::new(32 + u32::from(*len), PreviewKey { service: id, addr })
            })
            .collect();
        for k in &wanted {
            self.preview
                .insert(k, 1, 0)
                .map_err(map_err(names::PREVIEW, "insert"))?;
        }
        let stale: Vec<LpmKey<PreviewKey>> = self
            .preview
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                k.data().service == id
                    && !wanted
                        .iter()
                        .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        let bit = if wanted.is_empty() {
            0
        } else {
            control::PREVIEW
        };
        // Set the bit after adding entries, clear it before removing them.
        let word = (self.control.load(id) & !control::PREVIEW) | bit;
        self.store_word(id, word);
        for k in stale {
            match self.preview.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::PREVIEW, "remove")(e)),
            }
        }
        Ok(())
    }

    /// The preview prefixes the data plane holds for service `id`, of its
    /// VIP's family, as "ADDR/LEN", in the map's order.
    pub fn preview_prefixes(&self, id: u32) -> Result<Vec<String>> {
        let v6 = self
            .service_keys()?
            .iter()
            .any(|(k, v)| *v == id && k.family == FAMILY_IPV6);
        let mut out = Vec::new();
        for k in self.preview.keys() {
            let k = k.map_err(map_err(names::PREVIEW, "iterate"))?;
            let (data, bits) = (k.data(), k.prefix_len());
            if data.service != id {
                continue;
            }
            if let Some(p) = prefix_text(&data.addr, bits, v6) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Stops serving `key` (service `id`).
    pub fn remove_service(&mut self, id: u32, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(names::SERVICES, "remove")(e)),
        }
        self.control.store(id, 0);
        self.transitions.remove(&id);
        // The id may serve another VIP later; its old flows must not follow.
        self.flush_service(id)?;
        let gone: Vec<ServiceKey> = self
            .reply_sources
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.service == id)
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            match self.reply_sources.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::REPLY_SOURCES, "remove")(e)),
            }
        }
        self.rebuild_filter();
        self.sync_service_index()?;
        if !self.any_stable() {
            self.set_stateless_flag(false)?;
        }
        Ok(())
    }

    /// Removes only the `SERVICES` entry of `key`.
    pub fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(names::SERVICES, "remove")(e)),
        }
        self.sync_service_index()
    }

    /// The VIPs the data plane serves now, with their service ids.
    pub fn service_keys(&self) -> Result<Vec<(ServiceKey, u32)>> {
        self.services
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.id)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::SERVICES, "iterate"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgswitch_common::BACKEND_STAT_ENTRIES;

    #[test]
    fn preview_keys_read_back_in_their_family() {
        for (ip, len) in [
            ("198.18.0.0", 24u8),
            ("2001:db8:1::", 48),
            ("2001:db8::5", 128),
            ("0.0.0.0", 0),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let (addr, _) = addr_of(ip);
            assert_eq!(
                prefix_text(&addr, 32 + u32::from(len), ip.is_ipv6()).as_deref(),
                Some(format!("{ip}/{len}").as_str())
            );
        }
        assert_eq!(prefix_text(&[0; 4], 32 + 33, false), None);
        assert_eq!(prefix_text(&[0; 4], 31, true), None);
    }

    #[test]
    fn backend_stat_ids_do_not_collide() {
        let mut seen = std::collections::HashSet::new();
        for s in [0, 1, MAX_SERVICES - 1] {
            for c in Colour::BOTH {
                for i in [0, MAX_BACKENDS - 1] {
                    let id = backend_stat_id(s, c, i);
                    assert!(id < BACKEND_STAT_ENTRIES);
                    assert!(seen.insert(id));
                }
            }
        }
    }
}
