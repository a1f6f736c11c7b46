//! Inception Score (Salimans et al. 2016) as torch-fidelity computes it (METHOD.md section 8), streamed:
//! memory holds one class histogram per split, not the logits of every image.

use serde::{Deserialize, Serialize};

use super::numpy_rng::RandomState;
use crate::error::{Error, Result};

/// An Inception Score over splits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InceptionScore {
    /// The mean of the splits' scores.
    pub mean: f64,
    /// Their standard deviation (population, numpy's `std`).
    pub std: f64,
    pub splits: usize,
}

/// Accumulates the Inception Score of `n` images whose logits arrive in order, batch by batch.
///
/// For the rows of one split, with `p_i = softmax(logits_i)` in f64 and `q` the mean of the `p_i`:
///
/// `IS = exp(mean_i KL(p_i || q)) = exp(mean_i sum_c p_ic log p_ic - sum_c q_c log q_c)`
///
/// (the second form is what is accumulated). torch-fidelity first shuffles the rows with
/// `numpy.random.RandomState(seed).permutation(n)` and splits the shuffled order into `splits`
/// consecutive parts (`[s n / splits, (s + 1) n / splits)`); the split of each row is known from the
/// start, so the same split membership is kept here without storing the rows.
#[derive(Debug, Clone)]
pub struct IsAccumulator {
    classes: usize,
    /// The split of every row, in arrival order.
    split_of_row: Vec<usize>,
    /// Per split: the sum of `p` over its rows.
    sum_p: Vec<Vec<f64>>,
    /// Per split: the sum over its rows of `sum_c p_c log p_c`.
    sum_p_log_p: Vec<f64>,
    rows: Vec<usize>,
    seen: usize,
}

impl IsAccumulator {
    /// For `n` images of `classes` logits each, `splits` splits; `shuffle_seed` as torch-fidelity's
    /// `samples_shuffle` / `rng_seed` (`Some(2020)` by default), `None` for splits in arrival order.
    pub fn new(
        n: usize,
        classes: usize,
        splits: usize,
        shuffle_seed: Option<u32>,
    ) -> Result<IsAccumulator> {
        if splits == 0 || n < splits {
            return Err(Error::Metric(format!(
                "the Inception Score needs at least one image per split: {n} images, {splits} splits"
            )));
        }
        let order: Vec<usize> = match shuffle_seed {
            Some(seed) => RandomState::new(seed).permutation(n),
            None => (0..n).collect(),
        };
        let mut split_of_row = vec![0; n];
        for s in 0..splits {
            for &row in &order[s * n / splits..(s + 1) * n / splits] {
                split_of_row[row] = s;
            }
        }
        Ok(IsAccumulator {
            classes,
            split_of_row,
            sum_p: vec![vec![0.0; classes]; splits],
            sum_p_log_p: vec![0.0; splits],
            rows: vec![0; splits],
            seen: 0,
        })
    }

    /// Adds the next rows of logits (row-major `[batch, classes]`).
    ///
    /// # Panics
    /// When more rows arrive than announced, or a row is not `classes` long.
    pub fn add(&mut self, logits: &[f32]) {
        assert_eq!(
            logits.len() % self.classes,
            0,
            "rows of {} logits",
            self.classes
        );
        for row in logits.chunks_exact(self.classes) {
            let s = self.split_of_row[self.seen];
            self.seen += 1;
            // log_softmax in f64 around the maximum, as torch does.
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let log_z = max
                + row
                    .iter()
                    .map(|&v| (f64::from(v) - max).exp())
                    .sum::<f64>()
                    .ln();
            let mut p_log_p = 0.0;
            for (acc, &v) in self.sum_p[s].iter_mut().zip(row) {
                let log_p = f64::from(v) - log_z;
                let p = log_p.exp();
                *acc += p;
                p_log_p += p * log_p;
            }
            self.sum_p_log_p[s] += p_log_p;
            self.rows[s] += 1;
        }
    }

    /// The score, once every announced row was added.
    pub fn finish(self) -> Result<InceptionScore> {
        if self.seen != self.split_of_row.len() {
            return Err(Error::Numeric(format!(
                "Inception Score: {} of {} images were scored",
                self.seen,
                self.split_of_row.len()
            )));
        }
        let scores: Vec<f64> = (0..self.rows.len())
            .map(|s| {
                let n = self.rows[s] as f64;
                // A class no row gives mass contributes q log q = 0 (its p log(p / q) terms are 0).
                let q_log_q: f64 = self.sum_p[s]
                    .iter()
                    .map(|&sp| sp / n)
                    .filter(|&q| q > 0.0)
                    .map(|q| q * q.ln())
                    .sum();
                (self.sum_p_log_p[s] / n - q_log_q).exp()
            })
            .collect();
        let k = scores.len() as f64;
        let mean = scores.iter().sum::<f64>() / k;
        if !mean.is_finite() {
            return Err(Error::Numeric(
                "the Inception Score is not finite: the logits hold NaN or inf; check the network weights"
                    .into(),
            ));
        }
        let std = (scores.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / k).sqrt();
        Ok(InceptionScore {
            mean,
            std,
            splits: scores.len(),
        })
    }
}

