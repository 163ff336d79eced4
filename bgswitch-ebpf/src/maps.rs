//! Map declarations and the counter helpers. Sizes here are defaults; the
//! daemon sets `FLOWS` from its config at load time and pins every map
//! under `<bpffs>/bgswitch/v<N>/`.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use bgswitch_common::{
    global, Backend, BackendHop, BackendStats, CachedFlow, CachedFlow6, ColourStats, Event,
    FlowEntry, FlowEntry6, FlowKey, FlowKey4, HalfOpen4, HalfOpen6, PreviewKey, ReplySource,
    ServiceKey, ServiceValue, Settings, ADDR_FILTER_LEN, BACKEND_ENTRIES, BACKEND_STAT_ENTRIES,
    DEFAULT_MAX_FLOWS, FLOW_CACHE_SLOTS, MAX_INTERFACES, MAX_PREVIEW_PREFIXES, MAX_SERVICES,
    POOL_SLOTS,
};
use bgswitch_common::{tail, BPF_F_MMAPABLE};

/// Virtual address → service id.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Per-service control word (see `bgswitch_common::control`).
#[map]
pub static CONTROL: Array<u32> = Array::with_max_entries(MAX_SERVICES, BPF_F_MMAPABLE);

/// The flow-cache generation (see `bgswitch_common::CachedFlow`), bumped by
/// userspace (its only writer) through its mapping.
#[map]
pub static FLOW_GEN: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The flow cache (see `bgswitch_common::CachedFlow`): one region of
/// `1 << (32 - cache_shift)` slots per CPU id, slot `cpu << (32 - shift) |
/// cache_slot(..)` (see `flow::cache_index`). A plain array, not a per-CPU
/// one: a per-CPU array's lookup loads the slot's per-CPU pointer from a
/// table of its own first, a second dependent cache miss on a cold slot. The
/// daemon sizes it (slots × CPU ids); each CPU writes only its own region.
///
/// Memory-mapped for its alignment, not for userspace: the kernel puts a
/// mappable array's first value on a page boundary, a plain one's right
/// after its header (312 B into a page-aligned allocation on Linux 6.18,
/// 56 mod 64), where every 64-B slot straddles two cache lines: a slot is
/// one line instead of two, and 10 000 flows' slots half the lines. No
/// change in the forwarding rate was measured (the two lines of a straddling
/// slot are adjacent and missed together; see bench/RESULTS.md).
#[map]
pub static FLOW_CACHE: Array<CachedFlow> =
    Array::with_max_entries(FLOW_CACHE_SLOTS, BPF_F_MMAPABLE);

/// Number of backends in each pool slot, index `service * POOL_SLOTS + slot`.
#[map]
pub static POOL_SIZES: Array<u32> = Array::with_max_entries(MAX_SERVICES * POOL_SLOTS, 0);

/// Backends of each pool slot, index `(service * POOL_SLOTS + slot) * MAX_BACKENDS + i`.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(BACKEND_ENTRIES, 0);

/// IPv4 flow table: one entry per flow, keyed client → VIP.
#[map]
pub static FLOWS: LruHashMap<FlowKey4, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// IPv6 flow table: one entry per flow, keyed client → VIP (a table of its
/// own: IPv4 flows do not pay for IPv6's key and record sizes). The daemon
/// sizes it like `FLOWS`.
#[map]
pub static FLOWS6: LruHashMap<FlowKey, FlowEntry6> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Half-open TCP flows (IPv4): a SYN's record stays here until the
/// client's ACK completes the handshake (it acknowledges the backend's
/// SYN-ACK), and only then moves to `FLOWS`. A flood of SYNs from spoofed
/// sources churns this table alone: it cannot evict an established
/// connection's record. Two-way buckets, one per hash of the 5-tuple
/// (`bgswitch_common::HalfOpen`, `half_open.rs`), memory-mapped so each
/// bucket starts on a cache line; the daemon sizes it from `max_flows`
/// (`half_open_buckets`, a power of two) and tells the program its size in
/// `Settings::half_shift`.
#[map]
pub static HALF_OPEN: Array<HalfOpen4> =
    Array::with_max_entries(DEFAULT_MAX_FLOWS / 8, BPF_F_MMAPABLE);

/// Half-open TCP flows (IPv6), as `HALF_OPEN`.
#[map]
pub static HALF_OPEN6: Array<HalfOpen6> =
    Array::with_max_entries(DEFAULT_MAX_FLOWS / 8, BPF_F_MMAPABLE);

/// The XDP programs the XDP entry point tail-calls (`bgswitch_common::tail`);
/// filled by the daemon when it loads them; pinned (the kernel empties a
/// program array when its last user reference goes).
#[map]
pub static TAIL_XDP: ProgramArray = ProgramArray::with_max_entries(tail::COUNT, 0);

/// The TC programs the TC entry point tail-calls, as `TAIL_XDP`.
#[map]
pub static TAIL_TC: ProgramArray = ProgramArray::with_max_entries(tail::COUNT, 0);

