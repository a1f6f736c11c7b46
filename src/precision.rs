//! Mixed precision: f32 master weights with the forward pass computed in bf16.
//!
//! burn 0.22 has no autocast, so a bf16 step does by hand what PyTorch's `autocast(bfloat16)` does
//! for a module: every parameter is cast to bf16 at use, *inside* the autodiff graph (burn's cast
//! backward casts the gradient back), and the inputs are cast at the network's boundary. The
//! parameters the optimiser sees, their gradients, the Adam(W) moments and the EMA stay f32; the
//! outputs are cast back to f32 before the losses, so the loss reductions run in f32. Inside the
//! network (LayerNorm, softmax, residual stream) tensors are stored in bf16; the flex CPU backend
//! accumulates bf16 matmuls and sums in f32, GPU backends as their kernels do.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::flow::VelocityField;

/// The dtype a training step computes its forward pass in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Forward pass in bf16 (parameters and inputs cast at use); master weights, gradients,
    /// optimiser state, EMA and loss reductions in f32. Meant for GPUs: on the CPU backend bf16 is
    /// emulated and slower than f32.
    Bf16,
}

impl Precision {
    /// The compute dtype.
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// `module` with every float parameter cast to the compute dtype, each cast recorded by
    /// autodiff so gradients reach the (f32) parameters of `module`; the same module at f32.
    ///
    /// Parameter ids are kept, but gradients must be read with the original module
    /// (`GradientsParams::from_grads(grads, &original)`): the cast parameters are not leaves.
    pub fn cast_params<M: Module>(self, module: M) -> M {
        match self {
            Precision::F32 => module,
            Precision::Bf16 => module.map(&mut CastParams(self.dtype())),
        }
    }

    /// A network input cast to the compute dtype (a no-op at f32).
    pub fn input<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        x.cast(self.dtype())
    }

    /// A network output cast back to f32 for the losses (a no-op at f32).
    pub fn output<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        x.cast(FloatDType::F32)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Casts every float parameter (keeping its id) to a dtype.
struct CastParams(FloatDType);

impl ModuleMapper for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

/// A velocity field evaluated at a compute precision: `z` enters at the compute dtype (the field's
/// parameters must already be cast, see [`Precision::cast_params`]), `t` stays f32 (the network
/// builds its time embedding in f32), and the velocity comes back as f32.
pub struct AtPrecision<'a, F> {
    pub field: &'a F,
    pub precision: Precision,
}

impl<F: VelocityField> VelocityField for AtPrecision<'_, F> {
    fn velocity(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
        Precision::output(self.field.velocity(self.precision.input(z), t))
    }

    fn velocity_at(&self, z: Tensor<2>, t: f32) -> Tensor<2> {
        Precision::output(self.field.velocity_at(self.precision.input(z), t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;

    fn ramp(n: usize, m: usize, seed: f32, dev: &Device) -> Tensor<2> {
        let v: Vec<f32> = (0..n * m)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        Tensor::from_data(TensorData::new(v, [n, m]), dev)
    }

    /// The probe behind this module: on flex with autodiff, bf16 matmuls of casts of f32 leaves
    /// give f32 gradients on the leaves, close to the f32 ones; the ops the networks use run in
    /// bf16; and mixing dtypes in one op is a loud panic, not silent garbage.
    #[test]
    fn bf16_casts_carry_gradients_back_to_f32_leaves() {
        let dev = Device::flex().autodiff();
        let x = ramp(8, 16, 1.0, &dev);
        let w = ramp(16, 4, 2.0, &dev).require_grad();
        let y = Precision::Bf16
            .input(x.clone())
            .matmul(w.clone().cast(FloatDType::BF16));
        assert_eq!(y.dtype(), DType::BF16);
        let grads = Precision::output(y).sum().backward();
        let g = w.grad(&grads).expect("the f32 leaf has a gradient");
        assert_eq!(g.dtype(), DType::F32);
        let w32 = ramp(16, 4, 2.0, &dev).require_grad();
        let g32 = w32
            .grad(&x.matmul(w32.clone()).sum().backward())
            .expect("gradient");
        let (a, b): (Vec<f32>, Vec<f32>) =
            (g.try_into_vec_as().unwrap(), g32.try_into_vec_as().unwrap());
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-2 * b.abs().max(1.0), "{a} vs {b}");
        }

        let h = ramp(4, 8, 3.0, &dev).cast(FloatDType::BF16);
        let ln = burn::nn::LayerNormConfig::new(8).init(&dev);
        let ln = Precision::Bf16.cast_params(ln);
        for (name, t) in [
            ("exp", h.clone().exp()),
            ("silu", burn::tensor::activation::silu(h.clone())),
            ("gelu", burn::tensor::activation::gelu(h.clone())),
            ("softmax", burn::tensor::activation::softmax(h.clone(), 1)),
            ("cos", h.clone().cos()),
            ("layer norm", ln.forward(h.clone())),
        ] {
            assert_eq!(t.dtype(), DType::BF16, "{name}");
            let v: Vec<f32> = Precision::output(t).try_into_vec_as().unwrap();
            assert!(v.iter().all(|v| v.is_finite()), "{name}");
        }
        let f = ramp(4, 8, 3.0, &dev);
        let mixed = std::panic::catch_unwind(|| f + h);
        assert!(mixed.is_err(), "flex refuses f32 + bf16");
    }
}
