//! The exact log-likelihood of a flow model by the instantaneous change of variables (METHOD.md section 3):
//! `log p_1(x) = log N(z_0; 0, I) - integral_0^1 Tr grad v(z_s, s) ds`, integrated backwards from x at t = 1.

use burn::prelude::*;

use super::VelocityField;
use super::solver::{Solver, step_with};

/// The velocity and its exact divergence `Tr grad_z v(z, t)` at each row.
///
/// The divergence takes one backward pass over `d` stacked copies of the batch, copy `i` reading
/// `dv_i / dz_i` (rows do not interact in the network, so the result is exact). The field may hold
/// plain or autodiff parameters; the input is lifted to autodiff here.
///
/// # Shapes
/// - `z`: `[batch, d]`, `t`: `[batch]`
/// - output: (`[batch, d]` velocity, `[batch]` divergence), both without autodiff
pub fn velocity_and_divergence(
    field: &impl VelocityField,
    z: Tensor<2>,
    t: Tensor<1>,
) -> (Tensor<2>, Tensor<1>) {
    let d = z.dims()[1];
    let t_rep = t.inner().repeat_dim(0, d).autodiff(); // [d * batch]
    divergence_with(z, |z_rep| field.velocity(z_rep, t_rep))
}

/// [`velocity_and_divergence`] with one time shared by every row.
pub fn velocity_and_divergence_at(
    field: &impl VelocityField,
    z: Tensor<2>,
    t: f32,
) -> (Tensor<2>, Tensor<1>) {
    divergence_with(z, |z_rep| field.velocity_at(z_rep, t))
}

fn divergence_with(
    z: Tensor<2>,
    velocity: impl FnOnce(Tensor<2>) -> Tensor<2>,
) -> (Tensor<2>, Tensor<1>) {
    let [batch, d] = z.dims();
    let z_rep = z.inner().repeat_dim(0, d).autodiff().require_grad(); // [d * batch, d]
    let mut mask = vec![0.0f32; d * batch * d];
    for i in 0..d {
        for b in 0..batch {
            mask[(i * batch + b) * d + i] = 1.0;
        }
    }
    let mask = Tensor::<2>::from_data(
        TensorData::new(mask, [d * batch, d]),
        &z_rep.device().inner(),
    );
    let v_rep = velocity(z_rep.clone()); // [d * batch, d]
    let grads = (v_rep.clone() * mask.clone()).sum().backward();
    let jac_rows = z_rep.grad(&grads).expect("the input requires grad").inner(); // [d * batch, d]
    let div = (jac_rows * mask)
        .sum_dim(1) // [d * batch, 1]
        .reshape([d, batch])
        .sum_dim(0) // [1, batch]
        .reshape([batch]);
    let v = v_rep.inner().slice(0..batch); // [batch, d]
    (v, div)
}

/// Exact `log p_1(x)` of the flow at each row of `x`, by RK4 on the augmented ODE from t = 1 to t = 0.
///
/// # Shapes
/// - `x`: `[batch, d]`; output `[batch]`
pub fn log_prob(field: &impl VelocityField, x: Tensor<2>, steps: usize) -> Tensor<1> {
    let [batch, d] = x.dims();
    let dev = x.device().inner();
    let h = -1.0 / steps as f32;
    // The state: z, and the integral of the divergence from t = 1 down to the current time.
    let mut state = (x.inner(), Tensor::<1>::zeros([batch], &dev));
    let slope =
        |s: &(Tensor<2>, Tensor<1>), t: f32| velocity_and_divergence_at(field, s.0.clone(), t);
    for k in 0..steps {
        let t = 1.0 + k as f32 * h;
        state = step_with(slope, &state, t, h, Solver::Rk4);
    }
    let (z, div_integral) = state;
    // div_integral = integral_1^0 div = -integral_0^1 div.
    let log_normal = (z.clone() * z).sum_dim(1).reshape([batch]) * (-0.5)
        - 0.5 * d as f32 * (2.0 * std::f32::consts::PI).ln();
    log_normal + div_integral
}
