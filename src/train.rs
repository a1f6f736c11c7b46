//! Training steps shared by every front-end: the prior's flow-matching step, the latents' alignment
//! step, learning-rate schedules and prior checkpoints.
//!
//! Each trainer advances one step per call, so the CLI, the GUI's worker thread and larger trainers
//! keep per-step control.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::align::{align_loss, flow_loss};
use crate::config::{Reduction, Schedule};
use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::flow::path::PathDraws;
use crate::flow::{VelocityMlp, VelocityMlpConfig};
use crate::precision::{AtPrecision, Precision};
use crate::report::write_atomic;
use crate::rng::Rng;

impl Schedule {
    /// The learning rate at `step` (0-based) of `total` steps for base rate `lr`.
    pub fn lr(&self, lr: f64, step: usize, total: usize) -> f64 {
        match *self {
            Schedule::Constant => lr,
            Schedule::Cosine { warmup, final_frac } => {
                if step < warmup {
                    return lr * (step + 1) as f64 / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                lr * (final_frac + (1.0 - final_frac) * cosine)
            }
        }
    }
}

/// The optimiser of a training run: Adam(W) with optional global gradient-norm clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSpec {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (AdamW); 0 gives plain Adam.
    pub weight_decay: f32,
    /// Clip the global L2 norm of all gradients to this value (PyTorch's `clip_grad_norm_`); 0 = off.
    pub grad_clip: f32,
}

impl OptimSpec {
    /// The toy's Adam: betas (0.9, 0.999), PyTorch's epsilon 1e-8 (burn's default is 1e-5), no clipping.
    pub const ADAM: OptimSpec = OptimSpec {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        grad_clip: 0.0,
    };

    /// SPEC section 6: AdamW (0.9, 0.95), weight decay 1e-4, gradient-norm clip 1.0.
    pub const PAPER_ADAMW: OptimSpec = OptimSpec {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 1e-4,
        grad_clip: 1.0,
    };

    fn build(&self) -> ModuleOptimizer {
        if self.weight_decay == 0.0 {
            AdamConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.eps)
                .init()
        } else {
            AdamWConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.eps)
                .with_weight_decay(self.weight_decay)
                .init()
        }
    }
}

fn adam() -> ModuleOptimizer {
    OptimSpec::ADAM.build()
}

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
                Err(Error::Device(format!(
                    "out of memory at {what}; try --batch {}",
                    (batch / 2).max(1)
                )))
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// Sums the squared gradients of a module's float parameters.
struct GradSquares<'a> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<1>>,
}

impl ModuleVisitor for GradSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sums.push(g.square().sum());
        }
    }
}

/// Multiplies every gradient of a module's float parameters by `factor`.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f32,
}

impl ModuleVisitor for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}

/// The global L2 norm of `grads` over `module`'s parameters; when above `max_norm` (> 0), every
/// gradient is scaled by `max_norm / (norm + 1e-6)` as PyTorch's `clip_grad_norm_` does.
///
/// Returns the norm before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    let mut squares = GradSquares {
        grads,
        sums: Vec::new(),
    };
    module.visit(&mut squares);
    if squares.sums.is_empty() {
        return 0.0;
    }
    let norm = Tensor::cat(squares.sums, 0)
        .sum()
        .sqrt()
        .into_scalar::<f32>();
    if max_norm > 0.0 && norm > max_norm {
        module.visit(&mut ScaleGrads {
            grads,
            factor: max_norm / (norm + 1e-6),
        });
    }
    norm
}

/// A loss above this has diverged: flow-matching losses of normalised data are of order the dimension.
pub const DIVERGED_LOSS: f32 = 1e6;

