//! The Fréchet distance between two sets of feature vectors (FID, Heusel et al. 2017): streamed f64
//! statistics and the distance of the two fitted Gaussians (METHOD.md section 8; also the rFID of
//! the autoencoder).
//!
//! FID is biased upwards for small sets (the bias shrinks roughly like 1/n): rFID on fewer than about
//! 10,000 images is higher than the 50,000-image number papers report, and only comparable with
//! another rFID on the same number of images.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::error::{Error, Result};

/// Running mean and scatter matrix of `dim`-dimensional rows, merged batch by batch in f64 (Chan,
/// Golub and LeVeque's pairwise update), so memory is `dim x dim` whatever the number of rows (plus
/// the rows themselves while there are at most `dim` of them, for [`fid`]'s low-rank route).
#[derive(Debug, Clone)]
pub struct FeatureStats {
    count: usize,
    mean: DVector<f64>,
    /// Sum over rows of `(x - mean)(x - mean)^T`.
    scatter: DMatrix<f64>,
    /// Every row, while there are at most `dim`; empty after.
    rows: Vec<f32>,
}

impl FeatureStats {
    /// Empty statistics of `dim`-dimensional rows.
    pub fn new(dim: usize) -> FeatureStats {
        FeatureStats {
            count: 0,
            mean: DVector::zeros(dim),
            scatter: DMatrix::zeros(dim, dim),
            rows: Vec::new(),
        }
    }

    /// Adds the rows of `rows` (`[n, dim]`, row-major).
    pub fn add(&mut self, rows: &[f32]) {
        let dim = self.mean.len();
        assert_eq!(rows.len() % dim, 0, "rows of {dim} values");
        let n_b = rows.len() / dim;
        if n_b == 0 {
            return;
        }
        // Column-major [dim, n_b]: one column per row of `rows`.
        let mut x = DMatrix::from_iterator(dim, n_b, rows.iter().map(|&v| f64::from(v)));
        let mean_b = x.column_mean();
        for mut col in x.column_iter_mut() {
            col -= &mean_b;
        }
        let scatter_b = &x * x.transpose(); // [dim, dim]
        let (n_a, n_b) = (self.count as f64, n_b as f64);
        let n = n_a + n_b;
        let delta = &mean_b - &self.mean;
        self.scatter += scatter_b;
        self.scatter.ger(n_a * n_b / n, &delta, &delta, 1.0);
        self.mean += delta * (n_b / n);
        self.count += n_b as usize;
        if self.count <= dim {
            self.rows.extend_from_slice(rows);
        } else {
            self.rows = Vec::new();
        }
    }

    /// The number of rows added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean row.
    pub fn mean(&self) -> &DVector<f64> {
        &self.mean
    }

    /// The unbiased covariance (divided by n - 1, as numpy's `cov`); `None` below 2 rows.
    pub fn covariance(&self) -> Option<DMatrix<f64>> {
        (self.count >= 2).then(|| &self.scatter / (self.count - 1) as f64)
    }
}

/// The FID of two feature sets: [`frechet_distance`] of their means and covariances. Each set needs
/// at least 2 rows.
///
/// When a set has no more rows than dimensions (e.g. rFID on fewer than 2049 images), its
/// covariance is `X^T X / (n - 1)` with `X` its centred rows (`n x d`), and the non-zero eigenvalues
/// of `s1 s2` are those of the `n x n` matrix `X s2 X^T / (n - 1)`: the same value without a
/// `d x d` eigen-decomposition.
pub fn fid(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    let (Some(s1), Some(s2)) = (a.covariance(), b.covariance()) else {
        return Err(Error::Numeric(format!(
            "FID needs at least 2 images per set, got {} and {}",
            a.count, b.count
        )));
    };
    // The trace term is symmetric in the two sets: take the one that kept its rows.
    if b.rows.is_empty() || !a.rows.is_empty() {
        fid_with_covariance(a, s1, &b.mean, &s2)
    } else {
        fid_with_covariance(b, s2, &a.mean, &s1)
    }
}

/// The FID of a feature set against given moments (e.g. ADM's reference `mu`/`sigma`), by the
/// low-rank route of [`fid`] while the set has at most `dim` rows. The set needs at least 2 rows.
pub fn fid_to_moments(a: &FeatureStats, mu: &DVector<f64>, sigma: &DMatrix<f64>) -> Result<f64> {
    let Some(s1) = a.covariance() else {
        return Err(Error::Metric(format!(
            "FID needs at least 2 images, got {}",
            a.count
        )));
    };
    fid_with_covariance(a, s1, mu, sigma)
}

