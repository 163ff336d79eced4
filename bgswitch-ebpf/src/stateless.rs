//! The stateless path: a stateless service's packet in its stable period
//! is sent to the backend the flow hash picks over the active pool, with
//! nothing read or written per flow (the service found by one 64-bit load
//! of its `ADDR_FILTER` slot; the next hop is the backend's).

use bgswitch_common::{
    control, global, stateless_entry, stateless_slot, ADDR_FILTER_WORDS, STATELESS_ID_MASK,
};

use crate::{
    context::{Packet, Side},
    flow::flow_key,
    frame::{Frame, TCP_ACK, TCP_SYN},
    maps::{account, count, ADDR_FILTER, BACKEND_HOPS},
    service::{no_backend, pick, vip_source},
    transmit::{hop_serves, keep_for, send, transmit_l2, Fresh, Nh},
};

/// The stateless service in its stable period the packet's VIP and port
/// (IPv4, TCP) may be: one 64-bit load of its `ADDR_FILTER` slot (see
/// `bgswitch_common::stateless_entry`). The caller checks the control word.
#[inline(always)]
pub fn stateless_service(f: &Frame) -> Option<u32> {
    let slot = stateless_slot(f.dst[0], f.dport);
    let p = ADDR_FILTER.get_ptr(2 * ADDR_FILTER_WORDS + slot)?;
    // SAFETY: an aligned 64-bit load of an array slot (stored whole).
    let e = unsafe { core::ptr::read_volatile(p) };
    (e & !STATELESS_ID_MASK == stateless_entry(f.dst[0], f.dport, 0))
        .then_some(((e & STATELESS_ID_MASK) >> 48) as u32)
}

/// A stateless service's packet in its stable period: the backend is the
/// flow hash over the active pool, for a SYN and every later packet alike
/// (so they agree without a record); nothing is recorded, and the next hop
/// is the backend's (`BACKEND_HOPS`), looked up once per backend and
/// refresh instead of once per flow.
#[inline(always)]
pub fn stateless<C: Packet>(
    ctx: &C,
    f: &Frame,
    service: u32,
    word: u32,
    now: u64,
    fresh: Fresh,
) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return C::PASS;
    }
    if vip_source(f) {
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
    }
    let key = flow_key(f);
    let active = control::active(word);
    let Some(b) = pick(service, control::slot(word, active), &key) else {
        return no_backend::<C>(service, active);
    };
    let Some(hop) = BACKEND_HOPS.get_ptr_mut(b.stat_id) else {
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
    };
    // SAFETY: this CPU's slot; XDP runs are not nested on one CPU.
    let hop = unsafe { &mut *hop };
    let syn = f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    account(b.stat_id, f.frame_len, syn, false);
    let peer = b.addr[0];
    // The backend's next hop and deltas, if they are for this VIP and
    // backend, this program type's, current, fresh and long enough: the
    // cached path's rewrite.
    if hop_serves::<C>(hop, peer, f, now, fresh)
        && hop.peer_port == b.port
        && hop.vip == f.dst[0]
        && hop.vport == f.dport
    {
        if ctx
            .rewrite_cached(f, Side::Dst, peer, b.port, hop.ip_delta, hop.l4_delta)
            .is_none()
        {
            count(global::MALFORMED);
            return C::PASS;
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
    if ctx.rewrite(f, Side::Dst, &b.addr, b.port).is_none() {
        count(global::MALFORMED);
        return C::PASS;
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
        false,
    );
    keep_for::<C>(hop, vip, vport, peer, b.port);
    action
}
