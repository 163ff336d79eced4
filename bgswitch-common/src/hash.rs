//! The flow hash that picks a backend and a canary bucket.
//!
//! The same function runs in the XDP program and in userspace (the simulator
//! and tests), so "which backend would this flow get" has one answer.

use crate::FlowKey;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3-style hash of a flow's 5-tuple as received from the client.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    if key.family == crate::FAMILY_IPV4 {
        return flow_hash4(
            key.src[0], key.dst[0], key.sport, key.dport, key.proto, seed,
        );
    }
    let mut h = seed;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, ((key.sport as u32) << 16) | key.dport as u32);
    h = mix(h, key.proto as u32);
    finish(h ^ 40)
}

/// [`flow_hash`] of an IPv4 5-tuple, from its words (the other address
/// words are zero): three multiplies and the finaliser, a quarter of the
/// IPv6 rounds — the stateless path hashes every packet.
#[inline(always)]
pub const fn flow_hash4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let mut h = (seed ^ src).wrapping_mul(0x9e37_79b1);
    h = (h ^ dst).rotate_left(13).wrapping_mul(0x85eb_ca6b);
    h = (h ^ ports ^ ((proto as u32) << 24)).wrapping_mul(0xc2b2_ae35);
    finish(h)
}

/// A cheaper hash of an IPv6 5-tuple than [`flow_hash`], for a table's
/// index (the half-open buckets): per word a xor and a 64-bit multiply by
/// an odd constant (a bijection, so 5-tuples that differ in one word never
/// meet), then a xor-shift-multiply finaliser for the top bits. A third of
/// `flow_hash`'s instructions for the eight address words.
#[inline(always)]
pub const fn index_hash6(key: &FlowKey, seed: u32) -> u32 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed as u64;
    let mut i = 0;
    while i < 4 {
        h = (h ^ key.src[i] as u64).wrapping_mul(K);
        h = (h ^ key.dst[i] as u64).wrapping_mul(K);
        i += 1;
    }
    let rest = (key.proto as u64) << 32 | (key.sport as u64) << 16 | key.dport as u64;
    h = (h ^ rest).wrapping_mul(K);
    h ^= h >> 32;
    (h.wrapping_mul(0xd6e8_feb8_6659_fd93) >> 32) as u32
}

/// Seed of the hash that picks a flow's half-open bucket (independent of
/// the backend pick).
pub const HALF_OPEN_SEED: u32 = 0x6861_6c66; // "half"

/// Seed of the hash that picks a backend within a pool.
pub const BACKEND_SEED: u32 = 0x6267_7377; // "bgsw"
/// Seed of the hash that decides the canary share (independent of the backend pick).
pub const CANARY_SEED: u32 = 0x6361_6e72; // "canr"

