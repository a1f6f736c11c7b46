//! Checking a trained feature prior (METHOD.md section 6): held-out flow-matching loss, exact NLL, the
//! k-NN distance `log r_k` of its samples, and a PCA scatter of samples against data.

use std::path::Path;

use burn::prelude::*;
use plotters::style::RGBColor;
use rayon::prelude::*;
use serde::Serialize;

use super::data::PriorData;
use crate::align::{Reduction, flow_loss};
use crate::error::Result;
use crate::features::FeatureTable;
use crate::features::projection::{Projection, ProjectionKind};
use crate::flow::likelihood::log_prob;
use crate::flow::path::{PathDraws, normal_rows};
use crate::flow::solver::{Solver, sample};
use crate::flow::{VelocityMlp, rows_to_tensor, tensor_to_rows};
use crate::report::{save_png, scatter_panel};
use crate::rng::{Stream, rng_for};

/// Sizes of an evaluation.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalOptions {
    /// Held-out rows scored by the flow-matching loss.
    #[arg(long, default_value_t = 10_000)]
    pub fm_rows: usize,
    /// Held-out rows and prior samples whose exact NLL is integrated (the costly part: each needs
    /// d backward passes per ODE evaluation).
    #[arg(long, default_value_t = 256)]
    pub nll_rows: usize,
    /// RK4 steps of the likelihood ODE.
    #[arg(long, default_value_t = 32)]
    pub ode_steps: usize,
    /// Prior samples drawn (Euler) for `log r_k` and the scatter.
    #[arg(long, default_value_t = 10_000)]
    pub samples: usize,
    /// Euler steps of the sampling ODE (the paper's 100).
    #[arg(long, default_value_t = 100)]
    pub sample_steps: usize,
    /// k of the k-NN distance `log r_k` (METHOD.md section 6).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Training rows in the k-NN reference set, drawn at random (seeded) from the table (METHOD.md
    /// section 6: 100k).
    #[arg(long, default_value_t = 100_000)]
    pub reference: usize,
    /// Seed of the evaluation draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            fm_rows: 10_000,
            nll_rows: 256,
            ode_steps: 32,
            samples: 10_000,
            sample_steps: 100,
            k: 5,
            reference: 100_000,
            seed: 0,
        }
    }
}

/// What `prior eval` reports (all NLLs in nats per vector unless named per dim).
///
/// The data rows scored are the run's held-out rows when it kept some (`data.holdout`), else its
/// training rows: `scored` says which.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub dim: usize,
    /// `"held-out"` or `"training"`: which data rows the `*_data` figures score.
    pub scored: &'static str,
    /// Mean-reduced flow-matching loss on the scored rows.
    pub fm_loss: f64,
    pub fm_rows: usize,
    /// Exact NLL of the scored rows (mean, and its standard error).
    pub nll_data: f64,
    pub nll_data_sem: f64,
    pub nll_data_per_dim: f64,
    /// Exact NLL of prior samples under the prior.
    pub nll_samples: f64,
    pub nll_rows: usize,
    /// Mean `log r_k` of prior samples against the reference rows.
    pub log_rk_samples: f64,
    /// Mean `log r_k` of the scored rows against the same reference: what a perfect prior scores
    /// (training rows sit closer to a reference drawn from themselves).
    pub log_rk_data: f64,
    pub k: usize,
    pub reference_rows: usize,
    pub samples: usize,
}

fn mean_sem(v: &[f32]) -> (f64, f64) {
    let v: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
    crate::stats::mean_sem(&v)
}

fn first_rows(t: &FeatureTable, n: usize) -> &[f32] {
    &t.data[..n.min(t.rows) * t.cols]
}

/// Exact `-log p` of each row by the likelihood ODE, in chunks of 64 rows.
pub fn nll(prior: &VelocityMlp, rows: &[f32], d: usize, steps: usize, device: &Device) -> Vec<f32> {
    rows.chunks(64 * d)
        .flat_map(|chunk| {
            let lp = log_prob(prior, rows_to_tensor(chunk, d, device), steps);
            let lp: Vec<f32> = lp.try_into_vec_as::<f32>().expect("f32 readback");
            lp.into_iter().map(|v| -v)
        })
        .collect()
}

