//! The `flowalign` command line: parses, dispatches to `cli/`, and prints errors on one line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// Training allocates and frees tensors of megabytes every step; glibc's malloc serves those with
/// fresh `mmap`s, so a quarter of CPU time went to page faults. mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc returns freed memory to the OS 10 ms after it is freed by default, so the next step
/// of a training loop faults it back in page by page (400,000 faults in a 20 s toy benchmark, 8 %
/// of CPU time zeroing pages). A delay of 10 s still left 6 % of a stage-1 step (256 x 3, batch
/// 1,024 x mc 4) in the kernel zeroing huge pages; never purging took that step from 3,105 to
/// 3,286 vectors/s. A run keeps its high-water mark, as PyTorch's caching allocators do;
/// `MIMALLOC_PURGE_DELAY` (milliseconds) overrides it.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an option mimalloc reads at each purge; no other thread is running yet.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

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
    Gui(Box<cli::gui::GuiArgs>),
    /// The 2D toy experiment: train a flow prior, align 1,000 latents, write figures and numbers.
    Toy(Box<cli::toy::ToyArgs>),
    /// Target feature files: list the tensors of a .safetensors, .npy or .npz file, or project one.
    #[command(subcommand)]
    Features(cli::features::FeaturesCommand),
    /// Stage 1 of the ImageNet recipe: train, evaluate and sample a flow prior on target features.
    #[command(subcommand)]
    Prior(cli::prior::PriorCommand),
    /// Stage 2 of the ImageNet recipe: an image autoencoder aligned to a frozen prior.
    #[command(subcommand)]
    Ae(cli::ae::AeCommand),
    /// Stage 3: a generator (MAR with a flow head) on an autoencoder's latents, its samples, and the
    /// generation metrics of the paper's Table 1.
    #[command(subcommand)]
    Gen(cli::generate::GenCommand),
    /// Throughput benchmarks (JSON), side by side with PyTorch when it is installed.
    Bench(cli::bench::BenchArgs),
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            // The window's toolkit logs its own fallbacks as warnings; our error line says what failed.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,eframe=error,egui_glow=error,winit=error".into()),
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
        let lower = msg.to_lowercase();
        if lower.contains("could not be loaded") || lower.contains("cannot open shared object") {
            // A system library a dependency opens at run time is missing: not our bug.
            eprintln!(
                "error: a system library is missing: {}; install it (see README, \"Quick start\")",
                msg.replace('\n', " ")
            );
        } else if !lower.contains("out of memory") {
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
    let result = match Cli::parse().command {
        None => cli::gui::run(cli::gui::GuiArgs::default()),
        Some(Command::Gui(args)) => cli::gui::run(*args),
        Some(Command::Toy(args)) => cli::toy::run(*args),
        Some(Command::Features(cmd)) => cli::features::run(cmd),
        Some(Command::Prior(cmd)) => cli::prior::run(cmd),
        Some(Command::Ae(cmd)) => cli::ae::run(cmd),
        Some(Command::Gen(cmd)) => cli::generate::run(cmd),
        Some(Command::Bench(args)) => cli::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::hints::error_line(&e));
            ExitCode::from(2)
        }
    }
}
