//! `flowalign ae train` end to end on images the test draws: the reconstruction improves, the
//! alignment monitor runs, the adversarial term runs from step 20, eval scores it (rFID with
//! Inception weights the test writes), a killed run resumes to the same weights (autoencoder and
//! discriminator), a corrupt file is skipped, and bad input is a one-line error.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use flowalign::ae::config::AeConfig;
use flowalign::ae::train::AeRun;
use flowalign::checkpoint;
use flowalign::metrics::inception::Layout;
use flowalign::params::param_values;

mod common;
use common::{ae_args, draw_images, flowalign, one_line_error, train_prior, write_inception};

/// The adversarial columns of the metrics line at `step` (empty cells as `None`).
fn adv_columns(dir: &Path, step: usize) -> Vec<Option<f32>> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let line: Vec<&str> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|l| l[0] == step.to_string())
        .unwrap();
    ["g_adv", "d_loss", "d_real", "d_fake", "lecam", "cr"]
        .iter()
        .map(|c| {
            line[header.iter().position(|h| h == c).unwrap()]
                .parse()
                .ok()
        })
        .collect()
}

/// The discriminator's checkpointed weights and LeCAM's running means.
fn discriminator_state(dir: &Path) -> (Vec<f32>, Vec<(String, f64)>) {
    let (manifest, _) = checkpoint::load::<flowalign::ae::data::ImageInfo>(dir)
        .unwrap()
        .unwrap();
    let part = checkpoint::load_part(dir, &manifest, "disc")
        .unwrap()
        .unwrap();
    assert_eq!(
        part.step, manifest.step,
        "the discriminator keeps the run's step"
    );
    let cfg: AeConfig = checkpoint::read_config(dir, "ae train").unwrap();
    let run = AeRun::open(cfg, dir, true, &Device::flex(), None).unwrap();
    let weights = param_values(run.discriminator().unwrap().model());
    (weights, manifest.values.into_iter().collect())
}

/// (step, psnr, monitor L_align, monitor log r_k) of every metrics line.
fn metrics(dir: &Path) -> Vec<(usize, f32, Option<f32>, Option<f32>)> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (s, p, a, r) = (
        col("step"),
        col("psnr"),
        col("monitor_l_align"),
        col("monitor_log_rk"),
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[s].parse().unwrap(),
                f[p].parse().unwrap_or(f32::NAN),
                f[a].parse().ok(),
                f[r].parse().ok(),
            )
        })
        .collect()
}

fn final_weights(dir: &Path) -> Vec<f32> {
    let cfg: AeConfig = checkpoint::read_config(dir, "ae train").unwrap();
    param_values(
        &AeRun::open(cfg, dir, true, &Device::flex(), None)
            .unwrap()
            .frozen(),
    )
}

