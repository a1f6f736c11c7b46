//! Training the autoencoder with the alignment loss (SPEC section 6, stage 2): reconstruction plus
//! `lambda * L_align` of every latent token under the frozen prior (plus LPIPS and the adversarial
//! term of [`crate::ae::adversarial`]), with checkpoints, resume, the alignment monitor of paper
//! Fig. 4 and reconstruction grids.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::adversarial::{self, AdvDraws, Adversary, AugDraws, DiscStats, disc_step};
use super::config::{AeConfig, AeLossConfig};
use super::data::{Crop, ImageBatch, ImageFolder, ImageLoader};
use super::discriminator::{DinoTrunk, Discriminator};
use super::lpips::Lpips;
use super::model::Autoencoder;
use crate::align::{align_loss, flow_loss};
use crate::checkpoint::{self, MetricsLog};
use crate::config::{Reduction, Schedule};
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::flow::VelocityMlp;
use crate::precision::Precision;
use crate::prior::FeaturePriorConfig;
use crate::prior::data::PriorData;
use crate::prior::eval::knn_log_r;
use crate::rng::{Stream, rng_for};
use crate::train::{StepStats, Trainer, load_prior};

/// What an autoencoder checkpoint records about its images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    pub images: usize,
    pub classes: usize,
}

/// One line of the metrics log.
#[derive(Debug, Clone, Serialize)]
pub struct AeMetrics {
    pub step: usize,
    /// Mean total loss since the previous line.
    pub loss: f32,
    /// Mean pixel MSE (images in [-1, 1]) since the previous line.
    pub l2: f32,
    /// PSNR of that MSE, in dB for images in [0, 1].
    pub psnr: f32,
    /// Mean L_align of the batches' latent tokens since the previous line.
    pub l_align: f32,
    /// Mean LPIPS since the previous line, when it is part of the loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lpips: Option<f32>,
    /// The adversarial term, averaged over the steps since the previous line where it ran.
    #[serde(flatten)]
    pub adv: AdvMetrics,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    pub images_per_s: f64,
    /// The monitor (every `monitor_every` steps): L_align of fixed images' latent tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor_l_align: Option<f32>,
    /// The monitor: mean log r_k (k = 5) of those tokens among the prior's target rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor_log_rk: Option<f32>,
    /// Unreadable image files met so far (each skipped and replaced by the next image).
    pub skipped_images: usize,
}

/// The adversarial columns of a metrics line (absent before the term starts).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AdvMetrics {
    /// The generator's hinge loss `-mean D(aug(x_rec))` (unweighted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub g_adv: Option<f32>,
    /// The discriminator's whole loss (hinge + LeCAM + CR, weighted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d_loss: Option<f32>,
    /// Mean logit of the (augmented) real images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d_real: Option<f32>,
    /// Mean logit of the (augmented) reconstructions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d_fake: Option<f32>,
    /// The LeCAM regulariser (unweighted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lecam: Option<f32>,
    /// The consistency regulariser (unweighted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cr: Option<f32>,
}

/// Sums of the adversarial values over the steps of a metrics line where the term ran.
#[derive(Debug, Clone, Copy, Default)]
struct AdvSums {
    /// g_adv, d_loss, d_real, d_fake, lecam.
    values: [f64; 5],
    cr: Option<f64>,
    steps: usize,
}

impl AdvSums {
    fn add(&mut self, g_adv: f32, d: &DiscStats) {
        let v = [g_adv, d.d_loss, d.d_real, d.d_fake, d.lecam];
        for (s, x) in self.values.iter_mut().zip(v) {
            *s += f64::from(x);
        }
        if let Some(cr) = d.cr {
            *self.cr.get_or_insert(0.0) += f64::from(cr);
        }
        self.steps += 1;
    }

    fn means(&self) -> AdvMetrics {
        if self.steps == 0 {
            return AdvMetrics::default();
        }
        let n = self.steps as f64;
        let m = |i: usize| Some((self.values[i] / n) as f32);
        AdvMetrics {
            g_adv: m(0),
            d_loss: m(1),
            d_real: m(2),
            d_fake: m(3),
            lecam: m(4),
            cr: self.cr.map(|c| (c / n) as f32),
        }
    }
}

const METRICS: [&str; 18] = [
    "step",
    "loss",
    "l2",
    "psnr",
    "l_align",
    "lpips",
    "g_adv",
    "d_loss",
    "d_real",
    "d_fake",
    "lecam",
    "cr",
    "lr",
    "grad_norm",
    "images_per_s",
    "monitor_l_align",
    "monitor_log_rk",
    "skipped_images",
];

