//! The optimiser of a run as data: Adam(W) settings, the learning-rate schedule, and the global
//! gradient-norm clip (METHOD.md section 6).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fused::adam::FusedAdam;

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum Schedule {
    /// A constant learning rate.
    Constant,
    /// Linear warm-up over `warmup` steps, then cosine decay to `final_frac` x lr at the last step.
    Cosine { warmup: usize, final_frac: f64 },
}

impl Schedule {
    /// The learning rate at `step` (0-based) of `total` steps for base rate `lr`.
    pub fn lr(&self, lr: f64, step: usize, total: usize) -> f64 {
        match *self {
            Schedule::Constant => lr,
            Schedule::Cosine { warmup, final_frac } => {
                if step < warmup {
                    return lr * (step + 1) as f64 / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                lr * (final_frac + (1.0 - final_frac) * cosine)
            }
        }
    }
}

/// The optimiser of a training run: Adam(W) with optional global gradient-norm clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSpec {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (AdamW); 0 gives plain Adam.
    pub weight_decay: f32,
    /// Clip the global L2 norm of all gradients to this value (PyTorch's `clip_grad_norm_`); 0 = off.
    pub grad_clip: f32,
}

impl OptimSpec {
    /// The toy's Adam: betas (0.9, 0.999), PyTorch's epsilon 1e-8 (burn's default is 1e-5), no clipping.
    pub const ADAM: OptimSpec = OptimSpec {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        grad_clip: 0.0,
    };

    /// METHOD.md section 6: AdamW (0.9, 0.95), weight decay 1e-4, gradient-norm clip 1.0.
    pub const PAPER_ADAMW: OptimSpec = OptimSpec {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 1e-4,
        grad_clip: 1.0,
    };

    /// Adam (weight decay 0) or AdamW: burn's, in one pass per parameter on the CPU
    /// ([`FusedAdam`], identical results and state).
    pub(crate) fn build(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(FusedAdam::new(
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
        ))
    }
}

/// Sums the squared gradients of a module's float parameters.
struct GradSquares<'a> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<1>>,
}

impl ModuleVisitor for GradSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sums.push(g.square().sum());
        }
    }
}

/// Multiplies every gradient of a module's float parameters by `factor`.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f32,
}

impl ModuleVisitor for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}

/// The global L2 norm of `grads` over `module`'s parameters; when above `max_norm` (> 0), every
/// gradient is scaled by `max_norm / (norm + 1e-6)` as PyTorch's `clip_grad_norm_` does.
///
/// Returns the norm before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    let mut squares = GradSquares {
        grads,
        sums: Vec::new(),
    };
    module.visit(&mut squares);
    if squares.sums.is_empty() {
        return 0.0;
    }
    let norm = Tensor::cat(squares.sums, 0)
        .sum()
        .sqrt()
        .into_scalar::<f32>();
    if max_norm > 0.0 && norm > max_norm {
        module.visit(&mut ScaleGrads {
            grads,
            factor: max_norm / (norm + 1e-6),
        });
    }
    norm
}
