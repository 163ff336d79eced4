//! The receivers. `xdp_sink` counts IPv4 and IPv6 UDP and TCP frames and
//! their bytes (per CPU), counts anything else apart (IPv6 neighbour
//! discovery and the like), and drops everything. `xdp_sink_seq` watches a flip: which
//! sequence-tagged frames reached the old colour's backend and which the
//! new one's.
// The program exists for the BPF target only; a host build (`cargo test
// --workspace`) gets an empty binary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::map,
        macros::xdp,
        maps::{Array, PerCpuArray},
        programs::XdpContext,
    };
    use bgswitch_bench_ebpf::{
        SEQ_NEW_COUNT, SEQ_NEW_MIN, SEQ_OFFSET, SEQ_OLD_COUNT, SEQ_OLD_MAX, SINK_BYTES, SINK_OTHER,
        SINK_PACKETS,
    };

    #[map]
    static SINK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

    #[xdp]
    pub fn xdp_sink(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        let len = (end - data) as u64;
        // IPv4 (ethertype at 12..14) carrying UDP or TCP (protocol at 14 + 9).
        let udp4 = data + 24 <= end
            // SAFETY: bytes 12, 13 and 23 lie within the frame (checked).
            && unsafe {
                *((data + 12) as *const u8) == 0x08
                    && *((data + 13) as *const u8) == 0x00
                    && matches!(*((data + 23) as *const u8), 6 | 17)
            };
        // Or IPv6 (ethertype 0x86dd) whose next header (at 14 + 6) is UDP
        // or TCP: what `xdp_gen6` sends.
        let udp6 = !udp4
            && data + 21 <= end
            // SAFETY: bytes 12, 13 and 20 lie within the frame (checked).
            && unsafe {
                *((data + 12) as *const u8) == 0x86
                    && *((data + 13) as *const u8) == 0xdd
                    && matches!(*((data + 20) as *const u8), 6 | 17)
            };
        if !udp4 && !udp6 {
            if let Some(o) = SINK_STATS.get_ptr_mut(SINK_OTHER) {
                // SAFETY: per-CPU slot.
                unsafe { *o += 1 };
            }
            return xdp_action::XDP_DROP;
        }
        if let Some(p) = SINK_STATS.get_ptr_mut(SINK_PACKETS) {
            // SAFETY: per-CPU slot, only this CPU writes it while we run.
            unsafe { *p += 1 };
        }
        if let Some(b) = SINK_STATS.get_ptr_mut(SINK_BYTES) {
            // SAFETY: as above.
            unsafe { *b += len };
        }
        xdp_action::XDP_DROP
    }

    /// `xdp_sink_seq`'s two addresses (as loaded from the frame): the old
    /// colour's backend, the new colour's.
    #[map]
    static SEQ_CONFIG: Array<[u32; 2]> = Array::with_max_entries(1, 0);
    /// Per CPU: see `bgswitch_bench_ebpf::SEQ_OLD_MAX` and the others.
    #[map]
    static SEQ: PerCpuArray<[u32; 4]> = PerCpuArray::with_max_entries(1, 0);

    /// The flip-follow receiver: for tagged UDP frames (see
    /// `GenConfig::tag`) to the old colour's backend, the highest sequence
    /// number and the count; to the new colour's, the lowest and the count.
    /// Drops everything.
    #[xdp]
    pub fn xdp_sink_seq(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + SEQ_OFFSET + 4 > end {
            return xdp_action::XDP_DROP;
        }
        let (Some(cfg), Some(seq)) = (SEQ_CONFIG.get(0), SEQ.get_ptr_mut(0)) else {
            return xdp_action::XDP_DROP;
        };
        // SAFETY: bytes 23, 30..34 and SEQ_OFFSET..+4 lie within the frame
        // (checked); the per-CPU slot is this CPU's while we run.
        unsafe {
            if *((data + 23) as *const u8) != 17 {
                return xdp_action::XDP_DROP;
            }
            let dst = core::ptr::read_unaligned((data + 30) as *const u32);
            let n = core::ptr::read_unaligned((data + SEQ_OFFSET) as *const u32);
            let s = &mut *seq;
            if dst == cfg[0] {
                if n > s[SEQ_OLD_MAX as usize] {
                    s[SEQ_OLD_MAX as usize] = n;
                }
                s[SEQ_OLD_COUNT as usize] += 1;
            } else if dst == cfg[1] {
                if n < s[SEQ_NEW_MIN as usize] {
                    s[SEQ_NEW_MIN as usize] = n;
                }
                s[SEQ_NEW_COUNT as usize] += 1;
            }
        }
        xdp_action::XDP_DROP
    }

    bgswitch_bench_ebpf::program_object!();
}
