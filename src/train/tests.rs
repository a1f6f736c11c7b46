use super::*;
use crate::align::{Reduction, flow_loss};
use crate::flow::path::PathDraws;
use crate::flow::{VelocityField, VelocityMlp, VelocityMlpConfig};
use crate::params::param_values;
use crate::precision::AtPrecision;

#[test]
fn out_of_memory_panics_become_errors_and_others_propagate() {
    let err = oom_guard("batch 64", 64, || -> Result<()> {
        panic!("CUDA_ERROR_OUT_OF_MEMORY: out of memory")
    })
    .unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { batch: 64, .. }), "{err}");
    let err = err.to_string();
    // The library suggests half the batch; the CLI names its flag (cli/hints.rs).
    assert!(err.contains("batch 64") && err.contains("e.g. 32"), "{err}");
    assert_eq!(oom_guard("b", 2, || Ok(7)).unwrap(), 7);
    let other =
        std::panic::catch_unwind(|| oom_guard("b", 2, || -> Result<()> { panic!("a bug") }));
    assert!(other.is_err());
}

#[test]
fn ema_blends_parameters() {
    let dev = Device::flex();
    let a = Latents {
        y: Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![1.0f32, 2.0], [1, 2]),
            &dev,
        )),
    };
    let b = Latents {
        y: Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![3.0f32, 6.0], [1, 2]),
            &dev,
        )),
    };
    let mut ema = Ema::new(&a, 0.75);
    ema.updates = 100; // past the warm-up: (1 + 100) / (10 + 100) > 0.75
    ema.update(&b);
    let v: Vec<f32> = ema.module.y.val().try_into_vec_as::<f32>().unwrap();
    assert_eq!(v, vec![1.5, 3.0]);
    ema.update(&b);
    let v: Vec<f32> = ema.module.y.val().try_into_vec_as::<f32>().unwrap();
    assert_eq!(v, vec![1.875, 3.75]);
    // The first update of a fresh average uses decay min(0.75, 1 / 10) = 0.1.
    let mut fresh = Ema::new(&a, 0.75);
    fresh.update(&b);
    let v: Vec<f32> = fresh.module.y.val().try_into_vec_as::<f32>().unwrap();
    assert!(
        (v[0] - 2.8).abs() < 1e-6 && (v[1] - 5.6).abs() < 1e-6,
        "{v:?}"
    );
}

/// Every tensor of a trainer's state (live weights, EMA, optimiser moments) and its dtype.
fn state_dtypes(state: &TrainerState) -> Vec<(String, burn::tensor::DType)> {
    let mut out = Vec::new();
    let parts = [Some(&state.model), state.ema.as_ref(), Some(&state.optim)];
    for (what, bytes) in ["model", "ema", "optim"].iter().zip(parts) {
        let bytes = burn::tensor::Bytes::from_bytes_vec(bytes.expect("kept").clone());
        let reader = burn::store::burn_pack::Reader::from_bytes(bytes).unwrap();
        for t in reader.into_tensors().unwrap() {
            let (name, dtype, _, _, _) = t.into_parts().unwrap();
            out.push((format!("{what}/{name}"), dtype));
        }
    }
    out
}

/// Rows of a fixed 4-d Gaussian with distinct means and scales, and their (t, eps) draws.
fn gaussian_batch(step: u64, n: usize, dev: &Device) -> (Tensor<2>, PathDraws) {
    let mut rng = crate::rng::rng_for(9, crate::rng::Stream::Prior, step);
    let rows: Vec<f32> = (0..n * 4)
        .map(|i| {
            let j = (i % 4) as f32;
            let e: f32 = rand::RngExt::sample(&mut rng, rand_distr::StandardNormal);
            (1.0 - 0.5 * j) + (0.3 + 0.2 * j) * e
        })
        .collect();
    let x = crate::flow::rows_to_tensor(&rows, 4, dev);
    let draws = PathDraws::sample(&mut rng, n, 4, dev);
    (x, draws)
}

/// Every gradient of `model`'s parameters, flattened in visiting order, with its dtype.
fn flat_grads(model: &VelocityMlp, grads: &GradientsParams) -> Vec<f32> {
    struct Flat<'a>(&'a GradientsParams, Vec<f32>);
    impl ModuleVisitor for Flat<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self
                .0
                .get::<D>(param.id)
                .expect("every parameter has a gradient");
            assert_eq!(
                g.dtype(),
                burn::tensor::DType::F32,
                "gradients reach the optimiser in f32"
            );
            self.1.extend(g.try_into_vec_as::<f32>().unwrap());
        }
    }
    let mut flat = Flat(grads, Vec::new());
    model.visit(&mut flat);
    flat.1
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f32 = b.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

fn paper_trainer(precision: Precision, steps: usize, dev: &Device) -> PriorTrainer {
    let mut rng = crate::rng::rng_for(5, crate::rng::Stream::Init, 0);
    let model = VelocityMlpConfig::new(4, 64, 2).init(&mut rng, &dev.clone().autodiff());
    Trainer::new(model, 3e-3, Schedule::Constant, steps)
        .with_optim(OptimSpec::PAPER_ADAMW)
        .with_ema(0.99)
        .with_precision(precision)
}

