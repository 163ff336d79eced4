//! Reading the flow tables, `FLOWS` (IPv4) and `FLOWS6` (IPv6), and the
//! half-open tables beside them (`HALF_OPEN`, `HALF_OPEN6`: TCP flows
//! before their handshake completes), with BPF_MAP_LOOKUP_BATCH (off the
//! daemon's loop when they are large) to count live, unanswered, preview
//! and disagreeing flows, and flushing a service's flows from all four.

use std::{
    collections::HashMap as StdHashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData};

use bgswitch_common::{
    control, flow_flags, Addr, Backend, FlowEntry, FlowEntry6, FlowKey, FlowKey4, HalfOpen4,
    HalfOpen6, FAMILY_IPV4,
};

use super::{io_err, map_err, Dataplane, DataplaneError, Result};
use crate::model::Colour;

/// The live flows of one colour of one service, counted from the flow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowCounts {
    /// Forward entries still open: UDP seen within the idle timeout, TCP not
    /// closed (FIN both ways or RST) and seen within the TCP idle timeout.
    pub live: u64,
    /// Forward entries in the table, live or not.
    pub recorded: u64,
    /// TCP flows whose SYN got no SYN-ACK (nor RST) within the SYN timeout.
    pub unanswered: u64,
    /// Flows sent to this colour by a preview prefix.
    pub preview: u64,
    /// Of a service in a transition: live entries whose backend is not the
    /// one the active pool's hash chooses (a stable period can start only
    /// without any).
    pub disagreeing: u64,
}

/// Kernel memory one flow takes in an LRU hash table with keys of `key`
/// bytes and values of `value` bytes: the element (a 48-byte header, key
/// and value each rounded up to 8 bytes) and its bucket (16 bytes; the
/// table has one per element at a power-of-two size). For `FLOWS` this is
/// the 160 bytes the bench measures (`bench/RESULTS.md`, part 5).
pub const fn kernel_bytes_per_flow(key: usize, value: usize) -> usize {
    48 + key.next_multiple_of(8) + value.next_multiple_of(8) + 16
}

/// Kernel memory per IPv4 flow (`FLOWS`) and per IPv6 flow (`FLOWS6`).
pub const FLOW_BYTES_V4: usize = kernel_bytes_per_flow(
    std::mem::size_of::<FlowKey4>(),
    std::mem::size_of::<FlowEntry>(),
);
pub const FLOW_BYTES_V6: usize = kernel_bytes_per_flow(
    std::mem::size_of::<FlowKey>(),
    std::mem::size_of::<FlowEntry6>(),
);

/// A TCP SYN unanswered for this long counts as an error.
pub const SYN_TIMEOUT_S: u64 = 2;

/// A half-open record (a handshake not completed) idle this long is no
/// longer live: a client retries its SYN within this time (Linux: after 1,
/// 3, 7, 15 and 31 s), and a SYN flood's records stop holding up
/// `--wait-drained` this long after the flood.
pub const HALF_OPEN_LIVE_S: u64 = 32;

/// One table of flows: its map, and a duplicate of its descriptor for
/// batch reads (aya 0.14 has no batch API).
pub(super) struct Table<K, V> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
    fd: OwnedFd,
}

impl<K: aya::Pod + Default, V: aya::Pod + Default> Table<K, V> {
    /// The LRU hash `map`, pinned or loaded as `name`.
    pub(super) fn open(name: &'static str, map: Map) -> Result<Self> {
        let Map::LruHashMap(d) = &map else {
            return Err(DataplaneError::Invalid(format!(
                "{name} is not an LRU hash"
            )));
        };
        let fd = dup_fd(name, d.fd().as_fd())?;
        let map = HashMap::try_from(map).map_err(map_err(name, "open"))?;
        Ok(Table { name, map, fd })
    }

    /// Every entry: read in batches (BPF_MAP_LOOKUP_BATCH, thousands of
    /// entries per syscall), or entry by entry where the kernel refuses
    /// batches.
    fn entries(&self) -> Result<Vec<(K, V)>> {
        read_all(self.name, self.fd.as_fd(), || {
            let mut v = Vec::new();
            for item in self.map.iter() {
                match item {
                    Ok(kv) => v.push(kv),
                    // Evicted between "next key" and "lookup": skip it.
                    Err(aya::maps::MapError::KeyNotFound) => continue,
                    Err(e) => return Err(map_err(self.name, "iterate")(e)),
                }
            }
            Ok(v)
        })
    }

