//! Types and pure functions shared by the XDP program (`bgswitch-ebpf`) and the
//! userspace daemon (`bgswitch`).
//!
//! Everything here is `#[repr(C)]`, made of integers and byte arrays only, with
//! padding spelled out, so both sides agree on every byte of every map.
//!
//! # Byte order
//! Addresses and ports are kept in **network byte order, as raw wire bytes**:
//! an IPv4 address `198.18.0.1` is stored as the bytes `[198, 18, 0, 1]`, a port
//! `80` as the bytes `[0, 80]` reinterpreted as a native `u16`. The eBPF side
//! copies them straight from packets; userspace converts with
//! [`ipv4_to_addr`], [`port_to_wire`] and friends. Counters and times are native
//! integers.
//!
//! # Layout version
//! [`LAYOUT_VERSION`] names the shape of every pinned map. The daemon pins its
//! maps under `<bpffs>/bgswitch/v<LAYOUT_VERSION>/` and refuses to adopt maps
//! whose key, value or size do not match, so a new daemon never reuses a map of
//! another shape.
#![no_std]

pub mod csum;
pub mod hash;

/// Version of the map layout below. Bump on any change to a map's key, value,
/// type or meaning.
pub const LAYOUT_VERSION: u32 = 7;

/// Most services one data plane serves (size of the per-service arrays).
pub const MAX_SERVICES: u32 = 256;
/// Most backends in one pool (one colour of one service).
pub const MAX_BACKENDS: u32 = 64;
/// Pool slots per service. Up to three are live (blue's, green's, and the
/// pool of the last stateless period during a transition, see
/// [`control::ORPHAN`]); the others are where a new version of a pool is
/// written before one 32-bit store selects it.
pub const POOL_SLOTS: u32 = 8;
/// Size of the backend array: every slot of every service.
pub const BACKEND_ENTRIES: u32 = MAX_SERVICES * POOL_SLOTS * MAX_BACKENDS;
/// Per-backend counter slots: one per configured backend position,
/// `service * 2 * MAX_BACKENDS + colour * MAX_BACKENDS + index`.
pub const BACKEND_STAT_ENTRIES: u32 = MAX_SERVICES * 2 * MAX_BACKENDS;
// Flow entries keep a backend's counter slot in 16 bits.
const _: () = assert!(BACKEND_STAT_ENTRIES <= 1 << 16);
/// Most interfaces the data plane forwards between.
pub const MAX_INTERFACES: u32 = 64;
/// Default size of the flow table (entries; each flow uses two: both directions).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// Address family tags stored in keys.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Colours, as stored in the control word and flow entries.
pub const BLUE: u32 = 0;
pub const GREEN: u32 = 1;

/// Map names, shared so userspace can find, size and pin them.
/// `BPF_F_MMAPABLE`, a map flag: userspace may map the array (`CONTROL`:
/// a flip is one aligned 32-bit store through the mapping, where a map
/// update is a memcpy of unspecified width), and the kernel puts its first
/// value on a page boundary (the flow caches and half-open tables are made
/// so for that: every slot or bucket then starts a cache line).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const CONTROL: &str = "CONTROL";
    pub const POOL_SIZES: &str = "POOL_SIZES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    /// The IPv6 flow table.
    pub const FLOWS6: &str = "FLOWS6";
    /// Half-open TCP flows (IPv4): records until the handshake completes.
    pub const HALF_OPEN: &str = "HALF_OPEN";
    /// Half-open TCP flows (IPv6).
    pub const HALF_OPEN6: &str = "HALF_OPEN6";
    pub const SETTINGS: &str = "SETTINGS";
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Every interface bgswitch serves (XDP or TC), ifindex → how.
    pub const ATTACHED: &str = "ATTACHED";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const PREVIEW: &str = "PREVIEW";
    /// The flow-cache generation (one u64, mmapped by userspace).
    pub const FLOW_GEN: &str = "FLOW_GEN";
    /// Backend address → the service whose VIP its replies get back.
    pub const REPLY_SOURCES: &str = "REPLY_SOURCES";
    /// Bitmaps of VIP and backend addresses (mmapped by userspace).
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    /// The clock program's output (not pinned: private to each load).
    pub const CLOCK: &str = "CLOCK";
    /// Per-CPU flow cache (not pinned: rebuilt empty by each load).
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// Per-CPU flow cache of IPv6 flows (not pinned either).
    pub const FLOW_CACHE6: &str = "FLOW_CACHE6";
    /// Per-CPU next hop of each backend, for stateless services (not pinned:
    /// rebuilt empty by each load).
    pub const BACKEND_HOPS: &str = "BACKEND_HOPS";
    /// Every pinned map, in the order they are pinned.
    pub const ALL: [&str; 20] = [
        SERVICES,
        CONTROL,
        POOL_SIZES,
        BACKENDS,
        FLOWS,
        FLOWS6,
        HALF_OPEN,
        HALF_OPEN6,
        super::tail::XDP_MAP,
        super::tail::TC_MAP,
        SETTINGS,
        TX_PORTS,
        ATTACHED,
        SERVICE_STATS,
        BACKEND_STATS,
        GLOBAL_STATS,
        PREVIEW,
        FLOW_GEN,
        REPLY_SOURCES,
        ADDR_FILTER,
    ];
}

/// Most preview prefixes over all services.
pub const MAX_PREVIEW_PREFIXES: u32 = 4096;

/// Data of a `PREVIEW` LPM-trie key: the service id (all 32 bits always
/// match) followed by the source address in wire order. The trie's prefix
/// length is `32 + CIDR length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreviewKey {
    pub service: u32,
    pub addr: Addr,
}

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "bgswitch";
/// Name of the TC (clsact ingress) program in the object: the same path.
pub const TC_PROGRAM_NAME: &str = "bgswitch_tc";

/// The programs the entry points hand a frame to with a tail call (their
/// own 512-byte stack, where a BPF-to-BPF call would add a frame to the
/// entry point's and cost the IPv4 path a call): their index in the
/// `TAIL_XDP` and `TAIL_TC` program arrays, and their names.
pub mod tail {
    /// IPv6 frames.
    pub const IPV6: u32 = 0;
    /// ICMP messages of either family.
    pub const ICMP: u32 = 1;
    /// A rewritten packet too long for its next hop.
    pub const TOO_BIG: u32 = 2;
    /// A rare event's log message ([`crate::Event`]), written once the
    /// path has decided the frame's verdict.
    pub const LOG: u32 = 3;
    /// Entries of each program array.
    pub const COUNT: u32 = 4;
    /// The XDP programs, by index.
    pub const XDP: [&str; 4] = [
        "bgswitch_ipv6",
        "bgswitch_icmp",
        "bgswitch_too_big",
        "bgswitch_log",
    ];
    /// The TC programs, by index.
    pub const TC: [&str; 4] = [
        "bgswitch_tc_ipv6",
        "bgswitch_tc_icmp",
        "bgswitch_tc_too_big",
        "bgswitch_tc_log",
    ];
    /// The program arrays' names. Pinned with the other maps: the kernel
    /// empties a program array when its last user reference goes, and the
    /// programs must keep tail-calling while no daemon runs.
    pub const XDP_MAP: &str = "TAIL_XDP";
    pub const TC_MAP: &str = "TAIL_TC";
}

