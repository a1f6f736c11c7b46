//! The closed forms of METHOD.md section 3: data `N(0, s^2 I)` in `d` dimensions under the optimal
//! velocity field, where `log p`, `C(y)`, `L_align(y)` and both estimates are known exactly.
//!
//! They let a reader (and the tests) see what the quantity the paper calls a bound does: where it
//! exceeds `log p`, by how much, and what holds on average over the data.

use std::f64::consts::{FRAC_PI_4, PI};

/// `-(d / 2)(1 + ln 2 pi)`: the base term `E[log N(eps; 0, I)]` that the paper's `C(y)` leaves out.
pub fn base_term(d: usize) -> f64 {
    -(d as f64 / 2.0) * (1.0 + (2.0 * PI).ln())
}

/// Data `N(0, s^2 I)` in `d` dimensions with the optimal field `v*(z, t) = a(t) z`,
/// `a(t) = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2)` (METHOD.md section 3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianClosedForm {
    /// Standard deviation `s` of the data, per dimension.
    pub s: f64,
    /// Dimension `d`.
    pub d: usize,
}

impl GaussianClosedForm {
    /// The optimal field's coefficient `a(t)`.
    pub fn a(&self, t: f64) -> f64 {
        let s2 = self.s * self.s;
        (t * s2 - (1.0 - t)) / ((1.0 - t).powi(2) + t * t * s2)
    }

    /// `log p(y)` of the data density at `|y|^2 = r2`.
    pub fn log_p(&self, r2: f64) -> f64 {
        let s2 = self.s * self.s;
        -r2 / (2.0 * s2) - (self.d as f64 / 2.0) * (2.0 * PI * s2).ln()
    }

    /// `C(y) = -E_s Tr grad v* = -d ln s`, the same for every `y`.
    pub fn c(&self) -> f64 {
        -(self.d as f64) * self.s.ln()
    }

    /// Sum-reduced `L_align(y) = (pi / 4)(s d + |y|^2 / s)` at `|y|^2 = r2`.
    pub fn l_align(&self, r2: f64) -> f64 {
        FRAC_PI_4 * (self.s * self.d as f64 + r2 / self.s)
    }

    /// `C(y) - L_align(y)`: what the paper's Proposition 1 calls a lower bound on `log p(y)`.
    pub fn paper_estimate(&self, r2: f64) -> f64 {
        self.c() - self.l_align(r2)
    }

    /// The paper's estimate plus the base term [`base_term`].
    pub fn estimate_with_base(&self, r2: f64) -> f64 {
        self.paper_estimate(r2) + base_term(self.d)
    }

    /// The `|y|^2` beyond which the estimate with the base term exceeds `log p`; `None` when it stays
    /// below everywhere (`s >= 2 / pi`).
    ///
    /// The gap `log p - estimate` is `|y|^2 (pi / (4 s) - 1 / (2 s^2)) + d (pi s / 4 + 1 / 2)`.
    pub fn with_base_violated_beyond(&self) -> Option<f64> {
        let slope = PI / (4.0 * self.s) - 1.0 / (2.0 * self.s * self.s);
        let constant = self.d as f64 * (PI * self.s / 4.0 + 0.5);
        (slope < 0.0).then(|| constant / -slope)
    }

    /// The `|y|^2` below which the paper's estimate (no base term) exceeds `log p`; `None` when
    /// it exceeds it nowhere near the mode.
    pub fn paper_violated_within(&self) -> Option<f64> {
        // log p - (C - L_align) = |y|^2 (pi / (4 s) - 1 / (2 s^2)) - (d / 2) ln(2 pi) + d pi s / 4.
        let slope = PI / (4.0 * self.s) - 1.0 / (2.0 * self.s * self.s);
        let constant = self.d as f64 * (PI * self.s / 4.0 - 0.5 * (2.0 * PI).ln());
        (constant < 0.0 && slope > 0.0).then(|| -constant / slope)
    }

    /// The mean over data `y ~ N(0, s^2 I)` of `log p(y)` minus the estimate with the base term:
    /// `d pi s / 2`, positive for every `s`.
    pub fn mean_gap_with_base(&self) -> f64 {
        self.d as f64 * PI * self.s / 2.0
    }

    /// The mean over data of `log p(y)` minus the paper's estimate: [`Self::mean_gap_with_base`] plus
    /// [`base_term`], negative for `s < (1 + ln 2 pi) / pi = 0.90`.
    pub fn mean_gap_paper(&self) -> f64 {
        self.mean_gap_with_base() + base_term(self.d)
    }