fn finite_or_diverged(loss: f32, stage: &'static str, step: usize, lr: f64) -> Result<f32> {
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
/// (or to a specialised `impl`, like the prior's flow matching below).
pub struct Trainer<M: Module> {
    model: M,
    optim: ModuleOptimizer,
    /// Steps taken so far.
    pub step: usize,
    lr: f64,
    schedule: Schedule,
    total: usize,
    reduction: Reduction,
    ema: Option<Ema<M>>,
    spec: OptimSpec,
    /// Other processes training the same model: gradients are averaged over them every step.
    comm: Option<Arc<Comm>>,
    /// The forward pass's dtype; the weights, gradients, optimiser state and EMA stay f32.
    precision: Precision,
}

/// Trains a velocity network by flow matching (SPEC section 1), one step per call.
pub type PriorTrainer = Trainer<VelocityMlp>;

/// One replica's part of a data-parallel step (see [`PriorTrainer::train_step_sharded`]).
#[derive(Debug, Clone)]
pub struct Shard {
    /// Where the replica runs (without autodiff).
    pub device: Device,
    /// `[rows, d]` on `device` with autodiff.
    pub x: Tensor<2>,
    /// One (t, eps) per row of `x`, on `device` with autodiff.
    pub draws: PathDraws,
    /// The shard's share of the whole batch (its rows / all rows).
    pub weight: f32,
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
    pub fn new(model: M, lr: f64, schedule: Schedule, total: usize, reduction: Reduction) -> Self {
        Trainer {
            model,
            optim: adam(),
            step: 0,
            lr,
            schedule,
            total,
            reduction,
            ema: None,
            spec: OptimSpec::ADAM,
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

    /// Uses `spec` instead of the toy's Adam (call before the first step).
    pub fn with_optim(mut self, spec: OptimSpec) -> Self {
        self.optim = spec.build();
        self.spec = spec;
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
            Some(comm) => {
                crate::dist::mean_grads(comm, &self.model, &mut grads, loss, self.step + 1)?
            }
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
    /// burnpack format with parameter ids, so [`PriorTrainer::restore`] continues exactly.
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

    /// Continues from `state` (written by [`PriorTrainer::state_bytes`] for the same architecture).
    pub fn restore(&mut self, state: &TrainerState) -> Result<()> {
        load_module_bytes(&mut self.model, &state.model, "model")?;
        match (&mut self.ema, &state.ema) {
            (Some(ema), Some(bytes)) => {
                load_module_bytes(&mut ema.module, bytes, "EMA")?;
                ema.updates = state.step as u64;
            }
            (None, None) => {}
            _ => {
                return Err(Error::Config(
                    "the checkpoint and this run disagree on keeping an EMA; keep train.ema as it was".into(),
                ));
            }
        }
        self.optim = self
            .spec
            .build()
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

impl Trainer<VelocityMlp> {
    /// One optimiser step on the batch `x` with path draws `draws` (one row of `x` per draw).
    ///
    /// # Shapes
    /// - `x`: `[batch, d]`; `draws`: `t [batch]`, `eps [batch, d]`
    pub fn train_step(&mut self, x: Tensor<2>, draws: &PathDraws) -> Result<StepStats> {
        let compute = self.compute_model();
        let field = AtPrecision {
            field: &compute,
            precision: self.precision,
        };
        let loss = flow_loss(&field, x, draws, self.reduction);
        self.step_loss(loss, "prior training")
    }

    /// One data-parallel flow-matching step over `shards` (see [`Trainer::step_sharded`]).
    ///
    /// With shards that partition a batch, this is [`PriorTrainer::train_step`] on the whole batch up
    /// to float summation order.
    pub fn train_step_sharded(&mut self, shards: Vec<Shard>) -> Result<StepStats> {
        let (reduction, precision) = (self.reduction, self.precision);
        let shards = shards.into_iter().map(|s| (s.device.clone(), s)).collect();
        let (stats, _) = self.step_sharded(shards, "prior training", |replica, shard: Shard| {
            let field = AtPrecision {
                field: replica,
                precision,
            };
            (
                flow_loss(&field, shard.x, &shard.draws, reduction) * shard.weight,
                (),
            )
        })?;
        Ok(stats)
    }
}

/// A trainer's complete state, as bytes (see [`PriorTrainer::state_bytes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerState {
    /// Steps taken.
    pub step: usize,
    /// Live weights (burnpack).
    pub model: Vec<u8>,
    /// EMA weights (burnpack), when an EMA is kept.
    pub ema: Option<Vec<u8>>,
    /// Optimiser moments (burnpack).
    pub optim: Vec<u8>,
}

fn module_bytes<M: Module>(module: &M) -> Result<Vec<u8>> {
    let mut store = BurnpackStore::from_bytes(None);
    let bad = |e: String| Error::Checkpoint {
        path: PathBuf::from("<weights>"),
        msg: format!("could not serialise: {e}"),
    };
    module
        .save_into(&mut store)
        .map_err(|e| bad(e.to_string()))?;
    Ok(store.get_bytes().map_err(|e| bad(e.to_string()))?.to_vec())
}

pub(crate) fn load_module_bytes<M: Module>(module: &mut M, bytes: &[u8], what: &str) -> Result<()> {
    let mut store =
        BurnpackStore::from_bytes(Some(burn::tensor::Bytes::from_bytes_vec(bytes.to_vec())));
    let applied = module
        .load_from(&mut store)
        .map_err(|e| Error::Checkpoint {
            path: PathBuf::from(format!("<{what}>")),
            msg: format!("unreadable ({})", crate::config::one_line(&e.to_string())),
        })?;
    if !applied.errors.is_empty() || !applied.missing.is_empty() {
        return Err(Error::Checkpoint {
            path: PathBuf::from(format!("<{what}>")),
            msg: format!(
                "does not match this network ({} missing, {} mismatched tensors)",
                applied.missing.len(),
                applied.errors.len()
            ),
        });
    }
    Ok(())
}

/// An exponential moving average of a module's parameters: `ema = d * ema + (1 - d) * live`.
///
/// The decay warms up as in diffusers' `EMAModel`: update `n` (from 0) uses
/// `d = min(decay, (1 + n) / (10 + n))`, so a short run's average is not stuck near the
/// initial weights. The average lives without autodiff; parameters are matched by their order in
/// the module.
#[derive(Debug, Clone)]
pub struct Ema<M: Module> {
    /// The averaged module (no autodiff).
    pub module: M,
    /// Weight of the old average per update, once warmed up.
    pub decay: f64,
    /// Updates so far.
    pub updates: u64,
}

/// Every float parameter of `module`, flattened in visiting order (for checksums and comparisons).
pub fn param_values<M: Module>(module: &M) -> Vec<f32> {
    let mut collect = CollectParams(Vec::new());
    module.visit(&mut collect);
    collect
        .0
        .into_iter()
        .flat_map(|t| t.try_into_vec_as::<f32>().expect("f32 readback"))
        .collect()
}

struct CollectParams(Vec<Tensor<1>>);

impl ModuleVisitor for CollectParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().inner().reshape([-1]));
    }
}

struct BlendParams {
    live: std::vec::IntoIter<Tensor<1>>,
    decay: f64,
}

impl ModuleMapper for BlendParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let live = self
            .live
            .next()
            .expect("the EMA and the live module have the same parameters");
        let decay = self.decay;
        param.map(|avg| {
            let shape = avg.shape();
            avg * decay + live.reshape(shape) * (1.0 - decay)
        })
    }
}

