//! A toy run as data (METHOD.md section 5): serde + TOML, presets, validation (unknown keys are errors).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::targets::TargetKind;
use crate::align::Reduction;
use crate::config::{require_counts, require_positive};
use crate::error::{Error, Result};
use crate::train::Schedule;

/// Named hyperparameter sets for the 2D toy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Sized for an interactive CPU: a 96 x 3 prior trained 2,000 steps on mog and moons and 4,000
    /// on the other targets and the user's own points (about 30 s and a minute on 2 cores).
    #[value(alias = "default")]
    Interactive,
    /// The paper's toy exactly (METHOD.md section 5).
    Paper,
}

/// Prior (flow-matching) training, METHOD.md sections 4 and 5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorConfig {
    /// Hidden width C of the AdaLN MLP.
    pub width: usize,
    /// Number of residual AdaLN blocks.
    pub depth: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Fresh target samples per step.
    pub batch: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Decay of the exponential moving average of the weights that becomes the frozen prior
    /// (0 = no EMA, the live weights are frozen).
    #[serde(default)]
    pub ema: f64,
    /// Freeze the prior before `steps` once its loss has flattened (absent: always train `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_when_flat: Option<Plateau>,
}

/// When a prior's loss counts as flat *(ours, METHOD.md section 5)*: every `window` steps from
/// `min_steps` on, the mean loss of the last `window` steps is compared with the mean of the
/// `window` steps before; training stops when it fell by less than `min_gain` of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plateau {
    pub window: usize,
    pub min_gain: f64,
    pub min_steps: usize,
}

impl Default for Plateau {
    /// Windows of 250 steps, a gain under 0.5 %, from step 500 on. With a cosine schedule the loss
    /// still falls once the rate decays (the interactive preset's mog run: 1.306 at steps 500 to
    /// 1,000, 1.277 at the end), so the presets leave the test off; it suits a constant rate.
    fn default() -> Self {
        Plateau {
            window: 250,
            min_gain: 0.005,
            min_steps: 500,
        }
    }
}

impl Plateau {
    /// Whether the loss has flattened after `steps` steps; `losses` holds at least the last
    /// `2 * window` per-step losses, the newest last.
    pub fn is_flat(&self, steps: usize, losses: &[f32]) -> bool {
        let w = self.window;
        if w == 0 || steps < self.min_steps.max(2 * w) || !steps.is_multiple_of(w) {
            return false;
        }
        let Some(tail) = losses.len().checked_sub(2 * w).map(|i| &losses[i..]) else {
            return false;
        };
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let (before, last) = (mean(&tail[..w]), mean(&tail[w..]));
        before - last < self.min_gain * before.abs()
    }
}

/// Latent initialisation for the alignment stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LatentInit {
    /// y ~ N(0, I) (the paper).
    Normal,
    /// y ~ U[-3, 3]^2.
    Box,
    /// y ~ N((2.5, 2.5), 0.25^2 I): a cluster in one corner.
    Corner,
}

/// Alignment of free latents y to the frozen prior, METHOD.md sections 2 and 5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    /// Number of latents y.
    pub n_latents: usize,
    /// Optimiser steps (full batch).
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// (t, eps) draws per latent per step.
    pub mc: usize,
    /// Reduction over dimensions of the squared error.
    pub reduction: Reduction,
    /// Initial latents.
    pub init: LatentInit,
}

/// Where the heatmaps are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// The range of 5,000 target samples plus 20 % padding on each side.
    Data,
    /// The fixed square [-6, 6]^2.
    Fixed,
}

/// Evaluation: heatmaps, prior samples, exact likelihood and the bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Heatmap resolution (grid x grid points).
    pub grid: usize,
    /// Number of t values in linspace(0.1, 0.9) for the L_align heatmap.
    pub t_values: usize,
    /// Heatmap extent.
    pub view: View,
    /// Samples drawn from the prior to check it, and data samples to compare.
    pub n_check: usize,
    /// Euler steps of the sampling ODE (paper: 100).
    pub sample_steps: usize,
    /// RK4 steps of the exact log-likelihood ODE.
    pub likelihood_steps: usize,
    /// Latents on which the exact log p and the bound are computed.
    pub bound_points: usize,
    /// (s, eps) draws per latent for the Monte Carlo estimate of the bound.
    pub bound_draws: usize,
}

