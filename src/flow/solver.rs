//! ODE solvers for `dz/dt = v(z, t)` (SPEC section 1: sampling runs from t = 0, noise, to t = 1, data).

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

/// One step of size `h` from time `t`.
fn step(field: &impl VelocityField, z: Tensor<2>, t: f32, h: f32, solver: Solver) -> Tensor<2> {
    match solver {
        Solver::Euler => z.clone() + field.velocity_at(z, t) * h,
        Solver::Rk4 => {
            let k1 = field.velocity_at(z.clone(), t);
            let k2 = field.velocity_at(z.clone() + k1.clone() * (h / 2.0), t + h / 2.0);
            let k3 = field.velocity_at(z.clone() + k2.clone() * (h / 2.0), t + h / 2.0);
            let k4 = field.velocity_at(z.clone() + k3.clone() * h, t + h);
            z + (k1 + k2 * 2.0 + k3 * 2.0 + k4) * (h / 6.0)
        }
    }
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