/// FID of `set` (covariance `s1`) against `N(mu2, s2)`.
fn fid_with_covariance(
    set: &FeatureStats,
    s1: DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> Result<f64> {
    if set.rows.is_empty() {
        return frechet_distance(&set.mean, &s1, mu2, s2);
    }
    check_finite(&set.mean, &s1, mu2, s2)?;
    let d = set.mean.len();
    let mut x = DMatrix::from_iterator(d, set.count, set.rows.iter().map(|&v| f64::from(v)));
    for mut col in x.column_iter_mut() {
        col -= &set.mean;
    }
    let m = symmetric(&(x.transpose() * s2 * &x)) / (set.count - 1) as f64; // [n, n]
    let vals = m.symmetric_eigenvalues();
    let tol = rounding_level(&vals);
    let tr_covmean: f64 = vals.iter().filter(|&&l| l > tol).map(|l| l.sqrt()).sum();
    Ok((&set.mean - mu2).norm_squared() + s1.trace() + s2.trace() - 2.0 * tr_covmean)
}

/// Refuses non-finite statistics (a broken network), which would also stall the eigen-solver.
fn check_finite(
    mu1: &DVector<f64>,
    s1: &DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> Result<()> {
    let finite = |m: &[f64]| m.iter().all(|v| v.is_finite());
    if finite(mu1.as_slice())
        && finite(mu2.as_slice())
        && finite(s1.as_slice())
        && finite(s2.as_slice())
    {
        Ok(())
    } else {
        Err(Error::Numeric(
            "the feature statistics are not finite (NaN or inf); check the network weights".into(),
        ))
    }
}

/// The diagonal offset pytorch-fid adds to both covariances when the square root fails.
const OFFSET: f64 = 1e-6;

/// The squared Fréchet (2-Wasserstein) distance between `N(mu1, s1)` and `N(mu2, s2)`:
/// `|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))`.
///
/// The trace term is computed in symmetric form: with `A = s1^(1/2)` (symmetric eigen-decomposition,
/// eigenvalues at the rounding level or below, negative ones included, clamped to 0), `s1 s2 =
/// A (A s2)` has the eigenvalues of `A s2 A`, which is symmetric positive semi-definite, so
/// `tr((s1 s2)^(1/2))` is the sum of the square roots of its eigenvalues. This holds for singular
/// covariances too (fewer rows than dimensions, as in any rFID on under 2049 images), where a general
/// square root of the non-symmetric `s1 s2` (scipy's `sqrtm` in pytorch-fid) is ill-conditioned and
/// returns small imaginary parts. Only if the eigen-decomposition does not converge is `1e-6 I` added
/// to both covariances and the computation repeated, as pytorch-fid does when its square root is not
/// finite; a warning says so.
///
/// Cost: one `d x d` eigen-decomposition with vectors and one without (about 10 s at d = 2048 on
/// one CPU core); the result may be a rounding-sized negative number for equal inputs.
pub fn frechet_distance(
    mu1: &DVector<f64>,
    s1: &DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> Result<f64> {
    let d = mu1.len();
    assert!(
        mu2.len() == d && s1.shape() == (d, d) && s2.shape() == (d, d),
        "Fréchet distance of mismatched shapes"
    );
    check_finite(mu1, s1, mu2, s2)?;
    let mean_term = (mu1 - mu2).norm_squared();
    let tr_covmean = match trace_sqrt_product(s1, s2) {
        Some(t) => t,
        None => {
            tracing::warn!(
                "FID: the eigen-decomposition did not converge; adding {OFFSET:e} to the diagonal of both covariances"
            );
            let offset = DMatrix::<f64>::identity(d, d) * OFFSET;
            trace_sqrt_product(&(s1 + &offset), &(s2 + &offset)).ok_or_else(|| {
                Error::Numeric(
                    "FID: the eigen-decomposition of the covariances did not converge".into(),
                )
            })?
        }
    };
    Ok(mean_term + s1.trace() + s2.trace() - 2.0 * tr_covmean)
}

/// `tr((s1 s2)^(1/2))` for symmetric positive semi-definite `s1`, `s2`; `None` when the
/// eigen-decomposition of `s1` does not converge.
///
/// Only the range of `s1` matters: with `s1 = V L V^T` restricted to its `r` eigenvalues above the
/// rounding level and `B = V_r L_r^(1/2)` (`d x r`), the non-zero eigenvalues of `s1 s2` are those of
/// the `r x r` matrix `B^T s2 B`; for covariances of fewer rows than dimensions that matrix is small.
fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> Option<f64> {
    let d = s1.nrows();
    let eig = SymmetricEigen::try_new(symmetric(s1), f64::EPSILON, 100 * d.max(10))?;
    let tol = rounding_level(&eig.eigenvalues);
    let kept: Vec<usize> = (0..d).filter(|&i| eig.eigenvalues[i] > tol).collect();
    if kept.is_empty() {
        return Some(0.0);
    }
    let b = DMatrix::from_fn(d, kept.len(), |i, k| {
        eig.eigenvectors[(i, kept[k])] * eig.eigenvalues[kept[k]].sqrt()
    });
    let m = symmetric(&(b.transpose() * s2 * &b)); // [r, r]
    // Finite (checked by the caller) and symmetric: the implicit QR iteration converges.
    let vals = m.symmetric_eigenvalues();
    let tol = rounding_level(&vals);
    Some(vals.iter().filter(|&&l| l > tol).map(|l| l.sqrt()).sum())
}

/// Eigenvalues of a positive semi-definite matrix at or below `d eps max|lambda|` (negative ones
/// included) are rounding noise and count as 0: the square root would otherwise turn noise of
/// ~1e-16 into ~1e-8 per eigenvalue, thousands of times over for a rank-deficient 2048-d covariance.
fn rounding_level(vals: &DVector<f64>) -> f64 {
    vals.len() as f64 * f64::EPSILON * vals.amax()
}

/// `(m + m^T) / 2`: removes rounding asymmetry before a symmetric eigen-decomposition.
fn symmetric(m: &DMatrix<f64>) -> DMatrix<f64> {
    (m + m.transpose()) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::path::normal_rows;
    use crate::rng::{Stream, rng_for};

    /// `n` rows of `d` correlated Gaussian values (a fixed random mixing of standard normals).
    fn correlated(n: usize, d: usize, seed: u64, shift: f32) -> Vec<f32> {
        let z = normal_rows(&mut rng_for(seed, Stream::Reference, 0), n, d);
        let mix = normal_rows(&mut rng_for(99, Stream::Reference, 1), d, d);
        (0..n)
            .flat_map(|r| {
                let (z, mix) = (&z, &mix);
                (0..d).map(move |j| {
                    (0..d).map(|k| z[r * d + k] * mix[k * d + j]).sum::<f32>() / (d as f32).sqrt()
                        + shift
                })
            })
            .collect()
    }

    #[test]
    fn streamed_statistics_equal_the_two_pass_ones() {
        let (n, d) = (37, 5);
        let rows = correlated(n, d, 1, 0.5);
        let mut stats = FeatureStats::new(d);
        for chunk in rows.chunks(7 * d) {
            stats.add(chunk);
        }
        assert_eq!(stats.count(), n);
        let x = DMatrix::from_row_slice(n, d, &rows.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let mean = x.row_mean().transpose();
        let mut cov = DMatrix::zeros(d, d);
        for r in 0..n {
            let c = x.row(r).transpose() - &mean;
            cov += &c * c.transpose();
        }
        cov /= (n - 1) as f64;
        assert!((stats.mean() - mean).amax() < 1e-12);
        assert!((stats.covariance().unwrap() - cov).amax() < 1e-12);
        assert!(FeatureStats::new(3).covariance().is_none());
    }

    #[test]
    fn fid_of_a_set_with_itself_is_zero() {
        let d = 16;
        let mut a = FeatureStats::new(d);
        a.add(&correlated(200, d, 2, 0.3));
        let f = fid(&a, &a).unwrap();
        assert!(f.abs() < 1e-9, "{f}");
        // Fewer rows than dimensions: singular covariances.
        let mut few = FeatureStats::new(d);
        few.add(&correlated(5, d, 3, 0.3));
        let f = fid(&few, &few).unwrap();
        assert!(f.abs() < 1e-9, "{f}");
        let err = fid(&FeatureStats::new(d), &a).unwrap_err().to_string();
        assert!(err.contains("at least 2"), "{err}");
    }

    #[test]
    fn diagonal_gaussians_match_the_closed_form() {
        let mu1 = DVector::from_vec(vec![0.0, 1.0, -2.0, 0.5]);
        let mu2 = DVector::from_vec(vec![1.0, 1.0, 0.0, -0.5]);
        let v1: [f64; 4] = [1.0, 4.0, 0.25, 2.0];
        let v2: [f64; 4] = [9.0, 1.0, 0.25, 0.0]; // A zero variance: a singular covariance.
        let s1 = DMatrix::from_diagonal(&DVector::from_row_slice(&v1));
        let s2 = DMatrix::from_diagonal(&DVector::from_row_slice(&v2));
        let want = (&mu1 - &mu2).norm_squared()
            + v1.iter()
                .zip(&v2)
                .map(|(a, b)| a + b - 2.0 * (a * b).sqrt())
                .sum::<f64>();
        let got = frechet_distance(&mu1, &s1, &mu2, &s2).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    /// `m^(1/2)` by the Denman–Beavers iteration (an algorithm independent of the eigen route).
    fn sqrtm_denman_beavers(m: &DMatrix<f64>) -> DMatrix<f64> {
        let (mut y, mut z) = (m.clone(), DMatrix::identity(m.nrows(), m.ncols()));
        for _ in 0..60 {
            let (yi, zi) = (
                y.clone().try_inverse().unwrap(),
                z.clone().try_inverse().unwrap(),
            );
            (y, z) = ((&y + zi) * 0.5, (&z + yi) * 0.5);
        }
        y
    }

    #[test]
    fn full_covariances_match_an_independent_square_root_and_are_symmetric() {
        let d = 6;
        let (mut a, mut b) = (FeatureStats::new(d), FeatureStats::new(d));
        a.add(&correlated(300, d, 4, 0.0));
        // A different mixing: scale and shift the rows.
        b.add(
            &correlated(300, d, 5, 0.0)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1.0 + (i % d) as f32 * 0.3) + 0.2)
                .collect::<Vec<_>>(),
        );
        let (s1, s2) = (a.covariance().unwrap(), b.covariance().unwrap());
        assert!(
            s1.iter()
                .enumerate()
                .any(|(i, v)| i % (d + 1) != 0 && v.abs() > 0.05)
        );
        // s1 s2 is not symmetric, but has positive eigenvalues, so Denman–Beavers converges to its
        // principal square root.
        let want = (a.mean() - b.mean()).norm_squared() + s1.trace() + s2.trace()
            - 2.0 * sqrtm_denman_beavers(&(&s1 * &s2)).trace();
        let ab = fid(&a, &b).unwrap();
        let ba = fid(&b, &a).unwrap();
        assert!((ab - want).abs() < 1e-9 * want, "{ab} vs {want}");
        assert!((ab - ba).abs() < 1e-9 * ab, "{ab} vs {ba}");
        assert!(ab > 0.1);
        // The 2 x 2 case with a known answer: s1 = [[2, 1], [1, 2]], s2 = I: tr(s1^(1/2)) =
        // sqrt(3) + 1.
        let s1 = DMatrix::from_row_slice(2, 2, &[2.0, 1.0, 1.0, 2.0]);
        let s2 = DMatrix::identity(2, 2);
        let mu = DVector::zeros(2);
        let got = frechet_distance(&mu, &s1, &mu, &s2).unwrap();
        let want = 4.0 + 2.0 - 2.0 * (3f64.sqrt() + 1.0);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn the_low_rank_route_equals_the_general_one() {
        let d = 24;
        for (n1, n2) in [(5, 9), (30, 7), (30, 40), (2, 2)] {
            let (mut a, mut b) = (FeatureStats::new(d), FeatureStats::new(d));
            a.add(&correlated(n1, d, 6, 0.0));
            b.add(&correlated(n2, d, 7, 0.4));
            assert_eq!(a.rows.is_empty(), n1 > d);
            let general = frechet_distance(
                a.mean(),
                &a.covariance().unwrap(),
                b.mean(),
                &b.covariance().unwrap(),
            )
            .unwrap();
            let (ab, ba) = (fid(&a, &b).unwrap(), fid(&b, &a).unwrap());
            assert!(
                (ab - general).abs() < 1e-9 * general,
                "{n1} {n2}: {ab} vs {general}"
            );
            assert!((ab - ba).abs() < 1e-9 * general, "{n1} {n2}: {ab} vs {ba}");
        }
    }

    #[test]
    fn fid_to_moments_equals_fid_of_the_sets() {
        let d = 12;
        let (mut few, mut many) = (FeatureStats::new(d), FeatureStats::new(d));
        few.add(&correlated(6, d, 8, 0.2));
        many.add(&correlated(50, d, 9, -0.1));
        let cov = many.covariance().unwrap();
        for (set, other) in [(&few, &many), (&many, &few)] {
            let want = fid(set, other).unwrap();
            let got = fid_to_moments(set, other.mean(), &other.covariance().unwrap()).unwrap();
            assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        }
        assert!(fid_to_moments(&FeatureStats::new(d), many.mean(), &cov).is_err());
    }

    #[test]
    fn non_finite_statistics_are_refused() {
        let mu = DVector::from_vec(vec![0.0, f64::NAN]);
        let s = DMatrix::identity(2, 2);
        let err = frechet_distance(&mu, &s, &DVector::zeros(2), &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not finite"), "{err}");
    }
}