/// A complete toy run: what `flowalign toy --config` reads and every run writes as `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyConfig {
    /// Preset the values started from (informational once resolved).
    pub preset: Preset,
    /// Built-in target; ignored when `points` or `target_csv` is given (and then left out of
    /// the TOML).
    #[serde(default = "default_target")]
    pub target: TargetKind,
    /// A CSV of the user's own 2-column points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_csv: Option<PathBuf>,
    /// The user's own raw points (a drawn target), stored inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<[f32; 2]>>,
    /// Seed of every random draw.
    pub seed: u64,
    pub prior: PriorConfig,
    pub align: AlignConfig,
    pub eval: EvalConfig,
}

fn default_target() -> TargetKind {
    TargetKind::Mog
}

impl ToyConfig {
    /// The values of `preset` for `target`.
    pub fn preset(preset: Preset, target: TargetKind) -> Self {
        let paper = ToyConfig {
            preset,
            target,
            target_csv: None,
            points: None,
            seed: 0,
            prior: PriorConfig {
                width: 512,
                depth: 4,
                steps: Self::preset_prior_steps(Preset::Paper, Some(target)),
                batch: 256,
                lr: 1e-4,
                schedule: Schedule::Constant,
                ema: 0.0,
                stop_when_flat: None,
            },
            align: AlignConfig {
                n_latents: 1000,
                steps: 5000,
                lr: 1e-2,
                mc: 1,
                reduction: Reduction::Mean,
                init: LatentInit::Normal,
            },
            eval: EvalConfig {
                grid: 50,
                t_values: 20,
                view: View::Data,
                n_check: 1000,
                sample_steps: 100,
                likelihood_steps: 100,
                bound_points: 200,
                bound_draws: 256,
            },
        };
        match preset {
            Preset::Paper => paper,
            Preset::Interactive => ToyConfig {
                prior: PriorConfig {
                    width: 96,
                    depth: 3,
                    steps: Self::preset_prior_steps(preset, Some(target)),
                    batch: 512,
                    lr: 2e-3,
                    schedule: Schedule::Cosine {
                        warmup: 100,
                        final_frac: 0.05,
                    },
                    ema: 0.0,
                    stop_when_flat: None,
                },
                align: AlignConfig {
                    steps: 500,
                    ..paper.align
                },
                eval: EvalConfig {
                    likelihood_steps: 40,
                    bound_points: 100,
                    bound_draws: 128,
                    ..paper.eval
                },
                ..paper
            },
        }
    }

    /// The prior's steps under `preset` for a built-in target (`None`: the user's own points).
    ///
    /// The interactive preset sizes them per target (README, "How long the default run takes"):
    /// mog and moons hold every quality figure of the 4,000-step run after 2,000 steps (mog, seed
    /// 0: NLL of y 0.323 vs 0.344, sample NLL 0.422 vs 0.522, Pearson 0.966 vs 0.965), while
    /// rings is still one blob at 2,000 (sample NLL 3.06 vs 2.09, whatever the learning rate,
    /// EMA, width or batch) and grid and swissroll lose 0.2 to 0.4 nats of sample NLL.
    pub const fn preset_prior_steps(preset: Preset, target: Option<TargetKind>) -> usize {
        match (preset, target) {
            (Preset::Paper, _) => 100_000,
            (Preset::Interactive, Some(TargetKind::Mog | TargetKind::Moons)) => 2000,
            (Preset::Interactive, _) => 4000,
        }
    }

    /// The built-in target this config trains on, or `None` for the user's own points.
    pub fn builtin_target(&self) -> Option<TargetKind> {
        (self.points.is_none() && self.target_csv.is_none()).then_some(self.target)
    }

