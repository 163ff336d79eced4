//! Backend → client: a reply of a flow bgswitch forwarded gets the VIP back
//! as its source. The flow is found through the backend's service
//! (`REPLY_SOURCES`) and the flow's record, or the hash choice for
//! connections without a record (a stable period, or the orphan pool of a
//! transition).

use bgswitch_common::{flow_flags, global, Addr, Backend, FlowKey, PROTO_TCP};

use crate::{
    cache::{fill, forget, write_slot, Cache, Decision, Dir},
    cache6::{fill6, Dir6, Tuple},
    context::{Packet, Side},
    family::Family,
    flow::close_flags,
    forward::Held,
    frame::{Frame, TCP_ACK, TCP_RST, TCP_SYN},
    handshake::backend_said,
    maps::{account, count, SERVICE_STATS},
    service::pick,
    transmit::{resolve, send, transmit, Nh},
};

/// Backend → client: a reply of a flow we forwarded gets the VIP back as its
/// source (either family; `vip[0]` is an IPv4 VIP).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn from_backend<C: Packet, F: Family>(
    ctx: &C,
    f: &Frame,
    entry: &mut F::Entry,
    held: Held,
    vip: &Addr,
    vport: u16,
    now: u64,
    cache: &Cache,
) -> u32 {
    let entry = F::flow(entry);
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return C::PASS;
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
        if held == Held::HalfOpen {
            backend_said(ctx, f, entry);
        }
    }
    account(stat, f.frame_len, false, true);
    count(global::REPLIES);
    if ctx.rewrite(f, Side::Src, vip, vport).is_none() {
        count(global::MALFORMED);
        return C::PASS;
    }
    let action = send(ctx, f, Nh::reply(entry), now, cache.fresh, None, false);
    if held == Held::HalfOpen {
        // Cached once the record is the flow table's.
        return action;
    }
    if F::V4 {
        fill(cache, entry, Dir::Reply { vip: vip[0], vport });
    } else {
        fill6(
            Tuple::of(f),
            cache.shift,
            cache.fresh,
            entry,
            Dir6::Reply { vip, vport },
        );
    }
    action
}

/// A reply of a connection no record holds (a stateless service's): as
/// `from_backend` without an entry. Its next hop towards the client is
/// looked up and kept in this CPU's cache slot only, so the flow's next
/// replies take the cached path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn stateless_reply<C: Packet>(
    ctx: &C,
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
        return C::PASS;
    }
    reply_counters(service, colour, f.tcp_flags);
    account(b.stat_id, f.frame_len, false, true);
    count(global::REPLIES);
    if ctx.rewrite(f, Side::Src, &[vip, 0, 0, 0], vport).is_none() {
        count(global::MALFORMED);
        return C::PASS;
    }
    let hop = match resolve(ctx, f) {
        Ok(hop) => hop,
        Err(unresolved) => {
            // Not through a kept next hop: this CPU's slot must not serve
            // an older decision.
            forget(&cache.key, cache.shift);
            return unresolved.map_or(C::PASS, |egress| ctx.unresolved(f, egress));
        }
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

/// For a backend's reply: the backend that pool `slot` of `service` chooses
/// for the client's 5-tuple (client → VIP), if it is the reply's source.
#[inline(always)]
pub fn hashed_here(f: &Frame, service: u32, slot: u32, vip: u32, vport: u16) -> Option<Backend> {
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
