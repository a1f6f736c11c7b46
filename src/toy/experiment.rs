//! The toy experiment (METHOD.md section 5): a configured target with its density on a device
//! ([`ToyRun`]), the landscapes of a prior over it, and the numbers and plain data a finished run
//! reports ([`ToyOutcome`]; the session module evaluates a session into one).

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use rand::RngExt;
use rand_distr::StandardNormal;
use serde::Serialize;

use super::config::{AlignConfig, LatentInit, ToyConfig, View};
use super::density::Density;
use super::events::Curves;
use super::targets::Target;
use crate::align::{Reduction, align_heatmap, bound};
use crate::closed_form::base_term;
use crate::error::{Error, Result};
use crate::flow::likelihood::log_prob;
use crate::flow::path::PathDraws;
use crate::flow::solver::{Solver, integrate_with};
use crate::flow::store::PriorMeta;
use crate::flow::{
    FrozenPrior, VelocityField, VelocityMlp, VelocityMlpConfig, rows_to_tensor, tensor_to_rows,
};
use crate::grid::{Heatmap, Point, Range2, linspace, to_points};
use crate::rng::{Rng, Stream, rng_for};
use crate::stats::mean_sem;
use crate::train::PriorTrainer;

/// Mean NLL of y before and after alignment, and the step timings.
#[derive(Debug, Clone, Serialize)]
pub struct PriorSummary {
    pub steps: usize,
    /// Mean flow-matching loss over the last 100 steps (or all, if fewer).
    pub final_loss: f64,
    pub seconds: f64,
    pub steps_per_sec: f64,
    pub width: usize,
    pub depth: usize,
    pub params: usize,
    /// Mean NLL of data samples under the target density.
    pub data_nll: f64,
    /// Mean NLL of prior samples (Euler ODE) under the target density.
    pub sample_nll: f64,
    /// The prior's own exact NLL (ODE) of data samples.
    pub model_nll_data: f64,
    /// The prior's own exact NLL (ODE) of its samples.
    pub model_nll_samples: f64,
    /// Whether the prior was loaded from a checkpoint instead of trained.
    pub loaded: bool,
}

/// The alignment stage's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct AlignSummary {
    pub steps: usize,
    pub n_latents: usize,
    pub nll_init: f64,
    pub nll_final: f64,
    /// L_align of the final latents (20 draws per latent), in `reduction` form.
    pub loss_final: f64,
    pub reduction: Reduction,
    pub seconds: f64,
    pub steps_per_sec: f64,
    /// Seconds spent computing the per-step NLL curve (not in `seconds`).
    pub nll_monitor_seconds: f64,
}

/// The heatmaps' agreement.
#[derive(Debug, Clone, Serialize)]
pub struct HeatmapSummary {
    pub grid: usize,
    pub t_values: usize,
    pub pearson: f64,
    pub spearman: f64,
    /// Seconds for the L_align heatmap.
    pub seconds: f64,
    pub evals_per_sec: f64,
}

/// One estimate of `log p(y)` against the prior's exact log-likelihood, over the latents.
#[derive(Debug, Clone, Serialize)]
pub struct EstimateVsLogP {
    /// Mean of the estimate over the latents.
    pub mean: f64,
    /// Standard error of `mean` from the Monte Carlo draws.
    pub sem: f64,
    /// Mean over the latents of `log p(y)` minus the estimate: positive when it stays below
    /// `log p` on average.
    pub mean_gap: f64,
    /// Latents where the estimate exceeds `log p` by more than 3 standard errors.
    pub violations: usize,
    /// Largest `(estimate - log p) / sem` over the latents (negative when it stays below everywhere).
    pub max_excess_sem: f64,
}

