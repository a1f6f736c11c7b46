//! Training a prior on feature rows (METHOD.md section 6, stage 1): its step and metrics, run by
//! the shared harness ([`crate::run`]).

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use serde::Serialize;

use super::config::FeaturePriorConfig;
use super::data::{PriorData, TableInfo};
use crate::align::flow_loss;
use crate::checkpoint::{self, Manifest};
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::flow::path::PathDraws;
use crate::flow::store::{PriorMeta, save_prior};
use crate::flow::{VelocityMlp, VelocityMlpConfig, rows_to_tensor};
use crate::rng::{Stream, rng_for};
use crate::run::{self, Context, Job};
use crate::train::steps::PRIOR_REDUCTION;
use crate::train::{PriorTrainer, StepStats};

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

/// How a prior run ended: the harness's summary and the last held-out flow-matching loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub run: run::Summary,
    pub val_loss: f32,
}

/// A feature prior run: its data, trainer and folder.
pub struct PriorRun {
    cfg: FeaturePriorConfig,
    ctx: Context,
    data: PriorData,
    trainer: PriorTrainer,
    device: Device,
    /// Data-parallel replicas' devices (empty: one replica on `device`).
    replicas: Vec<Device>,
    /// Sums since the last metrics line: loss, steps; the last step's stats; the last val loss.
    loss_sum: f64,
    loss_n: usize,
    last: Option<StepStats>,
    val_loss: f32,
}

impl PriorRun {
    /// Opens a new run in `dir`, or continues its checkpoint when `resume` is set; with `comm`,
    /// one rank of a multi-process run (rank 0 alone reads and writes `dir` and every rank starts
    /// from its state; every rank must pass rank 0's `cfg`).
    ///
    /// A new run refuses a folder that already holds a checkpoint; a resumed one refuses a config
    /// or table that differs from the checkpoint's in anything but its length and logging.
    pub fn open(
        cfg: FeaturePriorConfig,
        dir: &Path,
        resume: bool,
        device: &Device,
        comm: Option<Arc<Comm>>,
    ) -> Result<PriorRun> {
        cfg.validate()?;
        if let Some(c) = &comm {
            dist::check_batch(cfg.train.run.batch, c.rank().size, "feature vectors")?;
        }
        let lead = comm.as_ref().is_none_or(|c| c.leads());
        let opened = run::open::<_, TableInfo>(&cfg, dir, resume, lead)?;
        let data = PriorData::prepare(&cfg.data, cfg.train.run.seed, device)?;
        if let Some((m, _)) = &opened.saved {
            check_same_table(&cfg, m, &data)?;
        }
        run::write_config(dir, &cfg, lead)?;
        let trainer = run::resume_trainer(
            new_trainer(&cfg, data.dim(), device),
            &opened,
            comm.as_ref(),
        )?;
        Ok(PriorRun {
            cfg,
            ctx: Context {
                dir: dir.to_path_buf(),
                comm,
                columns: &METRICS,
            },
            data,
            trainer,
            device: device.clone(),
            replicas: Vec::new(),
            loss_sum: 0.0,
            loss_n: 0,
            last: None,
            val_loss: f32::NAN,
        })
    }

    /// Whether this process writes the run folder (rank 0, or the only process).
    pub fn leads(&self) -> bool {
        self.ctx.leads()
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
        let (t, mc) = (&self.cfg.train.run, self.cfg.train.mc);
        let mut rng = rng_for(t.seed, Stream::Prior, self.trainer.step as u64);
        let rows = self.data.batch(t.batch, &mut rng);
        let d = self.data.dim();
        let part = match &self.ctx.comm {
            Some(c) => dist::part(t.batch, c.rank().rank, c.rank().size),
            None if self.replicas.is_empty() => {
                return step_on_rows(&mut self.trainer, &rows, d, mc, &mut rng, &self.device);
            }
            None => 0..t.batch,
        };
        let devices = if self.replicas.is_empty() {
            std::slice::from_ref(&self.device)
        } else {
            &self.replicas
        };
        step_on_rows_sharded(&mut self.trainer, &rows, part, d, mc, &mut rng, devices)
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
        let mut rng = rng_for(self.cfg.train.run.seed, Stream::Eval, 0);
        let x = rows_to_tensor(&rows.data[..n * d], d, &self.device);
        let draws = PathDraws::sample(&mut rng, n, d, &self.device);
        flow_loss(&prior, x, &draws, PRIOR_REDUCTION).into_scalar::<f32>()
    }

