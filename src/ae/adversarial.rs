//! The adversarial term of stage 2 (METHOD.md section 6): DiffAugment, the hinge losses, the LeCAM and
//! consistency regularisers, and the discriminator's optimiser step.
//!
//! As in SoftVQ-VAE's `VQLoss` (the recipe the paper follows), each step first trains the
//! autoencoder on `weight * -mean D(aug(x_rec))` (in [`crate::ae::train::ae_step`]), then the
//! discriminator ([`disc_step`]) on the same step's reconstructions, detached:
//!
//! `mean relu(1 - D(aug x)) + mean relu(1 + D(aug x_rec)) + lecam_weight * LeCAM + cr_weight * CR`
//!
//! - DiffAugment (Zhao et al. 2020): color (brightness, saturation, contrast), translation by up to
//!   1/8 of the side with zero fill, cutout of a square of half the side; each policy is on with
//!   probability `diffaug_p` for the whole step, its parameters drawn per image. One draw serves
//!   the real images and their reconstructions (image i and its reconstruction get the same
//!   transform) and both the generator's and the discriminator's step; it comes from
//!   `rng_for(seed, Stream::Adversarial, step)`, so a resumed run draws the same.
//! - LeCAM (Tseng et al. 2021): `mean relu(D(real) - ema_fake)^2 + mean relu(ema_real - D(fake))^2`
//!   with running means (decay `lecam_decay`, starting at 0) of the batch's mean logits, kept in
//!   the checkpoint. The anchors are the means before this step's update (the source updates
//!   first): that keeps a data-parallel step's shards independent; the difference is one step of a
//!   0.99 average.
//! - Consistency regularisation (bCR, Zhao et al. 2021), as SoftVQ/VAR compute it: the mean squared
//!   difference between the logits of the step's inputs to D and of a second, independent
//!   DiffAugment draw with every policy on, over real and fake images together; gradients flow
//!   through both sides. With `diffaug_p` 0 this is exactly `||D(x) - D(T(x))||^2`.
//!
//! Deviations from SoftVQ-VAE's code: its discriminator loss is
//! `weight * (0.5 * hinge + lecam_weight * LeCAM) + cr_weight * CR`; here the hinge is neither halved
//! nor scaled by the generator's weight (with Adam that mostly shifts the balance towards the hinge,
//! against CR). Its DiffAugment draws real and fake independently and uses cutout 0.2 for the main
//! draw (0.5 for CR); here one draw serves both, with cutout 0.5 (the DiffAugment paper's default).

use std::ops::Range;

use burn::prelude::*;
use rand::RngExt;

use super::config::{AdvConfig, AeConfig};
use super::data::ImageBatch;
use super::discriminator::{DinoTrunk, Discriminator};
use super::loss::{Frozen, LecamEma, consistency, discriminator_hinge, lecam};
use crate::error::{Error, Result};
use crate::rng::{Rng, Stream, rng_for};
use crate::train::Trainer;

/// One step's DiffAugment transform of a batch: each policy, when on, with per-image parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AugDraws {
    /// Image side in pixels.
    size: usize,
    /// Per image: brightness shift in [-0.5, 0.5), saturation factor in [0, 2), contrast factor in
    /// [0.5, 1.5).
    color: Option<Vec<[f32; 3]>>,
    /// Per image: (row, column) offsets in [-size/8, size/8]; output (i, j) reads input
    /// (i + row, j + column), zero outside.
    translation: Option<Vec<[i64; 2]>>,
    /// Per image: (row, column) of the cut square's centre; the square has side size/2.
    cutout: Option<Vec<[i64; 2]>>,
}

impl AugDraws {
    /// Draws the transform of a `batch` of `size`-pixel images, each policy on with probability `p`.
    ///
    /// Every parameter is drawn whatever `p` is, so `p` changes which policies apply, not the
    /// values the generator yields.
    pub fn sample(rng: &mut Rng, batch: usize, size: usize, p: f64) -> AugDraws {
        let on = rng.random::<f64>() < p;
        let color: Vec<[f32; 3]> = (0..batch)
            .map(|_| {
                [
                    rng.random::<f32>() - 0.5,
                    rng.random::<f32>() * 2.0,
                    rng.random::<f32>() + 0.5,
                ]
            })
            .collect();
        let color = on.then_some(color);
        let on = rng.random::<f64>() < p;
        let shift = (size as f64 * 0.125 + 0.5) as i64;
        let translation: Vec<[i64; 2]> = (0..batch)
            .map(|_| {
                [
                    rng.random_range(-shift..=shift),
                    rng.random_range(-shift..=shift),
                ]
            })
            .collect();
        let translation = on.then_some(translation);
        let on = rng.random::<f64>() < p;
        let side = cutout_side(size);
        // DiffAugment's offsets: [0, size + (1 - side % 2)).
        let hi = size as i64 + 1 - side % 2;
        let cutout: Vec<[i64; 2]> = (0..batch)
            .map(|_| [rng.random_range(0..hi), rng.random_range(0..hi)])
            .collect();
        let cutout = on.then_some(cutout);
        AugDraws {
            size,
            color,
            translation,
            cutout,
        }
    }

