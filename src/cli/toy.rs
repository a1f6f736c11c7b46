//! `flowalign toy`: the 2D experiment of METHOD.md section 5 without a window, and the config
//! flags it shares with the visualizer.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use flowalign::align::Reduction;
use flowalign::backend::{DeviceChoice, select};
use flowalign::flow::store::{load_prior, save_prior};
use flowalign::toy::experiment::check_prior_fits;
use flowalign::toy::figures;
use flowalign::toy::{Event, LatentInit, Preset, TargetKind, ToyConfig, ToyOutcome, ToyRun, View};

/// `--target` accepts a built-in name or `all`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TargetArg {
    One(TargetKind),
    All,
}

fn parse_target(s: &str) -> Result<TargetArg, String> {
    if s == "all" {
        return Ok(TargetArg::All);
    }
    <TargetKind as clap::ValueEnum>::from_str(s, true)
        .map(TargetArg::One)
        .map_err(|_| {
            format!(
                "unknown target '{s}'; choose mog, grid, moons, rings, spiral, swissroll or all"
            )
        })
}

/// The run's config: a preset or a TOML file, then one flag per knob.
#[derive(Args, Default)]
pub struct ConfigArgs {
    /// Target distribution: mog, grid, moons, rings, spiral, swissroll, or all (the Fig. 5 grid;
    /// toy only).
    #[arg(long, value_parser = parse_target)]
    pub target: Option<TargetArg>,
    /// Your own 2D points: a CSV with two numeric columns x,y (header optional).
    #[arg(long, value_name = "FILE", conflicts_with = "target")]
    pub target_csv: Option<PathBuf>,
    /// Hyperparameter preset: interactive (sized for a laptop CPU) or paper (METHOD.md section 5).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// A TOML config (every run writes one as config.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seed of every random draw (initialisation, batches, latents, evaluation).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prior training steps.
    #[arg(long)]
    pub prior_steps: Option<usize>,
    /// Alignment steps (full batch).
    #[arg(long)]
    pub align_steps: Option<usize>,
    /// Hidden width C of the prior's AdaLN MLP.
    #[arg(long)]
    pub width: Option<usize>,
    /// Residual AdaLN blocks of the prior.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Fresh target samples per prior step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// The prior's (peak) learning rate.
    #[arg(long)]
    pub prior_lr: Option<f64>,
    /// EMA decay of the prior's weights (0 = off).
    #[arg(long)]
    pub ema: Option<f64>,
    /// The latents' Adam learning rate.
    #[arg(long)]
    pub align_lr: Option<f64>,
    /// Number of latents y aligned.
    #[arg(long)]
    pub n_latents: Option<usize>,
    /// (t, eps) draws per latent per alignment step.
    #[arg(long)]
    pub mc: Option<usize>,
    /// How L_align reduces over dimensions: mean (the public code) or sum (the paper's norm).
    #[arg(long, value_enum)]
    pub reduction: Option<Reduction>,
    /// Initial latents: normal (the paper), box, or corner (a far-off cluster).
    #[arg(long, value_enum)]
    pub init: Option<LatentInit>,
    /// Heatmap resolution (grid x grid).
    #[arg(long)]
    pub grid: Option<usize>,
    /// Number of t values in linspace(0.1, 0.9) for the L_align heatmap.
    #[arg(long)]
    pub t_values: Option<usize>,
    /// Heatmap extent: data (the target's range + 20 %) or fixed ([-6, 6]^2).
    #[arg(long, value_enum)]
    pub view: Option<View>,
}

impl ConfigArgs {
    /// The config for `target`: preset or file, then flags.
    pub fn config(&self, target: TargetKind) -> Result<ToyConfig> {
        let mut cfg = match &self.config {
            Some(path) => ToyConfig::from_toml_file(path)?,
            None => ToyConfig::preset(self.preset.unwrap_or(Preset::Interactive), target),
        };
        if self.config.is_some() {
            if let Some(p) = self.preset {
                let base = ToyConfig::preset(p, target);
                (cfg.prior, cfg.align, cfg.eval, cfg.preset) =
                    (base.prior, base.align, base.eval, p);
            }
            if self.target.is_some() {
                let before = cfg.builtin_target();
                cfg.target = target;
                cfg.points = None;
                cfg.target_csv = None;
                cfg.follow_target(before);
            }
        } else {
            cfg.target = target;
        }
        if let Some(csv) = &self.target_csv {
            let before = cfg.builtin_target();
            cfg.target_csv = Some(csv.clone());
            cfg.points = None;
            cfg.follow_target(before);
        }
        crate::set_fields!(self, cfg, {
            seed => seed,
            prior_steps => prior.steps,
            align_steps => align.steps,
            width => prior.width,
            depth => prior.depth,
            batch => prior.batch,
            prior_lr => prior.lr,
            ema => prior.ema,
            align_lr => align.lr,
            n_latents => align.n_latents,
            mc => align.mc,
            reduction => align.reduction,
            init => align.init,
            grid => eval.grid,
            t_values => eval.t_values,
            view => eval.view,
        });
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether no config flag was given at all.
    #[cfg_attr(not(feature = "gui"), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.target.is_none()
            && self.target_csv.is_none()
            && self.preset.is_none()
            && self.config.is_none()
            && self.seed.is_none()
            && self.prior_steps.is_none()
            && self.align_steps.is_none()
            && self.width.is_none()
            && self.depth.is_none()
            && self.batch.is_none()
            && self.prior_lr.is_none()
            && self.ema.is_none()
            && self.align_lr.is_none()
            && self.n_latents.is_none()
            && self.mc.is_none()
            && self.reduction.is_none()
            && self.init.is_none()
            && self.grid.is_none()
            && self.t_values.is_none()
            && self.view.is_none()
    }
}

