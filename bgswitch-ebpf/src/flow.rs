//! Following and choosing flows: the forward direction (client → VIP, pinned to
//! a colour and backend on its first packet) and the reverse direction (backend
//! → client, rewritten back to the VIP).

use aya_ebpf::{bindings::xdp_action, maps::lpm_trie::Key as LpmKey, programs::XdpContext};
use bgswitch_common::{
    addr_bit, cache_slot, control,
    csum::Delta,
    flow_flags, global,
    hash::{flow_hash, reduce, BACKEND_SEED, CANARY_SEED},
    stateless_entry, stateless_slot, Addr, Backend, BackendHop, CachedFlow, FlowEntry, FlowKey,
    FlowKey4, PreviewKey, ServiceKey, ADDR_FILTER_WORDS, MAX_BACKENDS, POOL_SLOTS, PROTO_TCP,
    PROTO_UDP, STATELESS_ID_MASK,
};

use aya_log_ebpf::{error, warn};

use crate::{
    events,
    maps::{
        count, ADDR_FILTER, BACKENDS, BACKEND_HOPS, BACKEND_STATS, CONTROL, FLOWS, FLOW_CACHE,
        FLOW_GEN, POOL_SIZES, PREVIEW, REPLY_SOURCES, SERVICES, SERVICE_STATS, SETTINGS,
    },
    nat::{resolve, rewrite, rewrite_cached, transmit, transmit_l2, Side},
    parse::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The `FLOWS` key of a 5-tuple (IPv4: the first address word).
#[inline(always)]
fn key4(k: &FlowKey) -> FlowKey4 {
    FlowKey4 {
        src: k.src[0],
        dst: k.dst[0],
        sport: k.sport,
        dport: k.dport,
        proto: k.proto,
        _pad0: 0,
        _pad1: 0,
    }
}

#[inline(always)]
fn flow_key(f: &Frame) -> FlowKey {
    FlowKey {
        src: f.src,
        dst: f.dst,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        family: f.family,
        _pad: [0; 2],
    }
}

/// FIN/RST bits of a packet, as flow flags for the given direction.
#[inline(always)]
fn close_flags(tcp_flags: u8, fin: u8) -> u8 {
    let mut out = 0;
    if tcp_flags & TCP_FIN != 0 {
        out |= fin;
    }
    if tcp_flags & TCP_RST != 0 {
        out |= flow_flags::RST;
    }
    out
}

#[inline(always)]
fn closed(flags: u8) -> bool {
    flags & flow_flags::RST != 0
        || flags & (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
            == (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
}

/// Which colour a new flow takes, and whether a preview prefix decided it.
/// A source in one of the service's preview prefixes goes to the idle colour;
/// a canary share sends that many basis points of new flows (by flow hash) to
/// the idle colour. A non-SYN TCP packet with no record belongs to a
/// connection older than its record: it goes to the active colour.
#[inline(always)]
fn choose_colour(word: u32, service: u32, key: &FlowKey, orphan: bool) -> (u32, bool) {
    let active = control::active(word);
    if orphan {
        return (active, false);
    }
    if word & control::PREVIEW != 0 {
        let k = LpmKey::new(
            32 + 128,
            PreviewKey {
                service,
                addr: key.src,
            },
        );
        if PREVIEW.get(&k).is_some() {
            return (active ^ 1, true);
        }
    }
    let canary = control::canary(word);
    if canary != 0 && flow_hash(key, CANARY_SEED) % control::CANARY_FULL < canary {
        return (active ^ 1, false);
    }
    (active, false)
}

/// What a kept next hop or cache slot needs to be current.
#[derive(Clone, Copy)]
pub struct Fresh {
    /// The flow-cache generation now.
    gen: u32,
    /// `Settings::refresh` (0 without settings: nothing is fresh).
    refresh: u64,
}

/// Where a packet's flow-cache slot is, and what it needs to be valid.
pub struct Cache {
    slot: Option<*mut CachedFlow>,
    key: FlowKey4,
    fresh: Fresh,
    /// `Settings::cache_shift`.
    shift: u32,
}

/// The packet's path after parsing: this CPU's flow cache first (an inlined
/// array read: established packets of a cached flow need no hash lookup).
/// Then, for a destination in the VIP bitmap, the flow table and the
/// services (the first packet of a flow); for a source in the backend
/// bitmap, the backend's reply source and its flow. Anything else passes
/// untouched.
#[inline(always)]
pub fn handle(ctx: &XdpContext, f: &Frame) -> u32 {
    let now = now();
    let (refresh, shift, any_stateless) = SETTINGS
        .get(0)
        .map_or((0, 0, 0), |s| (s.refresh, s.cache_shift, s.stateless));
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
        if let Some(e) = FLOWS.get_ptr_mut(&cache.key) {
            // SAFETY: LRU values stay valid for the program's run (RCU);
            // fields are read and written as whole integers.
            let entry = unsafe { &mut *e };
            return to_backend(ctx, f, &key, entry.service, Some(entry), now, &cache);
        }
        let skey = ServiceKey {
            addr: f.dst,
            port: f.dport,
            proto: f.proto,
            family: f.family,
        };
        // SAFETY: the value is a plain Copy integer read once.
        if let Some(svc) = unsafe { SERVICES.get(&skey) } {
            return to_backend(ctx, f, &key, svc.id, None, now, &cache);
        }
    }
    if !maybe(ADDR_FILTER_WORDS, &f.src) {
        count(global::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
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
        if let Some(e) = FLOWS.get_ptr_mut(&fkey) {
            // SAFETY: as above.
            let entry = unsafe { &mut *e };
            if entry.peer == f.src[0] && entry.peer_port == f.sport {
                return from_backend(ctx, f, entry, vip, vport, now, &cache);
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
    xdp_action::XDP_PASS
}

/// This CPU's `FLOW_CACHE` slot of a 5-tuple: its region (`1 << (32 -
/// shift)` slots per CPU id) and the slot within. The verifier inlines both
/// the CPU id and the array lookup; an index past the array (a CPU id the
/// daemon did not size for) finds no slot, and the packet takes the
/// `FLOWS` path.
#[inline(always)]
fn cache_index(key: &FlowKey4, shift: u32) -> u32 {
    // SAFETY: no arguments, no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    (cpu << ((32 - shift) & 31)) | cache_slot(key, shift)
}

/// Whether `addr` may be in the `ADDR_FILTER` bitmap starting at word
/// `base` (VIPs at 0, backends at `ADDR_FILTER_WORDS`).
#[inline(always)]
fn maybe(base: u32, addr: &Addr) -> bool {
    let (word, mask) = addr_bit(addr);
    match ADDR_FILTER.get_ptr(base + word) {
        // SAFETY: an aligned 64-bit load of an array slot.
        Some(w) => (unsafe { core::ptr::read_volatile(w) }) & mask != 0,
        None => true,
    }
}

/// The stateless service in its stable period the packet's VIP and port
/// (IPv4, TCP) may be: one 64-bit load of its `ADDR_FILTER` slot (see
/// `bgswitch_common::stateless_entry`). The caller checks the control word.
#[inline(always)]
fn stateless_service(f: &Frame) -> Option<u32> {
    let slot = stateless_slot(f.dst[0], f.dport);
    let p = ADDR_FILTER.get_ptr(2 * ADDR_FILTER_WORDS + slot)?;
    // SAFETY: an aligned 64-bit load of an array slot (stored whole).
    let e = unsafe { core::ptr::read_volatile(p) };
    (e & !STATELESS_ID_MASK == stateless_entry(f.dst[0], f.dport, 0))
        .then_some(((e & STATELESS_ID_MASK) >> 48) as u32)
}

/// The control word of a service (0, disabled, if there is none).
#[inline(always)]
fn control_word(service: u32) -> u32 {
    match CONTROL.get_ptr(service) {
        // SAFETY: one 32-bit load of the word userspace stores atomically.
        Some(w) => unsafe { core::ptr::read_volatile(w) },
        None => 0,
    }
}

/// For a backend's reply: the backend that pool `slot` of `service` chooses
/// for the client's 5-tuple (client → VIP), if it is the reply's source.
#[inline(always)]
fn hashed_here(f: &Frame, service: u32, slot: u32, vip: u32, vport: u16) -> Option<Backend> {
    let key = FlowKey {
        src: f.dst,
        dst: [vip, 0, 0, 0],
        sport: f.dport,
        dport: vport,
        proto: f.proto,
        family: f.family,
        _pad: [0; 2],
    };
    let b = pick(service, slot, &key)?;
    (b.addr[0] == f.src[0] && b.port == f.sport).then_some(b)
}

/// A client whose own address and port are a VIP (spoofed): the replies to
/// it would be VIP traffic. Not ours.
#[inline(always)]
fn vip_source(f: &Frame) -> bool {
    // The key only for a source in the VIP bitmap.
    if !maybe(0, &f.src) {
        return false;
    }
    let own = ServiceKey {
        addr: f.src,
        port: f.sport,
        proto: f.proto,
        family: f.family,
    };
    // SAFETY: only presence is read.
    unsafe { SERVICES.get(&own) }.is_some()
}

/// A stateless service's packet in its stable period: the backend is the
/// flow hash over the active pool, for a SYN and every later packet alike
/// (so they agree without a record); nothing is recorded, and the next hop
/// is the backend's (`BACKEND_HOPS`), looked up once per backend and
/// refresh instead of once per flow.
#[inline(always)]
fn stateless(ctx: &XdpContext, f: &Frame, service: u32, word: u32, now: u64, fresh: Fresh) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return xdp_action::XDP_PASS;
    }
    if vip_source(f) {
        count(global::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
    }
    let key = flow_key(f);
    let active = control::active(word);
    let Some(b) = pick(service, control::slot(word, active), &key) else {
        return no_backend(ctx, service, active);
    };
    let Some(hop) = BACKEND_HOPS.get_ptr_mut(b.stat_id) else {
        count(global::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's slot; XDP runs are not nested on one CPU.
    let hop = unsafe { &mut *hop };
    let syn = f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    account(b.stat_id, f.frame_len, syn, false);
    let peer = b.addr[0];
    // The backend's next hop and deltas, if they are for this VIP and
    // backend, current, fresh and long enough: the cached path's rewrite.
    if Nh::backend(hop).usable(f, now, fresh)
        && hop.peer == peer
        && hop.peer_port == b.port
        && hop.vip == f.dst[0]
        && hop.vport == f.dport
    {
        if rewrite_cached(ctx, f, Side::Dst, peer, b.port, hop.ip_delta, hop.l4_delta).is_none() {
            count(global::MALFORMED);
            return xdp_action::XDP_PASS;
        }
        return transmit_l2(
            ctx,
            hop.ifindex,
            &hop.dmac,
            &hop.smac,
            Some(global::STATELESS),
        );
    }
    let (vip, vport) = (f.dst[0], f.dport);
    if rewrite(ctx, f, Side::Dst, &b.addr, b.port).is_none() {
        count(global::MALFORMED);
        return xdp_action::XDP_PASS;
    }
    // Force the lookup (the hop may be another VIP's or backend's), then
    // keep what it was for and this rewrite's deltas.
    hop.ifindex = 0;
    let action = send(
        ctx,
        f,
        Nh::backend(hop),
        now,
        fresh,
        Some(global::STATELESS),
    );
    let addr = Delta::ZERO.add32(vip, peer);
    hop.ip_delta = addr.ttl_decrement().folded();
    hop.l4_delta = addr.add16(vport, b.port).folded();
    hop.peer = peer;
    hop.peer_port = b.port;
    hop.vip = vip;
    hop.vport = vport;
    action
}

/// A reply of a connection no record holds (a stateless service's): as
/// `from_backend` without an entry. Its next hop towards the client is
/// looked up and kept in this CPU's cache slot only, so the flow's next
/// replies take the cached path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn stateless_reply(
    ctx: &XdpContext,
    f: &Frame,
    service: u32,
    colour: u32,
    b: &Backend,
    vip: u32,
    vport: u16,
    now: u64,
    cache: &Cache,
) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return xdp_action::XDP_PASS;
    }
    reply_counters(service, colour, f.tcp_flags);
    account(b.stat_id, f.frame_len, false, true);
    count(global::REPLIES);
    if rewrite(ctx, f, Side::Src, &[vip, 0, 0, 0], vport).is_none() {
        count(global::MALFORMED);
        return xdp_action::XDP_PASS;
    }
    let Some(hop) = resolve(ctx, f) else {
        // To the stack: this CPU's slot must not serve an older decision.
        forget(&cache.key, cache.shift);
        return xdp_action::XDP_PASS;
    };
    if let Some(c) = cache.slot {
        // SAFETY: this CPU's slot; every field written as a whole integer.
        let c = unsafe { &mut *c };
        write_slot(
            c,
            cache,
            Dir::Reply { vip, vport },
            Decision {
                peer: b.addr[0],
                peer_port: b.port,
                colour: colour as u8,
                service,
                stat: b.stat_id as u16,
                last_seen: now as u32,
            },
            hop.ifindex,
            &hop.dmac,
            &hop.smac,
            f.tot_len,
        );
    }
    transmit(ctx, f, hop.ifindex, &hop.dmac, &hop.smac, None)
}

/// A backend's SYN-ACKs and RSTs, which the error signal reads.
#[inline(always)]
fn reply_counters(service: u32, colour: u32, flags: u8) {
    if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        if let Some(s) = SERVICE_STATS.get_ptr_mut(service * 2 + colour) {
            // SAFETY: per-CPU slot.
            unsafe { (*s).syn_acks += 1 };
        }
    }
    if flags & TCP_RST != 0 {
        if let Some(s) = SERVICE_STATS.get_ptr_mut(service * 2 + colour) {
            // SAFETY: per-CPU slot.
            unsafe { (*s).backend_rsts += 1 };
        }
    }
}

/// An empty pool: counted, logged (rarely), and passed untouched.
#[inline(always)]
fn no_backend(ctx: &XdpContext, service: u32, colour: u32) -> u32 {
    count(global::NO_BACKEND);
    if events::gate(global::NO_BACKEND) {
        warn!(
            ctx,
            "data plane: service {} has no backend in its pool of colour {} (0 blue, 1 green): new flows pass to the kernel stack untouched (counter no_backend)",
            service,
            colour
        );
    }
    xdp_action::XDP_PASS
}

/// The flow-cache generation (see `bgswitch_common::CachedFlow`).
#[inline(always)]
fn flow_gen() -> u32 {
    match FLOW_GEN.get_ptr(0) {
        // SAFETY: an aligned load of an array slot (the low half is enough).
        Some(p) => unsafe { core::ptr::read_volatile(p) as u32 },
        None => 0,
    }
}

/// Whether the packet can take the slot's decision: the rules of
/// `bgswitch_common::CachedFlow` that need the slot (the caller checked TTL
/// > 1 and no SYN, FIN or RST).
#[inline(always)]
fn cache_hit(c: &CachedFlow, cache: &Cache, f: &Frame, now: u64) -> bool {
    same_key(&c.key, &cache.key)
        && c.gen == cache.fresh.gen
        && c.nh_ifindex != 0
        && u64::from((now as u32).wrapping_sub(c.last_seen)) <= cache.fresh.refresh
        && f.tot_len <= c.nh_len
}

/// A cached flow's packet: what `to_backend` or `from_backend` would do for
/// it with the entry unchanged. `None`: the service is disabled (the slow path
/// says so and counts it).
#[inline(always)]
fn cached(ctx: &XdpContext, f: &Frame, c: &CachedFlow) -> Option<u32> {
    let reverse = c.flags & flow_flags::REVERSE != 0;
    if !reverse {
        let word = CONTROL.get_ptr(c.service)?;
        // SAFETY: one 32-bit load of an array slot.
        if !control::enabled(unsafe { core::ptr::read_volatile(word) }) {
            return None;
        }
    }
    account(c.backend_stat as u32, f.frame_len, false, reverse);
    let (side, hit) = if reverse {
        (Side::Src, global::REPLIES)
    } else {
        (Side::Dst, global::FLOW_HITS)
    };
    if rewrite_cached(ctx, f, side, c.peer, c.peer_port, c.ip_delta, c.l4_delta).is_none() {
        count(global::MALFORMED);
        return Some(xdp_action::XDP_PASS);
    }
    Some(transmit_l2(
        ctx,
        c.nh_ifindex,
        &c.nh_dmac,
        &c.nh_smac,
        Some(hit),
    ))
}

/// Which direction of a flow a cache slot serves.
#[derive(Clone, Copy)]
enum Dir {
    /// Client → VIP: rewritten to the entry's backend.
    Forward,
    /// Backend → client: rewritten back to the VIP.
    Reply { vip: u32, vport: u16 },
}

/// The older of two low-32-bit tick stamps.
#[inline(always)]
fn older(a: u32, b: u32) -> u32 {
    if (a.wrapping_sub(b) as i32) < 0 {
        a
    } else {
        b
    }
}

/// Copies an entry's decision for one direction (as it is after this packet)
/// into this CPU's cache slot, if it has a next hop to use; clears the slot
/// of this 5-tuple otherwise.
#[inline(always)]
fn fill(cache: &Cache, e: &FlowEntry, dir: Dir) {
    let Some(c) = cache.slot else {
        return;
    };
    // SAFETY: this CPU's slot; every field written as a whole integer.
    let c = unsafe { &mut *c };
    let (ifindex, dmac, smac, len, gen, at) = match dir {
        Dir::Forward => (
            e.nh_ifindex,
            &e.nh_dmac,
            &e.nh_smac,
            e.nh_len,
            e.nh_gen,
            e.nh_at,
        ),
        Dir::Reply { .. } => (
            e.rnh_ifindex,
            &e.rnh_dmac,
            &e.rnh_smac,
            e.rnh_len,
            e.rnh_gen,
            e.rnh_at,
        ),
    };
    if ifindex == 0 || gen != cache.fresh.gen {
        // No next hop to cache (the frame went to the stack): the slot must
        // not keep serving an older decision for this flow, which this
        // packet may just have replaced (a SYN reusing a closed flow's
        // 5-tuple that is too long for the MTU, say).
        if same_key(&c.key, &cache.key) {
            c.nh_ifindex = 0;
        }
        return;
    }
    // Fresh while neither the entry's last-seen stamp nor this direction's
    // next hop is due for its refresh.
    let fresh = older(e.last_seen as u32, at);
    write_slot(
        c,
        cache,
        dir,
        Decision {
            peer: e.peer,
            peer_port: e.peer_port,
            colour: e.colour,
            service: e.service,
            stat: e.backend_stat,
            last_seen: fresh,
        },
        ifindex,
        dmac,
        smac,
        len,
    );
}

/// What a cache slot serves, besides its next hop.
struct Decision {
    /// The backend (forward; the reply's peer is the VIP).
    peer: u32,
    peer_port: u16,
    colour: u8,
    service: u32,
    stat: u16,
    /// Low 32 bits of the tick the slot is fresh from.
    last_seen: u32,
}

/// Writes this CPU's slot of the packet's 5-tuple (`c`): the decision for
/// direction `dir` and its next hop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_slot(
    c: &mut CachedFlow,
    cache: &Cache,
    dir: Dir,
    d: Decision,
    ifindex: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    len: u16,
) {
    count(global::FLOW_CACHE_FILLS);
    let (peer, peer_port, flags, old_addr, old_port) = match dir {
        Dir::Forward => (d.peer, d.peer_port, 0, cache.key.dst, cache.key.dport),
        Dir::Reply { vip, vport } => (
            vip,
            vport,
            flow_flags::REVERSE,
            cache.key.src,
            cache.key.sport,
        ),
    };
    c.key.src = cache.key.src;
    c.key.dst = cache.key.dst;
    c.key.sport = cache.key.sport;
    c.key.dport = cache.key.dport;
    c.key.proto = cache.key.proto;
    c.gen = cache.fresh.gen;
    c.last_seen = d.last_seen;
    c.peer = peer;
    c.peer_port = peer_port;
    c.colour = d.colour;
    c.flags = flags;
    c.service = d.service;
    c.nh_ifindex = ifindex;
    for i in 0..6 {
        // SAFETY: in-bounds writes (byte stores: no memcpy call).
        unsafe {
            core::ptr::write_volatile(&mut c.nh_dmac[i], dmac[i]);
            core::ptr::write_volatile(&mut c.nh_smac[i], smac[i]);
        }
    }
    c.nh_len = len;
    c.backend_stat = d.stat;
    // What this direction's rewrite changes, for every packet alike.
    let addr = Delta::ZERO.add32(old_addr, peer);
    c.ip_delta = addr.ttl_decrement().folded();
    c.l4_delta = addr.add16(old_port, peer_port).folded();
}

/// `jiffies`: kernel ticks, plenty for idle timeouts; the verifier inlines
/// the helper into one load (the clock helpers are calls).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, no preconditions.
    unsafe { aya_ebpf::helpers::bpf_jiffies64() }
}

/// Client → VIP, with the flow's record if it has one.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    f: &Frame,
    key: &FlowKey,
    service: u32,
    entry: Option<&mut FlowEntry>,
    now: u64,
    cache: &Cache,
) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return xdp_action::XDP_PASS;
    }
    let Some(word) = CONTROL.get_ptr(service) else {
        count(global::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
    };
    // One 32-bit load of the word userspace stores atomically.
    // SAFETY: the pointer comes from a successful array lookup.
    let word = unsafe { core::ptr::read_volatile(word) };
    if !control::enabled(word) {
        // A removed service: its flows are not ours any more.
        count(global::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
    }
    if control::stateless(word) && f.proto == PROTO_TCP {
        // Its stateless slot is set before the word and cleared after: only
        // a packet racing a change, or of a service whose slot another one
        // holds, gets here.
        return stateless(ctx, f, service, word, now, cache.fresh);
    }
    let syn = f.proto == PROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // The backend of an entry this packet replaces (port reuse after close
    // or idle).
    let mut replaced: Option<(u32, u16)> = None;
    if let Some(entry) = entry {
        replaced = Some((entry.peer, entry.peer_port));
        if !expired(entry, f, syn, now) {
            if now.wrapping_sub(entry.last_seen) > cache.fresh.refresh {
                entry.last_seen = now;
            }
            let closing = close_flags(f.tcp_flags, flow_flags::FIN_CLIENT);
            if closing != 0 {
                entry.flags |= closing;
            }
            count(global::FLOW_HITS);
            account(entry.backend_stat as u32, f.frame_len, false, false);
            if rewrite(ctx, f, Side::Dst, &[entry.peer, 0, 0, 0], entry.peer_port).is_none() {
                count(global::MALFORMED);
                return xdp_action::XDP_PASS;
            }
            let action = send(ctx, f, Nh::forward(entry), now, cache.fresh, None);
            fill(cache, entry, Dir::Forward);
            return action;
        }
    }

    if vip_source(f) {
        count(global::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
    }
    let orphan = f.proto == PROTO_TCP && !syn;
    // An orphan in a transition of a stateless service: a connection of the
    // stable period before, which had no record; the pool of that period
    // chooses the backend it had.
    let (colour, slot, preview) = match control::orphan(word) {
        Some((colour, slot)) if orphan => {
            count(global::ORPHANS);
            (colour, slot, false)
        }
        _ => {
            let (colour, preview) = choose_colour(word, service, key, orphan);
            (colour, control::slot(word, colour), preview)
        }
    };
    let Some(b) = pick(service, slot, key) else {
        return no_backend(ctx, service, colour);
    };
    account(b.stat_id, f.frame_len, true, false);
    if rewrite(ctx, f, Side::Dst, &b.addr, b.port).is_none() {
        count(global::MALFORMED);
        return xdp_action::XDP_PASS;
    }
    let mut flags = close_flags(f.tcp_flags, flow_flags::FIN_CLIENT);
    if preview {
        flags |= flow_flags::PREVIEW;
    }
    let mut raw = core::mem::MaybeUninit::<FlowEntry>::uninit();
    let fwd = new_entry(
        &mut raw, b.addr[0], b.port, colour, flags, service, b.stat_id, now,
    );
    // The next hop is looked up before the flow is recorded, so the forward
    // entry is written once, with it; the frame leaves only after we return.
    let action = send(ctx, f, Nh::forward(fwd), now, cache.fresh, None);
    record(ctx, key, fwd);
    // A replaced entry (port reuse after close or idle) needs no
    // invalidation elsewhere: after idle, every CPU's slot of the flow is
    // older than the refresh; after a close, slots on other CPUs would
    // matter only if one 5-tuple's packets came in on two CPUs within the
    // refresh of the new SYN (RSS keeps a 5-tuple on one queue). The old
    // backend's reply slot is cleared below (on this CPU).
    fill(cache, fwd, Dir::Forward);
    if let Some((old, old_port)) = replaced {
        if (old, old_port) != (b.addr[0], b.port) {
            // The old backend's late packets are no replies of the new flow:
            // this CPU's slot of them goes (other CPUs' slots age out within
            // the refresh).
            forget(
                &FlowKey4 {
                    src: old,
                    dst: f.src[0],
                    sport: old_port,
                    dport: f.sport,
                    proto: f.proto,
                    _pad0: 0,
                    _pad1: 0,
                },
                cache.shift,
            );
        }
    }
    action
}

/// Clears this CPU's cache slot of `key`, if it holds it.
#[inline(always)]
fn forget(key: &FlowKey4, shift: u32) {
    if shift == 0 {
        return;
    }
    if let Some(c) = FLOW_CACHE.get_ptr_mut(cache_index(key, shift)) {
        // SAFETY: this CPU's slot.
        let c = unsafe { &mut *c };
        if same_key(&c.key, key) {
            c.nh_ifindex = 0;
        }
    }
}

/// Field-wise key equality (the padding is not compared).
#[inline(always)]
fn same_key(a: &FlowKey4, b: &FlowKey4) -> bool {
    a.src == b.src
        && a.dst == b.dst
        && a.sport == b.sport
        && a.dport == b.dport
        && a.proto == b.proto
}

/// One direction's cached next hop inside a flow entry.
pub struct Nh<'a> {
    ifindex: &'a mut u32,
    dmac: &'a mut [u8; 6],
    smac: &'a mut [u8; 6],
    len: &'a mut u16,
    gen: &'a mut u32,
    at: &'a mut u32,
}

impl<'a> Nh<'a> {
    /// Towards the backend.
    #[inline(always)]
    fn forward(e: &'a mut FlowEntry) -> Self {
        Nh {
            ifindex: &mut e.nh_ifindex,
            dmac: &mut e.nh_dmac,
            smac: &mut e.nh_smac,
            len: &mut e.nh_len,
            gen: &mut e.nh_gen,
            at: &mut e.nh_at,
        }
    }

    /// Towards a backend of a stateless service.
    #[inline(always)]
    fn backend(h: &'a mut BackendHop) -> Self {
        Nh {
            ifindex: &mut h.ifindex,
            dmac: &mut h.dmac,
            smac: &mut h.smac,
            len: &mut h.len,
            gen: &mut h.gen,
            at: &mut h.at,
        }
    }

    /// Whether the kept next hop serves this packet: one was found, under
    /// the current generation, within the refresh, for a packet at least as
    /// long (the MTU check).
    #[inline(always)]
    fn usable(&self, f: &Frame, now: u64, fresh: Fresh) -> bool {
        *self.ifindex != 0
            && *self.gen == fresh.gen
            && u64::from((now as u32).wrapping_sub(*self.at)) <= fresh.refresh
            && f.tot_len <= *self.len
    }

    /// Towards the client.
    #[inline(always)]
    fn reply(e: &'a mut FlowEntry) -> Self {
        Nh {
            ifindex: &mut e.rnh_ifindex,
            dmac: &mut e.rnh_dmac,
            smac: &mut e.rnh_smac,
            len: &mut e.rnh_len,
            gen: &mut e.rnh_gen,
            at: &mut e.rnh_at,
        }
    }
}

/// Forwards a rewritten packet through a cached next hop, or looks the next
/// hop up (and keeps it) when there is none, when its generation is old, when
/// it is older than the refresh, or when the packet is longer than the one
/// it was looked up for (the MTU check). Counts `also` with the transmit.
#[inline(always)]
fn send(ctx: &XdpContext, f: &Frame, nh: Nh, now: u64, fresh: Fresh, also: Option<u32>) -> u32 {
    if nh.usable(f, now, fresh) {
        return transmit(ctx, f, *nh.ifindex, nh.dmac, nh.smac, also);
    }
    let Some(hop) = resolve(ctx, f) else {
        *nh.ifindex = 0;
        if let Some(a) = also {
            count(a);
        }
        return xdp_action::XDP_PASS;
    };
    // Byte stores: an array assignment may become a memcpy call here.
    for i in 0..6 {
        // SAFETY: in-bounds writes to fields of a valid entry.
        unsafe {
            core::ptr::write_volatile(&mut nh.dmac[i], hop.dmac[i]);
            core::ptr::write_volatile(&mut nh.smac[i], hop.smac[i]);
        }
    }
    *nh.len = f.tot_len;
    *nh.gen = fresh.gen;
    *nh.at = now as u32;
    *nh.ifindex = hop.ifindex;
    transmit(ctx, f, hop.ifindex, &hop.dmac, &hop.smac, also)
}

/// A new flow's entry, built in place in `raw`: zeroed with ten 8-byte
/// stores first (a struct literal's `[0; 6]` MAC fields each became a call
/// to the byte-at-a-time memset here, four per new flow), then the fields
/// that are not zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn new_entry(
    raw: &mut core::mem::MaybeUninit<FlowEntry>,
    peer: u32,
    peer_port: u16,
    colour: u32,
    flags: u8,
    service: u32,
    stat: u32,
    now: u64,
) -> &mut FlowEntry {
    const WORDS: usize = core::mem::size_of::<FlowEntry>() / 8;
    const _: () = assert!(core::mem::size_of::<FlowEntry>() % 8 == 0);
    const _: () = assert!(core::mem::align_of::<FlowEntry>() == 8);
    let w = raw.as_mut_ptr().cast::<u64>();
    // SAFETY: FlowEntry is 8-aligned plain integers, 80 bytes; every word is
    // written (volatile, so the stores are not merged back into a memset
    // call), and zero is a valid value for every field.
    let e = unsafe {
        for i in 0..WORDS {
            core::ptr::write_volatile(w.add(i), 0);
        }
        &mut *raw.as_mut_ptr()
    };
    e.peer = peer;
    e.peer_port = peer_port;
    e.colour = colour as u8;
    e.flags = flags;
    e.service = service;
    e.created = now as u32;
    e.last_seen = now;
    e.backend_stat = stat as u16;
    e
}

