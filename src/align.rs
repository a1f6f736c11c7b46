//! The alignment loss (METHOD.md section 2, paper Eq. 5), its heatmap, and the bound of Proposition 1 (METHOD.md section 3).
//!
//! `L_align(y) = E_{t, eps} || v((1 - t) eps + t y, t) - (y - eps) ||^2`. It is the flow-matching loss
//! with the data replaced by the latents and the network frozen, so one function serves both.

use burn::prelude::*;
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::flow::likelihood::velocity_and_divergence;
use crate::flow::path::{PathDraws, interpolate, normal_rows, target_velocity};
use crate::flow::{VelocityField, rows_to_tensor};
use crate::rng::Rng;

/// How the squared error of a (t, eps) draw is reduced over dimensions (METHOD.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// Sum over dimensions (the paper's squared norm, the bound's form).
    Sum,
    /// Mean over dimensions (the ImageNet recipe; the toy scripts' `.mean()`).
    Mean,
}

/// The squared flow-matching residual of each row, reduced over dimensions.
///
/// Gradient reaches `x` through both the network input and the target (no stop-gradient, METHOD.md section 2).
///
/// # Shapes
/// - `x`: `[batch, d]`; `draws`: `t [batch]`, `eps [batch, d]`
/// - output: `[batch]`
pub fn residual_sq(
    field: &impl VelocityField,
    x: Tensor<2>,
    draws: &PathDraws,
    reduction: Reduction,
) -> Tensor<1> {
    let [batch, d] = x.dims();
    let z = interpolate(x.clone(), draws.eps.clone(), draws.t.clone());
    let r = field.velocity(z, draws.t.clone()) - target_velocity(x, draws.eps.clone());
    let sq = (r.clone() * r).sum_dim(1).reshape([batch]); // [batch]
    match reduction {
        Reduction::Sum => sq,
        Reduction::Mean => sq / d as f32,
    }
}

/// The Monte Carlo flow-matching loss: the mean of [`residual_sq`] over rows. A scalar `[1]`.
///
/// With data rows this is `L_FM` (prior training); with latents and a frozen field it is `L_align`.
pub fn flow_loss(
    field: &impl VelocityField,
    x: Tensor<2>,
    draws: &PathDraws,
    reduction: Reduction,
) -> Tensor<1> {
    residual_sq(field, x, draws, reduction).mean()
}

/// `L_align` with `mc` independent (t, eps) draws per latent, drawn from `rng`. A scalar `[1]`.
///
/// # Shapes
/// - `y`: `[n, d]`
pub fn align_loss(
    field: &impl VelocityField,
    y: Tensor<2>,
    mc: usize,
    reduction: Reduction,
    rng: &mut Rng,
) -> Tensor<1> {
    let [n, d] = y.dims();
    let draws = PathDraws::sample(rng, n * mc, d, &y.device().inner());
    align_loss_with(field, y, mc, &draws, reduction)
}

/// `L_align` of the latents `y`, each taken `mc` times with the given draws (draw `c * n + r`
/// belongs to copy `c` of row `r`, the order of [`crate::flow::path::HostDraws`]). A scalar `[1]`.
///
/// The one implementation of the alignment loss: the toy's latents, the autoencoder's latent tokens
/// and every monitor call it.
///
/// # Shapes
/// - `y`: `[n, d]`; `draws`: `t [mc * n]`, `eps [mc * n, d]`
pub fn align_loss_with(
    field: &impl VelocityField,
    y: Tensor<2>,
    mc: usize,
    draws: &PathDraws,
    reduction: Reduction,
) -> Tensor<1> {
    let y = if mc > 1 { y.repeat_dim(0, mc) } else { y }; // [mc * n, d]
    flow_loss(field, y, draws, reduction)
}

