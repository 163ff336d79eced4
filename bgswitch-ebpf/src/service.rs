//! What every stage reads of a service: the address filter that skips the
//! lookups of addresses bgswitch does not serve, the IPv4 services' index
//! (an IPv4 packet's service without a hash lookup), the control word, the
//! backend a pool chooses, whether a source is a VIP (spoofed), and the
//! rare event of an empty pool.

use bgswitch_common::{
    addr_bit, global,
    hash::{flow_hash, reduce, BACKEND_SEED},
    service_entry, stateless_slot, Addr, Backend, FlowKey, ServiceKey, MAX_BACKENDS, POOL_SLOTS,
    SERVICE_INDEX, SERVICE_SHARED, STATELESS_ID_MASK,
};

use crate::{
    context::Packet,
    events,
    frame::Frame,
    maps::{count, ADDR_FILTER, BACKENDS, CONTROL, POOL_SIZES, SERVICES},
};

/// Whether `addr` may be in the `ADDR_FILTER` bitmap starting at word
/// `base` (VIPs at 0, backends at `ADDR_FILTER_WORDS`).
#[inline(always)]
pub fn maybe(base: u32, addr: &Addr) -> bool {
    let (word, mask) = addr_bit(addr);
    match ADDR_FILTER.get_ptr(base + word) {
        // SAFETY: an aligned 64-bit load of an array slot.
        Some(w) => (unsafe { core::ptr::read_volatile(w) }) & mask != 0,
        None => true,
    }
}

/// The service of an IPv4 packet's VIP, port and protocol: one 64-bit load
/// of its slot in the services' index (`bgswitch_common::SERVICE_INDEX`);
/// a slot that services share sends the packet to `SERVICES`.
#[inline(always)]
pub fn service4(f: &Frame) -> Option<u32> {
    let slot = stateless_slot(f.dst[0], f.dport);
    let p = ADDR_FILTER.get_ptr(SERVICE_INDEX + slot)?;
    // SAFETY: an aligned 64-bit load of an array slot (stored whole).
    let e = unsafe { core::ptr::read_volatile(p) };
    if e & !STATELESS_ID_MASK == service_entry(f.dst[0], f.dport, f.proto, 0) {
        return Some(((e & STATELESS_ID_MASK) >> 48) as u32);
    }
    if e != SERVICE_SHARED {
        return None;
    }
    service_at(f, f.dst, f.dport)
}

/// The service `SERVICES` has for `addr:port` with the frame's protocol
/// and family.
#[inline(always)]
pub fn service_at(f: &Frame, addr: Addr, port: u16) -> Option<u32> {
    let key = ServiceKey {
        addr,
        port,
        proto: f.proto,
        family: f.family,
    };
    // SAFETY: the value is a plain Copy integer read once.
    unsafe { SERVICES.get(&key) }.map(|s| s.id)
}

/// The control word of a service (0, disabled, if there is none).
#[inline(always)]
pub fn control_word(service: u32) -> u32 {
    match CONTROL.get_ptr(service) {
        // SAFETY: one 32-bit load of the word userspace stores atomically.
        Some(w) => unsafe { core::ptr::read_volatile(w) },
        None => 0,
    }
}

/// The backend pool `slot` of `service` chooses for a 5-tuple.
#[inline(always)]
pub fn pick(service: u32, slot: u32, key: &FlowKey) -> Option<Backend> {
    let slot = service * POOL_SLOTS + slot;
    let n = *POOL_SIZES.get(slot)?;
    if n == 0 || n > MAX_BACKENDS {
        return None;
    }
    let i = reduce(flow_hash(key, BACKEND_SEED), n);
    BACKENDS.get(slot * MAX_BACKENDS + i).copied()
}

/// A client whose own address and port are a VIP (spoofed): the replies to
/// it would be VIP traffic. Not ours.
#[inline(always)]
pub fn vip_source(f: &Frame) -> bool {
    // The key only for a source in the VIP bitmap.
    maybe(0, &f.src) && service_at(f, f.src, f.sport).is_some()
}

/// An empty pool: counted, logged (rarely), and passed untouched.
#[inline(always)]
pub fn no_backend<C: Packet>(service: u32, colour: u32) -> u32 {
    count(global::NO_BACKEND);
    // Written once the entry point has the verdict (`main.rs::logged`).
    events::note(global::NO_BACKEND, &[0; 4], false, service, colour as u16);
    C::PASS
}
