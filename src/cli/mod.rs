//! Subcommand front-ends over the library, and what the training commands share.

pub mod ae;
pub mod prior;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// A flag that the first Ctrl-C or SIGTERM sets (the trainer then checkpoints and stops); a
/// second one exits at once with code 130.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in signal_hook::consts::TERM_SIGNALS {
        signal_hook::flag::register_conditional_shutdown(*sig, 130, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(*sig, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    Ok(stop)
}

/// A progress bar over `total` steps named `what`, starting at step `from`.
pub fn train_bar(what: &str, total: usize, from: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}} ({{elapsed}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_position(from as u64);
    pb.reset_eta();
    pb
}

/// After a training run: when it was stopped by a signal (a checkpoint was written), say how to
/// continue and exit with code 130.
pub fn exit_if_stopped(interrupted: bool, step: usize) {
    if interrupted {
        tracing::info!("stopped at step {step}: checkpoint written; continue with --resume");
        std::process::exit(130);
    }
}
