//! The engine against closed forms: for data x ~ N(0, s^2 I) the optimal velocity of the linear path is
//! `v*(z, t) = a(t) z` with `a(t) = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2)` (METHOD.md section 1), so
//! L_FM, L_align, C(y) and log p are all known exactly.

use burn::prelude::*;
use flowalign::align::Reduction;
use flowalign::align::{align_loss, bound, flow_loss};
use flowalign::flow::likelihood::log_prob;
use flowalign::flow::path::PathDraws;
use flowalign::flow::{VelocityField, rows_to_tensor};
use flowalign::rng::{Stream, rng_for};

struct GaussianOptimal {
    s2: f32,
}

fn a(t: f64, s2: f64) -> f64 {
    (t * s2 - (1.0 - t)) / ((1.0 - t).powi(2) + t * t * s2)
}

impl VelocityField for GaussianOptimal {
    fn velocity(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
        let t = t.unsqueeze_dim::<2>(1); // [batch, 1]
        let one_minus = -t.clone() + 1.0;
        let num = t.clone() * self.s2 - one_minus.clone();
        let den = one_minus.clone() * one_minus + t.clone() * t * self.s2;
        z * (num / den)
    }
}

/// `integral_0^1 f(t) dt` by the midpoint rule.
fn quad(f: impl Fn(f64) -> f64) -> f64 {
    let n = 20_000;
    (0..n).map(|i| f((i as f64 + 0.5) / n as f64)).sum::<f64>() / n as f64
}

const D: usize = 2;

#[test]
fn flow_matching_loss_at_the_optimum_matches_the_closed_form() {
    let dev = Device::flex();
    let s2 = 0.49f64;
    let field = GaussianOptimal { s2: s2 as f32 };
    // E||v* - u||^2 = d * E_t[(a t - 1)^2 s^2 + (a (1 - t) + 1)^2].
    let exact = D as f64
        * quad(|t| (a(t, s2) * t - 1.0).powi(2) * s2 + (a(t, s2) * (1.0 - t) + 1.0).powi(2));
    let n = 400_000;
    let mut rng = rng_for(1, Stream::Eval, 0);
    let x: Vec<f32> = flowalign::flow::path::normal_rows(&mut rng, n, D)
        .iter()
        .map(|v| v * s2.sqrt() as f32)
        .collect();
    let x = rows_to_tensor(&x, D, &dev);
    let draws = PathDraws::sample(&mut rng, n, D, &dev);
    let mc = flow_loss(&field, x.clone(), &draws, Reduction::Sum).into_scalar::<f32>() as f64;
    assert!(
        (mc - exact).abs() < 0.01 * exact,
        "L_FM {mc} vs closed form {exact}"
    );
    // A scaled field is worse: v* minimises L_FM.
    let worse = GaussianOptimal {
        s2: (s2 * 1.5) as f32,
    };
    let other = flow_loss(&worse, x, &draws, Reduction::Sum).into_scalar::<f32>() as f64;
    assert!(
        other > mc,
        "perturbed field {other} should exceed optimum {mc}"
    );
}

#[test]
fn alignment_loss_matches_the_closed_form() {
    let dev = Device::flex();
    let s2 = 2.0f64;
    let field = GaussianOptimal { s2: s2 as f32 };
    let y = [1.5f32, -0.5];
    let y2 = (y[0] * y[0] + y[1] * y[1]) as f64;
    // L_align(y) = E_t[(a t - 1)^2] |y|^2 + d E_t[(a (1 - t) + 1)^2].
    let exact = quad(|t| (a(t, s2) * t - 1.0).powi(2)) * y2
        + D as f64 * quad(|t| (a(t, s2) * (1.0 - t) + 1.0).powi(2));
    let ys = rows_to_tensor(&y, D, &dev);
    let mut rng = rng_for(2, Stream::Align, 0);
    let mc = align_loss(&field, ys, 400_000, Reduction::Sum, &mut rng).into_scalar::<f32>() as f64;
    assert!(
        (mc - exact).abs() < 0.01 * exact,
        "L_align {mc} vs closed form {exact}"
    );
    // The mean reduction divides by d.
    let ys = rows_to_tensor(&y, D, &dev);
    let mean =
        align_loss(&field, ys, 400_000, Reduction::Mean, &mut rng).into_scalar::<f32>() as f64;
    assert!((mean * D as f64 - exact).abs() < 0.01 * exact);
}

#[test]
fn exact_likelihood_of_the_optimal_flow_is_the_gaussian_density() {
    let dev = Device::flex();
    let s2 = 0.25f32;
    let field = GaussianOptimal { s2 };
    let pts = [0.0f32, 0.0, 0.5, -0.3, 1.2, 0.7, -2.0, 1.0];
    let lp: Vec<f32> = log_prob(&field, rows_to_tensor(&pts, D, &dev), 200)
        .try_into_vec_as::<f32>()
        .unwrap();
    for (i, p) in pts.chunks(2).enumerate() {
        let r2 = p[0] * p[0] + p[1] * p[1];
        let exact = -r2 / (2.0 * s2) - (D as f32 / 2.0) * (2.0 * std::f32::consts::PI * s2).ln();
        assert!(
            (lp[i] - exact).abs() < 2e-3,
            "log p at {p:?}: {} vs {exact}",
            lp[i]
        );
    }
}

#[test]
fn bound_terms_match_the_closed_form() {
    let dev = Device::flex();
    let s2 = 1.0f64;
    let field = GaussianOptimal { s2: s2 as f32 };
    let y = [0.0f32, 0.0, 2.5, 0.0];
    let mut rng = rng_for(3, Stream::Eval, 0);
    let est = bound(&field, &y, D, 20_000, &mut rng, &dev);
    // C(y) = -d E_t[a(t)], which is 0 for s = 1 by symmetry; L_align as above.
    let c = -(D as f64) * quad(|t| a(t, s2));
    let l_const = D as f64 * quad(|t| (a(t, s2) * (1.0 - t) + 1.0).powi(2));
    let l_quad = quad(|t| (a(t, s2) * t - 1.0).powi(2));
    for (i, y2) in [0.0f64, 6.25].into_iter().enumerate() {
        assert!((est.c[i] - c).abs() < 0.02, "C {} vs {c}", est.c[i]);
        let l = l_quad * y2 + l_const;
        assert!(
            (est.l_align[i] - l).abs() < 0.02 * l.max(1.0),
            "L_align {} vs {l}",
            est.l_align[i]
        );
    }
    // For s = 1: L_align(0) = d pi / 4, while log p(0) = -(d / 2) ln(2 pi). So METHOD.md section 3's
    // `C(y) - L_align(y)` exceeds log p at the mode even for the exact field; with the base
    // term E[log N(eps)] = -(d / 2)(1 + ln 2 pi) added, the bound holds at both points.
    let log_p = |y2: f64| -y2 / 2.0 - (D as f64 / 2.0) * (2.0 * std::f64::consts::PI).ln();
    assert!((l_const - D as f64 * std::f64::consts::FRAC_PI_4).abs() < 1e-6);
    assert!(
        est.elbo[0] > log_p(0.0) + 0.2,
        "the paper's form at the mode: {} vs log p {}",
        est.elbo[0],
        log_p(0.0)
    );
    let base = -(D as f64 / 2.0) * (1.0 + (2.0 * std::f64::consts::PI).ln());
    for (i, y2) in [0.0f64, 6.25].into_iter().enumerate() {
        assert!(
            est.elbo[i] + base <= log_p(y2),
            "with base term: {} vs {}",
            est.elbo[i] + base,
            log_p(y2)
        );
    }
}
