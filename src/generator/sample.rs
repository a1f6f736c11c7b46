//! Generation: MAR's masked autoregressive loop with the flow head (LTH14/mar `sample_tokens`,
//! METHOD.md section 7), and the dispatch to the DiT's sampler.
//!
//! Every random value (orders, noise) is drawn from the caller's seeded generator, so the same
//! seed gives the same samples. Pass a model without autodiff (e.g. `Trainer::frozen`): on an
//! autodiff device dropout would be active.

use burn::prelude::*;
use rand::RngExt;
use rand_distr::StandardNormal;

use super::Generator;
use super::mar::{MarGenerator, index};
use super::masking::{CfgSchedule, TokenMask, random_order, sampling_schedule};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// MAR iterations (paper 64: one token each). Ignored by the DiT.
    pub num_iter: usize,
    /// Classifier-free guidance scale; 1 = none (the batch is then not doubled).
    pub cfg: f32,
    /// How MAR's guidance grows over its iterations (the DiT uses `cfg` throughout).
    pub cfg_schedule: CfgSchedule,
    /// Scale of the initial noise of every token (MAR-B: 1.0 with CFG, 0.95 without).
    pub temperature: f32,
    /// Time points of the Euler sampler, `linspace(1, 0, time_points)` (paper 100: 99 steps).
    pub time_points: usize,
}

impl SampleOptions {
    /// Whether the batch is doubled for guidance (`cfg != 1`, as MAR decides).
    fn guided(&self) -> bool {
        self.cfg != 1.0
    }
}

/// Draws `n` standard-normal values.
fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Class ids with `None` mapped to 0 and, per row, whether it is unconditional.
fn split_labels(labels: &[Option<usize>]) -> (Vec<i64>, Vec<f32>) {
    labels
        .iter()
        .map(|y| (y.unwrap_or(0) as i64, if y.is_some() { 0.0 } else { 1.0 }))
        .unzip()
}

/// MAR's sampling loop: per sample a random order; at iteration `s` the encoder sees the tokens
/// generated so far, the decoder gives every position its condition z, and the head samples the
/// tokens that the schedule ([`sampling_schedule`]) reveals at this iteration (all that remain at
/// the last). With CFG the batch is doubled with `fake_latent` as the class and the scale follows
/// `opts.cfg_schedule`.
///
/// # Shapes
/// - `labels`: one per sample (`None` = unconditional, the fake latent)
/// - output: `[samples, seq_len, token_dim]` in the generator's (scaled) latent space
pub fn sample_mar(
    model: &MarGenerator,
    labels: &[Option<usize>],
    opts: &SampleOptions,
    rng: &mut Rng,
) -> Tensor<3> {
    let mar = &model.mar;
    let device = mar.z_proj.weight.device();
    let (b, l, d, c) = (labels.len(), mar.seq_len(), mar.token_dim(), mar.width());
    let guided = opts.guided();
    let copies = if guided { 2 } else { 1 };
    let orders: Vec<Vec<usize>> = (0..b).map(|_| random_order(rng, l)).collect();
    // The unconditional half reuses the same orders and tokens.
    let doubled: Vec<Vec<usize>> = orders.iter().cycle().take(copies * b).cloned().collect();
    let (ids, uncond) = split_labels(labels);
    let class = mar.class_condition(
        index(ids, &device),
        Some(Tensor::from_data(TensorData::new(uncond, [b]), &device)),
    );
    let class = if guided {
        Tensor::cat(vec![class, mar.unconditional(b)], 0)
    } else {
        class
    };
    let mut tokens = vec![0.0f32; b * l * d];
    for step in sampling_schedule(l, opts.num_iter) {
        if step.predict == 0 {
            continue;
        }
        let mask = TokenMask::from_orders(&doubled, step.hidden_before);
        let current: Vec<f32> = tokens
            .iter()
            .cycle()
            .take(copies * b * l * d)
            .copied()
            .collect();
        let x = Tensor::<3>::from_data(TensorData::new(current, [copies * b, l, d]), &device);
        let z = mar
            .forward(x, class.clone(), &mask)
            .reshape([copies * b * l, c]);
        // The revealed tokens are the last `predict` of the hidden prefix of each order.
        let revealed = step.hidden_before - step.predict..step.hidden_before;
        let rows: Vec<usize> = orders
            .iter()
            .enumerate()
            .flat_map(|(i, o)| o[revealed.clone()].iter().map(move |&p| i * l + p))
            .collect();
        let all_rows: Vec<i64> = (0..copies)
            .flat_map(|k| rows.iter().map(move |&r| (k * b * l + r) as i64))
            .collect();
        let z = z.select(0, index(all_rows, &device));
        let n = rows.len();
        let noise = Tensor::<2>::from_data(TensorData::new(normals(rng, n * d), [n, d]), &device);
        let scale = opts.cfg_schedule.scale(opts.cfg, step.mask_len, l);
        let new = model.head.sample(
            z,
            noise,
            opts.time_points,
            opts.temperature,
            guided.then_some(scale),
        );
        let new: Vec<f32> = new
            .try_into_vec_as::<f32>()
            .expect("sampled tokens read back as f32");
        for (k, &r) in rows.iter().enumerate() {
            tokens[r * d..(r + 1) * d].copy_from_slice(&new[k * d..(k + 1) * d]);
        }
    }
    Tensor::from_data(TensorData::new(tokens, [b, l, d]), &device)
}

