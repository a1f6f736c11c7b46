//! Maps target features of dimension d2 to the latent dimension d1 (METHOD.md section 2): the paper's fixed
//! random projection, and the ablation's average pooling and PCA.

use burn::prelude::*;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::FeatureTable;
use crate::error::{Error, Result};
use crate::flow::{rows_to_tensor, tensor_to_rows};
use crate::rng::{Stream, rng_for};

/// The seed of the paper's random projection (METHOD.md section 2).
pub const PAPER_SEED: u64 = 42;

/// How d2-dimensional features become d1-dimensional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProjectionKind {
    /// `identity` when the feature dim equals the latent dim (a square Gaussian map would squeeze
    /// its weakest direction about 50x at 32 dims), else `random`. The default.
    Auto,
    /// `W x` with `W_ij ~ N(0, 1/d2)` from a fixed seed: keeps the per-dimension variance, mapping
    /// down (the paper's 896 -> 32) or up (its VQ codebook's 8 -> 32) alike.
    Random,
    /// The mean of each of d1 contiguous groups of dimensions (adaptive average pooling).
    Avgpool,
    /// The top-d1 principal components (centred).
    Pca,
    /// No projection; needs d2 = d1.
    Identity,
}

/// A fitted affine map `y = M x + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub kind: ProjectionKind,
    pub d_in: usize,
    pub d_out: usize,
    /// `M`, row-major `[d_out, d_in]`.
    pub matrix: Vec<f32>,
    /// `b`, `[d_out]` (non-zero only for PCA's centring).
    pub bias: Vec<f32>,
}

