//! Incremental Internet checksum updates (RFC 1624, equation 3).
//!
//! `bpf_l3_csum_replace`/`bpf_l4_csum_replace` are for skb programs only, so the
//! XDP program updates checksums with these plain functions, which compile for
//! both the BPF target and the host (where they are unit-tested).
//!
//! All values are taken **as they lie in memory** (`from_ne_bytes` of the wire
//! bytes): the one's-complement sum does not depend on byte order as long as
//! every term uses the same one.
//!
//! Usage: accumulate the change of every rewritten field into a [`Delta`], then
//! [`Delta::apply`] it to each checksum that covers those fields (the IPv4
//! header checksum covers addresses and TTL; the TCP/UDP checksum covers the
//! addresses through the pseudo-header, and the ports).

/// The sum of `~old + new` over rewritten 16-bit words, not yet folded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u64);

impl Delta {
    pub const ZERO: Delta = Delta(0);

    /// Accounts for a 16-bit field changing from `old` to `new`.
    #[inline(always)]
    #[must_use]
    pub const fn add16(self, old: u16, new: u16) -> Delta {
        Delta(self.0 + (!old) as u64 + new as u64)
    }

    /// Accounts for a 32-bit field changing from `old` to `new`.
    #[inline(always)]
    #[must_use]
    pub const fn add32(self, old: u32, new: u32) -> Delta {
        let o = !old;
        Delta(
            self.0
                + (o & 0xffff) as u64
                + (o >> 16) as u64
                + (new & 0xffff) as u64
                + (new >> 16) as u64,
        )
    }

    /// Accounts for an address (one word for IPv4, four for IPv6) changing.
    #[inline(always)]
    #[must_use]
    pub const fn add_addr(self, old: &[u32; 4], new: &[u32; 4], words: usize) -> Delta {
        let mut d = self.add32(old[0], new[0]);
        if words == 4 {
            d = d
                .add32(old[1], new[1])
                .add32(old[2], new[2])
                .add32(old[3], new[3]);
        }
        d
    }

    /// Both deltas together (changes in one checksummed region from two
    /// places).
    #[inline(always)]
    #[must_use]
    pub const fn plus(self, other: Delta) -> Delta {
        Delta(self.0 + other.0)
    }

    /// Adds the IPv4 TTL decrement: the 16-bit word (TTL, protocol), read in
    /// memory order on a little-endian host, drops by exactly one whatever
    /// the TTL (> 0), so its `~old + new` is the constant `0xfffe`.
    #[inline(always)]
    #[must_use]
    pub const fn ttl_decrement(self) -> Delta {
        Delta(self.0 + 0xfffe)
    }

    /// The delta folded to 16 bits (the same delta for [`Delta::apply`]),
    /// to be kept and reused with [`Delta::from_folded`].
    #[inline(always)]
    pub const fn folded(self) -> u16 {
        fold(self.0)
    }

    /// A delta kept with [`Delta::folded`].
    #[inline(always)]
    pub const fn from_folded(v: u16) -> Delta {
        Delta(v as u64)
    }

    /// Returns `check` updated by this delta: `~(~check + Σ(~m + m'))`.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u64 + self.0)
    }

    /// [`Delta::apply`] of a folded delta ([`Delta::folded`]): with both
    /// terms at most 16 bits, one fold is enough (the sum is at most
    /// `0x1fffe`, which folds to at most `0xffff`). The cached paths' rewrite.
    #[inline(always)]
    pub const fn apply_folded(folded: u16, check: u16) -> u16 {
        let s = (!check) as u32 + folded as u32;
        !(((s & 0xffff) + (s >> 16)) as u16)
    }

    /// Like [`Delta::apply`] for a UDP checksum: zero means "no checksum" and
    /// stays zero; a computed zero is sent as `0xffff` (RFC 768).
    #[inline(always)]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        let c = self.apply(check);
        if c == 0 {
            0xffff
        } else {
            c
        }
    }
}

