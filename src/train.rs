//! Training steps shared by every front-end: the prior's flow-matching step, the latents' alignment
//! step, learning-rate schedules and prior checkpoints.
//!
//! Each trainer advances one step per call, so the CLI, the GUI's worker thread and larger trainers
//! keep per-step control.

use std::path::{Path, PathBuf};

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::align::{align_loss, flow_loss};
use crate::config::{Reduction, Schedule};
use crate::error::{Error, Result};
use crate::flow::path::PathDraws;
use crate::flow::{VelocityMlp, VelocityMlpConfig};
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

/// Adam with the paper's betas (0.9, 0.999) and PyTorch's epsilon 1e-8 (burn's default is 1e-5).
fn adam() -> ModuleOptimizer {
    AdamConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .init()
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

/// Trains a velocity network by flow matching (SPEC section 1), one step per call.
pub struct PriorTrainer {
    model: VelocityMlp,
    optim: ModuleOptimizer,
    /// Steps taken so far.
    pub step: usize,
    lr: f64,
    schedule: Schedule,
    total: usize,
    reduction: Reduction,
    ema: Option<Ema<VelocityMlp>>,
}

impl PriorTrainer {
    /// A trainer for `model` (which must live on an autodiff device) over `total` steps.
    pub fn new(
        model: VelocityMlp,
        lr: f64,
        schedule: Schedule,
        total: usize,
        reduction: Reduction,
    ) -> Self {
        PriorTrainer {
            model,
            optim: adam(),
            step: 0,
            lr,
            schedule,
            total,
            reduction,
            ema: None,
        }
    }

    /// Keeps an exponential moving average of the weights with `decay` (0 disables it).
    pub fn with_ema(mut self, decay: f64) -> Self {
        self.ema = (decay > 0.0).then(|| Ema::new(&self.model, decay));
        self
    }

    /// The learning rate the next step will use.
    pub fn current_lr(&self) -> f64 {
        self.schedule.lr(self.lr, self.step, self.total)
    }

    /// One Adam step on the batch `x` with path draws `draws`; returns the loss before the step.
    ///
    /// # Shapes
    /// - `x`: `[batch, d]`
    pub fn train_step(&mut self, x: Tensor<2>, draws: &PathDraws) -> Result<f32> {
        let lr = self.current_lr();
        let loss = flow_loss(&self.model, x, draws, self.reduction);
        let value = finite_or_diverged(
            loss.clone().into_scalar::<f32>(),
            "prior training",
            self.step + 1,
            lr,
        )?;
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optim.step(lr, self.model.clone(), grads);
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model);
        }
        self.step += 1;
        Ok(value)
    }

    /// The network being trained (autodiff parameters).
    pub fn model(&self) -> &VelocityMlp {
        &self.model
    }

    /// The network to freeze for alignment: the EMA when one is kept, else the live weights,
    /// without autodiff.
    pub fn frozen(&self) -> VelocityMlp {
        match &self.ema {
            Some(ema) => ema.module.clone(),
            None => self.model.valid(),
        }
    }
}

/// An exponential moving average of a module's parameters: `ema = decay * ema + (1 - decay) * live`.
///
/// The average lives without autodiff; parameters are matched by their order in the module.
#[derive(Debug, Clone)]
pub struct Ema<M: Module> {
    /// The averaged module (no autodiff).
    pub module: M,
    /// Weight of the old average per update.
    pub decay: f64,
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
        }
    }

    /// Blends the live parameters into the average.
    pub fn update(&mut self, live: &M) {
        let mut collect = CollectParams(Vec::new());
        live.visit(&mut collect);
        let mut blend = BlendParams {
            live: collect.0.into_iter(),
            decay: self.decay,
        };
        self.module = self.module.clone().map(&mut blend);
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
        ema.update(&b);
        let v: Vec<f32> = ema.module.y.val().try_into_vec_as::<f32>().unwrap();
        assert_eq!(v, vec![1.5, 3.0]);
        ema.update(&b);
        let v: Vec<f32> = ema.module.y.val().try_into_vec_as::<f32>().unwrap();
        assert_eq!(v, vec![1.875, 3.75]);
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
