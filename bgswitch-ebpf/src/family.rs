//! What differs between an IPv4 and an IPv6 flow on the table path: its
//! flow table (`FLOWS`, `FLOWS6`), key and record, and the backend's
//! address in the record. The stages that follow, choose and record flows
//! (`forward`, `reply`) are written once over [`Family`]; each family's
//! code is its own copy after monomorphization, so IPv4 pays nothing for
//! IPv6's longer addresses. The per-CPU flow cache and the stateless path
//! serve IPv4 flows only ([`Family::V4`]).

use aya_ebpf::maps::LruHashMap;
use bgswitch_common::{Addr, FlowEntry, FlowEntry6, FlowKey, FlowKey4, FlowKey6};

use crate::{
    flow::key4,
    maps::{FLOWS, FLOWS6},
};

pub trait Family {
    /// The flow table's key and value.
    type Key: 'static;
    type Entry: 'static;
    /// IPv4: the flow cache and the stateless path take part.
    const V4: bool;
    /// The family's flow table.
    fn flows() -> &'static LruHashMap<Self::Key, Self::Entry>;
    /// The table's key of a 5-tuple.
    fn key(k: &FlowKey) -> Self::Key;
    /// The record's family-independent part.
    fn flow(e: &mut Self::Entry) -> &mut FlowEntry;
    /// The backend's address.
    fn peer(e: &Self::Entry) -> Addr;
    /// Sets the backend's address.
    fn set_peer(e: &mut Self::Entry, addr: &Addr);
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Key = FlowKey4;
    type Entry = FlowEntry;
    const V4: bool = true;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey4, FlowEntry> {
        &FLOWS
    }

    #[inline(always)]
    fn key(k: &FlowKey) -> FlowKey4 {
        key4(k)
    }

    #[inline(always)]
    fn flow(e: &mut FlowEntry) -> &mut FlowEntry {
        e
    }

    #[inline(always)]
    fn peer(e: &FlowEntry) -> Addr {
        [e.peer, 0, 0, 0]
    }

    #[inline(always)]
    fn set_peer(e: &mut FlowEntry, addr: &Addr) {
        e.peer = addr[0];
    }
}

impl Family for V6 {
    type Key = FlowKey6;
    type Entry = FlowEntry6;
    const V4: bool = false;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey6, FlowEntry6> {
        &FLOWS6
    }

    #[inline(always)]
    fn key(k: &FlowKey) -> FlowKey6 {
        FlowKey6 {
            src: k.src,
            dst: k.dst,
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    #[inline(always)]
    fn flow(e: &mut FlowEntry6) -> &mut FlowEntry {
        &mut e.e
    }

    #[inline(always)]
    fn peer(e: &FlowEntry6) -> Addr {
        e.peer6
    }

    #[inline(always)]
    fn set_peer(e: &mut FlowEntry6, addr: &Addr) {
        e.peer6 = *addr;
        e.e.peer = addr[0];
    }
}
