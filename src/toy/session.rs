//! One toy session, advanced a step at a time: train the prior, freeze it, align the latents
//! (METHOD.md section 5). `flowalign toy` drives it in a loop, the window's worker from its thread;
//! both record the same [`Event`]s into the same [`Curves`].

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;

use super::config::{AlignConfig, ToyConfig};
pub use super::events::{Curves, Event};
use super::experiment::{AlignSummary, HeatmapSummary, PriorSummary, Summary, ToyOutcome, ToyRun};
use crate::align::align_loss;
use crate::error::{Error, Result};
use crate::flow::solver::Solver;
use crate::flow::store::PriorMeta;
use crate::flow::{FrozenPrior, VelocityMlp, rows_to_tensor};
use crate::grid::{Point, to_points};
use crate::rng::{Stream, rng_for};
use crate::stats::{pearson, spearman};
use crate::train::{LatentTrainer, PriorTrainer, Schedule};

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStage {
    Prior,
    Align,
    Done,
}

enum Phase {
    Prior(Box<PriorTrainer>),
    Align {
        prior: Box<FrozenPrior>,
        prior_step: usize,
        trainer: Box<LatentTrainer>,
    },
    Done {
        prior: Box<FrozenPrior>,
        prior_step: usize,
        latents: Vec<Point>,
    },
}

/// Seconds spent in each stage's steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub prior_secs: f64,
    pub align_secs: f64,
    /// Computing the per-step NLL of y (not in `align_secs`).
    pub monitor_secs: f64,
}

/// A toy session: the prior being trained (or frozen), the latents being aligned, what was
/// recorded along the way.
pub struct ToySession {
    run: Arc<ToyRun>,
    align: AlignConfig,
    phase: Phase,
    curves: Curves,
    /// Ten evenly spaced snapshots of y (the trajectories figure), step 0 first.
    snapshots: Vec<(usize, Vec<Point>)>,
    /// The metadata of a prior loaded instead of trained.
    loaded: Option<PriorMeta>,
    timings: Timings,
    /// The step at which the prior stopped because its loss had flattened.
    stopped_flat: Option<usize>,
}

impl ToySession {
    /// A session on `run` that trains a fresh prior, then aligns with `run`'s alignment settings.
    pub fn new(run: Arc<ToyRun>) -> Self {
        let trainer = run.prior_trainer();
        ToySession {
            align: run.cfg.align.clone(),
            run,
            phase: Phase::Prior(Box::new(trainer)),
            curves: Curves::default(),
            snapshots: Vec::new(),
            loaded: None,
            timings: Timings::default(),
            stopped_flat: None,
        }
    }

    /// A session that aligns against a loaded prior at once; returns the session and its first
    /// event (the alignment start).
    pub fn with_prior(run: Arc<ToyRun>, prior: VelocityMlp, meta: PriorMeta) -> (Self, Event) {
        let mut session = ToySession::new(run);
        let steps = meta.steps;
        session.loaded = Some(meta);
        let align = session.align.clone();
        let event = session.start_alignment(prior, steps, align);
        (session, event)
    }

    /// The configured run (target, density, device) this session trains on.
    pub fn run(&self) -> &Arc<ToyRun> {
        &self.run
    }

    /// The alignment settings in use.
    pub fn align_config(&self) -> &AlignConfig {
        &self.align
    }

    pub fn stage(&self) -> SessionStage {
        match self.phase {
            Phase::Prior(_) => SessionStage::Prior,
            Phase::Align { .. } => SessionStage::Align,
            Phase::Done { .. } => SessionStage::Done,
        }
    }

    /// Whether alignment has spent its budget.
    pub fn is_done(&self) -> bool {
        self.stage() == SessionStage::Done
    }

    pub fn curves(&self) -> &Curves {
        &self.curves
    }

