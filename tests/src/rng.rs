//! The seeded PRNG of the property tests: xorshift64*, small, fast and
//! deterministic, so a failing seed reproduces the same inputs.

/// xorshift64*.
pub struct Rng(u64);

impl Rng {
    /// Starts from `state` (0, which xorshift cannot leave, becomes 1).
    pub fn from_state(state: u64) -> Rng {
        Rng(if state == 0 { 1 } else { state })
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }
    /// Uniform index in `0..n` (`n > 0`).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.index(hi - lo + 1)
    }
    /// True with probability `p` %.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }
    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }
    pub fn u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::from_state(7), Rng::from_state(7));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut seen = [false; 3];
        for _ in 0..1000 {
            assert!(a.below(10) < 10);
            let r = a.range(3, 5);
            assert!((3..=5).contains(&r));
            seen[r - 3] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_ne!(Rng::from_state(0).next_u64(), 0);
    }
}
