//! The flow hash, written again from its definition for the tests' models,
//! so that a model predicting "which backend, which canary bucket" does not
//! call the code under test (`bgswitch_common::hash`, which the programs
//! run). The two must agree: both are pinned to the same known answers
//! (here and in `bgswitch-common/src/hash.rs`).
//!
//! The definition, for a flow as the client sent it (addresses and ports as
//! the frame carries them):
//!
//! * each address is read as 32-bit words from its wire bytes in
//!   little-endian order (how the BPF target loads them), an IPv4 address
//!   as one word; each port is read the same way from its two wire bytes,
//!   and `ports = source port << 16 | destination port`;
//! * IPv4: `h = (seed ^ src) × 0x9e3779b1`, `h = rotl13(h ^ dst) ×
//!   0x85ebca6b`, `h = (h ^ ports ^ proto << 24) × 0xc2b2ae35`, then the
//!   MurmurHash3 32-bit finaliser (fmix32);
//! * IPv6: MurmurHash3's x86_32 body over the words src[0..4], dst[0..4],
//!   ports, proto (ten blocks, seed as the initial state), then `h ^ 40`
//!   (the ten blocks' length in bytes) and fmix32;
//! * a pool of `n` backends takes index `⌊h · n / 2³²⌋`; the canary bucket is
//!   `h mod 10 000` (with its own seed).
//!
//! All arithmetic is modulo 2³².

/// Seed of the backend choice ("bgsw" as big-endian ASCII).
pub const BACKEND_SEED: u32 = u32::from_be_bytes(*b"bgsw");
/// Seed of the canary bucket ("canr").
pub const CANARY_SEED: u32 = u32::from_be_bytes(*b"canr");
/// Canary buckets (basis points).
pub const CANARY_BUCKETS: u32 = 10_000;

/// A port as the BPF target loads it from its two wire bytes.
fn port_word(port: u16) -> u32 {
    u32::from(u16::from_le_bytes(port.to_be_bytes()))
}

/// The words of an address's wire bytes, little-endian.
fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// MurmurHash3's 32-bit finaliser.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow hash of an IPv4 flow.
pub fn hash_v4(seed: u32, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> u32 {
    let s = u32::from_le_bytes(src);
    let d = u32::from_le_bytes(dst);
    let ports = port_word(sport) << 16 | port_word(dport);
    let mut h = (seed ^ s).wrapping_mul(0x9e37_79b1);
    h = (h ^ d).rotate_left(13).wrapping_mul(0x85eb_ca6b);
    h = (h ^ ports ^ u32::from(proto) << 24).wrapping_mul(0xc2b2_ae35);
    fmix32(h)
}

/// The flow hash of an IPv6 flow.
pub fn hash_v6(seed: u32, src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, proto: u8) -> u32 {
    let blocks = words(&src)
        .chain(words(&dst))
        .chain([port_word(sport) << 16 | port_word(dport), u32::from(proto)]);
    let mut h = seed;
    let mut len = 0u32;
    for k in blocks {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        h = (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
        len += 4;
    }
    fmix32(h ^ len)
}

/// The index among `n` backends a hash chooses: `⌊h · n / 2³²⌋`.
pub fn index(hash: u32, n: usize) -> usize {
    assert!(n >= 1, "a pool has at least one backend");
    ((u128::from(hash) * n as u128) >> 32) as usize
}

/// The backend index an IPv4 flow gets in a pool of `n`.
pub fn backend_v4(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    proto: u8,
    n: usize,
) -> usize {
    index(hash_v4(BACKEND_SEED, src, sport, dst, dport, proto), n)
}

/// The backend index an IPv6 flow gets in a pool of `n`.
pub fn backend_v6(
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    proto: u8,
    n: usize,
) -> usize {
    index(hash_v6(BACKEND_SEED, src, sport, dst, dport, proto), n)
}

/// The canary bucket of an IPv4 flow (0..10 000): a share of `bp` basis
/// points sends the flows whose bucket is below `bp` to the idle colour.
pub fn canary_bucket_v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> u32 {
    hash_v4(CANARY_SEED, src, sport, dst, dport, proto) % CANARY_BUCKETS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known answers of `bgswitch-common/src/hash.rs`, the same numbers
    /// written out again: this implementation is the shared one's twin.
    #[test]
    fn the_reference_gives_the_known_answers() {
        const A6: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
        ];
        const B6: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let c = [198, 18, 0, 2];
        let c3 = [198, 18, 0, 3];
        let vip = [198, 19, 0, 10];
        // (hash, reduce over 2, 3, 5 and 64, canary bucket)
        let vectors: [(u32, u32, [usize; 4], u32); 10] = [
            (
                hash_v4(BACKEND_SEED, c, 40000, vip, 80, 6),
                0x64fc_ceee,
                [0, 1, 1, 25],
                9646,
            ),
            (
                hash_v4(CANARY_SEED, c, 40000, vip, 80, 6),
                0x5d79_172c,
                [0, 1, 1, 23],
                6876,
            ),
            (
                hash_v4(BACKEND_SEED, c3, 53001, vip, 53, 17),
                0x7ddd_fcbd,
                [0, 1, 2, 31],
                157,
            ),
            (
                hash_v4(CANARY_SEED, c3, 53001, vip, 53, 17),
                0x06d3_9acf,
                [0, 0, 0, 1],
                1023,
            ),
            (
                hash_v4(BACKEND_SEED, [10, 1, 2, 3], 1, [192, 0, 2, 200], 65535, 6),
                0x7388_2dd2,
                [0, 1, 2, 28],
                4466,
            ),
            (hash_v4(0, [0; 4], 0, [0; 4], 0, 0), 0, [0, 0, 0, 0], 0),
            (
                hash_v4(u32::MAX, [255; 4], 65535, [255; 4], 65535, 255),
                0x4ae9_8b96,
                [0, 0, 1, 18],
                9606,
            ),
            (
                hash_v6(BACKEND_SEED, A6, 40000, B6, 80, 6),
                0x1de0_1775,
                [0, 0, 0, 7],
                5333,
            ),
            (
                hash_v6(CANARY_SEED, A6, 40000, B6, 80, 6),
                0x88a0_8cd0,
                [1, 1, 2, 34],
                3184,
            ),
            (
                hash_v6(0, [0; 16], 0, [0; 16], 0, 0),
                0xc206_7ae9,
                [1, 2, 3, 48],
                4585,
            ),
        ];
        for (i, (got, hash, reduced, bucket)) in vectors.into_iter().enumerate() {
            assert_eq!(got, hash, "vector {i}: hash {got:#010x}, want {hash:#010x}");
            assert_eq!(
                [2, 3, 5, 64].map(|n| index(got, n)),
                reduced,
                "vector {i}: index over 2, 3, 5, 64"
            );
            assert_eq!(got % CANARY_BUCKETS, bucket, "vector {i}: canary bucket");
        }
        assert_eq!(
            canary_bucket_v4(c, 40000, vip, 80, 6),
            6876,
            "the canary bucket takes the canary seed"
        );
        assert_eq!(backend_v4(c, 40000, vip, 80, 6, 64), 25);
        assert_eq!(backend_v6(A6, 40000, B6, 80, 6, 64), 7);
        assert_eq!((BACKEND_SEED, CANARY_SEED), (0x6267_7377, 0x6361_6e72));
        assert_eq!(index(0x5555_5556, 3), 1);
        assert_eq!(index(0x5555_5555, 3), 0);
        assert_eq!(index(u32::MAX, 64), 63);
    }
}
