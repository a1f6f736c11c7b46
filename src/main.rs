//! The `flowalign` command line: a thin front-end over the library.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod cli;

/// Training allocates and frees tensors of megabytes every step; glibc's malloc serves those with
/// fresh `mmap`s, so a quarter of CPU time went to page faults. mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use flowalign::backend::{DeviceChoice, select};
use flowalign::bench::BenchArgs;
use flowalign::config::{LatentInit, Preset, Reduction, ToyConfig, View};
use flowalign::features::projection::ProjectionKind;
use flowalign::toy::experiment::check_prior_fits;
use flowalign::toy::figures;
use flowalign::toy::{Event, TargetKind, ToyOutcome, ToyRun};
use flowalign::train::{load_prior, save_prior};

#[derive(Parser)]
#[command(
    name = "flowalign",
    version,
    about = "Aligning latent spaces with flow priors (arXiv 2506.05240)"
)]
struct Cli {
    /// Without a subcommand, the visualizer opens.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The desktop visualizer: train the prior and align latents live (the default command).
    Gui(Box<GuiArgs>),
    /// The 2D toy experiment: train a flow prior, align 1,000 latents, write figures and numbers.
    Toy(Box<ToyArgs>),
    /// Target feature files: list the tensors of a .safetensors, .npy or .npz file.
    #[command(subcommand)]
    Features(FeaturesCommand),
    /// Stage 1 of the ImageNet recipe: train, evaluate and sample a flow prior on target features.
    #[command(subcommand)]
    Prior(cli::prior::PriorCommand),
    /// Stage 2 of the ImageNet recipe: an image autoencoder aligned to a frozen prior.
    #[command(subcommand)]
    Ae(cli::ae::AeCommand),
    /// Throughput benchmarks (JSON), side by side with PyTorch when it is installed.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum FeaturesCommand {
    /// Print the name, shape and dtype of every tensor in FILE.
    Inspect {
        /// A .safetensors, .npy or .npz file.
        file: PathBuf,
    },
    /// Scale a feature table by 1/std and project it to the latent dimension (SPEC section 2); write .npy.
    Project(ProjectArgs),
}

#[derive(Args)]
struct ProjectArgs {
    /// The table: FILE or FILE:TENSOR (.safetensors, .npy or .npz; f32, f16, bf16 or f64).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    features: String,
    /// The latent dimension d1.
    #[arg(long, default_value_t = 32)]
    latent_dim: usize,
    #[arg(long, value_enum, default_value_t = ProjectionKind::Random)]
    projection: ProjectionKind,
    /// Seed of the random projection (the paper's is 42).
    #[arg(long, default_value_t = flowalign::features::projection::PAPER_SEED)]
    projection_seed: u64,
    /// Multiply the features by this instead of 1/std.
    #[arg(long)]
    scale: Option<f64>,
    /// Drop rows holding NaN or infinity instead of refusing the file.
    #[arg(long)]
    drop_nonfinite: bool,
    /// Output .npy (f32, [rows, latent_dim]).
    #[arg(long)]
    out: PathBuf,
}

