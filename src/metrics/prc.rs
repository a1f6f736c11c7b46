//! Improved precision and recall (Kynkäänniemi et al. 2019) as torch-fidelity computes them (METHOD.md
//! section 8): k-nearest-neighbour balls on pool3 features.

use nalgebra::DMatrix;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Precision, recall and their F-score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrecisionRecall {
    /// The share of generated images inside the reference manifold.
    pub precision: f64,
    /// The share of reference images inside the generated manifold.
    pub recall: f64,
    /// `2 P R / max(1e-5, P + R)`.
    pub f_score: f64,
    /// k, the neighbour whose distance is a ball's radius.
    pub neighbourhood: usize,
}

/// Rows per block of the distance computations: a block pair is a `[1024, 1024]` f64 product.
const BLOCK: usize = 1024;

/// A row-major `[n, d]` f32 table, handed out as f64 column blocks with their squared norms.
struct Table<'a> {
    rows: &'a [f32],
    d: usize,
}

impl Table<'_> {
    fn len(&self) -> usize {
        self.rows.len() / self.d
    }

    /// Rows `start..end` as `[d, end - start]` f64 and their squared norms.
    fn block(&self, start: usize, end: usize) -> (DMatrix<f64>, Vec<f64>) {
        let m = DMatrix::from_iterator(
            self.d,
            end - start,
            self.rows[start * self.d..end * self.d]
                .iter()
                .map(|&v| f64::from(v)),
        );
        let norms = m.column_iter().map(|c| c.norm_squared()).collect();
        (m, norms)
    }

    /// Calls `each(i, j, d²)` for every row `i` of `self` against every row `j` of `other`, in blocks
    /// of rows of `self` in parallel; `each` gets one block's state `S` from `init` and returns them
    /// in order.
    fn pairwise<S: Send>(
        &self,
        other: &Table,
        init: impl Fn(usize) -> S + Sync,
        each: impl Fn(&mut S, usize, usize, f64) + Sync,
    ) -> Vec<S> {
        let starts: Vec<usize> = (0..self.len()).step_by(BLOCK).collect();
        starts
            .par_iter()
            .map(|&s| {
                let e = (s + BLOCK).min(self.len());
                let (a, na) = self.block(s, e);
                // Transposed once per block: the product then goes through matrixmultiply's dgemm.
                let at = a.transpose(); // [e - s, d]
                let mut state = init(e - s);
                for t in (0..other.len()).step_by(BLOCK) {
                    let f = (t + BLOCK).min(other.len());
                    let (b, nb) = other.block(t, f);
                    let dots = &at * &b; // [e - s, f - t]
                    for i in 0..e - s {
                        for j in 0..f - t {
                            // |a - b|² from the Gram matrix, in f64: no cancellation worth the name
                            // at pool3 scale (|a|² ~ 1e3).
                            let d2 = (na[i] + nb[j] - 2.0 * dots[(i, j)]).max(0.0);
                            each(&mut state, i, t + j, d2);
                        }
                    }
                }
                state
            })
            .collect()
    }

    /// The squared distance of every row to its k-th nearest neighbour in the same set, itself
    /// counting as the 0-th (torch-fidelity's `kthvalue(k + 1)` over a row of `cdist` that includes
    /// the row's zero distance to itself).
    fn knn_radii(&self, k: usize) -> Vec<f64> {
        let blocks = self.pairwise(
            self,
            |n| vec![([f64::INFINITY; 8], 0usize); n],
            |state, i, _j, d2| {
                // The k + 1 smallest so far, sorted, in a fixed array (k <= 7).
                let (best, len) = &mut state[i];
                let cap = k + 1;
                if *len < cap || d2 < best[*len - 1] {
                    let mut p = if *len < cap { *len } else { *len - 1 };
                    while p > 0 && best[p - 1] > d2 {
                        best[p] = best[p - 1];
                        p -= 1;
                    }
                    best[p] = d2;
                    if *len < cap {
                        *len += 1;
                    }
                }
            },
        );
        blocks
            .into_iter()
            .flatten()
            .map(|(best, _)| best[k])
            .collect()
    }

    /// The share of rows of `self` within the ball (radius² `radii`) of some row of `other`.
    fn share_covered(&self, other: &Table, radii: &[f64]) -> f64 {
        let blocks = self.pairwise(
            other,
            |n| vec![false; n],
            |inside, i, j, d2| inside[i] |= d2 <= radii[j],
        );
        let covered = blocks.iter().flatten().filter(|&&b| b).count();
        covered as f64 / self.len() as f64
    }
}

