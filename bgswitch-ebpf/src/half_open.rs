//! The half-open tables (`HALF_OPEN`, `HALF_OPEN6`): a TCP flow's record
//! between its SYN and the client's ACK that completes the handshake
//! (`handshake.rs` says when). Each is an array of two-way buckets
//! (`bgswitch_common::HalfOpen`), one per hash of the 5-tuple: a SYN reads
//! its bucket's seals and keys and writes one way (the one holding its
//! 5-tuple already, else an empty one, else the one written first), which is all a new
//! flow records — no free list, no eviction, no bucket lock. A record is
//! lost only to two later SYNs of the same bucket before its handshake
//! completes; its flow then takes the path of a missing record. A way
//! whose seal does not match what it holds (empty, or being rewritten on
//! another CPU) holds nothing.

use bgswitch_common::{
    half_open_bucket4, half_open_bucket6, FlowEntry, FlowEntry6, FlowKey, FlowKey4, HalfOpen4,
    HalfOpen6,
};

use crate::{
    flow::same_key,
    maps::{HALF_OPEN, HALF_OPEN6, SETTINGS},
};

/// What the bucket functions need of a bucket type.
trait Bucket {
    type K: Copy;
    type E: Copy;
    /// Whether way `w`'s key is `k` (its seal not checked).
    fn is(&self, w: usize, k: &Self::K) -> bool;
    /// The seal of `k` and `e` together.
    fn seal_of(k: &Self::K, e: &Self::E) -> u32;
    /// Way `w`: its seal, key and record.
    fn way(&mut self, w: usize) -> (&mut u32, &mut Self::K, &mut Self::E);
    /// The way written last.
    fn last(&mut self) -> &mut u32;
}

impl Bucket for HalfOpen4 {
    type K = FlowKey4;
    type E = FlowEntry;
    #[inline(always)]
    fn is(&self, w: usize, k: &FlowKey4) -> bool {
        same_key(&self.key[w], k)
    }
    #[inline(always)]
    fn seal_of(k: &FlowKey4, e: &FlowEntry) -> u32 {
        HalfOpen4::seal_of(k, e)
    }
    #[inline(always)]
    fn way(&mut self, w: usize) -> (&mut u32, &mut FlowKey4, &mut FlowEntry) {
        (&mut self.seal[w], &mut self.key[w], &mut self.entry[w])
    }
    #[inline(always)]
    fn last(&mut self) -> &mut u32 {
        &mut self.last
    }
}

impl Bucket for HalfOpen6 {
    type K = FlowKey;
    type E = FlowEntry6;
    #[inline(always)]
    fn is(&self, w: usize, k: &FlowKey) -> bool {
        let a = &self.key[w];
        a.src == k.src
            && a.dst == k.dst
            && a.sport == k.sport
            && a.dport == k.dport
            && a.proto == k.proto
    }
    #[inline(always)]
    fn seal_of(k: &FlowKey, e: &FlowEntry6) -> u32 {
        HalfOpen6::seal_of(k, e)
    }
    #[inline(always)]
    fn way(&mut self, w: usize) -> (&mut u32, &mut FlowKey, &mut FlowEntry6) {
        (&mut self.seal[w], &mut self.key[w], &mut self.entry[w])
    }
    #[inline(always)]
    fn last(&mut self) -> &mut u32 {
        &mut self.last
    }
}

/// `Settings::half_shift` (0: no half-open table).
#[inline(always)]
fn shift() -> u32 {
    SETTINGS.get(0).map_or(0, |s| u32::from(s.half_shift))
}

/// Way `w`'s record if its key is `k` and its seal is whole.
#[inline(always)]
fn held<B: Bucket>(b: *mut B, w: usize, k: &B::K) -> Option<*mut B::E> {
    // SAFETY: a bucket of the array, valid for the program's run; read as
    // whole integers (another CPU may be rewriting a way: the seal says so).
    let b = unsafe { &mut *b };
    if !b.is(w, k) {
        return None;
    }
    let (seal, key, entry) = b.way(w);
    // SAFETY: as above.
    let seal = unsafe { core::ptr::read_volatile(seal) };
    if seal == 0 || B::seal_of(key, entry) != seal {
        return None;
    }
    Some(entry)
}

