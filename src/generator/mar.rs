//! MAR (masked autoregressive transformer, LTH14/mar) as the paper's stage-3 generator uses it:
//! a ViT encoder over the visible tokens and a ViT decoder over all positions, whose outputs are
//! the per-token conditions z of the flow head (METHOD.md section 7).
//!
//! Pure architecture: the masks come from [`super::masking`], the losses from [`super::loss`],
//! generation from [`super::sample`].

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;

use super::block::{Block, LN_EPS, dense, normal};
use super::head::{FlowHead, FlowHeadConfig};
use super::masking::TokenMask;
use crate::rng::Rng;

/// Hyperparameters of [`Mar`].
#[derive(Config, Debug, PartialEq)]
pub struct MarConfig {
    /// Tokens per latent (paper 64: 64 latent tokens, patch size 1).
    pub seq_len: usize,
    /// Channels of a token (paper 32).
    pub token_dim: usize,
    /// Class-embedding slots in front of the tokens (MAR's `buffer_size`, paper 64).
    pub buffer: usize,
    /// Classes of the class embedding (paper 1000).
    pub classes: usize,
    /// Width of encoder and decoder (paper 768).
    pub width: usize,
    /// Encoder blocks (paper 12).
    pub encoder_depth: usize,
    /// Decoder blocks (paper 12).
    pub decoder_depth: usize,
    /// Attention heads (paper 12, head_dim 64).
    pub heads: usize,
    /// MLP width / width (paper 4).
    pub mlp_ratio: usize,
    /// Dropout on the attention weights during training (paper 0.1).
    pub attn_dropout: f64,
    /// Dropout after the attention projection and in the MLP during training (paper 0.1).
    pub proj_dropout: f64,
    /// Probability that a training sample's class is replaced by the learned `fake_latent`, which
    /// is the unconditional input of classifier-free guidance (paper 0.1).
    pub label_drop: f64,
}

impl MarConfig {
    /// MAR-B as the paper trains it (METHOD.md section 7).
    pub fn paper() -> MarConfig {
        MarConfig::new(64, 32, 64, 1000, 768, 12, 12, 12, 4, 0.1, 0.1, 0.1)
    }

    /// Builds MAR with its initialisation: embeddings, `fake_latent`, mask token and position
    /// embeddings from N(0, 0.02^2), linear layers Xavier-uniform with zero bias, LayerNorms
    /// (1, 0).
    pub fn init(&self, rng: &mut Rng, device: &Device) -> Mar {
        let c = self.width;
        let full = self.buffer + self.seq_len;
        let ln = LayerNormConfig::new(c).with_epsilon(LN_EPS);
        let drops = (self.attn_dropout, self.proj_dropout);
        Mar {
            class_emb: Embedding {
                weight: normal([self.classes, c], rng, device),
            },
            fake_latent: normal([1, c], rng, device),
            z_proj: dense(self.token_dim, c, rng, device),
            z_proj_ln: ln.init(device),
            encoder_pos: normal([1, full, c], rng, device),
            encoder_blocks: (0..self.encoder_depth)
                .map(|_| Block::new(c, self.heads, self.mlp_ratio, drops, rng, device))
                .collect(),
            encoder_norm: ln.init(device),
            decoder_embed: dense(c, c, rng, device),
            mask_token: normal([1, 1, c], rng, device),
            decoder_pos: normal([1, full, c], rng, device),
            decoder_blocks: (0..self.decoder_depth)
                .map(|_| Block::new(c, self.heads, self.mlp_ratio, drops, rng, device))
                .collect(),
            decoder_norm: ln.init(device),
            head_pos: normal([1, self.seq_len, c], rng, device),
            buffer: self.buffer,
            label_drop: self.label_drop,
        }
    }
}