impl<M: Module> Ema<M> {
    /// Starts the average at the live module's current values.
    pub fn new(live: &M, decay: f64) -> Self {
        Ema {
            module: live.valid(),
            decay,
            updates: 0,
        }
    }

    /// Blends the live parameters into the average.
    pub fn update(&mut self, live: &M) {
        let mut collect = CollectParams(Vec::new());
        live.visit(&mut collect);
        let n = self.updates as f64;
        let mut blend = BlendParams {
            live: collect.0.into_iter(),
            decay: self.decay.min((1.0 + n) / (10.0 + n)),
        };
        self.module = self.module.clone().map(&mut blend);
        self.updates += 1;
    }
}

/// Learnable latents y: the only parameters of the alignment stage.
#[derive(Module, Debug)]
pub struct Latents {
    /// `[n, d]`
    pub y: Param<Tensor<2>>,
}

/// Aligns latents to a frozen prior by descending `L_align` (SPEC section 2), one step per call.
pub struct Aligner {
    latents: Latents,
    optim: ModuleOptimizer,
    /// Steps taken so far.
    pub step: usize,
    lr: f64,
    mc: usize,
    reduction: Reduction,
}

impl Aligner {
    /// Starts from the flat rows `y0` of dimension `d`, on `device` (autodiff is enabled here).
    pub fn new(
        y0: &[f32],
        d: usize,
        lr: f64,
        mc: usize,
        reduction: Reduction,
        device: &Device,
    ) -> Self {
        let y = crate::flow::rows_to_tensor(y0, d, &device.clone().autodiff());
        Aligner {
            latents: Latents {
                y: Param::from_tensor(y),
            },
            optim: adam(),
            step: 0,
            lr,
            mc,
            reduction,
        }
    }