    /// The transform that changes nothing.
    pub fn identity(size: usize) -> AugDraws {
        AugDraws {
            size,
            color: None,
            translation: None,
            cutout: None,
        }
    }

    /// Whether no policy is on.
    pub fn is_identity(&self) -> bool {
        self.color.is_none() && self.translation.is_none() && self.cutout.is_none()
    }

    /// Applies the transform of images `rows` of the batch to `x` (differentiably).
    ///
    /// # Shapes
    /// - `x`: `[rows.len(), 3, size, size]`; output the same
    pub fn apply(&self, x: Tensor<4>, rows: Range<usize>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let s = self.size;
        assert!(
            n == rows.len() && c == 3 && h == s && w == s,
            "AugDraws::apply: [{n}, {c}, {h}, {w}] for rows {rows:?} at size {s}"
        );
        let device = x.device();
        let per_image = |f: &dyn Fn(usize) -> f32| {
            Tensor::<4>::from_data(
                TensorData::new(rows.clone().map(f).collect::<Vec<f32>>(), [n, 1, 1, 1]),
                &device,
            )
        };
        let mut x = x;
        if let Some(col) = &self.color {
            x = x + per_image(&|i| col[i][0]);
            let mean = x.clone().mean_dim(1); // [n, 1, s, s]
            x = (x - mean.clone()) * per_image(&|i| col[i][1]) + mean;
            let mean = x.clone().mean_dim(1).mean_dim(2).mean_dim(3); // [n, 1, 1, 1]
            x = (x - mean.clone()) * per_image(&|i| col[i][2]) + mean;
        }
        if let Some(t) = &self.translation {
            let mut index = Vec::with_capacity(n * s * s);
            let mut inside = Vec::with_capacity(n * s * s);
            let si = s as i64;
            for r in rows.clone() {
                let [dr, dc] = t[r];
                for i in 0..si {
                    for j in 0..si {
                        let (a, b) = (i + dr, j + dc);
                        index.push(a.clamp(0, si - 1) * si + b.clamp(0, si - 1));
                        inside.push(f32::from(u8::from(
                            (0..si).contains(&a) && (0..si).contains(&b),
                        )));
                    }
                }
            }
            let index = Tensor::<3, Int>::from_data(TensorData::new(index, [n, 1, s * s]), &device)
                .repeat_dim(1, 3);
            let inside = Tensor::<4>::from_data(TensorData::new(inside, [n, 1, s, s]), &device);
            x = x
                .reshape([n, 3, s * s])
                .gather(2, index)
                .reshape([n, 3, s, s])
                * inside;
        }
        if let Some(centres) = &self.cutout {
            let side = cutout_side(s);
            let mut keep = Vec::with_capacity(n * s * s);
            for r in rows.clone() {
                let [ci, cj] = centres[r];
                let (i0, j0) = (ci - side / 2, cj - side / 2);
                for i in 0..s as i64 {
                    for j in 0..s as i64 {
                        let cut = (i0..i0 + side).contains(&i) && (j0..j0 + side).contains(&j);
                        keep.push(if cut { 0.0f32 } else { 1.0 });
                    }
                }
            }
            x = x * Tensor::<4>::from_data(TensorData::new(keep, [n, 1, s, s]), &device);
        }
        x
    }
}

/// DiffAugment's cutout side: half the image, rounded.
fn cutout_side(size: usize) -> i64 {
    (size as f64 * 0.5 + 0.5) as i64
}

/// One step's augmentations: the main draw (real and fake, generator and discriminator) and the
/// consistency draw (every policy on).
#[derive(Debug, Clone, PartialEq)]
pub struct AdvDraws {
    pub aug: AugDraws,
    pub cr: AugDraws,
}

impl AdvDraws {
    /// The draws of training step `step` (steps taken before it) of the run seeded by `seed`.
    pub fn for_step(seed: u64, step: usize, batch: usize, size: usize, p: f64) -> AdvDraws {
        let mut rng = rng_for(seed, Stream::Adversarial, step as u64);
        let aug = AugDraws::sample(&mut rng, batch, size, p);
        let cr = AugDraws::sample(&mut rng, batch, size, 1.0);
        AdvDraws { aug, cr }
    }
}