#[test]
fn bf16_loss_and_gradients_match_f32_within_bf16_tolerance() {
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    // A few f32 steps first, so the zero-initialised modulations and output carry weights and
    // every parameter gets a real gradient.
    let mut trainer = paper_trainer(Precision::F32, 100, &dev);
    for step in 0..20 {
        let (x, draws) = gaussian_batch(step, 256, &ad);
        trainer.train_step(x, &draws).unwrap();
    }
    let model = trainer.model().clone();
    let (x, draws) = gaussian_batch(99, 512, &ad);
    let at = |precision: Precision| {
        let compute = precision.cast_params(model.clone());
        let field = AtPrecision {
            field: &compute,
            precision,
        };
        let loss = flow_loss(&field, x.clone(), &draws, Reduction::Mean);
        assert_eq!(loss.dtype(), burn::tensor::DType::F32);
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        (value, flat_grads(&model, &grads))
    };
    let (l32, g32) = at(Precision::F32);
    let (l16, g16) = at(Precision::Bf16);
    assert!(
        (l16 - l32).abs() < 1e-2 * l32,
        "loss bf16 {l16} vs f32 {l32}"
    );
    assert_eq!(g16.len(), g32.len());
    let err = rel_err(&g16, &g32);
    assert!(err > 0.0 && err < 3e-2, "gradient relative error {err}");
}

#[test]
fn bf16_training_learns_and_keeps_weights_moments_and_ema_in_f32() {
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    let steps = 150;
    let mut trainer = paper_trainer(Precision::Bf16, steps, &dev);
    let mut losses = Vec::new();
    for step in 0..steps as u64 {
        let (x, draws) = gaussian_batch(step, 256, &ad);
        let stats = trainer.train_step(x, &draws).unwrap();
        assert!(stats.grad_norm.is_some_and(f32::is_finite));
        losses.push(stats.loss);
    }
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..10]), mean(&losses[steps - 20..]));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let state = trainer.state_bytes().unwrap();
    let dtypes = state_dtypes(&state);
    assert!(dtypes.iter().any(|(n, _)| n.starts_with("optim/")));
    assert!(dtypes.iter().any(|(n, _)| n.starts_with("ema/")));
    for (name, dtype) in &dtypes {
        assert_eq!(*dtype, burn::tensor::DType::F32, "{name}");
    }
    // The frozen prior (the EMA) is f32 and runs without any cast.
    let frozen = trainer.frozen();
    let v = frozen.forward_at(Tensor::zeros([3, 4], &dev), 0.5);
    assert_eq!(v.dtype(), burn::tensor::DType::F32);
}

#[test]
fn a_bf16_checkpoint_resumes_at_f32_and_back() {
    // The state is f32 whatever the compute precision, so a resume may change it.
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    let mut a = paper_trainer(Precision::Bf16, 20, &dev);
    for step in 0..5 {
        let (x, draws) = gaussian_batch(step, 64, &ad);
        a.train_step(x, &draws).unwrap();
    }
    let mut b = paper_trainer(Precision::F32, 20, &dev);
    b.restore(&a.state_bytes().unwrap()).unwrap();
    assert_eq!(param_values(b.model()), param_values(a.model()));
    let (x, draws) = gaussian_batch(5, 64, &ad);
    b.train_step(x, &draws).unwrap();
    let mut c = paper_trainer(Precision::Bf16, 20, &dev);
    c.restore(&b.state_bytes().unwrap()).unwrap();
    let (x, draws) = gaussian_batch(6, 64, &ad);
    assert!(c.train_step(x, &draws).unwrap().loss.is_finite());
    assert_eq!(c.step, 7);
}

#[test]
fn bf16_sharded_step_matches_the_one_device_step() {
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    let (x, draws) = gaussian_batch(0, 128, &ad);
    let mut one = paper_trainer(Precision::Bf16, 10, &dev);
    let whole = one.train_step(x.clone(), &draws).unwrap();
    let mut two = paper_trainer(Precision::Bf16, 10, &dev);
    let shards = (0..2)
        .map(|i| {
            let rows = i * 64..(i + 1) * 64;
            Shard {
                device: dev.clone(),
                x: x.clone().slice(rows.clone()),
                draws: PathDraws {
                    t: draws.t.clone().slice(rows.clone()),
                    eps: draws.eps.clone().slice(rows),
                },
                weight: 0.5,
            }
        })
        .collect();
    let split = two.train_step_sharded(shards).unwrap();
    assert!((split.loss - whole.loss).abs() < 1e-2 * whole.loss);
    let (a, b) = (param_values(one.model()), param_values(two.model()));
    assert!(rel_err(&b, &a) < 1e-2, "{}", rel_err(&b, &a));
}