    /// One Adam step on `L_align` against the frozen `prior` (plain, non-autodiff parameters);
    /// returns the loss before the step.
    pub fn align_step(&mut self, prior: &VelocityMlp, rng: &mut Rng) -> Result<f32> {
        let loss = align_loss(prior, self.latents.y.val(), self.mc, self.reduction, rng);
        let value = finite_or_diverged(
            loss.clone().into_scalar::<f32>(),
            "alignment",
            self.step + 1,
            self.lr,
        )?;
        let grads = GradientsParams::from_grads(loss.backward(), &self.latents);
        self.latents = self.optim.step(self.lr, self.latents.clone(), grads);
        self.step += 1;
        Ok(value)
    }

    /// The current latents as flat rows.
    pub fn latents(&self) -> Vec<f32> {
        crate::flow::tensor_to_rows(self.latents.y.val().inner())
    }
}

/// What a prior checkpoint's TOML says about the network and its training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorMeta {
    /// Data dimension d.
    pub dim: usize,
    /// Hidden width C.
    pub width: usize,
    /// Residual blocks.
    pub depth: usize,
    /// Target the prior was trained on.
    pub target: String,
    /// Normalisation scale of that target.
    pub scale: f32,
    /// Training steps taken.
    pub steps: usize,
    /// Seed of the run.
    pub seed: u64,
}

/// The weights and metadata file names of a prior checkpoint in folder `dir`.
pub fn prior_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("prior.safetensors"), dir.join("prior.toml"))
}

/// Saves `model` and `meta` atomically as `prior.safetensors` and `prior.toml` in `dir`.
pub fn save_prior(dir: &Path, model: &VelocityMlp, meta: &PriorMeta) -> Result<()> {
    let (weights, meta_path) = prior_paths(dir);
    let mut store = SafetensorsStore::from_bytes(None);
    model.save_into(&mut store).map_err(|e| Error::Checkpoint {
        path: weights.clone(),
        msg: format!("could not serialise: {e}"),
    })?;
    let bytes = store.get_bytes().map_err(|e| Error::Checkpoint {
        path: weights.clone(),
        msg: format!("could not serialise: {e}"),
    })?;
    write_atomic(&weights, &bytes)?;
    let text = toml::to_string_pretty(meta).expect("PriorMeta serialises");
    write_atomic(&meta_path, text.as_bytes())
}

