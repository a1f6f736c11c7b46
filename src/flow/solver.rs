//! ODE solvers for `dz/dt = v(z, t)` (METHOD.md section 1: sampling runs from t = 0, noise, to t = 1,
//! data).

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::VelocityField;

/// A fixed-step integration method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// Forward Euler (the paper's sampler, 100 steps).
    Euler,
    /// Classic fourth-order Runge-Kutta.
    Rk4,
}

/// A state the fixed-step solvers advance: the ODE's `z`, or `z` with quantities integrated along
/// it (the likelihood's divergence integral).
pub trait OdeState: Clone {
    /// `self + k * h`.
    fn add_scaled(&self, k: &Self, h: f32) -> Self;
    /// `k1 + 2 k2 + 2 k3 + k4`, RK4's weighted slope (before the factor `h / 6`).
    fn rk4_slope(k1: &Self, k2: &Self, k3: &Self, k4: &Self) -> Self;
}

impl<const D: usize> OdeState for Tensor<D> {
    fn add_scaled(&self, k: &Self, h: f32) -> Self {
        self.clone() + k.clone() * h
    }

    fn rk4_slope(k1: &Self, k2: &Self, k3: &Self, k4: &Self) -> Self {
        k1.clone() + k2.clone() * 2.0 + k3.clone() * 2.0 + k4.clone()
    }
}

impl<A: OdeState, B: OdeState> OdeState for (A, B) {
    fn add_scaled(&self, k: &Self, h: f32) -> Self {
        (self.0.add_scaled(&k.0, h), self.1.add_scaled(&k.1, h))
    }

    fn rk4_slope(k1: &Self, k2: &Self, k3: &Self, k4: &Self) -> Self {
        (
            A::rk4_slope(&k1.0, &k2.0, &k3.0, &k4.0),
            B::rk4_slope(&k1.1, &k2.1, &k3.1, &k4.1),
        )
    }
}

/// One step of size `h` from time `t` of `ds/dt = slope(s, t)`: the one Euler and the one RK4 of
/// flowalign, used by sampling and by the exact likelihood alike.
pub fn step_with<S: OdeState>(
    slope: impl Fn(&S, f32) -> S,
    s: &S,
    t: f32,
    h: f32,
    solver: Solver,
) -> S {
    match solver {
        Solver::Euler => s.add_scaled(&slope(s, t), h),
        Solver::Rk4 => {
            let k1 = slope(s, t);
            let k2 = slope(&s.add_scaled(&k1, h / 2.0), t + h / 2.0);
            let k3 = slope(&s.add_scaled(&k2, h / 2.0), t + h / 2.0);
            let k4 = slope(&s.add_scaled(&k3, h), t + h);
            s.add_scaled(&S::rk4_slope(&k1, &k2, &k3, &k4), h / 6.0)
        }
    }
}

/// One step of size `h` from time `t` along the field.
fn step(field: &impl VelocityField, z: Tensor<2>, t: f32, h: f32, solver: Solver) -> Tensor<2> {
    step_with(
        |z: &Tensor<2>, t| field.velocity_at(z.clone(), t),
        &z,
        t,
        h,
        solver,
    )
}

/// Integrates from `t0` to `t1` in `steps` equal steps, calling `visit(k, z_k)` after every step.
///
/// # Shapes
/// - `z0`: `[batch, d]`; output `[batch, d]`
pub fn integrate_with(
    field: &impl VelocityField,
    z0: Tensor<2>,
    (t0, t1): (f32, f32),
    steps: usize,
    solver: Solver,
    mut visit: impl FnMut(usize, &Tensor<2>),
) -> Tensor<2> {
    let h = (t1 - t0) / steps as f32;
    let mut z = z0;
    for k in 0..steps {
        z = step(field, z, t0 + k as f32 * h, h, solver);
        visit(k + 1, &z);
    }
    z
}

