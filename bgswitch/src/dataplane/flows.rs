//! Reading the flow tables, `FLOWS` (IPv4) and `FLOWS6` (IPv6), with
//! BPF_MAP_LOOKUP_BATCH (off the daemon's loop when they are large) to
//! count live, unanswered, preview and disagreeing flows, and flushing a
//! service's flows from both.

use std::{
    collections::HashMap as StdHashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
    time::Duration,
};

use bgswitch_common::{
    control, flow_flags, maps as names, Addr, Backend, FlowEntry, FlowEntry6, FlowKey, FlowKey4,
    FAMILY_IPV4,
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

/// A flow-table read prepared on the daemon's loop, to run on another
/// thread (see `Dataplane::flow_scan`).
pub struct FlowScan {
    fd: std::os::fd::OwnedFd,
    /// The IPv6 table's.
    fd6: std::os::fd::OwnedFd,
    rules: FlowRules,
    /// The control word of each service in a transition when the scan was
    /// prepared (`Dataplane::end_transition` wants it unchanged).
    pub words: StdHashMap<u32, u32>,
}

impl FlowScan {
    /// Reads the whole flow tables, IPv4's and IPv6's (batches), and
    /// counts them.
    pub fn count(&self) -> io::Result<StdHashMap<(u32, Colour), FlowCounts>> {
        let v4 = lookup_batch::<FlowKey4, FlowEntry>(self.fd.as_fd())?;
        let v6 = lookup_batch::<FlowKey, FlowEntry6>(self.fd6.as_fd())?;
        Ok(self.rules.count_entries(v4, v6))
    }
}

/// What makes a flow live, unanswered or idle as of one moment (`now`), all
/// in kernel ticks.
struct FlowRules {
    now: u64,
    udp_idle: u64,
    tcp_idle: u64,
    syn_timeout: u64,
    /// The active pool of each service in a transition.
    choices: StdHashMap<u32, Vec<Backend>>,
}

impl FlowRules {
    /// Counts the IPv4 and the IPv6 table's entries together: a service's
    /// flows are all in one of them (one family per service).
    fn count_entries(
        &self,
        v4: Vec<(FlowKey4, FlowEntry)>,
        v6: Vec<(FlowKey, FlowEntry6)>,
    ) -> StdHashMap<(u32, Colour), FlowCounts> {
        let mut out: StdHashMap<(u32, Colour), FlowCounts> = StdHashMap::new();
        for (k, e) in &v4 {
            let key = FlowKey {
                src: [k.src, 0, 0, 0],
                dst: [k.dst, 0, 0, 0],
                sport: k.sport,
                dport: k.dport,
                proto: k.proto,
                family: FAMILY_IPV4,
                _pad: [0; 2],
            };
            self.count_flow(&mut out, &key, e, &[e.peer, 0, 0, 0]);
        }
        for (key, e) in &v6 {
            self.count_flow(&mut out, key, &e.e, &e.peer6);
        }
        out
    }

    /// Counts one flow (`key` as the client sent it, `peer` its backend's
    /// address) into `out`.
    fn count_flow(
        &self,
        out: &mut StdHashMap<(u32, Colour), FlowCounts>,
        key: &FlowKey,
        e: &FlowEntry,
        peer: &Addr,
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
            !closed && idle <= self.tcp_idle
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
    /// Counts forward flow entries per (service id, colour).
    pub fn flow_counts(
        &self,
        udp_idle: Duration,
        tcp_idle: Duration,
    ) -> Result<StdHashMap<(u32, Colour), FlowCounts>> {
        let rules = self.flow_rules(udp_idle, tcp_idle)?;
        self.table_reads.set(self.table_reads.get() + 1);
        Ok(rules.count_entries(self.flow_entries()?, self.flow_entries6()?))
    }

    /// Whole reads of the flow tables (IPv4's and IPv6's, together) begun
    /// through this handle: each takes about 0.8 s of a thread per million
    /// flows.
    pub fn flow_table_reads(&self) -> u64 {
        self.table_reads.get()
    }

    /// The same count, prepared to run on another thread (the daemon's
    /// event loop must not wait for a large table): a duplicate of the
    /// table's descriptor and the clock read now. `FlowScan::count` reads
    /// the table in batches only; where the kernel refuses batches it says
    /// so (`EINVAL`/`ENOTSUPP`) and `flow_counts` is the way.
    pub fn flow_scan(&self, udp_idle: Duration, tcp_idle: Duration) -> Result<FlowScan> {
        let fd = self.flows_fd.try_clone().map_err(io_err(
            "duplicating the descriptor of",
            Path::new(names::FLOWS),
        ))?;
        let fd6 = self.flows6_fd.try_clone().map_err(io_err(
            "duplicating the descriptor of",
            Path::new(names::FLOWS6),
        ))?;
        let rules = self.flow_rules(udp_idle, tcp_idle)?;
        let words = rules
            .choices
            .keys()
            .map(|id| (*id, self.control.load(*id)))
            .collect();
        self.table_reads.set(self.table_reads.get() + 1);
        Ok(FlowScan {
            fd,
            fd6,
            rules,
            words,
        })
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
            choices,
        })
    }

    /// Every entry of the flow table: read in batches (BPF_MAP_LOOKUP_BATCH,
    /// thousands of entries per syscall), or entry by entry where the kernel
    /// refuses batches.
    fn flow_entries(&self) -> Result<Vec<(FlowKey4, FlowEntry)>> {
        match lookup_batch::<FlowKey4, FlowEntry>(self.flows_fd.as_fd()) {
            Ok(v) => Ok(v),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(524) => {
                let mut v = Vec::new();
                for item in self.flows.iter() {
                    match item {
                        Ok(kv) => v.push(kv),
                        // Evicted between "next key" and "lookup": skip it.
                        Err(aya::maps::MapError::KeyNotFound) => continue,
                        Err(e) => return Err(map_err(names::FLOWS, "iterate")(e)),
                    }
                }
                Ok(v)
            }
            Err(e) => Err(DataplaneError::Io {
                op: "BPF_MAP_LOOKUP_BATCH on",
                path: names::FLOWS.into(),
                source: e,
            }),
        }
    }

    /// Every entry of the IPv6 flow table, as `flow_entries`.
    fn flow_entries6(&self) -> Result<Vec<(FlowKey, FlowEntry6)>> {
        match lookup_batch::<FlowKey, FlowEntry6>(self.flows6_fd.as_fd()) {
            Ok(v) => Ok(v),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(524) => {
                let mut v = Vec::new();
                for item in self.flows6.iter() {
                    match item {
                        Ok(kv) => v.push(kv),
                        Err(aya::maps::MapError::KeyNotFound) => continue,
                        Err(e) => return Err(map_err(names::FLOWS6, "iterate")(e)),
                    }
                }
                Ok(v)
            }
            Err(e) => Err(DataplaneError::Io {
                op: "BPF_MAP_LOOKUP_BATCH on",
                path: names::FLOWS6.into(),
                source: e,
            }),
        }
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

    pub(super) fn flush(&mut self, id: u32, keep: Option<Colour>) -> Result<u64> {
        let doomed =
            |e: &FlowEntry| e.service == id && keep.is_none_or(|k| e.colour as u32 != k.index());
        let doomed4: Vec<FlowKey4> = self
            .flow_entries()?
            .into_iter()
            .filter(|(_, e)| doomed(e))
            .map(|(k, _)| k)
            .collect();
        let doomed6: Vec<FlowKey> = self
            .flow_entries6()?
            .into_iter()
            .filter(|(_, e)| doomed(&e.e))
            .map(|(k, _)| k)
            .collect();
        let mut moved = 0;
        let mut result = Ok(());
        for k in doomed4 {
            match self.flows.remove(&k) {
                Ok(()) => moved += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    result = Err(map_err(names::FLOWS, "remove")(e));
                    break;
                }
            }
        }
        if result.is_ok() {
            for k in doomed6 {
                match self.flows6.remove(&k) {
                    Ok(()) => moved += 1,
                    Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => {
                        result = Err(map_err(names::FLOWS6, "remove")(e));
                        break;
                    }
                }
            }
        }
        // After the deletions: per-CPU cache slots of deleted flows stop
        // being used (a CPU that reads the new generation no longer finds
        // the entries).
        if moved > 0 || result.is_err() {
            self.bump_flow_gen();
        }
        result.map(|()| moved)
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
        let out = rules(StdHashMap::new()).count_entries(v4, v6);
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
        let out = r.count_entries(vec![], vec![(key, rec([10, 11, 12, 13]))]);
        assert_eq!(out[&(5, Colour::Blue)].disagreeing, 0);
        // Same first word, another address: another backend.
        let out = r.count_entries(vec![], vec![(key, rec([10, 11, 12, 14]))]);
        assert_eq!(out[&(5, Colour::Blue)].disagreeing, 1);
    }
}
