//! The 1-D tokenizer of METHOD.md section 6, stage 2: a ViT encoder that reads image patches plus learnable
//! latent tokens and keeps the latent tokens' outputs (projected to 32 dims), and a ViT decoder from
//! those latents back to pixels.
//!
//! Pure architecture: losses and training live in [`crate::ae::train`]. Blocks follow DINOv2's layout
//! (pre-norm attention and MLP, each scaled by a learnable LayerScale) so its weights can map onto
//! the encoder one to one.

use burn::module::Param;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::flow::model::{Init, linear};
use crate::rng::Rng;

/// A `Linear` with Xavier-uniform weights drawn from `rng` and a zero bias (MAE's ViT init), so
/// initialisation is a function of the seed on every backend.
pub(crate) fn dense(d_in: usize, d_out: usize, rng: &mut Rng, device: &Device) -> Linear {
    linear(d_in, d_out, Init::XavierUniform, rng, device)
}

/// The size of a ViT (encoder and decoder alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VitSize {
    /// 2 layers, width 64, 2 heads: tests and smoke runs.
    Tiny,
    /// ViT-S: 12 layers, width 384, 6 heads.
    VitS,
    /// ViT-B: 12 layers, width 768, 12 heads.
    VitB,
    /// ViT-L: 24 layers, width 1024, 16 heads (the paper's).
    VitL,
}

impl VitSize {
    /// (layers, width, heads).
    pub fn dims(self) -> (usize, usize, usize) {
        match self {
            VitSize::Tiny => (2, 64, 2),
            VitSize::VitS => (12, 384, 6),
            VitSize::VitB => (12, 768, 12),
            VitSize::VitL => (24, 1024, 16),
        }
    }
}

/// The autoencoder's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeModelConfig {
    pub size: VitSize,
    /// Square input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Learnable latent tokens (METHOD.md section 6: 64).
    pub latent_tokens: usize,
    /// Dimension of each latent token after the projection (METHOD.md section 6: 32).
    pub latent_dim: usize,
}

impl AeModelConfig {
    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    /// Checks the sizes fit together, naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.patch == 0 || self.image_size == 0 || !self.image_size.is_multiple_of(self.patch) {
            return Err(format!(
                "model.image_size ({}) must be a positive multiple of model.patch ({})",
                self.image_size, self.patch
            ));
        }
        if self.latent_tokens == 0 || self.latent_dim == 0 {
            return Err("model.latent_tokens and model.latent_dim must be at least 1".into());
        }
        Ok(())
    }
}

/// A pre-norm transformer block with LayerScale (DINOv2's `Dinov2Layer`).
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: MultiHeadAttention,
    pub ls1: Param<Tensor<1>>,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub ls2: Param<Tensor<1>>,
}

