//! `flowalign prior train|eval|sample`: stage 1 of the ImageNet recipe (METHOD.md section 6).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use flowalign::backend::{DeviceChoice, select};
use flowalign::checkpoint;
use flowalign::dist::Comm;
use flowalign::features::projection::ProjectionKind;
use flowalign::features::write_npy;
use flowalign::files::write_json;
use flowalign::flow::store::load_prior;
use flowalign::prior::data::PriorData;
use flowalign::prior::eval::{EvalOptions, evaluate, pca_scatter, sample_prior};
use flowalign::prior::{FeaturePriorConfig, PriorPreset, PriorRun};

#[derive(Subcommand)]
pub enum PriorCommand {
    /// Train a flow prior on a feature table (scaled, projected to --latent-dim).
    Train(Box<TrainArgs>),
    /// Held-out flow-matching loss, exact NLL, k-NN log r_k of samples, and a PCA scatter PNG.
    Eval(EvalArgs),
    /// Draw samples from a trained prior (Euler ODE) into a .npy file.
    Sample(SampleArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// The target features: FILE or FILE:TENSOR (.safetensors, .npy or .npz; f32, f16, bf16 or f64).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    features: Option<String>,
    /// The run folder: config, metrics, checkpoints and the frozen prior (prior.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out (only --steps, --checkpoint-every, --log-every,
    /// --precision and the learning-rate flags may change).
    #[arg(long)]
    resume: bool,
    /// Starting values: `paper` (METHOD.md section 6, the default) or `small` (a CPU-sized run).
    #[arg(long, value_enum)]
    preset: Option<PriorPreset>,
    /// A TOML config (every run writes one as config.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The latent dimension d1 the features are projected to (paper: 32).
    #[arg(long)]
    latent_dim: Option<usize>,
    /// How features reach the latent dimension: auto (identity when the dims are equal, else
    /// random), random (the paper's fixed Gaussian map), avgpool, pca or identity.
    #[arg(long, value_enum)]
    projection: Option<ProjectionKind>,
    /// Seed of the random projection (the paper's is 42).
    #[arg(long)]
    projection_seed: Option<u64>,
    /// Multiply the features by this instead of 1/std.
    #[arg(long)]
    scale: Option<f64>,
    /// Rows to hold out from training for `prior eval` (at most a tenth of the table; default 0:
    /// train on every row, as the paper's code does).
    #[arg(long)]
    holdout: Option<usize>,
    /// Drop rows holding NaN or infinity instead of refusing the table.
    #[arg(long)]
    drop_nonfinite: bool,
    /// Hidden width C of the AdaLN MLP (paper: 1024).
    #[arg(long)]
    width: Option<usize>,
    /// Residual AdaLN blocks (paper: 6).
    #[arg(long)]
    depth: Option<usize>,
    /// (t, eps) draws per vector per step.
    #[arg(long)]
    mc: Option<usize>,
    #[command(flatten)]
    run: super::RunArgs,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Data-parallel over this many devices of --device's kind (CUDA 0..N-1 or hardware wgpu
    /// adapters); the batch is split between them and the result does not depend on N.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    #[command(flatten)]
    dist: super::DistArgs,
}

impl TrainArgs {
    /// The requested config: the run's own when resuming, else a file or preset; then the flags.
    fn config(&self) -> Result<FeaturePriorConfig> {
        let mut cfg = super::starting_config(
            self.config.as_deref(),
            self.resume,
            &self.out,
            FeaturePriorConfig::from_toml_file,
            || {
                let Some(features) = &self.features else {
                    bail!("--features FILE[:TENSOR] is required (or --config F.toml, or --resume)");
                };
                Ok(FeaturePriorConfig::preset(
                    self.preset.unwrap_or(PriorPreset::Paper),
                    features,
                ))
            },
        )?;
        if let (Some(p), true) = (self.preset, self.config.is_some() || self.resume) {
            let base = FeaturePriorConfig::preset(p, &cfg.data.features);
            (cfg.model, cfg.train, cfg.preset) = (base.model, base.train, p);
        }
        if let Some(f) = &self.features {
            cfg.data.features = f.clone();
        }
        crate::set_fields!(self, cfg, {
            latent_dim => data.latent_dim,
            projection => data.projection,
            projection_seed => data.projection_seed,
            holdout => data.holdout,
            width => model.width,
            depth => model.depth,
            mc => train.mc,
        });
        self.run.apply(&mut cfg.train.run);
        if self.scale.is_some() {
            cfg.data.scale = self.scale;
        }
        cfg.data.drop_nonfinite |= self.drop_nonfinite;
        cfg.validate()?;
        Ok(cfg)
    }
}

fn train(args: TrainArgs) -> Result<()> {
    super::run_training(&args.dist, |comm| train_rank(&args, comm))
}

/// This process's part of a training run (the whole run without --distributed); returns whether
/// it was stopped and its last step.
fn train_rank(args: &TrainArgs, comm: Option<Arc<Comm>>) -> Result<(bool, usize)> {
    let cfg = super::shared_config(comm.as_deref(), || args.config())?;
    let (devices, device_name) = args.dist.devices(args.device, args.gpus, comm.as_deref())?;
    let lead = comm.as_ref().is_none_or(|c| c.leads());
    let start = std::time::Instant::now();
    let run = PriorRun::open(cfg.clone(), &args.out, args.resume, &devices[0], comm)?;
    let mut run = run.with_replicas(devices);
    let data = run.data();
    let data_held = data.holdout.rows > 0;
    if lead {
        tracing::info!(
            device = %device_name,
            "{} rows x {} (std {:.5}, scale {:.4}) -> {} dims by {:?} projection; {} training rows, {} held out; prepared in {:.1}s",
            data.info.rows,
            data.info.cols,
            data.info.std,
            data.info.scale,
            data.dim(),
            data.projection.kind,
            data.train.rows,
            data.holdout.rows,
            start.elapsed().as_secs_f64()
        );
        if run.step() > 0 {
            tracing::info!("resuming {} at step {}", args.out.display(), run.step());
        }
        step_cost_notice(
            &cfg,
            data.dim(),
            &device_name,
            args.preset.is_none() && args.config.is_none(),
        );
    }
    let stop = super::stop_flag()?;
    let pb = super::lead_bar(lead, "prior", cfg.train.run.steps, run.step());
    let batch = cfg.train.run.batch;
    let summary = run.run(
        || stop.load(Ordering::Relaxed),
        |m| {
            pb.set_position(m.step as u64);
            let val = m
                .val_loss
                .map(|v| format!(" val {v:.4}"))
                .unwrap_or_default();
            pb.set_message(format!(
                "loss {:.4}{val} lr {:.2e} {:.0} vec/s ({:.2} steps/s)",
                m.loss,
                m.lr,
                m.vectors_per_s,
                m.vectors_per_s / batch as f64
            ));
            if lead && pb.is_hidden() {
                tracing::info!(
                    step = m.step,
                    loss = m.loss,
                    lr = m.lr,
                    vectors_per_s = m.vectors_per_s as u64,
                    val_loss = m.val_loss
                );
            }
        },
    );
    pb.finish_and_clear();
    let summary = summary?;
    let run_summary = summary.run;
    if lead && !run_summary.interrupted {
        tracing::info!(
            "trained steps {}..{} in {:.1}s; {} flow-matching loss {:.4}; prior in {}",
            run_summary.resumed_from,
            run_summary.step,
            start.elapsed().as_secs_f64(),
            if data_held {
                "held-out"
            } else {
                "training-row"
            },
            summary.val_loss,
            args.out.join("prior.safetensors").display()
        );
    }
    Ok((run_summary.interrupted, run_summary.step))
}

/// burn's CPU backend sustains about this many FLOP/s per core on the prior's step (README:
/// 131.6 vectors/s of the 1024 x 6 prior at mc 4 on 2 cores).
const CPU_FLOPS_PER_CORE: f64 = 5.5e10;

/// Says at the start what one step costs on the chosen device, and when the first log line comes;
/// on a CPU with a step of more than a few seconds, suggests `--preset small`.
fn step_cost_notice(cfg: &FeaturePriorConfig, dim: usize, device_name: &str, default_preset: bool) {
    let t = &cfg.train.run;
    let flops = cfg.step_flops(dim);
    let what = format!(
        "one step = {} vectors x {} draws through {:.1} M parameters = {:.2} TFLOP",
        t.batch,
        cfg.train.mc,
        cfg.params(dim) as f64 / 1e6,
        flops / 1e12
    );
    if device_name.starts_with("cpu") {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let secs = flops / (CPU_FLOPS_PER_CORE * cores as f64);
        let first_line = secs * t.log_every.min(t.steps) as f64;
        tracing::info!(
            "{what}: about {} a step on this {cores}-core CPU, so the first log line (step {}) comes in about {}",
            human_secs(secs),
            t.log_every.min(t.steps),
            human_secs(first_line)
        );
        if secs > 5.0 {
            tracing::warn!(
                "the {} preset is sized for GPUs; on a CPU start with --preset small (256 x 3, 1,024 vectors a step){}",
                format!("{:?}", cfg.preset).to_lowercase(),
                if default_preset {
                    " (paper is the default)"
                } else {
                    ""
                }
            );
        }
    } else {
        tracing::info!("{what} on {device_name}");
    }
}

/// `4.2 s`, `3.5 min`, `2.1 h`.
fn human_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.1} s")
    } else if s < 5400.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// A `prior train` run folder.
    #[arg(long)]
    prior: PathBuf,
    /// The feature table (default: the one the run trained on).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    features: Option<String>,
    #[command(flatten)]
    opts: EvalOptions,
    /// Where to write eval.json and pca.png (default: the run folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

