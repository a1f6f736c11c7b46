//! Training the autoencoder with the alignment loss (METHOD.md section 6, stage 2): reconstruction
//! plus `lambda * L_align` of every latent token under the frozen prior (plus LPIPS and the
//! adversarial term of [`crate::ae::adversarial`]), run by the shared harness ([`crate::run`]) with
//! the alignment monitor of paper Fig. 4 and reconstruction grids.

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use serde::Serialize;

use super::adversarial::{self, AdvDraws, Adversary, AugDraws, DiscStats, disc_step};
use super::config::{AeConfig, AeLossConfig};
use super::data::{Crop, ImageBatch, ImageFolder, ImageInfo, ImageLoader};
use super::discriminator::Discriminator;
use super::loss::{Frozen, LecamEma, generator_hinge, psnr};
use super::lpips::Lpips;
use super::model::Autoencoder;
use crate::align::{Reduction, align_loss, align_loss_with};
use crate::checkpoint;
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::flow::FrozenPrior;
use crate::flow::store::load_prior;
use crate::precision::Precision;
use crate::prior::FeaturePriorConfig;
use crate::prior::data::PriorData;
use crate::prior::eval::{knn_log_r, reference_rows};
use crate::report::write_image_grid;
use crate::rng::{Stream, rng_for};
use crate::run::{self, Context, Job};
use crate::train::{StepStats, Trainer};

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

