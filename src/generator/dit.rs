//! A DiT over the 64 latent tokens: the non-autoregressive alternative to MAR that SoftVQ and
//! LightningDiT users run on 1-D tokenizers.
//!
//! **This is not the paper's generator** (that is MAR-B with a flow head, [`super::mar`]); it is
//! here to compare latents under a second, common generator. Design: a learned position embedding
//! per token, adaLN-Zero blocks conditioned on the time embedding plus a class embedding (with an
//! extra "null" class for classifier-free guidance, chosen with probability `class_dropout` during
//! training), the attention of [`super::block`] with qk-norm, and a zero-initialised final layer.
//!
//! Time convention, as the flow head's (METHOD.md section 7): **t = 1 is noise**,
//! `x_t = (1 - t) x + t noise`, target `noise - x`, Euler from t = 1 to 0 with CFG on all channels.

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, Embedding, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu, silu};
use rand::RngExt;
use rand_distr::StandardNormal;

use super::block::{Attention, LN_EPS, dense, normal};
use super::head::euler_sample;
use crate::flow::model::{FREQ_DIM, Init, linear, time_embedding};
use crate::precision::Precision;
use crate::rng::Rng;

/// Hyperparameters of [`Dit`].
#[derive(Config, Debug, PartialEq)]
pub struct DitConfig {
    /// Tokens per latent (64).
    pub seq_len: usize,
    /// Channels of a token (32).
    pub token_dim: usize,
    /// Classes; the class embedding has one more row, the null class.
    pub classes: usize,
    /// Width (DiT-B: 768).
    pub width: usize,
    /// Blocks (DiT-B: 12).
    pub depth: usize,
    /// Attention heads (DiT-B: 12).
    pub heads: usize,
    /// MLP width / width (4).
    pub mlp_ratio: usize,
    /// Probability that a training label is replaced by the null class (0.1).
    pub class_dropout: f64,
    /// Dropout on attention weights during training (DiT: 0).
    pub attn_dropout: f64,
    /// Dropout after the attention projection and in the MLP during training (DiT: 0).
    pub proj_dropout: f64,
}

/// A DiT block: adaLN-Zero modulated attention and MLP.
#[derive(Module, Debug)]
pub struct DitBlock {
    pub attn: Attention,
    pub fc1: Linear,
    pub fc2: Linear,
    pub mlp_drop: Dropout,
    /// `Linear(C, 6C)` on SiLU(c): shift, scale and gate of attention and MLP; zero-initialised,
    /// so every block starts as the identity.
    pub modulation: Linear,
}

/// The DiT velocity network `v(x_t, t, y)` over all tokens at once.
#[derive(Module, Debug)]
pub struct Dit {
    /// `Linear(token_dim, C)`.
    pub x_embed: Linear,
    /// `[1, seq_len, C]`.
    pub pos: Param<Tensor<3>>,
    pub time_fc1: Linear,
    pub time_fc2: Linear,
    /// `Embedding(classes + 1, C)`; row `classes` is the null class.
    pub class_emb: Embedding,
    pub blocks: Vec<DitBlock>,
    /// `Linear(C, 2C)` on SiLU(c): shift and scale of the final norm; zero-initialised.
    pub final_modulation: Linear,
    /// `Linear(C, token_dim)`; zero-initialised, so the initial velocity is 0.
    pub final_out: Linear,
    /// Real classes (the null class is this index).
    pub classes: usize,
    /// Training probability of the null class.
    pub class_dropout: f64,
}

impl DitConfig {
    /// DiT-B on 64 tokens of 32 channels and 1000 classes.
    pub fn base() -> DitConfig {
        DitConfig::new(64, 32, 1000, 768, 12, 12, 4, 0.1, 0.0, 0.0)
    }

    /// Builds the DiT: Xavier-uniform linears, N(0, 0.02^2) embeddings and time MLP, zero
    /// modulations and output layer (adaLN-Zero).
    pub fn init(&self, rng: &mut Rng, device: &Device) -> Dit {
        let c = self.width;
        Dit {
            x_embed: dense(self.token_dim, c, rng, device),
            pos: normal([1, self.seq_len, c], rng, device),
            time_fc1: linear(FREQ_DIM, c, Init::Normal(0.02), rng, device),
            time_fc2: linear(c, c, Init::Normal(0.02), rng, device),
            class_emb: Embedding {
                weight: normal([self.classes + 1, c], rng, device),
            },
            blocks: (0..self.depth)
                .map(|_| DitBlock {
                    attn: Attention::new(
                        c,
                        self.heads,
                        self.attn_dropout,
                        self.proj_dropout,
                        rng,
                        device,
                    ),
                    fc1: dense(c, self.mlp_ratio * c, rng, device),
                    fc2: dense(self.mlp_ratio * c, c, rng, device),
                    mlp_drop: DropoutConfig::new(self.proj_dropout).init(),
                    modulation: linear(c, 6 * c, Init::Zeros, rng, device),
                })
                .collect(),
            final_modulation: linear(c, 2 * c, Init::Zeros, rng, device),
            final_out: linear(c, self.token_dim, Init::Zeros, rng, device),
            classes: self.classes,
            class_dropout: self.class_dropout,
        }
    }
}

