//! The run harness every long training run goes through (the feature prior, the autoencoder, the
//! generator): one shared set of loop settings, opening a run folder new or resumed, the step loop
//! with its checkpoint and logging cadence, the stop flag (Ctrl-C, and every MPI rank stopping at
//! the same step), the out-of-memory guard and the metrics log.
//!
//! A stage plugs in through [`Job`]: its own step, checkpoint and metrics line. The loop reads as
//! one story in [`train`]: step, decide, checkpoint, log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, MetricsLog, Saved};
use crate::config::{require_counts, require_positive};
use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::train::{OptimSpec, Schedule, Trainer, oom_guard};

/// The loop and optimiser settings every long run shares: the `[train]` table of its config, plus
/// the few fields a stage adds (caught by [`Extra`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Optimiser steps.
    pub steps: usize,
    /// Items (feature vectors, images, latents) per step, over all devices and ranks.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup: usize,
    /// The cosine ends at this fraction of the peak rate (1 = constant after the warm-up).
    pub final_lr_frac: f64,
    pub optim: OptimSpec,
    /// EMA decay of the weights that are evaluated and exported (0 = none).
    pub ema: f64,
    /// Seed of initialisation, batches and every draw.
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end, and when stopped).
    pub checkpoint_every: usize,
    /// Log metrics every this many steps.
    pub log_every: usize,
    /// The forward pass's dtype (`f32` or `bf16`); weights, gradients, optimiser state and EMA
    /// stay f32 either way, so it may change on resume. The paper trained in bf16 on GPUs; the
    /// presets keep f32, which every backend computes natively.
    #[serde(default)]
    pub precision: Precision,
}

/// Keys of a `[train]` table that neither [`RunSettings`] nor the stage knows: kept so that
/// [`RunSettings::validate`] can refuse them by name (serde cannot deny unknown fields through a
/// flattened struct).
pub type Extra = BTreeMap<String, toml::Value>;

impl RunSettings {
    /// The learning-rate schedule: linear warm-up, then cosine to `final_lr_frac`.
    pub fn schedule(&self) -> Schedule {
        Schedule::Cosine {
            warmup: self.warmup,
            final_frac: self.final_lr_frac,
        }
    }

    /// Checks every value (keys under `train.`), and that `extra` is empty.
    pub fn validate(&self, extra: &Extra) -> Result<()> {
        if let Some(key) = extra.keys().next() {
            return Err(Error::setting(
                format!("train.{key}"),
                "is not a known setting (check its spelling)",
            ));
        }
        require_counts(&[
            ("train.steps", self.steps),
            ("train.batch", self.batch),
            ("train.checkpoint_every", self.checkpoint_every),
            ("train.log_every", self.log_every),
        ])?;
        require_positive(&[("train.lr", self.lr)])?;
        if !(0.0..=1.0).contains(&self.final_lr_frac) {
            return Err(Error::setting(
                "train.final_lr_frac",
                format!("must lie in [0, 1], got {}", self.final_lr_frac),
            ));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return Err(Error::setting(
                "train.ema",
                format!("must lie in [0, 1), got {}", self.ema),
            ));
        }
        let o = &self.optim;
        if !((0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            return Err(Error::setting(
                "train.optim",
                format!(
                    "beta1 and beta2 must lie in [0, 1), got {} and {}",
                    o.beta1, o.beta2
                ),
            ));
        }
        if !(o.eps > 0.0 && o.weight_decay >= 0.0 && o.grad_clip >= 0.0) {
            return Err(Error::setting(
                "train.optim",
                "eps must be positive, weight_decay and grad_clip at least 0",
            ));
        }
        Ok(())
    }

    /// A fresh trainer of `model` (on an autodiff device) with these settings.
    pub fn trainer<M: Module>(&self, model: M) -> Trainer<M> {
        Trainer::new(model, self.lr, self.schedule(), self.steps)
            .with_optim(self.optim)
            .with_ema(self.ema)
            .with_precision(self.precision)
    }
}

/// A run config the harness can open: it knows its loop settings and what a resume may not change.
pub trait RunConfig: Serialize + DeserializeOwned + Clone {
    /// The command that writes such run folders, for messages (`prior train`).
    const COMMAND: &'static str;

    /// The shared loop settings.
    fn settings(&self) -> &RunSettings;

