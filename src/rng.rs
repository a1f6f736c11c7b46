//! Seeded random streams: every draw in flowalign comes from one of these, so a seed fixes a run.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

/// The generator used everywhere.
pub type Rng = Xoshiro256PlusPlus;

/// Independent streams derived from one run seed.
///
/// Deriving a fresh generator per (stream, step) makes a resumed run draw exactly what an
/// uninterrupted one would, without storing generator state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Parameter initialisation of the velocity network.
    Init = 1,
    /// Data batches and (t, eps) draws of prior training.
    Prior = 2,
    /// Initial latents of the alignment stage.
    LatentInit = 3,
    /// (t, eps) draws of the alignment stage.
    Align = 4,
    /// Evaluation draws: heatmaps, bound, ODE samples.
    Eval = 5,
    /// Reference samples (normalisation, KDE, plots).
    Reference = 6,
    /// The fixed random projection of target features (METHOD.md section 2).
    Projection = 7,
    /// Which images make up a training batch.
    Data = 8,
    /// Crops and flips of the images.
    Augment = 9,
    /// DiffAugment draws of the adversarial loss (one generator per training step).
    Adversarial = 10,
    /// Initialisation of the discriminator (its heads, and its trunk when no DINOv2 file is given).
    DiscInit = 11,
    /// Generator training draws (stage 3): mask ratio, orders, label drops, the head's (t, noise)
    /// and the dropout seed, one generator per step.
    Mask = 12,
    /// Generator sampling: orders and noise.
    Sample = 13,
}

/// A generator for `stream` at `step` of the run seeded by `seed`.
pub fn rng_for(seed: u64, stream: Stream, step: u64) -> Rng {
    // SplitMix64 finaliser over the three words: distinct inputs give unrelated seeds.
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((stream as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(step.wrapping_mul(0x94D0_49BB_1331_11EB));
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    Rng::seed_from_u64(x)
}
