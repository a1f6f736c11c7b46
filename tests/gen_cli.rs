//! Stage 3 end to end at CI size, through the binary: a tiny aligned autoencoder on drawn images
//! whose three classes differ visibly -> `ae encode --flip` -> `gen train` (MAR with its flow head,
//! two seeds, and the DiT) -> `gen sample --ae` (decoded PNGs) -> `gen eval` (FID, KID with
//! deterministic stand-in Inception weights). The generator must beat two baselines decoded by the
//! same autoencoder, per-dimension Gaussian latents and token-shuffled real latents, by more than
//! its seed spread; the autoencoder's own reconstructions give the floor. Guidance must raise a
//! class probe's accuracy. A generator run stopped and resumed ends with the uninterrupted weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::Device;
use flowalign::ae::latents::{CacheWriter, LatentSet, read_latents_file};
use flowalign::generator::run::{GenRun, write_latents};
use flowalign::generator::sample::generate;
use flowalign::generator::{Arch, GenConfig, GenPreset};
use flowalign::metrics::inception::Layout;
use flowalign::params::param_values;
use flowalign::rng::{Stream, rng_for};
use rand::RngExt;
use rand_distr::{Distribution, Normal};

mod common;
use common::{ae_args, draw_images, flowalign, one_line_error, set, train_prior, write_inception};