/// Maps a hash onto `0..n` without division (multiply-shift), `n >= 1`.
#[inline(always)]
pub const fn reduce(hash: u32, n: u32) -> u32 {
    ((hash as u64 * n as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: [u32::from_ne_bytes([198, 18, 0, 2]), 0, 0, 0],
            dst: [u32::from_ne_bytes([198, 19, 0, 10]), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    /// A key as the program builds it from a frame: addresses and ports as
    /// wire bytes.
    fn v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: crate::ipv4_to_addr(src),
            dst: crate::ipv4_to_addr(dst),
            sport: crate::port_to_wire(sport),
            dport: crate::port_to_wire(dport),
            proto,
            family: crate::FAMILY_IPV4,
            _pad: [0; 2],
        }
    }

    fn v6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: crate::ipv6_to_addr(src),
            dst: crate::ipv6_to_addr(dst),
            sport: crate::port_to_wire(sport),
            dport: crate::port_to_wire(dport),
            proto,
            family: crate::FAMILY_IPV6,
            _pad: [0; 2],
        }
    }

    /// Known answers, written out: the hash decides which backend every
    /// connection without a record gets (and its canary bucket), so a
    /// change of it moves every unrecorded connection on upgrade. Change
    /// these numbers only together with a plan for that. The same numbers
    /// pin the independent implementation the tests' models use
    /// (`tests/src/flowhash.rs`). Values for a little-endian host, as the
    /// BPF target is.
    #[test]
    fn flow_hash_and_reduce_give_the_known_answers() {
        const A6: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
        ];
        const B6: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        // (key, seed, hash, reduce over 2, 3, 5 and 64, canary bucket)
        let vectors: [(FlowKey, u32, u32, [u32; 4], u32); 10] = [
            (
                v4([198, 18, 0, 2], 40000, [198, 19, 0, 10], 80, 6),
                BACKEND_SEED,
                0x64fc_ceee,
                [0, 1, 1, 25],
                9646,
            ),
            (
                v4([198, 18, 0, 2], 40000, [198, 19, 0, 10], 80, 6),
                CANARY_SEED,
                0x5d79_172c,
                [0, 1, 1, 23],
                6876,
            ),
            (
                v4([198, 18, 0, 3], 53001, [198, 19, 0, 10], 53, 17),
                BACKEND_SEED,
                0x7ddd_fcbd,
                [0, 1, 2, 31],
                157,
            ),
            (
                v4([198, 18, 0, 3], 53001, [198, 19, 0, 10], 53, 17),
                CANARY_SEED,
                0x06d3_9acf,
                [0, 0, 0, 1],
                1023,
            ),
            (
                v4([10, 1, 2, 3], 1, [192, 0, 2, 200], 65535, 6),
                BACKEND_SEED,
                0x7388_2dd2,
                [0, 1, 2, 28],
                4466,
            ),
            (
                v4([0, 0, 0, 0], 0, [0, 0, 0, 0], 0, 0),
                0,
                0,
                [0, 0, 0, 0],
                0,
            ),
            (
                v4([255; 4], 65535, [255; 4], 65535, 255),
                u32::MAX,
                0x4ae9_8b96,
                [0, 0, 1, 18],
                9606,
            ),
            (
                v6(A6, 40000, B6, 80, 6),
                BACKEND_SEED,
                0x1de0_1775,
                [0, 0, 0, 7],
                5333,
            ),
            (
                v6(A6, 40000, B6, 80, 6),
                CANARY_SEED,
                0x88a0_8cd0,
                [1, 1, 2, 34],
                3184,
            ),
            (
                v6([0; 16], 0, [0; 16], 0, 0),
                0,
                0xc206_7ae9,
                [1, 2, 3, 48],
                4585,
            ),
        ];
        for (i, (key, seed, hash, reduced, bucket)) in vectors.iter().enumerate() {
            let h = flow_hash(key, *seed);
            assert_eq!(
                h, *hash,
                "vector {i}: flow_hash {h:#010x}, want {hash:#010x}"
            );
            let r = [2, 3, 5, 64].map(|n| reduce(h, n));
            assert_eq!(r, *reduced, "vector {i}: reduce over 2, 3, 5, 64");
            assert_eq!(
                h % crate::control::CANARY_FULL,
                *bucket,
                "vector {i}: canary bucket"
            );
        }
        // reduce alone: floor(hash × n / 2^32).
        assert_eq!(reduce(0, 1), 0);
        assert_eq!(reduce(0x8000_0000, 2), 1);
        assert_eq!(reduce(0x7fff_ffff, 2), 0);
        assert_eq!(reduce(0x5555_5556, 3), 1);
        assert_eq!(reduce(0x5555_5555, 3), 0);
        assert_eq!(reduce(0xaaaa_aaab, 3), 2);
        assert_eq!(reduce(0xffff_ffff, 3), 2);
        assert_eq!(reduce(0x0400_0000, 64), 1);
        assert_eq!(reduce(0x03ff_ffff, 64), 0);
    }

    #[test]
    fn reduce_stays_in_range_and_spreads() {
        let mut counts = [0u32; 4];
        for port in 1024..(1024 + 40_000u16) {
            let i = reduce(flow_hash(&key(port), BACKEND_SEED), 4);
            assert!(i < 4);
            counts[i as usize] += 1;
        }
        for c in counts {
            // 10 000 expected each; allow ±5 %.
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(reduce(u32::MAX, 1), 0);
        assert_eq!(reduce(u32::MAX, 64), 63);
    }

    #[test]
    fn seeds_are_independent() {
        // Among flows sent to backend 0, the canary bucket must still spread.
        let mut below = 0;
        let mut total = 0;
        for port in 1024..(1024 + 40_000u16) {
            let k = key(port);
            if reduce(flow_hash(&k, BACKEND_SEED), 2) == 0 {
                total += 1;
                if flow_hash(&k, CANARY_SEED) % 10_000 < 1_000 {
                    below += 1;
                }
            }
        }
        let share = below as f64 / total as f64;
        assert!((0.08..0.12).contains(&share), "{share}");
    }

    #[test]
    fn clients_that_differ_only_in_address_spread_too() {
        // One source port, 20 000 client addresses in a /16, 8 backends.
        let mut counts = [0u32; 8];
        for i in 0..20_000u32 {
            let mut k = key(40_000);
            k.src[0] = u32::from_ne_bytes([198, 18, (i >> 8) as u8, i as u8]);
            counts[reduce(flow_hash(&k, BACKEND_SEED), 8) as usize] += 1;
        }
        for c in counts {
            // 2 500 expected each; allow ±8 %.
            assert!((2_300..=2_700).contains(&c), "{counts:?}");
        }
        // IPv6 keys keep the full rounds, and differ from the IPv4 form.
        let mut k6 = key(1);
        k6.family = crate::FAMILY_IPV6;
        assert_ne!(
            flow_hash(&k6, BACKEND_SEED),
            flow_hash(&key(1), BACKEND_SEED)
        );
    }

    /// Clients of one /16 with the ports a NAT gives out: the half-open
    /// buckets (both families) spread them as a random function would
    /// (4 096 flows over 4 096 buckets: about 37 % of buckets empty, no
    /// bucket with more than 8), where the flow cache's cheaper index
    /// folds such clients into 2^16 values.
    #[test]
    fn half_open_buckets_spread_the_clients_of_one_network() {
        let shift = 32 - 12;
        let mut n4 = [0u32; 4096];
        let mut n6 = [0u32; 4096];
        for i in 0..4096u32 {
            let (c, d) = ((i >> 4) as u8, (i * 7) as u8);
            let sport = 32768 + (i * 13 % 28000) as u16;
            let k = v4([10, 1, c, d], sport, [198, 19, 0, 10], 443, 6);
            n4[crate::half_open_bucket4(&crate::FlowKey4::of(&k), shift) as usize] += 1;
            let k6 = FlowKey {
                src: [0x2001_0db8u32.to_be(), 0, u32::from(c), u32::from(d)],
                dst: [0x2001_0db8u32.to_be(), 0, 0, 0x10],
                family: crate::FAMILY_IPV6,
                ..k
            };
            n6[crate::half_open_bucket6(&k6, shift) as usize] += 1;
        }
        for (name, b) in [("IPv4", n4), ("IPv6", n6)] {
            let empty = b.iter().filter(|n| **n == 0).count();
            let most = *b.iter().max().unwrap();
            assert!((1300..1700).contains(&empty), "{name}: {empty} empty");
            assert!(most <= 8, "{name}: a bucket of {most}");
        }
    }

    #[test]
    fn the_ipv6_index_hash_separates_5_tuples_that_differ_in_one_word() {
        let base = FlowKey {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 1,
            dport: 2,
            proto: 6,
            family: crate::FAMILY_IPV6,
            _pad: [0; 2],
        };
        let h = index_hash6(&base, HALF_OPEN_SEED);
        for w in 0..8 {
            for x in 0..1000u32 {
                let mut k = base;
                if w < 4 {
                    k.src[w] ^= x + 1;
                } else {
                    k.dst[w - 4] ^= x + 1;
                }
                assert_ne!(index_hash6(&k, HALF_OPEN_SEED), h, "word {w}, {x}");
            }
        }
        assert_ne!(index_hash6(&base, 0), h, "the seed counts");
    }
}