/// The record of `k` in its bucket.
#[inline(always)]
fn lookup<B: Bucket>(b: *mut B, k: &B::K) -> Option<*mut B::E> {
    held(b, 0, k).or_else(|| held(b, 1, k))
}

/// Whether way `w` is empty.
#[inline(always)]
fn empty<B: Bucket>(b: &mut B, w: usize) -> bool {
    // SAFETY: as in `held`.
    unsafe { core::ptr::read_volatile(b.way(w).0) == 0 }
}

/// Records `k`'s flow in its bucket: in the way that holds `k` already,
/// else an empty one, else the one written before the other (the older).
#[inline(always)]
fn insert<B: Bucket>(b: *mut B, k: &B::K, e: &B::E) {
    // SAFETY: as in `held`.
    let b = unsafe { &mut *b };
    let w = if b.is(0, k) {
        0
    } else if b.is(1, k) {
        1
    } else if empty(b, 0) {
        0
    } else if empty(b, 1) {
        1
    } else {
        1 - (*b.last() & 1) as usize
    };
    *b.last() = w as u32;
    let (seal, key, entry) = b.way(w);
    // SAFETY: as in `held`. The seal is cleared first (readers on other
    // CPUs see an empty way while it is rewritten) and set last.
    unsafe {
        core::ptr::write_volatile(seal, 0);
        *key = *k;
        *entry = *e;
        core::ptr::write_volatile(seal, B::seal_of(k, e));
    }
}

/// Empties the way of `k`'s bucket that holds its record.
#[inline(always)]
fn remove<B: Bucket>(b: *mut B, k: &B::K) {
    // SAFETY: as in `held`.
    let b = unsafe { &mut *b };
    for w in 0..2 {
        if b.is(w, k) {
            // SAFETY: as in `held`.
            unsafe { core::ptr::write_volatile(b.way(w).0, 0) };
        }
    }
}

/// The bucket of an IPv4 5-tuple.
#[inline(always)]
fn bucket4(k: &FlowKey4) -> Option<*mut HalfOpen4> {
    let shift = shift();
    if shift == 0 {
        return None;
    }
    HALF_OPEN.get_ptr_mut(half_open_bucket4(k, shift))
}

/// The bucket of an IPv6 5-tuple.
#[inline(always)]
fn bucket6(k: &FlowKey) -> Option<*mut HalfOpen6> {
    let shift = shift();
    if shift == 0 {
        return None;
    }
    HALF_OPEN6.get_ptr_mut(half_open_bucket6(k, shift))
}

/// The half-open record of an IPv4 5-tuple.
#[inline(always)]
pub fn lookup4(k: &FlowKey4) -> Option<*mut FlowEntry> {
    lookup(bucket4(k)?, k)
}

/// Records a half-open IPv4 flow (`Err`: no half-open table).
#[inline(always)]
pub fn insert4(k: &FlowKey4, e: &FlowEntry) -> Result<(), i32> {
    let b = bucket4(k).ok_or(-7)?; // E2BIG
    insert(b, k, e);
    Ok(())
}

/// Forgets an IPv4 5-tuple's half-open record.
#[inline(always)]
pub fn remove4(k: &FlowKey4) {
    if let Some(b) = bucket4(k) {
        remove(b, k);
    }
}

/// The half-open record of an IPv6 5-tuple.
#[inline(always)]
pub fn lookup6(k: &FlowKey) -> Option<*mut FlowEntry6> {
    lookup(bucket6(k)?, k)
}

/// Records a half-open IPv6 flow, as `insert4`.
#[inline(always)]
pub fn insert6(k: &FlowKey, e: &FlowEntry6) -> Result<(), i32> {
    let b = bucket6(k).ok_or(-7)?;
    insert(b, k, e);
    Ok(())
}

/// Forgets an IPv6 5-tuple's half-open record.
#[inline(always)]
pub fn remove6(k: &FlowKey) {
    if let Some(b) = bucket6(k) {
        remove(b, k);
    }
}