    /// A descriptor of the table for a read on another thread.
    fn dup(&self) -> Result<OwnedFd> {
        dup_fd(self.name, self.fd.as_fd())
    }

    /// Removes the entries `doomed` picks; how many it removed (one gone
    /// meanwhile does not count).
    fn remove_where(&mut self, doomed: impl Fn(&V) -> bool) -> Result<u64> {
        let keys: Vec<K> = self
            .entries()?
            .into_iter()
            .filter(|(_, v)| doomed(v))
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for k in keys {
            match self.map.remove(&k) {
                Ok(()) => removed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(self.name, "remove")(e)),
            }
        }
        Ok(removed)
    }
}

/// A half-open table's bucket ([`HalfOpen4`], [`HalfOpen6`]) as read
/// here: the record each of its two ways holds whole, if any.
pub(super) trait Bucket: aya::Pod + Default + PartialEq {
    type K: Copy;
    type V: Copy;
    fn way(&self, w: usize) -> Option<(Self::K, Self::V)>;
    /// Empties way `w`.
    fn clear(&mut self, w: usize);
}

impl Bucket for HalfOpen4 {
    type K = FlowKey4;
    type V = FlowEntry;
    fn way(&self, w: usize) -> Option<(FlowKey4, FlowEntry)> {
        self.holds(w).then(|| (self.key[w], self.entry[w]))
    }
    fn clear(&mut self, w: usize) {
        self.seal[w] = 0;
    }
}

impl Bucket for HalfOpen6 {
    type K = FlowKey;
    type V = FlowEntry6;
    fn way(&self, w: usize) -> Option<(FlowKey, FlowEntry6)> {
        self.holds(w).then(|| (self.key[w], self.entry[w]))
    }
    fn clear(&mut self, w: usize) {
        self.seal[w] = 0;
    }
}

/// One half-open table: an array of two-way buckets, one per hash of the
/// 5-tuple (`bgswitch_common::HalfOpen`), most ways empty.
pub(super) struct HalfTable<B: aya::Pod> {
    name: &'static str,
    map: Array<MapData, B>,
    fd: OwnedFd,
}

impl<B: Bucket> HalfTable<B> {
    /// The array `map`, pinned or loaded as `name`.
    pub(super) fn open(name: &'static str, map: Map) -> Result<Self> {
        let Map::Array(d) = &map else {
            return Err(DataplaneError::Invalid(format!("{name} is not an array")));
        };
        let fd = dup_fd(name, d.fd().as_fd())?;
        let map = Array::try_from(map).map_err(map_err(name, "open"))?;
        Ok(HalfTable { name, map, fd })
    }

    /// Every bucket, with its index: in batches, or one by one where the
    /// kernel refuses batches.
    fn buckets(&self) -> Result<Vec<(u32, B)>> {
        read_all(self.name, self.fd.as_fd(), || {
            (0..self.map.len())
                .map(|i| Ok((i, self.bucket(i)?)))
                .collect()
        })
    }

    /// Bucket `i`.
    fn bucket(&self, i: u32) -> Result<B> {
        self.map.get(&i, 0).map_err(map_err(self.name, "read"))
    }

    /// The records the table holds.
    fn entries(&self) -> Result<Vec<(B::K, B::V)>> {
        Ok(held(self.buckets()?))
    }

    /// A descriptor of the table for a read on another thread.
    fn dup(&self) -> Result<OwnedFd> {
        dup_fd(self.name, self.fd.as_fd())
    }

    /// Empties the ways whose records `doomed` picks; how many it emptied.
    /// A bucket is written only if it still holds what was read (the data
    /// plane may have given a way to another flow meanwhile; a record
    /// taken between that second read and the write is lost, which costs
    /// its flow the path of a missing record, no more).
    fn remove_where(&mut self, doomed: impl Fn(&B::V) -> bool) -> Result<u64> {
        let mut removed = 0;
        for (i, read) in self.buckets()? {
            let mut b = read;
            let mut n = 0;
            for w in 0..2 {
                if read.way(w).is_some_and(|(_, v)| doomed(&v)) {
                    b.clear(w);
                    n += 1;
                }
            }
            if n == 0 || self.map.get(&i, 0).map_err(map_err(self.name, "read"))? != read {
                continue;
            }
            self.map.set(i, b, 0).map_err(map_err(self.name, "clear"))?;
            removed += n;
        }
        Ok(removed)
    }
}

