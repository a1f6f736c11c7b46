//! The flow head of MAR (the paper's "FlowLoss", METHOD.md section 7): the AdaLN MLP of
//! [`crate::flow::model`] whose condition is the time embedding plus `cond_embed(z)`, with z the
//! transformer's per-token condition.
//!
//! **Time convention of the generator: t = 1 is noise, t = 0 is data** (the reverse of the prior's,
//! METHOD.md section 1): `x_t = (1 - t) x + t noise`, the velocity target is `noise - x`, and
//! sampling integrates from t = 1 down to t = 0.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::silu;
use rand::RngExt;
use rand_distr::StandardNormal;

use crate::flow::model::{VelocityMlp, VelocityMlpConfig, time_embedding};
use crate::precision::Precision;
use crate::rng::Rng;

use super::block::dense;

/// Hyperparameters of [`FlowHead`].
#[derive(Config, Debug, PartialEq)]
pub struct FlowHeadConfig {
    /// Channels of a token (paper 32).
    pub token_dim: usize,
    /// Channels of the transformer's condition z (paper 768).
    pub cond_dim: usize,
    /// Width C of the AdaLN MLP (paper 1024).
    pub width: usize,
    /// Residual AdaLN blocks (paper 6).
    pub depth: usize,
    /// (t, noise) draws per token and training step (MAR's `diffusion_batch_mul`, paper 4).
    pub batch_mul: usize,
}

/// The flow head: `v(x_t, t | z)` for one token at a time.
#[derive(Module, Debug)]
pub struct FlowHead {
    /// The AdaLN MLP of METHOD.md section 4 (input projection, time MLP, blocks, final layer).
    pub net: VelocityMlp,
    /// `Linear(cond_dim, width)`, added to the time MLP's output before the SiLU that feeds every
    /// modulation.
    pub cond_embed: Linear,
    /// (t, noise) draws per token during training.
    pub batch_mul: usize,
}

impl FlowHeadConfig {
    /// The paper's head: width 1024, depth 6, 4 draws per token, for 32-dim tokens and a 768-dim z.
    pub fn paper() -> FlowHeadConfig {
        FlowHeadConfig::new(32, 768, 1024, 6, 4)
    }

    /// Builds the head: the AdaLN MLP's initialisation (zero modulations and output, so the
    /// initial velocity is exactly 0) and a Xavier-uniform `cond_embed` with zero bias.
    pub fn init(&self, rng: &mut Rng, device: &Device) -> FlowHead {
        FlowHead {
            net: VelocityMlpConfig::new(self.token_dim, self.width, self.depth).init(rng, device),
            cond_embed: dense(self.cond_dim, self.width, rng, device),
            batch_mul: self.batch_mul,
        }
    }
}

/// The (t, noise) draws of one training step of the head.
#[derive(Debug, Clone)]
pub struct HeadDraws {
    /// `[batch_mul * rows]`, uniform in [0, 1).
    pub t: Tensor<1>,
    /// `[batch_mul * rows, token_dim]`, standard normal.
    pub noise: Tensor<2>,
}

impl HeadDraws {
    /// Draws for `rows` tokens of `dim` channels, `mul` per token (row `k * rows + i` belongs to
    /// token `i`, as MAR's `repeat(diffusion_batch_mul, 1)` lays them out).
    pub fn sample(rng: &mut Rng, rows: usize, dim: usize, mul: usize, device: &Device) -> Self {
        let m = rows * mul;
        let t: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
        let noise: Vec<f32> = (0..m * dim)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        HeadDraws {
            t: Tensor::from_data(TensorData::new(t, [m]), device),
            noise: Tensor::from_data(TensorData::new(noise, [m, dim]), device),
        }
    }
}

impl FlowHead {
    /// The time MLP's output before the SiLU (`Linear -> SiLU -> Linear` on the sinusoid of t).
    fn time_condition(&self, t: Tensor<1>) -> Tensor<2> {
        let emb = time_embedding(t).cast(self.cond_embed.weight.val().dtype());
        self.net
            .time_fc2
            .forward(silu(self.net.time_fc1.forward(emb)))
    }

    /// The velocity `v(x_t, t | z)`.
    ///
    /// # Shapes
    /// - `x`: `[rows, token_dim]`, `t`: `[rows]`, `z`: `[rows, cond_dim]`
    /// - output: `[rows, token_dim]`
    pub fn forward(&self, x: Tensor<2>, t: Tensor<1>, z: Tensor<2>) -> Tensor<2> {
        let c = self.time_condition(t) + self.cond_embed.forward(z);
        self.net.forward_conditioned(x, silu(c))
    }

