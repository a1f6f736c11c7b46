//! The optimiser of a run as data: Adam(W) settings, which parameters the weight decay reaches,
//! the learning-rate schedule, and the global gradient-norm clip (METHOD.md section 6).

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
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

    /// The optimiser for `module`: Adam, or AdamW whose decay reaches only the parameters `rule`
    /// decays (the others get the same Adam without decay, through a burn parameter group).
    /// Both are burn's, run in one pass per parameter on the CPU ([`FusedAdam`], identical
    /// results and state).
    pub(crate) fn build<M: Module>(&self, module: &M, rule: &DecayRule) -> ModuleOptimizer {
        let adam = FusedAdam::new(self.beta1, self.beta2, self.eps, 0.0);
        if self.weight_decay == 0.0 {
            return ModuleOptimizer::from(adam);
        }
        let adamw = FusedAdam::new(self.beta1, self.beta2, self.eps, self.weight_decay);
        let kept = undecayed_paths(module, rule);
        let optim = ModuleOptimizer::from(adamw);
        if kept.is_empty() {
            optim
        } else {
            // Matched by path, not by id, so a resumed optimiser state finds its group again.
            optim.with_group(ParamGroup::from_paths(kept), adam, None)
        }
    }
}

/// Which parameters AdamW's decoupled weight decay reaches (METHOD.md sections 6 and 7): by rank
/// and by module path. The public code decays matrices only, sparing 1-D parameters (biases,
/// LayerNorm scales and shifts); the generator also spares its flow head.
///
/// burn 0.22's `AdamW` decays every parameter it steps; the rule is applied by giving the spared
/// parameters their own burn parameter group, stepped by the same Adam without decay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecayRule {
    /// Parameters of lower rank are spared (2: matrices and higher are decayed; 0: everything).
    pub min_rank: usize,
    /// Parameters under any of these module paths (`head`, `blocks.3`) are spared.
    pub spared: Vec<String>,
}

impl Default for DecayRule {
    fn default() -> Self {
        Self::matrices()
    }
}

impl DecayRule {
    /// Decay parameters of rank 2 and more (the public code's rule).
    pub fn matrices() -> Self {
        DecayRule {
            min_rank: 2,
            spared: Vec::new(),
        }
    }

    /// Decay every parameter (burn's plain AdamW).
    pub fn everything() -> Self {
        DecayRule {
            min_rank: 0,
            spared: Vec::new(),
        }
    }

    /// Also spare every parameter under the submodule `path` (e.g. `head`).
    pub fn sparing(mut self, path: impl Into<String>) -> Self {
        self.spared.push(path.into());
        self
    }

    /// Whether a parameter of `rank` at the dotted module `path` is decayed.
    pub fn decays(&self, rank: usize, path: &str) -> bool {
        rank >= self.min_rank
            && !self.spared.iter().any(|p| {
                path == p
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
    }
}

/// Collects the dotted paths of float parameters (as burn's optimiser names them) that a rule
/// spares.
struct Spared<'a> {
    rule: &'a DecayRule,
    path: Vec<String>,
    out: Vec<String>,
}

impl ModuleVisitor for Spared<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        if !self.rule.decays(D, &path) {
            self.out.push(path);
        }
    }
}

/// The dotted paths of `module`'s float parameters that `rule` spares from weight decay.
pub fn undecayed_paths<M: Module>(module: &M, rule: &DecayRule) -> Vec<String> {
    let mut v = Spared {
        rule,
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
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