/// Samples latents from either generator and maps them back to the autoencoder's latent space
/// (divided by `scale`, the factor training multiplied them by).
///
/// # Shapes
/// - output: `[labels.len(), seq_len, token_dim]`
pub fn generate(
    model: &Generator,
    labels: &[Option<usize>],
    opts: &SampleOptions,
    scale: f32,
    rng: &mut Rng,
) -> Result<Tensor<3>> {
    if opts.time_points < 2
        || opts.num_iter == 0
        || opts.temperature.is_nan()
        || opts.temperature <= 0.0
    {
        return Err(Error::setting(
            "sample",
            format!(
                "time_points must be at least 2, num_iter at least 1 and temperature positive (got {}, {}, {})",
                opts.time_points, opts.num_iter, opts.temperature
            ),
        ));
    }
    let classes = match model {
        Generator::Mar(m) => m.mar.class_emb.weight.dims()[0],
        Generator::Dit(d) => d.classes,
    };
    if let Some(bad) = labels.iter().flatten().find(|&&y| y >= classes) {
        return Err(Error::setting(
            "labels",
            format!("class {bad} is out of range for a generator of {classes} classes"),
        ));
    }
    let latents = match model {
        Generator::Mar(m) => sample_mar(m, labels, opts, rng),
        Generator::Dit(dit) => {
            let (l, d) = (dit.seq_len(), dit.token_dim());
            let b = labels.len();
            let device = dit.x_embed.weight.device();
            let noise =
                Tensor::from_data(TensorData::new(normals(rng, b * l * d), [b, l, d]), &device);
            dit.sample(
                labels,
                noise,
                opts.time_points,
                opts.temperature,
                opts.guided().then_some(opts.cfg),
            )
        }
    };
    Ok(latents / scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::head::FlowHeadConfig;
    use crate::generator::mar::MarConfig;
    use crate::generator::test_util::perturbed;
    use crate::rng::{Stream, rng_for};

    /// A tiny MAR whose head has non-zero output layers, so samples depend on everything.
    fn tiny_generator() -> MarGenerator {
        let dev = Device::flex();
        let mut rng = rng_for(0, Stream::Init, 0);
        let cfg = MarConfig::new(8, 3, 2, 4, 32, 1, 1, 4, 2, 0.0, 0.0, 0.1);
        let g = cfg.init_generator(&FlowHeadConfig::new(3, 32, 32, 1, 2), &mut rng, &dev);
        perturbed(g, 1, 0.05)
    }

    fn opts(num_iter: usize, cfg: f32) -> SampleOptions {
        SampleOptions {
            num_iter,
            cfg,
            cfg_schedule: CfgSchedule::Linear,
            temperature: 1.0,
            time_points: 6,
        }
    }

    #[test]
    fn same_seed_same_samples_and_every_token_is_filled() {
        let g = Generator::Mar(tiny_generator());
        let labels = [Some(0), Some(3), None];
        for o in [opts(8, 1.0), opts(3, 2.5)] {
            let run = |seed| -> Vec<f32> {
                generate(&g, &labels, &o, 2.0, &mut rng_for(seed, Stream::Sample, 0))
                    .unwrap()
                    .try_into_vec_as()
                    .unwrap()
            };
            let (a, b, c) = (run(7), run(7), run(8));
            assert_eq!(a, b);
            assert_ne!(a, c);
            assert_eq!(a.len(), 3 * 8 * 3);
            // No token is left at its initial 0.
            for tok in a.chunks(3) {
                assert!(tok.iter().any(|v| *v != 0.0), "{a:?}");
            }
        }
        let err = generate(
            &g,
            &[Some(4)],
            &opts(8, 1.0),
            1.0,
            &mut rng_for(0, Stream::Sample, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("class 4"), "{err}");
    }

    #[test]
    fn one_iteration_samples_every_token_from_the_class_alone() {
        // With one iteration all tokens are revealed at once, each from its own z given only
        // the class: a fully hidden latent.
        let g = tiny_generator();
        let o = opts(1, 1.0);
        let x: Vec<f32> = sample_mar(&g, &[Some(1)], &o, &mut rng_for(3, Stream::Sample, 0))
            .try_into_vec_as()
            .unwrap();
        assert_eq!(x.len(), 8 * 3);
        assert!(x.iter().all(|v| v.is_finite()));
    }
}