    pub fn snapshots(&self) -> &[(usize, Vec<Point>)] {
        &self.snapshots
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The metadata of the prior when it was loaded rather than trained.
    pub fn loaded(&self) -> Option<&PriorMeta> {
        self.loaded.as_ref()
    }

    /// The prior as it stands (live weights while training, else the frozen one, without autodiff)
    /// and the prior step it was taken at.
    pub fn prior(&self) -> (VelocityMlp, usize) {
        match &self.phase {
            Phase::Prior(t) => (t.frozen(), t.step),
            Phase::Align {
                prior, prior_step, ..
            }
            | Phase::Done {
                prior, prior_step, ..
            } => (prior.mlp().clone(), *prior_step),
        }
    }

    /// The frozen prior alignment uses (with its modulation table), once alignment has started.
    pub fn frozen_prior(&self) -> Option<&FrozenPrior> {
        match &self.phase {
            Phase::Prior(_) => None,
            Phase::Align { prior, .. } | Phase::Done { prior, .. } => Some(prior),
        }
    }

    /// The prior step reached so far (the frozen prior's once alignment has started).
    pub fn prior_step(&self) -> usize {
        match &self.phase {
            Phase::Prior(t) => t.step,
            Phase::Align { prior_step, .. } | Phase::Done { prior_step, .. } => *prior_step,
        }
    }

    /// The step at which training stopped early because the prior's loss had flattened
    /// (`prior.stop_when_flat`).
    pub fn stopped_flat(&self) -> Option<usize> {
        self.stopped_flat
    }

    /// The current latents (none before alignment starts).
    pub fn latents(&self) -> Vec<Point> {
        match &self.phase {
            Phase::Prior(_) => Vec::new(),
            Phase::Align { trainer, .. } => to_points(&trainer.latents()),
            Phase::Done { latents, .. } => latents.clone(),
        }
    }

    /// Advances one step: a prior step (freezing the prior and starting alignment once its budget
    /// is spent) or an alignment step. Returns what happened, already recorded in [`Self::curves`].
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::with_capacity(2);
        let mut freeze = None;
        match &mut self.phase {
            Phase::Prior(trainer) => {
                let start = Instant::now();
                let lr = trainer.current_lr();
                let loss = self.run.prior_step(trainer)?;
                self.timings.prior_secs += start.elapsed().as_secs_f64();
                let step = trainer.step;
                events.push(Event::PriorStep { step, loss, lr });
                self.curves.record(&events[0]);
                let flat = self.run.cfg.prior.stop_when_flat.is_some_and(|p| {
                    let curve = &self.curves.prior;
                    let tail = &curve[curve.len().saturating_sub(2 * p.window)..];
                    let losses: Vec<f32> = tail.iter().map(|p| p.1).collect();
                    p.is_flat(step, &losses)
                });
                if flat && step < self.run.cfg.prior.steps {
                    tracing::info!("the prior's loss has flattened at step {step}: aligning");
                    self.stopped_flat = Some(step);
                }
                if flat || step >= self.run.cfg.prior.steps {
                    // The budget is spent, or the loss stopped falling: align with what was trained.
                    freeze = Some((trainer.frozen(), step));
                }
            }
            Phase::Align {
                prior,
                prior_step,
                trainer,
            } => {
                let start = Instant::now();
                let a = &self.align;
                let mut rng = rng_for(self.run.cfg.seed, Stream::Align, trainer.step as u64);
                let loss = trainer.align_step(prior.as_ref(), a.mc, a.reduction, &mut rng)?;
                let latents = to_points(&trainer.latents());
                self.timings.align_secs += start.elapsed().as_secs_f64();
                let start = Instant::now();
                let nll = self.run.density.mean_nll_fast(&latents) as f32;
                self.timings.monitor_secs += start.elapsed().as_secs_f64();
                let step = trainer.step;
                if snapshot_steps(a.steps)[1..].contains(&step) {
                    self.snapshots.push((step, latents.clone()));
                }
                let done = step >= a.steps;
                events.push(Event::AlignStep {
                    step,
                    loss,
                    nll,
                    latents: latents.clone(),
                });
                if done {
                    self.phase = Phase::Done {
                        prior: prior.clone(),
                        prior_step: *prior_step,
                        latents,
                    };
                    events.push(Event::Done);
                }
            }
            Phase::Done { .. } => {}
        }
        // A prior step's event is recorded above (the plateau test reads the curve).
        for e in events
            .iter()
            .filter(|e| !matches!(e, Event::PriorStep { .. }))
        {
            self.curves.record(e);
        }
        if let Some((prior, step)) = freeze {
            let align = self.align.clone();
            events.push(self.start_alignment(prior, step, align));
        }
        Ok(events)
    }

    /// Freezes the prior as it stands and starts aligning fresh latents with `align` (the target,
    /// its density and the prior are kept). Returns the alignment-start event.
    pub fn realign(&mut self, align: AlignConfig) -> Result<Event> {
        let mut cfg = self.run.cfg.clone();
        cfg.align = align.clone();
        cfg.validate()?;
        let (prior, step) = self.prior();
        Ok(self.start_alignment(prior, step, align))
    }