/// PSNR in dB of a mean squared error measured on [-1, 1] images.
pub fn psnr(mse: f64) -> f64 {
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct AeStepStats {
    pub step: StepStats,
    pub l2: f32,
    pub l_align: f32,
    /// LPIPS of the batch, when it is part of the loss.
    pub lpips: Option<f32>,
    /// The generator's hinge loss (unweighted), when the adversarial term ran.
    pub g_adv: Option<f32>,
    /// The discriminator's step, when the adversarial term ran.
    pub disc: Option<DiscStats>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AeSummary {
    pub resumed_from: usize,
    pub step: usize,
    pub interrupted: bool,
    /// The last monitor values (L_align, log r_k).
    pub monitor: Option<(f32, Option<f32>)>,
}

/// The frozen networks of the loss (prior, LPIPS, the discriminator's DINO trunk), replicated on
/// one data-parallel device.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub device: Device,
    pub prior: VelocityMlp,
    pub lpips: Option<Lpips>,
    /// The discriminator's trunk, when the adversarial term is on (no autodiff).
    pub dino: Option<DinoTrunk>,
}

impl Frozen {
    /// Copies of `self` on each of `devices`.
    pub fn replicate(&self, devices: &[Device]) -> Vec<Frozen> {
        devices
            .iter()
            .map(|d| Frozen {
                device: d.clone(),
                prior: self.prior.clone().to_device(d),
                lpips: self.lpips.as_ref().map(|l| l.to_device(d)),
                dino: self.dino.clone().map(|t| t.to_device(d)),
            })
            .collect()
    }
}

/// The generator's side of the adversarial term in one step: the discriminator's current heads
/// (without autodiff) and the step's DiffAugment draw.
#[derive(Debug, Clone, Copy)]
pub struct GenAdv<'a> {
    pub disc: &'a Discriminator,
    pub aug: &'a AugDraws,
}

/// One optimiser step of `trainer` on `batch`:
/// `l2 * MSE + lpips * LPIPS + lambda * L_align + adv.weight * -mean D(aug(x_rec))`, L_align of
/// every latent token under the frozen prior with `mc` draws per token from `rng`, the adversarial
/// term only when `adv` is given. With lambda 0, L_align is measured but not trained on.
///
/// The batch is split into contiguous shards over `replicas` (one thread and model replica each,
/// see [`Trainer::step_sharded`]); the draws do not depend on the split, so the result equals a
/// one-device step up to float summation order. Returns the step's reconstructions too (before
/// the update, without autodiff), one tensor per shard on its device, for the discriminator.
pub fn ae_step(
    trainer: &mut Trainer<Autoencoder>,
    replicas: &[Frozen],
    batch: &ImageBatch,
    loss_cfg: &AeLossConfig,
    adv: Option<GenAdv<'_>>,
    rng: &mut crate::rng::Rng,
) -> Result<(AeStepStats, Vec<Tensor<4>>)> {
    let (b, s) = (batch.len(), batch.size);
    let px = 3 * s * s;
    let k = trainer.model().encoder.latent_tokens.dims()[1];
    let dz = trainer.model().encoder.to_latent.weight.dims()[1];
    // The draws of the whole global batch, so a rank's share does not depend on the split.
    let draws = crate::flow::path::HostDraws::sample(rng, batch.total * k, dz, loss_cfg.mc);
    let first = batch.first;
    // LPIPS ramps up linearly over its warm-up (SPEC section 6).
    let ramp = ((trainer.step + 1) as f64 / loss_cfg.lpips_warmup.max(1) as f64).min(1.0);
    let lambda = loss_cfg.lambda;
    let n_shards = replicas.len().min(b).max(1);
    // Per shard: its rows a..e, the frozen networks and the discriminator's heads on its device.
    type Shard = (usize, usize, Frozen, Option<Discriminator>);
    let shards: Vec<(Device, Shard)> = (0..n_shards)
        .map(|i| {
            let r = replicas[i].clone();
            let disc = adv.map(|g| g.disc.clone().to_device(&r.device));
            (
                r.device.clone(),
                (i * b / n_shards, (i + 1) * b / n_shards, r, disc),
            )
        })
        .collect();
    let draws = &draws;
    let adv_weight = loss_cfg.adv.weight;
    let precision = trainer.precision();
    let (step, parts) =
        trainer.step_sharded(shards, "autoencoder training", |model, (a, e, fr, disc)| {
            let ad = fr.device.clone().autodiff();
            let n = e - a;
            let w = n as f64 / b as f64;
            let x = Tensor::<4>::from_data(
                TensorData::new(batch.pixels[a * px..e * px].to_vec(), [n, 3, s, s]),
                &ad,
            );
            // The model computes at `precision`; latents and pixels come back as f32 for the losses.
            let z = Precision::output(model.encode(precision.input(x.clone()))); // [n, k, dz]
            let rec = Precision::output(model.decode(precision.input(z.clone())));
            let rec_out = rec.clone().inner();
            let perceptual = fr
                .lpips
                .as_ref()
                .filter(|_| loss_cfg.lpips > 0.0)
                .map(|l| l.distance(rec.clone(), x.clone()).mean());
            let fake = rec.clone();
            let diff = rec - x;
            let l2 = (diff.clone() * diff).mean();
            let tokens = z.reshape([n * k, dz]);
            let la = if lambda > 0.0 {
                let y = tokens.repeat_dim(0, loss_cfg.mc);
                flow_loss(
                    &fr.prior,
                    y,
                    &draws.shard((first + a) * k..(first + e) * k, &ad),
                    Reduction::Mean,
                )
            } else {
                let y = tokens.inner().repeat_dim(0, loss_cfg.mc);
                flow_loss(
                    &fr.prior,
                    y,
                    &draws.shard((first + a) * k..(first + e) * k, &fr.device),
                    Reduction::Mean,
                )
            };
            let l2_v = l2.clone().into_scalar::<f32>();
            let la_v = la.clone().into_scalar::<f32>();
            let mut loss = l2 * (loss_cfg.l2 * w);
            if lambda > 0.0 {
                loss = loss + la * (lambda * w);
            }
            let mut lp_v = None;
            if let Some(p) = perceptual {
                lp_v = Some(p.clone().into_scalar::<f32>() * w as f32);
                loss = loss + p * (loss_cfg.lpips * ramp * w);
            }
            let mut adv_v = None;
            if let (Some(disc), Some(g)) = (&disc, adv) {
                let trunk = fr
                    .dino
                    .as_ref()
                    .expect("replicas carry the trunk when the adversarial term is on");
                // Through the frozen trunk and heads (no autodiff on either) to the decoder.
                let g_adv = adversarial::generator_hinge(
                    disc.logits(trunk, g.aug.apply(fake, first + a..first + e)),
                );
                adv_v = Some(g_adv.clone().into_scalar::<f32>() * w as f32);
                loss = loss + g_adv * (adv_weight * w);
            }
            (
                loss,
                (l2_v * w as f32, la_v * w as f32, lp_v, adv_v, rec_out),
            )
        })?;
    let stats = AeStepStats {
        step,
        l2: parts.iter().map(|p| p.0).sum(),
        l_align: parts.iter().map(|p| p.1).sum(),
        lpips: parts.iter().map(|p| p.2).sum(),
        g_adv: parts.iter().map(|p| p.3).sum(),
        disc: None,
    };
    Ok((stats, parts.into_iter().map(|p| p.4).collect()))
}

