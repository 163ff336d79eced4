//! The packet's path after parsing, in the order of ARCHITECTURE.md's
//! diagram: a stateless service in its stable period (`stateless`), this
//! CPU's flow cache (`cache`), a VIP's flow record or service (`forward`),
//! a backend's reply (`reply`); anything else passes untouched. Each stage
//! rewrites (`rewrite`) and forwards (`transmit`) what it takes.

use aya_ebpf::maps::LruHashMap;
use bgswitch_common::{
    control, global, FlowKey, FlowKey4, ServiceKey, ADDR_FILTER_WORDS, PROTO_TCP,
};

use crate::{
    cache::{cache_hit, cache_index, cached, Cache},
    cache6::{cached6, hit6, slot6, Tuple},
    clock::{flow_gen, now},
    context::Packet,
    family::{V4, V6},
    flow::flow_key,
    forward::{to_backend, Held},
    frame::{Frame, TCP_FIN, TCP_RST, TCP_SYN},
    half_open,
    maps::{count, FLOWS, FLOWS6, FLOW_CACHE, REPLY_SOURCES, SETTINGS},
    reply::{from_backend, hashed_here, stateless_reply},
    service::{control_word, maybe, service4, service_at},
    stateless::{stateless, stateless_service},
    transmit::Fresh,
};

/// A flow's record and where it was found: the flow table, else (TCP
/// only) the half-open table (`handshake.rs`).
#[inline(always)]
fn record<K, E>(
    table: &LruHashMap<K, E>,
    half_open: fn(&K) -> Option<*mut E>,
    key: &K,
    proto: u8,
) -> Option<(*mut E, Held)> {
    match table.get_ptr_mut(key) {
        Some(e) => Some((e, Held::Table)),
        None if proto == PROTO_TCP => half_open(key).map(|e| (e, Held::HalfOpen)),
        None => None,
    }
}

/// The packet's path after parsing: this CPU's flow cache first (an inlined
/// array read: established packets of a cached flow need no hash lookup).
/// Then, for a destination in the VIP bitmap, the flow table and the
/// services (the first packet of a flow); for a source in the backend
/// bitmap, the backend's reply source and its flow. Anything else passes
/// untouched.
#[inline(always)]
pub fn handle<C: Packet>(ctx: &C, f: &Frame) -> u32 {
    let now = now();
    let (refresh, shift, any_stateless, backend_hops) = SETTINGS.get(0).map_or((0, 0, 0, 0), |s| {
        (s.refresh, s.cache_shift, s.stateless, s.backend_hops)
    });
    let fresh = Fresh {
        gen: flow_gen(),
        refresh,
    };
    // A stateless service in its stable period: no flow state to read, not
    // even the cache slot (cold memory once flows are many), nor its index.
    if any_stateless != 0 && f.proto == PROTO_TCP {
        if let Some(id) = stateless_service(f) {
            let word = control_word(id);
            if control::enabled(word) && control::stateless(word) {
                return stateless(ctx, f, id, word, now, fresh);
            }
        }
    }
    let key = FlowKey4 {
        src: f.src[0],
        dst: f.dst[0],
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let cache = Cache {
        // Without settings (shift 0): no cache.
        slot: if shift == 0 {
            None
        } else {
            FLOW_CACHE.get_ptr_mut(cache_index(&key, shift))
        },
        key,
        fresh,
        shift,
        backend_hops: backend_hops != 0,
    };
    // The packet's own conditions first: a SYN (a new flow's first packet,
    // mostly) never reads its slot, which is cold memory then — one cache
    // miss less per new TCP flow.
    if f.ttl > 1 && f.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        if let Some(c) = cache.slot {
            // SAFETY: this CPU's slot; XDP runs are not nested on one CPU.
            let c = unsafe { &*c };
            if cache_hit(c, &cache, f, now) {
                if let Some(action) = cached(ctx, f, c) {
                    return action;
                }
            }
        }
    }
    // Flows are keyed client → VIP: only a VIP destination can have one, or
    // start one.
    if maybe(0, &f.dst) {
        // The whole 5-tuple (the flow hash's input).
        let key = flow_key(f);
        if let Some((e, held)) = record(&FLOWS, half_open::lookup4, &cache.key, f.proto) {
            // SAFETY: LRU values stay valid for the program's run (RCU);
            // fields are read and written as whole integers.
            let entry = unsafe { &mut *e };
            let service = entry.service;
            return to_backend::<_, V4>(ctx, f, &key, service, Some(entry), held, now, &cache);
        }
        if let Some(id) = service4(f) {
            return to_backend::<_, V4>(ctx, f, &key, id, None, Held::Table, now, &cache);
        }
    }
    if !maybe(ADDR_FILTER_WORDS, &f.src) {
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
    }
    // A backend's reply: its flow is the one from the client to the VIP the
    // backend serves, if that flow is pinned to this backend.
    let from = ServiceKey {
        addr: f.src,
        port: f.sport,
        proto: f.proto,
        family: f.family,
    };
    // SAFETY: plain Copy values read once.
    if let Some(rs) = unsafe { REPLY_SOURCES.get(&from) } {
        let (vip, vport, service) = (rs.vip[0], rs.vport, rs.service);
        // A stateless service's reply in its stable period: the backend the
        // hash chooses for the client's 5-tuple is the flow's backend.
        let word = if f.proto == PROTO_TCP {
            control_word(service)
        } else {
            0
        };
        if control::stateless(word) {
            let active = control::active(word);
            if let Some(b) = hashed_here(f, service, control::slot(word, active), vip, vport) {
                return stateless_reply(ctx, f, service, active, &b, vip, vport, now, &cache);
            }
        }
        let fkey = FlowKey4 {
            src: f.dst[0],
            dst: vip,
            sport: f.dport,
            dport: vport,
            proto: f.proto,
            _pad0: 0,
            _pad1: 0,
        };
        let held = record(&FLOWS, half_open::lookup4, &fkey, f.proto);
        if let Some((e, held)) = held {
            // SAFETY: as above.
            let entry = unsafe { &mut *e };
            if entry.peer == f.src[0] && entry.peer_port == f.sport {
                let vip = [vip, 0, 0, 0];
                return from_backend::<_, V4>(ctx, f, entry, held, &vip, vport, now, &cache);
            }
        }
        // In a transition, a connection of the last stateless period that
        // has no record yet (the backend speaks first): the orphan pool's
        // choice.
        if let Some((colour, slot)) = control::orphan(word) {
            if let Some(b) = hashed_here(f, service, slot, vip, vport) {
                return stateless_reply(ctx, f, service, colour, &b, vip, vport, now, &cache);
            }
        }
    }
    count(global::PASS_NOT_SERVICE);
    C::PASS
}

