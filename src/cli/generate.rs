//! `flowalign gen train|sample|eval`: stage 3, a generator on an autoencoder's aligned latents
//! (METHOD.md section 7) and the generation metrics of the paper's Table 1 (section 8).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use flowalign::ae::latents::LatentSet;
use flowalign::backend::{DeviceChoice, select};
use flowalign::dist::Comm;
use flowalign::generator::masking::CfgSchedule;
use flowalign::generator::run::{GenRun, load_generator, write_latents};
use flowalign::generator::sample::generate;
use flowalign::generator::{Arch, GenConfig, GenPreset};
use flowalign::rng::{Stream, rng_for};

#[derive(Subcommand)]
pub enum GenCommand {
    /// Train a generator (MAR-B with a flow head, the paper's; or a DiT) on cached latents.
    Train(Box<TrainArgs>),
    /// Draw class-conditional samples: latents (safetensors) and, with --ae, PNG images.
    Sample(SampleArgs),
    /// FID, KID, IS, precision and recall of a folder of images against a reference.
    Eval(super::metrics::GenEvalArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// The latent cache `flowalign ae encode` wrote (add --flip there for the paper's flips).
    #[arg(long)]
    latents: Option<String>,
    /// The run folder: config, metrics, checkpoints, samples.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Starting values: `paper` (MAR-B, METHOD.md section 7) or `small` (sized for a CPU; the
    /// default).
    #[arg(long, value_enum)]
    preset: Option<GenPreset>,
    /// A TOML config (every run writes one as config.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// `mar`: MAR with a flow head, the paper's generator; `dit`: a DiT over the same tokens (not
    /// the paper's; for comparison).
    #[arg(long, value_enum)]
    arch: Option<Arch>,
    /// Multiply the latents by this (default: the cache's 1 / sqrt(mean per-sample variance)).
    #[arg(long)]
    scale: Option<f64>,
    /// Lower end of the truncated normal of mask ratios (MAR: 0.7).
    #[arg(long)]
    mask_ratio_min: Option<f64>,
    #[command(flatten)]
    run: super::RunArgs,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Data-parallel over this many devices in one process; the generator trains on one device
    /// per process, so use --distributed mpi for several GPUs.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    #[command(flatten)]
    dist: super::DistArgs,
}

impl TrainArgs {
    /// The requested config: the run's own when resuming, else a file or preset fitted to the
    /// cache's latents; then the flags.
    fn config(&self) -> Result<GenConfig> {
        let mut cfg = super::starting_config(
            self.config.as_deref(),
            self.resume,
            &self.out,
            GenConfig::from_toml_file,
            || {
                let Some(latents) = &self.latents else {
                    bail!("--latents DIR is required (or --config F.toml, or --resume)");
                };
                let mut cfg = GenConfig::preset(self.preset.unwrap_or(GenPreset::Small), latents);
                let set = LatentSet::read(Path::new(latents))?;
                cfg.fit_to(set.stats.tokens, set.stats.dim, set.num_classes());
                cfg.data.scale = if set.stats.scale > 0.0 {
                    set.stats.scale
                } else {
                    1.0 / set.stats.std.max(1e-12)
                };
                Ok(cfg)
            },
        )?;
        if let Some(l) = &self.latents {
            cfg.data.latents = l.clone();
        }
        crate::set_fields!(self, cfg, {
            arch => arch,
            scale => data.scale,
            mask_ratio_min => train.mask_ratio_min,
        });
        self.run.apply(&mut cfg.train.run);
        cfg.validate()?;
        Ok(cfg)
    }
}

fn train(args: TrainArgs) -> Result<()> {
    if args.gpus != 1 {
        bail!(
            "--gpus {}: the generator trains on one device per process; start one rank per GPU with --distributed mpi (see the README)",
            args.gpus
        );
    }
    super::run_training(&args.dist, |comm| train_rank(&args, comm))
}

/// This process's part of a training run; returns whether it was stopped and its last step.
fn train_rank(args: &TrainArgs, comm: Option<Arc<Comm>>) -> Result<(bool, usize)> {
    let cfg = super::shared_config(comm.as_deref(), || args.config())?;
    let (devices, device_name) = args.dist.devices(args.device, 1, comm.as_deref())?;
    let lead = comm.as_ref().is_none_or(|c| c.leads());
    let mut run = GenRun::open(cfg.clone(), &args.out, args.resume, &devices[0], comm)?;
    if lead {
        let set = &run.data().set;
        let (tokens, dim, classes) = cfg.model_shape();
        tracing::info!(
            device = %device_name,
            "{:?} generator on {} latents{} of {tokens} x {dim} in {} classes (model: {classes}), scale {:.4}; batch {}, lr {:.2e}",
            cfg.arch,
            set.len(),
            if set.flipped.is_some() { " (and their flips)" } else { "" },
            set.num_classes(),
            cfg.data.scale,
            cfg.train.run.batch,
            cfg.train.run.lr,
        );
        if cfg.arch == Arch::Dit {
            tracing::info!(
                "the DiT is not the paper's generator (MAR-B is); its numbers are for comparison"
            );
        }
        if run.step() > 0 {
            tracing::info!("resuming {} at step {}", args.out.display(), run.step());
        }
    }
    let stop = super::stop_flag()?;
    let pb = super::lead_bar(lead, "gen", cfg.train.run.steps, run.step());
    let summary = run.run(
        || stop.load(Ordering::Relaxed),
        |m| {
            pb.set_position(m.step as u64);
            pb.set_message(format!(
                "loss {:.4} lr {:.2e} {:.1} latents/s",
                m.loss, m.lr, m.latents_per_s
            ));
            if lead && pb.is_hidden() {
                tracing::info!(
                    step = m.step,
                    loss = m.loss,
                    lr = m.lr,
                    latents_per_s = m.latents_per_s
                );
            }
        },
    );
    pb.finish_and_clear();
    let summary = summary?;
    if lead && !summary.interrupted {
        tracing::info!(
            "trained steps {}..{}; outputs in {}",
            summary.resumed_from,
            summary.step,
            args.out.display()
        );
    }
    Ok((summary.interrupted, summary.step))
}

#[derive(Args)]
pub struct SampleArgs {
    /// A `gen train` run folder (its latest checkpoint; EMA weights when kept).
    #[arg(long)]
    r#gen: PathBuf,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 64)]
    n: usize,
    /// Classes to sample, in turn (e.g. `0,3,7`); default: every class of the training latents.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<usize>>,
    /// Sample without a class (the unconditional half of guidance alone).
    #[arg(long, conflicts_with = "classes")]
    unconditional: bool,
    /// Guidance scale (1 = none; original MAR-B: 2.9; the paper's is unpublished).
    #[arg(long)]
    cfg: Option<f32>,
    /// How guidance grows over MAR's iterations: linear (MAR's) or constant.
    #[arg(long, value_enum)]
    cfg_schedule: Option<CfgSchedule>,
    /// Scale of the initial noise (MAR-B: 1.0 with guidance, 0.95 without).
    #[arg(long)]
    temperature: Option<f32>,
    /// MAR's autoregressive iterations (paper: 64, one token each).
    #[arg(long)]
    num_iter: Option<usize>,
    /// Time points of the head's Euler sampler, linspace(1, 0, N) (paper: 100).
    #[arg(long)]
    steps: Option<usize>,
    /// Samples generated per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Seed of the samples' noise and orders.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// An `ae train` run folder whose decoder turns the samples into PNGs (`OUT/images/`).
    #[arg(long)]
    ae: Option<PathBuf>,
    /// Output folder: latents.safetensors, labels.txt, and images/ with --ae.
    #[arg(long)]
    out: PathBuf,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

fn sample(args: SampleArgs) -> Result<()> {
    if args.n == 0 || args.batch == 0 {
        bail!("-n and --batch must be at least 1");
    }
    let (device, device_name) = select(args.device)?;
    let (cfg, model, step) = load_generator(&args.r#gen, &device)?;
    let mut opts = cfg.sample_options();
    crate::set_fields!(args, opts, {
        cfg => cfg,
        cfg_schedule => cfg_schedule,
        temperature => temperature,
        num_iter => num_iter,
        steps => time_points,
    });
    let (tokens, dim, classes) = cfg.model_shape();
    let wanted: Vec<Option<usize>> = if args.unconditional {
        vec![None; args.n]
    } else {
        let pool = match &args.classes {
            Some(c) if !c.is_empty() => c.clone(),
            _ => {
                let trained = LatentSet::read(Path::new(&cfg.data.latents))
                    .map(|s| s.num_classes())
                    .unwrap_or(classes);
                (0..trained.max(1)).collect()
            }
        };
        (0..args.n).map(|i| Some(pool[i % pool.len()])).collect()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}; choose another --out", args.out.display()))?;
    let start = std::time::Instant::now();
    let mut latents = Vec::with_capacity(args.n * tokens * dim);
    for (k, labels) in wanted.chunks(args.batch).enumerate() {
        let mut rng = rng_for(args.seed, Stream::Sample, k as u64);
        let x = generate(&model, labels, &opts, cfg.data.scale as f32, &mut rng)?;
        latents.extend(x.try_into_vec_as::<f32>().expect("f32 readback"));
    }
    let secs = start.elapsed().as_secs_f64();
    write_latents(&args.out.join("latents.safetensors"), &latents, tokens, dim)?;
    let labels: String = wanted
        .iter()
        .map(|l| l.map_or("none".to_string(), |c| c.to_string()) + "\n")
        .collect();
    flowalign::files::write_atomic(&args.out.join("labels.txt"), labels.as_bytes())?;
    tracing::info!(
        device = %device_name,
        "{} samples of the generator at step {step} (cfg {}, temperature {}, {} iterations, {} time points) in {:.1}s ({:.3} s/sample) -> {}",
        args.n,
        opts.cfg,
        opts.temperature,
        opts.num_iter,
        opts.time_points,
        secs,
        secs / args.n as f64,
        args.out.display()
    );
    if let Some(ae) = &args.ae {
        use flowalign::ae::eval::load_autoencoder;
        use flowalign::ae::latents::decode_to_pngs;
        let (ae_cfg, ae_model, _) = load_autoencoder(ae, &device)?;
        if (ae_cfg.model.latent_tokens, ae_cfg.model.latent_dim) != (tokens, dim) {
            bail!(
                "the autoencoder in {} decodes {} x {} latents but the generator makes {tokens} x {dim}",
                ae.display(),
                ae_cfg.model.latent_tokens,
                ae_cfg.model.latent_dim
            );
        }
        let images = args.out.join("images");
        let written = decode_to_pngs(
            &ae_model, &latents, tokens, dim, &images, args.batch, &device,
        )?;
        tracing::info!("decoded {} images -> {}", written.len(), images.display());
    }
    Ok(())
}

/// Runs one `gen` subcommand.
pub fn run(cmd: GenCommand) -> Result<()> {
    match cmd {
        GenCommand::Train(args) => train(*args),
        GenCommand::Sample(args) => sample(args),
        GenCommand::Eval(args) => super::metrics::gen_eval(args),
    }
}
