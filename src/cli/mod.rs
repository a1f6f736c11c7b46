//! Subcommand front-ends over the library (one file per command), and what the training commands
//! share: the loop flags, the stop flag, progress bars, joining an MPI job, and error hints.

pub mod ae;
pub mod bench;
pub mod features;
pub mod generate;
pub mod gui;
pub mod hints;
pub mod metrics;
pub mod peak;
pub mod prior;
pub mod toy;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::prelude::Device;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use flowalign::backend::{DeviceChoice, select_at, select_many};
use flowalign::dist::Comm;
use flowalign::run::RunSettings;

/// Copies each flag that was given into its config field:
/// `set_fields!(args, cfg, { flag => field.path, ... })`.
#[macro_export]
macro_rules! set_fields {
    ($args:expr, $cfg:expr, { $($flag:ident => $($field:ident).+),+ $(,)? }) => {
        $( if let Some(v) = $args.$flag.clone() { $cfg.$($field).+ = v; } )+
    };
}

/// The loop flags every training command shares (they set the `[train]` table's shared keys).
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Items per step over all devices and ranks (feature vectors, images or latents).
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long)]
    warmup: Option<usize>,
    /// EMA decay of the weights that are evaluated and exported (0 = off).
    #[arg(long)]
    ema: Option<f64>,
    /// Seed of initialisation, batches and every draw.
    #[arg(long)]
    seed: Option<u64>,
    /// Write a checkpoint every this many steps (and at the end, and on Ctrl-C).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Log a metrics line every this many steps.
    #[arg(long)]
    log_every: Option<usize>,
    /// The forward pass's dtype: `f32`, or `bf16` (meant for GPUs; weights, gradients, optimiser
    /// state and EMA stay f32, so a resume may change it).
    #[arg(long, value_enum)]
    precision: Option<flowalign::precision::Precision>,
}

impl RunArgs {
    /// Sets the given flags in `run`.
    pub fn apply(&self, run: &mut RunSettings) {
        set_fields!(self, run, {
            steps => steps,
            batch => batch,
            lr => lr,
            warmup => warmup,
            ema => ema,
            seed => seed,
            checkpoint_every => checkpoint_every,
            log_every => log_every,
            precision => precision,
        });
    }
}

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
fn exit_if_stopped(interrupted: bool, step: usize) {
    if interrupted {
        tracing::info!("stopped at step {step}: checkpoint written; continue with --resume");
        std::process::exit(130);
    }
}

/// How a training command joins a multi-process (multi-machine) job.
#[derive(Args, Debug, Clone)]
pub struct DistArgs {
    /// Run as one rank of an MPI job: start every rank with `mpirun` or `srun` (see the README).
    /// Rank 0 reads and writes --out; each rank trains on its share of the global batch.
    #[arg(long, value_enum)]
    distributed: Option<Distributed>,
    /// `per-gpu`: one process per GPU, each on the GPU numbered by its rank on the machine;
    /// `per-machine`: one process per machine, driving --gpus GPUs.
    #[arg(long, value_enum, default_value_t = Layout::PerGpu)]
    layout: Layout,
    /// Seconds a rank waits for the others in one collective before it stops the whole job,
    /// naming the rank that did not arrive.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    comm_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Distributed {
    /// MPI (OpenMPI, MPICH, a cluster's own): needs a build with `--features mpi`.
    Mpi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    PerGpu,
    PerMachine,
}

impl DistArgs {
    /// Joins the job when --distributed is given.
    pub fn join(&self) -> Result<Option<Arc<Comm>>> {
        if self.distributed.is_none() {
            return Ok(None);
        }
        if self.comm_timeout == 0 {
            bail!("--comm-timeout must be at least 1 second");
        }
        let comm = Comm::mpi(Duration::from_secs(self.comm_timeout))?;
        let me = comm.rank();
        if me.rank == 0 {
            tracing::info!(
                "MPI job of {} ranks ({} on this machine)",
                me.size,
                me.local_size
            );
        }
        Ok(Some(Arc::new(comm)))
    }