#[test]
fn cosine_schedule_warms_up_then_decays_to_the_floor() {
    let s = Schedule::Cosine {
        warmup: 10,
        final_frac: 0.1,
    };
    assert!((s.lr(1.0, 0, 110) - 0.1).abs() < 1e-12);
    assert!((s.lr(1.0, 9, 110) - 1.0).abs() < 1e-12);
    assert!((s.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
    assert!((s.lr(1.0, 60, 110) - 0.55).abs() < 1e-12);
    assert!((s.lr(1.0, 110, 110) - 0.1).abs() < 1e-12);
    assert_eq!(Schedule::Constant.lr(0.3, 77, 100), 0.3);
}

/// Every float parameter of `model` by its dotted path: (rank, values).
fn params_by_path<M: Module>(model: &M) -> std::collections::BTreeMap<String, (usize, Vec<f32>)> {
    struct ByPath(
        Vec<String>,
        std::collections::BTreeMap<String, (usize, Vec<f32>)>,
    );
    impl ModuleVisitor for ByPath {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let v = param.val().try_into_vec_as::<f32>().unwrap();
            self.1.insert(self.0.join("."), (D, v));
        }
    }
    let mut v = ByPath(Vec::new(), Default::default());
    model.visit(&mut v);
    v.1
}

/// One AdamW step on a loss with zero gradient: Adam's update is then exactly 0, so the only change
/// is the decoupled decay `w <- w (1 - lr wd)`, which must reach matrices and spare 1-D
/// parameters (biases, LayerNorm) and the submodules the rule names.
fn decay_step(rule: Option<DecayRule>) -> Vec<(String, usize, f32)> {
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    let mut rng = crate::rng::rng_for(9, crate::rng::Stream::Init, 0);
    let model = VelocityMlpConfig::new(2, 16, 2).init(&mut rng, &ad);
    let spec = OptimSpec {
        weight_decay: 0.1,
        grad_clip: 0.0,
        ..OptimSpec::PAPER_ADAMW
    };
    let mut trainer = Trainer::new(model, 0.5, Schedule::Constant, 10).with_optim(spec);
    if let Some(rule) = rule {
        trainer = trainer.with_decay_rule(rule);
    }
    // Zero-initialised layers (the modulations, the output) stay zero and are skipped below.
    let before = params_by_path(trainer.model());
    let z = Tensor::<2>::ones([4, 2], &ad);
    let t = Tensor::<1>::ones([4], &ad) * 0.5;
    let loss = trainer.model().velocity(z, t).sum() * 0.0;
    trainer.step_loss(loss, "test").unwrap();
    let after = params_by_path(trainer.model());
    let mut ratios = Vec::new();
    for (path, (rank, b)) in &before {
        let a = &after[path].1;
        // The ratio after / before over the nonzero entries (1 when spared, 0.95 when decayed).
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(b) {
            num += (*x as f64) * (*y as f64);
            den += (*y as f64) * (*y as f64);
        }
        if den > 0.0 {
            ratios.push((path.clone(), *rank, (num / den) as f32));
        } else {
            assert!(a.iter().all(|&x| x == 0.0), "{path}: zero stays zero");
        }
    }
    ratios
}

#[test]
fn weight_decay_reaches_matrices_and_spares_biases_and_layer_norms() {
    let ratios = decay_step(None);
    let decayed = 1.0 - 0.5 * 0.1;
    let (mut matrices, mut vectors) = (0, 0);
    for (path, rank, ratio) in &ratios {
        if *rank >= 2 {
            matrices += 1;
            assert!(
                (ratio - decayed).abs() < 1e-6,
                "{path} (rank {rank}): {ratio}"
            );
        } else {
            vectors += 1;
            assert_eq!(*ratio, 1.0, "{path} (rank {rank}) was decayed");
        }
    }
    // Linear weights are decayed; LayerNorm gammas (ones) are not.
    assert!(matrices >= 4, "{ratios:?}");
    assert!(
        ratios.iter().any(|(p, r, _)| *r == 1 && p.contains("norm")),
        "a LayerNorm parameter is checked: {ratios:?}"
    );
    assert!(vectors >= 1);

    // Burn's plain AdamW decays everything; a named submodule can be spared as a whole.
    let all = decay_step(Some(DecayRule::everything()));
    assert!(
        all.iter().all(|(_, _, r)| (r - decayed).abs() < 1e-6),
        "{all:?}"
    );
    let some = decay_step(Some(DecayRule::matrices().sparing("blocks")));
    for (path, rank, ratio) in &some {
        let spared = *rank < 2 || path.starts_with("blocks.");
        let want = if spared { 1.0 } else { decayed };
        assert!((ratio - want).abs() < 1e-6, "{path} (rank {rank}): {ratio}");
    }
    assert!(
        some.iter()
            .any(|(p, r, _)| p.starts_with("blocks.") && *r == 2)
    );
}

#[test]
fn decay_rule_matches_by_rank_and_path_prefix() {
    let rule = DecayRule::matrices().sparing("head");
    assert!(rule.decays(2, "blocks.0.fc1.weight"));
    assert!(!rule.decays(1, "blocks.0.fc1.bias"));
    assert!(!rule.decays(2, "head.fc.weight"));
    assert!(!rule.decays(2, "head"));
    assert!(
        rule.decays(2, "header.weight"),
        "a prefix of a name is not a submodule"
    );
    assert!(DecayRule::everything().decays(1, "x.bias"));
}
