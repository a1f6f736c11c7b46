//! The velocity network of METHOD.md section 4: an MLP with adaptive LayerNorm on a sinusoidal time embedding.
//!
//! Pure architecture: losses and training steps live in [`crate::align`] and [`crate::train`].

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::silu;
use rand::RngExt;
use rand_distr::StandardNormal;

use crate::fused::{self, Affine};
use crate::rng::Rng;

/// Features of the sinusoidal time embedding (METHOD.md section 4).
pub const FREQ_DIM: usize = 256;
/// LayerNorm epsilon (METHOD.md section 4).
const LN_EPS: f64 = 1e-6;

/// Hyperparameters of [`VelocityMlp`].
#[derive(Config, Debug, PartialEq)]
pub struct VelocityMlpConfig {
    /// Data dimension d.
    pub dim: usize,
    /// Hidden width C.
    pub width: usize,
    /// Number of residual AdaLN blocks.
    pub depth: usize,
}

/// A residual block: `x + gate * MLP(LN(x) * (1 + scale) + shift)`, modulated by the time condition.
#[derive(Module, Debug)]
pub struct AdaLnBlock {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// `Linear(C, 3C)` on `SiLU(c)` giving (shift, scale, gate); zero-initialised.
    modulation: Linear,
}

/// The output layer: affine-free LayerNorm, modulated by (shift, scale), then `Linear(C, d)`.
#[derive(Module, Debug)]
pub struct FinalLayer {
    modulation: Linear,
    out: Linear,
}

/// The AdaLN MLP velocity field `v_theta(z, t)` ("SimpleMLPAdaLN", METHOD.md section 4).
#[derive(Module, Debug)]
pub struct VelocityMlp {
    input_proj: Linear,
    pub(crate) time_fc1: Linear,
    pub(crate) time_fc2: Linear,
    blocks: Vec<AdaLnBlock>,
    final_layer: FinalLayer,
}

/// How a linear layer's weight is drawn (METHOD.md section 4, Init).
#[derive(Clone, Copy)]
pub(crate) enum Init {
    XavierUniform,
    Normal(f32),
    Zeros,
}

/// A `Linear(d_in, d_out)` with weights from our seeded generator and a zero bias.
///
/// Drawing on the host keeps initialisation identical on every backend for a given seed.
pub(crate) fn linear(
    d_in: usize,
    d_out: usize,
    init: Init,
    rng: &mut Rng,
    device: &Device,
) -> Linear {
    let weights: Vec<f32> = match init {
        Init::XavierUniform => {
            let bound = (6.0 / (d_in + d_out) as f32).sqrt();
            (0..d_in * d_out)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        }
        Init::Normal(std) => (0..d_in * d_out)
            .map(|_| std * rng.sample::<f32, _>(StandardNormal))
            .collect(),
        Init::Zeros => vec![0.0; d_in * d_out],
    };
    Linear {
        // burn stores the weight as [d_in, d_out] (y = x W + b).
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(weights, [d_in, d_out]),
            device,
        )),
        bias: Some(Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

/// A linear layer's parameters for the fused operations (`None` without a bias).
fn affine(layer: &Linear) -> Option<Affine> {
    Some(Affine {
        weight: layer.weight.val(),
        bias: layer.bias.as_ref()?.val(),
    })
}

impl VelocityMlpConfig {
    /// Builds the network with METHOD.md section 4's initialisation, drawing from `rng`.
    ///
    /// Every modulation layer and the output layer start at zero, so the initial velocity is exactly 0.
    pub fn init(&self, rng: &mut Rng, device: &Device) -> VelocityMlp {
        let c = self.width;
        let ln = LayerNormConfig::new(c).with_epsilon(LN_EPS);
        VelocityMlp {
            input_proj: linear(self.dim, c, Init::XavierUniform, rng, device),
            time_fc1: linear(FREQ_DIM, c, Init::Normal(0.02), rng, device),
            time_fc2: linear(c, c, Init::Normal(0.02), rng, device),
            blocks: (0..self.depth)
                .map(|_| AdaLnBlock {
                    norm: ln.init(device),
                    fc1: linear(c, c, Init::XavierUniform, rng, device),
                    fc2: linear(c, c, Init::XavierUniform, rng, device),
                    modulation: linear(c, 3 * c, Init::Zeros, rng, device),
                })
                .collect(),
            final_layer: FinalLayer {
                modulation: linear(c, 2 * c, Init::Zeros, rng, device),
                out: linear(c, self.dim, Init::Zeros, rng, device),
            },
        }
    }
}

/// Sinusoidal embedding of the raw time t in [0, 1] (not scaled by 1000), METHOD.md section 4.
///
/// # Shapes
/// - `t`: `[batch]`
/// - output: `[batch, 256]`, `[cos(t * freqs), sin(t * freqs)]` with `freqs_i = exp(-ln(10000) i / 128)`
pub fn time_embedding(t: Tensor<1>) -> Tensor<2> {
    let half = FREQ_DIM / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32).ln() * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &t.device());
    let args = t.unsqueeze_dim::<2>(1) * freqs.unsqueeze::<2>(); // [batch, 128]
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// LayerNorm over the last dimension without learnable parameters.
fn layer_norm_plain(x: Tensor<2>) -> Tensor<2> {
    let (var, mean) = x.clone().var_mean_bias(1);
    (x - mean) / var.add_scalar(LN_EPS).sqrt()
}