/// How bgswitch serves an interface (the values of the `ATTACHED` map).
pub mod attach {
    /// XDP, native or generic: the XDP program redirects to it.
    pub const XDP: u32 = 1;
    /// TC (clsact ingress).
    pub const TC: u32 = 2;
}

/// An IP address of either family: IPv4 uses `words[0]` (wire order) and
/// leaves the rest zero; IPv6 uses all four words.
pub type Addr = [u32; 4];

/// Key of the `SERVICES` hash map: a virtual address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Virtual IP (see [`Addr`]).
    pub addr: Addr,
    /// Virtual port, wire order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
}

/// Value of the `SERVICES` hash map: the service's index into the per-service
/// arrays (`CONTROL`, `POOL_SIZES`, `BACKENDS`, `SERVICE_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub id: u32,
}

/// The per-service control word, one `u32` in the `CONTROL` array.
///
/// Everything a packet needs to choose a colour and a pool is in this one word,
/// so a flip, a pool change or a canary change is a single aligned 32-bit store
/// that a packet sees either entirely or not at all. Pools are written to a free
/// slot first; only then does the word point at it.
///
/// | bits  | meaning |
/// |-------|---------|
/// | 0     | active colour (`BLUE`/`GREEN`) |
/// | 1-3   | pool slot of blue |
/// | 4-6   | pool slot of green |
/// | 7-20  | canary share: new flows to the idle colour, in basis points (0..=10000) |
/// | 21    | preview prefixes present (consult the preview trie) |
/// | 22    | stateless: TCP packets take the active pool's hash choice, no flow table |
/// | 23    | an orphan pool is set (bits 24-27): the pool of the last stateless period |
/// | 24    | the orphan pool's colour |
/// | 25-27 | the orphan pool's slot |
/// | 31    | service enabled |
///
/// # Stateless services
/// A TCP service configured `stateless = true` spends its stable periods
/// (no canary, no preview, no change for a TCP idle timeout) with bit 22
/// set: every packet's backend is the flow hash over the active pool, and
/// nothing is recorded. A change (flip, pool change, canary, preview) clears
/// the bit and sets the orphan pool to the stable period's pool, in one
/// store: from then on SYNs are recorded as in any service, and a non-SYN
/// packet without a record — a connection of the stable period, which has
/// none — takes the orphan pool's hash choice, the backend it had, and is
/// recorded then. The daemon ends the transition (bit 22 set again, orphan
/// cleared) once no connection of the stable period can be left (a TCP idle
/// timeout after the change) and no live record disagrees with the new hash
/// choice.
pub mod control {
    pub const ACTIVE_MASK: u32 = 1;
    pub const BLUE_SLOT_SHIFT: u32 = 1;
    pub const GREEN_SLOT_SHIFT: u32 = 4;
    pub const SLOT_MASK: u32 = 0b111;
    pub const CANARY_SHIFT: u32 = 7;
    pub const CANARY_MASK: u32 = 0x3fff;
    pub const PREVIEW: u32 = 1 << 21;
    pub const STATELESS: u32 = 1 << 22;
    pub const ORPHAN: u32 = 1 << 23;
    pub const ORPHAN_COLOUR_SHIFT: u32 = 24;
    pub const ORPHAN_SLOT_SHIFT: u32 = 25;
    /// Every bit of the orphan pool (set, colour, slot).
    pub const ORPHAN_BITS: u32 =
        ORPHAN | (1 << ORPHAN_COLOUR_SHIFT) | (SLOT_MASK << ORPHAN_SLOT_SHIFT);
    pub const ENABLED: u32 = 1 << 31;
    /// Basis points in 100 %.
    pub const CANARY_FULL: u32 = 10_000;

    /// Builds a control word.
    #[inline(always)]
    pub const fn encode(active: u32, blue_slot: u32, green_slot: u32, canary_bp: u32) -> u32 {
        ENABLED
            | (active & ACTIVE_MASK)
            | ((blue_slot & SLOT_MASK) << BLUE_SLOT_SHIFT)
            | ((green_slot & SLOT_MASK) << GREEN_SLOT_SHIFT)
            | ((canary_bp & CANARY_MASK) << CANARY_SHIFT)
    }
    #[inline(always)]
    pub const fn enabled(word: u32) -> bool {
        word & ENABLED != 0
    }
    #[inline(always)]
    pub const fn active(word: u32) -> u32 {
        word & ACTIVE_MASK
    }
    /// Pool slot of `colour` (0 blue, 1 green).
    #[inline(always)]
    pub const fn slot(word: u32, colour: u32) -> u32 {
        let shift = if colour == 0 {
            BLUE_SLOT_SHIFT
        } else {
            GREEN_SLOT_SHIFT
        };
        (word >> shift) & SLOT_MASK
    }
    #[inline(always)]
    pub const fn canary(word: u32) -> u32 {
        (word >> CANARY_SHIFT) & CANARY_MASK
    }
    /// Whether the service is in a stable period of a stateless service.
    #[inline(always)]
    pub const fn stateless(word: u32) -> bool {
        word & STATELESS != 0
    }
    /// The orphan pool, if set: (colour, slot).
    #[inline(always)]
    pub const fn orphan(word: u32) -> Option<(u32, u32)> {
        if word & ORPHAN == 0 {
            return None;
        }
        Some((
            (word >> ORPHAN_COLOUR_SHIFT) & 1,
            (word >> ORPHAN_SLOT_SHIFT) & SLOT_MASK,
        ))
    }
    /// `word` with this orphan pool (and without the stateless bit).
    #[inline(always)]
    pub const fn with_orphan(word: u32, colour: u32, slot: u32) -> u32 {
        (word & !(ORPHAN_BITS | STATELESS))
            | ORPHAN
            | ((colour & 1) << ORPHAN_COLOUR_SHIFT)
            | ((slot & SLOT_MASK) << ORPHAN_SLOT_SHIFT)
    }
}

/// One backend in a pool slot of the `BACKENDS` array, at index
/// `(service * POOL_SLOTS + slot) * MAX_BACKENDS + i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Wire order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    /// Index into `BACKEND_STATS`.
    pub stat_id: u32,
}