/// Precision and recall of `generated` (row-major `[n1, d]`) against `reference` (`[n2, d]`) with
/// k-NN balls (torch-fidelity's `prc_neighborhood`, 3 by default):
///
/// - `r_k(x; S)`: the distance from `x` to its k-th nearest neighbour in its own set `S` (`x` itself
///   is the 0-th);
/// - precision = `mean_{g in G} [exists r in R: |g - r| <= r_k(r; R)]`;
/// - recall = `mean_{r in R} [exists g in G: |r - g| <= r_k(g; G)]`;
/// - F-score = `2 P R / max(1e-5, P + R)`.
///
/// Distances are Euclidean, in f64 from the f32 features (torch-fidelity: `torch.cdist` in f32), so
/// a point within f32 rounding of a ball's edge may count differently.
///
/// Cost: `(n1² + n2² + 2 n1 n2) d` multiply-adds in f64, in `1024 x 1024` blocks over the cores:
/// 14-22 s for 5,000 vs 5,000 rows on 2 CPU cores, so 8-13 minutes for 50,000 generated against
/// 10,000 reference images.
pub fn precision_recall(
    generated: &[f32],
    reference: &[f32],
    d: usize,
    k: usize,
) -> Result<PrecisionRecall> {
    assert!(
        d > 0 && generated.len().is_multiple_of(d) && reference.len().is_multiple_of(d),
        "rows of {d} values"
    );
    let (g, r) = (Table { rows: generated, d }, Table { rows: reference, d });
    if !(1..=7).contains(&k) || g.len() <= k || r.len() <= k {
        return Err(Error::Metric(format!(
            "precision/recall with k = {k} (1 to 7) needs more than k images per set; got {} generated and {} reference images",
            g.len(),
            r.len()
        )));
    }
    if generated.iter().chain(reference).any(|v| !v.is_finite()) {
        return Err(Error::Numeric(
            "precision/recall: the features hold NaN or inf; check the network weights".into(),
        ));
    }
    let (radii_g, radii_r) = (g.knn_radii(k), r.knn_radii(k));
    let precision = g.share_covered(&r, &radii_r);
    let recall = r.share_covered(&g, &radii_g);
    Ok(PrecisionRecall {
        precision,
        recall,
        f_score: 2.0 * precision * recall / (precision + recall).max(1e-5),
        neighbourhood: k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::path::normal_rows;
    use crate::rng::{Stream, rng_for};

    fn gaussian(n: usize, d: usize, seed: u64, shift: f32) -> Vec<f32> {
        normal_rows(&mut rng_for(seed, Stream::Reference, 0), n, d)
            .into_iter()
            .map(|v| v + shift)
            .collect()
    }

    /// The definition with explicit sorts, for any sizes.
    fn direct(g: &[f32], r: &[f32], d: usize, k: usize) -> (f64, f64) {
        let rows = |t: &[f32]| -> Vec<Vec<f64>> {
            t.chunks(d)
                .map(|c| c.iter().map(|&v| f64::from(v)).collect())
                .collect()
        };
        let (g, r) = (rows(g), rows(r));
        let dist = |a: &[f64], b: &[f64]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let radius = |set: &[Vec<f64>], x: &[f64]| -> f64 {
            let mut ds: Vec<f64> = set.iter().map(|y| dist(x, y)).collect();
            ds.sort_by(f64::total_cmp);
            ds[k]
        };
        let rg: Vec<f64> = g.iter().map(|x| radius(&g, x)).collect();
        let rr: Vec<f64> = r.iter().map(|x| radius(&r, x)).collect();
        let share = |from: &[Vec<f64>], to: &[Vec<f64>], radii: &[f64]| -> f64 {
            from.iter()
                .filter(|x| to.iter().zip(radii).any(|(y, &rad)| dist(x, y) <= rad))
                .count() as f64
                / from.len() as f64
        };
        (share(&g, &r, &rr), share(&r, &g, &rg))
    }

    #[test]
    fn identical_sets_give_one_and_far_sets_zero() {
        let d = 6;
        let a = gaussian(50, d, 1, 0.0);
        let same = precision_recall(&a, &a, d, 3).unwrap();
        assert_eq!((same.precision, same.recall, same.f_score), (1.0, 1.0, 1.0));
        let far = precision_recall(&a, &gaussian(40, d, 2, 100.0), d, 3).unwrap();
        assert_eq!((far.precision, far.recall, far.f_score), (0.0, 0.0, 0.0));
    }

    #[test]
    fn shares_equal_the_definition_across_blocks() {
        // Over one block on each side, so the blocked k-NN merge and the block offsets are exercised.
        let d = 5;
        let g = gaussian(BLOCK + 37, d, 3, 0.4);
        let r = gaussian(300, d, 4, 0.0);
        let got = precision_recall(&g, &r, d, 3).unwrap();
        let (p, rc) = direct(&g, &r, d, 3);
        assert_eq!((got.precision, got.recall), (p, rc));
        assert!(p > 0.2 && p < 0.99 && rc > 0.2 && rc < 0.99, "{p} {rc}");
        // A narrow generator: high precision, low recall.
        let narrow: Vec<f32> = gaussian(200, d, 5, 0.0).iter().map(|v| v * 0.3).collect();
        let nr = precision_recall(&narrow, &r, d, 3).unwrap();
        assert!(nr.precision > 0.9 && nr.recall < 0.5, "{nr:?}");
        let (p, rc) = direct(&narrow, &r, d, 1);
        let k1 = precision_recall(&narrow, &r, d, 1).unwrap();
        assert_eq!((k1.precision, k1.recall), (p, rc));
    }

    #[test]
    fn too_few_rows_are_refused() {
        let d = 3;
        let a = gaussian(3, d, 6, 0.0);
        let err = precision_recall(&a, &a, d, 3).unwrap_err().to_string();
        assert!(err.contains("more than k images"), "{err}");
    }
}