    /// Trains to `train.steps` through the harness (see [`run::train`]); `stop` is polled every
    /// step, `on_log` sees every metrics line.
    pub fn run(
        &mut self,
        stop: impl Fn() -> bool,
        on_log: impl FnMut(&Metrics),
    ) -> Result<Summary> {
        let (settings, ctx) = (self.cfg.train.run.clone(), self.ctx.clone());
        let summary = run::train(self, &settings, &ctx, stop, on_log)?;
        if summary.step == summary.resumed_from {
            // Nothing to train (resumed at the end): still report the prior.
            self.val_loss = self.val_loss();
        }
        Ok(Summary {
            run: summary,
            val_loss: self.val_loss,
        })
    }

    /// The frozen prior (EMA weights when kept).
    pub fn frozen(&self) -> VelocityMlp {
        self.trainer.frozen()
    }
}

impl Job for PriorRun {
    type Line = Metrics;

    fn step(&self) -> usize {
        self.trainer.step
    }

    fn step_size(&self) -> String {
        format!(
            "batch {} x mc {}",
            self.cfg.train.run.batch, self.cfg.train.mc
        )
    }

    fn train_step(&mut self) -> Result<()> {
        let stats = PriorRun::train_step(self)?;
        self.loss_sum += f64::from(stats.loss);
        self.loss_n += 1;
        self.last = Some(stats);
        Ok(())
    }

    /// Scores the held-out rows, writes a checkpoint and exports the frozen prior
    /// (`prior.safetensors`, `prior.toml`); ranks other than 0 only check that their weights equal
    /// rank 0's.
    fn checkpoint(&mut self) -> Result<()> {
        self.val_loss = self.val_loss();
        if let Some(comm) = &self.ctx.comm {
            let sum = dist::weights_checksum(self.trainer.model());
            comm.verify_same(sum, self.trainer.step)?;
            if !comm.leads() {
                return Ok(());
            }
        }
        checkpoint::save(&self.ctx.dir, &self.data.info, &self.trainer.state_bytes()?)?;
        let meta = PriorMeta {
            dim: self.data.dim(),
            width: self.cfg.model.width,
            depth: self.cfg.model.depth,
            target: self.cfg.data.features.clone(),
            scale: self.data.info.scale as f32,
            steps: self.trainer.step,
            seed: self.cfg.train.run.seed,
        };
        save_prior(&self.ctx.dir, &self.trainer.frozen(), &meta)
    }

    fn line(&mut self, step: usize, secs: f64, checkpointed: bool) -> Result<Metrics> {
        let last = self.last.ok_or(Error::Stopped("prior step"))?;
        let m = Metrics {
            step,
            loss: (self.loss_sum / self.loss_n.max(1) as f64) as f32,
            lr: last.lr,
            grad_norm: last.grad_norm,
            vectors_per_s: (self.loss_n * self.cfg.train.run.batch) as f64 / secs.max(1e-9),
            val_loss: checkpointed.then_some(self.val_loss),
        };
        (self.loss_sum, self.loss_n) = (0.0, 0);
        Ok(m)
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
    let t = &cfg.train.run;
    let mut rng = rng_for(t.seed, Stream::Init, 0);
    let model = VelocityMlpConfig::new(dim, cfg.model.width, cfg.model.depth)
        .init(&mut rng, &device.clone().autodiff());
    t.trainer(model)
}

fn check_same_table(
    cfg: &FeaturePriorConfig,
    m: &Manifest<TableInfo>,
    data: &PriorData,
) -> Result<()> {
    let (a, b) = (&m.data, &data.info);
    if (a.rows, a.cols) != (b.rows, b.cols) || (a.std - b.std).abs() > 1e-9 * a.std.abs().max(1.0) {
        return Err(Error::input_fixed_by(
            &cfg.data.features,
            format!(
                "resuming: the table now holds {} x {} rows (std {:.6}) but the checkpoint trained on {} x {} (std {:.6}); \
                 give the same feature table (data.features)",
                b.rows, b.cols, b.std, a.rows, a.cols, a.std
            ),
            "data.features",
        ));
    }
    Ok(())
}
