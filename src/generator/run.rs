//! Training a generator on an autoencoder's cached latents (METHOD.md section 7, stage 3): its
//! batches and step, sample grids, and the run folder, run by the shared harness ([`crate::run`]).

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::Generator;
use super::config::GenConfig;
use super::loss::{GenBatch, GenDraws, gen_loss};
use super::sample::generate;
use crate::ae::latents::LatentSet;
use crate::checkpoint;
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::rng::{Rng, Stream, rng_for};
use crate::run::{self, Context, Job};
use crate::train::{StepStats, Trainer};

/// The columns of `metrics.csv`.
const METRICS: [&str; 5] = ["step", "loss", "lr", "grad_norm", "latents_per_s"];

/// Latents sampled at each checkpoint into `samples.safetensors` (`ae decode` turns them into
/// PNGs): two of each of the first classes.
pub const GRID_SAMPLES: usize = 16;

/// What a generator checkpoint records about its latents, so a resume sees the same cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentInfo {
    pub latents: usize,
    pub classes: usize,
    pub tokens: usize,
    pub dim: usize,
}

/// One line of the metrics log.
#[derive(Debug, Clone, Serialize)]
pub struct GenMetrics {
    pub step: usize,
    /// Mean loss since the previous line.
    pub loss: f32,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    /// Training latents per second since the previous line.
    pub latents_per_s: f64,
}

/// The latents of a run on the host, scaled for training, with a batch sampler.
pub struct GenData {
    pub set: LatentSet,
    /// `tokens * dim`.
    per: usize,
}

impl GenData {
    /// The cache of `cfg.data.latents`, checked against the model the config describes.
    pub fn open(cfg: &GenConfig) -> Result<GenData> {
        let set = LatentSet::read(Path::new(&cfg.data.latents))?;
        let (tokens, dim, classes) = cfg.model_shape();
        if (set.stats.tokens, set.stats.dim) != (tokens, dim) {
            return Err(Error::input_fixed_by(
                &cfg.data.latents,
                format!(
                    "holds latents of {} x {} but the generator models {tokens} x {dim}; set the model's seq_len and token_dim to match",
                    set.stats.tokens, set.stats.dim
                ),
                "data.latents",
            ));
        }
        if set.num_classes() > classes {
            return Err(Error::setting(
                cfg.classes_key(),
                format!(
                    "is {classes} but the latents hold {} classes; raise it",
                    set.num_classes()
                ),
            ));
        }
        let per = tokens * dim;
        Ok(GenData { set, per })
    }

    /// What a checkpoint records of the cache.
    pub fn info(&self) -> LatentInfo {
        LatentInfo {
            latents: self.set.len(),
            classes: self.set.num_classes(),
            tokens: self.set.stats.tokens,
            dim: self.set.stats.dim,
        }
    }

    /// `batch` latents drawn uniformly with replacement, each the image's or (with probability
    /// 0.5, when the cache holds them) its mirror's, and their labels: raw latents, flat.
    pub fn batch(&self, batch: usize, rng: &mut Rng) -> (Vec<f32>, Vec<usize>) {
        let mut latents = Vec::with_capacity(batch * self.per);
        let mut labels = Vec::with_capacity(batch);
        for _ in 0..batch {
            let i = rng.random_range(0..self.set.len());
            let from = match &self.set.flipped {
                Some(f) if rng.random::<bool>() => f,
                _ => &self.set.latents,
            };
            latents.extend_from_slice(&from[i * self.per..(i + 1) * self.per]);
            labels.push(self.set.labels[i] as usize);
        }
        (latents, labels)
    }
}

/// A generator run: its latents, trainer and folder.
pub struct GenRun {
    cfg: GenConfig,
    ctx: Context,
    data: GenData,
    trainer: Trainer<Generator>,
    device: Device,
    loss_sum: f64,
    loss_n: usize,
    last: Option<StepStats>,
}