/// The MAR transformer: class buffer + visible tokens -> encoder; + mask tokens -> decoder ->
/// per-token condition z.
#[derive(Module, Debug)]
pub struct Mar {
    /// `Embedding(classes, width)`.
    pub class_emb: Embedding,
    /// `[1, width]`: the class embedding of "no class" (dropped labels, CFG's unconditional half).
    pub fake_latent: Param<Tensor<2>>,
    /// `Linear(token_dim, width)`.
    pub z_proj: Linear,
    /// LayerNorm after the encoder's position embedding.
    pub z_proj_ln: LayerNorm,
    /// `[1, buffer + seq_len, width]`.
    pub encoder_pos: Param<Tensor<3>>,
    pub encoder_blocks: Vec<Block>,
    pub encoder_norm: LayerNorm,
    /// `Linear(width, width)` between encoder and decoder.
    pub decoder_embed: Linear,
    /// `[1, 1, width]`: what the decoder sees at hidden positions.
    pub mask_token: Param<Tensor<3>>,
    /// `[1, buffer + seq_len, width]`.
    pub decoder_pos: Param<Tensor<3>>,
    pub decoder_blocks: Vec<Block>,
    pub decoder_norm: LayerNorm,
    /// `[1, seq_len, width]`, added to the decoder's token outputs (MAR's
    /// `diffusion_pos_embed_learned`).
    pub head_pos: Param<Tensor<3>>,
    /// Class slots in front of the tokens.
    pub buffer: usize,
    /// Training probability of replacing a class by `fake_latent`.
    pub label_drop: f64,
}

/// MAR and its flow head: the paper's generator.
#[derive(Module, Debug)]
pub struct MarGenerator {
    pub mar: Mar,
    pub head: FlowHead,
}

impl MarConfig {
    /// MAR with the flow head `head` (whose `cond_dim` must be this `width`).
    pub fn init_generator(
        &self,
        head: &FlowHeadConfig,
        rng: &mut Rng,
        device: &Device,
    ) -> MarGenerator {
        MarGenerator {
            mar: self.init(rng, device),
            head: head.init(rng, device),
        }
    }
}

/// Rows of a flattened tensor as an index tensor.
pub(crate) fn index(rows: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = rows.len();
    Tensor::from_data(TensorData::new(rows, [n]), device)
}

impl Mar {
    /// Width of the transformer.
    pub fn width(&self) -> usize {
        self.z_proj.weight.dims()[1]
    }

    /// Tokens per latent.
    pub fn seq_len(&self) -> usize {
        self.head_pos.dims()[1]
    }

    /// Channels of a token.
    pub fn token_dim(&self) -> usize {
        self.z_proj.weight.dims()[0]
    }

    /// The class conditions of `labels`; rows where `drop` is 1 take `fake_latent` instead
    /// (training's label drop).
    ///
    /// # Shapes
    /// - `labels`: `[batch]`; `drop`: `[batch]` of 0 / 1
    /// - output: `[batch, width]`
    pub fn class_condition(&self, labels: Tensor<1, Int>, drop: Option<Tensor<1>>) -> Tensor<2> {
        let class = self.class_emb.weight.val().select(0, labels); // [b, C]
        match drop {
            None => class,
            Some(drop) => {
                let d = drop.cast(class.dtype()).unsqueeze_dim::<2>(1); // [b, 1]
                class * (d.clone().neg() + 1.0) + self.fake_latent.val() * d
            }
        }
    }

    /// `fake_latent` for `batch` rows: the unconditional condition.
    ///
    /// # Shapes
    /// - output: `[batch, width]`
    pub fn unconditional(&self, batch: usize) -> Tensor<2> {
        self.fake_latent.val().repeat_dim(0, batch)
    }

    /// The encoder input before dropping: class buffer ++ projected tokens, plus the encoder's
    /// position embedding, through the LayerNorm.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq_len, token_dim]`, `class`: `[batch, width]`
    /// - output: `[batch, buffer + seq_len, width]`
    fn encoder_input(&self, tokens: Tensor<3>, class: Tensor<2>) -> Tensor<3> {
        let x = self.z_proj.forward(tokens); // [b, L, C]
        let buffer = class.unsqueeze_dim::<3>(1).repeat_dim(1, self.buffer); // [b, B, C]
        self.z_proj_ln
            .forward(Tensor::cat(vec![buffer, x], 1) + self.encoder_pos.val())
    }