/// A flow's 5-tuple in either family, as received: the input of the flow
/// hash ([`hash::flow_hash`]), and the key of the `FLOWS6` LRU table (IPv6
/// flows, `family` 6, keyed client → VIP as `FLOWS` is).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Wire order.
    pub sport: u16,
    /// Wire order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Key of the `FLOWS` LRU table, which holds IPv4 flows (IPv6 flows get a
/// table of their own, so neither pays for the other's address size): the
/// client's packet as received (client → VIP). Also the key of a
/// `FLOW_CACHE` slot, for either direction's packets as received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    /// Wire order.
    pub src: u32,
    /// Wire order.
    pub dst: u32,
    /// Wire order.
    pub sport: u16,
    /// Wire order.
    pub dport: u16,
    pub proto: u8,
    // Padding as a byte and a half-word: a 3-byte array would be zeroed by a
    // memset call in the BPF program.
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey {
    /// An IPv4 `FLOWS` key as a 5-tuple of either family (`family` 4).
    #[inline(always)]
    pub const fn from4(k: &FlowKey4) -> FlowKey {
        FlowKey {
            src: [k.src, 0, 0, 0],
            dst: [k.dst, 0, 0, 0],
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }
}

impl FlowKey4 {
    /// The `FLOWS` key of an IPv4 5-tuple (the first word of each address).
    #[inline(always)]
    pub const fn of(k: &FlowKey) -> FlowKey4 {
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
}

/// Flag bits of [`FlowEntry::flags`].
pub mod flow_flags {
    /// A `FLOW_CACHE` slot of the reply direction (flow entries never have it).
    pub const REVERSE: u8 = 1 << 0;
    /// The client sent FIN.
    pub const FIN_CLIENT: u8 = 1 << 1;
    /// The backend sent FIN.
    pub const FIN_BACKEND: u8 = 1 << 2;
    /// Either side sent RST.
    pub const RST: u8 = 1 << 3;
    /// The backend answered the SYN (a SYN-ACK went back).
    pub const ESTABLISHED: u8 = 1 << 4;
    /// The flow was sent to the idle colour because its source is in a
    /// preview prefix.
    pub const PREVIEW: u8 = 1 << 5;
    /// The backend sent something other than RST (a half-open record's
    /// client may complete it: see `HALF_OPEN`).
    pub const ANSWERED: u8 = 1 << 6;
}

/// Value of the `FLOWS` table (IPv4): one entry per flow, keyed by the
/// client's packet as received (client → VIP). A backend's reply finds it
/// through `REPLY_SOURCES` (backend → VIP and port) and is taken as the
/// flow's only if the entry's `peer` is that backend.
///
/// Each entry also keeps the next hop of each direction (`nh_*` towards the
/// backend, `rnh_*` towards the client): what `bpf_fib_lookup` answered, so
/// established packets skip the lookup. An answer is used while its
/// generation is current (`FLOW_GEN`, which the daemon bumps on every route,
/// neighbour, address, rule or link change it hears of over netlink, and
/// when it changes the interfaces), for packets no longer than the one it was
/// looked up for, and until it is older than [`Settings::refresh`] (the
/// safety net when no daemon runs).
///
/// Times are kernel ticks (`jiffies`, which the verifier inlines: ~2 ns
/// against ~16 ns for the coarse clock helper); userspace converts with the
/// tick rate it measures at load.
///
/// 80 bytes: with the 16-byte key, the kernel's 48-byte element header and
/// a 16-byte bucket, a flow takes 160 bytes of kernel memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The backend's IPv4 address, wire order.
    pub peer: u32,
    /// Wire order.
    pub peer_port: u16,
    /// `BLUE` or `GREEN`.
    pub colour: u8,
    /// [`flow_flags`].
    pub flags: u8,
    /// Service id.
    pub service: u32,
    /// Low 32 bits of `jiffies` when the flow was recorded (ages are taken
    /// with wrapping arithmetic).
    pub created: u32,
    /// `jiffies` of the last packet either way, refreshed once it is more
    /// than [`Settings::refresh`] ticks old.
    pub last_seen: u64,
    /// Egress ifindex of the cached next hop towards the backend (the ingress
    /// one means XDP_TX); 0: none cached.
    pub nh_ifindex: u32,
    /// Destination MAC of the next hop (offset 28: 4-byte aligned, which the
    /// program's MAC stores rely on).
    pub nh_dmac: [u8; 6],
    /// Source MAC (the egress interface's; offset 34, 2 mod 4).
    pub nh_smac: [u8; 6],
    /// IPv4 total length of the packet the next hop was looked up for: longer
    /// packets look it up again (the MTU check).
    pub nh_len: u16,
    /// Index into `BACKEND_STATS`.
    pub backend_stat: u16,
    /// Low 32 bits of `FLOW_GEN` when the next hop was looked up.
    pub nh_gen: u32,
    /// The cached next hop of replies (towards the client), as above.
    pub rnh_ifindex: u32,
    /// Offset 52 (4-byte aligned).
    pub rnh_dmac: [u8; 6],
    /// Offset 58 (2 mod 4).
    pub rnh_smac: [u8; 6],
    pub rnh_len: u16,
    /// In a half-open record (`HALF_OPEN`, `HALF_OPEN6`): the low 16 bits
    /// of the backend's initial sequence number plus one, once its SYN-ACK
    /// passed ([`flow_flags::ESTABLISHED`]); the client's ACK that completes
    /// the handshake acknowledges it. Not read in `FLOWS`.
    pub isn: u16,
    pub rnh_gen: u32,
    /// Low 32 bits of `jiffies` when the reply next hop was looked up.
    pub rnh_at: u32,
    /// Low 32 bits of `jiffies` when the next hop towards the backend was
    /// looked up.
    pub nh_at: u32,
}

/// Value of the `FLOWS6` table (IPv6): the backend's whole address, then
/// the same record as an IPv4 flow's ([`FlowEntry`], whose `peer` holds the
/// address's first word and is not used on its own). 96 bytes: with the
/// 40-byte key ([`FlowKey`]), the element header and a bucket, a flow takes 200 bytes of
/// kernel memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry6 {
    /// The backend's IPv6 address (see [`Addr`]).
    pub peer6: Addr,
    /// Everything else, laid out as for IPv4 (at offset 16: the MAC fields
    /// keep their alignment).
    pub e: FlowEntry,
}

