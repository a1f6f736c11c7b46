//! Which tokens MAR hides: the training mask ratio, random generation orders, the masks they give,
//! and the sampling schedule (METHOD.md section 7).
//!
//! Everything here is host-side bookkeeping on small integer vectors, drawn from our seeded
//! generators, so a seed fixes every mask of a run on every backend.

use rand::RngExt;
use rand::seq::SliceRandom;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// The lower end of the training mask ratio's truncated normal (MAR's `mask_ratio_min`).
pub const MASK_RATIO_MIN: f64 = 0.7;
/// Scale of the truncated normal centred at a ratio of 1 (MAR's 0.25).
const MASK_RATIO_STD: f64 = 0.25;

/// Draws a training mask ratio from a normal (loc 1, scale 0.25) truncated to `[min, 1]`
/// (METHOD.md section 7; scipy's `truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25)` in MAR).
///
/// The truncation keeps exactly the left half of the normal above `min`, so `1 - 0.25 |e|` with
/// `e ~ N(0, 1)`, rejected while below `min`, has the same law. With `min = 0.7` two draws in three
/// are accepted; the mean is 0.867. `min >= 1` always gives 1.
pub fn mask_ratio(rng: &mut Rng, min: f64) -> f64 {
    if min >= 1.0 {
        return 1.0;
    }
    loop {
        let e: f64 = rng.sample(StandardNormal);
        let r = 1.0 - MASK_RATIO_STD * e.abs();
        if r >= min {
            return r;
        }
    }
}

/// Tokens hidden at ratio `ratio` out of `seq_len`: `ceil(seq_len * ratio)`, at most `seq_len`.
pub fn masked_count(seq_len: usize, ratio: f64) -> usize {
    ((seq_len as f64 * ratio).ceil() as usize).min(seq_len)
}

/// A uniformly random permutation of `0..seq_len`: the order in which a sample's tokens are
/// generated (the first ones of the order are the last to be revealed).
pub fn random_order(rng: &mut Rng, seq_len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..seq_len).collect();
    order.shuffle(rng);
    order
}

/// Which tokens of each sample are hidden: every sample hides the same number, so the encoder's
/// sequences keep one length after dropping them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    /// Samples.
    pub batch: usize,
    /// Tokens per sample.
    pub seq_len: usize,
    /// `[batch * seq_len]`, row-major; true = hidden.
    pub hidden: Vec<bool>,
    /// Hidden tokens per sample.
    pub hidden_per_sample: usize,
}

impl TokenMask {
    /// Hides the first `n_hidden` tokens of each order (MAR's `mask_by_order` / `random_masking`).
    ///
    /// # Panics
    /// If the orders have different lengths or `n_hidden` exceeds their length (a bug in the caller).
    pub fn from_orders(orders: &[Vec<usize>], n_hidden: usize) -> TokenMask {
        let seq_len = orders.first().map_or(0, Vec::len);
        assert!(
            orders.iter().all(|o| o.len() == seq_len) && n_hidden <= seq_len,
            "orders of one length, at most that many hidden tokens"
        );
        let mut hidden = vec![false; orders.len() * seq_len];
        for (i, order) in orders.iter().enumerate() {
            for &p in &order[..n_hidden] {
                hidden[i * seq_len + p] = true;
            }
        }
        TokenMask {
            batch: orders.len(),
            seq_len,
            hidden,
            hidden_per_sample: n_hidden,
        }
    }

    /// Tokens each sample keeps.
    pub fn kept_per_sample(&self) -> usize {
        self.seq_len - self.hidden_per_sample
    }

    /// Rows of the flattened `[batch * (buffer + seq_len)]` encoder input that the encoder keeps:
    /// per sample its `buffer` slots, then its visible tokens in position order.
    pub fn kept_rows(&self, buffer: usize) -> Vec<i64> {
        let full = buffer + self.seq_len;
        let mut rows = Vec::with_capacity(self.batch * (buffer + self.kept_per_sample()));
        for i in 0..self.batch {
            rows.extend((0..buffer).map(|j| (i * full + j) as i64));
            rows.extend(
                (0..self.seq_len)
                    .filter(|&p| !self.hidden[i * self.seq_len + p])
                    .map(|p| (i * full + buffer + p) as i64),
            );
        }
        rows
    }