/// Runs the binary and asserts success.
fn ok(args: &[&str]) {
    let out = flowalign(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// FID and KID (mean) of `images` against `reference` from `gen eval`.
fn eval(images: &Path, reference: &Path, inception: &Path, out: &Path) -> (f64, f64) {
    let cache = reference.with_extension("npz");
    ok(&[
        "gen",
        "eval",
        "--images",
        images.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--reference-cache",
        cache.to_str().unwrap(),
        "--inception",
        inception.to_str().unwrap(),
        "--recursive",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    (
        json["fid"].as_f64().unwrap(),
        json["kid"]["mean"].as_f64().unwrap(),
    )
}

/// Decodes a latents file into PNGs with `ae decode`.
fn decode(ae: &Path, latents: &Path, out: &Path) {
    ok(&[
        "ae",
        "decode",
        "--ae",
        ae.to_str().unwrap(),
        "--latents",
        latents.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
}

/// The flags of a small generator run.
fn gen_args<'a>(latents: &'a str, out: &'a str, arch: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "gen",
        "train",
        "--latents",
        latents,
        "--out",
        out,
        "--arch",
        arch,
        "--preset",
        "small",
        "--steps",
        "150",
        "--batch",
        "32",
        "--warmup",
        "20",
        "--ema",
        "0",
        "--seed",
        seed,
        "--checkpoint-every",
        "150",
        "--log-every",
        "25",
        "--device",
        "cpu",
    ]
}

/// The logged losses of a run.
fn losses(dir: &Path) -> Vec<f32> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

/// `gen sample` of `n` latents with guidance `cfg`, decoded by `ae` into `out/images`.
fn sample(run: &Path, ae: &Path, n: usize, cfg: &str, out: &Path) {
    let n = n.to_string();
    ok(&[
        "gen",
        "sample",
        "--gen",
        run.to_str().unwrap(),
        "--ae",
        ae.to_str().unwrap(),
        "-n",
        &n,
        "--cfg",
        cfg,
        "--num-iter",
        "8",
        "--steps",
        "50",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let (latents, tokens, dim) = read_latents_file(&out.join("latents.safetensors")).unwrap();
    assert_eq!(latents.len(), n.parse::<usize>().unwrap() * tokens * dim);
    let labels = std::fs::read_to_string(out.join("labels.txt")).unwrap();
    assert_eq!(labels.lines().count().to_string(), n);
}

/// The share of `latents` whose nearest class mean of the real latents is their label.
fn probe_accuracy(real: &LatentSet, latents: &[f32], labels: &[Option<usize>]) -> f64 {
    let per = real.stats.tokens * real.stats.dim;
    let classes = real.num_classes();
    let mut means = vec![vec![0.0f64; per]; classes];
    let mut counts = vec![0usize; classes];
    for (row, &c) in real.latents.chunks(per).zip(&real.labels) {
        let c = c as usize;
        counts[c] += 1;
        for (m, v) in means[c].iter_mut().zip(row) {
            *m += f64::from(*v);
        }
    }
    for (m, n) in means.iter_mut().zip(&counts) {
        m.iter_mut().for_each(|v| *v /= *n as f64);
    }
    let hits = latents
        .chunks(per)
        .zip(labels)
        .filter(|(row, label)| {
            let dist = |m: &Vec<f64>| -> f64 {
                m.iter()
                    .zip(row.iter())
                    .map(|(a, b)| (a - f64::from(*b)).powi(2))
                    .sum()
            };
            let best = (0..classes)
                .min_by(|a, b| dist(&means[*a]).total_cmp(&dist(&means[*b])))
                .unwrap();
            Some(best) == **label
        })
        .count();
    hits as f64 / labels.len() as f64
}

/// Baseline latents: `n` draws of independent per-dimension Gaussians with the real latents'
/// means and standard deviations, and `n` latents whose every token comes from a different random
/// real latent (same position): each token's distribution is real, their combination is not.
fn baselines(real: &LatentSet, n: usize) -> (Vec<f32>, Vec<f32>) {
    let per = real.stats.tokens * real.stats.dim;
    let rows = real.len();
    let (mut mean, mut sq) = (vec![0.0f64; per], vec![0.0f64; per]);
    for row in real.latents.chunks(per) {
        for (j, v) in row.iter().enumerate() {
            mean[j] += f64::from(*v);
            sq[j] += f64::from(*v).powi(2);
        }
    }
    let mut rng = rng_for(3, Stream::Reference, 0);
    let gaussian: Vec<f32> = (0..n * per)
        .map(|i| {
            let j = i % per;
            let m = mean[j] / rows as f64;
            let sd = (sq[j] / rows as f64 - m * m).max(0.0).sqrt();
            Normal::new(m, sd.max(1e-9)).unwrap().sample(&mut rng) as f32
        })
        .collect();
    let dim = real.stats.dim;
    let mut shuffled = Vec::with_capacity(n * per);
    for _ in 0..n {
        for t in 0..real.stats.tokens {
            let r = rng.random_range(0..rows);
            shuffled.extend_from_slice(&real.latents[r * per + t * dim..r * per + (t + 1) * dim]);
        }
    }
    (gaussian, shuffled)
}

#[test]
fn generator_on_aligned_latents_beats_the_baselines() {
    let start = Instant::now();
    let lap = |what: &str| eprintln!("{:6.1}s {what}", start.elapsed().as_secs_f64());
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| -> PathBuf { tmp.path().join(name) };
    let images = p("images");
    draw_images(&images, 48);
    let (ae, inception, prior) = (p("ae"), p("inception.safetensors"), p("prior"));
    train_prior(&prior, &p("table.npy"));
    let mut args = ae_args(
        images.to_str().unwrap(),
        prior.to_str().unwrap(),
        ae.to_str().unwrap(),
        "0.1",
    );
    set(&mut args, "--adv-weight", "0");
    ok(&args);
    write_inception(&inception, Layout::PytorchFid);
    let lat = p("latents");
    ok(&[
        "ae",
        "encode",
        "--ae",
        ae.to_str().unwrap(),
        "--data",
        images.to_str().unwrap(),
        "--out",
        lat.to_str().unwrap(),
        "--flip",
        "--device",
        "cpu",
    ]);
    lap("autoencoder trained, images encoded");
    let real = LatentSet::read(&lat).unwrap();
    assert_eq!(real.len(), 48);
    assert!(real.flipped.is_some(), "--flip keeps the mirrored latents");
    let n = 48;

    // The floor: the autoencoder's own reconstructions of the images.
    let recon = p("recon.safetensors");
    write_latents(&recon, &real.latents, real.stats.tokens, real.stats.dim).unwrap();
    decode(&ae, &recon, &p("recon"));
    let floor = eval(&p("recon"), &images, &inception, &p("floor.json"));
    lap("reconstructions scored");

    let mut scores = Vec::new();
    for seed in ["0", "1"] {
        let run = p(&format!("mar{seed}"));
        ok(&gen_args(
            lat.to_str().unwrap(),
            run.to_str().unwrap(),
            "mar",
            seed,
        ));
        lap(&format!("MAR seed {seed} trained"));
        let l = losses(&run);
        assert!(l.last().unwrap() < &(0.8 * l[0]), "MAR seed {seed}: {l:?}");
        let out = p(&format!("mar{seed}-samples"));
        sample(&run, &ae, n, "1", &out);
        scores.push(eval(
            &out.join("images"),
            &images,
            &inception,
            &p(&format!("mar{seed}.json")),
        ));
        lap(&format!("MAR seed {seed} sampled and scored"));
    }
    let (gaussian, shuffled) = baselines(&real, n);
    let mut base = Vec::new();
    for (name, latents) in [("gaussian", &gaussian), ("shuffled", &shuffled)] {
        let file = p(&format!("{name}.safetensors"));
        write_latents(&file, latents, real.stats.tokens, real.stats.dim).unwrap();
        decode(&ae, &file, &p(name));
        base.push(eval(
            &p(name),
            &images,
            &inception,
            &p(&format!("{name}.json")),
        ));
    }
    lap("baselines scored");
    let fid_spread = (scores[0].0 - scores[1].0).abs();
    let kid_spread = (scores[0].1 - scores[1].1).abs();
    let worst = (scores[0].0.max(scores[1].0), scores[0].1.max(scores[1].1));
    eprintln!(
        "FID / KID: reconstructions {floor:?}; MAR seeds 0, 1 {scores:?}; Gaussian latents {:?}; token-shuffled latents {:?}",
        base[0], base[1]
    );
    for (name, (fid, kid)) in ["Gaussian", "token-shuffled"].iter().zip(&base) {
        assert!(
            worst.0 + fid_spread < *fid,
            "MAR's FID {scores:?} does not beat the {name} baseline's {fid} by its seed spread"
        );
        assert!(
            worst.1 + kid_spread < *kid,
            "MAR's KID {scores:?} does not beat the {name} baseline's {kid} by its seed spread"
        );
    }
    assert!(
        floor.0 < worst.0,
        "reconstructions are the floor: {floor:?}"
    );

    // The DiT shares the data, the sampler's command, decoding and evaluation.
    let dit = p("dit");
    ok(&gen_args(
        lat.to_str().unwrap(),
        dit.to_str().unwrap(),
        "dit",
        "0",
    ));
    let l = losses(&dit);
    assert!(l.last().unwrap() < &(0.8 * l[0]), "DiT: {l:?}");
    sample(&dit, &ae, n, "1", &p("dit-samples"));
    let dit_score = eval(
        &p("dit-samples").join("images"),
        &images,
        &inception,
        &p("dit.json"),
    );
    lap("DiT trained, sampled and scored");
    eprintln!("DiT (not the paper's generator) FID / KID {dit_score:?}");
    assert!(dit_score.0 < base[0].0, "the DiT beats Gaussian latents");

    // Bad input is one line naming the problem.
    let missing = p("nowhere");
    let err = one_line_error(&flowalign(&gen_args(
        missing.to_str().unwrap(),
        p("bad").to_str().unwrap(),
        "mar",
        "0",
    )));
    assert!(err.contains("nowhere"), "{err}");
}

/// A small config on the latents in `dir`.
fn resume_config(lat: &Path) -> GenConfig {
    let set = LatentSet::read(lat).unwrap();
    let mut cfg = GenConfig::preset(GenPreset::Small, lat.to_str().unwrap());
    cfg.fit_to(set.stats.tokens, set.stats.dim, set.num_classes());
    cfg.arch = Arch::Mar;
    cfg.train.run.steps = 20;
    cfg.train.run.batch = 8;
    cfg.train.run.warmup = 4;
    cfg.train.run.ema = 0.9;
    cfg.train.run.checkpoint_every = 5;
    cfg.train.run.log_every = 5;
    cfg
}

#[test]
fn a_stopped_generator_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("latents");
    // 24 latents of 8 x 4 in 3 classes, written as `ae encode` writes its cache.
    let mut rng = rng_for(9, Stream::Reference, 0);
    let latents: Vec<f32> = (0..24 * 32)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let labels: Vec<i64> = (0..24).map(|i| i % 3).collect();
    let mut cache = CacheWriter::create(&lat, false).unwrap();
    cache
        .write_shard(&latents[..12 * 32], None, &labels[..12], 8, 4)
        .unwrap();
    cache
        .write_shard(&latents[12 * 32..], None, &labels[12..], 8, 4)
        .unwrap();
    cache.finish(&["a".into(), "b".into(), "c".into()]).unwrap();
    let cfg = resume_config(&lat);
    let dev = Device::flex();

    let whole = tmp.path().join("whole");
    let mut run = GenRun::open(cfg.clone(), &whole, false, &dev, None).unwrap();
    run.run(|| false, |_| {}).unwrap();
    let want = param_values(&run.frozen());

    let parts = tmp.path().join("parts");
    let mut run = GenRun::open(cfg.clone(), &parts, false, &dev, None).unwrap();
    let polls = std::cell::Cell::new(0);
    let stopped = run
        .run(
            || {
                polls.set(polls.get() + 1);
                polls.get() >= 7
            },
            |_| {},
        )
        .unwrap();
    assert_eq!((stopped.step, stopped.interrupted), (7, true));
    for _ in 0..3 {
        run.train_step().unwrap();
    }
    drop(run); // killed: steps 8..10 are lost, the checkpoint at 7 is intact
    let mut other = cfg.clone();
    other.train.mask_ratio_min = 0.5;
    let err = GenRun::open(other, &parts, true, &dev, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("mask_ratio_min"), "{err}");
    let mut run = GenRun::open(cfg, &parts, true, &dev, None).unwrap();
    assert_eq!(run.step(), 7);
    run.run(|| false, |_| {}).unwrap();
    let got = param_values(&run.frozen());
    assert!(
        got == want,
        "EMA weights differ after resume (max |diff| {})",
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    );
}

/// 600 latents of 8 x 4 in three classes whose means (+-0.25 per entry, random signs) sit close
/// against their unit spread: a nearest-class-mean probe recognises about two thirds of the real
/// latents. Guidance must make the class visible in more samples.
#[test]
fn guidance_raises_a_class_probe_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("latents");
    let mut rng = rng_for(11, Stream::Reference, 0);
    let (n, per) = (600, 32);
    let signs: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            (0..per)
                .map(|_| if rng.random_bool(0.5) { 1.0 } else { -1.0 })
                .collect()
        })
        .collect();
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let latents: Vec<f32> = labels
        .iter()
        .flat_map(|&c| signs[c as usize].clone())
        .map(|s| 0.25 * s + normal.sample(&mut rng))
        .collect();
    let mut cache = CacheWriter::create(&lat, false).unwrap();
    cache.write_shard(&latents, None, &labels, 8, 4).unwrap();
    cache.finish(&["a".into(), "b".into(), "c".into()]).unwrap();
    let real = LatentSet::read(&lat).unwrap();
    let real_labels: Vec<Option<usize>> = real.labels.iter().map(|&c| Some(c as usize)).collect();
    let data_accuracy = probe_accuracy(&real, &real.latents, &real_labels);

    let mut cfg = resume_config(&lat);
    cfg.train.run.steps = 400;
    cfg.train.run.batch = 64;
    cfg.train.run.warmup = 20;
    cfg.train.run.ema = 0.0;
    cfg.train.run.checkpoint_every = 400;
    cfg.train.run.log_every = 100;
    let mut run = GenRun::open(
        cfg.clone(),
        &tmp.path().join("run"),
        false,
        &Device::flex(),
        None,
    )
    .unwrap();
    run.run(|| false, |_| {}).unwrap();
    let model = run.frozen();
    let wanted: Vec<Option<usize>> = (0..150).map(|i| Some(i % 3)).collect();
    let mut opts = cfg.sample_options();
    (opts.num_iter, opts.time_points) = (8, 50);
    let mut accuracy = |scale: f32| {
        opts.cfg = scale;
        let x = generate(
            &model,
            &wanted,
            &opts,
            cfg.data.scale as f32,
            &mut rng_for(0, Stream::Sample, 0),
        )
        .unwrap();
        probe_accuracy(&real, &x.try_into_vec_as::<f32>().unwrap(), &wanted)
    };
    let (a1, a3) = (accuracy(1.0), accuracy(3.0));
    eprintln!(
        "class probe accuracy: real latents {data_accuracy:.3}, samples at cfg 1 {a1:.3}, at cfg 3 {a3:.3}"
    );
    assert!(a3 >= a1 + 0.1, "cfg 3 {a3} vs cfg 1 {a1}");
}
