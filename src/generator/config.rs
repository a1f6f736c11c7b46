//! The configuration of a generator run (stage 3, METHOD.md section 7), as data: serde + TOML,
//! presets, validation naming the bad key.

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::Generator;
use super::dit::DitConfig;
use super::head::FlowHeadConfig;
use super::mar::MarConfig;
use super::masking::{CfgSchedule, MASK_RATIO_MIN};
use super::sample::SampleOptions;
use crate::config::one_line;
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::rng::Rng;
use crate::run::{Extra, RunConfig, RunSettings};
use crate::train::OptimSpec;

/// Named starting points for a generator run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GenPreset {
    /// METHOD.md section 7: MAR-B + the 1024 x 6 flow head, batch 512, 400 ImageNet epochs.
    Paper,
    /// Sized for a CPU: a 2 + 2 block MAR of width 128 and a 256 x 2 head, batch 64.
    Small,
}

/// Which generator to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// MAR with the flow head: the paper's generator.
    Mar,
    /// The DiT over the tokens ([`super::dit`]): not the paper's, for comparison.
    Dit,
}

/// Where the latents come from and how they are scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenDataConfig {
    /// The cached latents (and labels) of the training images.
    pub latents: String,
    /// Latents are multiplied by this for training and samples divided by it: 1 / sqrt(mean
    /// per-sample variance) over 10k latents (1.7052 for the paper's Qwen-aligned autoencoder).
    pub scale: f64,
}

/// The optimisation: the shared loop settings plus the mask draws.
///
/// `run.lr` is the peak rate itself; the paper's recipe sets it to `1e-4 x batch / 256` (MAR's
/// `blr`), with a linear warm-up and then constant (`final_lr_frac = 1`). AdamW (0.9, 0.95),
/// weight decay 0.02 except on 1-D parameters, biases and the head ([`super::optim`]), global
/// gradient-norm clip 3.0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenTrainConfig {
    #[serde(flatten)]
    pub run: RunSettings,
    /// Lower end of the truncated normal of mask ratios (MAR: 0.7).
    pub mask_ratio_min: f64,
    /// Unknown keys, refused by [`GenConfig::validate`].
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

/// How samples are drawn (see [`SampleOptions`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenSampleConfig {
    /// MAR iterations (paper 64).
    pub num_iter: usize,
    /// Guidance scale, 1 = none. The paper's is unpublished; original MAR-B used 2.9.
    pub cfg: f64,
    pub cfg_schedule: CfgSchedule,
    /// Scale of the initial noise (MAR-B: 1.0 with CFG, 0.95 without).
    pub temperature: f64,
    /// Time points of the Euler sampler, `linspace(1, 0, n)` (paper 100).
    pub time_points: usize,
}

/// A complete generator run: what `--config` reads and every run writes as `config.toml`.
///
/// `mar` and `head` are used when `arch = "mar"`, `dit` when `arch = "dit"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenConfig {
    /// The preset the values started from (informational once resolved).
    pub preset: GenPreset,
    pub arch: Arch,
    pub data: GenDataConfig,
    pub mar: MarConfig,
    pub head: FlowHeadConfig,
    pub dit: DitConfig,
    pub train: GenTrainConfig,
    pub sample: GenSampleConfig,
}

impl RunConfig for GenConfig {
    const COMMAND: &'static str = "gen train";

    fn settings(&self) -> &RunSettings {
        &self.train.run
    }

    /// A resume may change the length, cadence, precision, learning rate and sampling, nothing
    /// that defines the model or the draws.
    fn check_resumable(&self, saved: &Self) -> Result<()> {
        let fields = |c: &GenConfig| {
            vec![
                ("arch", format!("{:?}", c.arch)),
                ("data.latents", c.data.latents.clone()),
                ("data.scale", c.data.scale.to_string()),
                ("mar", format!("{:?}", c.mar)),
                ("head", format!("{:?}", c.head)),
                ("dit", format!("{:?}", c.dit)),
                ("train.batch", c.train.run.batch.to_string()),
                ("train.seed", c.train.run.seed.to_string()),
                ("train.ema", c.train.run.ema.to_string()),
                ("train.mask_ratio_min", c.train.mask_ratio_min.to_string()),
            ]
        };
        crate::checkpoint::check_resumable(&fields(self), &fields(saved))
    }
}