impl GenRun {
    /// Opens a new run in `dir`, or continues its checkpoint when `resume` is set; with `comm`,
    /// one rank of a multi-process run (rank 0 alone reads and writes `dir`; every rank starts
    /// from its state and trains on its share of each global batch).
    pub fn open(
        cfg: GenConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        comm: Option<Arc<Comm>>,
    ) -> Result<GenRun> {
        cfg.validate()?;
        if let Some(c) = &comm {
            dist::check_batch(cfg.train.run.batch, c.rank().size, "latents")?;
        }
        let lead = comm.as_ref().is_none_or(|c| c.leads());
        let opened = run::open::<_, LatentInfo>(&cfg, dir, resume, lead)?;
        let data = GenData::open(&cfg)?;
        if let Some((m, _)) = &opened.saved
            && m.data != data.info()
        {
            return Err(Error::input_fixed_by(
                &cfg.data.latents,
                format!(
                    "resuming: the cache now holds {:?} but the checkpoint trained on {:?}; give the same latents (data.latents)",
                    data.info(),
                    m.data
                ),
                "data.latents",
            ));
        }
        run::write_config(dir, &cfg, lead)?;
        let trainer = run::resume_trainer(new_trainer(&cfg, device), &opened, comm.as_ref())?;
        Ok(GenRun {
            cfg,
            ctx: Context {
                dir: dir.to_path_buf(),
                comm,
                columns: &METRICS,
            },
            data,
            trainer,
            device: device.clone(),
            loss_sum: 0.0,
            loss_n: 0,
            last: None,
        })
    }

    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.trainer.step
    }

    /// The run's latents.
    pub fn data(&self) -> &GenData {
        &self.data
    }

    /// Whether this process writes the run folder.
    pub fn leads(&self) -> bool {
        self.ctx.leads()
    }

    /// The generator to sample from (EMA weights when kept), without autodiff.
    pub fn frozen(&self) -> Generator {
        self.trainer.frozen()
    }

    /// One optimiser step: `batch` latents and the step's masks, label drops and (t, noise), all
    /// seeded by the step. A rank of a multi-process run trains on its slice of the global batch,
    /// with draws of its own (seeded by its rank): its gradient is averaged with the others'.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let t = &self.cfg.train;
        let step = self.trainer.step as u64;
        let mut rng = rng_for(t.run.seed, Stream::Data, step);
        let (raw, labels) = self.data.batch(t.run.batch, &mut rng);
        let (raw, labels) = match &self.ctx.comm {
            Some(c) => {
                let part = dist::part(t.run.batch, c.rank().rank, c.rank().size);
                let per = self.data.per;
                (
                    raw[part.start * per..part.end * per].to_vec(),
                    labels[part.clone()].to_vec(),
                )
            }
            None => (raw, labels),
        };
        let rank = self.ctx.comm.as_ref().map_or(0, |c| c.rank().rank as u64);
        let mut rng = rng_for(t.run.seed ^ rank.rotate_left(32), Stream::Mask, step);
        gen_step(
            &mut self.trainer,
            &self.cfg,
            raw,
            labels,
            &mut rng,
            &self.device,
        )
    }

    /// Samples [`GRID_SAMPLES`] latents of the first classes (two each) from the frozen
    /// generator, in the autoencoder's latent space, `[n, tokens, dim]` flat.
    pub fn grid_samples(&self) -> Result<Vec<f32>> {
        let classes = self.data.set.num_classes().max(1);
        let labels: Vec<Option<usize>> =
            (0..GRID_SAMPLES).map(|i| Some((i / 2) % classes)).collect();
        let mut rng = rng_for(self.cfg.train.run.seed, Stream::Sample, 0);
        let x = generate(
            &self.frozen(),
            &labels,
            &self.cfg.sample_options(),
            self.cfg.data.scale as f32,
            &mut rng,
        )?;
        Ok(x.try_into_vec_as::<f32>().expect("f32 readback"))
    }

    /// Trains to `train.steps` through the harness (see [`run::train`]); `stop` is polled every
    /// step, `on_log` sees every metrics line.
    pub fn run(
        &mut self,
        stop: impl Fn() -> bool,
        on_log: impl FnMut(&GenMetrics),
    ) -> Result<run::Summary> {
        let (settings, ctx) = (self.cfg.train.run.clone(), self.ctx.clone());
        run::train(self, &settings, &ctx, stop, on_log)
    }
}

impl Job for GenRun {
    type Line = GenMetrics;

    fn step(&self) -> usize {
        self.trainer.step
    }

    fn step_size(&self) -> String {
        format!("batch {}", self.cfg.train.run.batch)
    }

    fn train_step(&mut self) -> Result<()> {
        let stats = GenRun::train_step(self)?;
        self.loss_sum += f64::from(stats.loss);
        self.loss_n += 1;
        self.last = Some(stats);
        Ok(())
    }

