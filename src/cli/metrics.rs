//! `flowalign gen eval`: the generation metrics of the paper's Table 1 (METHOD.md section 8), or,
//! without Inception weights, a clearly labelled Fréchet distance between latents.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use flowalign::ae::latents::{LatentSet, read_latents_file};
use flowalign::backend::{DeviceChoice, select};
use flowalign::files::write_json;
use flowalign::metrics::fid::{FeatureStats, fid};
use flowalign::metrics::inception::Inception;
use flowalign::metrics::{GenMetricsOptions, Reference, evaluate_images, reference_cached};

#[derive(Args)]
pub struct GenEvalArgs {
    /// The generated images: a folder of PNGs (`gen sample --ae` writes OUT/images), or an .npz
    /// with uint8 `arr_0` [n, h, w, 3].
    #[arg(long)]
    images: Option<PathBuf>,
    /// The reference: a folder of images, or an ADM-style .npz with `mu`/`sigma` (MAR's
    /// `adm_in256_stats.npz`; FID only unless it also holds `arr_0` images or `pool3` rows).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Keep the reference folder's Inception statistics in this .npz: written on the first run,
    /// read by later runs with the same weights and image count (featurising a large reference
    /// once instead of per evaluation).
    #[arg(long, value_name = "FILE.npz")]
    reference_cache: Option<PathBuf>,
    /// The FID Inception-v3 weights (pt_inception-2015-12-05 as safetensors; the README says how
    /// to convert them), a file or an `hf:ORG/NAME[@REV][/FILE]` id in the local Hugging Face
    /// cache. Without them only the latent Fréchet distance below is computed.
    #[arg(long, value_name = "FILE")]
    inception: Option<String>,
    /// Generated latents (`gen sample` writes OUT/latents.safetensors), for the latent Fréchet
    /// distance that stands in when no Inception weights are given.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Reference latents: a latent cache `ae encode` wrote, for the latent Fréchet distance.
    #[arg(long)]
    reference_latents: Option<PathBuf>,
    /// Images per Inception forward pass.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Read images in subfolders too.
    #[arg(long)]
    recursive: bool,
    /// Where to write the report (JSON).
    #[arg(long, default_value = "eval.json")]
    out: PathBuf,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

/// What `gen eval` reports without Inception weights.
#[derive(Debug, Serialize)]
pub struct LatentReport {
    /// The Fréchet distance between the flattened latents' Gaussians: NOT the paper's FID (no
    /// Inception features), comparable only between runs on the same autoencoder.
    pub latent_frechet_distance: f64,
    pub generated: usize,
    pub reference: usize,
    pub note: &'static str,
}

/// Flattened latents, one row each, as Gaussian statistics.
fn latent_stats(rows: &[f32], per: usize) -> FeatureStats {
    let mut stats = FeatureStats::new(per);
    stats.add(rows);
    stats
}

/// Runs `gen eval`.
pub fn gen_eval(args: GenEvalArgs) -> Result<()> {
    let (device, device_name) = select(args.device)?;
    if let Some(weights) = &args.inception {
        let (Some(images), Some(reference)) = (&args.images, &args.reference) else {
            bail!("--inception needs --images DIR and --reference DIR|FILE.npz");
        };
        let (weights, _) = flowalign::hub::resolve(weights)?;
        let net = Inception::load(&weights, &device)?;
        let opts = GenMetricsOptions {
            batch: args.batch,
            recursive: args.recursive,
            ..GenMetricsOptions::default()
        };
        let reference = match &args.reference_cache {
            Some(cache) => reference_cached(reference, cache, &net, &opts)?,
            None => Reference::open(reference, args.recursive)?,
        };
        let report = evaluate_images(images, &reference, &net, &opts)?;
        write_json(&args.out, &report)?;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        tracing::info!(
            device = %device_name,
            "{} images: FID {:.4}, IS {}, KID {}, precision/recall {}; {:.1}s -> {}",
            report.generated_images,
            report.fid,
            opt(report
                .inception_score
                .as_ref()
                .map(|s| format!("{:.3} +- {:.3}", s.mean, s.std))),
            opt(report.kid.as_ref().map(|k| format!("{:.5} +- {:.5}", k.mean, k.std))),
            opt(report
                .precision_recall
                .as_ref()
                .map(|p| format!("{:.4} / {:.4}", p.precision, p.recall))),
            report.seconds,
            args.out.display()
        );
        for note in &report.notes {
            tracing::info!("{note}");
        }
        return Ok(());
    }
    tracing::warn!(
        "no --inception weights: FID, IS, KID and precision/recall need the FID Inception-v3 \
         (pt_inception-2015-12-05; see the README); computing the Fréchet distance between latents instead"
    );
    let (Some(generated), Some(reference)) = (&args.latents, &args.reference_latents) else {
        bail!(
            "without --inception, give --latents FILE.safetensors (from gen sample) and --reference-latents DIR (from ae encode) for the latent Fréchet distance, or pass --inception FILE"
        );
    };
    let (gen_rows, tokens, dim) = read_latents_file(generated)?;
    let set = LatentSet::read(reference)?;
    if (set.stats.tokens, set.stats.dim) != (tokens, dim) {
        bail!(
            "{} holds {tokens} x {dim} latents but {} holds {} x {}",
            generated.display(),
            reference.display(),
            set.stats.tokens,
            set.stats.dim
        );
    }
    let per = tokens * dim;
    let report = LatentReport {
        latent_frechet_distance: fid(
            &latent_stats(&gen_rows, per),
            &latent_stats(&set.latents, per),
        )?,
        generated: gen_rows.len() / per,
        reference: set.len(),
        note: "Fréchet distance of flattened latents, not FID: no Inception weights were given",
    };
    write_json(&args.out, &report).with_context(|| write_hint(&args.out))?;
    tracing::info!(
        "latent Fréchet distance {:.4} ({} generated vs {} reference latents; not FID) -> {}",
        report.latent_frechet_distance,
        report.generated,
        report.reference,
        args.out.display()
    );
    Ok(())
}

fn write_hint(out: &Path) -> String {
    format!("writing {}; choose another --out", out.display())
}
