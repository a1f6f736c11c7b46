//! numpy's legacy `RandomState` (MT19937) as far as torch-fidelity uses it: `permutation(n)`, which
//! draws the Inception Score's shuffle and the KID subsets (`choice(n, m, replace=False)` is
//! `permutation(n)[:m]`), so both metrics see the same rows as torch-fidelity for the same image
//! order and seed.

/// The Mersenne Twister of numpy's `RandomState(seed)` for an integer seed.
#[derive(Debug, Clone)]
pub struct RandomState {
    state: Box<[u32; 624]>,
    pos: usize,
}

impl RandomState {
    /// `numpy.random.RandomState(seed)`: MT19937's `init_genrand` with the low 32 bits of `seed`.
    pub fn new(seed: u32) -> RandomState {
        let mut state = Box::new([0u32; 624]);
        let mut s = seed;
        for (i, slot) in state.iter_mut().enumerate() {
            *slot = s;
            s = 1_812_433_253u32
                .wrapping_mul(s ^ (s >> 30))
                .wrapping_add(i as u32 + 1);
        }
        RandomState { state, pos: 624 }
    }

    /// The next 32 random bits (MT19937's `genrand_int32`).
    pub fn next_u32(&mut self) -> u32 {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        if self.pos == 624 {
            let mt = &mut self.state;
            for i in 0..624 {
                let y = (mt[i] & UPPER) | (mt[(i + 1) % 624] & LOWER);
                let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
                mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.pos = 0;
        }
        let mut y = self.state[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A uniform integer in `[0, max]` by numpy's `random_interval`: the smallest all-ones mask
    /// covering `max`, redrawn while the masked value exceeds it.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mask = u32::MAX >> max.leading_zeros();
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `RandomState.permutation(n)`: `arange(n)` shuffled by Fisher-Yates from the last position
    /// down, as numpy's legacy `shuffle` does.
    ///
    /// # Panics
    /// When `n` exceeds `u32::MAX` (numpy would switch to 64-bit draws; no image set is that large).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        assert!(
            u32::try_from(n).is_ok(),
            "permutation of more than 2^32 rows"
        );
        let mut out: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u32) as usize;
            out.swap(i, j);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by numpy 2.4 (`numpy.random.RandomState(seed)`).
    #[test]
    fn draws_equal_numpys() {
        // `RandomState(5489).randint(0, 2**32, size=3, dtype=np.uint32)`: the raw 32-bit stream,
        // MT19937's reference output for its default seed.
        let mut rng = RandomState::new(5489);
        let first: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
        assert_eq!(
            RandomState::new(2020).permutation(10),
            [2, 4, 9, 1, 5, 7, 6, 3, 8, 0]
        );
        // One stream across calls, as torch-fidelity's KID draws its subsets.
        let mut rng = RandomState::new(2020);
        let a = rng.permutation(1000);
        let b = rng.permutation(7);
        assert_eq!(&a[..6], &[725, 986, 815, 656, 469, 76]);
        assert_eq!(b, [2, 3, 0, 6, 1, 5, 4]);
        // `choice(30, 5, replace=False)` twice: the first 5 of each permutation.
        let mut rng = RandomState::new(2020);
        assert_eq!(&rng.permutation(30)[..5], &[14, 17, 19, 20, 23]);
        assert_eq!(&rng.permutation(30)[..5], &[5, 25, 13, 8, 11]);
        // Sizes whose masks reject often (just above a power of two).
        let mut rng = RandomState::new(2020);
        assert_eq!(
            &rng.permutation(50_000)[..6],
            &[24397, 39273, 6546, 13504, 49765, 31361]
        );
        assert_eq!(
            &rng.permutation(70_000)[70_000 - 4..],
            &[50849, 11200, 25824, 22270]
        );
    }
}