/// A duplicate of the descriptor of the map `name`.
fn dup_fd(name: &str, fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned()
        .map_err(io_err("duplicating the descriptor of", Path::new(name)))
}

/// Every entry of the map `name`, in batches (BPF_MAP_LOOKUP_BATCH), or by
/// `one_by_one` where the kernel refuses batches (`EINVAL`, `ENOTSUPP`).
fn read_all<K: Copy + Default, V: Copy + Default>(
    name: &str,
    fd: BorrowedFd<'_>,
    one_by_one: impl FnOnce() -> Result<Vec<(K, V)>>,
) -> Result<Vec<(K, V)>> {
    match lookup_batch::<K, V>(fd) {
        Ok(v) => Ok(v),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(524) => {
            one_by_one()
        }
        Err(e) => Err(DataplaneError::Io {
            op: "BPF_MAP_LOOKUP_BATCH on",
            path: name.into(),
            source: e,
        }),
    }
}

/// The records among a half-open table's buckets.
fn held<B: Bucket>(buckets: Vec<(u32, B)>) -> Vec<(B::K, B::V)> {
    buckets
        .iter()
        .flat_map(|(_, b)| [b.way(0), b.way(1)])
        .flatten()
        .collect()
}

/// The flow tables of both families, and their half-open tables.
pub(super) struct FlowTables {
    pub(super) v4: Table<FlowKey4, FlowEntry>,
    pub(super) v6: Table<FlowKey, FlowEntry6>,
    pub(super) half4: HalfTable<HalfOpen4>,
    pub(super) half6: HalfTable<HalfOpen6>,
}

/// Every entry of the four tables, as read at one time.
#[derive(Default)]
struct Entries {
    v4: Vec<(FlowKey4, FlowEntry)>,
    v6: Vec<(FlowKey, FlowEntry6)>,
    half4: Vec<(FlowKey4, FlowEntry)>,
    half6: Vec<(FlowKey, FlowEntry6)>,
}

/// A flow-table read prepared on the daemon's loop, to run on another
/// thread (see `Dataplane::flow_scan`).
pub struct FlowScan {
    /// The tables' descriptors, in `FlowTables`' order.
    fds: [OwnedFd; 4],
    rules: FlowRules,
    /// The control word of each service in a transition when the scan was
    /// prepared (`Dataplane::end_transition` wants it unchanged).
    pub words: StdHashMap<u32, u32>,
}

impl FlowScan {
    /// Reads the whole tables (batches), and counts them.
    pub fn count(&self) -> io::Result<StdHashMap<(u32, Colour), FlowCounts>> {
        let [v4, v6, h4, h6] = &self.fds;
        Ok(self.rules.count_entries(Entries {
            v4: lookup_batch(v4.as_fd())?,
            v6: lookup_batch(v6.as_fd())?,
            half4: held(lookup_batch::<u32, HalfOpen4>(h4.as_fd())?),
            half6: held(lookup_batch::<u32, HalfOpen6>(h6.as_fd())?),
        }))
    }
}

/// What makes a flow live, unanswered or idle as of one moment (`now`), all
/// in kernel ticks.
struct FlowRules {
    now: u64,
    udp_idle: u64,
    tcp_idle: u64,
    syn_timeout: u64,
    /// A half-open record's idle limit (`HALF_OPEN_LIVE_S`).
    half_open_live: u64,
    /// The active pool of each service in a transition.
    choices: StdHashMap<u32, Vec<Backend>>,
}

impl FlowRules {
    /// Counts the tables' entries together: a service's flows are all of
    /// one family (one family per service), established or half open.
    fn count_entries(&self, all: Entries) -> StdHashMap<(u32, Colour), FlowCounts> {
        let mut out: StdHashMap<(u32, Colour), FlowCounts> = StdHashMap::new();
        for (table, half) in [(&all.v4, false), (&all.half4, true)] {
            for (k, e) in table {
                let key = FlowKey::from4(k);
                self.count_flow(&mut out, &key, e, &[e.peer, 0, 0, 0], half);
            }
        }
        for (table, half) in [(&all.v6, false), (&all.half6, true)] {
            for (key, e) in table {
                self.count_flow(&mut out, key, &e.e, &e.peer6, half);
            }
        }
        out
    }