/// Whether a forward entry no longer decides this packet: an idle UDP flow, or
/// a TCP SYN after the old connection closed or went idle (port reuse).
#[inline(always)]
fn expired(entry: &FlowEntry, f: &Frame, syn: bool, now: u64) -> bool {
    let Some(s) = SETTINGS.get(0) else {
        return false;
    };
    let idle = now.saturating_sub(entry.last_seen);
    if f.proto == PROTO_UDP {
        return idle > s.udp_idle;
    }
    syn && (closed(entry.flags) || idle > s.tcp_idle)
}

/// The backend pool `slot` of `service` chooses for a 5-tuple.
#[inline(always)]
fn pick(service: u32, slot: u32, key: &FlowKey) -> Option<Backend> {
    let slot = service * POOL_SLOTS + slot;
    let n = *POOL_SIZES.get(slot)?;
    if n == 0 || n > MAX_BACKENDS {
        return None;
    }
    let i = reduce(flow_hash(key, BACKEND_SEED), n);
    BACKENDS.get(slot * MAX_BACKENDS + i).copied()
}

/// Writes a new flow's entry (replies find it through `REPLY_SOURCES`).
#[inline(always)]
fn record(ctx: &XdpContext, key: &FlowKey, fwd: &FlowEntry) {
    if let Err(e) = FLOWS.insert(&key4(key), fwd, 0) {
        count(global::FLOW_INSERT_FAILED);
        if events::gate(global::FLOW_INSERT_FAILED) {
            error!(
                ctx,
                "data plane: a new flow to {:i} could not be recorded in the flow table (error {}): it is forwarded but not pinned to its backend (counter flow_insert_failed)",
                fwd.peer.to_ne_bytes(),
                e
            );
        }
    }
}