    /// Saves the state and the grid samples (`samples.safetensors`) on rank 0; the other ranks
    /// check that their weights equal rank 0's.
    fn checkpoint(&mut self) -> Result<()> {
        if let Some(comm) = &self.ctx.comm {
            let sum = dist::weights_checksum(self.trainer.model());
            comm.verify_same(sum, self.trainer.step)?;
            if !comm.leads() {
                return Ok(());
            }
        }
        checkpoint::save(
            &self.ctx.dir,
            &self.data.info(),
            &self.trainer.state_bytes()?,
        )?;
        let (tokens, dim, _) = self.cfg.model_shape();
        let samples = self.grid_samples()?;
        write_latents(
            &self.ctx.dir.join("samples.safetensors"),
            &samples,
            tokens,
            dim,
        )
    }

    fn line(&mut self, step: usize, secs: f64, _checkpointed: bool) -> Result<GenMetrics> {
        let last = self.last.ok_or(Error::Stopped("generator step"))?;
        let m = GenMetrics {
            step,
            loss: (self.loss_sum / self.loss_n.max(1) as f64) as f32,
            lr: last.lr,
            grad_norm: last.grad_norm,
            latents_per_s: (self.loss_n * self.cfg.train.run.batch) as f64 / secs.max(1e-9),
        };
        (self.loss_sum, self.loss_n) = (0.0, 0);
        Ok(m)
    }
}

/// One optimiser step of a generator `trainer` on latents in the cache's own scale, with the masks,
/// label drops and (t, noise) drawn from `rng` (what [`GenRun::train_step`] and `bench gen` run).
///
/// # Shapes
/// - `raw`: `[labels.len(), tokens, dim]` flat
pub fn gen_step(
    trainer: &mut Trainer<Generator>,
    cfg: &GenConfig,
    raw: Vec<f32>,
    labels: Vec<usize>,
    rng: &mut Rng,
    device: &Device,
) -> Result<StepStats> {
    let ad = device.clone().autodiff();
    let (tokens, dim, _) = cfg.model_shape();
    let b = labels.len();
    let x = Tensor::<3>::from_data(TensorData::new(raw, [b, tokens, dim]), &ad);
    let batch = GenBatch::scaled(x, labels, cfg.data.scale as f32);
    let t = &cfg.train;
    let draws = GenDraws::sample(rng, trainer.model(), b, t.mask_ratio_min, &ad);
    let loss = gen_loss(&trainer.compute_model(), &batch, &draws, t.run.precision)?;
    trainer.step_loss(loss, "generator training")
}

/// A fresh trainer for `cfg` on `device`: the model initialised from the run seed, AdamW with
/// decay spared on 1-D parameters, biases and the flow head (METHOD.md section 7).
pub fn new_trainer(cfg: &GenConfig, device: &Device) -> Trainer<Generator> {
    let t = &cfg.train.run;
    let mut rng = rng_for(t.seed, Stream::Init, 0);
    let model = cfg.init_model(&mut rng, &device.clone().autodiff());
    t.trainer(model).with_decay_rule(super::optim::decay_rule())
}

/// The frozen generator of a `gen train` run folder (EMA weights when kept), its config and step.
pub fn load_generator(dir: &Path, device: &Device) -> Result<(GenConfig, Generator, usize)> {
    let cfg: GenConfig = checkpoint::read_config(dir, "gen train")?;
    cfg.validate()?;
    let Some((manifest, state)) = checkpoint::load::<LatentInfo>(dir)? else {
        return Err(Error::Checkpoint {
            path: dir.join(checkpoint::MANIFEST),
            msg: "not found; the run has not written a checkpoint yet".into(),
        });
    };
    let mut model = cfg.init_model(&mut rng_for(0, Stream::Init, 0), device);
    let bytes = state.ema.as_ref().unwrap_or(&state.model);
    crate::params::load_module_bytes(&mut model, bytes, "generator")?;
    Ok((cfg, model, manifest.step))
}

/// Writes latents `[n, tokens, dim]` (flat, f32) as the `latents` tensor of a .safetensors file,
/// the format `ae decode` reads.
pub fn write_latents(path: &Path, latents: &[f32], tokens: usize, dim: usize) -> Result<()> {
    let bytes: Vec<u8> = latents.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = latents.len() / (tokens * dim).max(1);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, tokens, dim], &bytes)
            .map_err(|e| Error::input(path, format!("could not encode latents: {e}")))?;
    let out = safetensors::serialize([("latents".to_string(), view)], None)
        .map_err(|e| Error::input(path, format!("could not encode latents: {e}")))?;
    write_atomic(path, &out)
}