    /// For every row of the flattened `[batch * (buffer + seq_len)]` decoder input, the row of
    /// `[encoder outputs (batch * kept); mask token]` it takes: a kept position takes its encoder
    /// output, a hidden one the mask token (the last row, `batch * kept`).
    pub fn pad_rows(&self, buffer: usize) -> Vec<i64> {
        let kept = buffer + self.kept_per_sample();
        let mask_row = (self.batch * kept) as i64;
        let mut rows = Vec::with_capacity(self.batch * (buffer + self.seq_len));
        for i in 0..self.batch {
            rows.extend((0..buffer).map(|j| (i * kept + j) as i64));
            let mut next = buffer;
            for p in 0..self.seq_len {
                if self.hidden[i * self.seq_len + p] {
                    rows.push(mask_row);
                } else {
                    rows.push((i * kept + next) as i64);
                    next += 1;
                }
            }
        }
        rows
    }

    /// Rows of the flattened `[batch * seq_len]` tokens that are hidden, by sample then position:
    /// the tokens the loss counts.
    pub fn hidden_rows(&self) -> Vec<i64> {
        (0..self.batch * self.seq_len)
            .filter(|&r| self.hidden[r])
            .map(|r| r as i64)
            .collect()
    }
}

/// One iteration of MAR's sampling loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplingStep {
    /// Tokens hidden before the iteration.
    pub hidden_before: usize,
    /// Tokens the iteration predicts (possibly 0 when `num_iter > seq_len`).
    pub predict: usize,
    /// MAR's `mask_len`: `floor(seq_len cos(pi/2 (s + 1) / num_iter))` clamped to
    /// `[1, hidden_before - 1]`. It is what the linear CFG schedule reads, also at the last
    /// iteration, where every remaining token is predicted regardless.
    pub mask_len: usize,
}

/// The whole sampling schedule of MAR's `sample_tokens` for `seq_len` tokens in `num_iter`
/// iterations (METHOD.md section 7).
///
/// Iteration `s` keeps `mask_len` tokens hidden (a prefix of the sample's order) and predicts the
/// others of the `hidden_before`; the last iteration predicts all that remain. Because hidden sets
/// are always prefixes of the order, the schedule is the same for every sample.
pub fn sampling_schedule(seq_len: usize, num_iter: usize) -> Vec<SamplingStep> {
    let mut hidden = seq_len;
    let mut steps = Vec::with_capacity(num_iter);
    for s in 0..num_iter {
        let ratio = (std::f64::consts::FRAC_PI_2 * (s + 1) as f64 / num_iter as f64).cos();
        let cosine = (seq_len as f64 * ratio).floor().max(0.0) as usize;
        // `max(1, min(hidden - 1, cosine))` as MAR computes it; with one hidden token left,
        // `hidden - 1` is 0 and the max makes it 1 again (the step then predicts nothing).
        let mask_len = cosine.min(hidden.saturating_sub(1)).max(1);
        let predict = if s + 1 == num_iter {
            hidden
        } else {
            hidden - mask_len.min(hidden)
        };
        steps.push(SamplingStep {
            hidden_before: hidden,
            predict,
            mask_len,
        });
        hidden -= predict;
    }
    steps
}

/// How the CFG scale changes over MAR's sampling iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CfgSchedule {
    /// `1 + (cfg - 1) (seq_len - mask_len) / seq_len` (Muse's, MAR's default).
    Linear,
    /// `cfg` at every iteration.
    Constant,
}