/// A fresh trainer for `cfg` on `device`: the model initialised from `cfg.train.seed`, its encoder
/// from DINOv2 weights when `cfg.encoder_init` names them.
pub fn new_trainer(cfg: &AeConfig, device: &Device) -> Result<Trainer<Autoencoder>> {
    let ad = device.clone().autodiff();
    let mut rng = rng_for(cfg.train.seed, Stream::Init, 0);
    let mut model = cfg.model.init(&mut rng, &ad);
    if let Some(file) = &cfg.encoder_init {
        let (encoder, report) = super::dinov2::init_encoder(model.encoder, Path::new(file), &ad)?;
        model.encoder = encoder;
        tracing::info!(
            "encoder initialised from {file}: {} tensors loaded (patch embedding resampled {} -> {}, position embeddings interpolated){}",
            report.loaded.len(),
            report.source_patch,
            cfg.model.patch,
            if report.unused.is_empty() {
                String::new()
            } else {
                format!("; unused: {}", report.unused.join(", "))
            }
        );
    }
    let t = &cfg.train;
    Ok(Trainer::new(
        model,
        t.lr,
        Schedule::Cosine {
            warmup: t.warmup,
            final_frac: t.final_lr_frac,
        },
        t.steps,
        Reduction::Mean,
    )
    .with_optim(t.optim)
    .with_ema(t.ema)
    .with_precision(t.precision))
}

/// An autoencoder run: images, frozen prior, trainer and folder.
pub struct AeRun {
    cfg: AeConfig,
    dir: PathBuf,
    loader: Arc<ImageLoader>,
    /// The frozen prior, LPIPS and DINO trunk on each data-parallel device (the first is the run's
    /// device).
    replicas: Vec<Frozen>,
    trainer: Trainer<Autoencoder>,
    /// The discriminator, when the adversarial term is on.
    adversary: Option<Adversary>,
    device: Device,
    /// Fixed images for the monitor and the reconstruction grid (centre crops).
    fixed: ImageBatch,
    /// The prior's target rows, for log r_k (absent when its features cannot be read).
    reference: Option<(Vec<f32>, usize)>,
    resumed_from: usize,
    /// The other processes of a multi-process run (rank 0 alone writes `dir`).
    comm: Option<Arc<Comm>>,
}

impl AeRun {
    /// Opens a new run in `dir`, or continues its checkpoint when `resume` is set.
    pub fn open(cfg: AeConfig, dir: &Path, resume: bool, device: &Device) -> Result<AeRun> {
        Self::open_as(cfg, dir, resume, device, true)
    }

