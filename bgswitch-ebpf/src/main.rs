//! The bgswitch XDP program.
//!
//! The packet's path: parse → look up the service (client → VIP) or the reverse
//! flow (backend → client) → follow or choose the flow → rewrite → forward.
//! Everything else passes to the stack untouched. The program makes no policy
//! decisions: colours, pools and shares are read from maps the daemon writes.
#![no_std]
#![no_main]

mod flow;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use bgswitch_common::global;

use crate::{
    maps::count,
    parse::{parse, Skip},
};

#[xdp]
pub fn bgswitch(ctx: XdpContext) -> u32 {
    let frame = match parse(&ctx) {
        Ok(f) => f,
        Err(skip) => {
            count(match skip {
                Skip::NotIp => global::PASS_NOT_IP,
                Skip::NotTcpUdp => global::PASS_NOT_SERVICE,
                Skip::Fragment => global::FRAGMENT,
                Skip::Malformed => global::MALFORMED,
            });
            return xdp_action::XDP_PASS;
        }
    };
    flow::handle(&ctx, &frame)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