impl AdaLnBlock {
    /// The LayerNorm's `(gamma, beta)` and the two MLP layers, as the fused operations take them
    /// (`None` without a bias).
    fn mlp_parts(&self) -> Option<((Tensor<1>, Tensor<1>), Affine, Affine)> {
        let norm = (self.norm.gamma.val(), self.norm.beta.as_ref()?.val());
        Some((norm, affine(&self.fc1)?, affine(&self.fc2)?))
    }

    /// # Shapes
    /// - `x`: `[batch, C]`, `c_act`: `[batch, C]` (the condition after SiLU)
    /// - output: `[batch, C]`
    pub fn forward(&self, x: Tensor<2>, c_act: Tensor<2>) -> Tensor<2> {
        let mut mods = self.modulation.forward(c_act).chunk(3, 1); // 3 x [batch, C]
        let gate = mods.pop().expect("three chunks");
        let scale = mods.pop().expect("three chunks");
        let shift = mods.pop().expect("three chunks");
        let h = self.norm.forward(x.clone()) * (scale + 1.0) + shift;
        let h = self.fc2.forward(silu(self.fc1.forward(h)));
        x + gate * h
    }
}

impl FinalLayer {
    /// # Shapes
    /// - `x`: `[batch, C]`, `c_act`: `[batch, C]`
    /// - output: `[batch, d]`
    pub fn forward(&self, x: Tensor<2>, c_act: Tensor<2>) -> Tensor<2> {
        let mut mods = self.modulation.forward(c_act).chunk(2, 1); // 2 x [batch, C]
        let scale = mods.pop().expect("two chunks");
        let shift = mods.pop().expect("two chunks");
        self.out
            .forward(layer_norm_plain(x) * (scale + 1.0) + shift)
    }
}

impl VelocityMlp {
    /// The velocity `v_theta(z, t)`.
    ///
    /// # Shapes
    /// - `z`: `[batch, d]`
    /// - `t`: `[batch]`
    /// - output: `[batch, d]`
    pub fn forward(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
        let c_act = self.conditioning(t); // [batch, C]
        self.forward_conditioned(z, c_act)
    }

    /// The velocity of every row of `z` at one shared time `t`: the time conditioning is computed
    /// once and broadcast, which saves about two thirds of the work at width 96 (heatmaps, ODEs).
    ///
    /// # Shapes
    /// - `z`: `[batch, d]`; output `[batch, d]`
    pub fn forward_at(&self, z: Tensor<2>, t: f32) -> Tensor<2> {
        let t = Tensor::<1>::full([1], t, &z.device());
        let c_act = self.conditioning(t); // [1, C], broadcast over the batch
        self.forward_conditioned(z, c_act)
    }

    /// SiLU of the time embedding's MLP: the input of every AdaLN modulation.
    ///
    /// The embedding is built at `t`'s precision and enters the MLP at the parameters' dtype, so a
    /// network with bf16 parameters keeps t and the sinusoids in f32 (as autocast would).
    fn conditioning(&self, t: Tensor<1>) -> Tensor<2> {
        let emb = time_embedding(t).cast(self.time_fc1.weight.val().dtype());
        if fused::supports(&emb.device(), emb.dtype())
            && let (Some(fc1), Some(fc2)) = (affine(&self.time_fc1), affine(&self.time_fc2))
        {
            return fused::time_condition(emb, fc1, fc2);
        }
        let c = self.time_fc2.forward(silu(self.time_fc1.forward(emb)));
        silu(c)
    }

    pub(crate) fn forward_conditioned(&self, z: Tensor<2>, c_act: Tensor<2>) -> Tensor<2> {
        let mut x = self.input_proj.forward(z); // [batch, C]
        if let Some(v) = self.forward_fused(x.clone(), c_act.clone()) {
            return v;
        }
        for block in &self.blocks {
            x = block.forward(x, c_act.clone());
        }
        self.final_layer.forward(x, c_act)
    }