impl Projection {
    /// Fits the map of `kind` from `d_in = table.cols` to `d_out`; `seed` draws the random matrix.
    pub fn fit(
        kind: ProjectionKind,
        table: &FeatureTable,
        d_out: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Projection> {
        let d_in = table.cols;
        if d_out == 0 {
            return Err(Error::setting(
                "data.latent_dim",
                "must be at least 1, got 0",
            ));
        }
        let kind = match kind {
            ProjectionKind::Auto if d_in == d_out => {
                tracing::info!(
                    "the features already have the latent dim {d_out}: using them as they are (identity), \
                     since a square random map would squeeze one direction; choose the random projection to force it"
                );
                ProjectionKind::Identity
            }
            ProjectionKind::Auto => ProjectionKind::Random,
            k => k,
        };
        let (matrix, bias) = match kind {
            ProjectionKind::Identity => {
                if d_in != d_out {
                    return Err(Error::setting(
                        "data.projection",
                        format!(
                            "identity needs the feature dim ({d_in}) to equal the latent dim ({d_out}); use random"
                        ),
                    ));
                }
                let mut m = vec![0.0; d_in * d_in];
                (0..d_in).for_each(|i| m[i * d_in + i] = 1.0);
                (m, vec![0.0; d_out])
            }
            ProjectionKind::Random => {
                let mut rng = rng_for(seed, Stream::Projection, 0);
                let normal =
                    Normal::new(0.0f32, (1.0 / d_in as f32).sqrt()).expect("a positive std");
                let m = (0..d_out * d_in).map(|_| normal.sample(&mut rng)).collect();
                (m, vec![0.0; d_out])
            }
            ProjectionKind::Avgpool => {
                if d_in < d_out {
                    return Err(Error::setting(
                        "data.projection",
                        format!(
                            "average pooling needs the feature dim ({d_in}) to be at least the latent dim ({d_out})"
                        ),
                    ));
                }
                let mut m = vec![0.0; d_out * d_in];
                for i in 0..d_out {
                    // torch.nn.AdaptiveAvgPool1d's bins.
                    let (lo, hi) = ((i * d_in) / d_out, ((i + 1) * d_in).div_ceil(d_out));
                    for j in lo..hi {
                        m[i * d_in + j] = 1.0 / (hi - lo) as f32;
                    }
                }
                (m, vec![0.0; d_out])
            }
            ProjectionKind::Pca => pca(table, d_out, device)?,
            ProjectionKind::Auto => unreachable!("resolved above"),
        };
        Ok(Projection {
            kind,
            d_in,
            d_out,
            matrix,
            bias,
        })
    }

    /// Projects every row of `table`.
    ///
    /// # Shapes
    /// - `table`: `[rows, d_in]`; output `[rows, d_out]`
    pub fn apply(&self, table: &FeatureTable, device: &Device) -> Result<FeatureTable> {
        if table.cols != self.d_in {
            return Err(Error::Numeric(format!(
                "the projection expects {}-dim features, got {}",
                self.d_in, table.cols
            )));
        }
        const CHUNK: usize = 16_384;
        let mt = Tensor::<2>::from_data(
            TensorData::new(self.matrix.clone(), [self.d_out, self.d_in]),
            device,
        )
        .transpose(); // [d_in, d_out]
        let b = Tensor::<1>::from_data(TensorData::new(self.bias.clone(), [self.d_out]), device)
            .unsqueeze::<2>(); // [1, d_out]
        let mut data = Vec::with_capacity(table.rows * self.d_out);
        for start in (0..table.rows).step_by(CHUNK) {
            let end = (start + CHUNK).min(table.rows);
            let x = rows_to_tensor(
                &table.data[start * self.d_in..end * self.d_in],
                self.d_in,
                device,
            );
            data.extend(tensor_to_rows(x.matmul(mt.clone()) + b.clone()));
        }
        Ok(FeatureTable {
            rows: table.rows,
            cols: self.d_out,
            data,
        })
    }
}

/// The top-`k` principal directions of `table` (rows of `M`) and the centring bias `-M mean`.
fn pca(table: &FeatureTable, k: usize, device: &Device) -> Result<(Vec<f32>, Vec<f32>)> {
    let d = table.cols;
    if k > d {
        return Err(Error::setting(
            "data.latent_dim",
            format!("is {k} but PCA gives at most {d} components (the feature dim)"),
        ));
    }
    if table.rows < 2 {
        return Err(Error::setting(
            "data.projection",
            "PCA needs at least 2 rows",
        ));
    }
    let n = table.rows as f64;
    let mut mean = vec![0.0f64; d];
    for r in 0..table.rows {
        for (m, &v) in mean.iter_mut().zip(table.row(r)) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    // Covariance by chunked matmuls on the device, summed in f64.
    const CHUNK: usize = 16_384;
    let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let mu = Tensor::<1>::from_data(TensorData::new(mean32, [d]), device).unsqueeze::<2>();
    let mut cov = vec![0.0f64; d * d];
    for start in (0..table.rows).step_by(CHUNK) {
        let end = (start + CHUNK).min(table.rows);
        let x = rows_to_tensor(&table.data[start * d..end * d], d, device) - mu.clone(); // [n, d]
        let part = tensor_to_rows(x.clone().transpose().matmul(x)); // [d, d]
        for (c, p) in cov.iter_mut().zip(part) {
            *c += f64::from(p);
        }
    }
    cov.iter_mut().for_each(|c| *c /= n - 1.0);
    let eig = nalgebra::SymmetricEigen::new(nalgebra::DMatrix::from_row_slice(d, d, &cov));
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let mut m = Vec::with_capacity(k * d);
    for &i in &order[..k] {
        let v = eig.eigenvectors.column(i);
        // A fixed sign: the largest-magnitude entry is positive.
        let big = v
            .iter()
            .copied()
            .fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
        let sign = if big < 0.0 { -1.0 } else { 1.0 };
        m.extend(v.iter().map(|&x| (sign * x) as f32));
    }
    let bias = (0..k)
        .map(|i| {
            -(0..d)
                .map(|j| f64::from(m[i * d + j]) * mean[j])
                .sum::<f64>() as f32
        })
        .collect();
    Ok((m, bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::path::normal_rows;

    fn gaussian_table(rows: usize, cols: usize, seed: u64) -> FeatureTable {
        let mut rng = rng_for(seed, Stream::Reference, 0);
        FeatureTable {
            rows,
            cols,
            data: normal_rows(&mut rng, rows, cols),
        }
    }

    #[test]
    fn random_projection_is_seeded_and_keeps_the_variance() {
        let dev = Device::flex();
        let t = gaussian_table(4000, 256, 1);
        let a = Projection::fit(ProjectionKind::Random, &t, 32, PAPER_SEED, &dev).unwrap();
        let b = Projection::fit(ProjectionKind::Random, &t, 32, PAPER_SEED, &dev).unwrap();
        let c = Projection::fit(ProjectionKind::Random, &t, 32, 7, &dev).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.matrix, c.matrix);
        let y = a.apply(&t, &dev).unwrap();
        assert_eq!((y.rows, y.cols), (4000, 32));
        // Unit-variance features stay unit-variance per dimension (W_ij ~ N(0, 1/d2)).
        let var = y.data.iter().map(|v| f64::from(v * v)).sum::<f64>() / y.data.len() as f64;
        assert!((var - 1.0).abs() < 0.1, "variance {var}");
    }

    #[test]
    fn random_projection_maps_up_like_the_vq_codebook() {
        // Table 1's VQ prior: a 16,384 x 8 codebook projected up to 32 dims.
        let dev = Device::flex();
        let t = gaussian_table(16_384, 8, 3);
        let p = Projection::fit(ProjectionKind::Random, &t, 32, PAPER_SEED, &dev).unwrap();
        let y = p.apply(&t, &dev).unwrap();
        assert_eq!((y.rows, y.cols), (16_384, 32));
        // Each output dim is a unit-variance mix of the 8 inputs: variance 1 on average.
        let var = y.data.iter().map(|v| f64::from(v * v)).sum::<f64>() / y.data.len() as f64;
        assert!((var - 1.0).abs() < 0.35, "variance {var}");
        // The image is the 8-dim column space of W: rank 8, not 32.
        let col = |j: usize| (0..32).map(|i| p.matrix[i * 8 + j]).collect::<Vec<f32>>();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((0..8).all(|j| norm(&col(j)) > 0.5));
    }

    #[test]
    fn auto_is_identity_for_equal_dims_and_random_otherwise() {
        let dev = Device::flex();
        let square = gaussian_table(100, 32, 4);
        let p = Projection::fit(ProjectionKind::Auto, &square, 32, PAPER_SEED, &dev).unwrap();
        assert_eq!(p.kind, ProjectionKind::Identity);
        assert_eq!(p.apply(&square, &dev).unwrap().data, square.data);
        let wide = gaussian_table(100, 64, 4);
        let p = Projection::fit(ProjectionKind::Auto, &wide, 32, PAPER_SEED, &dev).unwrap();
        assert_eq!(p.kind, ProjectionKind::Random);
        let r = Projection::fit(ProjectionKind::Random, &wide, 32, PAPER_SEED, &dev).unwrap();
        assert_eq!(p.matrix, r.matrix, "auto draws the same matrix as random");
    }

    #[test]
    fn avgpool_averages_contiguous_groups_and_identity_needs_equal_dims() {
        let dev = Device::flex();
        let t = FeatureTable {
            rows: 1,
            cols: 6,
            data: vec![1.0, 3.0, 5.0, 7.0, 9.0, 11.0],
        };
        let p = Projection::fit(ProjectionKind::Avgpool, &t, 3, 0, &dev).unwrap();
        assert_eq!(p.apply(&t, &dev).unwrap().data, vec![2.0, 6.0, 10.0]);
        let p = Projection::fit(ProjectionKind::Identity, &t, 6, 0, &dev).unwrap();
        assert_eq!(p.apply(&t, &dev).unwrap().data, t.data);
        assert!(Projection::fit(ProjectionKind::Identity, &t, 3, 0, &dev).is_err());
    }

    #[test]
    fn pca_finds_the_high_variance_directions() {
        let dev = Device::flex();
        // Dims 0 and 3 carry variance 25 and 9; the rest 1.
        let mut t = gaussian_table(5000, 6, 2);
        for r in 0..t.rows {
            t.data[r * 6] = 5.0 * t.data[r * 6] + 2.0;
            t.data[r * 6 + 3] *= 3.0;
        }
        let p = Projection::fit(ProjectionKind::Pca, &t, 2, 0, &dev).unwrap();
        assert!(
            p.matrix[0].abs() > 0.99,
            "first component {:?}",
            &p.matrix[..6]
        );
        assert!(
            p.matrix[6 + 3].abs() > 0.99,
            "second component {:?}",
            &p.matrix[6..]
        );
        let y = p.apply(&t, &dev).unwrap();
        let mean0 = (0..y.rows).map(|r| y.data[r * 2]).sum::<f32>() / y.rows as f32;
        assert!(mean0.abs() < 1e-3, "PCA output is centred: {mean0}");
    }
}
