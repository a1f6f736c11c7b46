//! Training one module a step at a time: the optimiser and its schedule, gradient clipping, the
//! EMA, mixed precision, data-parallel shards, gradients averaged over MPI ranks, and the state as
//! bytes for checkpoints.
//!
//! Each trainer advances one step per call, so the CLI, the GUI's worker thread and the run
//! harness keep per-step control.

mod ema;
mod optim;
mod state;
pub mod steps;

use std::path::PathBuf;
use std::sync::Arc;

use burn::module::{ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;

pub use ema::Ema;
pub use optim::{DecayRule, OptimSpec, Schedule, clip_global_norm, undecayed_paths};
pub use state::TrainerState;
pub use steps::{LatentTrainer, Latents, PriorTrainer, Shard};

use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::params::{load_module_bytes, module_bytes};
use crate::precision::Precision;

/// Runs a training step `f`, turning a backend's out-of-memory panic into a one-line error that
/// names the `what` that did not fit and suggests half of `batch`; other panics propagate.
pub fn oom_guard<T>(what: &str, batch: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            let lower = msg.to_lowercase();
            if lower.contains("out of memory") || lower.contains("outofmemory") {
                Err(Error::OutOfMemory {
                    what: what.to_string(),
                    batch,
                })
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// A loss above this has diverged: flow-matching losses of normalised data are of order the dimension.
pub const DIVERGED_LOSS: f32 = 1e6;

pub(crate) fn finite_or_diverged(
    loss: f32,
    stage: &'static str,
    step: usize,
    lr: f64,
) -> Result<f32> {
    if loss.is_finite() && loss.abs() <= DIVERGED_LOSS {
        Ok(loss)
    } else {
        Err(Error::Diverged {
            stage,
            step,
            loss,
            lr,
        })
    }
}

/// Trains a module one optimiser step per call: Adam(W) with a learning-rate schedule, optional
/// global gradient clipping and an EMA of the weights. What a step's loss is belongs to the caller
/// (or to a specialised `impl`, like flow matching and alignment in [`steps`]); every trainer of
/// flowalign (the prior, the toy's latents, the autoencoder, its discriminator, the generator) is
/// one of these.
pub struct Trainer<M: Module> {
    model: M,
    optim: ModuleOptimizer,
    /// Steps taken so far.
    pub step: usize,
    lr: f64,
    schedule: Schedule,
    total: usize,
    ema: Option<Ema<M>>,
    spec: OptimSpec,
    /// Which parameters the weight decay reaches.
    decay: DecayRule,
    /// Other processes training the same model: gradients are averaged over them every step.
    comm: Option<Arc<Comm>>,
    /// The forward pass's dtype; the weights, gradients, optimiser state and EMA stay f32.
    precision: Precision,
}

/// Sums the per-shard gradients of each parameter on the parameter's device.
struct MergeGrads {
    parts: Vec<GradientsParams>,
    out: GradientsParams,
}

impl ModuleVisitor for MergeGrads {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let device = param.val().device().inner();
        let mut sum: Option<Tensor<D>> = None;
        for part in &mut self.parts {
            if let Some(g) = part.remove::<D>(param.id) {
                let g = g.to_device(&device);
                sum = Some(match sum {
                    Some(acc) => acc + g,
                    None => g,
                });
            }
        }
        if let Some(g) = sum {
            self.out.register(param.id, g);
        }
    }
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The loss before the step.
    pub loss: f32,
    /// The global gradient norm before clipping (`None` when clipping is off: it is not computed).
    pub grad_norm: Option<f32>,
    /// The learning rate the step used.
    pub lr: f64,
}

impl<M: Module> Trainer<M> {
    /// A trainer for `model` (which must live on an autodiff device) over `total` steps.
    pub fn new(model: M, lr: f64, schedule: Schedule, total: usize) -> Self {
        let optim = OptimSpec::ADAM.build(&model, &DecayRule::default());
        Trainer {
            model,
            optim,
            step: 0,
            lr,
            schedule,
            total,
            ema: None,
            spec: OptimSpec::ADAM,
            decay: DecayRule::default(),
            comm: None,
            precision: Precision::F32,
        }
    }

    /// Computes the forward pass at `precision` (see [`crate::precision`]); the state stays f32,
    /// so a run may change it between a checkpoint and its resume.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The forward pass's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The model to run a step's forward pass on: [`Trainer::model`] with its parameters cast to
    /// the compute dtype inside the autodiff graph (the model itself at f32). A loss built on it
    /// is what [`Trainer::step_loss`] expects; its inputs must be cast with
    /// [`Precision::input`] and its outputs back with [`Precision::output`].
    pub fn compute_model(&self) -> M {
        self.precision.cast_params(self.model.clone())
    }

    /// Uses `spec` instead of the toy's Adam (call before the first step). Its weight decay
    /// reaches the parameters of the trainer's [`DecayRule`] (matrices only, unless
    /// [`Trainer::with_decay_rule`] says otherwise).
    pub fn with_optim(mut self, spec: OptimSpec) -> Self {
        self.optim = spec.build(&self.model, &self.decay);
        self.spec = spec;
        self
    }

    /// Sets which parameters the weight decay reaches (call before the first step).
    pub fn with_decay_rule(mut self, rule: DecayRule) -> Self {
        self.optim = self.spec.build(&self.model, &rule);
        self.decay = rule;
        self
    }

    /// Keeps an exponential moving average of the weights with `decay` (0 disables it).
    pub fn with_ema(mut self, decay: f64) -> Self {
        self.ema = (decay > 0.0).then(|| Ema::new(&self.model, decay));
        self
    }

    /// Averages every step's gradients (and loss) over the ranks of `comm` before clipping, so
    /// each rank's loss must be the mean over its own equal share of the global batch.
    pub fn with_comm(mut self, comm: Arc<Comm>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// This rank's copy of rank 0's trainer: every rank of `comm` ends with rank 0's state
    /// (weights, EMA, optimiser, step) and from now on averages its gradients over `comm`. Returns
    /// the step the state was at.
    pub fn adopt(mut self, comm: &Arc<Comm>) -> Result<(Self, usize)> {
        let state = comm.leads().then(|| self.state_bytes()).transpose()?;
        let state = TrainerState::share(comm, state)?;
        if !comm.leads() {
            self.restore(&state)?;
        }
        Ok((self.with_comm(Arc::clone(comm)), state.step))
    }

    /// The ranks this trainer averages over, if any.
    pub fn comm(&self) -> Option<&Arc<Comm>> {
        self.comm.as_ref()
    }

    /// The learning rate the next step will use.
    pub fn current_lr(&self) -> f64 {
        self.schedule.lr(self.lr, self.step, self.total)
    }

    /// One optimiser step down `loss` (a scalar computed from [`Trainer::model`] or
    /// [`Trainer::compute_model`]); `stage` names the run in a divergence error.
    pub fn step_loss(&mut self, loss: Tensor<1>, stage: &'static str) -> Result<StepStats> {
        let lr = self.current_lr();
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.apply(value, grads, lr, stage)
    }

    /// One data-parallel optimiser step: for each `(device, data)` shard, `loss(replica, data)` runs
    /// on a replica of the model forked to that device (one thread per shard), its parameters at
    /// the compute precision (cast the inputs with [`Precision::input`], the outputs back with
    /// [`Precision::output`]), and returns the shard's loss, already weighted by its share of the
    /// batch, and whatever else the caller wants back. The gradients are summed on the model's device, clipped and applied there; the step's
    /// loss is the sum of the shards'.
    pub fn step_sharded<S: Send, X: Send>(
        &mut self,
        shards: Vec<(Device, S)>,
        stage: &'static str,
        loss: impl Fn(&M, S) -> (Tensor<1>, X) + Sync,
    ) -> Result<(StepStats, Vec<X>)>
    where
        M: Send,
    {
        let lr = self.current_lr();
        let loss = &loss;
        let precision = self.precision;
        let results: Vec<(f32, GradientsParams, X)> = std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .into_iter()
                .map(|(device, data)| {
                    let replica = self.model.clone().fork(&device.autodiff());
                    scope.spawn(move || {
                        let compute = precision.cast_params(replica.clone());
                        let (l, extra) = loss(&compute, data);
                        let value = l.clone().into_scalar::<f32>();
                        let grads = GradientsParams::from_grads(l.backward(), &replica);
                        (value, grads, extra)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let value: f32 = results.iter().map(|r| r.0).sum();
        let mut parts = Vec::with_capacity(results.len());
        let mut extras = Vec::with_capacity(results.len());
        for (_, g, x) in results {
            parts.push(g);
            extras.push(x);
        }
        let mut merge = MergeGrads {
            parts,
            out: GradientsParams::new(),
        };
        self.model.visit(&mut merge);
        Ok((self.apply(value, merge.out, lr, stage)?, extras))
    }

    /// Averages over the ranks (if any), checks the loss, clips, steps the optimiser and updates
    /// the EMA.
    fn apply(
        &mut self,
        loss: f32,
        mut grads: GradientsParams,
        lr: f64,
        stage: &'static str,
    ) -> Result<StepStats> {
        let loss = match &self.comm {
            Some(comm) => dist::mean_grads(comm, &self.model, &mut grads, loss, self.step + 1)?,
            None => loss,
        };
        // Every rank sees the same mean loss, so every rank stops here together.
        let loss = finite_or_diverged(loss, stage, self.step + 1, lr)?;
        let clip = self.spec.grad_clip;
        let grad_norm = (clip > 0.0).then(|| clip_global_norm(&self.model, &mut grads, clip));
        self.model = self.optim.step(lr, self.model.clone(), grads);
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model);
        }
        self.step += 1;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
        })
    }

    /// The training state as bytes: (live weights, EMA weights, optimiser state), each in burn's
    /// burnpack format with parameter ids, so [`Trainer::restore`] continues exactly.
    pub fn state_bytes(&self) -> Result<TrainerState> {
        let optim = self.optim.into_bytes().map_err(|e| Error::Checkpoint {
            path: PathBuf::from("<optimiser>"),
            msg: format!("could not serialise the optimiser state: {e}"),
        })?;
        Ok(TrainerState {
            step: self.step,
            model: module_bytes(&self.model)?,
            ema: self
                .ema
                .as_ref()
                .map(|e| module_bytes(&e.module))
                .transpose()?,
            optim: optim.to_vec(),
        })
    }

    /// Continues from `state` (written by [`Trainer::state_bytes`] for the same architecture).
    pub fn restore(&mut self, state: &TrainerState) -> Result<()> {
        load_module_bytes(&mut self.model, &state.model, "model")?;
        match (&mut self.ema, &state.ema) {
            (Some(ema), Some(bytes)) => {
                load_module_bytes(&mut ema.module, bytes, "EMA")?;
                ema.updates = state.step as u64;
            }
            (None, None) => {}
            _ => {
                return Err(Error::setting(
                    "train.ema",
                    "the checkpoint and this run disagree on keeping an EMA; keep it as it was",
                ));
            }
        }
        self.optim = self
            .spec
            .build(&self.model, &self.decay)
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(state.optim.clone()))
            .map_err(|e| Error::Checkpoint {
                path: PathBuf::from("<optimiser>"),
                msg: format!("unreadable optimiser state: {e}"),
            })?;
        self.step = state.step;
        Ok(())
    }

    /// The module being trained (autodiff parameters).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The network to freeze for alignment: the EMA when one is kept, else the live weights,
    /// without autodiff.
    pub fn frozen(&self) -> M {
        match &self.ema {
            Some(ema) => ema.module.clone(),
            None => self.model.valid(),
        }
    }
}

#[cfg(test)]
mod tests;
