//! The configuration of an autoencoder run (stage 2 of METHOD.md section 6), as data.

use serde::{Deserialize, Serialize};

use super::model::{AeModelConfig, VitSize};
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::run::{Extra, RunConfig, RunSettings};
use crate::train::OptimSpec;

/// Named starting points for an autoencoder run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AePreset {
    /// METHOD.md section 6: ViT-L at 256 px, patch 16, batch 256, 50k steps, lambda 0.01.
    Paper,
    /// A CPU smoke run: the tiny ViT at 64 px, patch 8, batch 16, 500 steps.
    Small,
}

/// The adversarial term (METHOD.md section 6): a DINO-feature discriminator with the hinge loss,
/// DiffAugment, consistency regularisation and LeCAM, as SoftVQ-VAE trains it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvConfig {
    /// Weight of the generator's hinge loss `-mean D(aug(x_rec))` (paper 0.2; 0 = off, no
    /// discriminator is built).
    pub weight: f64,
    /// Steps taken before the term and the discriminator's training start (paper 20,000).
    pub start_step: usize,
    /// Probability of each DiffAugment policy (color, translation 1/8, cutout 1/2) per step.
    pub diffaug_p: f64,
    /// Weight of the consistency regularisation of the discriminator (bCR; paper 4.0).
    pub cr_weight: f64,
    /// Weight of the LeCAM regulariser of the discriminator (paper 0.001).
    pub lecam_weight: f64,
    /// Decay of LeCAM's running means of the real and fake logits.
    pub lecam_decay: f64,
    /// The discriminator's base learning rate (it follows the autoencoder's schedule).
    pub lr: f64,
    pub optim: OptimSpec,
    pub model: super::discriminator::DiscModelConfig,
}

impl AdvConfig {
    /// METHOD.md section 6 with SoftVQ-VAE's discriminator (DINO ViT-S, taps 2, 5, 8, 11, kernel 9):
    /// weight 0.2 from step 20k, DiffAugment p 0.5, CR 4.0, LeCAM 0.001 (decay 0.99), the
    /// discriminator on AdamW with the autoencoder's settings.
    pub fn paper() -> AdvConfig {
        AdvConfig {
            weight: 0.2,
            start_step: 20_000,
            diffaug_p: 0.5,
            cr_weight: 4.0,
            lecam_weight: 0.001,
            lecam_decay: 0.99,
            lr: 1e-4,
            optim: OptimSpec::PAPER_ADAMW,
            model: super::discriminator::DiscModelConfig {
                size: VitSize::VitS,
                patch: 16,
                taps: vec![2, 5, 8, 11],
                kernel: 9,
            },
        }
    }

    /// Whether the term is part of the loss at all.
    pub fn enabled(&self) -> bool {
        self.weight > 0.0
    }

    /// Whether the term and the discriminator's step run at `step` (steps taken so far).
    pub fn active(&self, step: usize) -> bool {
        self.enabled() && step >= self.start_step
    }
}

impl Default for AdvConfig {
    /// Off; the paper's values otherwise (a config written before the term existed reads as this).
    fn default() -> Self {
        AdvConfig {
            weight: 0.0,
            ..AdvConfig::paper()
        }
    }
}

/// The loss weights (METHOD.md section 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeLossConfig {
    /// Weight of the pixel L2 loss.
    pub l2: f64,
    /// lambda, the weight of L_align on the latent tokens (0 = a plain autoencoder).
    pub lambda: f64,
    /// (t, eps) draws per latent token for L_align.
    pub mc: usize,
    /// Weight of LPIPS-VGG (needs `lpips_weights`), reached linearly over `lpips_warmup` steps.
    #[serde(default)]
    pub lpips: f64,
    #[serde(default)]
    pub lpips_warmup: usize,
    /// The adversarial term (`[loss.adv]`; off when absent).
    #[serde(default)]
    pub adv: AdvConfig,
}

/// The optimisation: the shared loop settings plus the autoencoder's monitors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AeTrainConfig {
    /// Steps, images per step (`batch`), learning rate and the rest of the loop.
    #[serde(flatten)]
    pub run: RunSettings,
    /// Write `recon.png` (8 images and their reconstructions) every this many steps.
    pub recon_every: usize,
    /// Log L_align and log r_k of the latent tokens of fixed images every this many steps
    /// (paper Fig. 4).
    pub monitor_every: usize,
    /// Images whose latent tokens the monitor scores.
    pub monitor_images: usize,
    /// Images smaller than the crop: upscale (default), skip or error.
    #[serde(default)]
    pub small_images: super::data::SmallImages,
    /// Unknown keys, refused by [`AeConfig::validate`].
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

