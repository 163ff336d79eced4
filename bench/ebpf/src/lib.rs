//! XDP programs of the benchmark suite (one object per `src/bin/*.rs`), built
//! for `bpfel-unknown-none` by `bench/build.rs` through aya-build:
//!
//! * `xdp_pass` — returns XDP_PASS: the baseline program cost is measured
//!   against.
//! * `xdp_gen` — a packet generator for BPF_PROG_TEST_RUN in live-frames mode:
//!   writes a whole Ethernet/IPv4/UDP (or TCP ACK, or TCP SYN) frame for
//!   flow `n % flows` and XDP_TXes it; `xdp_gen6`, in the same object, the same for Ethernet/IPv6/UDP.
//! * `xdp_sink` — counts frames and bytes per CPU and drops them: the receiver.
//!
//! This library holds the layout both sides share.
#![no_std]

/// Configuration of `xdp_gen` (its `GEN_CONFIG` array, entry 0). Addresses and
/// ports are wire-order bytes; counts are native integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenConfig {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Source address of flow 0; flow `f` uses `src_ip + (f >> PORT_BITS)`.
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    /// Destination port, wire order.
    pub dst_port: [u8; 2],
    /// Source port of flow 0 (host order); flow `f` uses
    /// `src_port_base + (f & PORT_MASK)`.
    pub src_port_base: u16,
    /// Number of distinct flows (>= 1).
    pub flows: u32,
    /// 17: UDP (checksum 0); 6: TCP ACKs (checksum 0: nothing on the path
    /// verifies it, and an incremental update costs the same either way).
    pub proto: u8,
    /// Non-zero (UDP only): each frame carries its sequence number (this
    /// CPU's count of frames generated before it) as a native `u32` at
    /// [`SEQ_OFFSET`], the start of the UDP payload, for `xdp_sink_seq`.
    pub tag: u8,
    /// Non-zero (TCP only): every frame is a SYN (acknowledgement number
    /// 0) instead of an ACK — with as many flows as sources, a SYN flood.
    pub syn: u8,
    /// Non-zero (IPv4): each CPU generates flows of its own, the source
    /// address moved by `cpu << 12` (one generator per CPU, as RSS keeps a
    /// flow on one queue).
    pub spread: u8,
    /// `xdp_gen6`'s addresses (UDP only): source of flow 0, whose last
    /// 32-bit word grows by `f >> PORT_BITS` for flow `f`, and destination.
    /// `xdp_gen` ignores them.
    pub src_ip6: [u8; 16],
    pub dst_ip6: [u8; 16],
}

/// Where a tagged frame carries its sequence number.
pub const SEQ_OFFSET: usize = 42;

/// `xdp_sink_seq`'s per-CPU `SEQ` array: what it saw of frames to the two
/// addresses of its `SEQ_CONFIG` (old colour's backend, new colour's).
pub const SEQ_OLD_MAX: u32 = 0;
pub const SEQ_NEW_MIN: u32 = 1;
pub const SEQ_OLD_COUNT: u32 = 2;
pub const SEQ_NEW_COUNT: u32 = 3;

/// Flows per source address: 2^15 source ports each.
pub const PORT_BITS: u32 = 15;
pub const PORT_MASK: u32 = (1 << PORT_BITS) - 1;

/// Indexes of the per-CPU `SINK_STATS` array of `xdp_sink`.
pub const SINK_PACKETS: u32 = 0;
pub const SINK_BYTES: u32 = 1;
/// Frames that are not IPv4 or IPv6 UDP/TCP (not counted as delivered).
pub const SINK_OTHER: u32 = 2;

/// Configuration of `xdp_redirect` (its `REDIRECT_CONFIG` array, entry 0):
/// the MACs it writes and the egress ifindex (a key of its DevMap).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
}

/// The panic handler and the licence every program object of this crate
/// carries (one `src/bin/*.rs` each), for use inside its BPF-only module.
#[macro_export]
macro_rules! program_object {
    () => {
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