/// Samples the flow: integrates noise `z0` from t = 0 to t = 1.
pub fn sample(
    field: &impl VelocityField,
    z0: Tensor<2>,
    steps: usize,
    solver: Solver,
) -> Tensor<2> {
    integrate_with(field, z0, (0.0, 1.0), steps, solver, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v(z, t) = a z + b t`: linear in z, so both methods have closed-form errors to compare.
    struct Linear {
        a: f32,
        b: f32,
    }

    impl VelocityField for Linear {
        fn velocity(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
            let d = z.dims()[1];
            z * self.a + t.unsqueeze_dim::<2>(1).repeat_dim(1, d) * self.b
        }
    }

    /// The exact solution of `dz/dt = a z + b t` from `z0` at t0 to t1.
    fn exact(a: f32, b: f32, z0: f32, t0: f32, t1: f32) -> f32 {
        let (a, b, z0, t0, t1) = (a as f64, b as f64, z0 as f64, t0 as f64, t1 as f64);
        // z = C e^{a t} - (b / a) t - b / a^2
        let part = |t: f64| -(b / a) * t - b / (a * a);
        let c = (z0 - part(t0)) / (a * t0).exp();
        (c * (a * t1).exp() + part(t1)) as f32
    }

    #[test]
    fn both_methods_converge_at_their_order_over_shapes_and_directions() {
        let dev = Device::flex();
        let field = Linear { a: -0.7, b: 0.5 };
        for (rows, d) in [(1, 1), (3, 2), (16, 5)] {
            let z0: Vec<f32> = (0..rows * d).map(|i| 0.3 + 0.1 * i as f32).collect();
            for (t0, t1) in [(0.0, 1.0), (1.0, 0.0)] {
                let err = |steps: usize, solver: Solver| -> f32 {
                    let z = Tensor::<2>::from_data(TensorData::new(z0.clone(), [rows, d]), &dev);
                    let out = integrate_with(&field, z, (t0, t1), steps, solver, |_, _| {});
                    assert_eq!(out.dims(), [rows, d]);
                    let got: Vec<f32> = out.try_into_vec_as::<f32>().unwrap();
                    got.iter()
                        .zip(&z0)
                        .map(|(g, &z)| (g - exact(-0.7, 0.5, z, t0, t1)).abs())
                        .fold(0.0, f32::max)
                };
                // Euler is first order (halving h halves the error), RK4 fourth order.
                let (e1, e2) = (err(20, Solver::Euler), err(40, Solver::Euler));
                assert!(
                    e1 > 0.0 && (e1 / e2 - 2.0).abs() < 0.2,
                    "Euler {e1} -> {e2}"
                );
                let (r1, r2) = (err(4, Solver::Rk4), err(8, Solver::Rk4));
                assert!(r1 < 1e-3 && r1 / r2 > 10.0, "RK4 {r1} -> {r2}");
            }
        }
    }

    #[test]
    fn a_pair_state_integrates_both_parts() {
        // (z, w) with dz/dt = z and dw/dt = 1: e and 1 at t = 1 from (1, 0).
        let dev = Device::flex();
        let s = (
            Tensor::<2>::ones([2, 3], &dev),
            Tensor::<1>::zeros([2], &dev),
        );
        let mut state = s;
        for k in 0..10 {
            state = step_with(
                |s: &(Tensor<2>, Tensor<1>), _| (s.0.clone(), Tensor::<1>::ones([2], &dev)),
                &state,
                k as f32 * 0.1,
                0.1,
                Solver::Rk4,
            );
        }
        let z: Vec<f32> = state.0.try_into_vec_as::<f32>().unwrap();
        let w: Vec<f32> = state.1.try_into_vec_as::<f32>().unwrap();
        assert!(
            z.iter().all(|v| (v - std::f32::consts::E).abs() < 1e-5),
            "{z:?}"
        );
        assert!(w.iter().all(|v| (v - 1.0).abs() < 1e-6), "{w:?}");
    }
}
