//! The least an XDP forwarder does on the part-2 path: write both MACs and
//! redirect the frame through a DevMap to the egress veth — no parse, no
//! lookup, no rewrite. Its rate is the ceiling of any XDP load balancer on
//! this path (one more veth hop and XDP run than the floor); bgswitch's
//! rows are compared with it to tell the program's cost from the hop's.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::{Array, DevMapHash},
        programs::XdpContext,
    };
    use bgswitch_bench_ebpf::RedirectConfig;

    #[map]
    static REDIRECT_CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);
    #[map]
    static REDIRECT_PORTS: DevMapHash = DevMapHash::with_max_entries(8, 0);

    #[xdp]
    pub fn xdp_redirect(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + 14 > end {
            return xdp_action::XDP_PASS;
        }
        let Some(c) = REDIRECT_CONFIG.get(0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: the 14-byte Ethernet header is inside the frame (checked);
        // the config's MACs are 4- and 2-byte aligned like the frame's.
        unsafe {
            let d0 = core::ptr::read_volatile(c.dst_mac.as_ptr().cast::<u32>());
            let d1 = core::ptr::read_volatile(c.dst_mac.as_ptr().add(4).cast::<u16>());
            let s0 = core::ptr::read_volatile(c.src_mac.as_ptr().cast::<u16>());
            let s1 = core::ptr::read_volatile(c.src_mac.as_ptr().add(2).cast::<u32>());
            let mac = data as *mut u8;
            core::ptr::write_volatile(mac.cast::<u32>(), d0);
            core::ptr::write_volatile(mac.add(4).cast::<u16>(), d1);
            core::ptr::write_volatile(mac.add(6).cast::<u16>(), s0);
            core::ptr::write_volatile(mac.add(8).cast::<u32>(), s1);
        }
        REDIRECT_PORTS
            .redirect(c.ifindex, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS)
    }

    bgswitch_bench_ebpf::program_object!();
}