/// The IPv6 path after parsing: as [`handle`]'s table path, without the
/// stateless path (IPv4's): this CPU's IPv6 flow cache (`FLOW_CACHE6`);
/// for a destination in the VIP bitmap the flow table (`FLOWS6`) and the
/// services, for a source in the backend bitmap the backend's reply source
/// and its flow. Anything else passes untouched.
#[inline(always)]
pub fn handle6<C: Packet>(ctx: &C, f: &Frame) -> u32 {
    let now = now();
    let (refresh, shift) = SETTINGS
        .get(0)
        .map_or((0, 0), |s| (s.refresh, s.cache_shift));
    // No IPv4 slot: the IPv4 cache steps do nothing; `shift` is the IPv6
    // cache's (`cache6.rs`).
    let cache = Cache {
        slot: None,
        key: FlowKey4::default(),
        fresh: Fresh {
            gen: flow_gen(),
            refresh,
        },
        shift,
        // IPv6 routes follow IPv6 rules, which are not read.
        backend_hops: false,
    };
    if f.ttl > 1 && f.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        if let Some(c) = slot6(Tuple::of(f), shift) {
            // SAFETY: this CPU's slot; runs are not nested on one CPU.
            let c = unsafe { &*c };
            if hit6(c, cache.fresh, f, now) {
                if let Some(action) = cached6(ctx, f, c) {
                    return action;
                }
            }
        }
    }
    if maybe(0, &f.dst) {
        // The 5-tuple is the table's key.
        let key = flow_key(f);
        let held = record(&FLOWS6, half_open::lookup6, &key, f.proto);
        if let Some((e, held)) = held {
            // SAFETY: as in `handle`.
            let entry = unsafe { &mut *e };
            let service = entry.e.service;
            return to_backend::<_, V6>(ctx, f, &key, service, Some(entry), held, now, &cache);
        }
        if let Some(id) = service_at(f, f.dst, f.dport) {
            return to_backend::<_, V6>(ctx, f, &key, id, None, Held::Table, now, &cache);
        }
    }
    if !maybe(ADDR_FILTER_WORDS, &f.src) {
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
    }
    let from = ServiceKey {
        addr: f.src,
        port: f.sport,
        proto: f.proto,
        family: f.family,
    };
    // SAFETY: plain Copy values read once.
    if let Some(rs) = unsafe { REPLY_SOURCES.get(&from) } {
        let (vip, vport) = (rs.vip, rs.vport);
        let fkey = FlowKey {
            src: f.dst,
            dst: vip,
            sport: f.dport,
            dport: vport,
            proto: f.proto,
            family: f.family,
            _pad: [0; 2],
        };
        let held = record(&FLOWS6, half_open::lookup6, &fkey, f.proto);
        if let Some((e, held)) = held {
            // SAFETY: as above.
            let entry = unsafe { &mut *e };
            if entry.peer6 == f.src && entry.e.peer_port == f.sport {
                return from_backend::<_, V6>(ctx, f, entry, held, &vip, vport, now, &cache);
            }
        }
    }
    count(global::PASS_NOT_SERVICE);
    C::PASS
}
