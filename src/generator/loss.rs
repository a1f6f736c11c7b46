//! The generator's training loss for one batch, given that step's seeded draws (METHOD.md
//! section 7): what a run harness hands to `Trainer::step_loss`.
//!
//! MAR: one mask ratio per batch, a random order per sample, `ceil(64 r)` hidden tokens, labels
//! dropped to `fake_latent` with probability 0.1, and the flow head's loss over the hidden tokens
//! only, with `batch_mul` (t, noise) draws each. DiT: one (t, noise) per latent and labels dropped
//! to the null class.

use burn::prelude::*;
use rand::RngExt;

use super::Generator;
use super::dit::{Dit, DitDraws};
use super::head::HeadDraws;
use super::mar::{MarGenerator, index};
use super::masking::{TokenMask, mask_ratio, masked_count, random_order};
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::rng::Rng;

/// A training batch: latents already multiplied by the run's scale factor, and their classes.
#[derive(Debug, Clone)]
pub struct GenBatch {
    /// `[batch, seq_len, token_dim]`, scaled (`raw * scale`), f32, on the model's device.
    pub latents: Tensor<3>,
    /// One class per latent.
    pub labels: Vec<usize>,
}

impl GenBatch {
    /// A batch of autoencoder latents `raw`, multiplied by `scale` (1 / std of the latents;
    /// 1.7052 for the paper's Qwen-aligned autoencoder).
    ///
    /// # Shapes
    /// - `raw`: `[batch, seq_len, token_dim]`
    pub fn scaled(raw: Tensor<3>, labels: Vec<usize>, scale: f32) -> GenBatch {
        GenBatch {
            latents: raw * scale,
            labels,
        }
    }

