//! Component micro-programs: each does one thing bgswitch's fast path does,
//! written the way bgswitch writes it or the way a proposal would, so
//! BPF_PROG_TEST_RUN can price it against `xdp_pass`. None changes the frame in
//! a way that changes the next run (no TTL, no addresses), so they run with a
//! large repeat. All return XDP_PASS.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Map keys go to the helpers by reference on purpose: the kernel is handed a
// pointer to the key where it already is (as bgswitch does), with
// no copy onto the 512-byte stack; clippy's by-value suggestion would add one.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::{bpf_fib_lookup as FibParams, xdp_action},
        helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
        macros::{map, xdp},
        maps::{DevMap, DevMapHash, HashMap, LruHashMap, PerCpuArray},
        programs::XdpContext,
        EbpfContext,
    };

    /// Sink for computed values, so nothing is optimised away.
    #[map]
    static OUT: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);
    /// 20-byte keys, like SERVICES.
    #[map]
    static HASH20: HashMap<[u8; 20], u32> = HashMap::with_max_entries(256, 0);
    /// 40-byte keys and values, like FLOWS.
    #[map]
    static LRU40: LruHashMap<[u8; 40], [u8; 40]> = LruHashMap::with_max_entries(65536, 0);
    /// 16-byte keys (an IPv4-only 5-tuple), 40-byte values.
    #[map]
    static LRU16: LruHashMap<[u8; 16], [u8; 40]> = LruHashMap::with_max_entries(65536, 0);
    /// Like FLOWS now: 16-byte keys, 48-byte values.
    #[map]
    static LRU16_48: LruHashMap<[u8; 16], [u8; 48]> = LruHashMap::with_max_entries(65536, 0);
    /// The same with BPF_F_NO_COMMON_LRU (per-CPU LRU lists).
    #[map]
    static LRU16_48_PCPU: LruHashMap<[u8; 16], [u8; 48]> =
        LruHashMap::with_max_entries(65536, 1 << 1);
    #[map]
    static PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);
    /// The same interface in a DevMap (an array), at index 1.
    #[map]
    static PORT_ARRAY: DevMap = DevMap::with_max_entries(64, 0);

    const ETH: usize = 14;

    #[inline(always)]
    fn keep(v: u64) {
        if let Some(p) = OUT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            unsafe { *p = (*p).wrapping_add(v) };
        }
    }

    /// The frame's first `N` bytes after Ethernet as a key (so the key is not
    /// a constant), or None if short.
    #[inline(always)]
    fn key<const N: usize>(ctx: &XdpContext) -> Option<[u8; N]> {
        let (d, e) = (ctx.data(), ctx.data_end());
        if d + ETH + 40 > e {
            return None;
        }
        let mut k = [0u8; N];
        let mut i = 0;
        while i < N {
            // SAFETY: i < N <= 40, within the checked 40 bytes.
            k[i] = unsafe { *((d + ETH + i) as *const u8) };
            i += 1;
        }
        Some(k)
    }

    #[xdp]
    pub fn part_ktime(_ctx: XdpContext) -> u32 {
        // SAFETY: no preconditions.
        keep(unsafe { bpf_ktime_get_ns() });
        xdp_action::XDP_PASS
    }

    /// jiffies (tick resolution; the verifier inlines it on 64-bit JITs).
    #[xdp]
    pub fn part_jiffies(_ctx: XdpContext) -> u32 {
        // SAFETY: no preconditions.
        keep(unsafe { aya_ebpf::helpers::bpf_jiffies64() });
        xdp_action::XDP_PASS
    }

    /// The coarse clock (tick resolution), a candidate for last-seen stamps.
    #[xdp]
    pub fn part_ktime_coarse(_ctx: XdpContext) -> u32 {
        // SAFETY: no preconditions.
        keep(unsafe { bpf_ktime_get_coarse_ns() });
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn part_hash20(ctx: XdpContext) -> u32 {
        if let Some(k) = key::<20>(&ctx) {
            // SAFETY: plain Copy value.
            keep(unsafe { HASH20.get(&k) }.map_or(0, |v| u64::from(*v)));
        }
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn part_lru40(ctx: XdpContext) -> u32 {
        if let Some(k) = key::<40>(&ctx) {
            // SAFETY: plain Copy value.
            keep(unsafe { LRU40.get(&k) }.map_or(0, |v| u64::from(v[0])));
        }
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn part_lru16(ctx: XdpContext) -> u32 {
        if let Some(k) = key::<16>(&ctx) {
            // SAFETY: plain Copy value.
            keep(unsafe { LRU16.get(&k) }.map_or(0, |v| u64::from(v[0])));
        }
        xdp_action::XDP_PASS
    }

    /// Fills the FIB parameters from the frame's IPv4 header.
    #[inline(always)]
    fn fib_fill(ctx: &XdpContext, p: &mut FibParams) -> bool {
        let (d, e) = (ctx.data(), ctx.data_end());
        if d + ETH + 20 > e {
            return false;
        }
        let ip = d + ETH;
        p.family = 2;
        // SAFETY: within the checked 20 bytes of the IPv4 header.
        unsafe {
            p.l4_protocol = *((ip + 9) as *const u8);
            p.__bindgen_anon_1.tot_len = u16::from_be(*((ip + 2) as *const u16));
            p.__bindgen_anon_2.tos = *((ip + 1) as *const u8);
            p.__bindgen_anon_3.ipv4_src = *((ip + 12) as *const u32);
            p.__bindgen_anon_4.ipv4_dst = *((ip + 16) as *const u32);
        }
        p.ifindex = ctx.ingress_ifindex() as u32;
        true
    }

    #[inline(always)]
    fn fib_flags(ctx: &XdpContext, p: &mut FibParams, flags: u32) -> i64 {
        // SAFETY: valid context and a parameter struct of the right size.
        unsafe {
            bpf_fib_lookup(
                ctx.as_ptr(),
                p,
                core::mem::size_of::<FibParams>() as i32,
                flags,
            )
        }
    }

    #[inline(always)]
    fn fib(ctx: &XdpContext, p: &mut FibParams) -> i64 {
        fib_flags(ctx, p, 0)
    }

    /// Zeroes the parameters in place with sixteen 4-byte stores (the struct
    /// is 4-byte aligned; volatile, so LLVM cannot turn them back into a
    /// `memset` call).
    macro_rules! zeroed_params {
        ($p:ident) => {
            let mut $p = core::mem::MaybeUninit::<FibParams>::uninit();
            let w = $p.as_mut_ptr() as *mut u32;
            let mut i = 0;
            while i < 16 {
                // SAFETY: 16 words of a 64-byte struct on our stack.
                unsafe { core::ptr::write_volatile(w.add(i), 0) };
                i += 1;
            }
            // SAFETY: every byte was written; all zero is a valid FibParams.
            let $p = unsafe { $p.assume_init_mut() };
        };
    }

    /// As bgswitch's transmit.rs does it: `core::mem::zeroed()` (a call to the
    /// byte-loop `memset` aya-ebpf provides) then the lookup.
    #[xdp]
    pub fn part_fib_zeroed(ctx: XdpContext) -> u32 {
        // SAFETY: zero is valid for this plain C struct.
        let mut p: FibParams = unsafe { core::mem::zeroed() };
        if fib_fill(&ctx, &mut p) {
            keep(fib(&ctx, &mut p) as u64 + u64::from(p.dmac[0]));
        }
        xdp_action::XDP_PASS
    }

    /// The same lookup with the parameters zeroed by plain stores.
    #[xdp]
    pub fn part_fib_words(ctx: XdpContext) -> u32 {
        zeroed_params!(p);
        if fib_fill(&ctx, p) {
            keep(fib(&ctx, p) as u64 + u64::from(p.dmac[0]));
        }
        xdp_action::XDP_PASS
    }

    /// The same with BPF_FIB_LOOKUP_DIRECT (the main table, no policy rules).
    #[xdp]
    pub fn part_fib_direct(ctx: XdpContext) -> u32 {
        zeroed_params!(p);
        if fib_fill(&ctx, p) {
            keep(fib_flags(&ctx, p, 1) as u64 + u64::from(p.dmac[0]));
        }
        xdp_action::XDP_PASS
    }

    /// Writing a 40-byte key's entry (replacing it): half of what a new flow
    /// does (it writes two).
    #[xdp]
    pub fn part_lru40_update(ctx: XdpContext) -> u32 {
        if let Some(k) = key::<40>(&ctx) {
            let v = [2u8; 40];
            keep(LRU40.insert(&k, &v, 0).map_or(1, |_| 0));
        }
        xdp_action::XDP_PASS
    }

    /// Update of an existing 16-byte key with a 48-byte value (as a new flow
    /// writes its entries), common LRU lists.
    #[xdp]
    pub fn part_lru16_update(ctx: XdpContext) -> u32 {
        if let Some(k) = key::<16>(&ctx) {
            let v = [2u8; 48];
            keep(LRU16_48.insert(&k, &v, 0).map_or(1, |_| 0));
        }
        xdp_action::XDP_PASS
    }

    /// The same with per-CPU LRU lists (BPF_F_NO_COMMON_LRU).
    #[xdp]
    pub fn part_lru16_update_pcpu(ctx: XdpContext) -> u32 {
        if let Some(k) = key::<16>(&ctx) {
            let v = [2u8; 48];
            keep(LRU16_48_PCPU.insert(&k, &v, 0).map_or(1, |_| 0));
        }
        xdp_action::XDP_PASS
    }

    /// A DevMapHash check then a redirect through it, as transmit.rs forwards.
    #[xdp]
    pub fn part_devmap_check_redirect(ctx: XdpContext) -> u32 {
        let k = ctx.ingress_ifindex() as u32 + 1;
        if PORTS.get_ifindex(k).is_none() {
            return xdp_action::XDP_PASS;
        }
        PORTS
            .redirect(k, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS)
    }

    /// The redirect alone.
    #[xdp]
    pub fn part_devmap_redirect(ctx: XdpContext) -> u32 {
        let k = ctx.ingress_ifindex() as u32 + 1;
        PORTS
            .redirect(k, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS)
    }

    /// A redirect through a DevMap (array) slot: no hash of the key.
    #[xdp]
    pub fn part_devmap_array_redirect(_ctx: XdpContext) -> u32 {
        PORT_ARRAY
            .redirect(1, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS)
    }

    /// `bpf_redirect` to an ifindex (no map; the device is looked up when
    /// the redirect is carried out, after the program).
    #[xdp]
    pub fn part_redirect_ifindex(ctx: XdpContext) -> u32 {
        // SAFETY: no pointers.
        unsafe { aya_ebpf::helpers::bpf_redirect(ctx.ingress_ifindex() as u32 + 1, 0) as u32 }
    }

    bgswitch_bench_ebpf::program_object!();
}