/// `n` prior samples by the paper's Euler sampler, flat `[n, d]`.
pub fn sample_prior(
    prior: &VelocityMlp,
    n: usize,
    d: usize,
    steps: usize,
    seed: u64,
    device: &Device,
) -> Vec<f32> {
    let mut rng = rng_for(seed, Stream::Eval, 1);
    let mut out = Vec::with_capacity(n * d);
    for start in (0..n).step_by(8_192) {
        let len = 8_192.min(n - start);
        let z0 = rows_to_tensor(&normal_rows(&mut rng, len, d), d, device);
        out.extend(tensor_to_rows(sample(prior, z0, steps, Solver::Euler)));
    }
    out
}

/// `log` of the distance from each query row to its k-th nearest row of `reference`.
///
/// # Shapes
/// - `queries`: `[n, d]` flat; `reference`: `[m, d]` flat with `m >= k`; output `[n]`
pub fn knn_log_r(
    queries: &[f32],
    reference: &[f32],
    d: usize,
    k: usize,
    device: &Device,
) -> Vec<f32> {
    let m = reference.len() / d;
    assert!(k >= 1 && m >= k, "the reference set needs at least k rows");
    let r = rows_to_tensor(reference, d, device); // [m, d]
    let r_sq = (r.clone() * r.clone()).sum_dim(1).reshape([1, m]); // [1, m]
    let rt = r.transpose(); // [d, m]
    let mut out = Vec::with_capacity(queries.len() / d);
    for chunk in queries.chunks(256 * d) {
        let q = rows_to_tensor(chunk, d, device); // [b, d]
        let b = chunk.len() / d;
        let q_sq = (q.clone() * q.clone()).sum_dim(1); // [b, 1]
        let d2 = q.matmul(rt.clone()) * (-2.0) + q_sq + r_sq.clone(); // [b, m]
        let d2: Vec<f32> = d2.try_into_vec_as::<f32>().expect("f32 readback");
        let kth: Vec<f32> = d2
            .par_chunks(m)
            .map(|row| {
                let mut row = row.to_vec();
                let (_, kth, _) = row.select_nth_unstable_by(k - 1, f32::total_cmp);
                0.5 * kth.max(1e-30).ln()
            })
            .collect();
        debug_assert_eq!(kth.len(), b);
        out.extend(kth);
    }
    out
}

/// `n` rows of `table` drawn without replacement by `seed` (all of them when it has fewer), flat
/// and in table order: the reference set of `log r_k`, unbiased by the table's order (the first
/// rows of a token-embedding table are its first token ids).
pub fn reference_rows(table: &FeatureTable, n: usize, seed: u64) -> Vec<f32> {
    if n >= table.rows {
        return table.data.clone();
    }
    let mut rng = rng_for(seed, Stream::Reference, 1);
    let mut picked = rand::seq::index::sample(&mut rng, table.rows, n).into_vec();
    picked.sort_unstable();
    picked.iter().flat_map(|&i| table.row(i)).copied().collect()
}

