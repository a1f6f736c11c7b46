//! Training a prior on feature rows (SPEC section 6, stage 1): the loop, its metrics and resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;
use serde::Serialize;

use super::config::FeaturePriorConfig;
use super::data::PriorData;
use crate::align::flow_loss;
use crate::checkpoint::{self, Manifest, MetricsLog};
use crate::config::{Reduction, Schedule};
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::flow::path::PathDraws;
use crate::flow::{VelocityMlp, VelocityMlpConfig, rows_to_tensor};
use crate::rng::{Stream, rng_for};
use crate::train::{PriorMeta, PriorTrainer, StepStats, save_prior};

/// The columns of `metrics.csv`.
const METRICS: [&str; 6] = [
    "step",
    "loss",
    "lr",
    "grad_norm",
    "vectors_per_s",
    "val_loss",
];

/// Held-out rows scored at each checkpoint (fixed draws, so the numbers compare across steps).
const VAL_ROWS: usize = 4_096;

/// One line of the metrics log.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub step: usize,
    /// Mean training loss over the steps since the previous line.
    pub loss: f32,
    pub lr: f64,
    /// Global gradient norm of the last step, before clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    /// Feature vectors per second since the previous line.
    pub vectors_per_s: f64,
    /// Flow-matching loss of the frozen prior on held-out rows (checkpoint steps only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
}

/// How a training run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The step the run started from (0 for a new run).
    pub resumed_from: usize,
    /// Steps taken when it stopped.
    pub step: usize,
    /// Whether it stopped early because it was asked to (a checkpoint was written).
    pub interrupted: bool,
    /// The last held-out flow-matching loss.
    pub val_loss: f32,
}

/// A feature prior run: its data, trainer and folder.
pub struct PriorRun {
    cfg: FeaturePriorConfig,
    dir: PathBuf,
    data: PriorData,
    trainer: PriorTrainer,
    device: Device,
    /// Data-parallel replicas' devices (empty: one replica on `device`).
    replicas: Vec<Device>,
    resumed_from: usize,
    /// The other processes of a multi-process run (rank 0 alone writes `dir`).
    comm: Option<Arc<Comm>>,
}

impl PriorRun {
    /// Opens a new run in `dir`, or continues its checkpoint when `resume` is set.
    ///
    /// A new run refuses a folder that already holds a checkpoint; a resumed one refuses a config
    /// or table that differs from the checkpoint's in anything but its length and logging.
    pub fn open(
        cfg: FeaturePriorConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
    ) -> Result<PriorRun> {
        Self::open_as(cfg, dir, resume, device, true)
    }

    /// [`PriorRun::open`]; with `lead` false the run folder is neither read nor written.
    fn open_as(
        cfg: FeaturePriorConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        lead: bool,
    ) -> Result<PriorRun> {
        cfg.validate()?;
        let (old, saved) = if lead {
            checkpoint::open::<FeaturePriorConfig, super::data::TableInfo>(
                dir,
                resume,
                "prior train",
            )?
        } else {
            (None, None)
        };
        if let Some(old) = &old {
            cfg.check_resumable(old)?;
        }
        let data = PriorData::prepare(&cfg.data, cfg.train.seed, device)?;
        if let Some((m, _)) = &saved {
            check_same_table(&cfg, m, &data)?;
        }
        if lead {
            checkpoint::write_config(dir, &cfg)?;
        }
        let mut trainer = new_trainer(&cfg, data.dim(), device);
        let resumed_from = match saved {
            Some((_, state)) => {
                trainer.restore(&state)?;
                state.step
            }
            None => 0,
        };
        Ok(PriorRun {
            cfg,
            dir: dir.to_path_buf(),
            data,
            trainer,
            device: device.clone(),
            replicas: Vec::new(),
            resumed_from,
            comm: None,
        })
    }

    /// Opens one rank of a multi-process run: rank 0 opens `dir` as [`PriorRun::open`] does (new
    /// or resumed) and broadcasts its trainer state; the other ranks prepare the same data, never
    /// touch `dir`, and start from rank 0's state. Every rank must pass rank 0's `cfg`.
    pub fn open_rank(
        cfg: FeaturePriorConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        comm: Arc<Comm>,
    ) -> Result<PriorRun> {
        dist::check_batch(cfg.train.batch, comm.rank().size, "feature vectors")?;
        let mut run = Self::open_as(cfg, dir, resume, device, comm.leads())?;
        let (trainer, step) = dist::adopt(run.trainer, &comm)?;
        (run.trainer, run.resumed_from) = (trainer, step);
        run.comm = Some(comm);
        Ok(run)
    }