    /// Fails with the first setting a resume of `saved` may not change.
    fn check_resumable(&self, saved: &Self) -> Result<()>;
}

/// What a run starts from: rank 0 (or a lone process) reads the folder; other ranks see nothing.
pub struct Opened<D> {
    /// The latest checkpoint, when resuming one.
    pub saved: Saved<D>,
    /// Whether this process reads and writes the run folder.
    pub lead: bool,
}

/// Opens `dir` for `cfg`: a new run refuses a folder that already holds a checkpoint; a resumed
/// one reads the folder's config and checkpoint and refuses settings a resume may not change.
/// With `lead` false (a rank other than 0) the folder is not touched.
pub fn open<C: RunConfig, D: DeserializeOwned>(
    cfg: &C,
    dir: &Path,
    resume: bool,
    lead: bool,
) -> Result<Opened<D>> {
    if !lead {
        return Ok(Opened { saved: None, lead });
    }
    let (old, saved) = checkpoint::open::<C, D>(dir, resume, C::COMMAND)?;
    if let Some(old) = &old {
        cfg.check_resumable(old)?;
    }
    Ok(Opened { saved, lead })
}

/// Records the run's resolved config in its folder (rank 0 only), once its inputs have been checked.
pub fn write_config(dir: &Path, cfg: &impl Serialize, lead: bool) -> Result<()> {
    if lead {
        checkpoint::write_config(dir, cfg)?;
    }
    Ok(())
}

/// A stage's part of the loop.
pub trait Job {
    /// One line of `metrics.csv` / `metrics.jsonl`.
    type Line: Serialize;

    /// Steps taken so far.
    fn step(&self) -> usize;

    /// What a step processes, for the out-of-memory message (e.g. "batch 256 x mc 4").
    fn step_size(&self) -> String;

    /// One optimiser step; the job keeps its own running sums for the next metrics line.
    fn train_step(&mut self) -> Result<()>;

    /// Work after the step numbered `step` (grids, monitors), before any checkpoint; `lead` says
    /// whether this process writes the folder.
    fn after_step(&mut self, _step: usize, _lead: bool) -> Result<()> {
        Ok(())
    }

    /// Whether `step` must log even off the `log_every` cadence (e.g. a monitor ran).
    fn log_now(&self, _step: usize) -> bool {
        false
    }

    /// Saves the state (rank 0) or checks it against rank 0's (other ranks).
    fn checkpoint(&mut self) -> Result<()>;

    /// The metrics line at `step`, from the sums since the last line (which it resets); `secs`
    /// since that line, `checkpointed` whether a checkpoint was just written.
    fn line(&mut self, step: usize, secs: f64, checkpointed: bool) -> Result<Self::Line>;

    /// A line to log before the first step of a new run (a baseline), if any.
    fn first_line(&mut self) -> Result<Option<Self::Line>> {
        Ok(None)
    }

    /// Called on rank 0 after each line is appended to the log (e.g. to redraw a figure).
    fn logged(&mut self, _dir: &Path, _line: &Self::Line) -> Result<()> {
        Ok(())
    }

    /// The PNG figures (file names in the run folder) the job writes while it trains, such as a
    /// reconstruction grid: each new version goes to TensorBoard as an image, tagged by its name.
    fn figures(&self) -> &'static [&'static str] {
        &[]
    }
}

/// The last modification seen of each of a job's figures; sends a changed one to TensorBoard.
struct FigureWatch {
    seen: Vec<Option<std::time::SystemTime>>,
}

impl FigureWatch {
    fn new(names: &[&str]) -> Self {
        FigureWatch {
            seen: vec![None; names.len()],
        }
    }

    fn send(
        &mut self,
        dir: &Path,
        names: &[&str],
        step: usize,
        log: &mut MetricsLog,
    ) -> Result<()> {
        for (name, seen) in names.iter().zip(&mut self.seen) {
            let path = dir.join(name);
            let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
                continue;
            };
            if *seen == Some(modified) {
                continue;
            }
            *seen = Some(modified);
            let png = std::fs::read(&path)
                .map_err(|e| crate::error::Error::io(&path, "keep the run folder readable", e))?;
            let tag = name.strip_suffix(".png").unwrap_or(name);
            log.events().image(tag, step, &png)?;
        }
        Ok(())
    }
}

/// Where and among whom a run trains.
#[derive(Debug, Clone)]
pub struct Context {
    /// The run folder (written by rank 0 only).
    pub dir: PathBuf,
    /// The other processes of a multi-process run.
    pub comm: Option<Arc<Comm>>,
    /// The columns of `metrics.csv` (the first is `step`).
    pub columns: &'static [&'static str],
}

impl Context {
    /// Whether this process writes the run folder (rank 0, or the only process).
    pub fn leads(&self) -> bool {
        self.comm.as_ref().is_none_or(|c| c.leads())
    }
}

/// How a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The step the run started from (0 for a new run).
    pub resumed_from: usize,
    /// Steps taken when it stopped.
    pub step: usize,
    /// Whether it stopped early because it was asked to (a checkpoint was written).
    pub interrupted: bool,
}

