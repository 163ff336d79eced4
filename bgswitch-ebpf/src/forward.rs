//! Client → VIP: follow the flow's record, or choose a colour and a backend
//! for a new flow (the orphan pool for a connection older than its record
//! in a transition) and record it, one entry with both directions' next
//! hops. Written once for both families ([`Family`]).

use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use bgswitch_common::{
    control, flow_flags, global,
    hash::{flow_hash, CANARY_SEED},
    Addr, FlowEntry, FlowKey, FlowKey4, PreviewKey, PROTO_TCP, PROTO_UDP,
};

use crate::{
    cache::{fill, forget, Cache, Dir},
    cache6::{fill6, forget6, Dir6, Tuple},
    context::{Packet, Side},
    events,
    family::Family,
    flow::{close_flags, closed},
    frame::{Frame, TCP_ACK, TCP_SYN},
    handshake::completes,
    maps::{account, count, CONTROL, PREVIEW, SETTINGS},
    service::{no_backend, pick, vip_source},
    stateless::stateless,
    transmit::{send, send_new_by_backend, too_big_after, Nh},
};

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

/// Where a flow's record was found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// In the flow table (or none found: a new flow).
    Table,
    /// In the half-open table (`handshake.rs`).
    HalfOpen,
}

/// Client → VIP, with the flow's record if it has one (and where).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn to_backend<C: Packet, F: Family>(
    ctx: &C,
    f: &Frame,
    key: &FlowKey,
    service: u32,
    entry: Option<&mut F::Entry>,
    held: Held,
    now: u64,
    cache: &Cache,
) -> u32 {
    if f.ttl <= 1 {
        count(global::TTL_EXCEEDED);
        return C::PASS;
    }
    let Some(word) = CONTROL.get_ptr(service) else {
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
    };
    // One 32-bit load of the word userspace stores atomically.
    // SAFETY: the pointer comes from a successful array lookup.
    let word = unsafe { core::ptr::read_volatile(word) };
    if !control::enabled(word) {
        // A removed service: its flows are not ours any more.
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
    }
    if F::V4 && control::stateless(word) && f.proto == PROTO_TCP {
        // Its stateless slot is set before the word and cleared after: only
        // a packet racing a change, or of a service whose slot another one
        // holds, gets here.
        return stateless(ctx, f, service, word, now, cache.fresh);
    }
    let syn = f.proto == PROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // The backend of an entry this packet replaces (port reuse after close
    // or idle).
    let mut replaced: Option<(Addr, u16)> = None;
    if let Some(full) = entry {
        let peer = F::peer(full);
        let entry = F::flow(full);
        replaced = Some((peer, entry.peer_port));
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
            let promote = held == Held::HalfOpen && !syn && completes(ctx, f, entry);
            if ctx.rewrite(f, Side::Dst, &peer, entry.peer_port).is_none() {
                count(global::MALFORMED);
                return C::PASS;
            }
            let action = send(ctx, f, Nh::forward(entry), now, cache.fresh, None, false);
            if held == Held::HalfOpen && !promote {
                // Not yet the flow table's: forwarded by its half-open
                // record, and not cached (the cached path would not
                // complete it).
                return action;
            }
            if F::V4 {
                fill(cache, entry, Dir::Forward);
            } else {
                fill6(
                    Tuple::key(key),
                    cache.shift,
                    cache.fresh,
                    entry,
                    Dir6::Forward { backend: &peer },
                );
            }
            if promote {
                // The handshake is complete: the record (as this packet
                // left it) moves to the flow table, the copy first so some
                // table always has it. Nothing reads it here afterwards: a
                // deleted element of a preallocated map is reused at once.
                if F::insert(key, full).is_err() {
                    count(global::FLOW_INSERT_FAILED);
                } else {
                    F::remove_half(key);
                    count(global::PROMOTED);
                }
            }
            return action;
        }
    }

    if vip_source(f) {
        count(global::PASS_NOT_SERVICE);
        return C::PASS;
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
            if orphan {
                // Its record was evicted, or it is older than the table.
                count(global::RECORD_MISSING);
            }
            let (colour, preview) = choose_colour(word, service, key, orphan);
            (colour, control::slot(word, colour), preview)
        }
    };
    let Some(b) = pick(service, slot, key) else {
        return no_backend::<C>(service, colour);
    };
    account(b.stat_id, f.frame_len, true, false);
    if ctx.rewrite(f, Side::Dst, &b.addr, b.port).is_none() {
        count(global::MALFORMED);
        return C::PASS;
    }
    let mut flags = close_flags(f.tcp_flags, flow_flags::FIN_CLIENT);
    if preview {
        flags |= flow_flags::PREVIEW;
    }
    let mut raw = core::mem::MaybeUninit::<F::Entry>::uninit();
    let Some(room) = F::room(&mut raw) else {
        return C::PASS;
    };
    let rec = new_entry::<F>(
        room, &b.addr, b.port, colour, flags, service, b.stat_id, now,
    );
    // The next hop is looked up before the flow is recorded, so the forward
    // entry is written once, with it; the frame leaves only after we return.
    // A packet too long for its next hop goes to the too-big program only
    // once its flow is recorded: the error it becomes is translated
    // through that record.
    let action = if F::V4 && cache.backend_hops {
        send_new_by_backend(ctx, f, F::flow(rec), b.stat_id, now, cache.fresh)
    } else {
        send(
            ctx,
            f,
            Nh::forward(F::flow(rec)),
            now,
            cache.fresh,
            None,
            true,
        )
    };
    // A TCP flow waits in the half-open table until its handshake
    // completes (`handshake.rs`), unless it replaces a record of the flow
    // table (port reuse: that record must not outlive it there).
    let half = f.proto == PROTO_TCP && !(replaced.is_some() && held == Held::Table);
    let noted = record::<F>(key, rec, half);
    if action == C::PASS {
        too_big_after(ctx);
    }
    if F::V4 {
        forget_replaced(cache, F::flow(rec), f, replaced, &b.addr, b.port, half);
    } else {
        if !half {
            fill6(
                Tuple::key(key),
                cache.shift,
                cache.fresh,
                F::flow(rec),
                Dir6::Forward { backend: &b.addr },
            );
        }
        if let Some((old, old_port)) = replaced {
            if (old, old_port) != (b.addr, b.port) {
                // The old backend's late packets are no replies of the new
                // flow: this CPU's slot of them goes.
                forget6(
                    Tuple {
                        src: &old,
                        dst: &f.src,
                        sport: old_port,
                        dport: f.sport,
                        proto: f.proto,
                    },
                    cache.shift,
                );
            }
        }
    }
    if noted {
        return events::flush(ctx, action);
    }
    action
}

