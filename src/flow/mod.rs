//! Flow matching: the velocity network, the linear path, ODE solvers and the exact likelihood.
//!
//! The solvers and the likelihood see only the [`VelocityField`] interface, never an architecture.

pub mod frozen;
pub mod likelihood;
pub mod model;
pub mod path;
pub mod solver;
pub mod store;

use burn::prelude::*;

pub use frozen::FrozenPrior;
pub use model::{VelocityMlp, VelocityMlpConfig};

/// A time-dependent velocity field `v(z, t)` on R^d (METHOD.md section 1).
pub trait VelocityField {
    /// The velocity at each row of `z` at the matching time in `t`.
    ///
    /// # Shapes
    /// - `z`: `[batch, d]`
    /// - `t`: `[batch]`
    /// - output: `[batch, d]`
    fn velocity(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2>;

    /// The velocity of every row of `z` at one shared time `t` (ODE steps, heatmaps); fields
    /// whose time conditioning is costly override it to compute that once.
    ///
    /// # Shapes
    /// - `z`: `[batch, d]`; output `[batch, d]`
    fn velocity_at(&self, z: Tensor<2>, t: f32) -> Tensor<2> {
        let n = z.dims()[0];
        let t = Tensor::<1>::full([n], t, &z.device());
        self.velocity(z, t)
    }
}

impl VelocityField for VelocityMlp {
    /// In training on the CPU, with the modulation read from a table of time built for the call
    /// ([`frozen::training_velocity`]); otherwise [`VelocityMlp::forward`].
    fn velocity(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
        frozen::training_velocity(self, z.clone(), t.clone()).unwrap_or_else(|| self.forward(z, t))
    }

    fn velocity_at(&self, z: Tensor<2>, t: f32) -> Tensor<2> {
        self.forward_at(z, t)
    }
}

/// Uploads host rows `[n, d]` to `device`.
pub fn rows_to_tensor(rows: &[f32], d: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(rows.to_vec(), [rows.len() / d, d]), device)
}

/// Downloads a `[n, d]` tensor as flat host rows.
pub fn tensor_to_rows(t: Tensor<2>) -> Vec<f32> {
    t.try_into_vec_as::<f32>()
        .expect("float tensors read back as f32")
}
