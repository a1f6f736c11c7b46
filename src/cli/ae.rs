//! `flowalign ae train`: stage 2 of the ImageNet recipe (METHOD.md section 6).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use flowalign::ae::config::{AeConfig, AePreset};
use flowalign::ae::model::VitSize;
use flowalign::ae::train::AeRun;
use flowalign::backend::{DeviceChoice, select};
use flowalign::dist::Comm;

#[derive(Subcommand)]
pub enum AeCommand {
    /// Train an image autoencoder whose 64 x 32 latent tokens are aligned to a frozen flow prior.
    Train(Box<TrainArgs>),
    /// Reconstruction quality on a folder of images: PSNR, SSIM, rFID (with --inception), and a
    /// reconstructions grid.
    Eval(EvalArgs),
    /// Cache the latents of a folder of images as sharded safetensors, with labels and statistics
    /// (and with --flip those of the mirrored images): what `gen train` reads.
    Encode(EncodeArgs),
    /// Decode latents into PNG images: a latent cache folder, or a .safetensors file holding a
    /// `latents` tensor `[n, tokens, dim]` (what `gen sample` writes).
    Decode(DecodeArgs),
}

#[derive(Args)]
pub struct DecodeArgs {
    /// An `ae train` run folder (EMA weights when kept).
    #[arg(long)]
    ae: PathBuf,
    /// The latents: a folder `ae encode` wrote, or a .safetensors file with a `latents` tensor.
    #[arg(long)]
    latents: PathBuf,
    /// Output folder for NNNNNN.png.
    #[arg(long)]
    out: PathBuf,
    /// At most this many latents, in order.
    #[arg(long)]
    max: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

#[derive(Args)]
pub struct EvalArgs {
    /// An `ae train` run folder (its latest checkpoint; EMA weights when kept).
    #[arg(long)]
    ae: PathBuf,
    /// Images to reconstruct (an ImageNet-style folder; centre crops).
    #[arg(long)]
    data: PathBuf,
    /// At most this many images (in sorted order).
    #[arg(long, default_value_t = 50_000)]
    max_images: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Where to write eval.json and eval-recon.png (default: the run folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// FID Inception-v3 weights as safetensors (pytorch-fid's pt_inception-2015-12-05, converted:
    /// see the README), for rFID: a file or a hub id `hf:ORG/NAME[/FILE]`. Without them rFID is
    /// skipped (with a notice).
    #[arg(long, value_name = "FILE")]
    inception: Option<String>,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

#[derive(Args)]
pub struct EncodeArgs {
    /// An `ae train` run folder.
    #[arg(long)]
    ae: PathBuf,
    /// Images to encode (an ImageNet-style folder; centre crops).
    #[arg(long)]
    data: PathBuf,
    /// Output folder: latents-NNNNN.safetensors, stats.json, classes.txt.
    #[arg(long)]
    out: PathBuf,
    /// Images per shard.
    #[arg(long, default_value_t = 10_000)]
    shard_size: usize,
    /// Also store the latents of each image's horizontal flip (`latents_flip`), which the
    /// generator picks with probability 0.5 (METHOD.md section 7).
    #[arg(long)]
    flip: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Compute device: auto (a GPU when built with one, else the CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

fn eval(args: EvalArgs) -> Result<()> {
    use flowalign::ae::eval::{evaluate, load_autoencoder};
    use flowalign::report::write_image_grid;
    let (device, device_name) = select(args.device)?;
    let (cfg, model, step) = load_autoencoder(&args.ae, &device)?;
    let inception = match &args.inception {
        Some(file) => {
            let (path, _) = flowalign::hub::resolve(file)?;
            Some(flowalign::metrics::inception::Inception::load(
                &path, &device,
            )?)
        }
        None => {
            tracing::info!(
                "rFID is off: pass --inception FILE (the FID Inception-v3 weights as safetensors; see the README) to add it"
            );
            None
        }
    };
    let folder = flowalign::ae::data::ImageFolder::scan(&args.data)?;
    let start = std::time::Instant::now();
    let size = cfg.model.image_size;
    let (mut report, top, bottom) = evaluate(
        &model,
        inception.as_ref(),
        &folder,
        size,
        args.max_images,
        args.batch,
        &device,
    )?;
    report.step = step;
    let out = args.out.unwrap_or_else(|| args.ae.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    flowalign::files::write_json(&out.join("eval.json"), &report)?;
    write_image_grid(&out.join("eval-recon.png"), &top, &bottom, size)?;
    let rfid = match report.rfid {
        // FID's bias grows as the set shrinks.
        Some(f) if report.images < 10_000 => {
            format!(
                ", rFID {f:.4} (on {} images: biased high below ~10k)",
                report.images
            )
        }
        Some(f) => format!(", rFID {f:.4}"),
        None => String::new(),
    };
    tracing::info!(
        device = %device_name,
        "{} images at step {}: PSNR {:.3} dB, SSIM {:.4}{rfid}; {:.1}s -> {}",
        report.images,
        step,
        report.psnr,
        report.ssim,
        start.elapsed().as_secs_f64(),
        out.join("eval.json").display()
    );
    Ok(())
}

fn encode(args: EncodeArgs) -> Result<()> {
    use flowalign::ae::eval::load_autoencoder;
    use flowalign::ae::latents::{EncodeOptions, encode_folder};
    let (device, _) = select(args.device)?;
    let (cfg, model, step) = load_autoencoder(&args.ae, &device)?;
    let folder = flowalign::ae::data::ImageFolder::scan(&args.data)?;
    let start = std::time::Instant::now();
    let stats = encode_folder(
        &model,
        &folder,
        cfg.model.image_size,
        &args.out,
        EncodeOptions {
            shard_size: args.shard_size,
            batch: args.batch,
            flip: args.flip,
        },
        &device,
    )?;
    tracing::info!(
        "{} images{} -> {} x {} latents each (checkpoint step {step}) in {} shards; std {:.4}, generator scale {:.4}; {:.1}s -> {}",
        stats.images,
        if stats.flipped {
            " and their flips"
        } else {
            ""
        },
        stats.tokens,
        stats.dim,
        stats.shards.len(),
        stats.std,
        stats.scale,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// An ImageNet-style folder of JPEG/PNG images (class/xxx.JPEG, any depth).
    #[arg(long)]
    data: Option<String>,
    /// A `flowalign prior train` run folder: its frozen prior aligns the latents.
    #[arg(long)]
    prior: Option<String>,
    /// The run folder: config, metrics, checkpoints, recon.png.
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Starting values: `paper` (ViT-L, METHOD.md section 6; the default) or `small` (a CPU smoke run).
    #[arg(long, value_enum)]
    preset: Option<AePreset>,
    /// A TOML config (every run writes one as config.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Start the encoder from DINOv2 weights (Hugging Face Dinov2Model safetensors of the --model
    /// size, a file or a hub id such as hf:facebook/dinov2-large): patch embedding resampled to
    /// --patch, position embeddings interpolated.
    #[arg(long, value_name = "FILE")]
    encoder_init: Option<String>,
    /// LPIPS-VGG weights: the lpips package's `LPIPS(net="vgg").state_dict()` as safetensors.
    /// Without them LPIPS is off (with a notice).
    #[arg(long, value_name = "FILE")]
    lpips_weights: Option<String>,
    /// DINOv2 weights (Hugging Face Dinov2Model safetensors of loss.adv.model.size, ViT-S in the
    /// paper preset; a file or a hub id such as hf:facebook/dinov2-small) for the discriminator's
    /// frozen trunk; random (and frozen) without.
    #[arg(long, value_name = "FILE")]
    disc_init: Option<String>,
    /// The weight of the adversarial term (paper: 0.2; 0 = off, the small preset's default).
    #[arg(long)]
    adv_weight: Option<f64>,
    /// Steps before the adversarial term and the discriminator start (paper: 20,000).
    #[arg(long)]
    adv_start: Option<usize>,
    /// The LPIPS weight (paper: 1.0, reached over --lpips-warmup steps).
    #[arg(long)]
    lpips: Option<f64>,
    /// Steps over which LPIPS ramps up linearly to its weight (paper: 10,000).
    #[arg(long)]
    lpips_warmup: Option<usize>,
    /// The ViT size of encoder and decoder.
    #[arg(long, value_enum)]
    model: Option<VitSize>,
    /// Side of the square training crops, in pixels (paper: 256).
    #[arg(long)]
    image_size: Option<usize>,
    /// ViT patch size (paper: 16).
    #[arg(long)]
    patch: Option<usize>,
    /// Latent tokens per image (paper: 64).
    #[arg(long)]
    latent_tokens: Option<usize>,
    /// Dimension of each latent token (paper: 32; the prior's latent dim).
    #[arg(long)]
    latent_dim: Option<usize>,
    /// The weight of L_align (0 = a plain autoencoder; paper: 0.01, mean-reduced).
    #[arg(long)]
    lambda: Option<f64>,
    /// (t, eps) draws per latent token for L_align.
    #[arg(long)]
    mc: Option<usize>,
    #[command(flatten)]
    run: super::RunArgs,
    /// Score the alignment monitor (L_align and log r_5 of fixed images' tokens) every this many
    /// steps.
    #[arg(long)]
    monitor_every: Option<usize>,
    /// Write recon.png (8 images over their reconstructions) every this many steps.
    #[arg(long)]
    recon_every: Option<usize>,
    /// Images smaller than the crop: upscale them (default), skip them, or stop with an error.
    #[arg(long, value_enum)]
    small_images: Option<flowalign::ae::data::SmallImages>,
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
    fn config(&self) -> Result<AeConfig> {
        let mut cfg = super::starting_config(
            self.config.as_deref(),
            self.resume,
            &self.out,
            AeConfig::from_toml_file,
            || {
                let (Some(data), Some(prior)) = (&self.data, &self.prior) else {
                    bail!(
                        "--data DIR and --prior RUN are required (or --config F.toml, or --resume)"
                    );
                };
                Ok(AeConfig::preset(
                    self.preset.unwrap_or(AePreset::Paper),
                    data,
                    prior,
                ))
            },
        )?;
        if let (Some(p), true) = (self.preset, self.config.is_some() || self.resume) {
            let base = AeConfig::preset(p, &cfg.data, &cfg.prior);
            (cfg.model, cfg.loss, cfg.train, cfg.preset) = (base.model, base.loss, base.train, p);
        }
        if let Some(d) = &self.data {
            cfg.data = d.clone();
        }
        if let Some(p) = &self.prior {
            cfg.prior = p.clone();
        }
        if let Some(f) = &self.encoder_init {
            cfg.encoder_init = Some(f.clone());
        }
        if let Some(f) = &self.lpips_weights {
            cfg.lpips_weights = Some(f.clone());
        }
        if let Some(f) = &self.disc_init {
            cfg.disc_init = Some(f.clone());
        }
        crate::set_fields!(self, cfg, {
            model => model.size,
            image_size => model.image_size,
            patch => model.patch,
            latent_tokens => model.latent_tokens,
            latent_dim => model.latent_dim,
            lambda => loss.lambda,
            mc => loss.mc,
            lpips => loss.lpips,
            lpips_warmup => loss.lpips_warmup,
            adv_weight => loss.adv.weight,
            adv_start => loss.adv.start_step,
            monitor_every => train.monitor_every,
            recon_every => train.recon_every,
            small_images => train.small_images,
        });
        self.run.apply(&mut cfg.train.run);
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
    let run = AeRun::open(cfg.clone(), &args.out, args.resume, &devices[0], comm)?;
    let mut run = run.with_replicas(&devices);
    let (depth, width, heads) = cfg.model.size.dims();
    if lead {
        tracing::info!(
            device = %device_name,
            "{} images; ViT {depth} x {width} ({heads} heads) at {} px, patch {}, {} latent tokens x {}; lambda {}",
            run.images(),
            cfg.model.image_size,
            cfg.model.patch,
            cfg.model.latent_tokens,
            cfg.model.latent_dim,
            cfg.loss.lambda
        );
        let adv = &cfg.loss.adv;
        if adv.enabled() {
            tracing::info!(
                "adversarial term: weight {} from step {}, DINO {:?} discriminator (taps {:?}), DiffAugment p {}, CR {}, LeCAM {}",
                adv.weight,
                adv.start_step,
                adv.model.size,
                adv.model.taps,
                adv.diffaug_p,
                adv.cr_weight,
                adv.lecam_weight
            );
        }
        if run.step() > 0 {
            tracing::info!("resuming {} at step {}", args.out.display(), run.step());
        }
    }
    let stop = super::stop_flag()?;
    let pb = super::lead_bar(lead, "ae", cfg.train.run.steps, run.step());
    let summary = run.run(
        || stop.load(Ordering::Relaxed),
        |m| {
            pb.set_position(m.step as u64);
            let mon = match (m.monitor_l_align, m.monitor_log_rk) {
                (Some(a), Some(r)) => format!(" | monitor L_align {a:.4} log r_5 {r:.3}"),
                (Some(a), None) => format!(" | monitor L_align {a:.4}"),
                _ => String::new(),
            };
            let adv = match (m.adv.g_adv, m.adv.d_loss, m.adv.d_real, m.adv.d_fake) {
                (Some(g), Some(d), Some(r), Some(f)) => {
                    format!(" | g_adv {g:.3} d_loss {d:.3} D(real) {r:.2} D(fake) {f:.2}")
                }
                _ => String::new(),
            };
            pb.set_message(format!(
                "loss {:.4} psnr {:.2} L_align {:.4} lr {:.2e} {:.1} img/s{adv}{mon}",
                m.loss, m.psnr, m.l_align, m.lr, m.images_per_s
            ));
            if lead && pb.is_hidden() {
                tracing::info!(
                    step = m.step,
                    loss = m.loss,
                    psnr = m.psnr,
                    l_align = m.l_align,
                    g_adv = m.adv.g_adv,
                    d_loss = m.adv.d_loss,
                    d_real = m.adv.d_real,
                    d_fake = m.adv.d_fake,
                    lecam = m.adv.lecam,
                    cr = m.adv.cr,
                    images_per_s = m.images_per_s,
                    monitor_l_align = m.monitor_l_align,
                    monitor_log_rk = m.monitor_log_rk
                );
            }
        },
    );
    pb.finish_and_clear();
    let summary = summary?.run;
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

fn decode(args: DecodeArgs) -> Result<()> {
    use flowalign::ae::eval::load_autoencoder;
    use flowalign::ae::latents::{LatentSet, decode_to_pngs, read_latents_file};
    let (device, _) = select(args.device)?;
    let (cfg, model, _) = load_autoencoder(&args.ae, &device)?;
    let (mut latents, tokens, dim) = if args.latents.is_dir() {
        let set = LatentSet::read(&args.latents)?;
        (set.latents, set.stats.tokens, set.stats.dim)
    } else {
        read_latents_file(&args.latents)?
    };
    if (tokens, dim) != (cfg.model.latent_tokens, cfg.model.latent_dim) {
        bail!(
            "{} holds {tokens} x {dim} latents but the autoencoder in {} decodes {} x {}",
            args.latents.display(),
            args.ae.display(),
            cfg.model.latent_tokens,
            cfg.model.latent_dim
        );
    }
    if let Some(max) = args.max {
        latents.truncate(max * tokens * dim);
    }
    let start = std::time::Instant::now();
    let written = decode_to_pngs(
        &model, &latents, tokens, dim, &args.out, args.batch, &device,
    )?;
    tracing::info!(
        "{} images in {:.1}s -> {}",
        written.len(),
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// Runs one `ae` subcommand.
pub fn run(cmd: AeCommand) -> Result<()> {
    match cmd {
        AeCommand::Train(args) => train(*args),
        AeCommand::Eval(args) => eval(args),
        AeCommand::Encode(args) => encode(args),
        AeCommand::Decode(args) => decode(args),
    }
}
