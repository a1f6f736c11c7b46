//! The generator's optimiser: AdamW whose weight decay spares 1-D parameters, biases and the flow
//! head (MAR's `add_weight_decay`, METHOD.md section 7).
//!
//! burn 0.22's `ModuleOptimizer` optimises parameter groups with different optimisers
//! (`with_group(ParamGroup, optimizer, clipping)`; the last matching group wins). The groups here
//! are the parameters' module paths, which are fixed by the architecture, so the same optimiser
//! can be rebuilt for a resumed run and its saved per-parameter state (which records each
//! parameter's path) lands in the right group.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::prelude::*;

use crate::train::OptimSpec;

/// The path component of the flow head in [`super::mar::MarGenerator`] (MAR skips decay on
/// every parameter under `diffloss`; ours is `head`).
const HEAD: &str = "head";

/// Collects the dotted module path of every float parameter that weight decay must skip.
struct NoDecay {
    path: Vec<String>,
    out: Vec<String>,
}

impl ModuleVisitor for NoDecay {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
        let is_bias = self.path.last().is_some_and(|n| n == "bias");
        let in_head = self.path.iter().any(|n| n == HEAD);
        if D == 1 || is_bias || in_head {
            self.out.push(self.path.join("."));
        }
    }
}

/// The module paths (as burn's optimiser sees them when stepping `model`) of the parameters
/// without weight decay: every 1-D parameter (LayerNorm scales and shifts, biases), every `bias`,
/// and everything under the flow head.
pub fn no_decay_paths<M: Module>(model: &M) -> Vec<String> {
    let mut v = NoDecay {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// AdamW with `spec`'s betas, epsilon and weight decay on every parameter of `model` except
/// those of [`no_decay_paths`], which get the same AdamW without decay. Gradient clipping is not
/// part of it (the trainer clips the global norm, `spec.grad_clip`).
///
/// Build it for the same module type the optimiser will step (a [`super::Generator`] and a bare
/// [`super::mar::MarGenerator`] have different paths).
pub fn gen_optimizer<M: Module>(model: &M, spec: &OptimSpec) -> ModuleOptimizer {
    let adamw = AdamWConfig::new()
        .with_beta_1(spec.beta1)
        .with_beta_2(spec.beta2)
        .with_epsilon(spec.eps);
    ModuleOptimizer::from(adamw.clone().with_weight_decay(spec.weight_decay).build()).with_group(
        ParamGroup::from_paths(no_decay_paths(model)),
        adamw.with_weight_decay(0.0).build(),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Generator;
    use crate::generator::head::FlowHeadConfig;
    use crate::generator::mar::MarConfig;
    use crate::rng::{Stream, rng_for};
    use crate::train::param_values;
    use burn::optim::GradientsParams;

    /// Registers a zero gradient for every float parameter.
    struct ZeroGrads(GradientsParams);

    impl ModuleVisitor for ZeroGrads {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let v = param.val().inner();
            self.0.register(param.id, v.zeros_like());
        }
    }

    /// Per float parameter, in visiting order: (rank, path, elements).
    struct Shapes(Vec<String>, Vec<(usize, String, usize)>);

    impl ModuleVisitor for Shapes {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().shape().num_elements();
            self.1.push((D, self.0.join("."), n));
        }
    }

    #[test]
    fn decay_spares_1d_parameters_biases_and_the_head() {
        let dev = Device::flex().autodiff();
        let cfg = MarConfig::new(4, 2, 1, 3, 8, 1, 1, 2, 2, 0.0, 0.0, 0.1);
        let model = Generator::Mar(cfg.init_generator(
            &FlowHeadConfig::new(2, 8, 8, 1, 1),
            &mut rng_for(0, Stream::Init, 0),
            &dev,
        ));
        let spec = OptimSpec {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_clip: 0.0,
        };
        let mut optim = gen_optimizer(&model, &spec);
        let mut shapes = Shapes(Vec::new(), Vec::new());
        model.visit(&mut shapes);
        let mut zeros = ZeroGrads(GradientsParams::new());
        model.visit(&mut zeros);
        // With zero gradients Adam's update is 0, so a step only applies the decay.
        let before = param_values(&model);
        let lr = 0.1;
        let after = param_values(&optim.step(lr, model, zeros.0));
        let (mut at, mut decayed, mut spared) = (0, Vec::new(), Vec::new());
        for (rank, path, n) in &shapes.1 {
            let (b, a) = (&before[at..at + n], &after[at..at + n]);
            at += n;
            let want_decay = *rank > 1 && !path.contains(".head.");
            let factor = if want_decay {
                1.0 - lr as f32 * 0.5
            } else {
                1.0
            };
            for (x, y) in b.iter().zip(a) {
                assert!((x * factor - y).abs() < 1e-6, "{path}: {x} -> {y}");
            }
            if want_decay {
                decayed.push(path.clone());
            } else {
                spared.push(path.clone());
            }
        }
        assert_eq!(at, before.len());
        // Both groups hold what MAR's `add_weight_decay` puts there.
        assert!(decayed.iter().any(|p| p.ends_with("qkv.weight")));
        assert!(decayed.iter().any(|p| p.ends_with("encoder_pos")));
        assert!(decayed.iter().any(|p| p.ends_with("class_emb.weight")));
        assert!(decayed.iter().any(|p| p.ends_with("fake_latent")));
        assert!(spared.iter().any(|p| p.ends_with("qkv.bias")));
        assert!(spared.iter().any(|p| p.ends_with("q_norm.gamma")));
        assert!(
            spared
                .iter()
                .any(|p| p.contains(".head.") && p.ends_with("weight"))
        );
    }
}
