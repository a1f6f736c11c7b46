//! The generator's weight-decay rule: AdamW decays matrices only, sparing 1-D parameters (biases,
//! norm scales and shifts) and the whole flow head (MAR's `add_weight_decay` skips everything under
//! `diffloss`; METHOD.md section 7). The trainer applies it through [`DecayRule`].
//!
//! The rule names module paths, which the architecture fixes, so a resumed run rebuilds the same
//! parameter groups and its saved per-parameter optimiser state lands in the right one.

use crate::train::DecayRule;

/// The flow head's module path in a [`super::Generator`] (the enum variant, then the field).
const HEAD: &str = "Mar.head";

/// AdamW's decay rule for a [`super::Generator`].
pub fn decay_rule() -> DecayRule {
    DecayRule::matrices().sparing(HEAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Generator;
    use crate::generator::head::FlowHeadConfig;
    use crate::generator::mar::MarConfig;
    use crate::params::param_values;
    use crate::rng::{Stream, rng_for};
    use crate::train::OptimSpec;
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::prelude::*;

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
        let mut optim = spec.build(&model, &decay_rule());
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