    /// The velocity of every row at one shared time `t` (the time MLP runs once, broadcast).
    ///
    /// # Shapes
    /// - `x`: `[rows, token_dim]`, `z`: `[rows, cond_dim]`; output `[rows, token_dim]`
    pub fn forward_at(&self, x: Tensor<2>, t: f32, z: Tensor<2>) -> Tensor<2> {
        let t = Tensor::<1>::full([1], t, &x.device());
        let c = self.time_condition(t) + self.cond_embed.forward(z); // [1, C] + [rows, C]
        self.net.forward_conditioned(x, silu(c))
    }

    /// The head's flow-matching loss over tokens `x` with conditions `z`: each token is repeated
    /// `batch_mul` times with its own (t, noise), `x_t = (1 - t) x + t noise`, and the loss is the
    /// mean over rows and channels of `(v(x_t, t | z) - (noise - x))^2` (MAR's masked mean, with
    /// only the masked tokens passed in). The network runs at `precision`, the loss in f32.
    ///
    /// # Shapes
    /// - `x`: `[rows, token_dim]` (f32), `z`: `[rows, cond_dim]` (compute dtype)
    /// - `draws`: `batch_mul * rows` rows
    /// - output: `[1]`
    pub fn loss(
        &self,
        x: Tensor<2>,
        z: Tensor<2>,
        draws: &HeadDraws,
        precision: Precision,
    ) -> Tensor<1> {
        let (x_t, target) = flow_pair(x.repeat_dim(0, self.batch_mul), draws);
        // t stays f32: its sinusoids are computed in f32 and cast at the time MLP's input.
        let v = self.forward(
            precision.input(x_t),
            draws.t.clone(),
            z.repeat_dim(0, self.batch_mul),
        );
        (Precision::output(v) - target).square().mean()
    }

    /// Samples one token per row of `noise` by [`euler_sample`], from `temperature * noise` at
    /// t = 1 over `points` time points; with `cfg`, `z` holds the conditional rows then as many
    /// unconditional ones, both halves start from the same noise, and
    /// `v = v_u + cfg (v_c - v_u)` on every channel.
    ///
    /// # Shapes
    /// - `z`: `[rows, cond_dim]`, or `[2 rows, cond_dim]` with `cfg`
    /// - `noise`: `[rows, token_dim]`; output `[rows, token_dim]`
    pub fn sample(
        &self,
        z: Tensor<2>,
        noise: Tensor<2>,
        points: usize,
        temperature: f32,
        cfg: Option<f32>,
    ) -> Tensor<2> {
        euler_sample(noise * temperature, points, cfg, |x, t| {
            self.forward_at(x, t, z.clone())
        })
    }
}

/// The interpolant and the velocity target of the generator's convention (t = 1 is noise):
/// `(x_t, target) = ((1 - t) x + t noise, noise - x)`.
///
/// # Shapes
/// - `x`: `[rows, d]`; `draws.t`: `[rows]`, `draws.noise`: `[rows, d]`; outputs `[rows, d]`
pub fn flow_pair(x: Tensor<2>, draws: &HeadDraws) -> (Tensor<2>, Tensor<2>) {
    let t = draws.t.clone().unsqueeze_dim::<2>(1); // [rows, 1]
    let x_t = x.clone() * (t.clone().neg() + 1.0) + draws.noise.clone() * t;
    (x_t, draws.noise.clone() - x)
}

/// The time points `linspace(1, 0, points)` of the sampler.
pub fn time_points(points: usize) -> Vec<f32> {
    let last = points.saturating_sub(1).max(1) as f64;
    (0..points)
        .map(|k| (1.0 - k as f64 / last) as f32)
        .collect()
}