    /// The probability that a data point `y ~ N(0, s^2 I)` has `|y|^2 > r2` (the chi-square tail;
    /// closed form for even `d`).
    pub fn data_mass_beyond(&self, r2: f64) -> f64 {
        // |y|^2 / s^2 ~ chi^2_d; for even d the tail is exp(-x/2) sum_{k < d/2} (x/2)^k / k!.
        let x = r2 / (self.s * self.s) / 2.0;
        if self.d.is_multiple_of(2) {
            let (mut term, mut sum) = (1.0, 0.0);
            for k in 0..self.d / 2 {
                if k > 0 {
                    term *= x / k as f64;
                }
                sum += term;
            }
            (-x).exp() * sum
        } else {
            // Odd d: numerical integration of the chi density is not needed by any caller yet.
            f64::NAN
        }
    }

    /// Every closed-form curve at the radii `r` (`|y| = r`), for plotting over learned ones.
    pub fn curves(&self, radii: &[f64]) -> ClosedFormCurves {
        let at = |f: &dyn Fn(f64) -> f64| radii.iter().map(|&r| f(r * r)).collect();
        ClosedFormCurves {
            radius: radii.to_vec(),
            log_p: at(&|r2| self.log_p(r2)),
            l_align: at(&|r2| self.l_align(r2)),
            paper_estimate: at(&|r2| self.paper_estimate(r2)),
            estimate_with_base: at(&|r2| self.estimate_with_base(r2)),
        }
    }
}

/// Closed-form curves over the radius `|y|` (plain data, METHOD.md section 3).
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedFormCurves {
    pub radius: Vec<f64>,
    pub log_p: Vec<f64>,
    /// Sum-reduced `L_align`.
    pub l_align: Vec<f64>,
    /// `C - L_align`, the quantity the paper calls a bound.
    pub paper_estimate: Vec<f64>,
    /// `C - L_align` plus the base term.
    pub estimate_with_base: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quad(f: impl Fn(f64) -> f64) -> f64 {
        let n = 100_000;
        (0..n).map(|i| f((i as f64 + 0.5) / n as f64)).sum::<f64>() / n as f64
    }

    #[test]
    fn closed_forms_match_the_integrals_over_t() {
        for s in [0.3, 1.0, 2.0] {
            let g = GaussianClosedForm { s, d: 3 };
            // C = -d int a, L_align = int (a t - 1)^2 |y|^2 + d int (a (1 - t) + 1)^2.
            let c = -3.0 * quad(|t| g.a(t));
            assert!((c - g.c()).abs() < 1e-6, "C at s {s}: {c} vs {}", g.c());
            let r2 = 1.7;
            let l = quad(|t| (g.a(t) * t - 1.0).powi(2)) * r2
                + 3.0 * quad(|t| (g.a(t) * (1.0 - t) + 1.0).powi(2));
            assert!((l - g.l_align(r2)).abs() < 1e-5, "L_align at s {s}");
        }
    }

    #[test]
    fn the_thresholds_are_where_the_gaps_change_sign() {
        let g = GaussianClosedForm { s: 0.3, d: 2 };
        let r2 = g
            .with_base_violated_beyond()
            .expect("s < 2 / pi fails in the tails");
        assert!(
            (r2.sqrt() / g.s - 2.36).abs() < 0.01,
            "radius {}",
            r2.sqrt() / g.s
        );
        assert!(g.log_p(r2 * 0.99) > g.estimate_with_base(r2 * 0.99));
        assert!(g.log_p(r2 * 1.01) < g.estimate_with_base(r2 * 1.01));
        assert!((g.data_mass_beyond(r2) - 0.062).abs() < 0.001);
        assert!(
            GaussianClosedForm { s: 0.7, d: 2 }
                .with_base_violated_beyond()
                .is_none()
        );

        let one = GaussianClosedForm { s: 1.0, d: 2 };
        let inner = one
            .paper_violated_within()
            .expect("violated at the mode for s = 1");
        assert!(
            (inner / 2.0 - 0.468).abs() < 0.001,
            "|y|^2 / d = {}",
            inner / 2.0
        );
        assert!(one.paper_estimate(inner * 0.99) > one.log_p(inner * 0.99));
        assert!(one.paper_estimate(inner * 1.01) < one.log_p(inner * 1.01));
    }
}