/// Evaluates `prior` on `data`'s held-out rows (its training rows when none were held out).
pub fn evaluate(
    prior: &VelocityMlp,
    data: &PriorData,
    opts: &EvalOptions,
    device: &Device,
) -> (EvalReport, Vec<f32>) {
    let d = data.dim();
    let (held, scored) = if data.holdout.rows > 0 {
        (&data.holdout, "held-out")
    } else {
        tracing::info!(
            "the run held out no rows (data.holdout = 0, as in the paper): scoring training rows"
        );
        (&data.train, "training")
    };
    // Flow-matching loss, one (t, eps) draw per row.
    let fm = first_rows(held, opts.fm_rows);
    let fm_n = fm.len() / d;
    let mut rng = rng_for(opts.seed, Stream::Eval, 0);
    let mut fm_sum = 0.0f64;
    for chunk in fm.chunks(8_192 * d) {
        let n = chunk.len() / d;
        let draws = PathDraws::sample(&mut rng, n, d, device);
        let loss = flow_loss(
            prior,
            rows_to_tensor(chunk, d, device),
            &draws,
            Reduction::Mean,
        );
        fm_sum += f64::from(loss.into_scalar::<f32>()) * n as f64;
    }
    let samples = sample_prior(
        prior,
        opts.samples.max(opts.nll_rows),
        d,
        opts.sample_steps,
        opts.seed,
        device,
    );
    let (nll_h, sem_h) = mean_sem(&nll(
        prior,
        first_rows(held, opts.nll_rows),
        d,
        opts.ode_steps,
        device,
    ));
    let nll_n = opts.nll_rows.min(held.rows);
    let (nll_s, _) = mean_sem(&nll(
        prior,
        &samples[..nll_n * d],
        d,
        opts.ode_steps,
        device,
    ));
    let reference = reference_rows(&data.train, opts.reference, opts.seed);
    let k = opts.k.min(reference.len() / d).max(1);
    let q = opts.samples.min(held.rows);
    let (rk_s, _) = mean_sem(&knn_log_r(&samples[..q * d], &reference, d, k, device));
    let (rk_h, _) = mean_sem(&knn_log_r(first_rows(held, q), &reference, d, k, device));
    let report = EvalReport {
        dim: d,
        scored,
        fm_loss: fm_sum / fm_n.max(1) as f64,
        fm_rows: fm_n,
        nll_data: nll_h,
        nll_data_sem: sem_h,
        nll_data_per_dim: nll_h / d as f64,
        nll_samples: nll_s,
        nll_rows: nll_n,
        log_rk_samples: rk_s,
        log_rk_data: rk_h,
        k,
        reference_rows: reference.len() / d,
        samples: q,
    };
    (report, samples)
}

/// A PNG of data rows and prior samples on the data's first two principal components.
pub fn pca_scatter(
    path: &Path,
    data: &FeatureTable,
    samples: &[f32],
    device: &Device,
) -> Result<()> {
    let d = data.cols;
    let n = (samples.len() / d).min(data.rows).min(5_000);
    let data = FeatureTable {
        rows: n,
        cols: d,
        data: first_rows(data, n).to_vec(),
    };
    let samples = FeatureTable {
        rows: n,
        cols: d,
        data: samples[..n * d].to_vec(),
    };
    let pca = Projection::fit(ProjectionKind::Pca, &data, 2.min(d), 0, device)?;
    let to_points = |t: &FeatureTable| -> Result<Vec<[f32; 2]>> {
        let p = pca.apply(t, device)?;
        Ok(p.data
            .chunks(p.cols)
            .map(|r| [r[0], r.get(1).copied().unwrap_or(0.0)])
            .collect())
    };
    let (pd, ps) = (to_points(&data)?, to_points(&samples)?);
    let span = |axis: usize| {
        let mut v: Vec<f32> = pd.iter().map(|p| p[axis]).collect();
        v.sort_by(f32::total_cmp);
        let (lo, hi) = (v[v.len() / 200], v[v.len() - 1 - v.len() / 200]);
        let pad = 0.15 * (hi - lo).max(1e-3);
        (lo - pad, hi + pad)
    };
    let range = (span(0), span(1));
    save_png(path, (1000, 500), |root| {
        let areas = root.split_evenly((1, 2));
        scatter_panel(
            &areas[0],
            &format!("held-out rows on PC1-PC2 ({n})"),
            range,
            &pd,
            RGBColor(31, 119, 180),
        )?;
        scatter_panel(
            &areas[1],
            &format!("prior samples, Euler ({n})"),
            range,
            &ps,
            RGBColor(255, 127, 14),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_distance_matches_brute_force() {
        let dev = Device::flex();
        let reference: Vec<f32> = (0..20).map(|i| i as f32).collect(); // 1-d points 0..19
        let queries = vec![0.0f32, 9.5, 30.0];
        let got = knn_log_r(&queries, &reference, 1, 3, &dev);
        let want = [2.0f32.ln(), 1.5f32.ln(), 13.0f32.ln()];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
    }
}