#[derive(Args)]
pub struct ToyArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Output folder.
    #[arg(long, default_value = "runs/toy")]
    out: PathBuf,
    /// Reuse a trained prior: a run folder (or its prior.safetensors) instead of training; with
    /// `--target all`, the folder of an earlier `--target all` run (one prior per target).
    #[arg(long, value_name = "PATH")]
    prior: Option<PathBuf>,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = if len > 0 {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::new_spinner()
    };
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    pb.set_style(if len > 0 {
        style
    } else {
        ProgressStyle::default_spinner()
    });
    pb.set_prefix(what.to_string());
    pb
}

/// Runs one toy target into `out`, reusing the prior at `prior` when given.
fn run_toy(
    args: &ToyArgs,
    target: TargetKind,
    out: &Path,
    prior: Option<&Path>,
) -> Result<ToyOutcome> {
    let cfg = args.cfg.config(target)?;
    let (device, device_name) = select(args.device)?;
    std::fs::create_dir_all(out).with_context(|| {
        format!(
            "cannot create output folder {}; choose an --out you can write to",
            out.display()
        )
    })?;
    let probe = out.join(".flowalign-write-test");
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "output folder {} is not writable; choose another --out",
            out.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);

    let run = Arc::new(ToyRun::new(cfg, device.clone(), device_name.clone())?);
    let prior = match prior {
        Some(path) => {
            let (model, meta) = load_prior(path, &device)?;
            check_prior_fits(&meta, &run.target, path)?;
            Some((model, meta))
        }
        None => None,
    };
    tracing::info!(target = %run.target.name, device = %device_name, "toy run -> {}", out.display());
    flowalign::files::write_atomic(&out.join("config.toml"), run.cfg.to_toml().as_bytes())?;

    let mut pb: Option<ProgressBar> = None;
    let stage = |pb: &mut Option<ProgressBar>, len: usize, name: &str| {
        if let Some(p) = pb.take() {
            p.finish();
        }
        *pb = Some(bar(len, name));
    };
    let outcome = run.run(prior, &mut |event| {
        match event {
            Event::PriorStep { step, loss, lr } => {
                if pb.is_none() {
                    stage(&mut pb, run.cfg.prior.steps, "prior");
                }
                if let Some(p) = &pb {
                    p.set_position(*step as u64);
                    if step % 20 == 0 {
                        p.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
                    }
                }
            }
            Event::AlignStart { align, .. } => stage(&mut pb, align.steps, "align"),
            Event::AlignStep {
                step, loss, nll, ..
            } => {
                if let Some(p) = &pb {
                    p.set_position(*step as u64);
                    if step % 20 == 0 {
                        p.set_message(format!("L_align {loss:.4} NLL(y) {nll:.3}"));
                    }
                }
            }
            Event::Done => stage(&mut pb, 0, "evaluate"),
        }
        ControlFlow::Continue(())
    })?;
    if let Some(p) = pb.take() {
        p.finish_and_clear();
    }
    if !outcome.summary.prior.loaded {
        save_prior(out, &outcome.prior, &outcome.prior_meta)?;
    }
    figures::write_all(out, &outcome)?;
    let s = &outcome.summary;
    tracing::info!(
        "{}: NLL(y) {:.3} -> {:.3}; heatmap Pearson {:.3} Spearman {:.3}; sample NLL {:.3} vs data {:.3}; \
         exact log p {:.3}; the paper's estimate C - L_align {:.3} ({} of {} latents above log p), \
         with the base term {:.3} ({} above); {:.1}s",
        s.target,
        s.align.nll_init,
        s.align.nll_final,
        s.heatmap.pearson,
        s.heatmap.spearman,
        s.prior.sample_nll,
        s.prior.data_nll,
        s.estimate.mean_log_p,
        s.estimate.paper.mean,
        s.estimate.paper.violations,
        s.estimate.points,
        s.estimate.with_base_term.mean,
        s.estimate.with_base_term.violations,
        s.total_seconds
    );
    Ok(outcome)
}

/// Runs `flowalign toy`.
pub fn run(args: ToyArgs) -> Result<()> {
    match args.cfg.target {
        Some(TargetArg::All) => {
            // With `--target all`, `--prior` is the folder of an earlier `--target all` run: each
            // target reuses the prior in its subfolder.
            let mut outcomes = Vec::new();
            for kind in TargetKind::ALL {
                let prior = args.prior.as_ref().map(|p| p.join(kind.name()));
                if let Some(p) = &prior
                    && !p.is_dir()
                {
                    bail!(
                        "--prior {} has no folder {}: with --target all it must be the output of an earlier --target all run",
                        args.prior
                            .as_ref()
                            .map_or(String::new(), |p| p.display().to_string()),
                        p.display()
                    );
                }
                outcomes.push(run_toy(
                    &args,
                    kind,
                    &args.out.join(kind.name()),
                    prior.as_deref(),
                )?);
            }
            figures::figure5(&args.out.join("figure5.png"), &outcomes)?;
            tracing::info!("wrote {}", args.out.join("figure5.png").display());
        }
        Some(TargetArg::One(kind)) => {
            run_toy(&args, kind, &args.out, args.prior.as_deref())?;
        }
        None => {
            run_toy(&args, TargetKind::Mog, &args.out, args.prior.as_deref())?;
        }
    }
    tracing::info!("outputs in {}", args.out.display());
    Ok(())
}
