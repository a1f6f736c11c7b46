//! The DINO-feature discriminator of METHOD.md section 6's adversarial loss: a frozen DINO ViT trunk whose
//! token features at a few depths feed small trainable heads that score every token.
//!
//! Pure architecture: the hinge, LeCAM and consistency terms and the discriminator's step live in
//! [`crate::ae::adversarial`].
//!
//! The design follows the DINO discriminator of VAR / SoftVQ-VAE (`DinoDisc`, itself after
//! StyleGAN-T's projected discriminator):
//! - the trunk is a DINO ViT of our DINOv2-style [`Block`]s, read without its final norm; features
//!   are taken after the patch embedding and after each block listed in `taps` (SoftVQ: blocks 2, 5,
//!   8 and 11 of ViT-S, so 5 heads), each as "token + [CLS]" (the source's readout);
//! - one head per tap, on the `[batch, width, tokens]` features: Conv1d(k = 1) -> norm ->
//!   LeakyReLU(0.2), then a residual `(x + f(x)) / sqrt 2` with f = circular Conv1d(k = `kernel`,
//!   SoftVQ: 9) over the flattened token sequence -> norm -> LeakyReLU(0.2), then Conv1d(width -> 1):
//!   one logit per token; the logits of all heads are concatenated, `[batch, heads * tokens]`, and
//!   the losses average them;
//! - images in [-1, 1] are mapped to ImageNet's mean/std normalisation before the patch embedding.
//!
//! Deviations, on purpose:
//! - the trunk is DINOv2 (loaded from a Hugging Face `Dinov2Model` file by
//!   [`crate::ae::dinov2::init_trunk`], the patch embedding resampled to `patch` like the encoder's)
//!   where SoftVQ uses DINO v1 ViT-S/16; without a file it is randomly initialised and still frozen;
//! - the trunk runs at the training resolution with position embeddings for that grid; SoftVQ
//!   resizes to 224 (or randomly crops 224 with probability 0.5);
//! - the heads' norm is GroupNorm (32 groups, SoftVQ's `gn` option) instead of its (synchronised)
//!   batch norm, so a sample's logits do not depend on the rest of the batch and a data-parallel
//!   step equals a one-device step;
//! - no spectral norm on the convolutions (burn has none; it would need power-iteration state in the
//!   checkpoint): LeCAM, consistency regularisation and gradient clipping bound the heads instead.
//!
//! The trunk is a separate module, kept as plain tensors next to the frozen prior and LPIPS: it is
//! not part of the [`Discriminator`] that the optimiser sees, so no gradient update can reach it,
//! and gradients still flow through it to the images.

use std::f64::consts::FRAC_1_SQRT_2;

use burn::module::Param;
use burn::nn::{GroupNorm, GroupNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::leaky_relu;
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::model::{Block, VitSize, dense, embedding, patchify};
use crate::rng::Rng;

/// ImageNet's per-channel mean and std, the normalisation DINO was trained with.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// LeakyReLU slope of the heads (SoftVQ: 0.2).
const SLOPE: f64 = 0.2;

/// The discriminator's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscModelConfig {
    /// The DINO ViT the heads read (SoftVQ: ViT-S).
    pub size: VitSize,
    /// The trunk's patch side in pixels.
    pub patch: usize,
    /// 0-based blocks after which features are read, besides the patch embedding (SoftVQ: 2, 5,
    /// 8, 11); the trunk keeps the blocks up to the last.
    pub taps: Vec<usize>,
    /// Kernel of each head's circular convolution over the tokens (SoftVQ: 9).
    pub kernel: usize,
}

impl DiscModelConfig {
    /// Checks the shape fits `image_size`, naming the problem.
    pub fn validate(&self, image_size: usize) -> Result<(), String> {
        let depth = self.size.dims().0;
        if self.patch == 0 || !image_size.is_multiple_of(self.patch) {
            return Err(format!(
                "loss.adv.model.patch ({}) must divide model.image_size ({image_size})",
                self.patch
            ));
        }
        if self.taps.is_empty()
            || self.taps.windows(2).any(|w| w[0] >= w[1])
            || self.taps.iter().any(|&t| t >= depth)
        {
            return Err(format!(
                "loss.adv.model.taps ({:?}) must be increasing block indices below the trunk's depth {depth}",
                self.taps
            ));
        }
        let tokens = (image_size / self.patch).pow(2);
        if self.kernel.is_multiple_of(2) || self.kernel / 2 > tokens {
            return Err(format!(
                "loss.adv.model.kernel ({}) must be odd and at most twice the {tokens} tokens plus one",
                self.kernel
            ));
        }
        Ok(())
    }

    /// The frozen trunk for `image_size` images, randomly initialised from `rng` (see
    /// [`crate::ae::dinov2::init_trunk`] for DINOv2 weights). Build it on a device without
    /// autodiff.
    pub fn init_trunk(&self, image_size: usize, rng: &mut Rng, device: &Device) -> DinoTrunk {
        let (_, width, heads) = self.size.dims();
        let depth = self.taps.last().map_or(0, |t| t + 1);
        let n = (image_size / self.patch).pow(2);
        DinoTrunk {
            patch_embed: dense(3 * self.patch * self.patch, width, rng, device),
            cls_token: embedding(1, width, rng, device),
            pos_embed: embedding(1 + n, width, rng, device),
            blocks: (0..depth)
                .map(|_| Block::new(width, heads, rng, device))
                .collect(),
            patch: self.patch,
            taps: self.taps.clone(),
        }
    }