    /// Keeps what the preset sizes per target in step after the target changed from `before`
    /// (`None`: the user's own points): prior steps left at the preset's value for `before` take
    /// its value for the new target; steps set by hand stay.
    pub fn follow_target(&mut self, before: Option<TargetKind>) {
        if self.prior.steps == Self::preset_prior_steps(self.preset, before) {
            self.prior.steps = Self::preset_prior_steps(self.preset, self.builtin_target());
        }
    }

    /// Reads a TOML config; unknown keys and bad values are errors naming the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        crate::config::read_toml(path, "toy", Self::validate)
    }

    /// The config as TOML text. A session on the user's own points says so, lists them a few
    /// pairs to a line, and leaves out the built-in target it does not use.
    pub fn to_toml(&self) -> String {
        let Some(points) = &self.points else {
            return toml::to_string_pretty(self).expect("a ToyConfig always serialises");
        };
        let rest = ToyConfig {
            points: None,
            ..self.clone()
        };
        let text = toml::to_string_pretty(&rest).expect("a ToyConfig always serialises");
        // Top-level keys come before the first table, so the points go there.
        let split = text.find("\n[").map_or(text.len(), |i| i + 1);
        let (top, tables) = text.split_at(split);
        let mut out = format!(
            "# A toy session on {} points of your own (normalised like every target, METHOD.md section 5).\n",
            points.len()
        );
        for line in top.lines().filter(|l| !l.starts_with("target = ")) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("points = [\n");
        for row in points.chunks(6) {
            let pairs: Vec<String> = row
                .iter()
                .map(|p| format!("[{:?}, {:?}]", p[0], p[1]))
                .collect();
            out.push_str(&format!("    {},\n", pairs.join(", ")));
        }
        out.push_str("]\n\n");
        out.push_str(tables);
        out
    }

    /// Checks every value is usable, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("prior.width", self.prior.width),
            ("prior.depth", self.prior.depth),
            ("prior.steps", self.prior.steps),
            ("prior.batch", self.prior.batch),
            ("align.steps", self.align.steps),
            ("align.n_latents", self.align.n_latents),
            ("align.mc", self.align.mc),
            ("eval.grid", self.eval.grid),
            ("eval.t_values", self.eval.t_values),
            ("eval.n_check", self.eval.n_check),
            ("eval.sample_steps", self.eval.sample_steps),
            ("eval.likelihood_steps", self.eval.likelihood_steps),
            ("eval.bound_points", self.eval.bound_points),
            ("eval.bound_draws", self.eval.bound_draws),
        ];
        require_counts(&positive)?;
        require_positive(&[("prior.lr", self.prior.lr), ("align.lr", self.align.lr)])?;
        if let Schedule::Cosine { final_frac, .. } = self.prior.schedule
            && !(0.0..=1.0).contains(&final_frac)
        {
            return Err(Error::setting(
                "prior.schedule.final_frac",
                format!("must lie in [0, 1], got {final_frac}"),
            ));
        }
        if !(0.0..1.0).contains(&self.prior.ema) {
            return Err(Error::setting(
                "prior.ema",
                format!("must lie in [0, 1), got {}", self.prior.ema),
            ));
        }
        if let Some(p) = &self.prior.stop_when_flat {
            if p.window == 0 {
                return Err(Error::setting(
                    "prior.stop_when_flat.window",
                    "must be at least 1 step",
                ));
            }
            if !(0.0..1.0).contains(&p.min_gain) {
                return Err(Error::setting(
                    "prior.stop_when_flat.min_gain",
                    format!("must lie in [0, 1), got {}", p.min_gain),
                ));
            }
        }
        if self.eval.grid < 2 {
            return Err(Error::setting(
                "eval.grid",
                format!("must be at least 2, got {}", self.eval.grid),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interactive_prior_steps_follow_the_target_unless_set_by_hand() {
        let steps = |t| ToyConfig::preset(Preset::Interactive, t).prior.steps;
        assert_eq!(
            (steps(TargetKind::Mog), steps(TargetKind::Moons)),
            (2000, 2000)
        );
        for t in [
            TargetKind::Grid,
            TargetKind::Rings,
            TargetKind::Spiral,
            TargetKind::Swissroll,
        ] {
            assert_eq!(steps(t), 4000, "{t:?}");
        }
        assert_eq!(
            ToyConfig::preset(Preset::Paper, TargetKind::Mog)
                .prior
                .steps,
            100_000
        );
        let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
        let before = cfg.builtin_target();
        cfg.target = TargetKind::Rings;
        cfg.follow_target(before);
        assert_eq!(cfg.prior.steps, 4000);
        // The user's own points get the longer budget.
        let before = cfg.builtin_target();
        cfg.target = TargetKind::Moons;
        cfg.follow_target(before);
        assert_eq!(cfg.prior.steps, 2000);
        let before = cfg.builtin_target();
        cfg.points = Some(vec![[0.0, 0.0], [1.0, 1.0]]);
        cfg.follow_target(before);
        assert_eq!((cfg.builtin_target(), cfg.prior.steps), (None, 4000));
        // Steps set by hand stay.
        let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
        cfg.prior.steps = 3000;
        let before = cfg.builtin_target();
        cfg.target = TargetKind::Rings;
        cfg.follow_target(before);
        assert_eq!(cfg.prior.steps, 3000);
    }

    #[test]
    fn presets_round_trip_through_toml() {
        for preset in [Preset::Interactive, Preset::Paper] {
            let cfg = ToyConfig::preset(preset, TargetKind::Spiral);
            cfg.validate().unwrap();
            let back: ToyConfig = toml::from_str(&cfg.to_toml()).unwrap();
            assert_eq!(back, cfg);
        }
    }

    #[test]
    fn a_session_on_points_is_written_compactly_and_reads_back() {
        let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Grid);
        let points: Vec<[f32; 2]> = (0..100)
            .map(|i| [i as f32 * 0.1, -1.0 / (1.0 + i as f32)])
            .collect();
        cfg.points = Some(points);
        let text = cfg.to_toml();
        assert!(!text.contains("target = "), "{text}");
        assert!(text.contains("100 points of your own"), "{text}");
        let point_lines = text
            .lines()
            .filter(|l| l.trim_start().starts_with('[') && l.contains(','))
            .count();
        assert_eq!(point_lines, 17, "6 pairs a line: {text}");
        let back: ToyConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.points, cfg.points);
        assert_eq!(
            (back.prior, back.align, back.eval),
            (cfg.prior, cfg.align, cfg.eval)
        );
    }

    #[test]
    fn paper_preset_is_the_spec() {
        let c = ToyConfig::preset(Preset::Paper, TargetKind::Mog);
        assert_eq!(
            (c.prior.width, c.prior.depth, c.prior.steps),
            (512, 4, 100_000)
        );
        assert_eq!((c.prior.batch, c.prior.lr), (256, 1e-4));
        assert_eq!(
            (c.align.n_latents, c.align.steps, c.align.lr),
            (1000, 5000, 1e-2)
        );
        assert_eq!((c.eval.grid, c.eval.t_values), (50, 20));
    }

    #[test]
    fn a_plateau_is_a_loss_that_stopped_falling() {
        let p = Plateau {
            window: 4,
            min_gain: 0.01,
            min_steps: 8,
        };
        let falling = [2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0];
        let flat = [1.0, 1.1, 0.9, 1.0, 1.0, 0.9, 1.1, 1.0];
        assert!(!p.is_flat(8, &falling));
        assert!(p.is_flat(8, &flat));
        // Only at whole windows, never before `min_steps`, never on too short a tail.
        assert!(!p.is_flat(9, &flat));
        assert!(!p.is_flat(4, &flat[4..]));
        assert!(!p.is_flat(8, &flat[1..]));
        let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
        cfg.prior.stop_when_flat = Some(Plateau { window: 0, ..p });
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("prior.stop_when_flat.window"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut text = ToyConfig::preset(Preset::Interactive, TargetKind::Mog).to_toml();
        text = text.replace("[prior]", "[prior]\nwidht = 3");
        let err = toml::from_str::<ToyConfig>(&text).unwrap_err().to_string();
        assert!(err.contains("widht"), "{err}");
    }
}
