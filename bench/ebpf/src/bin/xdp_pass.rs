//! The baseline: does nothing and passes the frame. Program cost is reported
//! as bgswitch's run time minus this program's, measured in the same run.
// The program exists for the BPF target only; a host build (`cargo test
// --workspace`) gets an empty binary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    #[xdp]
    pub fn xdp_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    bgswitch_bench_ebpf::program_object!();
}