    /// Counts one flow (`key` as the client sent it, `peer` its backend's
    /// address; `half`: a half-open record) into `out`.
    fn count_flow(
        &self,
        out: &mut StdHashMap<(u32, Colour), FlowCounts>,
        key: &FlowKey,
        e: &FlowEntry,
        peer: &Addr,
        half: bool,
    ) {
        let now = self.now;
        let c = out
            .entry((e.service, Colour::from_index(e.colour as u32)))
            .or_default();
        c.recorded += 1;
        if e.flags & flow_flags::PREVIEW != 0 {
            c.preview += 1;
        }
        // A flow created after `now` was read (the scan runs a little
        // later) is young, not four billion ticks old.
        let age = ((now as u32).wrapping_sub(e.created) as i32).max(0) as u64;
        if key.proto == bgswitch_common::PROTO_TCP
            && e.flags & (flow_flags::ESTABLISHED | flow_flags::RST) == 0
            && age >= self.syn_timeout
        {
            c.unanswered += 1;
        }
        let idle = now.saturating_sub(e.last_seen);
        let live = if key.proto == bgswitch_common::PROTO_UDP {
            idle <= self.udp_idle
        } else {
            let closed = e.flags & flow_flags::RST != 0
                || e.flags & (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
                    == (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND);
            let limit = if half {
                self.tcp_idle.min(self.half_open_live)
            } else {
                self.tcp_idle
            };
            !closed && idle <= limit
        };
        if !live {
            return;
        }
        c.live += 1;
        if let Some(pool) = self.choices.get(&e.service) {
            let i = bgswitch_common::hash::reduce(
                bgswitch_common::hash::flow_hash(key, bgswitch_common::hash::BACKEND_SEED),
                pool.len() as u32,
            );
            let agrees = pool.get(i as usize).is_some_and(|b| {
                b.addr == *peer && b.port == e.peer_port && b.stat_id == u32::from(e.backend_stat)
            });
            if !agrees {
                c.disagreeing += 1;
            }
        }
    }
}

impl Dataplane {
    /// The 5-tuples (client → VIP) whose half-open records share `key`'s
    /// bucket now, `key`'s own among them if it has one: for the tests that
    /// check a record leaves its bucket only when two others fill it.
    pub fn half_open_bucket(&self, key: &FlowKey) -> Result<Vec<FlowKey>> {
        let shift = 32 - self.half_buckets.trailing_zeros();
        let t = &self.flows;
        if key.family == FAMILY_IPV4 {
            let b = t.half4.bucket(bgswitch_common::half_open_bucket4(
                &FlowKey4::of(key),
                shift,
            ))?;
            Ok((0..2)
                .filter_map(|w| b.way(w))
                .map(|(k, _)| FlowKey::from4(&k))
                .collect())
        } else {
            let b = t
                .half6
                .bucket(bgswitch_common::half_open_bucket6(key, shift))?;
            Ok((0..2).filter_map(|w| b.way(w)).map(|(k, _)| k).collect())
        }
    }

    /// Whether the flow table of `key`'s family holds a record of it.
    pub fn has_flow(&self, key: &FlowKey) -> Result<bool> {
        let found = if key.family == FAMILY_IPV4 {
            self.flows.v4.map.get(&FlowKey4::of(key), 0).map(|_| ())
        } else {
            self.flows.v6.map.get(key, 0).map(|_| ())
        };
        match found {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_err("FLOWS", "lookup")(e)),
        }
    }

    /// Counts forward flow entries per (service id, colour).
    pub fn flow_counts(
        &self,
        udp_idle: Duration,
        tcp_idle: Duration,
    ) -> Result<StdHashMap<(u32, Colour), FlowCounts>> {
        let rules = self.flow_rules(udp_idle, tcp_idle)?;
        self.table_reads.set(self.table_reads.get() + 1);
        let t = &self.flows;
        Ok(rules.count_entries(Entries {
            v4: t.v4.entries()?,
            v6: t.v6.entries()?,
            half4: t.half4.entries()?,
            half6: t.half6.entries()?,
        }))
    }

    /// Whole reads of the flow tables (both families', with their
    /// half-open tables, together) begun through this handle: each takes
    /// about 0.8 s of a thread per million flows.
    pub fn flow_table_reads(&self) -> u64 {
        self.table_reads.get()
    }