/// Loads a prior saved by [`save_prior`]; `path` is its folder or its `.safetensors` file.
pub fn load_prior(path: &Path, device: &Device) -> Result<(VelocityMlp, PriorMeta)> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let (weights, meta_path) = if path.is_dir() {
        prior_paths(&dir)
    } else {
        (path.to_path_buf(), path.with_extension("toml"))
    };
    let bad = |p: &Path, msg: String| Error::Checkpoint {
        path: p.to_path_buf(),
        msg,
    };
    if !weights.is_file() {
        return Err(bad(
            &weights,
            "not found; pass the folder of a run that trained a prior (it holds prior.safetensors)"
                .into(),
        ));
    }
    let text = std::fs::read_to_string(&meta_path).map_err(|e| {
        bad(
            &meta_path,
            format!("{e}; the prior's metadata must sit next to its weights"),
        )
    })?;
    let meta: PriorMeta = toml::from_str(&text).map_err(|e| {
        bad(
            &meta_path,
            format!(
                "malformed metadata: {}",
                crate::config::one_line(&e.to_string())
            ),
        )
    })?;
    let bytes = std::fs::read(&weights).map_err(|e| bad(&weights, e.to_string()))?;
    let mut rng = crate::rng::rng_for(0, crate::rng::Stream::Init, 0);
    let mut model = VelocityMlpConfig::new(meta.dim, meta.width, meta.depth).init(&mut rng, device);
    let mut store = SafetensorsStore::from_bytes(Some(bytes)).validate(true);
    let applied = model.load_from(&mut store).map_err(|e| {
        bad(
            &weights,
            format!(
                "unreadable or truncated ({}); retrain the prior or restore the file",
                crate::config::one_line(&e.to_string())
            ),
        )
    })?;
    if !applied.errors.is_empty() || !applied.missing.is_empty() {
        return Err(bad(
            &weights,
            format!(
                "does not match the {}x{} network in {} ({} missing, {} mismatched tensors); retrain the prior",
                meta.width,
                meta.depth,
                meta_path.display(),
                applied.missing.len(),
                applied.errors.len()
            ),
        ));
    }
    Ok((model, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_panics_become_errors_and_others_propagate() {
        let err = oom_guard("batch 64", 64, || -> Result<()> {
            panic!("CUDA_ERROR_OUT_OF_MEMORY: out of memory")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("batch 64") && err.contains("--batch 32"),
            "{err}"
        );
        assert_eq!(oom_guard("b", 2, || Ok(7)).unwrap(), 7);
        let other =
            std::panic::catch_unwind(|| oom_guard("b", 2, || -> Result<()> { panic!("a bug") }));
        assert!(other.is_err());
    }

    #[test]
    fn ema_blends_parameters() {
        let dev = Device::flex();
        let a = Latents {
            y: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, 2.0], [1, 2]),
                &dev,
            )),
        };
        let b = Latents {
            y: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![3.0f32, 6.0], [1, 2]),
                &dev,
            )),
        };
        let mut ema = Ema::new(&a, 0.75);
        ema.updates = 100; // past the warm-up: (1 + 100) / (10 + 100) > 0.75
        ema.update(&b);
        let v: Vec<f32> = ema.module.y.val().try_into_vec_as::<f32>().unwrap();
        assert_eq!(v, vec![1.5, 3.0]);
        ema.update(&b);
        let v: Vec<f32> = ema.module.y.val().try_into_vec_as::<f32>().unwrap();
        assert_eq!(v, vec![1.875, 3.75]);
        // The first update of a fresh average uses decay min(0.75, 1 / 10) = 0.1.
        let mut fresh = Ema::new(&a, 0.75);
        fresh.update(&b);
        let v: Vec<f32> = fresh.module.y.val().try_into_vec_as::<f32>().unwrap();
        assert!(
            (v[0] - 2.8).abs() < 1e-6 && (v[1] - 5.6).abs() < 1e-6,
            "{v:?}"
        );
    }

    /// Every tensor of a trainer's state (live weights, EMA, optimiser moments) and its dtype.
    fn state_dtypes(state: &TrainerState) -> Vec<(String, burn::tensor::DType)> {
        let mut out = Vec::new();
        let parts = [Some(&state.model), state.ema.as_ref(), Some(&state.optim)];
        for (what, bytes) in ["model", "ema", "optim"].iter().zip(parts) {
            let bytes = burn::tensor::Bytes::from_bytes_vec(bytes.expect("kept").clone());
            let reader = burn::store::burn_pack::Reader::from_bytes(bytes).unwrap();
            for t in reader.into_tensors().unwrap() {
                let (name, dtype, _, _, _) = t.into_parts().unwrap();
                out.push((format!("{what}/{name}"), dtype));
            }
        }
        out
    }

    /// Rows of a fixed 4-d Gaussian with distinct means and scales, and their (t, eps) draws.
    fn gaussian_batch(step: u64, n: usize, dev: &Device) -> (Tensor<2>, PathDraws) {
        let mut rng = crate::rng::rng_for(9, crate::rng::Stream::Prior, step);
        let rows: Vec<f32> = (0..n * 4)
            .map(|i| {
                let j = (i % 4) as f32;
                let e: f32 = rand::RngExt::sample(&mut rng, rand_distr::StandardNormal);
                (1.0 - 0.5 * j) + (0.3 + 0.2 * j) * e
            })
            .collect();
        let x = crate::flow::rows_to_tensor(&rows, 4, dev);
        let draws = PathDraws::sample(&mut rng, n, 4, dev);
        (x, draws)
    }

    /// Every gradient of `model`'s parameters, flattened in visiting order, with its dtype.
    fn flat_grads(model: &VelocityMlp, grads: &GradientsParams) -> Vec<f32> {
        struct Flat<'a>(&'a GradientsParams, Vec<f32>);
        impl ModuleVisitor for Flat<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let g = self
                    .0
                    .get::<D>(param.id)
                    .expect("every parameter has a gradient");
                assert_eq!(
                    g.dtype(),
                    burn::tensor::DType::F32,
                    "gradients reach the optimiser in f32"
                );
                self.1.extend(g.try_into_vec_as::<f32>().unwrap());
            }
        }
        let mut flat = Flat(grads, Vec::new());
        model.visit(&mut flat);
        flat.1
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let diff: f32 = a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum();
        let norm: f32 = b.iter().map(|b| b * b).sum();
        (diff / norm).sqrt()
    }

    fn paper_trainer(precision: Precision, steps: usize, dev: &Device) -> PriorTrainer {
        let mut rng = crate::rng::rng_for(5, crate::rng::Stream::Init, 0);
        let model = VelocityMlpConfig::new(4, 64, 2).init(&mut rng, &dev.clone().autodiff());
        Trainer::new(model, 3e-3, Schedule::Constant, steps, Reduction::Mean)
            .with_optim(OptimSpec::PAPER_ADAMW)
            .with_ema(0.99)
            .with_precision(precision)
    }

    #[test]
    fn bf16_loss_and_gradients_match_f32_within_bf16_tolerance() {
        let dev = Device::flex();
        let ad = dev.clone().autodiff();
        // A few f32 steps first, so the zero-initialised modulations and output carry weights and
        // every parameter gets a real gradient.
        let mut trainer = paper_trainer(Precision::F32, 100, &dev);
        for step in 0..20 {
            let (x, draws) = gaussian_batch(step, 256, &ad);
            trainer.train_step(x, &draws).unwrap();
        }
        let model = trainer.model().clone();
        let (x, draws) = gaussian_batch(99, 512, &ad);
        let at = |precision: Precision| {
            let compute = precision.cast_params(model.clone());
            let field = AtPrecision {
                field: &compute,
                precision,
            };
            let loss = flow_loss(&field, x.clone(), &draws, Reduction::Mean);
            assert_eq!(loss.dtype(), burn::tensor::DType::F32);
            let value = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            (value, flat_grads(&model, &grads))
        };
        let (l32, g32) = at(Precision::F32);
        let (l16, g16) = at(Precision::Bf16);
        assert!(
            (l16 - l32).abs() < 1e-2 * l32,
            "loss bf16 {l16} vs f32 {l32}"
        );
        assert_eq!(g16.len(), g32.len());
        let err = rel_err(&g16, &g32);
        assert!(err > 0.0 && err < 3e-2, "gradient relative error {err}");
    }

    #[test]
    fn bf16_training_learns_and_keeps_weights_moments_and_ema_in_f32() {
        let dev = Device::flex();
        let ad = dev.clone().autodiff();
        let steps = 150;
        let mut trainer = paper_trainer(Precision::Bf16, steps, &dev);
        let mut losses = Vec::new();
        for step in 0..steps as u64 {
            let (x, draws) = gaussian_batch(step, 256, &ad);
            let stats = trainer.train_step(x, &draws).unwrap();
            assert!(stats.grad_norm.is_some_and(f32::is_finite));
            losses.push(stats.loss);
        }
        let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
        let (first, last) = (mean(&losses[..10]), mean(&losses[steps - 20..]));
        assert!(last < 0.8 * first, "loss {first} -> {last}");
        let state = trainer.state_bytes().unwrap();
        let dtypes = state_dtypes(&state);
        assert!(dtypes.iter().any(|(n, _)| n.starts_with("optim/")));
        assert!(dtypes.iter().any(|(n, _)| n.starts_with("ema/")));
        for (name, dtype) in &dtypes {
            assert_eq!(*dtype, burn::tensor::DType::F32, "{name}");
        }
        // The frozen prior (the EMA) is f32 and runs without any cast.
        let frozen = trainer.frozen();
        let v = frozen.forward_at(Tensor::zeros([3, 4], &dev), 0.5);
        assert_eq!(v.dtype(), burn::tensor::DType::F32);
    }

    #[test]
    fn a_bf16_checkpoint_resumes_at_f32_and_back() {
        // The state is f32 whatever the compute precision, so a resume may change it.
        let dev = Device::flex();
        let ad = dev.clone().autodiff();
        let mut a = paper_trainer(Precision::Bf16, 20, &dev);
        for step in 0..5 {
            let (x, draws) = gaussian_batch(step, 64, &ad);
            a.train_step(x, &draws).unwrap();
        }
        let mut b = paper_trainer(Precision::F32, 20, &dev);
        b.restore(&a.state_bytes().unwrap()).unwrap();
        assert_eq!(param_values(b.model()), param_values(a.model()));
        let (x, draws) = gaussian_batch(5, 64, &ad);
        b.train_step(x, &draws).unwrap();
        let mut c = paper_trainer(Precision::Bf16, 20, &dev);
        c.restore(&b.state_bytes().unwrap()).unwrap();
        let (x, draws) = gaussian_batch(6, 64, &ad);
        assert!(c.train_step(x, &draws).unwrap().loss.is_finite());
        assert_eq!(c.step, 7);
    }

    #[test]
    fn bf16_sharded_step_matches_the_one_device_step() {
        let dev = Device::flex();
        let ad = dev.clone().autodiff();
        let (x, draws) = gaussian_batch(0, 128, &ad);
        let mut one = paper_trainer(Precision::Bf16, 10, &dev);
        let whole = one.train_step(x.clone(), &draws).unwrap();
        let mut two = paper_trainer(Precision::Bf16, 10, &dev);
        let shards = (0..2)
            .map(|i| {
                let rows = i * 64..(i + 1) * 64;
                Shard {
                    device: dev.clone(),
                    x: x.clone().slice(rows.clone()),
                    draws: PathDraws {
                        t: draws.t.clone().slice(rows.clone()),
                        eps: draws.eps.clone().slice(rows),
                    },
                    weight: 0.5,
                }
            })
            .collect();
        let split = two.train_step_sharded(shards).unwrap();
        assert!((split.loss - whole.loss).abs() < 1e-2 * whole.loss);
        let (a, b) = (param_values(one.model()), param_values(two.model()));
        assert!(rel_err(&b, &a) < 1e-2, "{}", rel_err(&b, &a));
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule::Cosine {
            warmup: 10,
            final_frac: 0.1,
        };
        assert!((s.lr(1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((s.lr(1.0, 9, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 60, 110) - 0.55).abs() < 1e-12);
        assert!((s.lr(1.0, 110, 110) - 0.1).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(0.3, 77, 100), 0.3);
    }
}