/// METHOD.md section 3 on the first `points` final latents: `C(y) - L_align(y)`, which the paper's
/// Proposition 1 calls a lower bound on `log p(y)` and which is not one, and its variant with the
/// base term, each against the prior's exact log-likelihood.
#[derive(Debug, Clone, Serialize)]
pub struct EstimateSummary {
    /// What the two estimates are, in words, for a reader of `summary.json`.
    pub note: &'static str,
    pub points: usize,
    pub draws: usize,
    /// Mean exact `log p(y)` of the prior (RK4 ODE).
    pub mean_log_p: f64,
    /// Mean of `C(y)` and of sum-reduced `L_align(y)`.
    pub mean_c: f64,
    pub mean_l_align: f64,
    /// `C(y) - L_align(y)` (sum-reduced): the estimate the paper calls a bound.
    pub paper: EstimateVsLogP,
    /// The same plus the base term `E[log N(eps; 0, I)] = -(d / 2)(1 + ln 2 pi)` that the paper's
    /// `C(y)` leaves out; it too is no pointwise bound (METHOD.md section 3).
    pub with_base_term: EstimateVsLogP,
}

/// The words `summary.json` carries beside the estimates.
pub const ESTIMATE_NOTE: &str = "paper: C(y) - L_align(y), which the paper's Proposition 1 calls a \
    lower bound on log p(y); it is not one (it exceeds log p near the modes even for the exact \
    field). with_base_term: the same plus E[log N(eps; 0, I)]; it stays below log p on average over \
    the data in the Gaussian family but not pointwise (it exceeds it in the tails of narrow modes). \
    mean_gap = mean of log p - estimate; violations = latents where the estimate exceeds log p by \
    more than 3 standard errors. METHOD.md section 3.";

/// Everything `flowalign toy` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub target: String,
    pub preset: String,
    pub seed: u64,
    pub device: String,
    pub nll_method: String,
    pub scale: f32,
    /// The run's budget in one line (network, steps, batch, learning rates), written under the
    /// figures.
    pub budget: String,
    pub prior: PriorSummary,
    pub align: AlignSummary,
    pub heatmap: HeatmapSummary,
    /// The estimates of METHOD.md section 3 against the exact log p.
    pub estimate: EstimateSummary,
    pub total_seconds: f64,
}

/// A finished run: the summary and the plain data behind every figure.
#[derive(Debug, Clone)]
pub struct ToyOutcome {
    pub summary: Summary,
    /// The loss curves of both stages.
    pub curves: Curves,
    /// 10 evenly spaced snapshots of y.
    pub snapshots: Vec<(usize, Vec<Point>)>,
    /// 5,000 target samples (plot overlays, heatmap range).
    pub target_samples: Vec<Point>,
    pub data_samples: Vec<Point>,
    pub prior_samples: Vec<Point>,
    pub nll_map: Heatmap,
    pub align_map: Heatmap,
    /// Velocity arrows (position, velocity) at each plotted t.
    pub velocity: Vec<(f32, Vec<(Point, Point)>)>,
    /// The trained (or loaded) prior and its metadata.
    pub prior: VelocityMlp,
    pub prior_meta: PriorMeta,
}

/// The t values of the velocity-field figure (METHOD.md section 5).
pub const VELOCITY_TIMES: [f32; 5] = [0.1, 0.3, 0.5, 0.7, 0.9];

/// A configured toy run on one device.
pub struct ToyRun {
    pub cfg: ToyConfig,
    pub target: Target,
    pub density: Density,
    pub(crate) device: Device,
    pub(crate) device_name: String,
}

impl ToyRun {
    /// Resolves the target of `cfg` (built-in, CSV or inline points) and its density.
    pub fn new(cfg: ToyConfig, device: Device, device_name: impl Into<String>) -> Result<Self> {
        cfg.validate()?;
        let target = if let Some(points) = &cfg.points {
            Target::from_points("custom", points)?
        } else if let Some(path) = &cfg.target_csv {
            Target::from_csv(path)?
        } else {
            Target::builtin(cfg.target)
        };
        let density = Density::for_target(&target);
        Ok(ToyRun {
            cfg,
            target,
            density,
            device,
            device_name: device_name.into(),
        })
    }

    /// The inference device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A freshly initialised prior on the autodiff device.
    pub fn init_prior(&self) -> VelocityMlp {
        let p = &self.cfg.prior;
        let mut rng = rng_for(self.cfg.seed, Stream::Init, 0);
        VelocityMlpConfig::new(2, p.width, p.depth).init(&mut rng, &self.device.clone().autodiff())
    }

    /// A prior trainer over the configured number of steps.
    pub fn prior_trainer(&self) -> PriorTrainer {
        let p = &self.cfg.prior;
        PriorTrainer::new(self.init_prior(), p.lr, p.schedule, p.steps).with_ema(p.ema)
    }