/// The flow cache's part of a new IPv4 flow: this CPU's slot of it filled,
/// and the slot of the backend an entry it replaced had cleared.
#[inline(always)]
fn forget_replaced(
    cache: &Cache,
    fwd: &FlowEntry,
    f: &Frame,
    replaced: Option<(Addr, u16)>,
    addr: &Addr,
    port: u16,
    half: bool,
) {
    // A replaced entry (port reuse after close or idle) needs no
    // invalidation elsewhere: after idle, every CPU's slot of the flow is
    // older than the refresh; after a close, slots on other CPUs would
    // matter only if one 5-tuple's packets came in on two CPUs within the
    // refresh of the new SYN (RSS keeps a 5-tuple on one queue). The old
    // backend's reply slot is cleared below (on this CPU). A half-open
    // record is not cached: its packets must reach it to complete it.
    if !half {
        fill(cache, fwd, Dir::Forward);
    }
    if let Some((old, old_port)) = replaced {
        if (old[0], old_port) != (addr[0], port) {
            // The old backend's late packets are no replies of the new flow:
            // this CPU's slot of them goes (other CPUs' slots age out within
            // the refresh).
            forget(
                &FlowKey4 {
                    src: old[0],
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
}

/// A new flow's record, built in place in `raw`: zeroed with 8-byte stores
/// first (ten for IPv4; a struct literal's `[0; 6]` MAC fields each became
/// a call to the byte-at-a-time memset here, four per new flow), then the
/// fields that are not zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn new_entry<'a, F: Family>(
    raw: &'a mut core::mem::MaybeUninit<F::Entry>,
    peer: &Addr,
    peer_port: u16,
    colour: u32,
    flags: u8,
    service: u32,
    stat: u32,
    now: u64,
) -> &'a mut F::Entry {
    const _: () = assert!(core::mem::size_of::<FlowEntry>().is_multiple_of(8));
    const _: () = assert!(core::mem::align_of::<FlowEntry>() == 8);
    const _: () = assert!(core::mem::size_of::<bgswitch_common::FlowEntry6>().is_multiple_of(8));
    let words = core::mem::size_of::<F::Entry>() / 8;
    let w = raw.as_mut_ptr().cast::<u64>();
    // SAFETY: both records are 8-aligned plain integers, a multiple of 8
    // bytes; every word is written (volatile, so the stores are not merged
    // back into a memset call), and zero is a valid value for every field.
    let rec = unsafe {
        for i in 0..words {
            core::ptr::write_volatile(w.add(i), 0);
        }
        &mut *raw.as_mut_ptr()
    };
    F::set_peer(rec, peer);
    let e = F::flow(rec);
    e.peer_port = peer_port;
    e.colour = colour as u8;
    e.flags = flags;
    e.service = service;
    e.created = now as u32;
    e.last_seen = now;
    e.backend_stat = stat as u16;
    rec
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

/// Writes a new flow's record (replies find it through `REPLY_SOURCES`),
/// in the half-open table if `half`; whether a failure was noted for the
/// log (`events::flush` then).
#[inline(always)]
fn record<F: Family>(key: &FlowKey, rec: &F::Entry, half: bool) -> bool {
    let done = if half {
        count(global::HALF_OPEN);
        F::insert_half(key, rec)
    } else {
        F::insert(key, rec)
    };
    if let Err(e) = done {
        count(global::FLOW_INSERT_FAILED);
        return events::note(
            global::FLOW_INSERT_FAILED,
            &F::peer(rec),
            !F::V4,
            e as u32,
            0,
        );
    }
    false
}