/// LayerNorm over the last dimension without affine parameters (DiT's `elementwise_affine=False`).
fn layer_norm_plain(x: Tensor<3>) -> Tensor<3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean) / var.add_scalar(LN_EPS).sqrt()
}

/// `x * (1 + scale) + shift` with per-sample modulations.
///
/// # Shapes
/// - `x`: `[batch, tokens, C]`, `shift`, `scale`: `[batch, C]`; output `[batch, tokens, C]`
fn modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    x * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim::<3>(1)
}

impl DitBlock {
    /// # Shapes
    /// - `x`: `[batch, tokens, C]`, `c_act`: `[batch, C]` (SiLU of the condition)
    /// - output: `[batch, tokens, C]`
    pub fn forward(&self, x: Tensor<3>, c_act: Tensor<2>) -> Tensor<3> {
        let mut m = self.modulation.forward(c_act).chunk(6, 1); // 6 x [b, C]
        let mut next = || m.remove(0);
        let (shift_a, scale_a, gate_a) = (next(), next(), next());
        let (shift_m, scale_m, gate_m) = (next(), next(), next());
        let a = self.attn.forward(
            modulate(layer_norm_plain(x.clone()), shift_a, scale_a),
            None,
        );
        let x = x + a * gate_a.unsqueeze_dim::<3>(1);
        let h = modulate(layer_norm_plain(x.clone()), shift_m, scale_m);
        let h = self.mlp_drop.forward(gelu(self.fc1.forward(h)));
        let h = self.mlp_drop.forward(self.fc2.forward(h));
        x + h * gate_m.unsqueeze_dim::<3>(1)
    }
}

impl Dit {
    /// Tokens per latent.
    pub fn seq_len(&self) -> usize {
        self.pos.dims()[1]
    }

    /// Channels of a token.
    pub fn token_dim(&self) -> usize {
        self.x_embed.weight.dims()[0]
    }

    /// SiLU of time MLP + class embedding: the input of every modulation.
    ///
    /// # Shapes
    /// - `t`: `[batch]` or `[1]` (broadcast), `labels`: `[batch]` (`classes` = null)
    /// - output: `[batch, C]`
    fn condition(&self, t: Tensor<1>, labels: Tensor<1, Int>) -> Tensor<2> {
        let emb = time_embedding(t).cast(self.time_fc1.weight.val().dtype());
        let time = self.time_fc2.forward(silu(self.time_fc1.forward(emb)));
        silu(time + self.class_emb.weight.val().select(0, labels))
    }

    fn forward_conditioned(&self, x: Tensor<3>, c_act: Tensor<2>) -> Tensor<3> {
        let mut h = self.x_embed.forward(x) + self.pos.val();
        for block in &self.blocks {
            h = block.forward(h, c_act.clone());
        }
        let mut m = self.final_modulation.forward(c_act).chunk(2, 1);
        let scale = m.pop().expect("two chunks");
        let shift = m.pop().expect("two chunks");
        self.final_out
            .forward(modulate(layer_norm_plain(h), shift, scale))
    }

    /// The velocity of every token.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq_len, token_dim]`, `t`: `[batch]`, `labels`: `[batch]` (`classes` = null)
    /// - output: `[batch, seq_len, token_dim]`
    pub fn forward(&self, x: Tensor<3>, t: Tensor<1>, labels: Tensor<1, Int>) -> Tensor<3> {
        let c = self.condition(t, labels);
        self.forward_conditioned(x, c)
    }

    /// The flow-matching loss of a batch: `x_t = (1 - t) x + t noise`, mean over every element of
    /// `(v(x_t, t, y) - (noise - x))^2`; the network at `precision`, the loss in f32.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq_len, token_dim]` (scaled latents, f32), `labels`: `[batch]` (already
    ///   dropped to the null class where drawn), `t`: `[batch]`, `noise`: like `x`
    /// - output: `[1]`
    pub fn loss(
        &self,
        x: Tensor<3>,
        labels: Tensor<1, Int>,
        t: Tensor<1>,
        noise: Tensor<3>,
        precision: Precision,
    ) -> Tensor<1> {
        let tt = t.clone().reshape([-1, 1, 1]); // [b, 1, 1]
        let x_t = x.clone() * (tt.clone().neg() + 1.0) + noise.clone() * tt;
        // t stays f32: its sinusoids are computed in f32 and cast at the time MLP's input.
        let v = self.forward(precision.input(x_t), t, labels);
        (Precision::output(v) - (noise - x)).square().mean()
    }