    /// One prior step: a fresh batch of target samples and (t, eps) draws seeded by the step number.
    pub fn prior_step(&self, trainer: &mut PriorTrainer) -> Result<f32> {
        let mut rng = rng_for(self.cfg.seed, Stream::Prior, trainer.step as u64);
        let ad = self.device.clone().autodiff();
        let x = self.target.sample(self.cfg.prior.batch, &mut rng);
        let x = rows_to_tensor(x.as_flattened(), 2, &ad);
        let draws = PathDraws::sample(&mut rng, self.cfg.prior.batch, 2, &ad);
        trainer.train_step(x, &draws).map(|s| s.loss)
    }

    /// The initial latents of an alignment with `align`.
    pub fn initial_latents(&self, align: &AlignConfig) -> Vec<f32> {
        let mut rng = rng_for(self.cfg.seed, Stream::LatentInit, 0);
        let normal = |rng: &mut Rng| -> f32 { rng.sample(StandardNormal) };
        (0..align.n_latents)
            .flat_map(|_| match align.init {
                LatentInit::Normal => [normal(&mut rng), normal(&mut rng)],
                LatentInit::Box => [rng.random_range(-3.0..3.0), rng.random_range(-3.0..3.0)],
                LatentInit::Corner => {
                    [2.5 + 0.25 * normal(&mut rng), 2.5 + 0.25 * normal(&mut rng)]
                }
            })
            .collect()
    }

    /// The heatmap grid: `(xs, ys)` over the configured view.
    pub fn grid_axes(&self, reference: &[Point], n: usize) -> (Vec<f32>, Vec<f32>) {
        let ((x0, x1), (y0, y1)) = self.view_range(reference);
        (linspace(x0, x1, n), linspace(y0, y1, n))
    }

    /// The plotting range: data range plus 20 % padding, or the fixed [-6, 6]^2 (METHOD.md section 5).
    pub fn view_range(&self, reference: &[Point]) -> Range2 {
        match self.cfg.eval.view {
            View::Fixed => ((-6.0, 6.0), (-6.0, 6.0)),
            View::Data => {
                let axis = |d: usize| {
                    let lo = reference.iter().map(|p| p[d]).fold(f32::INFINITY, f32::min);
                    let hi = reference
                        .iter()
                        .map(|p| p[d])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let pad = 0.2 * (hi - lo);
                    (lo - pad, hi + pad)
                };
                (axis(0), axis(1))
            }
        }
    }

    /// 5,000 reference target samples (fixed stream, so the heatmap range is stable).
    pub fn reference_samples(&self) -> Vec<Point> {
        let mut rng = rng_for(self.cfg.seed, Stream::Reference, 2);
        self.target.sample(5000, &mut rng)
    }

    /// `values(points)` on the `n x n` grid over the view of `reference`.
    fn grid_map(
        &self,
        reference: &[Point],
        n: usize,
        values: impl FnOnce(&[Point]) -> Vec<f32>,
    ) -> Heatmap {
        let (xs, ys) = self.grid_axes(reference, n);
        let values = values(&Heatmap::points(&xs, &ys));
        Heatmap { xs, ys, values }
    }

    /// The target's NLL on an `n x n` grid over the view of `reference`.
    pub fn nll_heatmap(&self, reference: &[Point], n: usize) -> Heatmap {
        self.grid_map(reference, n, |pts| {
            self.density.log_prob(pts).iter().map(|l| -l).collect()
        })
    }

    /// The L_align heatmap of `prior` (plain parameters) on an `n x n` grid, averaged over
    /// `t_values` times evenly spaced in [0.1, 0.9] (METHOD.md section 5).
    pub fn align_heatmap(
        &self,
        prior: &VelocityMlp,
        reference: &[Point],
        n: usize,
        t_values: usize,
    ) -> Heatmap {
        self.grid_map(reference, n, |pts| {
            let mut rng = rng_for(self.cfg.seed, Stream::Eval, 1);
            let ts = linspace(0.1, 0.9, t_values);
            align_heatmap(prior, pts.as_flattened(), 2, &ts, &mut rng, &self.device)
        })
    }