    fn start_alignment(
        &mut self,
        prior: VelocityMlp,
        prior_step: usize,
        align: AlignConfig,
    ) -> Event {
        let y0 = self.run.initial_latents(&align);
        let trainer = LatentTrainer::for_latents(&y0, 2, align.lr, align.steps, self.run.device());
        let latents = to_points(&y0);
        let nll = self.run.density.mean_nll_fast(&latents) as f32;
        self.snapshots = vec![(0, latents.clone())];
        self.timings.align_secs = 0.0;
        self.timings.monitor_secs = 0.0;
        self.align = align.clone();
        self.phase = Phase::Align {
            prior: Box::new(FrozenPrior::new(prior)),
            prior_step,
            trainer: Box::new(trainer),
        };
        let event = Event::AlignStart {
            prior_step,
            latents,
            nll,
            align,
        };
        self.curves.record(&event);
        event
    }
}

/// The alignment steps of the ten snapshots of y (the trajectories figure): 0, then evenly spaced to
/// the last step.
pub fn snapshot_steps(steps: usize) -> Vec<usize> {
    (0..10).map(|k| (k * steps + 4) / 9).collect()
}

fn cancelled(flow: ControlFlow<()>) -> Result<()> {
    match flow {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled),
    }
}

impl ToyRun {
    /// Runs a whole session in a loop (training the prior unless `prior` is given), then
    /// evaluates it. `on` sees every event and may cancel between steps.
    pub fn run(
        self: &Arc<Self>,
        prior: Option<(VelocityMlp, PriorMeta)>,
        on: &mut dyn FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<ToyOutcome> {
        let mut session = match prior {
            Some((model, meta)) => {
                let (session, start) = ToySession::with_prior(Arc::clone(self), model, meta);
                cancelled(on(&start))?;
                session
            }
            None => ToySession::new(Arc::clone(self)),
        };
        while !session.is_done() {
            for event in session.step()? {
                cancelled(on(&event))?;
            }
        }
        self.evaluate(&session)
    }

    /// The numbers and figures' data of a session that has finished aligning.
    pub fn evaluate(&self, session: &ToySession) -> Result<ToyOutcome> {
        let run_start = Instant::now();
        let cfg = &self.cfg;
        let (prior, prior_step) = session.prior();
        // Alignment's frozen prior already holds the modulation table the estimates read.
        let frozen = session
            .frozen_prior()
            .cloned()
            .unwrap_or_else(|| FrozenPrior::new(prior.clone()));
        let prior_meta = match session.loaded() {
            Some(meta) => meta.clone(),
            None => PriorMeta {
                dim: 2,
                width: cfg.prior.width,
                depth: cfg.prior.depth,
                target: self.target.name.clone(),
                scale: self.target.scale,
                steps: prior_step,
                seed: cfg.seed,
            },
        };
        let curves = session.curves().clone();
        let timings = session.timings();
        let align_cfg = session.align_config();

        // Prior check: samples vs data under the target density, and the prior's exact likelihood.
        let reference = self.reference_samples();
        let prior_samples = self.prior_samples(
            &prior,
            cfg.eval.n_check,
            cfg.eval.sample_steps,
            Solver::Euler,
        );
        let data_samples = {
            let mut rng = rng_for(cfg.seed, Stream::Eval, 3);
            self.target.sample(cfg.eval.n_check, &mut rng)
        };
        let k = cfg.eval.bound_points.min(cfg.eval.n_check);
        let model_nll_data = self.exact_nll(&prior, &data_samples[..k]);
        let model_nll_samples = self.exact_nll(&prior, &prior_samples[..k]);
        tracing::debug!("prior check: {:.2}s", run_start.elapsed().as_secs_f64());

        let snapshots = session.snapshots().to_vec();
        let y0 = snapshots.first().map(|s| s.1.clone()).unwrap_or_default();
        let y_final = session.latents();
        let loss_final = {
            let mut rng = rng_for(cfg.seed, Stream::Eval, 4);
            let y = rows_to_tensor(y_final.as_flattened(), 2, &self.device);
            align_loss(&frozen, y, 20, align_cfg.reduction, &mut rng).into_scalar::<f32>() as f64
        };

        // Heatmaps, the estimates of METHOD.md section 3, the velocity field.
        let (nll_map, align_map, heat_secs) =
            self.heatmaps(&prior, &reference, cfg.eval.grid, cfg.eval.t_values);
        tracing::debug!("heatmaps: {:.2}s", run_start.elapsed().as_secs_f64());
        let estimate = self.estimate_summary(&frozen, &y_final[..k.min(y_final.len())]);
        tracing::debug!("estimates: {:.2}s", run_start.elapsed().as_secs_f64());
        let velocity = self.velocity_field(&prior, &reference);

        let prior_losses: Vec<f32> = curves.prior.iter().map(|p| p.1).collect();
        let tail = &prior_losses[prior_losses.len().saturating_sub(100)..];
        let evals = (cfg.eval.grid * cfg.eval.grid * cfg.eval.t_values) as f64;
        let data_nll = self.density.mean_nll(&data_samples);
        let sample_nll = self.density.mean_nll(&prior_samples);
        let (nll_init, nll_final) = (self.density.mean_nll(&y0), self.density.mean_nll(&y_final));
        let loaded = session.loaded().is_some();
        let prior_secs = timings.prior_secs;
        let summary = Summary {
            target: self.target.name.clone(),
            preset: format!("{:?}", cfg.preset).to_lowercase(),
            seed: cfg.seed,
            device: self.device_name.clone(),
            nll_method: self.density.method(),
            scale: self.target.scale,
            budget: budget_line(cfg, &prior_meta, loaded, align_cfg),
            prior: PriorSummary {
                steps: prior_meta.steps,
                final_loss: if tail.is_empty() {
                    f64::NAN
                } else {
                    tail.iter().map(|&v| v as f64).sum::<f64>() / tail.len() as f64
                },
                seconds: prior_secs,
                steps_per_sec: if prior_secs > 0.0 {
                    curves.prior.len() as f64 / prior_secs
                } else {
                    0.0
                },
                width: prior.width(),
                depth: prior.depth(),
                params: prior.num_params(),
                data_nll,
                sample_nll,
                model_nll_data,
                model_nll_samples,
                loaded,
            },
            align: AlignSummary {
                steps: align_cfg.steps,
                n_latents: align_cfg.n_latents,
                nll_init,
                nll_final,
                loss_final,
                reduction: align_cfg.reduction,
                seconds: timings.align_secs,
                steps_per_sec: align_cfg.steps as f64 / timings.align_secs.max(1e-9),
                nll_monitor_seconds: timings.monitor_secs,
            },
            heatmap: HeatmapSummary {
                grid: cfg.eval.grid,
                t_values: cfg.eval.t_values,
                pearson: pearson(&align_map.values, &nll_map.values),
                spearman: spearman(&align_map.values, &nll_map.values),
                seconds: heat_secs,
                evals_per_sec: evals / heat_secs.max(1e-9),
            },
            estimate,
            total_seconds: prior_secs
                + timings.align_secs
                + timings.monitor_secs
                + run_start.elapsed().as_secs_f64(),
        };
        Ok(ToyOutcome {
            summary,
            curves,
            snapshots,
            target_samples: reference,
            data_samples,
            prior_samples,
            nll_map,
            align_map,
            velocity,
            prior,
            prior_meta,
        })
    }
}

/// `summary.budget`: what the figures were made with, in one line.
fn budget_line(cfg: &ToyConfig, meta: &PriorMeta, loaded: bool, align: &AlignConfig) -> String {
    let schedule = match cfg.prior.schedule {
        Schedule::Constant => "constant".to_string(),
        Schedule::Cosine { warmup, .. } => format!("cosine, {warmup} warm-up"),
    };
    let ema = if cfg.prior.ema > 0.0 {
        format!(", EMA {}", cfg.prior.ema)
    } else {
        String::new()
    };
    format!(
        "prior {} x {}, {} steps of batch {} at lr {:e} ({schedule}{ema}){}; {} latents, {} alignment steps at lr {:e}, mc {}",
        meta.width,
        meta.depth,
        meta.steps,
        cfg.prior.batch,
        cfg.prior.lr,
        if loaded { ", loaded" } else { "" },
        align.n_latents,
        align.steps,
        align.lr,
        align.mc,
    )
}

#[cfg(test)]
mod tests {
    use burn::prelude::Device;

    use super::*;
    use crate::toy::{Plateau, Preset, TargetKind, ToyConfig};

    #[test]
    fn a_flat_loss_freezes_the_prior_before_its_budget() {
        let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
        (cfg.prior.width, cfg.prior.depth, cfg.prior.batch) = (16, 1, 64);
        cfg.prior.steps = 10_000;
        // No window gains 90 % on the one before it, so the first check (at `min_steps`) stops.
        cfg.prior.stop_when_flat = Some(Plateau {
            window: 20,
            min_gain: 0.9,
            min_steps: 60,
        });
        (cfg.align.n_latents, cfg.align.steps) = (10, 2);
        let run = Arc::new(ToyRun::new(cfg, Device::flex(), "cpu").unwrap());
        let mut session = ToySession::new(run);
        let mut starts = Vec::new();
        while session.stage() == SessionStage::Prior {
            for e in session.step().unwrap() {
                if let Event::AlignStart { prior_step, .. } = e {
                    starts.push(prior_step);
                }
            }
        }
        assert_eq!(starts, [60]);
        assert_eq!(session.prior_step(), 60);
        assert_eq!(session.stopped_flat(), Some(60));
        assert_eq!(session.curves().prior.len(), 60);
    }
}