/// ImageNet-1k training images per epoch at batch 512 with the last partial batch dropped.
const IMAGENET_STEPS_PER_EPOCH_512: usize = 1_281_167 / 512;

impl GenConfig {
    /// The values of `preset` for the latent cache `latents`.
    pub fn preset(preset: GenPreset, latents: &str) -> GenConfig {
        let paper = GenConfig {
            preset,
            arch: Arch::Mar,
            data: GenDataConfig {
                latents: latents.to_string(),
                scale: 1.7052,
            },
            mar: MarConfig::paper(),
            head: FlowHeadConfig::paper(),
            dit: DitConfig::base(),
            train: GenTrainConfig {
                run: RunSettings {
                    steps: 400 * IMAGENET_STEPS_PER_EPOCH_512,
                    batch: 512,
                    lr: 1e-4 * 512.0 / 256.0,
                    warmup: 100 * IMAGENET_STEPS_PER_EPOCH_512,
                    // Constant after the warm-up.
                    final_lr_frac: 1.0,
                    optim: OptimSpec {
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay: 0.02,
                        grad_clip: 3.0,
                    },
                    ema: 0.9999,
                    seed: 0,
                    checkpoint_every: 5_000,
                    log_every: 100,
                    precision: Precision::F32,
                },
                mask_ratio_min: MASK_RATIO_MIN,
                extra: Extra::new(),
            },
            sample: GenSampleConfig {
                num_iter: 64,
                cfg: 1.0,
                cfg_schedule: CfgSchedule::Linear,
                temperature: 1.0,
                time_points: 100,
            },
        };
        match preset {
            GenPreset::Paper => paper,
            GenPreset::Small => GenConfig {
                mar: MarConfig::new(64, 32, 16, 1000, 128, 2, 2, 4, 4, 0.1, 0.1, 0.1),
                head: FlowHeadConfig::new(32, 128, 256, 2, 2),
                dit: DitConfig::new(64, 32, 1000, 128, 4, 4, 4, 0.1, 0.0, 0.0),
                train: GenTrainConfig {
                    run: RunSettings {
                        steps: 2_000,
                        batch: 64,
                        lr: 4e-3 * 64.0 / 256.0,
                        warmup: 100,
                        ema: 0.999,
                        checkpoint_every: 500,
                        log_every: 10,
                        ..paper.train.run.clone()
                    },
                    ..paper.train.clone()
                },
                sample: GenSampleConfig {
                    num_iter: 16,
                    time_points: 25,
                    ..paper.sample
                },
                ..paper
            },
        }
    }

    /// `(seq_len, token_dim, classes)` of the model `arch` describes.
    pub fn model_shape(&self) -> (usize, usize, usize) {
        match self.arch {
            Arch::Mar => (self.mar.seq_len, self.mar.token_dim, self.mar.classes),
            Arch::Dit => (self.dit.seq_len, self.dit.token_dim, self.dit.classes),
        }
    }