    /// The encoder over the buffer and the visible tokens only (hidden tokens are dropped, as in
    /// MAR, so they cannot influence anything).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq_len, token_dim]`, `class`: `[batch, width]`
    /// - output: `[batch, buffer + visible, width]`
    pub fn encode(&self, tokens: Tensor<3>, class: Tensor<2>, mask: &TokenMask) -> Tensor<3> {
        let x = self.encoder_input(tokens, class);
        let [b, full, c] = x.dims();
        let kept = self.buffer + mask.kept_per_sample();
        let rows = index(mask.kept_rows(self.buffer), &x.device());
        let x = x
            .reshape([b * full, c])
            .select(0, rows)
            .reshape([b, kept, c]);
        let x = self
            .encoder_blocks
            .iter()
            .fold(x, |x, block| block.forward(x, None));
        self.encoder_norm.forward(x)
    }

    /// The decoder: encoder outputs back in place, the mask token at hidden positions, then the
    /// token outputs plus the head's position embedding.
    ///
    /// # Shapes
    /// - `x`: `[batch, buffer + visible, width]`
    /// - output: `[batch, seq_len, width]`, the condition z of every token
    pub fn decode(&self, x: Tensor<3>, mask: &TokenMask) -> Tensor<3> {
        let [b, kept, c] = x.dims();
        let full = self.buffer + mask.seq_len;
        let x = self.decoder_embed.forward(x).reshape([b * kept, c]);
        let mask_token = self.mask_token.val().reshape([1, c]);
        let rows = index(mask.pad_rows(self.buffer), &x.device());
        let x = Tensor::cat(vec![x, mask_token], 0)
            .select(0, rows)
            .reshape([b, full, c]); // [b, B + L, C]
        let x = self
            .decoder_blocks
            .iter()
            .fold(x + self.decoder_pos.val(), |x, block| {
                block.forward(x, None)
            });
        let x = self
            .decoder_norm
            .forward(x)
            .slice([0..b, self.buffer..full]);
        x + self.head_pos.val()
    }

