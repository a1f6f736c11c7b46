//! The transformer block shared by MAR and the DiT: timm's pre-norm ViT block with qk-norm
//! (METHOD.md section 7).
//!
//! Pure architecture. Dropout is burn's: active only on an autodiff device (training), drawn from
//! the device's generator (seed it per step for reproducible runs, as [`crate::generator::loss`] does).

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use rand::RngExt;
use rand_distr::StandardNormal;

use crate::flow::model::{Init, linear};
use crate::rng::Rng;

/// LayerNorm epsilon of the blocks (timm's `partial(nn.LayerNorm, eps=1e-6)` in MAR).
pub const LN_EPS: f64 = 1e-6;
/// LayerNorm epsilon of qk-norm (PyTorch's default, which qk-norm's `nn.LayerNorm(head_dim)` keeps).
pub const QK_NORM_EPS: f64 = 1e-5;

/// A `Linear` with Xavier-uniform weights and zero bias (MAR's `_init_weights`).
pub(crate) fn dense(d_in: usize, d_out: usize, rng: &mut Rng, device: &Device) -> Linear {
    linear(d_in, d_out, Init::XavierUniform, rng, device)
}

/// A parameter of `shape` drawn from N(0, 0.02^2) (MAR's and DiT's embedding init).
pub(crate) fn normal<const D: usize>(
    shape: [usize; D],
    rng: &mut Rng,
    device: &Device,
) -> Param<Tensor<D>> {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| 0.02 * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// Multi-head self-attention with a fused qkv projection (with bias) and qk-norm: one
/// `LayerNorm(head_dim)` shared by all heads on q and one on k, before the dot products.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub q_norm: LayerNorm,
    pub k_norm: LayerNorm,
    pub proj: Linear,
    pub attn_drop: Dropout,
    pub proj_drop: Dropout,
    pub heads: usize,
}

