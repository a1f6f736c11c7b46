//! `flowalign gui` (the default command): the desktop visualizer.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use flowalign::backend::DeviceChoice;

use super::toy::ConfigArgs;

#[derive(Args, Default)]
pub struct GuiArgs {
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
    /// Show the estimate the paper calls a bound, -(C(y) - L_align), as a heatmap (METHOD.md
    /// section 3).
    #[arg(long)]
    bound: bool,
    /// Write frame-time and throughput statistics (JSON) when the window closes.
    #[arg(long, value_name = "FILE.json")]
    stats: Option<PathBuf>,
    /// Compute device of the training thread: auto, cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

/// Runs the visualizer.
#[cfg(feature = "gui")]
pub fn run(args: GuiArgs) -> Result<()> {
    use anyhow::bail;
    use flowalign::gui::{Launch, check_display};
    use flowalign::toy::TargetKind;

    use super::toy::TargetArg;

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
    let (device, _) = flowalign::backend::select(args.device)?;
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

/// A build without the `gui` feature has no window.
#[cfg(not(feature = "gui"))]
pub fn run(_: GuiArgs) -> Result<()> {
    anyhow::bail!(
        "this build has no visualizer (built without the `gui` feature); use `flowalign toy`, or rebuild with default features"
    )
}