    /// The devices this process trains on: `gpus` of `choice` alone or per machine, or the one
    /// numbered by this rank's place on its machine.
    pub fn devices(
        &self,
        choice: DeviceChoice,
        gpus: usize,
        comm: Option<&Comm>,
    ) -> Result<(Vec<Device>, String)> {
        if gpus == 0 {
            bail!("--gpus must be at least 1");
        }
        match (comm, self.layout) {
            (Some(c), Layout::PerGpu) => {
                if gpus > 1 {
                    bail!(
                        "--gpus {gpus} with --layout per-gpu: each rank drives one GPU; use --layout per-machine to drive {gpus} GPUs from one rank"
                    );
                }
                let (d, name) = select_at(choice, c.rank().local_rank)?;
                Ok((vec![d], name))
            }
            _ => Ok(select_many(choice, gpus)?),
        }
    }
}

/// Rank 0's config on every rank (each rank parses the same command line, but only rank 0 may
/// read the run folder, e.g. when resuming).
/// Where a run's config starts before the flags apply: `--config FILE` when given (read by
/// `from_file`), else the run's own `config.toml` when resuming a folder that has one, else
/// `fresh()` (a preset from the flags).
pub fn starting_config<C: flowalign::run::RunConfig>(
    file: Option<&std::path::Path>,
    resume: bool,
    out: &std::path::Path,
    from_file: fn(&std::path::Path) -> flowalign::Result<C>,
    fresh: impl FnOnce() -> Result<C>,
) -> Result<C> {
    use flowalign::checkpoint;
    Ok(if let Some(path) = file {
        from_file(path)?
    } else if resume && out.join(checkpoint::CONFIG).is_file() {
        checkpoint::read_config(out, C::COMMAND)?
    } else {
        fresh()?
    })
}

pub fn shared_config<C: Serialize + DeserializeOwned>(
    comm: Option<&Comm>,
    make: impl FnOnce() -> Result<C>,
) -> Result<C> {
    let Some(comm) = comm else {
        return make();
    };
    if comm.leads() {
        let cfg = make()?;
        let text = toml::to_string(&cfg).context("serialising the config")?;
        comm.broadcast(text.into_bytes(), "config")?;
        Ok(cfg)
    } else {
        let bytes = comm.broadcast(Vec::new(), "config")?;
        let text = String::from_utf8(bytes).context("rank 0 sent a config that is not UTF-8")?;
        toml::from_str(&text).context("rank 0 sent a config this rank cannot read")
    }
}

/// A training command from start to end: joins the job when --distributed asks for one, runs
/// `rank` (this process's part; it returns whether it was stopped and its last step) under
/// [`in_job`], and exits with code 130 when a signal stopped it.
pub fn run_training(
    dist: &DistArgs,
    rank: impl FnOnce(Option<Arc<Comm>>) -> Result<(bool, usize)>,
) -> Result<()> {
    let comm = dist.join()?;
    let (interrupted, step) = in_job(comm.clone(), || rank(comm))?;
    exit_if_stopped(interrupted, step);
    Ok(())
}

/// Runs `body` as this process's part of the job. On success the job ends cleanly; on an error
/// this rank prints it with its rank and stops every rank (`MPI_Abort`, exit code 2), so no rank is
/// left waiting. Without a job, `body`'s result is returned as is.
fn in_job<T>(comm: Option<Arc<Comm>>, body: impl FnOnce() -> Result<T>) -> Result<T> {
    let result = body();
    let Some(comm) = comm else {
        return result;
    };
    match result {
        Ok(v) => {
            comm.finish();
            Ok(v)
        }
        Err(e) => {
            eprintln!(
                "error: rank {}: {}",
                comm.rank().rank,
                hints::error_line(&e)
            );
            comm.abort(2)
        }
    }
}

/// A progress bar for rank 0 (or a lone process); hidden on the other ranks.
pub fn lead_bar(lead: bool, what: &str, total: usize, from: usize) -> ProgressBar {
    if lead {
        train_bar(what, total, from)
    } else {
        ProgressBar::hidden()
    }
}