/// What one discriminator step measured (batch means, before the step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiscStats {
    /// The whole discriminator loss.
    pub d_loss: f32,
    /// The hinge part.
    pub hinge: f32,
    /// Mean logit of the augmented real images.
    pub d_real: f32,
    /// Mean logit of the augmented reconstructions.
    pub d_fake: f32,
    /// The LeCAM regulariser (unweighted).
    pub lecam: f32,
    /// The consistency regulariser (unweighted; `None` when its weight is 0: not computed).
    pub cr: Option<f32>,
    pub grad_norm: Option<f32>,
}

/// A discriminator being trained: its trainer and LeCAM's running means.
pub struct Adversary {
    pub trainer: Trainer<Discriminator>,
    pub lecam: LecamEma,
}

/// The name of the discriminator's state in a checkpoint, and of LeCAM's running means.
pub const PART: &str = "disc";
pub const LECAM_REAL: &str = "lecam_real";
pub const LECAM_FAKE: &str = "lecam_fake";

impl Adversary {
    /// A fresh discriminator for `cfg` (heads from `cfg.train.seed`) and its frozen trunk, on
    /// `device`: DINOv2 weights from `cfg.disc_init`, else random with a notice.
    ///
    /// The heads follow the autoencoder's learning-rate schedule (as SoftVQ's scheduler, driven by
    /// the global step) with base rate `loss.adv.lr`: the trainer's step counter starts at
    /// `start_step`, where the discriminator starts, and then equals the autoencoder's.
    pub fn new(cfg: &AeConfig, device: &Device) -> Result<(Adversary, DinoTrunk)> {
        let adv = &cfg.loss.adv;
        let seed = cfg.train.run.seed;
        let heads = adv.model.init(
            &mut rng_for(seed, Stream::DiscInit, 0),
            &device.clone().autodiff(),
        );
        let mut trunk = adv.model.init_trunk(
            cfg.model.image_size,
            &mut rng_for(seed, Stream::DiscInit, 1),
            device,
        );
        match &cfg.disc_init {
            Some(file) => {
                let (path, _) = crate::hub::resolve(file)?;
                let (loaded, report) = super::dinov2::init_trunk(trunk, &path, device)?;
                trunk = loaded;
                tracing::info!(
                    "discriminator trunk from {file}: {} tensors loaded (patch embedding resampled {} -> {}); unused: {}",
                    report.loaded.len(),
                    report.source_patch,
                    adv.model.patch,
                    report.unused.len()
                );
            }
            None => tracing::info!(
                "the discriminator's DINO trunk is random (and frozen): set disc_init to a Hugging Face Dinov2Model safetensors file of loss.adv.model.size for DINOv2 features"
            ),
        }
        let t = &cfg.train.run;
        let mut trainer = Trainer::new(heads, adv.lr, t.schedule(), t.steps).with_optim(adv.optim);
        trainer.step = adv.start_step;
        Ok((
            Adversary {
                trainer,
                lecam: LecamEma::default(),
            },
            trunk,
        ))
    }