/// A bucket of a half-open table (`HALF_OPEN`: IPv4, `HALF_OPEN6`: IPv6):
/// room for two TCP flows between their SYN and the client's ACK that
/// completes the handshake. The tables are arrays with one bucket per hash
/// of the 5-tuple ([`half_open_bucket4`], [`half_open_bucket6`]), not LRU
/// hash tables: a SYN reads its bucket's
/// seals and keys (one cache line) and writes one way (the one holding its
/// 5-tuple already, else an empty one, else the one written first), with no free list,
/// no eviction and no bucket lock. A record is lost only to two later SYNs
/// of the same bucket before its handshake completes (a flood, or
/// collisions at very high connection rates); its flow then takes the path
/// of a missing record (`bgswitch-ebpf/src/handshake.rs`).
///
/// A way is written in place, so a reader on another CPU could see half of
/// one record and half of the next; its seal ([`HalfOpen4::seal_of`]: the
/// key and the fields a record never changes, mixed) tells a whole record
/// from a torn one, and 0 marks an empty way. The fields a record's packets
/// change in place (times, flags, next hops) are single aligned integers,
/// as in an LRU table's element.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HalfOpen<K, E, T> {
    pub seal: [u32; 2],
    /// The way written last (the other is the older, which a third SYN
    /// takes).
    pub last: u32,
    pub _pad: u32,
    pub key: [K; 2],
    pub entry: [E; 2],
    /// Up to a multiple of 64 bytes: the tables are memory-mapped arrays,
    /// whose values start page-aligned, so a bucket's seals and keys share
    /// one cache line and no bucket shares one with another.
    pub _tail: T,
}

/// An IPv4 half-open bucket: 208 bytes, 256 with its tail (seals and keys
/// in the first 48).
pub type HalfOpen4 = HalfOpen<FlowKey4, FlowEntry, [u64; 6]>;
/// An IPv6 half-open bucket: 288 bytes, 320 with its tail (seals and keys
/// in the first 96).
pub type HalfOpen6 = HalfOpen<FlowKey, FlowEntry6, [u64; 4]>;

const _: () = assert!(core::mem::size_of::<HalfOpen4>() == 256);
const _: () = assert!(core::mem::size_of::<HalfOpen6>() == 320);

/// The half-open bucket of an IPv4 5-tuple (client → VIP) at `shift`
/// ([`Settings::half_shift`]): the top bits of its flow hash, a full mix,
/// so 5-tuples that differ anywhere spread over the buckets (the flow
/// cache's cheaper index keeps structure: clients of one /16 share 2^16
/// values of it).
#[inline(always)]
pub const fn half_open_bucket4(k: &FlowKey4, shift: u32) -> u32 {
    hash::flow_hash4(
        k.src,
        k.dst,
        k.sport,
        k.dport,
        k.proto,
        hash::HALF_OPEN_SEED,
    ) >> (shift & 31)
}

/// The half-open bucket of an IPv6 5-tuple, as [`half_open_bucket4`]
/// with [`hash::index_hash6`].
#[inline(always)]
pub const fn half_open_bucket6(k: &FlowKey, shift: u32) -> u32 {
    hash::index_hash6(k, hash::HALF_OPEN_SEED) >> (shift & 31)
}

/// One step of a half-open record's seal.
#[inline(always)]
const fn seal_mix(h: u32, w: u32) -> u32 {
    (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(15)
}

/// The seal's last step: never 0 (an empty way's).
#[inline(always)]
const fn seal_end(h: u32, e: &FlowEntry) -> u32 {
    let h = seal_mix(h, (e.peer_port as u32) << 16 | (e.colour as u32) << 8);
    seal_mix(h, e.service) | 1
}

impl HalfOpen4 {
    /// The seal of a way holding `key` and `entry`.
    #[inline(always)]
    pub const fn seal_of(key: &FlowKey4, entry: &FlowEntry) -> u32 {
        let h = seal_mix(0, key.src);
        let h = seal_mix(h, key.dst);
        let h = seal_mix(h, (key.sport as u32) << 16 | key.dport as u32);
        let h = seal_mix(h, key.proto as u32);
        seal_end(seal_mix(h, entry.peer), entry)
    }

    /// Whether way `w` holds a whole record.
    #[inline(always)]
    pub const fn holds(&self, w: usize) -> bool {
        self.seal[w] != 0 && self.seal[w] == Self::seal_of(&self.key[w], &self.entry[w])
    }
}

impl HalfOpen6 {
    /// The seal of a way holding `key` and `entry`.
    #[inline(always)]
    pub const fn seal_of(key: &FlowKey, entry: &FlowEntry6) -> u32 {
        let mut h = 0;
        let mut i = 0;
        while i < 4 {
            h = seal_mix(h, key.src[i]);
            h = seal_mix(h, key.dst[i]);
            h = seal_mix(h, entry.peer6[i]);
            i += 1;
        }
        let h = seal_mix(h, (key.sport as u32) << 16 | key.dport as u32);
        let h = seal_mix(h, (key.proto as u32) << 8 | key.family as u32);
        seal_end(h, &entry.e)
    }

    /// Whether way `w` holds a whole record.
    #[inline(always)]
    pub const fn holds(&self, w: usize) -> bool {
        self.seal[w] != 0 && self.seal[w] == Self::seal_of(&self.key[w], &self.entry[w])
    }
}

/// Value of `REPLY_SOURCES`, keyed by a backend as a [`ServiceKey`]
/// (address, port, protocol, family): the VIP and port its replies get back
/// as their source, and the service. A backend address:port belongs to one
/// service (the config refuses anything else).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplySource {
    pub vip: Addr,
    /// Wire order.
    pub vport: u16,
    pub _pad: u16,
    pub service: u32,
}

/// One slot of the per-CPU `FLOW_CACHE`: a copy of a flow entry's decision
/// for one direction, keyed by the packet's 5-tuple, so the established
/// packets of a flow skip the `FLOWS` hash lookup (an inlined array read
/// instead of a helper call, a hash and a bucket walk).
///
/// A slot is used only while all of these hold, else the packet takes the
/// `FLOWS` path, which refills the slot:
/// - `key` is the packet's 5-tuple and `gen` the low 32 bits of the
///   `FLOW_GEN` counter (bumped by userspace after it deletes entries, and
///   on route, neighbour and interface changes);
/// - the entry's `last_seen` is at most [`Settings::refresh`] ticks old, i.e.
///   the `FLOWS` path would neither refresh it nor look the next hop up
///   again;
/// - the packet carries no SYN, FIN or RST (those update the entry), has
///   TTL > 1 and is no longer than `nh_len`.
///
/// So a packet takes the same decision with or without the cache. One
/// exception, by design: when a closed connection's 5-tuple is reused, a
/// slot on *another* CPU may still hold the old decision for up to
/// [`Settings::refresh`] ticks; it would matter only if one 5-tuple's packets
/// arrived on two CPUs (RSS keeps a 5-tuple on one receive queue). Entries
/// replaced after idling are never in a valid slot (older than the step).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: FlowKey4,
    pub gen: u32,
    /// Low 32 bits of the entry's `last_seen`.
    pub last_seen: u32,
    pub peer: u32,
    pub peer_port: u16,
    pub colour: u8,
    /// [`flow_flags::REVERSE`] or 0.
    pub flags: u8,
    pub service: u32,
    pub nh_ifindex: u32,
    /// Offset 40 (4-byte aligned), like [`FlowEntry::nh_dmac`].
    pub nh_dmac: [u8; 6],
    /// Offset 46 (2 mod 4).
    pub nh_smac: [u8; 6],
    pub nh_len: u16,
    pub backend_stat: u16,
    /// The IPv4 checksum change of this direction's rewrite and TTL
    /// decrement, folded ([`csum::Delta::folded`]): the same for every
    /// packet of the flow.
    pub ip_delta: u16,
    /// The TCP/UDP checksum change (address through the pseudo-header, and
    /// port), folded.
    pub l4_delta: u16,
    pub _pad: u32,
}