impl CfgSchedule {
    /// The guidance scale of an iteration whose `mask_len` is `mask_len` (see [`SamplingStep`]).
    pub fn scale(self, cfg: f32, mask_len: usize, seq_len: usize) -> f32 {
        match self {
            CfgSchedule::Linear => {
                1.0 + (cfg - 1.0) * (seq_len as f32 - mask_len as f32) / seq_len as f32
            }
            CfgSchedule::Constant => cfg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    #[test]
    fn truncated_normal_has_the_right_mean_and_support() {
        let mut rng = rng_for(0, Stream::Mask, 0);
        let n = 200_000;
        let draws: Vec<f64> = (0..n).map(|_| mask_ratio(&mut rng, 0.7)).collect();
        assert!(draws.iter().all(|&r| (0.7..=1.0).contains(&r)));
        let mean = draws.iter().sum::<f64>() / n as f64;
        // 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)) = 0.8670.
        assert!((mean - 0.867).abs() < 0.01, "mean {mean}");
        // The density rises towards 1: more draws above 0.85 than below.
        let high = draws.iter().filter(|&&r| r > 0.85).count();
        assert!(high > n / 2, "{high}");
        assert_eq!(mask_ratio(&mut rng, 1.0), 1.0);
    }

    #[test]
    fn masked_count_is_the_ceiling() {
        assert_eq!(masked_count(64, 0.7), 45);
        assert_eq!(masked_count(64, 1.0), 64);
        assert_eq!(masked_count(64, 0.875), 56);
        assert_eq!(masked_count(64, 0.8751), 57);
    }

    #[test]
    fn schedules_predict_every_token_once() {
        for (seq_len, num_iter) in [(64, 64), (64, 16), (64, 1), (64, 100), (16, 4), (1, 3)] {
            let steps = sampling_schedule(seq_len, num_iter);
            assert_eq!(steps.len(), num_iter);
            let total: usize = steps.iter().map(|s| s.predict).sum();
            assert_eq!(total, seq_len, "{seq_len} tokens in {num_iter}");
            assert_eq!(steps[0].hidden_before, seq_len);
            for w in steps.windows(2) {
                assert_eq!(w[1].hidden_before, w[0].hidden_before - w[0].predict);
            }
            if num_iter <= seq_len {
                assert!(steps.iter().all(|s| s.predict >= 1), "{steps:?}");
            }
        }
        // 64 iterations: one token each.
        assert!(sampling_schedule(64, 64).iter().all(|s| s.predict == 1));
        // 16 iterations: MAR's counts, from a slow start to the bulk at the end.
        let counts: Vec<usize> = sampling_schedule(64, 16)
            .iter()
            .map(|s| s.predict)
            .collect();
        assert_eq!(
            counts,
            vec![1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6],
            "{counts:?}"
        );
        // The last iteration predicts what remains even though its mask_len is 1.
        let last = *sampling_schedule(64, 16).last().unwrap();
        assert_eq!((last.mask_len, last.predict), (1, 6));
    }

    #[test]
    fn linear_cfg_follows_mask_len() {
        let s = CfgSchedule::Linear;
        assert_eq!(s.scale(3.0, 64, 64), 1.0);
        assert_eq!(s.scale(3.0, 0, 64), 3.0);
        assert!((s.scale(2.9, 48, 64) - (1.0 + 1.9 * 16.0 / 64.0)).abs() < 1e-6);
        assert_eq!(CfgSchedule::Constant.scale(2.9, 48, 64), 2.9);
        // Over 64 iterations the scale climbs from 1 + (cfg - 1)/64 to 1 + (cfg - 1) 63/64.
        let steps = sampling_schedule(64, 64);
        let first = s.scale(2.0, steps[0].mask_len, 64);
        let last = s.scale(2.0, steps[63].mask_len, 64);
        assert!((first - (1.0 + 1.0 / 64.0)).abs() < 1e-6, "{first}");
        assert!((last - (1.0 + 63.0 / 64.0)).abs() < 1e-6, "{last}");
    }

    #[test]
    fn masks_rows_and_padding_agree() {
        let orders = vec![vec![2, 0, 3, 1], vec![1, 3, 0, 2]];
        let m = TokenMask::from_orders(&orders, 2);
        assert_eq!(
            m.hidden,
            vec![true, false, true, false, false, true, false, true]
        );
        // Buffer 1: sample 0 keeps [buf, tok 1, tok 3], sample 1 [buf, tok 0, tok 2].
        assert_eq!(m.kept_rows(1), vec![0, 2, 4, 5, 6, 8]);
        // Decoder rows: 6 encoder rows, then the mask token at row 6.
        assert_eq!(m.pad_rows(1), vec![0, 6, 1, 6, 2, 3, 4, 6, 5, 6]);
        assert_eq!(m.hidden_rows(), vec![0, 2, 5, 7]);
        let mut rng = rng_for(1, Stream::Mask, 0);
        let o = random_order(&mut rng, 64);
        let mut sorted = o.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..64).collect::<Vec<_>>());
    }
}