    /// The trainable heads, one per feature the trunk returns, drawn from `rng`.
    pub fn init(&self, rng: &mut Rng, device: &Device) -> Discriminator {
        let width = self.size.dims().1;
        Discriminator {
            heads: (0..=self.taps.len())
                .map(|_| Head::new(width, self.kernel, rng, device))
                .collect(),
        }
    }
}

/// The frozen DINO ViT: patch embedding, [CLS], position embeddings and the blocks up to the last
/// tap (no final norm: the source reads the blocks' outputs).
#[derive(Module, Debug)]
pub struct DinoTrunk {
    /// DINO's patch embedding as a linear map of each flattened `(channel, row, col)` patch.
    pub patch_embed: Linear,
    pub cls_token: Param<Tensor<3>>,
    /// `[1, 1 + patches, width]`: [CLS] then the patches.
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub patch: usize,
    pub taps: Vec<usize>,
}

impl DinoTrunk {
    /// The token features the heads read: after the patch embedding, then after each tapped block,
    /// each token plus the [CLS] token. Gradients flow to `images` when they carry autodiff.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, S, S]` in [-1, 1]; each output `[batch, width, (S / patch)^2]`
    pub fn features(&self, images: Tensor<4>) -> Vec<Tensor<3>> {
        let [b, _, _, _] = images.dims();
        let device = images.device();
        let per_channel = |v: [f32; 3]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 3, 1, 1]), &device)
        };
        // ((x + 1) / 2 - mean) / std.
        let scale = per_channel(STD.map(|s| 0.5 / s));
        let shift = per_channel([0, 1, 2].map(|c| (0.5 - MEAN[c]) / STD[c]));
        let x = images * scale + shift;
        let patches = self.patch_embed.forward(patchify(x, self.patch)); // [b, n, C]
        let cls = self.cls_token.val().repeat_dim(0, b); // [b, 1, C]
        let mut x = Tensor::cat(vec![cls, patches], 1) + self.pos_embed.val();
        let readout = |x: &Tensor<3>| {
            let [b, t, c] = x.dims();
            let tokens = x.clone().slice([0..b, 1..t, 0..c]);
            let cls = x.clone().slice([0..b, 0..1, 0..c]);
            (tokens + cls).swap_dims(1, 2) // [b, C, n]
        };
        let mut out = vec![readout(&x)];
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if self.taps.contains(&i) {
                out.push(readout(&x));
            }
        }
        out
    }
}

/// A Conv1d over the token axis with circular padding (same length out), PyTorch's default
/// initialisation drawn from our generator.
#[derive(Module, Debug)]
pub struct TokenConv {
    /// `[out, in, kernel]`
    pub weight: Param<Tensor<3>>,
    pub bias: Param<Tensor<1>>,
}

impl TokenConv {
    fn new(c_in: usize, c_out: usize, kernel: usize, rng: &mut Rng, device: &Device) -> Self {
        // PyTorch's Conv1d: kaiming_uniform(a = sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), same bias.
        let bound = 1.0 / ((c_in * kernel) as f32).sqrt();
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let w = draw(c_out * c_in * kernel);
        let b = draw(c_out);
        TokenConv {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(w, [c_out, c_in, kernel]),
                device,
            )),
            bias: Param::from_tensor(Tensor::from_data(TensorData::new(b, [c_out]), device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in, tokens]`; output `[batch, out, tokens]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let k = self.weight.dims()[2];
        let p = k / 2;
        let x = if p > 0 {
            // Circular padding (PyTorch's padding_mode="circular"), as the source.
            let [b, c, l] = x.dims();
            let tail = x.clone().slice([0..b, 0..c, l - p..l]);
            let head = x.clone().slice([0..b, 0..c, 0..p]);
            Tensor::cat(vec![tail, x, head], 2) // [b, c, l + 2p]
        } else {
            x
        };
        conv1d(
            x,
            self.weight.val(),
            Some(self.bias.val()),
            ConvOptions::new([1], [0], [1], 1),
        )
    }
}

/// One head: `[batch, width, tokens]` features -> `[batch, 1, tokens]` logits.
#[derive(Module, Debug)]
pub struct Head {
    pub pre: TokenConv,
    pub pre_norm: GroupNorm,
    pub mix: TokenConv,
    pub mix_norm: GroupNorm,
    pub out: TokenConv,
}

/// GroupNorm with 32 groups (or the largest count below that divides `width`).
fn group_norm(width: usize, device: &Device) -> GroupNorm {
    let groups = (1..=32.min(width))
        .rev()
        .find(|g| width.is_multiple_of(*g))
        .unwrap_or(1);
    GroupNormConfig::new(groups, width)
        .with_epsilon(1e-6)
        .init(device)
}