    /// The NLL and L_align heatmaps of `prior` (plain parameters) on an `n x n` grid, and the
    /// seconds the L_align map took.
    pub fn heatmaps(
        &self,
        prior: &VelocityMlp,
        reference: &[Point],
        n: usize,
        t_values: usize,
    ) -> (Heatmap, Heatmap, f64) {
        let nll = self.nll_heatmap(reference, n);
        let start = Instant::now();
        let align = self.align_heatmap(prior, reference, n, t_values);
        (nll, align, start.elapsed().as_secs_f64())
    }

    /// The prior's own NLL (exact likelihood by the ODE, METHOD.md section 1) on an `n x n` grid.
    pub fn prior_nll_heatmap(&self, prior: &VelocityMlp, reference: &[Point], n: usize) -> Heatmap {
        self.grid_map(reference, n, |pts| self.prior_nll_at(prior, pts))
    }

    /// The prior's own exact NLL (METHOD.md section 3) at each of `points`; a heatmap computed
    /// piece by piece (the window's) calls this on slices of [`Heatmap::points`].
    pub fn prior_nll_at(&self, prior: &VelocityMlp, points: &[Point]) -> Vec<f32> {
        let x = rows_to_tensor(points.as_flattened(), 2, &self.device);
        log_prob(prior, x, self.cfg.eval.likelihood_steps)
            .try_into_vec_as::<f32>()
            .expect("f32 readback")
            .into_iter()
            .map(|l| -l)
            .collect()
    }

    /// The bound `C(y) - L_align(y)` of METHOD.md section 3 at each of `points`, `draws` draws per
    /// point from the evaluation stream's draw `part` (distinct parts draw independently).
    pub fn bound_at(
        &self,
        prior: &FrozenPrior,
        points: &[Point],
        draws: usize,
        part: u64,
    ) -> Vec<f32> {
        let mut rng = rng_for(self.cfg.seed, Stream::Eval, 1000 + part);
        let est = bound(
            prior,
            points.as_flattened(),
            2,
            draws,
            &mut rng,
            &self.device,
        );
        est.elbo.iter().map(|&e| e as f32).collect()
    }

    /// `C(y) - L_align(y)` of METHOD.md section 3 (the estimate the paper calls a bound) on an
    /// `n x n` grid, `draws` draws per cell.
    pub fn bound_heatmap(
        &self,
        prior: &VelocityMlp,
        reference: &[Point],
        n: usize,
        draws: usize,
    ) -> Heatmap {
        let frozen = FrozenPrior::new(prior.clone());
        self.grid_map(reference, n, |pts| {
            let mut rng = rng_for(self.cfg.seed, Stream::Eval, 6);
            let est = bound(
                &frozen,
                pts.as_flattened(),
                2,
                draws,
                &mut rng,
                &self.device,
            );
            est.elbo.iter().map(|&e| e as f32).collect()
        })
    }

    /// Velocity arrows `(z, v(z, t))` on an `n x n` grid at time `t`.
    pub fn velocity_at(
        &self,
        prior: &VelocityMlp,
        reference: &[Point],
        t: f32,
        n: usize,
    ) -> Vec<(Point, Point)> {
        let (xs, ys) = self.grid_axes(reference, n);
        let pts = Heatmap::points(&xs, &ys);
        let z = rows_to_tensor(pts.as_flattened(), 2, &self.device);
        let v = to_points(&tensor_to_rows(prior.velocity_at(z, t)));
        pts.into_iter().zip(v).collect()
    }

    /// Velocity arrows on a 25 x 25 grid at [`VELOCITY_TIMES`].
    pub fn velocity_field(
        &self,
        prior: &VelocityMlp,
        reference: &[Point],
    ) -> Vec<(f32, Vec<(Point, Point)>)> {
        VELOCITY_TIMES
            .iter()
            .map(|&t| (t, self.velocity_at(prior, reference, t, 25)))
            .collect()
    }

    /// Samples from the prior by the Euler ODE (METHOD.md section 1).
    pub fn prior_samples(
        &self,
        prior: &VelocityMlp,
        n: usize,
        steps: usize,
        solver: Solver,
    ) -> Vec<Point> {
        self.prior_paths(prior, n, steps, solver, 0).0
    }