/// One slot of the per-CPU `FLOW_CACHE6`: as [`CachedFlow`], for an IPv6
/// flow (the whole 5-tuple as key, the peer's whole address), under the
/// same rules. One checksum delta (the IPv6 header has none): the TCP/UDP
/// checksum's, for the address through the pseudo-header and the port.
/// 96 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow6 {
    pub key: FlowKey,
    /// The backend (forward) or the VIP (reply).
    pub peer: Addr,
    pub gen: u32,
    /// Low 32 bits of the entry's `last_seen`.
    pub last_seen: u32,
    pub service: u32,
    pub nh_ifindex: u32,
    /// Offset 72 (4-byte aligned), like [`FlowEntry::nh_dmac`].
    pub nh_dmac: [u8; 6],
    /// Offset 78 (2 mod 4).
    pub nh_smac: [u8; 6],
    pub nh_len: u16,
    pub backend_stat: u16,
    pub peer_port: u16,
    pub colour: u8,
    /// [`flow_flags::REVERSE`] or 0.
    pub flags: u8,
    /// The TCP/UDP checksum change of this direction's rewrite (the four
    /// address words through the pseudo-header, and the port), folded; the
    /// hop limit is in no checksum.
    pub l4_delta: u16,
    pub _pad: u16,
}

/// `FLOW_CACHE6` has a quarter of `FLOW_CACHE`'s slots (each is half as
/// large again): its shift is `cache_shift` plus this.
pub const CACHE6_SHIFT_EXTRA: u32 = 2;

/// The `FLOW_CACHE6` slot of an IPv6 5-tuple (as [`cache_slot`]).
#[inline(always)]
pub const fn cache6_slot(
    src: &Addr,
    dst: &Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    shift: u32,
) -> u32 {
    let x = src[0]
        ^ src[1]
        ^ src[2]
        ^ src[3]
        ^ (dst[0] ^ dst[1] ^ dst[2] ^ dst[3]).rotate_left(16)
        ^ ((sport as u32) << 16 | dport as u32)
        ^ proto as u32;
    x.wrapping_mul(0x9e37_79b1) >> (shift & 31)
}

/// Words of each bitmap in `ADDR_FILTER`: words `0..ADDR_FILTER_WORDS`
/// hold the VIP addresses, the next `ADDR_FILTER_WORDS` the backend
/// addresses (65 536 bits each, indexed by [`addr_bit`]); after them come
/// [`STATELESS_SLOTS`] words of stateless services in their stable period
/// (see [`stateless_entry`]), then [`STATELESS_SLOTS`] words of the IPv4
/// services' index (see [`service_entry`]); [`ADDR_FILTER_LEN`] words in
/// all. A clear bit means
/// "certainly not one": the program skips the flow-table and `SERVICES`
/// lookups for a destination that is no VIP, and the `REPLY_SOURCES` lookup
/// for a source that is no backend. A bit stays set while the address may
/// have flows (userspace clears bits only when it rebuilds the bitmaps from
/// the services and reply sources there are).
pub const ADDR_FILTER_WORDS: u32 = 1024;

/// The bit of an address in an `ADDR_FILTER` bitmap: (word, mask).
#[inline(always)]
pub const fn addr_bit(addr: &Addr) -> (u32, u64) {
    let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    let h = x.wrapping_mul(0x9e37_79b1) >> 16;
    (h >> 6, 1u64 << (h & 63))
}

/// Slots of the stateless services' part of `ADDR_FILTER`, a direct-mapped
/// table by IPv4 VIP and port ([`stateless_slot`]): the stateless path finds
/// its service with one 64-bit load instead of a `SERVICES` hash lookup. Two
/// services on one slot: the first keeps it, the other takes the slower way
/// (its packets find the stateless word through `SERVICES`).
pub const STATELESS_SLOTS: u32 = 4096;
/// The valid bit of a stateless entry.
pub const STATELESS_VALID: u64 = 1 << 63;
/// The service id's bits of a stateless entry (bits 48..56).
pub const STATELESS_ID_MASK: u64 = 0xff << 48;
const _: () = assert!(MAX_SERVICES <= 256);

/// The slot of an IPv4 VIP (wire order) and port (wire order) in the
/// stateless part of `ADDR_FILTER` (relative to the part).
#[inline(always)]
pub const fn stateless_slot(addr: u32, port: u16) -> u32 {
    (addr ^ (port as u32).rotate_left(16)).wrapping_mul(0x9e37_79b1) >> 20
}

/// A stateless entry: valid bit, service id, port and address, stored with
/// one 64-bit store (the program compares all but the id in one go).
#[inline(always)]
pub const fn stateless_entry(addr: u32, port: u16, id: u32) -> u64 {
    STATELESS_VALID | ((id as u64 & 0xff) << 48) | ((port as u64) << 32) | addr as u64
}

const _: () = assert!(STATELESS_SLOTS == 1 << (32 - 20));

/// The words of `ADDR_FILTER`: the two bitmaps, the stateless slots, the
/// services' index.
pub const ADDR_FILTER_LEN: u32 = 2 * ADDR_FILTER_WORDS + 2 * STATELESS_SLOTS;
/// Where the IPv4 services' index starts in `ADDR_FILTER`: a direct-mapped
/// table by VIP and port ([`stateless_slot`]) of every IPv4 service, so a
/// new flow finds its service with one 64-bit load instead of a `SERVICES`
/// hash lookup. A slot two services share holds [`SERVICE_SHARED`]: their
/// packets look in `SERVICES`.
pub const SERVICE_INDEX: u32 = 2 * ADDR_FILTER_WORDS + STATELESS_SLOTS;
/// A UDP service's entry in the index (TCP: clear).
pub const SERVICE_UDP: u64 = 1 << 62;
/// A slot of the index that two services or more share.
pub const SERVICE_SHARED: u64 = STATELESS_VALID | 1 << 61;