    /// Whether this process writes the run folder (rank 0, or the only process).
    pub fn leads(&self) -> bool {
        self.comm.as_ref().is_none_or(|c| c.leads())
    }

    /// Trains data-parallel over `devices` (one replica and thread each; the first holds the
    /// weights). The batch and its draws do not depend on the count, so a run may resume on
    /// another number of devices.
    pub fn with_replicas(mut self, devices: Vec<Device>) -> Self {
        self.replicas = if devices.len() > 1 {
            devices
        } else {
            Vec::new()
        };
        self
    }

    /// The run's data.
    pub fn data(&self) -> &PriorData {
        &self.data
    }

    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.trainer.step
    }

    /// One optimiser step: `batch` rows and `batch * mc` (t, eps) draws, all seeded by the step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let t = &self.cfg.train;
        let mut rng = rng_for(t.seed, Stream::Prior, self.trainer.step as u64);
        let rows = self.data.batch(t.batch, &mut rng);
        let d = self.data.dim();
        let part = match &self.comm {
            Some(c) => dist::part(t.batch, c.rank().rank, c.rank().size),
            None if self.replicas.is_empty() => {
                return step_on_rows(&mut self.trainer, &rows, d, t.mc, &mut rng, &self.device);
            }
            None => 0..t.batch,
        };
        let devices = if self.replicas.is_empty() {
            std::slice::from_ref(&self.device)
        } else {
            &self.replicas
        };
        step_on_rows_sharded(&mut self.trainer, &rows, part, d, t.mc, &mut rng, devices)
    }

    /// The flow-matching loss of the frozen prior on up to 4,096 held-out rows, with fixed draws.
    pub fn val_loss(&self) -> f32 {
        let rows = if self.data.holdout.rows > 0 {
            &self.data.holdout
        } else {
            &self.data.train
        };
        let n = rows.rows.min(VAL_ROWS);
        let d = rows.cols;
        let prior = self.trainer.frozen();
        let mut rng = rng_for(self.cfg.train.seed, Stream::Eval, 0);
        let x = rows_to_tensor(&rows.data[..n * d], d, &self.device);
        let draws = PathDraws::sample(&mut rng, n, d, &self.device);
        flow_loss(&prior, x, &draws, Reduction::Mean).into_scalar::<f32>()
    }

    /// Writes a checkpoint and exports the frozen prior (`prior.safetensors`, `prior.toml`); on
    /// ranks other than 0 it only checks that this rank's weights equal rank 0's.
    pub fn checkpoint(&self) -> Result<()> {
        if let Some(comm) = &self.comm {
            let sum = dist::weights_checksum(self.trainer.model());
            comm.verify_same(sum, self.trainer.step)?;
            if !comm.leads() {
                return Ok(());
            }
        }
        checkpoint::save(&self.dir, &self.data.info, &self.trainer.state_bytes()?)?;
        let meta = PriorMeta {
            dim: self.data.dim(),
            width: self.cfg.model.width,
            depth: self.cfg.model.depth,
            target: self.cfg.data.features.clone(),
            scale: self.data.info.scale as f32,
            steps: self.trainer.step,
            seed: self.cfg.train.seed,
        };
        save_prior(&self.dir, &self.trainer.frozen(), &meta)
    }

    /// Trains to `train.steps`, logging every `log_every` steps and checkpointing every
    /// `checkpoint_every` steps and at the end. `stop` is polled every step: when it turns true a
    /// checkpoint is written and the run returns early. `on_log` sees every metrics line.
    pub fn run(
        &mut self,
        stop: impl Fn() -> bool,
        mut on_log: impl FnMut(&Metrics),
    ) -> Result<Summary> {
        let t = self.cfg.train.clone();
        let log = self
            .leads()
            .then(|| MetricsLog::open(&self.dir, self.trainer.step, &METRICS))
            .transpose()?;
        let (mut loss_sum, mut loss_n) = (0.0f64, 0usize);
        let mut window = Instant::now();
        let mut val_loss = f32::NAN;
        let mut interrupted = false;
        while self.trainer.step < t.steps {
            let stats = self.guarded_step()?;
            loss_sum += f64::from(stats.loss);
            loss_n += 1;
            let step = self.trainer.step;
            let ckpt = step.is_multiple_of(t.checkpoint_every) || step == t.steps;
            interrupted = stop();
            if let Some(comm) = &self.comm {
                // Every rank stops at the same step, whichever saw the request.
                interrupted = comm.any(interrupted, step)?;
            }
            if step.is_multiple_of(t.log_every) || ckpt || interrupted {
                if ckpt || interrupted {
                    val_loss = self.val_loss();
                    self.checkpoint()?;
                }
                let m = Metrics {
                    step,
                    loss: (loss_sum / loss_n as f64) as f32,
                    lr: stats.lr,
                    grad_norm: stats.grad_norm,
                    vectors_per_s: (loss_n * t.batch) as f64 / window.elapsed().as_secs_f64(),
                    val_loss: (ckpt || interrupted).then_some(val_loss),
                };
                if let Some(log) = &log {
                    log.append(&m)?;
                }
                on_log(&m);
                (loss_sum, loss_n, window) = (0.0, 0, Instant::now());
            }
            if interrupted {
                break;
            }
        }
        if self.trainer.step == self.resumed_from {
            // Nothing to train (resumed at the end): still report the prior.
            val_loss = self.val_loss();
        }
        Ok(Summary {
            resumed_from: self.resumed_from,
            step: self.trainer.step,
            interrupted,
            val_loss,
        })
    }

    /// A training step that turns a backend's out-of-memory panic into an error naming the batch.
    fn guarded_step(&mut self) -> Result<StepStats> {
        let (batch, mc) = (self.cfg.train.batch, self.cfg.train.mc);
        crate::train::oom_guard(&format!("batch {batch} x mc {mc}"), batch, || {
            self.train_step()
        })
    }

    /// The frozen prior (EMA weights when kept).
    pub fn frozen(&self) -> VelocityMlp {
        self.trainer.frozen()
    }
}