#[test]
fn ae_train_improves_monitors_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    draw_images(&images, 48);
    std::fs::write(images.join("class1/broken.png"), b"not a png").unwrap();
    let prior = tmp.path().join("prior");
    train_prior(&prior, &tmp.path().join("table.npy"));
    let (data, prior) = (images.to_str().unwrap(), prior.to_str().unwrap());

    let whole = tmp.path().join("whole");
    let start = Instant::now();
    let out = flowalign(&ae_args(data, prior, whole.to_str().unwrap(), "0.1"));
    assert!(out.status.success(), "{out:?}");
    let secs = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.png"),
        "the corrupt file is named: {stderr}"
    );
    let m = metrics(&whole);
    assert_eq!(m.last().unwrap().0, 150);
    assert_eq!(m[0].0, 0, "the monitor scores the initial latents");
    let (first, last) = (m[1].1, m.last().unwrap().1);
    eprintln!(
        "aligned run: PSNR {first:.2} -> {last:.2} dB in {secs:.1}s; monitor {:?}",
        m.last()
    );
    assert!(last > first + 3.0, "PSNR {first} -> {last}");
    let mon = m.last().unwrap();
    assert!(
        mon.2.unwrap().is_finite() && mon.3.unwrap().is_finite(),
        "{mon:?}"
    );
    assert!(whole.join("recon.png").is_file() && whole.join("alignment.png").is_file());
    // TensorBoard gets the same figures as images, and the metrics as scalars.
    let (mut images, mut scalars) = (Vec::new(), 0);
    for file in std::fs::read_dir(&whole)
        .unwrap()
        .map(|e| e.unwrap().path())
    {
        if !file.to_string_lossy().contains("tfevents") {
            continue;
        }
        for event in tfrecord::EventIter::open(&file, Default::default()).unwrap() {
            let event = event.unwrap();
            if let Some(tfrecord::protobuf::event::What::Summary(s)) = event.what {
                for v in s.value {
                    match v.value {
                        Some(tfrecord::protobuf::summary::value::Value::Image(i)) => {
                            assert!(i.width > 0 && i.encoded_image_string.starts_with(b"\x89PNG"));
                            images.push(v.tag);
                        }
                        Some(tfrecord::protobuf::summary::value::Value::SimpleValue(_)) => {
                            scalars += 1
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    assert!(
        images.iter().any(|t| t == "recon") && images.iter().any(|t| t == "alignment"),
        "{images:?}"
    );
    assert!(scalars > 10);
    // The adversarial term: off before step 20, every column finite once it runs.
    assert!(adv_columns(&whole, 10).iter().all(Option::is_none));
    let adv = adv_columns(&whole, 150);
    eprintln!(
        "adversarial columns at step 150 (g_adv, d_loss, d_real, d_fake, lecam, cr): {adv:?}"
    );
    assert!(adv.iter().all(|v| v.is_some_and(f32::is_finite)), "{adv:?}");
    let csv = std::fs::read_to_string(whole.join("metrics.csv")).unwrap();
    let skipped: usize = csv
        .lines()
        .last()
        .unwrap()
        .rsplit(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        skipped >= 1,
        "skipped_images counts the corrupt file: {csv}"
    );

    // Evaluation and latent caching.
    let out = flowalign(&[
        "ae",
        "eval",
        "--ae",
        whole.to_str().unwrap(),
        "--data",
        data,
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["images"], 48, "{report}");
    let (p, s) = (
        report["psnr"].as_f64().unwrap(),
        report["ssim"].as_f64().unwrap(),
    );
    assert!(p > 10.0 && s > 0.0 && s <= 1.0, "{report}");
    assert!(whole.join("eval-recon.png").is_file());
    assert!(report.get("rfid").is_none(), "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rFID is off"),
        "{out:?}"
    );
    // rFID with (random, deterministic) Inception weights, on the first 12 images.
    let inception = tmp.path().join("inception.safetensors");
    write_inception(&inception, Layout::Torchvision);
    let scored = tmp.path().join("scored");
    let eval_with = |weights: &Path| {
        flowalign(&[
            "ae",
            "eval",
            "--ae",
            whole.to_str().unwrap(),
            "--data",
            data,
            "--max-images",
            "12",
            "--out",
            scored.to_str().unwrap(),
            "--inception",
            weights.to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    let out = eval_with(&inception);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(scored.join("eval.json")).unwrap()).unwrap();
    let rfid = report["rfid"].as_f64().unwrap();
    eprintln!("rFID on 12 images (random Inception weights): {rfid}");
    assert!(rfid.is_finite() && rfid >= 0.0, "{report}");
    assert_eq!(report["rfid_images"], 12, "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rFID"),
        "the summary line reports it: {out:?}"
    );
    let missing = tmp.path().join("no-inception.safetensors");
    let err = one_line_error(&eval_with(&missing));
    assert!(err.contains("no-inception.safetensors"), "{err}");
    let latents = tmp.path().join("latents");
    let out = flowalign(&[
        "ae",
        "encode",
        "--ae",
        whole.to_str().unwrap(),
        "--data",
        data,
        "--out",
        latents.to_str().unwrap(),
        "--shard-size",
        "20",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{out:?}");
    let mut total = 0;
    for shard in [
        "latents-00000.safetensors",
        "latents-00001.safetensors",
        "latents-00002.safetensors",
    ] {
        let bytes = std::fs::read(latents.join(shard)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let l = st.tensor("latents").unwrap();
        assert_eq!(&l.shape()[1..], &[8, 4]);
        assert_eq!(st.tensor("labels").unwrap().shape(), &[l.shape()[0]]);
        total += l.shape()[0];
    }
    assert_eq!(
        total, 48,
        "every readable image once, the corrupt one skipped"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(latents.join("stats.json")).unwrap())
            .unwrap();
    assert!(stats["std"].as_f64().unwrap() > 0.0, "{stats}");

    // Killed after its first checkpoint, then resumed: the same weights.
    let parts = tmp.path().join("parts");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowalign"))
        .args(ae_args(data, prior, parts.to_str().unwrap(), "0.1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !parts.join("checkpoint.toml").is_file() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut resume = ae_args(data, prior, parts.to_str().unwrap(), "0.1");
    resume.push("--resume");
    let out = flowalign(&resume);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resuming"),
        "{out:?}"
    );
    assert!(
        final_weights(&whole) == final_weights(&parts),
        "resumed weights differ"
    );
    assert!(
        discriminator_state(&whole) == discriminator_state(&parts),
        "resumed discriminator differs"
    );

    // Data-parallel over two replicas (sharing the CPU here): the same run to float tolerance.
    let dp = tmp.path().join("dp");
    let mut args = ae_args(data, prior, dp.to_str().unwrap(), "0.1");
    args.extend(["--gpus", "2"]);
    let out = flowalign(&args);
    assert!(out.status.success(), "{out:?}");
    // Equal up to float summation order: the losses logged before the adversarial term starts
    // (steps 10 and 20) agree closely. From step 20 the generator and the discriminator train
    // against each other, which amplifies rounding differences (and Adam normalises tiny
    // gradients), so the end of the 150 steps is compared loosely.
    let loss_at = |dir: &Path| -> Vec<f32> {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .skip(2) // header, step 0
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let (l1, l2) = (loss_at(&whole), loss_at(&dp));
    eprintln!(
        "two replicas vs one: loss at step 10 {} vs {}, at the end {} vs {}",
        l1[0],
        l2[0],
        l1.last().unwrap(),
        l2.last().unwrap()
    );
    eprintln!("losses every 10 steps, one replica: {l1:?}\ntwo replicas: {l2:?}");
    for i in 0..2 {
        assert!(
            (l1[i] - l2[i]).abs() <= 1e-4 * l1[i].abs(),
            "step {}: {} vs {}",
            10 * (i + 1),
            l1[i],
            l2[i]
        );
    }
    let (e1, e2) = (l1.last().unwrap(), l2.last().unwrap());
    assert!((e1 - e2).abs() <= 0.06 * e1.abs(), "{e1} vs {e2}");

    // lambda = 0, same seed: the latents drift from the prior; the reconstruction is comparable.
    let plain = tmp.path().join("plain");
    let out = flowalign(&ae_args(data, prior, plain.to_str().unwrap(), "0"));
    assert!(out.status.success(), "{out:?}");
    let p = metrics(&plain);
    let (a, b) = (m.last().unwrap(), p.last().unwrap());
    eprintln!(
        "lambda 0.1 vs 0: L_align {:?} vs {:?}, log r_k {:?} vs {:?}, PSNR {} vs {}",
        a.2, b.2, a.3, b.3, a.1, b.1
    );
    assert!(
        a.2.unwrap() < b.2.unwrap(),
        "L_align with lambda > 0 must be lower"
    );
    assert!(
        a.3.unwrap() < b.3.unwrap(),
        "log r_k with lambda > 0 must be lower"
    );
    assert!((a.1 - b.1).abs() < 1.0, "PSNR within 1 dB");
}

#[test]
fn ae_bad_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    draw_images(&images, 6);
    let prior = tmp.path().join("prior");
    train_prior(&prior, &tmp.path().join("table.npy"));
    let out_dir = tmp.path().join("run");
    let (data, p, o) = (
        images.to_str().unwrap(),
        prior.to_str().unwrap(),
        out_dir.to_str().unwrap(),
    );
    // A prior of another dimension.
    let mut args = ae_args(data, p, o, "0.1");
    let at = args.iter().position(|a| *a == "--latent-dim").unwrap();
    args[at + 1] = "8";
    let err = one_line_error(&flowalign(&args));
    assert!(
        err.contains("4-dim") && err.contains("--latent-dim"),
        "{err}"
    );
    // No images; a missing prior; a patch that does not divide the image.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = one_line_error(&flowalign(&ae_args(empty.to_str().unwrap(), p, o, "0.1")));
    assert!(err.contains("no .jpg"), "{err}");
    let err = one_line_error(&flowalign(&ae_args(data, "/no/prior", o, "0.1")));
    assert!(err.contains("/no/prior"), "{err}");
    let mut args = ae_args(data, p, o, "0.1");
    let at = args.iter().position(|a| *a == "--patch").unwrap();
    args[at + 1] = "5";
    let err = one_line_error(&flowalign(&args));
    assert!(err.contains("patch"), "{err}");
    // Images smaller than the crop, when asked to refuse them (40 px drawn, 48 px crop).
    let mut args = ae_args(data, p, o, "0.1");
    let at = args.iter().position(|a| *a == "--image-size").unwrap();
    args[at + 1] = "48";
    args.extend(["--small-images", "error", "--lpips", "0"]);
    let err = one_line_error(&flowalign(&args));
    assert!(err.contains("smaller than the 48-pixel crop"), "{err}");
    let mut args = ae_args(data, p, o, "0.1");
    args.extend(["--encoder-init", "/no/dinov2.safetensors"]);
    let err = one_line_error(&flowalign(&args));
    assert!(err.contains("/no/dinov2.safetensors"), "{err}");
    assert!(!out_dir.join("checkpoint.toml").exists());
}