/// An IPv4 service's entry in the index: valid bit, protocol bit, service
/// id, port and address, stored with one 64-bit store (the program
/// compares all but the id in one go).
#[inline(always)]
pub const fn service_entry(addr: u32, port: u16, proto: u8, id: u32) -> u64 {
    let udp = if proto == PROTO_UDP { SERVICE_UDP } else { 0 };
    stateless_entry(addr, port, id) | udp
}

/// The next hop towards one backend, kept per CPU for stateless services
/// (`BACKEND_HOPS`, indexed like `BACKEND_STATS`): the same fields and
/// validity rules as a flow entry's next hop ([`FlowEntry::nh_ifindex`] …),
/// and the rewrite's checksum deltas, which are the same for every packet
/// from `vip:vport` to `peer:peer_port` (a [`CachedFlow`]'s, per backend).
/// Valid for every client only because the route to a backend does not
/// depend on the client: the daemon keeps services stateful while the host
/// has a routing rule that selects on more than the destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHop {
    pub ifindex: u32,
    /// Offset 4 (4-byte aligned).
    pub dmac: [u8; 6],
    /// Offset 10 (2 mod 4).
    pub smac: [u8; 6],
    pub len: u16,
    /// As [`CachedFlow::ip_delta`].
    pub ip_delta: u16,
    pub gen: u32,
    pub at: u32,
    /// What the deltas were computed for (wire order).
    pub peer: u32,
    pub vip: u32,
    pub peer_port: u16,
    pub vport: u16,
    /// As [`CachedFlow::l4_delta`].
    pub l4_delta: u16,
    /// The program that looked the next hop up ([`attach::XDP`] or
    /// [`attach::TC`]): only that one uses it. What the TC program may send
    /// to, the XDP program may not (an interface only TC serves): a frame
    /// XDP rewrote for such a hop would reach the stack with the next hop's
    /// MAC and be dropped as another host's.
    pub by: u16,
    pub _pad1: u32,
}

/// Most slots of the per-CPU flow cache (64 bytes each: 4 MiB per possible
/// CPU). The daemon sizes it to a power of two between
/// [`FLOW_CACHE_MIN_SLOTS`] and this from `max_flows` and the CPU count, and
/// tells the program with [`Settings::cache_shift`].
pub const FLOW_CACHE_SLOTS: u32 = 1 << 16;
/// Fewest slots of the per-CPU flow cache.
pub const FLOW_CACHE_MIN_SLOTS: u32 = 1 << 10;

/// The flow-cache slot of a 5-tuple: the key's words folded and multiplied
/// (Fibonacci hashing), the top `32 - shift` bits. Collisions only cost a
/// `FLOWS` lookup.
#[inline(always)]
pub const fn cache_slot(k: &FlowKey4, shift: u32) -> u32 {
    let x =
        k.src ^ k.dst.rotate_left(16) ^ ((k.sport as u32) << 16 | k.dport as u32) ^ k.proto as u32;
    x.wrapping_mul(0x9e37_79b1) >> (shift & 31)
}

/// The single entry of the `SETTINGS` array. Times in kernel ticks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// A UDP forward entry idle longer than this is chosen afresh.
    pub udp_idle: u64,
    /// A TCP SYN whose entry has been idle longer than this is chosen afresh
    /// (a closed entry — FIN both ways or RST — is always chosen afresh).
    pub tcp_idle: u64,
    /// A flow's `last_seen` is rewritten, and its next hop looked up again,
    /// once it is more than this old; per-CPU cache slots are used only
    /// while it is not. Idle timeouts are at least one tick longer.
    pub refresh: u64,
    /// `32 - log2(slots of FLOW_CACHE)`; 0: no cache (settings not written).
    pub cache_shift: u32,
    /// Non-zero while some service may be in a stable period (set before
    /// its stateless word, cleared after the last one's): without it the
    /// program skips the stateless check (one load) on every TCP packet.
    pub stateless: u8,
    /// Non-zero while the host's IPv4 routing rules select by destination
    /// alone: a table service's new IPv4 flow may then take its backend's
    /// kept next hop (`BACKEND_HOPS`) instead of a `bpf_fib_lookup` of its
    /// own. (Before, `stateless` was a u32 here: a program of that layout
    /// reads this byte as part of it, which only costs it a lookup.)
    pub backend_hops: u8,
    /// `32 - log2(buckets of each half-open table)` ([`HalfOpen`]); 0: no
    /// half-open table (settings not written), so no TCP flow is recorded
    /// before its handshake completes.
    pub half_shift: u8,
    pub _pad: u8,
}

/// What the daemon sets [`Settings::refresh`] to.
pub const REFRESH_MS: u64 = 100;

/// The data plane logs each kind of rare event (a `global` counter: no
/// route, an egress interface bgswitch is not attached to, a flow it could
/// not record, an empty pool) at most once per this many refreshes (one
/// second) on each CPU.
pub const LOG_INTERVAL_REFRESHES: u64 = 10;

/// A rare event the data plane logs (`bgswitch-ebpf/src/events.rs`): the
/// path notes it in this CPU's slot and goes on; once the frame's verdict
/// is known, the log program (`tail::LOG`) writes the message through
/// aya-log and returns the verdict. The message's formatting is verified
/// once, in that program, not on every path that can reach an event (it
/// was nine tenths of the packet programs' verification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The event's `global` counter index, plus one (0: no event noted).
    pub kind: u32,
    /// The frame's verdict, for the log program to return.
    pub action: u32,
    /// The address the message names (IPv4: the first word, wire order).
    pub addr: Addr,
    /// The message's number (an error code, an ifindex, a service).
    pub arg: u32,
    /// The second one (a colour, a service).
    pub arg2: u16,
    /// 1: `addr` is an IPv6 address.
    pub v6: u16,
    /// When it was noted (kernel ticks, low 32 bits): a note left by a
    /// packet whose verdict was not flushed (rare: a too-big packet
    /// answered with an ICMP error) is replaced from the next tick on,
    /// never blocking the slot.
    pub at: u32,
    pub _pad: u32,
}

/// The clock program (a socket filter run through BPF_PROG_TEST_RUN by the
/// daemon): writes `jiffies` and `bpf_ktime_get_ns()` into [`maps::CLOCK`],
/// read side by side, so userspace can measure the tick rate and read the
/// data plane's clock.
pub const CLOCK_PROGRAM_NAME: &str = "bgswitch_clock";