/// The next hop's MTU when `transmit::resolve` found a rewritten packet
/// too long for it (0: none), per CPU, for the program's entry point to
/// answer with an ICMP error once the path has passed the packet (see
/// `icmp::too_big`). Not pinned.
#[map]
pub static TOO_BIG: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// A rare event noted on this CPU's path, for the log program to write
/// once the frame's verdict is known (`events.rs`). Not pinned.
#[map]
pub static EVENT: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

/// Room for an IPv6 packet's `bpf_fib_lookup` parameters, one per CPU (off
/// the IPv6 program's stack). Not pinned.
#[map]
pub static FIB6: PerCpuArray<[u32; 16]> = PerCpuArray::with_max_entries(1, 0);

/// Room for a new IPv6 flow's record while it is built, one per CPU (see
/// `family::Family::with_room`). Not pinned.
#[map]
pub static NEW_FLOW6: PerCpuArray<FlowEntry6> = PerCpuArray::with_max_entries(1, 0);

/// Bitmaps of VIP and backend addresses (see `bgswitch_common::addr_bit`),
/// then the stateless services' slots (`bgswitch_common::stateless_entry`)
/// and the IPv4 services' index (`bgswitch_common::service_entry`).
#[map]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(ADDR_FILTER_LEN, BPF_F_MMAPABLE);

/// The next hop towards each backend (index as `BACKEND_STATS`), for
/// stateless services: one FIB lookup per backend and refresh, not per flow.
#[map]
pub static BACKEND_HOPS: PerCpuArray<BackendHop> =
    PerCpuArray::with_max_entries(BACKEND_STAT_ENTRIES, 0);

/// Backend (as a `ServiceKey`) → the VIP and port its replies get back.
#[map]
pub static REPLY_SOURCES: HashMap<ServiceKey, ReplySource> =
    HashMap::with_max_entries(BACKEND_STAT_ENTRIES, 0);

/// When each kind of logged event (a `global` counter index) was last
/// logged, in ticks, shared by all CPUs (see `events::gate`).
#[map]
pub static LOG_GATE: Array<u64> = Array::with_max_entries(global::COUNT, 0);

/// Timeouts, one entry.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Interfaces bgswitch serves with XDP, keyed by ifindex: those the XDP
/// program redirects to.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

/// Every interface bgswitch serves, XDP or TC, keyed by ifindex (value:
/// `bgswitch_common::attach`): those the TC program sends to.
#[map]
pub static ATTACHED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_INTERFACES, 0);

/// The flow cache of IPv6 flows (see `bgswitch_common::CachedFlow6`): as
/// `FLOW_CACHE`, with a quarter of its slots per CPU id, memory-mapped for
/// the same alignment (a 96-B slot then spans two lines, never three). The
/// daemon sizes it.
#[map]
pub static FLOW_CACHE6: Array<CachedFlow6> =
    Array::with_max_entries(FLOW_CACHE_SLOTS / 4, BPF_F_MMAPABLE);

/// Per-CPU counters per service and colour, index `service * 2 + colour`:
/// backend RSTs and SYN-ACKs only (the traffic is counted per backend).
#[map]
pub static SERVICE_STATS: PerCpuArray<ColourStats> =
    PerCpuArray::with_max_entries(MAX_SERVICES * 2, 0);

/// Per-CPU counters per configured backend.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(BACKEND_STAT_ENTRIES, 0);

/// Per-CPU global counters, indexed by `bgswitch_common::global`.
#[map]
pub static GLOBAL_STATS: PerCpuArray<[u64; global::COUNT as usize]> =
    PerCpuArray::with_max_entries(1, 0);

/// Preview prefixes: (service, source prefix) → 1. New flows from a matching
/// source go to the idle colour. Consulted only when the service's control
/// word has the PREVIEW bit.
#[map]
pub static PREVIEW: LpmTrie<PreviewKey, u32> = LpmTrie::with_max_entries(MAX_PREVIEW_PREFIXES, 0);

/// The clock program's output: `[jiffies, bpf_ktime_get_ns()]`.
#[map]
pub static CLOCK: Array<u64> = Array::with_max_entries(2, 0);

/// Adds one to a global counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run; the
        // index is one of the `global` constants (< COUNT).
        unsafe {
            if let Some(v) = (*c).get_mut(index as usize) {
                *v += 1;
            }
        }
    }
}

/// Adds one to two global counters with one lookup (the cached path's).
#[inline(always)]
pub fn count2(a: u32, b: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(0) {
        // SAFETY: as for `count`.
        unsafe {
            if let Some(v) = (*c).get_mut(a as usize) {
                *v += 1;
            }
            if let Some(v) = (*c).get_mut(b as usize) {
                *v += 1;
            }
        }
    }
}

/// A packet in its backend's counters (`BACKEND_STATS`, one per-CPU slot);
/// a colour's traffic is the sum of its backends' (the daemon adds them up),
/// so a packet pays for one counter slot, not two.
#[inline(always)]
pub fn account(stat: u32, bytes: u64, new_flow: bool, reply: bool) {
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