    /// The same count, prepared to run on another thread (the daemon's
    /// event loop must not wait for a large table): duplicates of the
    /// tables' descriptors and the clock read now. `FlowScan::count` reads
    /// the tables in batches only; where the kernel refuses batches it says
    /// so (`EINVAL`/`ENOTSUPP`) and `flow_counts` is the way.
    pub fn flow_scan(&self, udp_idle: Duration, tcp_idle: Duration) -> Result<FlowScan> {
        let t = &self.flows;
        let fds = [t.v4.dup()?, t.v6.dup()?, t.half4.dup()?, t.half6.dup()?];
        let rules = self.flow_rules(udp_idle, tcp_idle)?;
        let words = rules
            .choices
            .keys()
            .map(|id| (*id, self.control.load(*id)))
            .collect();
        self.table_reads.set(self.table_reads.get() + 1);
        Ok(FlowScan { fds, rules, words })
    }

    fn flow_rules(&self, udp_idle: Duration, tcp_idle: Duration) -> Result<FlowRules> {
        let mut choices = StdHashMap::new();
        for (_, id) in self.service_keys()? {
            let w = self.control.load(id);
            let in_transition = control::enabled(w)
                && !control::stateless(w)
                && (control::orphan(w).is_some() || self.stateless.contains(&id));
            if in_transition {
                choices.insert(
                    id,
                    self.read_pool(id, control::slot(w, control::active(w)))?,
                );
            }
        }
        Ok(FlowRules {
            now: self.jiffies()?,
            udp_idle: self.clock.ticks(udp_idle),
            tcp_idle: self.clock.ticks(tcp_idle),
            syn_timeout: SYN_TIMEOUT_S * self.clock.hz,
            half_open_live: HALF_OPEN_LIVE_S * self.clock.hz,
            choices,
        })
    }

    /// Forgets every flow of service `id` not on `keep` (both directions), so
    /// their next packets follow the active colour (`flip --force`). Returns
    /// how many flows were moved.
    pub fn flush_flows(&mut self, id: u32, keep: Colour) -> Result<u64> {
        // Connections of a stateless period without a record would go to
        // the orphan pool: they follow the active colour too.
        let w = self.control.load(id);
        if control::orphan(w).is_some_and(|(c, _)| c != keep.index()) {
            let word = self.without_orphan(id, w);
            self.control.store(id, word);
        }
        self.flush(id, Some(keep))
    }

    /// Forgets every flow of service `id` (both colours, both directions).
    pub fn flush_service(&mut self, id: u32) -> Result<u64> {
        self.flush(id, None)
    }

    /// Removes the flows of `id` (not on `keep`) from the four tables.
    pub(super) fn flush(&mut self, id: u32, keep: Option<Colour>) -> Result<u64> {
        let doomed =
            |e: &FlowEntry| e.service == id && keep.is_none_or(|k| e.colour as u32 != k.index());
        let t = &mut self.flows;
        let mut remove = || -> Result<u64> {
            Ok(t.v4.remove_where(doomed)?
                + t.v6.remove_where(|e| doomed(&e.e))?
                + t.half4.remove_where(doomed)?
                + t.half6.remove_where(|e| doomed(&e.e))?)
        };
        let result = remove();
        // After the deletions: per-CPU cache slots of deleted flows stop
        // being used (a CPU that reads the new generation no longer finds
        // the entries). Half-open records are never cached.
        if result.as_ref().is_ok_and(|n| *n > 0) || result.is_err() {
            self.bump_flow_gen();
        }
        result
    }
}