/// Trains `job` to `settings.steps`: logs every `log_every` steps, checkpoints every
/// `checkpoint_every` steps and at the end. `stop` is polled after every step: when it turns true
/// (on any rank) a checkpoint is written and the run returns early. `on_log` sees every line.
pub fn train<J: Job>(
    job: &mut J,
    settings: &RunSettings,
    ctx: &Context,
    stop: impl Fn() -> bool,
    mut on_log: impl FnMut(&J::Line),
) -> Result<Summary> {
    let lead = ctx.leads();
    let resumed_from = job.step();
    let mut log = lead
        .then(|| MetricsLog::open(&ctx.dir, resumed_from, ctx.columns))
        .transpose()?;
    let mut figures = FigureWatch::new(job.figures());
    if resumed_from == 0
        && let Some(line) = job.first_line()?
        && let Some(log) = &mut log
    {
        log.append(&line)?;
        job.logged(&ctx.dir, &line)?;
        figures.send(&ctx.dir, job.figures(), 0, log)?;
    }
    let mut window = Instant::now();
    let mut interrupted = false;
    while job.step() < settings.steps {
        oom_guard(&job.step_size(), settings.batch, || job.train_step())?;
        let step = job.step();
        let at_end = step == settings.steps;
        let checkpoint = step.is_multiple_of(settings.checkpoint_every) || at_end;
        interrupted = stop();
        if let Some(comm) = &ctx.comm {
            // Every rank stops at the same step, whichever saw the request.
            interrupted = comm.any(interrupted, step)?;
        }
        job.after_step(step, lead)?;
        if checkpoint || interrupted {
            job.checkpoint()?;
        }
        if step.is_multiple_of(settings.log_every) || checkpoint || interrupted || job.log_now(step)
        {
            let line = job.line(
                step,
                window.elapsed().as_secs_f64(),
                checkpoint || interrupted,
            )?;
            if let Some(log) = &mut log {
                log.append(&line)?;
                job.logged(&ctx.dir, &line)?;
            }
            on_log(&line);
            window = Instant::now();
        }
        if let Some(log) = &mut log {
            figures.send(&ctx.dir, job.figures(), step, log)?;
        }
        if interrupted {
            break;
        }
    }
    Ok(Summary {
        resumed_from,
        step: job.step(),
        interrupted,
    })
}

/// The trainer of an opened run: `fresh`, restored from the checkpoint when resuming, then, in a
/// multi-process run, rank 0's state adopted by every rank.
pub fn resume_trainer<M: Module, D>(
    fresh: Trainer<M>,
    opened: &Opened<D>,
    comm: Option<&Arc<Comm>>,
) -> Result<Trainer<M>> {
    let mut trainer = fresh;
    if let Some((_, state)) = &opened.saved {
        trainer.restore(state)?;
    }
    Ok(adopt(trainer, comm)?.0)
}

/// A rank's trainer adopted from rank 0 when `comm` is given (see [`Trainer::adopt`]); with no
/// job, the trainer and its own step.
pub fn adopt<M: Module>(
    trainer: Trainer<M>,
    comm: Option<&Arc<Comm>>,
) -> Result<(Trainer<M>, usize)> {
    match comm {
        Some(c) => trainer.adopt(c),
        None => {
            let step = trainer.step;
            Ok((trainer, step))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[train]` table as the prior writes it: the shared settings plus `mc`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Train {
        #[serde(flatten)]
        run: RunSettings,
        mc: usize,
        #[serde(flatten, skip_serializing)]
        extra: Extra,
    }

    fn settings() -> RunSettings {
        RunSettings {
            steps: 10,
            batch: 4,
            lr: 1e-3,
            warmup: 2,
            final_lr_frac: 0.1,
            optim: OptimSpec::PAPER_ADAMW,
            ema: 0.0,
            seed: 3,
            checkpoint_every: 5,
            log_every: 1,
            precision: Precision::F32,
        }
    }

    #[test]
    fn flattened_settings_round_trip_and_unknown_keys_are_named() {
        let t = Train {
            run: settings(),
            mc: 4,
            extra: Extra::new(),
        };
        let text = toml::to_string_pretty(&t).unwrap();
        assert!(
            text.contains("mc = 4") && text.contains("steps = 10"),
            "{text}"
        );
        let back: Train = toml::from_str(&text).unwrap();
        assert_eq!(back, t);
        back.run.validate(&back.extra).unwrap();
        let typo: Train =
            toml::from_str(&text.replace("steps = 10", "steps = 10\nstpes = 3")).unwrap();
        let err = typo.run.validate(&typo.extra).unwrap_err().to_string();
        assert!(err.contains("train.stpes"), "{err}");
        let mut bad = settings();
        bad.ema = 1.0;
        let err = bad.validate(&Extra::new()).unwrap_err();
        assert_eq!(err.setting_key(), Some("train.ema"));
        assert!(err.to_string().contains("got 1"), "{err}");
    }
}