    /// This rank's copy of rank 0's discriminator: its trainer state and LeCAM's means, so every
    /// rank's anchors stay equal (see [`Trainer::adopt`]).
    pub fn adopt(mut self, comm: &std::sync::Arc<crate::dist::Comm>) -> Result<Adversary> {
        let (trainer, _) = self.trainer.adopt(comm)?;
        self.trainer = trainer;
        let lecam: Vec<u8> = [self.lecam.real, self.lecam.fake]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let lecam = comm.broadcast(lecam, "LeCAM means")?;
        if !comm.leads() {
            let value = |i: usize| {
                lecam
                    .get(i * 8..i * 8 + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(f64::from_le_bytes)
                    .ok_or_else(|| Error::Distributed("rank 0 sent malformed LeCAM means".into()))
            };
            self.lecam = LecamEma {
                real: value(0)?,
                fake: value(1)?,
            };
        }
        Ok(self)
    }

    /// The discriminator's parameters without autodiff, for the generator's step.
    pub fn frozen(&self) -> Discriminator {
        self.trainer.model().valid()
    }
}

/// One optimiser step of the discriminator on the real images of `real` against `fakes`, the
/// reconstructions of the same step (detached, without autodiff), one tensor per data-parallel
/// shard of `replicas` (contiguous, in order, as [`crate::ae::train::ae_step`] returns them).
/// Updates `lecam` with the step's mean logits afterwards.
pub fn disc_step(
    trainer: &mut Trainer<Discriminator>,
    replicas: &[Frozen],
    real: &ImageBatch,
    fakes: &[Tensor<4>],
    draws: &AdvDraws,
    cfg: &AdvConfig,
    lecam_ema: &mut LecamEma,
) -> Result<DiscStats> {
    let (b, s) = (real.len(), real.size);
    let px = 3 * s * s;
    // A rank of a multi-process run holds the images `first..` of the step's global batch.
    let first = real.first;
    let mut start = 0;
    let mut shards = Vec::with_capacity(fakes.len());
    for (fake, fr) in fakes.iter().zip(replicas) {
        let n = fake.dims()[0];
        shards.push((
            fr.device.clone(),
            (start, start + n, fake.clone(), fr.clone()),
        ));
        start += n;
    }
    if start != b || fakes.len() > replicas.len() {
        return Err(Error::Numeric(format!(
            "the discriminator step got reconstructions of {start} images in {} shards for a batch of {b} on {} devices",
            fakes.len(),
            replicas.len()
        )));
    }
    let ema = *lecam_ema;
    let (step, parts) = trainer.step_sharded(
        shards,
        "discriminator training",
        |disc, (a, e, fake, fr)| {
            let n = e - a;
            let w = n as f64 / b as f64;
            let trunk = fr
                .dino
                .as_ref()
                .expect("replicas carry the trunk when the adversarial term is on");
            let x = Tensor::<4>::from_data(
                TensorData::new(real.pixels[a * px..e * px].to_vec(), [n, 3, s, s]),
                &fr.device,
            );
            // Real and fake through the frozen trunk without autodiff, then the heads.
            let logits = |t: &AugDraws| -> (Tensor<2>, Tensor<2>) {
                let both = Tensor::cat(
                    vec![
                        t.apply(x.clone(), first + a..first + e),
                        t.apply(fake.clone(), first + a..first + e),
                    ],
                    0,
                );
                let l = disc.forward(trunk.features(both)); // [2n, heads * tokens]
                let k = l.dims()[1];
                (l.clone().slice([0..n, 0..k]), l.slice([n..2 * n, 0..k]))
            };
            let (lr, lf) = logits(&draws.aug);
            let hinge = discriminator_hinge(lr.clone(), lf.clone());
            let lc = lecam(lr.clone(), lf.clone(), &ema);
            let cr = (cfg.cr_weight > 0.0).then(|| {
                let (lrt, lft) = logits(&draws.cr);
                consistency(lr.clone(), lrt, lf.clone(), lft)
            });
            let v = |t: &Tensor<1>| t.clone().into_scalar::<f32>() * w as f32;
            let values = (
                v(&hinge),
                v(&lc),
                cr.as_ref().map(v),
                v(&lr.mean()),
                v(&lf.mean()),
            );
            let mut loss = hinge;
            if cfg.lecam_weight > 0.0 {
                loss = loss + lc * cfg.lecam_weight;
            }
            if let Some(cr) = cr {
                loss = loss + cr * cfg.cr_weight;
            }
            (loss * w, values)
        },
    )?;
    let mut stats = DiscStats {
        d_loss: step.loss,
        hinge: parts.iter().map(|p| p.0).sum(),
        lecam: parts.iter().map(|p| p.1).sum(),
        cr: parts.iter().map(|p| p.2).sum(),
        d_real: parts.iter().map(|p| p.3).sum(),
        d_fake: parts.iter().map(|p| p.4).sum(),
        grad_norm: step.grad_norm,
    };
    if let Some(comm) = trainer.comm() {
        // The means of the global batch, so every rank's LeCAM anchors stay equal.
        let n = comm.rank().size as f64;
        let local = [
            stats.hinge,
            stats.lecam,
            stats.cr.unwrap_or(0.0),
            stats.d_real,
            stats.d_fake,
        ];
        let sums = comm.sum_f64(
            local.iter().map(|v| f64::from(*v)).collect(),
            trainer.step,
            "discriminator terms",
        )?;
        let mean = |i: usize| (sums[i] / n) as f32;
        (stats.hinge, stats.lecam, stats.d_real, stats.d_fake) =
            (mean(0), mean(1), mean(3), mean(4));
        stats.cr = stats.cr.map(|_| mean(2));
    }
    lecam_ema.update(
        cfg.lecam_decay,
        f64::from(stats.d_real),
        f64::from(stats.d_fake),
    );
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ae::config::AePreset;
    use crate::ae::discriminator::tests::tiny;
    use crate::ae::loss::generator_hinge;
    use crate::ae::train::{GenAdv, ae_step, new_trainer};
    use crate::flow::VelocityMlpConfig;
    use crate::params::param_values;
    use crate::train::OptimSpec;
    use burn::optim::GradientsParams;

    fn t2(v: &[f32], dev: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), dev)
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
    }

    #[test]
    fn hinge_lecam_and_consistency_on_hand_computed_numbers() {
        let dev = Device::flex();
        let (real, fake) = (t2(&[2.0, 0.5], &dev), t2(&[-2.0, 0.3], &dev));
        // relu(1 - [2, 0.5]) = [0, 0.5], relu(1 + [-2, 0.3]) = [0, 1.3]: 0.25 + 0.65.
        let d = scalar(discriminator_hinge(real.clone(), fake.clone()));
        assert!((d - 0.9).abs() < 1e-6, "{d}");
        // -mean [-2, 0.3] = 0.85.
        let g = scalar(generator_hinge(fake.clone()));
        assert!((g - 0.85).abs() < 1e-6, "{g}");
        // relu([2, 0.5] + 0.1)^2 = [4.41, 0.36]; relu(0.4 - [-2, 0.3])^2 = [5.76, 0.01].
        let ema = LecamEma {
            real: 0.4,
            fake: -0.1,
        };
        let l = scalar(lecam(real.clone(), fake.clone(), &ema));
        assert!((l - (2.385 + 2.885)).abs() < 1e-5, "{l}");
        // Anchors that the logits already respect cost nothing.
        let calm = LecamEma {
            real: -5.0,
            fake: 5.0,
        };
        assert_eq!(scalar(lecam(real.clone(), fake.clone(), &calm)), 0.0);
        // Differences [1, 0] and [0, -1]: mean squares 0.5 each, averaged.
        let cr = scalar(consistency(
            real,
            t2(&[1.0, 0.5], &dev),
            fake,
            t2(&[-2.0, 1.3], &dev),
        ));
        assert!((cr - 0.5).abs() < 1e-6, "{cr}");
        let mut ema = LecamEma::default();
        ema.update(0.99, 1.0, -2.0);
        assert!((ema.real - 0.01).abs() < 1e-12 && (ema.fake + 0.02).abs() < 1e-12);
        ema.update(0.5, 0.03, 0.0);
        assert!((ema.real - 0.02).abs() < 1e-12 && (ema.fake + 0.01).abs() < 1e-12);
    }

    fn images(n: usize, s: usize, seed: u64) -> Vec<f32> {
        let mut rng = rng_for(seed, Stream::Eval, 0);
        (0..n * 3 * s * s)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.try_into_vec_as::<f32>().unwrap()
    }

    #[test]
    fn diffaugment_is_seeded_shared_by_real_and_fake_and_the_identity_at_p_0() {
        let dev = Device::flex();
        let s = 16;
        let draw = |step, p| AdvDraws::for_step(7, step, 4, s, p);
        assert_eq!(draw(3, 0.5), draw(3, 0.5));
        assert_ne!(draw(3, 0.5), draw(4, 0.5));
        // p = 0: nothing applies (the consistency draw still applies everything).
        let off = draw(3, 0.0);
        assert!(off.aug.is_identity() && !off.cr.is_identity());
        let x = Tensor::<4>::from_data(TensorData::new(images(4, s, 1), [4, 3, s, s]), &dev);
        assert_eq!(values(off.aug.apply(x.clone(), 0..4)), values(x.clone()));
        // p = 1: the same transform on real and fake: cutout and the translation's fill zero the
        // same pixels of both, and the result does not depend on how the batch is split.
        let all = draw(3, 1.0).aug;
        let fake = x.clone() * 0.5 + 0.25;
        let (ar, af) = (
            values(all.apply(x.clone(), 0..4)),
            values(all.apply(fake, 0..4)),
        );
        let zeros = |v: &[f32]| -> Vec<usize> { (0..v.len()).filter(|&i| v[i] == 0.0).collect() };
        assert!(
            zeros(&ar).len() >= 4 * 3 * 8 * 8,
            "cutout removes a quarter"
        );
        assert_eq!(zeros(&ar), zeros(&af));
        let halves = [
            values(all.apply(x.clone().narrow(0, 0, 2), 0..2)),
            values(all.apply(x.clone().narrow(0, 2, 2), 2..4)),
        ]
        .concat();
        for (a, b) in ar.iter().zip(&halves) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn translation_cutout_and_color_match_hand_computed_cases() {
        let dev = Device::flex();
        let ramp: Vec<f32> = (0..48).map(|i| (i % 16) as f32).collect(); // 3 channels of 0..16
        let x = Tensor::<4>::from_data(TensorData::new(ramp.clone(), [1, 3, 4, 4]), &dev);
        let only = |color, translation, cutout| AugDraws {
            size: 4,
            color,
            translation,
            cutout,
        };
        // Output (i, j) reads input (i + 1, j - 1); zero outside.
        let t = values(only(None, Some(vec![[1, -1]]), None).apply(x.clone(), 0..1));
        let at = |v: &[f32], i: usize, j: usize| v[i * 4 + j];
        assert_eq!(at(&t, 0, 1), 4.0);
        assert_eq!(at(&t, 2, 3), 14.0);
        assert_eq!(at(&t, 0, 0), 0.0);
        assert_eq!(at(&t, 3, 2), 0.0);
        // A 2 x 2 square centred at (1, 1) covers rows and columns 0 and 1.
        let c = values(only(None, None, Some(vec![[1, 1]])).apply(x.clone(), 0..1));
        let cut: Vec<usize> = (0..16).filter(|&i| c[i] == 0.0 && ramp[i] != 0.0).collect();
        assert_eq!(cut, vec![1, 4, 5]);
        assert_eq!(&c[16..32].iter().filter(|v| **v == 0.0).count(), &4);
        // Brightness +0.25 with saturation and contrast factors 1.
        let b = values(only(Some(vec![[0.25, 1.0, 1.0]]), None, None).apply(x.clone(), 0..1));
        assert!(
            b.iter()
                .zip(&ramp)
                .all(|(b, r)| (b - r - 0.25).abs() < 1e-5)
        );
        // Saturation 0 leaves each pixel's channel mean; here every channel is equal already.
        let g = values(only(Some(vec![[0.0, 0.0, 1.0]]), None, None).apply(x, 0..1));
        assert!(g.iter().zip(&ramp).all(|(g, r)| (g - r).abs() < 1e-5));
    }

    /// A tiny autoencoder run config at 16 px with only the adversarial term in its loss.
    fn adv_only() -> AeConfig {
        let mut cfg = AeConfig::preset(AePreset::Small, "-", "-");
        cfg.model.image_size = 16;
        cfg.model.patch = 8;
        cfg.model.latent_tokens = 4;
        cfg.model.latent_dim = 3;
        cfg.loss.l2 = 0.0;
        cfg.loss.lambda = 0.0;
        cfg.loss.lpips = 0.0;
        cfg.loss.adv.weight = 1.0;
        cfg.loss.adv.start_step = 0;
        cfg.loss.adv.model = tiny();
        // No weight decay: a parameter changes only where a gradient reached it.
        cfg.train.run.optim = OptimSpec {
            weight_decay: 0.0,
            ..OptimSpec::PAPER_ADAMW
        };
        cfg.loss.adv.optim = cfg.train.run.optim;
        cfg.train.run.warmup = 0;
        cfg.validate().unwrap();
        cfg
    }

    fn replicas(trunk: DinoTrunk, dev: &Device) -> Vec<Frozen> {
        let prior = VelocityMlpConfig::new(3, 16, 1).init(&mut rng_for(1, Stream::Init, 0), dev);
        vec![Frozen {
            device: dev.clone(),
            prior: crate::flow::FrozenPrior::new(prior),
            lpips: None,
            dino: Some(trunk),
        }]
    }

    #[test]
    fn each_adversarial_loss_reaches_the_right_parameters() {
        let dev = Device::flex();
        let cfg = adv_only();
        let mut ae = new_trainer(&cfg, &dev).unwrap();
        let (mut adv, trunk) = Adversary::new(&cfg, &dev).unwrap();
        let frozen = replicas(trunk, &dev);
        let trunk = frozen[0].dino.as_ref().unwrap();
        let batch = ImageBatch {
            pixels: images(2, 16, 2),
            labels: vec![0, 1],
            size: 16,
            first: 0,
            total: 2,
        };
        let draws = AdvDraws::for_step(0, 0, 2, 16, 1.0);

        // Gradients of the generator's term: the decoder and the encoder, neither the heads (the
        // generator sees them without autodiff) nor the trunk.
        let x = Tensor::<4>::from_data(
            TensorData::new(batch.pixels.clone(), [2, 3, 16, 16]),
            &dev.clone().autodiff(),
        );
        let rec = ae.model().decode(ae.model().encode(x));
        let g = generator_hinge(adv.frozen().logits(trunk, draws.aug.apply(rec, 0..2)));
        let grads = g.backward();
        let norm = |gp: &GradientsParams, id| {
            gp.get::<2>(id)
                .map(|g| g.abs().sum().into_scalar::<f32>())
                .unwrap_or(0.0)
        };
        let on_ae = GradientsParams::from_grads(grads, ae.model());
        assert!(norm(&on_ae, ae.model().encoder.patch_embed.weight.id) > 0.0);
        assert!(norm(&on_ae, ae.model().decoder.to_pixels.weight.id) > 0.0);
        let grads = generator_hinge(adv.frozen().logits(
            trunk,
            Tensor::<4>::ones([1, 3, 16, 16], &dev.clone().autodiff()).require_grad(),
        ))
        .backward();
        assert!(GradientsParams::from_grads(grads, adv.trainer.model()).is_empty());

        // The real steps: the autoencoder's moves the autoencoder only; the discriminator's moves
        // its heads only; the trunk never moves.
        let trunk_before = param_values(trunk);
        let heads_before = param_values(adv.trainer.model());
        let enc = |ae: &Trainer<crate::ae::model::Autoencoder>| {
            param_values(&ae.model().encoder.patch_embed)
        };
        let dec = |ae: &Trainer<crate::ae::model::Autoencoder>| {
            param_values(&ae.model().decoder.to_pixels)
        };
        let (e0, d0) = (enc(&ae), dec(&ae));
        let heads = adv.frozen();
        let gen_adv = GenAdv {
            disc: &heads,
            aug: &draws.aug,
        };
        let mut rng = rng_for(0, Stream::Align, 0);
        let (stats, fakes) =
            ae_step(&mut ae, &frozen, &batch, &cfg.loss, Some(gen_adv), &mut rng).unwrap();
        assert!(stats.g_adv.unwrap().is_finite());
        assert!(
            enc(&ae) != e0 && dec(&ae) != d0,
            "the generator's term trains the autoencoder"
        );
        assert_eq!(param_values(adv.trainer.model()), heads_before);
        assert!(
            fakes.iter().all(|f| !f.is_autodiff()),
            "the fakes are detached"
        );
        let ae_after = param_values(ae.model());
        let d = disc_step(
            &mut adv.trainer,
            &frozen,
            &batch,
            &fakes,
            &draws,
            &cfg.loss.adv,
            &mut adv.lecam,
        )
        .unwrap();
        assert!(d.d_loss.is_finite() && d.cr.is_some());
        assert!(param_values(adv.trainer.model()) != heads_before);
        assert_eq!(param_values(ae.model()), ae_after);
        assert_eq!(param_values(frozen[0].dino.as_ref().unwrap()), trunk_before);
        assert_ne!(adv.lecam, LecamEma::default());
        // The trainer holds the heads only: the trunk is not among the optimised parameters.
        let trunk_params = frozen[0].dino.as_ref().unwrap().num_params();
        assert_eq!(
            adv.trainer.model().num_params(),
            cfg.loss
                .adv
                .model
                .init(&mut rng_for(0, Stream::DiscInit, 0), &dev)
                .num_params()
        );
        assert!(trunk_params > 0);
    }

    #[test]
    fn a_discriminator_checkpointed_before_its_start_restores() {
        let dev = Device::flex();
        let mut cfg = adv_only();
        cfg.loss.adv.start_step = 30;
        let (adv, _) = Adversary::new(&cfg, &dev).unwrap();
        let state = adv.trainer.state_bytes().unwrap();
        cfg.train.run.seed = 1; // other initial weights, replaced by the restore
        let (mut back, _) = Adversary::new(&cfg, &dev).unwrap();
        assert_ne!(
            param_values(back.trainer.model()),
            param_values(adv.trainer.model())
        );
        back.trainer.restore(&state).unwrap();
        assert_eq!(back.trainer.step, 30);
        assert_eq!(
            param_values(back.trainer.model()),
            param_values(adv.trainer.model())
        );
    }

    #[test]
    fn a_sharded_adversarial_step_equals_a_one_device_step() {
        let dev = Device::flex();
        let cfg = adv_only();
        let batch = ImageBatch {
            pixels: images(4, 16, 5),
            labels: vec![0; 4],
            size: 16,
            first: 0,
            total: 4,
        };
        let draws = AdvDraws::for_step(0, 0, 4, 16, 1.0);
        let run = |devices: usize| {
            let mut ae = new_trainer(&cfg, &dev).unwrap();
            let (mut adv, trunk) = Adversary::new(&cfg, &dev).unwrap();
            let one = replicas(trunk, &dev);
            let frozen = one[0].replicate(&vec![dev.clone(); devices]);
            let heads = adv.frozen();
            let gen_adv = GenAdv {
                disc: &heads,
                aug: &draws.aug,
            };
            let mut rng = rng_for(0, Stream::Align, 0);
            let (g, fakes) =
                ae_step(&mut ae, &frozen, &batch, &cfg.loss, Some(gen_adv), &mut rng).unwrap();
            assert_eq!(fakes.len(), devices);
            let d = disc_step(
                &mut adv.trainer,
                &frozen,
                &batch,
                &fakes,
                &draws,
                &cfg.loss.adv,
                &mut adv.lecam,
            )
            .unwrap();
            (
                g.g_adv.unwrap(),
                d,
                param_values(adv.trainer.model()),
                adv.lecam,
            )
        };
        let (g1, d1, h1, l1) = run(1);
        let (g2, d2, h2, l2) = run(2);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + a.abs());
        assert!(close(g1, g2), "{g1} vs {g2}");
        for (a, b) in [
            (d1.d_loss, d2.d_loss),
            (d1.d_real, d2.d_real),
            (d1.d_fake, d2.d_fake),
            (d1.lecam, d2.lecam),
            (d1.cr.unwrap(), d2.cr.unwrap()),
        ] {
            assert!(close(a, b), "{d1:?} vs {d2:?}");
        }
        assert!(h1.iter().zip(&h2).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!((l1.real - l2.real).abs() < 1e-7 && (l1.fake - l2.fake).abs() < 1e-7);
    }

    /// `n` images of a class-coloured gradient with a bright square, and blurred, noisy copies.
    const NOISE: f32 = 0.6;
    fn real_and_blurred(n: usize, s: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rng_for(seed, Stream::Eval, 1);
        let mut real = Vec::with_capacity(n * 3 * s * s);
        for _ in 0..n {
            let tint: [f32; 3] = [rng.random(), rng.random(), rng.random()];
            let (si, sj) = (rng.random_range(0..s / 2), rng.random_range(0..s / 2));
            for tc in tint {
                for i in 0..s {
                    for j in 0..s {
                        let inside = (si..si + s / 3).contains(&i) && (sj..sj + s / 3).contains(&j);
                        let v = if inside {
                            0.95
                        } else {
                            tc * (i + j) as f32 / (2 * s) as f32 * 1.6 - 0.8
                        };
                        real.push(v);
                    }
                }
            }
        }
        let mut fake = vec![0.0f32; real.len()];
        for plane in 0..n * 3 {
            let p = &real[plane * s * s..(plane + 1) * s * s];
            for i in 0..s {
                for j in 0..s {
                    let mut acc = 0.0;
                    let mut k = 0.0;
                    for di in -1i64..=1 {
                        for dj in -1i64..=1 {
                            let (a, b) = (i as i64 + di, j as i64 + dj);
                            if (0..s as i64).contains(&a) && (0..s as i64).contains(&b) {
                                acc += p[a as usize * s + b as usize];
                                k += 1.0;
                            }
                        }
                    }
                    let noise: f32 = (rng.random::<f32>() - 0.5) * NOISE;
                    fake[plane * s * s + i * s + j] = acc / k + noise;
                }
            }
        }
        (real, fake)
    }

    /// Trains a discriminator alone for 40 steps on real images against blurred, noisy copies;
    /// returns the first and last step's stats and the mean logits of held-out real and fake
    /// images (without augmentation).
    fn train_alone(p: f64, cr_weight: f64) -> (DiscStats, DiscStats, f32, f32) {
        let dev = Device::flex();
        let mut cfg = adv_only();
        cfg.loss.adv.lr = 3e-3;
        cfg.loss.adv.diffaug_p = p;
        cfg.loss.adv.cr_weight = cr_weight;
        cfg.train.run.steps = 40;
        let (mut adv, trunk) = Adversary::new(&cfg, &dev).unwrap();
        let frozen = replicas(trunk, &dev);
        let (s, b) = (16, 8);
        let mut stats = Vec::new();
        for step in 0..40 {
            let (real, fake) = real_and_blurred(b, s, 100 + step as u64);
            let batch = ImageBatch {
                pixels: real,
                labels: vec![0; b],
                size: s,
                first: 0,
                total: b,
            };
            let fakes = [Tensor::<4>::from_data(
                TensorData::new(fake, [b, 3, s, s]),
                &dev,
            )];
            let draws = AdvDraws::for_step(0, step, b, s, p);
            stats.push(
                disc_step(
                    &mut adv.trainer,
                    &frozen,
                    &batch,
                    &fakes,
                    &draws,
                    &cfg.loss.adv,
                    &mut adv.lecam,
                )
                .unwrap(),
            );
        }
        let (real, fake) = real_and_blurred(b, s, 9);
        let trunk = frozen[0].dino.as_ref().unwrap();
        let mean = |v: Vec<f32>| {
            let x = Tensor::<4>::from_data(TensorData::new(v, [b, 3, s, s]), &dev);
            adv.frozen().logits(trunk, x).mean().into_scalar::<f32>()
        };
        (stats[0], stats[39], mean(real), mean(fake))
    }

    #[test]
    fn a_discriminator_alone_learns_to_tell_real_from_blurred() {
        // The hinge (and LeCAM) alone: real logits rise, fake ones fall; a flipped sign fails here.
        let (first, last, real, fake) = train_alone(0.0, 0.0);
        eprintln!(
            "hinge {:.3} -> {:.3}; held out: D(real) {real:.3}, D(blurred) {fake:.3}",
            first.hinge, last.hinge
        );
        assert!(last.hinge < first.hinge - 0.5, "{first:?} -> {last:?}");
        assert!(real > fake + 0.5, "D(real) {real} vs D(fake) {fake}");
        assert!(real > 0.0 && fake < 0.0, "D(real) {real} vs D(fake) {fake}");
        assert!(last.d_real > last.d_fake, "{last:?}");
        // With the paper's DiffAugment and consistency weight the discriminator becomes
        // augmentation-consistent (on this random trunk that also slows its separation a lot).
        let (first, last, real, fake) = train_alone(0.5, 4.0);
        eprintln!(
            "with DiffAugment and CR 4: CR {:.4} -> {:.4}; held out: D(real) {real:.3}, D(blurred) {fake:.3}",
            first.cr.unwrap(),
            last.cr.unwrap()
        );
        assert!(
            last.cr.unwrap() < first.cr.unwrap() / 4.0,
            "{first:?} -> {last:?}"
        );
    }
}