    /// Opens one rank of a multi-process run: rank 0 opens `dir` as [`AeRun::open`] does (new or
    /// resumed) and broadcasts its trainer state; the other ranks load the same prior and images,
    /// never touch `dir`, and start from rank 0's state. Every rank must pass rank 0's `cfg`.
    pub fn open_rank(
        cfg: AeConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        comm: Arc<Comm>,
    ) -> Result<AeRun> {
        dist::check_batch(cfg.train.batch, comm.rank().size, "images")?;
        let mut run = Self::open_as(cfg, dir, resume, device, comm.leads())?;
        let (trainer, step) = dist::adopt(run.trainer, &comm)?;
        (run.trainer, run.resumed_from) = (trainer, step);
        if let Some(adv) = run.adversary.take() {
            let (disc, _) = dist::adopt(adv.trainer, &comm)?;
            let lecam: Vec<u8> = [adv.lecam.real, adv.lecam.fake]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let lecam = comm.broadcast(lecam, "LeCAM means")?;
            let mut adv = adversarial::Adversary {
                trainer: disc,
                lecam: adv.lecam,
            };
            if !comm.leads() {
                let value = |i: usize| {
                    lecam
                        .get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(f64::from_le_bytes)
                        .ok_or_else(|| {
                            Error::Distributed("rank 0 sent malformed LeCAM means".into())
                        })
                };
                adv.lecam = adversarial::LecamEma {
                    real: value(0)?,
                    fake: value(1)?,
                };
            }
            run.adversary = Some(adv);
        }
        run.comm = Some(comm);
        Ok(run)
    }

    /// Whether this process writes the run folder (rank 0, or the only process).
    pub fn leads(&self) -> bool {
        self.comm.as_ref().is_none_or(|c| c.leads())
    }