    /// The per-token conditions z for `tokens` of which `mask` hides some.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq_len, token_dim]`, `class`: `[batch, width]`
    /// - output: `[batch, seq_len, width]`
    pub fn forward(&self, tokens: Tensor<3>, class: Tensor<2>, mask: &TokenMask) -> Tensor<3> {
        self.decode(self.encode(tokens, class, mask), mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::masking::random_order;
    use crate::rng::{Stream, rng_for};
    use rand::RngExt;

    fn tiny() -> MarConfig {
        MarConfig::new(8, 3, 2, 5, 32, 2, 2, 4, 4, 0.0, 0.0, 0.1)
    }

    fn tokens(seed: u64, b: usize, cfg: &MarConfig, dev: &Device) -> (Vec<f32>, Tensor<3>) {
        let mut rng = rng_for(seed, Stream::Eval, 0);
        let v: Vec<f32> = (0..b * cfg.seq_len * cfg.token_dim)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let t = Tensor::from_data(
            TensorData::new(v.clone(), [b, cfg.seq_len, cfg.token_dim]),
            dev,
        );
        (v, t)
    }

    fn mask(seed: u64, b: usize, seq_len: usize, hidden: usize) -> TokenMask {
        let mut rng = rng_for(seed, Stream::Mask, 0);
        let orders: Vec<Vec<usize>> = (0..b).map(|_| random_order(&mut rng, seq_len)).collect();
        TokenMask::from_orders(&orders, hidden)
    }

    #[test]
    fn hidden_tokens_do_not_leak_into_the_condition() {
        let dev = Device::flex();
        let cfg = tiny();
        let mar = cfg.init(&mut rng_for(0, Stream::Init, 0), &dev);
        let m = mask(1, 3, cfg.seq_len, 5);
        let (mut v, x) = tokens(2, 3, &cfg, &dev);
        let labels = index(vec![0, 3, 4], &dev);
        let class = mar.class_condition(labels, None);
        let z: Vec<f32> = mar.forward(x, class.clone(), &m).try_into_vec_as().unwrap();
        // Rewrite every hidden token with large values.
        for (r, &hidden) in m.hidden.iter().enumerate() {
            if hidden {
                for c in 0..cfg.token_dim {
                    v[r * cfg.token_dim + c] = 100.0 + (r * c) as f32;
                }
            }
        }
        let x2 = Tensor::from_data(TensorData::new(v, [3, cfg.seq_len, cfg.token_dim]), &dev);
        let z2: Vec<f32> = mar.forward(x2, class, &m).try_into_vec_as().unwrap();
        assert_eq!(z.len(), 3 * cfg.seq_len * cfg.width);
        for (a, b) in z.iter().zip(&z2) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // A visible token does change it.
        let (_, x3) = tokens(3, 3, &cfg, &dev);
        let z3: Vec<f32> = mar
            .forward(
                x3,
                mar.class_condition(index(vec![0, 3, 4], &dev), None),
                &m,
            )
            .try_into_vec_as()
            .unwrap();
        assert!(z.iter().zip(&z3).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn dropping_tokens_equals_an_attention_padding_mask() {
        let dev = Device::flex();
        let cfg = tiny();
        let mar = cfg.init(&mut rng_for(4, Stream::Init, 0), &dev);
        let (b, hidden) = (2, 5);
        let m = mask(5, b, cfg.seq_len, hidden);
        let (_, x) = tokens(6, b, &cfg, &dev);
        let class = mar.class_condition(index(vec![1, 2], &dev), None);
        let dropped: Vec<f32> = mar
            .encode(x.clone(), class.clone(), &m)
            .try_into_vec_as()
            .unwrap();
        // The same encoder over all positions with the hidden ones masked as keys.
        let full = cfg.buffer + cfg.seq_len;
        let mut pad = vec![false; b * full];
        for i in 0..b {
            for p in 0..cfg.seq_len {
                pad[i * full + cfg.buffer + p] = m.hidden[i * cfg.seq_len + p];
            }
        }
        let pad = Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, full]), &dev);
        let h = mar
            .encoder_blocks
            .iter()
            .fold(mar.encoder_input(x, class), |h, blk| {
                blk.forward(h, Some(pad.clone()))
            });
        let padded = mar.encoder_norm.forward(h).reshape([b * full, cfg.width]);
        let padded: Vec<f32> = padded
            .select(0, index(m.kept_rows(cfg.buffer), &dev))
            .try_into_vec_as()
            .unwrap();
        assert_eq!(padded.len(), dropped.len());
        for (a, b) in padded.iter().zip(&dropped) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn a_fully_hidden_latent_depends_only_on_its_class() {
        let dev = Device::flex();
        let cfg = tiny();
        let mar = cfg.init(&mut rng_for(7, Stream::Init, 0), &dev);
        let m = mask(8, 2, cfg.seq_len, cfg.seq_len);
        let (_, x) = tokens(9, 2, &cfg, &dev);
        let class = mar.class_condition(index(vec![3, 3], &dev), None);
        let z: Vec<f32> = mar.forward(x, class, &m).try_into_vec_as().unwrap();
        let half = z.len() / 2;
        for (a, b) in z[..half].iter().zip(&z[half..]) {
            assert!((a - b).abs() < 1e-5);
        }
        // A dropped label is the fake latent.
        let dropped = mar.class_condition(
            index(vec![3, 3], &dev),
            Some(Tensor::from_data(
                TensorData::new(vec![0.0f32, 1.0], [2]),
                &dev,
            )),
        );
        let fake: Vec<f32> = mar.unconditional(1).try_into_vec_as().unwrap();
        let d: Vec<f32> = dropped.try_into_vec_as().unwrap();
        assert_eq!(&d[cfg.width..], &fake[..]);
        assert_ne!(&d[..cfg.width], &fake[..]);
    }

    #[test]
    fn paper_mar_b_has_about_207_m_parameters() {
        let dev = Device::flex();
        let mut rng = rng_for(0, Stream::Init, 0);
        let g = MarConfig::paper().init_generator(&FlowHeadConfig::paper(), &mut rng, &dev);
        let (mar, head) = (g.mar.num_params(), g.head.num_params());
        // METHOD.md section 7: about 207 M, 36 M of them in the head.
        assert!((35_000_000..37_000_000).contains(&head), "{head}");
        let total = mar + head;
        assert!((206_000_000..209_000_000).contains(&total), "{total}");
    }
}