    /// Samples from the prior, and the ODE paths (every solver step, noise first) of the first
    /// `paths` of them.
    pub fn prior_paths(
        &self,
        prior: &VelocityMlp,
        n: usize,
        steps: usize,
        solver: Solver,
        paths: usize,
    ) -> (Vec<Point>, Vec<Vec<Point>>) {
        let mut rng = rng_for(self.cfg.seed, Stream::Eval, 2);
        let z0 = crate::flow::path::normal_rows(&mut rng, n, 2);
        let paths = paths.min(n);
        let mut trajectories: Vec<Vec<Point>> = to_points(&z0[..2 * paths])
            .into_iter()
            .map(|p| vec![p])
            .collect();
        let z0 = rows_to_tensor(&z0, 2, &self.device);
        let z = integrate_with(prior, z0, (0.0, 1.0), steps, solver, |_, z| {
            if paths > 0 {
                let head = tensor_to_rows(z.clone().slice([0..paths, 0..2]));
                for (path, p) in trajectories.iter_mut().zip(to_points(&head)) {
                    path.push(p);
                }
            }
        });
        (to_points(&tensor_to_rows(z)), trajectories)
    }

    /// The prior's exact mean NLL (ODE) of `points`.
    pub fn exact_nll(&self, prior: &VelocityMlp, points: &[Point]) -> f64 {
        let x = rows_to_tensor(points.as_flattened(), 2, &self.device);
        let lp: Vec<f32> = log_prob(prior, x, self.cfg.eval.likelihood_steps)
            .try_into_vec_as::<f32>()
            .expect("f32 readback");
        -lp.iter().map(|&v| v as f64).sum::<f64>() / lp.len().max(1) as f64
    }

    /// The estimates of METHOD.md section 3 against the exact log-likelihood at `y`.
    pub fn estimate_summary(&self, prior: &FrozenPrior, y: &[Point]) -> EstimateSummary {
        let draws = self.cfg.eval.bound_draws;
        let mut rng = rng_for(self.cfg.seed, Stream::Eval, 5);
        let est = bound(prior, y.as_flattened(), 2, draws, &mut rng, &self.device);
        let x = rows_to_tensor(y.as_flattened(), 2, &self.device);
        let log_p: Vec<f64> = log_prob(prior.mlp(), x, self.cfg.eval.likelihood_steps)
            .try_into_vec_as::<f32>()
            .expect("f32 readback")
            .into_iter()
            .map(f64::from)
            .collect();
        let versus = |shift: f64| {
            let (mut violations, mut max_excess) = (0, f64::NEG_INFINITY);
            for ((e, sem), lp) in est.elbo.iter().zip(&est.elbo_sem).zip(&log_p) {
                let excess = (e + shift - lp) / sem.max(1e-12);
                violations += usize::from(excess > 3.0);
                max_excess = max_excess.max(excess);
            }
            let (mean, _) = mean_sem(&est.elbo);
            let sem =
                (est.elbo_sem.iter().map(|s| s * s).sum::<f64>()).sqrt() / y.len().max(1) as f64;
            EstimateVsLogP {
                mean: mean + shift,
                sem,
                mean_gap: mean_of(&log_p) - (mean + shift),
                violations,
                max_excess_sem: max_excess,
            }
        };
        EstimateSummary {
            note: ESTIMATE_NOTE,
            points: y.len(),
            draws,
            mean_log_p: mean_of(&log_p),
            mean_c: mean_of(&est.c),
            mean_l_align: mean_of(&est.l_align),
            paper: versus(0.0),
            with_base_term: versus(base_term(2)),
        }
    }
}

fn mean_of(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Checks that a loaded prior fits this run: 2D, and trained on the same target.
pub fn check_prior_fits(meta: &PriorMeta, target: &Target, path: &Path) -> Result<()> {
    if meta.dim != 2 {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!(
                "is a {}-dimensional prior; the toy needs a 2D one (one trained by the toy)",
                meta.dim
            ),
        });
    }
    if meta.target != target.name
        || (meta.scale - target.scale).abs() > 1e-4 * target.scale.max(1.0)
    {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!(
                "was trained on target '{}' but this run's target is '{}'; choose target {} or train a new prior",
                meta.target, target.name, meta.target
            ),
        });
    }
    Ok(())
}