/// Counters of one colour of one service. In `SERVICE_STATS` (per CPU,
/// index `service * 2 + colour`) the program writes only `backend_rsts` and
/// `syn_acks`; the traffic fields are the sums of the colour's
/// `BACKEND_STATS` (the daemon's `colour_stats` adds them up).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColourStats {
    /// Client → backend packets and bytes (as received, L2 included).
    pub packets: u64,
    pub bytes: u64,
    /// Flows whose colour was chosen on this packet.
    pub new_flows: u64,
    /// Backend → client packets and bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// RSTs sent by backends of this colour.
    pub backend_rsts: u64,
    /// SYN-ACKs sent by backends of this colour.
    pub syn_acks: u64,
    pub _reserved: u64,
}

/// Per-CPU counters of one backend (`BACKEND_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub _reserved: u64,
}

/// Indexes of the per-CPU `GLOBAL_STATS` array.
pub mod global {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, …): passed untouched.
    pub const PASS_NOT_IP: u32 = 0;
    /// IP but not TCP/UDP to a VIP nor a reply of a known flow (IPv6: also
    /// an extension header bgswitch does not walk): passed untouched.
    pub const PASS_NOT_SERVICE: u32 = 1;
    /// Truncated or inconsistent headers: passed untouched.
    pub const MALFORMED: u32 = 2;
    /// Fragments (IPv4: MF set or a non-zero offset; IPv6: a fragment
    /// header): passed untouched.
    pub const FRAGMENT: u32 = 3;
    /// VIP packets with TTL (hop limit) <= 1: passed untouched so the stack
    /// answers ICMP.
    pub const TTL_EXCEEDED: u32 = 4;
    /// VIP packets of a service whose pool is empty: passed untouched.
    pub const NO_BACKEND: u32 = 5;
    /// Rewritten packets sent with XDP_TX (egress = ingress).
    pub const TX: u32 = 6;
    /// Rewritten packets redirected to another interface.
    pub const REDIRECT: u32 = 7;
    /// `bpf_fib_lookup` had no neighbour entry: rewritten packet passed to the stack.
    pub const FIB_NO_NEIGH: u32 = 8;
    /// `bpf_fib_lookup` failed otherwise (no route, forwarding disabled, MTU):
    /// rewritten packet passed to the stack.
    pub const FIB_OTHER: u32 = 9;
    /// Egress interface is not one bgswitch attached to: rewritten packet passed
    /// to the stack.
    pub const EGRESS_UNKNOWN: u32 = 10;
    /// A flow entry could not be written (both directions are counted).
    pub const FLOW_INSERT_FAILED: u32 = 11;
    /// Rewritten reply packets (backend → client).
    pub const REPLIES: u32 = 12;
    /// Forward packets of flows found in the table.
    pub const FLOW_HITS: u32 = 13;
    /// `bpf_fib_lookup` calls: a flow's first packet in each direction, then
    /// about one per refresh (100 ms) of its traffic each way, after route,
    /// neighbour or link changes, and for packets longer than the one its
    /// next hop was looked up for. Far fewer than packets when the next-hop
    /// cache in the flow entries works.
    pub const FIB_LOOKUPS: u32 = 14;
    /// Per-CPU flow-cache slots written (by packets that took the `FLOWS`
    /// path); the other rewritten packets were served from the cache.
    pub const FLOW_CACHE_FILLS: u32 = 15;
    /// Forward packets of stateless services in their stable period, sent
    /// by the hash choice without the flow table.
    pub const STATELESS: u32 = 16;
    /// Packets of connections from a stateless period, seen first in a
    /// transition and recorded to the orphan pool's backend.
    pub const ORPHANS: u32 = 17;
    /// ICMP errors (destination unreachable, fragmentation needed or packet
    /// too big, time exceeded, parameter problem) about a switched flow,
    /// translated and forwarded: to the client about the VIP, or to the
    /// backend about itself.
    pub const ICMP_TRANSLATED: u32 = 18;
    /// Rewritten packets longer than the next hop's MTU (IPv4 with DF set,
    /// or IPv6), answered by the program with a "fragmentation needed" /
    /// "packet too big" error to their sender, about the packet it sent.
    pub const ICMP_TOO_BIG_SENT: u32 = 19;
    /// TCP flows recorded half-open (`HALF_OPEN`, `HALF_OPEN6`): a SYN
    /// without a record, or a packet of a connection whose record is
    /// missing. A SYN flood shows here, not in the flow tables.
    pub const HALF_OPEN: u32 = 20;
    /// Half-open records moved to the flow table: the client completed the
    /// handshake (its ACK acknowledged the backend's SYN-ACK), or, for a
    /// connection whose record was missing, the backend answered and the
    /// client sent again.
    pub const PROMOTED: u32 = 21;
    /// Packets (not SYN) of a table service's TCP connection that found no
    /// record in either table outside a transition: the record was evicted
    /// (more open flows than `max_flows`) or the connection is older than
    /// the table. Such a packet goes to the active colour, which breaks the
    /// connection if it was draining on the other one.
    pub const RECORD_MISSING: u32 = 22;
    /// Number of counters.
    pub const COUNT: u32 = 23;
    /// Names, for status and metrics, indexed like the constants.
    pub const NAMES: [&str; 23] = [
        "pass_not_ip",
        "pass_not_service",
        "malformed",
        "fragment",
        "ttl_exceeded",
        "no_backend",
        "xdp_tx",
        "redirect",
        "fib_no_neigh",
        "fib_other",
        "egress_unknown",
        "flow_insert_failed",
        "replies",
        "flow_hits",
        "fib_lookups",
        "flow_cache_fills",
        "stateless",
        "orphans",
        "icmp_translated",
        "icmp_too_big_sent",
        "half_open",
        "promoted",
        "record_missing",
    ];
}

