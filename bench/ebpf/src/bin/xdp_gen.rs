//! A packet generator for BPF_PROG_TEST_RUN in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`): every run writes a complete
//! Ethernet/IPv4/UDP (or TCP ACK) frame — every header field, since recycled
//! pages keep what the last program (or the last hop) wrote — for the next
//! flow of a cycle of `flows`, and transmits it with XDP_TX on the interface
//! given as the test run's ingress. The UDP checksum is 0 (none, valid for
//! IPv4), so no receiver pays for verifying one a NIC would have verified. A
//! TCP ACK carries no payload (the IPv4 length says 40; the rest of the frame
//! is Ethernet padding) and a valid checksum, which conntrack checks.
//!
//! `xdp_gen6` (same object, same maps) writes Ethernet/IPv6/UDP frames the
//! same way: a UDP header and no payload (the IPv6 payload length says 8;
//! the rest of a 64-byte frame is Ethernet padding) with a valid checksum,
//! which IPv6 requires.
// The program exists for the BPF target only; a host build (`cargo test
// --workspace`) gets an empty binary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::{Array, PerCpuArray},
        programs::XdpContext,
    };
    use bgswitch_bench_ebpf::{GenConfig, PORT_BITS, PORT_MASK, SEQ_OFFSET};

    #[map]
    static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);

    /// Per CPU: [0] the next flow, [1] frames generated.
    #[map]
    static GEN_STATE: PerCpuArray<u32> = PerCpuArray::with_max_entries(2, 0);

    const ETH_LEN: usize = 14;
    const IP_LEN: usize = 20;
    const TCP_LEN: usize = 20;
    const HDRS: usize = ETH_LEN + IP_LEN + TCP_LEN;

    #[inline(always)]
    fn fold(mut sum: u32) -> u16 {
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    #[xdp]
    pub fn xdp_gen(ctx: XdpContext) -> u32 {
        let data = ctx.data();
        let end = ctx.data_end();
        if data + HDRS > end {
            return xdp_action::XDP_ABORTED;
        }
        let Some(cfg) = GEN_CONFIG.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let Some(next) = GEN_STATE.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        let flow = unsafe { *next };
        let following = flow + 1;
        // SAFETY: as above.
        unsafe { *next = if following >= cfg.flows { 0 } else { following } };
        let mut seq = 0;
        if let Some(sent) = GEN_STATE.get_ptr_mut(1) {
            // SAFETY: as above.
            unsafe {
                seq = *sent;
                *sent = seq.wrapping_add(1);
            }
        }

        let tcp = cfg.proto == 6;
        let frame_len = (end - data) as u32;
        let ip_total = if tcp {
            (IP_LEN + TCP_LEN) as u16
        } else {
            (frame_len - ETH_LEN as u32) as u16
        };
        let udp_len = ip_total - IP_LEN as u16; // UDP's length field
        let mut src_ip = u32::from_be_bytes(cfg.src_ip).wrapping_add(flow >> PORT_BITS);
        if cfg.spread != 0 {
            // SAFETY: a helper without arguments.
            let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
            src_ip = src_ip.wrapping_add(cpu << 12);
        }
        let sport = cfg.src_port_base.wrapping_add((flow & PORT_MASK) as u16);
        let dst_ip = u32::from_be_bytes(cfg.dst_ip);

        let proto: u8 = if tcp { 6 } else { 17 };
        // IPv4 header checksum over the ten 16-bit words (id 0, DF, TTL 64).
        let sum = 0x4500u32
            + ip_total as u32
            + 0x4000
            + (0x4000 | proto as u32)
            + (src_ip >> 16)
            + (src_ip & 0xffff)
            + (dst_ip >> 16)
            + (dst_ip & 0xffff);
        let check = fold(sum);

        let p = data as *mut u8;
        // SAFETY: the frame holds at least HDRS bytes (checked above); every
        // write below lies within them.
        unsafe {
            let w = |off: usize, b: &[u8]| {
                for (i, v) in b.iter().enumerate() {
                    *p.add(off + i) = *v;
                }
            };
            w(0, &cfg.dst_mac);
            w(6, &cfg.src_mac);
            w(12, &[0x08, 0x00]);
            let ip_len = ip_total.to_be_bytes();
            let ck = check.to_be_bytes();
            let s = src_ip.to_be_bytes();
            let d = dst_ip.to_be_bytes();
            w(
                ETH_LEN,
                &[
                    0x45, 0, ip_len[0], ip_len[1], 0, 0, 0x40, 0, 64, proto, ck[0], ck[1], s[0],
                    s[1], s[2], s[3], d[0], d[1], d[2], d[3],
                ],
            );
            let sp = sport.to_be_bytes();
            let ul = udp_len.to_be_bytes();
            if tcp {
                // Sequence 1, ACK 1, data offset 5, ACK flag, window 65535;
                // the checksum over the pseudo-header and these 20 bytes.
                let dport = u16::from_be_bytes(cfg.dst_port) as u32;
                // An ACK (sequence 1, acknowledging 1), or a SYN (sequence
                // 1, acknowledgement 0).
                let syn = cfg.syn != 0;
                let (ack, flags) = if syn { (0u8, 0x02u8) } else { (1u8, 0x10u8) };
                let tsum = (src_ip >> 16)
                    + (src_ip & 0xffff)
                    + (dst_ip >> 16)
                    + (dst_ip & 0xffff)
                    + 6
                    + TCP_LEN as u32
                    + sport as u32
                    + dport
                    + 1
                    + ack as u32
                    + (0x5000 | flags as u32)
                    + 0xffff;
                let tc = fold(tsum).to_be_bytes();
                w(
                    ETH_LEN + IP_LEN,
                    &[
                        sp[0],
                        sp[1],
                        cfg.dst_port[0],
                        cfg.dst_port[1],
                        0,
                        0,
                        0,
                        1,
                        0,
                        0,
                        0,
                        ack,
                        0x50,
                        flags,
                        0xff,
                        0xff,
                        tc[0],
                        tc[1],
                        0,
                        0,
                    ],
                );
                return xdp_action::XDP_TX;
            }
            w(
                ETH_LEN + IP_LEN,
                &[
                    sp[0],
                    sp[1],
                    cfg.dst_port[0],
                    cfg.dst_port[1],
                    ul[0],
                    ul[1],
                    0,
                    0,
                ],
            );
            if cfg.tag != 0 {
                // Inside the HDRS bytes checked above.
                core::ptr::write_unaligned(p.add(SEQ_OFFSET).cast::<u32>(), seq);
            }
        }
        xdp_action::XDP_TX
    }

    const IP6_LEN: usize = 40;
    const UDP_LEN: usize = 8;
    const HDRS6: usize = ETH_LEN + IP6_LEN + UDP_LEN;

    /// Sum of the eight 16-bit words of an IPv6 address.
    #[inline(always)]
    fn sum16(a: &[u8; 16]) -> u32 {
        let mut s = 0u32;
        let mut i = 0;
        while i < 16 {
            s += u32::from(u16::from_be_bytes([a[i], a[i + 1]]));
            i += 2;
        }
        s
    }

    #[xdp]
    pub fn xdp_gen6(ctx: XdpContext) -> u32 {
        let data = ctx.data();
        let end = ctx.data_end();
        if data + HDRS6 > end {
            return xdp_action::XDP_ABORTED;
        }
        let Some(cfg) = GEN_CONFIG.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        if cfg.proto != 17 {
            return xdp_action::XDP_ABORTED;
        }
        let Some(next) = GEN_STATE.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        let flow = unsafe { *next };
        let following = flow + 1;
        // SAFETY: as above.
        unsafe { *next = if following >= cfg.flows { 0 } else { following } };
        if let Some(sent) = GEN_STATE.get_ptr_mut(1) {
            // SAFETY: as above.
            unsafe { *sent = (*sent).wrapping_add(1) };
        }

        let mut src = cfg.src_ip6;
        let low = u32::from_be_bytes([src[12], src[13], src[14], src[15]])
            .wrapping_add(flow >> PORT_BITS)
            .to_be_bytes();
        src[12] = low[0];
        src[13] = low[1];
        src[14] = low[2];
        src[15] = low[3];
        let dst = cfg.dst_ip6;
        let sport = cfg.src_port_base.wrapping_add((flow & PORT_MASK) as u16);
        let dport = u16::from_be_bytes(cfg.dst_port);
        // Pseudo-header (addresses, UDP length, next header) and the UDP
        // header (length again, checksum 0).
        let sum = sum16(&src)
            + sum16(&dst)
            + UDP_LEN as u32
            + 17
            + u32::from(sport)
            + u32::from(dport)
            + UDP_LEN as u32;
        let mut ck = fold(sum);
        if ck == 0 {
            ck = 0xffff;
        }

        let p = data as *mut u8;
        // SAFETY: the frame holds at least HDRS6 bytes (checked above); every
        // write below lies within them.
        unsafe {
            let w = |off: usize, b: &[u8]| {
                for (i, v) in b.iter().enumerate() {
                    *p.add(off + i) = *v;
                }
            };
            w(0, &cfg.dst_mac);
            w(6, &cfg.src_mac);
            w(12, &[0x86, 0xdd]);
            // Version 6, no traffic class or flow label, payload length 8,
            // next header UDP, hop limit 64.
            w(ETH_LEN, &[0x60, 0, 0, 0, 0, UDP_LEN as u8, 17, 64]);
            w(ETH_LEN + 8, &src);
            w(ETH_LEN + 24, &dst);
            let sp = sport.to_be_bytes();
            let c = ck.to_be_bytes();
            w(
                ETH_LEN + IP6_LEN,
                &[
                    sp[0],
                    sp[1],
                    cfg.dst_port[0],
                    cfg.dst_port[1],
                    0,
                    UDP_LEN as u8,
                    c[0],
                    c[1],
                ],
            );
        }
        xdp_action::XDP_TX
    }

    bgswitch_bench_ebpf::program_object!();
}