fn project(args: ProjectArgs) -> Result<()> {
    use flowalign::features::{NonFinite, load, parse_spec, projection::Projection};
    let start = std::time::Instant::now();
    let (path, tensor) = parse_spec(&args.features);
    let non_finite = if args.drop_nonfinite {
        NonFinite::Drop
    } else {
        NonFinite::Refuse
    };
    let mut table = load(&path, tensor.as_deref(), non_finite)?;
    let loaded = start.elapsed().as_secs_f64();
    let std = table.std();
    let scale = match args.scale {
        Some(s) if s.is_finite() && s > 0.0 => s,
        Some(s) => bail!("--scale must be a positive number, got {s}"),
        None if std > 0.0 => 1.0 / std,
        None => bail!(
            "{}: every feature value is the same (std 0); pass --scale",
            path.display()
        ),
    };
    table.scale(scale as f32);
    let device = burn::prelude::Device::flex();
    let proj = Projection::fit(
        args.projection,
        &table,
        args.latent_dim,
        args.projection_seed,
        &device,
    )?;
    let out = proj.apply(&table, &device)?;
    flowalign::features::write_npy(&args.out, out.rows, out.cols, &out.data)?;
    tracing::info!(
        "{} rows x {} -> {}: std {std:.6} (scale {scale:.4}), {:?}; loaded in {loaded:.2}s, total {:.2}s -> {}",
        table.rows,
        table.cols,
        out.cols,
        args.projection,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn features(cmd: FeaturesCommand) -> Result<()> {
    match cmd {
        FeaturesCommand::Inspect { file } => {
            let infos = flowalign::features::inspect(&file)?;
            let width = infos.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
            let mut out = format!("{:width$}  {:>20}  dtype\n", "name", "shape");
            for t in &infos {
                let usable = if t.shape.len() == 2
                    && ["f32", "f16", "bf16", "f64", "<f4", "<f2", "<f8"]
                        .contains(&t.dtype.as_str())
                {
                    ""
                } else {
                    "  (not a 2-D float table)"
                };
                out.push_str(&format!(
                    "{:width$}  {:>20}  {}{usable}\n",
                    t.name,
                    format!("{:?}", t.shape),
                    t.dtype
                ));
            }
            // The listing is the command's output: stdout, not the log.
            use std::io::Write;
            std::io::stdout()
                .write_all(out.as_bytes())
                .context("writing to stdout")?;
            Ok(())
        }
        FeaturesCommand::Project(args) => project(args),
    }
}

/// `--target` accepts a built-in name or `all`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TargetArg {
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
struct ConfigArgs {
    /// Target distribution: mog, grid, moons, rings, spiral, swissroll, or all (Fig. 5 grid; toy only).
    #[arg(long, value_parser = parse_target)]
    target: Option<TargetArg>,
    /// Your own 2D points: a CSV with two numeric columns x,y (header optional).
    #[arg(long, value_name = "FILE", conflicts_with = "target")]
    target_csv: Option<PathBuf>,
    /// Hyperparameter preset.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// A TOML config (every run writes one as config.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    prior_steps: Option<usize>,
    #[arg(long)]
    align_steps: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    depth: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    prior_lr: Option<f64>,
    /// EMA decay of the prior's weights (0 = off).
    #[arg(long)]
    ema: Option<f64>,
    #[arg(long)]
    align_lr: Option<f64>,
    #[arg(long)]
    n_latents: Option<usize>,
    /// (t, eps) draws per latent per alignment step.
    #[arg(long)]
    mc: Option<usize>,
    #[arg(long, value_enum)]
    reduction: Option<Reduction>,
    #[arg(long, value_enum)]
    init: Option<LatentInit>,
    /// Heatmap resolution (grid x grid).
    #[arg(long)]
    grid: Option<usize>,
    /// Number of t values in linspace(0.1, 0.9) for the L_align heatmap.
    #[arg(long)]
    t_values: Option<usize>,
    #[arg(long, value_enum)]
    view: Option<View>,
}

#[derive(Args)]
struct ToyArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Output folder.
    #[arg(long, default_value = "runs/toy")]
    out: PathBuf,
    /// Reuse a trained prior: a run folder (or its prior.safetensors) instead of training.
    #[arg(long, value_name = "PATH")]
    prior: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

impl ConfigArgs {
    /// The config for `target`: preset or file, then flags.
    fn config(&self, target: TargetKind) -> Result<ToyConfig> {
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
                cfg.target = target;
                cfg.points = None;
                cfg.target_csv = None;
            }
        } else {
            cfg.target = target;
        }
        if let Some(csv) = &self.target_csv {
            cfg.target_csv = Some(csv.clone());
            cfg.points = None;
        }
        macro_rules! set {
            ($flag:ident => $($field:tt)+) => {
                if let Some(v) = self.$flag { cfg.$($field)+ = v; }
            };
        }
        set!(seed => seed);
        set!(prior_steps => prior.steps);
        set!(align_steps => align.steps);
        set!(width => prior.width);
        set!(depth => prior.depth);
        set!(batch => prior.batch);
        set!(prior_lr => prior.lr);
        set!(ema => prior.ema);
        set!(align_lr => align.lr);
        set!(n_latents => align.n_latents);
        set!(mc => align.mc);
        set!(reduction => align.reduction);
        set!(init => align.init);
        set!(grid => eval.grid);
        set!(t_values => eval.t_values);
        set!(view => eval.view);
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ConfigArgs {
    /// Whether no config flag was given at all.
    #[cfg_attr(not(feature = "gui"), allow(dead_code))]
    fn is_empty(&self) -> bool {
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

#[derive(Args, Default)]
struct GuiArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Start with a trained prior (a `flowalign toy` run folder or its prior.safetensors): align at once.
    #[arg(long, value_name = "PATH")]
    prior: Option<PathBuf>,
    /// Start training as soon as the window opens.
    #[arg(long)]
    autostart: bool,
    /// Save a PNG of the window before exiting (with --exit-after).
    #[arg(long, value_name = "FILE.png")]
    screenshot: Option<PathBuf>,
    /// Close the window after this many seconds.
    #[arg(long, value_name = "SECS")]
    exit_after: Option<f64>,
    /// Show the prior's exact NLL (ODE) heatmap as panel (c).
    #[arg(long)]
    prior_nll: bool,
    /// Show the bound -(C(y) - L_align) of SPEC section 3 as a heatmap.
    #[arg(long)]
    bound: bool,
    /// Write frame-time and throughput statistics (JSON) when the window closes.
    #[arg(long, value_name = "FILE.json")]
    stats: Option<PathBuf>,
    /// Compute device of the training thread.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

#[cfg(feature = "gui")]
fn gui(args: GuiArgs) -> Result<()> {
    use flowalign::gui::{Launch, check_display};
    check_display()?;
    let cfg = if args.cfg.is_empty() {
        None
    } else {
        let target = match args.cfg.target {
            Some(TargetArg::All) => {
                bail!(
                    "--target all is for `flowalign toy`; the visualizer shows one target at a time"
                )
            }
            Some(TargetArg::One(kind)) => kind,
            None => TargetKind::Mog,
        };
        let mut cfg = args.cfg.config(target)?;
        // The window keeps its points inline, so a saved session does not depend on the CSV.
        if let Some(csv) = cfg.target_csv.take() {
            cfg.points = Some(flowalign::toy::targets::read_points_csv(&csv)?);
        }
        Some(cfg)
    };
    if args.screenshot.is_some() && args.exit_after.is_none() {
        bail!("--screenshot is taken when the window closes; add --exit-after SECS");
    }
    let (device, _) = select(args.device)?;
    let launch = Launch {
        cfg,
        prior: args.prior,
        autostart: args.autostart,
        screenshot: args.screenshot,
        exit_after: args.exit_after,
        stats: args.stats,
        prior_nll: args.prior_nll,
        bound: args.bound,
    };
    flowalign::gui::run(launch, device)?;
    Ok(())
}

#[cfg(not(feature = "gui"))]
fn gui(_: GuiArgs) -> Result<()> {
    bail!(
        "this build has no visualizer (built without the `gui` feature); use `flowalign toy`, or rebuild with default features"
    )
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

/// Runs one toy target into `out`.
fn run_toy(args: &ToyArgs, target: TargetKind, out: &Path) -> Result<ToyOutcome> {
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

    let run = ToyRun::new(cfg, device.clone(), device_name.clone())?;
    let prior = match &args.prior {
        Some(path) => {
            let (model, meta) = load_prior(path, &device)?;
            check_prior_fits(&meta, &run.target, path)?;
            Some((model, meta))
        }
        None => None,
    };
    tracing::info!(target = %run.target.name, device = %device_name, "toy run -> {}", out.display());
    flowalign::report::write_atomic(&out.join("config.toml"), run.cfg.to_toml().as_bytes())?;

    let mut pb: Option<ProgressBar> = None;
    let outcome = run.run(prior, &mut |event| {
        match event {
            Event::Stage { name, steps } => {
                if let Some(p) = pb.take() {
                    p.finish();
                }
                pb = Some(bar(steps, name));
            }
            Event::PriorStep { step, loss, lr } => {
                if let Some(p) = &pb {
                    p.set_position(step as u64);
                    if step % 20 == 0 {
                        p.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
                    }
                }
            }
            Event::AlignStep { step, loss, nll } => {
                if let Some(p) = &pb {
                    p.set_position(step as u64);
                    if step % 20 == 0 {
                        p.set_message(format!("L_align {loss:.4} NLL(y) {nll:.3}"));
                    }
                }
            }
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
        "{}: NLL(y) {:.3} -> {:.3}; heatmap Pearson {:.3} Spearman {:.3}; sample NLL {:.3} vs data {:.3}; bound {:.3} <= log p {:.3}; {:.1}s",
        s.target,
        s.align.nll_init,
        s.align.nll_final,
        s.heatmap.pearson,
        s.heatmap.spearman,
        s.prior.sample_nll,
        s.prior.data_nll,
        s.bound.mean_elbo,
        s.bound.mean_log_p,
        s.total_seconds
    );
    Ok(outcome)
}

fn toy(args: ToyArgs) -> Result<()> {
    match (args.cfg.target, &args.cfg.target_csv) {
        (Some(TargetArg::All), _) => {
            if args.prior.is_some() {
                bail!("--prior belongs to one target; drop it when using --target all");
            }
            let mut outcomes = Vec::new();
            for kind in TargetKind::ALL {
                outcomes.push(run_toy(&args, kind, &args.out.join(kind.name()))?);
            }
            figures::figure5(&args.out.join("figure5.png"), &outcomes)?;
            tracing::info!("wrote {}", args.out.join("figure5.png").display());
        }
        (Some(TargetArg::One(kind)), _) => {
            run_toy(&args, kind, &args.out)?;
        }
        (None, _) => {
            run_toy(&args, TargetKind::Mog, &args.out)?;
        }
    }
    tracing::info!("outputs in {}", args.out.display());
    Ok(())
}

/// An error as one line: the chain of causes, joined, skipping a cause the message already quotes.
fn error_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg.replace('\n', " ")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    // A backend's out-of-memory panic is caught and reported as an error by the trainers; any other
    // panic is a bug, reported on one line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        if !msg.to_lowercase().contains("out of memory") {
            let place = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            eprintln!(
                "error: internal error: {}{place}; this is a bug, please report it with the command line",
                msg.replace('\n', " ")
            );
        }
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        None => gui(GuiArgs::default()),
        Some(Command::Gui(args)) => gui(*args),
        Some(Command::Toy(args)) => toy(*args),
        Some(Command::Features(cmd)) => features(cmd),
        Some(Command::Prior(cmd)) => cli::prior::run(cmd),
        Some(Command::Ae(cmd)) => cli::ae::run(cmd),
        Some(Command::Bench(args)) => flowalign::bench::run(args).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::from(2)
        }
    }
}
