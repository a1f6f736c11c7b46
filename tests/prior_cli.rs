//! `flowalign prior train|eval|sample` end to end on a small bf16 table the test writes: a run,
//! a killed run resumed to the same weights, evaluation, sampling, and bad input.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use flowalign::flow::store::load_prior;
use flowalign::params::param_values;

mod common;
use common::{flowalign, one_line_error, prior_args, write_table};

const TENSOR: &str = "model.embed_tokens.weight";

fn weights(dir: &Path) -> Vec<f32> {
    let (prior, meta) = load_prior(dir, &Device::flex()).unwrap();
    assert_eq!(meta.dim, 8);
    param_values(&prior)
}

#[test]
fn train_kill_resume_eval_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    write_table(&file, 4000, 64);
    let spec = format!("{}:{TENSOR}", file.display());
    let whole = tmp.path().join("whole");
    let out = flowalign(&prior_args(&spec, whole.to_str().unwrap(), "400"));
    assert!(out.status.success(), "{out:?}");
    for f in [
        "config.toml",
        "checkpoint.toml",
        "prior.safetensors",
        "prior.toml",
        "metrics.csv",
        "metrics.jsonl",
    ] {
        assert!(whole.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(whole.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 40, "{csv}");
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    assert_eq!(last[0], "400");
    assert!(
        last[5].parse::<f32>().unwrap().is_finite(),
        "val_loss {last:?}"
    );

    // The same run killed (SIGKILL) once its first checkpoints exist, then resumed.
    let parts = tmp.path().join("parts");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowalign"))
        .args(prior_args(&spec, parts.to_str().unwrap(), "400"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !parts.join("checkpoint.toml").is_file() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let manifest = std::fs::read_to_string(parts.join("checkpoint.toml")).unwrap();
    let killed_at: usize = manifest
        .lines()
        .find_map(|l| l.strip_prefix("step = "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        killed_at < 400,
        "the run finished before it could be killed"
    );

    // Starting afresh over it is refused; so is resuming with another projection.
    let err = one_line_error(&flowalign(&prior_args(
        &spec,
        parts.to_str().unwrap(),
        "400",
    )));
    assert!(err.contains("--resume"), "{err}");
    let mut other = prior_args(&spec, parts.to_str().unwrap(), "400");
    other.extend(["--resume", "--projection-seed", "7"]);
    let err = one_line_error(&flowalign(&other));
    assert!(err.contains("projection_seed"), "{err}");

    let mut resume = prior_args(&spec, parts.to_str().unwrap(), "400");
    resume.push("--resume");
    let out = flowalign(&resume);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("at step {killed_at}")),
        "{out:?}"
    );
    assert!(weights(&whole) == weights(&parts), "resumed weights differ");

    // Data-parallel over two replicas (sharing the CPU here): the same run to float tolerance.
    let dp = tmp.path().join("dp");
    let mut args = prior_args(&spec, dp.to_str().unwrap(), "400");
    args.extend(["--gpus", "2"]);
    let out = flowalign(&args);
    assert!(out.status.success(), "{out:?}");
    let (a, b) = (weights(&whole), weights(&dp));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "two replicas differ from one by {diff}");

    // Evaluation and sampling.
    let out = flowalign(&[
        "prior",
        "eval",
        "--prior",
        whole.to_str().unwrap(),
        "--nll-rows",
        "16",
        "--ode-steps",
        "4",
        "--samples",
        "300",
        "--sample-steps",
        "20",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("eval.json")).unwrap()).unwrap();
    for key in [
        "fm_loss",
        "nll_data",
        "nll_samples",
        "log_rk_samples",
        "log_rk_data",
    ] {
        assert!(report[key].as_f64().unwrap().is_finite(), "{key}: {report}");
    }
    assert_eq!(report["k"], 5);
    assert!(whole.join("pca.png").is_file());

    let samples = tmp.path().join("samples.npy");
    let out = flowalign(&[
        "prior",
        "sample",
        "--prior",
        whole.to_str().unwrap(),
        "-n",
        "50",
        "--steps",
        "10",
        "--out",
        samples.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{out:?}");
    let bytes = std::fs::read(&samples).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(npy.shape(), &[50, 8]);
    let values: Vec<f32> = npy.into_vec().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}

#[test]
fn bad_input_is_one_line_and_leaves_no_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // A table with a NaN row.
    let mut data: Vec<f32> = (0..500 * 16).map(|i| ((i * 37) % 101) as f32).collect();
    data[16 * 7 + 3] = f32::NAN;
    let file = tmp.path().join("nan.npy");
    flowalign::features::write_npy(&file, 500, 16, &data).unwrap();
    let out_dir = tmp.path().join("run");
    let err = one_line_error(&flowalign(&prior_args(
        file.to_str().unwrap(),
        out_dir.to_str().unwrap(),
        "20",
    )));
    assert!(err.contains("--drop-nonfinite"), "{err}");
    assert!(!out_dir.join("checkpoint.toml").exists());

    // Pooling to a latent dim above the feature dim, a missing tensor name, a missing file.
    data[16 * 7 + 3] = 1.0;
    let clean = tmp.path().join("clean.npy");
    flowalign::features::write_npy(&clean, 500, 16, &data).unwrap();
    let mut args = prior_args(clean.to_str().unwrap(), out_dir.to_str().unwrap(), "20");
    let at = args.iter().position(|a| *a == "--latent-dim").unwrap();
    args[at + 1] = "32";
    args.extend(["--projection", "avgpool"]);
    let err = one_line_error(&flowalign(&args));
    assert!(err.contains("latent dim (32)"), "{err}");
    let st = tmp.path().join("t.safetensors");
    write_table(&st, 100, 16);
    let spec = format!("{}:nope", st.display());
    let err = one_line_error(&flowalign(&prior_args(
        &spec,
        out_dir.to_str().unwrap(),
        "20",
    )));
    assert!(err.contains(TENSOR), "{err}");
    let err = one_line_error(&flowalign(&prior_args(
        "/no/such/file.npy",
        out_dir.to_str().unwrap(),
        "20",
    )));
    assert!(err.contains("/no/such/file.npy"), "{err}");
    let err = one_line_error(&flowalign(&[
        "prior",
        "eval",
        "--prior",
        tmp.path().join("nothing").to_str().unwrap(),
    ]));
    assert!(err.contains("prior train"), "{err}");
    assert!(!out_dir.join("checkpoint.toml").exists());
}

#[test]
fn precision_flag_trains_in_bf16_and_a_resume_may_change_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    write_table(&file, 2000, 64);
    let spec = format!("{}:{TENSOR}", file.display());
    let dir = tmp.path().join("run");
    let mut args = prior_args(&spec, dir.to_str().unwrap(), "20");
    args.extend(["--precision", "bf16"]);
    let out = flowalign(&args);
    assert!(out.status.success(), "{out:?}");
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(cfg.contains("precision = \"bf16\""), "{cfg}");
    // The exported prior is f32 (its weights are the f32 master copy's EMA).
    assert!(weights(&dir).iter().all(|v| v.is_finite()));
    let out = flowalign(&[
        "prior",
        "train",
        "--out",
        dir.to_str().unwrap(),
        "--resume",
        "--steps",
        "40",
        "--precision",
        "f32",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{out:?}");
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(cfg.contains("precision = \"f32\""), "{cfg}");
    let out = flowalign(&[
        "prior",
        "train",
        "--out",
        "x",
        "--features",
        &spec,
        "--precision",
        "fp8",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Table 1's discrete and low-level priors from the CLI (METHOD.md section 6): a VQ-codebook-like
/// 8-column table mapped up to 32 dims by the random projection, and a KL-VAE-like 32-column table
/// used as it is (`auto` = identity). Each run's prior is 32-dimensional and the start says what a
/// step costs.
#[test]
fn table_one_priors_vq_8_to_32_and_vae_32_to_32_train_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    for (cols, kind) in [(8usize, "Random"), (32, "Identity")] {
        let file = tmp.path().join(format!("table{cols}.safetensors"));
        write_table(&file, 2048, cols);
        let spec = format!("{}:{TENSOR}", file.display());
        let out_dir = tmp.path().join(format!("prior{cols}"));
        let mut args = prior_args(&spec, out_dir.to_str().unwrap(), "30");
        common::set(&mut args, "--latent-dim", "32");
        let out = flowalign(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("2048 rows x {cols}"))
                && stderr.contains(&format!("-> 32 dims by {kind} projection")),
            "{stderr}"
        );
        assert!(
            stderr.contains("TFLOP") && stderr.contains("a step on this"),
            "{stderr}"
        );
        let (prior, meta) = load_prior(&out_dir, &Device::flex()).unwrap();
        assert_eq!(meta.dim, 32);
        assert!(param_values(&prior).iter().all(|v| v.is_finite()));
        let config = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
        assert!(config.contains("latent_dim = 32"), "{config}");
        assert!(config.contains("projection = \"auto\""), "{config}");
        let prior_toml = std::fs::read_to_string(out_dir.join("prior.toml")).unwrap();
        assert!(prior_toml.contains("dim = 32"), "{prior_toml}");

        // TensorBoard's event file beside metrics.csv parses and holds every line's loss.
        let lines = std::fs::read_to_string(out_dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .count()
            - 1;
        let events = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("tfevents"))
            .expect("an event file");
        let mut losses = Vec::new();
        for event in tfrecord::EventIter::open(&events, Default::default()).unwrap() {
            let event = event.unwrap();
            if let Some(tfrecord::protobuf::event::What::Summary(s)) = event.what {
                for v in s.value.iter().filter(|v| v.tag == "loss") {
                    if let Some(tfrecord::protobuf::summary::value::Value::SimpleValue(x)) = v.value
                    {
                        losses.push((event.step, x));
                    }
                }
            }
        }
        assert_eq!(losses.len(), lines, "{losses:?}");
        assert_eq!(losses.last().unwrap().0, 30);
        assert!(losses.iter().all(|(_, x)| x.is_finite()));
    }
}