/// How a run ended: the harness's summary and the last monitor values (L_align, log r_k).
#[derive(Debug, Clone, PartialEq)]
pub struct AeSummary {
    pub run: run::Summary,
    pub monitor: Option<(f32, Option<f32>)>,
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
    // LPIPS ramps up linearly over its warm-up (METHOD.md section 6).
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
            let rows = (first + a) * k..(first + e) * k;
            // With lambda 0 the term is measured off the graph.
            let la = if lambda > 0.0 {
                align_loss_with(
                    &fr.prior,
                    tokens,
                    loss_cfg.mc,
                    &draws.shard(rows, &ad),
                    Reduction::Mean,
                )
            } else {
                let draws = draws.shard(rows, &fr.device);
                align_loss_with(
                    &fr.prior,
                    tokens.inner(),
                    loss_cfg.mc,
                    &draws,
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
                let g_adv =
                    generator_hinge(disc.logits(trunk, g.aug.apply(fake, first + a..first + e)));
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
    let mut rng = rng_for(cfg.train.run.seed, Stream::Init, 0);
    let mut model = cfg.model.init(&mut rng, &ad);
    if let Some(file) = &cfg.encoder_init {
        let (path, _) = crate::hub::resolve(file)?;
        let (encoder, report) = super::dinov2::init_encoder(model.encoder, &path, &ad)?;
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
    Ok(cfg.train.run.trainer(model))
}

/// An autoencoder run: images, frozen prior, trainer and folder.
pub struct AeRun {
    cfg: AeConfig,
    ctx: Context,
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
    /// Batches decoded ahead of the step on their own thread (started at the first step).
    prefetch: Option<Prefetch>,
    /// Sums since the last metrics line, and the last monitor values.
    sums: LineSums,
    monitor: Option<(f32, Option<f32>)>,
    monitored_at: Option<usize>,
}

/// What a metrics line averages over the steps since the previous one.
#[derive(Debug, Clone, Default)]
struct LineSums {
    loss: f64,
    l2: f64,
    l_align: f64,
    lpips: Option<f64>,
    adv: AdvSums,
    steps: usize,
    last: Option<StepStats>,
}

/// Image batches decoded on a producer thread, two steps ahead.
struct Prefetch {
    rx: Option<std::sync::mpsc::Receiver<Result<ImageBatch>>>,
    producer: Option<std::thread::JoinHandle<()>>,
}

impl Prefetch {
    /// Batches of steps `from..to` (rows `part` of each global batch of `batch`).
    fn start(
        loader: Arc<ImageLoader>,
        from: usize,
        to: usize,
        batch: usize,
        part: std::ops::Range<usize>,
    ) -> Prefetch {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<ImageBatch>>(2);
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
        Prefetch {
            rx: Some(rx),
            producer: Some(producer),
        }
    }

    fn next(&self) -> Result<ImageBatch> {
        self.rx
            .as_ref()
            .and_then(|rx| rx.recv().ok())
            .ok_or(Error::Stopped("image loader"))?
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Closing the channel ends the producer at its next batch.
        self.rx = None;
        if let Some(p) = self.producer.take() {
            let _ = p.join();
        }
    }
}

impl AeRun {
    /// Opens a new run in `dir`, or continues its checkpoint when `resume` is set; with `comm`,
    /// one rank of a multi-process run (rank 0 alone reads and writes `dir`; every rank starts
    /// from its state, the discriminator's and LeCAM's included).
    pub fn open(
        cfg: AeConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        comm: Option<Arc<Comm>>,
    ) -> Result<AeRun> {
        cfg.validate()?;
        if let Some(c) = &comm {
            dist::check_batch(cfg.train.run.batch, c.rank().size, "images")?;
        }
        let lead = comm.as_ref().is_none_or(|c| c.leads());
        let opened = run::open::<_, ImageInfo>(&cfg, dir, resume, lead)?;
        let seed = cfg.train.run.seed;
        let prior_dir = Path::new(&cfg.prior);
        let (prior, meta) = load_prior(prior_dir, device)?;
        if meta.dim != cfg.model.latent_dim {
            return Err(Error::setting(
                "model.latent_dim",
                format!(
                    "is {} but the prior in {} models {}-dim vectors; train the prior at latent dim {} or set the autoencoder's to {}",
                    cfg.model.latent_dim, cfg.prior, meta.dim, cfg.model.latent_dim, meta.dim
                ),
            ));
        }
        let folder = ImageFolder::scan(Path::new(&cfg.data))?;
        let info = ImageInfo {
            images: folder.len(),
            classes: folder.classes.len(),
        };
        if let Some((m, _)) = &opened.saved
            && m.data != info
        {
            return Err(Error::input_fixed_by(
                &cfg.data,
                format!(
                    "resuming: the folder now holds {} images in {} classes but the checkpoint trained on {} in {}; give the same images (data)",
                    info.images, info.classes, m.data.images, m.data.classes
                ),
                "data",
            ));
        }
        let fixed_n = cfg.train.monitor_images.max(8).min(folder.len());
        let centre = ImageLoader::new(folder.clone(), cfg.model.image_size, seed, Crop::Centre)
            .with_small_images(cfg.train.small_images);
        let spread: Vec<usize> = (0..fixed_n).map(|i| i * folder.len() / fixed_n).collect();
        let fixed = centre.gather(&spread, 0)?;
        let reference = if lead {
            target_rows(prior_dir, device)
        } else {
            None
        };
        run::write_config(dir, &cfg, lead)?;
        let mut trainer = new_trainer(&cfg, device)?;
        let (mut adversary, dino) = match cfg.loss.adv.enabled() {
            true => {
                let (a, trunk) = Adversary::new(&cfg, device)?;
                (Some(a), Some(trunk))
            }
            false => {
                if let Some(file) = &cfg.disc_init {
                    tracing::warn!(
                        "{file} is not used: the adversarial term is off (loss.adv.weight is 0)"
                    );
                }
                (None, None)
            }
        };
        if let Some((manifest, state)) = &opened.saved {
            trainer.restore(state)?;
            if let Some(adv) = &mut adversary {
                let part = checkpoint::load_part(dir, manifest, adversarial::PART)?;
                let (Some(part), Some(real), Some(fake)) = (
                    part,
                    manifest.values.get(adversarial::LECAM_REAL),
                    manifest.values.get(adversarial::LECAM_FAKE),
                ) else {
                    return Err(Error::Checkpoint {
                        path: dir.join(checkpoint::MANIFEST),
                        msg: "holds no discriminator state although loss.adv is on; resume with the config the run was started with, or start a new run".into(),
                    });
                };
                adv.trainer.restore(&part)?;
                adv.lecam = LecamEma {
                    real: *real,
                    fake: *fake,
                };
            }
        }
        let (trainer, _) = run::adopt(trainer, comm.as_ref())?;
        if let Some(c) = &comm {
            adversary = adversary.map(|a| a.adopt(c)).transpose()?;
        }
        let lpips = match (&cfg.lpips_weights, cfg.loss.lpips > 0.0) {
            (Some(file), true) => Some(Lpips::load(&crate::hub::resolve(file)?.0, device)?),
            (None, true) => {
                tracing::info!(
                    "LPIPS is off: set lpips_weights to the lpips package's VGG weights as safetensors to add it"
                );
                None
            }
            _ => None,
        };
        let loader = ImageLoader::new(folder, cfg.model.image_size, seed, Crop::Train)
            .with_small_images(cfg.train.small_images);
        Ok(AeRun {
            cfg,
            ctx: Context {
                dir: dir.to_path_buf(),
                comm,
                columns: &METRICS,
            },
            loader: Arc::new(loader),
            replicas: vec![Frozen {
                device: device.clone(),
                prior: FrozenPrior::new(prior),
                lpips,
                dino,
            }],
            trainer,
            adversary,
            device: device.clone(),
            fixed,
            reference,
            prefetch: None,
            sums: LineSums::default(),
            monitor: None,
            monitored_at: None,
        })
    }

    /// Whether this process writes the run folder (rank 0, or the only process).
    pub fn leads(&self) -> bool {
        self.ctx.leads()
    }

    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.trainer.step
    }

    /// Images in the training folder.
    pub fn images(&self) -> usize {
        self.loader.folder.len()
    }

    /// The autoencoder to evaluate and encode with (EMA weights when kept).
    pub fn frozen(&self) -> Autoencoder {
        self.trainer.frozen()
    }

    /// The discriminator's trainer, when the adversarial term is on.
    pub fn discriminator(&self) -> Option<&Trainer<Discriminator>> {
        self.adversary.as_ref().map(|a| &a.trainer)
    }

    /// One step on `batch`: the autoencoder's, then (when the adversarial term is active) the
    /// discriminator's on the same images and the step's reconstructions.
    pub fn train_step(&mut self, batch: &ImageBatch) -> Result<AeStepStats> {
        let step = self.trainer.step;
        let seed = self.cfg.train.run.seed;
        let adv_cfg = &self.cfg.loss.adv;
        let mut rng = rng_for(seed, Stream::Align, step as u64);
        let active = self.adversary.as_ref().filter(|_| adv_cfg.active(step));
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
        if let Some(comm) = &self.ctx.comm {
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

    /// Trains data-parallel over `devices` (the frozen networks replicated on each).
    pub fn with_replicas(mut self, devices: &[Device]) -> Self {
        if devices.len() > 1 {
            self.replicas = self.replicas[0].replicate(devices);
        }
        self
    }

    /// The alignment monitor of paper Fig. 4 on the fixed images' latent tokens: L_align under the
    /// frozen prior, and the mean log r_5 among the prior's target rows (when they can be read).
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
        let mut rng = rng_for(self.cfg.train.run.seed, Stream::Eval, 0);
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

    /// Writes `recon.png`: 8 fixed images over their reconstructions.
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
        write_image_grid(
            &self.ctx.dir.join("recon.png"),
            &self.fixed.pixels[..n * 3 * s * s],
            &rec,
            s,
        )
    }

    /// Redraws `alignment.png` (the monitor's curves) from the metrics log.
    pub fn alignment_plot(&self) -> Result<()> {
        let text = std::fs::read_to_string(self.ctx.dir.join("metrics.jsonl")).unwrap_or_default();
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
        crate::report::save_png(&self.ctx.dir.join("alignment.png"), (900, 500), |root| {
            crate::report::twin_curves_panel(
                root,
                "alignment of the latent tokens (paper Fig. 4)",
                ("L_align", "L_align (monitor)", &la),
                ("mean log r_5", "log r_5 to target features", &rk),
            )
        })
    }

    /// Trains to `train.steps` through the harness (see [`run::train`]): `stop` is polled every
    /// step, `on_log` sees every metrics line.
    pub fn run(
        &mut self,
        stop: impl Fn() -> bool,
        on_log: impl FnMut(&AeMetrics),
    ) -> Result<AeSummary> {
        let (settings, ctx) = (self.cfg.train.run.clone(), self.ctx.clone());
        let result = run::train(self, &settings, &ctx, stop, on_log);
        // Stop the loader before reporting.
        self.prefetch = None;
        let summary = result?;
        let skipped = self.loader.skipped();
        if skipped > 0 {
            tracing::warn!(
                "{skipped} image reads were skipped (unreadable files; each named once above)"
            );
        }
        Ok(AeSummary {
            run: summary,
            monitor: self.monitor,
        })
    }
}

impl Job for AeRun {
    type Line = AeMetrics;

    fn step(&self) -> usize {
        self.trainer.step
    }

    fn step_size(&self) -> String {
        format!("batch {}", self.cfg.train.run.batch)
    }

    fn train_step(&mut self) -> Result<()> {
        if self.prefetch.is_none() {
            let batch = self.cfg.train.run.batch;
            let part = match &self.ctx.comm {
                Some(c) => dist::part(batch, c.rank().rank, c.rank().size),
                None => 0..batch,
            };
            self.prefetch = Some(Prefetch::start(
                Arc::clone(&self.loader),
                self.trainer.step,
                self.cfg.train.run.steps,
                batch,
                part,
            ));
        }
        let batch = match &self.prefetch {
            Some(p) => p.next()?,
            None => return Err(Error::Stopped("image loader")),
        };
        let stats = AeRun::train_step(self, &batch)?;
        let s = &mut self.sums;
        s.loss += f64::from(stats.step.loss);
        s.l2 += f64::from(stats.l2);
        s.l_align += f64::from(stats.l_align);
        s.steps += 1;
        if let Some(p) = stats.lpips {
            *s.lpips.get_or_insert(0.0) += f64::from(p);
        }
        if let (Some(g), Some(d)) = (stats.g_adv, &stats.disc) {
            s.adv.add(g, d);
        }
        s.last = Some(stats.step);
        Ok(())
    }

    fn after_step(&mut self, step: usize, lead: bool) -> Result<()> {
        let t = &self.cfg.train;
        let end = step == t.run.steps;
        if lead && (step.is_multiple_of(t.recon_every) || end) {
            self.recon_grid()?;
        }
        if lead && (step.is_multiple_of(t.monitor_every) || end) {
            self.monitor = Some(self.monitor());
            self.monitored_at = Some(step);
        }
        Ok(())
    }

    fn log_now(&self, step: usize) -> bool {
        step.is_multiple_of(self.cfg.train.monitor_every) || step == self.cfg.train.run.steps
    }

    /// Saves the autoencoder, the discriminator and LeCAM's means (rank 0), or checks on the
    /// other ranks that their weights equal rank 0's.
    fn checkpoint(&mut self) -> Result<()> {
        if let Some(comm) = &self.ctx.comm {
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
                &self.ctx.dir,
                &info,
                &state,
                &[(adversarial::PART, &adv.trainer.state_bytes()?)],
                &[
                    (adversarial::LECAM_REAL, adv.lecam.real),
                    (adversarial::LECAM_FAKE, adv.lecam.fake),
                ],
            ),
            None => checkpoint::save(&self.ctx.dir, &info, &state),
        }
    }

    fn line(&mut self, step: usize, secs: f64, _checkpointed: bool) -> Result<AeMetrics> {
        let s = std::mem::take(&mut self.sums);
        let last = s.last.ok_or(Error::Stopped("autoencoder step"))?;
        let n = s.steps.max(1) as f64;
        let mon = self.monitored_at == Some(step);
        Ok(AeMetrics {
            step,
            loss: (s.loss / n) as f32,
            l2: (s.l2 / n) as f32,
            psnr: psnr(s.l2 / n) as f32,
            l_align: (s.l_align / n) as f32,
            lpips: s.lpips.map(|p| (p / n) as f32),
            adv: s.adv.means(),
            lr: last.lr,
            grad_norm: last.grad_norm,
            images_per_s: (s.steps * self.cfg.train.run.batch) as f64 / secs.max(1e-9),
            monitor_l_align: mon.then(|| self.monitor.map(|m| m.0)).flatten(),
            monitor_log_rk: mon.then(|| self.monitor.and_then(|m| m.1)).flatten(),
            skipped_images: self.loader.skipped(),
        })
    }

    /// The monitor of the initial weights, before the first step of a new run.
    fn first_line(&mut self) -> Result<Option<AeMetrics>> {
        if !self.leads() {
            return Ok(None);
        }
        let (la, rk) = self.monitor();
        Ok(Some(AeMetrics {
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
        }))
    }

    fn figures(&self) -> &'static [&'static str] {
        &["recon.png", "alignment.png"]
    }

    fn logged(&mut self, _dir: &Path, line: &AeMetrics) -> Result<()> {
        if line.monitor_l_align.is_some() {
            self.alignment_plot()?;
        }
        Ok(())
    }
}

fn target_rows(prior_dir: &Path, device: &Device) -> Option<(Vec<f32>, usize)> {
    let cfg: FeaturePriorConfig = checkpoint::read_config(prior_dir, "prior train").ok()?;
    match PriorData::prepare(&cfg.data, cfg.train.run.seed, device) {
        Ok(data) => Some((reference_rows(&data.train, 100_000, 0), data.dim())),
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
            prior: FrozenPrior::new(prior),
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
            cfg.train.run.precision = precision;
            let mut trainer = new_trainer(&cfg, &dev).unwrap();
            assert_eq!(trainer.precision(), precision);
            let before = crate::params::param_values(trainer.model());
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
            let after = crate::params::param_values(trainer.model());
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