/// Reads a whole hash map with BPF_MAP_LOOKUP_BATCH (Linux 5.6).
fn lookup_batch<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut chunk = 4096usize;
    let mut out = Vec::new();
    let mut token = [0u64; 2];
    let mut first = true;
    loop {
        let mut keys = vec![K::default(); chunk];
        let mut values = vec![V::default(); chunk];
        let mut next = [0u64; 2];
        // union bpf_attr, batch: in_batch, out_batch, keys, values, count,
        // map_fd, elem_flags, flags.
        let mut attr = [0u64; 8];
        attr[0] = if first { 0 } else { token.as_ptr() as u64 };
        attr[1] = next.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = chunk as u64 | (u64::from(fd.as_raw_fd() as u32) << 32);
        // SAFETY: the kernel writes at most `count` keys and values into
        // buffers of that many elements, and the batch token into `next`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let got = (attr[4] & 0xffff_ffff) as usize;
        match &err {
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                // A bucket holds more entries than the buffer: grow it.
                chunk *= 4;
                continue;
            }
            Some(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                return Err(io::Error::new(e.kind(), e.to_string()));
            }
            _ => {}
        }
        out.extend(keys.into_iter().zip(values).take(got));
        if err.is_some() {
            return Ok(out); // ENOENT: that was the last batch.
        }
        token = next;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_memory_per_flow_of_each_family() {
        // What the common crate's docs and the README state.
        assert_eq!(FLOW_BYTES_V4, 160);
        assert_eq!(FLOW_BYTES_V6, 200);
    }

    fn rules(choices: StdHashMap<u32, Vec<Backend>>) -> FlowRules {
        FlowRules {
            now: 10_000,
            udp_idle: 3_000,
            tcp_idle: 100_000,
            syn_timeout: 200,
            half_open_live: 3_200,
            choices,
        }
    }

    fn entry(service: u32, colour: u8, flags: u8, last_seen: u64) -> FlowEntry {
        FlowEntry {
            service,
            colour,
            flags,
            created: 9_000,
            last_seen,
            ..Default::default()
        }
    }

    #[test]
    fn both_tables_are_counted_per_service_and_colour() {
        let v4 = vec![(
            FlowKey4 {
                proto: bgswitch_common::PROTO_TCP,
                ..Default::default()
            },
            entry(1, 0, flow_flags::ESTABLISHED, 9_990),
        )];
        let k6 = |n: u32, proto| FlowKey {
            src: [n, 0, 0, 1],
            dst: [7, 0, 0, 2],
            proto,
            family: bgswitch_common::FAMILY_IPV6,
            ..Default::default()
        };
        let v6 = vec![
            // Live TCP, green.
            (
                k6(1, bgswitch_common::PROTO_TCP),
                FlowEntry6 {
                    peer6: [9, 9, 9, 9],
                    e: entry(2, 1, flow_flags::ESTABLISHED, 9_990),
                },
            ),
            // A SYN never answered: unanswered, still live.
            (
                k6(2, bgswitch_common::PROTO_TCP),
                FlowEntry6 {
                    peer6: [9, 9, 9, 9],
                    e: entry(2, 1, 0, 9_000),
                },
            ),
            // Closed both ways: recorded, not live.
            (
                k6(3, bgswitch_common::PROTO_TCP),
                FlowEntry6 {
                    peer6: [9, 9, 9, 9],
                    e: entry(
                        2,
                        1,
                        flow_flags::ESTABLISHED | flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND,
                        9_990,
                    ),
                },
            ),
            // Idle UDP, blue.
            (
                k6(4, bgswitch_common::PROTO_UDP),
                FlowEntry6 {
                    peer6: [9, 9, 9, 9],
                    e: entry(2, 0, 0, 1_000),
                },
            ),
        ];
        let out = rules(StdHashMap::new()).count_entries(Entries {
            v4,
            v6,
            ..Default::default()
        });
        assert_eq!(out[&(1, Colour::Blue)].live, 1);
        let g = out[&(2, Colour::Green)];
        assert_eq!((g.recorded, g.live, g.unanswered), (3, 2, 1));
        let b = out[&(2, Colour::Blue)];
        assert_eq!((b.recorded, b.live), (1, 0));
    }

    #[test]
    fn an_ipv6_record_agrees_with_the_hash_choice_by_its_whole_address() {
        let key = FlowKey {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 1000,
            dport: 443,
            proto: bgswitch_common::PROTO_TCP,
            family: bgswitch_common::FAMILY_IPV6,
            _pad: [0; 2],
        };
        let pool = vec![Backend {
            addr: [10, 11, 12, 13],
            port: 8443,
            family: bgswitch_common::FAMILY_IPV6,
            _pad: 0,
            stat_id: 3,
        }];
        let rec = |peer6: Addr| FlowEntry6 {
            peer6,
            e: FlowEntry {
                peer: peer6[0],
                peer_port: 8443,
                backend_stat: 3,
                ..entry(5, 0, flow_flags::ESTABLISHED, 9_990)
            },
        };
        let r = rules(StdHashMap::from([(5, pool)]));
        let only6 = |e| Entries {
            v6: vec![(key, e)],
            ..Default::default()
        };
        let out = r.count_entries(only6(rec([10, 11, 12, 13])));
        assert_eq!(out[&(5, Colour::Blue)].disagreeing, 0);
        // Same first word, another address: another backend.
        let out = r.count_entries(only6(rec([10, 11, 12, 14])));
        assert_eq!(out[&(5, Colour::Blue)].disagreeing, 1);
    }
}