/// A packet in its backend's counters (`BACKEND_STATS`, one per-CPU slot);
/// a colour's traffic is the sum of its backends' (the daemon adds them up),
/// so a packet pays for one counter slot, not two.
#[inline(always)]
fn account(stat: u32, bytes: u64, new_flow: bool, reply: bool) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot.
        let s = unsafe { &mut *s };
        if reply {
            s.reply_packets += 1;
            s.reply_bytes += bytes;
        } else {
            s.packets += 1;
            s.bytes += bytes;
            if new_flow {
                s.new_flows += 1;
            }
        }
    }
}

/// Backend → client: a reply of a flow we forwarded gets the VIP back as its
/// source.
#[inline(always)]
fn from_backend(
    ctx: &XdpContext,
    f: &Frame,
    entry: &mut FlowEntry,
    vip: u32,
    vport: u16,
    now: u64,
    cache: &Cache,
) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return xdp_action::XDP_PASS;
    }
    if now.wrapping_sub(entry.last_seen) > cache.fresh.refresh {
        entry.last_seen = now;
    }
    let service = entry.service;
    let colour = entry.colour as u32;
    let stat = entry.backend_stat as u32;
    if f.proto == PROTO_TCP {
        let flags = f.tcp_flags;
        // Handshake and close, which status, the error signal and port reuse
        // read.
        let mut mirror = close_flags(flags, flow_flags::FIN_BACKEND);
        if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
            mirror |= flow_flags::ESTABLISHED;
        }
        reply_counters(service, colour, flags);
        if mirror != 0 {
            entry.flags |= mirror;
        }
    }
    account(stat, f.frame_len, false, true);
    count(global::REPLIES);
    if rewrite(ctx, f, Side::Src, &[vip, 0, 0, 0], vport).is_none() {
        count(global::MALFORMED);
        return xdp_action::XDP_PASS;
    }
    let action = send(ctx, f, Nh::reply(entry), now, cache.fresh, None);
    fill(cache, entry, Dir::Reply { vip, vport });
    action
}