    /// The key of the class count of the model `arch` describes.
    pub fn classes_key(&self) -> &'static str {
        match self.arch {
            Arch::Mar => "mar.classes",
            Arch::Dit => "dit.classes",
        }
    }

    /// Sets the token shape and the class count of both architectures (and the head's token dim)
    /// to a latent cache's: what `gen train --latents` does unless a config says otherwise.
    pub fn fit_to(&mut self, tokens: usize, dim: usize, classes: usize) {
        (self.mar.seq_len, self.mar.token_dim, self.mar.classes) = (tokens, dim, classes);
        self.head.token_dim = dim;
        (self.dit.seq_len, self.dit.token_dim, self.dit.classes) = (tokens, dim, classes);
    }

    /// The model of `arch`, initialised from `rng`.
    pub fn init_model(&self, rng: &mut Rng, device: &Device) -> Generator {
        match self.arch {
            Arch::Mar => Generator::Mar(self.mar.init_generator(&self.head, rng, device)),
            Arch::Dit => Generator::Dit(self.dit.init(rng, device)),
        }
    }

    /// The sampling settings of `sample`.
    pub fn sample_options(&self) -> SampleOptions {
        let s = &self.sample;
        SampleOptions {
            num_iter: s.num_iter,
            cfg: s.cfg as f32,
            cfg_schedule: s.cfg_schedule,
            temperature: s.temperature as f32,
            time_points: s.time_points,
        }
    }

    /// Reads a TOML config; unknown keys and bad values are errors naming the file and the key.
    pub fn from_toml_file(path: &Path) -> Result<GenConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "check the config file's path", e))?;
        GenConfig::from_toml_str(&text).map_err(|e| Error::input(path, e.to_string()))
    }

    /// Parses and validates a TOML config.
    pub fn from_toml_str(text: &str) -> Result<GenConfig> {
        let bad =
            |e: String| Error::setting("config", format!("not a valid generator config: {e}"));
        let cfg: GenConfig = toml::from_str(text).map_err(|e| bad(one_line(&e.to_string())))?;
        // The architecture sections are burn configs, whose serde impls accept unknown keys:
        // every key read must be one that the parsed config writes back.
        let given: toml::Table = toml::from_str(text).map_err(|e| bad(one_line(&e.to_string())))?;
        let given = toml::Value::Table(given);
        let known = toml::Value::try_from(&cfg).map_err(|e| bad(e.to_string()))?;
        if let Some(key) = unknown_key(&given, &known, "") {
            return Err(Error::setting(
                key,
                "is not a known setting (check its spelling)",
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a GenConfig always serialises")
    }

    /// Checks every value is usable, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let (m, h, d, t, s) = (&self.mar, &self.head, &self.dit, &self.train, &self.sample);
        crate::config::require_counts(&[
            ("mar.seq_len", m.seq_len),
            ("mar.token_dim", m.token_dim),
            ("mar.buffer", m.buffer),
            ("mar.classes", m.classes),
            ("mar.width", m.width),
            ("mar.encoder_depth", m.encoder_depth),
            ("mar.decoder_depth", m.decoder_depth),
            ("mar.heads", m.heads),
            ("mar.mlp_ratio", m.mlp_ratio),
            ("head.width", h.width),
            ("head.depth", h.depth),
            ("head.batch_mul", h.batch_mul),
            ("dit.seq_len", d.seq_len),
            ("dit.token_dim", d.token_dim),
            ("dit.classes", d.classes),
            ("dit.width", d.width),
            ("dit.depth", d.depth),
            ("dit.heads", d.heads),
            ("dit.mlp_ratio", d.mlp_ratio),
            ("sample.num_iter", s.num_iter),
        ])?;
        t.run.validate(&t.extra)?;
        crate::config::require_positive(&[
            ("data.scale", self.data.scale),
            ("sample.cfg", s.cfg),
            ("sample.temperature", s.temperature),
        ])?;
        let fail = |key: &str, msg: String| Err(Error::setting(key, msg));
        for (key, width, heads) in [("mar", m.width, m.heads), ("dit", d.width, d.heads)] {
            if !width.is_multiple_of(heads) {
                return fail(
                    &format!("{key}.width"),
                    format!("({width}) must be a multiple of {key}.heads ({heads})"),
                );
            }
        }
        if h.cond_dim != m.width {
            return fail(
                "head.cond_dim",
                format!("({}) must equal mar.width ({})", h.cond_dim, m.width),
            );
        }
        if h.token_dim != m.token_dim {
            return fail(
                "head.token_dim",
                format!(
                    "({}) must equal mar.token_dim ({})",
                    h.token_dim, m.token_dim
                ),
            );
        }
        for (key, p) in [
            ("mar.attn_dropout", m.attn_dropout),
            ("mar.proj_dropout", m.proj_dropout),
            ("mar.label_drop", m.label_drop),
            ("dit.class_dropout", d.class_dropout),
            ("dit.attn_dropout", d.attn_dropout),
            ("dit.proj_dropout", d.proj_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return fail(key, format!("must lie in [0, 1), got {p}"));
            }
        }
        if !(t.mask_ratio_min > 0.0 && t.mask_ratio_min <= 1.0) {
            return fail(
                "train.mask_ratio_min",
                format!("must lie in (0, 1], got {}", t.mask_ratio_min),
            );
        }
        if s.time_points < 2 {
            return fail(
                "sample.time_points",
                format!("must be at least 2 (one Euler step), got {}", s.time_points),
            );
        }
        Ok(())
    }
}

/// The first dotted key of `given` that `known` lacks, descending through tables.
fn unknown_key(given: &toml::Value, known: &toml::Value, prefix: &str) -> Option<String> {
    let (toml::Value::Table(g), toml::Value::Table(k)) = (given, known) else {
        return None;
    };
    g.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match k.get(key) {
            None => Some(path),
            Some(known) => unknown_key(value, known, &path),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_and_paper_is_the_method() {
        for preset in [GenPreset::Paper, GenPreset::Small] {
            let cfg = GenConfig::preset(preset, "latents.safetensors");
            cfg.validate().unwrap();
            let back = GenConfig::from_toml_str(&cfg.to_toml()).unwrap();
            assert_eq!(back, cfg);
        }
        let p = GenConfig::preset(GenPreset::Paper, "l");
        let m = &p.mar;
        assert_eq!(
            (
                m.width,
                m.encoder_depth,
                m.decoder_depth,
                m.heads,
                m.mlp_ratio
            ),
            (768, 12, 12, 12, 4)
        );
        assert_eq!(
            (m.seq_len, m.token_dim, m.buffer, m.classes),
            (64, 32, 64, 1000)
        );
        assert_eq!(
            (m.attn_dropout, m.proj_dropout, m.label_drop),
            (0.1, 0.1, 0.1)
        );
        assert_eq!((p.head.width, p.head.depth, p.head.batch_mul), (1024, 6, 4));
        assert_eq!(p.train.run.optim.weight_decay, 0.02);
        assert_eq!(
            (p.train.run.optim.beta1, p.train.run.optim.beta2),
            (0.9, 0.95)
        );
        assert_eq!(
            (p.train.run.optim.grad_clip, p.train.run.ema),
            (3.0, 0.9999)
        );
        assert!((p.train.run.lr - 2e-4).abs() < 1e-12);
        assert_eq!(
            (p.train.run.steps, p.train.run.warmup),
            (1_000_800, 250_200)
        );
        assert_eq!((p.sample.num_iter, p.sample.time_points), (64, 100));
        // Warm-up, then constant.
        let s = p.train.run.schedule();
        assert!((s.lr(1.0, 0, 10) - 1.0 / 250_200.0).abs() < 1e-12);
        assert_eq!(s.lr(1.0, 250_199, p.train.run.steps), 1.0);
        assert_eq!(s.lr(1.0, 900_000, p.train.run.steps), 1.0);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let text = GenConfig::preset(GenPreset::Small, "l").to_toml();
        let typo = text.replace("[mar]\n", "[mar]\nwidht = 3\n");
        let err = GenConfig::from_toml_str(&typo).unwrap_err().to_string();
        assert!(err.contains("mar.widht"), "{err}");
        let typo = text.replace("[train]\n", "[train]\nlr = 3\n");
        let err = GenConfig::from_toml_str(&typo).unwrap_err().to_string();
        assert!(err.contains("lr"), "{err}");
        let mut cfg = GenConfig::preset(GenPreset::Small, "l");
        cfg.head.cond_dim = 64;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("head.cond_dim"), "{err}");
        let mut cfg = GenConfig::preset(GenPreset::Small, "l");
        cfg.mar.heads = 5;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("mar.width") && err.contains("mar.heads"),
            "{err}"
        );
        let mut cfg = GenConfig::preset(GenPreset::Small, "l");
        cfg.mar.label_drop = 1.0;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("mar.label_drop")
        );
        let mut cfg = GenConfig::preset(GenPreset::Small, "l");
        cfg.mar.buffer = 0;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("mar.buffer")
        );
        let arch = text.replace("arch = \"mar\"", "arch = \"unet\"");
        assert!(GenConfig::from_toml_str(&arch).is_err());
        let dit = text.replace("arch = \"mar\"", "arch = \"dit\"");
        assert_eq!(GenConfig::from_toml_str(&dit).unwrap().arch, Arch::Dit);
    }
}
