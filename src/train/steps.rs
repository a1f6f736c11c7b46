//! The two flow-matching steps of the method, both on the one [`Trainer`] path: training the prior
//! (the flow-matching loss on data) and aligning free latents (the same loss on the latents,
//! network frozen: `L_align`, METHOD.md section 2).

use burn::module::Param;
use burn::prelude::*;

use super::{StepStats, Trainer};
use crate::align::{Reduction, align_loss, flow_loss};
use crate::error::Result;
use crate::flow::path::PathDraws;
use crate::flow::{VelocityField, VelocityMlp, rows_to_tensor, tensor_to_rows};
use crate::precision::AtPrecision;
use crate::rng::Rng;

/// The prior's flow-matching loss averages the squared error over dimensions (the public code's
/// `.mean()`; METHOD.md section 6), in the toy and on features alike.
pub const PRIOR_REDUCTION: Reduction = Reduction::Mean;

/// Trains a velocity network by flow matching (METHOD.md section 1), one step per call.
pub type PriorTrainer = Trainer<VelocityMlp>;

/// One replica's part of a data-parallel flow-matching step (see [`Trainer::train_step_sharded`]).
#[derive(Debug, Clone)]
pub struct Shard {
    /// Where the replica runs (without autodiff).
    pub device: Device,
    /// `[rows, d]` on `device` with autodiff.
    pub x: Tensor<2>,
    /// One (t, eps) per row of `x`, on `device` with autodiff.
    pub draws: PathDraws,
    /// The shard's share of the whole batch (its rows / all rows).
    pub weight: f32,
}

impl Trainer<VelocityMlp> {
    /// One optimiser step on the batch `x` with path draws `draws` (one row of `x` per draw).
    ///
    /// # Shapes
    /// - `x`: `[batch, d]`; `draws`: `t [batch]`, `eps [batch, d]`
    pub fn train_step(&mut self, x: Tensor<2>, draws: &PathDraws) -> Result<StepStats> {
        let compute = self.compute_model();
        let field = AtPrecision {
            field: &compute,
            precision: self.precision,
        };
        let loss = flow_loss(&field, x, draws, PRIOR_REDUCTION);
        self.step_loss(loss, "prior training")
    }

    /// One data-parallel flow-matching step over `shards` (see [`Trainer::step_sharded`]).
    ///
    /// With shards that partition a batch, this is [`Trainer::train_step`] on the whole batch up
    /// to float summation order.
    pub fn train_step_sharded(&mut self, shards: Vec<Shard>) -> Result<StepStats> {
        let precision = self.precision;
        let shards = shards.into_iter().map(|s| (s.device.clone(), s)).collect();
        let (stats, _) = self.step_sharded(shards, "prior training", |replica, shard: Shard| {
            let field = AtPrecision {
                field: replica,
                precision,
            };
            (
                flow_loss(&field, shard.x, &shard.draws, PRIOR_REDUCTION) * shard.weight,
                (),
            )
        })?;
        Ok(stats)
    }
}

/// Learnable latents y: the only parameters of the alignment stage.
#[derive(Module, Debug)]
pub struct Latents {
    /// `[n, d]`
    pub y: Param<Tensor<2>>,
}

/// Aligns latents to a frozen prior by descending `L_align` (METHOD.md section 2), one step per call.
pub type LatentTrainer = Trainer<Latents>;

impl Trainer<Latents> {
    /// Adam at a constant `lr` on the latents starting at the flat rows `y0` of dimension `d`, on
    /// `device` (autodiff is enabled here), over `total` steps.
    pub fn for_latents(y0: &[f32], d: usize, lr: f64, total: usize, device: &Device) -> Self {
        let y = rows_to_tensor(y0, d, &device.clone().autodiff());
        let latents = Latents {
            y: Param::from_tensor(y),
        };
        Trainer::new(latents, lr, super::Schedule::Constant, total)
    }

    /// One step down `L_align` of the latents (`mc` draws each from `rng`) under the frozen `prior`
    /// (plain, non-autodiff parameters: a [`crate::flow::FrozenPrior`] tabulates its modulation);
    /// returns the loss before the step.
    pub fn align_step(
        &mut self,
        prior: &impl VelocityField,
        mc: usize,
        reduction: Reduction,
        rng: &mut Rng,
    ) -> Result<f32> {
        let loss = align_loss(prior, self.model().y.val(), mc, reduction, rng);
        self.step_loss(loss, "alignment").map(|s| s.loss)
    }

    /// The current latents as flat rows.
    pub fn latents(&self) -> Vec<f32> {
        tensor_to_rows(self.model().y.val().inner())
    }
}