/// The Inception Score of row-major logits `[n, classes]` (see [`IsAccumulator`]).
pub fn inception_score(
    logits: &[f32],
    classes: usize,
    splits: usize,
    shuffle_seed: Option<u32>,
) -> Result<InceptionScore> {
    let mut acc = IsAccumulator::new(logits.len() / classes, classes, splits, shuffle_seed)?;
    acc.add(logits);
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IS from its definition: explicit softmax, q, KL per row, exp of the mean, over the splits of
    /// a given order.
    fn direct(logits: &[Vec<f64>], order: &[usize], splits: usize) -> (f64, f64) {
        let n = order.len();
        let p: Vec<Vec<f64>> = logits
            .iter()
            .map(|l| {
                let z: f64 = l.iter().map(|v| v.exp()).sum();
                l.iter().map(|v| v.exp() / z).collect()
            })
            .collect();
        let scores: Vec<f64> = (0..splits)
            .map(|s| {
                let rows: Vec<&Vec<f64>> = order[s * n / splits..(s + 1) * n / splits]
                    .iter()
                    .map(|&r| &p[r])
                    .collect();
                let c = rows[0].len();
                let q: Vec<f64> = (0..c)
                    .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64)
                    .collect();
                let kl: f64 = rows
                    .iter()
                    .map(|r| (0..c).map(|j| r[j] * (r[j] / q[j]).ln()).sum::<f64>())
                    .sum::<f64>()
                    / rows.len() as f64;
                kl.exp()
            })
            .collect();
        let mean = scores.iter().sum::<f64>() / splits as f64;
        let std = (scores.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / splits as f64).sqrt();
        (mean, std)
    }

    #[test]
    fn uniform_logits_score_one() {
        let logits = vec![0.5f32; 20 * 7];
        let is = inception_score(&logits, 7, 4, Some(2020)).unwrap();
        assert!((is.mean - 1.0).abs() < 1e-12 && is.std < 1e-12, "{is:?}");
    }

    #[test]
    fn confident_distinct_classes_score_their_number() {
        // 40 images, one-hot-like over 8 classes (logit 60 against 0: p = 1 - 7e-26), each class
        // equally often in every split.
        let (n, c) = (40, 8);
        let mut logits = vec![0.0f32; n * c];
        for i in 0..n {
            logits[i * c + i % c] = 60.0;
        }
        let is = inception_score(&logits, c, 5, None).unwrap();
        assert!((is.mean - c as f64).abs() < 1e-9, "{is:?}");
        // Shuffled splits hold unequal class counts: still at most the number of classes.
        let shuffled = inception_score(&logits, c, 5, Some(2020)).unwrap();
        assert!(
            shuffled.mean <= c as f64 + 1e-9 && shuffled.mean > 4.0,
            "{shuffled:?}"
        );
    }

    #[test]
    fn streamed_score_equals_the_definition_on_torch_fidelitys_splits() {
        let (n, c, splits) = (37, 11, 4);
        let logits: Vec<f32> = (0..n * c)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let rows: Vec<Vec<f64>> = logits
            .chunks(c)
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let order = RandomState::new(2020).permutation(n);
        let (mean, std) = direct(&rows, &order, splits);
        // Arriving in uneven batches.
        let mut acc = IsAccumulator::new(n, c, splits, Some(2020)).unwrap();
        for chunk in logits.chunks(5 * c) {
            acc.add(chunk);
        }
        let got = acc.finish().unwrap();
        assert!((got.mean - mean).abs() < 1e-12 * mean, "{got:?} vs {mean}");
        assert!((got.std - std).abs() < 1e-10, "{got:?} vs {std}");
        let err = IsAccumulator::new(3, c, 10, None).unwrap_err().to_string();
        assert!(err.contains("3 images, 10 splits"), "{err}");
        let mut short = IsAccumulator::new(n, c, splits, None).unwrap();
        short.add(&logits[..c]);
        assert!(short.finish().is_err());
    }
}
