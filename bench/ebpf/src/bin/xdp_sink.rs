//! The receiver: counts IPv4 UDP and TCP frames and their bytes (per CPU), counts
//! anything else apart (IPv6 neighbour discovery and the like), and drops
//! everything.
// The program exists for the BPF target only; a host build (`cargo test
// --workspace`) gets an empty binary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
    };
    use bgswitch_bench_ebpf::{SINK_BYTES, SINK_OTHER, SINK_PACKETS};

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
        if !udp4 {
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

    bgswitch_bench_ebpf::program_object!();
}