impl Block {
    pub(crate) fn new(width: usize, heads: usize, rng: &mut Rng, device: &Device) -> Block {
        let ln = LayerNormConfig::new(width).with_epsilon(1e-6);
        let mut attn = MultiHeadAttentionConfig::new(width, heads)
            .with_dropout(0.0)
            .init(device);
        // burn draws these from its own generator; ours makes the init a function of the seed.
        attn.query = dense(width, width, rng, device);
        attn.key = dense(width, width, rng, device);
        attn.value = dense(width, width, rng, device);
        attn.output = dense(width, width, rng, device);
        Block {
            norm1: ln.init(device),
            attn,
            ls1: Param::from_tensor(Tensor::ones([width], device)),
            norm2: ln.init(device),
            fc1: dense(width, 4 * width, rng, device),
            fc2: dense(4 * width, width, rng, device),
            ls2: Param::from_tensor(Tensor::ones([width], device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, width]`; output the same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let scale = |ls: &Param<Tensor<1>>| ls.val().unsqueeze::<3>(); // [1, 1, width]
        let a = self
            .attn
            .forward(MhaInput::self_attn(self.norm1.forward(x.clone())))
            .context;
        let x = x + a * scale(&self.ls1);
        let m = self
            .fc2
            .forward(gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + m * scale(&self.ls2)
    }
}

/// Draws a `[1, n, width]` embedding from N(0, 0.02^2) (METHOD.md section 6's latent-token init).
pub(crate) fn embedding(
    n: usize,
    width: usize,
    rng: &mut Rng,
    device: &Device,
) -> Param<Tensor<3>> {
    let normal = Normal::new(0.0f32, 0.02).expect("positive std");
    let values: Vec<f32> = (0..n * width).map(|_| normal.sample(rng)).collect();
    Param::from_tensor(Tensor::from_data(
        TensorData::new(values, [1, n, width]),
        device,
    ))
}

/// The encoder: patches + [CLS] + latent tokens -> ViT -> the latent tokens' outputs -> `latent_dim`.
#[derive(Module, Debug)]
pub struct Encoder {
    /// DINOv2's patch embedding as a linear map of each flattened `(channel, row, col)` patch.
    pub patch_embed: Linear,
    pub cls_token: Param<Tensor<3>>,
    /// `[1, 1 + patches, width]`: [CLS] then the patches.
    pub pos_embed: Param<Tensor<3>>,
    pub latent_tokens: Param<Tensor<3>>,
    pub latent_pos: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub to_latent: Linear,
    pub patch: usize,
}

/// The decoder: `latent_dim` tokens -> width, plus one mask token per patch -> ViT -> pixels.
#[derive(Module, Debug)]
pub struct Decoder {
    pub from_latent: Linear,
    pub latent_pos: Param<Tensor<3>>,
    pub mask_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub to_pixels: Linear,
    pub patch: usize,
    pub image_size: usize,
}

/// Encoder and decoder.
#[derive(Module, Debug)]
pub struct Autoencoder {
    pub encoder: Encoder,
    pub decoder: Decoder,
}

impl AeModelConfig {
    /// Builds the autoencoder, every random value drawn from `rng`.
    pub fn init(&self, rng: &mut Rng, device: &Device) -> Autoencoder {
        let (depth, width, heads) = self.size.dims();
        let n = self.patches();
        let pp = 3 * self.patch * self.patch;
        let ln = LayerNormConfig::new(width).with_epsilon(1e-6);
        let blocks = |rng: &mut Rng| -> Vec<Block> {
            (0..depth)
                .map(|_| Block::new(width, heads, rng, device))
                .collect()
        };
        Autoencoder {
            encoder: Encoder {
                patch_embed: dense(pp, width, rng, device),
                cls_token: embedding(1, width, rng, device),
                pos_embed: embedding(1 + n, width, rng, device),
                latent_tokens: embedding(self.latent_tokens, width, rng, device),
                latent_pos: embedding(self.latent_tokens, width, rng, device),
                blocks: blocks(rng),
                norm: ln.init(device),
                to_latent: dense(width, self.latent_dim, rng, device),
                patch: self.patch,
            },
            decoder: Decoder {
                from_latent: dense(self.latent_dim, width, rng, device),
                latent_pos: embedding(self.latent_tokens, width, rng, device),
                mask_token: embedding(1, width, rng, device),
                pos_embed: embedding(n, width, rng, device),
                blocks: blocks(rng),
                norm: ln.init(device),
                to_pixels: dense(width, pp, rng, device),
                patch: self.patch,
                image_size: self.image_size,
            },
        }
    }
}

/// Cuts images into flattened patches in `(channel, row, col)` order.
///
/// # Shapes
/// - `images`: `[batch, 3, H, W]`; output `[batch, (H / p) * (W / p), 3 * p * p]`
pub fn patchify(images: Tensor<4>, p: usize) -> Tensor<3> {
    let [b, c, h, w] = images.dims();
    images
        .reshape([b, c, h / p, p, w / p, p])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / p) * (w / p), c * p * p])
}

/// The inverse of [`patchify`] for square `size x size` images.
pub fn unpatchify(patches: Tensor<3>, p: usize, size: usize) -> Tensor<4> {
    let [b, _, _] = patches.dims();
    let g = size / p;
    patches
        .reshape([b, g, g, 3, p, p])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, 3, size, size])
}

fn run_blocks(blocks: &[Block], x: Tensor<3>) -> Tensor<3> {
    blocks.iter().fold(x, |x, b| b.forward(x))
}

impl Encoder {
    /// # Shapes
    /// - `images`: `[batch, 3, S, S]` in [-1, 1]; output `[batch, latent_tokens, latent_dim]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let b = images.dims()[0];
        let patches = self.patch_embed.forward(patchify(images, self.patch)); // [b, n, C]
        let cls = self.cls_token.val().repeat_dim(0, b); // [b, 1, C]
        let x = Tensor::cat(vec![cls, patches], 1) + self.pos_embed.val();
        let latents = (self.latent_tokens.val() + self.latent_pos.val()).repeat_dim(0, b);
        let k = latents.dims()[1];
        let x = Tensor::cat(vec![x, latents], 1);
        let x = self.norm.forward(run_blocks(&self.blocks, x));
        let tokens = x.dims()[1];
        self.to_latent.forward(x.slice([0..b, tokens - k..tokens]))
    }
}

impl Decoder {
    /// # Shapes
    /// - `latents`: `[batch, latent_tokens, latent_dim]`; output `[batch, 3, S, S]`
    pub fn forward(&self, latents: Tensor<3>) -> Tensor<4> {
        let b = latents.dims()[0];
        let z = self.from_latent.forward(latents) + self.latent_pos.val(); // [b, k, C]
        let n = self.pos_embed.dims()[1];
        let masks =
            (self.mask_token.val().repeat_dim(1, n) + self.pos_embed.val()).repeat_dim(0, b);
        let x = self
            .norm
            .forward(run_blocks(&self.blocks, Tensor::cat(vec![masks, z], 1)));
        let c = x.dims()[2];
        let pixels = self.to_pixels.forward(x.slice([0..b, 0..n, 0..c]));
        unpatchify(pixels, self.patch, self.image_size)
    }
}

impl Autoencoder {
    /// # Shapes
    /// - `images`: `[batch, 3, S, S]`; output `[batch, latent_tokens, latent_dim]`
    pub fn encode(&self, images: Tensor<4>) -> Tensor<3> {
        self.encoder.forward(images)
    }

    /// # Shapes
    /// - `latents`: `[batch, latent_tokens, latent_dim]`; output `[batch, 3, S, S]`
    pub fn decode(&self, latents: Tensor<3>) -> Tensor<4> {
        self.decoder.forward(latents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, rng_for};

    fn identity(n: usize, dev: &Device) -> Linear {
        let mut w = vec![0.0f32; n * n];
        (0..n).for_each(|i| w[i * n + i] = 1.0);
        Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [n, n]), dev)),
            bias: Some(Param::from_tensor(Tensor::zeros([n], dev))),
        }
    }

    #[test]
    fn attention_matches_a_hand_computed_case() {
        let dev = Device::flex();
        let mut block = Block::new(2, 1, &mut rng_for(0, Stream::Init, 0), &dev);
        for l in [
            &mut block.attn.query,
            &mut block.attn.key,
            &mut block.attn.value,
            &mut block.attn.output,
        ] {
            *l = identity(2, &dev);
        }
        // Two tokens, one head of width 2: softmax(Q K^T / sqrt 2) V with Q = K = V = X.
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 2.0], [1, 2, 2]),
            &dev,
        );
        let out: Vec<f32> = block
            .attn
            .forward(MhaInput::self_attn(x))
            .context
            .try_into_vec_as::<f32>()
            .unwrap();
        let s = 2f32.sqrt();
        // Row 1 scores: [1, 0] / sqrt 2; row 2 scores: [0, 4] / sqrt 2.
        let w1 = [(1.0 / s).exp(), 1.0];
        let w2 = [1.0, (4.0 / s).exp()];
        let (z1, z2) = (w1[0] + w1[1], w2[0] + w2[1]);
        let want = [w1[0] / z1, 2.0 * w1[1] / z1, w2[0] / z2, 2.0 * w2[1] / z2];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn shapes_and_patch_round_trip() {
        let dev = Device::flex();
        let cfg = AeModelConfig {
            size: VitSize::Tiny,
            image_size: 16,
            patch: 4,
            latent_tokens: 5,
            latent_dim: 3,
        };
        let ae = cfg.init(&mut rng_for(0, Stream::Init, 0), &dev);
        let values: Vec<f32> = (0..2 * 3 * 16 * 16)
            .map(|i| (i % 17) as f32 / 17.0)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(values.clone(), [2, 3, 16, 16]), &dev);
        let p = patchify(x.clone(), 4);
        assert_eq!(p.dims(), [2, 16, 48]);
        // Patch 1 of image 0 is rows 0..4, columns 4..8; its first entry is channel 0, (0, 4).
        let first: Vec<f32> = p.clone().try_into_vec_as::<f32>().unwrap();
        assert_eq!(first[48], values[4]);
        assert_eq!(first[48 + 4], values[16 + 4]); // channel 0, row 1, column 4
        assert_eq!(first[48 + 16], values[256 + 4]); // channel 1, row 0, column 4
        let back: Vec<f32> = unpatchify(p, 4, 16).try_into_vec_as::<f32>().unwrap();
        assert_eq!(back, values);
        let z = ae.encode(x);
        assert_eq!(z.dims(), [2, 5, 3]);
        assert_eq!(ae.decode(z).dims(), [2, 3, 16, 16]);
    }
}
