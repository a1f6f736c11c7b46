//! The configuration of a feature prior run (stage 1 of METHOD.md section 6), as data.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::features::projection::{PAPER_SEED, ProjectionKind};
use crate::precision::Precision;
use crate::run::{Extra, RunConfig, RunSettings};
use crate::train::OptimSpec;

/// Named starting points for a feature prior run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PriorPreset {
    /// METHOD.md section 6 exactly: 1024 x 6, 1 M steps of 32,768 vectors, lr 2e-4 (the code's), EMA 0.9999.
    Paper,
    /// Sized for a CPU: 256 x 3, 2,000 steps of 1,024 vectors, lr 1e-3, EMA 0.999.
    Small,
}

/// How the target features become the prior's training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The feature table, `FILE[:TENSOR]`.
    pub features: String,
    /// The latent dimension d1 the features are projected to.
    pub latent_dim: usize,
    pub projection: ProjectionKind,
    /// Seed of the random projection (the paper's is 42).
    pub projection_seed: u64,
    /// Multiply the features by this; absent = 1 / std of the table (METHOD.md section 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Rows held out for `prior eval` (never trained on); at most a tenth of the table. 0 (the
    /// default, as in the paper's code) trains on every row.
    #[serde(default)]
    pub holdout: usize,
    /// Drop rows holding NaN or infinity instead of refusing the table.
    #[serde(default)]
    pub drop_nonfinite: bool,
}

impl DataConfig {
    /// Checks the latent dim and the scale, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        crate::config::require_counts(&[("data.latent_dim", self.latent_dim)])?;
        match self.scale {
            Some(s) => crate::config::require_positive(&[("data.scale", s)]),
            None => Ok(()),
        }
    }
}

/// The AdaLN MLP (METHOD.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub width: usize,
    pub depth: usize,
}

/// The optimisation (METHOD.md section 6): the shared loop settings plus the draws per vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub run: RunSettings,
    /// (t, eps) draws per vector per step.
    pub mc: usize,
    /// Unknown keys, refused by [`FeaturePriorConfig::validate`].
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

/// A complete feature prior run: what `--config` reads and every run writes as `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturePriorConfig {
    /// The preset the values started from (informational once resolved).
    pub preset: PriorPreset,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl FeaturePriorConfig {
    /// The values of `preset` for the table `features`.
    pub fn preset(preset: PriorPreset, features: &str) -> Self {
        let data = DataConfig {
            features: features.to_string(),
            latent_dim: 32,
            projection: ProjectionKind::Auto,
            projection_seed: PAPER_SEED,
            scale: None,
            holdout: 0,
            drop_nonfinite: false,
        };
        let paper = RunSettings {
            steps: 1_000_000,
            batch: 512 * 64,
            lr: 2e-4,
            warmup: 2_500,
            final_lr_frac: 0.1,
            optim: OptimSpec::PAPER_ADAMW,
            ema: 0.9999,
            seed: 0,
            checkpoint_every: 5_000,
            log_every: 100,
            // The paper trains in bf16 on GPUs; the precision setting asks for it.
            precision: Precision::F32,
        };
        let train = |run: RunSettings| TrainConfig {
            run,
            mc: 4,
            extra: Extra::new(),
        };
        match preset {
            PriorPreset::Paper => FeaturePriorConfig {
                preset,
                data,
                model: ModelConfig {
                    width: 1024,
                    depth: 6,
                },
                train: train(paper),
            },
            PriorPreset::Small => FeaturePriorConfig {
                preset,
                data,
                model: ModelConfig {
                    width: 256,
                    depth: 3,
                },
                train: train(RunSettings {
                    steps: 2_000,
                    batch: 1_024,
                    lr: 1e-3,
                    warmup: 100,
                    ema: 0.999,
                    checkpoint_every: 500,
                    log_every: 10,
                    ..paper
                }),
            },
        }
    }

    /// Parameters of the prior's AdaLN MLP (METHOD.md section 4) for `dim`-dimensional rows.
    pub fn params(&self, dim: usize) -> usize {
        let (c, d) = (self.model.width, dim);
        let linear = |i: usize, o: usize| i * o + o;
        let layer_norm = 2 * c;
        linear(d, c)
            + linear(256, c)
            + linear(c, c)
            + self.model.depth * (layer_norm + 2 * linear(c, c) + linear(c, 3 * c))
            + linear(c, 2 * c)
            + linear(c, d)
    }

    /// Floating-point operations of one training step: `batch x mc` rows through the network,
    /// about 6 per parameter per row (the forward pass, and the backward pass through inputs and
    /// weights). The paper preset at 32 dims: 27.5 T.
    pub fn step_flops(&self, dim: usize) -> f64 {
        6.0 * self.params(dim) as f64 * (self.train.run.batch * self.train.mc) as f64
    }

    /// Reads a TOML config; unknown keys and bad values are errors naming the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        crate::config::read_toml(path, "prior", Self::validate)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a FeaturePriorConfig always serialises")
    }

    /// Checks every value is usable, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        self.train.run.validate(&self.train.extra)?;
        self.data.validate()?;
        crate::config::require_counts(&[
            ("model.width", self.model.width),
            ("model.depth", self.model.depth),
            ("train.mc", self.train.mc),
        ])
    }

    /// The fields a resumed run must share with the run it continues, with their values as text.
    pub fn identity(&self) -> Vec<(&'static str, String)> {
        let (d, m, t) = (&self.data, &self.model, &self.train);
        vec![
            ("data.features", d.features.clone()),
            ("data.latent_dim", d.latent_dim.to_string()),
            (
                "data.projection",
                format!("{:?}", d.projection).to_lowercase(),
            ),
            ("data.projection_seed", d.projection_seed.to_string()),
            ("data.scale", format!("{:?}", d.scale)),
            ("data.holdout", d.holdout.to_string()),
            ("model.width", m.width.to_string()),
            ("model.depth", m.depth.to_string()),
            ("train.seed", t.run.seed.to_string()),
            ("train.ema", t.run.ema.to_string()),
        ]
    }
}