    /// Latents in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no latent.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// The random choices of one MAR training step.
#[derive(Debug, Clone)]
pub struct MarDraws {
    /// The batch's mask ratio.
    pub mask_ratio: f64,
    /// The hidden tokens of each sample.
    pub mask: TokenMask,
    /// Per sample: whether its class becomes `fake_latent`.
    pub label_drop: Vec<bool>,
    /// The head's (t, noise), `batch_mul` per hidden token.
    pub head: HeadDraws,
    /// Seeds the device generator that dropout draws from.
    pub dropout_seed: u64,
}

impl MarDraws {
    /// Draws a step for `batch` latents of `model`'s shape, with mask ratios truncated to
    /// `[mask_ratio_min, 1]`.
    pub fn sample(
        rng: &mut Rng,
        model: &MarGenerator,
        batch: usize,
        mask_ratio_min: f64,
        device: &Device,
    ) -> MarDraws {
        let (l, d) = (model.mar.seq_len(), model.mar.token_dim());
        let ratio = mask_ratio(rng, mask_ratio_min);
        let orders: Vec<Vec<usize>> = (0..batch).map(|_| random_order(rng, l)).collect();
        let mask = TokenMask::from_orders(&orders, masked_count(l, ratio));
        let label_drop = (0..batch)
            .map(|_| rng.random::<f64>() < model.mar.label_drop)
            .collect();
        let rows = batch * mask.hidden_per_sample;
        let head = HeadDraws::sample(rng, rows, d, model.head.batch_mul, device);
        MarDraws {
            mask_ratio: ratio,
            mask,
            label_drop,
            head,
            dropout_seed: rng.random(),
        }
    }
}

/// The random choices of one training step of either generator.
#[derive(Debug, Clone)]
pub enum GenDraws {
    Mar(MarDraws),
    Dit(DitDraws),
}

impl GenDraws {
    /// Draws a step for `batch` latents of `model`'s kind and shape (`mask_ratio_min` is used by
    /// MAR only).
    pub fn sample(
        rng: &mut Rng,
        model: &Generator,
        batch: usize,
        mask_ratio_min: f64,
        device: &Device,
    ) -> GenDraws {
        match model {
            Generator::Mar(m) => {
                GenDraws::Mar(MarDraws::sample(rng, m, batch, mask_ratio_min, device))
            }
            Generator::Dit(d) => GenDraws::Dit(DitDraws::sample(rng, d, batch, device)),
        }
    }
}

/// The 0 / 1 drop indicators as a float tensor.
fn indicators(drop: &[bool], device: &Device) -> Tensor<1> {
    let v: Vec<f32> = drop.iter().map(|&d| if d { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(v, [drop.len()]), device)
}

/// Seeds the device's generator before a forward pass that uses dropout, so a step's dropout
/// masks are a function of the run seed (the generator is global on the CPU backend: steps that
/// run concurrently on one device share it).
fn seed_dropout(device: &Device, seed: u64) {
    if device.is_autodiff() {
        device.seed(seed);
    }
}

/// MAR's loss: the flow head's mean squared velocity error over the hidden tokens
/// ([`super::head::FlowHead::loss`]), the transformer and head at `precision`, the loss in f32.
///
/// # Shapes
/// - `batch.latents`: `[batch, seq_len, token_dim]`; output `[1]`
pub fn mar_loss(
    model: &MarGenerator,
    batch: &GenBatch,
    draws: &MarDraws,
    precision: Precision,
) -> Tensor<1> {
    let device = batch.latents.device();
    seed_dropout(&device, draws.dropout_seed);
    let [b, l, d] = batch.latents.dims();
    let labels = index(batch.labels.iter().map(|&y| y as i64).collect(), &device);
    let class = model
        .mar
        .class_condition(labels, Some(indicators(&draws.label_drop, &device)));
    let z = model
        .mar
        .forward(precision.input(batch.latents.clone()), class, &draws.mask); // [b, L, C]
    let c = z.dims()[2];
    let hidden = index(draws.mask.hidden_rows(), &device);
    let z = z.reshape([b * l, c]).select(0, hidden.clone());
    let x = batch.latents.clone().reshape([b * l, d]).select(0, hidden);
    model.head.loss(x, z, &draws.head, precision)
}

/// The DiT's loss ([`Dit::loss`]) with the drawn labels replaced by the null class.
///
/// # Shapes
/// - `batch.latents`: `[batch, seq_len, token_dim]`; output `[1]`
pub fn dit_loss(
    model: &Dit,
    batch: &GenBatch,
    draws: &DitDraws,
    precision: Precision,
) -> Tensor<1> {
    let device = batch.latents.device();
    seed_dropout(&device, draws.dropout_seed);
    let ids: Vec<i64> = batch
        .labels
        .iter()
        .zip(&draws.label_drop)
        .map(|(&y, &drop)| (if drop { model.classes } else { y }) as i64)
        .collect();
    model.loss(
        batch.latents.clone(),
        index(ids, &device),
        draws.t.clone(),
        draws.noise.clone(),
        precision,
    )
}

/// The generator's loss for `batch` with `draws` (drawn by [`GenDraws::sample`] for this model
/// and batch size), at `precision`; fails, naming the problem, when the batch does not fit the
/// model or the draws.
///
/// # Shapes
/// - `batch.latents`: `[batch, seq_len, token_dim]`; output `[1]`
pub fn gen_loss(
    model: &Generator,
    batch: &GenBatch,
    draws: &GenDraws,
    precision: Precision,
) -> Result<Tensor<1>> {
    let [b, l, d] = batch.latents.dims();
    let (want_l, want_d, classes) = match model {
        Generator::Mar(m) => (
            m.mar.seq_len(),
            m.mar.token_dim(),
            m.mar.class_emb.weight.dims()[0],
        ),
        Generator::Dit(dit) => (dit.seq_len(), dit.token_dim(), dit.classes),
    };
    if (l, d) != (want_l, want_d) || b != batch.labels.len() || b == 0 {
        return Err(Error::Numeric(format!(
            "generator batch: latents are [{b}, {l}, {d}] with {} labels; the model takes [batch >= 1, {want_l}, {want_d}] with one label per latent",
            batch.labels.len()
        )));
    }
    if let Some(bad) = batch.labels.iter().find(|&&y| y >= classes) {
        return Err(Error::setting(
            "mar.classes",
            format!(
                "the batch holds class {bad}, out of range for a generator of {classes} classes; raise the model's classes"
            ),
        ));
    }
    match (model, draws) {
        (Generator::Mar(m), GenDraws::Mar(dr)) if dr.mask.batch == b => {
            Ok(mar_loss(m, batch, dr, precision))
        }
        (Generator::Dit(m), GenDraws::Dit(dr)) if dr.label_drop.len() == b => {
            Ok(dit_loss(m, batch, dr, precision))
        }
        _ => Err(Error::Numeric(format!(
            "generator draws do not match the model and the batch of {b}; draw them with GenDraws::sample for this model"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::head::FlowHeadConfig;
    use crate::generator::mar::MarConfig;
    use crate::generator::test_util::{perturbed, seed_lock};
    use crate::rng::{Stream, rng_for};

    fn fresh_mar(dropout: f64, dev: &Device) -> MarGenerator {
        let cfg = MarConfig::new(6, 2, 2, 3, 16, 1, 1, 2, 2, dropout, dropout, 0.1);
        cfg.init_generator(
            &FlowHeadConfig::new(2, 16, 16, 1, 2),
            &mut rng_for(0, Stream::Init, 0),
            dev,
        )
    }

    /// Non-zero output layers, so the loss sees the transformer (and its dropout). For forward
    /// passes only: on an autodiff device the perturbed parameters are no longer leaves.
    fn tiny_mar(dropout: f64, dev: &Device) -> MarGenerator {
        perturbed(fresh_mar(dropout, dev), 5, 0.1)
    }

    fn tiny_batch(dev: &Device) -> GenBatch {
        let raw: Vec<f32> = (0..2 * 6 * 2)
            .map(|i| ((i * 7) % 11) as f32 * 0.2 - 1.0)
            .collect();
        GenBatch::scaled(
            Tensor::from_data(TensorData::new(raw, [2, 6, 2]), dev),
            vec![0, 2],
            1.5,
        )
    }

    #[test]
    fn dropout_is_seeded_by_the_draws() {
        let _seed = seed_lock();
        let dev = Device::flex().autodiff();
        let g = tiny_mar(0.3, &dev);
        let batch = tiny_batch(&dev);
        let mut draws = MarDraws::sample(&mut rng_for(1, Stream::Mask, 0), &g, 2, 0.7, &dev);
        let loss = |d: &MarDraws| mar_loss(&g, &batch, d, Precision::F32).into_scalar::<f32>();
        // Same seed, same masks. (Other tests of the crate may draw from burn's global generator
        // concurrently, e.g. when burn initialises its own attention; one retry absorbs that.)
        let a = loss(&draws);
        assert!(
            (0..3).any(|_| loss(&draws) == a),
            "same dropout seed, same loss"
        );
        draws.dropout_seed ^= 1;
        assert_ne!(loss(&draws), a, "dropout is active in training");
        // Without autodiff (sampling, evaluation) dropout is off.
        let plain = Device::flex();
        let g = tiny_mar(0.3, &plain);
        let batch = tiny_batch(&plain);
        let draws = MarDraws::sample(&mut rng_for(1, Stream::Mask, 0), &g, 2, 0.7, &plain);
        let off = tiny_mar(0.0, &plain);
        let x = mar_loss(&g, &batch, &draws, Precision::F32).into_scalar::<f32>();
        let y = mar_loss(&off, &batch, &draws, Precision::F32).into_scalar::<f32>();
        assert_eq!(x, y);
    }

    #[test]
    fn bf16_loss_is_close_to_f32() {
        let dev = Device::flex();
        let g = tiny_mar(0.0, &dev);
        let batch = tiny_batch(&dev);
        let draws = MarDraws::sample(&mut rng_for(2, Stream::Mask, 0), &g, 2, 0.7, &dev);
        let f32_loss = mar_loss(&g, &batch, &draws, Precision::F32).into_scalar::<f32>();
        let g16 = Precision::Bf16.cast_params(g);
        let loss = mar_loss(&g16, &batch, &draws, Precision::Bf16);
        assert_eq!(loss.dtype(), burn::tensor::DType::F32);
        let bf16_loss = loss.into_scalar::<f32>();
        assert!(
            (bf16_loss - f32_loss).abs() < 0.02 * f32_loss,
            "{bf16_loss} vs {f32_loss}"
        );
    }

    #[test]
    fn trainer_steps_lower_the_loss_of_both_generators() {
        let _seed = seed_lock();
        use crate::generator::dit::DitConfig;
        use crate::train::Schedule;
        use crate::train::{OptimSpec, Trainer};
        let dev = Device::flex().autodiff();
        let mar = fresh_mar(0.0, &dev);
        let dit = DitConfig::new(6, 2, 3, 16, 1, 2, 2, 0.1, 0.0, 0.0)
            .init(&mut rng_for(0, Stream::Init, 0), &dev);
        let spec = OptimSpec {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 3.0,
        };
        for model in [Generator::Mar(mar), Generator::Dit(dit)] {
            let batch = tiny_batch(&dev);
            // One set of draws throughout: the loss of a fixed objective must fall.
            let draws = GenDraws::sample(&mut rng_for(3, Stream::Mask, 0), &model, 2, 0.7, &dev);
            let mut trainer = Trainer::new(model, 1e-2, Schedule::Constant, 60).with_optim(spec);
            let mut losses = Vec::new();
            for _ in 0..60 {
                let loss =
                    gen_loss(&trainer.compute_model(), &batch, &draws, Precision::F32).unwrap();
                losses.push(trainer.step_loss(loss, "generator").unwrap().loss);
            }
            let (first, last) = (losses[0], losses[59]);
            assert!(
                last < 0.3 * first,
                "{:?}: {first} -> {last}",
                trainer.model().arch()
            );
        }
    }

    #[test]
    fn label_drop_rate_is_about_a_tenth() {
        let dev = Device::flex();
        let cfg = MarConfig::new(4, 2, 1, 3, 16, 1, 1, 2, 2, 0.0, 0.0, 0.1);
        let g = cfg.init_generator(
            &FlowHeadConfig::new(2, 16, 16, 1, 1),
            &mut rng_for(0, Stream::Init, 0),
            &dev,
        );
        let mut rng = rng_for(1, Stream::Mask, 0);
        let (mut dropped, mut total) = (0usize, 0usize);
        for _ in 0..200 {
            let d = MarDraws::sample(&mut rng, &g, 100, 0.7, &dev);
            dropped += d.label_drop.iter().filter(|&&x| x).count();
            total += d.label_drop.len();
            assert!((0.7..=1.0).contains(&d.mask_ratio));
            assert_eq!(d.mask.hidden_per_sample, masked_count(4, d.mask_ratio));
        }
        let rate = dropped as f64 / total as f64;
        // 20,000 draws: the standard error is 0.002.
        assert!((rate - 0.1).abs() < 0.008, "rate {rate}");
    }

    #[test]
    fn the_loss_counts_hidden_tokens_only_and_checks_its_inputs() {
        let dev = Device::flex();
        let cfg = MarConfig::new(6, 2, 2, 3, 16, 1, 1, 2, 2, 0.0, 0.0, 0.1);
        let g = cfg.init_generator(
            &FlowHeadConfig::new(2, 16, 16, 1, 2),
            &mut rng_for(0, Stream::Init, 0),
            &dev,
        );
        let raw: Vec<f32> = (0..2 * 6 * 2).map(|i| i as f32 * 0.1 - 1.0).collect();
        let batch = GenBatch::scaled(
            Tensor::from_data(TensorData::new(raw.clone(), [2, 6, 2]), &dev),
            vec![0, 2],
            2.0,
        );
        let draws = MarDraws::sample(&mut rng_for(3, Stream::Mask, 0), &g, 2, 0.7, &dev);
        let loss = mar_loss(&g, &batch, &draws, Precision::F32).into_scalar::<f32>();
        // A fresh head predicts 0: the loss is the mean square of noise - x over hidden tokens.
        let hidden = draws.mask.hidden_rows();
        let noise: Vec<f32> = draws.head.noise.clone().try_into_vec_as().unwrap();
        let rows = hidden.len();
        let mut want = 0.0f32;
        for k in 0..2 {
            for (i, &r) in hidden.iter().enumerate() {
                for c in 0..2 {
                    let x = 2.0 * raw[r as usize * 2 + c];
                    want += (noise[(k * rows + i) * 2 + c] - x).powi(2);
                }
            }
        }
        want /= (2 * rows * 2) as f32;
        assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
        let gen_model = Generator::Mar(g);
        let gen_draws = GenDraws::Mar(draws);
        assert!(gen_loss(&gen_model, &batch, &gen_draws, Precision::F32).is_ok());
        let bad = GenBatch {
            labels: vec![0, 3],
            ..batch.clone()
        };
        let err = gen_loss(&gen_model, &bad, &gen_draws, Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("class 3"), "{err}");
        let short = GenBatch {
            labels: vec![0],
            ..batch
        };
        assert!(gen_loss(&gen_model, &short, &gen_draws, Precision::F32).is_err());
    }
}