    /// The same layers as [`AdaLnBlock::forward`] and [`FinalLayer::forward`], each one fused
    /// operation ([`crate::fused`]), where those apply (burn's flex CPU device, f32).
    fn forward_fused(&self, x: Tensor<2>, c_act: Tensor<2>) -> Option<Tensor<2>> {
        if !fused::supports(&x.device(), x.dtype()) || c_act.dtype() != x.dtype() {
            return None;
        }
        let blocks: Option<Vec<_>> = self
            .blocks
            .iter()
            .map(|b| Some((affine(&b.modulation)?, b.mlp_parts()?)))
            .collect();
        let final_mod = affine(&self.final_layer.modulation)?;
        let out = affine(&self.final_layer.out)?;
        let mut x = x;
        for (modulation, (norm, fc1, fc2)) in blocks? {
            x = fused::adaln_block(x, c_act.clone(), modulation, norm, fc1, fc2);
        }
        Some(fused::adaln_final(x, c_act, final_mod, out))
    }

    /// The modulation of every block at times `t` (`[batch, 3C]` each: shift, scale, gate), then
    /// the final layer's (`[batch, 2C]`: shift, scale).
    pub(crate) fn modulations(&self, t: Tensor<1>) -> Vec<Tensor<2>> {
        let c_act = self.conditioning(t);
        let mut mods: Vec<_> = self
            .blocks
            .iter()
            .map(|b| b.modulation.forward(c_act.clone()))
            .collect();
        mods.push(self.final_layer.modulation.forward(c_act));
        mods
    }

    /// The velocity with every layer's modulation read from `tables` (one per block, then the
    /// final layer's, laid out as [`fused::adaln_block_tabulated`] reads them) instead of computed
    /// from `t`; `None` where the fused operations do not apply.
    ///
    /// # Shapes
    /// - `z`: `[batch, d]`; `t`: `[batch]`, each in [0, 1]; output `[batch, d]`
    pub(crate) fn forward_tabulated(
        &self,
        z: Tensor<2>,
        t: Tensor<1>,
        tables: &[Tensor<2>],
    ) -> Option<Tensor<2>> {
        if !fused::supports(&z.device(), z.dtype()) || tables.len() != self.blocks.len() + 1 {
            return None;
        }
        let parts: Option<Vec<_>> = self.blocks.iter().map(AdaLnBlock::mlp_parts).collect();
        let mut x = self.input_proj.forward(z);
        for ((norm, fc1, fc2), table) in parts?.into_iter().zip(tables) {
            x = fused::adaln_block_tabulated(x, t.clone(), table.clone(), norm, fc1, fc2);
        }
        let out = affine(&self.final_layer.out)?;
        Some(fused::adaln_final_tabulated(
            x,
            t,
            tables[self.blocks.len()].clone(),
            out,
        ))
    }

    pub fn dim(&self) -> usize {
        self.input_proj.weight.dims()[0]
    }

    /// The hidden width C.
    pub fn width(&self) -> usize {
        self.input_proj.weight.dims()[1]
    }

    /// The number of residual blocks.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    #[test]
    fn parameter_count_matches_the_paper_toy() {
        let mut rng = rng_for(0, Stream::Init, 0);
        let m = VelocityMlpConfig::new(2, 512, 4).init(&mut rng, &Device::flex());
        assert_eq!(m.num_params(), 6_179_330); // METHOD.md section 4: 6.18 M
    }

    #[test]
    fn shared_time_forward_matches_per_row_times() {
        let dev = Device::flex();
        let mut rng = rng_for(3, Stream::Init, 0);
        let mut m = VelocityMlpConfig::new(2, 32, 2).init(&mut rng, &dev);
        // Non-zero modulations, so the broadcast conditioning matters.
        m = m.map(&mut Perturb(rng_for(4, Stream::Init, 0)));
        let rows: Vec<f32> = (0..10).map(|i| i as f32 * 0.37 - 1.5).collect();
        let z = Tensor::<2>::from_data(TensorData::new(rows, [5, 2]), &dev);
        let per_row: Vec<f32> = m
            .forward(z.clone(), Tensor::full([5], 0.3, &dev))
            .try_into_vec_as()
            .unwrap();
        let shared: Vec<f32> = m.forward_at(z, 0.3).try_into_vec_as().unwrap();
        assert!(per_row.iter().any(|v| v.abs() > 1e-3));
        for (a, b) in per_row.iter().zip(&shared) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// The plain tensor path of [`VelocityMlp::forward`] (without the fused operations).
    fn plain_forward(m: &VelocityMlp, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
        let c = silu(
            m.time_fc2
                .forward(silu(m.time_fc1.forward(time_embedding(t)))),
        );
        let mut x = m.input_proj.forward(z);
        for block in &m.blocks {
            x = block.forward(x, c.clone());
        }
        m.final_layer.forward(x, c)
    }

    /// Asserts two gradient sets agree on every parameter of a module.
    pub(crate) struct SameGrads<'a> {
        pub(crate) fused: &'a burn::optim::GradientsParams,
        pub(crate) plain: &'a burn::optim::GradientsParams,
        pub(crate) checked: usize,
    }