/// The run's config and its prepared data, checked against the frozen prior.
fn open_run(
    dir: &Path,
    features: Option<&String>,
    device: &burn::prelude::Device,
) -> Result<(FeaturePriorConfig, PriorData)> {
    let mut cfg: FeaturePriorConfig = checkpoint::read_config(dir, "prior train")?;
    cfg.validate()?;
    if let Some(f) = features {
        cfg.data.features = f.clone();
    }
    let data = PriorData::prepare(&cfg.data, cfg.train.run.seed, device)?;
    Ok((cfg, data))
}

fn eval(args: EvalArgs) -> Result<()> {
    let (device, device_name) = select(args.device)?;
    let (_, data) = open_run(&args.prior, args.features.as_ref(), &device)?;
    let (prior, meta) = load_prior(&args.prior, &device)?;
    if data.dim() != meta.dim {
        bail!(
            "the prior models {}-dim vectors but the features project to {}; pass the table it was trained on",
            meta.dim,
            data.dim()
        );
    }
    if args.opts.k == 0 || args.opts.ode_steps == 0 || args.opts.sample_steps == 0 {
        bail!("--k, --ode-steps and --sample-steps must be at least 1");
    }
    let start = std::time::Instant::now();
    tracing::info!(device = %device_name, "evaluating the prior of {} (step {})", args.prior.display(), meta.steps);
    let (report, samples) = evaluate(&prior, &data, &args.opts, &device);
    let out = args.out.unwrap_or_else(|| args.prior.clone());
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create {}; choose another --out", out.display()))?;
    write_json(&out.join("eval.json"), &report)?;
    let held = if data.holdout.rows > 0 {
        &data.holdout
    } else {
        &data.train
    };
    pca_scatter(&out.join("pca.png"), held, &samples, &device)?;
    let scored = report.scored;
    tracing::info!(
        "FM loss {:.4} ({} {scored} rows); exact NLL of {scored} rows {:.3} +- {:.3} nats ({:.4}/dim), samples {:.3}; \
         log r_{} samples {:.3} vs {scored} rows {:.3}; {:.1}s -> {}",
        report.fm_loss,
        report.fm_rows,
        report.nll_data,
        report.nll_data_sem,
        report.nll_data_per_dim,
        report.nll_samples,
        report.k,
        report.log_rk_samples,
        report.log_rk_data,
        start.elapsed().as_secs_f64(),
        out.join("eval.json").display()
    );
    Ok(())
}

#[derive(Args)]
pub struct SampleArgs {
    /// A `prior train` run folder (or its prior.safetensors).
    #[arg(long)]
    prior: PathBuf,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    n: usize,
    /// Euler steps (the paper's 100).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Seed of the noise the samples start from.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output .npy (f32, [n, latent_dim]), in the prior's scaled, projected space.
    #[arg(long)]
    out: PathBuf,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

fn sample(args: SampleArgs) -> Result<()> {
    if args.n == 0 || args.steps == 0 {
        bail!("-n and --steps must be at least 1");
    }
    let (device, _) = select(args.device)?;
    let (prior, meta) = load_prior(&args.prior, &device)?;
    let start = std::time::Instant::now();
    let rows = sample_prior(&prior, args.n, meta.dim, args.steps, args.seed, &device);
    write_npy(&args.out, args.n, meta.dim, &rows)?;
    tracing::info!(
        "{} samples x {} in {:.1}s -> {}",
        args.n,
        meta.dim,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// Runs one `prior` subcommand.
pub fn run(cmd: PriorCommand) -> Result<()> {
    match cmd {
        PriorCommand::Train(args) => train(*args),
        PriorCommand::Eval(args) => eval(args),
        PriorCommand::Sample(args) => sample(args),
    }
}
