//! `flowalign features inspect|project`: target feature tables.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use flowalign::features::projection::{PAPER_SEED, ProjectionKind};
use flowalign::features::write_npy;
use flowalign::prior::config::DataConfig;
use flowalign::prior::data::project_table;

#[derive(Subcommand)]
pub enum FeaturesCommand {
    /// Print the name, shape and dtype of every tensor in FILE.
    Inspect {
        /// A .safetensors, .npy or .npz file, or a model in the Hugging Face cache
        /// (hf:ORG/NAME[/FILE]).
        file: String,
    },
    /// Scale a feature table by 1/std and project it to the latent dimension (METHOD.md section
    /// 2); write .npy.
    Project(ProjectArgs),
}

#[derive(Args)]
pub struct ProjectArgs {
    /// The table: FILE or FILE:TENSOR (.safetensors, .npy or .npz; f32, f16, bf16 or f64).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    features: String,
    /// The latent dimension d1.
    #[arg(long, default_value_t = 32)]
    latent_dim: usize,
    /// How features reach the latent dimension: auto (identity when the dims are equal, else
    /// random), random (the paper's fixed Gaussian map), avgpool, pca or identity.
    #[arg(long, value_enum, default_value_t = ProjectionKind::Auto)]
    projection: ProjectionKind,
    /// Seed of the random projection (the paper's is 42).
    #[arg(long, default_value_t = PAPER_SEED)]
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
    let start = std::time::Instant::now();
    let cfg = DataConfig {
        features: args.features,
        latent_dim: args.latent_dim,
        projection: args.projection,
        projection_seed: args.projection_seed,
        scale: args.scale,
        holdout: 0,
        drop_nonfinite: args.drop_nonfinite,
    };
    cfg.validate()?;
    let device = burn::prelude::Device::flex();
    let (info, projection, out) = project_table(&cfg, &device)?;
    write_npy(&args.out, out.rows, out.cols, &out.data)?;
    tracing::info!(
        "{} rows x {} -> {}: std {:.6} (scale {:.4}), {:?}; {:.2}s -> {}",
        info.rows,
        info.cols,
        out.cols,
        info.std,
        info.scale,
        projection.kind,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn inspect(file: String) -> Result<()> {
    let (file, _) = flowalign::hub::resolve(&file)?;
    let infos = flowalign::features::inspect(&file)?;
    let width = infos.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:width$}  {:>20}  dtype\n", "name", "shape");
    for t in &infos {
        let usable = if t.shape.len() == 2
            && ["f32", "f16", "bf16", "f64", "<f4", "<f2", "<f8"].contains(&t.dtype.as_str())
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
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
}

/// Runs one `features` subcommand.
pub fn run(cmd: FeaturesCommand) -> Result<()> {
    match cmd {
        FeaturesCommand::Inspect { file } => inspect(file),
        FeaturesCommand::Project(args) => project(args),
    }
}