/// Converts an IPv4 address given as its four octets into an [`Addr`].
#[inline(always)]
pub const fn ipv4_to_addr(octets: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Converts an IPv6 address given as its sixteen octets into an [`Addr`].
#[inline(always)]
pub const fn ipv6_to_addr(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The four octets of an IPv4 [`Addr`].
#[inline(always)]
pub const fn addr_to_ipv4(addr: &Addr) -> [u8; 4] {
    addr[0].to_ne_bytes()
}

/// A host-order port in wire order.
#[inline(always)]
pub const fn port_to_wire(port: u16) -> u16 {
    port.to_be()
}

/// A wire-order port in host order.
#[inline(always)]
pub const fn port_from_wire(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)], made of integers only, with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for FlowEntry6 {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for ColourStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for PreviewKey {}
    unsafe impl aya::Pod for CachedFlow {}
    unsafe impl aya::Pod for CachedFlow6 {}
    unsafe impl aya::Pod for ReplySource {}
    unsafe impl aya::Pod for HalfOpen4 {}
    unsafe impl aya::Pod for HalfOpen6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 4);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowEntry>(), 80);
        assert_eq!(size_of::<FlowEntry6>(), 96);
        assert_eq!(core::mem::offset_of!(FlowEntry6, e) % 8, 0);
        assert_eq!(size_of::<ReplySource>(), 24);
        assert_eq!(size_of::<FlowKey4>(), 16);
        assert_eq!(size_of::<Settings>(), 32);
        assert_eq!(size_of::<ColourStats>(), 64);
        assert_eq!(size_of::<BackendStats>(), 48);
        assert_eq!(size_of::<PreviewKey>(), 20);
        assert_eq!(size_of::<CachedFlow>(), 64);
        assert_eq!(size_of::<CachedFlow6>(), 96);
        assert_eq!(core::mem::offset_of!(CachedFlow6, nh_dmac) % 4, 0);
        assert_eq!(core::mem::offset_of!(CachedFlow6, nh_smac) % 4, 2);
        // The program's MAC stores load each dmac as u32 + u16 and each smac
        // as u16 + u32.
        assert_eq!(core::mem::offset_of!(FlowEntry, nh_dmac) % 4, 0);
        assert_eq!(core::mem::offset_of!(FlowEntry, nh_smac) % 4, 2);
        assert_eq!(core::mem::offset_of!(FlowEntry, rnh_dmac) % 4, 0);
        assert_eq!(core::mem::offset_of!(FlowEntry, rnh_smac) % 4, 2);
        assert_eq!(core::mem::offset_of!(CachedFlow, nh_dmac) % 4, 0);
        assert_eq!(core::mem::offset_of!(CachedFlow, nh_smac) % 4, 2);
    }

    #[test]
    fn control_word_round_trips() {
        for active in [BLUE, GREEN] {
            for b in 0..POOL_SLOTS {
                for g in 0..POOL_SLOTS {
                    for canary in [0, 1, 999, 5000, 10_000] {
                        let w = control::encode(active, b, g, canary);
                        assert!(control::enabled(w));
                        assert_eq!(control::active(w), active);
                        assert_eq!(control::slot(w, BLUE), b);
                        assert_eq!(control::slot(w, GREEN), g);
                        assert_eq!(control::canary(w), canary);
                        assert_eq!(w & control::PREVIEW, 0);
                        assert!(!control::stateless(w));
                        assert_eq!(control::orphan(w), None);
                        for (oc, os) in [(BLUE, 0), (GREEN, POOL_SLOTS - 1), (BLUE, b)] {
                            let o = control::with_orphan(w | control::STATELESS, oc, os);
                            assert_eq!(control::orphan(o), Some((oc, os)));
                            assert!(!control::stateless(o));
                            // Nothing else moved.
                            assert_eq!(o & !control::ORPHAN_BITS, w);
                        }
                    }
                }
            }
        }
        assert!(!control::enabled(0));
        // The fields do not overlap.
        let fields = [
            control::ACTIVE_MASK,
            control::SLOT_MASK << control::BLUE_SLOT_SHIFT,
            control::SLOT_MASK << control::GREEN_SLOT_SHIFT,
            control::CANARY_MASK << control::CANARY_SHIFT,
            control::PREVIEW,
            control::STATELESS,
            control::ORPHAN_BITS,
            control::ENABLED,
        ];
        for (i, a) in fields.iter().enumerate() {
            for b in &fields[i + 1..] {
                assert_eq!(a & b, 0, "{a:#x} and {b:#x} overlap");
            }
        }
        const { assert!(control::CANARY_FULL <= control::CANARY_MASK) };
    }

    #[test]
    fn wire_order_helpers() {
        let a = ipv4_to_addr([198, 18, 0, 1]);
        assert_eq!(addr_to_ipv4(&a), [198, 18, 0, 1]);
        assert_eq!(a[0].to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(port_to_wire(80).to_ne_bytes(), [0, 80]);
        assert_eq!(port_from_wire(port_to_wire(8080)), 8080);
        assert_eq!(global::NAMES.len() as u32, global::RECORD_MISSING + 1);
        assert!(global::NAMES.len() as u32 <= global::COUNT);
    }

    #[test]
    fn a_half_open_seal_is_never_empty_and_follows_the_key_and_the_fixed_fields() {
        let key = FlowKey4 {
            src: 1,
            dst: 2,
            sport: 3,
            dport: 4,
            proto: PROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let entry = FlowEntry {
            peer: 5,
            peer_port: 6,
            colour: 1,
            service: 7,
            ..FlowEntry::default()
        };
        let seal = HalfOpen4::seal_of(&key, &entry);
        assert_ne!(seal, 0);
        assert_ne!(
            HalfOpen4::seal_of(&FlowKey4::default(), &FlowEntry::default()),
            0
        );
        let keys = [
            FlowKey4 { src: 9, ..key },
            FlowKey4 { dst: 9, ..key },
            FlowKey4 { sport: 9, ..key },
            FlowKey4 { dport: 9, ..key },
            FlowKey4 {
                proto: PROTO_UDP,
                ..key
            },
        ];
        for k in keys {
            assert_ne!(HalfOpen4::seal_of(&k, &entry), seal, "{k:?}");
        }
        let entries = [
            FlowEntry { peer: 9, ..entry },
            FlowEntry {
                peer_port: 9,
                ..entry
            },
            FlowEntry { colour: 0, ..entry },
            FlowEntry {
                service: 9,
                ..entry
            },
        ];
        for e in entries {
            assert_ne!(HalfOpen4::seal_of(&key, &e), seal, "{e:?}");
        }
        // What a record's packets change in place does not touch it.
        let moving = FlowEntry {
            flags: flow_flags::ANSWERED,
            last_seen: 99,
            isn: 9,
            nh_ifindex: 9,
            ..entry
        };
        assert_eq!(HalfOpen4::seal_of(&key, &moving), seal);
        let mut bucket = HalfOpen4::default();
        assert!(!bucket.holds(0) && !bucket.holds(1), "an empty bucket");
        bucket.key[1] = key;
        bucket.entry[1] = entry;
        bucket.seal[1] = seal;
        assert!(bucket.holds(1));
        bucket.entry[1].peer = 9; // torn: half of another record
        assert!(!bucket.holds(1));
        let key6 = FlowKey {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 3,
            dport: 4,
            proto: PROTO_TCP,
            family: FAMILY_IPV6,
            _pad: [0; 2],
        };
        let entry6 = FlowEntry6 {
            peer6: [9, 10, 11, 12],
            e: entry,
        };
        let seal6 = HalfOpen6::seal_of(&key6, &entry6);
        assert_ne!(seal6, 0);
        let mut other = key6;
        other.src[3] = 0;
        assert_ne!(HalfOpen6::seal_of(&other, &entry6), seal6);
        let mut peer = entry6;
        peer.peer6[2] = 0;
        assert_ne!(HalfOpen6::seal_of(&key6, &peer), seal6);
    }
}