/// A complete autoencoder run: what `--config` reads and every run writes as `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeConfig {
    pub preset: AePreset,
    /// The training images (an ImageNet-style folder).
    pub data: String,
    /// The `prior train` run whose frozen prior the latents are aligned to.
    pub prior: String,
    /// DINOv2 weights (Hugging Face `Dinov2Model` safetensors) to start the encoder from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_init: Option<String>,
    /// LPIPS-VGG weights (the `lpips` package's state dict as safetensors); LPIPS is off without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lpips_weights: Option<String>,
    /// DINOv2 weights (Hugging Face `Dinov2Model` safetensors of `loss.adv.model.size`) for the
    /// discriminator's frozen trunk; random (and frozen) without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disc_init: Option<String>,
    pub model: AeModelConfig,
    pub loss: AeLossConfig,
    pub train: AeTrainConfig,
}

impl AeConfig {
    /// The values of `preset` for the images `data` and the prior run `prior`.
    pub fn preset(preset: AePreset, data: &str, prior: &str) -> AeConfig {
        let paper = AeConfig {
            preset,
            data: data.to_string(),
            prior: prior.to_string(),
            encoder_init: None,
            lpips_weights: None,
            disc_init: None,
            model: AeModelConfig {
                size: VitSize::VitL,
                image_size: 256,
                patch: 16,
                latent_tokens: 64,
                latent_dim: 32,
            },
            loss: AeLossConfig {
                l2: 1.0,
                lambda: 0.01,
                mc: 4,
                lpips: 1.0,
                lpips_warmup: 10_000,
                adv: AdvConfig::paper(),
            },
            train: AeTrainConfig {
                run: RunSettings {
                    steps: 50_000,
                    batch: 256,
                    lr: 1e-4,
                    warmup: 2_500,
                    final_lr_frac: 0.1,
                    optim: OptimSpec::PAPER_ADAMW,
                    ema: 0.9999,
                    seed: 0,
                    checkpoint_every: 2_000,
                    log_every: 50,
                    // The paper trains in bf16 on GPUs; the precision setting asks for it.
                    precision: Precision::F32,
                },
                recon_every: 1_000,
                monitor_every: 1_000,
                monitor_images: 157, // 10,048 latent tokens
                small_images: super::data::SmallImages::Upscale,
                extra: Extra::new(),
            },
        };
        match preset {
            AePreset::Paper => paper,
            AePreset::Small => AeConfig {
                model: AeModelConfig {
                    size: VitSize::Tiny,
                    image_size: 64,
                    patch: 8,
                    ..paper.model
                },
                // Off; `--adv-weight` turns on a cheap version (the tiny trunk at patch 8).
                loss: AeLossConfig {
                    adv: AdvConfig {
                        weight: 0.0,
                        start_step: 250,
                        lr: 1e-3,
                        model: super::discriminator::DiscModelConfig {
                            size: VitSize::Tiny,
                            patch: 8,
                            taps: vec![0, 1],
                            kernel: 9,
                        },
                        ..AdvConfig::paper()
                    },
                    ..paper.loss.clone()
                },
                train: AeTrainConfig {
                    run: RunSettings {
                        steps: 500,
                        batch: 16,
                        lr: 1e-3,
                        warmup: 50,
                        ema: 0.999,
                        checkpoint_every: 100,
                        log_every: 10,
                        ..paper.train.run.clone()
                    },
                    recon_every: 100,
                    monitor_every: 100,
                    monitor_images: 32,
                    ..paper.train.clone()
                },
                ..paper
            },
        }
    }

    /// Reads a TOML config; unknown keys and bad values are errors naming the file.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        crate::config::read_toml(path, "ae", Self::validate)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("an AeConfig always serialises")
    }

    /// Checks every value is usable, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        self.model
            .validate()
            .map_err(|msg| Error::setting("model", msg))?;
        let t = &self.train;
        t.run.validate(&t.extra)?;
        crate::config::require_counts(&[
            ("loss.mc", self.loss.mc),
            ("train.recon_every", t.recon_every),
            ("train.monitor_every", t.monitor_every),
            ("train.monitor_images", t.monitor_images),
        ])?;
        let adv = &self.loss.adv;
        for (key, v) in [
            ("loss.l2", self.loss.l2),
            ("loss.lambda", self.loss.lambda),
            ("loss.lpips", self.loss.lpips),
            ("loss.adv.weight", adv.weight),
            ("loss.adv.cr_weight", adv.cr_weight),
            ("loss.adv.lecam_weight", adv.lecam_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::setting(key, format!("must be at least 0, got {v}")));
            }
        }
        if adv.enabled() {
            crate::config::require_positive(&[("loss.adv.lr", adv.lr)])?;
            if !(0.0..=1.0).contains(&adv.diffaug_p) {
                return Err(Error::setting(
                    "loss.adv.diffaug_p",
                    format!("must lie in [0, 1], got {}", adv.diffaug_p),
                ));
            }
            if !(0.0..1.0).contains(&adv.lecam_decay) {
                return Err(Error::setting(
                    "loss.adv.lecam_decay",
                    format!("must lie in [0, 1), got {}", adv.lecam_decay),
                ));
            }
            adv.model
                .validate(self.model.image_size)
                .map_err(|msg| Error::setting("loss.adv.model", msg))?;
        }
        Ok(())
    }
}