/// Euler integration of `dx/dt = v(x, t)` from `x1` at t = 1 down to t = 0 over the time points
/// `linspace(1, 0, points)` (`points - 1` steps; the paper's head uses 100 points).
///
/// With `cfg = Some(w)`, `field` is evaluated on `[x; x]` (conditional rows first, then the same
/// rows again for the unconditional half, so both halves share the noise) and the step uses
/// `v_u + w (v_c - v_u)` on all channels.
///
/// # Shapes
/// - `x1`: `[rows, d]`; `field(x, t)`: `[m, d] -> [m, d]`; output `[rows, d]`
pub fn euler_sample(
    x1: Tensor<2>,
    points: usize,
    cfg: Option<f32>,
    field: impl Fn(Tensor<2>, f32) -> Tensor<2>,
) -> Tensor<2> {
    let ts = time_points(points);
    let rows = x1.dims()[0];
    let mut x = x1;
    for w in ts.windows(2) {
        let (t, dt) = (w[0], w[1] - w[0]);
        let v = match cfg {
            None => field(x.clone(), t),
            Some(scale) => {
                let both = field(Tensor::cat(vec![x.clone(), x.clone()], 0), t);
                let cond = both.clone().slice(0..rows);
                let uncond = both.slice(rows..2 * rows);
                uncond.clone() + (cond - uncond) * scale
            }
        };
        x = x + v * dt;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    fn rows(t: Tensor<2>) -> Vec<f32> {
        t.try_into_vec_as::<f32>().unwrap()
    }

    #[test]
    fn euler_with_the_point_mass_field_lands_on_the_point() {
        // Data = a point mass at p. Under x_t = (1 - t) p + t noise the exact velocity is
        // noise - p = (x_t - p) / t, and Euler from t = 1 to 0 reaches p exactly.
        let dev = Device::flex();
        let p = Tensor::<2>::from_data(TensorData::new(vec![1.5f32, -2.0, 0.25], [1, 3]), &dev);
        let noise = Tensor::<2>::from_data(
            TensorData::new(vec![0.3f32, 1.1, -0.7, -1.2, 0.4, 2.0], [2, 3]),
            &dev,
        );
        let field = |x: Tensor<2>, t: f32| (x - p.clone()) / t;
        for points in [2, 5, 100] {
            let x = rows(euler_sample(noise.clone(), points, None, field));
            for (i, v) in x.iter().enumerate() {
                let want = [1.5f32, -2.0, 0.25][i % 3];
                assert!((v - want).abs() < 1e-5, "{points} points: {x:?}");
            }
        }
        // With 3 points the first step, from t = 1 to 0.5, reaches the interpolant at t = 0.5,
        // (p + noise) / 2; a field that is 0 afterwards leaves it there.
        let n0 = rows(noise.clone());
        let mid = rows(euler_sample(noise.clone(), 3, None, |x, t| {
            if t < 0.75 {
                x * 0.0
            } else {
                (x - p.clone()) / t
            }
        }));
        for (i, v) in mid.iter().enumerate() {
            let want = 0.5 * ([1.5f32, -2.0, 0.25][i % 3] + n0[i]);
            assert!((v - want).abs() < 1e-5, "{mid:?}");
        }
        // Time points: linspace(1, 0, n).
        assert_eq!(time_points(5), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn cfg_combines_the_halves_with_shared_noise() {
        // Conditional rows see the point mass at a, unconditional rows the one at b: the guided
        // field (x - (b + w (a - b))) / t lands on b + w (a - b) for every w.
        let dev = Device::flex();
        let (a, b) = (2.0f32, -1.0f32);
        let noise = Tensor::<2>::from_data(TensorData::new(vec![0.5f32, -0.3], [2, 1]), &dev);
        let field = |x: Tensor<2>, t: f32| {
            let n = x.dims()[0] / 2;
            let centres: Vec<f32> = (0..2 * n).map(|i| if i < n { a } else { b }).collect();
            // Both halves hold the same state, so the noise is shared.
            let both = rows(x.clone());
            assert_eq!(both[..n], both[n..]);
            (x - Tensor::<2>::from_data(TensorData::new(centres, [2 * n, 1]), &dev)) / t
        };
        for w in [1.0f32, 2.5] {
            let x = rows(euler_sample(noise.clone(), 20, Some(w), field));
            for v in x {
                assert!((v - (b + w * (a - b))).abs() < 1e-5, "{w}: {v}");
            }
        }
    }

    #[test]
    fn loss_targets_follow_the_convention_and_a_fresh_head_predicts_zero() {
        let dev = Device::flex();
        let head = FlowHeadConfig::new(3, 8, 16, 1, 2).init(&mut rng_for(0, Stream::Init, 0), &dev);
        let x = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0], [2, 3]),
            &dev,
        );
        let draws = HeadDraws::sample(&mut rng_for(1, Stream::Mask, 0), 2, 3, 2, &dev);
        let (x_t, target) = flow_pair(x.clone().repeat_dim(0, 2), &draws);
        let (t, n) = (
            draws.t.clone().try_into_vec_as::<f32>().unwrap(),
            rows(draws.noise.clone()),
        );
        let (xs, xt, tg) = (rows(x.clone()), rows(x_t), rows(target));
        for r in 0..4 {
            for c in 0..3 {
                let (xv, nv) = (xs[(r % 2) * 3 + c], n[r * 3 + c]);
                assert!((xt[r * 3 + c] - ((1.0 - t[r]) * xv + t[r] * nv)).abs() < 1e-6);
                assert!((tg[r * 3 + c] - (nv - xv)).abs() < 1e-6);
            }
        }
        // The zero-initialised output makes the loss the mean square of the targets.
        let z = Tensor::<2>::ones([2, 8], &dev);
        let loss = head.loss(x, z, &draws, Precision::F32).into_scalar::<f32>();
        let want = tg.iter().map(|v| v * v).sum::<f32>() / tg.len() as f32;
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    }
}