impl Attention {
    /// Attention over `width` channels in `heads` heads; `attn_drop` on the attention weights,
    /// `proj_drop` on the output.
    pub(crate) fn new(
        width: usize,
        heads: usize,
        attn_drop: f64,
        proj_drop: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Attention {
        let head_dim = width / heads;
        let qk = LayerNormConfig::new(head_dim).with_epsilon(QK_NORM_EPS);
        Attention {
            qkv: dense(width, 3 * width, rng, device),
            q_norm: qk.init(device),
            k_norm: qk.init(device),
            proj: dense(width, width, rng, device),
            attn_drop: DropoutConfig::new(attn_drop).init(),
            proj_drop: DropoutConfig::new(proj_drop).init(),
            heads,
        }
    }

    /// The normalised queries and keys and the values, per head.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, width]`
    /// - output: three `[batch, heads, tokens, head_dim]`
    pub fn qkv_heads(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, n, c] = x.dims();
        let h = self.heads;
        let hd = c / h;
        // timm's layout: the 3C outputs are [q | k | v], each split into heads.
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3 * h, hd])
            .swap_dims(1, 2); // [b, 3h, n, hd]
        let q = qkv.clone().slice([0..b, 0..h]);
        let k = qkv.clone().slice([0..b, h..2 * h]);
        let v = qkv.slice([0..b, 2 * h..3 * h]);
        (self.q_norm.forward(q), self.k_norm.forward(k), v)
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, width]`
    /// - `key_padding`: `[batch, tokens]`, true where a token must not be attended to (never all
    ///   of a row). MAR drops hidden tokens instead; the mask is the equivalent formulation.
    /// - output: `[batch, tokens, width]`
    pub fn forward(&self, x: Tensor<3>, key_padding: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let h = self.heads;
        let (q, k, v) = self.qkv_heads(x);
        let scale = ((c / h) as f64).powf(-0.5);
        let mut scores = q.matmul(k.swap_dims(2, 3)) * scale; // [b, h, n, n]
        if let Some(pad) = key_padding {
            let pad = pad.reshape([b, 1, 1, n]).expand([b, h, n, n]);
            scores = scores.mask_fill(pad, f32::NEG_INFINITY);
        }
        let weights = self.attn_drop.forward(softmax(scores, 3));
        let out = weights.matmul(v).swap_dims(1, 2).reshape([b, n, c]); // [b, n, h * hd]
        self.proj_drop.forward(self.proj.forward(out))
    }
}

/// timm's `Block`: `x + attn(norm1(x))`, then `x + mlp(norm2(x))` with an exact-GELU MLP; no
/// LayerScale, no drop-path.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    /// The MLP's dropout (timm applies `proj_drop` after the activation and after `fc2`).
    pub mlp_drop: Dropout,
}

impl Block {
    /// A block of `width` channels, `heads` heads and an MLP of `mlp_ratio * width`.
    pub(crate) fn new(
        width: usize,
        heads: usize,
        mlp_ratio: usize,
        (attn_drop, proj_drop): (f64, f64),
        rng: &mut Rng,
        device: &Device,
    ) -> Block {
        let ln = LayerNormConfig::new(width).with_epsilon(LN_EPS);
        Block {
            norm1: ln.init(device),
            attn: Attention::new(width, heads, attn_drop, proj_drop, rng, device),
            norm2: ln.init(device),
            fc1: dense(width, mlp_ratio * width, rng, device),
            fc2: dense(mlp_ratio * width, width, rng, device),
            mlp_drop: DropoutConfig::new(proj_drop).init(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, width]`; `key_padding`: `[batch, tokens]` (see [`Attention::forward`])
    /// - output: `[batch, tokens, width]`
    pub fn forward(&self, x: Tensor<3>, key_padding: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), key_padding);
        let h = self
            .mlp_drop
            .forward(gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + self.mlp_drop.forward(self.fc2.forward(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.try_into_vec_as::<f32>().unwrap()
    }

    #[test]
    fn qk_norm_standardises_each_head_with_one_shared_affine() {
        let dev = Device::flex();
        let mut rng = rng_for(0, Stream::Init, 0);
        let (width, heads, hd) = (64, 4, 16);
        let mut attn = Attention::new(width, heads, 0.0, 0.0, &mut rng, &dev);
        let x: Vec<f32> = (0..2 * 5 * width)
            .map(|i| ((i * 37 % 101) as f32 / 25.0 - 2.0) * (1.0 + (i % 7) as f32))
            .collect();
        let x = Tensor::<3>::from_data(TensorData::new(x, [2, 5, width]), &dev);
        // Fresh affine (ones, zeros): every head's q and k have mean 0 and variance 1 over head_dim.
        let (q, k, _) = attn.qkv_heads(x.clone());
        assert_eq!(q.dims(), [2, heads, 5, hd]);
        for t in [q.clone(), k] {
            for row in values(t).chunks(hd) {
                let mean = row.iter().sum::<f32>() / hd as f32;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / hd as f32;
                assert!(mean.abs() < 1e-5, "mean {mean}");
                assert!((var - 1.0).abs() < 1e-3, "var {var}");
            }
        }
        // The affine has head_dim entries and is applied to every head alike.
        assert_eq!(attn.q_norm.gamma.dims(), [hd]);
        let gamma: Vec<f32> = (0..hd).map(|i| 0.5 + i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..hd).map(|i| i as f32 * 0.01 - 0.05).collect();
        attn.q_norm.gamma = Param::from_tensor(Tensor::from_data(
            TensorData::new(gamma.clone(), [hd]),
            &dev,
        ));
        attn.q_norm.beta = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(beta.clone(), [hd]),
            &dev,
        )));
        let (q2, _, _) = attn.qkv_heads(x);
        for (plain, affine) in values(q).chunks(hd).zip(values(q2).chunks(hd)) {
            for i in 0..hd {
                let want = plain[i] * gamma[i] + beta[i];
                assert!((affine[i] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn key_padding_equals_dropping_the_padded_tokens() {
        let dev = Device::flex();
        let mut rng = rng_for(1, Stream::Init, 0);
        let block = Block::new(32, 4, 4, (0.0, 0.0), &mut rng, &dev);
        let x: Vec<f32> = (0..6 * 32)
            .map(|i| ((i * 13 % 29) as f32 / 7.0) - 2.0)
            .collect();
        let x = Tensor::<3>::from_data(TensorData::new(x, [1, 6, 32]), &dev);
        let pad = Tensor::<2, Bool>::from_data(
            TensorData::new(vec![false, true, false, false, true, false], [1, 6]),
            &dev,
        );
        let padded: Vec<f32> = block
            .forward(x.clone(), Some(pad))
            .try_into_vec_as()
            .unwrap();
        let keep = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 3, 5], [4]), &dev);
        let dropped: Vec<f32> = block
            .forward(x.select(1, keep), None)
            .try_into_vec_as()
            .unwrap();
        for (j, p) in [0usize, 2, 3, 5].iter().enumerate() {
            for c in 0..32 {
                let (a, b) = (padded[p * 32 + c], dropped[j * 32 + c]);
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