/// Folds a wide one's-complement sum to 16 bits (without complementing).
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let mut s = (sum & 0xffff_ffff) + (sum >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn ttl_decrement_and_folded_deltas_equal_the_long_way() {
        for ttl in [2u8, 3, 64, 128, 255] {
            for proto in [6u8, 17] {
                for check in [0u16, 1, 0x1234, 0xfffe, 0xffff] {
                    let old = u16::from_ne_bytes([ttl, proto]);
                    let new = u16::from_ne_bytes([ttl - 1, proto]);
                    let long = Delta::ZERO.add32(0x0a0b_0c0d, 0x1122_3344).add16(old, new);
                    let short = Delta::ZERO.add32(0x0a0b_0c0d, 0x1122_3344).ttl_decrement();
                    assert_eq!(long.apply(check), short.apply(check));
                    assert_eq!(
                        Delta::from_folded(short.folded()).apply(check),
                        short.apply(check)
                    );
                }
            }
        }
    }

    /// A straightforward full checksum over big-endian 16-bit words, written
    /// independently of the incremental code.
    fn full(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for chunk in bytes.chunks(2) {
            let w = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                u16::from_be_bytes([chunk[0], 0])
            };
            sum += w as u32;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn ne16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }
    fn ne32(b: &[u8]) -> u32 {
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn ipv4_header(src: [u8; 4], dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0, src[0], src[1], src[2], src[3],
            dst[0], dst[1], dst[2], dst[3],
        ];
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn ipv4_header_rewrite_matches_full_recompute() {
        // A spread of addresses, including ones whose sums carry.
        let addrs = [
            [198, 18, 0, 1],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [10, 0, 0, 1],
            [198, 19, 0, 10],
            [128, 0, 255, 1],
        ];
        for &src in &addrs {
            for &dst in &addrs {
                for &new_dst in &addrs {
                    for ttl in [2u8, 64, 255] {
                        let h = ipv4_header(src, dst, ttl);
                        let mut r = h;
                        r[16..20].copy_from_slice(&new_dst);
                        r[8] = ttl - 1;
                        let d = Delta::ZERO
                            .add32(ne32(&h[16..20]), ne32(&r[16..20]))
                            .add16(ne16(&h[8..10]), ne16(&r[8..10]));
                        let c = d.apply(ne16(&h[10..12]));
                        r[10..12].copy_from_slice(&c.to_ne_bytes());
                        assert_eq!(full(&r), 0, "checksum of rewritten header must verify");
                        let mut z = r;
                        z[10] = 0;
                        z[11] = 0;
                        let want = full(&z);
                        // RFC 1624 may yield the other zero (0xffff vs 0x0000)
                        // only for an all-zero sum, which a header never has.
                        assert_eq!(u16::from_be_bytes([r[10], r[11]]), want);
                    }
                }
            }
        }
    }

    #[test]
    fn apply_folded_equals_apply_of_a_folded_delta() {
        // Every check against a spread of deltas, and every delta against a
        // spread of checks (both include 0, 0xffff and the carry edges).
        let spread = |i: u32| (i.wrapping_mul(0x9e37_79b1) >> 16) as u16;
        let edges = [0u16, 1, 0x7fff, 0x8000, 0xfffe, 0xffff];
        for a in 0..=u16::MAX {
            for b in edges.iter().copied().chain((0..64).map(spread)) {
                assert_eq!(
                    Delta::apply_folded(b, a),
                    Delta::from_folded(b).apply(a),
                    "check {a:#x} delta {b:#x}"
                );
                assert_eq!(
                    Delta::apply_folded(a, b),
                    Delta::from_folded(a).apply(b),
                    "check {b:#x} delta {a:#x}"
                );
            }
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        let d = Delta::ZERO.add32(0x0102_0304, 0x0506_0708);
        assert_eq!(d.apply_udp(0), 0);
        // Find a checksum value whose update yields zero and check it maps to 0xffff.
        let mut hit = false;
        for c in 1..=u16::MAX {
            if d.apply(c) == 0 {
                assert_eq!(d.apply_udp(c), 0xffff);
                hit = true;
            }
        }
        assert!(hit);
    }

    #[test]
    fn ipv6_words_are_all_counted() {
        let old = [1u32, 2, 3, 4];
        let new = [5u32, 6, 7, 8];
        let v4 = Delta::ZERO.add_addr(&old, &new, 1);
        let v6 = Delta::ZERO.add_addr(&old, &new, 4);
        assert_ne!(v4, v6);
        let manual = Delta::ZERO.add32(1, 5).add32(2, 6).add32(3, 7).add32(4, 8);
        assert_eq!(v6, manual);
    }
}