    /// Samples latents for `labels` (`None` = the null class) from `temperature * noise` at t = 1
    /// by Euler over `points` time points; with `cfg`, the batch is doubled with the null class and
    /// `v = v_u + cfg (v_c - v_u)` on every channel, both halves sharing the noise.
    ///
    /// # Shapes
    /// - `noise`: `[batch, seq_len, token_dim]`; output the same (scaled latents)
    pub fn sample(
        &self,
        labels: &[Option<usize>],
        noise: Tensor<3>,
        points: usize,
        temperature: f32,
        cfg: Option<f32>,
    ) -> Tensor<3> {
        let [b, l, d] = noise.dims();
        let device = noise.device();
        let mut ids: Vec<i64> = labels
            .iter()
            .map(|y| y.unwrap_or(self.classes) as i64)
            .collect();
        if cfg.is_some() {
            ids.extend(std::iter::repeat_n(self.classes as i64, b));
        }
        let n = ids.len();
        let labels = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let flat = (noise * temperature).reshape([b, l * d]);
        let x = euler_sample(flat, points, cfg, |x, t| {
            let rows = x.dims()[0];
            let c = self.condition(Tensor::full([1], t, &device), labels.clone());
            self.forward_conditioned(x.reshape([rows, l, d]), c)
                .reshape([rows, l * d])
        });
        x.reshape([b, l, d])
    }
}

/// The training draws of one DiT step.
#[derive(Debug, Clone)]
pub struct DitDraws {
    /// `[batch]`, uniform in [0, 1).
    pub t: Tensor<1>,
    /// `[batch, seq_len, token_dim]`, standard normal.
    pub noise: Tensor<3>,
    /// Per sample: whether its label becomes the null class.
    pub label_drop: Vec<bool>,
    /// Seeds the device generator that dropout draws from.
    pub dropout_seed: u64,
}

impl DitDraws {
    /// Draws for `batch` latents of `dit`'s shape.
    pub fn sample(rng: &mut Rng, dit: &Dit, batch: usize, device: &Device) -> DitDraws {
        let (l, d) = (dit.seq_len(), dit.token_dim());
        let t: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
        let noise: Vec<f32> = (0..batch * l * d)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let label_drop = (0..batch)
            .map(|_| rng.random::<f64>() < dit.class_dropout)
            .collect();
        DitDraws {
            t: Tensor::from_data(TensorData::new(t, [batch]), device),
            noise: Tensor::from_data(TensorData::new(noise, [batch, l, d]), device),
            label_drop,
            dropout_seed: rng.random(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    #[test]
    fn a_fresh_dit_predicts_zero_and_its_loss_is_the_target_power() {
        let dev = Device::flex();
        let cfg = DitConfig::new(6, 3, 4, 32, 2, 4, 4, 0.1, 0.0, 0.0);
        let dit = cfg.init(&mut rng_for(0, Stream::Init, 0), &dev);
        let draws = DitDraws::sample(&mut rng_for(1, Stream::Mask, 0), &dit, 2, &dev);
        let x = Tensor::<3>::ones([2, 6, 3], &dev);
        let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 4], [2]), &dev);
        let v: Vec<f32> = dit
            .forward(x.clone(), draws.t.clone(), labels.clone())
            .try_into_vec_as()
            .unwrap();
        assert!(v.iter().all(|&v| v == 0.0));
        let loss = dit
            .loss(
                x.clone(),
                labels,
                draws.t.clone(),
                draws.noise.clone(),
                Precision::F32,
            )
            .into_scalar::<f32>();
        let want = (draws.noise.clone() - x)
            .square()
            .mean()
            .into_scalar::<f32>();
        assert!((loss - want).abs() < 1e-5);
    }

    #[test]
    fn sampling_is_seeded_and_guided() {
        let dev = Device::flex();
        let cfg = DitConfig::new(4, 2, 3, 16, 1, 2, 2, 0.1, 0.0, 0.0);
        let mut dit = cfg.init(&mut rng_for(2, Stream::Init, 0), &dev);
        // Non-zero output layer and modulations so labels matter.
        dit.final_out = dense(16, 2, &mut rng_for(3, Stream::Init, 0), &dev);
        dit.final_modulation = dense(16, 32, &mut rng_for(4, Stream::Init, 0), &dev);
        let noise = |s| {
            let mut rng = rng_for(s, Stream::Sample, 0);
            let v: Vec<f32> = (0..2 * 4 * 2)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect();
            Tensor::<3>::from_data(TensorData::new(v, [2, 4, 2]), &dev)
        };
        let labels = [Some(0), Some(2)];
        let a: Vec<f32> = dit
            .sample(&labels, noise(5), 10, 1.0, Some(2.0))
            .try_into_vec_as()
            .unwrap();
        let b: Vec<f32> = dit
            .sample(&labels, noise(5), 10, 1.0, Some(2.0))
            .try_into_vec_as()
            .unwrap();
        assert_eq!(a, b);
        let c: Vec<f32> = dit
            .sample(&labels, noise(5), 10, 1.0, None)
            .try_into_vec_as()
            .unwrap();
        assert!(a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-4));
        // cfg = 1 with doubling equals no guidance.
        let one: Vec<f32> = dit
            .sample(&labels, noise(5), 10, 1.0, Some(1.0))
            .try_into_vec_as()
            .unwrap();
        for (x, y) in one.iter().zip(&c) {
            assert!((x - y).abs() < 1e-5);
        }
    }
}
