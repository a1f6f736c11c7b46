//! A feature prior run stopped or killed mid-way and resumed ends with exactly the weights of an
//! uninterrupted run (CPU backend), and resume refuses what would not continue the same run.

use std::path::Path;

use burn::prelude::Device;
use flowalign::features::projection::ProjectionKind;
use flowalign::features::write_npy;
use flowalign::params::param_values;
use flowalign::prior::{FeaturePriorConfig, PriorPreset, PriorRun};

/// A 600 x 12 table of two Gaussian blobs.
fn table(path: &Path) {
    let data: Vec<f32> = (0..600 * 12)
        .map(|i| {
            let (row, col) = (i / 12, i % 12);
            let centre = if row % 2 == 0 { 2.0 } else { -1.0 };
            centre + ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * (1.0 + col as f32 / 6.0)
        })
        .collect();
    write_npy(path, 600, 12, &data).unwrap();
}

fn config(features: &Path) -> FeaturePriorConfig {
    let mut cfg = FeaturePriorConfig::preset(PriorPreset::Small, features.to_str().unwrap());
    cfg.data.latent_dim = 6;
    cfg.data.projection = ProjectionKind::Random;
    cfg.data.holdout = 50;
    cfg.model.width = 32;
    cfg.model.depth = 2;
    cfg.train.run.steps = 30;
    cfg.train.run.batch = 64;
    cfg.train.mc = 2;
    cfg.train.run.warmup = 5;
    cfg.train.run.checkpoint_every = 10;
    cfg.train.run.log_every = 5;
    cfg
}

/// The metrics CSV without its timing column.
fn metrics(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{},{},{}", f[0], f[1], f[2], f[3], f[5])
        })
        .collect()
}

#[test]
fn resumed_runs_end_with_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let features = tmp.path().join("features.npy");
    table(&features);
    let cfg = config(&features);
    let dev = Device::flex();

    let whole = tmp.path().join("whole");
    let mut run = PriorRun::open(cfg.clone(), &whole, false, &dev, None).unwrap();
    let done = run.run(|| false, |_| {}).unwrap();
    assert_eq!((done.run.step, done.run.interrupted), (30, false));
    let want = (param_values(&run.frozen()), metrics(&whole));

    // Stopped at step 13 (a checkpoint is written there), then killed at step 17 without one.
    let parts = tmp.path().join("parts");
    let mut run = PriorRun::open(cfg.clone(), &parts, false, &dev, None).unwrap();
    let polls = std::cell::Cell::new(0); // one poll per step
    let stopped = run
        .run(
            || {
                polls.set(polls.get() + 1);
                polls.get() >= 13
            },
            |_| {},
        )
        .unwrap();
    assert_eq!((stopped.run.step, stopped.run.interrupted), (13, true));
    drop(run);
    let mut run = PriorRun::open(cfg.clone(), &parts, true, &dev, None).unwrap();
    assert_eq!(run.step(), 13);
    for _ in 0..4 {
        run.train_step().unwrap();
    }
    drop(run); // killed: steps 14..17 are lost, the checkpoint at 13 is intact

    // A new run may not overwrite the checkpoint.
    let err = PriorRun::open(cfg.clone(), &parts, false, &dev, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("already holds a run") && err.contains("step 13"),
        "{err}"
    );
    // Nor may a resume change the projection.
    let mut other = cfg.clone();
    other.data.projection_seed = 7;
    let err = PriorRun::open(other, &parts, true, &dev, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("data.projection_seed"), "{err}");

    let mut run = PriorRun::open(cfg, &parts, true, &dev, None).unwrap();
    assert_eq!(run.step(), 13);
    let done = run.run(|| false, |_| {}).unwrap();
    assert_eq!((done.run.resumed_from, done.run.step), (13, 30));
    let got = (param_values(&run.frozen()), metrics(&parts));
    assert_eq!(got.0.len(), want.0.len());
    assert!(
        got.0 == want.0,
        "EMA weights differ after resume (max |diff| {})",
        got.0
            .iter()
            .zip(&want.0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    );
    // The same lines, except around the stop: it wrote a line at step 13, so the line at 15
    // averages steps 14-15 only. Lines past 17 show the killed steps were redone identically.
    let around_stop = |l: &String| l.starts_with("13,") || l.starts_with("15,");
    let mut expect = want.1.clone();
    expect.retain(|l| !around_stop(l));
    let mut seen = got.1.clone();
    seen.retain(|l| !around_stop(l));
    assert_eq!(seen, expect);
    assert_eq!(got.1.len(), want.1.len() + 1);
}