impl RunConfig for AeConfig {
    const COMMAND: &'static str = "ae train";

    fn settings(&self) -> &RunSettings {
        &self.train.run
    }

    /// Fails with the first field a resume may not change.
    fn check_resumable(&self, saved: &AeConfig) -> Result<()> {
        let fields = |c: &AeConfig| {
            vec![
                ("data", c.data.clone()),
                ("prior", c.prior.clone()),
                ("model", format!("{:?}", c.model)),
                ("loss", format!("{:?}", c.loss)),
                ("train.batch", c.train.run.batch.to_string()),
                ("train.seed", c.train.run.seed.to_string()),
                ("train.ema", c.train.run.ema.to_string()),
                // The discriminator's frozen trunk is rebuilt from it at every start.
                ("disc_init", format!("{:?}", c.disc_init)),
            ]
        };
        crate::checkpoint::check_resumable(&fields(self), &fields(saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_and_paper_is_the_spec() {
        for preset in [AePreset::Paper, AePreset::Small] {
            let cfg = AeConfig::preset(preset, "imagenet/train", "runs/prior");
            cfg.validate().unwrap();
            let back: AeConfig = toml::from_str(&cfg.to_toml()).unwrap();
            assert_eq!(back, cfg);
        }
        let p = AeConfig::preset(AePreset::Paper, "d", "p");
        assert_eq!(p.model.size.dims(), (24, 1024, 16));
        assert_eq!((p.model.latent_tokens, p.model.latent_dim), (64, 32));
        assert_eq!((p.loss.lambda, p.loss.mc), (0.01, 4));
        assert_eq!(
            (p.train.run.batch, p.train.run.steps, p.train.run.lr),
            (256, 50_000, 1e-4)
        );
        let text = p.to_toml().replace("[loss]", "[loss]\nlambdaa = 1");
        let err = toml::from_str::<AeConfig>(&text).unwrap_err().to_string();
        assert!(err.contains("lambdaa"), "{err}");
    }

    #[test]
    fn the_adversarial_table_has_the_spec_values_and_is_checked() {
        let p = AeConfig::preset(AePreset::Paper, "d", "p");
        let a = &p.loss.adv;
        assert_eq!((a.weight, a.start_step), (0.2, 20_000));
        assert_eq!(
            (a.diffaug_p, a.cr_weight, a.lecam_weight),
            (0.5, 4.0, 0.001)
        );
        assert_eq!(a.model.taps, vec![2, 5, 8, 11]);
        assert!(!a.active(19_999) && a.active(20_000));
        let small = AeConfig::preset(AePreset::Small, "d", "p");
        assert!(!small.loss.adv.enabled());
        // Unknown keys in [loss.adv] are errors.
        let text = p
            .to_toml()
            .replace("[loss.adv]", "[loss.adv]\ncr_weigth = 1");
        let err = toml::from_str::<AeConfig>(&text).unwrap_err().to_string();
        assert!(err.contains("cr_weigth"), "{err}");
        // A config written before the term existed reads as the term off.
        let start = text.find("[loss.adv]").unwrap();
        let end = text[start..].find("[train]").unwrap() + start;
        let old: AeConfig = toml::from_str(&(text[..start].to_string() + &text[end..])).unwrap();
        assert!(!old.loss.adv.enabled());
        assert_eq!(old.train, p.train);
        // Bad values name their key.
        let mut bad = p.clone();
        bad.loss.adv.diffaug_p = 1.5;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("diffaug_p")
        );
        let mut bad = p.clone();
        bad.loss.adv.model.taps = vec![12];
        assert!(bad.validate().unwrap_err().to_string().contains("taps"));
        // A resume keeps the term and the discriminator's trunk as they were.
        let mut changed = p.clone();
        changed.loss.adv.start_step = 10;
        let err = changed.check_resumable(&p).unwrap_err().to_string();
        assert!(err.contains("loss is"), "{err}");
        let mut changed = p.clone();
        changed.disc_init = Some("dinov2-small.safetensors".into());
        let err = changed.check_resumable(&p).unwrap_err().to_string();
        assert!(err.contains("disc_init"), "{err}");
    }
}