/// One step of `trainer` on the flat rows `[batch, d]`, each repeated `mc` times with its own
/// (t, eps) draw from `rng`. This is the whole training step: data-parallel front-ends wrap it.
pub fn step_on_rows(
    trainer: &mut PriorTrainer,
    rows: &[f32],
    d: usize,
    mc: usize,
    rng: &mut crate::rng::Rng,
    device: &Device,
) -> Result<StepStats> {
    let ad = device.clone().autodiff();
    let n = rows.len() / d;
    let x = rows_to_tensor(rows, d, &ad).repeat_dim(0, mc); // [mc * n, d]
    let draws = PathDraws::sample(rng, n * mc, d, &ad);
    trainer.train_step(x, &draws)
}

/// [`step_on_rows`] on the rows `part` of the batch `rows`, split over `devices`: the same rows
/// and draws (drawn in the same order), each device taking a contiguous share of `part` with its
/// `mc` draws. A process of a multi-process run trains its `part`; the trainer averages over them.
pub fn step_on_rows_sharded(
    trainer: &mut PriorTrainer,
    rows: &[f32],
    part: std::ops::Range<usize>,
    d: usize,
    mc: usize,
    rng: &mut crate::rng::Rng,
    devices: &[Device],
) -> Result<StepStats> {
    let n = rows.len() / d;
    let draws = crate::flow::path::HostDraws::sample(rng, n, d, mc);
    let m = part.len();
    let k = devices.len().min(m).max(1);
    let shards = (0..k)
        .map(|s| {
            let (a, b) = (part.start + s * m / k, part.start + (s + 1) * m / k);
            let ad = devices[s].clone().autodiff();
            crate::train::Shard {
                device: devices[s].clone(),
                x: rows_to_tensor(&rows[a * d..b * d], d, &ad).repeat_dim(0, mc),
                draws: draws.shard(a..b, &ad),
                weight: (b - a) as f32 / m as f32,
            }
        })
        .collect();
    trainer.train_step_sharded(shards)
}

/// A trainer for `cfg` on latent dimension `dim`, freshly initialised.
pub fn new_trainer(cfg: &FeaturePriorConfig, dim: usize, device: &Device) -> PriorTrainer {
    let t = &cfg.train;
    let mut rng = rng_for(t.seed, Stream::Init, 0);
    let model = VelocityMlpConfig::new(dim, cfg.model.width, cfg.model.depth)
        .init(&mut rng, &device.clone().autodiff());
    PriorTrainer::new(
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
    .with_precision(t.precision)
}

fn check_same_table(
    cfg: &FeaturePriorConfig,
    m: &Manifest<super::data::TableInfo>,
    data: &PriorData,
) -> Result<()> {
    let (a, b) = (&m.data, &data.info);
    if (a.rows, a.cols) != (b.rows, b.cols) || (a.std - b.std).abs() > 1e-9 * a.std.abs().max(1.0) {
        return Err(Error::Config(format!(
            "--resume: {} now holds {} x {} rows (std {:.6}) but the checkpoint trained on {} x {} (std {:.6}); \
             pass the same feature table",
            cfg.data.features, b.rows, b.cols, b.std, a.rows, a.cols, a.std
        )));
    }
    Ok(())
}