/// The L_align heatmap of METHOD.md section 5: at each point, the sum-reduced squared error averaged over
/// `t_values`, one eps per (point, t).
///
/// `points` are flat rows of dimension `d`; the result has one value per point.
pub fn align_heatmap(
    field: &impl VelocityField,
    points: &[f32],
    d: usize,
    t_values: &[f32],
    rng: &mut Rng,
    device: &Device,
) -> Vec<f32> {
    const MAX_ROWS: usize = 16_384;
    let n = points.len() / d;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(MAX_ROWS) {
        let len = MAX_ROWS.min(n - start);
        let x = rows_to_tensor(&points[start * d..(start + len) * d], d, device); // [len, d]
        let mut sum = Tensor::<1>::zeros([len], device);
        // One shared t per pass, so the network computes its time conditioning once.
        for &t in t_values {
            let eps = rows_to_tensor(&normal_rows(rng, len, d), d, device);
            let z = x.clone() * t + eps.clone() * (1.0 - t);
            let r = field.velocity_at(z, t) - target_velocity(x.clone(), eps);
            sum = sum + (r.clone() * r).sum_dim(1).reshape([len]);
        }
        let mean: Vec<f32> = (sum / t_values.len().max(1) as f32)
            .try_into_vec_as::<f32>()
            .expect("float tensors read back as f32");
        out.extend(mean);
    }
    out
}

/// Monte Carlo estimate, per latent, of the bound of Proposition 1 (METHOD.md section 3):
/// `log p(y) >= C(y) - L_align(y)` with `C(y) = -E_{s, eps} Tr grad v((1 - s) eps + s y, s)`, sum-reduced.
#[derive(Debug, Clone)]
pub struct BoundEstimate {
    /// `C(y)` per latent.
    pub c: Vec<f64>,
    /// Sum-reduced `L_align(y)` per latent.
    pub l_align: Vec<f64>,
    /// `C(y) - L_align(y)` per latent.
    pub elbo: Vec<f64>,
    /// Standard error of each `elbo` from the Monte Carlo draws.
    pub elbo_sem: Vec<f64>,
}

/// Estimates the bound at each row of `y` from `draws` (s, eps) pairs per row.
///
/// # Shapes
/// - `y`: `[n, d]` rows given flat
pub fn bound(
    field: &impl VelocityField,
    y: &[f32],
    d: usize,
    draws: usize,
    rng: &mut Rng,
    device: &Device,
) -> BoundEstimate {
    let n = y.len() / d;
    let mut sums = vec![(0.0f64, 0.0f64, 0.0f64, 0.0f64); n]; // (sum c, sum l, sum e, sum e^2)
    // Several draws per pass, keeping each pass near 8k rows.
    let per_pass = (8192 / n.max(1)).clamp(1, draws);
    let mut done = 0;
    while done < draws {
        let k = per_pass.min(draws - done);
        let x = rows_to_tensor(y, d, device).repeat_dim(0, k); // [k * n, d]
        let s: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>()).collect();
        let eps = rows_to_tensor(&normal_rows(rng, k * n, d), d, device);
        let s = Tensor::<1>::from_data(TensorData::new(s, [k * n]), device);
        let z = interpolate(x.clone(), eps.clone(), s.clone());
        let (v, div) = velocity_and_divergence(field, z, s);
        let r = v - target_velocity(x, eps);
        let l: Vec<f32> = (r.clone() * r)
            .sum_dim(1)
            .try_into_vec_as::<f32>()
            .expect("f32 readback");
        let div: Vec<f32> = div.try_into_vec_as::<f32>().expect("f32 readback");
        for (row, (&l, &dv)) in l.iter().zip(&div).enumerate() {
            let acc = &mut sums[row % n];
            let e = -(dv as f64) - l as f64;
            acc.0 -= dv as f64;
            acc.1 += l as f64;
            acc.2 += e;
            acc.3 += e * e;
        }
        done += k;
    }
    let m = draws as f64;
    let mut est = BoundEstimate {
        c: vec![],
        l_align: vec![],
        elbo: vec![],
        elbo_sem: vec![],
    };
    for (c, l, e, e2) in sums {
        let mean = e / m;
        let var = ((e2 / m - mean * mean) * m / (m - 1.0).max(1.0)).max(0.0);
        est.c.push(c / m);
        est.l_align.push(l / m);
        est.elbo.push(mean);
        est.elbo_sem.push((var / m).sqrt());
    }
    est
}
