//! Stage-1 quality on a feature table with a known density (issue: headless stage 1): a prior
//! trained through `PriorRun` on a 32-d Gaussian mixture matches the true NLL of held-out rows
//! within 0.1 nats/dim, and L_align ranks in-distribution rows below out-of-distribution rows.

use burn::prelude::Device;
use flowalign::align::align_heatmap;
use flowalign::features::projection::ProjectionKind;
use flowalign::features::write_npy;
use flowalign::grid::linspace;
use flowalign::prior::eval::nll;
use flowalign::prior::{FeaturePriorConfig, PriorPreset, PriorRun};
use flowalign::rng::{Stream, rng_for};
use rand::RngExt;
use rand_distr::StandardNormal;

const D: usize = 32;
const K: usize = 4;

/// A mixture of K diagonal Gaussians in 32 dimensions with equal weights.
struct Mixture {
    means: Vec<[f32; D]>,
    stds: [f32; D],
}

impl Mixture {
    fn new() -> Mixture {
        let mut rng = rng_for(11, Stream::Reference, 0);
        let means = (0..K)
            .map(|_| std::array::from_fn(|_| 1.2 * rng.sample::<f32, _>(StandardNormal)))
            .collect();
        let stds = std::array::from_fn(|j| 0.5 + 0.5 * (j % 3) as f32);
        Mixture { means, stds }
    }

    fn sample(&self, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rng_for(seed, Stream::Reference, 1);
        let mut out = Vec::with_capacity(n * D);
        for _ in 0..n {
            let k = rng.random_range(0..K);
            for j in 0..D {
                let e: f32 = rng.sample(StandardNormal);
                out.push(self.means[k][j] + self.stds[j] * e);
            }
        }
        out
    }

    /// `-log p(x)` in nats.
    fn nll(&self, x: &[f32]) -> f64 {
        let log_norm: f64 = self
            .stds
            .iter()
            .map(|&s| -0.5 * (2.0 * std::f64::consts::PI).ln() - f64::from(s).ln())
            .sum();
        let comps: Vec<f64> = self
            .means
            .iter()
            .map(|m| {
                let q: f64 = (0..D)
                    .map(|j| (f64::from(x[j] - m[j]) / f64::from(self.stds[j])).powi(2))
                    .sum();
                log_norm - 0.5 * q - (K as f64).ln()
            })
            .collect();
        let top = comps.iter().copied().fold(f64::MIN, f64::max);
        -(top + comps.iter().map(|c| (c - top).exp()).sum::<f64>().ln())
    }
}

/// P(an out-of-distribution score exceeds an in-distribution one), ties counting half.
fn auc(inside: &[f32], outside: &[f32]) -> f64 {
    let mut wins = 0.0;
    for &o in outside {
        for &i in inside {
            wins += if o > i {
                1.0
            } else if o == i {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (inside.len() * outside.len()) as f64
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn prior_matches_a_known_32d_density() {
    let tmp = tempfile::tempdir().unwrap();
    let mix = Mixture::new();
    let rows = 20_000;
    let features = tmp.path().join("mixture.npy");
    write_npy(&features, rows, D, &mix.sample(rows, 0)).unwrap();

    let mut cfg = FeaturePriorConfig::preset(PriorPreset::Small, features.to_str().unwrap());
    cfg.data.latent_dim = D;
    cfg.data.projection = ProjectionKind::Identity;
    cfg.data.scale = Some(1.0); // keep the known density's coordinates
    cfg.data.holdout = 1_000;
    cfg.model.width = env("Q_WIDTH", 128);
    cfg.model.depth = env("Q_DEPTH", 2);
    cfg.train.run.steps = env("Q_STEPS", 1_500);
    cfg.train.run.batch = env("Q_BATCH", 256);
    cfg.train.mc = 1;
    cfg.train.run.lr = env("Q_LR_E4", 20) as f64 * 1e-4;
    cfg.train.run.warmup = 100;
    cfg.train.run.ema = 0.995;
    cfg.train.run.checkpoint_every = cfg.train.run.steps;
    cfg.train.run.log_every = 100;
    let dev = Device::flex();
    let start = std::time::Instant::now();
    let mut run = PriorRun::open(cfg, &tmp.path().join("run"), false, &dev, None).unwrap();
    run.run(|| false, |_| {}).unwrap();
    let trained = start.elapsed().as_secs_f64();
    let prior = run.frozen();
    let held = &run.data().holdout;

    let n = env("Q_NLL_ROWS", 200);
    let x = &held.data[..n * D];
    let model = nll(&prior, x, D, env("Q_ODE_STEPS", 16), &dev);
    let model_mean = model.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let truth_mean = x.chunks(D).map(|r| mix.nll(r)).sum::<f64>() / n as f64;
    let gap = (model_mean - truth_mean) / D as f64;
    eprintln!(
        "trained in {trained:.1}s; NLL model {model_mean:.3} vs true {truth_mean:.3} nats: {gap:+.4} nats/dim"
    );
    assert!(
        gap.abs() <= 0.1,
        "NLL gap {gap:+.4} nats/dim (model {model_mean:.3}, true {truth_mean:.3})"
    );

    // Out of distribution: rows of the same mixture with every coordinate pushed 1 std (alternating signs).
    let outside: Vec<f32> = mix
        .sample(n, 5)
        .chunks(D)
        .flat_map(|r| {
            (0..D)
                .map(|j| r[j] + mix.stds[j] * if j % 2 == 0 { 1.0 } else { -1.0 })
                .collect::<Vec<_>>()
        })
        .collect();
    let ts = linspace(0.05, 0.95, 64);
    let mut rng = rng_for(3, Stream::Eval, 0);
    let l_in = align_heatmap(&prior, x, D, &ts, &mut rng, &dev);
    let l_out = align_heatmap(&prior, &outside, D, &ts, &mut rng, &dev);
    let a = auc(&l_in, &l_out);
    eprintln!("L_align AUC (out above in): {a:.4}");
    assert!(a >= 0.95, "AUC {a:.4}");
}