    impl burn::module::ModuleVisitor for SameGrads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let a: Vec<f32> = self
                .fused
                .get::<D>(param.id)
                .unwrap()
                .try_into_vec_as()
                .unwrap();
            let b: Vec<f32> = self
                .plain
                .get::<D>(param.id)
                .unwrap()
                .try_into_vec_as()
                .unwrap();
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y} (scale {scale})");
            }
            self.checked += 1;
        }
    }

    #[test]
    fn fused_path_matches_the_plain_layers_and_their_gradients() {
        let dev = Device::flex().autodiff();
        let mut rng = rng_for(5, Stream::Init, 0);
        let m = VelocityMlpConfig::new(3, 48, 3)
            .init(&mut rng, &dev)
            .map(&mut Perturb(rng_for(6, Stream::Init, 0)));
        let rows: Vec<f32> = (0..37 * 3).map(|i| (i as f32 * 0.61).sin() * 2.0).collect();
        let times: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).fract()).collect();
        let z = Tensor::<2>::from_data(TensorData::new(rows, [37, 3]), &dev);
        let t = Tensor::<1>::from_data(TensorData::new(times, [37]), &dev);
        // One graph at a time: both passes share the parameters, and a backward pass consumes
        // every node it reaches.
        let fused = m.forward(z.clone(), t.clone());
        let a: Vec<f32> = fused.clone().try_into_vec_as().unwrap();
        let gf =
            burn::optim::GradientsParams::from_grads(fused.powi_scalar(2).sum().backward(), &m);
        let plain = plain_forward(&m, z, t);
        let b: Vec<f32> = plain.clone().try_into_vec_as().unwrap();
        let gp =
            burn::optim::GradientsParams::from_grads(plain.powi_scalar(2).sum().backward(), &m);
        assert!(b.iter().any(|v| v.abs() > 1e-2));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
        let mut same = SameGrads {
            fused: &gf,
            plain: &gp,
            checked: 0,
        };
        m.visit(&mut same);
        assert_eq!(same.checked, 6 + 3 * 8 + 4);
    }

    /// Adds N(0, 0.1) noise to every parameter.
    pub(crate) struct Perturb(pub(crate) crate::rng::Rng);

    impl burn::module::ModuleMapper for Perturb {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<D>>,
        ) -> burn::module::Param<Tensor<D>> {
            let (id, t, mapper) = param.consume();
            let shape = t.shape();
            let noise: Vec<f32> = (0..shape.num_elements())
                .map(|_| 0.1 * self.0.sample::<f32, _>(StandardNormal))
                .collect();
            let noise = Tensor::<D>::from_data(TensorData::new(noise, shape), &t.device());
            // A fresh leaf: `t + noise` would carry the addition's graph into every pass.
            let sum = (t.clone() + noise).detach();
            let sum = if t.is_require_grad() {
                sum.require_grad()
            } else {
                sum
            };
            burn::module::Param::from_mapped_value(id, sum, mapper)
        }
    }

    #[test]
    fn zero_initialised_network_outputs_exactly_zero() {
        let dev = Device::flex();
        let mut rng = rng_for(1, Stream::Init, 0);
        let m = VelocityMlpConfig::new(2, 64, 2).init(&mut rng, &dev);
        let z = Tensor::<2>::from_data(TensorData::new(vec![0.3f32, -1.2, 5.0, 2.0], [2, 2]), &dev);
        let t = Tensor::<1>::from_data(TensorData::new(vec![0.1f32, 0.9], [2]), &dev);
        let v: Vec<f32> = m.forward(z, t).try_into_vec_as::<f32>().unwrap();
        assert_eq!(v, vec![0.0; 4]);
    }

    #[test]
    fn time_embedding_matches_the_formula() {
        let dev = Device::flex();
        let t = Tensor::<1>::from_data(TensorData::new(vec![0.5f32], [1]), &dev);
        let e: Vec<f32> = time_embedding(t).try_into_vec_as::<f32>().unwrap();
        assert_eq!(e.len(), 256);
        let f5 = (-(10000f32).ln() * 5.0 / 128.0).exp();
        assert!((e[5] - (0.5 * f5).cos()).abs() < 1e-6);
        assert!((e[128 + 5] - (0.5 * f5).sin()).abs() < 1e-6);
        assert!((e[0] - 0.5f32.cos()).abs() < 1e-6);
    }
}