impl Head {
    fn new(width: usize, kernel: usize, rng: &mut Rng, device: &Device) -> Head {
        Head {
            pre: TokenConv::new(width, width, 1, rng, device),
            pre_norm: group_norm(width, device),
            mix: TokenConv::new(width, width, kernel, rng, device),
            mix_norm: group_norm(width, device),
            out: TokenConv::new(width, 1, 1, rng, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, width, tokens]`; output `[batch, 1, tokens]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = leaky_relu(self.pre_norm.forward(self.pre.forward(x)), SLOPE);
        let r = leaky_relu(self.mix_norm.forward(self.mix.forward(h.clone())), SLOPE);
        self.out.forward((h + r) * FRAC_1_SQRT_2)
    }
}

/// The trainable part of the discriminator: one head per trunk feature.
#[derive(Module, Debug)]
pub struct Discriminator {
    pub heads: Vec<Head>,
}

impl Discriminator {
    /// Per-token logits of every head, concatenated.
    ///
    /// # Shapes
    /// - `features`: as [`DinoTrunk::features`] returns, one per head, each `[batch, width, n]`;
    ///   output `[batch, heads * n]`
    pub fn forward(&self, features: Vec<Tensor<3>>) -> Tensor<2> {
        let logits: Vec<Tensor<2>> = self
            .heads
            .iter()
            .zip(features)
            .map(|(head, f)| {
                let [b, _, n] = f.dims();
                head.forward(f).reshape([b, n]) // [b, n]
            })
            .collect();
        Tensor::cat(logits, 1)
    }

    /// Logits of `images` through the frozen `trunk` (gradients reach `images` and, when these
    /// heads carry autodiff, the heads; never the trunk built without autodiff).
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, S, S]` in [-1, 1]; output `[batch, heads * (S / patch)^2]`
    pub fn logits(&self, trunk: &DinoTrunk, images: Tensor<4>) -> Tensor<2> {
        self.forward(trunk.features(images))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    pub(crate) fn tiny() -> DiscModelConfig {
        DiscModelConfig {
            size: VitSize::Tiny,
            patch: 4,
            taps: vec![0, 1],
            kernel: 3,
        }
    }

    #[test]
    fn shapes_and_validation() {
        let dev = Device::flex();
        let cfg = tiny();
        cfg.validate(16).unwrap();
        let mut rng = rng_for(0, Stream::DiscInit, 0);
        let trunk = cfg.init_trunk(16, &mut rng, &dev);
        let disc = cfg.init(&mut rng, &dev);
        assert_eq!(trunk.blocks.len(), 2);
        assert_eq!(disc.heads.len(), 3);
        let x = Tensor::<4>::zeros([2, 3, 16, 16], &dev);
        let f = trunk.features(x.clone());
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|t| t.dims() == [2, 64, 16]));
        assert_eq!(disc.logits(&trunk, x).dims(), [2, 3 * 16]);
        for (bad, what) in [
            (
                DiscModelConfig {
                    taps: vec![1, 0],
                    ..tiny()
                },
                "taps",
            ),
            (
                DiscModelConfig {
                    taps: vec![2],
                    ..tiny()
                },
                "taps",
            ),
            (DiscModelConfig { patch: 5, ..tiny() }, "patch"),
            (
                DiscModelConfig {
                    kernel: 4,
                    ..tiny()
                },
                "kernel",
            ),
        ] {
            let err = bad.validate(16).unwrap_err();
            assert!(err.contains(what), "{err}");
        }
    }

    #[test]
    fn circular_convolution_wraps_the_token_sequence() {
        let dev = Device::flex();
        // One channel, kernel 3 with weights [1, 0, 0]: output t reads input t - 1 (wrapping).
        let conv = TokenConv {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, 0.0, 0.0], [1, 1, 3]),
                &dev,
            )),
            bias: Param::from_tensor(Tensor::zeros([1], &dev)),
        };
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 4]),
            &dev,
        );
        let y: Vec<f32> = conv.forward(x).try_into_vec_as::<f32>().unwrap();
        assert_eq!(y, vec![4.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_sample_s_logits_do_not_depend_on_the_batch() {
        let dev = Device::flex();
        let cfg = tiny();
        let mut rng = rng_for(3, Stream::DiscInit, 0);
        let trunk = cfg.init_trunk(16, &mut rng, &dev);
        let disc = cfg.init(&mut rng, &dev);
        let values: Vec<f32> = (0..3 * 3 * 256)
            .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect();
        let all = Tensor::<4>::from_data(TensorData::new(values.clone(), [3, 3, 16, 16]), &dev);
        let one = Tensor::<4>::from_data(
            TensorData::new(values[..768].to_vec(), [1, 3, 16, 16]),
            &dev,
        );
        let a: Vec<f32> = disc.logits(&trunk, all).try_into_vec_as::<f32>().unwrap();
        let b: Vec<f32> = disc.logits(&trunk, one).try_into_vec_as::<f32>().unwrap();
        for (x, y) in a[..b.len()].iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}
