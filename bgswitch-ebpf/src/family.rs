//! What differs between an IPv4 and an IPv6 flow on the table path: its
//! flow table (`FLOWS`, `FLOWS6`), key and record, and the backend's
//! address in the record. The stages that follow, choose and record flows
//! (`forward`, `reply`) are written once over [`Family`]; each family's
//! code is its own copy after monomorphization, so IPv4 pays nothing for
//! IPv6's longer addresses. The per-CPU flow cache and the stateless path
//! serve IPv4 flows only ([`Family::V4`]).

use bgswitch_common::{Addr, FlowEntry, FlowEntry6, FlowKey, PROTO_TCP};

use core::mem::MaybeUninit;

use crate::{
    flow::key4,
    half_open,
    maps::{FLOWS, FLOWS6, NEW_FLOW6},
};

pub trait Family {
    /// The flow table's value.
    type Entry: 'static;
    /// IPv4: the flow cache and the stateless path take part.
    const V4: bool;
    /// Room for a new flow's record: `raw`, on the caller's stack, for
    /// IPv4; for IPv6 this CPU's slot of `NEW_FLOW6` (`raw` unused, and so
    /// never allocated: 96 bytes fewer on a path whose stack is near the
    /// verifier's limit). `None` only if that slot is missing, which
    /// loading rules out.
    fn room(raw: &mut MaybeUninit<Self::Entry>) -> Option<&mut MaybeUninit<Self::Entry>>;
    /// The record of a 5-tuple (client → VIP), if the table has one.
    fn lookup(k: &FlowKey) -> Option<*mut Self::Entry>;
    /// Records a flow in the family's table under its 5-tuple.
    fn insert(k: &FlowKey, e: &Self::Entry) -> Result<(), i32>;
    /// The half-open record of a 5-tuple, if the family's half-open table
    /// has one.
    fn lookup_half(k: &FlowKey) -> Option<*mut Self::Entry>;
    /// Records a half-open TCP flow.
    fn insert_half(k: &FlowKey, e: &Self::Entry) -> Result<(), i32>;
    /// Forgets a half-open record (it moved to the flow table).
    fn remove_half(k: &FlowKey);
    /// The record of a 5-tuple in either table (a TCP flow may be half
    /// open).
    #[inline(always)]
    fn lookup_any(k: &FlowKey) -> Option<*mut Self::Entry> {
        match Self::lookup(k) {
            Some(e) => Some(e),
            None if k.proto == PROTO_TCP => Self::lookup_half(k),
            None => None,
        }
    }
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
    type Entry = FlowEntry;
    const V4: bool = true;

    #[inline(always)]
    fn room(raw: &mut MaybeUninit<FlowEntry>) -> Option<&mut MaybeUninit<FlowEntry>> {
        Some(raw)
    }

    #[inline(always)]
    fn lookup(k: &FlowKey) -> Option<*mut FlowEntry> {
        FLOWS.get_ptr_mut(&key4(k))
    }

    #[inline(always)]
    fn insert(k: &FlowKey, e: &FlowEntry) -> Result<(), i32> {
        FLOWS.insert(&key4(k), e, 0)
    }

    #[inline(always)]
    fn lookup_half(k: &FlowKey) -> Option<*mut FlowEntry> {
        half_open::lookup4(&key4(k))
    }

    #[inline(always)]
    fn insert_half(k: &FlowKey, e: &FlowEntry) -> Result<(), i32> {
        half_open::insert4(&key4(k), e)
    }

    #[inline(always)]
    fn remove_half(k: &FlowKey) {
        // Gone already (another SYN took its slot) is as good.
        half_open::remove4(&key4(k));
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
    type Entry = FlowEntry6;
    const V4: bool = false;

    #[inline(always)]
    fn room(_raw: &mut MaybeUninit<FlowEntry6>) -> Option<&mut MaybeUninit<FlowEntry6>> {
        let slot = NEW_FLOW6.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot, used by this run alone (XDP and TC runs
        // are not nested on one CPU: a run finishes before the next starts);
        // MaybeUninit has the layout of the record.
        Some(unsafe { &mut *slot.cast::<MaybeUninit<FlowEntry6>>() })
    }

    #[inline(always)]
    fn lookup(k: &FlowKey) -> Option<*mut FlowEntry6> {
        FLOWS6.get_ptr_mut(k)
    }

    /// The 5-tuple is the key itself (`family` 6, padding zero).
    #[inline(always)]
    fn insert(k: &FlowKey, e: &FlowEntry6) -> Result<(), i32> {
        FLOWS6.insert(k, e, 0)
    }

    #[inline(always)]
    fn lookup_half(k: &FlowKey) -> Option<*mut FlowEntry6> {
        half_open::lookup6(k)
    }

    #[inline(always)]
    fn insert_half(k: &FlowKey, e: &FlowEntry6) -> Result<(), i32> {
        half_open::insert6(k, e)
    }

    #[inline(always)]
    fn remove_half(k: &FlowKey) {
        half_open::remove6(k);
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
