//! An exponential moving average of a module's weights, with diffusers' warm-up.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;

use crate::params::CollectParams;

/// An exponential moving average of a module's parameters: `ema = d * ema + (1 - d) * live`.
///
/// The decay warms up as in diffusers' `EMAModel`: update `n` (from 0) uses
/// `d = min(decay, (1 + n) / (10 + n))`, so a short run's average is not stuck near the
/// initial weights. The average lives without autodiff; parameters are matched by their order in
/// the module.
#[derive(Debug, Clone)]
pub struct Ema<M: Module> {
    /// The averaged module (no autodiff).
    pub module: M,
    /// Weight of the old average per update, once warmed up.
    pub decay: f64,
    /// Updates so far.
    pub updates: u64,
}

struct BlendParams {
    live: std::vec::IntoIter<Tensor<1>>,
    decay: f64,
}

impl ModuleMapper for BlendParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let live = self
            .live
            .next()
            .expect("the EMA and the live module have the same parameters");
        let decay = self.decay;
        param.map(|avg| {
            let shape = avg.shape();
            avg * decay + live.reshape(shape) * (1.0 - decay)
        })
    }
}

impl<M: Module> Ema<M> {
    /// Starts the average at the live module's current values.
    pub fn new(live: &M, decay: f64) -> Self {
        Ema {
            module: live.valid(),
            decay,
            updates: 0,
        }
    }

    /// Blends the live parameters into the average.
    pub fn update(&mut self, live: &M) {
        let mut collect = CollectParams(Vec::new());
        live.visit(&mut collect);
        let n = self.updates as f64;
        let mut blend = BlendParams {
            live: collect.0.into_iter(),
            decay: self.decay.min((1.0 + n) / (10.0 + n)),
        };
        self.module = self.module.clone().map(&mut blend);
        self.updates += 1;
    }
}