    /// [`AeRun::open`]; with `lead` false the run folder is neither read nor written.
    fn open_as(
        cfg: AeConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        lead: bool,
    ) -> Result<AeRun> {
        cfg.validate()?;
        let (old, saved) = if lead {
            checkpoint::open::<AeConfig, ImageInfo>(dir, resume, "ae train")?
        } else {
            (None, None)
        };
        if let Some(old) = &old {
            cfg.check_resumable(old)?;
        }
        let prior_dir = Path::new(&cfg.prior);
        let (prior, meta) = load_prior(prior_dir, device)?;
        if meta.dim != cfg.model.latent_dim {
            return Err(Error::Config(format!(
                "the prior in {} models {}-dim vectors but the autoencoder's latent tokens have {} (model.latent_dim); \
                 train the prior with --latent-dim {} or pass --latent-dim {}",
                cfg.prior, meta.dim, cfg.model.latent_dim, cfg.model.latent_dim, meta.dim
            )));
        }
        let folder = ImageFolder::scan(Path::new(&cfg.data))?;
        let info = ImageInfo {
            images: folder.len(),
            classes: folder.classes.len(),
        };
        if let Some((m, _)) = &saved
            && m.data != info
        {
            return Err(Error::Config(format!(
                "--resume: {} now holds {} images in {} classes but the checkpoint trained on {} in {}; pass the same --data",
                cfg.data, info.images, info.classes, m.data.images, m.data.classes
            )));
        }
        let fixed_n = cfg.train.monitor_images.max(8).min(folder.len());
        let centre = ImageLoader::new(
            folder.clone(),
            cfg.model.image_size,
            cfg.train.seed,
            Crop::Centre,
        )
        .with_small_images(cfg.train.small_images);
        // Spread over the sorted folder, so every class shows.
        let spread: Vec<usize> = (0..fixed_n).map(|i| i * folder.len() / fixed_n).collect();
        let fixed = centre.gather(&spread, 0)?;
        let reference = if lead {
            target_rows(prior_dir, device)
        } else {
            None
        };
        if lead {
            checkpoint::write_config(dir, &cfg)?;
        }
        let mut trainer = new_trainer(&cfg, device)?;
        let (mut adversary, dino) = match cfg.loss.adv.enabled() {
            true => {
                let (a, trunk) = Adversary::new(&cfg, device)?;
                (Some(a), Some(trunk))
            }
            false => {
                if let Some(file) = &cfg.disc_init {
                    tracing::warn!(
                        "{file} is not used: the adversarial term is off (pass --adv-weight to turn it on)"
                    );
                }
                (None, None)
            }
        };
        let resumed_from = match saved {
            Some((manifest, state)) => {
                trainer.restore(&state)?;
                if let Some(adv) = &mut adversary {
                    let part = checkpoint::load_part(dir, &manifest, adversarial::PART)?;
                    let (Some(part), Some(real), Some(fake)) = (
                        part,
                        manifest.values.get(adversarial::LECAM_REAL),
                        manifest.values.get(adversarial::LECAM_FAKE),
                    ) else {
                        return Err(Error::Checkpoint {
                            path: dir.join(checkpoint::MANIFEST),
                            msg: "holds no discriminator state although loss.adv is on; resume with the config the run was started with, or start a new --out".into(),
                        });
                    };
                    adv.trainer.restore(&part)?;
                    adv.lecam = adversarial::LecamEma {
                        real: *real,
                        fake: *fake,
                    };
                }
                state.step
            }
            None => 0,
        };
        let lpips = match (&cfg.lpips_weights, cfg.loss.lpips > 0.0) {
            (Some(file), true) => Some(Lpips::load(Path::new(file), device)?),
            (None, true) => {
                tracing::info!(
                    "LPIPS is off: pass --lpips-weights FILE (the lpips package's VGG weights as safetensors) to add it"
                );
                None
            }
            _ => None,
        };
        let loader = ImageLoader::new(folder, cfg.model.image_size, cfg.train.seed, Crop::Train)
            .with_small_images(cfg.train.small_images);
        Ok(AeRun {
            cfg,
            dir: dir.to_path_buf(),
            loader: Arc::new(loader),
            replicas: vec![Frozen {
                device: device.clone(),
                prior,
                lpips,
                dino,
            }],
            trainer,
            adversary,
            device: device.clone(),
            fixed,
            reference,
            resumed_from,
            comm: None,
        })
    }

    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.trainer.step
    }

    /// Images in the training folder.
    pub fn images(&self) -> usize {
        self.loader.folder.len()
    }

    /// The weights used for evaluation (EMA when kept), without autodiff.
    pub fn frozen(&self) -> Autoencoder {
        self.trainer.frozen()
    }

    /// The discriminator's trainer, when the adversarial term is on.
    pub fn discriminator(&self) -> Option<&Trainer<Discriminator>> {
        self.adversary.as_ref().map(|a| &a.trainer)
    }

    /// One training step on `batch`: the autoencoder on `l2 * MSE + lpips * LPIPS + lambda *
    /// L_align (+ adv.weight * the generator's hinge)`, then, once the adversarial term has
    /// started, the discriminator on the same step's reconstructions.
    pub fn train_step(&mut self, batch: &ImageBatch) -> Result<AeStepStats> {
        let step = self.trainer.step;
        let seed = self.cfg.train.seed;
        let adv_cfg = &self.cfg.loss.adv;
        let mut rng = rng_for(seed, Stream::Align, step as u64);
        let active = self.adversary.as_ref().filter(|_| adv_cfg.active(step));
        // The draws of the whole global batch: a rank of a multi-process run uses its share.
        let draws = active
            .map(|_| AdvDraws::for_step(seed, step, batch.total, batch.size, adv_cfg.diffaug_p));
        let heads = active.map(Adversary::frozen);
        let gen_adv = heads
            .as_ref()
            .zip(draws.as_ref())
            .map(|(disc, d)| GenAdv { disc, aug: &d.aug });
        let (mut stats, fakes) = ae_step(
            &mut self.trainer,
            &self.replicas,
            batch,
            &self.cfg.loss,
            gen_adv,
            &mut rng,
        )?;
        if let Some(comm) = &self.comm {
            // Each rank measured its share; the log shows the global batch's means.
            let n = comm.rank().size as f64;
            let terms = [
                Some(stats.l2),
                Some(stats.l_align),
                stats.lpips,
                stats.g_adv,
            ];
            let sums = comm.sum_f64(
                terms.iter().map(|t| f64::from(t.unwrap_or(0.0))).collect(),
                step,
                "loss terms",
            )?;
            let mean = |i: usize| (sums[i] / n) as f32;
            (stats.l2, stats.l_align) = (mean(0), mean(1));
            stats.lpips = stats.lpips.map(|_| mean(2));
            stats.g_adv = stats.g_adv.map(|_| mean(3));
        }
        if let (Some(draws), Some(adv)) = (&draws, &mut self.adversary) {
            debug_assert_eq!(
                adv.trainer.step, step,
                "the discriminator keeps the run's step"
            );
            stats.disc = Some(disc_step(
                &mut adv.trainer,
                &self.replicas,
                batch,
                &fakes,
                draws,
                adv_cfg,
                &mut adv.lecam,
            )?);
        }
        Ok(stats)
    }

    /// Trains data-parallel over `devices` (the first must be the run's device): the batch is
    /// split between them, and the result does not depend on their number.
    pub fn with_replicas(mut self, devices: &[Device]) -> Self {
        if devices.len() > 1 {
            self.replicas = self.replicas[0].replicate(devices);
        }
        self
    }

    /// L_align (mc draws, fixed seed) and mean log r_k of the fixed images' latent tokens.
    pub fn monitor(&self) -> (f32, Option<f32>) {
        let model = self.frozen();
        let n = self.cfg.train.monitor_images.min(self.fixed.len());
        let s = self.fixed.size;
        let x = Tensor::<4>::from_data(
            TensorData::new(self.fixed.pixels[..n * 3 * s * s].to_vec(), [n, 3, s, s]),
            &self.device,
        );
        let z = model.encode(x);
        let [b, k, dz] = z.dims();
        let tokens = z.reshape([b * k, dz]);
        let mut rng = rng_for(self.cfg.train.seed, Stream::Eval, 0);
        let la = align_loss(
            &self.replicas[0].prior,
            tokens.clone(),
            self.cfg.loss.mc,
            Reduction::Mean,
            &mut rng,
        )
        .into_scalar::<f32>();
        let log_rk = self.reference.as_ref().map(|(rows, d)| {
            let q: Vec<f32> = tokens.try_into_vec_as::<f32>().expect("f32 readback");
            let r = knn_log_r(&q, rows, *d, 5.min(rows.len() / d), &self.device);
            r.iter().sum::<f32>() / r.len() as f32
        });
        (la, log_rk)
    }

    /// Writes `recon.png`: 8 fixed images over their reconstructions by the frozen weights.
    pub fn recon_grid(&self) -> Result<()> {
        let n = 8.min(self.fixed.len());
        let s = self.fixed.size;
        let x = Tensor::<4>::from_data(
            TensorData::new(self.fixed.pixels[..n * 3 * s * s].to_vec(), [n, 3, s, s]),
            &self.device,
        );
        let model = self.frozen();
        let rec: Vec<f32> = model
            .decode(model.encode(x))
            .try_into_vec_as::<f32>()
            .expect("f32 readback");
        super::eval::write_grid(
            &self.dir.join("recon.png"),
            &self.fixed.pixels[..n * 3 * s * s],
            &rec,
            s,
        )
    }

    /// Writes `alignment.png` (paper Fig. 4): the monitor's L_align and log r_k over steps, from
    /// `metrics.jsonl`.
    pub fn alignment_plot(&self) -> Result<()> {
        let text = std::fs::read_to_string(self.dir.join("metrics.jsonl")).unwrap_or_default();
        let (mut la, mut rk) = (Vec::new(), Vec::new());
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let step = v["step"].as_f64().unwrap_or(0.0).max(1.0);
            if let Some(a) = v["monitor_l_align"].as_f64() {
                la.push((step, a as f32));
            }
            if let Some(r) = v["monitor_log_rk"].as_f64() {
                rk.push((step, r as f32));
            }
        }
        crate::report::save_png(&self.dir.join("alignment.png"), (900, 500), |root| {
            crate::report::twin_curves_panel(
                root,
                "alignment of the latent tokens (paper Fig. 4)",
                ("L_align", "L_align (monitor)", &la),
                ("mean log r_5", "log r_5 to target features", &rk),
            )
        })
    }

    /// Writes a checkpoint (weights, EMA, optimiser, step; the discriminator's weights,
    /// optimiser and LeCAM means when the adversarial term is on); on ranks other than 0 it only
    /// checks that this rank's weights equal rank 0's.
    pub fn checkpoint(&self) -> Result<()> {
        if let Some(comm) = &self.comm {
            let mut sum = dist::weights_checksum(self.trainer.model());
            if let Some(adv) = &self.adversary {
                sum = sum.rotate_left(1) ^ dist::weights_checksum(adv.trainer.model());
            }
            comm.verify_same(sum, self.trainer.step)?;
            if !comm.leads() {
                return Ok(());
            }
        }
        let info = ImageInfo {
            images: self.loader.folder.len(),
            classes: self.loader.folder.classes.len(),
        };
        let state = self.trainer.state_bytes()?;
        match &self.adversary {
            Some(adv) => checkpoint::save_with(
                &self.dir,
                &info,
                &state,
                &[(adversarial::PART, &adv.trainer.state_bytes()?)],
                &[
                    (adversarial::LECAM_REAL, adv.lecam.real),
                    (adversarial::LECAM_FAKE, adv.lecam.fake),
                ],
            ),
            None => checkpoint::save(&self.dir, &info, &state),
        }
    }

    /// Trains to `train.steps` with batches decoded ahead on a background thread. `stop` is
    /// polled every step: when it turns true a checkpoint is written and the run returns early.
    pub fn run(
        &mut self,
        stop: impl Fn() -> bool,
        mut on_log: impl FnMut(&AeMetrics),
    ) -> Result<AeSummary> {
        let t = self.cfg.train.clone();
        let lead = self.leads();
        let log = lead
            .then(|| MetricsLog::open(&self.dir, self.trainer.step, &METRICS))
            .transpose()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<ImageBatch>>(2);
        let loader = Arc::clone(&self.loader);
        let (from, to, batch) = (self.trainer.step, t.steps, t.batch);
        let part = match &self.comm {
            Some(c) => dist::part(batch, c.rank().rank, c.rank().size),
            None => 0..batch,
        };
        let producer = std::thread::spawn(move || {
            for s in from..to {
                if tx
                    .send(loader.batch_part(s as u64, batch, part.clone()))
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut sums = (0.0f64, 0.0f64, 0.0f64, 0usize);
        let mut lpips_sum: Option<f64> = None;
        let mut adv_sums = AdvSums::default();
        let mut window = Instant::now();
        let mut interrupted = false;
        let mut monitor = None;
        let result = (|| -> Result<()> {
            if let (0, Some(log)) = (self.trainer.step, &log) {
                // Where the latents start, for the alignment curve.
                let (la, rk) = self.monitor();
                log.append(&AeMetrics {
                    step: 0,
                    loss: f32::NAN,
                    l2: f32::NAN,
                    psnr: f32::NAN,
                    l_align: f32::NAN,
                    lpips: None,
                    adv: AdvMetrics::default(),
                    lr: 0.0,
                    grad_norm: None,
                    images_per_s: 0.0,
                    monitor_l_align: Some(la),
                    monitor_log_rk: rk,
                    skipped_images: 0,
                })?;
            }
            while self.trainer.step < t.steps {
                let batch = rx
                    .recv()
                    .map_err(|_| Error::Config("the image loader stopped unexpectedly".into()))??;
                let images = self.cfg.train.batch;
                let stats = crate::train::oom_guard(&format!("batch {images}"), images, || {
                    self.train_step(&batch)
                })?;
                sums.0 += f64::from(stats.step.loss);
                sums.1 += f64::from(stats.l2);
                sums.2 += f64::from(stats.l_align);
                sums.3 += 1;
                if let Some(p) = stats.lpips {
                    *lpips_sum.get_or_insert(0.0) += f64::from(p);
                }
                if let (Some(g), Some(d)) = (stats.g_adv, &stats.disc) {
                    adv_sums.add(g, d);
                }
                let step = self.trainer.step;
                let ckpt = step.is_multiple_of(t.checkpoint_every) || step == t.steps;
                interrupted = stop();
                if let Some(comm) = &self.comm {
                    // Every rank stops at the same step, whichever saw the request.
                    interrupted = comm.any(interrupted, step)?;
                }
                let mon = step.is_multiple_of(t.monitor_every) || step == t.steps;
                if lead && (step.is_multiple_of(t.recon_every) || step == t.steps) {
                    self.recon_grid()?;
                }
                if lead && mon {
                    monitor = Some(self.monitor());
                }
                if ckpt || interrupted {
                    self.checkpoint()?;
                }
                if step.is_multiple_of(t.log_every) || ckpt || mon || interrupted {
                    let n = sums.3 as f64;
                    let m = AeMetrics {
                        step,
                        loss: (sums.0 / n) as f32,
                        l2: (sums.1 / n) as f32,
                        psnr: psnr(sums.1 / n) as f32,
                        l_align: (sums.2 / n) as f32,
                        lpips: lpips_sum.map(|p| (p / n) as f32),
                        adv: adv_sums.means(),
                        lr: stats.step.lr,
                        grad_norm: stats.step.grad_norm,
                        images_per_s: (sums.3 * t.batch) as f64 / window.elapsed().as_secs_f64(),
                        monitor_l_align: mon.then(|| monitor.map(|m| m.0)).flatten(),
                        monitor_log_rk: mon.then(|| monitor.and_then(|m| m.1)).flatten(),
                        skipped_images: self.loader.skipped(),
                    };
                    if let Some(log) = &log {
                        log.append(&m)?;
                        if mon {
                            self.alignment_plot()?;
                        }
                    }
                    on_log(&m);
                    sums = (0.0, 0.0, 0.0, 0);
                    lpips_sum = None;
                    adv_sums = AdvSums::default();
                    window = Instant::now();
                }
                if interrupted {
                    break;
                }
            }
            Ok(())
        })();
        drop(rx);
        let _ = producer.join();
        result?;
        let skipped = self.loader.skipped();
        if skipped > 0 {
            tracing::warn!(
                "{skipped} image reads were skipped (unreadable files; each named once above)"
            );
        }
        Ok(AeSummary {
            resumed_from: self.resumed_from,
            step: self.trainer.step,
            interrupted,
            monitor,
        })
    }
}

/// The training rows of the prior run in `prior_dir` (scaled, projected), for log r_k; `None`
/// with a warning when its feature table cannot be read.
fn target_rows(prior_dir: &Path, device: &Device) -> Option<(Vec<f32>, usize)> {
    let cfg: FeaturePriorConfig = checkpoint::read_config(prior_dir, "prior train").ok()?;
    match PriorData::prepare(&cfg.data, cfg.train.seed, device) {
        Ok(data) => {
            let d = data.dim();
            let n = data.train.rows.min(100_000);
            Some((data.train.data[..n * d].to_vec(), d))
        }
        Err(e) => {
            tracing::warn!("the alignment monitor reports L_align only: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ae::config::AePreset;
    use crate::flow::VelocityMlpConfig;
    use burn::optim::GradientsParams;

    /// Which of (encoder patch embedding, decoder output layer) receive a gradient from
    /// `l2 * MSE + lambda * L_align (+ LPIPS)`.
    fn reached(lambda: f64, l2: f64, lpips: Option<&Lpips>) -> (bool, bool) {
        let dev = Device::flex();
        let mut cfg = AeConfig::preset(AePreset::Small, "-", "-");
        cfg.model.image_size = 16;
        cfg.model.patch = 8;
        cfg.model.latent_tokens = 4;
        cfg.model.latent_dim = 3;
        let ad = dev.clone().autodiff();
        let model = cfg.model.init(&mut rng_for(0, Stream::Init, 0), &ad);
        let mut rng = rng_for(1, Stream::Init, 0);
        // A frozen prior (plain tensors, no autodiff); at init its velocity is 0, so L_align is
        // E ||y - eps||^2 and still depends on the latents.
        let prior = VelocityMlpConfig::new(3, 16, 1).init(&mut rng, &dev);
        let x = Tensor::<4>::ones([2, 3, 16, 16], &ad) * 0.5;
        let z = model.encode(x.clone());
        let rec = model.decode(z.clone());
        let rec_for_lpips = rec.clone();
        let diff = rec - x;
        let la = align_loss(&prior, z.reshape([8, 3]), 2, Reduction::Mean, &mut rng);
        let mut loss = (diff.clone() * diff).mean() * l2 + la * lambda;
        if let Some(p) = lpips {
            loss = loss
                + p.distance(
                    rec_for_lpips.clone(),
                    Tensor::<4>::ones([2, 3, 16, 16], &ad) * 0.5,
                )
                .mean();
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = |id| {
            grads
                .get::<2>(id)
                .map(|g| g.abs().sum().into_scalar::<f32>())
                .unwrap_or(0.0)
        };
        (
            norm(model.encoder.patch_embed.weight.id) > 0.0,
            norm(model.decoder.to_pixels.weight.id) > 0.0,
        )
    }

    #[test]
    fn a_bf16_step_matches_the_f32_step_and_keeps_the_state_f32() {
        let dev = Device::flex();
        let mut cfg = AeConfig::preset(AePreset::Small, "-", "-");
        cfg.model.image_size = 16;
        cfg.model.patch = 8;
        cfg.model.latent_tokens = 4;
        cfg.model.latent_dim = 3;
        cfg.loss.lambda = 0.5;
        let prior = VelocityMlpConfig::new(3, 16, 1).init(&mut rng_for(1, Stream::Init, 0), &dev);
        let frozen = Frozen {
            device: dev.clone(),
            prior,
            lpips: None,
            dino: None,
        };
        let b = 4;
        let batch = ImageBatch {
            pixels: (0..b * 3 * 16 * 16)
                .map(|i| ((i as f32) * 0.05).sin())
                .collect(),
            labels: vec![0; b],
            size: 16,
            first: 0,
            total: b,
        };
        let run = |precision: Precision| {
            let mut cfg = cfg.clone();
            cfg.train.precision = precision;
            let mut trainer = new_trainer(&cfg, &dev).unwrap();
            assert_eq!(trainer.precision(), precision);
            let before = crate::train::param_values(trainer.model());
            let mut rng = rng_for(2, Stream::Init, 0);
            let (stats, recs) = ae_step(
                &mut trainer,
                std::slice::from_ref(&frozen),
                &batch,
                &cfg.loss,
                None,
                &mut rng,
            )
            .unwrap();
            assert_eq!(recs[0].dtype(), burn::tensor::DType::F32);
            let after = crate::train::param_values(trainer.model());
            let update: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            (stats, update, trainer.state_bytes().unwrap())
        };
        let (s32, u32_, _) = run(Precision::F32);
        let (s16, u16_, state) = run(Precision::Bf16);
        assert!(
            (s16.l2 - s32.l2).abs() < 1e-2 * s32.l2,
            "{} vs {}",
            s16.l2,
            s32.l2
        );
        assert!(
            (s16.l_align - s32.l_align).abs() < 1e-2 * s32.l_align,
            "{} vs {}",
            s16.l_align,
            s32.l_align
        );
        // AdamW's first step moves each weight by about lr * sign(gradient): compare directions.
        let dot: f32 = u16_.iter().zip(&u32_).map(|(a, b)| a * b).sum();
        let norm = |u: &[f32]| u.iter().map(|v| v * v).sum::<f32>().sqrt();
        let cosine = dot / (norm(&u16_) * norm(&u32_));
        assert!(cosine > 0.95, "update cosine {cosine}");
        for bytes in [Some(&state.model), state.ema.as_ref(), Some(&state.optim)]
            .into_iter()
            .flatten()
        {
            let bytes = burn::tensor::Bytes::from_bytes_vec(bytes.clone());
            let reader = burn::store::burn_pack::Reader::from_bytes(bytes).unwrap();
            for t in reader.into_tensors().unwrap() {
                let (name, dtype, _, _, _) = t.into_parts().unwrap();
                assert_eq!(dtype, burn::tensor::DType::F32, "{name}");
            }
        }
    }

    #[test]
    fn each_loss_reaches_the_right_parameters() {
        // L_align depends on the encoder only; the prior is frozen (plain tensors, no gradient).
        assert_eq!(reached(1.0, 0.0, None), (true, false));
        // Reconstruction trains both halves, by L2 and by LPIPS (its VGG is frozen).
        assert_eq!(reached(0.0, 1.0, None), (true, true));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lpips.safetensors");
        crate::ae::lpips::tests::write_lpips(&file);
        let lpips = Lpips::load(&file, &Device::flex()).unwrap();
        assert_eq!(reached(0.0, 0.0, Some(&lpips)), (true, true));
    }
}