impl RunConfig for FeaturePriorConfig {
    const COMMAND: &'static str = "prior train";

    fn settings(&self) -> &RunSettings {
        &self.train.run
    }

    /// Fails with the first identity field where `self` (requested) differs from `saved`.
    fn check_resumable(&self, saved: &Self) -> Result<()> {
        crate::checkpoint::check_resumable(&self.identity(), &saved.identity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_and_paper_is_the_spec() {
        for preset in [PriorPreset::Paper, PriorPreset::Small] {
            let cfg = FeaturePriorConfig::preset(preset, "f.safetensors:w");
            cfg.validate().unwrap();
            let back: FeaturePriorConfig = toml::from_str(&cfg.to_toml()).unwrap();
            assert_eq!(back, cfg);
        }
        let p = FeaturePriorConfig::preset(PriorPreset::Paper, "f");
        assert_eq!((p.model.width, p.model.depth), (1024, 6));
        assert_eq!(
            (p.train.run.batch, p.train.mc, p.train.run.steps),
            (32_768, 4, 1_000_000)
        );
        assert_eq!(
            (p.train.run.warmup, p.train.run.final_lr_frac),
            (2_500, 0.1)
        );
        assert_eq!(p.train.run.optim, OptimSpec::PAPER_ADAMW);
        assert_eq!((p.train.run.lr, p.train.run.ema), (2e-4, 0.9999));
        assert_eq!(
            (p.data.latent_dim, p.data.projection_seed),
            (32, PAPER_SEED)
        );
    }

    #[test]
    fn precision_defaults_to_f32_and_may_change_on_resume() {
        let saved = FeaturePriorConfig::preset(PriorPreset::Small, "f");
        assert_eq!(saved.train.run.precision, Precision::F32);
        // Configs written before the key existed read as f32.
        let text = saved.to_toml().replace("precision = \"f32\"\n", "");
        assert!(!text.contains("precision"));
        let old: FeaturePriorConfig = toml::from_str(&text).unwrap();
        assert_eq!(old, saved);
        let mut asked = saved.clone();
        asked.train.run.precision = Precision::Bf16;
        assert!(asked.to_toml().contains("precision = \"bf16\""));
        asked.check_resumable(&saved).unwrap();
        let bad = saved.to_toml().replace("\"f32\"", "\"fp8\"");
        assert!(toml::from_str::<FeaturePriorConfig>(&bad).is_err());
    }

    #[test]
    fn resume_refuses_a_different_projection() {
        let saved = FeaturePriorConfig::preset(PriorPreset::Small, "f");
        let mut asked = saved.clone();
        asked.train.run.steps += 100; // extending a run is fine
        asked.check_resumable(&saved).unwrap();
        asked.data.projection_seed = 7;
        let err = asked.check_resumable(&saved).unwrap_err().to_string();
        assert!(
            err.contains("data.projection_seed is 7") && err.contains("42"),
            "{err}"
        );
    }

    #[test]
    fn step_cost_counts_the_networks_parameters() {
        use crate::flow::VelocityMlpConfig;
        use burn::module::Module;
        let mut cfg = FeaturePriorConfig::preset(PriorPreset::Small, "x.npy");
        cfg.model = ModelConfig {
            width: 24,
            depth: 2,
        };
        let mut rng = crate::rng::rng_for(0, crate::rng::Stream::Init, 0);
        let model = VelocityMlpConfig::new(5, 24, 2).init(&mut rng, &burn::prelude::Device::flex());
        assert_eq!(cfg.params(5), model.num_params());
        let paper = FeaturePriorConfig::preset(PriorPreset::Paper, "x.npy");
        let tflop = paper.step_flops(32) / 1e12;
        assert!((tflop - 27.5).abs() < 0.1, "{tflop}");
        let small = FeaturePriorConfig::preset(PriorPreset::Small, "x.npy");
        assert!(small.step_flops(32) < paper.step_flops(32) / 500.0);
    }
}