#[test]
fn resume_refuses_a_changed_table() {
    let tmp = tempfile::tempdir().unwrap();
    let features = tmp.path().join("features.npy");
    table(&features);
    let mut cfg = config(&features);
    cfg.train.run.steps = 10;
    let dir = tmp.path().join("run");
    let dev = Device::flex();
    PriorRun::open(cfg.clone(), &dir, false, &dev, None)
        .unwrap()
        .run(|| false, |_| {})
        .unwrap();
    let data: Vec<f32> = (0..300 * 12).map(|i| (i % 7) as f32).collect();
    write_npy(&features, 300, 12, &data).unwrap();
    let err = PriorRun::open(cfg, &dir, true, &dev, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("same feature table"), "{err}");
}

#[test]
fn two_replicas_train_the_same_weights_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let features = tmp.path().join("features.npy");
    table(&features);
    let mut cfg = config(&features);
    cfg.train.run.steps = 20;
    let dev = Device::flex();
    let mut one = PriorRun::open(cfg.clone(), &tmp.path().join("one"), false, &dev, None).unwrap();
    one.run(|| false, |_| {}).unwrap();
    // Two replicas (on the one CPU device, each with its own thread and autodiff graph).
    let mut two = PriorRun::open(cfg, &tmp.path().join("two"), false, &dev, None)
        .unwrap()
        .with_replicas(vec![dev.clone(), dev.clone()]);
    two.run(|| false, |_| {}).unwrap();
    let (a, b) = (param_values(&one.frozen()), param_values(&two.frozen()));
    let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    eprintln!("two replicas vs one: max |diff| {diff:e} (largest weight {scale})");
    assert!(diff <= 1e-4 * scale, "max |diff| {diff} (scale {scale})");
}

#[test]
fn bf16_runs_resume_exactly_and_may_resume_at_f32() {
    use flowalign::precision::Precision;
    let tmp = tempfile::tempdir().unwrap();
    let features = tmp.path().join("features.npy");
    table(&features);
    let mut cfg = config(&features);
    cfg.train.run.precision = Precision::Bf16;
    let dev = Device::flex();
    let stop_at_13 = || {
        let polls = std::cell::Cell::new(0);
        move || {
            polls.set(polls.get() + 1);
            polls.get() >= 13
        }
    };

    let whole = tmp.path().join("whole");
    let mut run = PriorRun::open(cfg.clone(), &whole, false, &dev, None).unwrap();
    let done = run.run(|| false, |_| {}).unwrap();
    let want = param_values(&run.frozen());
    assert!(done.val_loss.is_finite());

    // bf16 is deterministic on the CPU: a stopped and resumed run ends with the same weights.
    let parts = tmp.path().join("parts");
    let mut run = PriorRun::open(cfg.clone(), &parts, false, &dev, None).unwrap();
    assert!(run.run(stop_at_13(), |_| {}).unwrap().run.interrupted);
    drop(run);
    let mut run = PriorRun::open(cfg.clone(), &parts, true, &dev, None).unwrap();
    run.run(|| false, |_| {}).unwrap();
    assert!(param_values(&run.frozen()) == want);

    // The checkpoint holds f32 state only, so the rest of the run may compute in f32.
    let switched = tmp.path().join("switched");
    let mut run = PriorRun::open(cfg.clone(), &switched, false, &dev, None).unwrap();
    assert!(run.run(stop_at_13(), |_| {}).unwrap().run.interrupted);
    drop(run);
    let mut f32_cfg = cfg.clone();
    f32_cfg.train.run.precision = Precision::F32;
    let mut run = PriorRun::open(f32_cfg, &switched, true, &dev, None).unwrap();
    let end = run.run(|| false, |_| {}).unwrap();
    assert_eq!((end.run.resumed_from, end.run.step), (13, 30));
    assert!(
        (end.val_loss - done.val_loss).abs() < 0.05 * done.val_loss,
        "{} vs {}",
        end.val_loss,
        done.val_loss
    );
    let written = std::fs::read_to_string(switched.join("config.toml")).unwrap();
    assert!(written.contains("precision = \"f32\""), "{written}");
}
